"""The model zoo on a small schema: shapes, gradients, overfitting, determinism, DIN's attention."""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch

from recray.data.jagged import Batch, to_batch
from recray.data.schema import Schema
from recray.models import available, build
from recray.models.layers import FeatureEmbedding

ROWS = 64
CASES = [(name, {}) for name in available()] + [
    ("dcnv2", {"structure": "parallel"}),
    ("rankmixer", {"experts": 3}),
    ("hyformer", {"structure": "decoupled"}),
    ("mdl", {"scenario": "item_id"}),
]
SEQUENCE_MODELS = {"hstu", "hyformer"}  # they refuse a schema without a sequence feature
CASE_IDS = [name + "".join(f"-{v}" for v in hp.values()) for name, hp in CASES]
IDS = pa.list_(pa.int64())


def _schema(features: list[str] | None = None) -> Schema:
    all_features = [
        {"name": "user_id", "kind": "sparse", "vocab_size": 100, "embedding_dim": 8},
        {"name": "item_id", "kind": "sparse", "vocab_size": 50, "embedding_dim": 8},
        {
            "name": "genres",
            "kind": "sparse",
            "vocab_size": 20,
            "embedding_dim": 4,
            "pooling": "mean",
        },
        {
            "name": "history",
            "kind": "sequence",
            "vocab_size": 50,
            "embedding_dim": 8,
            "table": "item_id",
        },
        {"name": "price", "kind": "dense"},
    ]
    return Schema(
        features=[f for f in all_features if features is None or f["name"] in features],
        labels=["label_click", "label_like"],
    )


def _record_batch(schema: Schema, rows: int = ROWS, seed: int = 0) -> pa.RecordBatch:
    """Random rows with distinct users (so random labels can be memorised), empty and 1-long lists."""
    gen = torch.Generator().manual_seed(seed)

    def id_lists(vocab: int, max_len: int) -> list[list[int]]:
        lengths = torch.randint(0, max_len + 1, (rows,), generator=gen).tolist()
        lengths[:3] = [0, 1, 2]
        return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]

    columns = {
        "user_id": pa.array(torch.randperm(100, generator=gen)[:rows].numpy()),
        "item_id": pa.array(torch.randint(0, 50, (rows,), generator=gen).numpy()),
        "genres": pa.array(id_lists(20, 3), IDS),
        "history": pa.array(id_lists(50, 6), IDS),
        "price": pa.array(torch.randn(rows, generator=gen).numpy()),
        "label_click": pa.array(torch.randint(0, 2, (rows,), generator=gen).float().numpy()),
        "label_like": pa.array(torch.randint(0, 2, (rows,), generator=gen).float().numpy()),
    }
    names = [f.name for f in schema.features] + schema.labels
    return pa.RecordBatch.from_pydict({n: columns[n] for n in names})


def _batch(schema: Schema, rows: int = ROWS, seed: int = 0) -> Batch:
    return to_batch(_record_batch(schema, rows, seed), schema)


def _build(name: str, hparams: dict, schema: Schema, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build(name, schema, **hparams)


@pytest.mark.parametrize(("name", "hparams"), CASES, ids=CASE_IDS)
def test_every_parameter_gets_a_gradient(name, hparams):
    schema = _schema()
    model = _build(name, hparams, schema)
    batch = _batch(schema)
    logits = model(batch)
    assert logits.shape == (ROWS, 2)
    torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.labels).backward()
    params = dict(model.named_parameters())
    assert params
    without = [n for n, p in params.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not without, f"{name}: no gradient reaches {without}"


@pytest.mark.parametrize(("name", "hparams"), CASES, ids=CASE_IDS)
def test_model_overfits_a_tiny_batch(name, hparams):
    # Labels are random, so only memorising the 64 distinct users can lower the loss: chance level
    # is ln 2 = 0.69 nats; below 0.3 means most rows' labels are predicted with confidence.
    schema = _schema()
    model = _build(name, hparams, schema)
    batch = _batch(schema)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(batch), batch.labels)
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.3, f"{name}: loss {loss.item():.3f} after 200 steps"


@pytest.mark.parametrize(("name", "hparams"), CASES, ids=CASE_IDS)
def test_same_seed_builds_the_same_model(name, hparams):
    schema = _schema()
    batch = _batch(schema)
    first = _build(name, hparams, schema)(batch)
    torch.testing.assert_close(_build(name, hparams, schema)(batch), first, rtol=0, atol=0)
    assert not torch.equal(_build(name, hparams, schema, seed=1)(batch), first)


@pytest.mark.parametrize(
    "features",
    [
        ["price"],
        ["user_id"],
        ["user_id", "item_id", "genres", "history"],
        ["item_id", "history", "price"],
    ],
    ids=["dense_only", "one_sparse", "no_dense", "sequence_and_dense"],
)
@pytest.mark.parametrize("name", available())
def test_defaults_build_on_any_schema(name, features):
    schema = _schema(features)
    if name in SEQUENCE_MODELS and "history" not in features:
        with pytest.raises(ValueError, match=f"{name}: needs a sequence feature"):
            build(name, schema)
        return
    assert build(name, schema)(_batch(schema, rows=5)).shape == (5, 2)


