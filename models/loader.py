"""Loading: Hugging Face model directories (config.json + safetensors shards) into a CausalLM.

Safetensors only (never pickle). FP8 checkpoints as published (a ``weight_scale_inv`` per
128x128 block next to each float8_e4m3fn ``weight``) stay FP8 and run through ``fp8_linear`` and
FP8 experts; ``quantize="fp8"`` quantizes a bf16/fp32 checkpoint on load. Every problem names the
tensor or file: :class:`CheckpointError`.
"""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path, PurePosixPath
from typing import Optional

import torch

from hal import blockscale
from hal.models.config import ModelConfig, ModelConfigError
from hal.models.layers import (DecoderLayer, GQAAttention, Indexer, Linear, MLAAttention, MLP, MoE)
from hal.models import kimi_linear, qwen35
from hal.models.model import CausalLM
from hal.models.parallel import FusedColumns, Sharding, merge_ranges
from hal.models.rope import mla_softmax_scale

FP8 = torch.float8_e4m3fn
# dtypes a checkpoint tensor may have; anything else (int8, int32, bool, float8_e5m2...) is refused,
# never cast: a cast integer tensor would run as meaningless weights
WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64, FP8)
# size caps for the JSON files of a model folder (the released ones: config.json a few KB, the
# shard index < 10 MB, tokenizer.json < 40 MB)
CONFIG_MAX_BYTES = 1 << 20
INDEX_MAX_BYTES = 64 << 20
TOKENIZER_MAX_BYTES = 128 << 20
# the model types tensor parallelism splits
TP_FAMILIES = ("glm_moe_dsa", "deepseek_v32", "glm4_moe", "qwen3_5_moe", "qwen3_5_moe_text", "kimi_linear")
SHARED_ROWS = "shared-expert intermediate rows (moe_intermediate_size x n_shared_experts)"
HEADS = "attention heads (num_attention_heads)"
KV_HEADS = "KV heads (num_key_value_heads)"


class CheckpointError(ValueError):
    """A checkpoint directory or tensor is missing, unreadable or of the wrong shape."""


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return kind
    return "special file"


