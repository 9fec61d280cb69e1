"""Triton setup and small device helpers shared by the kernels (imported lazily, after the probe).

One kernel object, two ways to run it
--------------------------------------
``triton.jit`` decides when a kernel is *defined* whether it compiles for the GPU
(``JITFunction``) or runs under the interpreter (``InterpretedFunction``), from the process-wide
``TRITON_INTERPRET``. hal-cuda defines every kernel and device helper with :func:`jit` instead: a
:class:`Kernel` is a ``JITFunction`` (the compiler, ``triton.compile`` and the AOT check see an
ordinary Triton function) whose launch picks the mode per call:

- the mode of the calling backend instance (:func:`mode`, set by ``CudaBackend.kernels()`` from
  its ``interpret`` option), else, for a direct call, the tensors' device: CUDA tensors compile and
  run on the GPU, any other device runs under the Triton interpreter;
- an interpreted launch runs the kernel's ``InterpretedFunction`` twin inside
  :func:`interpreter_scope`: Triton's standard library (``tl.sum``, ``tl.max``, ``tl.cumsum``,
  ...) was defined as ``JITFunction`` s when ``triton`` was imported, so for the launch their calls
  (and the tensor member forms, ``x.sum()``) go through interpreted twins as well; everything the
  interpreter replaces in ``triton.language`` (its device-helper calls leave patches behind) is
  put back afterwards, so the same process compiles the same kernels for a GPU right after
  (the interpreter's own globals, which it adds to the module of each function it rewrites,
  stay: its cached rewrites need them, and the compiler never looks them up).
  Nothing is written to ``os.environ`` and ``triton.knobs`` is not touched (no Triton code reads
  ``knobs.runtime.interpret`` during an interpreted launch of these kernels: the standard
  library's constexpr helpers are called without a code generator there).
  Interpreted launches are serialized by a lock (the interpreter keeps its grid in module
  state); a GPU compilation in another thread while one runs is not supported, because Triton's
  interpreter patches ``triton.language`` for the launch's duration.

Triton 3.9's interpreter (what CI runs the kernels on) gets three conversions wrong, found by
the conformance suite and checked in isolation:
- fp32 -> float8e4nv: ties not to even, mantissa overflow not carried (-127.998 -> -64), NaN -> 384;
  so the fp8 rounding is done by hand (:func:`round_to_e4m3`: nearest even on the e4m3 grid in fp32,
  then an exact cast); on a GPU the hardware conversion agrees with it, so both modes give the same codes;
- fp32 -> bfloat16 stores are not rounded to nearest even; so under the interpreter kernels write
  fp32 and torch rounds (:func:`out_buffer` / :func:`finish`); on a GPU kernels store bf16 directly;
- ``tl.dot`` on bfloat16 operands returns garbage; so under the interpreter bf16 operands are
  upcast to fp32 before the dot (``UPCAST`` constexpr); on a GPU they stay bf16 (tensor cores).
"""
from __future__ import annotations

import contextlib
import contextvars
import threading

import triton.language as tl
from triton.runtime.jit import JITFunction

FP8_MAX = 448.0

# launch options of the compiled path; the interpreter takes none of them
LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg", "enable_fp_fusion", "launch_cooperative_grid",
                  "launch_pdl")

_MODE: contextvars.ContextVar = contextvars.ContextVar("hal_cuda_interpret", default=None)


@contextlib.contextmanager
def mode(interpret: bool):
    """Within the block, every hal-cuda launch runs under the Triton interpreter (True) or
    compiled for the GPU (False), whatever the tensors' device (the backend instance's
    ``interpret`` option; ``CudaBackend.kernels()`` wraps each op in it)."""
    token = _MODE.set(bool(interpret))
    try:
        yield
    finally:
        _MODE.reset(token)


def in_mode(fn, interpret: bool):
    """``fn`` running in :func:`mode` ``interpret`` (what a backend instance binds)."""
    import functools
    interpret = bool(interpret)

    @functools.wraps(fn)
    def run(*args, **kwargs):
        token = _MODE.set(interpret)
        try:
            return fn(*args, **kwargs)
        finally:
            _MODE.reset(token)
    return run


def interpreting(where) -> bool:
    """Whether a launch on ``where`` (a tensor or a device) runs under the Triton interpreter: the
    calling backend instance's mode when one is set (:func:`mode`), else True for anything but a
    CUDA device. Every launch decision (output buffers, tiles, ``UPCAST``, launch options) follows it."""
    m = _MODE.get()
    if m is not None:
        return m
    dev = getattr(where, "device", where)
    return getattr(dev, "type", str(dev).split(":")[0]) != "cuda"


def _first_device(args, kwargs):
    for a in list(args) + list(kwargs.values()):
        if hasattr(a, "data_ptr") and hasattr(a, "device"):
            return a.device
    return None


_TWINS: dict = {}


def _twin(fn: JITFunction):
    """The ``InterpretedFunction`` of a Triton function (cached per Python function)."""
    from triton.runtime.interpreter import InterpretedFunction
    twin = _TWINS.get(fn.fn)
    if twin is None:
        twin = _TWINS[fn.fn] = InterpretedFunction(fn.fn)
    return twin


