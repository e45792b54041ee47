"""Streaming Parquet ingest (``data.scan_parquet``): equal to the pandas path, rank shares, errors,
memory bounded by the compact arrays (issue 16 item 1, issue 17's per-rank read)."""
from __future__ import annotations

import tracemalloc

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import recmeta_sdk as rm
from recmeta_sdk import data
from recmeta_sdk.training.loop import prepare, prepare_codes

TINY = {"dim": 8, "hidden": 16, "encoder": "none", "epochs": 2, "batch_size": 16, "seed": 3}
FIELDS = ("user_ids", "item_ids", "offsets", "items", "rewards", "propensity", "item_count")


def _frame(n: int, rng: np.random.Generator) -> pd.DataFrame:
    t0 = np.datetime64("2026-01-01T00:00:00", "us")
    return pd.DataFrame({
        "uid": rng.choice([f"u{i}" for i in range(29)], n),
        "item": rng.integers(0, 43, n).astype(np.int64),
        "stars": rng.integers(1, 6, n).astype(np.float64),
        # few distinct times: many ties within a user, kept in row order
        "when": t0 + rng.integers(0, 4, n).astype("timedelta64[s]"),
        "propensity": rng.uniform(0.05, 1.0, n),
        "ctx": rng.random(n),
    })


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """4 files of odd sizes (one of 1 row) in 2 hive partitions, row groups of 17 rows."""
    root = tmp_path_factory.mktemp("pq") / "log"
    rng = np.random.default_rng(0)
    for k, n in enumerate((7, 130, 1, 61)):
        d = root / f"day={k % 2}"
        d.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pandas(_frame(n, rng), preserve_index=False), d / f"part-{k}.parquet",
                       row_group_size=17)
    return root


COLS = {"uid": "user", "stars": "reward", "when": "timestamp"}


def _prep(a: data.LogArrays):
    return prepare_codes(a.user_map.ids, a.item_map.ids, a.users, a.items, a.timestamps, a.rewards,
                         a.propensities)


def _assert_same_prepared(p1, p2):
    for f in FIELDS:
        x, y = getattr(p1, f), getattr(p2, f)
        if x is None or y is None:
            assert x is None and y is None, f
            continue
        assert x.dtype == y.dtype and x.shape == y.shape and (x == y).all(), f


def test_streamed_equals_pandas_path(folder):
    ref = data.read_interactions(folder, columns=COLS)  # the pandas path: one DataFrame
    assert len(ref) == 199
    p_ref = prepare(ref, np.sort(pd.unique(ref["item"].to_numpy())))
    for batch_rows in (5, 16, 1 << 16):  # batches smaller than, across and larger than row groups
        a = data.scan_parquet(folder, columns=COLS, batch_rows=batch_rows)
        assert a.users.dtype == np.int32 and a.items.dtype == np.int32 and a.rewards.dtype == np.float32
        assert a.parts == 1 + 8 + 1 + 4 and a.total_rows == 199 and a.columns[:3] == ("user", "item", "reward")
        _assert_same_prepared(p_ref, _prep(a))
    # extra catalogue items join the item map as train's union with items.index does
    extra = np.array([100, 7, 250])
    a = data.scan_parquet(folder, columns=COLS, extra_items=extra)
    np.testing.assert_array_equal(a.item_map.ids, np.union1d(ref["item"].to_numpy(), extra))


def test_train_on_a_folder_is_the_dataframe_model(folder):
    ref = data.read_interactions(folder, columns=COLS)
    items = pd.DataFrame({"genre": ["a", "b", "c"] * 15}, index=np.arange(45))  # 2 items without rows
    a = rm.train(ref, items=items, config=TINY, progress=False, num_threads=1)
    with pytest.warns(UserWarning, match="duplicate"):
        b = rm.train(folder, columns=COLS, items=items, config=TINY, progress=False, num_threads=1)
    assert b.history["ingest"] == {"rows": 199, "rows_read": 199, "parts": 14, "bytes": 199 * (4 + 4 + 8 + 4 + 4)}
    np.testing.assert_array_equal(a.item_ids, b.item_ids)
    np.testing.assert_array_equal(a.user_ids, b.user_ids)
    users = list(a.user_ids[:12])
    ra, rb = a.recommend(users, k=7), b.recommend(users, k=7)
    np.testing.assert_array_equal(ra.ids, rb.ids)
    np.testing.assert_array_equal(ra.scores, rb.scores)


@pytest.mark.parametrize("world", [1, 2, 3, 5, 20])
def test_rank_shares_make_the_log(folder, world):
    """Each rank reads a contiguous run of row groups; the runs, in rank order, are the log, and
    with the ids merged across ranks every share maps ids the same way as the whole read."""
    whole = data.scan_parquet(folder, columns=COLS)
    shares = [data.parquet_parts(folder, r, world) for r in range(world)]
    assert [s.lo for s in shares[1:]] == [s.hi for s in shares[:-1]] and shares[-1].hi == 14
    assert sum(s.my_rows for s in shares) == 199
    if world <= 14:
        rows = [s.my_rows for s in shares]
        assert max(rows) - min(rows) <= 2 * 17 + 1, rows  # balanced to within about a row group or two

    def merge(u, i):  # what the all-gather of distributed training returns
        return whole.user_map.ids, whole.item_map.ids

    got = [data.scan_parquet(folder, columns=COLS, rank=r, world_size=world, merge_ids=merge) for r in range(world)]
    assert [g.row_start for g in got] == [s.start for s in shares]
    for f in ("users", "items", "timestamps", "rewards", "propensities"):
        np.testing.assert_array_equal(np.concatenate([getattr(g, f) for g in got]), getattr(whole, f), err_msg=f)
    assert all(g.user_map == whole.user_map and g.item_map == whole.item_map for g in got)


