"""hal-ascend: the HAL contract on Ascend NPUs through torch_npu's fused ops.

Every torch_npu call goes through one seam, :mod:`hal_ascend.npu`; ``HAL_ASCEND_EMULATE=1``
swaps it for :mod:`hal_ascend.emulator`, a CPU implementation of exactly those ops written from
their documentation (torch_npu's ``_op_plugin_docs.py``) that checks every documented limit.
"""
