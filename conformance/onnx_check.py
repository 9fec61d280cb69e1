"""An independent check of the reference: the ops standard ONNX can express, run by onnxruntime.

- ``fp8_gemm``: blocked ``DequantizeLinear`` (opset 21, FLOAT8E4M3FN initializers) for both operands
  (B's 128x128 grid is expanded to 128-row blocks of 1x128 scales, the same numbers), ``Transpose``,
  ``MatMul`` (+ ``Add`` bias) in fp32.
- ``fp8_quantize``: ``Pad``/``Reshape`` into groups, ``ReduceMax(Abs)``, ``Max(1e-4)``, ``Div(448)``,
  for ue8m0 ``Log``/``Ceil``/``Pow``, then ``Div``, ``Clip(+-448)``, ``Cast`` to FLOAT8E4M3FN and
  back to float (the codes' values).
- ``moe_route``: ``Sigmoid``/``Softmax``, ``Add`` bias, for ``n_group > 1`` the group mask (``TopK``
  2 per group, ``ReduceSum``, ``TopK`` groups, ``ScatterElements``, ``Where`` -inf), ``TopK`` (ties
  -> lower index), ``GatherElements``, renormalize, scale.
onnxruntime's Python ``run()`` does not take float8 feeds, so fp8 tensors are initializers of the
model. Cases with NaN/Inf inputs (the contract's NaN ranking is not ONNX's) or empty tensors are
outside what these graphs express and reported NOT_EXPRESSIBLE.

Each onnxruntime result is judged twice: exactly against the reference at working precision (the
same numbers up to fp32 summation order), and by the op's contract budget against the float64
truth, as if onnxruntime were a backend.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
from onnx import TensorProto, helper

from hal.conformance.tensorproto import to_proto

OPSET = 21
ONNX_OPS = ("moe_route", "fp8_quantize", "fp8_gemm")      # the ops these graphs express


def _model(nodes, inputs, outputs, initializers):
    graph = helper.make_graph(nodes, "hal_reference_check", inputs, outputs, initializer=initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=10)


def _const(name, value, dtype=np.float32):
    return to_proto(torch.from_numpy(np.asarray(value, dtype=dtype)), name)


def _gemm_model(a, a_scale, b, b_scale, *, out_dtype=None, bias=None):
    M, K = a.shape
    N = b.shape[0]
    b_rows = b_scale.repeat_interleave(128, 0)[:N].contiguous()           # [N, ceil(K/128)]
    inits = [to_proto(a, "a"), to_proto(a_scale.contiguous(), "a_scale"), to_proto(b, "b"), to_proto(b_rows, "b_scale")]
    nodes = [helper.make_node("DequantizeLinear", ["a", "a_scale"], ["A"], axis=1, block_size=128),
             helper.make_node("DequantizeLinear", ["b", "b_scale"], ["B"], axis=1, block_size=128),
             helper.make_node("Transpose", ["B"], ["BT"], perm=[1, 0]),
             helper.make_node("MatMul", ["A", "BT"], ["Y0" if bias is not None else "Y"])]
    if bias is not None:
        inits.append(to_proto(bias.float(), "bias"))
        nodes.append(helper.make_node("Add", ["Y0", "bias"], ["Y"]))
    return _model(nodes, [], [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [M, N])], inits)


def _quantize_model(x, *, group_size=128, scale_format="fp32"):
    shape = list(x.shape)
    K = shape[-1]
    G = -(-K // group_size)
    lead = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    inits = [_const("pads", [0, 0, 0, G * group_size - K], np.int64), _const("flat", [lead, K], np.int64),
             _const("groups", [lead, G, group_size], np.int64), _const("padded", [lead, G * group_size], np.int64),
             _const("axis", [-1], np.int64), _const("floor", 1e-4), _const("fmax", 448.0), _const("fmin", -448.0),
             _const("start", [0], np.int64),
             _const("stop", [K], np.int64), _const("qshape", shape, np.int64),
             _const("sshape", shape[:-1] + [G], np.int64)]
    nodes = [helper.make_node("Reshape", ["x", "flat"], ["x2"]),
             helper.make_node("Pad", ["x2", "pads"], ["xp"]),
             helper.make_node("Reshape", ["xp", "groups"], ["xg"]),
             helper.make_node("Abs", ["xg"], ["ax"]),
             helper.make_node("ReduceMax", ["ax", "axis"], ["amax"], keepdims=1),
             helper.make_node("Max", ["amax", "floor"], ["amax_c"]),
             helper.make_node("Div", ["amax_c", "fmax"], ["s0"])]
    scale = "s0"
    if scale_format == "ue8m0":
        # the smallest power of two >= s, exactly: log2 in double (fp32's log2 rounds 2^n(1 + 2^-23)
        # down to n), then one step down when the power below is already >= s (log of an exact
        # power of two may land just above n)
        inits += [to_proto(torch.tensor(2.0, dtype=torch.float64), "two_d"),
                  to_proto(torch.tensor(1.0, dtype=torch.float64), "one_d"),
                  to_proto(torch.tensor(math.log(2.0), dtype=torch.float64), "ln2_d")]
        nodes += [helper.make_node("Cast", ["s0"], ["s0d"], to=TensorProto.DOUBLE),
                  helper.make_node("Log", ["s0d"], ["ls"]), helper.make_node("Div", ["ls", "ln2_d"], ["l2"]),
                  helper.make_node("Ceil", ["l2"], ["cl"]), helper.make_node("Pow", ["two_d", "cl"], ["p_up"]),
                  helper.make_node("Sub", ["cl", "one_d"], ["cl1"]), helper.make_node("Pow", ["two_d", "cl1"], ["p_down"]),
                  helper.make_node("GreaterOrEqual", ["p_down", "s0d"], ["down"]),
                  helper.make_node("Where", ["down", "p_down", "p_up"], ["s1d"]),
                  helper.make_node("Cast", ["s1d"], ["s1"], to=TensorProto.FLOAT)]
        scale = "s1"
    nodes += [helper.make_node("Div", ["xg", scale], ["xs"]),
              helper.make_node("Clip", ["xs", "fmin", "fmax"], ["xc"]),
              helper.make_node("Cast", ["xc"], ["q8"], to=TensorProto.FLOAT8E4M3FN),
              helper.make_node("Cast", ["q8"], ["qf"], to=TensorProto.FLOAT),
              helper.make_node("Reshape", ["qf", "padded"], ["qp"]),
              helper.make_node("Slice", ["qp", "start", "stop", "axis"], ["qk"]),
              helper.make_node("Reshape", ["qk", "qshape"], ["q"]),
              helper.make_node("Reshape", [scale, "sshape"], ["scale"])]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                  [helper.make_tensor_value_info("q", TensorProto.FLOAT, shape),
                   helper.make_tensor_value_info("scale", TensorProto.FLOAT, shape[:-1] + [G])], inits)


def _group_mask_nodes(sel, T, E, n_group, topk_group, inits, with_bias=True):
    """Nodes that replace the selection scores of experts outside the ``topk_group`` best groups
    with -inf (group score: the sum of its top-2 scores with a correction bias, its maximum
    without one, as the contract says); returns (nodes, masked score name)."""
    per = E // n_group
    inits += [_const("gshape", [T, n_group, per], np.int64), _const("eshape", [T, E], np.int64),
              _const("k2", [min(2, per)], np.int64), _const("kg", [topk_group], np.int64),
              _const("gzeros", np.zeros((T, n_group))), _const("gones", np.ones((T, topk_group))),
              _const("neg_inf", float("-inf"))]
    nodes = [helper.make_node("Reshape", [sel, "gshape"], ["cg"])]
    if with_bias:
        nodes += [helper.make_node("TopK", ["cg", "k2"], ["top2", "_top2_idx"], axis=-1, largest=1, sorted=1),
                  helper.make_node("ReduceSum", ["top2", "axis"], ["gscore"], keepdims=0)]
    else:
        nodes += [helper.make_node("ReduceMax", ["cg", "axis"], ["gscore"], keepdims=0)]
    nodes += [
             helper.make_node("TopK", ["gscore", "kg"], ["_gvals", "gidx"], axis=-1, largest=1, sorted=1),
             helper.make_node("ScatterElements", ["gzeros", "gidx", "gones"], ["gmask"], axis=1),
             helper.make_node("Unsqueeze", ["gmask", "axis"], ["gmask3"]),
             helper.make_node("Expand", ["gmask3", "gshape"], ["emask3"]),
             helper.make_node("Reshape", ["emask3", "eshape"], ["emask"]),
             helper.make_node("Cast", ["emask"], ["ekeep"], to=TensorProto.BOOL),
             helper.make_node("Where", ["ekeep", sel, "neg_inf"], ["c_kept"])]
    return nodes, "c_kept"


def _route_model(logits, *, top_k, scoring="sigmoid", correction_bias=None, n_group=1, topk_group=1,
                 renormalize=True, scaling_factor=1.0):
    T, E = logits.shape
    inits = [_const("k", [top_k], np.int64), _const("scaling", scaling_factor), _const("axis", [-1], np.int64)]
    nodes = [helper.make_node("Sigmoid", ["logits"], ["s"]) if scoring == "sigmoid"
             else helper.make_node("Softmax", ["logits"], ["s"], axis=-1)]
    sel = "s"
    if correction_bias is not None:
        inits.append(to_proto(correction_bias.float(), "bias"))
        nodes.append(helper.make_node("Add", ["s", "bias"], ["c"]))
        sel = "c"
    if n_group > 1:
        group_nodes, sel = _group_mask_nodes(sel, T, E, n_group, topk_group, inits,
                                             with_bias=correction_bias is not None)
        nodes += group_nodes
    nodes += [helper.make_node("TopK", [sel, "k"], ["top_vals", "ids64"], axis=-1, largest=1, sorted=1),
              helper.make_node("GatherElements", ["s", "ids64"], ["w0"], axis=-1),
              helper.make_node("Cast", ["ids64"], ["expert_ids"], to=TensorProto.INT32)]
    w = "w0"
    if renormalize:
        inits.append(_const("eps", 1e-20))
        nodes += [helper.make_node("ReduceSum", ["w0", "axis"], ["wsum"], keepdims=1),
                  helper.make_node("Add", ["wsum", "eps"], ["wden"]), helper.make_node("Div", ["w0", "wden"], ["w1"])]
        w = "w1"
    nodes.append(helper.make_node("Mul", [w, "scaling"], ["weights"]))
    return _model(nodes, [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [T, E])],
                  [helper.make_tensor_value_info("weights", TensorProto.FLOAT, [T, top_k]),
                   helper.make_tensor_value_info("expert_ids", TensorProto.INT32, [T, top_k])], inits)


def not_expressible(op: str, args, kwargs) -> Optional[str]:
    """Why this case is outside what the ONNX graphs above express (None when it is inside)."""
    if op not in ONNX_OPS:
        return f"standard ONNX has no graph here for {op}"
    tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.is_floating_point()]
    if any(t.numel() == 0 for t in tensors):
        return "empty tensors"
    if any(not bool(torch.isfinite(t.float()).all()) for t in tensors):
        return "NaN/Inf inputs (the contract's NaN ranking and fp8 NaN rules are not ONNX's)"
    return None


def expressible(op: str, args, kwargs) -> bool:
    """Whether this case is inside what the ONNX graphs above express."""
    return not_expressible(op, args, kwargs) is None


def build_model(op: str, args, kwargs) -> Optional[object]:
    """The ONNX model computing this case (None when the op or case is not expressible)."""
    if not expressible(op, args, kwargs):
        return None
    if op == "fp8_gemm":
        return _gemm_model(*args, **kwargs)
    if op == "fp8_quantize":
        return _quantize_model(*args, **kwargs)
    return _route_model(*args, **kwargs)


def _feeds(op: str, args) -> dict:
    """The graph inputs (only non-fp8 tensors are fed; fp8 operands are initializers)."""
    if op == "fp8_quantize":
        return {"x": args[0].float().numpy()}
    if op == "moe_route":
        return {"logits": args[0].float().numpy()}
    return {}


def run_model(model, op: str, args) -> list[torch.Tensor]:
    """Run ``model`` (a ModelProto or its serialized bytes) with onnxruntime's CPU provider."""
    import onnxruntime as ort
    data = model if isinstance(model, (bytes, bytearray)) else model.SerializeToString()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3                             # errors only (no unused-initializer notes)
    sess = ort.InferenceSession(data, sess_options=opts, providers=["CPUExecutionProvider"])
    return [torch.from_numpy(np.array(o, copy=True)) for o in sess.run(None, _feeds(op, args))]


