"""Jagged Triton kernels vs torch baselines: GPU correctness, ms, peak memory, useful TFLOP/s.

    python benchmarks/kernels.py --out benchmarks/results/kernels.json     # on a CUDA machine
    python benchmarks/kernels.py --device cpu --smoke                      # plumbing check, no GPU

Needs only torch and triton (not Ray or TorchRec), and runs from a checkout where recray is not
installed. Every number counts real tokens only: useful FLOPs are 4 * sum(len^2) * H * D for a
softmax forward (halved when causal); forward + backward is 3.5x the forward (the backward is
2.5x, FlashAttention's convention), so TFLOP/s ratios equal time ratios. Padded baselines get
pre-padded inputs (the padding copy is not timed) and pad to the batch's longest sequence.
A baseline that fails or runs out of memory is recorded as such; the run goes on.
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
    (2048, 256, 256, 32, 256),
    (2048, 1024, 128, 32, 256),
    (2048, 1024, 256, 32, 256),
]
SMOKE_MEMORY_SIZES = [(4, 16, 32, 4, 24)]
MODES = {"softmax": [False, True], "silu": [False, True]}  # activation -> causal settings
TOLERANCE = {"float32": 2e-5, "float16": 5e-3, "bfloat16": 3e-2}  # relative Frobenius error


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/kernels.json")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, 1 rep (CPU check)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--skip-correctness", action="store_true")
    args = parser.parse_args()
    if args.device == "cpu":
        # Triton on CPU tensors = the interpreter, which must be on before triton is imported.
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ["RECRAY_KERNELS"] = "triton"
    if args.smoke:
        args.warmup, args.reps = 1, 1

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device; use --device cpu --smoke for a plumbing check")
    import triton

    device = torch.device(args.device)
    result: dict = {
        "benchmark": "kernels",
        "device": torch.cuda.get_device_name()
        if device.type == "cuda"
        else (platform.processor() or platform.machine()),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
        "smoke": args.smoke,
        "timing": f"median of {args.reps} after {args.warmup} warmup calls"
        + (", CUDA events" if device.type == "cuda" else ", wall clock"),
        "flops": "fwd softmax/silu 4*sum(len^2)*H*D, /2 causal; fwd+bwd 3.5x fwd",
        "dtype": "bfloat16",
        "memory": "peak_mb: torch.cuda.max_memory_allocated over the timed calls (every resident "
        "tensor included, e.g. all methods' inputs); extra_mb: peak minus what was allocated "
        "before them, i.e. the op's own memory",
        "recray_speedup": "baseline ms / recray ms (> 1: recray is faster)",
    }
    started = time.perf_counter()
    if not args.skip_correctness:
        result["correctness"] = correctness(device, args.smoke)
        failed = [c for c in result["correctness"] if not c.get("ok")]
        print(f"correctness: {len(result['correctness']) - len(failed)} ok, {len(failed)} failed")
        for case in failed:
            print("  FAILED", json.dumps(case))
    shapes = SMOKE_ATTENTION_SHAPES if args.smoke else ATTENTION_SHAPES
    sizes = SMOKE_MEMORY_SIZES if args.smoke else MEMORY_SIZES
    result["attention"] = [
        row for shape in shapes for row in bench_attention(shape, device, args.warmup, args.reps)
    ]
    result["product_key"] = [
        row for size in sizes for row in bench_memory(size, device, args.warmup, args.reps)
    ]
    result["seconds"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out} in {result['seconds']} s")


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


def bench_attention(shape, device, warmup, reps) -> list[dict]:
    import torch

    batch, heads, max_len, dim, density = shape
    q, k, v, offsets, lengths = jagged_batch(*shape, device, torch.bfloat16)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    sum_squares = int((lengths.long() ** 2).sum())
    rows = []
    for activation, causals in MODES.items():
        for causal in causals:
            base = {
                "batch": batch, "heads": heads, "max_len": max_len, "head_dim": dim,
                "density": density, "tokens": int(lengths.sum()),
                "longest": int(lengths.max()), "activation": activation, "causal": causal,
            }  # fmt: skip
            forward_flops = 4 * sum_squares * heads * dim / (2 if causal else 1)
            methods = attention_methods(q, k, v, offsets, lengths, max_len, causal, activation)
            for direction, flops in (("fwd", forward_flops), ("fwd+bwd", 3.5 * forward_flops)):
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
                rows.append({**base, "direction": direction, "methods": measured})
                print(_line(rows[-1]), flush=True)
            del methods
            gc.collect()
    return rows


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


def correctness(device, smoke: bool) -> list[dict]:
    """Triton vs the float32 reference on small shapes: forward and every gradient.

    The CPU test suite can only run the kernels under the interpreter; this is where they meet
    real hardware (tensor-core precision, autotuned block sizes, the atomics).
    """
    import torch

    dtypes = [torch.float32] if smoke else [torch.float32, torch.bfloat16, torch.float16]
    dims = [24] if smoke else [16, 24, 64, 128]
    lengths = [5, 0, 17, 1, 70] if smoke else [5, 0, 17, 200, 1, 64, 129, 0, 33]
    cases = []
    for dtype in dtypes:
        for dim in dims:
            for activation, causals in MODES.items():
                for causal in causals:
                    cases.append(_check_flash(device, dtype, dim, lengths, causal, activation))
            for shared in (False, True):
                cases.append(_check_target(device, dtype, dim, lengths, shared))
        for k in [1, 4] if smoke else [1, 5, 32]:
            cases.append(_check_memory(device, dtype, k, smoke))
    return cases


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


@contextlib.contextmanager
def _backend(name: str):
    previous = os.environ.get("RECRAY_KERNELS")
    os.environ["RECRAY_KERNELS"] = name
    try:
        yield
    finally:
        if previous is None:
            del os.environ["RECRAY_KERNELS"]
        else:
            os.environ["RECRAY_KERNELS"] = previous


def _check_flash(device, dtype, dim, lengths, causal, activation) -> dict:
    import torch

    from recray.kernels import jagged_flash_attention

    gen = torch.Generator().manual_seed(dim)
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=device)
    inputs = [torch.randn(sum(lengths), 2, dim, generator=gen).to(device) for _ in range(3)]
    max_len = max(lengths) + 7

    def run(tensors, backend):
        with _backend(backend):
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
        with _backend(backend):
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
        with _backend(backend):
            return product_key_topk(*tensors, k)

    return _compare("product_key_topk", {"k": k}, run, inputs, dtype)


if __name__ == "__main__":
    main()
