"""Pure-torch reference kernels: vectorised over the jagged batch, autograd on, no padding."""

from __future__ import annotations

import math

import torch


def jagged_target_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    offsets: torch.Tensor,
    *,
    scale: float | None = None,
    query_to_seq: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention of each query `[Bq, H, D]` over its sequence's tokens `k, v [T, H, *]`.

    Every (query, token) pair is materialised once, so memory is O(sum of attended lengths); the
    softmax runs per query segment in float32 and the output comes back in `q`'s dtype.
    """
    num_queries, heads, dim = q.shape
    offsets = offsets.long()
    seq_of_query = (
        torch.arange(num_queries, device=q.device) if query_to_seq is None else query_to_seq.long()
    )
    query_starts = offsets[seq_of_query]
    query_lengths = offsets[seq_of_query + 1] - query_starts
    pair_query = torch.repeat_interleave(torch.arange(num_queries, device=q.device), query_lengths)
    pair_starts = torch.cumsum(query_lengths, 0) - query_lengths
    # pair p of query i covers token query_starts[i] + (p - pair_starts[i])
    pair_token = (
        torch.arange(pair_query.numel(), device=q.device) + (query_starts - pair_starts)[pair_query]
    )

    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    scores = (q[pair_query].float() * k[pair_token].float()).sum(-1) * scale  # [P, H]
    segment_max = torch.full((num_queries, heads), float("-inf"), device=q.device).scatter_reduce(
        0, pair_query[:, None].expand(-1, heads), scores, "amax"
    )
    # The max only shifts the exponent for stability; softmax does not depend on it, so no grad.
    weights = torch.exp(scores - segment_max.detach()[pair_query])
    denominators = torch.zeros(num_queries, heads, device=q.device).index_add(
        0, pair_query, weights
    )
    probs = weights / denominators[pair_query]
    out = torch.zeros(num_queries, heads, v.shape[-1], device=q.device).index_add(
        0, pair_query, probs[..., None] * v[pair_token].float()
    )
    return out.to(q.dtype)
