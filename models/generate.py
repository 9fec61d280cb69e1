"""Generation: batched prefill, then incremental decode with the caches; greedy or sampled."""
from __future__ import annotations

import dataclasses
import math
import operator
import time
from typing import Optional, Sequence

import torch

from hal.binding import sync_device as _sync


class PromptError(ValueError):
    """A prompt the model cannot take (empty, out-of-vocabulary ids, longer than its maximum)."""


@dataclasses.dataclass
class GenerationResult:
    prompts: list                    # token ids per prompt
    tokens: list                     # generated ids per prompt (up to and including EOS)
    prefill_logits: torch.Tensor     # [B, S_max, vocab] fp32 (right-padded prompts)
    prefill_s: float
    decode_s: float
    decode_steps: int

    @property
    def prefill_tokens_per_s(self) -> float:
        return sum(len(p) for p in self.prompts) / self.prefill_s if self.prefill_s else float("inf")

    @property
    def decode_tokens_per_s(self) -> float:
        n = sum(max(len(t) - 1, 0) for t in self.tokens)
        return n / self.decode_s if self.decode_s else 0.0


def _sample(logits: torch.Tensor, temperature: float, top_p: float, gen: Optional[torch.Generator]) -> torch.Tensor:
    """Next token per row of logits [B, V]: argmax when temperature == 0, else nucleus sampling."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    keep = sorted_p.cumsum(-1) - sorted_p < top_p            # the smallest set with mass >= top_p
    sorted_p = torch.where(keep, sorted_p, 0.0)
    choice = torch.multinomial(sorted_p / sorted_p.sum(-1, keepdim=True), 1, generator=gen)
    return order.gather(-1, choice).squeeze(-1).to(logits.device)


def _token_id(t) -> int:
    """An int token id from an int-like (int, numpy integer, 0-d integer tensor); bool and float refused."""
    if not isinstance(t, bool):
        try:
            return operator.index(t)
        except TypeError:
            pass
    raise PromptError(f"token ids must be integers, got {t!r}")




@torch.no_grad()
def generate(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 16, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, eos_token_id=None) -> GenerationResult:
    """Generate for several prompts of different lengths in one batch.

    prompts: B lists of token ids (ints in [0, vocab_size)), each non-empty. Prompts are
    right-padded; each sequence keeps its own cache length, positions and causal visibility.
    temperature: a finite number >= 0 (0 = greedy); top_p in (0, 1]. Stops at EOS (per sequence)
    or after ``max_new_tokens``. The KV caches hold longest prompt + max_new_tokens positions
    (never ``max_position_embeddings``, which only bounds that sum).
    Raises PromptError for a prompt the model cannot take, ValueError for a bad sampling argument."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or \
            not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"generate: temperature: expected a finite number >= 0, got {temperature!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"generate: top_p: expected a number in (0, 1], got {top_p!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise PromptError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise PromptError("every prompt needs at least one token")
    V = model.config.vocab_size
    prompts = [[_token_id(t) for t in p] for p in prompts]
    bad = [t for p in prompts for t in p if not 0 <= t < V]
    if bad:
        raise PromptError(f"token id {bad[0]} is outside the vocabulary [0, {V})")
    limit = model.config.max_position_embeddings
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > limit:
        raise PromptError(f"prompt of {longest} tokens + {max_new_tokens} new tokens exceeds the model's maximum "
                          f"of {limit} positions")
    eos = set(model.config.eos_token_id if eos_token_id is None else
              (eos_token_id if isinstance(eos_token_id, (list, tuple, set)) else [eos_token_id]))
    dev, B = model.device, len(prompts)
    ids = torch.zeros(B, longest, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, :len(p)] = torch.tensor(list(p))
    lens = torch.tensor([len(p) for p in prompts], device=dev)
    cache = model.new_cache(B, longest + max_new_tokens)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    logits = model.forward(ids.to(dev), cache, torch.zeros(B, dtype=torch.long, device=dev), lens,
                           unpadded=all(len(p) == longest for p in prompts))
    _sync(dev)
    t1 = time.perf_counter()
    nxt = _sample(logits[torch.arange(B, device=dev), lens - 1], temperature, top_p, gen)
    out = [[int(nxt[b])] for b in range(B)]
    done = [out[b][0] in eos for b in range(B)]
    steps = 0
    cur = lens.clone()
    while steps < max_new_tokens - 1 and not all(done):
        step_logits = model.forward(nxt.view(B, 1), cache, cur, torch.ones(B, dtype=torch.long, device=dev),
                                    unpadded=True)
        cur = cur + 1
        nxt = _sample(step_logits[:, -1], temperature, top_p, gen)
        steps += 1
        for b in range(B):
            if not done[b]:
                out[b].append(int(nxt[b]))
                done[b] = out[b][-1] in eos
    _sync(dev)
    return GenerationResult([list(map(int, p)) for p in prompts], out, logits.cpu(), t1 - t0,
                            time.perf_counter() - t1, steps)
