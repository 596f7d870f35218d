"""Frontier models (HSTU, RankMixer, HyFormer, MSN, MDL): their mechanisms against brute-force
loops, and the Triton kernels (interpreter) against the reference inside the whole model."""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F
from test_models import _batch, _record_batch, _schema

from recray.data.jagged import to_batch
from recray.models import build
from recray.models.layers import PerTokenFFN, token_mixing


def _model(name: str, seed: int = 0, **hparams):
    torch.manual_seed(seed)
    return build(name, _schema(), **hparams)


def test_hstu_sequence_is_latest_history_then_candidate():
    model = _model("hstu", max_len=3)
    history = torch.arange(6, dtype=torch.float32)[:, None] * torch.ones(1, 2)
    offsets = torch.tensor([0, 0, 1, 6])  # lengths 0, 1, 5: the last is cut to its latest 2
    candidate = -torch.arange(1, 4, dtype=torch.float32)[:, None] * torch.ones(1, 2)
    tokens, new_offsets, distance, last = model._with_candidate(history, offsets, candidate)
    expected_rows, expected_distance = [], []
    for row in range(3):
        items = history[offsets[row] : offsets[row + 1]][-2:]
        expected_rows += [*items, candidate[row]]
        expected_distance += [*range(len(items), 0, -1), 0]
    torch.testing.assert_close(tokens, torch.stack(expected_rows))
    assert distance.tolist() == expected_distance
    assert new_offsets.tolist() == [0, 1, 3, 6] and last.tolist() == [0, 2, 5]


@pytest.mark.parametrize(
    ("name", "hparams"),
    [("hstu", {}), ("hyformer", {}), ("hyformer", {"structure": "decoupled"}), ("msn", {})],
)
def test_a_row_scores_the_same_alone_as_in_its_batch(name, hparams):
    # Jagged, never padded: nothing of one row (its history length included) leaks into another.
    model = _model(name, **hparams).eval()
    schema = _schema()
    records = _record_batch(schema, rows=6)
    together = model(to_batch(records, schema))
    alone = torch.cat([model(to_batch(records.slice(i, 1), schema)) for i in range(6)])
    torch.testing.assert_close(alone, together, rtol=1e-5, atol=1e-5)


def test_hstu_output_follows_the_history():
    model = _model("hstu").eval()
    schema = _schema()
    records = _record_batch(schema, rows=8)
    logits = model(to_batch(records, schema))
    columns = records.to_pydict()
    columns["history"][3] = [7, 8, 9]
    changed = model(to_batch(pa.RecordBatch.from_pydict(columns, schema=records.schema), schema))
    others = torch.arange(8) != 3
    assert not torch.allclose(changed[3], logits[3])
    torch.testing.assert_close(changed[others], logits[others])


def test_token_mixing_moves_head_h_of_token_t_into_token_h():
    x = torch.randn(2, 4, 8)
    mixed = token_mixing(x)
    for t in range(4):
        for h in range(4):
            torch.testing.assert_close(mixed[:, h, 2 * t : 2 * t + 2], x[:, t, 2 * h : 2 * h + 2])


def test_relu_routed_moe_matches_a_loop_and_switches_experts_off():
    torch.manual_seed(0)
    ffn = PerTokenFFN(tokens=3, dim=4, hidden=5, experts=4)
    x = torch.randn(16, 3, 4)
    expected = torch.zeros(16, 3, 4)
    gates = torch.zeros(16, 3, 4)
    for b in range(16):
        for t in range(3):
            for e in range(4):
                gate = F.relu(x[b, t] @ ffn.router[t, :, e])
                gates[b, t, e] = gate
                h = F.gelu(x[b, t] @ ffn.w_in[t, e] + ffn.b_in[t, e])
                expected[b, t] += gate * (h @ ffn.w_out[t, e] + ffn.b_out[t, e])
    torch.testing.assert_close(ffn(x), expected, rtol=1e-5, atol=1e-5)
    assert 0.2 < (gates == 0).float().mean() < 0.8  # ReLU routing is sparse, not all-off


