"""Every Triton kernel compiles for sm_90 (Hopper) here, on a machine without a GPU.

The interpreter tests check what the kernels compute; only the GPU compiler checks that they
compile (it rejects a plain global read inside `@triton.jit` that the interpreter accepts) and
what they ask of the hardware. `recray.kernels.triton.gpu_compile` compiles each case through
triton's own binder, down to a cubin with the bundled ptxas, in fresh processes without
`TRITON_INTERPRET` (conftest.py sets it for this one). One autotune config per case (the
quickest to compile, or the one with the most shared memory) keeps the matrix near a minute
on two cores, with triton's cache cold (warm, it takes seconds).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("triton")

SHARED_MEMORY_BYTES = 227 * 1024  # Hopper's per-block limit, stated independently of the code
DTYPES = ["bfloat16", "float16", "float32"]
MODES = ["softmax", "softmax_causal", "silu", "silu_causal", "target_gathered"]
KERNELS = ["fwd", "dkdv", "dq"]


def _cases() -> list[dict]:
    """Every attention kernel in every mode (bf16), in fp16 (SiLU, causal) and in fp32 (causal
    softmax, at head dim 128); the padded head-dim blocks (16; 24 -> 32 with value dim 40 -> 64);
    at head dim 128 every config the prune keeps for the backward in bf16 (where spills were)
    and the one with the most shared memory otherwise (fp32 is where configs overran it); the
    helper and product-key kernels. The other cases compile their quickest config: they check
    the language, not resources."""
    attention = [("bfloat16", mode, 64, 64, "smallest") for mode in MODES]
    attention += [("float16", "silu_causal", 64, 64, "smallest")]
    attention += [("bfloat16", "softmax_causal", 16, 16, "smallest")]
    attention += [("bfloat16", "target_gathered", 24, 40, "smallest")]
    cases = [
        {"kernel": kernel, "dtype": dtype, "mode": mode, "head_dim": head_dim,
         "value_dim": value_dim, "configs": configs}
        for dtype, mode, head_dim, value_dim, configs in attention for kernel in KERNELS
    ]  # fmt: skip
    cases += [
        {"kernel": kernel, "dtype": dtype, "mode": "softmax_causal", "head_dim": 128,
         "value_dim": 128, "configs": configs}
        for kernel, dtype, configs in (
            ("fwd", "bfloat16", "largest"), ("dkdv", "bfloat16", "all"),
            ("dq", "bfloat16", "all"), ("fwd", "float32", "largest"),
            ("dkdv", "float32", "largest"), ("dq", "float32", "largest"),
        )
    ]  # fmt: skip
    cases += [{"kernel": "delta", "dtype": dtype, "value_dim": 40} for dtype in DTYPES]
    cases += [
        {"kernel": kernel, "dtype": dtype, "k": 32, "value_dim": 200}
        for kernel in ("pk_fwd", "pk_bwd")
        for dtype in DTYPES
    ]
    cases += [{"kernel": "pk_bwd", "dtype": "float32", "k": 1, "value_dim": 24}]
    return cases


def _compile(cases: list[dict]) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", "recray.kernels.triton.gpu_compile"]
    done = subprocess.run(
        command, input=json.dumps(cases), capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def compiled() -> list[dict]:
    """All cases, split over two processes (the machine has two cores)."""
    cases = _cases()
    with ThreadPoolExecutor(2) as pool:
        halves = pool.map(_compile, [cases[0::2], cases[1::2]])
    return [report for half in halves for report in half]


def test_every_kernel_compiles_to_a_cubin_for_sm90(compiled):
    failed = [
        f"{r['kernel']} {r['dtype']} {r['config']}: {r['error']}" for r in compiled if r["error"]
    ]
    assert not failed, "\n\n".join(failed[:3])
    # every attention kernel, every dtype, every mode reached ptxas (registers come from the cubin)
    assert all(r["registers"] > 0 for r in compiled)
    kinds = {(r["kernel"], r["dtype"]) for r in compiled}
    assert kinds == {(k, d) for k in [*KERNELS, "delta", "pk_fwd", "pk_bwd"] for d in DTYPES}


def test_kept_configs_fit_hopper_shared_memory_and_the_estimate_bounds_it(compiled):
    attention = [r for r in compiled if r["kernel"] in KERNELS]
    over = [r for r in attention if r["shared_bytes"] > SHARED_MEMORY_BYTES]
    assert not over, over[:3]
    underestimated = [r for r in attention if r["estimated_shared_bytes"] < r["shared_bytes"]]
    assert not underestimated, underestimated[:3]


def test_bf16_head_dim_128_configs_do_not_spill_registers(compiled):
    # bf16/fp16 are the tensor-core dtypes that training runs in; fp32's dot runs on the FMA
    # units with fp32 operands in registers and may spill (it is the exact-check dtype)
    wide = [
        r for r in compiled
        if r["kernel"] in KERNELS and r["dtype"] == "bfloat16" and '"BLOCK_D": 128' in r["config"]
    ]  # fmt: skip
    assert len(wide) >= 4  # the fwd's largest, every dK/dV and dQ config kept
    # ptxas may park a register or two (4-8 bytes) to meet its occupancy target; the spills
    # this guards against were 56-896 bytes per thread in every dK/dV config but two
    spilling = [(r["kernel"], r["config"], r["stack_bytes"]) for r in wide if r["stack_bytes"] > 16]
    assert not spilling, spilling
