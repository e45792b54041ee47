"""Splits and meta-learning tasks: hand-written logs and hypothesis-generated ones."""
from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from recmeta_sdk import data
from recmeta_sdk.data import ColdSplit, Split


def _recbole_calcu_split_ids(tot, ratios):
    """RecBole 1.2.1's Dataset._calcu_split_ids, verbatim (the reference for 'ratio')."""
    cnt = [int(ratios[i] * tot) for i in range(len(ratios))]
    cnt[0] = tot - sum(cnt[1:])
    for i in range(1, len(ratios)):
        if cnt[0] <= 1:
            break
        if 0 < ratios[-i] * tot < 1:
            cnt[-i] += 1
            cnt[0] -= 1
    return cnt


def _log(rows) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["user", "item", "timestamp", "reward"])


def _assert_partition(df: pd.DataFrame, parts) -> None:
    """Every input row in exactly one part, unchanged (multiset equality via index + values)."""
    joined = pd.concat(parts)
    assert sorted(joined.index.tolist()) == sorted(df.index.tolist())
    pd.testing.assert_frame_equal(joined.sort_index(), df.sort_index(), check_dtype=True)


# --------------------------------------------------------------------------- hand-written

TINY = _log(
    [
        ("a", 1, 10, 1.0), ("a", 2, 20, 1.0), ("a", 3, 30, 1.0), ("a", 4, 40, 1.0),
        ("b", 1, 15, 1.0), ("b", 5, 5, 1.0),
        ("c", 2, 50, 1.0),
    ]
)


def test_leave_last_out_known():
    s = data.split(TINY, "leave_last_out")
    assert isinstance(s, Split)
    # a: 10,20,30,40 -> test 40, valid 30; b: 5 (idx 5), 15 (idx 4) -> test idx 4, train idx 5
    # c: single event -> train only (RecBole keeps one training row)
    assert s.test.index.tolist() == [3, 4]
    assert s.valid.index.tolist() == [2]
    assert s.train.index.tolist() == [0, 1, 5, 6]
    s2 = data.split(TINY, "leave_last_out", valid=False)
    assert s2.valid.empty and s2.test.index.tolist() == [3, 4]


def test_temporal_known():
    log = _log([("u", i, t, 1.0) for i, t in enumerate([9, 1, 8, 2, 7, 3, 6, 4, 5, 0])])
    s = data.split(log, "temporal")
    assert s.train["timestamp"].max() <= s.valid["timestamp"].min() <= s.test["timestamp"].max()
    assert len(s.train) == 8 and len(s.valid) == 1 and len(s.test) == 1
    assert s.test["timestamp"].tolist() == [9] and s.valid["timestamp"].tolist() == [8]


def test_ratio_counts_follow_recbole_and_seed():
    rows = [(u, i, i, 1.0) for u, n in (("a", 10), ("b", 3), ("c", 1), ("d", 25)) for i in range(n)]
    log = _log(rows)
    s1 = data.split(log, "ratio", seed=3)
    s2 = data.split(log, "ratio", seed=3)
    s3 = data.split(log, "ratio", seed=4)
    for a, b in zip((s1.train, s1.valid, s1.test), (s2.train, s2.valid, s2.test)):
        assert a.index.tolist() == b.index.tolist()
    assert s1.test.index.tolist() != s3.test.index.tolist()
    for u, n in (("a", 10), ("b", 3), ("c", 1), ("d", 25)):
        got = [int((p["user"] == u).sum()) for p in (s1.train, s1.valid, s1.test)]
        assert got == _recbole_calcu_split_ids(n, [0.8, 0.1, 0.1]), u


def test_cold_users_known():
    rows = []
    for u in range(10):
        for j in range(25):
            rows.append((f"u{u}", j, 1000 - j if u % 2 else j, 1.0))  # odd users logged in reverse
    log = _log(rows)
    s = data.split(log, "cold_users", fold=1, n_folds=5, k=5, query_after=20)
    assert isinstance(s, ColdSplit)
    assert len(s.held_out) == 2
    assert set(s.support["user"]) == set(s.held_out) == set(s.query["user"])
    assert not set(s.train["user"]) & set(s.held_out)
    for u in s.held_out:
        sup = s.support[s.support["user"] == u]["timestamp"]
        qry = s.query[s.query["user"] == u]["timestamp"]
        gap = s.gap[s.gap["user"] == u]["timestamp"]
        assert len(sup) == 5 and len(gap) == 15 and len(qry) == 5
        assert sup.max() < gap.min() and gap.max() < qry.min()
        all_ts = np.sort(log[log["user"] == u]["timestamp"].to_numpy())
        assert sorted(sup.tolist()) == all_ts[:5].tolist()
    _assert_partition(log, [s.train, s.support, s.gap, s.query])
    # the query set does not depend on k
    for k in (10, 20):
        sk = data.split(log, "cold_users", fold=1, k=k)
        assert sk.query.index.tolist() == s.query.index.tolist()
        assert len(sk.support) == 2 * k
    # the folds partition the users, deterministically from the seed
    held = [set(data.split(log, "cold_users", fold=f).held_out) for f in range(5)]
    assert set().union(*held) == set(log["user"]) and sum(map(len, held)) == 10
    expected = np.array_split(np.random.default_rng(2020).permutation(10), 5)
    users_sorted = sorted(set(log["user"]))
    assert held[1] == {users_sorted[j] for j in expected[1]}


