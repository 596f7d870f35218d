"""Jagged <-> padded layout helpers, for baselines and tests only (the data path never pads)."""

from __future__ import annotations

import torch


def _rows_and_positions(offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For every jagged token: the sequence it belongs to and its position inside it."""
    offsets = offsets.long()
    lengths = offsets[1:] - offsets[:-1]
    rows = torch.repeat_interleave(torch.arange(lengths.numel(), device=offsets.device), lengths)
    positions = torch.arange(rows.numel(), device=offsets.device) - offsets[rows]
    return rows, positions


def jagged_to_padded(
    values: torch.Tensor, offsets: torch.Tensor, max_len: int, padding_value: float = 0.0
) -> torch.Tensor:
    """`values [T, ...]` split by `offsets [B+1]` -> `[B, max_len, ...]`; longer sequences are truncated."""
    rows, positions = _rows_and_positions(offsets)
    keep = positions < max_len
    padded = values.new_full((offsets.numel() - 1, max_len, *values.shape[1:]), padding_value)
    return padded.index_put((rows[keep], positions[keep]), values[keep])


def padded_to_jagged(padded: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """`padded [B, max_len, ...]` -> `[T, ...]`, keeping the first `offsets[b+1] - offsets[b]` of row b."""
    lengths = offsets[1:] - offsets[:-1]
    if lengths.numel() and int(lengths.max()) > padded.shape[1]:
        raise ValueError(
            f"offsets: a sequence has length {int(lengths.max())}, longer than the padded "
            f"max_len {padded.shape[1]}"
        )
    rows, positions = _rows_and_positions(offsets)
    return padded[rows, positions]
