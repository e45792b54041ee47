"""Vectorised training-array builders: histories, negatives, full-catalogue targets."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from ._order import group_time_order, unique_sorted

logger = logging.getLogger("recmeta")


def _int_array(x, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        return arr.astype(np.int64)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must be integer dense ids, got dtype {arr.dtype}")
    if arr.min() < 0:
        raise ValueError(f"{name} holds negative (unknown) ids, e.g. {int(arr[arr < 0][0])}")
    return arr.astype(np.int64, copy=False)


@dataclass
class Sequences:
    """For every interaction, the user's most recent ``L`` items before it, stored once.

    The history of input row ``i`` is ``items_sorted[start[i]:end[i]]`` (oldest first,
    at most ``L`` items, never including row ``i`` itself): windows overlap, so the
    whole structure takes O(n) memory; :meth:`padded` and :meth:`csr` materialise the
    bags of a batch of rows.

    Attributes
    ----------
    L : int
        Maximum history length.
    items_sorted : (n,) int64
        Item ids ordered by (user, time, input position).
    order : (n,) int64
        Input row of each position of ``items_sorted``.
    start, end : (n,) int64
        Per input row, the window into ``items_sorted``; ``0 <= end - start <= L``.
    """

    L: int
    items_sorted: np.ndarray
    order: np.ndarray
    start: np.ndarray
    end: np.ndarray

    def __len__(self) -> int:
        return len(self.start)

    def __repr__(self) -> str:
        return f"Sequences(n={len(self)}, L={self.L}, mean_length={float(self.lengths.mean()) if len(self) else 0.0:.1f})"

    @property
    def lengths(self) -> np.ndarray:
        """(n,) int64 history length of each row."""
        return self.end - self.start

    def _rows(self, rows) -> np.ndarray:
        if rows is None:
            return np.arange(len(self), dtype=np.int64)
        r = np.asarray(rows)
        if r.dtype == bool:
            if r.shape != (len(self),):
                raise ValueError(f"boolean rows must have shape ({len(self)},), got {r.shape}")
            return np.flatnonzero(r)
        r = r.astype(np.int64, copy=False).ravel()
        if r.size and (r.min() < 0 or r.max() >= len(self)):
            raise ValueError(f"rows out of range [0, {len(self)})")
        return r

    def padded(self, rows=None, *, pad_value: int = -1, dtype=np.int64) -> np.ndarray:
        """Histories as a left-padded matrix (most recent item in the last column).

        Parameters
        ----------
        rows : (b,) int or bool array, optional
            Input rows to build; default all.
        pad_value : int
            Fill of the empty leading slots.
        dtype : numpy dtype

        Returns
        -------
        ndarray
            (b, L) item ids.
        """
        r = self._rows(rows)
        s, e = self.start[r], self.end[r]
        pos = e[:, None] - self.L + np.arange(self.L, dtype=np.int64)[None, :]
        valid = pos >= s[:, None]
        out = np.where(valid, self.items_sorted[np.where(valid, pos, 0)] if len(self.items_sorted) else 0, pad_value)
        return out.astype(dtype, copy=False)

    def csr(self, rows=None) -> tuple[np.ndarray, np.ndarray]:
        """Histories of a batch as a bag in CSR form, for an embedding bag.

        Parameters
        ----------
        rows : (b,) int or bool array, optional
            Input rows to build; default all (memory O(n * L)).

        Returns
        -------
        indices : (nnz,) int64
            Item ids, bag by bag, oldest first.
        offsets : (b + 1,) int64
            Bag ``j`` is ``indices[offsets[j]:offsets[j + 1]]``.
        """
        r = self._rows(rows)
        s, e = self.start[r], self.end[r]
        lengths = e - s
        offsets = np.zeros(len(r) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        within = np.arange(offsets[-1], dtype=np.int64) - np.repeat(offsets[:-1], lengths)
        indices = self.items_sorted[np.repeat(s, lengths) + within]
        return indices, offsets


def build_sequences(
    item_ids,
    user_ids,
    timestamps=None,
    L: int = 50,
) -> Sequences:
    """Index every interaction's preceding history (the user's last ``L`` items).

    Parameters
    ----------
    item_ids : (n,) int array
        Dense item ids (``>= 0``).
    user_ids : (n,) int array
        Dense user ids (``>= 0``).
    timestamps : (n,) array, optional
        Event times (numeric or datetime64); default: the input order is the time order.
        Ties keep input order, so an earlier row with the same time counts as before.
    L : int
        Maximum history length, ``>= 1``.

    Returns
    -------
    Sequences
        O(n) index; use :meth:`Sequences.padded` / :meth:`Sequences.csr` per batch.

    Raises
    ------
    ValueError
        On length mismatch, negative ids or ``L < 1``.
    """
    items = _int_array(item_ids, "item_ids")
    users = _int_array(user_ids, "user_ids")
    n = len(items)
    if len(users) != n:
        raise ValueError(f"item_ids and user_ids differ in length: {n} vs {len(users)}")
    if isinstance(L, bool) or not isinstance(L, (int, np.integer)) or L < 1:
        raise ValueError(f"L must be a positive integer, got {L!r}")
    ts = None
    if timestamps is not None:
        ts = np.asarray(timestamps)
        if ts.shape != (n,):
            raise ValueError(f"timestamps must have shape ({n},), got {ts.shape}")
        if ts.dtype.kind == "f" and np.isnan(ts).any():
            raise ValueError("timestamps hold NaN; run recmeta_sdk.data.clean first")
    order = group_time_order(users, ts)
    users_sorted = users[order]
    new_group = np.ones(n, dtype=bool)
    new_group[1:] = users_sorted[1:] != users_sorted[:-1]
    first = np.flatnonzero(new_group)
    group_start = np.repeat(first, np.diff(np.append(first, n)))
    pos = np.arange(n, dtype=np.int64)
    start_sorted = np.maximum(group_start, pos - L)
    start = np.empty(n, dtype=np.int64)
    end = np.empty(n, dtype=np.int64)
    start[order] = start_sorted
    end[order] = pos
    return Sequences(L=int(L), items_sorted=items[order], order=order.astype(np.int64), start=start, end=end)


def user_histories(
    item_ids,
    user_ids,
    timestamps=None,
    L: int = 50,
    *,
    n_users: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Every user's most recent ``L`` items (after all of their interactions), as CSR.

    This is the history a model encodes at recommend time; :func:`build_sequences`
    gives the history before each training target instead.

    Parameters
    ----------
    item_ids, user_ids : (n,) int arrays
        Dense ids of interactions.
    timestamps : (n,) array, optional
        Event times; default input order. Ties keep input order.
    L : int
        Maximum history length.
    n_users : int, optional
        Number of users (rows); default ``max(user_ids) + 1``.

    Returns
    -------
    indices : (nnz,) int64
        Items, user by user, oldest first.
    offsets : (n_users + 1,) int64
        User ``u``'s history is ``indices[offsets[u]:offsets[u + 1]]`` (empty if none).
    """
    items = _int_array(item_ids, "item_ids")
    users = _int_array(user_ids, "user_ids")
    n = len(items)
    if len(users) != n:
        raise ValueError(f"item_ids and user_ids differ in length: {n} vs {len(users)}")
    if isinstance(L, bool) or not isinstance(L, (int, np.integer)) or L < 1:
        raise ValueError(f"L must be a positive integer, got {L!r}")
    n_rows = (int(users.max()) + 1 if n else 0) if n_users is None else int(n_users)
    if n and users.max() >= n_rows:
        raise ValueError(f"user id {int(users.max())} >= n_users={n_rows}")
    ts = None if timestamps is None else np.asarray(timestamps)
    if ts is not None and ts.shape != (n,):
        raise ValueError(f"timestamps must have shape ({n},), got {ts.shape}")
    order = group_time_order(users, ts)
    users_sorted = users[order]
    counts = np.bincount(users_sorted, minlength=n_rows)
    ends = np.cumsum(counts)
    from_end = ends[users_sorted] - 1 - np.arange(n, dtype=np.int64)
    keep = from_end < L
    offsets = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(np.minimum(counts, L), out=offsets[1:])
    return items[order][keep], offsets