def as_contract_outputs(op: str, kwargs: dict, ort_out: list) -> list[torch.Tensor]:
    """onnxruntime's outputs in the op's contract form (dtype), ready for :func:`runner.judge`."""
    if op == "fp8_gemm":
        return [ort_out[0].to(kwargs.get("out_dtype", torch.bfloat16))]
    if op == "fp8_quantize":
        return [ort_out[0].to(torch.float8_e4m3fn), ort_out[1]]      # the values are e4m3 codes: exact
    return [ort_out[0], ort_out[1]]


def compare_exact(op: str, ort_out: list, truth: list, ref: list) -> tuple[bool, str]:
    """The strict check: onnxruntime equals the reference up to fp32 summation order."""
    from hal.conformance.metrics import calc_diff
    if op == "fp8_gemm":
        y, t = ort_out[0].double(), truth[0].double()          # fp32 GEMM against the float64 truth
        cd = calc_diff(y, t)
        err = float((y - t).abs().max()) if t.numel() else 0.0
        scale = float(t.abs().max()) if t.numel() else 0.0
        return cd < 1e-10 and err <= 1e-5 * max(scale, 1.0), f"fp32 vs float64: calc_diff {cd:.2e}, max abs {err:.2e}"
    if op == "fp8_quantize":
        q, s = ref
        same_q, same_s = torch.equal(ort_out[0], q.float()), torch.equal(ort_out[1], s)
        n = int((ort_out[0] != q.float()).sum())
        return same_q and same_s, (f"codes {'equal' if same_q else f'differ at {n} positions'}, "
                                   f"scales {'equal' if same_s else 'differ'}")
    w, ids = ref
    same_ids = torch.equal(ort_out[1], ids)
    err = float((ort_out[0] - w).abs().max()) if w.numel() else 0.0
    return same_ids and err <= 1e-6, f"ids {'equal' if same_ids else 'differ'}, weights max abs {err:.2e}"


