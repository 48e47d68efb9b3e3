"""Pallas kernels for dlax ops (imported as `dlax_kernels`).

One module per (op, backend): `<op>_triton` (GPU: `pallas_call` lowered through Triton) and
`<op>_tpu` (Mosaic), each exposing a function named after the op with the signature of the op's
chunked XLA implementation in `dlax.ops` and a `custom_vjp` backward. The ops select them with
`impl="pallas_triton"` / `"pallas_tpu"` (None: the platform's kernel when one exists); the XLA
path stays the fallback. Kernels import JAX, `dlax_kernels.common` and, for DLA, the small pure
helpers they share with the XLA path (`dlax.ops.dla` chunk math, scores, cache types).
"""
