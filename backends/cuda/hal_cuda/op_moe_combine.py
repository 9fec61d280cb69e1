"""``moe_combine``: torch ops on the device, no host sync (:func:`hal.portable.moe_combine`): the
scatter and the weighted slot sum are memory-bound gathers that torch's kernels already run at
bandwidth; a dedicated Triton kernel is not worth its code until a GPU profile says otherwise."""
from hal.portable import moe_combine

__all__ = ["moe_combine"]
