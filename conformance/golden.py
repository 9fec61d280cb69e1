"""Golden vectors: every case's inputs and reference outputs, stored in the ONNX backend-test layout.

``export(out_dir)`` writes, per case, ``<op>/<case>/test_data_set_0/input_N.pb`` (the op's tensor
arguments, a DispatchPlan as its four tensors), ``output_N.pb`` (the float64 evaluation of the
reference: the truth the budgets are measured against) and ``reference_N.pb`` (the reference at
its working precision, whose error sets each budget), plus ``<op>/<case>/model.onnx`` where
standard ONNX can express the op (see :mod:`hal.conformance.onnx_check`), and one
``manifest.json`` (op, case, arguments and attributes, budgets, seed, SHA-256 of every file).
``certify_golden(dir, backend)`` certifies a backend against those files without running the
reference; a file that fails its checksum or does not parse is reported CORRUPT, never as a
backend failure.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from hal import atomic
from hal.contract import CONTRACT, CONTRACT_VERSION, DispatchPlan
from hal.conformance import tensorproto
from hal.conformance.cases import catalog
from hal.conformance.runner import BackendRun, BoundBackend, CaseResult, reference_outputs, run_and_judge

MANIFEST = "manifest.json"
GOLDEN_VERSION = "1.0"
PLAN_FIELDS = ("hidden", "tokens_per_expert", "offsets", "source")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _encode_args(spec, args, kwargs):
    """-> (tensors to store, argument descriptions for the manifest)."""
    bound = spec.signature.bind(*args, **kwargs)
    tensors, described = [], []
    for name, value in bound.arguments.items():
        if isinstance(value, DispatchPlan):
            described.append({"name": name, "kind": "plan", "inputs": list(range(len(tensors), len(tensors) + 4)),
                              "num_tokens": value.num_tokens, "top_k": value.top_k, "align": value.align})
            tensors += list(value.tensors())
        elif isinstance(value, torch.Tensor):
            described.append({"name": name, "kind": "tensor", "input": len(tensors)})
            tensors.append(value)
        elif isinstance(value, torch.dtype):
            described.append({"name": name, "kind": "dtype", "value": str(value).replace("torch.", "")})
        else:
            described.append({"name": name, "kind": "value", "value": value})
    return tensors, described


def _decode_args(spec, described, inputs):
    values = {}
    for d in described:
        if d["kind"] == "plan":
            t = [inputs[i] for i in d["inputs"]]
            values[d["name"]] = DispatchPlan(*t, num_tokens=d["num_tokens"], top_k=d["top_k"], align=d["align"])
        elif d["kind"] == "tensor":
            values[d["name"]] = inputs[d["input"]]
        elif d["kind"] == "dtype":
            values[d["name"]] = getattr(torch, d["value"])
        else:
            values[d["name"]] = d["value"]
    args, kwargs = [], {}
    for name, p in spec.signature.parameters.items():
        if name not in values:
            continue
        if p.kind is p.KEYWORD_ONLY:
            kwargs[name] = values[name]
        else:
            args.append(values[name])
    return tuple(args), kwargs


def _budget_dict(b) -> dict:
    return {"type": type(b).__name__, **dataclasses.asdict(b)}


def export(out_dir, *, level: str = "quick", ops=None, seed: int = 0,
           progress: Optional[Callable[[str], None]] = None) -> dict:
    """Write every case's golden vectors under ``out_dir``; returns the manifest."""
    import shutil

    from hal.conformance import onnx_check
    out = Path(out_dir)
    # an interrupted export must not leave an older manifest describing newer files
    (out / MANIFEST).unlink(missing_ok=True)
    entries = []
    for case in catalog(level, ops):
        spec = CONTRACT[case.op]
        args, kwargs = case.materialize(seed)
        truth, ref = reference_outputs(case, args, kwargs)
        tensors, described = _encode_args(spec, args, kwargs)
        if (out / case.op / case.name).is_dir():
            shutil.rmtree(out / case.op / case.name)            # no stale files from an earlier export
        data = out / case.op / case.name / "test_data_set_0"
        files = {}
        for i, t in enumerate(tensors):
            tensorproto.save(t, data / f"input_{i}.pb", f"input_{i}")
        for prefix, outs in (("output", truth), ("reference", ref)):
            for i, t in enumerate(outs):
                tensorproto.save(t, data / f"{prefix}_{i}.pb", f"{prefix}_{i}")
        model = onnx_check.build_model(case.op, args, kwargs)
        if model is not None:
            atomic.write_bytes(out / case.op / case.name / "model.onnx", model.SerializeToString(), durable=False,
                               parents=True)
        for f in sorted((out / case.op / case.name).rglob("*")):
            if f.is_file():
                files[str(f.relative_to(out))] = _sha(f)
        entries.append({"op": case.op, "case": case.name, "tags": list(case.tags), "arguments": described,
                        "inputs": len(tensors), "outputs": list(spec.outputs), "n_outputs": len(truth),
                        "budgets": {k: _budget_dict(v) for k, v in spec.outputs.items()},
                        "has_onnx_model": model is not None,
                        "onnx_note": onnx_check.not_expressible(case.op, args, kwargs) or "", "files": files})
        if progress:
            progress(case.id)
    manifest = {"golden_version": GOLDEN_VERSION, "contract_version": CONTRACT_VERSION, "level": level,
                "seed": seed, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cases": entries}
    atomic.write_text(out / MANIFEST, json.dumps(manifest, indent=2), parents=True)   # durable, written last
    return manifest


class CorruptVector(Exception):
    """A golden file is missing, fails its checksum or does not parse."""


def load_case(root: Path, entry: dict):
    """(args, kwargs, truth, ref) of one manifest entry; raises CorruptVector."""
    for rel, digest in entry["files"].items():
        f = root / rel
        if not f.exists():
            raise CorruptVector(f"missing golden file {rel}")
        if _sha(f) != digest:
            raise CorruptVector(f"golden file {rel} fails its SHA-256 checksum (corrupted or edited)")
    data = root / entry["op"] / entry["case"] / "test_data_set_0"
    try:
        inputs = [tensorproto.load(data / f"input_{i}.pb") for i in range(entry["inputs"])]
        truth = [tensorproto.load(data / f"output_{i}.pb") for i in range(entry["n_outputs"])]
        ref = [tensorproto.load(data / f"reference_{i}.pb") for i in range(entry["n_outputs"])]
    except Exception as exc:  # noqa: BLE001 - any parse failure is a corrupt vector
        raise CorruptVector(f"golden file of {entry['op']}/{entry['case']} does not parse: {exc}") from exc
    args, kwargs = _decode_args(CONTRACT[entry["op"]], entry["arguments"], inputs)
    return args, kwargs, truth, ref


def read_manifest(golden_dir) -> dict:
    root = Path(golden_dir)
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise CorruptVector(f"{root / MANIFEST}: {exc}") from exc
    if manifest.get("golden_version") != GOLDEN_VERSION:
        raise CorruptVector(f"golden vectors of version {manifest.get('golden_version')!r}, expected {GOLDEN_VERSION}")
    return manifest


def certify_golden(golden_dir, backend: str, *, ops=None, fallback: str = "error",
                   progress: Optional[Callable[[CaseResult], None]] = None) -> BackendRun:
    """Certify ``backend`` against stored vectors (no reference evaluation); ``fallback`` as in
    :func:`hal.conformance.runner.certify`."""
    from hal.registry import get_registry
    root = Path(golden_dir)
    manifest = read_manifest(root)
    rec = get_registry().record(backend)
    av = rec.availability
    run = BackendRun(rec.name, rec.label, rec.status, rec.reason, av.device if av else "",
                     dict(av.versions) if av else {}, [], [], fallback)
    entries = [e for e in manifest["cases"] if ops is None or e["op"] in ops]
    bound = BoundBackend(rec, fallback) if rec.status == "available" else None
    if bound:
        run.plan = bound.plan()
    for e in entries:
        t0 = time.perf_counter()
        res = CaseResult(rec.name, rec.label, e["op"], e["case"], "PASS",
                         bound.paths[e["op"]] if bound else "-", tags=tuple(e.get("tags", ())))
        if bound is None:
            res.status, res.reason = "SKIPPED", f"backend {rec.status}: {rec.reason}"
        elif e["op"] not in bound.ops:
            res.status, res.reason = "UNSUPPORTED", bound.notes[e["op"]]
        else:
            try:
                args, kwargs, truth, ref = load_case(root, e)
            except CorruptVector as exc:
                res.status, res.reason = "CORRUPT", str(exc)
            else:
                run_and_judge(bound, e["op"], args, kwargs, truth, ref, res)
        res.duration_s = time.perf_counter() - t0
        run.results.append(res)
        if progress:
            progress(res)
    return run
