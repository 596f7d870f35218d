"""Triton jagged attention (softmax or HSTU SiLU): online-softmax forward, FlashAttention-2 backward.

One kernel family serves both public attention ops. A program owns one (sequence, head) and a
block of that sequence's queries (forward, dQ) or keys (dK/dV), so nothing is padded and no
[B, N, N] tensor exists. The grid is one axis of (sequence, head, block) triples, as many
blocks per pair as the longest real sequence needs (a second axis would stop at 65,535).
Queries of sequence b are slots `q_offsets[b] .. q_offsets[b+1]-1`: for self-attention they are
the sequence's own tokens; for target attention `q_index` maps a slot to a query row, so many
candidates share one history without copying it. The backward recomputes the attention from
the stored log-sum-exp and needs no atomics: dK/dV programs loop over queries, dQ programs
over keys.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from recray.kernels.triton.common import (
    block_size,
    configs,
    dot_precision,
    length_bucket,
    matmul,
    prune_configs,
)

# exp(x) = exp2(x * log2(e)); exp2 is the fast hardware path. A constexpr: @triton.jit code may
# read no other kind of global (the GPU compiler refuses it; the interpreter does not check).
_LOG2E = tl.constexpr(1.4426950408889634)
# Grid axis 0 holds at most 2^31 - 1 programs.
_MAX_PROGRAMS = 2**31 - 1

_FWD_CONFIGS = configs(
    [
        (128, 64, 8, 3),
        (128, 128, 8, 2),
        (64, 64, 4, 3),
        (64, 32, 4, 4),
        (32, 64, 4, 3),
        (16, 64, 4, 3),  # one candidate per history (target attention): few query rows
        (16, 128, 4, 3),
    ]
)
_BWD_CONFIGS = configs(
    [
        (32, 64, 4, 2),
        (64, 64, 4, 2),
        (64, 128, 8, 2),
        (128, 64, 8, 2),
        (32, 32, 4, 2),
        (16, 64, 4, 2),
        (16, 128, 4, 2),
    ]
)
_TUNE_KEY = [
    "q_len_bucket",
    "k_len_bucket",
    "BLOCK_D",
    "BLOCK_DV",
    "CAUSAL",
    "SILU",
    "GATHER_Q",
]


def _prune(kernel: str) -> dict:
    """Autotune pruning for `kernel` (fwd, dkdv, dq): see `common.prune_configs`."""
    return {"early_config_prune": functools.partial(prune_configs, kernel=kernel)}


@triton.jit
def _query_rows(q_index, q_start, offs_m, m_valid, GATHER_Q: tl.constexpr):
    """Row of q/o/lse for each query slot of the block (int64: rows * strides may pass 2^31)."""
    slots = q_start + offs_m
    if GATHER_Q:
        rows = tl.load(q_index + slots, mask=m_valid, other=0).to(tl.int64)
    else:
        rows = slots.to(tl.int64)
    return rows


@triton.jit
def _program(num_heads, length, BLOCK: tl.constexpr):
    """(sequence, head, first position) of this program's block along a sequence: axis 0 runs
    over (sequence, head) pairs, each split in cdiv(length, BLOCK) blocks."""
    blocks = tl.cdiv(length, BLOCK)
    pair = tl.program_id(0) // blocks
    return pair // num_heads, pair % num_heads, (tl.program_id(0) % blocks) * BLOCK


@triton.autotune(configs=_FWD_CONFIGS, key=_TUNE_KEY, prune_configs_by=_prune("fwd"))
@triton.jit
def _fwd_kernel(
    Q, K, V, OUT, LSE,
    q_offsets, k_offsets, q_index,
    num_heads, head_dim, value_dim, scale, silu_norm, max_q, max_k,
    q_len_bucket, k_len_bucket,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, CAUSAL: tl.constexpr, SILU: tl.constexpr,
    GATHER_Q: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    seq, head, start_m = _program(num_heads, max_q, BLOCK_M)
    q_start = tl.load(q_offsets + seq)
    num_q = (tl.load(q_offsets + seq + 1) - q_start).to(tl.int32)
    if start_m >= num_q:
        return
    k_start = tl.load(k_offsets + seq).to(tl.int64)
    seq_len = (tl.load(k_offsets + seq + 1) - k_start).to(tl.int32)

    offs_m = start_m + tl.arange(0, BLOCK_M)
    m_valid = offs_m < num_q
    rows = _query_rows(q_index, q_start, offs_m, m_valid, GATHER_Q)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_valid = offs_d < head_dim
    dv_valid = offs_dv < value_dim
    q = tl.load(
        Q + (rows[:, None] * num_heads + head) * head_dim + offs_d[None, :],
        mask=m_valid[:, None] & d_valid[None, :],
        other=0.0,
    )

    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    qk_scale = scale * _LOG2E
    end_n = seq_len
    if CAUSAL:
        end_n = tl.minimum(seq_len, start_m + BLOCK_M)
    for start_n in range(0, end_n, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_valid = offs_n < seq_len
        keys = k_start + offs_n
        k_t = tl.load(
            K + (keys[None, :] * num_heads + head) * head_dim + offs_d[:, None],
            mask=d_valid[:, None] & n_valid[None, :],
            other=0.0,
        )
        v = tl.load(
            V + (keys[:, None] * num_heads + head) * value_dim + offs_dv[None, :],
            mask=n_valid[:, None] & dv_valid[None, :],
            other=0.0,
        )
        s = matmul(q, k_t, PRECISION)
        valid = n_valid[None, :]
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= offs_m[:, None])
        if SILU:
            x = s * scale
            a = tl.where(valid, x * tl.sigmoid(x) * silu_norm, 0.0)
            acc += matmul(a.to(v.dtype), v, PRECISION)
        else:
            # Every row sees key 0 in the first block (causal included), so m_new is finite and
            # exp2(-inf - m_new) = 0 for masked keys: no NaN from -inf - -inf.
            s = tl.where(valid, s * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + matmul(p.to(v.dtype), v, PRECISION)
            m_i = m_new

    if SILU:
        out = acc
    else:
        # A query with an empty history (target attention) has l_i == 0: output zeros.
        has_keys = l_i > 0
        l_safe = tl.where(has_keys, l_i, 1.0)
        out = acc / l_safe[:, None]
        lse = tl.where(has_keys, m_i + tl.log2(l_safe), float("-inf"))  # log2 units
        tl.store(LSE + rows * num_heads + head, lse, mask=m_valid)
    tl.store(
        OUT + (rows[:, None] * num_heads + head) * value_dim + offs_dv[None, :],
        out.to(OUT.dtype.element_ty),
        mask=m_valid[:, None] & dv_valid[None, :],
    )


@triton.jit
def _delta_kernel(
    OUT, DO, DELTA, num_rows, value_dim, BLOCK_R: tl.constexpr, BLOCK_DV: tl.constexpr
):
    """delta = rowsum(dO * OUT), the softmax-backward term shared by dQ and dK."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask = (offs_r < num_rows)[:, None] & (offs_dv < value_dim)[None, :]
    at = offs_r.to(tl.int64)[:, None] * value_dim + offs_dv[None, :]
    o = tl.load(OUT + at, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + at, mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + offs_r, tl.sum(o * do, 1), mask=offs_r < num_rows)


