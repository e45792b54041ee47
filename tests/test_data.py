"""Data layer: ingest, id maps, encoding, side features, cleaning (hand-written and hypothesis logs)."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recmeta_sdk import data
from recmeta_sdk.data import UNKNOWN, CleaningReport, FeatureEncoder, IdMap

# --------------------------------------------------------------------------- ingest


def _tiny() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "user": ["a", "a", "b", "c"],
            "item": ["x", "y", "x", "z"],
            "timestamp": [3, 1, 2, 5],
            "reward": [1.0, 0.0, 1.0, 0.5],
            "ctx": [0.1, 0.2, 0.3, 0.4],
        }
    )


def test_read_interactions_all_sources_agree(tmp_path):
    df = _tiny()
    csv = tmp_path / "log.csv"
    pq = tmp_path / "log.parquet"
    df.to_csv(csv, index=False)
    df.to_parquet(pq, index=False)
    sources = [df, pa.Table.from_pandas(df), {c: df[c].to_numpy() for c in df.columns}, csv, str(pq)]
    for src in sources:
        got = data.read_interactions(src)
        assert list(got.columns) == list(df.columns)
        assert got["user"].tolist() == ["a", "a", "b", "c"]
        assert got["timestamp"].tolist() == [3, 1, 2, 5]
        np.testing.assert_allclose(got["reward"].to_numpy(dtype=float), [1.0, 0.0, 1.0, 0.5])


def test_read_interactions_renames_and_validates():
    df = pd.DataFrame({"uid": [1, 2], "iid": [3, 4], "rating": [5.0, 4.0]})
    got = data.read_interactions(df, columns={"uid": "user", "iid": "item", "rating": "reward"})
    assert list(got.columns) == ["user", "item", "reward"]
    assert list(df.columns) == ["uid", "iid", "rating"]  # input untouched
    with pytest.raises(ValueError, match="'user'"):
        data.read_interactions(df)
    with pytest.raises(ValueError, match="not found"):
        data.read_interactions(df, columns={"nope": "user"})
    with pytest.raises(TypeError, match="'reward'"):
        data.read_interactions(pd.DataFrame({"user": [1], "item": [2], "reward": ["high"]}))
    with pytest.raises(TypeError, match="DataFrame"):
        data.read_interactions(42)
    with pytest.raises(ValueError, match="equal length"):
        data.read_interactions({"user": np.arange(3), "item": np.arange(2)})
    with pytest.raises(ValueError, match="unknown interaction file type"):
        data.read_interactions("log.json")


def test_string_timestamps_are_parsed():
    df = pd.DataFrame({"user": [1, 1], "item": [1, 2], "timestamp": ["2020-01-02 00:00:00+00:00", "2020-01-01"]})
    got = data.read_interactions(df)
    assert pd.api.types.is_datetime64_any_dtype(got["timestamp"])
    ts = data.timestamp_array(got["timestamp"])
    assert ts[0] - ts[1] == 86400.0


# --------------------------------------------------------------------------- id maps


def test_idmap_round_trip_and_unknown():
    m = IdMap.fit(np.array(["b", "a", "b", "c"], dtype=object))
    assert len(m) == 3
    assert m.ids.tolist() == ["b", "a", "c"]  # order of first appearance
    np.testing.assert_array_equal(m.to_index(["c", "b", "zzz"]), [2, 0, UNKNOWN])
    assert int(m.to_index("a")) == 1
    assert m.to_external([2, 0]).tolist() == ["c", "b"]
    assert "a" in m and "q" not in m
    back = IdMap.from_json(m.to_json())
    assert back == m
    assert json.loads(m.to_json()) == {"kind": "str", "ids": ["b", "a", "c"]}
    with pytest.raises(ValueError, match="out of range"):
        m.to_external([UNKNOWN])
    with pytest.raises(ValueError, match="unique"):
        IdMap(["a", "a"])


def test_idmap_int_ids_and_type_mismatch():
    m, dense = IdMap.fit_transform(np.array([10, 30, 10, 20]))
    np.testing.assert_array_equal(dense, [0, 1, 0, 2])
    d = m.to_dict()
    assert d == {"kind": "int", "ids": [10, 30, 20]}
    assert IdMap.from_dict(d) == m
    # a string that looks like a known int id is still unknown: no silent coercion
    np.testing.assert_array_equal(m.to_index(np.array(["10", "30"], dtype=object)), [UNKNOWN, UNKNOWN])
    with pytest.raises(ValueError, match="kind"):
        IdMap.from_dict({"ids": [1]})


def test_encode_with_existing_maps_marks_unknown():
    train = _tiny()
    enc = data.encode(train)
    assert enc.n_users == 3 and enc.n_items == 3
    np.testing.assert_array_equal(enc.user_ids, [0, 0, 1, 2])
    np.testing.assert_array_equal(enc.item_ids, [0, 1, 0, 2])
    assert enc.rewards.dtype == np.float32
    np.testing.assert_allclose(enc.context["ctx"], [0.1, 0.2, 0.3, 0.4], rtol=1e-6)
    new = pd.DataFrame({"user": ["a", "new"], "item": ["q", "x"]})
    enc2 = data.encode(new, user_map=enc.user_map, item_map=enc.item_map)
    np.testing.assert_array_equal(enc2.user_ids, [0, UNKNOWN])
    np.testing.assert_array_equal(enc2.item_ids, [UNKNOWN, 0])
    with pytest.raises(ValueError, match="clean"):
        data.encode(pd.DataFrame({"user": ["a", None], "item": ["x", "y"]}))


# --------------------------------------------------------------------------- side features


def test_feature_encoder_known_bags():
    items = pd.DataFrame(
        {
            "genres": ["Comedy|Drama", "Drama", None, "Action|Comedy"],
            "kind": ["film", "film", "short", None],
            "year": [1990.0, 2000.0, np.nan, 2010.0],
            "price": [1.0, 2.0, 3.0, 4.0],
        },
        index=pd.Index([10, 20, 30, 40], name="item"),
    )
    enc = FeatureEncoder(multi_valued=["genres"], categorical=["kind"], numeric=["year", "price"],
                         numeric_mode={"year": "normalize", "price": "bucketize"}, n_buckets=2)
    out = enc.fit_transform(items)
    # vocabulary order: categorical, then multi-valued, then bucketised numeric columns
    assert enc.tokens == ["kind=film", "kind=short", "genres=Action", "genres=Comedy", "genres=Drama",
                          "price#0", "price#1"]
    bags = [out.indices[out.offsets[j]:out.offsets[j + 1]].tolist() for j in range(4)]
    tok = {t: i for i, t in enumerate(enc.tokens)}
    assert sorted(bags[0]) == sorted([tok["genres=Comedy"], tok["genres=Drama"], tok["kind=film"], tok["price#0"]])
    assert sorted(bags[1]) == sorted([tok["genres=Drama"], tok["kind=film"], tok["price#0"]])
    assert sorted(bags[2]) == sorted([tok["kind=short"], tok["price#1"]])
    assert sorted(bags[3]) == sorted([tok["genres=Action"], tok["genres=Comedy"], tok["price#1"]])
    assert out.numeric_columns == ["year"]
    np.testing.assert_allclose(out.numeric[:, 0], [-math.sqrt(1.5), 0.0, 0.0, math.sqrt(1.5)], rtol=1e-6)
    # aligned to an id map with an entity missing from the table, and an unseen value
    idx = IdMap([40, 99, 10])
    more = pd.concat([items, pd.DataFrame({"genres": ["Western"], "kind": ["film"], "year": [2000.0], "price": [9.0]},
                                          index=pd.Index([99], name="item"))])
    out2 = FeatureEncoder.from_json(enc.to_json()).transform(more, index=idx)
    b = [out2.indices[out2.offsets[j]:out2.offsets[j + 1]].tolist() for j in range(3)]
    assert sorted(b[0]) == sorted(bags[3])
    assert sorted(b[1]) == sorted([tok["kind=film"], tok["price#1"]])  # Western unknown: no token
    assert sorted(b[2]) == sorted(bags[0])
    out3 = enc.transform(items, index=IdMap([10, 12345]))
    assert out3.offsets.tolist()[-1] == len(bags[0])  # absent entity: empty bag
    np.testing.assert_array_equal(out3.numeric[1], [0.0])


def test_feature_encoder_infers_kinds_and_lists():
    users = pd.DataFrame({"age": [20, 30], "tags": [["a", "b"], ["b"]], "job": ["x", "y"]}, index=["u1", "u2"])
    enc = FeatureEncoder().fit(users)
    assert enc.numeric == ["age"] and enc.multi_valued == ["tags"] and enc.categorical == ["job"]
    out = enc.transform(users)
    assert out.n_tokens == 4 and out.offsets.tolist() == [0, 3, 5]
    with pytest.raises(ValueError, match="'nope'"):
        FeatureEncoder(categorical=["nope"]).fit(users)
    with pytest.raises(ValueError, match="numeric_mode"):
        FeatureEncoder(numeric=["age"], numeric_mode="log").fit(users)


# --------------------------------------------------------------------------- cleaning, hand-written


def test_clean_known_log_every_rule():
    log = pd.DataFrame(
        {
            "user": ["a", "a", "a", None, "b", "b", "c", "c", "bot", "bot", "bot", "", "d"],
            "item": ["x", "x", "y", "x", "x", "y", "x", "y", "x", "y", "z", "x", "z"],
            "timestamp": [1, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12],
            "reward": [1.0, 1.0, 2.0, 1.0, np.inf, 7.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, np.nan],
            "propensity": [0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.0, 1.5, 0.5, 0.5, 0.5, 0.5, 0.5],
        }
    )
    out, rep = data.clean(log, reward_range=(0, 5), max_events_per_user=2)
    assert isinstance(rep, CleaningReport)
    assert rep.counts == {
        "missing": 3,  # user None, user "", reward NaN
        "non_finite": 1,
        "propensity_out_of_range": 2,
        "reward_out_of_range": 1,
        "duplicate": 1,
        "too_many_events": 3,
    }
    assert rep.n_input == 13 and rep.n_output == 2 and rep.n_removed == 11
    assert out[["user", "item", "timestamp"]].values.tolist() == [["a", "x", 1], ["a", "y", 2]]
    assert rep.removed_users == ["bot"]
    assert rep.examples["duplicate"].index.tolist() == [1]
    assert rep.examples["missing"].index.tolist() == [3, 11, 12]
    text = str(rep)
    for rule in data.RULES:
        assert rule in text
    assert "13 rows in, 2 kept, 11 removed" in text
    assert "bot" in text


def test_clean_options_validated():
    log = _tiny()
    with pytest.raises(ValueError, match="reward_range"):
        data.clean(log, reward_range=(5, 1))
    with pytest.raises(ValueError, match="max_events_per_user"):
        data.clean(log, max_events_per_user=0)
    with pytest.raises(ValueError, match="'reward'"):
        data.clean(log.drop(columns="reward"), reward_range=(0, 1))
    out, rep = data.clean(log)
    assert rep.n_removed == 0 and len(out) == 4 and sum(rep.counts.values()) == 0


# --------------------------------------------------------------------------- cleaning, hypothesis oracle

_users = st.sampled_from(["u1", "u2", "u3", "u4", None, ""])
_items = st.sampled_from(["i1", "i2", "i3"])
_nums = st.one_of(st.integers(-1, 3).map(float), st.sampled_from([np.nan, np.inf, -np.inf, 0.5, 1.0]))
_rows = st.lists(st.tuples(_users, _items, st.integers(0, 4).map(float) | st.just(np.nan), _nums, _nums,
                           st.sampled_from(["c1", "c2", None])), min_size=0, max_size=40)


def _is_missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or v == ""


def _oracle_clean(rows, reward_range, max_ev):
    counts = dict.fromkeys(data.RULES, 0)
    kept = []
    for r in rows:
        user, item, ts, reward, prop, _ctx = r
        if any(_is_missing(v) for v in (user, item, ts, reward, prop)):
            counts["missing"] += 1
        elif any(math.isinf(v) for v in (ts, reward, prop)):
            counts["non_finite"] += 1
        elif not (0 < prop <= 1):
            counts["propensity_out_of_range"] += 1
        elif reward_range is not None and not (reward_range[0] <= reward <= reward_range[1]):
            counts["reward_out_of_range"] += 1
        else:
            kept.append(r)
    seen, unique = set(), []
    for r in kept:
        key = tuple("<NA>" if _is_missing(v) else v for v in r)
        if key in seen:
            counts["duplicate"] += 1
        else:
            seen.add(key)
            unique.append(r)
    if max_ev is not None:
        per_user = pd.Series([r[0] for r in unique], dtype=object).value_counts()
        heavy = set(per_user[per_user > max_ev].index)
        counts["too_many_events"] = sum(r[0] in heavy for r in unique)
        unique = [r for r in unique if r[0] not in heavy]
    return unique, counts


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=_rows, use_range=st.booleans(), max_ev=st.none() | st.integers(1, 4))
def test_clean_matches_row_by_row_oracle(rows, use_range, max_ev):
    cols = ["user", "item", "timestamp", "reward", "propensity", "ctx"]
    log = pd.DataFrame(rows, columns=cols)
    log["timestamp"] = log["timestamp"].astype(float)
    log["reward"] = log["reward"].astype(float)
    log["propensity"] = log["propensity"].astype(float)
    reward_range = (0.0, 2.0) if use_range else None
    out, rep = data.clean(log, reward_range=reward_range, max_events_per_user=max_ev)
    expected_rows, expected_counts = _oracle_clean(rows, reward_range, max_ev)
    assert rep.counts == expected_counts
    assert rep.n_input == len(rows) and rep.n_output == len(out) == len(expected_rows)
    assert sum(rep.counts.values()) == rep.n_removed  # nothing dropped silently
    got = [tuple("<NA>" if _is_missing(v) else v for v in r) for r in out.itertuples(index=False)]
    exp = [tuple("<NA>" if _is_missing(v) else v for v in r) for r in expected_rows]
    assert got == exp  # same rows, same order
    for rule, n in rep.counts.items():
        assert len(rep.examples.get(rule, [])) == min(n, 3)


# --------------------------------------------------------------------------- batches


def _naive_history(items, users, ts, L):
    n = len(items)
    out = []
    for i in range(n):
        before = [j for j in range(n) if users[j] == users[i] and (ts[j], j) < (ts[i], i)]
        before.sort(key=lambda j: (ts[j], j))
        out.append([items[j] for j in before][-L:])
    return out


@settings(max_examples=100, deadline=None)
@given(
    rows=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 9), st.integers(0, 5)), min_size=0, max_size=30),
    L=st.integers(1, 6),
)
def test_build_sequences_matches_naive(rows, L):
    users = np.array([r[0] for r in rows], dtype=np.int64)
    items = np.array([r[1] for r in rows], dtype=np.int64)
    ts = np.array([r[2] for r in rows], dtype=np.int64)
    seqs = data.build_sequences(items, users, ts, L=L)
    expected = _naive_history(items.tolist(), users.tolist(), ts.tolist(), L)
    padded = seqs.padded()
    n_users = 5
    idx, off = data.user_histories(items, users, ts, L=L, n_users=n_users)
    for u in range(n_users):
        mine = sorted((t, j) for j, (uu, t) in enumerate(zip(users.tolist(), ts.tolist())) if uu == u)
        assert idx[off[u]:off[u + 1]].tolist() == [int(items[j]) for _, j in mine][-L:]
    assert padded.shape == (len(rows), L)
    indices, offsets = seqs.csr()
    for i, hist in enumerate(expected):
        assert padded[i][padded[i] >= 0].tolist() == hist
        assert (padded[i][: L - len(hist)] == -1).all()
        assert indices[offsets[i]:offsets[i + 1]].tolist() == hist
    np.testing.assert_array_equal(seqs.lengths, [len(h) for h in expected])


def test_build_sequences_known_and_errors():
    seqs = data.build_sequences([5, 6, 7, 8], [0, 0, 1, 0], [30, 10, 5, 20], L=2)
    np.testing.assert_array_equal(seqs.padded(), [[6, 8], [-1, -1], [-1, -1], [-1, 6]])
    np.testing.assert_array_equal(seqs.padded([0], pad_value=0), [[6, 8]])
    with pytest.raises(ValueError, match="L must"):
        data.build_sequences([1], [1], L=0)
    with pytest.raises(ValueError, match="unknown"):
        data.build_sequences([UNKNOWN], [0])
    with pytest.raises(ValueError, match="length"):
        data.build_sequences([1, 2], [0])


def test_negatives_avoid_positives_and_are_seeded():
    users = np.array([0, 0, 1, 2, 2, 2])
    items = np.array([0, 1, 2, 0, 1, 3])
    pos = data.user_item_csr(users, items, n_users=3)
    assert pos[0].tolist() == [0, 2, 3, 6] and pos[1].tolist() == [0, 1, 2, 0, 1, 3]
    neg = data.sample_negatives(users, 5, 50, positives=pos, seed=7)
    assert neg.shape == (6, 50) and neg.min() >= 0 and neg.max() < 5
    for u, row in zip(users, neg):
        assert not set(row.tolist()) & set(items[users == u].tolist())
    np.testing.assert_array_equal(neg, data.sample_negatives(users, 5, 50, positives=pos, seed=7))
    # user 2 may only get item 2 or 4; with probs zero on 4 only item 2 remains
    probs = np.array([1, 1, 1, 1, 0], dtype=float)
    neg2 = data.sample_negatives(np.array([2, 2]), 5, 20, positives=pos, probs=probs, seed=1)
    assert (neg2 == 2).all()
    with pytest.raises(ValueError, match="every sampleable item"):
        data.sample_negatives(np.array([0]), 2, 1, positives=data.user_item_csr([0, 0], [0, 1]))


def test_full_catalogue_targets():
    pos = data.user_item_csr(np.array([0, 0, 2]), np.array([1, 3, 0]), n_users=3)
    tgt = data.full_catalogue_targets(pos, np.array([2, 0, 1]), 4)
    np.testing.assert_array_equal(tgt, [[1, 0, 0, 0], [0, 1, 0, 1], [0, 0, 0, 0]])
    assert tgt.dtype == np.float32


def test_duplicate_detection_survives_hash_collisions(monkeypatch):
    """Rows sharing a 64-bit hash are compared exactly: a collision never removes a row."""
    from recmeta_sdk.data import _clean

    log = pd.DataFrame({"user": ["a", "b", "a", "b", "c"], "item": [1, 2, 1, 3, 1],
                        "reward": [1.0, 0.0, 1.0, np.nan, np.nan]})
    monkeypatch.setattr(_clean, "_row_hash", lambda df, codes: np.zeros(len(df), dtype=np.uint64))
    out, rep = data.clean(log)
    assert rep.counts["missing"] == 2 and rep.counts["duplicate"] == 1
    assert out["user"].tolist() == ["a", "b"]
    both = pd.DataFrame({"user": ["a", "a", "a"], "ctx": [np.nan, np.nan, 0.0], "item": [1, 1, 1]})
    lists = pd.DataFrame({"user": ["a", "a"], "item": [1, 1], "tags": [["x"], ["x"]]})
    assert data.clean(lists)[1].counts["duplicate"] == 1
    out2, rep2 = data.clean(both)
    assert rep2.counts["duplicate"] == 1 and out2["ctx"].isna().tolist() == [True, False]


def test_data_layer_needs_neither_torch_nor_the_core(tmp_path):
    """recmeta_sdk.data and .datasets import with numpy / pandas / pyarrow / stdlib only."""
    import subprocess
    import sys
    from pathlib import Path

    import recmeta_sdk

    pkg_dir = str(Path(recmeta_sdk.__file__).resolve().parent)
    code = (
        "import sys, types\n"
        f"pkg = types.ModuleType('recmeta_sdk'); pkg.__path__ = [{pkg_dir!r}]\n"
        "sys.modules['recmeta_sdk'] = pkg  # bypass the package __init__ (torch, _core)\n"
        "import recmeta_sdk.data, recmeta_sdk.datasets\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'scipy') or m == 'recmeta_sdk._core')\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, timeout=120)


def test_dictionary_encoded_arrow_columns():
    table = pa.table({"user": pa.array(["a", "b", "", "a", "a"]).dictionary_encode(),
                      "item": pa.array([1, 2, 3, 1, 4]), "timestamp": [1, 2, 3, 1, 5]})
    out, rep = data.clean(table)
    assert rep.counts["missing"] == 1 and rep.counts["duplicate"] == 1 and len(out) == 3
    enc = data.encode(out)
    assert enc.user_map.to_dict() == {"kind": "str", "ids": ["a", "b"]}
    np.testing.assert_array_equal(enc.user_ids, [0, 1, 0])


@settings(max_examples=200, deadline=None)
@given(keys=st.lists(st.integers(-3, 3), max_size=50) | st.lists(st.integers(-(2**62), 2**62), max_size=50),
       as_float=st.booleans())
def test_stable_argsort_equals_numpy_stable(keys, as_float):
    from recmeta_sdk.data._order import stable_argsort

    arr = np.array(keys, dtype=np.float64 if as_float else np.int64)
    np.testing.assert_array_equal(stable_argsort(arr), np.argsort(arr, kind="stable"))


def test_idmap_fit_sorted_and_position():
    m = IdMap.fit_sorted(np.array([30, 10, 20, 10, 30]))
    assert m.ids.tolist() == [10, 20, 30]
    assert [m.position(x) for x in (10, 20, 30)] == [0, 1, 2]
    # unknown ids, ids of another type and unhashable values all answer UNKNOWN, never raise
    assert m.position(11) == UNKNOWN
    assert m.position("10") == UNKNOWN
    assert m.position([10]) == UNKNOWN
    # position agrees with to_index on random ids, known and unknown
    rng = np.random.default_rng(3)
    q = rng.integers(0, 40, 200)
    assert [m.position(int(x)) for x in q] == m.to_index(q).tolist()
    s = IdMap.fit_sorted(pd.Series(["b", "c", "a", "b"]))
    assert s.ids.tolist() == ["a", "b", "c"] and s.position("c") == 2 and s.position("z") == UNKNOWN
    with pytest.raises(ValueError, match="missing"):
        IdMap.fit_sorted(np.array([1.0, np.nan]))


def test_recommender_uses_the_data_layers_id_map():
    """One id map in the package: a trained model's catalogue and users are IdMaps."""
    import recmeta_sdk as rm

    rng = np.random.default_rng(0)
    log = pd.DataFrame({"user": rng.integers(0, 12, 150), "item": rng.integers(100, 130, 150)})
    model = rm.train(log, config={"epochs": 1, "dim": 8, "meta": "none"})
    assert isinstance(model.item_map, IdMap) and isinstance(model.user_map, IdMap)
    np.testing.assert_array_equal(model.item_map.ids, np.sort(log["item"].unique()))
    np.testing.assert_array_equal(model.user_map.ids, np.sort(log["user"].unique()))
    assert model.user_map.position(int(log["user"].iloc[0])) >= 0 and model.user_map.position(999) == UNKNOWN
