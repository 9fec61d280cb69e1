"""hal-cuda's ``ep_dispatch`` / ``ep_combine`` on DeepEP's low-latency kernels
(``deep_ep.Buffer.low_latency_dispatch`` / ``low_latency_combine``), used when ``deep_ep`` is
importable and the call fits (:func:`deepep_unsupported_reason`); every other call takes hal-cuda's
torch.distributed path (``op_ep_dispatch.torch_ep_dispatch`` / ``op_ep_combine.torch_ep_combine``).

Facts about DeepEP this module relies on (github.com/deepseek-ai/DeepEP, read at commit
dd758caf451848bd150e1046af3d0a73e5fff38d, "V2.1.0", and at tag v1.2.1 =
9af0e0d0e74f3577af1979c9b9e1ac2cad0104ee; the low-latency API is the same in both):

- ``deep_ep.Buffer(group, num_nvl_bytes=0, num_rdma_bytes=0, low_latency_mode=False,
  num_qps_per_rank=24, allow_nvlink_for_low_latency_mode=True, allow_mnnvl=False,
  explicitly_destroy=False, ...)`` (``deep_ep/buffers/legacy.py``; ``deep_ep/buffer.py`` in v1,
  which also takes ``use_fabric``). The constructor runs ``all_gather_object`` over ``group``:
  every rank must create its buffer together. Low-latency mode needs ``num_qps_per_rank`` = the
  number of local experts (docstring; the dispatch kernel asserts ``num_rc_per_pe >=
  num_local_experts``) and NVSHMEM with IBGDA (the constructor sets the NVSHMEM environment).
  ``explicitly_destroy=True`` means ``destroy()`` must be called to free it.
- ``Buffer.get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank, hidden, num_ranks,
  num_experts)`` sizes the RDMA buffer (``csrc/legacy/config.hpp``, ``LowLatencyLayout``: two
  odd/even sets of send, receive and signalling buffers, each receive buffer
  ``num_experts * max_tokens * (16 + 2 * hidden)`` bytes); both kernels assert the layout fits.
- ``low_latency_dispatch(x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts, ...,
  use_fp8=True, round_scale=False, use_ue8m0=False, async_finish=False, return_recv_hook=False)``
  -> ``(recv_x, recv_count, handle, event, hook)``. Host assertions (``csrc/legacy/buffer.hpp``):
  x is 2-D, contiguous, **bfloat16**, hidden % 128 == 0; ``topk_idx`` is ``deep_ep.topk_idx_t``
  (int64 unless built with ``EP_NUM_TOPK_IDX_BITS``; v1.2.1 asserts int64), -1 means no expert;
  ``x.size(0) <= num_max_dispatch_tokens_per_rank``, a value all ranks must share;
  ``num_experts % num_ranks == 0``; ``(num_ranks * max_tokens) % 4 == 0``. The kernels are
  instantiated for hidden in {2048, 2560, 4096, 5120, 6144, 7168, 8192} (``SWITCH_HIDDEN``,
  ``csrc/kernels/legacy/launch.cuh``; 3072 was added in commit 73b6ea4, after v1.2.1, and is in
  2.x) and ``num_topk <= 11`` (``kNumMaxTopK``, ``csrc/kernels/legacy/internode_ll.cu``); the
  receive phase asserts ``ceil(num_experts / SMs) < 15``. The Python wrapper asserts
  ``NVSHMEM_QP_DEPTH (default 1024) >= 2 (max_tokens + 1)`` (since commit d981409, after v1.2.1,
  which only sets the default) and, in 2.x, that torch's deterministic algorithms and
  ``fill_uninitialized_memory`` are not both on.
  Outputs, all **device tensors** (no host list in this mode): ``recv_x``
  [num_local_experts, num_ranks * max_tokens, hidden] bf16 (``use_fp8=False``; with
  ``use_fp8=True`` DeepEP casts the bf16 rows itself to e4m3 with its own per-128-channel scales,
  column-major); ``recv_count`` [num_local_experts] int32, the valid rows per expert ("not all
  tokens are valid ... we do not synchronize CPU received count with GPU");
  ``handle = (src_info [L, W * max_tokens] int32: the source token index of each row,
  layout_range [L, W] int64: (begin << 32) | count of each source rank's rows, max_tokens,
  hidden, num_experts)`` (``tests/legacy/test_low_latency.py`` reads them that way). Expert e
  lives on rank ``e // num_local_experts``. The kernel sends one message per (token, top-k slot)
  with an expert, taking the destination slot with ``atomicAdd``, and the receiver places each
  source rank's range with ``atomicAdd`` too: **rows are not ordered by source rank or token**.
  With ``use_fp8=False`` the payload is copied as 16-byte vectors (no arithmetic on it).
- ``low_latency_combine(x, topk_idx, topk_weights, handle, use_logfmt=False, zero_copy=False,
  async_finish=False, return_recv_hook=False, out=None)`` -> ``(combined_x, event, hook)``:
  x [L, W * max_tokens, hidden] bf16 in the dispatch's row positions; ``topk_idx`` /
  ``topk_weights`` [T, k] (topk_idx_t / fp32) of the *dispatching* rank, T <= max_tokens. Each row
  goes back to the receive-buffer slot (global expert, source token) of its rank, which computes
  ``sum over k with topk_idx >= 0 of topk_weights[t, k] * row`` accumulated in fp32 in slot
  order and rounded once to bf16 (``combine`` kernel in ``internode_ll.cu``; "reduce **with
  weights**" in the docstring). One slot per (expert, token): a token naming one expert in two
  slots gets one row back for both.
- Both kernels alternate between two halves of the RDMA buffer on every call, so all ranks must
  launch the same sequence of low-latency kernels; the returned tensors are freshly allocated
  (``torch::empty``), so holding several dispatches' outputs and handles is safe when neither
  ``return_recv_hook`` nor ``zero_copy`` is used (the "no more than 2 results at a time" warning
  is about tensors still living in the buffer).

Why low-latency mode, not normal mode. HAL's ``ep_dispatch`` returns the expanded, expert-major
layout (one row per (token, slot), grouped by local expert, with per-expert counts and each row's
(rank, token, slot)), and ``ep_combine`` is a weighted, slot-ordered fp32 sum. Low-latency mode
delivers exactly that shape (one row per (token, slot), grouped by local expert, counts on the
device, source token indices) and its combine is the weighted sum in slot order, with no host
sync inside DeepEP. Normal mode (``get_dispatch_layout`` + ``dispatch`` / ``combine``) is
token-major (one row per (token, destination rank), ``recv_topk_idx`` local indices), returns
the per-expert counts as a host list (a CPU wait, unless ``num_worst_tokens``, intranode only),
and its combine is an unweighted sum across ranks: HAL would have to expand the rows itself and
pre-weight and pre-sum each rank's slots, which breaks the contract's fixed slot order. Normal
mode's advantage (a token crosses once per rank, not per slot: fewer bytes for prefill, see
docs/distributed.md) is not used here; low-latency mode caps the tokens per rank
(``HAL_CUDA_DEEPEP_MAX_TOKENS``, default 128, DeepEP's test default; DeepEP recommends < 256).

How the contract maps onto it:
- the payload travels as bfloat16 words with ``use_fp8=False``: a bf16 row whose hidden size is
  one of the kernel's goes as is; any other row (fp16, fp32, another width, or e4m3 with its
  1x128 fp32 scales) goes as its bytes, zero-padded to the next supported width, so every
  contract dtype arrives bit for bit. DeepEP's own FP8 cast is not used: it quantizes bf16 input
  with its own scales, and the contract's e4m3 payload must arrive as sent;
- experts are relabelled so that DeepEP's contiguous placement (expert e on rank e // L) puts
  each expert where ``expert_map`` says, local experts in increasing global id (so DeepEP's local
  index is the contract's);
- a row's source rank comes from ``layout_range``, its token from ``src_info``; the slot, which
  DeepEP does not carry, from the routing itself: the group all-gathers each rank's [max_tokens,
  k] expert ids (plus its T) before the dispatch (a fixed-size collective, no host sync; it
  brings W (1 + max_tokens k) int32 to every rank, about 2 W / H of the payload when every rank
  sends max_tokens tokens: under 2% at W = 64, H = 7168). The rows are then sorted into the
  contract's order (local expert, source rank, token, slot) on the device;
- **the one host read** of a dispatch comes after DeepEP's kernel: the per-expert counts (and,
  in the same read, every rank's T and whether any token of the group names an expert twice).
  The contract's outputs are [R, H] with R data-dependent, so R must reach the host to size them;
  DeepEP's padded [L, W * max_tokens, H] layout exists precisely to avoid that read, and this
  layout cannot. Nothing else reads the device: no read before DeepEP's kernel, none in the
  combine (when it gets back the very ``recv_source`` tensor its dispatch returned);
- more tokens on some rank than the buffer's maximum: every rank still sends its first
  max_tokens (they cannot know each other's T before the one read), and once the read shows a T
  above the maximum, every rank discards the result and takes the torch.distributed path (the
  same decision everywhere, from the same all-gathered numbers);
- the combine finds its dispatch's state by the ``recv_source`` it is given (the same tensor,
  else equal values, else the same rows in another order), as hal-ascend's MC2 path does; the
  last 4 dispatches per group are kept (two micro-batches in flight). It puts the expert outputs
  back into DeepEP's positions (zero-padding the hidden size up to a supported width) and hands
  DeepEP this rank's routing weights as fp32. It declines (torch.distributed path) fp16/fp32
  expert outputs (DeepEP combines bf16 only: rounding them first would exceed the contract's
  budget) and dispatches where some token named one expert twice (one buffer slot per (expert,
  token)).

Every decline depends only on what all ranks of the group share (E, k, H, dtypes, world size,
environment, the group's dispatch history) or on the all-gathered numbers, so the ranks always
take the same path; a call that DeepEP cannot take is never half-run on one rank.
"""
from __future__ import annotations