class ModelFolder:
    """A model directory whose files are read only from inside it.

    A file name must be relative, without '..'; after following symlinks it must still lie inside
    the folder (or, for a Hugging Face hub cache snapshot ``.../snapshots/<revision>``, in that
    repository's ``blobs/`` folder, where the cache's symlinks point), and it must be a regular
    file: a FIFO, a directory or a device is refused before anything is opened or read."""

    def __init__(self, path):
        self.path = Path(path)
        real = self.path.resolve()
        self.roots = [real] + ([real.parent.parent / "blobs"] if real.parent.name == "snapshots" else [])

    def file(self, rel, what: str, error=CheckpointError) -> Optional[Path]:
        """The resolved path of regular file ``rel`` (a str relative to the folder), or None when
        nothing is there. Raises ``error`` naming ``what`` for a path outside or a non-regular file."""
        if not isinstance(rel, str) or not rel or "\x00" in rel:
            raise error(f"{self.path}: {what} {rel!r} is not a file name")
        parts = PurePosixPath(rel).parts
        if PurePosixPath(rel).is_absolute() or ".." in parts:
            raise error(f"{self.path}: {what} {rel!r} is outside the model folder "
                        "(absolute paths and '..' are refused)")
        p = self.path / rel
        if not os.path.lexists(p):
            return None
        real = p.resolve()
        if not any(real.is_relative_to(root) for root in self.roots):
            raise error(f"{p}: {what} is a symlink leading outside the model folder (to {real})")
        try:
            mode = os.stat(real).st_mode
        except OSError:
            return None                                    # a dangling symlink: nothing there
        if not stat.S_ISREG(mode):
            raise error(f"{p}: {what} is a {_file_kind(mode)}, not a regular file")
        return real

    def read_text(self, rel: str, what: str, limit: int, error=CheckpointError) -> Optional[str]:
        """The UTF-8 text of regular file ``rel`` (at most ``limit`` bytes), or None when absent."""
        real = self.file(rel, what, error)
        if real is None:
            return None
        p = self.path / rel
        try:
            fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK)        # never blocks, even if swapped for a FIFO
            with os.fdopen(fd, "rb") as f:
                st = os.fstat(f.fileno())
                if not stat.S_ISREG(st.st_mode):
                    raise error(f"{p}: {what} is a {_file_kind(st.st_mode)}, not a regular file")
                if st.st_size > limit:
                    raise error(f"{p}: {what} is {st.st_size} bytes, more than the limit of {limit}")
                data = f.read(limit + 1)
        except OSError as exc:
            raise error(f"{p}: {what} cannot be read ({exc.strerror or exc})") from exc
        if len(data) > limit:
            raise error(f"{p}: {what} is more than the limit of {limit} bytes")
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise error(f"{p}: {what} is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc

    def read_json(self, rel: str, what: str, limit: int, error=CheckpointError):
        """The parsed JSON of regular file ``rel`` (None when absent); not JSON -> ``error``."""
        text = self.read_text(rel, what, limit, error)
        if text is None:
            return None
        try:
            return json.loads(text)
        except (ValueError, RecursionError) as exc:             # JSONDecodeError, int digit limit, nesting
            why = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise error(f"{self.path / rel}: not valid JSON ({why})") from exc


class _DictEntry:
    def __init__(self, t: torch.Tensor):
        self.t = t

    def shape(self) -> tuple:
        return tuple(self.t.shape)

    def read(self, index: Optional[tuple]) -> torch.Tensor:
        return self.t if index is None else self.t[index].clone()      # a copy: the whole tensor is not kept


class _SafetensorsEntry:
    """One tensor of an open safetensors file: its shape from the header, whole or sliced reads
    (``get_slice``: only the requested bytes are read)."""

    def __init__(self, handle, name: str):
        self.handle, self.name = handle, name

    def shape(self) -> tuple:
        return tuple(self.handle.get_slice(self.name).get_shape())

    def read(self, index: Optional[tuple]) -> torch.Tensor:
        if index is None:
            return self.handle.get_tensor(self.name)
        return self.handle.get_slice(self.name)[index]


class TensorSource:
    """name -> tensor over a set of safetensors files (or an in-memory dict), with shape checks;
    a tensor can be read whole or as a slice (tensor-/expert-parallel ranks read only their own)."""

    def __init__(self, tensors: dict, where: str):
        self._tensors, self.where = tensors, where
        self.used: set[str] = set()

    @classmethod
    def from_dict(cls, d: dict[str, torch.Tensor], where: str = "memory") -> "TensorSource":
        return cls({k: _DictEntry(v) for k, v in d.items()}, where)

    @classmethod
    def from_directory(cls, path) -> "TensorSource":
        """The tensors of a model folder's safetensors files: those ``model.safetensors.index.json``
        lists (each entry inside the folder, see :class:`ModelFolder`), else every ``*.safetensors``."""
        from safetensors import safe_open
        folder = path if isinstance(path, ModelFolder) else ModelFolder(path)
        path = folder.path
        index_name = "model.safetensors.index.json"
        index = folder.read_json(index_name, index_name, INDEX_MAX_BYTES)
        shards: dict[str, Optional[Path]] = {}
        if index is not None:
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict):
                got = "no weight_map" if not isinstance(index, dict) or "weight_map" not in index else \
                    f"a weight_map that is a JSON {type(weight_map).__name__}"
                raise CheckpointError(f"{path / index_name}: expected a JSON object with a weight_map object "
                                      f"(tensor name -> shard file), got {got}")
            for name, fname in weight_map.items():
                if fname not in shards:
                    shards[fname] = folder.file(fname, f"{index_name} entry {name!r} -> shard")
        else:
            weight_map = None
            for p in sorted(path.glob("*.safetensors")):
                shards[p.name] = folder.file(p.name, "shard")
        if not shards:
            raise CheckpointError(f"{path}: no *.safetensors files (safetensors only; pickle checkpoints are refused)")
        tensors: dict = {}
        for fname in sorted(shards):
            f = shards[fname]
            if f is None:
                raise CheckpointError(f"{path}: shard {fname} listed in model.safetensors.index.json is missing")
            try:
                handle = safe_open(str(f), framework="pt")
            except Exception as exc:  # noqa: BLE001
                raise CheckpointError(f"{f}: not a readable safetensors file ({exc})") from exc
            for name in handle.keys():
                tensors[name] = _SafetensorsEntry(handle, name)
        if weight_map:
            missing = [n for n in weight_map if n not in tensors]
            if missing:
                raise CheckpointError(f"{path}: tensor {missing[0]} is in the index but not in its shard")
        return cls(tensors, str(path))

    def names(self) -> list[str]:
        return list(self._tensors)

    def has(self, name: str) -> bool:
        return name in self._tensors

    def shape(self, name: str, shape: Optional[tuple] = None) -> tuple:
        """The stored shape of ``name`` (read from the header, no data), checked against ``shape``."""
        if name not in self._tensors:
            raise CheckpointError(f"{self.where}: missing tensor {name}")
        try:
            got = self._tensors[name].shape()
        except Exception as exc:  # noqa: BLE001 - a corrupt header surfaces here
            raise CheckpointError(f"{self.where}: tensor {name} cannot be read ({exc})") from exc
        if shape is not None and tuple(got) != tuple(shape):
            raise CheckpointError(f"{self.where}: tensor {name} has shape {tuple(got)}, expected {tuple(shape)}")
        return got

    def skip(self, name: str, shape: Optional[tuple] = None) -> None:
        """Account for a tensor another rank reads (another rank's experts): present and of the
        right shape, checked from the header only; never read here."""
        self.shape(name, shape)
        self.used.add(name)

    def get(self, name: str, shape: Optional[tuple] = None, index: Optional[tuple] = None) -> torch.Tensor:
        """Tensor ``name`` (its stored ``shape`` checked first), or only ``t[index]`` of it (a tuple
        of slices: only those bytes are read from a safetensors file)."""
        self.shape(name, shape)
        try:
            t = self._tensors[name].read(index)
        except Exception as exc:  # noqa: BLE001 - a truncated or corrupt shard surfaces here
            raise CheckpointError(f"{self.where}: tensor {name} cannot be read ({exc})") from exc
        if t.dtype not in WEIGHT_DTYPES:
            raise CheckpointError(f"{self.where}: tensor {name} has dtype {str(t.dtype).replace('torch.', '')}; "
                                  "weights must be float32, bfloat16, float16, float64 or float8_e4m3fn "
                                  "(with its weight_scale_inv)")
        self.used.add(name)
        return t


