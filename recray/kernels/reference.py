"""Pure-torch reference kernels: vectorised over the jagged batch, autograd on, no padding."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def jagged_flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    offsets: torch.Tensor,
    max_seq_len: int,
    *,
    causal: bool = False,
    activation: str = "softmax",
    scale: float | None = None,
) -> torch.Tensor:
    """Self-attention inside each sequence of `q, k [T, H, D]`, `v [T, H, Dv]` split by `offsets`.

    Every (query, key) pair of a sequence (the lower triangle when `causal`) is materialised
    once: memory is O(sum of len^2 * H * D), fine for CPU training and tests, not for long
    sequences. `activation="silu"` weights values by SiLU(scale * q.k) / max_seq_len (HSTU).
    """
    offsets = offsets.long()
    lengths = offsets[1:] - offsets[:-1]
    seq_of_token = torch.repeat_interleave(torch.arange(lengths.numel(), device=q.device), lengths)
    key_starts = offsets[seq_of_token]
    position = torch.arange(q.shape[0], device=q.device) - key_starts
    key_counts = position + 1 if causal else lengths[seq_of_token]
    return _attend(q, k, v, key_starts, key_counts, scale, activation, max_seq_len)


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
    offsets = offsets.long()
    seq_of_query = (
        torch.arange(q.shape[0], device=q.device) if query_to_seq is None else query_to_seq.long()
    )
    key_starts = offsets[seq_of_query]
    key_counts = offsets[seq_of_query + 1] - key_starts
    return _attend(q, k, v, key_starts, key_counts, scale, "softmax", 1)


def _attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_starts: torch.Tensor,
    key_counts: torch.Tensor,
    scale: float | None,
    activation: str,
    max_seq_len: int,
) -> torch.Tensor:
    """Query i attends to keys `key_starts[i] .. key_starts[i] + key_counts[i] - 1`."""
    num_queries, heads, dim = q.shape
    pair_query = torch.repeat_interleave(torch.arange(num_queries, device=q.device), key_counts)
    pair_starts = torch.cumsum(key_counts, 0) - key_counts
    # pair p of query i covers key key_starts[i] + (p - pair_starts[i])
    pair_key = (
        torch.arange(pair_query.numel(), device=q.device) + (key_starts - pair_starts)[pair_query]
    )

    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    scores = (q[pair_query].float() * k[pair_key].float()).sum(-1) * scale  # [P, H]
    if activation == "silu":
        weights = F.silu(scores) / max(max_seq_len, 1)
    else:
        segment_max = torch.full(
            (num_queries, heads), float("-inf"), device=q.device
        ).scatter_reduce(0, pair_query[:, None].expand(-1, heads), scores, "amax")
        # The max only shifts the exponent for stability; softmax does not depend on it: no grad.
        exponents = torch.exp(scores - segment_max.detach()[pair_query])
        denominators = torch.zeros(num_queries, heads, device=q.device).index_add(
            0, pair_query, exponents
        )
        weights = exponents / denominators[pair_query]
    out = torch.zeros(num_queries, heads, v.shape[-1], device=q.device).index_add(
        0, pair_query, weights[..., None] * v[pair_key].float()
    )
    return out.to(q.dtype)


def product_key_half_topk(
    query: torch.Tensor, keys_a: torch.Tensor, keys_b: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k of each query half against its half-keys: scores `[B, k]` (float32) and rows `[B, k]`.

    Shared by the reference and the Triton path so both select from identical float32 scores.
    """
    half = keys_a.shape[1]
    scores_a = query[:, :half].float() @ keys_a.float().T  # [B, na]
    scores_b = query[:, half:].float() @ keys_b.float().T  # [B, nb]
    top_a, rows_a = scores_a.topk(k, dim=1)
    top_b, rows_b = scores_b.topk(k, dim=1)
    return top_a, rows_a, top_b, rows_b


def product_key_topk(
    query: torch.Tensor,
    keys_a: torch.Tensor,
    keys_b: torch.Tensor,
    values: torch.Tensor,
    k: int,
) -> torch.Tensor:
    """Product-key memory (Lample et al. 2019): `[B, dim]` queries -> `[B, dv]` in values' dtype.

    The best k slots of the na*nb grid lie among the k*k pairs of the two half top-k sets
    (a_i + b_j is monotone in each term), so only those k*k candidates are scored.
    """
    top_a, rows_a, top_b, rows_b = product_key_half_topk(query, keys_a, keys_b, k)
    candidates = (top_a[:, :, None] + top_b[:, None, :]).flatten(1)  # [B, k*k]
    scores, pairs = candidates.topk(k, dim=1)
    slots = rows_a.gather(1, pairs // k) * keys_b.shape[0] + rows_b.gather(1, pairs % k)
    weights = torch.softmax(scores, dim=1)
    out = (weights[..., None] * values[slots].float()).sum(1)
    return out.to(values.dtype)
