"""Helpers shared by the Triton kernels: interpreter switches, matmul, block sizes, configs."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Read when this module is imported, which is when the kernels below are decorated: triton
# itself decides interpreter or GPU at decoration time too.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# triton 3.7's interpreter multiplies bfloat16 tiles as their raw uint16 bits, so under it
# every tl.dot operand is widened to float32 first (exact: a bf16/fp16 product fits in fp32,
# which is what the tensor cores accumulate in anyway).
_DOT_IN_FP32 = tl.constexpr(INTERPRET)


@triton.jit
def matmul(a, b, PRECISION: tl.constexpr):
    """`tl.dot(a, b)` with float32 accumulation; see `_DOT_IN_FP32` for the interpreter."""
    if _DOT_IN_FP32:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32))
    else:
        out = tl.dot(a, b, input_precision=PRECISION)
    return out


def dot_precision(dtype: torch.dtype) -> str:
    """float32 inputs multiply in full precision (tf32 would cost ~1e-3 relative error);
    bf16/fp16 use the tensor cores whatever this says."""
    return "ieee" if dtype == torch.float32 else "tf32"


def block_size(n: int) -> int:
    """Power-of-two tile width >= n and >= 16 (tl.dot needs every dimension >= 16); the
    kernels mask the padding, so head dims like 24 or 80 work."""
    return max(16, triton.next_power_of_2(n))


def length_bucket(n: int) -> int:
    """Autotune key for a length: its power of two, so each new batch does not re-tune."""
    return triton.next_power_of_2(max(n, 1))


def configs(
    gpu: list[tuple[int, int, int, int]], interpreter: tuple[int, int] = (16, 16)
) -> list[triton.Config]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) autotune configs; one small config under the
    interpreter, where autotuning would only multiply the (slow, CPU) test time."""
    if INTERPRET:
        block_m, block_n = interpreter
        return [triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=1)]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in gpu
    ]