import dataclasses
import importlib
import math
import os
import threading
import warnings
from collections import Counter
from typing import Any, Optional

import torch

DISABLE_ENV = "HAL_CUDA_DEEPEP"                # "0": never use DeepEP
MAX_TOKENS_ENV = "HAL_CUDA_DEEPEP_MAX_TOKENS"   # num_max_dispatch_tokens_per_rank (the same on every rank)
DEFAULT_MAX_TOKENS = 128
LL_HIDDEN = (2048, 2560, 4096, 5120, 6144, 7168, 8192)     # SWITCH_HIDDEN in v1.2.1 (3072 from 2.x)
LL_MAX_TOPK = 11                                          # kNumMaxTopK
LL_MAX_WARP_GROUPS = 14                                   # ceil(E / SMs) < 15 in the dispatch's receive phase
WORD = torch.bfloat16
KEPT_HANDLES = 4

_LOCK = threading.Lock()
_MODULE: Optional[tuple] = None        # (module or None, why not)
_STATES: dict = {}                     # group name -> _State (its deep_ep.Buffer)
HANDLES: dict = {}                     # group name -> [_Handle], newest last
LAST: dict = {}                        # (group, op) -> (path, reason or None)
COUNTS: Counter = Counter()            # (op, path) -> calls in this process
_WARNED: set = set()


