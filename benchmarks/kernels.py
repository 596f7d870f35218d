"""Jagged Triton kernels vs torch baselines on one GPU: correctness, ms, peak memory, useful TFLOP/s.

    python benchmarks/kernels.py --out benchmarks/results/kernels.json     # one H100/H200, < 8 min
    python benchmarks/kernels.py --dry-run                                 # the time estimate only
    python benchmarks/kernels.py --device cpu --smoke                      # plumbing check, no GPU

Needs only torch and triton (not Ray or TorchRec) and imports nothing of recray but
recray.kernels, from a checkout where recray is not installed (PYTHONPATH=. is enough). The run
prints an estimate of its own time first (autotune compiles dominate it), stops cleanly at
`--budget-s`, and rewrites its JSON after every row, so a run killed at a lease's end keeps
what it measured. A short correctness pass (bf16 and fp32 at two head dims, one config per
kernel) comes before the timing rows, which autotune. Every number counts real tokens only:
useful FLOPs are 4 * sum(len^2) * H * D for a softmax forward (halved when causal); forward +
backward is 3.5x the forward (the backward is 2.5x, FlashAttention's convention), so TFLOP/s
ratios equal time ratios. Padded baselines get pre-padded inputs (the padding copy is not
timed) and pad to the batch's longest sequence. A baseline that fails or runs out of memory is
recorded as such; the run goes on.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import inspect
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the GPU machine runs from a checkout, without `pip install -e`

# (batch, heads, max_len, head_dim, density): lengths uniform in [1, 2 * density * max_len]
ATTENTION_SHAPES = [
    (1024, 4, 256, 64, 0.5),
    (256, 4, 512, 64, 0.25),
    (256, 4, 1024, 64, 0.25),
    (128, 4, 2048, 128, 0.25),
    (64, 8, 4096, 64, 0.1),
]
SMOKE_ATTENTION_SHAPES = [(3, 2, 32, 24, 0.5)]
# (batch, na = nb, dim, k, value_dim)
MEMORY_SIZES = [
    (2048, 256, 128, 32, 256),
    (2048, 1024, 128, 32, 256),
    (2048, 1024, 256, 32, 256),
]
SMOKE_MEMORY_SIZES = [(4, 16, 32, 4, 24)]
# (activation, causal) timed: softmax both ways, SiLU causal as HSTU uses it
MODES = [("softmax", False), ("softmax", True), ("silu", True)]
TOLERANCE = {"float32": 2e-5, "float16": 5e-3, "bfloat16": 3e-2}  # relative Frobenius error
# Correctness pass: one autotune config per kernel (RECRAY_KERNELS_AUTOTUNE=0)
CHECK_DTYPES = ["bfloat16", "float32"]
CHECK_DIMS = [24, 128]  # 24 pads to a 32-wide block; 128 is the widest, the most resources
# with target attention (one query per history, then shared histories): softmax and SiLU,
# causal and not, gathered queries and not, in three compiles per kernel
CHECK_FLASH_MODES = [("softmax", False), ("silu", True)]
SMOKE_CHECK = (["float32"], [24])

# Estimate (seconds), measured on the 2-core CPU machine that builds recray (triton 3.7.1,
# sm_90 target): one autotune config of one kernel compiles in 0.5-1.5 s in bf16 at head dim
# 64, 0.5-3.8 s at 128, 3-12 s in fp32; the GPU host compiles no slower. Triton's autotuner
# then times each kept config for 25 + 100 ms; a timed call is its useful FLOPs at 100 TFLOP/s
# (padded baselines: their padded FLOPs) plus launch overhead.
COMPILE_S = {("bfloat16", 64): 1.2, ("bfloat16", 128): 2.0, ("float32", 64): 5.0,
             ("float32", 128): 8.0}  # fmt: skip
TUNE_S_PER_CONFIG = 0.2
ESTIMATE_TFLOPS = 100.0
CALL_OVERHEAD_S = 0.002
STARTUP_S = 20.0


def main() -> None:
    started = time.perf_counter()  # the budget counts start-up (torch, CUDA) like the lease does
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/kernels.json")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, 1 rep (CPU check)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--skip-correctness", action="store_true")
    parser.add_argument(
        "--budget-s", type=float, default=420.0,
        help="stop before a row that would end past this many seconds from start (default "
        "420: an 8-minute lease less a row that runs over its estimate)",
    )  # fmt: skip
    parser.add_argument("--dry-run", action="store_true", help="print the estimate and exit")
    args = parser.parse_args()
    if args.device == "cpu":
        # Triton on CPU tensors = the interpreter, which must be on before triton is imported.
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ["RECRAY_KERNELS"] = "triton"
    if args.smoke:
        args.warmup, args.reps = 1, 1
    plan = Plan(args.smoke, args.skip_correctness, args.warmup, args.reps)
    estimate = plan.estimate()
    print(_estimate_lines(estimate, args.budget_s), flush=True)
    if args.dry_run:
        return

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device; use --device cpu --smoke for a plumbing check")
    import triton

    device = torch.device(args.device)
    result: dict = {
        "benchmark": "kernels",
        "status": "running",
        "device": torch.cuda.get_device_name()
        if device.type == "cuda"
        else (platform.processor() or platform.machine()),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
        "smoke": args.smoke,
        "budget_s": args.budget_s,
        "estimate_s": estimate,
        "timing": f"median of {args.reps} after {args.warmup} warmup calls"
        + (", CUDA events" if device.type == "cuda" else ", wall clock"),
        "flops": "fwd softmax/silu 4*sum(len^2)*H*D, /2 causal; fwd+bwd 3.5x fwd",
        "dtype": "bfloat16",
        "memory": "peak_mb: torch.cuda.max_memory_allocated over the timed calls (every resident "
        "tensor included, e.g. all methods' inputs); extra_mb: peak minus what was allocated "
        "before them, i.e. the op's own memory",
        "recray_speedup": "baseline ms / recray ms (> 1: recray is faster)",
        "correctness": [],
        "attention": [],
        "product_key": [],
    }
    writer = Writer(args.out, result, started)
    budget = Budget(args.budget_s, started)
    if not args.skip_correctness:
        with _environment("RECRAY_KERNELS_AUTOTUNE", "0"):
            for kind, params in plan.correctness_cases():
                if not budget.allows(plan.correctness_seconds(kind, params), f"check {params}"):
                    break
                result["correctness"].append(check(kind, params, device))
                writer.write()
        failed = [c for c in result["correctness"] if not c.get("ok")]
        print(f"correctness: {len(result['correctness']) - len(failed)} ok, {len(failed)} failed")
        for case in failed:
            print("  FAILED", json.dumps(_json_safe(case)))
        _forget_tuning()  # the timing rows autotune afresh, not with the one config above
    for shape in plan.attention_shapes:
        if budget.stopped:
            break
        for row in bench_attention(shape, device, args.warmup, args.reps, plan, budget):
            result["attention"].append(row)
            writer.write()
    for size in plan.memory_sizes:
        if budget.stopped or not budget.allows(plan.memory_seconds(size), f"memory {size}"):
            break
        for row in bench_memory(size, device, args.warmup, args.reps):
            result["product_key"].append(row)
            writer.write()
    result["status"] = budget.stopped or "complete"
    writer.write()
    print(f"wrote {args.out} in {result['seconds']} s ({result['status']})")


class Writer:
    """Rewrites the JSON after every row (atomically: a run killed mid-write keeps the last)."""

    def __init__(self, path: Path, result: dict, started: float) -> None:
        self.path, self.result, self.started = path, result, started
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self) -> None:
        self.result["seconds"] = round(time.perf_counter() - self.started, 1)
        partial = self.path.with_name(self.path.name + ".partial")
        partial.write_text(json.dumps(_json_safe(self.result), indent=2, allow_nan=False))
        partial.replace(self.path)


def _json_safe(value):
    """NaN and infinities become null: JSON has no spelling for them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


