"""Compile the Triton kernels for a GPU target (sm_90 by default) on a machine without a GPU.

The interpreter that runs the kernels in the CPU tests never meets the GPU compiler, which
rejects code the interpreter accepts (a plain global read inside `@triton.jit`, a shared-memory
budget overrun). This module compiles a kernel exactly as a launch would: the arguments go
through triton's own binder, so the signature, constexprs and alignment attributes are those a
real call specialises on (this leans on triton 3.7's `create_function_from_signature` and
`JITFunction._pack_args`, pinned by pyproject). It needs `TRITON_INTERPRET` unset before triton
is imported (under the interpreter `@triton.jit` makes no compilable function), so tests run it
in a fresh process:

    python -m recray.kernels.triton.gpu_compile < cases.json     # JSON list in, JSON list out
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

from recray.kernels.triton import common, flash_attention, product_key

HOPPER = GPUTarget("cuda", 90, 32)
# mode -> (CAUSAL, SILU, GATHER_Q): self-attention variants and target attention with
# candidates sharing histories (gathered query rows)
MODES = {
    "softmax": (False, False, False),
    "softmax_causal": (True, False, False),
    "silu": (False, True, False),
    "silu_causal": (True, True, False),
    "target_gathered": (False, False, True),
}
ATTENTION_KERNELS = {
    "fwd": flash_attention._fwd_kernel,
    "dkdv": flash_attention._bwd_dkdv_kernel,
    "dq": flash_attention._bwd_dq_kernel,
}


@dataclass
class Compiled:
    """What the compiler reports for one kernel specialisation; `error` set if it failed."""

    kernel: str
    dtype: str
    config: str
    shared_bytes: int = 0
    estimated_shared_bytes: int = 0
    registers: int = 0
    stack_bytes: int = 0  # > 0 here means register spills: the kernels keep no local arrays
    seconds: float = 0.0
    error: str = ""


def compile_case(case: dict, target: GPUTarget = HOPPER) -> list[Compiled]:
    """Compile one case: `kernel` (fwd, dkdv, dq, delta, pk_fwd, pk_bwd), `dtype`, and
    `head_dim`/`value_dim`/`mode` (attention) or `k`/`value_dim` (product keys). `configs`:
    "all" compiles every autotune config `common.prune_configs` keeps, "largest" only the one
    with the largest shared-memory estimate (the one most likely to overrun), "smallest" the
    one with the smallest register estimate (the quickest to compile)."""
    dtype = getattr(torch, case["dtype"])
    name = case["kernel"]
    if name in ATTENTION_KERNELS:
        return _compile_attention(case, dtype, target)
    if name == "delta":
        value_dim = case["value_dim"]
        out = _tensor(dtype)
        args = dict(OUT=out, DO=out, DELTA=_tensor(torch.float32), num_rows=1000,
                    value_dim=value_dim, BLOCK_R=16, BLOCK_DV=common.block_size(value_dim))  # fmt: skip
        return [_compile(flash_attention._delta_kernel, args, name, dtype, {}, target)]
    if name in ("pk_fwd", "pk_bwd"):
        return [_compile_product_key(case, dtype, target)]
    raise ValueError(f"kernel: expected one of {[*ATTENTION_KERNELS, 'delta', 'pk_fwd', 'pk_bwd']}, "
                     f"got {name!r}")  # fmt: skip


def _compile_attention(case: dict, dtype: torch.dtype, target: GPUTarget) -> list[Compiled]:
    autotuner = ATTENTION_KERNELS[case["kernel"]]
    causal, silu, gather_q = MODES[case["mode"]]
    head_dim, value_dim = case["head_dim"], case["value_dim"]
    data, f32, index = _tensor(dtype), _tensor(torch.float32), _tensor(torch.int64)
    pointers = {name: data for name in ("Q", "K", "V", "OUT", "DO", "DK", "DV", "DQ")}
    pointers.update(LSE=f32, DELTA=f32, q_offsets=index, k_offsets=index, q_index=index)
    scalars = dict(num_heads=4, head_dim=head_dim, value_dim=value_dim, scale=0.125,
                   silu_norm=1.0 / 300, max_q=300, max_k=300, q_len_bucket=512,
                   k_len_bucket=512)  # fmt: skip
    meta = dict(BLOCK_D=common.block_size(head_dim), BLOCK_DV=common.block_size(value_dim),
                CAUSAL=causal, SILU=silu, GATHER_Q=gather_q,
                PRECISION=common.dot_precision(dtype))  # fmt: skip
    named = {**pointers, **scalars, **meta}
    args = {name: named[name] for name in autotuner.fn.arg_names if name in named}
    kernel = case["kernel"]
    configs = common.prune_configs(autotuner.configs, args, kernel=kernel)
    choice = case.get("configs", "all")
    if choice == "largest":
        configs = [max(configs, key=lambda c: common.attention_shared_bytes(kernel, c, args))]
    elif choice == "smallest":
        configs = [min(configs, key=lambda c: common.attention_register_bytes(kernel, c, args))]
    return [
        _compile(
            autotuner.fn,
            {**args, **config.kwargs},
            kernel,
            dtype,
            {"num_warps": config.num_warps, "num_stages": config.num_stages},
            target,
            estimate=common.attention_shared_bytes(kernel, config, args),
        )
        for config in configs
    ]


def _compile_product_key(case: dict, dtype: torch.dtype, target: GPUTarget) -> Compiled:
    k, value_dim = case["k"], case["value_dim"]
    data, f32 = _tensor(dtype), _tensor(torch.float32)
    i64, i32 = _tensor(torch.int64), _tensor(torch.int32)
    meta = dict(K=k, BLOCK_K=triton.next_power_of_2(k),
                BLOCK_DV=product_key._value_block(value_dim))  # fmt: skip
    if case["kernel"] == "pk_fwd":
        kernel = product_key._fwd_kernel
        args = dict(TOP_A=f32, ROWS_A=i64, TOP_B=f32, ROWS_B=i64, VALUES=data, OUT=data,
                    SLOTS=i64, PAIRS=i32, WEIGHTS=f32, num_b=1024, value_dim=value_dim,
                    stride_values=value_dim)  # fmt: skip
    else:
        kernel = product_key._bwd_kernel
        args = dict(GRAD_OUT=data, VALUES=data, SLOTS=i64, PAIRS=i32, WEIGHTS=f32,
                    GRAD_VALUES=f32, GRAD_TOP_A=f32, GRAD_TOP_B=f32, value_dim=value_dim,
                    stride_values=value_dim)  # fmt: skip
    return _compile(kernel, {**args, **meta}, case["kernel"], dtype, {}, target)


def _tensor(dtype: torch.dtype) -> torch.Tensor:
    """A stand-in pointer argument: the binder reads only its dtype and 16-byte alignment."""
    return torch.empty(64, dtype=dtype)


def _compile(
    kernel: JITFunction,
    args: dict,
    name: str,
    dtype: torch.dtype,
    options: dict,
    target: GPUTarget,
    estimate: int = 0,
) -> Compiled:
    if not isinstance(kernel, JITFunction):
        raise RuntimeError(
            f"{name}: got {type(kernel).__name__}, not a JITFunction; unset TRITON_INTERPRET "
            "before triton is imported (run this module in a fresh process)"
        )
    constexprs = {p.name: args[p.name] for p in kernel.params if p.is_constexpr}
    report = Compiled(
        kernel=name,
        dtype=str(dtype).removeprefix("torch."),
        config=json.dumps({**{k: v for k, v in constexprs.items() if k.startswith("BLOCK")},
                           **options}, sort_keys=True),
        estimated_shared_bytes=estimate,
    )  # fmt: skip
    started = time.perf_counter()
    try:
        backend = make_backend(target)
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        bound, specialization, _ = binder(**args, **options)
        parsed, signature, constants, attrs = kernel._pack_args(
            backend, options, bound, specialization, None
        )
        compiled = triton.compile(
            ASTSource(kernel, signature, constants, attrs), target=target, options=parsed.__dict__
        )
    except Exception as error:  # reported per case, so one failure does not hide the others
        report.error = f"{type(error).__name__}: {error}"[:3000]
        return report
    report.seconds = round(time.perf_counter() - started, 2)
    report.shared_bytes = compiled.metadata.shared
    if "cubin" in compiled.asm:
        report.registers, report.stack_bytes = _resource_usage(compiled.asm["cubin"])
    return report


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, stack bytes) per thread from triton's bundled cuobjdump."""
    cuobjdump = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        usage = subprocess.run(
            [str(cuobjdump), "--dump-resource-usage", file.name],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
    fields = dict(
        item.split(":", 1) for line in usage.splitlines() if "REG:" in line
        for item in line.split() if ":" in item
    )  # fmt: skip
    return int(fields.get("REG", 0)), int(fields.get("STACK", 0))


def main() -> None:
    cases = json.load(sys.stdin)
    json.dump([asdict(c) for case in cases for c in compile_case(case)], sys.stdout)


if __name__ == "__main__":
    main()