# --- the module and its limits ---------------------------------------------------------------------------------

def _module() -> tuple:
    """(deep_ep or None, why it is not importable): imported once, on first need."""
    global _MODULE
    with _LOCK:
        if _MODULE is None:
            try:
                _MODULE = (importlib.import_module("deep_ep"), None)
            except Exception as exc:  # noqa: BLE001 - any import failure means "not usable", with its reason
                _MODULE = (None, f"{type(exc).__name__}: {exc}")
        return _MODULE


def reset() -> None:
    """Forget the imported module, the buffers (destroyed) and the kept dispatches (tests)."""
    global _MODULE
    release()
    with _LOCK:
        _MODULE = None
    HANDLES.clear()
    LAST.clear()
    COUNTS.clear()
    _WARNED.clear()


def release(group: Optional[str] = None) -> None:
    """Destroy the DeepEP buffer of ``group`` (all groups when None); call on every rank before
    the process group goes away."""
    for name in ([group] if group is not None else list(_STATES)):
        st = _STATES.pop(name, None)
        if st is not None:
            st.buffer.destroy()
        HANDLES.pop(name, None)
    _RESOLVED[0] = None


def hidden_sizes(mod) -> tuple:
    """The hidden sizes ``mod``'s low-latency kernels are built for."""
    major = str(getattr(mod, "__version__", "1")).split(".")[0]
    return tuple(sorted(LL_HIDDEN + ((3072,) if major.isdigit() and int(major) >= 2 else ())))


