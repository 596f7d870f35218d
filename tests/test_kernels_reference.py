"""The jagged target-attention reference against a padded, masked dense computation, and its checks."""

from __future__ import annotations

import math

import pytest
import torch

from recray.kernels import jagged_target_attention, jagged_to_padded, padded_to_jagged, reference

LENGTH_CASES = {
    "mixed": [3, 0, 1, 7, 2, 0, 5],
    "single_token": [1, 1, 1],
    "all_empty": [0, 0, 0, 0],
    "one_long": [33],
}


def _offsets(lengths: list[int], dtype: torch.dtype = torch.int64) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=dtype)


def _inputs(lengths, heads=2, dim=8, value_dim=4, queries_per_seq=1, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q = torch.randn(len(lengths) * queries_per_seq, heads, dim, generator=gen).to(dtype)
    k = torch.randn(total, heads, dim, generator=gen).to(dtype)
    v = torch.randn(total, heads, value_dim, generator=gen).to(dtype)
    return [t.requires_grad_() for t in (q, k, v)], _offsets(lengths)


def _padded_attention(q, k, v, offsets, query_to_seq=None, scale=None):
    """Independent baseline: pad the histories, mask the padding, dense softmax in float64."""
    q, k, v = q.double(), k.double(), v.double()
    lengths = offsets[1:] - offsets[:-1]
    max_len = max(int(lengths.max()), 1)
    seq = torch.arange(q.shape[0]) if query_to_seq is None else query_to_seq
    keys = jagged_to_padded(k, offsets, max_len)[seq]  # [Bq, L, H, D]
    values = jagged_to_padded(v, offsets, max_len)[seq]
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.einsum("qhd,qlhd->qhl", q, keys) * scale
    valid = torch.arange(max_len)[None, :] < lengths[seq][:, None]  # [Bq, L]
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    probs = torch.softmax(scores, -1).nan_to_num(0.0)  # an empty row is all -inf -> NaN -> 0
    return torch.einsum("qhl,qlhd->qhd", probs, values)


def _grads(out, inputs, upstream):
    return torch.autograd.grad(out, inputs, upstream)


@pytest.mark.parametrize("case", LENGTH_CASES)
def test_reference_matches_padded_attention_values_and_gradients(case):
    (q, k, v), offsets = _inputs(LENGTH_CASES[case])
    out = jagged_target_attention(q, k, v, offsets)
    expected = _padded_attention(q, k, v, offsets)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    upstream = torch.randn_like(out)
    got = _grads(out, (q, k, v), upstream)
    want = _grads(expected, (q, k, v), upstream.double())
    for name, g, w in zip("qkv", got, want, strict=True):
        torch.testing.assert_close(g.double(), w.double(), rtol=1e-4, atol=1e-5, msg=name)


def test_random_jagged_shapes_match_padded_attention():
    gen = torch.Generator().manual_seed(1)
    for seed in range(10):
        lengths = torch.randint(
            0, 12, (int(torch.randint(1, 9, (1,), generator=gen)),), generator=gen
        )
        (q, k, v), offsets = _inputs(lengths.tolist(), heads=3, dim=5, value_dim=6, seed=seed)
        out = jagged_target_attention(q, k, v, offsets.int(), scale=0.3)
        torch.testing.assert_close(
            out.double(), _padded_attention(q, k, v, offsets, scale=0.3), rtol=1e-5, atol=1e-5
        )


def test_bf16_matches_within_loose_tolerance():
    (q, k, v), offsets = _inputs(LENGTH_CASES["mixed"], dtype=torch.bfloat16)
    out = jagged_target_attention(q, k, v, offsets)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(
        out.double(), _padded_attention(q, k, v, offsets), rtol=2e-2, atol=2e-2
    )
    upstream = torch.randn(out.shape)
    got = _grads(out, (q, k, v), upstream.bfloat16())
    want = _grads(_padded_attention(q, k, v, offsets), (q, k, v), upstream.double())
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), w.double(), rtol=5e-2, atol=5e-2)


def test_several_candidates_share_one_history():
    lengths = [4, 0, 2]
    (q, k, v), offsets = _inputs(lengths, queries_per_seq=3)
    query_to_seq = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    q = q[: len(query_to_seq)]
    out = jagged_target_attention(q, k, v, offsets, query_to_seq=query_to_seq)
    assert out.shape == (9, 2, 4)
    torch.testing.assert_close(
        out.double(), _padded_attention(q, k, v, offsets, query_to_seq), rtol=1e-5, atol=1e-5
    )
    assert torch.equal(out[3:5], torch.zeros(2, 2, 4))
    # a candidate's score does not depend on which other candidates share its history
    alone = jagged_target_attention(q[:1], k, v, offsets, query_to_seq=torch.tensor([0]))
    torch.testing.assert_close(alone, out[:1])


def test_empty_sequence_gets_zero_output():
    (q, k, v), offsets = _inputs([0, 3, 0])
    out = jagged_target_attention(q, k, v, offsets)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.equal(out[2], torch.zeros_like(out[2]))
    assert out[1].abs().sum() > 0


