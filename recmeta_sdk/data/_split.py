"""Train / validation / test splits, warm and cold-start."""
from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from ._ingest import (
    ITEM,
    TIMESTAMP,
    USER,
    InteractionsLike,
    read_interactions,
    timestamp_array,
)
from ._order import group_random_order, group_time_order

logger = logging.getLogger("recmeta")

SPLITS: tuple[str, ...] = ("ratio", "temporal", "leave_last_out", "cold_users", "cold_items", "cold_categories")


@dataclass
class Split:
    """A warm split. Every input row is in exactly one part, with its input index label.

    Attributes
    ----------
    train, valid, test : DataFrame
        Rows in their input order.
    """

    train: pd.DataFrame
    valid: pd.DataFrame
    test: pd.DataFrame

    def __repr__(self) -> str:
        return f"Split(train={len(self.train)}, valid={len(self.valid)}, test={len(self.test)})"


@dataclass
class ColdSplit:
    """A cold-start split holding out whole users (items, categories).

    For each held-out key (user, item or category) its interactions are sorted by time
    (ties keep input order); the first ``k`` form ``support``, those from position
    ``query_after`` on form ``query`` (the same for every ``k``), and those in between
    form ``gap`` (shown to nobody; the protocol excludes support and gap items from
    ranking). ``train`` holds every row of the other keys. Every input row is in exactly
    one of train / support / gap / query, with its input index label.

    Attributes
    ----------
    train, support, gap, query : DataFrame
    held_out : ndarray
        (h,) held-out keys (external ids), sorted.
    by : str
        ``"user"``, ``"item"`` or ``"category"``.
    k, query_after, fold, n_folds, seed : int
    """

    train: pd.DataFrame
    support: pd.DataFrame
    query: pd.DataFrame
    gap: pd.DataFrame
    held_out: np.ndarray
    by: str
    k: int
    query_after: int
    fold: int
    n_folds: int
    seed: int

    def __repr__(self) -> str:
        return (f"ColdSplit(by={self.by!r}, fold={self.fold}/{self.n_folds}, held_out={len(self.held_out)}, "
                f"k={self.k}, query_after={self.query_after}, train={len(self.train)}, "
                f"support={len(self.support)}, gap={len(self.gap)}, query={len(self.query)})")


def split(interactions: InteractionsLike, how: str, **options: Any) -> Split | ColdSplit:
    """Split an interaction log.

    Parameters
    ----------
    interactions : DataFrame, pyarrow.Table, dict of arrays or path
        The (cleaned) log; see :func:`read_interactions`.
    how : str
        ``"ratio"``
            Per user, a seeded random permutation is cut 8:1:1 exactly as RecBole's
            ``RS`` split does (``int(ratio * n)`` rows for valid and test, the rest for
            train; a user too small for a part gets one row there only while train keeps
            at least two). Options ``ratios=(0.8, 0.1, 0.1)``, ``seed=2020``,
            ``group_by="user"`` (None cuts one global permutation).
        ``"temporal"``
            One global cut by time: the oldest ``ratios[0]`` of rows train, then valid,
            then test (ties keep input order). Options ``ratios``.
        ``"leave_last_out"``
            Per user by time: the last interaction is test, the one before is valid
            (option ``valid=True``), the rest train; a user always keeps at least one
            train row (RecBole's rule), so a one-event user is train only.
        ``"cold_users"``
            Users are cut into ``n_folds=5`` folds by a permutation seeded with
            ``seed=2020`` (of the sorted distinct users, then ``numpy.array_split``);
            fold ``fold=0`` is held out. Options ``k=5`` support interactions and
            ``query_after=20``; returns :class:`ColdSplit`.
        ``"cold_items"``
            The same holding out items (support: an item's first ``k`` interactions).
        ``"cold_categories"``
            The same holding out item categories: option ``category`` is a column of
            the log or a mapping (dict / Series) from item to a single category.
    **options
        As listed above. Unknown options raise ``TypeError``.

    Returns
    -------
    Split or ColdSplit

    Raises
    ------
    ValueError
        If ``how`` is unknown, an option is invalid, or a split needing time has no
        ``timestamp`` column.
    """
    if not isinstance(how, str) or how not in SPLITS:
        raise ValueError(f"unknown split how={how!r}; choose one of {list(SPLITS)}")
    df = read_interactions(interactions)
    fn = {
        "ratio": _split_ratio,
        "temporal": _split_temporal,
        "leave_last_out": _split_leave_last_out,
        "cold_users": _split_cold,
        "cold_items": _split_cold,
        "cold_categories": _split_cold,
    }[how]
    valid = [p.name for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY]
    if how in ("cold_users", "cold_items"):
        valid.remove("category")
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise TypeError(f"split(how={how!r}) got unknown option(s) {unknown}; valid options: {valid}")
    if fn is _split_cold:
        return fn(df, how, **options)
    return fn(df, **options)


