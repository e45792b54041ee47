"""Cleaning of interaction logs, with a report of every row removed."""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ._ingest import (
    OPTIONAL_COLUMNS,
    PROPENSITY,
    REQUIRED_COLUMNS,
    REWARD,
    USER,
    InteractionsLike,
    read_interactions,
)

logger = logging.getLogger("recmeta")

#: Cleaning rules in the order they are applied; a row is counted under the first rule
#: that removes it, so ``sum(report.counts.values()) == n_input - n_output``.
RULES: tuple[str, ...] = (
    "missing",
    "non_finite",
    "propensity_out_of_range",
    "reward_out_of_range",
    "duplicate",
    "too_many_events",
)

_RULE_TEXT = {
    "missing": "missing value in a required field",
    "non_finite": "non-finite number (inf) in a required field",
    "propensity_out_of_range": "propensity outside (0, 1]",
    "reward_out_of_range": "reward outside the declared range",
    "duplicate": "exact duplicate of an earlier row",
    "too_many_events": "user above max_events_per_user",
}


@dataclass
class CleaningReport:
    """What :func:`clean` removed and why.

    Attributes
    ----------
    n_input, n_output : int
        Rows before and after cleaning.
    counts : dict of str to int
        Rows removed by each rule in :data:`RULES` (every rule is present, 0 if it
        removed nothing or was not requested). Each removed row is counted once, under
        the first rule (in :data:`RULES` order) that matched it.
    examples : dict of str to DataFrame
        Up to ``n_examples`` removed rows per rule, with their original index.
    removed_users : list
        External ids of the users removed by ``too_many_events``.
    required : list of str
        The fields checked for missing / non-finite values.
    reward_range : tuple or None
    max_events_per_user : int or None
    """

    n_input: int
    n_output: int
    counts: dict = field(default_factory=dict)
    examples: dict = field(default_factory=dict)
    removed_users: list = field(default_factory=list)
    required: list = field(default_factory=list)
    reward_range: tuple | None = None
    max_events_per_user: int | None = None

    @property
    def n_removed(self) -> int:
        """Total rows removed."""
        return self.n_input - self.n_output

    def __str__(self) -> str:
        lines = [
            (f"Cleaning report: {self.n_input:,} rows in, {self.n_output:,} kept, "
             f"{self.n_removed:,} removed")
        ]
        width = max(len(r) for r in RULES)
        for rule in RULES:
            lines.append(f"  {rule:<{width}}  {self.counts.get(rule, 0):>12,}  ({_RULE_TEXT[rule]})")
        if self.removed_users:
            shown = ", ".join(repr(u) for u in self.removed_users[:5])
            more = f" and {len(self.removed_users) - 5} more" if len(self.removed_users) > 5 else ""
            lines.append(f"  users removed by too_many_events: {shown}{more}")
        for rule in RULES:
            ex = self.examples.get(rule)
            if ex is not None and len(ex):
                lines.append(f"  examples of {rule}:")
                with pd.option_context("display.width", 120, "display.max_columns", 8):
                    lines.extend("    " + ln for ln in ex.to_string().splitlines())
        return "\n".join(lines)