def user_item_csr(user_ids, item_ids, n_users: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The distinct items of every user, as CSR.

    Parameters
    ----------
    user_ids, item_ids : (n,) int arrays
        Dense ids of interactions.
    n_users : int, optional
        Number of users (rows); default ``max(user_ids) + 1``.

    Returns
    -------
    indptr : (n_users + 1,) int64
    indices : (nnz,) int64
        Items of user ``u`` are ``indices[indptr[u]:indptr[u + 1]]``, sorted, distinct.
    """
    users = _int_array(user_ids, "user_ids")
    items = _int_array(item_ids, "item_ids")
    if len(users) != len(items):
        raise ValueError(f"user_ids and item_ids differ in length: {len(users)} vs {len(items)}")
    n_rows = int(users.max()) + 1 if n_users is None and len(users) else int(n_users or 0)
    if len(users) and users.max() >= n_rows:
        raise ValueError(f"user id {int(users.max())} >= n_users={n_rows}")
    n_cols = int(items.max()) + 1 if len(items) else 1
    keys = unique_sorted(users * np.int64(n_cols) + items)
    u = keys // n_cols
    indices = keys - u * n_cols
    indptr = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(u, minlength=n_rows), out=indptr[1:])
    return indptr, indices.astype(np.int64, copy=False)


def _member(keys: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Vectorised membership of the (user * n_cols + item) keys ``q`` in sorted ``keys``."""
    if len(keys) == 0 or len(q) == 0:
        return np.zeros(q.shape, dtype=bool)
    # searching sorted needles is far more cache-friendly than random ones
    order = np.argsort(q)
    qs = q[order]
    pos = np.searchsorted(keys, qs)
    hit = keys[np.minimum(pos, len(keys) - 1)] == qs
    out = np.empty(len(q), dtype=bool)
    out[order] = hit
    return out


def sample_negatives(
    user_ids,
    n_items: int,
    n_negatives: int,
    *,
    positives: tuple[np.ndarray, np.ndarray] | None = None,
    probs: np.ndarray | None = None,
    seed: int | np.random.Generator | None = None,
    max_rounds: int = 50,
) -> np.ndarray:
    """Sample negative items for each row, avoiding the user's positives.

    Rejection sampling, vectorised over rows: collisions with a positive are redrawn for
    up to ``max_rounds`` rounds; rows still colliding then draw exactly from their
    complement (only those rows are handled one by one).

    Parameters
    ----------
    user_ids : (n,) int array
        Dense user id of each row (e.g. each training target).
    n_items : int
        Catalogue size; negatives are in ``[0, n_items)``.
    n_negatives : int
        Negatives per row.
    positives : (indptr, indices), optional
        Items to avoid per user, as from :func:`user_item_csr`. None: no exclusion.
    probs : (n_items,) array, optional
        Sampling distribution (e.g. popularity ** 0.75); default uniform.
    seed : int or numpy Generator, optional
    max_rounds : int

    Returns
    -------
    ndarray
        (n, n_negatives) int64 item ids.

    Raises
    ------
    ValueError
        If a user's positives cover every item of non-zero probability.
    """
    users = _int_array(user_ids, "user_ids")
    if isinstance(n_items, bool) or not isinstance(n_items, (int, np.integer)) or n_items < 1:
        raise ValueError(f"n_items must be a positive integer, got {n_items!r}")
    if isinstance(n_negatives, bool) or not isinstance(n_negatives, (int, np.integer)) or n_negatives < 1:
        raise ValueError(f"n_negatives must be a positive integer, got {n_negatives!r}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    if probs is not None:
        p = np.asarray(probs, dtype=np.float64)
        if p.shape != (n_items,) or (p < 0).any() or not np.isfinite(p).all() or p.sum() <= 0:
            raise ValueError(f"probs must be ({n_items},) non-negative finite weights with a positive sum")
        cdf = np.cumsum(p / p.sum())
        cdf[-1] = 1.0

        def draw(size):
            return np.minimum(np.searchsorted(cdf, rng.random(size), side="right"), n_items - 1)
    else:
        p = None

        def draw(size):
            return rng.integers(0, n_items, size=size, dtype=np.int64)

    out = draw((len(users), n_negatives)).astype(np.int64, copy=False)
    if positives is None or len(users) == 0:
        return out
    indptr, indices = (np.asarray(a, dtype=np.int64) for a in positives)
    if len(indptr) - 1 <= int(users.max()):
        raise ValueError(f"positives cover {len(indptr) - 1} users but user id {int(users.max())} was given")
    if len(indices) and (indices.min() < 0 or indices.max() >= n_items):
        raise ValueError(f"positives hold item ids outside [0, {n_items})")
    n_cols = np.int64(n_items)
    row_of = np.repeat(np.arange(len(indptr) - 1, dtype=np.int64), np.diff(indptr))
    keys = row_of * n_cols + indices
    if len(keys) > 1 and (keys[1:] <= keys[:-1]).any():
        keys = unique_sorted(keys)
        row_of = keys // n_cols
    blocking = np.ones(len(keys), dtype=np.float64) if p is None else (p[keys % n_cols] > 0).astype(np.float64)
    n_blocked = np.bincount(row_of, weights=blocking, minlength=len(indptr) - 1)
    allowed_total = n_items if p is None else int((p > 0).sum())
    present = unique_sorted(users)
    full = present[n_blocked[present] >= allowed_total]
    if len(full):
        raise ValueError(f"user {int(full[0])} has interacted with every sampleable item; no negative exists")
    del row_of, blocking
    flat_users = np.repeat(users, n_negatives)
    flat = out.ravel()
    bad = np.flatnonzero(_member(keys, flat_users * n_cols + flat))
    rounds = 0
    while len(bad) and rounds < max_rounds:
        flat[bad] = draw(len(bad))
        still = _member(keys, flat_users[bad] * n_cols + flat[bad])
        bad = bad[still]
        rounds += 1
    if len(bad):
        logger.debug("sample_negatives: %d draws fall back to exact complement sampling", len(bad))
        for j in bad:  # rare: users whose positives cover nearly the whole catalogue
            u = flat_users[j]
            mask = np.ones(n_items, dtype=bool)
            mask[indices[indptr[u]:indptr[u + 1]]] = False
            cand = np.flatnonzero(mask if p is None else mask & (p > 0))
            w = None if p is None else p[cand] / p[cand].sum()
            flat[j] = rng.choice(cand, p=w)
    return flat.reshape(out.shape)


def full_catalogue_targets(
    positives: tuple[np.ndarray, np.ndarray],
    users,
    n_items: int,
    *,
    dtype=np.float32,
) -> np.ndarray:
    """Multi-hot targets over the whole catalogue for a batch of users.

    Parameters
    ----------
    positives : (indptr, indices)
        Items per user, as from :func:`user_item_csr`.
    users : (b,) int array
        Dense user ids of the batch.
    n_items : int
        Catalogue size.
    dtype : numpy dtype

    Returns
    -------
    ndarray
        (b, n_items) with 1 where the user interacted with the item, else 0.
    """
    indptr, indices = (np.asarray(a, dtype=np.int64) for a in positives)
    u = _int_array(users, "users")
    if len(u) and u.max() >= len(indptr) - 1:
        raise ValueError(f"user id {int(u.max())} >= number of users {len(indptr) - 1}")
    if len(indices) and indices.max() >= n_items:
        raise ValueError(f"item id {int(indices.max())} >= n_items={n_items}")
    lengths = indptr[u + 1] - indptr[u]
    out = np.zeros((len(u), n_items), dtype=dtype)
    row = np.repeat(np.arange(len(u), dtype=np.int64), lengths)
    within = np.arange(lengths.sum(), dtype=np.int64) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    out[row, indices[np.repeat(indptr[u], lengths) + within]] = 1
    return out
