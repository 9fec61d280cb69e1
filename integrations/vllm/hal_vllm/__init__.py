"""hal-vllm: a vLLM general plugin that runs vLLM's MoE experts, block-FP8 linears and DSA indexer
through a HAL runtime.

vLLM calls :func:`register` (entry point group ``vllm.general_plugins``) in every process it starts.
It checks the vLLM version against :data:`SUPPORTED_VLLM`; on a version it does not know it logs
why and registers nothing, so vLLM runs exactly as without the plugin. On a supported version it
replaces, through vLLM's out-of-tree APIs only:

- ``UnquantizedFusedMoEMethod`` (``CustomOp.register_oot``): the routed experts of every
  unquantized MoE layer run as HAL ``moe_forward`` (routing included) or, when vLLM hands over
  precomputed top-k, as ``moe_dispatch`` -> ``moe_experts`` -> ``moe_combine``;
- the ``fp8`` checkpoint format with 128x128 weight blocks (the quantization config registry:
  a ``hal_fp8`` method that claims those checkpoints): every block-FP8 linear runs HAL
  ``fp8_linear``;
- ``SparseAttnIndexer`` (``CustomOp.register_oot``): the DSA indexer's scoring and top-k run as
  HAL ``lightning_indexer`` over the paged FP8 key cache.

Environment: ``HAL_BACKEND`` picks the HAL backend (default ``auto``); ``HAL_VLLM_DISABLE=1``
registers nothing; ``HAL_VLLM_OPS=moe,fp8,indexer`` registers only the listed replacements;
``HAL_VLLM_PROFILE_OUT=DIR`` counts HAL calls and writes ``DIR/hal-profile-<pid>.json``.
"""
from __future__ import annotations

import logging
import os

__version__ = "0.1.0"

#: vLLM release series this plugin was written against and tested with (major, minor).
SUPPORTED_VLLM = ((0, 32),)

REPLACEMENTS = ("moe", "fp8", "indexer")

logger = logging.getLogger("vllm.hal_vllm")

_registered: list[str] = []


def parse_version(text: str) -> tuple[int, int, int] | None:
    """``"0.32.0"`` / ``"0.32.1+cpu"`` / ``"0.32.0rc1"`` -> (0, 32, 0); None when not ``X.Y[.Z]...``."""
    parts = []
    for piece in text.split("+", 1)[0].split(".")[:3]:
        digits = ""
        for ch in piece:
            if not ch.isdigit():
                break
            digits += ch
        if not digits:
            break
        parts.append(int(digits))
    if len(parts) < 2:
        return None
    return (parts[0], parts[1], parts[2] if len(parts) > 2 else 0)


def version_problem(text: str) -> str | None:
    """Why vLLM version ``text`` is not supported, or None when it is."""
    v = parse_version(text)
    wanted = ", ".join(f"{a}.{b}.x" for a, b in SUPPORTED_VLLM)
    if v is None:
        return f"cannot read vLLM's version {text!r}; hal-vllm supports {wanted}"
    if v[:2] not in SUPPORTED_VLLM:
        return f"vLLM {text} is not a version hal-vllm supports ({wanted})"
    return None


def selected_replacements() -> tuple[str, ...]:
    """The replacements ``HAL_VLLM_OPS`` asks for (all of :data:`REPLACEMENTS` when unset)."""
    raw = os.environ.get("HAL_VLLM_OPS", "").strip()
    if not raw:
        return REPLACEMENTS
    asked = tuple(x.strip() for x in raw.split(",") if x.strip())
    unknown = [x for x in asked if x not in REPLACEMENTS]
    if unknown:
        raise ValueError(f"HAL_VLLM_OPS: expected a comma list of {', '.join(REPLACEMENTS)}, got {raw!r}")
    return asked


def register() -> list[str]:
    """The ``vllm.general_plugins`` entry point. Returns the names of what it registered (also
    kept in ``hal_vllm.registered()``). Safe to call more than once per process."""
    if _registered:
        return list(_registered)
    if os.environ.get("HAL_VLLM_DISABLE", "") not in ("", "0"):
        logger.info("hal-vllm: HAL_VLLM_DISABLE is set; registering nothing")
        return []
    try:
        import vllm
        version = getattr(vllm, "__version__", "unknown")
    except Exception as exc:  # noqa: BLE001 - vLLM's import failing is its own error to report
        logger.warning("hal-vllm: vLLM cannot be imported (%s); registering nothing", exc)
        return []
    problem = version_problem(version)
    if problem is not None:
        logger.warning("hal-vllm: %s; registering nothing (vLLM runs its own kernels)", problem)
        return []
    try:
        import hal  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        logger.warning("hal-vllm: HAL cannot be imported (%s); registering nothing", exc)
        return []
    try:
        wanted = selected_replacements()
    except ValueError as exc:
        logger.error("hal-vllm: %s; registering nothing", exc)
        return []
    import importlib
    for name in wanted:
        try:
            _registered.append(importlib.import_module(f"hal_vllm.{name}").register())
        except Exception:  # noqa: BLE001 - one replacement failing must not take vLLM down
            logger.exception("hal-vllm: registering the %s replacement failed; vLLM keeps its own", name)
    logger.info("hal-vllm %s: vLLM %s, replaced: %s", __version__, version, "; ".join(_registered) or "nothing")
    return list(_registered)


def registered() -> list[str]:
    """What :func:`register` replaced in this process."""
    return list(_registered)
