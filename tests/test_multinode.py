"""``hal run`` across two "nodes": two launches on this machine, each with two ranks, meeting through
torchrun's c10d rendezvous (``--nnodes 2 --node-rank 0|1 --rdzv-endpoint``). This is the
multi-node path (rendezvous, global ranks, only global rank 0 printing) with gloo over loopback
instead of a network; no second machine is involved."""
from __future__ import annotations

import json
import socket
import subprocess
import sys


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _hal_run(*args: str) -> list[str]:
    return [sys.executable, "-m", "hal.cli", "run", *args]


def test_two_nodes_of_two_ranks_give_the_single_process_tokens():
    ids = "1,2,3,4,5,6,7;30,31"
    common = ["-m", "tiny-glm5", "--prompt-ids", ids, "--max-new-tokens", "4", "--json"]
    one = subprocess.run(_hal_run(*common), capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    endpoint = f"127.0.0.1:{_free_port()}"
    nodes = [subprocess.Popen(_hal_run("--nproc-per-node", "2", "--nnodes", "2", "--node-rank", str(node),
                                       "--rdzv-endpoint", endpoint, "--dist-timeout", "120", *common),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for node in (0, 1)]
    outs = []
    try:
        for p in nodes:
            outs.append(p.communicate(timeout=600))
    finally:
        for p in nodes:
            p.kill()
    for p, (out, err) in zip(nodes, outs):
        assert p.returncode == 0, err[-3000:]
    printed = [json.loads(out) for out, _ in outs if out.strip()]
    assert len(printed) == 1, [out[:300] for out, _ in outs]          # global rank 0 alone prints
    got, want = printed[0], json.loads(one.stdout)
    assert got["world_size"] == 4 and got["tokens"] == want["tokens"]
    # which node holds global rank 0 is the rendezvous's choice: torchrun's c10d backend numbers the
    # nodes by sorted (host, agent pid, id), not by --node-rank, so either launch may be the one printing


def test_more_than_one_node_needs_a_rendezvous_endpoint():
    res = subprocess.run(_hal_run("--nproc-per-node", "2", "--nnodes", "2", "-m", "tiny-glm5"),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert "--nnodes > 1 needs --rdzv-endpoint HOST:PORT" in res.stderr