def judge_onnxruntime(op: str, args, kwargs, ort_out: list, truth: list, ref: list) -> dict:
    """PASS when onnxruntime's outputs are within the op's contract budget against the float64
    truth (judged like a backend) and agree exactly with the reference (see :func:`compare_exact`)."""
    from hal.conformance.runner import judge
    exact, detail = compare_exact(op, ort_out, truth, ref)
    checks = judge(op, args, kwargs, as_contract_outputs(op, kwargs, ort_out), truth, ref)
    within = all(c.passed for c in checks)
    if not within:
        detail += "; budget: " + "; ".join(f"{c.name}: {c.message}" for c in checks if not c.passed)
    return {"status": "PASS" if exact and within else "FAIL", "within_budget": within, "exact": exact,
            "detail": detail}


def check_reference(level: str = "quick", seed: int = 0, ops=ONNX_OPS) -> list[dict]:
    """Build the ONNX model of every expressible catalog case in memory, run it on onnxruntime
    and judge it against the reference (rows: op, case, status, within_budget, exact, detail)."""
    from hal.conformance.cases import catalog
    from hal.conformance.runner import reference_outputs
    rows = []
    for case in catalog(level, [o for o in ONNX_OPS if o in ops]):
        args, kwargs = case.materialize(seed)
        model = build_model(case.op, args, kwargs)
        row = {"op": case.op, "case": case.name}
        if model is None:
            rows.append({**row, "status": "NOT_EXPRESSIBLE", "detail": not_expressible(case.op, args, kwargs)})
            continue
        try:
            truth, ref = reference_outputs(case, args, kwargs)
            rows.append({**row, **judge_onnxruntime(case.op, args, kwargs, run_model(model, case.op, args), truth, ref)})
        except Exception as exc:  # noqa: BLE001 - reported as a row, never hidden
            rows.append({**row, "status": "ERROR", "detail": f"{type(exc).__name__}: {exc}"})
    return rows


