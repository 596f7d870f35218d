"""Raw-format loaders: labels, splits, leak-free histories, id ranges, on fixtures written here."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from recray.data.jagged import to_batch
from recray.data.loaders import LOADERS, prepare
from recray.data.loaders.common import history
from recray.data.schema import Schema

SPLITS = ("train", "valid", "test")


def read_splits(out: Path) -> dict[str, pa.Table]:
    return {split: pq.read_table(out / f"{split}.parquet") for split in SPLITS}


def vocabulary_of(train_values, min_count: int = 2):
    """The id each raw value should get, from an independent count of the train values: the
    values seen at least `min_count` times, sorted, are ids 2..; any other value 1, None 0."""
    counts = Counter(np.asarray(train_values).tolist())
    index = {v: 2 + i for i, v in enumerate(sorted(v for v, c in counts.items() if c >= min_count))}
    return lambda value: 0 if value is None else index.get(value, 1)


def raw_values(schema: Schema, name: str, ids) -> list:
    """Ids back to raw values through the saved vocabulary: what serving would map them from."""
    feature = schema.feature(schema.feature(name).table_name)
    table = {2 + i: v for i, v in enumerate(feature.vocabulary)}
    return [table.get(int(i), "OOV" if i == 1 else None) for i in ids]


def brute_force_history(user, time, item, row_user, row_time, max_len, clicked=None):
    """The user's items strictly before `row_time`, in (time, file order), the last `max_len`."""
    mask = (user == row_user) & (time < row_time)
    if clicked is not None:
        mask &= clicked
    earlier = np.nonzero(mask)[0]
    earlier = earlier[np.argsort(time[earlier], kind="stable")]
    return item[earlier][len(earlier) - min(len(earlier), max_len) :].tolist()


