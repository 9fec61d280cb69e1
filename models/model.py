"""The causal LM: embeddings, decoder layers, final norm and LM head, with a batched cache."""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F

from hal.models.config import ModelConfig
from hal.models.layers import KVCache, Step, rms_norm, rms_norm_zc, rope_cos_sin
from hal.models.rope import inv_freq_and_scaling


@dataclasses.dataclass
class CausalLM:
    """A loaded model bound to a runtime. ``forward`` takes token ids [B, S] with per-sequence
    cache offsets and returns logits [B, S, vocab] (fp32)."""

    config: ModelConfig
    rt: object
    embed: torch.Tensor
    layers: list
    norm: torch.Tensor
    lm_head: torch.Tensor
    dtype: torch.dtype
    device: torch.device
    tokenizer: object = None
    source: str = ""
    unused_tensors: list = dataclasses.field(default_factory=list)   # checkpoint tensors not taken (MTP layers)
    mla_form: str = "auto"         # MLA: "auto" (expanded prefill, absorbed decode), "absorbed", "expanded"
    sharding: object = None        # hal.models.parallel.Sharding: the TP group and EP group it was loaded for

    def __post_init__(self):
        from hal.models.layers import MoE
        for layer in self.layers:                     # each backend lays its expert weights out once
            mlp = getattr(layer, "mlp", None)
            if isinstance(mlp, MoE):
                mlp.prepare(self.rt)

    def shard_experts(self, group) -> None:
        """Expert parallelism: every MoE layer keeps only this rank's experts of ``group`` (a
        :class:`hal.distributed.EPGroup`) and exchanges tokens with the other ranks. Attention, dense
        layers and shared experts stay replicated: every rank runs the whole batch."""
        from hal.models.layers import MoE
        for layer in self.layers:
            mlp = getattr(layer, "mlp", None)
            if isinstance(mlp, MoE):
                mlp.keep_local_experts(group)

    @property
    def rope_dim(self) -> int:
        c = self.config
        return c.qk_rope_head_dim if c.is_mla else int(c.head_dim * c.partial_rotary_factor)

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        """Empty caches for ``batch`` sequences of up to ``capacity`` positions: attention keys and
        values [B, capacity, ...]; a linear-attention layer keeps its conv window and recurrent
        state per sequence ([B, ...], independent of ``capacity``)."""
        return KVCache(batch, capacity)

    def _absorb(self, S: int) -> bool:
        return self.mla_form == "absorbed" or (self.mla_form == "auto" and S == 1)

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, cache: KVCache, start: torch.Tensor, n_new: torch.Tensor, *,
                unpadded: bool = False, absorb: Optional[bool] = None) -> torch.Tensor:
        """Logits [B, S, vocab] fp32 for token ids [B, S] (int64, right-padded).

        start [B]: tokens already cached per sequence; n_new [B]: real new tokens per sequence (the
        rest is padding, masked out through the cache lengths). unpadded=True promises n_new == S
        for every sequence, so the DSA indexer takes the contract's default q_offset. absorb: MLA
        form (None: from ``mla_form``; "auto" absorbs single-token steps only)."""
        B, S = ids.shape
        lengths = start + n_new
        positions = start.view(-1, 1) + torch.arange(S, device=ids.device).view(1, -1)
        inv_freq, factor = inv_freq_and_scaling(self.config.rope_parameters, self.rope_dim)
        cos, sin = rope_cos_sin(positions, inv_freq, factor, self.dtype)
        step = Step(cache, start, lengths, None if unpadded else start, cos, sin, self._absorb(S) if absorb is None else absorb)
        x = F.embedding(ids, self.embed)
        indices = None
        for i, layer in enumerate(self.layers):
            x, indices = layer(x, step, i, indices, self.rt)
        norm = rms_norm_zc if self.config.is_qwen35 else rms_norm
        return F.linear(norm(x, self.norm, self.config.rms_norm_eps), self.lm_head).float()
