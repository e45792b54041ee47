"""Item cold start on MovieLens-100K: hold out items from training, add them back with
``Recommender.add_items`` (features only), and measure how well they are ranked.

Protocol: a seeded random 10% of the items is removed from the log and from the training
``items`` frame; the model is trained (default config unless ``--config``) on the rest; the
held-out items are added with their side features (genres and release year; with
``--title-hash`` also a dense title vector: hashed character trigrams via
``recmeta_sdk.data.text.embed_texts(encoder=...)``, since no language model can be downloaded
here). Every user with an interaction on a held-out item is a test user; their truth is
those items. Two rankings:

* cold-only: the held-out items alone are the candidates (``candidates=``): Recall / NDCG /
  Hit @10 against random (expected value, 50 seeded draws), popularity of the item's
  genres in the training log (non-personal), and a personal content baseline (the user's
  training genre profile, cosine with the item's genres);
* full catalogue: ``evaluate`` over all items (training items excluded), the held-out
  interactions as the test set; here random is ~k / catalogue.

    PYTHONPATH=. taskset -c 0 nice -n 15 python bench/bench_cold_items.py [--title-hash] [--seed 0]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time

import numpy as np
import pandas as pd
import torch

import recmeta_sdk as rm
from recmeta_sdk.evaluation.metrics import ranking_metrics
from recmeta_sdk.data.text import embed_texts


class TrigramHash:
    """Hashed, signed character trigrams of a title (a deterministic stand-in for a text model)."""

    def __init__(self, dim: int = 64):
        self.dim = dim

    def encode(self, texts):
        out = np.zeros((len(texts), self.dim), np.float64)
        for i, t in enumerate(texts):
            s = f"  {t.lower()} "
            for j in range(len(s) - 2):
                h = int.from_bytes(hashlib.blake2b(s[j:j + 3].encode(), digest_size=4).digest(), "little")
                out[i, h % self.dim] += 1.0 if (h >> 16) & 1 else -1.0
        return out


def genre_matrix(items: pd.DataFrame, genres: list) -> np.ndarray:
    g = {x: j for j, x in enumerate(genres)}
    M = np.zeros((len(items), len(genres)))
    for i, v in enumerate(items["genres"].fillna("").to_numpy()):
        for x in str(v).split("|"):
            if x in g:
                M[i, g[x]] = 1.0
    return M


def topk_by_scores(S: np.ndarray, ids: np.ndarray, k: int, rng) -> np.ndarray:
    noise = rng.random(S.shape) * 1e-9  # seeded tie-breaking
    order = np.argsort(-(S + noise), axis=1, kind="stable")[:, :k]
    return ids[order]


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--frac", type=float, default=0.1)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--title-hash", action="store_true")
    ap.add_argument("--config", type=str, default=None, help="JSON dict of config overrides")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ds = rm.datasets.load("ml-100k")
    log, items = ds.interactions, ds.items.copy()
    if args.title_hash:
        items["title_vec"] = list(embed_texts(items["title"].fillna("").tolist(), encoder=TrigramHash()))
    rng = np.random.default_rng(args.seed)
    all_items = items.index.to_numpy()
    cold = np.sort(rng.choice(all_items, size=round(args.frac * len(all_items)), replace=False))
    is_cold = log["item"].isin(cold).to_numpy()
    train_log, test = log[~is_cold].reset_index(drop=True), log[is_cold].reset_index(drop=True)
    test = test[test["user"].isin(train_log["user"].unique())]
    cfg = json.loads(args.config) if args.config else None
    t0 = time.perf_counter()
    model = rm.train(train_log, users=ds.users, items=items.drop(index=cold), config=cfg)
    t_train = time.perf_counter() - t0
    t0 = time.perf_counter()
    m2 = model.add_items(items.loc[cold])
    t_add = time.perf_counter() - t0
    users = np.sort(test["user"].unique())
    truth_by_user = test.groupby("user")["item"].apply(set)
    truth = [truth_by_user[u] for u in users]
    k = args.k
    res = {}
    # cold-only ranking
    top = np.concatenate([m2.recommend(list(users[s:s + 256]), k=k, candidates=cold).ids
                          for s in range(0, len(users), 256)])
    res["recmeta add_items"] = ranking_metrics(top, truth, k)
    rr = [ranking_metrics(np.stack([rng.permutation(cold)[:k] for _ in users]), truth, k) for _ in range(50)]
    res["random (50 draws)"] = {m: float(np.mean([r[m] for r in rr])) for m in rr[0]}
    genres = sorted({x for v in items["genres"].dropna() for x in str(v).split("|") if x})
    G_all = genre_matrix(items, genres)
    gpos = {x: i for i, x in enumerate(all_items)}
    tr_idx = np.array([gpos[x] for x in train_log["item"].to_numpy()])
    genre_pop = G_all[tr_idx].sum(0)
    Gc = G_all[[gpos[x] for x in cold]]
    pop_score = (Gc * genre_pop).sum(1) / np.maximum(Gc.sum(1), 1)
    res["popularity of genre"] = ranking_metrics(topk_by_scores(np.tile(pop_score, (len(users), 1)), cold, k, rng),
                                                 truth, k)
    hist = train_log.groupby("user")["item"].apply(lambda s: G_all[[gpos[x] for x in s]].sum(0))
    P = np.stack([hist[u] for u in users])
    P = P / np.maximum(np.linalg.norm(P, axis=1, keepdims=True), 1e-12)
    Gn = Gc / np.maximum(np.linalg.norm(Gc, axis=1, keepdims=True), 1e-12)
    res["user genre profile (cosine)"] = ranking_metrics(topk_by_scores(P @ Gn.T, cold, k, rng), truth, k)
    # full catalogue
    full = m2.evaluate(test[["user", "item"]], k=k)
    print(f"\nMovieLens-100K item cold start: {len(cold)} held-out items ({args.frac:.0%}, seed {args.seed}), "
          f"{len(users)} test users, {len(test)} held-out interactions; features: genres, release_year"
          + (", title trigram-hash (64-d dense)" if args.title_hash else ""))
    print(f"train {t_train:.1f}s, add_items {t_add * 1e3:.1f} ms\n")
    print(f"cold-only ranking ({len(cold)} candidates), @{k}:")
    print(f"{'method':32s} {'recall':>8s} {'ndcg':>8s} {'hit':>8s}")
    for name, r in res.items():
        print(f"{name:32s} {r[f'recall@{k}']:8.4f} {r[f'ndcg@{k}']:8.4f} {r[f'hit@{k}']:8.4f}")
    print(f"\nfull catalogue ({m2.n_items} items, training items excluded), held-out interactions as test, @{k}:")
    print(f"recmeta add_items: recall {full[f'recall@{k}']:.4f} ndcg {full[f'ndcg@{k}']:.4f} "
          f"hit {full[f'hit@{k}']:.4f} (random recall ~ {k / m2.n_items:.4f})")
    return res, full


if __name__ == "__main__":
    main()