# --- MovieLens fixture --------------------------------------------------------------------------
def write_movielens(root: Path, n_ratings: int = 600, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    items = np.array([*range(1, 41), 267])
    user = rng.integers(1, 31, n_ratings)
    item = rng.choice(items, n_ratings)
    rating = rng.integers(1, 6, n_ratings)
    time = 880_000_000 + rng.integers(0, 60, n_ratings)  # few distinct seconds: many ties
    root.mkdir(parents=True, exist_ok=True)
    (root / "u.data").write_text(
        "".join(
            f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in zip(user, item, rating, time, strict=True)
        )
    )
    lines = []
    for i in items:
        flags = ["0"] * 19
        flags[int(i) % 19] = "1"
        flags[(int(i) * 7) % 19] = "1"
        title, date = (f'Film "{i}" (1995)', f"01-Jan-{1950 + int(i)}")
        if i == 5:
            title = "Misérables, Les (1995)"
        if i == 267:
            title, date, flags = "unknown", "", ["1"] + ["0"] * 18
        lines.append(f"{i}|{title}|{date}||http://x/{i}|" + "|".join(flags) + "\n")
    (root / "u.item").write_bytes("".join(lines).encode("latin-1"))
    occupations = ["writer", "artist", "doctor"]
    (root / "u.user").write_text(
        "".join(
            f"{u}|{10 + 2 * u}|{'MF'[u % 2]}|{occupations[u % 3]}|{'T8H1N' if u == 7 else 10000 + u}\n"
            for u in range(1, 31)
        )
    )
    return {"user": user, "item": item, "rating": rating, "time": time}


@pytest.fixture
def movielens(tmp_path) -> tuple[Path, dict[str, np.ndarray]]:
    raw = write_movielens(tmp_path / "ml")
    return tmp_path / "ml", raw


def test_movielens_drops_rating_three_and_labels_the_rest(movielens, tmp_path):
    src, raw = movielens
    tables = read_splits(prepare("movielens-100k", src, tmp_path / "out"))
    labels = np.concatenate([t.column("label").to_numpy() for t in tables.values()])
    assert len(labels) == int((raw["rating"] != 3).sum())
    assert labels.sum() == int((raw["rating"] >= 4).sum())
    rows = np.concatenate([t.column("row").to_numpy() for t in tables.values()])
    assert (raw["rating"][rows] != 3).all()
    np.testing.assert_array_equal(labels, (raw["rating"][rows] >= 4).astype(np.float32))


def test_random_split_is_8_1_1_disjoint_and_seeded(movielens, tmp_path):
    src, raw = movielens
    first = read_splits(prepare("movielens-100k", src, tmp_path / "a", seed=3))
    again = read_splits(prepare("movielens-100k", src, tmp_path / "b", seed=3))
    other = read_splits(prepare("movielens-100k", src, tmp_path / "c", seed=4))
    n = int((raw["rating"] != 3).sum())
    sizes = [first[s].num_rows for s in SPLITS]
    assert sizes == [round(0.8 * n), round(0.9 * n) - round(0.8 * n), n - round(0.9 * n)]
    rows = [set(first[s].column("row").to_pylist()) for s in SPLITS]
    assert sum(map(len, rows)) == n and len(set.union(*rows)) == n
    assert all(first[s].equals(again[s]) for s in SPLITS)
    assert not first["test"].equals(other["test"])


def test_movielens_history_is_strictly_earlier_ratings_most_recent_last(movielens, tmp_path):
    src, raw = movielens
    tables = read_splits(prepare("movielens-100k", src, tmp_path / "out", max_history=5))
    item_id = vocabulary_of(raw["item"][tables["train"].column("row").to_numpy()])
    for table in tables.values():
        histories = table.column("history").to_pylist()
        assert max(map(len, histories)) == 5
        for r, t, h in zip(
            table.column("row").to_numpy(),
            table.column("timestamp").to_numpy(),
            histories,
            strict=True,
        ):
            # all ratings count, 3s and rows of other splits included
            expected = brute_force_history(raw["user"], raw["time"], raw["item"], raw["user"][r], t, 5)
            assert h == [item_id(i) for i in expected]


def test_history_of_a_user_without_events_is_empty():
    offsets, events = history(
        np.array([1, 1, 2]),
        np.array([5, 6, 5]),
        np.array([1, 3, 2, 1]),
        np.array([6, 9, 5, 100]),
        10,
    )
    assert np.diff(offsets).tolist() == [1, 0, 0, 2]
    assert events.tolist() == [0, 0, 1]


def test_movielens_reads_latin1_titles_and_the_item_without_a_date(movielens, tmp_path):
    src, raw = movielens
    out = prepare("movielens-100k", src, tmp_path / "out", min_count=1)
    schema = Schema.load(out)
    tables = read_splits(out)
    train_items = set(raw["item"][tables["train"].column("row").to_numpy()].tolist())
    assert schema.feature("item_id").vocabulary == sorted(train_items)
    assert schema.feature("item_id").vocab_size == len(train_items) + 2
    assert schema.feature("history").table == "item_id"
    table = pa.concat_tables(tables.values())
    item = raw["item"][table.column("row").to_numpy()]
    year = table.column("release_year").to_numpy()
    assert (year[item == 267] == 0).all() and (year[item != 267] > 0).all()
    genres = table.column("genres").to_pylist()
    assert all(g == [1] for g, i in zip(genres, item, strict=True) if i == 267)
    assert table.column("age").to_numpy().min() >= 1


# --- split files ----------------------------------------------------------------------------
def write_split_files(root: Path, keys: list[dict[str, np.ndarray]]) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for split, columns in zip(SPLITS, keys, strict=True):
        path = root / f"{split}.csv"
        names = list(columns)
        rows = zip(*(columns[c] for c in names), strict=True)
        path.write_text(
            ",".join(names) + "\n" + "".join(",".join(map(str, r)) + "\n" for r in rows)
        )
        paths.append(path)
    return paths


def test_split_files_put_exactly_the_named_rows_in_each_split(movielens, tmp_path):
    src, raw = movielens
    # only keys that name one row, so that "these rows" is well defined
    _, first, inverse, counts = np.unique(
        np.stack([raw["user"], raw["item"], raw["time"]]),
        axis=1,
        return_index=True,
        return_inverse=True,
        return_counts=True,
    )
    unique = (counts[inverse] == 1) & (raw["rating"] != 3)
    chosen = np.random.default_rng(1).permutation(np.nonzero(unique)[0])[:60]
    parts = [chosen[:40], chosen[40:50], chosen[50:]]
    keys = [
        {"user_id": raw["user"][p], "item_id": raw["item"][p], "timestamp": raw["time"][p]}
        for p in parts
    ]
    tables = read_splits(
        prepare(
            "movielens-100k",
            src,
            tmp_path / "out",
            split_files=write_split_files(tmp_path / "s", keys),
            allow_partial_split=True,
        )
    )
    for split, part in zip(SPLITS, parts, strict=True):
        rows = tables[split].column("row").to_numpy()
        got = set(zip(raw["user"][rows], raw["item"][rows], raw["time"][rows], strict=True))
        assert got == set(zip(raw["user"][part], raw["item"][part], raw["time"][part], strict=True))
        assert tables[split].num_rows == len(part)


def with_duplicates(src: Path, raw: dict[str, np.ndarray], n: int = 40) -> dict[str, np.ndarray]:
    """Append `n` repeats of earlier ratings to u.data: same user, item and second, some with
    another rating, so that which repeat lands where shows in the label."""
    picks = np.random.default_rng(2).choice(len(raw["user"]), n)
    repeat = {k: v[picks] for k, v in raw.items()}
    repeat["rating"] = np.where(np.arange(n) % 2, repeat["rating"], 6 - repeat["rating"])
    with open(src / "u.data", "a") as fh:
        fh.writelines(
            f"{u}\t{i}\t{r}\t{t}\n"
            for u, i, r, t in zip(*(repeat[k] for k in ("user", "item", "rating", "time")), strict=True)
        )
    return {k: np.concatenate([raw[k], repeat[k]]) for k in raw}


def test_split_files_assign_exact_duplicates_in_order_of_occurrence(movielens, tmp_path, capsys):
    src, raw = movielens
    raw = with_duplicates(src, raw)
    rows = np.nonzero(raw["rating"] != 3)[0]  # the data rows, in order of occurrence
    code = np.random.default_rng(5).integers(0, 3, len(rows))
    lines = np.random.default_rng(6).permutation(len(rows))  # line order within a file is free
    keys = [
        {c: raw[r][rows[lines[code[lines] == k]]] for c, r in
         (("user_id", "user"), ("item_id", "item"), ("timestamp", "time"))}
        for k in range(3)
    ]
    out = prepare("movielens-100k", src, tmp_path / "out",
                  split_files=write_split_files(tmp_path / "s", keys))
    # brute force: each key's rows in file order take the train lines, then valid, then test
    named: dict[tuple, list[int]] = {}
    for k in range(3):
        for key in zip(keys[k]["user_id"], keys[k]["item_id"], keys[k]["timestamp"], strict=True):
            named.setdefault(tuple(key), []).append(k)
    expected: list[set[int]] = [set(), set(), set()]
    for row in rows:  # lines were collected train, valid, test: each list is in file order
        expected[named[(raw["user"][row], raw["item"][row], raw["time"][row])].pop(0)].add(int(row))
    tables = read_splits(out)
    assert [set(tables[s].column("row").to_pylist()) for s in SPLITS] == expected
    labels: dict[tuple, set[bool]] = {}
    for r in rows:
        labels.setdefault((raw["user"][r], raw["item"][r], raw["time"][r]), set()).add(
            bool(raw["rating"][r] >= 4))
    duplicates = len(rows) - len(labels)
    # the fixture really has repeats, some with different labels, so the order shows
    assert duplicates >= 20 and sum(len(v) == 2 for v in labels.values()) >= 5
    report = capsys.readouterr().err
    sizes = ", ".join(f"{s} {len(e)}" for s, e in zip(SPLITS, expected, strict=True))
    assert f"split_files: {sizes} rows assigned; {duplicates} duplicate rows" in report
    assert "; 0 unassigned" in report


def test_partial_split_fails_unless_allowed_and_counts_what_it_drops(movielens, tmp_path, capsys):
    from recray.cli import main

    src, raw = movielens
    rows = np.nonzero(raw["rating"] != 3)[0]
    named = rows[: len(rows) - 25]  # the last 25 data rows in no file
    keys = [{"user_id": raw["user"][p], "item_id": raw["item"][p], "timestamp": raw["time"][p]}
            for p in np.array_split(named, 3)]
    files = [str(f) for f in write_split_files(tmp_path / "s", keys)]
    args = ["data", "prepare", "movielens-100k", "--src", str(src), "--split-files", *files]
    assert main([*args, "--out", str(tmp_path / "a")]) == 2
    # a repeat of a named key would be assigned to it, so count the rows left by brute force
    left = len(rows) - len(named)
    err = capsys.readouterr().err
    assert f"error: split_files: {left} of {len(rows)} data rows are named in no file" in err
    assert "--allow-partial-split" in err
    assert main([*args, "--out", str(tmp_path / "b"), "--allow-partial-split"]) == 0
    assert f"; {left} unassigned" in capsys.readouterr().err
    tables = read_splits(tmp_path / "b")
    assert sorted(np.concatenate([t.column("row").to_numpy() for t in tables.values()])) == sorted(
        named
    )


def test_split_file_naming_an_unknown_row_is_an_error(movielens, tmp_path):
    src, raw = movielens
    first = np.nonzero(raw["rating"] != 3)[0][:1]
    keys = [
        {
            "user_id": raw["user"][first],
            "item_id": raw["item"][first],
            "timestamp": raw["time"][first],
        },
        {"user_id": [999, 998], "item_id": [1, 1], "timestamp": [0, 0]},
        {"user_id": [], "item_id": [], "timestamp": []},
    ]
    files = write_split_files(tmp_path / "s", keys)
    with pytest.raises(ValueError, match=r"valid\.csv: 2 of 2 rows not found"):
        prepare("movielens-100k", src, tmp_path / "out", split_files=files)


def test_split_files_by_row_number_for_criteo(tmp_path):
    src = write_criteo(tmp_path / "criteo.txt")
    parts = [np.array([0, 2, 3]), np.array([1]), np.array([4])]
    files = write_split_files(tmp_path / "s", [{"row": p} for p in parts])
    tables = read_splits(prepare("criteo", src, tmp_path / "out", split_files=files))
    assert [t.column("row").to_pylist() for t in tables.values()] == [p.tolist() for p in parts]
    with pytest.raises(ValueError, match="row=0 is named 3 times and occurs 1 times"):
        prepare(
            "criteo",
            src,
            tmp_path / "o2",
            split_files=write_split_files(tmp_path / "t", [{"row": [0]}] * 3),
        )
    bad = write_split_files(
        tmp_path / "u", [{"user_id": [1], "item_id": [1], "timestamp": [1]}] * 3
    )
    with pytest.raises(ValueError, match="expected 'row'"):
        prepare("criteo", src, tmp_path / "o3", split_files=bad)


# --- Criteo -------------------------------------------------------------------------------------
CRITEO_LINES = [
    ["1", "5", "-1", "", "0", *[""] * 9, "68fd1e64", "80E26C9B", *["0000000a"] * 24],
    ["0", *["3"] * 13, "ffffffff", *[""] * 25],  # the empty trailing fields end the line in tabs
    ["0", "", "-3", *["100"] * 11, *["deadbeef"] * 26],
    ["1", *["0"] * 13, *["00000001"] * 25, ""],
    ["0", *["7"] * 13, *["12345678"] * 26],
]


def write_criteo(path: Path) -> Path:
    path.write_text("".join("\t".join(line) + "\n" for line in CRITEO_LINES))
    return path


def test_criteo_parses_empty_fields_trailing_tabs_and_negative_integers(tmp_path):
    src = write_criteo(tmp_path / "criteo.txt")
    assert src.read_text().splitlines()[1].endswith("\t\t")
    out = prepare(
        "criteo",
        src,
        tmp_path / "out",
        split_files=write_split_files(
            tmp_path / "s", [{"row": [0, 1, 2, 3, 4]}, {"row": []}, {"row": []}]
        ),
        hash_buckets=100_003,
    )
    table = read_splits(out)["train"]
    assert table.column("label").to_pylist() == [1, 0, 0, 1, 0]
    assert table.column("I1").to_pylist() == pytest.approx(
        [np.log1p(5), np.log1p(3), 0, 0, np.log1p(7)]
    )
    assert table.column("I2").to_pylist() == pytest.approx([-1, np.log1p(3), -3, 0, np.log1p(7)])
    assert table.column("I3").to_pylist()[0] == 0  # empty
    for c in range(26):
        expected = [criteo_id(line[14 + c], 100_003) for line in CRITEO_LINES]
        assert table.column(f"C{c + 1}").to_pylist() == expected
    assert Schema.load(out).feature("C1").hash_buckets == 100_003


def criteo_id(field: str, buckets: int) -> int:
    """The documented id of one categorical field: 0 if empty, else 1 + int(hex) mod (buckets - 1)."""
    return 1 + int(field, 16) % (buckets - 1) if field else 0


def test_criteo_missing_category_shares_no_id_with_a_real_value(tmp_path):
    buckets = 7
    # every real value from 0 to 4 buckets' worth, multiples of the bucket count included
    real = [f"{v:x}" for v in range(4 * buckets)]
    lines = [["1", *["1"] * 13, value, *["0000000a"] * 25] for value in [*real, "", ""]]
    src = tmp_path / "criteo.txt"
    src.write_text("".join("\t".join(line) + "\n" for line in lines))
    files = write_split_files(tmp_path / "s", [{"row": range(len(lines))}, {"row": []}, {"row": []}])
    out = prepare("criteo", src, tmp_path / "out", split_files=files, hash_buckets=buckets)
    # the ids the model sees: after to_batch's own range handling
    ids = to_batch(read_splits(out)["train"], Schema.load(out)).sparse["C1"].values().tolist()
    real_ids, missing_ids = ids[: len(real)], ids[len(real) :]
    assert missing_ids[0] == missing_ids[1] and missing_ids[0] not in real_ids
    assert all(0 <= i < buckets for i in ids)
    assert len(set(real_ids)) == buckets - 1  # the real values use every other bucket
    with pytest.raises(ValueError, match="hash_buckets=1, expected at least 2"):
        prepare("criteo", src, tmp_path / "o2", split_files=files, hash_buckets=1)


def test_criteo_hex_ids_match_python_on_the_real_sample(shared_data, tmp_path):
    src = shared_data / "criteo" / "train_sample.txt"
    lines = [line.split("\t") for line in src.read_text().splitlines()]
    files = write_split_files(
        tmp_path / "s", [{"row": range(len(lines))}, {"row": []}, {"row": []}]
    )
    table = read_splits(
        prepare("criteo", src, tmp_path / "out", split_files=files, hash_buckets=100_003)
    )["train"]
    assert table.num_rows == len(lines) == 50
    for c in range(26):
        assert table.column(f"C{c + 1}").to_pylist() == [
            criteo_id(x[14 + c], 100_003) for x in lines
        ]
    assert table.column("label").to_pylist() == [float(x[0]) for x in lines]


# --- Taobao -------------------------------------------------------------------------------------
def write_taobao(path: Path, n: int = 800, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    user = np.sort(rng.integers(100, 120, n))  # grouped by user, as the real file is
    item = rng.integers(5000, 5060, n)
    category = item % 7 * 1000 + 3
    behavior = rng.choice(np.array(["pv", "pv", "pv", "buy", "cart", "fav"]), n)
    time = 1_511_500_000 + rng.integers(0, 200, n) * 60
    path.write_text(
        "".join(
            f"{u},{i},{c},{b},{t}\n"
            for u, i, c, b, t in zip(user, item, category, behavior, time, strict=True)
        )
    )
    return {"user": user, "item": item, "category": category, "behavior": behavior, "time": time}


def test_taobao_samples_clicks_with_negatives_and_a_time_split(tmp_path):
    raw = write_taobao(tmp_path / "UserBehavior.csv")
    out = prepare("taobao", tmp_path, tmp_path / "out", negatives=2, max_history=8)
    tables = read_splits(out)
    schema = Schema.load(out)
    clicked = raw["behavior"] == "pv"
    train_rows = tables["train"].filter(pc.equal(tables["train"].column("label"), 1))
    # every train click counts, also those left out for a short history: the time-split bound
    bound = np.quantile(raw["time"][clicked], 0.8, method="lower")
    train_clicks = clicked & (raw["time"] <= bound)
    assert set(train_rows.column("row").to_pylist()) <= set(np.flatnonzero(train_clicks))
    item_id = vocabulary_of(raw["item"][train_clicks])
    category_id = vocabulary_of(raw["category"][train_clicks])
    category_of = dict(zip(raw["item"].tolist(), raw["category"].tolist(), strict=True))
    earlier = np.array(
        [
            ((raw["user"] == u) & (raw["time"] < t) & clicked).any()
            for u, t in zip(raw["user"], raw["time"], strict=True)
        ]
    )
    total = 0
    for table in tables.values():
        label = table.column("label").to_numpy()
        item = table.column("item_id").to_numpy()
        assert label.tolist() == [1.0, 0.0, 0.0] * (len(label) // 3)
        rows = table.column("row").to_numpy()
        assert (clicked[rows]).all()
        positive_items = raw["item"][rows[label == 1]]
        assert item[label == 1].tolist() == [item_id(i) for i in positive_items]
        negative_items = raw_values(schema, "item_id", item[label == 0])
        for negative, positive in zip(negative_items, np.repeat(positive_items, 2), strict=True):
            assert negative != positive
        for i, c, raw_item in zip(item, table.column("category_id").to_pylist(),
                                  raw_values(schema, "item_id", item), strict=True):
            if i >= 2:  # an item in the vocabulary: its category's id
                assert c == category_id(category_of[raw_item])
        total += int(label.sum())
        for r, h, hc in zip(
            rows,
            table.column("history").to_pylist(),
            table.column("history_category").to_pylist(),
            strict=True,
        ):
            expected = brute_force_history(
                raw["user"], raw["time"], raw["item"], raw["user"][r], raw["time"][r], 8, clicked
            )
            assert h == [item_id(i) for i in expected]
            assert hc == [category_id(category_of[i]) for i in expected]
            assert 1 <= len(h) <= 8
    # a positive needs an earlier click of its own and, in the hour before, another user's click
    # of another item to draw negatives from
    has_pool = np.array(
        [
            ((raw["time"] < t) & (raw["time"] >= t - 3600) & clicked & (raw["user"] != u)
             & (raw["item"] != i)).any()
            for u, i, t in zip(raw["user"], raw["item"], raw["time"], strict=True)
        ]
    )
    assert total == int((clicked & earlier & has_pool).sum())
    assert total > 0.9 * int((clicked & earlier).sum())
    times = [t.column("timestamp").to_numpy() for t in tables.values()]
    assert times[0].max() <= times[1].min() and times[1].max() <= times[2].min()
    assert all(len(t) for t in times)


def test_taobao_split_files_split_exact_duplicate_clicks_and_count_short_histories(
    tmp_path, capsys
):
    raw = write_taobao(tmp_path / "UserBehavior.csv", n=300)
    clicks = np.nonzero(raw["behavior"] == "pv")[0]
    repeats = np.random.default_rng(3).choice(clicks, 30, replace=False)
    with open(tmp_path / "UserBehavior.csv", "a") as fh:  # exact copies of 30 click lines
        fh.writelines(
            f"{raw['user'][r]},{raw['item'][r]},{raw['category'][r]},pv,{raw['time'][r]}\n"
            for r in repeats
        )
    raw = {k: np.concatenate([v, v[repeats]]) for k, v in raw.items()}
    clicks = np.nonzero(raw["behavior"] == "pv")[0]
    code = np.random.default_rng(4).integers(0, 3, len(clicks))
    keys = [
        {"user_id": raw["user"][clicks[code == k]], "item_id": raw["item"][clicks[code == k]],
         "timestamp": raw["time"][clicks[code == k]]}
        for k in range(3)
    ]
    out = prepare("taobao", tmp_path, tmp_path / "out", negatives=1,
                  split_files=write_split_files(tmp_path / "s", keys))
    # brute force: a key's copies take its lines in file order; a positive needs an earlier click
    lines: dict[tuple, list[int]] = {}
    for k in range(3):
        for key in zip(keys[k]["user_id"], keys[k]["item_id"], keys[k]["timestamp"], strict=True):
            lines.setdefault(tuple(key), []).append(k)
    expected: list[set[int]] = [set(), set(), set()]
    short = 0
    for r in clicks:
        split = lines[(raw["user"][r], raw["item"][r], raw["time"][r])].pop(0)
        if ((raw["user"][clicks] == raw["user"][r]) & (raw["time"][clicks] < raw["time"][r])).any():
            expected[split].add(int(r))
        else:
            short += 1
    tables = read_splits(out)
    for split, rows in zip(SPLITS, expected, strict=True):
        positives = tables[split].filter(pc.equal(tables[split].column("label"), 1))
        assert sorted(positives.column("row").to_pylist()) == sorted(rows)
    err = capsys.readouterr().err
    assert f"taobao: {short} clicks named by split_files have fewer than min_history=1" in err
    distinct = len({(raw["user"][r], raw["item"][r], raw["time"][r]) for r in clicks})
    assert f"{len(clicks) - distinct} duplicate rows" in err and len(clicks) - distinct >= 30


def test_taobao_real_sample_parses(shared_data, tmp_path):
    # the sample's 50 lines are one user's: no other user's clicks to draw negatives from
    src = shared_data / "taobao-userbehavior" / "UserBehavior_sample.csv"
    out = prepare("taobao", src, tmp_path / "out", negatives=0)
    labels = np.concatenate([t.column("label").to_numpy() for t in read_splits(out).values()])
    clicks = [line for line in src.read_text().splitlines() if line.split(",")[3] == "pv"]
    assert len(labels) > 0 and (labels == 1).all() and len(labels) < len(clicks)


# --- KuaiRand -----------------------------------------------------------------------------------
def write_kuairand(root: Path, n: int = 500, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    user = rng.integers(0, 15, n)
    video = rng.integers(0, 25, n)
    time = 1_649_400_000_000 + rng.integers(0, 100, n) * 1000
    click, long_view, like = (rng.random((3, n)) < [[0.4], [0.3], [0.1]]).astype(int)
    # columns in another order than documented, with an extra one, over two files (read in name order)
    header = "tab,video_id,user_id,date,hourmin,time_ms,is_click,is_like,is_follow,long_view,extra,is_rand\n"
    lines = [
        f"{u % 3},{v},{u},20220408,1200,{t},{c},{lk},0,{lv},x,0\n"
        for u, v, t, c, lk, lv in zip(user, video, time, click, like, long_view, strict=True)
    ]
    (root / "log_random_4_22_to_5_08_pure.csv").write_text(header + "".join(lines[: n // 2]))
    (root / "log_standard_4_08_to_4_21_pure.csv").write_text(header + "".join(lines[n // 2 :]))
    user_columns = [
        "user_id",
        "user_active_degree",
        "is_lowactive_period",
        "is_live_streamer",
        "is_video_author",
        "follow_user_num",
        "follow_user_num_range",
        "fans_user_num",
        "fans_user_num_range",
        "friend_user_num",
        "friend_user_num_range",
        "register_days",
        "register_days_range",
        *(f"onehot_feat{i}" for i in range(18)),
    ]
    degrees = ["high_active", "full_active", "middle_active", "UNKNOWN"]
    user_rows = [
        [
            str(u),
            degrees[u % 4],
            "0",
            "1",
            str(u % 2),
            "5",
            '"(0,10]"',
            "312",
            '"[100,1k)"',
            "0",
            "0",
            "3624",
            "730+",
            *[str((u * k) % 5) if k != 3 else "" for k in range(18)],
        ]
        for u in range(15)
    ]
    (root / "user_features_pure.csv").write_text(
        ",".join(reversed(user_columns))
        + "\n"
        + "".join(",".join(reversed(r)) + "\n" for r in user_rows)
    )
    tags = ['"12,65"', "", "3", '"0,1,2"'] * 7
    video_header = "video_id,author_id,video_type,upload_dt,upload_type,visible_status,video_duration,server_width,server_height,music_id,music_type,tag\n"
    (root / "video_features_basic_pure.csv").write_text(
        video_header
        + "".join(
            f"{v},{v * 13 % 5},{'NORMAL' if v % 4 else 'AD'},2020-07-08,ShortImport,1,{'' if v == 3 else 1000 * v},720,1280,9,{v % 3},{tags[v]}\n"
            for v in range(25)
        )
    )
    return {
        "user": user,
        "video": video,
        "time": time,
        "click": click,
        "long_view": long_view,
        "like": like,
    }


def test_kuairand_has_three_labels_tags_and_a_clicked_history(tmp_path):
    raw = write_kuairand(tmp_path / "kr")
    out = prepare("kuairand", tmp_path / "kr", tmp_path / "out", max_history=6)
    schema = Schema.load(out)
    assert schema.labels == ["label_click", "label_long_view", "label_like"]
    assert schema.feature("history").table == "video_id"
    tables = read_splits(out)
    table = pa.concat_tables(tables.values())
    rows = table.column("row").to_numpy()
    assert sorted(rows) == list(range(len(raw["user"])))
    for label, source in (
        ("label_click", "click"),
        ("label_long_view", "long_view"),
        ("label_like", "like"),
    ):
        assert table.column(label).to_numpy().tolist() == raw[source][rows].tolist()
    raw_video = raw["video"][rows]
    expected_tags = {0: [13, 66], 1: [], 2: [4], 3: [1, 2, 3]}
    assert table.column("tag").to_pylist() == [expected_tags[v % 4] for v in raw_video]
    assert (table.column("video_duration").to_numpy()[raw_video == 3] == 0).all()
    video_id = vocabulary_of(raw["video"][tables["train"].column("row").to_numpy()])
    assert table.column("video_id").to_pylist() == [video_id(v) for v in raw_video]
    for r, h in zip(rows, table.column("history").to_pylist(), strict=True):
        expected = brute_force_history(
            raw["user"],
            raw["time"],
            raw["video"],
            raw["user"][r],
            raw["time"][r],
            6,
            raw["click"] == 1,
        )
        assert h == [video_id(v) for v in expected]
    times = [t.column("timestamp").to_numpy() for t in tables.values()]
    assert times[0].max() <= times[1].min() and times[1].max() <= times[2].min()


@pytest.mark.parametrize("variant", ["1k", "27k"])
def test_kuairand_reads_the_published_file_names_of_1k_and_27k(variant, tmp_path):
    # chongminggao/KuaiRand README: log_standard_4_08_to_4_21_1k.csv, user_features_1k.csv,
    # video_features_basic_1k.csv; 27K splits its logs into _27k_part1.csv, _27k_part2.csv
    write_kuairand(tmp_path / "pure")
    root = tmp_path / variant / "data"
    root.mkdir(parents=True)
    for path in (tmp_path / "pure").iterdir():
        name = path.name.replace("_pure.csv", f"_{variant}.csv")
        if variant == "27k" and name.startswith("log_standard"):
            name = name.replace(".csv", "_part1.csv")
        (root / name).write_bytes(path.read_bytes())
    (root / "log_random_4_22_to_5_08_pure.csv").write_text("not read")  # another release's
    expected = read_splits(prepare("kuairand", tmp_path / "pure", tmp_path / "out_pure"))
    got = read_splits(prepare("kuairand", tmp_path / variant, tmp_path / f"out_{variant}"))
    assert all(got[s].equals(expected[s]) for s in SPLITS)
    with pytest.raises(FileNotFoundError, match=r"no user_features_\{pure,1k,27k\}\.csv"):
        prepare("kuairand", tmp_path, tmp_path / "out_none")


def test_kuairand_missing_column_is_named(tmp_path):
    write_kuairand(tmp_path / "kr")
    path = tmp_path / "kr" / "video_features_basic_pure.csv"
    path.write_text(path.read_text().replace("tag\n", "tags\n", 1))
    with pytest.raises(ValueError, match=r"lacks columns \['tag'\]"):
        prepare("kuairand", tmp_path / "kr", tmp_path / "out")


# --- Avazu --------------------------------------------------------------------------------------
AVAZU_HEADER = (
    "id,click,hour,C1,banner_pos,site_id,site_domain,site_category,app_id,app_domain,app_category,"
    "device_id,device_ip,device_model,device_type,device_conn_type,C14,C15,C16,C17,C18,C19,C20,C21"
)


def avazu_csv(n: int, seed: int = 0) -> str:
    """`n` rows in Avazu's format: 20-digit ids (beyond int64), YYMMDDHH hours over 3 days, hex
    site ids from a small pool (some repeat, some appear once)."""
    rng = np.random.default_rng(seed)
    lines = [AVAZU_HEADER]
    for k in range(n):
        hour = f"1410{21 + k % 3:02d}{k * 7 % 24:02d}"
        site = f"{int(rng.zipf(1.5)) % 4096:08x}"
        lines.append(
            f"{10_000_000_000_000_000_000 + k},{int(rng.random() < 0.2)},{hour},1005,{k % 2},"
            f"{site},f3845767,28905ebd,ecad2386,7801e8d9,07d7df22,a99f214a,"
            f"{rng.integers(0, 1 << 32):08x},{['be6db1d7', '8a4875bd'][k % 2]},1,0,"
            f"{15700 + k % 5},320,50,{1722 + k % 3},0,35,{'' if k % 9 == 0 else 100084},79"
        )
    return "\n".join(lines) + "\n"


def test_avazu_hour_becomes_hour_of_day_and_weekday_and_ids_use_train_counts(tmp_path):
    (tmp_path / "train.csv").write_text(avazu_csv(300))
    out = prepare("avazu", tmp_path / "train.csv", tmp_path / "out", seed=2)
    tables = read_splits(out)
    schema = Schema.load(out)
    frame = pd.read_csv(tmp_path / "train.csv", dtype=str, keep_default_na=False)
    when = pd.to_datetime(frame["hour"], format="%y%m%d%H")
    train_rows = tables["train"].column("row").to_numpy()
    for split, table in tables.items():
        rows = table.column("row").to_numpy()
        assert table.column("hour_of_day").to_pylist() == (when.dt.hour.to_numpy()[rows] + 1).tolist()
        # pandas: Monday=0; 2014-10-21 was a Tuesday
        assert table.column("weekday").to_pylist() == (when.dt.dayofweek.to_numpy()[rows] + 1).tolist()
        assert table.column("label").to_pylist() == frame["click"].astype(float).to_numpy()[rows].tolist()
        for name in ("site_id", "device_ip", "C14", "C20"):
            raw = frame[name].to_numpy()
            expected_id = vocabulary_of(raw[train_rows][raw[train_rows] != ""])
            expected = [expected_id(v if v != "" else None) for v in raw[rows]]
            assert table.column(name).to_pylist() == expected, (split, name)
    assert schema.feature("device_ip").vocab_size == 2  # every ip is seen once: all OOV
    assert (tables["train"].column("C20").to_numpy() == 0).any()  # the empty field
    sizes = [t.num_rows for t in tables.values()]
    assert sizes == [240, 30, 30]


def test_avazu_split_files_by_row(tmp_path):
    (tmp_path / "train.csv").write_text(avazu_csv(20))
    parts = [np.arange(0, 12), np.arange(12, 16), np.arange(16, 20)]
    files = write_split_files(tmp_path / "s", [{"row": p} for p in parts])
    tables = read_splits(prepare("avazu", tmp_path, tmp_path / "out", split_files=files))
    assert [t.column("row").to_pylist() for t in tables.values()] == [p.tolist() for p in parts]


def test_avazu_through_the_cli_with_min_count(tmp_path):
    from recray.cli import main

    (tmp_path / "train.csv").write_text(avazu_csv(60))
    args = ["data", "prepare", "avazu", "--src", str(tmp_path / "train.csv")]
    assert main([*args, "--out", str(tmp_path / "a"), "--min-count", "1"]) == 0
    assert main([*args, "--out", str(tmp_path / "b"), "--min-count", "0"]) == 2
    train = read_splits(tmp_path / "a")["train"]
    ips = pd.read_csv(tmp_path / "train.csv", dtype=str)["device_ip"].to_numpy()
    # min_count 1 keeps every train value: each train row's ip has an id of its own
    assert sorted(train.column("device_ip").to_pylist()) == list(range(2, 2 + len(set(ips[train.column("row").to_numpy()]))))


def test_avazu_real_sample_parses(shared_data, tmp_path):
    src = shared_data / "avazu" / "train_sample.csv"
    tables = read_splits(prepare("avazu", src, tmp_path / "out"))
    frame = pd.read_csv(src, dtype=str)
    assert sum(t.num_rows for t in tables.values()) == len(frame) == 50
    train = tables["train"]
    clicks = frame["click"].astype(float).to_numpy()
    assert train.column("label").to_pylist() == clicks[train.column("row").to_numpy()].tolist()


# --- all loaders ----------------------------------------------------------------------------
def write_source(name: str, root: Path) -> Path:
    if name == "movielens-100k":
        write_movielens(root)
        return root
    if name == "criteo":
        root.mkdir()
        return write_criteo(root / "train.txt").parent
    if name == "avazu":
        root.mkdir()
        (root / "train.csv").write_text(avazu_csv(200))
        return root
    if name == "taobao":
        root.mkdir()
        write_taobao(root / "UserBehavior.csv")
        return root / "UserBehavior.csv"
    write_kuairand(root)
    return root


@pytest.mark.parametrize("name", sorted(LOADERS))
def test_every_loader_output_converts_to_a_batch_with_its_saved_schema(name, tmp_path):
    out = prepare(name, write_source(name, tmp_path / "src"), tmp_path / "out")
    schema = Schema.load(out)
    for split in SPLITS:
        table = pq.read_table(out / f"{split}.parquet")
        for batch in table.to_batches(max_chunksize=64):
            converted = to_batch(batch, schema, source=f"{name}/{split}")
            assert len(converted) == batch.num_rows
        assert table.schema.field(schema.labels[0]).type == pa.float32()
        for feature in schema.features:
            column_type = table.schema.field(feature.name).type
            assert column_type in (pa.float32(), pa.int64(), pa.list_(pa.int64()))


def test_unknown_data_set_and_missing_file_are_named(tmp_path):
    with pytest.raises(ValueError, match="'frappe'.*movielens-100k, criteo, taobao, kuairand, avazu"):
        prepare("frappe", tmp_path, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="train.csv"):
        prepare("avazu", tmp_path, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="u.data"):
        prepare("movielens-100k", tmp_path, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="train.txt"):
        prepare("criteo", tmp_path, tmp_path / "out")


# --- real files ---------------------------------------------------------------------------------
def test_real_movielens_100k_sizes_and_histories(shared_data, tmp_path):
    out = prepare("movielens-100k", shared_data / "movielens-100k", tmp_path / "out")
    tables = read_splits(out)
    sizes = {split: t.num_rows for split, t in tables.items()}
    print("movielens-100k rows per split:", sizes)
    assert sizes == {"train": 58_284, "valid": 7_286, "test": 7_285}  # 72,855 after dropping 3s
    assert sum(t.column("label").to_numpy().sum() for t in tables.values()) == 55_375  # 4s and 5s
    schema = Schema.load(out)
    for split in SPLITS:
        to_batch(tables[split], schema, source=split)

    raw = np.loadtxt(shared_data / "movielens-100k" / "u.data", dtype=np.int64)
    user, item, time = raw[:, 0], raw[:, 1], raw[:, 3]
    train = tables["train"]
    train_rows = train.column("row").to_numpy()
    # an independent count: pandas over the train rows' raw ids, kept if seen at least twice
    for name, values in (("user_id", user), ("item_id", item)):
        counts = pd.Series(values[train_rows]).value_counts()
        assert schema.feature(name).vocabulary == sorted(counts.index[counts >= 2].tolist())
        assert schema.feature(name).vocab_size == int((counts >= 2).sum()) + 2
        ids = train.column(name).to_numpy()
        assert (ids >= 2).all() == (counts.min() >= 2)  # train ids are never missing
    item_id = vocabulary_of(item[train_rows])
    lengths = np.diff(train.column("history").combine_chunks().offsets.to_numpy())
    assert lengths.max() == 50 and lengths.min() == 0
    for r in np.random.default_rng(0).choice(train.num_rows, 200, replace=False):
        row = train.slice(r, 1).to_pylist()[0]
        expected = brute_force_history(user, time, item, user[row["row"]], row["timestamp"], 50)
        assert row["history"] == [item_id(i) for i in expected]
        assert row["item_id"] == item_id(item[row["row"]])