def test_large_scores_stay_finite():
    (q, k, v), offsets = _inputs([5, 2])
    out = jagged_target_attention(q * 1e4, k * 1e4, v, offsets)
    assert torch.isfinite(out).all()


def test_dispatcher_runs_the_reference(monkeypatch):
    monkeypatch.setenv("RECRAY_KERNELS", "reference")
    (q, k, v), offsets = _inputs([2, 3])
    torch.testing.assert_close(
        jagged_target_attention(q, k, v, offsets),
        reference.jagged_target_attention(q, k, v, offsets),
    )


@pytest.mark.parametrize("lengths", [[3, 0, 1, 4], [0, 0], [2]])
def test_jagged_padded_round_trip(lengths):
    offsets = _offsets(lengths, torch.int32)
    values = torch.randn(sum(lengths), 2, 3)
    padded = jagged_to_padded(values, offsets, max_len=5, padding_value=-1.0)
    assert padded.shape == (len(lengths), 5, 2, 3)
    for b, n in enumerate(lengths):
        torch.testing.assert_close(padded[b, :n], values[offsets[b] : offsets[b + 1]])
        assert (padded[b, n:] == -1.0).all()
    torch.testing.assert_close(padded_to_jagged(padded, offsets), values)


def test_jagged_to_padded_truncates_and_padded_to_jagged_refuses_short_padding():
    offsets = _offsets([4, 1])
    values = torch.arange(5.0)
    assert jagged_to_padded(values, offsets, max_len=2).tolist() == [[0.0, 1.0], [4.0, 0.0]]
    with pytest.raises(ValueError, match="offsets: a sequence has length 4"):
        padded_to_jagged(torch.zeros(2, 2), offsets)


def _valid():
    (q, k, v), offsets = _inputs([2, 1, 0])
    return {"q": q.detach(), "k": k.detach(), "v": v.detach(), "offsets": offsets}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a: a.update(q=a["q"][:, 0]), r"q: expected shape \[Bq, H, D\], got \(3, 8\)"),
        (lambda a: a.update(k=a["k"][None]), r"k: expected shape \[T, H, D\]"),
        (lambda a: a.update(v=a["v"][..., 0]), r"v: expected shape \[T, H, Dv\]"),
        (lambda a: a.update(k=a["k"][:, :1]), "k, v: expected 2 heads like q, got 1 and 2"),
        (lambda a: a.update(v=a["v"][:, :1]), "k, v: expected 2 heads like q, got 2 and 1"),
        (lambda a: a.update(k=a["k"][..., :4]), "k: expected head dim 8 like q, got 4"),
        (lambda a: a.update(v=a["v"][:2]), "v: expected 3 tokens like k, got 2"),
        (lambda a: a.update(k=a["k"].double()), "q, k, v: expected one floating dtype"),
        (
            lambda a: a.update(q=a["q"].long(), k=a["k"].long(), v=a["v"].long()),
            "q, k, v: expected one floating dtype",
        ),
        (
            lambda a: a.update(offsets=a["offsets"].float()),
            "offsets: expected int32 or int64, got torch.float32",
        ),
        (
            lambda a: a.update(offsets=a["offsets"][None]),
            r"offsets: expected shape \[B\+1\], got \(1, 4\)",
        ),
        (lambda a: a.update(offsets=torch.tensor([1, 2, 3, 3])), r"offsets\[0\] == 0, got 1"),
        (
            lambda a: a.update(offsets=torch.tensor([0, 2, 1, 3])),
            r"non-decreasing values, got offsets\[1\] = 2 > offsets\[2\] = 1",
        ),
        (
            lambda a: a.update(offsets=torch.tensor([0, 2, 3, 4])),
            r"offsets\[-1\] == 3 \(tokens in k\), got 4",
        ),
        (lambda a: a.update(offsets=torch.tensor([0, 2, 3])), "q: expected 2 queries .*, got 3"),
        (
            lambda a: a.update(query_to_seq=torch.tensor([0, 1])),
            "query_to_seq: expected 3 entries .*, got 2",
        ),
        (
            lambda a: a.update(query_to_seq=torch.tensor([0, 1, 3])),
            r"query_to_seq: expected indices in \[0, 3\), got values in \[0, 3\]",
        ),
        (
            lambda a: a.update(query_to_seq=torch.tensor([-1, 1, 2])),
            r"query_to_seq: expected indices in \[0, 3\)",
        ),
        (
            lambda a: a.update(query_to_seq=torch.tensor([0.0, 1.0, 2.0])),
            "query_to_seq: expected a 1-D int64",
        ),
        (
            lambda a: a.update(query_to_seq=torch.zeros(3, 1, dtype=torch.long)),
            "query_to_seq: expected a 1-D int64",
        ),
    ],
)
def test_bad_inputs_are_named(change, message):
    args = _valid()
    change(args)
    q, k, v, offsets = args.pop("q"), args.pop("k"), args.pop("v"), args.pop("offsets")
    with pytest.raises(ValueError, match=message):
        jagged_target_attention(q, k, v, offsets, **args)