class Budget:
    """Refuses work whose estimate would end past `budget_s`; `stopped` says why it stopped."""

    def __init__(self, budget_s: float, started: float) -> None:
        self.budget_s, self.started, self.stopped = budget_s, started, ""

    def allows(self, seconds: float, what: str) -> bool:
        elapsed = time.perf_counter() - self.started
        if not self.stopped and elapsed + seconds > self.budget_s:
            self.stopped = (
                f"stopped by --budget-s {self.budget_s:.0f} at {elapsed:.0f} s: next was {what} "
                f"(estimated {seconds:.0f} s)"
            )
            print(self.stopped, flush=True)
        return not self.stopped


class Plan:
    """What the run will do, and the estimate of each part (see COMPILE_S above)."""

    def __init__(self, smoke: bool, skip_correctness: bool, warmup: int, reps: int) -> None:
        self.smoke, self.calls = smoke, warmup + reps
        self.attention_shapes = SMOKE_ATTENTION_SHAPES if smoke else ATTENTION_SHAPES
        self.memory_sizes = SMOKE_MEMORY_SIZES if smoke else MEMORY_SIZES
        self.check_dtypes, self.check_dims = SMOKE_CHECK if smoke else (CHECK_DTYPES, CHECK_DIMS)
        self.skip_correctness = skip_correctness
        self.compiled: set = set()  # (dtype, dim, mode, kernel) already compiled
        self.tuned: set = set()  # autotune keys already timed

    def correctness_cases(self) -> list[tuple[str, dict]]:
        if self.skip_correctness:
            return []
        cases = []
        for dtype in self.check_dtypes:
            for dim in self.check_dims:
                for activation, causal in CHECK_FLASH_MODES:
                    cases.append(("flash", {"dtype": dtype, "dim": dim, "activation": activation,
                                            "causal": causal}))  # fmt: skip
                for shared in (False, True):
                    cases.append(("target", {"dtype": dtype, "dim": dim, "shared": shared}))
            cases.append(("memory", {"dtype": dtype, "k": 4 if self.smoke else 32}))
        return cases

    def correctness_seconds(self, kind: str, params: dict) -> float:
        if kind == "memory":
            return 2 * self._compile_s(params["dtype"], 64) + 1.0
        # one query per history compiles like non-causal softmax self-attention
        mode = (params.get("activation", "softmax"), params.get("causal", False),
                params.get("shared", False))  # fmt: skip
        width = 128 if params["dim"] > 64 else 64
        kernels = ("fwd", "dkdv", "dq")
        new = {(params["dtype"], width, mode, k, "one config") for k in kernels} - self.compiled
        self.compiled |= new
        return len(new) * self._compile_s(params["dtype"], width) + 1.0

    def attention_seconds(self, shape, activation: str, causal: bool, direction: str) -> float:
        """Compiles and autotuning this row triggers, plus its timed calls."""
        import triton

        batch, heads, max_len, dim, density = shape
        longest = max(1, min(max_len, round(2 * density * max_len)))
        kernels = ("fwd",) if direction == "fwd" else ("dkdv", "dq")
        seconds = 0.0
        for kernel in kernels:
            configs = self.configs(kernel, dim)
            compile_key = ("bfloat16", dim, (activation, causal, False), kernel)
            if compile_key not in self.compiled:
                self.compiled.add(compile_key)
                seconds += configs * self._compile_s("bfloat16", dim)
            tune_key = (compile_key, triton.next_power_of_2(longest))
            if tune_key not in self.tuned and not self.smoke:
                self.tuned.add(tune_key)
                seconds += configs * TUNE_S_PER_CONFIG
        mean_square = longest**2 / 3  # lengths ~ uniform in [1, longest]
        useful = 4 * batch * mean_square * heads * dim / (2 if causal else 1)
        padded = 4 * batch * longest**2 * heads * dim
        if direction == "fwd+bwd":
            useful, padded = 3.5 * useful, 3.5 * padded
        methods = [useful, useful] + ([padded] if activation == "silu" else [useful] + 3 * [padded])
        per_call = sum(f / (ESTIMATE_TFLOPS * 1e12) + CALL_OVERHEAD_S for f in methods)
        return seconds + self.calls * per_call + 0.5

    def memory_seconds(self, size) -> float:
        batch, num_keys, dim, k, value_dim = size
        scores = 2 * batch * num_keys**2 * dim  # the naive baseline scores every slot
        return 2 * self.calls * 3 * (scores / (ESTIMATE_TFLOPS * 1e12) + CALL_OVERHEAD_S) + 2.0

    def configs(self, kernel: str, dim: int) -> int:
        """Autotune configs the prune keeps for bf16 at `dim` (1 under the interpreter)."""
        import torch

        from recray.kernels.triton import common, flash_attention

        autotuner = {"fwd": flash_attention._fwd_kernel, "dkdv": flash_attention._bwd_dkdv_kernel,
                     "dq": flash_attention._bwd_dq_kernel}[kernel]  # fmt: skip
        block = common.block_size(dim)
        args = {"Q": torch.empty(0, dtype=torch.bfloat16), "BLOCK_D": block, "BLOCK_DV": block}
        return len(common.prune_configs(autotuner.configs, args, kernel=kernel))

    def _compile_s(self, dtype: str, dim: int) -> float:
        return 0.0 if self.smoke else COMPILE_S[(dtype, 128 if dim > 64 else 64)]

    def estimate(self) -> dict:
        """Seconds per phase for the whole plan, from a fresh copy (this one stays unspent)."""
        fresh = Plan(self.smoke, self.skip_correctness, 0, self.calls)
        correctness = sum(fresh.correctness_seconds(*case) for case in fresh.correctness_cases())
        attention = sum(
            fresh.attention_seconds(shape, activation, causal, direction)
            for shape in fresh.attention_shapes
            for activation, causal in MODES
            for direction in ("fwd", "fwd+bwd")
        )
        memory = sum(fresh.memory_seconds(size) for size in fresh.memory_sizes)
        phases = {"startup": 0.0 if self.smoke else STARTUP_S, "correctness": correctness,
                  "attention": attention, "product_key": memory}  # fmt: skip
        return {
            **{k: round(v, 1) for k, v in phases.items()},
            "total": round(sum(phases.values()), 1),
        }


