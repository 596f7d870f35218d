"""Shared parts of the raw-format loaders: id encoding, histories, splits, Parquet + schema output."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
from tqdm import tqdm

from recray.data import SPLITS
from recray.data.jagged import check_columns
from recray.data.loaders.vocab import ValueCounts, frequent_values, vocabulary_ids
from recray.data.schema import Schema

DROPPED = -1  # split code of a row that goes to no split
SPLIT_KEYS = ("user_id", "item_id", "timestamp")  # how BARS/RecBole split files name a row
ROW_KEY = "row"  # 0-based line number in the interaction log, for data without those keys
WRITE_ROWS = 1_000_000  # rows per Parquet row group when a loader writes a table it holds whole


def need_file(path: Path, data_set: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{data_set}: file not found: {path}")
    return path


def csv_chunks(
    path: Path,
    read_options: pcsv.ReadOptions,
    parse_options: pcsv.ParseOptions,
    convert_options: pcsv.ConvertOptions,
) -> Iterator[pa.Table]:
    """The CSV file as tables of about `read_options.block_size` bytes each, read as they come."""
    with pcsv.open_csv(path, read_options=read_options, parse_options=parse_options,
                       convert_options=convert_options) as reader:
        for batch in reader:
            yield pa.Table.from_batches([batch])


def encode(values: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, int]:
    """Values -> dense ids 1..n in sorted value order, 0 for null; returns (ids, vocab_size n+1)."""
    vocab = pc.unique(values.drop_null())
    vocab = vocab.take(pc.sort_indices(vocab))
    ids = pc.fill_null(pc.index_in(values, value_set=vocab), -1)
    return _to_numpy(ids).astype(np.int64) + 1, len(vocab) + 1


def lookup(
    key_ids: np.ndarray, values: np.ndarray, vocab_size: int, query_ids: np.ndarray
) -> np.ndarray:
    """`values[i]` belongs to key `key_ids[i]`; return the value of each query key, 0 where absent."""
    table = np.zeros(vocab_size, dtype=values.dtype)
    table[key_ids] = values
    return table[query_ids]


def take_lists(
    key_ids: np.ndarray, lists: pa.ListArray, vocab_size: int, query_ids: np.ndarray
) -> pa.Array:
    """Like `lookup` for a list column: the list of each query key, empty where absent."""
    row_of_key = np.full(vocab_size, len(lists), dtype=np.int64)  # points at an appended empty list
    row_of_key[key_ids] = np.arange(len(lists))
    padded = pa.concat_arrays([lists, pa.array([[]], type=lists.type)])
    return padded.take(pa.array(row_of_key[query_ids]))


def list_array(offsets: np.ndarray, values: np.ndarray) -> pa.ListArray:
    if offsets[-1] > np.iinfo(np.int32).max:
        raise ValueError(
            f"a list column would hold {offsets[-1]} values, more than list<int64> offsets can "
            "address; lower max_history or prepare the data in parts"
        )
    return pa.ListArray.from_arrays(
        pa.array(offsets.astype(np.int32)), pa.array(values.astype(np.int64))
    )


def split_int_lists(
    strings: pa.Array | pa.ChunkedArray, sep: str = ",", shift: int = 0
) -> pa.ListArray:
    """'12,65' -> [12 + shift, 65 + shift]; an empty or null string -> []."""
    strings = pc.fill_null(strings, "")
    if isinstance(strings, pa.ChunkedArray):
        strings = strings.combine_chunks()
    parts = pc.split_pattern(strings, sep)
    tokens = pc.utf8_trim_whitespace(parts.flatten())
    keep = pc.not_equal(pc.utf8_length(tokens), 0)
    values = _to_numpy(tokens.filter(keep).cast(pa.int64())) + shift
    rows = _to_numpy(pc.list_parent_indices(parts).filter(keep))
    offsets = np.zeros(len(strings) + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=len(strings)), out=offsets[1:])
    return list_array(offsets, values)


def history(
    event_user: np.ndarray,
    event_time: np.ndarray,
    query_user: np.ndarray,
    query_time: np.ndarray,
    max_len: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Each query's last `max_len` events of the same user strictly before its time, oldest first.

    Returns (offsets [n_queries + 1], event indices): query q's history is
    `events[indices[offsets[q]:offsets[q + 1]]]`. Events are sorted by one combined (user, time)
    key, so a query's history ends where its own key would be inserted on the left: every event
    of that user at the same or a later time lies after it. Ties in time keep the event order.
    """
    _, user_rank = np.unique(np.concatenate([event_user, query_user]), return_inverse=True)
    _, time_rank = np.unique(np.concatenate([event_time, query_time]), return_inverse=True)
    key = user_rank.astype(np.int64) * (int(time_rank.max(initial=0)) + 1) + time_rank
    event_key, query_key = key[: len(event_user)], key[len(event_user) :]
    order = np.argsort(event_key, kind="stable")
    sorted_key = event_key[order]
    end = np.searchsorted(sorted_key, query_key, side="left")
    user_start = np.searchsorted(sorted_key, query_key - time_rank[len(event_user) :], side="left")
    start = np.maximum(user_start, end - max_len)
    lengths = end - start
    offsets = np.zeros(len(query_user) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    within = np.arange(offsets[-1]) - np.repeat(offsets[:-1], lengths)
    return offsets, order[np.repeat(start, lengths) + within]


def random_split(
    n: int, seed: int, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
) -> np.ndarray:
    """Split code (0 train, 1 valid, 2 test) per row, split sizes exactly as rounded fractions."""
    cuts = np.round(np.cumsum(fractions)[:2] * n).astype(np.int64)
    codes = np.empty(n, dtype=np.int8)
    codes[np.random.default_rng(seed).permutation(n)] = np.repeat([0, 1, 2], np.diff([0, *cuts, n]))
    return codes


def time_split(timestamps: np.ndarray, fractions: tuple[float, float] = (0.8, 0.9)) -> np.ndarray:
    """Split code per row by global time quantiles: train earliest, no time shared across splits."""
    if len(timestamps) == 0:
        return np.zeros(0, dtype=np.int8)
    bounds = np.quantile(timestamps, fractions, method="lower")
    return np.searchsorted(bounds, timestamps, side="left").astype(np.int8)


def fixed_split(
    split_files: Sequence[str | Path], keys: pa.Table, allow_partial: bool = False
) -> np.ndarray:
    """Split code per data row as named by [train, valid, test] CSV files, one line per row.

    A file names rows by `user_id,item_id,timestamp` columns or by a `row` column (0-based line
    number in the interaction log); `keys` holds the data's values of whichever it has. Rows
    repeating a key (exact duplicates) are taken in order of occurrence by the lines naming that
    key, in file order (train, valid, test): a key named twice in train and once in test puts its
    first two rows in train and its third in test. A key named more often than the data holds it
    is an error; so are rows named in no file, unless `allow_partial` (they are then DROPPED).
    Prints the counts of assigned, duplicate and unassigned rows.
    """
    if len(split_files) != len(SPLITS):
        raise ValueError(
            f"split_files: expected {len(SPLITS)} files (train, valid, test), got {len(split_files)}"
        )
    paths = [need_file(Path(path), "split_files") for path in split_files]
    tables = [pcsv.read_csv(path) for path in paths]
    ons = [
        _split_key_columns(path, table.column_names, keys.column_names)
        for path, table in zip(paths, tables, strict=True)
    ]
    on = ons[0]
    if any(other != on for other in ons):
        raise ValueError(f"split_files: the files name rows by different columns: {ons}")
    named = pa.concat_tables(
        [
            t.select(on)
            .cast(pa.schema([(c, pa.int64()) for c in on]))
            .append_column("_code", pa.array(np.full(t.num_rows, code, dtype=np.int8)))
            for code, t in enumerate(tables)
        ]
    )
    named = named.append_column("_line", pa.array(np.arange(named.num_rows)))

    # rows with equal keys side by side, in order of occurrence (lexsort is stable)
    columns = [_to_numpy(keys.column(c)) for c in on]
    order = np.lexsort(columns[::-1])
    ordered = [c[order] for c in columns]
    new_key = np.zeros(len(order), dtype=bool)
    new_key[:1] = True
    for c in ordered:
        new_key[1:] |= c[1:] != c[:-1]
    first = np.flatnonzero(new_key)
    occurrences = np.diff(np.append(first, len(order)))
    distinct = pa.table({c: col[first] for c, col in zip(on, ordered, strict=True)}).append_column(
        "_key", pa.array(np.arange(len(first)))
    )
    joined = named.join(distinct, keys=on, join_type="left outer").sort_by("_line")
    for code, (path, table) in enumerate(zip(paths, tables, strict=True)):
        in_file = joined.filter(pc.equal(joined.column("_code"), code))
        if in_file.column("_key").null_count:
            raise ValueError(
                f"split file {path}: {in_file.column('_key').null_count} of {table.num_rows} rows "
                f"not found in the data (matched on {', '.join(on)})"
            )
    line_key = _to_numpy(joined.column("_key"))
    line_code = _to_numpy(joined.column("_code"))
    by_key = np.argsort(line_key, kind="stable")  # lines of one key in file order
    line_key, line_code = line_key[by_key], line_code[by_key]
    key_start = np.searchsorted(line_key, line_key, side="left")
    rank = np.arange(len(line_key)) - key_start  # this line names the key's rank-th occurrence
    over = rank >= occurrences[line_key]
    if over.any():
        key = int(line_key[np.argmax(over)])
        raise ValueError(
            f"split_files: {len(np.unique(line_key[over]))} keys are named more often than the "
            f"data holds them, e.g. {_describe(distinct, key, on)} is named "
            f"{int((line_key == key).sum())} times and occurs {int(occurrences[key])} times"
        )
    codes = np.full(keys.num_rows, DROPPED, dtype=np.int8)
    codes[order[first[line_key] + rank]] = line_code

    assigned = np.bincount(codes[codes != DROPPED], minlength=len(SPLITS))
    unassigned = int((codes == DROPPED).sum())
    print(
        "split_files: "
        + ", ".join(f"{split} {int(n)}" for split, n in zip(SPLITS, assigned, strict=True))
        + f" rows assigned; {len(order) - len(first)} duplicate rows (repeating an earlier row's "
        f"{', '.join(on)}); {unassigned} unassigned",
        file=sys.stderr,
    )
    if unassigned and not allow_partial:
        row = int(np.argmax(codes == DROPPED))
        raise ValueError(
            f"split_files: {unassigned} of {keys.num_rows} data rows are named in no file, e.g. "
            f"{', '.join(f'{c}={columns[i][row]}' for i, c in enumerate(on))}; pass "
            "--allow-partial-split (allow_partial_split=True) to drop them"
        )
    return codes


def _describe(table: pa.Table, index: int, columns: list[str]) -> str:
    return ", ".join(f"{c}={table.column(c)[index].as_py()}" for c in columns)


def _split_key_columns(path: Path, columns: list[str], available: list[str]) -> list[str]:
    for on in (list(SPLIT_KEYS), [ROW_KEY]):
        if set(on) <= set(columns) and set(on) <= set(available):
            return on
    accepted = " or ".join(
        repr(",".join(on)) for on in (SPLIT_KEYS, [ROW_KEY]) if set(on) <= set(available)
    )
    raise ValueError(f"split file {path}: columns {columns}, expected {accepted}")


def with_vocabularies(
    table: pa.Table, codes: np.ndarray, names: Sequence[str], min_count: int,
    shared: dict[str, str] | None = None,
) -> tuple[pa.Table, dict[str, pa.Array]]:
    """Re-encode raw id columns `names` through vocabularies of their train values (split code 0)
    seen at least `min_count` times; each `shared` list column (-> one of `names`) through its
    table's vocabulary. Returns the table and the vocabularies."""
    train = pa.array(codes == 0)
    vocab = {}
    for name in names:
        counts = ValueCounts()
        counts.add(table.column(name).filter(train))
        vocab[name] = frequent_values(counts.table(), min_count)
        table = table.set_column(table.schema.get_field_index(name), name,
                                 pa.array(vocabulary_ids(vocab[name], table.column(name))))
    for name, owner in (shared or {}).items():
        lists = table.column(name).combine_chunks()
        ids = vocabulary_ids(vocab[owner], lists.flatten())
        offsets = lists.offsets.to_numpy()
        table = table.set_column(table.schema.get_field_index(name), name,
                                 list_array(offsets - offsets[0], ids))
    return table, vocab


def split_codes(
    keys: pa.Table,
    split_files: Sequence[str | Path] | None,
    default: np.ndarray,
    allow_partial: bool = False,
) -> np.ndarray:
    return default if split_files is None else fixed_split(split_files, keys, allow_partial)


class SplitWriter:
    """`train/valid/test.parquet` written chunk by chunk (one row group per split per chunk), then
    `schema.yaml`: a loader holds one chunk at a time, never the whole data set.

    Columns are cast to the data model's types; columns beyond the schema (`timestamp`, `row`)
    are kept for time-aware evaluation and for checking splits.
    """

    def __init__(self, out: str | Path, schema: Schema) -> None:
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.schema = schema
        self._writers: list[pq.ParquetWriter] = []
        self.rows = np.zeros(len(SPLITS), dtype=np.int64)

    def write(self, table: pa.Table, codes: np.ndarray) -> None:
        """Rows with split code 0/1/2 go to train/valid/test; DROPPED rows nowhere."""
        table = _as_stored(table, self.schema, str(self.out))
        if not self._writers:
            self._writers = [
                pq.ParquetWriter(self.out / f"{split}.parquet", table.schema) for split in SPLITS
            ]
        for code, writer in enumerate(self._writers):
            part = table.filter(pa.array(codes == code))
            if part.num_rows:
                writer.write_table(part)
                self.rows[code] += part.num_rows

    def close(self) -> Path:
        if not self._writers:
            raise ValueError(f"{self.out}: no rows were written")
        for writer in self._writers:
            writer.close()
        self.schema.save(self.out)
        return self.out


def write_dataset(out: str | Path, schema: Schema, table: pa.Table, codes: np.ndarray) -> Path:
    """Write `train/valid/test.parquet` (split code 0/1/2) and `schema.yaml` into `out`."""
    writer = SplitWriter(out, schema)
    for start in tqdm(range(0, max(table.num_rows, 1), WRITE_ROWS), desc=f"writing {out}",
                      unit="chunk"):
        writer.write(table.slice(start, WRITE_ROWS), codes[start : start + WRITE_ROWS])
    return writer.close()


def _as_stored(table: pa.Table, schema: Schema, source: str) -> pa.Table:
    names = [f.name for f in schema.features] + list(schema.labels)
    extras = [c for c in table.column_names if c not in names]
    table = table.select(names + extras)
    table = table.cast(
        pa.schema(
            [
                pa.field(c, _storage_type(schema, c, table.schema.field(c).type))
                for c in table.column_names
            ]
        )
    )
    check_columns(table.schema, schema, source=source)
    return table


def _storage_type(schema: Schema, column: str, current: pa.DataType) -> pa.DataType:
    if column in schema.labels:
        return pa.float32()
    kinds = {f.name: f.kind for f in schema.features}
    if kinds.get(column) == "dense":
        return pa.float32()
    if kinds.get(column) == "sequence" or pa.types.is_list(current):
        return pa.list_(pa.int64())
    return pa.int64()


def _to_numpy(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    return np.asarray(
        values.to_numpy(zero_copy_only=False) if isinstance(values, pa.Array) else values.to_numpy()
    )
