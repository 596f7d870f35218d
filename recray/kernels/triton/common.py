"""Helpers shared by the Triton kernels: interpreter switches, matmul, block sizes, configs."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton import knobs
from triton.compiler import max_shared_mem
from triton.runtime import driver

# Read when this module is imported, which is when the kernels below are decorated: triton
# itself decides interpreter or GPU at decoration time too, with this same knob (any of 1, true,
# yes, on, y), so the two can never disagree.
INTERPRET = knobs.runtime.interpret
# Hopper's per-block shared memory (227 KB): the budget where no GPU is active (compiling for
# sm_90 in tests); on a GPU the budget is that GPU's, as triton checks it at load.
HOPPER_SHARED_MEMORY_BYTES = 227 * 1024
# 255 usable 32-bit registers per thread (less the indices and pointers the tiles need).
REGISTER_BYTES = 256 * 4

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


def attention_shared_bytes(kernel: str, config: triton.Config, args: dict) -> int:
    """Upper estimate of the shared memory (bytes) an attention kernel asks for under `config`.

    The loop streams blocks of key rows (`kernel` fwd, dq) or query rows (dkdv), each as wide as
    BLOCK_D + BLOCK_DV, through `num_stages` buffers (plus the float32 log-sum-exp and delta of
    streamed query rows); the block that stays put is staged once. Checked against the
    compiler's own figure for sm_90 in tests/test_kernels_compile.py.
    """
    element = args["Q"].element_size()
    width = args["BLOCK_D"] + args["BLOCK_DV"]
    stationary, streamed = _rows(kernel, config)
    return config.num_stages * streamed * (width * element + 8) + stationary * width * element


def attention_register_bytes(kernel: str, config: triton.Config, args: dict) -> int:
    """Estimate of the register bytes per thread: the tiles that stay put, their float32
    accumulators, one streamed tile and the float32 [BLOCK_M, BLOCK_N] score temporaries
    (two in the forward, four in the backward), spread over the block's threads."""
    element = args["Q"].element_size()
    dim, value_dim = args["BLOCK_D"], args["BLOCK_DV"]
    block_m, block_n = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    stationary, streamed = _rows(kernel, config)
    kept = {
        "fwd": dim * element + value_dim * 4,  # q; the output accumulator
        "dq": (dim + value_dim) * element + dim * 4,  # q, dO; dQ
        "dkdv": (dim + value_dim) * (element + 4),  # k, v; dK, dV
    }[kernel]
    scores = (2 if kernel == "fwd" else 4) * block_m * block_n * 4
    total = stationary * kept + streamed * (dim + value_dim) * element + scores
    return total // (config.num_warps * 32)


def _rows(kernel: str, config: triton.Config) -> tuple[int, int]:
    """(rows that stay put, rows streamed by the loop) of an attention kernel's blocks."""
    block_m, block_n = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    return (block_n, block_m) if kernel == "dkdv" else (block_m, block_n)


def prune_configs(
    configs: list[triton.Config], named_args: dict, kernel: str, **kwargs
) -> list[triton.Config]:
    """Autotune `early_config_prune`: drop configs over the GPU's shared memory (they fail only
    after seconds of compiling) or whose tiles would not fit 255 registers per thread (ptxas
    spills them to local memory). Keeps the smallest config if none fits, so a launch still
    runs or fails with the compiler's own error. `RECRAY_KERNELS_AUTOTUNE=0` keeps only the
    smallest fitting config: one compile per kernel and shape class instead of a sweep (a
    correctness run, a first run on a new GPU)."""
    args = {**named_args, **kwargs}
    shared_memory = shared_memory_bytes()
    fits = [
        c for c in configs
        if attention_shared_bytes(kernel, c, args) <= shared_memory
        and attention_register_bytes(kernel, c, args) < REGISTER_BYTES
    ]  # fmt: skip
    smallest = min(fits or configs, key=lambda c: attention_register_bytes(kernel, c, args))
    return fits if fits and autotune_on() else [smallest]


def shared_memory_bytes() -> int:
    """Shared memory per block on the active GPU (227 KB on H100/H200, 163 KB on A100), or
    Hopper's where none is active."""
    if INTERPRET or not torch.cuda.is_available():
        return HOPPER_SHARED_MEMORY_BYTES
    return max_shared_mem(driver.active.get_current_device())


def autotune_on() -> bool:
    """`RECRAY_KERNELS_AUTOTUNE` (default on); 0, false, no or off turn the sweep off."""
    value = os.environ.get("RECRAY_KERNELS_AUTOTUNE", "1").strip().lower()
    return value not in ("0", "false", "no", "off")
