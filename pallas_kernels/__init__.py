"""Pallas kernels for dlax ops (imported as `dlax_kernels`).

GPU kernels (pallas_call -> Triton) and TPU kernels (Mosaic) live in separate modules and are
selected through each op's `impl=` argument. The XLA path in `dlax.ops` is always the fallback.
"""
