"""HAL's conformance suite: certify a backend against the CPU reference (``hal.conformance``).

- :mod:`hal.conformance.cases`: the case catalog (quick / full levels, seeded).
- :mod:`hal.conformance.metrics`: calc_diff, errors, budgets, selection-by-score, exact plans.
- :mod:`hal.conformance.runner`: runs cases on a backend -> :class:`CaseResult` rows with status
  PASS / FAIL / ERROR / UNSUPPORTED / SKIPPED / NONDETERMINISTIC / CORRUPT and the path.
- :mod:`hal.conformance.reports`: JSON (schema ``report.schema.json``), JUnit XML, Markdown, HTML.
- :mod:`hal.conformance.golden`: golden vectors in the ONNX backend-test layout.
- :mod:`hal.conformance.onnx_check`: the reference checked against onnxruntime.
- :mod:`hal.conformance.pytest_plugin`: ``pytest --hal-backend NAME``.
"""
from hal.conformance.metrics import calc_diff

__all__ = ["calc_diff"]