def test_cold_items_and_categories():
    rows = [(f"u{j % 7}", f"i{j % 6}", j, 1.0) for j in range(60)]
    log = _log(rows)
    s = data.split(log, "cold_items", n_folds=3, k=2, query_after=4)
    assert s.by == "item" and len(s.held_out) == 2
    assert not set(s.train["item"]) & set(s.held_out)
    assert all((s.support["item"] == i).sum() == 2 for i in s.held_out)
    _assert_partition(log, [s.train, s.support, s.gap, s.query])
    cats = {f"i{j}": ("odd" if j % 2 else "even") for j in range(6)}
    c = data.split(log, "cold_categories", category=cats, n_folds=2, k=1, query_after=1)
    assert c.by == "category" and len(c.held_out) == 1
    held_items = {i for i, cat in cats.items() if cat == c.held_out[0]}
    assert set(c.support["item"]) | set(c.query["item"]) == held_items
    assert not set(c.train["item"]) & held_items
    _assert_partition(log, [c.train, c.support, c.gap, c.query])


def test_split_errors_name_the_problem():
    with pytest.raises(ValueError, match="'random'"):
        data.split(TINY, "random")
    with pytest.raises(ValueError, match="timestamp"):
        data.split(TINY.drop(columns="timestamp"), "leave_last_out")
    with pytest.raises(ValueError, match="fold"):
        data.split(TINY, "cold_users", fold=5, n_folds=2)
    with pytest.raises(ValueError, match="query_after"):
        data.split(TINY, "cold_users", n_folds=2, k=30, query_after=20)
    with pytest.raises(ValueError, match="n_folds"):
        data.split(TINY, "cold_users", n_folds=4)
    with pytest.raises(TypeError, match="bogus.*valid options"):
        data.split(TINY, "ratio", bogus=1)
    with pytest.raises(ValueError, match="category"):
        data.split(TINY, "cold_categories", n_folds=2)
    with pytest.raises(ValueError, match="ratios"):
        data.split(TINY, "ratio", ratios=(1, 2))


# --------------------------------------------------------------------------- hypothesis

_rows = st.lists(
    st.tuples(st.sampled_from(["u1", "u2", "u3", "u4", "u5", "u6"]), st.integers(0, 5), st.integers(0, 8),
              st.sampled_from([0.0, 1.0])),
    min_size=1, max_size=60,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=_rows, seed=st.integers(0, 2**31))
def test_warm_splits_lose_and_duplicate_nothing(rows, seed):
    log, _ = data.clean(_log(rows))  # duplicates removed first, like the real pipeline
    assume(not log.empty)
    r = data.split(log, "ratio", seed=seed)
    _assert_partition(log, [r.train, r.valid, r.test])
    for u, grp in log.groupby("user"):
        got = [int((p["user"] == u).sum()) for p in (r.train, r.valid, r.test)]
        assert got == _recbole_calcu_split_ids(len(grp), [0.8, 0.1, 0.1])
    t = data.split(log, "temporal")
    _assert_partition(log, [t.train, t.valid, t.test])
    parts = [p["timestamp"] for p in (t.train, t.valid, t.test) if len(p)]
    for a, b in itertools.pairwise(parts):
        assert a.max() <= b.min()
    lo = data.split(log, "leave_last_out")
    _assert_partition(log, [lo.train, lo.valid, lo.test])
    for u, grp in log.groupby("user"):
        test_u = lo.test[lo.test["user"] == u]
        valid_u = lo.valid[lo.valid["user"] == u]
        train_u = lo.train[lo.train["user"] == u]
        assert len(train_u) >= 1 and len(test_u) == (1 if len(grp) >= 2 else 0)
        assert len(valid_u) == (1 if len(grp) >= 3 else 0)
        if len(test_u):
            assert test_u["timestamp"].iloc[0] == grp["timestamp"].max()
            assert train_u["timestamp"].max() <= test_u["timestamp"].iloc[0]
        if len(valid_u):
            assert valid_u["timestamp"].iloc[0] <= test_u["timestamp"].iloc[0]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=_rows, k=st.integers(0, 4), extra=st.integers(0, 3), fold=st.integers(0, 1))
