"""Model-level conformance: the same prompts on a backend and on the reference, compared.

Truth is the CPU reference model in float32. The backend runs the model in its working dtype
(float32 when it runs every contract op the model uses in float32, else bfloat16; the ops of the
MLA / GQA families or, for Qwen3.5, the MoE and linear-attention ops). Reported: the
top-1 agreement of the next-token prediction at every prompt position and the KL divergence
KL(p_truth || p_backend) of the next-token distributions (max and mean over positions).

Budget, in the spirit of the op suite (a multiple of the reference's own error in the backend's
precision, plus a floor): with ``ref`` = the reference model run in the backend's dtype,
``kl_mean <= 2 * kl_mean(ref) + 1e-4``, ``kl_max <= 2 * kl_max(ref) + 1e-3`` and
``top1 >= top1(ref) - 0.02``. In float32, ``ref`` is the truth itself, so the budget is the floors.
"""
from __future__ import annotations

from typing import Optional

import torch

PROMPTS = ([1, 17, 42, 99, 5, 230, 311, 64, 77, 128, 9, 400, 33, 250, 18, 71, 150, 260, 3, 88],
           [7, 300, 21, 64, 12, 5, 99, 401, 2, 56, 19])
BUDGET = {"multiple": 2.0, "kl_mean_floor": 1e-4, "kl_max_floor": 1e-3, "top1_slack": 0.02}
MODEL_OPS = ("moe_forward", "lightning_indexer", "sparse_attention")
LINEAR_ATTENTION_OPS = ("moe_forward", "gated_delta_rule", "causal_conv1d")      # Qwen3.5, Kimi Linear


def model_ops(config) -> tuple:
    """The contract ops a model of ModelConfig ``config`` runs (besides FP8)."""
    return LINEAR_ATTENTION_OPS if config.is_qwen35 or config.is_kimi_linear else MODEL_OPS


def working_dtype(rt, ops: tuple = MODEL_OPS) -> torch.dtype:
    """float32 when the backend lists float32 for every one of ``ops`` it implements, else bfloat16."""
    caps = rt.record.backend.capabilities()
    native = [caps[op] for op in ops if op in caps]
    return torch.float32 if all("float32" in tuple(str(d).replace("torch.", "") for d in c.dtypes or ())
                                for c in native) else torch.bfloat16


def _prefill_logits(model, prompts) -> list:
    """Prefill logits [len(p), vocab] fp64 per prompt, one prompt per call (unpadded, so a backend
    whose causal mode fixes q_offset = k_lengths - S runs its native indexer)."""
    from hal.models.generate import generate
    return [generate(model, [p], max_new_tokens=1, eos_token_id=[]).prefill_logits[0].double() for p in prompts]


def _agreement(truth: list, got: list) -> tuple[list, torch.Tensor]:
    """Per prompt the per-position top-1 agreement, and the KL(truth || got) at every position."""
    per_prompt, kls = [], []
    for r, x in zip(truth, got):
        per_prompt.append((r.argmax(-1) == x.argmax(-1)).tolist())
        lp, lq = torch.log_softmax(r, -1), torch.log_softmax(x, -1)
        kls.append((lp.exp() * (lp - lq)).sum(-1).clamp_min(0))
    return per_prompt, torch.cat(kls)


def _top1(per_prompt) -> float:
    flat = [a for row in per_prompt for a in row]
    return sum(flat) / len(flat)


def _parallel_prefill(rank: int, world: int, name_or_path: str, backend: str, dtype: torch.dtype, tp: int,
                      prompts: list) -> tuple:
    """On one rank of a gloo group: the model loaded expert-parallel over all ranks (and tensor
    parallel over groups of ``tp``), its prefill logits and its runtime plan."""
    import hal.models as M
    from hal.distributed import ep_group
    from hal.models.parallel import tp_group
    model = M.load(name_or_path, backend, dtype=dtype, ep_group=ep_group().name,
                   tp_group=tp_group(tp).name if tp > 1 else None)
    return _prefill_logits(model, prompts), model.rt.plan_dict()


def compare_model(name_or_path: str, backend: str, *, seed: int = 0, dtype: Optional[torch.dtype] = None,
                  world_size: int = 1, tp: int = 1) -> dict:
    """Run the prompts' prefill on ``backend`` and on the CPU reference; compare next-token distributions.

    dtype: the backend's model dtype (None: :func:`working_dtype`). ``world_size`` > 1 runs the
    backend's model on that many local gloo ranks, its routed experts expert-parallel over all of
    them and, with ``tp`` > 1, attention and dense layers tensor-parallel over groups of ``tp``
    ranks (rank 0's logits are judged; the reference stays one process). Returns the report dict
    (model, backend, label, dtype, world_size, tp, plan, prompts, per_position_top1, top1_agreement,
    kl_max, kl_mean, reference_at_dtype {top1_agreement, kl_max, kl_mean}, budget, passed). Raises
    hal.BackendUnavailable, CheckpointError, ModelConfigError like :func:`hal.models.load`, and
    hal.spawn_ranks.RanksFailed when a rank fails (e.g. a world size that does not divide the experts).
    """
    import hal
    import hal.models as M
    rt = hal.runtime(backend, profile=True)
    truth_model = M.load(name_or_path, "cpu", dtype=torch.float32)
    dtype = dtype or working_dtype(rt, model_ops(truth_model.config))
    g = torch.Generator().manual_seed(seed)
    V = truth_model.config.vocab_size
    prompts = [[int(t) % V for t in p] for p in PROMPTS] + [torch.randint(0, V, (15,), generator=g).tolist()]
    truth = _prefill_logits(truth_model, prompts)
    if dtype == torch.float32:
        ref_rows, ref_kl = [[True] * len(p) for p in prompts], torch.zeros(1, dtype=torch.float64)
    else:
        ref_rows, ref_kl = _agreement(truth, _prefill_logits(M.load(name_or_path, "cpu", dtype=dtype), prompts))
    if world_size > 1:
        from hal.spawn_ranks import run_ranks
        ranks = run_ranks(_parallel_prefill, world_size, str(name_or_path), backend, dtype, tp, prompts,
                          timeout_s=600)
        got_logits, plan = ranks[0]
    else:
        got_logits = _prefill_logits(M.load(name_or_path, runtime=rt, dtype=dtype), prompts)
        plan = rt.plan_dict()
    per_prompt, kl = _agreement(truth, got_logits)
    ref = {"top1_agreement": _top1(ref_rows), "kl_max": float(ref_kl.max()), "kl_mean": float(ref_kl.mean())}
    got = {"top1_agreement": _top1(per_prompt), "kl_max": float(kl.max()), "kl_mean": float(kl.mean())}
    b = BUDGET
    limits = {"kl_mean": b["multiple"] * ref["kl_mean"] + b["kl_mean_floor"],
              "kl_max": b["multiple"] * ref["kl_max"] + b["kl_max_floor"],
              "top1_agreement": ref["top1_agreement"] - b["top1_slack"]}
    passed = (got["kl_mean"] <= limits["kl_mean"] and got["kl_max"] <= limits["kl_max"]
              and got["top1_agreement"] >= limits["top1_agreement"])
    return {"model": str(name_or_path), "backend": rt.backend_name, "label": rt.label,
            "dtype": str(dtype).replace("torch.", ""), "world_size": world_size, "tp": tp, "plan": plan,
            "prompts": prompts,
            "per_position_top1": per_prompt, **got, "reference_at_dtype": ref,
            "budget": {**b, "limits": limits}, "passed": bool(passed), "hal_version": hal.__version__}
