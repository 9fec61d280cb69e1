"""hal-cuda: the HAL contract on NVIDIA GPUs (Triton kernels, cuBLAS block-scaled FP8 where it fits).

The backend's ``interpret`` option runs the same Triton kernels on CPU tensors under the Triton
interpreter, per backend instance: ``hal.runtime("cuda", options={"interpret": True})``; the
probe then says "cuda (Triton interpreter, no GPU)". ``HAL_CUDA_INTERPRET=1`` only sets the
option's default (for the listed instance, the CLI and CI); ``TRITON_INTERPRET`` is never set.
One process can hold an interpreted runtime next to a real one, and still compile the kernels for
a GPU: each launch picks its mode (:mod:`hal_cuda._triton`). Kernel modules are imported only by
``kernels()``, never at plugin import.
"""