def test_hyformer_decoding_matches_padded_softmax_attention():
    model = _model("hyformer")
    decoder = model.decoders[0]
    schema = _schema()
    batch = _batch(schema, rows=5)
    _, sequences = model.fields(batch)
    x = torch.randn(5, 4, 32)
    got = decoder(x, sequences)
    history, offsets = sequences["history"]
    heads, head_dim = decoder.heads, decoder.head_dim
    expected = torch.zeros(5, 4, 32)
    for row in range(5):
        items = history[offsets[row] : offsets[row + 1]]
        if not len(items):
            continue  # an empty history decodes to zeros
        q = decoder.query(x[row]).view(4, heads, head_dim)
        k = decoder.key["history"](items).view(-1, heads, head_dim)
        v = decoder.value["history"](items).view(-1, heads, head_dim)
        weights = torch.einsum("thd,nhd->thn", q, k).div(head_dim**0.5).softmax(-1)
        expected[row] = torch.einsum("thn,nhd->thd", weights, v).reshape(4, 32)
    torch.testing.assert_close(got, decoder.norm(x + decoder.out(expected)), rtol=1e-5, atol=1e-5)


def test_msn_reads_the_best_memory_slots_of_the_full_grid():
    model = _model("msn", memory_keys=6, topk=3).eval()
    schema = _schema()
    batch = _batch(schema, rows=7)
    x = torch.cat([*model.embedding.fields(batch.sparse), batch.dense], 1)
    query = model.query(x)
    half = query.shape[1] // 2
    scores = (query[:, :half] @ model.keys_a.T)[:, :, None] + (query[:, half:] @ model.keys_b.T)[
        :, None
    ]  # [B, na, nb]: every slot scored, unlike the kernel
    best, slots = scores.flatten(1).topk(3, 1)
    memory = torch.einsum("bk,bkd->bd", best.softmax(1), model.values[slots])
    gamma, beta = memory.chunk(2, 1)
    expected = model.rest(model.first(x) * (1 + gamma) + beta)
    torch.testing.assert_close(model(batch), expected, rtol=1e-5, atol=1e-5)


def test_mdl_scenario_token_conditions_the_tasks():
    model = _model("mdl", scenario="item_id").eval()
    schema = _schema()
    records = _record_batch(schema, rows=6)
    logits = model(to_batch(records, schema))
    columns = records.to_pydict()
    columns["item_id"][2] = (columns["item_id"][2] + 1) % 50
    changed = model(to_batch(pa.RecordBatch.from_pydict(columns, schema=records.schema), schema))
    others = torch.arange(6) != 2
    assert not torch.allclose(changed[2], logits[2])
    torch.testing.assert_close(changed[others], logits[others])


def test_mdl_scenario_must_be_a_sparse_feature():
    with pytest.raises(ValueError, match="scenario='price' is not a sparse feature"):
        build("mdl", _schema(), scenario="price")
    model = build("mdl", _schema(), scenario="genres")  # a multi-id column cannot be a scenario
    with pytest.raises(ValueError, match="scenario feature 'genres' needs exactly one id a row"):
        model(_batch(_schema(), rows=8))


def test_rankmixer_refuses_more_tokens_than_values_and_uneven_heads():
    with pytest.raises(ValueError, match="token_dim=30 must be a multiple of tokens=4"):
        build("rankmixer", _schema(), token_dim=30)
    with pytest.raises(ValueError, match="tokens=32 is more than the 16 feature values"):
        build("rankmixer", _schema(["price"]), tokens=32, token_dim=64)


@pytest.mark.parametrize(
    ("name", "hparams", "kernel"),
    [
        ("hstu", {}, "flash_attention"),
        ("hyformer", {}, "target_attention"),
        ("msn", {}, "product_key"),
    ],
)
def test_triton_interpreter_matches_reference_in_the_model(monkeypatch, name, hparams, kernel):
    import importlib

    triton_module = importlib.import_module(f"recray.kernels.triton.{kernel}")
    public = next(n for n in dir(triton_module) if n in (
        "jagged_flash_attention", "jagged_target_attention", "product_key_topk"))
    calls = []
    real = getattr(triton_module, public)

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(triton_module, public, spy)
    schema = _schema()
    batch = _batch(schema, rows=6)
    model = _model(name, **hparams)
    monkeypatch.setenv("RECRAY_KERNELS", "reference")
    want = model(batch)
    want_grads = torch.autograd.grad(want.sum(), list(model.parameters()), allow_unused=True)
    assert not calls
    monkeypatch.setenv("RECRAY_KERNELS", "triton")
    got = model(batch)
    got_grads = torch.autograd.grad(got.sum(), list(model.parameters()), allow_unused=True)
    assert calls, f"{name}: the Triton {kernel} kernel never ran"
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for g, w in zip(got_grads, want_grads, strict=True):
        if w is None:
            assert g is None
        else:
            torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-5)