def test_cold_split_support_query_disjoint_and_temporal(rows, k, extra, fold):
    log = _log(rows)
    assume(log["user"].nunique() >= 2)
    s = data.split(log, "cold_users", fold=fold, n_folds=2, k=k, query_after=k + extra)
    _assert_partition(log, [s.train, s.support, s.gap, s.query])
    assert not set(s.support.index) & set(s.query.index)
    assert not set(s.train["user"]) & set(s.held_out)
    for u in s.held_out:
        n_u = int((log["user"] == u).sum())
        sup = s.support[s.support["user"] == u]
        qry = s.query[s.query["user"] == u]
        assert len(sup) == min(k, n_u)
        assert len(qry) == max(0, n_u - (k + extra))
        if len(sup) and len(qry):
            assert sup["timestamp"].max() <= qry["timestamp"].min()
            # ties are broken by input order: every support row precedes every query row
            key = list(zip(log.loc[sup.index, "timestamp"], sup.index))
            qkey = list(zip(log.loc[qry.index, "timestamp"], qry.index))
            assert max(key) < min(qkey)


# --------------------------------------------------------------------------- tasks


def test_make_tasks_by_user_known():
    ts = data.make_tasks(TINY, by="user", support_size=2)
    assert ts.keys.tolist() == ["a", "b"]  # c has one interaction: dropped
    assert ts.n_dropped == 1
    a = ts[0]
    assert a.support["timestamp"].tolist() == [10, 20] and a.query["timestamp"].tolist() == [30, 40]
    b = ts[1]
    assert b.support["timestamp"].tolist() == [5] and b.query["timestamp"].tolist() == [15]
    assert ts.is_support.tolist() == [True, True, False, False, True, False]
    with pytest.raises(IndexError):
        ts[5]


def test_make_tasks_segment_category_campaign():
    users = pd.DataFrame({"occupation": ["x", "y", "x"]}, index=["a", "b", "c"])
    seg = data.make_tasks(TINY, by="segment", users=users, column="occupation", support_frac=0.5)
    assert seg.keys.tolist() == ["x", "y"]
    x = seg[0]
    assert set(x.support.index) | set(x.query.index) == {0, 1, 2, 3, 6}
    assert len(x.support) == 2
    items = pd.DataFrame({"genres": ["Comedy|Drama", "Drama", "Comedy", None, "Action"]}, index=[1, 2, 3, 4, 5])
    cat = data.make_tasks(TINY, by="category", items=items, column="genres", min_interactions=2)
    sizes = dict(zip(cat.keys.tolist(), cat.sizes.tolist()))
    # item 1 (rows 0, 4) is Comedy and Drama; item 2 (rows 1, 6) Drama; item 3 (row 2) Comedy; item 5 Action
    assert sizes == {"Comedy": 3, "Drama": 4}
    assert cat.n_dropped == 1  # Action has a single interaction
    log = TINY.assign(campaign=["m", "m", "w", "w", "m", "w", "w"])
    camp = data.make_tasks(log, by="campaign", support_size=1, temporal=False, seed=1)
    assert camp.keys.tolist() == ["m", "w"] and camp.n_support.tolist() == [1, 1]
    with pytest.raises(ValueError, match="column"):
        data.make_tasks(TINY, by="segment")
    with pytest.raises(ValueError, match="'campaign'"):
        data.make_tasks(TINY, by="campaign")
    with pytest.raises(ValueError, match="'region'"):
        data.make_tasks(TINY, by="region")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=_rows, support_size=st.none() | st.integers(1, 5), frac=st.floats(0.1, 0.9))
def test_make_tasks_properties(rows, support_size, frac):
    log = _log(rows)
    ts = data.make_tasks(log, by="user", support_size=support_size, support_frac=frac)
    counts = log["user"].value_counts()
    assert set(ts.keys.tolist()) == set(counts[counts >= 2].index)
    assert ts.n_dropped == int((counts < 2).sum())
    assert sorted(ts.rows.tolist()) == sorted(np.flatnonzero(log["user"].map(counts).to_numpy() >= 2).tolist())
    for t in range(len(ts)):
        sup, qry = ts.support_rows(t), ts.query_rows(t)
        assert len(sup) >= 1 and len(qry) >= 1 and not set(sup) & set(qry)
        if support_size is not None:
            assert len(sup) == min(support_size, len(sup) + len(qry) - 1)
        key_s = [(log["timestamp"].iloc[i], i) for i in sup]
        key_q = [(log["timestamp"].iloc[i], i) for i in qry]
        assert key_s == sorted(key_s) and key_q == sorted(key_q) and max(key_s) < min(key_q)
        assert (log["user"].iloc[np.concatenate([sup, qry])] == ts.keys[t]).all()