def payload_words(dtype: torch.dtype, H: int, scaled: bool) -> int:
    """bf16 words of one token's payload: its row's bytes (and its 1x128 fp32 scales)."""
    nbytes = H * torch.empty(0, dtype=dtype).element_size() + (4 * -(-H // 128) if scaled else 0)
    return -(-nbytes // 2)


def row_width(words: int, sizes: tuple) -> Optional[int]:
    """The smallest supported hidden size that holds ``words``, or None."""
    return next((s for s in sizes if s >= words), None)


def max_tokens() -> int:
    return int(os.environ.get(MAX_TOKENS_ENV, "") or DEFAULT_MAX_TOKENS)


def _max_tokens_reason(world: int) -> Optional[str]:
    try:
        t = max_tokens()
    except ValueError:
        return f"{MAX_TOKENS_ENV}={os.environ.get(MAX_TOKENS_ENV)!r} is not an integer"
    if t < 1:
        return f"{MAX_TOKENS_ENV}={t}: DeepEP needs at least 1 token per rank"
    depth = int(os.environ.get("NVSHMEM_QP_DEPTH", "1024") or 1024)
    if depth < 2 * (t + 1):
        return (f"{MAX_TOKENS_ENV}={t}: DeepEP's low-latency kernels need NVSHMEM_QP_DEPTH >= 2 (max tokens + 1) = "
                f"{2 * (t + 1)} (it is {depth})")
    if (world * t) % 4:
        return (f"{MAX_TOKENS_ENV}={t}: DeepEP needs num_ranks x max tokens to be a multiple of 4 "
                f"({world} x {t})")
    return None


def _backend_of(pg) -> str:
    import torch.distributed as dist
    try:
        return str(dist.get_backend(pg))
    except Exception:  # noqa: BLE001 - not a registered process group
        return "unknown"


def _device_sms(device: torch.device) -> Optional[int]:
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).multi_processor_count


def _environment_reason(group: str, device: torch.device) -> Optional[str]:
    """Why DeepEP cannot serve this group / device at all (not a matter of one call's shapes)."""
    from hal import distributed
    if os.environ.get(DISABLE_ENV, "") == "0":
        return f"DeepEP disabled ({DISABLE_ENV}=0)"
    ep = distributed.get_ep_group(group)
    if ep is None or ep.process_group is None:
        return f"group {group!r} is one process: nothing to exchange"
    mod, err = _module()
    if mod is None:
        return f"deep_ep is not importable ({err})"
    want = getattr(mod, "TENSOR_DEVICE", "cuda")      # the CPU test double (tests/deep_ep_double) says "cpu"
    if device.type != want:
        return (f"DeepEP's kernels take {want} tensors; these are on {device}"
                + (" (hal-cuda under the Triton interpreter)" if device.type == "cpu" else ""))
    need = "nccl" if want == "cuda" else "gloo"
    backend = _backend_of(ep.process_group)
    if need not in backend:
        return (f"the EP group's process group runs {backend}: the routing's all-gather next to DeepEP needs "
                f"{need} for {want} tensors")
    if torch.are_deterministic_algorithms_enabled() and getattr(torch.utils.deterministic,
                                                               "fill_uninitialized_memory", False):
        return ("torch's deterministic algorithms with fill_uninitialized_memory: DeepEP 2.x refuses them (the "
                "fill kernels would overlap its communication stream)")
    return None


def deepep_unsupported_reason(x, topk_ids, *, num_experts, group, x_scale=None, expert_map=None) -> Optional[str]:
    """None when this ``ep_dispatch`` call can run on DeepEP's low-latency kernels, else why not.
    Shapes, dtypes and settings only (no device read), all shared by the group's ranks; the tokens
    per rank are checked group-wide after DeepEP's kernel (see the module docstring)."""
    why = _environment_reason(group, x.device)
    if why:
        return why
    from hal import distributed
    mod = _module()[0]
    W = distributed.get_ep_group(group).world_size
    H, k, E = x.shape[1], topk_ids.shape[1], num_experts
    sizes = hidden_sizes(mod)
    words = payload_words(x.dtype, H, x_scale is not None)
    if row_width(words, sizes) is None:
        what = f"{H} x {str(x.dtype).replace('torch.', '')}" + (" + its 1x128 fp32 scales" if x_scale is not None
                                                                 else "")
        return (f"a token's payload is {words} bf16 words ({what}): DeepEP's low-latency kernels take rows of at "
                f"most {sizes[-1]} (hidden sizes {', '.join(map(str, sizes))})")
    if k > LL_MAX_TOPK:
        return f"k={k}: DeepEP's low-latency kernels take top-k <= {LL_MAX_TOPK}"
    idx_t = getattr(mod, "topk_idx_t", torch.int64)
    if E - 1 > torch.iinfo(idx_t).max:
        return f"num_experts={E}: expert ids do not fit deep_ep.topk_idx_t ({str(idx_t).replace('torch.', '')})"
    sms = _device_sms(x.device)
    if sms is not None and math.ceil(E / sms) > LL_MAX_WARP_GROUPS:
        return (f"num_experts={E}: DeepEP's low-latency dispatch takes at most {LL_MAX_WARP_GROUPS} experts per SM "
                f"({sms} SMs here)")
    return _max_tokens_reason(W)


# --- the buffer per group --------------------------------------------------------------------------------------

@dataclasses.dataclass
class _State:
    buffer: Any
    process_group: Any
    max_tokens: int
    num_experts: int
    rdma_bytes: int


def _state(ep, mod, num_experts: int, widths: tuple) -> _State:
    """The group's deep_ep.Buffer, created (or re-created, bigger) on the calls that need it. Every
    rank of the group gets here on the same call: the decision depends only on shared values."""
    import torch.distributed as dist
    t = max_tokens()
    need = max(mod.Buffer.get_low_latency_rdma_size_hint(t, w, ep.world_size, num_experts) for w in widths)
    st = _STATES.get(ep.name)
    if (st is not None and st.process_group is ep.process_group and st.max_tokens == t
            and st.num_experts == num_experts and st.rdma_bytes >= need):
        return st
    agreed = [None] * ep.world_size
    dist.all_gather_object(agreed, (t, num_experts, need), group=ep.process_group)
    if len({a[:2] for a in agreed}) > 1:
        raise RuntimeError(f"hal-cuda DeepEP: the ranks of group {ep.name!r} disagree on ({MAX_TOKENS_ENV}, "
                           f"num_experts): {[a[:2] for a in agreed]} (DeepEP needs the same value on every rank)")
    need = max(a[2] for a in agreed)
    if st is not None:
        release(ep.name)
    buffer = mod.Buffer(ep.process_group, num_nvl_bytes=0, num_rdma_bytes=need, low_latency_mode=True,
                        num_qps_per_rank=num_experts // ep.world_size, explicitly_destroy=True)
    st = _State(buffer, ep.process_group, t, num_experts, need)
    _STATES[ep.name] = st
    return st


# --- the kept dispatches ---------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Handle:
    """What the combine needs from one dispatch; ``state`` None: it ran on torch.distributed."""

    source: torch.Tensor                  # [R, 3] int32, as returned (the contract's order)
    state: Optional[_State] = None
    positions: Optional[torch.Tensor] = None   # row i came from DeepEP's recv_x.view(-1, width)[positions[i]]
    topk: Optional[torch.Tensor] = None        # [T, k] topk_idx_t, the DeepEP ids this rank dispatched
    deep_handle: Optional[tuple] = None
    tokens: int = 0
    duplicate: bool = False                    # some token of the group named one expert twice


_RESOLVED: list = [None]      # (group, recv_source, handle, positions) of the last lookup


def _keep(group: str, h: _Handle) -> None:
    kept = HANDLES.setdefault(group, [])
    kept.append(h)
    del kept[:-KEPT_HANDLES]
    _RESOLVED[0] = None


def remember_torch_dispatch(group: str, source: torch.Tensor) -> None:
    """A dispatch of ``group`` ran on torch.distributed: its combine must too (no-op for groups
    that never used DeepEP)."""
    if group in HANDLES:
        _keep(group, _Handle(source))


def _keys(source: torch.Tensor) -> torch.Tensor:
    s = source.long()
    return (s[:, 0] << 42) | (s[:, 1] << 21) | s[:, 2]


def _resolve(group: str, recv_source: torch.Tensor):
    """(handle, positions) of the kept dispatch that returned ``recv_source``: the same tensor (no
    device read), else equal values, else the same rows in another order; (None, None) if none."""
    last = _RESOLVED[0]
    if last is not None and last[0] == group and last[1] is recv_source:
        return last[2], last[3]
    kept = HANDLES.get(group) or []
    found = next(((h, h.positions) for h in reversed(kept) if h.source is recv_source), None)
    if found is None:
        R = recv_source.shape[0]
        for h in reversed(kept):
            if tuple(h.source.shape) != tuple(recv_source.shape):
                continue
            src = recv_source.to(device=h.source.device, dtype=torch.int64)
            in_range = bool(((src >= 0) & (src < 2 ** 21)).all()) if R else True
            if not in_range:
                break
            if torch.equal(src, h.source.long()):
                found = (h, h.positions)
                break
            a, b = torch.sort(_keys(h.source)), torch.sort(_keys(src))
            if torch.equal(a.values, b.values):
                where = torch.empty_like(a.indices)
                where[b.indices] = a.indices                      # row i of recv_source is row where[i] of h.source
                found = (h, None if h.positions is None else h.positions[where])
                break
    found = found or (None, None)
    _RESOLVED[0] = (group, recv_source, *found)
    return found


def deepep_combine_unsupported_reason(expert_out, recv_source, topk_weights, *, group) -> Optional[str]:
    """None when this ``ep_combine`` call can run on DeepEP's low-latency combine, else why not."""
    why = _environment_reason(group, expert_out.device)
    if why:
        return why
    h, _ = _resolve(group, recv_source)
    if h is None or h.state is None:
        return (f"{NOT_FROM_DEEPEP} (or is not among the group's last {KEPT_HANDLES} dispatches): DeepEP's combine "
                "returns rows along its dispatch's path")
    if _STATES.get(group) is not h.state:
        return "the group's DeepEP buffer was re-created since these rows' dispatch"
    if expert_out.dtype != WORD:
        return (f"expert outputs in {str(expert_out.dtype).replace('torch.', '')}: DeepEP's low-latency combine takes "
                "and returns bf16, so they would be rounded to bf16 before the weighted sum (beyond the contract's "
                "budget)")
    mod, H, st = _module()[0], expert_out.shape[1], h.state
    width = row_width(H, hidden_sizes(mod))
    if width is None:
        return f"H={H}: DeepEP's low-latency combine takes hidden sizes up to {hidden_sizes(mod)[-1]}"
    from hal import distributed
    W = distributed.get_ep_group(group).world_size
    need = mod.Buffer.get_low_latency_rdma_size_hint(st.max_tokens, width, W, st.num_experts)
    if need > st.rdma_bytes:
        return (f"H={H}: the group's DeepEP buffer ({st.rdma_bytes} bytes) was sized for narrower rows at dispatch "
                f"(this combine needs {need})")
    if h.duplicate:
        return ("a token of this dispatch (on some rank) names one expert in two slots: DeepEP's combine keeps one "
                "row per (expert, token), so both slots would get the same row back")
    return None


# --- reporting ---------------------------------------------------------------------------------------------

NOT_FROM_DEEPEP = "these rows' ep_dispatch did not run on DeepEP"
OVERFLOW = "more tokens on a rank than DeepEP's buffer takes"


def record(op: str, group: str, path: str, reason: Optional[str] = None, device: Optional[torch.device] = None):
    """Note which path ``op`` took (``LAST``, ``COUNTS``). A call declined for its shapes while
    DeepEP serves the group warns once per kind of reason (not for the environment: deep_ep
    missing, one process, CPU tensors; nor for a combine following a torch.distributed dispatch)."""
    LAST[(group, op)] = (path, reason)
    COUNTS[(op, path)] += 1
    if reason is None or reason.startswith(NOT_FROM_DEEPEP):
        return
    if device is not None and _environment_reason(group, device) is not None:
        return
    key = (op, OVERFLOW if reason.startswith(OVERFLOW) else reason)
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(f"hal-cuda: {op} took the torch.distributed path instead of DeepEP: {reason}", RuntimeWarning,
                      stacklevel=3)


def deepep_note(device_type: str = "cuda") -> str:
    """Whether hal-cuda's EP ops use DeepEP, and why not (for the capability note); imports
    deep_ep once. ``device_type``: the backend instance's ("cpu" under the interpreter)."""
    if os.environ.get(DISABLE_ENV, "") == "0":
        return f"DeepEP not used: disabled ({DISABLE_ENV}=0)"
    mod, err = _module()
    if mod is None:
        return f"DeepEP not used: deep_ep is not importable ({err})"
    version = getattr(mod, "__version__", "1.x")
    want = getattr(mod, "TENSOR_DEVICE", "cuda")
    if device_type != want:
        return (f"DeepEP not used: deep_ep {version} is importable, but its kernels take {want} tensors and this "
                f"instance runs on {device_type} tensors")
    sizes = hidden_sizes(mod)
    try:
        tokens = f"at most {max_tokens()} tokens per rank ({MAX_TOKENS_ENV})"
    except ValueError:
        tokens = f"{MAX_TOKENS_ENV} invalid: every call declined"
    return (f"DeepEP low-latency kernels (deep_ep {version}) for calls that fit: payload rows of at most {sizes[-1]} "
            f"bf16 words (bit-exact, padded to hidden sizes {', '.join(map(str, sizes))}), top-k <= {LL_MAX_TOPK}, "
            f"{tokens}, bf16 expert outputs for the combine, an NCCL group; one host read per dispatch (the row "
            "counts, after DeepEP's kernel), none per combine; other calls take torch.distributed")


# --- dispatch ----------------------------------------------------------------------------------------------

def _deep_expert_ids(num_experts: int, world: int, expert_map, device) -> Optional[torch.Tensor]:
    """[E] int64: DeepEP's id of each expert, owner * L + its rank among its owner's experts (None
    for the contiguous default, where they are the same)."""
    if expert_map is None:
        return None
    owner = expert_map.to(device=device, dtype=torch.int64)
    order = torch.sort(owner, stable=True).indices                 # by owner, then global id
    deep = torch.empty_like(owner)
    deep[order] = torch.arange(num_experts, device=device)
    return deep


def _pack(x: torch.Tensor, x_scale: Optional[torch.Tensor], width: int) -> torch.Tensor:
    """[n, width] bf16: x's rows as they are (bf16 of a supported width), else their bytes and
    their scales' bytes, zero-padded."""
    if x.dtype == WORD and x_scale is None and x.shape[1] == width:
        return x.contiguous()
    parts = [x.contiguous().view(torch.uint8)]
    if x_scale is not None:
        parts.append(x_scale.to(torch.float32).contiguous().view(torch.uint8))
    out = torch.zeros(x.shape[0], 2 * width, dtype=torch.uint8, device=x.device)
    off = 0
    for p in parts:
        out[:, off:off + p.shape[1]] = p
        off += p.shape[1]
    return out.view(WORD)


def _unpack(rows: torch.Tensor, dtype: torch.dtype, H: int, scaled: bool):
    """recv_x [R, H] and recv_scale [R, ceil(H/128) or 0] from packed bf16 rows."""
    R = rows.shape[0]
    if dtype == WORD and not scaled and rows.shape[1] == H:
        return rows, rows.new_empty(R, 0, dtype=torch.float32)
    b = rows.view(torch.uint8)
    n = H * torch.empty(0, dtype=dtype).element_size()
    own = dict(memory_format=torch.contiguous_format)           # each output in its own memory
    recv_x = b[:, :n].clone(**own).view(dtype)
    if not scaled:
        return recv_x, rows.new_empty(R, 0, dtype=torch.float32)
    c = -(-H // 128)
    return recv_x, b[:, n:n + 4 * c].clone(**own).view(torch.float32)


def _gather(ep, t: torch.Tensor) -> torch.Tensor:
    """[W, *t.shape]: every rank's ``t`` (a fixed-size all-gather on the tensors' device)."""
    import torch.distributed as dist
    out = t.new_empty((ep.world_size * t.shape[0],) + tuple(t.shape[1:]))
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, t.contiguous(), group=ep.process_group)
    return out.view(ep.world_size, *t.shape)


def dispatch(x, topk_ids, *, num_experts, group, x_scale=None, expert_map=None):
    """``ep_dispatch`` on DeepEP (after :func:`deepep_unsupported_reason` said None). Returns the
    contract's outputs (a tuple), or the reason (a str) when some rank of the group has more tokens
    than the buffer's maximum: every rank then returns it, and the caller takes the
    torch.distributed path."""
    from hal import distributed
    mod = _module()[0]
    ep = distributed.get_ep_group(group)
    W, rank, dev = ep.world_size, ep.rank, x.device
    T, H = x.shape
    k, E = topk_ids.shape[1], num_experts
    L = E // W
    sizes = hidden_sizes(mod)
    scaled = x_scale is not None
    width = row_width(payload_words(x.dtype, H, scaled), sizes)
    combine_width = row_width(H, sizes)                     # bf16 expert outputs of the same H
    st = _state(ep, mod, E, tuple(w for w in (width, combine_width) if w is not None))
    maxt = st.max_tokens
    n = min(T, maxt)
    # DeepEP's expert ids: -1 stays -1
    ids = topk_ids.to(torch.int64)
    relabel = _deep_expert_ids(E, W, expert_map, dev)
    deep = ids if relabel is None else torch.where(ids >= 0, relabel[ids.clamp(min=0)], -1)
    # the routing's all-gather: T, then the first max_tokens tokens' ids (-1 padded)
    meta = torch.full((1 + maxt * k,), -1, dtype=torch.int32, device=dev)
    meta[0] = T
    meta[1:1 + n * k] = deep[:n].reshape(-1).to(torch.int32)
    routing = _gather(ep, meta)
    topk = deep[:n].to(getattr(mod, "topk_idx_t", torch.int64)).contiguous()
    recv, counts, handle, _event, _hook = st.buffer.low_latency_dispatch(
        _pack(x[:n], x_scale[:n] if scaled else None, width), topk, maxt, E, use_fp8=False, async_finish=False,
        return_recv_hook=False)
    tokens_all = routing[:, 0]
    ids_all = routing[:, 1:].view(W, maxt, k)
    srt = torch.sort(ids_all, dim=2).values
    dup = ((srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)).any() if k > 1 else torch.zeros((), dtype=torch.bool,
                                                                                                  device=dev)
    # the one host read: rows per local expert, every rank's T, and whether a token names an expert twice
    host = torch.cat([counts.to(torch.int64), tokens_all.to(torch.int64), dup.to(torch.int64).view(1)]).tolist()
    per_expert, per_rank, duplicate = host[:L], host[L:L + W], bool(host[-1])
    if max(per_rank) > maxt:
        return (f"{OVERFLOW} ({MAX_TOKENS_ENV}={maxt}; tokens per rank {per_rank}): every rank redid the dispatch "
                "on torch.distributed")
    R = sum(per_expert)
    span = W * maxt
    cnt = counts.to(torch.int64)
    local = torch.repeat_interleave(torch.arange(L, device=dev), cnt, output_size=R)
    first = torch.cumsum(cnt, 0) - cnt
    pos = torch.arange(R, device=dev) - first[local]
    flat = local * span + pos                                         # row in recv_x.view(-1, width)
    token = handle[0].reshape(-1)[flat].to(torch.int64)
    # each source rank's rows form one range of its expert's block; the ranges, in begin order, tile it
    lr = handle[1].to(torch.int64)
    begin, num = lr >> 32, lr & 0xFFFFFFFF
    pair_order = torch.argsort((torch.arange(L, device=dev)[:, None] * (span + 1) + begin).reshape(-1), stable=True)
    src = torch.repeat_interleave(torch.arange(W, device=dev).repeat(L)[pair_order], num.reshape(-1)[pair_order],
                                  output_size=R)
    # the contract's order: local expert, source rank, token, then slot
    key = (local * W + src) * maxt + token
    perm = torch.argsort(key, stable=True)
    local, src, token, flat, key = local[perm], src[perm], token[perm], flat[perm], key[perm]
    # the slot: the n-th row of one (expert, source, token) takes the n-th slot naming that expert
    idx = torch.arange(R, device=dev)
    new = torch.ones(R, dtype=torch.bool, device=dev)
    new[1:] = key[1:] != key[:-1]
    nth = idx - torch.cummax(torch.where(new, idx, 0), 0).values if R else idx
    match = ids_all[src, token].to(torch.int64) == (rank * L + local)[:, None]
    hit = match & ((torch.cumsum(match.to(torch.int32), 1) - 1) == nth[:, None])
    slot = hit.to(torch.int32).argmax(1) if R else idx         # the first (only) hit
    rows = recv.reshape(-1, width)[flat]
    recv_x, recv_scale = _unpack(rows, x.dtype, H, scaled)
    source = torch.stack([src, token, slot], 1).to(torch.int32)
    _keep(group, _Handle(source, st, flat, topk, handle, T, duplicate))
    return recv_x, recv_scale, counts.to(torch.int32), source


# --- combine -----------------------------------------------------------------------------------------------

def combine(expert_out, recv_source, topk_weights, *, group):
    """``ep_combine`` on DeepEP (after :func:`deepep_combine_unsupported_reason` said None)."""
    from hal import distributed
    from hal.errors import ContractError
    h, positions = _resolve(group, recv_source)
    st = h.state
    k = h.topk.shape[1]
    if tuple(topk_weights.shape) != (h.tokens, k):
        # a caller error on this rank alone: raise here rather than take a path the other ranks do not take
        raise ContractError("ep_combine", "topk_weights", f"this rank's routing weights of the dispatch [T={h.tokens}, "
                            f"k={k}]", f"shape {tuple(topk_weights.shape)}")
    H = expert_out.shape[1]
    W = distributed.get_ep_group(group).world_size
    L, span = st.num_experts // W, W * st.max_tokens
    width = row_width(H, hidden_sizes(_module()[0]))
    # DeepEP reads only the rows inside its layout ranges, i.e. exactly ``positions``; the padding
    # columns of those rows are left as they are and their sums are cut off below
    x = torch.empty(L, span, width, dtype=WORD, device=expert_out.device)
    flat = x.view(L * span, width)
    if width == H:
        flat.index_copy_(0, positions, expert_out)
    else:
        flat[positions, :H] = expert_out
    combined, _event, _hook = st.buffer.low_latency_combine(x, h.topk, topk_weights.to(torch.float32).contiguous(),
                                                            h.deep_handle, async_finish=False, return_recv_hook=False)
    return combined if width == H else combined[:, :H].contiguous()
