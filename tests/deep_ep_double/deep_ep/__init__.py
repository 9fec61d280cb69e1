"""A CPU test double of DeepEP's Python module ``deep_ep`` (github.com/deepseek-ai/DeepEP), for
HAL's tests only: ``tests/test_cuda_deepep.py`` puts ``tests/deep_ep_double`` on ``sys.path``;
nothing else does.

It emulates the low-latency subset of ``deep_ep.Buffer`` (the V1 API, kept as
``deep_ep/buffers/legacy.py`` in V2) over ``torch.distributed`` with CPU tensors (gloo), so that
hal-cuda's DeepEP adapter can run under the Triton interpreter. It was written from DeepEP's own
text, not from HAL's reference:

- the Python wrapper and its docstrings: ``deep_ep/buffers/legacy.py`` at commit
  dd758caf451848bd150e1046af3d0a73e5fff38d (V2.1.0) and ``deep_ep/buffer.py`` at tag v1.2.1
  (9af0e0d0e74f3577af1979c9b9e1ac2cad0104ee);
- the host assertions of ``low_latency_dispatch`` / ``low_latency_combine`` in
  ``csrc/legacy/buffer.hpp``, the kernel launch checks of ``csrc/kernels/legacy/internode_ll.cu``
  (``kNumMaxTopK = 11``, ``SWITCH_HIDDEN`` of ``csrc/kernels/legacy/launch.cuh``, the
  ``num_rc_per_pe >= num_local_experts`` QP check) and the buffer layout of
  ``csrc/legacy/config.hpp`` (``LowLatencyLayout``, ``get_low_latency_rdma_size_hint``), all at
  dd758caf;
- ``tests/legacy/test_low_latency.py`` (dd758caf): ``recv_count[i]`` valid rows per local
  expert, ``handle[0][i][:count]`` the source token index of each row, ``handle[1][i][s]`` the
  (begin << 32 | count) range of source rank s, and the combine as
  ``sum over valid k of topk_weights[t, k] * row`` in bf16.

What the double does on purpose, to catch an adapter relying on what DeepEP does not promise:
- the per-source ranges inside an expert's block come in a scrambled order (the real receiver
  takes them by ``atomicAdd`` in arrival order), and so do the rows inside a range (the sender
  takes slots by ``atomicAdd`` across warps and SMs);
- rows past ``recv_count`` hold garbage, and so do their ``src_info`` entries;
- the combine stores one row per (global expert, source token) at the source, as the real
  kernel's receive buffer does (a token naming one expert twice: the last row written wins),
  and fails loudly when a slot's row never arrived (the real kernel would read a stale slot);
- every argument the real API rejects (dtype, shape, contiguity, hidden size, top-k, tokens
  above ``num_max_dispatch_tokens_per_rank``, buffer too small, QPs, ranks disagreeing on
  ``num_max_dispatch_tokens_per_rank`` or calling different kernels) raises.

The weighted sum adds ``float(row) * weight`` in fp32, slot by slot, and rounds once to bf16;
the real kernel does the same arithmetic, possibly contracted into FMAs (not modelled).
Not emulated (raise NotImplementedError): FP8 casting (``use_fp8=True``), LogFMT, zero-copy
combine, the normal (high-throughput) kernels, shrink mode.
"""
from __future__ import annotations

import collections
import os
import random
from typing import Callable, Optional, Tuple

import torch
import torch.distributed as dist

__version__ = "2.1.0"            # the version whose kernels this double follows (dd758caf)
TENSOR_DEVICE = "cpu"           # what this double runs on (the real module: CUDA tensors)
topk_idx_t = torch.int64        # deep_ep.topk_idx_t (EP_NUM_TOPK_IDX_BITS defaults to 64)

LOW_LATENCY_HIDDEN = (2048, 2560, 3072, 4096, 5120, 6144, 7168, 8192)    # SWITCH_HIDDEN at dd758caf
NUM_MAX_TOPK = 11                                                       # kNumMaxTopK in internode_ll.cu
NUM_WORKSPACE_BYTES = 32 * 1024 * 1024                                  # LEGACY_NUM_WORKSPACE_BYTES
BUFFER_ALIGNMENT_BYTES = 128                                            # LEGACY_NUM_BUFFER_ALIGNMENT_BYTES

CALLS: collections.Counter = collections.Counter()     # entry point -> calls in this process (for the tests)