def _interpreted_call(self, *args, **kwargs):
    return _twin(self)(*args, **kwargs)


def _member(f):
    def member(self, *args, **kwargs):
        return f(self, *args, **kwargs)
    return member


_LOCK = threading.RLock()
_MISSING = object()


def _patched_objects():
    """What Triton's interpreter patches (``interpreter._patch_lang``) and what this scope patches."""
    import triton.language.core as core
    import triton.language.math as tmath
    import triton.language.standard as standard
    return [JITFunction, tl, core, tmath, standard, core.tensor, core.dtype, core.condition,
            core.tensor_descriptor_base]


@contextlib.contextmanager
def interpreter_scope():
    """The block runs interpreted launches of :class:`Kernel` s in a process whose Triton was
    imported for the GPU: calls of Triton's ``JITFunction`` s (the standard library) run their
    interpreted twins; on exit every attribute of ``triton.language`` and its submodules that the
    block replaced is put back (the interpreter's device-function calls leave builtins patched),
    and the tensor, dtype and condition classes lose what was added. Serialized by a lock;
    re-entrant."""
    with _LOCK:
        objs = _patched_objects()
        saved = [(o, dict(vars(o))) for o in objs]
        try:
            JITFunction.__call__ = _interpreted_call
            core_tensor = objs[5]
            for name, v in list(vars(core_tensor).items()):
                if isinstance(v, JITFunction):              # x.sum(...), x.cdiv(...): a method, not a JITFunction
                    setattr(core_tensor, name, _member(v))
            yield
        finally:
            for o, before in saved:
                now = vars(o)
                # a class loses what was added to it (the interpreter's tensor.__index__, __bool__, ...); a
                # module keeps it: the interpreter adds its own globals to the module of every function it
                # rewrites (its cached rewrites need them), and submodules imported meanwhile are attributes
                if isinstance(o, type):
                    for k in [k for k in now if k not in before]:
                        delattr(o, k)
                for k, v in before.items():                  # whatever was replaced is put back
                    if now.get(k, _MISSING) is not v:
                        setattr(o, k, v)


class Kernel(JITFunction):
    """A Triton function (kernel or device helper) usable both ways: compiled like any
    ``JITFunction``; launched (``kernel[grid](...)``) under the interpreter when
    :func:`interpreting` says so for its first tensor argument, compiled for the GPU otherwise.
    Called as a device function inside an interpreted kernel, it runs its interpreted twin."""

    def __call__(self, *args, **kwargs):
        # only an interpreted kernel calls a device function from Python (the compiler inlines it)
        return _twin(self)(*args, **kwargs)

    def run(self, *args, grid, warmup, **kwargs):
        dev = _first_device(args, kwargs)
        if interpreting(dev if dev is not None else "cuda"):
            if warmup:
                return None
            opts = {k: v for k, v in kwargs.items() if k not in LAUNCH_OPTIONS}
            with interpreter_scope():
                _twin(self).run(*args, grid=grid, warmup=False, **opts)
            return None
        return super().run(*args, grid=grid, warmup=warmup, **kwargs)


def jit(fn=None, **kwargs):
    """``triton.jit`` for hal-cuda: a :class:`Kernel` (same keyword arguments)."""
    if fn is None:
        return lambda f: Kernel(f, **kwargs)
    return Kernel(fn, **kwargs)


@jit
def round_to_e4m3(v):
    """fp32 -> the nearest float8_e4m3fn value (ties to even), still in fp32; NaN stays NaN."""
    bits = v.to(tl.int32, bitcast=True)
    e = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)         # subnormals share the 2^-6 exponent
    step = ((e - 3 + 127) << 23).to(tl.float32, bitcast=True)
    y = tl.abs(v / step)
    r = ((y + 12582912.0) - 12582912.0) * step               # 1.5 * 2^23: round half to even
    r = tl.where(v < 0, -r, r)
    return tl.where(v != v, v, r)


@jit
def e4m3_bits(v):
    """The uint8 code of fp32 ``v`` (already clamped to +-448): NaN -> 0x7F, -0 -> 0x80."""
    r = round_to_e4m3(v)
    code = r.to(tl.float8e4nv).to(tl.uint8, bitcast=True)
    code = tl.where(v != v, 0x7F, code)
    neg_zero = (r == 0) & (v.to(tl.int32, bitcast=True) < 0)
    return tl.where(neg_zero, 0x80, code).to(tl.uint8)


if hasattr(tl, "div_rn"):
    @jit
    def div_rn(a, b):
        """IEEE division (Triton's ``/`` may be approximate on the GPU)."""
        return tl.div_rn(a, b)
else:  # older Triton releases keep it under tl.math
    @jit
    def div_rn(a, b):
        """IEEE division (Triton's ``/`` may be approximate on the GPU)."""
        return tl.math.div_rn(a, b)


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def out_buffer(shape, dtype, device, *, interpret: bool):
    """The kernel's output buffer: fp32 under the interpreter for half types (see above)."""
    import torch
    if interpret and dtype in (torch.bfloat16, torch.float16):
        return torch.empty(shape, dtype=torch.float32, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def finish(buf, dtype):
    """The buffer rounded to the op's output dtype (a no-op on the GPU path)."""
    return buf if buf.dtype == dtype else buf.to(dtype)
