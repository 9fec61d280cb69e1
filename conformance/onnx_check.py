"""An independent check of the reference: the ops standard ONNX can express, run by onnxruntime.

- ``fp8_gemm``: blocked ``DequantizeLinear`` (opset 21, FLOAT8E4M3FN initializers) for both operands
  (B's 128x128 grid is expanded to 128-row blocks of 1x128 scales, the same numbers), ``Transpose``,
  ``MatMul`` (+ ``Add`` bias) in fp32.
- ``fp8_quantize``: ``Pad``/``Reshape`` into groups, ``ReduceMax(Abs)``, ``Max(1e-4)``, ``Div(448)``,
  for ue8m0 ``Log``/``Ceil``/``Pow``, then ``Div``, ``Clip(+-448)``, ``Cast`` to FLOAT8E4M3FN and
  back to float (the codes' values).
- ``moe_route`` without groups: ``Sigmoid``/``Softmax``, ``Add`` bias, ``TopK`` (ties -> lower
  index), ``GatherElements``, renormalize, scale.
onnxruntime's Python ``run()`` does not take float8 feeds, so fp8 tensors are initializers of the
model. Cases with NaN/Inf inputs and grouped routing are outside what these graphs express.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
from onnx import TensorProto, helper

from hal.conformance.tensorproto import to_proto

OPSET = 21


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
        inits += [_const("two", 2.0), _const("ln2", math.log(2.0))]
        nodes += [helper.make_node("Log", ["s0"], ["ls"]), helper.make_node("Div", ["ls", "ln2"], ["l2"]),
                  helper.make_node("Ceil", ["l2"], ["cl"]), helper.make_node("Pow", ["two", "cl"], ["s1"])]
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


def _route_model(logits, *, top_k, scoring="sigmoid", correction_bias=None, renormalize=True, scaling_factor=1.0, **_):
    T, E = logits.shape
    inits = [_const("k", [top_k], np.int64), _const("eps", 1e-20), _const("scaling", scaling_factor),
             _const("axis", [-1], np.int64)]
    nodes = [helper.make_node("Sigmoid", ["logits"], ["s"]) if scoring == "sigmoid"
             else helper.make_node("Softmax", ["logits"], ["s"], axis=-1)]
    sel = "s"
    if correction_bias is not None:
        inits.append(to_proto(correction_bias.float(), "bias"))
        nodes.append(helper.make_node("Add", ["s", "bias"], ["c"]))
        sel = "c"
    nodes += [helper.make_node("TopK", [sel, "k"], ["top_vals", "ids64"], axis=-1, largest=1, sorted=1),
              helper.make_node("GatherElements", ["s", "ids64"], ["w0"], axis=-1),
              helper.make_node("Cast", ["ids64"], ["expert_ids"], to=TensorProto.INT32)]
    w = "w0"
    if renormalize:
        nodes += [helper.make_node("ReduceSum", ["w0", "axis"], ["wsum"], keepdims=1),
                  helper.make_node("Add", ["wsum", "eps"], ["wden"]), helper.make_node("Div", ["w0", "wden"], ["w1"])]
        w = "w1"
    nodes.append(helper.make_node("Mul", [w, "scaling"], ["weights"]))
    return _model(nodes, [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [T, E])],
                  [helper.make_tensor_value_info("weights", TensorProto.FLOAT, [T, top_k]),
                   helper.make_tensor_value_info("expert_ids", TensorProto.INT32, [T, top_k])], inits)


def expressible(op: str, args, kwargs) -> bool:
    """Whether this case is inside what the ONNX graphs above express."""
    if op not in ("fp8_gemm", "fp8_quantize", "moe_route"):
        return False
    tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.is_floating_point()]
    if any(not bool(torch.isfinite(t.float()).all()) for t in tensors):
        return False
    if any(t.numel() == 0 for t in tensors):
        return False
    if op == "moe_route" and kwargs.get("n_group", 1) > 1:
        return False
    return True


def build_model(op: str, args, kwargs) -> Optional[object]:
    """The ONNX model computing this case (None when the op or case is not expressible)."""
    if not expressible(op, args, kwargs):
        return None
    if op == "fp8_gemm":
        return _gemm_model(*args, **kwargs)
    if op == "fp8_quantize":
        return _quantize_model(*args, **kwargs)
    return _route_model(*args, **kwargs)


def run_model(model, op: str, args) -> list[torch.Tensor]:
    """Run the model with onnxruntime's CPU provider; returns its outputs as tensors."""
    import onnxruntime as ort
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {}
    if op == "fp8_quantize":
        feeds["x"] = args[0].float().numpy()
    elif op == "moe_route":
        feeds["logits"] = args[0].float().numpy()
    return [torch.from_numpy(np.asarray(o)) for o in sess.run(None, feeds)]


def compare(op: str, args, kwargs, ort_out: list) -> tuple[bool, str]:
    """onnxruntime's outputs against the reference's (working precision)."""
    from hal.backends.cpu import KERNELS
    from hal.conformance.metrics import calc_diff
    if op == "fp8_gemm":
        ref = KERNELS[op](*args, **{**kwargs, "out_dtype": torch.float32})
        cd = calc_diff(ort_out[0], ref)
        err = float((ort_out[0] - ref).abs().max()) if ref.numel() else 0.0
        scale = float(ref.abs().max()) if ref.numel() else 0.0
        ok = cd < 1e-10 and err <= 1e-5 * max(scale, 1.0)
        return ok, f"calc_diff {cd:.2e}, max abs {err:.2e}"
    if op == "fp8_quantize":
        q, s = KERNELS[op](*args, **kwargs)
        same_q = torch.equal(ort_out[0], q.float())
        same_s = torch.equal(ort_out[1], s)
        n = int((ort_out[0] != q.float()).sum())
        return same_q and same_s, f"codes {'equal' if same_q else f'differ at {n} positions'}, " \
                                  f"scales {'equal' if same_s else 'differ'}"
    w, ids = KERNELS[op](*args, **kwargs)
    same_ids = torch.equal(ort_out[1], ids)
    err = float((ort_out[0] - w).abs().max()) if w.numel() else 0.0
    return same_ids and err <= 1e-6, f"ids {'equal' if same_ids else 'differ'}, weights max abs {err:.2e}"


def check_reference(level: str = "quick", seed: int = 0) -> list[dict]:
    """Run every expressible case through onnxruntime and compare with the reference."""
    from hal.conformance.cases import catalog
    rows = []
    for case in catalog(level, ("fp8_gemm", "fp8_quantize", "moe_route")):
        args, kwargs = case.materialize(seed)
        model = build_model(case.op, args, kwargs)
        if model is None:
            rows.append({"op": case.op, "case": case.name, "status": "NOT_EXPRESSIBLE", "detail": ""})
            continue
        try:
            ok, detail = compare(case.op, args, kwargs, run_model(model, case.op, args))
            rows.append({"op": case.op, "case": case.name, "status": "PASS" if ok else "FAIL", "detail": detail})
        except Exception as exc:  # noqa: BLE001
            rows.append({"op": case.op, "case": case.name, "status": "ERROR", "detail": f"{type(exc).__name__}: {exc}"})
    return rows