def _estimate_lines(estimate: dict, budget_s: float) -> str:
    parts = ", ".join(f"{k} {v:.0f} s" for k, v in estimate.items() if k != "total")
    fits = "within" if estimate["total"] <= budget_s else "OVER"
    return (
        f"estimated run time {estimate['total']:.0f} s ({estimate['total'] / 60:.1f} min; "
        f"{parts}), {fits} --budget-s {budget_s:.0f}"
    )


@contextlib.contextmanager
def _environment(name: str, value: str):
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            del os.environ[name]
        else:
            os.environ[name] = previous


def _forget_tuning() -> None:
    """Drop the autotuners' choices (not the compiled kernels) made with one config each."""
    if os.environ.get("RECRAY_KERNELS") == "reference":
        return
    from recray.kernels.triton import flash_attention

    for kernel in (flash_attention._fwd_kernel, flash_attention._bwd_dkdv_kernel,
                   flash_attention._bwd_dq_kernel):  # fmt: skip
        kernel.cache.clear()


# ----------------------------------------------------------------------------- measuring


def measure(fn: Callable[[], object], device, warmup: int, reps: int) -> dict:
    """Median ms and peak memory of `fn`, or the error (OOM included) that stopped it."""
    import torch

    cuda = device.type == "cuda"
    try:
        for _ in range(warmup):
            fn()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            resident = torch.cuda.memory_allocated()
        times = []
        for _ in range(reps):
            if cuda:
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                begun = time.perf_counter()
                fn()
                times.append((time.perf_counter() - begun) * 1e3)
        row = {"ms": statistics.median(times)}
        if cuda:
            peak = torch.cuda.max_memory_allocated()
            row.update(peak_mb=peak / 2**20, extra_mb=(peak - resident) / 2**20)
        return row
    except torch.cuda.OutOfMemoryError:
        return {"error": "out of memory"}
    except Exception as error:  # a baseline missing or refusing a shape must not end the run
        return {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"}
    finally:
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()


def forward_backward(fn: Callable[[], object], leaves: list) -> Callable[[], None]:
    """fn() then backward with a fixed upstream gradient; leaves' grads are dropped after."""
    import torch

    upstream = {}

    def run() -> None:
        out = fn()
        if "grad" not in upstream:
            upstream["grad"] = torch.randn_like(out)
        out.backward(upstream["grad"])
        for leaf in leaves:  # freed here, so `measure` sees them as the op's memory, not resident
            leaf.grad = None

    return run


def summarise(rows: dict[str, dict], flops: float) -> None:
    """Add useful TFLOP/s and our speedup over every baseline (baseline ms / our ms)."""
    ours = rows.get("recray", {}).get("ms")
    for name, row in rows.items():
        if "ms" in row:
            row["tflops"] = flops / row["ms"] / 1e9
            if ours and name != "recray":
                row["recray_speedup"] = row["ms"] / ours


# ----------------------------------------------------------------------------- attention


def jagged_batch(batch, heads, max_len, dim, density, device, dtype, seed=0):
    import torch

    gen = torch.Generator().manual_seed(seed)
    high = max(1, min(max_len, round(2 * density * max_len)))
    lengths = torch.randint(1, high + 1, (batch,), generator=gen)
    offsets = torch.zeros(batch + 1, dtype=torch.int32)
    offsets[1:] = lengths.cumsum(0)
    total = int(offsets[-1])
    q, k, v = (
        torch.randn(total, heads, dim, generator=gen).to(device=device, dtype=dtype)
        for _ in range(3)
    )
    return q, k, v, offsets.to(device), lengths


def padded(t, offsets, width):
    """[T, H, D] -> [B, H, width, D] leaf tensor, as SDPA wants it."""
    from recray.kernels import jagged_to_padded

    return jagged_to_padded(t.detach(), offsets, width).transpose(1, 2).contiguous()


def attention_methods(q, k, v, offsets, lengths, max_len, causal, activation):
    """name -> (callable giving the output, its leaf tensors, a note)."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from recray.kernels import jagged_flash_attention
    from recray.kernels.triton.flash_attention import jagged_flash_attention as kernel_only

    width = int(lengths.max())
    scale = 1 / math.sqrt(q.shape[-1])
    methods = {
        "recray": (
            lambda: jagged_flash_attention(
                q, k, v, offsets, max_len, causal=causal, activation=activation
            ),
            [q, k, v],
            "public op: input checks (one host sync) + Triton",
        ),
        "recray_kernel_only": (
            lambda: kernel_only(q, k, v, offsets, max_len, causal=causal, activation=activation),
            [q, k, v],
            "Triton autograd function without the input checks",
        ),
    }
    qp, kp, vp = (padded(t, offsets, width).requires_grad_() for t in (q, k, v))
    key_valid = torch.arange(width, device=q.device)[None, :] < lengths.to(q.device)[:, None]
    allowed = key_valid[:, None, None, :] & key_valid[:, None, :, None]  # [B, 1, L, L]
    if causal:
        allowed = allowed & torch.ones(width, width, dtype=torch.bool, device=q.device).tril()

    if activation == "silu":

        def silu_padded():
            scores = qp @ kp.transpose(-1, -2) * scale
            weights = (F.silu(scores) / max_len).masked_fill(~allowed, 0.0)
            return weights @ vp

        methods["torch_padded_silu"] = (silu_padded, [qp, kp, vp], "dense padded SiLU, masked")
        return methods

    varlen = _varlen_attn()
    if isinstance(varlen, str):
        methods["varlen_attn"] = (None, [], varlen)
    else:
        cu = offsets.to(torch.int32)
        methods["varlen_attn"] = (
            lambda: varlen(q, k, v, cu, cu, width, width, causal),
            [q, k, v],
            "torch.nn.attention.varlen.varlen_attn (FlashAttention varlen)",
        )

    def flash_padded():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(qp, kp, vp, is_causal=causal)

    def math_padded():
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(qp, kp, vp, attn_mask=allowed)

    methods["sdpa_flash_padded"] = (
        flash_padded,
        [qp, kp, vp],
        "flash SDPA on padded [B, H, L, D]; it takes no padding mask, so"
        + (" padded keys are hidden by causality" if causal else " speed only (attends padding)"),
    )
    methods["sdpa_math_padded"] = (math_padded, [qp, kp, vp], "math SDPA, padded, boolean mask")

    def nested():
        as_nested = [
            torch.nested.nested_tensor_from_jagged(t, offsets.long()).transpose(1, 2)
            for t in (q, k, v)
        ]
        out = F.scaled_dot_product_attention(*as_nested, is_causal=causal)
        return out.transpose(1, 2).values()

    methods["sdpa_nested"] = (nested, [q, k, v], "SDPA on nested (jagged layout) tensors")
    return methods


def _varlen_attn():
    """varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, causal), or why it is unavailable."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError as error:
        return f"unavailable in this torch: {error}"
    parameters = inspect.signature(varlen_attn).parameters
    if "is_causal" in parameters:  # torch 2.9-2.10 spelling

        def call(q, k, v, cu_q, cu_k, max_q, max_k, causal):
            return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=causal)

    else:  # later: a sliding window, (-1, 0) = causal

        def call(q, k, v, cu_q, cu_k, max_q, max_k, causal):
            window = (-1, 0) if causal else (-1, -1)
            return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, window_size=window)

    return call


