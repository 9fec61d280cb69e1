"""hal-cuda: the HAL contract on NVIDIA GPUs (Triton kernels, cuBLAS block-scaled FP8 where it fits).

``HAL_CUDA_INTERPRET=1`` runs the same Triton kernels on CPU tensors under the Triton interpreter
(it sets ``TRITON_INTERPRET=1`` before any kernel module is imported); the probe then says
"cuda (Triton interpreter, no GPU)". Kernel modules are imported only by ``kernels()``, never at
plugin import.
"""