def check_exported(golden_dir, ops=None) -> list[dict]:
    """Run every exported ``<op>/<case>/model.onnx`` under ``golden_dir`` on onnxruntime and judge
    it against the exported vectors (the truth and the reference outputs stored next to it).
    A damaged file is a CORRUPT row."""
    from pathlib import Path

    from hal.conformance.golden import CorruptVector, load_case, read_manifest
    root = Path(golden_dir)
    rows = []
    for e in read_manifest(root)["cases"]:
        if ops is not None and e["op"] not in ops:
            continue
        row = {"op": e["op"], "case": e["case"]}
        if not e.get("has_onnx_model"):
            if e["op"] in ONNX_OPS:
                rows.append({**row, "status": "NOT_EXPRESSIBLE", "detail": e.get("onnx_note", "")})
            continue
        try:
            args, kwargs, truth, ref = load_case(root, e)
            model = (root / e["op"] / e["case"] / "model.onnx").read_bytes()
        except CorruptVector as exc:
            rows.append({**row, "status": "CORRUPT", "detail": str(exc)})
            continue
        try:
            rows.append({**row, **judge_onnxruntime(e["op"], args, kwargs, run_model(model, e["op"], args), truth, ref)})
        except Exception as exc:  # noqa: BLE001
            rows.append({**row, "status": "ERROR", "detail": f"{type(exc).__name__}: {exc}"})
    return rows