def bench_attention(shape, device, warmup, reps, plan: Plan, budget: Budget):
    """Rows (one per mode and direction) as they are measured; stops where the budget says."""
    import torch

    batch, heads, max_len, dim, density = shape
    q, k, v, offsets, lengths = jagged_batch(*shape, device, torch.bfloat16)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    sum_squares = int((lengths.long() ** 2).sum())
    for activation, causal in MODES:
        base = {
            "batch": batch, "heads": heads, "max_len": max_len, "head_dim": dim,
            "density": density, "tokens": int(lengths.sum()),
            "longest": int(lengths.max()), "activation": activation, "causal": causal,
        }  # fmt: skip
        forward_flops = 4 * sum_squares * heads * dim / (2 if causal else 1)
        methods = attention_methods(q, k, v, offsets, lengths, max_len, causal, activation)
        for direction, flops in (("fwd", forward_flops), ("fwd+bwd", 3.5 * forward_flops)):
            estimate = plan.attention_seconds(shape, activation, causal, direction)
            if not budget.allows(estimate, f"{shape} {activation} causal={causal} {direction}"):
                return
            begun = time.perf_counter()
            measured = {}
            for name, (fn, leaves, note) in methods.items():
                if fn is None:
                    measured[name] = {"error": note}
                    continue
                if direction == "fwd":
                    with torch.no_grad():
                        row = measure(fn, device, warmup, reps)
                else:
                    row = measure(forward_backward(fn, leaves), device, warmup, reps)
                measured[name] = {**row, "note": note}
            summarise(measured, flops)
            seconds = {"seconds": round(time.perf_counter() - begun, 1),
                       "estimated_seconds": round(estimate, 1)}  # fmt: skip
            row = {**base, "direction": direction, **seconds, "methods": measured}
            print(_line(row), flush=True)
            yield row
        del methods
        gc.collect()


