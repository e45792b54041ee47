"""Ingest interaction logs and map external ids to dense integer ids."""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

logger = logging.getLogger("recmeta")

#: Dense id returned for an external id that an :class:`IdMap` does not know (cold start).
UNKNOWN: int = -1

#: Column names with a fixed meaning in an interaction log.
USER, ITEM, TIMESTAMP, REWARD, PROPENSITY, POSITION = (
    "user",
    "item",
    "timestamp",
    "reward",
    "propensity",
    "position",
)
REQUIRED_COLUMNS: tuple[str, ...] = (USER, ITEM)
OPTIONAL_COLUMNS: tuple[str, ...] = (TIMESTAMP, REWARD, PROPENSITY, POSITION)
_NUMERIC_OPTIONAL = (REWARD, PROPENSITY, POSITION)

InteractionsLike = pd.DataFrame | pa.Table | Mapping[str, Any] | str | os.PathLike


def read_interactions(
    source: InteractionsLike,
    *,
    columns: Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """Read an interaction log into a pandas DataFrame with the standard column names.

    Parameters
    ----------
    source : DataFrame, pyarrow.Table, mapping of column name to 1-D array, or path
        The log. A path must end in ``.csv``, ``.tsv``, ``.parquet`` or ``.pq``, or be a
        folder of Parquet files (hive partitions allowed). Every
        source needs the columns ``user`` and ``item``; ``timestamp``, ``reward``,
        ``propensity`` and ``position`` are optional and any other column is kept as a
        context column.
    columns : mapping, optional
        Renames applied first, ``{name in source: standard name}``, e.g.
        ``{"user_id": "user", "rating": "reward"}``.

    Returns
    -------
    DataFrame
        (n, c) log. A DataFrame given as ``source`` is not modified (a renamed shallow
        copy is returned); ``timestamp`` given as strings is parsed to ``datetime64``.

    Raises
    ------
    TypeError
        If ``source`` has an unsupported type or a numeric column (``reward``,
        ``propensity``, ``position``) is not numeric, or a timestamp cannot be parsed.
    ValueError
        If a required column is missing, a path has an unknown suffix, or arrays in a
        mapping differ in length.
    """
    if isinstance(source, pd.DataFrame):
        df = source
    elif isinstance(source, pa.Table):
        df = source.to_pandas()
    elif isinstance(source, (str, os.PathLike)):
        df = _read_path(Path(source))
    elif isinstance(source, Mapping):
        lengths = {str(k): len(np.asarray(v)) if np.ndim(v) else -1 for k, v in source.items()}
        if len(set(lengths.values())) > 1 or -1 in lengths.values():
            raise ValueError(f"interaction arrays must be 1-D and of equal length, got lengths {lengths}")
        df = pd.DataFrame({k: np.asarray(v) if not isinstance(v, (pd.Series, pd.api.extensions.ExtensionArray)) else v
                           for k, v in source.items()})
    else:
        raise TypeError(
            "interactions must be a pandas DataFrame, a pyarrow Table, a dict of arrays or a "
            f"CSV/Parquet path, got {type(source).__name__}"
        )
    if columns:
        missing = [c for c in columns if c not in df.columns]
        if missing:
            raise ValueError(f"columns to rename not found: {missing} (columns: {list(df.columns)})")
        df = df.rename(columns=dict(columns))
    else:
        df = df.copy(deep=False)
    for col in REQUIRED_COLUMNS:
        if col not in df.columns:
            raise ValueError(
                f"interactions lack the required column {col!r} (columns: {list(df.columns)}); "
                "pass columns={'your_name': %r} to rename" % col
            )
    if df.columns.duplicated().any():
        raise ValueError(f"duplicate column names: {list(df.columns[df.columns.duplicated()])}")
    for col in _NUMERIC_OPTIONAL:
        if col in df.columns and not (
            pd.api.types.is_numeric_dtype(df[col]) and not pd.api.types.is_bool_dtype(df[col])
        ):
            if pd.api.types.is_bool_dtype(df[col]):
                df[col] = df[col].astype(np.float64)
            else:
                raise TypeError(f"column {col!r} must be numeric, got dtype {df[col].dtype}")
    if TIMESTAMP in df.columns:
        df[TIMESTAMP] = _coerce_timestamp(df[TIMESTAMP])
    return df


_PARQUET_SUFFIXES = (".parquet", ".pq")


def is_parquet_source(source: Any) -> bool:
    """True for a Parquet ``pyarrow.dataset.FileSystemDataset``, a path ending in ``.parquet`` /
    ``.pq``, or a folder holding such files (at any depth, e.g. hive partitions)."""
    try:
        import pyarrow.dataset as ds
    except ImportError:  # pragma: no cover
        return False
    if isinstance(source, ds.Dataset):  # files on a file system, in Parquet (not an in-memory dataset)
        return isinstance(source, ds.FileSystemDataset) and isinstance(source.format, ds.ParquetFileFormat)
    if not isinstance(source, (str, os.PathLike)):
        return False
    p = Path(source)
    if p.suffix.lower() in _PARQUET_SUFFIXES:
        return True
    if p.is_dir():
        return any(f.suffix.lower() in _PARQUET_SUFFIXES for f in p.rglob("*") if f.is_file())
    return False


def _read_path(path: Path) -> pd.DataFrame:
    if path.is_dir():  # a folder of Parquet files (hive partitions allowed)
        if not is_parquet_source(path):
            raise ValueError(f"folder {path} holds no .parquet / .pq file")
        return pd.read_parquet(path)
    suffix = path.suffix.lower()
    if suffix not in (".parquet", ".pq", ".csv", ".tsv"):
        raise ValueError(f"unknown interaction file type {suffix!r} for {path}: use .csv, .tsv, .parquet or .pq")
    if not path.exists():
        raise ValueError(f"interaction file not found: {path}")
    if suffix in (".parquet", ".pq"):
        return pd.read_parquet(path)
    if suffix in (".csv", ".tsv"):
        sep = "\t" if suffix == ".tsv" else ","
        try:
            import pyarrow.csv as pacsv

            table = pacsv.read_csv(path, parse_options=pacsv.ParseOptions(delimiter=sep))
            return table.to_pandas()
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:  # fall back to pandas' parser
            logger.debug("pyarrow CSV reader failed on %s (%s); using pandas", path, exc)
            return pd.read_csv(path, sep=sep)


def _coerce_timestamp(ts: pd.Series) -> pd.Series:
    if pd.api.types.is_datetime64_any_dtype(ts) or (
        pd.api.types.is_numeric_dtype(ts) and not pd.api.types.is_bool_dtype(ts)
    ):
        return ts
    try:
        return pd.to_datetime(ts, utc=True, format="mixed")
    except (ValueError, TypeError) as exc:
        raise TypeError(
            f"column 'timestamp' must be numeric or datetime (or parseable strings), got dtype {ts.dtype}: {exc}"
        ) from None


def timestamp_array(ts: pd.Series) -> np.ndarray:
    """Timestamps as a float64 array, ordered like the originals.

    Parameters
    ----------
    ts : Series
        (n,) numeric or ``datetime64`` timestamps.

    Returns
    -------
    ndarray
        (n,) float64; datetimes become seconds since the Unix epoch (microsecond
        resolution is kept), numbers are passed through. Missing values are NaN.
    """
    if pd.api.types.is_datetime64_any_dtype(ts):
        values = ts.to_numpy(dtype="datetime64[ns]", na_value=np.datetime64("NaT"))
        out = values.view(np.int64).astype(np.float64) / 1e9
        out[np.isnat(values)] = np.nan
        return out
    return ts.to_numpy(dtype=np.float64, na_value=np.nan)


class IdMap:
    """A two-way map between external ids and dense ids ``0 .. n-1``.

    Dense ids follow the order of first appearance of the ids given to :meth:`fit` (as
    RecBole does). Lookups of unknown external ids return :data:`UNKNOWN` (-1): the
    caller routes those to the cold-start path.

    Parameters
    ----------
    ids : array-like
        (n,) distinct external ids; the position of each is its dense id.

    Raises
    ------
    ValueError
        If ``ids`` contains duplicates or missing values.
    """

    def __init__(self, ids: Iterable[Any]):
        index = pd.Index(ids)
        if isinstance(index, pd.CategoricalIndex):  # e.g. dictionary-encoded Arrow columns
            index = pd.Index(index.astype(index.categories.dtype))
        if index.hasnans:
            raise ValueError("external ids must not contain missing values")
        if not index.is_unique:
            dup = index[index.duplicated()][:5].tolist()
            raise ValueError(f"external ids must be unique, duplicates include {dup}")
        self._index = index

    @classmethod
    def fit(cls, values: Any) -> IdMap:
        """Build a map from the distinct values in ``values``, in order of first appearance.

        Parameters
        ----------
        values : array-like
            (n,) external ids, repeats allowed, no missing values.
        """
        return cls(pd.Index(pd.unique(_as_1d(values))))

    @classmethod
    def fit_sorted(cls, values: Any) -> IdMap:
        """Build a map from the distinct values in ``values``, in sorted order (the order the
        trained model's catalogue and user list use: dense id ``i`` is the ``i``-th smallest id).

        Parameters
        ----------
        values : array-like
            (n,) external ids, repeats allowed, no missing values, of one sortable type.
        """
        return cls(np.sort(np.asarray(pd.unique(_as_1d(values)))))

    @classmethod
    def fit_transform(cls, values: Any) -> tuple[IdMap, np.ndarray]:
        """Fit a map and return it with the dense ids of ``values``.

        Returns
        -------
        tuple
            ``(id_map, dense)`` with ``dense`` a (n,) int64 array.
        """
        codes, uniques = pd.factorize(_as_1d(values), use_na_sentinel=True)
        if (codes < 0).any():
            raise ValueError("external ids must not contain missing values")
        return cls(pd.Index(uniques)), codes.astype(np.int64, copy=False)

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, external_id: Any) -> bool:
        try:
            return external_id in self._index
        except TypeError:
            return False

    def __eq__(self, other: object) -> bool:
        return isinstance(other, IdMap) and self._index.equals(other._index) and (
            self._kind() == other._kind()
        )

    def __repr__(self) -> str:
        head = ", ".join(repr(x) for x in self._index[:3].tolist())
        return f"IdMap(n={len(self)}, ids=[{head}{', ...' if len(self) > 3 else ''}])"

    @property
    def ids(self) -> np.ndarray:
        """(n,) external ids in dense-id order."""
        return self._index.to_numpy()

    @property
    def index(self) -> pd.Index:
        """The external ids as a pandas ``Index`` (position = dense id); do not modify it."""
        return self._index

    def position(self, external_id: Any) -> int:
        """The dense id of one external id, :data:`UNKNOWN` (-1) if it is not in the map.

        One hash look-up: the per-call path of serving (``to_index`` on a one-element list
        costs ~100x more).
        """
        try:
            loc = self._index.get_loc(external_id)
        except (KeyError, TypeError, ValueError, pd.errors.InvalidIndexError):
            return UNKNOWN
        if isinstance(loc, (int, np.integer)):
            return int(loc)
        return self._safe_get(external_id)  # (a slice or a mask: not one position)

    def to_index(self, external_ids: Any) -> np.ndarray:
        """Dense ids of external ids.

        Parameters
        ----------
        external_ids : scalar or array-like
            (m,) external ids.

        Returns
        -------
        ndarray
            (m,) int64 dense ids, :data:`UNKNOWN` (-1) for ids not in the map. A scalar
            input gives a 0-d result (use ``int(...)``).
        """
        scalar = np.ndim(external_ids) == 0 and not isinstance(external_ids, (list, tuple))
        values = _as_1d([external_ids] if scalar else external_ids)
        try:
            out = self._index.get_indexer(values).astype(np.int64, copy=False)
        except TypeError:
            out = np.array([self._safe_get(v) for v in values], dtype=np.int64)
        return out[0] if scalar else out

    def to_known_index(self, external_ids: Any, what: str = "ids") -> np.ndarray:
        """(m,) int64 dense ids of a 1-D list of external ids that must all be in the map.

        Raises
        ------
        ValueError
            naming ``what`` and up to 10 unknown ids, or its shape if it is not 1-D.
        """
        arr = np.asarray(list(external_ids)) if not isinstance(external_ids, np.ndarray) else external_ids
        if arr.ndim != 1:
            raise ValueError(f"{what} must be a 1-D list of item ids, got shape {arr.shape}")
        idx = self.to_index(arr) if len(arr) else np.zeros(0, np.int64)
        if (idx < 0).any():
            raise ValueError(f"{what} has item ids unknown to the model: {arr[idx < 0][:10].tolist()}")
        return idx.astype(np.int64)

    def _safe_get(self, v: Any) -> int:
        try:
            loc = self._index.get_loc(v)
            return int(loc) if isinstance(loc, (int, np.integer)) else UNKNOWN
        except (KeyError, TypeError, ValueError, pd.errors.InvalidIndexError):
            return UNKNOWN

    def to_external(self, dense_ids: Any) -> np.ndarray:
        """External ids of dense ids.

        Parameters
        ----------
        dense_ids : int or array-like of int
            (m,) dense ids in ``[0, n)``.

        Returns
        -------
        ndarray
            (m,) external ids (a scalar for a scalar input).

        Raises
        ------
        ValueError
            If a dense id is outside ``[0, n)`` (including :data:`UNKNOWN`).
        """
        arr = np.asarray(dense_ids)
        if arr.dtype.kind not in "iu":
            raise TypeError(f"dense ids must be integers, got dtype {arr.dtype}")
        if arr.size and (arr.min() < 0 or arr.max() >= len(self)):
            bad = arr[(arr < 0) | (arr >= len(self))].ravel()[:5].tolist()
            raise ValueError(f"dense ids out of range [0, {len(self)}): {bad}")
        out = self._index.to_numpy()[arr]
        return out

    def _kind(self) -> str:
        dt = self._index.dtype
        if pd.api.types.is_bool_dtype(dt):
            return "bool"
        if pd.api.types.is_integer_dtype(dt):
            return "int"
        if pd.api.types.is_float_dtype(dt):
            return "float"
        if len(self._index) == 0 or self._index.inferred_type == "string":
            return "str"
        raise TypeError(
            f"id map with ids of dtype {dt} (inferred {self._index.inferred_type}) cannot be "
            "serialised: use int, float or str ids"
        )

    def to_dict(self) -> dict:
        """A JSON-serialisable description: ``{"kind": "int"|"float"|"str"|"bool", "ids": [...]}``."""
        kind = self._kind()
        caster = {"int": int, "float": float, "str": str, "bool": bool}[kind]
        return {"kind": kind, "ids": [caster(x) for x in self._index.tolist()]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> IdMap:
        """Inverse of :meth:`to_dict`.

        Raises
        ------
        ValueError
            If ``d`` is not a valid id-map description.
        """
        if not isinstance(d, Mapping) or "kind" not in d or "ids" not in d:
            raise ValueError("an id map description needs the keys 'kind' and 'ids'")
        dtype = {"int": np.int64, "float": np.float64, "bool": np.bool_, "str": object}.get(d["kind"])
        if dtype is None:
            raise ValueError(f"unknown id kind {d['kind']!r}")
        ids = list(d["ids"])
        if d["kind"] == "str":
            return cls(pd.Index(ids, dtype="str"))
        return cls(pd.Index(np.asarray(ids, dtype=dtype)))

    def to_json(self) -> str:
        """:meth:`to_dict` as a JSON string."""
        return json.dumps(self.to_dict(), ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> IdMap:
        """Inverse of :meth:`to_json`."""
        return cls.from_dict(json.loads(text))


def _as_1d(values: Any) -> Any:
    if isinstance(values, (pd.Series, pd.Index)):
        return values.array if isinstance(values, pd.Series) else values
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        return pd.Series(values.to_pandas()).array
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"ids must be 1-D, got shape {arr.shape}")
    return arr


@dataclass
class EncodedInteractions:
    """An interaction log as dense arrays.

    Attributes
    ----------
    user_ids : (n,) int64
        Dense user ids, :data:`UNKNOWN` where a given ``user_map`` lacks the user.
    item_ids : (n,) int64
        Dense item ids, :data:`UNKNOWN` where a given ``item_map`` lacks the item.
    timestamps : (n,) float64 or None
        Numeric timestamps as given, datetimes as seconds since the epoch.
    rewards : (n,) float32 or None
    propensities : (n,) float32 or None
    positions : (n,) int64 or None
    context : dict of str to (n,) arrays
        Numeric context columns as float32; other context columns as int64 dense codes
        whose maps are in ``context_maps``.
    user_map, item_map : IdMap
    context_maps : dict of str to IdMap
    """

    user_ids: np.ndarray
    item_ids: np.ndarray
    user_map: IdMap
    item_map: IdMap
    timestamps: np.ndarray | None = None
    rewards: np.ndarray | None = None
    propensities: np.ndarray | None = None
    positions: np.ndarray | None = None
    context: dict = field(default_factory=dict)
    context_maps: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.user_ids)

    def __repr__(self) -> str:
        extras = [k for k in ("timestamps", "rewards", "propensities", "positions") if getattr(self, k) is not None]
        return (f"EncodedInteractions(n={len(self)}, users={self.n_users}, items={self.n_items}, "
                f"fields={extras}, context={list(self.context)})")

    @property
    def n_users(self) -> int:
        """Number of users in ``user_map``."""
        return len(self.user_map)

    @property
    def n_items(self) -> int:
        """Number of items in ``item_map``."""
        return len(self.item_map)


