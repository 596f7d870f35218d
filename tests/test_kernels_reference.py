"""The pure-torch references against padded dense (or naive) computations, and the input checks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from recray.kernels import (
    jagged_flash_attention,
    jagged_target_attention,
    jagged_to_padded,
    padded_to_jagged,
    product_key_topk,
    reference,
)

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


def _padded_self_attention(q, k, v, offsets, max_seq_len, causal, activation, scale=None):
    """Independent baseline: pad, mask (length and causal), dense attention in float64."""
    q, k, v = q.double(), k.double(), v.double()
    lengths = offsets[1:] - offsets[:-1]
    width = max(int(lengths.max()) if lengths.numel() else 0, 1)
    qp, kp, vp = (jagged_to_padded(t, offsets, width) for t in (q, k, v))  # [B, L, H, *]
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.einsum("bmhd,bnhd->bhmn", qp, kp) * scale
    valid = torch.arange(width)[None, :] < lengths[:, None]  # [B, L]
    allowed = valid[:, None, None, :] & valid[:, None, :, None]
    if causal:
        allowed = allowed & torch.ones(width, width, dtype=torch.bool).tril()
    if activation == "silu":
        weights = F.silu(scores) / max_seq_len * allowed
    else:
        weights = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
    return padded_to_jagged(torch.einsum("bhmn,bnhd->bmhd", weights, vp), offsets)


@pytest.mark.parametrize("activation", ["softmax", "silu"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("case", LENGTH_CASES)
def test_flash_reference_matches_padded_attention_values_and_gradients(case, causal, activation):
    lengths = LENGTH_CASES[case]
    gen = torch.Generator().manual_seed(len(lengths))
    total = sum(lengths)
    q, k = (torch.randn(total, 2, 8, generator=gen).requires_grad_() for _ in range(2))
    v = torch.randn(total, 2, 5, generator=gen).requires_grad_()
    offsets = _offsets(lengths)
    max_seq_len = max(lengths) + 4  # larger than needed: the SiLU normaliser must use it
    out = jagged_flash_attention(q, k, v, offsets, max_seq_len, causal=causal,
                                 activation=activation)  # fmt: skip
    expected = _padded_self_attention(q, k, v, offsets, max_seq_len, causal, activation)
    assert out.shape == (total, 2, 5)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    if not total:
        return
    upstream = torch.randn(out.shape, generator=gen)
    got = _grads(out, (q, k, v), upstream)
    want = _grads(expected, (q, k, v), upstream.double())
    for name, g, w in zip("qkv", got, want, strict=True):
        torch.testing.assert_close(g.double(), w.double(), rtol=1e-4, atol=1e-5, msg=name)


def test_flash_reference_causal_first_token_copies_its_value():
    q, k, v = (torch.randn(5, 1, 4) for _ in range(3))
    out = jagged_flash_attention(q, k, v, _offsets([2, 3]), 3, causal=True)
    torch.testing.assert_close(out[[0, 2]], v[[0, 2]])


def test_flash_reference_bf16_stays_bf16_and_close():
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(12, 2, 8, generator=gen).bfloat16() for _ in range(3))
    offsets = _offsets([7, 0, 5])
    out = jagged_flash_attention(q, k, v, offsets, 7, causal=True)
    assert out.dtype == torch.bfloat16
    expected = _padded_self_attention(q, k, v, offsets, 7, True, "softmax")
    torch.testing.assert_close(out.double(), expected, rtol=2e-2, atol=2e-2)


def _memory(batch=5, dim=16, num_a=9, num_b=7, value_dim=6, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(batch, dim), (num_a, dim // 2), (num_b, dim // 2), (num_a * num_b, value_dim)]
    return [torch.randn(*s, generator=gen).to(dtype).requires_grad_() for s in shapes]


def _naive_product_key(query, keys_a, keys_b, values, k):
    """Independent baseline: score all na * nb slots, then top-k, in float64."""
    query, keys_a, keys_b, values = (t.double() for t in (query, keys_a, keys_b, values))
    half = keys_a.shape[1]
    scores = (query[:, :half] @ keys_a.T)[:, :, None] + (query[:, half:] @ keys_b.T)[:, None, :]
    top, slots = scores.flatten(1).topk(k, dim=1)
    return (torch.softmax(top, 1)[..., None] * values[slots]).sum(1)


@pytest.mark.parametrize("k", [1, 3, 7])
def test_product_key_reference_matches_full_scoring(k):
    inputs = _memory(seed=k)
    out = product_key_topk(*inputs, k)
    expected = _naive_product_key(*inputs, k)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(k))
    got = _grads(out, inputs, upstream)
    want = _grads(expected, inputs, upstream.double())
    for name, g, w in zip(["query", "keys_a", "keys_b", "values"], got, want, strict=True):
        torch.testing.assert_close(g.double(), w.double(), rtol=1e-4, atol=1e-5, msg=name)


def test_product_key_gradients_reach_only_selected_keys_and_gathered_rows():
    query, keys_a, keys_b, values = _memory(batch=1, num_a=20, num_b=20)
    product_key_topk(query, keys_a, keys_b, values, 2).sum().backward()
    assert int((values.grad.abs().sum(1) > 0).sum()) == 2
    assert int((keys_a.grad.abs().sum(1) > 0).sum()) <= 2
    assert int((keys_b.grad.abs().sum(1) > 0).sum()) <= 2
    assert query.grad.abs().sum() > 0


def test_product_key_output_follows_values_dtype():
    out = product_key_topk(*_memory(dtype=torch.bfloat16), 3)
    assert out.dtype == torch.bfloat16 and out.shape == (5, 6)


def _valid_flash():
    (q, k, v), offsets = _inputs([2, 1, 0])
    q = torch.randn(3, 2, 8)
    return {"q": q, "k": k.detach(), "v": v.detach(), "offsets": offsets, "max_seq_len": 2}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a: a.update(q=a["q"][:, 0]), r"q: expected shape \[T, H, D\], got \(3, 8\)"),
        (lambda a: a.update(v=a["v"][None]), r"v: expected shape \[T, H, Dv\]"),
        (lambda a: a.update(k=a["k"][:2]), r"k, v: expected \(3, 2\) \(tokens, heads\) like q"),
        (lambda a: a.update(v=a["v"][:, :1]), r"k, v: expected \(3, 2\)"),
        (lambda a: a.update(k=a["k"][..., :4]), "k: expected head dim 8 like q, got 4"),
        (lambda a: a.update(q=a["q"].half()), "q, k, v: expected one floating dtype"),
        (lambda a: a.update(offsets=a["offsets"].float()), "offsets: expected int32 or int64"),
        (
            lambda a: a.update(offsets=torch.tensor([0, 2, 1, 3])),
            "offsets: expected non-decreasing",
        ),
        (
            lambda a: a.update(offsets=torch.tensor([0, 2, 3, 5])),
            r"offsets: expected offsets\[-1\] == 3 \(tokens in q, k, v\), got 5",
        ),
        (
            lambda a: a.update(max_seq_len=1),
            "max_seq_len: expected at least the longest sequence length 2, got 1",
        ),
        (lambda a: a.update(max_seq_len=2.0), "max_seq_len: expected a non-negative int"),
        (lambda a: a.update(max_seq_len=-1), "max_seq_len: expected a non-negative int"),
        (lambda a: a.update(activation="relu"), "activation: expected one of"),
        (lambda a: a.update(causal=1), "causal: expected a bool"),
    ],
)
def test_flash_bad_inputs_are_named(change, message):
    args = _valid_flash()
    change(args)
    positional = [args.pop(name) for name in ("q", "k", "v", "offsets", "max_seq_len")]
    with pytest.raises(ValueError, match=message):
        jagged_flash_attention(*positional, **args)


def _valid_memory():
    query, keys_a, keys_b, values = (t.detach() for t in _memory())
    return {"query": query, "keys_a": keys_a, "keys_b": keys_b, "values": values, "k": 3}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a: a.update(query=a["query"][0]), r"query: expected shape \[B, dim\], got \(16,\)"),
        (lambda a: a.update(keys_a=a["keys_a"][None]), r"keys_a: expected shape \[na, dim/2\]"),
        (
            lambda a: a.update(values=a["values"][..., None]),
            r"values: expected shape \[na\*nb, dv\]",
        ),
        (lambda a: a.update(query=a["query"][:, :15]), "query: expected an even dim"),
        (
            lambda a: a.update(keys_b=a["keys_b"][:, :4]),
            r"keys_b: expected dim 8 \(half of query's\), got 4",
        ),
        (
            lambda a: a.update(values=a["values"][:62]),
            r"values: expected 63 rows \(na \* nb = 9 \* 7\), got 62",
        ),
        (lambda a: a.update(values=a["values"].double()), "expected one floating dtype"),
        (lambda a: a.update(k=0), r"k: expected an int in \[1, min\(na, nb\) = 7\], got 0"),
        (lambda a: a.update(k=8), r"k: expected an int in \[1, min\(na, nb\) = 7\], got 8"),
    ],
)
def test_product_key_bad_inputs_are_named(change, message):
    args = _valid_memory()
    change(args)
    with pytest.raises(ValueError, match=message):
        product_key_topk(**args)
