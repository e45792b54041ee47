"""Side features of users and items: categorical, multi-valued and numeric."""
from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from ._ingest import IdMap

logger = logging.getLogger("recmeta")

NUMERIC_MODES = ("normalize", "bucketize")


@dataclass
class EncodedFeatures:
    """Side features of ``n`` entities (users or items) as embedding-bag inputs.

    Attributes
    ----------
    indices : (nnz,) int64
        Feature-token ids in ``[0, n_tokens)``; entity ``j`` has the bag
        ``indices[offsets[j]:offsets[j + 1]]`` (one token per categorical value, one per
        element of a multi-valued field, one bucket per bucketised number).
    offsets : (n + 1,) int64
    numeric : (n, d) float32
        Normalised numeric features (0 where missing), columns ``numeric_columns``.
    numeric_columns : list of str
    n_tokens : int
        Size of the token vocabulary (the embedding table's rows).
    ids : (n,) array
        External id of each row.
    """

    indices: np.ndarray
    offsets: np.ndarray
    numeric: np.ndarray
    numeric_columns: list
    n_tokens: int
    ids: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1


@dataclass
class FeatureEncoder:
    """Learns a token vocabulary and numeric statistics from a side-feature table.

    Parameters
    ----------
    categorical : sequence of str, optional
        Single-valued categorical columns (occupation, gender).
    multi_valued : sequence of str, optional
        Columns holding lists or ``sep``-separated strings (genres).
    numeric : sequence of str, optional
        Numeric columns (age, price, year).
    numeric_mode : {"normalize", "bucketize"} or mapping of column to mode
        ``normalize``: ``(x - mean) / std`` into :attr:`EncodedFeatures.numeric`.
        ``bucketize``: quantile buckets (``n_buckets``) as tokens ``"col#b"``.
    n_buckets : int
    sep : str
        Separator of multi-valued strings.

    If none of ``categorical``, ``multi_valued``, ``numeric`` is given, :meth:`fit`
    infers them: numeric dtypes are numeric, columns holding lists or ``sep`` are
    multi-valued, the rest categorical. Tokens are named ``"column=value"`` (buckets
    ``"column#b"``); token ids run over categorical, then multi-valued, then bucketised
    columns, each in sorted value order.
    """

    categorical: Sequence[str] | None = None
    multi_valued: Sequence[str] | None = None
    numeric: Sequence[str] | None = None
    numeric_mode: str | Mapping[str, str] = "normalize"
    n_buckets: int = 10
    sep: str = "|"
    vocabulary_: dict = field(default_factory=dict)  # column -> list of values (str)
    stats_: dict = field(default_factory=dict)  # numeric column -> {"mode", "mean", "std"} or {"mode", "edges"}
    fitted_: bool = False

    # ----------------------------------------------------------------- fitting
    def _mode(self, col: str) -> str:
        mode = self.numeric_mode.get(col, "normalize") if isinstance(self.numeric_mode, Mapping) else self.numeric_mode
        if mode not in NUMERIC_MODES:
            raise ValueError(f"numeric_mode for column {col!r} must be one of {NUMERIC_MODES}, got {mode!r}")
        return mode

    def fit(self, table: pd.DataFrame) -> FeatureEncoder:
        """Learn vocabularies and statistics.

        Parameters
        ----------
        table : DataFrame
            (n, c) features indexed by external id.

        Returns
        -------
        FeatureEncoder
            ``self``.

        Raises
        ------
        TypeError
            If ``table`` is not a DataFrame or a numeric column is not numeric.
        ValueError
            If a named column is missing or the index has duplicates.
        """
        if not isinstance(table, pd.DataFrame):
            raise TypeError(f"side features must be a pandas DataFrame, got {type(table).__name__}")
        if not table.index.is_unique:
            raise ValueError("side-feature table must be indexed by unique external ids")
        if isinstance(self.n_buckets, bool) or not isinstance(self.n_buckets, (int, np.integer)) or self.n_buckets < 2:
            raise ValueError(f"n_buckets must be an integer >= 2, got {self.n_buckets!r}")
        if self.categorical is None and self.multi_valued is None and self.numeric is None:
            self._infer_kinds(table)
        self.categorical = list(self.categorical or [])
        self.multi_valued = list(self.multi_valued or [])
        self.numeric = list(self.numeric or [])
        for col in (*self.categorical, *self.multi_valued, *self.numeric):
            if col not in table.columns:
                raise ValueError(f"feature column {col!r} not in table (columns: {list(table.columns)})")
        self.vocabulary_, self.stats_ = {}, {}
        for col in self.categorical:
            values = _values_as_str(table[col])
            self.vocabulary_[col] = sorted(pd.unique(values[values.notna()]).tolist())
        for col in self.multi_valued:
            tokens = _explode(table[col], self.sep)[1]
            self.vocabulary_[col] = sorted(pd.unique(tokens).tolist())
        for col in self.numeric:
            s = table[col]
            if not pd.api.types.is_numeric_dtype(s) or pd.api.types.is_bool_dtype(s):
                raise TypeError(f"numeric feature {col!r} has dtype {s.dtype}")
            x = s.to_numpy(dtype=np.float64, na_value=np.nan)
            x = x[np.isfinite(x)]
            mode = self._mode(col)
            if mode == "normalize":
                mean = float(x.mean()) if len(x) else 0.0
                std = float(x.std()) if len(x) else 1.0
                self.stats_[col] = {"mode": mode, "mean": mean, "std": std if std > 0 else 1.0}
            else:
                qs = np.quantile(x, np.linspace(0, 1, self.n_buckets + 1)[1:-1]) if len(x) else np.array([])
                edges = np.unique(qs)
                self.stats_[col] = {"mode": mode, "edges": [float(e) for e in edges]}
                self.vocabulary_[col] = [f"#{b}" for b in range(len(edges) + 1)]
        self.fitted_ = True
        return self

    def _infer_kinds(self, table: pd.DataFrame) -> None:
        cat, multi, num = [], [], []
        for col in table.columns:
            s = table[col]
            if pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s):
                num.append(col)
            elif s.dtype == object and s.map(lambda v: isinstance(v, (list, tuple, np.ndarray))).any() or pd.api.types.is_string_dtype(s) and s.astype("str").str.contains(self.sep, regex=False).any():
                multi.append(col)
            else:
                cat.append(col)
        self.categorical, self.multi_valued, self.numeric = cat, multi, num

    @property
    def columns(self) -> list:
        """Token columns in vocabulary order."""
        return list(self.vocabulary_)

    @property
    def n_tokens(self) -> int:
        """Total token vocabulary size."""
        return sum(len(v) for v in self.vocabulary_.values())

    @property
    def tokens(self) -> list:
        """All token names (``"column=value"``, buckets ``"column#b"``) in id order."""
        out = []
        for col, vals in self.vocabulary_.items():
            if col in self.stats_:
                out.extend(f"{col}{v}" for v in vals)
            else:
                out.extend(f"{col}={v}" for v in vals)
        return out

    # ----------------------------------------------------------------- transform
    def transform(self, table: pd.DataFrame, index: IdMap | None = None) -> EncodedFeatures:
        """Encode a table with the fitted vocabulary.

        Parameters
        ----------
        table : DataFrame
            Features indexed by external id.
        index : IdMap, optional
            Row order: row ``j`` of the output is the entity with dense id ``j``;
            entities absent from ``table`` get an empty bag and zero numerics. Default:
            the table's own order.

        Returns
        -------
        EncodedFeatures
            Unknown categorical values (not seen by :meth:`fit`) contribute no token.
        """
        if not self.fitted_:
            raise ValueError("FeatureEncoder.transform called before fit")
        if not isinstance(table, pd.DataFrame):
            raise TypeError(f"side features must be a pandas DataFrame, got {type(table).__name__}")
        if index is not None:
            if not table.index.is_unique:
                raise ValueError("side-feature table must be indexed by unique external ids")
            pos = table.index.get_indexer(pd.Index(index.ids))
            present = pos >= 0
            table = table.iloc[np.where(present, pos, 0)] if len(table) else table.reindex(index.ids)
            ids = index.ids
        else:
            present = np.ones(len(table), dtype=bool)
            ids = table.index.to_numpy()
        n = len(ids)
        rows_parts, tok_parts = [], []
        base = 0
        for col, vals in self.vocabulary_.items():
            lookup = pd.Index(vals)
            if col in self.stats_:  # bucketised numeric
                x = table[col].to_numpy(dtype=np.float64, na_value=np.nan)
                ok = np.isfinite(x) & present
                b = np.searchsorted(np.asarray(self.stats_[col]["edges"]), x[ok], side="right")
                rows_parts.append(np.flatnonzero(ok))
                tok_parts.append(base + b)
            elif col in self.multi_valued:
                rows, toks = _explode(table[col], self.sep)
                code = lookup.get_indexer(toks)
                keep = (code >= 0) & present[rows]
                rows_parts.append(rows[keep])
                tok_parts.append(base + code[keep])
            else:
                values = _values_as_str(table[col])
                code = lookup.get_indexer(values)
                keep = (code >= 0) & present
                rows_parts.append(np.flatnonzero(keep))
                tok_parts.append(base + code[keep])
            base += len(vals)
        rows = np.concatenate(rows_parts) if rows_parts else np.zeros(0, dtype=np.int64)
        toks = np.concatenate(tok_parts) if tok_parts else np.zeros(0, dtype=np.int64)
        order = np.argsort(rows, kind="stable")
        indices = toks[order].astype(np.int64, copy=False)
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows, minlength=n), out=offsets[1:])
        dense_cols = [c for c in self.numeric if self.stats_[c]["mode"] == "normalize"]
        numeric = np.zeros((n, len(dense_cols)), dtype=np.float32)
        for j, col in enumerate(dense_cols):
            st = self.stats_[col]
            x = (table[col].to_numpy(dtype=np.float64, na_value=np.nan) - st["mean"]) / st["std"]
            x[~np.isfinite(x) | ~present] = 0.0
            numeric[:, j] = x
        return EncodedFeatures(indices=indices, offsets=offsets, numeric=numeric, numeric_columns=dense_cols,
                               n_tokens=self.n_tokens, ids=np.asarray(ids))

    def fit_transform(self, table: pd.DataFrame, index: IdMap | None = None) -> EncodedFeatures:
        """:meth:`fit` on ``table`` then :meth:`transform`."""
        return self.fit(table).transform(table, index)

    # ----------------------------------------------------------------- persistence
    def to_dict(self) -> dict:
        """JSON-serialisable fitted state."""
        if not self.fitted_:
            raise ValueError("FeatureEncoder.to_dict called before fit")
        return {
            "categorical": list(self.categorical),
            "multi_valued": list(self.multi_valued),
            "numeric": list(self.numeric),
            "numeric_mode": dict(self.numeric_mode) if isinstance(self.numeric_mode, Mapping) else self.numeric_mode,
            "n_buckets": int(self.n_buckets),
            "sep": self.sep,
            "vocabulary": {k: list(v) for k, v in self.vocabulary_.items()},
            "stats": self.stats_,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FeatureEncoder:
        """Inverse of :meth:`to_dict`."""
        try:
            enc = cls(categorical=d["categorical"], multi_valued=d["multi_valued"], numeric=d["numeric"],
                      numeric_mode=d["numeric_mode"], n_buckets=d["n_buckets"], sep=d["sep"])
            enc.vocabulary_ = {k: list(v) for k, v in d["vocabulary"].items()}
            enc.stats_ = {k: dict(v) for k, v in d["stats"].items()}
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"invalid FeatureEncoder description: {exc!r}") from None
        enc.fitted_ = True
        return enc

    def to_json(self) -> str:
        """:meth:`to_dict` as JSON."""
        return json.dumps(self.to_dict(), ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> FeatureEncoder:
        """Inverse of :meth:`to_json`."""
        return cls.from_dict(json.loads(text))


def _values_as_str(s: pd.Series) -> pd.Series:
    """Categorical values as strings (integers keep their integer spelling), NaN kept."""
    if pd.api.types.is_float_dtype(s):
        x = s.to_numpy(dtype=np.float64, na_value=np.nan)
        if np.all(np.isnan(x) | (x == np.round(x))):
            s = pd.Series(x, index=s.index).astype("Int64")
    out = s.astype("str")
    return out.where(s.notna().to_numpy(), None) if s.isna().any() else out


def _explode(s: pd.Series, sep: str) -> tuple[np.ndarray, np.ndarray]:
    """(row position, token) pairs of a multi-valued column; blanks and NaN dropped."""
    pos = pd.Series(np.arange(len(s)))
    values = pd.Series(s.to_numpy(dtype=object), index=pos.index)
    if pd.api.types.is_string_dtype(s.dtype) and s.dtype != object:
        lists = s.reset_index(drop=True).str.split(sep, regex=False)
    else:
        lists = values.map(lambda v: v.split(sep) if isinstance(v, str) else v)
    ex = lists.explode()
    ex = ex[ex.notna()]
    tokens = ex.astype("str").str.strip()
    keep = (tokens != "").to_numpy(dtype=bool)
    return ex.index.to_numpy(dtype=np.int64)[keep], tokens.to_numpy(dtype=object)[keep]
