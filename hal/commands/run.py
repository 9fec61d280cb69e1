"""``hal run``: generate with a model on a backend and show who ran what."""
from __future__ import annotations

import math
import os
import sys

import click

from hal.cli import EXIT_BACKEND, EXIT_INPUT, EXIT_USAGE
from hal.commands._common import emit_json, fail, file_target, one_line


def _parse_ids(text: str) -> list[list[int]]:
    """'1,2,3' -> [[1, 2, 3]]; several prompts separated by ';' ('1,2;3,4,5')."""
    try:
        return [[int(t) for t in part.split(",") if t.strip()] for part in text.split(";") if part.strip()]
    except ValueError as exc:
        raise click.BadParameter(f"expected comma-separated integers (';' between prompts), got {text!r}",
                                 param_hint="--prompt-ids") from exc


def _finite(ctx, param, value):
    """click callback: refuse NaN and infinities, which FloatRange lets through (NaN compares false)."""
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"expected a finite number, got {value}")
    return value


@click.command()
@click.option("--backend", "-b", default="auto", show_default=True, help="Backend name, or auto (best available).")
@click.option("--model", "-m", "model_name", default="tiny-glm5", show_default=True,
              help="Built-in model (tiny-glm5, tiny-deepseek-v32, tiny-glm45, tiny-qwen35, tiny-kimi-linear) or a "
              "Hugging Face model folder.")
@click.option("--prompt", "prompts", multiple=True,
              help="Prompt text (built-in models: their small tokenizer; a folder: its tokenizer.json); repeatable.")
