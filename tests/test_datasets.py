"""Real datasets: MovieLens-100K (recbole wheel) and the Open Bandit Dataset sample (obp sdist).

The package files are fetched with pip into the cache at the start of the session
(``$RECMETA_CACHE`` or the user cache dir); CI has PyPI access, so nothing here is skipped.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from recmeta_sdk import data, datasets
from recmeta_sdk.datasets import ARCHIVES, DatasetUnavailableError


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    root = datasets.default_cache_dir()
    for name in datasets.DATASETS:
        datasets.fetch(name, cache_dir=root)  # downloads with pip on a cold cache
    return root


@pytest.fixture(scope="session")
def ml100k(cache_dir):
    return datasets.load("ml-100k", cache_dir=cache_dir)


# --------------------------------------------------------------------------- MovieLens-100K


def test_ml100k_published_counts(ml100k):
    inter = ml100k.interactions
    assert ml100k.name == "ml-100k"
    assert len(inter) == 100_000
    assert inter["user"].nunique() == 943 and inter["item"].nunique() == 1682
    assert list(inter.columns) == ["user", "item", "timestamp", "reward"]
    assert inter["reward"].dtype == np.float64 and set(inter["reward"].unique()) == {1.0, 2.0, 3.0, 4.0, 5.0}
    assert inter.iloc[0].tolist() == [196, 242, 881250949, 3.0]  # first line of u.data
    assert len(ml100k.users) == 943 and ml100k.users.index.is_unique
    assert list(ml100k.users.columns) == ["age", "gender", "occupation", "zip_code"]
    assert ml100k.users["occupation"].nunique() == 21 and set(ml100k.users["gender"]) == {"M", "F"}
    assert len(ml100k.items) == 1682 and ml100k.items.index.is_unique
    assert ml100k.items.loc[1, "genres"] == "Animation|Children's|Comedy"
    assert ml100k.items.loc[1, "release_year"] == 1995
    genres = ml100k.items["genres"].str.split("|").explode().value_counts()
    assert len(genres) == 19 and genres["Drama"] == 725 and genres["Comedy"] == 505  # GroupLens' counts
    # every user rated at least 20 films (the cold-start protocol relies on it)
    assert inter.groupby("user").size().min() == 20


def test_ml100k_is_clean_and_encodes(ml100k):
    out, rep = data.clean(ml100k.interactions, reward_range=(1, 5))
    assert rep.n_removed == 0 and len(out) == 100_000
    enc = data.encode(out)
    assert enc.n_users == 943 and enc.n_items == 1682
    assert data.IdMap.from_json(enc.item_map.to_json()) == enc.item_map
    feats = data.FeatureEncoder(multi_valued=["genres"], numeric=["release_year"],
                                numeric_mode="bucketize", n_buckets=8).fit(ml100k.items)
    f = feats.transform(ml100k.items, index=enc.item_map)
    assert len(f) == 1682 and f.n_tokens == 19 + len(feats.vocabulary_["release_year"])
    assert (np.diff(f.offsets) >= 1).all()  # every film has at least a genre
    u = data.FeatureEncoder(categorical=["gender", "occupation"], numeric=["age"]).fit_transform(
        ml100k.users, index=enc.user_map)
    assert u.n_tokens == 23 and (np.diff(u.offsets) == 2).all() and u.numeric.shape == (943, 1)


def test_ml100k_cold_user_protocol(ml100k):
    inter = ml100k.interactions
    held = []
    for fold in range(5):
        s = data.split(inter, "cold_users", fold=fold, n_folds=5, k=10, query_after=20)
        held.append(set(s.held_out.tolist()))
        sizes = inter[inter["user"].isin(s.held_out)].groupby("user").size()
        assert len(s.support) == 10 * len(s.held_out)
        assert len(s.query) == int((sizes - 20).sum())
        assert len(s.train) + len(s.support) + len(s.gap) + len(s.query) == 100_000
    assert sorted(map(len, held)) == [188, 188, 189, 189, 189]
    assert set().union(*held) == set(inter["user"]) and sum(map(len, held)) == 943
    r = data.split(inter, "ratio")
    assert len(r.train) + len(r.valid) + len(r.test) == 100_000
    assert 0.79 < len(r.train) / 100_000 < 0.81


def test_ml100k_training_arrays_and_tasks(ml100k):
    parts = data.split(ml100k.interactions, "cold_users", fold=0, k=10)
    enc = data.encode(parts.train)
    assert enc.n_users == 943 - len(parts.held_out)
    seqs = data.build_sequences(enc.item_ids, enc.user_ids, enc.timestamps, L=50)
    hist = seqs.padded(np.arange(1000))
    assert hist.shape == (1000, 50) and hist.max() < enc.n_items
    assert (seqs.lengths == np.minimum(seqs.lengths, 50)).all() and seqs.lengths.max() == 50
    pos = data.user_item_csr(enc.user_ids, enc.item_ids, enc.n_users)
    neg = data.sample_negatives(enc.user_ids, enc.n_items, 4, positives=pos, seed=0)
    hits = [neg[j][np.isin(neg[j], pos[1][pos[0][u]:pos[0][u + 1]])] for j, u in enumerate(enc.user_ids[:2000])]
    assert sum(map(len, hits)) == 0
    _idx, off = data.user_histories(enc.item_ids, enc.user_ids, enc.timestamps, L=20, n_users=enc.n_users)
    assert (np.diff(off) == 20).all()  # every user has >= 20 ratings
    # support users of the cold split are unknown to the training id map: the cold-start path
    assert (enc.user_map.to_index(parts.support["user"]) == data.UNKNOWN).all()
    tasks = data.make_tasks(parts.train, by="user", support_size=10)
    assert len(tasks) == enc.n_users and (tasks.n_support == 10).all()
    cats = data.make_tasks(parts.train, by="category", items=ml100k.items, column="genres")
    assert 18 <= len(cats) <= 19 and "Drama" in cats.keys.tolist()
    seg = data.make_tasks(parts.train, by="segment", users=ml100k.users, column="occupation")
    assert len(seg) == 21 and seg.sizes.sum() == len(parts.train)


def test_ml100k_grouplens_files_agree_with_recbole(ml100k, tmp_path):
    """Write GroupLens-format u.data / u.item / u.user from the loaded data and read them back."""
    inter = ml100k.interactions
    inter[["user", "item", "reward", "timestamp"]].astype({"reward": int}).to_csv(
        tmp_path / "u.data", sep="\t", header=False, index=False)
    items = ml100k.items
    rows = []
    for item, row in items.iterrows():
        year = row["release_year"]
        date = "" if pd.isna(year) else f"01-Jan-{int(year)}"
        flags = ["1" if g in row["genres"].split("|") else "0" for g in datasets.GENRES]
        rows.append("|".join([str(item), row["title"], date, "", "http://x", *flags]))
    (tmp_path / "u.item").write_text("\n".join(rows) + "\n", encoding="latin-1", errors="replace")
    users = ml100k.users.reset_index()[["user", "age", "gender", "occupation", "zip_code"]]
    users.to_csv(tmp_path / "u.user", sep="|", header=False, index=False)
    gl = datasets.load("ml-100k", path=tmp_path)
    assert gl.info["format"] == "grouplens"
    pd.testing.assert_frame_equal(gl.interactions, inter)
    assert gl.items["genres"].tolist() == items["genres"].tolist()
    assert gl.items["release_year"].fillna(-1).tolist() == items["release_year"].fillna(-1).tolist()
    pd.testing.assert_frame_equal(gl.users, ml100k.users, check_names=False)


def test_ml100k_recbole_folder_and_errors(cache_dir, tmp_path):
    ds = datasets.load("ml-100k", path=cache_dir / "ml-100k")
    assert ds.info["format"] == "recbole" and len(ds.interactions) == 100_000
    with pytest.raises(ValueError, match="neither"):
        datasets.load("ml-100k", path=tmp_path)
    with pytest.raises(ValueError, match="unknown option"):
        datasets.load("ml-100k", cache_dir=cache_dir, campaign="men")
    with pytest.raises(ValueError, match="'ml-1m'"):
        datasets.load("ml-1m")


# --------------------------------------------------------------------------- Open Bandit Dataset

# clicks per 10,000 impressions in the sample (the on-policy rates in shared/design/quality.md)
OBD_CLICKS = {("random", "all"): 38, ("bts", "all"): 42, ("random", "men"): 46, ("bts", "men"): 69,
              ("random", "women"): 46, ("bts", "women"): 46}
OBD_ITEMS = {"all": 80, "men": 34, "women": 46}


@pytest.mark.parametrize("policy", ["random", "bts"])
@pytest.mark.parametrize("campaign", ["all", "men", "women"])
def test_obd_sample(cache_dir, campaign, policy):
    ds = datasets.load("obd", cache_dir=cache_dir, campaign=campaign, policy=policy)
    inter = ds.interactions
    assert len(inter) == 10_000
    assert list(inter.columns[:8]) == ["user", "item", "timestamp", "reward", "propensity", "position",
                                       "campaign", "policy"]
    assert [c for c in inter.columns if c.startswith("user_feature_")] == [f"user_feature_{i}" for i in range(4)]
    n_items = OBD_ITEMS[campaign]
    assert sum(c.startswith("user-item_affinity_") for c in inter.columns) == n_items
    assert ds.users.index.is_unique and set(ds.users.index) == set(inter["user"])
    assert list(ds.users.columns) == [f"user_feature_{i}" for i in range(4)]
    assert len(ds.items) == n_items and ds.items.index.tolist() == list(range(n_items))
    assert set(inter["item"]).issubset(set(ds.items.index))
    assert set(inter["position"]) == {1, 2, 3}
    assert set(inter["reward"].unique()) <= {0.0, 1.0} and int(inter["reward"].sum()) == OBD_CLICKS[(policy, campaign)]
    p = inter["propensity"].to_numpy()
    assert ((p > 0) & (p <= 1)).all()
    if policy == "random":
        np.testing.assert_allclose(p, 1.0 / n_items)  # uniform random over the campaign's items
    assert inter["timestamp"].is_monotonic_increasing and str(inter["timestamp"].dt.tz) == "UTC"
    assert inter["user"].str.fullmatch(r"u[0-9a-f]{16}").all()
    # the user key is a pure function of the four user features
    assert inter.groupby("user")[[f"user_feature_{i}" for i in range(4)]].nunique().max().max() == 1
    out, rep = data.clean(inter, reward_range=(0, 1))
    assert rep.counts["propensity_out_of_range"] == 0 and rep.n_output + rep.n_removed == 10_000
    tasks = data.make_tasks(out, by="campaign", support_size=100)
    assert tasks.keys.tolist() == [campaign] and tasks.sizes.tolist() == [len(out)]


def test_obd_options_validated(cache_dir):
    with pytest.raises(ValueError, match="'kids'"):
        datasets.load("obd", cache_dir=cache_dir, campaign="kids")
    with pytest.raises(ValueError, match="'greedy'"):
        datasets.load("obd", cache_dir=cache_dir, policy="greedy")


# --------------------------------------------------------------------------- fetching and the cache


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("RECMETA_CACHE", str(tmp_path / "c"))
    assert datasets.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("RECMETA_CACHE")
    d = datasets.default_cache_dir()
    assert d.name == "recmeta" or d.parent.name == "recmeta"
    assert d.resolve() != Path.cwd().resolve()


def test_offline_error_says_what_to_download(monkeypatch, tmp_path):
    def offline(*args, **kwargs):
        return subprocess.CompletedProcess(args, 1, "", "ERROR: Could not find a version (network unreachable)")

    monkeypatch.setattr(datasets.subprocess, "run", offline)
    with pytest.raises(DatasetUnavailableError) as exc:
        datasets.load("obd", cache_dir=tmp_path)
    msg = str(exc.value)
    assert "obp-0.5.7.tar.gz" in msg and str(tmp_path / "downloads") in msg and ARCHIVES["obd"].sha256 in msg
    assert not (tmp_path / "obd").exists()


def test_manual_placement_bad_hash_and_no_network(monkeypatch, cache_dir, tmp_path):
    def no_network(*args, **kwargs):  # a placed file must not trigger pip
        raise AssertionError("pip must not run")

    monkeypatch.setattr(datasets.subprocess, "run", no_network)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    name = ARCHIVES["ml-100k"].filename
    (downloads / name).write_bytes(b"not a wheel")
    with pytest.raises(DatasetUnavailableError, match="SHA-256"):
        datasets.load("ml-100k", cache_dir=tmp_path)
    assert (downloads / (name + ".bad")).exists() and not (downloads / name).exists()
    shutil.copy(cache_dir / "downloads" / name, downloads / name)
    ds = datasets.load("ml-100k", cache_dir=tmp_path)
    assert len(ds.interactions) == 100_000
    assert sorted(p.name for p in (tmp_path / "ml-100k").iterdir()) == [
        ".complete", "ml-100k.inter", "ml-100k.item", "ml-100k.user"]


def test_import_fetches_nothing(tmp_path):
    import recmeta_sdk

    root = str(Path(recmeta_sdk.__file__).resolve().parent.parent)
    env = dict(os.environ, RECMETA_CACHE=str(tmp_path / "cache"),
               PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    code = "import recmeta_sdk.datasets, recmeta_sdk.data"
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=tmp_path, timeout=120)
    assert not (tmp_path / "cache").exists() and list(tmp_path.iterdir()) == []
