"""Plugin module named by the ``hal.backends`` entry point ``example``.

It implements one contract op, ``fp8_quantize``, in plain torch on whatever device the tensors
are on; every other op is absent, so a runtime runs them on the CPU reference (recorded in the
plan) or, with ``fallback="error"``, refuses to bind.
"""
import torch

import hal

FP8_MAX = 448.0


def fp8_quantize(x, *, group_size, scale_format):
    """Per-token, per-group e4m3 quantization; arguments already validated by the contract."""
    K = x.shape[-1]
    groups = -(-K // group_size)
    padded = torch.nn.functional.pad(x.float(), (0, groups * group_size - K))
    g = padded.unflatten(-1, (groups, group_size))
    scale = g.abs().amax(-1).clamp_min(1e-4) / FP8_MAX
    if scale_format == "ue8m0":
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    q = (g / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.flatten(-2)[..., :K].contiguous(), scale


class ExampleBackend(hal.Backend):
    name = "example"
    device_type = "cpu"
    priority = -10        # an example: never the backend "auto" picks (the reference is 0)

    def probe(self):
        return hal.Availability(True, "plain torch on the CPU", device="cpu", versions={"torch": torch.__version__})

    def capabilities(self):
        return {"fp8_quantize": hal.OpCapability("native", ("float32", "bfloat16", "float16"), "plain torch")}

    def kernels(self):
        return {"fp8_quantize": fp8_quantize}


@hal.hookimpl
def hal_contract_version():
    return "1.0"


@hal.hookimpl
def hal_backend():
    return ExampleBackend()