@click.option("--prompt-ids", "prompt_ids", help="Token ids, e.g. 1,2,3; several prompts: '1,2,3;4,5'.")
@click.option("--max-new-tokens", default=16, show_default=True, type=click.IntRange(1))
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(0), callback=_finite,
              help="0 = greedy.")
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0, 1, min_open=True), callback=_finite)
@click.option("--seed", default=0, show_default=True, help="Sampling seed.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True)
@click.option("--quantize", type=click.Choice(["fp8"]), default=None, help="Quantize weights to 128x128 block FP8 on load.")
@click.option("--mla-form", type=click.Choice(["auto", "absorbed", "expanded"]), default="auto", show_default=True,
              help="MLA models: auto = expanded prefill + absorbed decode; absorbed / expanded force one form.")
@click.option("--logits-out", type=click.Path(dir_okay=False), callback=file_target,
              help="Write the prompt's prefill logits [B, S, vocab] (.npy) into an existing folder.")
@click.option("--nproc-per-node", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Run on N local ranks (torch.distributed.run): the routed experts expert-parallel over the ranks, "
              "everything else replicated; rank 0 prints. Also works when started by torchrun.")
@click.option("--tp", "tp_size", type=click.IntRange(1, 64), default=1, show_default=True,
              help="With --nproc-per-node N: tensor-parallel size T (T divides N; groups of T consecutive ranks "
              "split the attention heads and the dense / shared-expert MLPs, the routed experts stay expert parallel "
              "over all N ranks).")
@click.option("--nnodes", default="1", show_default=True, help="With --nproc-per-node: torchrun's node count (multi-node).")
@click.option("--node-rank", type=click.IntRange(0), default=0, show_default=True, help="With --nnodes > 1: this node.")
@click.option("--rdzv-endpoint", default=None, help="With --nnodes > 1: HOST:PORT of the rendezvous (torchrun's).")
@click.option("--dist-timeout", type=click.IntRange(1), default=300, show_default=True,
              help="Seconds a collective may wait before the rank gives up (a failed rank never hangs the others).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def run(backend, model_name, prompts, prompt_ids, max_new_tokens, temperature, top_p, seed, dtype, quantize, mla_form,
        logits_out, nproc_per_node, nnodes, node_rank, rdzv_endpoint, dist_timeout, tp_size, as_json):
    """Generate tokens with a model on a backend; print them, the speed and the runtime plan.

    \b
    hal run                                   tiny-glm5 on the best available backend
    hal run --backend ascend --model tiny-deepseek-v32
    hal run --model /path/to/GLM-4.5-Air --prompt "Hello"
    hal run --prompt-ids 1,2,3 --max-new-tokens 8 --quantize fp8 --json
    hal run --nproc-per-node 4 --model tiny-glm5        expert parallel over 4 local ranks
    hal run --nproc-per-node 4 --tp 2 -m tiny-glm45     + tensor parallel in groups of 2 ranks
    torchrun --nproc-per-node 4 -m hal.cli run         the same, started by torchrun

    The plan lists every contract op with the backend that ran it, its path (native / emulated /
    fallback), how many calls and how long. Built-in models have random weights: their tokens are
    meaningless, their computation is the real architecture's (they ship a small byte-level
    tokenizer, so --prompt TEXT works). Exit codes: 0 ok, 2 bad option (NaN temperature,
    --logits-out into a missing folder: checked before loading), 3 backend unavailable, 4 bad
    model folder, checkpoint, tokenizer.json or prompt (one line, nothing written), or sizes that do
    not divide over the ranks (experts by N, heads by --tp). With several ranks: 1 when any rank
    failed (torchrun stops the others; each failed rank's error line names its rank).
    """
    if nproc_per_node > 1 and "TORCHELASTIC_RUN_ID" not in os.environ:
        from hal.commands._launch import launch_ranks
        sys.exit(launch_ranks(sys.argv, nproc_per_node, nnodes, node_rank, rdzv_endpoint))
    import numpy as np

    import hal
    import hal.models as M
    if prompts and prompt_ids is not None:
        raise click.UsageError("give --prompt or --prompt-ids, not both")
    ids = _parse_ids(prompt_ids) if prompt_ids is not None else None
    from hal.commands._launch import join_ranks, rank_prefix
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    quiet = rank != 0                                   # only rank 0 prints results; every rank prints its errors
    if world % tp_size:
        fail(rank_prefix() + f"--tp {tp_size} must divide the number of ranks ({world}; set it with --nproc-per-node)",
             EXIT_USAGE, as_json=as_json)
    try:
        rt = hal.runtime(backend, profile=True)
        group = join_ranks(rt.device_type, dist_timeout) if world > 1 else None
        from hal.models.parallel import tp_group
        tp = tp_group(tp_size)
        model = M.load(model_name, backend, dtype=dtype, quantize=quantize, show_progress=not as_json and not quiet,
                       mla_form=mla_form, runtime=rt, ep_group=group.name if group else None, tp_group=tp.name)
    except hal.BackendUnavailable as exc:
        fail(rank_prefix() + str(exc), EXIT_BACKEND, as_json=as_json, backend=exc.backend, status=exc.status,
             reason=exc.reason)
    except (M.CheckpointError, M.ModelConfigError, OSError, ValueError) as exc:
        fail(rank_prefix() + one_line(exc), EXIT_INPUT, as_json=as_json)
    if prompts:
        if model.tokenizer is None:
            why = "the tokenizers package is not installed (pip install 'hal[models]')" \
                if model_name in M.BUILTIN else "it has no tokenizer.json"
            fail(f"model {model_name!r} cannot encode --prompt: {why}; use --prompt-ids", EXIT_INPUT, as_json=as_json)
        ids = [model.tokenizer.encode(p).ids for p in prompts]
    elif ids is None:
        ids = [list(M.DEFAULT_PROMPT_IDS)]
    try:
        res = M.generate(model, ids, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    except M.PromptError as exc:
        fail(rank_prefix() + one_line(exc), EXIT_INPUT, as_json=as_json)
    if quiet:
        return
    if logits_out:
        try:
            np.save(logits_out, res.prefill_logits.numpy())
        except OSError as exc:
            fail(f"--logits-out {logits_out}: {one_line(exc)}", EXIT_USAGE, as_json=as_json)
    texts = [model.tokenizer.decode(t) for t in res.tokens] if model.tokenizer is not None else None
    prompt_texts = [model.tokenizer.decode(p) for p in res.prompts] if model.tokenizer is not None else None
    rt = model.rt
    out = {"model": model.source, "model_type": model.config.model_type, "backend": rt.backend_name, "label": rt.label,
           "dtype": dtype, "quantize": quantize, "mla_form": mla_form, "prompts": res.prompts, "tokens": res.tokens, "text": texts,
           "prefill_tokens_per_s": res.prefill_tokens_per_s, "decode_tokens_per_s": res.decode_tokens_per_s,
           "prefill_s": res.prefill_s, "decode_s": res.decode_s, "plan": rt.plan_dict(), "logits_out": logits_out,
           "world_size": world, "tp_size": tp_size}
    if as_json:
        emit_json(out)
        return
    click.echo(f"model {model.source} ({model.config.model_type}, {dtype}{', fp8 weights' if quantize else ''}) "
               f"on {rt.label}" + (f", experts parallel over {world} ranks" if world > 1 else "")
               + (f", tensor parallel in groups of {tp_size}" if tp_size > 1 else ""))
    for b, toks in enumerate(res.tokens):
        click.echo(f"[{b}] prompt ids {res.prompts[b]}" + (f" = {prompt_texts[b]!r}" if prompt_texts else ""))
        click.echo(f"[{b}] output ids {toks}")
        if texts:
            click.echo(f"[{b}] output text {texts[b]!r}")
    click.echo(f"prefill {res.prefill_tokens_per_s:.1f} tok/s ({res.prefill_s * 1e3:.1f} ms), "
               f"decode {res.decode_tokens_per_s:.1f} tok/s ({res.decode_s * 1e3:.1f} ms)")
    click.echo("\nruntime plan:\n" + rt.plan_table(with_stats=True))
    if logits_out:
        click.echo(f"prefill logits {tuple(res.prefill_logits.shape)} written to {logits_out}")
    sys.stdout.flush()
