"""hal-ascend: the HAL contract on Ascend NPUs through torch_npu's fused ops.

Every torch_npu call goes through one seam, :mod:`hal_ascend.npu`; ``HAL_ASCEND_EMULATE=1``
swaps it for :mod:`hal_ascend.emulator`, a CPU implementation of exactly those ops that checks
every documented limit (:mod:`hal_ascend.limits`), registered by :mod:`hal_ascend.schema` under
the installed torch_npu wheel's own op schemas and checked against its meta functions.
"""