def _host_assert(cond: bool, what: str) -> None:
    """EP_HOST_ASSERT: the real module raises RuntimeError from C++."""
    if not cond:
        raise RuntimeError(f"deep_ep (test double): assertion failed: {what}")


def _check_torch_deterministic() -> None:
    assert not (torch.are_deterministic_algorithms_enabled()
                and getattr(torch.utils.deterministic, "fill_uninitialized_memory", False)), \
        "deep_ep: deterministic algorithms with fill_uninitialized_memory are not supported"


def _layout_bytes(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int, num_experts: int) -> int:
    """LowLatencyLayout(...).total_bytes of csrc/legacy/config.hpp."""
    num_scales = hidden // 128
    _host_assert(num_scales * 4 <= hidden, "num_scales * sizeof(float) <= hidden")
    dispatch_msg = 16 + max(hidden * 2, hidden + num_scales * 4)
    combine_msg = num_scales * 4 + hidden * 2
    t, e = num_max_dispatch_tokens_per_rank, num_experts
    send = max(t * dispatch_msg, e * t * combine_msg)
    recv = max(e * t * dispatch_msg, e * t * combine_msg)
    signaling = -(-(e * 4) // 128) * 128
    return 2 * send + 2 * recv + 2 * signaling


class EventOverlap:
    """deep_ep.EventOverlap: nothing to wait for on the CPU."""

    def __init__(self, event=None, extra_tensors=None) -> None:
        self.event = event
        self.extra_tensors = extra_tensors

    def current_stream_wait(self, release_handle: bool = False) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


class Buffer:
    """deep_ep.Buffer, low-latency mode only (see the module docstring)."""

    num_sms: int = 20

    def __init__(self, group: Optional[dist.ProcessGroup], num_nvl_bytes: int = 0, num_rdma_bytes: int = 0,
                 low_latency_mode: bool = False, num_qps_per_rank: int = 24,
                 allow_nvlink_for_low_latency_mode: bool = True, allow_mnnvl: bool = False,
                 explicitly_destroy: bool = False, enable_shrink: bool = False, comm=None) -> None:
        CALLS["Buffer"] += 1
        if group is None:
            raise ValueError("Either 'group' or 'comm' must be provided.")
        _host_assert(isinstance(group, dist.ProcessGroup), "group must be a torch.distributed ProcessGroup")
        _host_assert(not enable_shrink, "shrink mode is not emulated")
        self.rank, self.group, self.group_size = group.rank(), group, group.size()
        self.num_nvl_bytes, self.num_rdma_bytes = int(num_nvl_bytes), int(num_rdma_bytes)
        self.low_latency_mode = low_latency_mode
        self.explicitly_destroy = explicitly_destroy
        self.num_qps_per_rank = num_qps_per_rank
        _host_assert(num_qps_per_rank > 0, "num_qps_per_rank > 0")
        self.nvshmem_qp_depth = int(os.environ.get("NVSHMEM_QP_DEPTH", "1024"))
        # the constructor's all_gather_object handshakes (device ids, IPC handles, NVSHMEM ids): every
        # rank of the group must build its buffer at the same time; the RDMA buffer is symmetric
        sizes = [None] * self.group_size
        dist.all_gather_object(sizes, (self.num_nvl_bytes, self.num_rdma_bytes, low_latency_mode), group)
        _host_assert(len(set(sizes)) == 1, f"every rank must allocate the same buffer sizes, got {sizes}")
        self._sequence = 0                 # low-latency kernels launched so far (the odd/even buffer index)
        self._alive = True
        self._rng = random.Random(1234 + self.rank)

    def destroy(self) -> None:
        assert self.explicitly_destroy, "`explicitly_destroy` flag must be set"
        CALLS["destroy"] += 1
        self._alive = False

    @staticmethod
    def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int,
                                       num_experts: int) -> int:
        num_bytes = _layout_bytes(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts)
        return ((num_bytes + BUFFER_ALIGNMENT_BYTES) // BUFFER_ALIGNMENT_BYTES) * BUFFER_ALIGNMENT_BYTES

    # --- the kernels' shared checks and transport ------------------------------------------------------------

    def _launch(self, kind: str, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int,
                num_topk: int, payload: list) -> list:
        """Kernel-level checks, then one exchange: ``payload[d]`` goes to rank d; returns what every
        rank sent to this one, by source rank. All ranks must be in the same kernel with the same
        static arguments (the real kernels would read each other's buffers with the wrong layout)."""
        _host_assert(self._alive, "the buffer was destroyed")
        _host_assert(self.low_latency_mode, "low_latency_mode")
        _host_assert(hidden in LOW_LATENCY_HIDDEN, f"Unsupported hidden ({hidden})")
        _host_assert(num_topk <= NUM_MAX_TOPK, f"num_topk <= kNumMaxTopK ({num_topk} > {NUM_MAX_TOPK})")
        _host_assert(num_experts * 4 * 2 <= NUM_WORKSPACE_BYTES, "num_experts * sizeof(int) * 2 <= workspace")
        _host_assert(num_experts % self.group_size == 0, "num_experts % num_ranks == 0")
        local = num_experts // self.group_size
        _host_assert(self.num_qps_per_rank >= local, f"QPs per rank ({self.num_qps_per_rank}) >= local experts "
                     f"({local}) (device assertion ibgda num_rc_per_pe >= num_local_experts)")
        _host_assert(_layout_bytes(num_max_dispatch_tokens_per_rank, hidden, self.group_size, num_experts)
                     <= self.num_rdma_bytes, "layout.total_bytes <= num_rdma_bytes")
        header = (kind, self._sequence, num_max_dispatch_tokens_per_rank, hidden, num_experts)
        gathered = [None] * self.group_size
        dist.all_gather_object(gathered, (header, payload), self.group)
        headers = [h for h, _ in gathered]
        _host_assert(len(set(headers)) == 1, "all ranks must launch the same low-latency kernel with the same "
                     f"num_max_dispatch_tokens_per_rank / hidden / num_experts: {headers}")
        self._sequence += 1
        return [p[self.rank] for _, p in gathered]

    # --- low-latency dispatch ------------------------------------------------------------------------------

    def low_latency_dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, num_max_dispatch_tokens_per_rank: int,
                             num_experts: int, cumulative_local_expert_recv_stats: Optional[torch.Tensor] = None,
                             dispatch_wait_recv_cost_stats: Optional[torch.Tensor] = None, use_fp8: bool = True,
                             round_scale: bool = False, use_ue8m0: bool = False, async_finish: bool = False,
                             return_recv_hook: bool = False) -> Tuple:
        """Returns (packed_recv_x [L, W * max_tokens, hidden] bf16, packed_recv_count [L] int32,
        handle (src_info, layout_range, max_tokens, hidden, num_experts), event, hook)."""
        CALLS["low_latency_dispatch"] += 1
        _check_torch_deterministic()
        maxt, W = num_max_dispatch_tokens_per_rank, self.group_size
        assert self.nvshmem_qp_depth >= (maxt + 1) * 2
        _host_assert(x.dim() == 2 and x.is_contiguous() and x.dtype == torch.bfloat16,
                     "x.dim() == 2 and x.is_contiguous() and x.scalar_type() == torch::kBFloat16")
        _host_assert(x.device.type == TENSOR_DEVICE, f"x on {x.device} (this double takes {TENSOR_DEVICE} tensors)")
        _host_assert(x.size(1) % 8 == 0 and x.size(1) % 128 == 0, "x.size(1) % sizeof(int4) == 0 and % 128 == 0")
        _host_assert(topk_idx.dim() == 2 and topk_idx.is_contiguous(), "topk_idx.dim() == 2 and contiguous")
        _host_assert(x.size(0) == topk_idx.size(0) and x.size(0) <= maxt,
                     f"x.size(0) == topk_idx.size(0) and x.size(0) <= num_max_dispatch_tokens_per_rank "
                     f"({x.size(0)}, {topk_idx.size(0)}, {maxt})")
        _host_assert(topk_idx.dtype == topk_idx_t, f"topk_idx.scalar_type() == topk_idx_t (got {topk_idx.dtype})")
        _host_assert(num_experts % W == 0, "num_experts % num_ranks == 0")
        L = num_experts // W
        if cumulative_local_expert_recv_stats is not None:
            s = cumulative_local_expert_recv_stats
            _host_assert(s.dtype == torch.int32 and s.dim() == 1 and s.is_contiguous() and s.size(0) == L,
                         "cumulative_local_expert_recv_stats: [num_local_experts] int32")
        _host_assert(dispatch_wait_recv_cost_stats is None, "dispatch_wait_recv_cost_stats is not emulated")
        _host_assert(not (async_finish and return_recv_hook), "not (async and return_recv_hook)")
        _host_assert((W * maxt) % 4 == 0, "TMA requires the number of tokens to be multiple of 4")
        if use_fp8:
            _host_assert(x.size(1) % 512 == 0, "hidden % 512 == 0")
            _host_assert(not use_ue8m0 or round_scale, "UE8M0 SF requires `round_scale=True`")
            raise NotImplementedError("deep_ep test double: the FP8 cast (use_fp8=True) is not emulated")
        T, H, K = x.size(0), x.size(1), topk_idx.size(1)
        ids = topk_idx.long()
        _host_assert(bool(((ids >= -1) & (ids < num_experts)).all()), "topk_idx values in [-1, num_experts)")
        # sender: one message per (token, slot) with an expert, to the expert's rank (a token naming an
        # expert twice sends two messages, both with its index)
        payload = [[] for _ in range(W)]
        for t in range(T):
            for k in range(K):
                e = int(ids[t, k])
                if e >= 0:
                    payload[e // L].append((e % L, t, x[t].clone()))
        for msgs in payload:
            self._rng.shuffle(msgs)                                   # slots taken by atomicAdd: any order
        arrived = self._launch("dispatch", maxt, H, num_experts, K, payload)
        # receiver: per local expert, the source ranks' ranges in arrival order
        packed_recv_x = torch.randn(L, W * maxt, H, generator=torch.Generator().manual_seed(self._sequence)).to(
            torch.bfloat16) * 1e3                                     # garbage past the valid rows
        src_info = torch.randint(0, max(maxt, 1), (L, W * maxt), dtype=torch.int32)      # garbage too
        layout_range = torch.zeros(L, W, dtype=torch.int64)
        count = torch.zeros(L, dtype=torch.int32)
        for i in range(L):
            sources = list(range(W))
            self._rng.shuffle(sources)
            begin = 0
            for s in sources:
                rows = [(t, row) for (j, t, row) in arrived[s] if j == i]
                _host_assert(len(rows) <= maxt, "a source sent more tokens to one expert than its slots")
                layout_range[i, s] = (begin << 32) | len(rows)
                for n, (t, row) in enumerate(rows):
                    packed_recv_x[i, begin + n] = row
                    src_info[i, begin + n] = t
                begin += len(rows)
            count[i] = begin
        if cumulative_local_expert_recv_stats is not None:
            cumulative_local_expert_recv_stats += count
        handle = (src_info, layout_range, maxt, H, num_experts)
        hook: Optional[Callable] = (lambda: None) if return_recv_hook else None
        return packed_recv_x, count, handle, EventOverlap(), hook

    # --- low-latency combine -------------------------------------------------------------------------------

    def low_latency_combine(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, handle: tuple,
                            use_logfmt: bool = False, zero_copy: bool = False, async_finish: bool = False,
                            return_recv_hook: bool = False, out: Optional[torch.Tensor] = None,
                            combine_wait_recv_cost_stats: Optional[torch.Tensor] = None) -> Tuple:
        """Returns (combined_x [num_combined_tokens, hidden] bf16, event, hook): every valid row of
        x goes back to its source rank, which adds ``topk_weights[t, k] * row`` over its valid k."""
        CALLS["low_latency_combine"] += 1
        _check_torch_deterministic()
        src_info, layout_range, maxt, _hidden, num_experts = handle
        assert self.nvshmem_qp_depth >= (maxt + 1) * 2
        W = self.group_size
        L = num_experts // W
        _host_assert(x.dim() == 3 and x.is_contiguous() and x.dtype == torch.bfloat16,
                     "x.dim() == 3 and x.is_contiguous() and x.scalar_type() == torch::kBFloat16")
        _host_assert(x.device.type == TENSOR_DEVICE, f"x on {x.device} (this double takes {TENSOR_DEVICE} tensors)")
        _host_assert(x.size(0) == L, "x.size(0) == num_experts / num_ranks")
        _host_assert(x.size(1) == W * maxt, "x.size(1) == num_ranks * num_max_dispatch_tokens_per_rank")
        _host_assert(x.size(2) % 8 == 0 and x.size(2) % 128 == 0, "x.size(2) % sizeof(int4) == 0 and % 128 == 0")
        _host_assert(topk_idx.dim() == 2 and topk_idx.is_contiguous(), "topk_idx.dim() == 2 and contiguous")
        _host_assert(tuple(topk_idx.shape) == tuple(topk_weights.shape), "topk_idx and topk_weights shapes")
        _host_assert(topk_idx.dtype == topk_idx_t, f"topk_idx.scalar_type() == topk_idx_t (got {topk_idx.dtype})")
        _host_assert(topk_weights.dim() == 2 and topk_weights.is_contiguous(), "topk_weights 2-D contiguous")
        _host_assert(topk_weights.size(0) <= maxt, "topk_weights.size(0) <= num_max_dispatch_tokens_per_rank")
        _host_assert(topk_weights.dtype == torch.float32, "topk_weights.scalar_type() == torch::kFloat32")
        _host_assert(src_info.dim() == 2 and src_info.is_contiguous() and src_info.dtype == torch.int32
                     and src_info.size(0) == x.size(0), "src_info: [num_local_experts, ...] int32 contiguous")
        _host_assert(layout_range.dim() == 2 and layout_range.is_contiguous() and layout_range.dtype == torch.int64
                     and tuple(layout_range.shape) == (L, W), "layout_range: [num_local_experts, num_ranks] int64")
        _host_assert(combine_wait_recv_cost_stats is None, "combine_wait_recv_cost_stats is not emulated")
        _host_assert(not (async_finish and return_recv_hook), "not (async and return_recv_hook)")
        _host_assert(not (zero_copy and use_logfmt), "not (zero_copy and use_logfmt)")
        if use_logfmt or zero_copy:
            raise NotImplementedError("deep_ep test double: LogFMT and zero-copy combine are not emulated")
        T, K, H = topk_weights.size(0), topk_weights.size(1), x.size(2)
        if out is not None:
            _host_assert(out.dim() == 2 and out.is_contiguous() and tuple(out.shape) == (T, H)
                         and out.dtype == x.dtype, "out: [num_combined_tokens, hidden], x's dtype, contiguous")
        # sender: the rows of each (local expert, destination rank) range go home
        payload = [[] for _ in range(W)]
        for i in range(L):
            for s in range(W):
                lr = int(layout_range[i, s])
                begin, n = lr >> 32, lr & 0xFFFFFFFF
                for p in range(begin, begin + n):
                    payload[s].append((self.rank * L + i, int(src_info[i, p]), x[i, p].clone()))
        for msgs in payload:
            self._rng.shuffle(msgs)
        arrived = self._launch("combine", maxt, H, num_experts, K, payload)
        # receiver: one buffer slot per (global expert, token), then the weighted sum in slot order
        slots = {}
        for msgs in arrived:
            for e, t, row in msgs:
                _host_assert(0 <= t < maxt, f"a returning row names token {t} (outside the buffer's {maxt} slots)")
                slots[(e, t)] = row
        ids = topk_idx.long()
        acc = torch.zeros(T, H, dtype=torch.float32)
        for t in range(T):
            for k in range(K):
                e = int(ids[t, k])
                if e < 0:
                    continue
                row = slots.get((e, t))
                if row is None:
                    raise RuntimeError(f"deep_ep (test double): token {t} slot {k} (expert {e}) got no row back: "
                                       "the real kernel would read a stale buffer slot")
                acc[t] = acc[t] + topk_weights[t, k] * row.float()
        combined = acc.to(torch.bfloat16)
        if out is not None:
            out.copy_(combined)
            combined = out
        hook: Optional[Callable] = (lambda: None) if return_recv_hook else None
        return combined, EventOverlap(), hook

    # --- not emulated --------------------------------------------------------------------------------------

    def get_next_low_latency_combine_buffer(self, handle: object):
        raise NotImplementedError("deep_ep test double: zero-copy combine buffers are not emulated")

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        CALLS["clean_low_latency_buffer"] += 1

    def get_dispatch_layout(self, *args, **kwargs):
        raise NotImplementedError("deep_ep test double: the normal (high-throughput) kernels are not emulated")

    def dispatch(self, *args, **kwargs):
        raise NotImplementedError("deep_ep test double: the normal (high-throughput) kernels are not emulated")

    def combine(self, *args, **kwargs):
        raise NotImplementedError("deep_ep test double: the normal (high-throughput) kernels are not emulated")