def clean(
    interactions: InteractionsLike,
    *,
    reward_range: Sequence[float | None] | None = None,
    max_events_per_user: int | None = None,
    n_examples: int = 3,
) -> tuple[pd.DataFrame, CleaningReport]:
    """Remove invalid, duplicate and (on request) outlier rows from an interaction log.

    Rules, applied in this order (see :data:`RULES`):

    ``missing``
        A missing value (None, NaN, NaT, empty string) in ``user``, ``item`` or, when
        present, ``timestamp``, ``reward``, ``propensity`` or ``position``. Context
        columns may hold missing values.
    ``non_finite``
        ``inf`` / ``-inf`` in one of those numeric fields.
    ``propensity_out_of_range``
        ``propensity`` not in (0, 1].
    ``reward_out_of_range``
        ``reward`` outside ``reward_range`` (bounds inclusive), only when given.
    ``duplicate``
        A row equal in every column to an earlier (kept) row.
    ``too_many_events``
        Every row of a user with more than ``max_events_per_user`` remaining rows
        (bots, shared accounts), only when given.

    Parameters
    ----------
    interactions : DataFrame, pyarrow.Table, dict of arrays or path
        The log (see :func:`read_interactions`); not modified.
    reward_range : (low, high), optional
        Inclusive bounds for ``reward``; either may be None for no bound.
    max_events_per_user : int, optional
        Users with more events than this are removed entirely.
    n_examples : int
        Removed rows kept as examples per rule.

    Returns
    -------
    cleaned : DataFrame
        (n_output, c) the kept rows in their original order, with a fresh RangeIndex.
    report : CleaningReport
        Counts and examples per rule (also logged to the ``recmeta`` logger).

    Raises
    ------
    ValueError
        If ``reward_range`` is malformed or given without a ``reward`` column, or
        ``max_events_per_user`` is not a positive integer.
    """
    df = read_interactions(interactions)
    n = len(df)
    if reward_range is not None:
        if REWARD not in df.columns:
            raise ValueError(f"reward_range={reward_range!r} given but the interactions have no 'reward' column")
        try:
            lo, hi = reward_range
        except (TypeError, ValueError):
            raise ValueError(f"reward_range must be a pair (low, high), got {reward_range!r}") from None
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"reward_range low {lo} exceeds high {hi}")
        reward_range = (lo, hi)
    if max_events_per_user is not None and (
        isinstance(max_events_per_user, bool)
        or not isinstance(max_events_per_user, (int, np.integer))
        or max_events_per_user < 1
    ):
        raise ValueError(f"max_events_per_user must be a positive integer, got {max_events_per_user!r}")
    if not isinstance(n_examples, (int, np.integer)) or n_examples < 0:
        raise ValueError(f"n_examples must be a non-negative integer, got {n_examples!r}")

    required = [c for c in (*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS) if c in df.columns]
    alive = np.ones(n, dtype=bool)
    report = CleaningReport(
        n_input=n,
        n_output=n,
        counts={r: 0 for r in RULES},
        required=required,
        reward_range=reward_range,
        max_events_per_user=max_events_per_user,
    )

    def apply(rule: str, bad: np.ndarray) -> None:
        bad = bad & alive
        count = int(bad.sum())
        report.counts[rule] = count
        if count:
            report.examples[rule] = df.iloc[np.flatnonzero(bad)[:n_examples]]
            alive[bad] = False

    # string / object columns are factorized once: the codes serve the missing check, the
    # duplicate hashes and the per-user counts
    codes: dict = {}
    for col in df.columns:
        if _needs_codes(df[col]):
            try:
                c, uniques = pd.factorize(df[col], use_na_sentinel=True)
            except TypeError:  # unhashable cells (lists)
                continue
            codes[col] = (c.astype(np.int64, copy=False), pd.Index(uniques))

    # missing
    missing = np.zeros(n, dtype=bool)
    for col in required:
        if col in codes:
            c, uniques = codes[col]
            missing |= c < 0
            try:
                empty = int(uniques.get_indexer([""])[0])
            except (TypeError, ValueError):
                empty = -1
            if empty >= 0:
                missing |= c == empty
        else:
            missing |= df[col].isna().to_numpy()
    apply("missing", missing)

    # non-finite
    nonfinite = np.zeros(n, dtype=bool)
    for col in required:
        s = df[col]
        if pd.api.types.is_float_dtype(s.dtype):
            v = s.to_numpy(dtype=np.float64, na_value=np.nan)
            nonfinite |= np.isinf(v)
    apply("non_finite", nonfinite)

    if PROPENSITY in df.columns:
        p = df[PROPENSITY].to_numpy(dtype=np.float64, na_value=np.nan)
        with np.errstate(invalid="ignore"):
            apply("propensity_out_of_range", ~((p > 0) & (p <= 1)))

    if reward_range is not None:
        r = df[REWARD].to_numpy(dtype=np.float64, na_value=np.nan)
        bad = np.zeros(n, dtype=bool)
        with np.errstate(invalid="ignore"):
            if reward_range[0] is not None:
                bad |= r < reward_range[0]
            if reward_range[1] is not None:
                bad |= r > reward_range[1]
        apply("reward_out_of_range", bad)

    idx_alive = np.flatnonzero(alive)
    if len(idx_alive):
        dup = np.zeros(n, dtype=bool)
        dup[idx_alive] = _duplicated(df, idx_alive, {col: c for col, (c, _) in codes.items()})
        apply("duplicate", dup)

    if max_events_per_user is not None:
        if USER in codes:
            user_codes, user_ids = codes[USER]
        else:
            user_codes, user_ids = pd.factorize(df[USER], use_na_sentinel=True)
            user_ids = pd.Index(user_ids)
        counts = np.bincount(user_codes[alive], minlength=len(user_ids))
        heavy = counts > max_events_per_user
        bad = np.zeros(n, dtype=bool)
        bad[alive] = heavy[user_codes[alive]]
        report.removed_users = list(user_ids[heavy].tolist())
        apply("too_many_events", bad)

    out = df.iloc[np.flatnonzero(alive)].reset_index(drop=True) if not alive.all() else df.reset_index(drop=True)
    report.n_output = len(out)
    if report.n_removed:
        logger.info(
            "clean: removed %d of %d rows (%s)",
            report.n_removed,
            n,
            ", ".join(f"{k}={v}" for k, v in report.counts.items() if v),
        )
    return out, report


