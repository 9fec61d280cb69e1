"""All-to-all traffic of expert parallelism on paper: bytes per token for each layout and payload,
and the bandwidth floor of a decode step (``python -m hal.ep_traffic`` prints the tables in
docs/distributed.md).

Layouts: ``expanded`` sends one row per (token, slot) whose expert lives on another rank (HAL's
``ep_dispatch``, DeepEP low-latency, Ascend MC2); ``per_rank`` sends a token once to each other
rank that owns at least one of its experts (DeepEP normal). Experts are assumed chosen uniformly
at random, so a slot lands on a given rank with probability 1/W.
"""
from __future__ import annotations

import argparse


PAYLOAD_BYTES = {"bf16": 2.0, "fp8": 1.0 + 4.0 / 128}        # e4m3 + one fp32 scale per 1x128 block


def rows_sent(k: int, world: int, layout: str) -> float:
    """Expected rows one token sends to *other* ranks in one dispatch."""
    if layout == "expanded":
        return k * (1 - 1 / world)
    if layout == "per_rank":
        # other ranks holding >= 1 of the k experts: (W-1) * (1 - (1 - 1/W)^k)
        return (world - 1) * (1 - (1 - 1 / world) ** k)
    raise ValueError(f"layout must be 'expanded' or 'per_rank', got {layout!r}")


def bytes_per_token(hidden: int, k: int, world: int, layout: str, dispatch_payload: str,
                    combine_payload: str = "bf16") -> float:
    """Bytes one token sends to other ranks in one MoE layer: dispatch rows plus combine rows."""
    rows = rows_sent(k, world, layout)
    return rows * hidden * (PAYLOAD_BYTES[dispatch_payload] + PAYLOAD_BYTES[combine_payload])


def decode_floor_s(hidden: int, k: int, moe_layers: int, tokens_per_rank: int, world: int, layout: str,
                   dispatch_payload: str, gpus_per_node: int, intra_gbps: float, inter_gbps: float) -> float:
    """Seconds one decode step spends at least in the all-to-alls of every MoE layer: each rank's
    bytes to ranks in its node over ``intra_gbps`` and to other nodes over ``inter_gbps``
    (GB/s per device, one direction), whichever link is slower bounding the step."""
    total = bytes_per_token(hidden, k, world, layout, dispatch_payload) * tokens_per_rank * moe_layers
    other = world - 1
    same_node = min(gpus_per_node, world) - 1
    inter = (other - same_node) / other if other else 0.0
    intra_s = total * (1 - inter) / (intra_gbps * 1e9)
    inter_s = total * inter / (inter_gbps * 1e9) if inter else 0.0
    return max(intra_s, inter_s)


# DeepSeek-V3.2 (and GLM-5's DSA stack is alike): hidden 7168, 256 routed experts, top-8, 58 of 61 layers MoE
DSV32 = dict(hidden=7168, k=8, moe_layers=58)
# per-device, one-direction link bandwidths (datasheet figures, not measured here)
LINKS = {"H200 NVLink4 + 400G IB": (8, 450.0, 50.0), "Ascend A3 HCCS + RoCE 200G": (16, 196.0, 25.0)}


def _tables(tokens_per_rank: int) -> str:
    out = ["| layout | dispatch payload | bytes / token / layer at EP=8 | EP=32 | EP=64 |", "|---|---|---|---|---|"]
    for layout in ("expanded", "per_rank"):
        for payload in ("bf16", "fp8"):
            cells = [f"{bytes_per_token(DSV32['hidden'], DSV32['k'], w, layout, payload) / 1024:.0f} KiB"
                     for w in (8, 32, 64)]
            out.append(f"| {layout} | {payload} | " + " | ".join(cells) + " |")
    out += ["", f"Decode floor per step, DeepSeek-V3.2, {tokens_per_rank} tokens per rank, fp8 dispatch + bf16 combine:",
            "", "| links | layout | EP=8 | EP=32 | EP=64 |", "|---|---|---|---|---|"]
    for name, (per_node, intra, inter) in LINKS.items():
        for layout in ("expanded", "per_rank"):
            cells = [f"{decode_floor_s(**DSV32, tokens_per_rank=tokens_per_rank, world=w, layout=layout, dispatch_payload='fp8', gpus_per_node=per_node, intra_gbps=intra, inter_gbps=inter) * 1e3:.2f} ms"
                     for w in (8, 32, 64)]
            out.append(f"| {name} | {layout} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens-per-rank", type=int, default=128)
    a = p.parse_args(argv)
    print(_tables(a.tokens_per_rank))


if __name__ == "__main__":
    main()

__all__ = ["rows_sent", "bytes_per_token", "decode_floor_s", "PAYLOAD_BYTES"]

