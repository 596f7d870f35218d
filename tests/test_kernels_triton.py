"""Every Triton kernel, run by the interpreter on CPU, against the pure-torch reference.

conftest.py sets TRITON_INTERPRET=1 before triton is imported; `RECRAY_KERNELS=triton` makes
the public ops take the Triton path with CPU tensors. Shapes stay small: the interpreter runs
each program in Python.
"""

from __future__ import annotations

import os
import subprocess
import sys

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
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dim", [16, 24])
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