_MIX = np.uint64(0x9E3779B97F4A7C15)


def _needs_codes(s: pd.Series) -> bool:
    """Columns hashed through factorize codes: everything but plain numbers and datetimes."""
    dt = s.dtype
    if pd.api.types.is_float_dtype(dt) or pd.api.types.is_datetime64_any_dtype(dt):
        return False
    return not ((pd.api.types.is_integer_dtype(dt) or pd.api.types.is_bool_dtype(dt)) and isinstance(dt, np.dtype))


def _column_hash(s: pd.Series) -> np.ndarray:
    """(n,) uint64 key of each cell of a numeric / datetime column (NaN == NaN, -0.0 == 0.0)."""
    if pd.api.types.is_float_dtype(s.dtype):
        v = s.to_numpy(dtype=np.float64, na_value=np.nan) + 0.0  # -0.0 -> 0.0
        v[np.isnan(v)] = np.nan  # one NaN bit pattern
        return v.view(np.uint64)
    if pd.api.types.is_datetime64_any_dtype(s.dtype):
        return s.to_numpy(dtype="datetime64[ns]").view(np.uint64)
    return s.to_numpy(dtype=np.int64).view(np.uint64)


def _row_hash(df: pd.DataFrame, codes: dict) -> np.ndarray:
    """(n,) uint64 hash of each row; equal rows hash equally."""
    h = np.zeros(len(df), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for col in df.columns:
            if col in codes:
                c = codes[col].view(np.uint64)
            elif _needs_codes(df[col]):  # unhashable cells (lists): hash their string forms
                c = pd.factorize(df[col].astype(str))[0].astype(np.int64).view(np.uint64)
            else:
                c = _column_hash(df[col])
            h = (h ^ (c + _MIX + (h << np.uint64(6)) + (h >> np.uint64(2)))) * _MIX
    return h


def _duplicated(df: pd.DataFrame, rows: np.ndarray, codes: dict) -> np.ndarray:
    """``df.iloc[rows].duplicated(keep="first")``, via 64-bit row hashes verified exactly.

    Rows whose hash is unique among ``rows`` cannot be duplicates; the (few) rows sharing
    a hash are compared exactly with pandas, so a hash collision never removes a row.
    ``codes`` maps columns to their factorize codes (equal cells, equal codes).
    """
    m = len(rows)
    if len(df.columns) == 0 or m < 2:
        return np.zeros(m, dtype=bool)
    h = _row_hash(df, codes)
    h = h[rows] if m < len(df) else h
    # rows whose hash occurs more than once, found by sorting (faster than a hash table)
    order = np.argsort(h)
    hs = h[order]
    same = hs[1:] == hs[:-1]
    out = np.zeros(m, dtype=bool)
    if not same.any():
        return out
    in_run = np.zeros(m, dtype=bool)
    in_run[1:] = same
    in_run[:-1] |= same
    cand = np.sort(order[in_run])  # input order, so keep="first" keeps the earliest row
    sub = df.iloc[rows[cand]]
    try:
        out[cand] = sub.duplicated(keep="first").to_numpy()
    except TypeError:
        out[cand] = sub.astype(str).duplicated(keep="first").to_numpy()
    return out