# ---------------------------------------------------------------------------- helpers


def _check_ratios(ratios: Sequence[float]) -> np.ndarray:
    r = np.asarray(ratios, dtype=np.float64)
    if r.ndim != 1 or len(r) != 3 or (r < 0).any() or not np.isfinite(r).all() or r.sum() <= 0:
        raise ValueError(f"ratios must be three non-negative numbers, got {ratios!r}")
    return r / r.sum()


def _group_codes(values: pd.Series) -> tuple[np.ndarray, int]:
    codes, uniques = pd.factorize(values, sort=False)
    if (codes < 0).any():
        raise ValueError(f"column {values.name!r} has missing values; run recmeta_sdk.data.clean first")
    return codes.astype(np.int64, copy=False), len(uniques)


def _time_values(df: pd.DataFrame, how: str) -> np.ndarray:
    if TIMESTAMP not in df.columns:
        raise ValueError(f"split how={how!r} orders by time and needs a 'timestamp' column")
    ts = timestamp_array(df[TIMESTAMP])
    if np.isnan(ts).any():
        raise ValueError("column 'timestamp' has missing values; run recmeta_sdk.data.clean first")
    return ts


def _rank_in_group(codes: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Rank of each row within its group, given rows ordered by (group, key)."""
    n = len(codes)
    sorted_codes = codes[order]
    start = np.ones(n, dtype=bool)
    start[1:] = sorted_codes[1:] != sorted_codes[:-1]
    first = np.flatnonzero(start)
    group_start = np.repeat(first, np.diff(np.append(first, n)))
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n) - group_start
    return rank


def _parts(df: pd.DataFrame, part: np.ndarray, n_parts: int) -> list[pd.DataFrame]:
    return [df.iloc[np.flatnonzero(part == p)] for p in range(n_parts)]


def _recbole_counts(sizes: np.ndarray, ratios: np.ndarray) -> np.ndarray:
    """RecBole's ``_calcu_split_ids`` for every group at once: (g, 3) row counts."""
    sizes = sizes.astype(np.int64)
    cnt = np.floor(ratios[None, :] * sizes[:, None].astype(np.float64)).astype(np.int64)
    cnt[:, 0] = sizes - cnt[:, 1:].sum(axis=1)
    active = np.ones(len(sizes), dtype=bool)
    for i in range(1, len(ratios)):
        active &= cnt[:, 0] > 1
        frac = ratios[-i] * sizes
        bump = active & (frac > 0) & (frac < 1)
        cnt[bump, -i] += 1
        cnt[bump, 0] -= 1
    return cnt


# ---------------------------------------------------------------------------- warm splits


def _split_ratio(
    df: pd.DataFrame,
    *,
    ratios: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 2020,
    group_by: str | None = USER,
) -> Split:
    r = _check_ratios(ratios)
    n = len(df)
    rng = np.random.default_rng(seed)
    if group_by is None:
        codes, n_groups = np.zeros(n, dtype=np.int64), 1
    else:
        if group_by not in df.columns:
            raise ValueError(f"group_by column {group_by!r} not in interactions")
        codes, n_groups = _group_codes(df[group_by])
    rank = _rank_in_group(codes, group_random_order(codes, rng))
    sizes = np.bincount(codes, minlength=n_groups)
    cnt = _recbole_counts(sizes, r)
    bounds = np.cumsum(cnt, axis=1)
    part = (rank >= bounds[codes, 0]).astype(np.int8) + (rank >= bounds[codes, 1])
    return Split(*_parts(df, part, 3))


def _split_temporal(df: pd.DataFrame, *, ratios: Sequence[float] = (0.8, 0.1, 0.1)) -> Split:
    r = _check_ratios(ratios)
    n = len(df)
    ts = _time_values(df, "temporal")
    order = group_time_order(np.zeros(n, dtype=np.int64), ts)
    cnt = _recbole_counts(np.array([n]), r)[0]
    part_sorted = np.repeat(np.arange(3, dtype=np.int8), cnt)
    part = np.empty(n, dtype=np.int8)
    part[order] = part_sorted
    return Split(*_parts(df, part, 3))


def _split_leave_last_out(df: pd.DataFrame, *, valid: bool = True) -> Split:
    ts = _time_values(df, "leave_last_out")
    codes, n_groups = _group_codes(df[USER])
    rank = _rank_in_group(codes, group_time_order(codes, ts))
    sizes = np.bincount(codes, minlength=n_groups)
    n_out = np.minimum(2 if valid else 1, sizes - 1)  # at least one train row per user
    from_end = sizes[codes] - 1 - rank  # 0 for the last row of a user
    part = np.zeros(len(df), dtype=np.int8)
    held = from_end < n_out[codes]
    part[held & (from_end == 0)] = 2
    part[held & (from_end == 1)] = 1
    return Split(*_parts(df, part, 3))


# ---------------------------------------------------------------------------- cold splits


def _split_cold(
    df: pd.DataFrame,
    how: str,
    *,
    fold: int = 0,
    n_folds: int = 5,
    seed: int = 2020,
    k: int = 5,
    query_after: int = 20,
    category: str | Mapping | pd.Series | None = None,
) -> ColdSplit:
    for name, value, low in (("n_folds", n_folds, 2), ("k", k, 0), ("query_after", query_after, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if isinstance(fold, bool) or not isinstance(fold, (int, np.integer)) or not 0 <= fold < n_folds:
        raise ValueError(f"fold must be an integer in [0, {n_folds}), got {fold!r}")
    if k > query_after:
        raise ValueError(f"k={k} exceeds query_after={query_after}: support and query would overlap")
    by = {"cold_users": "user", "cold_items": "item", "cold_categories": "category"}[how]
    if by == "user":
        keys = df[USER]
    elif by == "item":
        keys = df[ITEM]
    else:
        if category is None:
            raise ValueError("split(how='cold_categories') needs category= (a column name or an item -> category mapping)")
        if isinstance(category, str):
            if category not in df.columns:
                raise ValueError(f"category column {category!r} not in interactions")
            keys = df[category]
        else:
            mapping = pd.Series(category) if not isinstance(category, pd.Series) else category
            if not mapping.index.is_unique:
                raise ValueError("category mapping must have one category per item")
            keys = pd.Series(mapping.reindex(df[ITEM].to_numpy()).to_numpy(), index=df.index, name="category")
        if keys.isna().any():
            missing = df[ITEM][keys.isna().to_numpy()].unique()[:5].tolist()
            raise ValueError(f"items without a category: {missing}")
    if len(df) == 0:
        raise ValueError("cannot split an empty interaction log")
    ts = _time_values(df, how)
    distinct = pd.Index(pd.unique(keys.array)).sort_values()
    if len(distinct) < n_folds:
        raise ValueError(f"n_folds={n_folds} exceeds the number of distinct {by}s ({len(distinct)})")
    perm = np.random.default_rng(seed).permutation(len(distinct))
    held_pos = np.sort(np.array_split(perm, n_folds)[fold])
    held_keys = distinct[held_pos]
    is_held = held_keys.get_indexer(keys.array) >= 0
    codes, _ = _group_codes(keys)
    rank = _rank_in_group(codes, group_time_order(codes, ts))
    part = np.zeros(len(df), dtype=np.int8)  # 0 train, 1 support, 2 gap, 3 query
    part[is_held & (rank < k)] = 1
    part[is_held & (rank >= k) & (rank < query_after)] = 2
    part[is_held & (rank >= query_after)] = 3
    train, support, gap, query = _parts(df, part, 4)
    logger.debug("cold split (%s, fold %d/%d): %d held out, %d support, %d query rows",
                 by, fold, n_folds, len(held_keys), len(support), len(query))
    return ColdSplit(
        train=train, support=support, query=query, gap=gap, held_out=held_keys.to_numpy(), by=by,
        k=int(k), query_after=int(query_after), fold=int(fold), n_folds=int(n_folds), seed=int(seed),
    )