# ----------------------------------------------------------------------------- product keys


def naive_memory(query, keys_a, keys_b, values, k):
    """Score all na * nb slots, then top-k: the computation product keys avoid."""
    import torch

    half = keys_a.shape[1]
    full = (query[:, :half] @ keys_a.T)[:, :, None] + (query[:, half:] @ keys_b.T)[:, None, :]
    top, slots = full.flatten(1).float().topk(k, dim=1)
    return (torch.softmax(top, 1)[..., None].to(values.dtype) * values[slots]).sum(1)


def bench_memory(size, device, warmup, reps) -> list[dict]:
    import torch

    from recray.kernels import product_key_topk, reference

    batch, num_keys, dim, k, value_dim = size
    gen = torch.Generator().manual_seed(0)
    shapes = [(batch, dim), (num_keys, dim // 2), (num_keys, dim // 2), (num_keys**2, value_dim)]
    inputs = [
        (torch.randn(*s, generator=gen) / math.sqrt(s[1])).to(device, torch.bfloat16)
        for s in shapes
    ]
    inputs = [t.requires_grad_() for t in inputs]
    methods = {
        "recray": (lambda: product_key_topk(*inputs, k), "public op (Triton read-out)"),
        "torch_product_keys": (
            lambda: reference.product_key_topk(*inputs, k),
            "the pure-torch reference: same k*k candidates, gathered [B, k, dv] in memory",
        ),
        "naive_full_scores": (lambda: naive_memory(*inputs, k), "all na*nb scores + topk"),
    }
    rows = []
    for direction in ("fwd", "fwd+bwd"):
        measured = {}
        for name, (fn, note) in methods.items():
            if direction == "fwd":
                with torch.no_grad():
                    row = measure(fn, device, warmup, reps)
            else:
                row = measure(forward_backward(fn, inputs), device, warmup, reps)
            measured[name] = {**row, "note": note}
        ours = measured["recray"].get("ms")
        for name, row in measured.items():
            if ours and name != "recray" and "ms" in row:
                row["recray_speedup"] = row["ms"] / ours
        rows.append({
            "batch": batch, "na": num_keys, "nb": num_keys, "dim": dim, "k": k,
            "value_dim": value_dim, "direction": direction, "methods": measured,
        })  # fmt: skip
        print(_line(rows[-1]), flush=True)
    return rows


def _line(row: dict) -> str:
    head = {k: v for k, v in row.items() if k != "methods"}
    cells = []
    for name, m in row["methods"].items():
        if "ms" in m:
            extra = f" {m['tflops']:.1f}TF" if "tflops" in m else ""
            cells.append(f"{name}={m['ms']:.3f}ms{extra}")
        else:
            cells.append(f"{name}=({m['error'][:60]})")
    return f"{head} " + " ".join(cells)


# ----------------------------------------------------------------------------- correctness


def check(kind: str, params: dict, device) -> dict:
    """Triton vs the float32 reference on a small jagged batch: forward and every gradient.

    The CPU test suite runs the kernels only under the interpreter (and compiles them for
    sm_90 without running them); here they meet real hardware: tensor-core precision, the
    compiled block sizes, the atomics.
    """
    import torch

    dtype = getattr(torch, params["dtype"])
    lengths = [5, 0, 17, 200, 1, 64, 129, 0, 33]
    if kind == "flash":
        case = _check_flash(device, dtype, params["dim"], lengths, params["causal"],
                            params["activation"])  # fmt: skip
    elif kind == "target":
        case = _check_target(device, dtype, params["dim"], lengths, params["shared"])
    else:
        case = _check_memory(device, dtype, params["k"], smoke=params["k"] < 32)
    print(("ok     " if case["ok"] else "FAILED ") + json.dumps(_json_safe(case))[:300], flush=True)
    return case


def _compare(name: str, params: dict, run: Callable, inputs: list, dtype) -> dict:
    import torch

    case = {"case": name, **params, "dtype": str(dtype).removeprefix("torch.")}
    try:
        leaves = [t.to(dtype).requires_grad_() for t in inputs]
        out = run(leaves, "triton")
        upstream = torch.randn(out.shape, device=out.device)
        grads = torch.autograd.grad(out, leaves, upstream.to(dtype))
        exact = [t.detach().float().requires_grad_() for t in leaves]
        expected = run(exact, "reference")
        want = torch.autograd.grad(expected, exact, upstream)
        errors = {"out": _relative(out, expected)}
        errors.update(
            {f"grad{i}": _relative(g, w) for i, (g, w) in enumerate(zip(grads, want, strict=True))}
        )
        case["errors"] = errors
        case["ok"] = all(e <= TOLERANCE[case["dtype"]] for e in errors.values())
    except Exception:
        case["error"] = traceback.format_exc(limit=3)[-800:]
        case["ok"] = False
    return case


def _relative(got, want) -> float:
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).norm() / want.norm().clamp_min(1e-3))


