"""Warm top-k quality: recmeta's defaults against tuned EASE, implicit's ALS and popularity.

Every peer is tuned on a validation split carved from the training part with the same
protocol (never the test part), then refitted on the whole training part. recmeta is run
with its defaults (``rm.train(train, users=, items=)``, no config): it tunes itself on its
own inner validation split. Full ranking over the catalogue, training items excluded,
RecBole's Recall@10 / NDCG@10. Fit times are process CPU-seconds on one thread.

Protocols (MovieLens-100K; every rating is one implicit interaction for every model, as in
``shared/design/quality.md`` section 5):

* ``random``: per-user random 80/20 (seeds ``--seeds``), users with >= 5 test items;
* ``last``: leave-last-out by time (each user's latest interaction is the test item);
* ``temporal``: a global cut at the 90% time quantile (train before, test after, test
  users present in both).

Usage::

    pip install ".[bench]"   # implicit (ALS) and scipy
    PYTHONPATH=. .venv/bin/python bench/bench_quality.py [--protocols random,last,temporal]
        [--seeds 0,1,2] [--quick] [--models recmeta,ease,als,pop] [--train-seeds 0,1,2]

Prints one table per protocol (NDCG@10, Recall@10, fit CPU-s, the chosen hyper-parameters)
and the ratio of recmeta to the best tuned peer on each metric. One training run of recmeta
moves by up to 9% with its seed on the small protocols (87 temporal test users; one item
per user on leave-last-out): ``--train-seeds 0,1,2`` trains it once per seed and compares the
mean (with its standard error) instead.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import pandas as pd

import recmeta_sdk as rm
from recmeta_sdk.evaluation.metrics import ranking_metrics

K = 10


# --------------------------------------------------------------------------- protocols

def split_random(df: pd.DataFrame, seed: int, frac: float = 0.2, min_test: int = 5):
    rng = np.random.default_rng(seed)
    r = rng.random(len(df))
    # per user: the frac share with the smallest random keys is test
    rank = pd.Series(r, index=df.index).groupby(df["user"].to_numpy()).rank(method="first")
    n = df.groupby("user")["item"].transform("size").to_numpy()
    test_mask = rank.to_numpy() <= np.round(frac * n)
    train, test = df[~test_mask], df[test_mask]
    cnt = test.groupby("user").size()
    test = test[test["user"].isin(cnt.index[cnt >= min_test])]
    return train, test


def split_last(df: pd.DataFrame, seed: int = 0):
    order = np.lexsort((np.arange(len(df)), df["timestamp"].to_numpy(), df["user"].to_numpy()))
    d = df.iloc[order]
    last = ~d["user"].duplicated(keep="last").to_numpy()
    n = d.groupby("user")["item"].transform("size").to_numpy()
    test_mask = last & (n >= 2)
    return d[~test_mask], d[test_mask]


def split_temporal(df: pd.DataFrame, seed: int = 0, q: float = 0.9):
    cut = np.quantile(df["timestamp"].to_numpy(), q)
    train, test = df[df["timestamp"] < cut], df[df["timestamp"] >= cut]
    test = test[test["user"].isin(train["user"].unique()) & test["item"].isin(train["item"].unique())]
    return train, test


PROTOCOLS = {"random": split_random, "last": split_last, "temporal": split_temporal}


# --------------------------------------------------------------------------- matrices

class Encoded:
    """Internal indices of a (train, test) pair over the training catalogue."""

    def __init__(self, train: pd.DataFrame, test: pd.DataFrame):
        self.users = pd.Index(np.sort(train["user"].unique()))
        self.items = pd.Index(np.sort(train["item"].unique()))
        self.tu = self.users.get_indexer(train["user"].to_numpy())
        self.ti = self.items.get_indexer(train["item"].to_numpy())
        U, N = len(self.users), len(self.items)
        import scipy.sparse as sp
        X = sp.csr_matrix((np.ones(len(self.tu), np.float32), (self.tu, self.ti)), shape=(U, N))
        X.data[:] = 1.0  # duplicates count once
        X.sum_duplicates()
        X.data[:] = 1.0
        self.X = X
        eu = self.users.get_indexer(test["user"].to_numpy())
        ei = self.items.get_indexer(test["item"].to_numpy())
        ok = (eu >= 0) & (ei >= 0)
        self.test_users = np.unique(eu[ok])
        pos = {u: p for p, u in enumerate(self.test_users)}
        self.truth = [set() for _ in self.test_users]
        for u, i in zip(eu[ok], ei[ok]):
            self.truth[pos[u]].add(int(i))

    def metrics(self, scores: np.ndarray) -> dict:
        """Metrics of (len(test_users), N) scores, training items excluded."""
        s = np.array(scores, dtype=np.float64, copy=True)
        seen = self.X[self.test_users]
        r, c = seen.nonzero()
        s[r, c] = -np.inf
        part = np.argpartition(-s, K - 1, axis=1)[:, :K]
        top = np.take_along_axis(part, np.argsort(-np.take_along_axis(s, part, 1), 1, kind="stable"), 1)
        m = ranking_metrics(top, self.truth, K)
        return {"ndcg": m[f"ndcg@{K}"], "recall": m[f"recall@{K}"]}


# --------------------------------------------------------------------------- peers

def cpu():
    return time.process_time()


def ease_scores(enc: Encoded, reg: float) -> np.ndarray:
    X = enc.X
    G = (X.T @ X).toarray().astype(np.float64)
    G[np.diag_indices_from(G)] += reg
    P = np.linalg.inv(G)
    B = -P / np.diag(P)[None, :]
    np.fill_diagonal(B, 0.0)
    return np.asarray(X[enc.test_users] @ B)


def pop_scores(enc: Encoded, _=None) -> np.ndarray:
    c = np.asarray(enc.X.sum(0)).ravel()
    return np.tile(c, (len(enc.test_users), 1))


def als_scores(enc: Encoded, params) -> np.ndarray:
    from implicit.cpu.als import AlternatingLeastSquares

    f, reg, alpha, it = params
    m = AlternatingLeastSquares(factors=f, regularization=reg, alpha=alpha, iterations=it,
                                random_state=0)
    m.fit(enc.X, show_progress=False)
    return m.user_factors[enc.test_users] @ m.item_factors.T


def tune(fn, grid, train, split, seed, quick):
    """The grid value with the best validation NDCG@10 (validation carved from train)."""
    tr, va = split(train, seed + 1000)
    enc = Encoded(tr, va)
    best, best_v = None, -1.0
    for g in grid:
        v = enc.metrics(fn(enc, g))["ndcg"]
        if v > best_v:
            best, best_v = g, v
    return best


EASE_GRID = [50.0, 100.0, 250.0, 500.0, 1000.0, 2000.0]
ALS_GRID = [(f, r, a, i) for f in (64, 128) for r in (0.1, 1.0, 10.0, 100.0) for a in (1.0, 10.0)
            for i in (15, 30)]
ALS_QUICK = [(f, r, a, 15) for f in (64, 128) for r in (1.0, 10.0, 100.0) for a in (1.0, 10.0)]


def run_peer(name, train, test, split, seed, quick):
    enc = Encoded(train, test)
    if name == "pop":
        t = cpu()
        return enc.metrics(pop_scores(enc)), cpu() - t, "-"
    fn, grid = {"ease": (ease_scores, EASE_GRID), "als": (als_scores, ALS_QUICK if quick else ALS_GRID)}[name]
    g = tune(fn, grid, train, split, seed, quick)
    t = cpu()
    sc = fn(enc, g)
    return enc.metrics(sc), cpu() - t, g


def run_recmeta(train, test, ds, config=None):
    enc = Encoded(train, test)
    t = cpu()
    model = rm.train(train, users=ds.users, items=ds.items, config=config, progress=False)
    fit = cpu() - t
    test_df = pd.DataFrame({"user": enc.users[enc.test_users].repeat([len(x) for x in enc.truth]),
                            "item": enc.items[np.concatenate([sorted(x) for x in enc.truth])]})
    m = model.evaluate(test_df, k=K)
    return {"ndcg": m[f"ndcg@{K}"], "recall": m[f"recall@{K}"]}, fit, f"config {config}" if config else "defaults"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--protocols", default="random,last,temporal")
    ap.add_argument("--seeds", default="0,1,2", help="seeds of the random protocol")
    ap.add_argument("--models", default="recmeta,ease,als,pop")
    ap.add_argument("--quick", action="store_true", help="a smaller ALS grid")
    ap.add_argument("--config", default=None, help="JSON config for recmeta (default: none)")
    ap.add_argument("--train-seeds", default=None,
                    help="recmeta trained once per training seed (config['seed']), e.g. 0,1,2: each run "
                         "printed, the ratios taken on the mean, with its standard error (default: one "
                         "run, the config's seed)")
    args = ap.parse_args(argv)
    try:
        import torch
        torch.set_num_threads(1)
    except Exception:
        pass
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    import json
    config = json.loads(args.config) if args.config else None
    ds = rm.datasets.load("ml-100k")
    df = ds.interactions[["user", "item", "timestamp"]].copy()  # implicit: every rating counts
    models = args.models.split(",")
    summary = []
    for proto in args.protocols.split(","):
        split = PROTOCOLS[proto]
        seeds = [int(s) for s in args.seeds.split(",")] if proto == "random" else [0]
        for seed in seeds:
            train, test = split(df, seed)
            print(f"\n== {proto} seed {seed}: {len(train)} train rows, {test['user'].nunique()} test users",
                  flush=True)
            res = {}
            for name in models:
                if name == "als":
                    try:
                        import implicit  # noqa: F401
                    except ImportError:
                        print("  als: implicit is not installed (pip install implicit); skipped")
                        continue
                if name == "recmeta" and args.train_seeds:
                    runs = [run_recmeta(train, test, ds, dict(config or {}, seed=int(t)))
                            for t in args.train_seeds.split(",")]
                    for t, (m, secs, _) in zip(args.train_seeds.split(","), runs):
                        print(f"  recmeta  training seed {t}: NDCG@10 {m['ndcg']:.4f}  Recall@10 "
                              f"{m['recall']:.4f}  fit {secs:6.1f} CPU-s", flush=True)
                    mean = {k: float(np.mean([r[0][k] for r in runs])) for k in ("ndcg", "recall")}
                    se = {k: float(np.std([r[0][k] for r in runs], ddof=1) / np.sqrt(len(runs)))
                          if len(runs) > 1 else 0.0 for k in ("ndcg", "recall")}
                    res[name] = (mean, float(np.mean([r[1] for r in runs])),
                                 f"mean of {len(runs)} training seeds; s.e. NDCG {se['ndcg']:.4f}, "
                                 f"Recall {se['recall']:.4f}")
                elif name == "recmeta":
                    res[name] = run_recmeta(train, test, ds, config)
                else:
                    res[name] = run_peer(name, train, test, split, seed, args.quick)
                m, secs, g = res[name]
                print(f"  {name:8s} NDCG@10 {m['ndcg']:.4f}  Recall@10 {m['recall']:.4f}  "
                      f"fit {secs:6.1f} CPU-s  ({g})", flush=True)
            peers = [n for n in res if n != "recmeta"]
            if "recmeta" in res and peers:
                bn = max(res[n][0]["ndcg"] for n in peers)
                br = max(res[n][0]["recall"] for n in peers)
                rn, rr = res["recmeta"][0]["ndcg"] / bn, res["recmeta"][0]["recall"] / br
                print(f"  ratio recmeta / best tuned peer: NDCG {rn:.3f}  Recall {rr:.3f}")
                summary.append((proto, seed, rn, rr, res["recmeta"][1]))
    if summary:
        print("\nsummary (recmeta / best tuned peer):")
        for proto, seed, rn, rr, secs in summary:
            print(f"  {proto:9s} seed {seed}: NDCG {rn:.3f}  Recall {rr:.3f}  recmeta fit {secs:.1f} CPU-s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
