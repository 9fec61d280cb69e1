#!/usr/bin/env python3
"""AOT compile check of hal-cuda (no GPU needed): every kernel, in every configuration its
launcher picks at the models' and benchmarks' shapes, compiled by ``triton.compile`` for sm_90a
and sm_89; Triton's bundled ``ptxas -v`` gives registers, spills and shared memory.

Fails (exit 1) on a compile error, shared memory over 227 KB, spills in an sm_90a configuration
of the GEMM, attention or indexer kernels, or a tensor-core kernel without wgmma / mma in its PTX.
Prints the markdown table (docs/perf.md carries it) and, with --json, writes every row.

    python ci/aot_check.py [--arch sm_90a,sm_89] [--kernels a,b] [--jobs N] [--json out.json]
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import sys
import tempfile
import time

# compile for real targets: the interpreter switch must be off before triton is imported anywhere
for _var in ("HAL_CUDA_INTERPRET", "TRITON_INTERPRET"):
    os.environ.pop(_var, None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")        # Triton 3.9's default, stated (silences its warning)


def _compile(args):
    from hal_cuda.aot import compile_one
    cfg, arch = args
    return compile_one(cfg, arch)


SLOW_TO_COMPILE = ("_gdr_chunk_kernel",)       # minutes each (ptxas on its 255-register body)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="sm_90a,sm_89", help="comma-separated targets (sm_90a, sm_89)")
    ap.add_argument("--kernels", default="", help="only these kernels (comma-separated function names)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiler processes")
    ap.add_argument("--json", dest="json_out", help="write the result rows here")
    a = ap.parse_args(argv)
    from hal_cuda.aot import ARCHS, configurations, judge, markdown_table
    archs = [x for x in a.arch.split(",") if x]
    unknown = [x for x in archs if x not in ARCHS]
    if unknown:
        ap.error(f"--arch: expected some of {sorted(ARCHS)}, got {unknown}")
    # a private Triton cache: every kernel is really compiled (and timed), nothing stale is reused
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="hal-aot-cache-")
    configs = configurations(set(a.kernels.split(",")) if a.kernels else None)
    jobs = [(c, arch) for c in configs for arch in archs]
    # the slowest compilations start first, so they do not end up alone at the tail of the pool
    order = sorted(range(len(jobs)), key=lambda i: jobs[i][0].kernel not in SLOW_TO_COMPILE)
    t0 = time.perf_counter()
    if a.jobs > 1:
        with cf.ProcessPoolExecutor(a.jobs) as pool:
            done = list(pool.map(_compile, [jobs[i] for i in order]))
    else:
        done = [_compile(jobs[i]) for i in order]
    rows = [None] * len(jobs)
    for i, row in zip(order, done):
        rows[i] = row
    wall = time.perf_counter() - t0
    failures = [(r, why) for r in rows for why in judge(r)]
    print(markdown_table(rows))
    print(f"\n{len(rows)} compilations ({len(configs)} configurations x {len(archs)} targets) in {wall:.0f} s "
          f"with {a.jobs} process(es); {len(failures)} failure(s)")
    for r, why in failures:
        print(f"FAIL {r['kernel']} [{r['arch']}] {r['config']}: {why}", file=sys.stderr)
    if a.json_out:
        import triton
        doc = {"triton": triton.__version__, "wall_s": round(wall, 1), "jobs": a.jobs, "archs": archs, "rows": rows,
               "failures": [{"kernel": r["kernel"], "arch": r["arch"], "config": r["config"], "why": w}
                            for r, w in failures]}
        with open(a.json_out, "w") as f:
            json.dump(doc, f, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
