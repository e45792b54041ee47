"""Ranking metrics with RecBole's definitions, and beyond-accuracy metrics.

For a user with ground-truth set T (|T| >= 1) and a ranked list of k items
(training items already excluded from ranking):

* ``recall@k``    = hits / |T|
* ``precision@k`` = hits / k
* ``hit@k``       = 1 if hits > 0
* ``mrr@k``       = 1 / rank of the first hit (0 if none)
* ``ndcg@k``      = sum_{i: hit} 1/log2(i+1) / sum_{i=1..min(|T|,k)} 1/log2(i+1)

each averaged over users with a non-empty T (RecBole 1.2.1, ``recbole.evaluator.metrics``).
Beyond accuracy: ``coverage@k`` (distinct recommended items / catalogue size),
``diversity@k`` (mean pairwise cosine distance of the item vectors within a list, when
vectors are given) and ``novelty@k`` (mean self-information ``-log2(pop_a / n_users)`` of
the recommended items).
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np

__all__ = ["ranking_metrics", "beyond_accuracy", "hits_matrix"]


def hits_matrix(topk: np.ndarray, truth: Sequence[set]) -> np.ndarray:
    """(U, k) bool: whether each recommended item is in the user's truth set."""
    topk = np.asarray(topk)
    out = np.zeros(topk.shape, dtype=bool)
    for u, t in enumerate(truth):
        if t:
            out[u] = np.fromiter((x in t for x in topk[u]), dtype=bool, count=topk.shape[1])
    return out


def ranking_metrics(topk: np.ndarray, truth: Sequence[set], k: Optional[int] = None) -> Dict[str, float]:
    """Recall, NDCG, MRR, Hit, Precision @k (RecBole's definitions), averaged over users.

    Parameters
    ----------
    topk : (U, >=k) ranked item ids (any hashable ids; -1 / padding never matches)
    truth : U sets of relevant ids; users with an empty set are skipped
    """
    topk = np.asarray(topk)
    if topk.ndim != 2:
        raise ValueError(f"topk must be 2-D (users, k), got shape {topk.shape}")
    if len(truth) != topk.shape[0]:
        raise ValueError(f"truth has {len(truth)} users, topk has {topk.shape[0]}")
    k = topk.shape[1] if k is None else int(k)
    if k < 1 or k > topk.shape[1]:
        raise ValueError(f"k must be in [1, {topk.shape[1]}], got {k}")
    keep = np.array([len(t) > 0 for t in truth], dtype=bool)
    if not keep.any():
        raise ValueError("no user has ground-truth items")
    hits = hits_matrix(topk[keep, :k], [t for t, m in zip(truth, keep) if m])
    n_true = np.array([len(t) for t, m in zip(truth, keep) if m], dtype=np.float64)
    nh = hits.sum(1)
    disc = 1.0 / np.log2(np.arange(2, k + 2))
    dcg = (hits * disc).sum(1)
    idcg = np.cumsum(disc)[np.minimum(n_true, k).astype(int) - 1]
    first = np.where(hits.any(1), hits.argmax(1) + 1, 0)
    mrr = np.where(first > 0, 1.0 / np.maximum(first, 1), 0.0)
    return {
        f"recall@{k}": float(np.mean(nh / n_true)),
        f"ndcg@{k}": float(np.mean(dcg / idcg)),
        f"mrr@{k}": float(np.mean(mrr)),
        f"hit@{k}": float(np.mean(nh > 0)),
        f"precision@{k}": float(np.mean(nh / k)),
    }


def beyond_accuracy(topk_idx: np.ndarray, n_items: int, item_count: np.ndarray, n_users: int,
                    item_vectors: Optional[np.ndarray] = None) -> Dict[str, float]:
    """Coverage, intra-list diversity and novelty of (U, k) lists of internal item indices."""
    topk_idx = np.asarray(topk_idx)
    k = topk_idx.shape[1]
    valid = topk_idx >= 0
    out = {f"coverage@{k}": float(len(np.unique(topk_idx[valid])) / max(n_items, 1))}
    pop = np.asarray(item_count, dtype=np.float64)
    info = -np.log2(np.maximum(pop, 1.0) / max(n_users, 1))
    out[f"novelty@{k}"] = float(info[topk_idx[valid]].mean()) if valid.any() else 0.0
    if item_vectors is not None and k > 1:
        v = np.asarray(item_vectors, dtype=np.float64)
        v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
        vals = []
        for row, m in zip(topk_idx, valid):
            r = row[m]
            if len(r) > 1:
                s = v[r] @ v[r].T
                n = len(r)
                vals.append(1.0 - (s.sum() - n) / (n * (n - 1)))
        out[f"diversity@{k}"] = float(np.mean(vals)) if vals else 0.0
    return out
