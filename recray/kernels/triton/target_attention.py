"""Triton jagged target attention: candidates grouped by history, run by the attention kernels."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from recray.kernels.triton.flash_attention import attention


def jagged_target_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    offsets: torch.Tensor,
    *,
    scale: float | None = None,
    query_to_seq: torch.Tensor | None = None,
    longest: int | None = None,
) -> torch.Tensor:
    """Triton twin of `recray.kernels.reference.jagged_target_attention` (inputs unchecked).

    Candidates are sorted by history (a stable argsort, no copy of q) so that each kernel
    program scores a block of one history's candidates against that history read once.
    `longest` is the longest history (None measures it, one host sync); it sizes the grid.
    """
    num_seqs = offsets.numel() - 1
    if longest is None:
        longest = int((offsets[1:] - offsets[:-1]).max()) if num_seqs else 0
    if query_to_seq is None:
        query_offsets = torch.arange(num_seqs + 1, device=q.device)
        query_index, max_q = None, 1
    else:
        counts = torch.bincount(query_to_seq, minlength=num_seqs)
        query_offsets = F.pad(counts.cumsum(0), (1, 0))
        query_index = torch.argsort(query_to_seq, stable=True)
        max_q = int(counts.max()) if num_seqs else 0
    return attention(
        q, k, v, query_offsets, offsets, query_index, max_q, longest,
        causal=False, silu=False, scale=scale,
    )  # fmt: skip
