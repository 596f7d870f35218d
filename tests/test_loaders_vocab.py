"""Vocabularies in the schema: saved and loaded exactly, checked against vocab_size, mapped like a lookup."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from recray.data.loaders.vocab import frequent_values, vocabulary_ids
from recray.data.schema import Feature, Schema, SchemaError


def test_vocabulary_round_trips_through_schema_yaml_with_awkward_strings(tmp_path):
    words = ["00000001", "1e5", "true", "x: y", "- z", "é", "'q'", '"d"', "null", ""]
    schema = Schema(
        features=[
            Feature(name="a", kind="sparse", vocab_size=len(words) + 2, vocabulary=words),
            Feature(name="a_b", kind="sparse", vocab_size=5, vocabulary=[-3, 7, 2**40]),
            Feature(name="h", kind="sequence", vocab_size=5, table="a_b"),
            Feature(name="d", kind="dense"),
        ]
    )
    schema.save(tmp_path)
    loaded = Schema.load(tmp_path)
    assert loaded == schema
    assert loaded.feature("a").vocabulary == words  # strings stay strings, "1e5" included


def test_vocabulary_size_must_match_vocab_size(tmp_path):
    (tmp_path / "schema.yaml").write_text(
        "features:\n- {name: item_id, kind: sparse, vocab_size: 3, vocabulary: [5, 9]}\n"
    )
    with pytest.raises(SchemaError, match="item_id.*vocabulary of 2 values needs vocab_size=4"):
        Schema.load(tmp_path)


def test_vocabulary_ids_match_a_dictionary_lookup():
    rng = np.random.default_rng(0)
    values = rng.integers(0, 30, 500)
    counts = pa.table({"value": np.arange(30), "count": np.bincount(values, minlength=30)})
    vocabulary = frequent_values(counts, 20)
    index = {v: 2 + i for i, v in enumerate(sorted(v for v in range(30) if (values == v).sum() >= 20))}
    queries = [None, *rng.integers(0, 40, 200).tolist()]
    got = vocabulary_ids(vocabulary, pa.array(queries, pa.int64()))
    assert got.tolist() == [0 if q is None else index.get(q, 1) for q in queries]
    assert vocabulary_ids(frequent_values(counts, 10**6), pa.array([1, None])).tolist() == [1, 0]