def _check_flash(device, dtype, dim, lengths, causal, activation) -> dict:
    import torch

    from recray.kernels import jagged_flash_attention

    gen = torch.Generator().manual_seed(dim)
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=device)
    inputs = [torch.randn(sum(lengths), 2, dim, generator=gen).to(device) for _ in range(3)]
    max_len = max(lengths) + 7

    def run(tensors, backend):
        with _environment("RECRAY_KERNELS", backend):
            return jagged_flash_attention(
                *tensors, offsets, max_len, causal=causal, activation=activation
            )

    params = {"dim": dim, "causal": causal, "activation": activation}
    return _compare("jagged_flash_attention", params, run, inputs, dtype)


def _check_target(device, dtype, dim, lengths, shared) -> dict:
    import torch

    from recray.kernels import jagged_target_attention

    gen = torch.Generator().manual_seed(dim)
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=device)
    query_to_seq = (
        torch.randint(0, len(lengths), (3 * len(lengths),), generator=gen).to(device)
        if shared
        else None
    )
    num_queries = len(lengths) if query_to_seq is None else len(query_to_seq)
    total = sum(lengths)
    inputs = [
        torch.randn(num_queries, 2, dim, generator=gen).to(device),
        torch.randn(total, 2, dim, generator=gen).to(device),
        torch.randn(total, 2, 40, generator=gen).to(device),
    ]

    def run(tensors, backend):
        with _environment("RECRAY_KERNELS", backend):
            return jagged_target_attention(*tensors, offsets, query_to_seq=query_to_seq)

    return _compare("jagged_target_attention", {"dim": dim, "shared": shared}, run, inputs, dtype)


def _check_memory(device, dtype, k, smoke) -> dict:
    import torch

    from recray.kernels import product_key_topk

    gen = torch.Generator().manual_seed(k)
    batch, num_keys, dim, value_dim = (6, 16, 32, 24) if smoke else (64, 128, 128, 200)
    shapes = [(batch, dim), (num_keys, dim // 2), (num_keys, dim // 2), (num_keys**2, value_dim)]
    inputs = [torch.randn(*s, generator=gen).to(device) for s in shapes]

    def run(tensors, backend):
        with _environment("RECRAY_KERNELS", backend):
            return product_key_topk(*tensors, k)

    return _compare("product_key_topk", {"k": k}, run, inputs, dtype)


if __name__ == "__main__":
    main()