def test_feature_embedding_shares_tables_and_pools_per_schema():
    schema = _schema()
    torch.manual_seed(0)
    embedding = FeatureEmbedding(schema)
    tables = {n: p for n, p in embedding.named_parameters()}
    assert len(tables) == 3  # history reads item_id's table
    assert any(n.startswith("unpooled.") and "item_id" in n for n in tables)
    batch = _batch(schema, rows=4)
    pooled, sequences = embedding(batch.sparse)
    assert list(pooled) == ["user_id", "item_id", "genres"] and list(sequences) == ["history"]
    item_table = next(p for n, p in tables.items() if "item_id" in n)
    genre_table = next(p for n, p in tables.items() if "genres" in n)
    item_ids = batch.sparse["item_id"].values()
    torch.testing.assert_close(pooled["item_id"], item_table[item_ids])
    genres = batch.sparse["genres"].to_dense()
    for row, ids in enumerate(genres):
        expected = genre_table[ids].mean(0) if len(ids) else torch.zeros(4)  # empty pools to zeros
        torch.testing.assert_close(pooled["genres"][row], expected)
    history, offsets = sequences["history"]
    torch.testing.assert_close(history, item_table[batch.sparse["history"].values()])
    assert offsets.tolist() == batch.sparse["history"].offsets().tolist()


def test_feature_embedding_pools_a_shared_table_two_ways_and_mixes_dims():
    schema = Schema(
        features=[
            {
                "name": "tags_mean",
                "kind": "sparse",
                "vocab_size": 9,
                "embedding_dim": 4,
                "pooling": "mean",
                "table": "tag",
            },
            {
                "name": "tags_sum",
                "kind": "sparse",
                "vocab_size": 9,
                "embedding_dim": 4,
                "table": "tag",
            },
            {"name": "clicks", "kind": "sequence", "vocab_size": 7, "embedding_dim": 6},
        ]
    )
    embedding = FeatureEmbedding(schema)
    assert embedding.bags is None and sorted(embedding.unpooled) == ["dim4", "dim6"]
    tags = pa.array([[1, 2], [], [3]], IDS)
    data = {
        "tags_mean": tags,
        "tags_sum": tags,
        "clicks": pa.array([[], [1], [2, 3]], IDS),
        "label": pa.array([0.0, 1.0, 0.0]),
    }
    pooled, sequences = embedding(to_batch(pa.RecordBatch.from_pydict(data), schema).sparse)
    torch.testing.assert_close(
        pooled["tags_sum"], pooled["tags_mean"] * torch.tensor([[2.0], [1.0], [1.0]])
    )
    assert sequences["clicks"][0].shape == (3, 6) and sequences["clicks"][1].tolist() == [
        0,
        0,
        1,
        3,
    ]


def test_din_attends_over_the_history():
    schema = _schema()
    model = _build("din", {}, schema)
    records = _record_batch(schema, rows=8)
    batch = to_batch(records, schema)
    assert batch.sparse["history"].lengths()[0] == 0  # row 0 has an empty history
    logits = model(batch)
    assert torch.isfinite(logits).all()
    columns = records.to_pydict()
    columns["history"][3] = [7, 8, 9]
    changed = model(to_batch(pa.RecordBatch.from_pydict(columns, schema=records.schema), schema))
    assert not torch.allclose(changed[3], logits[3])
    others = torch.arange(8) != 3
    torch.testing.assert_close(changed[others], logits[others])


def test_din_uses_the_kernel(monkeypatch):
    import recray.models.din as din

    calls = []

    def spy(*args, **kwargs):
        calls.append(args[3])
        return real(*args, **kwargs)

    real = din.jagged_target_attention
    monkeypatch.setattr(din, "jagged_target_attention", spy)
    schema = _schema()
    batch = _batch(schema, rows=8)
    _build("din", {}, schema)(batch)
    assert len(calls) == 1 and calls[0].tolist() == batch.sparse["history"].offsets().tolist()


def test_din_target_without_a_shared_table_must_be_named():
    schema = Schema(
        features=[
            {"name": "user_id", "kind": "sparse", "vocab_size": 10},
            {"name": "clicks", "kind": "sequence", "vocab_size": 10},
        ]
    )
    with pytest.raises(
        ValueError, match="sequence feature 'clicks' has no sparse feature on its table"
    ):
        build("din", schema)
    assert build("din", schema, targets={"clicks": "user_id"})(_din_batch(schema)).shape == (2, 1)
    with pytest.raises(ValueError, match="targets\\['clicks'\\]: 'nope' is not a sparse feature"):
        build("din", schema, targets={"clicks": "nope"})
    with pytest.raises(ValueError, match="targets: 'user_id' is not a sequence feature"):
        build("din", schema, targets={"user_id": "user_id"})


def _din_batch(schema: Schema) -> Batch:
    data = {
        "user_id": pa.array([1, 2]),
        "clicks": pa.array([[1, 2], []], IDS),
        "label": pa.array([0.0, 1.0]),
    }
    return to_batch(pa.RecordBatch.from_pydict(data), schema)


def test_unknown_model_is_named_with_the_available_ones():
    with pytest.raises(ValueError, match=r"model 'xgboost' is unknown; available models are") as err:
        build("xgboost", _schema())
    for name in ("dcnv2", "din", "hstu", "rankmixer"):
        assert repr(name) in str(err.value)


@pytest.mark.parametrize(
    ("hparams", "message"),
    [
        ({"hiden": [8]}, r"hparam hiden=\[8\]: Extra inputs are not permitted"),
        ({"dropout": 1.5}, "hparam dropout=1.5: Input should be less than 1"),
        (
            {"structure": "diagonal"},
            "hparam structure='diagonal': Input should be 'stacked' or 'parallel'",
        ),
        ({"hidden": [64, 0]}, "hparam hidden.1=0: Input should be greater than 0"),
        ({"activation": "swish"}, "hparam activation='swish'"),
    ],
)
def test_bad_hparams_are_named(hparams, message):
    with pytest.raises(ValueError, match=message):
        build("dcnv2", _schema(), **hparams)


def test_lr_takes_no_hparams():
    with pytest.raises(ValueError, match="model 'lr': hparam hidden=\\[8\\]"):
        build("lr", _schema(), hidden=[8])
