"""Grouping interactions into meta-learning tasks with support / query sets."""
from __future__ import annotations

import logging
from collections.abc import Iterator
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

TASK_KINDS: tuple[str, ...] = ("user", "segment", "category", "campaign")


@dataclass
class Task:
    """One task: its key and its support and query rows (DataFrames)."""

    key: Any
    support: pd.DataFrame
    query: pd.DataFrame


@dataclass
class TaskSet:
    """Tasks stored as flat arrays (CSR-like), so batches of tasks are built without loops.

    The rows of task ``t`` are ``rows[offsets[t]:offsets[t + 1]]`` (positions into
    ``interactions``, sorted by time within the task when the log has timestamps); the
    first ``n_support[t]`` of them are its support set, the rest its query set.

    Attributes
    ----------
    interactions : DataFrame
        (n, c) the log the row positions refer to.
    by : str
        How tasks were formed (``"user"``, ``"segment"``, ``"category"``, ``"campaign"``).
    keys : ndarray
        (T,) task keys (user id, segment value, category, campaign), sorted.
    rows : (m,) int64
        Row positions (``iloc``) into ``interactions``; with multi-valued categories a
        row may appear in several tasks, otherwise ``m <= n``.
    offsets : (T + 1,) int64
    n_support : (T,) int64
        Support-set size of each task; ``1 <= n_support[t] < size of task t``.
    n_dropped : int
        Tasks dropped for having fewer than ``min_interactions`` rows.
    """

    interactions: pd.DataFrame
    by: str
    keys: np.ndarray
    rows: np.ndarray
    offsets: np.ndarray
    n_support: np.ndarray
    n_dropped: int = 0

    def __len__(self) -> int:
        return len(self.keys)

    def __repr__(self) -> str:
        return (f"TaskSet(by={self.by!r}, tasks={len(self)}, rows={len(self.rows)}, "
                f"support={int(self.n_support.sum())}, dropped={self.n_dropped})")

    @property
    def sizes(self) -> np.ndarray:
        """(T,) int64 rows per task."""
        return np.diff(self.offsets)

    @property
    def task_of_row(self) -> np.ndarray:
        """(m,) int64 task index of each entry of ``rows``."""
        return np.repeat(np.arange(len(self), dtype=np.int64), self.sizes)

    @property
    def is_support(self) -> np.ndarray:
        """(m,) bool, True where the entry of ``rows`` is in its task's support set."""
        pos = np.arange(len(self.rows)) - np.repeat(self.offsets[:-1], self.sizes)
        return pos < np.repeat(self.n_support, self.sizes)

    def support_rows(self, t: int) -> np.ndarray:
        """(n_support[t],) row positions of task ``t``'s support set, in time order."""
        self._check(t)
        return self.rows[self.offsets[t]: self.offsets[t] + self.n_support[t]]

    def query_rows(self, t: int) -> np.ndarray:
        """Row positions of task ``t``'s query set, in time order."""
        self._check(t)
        return self.rows[self.offsets[t] + self.n_support[t]: self.offsets[t + 1]]

    def __getitem__(self, t: int) -> Task:
        self._check(t)
        return Task(
            key=self.keys[t],
            support=self.interactions.iloc[self.support_rows(t)],
            query=self.interactions.iloc[self.query_rows(t)],
        )

    def __iter__(self) -> Iterator[Task]:
        for t in range(len(self)):
            yield self[t]

    def _check(self, t: int) -> None:
        if not isinstance(t, (int, np.integer)) or not -len(self) <= t < len(self):
            raise IndexError(f"task index {t!r} out of range for {len(self)} tasks")


