"""Sharded loading: with EP x TP each rank reads only its own slices of a safetensors checkpoint
(its experts, its heads / intermediate rows, the FP8 scale blocks covering them, including slices
whose boundary falls inside a 128-block), and the sharded model gives the single-process logits.

Run as a script to measure the per-rank peak RSS of loading a few-hundred-MB checkpoint on 4
ranks vs one process (the numbers in docs/perf.md):

    python tests/test_sharded_loading.py --measure
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

import hal
import hal.models as M
from hal.models.builtin import CONFIGS, random_checkpoint
from hal.spawn_ranks import run_ranks

PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 8, 9], [40, 41, 42]]


def _quantizable(name: str, t: torch.Tensor) -> bool:
    return (name.endswith(".weight") and t.dim() == 2 and "embed_tokens" not in name and "lm_head" not in name
            and ".gate.weight" not in name and "weights_proj" not in name and "norm" not in name)


def save_checkpoint(cfg: dict, folder: Path, *, fp8: bool, seed: int = 0) -> None:
    """A Hugging Face folder for config dict ``cfg``: random weights (FP8 128x128 blocks with
    ``weight_scale_inv`` when ``fp8``) in two safetensors shards with their index."""
    from safetensors.torch import save_file
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, t in random_checkpoint(cfg, seed).items():
        if fp8 and _quantizable(name, t):
            tensors[name], tensors[name + "_scale_inv"] = hal.ops.fp8_quantize_weight(t)
        else:
            tensors[name] = t
    half = cfg["num_hidden_layers"] // 2
    shard = {n: ("model-00001-of-00002.safetensors" if ".layers." in n and int(n.split(".")[2]) < half
                 else "model-00002-of-00002.safetensors") for n in tensors}
    for fname in set(shard.values()):
        save_file({n: t.contiguous() for n, t in tensors.items() if shard[n] == fname}, str(folder / fname))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": shard}))
    config = dict(cfg)
    if fp8:
        config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    (folder / "config.json").write_text(json.dumps(config))


class _Slice:
    def __init__(self, inner, name, log):
        self.inner, self.name, self.log = inner, name, log

    def get_shape(self):
        return self.inner.get_shape()

    def get_dtype(self):
        return self.inner.get_dtype()

    def __getitem__(self, index):
        self.log.append((self.name, index if isinstance(index, tuple) else (index,)))
        return self.inner[index]


class _Recording:
    """A safe_open handle recording every read: (name, None) for get_tensor, (name, index) for a slice."""

    def __init__(self, inner, log):
        self.inner, self.log = inner, log

    def keys(self):
        return self.inner.keys()

    def get_tensor(self, name):
        self.log.append((name, None))
        return self.inner.get_tensor(name)

    def get_slice(self, name):
        return _Slice(self.inner.get_slice(name), name, self.log)


def _rank(rank: int, world: int, folders: list):
    import safetensors

    from hal import distributed
    from hal.models.parallel import tp_group
    opened = safetensors.safe_open
    log: list = []
    safetensors.safe_open = lambda path, framework: _Recording(opened(path, framework=framework), log)
    tp, ep = tp_group(2), distributed.ep_group()
    out = {}
    for folder in folders:
        del log[:]
        model = M.load(folder, "cpu", tp_group=tp.name, ep_group=ep.name)
        res = M.generate(model, PROMPTS, max_new_tokens=3)
        out[folder] = (res.prefill_logits, res.tokens, list(log), model.unused_tensors)
    return out


def _slices(index) -> list:
    return [(s.start, s.stop) for s in index]


def _check_reads(reads: list, rank: int, cfg: dict):
    """Rank ``rank`` of EP 2 x TP 2 (both groups = the two ranks) read only what it holds."""
    by_name: dict = {}
    for name, index in reads:
        assert name not in by_name, f"{name} read twice"
        by_name[name] = index
    E, I = cfg["n_routed_experts"], cfg["moe_intermediate_size"]
    mine = range(rank * E // 2, (rank + 1) * E // 2)
    experts = {int(n.split(".")[5]) for n in by_name if ".experts." in n}
    assert experts == set(mine), sorted(experts)
    for name, index in by_name.items():
        if ".experts." in name or "norm" in name or "embed" in name or "lm_head" in name or ".gate." in name \
                or "indexer" in name or "q_a_proj" in name or "kv_a_proj" in name:
            assert index is None, (name, index)                   # replicated (or whole own experts): read whole
        else:
            assert index is not None, f"{name}: a tensor-parallel weight read whole"
    Is = I * cfg["n_shared_experts"]                          # shared expert rows: Is / 2 per rank
    a, b = rank * Is // 2, (rank + 1) * Is // 2
    p = f"model.layers.{cfg['num_hidden_layers'] - 1}.mlp.shared_experts"
    assert _slices(by_name[f"{p}.up_proj.weight"]) == [(a, b)]
    assert _slices(by_name[f"{p}.down_proj.weight"]) == [(None, None), (a, b)]
    return by_name, (a, b)


def _fp8_glm45_reads(by_name: dict, rank: int, cfg: dict, shared: tuple):
    """tiny-glm45 in FP8: k_proj's 64 rows split 32 / 32 inside one 128-row scale block; the
    shared expert's 128 intermediate rows split 64 / 64 inside one block, rows and columns."""
    D = cfg["head_dim"]
    p = "model.layers.0.self_attn"
    assert _slices(by_name[f"{p}.k_proj.weight"]) == [(rank * D, (rank + 1) * D)]
    assert _slices(by_name[f"{p}.k_proj.bias"]) == [(rank * D, (rank + 1) * D)]
    assert _slices(by_name[f"{p}.k_proj.weight_scale_inv"]) == [(0, 1)]           # the one covering block
    assert _slices(by_name[f"{p}.o_proj.weight_scale_inv"]) == [(None, None), (rank, rank + 1)]
    s = f"model.layers.{cfg['num_hidden_layers'] - 1}.mlp.shared_experts"
    assert shared[0] % 128 or shared[1] % 128                                      # the boundary is inside a block
    assert _slices(by_name[f"{s}.up_proj.weight_scale_inv"]) == [(0, 1)]
    assert _slices(by_name[f"{s}.down_proj.weight_scale_inv"]) == [(None, None), (0, 1)]


