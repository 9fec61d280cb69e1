"""Certify an exported graph: onnxruntime's logits against HAL's own, at prefill and at one
decode step that feeds the graph's ``present.*`` back as ``past_key_values.*``.

Truth is the HAL model on the CPU reference evaluated in float64 (``float64_evaluation``; the
model returns its logits as float32). ``hal_ref`` is the same model at its working precision
(float32), i.e. what ``hal run --backend cpu`` computes. onnxruntime is judged like a backend
against the contract's budget for ``moe_forward``'s output, the widest op budget these models
use: ``max|ort - truth| <= 2 * max|hal_ref - truth| + 1e-5`` and
``calc_diff(ort, truth) <= 2 * calc_diff(hal_ref, truth) + 1e-7``. Also reported: the errors
against ``hal_ref`` directly (max abs, and max abs relative to max |logit|).
"""
from __future__ import annotations

import numpy as np
import torch

BUDGET_OP = "moe_forward"


def budget():
    """The FloatBudget the logits are held to (``moe_forward``'s output budget)."""
    import hal
    return hal.CONTRACT[BUDGET_OP].outputs["out"]


def _session(model_bytes_or_path):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model_bytes_or_path, sess_options=opts, providers=["CPUExecutionProvider"])


def _hal_steps(model, ids: torch.Tensor, next_ids_fn) -> list[torch.Tensor]:
    """[prefill logits [B, S, V], decode logits [B, 1, V]] from ``model.forward`` with its cache."""
    B, S = ids.shape
    cache = model.new_cache(B, S + 1)
    pre = model.forward(ids, cache, torch.zeros(B, dtype=torch.long), torch.full((B,), S), unpadded=True)
    nxt = next_ids_fn(pre)
    dec = model.forward(nxt, cache, torch.full((B,), S), torch.ones(B, dtype=torch.long), unpadded=True)
    return [pre, dec]


def _ort_steps(sess, info: dict, ids: torch.Tensor, nxt: torch.Tensor) -> list[torch.Tensor]:
    from hal.export.onnx import empty_cache
    B, S = ids.shape
    names = {v["name"] for v in info["inputs"]}
    feeds = {"input_ids": ids.numpy(), "position_ids": np.tile(np.arange(S, dtype=np.int64), (B, 1)),
             **empty_cache(info, B)}
    if "attention_mask" in names:
        feeds["attention_mask"] = np.ones((B, S), dtype=np.int64)
    out_names = [o.name for o in sess.get_outputs()]
    pre = dict(zip(out_names, sess.run(None, feeds)))
    feeds = {"input_ids": nxt.numpy(), "position_ids": np.full((B, 1), S, dtype=np.int64),
             **{n.replace("present.", "past_key_values.", 1): v for n, v in pre.items() if n.startswith("present.")}}
    if "attention_mask" in names:
        feeds["attention_mask"] = np.ones((B, S + 1), dtype=np.int64)
    dec = dict(zip(out_names, sess.run(None, feeds)))
    return [torch.from_numpy(np.array(pre["logits"])), torch.from_numpy(np.array(dec["logits"]))]


def check_onnx(model_bytes_or_path, info: dict, name_or_path: str, *, seq: int = 16, batch: int = 2, seed: int = 0,
               quantize=None) -> dict:
    """Run the exported graph on onnxruntime (CPU) and judge its logits against HAL's reference.

    info: the export's info dict (``runnable_in_onnxruntime`` false -> nothing runs, the result
    says why). seq, batch: the prefill's shape (random token ids from ``seed``); the decode
    step feeds each sequence's greedy next token. Returns {"ran", "passed", "budget",
    "prompt_shape", "steps": [{"step", "shape", "max_abs", "calc_diff", "budget_abs",
    "budget_calc_diff", "ref_max_abs", "ref_calc_diff", "max_abs_vs_hal", "max_rel_vs_hal",
    "passed", "message"}]}."""
    import hal
    import hal.models as M
    from hal.backends.cpu import float64_evaluation
    from hal.conformance.metrics import check_float
    b = budget()
    result = {"ran": False, "passed": False, "budget_op": BUDGET_OP,
              "budget": {"multiple": b.multiple, "abs_floor": b.abs_floor, "calc_diff_floor": b.calc_diff_floor},
              "prompt_shape": [batch, seq], "steps": []}
    if not info.get("runnable_in_onnxruntime"):
        result["reason"] = "not possible: " + info.get("not_runnable_reason", "the graph is not runnable")
        return result
    hal_model = M.load(name_or_path, "cpu", dtype=torch.float32, quantize=quantize)
    truth_rt = hal.runtime("cpu", validate=False)          # the contract's dtype checks refuse float64
    truth_model = M.load(name_or_path, runtime=truth_rt, dtype=torch.float64, quantize=quantize)
    V = hal_model.config.vocab_size
    ids = torch.randint(0, V, (batch, seq), generator=torch.Generator().manual_seed(seed))
    ref = _hal_steps(hal_model, ids, lambda logits: logits[:, -1].argmax(-1, keepdim=True))
    nxt = ref[0][:, -1].argmax(-1, keepdim=True)
    with float64_evaluation():
        truth = _hal_steps(truth_model, ids, lambda _logits: nxt)
    got = _ort_steps(_session(model_bytes_or_path), info, ids, nxt)
    for step, g, t, r in zip(("prefill", "decode"), got, truth, ref):
        c = check_float("logits", g, t, r, b)
        d = (g.double() - r.double()).abs().max()
        result["steps"].append({
            "step": step, "shape": list(g.shape), "max_abs": c.max_abs, "calc_diff": c.calc_diff,
            "budget_abs": c.budget_abs, "budget_calc_diff": c.budget_calc_diff, "ref_max_abs": c.ref_max_abs,
            "ref_calc_diff": c.ref_calc_diff, "max_abs_vs_hal": float(d),
            "max_rel_vs_hal": float(d / r.double().abs().max().clamp_min(1e-30)), "passed": c.passed,
            "message": c.message})
    result["ran"] = True
    result["passed"] = all(s["passed"] for s in result["steps"])
    import onnxruntime
    result["onnxruntime_version"] = onnxruntime.__version__
    return result
