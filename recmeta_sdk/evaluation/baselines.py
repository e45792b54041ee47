"""Classical peers measured side by side with the model: popularity and EASE.

* :class:`Popularity`: items ranked by their training interaction count.
* :class:`EASE`: Steck 2019, "Embarrassingly Shallow Autoencoders", closed form
  ``P = (X^T X + lambda I)^-1``, ``B = I - P / diag(P)`` (zero diagonal); a user's scores are
  ``x_u B``. ``lambda = 250`` is RecBole's default for MovieLens-100K. *Fold-in* for a new
  user is the same product with the user's support row ``x_support`` (EASE needs no user
  parameters), so it serves cold users directly.

Both work on internal item indices ``0..N-1`` and return top-k indices with items given in
``exclude`` removed.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

__all__ = ["Popularity", "EASE", "topk_from_scores"]


def topk_from_scores(scores: np.ndarray, k: int, exclude: Optional[Sequence[Sequence[int]]] = None) -> np.ndarray:
    """(U, k) indices of the k best scores per row, excluded items removed (stable order)."""
    s = np.array(scores, dtype=np.float64, copy=True)
    if s.ndim == 1:
        s = s[None, :]
    if exclude is not None:
        for u, ex in enumerate(exclude):
            if len(ex):
                s[u, np.asarray(ex, dtype=np.int64)] = -np.inf
    k = min(int(k), s.shape[1])
    part = np.argpartition(-s, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(s, part, 1), axis=1, kind="stable")
    return np.take_along_axis(part, order, 1)


class Popularity:
    """Most popular items first."""

    def __init__(self, n_items: int):
        self.n_items = int(n_items)
        self.count = np.zeros(self.n_items, dtype=np.float64)

    def fit(self, item_idx: np.ndarray) -> "Popularity":
        self.count = np.bincount(np.asarray(item_idx, dtype=np.int64), minlength=self.n_items).astype(np.float64)
        return self

    def recommend(self, n_users: int, k: int, exclude=None) -> np.ndarray:
        return topk_from_scores(np.tile(self.count, (n_users, 1)), k, exclude)


class EASE:
    """EASE^R with closed-form weights; ``recommend`` works for training users and fold-in users."""

    def __init__(self, n_items: int, reg: float = 250.0):
        if not reg > 0:
            raise ValueError(f"EASE reg must be > 0, got {reg!r}")
        self.n_items = int(n_items)
        self.reg = float(reg)
        self.B: Optional[np.ndarray] = None

    def fit(self, user_idx: np.ndarray, item_idx: np.ndarray, n_users: Optional[int] = None) -> "EASE":
        user_idx = np.asarray(user_idx, dtype=np.int64)
        item_idx = np.asarray(item_idx, dtype=np.int64)
        U = int(user_idx.max()) + 1 if n_users is None else int(n_users)
        X = np.zeros((U, self.n_items), dtype=np.float64)
        X[user_idx, item_idx] = 1.0
        G = X.T @ X
        G[np.diag_indices_from(G)] += self.reg
        P = np.linalg.inv(G)
        B = -P / np.diag(P)[None, :]
        B[np.diag_indices_from(B)] = 0.0
        self.B = B
        return self

    def scores(self, histories: Sequence[Sequence[int]]) -> np.ndarray:
        if self.B is None:
            raise ValueError("EASE is not fitted")
        X = np.zeros((len(histories), self.n_items), dtype=np.float64)
        for u, h in enumerate(histories):
            if len(h):
                X[u, np.asarray(h, dtype=np.int64)] = 1.0
        return X @ self.B

    def recommend(self, histories: Sequence[Sequence[int]], k: int, exclude=None) -> np.ndarray:
        """Top-k for users given their histories (training rows, or a new user's support)."""
        return topk_from_scores(self.scores(histories), k, histories if exclude is None else exclude)