def _blocks(start: int, stop: int) -> slice:
    """The 128-blocks covering elements [start, stop)."""
    return slice(start // 128, -(-stop // 128))


class _Builder:
    def __init__(self, cfg: ModelConfig, src: TensorSource, rt, dtype, device, quantize, sharding: Sharding):
        self.cfg, self.src, self.rt, self.dtype, self.device, self.quantize = cfg, src, rt, dtype, device, quantize
        self.sh = sharding

    def t(self, name, shape=None, dtype=None, index=None):
        """A non-linear tensor (norm, router, embedding, fused experts) in ``dtype`` (default: the
        model dtype); a float8_e4m3fn one is dequantized with its ``weight_scale_inv``. ``index``:
        read only that slice of it."""
        x = self.src.get(name, shape, index)
        if x.dtype == FP8:
            if x.dim() != 2 or not name.endswith(".weight") or index is not None:
                raise CheckpointError(f"{self.src.where}: tensor {name} is float8_e4m3fn but is not a 2-D weight "
                                      "with a weight_scale_inv")
            x = self._dequant(Linear(x, None, self.src.get(f"{name}_scale_inv",
                                                           (-(-x.shape[0] // 128), -(-x.shape[1] // 128))).float()))
        return x.to(device=self.device, dtype=dtype or self.dtype)

    def t_rows(self, name, shape, ranges, dtype=None, dim=0):
        """A non-linear tensor's ``ranges`` ([(start, stop), ...]) along ``dim``, concatenated in
        order (a conv weight's channels of this rank's q, k and v heads; a per-head A_log): only
        those slices are read, the whole tensor when they cover it."""
        ranges = merge_ranges(ranges)
        if ranges == [(0, shape[dim])]:
            return self.t(name, shape, dtype)
        lead = (slice(None),) * dim
        return torch.cat([self.t(name, shape, dtype, index=(*lead, slice(a, e))) for a, e in ranges], dim=dim)

    def linear(self, prefix, out_f, in_f, bias=False, quantizable=True, col=None, row=None) -> "Linear | FusedColumns":
        """The linear ``prefix`` ([out_f, in_f]), whole, or this rank's slice of it: ``col =
        (start, stop)`` output rows (column-parallel), ``row = (start, stop)`` input columns
        (row-parallel: partial outputs summed over the TP group). Only the slice and, when FP8, the
        scale blocks covering it are read. ``col`` may also be a list of row ranges (a fused
        projection's parts, e.g. q / k / v): see :meth:`fused_linear`."""
        if isinstance(col, list):
            return self.fused_linear(prefix, out_f, in_f, col, bias, quantizable)
        name = f"{prefix}.weight"
        sliced = (col is not None and col != (0, out_f)) or (row is not None and row != (0, in_f))
        index = None if not sliced else (slice(*col),) if col is not None else (slice(None), slice(*row))
        w = self.src.get(name, (out_f, in_f), index)
        tp = self.sh.tp if row is not None and sliced else None
        if not bias:
            b = None
        elif col is not None and sliced:
            b = self.t(f"{prefix}.bias", (out_f,), index=(slice(*col),))
        else:
            b = self.t(f"{prefix}.bias", (out_f,))
        if w.dtype == FP8:
            sshape = (-(-out_f // 128), -(-in_f // 128))
            sname = f"{prefix}.weight_scale_inv"
            if not sliced:
                s = self.src.get(sname, sshape)
                return Linear(w.to(self.device), b, s.to(self.device, torch.float32))
            if col is not None:                       # rows [a, b): covering row blocks, zero rows in front
                a, e = col
                s = self.src.get(sname, sshape, (_blocks(a, e),))
                w = torch.cat([w.new_zeros(a % 128, in_f), w]) if a % 128 else w
                return Linear(w.to(self.device), b, s.to(self.device, torch.float32), pad_out=a % 128)
            a, e = row                                # columns [a, b): covering column blocks
            s = self.src.get(sname, sshape, (slice(None), _blocks(a, e)))
            if a % 128 == 0 and (e % 128 == 0 or e == in_f):
                return Linear(w.to(self.device), b, s.to(self.device, torch.float32), tp=tp)
            lo, hi = a - a % 128, min(-(-e // 128) * 128, in_f)
            full = w.new_zeros(out_f, hi - lo)
            full[:, a - lo:e - lo] = w
            return Linear(full.to(self.device), b, s.to(self.device, torch.float32), tp=tp, gather=(lo, hi))
        w = w.to(self.device, self.dtype)
        if self.quantize == "fp8" and quantizable:
            q, s = self.rt.fp8_quantize_weight(w)       # a slice quantizes in its own 128-block grid
            return Linear(q, b, s, tp=tp)
        return Linear(w, b, tp=tp)

    def fused_linear(self, prefix, out_f, in_f, ranges, bias=False, quantizable=True):
        """The rows ``ranges`` ([(start, stop), ...]) of the fused linear ``prefix`` ([out_f, in_f]),
        their outputs concatenated in order: one :class:`Linear` (the whole one when the ranges
        cover it; their weights concatenated, then quantized when ``quantize="fp8"``), or, for a
        stored FP8 weight, a :class:`FusedColumns` of one column slice per range (each with the
        scale blocks covering it)."""
        ranges = merge_ranges(ranges)
        if len(ranges) == 1:
            return self.linear(prefix, out_f, in_f, bias, quantizable, col=ranges[0])
        parts = [self.linear(prefix, out_f, in_f, bias, False, col=r) for r in ranges]
        if any(p.scale is not None for p in parts):
            return FusedColumns(tuple(parts))
        w = torch.cat([p.weight for p in parts])
        b = torch.cat([p.bias for p in parts]) if bias else None
        if self.quantize == "fp8" and quantizable:
            q, s = self.rt.fp8_quantize_weight(w)       # the rank's rows quantize in their own 128-block grid
            return Linear(q, b, s)
        return Linear(w, b)

    def mlp(self, prefix, inter, what="intermediate_size") -> MLP:
        """A gated MLP, its ``inter`` intermediate rows split over the TP group."""
        H = self.cfg.hidden_size
        part = self.sh.part(inter, what)
        return MLP(self.linear(f"{prefix}.gate_proj", inter, H, col=part),
                   self.linear(f"{prefix}.up_proj", inter, H, col=part),
                   self.linear(f"{prefix}.down_proj", H, inter, row=part))

    def experts(self, prefix):
        """This rank's stacked expert weights: [E', 2I, H] and [E', H, I] (+ block scales when FP8),
        E' = the experts [e0, e1) of :meth:`Sharding.experts`; the others' are never read."""
        H, I, E = self.cfg.hidden_size, self.cfg.moe_intermediate_size, self.cfg.n_routed_experts
        e0, e1 = self.sh.experts(E)
        if self.src.has(f"{prefix}.gate_up_proj"):                       # transformers' fused layout
            mine = None if (e0, e1) == (0, E) else (slice(e0, e1),)
            gu = self.t(f"{prefix}.gate_up_proj", (E, 2 * I, H), index=mine)
            dn = self.t(f"{prefix}.down_proj", (E, H, I), index=mine)
            gus = dns = None
        else:
            for e in [*range(e0), *range(e1, E)]:
                for proj, shape in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
                    self.src.skip(f"{prefix}.{e}.{proj}.weight", shape)
                    if self.src.has(f"{prefix}.{e}.{proj}.weight_scale_inv"):
                        self.src.skip(f"{prefix}.{e}.{proj}.weight_scale_inv")
            # each expert is written into the stacks as it is read: the peak is the stacks plus one expert
            gu = dn = gus = dns = None
            for j, e in enumerate(range(e0, e1)):
                g, u, d = (self.linear(f"{prefix}.{e}.{proj}", *shape, quantizable=False)
                           for proj, shape in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))))
                if g.scale is not None and I % 128:
                    # gate and up blocks would straddle one 128-row block once stacked: requantize
                    w, sc = self.rt.fp8_quantize_weight(torch.cat([self._dequant(g), self._dequant(u)]))
                elif g.scale is not None:
                    w, sc = torch.cat([g.weight, u.weight]), torch.cat([g.scale, u.scale])
                else:
                    w, sc = torch.cat([g.weight, u.weight]), None
                if j == 0:
                    gu, dn = w.new_empty((e1 - e0, *w.shape)), d.weight.new_empty((e1 - e0, *d.weight.shape))
                    gus = None if sc is None else sc.new_empty((e1 - e0, *sc.shape))
                    dns = None if d.scale is None else d.scale.new_empty((e1 - e0, *d.scale.shape))
                if (sc is None) != (gus is None) or (d.scale is None) != (dns is None) or w.dtype != gu.dtype \
                        or d.weight.dtype != dn.dtype:
                    raise CheckpointError(f"{self.src.where}: expert {e} of {prefix} is stored as "
                                          f"{str(w.dtype).replace('torch.', '')}, expert {e0} as "
                                          f"{str(gu.dtype).replace('torch.', '')}: every expert must have one format")
                gu[j], dn[j] = w, d.weight
                if sc is not None:
                    gus[j] = sc
                if d.scale is not None:
                    dns[j] = d.scale
            if gus is not None:
                return gu, dn, gus, dns
        if self.quantize == "fp8":
            q = [self.rt.fp8_quantize_weight(w) for w in gu]
            d = [self.rt.fp8_quantize_weight(w) for w in dn]
            return (torch.stack([x[0] for x in q]), torch.stack([x[0] for x in d]),
                    torch.stack([x[1] for x in q]), torch.stack([x[1] for x in d]))
        return gu, dn, gus, dns

    @staticmethod
    def _dequant(lin: Linear) -> torch.Tensor:
        return blockscale.dequantize(lin.weight, lin.scale)

    def moe(self, prefix) -> MoE:
        c = self.cfg
        gu, dn, gus, dns = self.experts(f"{prefix}.experts")
        shared = self.mlp(f"{prefix}.shared_experts", c.moe_intermediate_size * c.n_shared_experts,
                          SHARED_ROWS) if c.n_shared_experts else None
        return MoE(self.t(f"{prefix}.gate.weight", (c.n_routed_experts, c.hidden_size)),
                   self.t(f"{prefix}.gate.e_score_correction_bias", (c.n_routed_experts,), torch.float32),
                   gu, dn, gus, dns, shared, c.num_experts_per_tok, c.n_group, c.topk_group, c.norm_topk_prob,
                   c.routed_scaling_factor)

    def mla(self, i, prefix) -> MLAAttention:
        """MLA + DSA; under TP this rank's heads of ``q_b`` / ``kv_b`` / ``o``, the rest replicated."""
        c, H = self.cfg, self.cfg.hidden_size
        q_b, kv_b, o, n_heads = self.mla_heads(prefix, "q_b_proj", c.q_lora_rank)
        indexer = None
        if c.indexer_types[i] == "full":
            p = f"{prefix}.indexer"
            indexer = Indexer(self.linear(f"{p}.wq_b", c.index_n_heads * c.index_head_dim, c.q_lora_rank),
                              self.linear(f"{p}.wk", c.index_head_dim, H),
                              self.t(f"{p}.k_norm.weight", (c.index_head_dim,)),
                              self.t(f"{p}.k_norm.bias", (c.index_head_dim,)),
                              self.t(f"{p}.weights_proj.weight", (c.index_n_heads, H), torch.float32),
                              c.index_n_heads, c.index_head_dim, c.qk_rope_head_dim, c.index_topk,
                              c.indexer_rope_interleaved)
        return MLAAttention(
            self.linear(f"{prefix}.q_a_proj", c.q_lora_rank, H, bias=c.attention_bias),
            self.t(f"{prefix}.q_a_layernorm.weight", (c.q_lora_rank,)), q_b,
            self.linear(f"{prefix}.kv_a_proj_with_mqa", c.kv_lora_rank + c.qk_rope_head_dim, H, bias=c.attention_bias),
            self.t(f"{prefix}.kv_a_layernorm.weight", (c.kv_lora_rank,)), kv_b, o,
            indexer, n_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank,
            1e-6, mla_softmax_scale(c.rope_parameters, c.qk_nope_head_dim + c.qk_rope_head_dim))

    def mla_heads(self, prefix, q_name, q_in):
        """MLA's per-head linears (GLM-5, DeepSeek-V3.2, Kimi Linear's MLA layers), this rank's heads
        under TP: the query projection ``q_name`` ([Hq * (nope + rope), q_in]: ``q_b_proj`` after the
        q LoRA, or ``q_proj`` from the hidden states) and ``kv_b_proj`` ([Hq * (nope + v), kv_lora])
        column-parallel, ``o_proj`` ([hidden, Hq * v]) row-parallel. Returns (q, kv_b, o, local heads)."""
        c, n = self.cfg, self.cfg.num_attention_heads
        qk, kvd, v = c.qk_nope_head_dim + c.qk_rope_head_dim, c.qk_nope_head_dim + c.v_head_dim, c.v_head_dim
        return (self.linear(f"{prefix}.{q_name}", n * qk, q_in, col=self.sh.rows(n, qk, HEADS)),
                self.linear(f"{prefix}.kv_b_proj", n * kvd, c.kv_lora_rank, col=self.sh.rows(n, kvd, HEADS)),
                self.linear(f"{prefix}.o_proj", c.hidden_size, n * v, bias=c.attention_bias,
                            row=self.sh.rows(n, v, HEADS)),
                n // self.sh.tp.size)

    def gqa(self, prefix) -> GQAAttention:
        """GQA; under TP this rank's query and KV heads, ``o`` row-parallel."""
        c, D = self.cfg, self.cfg.head_dim
        q, k, v, o, n_heads, n_kv = self.gqa_heads(prefix)
        qn = self.t(f"{prefix}.q_norm.weight", (D,)) if c.use_qk_norm else None
        kn = self.t(f"{prefix}.k_norm.weight", (D,)) if c.use_qk_norm else None
        return GQAAttention(q, k, v, o, qn, kn, n_heads, n_kv, D, int(D * c.partial_rotary_factor), c.rms_norm_eps)

    def gqa_heads(self, prefix, q_per_head: int = 1, o_bias: bool = False):
        """GQA's linears (GLM-4.5; Qwen3.5's gated attention), this rank's heads under TP:
        ``q_proj`` ([Hq * q_per_head * D, hidden]; Qwen3.5's holds each head's query and gate,
        ``q_per_head`` 2) by query heads and ``k_proj`` / ``v_proj`` ([Hkv * D, hidden]) by KV heads,
        column-parallel (with their ``attention_bias``); ``o_proj`` ([hidden, Hq * D], bias when
        ``o_bias``) row-parallel. Returns (q, k, v, o, local query heads, local KV heads)."""
        c, H, D = self.cfg, self.cfg.hidden_size, self.cfg.head_dim
        Hq, Hkv, bias = c.num_attention_heads, c.num_key_value_heads, c.attention_bias
        kv = self.sh.rows(Hkv, D, KV_HEADS)
        q = self.linear(f"{prefix}.q_proj", Hq * q_per_head * D, H, bias=bias,
                        col=self.sh.rows(Hq, q_per_head * D, HEADS))
        k = self.linear(f"{prefix}.k_proj", Hkv * D, H, bias=bias, col=kv)
        v = self.linear(f"{prefix}.v_proj", Hkv * D, H, bias=bias, col=kv)
        o = self.linear(f"{prefix}.o_proj", H, Hq * D, bias=bias and o_bias, row=self.sh.rows(Hq, D, HEADS))
        return q, k, v, o, Hq // self.sh.tp.size, Hkv // self.sh.tp.size

    def check_sharding(self) -> None:
        """Every size the TP group and the EP group split, checked before any tensor is read."""
        c, sh = self.cfg, self.sh
        if sh.tp.size > 1 and c.model_type not in TP_FAMILIES:
            raise ValueError(f"tensor parallelism: {c.model_type} runs with a TP size of 1 only, got {sh.tp.size} "
                             f"(TP covers {', '.join(TP_FAMILIES)}; its routed experts can still be expert parallel)")
        if sh.tp.size > 1:
            family = qwen35 if c.is_qwen35 else kimi_linear if c.is_kimi_linear else None
            for n, what in family.linear_heads(c) if family else ():     # Gated DeltaNet / KDA heads first
                sh.part(n, what)
            sh.part(c.num_attention_heads, HEADS)
            if not (c.is_mla or c.is_kimi_linear):                      # Kimi Linear's full attention is MLA
                sh.part(c.num_key_value_heads, KV_HEADS)
            if "dense" in c.mlp_layer_types:
                sh.part(c.intermediate_size, "intermediate_size")
            if c.is_qwen35:
                sh.part(c.shared_expert_intermediate_size, qwen35.SHARED_ROWS)
            elif c.n_shared_experts and "sparse" in c.mlp_layer_types:
                sh.part(c.moe_intermediate_size * c.n_shared_experts, SHARED_ROWS)
        if "sparse" in c.mlp_layer_types or c.is_qwen35:
            sh.experts(c.n_routed_experts)

    def build(self, progress=None) -> CausalLM:
        c = self.cfg
        self.check_sharding()
        layers = []
        top = qwen35.text_prefix(self.src) if c.is_qwen35 else "model"
        for i in range(c.num_hidden_layers):
            p = f"{top}.layers.{i}"
            if c.is_qwen35:
                layers.append(qwen35.build_layer(self, i, p))
            elif c.is_kimi_linear:
                layers.append(kimi_linear.build_layer(self, i, p))
            else:
                attn = self.mla(i, f"{p}.self_attn") if c.is_mla else self.gqa(f"{p}.self_attn")
                mlp = self.moe(f"{p}.mlp") if c.mlp_layer_types[i] == "sparse" else \
                    self.mlp(f"{p}.mlp", c.intermediate_size)
                layers.append(DecoderLayer(attn, mlp, self.t(f"{p}.input_layernorm.weight", (c.hidden_size,)),
                                           self.t(f"{p}.post_attention_layernorm.weight", (c.hidden_size,)),
                                           c.rms_norm_eps))
            mlp = getattr(layers[-1], "mlp", None)
            if isinstance(mlp, MoE) and self.sh.ep is not None:       # experts() read only this rank's
                mlp.ep_group, mlp.num_experts = self.sh.ep.name, c.n_routed_experts
            if progress:
                progress(i)
        embed = self.t(f"{top}.embed_tokens.weight", (c.vocab_size, c.hidden_size))
        head = embed if c.tie_word_embeddings and not self.src.has("lm_head.weight") else \
            self.t("lm_head.weight", (c.vocab_size, c.hidden_size))
        model = CausalLM(c, self.rt, embed, layers, self.t(f"{top}.norm.weight", (c.hidden_size,)), head, self.dtype,
                         self.device)
        model.unused_tensors = self.unused(top)
        model.sharding = self.sh
        return model

    def unused(self, top: str = "model") -> list[str]:
        """Checkpoint tensors the model did not take. Layers past num_hidden_layers (the
        multi-token-prediction layers of DeepSeek-V3.2 / GLM checkpoints) are expected, and so are
        Qwen3.5's vision tower and ``mtp.*`` module; anything else is reported with a warning,
        since it may mean the config does not fit the weights."""
        unused = sorted(set(self.src.names()) - self.src.used)
        L = self.cfg.num_hidden_layers
        expected = (lambda n: qwen35.expected_unused(n, top, L)) if self.cfg.is_qwen35 else \
            (lambda n: _is_extra_layer(n, L))
        odd = [n for n in unused if not expected(n) and not n.endswith("rotary_emb.inv_freq")]
        if odd:
            import warnings
            warnings.warn(f"{self.src.where}: {len(odd)} checkpoint tensors are not used by the model, e.g. "
                          f"{', '.join(odd[:3])}", RuntimeWarning, stacklevel=3)
        return unused


def _is_extra_layer(name: str, num_layers: int) -> bool:
    parts = name.split(".")
    return len(parts) > 2 and parts[:2] == ["model", "layers"] and parts[2].isdigit() and int(parts[2]) >= num_layers


def build_model(cfg: ModelConfig, src: TensorSource, rt, *, dtype=torch.float32, quantize=None,
                show_progress: bool = False, sharding: Optional[Sharding] = None) -> CausalLM:
    """Assemble a CausalLM from tensors; the device is the runtime backend's device type.
    ``sharding`` (:class:`hal.models.parallel.Sharding`): read and keep only this rank's TP slices
    and EP experts (default: the whole model)."""
    if quantize not in (None, "fp8"):
        raise ValueError(f"quantize: expected None or 'fp8', got {quantize!r}")
    device = torch.device(rt.device_type)
    b = _Builder(cfg, src, rt, dtype, device, quantize, sharding or Sharding())
    bar = None
    if show_progress:
        from tqdm import tqdm
        bar = tqdm(total=cfg.num_hidden_layers, desc=f"loading {src.where}", unit="layer", disable=None)
    try:
        return b.build(progress=(lambda i: bar.update(1)) if bar else None)
    finally:
        if bar:
            bar.close()


def load_directory(path, rt, *, dtype=torch.float32, quantize=None, show_progress=False,
                   sharding: Optional[Sharding] = None) -> CausalLM:
    """Load a Hugging Face model directory (config.json + safetensors, optional tokenizer.json).

    Files are read only from inside the folder, regular files only, JSON files under a size cap
    (:class:`ModelFolder`); with ``sharding`` only this rank's slices are read. Raises
    ModelConfigError (config.json) or CheckpointError (index,
    shards, tensors, tokenizer.json), each naming the file, entry or tensor."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (give a built-in model name or a Hugging Face model folder)")
    folder = ModelFolder(path)
    cfg_file = path / "config.json"
    raw = folder.read_json("config.json", "config.json", CONFIG_MAX_BYTES, ModelConfigError)
    if raw is None:
        raise CheckpointError(f"{path}: no config.json")
    try:
        cfg = ModelConfig.from_dict(raw)
    except ModelConfigError as exc:
        raise ModelConfigError(f"{cfg_file}: {exc}") from exc
    if cfg.quantization:
        q = cfg.quantization
        if q.get("quant_method") not in ("fp8", None) or q.get("fmt", "e4m3") != "e4m3" or \
                not isinstance(q.get("weight_block_size", [128, 128]), list) or \
                list(q.get("weight_block_size", [128, 128])) != [128, 128]:
            raise ModelConfigError(f"{cfg_file}: quantization_config {q} is not the 128x128 e4m3 block format")
    tokenizer = None
    tok_text = folder.read_text("tokenizer.json", "tokenizer.json", TOKENIZER_MAX_BYTES)
    if tok_text is not None:
        from hal.models.tokenizer_builtin import tokenizer_from_json
        tokenizer = tokenizer_from_json(tok_text, str(path / "tokenizer.json"), error=CheckpointError)
    model = build_model(cfg, TensorSource.from_directory(folder), rt, dtype=dtype, quantize=quantize,
                        show_progress=show_progress, sharding=sharding)
    model.source = str(path)
    model.tokenizer = tokenizer
    return model
