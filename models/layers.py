"""The building blocks: norms, RoPE, linear layers (bf16 or FP8 through the contract), MLA + DSA
attention, GQA attention, dense MLP and MoE. Contract ops (MoE, sparse attention, FP8) go through
the runtime ``rt``; everything else is plain torch, which runs on every device type."""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from hal import blockscale


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as transformers computes it: normalize in fp32, cast back, scale."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rms_norm_zc(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Zero-centered RMSNorm (Qwen3.5): normalize in fp32, scale by ``1 + weight`` in fp32, cast back
    (the stored weight is the offset from 1; a checkpoint's zeros are the identity scale)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (h * (1.0 + weight.float())).to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, attention_factor: float, dtype: torch.dtype):
    """cos, sin [..., dim] for integer positions [...] (the ``cat(freqs, freqs)`` layout), scaled by
    the RoPE attention factor (1 for default RoPE; YaRN's mscale ratio)."""
    freqs = positions[..., None].float() * inv_freq.to(positions.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * attention_factor).to(dtype), (emb.sin() * attention_factor).to(dtype)


def rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x0, x1), (x2, x3), ...; output in half-split layout (DeepSeek MLA, GLM-5)."""
    half = cos.shape[-1] // 2
    c, s = cos[..., :half], sin[..., :half]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


def rope_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves (Llama style)."""
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


@dataclasses.dataclass
class Linear:
    """y = x @ W.T (+ b): W in the model dtype, or float8_e4m3fn with 128x128 block scales (then
    the contract's ``fp8_linear`` runs it).

    Tensor parallelism (see :mod:`hal.models.parallel`): a column-parallel slice holds this rank's
    output rows; a row-parallel one (``tp`` set) holds its input columns, and its partial outputs
    are summed over the TP group (the bias, whole, added once after the sum). FP8 slices whose
    boundary falls inside a 128-block keep the covering scale blocks: ``pad_out`` zero rows in front
    align a column slice to its first block (those outputs are dropped); ``gather = (lo, hi)`` makes a
    row-parallel slice all-gather its input and read columns [lo, hi) of it (whole blocks, the other
    ranks' columns zero in W), so the activations quantize in the single-process 1x128 groups."""

    weight: torch.Tensor
    bias: Optional[torch.Tensor] = None
    scale: Optional[torch.Tensor] = None
    tp: Optional[object] = None            # row-parallel: the TPGroup its partial outputs are summed over
    pad_out: int = 0
    gather: Optional[tuple] = None

    def __call__(self, x: torch.Tensor, rt) -> torch.Tensor:
        if self.tp is None and not self.pad_out and self.gather is None:
            return self._apply(x, self.bias, rt)
        if self.gather is not None:
            x = self.tp.all_gather_last(x)[..., self.gather[0]:self.gather[1]]
        y = self._apply(x, None, rt)
        if self.pad_out:
            y = y[..., self.pad_out:]
        if self.tp is not None:
            y = self.tp.all_reduce(y)
        return y if self.bias is None else y + self.bias

    def _apply(self, x, bias, rt):
        if self.scale is not None:
            return rt.fp8_linear(x, self.weight, self.scale, bias=bias)
        return F.linear(x, self.weight, bias)

    @property
    def out_features(self) -> int:
        return self.weight.shape[0] - self.pad_out


@dataclasses.dataclass
class MLP:
    gate: Linear
    up: Linear
    down: Linear

    def __call__(self, x, rt):
        return self.down(F.silu(self.gate(x, rt)) * self.up(x, rt), rt)


