"""Several ranks for one CLI command: starting them through ``torch.distributed.run`` (torchrun)
and, inside each, joining the process group the expert-parallel ops use."""
from __future__ import annotations

import datetime
import os
import subprocess
import sys
from typing import Optional

DIST_BACKENDS = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}


def launch_ranks(argv: list[str], nproc_per_node: int, nnodes: str, node_rank: int,
                 rdzv_endpoint: Optional[str]) -> int:
    """Run the same command (``argv[1:]``) on ``nproc_per_node`` local ranks with torchrun and
    return its exit code: 0 when every rank succeeded; when one fails, torchrun stops the others
    and reports the failed rank (its own error line carries its rank)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc_per_node}", f"--nnodes={nnodes}"]
    if str(nnodes) != "1":
        if not rdzv_endpoint:
            print("hal: error: --nnodes > 1 needs --rdzv-endpoint HOST:PORT (the same on every node)", file=sys.stderr)
            return 2
        cmd += [f"--node-rank={node_rank}", "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}"]
    else:
        cmd += ["--standalone"]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")            # torchrun's own default, set quietly
    return subprocess.call(cmd + ["-m", "hal.cli", *argv[1:]], env=env)


def join_ranks(device_type: str, timeout_s: int):
    """Inside a rank started by torchrun: initialize torch.distributed for the backend's device
    (gloo on CPU tensors, NCCL on CUDA, HCCL on Ascend) with a bounded collective timeout and
    return the expert-parallel group of all ranks."""
    import torch
    import torch.distributed as dist

    from hal.distributed import ep_group
    if device_type not in DIST_BACKENDS:
        raise ValueError(f"several ranks: no torch.distributed backend known for device {device_type!r}")
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if device_type == "npu":
        torch.npu.set_device(int(os.environ.get("LOCAL_RANK", "0")))      # type: ignore[attr-defined]
    if not dist.is_initialized():
        dist.init_process_group(DIST_BACKENDS[device_type], timeout=datetime.timedelta(seconds=timeout_s))
    return ep_group()


def rank_prefix() -> str:
    """``"rank R: "`` inside a multi-rank run, else empty (error lines name their rank)."""
    return f"rank {os.environ['RANK']}: " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
