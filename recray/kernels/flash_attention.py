"""Public `jagged_flash_attention`: checks its inputs, then dispatches to an implementation."""

from __future__ import annotations

import torch

from recray.kernels import reference
from recray.kernels.dispatch import check_offsets, check_same_device, use_triton

ACTIVATIONS = ("softmax", "silu")


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
    """Self-attention inside each sequence of a jagged batch, never padded.

    q, k `[T, H, D]`, v `[T, H, Dv]`, offsets `[B+1]` (int32/int64) over the T tokens;
    `max_seq_len` bounds every sequence length (checked) and is the HSTU normaliser.
    `activation="softmax"`: softmax(scale * q k^T) v; `"silu"`: HSTU pointwise attention
    SiLU(scale * q k^T) / max_seq_len, no softmax. `causal`: token i sees tokens <= i of its
    own sequence. `scale=None` means 1/sqrt(D). Returns `[T, H, Dv]` in q's dtype.
    CUDA tensors run the Triton kernel, CPU tensors the reference.
    """
    longest = _check_inputs(q, k, v, offsets, max_seq_len, causal, activation)
    if use_triton(q):
        # Imported here so that `import recray.kernels` works where triton is absent.
        from recray.kernels.triton import flash_attention as triton_flash_attention

        # The check measured the longest sequence already: the kernel grid is sized by it.
        return triton_flash_attention.jagged_flash_attention(
            q, k, v, offsets, max_seq_len, causal=causal, activation=activation, scale=scale,
            longest=longest,
        )  # fmt: skip
    return reference.jagged_flash_attention(
        q, k, v, offsets, max_seq_len, causal=causal, activation=activation, scale=scale
    )


def _check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    offsets: torch.Tensor,
    max_seq_len: int,
    causal: bool,
    activation: str,
) -> int:
    """Raise on bad input; return the longest sequence length."""
    for name, t, shape in (("q", q, "[T, H, D]"), ("k", k, "[T, H, D]"), ("v", v, "[T, H, Dv]")):
        if t.dim() != 3:
            raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")
    if not q.is_floating_point() or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(
            f"q, k, v: expected one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if k.shape[:2] != q.shape[:2] or v.shape[:2] != q.shape[:2]:
        raise ValueError(
            f"k, v: expected {tuple(q.shape[:2])} (tokens, heads) like q, got "
            f"{tuple(k.shape[:2])} and {tuple(v.shape[:2])}"
        )
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"k: expected head dim {q.shape[2]} like q, got {k.shape[2]}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
    if not isinstance(causal, bool):
        raise ValueError(f"causal: expected a bool, got {causal!r}")
    check_same_device(q=q, k=k, v=v, offsets=offsets)
    longest = check_offsets(offsets, q.shape[0], "q, k, v")
    if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 0:
        raise ValueError(f"max_seq_len: expected a non-negative int, got {max_seq_len!r}")
    if max_seq_len < longest:
        raise ValueError(
            f"max_seq_len: expected at least the longest sequence length {longest}, "
            f"got {max_seq_len}"
        )
    return longest
