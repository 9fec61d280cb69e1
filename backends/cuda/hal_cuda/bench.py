"""hal-cuda's benchmarks (``hal bench --backend cuda``), each timed against its baseline in the
same process. On a GPU: ``triton.testing.do_bench`` (median of repeated runs after warm-up, fresh
random inputs, never zeros). ``dry=True`` runs the same code path at tiny shapes on the CPU under
the Triton interpreter, through a runtime with ``options={"interpret": True}`` (tests the
harness; its times mean nothing).

Floors use the peaks of the device the run is on (:func:`device_peaks`: H100 SXM or H200, NVIDIA's
datasheet figures, dense = half the "with sparsity" numbers; an unknown GPU gets the H100's); the
MoE decode goal uses the copy bandwidth measured in the same run.
"""
from __future__ import annotations

import torch

from hal.bench import Benchmark, BenchResult, median_time_ms

# dense tensor-core peaks (FLOP/s) and HBM bandwidth (B/s), NVIDIA datasheets (SXM parts)
DEVICE_PEAKS = {
    "H200": {"bf16": 989e12, "fp8": 1979e12, "hbm": 4.8e12},     # 141 GB HBM3e
    "H100": {"bf16": 989e12, "fp8": 1979e12, "hbm": 3.35e12},    # 80 GB HBM3
}


def device_peaks(device_name: str) -> dict:
    """The peak table for a device name ("NVIDIA H200", "NVIDIA H100 80GB HBM3", ...): H200 or
    H100 SXM figures, plus ``"device"`` (which table) ; any other name gets the H100's, marked."""
    for key in ("H200", "H100"):
        if key in device_name:
            return {**DEVICE_PEAKS[key], "device": key}
    return {**DEVICE_PEAKS["H100"], "device": f"H100 figures (no table for {device_name!r})"}


def _timer(dry: bool):
    if dry:
        return lambda fn: median_time_ms(fn, warmup=1, reps=3)
    import triton.testing
    return lambda fn: float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def _device(dry):
    return torch.device("cpu" if dry else "cuda")


def _rt(dry: bool = False):
    """The cuda runtime the benchmarks time: every op hal-cuda implements must be bound natively
    (contract ops it lacks may fall back; no benchmark calls them). A dry run binds an interpreted
    instance (``options={"interpret": True}``), whatever ``HAL_CUDA_INTERPRET`` says; a real run
    the listed instance."""
    import hal
    from hal_cuda.plugin import OPS
    rt = hal.runtime("cuda", fallback="reference", validate=False, options={"interpret": True} if dry else None)
    not_native = {e.op: e.path for e in rt.plan() if e.op in OPS and e.path != "native"}
    if not_native:
        raise RuntimeError(f"hal-cuda benchmarks need every hal-cuda op native, got {not_native}")
    return rt


def _row(name, op, shape, t_ms, *, flops=None, nbytes=None, peak=None, bw=None, baseline="", base_ms=None, goal="",
         goal_ratio=None, device="", notes=""):
    r = BenchResult(name, op, shape, t_ms, baseline=baseline, baseline_ms=base_ms, device=device, goal=goal, notes=notes)
    if base_ms is not None and t_ms:
        r.ratio = base_ms / t_ms
    if flops:
        r.flops, r.tflops = flops, flops / (t_ms * 1e-3) / 1e12
        if peak:
            r.flops_floor_ms = flops / peak * 1e3
    if nbytes:
        r.bytes, r.tbps = nbytes, nbytes / (t_ms * 1e-3) / 1e12
        r.bytes_floor_ms = nbytes / bw * 1e3
    floors = [f for f in (r.flops_floor_ms, r.bytes_floor_ms) if f]
    r.floor_ms = max(floors) if floors else None
    if goal_ratio is not None and r.ratio is not None and not device.startswith("CPU"):
        r.meets_goal = r.ratio >= goal_ratio
    return r


def _devname(dry):
    return "CPU (Triton interpreter, dry run)" if dry else torch.cuda.get_device_name(0)


def _scaled_mm_direct(a, a_s, b, b_s):
    from hal_cuda.op_fp8_gemm import cublas_scales
    sa, sb = cublas_scales(a_s, b_s)
    return lambda: torch._scaled_mm(a, b.t(), sa, sb, out_dtype=torch.bfloat16)


