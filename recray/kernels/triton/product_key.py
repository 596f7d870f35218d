"""Triton product-key memory: fused candidate top-k, softmax and value gather, with its backward.

The half-key scores and their top-k stay in torch (a cuBLAS matmul and `torch.topk` are already
optimal there). One program per query then scores the k x k candidate pairs in registers, picks
the best k by repeated argmax, and accumulates the softmax-weighted value rows, so neither the
[B, k, k] candidates nor the [B, k, dv] gathered rows reach memory. The backward scatters into
the value gradient with atomics (two queries may pick the same slot).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from recray.kernels.reference import product_key_half_topk
from recray.kernels.triton.common import block_size


@triton.jit
def _fwd_kernel(
    TOP_A, ROWS_A, TOP_B, ROWS_B, VALUES, OUT, SLOTS, PAIRS, WEIGHTS,
    num_b, value_dim, stride_values,
    K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    flat = tl.arange(0, BLOCK_K * BLOCK_K)
    i, j = flat // BLOCK_K, flat % BLOCK_K
    pair_valid = (i < K) & (j < K)
    score_a = tl.load(TOP_A + row * K + i, mask=pair_valid, other=0.0)
    score_b = tl.load(TOP_B + row * K + j, mask=pair_valid, other=0.0)
    candidates = tl.where(pair_valid, score_a + score_b, float("-inf"))

    # Top-k by k rounds of argmax; k is small (~32) next to the k*k candidates.
    rank = tl.arange(0, BLOCK_K)
    top = tl.full([BLOCK_K], float("-inf"), dtype=tl.float32)
    best = tl.zeros([BLOCK_K], dtype=tl.int32)
    for r in range(K):
        at = tl.argmax(candidates, 0)
        top = tl.where(rank == r, tl.max(candidates, 0), top)
        best = tl.where(rank == r, at, best)
        candidates = tl.where(flat == at, float("-inf"), candidates)

    selected = rank < K
    weights = tl.where(selected, tl.exp(top - tl.max(top, 0)), 0.0)
    weights = weights / tl.sum(weights, 0)
    best_i, best_j = best // BLOCK_K, best % BLOCK_K
    row_a = tl.load(ROWS_A + row * K + best_i, mask=selected, other=0)
    row_b = tl.load(ROWS_B + row * K + best_j, mask=selected, other=0)
    slots = row_a * num_b + row_b
    tl.store(SLOTS + row * K + rank, slots, mask=selected)
    tl.store(PAIRS + row * K + rank, best_i * K + best_j, mask=selected)
    tl.store(WEIGHTS + row * K + rank, weights, mask=selected)

    for start in range(0, value_dim, BLOCK_DV):
        offs_dv = start + tl.arange(0, BLOCK_DV)
        dv_valid = offs_dv < value_dim
        rows = tl.load(
            VALUES + slots[:, None] * stride_values + offs_dv[None, :],
            mask=selected[:, None] & dv_valid[None, :],
            other=0.0,
        ).to(tl.float32)
        out = tl.sum(weights[:, None] * rows, 0)
        tl.store(OUT + row * value_dim + offs_dv, out.to(OUT.dtype.element_ty), mask=dv_valid)


@triton.jit
def _bwd_kernel(
    GRAD_OUT, VALUES, SLOTS, PAIRS, WEIGHTS, GRAD_VALUES, GRAD_TOP_A, GRAD_TOP_B,
    value_dim, stride_values,
    K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    rank = tl.arange(0, BLOCK_K)
    selected = rank < K
    slots = tl.load(SLOTS + row * K + rank, mask=selected, other=0)
    weights = tl.load(WEIGHTS + row * K + rank, mask=selected, other=0.0)
    grad_weights = tl.zeros([BLOCK_K], dtype=tl.float32)
    for start in range(0, value_dim, BLOCK_DV):
        offs_dv = start + tl.arange(0, BLOCK_DV)
        dv_valid = offs_dv < value_dim
        mask = selected[:, None] & dv_valid[None, :]
        grad_out = tl.load(GRAD_OUT + row * value_dim + offs_dv, mask=dv_valid, other=0.0)
        grad_out = grad_out.to(tl.float32)
        rows = tl.load(
            VALUES + slots[:, None] * stride_values + offs_dv[None, :], mask=mask, other=0.0
        ).to(tl.float32)
        grad_weights += tl.sum(rows * grad_out[None, :], 1)
        tl.atomic_add(
            GRAD_VALUES + slots[:, None] * value_dim + offs_dv[None, :],
            weights[:, None] * grad_out[None, :],
            mask=mask,
        )
    # softmax backward, then each selected pair (i, j) passes its score gradient to a_i and b_j
    grad_scores = weights * (grad_weights - tl.sum(weights * grad_weights, 0))
    pairs = tl.load(PAIRS + row * K + rank, mask=selected, other=0)
    to_a = (pairs // K)[:, None] == rank[None, :]
    to_b = (pairs % K)[:, None] == rank[None, :]
    grad_a = tl.sum(tl.where(to_a & selected[:, None], grad_scores[:, None], 0.0), 0)
    grad_b = tl.sum(tl.where(to_b & selected[:, None], grad_scores[:, None], 0.0), 0)
    tl.store(GRAD_TOP_A + row * K + rank, grad_a, mask=selected)
    tl.store(GRAD_TOP_B + row * K + rank, grad_b, mask=selected)


def _value_block(value_dim: int) -> int:
    # Keep the [BLOCK_K, BLOCK_DV] tile of gathered rows small enough to stay in registers.
    return min(block_size(value_dim), 128)


class _ProductKeyCombine(torch.autograd.Function):
    """Half top-k scores and rows -> memory read-out; gradients to the scores and values."""

    @staticmethod
    def forward(ctx, top_a, rows_a, top_b, rows_b, values, num_b: int):
        batch, k = top_a.shape
        value_dim = values.shape[1]
        out = values.new_empty(batch, value_dim)
        slots = torch.empty(batch, k, dtype=torch.int64, device=values.device)
        pairs = torch.empty(batch, k, dtype=torch.int32, device=values.device)
        weights = torch.empty(batch, k, dtype=torch.float32, device=values.device)
        if batch:
            _fwd_kernel[(batch,)](
                top_a.contiguous(), rows_a.contiguous(), top_b.contiguous(), rows_b.contiguous(),
                values, out, slots, pairs, weights, num_b, value_dim, values.stride(0),
                K=k, BLOCK_K=triton.next_power_of_2(k), BLOCK_DV=_value_block(value_dim),
            )  # fmt: skip
        ctx.save_for_backward(values, slots, pairs, weights)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        values, slots, pairs, weights = ctx.saved_tensors
        batch, k = slots.shape
        # float32 accumulation whatever the values' dtype: many queries may hit one slot.
        grad_values = torch.zeros(values.shape, dtype=torch.float32, device=values.device)
        grad_a = torch.empty(batch, k, dtype=torch.float32, device=values.device)
        grad_b = torch.empty_like(grad_a)
        if batch:
            _bwd_kernel[(batch,)](
                grad_out.contiguous(), values, slots, pairs, weights, grad_values, grad_a, grad_b,
                values.shape[1], values.stride(0),
                K=k, BLOCK_K=triton.next_power_of_2(k), BLOCK_DV=_value_block(values.shape[1]),
            )  # fmt: skip
        return grad_a, None, grad_b, None, grad_values.to(values.dtype), None


def product_key_topk(
    query: torch.Tensor,
    keys_a: torch.Tensor,
    keys_b: torch.Tensor,
    values: torch.Tensor,
    k: int,
) -> torch.Tensor:
    """Triton twin of `recray.kernels.reference.product_key_topk` (inputs unchecked)."""
    top_a, rows_a, top_b, rows_b = product_key_half_topk(query, keys_a, keys_b, k)
    if values.stride(1) != 1:
        values = values.contiguous()
    return _ProductKeyCombine.apply(top_a, rows_a, top_b, rows_b, values, keys_b.shape[0])
