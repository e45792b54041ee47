"""``train`` takes what the data layer reads (Arrow tables, mappings of arrays, CSV and Parquet
paths, renamed columns) and scipy sparse matrices: the same log gives the same model."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import recmeta_sdk as rm

TINY = {"dim": 8, "hidden": 16, "encoder": "none", "epochs": 2, "batch_size": 32, "seed": 3}


def _log():
    rng = np.random.default_rng(5)
    df = pd.DataFrame({"user": rng.integers(0, 40, 600), "item": rng.integers(0, 30, 600)})
    df = df.drop_duplicates(["user", "item"]).reset_index(drop=True)
    df["reward"] = rng.integers(1, 6, len(df)).astype(np.float32)
    df["timestamp"] = np.arange(len(df), dtype=np.int64)
    return df


def _fit(source, **kw):
    return rm.train(source, config=TINY, progress=False, num_threads=1, **kw)


@pytest.fixture(scope="module")
def reference():
    log = _log()
    return log, _fit(log)


def _same(a, b):
    np.testing.assert_array_equal(a.item_ids, b.item_ids)
    np.testing.assert_array_equal(a.user_ids, b.user_ids)
    users = list(a.user_ids[:10])
    ra, rb = a.recommend(users, k=5), b.recommend(users, k=5)
    np.testing.assert_array_equal(ra.ids, rb.ids)
    np.testing.assert_array_equal(ra.scores, rb.scores)


def test_arrow_mapping_and_renamed_columns(reference):
    log, ref = reference
    _same(ref, _fit(pa.Table.from_pandas(log, preserve_index=False)))
    _same(ref, _fit({c: log[c].to_numpy() for c in log.columns}))
    renamed = log.rename(columns={"user": "user_id", "item": "movie", "reward": "rating"})
    _same(ref, _fit(renamed, columns={"user_id": "user", "movie": "item", "rating": "reward"}))


def test_csv_and_parquet_paths(reference, tmp_path):
    log, ref = reference
    log.to_csv(tmp_path / "log.csv", index=False)
    pq.write_table(pa.Table.from_pandas(log, preserve_index=False), tmp_path / "log.parquet")
    _same(ref, _fit(str(tmp_path / "log.csv")))
    _same(ref, _fit(tmp_path / "log.parquet"))


def test_scipy_sparse_matrix():
    sp = pytest.importorskip("scipy.sparse")
    log = _log()
    X = sp.csr_matrix((log["reward"].to_numpy(), (log["user"].to_numpy(), log["item"].to_numpy())),
                      shape=(40, 30))
    # one row per stored entry, in the matrix's row-major order (no timestamps: row order is time)
    by_frame = _fit(log.sort_values(["user", "item"])[["user", "item", "reward"]].reset_index(drop=True))
    _same(by_frame, _fit(X))
    with pytest.raises(ValueError, match="columns= does not apply"):
        rm.train(X, columns={"a": "user"})
    with pytest.raises(ValueError, match="stores no entries"):
        rm.train(sp.csr_matrix((3, 4)))


def test_bad_sources_name_the_problem(tmp_path):
    with pytest.raises(TypeError):
        rm.train(42)
    with pytest.raises(ValueError, match="suffix|\\.txt"):
        rm.train(str(tmp_path / "log.txt"))
    with pytest.raises(ValueError, match="user"):
        rm.train({"usr": np.arange(3), "item": np.arange(3)})
