"""Ahead-of-time compilation of every hal-cuda kernel, as its launchers configure it, for real GPU
targets (sm_90a, sm_89) without a GPU: ``triton.compile`` with a ``GPUTarget``, then Triton's
bundled ``ptxas -v`` reports registers, spills and shared memory (``ci/aot_check.py`` runs it).

:func:`configurations` walks the models' and benchmarks' shapes (:data:`SHAPES`) through the same
plain functions the launchers call (:mod:`hal_cuda.launch`), so the tile sizes compiled here are
the ones a launch would pick; integer arguments get the launcher's real values, so Triton's
divisibility-by-16 specialization matches too. :func:`judge` states the pass rules.

The kernels are :class:`hal_cuda._triton.Kernel` s, i.e. ordinary ``JITFunction`` s whatever
``HAL_CUDA_INTERPRET`` says: a process that has just run them under the Triton interpreter (an
interpreted runtime) compiles them here just the same.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Optional

from hal_cuda import launch as L

ARCHS = {"sm_90a": 90, "sm_89": 89}
SMEM_LIMIT = 227 * 1024                     # opt-in shared memory per block on H100 / H200 (sm_90)
STRICT_SPILL_KERNELS = ("_fp8_gemm_kernel", "_grouped_gemm_kernel", "_sparse_attn_kernel", "_scores_kernel",
                        "_gdr_recurrent_kernel")
TORCH_TO_TRITON = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32", "fp8": "fp8e4nv"}

# the shapes the launchers meet: the released models (DeepSeek-V3.2, GLM-5, GLM-4.5) and hal bench
SHAPES = {
    "attention": [  # name, B, S, L, Hq, Hk, Dqk, Dv, top_k, dtype, v is a view of k
        ("bench prefill MHA", 1, 65536, 65536, 16, 16, 128, 128, 2048, "bf16", False),
        ("DeepSeek-V3.2 prefill MHA form", 1, 131072, 131072, 128, 128, 192, 128, 2048, "bf16", False),
        ("MLA decode, 128 heads", 32, 1, 65536, 128, 1, 576, 512, 2048, "bf16", True),
        ("MLA decode, 64 heads", 32, 1, 65536, 64, 1, 576, 512, 2048, "bf16", True),
        ("MLA decode, 16 heads (TP 8)", 32, 1, 65536, 16, 1, 576, 512, 2048, "bf16", True),
        ("MLA decode, 8 heads (TP 16)", 32, 1, 65536, 8, 1, 576, 512, 2048, "bf16", True),
        ("GQA 4 heads per KV head", 1, 4096, 4096, 32, 8, 128, 128, 2048, "bf16", False),
        ("fp32 inputs, MLA", 2, 1, 4096, 64, 1, 576, 512, 2048, "fp32", True),
    ],
    "indexer": [  # name, B, S, L, Hi, D, dtype
        ("bench / GLM-5 prefill", 1, 65536, 65536, 32, 128, "bf16"),
        ("DeepSeek-V3.2 fp8 indexer", 1, 131072, 131072, 64, 128, "fp8"),
        ("fp16", 1, 4096, 4096, 64, 128, "fp16"),
        ("fp32", 1, 4096, 4096, 64, 128, "fp32"),
    ],
    "fp8_gemm": [  # name, M, N, K, out dtype, bias
        ("decode 128x7168x2048", 64, 7168, 2048, "bf16", False),
        ("prefill 4096x7168x2048", 4096, 7168, 2048, "bf16", False),
        ("prefill with bias", 4096, 7168, 2048, "bf16", True),
        ("decode with bias", 64, 7168, 2048, "bf16", True),
        ("fp16 out", 4096, 7168, 2048, "fp16", False),
        ("fp32 out", 4096, 7168, 2048, "fp32", False),
    ],
    "grouped_gemm": [  # name, rows, N, K, E, weight dtype, activation dtype
        ("MoE gate/up fp8 (T=4096, k=8)", 32768, 4096, 6144, 256, "fp8", "bf16"),
        ("MoE gate/up bf16", 32768, 4096, 6144, 256, "bf16", "bf16"),
        ("MoE gate/up fp16", 32768, 4096, 6144, 256, "fp16", "fp16"),
        ("MoE mixed dtypes (fp32 compute)", 4096, 4096, 6144, 256, "fp32", "fp32"),
    ],
    "route": [  # name, T, E, top_k, scoring, bias, n_group, topk_group, logits dtype
        ("DeepSeek-V3.2 (256 experts, 8 groups)", 4096, 256, 8, "sigmoid", True, 8, 4, "fp32"),
        ("GLM-4.5 / GLM-5 (no groups)", 4096, 160, 8, "sigmoid", True, 1, 1, "fp32"),
        ("softmax routing, bf16 logits", 4096, 128, 8, "softmax", False, 1, 1, "bf16"),
    ],
    "quantize": [  # name, M, K, x dtype, ue8m0
        ("activations bf16", 32768, 7168, "bf16", False),
        ("activations bf16, ue8m0", 32768, 7168, "bf16", True),
        ("activations fp32", 32768, 7168, "fp32", False),
    ],
    "quantize_weight": [  # name, N, K, w dtype
        ("weights bf16", 7168, 2048, "bf16"),
        ("weights fp32", 7168, 2048, "fp32"),
    ],
    "gated_delta_rule": [  # name, B, T, Hk, Hv, Dk, Dv, dtype, per-channel g, state slots, seq_lens
        ("Qwen3.5 prefill (state slots, varlen)", 4, 4096, 16, 32, 128, 128, "bf16", False, True, True),
        ("Qwen3.5 decode (state slots)", 64, 1, 16, 32, 128, 128, "bf16", False, True, False),
        ("Qwen3.5 speculative decode (slots, varlen)", 16, 4, 16, 32, 128, 128, "bf16", False, True, True),
        ("Kimi Linear KDA prefill", 1, 2048, 32, 32, 128, 128, "bf16", True, False, False),
        ("Kimi Linear KDA decode (state slots)", 64, 1, 32, 32, 128, 128, "bf16", True, True, False),
    ],
    "causal_conv1d": [  # name, B, T, D, K, x dtype, state slots, seq_lens
        ("Qwen3.5 prefill (q|k|v channels)", 1, 4096, 8192, 4, "bf16", False, False),
        ("Qwen3.5 prefill (slots, varlen)", 4, 1024, 8192, 4, "bf16", True, True),
        ("Qwen3.5 decode (slots)", 64, 1, 8192, 4, "bf16", True, False),
        ("Kimi Linear prefill", 1, 2048, 12288, 4, "bf16", False, False),
    ],
}


@dataclasses.dataclass
class KernelConfig:
    """One compilation: a kernel with its argument types/values, constexprs and launch options."""
    kernel: str
    module: str
    shapes: list
    pointers: dict                 # arg -> triton element type ("bf16", "fp8e4nv", "i32", ...)
    ints: dict                     # arg -> the value the launcher passes (typed i32 / i64 by size)
    floats: dict                   # arg -> fp32 scalar
    constexprs: dict
    num_warps: int = 4
    num_stages: int = 3
    tensor_cores: bool = False     # meant to use tensor cores: its PTX must hold wgmma / mma

    def key(self):
        return (self.kernel, tuple(sorted(self.pointers.items())),
                tuple(sorted((k, self.int_type(v), v % 16 == 0) for k, v in self.ints.items())),
                tuple(sorted(self.constexprs.items())), self.num_warps, self.num_stages)

    @staticmethod
    def int_type(v: int) -> str:
        return "i32" if -2 ** 31 <= v < 2 ** 31 else "i64"

    def label(self) -> str:
        c = ", ".join(f"{k}={v}" for k, v in self.constexprs.items())
        return f"{c}; warps={self.num_warps}" + (f", stages={self.num_stages}" if self.num_stages != 3 else "")


def _attention(name, B, S, Lk, Hq, Hk, Dqk, Dv, topk, dtype, view):
    G = Hq // Hk
    cfg = L.attention_config(G, Dqk, Dv, half=dtype != "fp32", interpret=False)
    t = TORCH_TO_TRITON[dtype]
    sk = (Lk * Hk * Dqk, Hk * Dqk, Dqk)
    sv = sk if view else (Lk * Hk * Dv, Hk * Dv, Dv)
    ints = dict(S=S, Hq=Hq, G=G, NGB=L.cdiv(G, cfg.BLOCK_G), Dqk=Dqk, Dv=Dv, TOPK=topk, sq_b=S * Hq * Dqk,
                sq_s=Hq * Dqk, sq_h=Dqk, sk_b=sk[0], sk_l=sk[1], sk_h=sk[2], sv_b=sv[0], sv_l=sv[1], sv_h=sv[2])
    const = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "num_warps"}
    return KernelConfig("_sparse_attn_kernel", "hal_cuda.op_sparse_attention", [name],
                        dict(q_ptr=t, k_ptr=t, v_ptr=t, idx_ptr="i32", out_ptr=t, lse_ptr="fp32"), ints,
                        dict(scale=Dqk ** -0.5), const, cfg.num_warps, 3, cfg.DOT)


def _indexer(name, B, S, Lk, Hi, D, dtype):
    cfg = L.indexer_config(D, Lk, dtype=dtype, interpret=False)
    t = TORCH_TO_TRITON[dtype]
    ints = dict(S=S, L=Lk, Hi=Hi, D=D, c0=cfg.CHUNK, C=cfg.CHUNK, NSB=L.cdiv(S, cfg.BLOCK_S))
    const = dict(FP8=dtype == "fp8", FP8_DOT=cfg.FP8_DOT, UPCAST=cfg.UPCAST, PRECISION=cfg.PRECISION,
                 BLOCK_S=cfg.BLOCK_S, BLOCK_C=cfg.BLOCK_C, BLOCK_D=cfg.BLOCK_D, D_CHUNK=cfg.D_CHUNK)
    return KernelConfig("_scores_kernel", "hal_cuda.op_lightning_indexer", [name],
                        dict(q_ptr=t, k_ptr=t, w_ptr="fp32", qs_ptr="fp32", ks_ptr="fp32", out_ptr="fp32"), ints, {},
                        const, cfg.num_warps, 3, True)


def _fp8_gemm(name, M, N, K, out, bias):
    cfg = L.fp8_gemm_config(M, interpret=False)
    return KernelConfig("_fp8_gemm_kernel", "hal_cuda.op_fp8_gemm", [name],
                        dict(a_ptr="fp8e4nv", as_ptr="fp32", b_ptr="fp8e4nv", bs_ptr="fp32", bias_ptr="fp32",
                             c_ptr=TORCH_TO_TRITON[out]), dict(M=M, N=N, K=K, KB=L.cdiv(K, 128)), {},
                        dict(HAS_BIAS=bias, BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K),
                        cfg.num_warps, cfg.num_stages, True)


def _grouped(name, R, N, K, E, wdt, xdt):
    fp8 = wdt == "fp8"
    x = "fp8e4nv" if fp8 else TORCH_TO_TRITON[xdt]
    cfg = L.grouped_gemm_config(fp8=fp8, interpret=False, fp32=x == "fp32")
    precision = L.grouped_gemm_precision(xdt if not fp8 else "fp8", interpret=False)
    return KernelConfig("_grouped_gemm_kernel", "hal_cuda.op_moe_experts", [name],
                        dict(x_ptr=x, xs_ptr="fp32" if fp8 else x, w_ptr=TORCH_TO_TRITON[wdt], ws_ptr="fp32" if fp8 else
                             TORCH_TO_TRITON[wdt], out_ptr=TORCH_TO_TRITON[xdt], offsets_ptr="i32", counts_ptr="i32"),
                        dict(N=N, K=K, KB=L.cdiv(K, 128), NB=L.cdiv(N, 128)), {},
                        dict(FP8=fp8, PRECISION=precision, UPCAST=False, BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N,
                             BLOCK_K=cfg.BLOCK_K), cfg.num_warps, cfg.num_stages, True)


def _route(name, T, E, k, scoring, bias, n_group, topk_group, dt):
    t = TORCH_TO_TRITON[dt]
    return KernelConfig("_route_kernel", "hal_cuda.op_moe_route", [name],
                        dict(x_ptr=t, bias_ptr="fp32" if bias else t, w_ptr="fp32", ids_ptr="i32"), dict(E=E),
                        dict(scaling=2.5), dict(TOP_K=k, KP=L.next_pow2(k), SOFTMAX=scoring == "softmax",
                                                HAS_BIAS=bias, N_GROUP=n_group, TOPK_GROUP=topk_group, RENORM=True,
                                                BLOCK_E=L.next_pow2(max(E, n_group))), 4, 3, False)


def _quantize(name, M, K, dt, ue8m0):
    return KernelConfig("_quantize_kernel", "hal_cuda.op_fp8_quantize", [name],
                        dict(x_ptr=TORCH_TO_TRITON[dt], q_ptr="u8", s_ptr="fp32"),
                        dict(K=K, G=L.cdiv(K, 128), group_size=128), {}, dict(UE8M0=ue8m0, BLOCK=128), 4, 3, False)


def _quantize_weight(name, N, K, dt):
    return KernelConfig("_weight_kernel", "hal_cuda.op_fp8_quantize_weight", [name],
                        dict(w_ptr=TORCH_TO_TRITON[dt], q_ptr="u8", s_ptr="fp32"),
                        dict(N=N, K=K, KB=L.cdiv(K, 128), block=128), {}, dict(BLOCK=128), 4, 3, False)


def _gdr(name, B, T, Hk, Hv, Dk, Dv, dtype, per_channel, slots, lens):
    from hal_cuda.op_gated_delta_rule import RECURRENT_WARPS, gdr_config, gdr_mode
    cfg = gdr_config(Dk, Dv, interpret=False)
    t = TORCH_TO_TRITON[dtype]
    chunked = gdr_mode(T, per_channel) == "chunked"
    const = dict(BLOCK_DK=cfg.BLOCK_DK, BLOCK_V=cfg.BLOCK_V, HAS_STATE=slots, HAS_INDEX=slots, HAS_LENS=lens,
                 L2NORM=True, FAULT=0)
    const.update(dict(C=cfg.C, PRECISION=cfg.PRECISION) if chunked else dict(PER_CHANNEL=per_channel))
    return KernelConfig("_gdr_chunk_kernel" if chunked else "_gdr_recurrent_kernel", "hal_cuda.op_gated_delta_rule",
                        [name], dict(q_ptr=t, k_ptr=t, v_ptr=t, g_ptr="fp32", beta_ptr=t, h0_ptr="fp32",
                                     idx_ptr="i32", len_ptr="i32", out_ptr=t, ht_ptr="fp32"),
                        dict(T=T, Hk=Hk, Hv=Hv, G=Hv // Hk, Dk=Dk, Dv=Dv), dict(scale=Dk ** -0.5), const,
                        cfg.num_warps if chunked else RECURRENT_WARPS, 3 if chunked else 1, chunked)


def _conv(name, B, T, D, K, dtype, slots, lens):
    from hal_cuda.op_causal_conv1d import conv_config
    cfg = conv_config(T, D, interpret=False)
    t = TORCH_TO_TRITON[dtype]
    return KernelConfig("_conv_kernel", "hal_cuda.op_causal_conv1d", [name],
                        dict(x_ptr=t, w_ptr=t, bias_ptr=t, st_ptr=t, idx_ptr="i32", len_ptr="i32", out_ptr=t),
                        dict(T=T, D=D, K=K, NTB=L.cdiv(T, cfg.BLOCK_T)), {},
                        dict(HAS_BIAS=False, HAS_STATE=slots, HAS_INDEX=slots, HAS_LENS=lens, SILU=True,
                             BLOCK_T=cfg.BLOCK_T, BLOCK_D=cfg.BLOCK_D), cfg.num_warps, 3, False)


def _conv_state(name, B, T, D, K, dtype, slots, lens):
    from hal_cuda.op_causal_conv1d import conv_config
    cfg = conv_config(T, D, interpret=False)
    t = TORCH_TO_TRITON[dtype]
    return KernelConfig("_conv_state_kernel", "hal_cuda.op_causal_conv1d", [name],
                        dict(x_ptr=t, st_ptr=t, idx_ptr="i32", len_ptr="i32", new_ptr=t), dict(T=T, D=D, W=K - 1), {},
                        dict(HAS_STATE=slots, HAS_INDEX=slots, HAS_LENS=lens, BLOCK_D=cfg.BLOCK_D),
                        cfg.num_warps, 3, False)


_BUILDERS = {"attention": _attention, "indexer": _indexer, "fp8_gemm": _fp8_gemm, "grouped_gemm": _grouped,
             "route": _route, "quantize": _quantize, "quantize_weight": _quantize_weight,
             "gated_delta_rule": (_gdr,), "causal_conv1d": (_conv, _conv_state)}


def configurations(kernels: Optional[set] = None) -> list:
    """Every distinct (kernel, configuration) the launchers pick at :data:`SHAPES`; shapes that
    lead to the same compilation are merged into one entry (``shapes`` lists them)."""
    out = {}
    for family, rows in SHAPES.items():
        builders = _BUILDERS[family] if isinstance(_BUILDERS[family], tuple) else (_BUILDERS[family],)
        for row in rows:
            for build in builders:
                cfg = build(*row)
                if kernels and cfg.kernel not in kernels:
                    continue
                if cfg.key() in out:
                    out[cfg.key()].shapes.append(row[0])
                else:
                    out[cfg.key()] = cfg
    return list(out.values())


_REGS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas_log(log: str) -> dict:
    """registers, spill stores / loads (bytes) and static shared memory from a ``ptxas -v`` log."""
    regs, spill, smem = _REGS.search(log), _SPILL.search(log), _SMEM.search(log)
    return {"registers": int(regs.group(1)) if regs else None,
            "spill_stores": int(spill.group(1)) if spill else None,
            "spill_loads": int(spill.group(2)) if spill else None,
            "static_smem": int(smem.group(1)) if smem else 0}


def compile_one(cfg: KernelConfig, arch: str) -> dict:
    """Compile ``cfg`` for ``arch`` ("sm_90a" / "sm_89"); the result row (error set on failure)."""
    import importlib
    import subprocess
    import tempfile
    import time

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas

    row = {"kernel": cfg.kernel, "arch": arch, "config": cfg.label(), "shapes": cfg.shapes,
           "tensor_cores_expected": cfg.tensor_cores, "error": None}
    t0 = time.perf_counter()
    try:
        fn = getattr(importlib.import_module(cfg.module), cfg.kernel)
        signature, attrs = {}, {}
        for i, name in enumerate(fn.arg_names):
            if name in cfg.constexprs:
                signature[name] = "constexpr"
            elif name in cfg.pointers:
                signature[name] = "*" + cfg.pointers[name]
                attrs[(i,)] = [["tt.divisibility", 16]]
            elif name in cfg.floats:
                signature[name] = "fp32"
            else:
                v = cfg.ints[name]
                signature[name] = cfg.int_type(v)
                if v % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        src = triton.compiler.ASTSource(fn, signature, dict(cfg.constexprs), attrs)
        capability = ARCHS[arch]
        k = triton.compile(src, target=GPUTarget("cuda", capability, 32),
                           options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
        ptx = k.asm["ptx"]
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "k.ptx")
            with open(path, "w") as f:
                f.write(ptx)
            res = subprocess.run([get_ptxas(capability).path, "-v", f"--gpu-name={arch}", path, "-o",
                                  os.path.join(tmp, "k.cubin")], capture_output=True, text=True)
        row.update(parse_ptxas_log(res.stdout + res.stderr))
        row["smem"] = max(int(k.metadata.shared), row.pop("static_smem"))
        row["wgmma"] = "wgmma.mma_async" in ptx
        row["mma"] = bool(re.search(r"\bmma\.sync", ptx))
    except Exception as exc:  # noqa: BLE001 - a compile error is a result of the check
        row["error"] = f"{type(exc).__name__}: {str(exc).strip()[:400]}"
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def judge(row: dict) -> list:
    """Why this compilation fails the check (empty when it passes): a compile error, shared memory
    over 227 KB, spills in an sm_90a configuration of the GEMM, attention or indexer kernels, or
    no wgmma / mma in the PTX of a kernel meant to use tensor cores."""
    if row.get("error"):
        return [f"compile error: {row['error']}"]
    why = []
    if row["smem"] > SMEM_LIMIT:
        why.append(f"shared memory {row['smem']} B > {SMEM_LIMIT} B")
    spills = row["spill_stores"] or row["spill_loads"]
    if row["arch"] == "sm_90a" and row["kernel"] in STRICT_SPILL_KERNELS and spills:
        why.append(f"spills on sm_90a: {row['spill_stores']} B stores, {row['spill_loads']} B loads")
    if row["tensor_cores_expected"] and not (row["wgmma"] or row["mma"]):
        why.append("meant for tensor cores, but its PTX has no wgmma / mma")
    if row["registers"] is None:
        why.append("ptxas -v reported no register count")
    return why


def markdown_table(rows: list) -> str:
    """The result rows as the markdown table docs/perf.md carries."""
    lines = ["| kernel | arch | configuration | shapes | regs | spills (st/ld B) | smem (KB) | tensor cores "
             "| verdict |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["kernel"], r["config"], r["arch"])):
        bad = judge(r)
        if r.get("error"):
            lines.append(f"| {r['kernel']} | {r['arch']} | {r['config']} | {'; '.join(r['shapes'])} | - | - | - | - | "
                         f"FAIL: {r['error'][:80]} |")
            continue
        tc = "wgmma" if r["wgmma"] else ("mma" if r["mma"] else "none")
        lines.append(f"| {r['kernel']} | {r['arch']} | {r['config']} | {'; '.join(r['shapes'])} | {r['registers']} | "
                     f"{r['spill_stores']}/{r['spill_loads']} | {r['smem'] / 1024:.1f} | {tc} | "
                     f"{'FAIL: ' + '; '.join(bad) if bad else 'ok'} |")
    return "\n".join(lines)
