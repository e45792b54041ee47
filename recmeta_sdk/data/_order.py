"""Fast stable orderings used by splits, tasks and sequence building."""
from __future__ import annotations

import numpy as np


def unique_sorted(x: np.ndarray) -> np.ndarray:
    """Sorted distinct values of an integer array (sort-based; faster than ``np.unique`` here)."""
    if len(x) == 0:
        return x.copy()
    s = np.sort(x)
    keep = np.empty(len(s), dtype=bool)
    keep[0] = True
    np.not_equal(s[1:], s[:-1], out=keep[1:])
    return s[keep]


def stable_argsort(keys: np.ndarray) -> np.ndarray:
    """``np.argsort(keys, kind="stable")``, faster when ties are rare.

    An unstable (introsort) argsort, then only the runs of equal keys are re-sorted by
    position; the result is identical to a stable sort.

    Parameters
    ----------
    keys : (n,) array

    Returns
    -------
    (n,) int64
    """
    n = len(keys)
    if n < 2:
        return np.arange(n, dtype=np.int64)
    keys = np.asarray(keys)
    if keys.dtype.kind in "iu":
        kmin, kmax = int(keys.min()), int(keys.max())
        if (kmax - kmin + 1) * n < 1 << 62:  # make keys unique: key * n + position
            return np.argsort((keys.astype(np.int64) - kmin) * np.int64(n) + np.arange(n, dtype=np.int64))
    order = np.argsort(keys)
    ks = keys[order]
    tie = ks[1:] == ks[:-1]
    if tie.any():
        in_run = np.zeros(n, dtype=bool)
        in_run[1:] = tie
        in_run[:-1] |= tie
        idx = np.flatnonzero(in_run)
        starts = np.ones(len(idx), dtype=bool)
        starts[1:] = ~tie[idx[1:] - 1]
        run_id = np.cumsum(starts)
        sub = np.lexsort((order[idx], run_id))
        order[idx] = order[idx][sub]
    return order.astype(np.int64, copy=False)


def dense_rank(values: np.ndarray) -> np.ndarray:
    """(n,) int64 dense rank of each value (equal values share a rank), in value order."""
    n = len(values)
    order = np.argsort(values)  # ties get the same rank, so stability is irrelevant
    sv = values[order]
    step = np.empty(n, dtype=np.int64)
    if n:
        step[0] = 0
        np.not_equal(sv[1:], sv[:-1], out=step[1:])
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.cumsum(step)
    return rank


def group_time_order(groups: np.ndarray, times: np.ndarray | None = None) -> np.ndarray:
    """Positions sorted by (group, time, input position), computed with one stable argsort.

    Parameters
    ----------
    groups : (n,) int array
        Non-negative group codes.
    times : (n,) numeric array, optional
        Sort key within a group (NaN not allowed); None keeps input order.

    Returns
    -------
    (n,) int64
    """
    g = np.asarray(groups).astype(np.int64, copy=False)
    n = len(g)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    n_groups = int(g.max()) + 1
    if times is None:
        return stable_argsort(g)
    t = np.asarray(times)
    if t.dtype.kind == "M":
        t = t.view(np.int64)
    if t.dtype.kind == "f" and np.all(t == np.floor(t)) and np.abs(t).max() < 2.0 ** 53:
        t = t.astype(np.int64)
    if t.dtype.kind in "iu":
        t = t.astype(np.int64, copy=False)
        lo = int(t.min())
        span = int(t.max()) - lo + 1
        if n_groups * span < 2 ** 62:
            return stable_argsort(g * np.int64(span) + (t - lo))
    r = dense_rank(t)
    span = int(r.max()) + 1
    return stable_argsort(g * np.int64(span) + r)


def group_random_order(groups: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Positions sorted by group, in a uniformly random order within each group."""
    g = np.asarray(groups).astype(np.int64, copy=False)
    n = len(g)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    return np.argsort(g * np.int64(n) + rng.permutation(n))
