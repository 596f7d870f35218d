"""Backend choice (Triton or pure-torch reference) and the input checks shared by the public ops."""

from __future__ import annotations

import importlib.util
import os

import torch

BACKENDS = ("auto", "reference", "triton")
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def use_triton(tensor: torch.Tensor) -> bool:
    """Whether an op on `tensor` (its device and dtype) runs its Triton kernel.

    `RECRAY_KERNELS` picks: `auto` (default) uses Triton for CUDA tensors when triton is
    installed and the reference otherwise; `reference` forces the reference everywhere;
    `triton` forces Triton, which on CPU tensors only works under `TRITON_INTERPRET=1` (tests).
    Dtypes other than float32, bfloat16 and float16 always run the reference.
    """
    device = tensor.device
    backend = os.environ.get("RECRAY_KERNELS", "auto") or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"RECRAY_KERNELS: expected one of {BACKENDS}, got {backend!r}")
    if backend == "reference" or tensor.dtype not in TRITON_DTYPES:
        return False
    if backend == "triton":
        if device.type != "cuda" and not _triton_interpreter_on():
            raise RuntimeError(
                f"RECRAY_KERNELS=triton with {device.type} tensors needs TRITON_INTERPRET=1 set "
                "before triton is imported (the interpreter runs kernels on CPU tensors)"
            )
        return True
    return device.type == "cuda" and importlib.util.find_spec("triton") is not None


def _triton_interpreter_on() -> bool:
    """Whether triton runs kernels in its interpreter, by triton's own reading of
    `TRITON_INTERPRET` (1, true, yes, on, y in any case), so that the two always agree."""
    from triton import knobs

    return knobs.runtime.interpret


def check_same_device(**tensors: torch.Tensor) -> None:
    """All tensors on one device, or a ValueError naming the first that is not."""
    names = list(tensors)
    first = tensors[names[0]].device
    for name in names[1:]:
        if tensors[name].device != first:
            raise ValueError(
                f"{name}: expected device {first} like {names[0]}, got {tensors[name].device}"
            )


def check_offsets(offsets: torch.Tensor, total_tokens: int, tokens_in: str) -> int:
    """Validate jagged `offsets [B+1]` over `total_tokens` rows; returns the longest length.

    The happy path reads the few numbers it needs in one device-to-host copy (one sync on CUDA).
    """
    if offsets.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"offsets: expected int32 or int64, got {offsets.dtype}")
    if offsets.dim() != 1 or offsets.numel() == 0:
        raise ValueError(f"offsets: expected shape [B+1], got {tuple(offsets.shape)}")
    lengths = offsets[1:] - offsets[:-1]
    ends = offsets[[0, -1]]
    span = torch.stack(lengths.aminmax()) if lengths.numel() else lengths.new_zeros(2)
    first, last, shortest, longest = torch.cat([ends, span]).tolist()
    if first != 0:
        raise ValueError(f"offsets: expected offsets[0] == 0, got {first}")
    if shortest < 0:
        i = int(torch.nonzero(lengths < 0)[0])
        raise ValueError(
            f"offsets: expected non-decreasing values, got offsets[{i}] = {int(offsets[i])} > "
            f"offsets[{i + 1}] = {int(offsets[i + 1])}"
        )
    if last != total_tokens:
        raise ValueError(
            f"offsets: expected offsets[-1] == {total_tokens} (tokens in {tokens_in}), got {last}"
        )
    return longest
