"""``hal export``: write a HAL model in another runtime's format (today: ``hal export onnx``)."""
from __future__ import annotations

import sys

import click

from hal.cli import EXIT_FAILED, EXIT_INPUT
from hal.commands._common import emit_json, fail, file_target, one_line, missing_module_exit, require_extra


@click.group()
def export():
    """Export a HAL model to another runtime's format.

    \b
    hal export onnx --model tiny-glm45 --out glm45.onnx --check
    """


@export.command("onnx")
@click.option("--model", "-m", "model_name", required=True, metavar="NAME|DIR",
              help="Built-in model (tiny-glm45, tiny-glm5, tiny-deepseek-v32) or a Hugging Face model folder.")
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False), callback=file_target,
              help="The .onnx file to write (its folder must exist); replaced atomically.")
@click.option("--opset", type=click.IntRange(18, 23), default=21, show_default=True, help="ONNX opset (18-23).")
@click.option("--quantize", type=click.Choice(["fp8"]), default=None,
              help="Quantize weights to 128x128 block FP8 first: FP8 layers export as hal.* nodes (not runnable).")
@click.option("--check", is_flag=True, help="Run the graph on onnxruntime (CPU) at prefill and one decode step and "
              "compare its logits with HAL's reference within the contract's budget; exit 1 if outside.")
@click.option("--seq", default=16, show_default=True, type=click.IntRange(1, 4096),
              help="Prefill length of the --check prompt (batch 2, random ids from --seed).")
@click.option("--seed", default=0, show_default=True, help="Seed of the --check prompt.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def onnx(model_name, out, opset, quantize, check, seq, seed, as_json):
    """Export a model as one ONNX graph with a KV-cache interface.

    \b
    hal export onnx --model tiny-glm45 --out glm45.onnx --check
    hal export onnx --model /path/to/GLM-4.5-Air --out air.onnx
    hal export onnx --model tiny-glm5 --out glm5.onnx --json

    Inputs: input_ids [B, S], position_ids [B, S], attention_mask [B, P+S] (GQA models), and per
    layer past_key_values.<i>.* (P = 0 for a prefill); outputs: logits [B, S, vocab] and
    present.<i>.*, fed back as past_key_values for the next step.

    GLM-4.5-family models (GQA + MoE) become standard ONNX plus com.microsoft.MoE (routing as
    plain ONNX ops) and run on onnxruntime's CPUExecutionProvider. GLM-5 / DeepSeek-V3.2 (DSA)
    and FP8 layers become hal.* custom-domain nodes carrying the contract's text: valid ONNX,
    but onnxruntime needs a custom-op library for them, so the command reports them
    runnable_in_onnxruntime: false and --check says it is not possible. docs/export.md.

    \b
    Exit codes: 0 written (and --check passed, or was not possible); 1 --check ran and the
    logits are outside the budget; 2 bad option (--out a folder, in a missing or unwritable
    folder: checked before loading) or a missing extra (pip install 'hal[conformance]');
    4 unknown model, bad model folder or a model with a part that has no ONNX form here (one
    line naming it), or --out could not be written (nothing is left behind).
    """
    require_extra("hal export onnx" + (" --check" if check else ""), ("onnx", "onnxruntime") if check else ("onnx",),
                  as_json=as_json)
    import torch

    import hal.models as M
    try:
        from hal.export.onnx import ExportError, build_graph
        from hal.export.save import save_model
    except ImportError as exc:
        missing_module_exit(exc, "hal export onnx", as_json=as_json)
    try:
        model = M.load(model_name, "cpu", dtype=torch.float32, quantize=quantize)
    except (M.CheckpointError, M.ModelConfigError, OSError) as exc:
        fail(f"model {model_name!r}: {one_line(exc)}", EXIT_INPUT, as_json=as_json)
    try:
        exported = build_graph(model, opset=opset, name=f"hal_{model.config.model_type}")
    except ExportError as exc:
        fail(f"model {model_name!r}: {exc}", EXIT_INPUT, as_json=as_json)
    del model
    data = None
    if check and exported.info["runnable_in_onnxruntime"]:
        data = exported.model.SerializeToString() if exported.model.ByteSize() < 2**31 - 1 else None
    try:
        saved = save_model(exported.model, out)
    except OSError as exc:
        fail(f"cannot write {out}: {exc.strerror or one_line(exc)}; nothing was written", EXIT_INPUT, as_json=as_json)
    import onnx as onnx_pkg
    result = {"model": model_name, **exported.info, "out": saved["path"], "bytes": saved["bytes"],
              "external_data": saved["external_data"], "onnx_version": onnx_pkg.__version__, "check": None}
    if check:
        from hal.export.check import check_onnx
        result["check"] = check_onnx(data if data is not None else saved["path"], exported.info, model_name, seq=seq,
                                     seed=seed, quantize=quantize)
    if as_json:
        emit_json(result)
    else:
        _print(result)
    if check and result["check"]["ran"] and not result["check"]["passed"]:
        sys.exit(EXIT_FAILED)


def _shape(v: dict) -> str:
    return f"{v['name']} [{', '.join(map(str, v['shape']))}] {v['dtype']}"


def _print(r: dict) -> None:
    click.echo(f"exported {r['model']} ({r['model_type']}) to {r['out']} ({r['bytes'] / 1e6:.1f} MB"
               + (f" + {r['external_data']}" if r["external_data"] else "") + f", opset {r['opset']})")
    ins = [v for v in r["inputs"] if not v["name"].startswith("past_key_values.")]
    outs = [v for v in r["outputs"] if not v["name"].startswith("present.")]
    cache = [v for v in r["inputs"] if v["name"].startswith("past_key_values.0.")]
    click.echo("inputs: " + ", ".join(_shape(v) for v in ins) + "; per layer i: "
               + ", ".join(_shape(v).replace("past_key_values.0.", "past_key_values.<i>.") for v in cache))
    click.echo("outputs: " + ", ".join(_shape(v) for v in outs)
               + "; per layer i: present.<i>.* [.., total_sequence, ..]")
    if r["moe_nodes"]:
        click.echo(f"MoE: {r['moe_nodes']} x com.microsoft.MoE (routing as plain ONNX ops)")
    for c in r["custom_nodes"]:
        click.echo(f"custom node {c['op']} x {c['count']}: {c['why']}")
    if r["runnable_in_onnxruntime"]:
        click.echo("runnable in onnxruntime: yes (CPUExecutionProvider)")
    else:
        click.echo(f"runnable in onnxruntime: no: {r['not_runnable_reason']}")
    c = r["check"]
    if c is None:
        return
    if not c["ran"]:
        click.echo(f"check: {c['reason']}")
        return
    b, (B, S) = c["budget"], c["prompt_shape"]
    click.echo(f"check: onnxruntime {c['onnxruntime_version']} vs HAL's reference, prompt {B}x{S} + 1 decode step, "
               f"budget {c['budget_op']}'s: {b['multiple']:g} x reference error + {b['abs_floor']:g}: "
               + ("PASS" if c["passed"] else "FAIL"))
    for s in c["steps"]:
        click.echo(f"  {s['step']} logits {s['shape']}: max abs {s['max_abs']:.3g} vs float64 truth (budget "
                   f"{s['budget_abs']:.3g}, HAL fp32 {s['ref_max_abs']:.3g}), calc_diff {s['calc_diff']:.3g} (budget "
                   f"{s['budget_calc_diff']:.3g}); vs HAL fp32: max abs {s['max_abs_vs_hal']:.3g}, "
                   f"rel {s['max_rel_vs_hal']:.3g}" + (f": {s['message']}" if s["message"] else ""))
