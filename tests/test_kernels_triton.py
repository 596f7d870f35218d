"""Every Triton kernel, run by the interpreter on CPU, against the pure-torch reference.

conftest.py sets TRITON_INTERPRET=1 before triton is imported; `RECRAY_KERNELS=triton` makes
the public ops take the Triton path with CPU tensors. Shapes stay small: the interpreter runs
each program in Python.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from recray.kernels import (
    jagged_flash_attention,
    jagged_target_attention,
    product_key_topk,
    reference,
)

pytest.importorskip("triton")
pytest.importorskip("numpy")  # the interpreter needs it; triton does not declare it

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# relative Frobenius error allowed against the float32 reference on the same rounded inputs
TOLERANCE = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
LENGTH_CASES = {
    "mixed": [5, 0, 17, 33, 1],
    "single_tokens": [1, 1],
    "one_empty": [0],
    "all_empty": [0, 0, 0],
    "longer_than_a_block": [40, 2],
}


@pytest.fixture(autouse=True)
def triton_backend(monkeypatch):
    monkeypatch.setenv("RECRAY_KERNELS", "triton")


def _offsets(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths, dtype=torch.long).cumsum(0).tolist()])


def _randn(*shape: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(dtype).requires_grad_()


def _assert_matches(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    assert got.shape == want.shape, what
    assert torch.isfinite(got.float()).all(), what
    error = (got.double() - want.double()).norm()
    scale = want.double().norm().clamp_min(1e-6)
    assert error <= TOLERANCE[dtype] * scale + 1e-5, f"{what}: relative error {error / scale:.2e}"


def _check_against_reference(run, inputs, dtype, gen):
    """`run(*inputs)` on the Triton path vs the reference on float32 copies: output and grads."""
    out = run(*inputs)
    assert out.dtype == dtype
    upstream = torch.randn(out.shape, generator=gen)
    got = torch.autograd.grad(out, inputs, upstream.to(dtype), allow_unused=False)

    exact = [t.detach().float().requires_grad_() for t in inputs]
    os.environ["RECRAY_KERNELS"] = "reference"  # the fixture's monkeypatch restores it
    expected = run(*exact)
    os.environ["RECRAY_KERNELS"] = "triton"
    want = torch.autograd.grad(expected, exact, upstream)
    _assert_matches(out, expected, dtype, "output")
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.dtype == dtype
        _assert_matches(g, w, dtype, f"grad of input {i}")
    return out


@pytest.mark.parametrize("activation", ["softmax", "silu"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
# every dtype at a padded head dim (24 in a 32-wide block); the exact 16-wide block in fp32 (its
# bf16/fp16 compiles are in test_kernels_compile.py; the arithmetic is the padded one's)
@pytest.mark.parametrize(
    ("dim", "dtype"), [(16, torch.float32), *[(24, dtype) for dtype in DTYPES]], ids=str
)
def test_flash_attention_matches_reference(dim, dtype, causal, activation):
    gen = torch.Generator().manual_seed(dim)
    lengths = LENGTH_CASES["mixed"]
    total, heads = sum(lengths), 2
    q, k, v = (_randn(total, heads, dim, dtype=dtype, gen=gen) for _ in range(3))
    offsets = _offsets(lengths)

    def run(q, k, v):
        return jagged_flash_attention(q, k, v, offsets, 40, causal=causal, activation=activation)

    _check_against_reference(run, (q, k, v), dtype, gen)


@pytest.mark.parametrize("case", LENGTH_CASES)
@pytest.mark.parametrize(
    ("causal", "activation"), [(False, "softmax"), (True, "softmax"), (True, "silu")]
)
def test_flash_attention_edge_lengths(case, causal, activation):
    gen = torch.Generator().manual_seed(1)
    lengths = LENGTH_CASES[case]
    total = sum(lengths)
    q, k = (_randn(total, 1, 16, dtype=torch.float32, gen=gen) for _ in range(2))
    v = _randn(total, 1, 8, dtype=torch.float32, gen=gen)  # value dim differs from head dim
    offsets = _offsets(lengths).int()
    max_len = max(lengths)

    def run(q, k, v):
        return jagged_flash_attention(
            q, k, v, offsets, max_len, causal=causal, activation=activation, scale=0.3
        )

    out = _check_against_reference(run, (q, k, v), torch.float32, gen)
    assert out.shape == (total, 1, 8)


def test_flash_attention_single_token_sees_only_itself():
    gen = torch.Generator().manual_seed(2)
    q, k, v = (_randn(3, 2, 16, dtype=torch.float32, gen=gen) for _ in range(3))
    out = jagged_flash_attention(q, k, v, _offsets([1, 1, 1]), 1)
    torch.testing.assert_close(out, v.detach())


def test_flash_attention_random_jagged_batches():
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        lengths = torch.randint(0, 24, (int(torch.randint(1, 5, (1,), generator=gen)),),
                                generator=gen).tolist()  # fmt: skip
        dim = int(torch.randint(1, 40, (1,), generator=gen))  # any head dim, padded to a block
        q, k, v = (_randn(sum(lengths), 2, dim, dtype=torch.float32, gen=gen) for _ in range(3))
        offsets, max_len = _offsets(lengths), max(lengths) + 3  # a loose bound is fine

        def run(q, k, v, offsets=offsets, max_len=max_len):
            return jagged_flash_attention(q, k, v, offsets, max_len, causal=True)

        _check_against_reference(run, (q, k, v), torch.float32, gen)


@pytest.mark.parametrize("activation", ["softmax", "silu"])
def test_grid_follows_the_longest_sequence_not_max_seq_len(monkeypatch, activation):
    from recray.kernels.triton import flash_attention as triton_flash_attention

    programs = []
    make_grid = triton_flash_attention._grid

    def recording_grid(*args):
        grid = make_grid(*args)

        def sized(meta):
            dims = grid(meta)
            programs.append(math.prod(dims))
            return dims

        return sized

    monkeypatch.setattr(triton_flash_attention, "_grid", recording_grid)
    gen = torch.Generator().manual_seed(8)
    lengths, heads = [2] * 20 + [5], 2  # 45 tokens, none longer than 5
    q, k, v = (_randn(sum(lengths), heads, 16, dtype=torch.float32, gen=gen) for _ in range(3))
    offsets = _offsets(lengths)

    def run(q, k, v):
        # max_seq_len 1000 stays SiLU's normaliser (1/1000) while the grid follows 5 tokens
        return jagged_flash_attention(q, k, v, offsets, 1000, causal=True, activation=activation)

    _check_against_reference(run, (q, k, v), torch.float32, gen)
    one_block_each = len(lengths) * heads  # interpreter blocks are 16 wide: ceil(5 / 16) = 1
    assert programs and set(programs) == {one_block_each}


def test_grid_stays_inside_cuda_limits_for_a_million_candidates_on_one_history():
    from recray.kernels.triton import flash_attention as triton_flash_attention

    # CUDA allows 2^31 - 1 blocks on grid axis 0 and 65,535 on axes 1 and 2
    for pairs, length, block in [(1, 2_000_000, 16), (400_000, 4096, 16), (8, 40, 64)]:
        dims = triton_flash_attention._grid(pairs, "BLOCK_M", length)({"BLOCK_M": block})
        assert dims[0] <= 2**31 - 1 and all(d <= 65_535 for d in dims[1:]), dims
        assert math.prod(dims) == pairs * -(-length // block)  # every block gets a program
    with pytest.raises(ValueError, match="split the batch"):
        triton_flash_attention._check_grid(2**20, 2**20)


def test_flash_attention_empty_batch():
    q, k, v = (torch.zeros(0, 2, 16, requires_grad=True) for _ in range(3))
    out = jagged_flash_attention(q, k, v, torch.zeros(1, dtype=torch.long), 0)
    assert out.shape == (0, 2, 16)
    out.sum().backward()
    assert q.grad.shape == (0, 2, 16)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shared", [False, True], ids=["one_per_history", "shared_histories"])
def test_target_attention_matches_reference(dtype, shared):
    gen = torch.Generator().manual_seed(4)
    lengths = [5, 0, 17, 33, 1]
    query_to_seq = torch.tensor([3, 1, 0, 0, 2, 3, 3, 4, 1, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3]) \
        if shared else None  # fmt: skip
    num_queries = len(lengths) if query_to_seq is None else len(query_to_seq)
    q = _randn(num_queries, 2, 24, dtype=dtype, gen=gen)
    k = _randn(sum(lengths), 2, 24, dtype=dtype, gen=gen)
    v = _randn(sum(lengths), 2, 8, dtype=dtype, gen=gen)
    offsets = _offsets(lengths)

    def run(q, k, v):
        return jagged_target_attention(q, k, v, offsets, query_to_seq=query_to_seq)

    out = _check_against_reference(run, (q, k, v), dtype, gen)
    empty = 1 if query_to_seq is None else query_to_seq == 1
    assert torch.equal(out[empty].float(), torch.zeros_like(out[empty].float()))


@pytest.mark.parametrize("case", ["single_tokens", "all_empty", "longer_than_a_block"])
def test_target_attention_edge_lengths(case):
    gen = torch.Generator().manual_seed(5)
    lengths = LENGTH_CASES[case]
    q = _randn(len(lengths), 1, 16, dtype=torch.float32, gen=gen)
    k = _randn(sum(lengths), 1, 16, dtype=torch.float32, gen=gen)
    v = _randn(sum(lengths), 1, 16, dtype=torch.float32, gen=gen)
    offsets = _offsets(lengths)
    _check_against_reference(
        lambda q, k, v: jagged_target_attention(q, k, v, offsets), (q, k, v), torch.float32, gen
    )


def test_target_attention_takes_expanded_values_like_din():
    gen = torch.Generator().manual_seed(6)
    history = _randn(9, 12, dtype=torch.float32, gen=gen)
    q = _randn(2, 2, 16, dtype=torch.float32, gen=gen)
    k = _randn(9, 2, 16, dtype=torch.float32, gen=gen)
    offsets = _offsets([4, 5])

    def run(q, k, history):
        # DIN passes the history embeddings once per head as a stride-0 view
        return jagged_target_attention(q, k, history.unsqueeze(1).expand(-1, 2, -1), offsets)

    _check_against_reference(run, (q, k, history), torch.float32, gen)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", [1, 5, 8])
def test_product_key_topk_matches_reference(dtype, k):
    gen = torch.Generator().manual_seed(k)
    query = _randn(4, 32, dtype=dtype, gen=gen)
    keys_a = _randn(12, 16, dtype=dtype, gen=gen)
    keys_b = _randn(10, 16, dtype=dtype, gen=gen)
    values = _randn(120, 40, dtype=dtype, gen=gen)
    _check_against_reference(
        lambda *inputs: product_key_topk(*inputs, k), (query, keys_a, keys_b, values), dtype, gen
    )


def test_product_key_topk_shared_slots_accumulate_value_gradients():
    # Identical queries pick the same slots, so the atomics in the backward must add up.
    gen = torch.Generator().manual_seed(7)
    query = torch.randn(1, 16, generator=gen).expand(6, -1).clone().requires_grad_()
    keys_a, keys_b = (_randn(6, 8, dtype=torch.float32, gen=gen) for _ in range(2))
    values = _randn(36, 20, dtype=torch.float32, gen=gen)
    _check_against_reference(
        lambda *inputs: product_key_topk(*inputs, 4),
        (query, keys_a, keys_b, values),
        torch.float32,
        gen,
    )


def test_cpu_default_runs_the_reference(monkeypatch):
    from recray.kernels.triton import flash_attention as triton_flash_attention

    def refuse(*args, **kwargs):
        raise AssertionError("the Triton kernel ran for CPU tensors")

    monkeypatch.setattr(triton_flash_attention, "jagged_flash_attention", refuse)
    monkeypatch.delenv("RECRAY_KERNELS")
    q = torch.randn(3, 1, 16)
    out = jagged_flash_attention(q, q, q, _offsets([3]), 3)
    torch.testing.assert_close(out, reference.jagged_flash_attention(q, q, q, _offsets([3]), 3))


def test_unknown_backend_and_cpu_triton_without_interpreter_are_refused(monkeypatch):
    q = torch.randn(3, 1, 16)
    monkeypatch.setenv("RECRAY_KERNELS", "cuda")
    with pytest.raises(ValueError, match="RECRAY_KERNELS: expected one of"):
        jagged_flash_attention(q, q, q, _offsets([3]), 3)
    monkeypatch.setenv("RECRAY_KERNELS", "triton")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="needs TRITON_INTERPRET=1"):
        jagged_flash_attention(q, q, q, _offsets([3]), 3)


def test_kernels_import_without_triton_ray_or_torchrec():
    script = (
        "import sys; sys.modules['triton'] = None\n"  # `import triton` now fails
        "import torch, recray.kernels as K\n"
        "q = torch.randn(3, 1, 16)\n"
        "K.jagged_flash_attention(q, q, q, torch.tensor([0, 3]), 3)\n"
        "bad = [m for m in ('ray', 'torchrec', 'recray.data') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    env = {**os.environ, "RECRAY_KERNELS": "auto"}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=120)


def test_any_truthy_triton_interpret_runs_the_interpreter_on_cpu():
    # triton reads TRITON_INTERPRET as true for 1, true, yes, on, y; recray must agree, or it
    # refuses CPU tensors and multiplies bf16 tiles as integers (see common._DOT_IN_FP32)
    script = (
        "import torch\n"
        "from recray.kernels import jagged_flash_attention, reference\n"
        "g = torch.Generator().manual_seed(0)\n"
        "q, k, v = (torch.randn(7, 2, 16, generator=g).bfloat16() for _ in range(3))\n"
        "offsets = torch.tensor([0, 3, 7])\n"
        "got = jagged_flash_attention(q, k, v, offsets, 4).float()\n"
        "want = reference.jagged_flash_attention(q.float(), k.float(), v.float(), offsets, 4)\n"
        "assert ((got - want).norm() / want.norm()) < 3e-2, (got - want).norm() / want.norm()\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "true", "RECRAY_KERNELS": "triton"}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=300)


# ----------------------------------------------------------------------------- the benchmark

ROOT = Path(__file__).resolve().parents[1]
BENCHMARK = ROOT / "benchmarks" / "kernels.py"


def _strict_json(text: str):
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_benchmark_dry_run_fits_an_eight_minute_lease_importing_only_recray_kernels():
    # As on the GPU machine: from the checkout with PYTHONPATH=., the GPU plan (no interpreter)
    script = (
        "import runpy, sys\n"
        f"sys.argv = [{str(BENCHMARK)!r}, '--dry-run']\n"
        f"runpy.run_path({str(BENCHMARK)!r}, run_name='__main__')\n"
        "print('modules', sorted(m for m in sys.modules if m.split('.')[0] in "
        "('recray', 'ray', 'torchrec')))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = "."
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=300, check=True,
    )  # fmt: skip
    seconds = float(re.search(r"estimated run time (\d+) s", done.stdout).group(1))
    assert 60 < seconds <= 8 * 60 - 20  # 20 s for python, torch and CUDA to start
    modules = eval(done.stdout.split("modules", 1)[1])
    assert modules and all(m == "recray" or m.startswith("recray.kernels") for m in modules)


def test_benchmark_budget_stops_cleanly_with_strict_json(tmp_path):
    out = tmp_path / "kernels.json"
    subprocess.run(
        [sys.executable, str(BENCHMARK), "--device", "cpu", "--smoke", "--budget-s", "0",
         "--out", str(out)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": "."}, check=True, timeout=300,
        capture_output=True,
    )  # fmt: skip
    result = _strict_json(out.read_text())
    assert result["status"].startswith("stopped by --budget-s 0")
    assert result["correctness"] == [] and result["attention"] == []


def test_benchmark_writes_nan_and_infinity_as_null(tmp_path):
    spec = importlib.util.spec_from_file_location("kernels_benchmark", BENCHMARK)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    out = tmp_path / "kernels.json"
    result = {"rows": [{"ms": float("nan"), "tflops": float("inf")}], "speedup": 1.5}
    benchmark.Writer(out, result, time.perf_counter()).write()
    written = _strict_json(out.read_text())
    assert written["rows"] == [{"ms": None, "tflops": None}] and written["speedup"] == 1.5