def encode(
    interactions: InteractionsLike,
    *,
    user_map: IdMap | None = None,
    item_map: IdMap | None = None,
    context: Iterable[str] | None = None,
) -> EncodedInteractions:
    """Turn an interaction log into dense arrays and id maps.

    Parameters
    ----------
    interactions : DataFrame, pyarrow.Table, dict of arrays or path
        See :func:`read_interactions`. Usually the output of :func:`clean`.
    user_map, item_map : IdMap, optional
        Existing maps (e.g. a trained model's); ids they lack become :data:`UNKNOWN`.
        When omitted, maps are fitted on this log in order of first appearance.
    context : iterable of str, optional
        Context columns to encode; default all columns other than the standard ones.

    Returns
    -------
    EncodedInteractions

    Raises
    ------
    ValueError
        If a required column is missing or has missing values (run :func:`clean` first),
        or a context column is unknown.
    """
    df = read_interactions(interactions)
    for col in REQUIRED_COLUMNS:
        if df[col].isna().any():
            raise ValueError(f"column {col!r} has missing values; run recmeta_sdk.data.clean first")
    if user_map is None:
        user_map, users = IdMap.fit_transform(df[USER])
    else:
        users = user_map.to_index(df[USER])
    if item_map is None:
        item_map, items = IdMap.fit_transform(df[ITEM])
    else:
        items = item_map.to_index(df[ITEM])
    out = EncodedInteractions(user_ids=users, item_ids=items, user_map=user_map, item_map=item_map)
    if TIMESTAMP in df.columns:
        out.timestamps = timestamp_array(df[TIMESTAMP])
    if REWARD in df.columns:
        out.rewards = df[REWARD].to_numpy(dtype=np.float32, na_value=np.nan)
    if PROPENSITY in df.columns:
        out.propensities = df[PROPENSITY].to_numpy(dtype=np.float32, na_value=np.nan)
    if POSITION in df.columns:
        out.positions = df[POSITION].to_numpy(dtype=np.float64, na_value=np.nan).astype(np.int64)
    standard = set(REQUIRED_COLUMNS) | set(OPTIONAL_COLUMNS)
    ctx_cols = [c for c in df.columns if c not in standard] if context is None else list(context)
    for col in ctx_cols:
        if col not in df.columns:
            raise ValueError(f"context column {col!r} not in interactions (columns: {list(df.columns)})")
        s = df[col]
        if pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s):
            out.context[col] = s.to_numpy(dtype=np.float32, na_value=np.nan)
        else:
            codes, uniques = pd.factorize(s, use_na_sentinel=True)
            out.context[col] = codes.astype(np.int64, copy=False)
            out.context_maps[col] = IdMap(pd.Index(uniques))
    logger.debug("encoded %d interactions: %d users, %d items", len(df), len(user_map), len(item_map))
    return out
