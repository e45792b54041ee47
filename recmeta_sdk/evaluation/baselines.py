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

__all__ = ["Popularity", "EASE", "ease_weights", "topk_from_scores"]


def topk_from_scores(scores, k: int, exclude=None) -> np.ndarray:
    """The k best items per row: descending score, ties broken by the lower item id.

    The one top-k helper of the numpy side (baselines, bandits, the demo); the model's own
    serving path uses the policy-scoring kernel (:func:`recmeta_sdk.ops.policy_topk`), whose
    tie order is the same.

    Parameters
    ----------
    scores : (N,) or (U, N) float
    k : int >= 1; capped at N
    exclude : for (U, N) scores, one sequence of item ids per row; for (N,) scores, one
        sequence of item ids. Excluded items score -inf: they come last (by id) and only
        when fewer than k items remain.

    Returns
    -------
    (k,) or (U, k) int64 item ids (the shape of ``scores`` without its last axis, plus k)
    """
    s = np.array(scores, dtype=np.float64, copy=True)
    one = s.ndim == 1
    if one:
        s = s[None, :]
        if exclude is not None:
            exclude = [exclude]
    if s.ndim != 2:
        raise ValueError(f"scores must be 1-D or 2-D, got shape {s.shape}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if exclude is not None:
        if len(exclude) != s.shape[0]:
            raise ValueError(f"exclude has {len(exclude)} rows for {s.shape[0]} rows of scores")
        for u, ex in enumerate(exclude):
            if len(ex):
                s[u, np.asarray(ex, dtype=np.int64)] = -np.inf
    U, N = s.shape
    k = min(int(k), N)
    if 4 * k >= N:
        out = np.argsort(-s, axis=1, kind="stable")[:, :k]
    else:
        # the k-th best score of each row, then every item at least as good (all boundary ties)
        kth = -np.partition(-s, k - 1, axis=1)[:, k - 1]
        out = np.empty((U, k), dtype=np.int64)
        for u in range(U):
            cand = np.flatnonzero(s[u] >= kth[u])
            out[u] = cand[np.argsort(-s[u, cand], kind="stable")[:k]]
    out = out.astype(np.int64, copy=False)
    return out[0] if one else out


def ease_weights(gram, reg: float):
    """EASE^R's item-item weights ``B = I - P / diag(P)``, ``P = (G + reg I)^-1``, ``diag(B) = 0``.

    The one EASE of the package: the baselines, the bandits' EASE and the model's wide part
    all call it. ``P`` comes from a Cholesky factorisation (``G + reg I`` is symmetric positive
    definite), half the cost of a general inverse.

    Parameters
    ----------
    gram : (N, N) float32 / float64 numpy array or torch tensor
        The Gram matrix ``X^T X`` of a (users, items) interaction matrix (not changed).
    reg : float > 0
        The ridge ``lambda``.

    Returns
    -------
    (N, N) weights in ``gram``'s dtype, a torch tensor for a torch ``gram``, else numpy.
    """
    import torch

    if isinstance(reg, bool) or not isinstance(reg, (int, float, np.floating)) or not np.isfinite(reg) or reg <= 0:
        raise ValueError(f"EASE reg must be a finite number > 0, got {reg!r}")
    G = torch.as_tensor(gram)
    if G.ndim != 2 or G.shape[0] != G.shape[1]:
        raise ValueError(f"gram must be a square (N, N) matrix, got shape {tuple(G.shape)}")
    if G.dtype not in (torch.float32, torch.float64):
        G = G.to(torch.float64)
    G = G + reg * torch.eye(G.shape[0], dtype=G.dtype)
    P = torch.cholesky_inverse(torch.linalg.cholesky(G))
    W = -P / torch.diag(P)[None, :]
    W.fill_diagonal_(0.0)
    return W if isinstance(gram, torch.Tensor) else W.numpy()


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
        self.B = ease_weights(X.T @ X, self.reg)
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
