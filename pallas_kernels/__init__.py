"""Pallas Triton kernels for PermuQuant inference (GPU: Ampere, Hopper, RTX 5090 sm_120).

    from pallas_kernels import permuted_norm, fp4_matmul, w4a16_matmul
    y, xq = permuted_norm(x, perm, scale=s, shift=t, quant=formats.get("nvfp4"), global_scale=gs)
    out = fp4_matmul(xq_2d, qlin.weight(), bias)      # W4A4, weight = QTensor of W^T (N, K)

- `permuted_norm`: norm reading x in permuted channel order + AdaLN modulation, optionally
  writing its output quantized (nvfp4 / mxfp4 / int4) for the next matmul, bit-exact with
  `pqjax.formats`;
- `fp4_matmul` (W4A4 NVFP4 / MXFP4, FP8 MMA for MXFP4 where exact), `w4a16_matmul`;
- each with a pure-jnp `*_reference`; `configs` holds the block-config tables; `dispatch`
  is what the model's "pallas" backend calls (kernels on CUDA GPUs, XLA elsewhere, interpret
  mode when PQJAX_PALLAS_INTERPRET=1).
"""

from pallas_kernels.configs import MatmulConfig, NormConfig, matmul_config, norm_config
from pallas_kernels.fp4_matmul import (
    fp4_matmul,
    fp4_matmul_reference,
    fp8_exact,
    w4a16_matmul,
    w4a16_matmul_reference,
)
from pallas_kernels.permuted_norm import permuted_norm, permuted_norm_reference

__all__ = [
    "MatmulConfig",
    "NormConfig",
    "fp4_matmul",
    "fp4_matmul_reference",
    "fp8_exact",
    "matmul_config",
    "norm_config",
    "permuted_norm",
    "permuted_norm_reference",
    "w4a16_matmul",
    "w4a16_matmul_reference",
]
