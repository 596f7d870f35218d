"""The feature schema: declared once in YAML, validated here, read by loaders, converters and models."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

LABEL_NAME = re.compile(r"^label(_[A-Za-z0-9]+)*$")
# Ids of a feature with a `vocabulary`: 0 for a missing value, 1 for a value the vocabulary lacks
# (rarer than the loader's min_count in train, or never seen there), 2.. for vocabulary[0..].
MISSING_ID = 0
OOV_ID = 1
FIRST_VOCABULARY_ID = 2
# libyaml when present: a schema with a vocabulary of a million values loads in seconds, not minutes
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


class SchemaError(ValueError):
    """A schema file or a data file that does not match its schema."""


class Feature(BaseModel):
    """One input column.

    - `dense`: a float column, fed as is.
    - `sparse`: an int64 id column or a `list<int64>` multi-id column, pooled into one vector.
    - `sequence`: a `list<int64>` column kept jagged (a user's history), not pooled.

    Ids must lie in `[0, vocab_size)` (anything else is rejected with the column and value named),
    or, with `hash_buckets`, are mapped into range by a non-negative modulo.

    `vocabulary`, written by the loaders, lists the raw values that have ids, in id order from
    FIRST_VOCABULARY_ID (MISSING_ID and OOV_ID come before), so that serving maps a raw value
    exactly as the prepared data did. A feature sharing another's `table` uses that vocabulary.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    kind: Literal["dense", "sparse", "sequence"]
    vocab_size: int | None = Field(default=None, gt=0)
    hash_buckets: int | None = Field(default=None, gt=0)
    embedding_dim: int = Field(default=16, gt=0)
    pooling: Literal["sum", "mean"] = "sum"
    table: str | None = None
    vocabulary: list[int] | list[str] | None = None
    # A list feature trained on its newest `max_length` values only (Tune's history cap): serving
    # cuts a longer request list the same way, so the model sees what it was trained on.
    max_length: int | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _ids_have_one_range(self) -> Feature:
        if self.kind == "dense":
            if self.vocab_size or self.hash_buckets or self.table:
                raise ValueError(
                    f"feature {self.name!r}: a dense feature takes no vocab_size, hash_buckets or table"
                )
        elif (self.vocab_size is None) == (self.hash_buckets is None):
            raise ValueError(
                f"feature {self.name!r}: give exactly one of vocab_size or hash_buckets "
                f"(got vocab_size={self.vocab_size}, hash_buckets={self.hash_buckets})"
            )
        if self.vocabulary is not None and self.vocab_size != len(self.vocabulary) + FIRST_VOCABULARY_ID:
            raise ValueError(
                f"feature {self.name!r}: a vocabulary of {len(self.vocabulary)} values needs "
                f"vocab_size={len(self.vocabulary) + FIRST_VOCABULARY_ID} (ids 0 missing, 1 "
                f"out of vocabulary), got vocab_size={self.vocab_size}"
            )
        return self

    @property
    def num_embeddings(self) -> int:
        return self.vocab_size or self.hash_buckets or 0

    @property
    def table_name(self) -> str:
        return self.table or self.name

    @property
    def is_id(self) -> bool:
        return self.kind != "dense"


class Schema(BaseModel):
    """Features and labels of one data set. Labels are `label` or `label_<task>` columns."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    features: list[Feature] = Field(min_length=1)
    labels: list[str] = Field(default_factory=lambda: ["label"], min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> Schema:
        names = [f.name for f in self.features]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"features: duplicate names {dupes}")
        for label in self.labels:
            if not LABEL_NAME.match(label):
                raise ValueError(f"labels: {label!r} is not 'label' or 'label_<task>'")
            if label in names:
                raise ValueError(f"labels: {label!r} is also a feature name")
        repeated = sorted({lab for lab in self.labels if self.labels.count(lab) > 1})
        if repeated:
            raise ValueError(f"labels: duplicate names {repeated}")
        # Metrics are named <split>_auc for `label` and <split>_auc_<task> per task, with
        # <split>_auc their mean: a lone `label` beside tasks would have no name of its own.
        tasks = [lab for lab in self.labels if lab != "label"]
        if "label" in self.labels and tasks:
            raise ValueError(f"labels: 'label' (a single task) cannot stand beside {tasks}; "
                             "name every task label_<task>")
        tables: dict[str, Feature] = {}
        for f in self.id_features:
            first = tables.setdefault(f.table_name, f)
            if (first.num_embeddings, first.embedding_dim) != (f.num_embeddings, f.embedding_dim):
                raise ValueError(
                    f"feature {f.name!r}: shares table {f.table_name!r} with {first.name!r} but has "
                    f"{f.num_embeddings} rows x {f.embedding_dim} dims, not "
                    f"{first.num_embeddings} x {first.embedding_dim}"
                )
        return self

    @property
    def dense_features(self) -> list[Feature]:
        return [f for f in self.features if f.kind == "dense"]

    @property
    def id_features(self) -> list[Feature]:
        return [f for f in self.features if f.is_id]

    @property
    def sparse_features(self) -> list[Feature]:
        return [f for f in self.features if f.kind == "sparse"]

    @property
    def sequence_features(self) -> list[Feature]:
        return [f for f in self.features if f.kind == "sequence"]

    @property
    def tasks(self) -> list[str]:
        """Task names: `label` -> `label`, `label_click` -> `click`."""
        return [lab.removeprefix("label_") for lab in self.labels]

    def feature(self, name: str) -> Feature:
        for f in self.features:
            if f.name == name:
                return f
        raise KeyError(f"no feature named {name!r}; features are {[f.name for f in self.features]}")

    # --- YAML -----------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: object, source: str = "schema") -> Schema:
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise SchemaError(f"{source}: {describe_errors(e, data)}") from None

    @classmethod
    def load(cls, path: str | Path) -> Schema:
        """Read a schema file or a folder's `schema.yaml`; a URI (s3://, file://) through pyarrow."""
        if "://" in str(path):  # Path() would fold the scheme's `//` into a local path
            return cls._load_uri(str(path))
        path = Path(path)
        if path.is_dir():
            path = path / "schema.yaml"
        if not path.exists():
            raise SchemaError(f"schema file not found: {path}")
        with open(path) as fh:
            data = yaml.load(fh, Loader=_LOADER)
        return cls.from_dict(data, source=str(path))

    @classmethod
    def _load_uri(cls, uri: str) -> Schema:
        import pyarrow.fs

        filesystem, path = pyarrow.fs.FileSystem.from_uri(uri)
        if filesystem.get_file_info(path).type == pyarrow.fs.FileType.Directory:
            path = f"{path.rstrip('/')}/schema.yaml"
        try:
            with filesystem.open_input_stream(path) as fh:
                data = yaml.load(fh.read(), Loader=_LOADER)
        except OSError as e:
            raise SchemaError(f"schema file not readable: {uri}: {e}") from None
        return cls.from_dict(data, source=uri)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        if path.is_dir():
            path = path / "schema.yaml"
        data = self.model_dump(exclude_defaults=True, exclude={"features": {"__all__": {"vocabulary"}}})
        data["labels"] = list(self.labels)
        # A vocabulary is written as one JSON array (valid YAML flow sequence): yaml.dump would
        # build a node per value first, hundreds of bytes each for millions of values.
        for fields, feature in zip(data["features"], self.features, strict=True):
            if feature.vocabulary is not None:
                fields["vocabulary"] = f"VOCABULARY_OF_{feature.name}_ENDS"
        text = yaml.dump(data, Dumper=_DUMPER, sort_keys=False)
        for feature in self.features:
            if feature.vocabulary is not None:
                text = text.replace(
                    f"vocabulary: VOCABULARY_OF_{feature.name}_ENDS\n",
                    f"vocabulary: {json.dumps(feature.vocabulary)}\n",
                    1,
                )
        path.write_text(text)
        return path


def describe_errors(error: ValidationError, data: object = None) -> str:
    """One clause per problem: the field path (features by name, not list index) and the value."""
    lines = []
    for err in error.errors():
        loc = list(err["loc"])
        if len(loc) >= 2 and loc[0] == "features" and isinstance(loc[1], int):
            try:
                loc[1] = repr(data["features"][loc[1]].get("name", loc[1]))  # type: ignore[index]
            except (KeyError, TypeError, IndexError, AttributeError):
                pass
        where = ".".join(str(p) for p in loc) or "schema"
        value = err.get("input")
        shown = "" if isinstance(value, dict | list) else f" (got {value!r})"
        lines.append(f"{where}: {err['msg']}{shown}")
    return "; ".join(lines)
