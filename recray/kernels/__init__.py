"""Jagged attention kernels: pure-torch references now, Triton on CUDA later; imports torch only."""

from recray.kernels.layout import jagged_to_padded, padded_to_jagged
from recray.kernels.target_attention import jagged_target_attention

__all__ = ["jagged_target_attention", "jagged_to_padded", "padded_to_jagged"]
