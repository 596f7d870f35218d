"""MovieLens 100K (u.data, u.item, u.user) -> CTR impressions with user/item side features and history."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from recray.data.loaders.common import (
    ROW_KEY,
    encode,
    history,
    list_array,
    lookup,
    need_file,
    random_split,
    split_codes,
    take_lists,
    with_vocabularies,
    write_dataset,
)
from recray.data.loaders.vocab import check_min_count
from recray.data.schema import Feature, Schema

N_GENRES = 19
# The MovieLens-1M age groups (lower bounds of 18-24, 25-34, ...): ages become ids 1..7, so the
# model learns one embedding per life stage rather than a linear effect of age.
AGE_BOUNDS = [18, 25, 35, 45, 50, 56]


def _read(
    path: Path,
    names: list[str],
    delimiter: str,
    types: dict[str, pa.DataType],
    encoding: str = "utf8",
) -> pa.Table:
    return pcsv.read_csv(
        need_file(path, "movielens-100k"),
        read_options=pcsv.ReadOptions(column_names=names, encoding=encoding),
        # titles hold quotes ("Mis\xe9rables, Les"): the files have no quoting at all
        parse_options=pcsv.ParseOptions(delimiter=delimiter, quote_char=False),
        convert_options=pcsv.ConvertOptions(column_types=types),
    )


def prepare_movielens(
    src: str | Path,
    out: str | Path,
    *,
    split_files: Sequence[Path] | None = None,
    allow_partial_split: bool = False,
    seed: int = 0,
    max_history: int = 50,
    min_count: int = 2,
    embedding_dim: int = 16,
) -> Path:
    """Ratings >= 4 -> label 1, <= 2 -> label 0, 3 dropped (RecBole's CTR convention).

    User and item ids (and the history's items) come from vocabularies of the ids rated at least
    `min_count` times in train: 0 missing, 1 rarer or unseen in train, 2.. the vocabulary's.
    u.data is 2 MB: it is read whole.
    """
    check_min_count(min_count, "movielens-100k")
    src = Path(src)
    ratings = _read(src / "u.data", ["user_id", "item_id", "rating", "timestamp"], "\t", {})
    genre_names = [f"genre{i}" for i in range(N_GENRES)]
    items = _read(
        src / "u.item",
        ["item_id", "title", "release_date", "video_release_date", "url", *genre_names],
        "|",
        {"release_date": pa.string(), "video_release_date": pa.string(), "url": pa.string()},
        encoding="latin-1",
    )
    users = _read(
        src / "u.user", ["user_id", "age", "gender", "occupation", "zip"], "|", {"zip": pa.string()}
    )

    user = ratings.column("user_id").to_numpy()
    item = ratings.column("item_id").to_numpy()
    time = ratings.column("timestamp").to_numpy()
    rating = ratings.column("rating").to_numpy()
    user_vocab = int(max(user.max(), pc.max(users.column("user_id")).as_py())) + 1
    item_vocab = int(max(item.max(), pc.max(items.column("item_id")).as_py())) + 1

    user_key = users.column("user_id").to_numpy()
    age = np.digitize(users.column("age").to_numpy(), AGE_BOUNDS) + 1
    gender, gender_vocab = encode(users.column("gender"))
    occupation, occupation_vocab = encode(users.column("occupation"))

    item_key = items.column("item_id").to_numpy()
    year_text = pc.utf8_slice_codeunits(pc.fill_null(items.column("release_date"), ""), -4)
    year = pc.cast(pc.if_else(pc.equal(year_text, ""), None, year_text), pa.int64())
    first_year = pc.min(year).as_py() or 0
    year_id = pc.fill_null(pc.add(pc.subtract(year, first_year), 1), 0).to_numpy()
    year_vocab = int(year_id.max(initial=0)) + 1
    flags = np.stack([items.column(g).to_numpy() for g in genre_names], axis=1).astype(bool)
    genre_offsets = np.concatenate([[0], np.cumsum(flags.sum(axis=1))])
    genres = list_array(genre_offsets, np.nonzero(flags)[1] + 1)

    # every rating (3s and other splits too) is behaviour the user showed before the impression
    offsets, events = history(user, time, user, time, max_history)
    table = pa.table(
        {
            "user_id": user,
            "item_id": item,
            "age": lookup(user_key, age, user_vocab, user),
            "gender": lookup(user_key, gender, user_vocab, user),
            "occupation": lookup(user_key, occupation, user_vocab, user),
            "release_year": lookup(item_key, year_id, item_vocab, item),
            "genres": take_lists(item_key, genres, item_vocab, item),
            "history": list_array(offsets, item[events]),
            "label": (rating >= 4).astype(np.float32),
            "timestamp": time,
            ROW_KEY: np.arange(len(user)),
        }
    )
    table = table.filter(pa.array(rating != 3))

    keys = table.select(["user_id", "item_id", "timestamp", ROW_KEY])
    codes = split_codes(
        keys, split_files, random_split(table.num_rows, seed), allow_partial_split
    )
    table, vocab = with_vocabularies(
        table, codes, ["user_id", "item_id"], min_count, shared={"history": "item_id"}
    )
    size = {name: len(values) + 2 for name, values in vocab.items()}

    dim = embedding_dim
    schema = Schema(
        features=[
            Feature(
                name=name,
                kind="sparse",
                vocab_size=size[name],
                vocabulary=vocab[name].to_pylist(),
                embedding_dim=dim,
            )
            for name in ("user_id", "item_id")
        ]
        + [
            Feature(name="age", kind="sparse", vocab_size=len(AGE_BOUNDS) + 2, embedding_dim=dim),
            Feature(name="gender", kind="sparse", vocab_size=gender_vocab, embedding_dim=dim),
            Feature(
                name="occupation", kind="sparse", vocab_size=occupation_vocab, embedding_dim=dim
            ),
            Feature(name="release_year", kind="sparse", vocab_size=year_vocab, embedding_dim=dim),
            Feature(
                name="genres",
                kind="sparse",
                vocab_size=N_GENRES + 1,
                embedding_dim=dim,
                pooling="mean",
            ),
            Feature(
                name="history",
                kind="sequence",
                vocab_size=size["item_id"],
                embedding_dim=dim,
                table="item_id",
            ),
        ]
    )
    return write_dataset(out, schema, table, codes)
