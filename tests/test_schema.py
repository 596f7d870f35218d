"""Feature schema: YAML round trip, and each bad schema names the field and the value."""

from __future__ import annotations

import pytest
import yaml

from recray.data.schema import Feature, Schema, SchemaError

GOOD = {
    "features": [
        {"name": "user_id", "kind": "sparse", "vocab_size": 10, "embedding_dim": 8},
        {"name": "item_id", "kind": "sparse", "vocab_size": 20, "embedding_dim": 8},
        {"name": "history", "kind": "sequence", "vocab_size": 20, "embedding_dim": 8, "table": "item_id"},
        {"name": "price", "kind": "dense"},
    ],
    "labels": ["label_click", "label_like"],
}


def test_yaml_round_trip(tmp_path):
    (tmp_path / "schema.yaml").write_text(yaml.safe_dump(GOOD))
    schema = Schema.load(tmp_path)
    assert [f.name for f in schema.sequence_features] == ["history"]
    assert schema.feature("history").table_name == "item_id"
    assert schema.tasks == ["click", "like"]
    schema.save(tmp_path / "again.yaml")
    assert Schema.load(tmp_path / "again.yaml") == schema


def _bad(**change) -> dict:
    data = yaml.safe_load(yaml.safe_dump(GOOD))
    feature = data["features"][change.pop("index", 0)]
    feature.update(change)
    return data


@pytest.mark.parametrize(
    "data,pattern",
    [
        (_bad(kind="categorical"), r"features\.'user_id'\.kind: .*got 'categorical'"),
        (_bad(vocab_size=-3), r"features\.'user_id'\.vocab_size: .*greater than 0.*got -3"),
        (_bad(vocab_size=None), r"'user_id': give exactly one of vocab_size or hash_buckets"),
        (_bad(hash_buckets=100), r"'user_id': give exactly one of vocab_size or hash_buckets"),
        (_bad(embedding_dim=0), r"features\.'user_id'\.embedding_dim.*got 0"),
        (_bad(pooling="max"), r"features\.'user_id'\.pooling.*got 'max'"),
        (_bad(index=3, vocab_size=5), r"'price': a dense feature takes no vocab_size"),
        (_bad(index=2, embedding_dim=4), r"'history': shares table 'item_id' with 'item_id' but has 20 rows x 4 dims"),
        (_bad(name="item_id"), r"duplicate names \['item_id'\]"),
        (_bad(colour="red"), r"features\.'user_id'\.colour: Extra inputs"),
        ({**GOOD, "labels": ["click"]}, r"labels: 'click' is not 'label' or 'label_<task>'"),
        ({**GOOD, "labels": ["label", "label_x"]},
         r"labels: 'label' \(a single task\) cannot stand beside \['label_x'\]; name every task"),
        ({**GOOD, "labels": ["label_x", "label_x"]}, r"labels: duplicate names \['label_x'\]"),
        ({"features": []}, r"features: .*at least 1"),
    ],
)
def test_bad_schema_names_field_and_value(data, pattern):
    with pytest.raises(SchemaError, match=pattern):
        Schema.from_dict(data)


def test_missing_schema_file_is_named(tmp_path):
    with pytest.raises(SchemaError, match="schema file not found: .*schema.yaml"):
        Schema.load(tmp_path)


def test_feature_defaults():
    f = Feature(name="x", kind="sparse", hash_buckets=1000)
    assert (f.num_embeddings, f.embedding_dim, f.pooling, f.table_name) == (1000, 16, "sum", "x")
