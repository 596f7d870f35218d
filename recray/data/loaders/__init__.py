"""Raw public data sets -> train/valid/test Parquet files in the shared data model, plus schema.yaml."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from recray.data.loaders.avazu import prepare_avazu
from recray.data.loaders.criteo import prepare_criteo
from recray.data.loaders.kuairand import prepare_kuairand
from recray.data.loaders.movielens import prepare_movielens
from recray.data.loaders.taobao import prepare_taobao

LOADERS: dict[str, Callable[..., Path]] = {
    "movielens-100k": prepare_movielens,
    "criteo": prepare_criteo,
    "taobao": prepare_taobao,
    "kuairand": prepare_kuairand,
    "avazu": prepare_avazu,
}


def prepare(
    name: str,
    src: str | Path,
    out: str | Path,
    *,
    split_files: Sequence[Path] | None = None,
    allow_partial_split: bool = False,
    seed: int = 0,
    **options: object,
) -> Path:
    """Convert data set `name` from its raw files at `src` into `out`; returns `out`.

    `out` gets `train.parquet`, `valid.parquet`, `test.parquet` and `schema.yaml`. `split_files`
    ([train, valid, test] CSVs naming rows by `user_id,item_id,timestamp` or by `row`, one line
    per row) replaces the data set's own split; rows they leave unnamed are an error unless
    `allow_partial_split` drops them. `options` are the loader's keyword arguments
    (`max_history`, `min_count`, ...).
    """
    if name not in LOADERS:
        raise ValueError(f"unknown data set {name!r}; available: {', '.join(LOADERS)}")
    return LOADERS[name](
        src,
        out,
        split_files=split_files,
        allow_partial_split=allow_partial_split,
        seed=seed,
        **options,
    )


__all__ = ["LOADERS", "prepare"]