def make_tasks(
    interactions: InteractionsLike,
    by: str = "user",
    *,
    users: pd.DataFrame | None = None,
    items: pd.DataFrame | None = None,
    column: str | None = None,
    support_size: int | None = None,
    support_frac: float = 0.5,
    min_interactions: int = 2,
    temporal: bool = True,
    sep: str = "|",
    seed: int = 0,
) -> TaskSet:
    """Group interactions into meta-learning tasks, each with a support and a query set.

    Parameters
    ----------
    interactions : DataFrame, pyarrow.Table, dict of arrays or path
        The log (see :func:`read_interactions`).
    by : {"user", "segment", "category", "campaign"}
        ``"user"``: one task per user. ``"segment"``: one per value of the user feature
        ``column`` (a column of the log, else of ``users``). ``"category"``: one per
        value of the item feature ``column`` (a column of the log, else of ``items``);
        multi-valued features (lists or ``sep``-separated strings, e.g. genres) put a row
        in every one of its categories' tasks. ``"campaign"``: one per value of the log's
        column ``column`` (default ``"campaign"``).
    users, items : DataFrame, optional
        Side features indexed by external user / item id.
    column : str, optional
        The feature naming the group (required for ``segment`` and ``category``).
    support_size : int, optional
        Support-set size per task (capped so the query set keeps at least one row).
    support_frac : float
        Used when ``support_size`` is None: ``max(1, floor(frac * size))`` rows, capped
        at ``size - 1``.
    min_interactions : int
        Tasks with fewer rows are dropped (counted in ``n_dropped``); at least 2.
    temporal : bool
        Order each task by time (ties keep input order) so the support set precedes the
        query set; needs a ``timestamp`` column. False (or no timestamps) orders each
        task by a seeded random permutation.
    sep : str
        Separator of multi-valued string categories.
    seed : int
        Seed of the random order when not temporal.

    Returns
    -------
    TaskSet

    Raises
    ------
    ValueError
        If ``by`` is unknown, ``column`` is missing, or a size option is invalid.
    """
    if by not in TASK_KINDS:
        raise ValueError(f"unknown task grouping by={by!r}; choose one of {list(TASK_KINDS)}")
    if isinstance(min_interactions, bool) or not isinstance(min_interactions, (int, np.integer)) \
            or min_interactions < 2:
        raise ValueError(f"min_interactions must be an integer >= 2, got {min_interactions!r}")
    if support_size is not None and (
        isinstance(support_size, bool) or not isinstance(support_size, (int, np.integer)) or support_size < 1
    ):
        raise ValueError(f"support_size must be a positive integer, got {support_size!r}")
    if not 0.0 < float(support_frac) < 1.0:
        raise ValueError(f"support_frac must be in (0, 1), got {support_frac!r}")
    df = read_interactions(interactions)
    n = len(df)

    if by == "user":
        labels = df[USER]
    elif by == "campaign":
        col = column or "campaign"
        if col not in df.columns:
            raise ValueError(f"make_tasks(by='campaign') needs the column {col!r} in the interactions")
        labels = df[col]
    else:
        if column is None:
            raise ValueError(f"make_tasks(by={by!r}) needs column= naming the {'user' if by == 'segment' else 'item'} feature")
        key_col, table, table_name = (USER, users, "users") if by == "segment" else (ITEM, items, "items")
        if column in df.columns:
            labels = df[column]
        else:
            if table is None or column not in table.columns:
                raise ValueError(f"column {column!r} is neither in the interactions nor in {table_name}")
            if not table.index.is_unique:
                raise ValueError(f"{table_name} must be indexed by unique external ids")
            labels = pd.Series(table[column].reindex(df[key_col].to_numpy()).to_numpy(), index=df.index)
    labels = pd.Series(labels.to_numpy(), name="task")
    row_idx = np.arange(n, dtype=np.int64)
    if by == "category":
        if pd.api.types.is_string_dtype(labels.dtype) and labels.dtype != object:
            is_multi = labels.str.contains(sep, regex=False).fillna(False).to_numpy(dtype=bool)
            split_labels = labels.str.split(sep) if is_multi.any() else labels
        elif labels.dtype == object:
            is_multi = labels.map(
                lambda v: isinstance(v, (list, tuple, np.ndarray)) or (isinstance(v, str) and sep in v)
            ).to_numpy(dtype=bool)
            split_labels = labels.map(lambda v: v.split(sep) if isinstance(v, str) else v)
        else:
            is_multi = np.zeros(len(labels), dtype=bool)
        if is_multi.any():
            exploded = split_labels.explode()
            row_idx = exploded.index.to_numpy(dtype=np.int64)
            if labels.dtype != object:  # strings: vectorised strip
                labels = pd.Series(exploded.to_numpy(), name="task", dtype=labels.dtype).str.strip()
                labels = labels.mask(labels == "")
            else:
                labels = pd.Series(exploded.to_numpy(), name="task")
                labels = labels.map(lambda v: v.strip() if isinstance(v, str) else v)
                labels = labels.where(labels.map(lambda v: not (isinstance(v, str) and v == "")))
    valid = labels.notna().to_numpy()
    if not valid.all():
        logger.info("make_tasks: %d rows have no %s and belong to no task", int((~valid).sum()), column or by)
    row_idx = row_idx[valid]
    labels = labels[valid]
    codes, uniques = pd.factorize(labels, sort=True)
    codes = codes.astype(np.int64, copy=False)
    if temporal and TIMESTAMP in df.columns:
        ts = timestamp_array(df[TIMESTAMP])[row_idx]
        if np.isnan(ts).any():
            raise ValueError("column 'timestamp' has missing values; run recmeta_sdk.data.clean first")
        order = group_time_order(codes, ts)  # ties keep input order (row_idx is non-decreasing)
    else:
        order = group_random_order(codes, np.random.default_rng(seed))
    codes_sorted = codes[order]
    rows = row_idx[order]
    sizes = np.bincount(codes_sorted, minlength=len(uniques))
    keep_task = sizes >= min_interactions
    n_dropped = int((~keep_task).sum())
    if n_dropped:
        logger.info("make_tasks: dropped %d tasks with fewer than %d interactions", n_dropped, min_interactions)
    keep_row = keep_task[codes_sorted]
    rows = rows[keep_row]
    sizes = sizes[keep_task]
    offsets = np.zeros(len(sizes) + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    if support_size is not None:
        n_support = np.minimum(support_size, sizes - 1)
    else:
        n_support = np.clip(np.floor(support_frac * sizes).astype(np.int64), 1, sizes - 1)
    return TaskSet(
        interactions=df,
        by=by,
        keys=np.asarray(pd.Index(uniques)[keep_task].to_numpy()),
        rows=rows.astype(np.int64, copy=False),
        offsets=offsets,
        n_support=n_support.astype(np.int64, copy=False),
        n_dropped=n_dropped,
    )