@triton.autotune(configs=_BWD_CONFIGS, key=_TUNE_KEY, prune_configs_by=_prune("dkdv"))
@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    q_offsets, k_offsets, q_index,
    num_heads, head_dim, value_dim, scale, silu_norm, max_q, max_k,
    q_len_bucket, k_len_bucket,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, CAUSAL: tl.constexpr, SILU: tl.constexpr,
    GATHER_Q: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    seq, head, start_n = _program(num_heads, max_k, BLOCK_N)
    k_start = tl.load(k_offsets + seq).to(tl.int64)
    seq_len = (tl.load(k_offsets + seq + 1) - k_start).to(tl.int32)
    if start_n >= seq_len:
        return
    q_start = tl.load(q_offsets + seq)
    num_q = (tl.load(q_offsets + seq + 1) - q_start).to(tl.int32)

    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_valid = offs_n < seq_len
    keys = k_start + offs_n
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_valid = offs_d < head_dim
    dv_valid = offs_dv < value_dim
    k = tl.load(
        K + (keys[:, None] * num_heads + head) * head_dim + offs_d[None, :],
        mask=n_valid[:, None] & d_valid[None, :],
        other=0.0,
    )
    v = tl.load(
        V + (keys[:, None] * num_heads + head) * value_dim + offs_dv[None, :],
        mask=n_valid[:, None] & dv_valid[None, :],
        other=0.0,
    )
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    qk_scale = scale * _LOG2E
    begin_m = 0
    if CAUSAL:
        begin_m = (start_n // BLOCK_M) * BLOCK_M  # earlier queries cannot see these keys
    for start_m in range(begin_m, num_q, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_valid = offs_m < num_q
        rows = _query_rows(q_index, q_start, offs_m, m_valid, GATHER_Q)
        q_t = tl.load(
            Q + (rows[None, :] * num_heads + head) * head_dim + offs_d[:, None],
            mask=d_valid[:, None] & m_valid[None, :],
            other=0.0,
        )
        do = tl.load(
            DO + (rows[:, None] * num_heads + head) * value_dim + offs_dv[None, :],
            mask=m_valid[:, None] & dv_valid[None, :],
            other=0.0,
        )
        s_t = matmul(k, q_t, PRECISION)  # [BLOCK_N, BLOCK_M]: scores, transposed
        valid = n_valid[:, None] & m_valid[None, :]
        if CAUSAL:
            valid = valid & (offs_m[None, :] >= offs_n[:, None])
        dp_t = matmul(v, tl.trans(do), PRECISION)
        if SILU:
            x = s_t * scale
            sig = tl.sigmoid(x)
            a_t = tl.where(valid, x * sig * silu_norm, 0.0)
            dv += matmul(a_t.to(do.dtype), do, PRECISION)
            ds_t = tl.where(valid, dp_t * sig * (1.0 + x * (1.0 - sig)) * (silu_norm * scale), 0.0)
        else:
            lse = tl.load(LSE + rows * num_heads + head, mask=m_valid, other=0.0)
            delta = tl.load(DELTA + rows * num_heads + head, mask=m_valid, other=0.0)
            p_t = tl.where(valid, tl.exp2(s_t * qk_scale - lse[None, :]), 0.0)
            dv += matmul(p_t.to(do.dtype), do, PRECISION)
            ds_t = p_t * (dp_t - delta[None, :]) * scale
        dk += matmul(ds_t.to(q_t.dtype), tl.trans(q_t), PRECISION)

    tl.store(
        DK + (keys[:, None] * num_heads + head) * head_dim + offs_d[None, :],
        dk.to(DK.dtype.element_ty),
        mask=n_valid[:, None] & d_valid[None, :],
    )
    tl.store(
        DV + (keys[:, None] * num_heads + head) * value_dim + offs_dv[None, :],
        dv.to(DV.dtype.element_ty),
        mask=n_valid[:, None] & dv_valid[None, :],
    )


@triton.autotune(configs=_BWD_CONFIGS, key=_TUNE_KEY, prune_configs_by=_prune("dq"))
@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    q_offsets, k_offsets, q_index,
    num_heads, head_dim, value_dim, scale, silu_norm, max_q, max_k,
    q_len_bucket, k_len_bucket,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, CAUSAL: tl.constexpr, SILU: tl.constexpr,
    GATHER_Q: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    seq, head, start_m = _program(num_heads, max_q, BLOCK_M)
    q_start = tl.load(q_offsets + seq)
    num_q = (tl.load(q_offsets + seq + 1) - q_start).to(tl.int32)
    if start_m >= num_q:
        return
    k_start = tl.load(k_offsets + seq).to(tl.int64)
    seq_len = (tl.load(k_offsets + seq + 1) - k_start).to(tl.int32)

    offs_m = start_m + tl.arange(0, BLOCK_M)
    m_valid = offs_m < num_q
    rows = _query_rows(q_index, q_start, offs_m, m_valid, GATHER_Q)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_valid = offs_d < head_dim
    dv_valid = offs_dv < value_dim
    q = tl.load(
        Q + (rows[:, None] * num_heads + head) * head_dim + offs_d[None, :],
        mask=m_valid[:, None] & d_valid[None, :],
        other=0.0,
    )
    do = tl.load(
        DO + (rows[:, None] * num_heads + head) * value_dim + offs_dv[None, :],
        mask=m_valid[:, None] & dv_valid[None, :],
        other=0.0,
    )
    if not SILU:
        lse = tl.load(LSE + rows * num_heads + head, mask=m_valid, other=0.0)
        delta = tl.load(DELTA + rows * num_heads + head, mask=m_valid, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    qk_scale = scale * _LOG2E
    end_n = seq_len
    if CAUSAL:
        end_n = tl.minimum(seq_len, start_m + BLOCK_M)
    for start_n in range(0, end_n, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_valid = offs_n < seq_len
        keys = k_start + offs_n
        k_t = tl.load(
            K + (keys[None, :] * num_heads + head) * head_dim + offs_d[:, None],
            mask=d_valid[:, None] & n_valid[None, :],
            other=0.0,
        )
        v_t = tl.load(
            V + (keys[None, :] * num_heads + head) * value_dim + offs_dv[:, None],
            mask=dv_valid[:, None] & n_valid[None, :],
            other=0.0,
        )
        s = matmul(q, k_t, PRECISION)
        valid = m_valid[:, None] & n_valid[None, :]
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= offs_m[:, None])
        dp = matmul(do, v_t, PRECISION)
        if SILU:
            x = s * scale
            sig = tl.sigmoid(x)
            ds = tl.where(valid, dp * sig * (1.0 + x * (1.0 - sig)) * (silu_norm * scale), 0.0)
        else:
            p = tl.where(valid, tl.exp2(s * qk_scale - lse[:, None]), 0.0)
            ds = p * (dp - delta[:, None]) * scale
        dq += matmul(ds.to(k_t.dtype), tl.trans(k_t), PRECISION)

    tl.store(
        DQ + (rows[:, None] * num_heads + head) * head_dim + offs_d[None, :],
        dq.to(DQ.dtype.element_ty),
        mask=m_valid[:, None] & d_valid[None, :],
    )


class _JaggedAttention(torch.autograd.Function):
    """Autograd wrapper; `q_offsets`/`q_index` say which queries each sequence owns (see top)."""

    @staticmethod
    def forward(
        ctx,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        q_offsets: torch.Tensor,
        k_offsets: torch.Tensor,
        q_index: torch.Tensor | None,
        max_q: int,
        max_k: int,
        causal: bool,
        silu: bool,
        scale: float,
        silu_norm: float,
    ) -> torch.Tensor:
        # The kernels index rows as (token * heads + head) * dim: dense layouts only.
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        num_queries, heads, _ = q.shape
        num_programs = (q_offsets.numel() - 1) * heads
        out = q.new_empty(num_queries, heads, v.shape[2])
        lse = torch.empty(num_queries, heads, dtype=torch.float32, device=q.device)
        args = (
            q_offsets, k_offsets, q_offsets if q_index is None else q_index,
            heads, q.shape[2], v.shape[2], scale, silu_norm, max_q, max_k,
            length_bucket(max_q), length_bucket(max_k),
        )  # fmt: skip
        meta = {
            "BLOCK_D": block_size(q.shape[2]),
            "BLOCK_DV": block_size(v.shape[2]),
            "CAUSAL": causal,
            "SILU": silu,
            "GATHER_Q": q_index is not None,
            "PRECISION": dot_precision(q.dtype),
        }
        ctx.launch = (num_programs, max_q, max_k, silu, args, meta)
        ctx.empty = num_queries == 0 or num_programs == 0 or max_q == 0
        _check_grid(num_programs, max(max_q, max_k))
        if ctx.empty:
            out.zero_()
        else:
            grid = _grid(num_programs, "BLOCK_M", max_q)
            _fwd_kernel[grid](q, k, v, out, lse, *args, **meta)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        num_programs, max_q, max_k, silu, args, meta = ctx.launch
        grad_out = grad_out.contiguous()
        # Every row of dq, dk, dv belongs to one program of the kernels below, which write it.
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        if ctx.empty:
            return dq.zero_(), dk.zero_(), dv.zero_(), *[None] * 9
        if silu:
            delta = lse  # the SiLU kernels have no softmax and read neither
        else:
            delta = torch.empty_like(lse)
            rows, block_rows = lse.numel(), 16
            _delta_kernel[(triton.cdiv(rows, block_rows),)](
                out, grad_out, delta, rows, v.shape[2],
                BLOCK_R=block_rows, BLOCK_DV=meta["BLOCK_DV"],
            )  # fmt: skip
        if k.shape[0] and max_k:
            grid = _grid(num_programs, "BLOCK_N", max_k)
            _bwd_dkdv_kernel[grid](q, k, v, grad_out, lse, delta, dk, dv, *args, **meta)
        else:
            dk.zero_()
            dv.zero_()
        grid = _grid(num_programs, "BLOCK_M", max_q)
        _bwd_dq_kernel[grid](q, k, v, grad_out, lse, delta, dq, *args, **meta)
        return dq, dk, dv, *[None] * 9


def _grid(num_programs: int, block: str, length: int):
    """One axis of (sequence, head) pairs x blocks along `length` (see `_program`)."""
    return lambda meta: (num_programs * triton.cdiv(length, meta[block]),)


def _check_grid(num_programs: int, length: int) -> None:
    """The grid at the smallest block (16) must fit axis 0, or the launch fails on the GPU."""
    needed = num_programs * triton.cdiv(length, 16)
    if needed > _MAX_PROGRAMS:
        raise ValueError(
            f"q: {num_programs} (sequence, head) pairs x {triton.cdiv(length, 16)} blocks of the "
            f"longest sequence ({length} tokens) need {needed} programs; at most {_MAX_PROGRAMS} "
            "fit one launch: split the batch"
        )


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_offsets: torch.Tensor,
    k_offsets: torch.Tensor,
    q_index: torch.Tensor | None,
    max_q: int,
    max_k: int,
    *,
    causal: bool,
    silu: bool,
    scale: float | None,
    silu_norm: float = 1.0,
) -> torch.Tensor:
    """Sequence b's queries (slots `q_offsets[b]..`, rows `q_index[slot]` or the slot itself)
    attend to its keys `k_offsets[b]..`; `max_q`/`max_k` bound the per-sequence counts."""
    scale = 1.0 / math.sqrt(q.shape[2]) if scale is None else float(scale)
    return _JaggedAttention.apply(
        q, k, v, q_offsets, k_offsets, q_index, max_q, max_k, causal, silu, scale, silu_norm
    )


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
    longest: int | None = None,
) -> torch.Tensor:
    """Triton twin of `recray.kernels.reference.jagged_flash_attention` (inputs unchecked).

    The grid is sized by `longest`, the longest real sequence (the public op passes the one
    its input check measured; None measures it, one host sync): a generous `max_seq_len`
    stays only the SiLU normaliser and never launches programs that exit at once.
    """
    if longest is None:
        longest = int((offsets[1:] - offsets[:-1]).max()) if offsets.numel() > 1 else 0
    return attention(
        q, k, v, offsets, offsets, None, longest, longest,
        causal=causal, silu=activation == "silu", scale=scale,
        silu_norm=1.0 / max(max_seq_len, 1),
    )  # fmt: skip
