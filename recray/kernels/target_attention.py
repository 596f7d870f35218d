"""Public `jagged_target_attention`: checks its inputs, then dispatches to an implementation."""

from __future__ import annotations

import torch

from recray.kernels import reference
from recray.kernels.dispatch import check_offsets, check_same_device, use_triton


def jagged_target_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    offsets: torch.Tensor,
    *,
    scale: float | None = None,
    query_to_seq: torch.Tensor | None = None,
) -> torch.Tensor:
    """Each query attends (softmax) to one user's jagged history; an empty history gives zeros.

    q `[Bq, H, D]`, k `[T, H, D]`, v `[T, H, Dv]`, offsets `[B+1]` (int32/int64) over the T
    tokens. Query i attends to sequence i, or to `query_to_seq[i]` when given (several
    candidates sharing one history without copying it). `scale=None` means 1/sqrt(D).
    Returns `[Bq, H, Dv]` in q's dtype. CUDA tensors run the Triton kernel, CPU tensors the
    reference (see `recray.kernels.dispatch.use_triton`).
    """
    longest = _check_inputs(q, k, v, offsets, query_to_seq)
    if use_triton(q):
        # Imported here so that `import recray.kernels` works where triton is absent.
        from recray.kernels.triton import target_attention as triton_target_attention

        # The check measured the longest history already: the kernel grid is sized by it.
        return triton_target_attention.jagged_target_attention(
            q, k, v, offsets, scale=scale, query_to_seq=query_to_seq, longest=longest
        )
    return reference.jagged_target_attention(
        q, k, v, offsets, scale=scale, query_to_seq=query_to_seq
    )


def _check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    offsets: torch.Tensor,
    query_to_seq: torch.Tensor | None,
) -> int:
    """Raise on bad input; return the longest history length."""
    for name, t, shape in (("q", q, "[Bq, H, D]"), ("k", k, "[T, H, D]"), ("v", v, "[T, H, Dv]")):
        if t.dim() != 3:
            raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")
    if not q.is_floating_point() or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(
            f"q, k, v: expected one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if k.shape[1] != q.shape[1] or v.shape[1] != q.shape[1]:
        raise ValueError(
            f"k, v: expected {q.shape[1]} heads like q, got {k.shape[1]} and {v.shape[1]}"
        )
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"k: expected head dim {q.shape[2]} like q, got {k.shape[2]}")
    if v.shape[0] != k.shape[0]:
        raise ValueError(f"v: expected {k.shape[0]} tokens like k, got {v.shape[0]}")
    check_same_device(q=q, k=k, v=v, offsets=offsets)
    longest = check_offsets(offsets, k.shape[0], "k")
    num_seqs = offsets.numel() - 1
    if query_to_seq is None:
        if q.shape[0] != num_seqs:
            raise ValueError(
                f"q: expected {num_seqs} queries (one per sequence in offsets), got {q.shape[0]}; "
                "pass query_to_seq to share sequences between queries"
            )
        return longest
    if query_to_seq.dtype not in (torch.int32, torch.int64) or query_to_seq.dim() != 1:
        raise ValueError(
            f"query_to_seq: expected a 1-D int64 tensor, got {query_to_seq.dtype} of shape "
            f"{tuple(query_to_seq.shape)}"
        )
    if query_to_seq.numel() != q.shape[0]:
        raise ValueError(
            f"query_to_seq: expected {q.shape[0]} entries (one per query), got {query_to_seq.numel()}"
        )
    check_same_device(q=q, query_to_seq=query_to_seq)
    if not query_to_seq.numel():
        return longest
    lowest, highest = torch.stack(query_to_seq.aminmax()).tolist()
    if lowest < 0 or highest >= num_seqs:
        raise ValueError(
            f"query_to_seq: expected indices in [0, {num_seqs}), got values in [{lowest}, {highest}]"
        )
    return longest