def bench_fp8_gemm(dry: bool = False):
    from hal_cuda.op_fp8_gemm import triton_fp8_gemm
    rt, dev, time_ms = _rt(dry), _device(dry), _timer(dry)
    pk = device_peaks(_devname(dry))
    shapes = [(32, 64, 256)] if dry else [(4096, 7168, 2048), (4096, 2048, 7168), (4096, 24576, 1536), (128, 7168, 2048),
                                          (16384, 6144, 6144)]
    rows = []
    for M, N, K in shapes:
        x, w = torch.randn(M, K, device=dev), torch.randn(N, K, device=dev) * 0.05
        a, a_s = rt.fp8_quantize(x)
        b, b_s = rt.fp8_quantize_weight(w)
        flops = 2 * M * N * K
        shape = {"M": M, "N": N, "K": K}
        t_hal = time_ms(lambda: rt.fp8_gemm(a, a_s, b, b_s))
        xb, wb = x.bfloat16(), w.bfloat16()
        t_bf16 = time_ms(lambda: torch.matmul(xb, wb.t()))
        base, base_ms = "bf16 torch.matmul", t_bf16
        if not dry:
            try:
                base_ms = time_ms(_scaled_mm_direct(a, a_s, b, b_s))
                base = "block-scaled torch._scaled_mm"
            except Exception as exc:  # noqa: BLE001 - reported, the bf16 baseline stays
                base = f"bf16 torch.matmul (scaled_mm unavailable: {type(exc).__name__})"
        dn = _devname(dry)
        rows.append(_row("fp8_gemm", "fp8_gemm", shape, t_hal, flops=flops, peak=pk["fp8"], baseline=base,
                         base_ms=base_ms, goal=">= 0.95x block-scaled scaled_mm", goal_ratio=0.95, device=dn))
        if M >= 4096 or dry:
            rows.append(_row("fp8_gemm_vs_bf16", "fp8_gemm", shape, t_hal, flops=flops, peak=pk["fp8"],
                             baseline="bf16 torch.matmul", base_ms=t_bf16, goal=">= 1.5x bf16 matmul", goal_ratio=1.5,
                             device=dn))
        t_tri = time_ms(lambda: triton_fp8_gemm(a, a_s, b, b_s, torch.bfloat16))
        rows.append(_row("fp8_gemm_triton", "fp8_gemm", shape, t_tri, flops=flops, peak=pk["fp8"], baseline=base,
                         base_ms=base_ms, goal=">= 0.6x block-scaled scaled_mm", goal_ratio=0.6, device=dn))
    return rows


def _moe_inputs(T, E, H, I, dev, fp8, rt):
    x = torch.randn(T, H, device=dev).bfloat16()
    logits = torch.randn(T, E, device=dev)
    w_gu = (torch.randn(E, 2 * I, H, device=dev) * 0.02).bfloat16()
    w_d = (torch.randn(E, H, I, device=dev) * 0.02).bfloat16()
    extra = {}
    if fp8:
        qg = [rt.fp8_quantize_weight(w) for w in w_gu]
        qd = [rt.fp8_quantize_weight(w) for w in w_d]
        w_gu, w_d = torch.stack([q for q, _ in qg]), torch.stack([q for q, _ in qd])
        extra = {"w_gate_up_scale": torch.stack([s for _, s in qg]), "w_down_scale": torch.stack([s for _, s in qd])}
    return x, logits, w_gu, w_d, extra