def test_sharded_checkpoints_read_only_their_slices_and_match(tmp_path):
    glm5, glm45 = dict(CONFIGS["tiny-glm5"]), dict(CONFIGS["tiny-glm45"])
    folders = {str(tmp_path / "glm5-fp32"): (glm5, False), str(tmp_path / "glm45-fp8"): (glm45, True)}
    for folder, (cfg, fp8) in folders.items():
        save_checkpoint(cfg, Path(folder), fp8=fp8)
    got = run_ranks(_rank, 2, list(folders), timeout_s=300)
    for folder, (cfg, fp8) in folders.items():
        want = M.generate(M.load(folder, "cpu"), PROMPTS, max_new_tokens=3)
        scale = want.prefill_logits.abs().max()
        for rank in range(2):
            logits, tokens, reads, unused = got[rank][folder]
            assert tokens == want.tokens, (folder, rank)
            assert (logits - want.prefill_logits).abs().max() <= 1e-4 * scale, folder
            assert unused == []                                   # the other rank's experts are accounted for
            by_name, shared = _check_reads(reads, rank, cfg)
            if fp8:
                _fp8_glm45_reads(by_name, rank, cfg, shared)


def test_a_missing_expert_of_another_rank_is_still_an_error(tmp_path):
    """Skipped tensors are checked from the header: a checkpoint missing rank 1's expert fails on rank 0 too."""
    from hal.models.loader import CheckpointError, TensorSource, build_model
    from hal.models.config import ModelConfig
    from hal.models.parallel import Sharding
    from hal.distributed import EPGroup
    cfg = CONFIGS["tiny-glm45"]
    weights = random_checkpoint(cfg, 0)
    del weights["model.layers.3.mlp.experts.15.down_proj.weight"]
    rank0 = Sharding(ep=EPGroup("fake", 0, 2, None))
    try:
        build_model(ModelConfig.from_dict(cfg), TensorSource.from_dict(weights), hal.runtime("cpu"), sharding=rank0)
    except CheckpointError as exc:
        assert "missing tensor model.layers.3.mlp.experts.15.down_proj.weight" in str(exc)
    else:
        raise AssertionError("a missing expert tensor was not reported")


