"""Streaming Parquet ingest: a Parquet file or folder read by record batches into compact arrays.

:func:`scan_parquet` reads a Parquet file, a folder of files (hive partitions such as
``day=2026-12-01/part-0.parquet`` included) or a ``pyarrow.dataset.Dataset`` one record batch
at a time (``pyarrow.dataset``), keeping only what training reads: dense user and item ids
(int32 while they fit), float32 rewards and propensities, and timestamps as sort keys. No
pandas DataFrame of the whole log is built, and columns training does not read (context
columns) are never decoded.

The unit of work is one row group of one file (:func:`parquet_parts`). ``rank`` /
``world_size`` select a contiguous run of those units, balanced by their row counts, so that
the ranks of distributed training each read their own share and the shares, in rank order,
are the log in its row order. Ids are read in two passes over the selected units: the
distinct ids of the id columns first (merged across ranks by ``merge_ids``), then every
column, each id looked up in the agreed :class:`~recmeta_sdk.data.IdMap` (sorted ids: dense
id ``i`` is the ``i``-th smallest external id, the order of a trained model's catalogue).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from ._ingest import ITEM, PROPENSITY, REWARD, TIMESTAMP, USER, IdMap

#: rows per record batch read by :func:`scan_parquet` (its working memory, besides the output)
BATCH_ROWS = 1 << 16



@dataclass
class LogArrays:
    """An interaction log (or one rank's share of it) as compact arrays in the log's row order.

    Attributes
    ----------
    users, items : (n,) int32 (int64 beyond 2**31 - 1 ids)
        Dense ids in ``user_map`` / ``item_map``.
    user_map, item_map : IdMap
        Sorted external ids (the maps agreed across ranks in a sharded read).
    timestamps : (n,) int64 or float64, or None
        Sort keys in time order: numbers as given, datetimes and parsed strings as integers
        in their unit (nanoseconds for strings); missing datetimes are the smallest int64
        (pandas' NaT), missing numbers NaN.
    rewards, propensities : (n,) float32 or None
    columns : tuple of str
        Every column of the log after renaming (read or not).
    row_start : int
        Index of this share's first row in the whole log (0 for a whole read).
    total_rows : int
        Rows of the whole log (every rank's share).
    parts : int
        Units (row groups) read.
    """

    users: np.ndarray
    items: np.ndarray
    user_map: IdMap
    item_map: IdMap
    timestamps: np.ndarray | None = None
    rewards: np.ndarray | None = None
    propensities: np.ndarray | None = None
    columns: tuple = ()
    row_start: int = 0
    total_rows: int = 0
    parts: int = 0

    def __len__(self) -> int:
        return len(self.users)

    def __repr__(self) -> str:
        fields = [k for k in ("timestamps", "rewards", "propensities") if getattr(self, k) is not None]
        return (f"LogArrays(n={len(self)}, users={len(self.user_map)}, items={len(self.item_map)}, "
                f"fields={fields}, rows {self.row_start}..{self.row_start + len(self)} of {self.total_rows})")

    @property
    def nbytes(self) -> int:
        """Bytes of the per-row arrays."""
        return int(sum(a.nbytes for a in (self.users, self.items, self.timestamps, self.rewards,
                                          self.propensities) if a is not None))


def _dataset(source: Any):
    import pyarrow.dataset as ds

    if isinstance(source, ds.Dataset):
        return source
    p = Path(source)
    if not p.exists():
        raise ValueError(f"interaction file not found: {p}")
    # (the same discovery as pandas.read_parquet: hive partitions, files in sorted order,
    # hidden and underscore files ignored)
    return ds.dataset(str(p), format="parquet", partitioning="hive")


@dataclass
class ParquetParts:
    """The units (row groups) of a Parquet dataset, in the log's row order, and one rank's run
    of them: ``fragments[i]`` holds ``rows[i]`` rows; the rank reads ``fragments[lo:hi]``,
    whose first row is row ``start`` of the log."""

    dataset: Any
    fragments: list
    rows: np.ndarray
    lo: int
    hi: int

    @property
    def start(self) -> int:
        return int(self.rows[:self.lo].sum())

    @property
    def total(self) -> int:
        return int(self.rows.sum())

    @property
    def mine(self) -> list:
        return self.fragments[self.lo:self.hi]

    @property
    def my_rows(self) -> int:
        return int(self.rows[self.lo:self.hi].sum())


def parquet_parts(source: Any, rank: int = 0, world_size: int = 1) -> ParquetParts:
    """Split a Parquet source into its row groups (files in the dataset's order, each file's row
    groups in order) and give rank ``rank`` of ``world_size`` a contiguous run of them: rank
    ``r`` starts at the first unit whose preceding rows reach ``r / world_size`` of the log
    (deterministic: every rank computes the same cut from the files' metadata). A rank may get
    no unit when there are fewer row groups than ranks.

    Raises
    ------
    ValueError
        If ``rank`` is not in ``[0, world_size)`` or the source has no file.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, (int, np.integer)) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
    dataset = _dataset(source)
    frags, rows = [], []
    for f in dataset.get_fragments():
        groups = f.split_by_row_group()
        if not groups:  # a file with no row group (no rows): nothing to read
            continue
        for g in groups:
            frags.append(g)
            rows.append(int(sum(rg.num_rows for rg in g.row_groups)))
    if not frags and not list(dataset.get_fragments()):
        raise ValueError(f"no Parquet file in {source}")
    rows_a = np.asarray(rows, np.int64)
    before = np.concatenate([[0], np.cumsum(rows_a)[:-1]]) if len(rows_a) else np.zeros(0, np.int64)
    total = int(rows_a.sum())

    def first(r: int) -> int:  # the first unit of rank r
        if r >= world_size:
            return len(frags)
        return int(np.searchsorted(before * world_size, r * total, side="left"))

    return ParquetParts(dataset, frags, rows_a, first(rank), first(rank + 1))


def _rename(schema_names: list, columns: Mapping[str, str] | None) -> dict:
    """{standard name: source name} of every column after ``columns`` renames."""
    if columns:
        missing = [c for c in columns if c not in schema_names]
        if missing:
            raise ValueError(f"columns to rename not found: {missing} (columns: {schema_names})")
    renamed = [dict(columns or {}).get(c, c) for c in schema_names]
    dup = sorted({c for c in renamed if renamed.count(c) > 1})
    if dup:
        raise ValueError(f"duplicate column names: {dup}")
    out = dict(zip(renamed, schema_names))
    for col in (USER, ITEM):
        if col not in out:
            raise ValueError(
                f"interactions lack the required column {col!r} (columns: {renamed}); "
                "pass columns={'your_name': %r} to rename" % col)
    return out


def _numpy(arr) -> np.ndarray:
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    return arr.to_numpy(zero_copy_only=False)


def _check_numeric(name: str, typ: pa.DataType) -> None:
    if pa.types.is_dictionary(typ):
        typ = typ.value_type
    if not (pa.types.is_integer(typ) or pa.types.is_floating(typ) or pa.types.is_boolean(typ)
            or pa.types.is_decimal(typ)):
        raise TypeError(f"column {name!r} must be numeric, got Arrow type {typ}")


def _ts_kind(typ: pa.DataType) -> str:
    if pa.types.is_dictionary(typ):
        typ = typ.value_type
    if pa.types.is_integer(typ) or pa.types.is_boolean(typ):
        return "int"
    if pa.types.is_floating(typ) or pa.types.is_decimal(typ):
        return "float"
    if pa.types.is_timestamp(typ) or pa.types.is_date(typ):
        return "time"
    if pa.types.is_string(typ) or pa.types.is_large_string(typ):
        return "str"
    raise TypeError(f"column 'timestamp' must be numeric or datetime (or parseable strings), got Arrow type {typ}")


def _ts_values(arr, kind: str) -> np.ndarray:
    """One batch's timestamps as int64 (``int``, ``time``, ``str``) or float64 (``float``; an
    integer batch with nulls)."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    if kind == "time":
        if pa.types.is_date(arr.type):
            arr = arr.cast(pa.timestamp("s"))
        ints = arr.cast(pa.int64())
        return ints.fill_null(np.iinfo(np.int64).min).to_numpy(zero_copy_only=False)
    if kind == "str":
        try:
            parsed = pd.to_datetime(pd.Series(_numpy(arr), dtype=object), utc=True, format="mixed")
        except (ValueError, TypeError) as exc:
            raise TypeError(f"column 'timestamp' must be numeric or datetime (or parseable strings): {exc}") from None
        return parsed.dt.as_unit("ns").to_numpy(dtype="datetime64[ns]").view(np.int64)
    if kind == "int" and arr.null_count == 0:
        return arr.cast(pa.int64()).to_numpy(zero_copy_only=False)
    return arr.cast(pa.float64()).to_numpy(zero_copy_only=False)


def _batches(parts: list, schema: pa.Schema, columns: list, batch_rows: int, memory_pool) -> Iterable:
    import pyarrow.dataset as ds

    for frag in parts:
        scanner = ds.Scanner.from_fragment(frag, schema=schema, columns=columns, batch_size=batch_rows,
                                           batch_readahead=1, use_threads=False, memory_pool=memory_pool)
        yield from scanner.to_batches()


def _distinct(values: list) -> np.ndarray:
    if not values:
        return np.zeros(0, np.int64)
    return np.asarray(pd.unique(np.concatenate(values)))


def scan_parquet(
    source: Any,
    *,
    columns: Mapping[str, str] | None = None,
    rank: int = 0,
    world_size: int = 1,
    extra_items: Any = None,
    merge_ids: Callable[[np.ndarray, np.ndarray], tuple] | None = None,
    batch_rows: int = BATCH_ROWS,
    memory_pool: Any = None,
) -> LogArrays:
    """Read a Parquet log (or one rank's share of it) by record batches into compact arrays.

    Parameters
    ----------
    source : path to a ``.parquet`` / ``.pq`` file, a folder of them (hive partitions
        allowed), or a ``pyarrow.dataset.Dataset``
    columns : mapping ``{name in the files: standard name}``, optional (as
        :func:`read_interactions`)
    rank, world_size : this reader's share (see :func:`parquet_parts`); default the whole log
    extra_items : array-like, optional
        Item ids that join the catalogue without interactions (a side-feature table's index).
    merge_ids : callable, optional
        ``merge_ids(users, items) -> (users, items)``: given this share's distinct user and
        item ids, the distinct ids of every share (distributed training all-gathers them);
        the maps are the sorted result, the same on every rank.
    batch_rows : rows per record batch
    memory_pool : a ``pyarrow.MemoryPool`` for the reads (default Arrow's default pool)

    Returns
    -------
    LogArrays

    Raises
    ------
    ValueError
        A required column missing (after renaming), a missing user or item id (naming the
        column and the row), no file, a bad rank.
    TypeError
        A non-numeric ``reward`` / ``propensity`` column, an unparseable ``timestamp``.
    """
    if isinstance(batch_rows, bool) or not isinstance(batch_rows, (int, np.integer)) or batch_rows < 1:
        raise ValueError(f"batch_rows must be a positive int, got {batch_rows!r}")
    parts = parquet_parts(source, rank, world_size)
    schema = parts.dataset.schema
    names = _rename(list(schema.names), columns)
    for col in (REWARD, PROPENSITY):
        if col in names:
            _check_numeric(col, schema.field(names[col]).type)
    ts_kind = _ts_kind(schema.field(names[TIMESTAMP]).type) if TIMESTAMP in names else None
    mine = parts.mine

    # pass 1: the distinct ids of this share (only the id columns are decoded); each batch's
    # distinct ids wait in a list merged into the distinct ids so far once they outnumber them
    ids = {USER: [], ITEM: []}
    seen = {USER: 0, ITEM: 0}  # ids in the list (the merged distinct ids first)
    row = parts.start
    for batch in _batches(mine, schema, [names[USER], names[ITEM]], batch_rows, memory_pool):
        for col in (USER, ITEM):
            arr = batch.column(batch.schema.get_field_index(names[col]))
            if arr.null_count:
                bad = int(np.flatnonzero(_numpy(arr.is_null()))[0])
                raise ValueError(f"interactions has missing user or item ids: column {names[col]!r} is "
                                 f"null at row {row + bad}")
            uniq = _numpy(pc.unique(arr))
            ids[col].append(uniq)
            seen[col] += len(uniq)
            if seen[col] > 2 * max(len(ids[col][0]), 1 << 16):
                ids[col] = [_distinct(ids[col])]
                seen[col] = len(ids[col][0])
        row += batch.num_rows
    users_d, items_d = _distinct(ids[USER]), _distinct(ids[ITEM])
    del ids
    if merge_ids is not None:
        users_d, items_d = merge_ids(users_d, items_d)
    if extra_items is not None:
        items_d = np.asarray(pd.unique(np.concatenate([np.asarray(items_d), np.asarray(extra_items)])))
    user_map, item_map = IdMap.fit_sorted(users_d), IdMap.fit_sorted(items_d)
    del users_d, items_d

    # pass 2: every column training reads, ids looked up in the maps
    n = parts.my_rows
    code_t = np.int32 if max(len(user_map), len(item_map)) < 2**31 - 1 else np.int64
    users = np.empty(n, code_t)
    items = np.empty(n, code_t)
    rewards = np.empty(n, np.float32) if REWARD in names else None
    props = np.empty(n, np.float32) if PROPENSITY in names else None
    ts = None
    if ts_kind is not None:
        ts = np.empty(n, np.float64 if ts_kind == "float" else np.int64)
    read = [names[c] for c in (USER, ITEM, TIMESTAMP, REWARD, PROPENSITY) if c in names]
    pos = 0
    for batch in _batches(mine, schema, read, batch_rows, memory_pool):
        m = batch.num_rows
        if pos + m > n:
            raise ValueError(f"the Parquet files changed while being read ({pos + m} rows, metadata said {n})")
        cols = {c: batch.column(batch.schema.get_field_index(names[c])) for c in names if names[c] in read}
        u = user_map.to_index(_numpy(cols[USER]))
        i = item_map.to_index(_numpy(cols[ITEM]))
        if (u < 0).any() or (i < 0).any():  # (only if the files changed between the passes)
            raise ValueError("the Parquet files changed while being read (an id unseen in the first pass)")
        users[pos:pos + m] = u
        items[pos:pos + m] = i
        if rewards is not None:
            rewards[pos:pos + m] = _numpy(cols[REWARD].cast(pa.float64()) if pa.types.is_decimal(
                cols[REWARD].type) else cols[REWARD]).astype(np.float32)
        if props is not None:
            props[pos:pos + m] = _numpy(cols[PROPENSITY].cast(pa.float64()) if pa.types.is_decimal(
                cols[PROPENSITY].type) else cols[PROPENSITY]).astype(np.float32)
        if ts is not None:
            v = _ts_values(cols[TIMESTAMP], ts_kind)
            if v.dtype != ts.dtype:  # an integer column with nulls: NaN where missing, as pandas reads it
                ts = ts.astype(np.float64)
            ts[pos:pos + m] = v
        pos += m
    if pos != n:
        raise ValueError(f"the Parquet files changed while being read ({pos} rows, metadata said {n})")
    return LogArrays(users, items, user_map, item_map, ts, rewards, props, columns=tuple(names),
                     row_start=parts.start, total_rows=parts.total, parts=len(mine))