def test_numeric_and_string_timestamps_and_no_reward(tmp_path):
    rng = np.random.default_rng(1)
    df = pd.DataFrame({"user": rng.integers(0, 9, 50), "item": rng.integers(0, 11, 50),
                       "timestamp": rng.integers(0, 3, 50).astype(np.float64)})
    df.loc[3, "timestamp"] = np.nan
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), tmp_path / "a.parquet", row_group_size=9)
    ref = data.read_interactions(tmp_path / "a.parquet")
    a = data.scan_parquet(tmp_path / "a.parquet", batch_rows=4)
    assert a.rewards is None and a.timestamps.dtype == np.float64
    _assert_same_prepared(prepare(ref), _prep(a))
    s = pd.DataFrame({"user": ["x", "y", "x", "x"], "item": [1, 2, 3, 4],
                      "timestamp": ["2026-01-02", "2026-01-01 10:00", "2026-01-01T09:00:00Z", "2025-12-31"]})
    pq.write_table(pa.Table.from_pandas(s, preserve_index=False), tmp_path / "s.parquet")
    ref = data.read_interactions(tmp_path / "s.parquet")
    _assert_same_prepared(prepare(ref), _prep(data.scan_parquet(tmp_path / "s.parquet", batch_rows=1)))


def test_bad_parquet_logs_name_the_problem(tmp_path):
    good = pd.DataFrame({"user": [1, 2, 3], "item": [4, 5, 6], "reward": [1.0, 2.0, 3.0]})
    pq.write_table(pa.Table.from_pandas(good, preserve_index=False), tmp_path / "ok.parquet")
    with pytest.raises(ValueError, match="not found"):
        data.scan_parquet(tmp_path / "ok.parquet", columns={"nope": "user"})
    with pytest.raises(ValueError, match="required column 'item'"):
        data.scan_parquet(tmp_path / "ok.parquet", columns={"item": "thing"})
    nulls = pa.table({"user": pa.array([1, None, 3]), "item": [4, 5, 6]})
    pq.write_table(nulls, tmp_path / "null.parquet")
    with pytest.raises(ValueError, match="column 'user' is null at row 1"):
        data.scan_parquet(tmp_path / "null.parquet")
    pq.write_table(pa.table({"user": [1], "item": [2], "reward": ["high"]}), tmp_path / "str.parquet")
    with pytest.raises(TypeError, match="'reward' must be numeric"):
        data.scan_parquet(tmp_path / "str.parquet")
    with pytest.raises(ValueError, match="rank must be"):
        data.parquet_parts(tmp_path / "ok.parquet", rank=2, world_size=2)
    (tmp_path / "empty").mkdir()
    assert not data.is_parquet_source(tmp_path / "empty")
    with pytest.raises(ValueError, match="holds no"):
        data.read_interactions(tmp_path / "empty")
    with pytest.raises(ValueError, match="not found"):
        data.scan_parquet(tmp_path / "missing.parquet")


def test_stream_memory_is_the_compact_arrays(tmp_path):
    """Reading 1M rows (6 files, 3 context columns never decoded) costs the output arrays
    (20 bytes a row) plus a working set bounded by a row group, under half the Arrow table of
    the log that the pandas path holds (before its DataFrame copy of it)."""
    rng = np.random.default_rng(2)
    n, files = 1_000_000, 6
    for k in range(files):
        m = n // files + (k < n % files)
        t = pa.table({"user": rng.integers(0, 20_000, m), "item": rng.integers(0, 5_000, m),
                      "reward": rng.random(m), "timestamp": rng.integers(0, 10**9, m),
                      "c1": rng.random(m), "c2": rng.random(m), "c3": rng.integers(0, 9, m)})
        pq.write_table(t, tmp_path / f"p{k}.parquet", row_group_size=50_000)
    table_bytes = pq.read_table(tmp_path).nbytes  # what pandas.read_parquet holds before converting
    pool = pa.proxy_memory_pool(pa.default_memory_pool())
    tracemalloc.start()
    try:
        a = data.scan_parquet(tmp_path, memory_pool=pool)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(a) == n and a.nbytes == 20 * n
    used = peak + pool.max_memory()  # numpy / pandas allocations + Arrow's (an upper bound of the peak)
    assert used <= a.nbytes + 16 * 2**20, (used, a.nbytes)
    assert used < table_bytes / 2, (used, table_bytes)


def test_cli_streams_parquet_paths(folder, tmp_path):
    """``recmeta train --data PATH`` hands a Parquet file or folder to ``train`` as a path (so it
    is streamed, each rank its share under torchrun); a CSV is still read into a DataFrame."""
    from recmeta_sdk import cli

    assert cli._read_log(str(folder)) == (str(folder), None, None)
    pd.DataFrame({"user": [1], "item": [2]}).to_csv(tmp_path / "a.csv", index=False)
    assert isinstance(cli._read_log(str(tmp_path / "a.csv"))[0], pd.DataFrame)