# ---- peak-memory measurement (python tests/test_sharded_loading.py --measure) ----

BIG = {**CONFIGS["tiny-glm45"], "hidden_size": 1024, "moe_intermediate_size": 512, "intermediate_size": 2048,
       "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 128, "num_hidden_layers": 4}


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _peak_rss_mb(rank: int, world: int, folder: str, tp_size: int):
    """On this rank: (peak RSS growth during the load, peak anonymous-RSS growth, MB of tensors
    the model holds). Peak RSS: VmHWM after the load, its high-water mark reset just before
    (``/proc/self/clear_refs``), minus VmRSS then; the runtime and its imports are made first.
    (Not ru_maxrss: it survives execve, so a spawned rank would inherit its parent's peak.) The
    anonymous peak (RssAnon, sampled every 2 ms) leaves out the checkpoint's page-cache pages that
    the mmap reads map into the process (shared by all ranks of a node)."""
    import threading

    from hal import distributed
    from hal.models.parallel import tp_group
    group = distributed.ep_group() if world > 1 else None
    tp = tp_group(tp_size) if world > 1 else tp_group(1)
    rt = hal.runtime("cpu", profile=True)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before, anon0 = _status_kb("VmRSS"), _status_kb("RssAnon")
    anon_peak, done = [anon0], threading.Event()

    def sample():
        while not done.is_set():
            anon_peak[0] = max(anon_peak[0], _status_kb("RssAnon"))
            done.wait(0.002)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    model = M.load(folder, "cpu", runtime=rt, ep_group=group.name if group else None, tp_group=tp.name)
    done.set()
    sampler.join()
    peak = _status_kb("VmHWM")
    held = 0
    seen = set()

    def add(t):
        nonlocal held
        if torch.is_tensor(t) and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            held += t.numel() * t.element_size()

    def walk(obj, depth=0):
        if torch.is_tensor(obj):
            add(obj)
        elif depth < 4 and hasattr(obj, "__dict__"):
            for v in vars(obj).values():
                walk(v, depth + 1)
    for layer in model.layers:
        walk(layer)
    for t in (model.embed, model.norm, model.lm_head):
        add(t)
    return (peak - before) / 1024, (anon_peak[0] - anon0) / 1024, held / 2**20


def measure():
    import tempfile
    import time
    with tempfile.TemporaryDirectory(prefix="hal-shard-") as tmp:
        folder = Path(tmp) / "big-glm45"
        save_checkpoint(BIG, folder, fp8=False)
        size = sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 2**20
        print(f"checkpoint: {size:.0f} MB (fp32, {BIG['num_hidden_layers']} layers, hidden {BIG['hidden_size']})")
        for world, tp_size in ((1, 1), (4, 1), (4, 2), (4, 4)):
            t0 = time.time()
            res = run_ranks(_peak_rss_mb, world, str(folder), tp_size, timeout_s=600)
            cols = [", ".join(f"{r[i]:.0f}" for r in res) for i in range(3)]
            print(f"W={world} TP={tp_size}: per rank, MB: peak RSS growth [{cols[0]}], peak anonymous RSS growth "
                  f"[{cols[1]}], model tensors held [{cols[2]}] ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    if "--measure" in sys.argv:
        measure()
