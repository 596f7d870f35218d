"""Jagged attention and product-key kernels: Triton on CUDA, pure-torch references elsewhere.

Imports only torch (triton lazily, when a CUDA op or `RECRAY_KERNELS=triton` needs it).
"""

from recray.kernels.flash_attention import jagged_flash_attention
from recray.kernels.layout import jagged_to_padded, padded_to_jagged
from recray.kernels.product_key import product_key_topk
from recray.kernels.target_attention import jagged_target_attention

__all__ = [
    "jagged_flash_attention",
    "jagged_target_attention",
    "jagged_to_padded",
    "padded_to_jagged",
    "product_key_topk",
]