@dataclasses.dataclass
class MoE:
    """Routed experts (through ``rt.moe_forward``) plus the shared experts.

    scoring "sigmoid" (GLM / DeepSeek: router logits in fp32, correction bias, groups) or "softmax"
    (Qwen3.5: logits in the model dtype, then fp32 softmax, as transformers computes them).
    shared_gate [1, H] or None: the shared expert's output is scaled by sigmoid(x @ shared_gate.T)
    (Qwen3.5), else added as is."""

    gate_weight: torch.Tensor              # [E, H] router
    correction_bias: Optional[torch.Tensor]  # [E] fp32 or None
    w_gate_up: torch.Tensor                # [E, 2I, H]
    w_down: torch.Tensor                   # [E, H, I]
    w_gate_up_scale: Optional[torch.Tensor]
    w_down_scale: Optional[torch.Tensor]
    shared: Optional[MLP]
    top_k: int
    n_group: int
    topk_group: int
    renormalize: bool
    scaling_factor: float
    scoring: str = "sigmoid"
    shared_gate: Optional[torch.Tensor] = None
    ep_group: Optional[str] = None         # expert parallel: the EP group's name; this rank holds E/W experts
    num_experts: int = 0                   # E of the whole layer (set with ep_group)

    def keep_local_experts(self, group) -> None:
        """Expert parallelism over ``group`` (a :class:`hal.distributed.EPGroup`): keep only this
        rank's E / W experts (the contiguous block ``rank * E/W ...``, copied so the others' memory
        is freed) and route tokens through ``ep_dispatch`` / ``ep_combine``. E must be a multiple of W."""
        E, W = self.w_gate_up.shape[0], group.world_size
        if E % W:
            raise ValueError(f"expert parallelism: the model's {E} routed experts do not divide over {W} ranks "
                             f"(choose a world size that divides {E})")
        mine = slice(group.rank * E // W, (group.rank + 1) * E // W)
        for name in ("w_gate_up", "w_down", "w_gate_up_scale", "w_down_scale"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t[mine].clone())
        self.ep_group, self.num_experts = group.name, E

    def prepare(self, rt) -> None:
        """Replace the expert weights with the runtime's layout of them (``rt.prepare_weights``:
        same shapes, dtypes and values; e.g. a transposed storage for Ascend's grouped matmul)."""
        names = ("w_gate_up", "w_down", "w_gate_up_scale", "w_down_scale")
        prepared = rt.prepare_weights("moe_forward", **{n: getattr(self, n) for n in names if getattr(self, n) is not None})
        for name, tensor in prepared.items():
            setattr(self, name, tensor)

    def __call__(self, x, rt):
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        if self.scoring == "softmax":
            logits = F.linear(flat, self.gate_weight).float()
        else:
            logits = F.linear(flat.float(), self.gate_weight.float())
        routing = dict(top_k=self.top_k, scoring=self.scoring, correction_bias=self.correction_bias,
                       n_group=self.n_group, topk_group=self.topk_group, renormalize=self.renormalize,
                       scaling_factor=self.scaling_factor, w_gate_up_scale=self.w_gate_up_scale,
                       w_down_scale=self.w_down_scale)
        if self.ep_group is not None:
            from hal.ep_moe import ep_moe_forward
            y = ep_moe_forward(rt, flat, logits, self.w_gate_up, self.w_down, num_experts=self.num_experts,
                               group=self.ep_group, **routing).view(shape)
        else:
            y = rt.moe_forward(flat, logits, self.w_gate_up, self.w_down, **routing).view(shape)
        if self.shared is not None:
            s = self.shared(x, rt)
            if self.shared_gate is not None:
                s = torch.sigmoid(F.linear(x, self.shared_gate)) * s
            y = y + s
        return y


class KVCache:
    """Per-layer cache tensors [B, capacity, ...], written at each sequence's own positions."""

    def __init__(self, batch: int, capacity: int):
        self.batch, self.capacity = batch, capacity
        self.store: dict = {}

    def write(self, key, new: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        """Write new [B, S, ...] at positions start[b] + s; return the whole cache [B, capacity, ...]."""
        buf = self.store.get(key)
        if buf is None:
            buf = self.store[key] = new.new_zeros((self.batch, self.capacity, *new.shape[2:]))
        S = new.shape[1]
        pos = start.view(-1, 1) + torch.arange(S, device=new.device).view(1, -1)       # [B, S]
        pos = pos.clamp_max(self.capacity - 1)
        idx = pos.view(*pos.shape, *([1] * (new.dim() - 2))).expand_as(new)
        buf.scatter_(1, idx, new)
        return buf

    def state(self, key) -> Optional[torch.Tensor]:
        """A per-sequence recurrent state [B, ...] stored under ``key`` (None before the first write)."""
        return self.store.get(key)

    def set_state(self, key, value: torch.Tensor) -> None:
        self.store[key] = value


@dataclasses.dataclass
class Step:
    """One forward call as every layer sees it.

    start [B] int64: tokens already cached per sequence; lengths [B]: tokens cached after this call
    (start + real new tokens; the rest of the S positions is right padding). q_offset is None when
    each sequence's S queries are its last S positions (no padding: the contract's default
    ``q_offset = k_lengths - S``, which every backend's causal mode takes), else ``start``.
    cos/sin [B, S, rope_dim]: the RoPE table at the queries' positions. absorb: run MLA in the
    absorbed form (MQA over the latent; decode), else the expanded form (prefill)."""

    cache: KVCache
    start: torch.Tensor
    lengths: torch.Tensor
    q_offset: Optional[torch.Tensor]
    cos: torch.Tensor
    sin: torch.Tensor
    absorb: bool = False


@dataclasses.dataclass
class Indexer:
    """The DSA lightning indexer's projections (GLM-5 / DeepSeek-V3.2)."""

    wq_b: Linear
    wk: Linear
    k_norm_weight: torch.Tensor
    k_norm_bias: torch.Tensor
    weights_proj: torch.Tensor             # [Hi, H], fp32
    n_heads: int
    head_dim: int
    rope_dim: int
    top_k: int
    interleaved: bool

    def __call__(self, x, q_resid, step: Step, layer: int, rt) -> torch.Tensor:
        """Top-k key indices [B, S, top_k] int32 (-1 tail) over the cached indexer keys."""
        B, S, _ = x.shape
        q = self.wq_b(q_resid, rt).view(B, S, self.n_heads, self.head_dim)
        k = F.layer_norm(self.wk(x, rt), (self.head_dim,), self.k_norm_weight, self.k_norm_bias, 1e-6)
        rot = rope_interleaved if self.interleaved else rope_half
        cos, sin = step.cos, step.sin
        q = torch.cat([rot(q[..., :self.rope_dim], cos[:, :, None], sin[:, :, None]), q[..., self.rope_dim:]], -1)
        k = torch.cat([rot(k[..., :self.rope_dim], cos, sin), k[..., self.rope_dim:]], -1)
        k_all = step.cache.write((layer, "index_k"), k, step.start)
        # transformers scales q.k by D^-0.5 inside the ReLU and the weights by Hi^-0.5; the contract
        # takes both folded into the weights (equal for a positive scale)
        w = F.linear(x.float(), self.weights_proj.float()) * (self.n_heads ** -0.5 * self.head_dim ** -0.5)
        return rt.lightning_indexer(q, k_all, w.contiguous(), top_k=self.top_k, causal=True, q_offset=step.q_offset,
                                    k_lengths=step.lengths)


def absorbed_kv_b(kv_b: Linear, n_heads: int, nope: int, v_dim: int, dtype: torch.dtype):
    """MLA's ``kv_b`` as the absorbed form uses it, for the ``n_heads`` heads it holds (all, or a TP
    rank's): (w_uk [n_heads, nope, kv_lora], w_uv [n_heads, v_dim, kv_lora]) in ``dtype``; an FP8
    weight is dequantized (once, here) and a TP slice's leading pad rows (``pad_out``) dropped."""
    w = kv_b.weight
    if kv_b.scale is not None:
        w = (w.float() * blockscale.expand(kv_b.scale, w.shape[0], w.shape[1])).to(dtype)
    w = w[kv_b.pad_out:].view(n_heads, nope + v_dim, -1)
    return w[:, :nope], w[:, nope:]


@dataclasses.dataclass
class MLAAttention:
    """Multi-head latent attention with DSA. The cache holds the latent (RMS-normalized compressed
    KV [kv_lora]) and the rotated shared key [rope]; attention runs over the indexer's top-k.

    Expanded form (prefill, what transformers computes): keys/values per head from ``kv_b`` over
    the cached latent, ``sparse_attention`` with Hk = Hq, Dqk = nope + rope, Dv = v_dim.
    Absorbed form (decode): ``kv_b`` folded into the query and the output, ``sparse_attention`` as
    MQA over the latent (Hk = 1, Dqk = kv_lora + rope, Dv = kv_lora, v a view of k: 576/512 for
    the released models), so a decode step never re-expands the whole cache. Both are the same
    function of the inputs; they differ in rounding only.

    Tensor parallelism: ``n_heads`` are this rank's heads (``q_b`` / ``kv_b`` column slices, ``o`` a
    row-parallel slice); ``q_a``, ``kv_a``, the latent / rotated-key caches and the indexer are
    replicated, since every head reads the same latent and the same top-k."""

    q_a: Linear
    q_a_norm: torch.Tensor
    q_b: Linear
    kv_a: Linear
    kv_a_norm: torch.Tensor
    kv_b: Linear
    o: Linear
    indexer: Optional[Indexer]
    n_heads: int
    nope: int
    rope: int
    v_dim: int
    kv_lora: int
    eps: float
    scale: float
    w_uk: torch.Tensor = None              # [Hq, nope, kv_lora]: kv_b's key rows (dequantized when FP8)
    w_uv: torch.Tensor = None              # [Hq, v_dim, kv_lora]: kv_b's value rows

    def __post_init__(self):
        self.w_uk, self.w_uv = absorbed_kv_b(self.kv_b, self.n_heads, self.nope, self.v_dim, self.q_a_norm.dtype)

    def __call__(self, x, step: Step, layer: int, prev_indices, rt):
        B, S, _ = x.shape
        cos, sin = step.cos, step.sin
        q_resid = rms_norm(self.q_a(x, rt), self.q_a_norm, self.eps)
        q = self.q_b(q_resid, rt).view(B, S, self.n_heads, self.nope + self.rope)
        q_nope, q_rot = q[..., :self.nope], rope_interleaved(q[..., self.nope:], cos[:, :, None], sin[:, :, None])
        ckv = self.kv_a(x, rt)
        latent = rms_norm(ckv[..., :self.kv_lora], self.kv_a_norm, self.eps)
        k_rot = rope_interleaved(ckv[..., self.kv_lora:], cos, sin)
        latent_all = step.cache.write((layer, "latent"), latent, step.start)          # [B, T, kv_lora]
        k_rot_all = step.cache.write((layer, "k_rot"), k_rot, step.start)             # [B, T, rope]
        if self.indexer is not None:
            indices = self.indexer(x, q_resid, step, layer, rt)
        else:                              # a "shared" layer reuses the previous full layer's top-k
            indices = prev_indices
        if step.absorb:
            q_lat = torch.einsum("bshn,hnc->bshc", q_nope, self.w_uk)
            k = torch.cat([latent_all, k_rot_all], -1)[:, :, None]                    # [B, T, 1, kv_lora + rope]
            out = rt.sparse_attention(torch.cat([q_lat, q_rot], -1), k, k[..., :self.kv_lora], indices,
                                      scale=self.scale)
            out = torch.einsum("bshc,hvc->bshv", out, self.w_uv)
        else:
            T = latent_all.shape[1]
            kv = self.kv_b(latent_all, rt).view(B, T, self.n_heads, self.nope + self.v_dim)
            k = torch.cat([kv[..., :self.nope], k_rot_all[:, :, None].expand(B, T, self.n_heads, self.rope)], -1)
            out = rt.sparse_attention(torch.cat([q_nope, q_rot], -1), k, kv[..., self.nope:].contiguous(), indices,
                                      scale=self.scale)
        return self.o(out.reshape(B, S, -1), rt), indices


@dataclasses.dataclass
class GQAAttention:
    """Grouped-query attention with partial RoPE and optional qk-norm (GLM-4.5), plain torch.
    Tensor parallelism: ``n_heads`` / ``n_kv`` are this rank's query / KV heads (T divides both, so
    a rank's query heads read only its own KV heads), ``o`` a row-parallel slice."""

    q: Linear
    k: Linear
    v: Linear
    o: Linear
    q_norm: Optional[torch.Tensor]
    k_norm: Optional[torch.Tensor]
    n_heads: int
    n_kv: int
    head_dim: int
    rotary_dim: int
    eps: float

    def __call__(self, x, step: Step, layer: int, prev_indices, rt):
        B, S, _ = x.shape
        cos, sin = step.cos[:, :, None], step.sin[:, :, None]
        q = self.q(x, rt).view(B, S, self.n_heads, self.head_dim)
        k = self.k(x, rt).view(B, S, self.n_kv, self.head_dim)
        v = self.v(x, rt).view(B, S, self.n_kv, self.head_dim)
        if self.q_norm is not None:
            q, k = rms_norm(q, self.q_norm, self.eps), rms_norm(k, self.k_norm, self.eps)
        rd = self.rotary_dim
        q = torch.cat([rope_half(q[..., :rd], cos, sin), q[..., rd:]], -1)
        k = torch.cat([rope_half(k[..., :rd], cos, sin), k[..., rd:]], -1)
        out = gqa_attend(q, k, v, step, layer)
        return self.o(out.reshape(B, S, -1), rt), None


def gqa_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: Step, layer: int) -> torch.Tensor:
    """Causal GQA over the cache, plain torch: q [B, S, Hq, D] (rotated), k / v [B, S, Hkv, D] the
    new keys and values, written into the cache at each sequence's positions first. Returns
    [B, S, Hq, D]; query head h reads KV head h // (Hq / Hkv); keys at or past a sequence's length
    (right padding) and after the query are masked."""
    B, S, Hq, D = q.shape
    rep = Hq // k.shape[2]
    k_all = step.cache.write((layer, "k"), k, step.start).repeat_interleave(rep, dim=2)
    v_all = step.cache.write((layer, "v"), v, step.start).repeat_interleave(rep, dim=2)
    return masked_attention(q, k_all, v_all, step, D ** -0.5)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: Step, scale: float) -> torch.Tensor:
    """Dense softmax attention in plain torch: q [B, S, H, Dqk] over the cache k [B, T, H, Dqk],
    v [B, T, H, Dv] (heads already matched). Query s of sequence b sits at position start[b] + s
    and sees keys at positions <= its own and < lengths[b] (right padding never seen). Scores in
    q's dtype, softmax in fp32 cast back (transformers' eager attention). Returns [B, S, H, Dv]."""
    S, T = q.shape[1], k.shape[1]
    scores = torch.einsum("bshd,bthd->bhst", q, k) * scale
    key_pos = torch.arange(T, device=q.device).view(1, 1, T)
    q_pos = step.start.view(-1, 1, 1) + torch.arange(S, device=q.device).view(1, S, 1)
    visible = (key_pos <= q_pos) & (key_pos < step.lengths.view(-1, 1, 1))
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.einsum("bhst,bthd->bshd", probs, v)


@dataclasses.dataclass
class DecoderLayer:
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(x)). ``norm`` is ``rms_norm``
    (GLM / DeepSeek / Kimi) or ``rms_norm_zc`` (Qwen3.5's zero-centred weights)."""
    attn: object
    mlp: object
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    eps: float
    norm: Callable = rms_norm

    def __call__(self, x, step: Step, layer: int, prev_indices, rt):
        """Returns the new hidden states and this layer's DSA indices (None for the others)."""
        h, indices = self.attn(self.norm(x, self.input_norm, self.eps), step, layer, prev_indices, rt)
        x = x + h
        return x + self.mlp(self.norm(x, self.post_norm, self.eps), rt), indices