def _grouped_mm_composition(rt, x, logits, w_gu, w_d, k):
    """The baseline: route + sort + torch._grouped_mm twice + combine, in plain torch."""
    def run():
        w, ids = torch.topk(torch.sigmoid(logits), k, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        flat = ids.reshape(-1)
        order = torch.sort(flat, stable=True).indices
        counts = torch.bincount(flat, minlength=w_gu.shape[0])
        offs = torch.cumsum(counts, 0).to(torch.int32)
        xs = x[order // k]
        h = torch._grouped_mm(xs, w_gu.transpose(1, 2), offs=offs)
        g, u = h.chunk(2, -1)
        y = torch._grouped_mm((torch.nn.functional.silu(g) * u).to(x.dtype), w_d.transpose(1, 2), offs=offs)
        out = torch.zeros(x.shape[0] * k, x.shape[1], dtype=torch.float32, device=x.device)
        out[order] = y.float()
        return (out.view(x.shape[0], k, -1) * w[..., None]).sum(1)
    return run


def _per_expert_loop(x, logits, w_gu, w_d, k):
    def run():
        w, ids = torch.topk(torch.sigmoid(logits), k, dim=-1)
        out = torch.zeros_like(x, dtype=torch.float32)
        for e in range(w_gu.shape[0]):
            t, slot = torch.where(ids == e)
            h = x[t] @ w_gu[e].t()
            g, u = h.chunk(2, -1)
            out.index_add_(0, t, ((torch.nn.functional.silu(g) * u) @ w_d[e].t()).float() * w[t, slot, None])
        return out
    return run


def bench_moe(dry: bool = False):
    rt, dev, time_ms = _rt(dry), _device(dry), _timer(dry)
    pk = device_peaks(_devname(dry))
    T, E, k, H, I = (8, 8, 2, 128, 128) if dry else (4096, 256, 8, 6144, 2048)
    dn = _devname(dry)
    rows = []
    shape = {"T": T, "E": E, "k": k, "H": H, "I": I}
    flops = 2 * T * k * (H * 2 * I + I * H)
    x, logits, w_gu, w_d, _ = _moe_inputs(T, E, H, I, dev, False, rt)
    t_bf16 = time_ms(lambda: rt.moe_forward(x, logits, w_gu, w_d, top_k=k))
    if not dry and hasattr(torch, "_grouped_mm"):
        t_gmm = time_ms(_grouped_mm_composition(rt, x, logits, w_gu, w_d, k))
        rows.append(_row("moe_forward_bf16", "moe_forward", shape, t_bf16, flops=flops, peak=pk["bf16"],
                         baseline="torch._grouped_mm composition", base_ms=t_gmm, goal=">= 1.0x", goal_ratio=1.0, device=dn))
    else:
        t_gmm = None
    t_loop = time_ms(_per_expert_loop(x, logits, w_gu, w_d, k))
    rows.append(_row("moe_forward_bf16_vs_loop", "moe_forward", shape, t_bf16, flops=flops, peak=pk["bf16"],
                     baseline="per-expert loop", base_ms=t_loop, goal=">= 5x", goal_ratio=5.0, device=dn))
    x8, logits8, w_gu8, w_d8, scales = _moe_inputs(T, E, H, I, dev, True, rt)
    t_fp8 = time_ms(lambda: rt.moe_forward(x8, logits8, w_gu8, w_d8, top_k=k, **scales))
    rows.append(_row("moe_forward_fp8", "moe_forward", shape, t_fp8, flops=flops, peak=pk["fp8"],
                     baseline="torch._grouped_mm composition (bf16)" if t_gmm else "moe_forward bf16 (HAL)",
                     base_ms=t_gmm or t_bf16, goal=">= 1.6x bf16 grouped_mm composition", goal_ratio=1.6, device=dn))
    # decode: bytes of the touched experts' weights over the measured copy bandwidth
    Td = 4 if dry else 64
    xd, ld = x[:Td].contiguous(), logits[:Td].contiguous()
    _, ids = rt.moe_route(ld, top_k=k)
    touched = int(torch.unique(ids).numel())
    nbytes = touched * (2 * I * H + H * I) * 2
    src = torch.empty(max(nbytes // 4, 1), dtype=torch.float32, device=dev)
    dst = torch.empty_like(src)
    t_copy = time_ms(lambda: dst.copy_(src))
    bw = 2 * src.numel() * 4 / (t_copy * 1e-3)
    t_dec = time_ms(lambda: rt.moe_forward(xd, ld, w_gu, w_d, top_k=k))
    r = _row("moe_forward_decode", "moe_forward", {**shape, "T": Td, "experts_touched": touched}, t_dec, nbytes=nbytes,
             bw=bw, baseline="bytes floor at measured copy bandwidth", base_ms=nbytes / bw * 1e3,
             goal="within 1.3x of the floor", device=dn, notes=f"copy bandwidth {bw / 1e12:.2f} TB/s")
    if not dry:
        r.meets_goal = t_dec <= 1.3 * r.baseline_ms
    rows.append(r)
    return rows


def _causal_indices(rt, B, S, L, top_k, dev):
    """Indexer indices for the benchmark (computed once, outside the timed region)."""
    q = torch.randn(B, S, 4, 64, device=dev).bfloat16()
    k = torch.randn(B, L, 64, device=dev).bfloat16()
    return rt.lightning_indexer(q, k, torch.rand(B, S, 4, device=dev), top_k=top_k)


def bench_sparse_attention(dry: bool = False):
    rt, dev, time_ms = _rt(dry), _device(dry), _timer(dry)
    pk = device_peaks(_devname(dry))
    dn = _devname(dry)
    rows = []
    B, S, H, D, K = (1, 64, 2, 32, 16) if dry else (1, 65536, 16, 128, 2048)
    q, k, v = (torch.randn(B, S, H, D, device=dev).bfloat16() for _ in range(3))
    idx = _causal_indices(rt, B, S, S, K, dev)
    t_sparse = time_ms(lambda: rt.sparse_attention(q, k, v, idx, scale=D ** -0.5))
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    t_sdpa = time_ms(lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True))
    flops = 4 * B * S * H * K * D
    rows.append(_row("sparse_attention_prefill", "sparse_attention", {"B": B, "S": S, "H": H, "D": D, "top_k": K},
                     t_sparse, flops=flops, peak=pk["bf16"], baseline="dense causal SDPA", base_ms=t_sdpa,
                     goal=">= 8x dense causal SDPA", goal_ratio=8.0, device=dn))
    Bd, L, Hq, K2 = (2, 64, 4, 16) if dry else (32, 65536, 64, 2048)
    qd = torch.randn(Bd, 1, Hq, 576, device=dev).bfloat16()
    kv = torch.randn(Bd, L, 1, 576, device=dev).bfloat16()
    idx_d = torch.randint(0, L, (Bd, 1, K2), device=dev, dtype=torch.int32)
    t_dec = time_ms(lambda: rt.sparse_attention(qd, kv, kv[..., :512], idx_d, scale=576 ** -0.5))
    nbytes = Bd * K2 * 576 * 2 + Bd * Hq * (576 + 512) * 2
    r = _row("sparse_attention_mla_decode", "sparse_attention", {"B": Bd, "L": L, "Hq": Hq, "Dqk": 576, "Dv": 512,
             "top_k": K2}, t_dec, nbytes=nbytes, baseline="bytes floor", base_ms=nbytes / pk["hbm"] * 1e3,
             bw=pk["hbm"],
             goal="within 2x of the bytes floor", device=dn)
    if not dry:
        r.meets_goal = t_dec <= 2 * r.baseline_ms
    rows.append(r)
    return rows


def bench_indexer(dry: bool = False):
    rt, dev, time_ms = _rt(dry), _device(dry), _timer(dry)
    pk = device_peaks(_devname(dry))
    B, S, Hi, D, K = (1, 64, 4, 32, 16) if dry else (1, 65536, 32, 128, 2048)
    q = torch.randn(B, S, Hi, D, device=dev).bfloat16()
    k = torch.randn(B, S, D, device=dev).bfloat16()
    w = torch.rand(B, S, Hi, device=dev)
    t_idx = time_ms(lambda: rt.lightning_indexer(q, k, w, top_k=K))
    H, Dh = (2, 32) if dry else (16, 128)
    qs, ks, vs = (torch.randn(B, H, S, Dh, device=dev).bfloat16() for _ in range(3))
    t_sdpa = time_ms(lambda: torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True))
    flops = B * S * S * Hi * D                                    # causal half of 2 * S * L * Hi * D
    return [_row("lightning_indexer", "lightning_indexer", {"B": B, "S": S, "Hi": Hi, "D": D, "top_k": K}, t_idx,
                 flops=flops, peak=pk["bf16"], baseline=f"dense causal SDPA (B={B}, {H} heads, D={Dh})",
                 base_ms=t_sdpa, goal="no slower than dense SDPA (>= 1.0x)", goal_ratio=1.0, device=_devname(dry))]


def benchmarks() -> list:
    return [Benchmark("fp8_gemm", "fp8_gemm", bench_fp8_gemm, "5 model GEMM shapes vs scaled_mm and bf16 matmul"),
            Benchmark("moe_forward", "moe_forward", bench_moe, "prefill bf16/fp8 vs grouped_mm and a loop; decode vs bytes"),
            Benchmark("sparse_attention", "sparse_attention", bench_sparse_attention, "prefill vs SDPA; MLA decode vs bytes"),
            Benchmark("lightning_indexer", "lightning_indexer", bench_indexer, "indexer + top-k vs dense SDPA")]
