"""The online loop's Gaussian reward posterior: what a user's rewards say about the catalogue.

What a user's observed rewards, misses included, say about the rest of the catalogue.

The training log is a population of users (the tasks of meta-training). Read as draws of
one random reward vector ``x`` over the catalogue (a user's reward for each item, 0 where the
user did not interact, normalised by the model's reward scale), it gives a Gaussian prior
for a new user's rewards: mean ``mu = E[x]`` and item-item covariance ``S = Cov[x]``,
estimated from the training users (empirical Bayes: the prior is learned from the tasks).
Given the rewards ``y_O`` a user gave the items ``O`` it was shown (rewarded items *and*
misses, reward 0), the posterior mean of the user's reward for every item is the Gaussian
conditional

    E[x | x_O = y_O] = mu + S[:, O] (S[O, O] + lam I)^{-1} (y_O - mu_O),

with ``lam`` the variance of the observation noise. A miss on an item lowers the items that
co-occur with it in the population beyond what the user's hits already explain, which the
hits-only fold-in of EASE or of the model's encoder cannot express.

:class:`RewardPosterior` computes the columns ``S[:, O]`` on demand from the sparse training
matrix (column a of ``X^T X / U - mu mu^T`` from the rows of the users who have item a, kept
in a bounded cache), so it stores no N x N matrix; an update costs one new column and a
solve over the user's observed items (capped by ``config.feedback_window``).

The online store (:mod:`recmeta_sdk.online`) turns it into the user's adapted **item-bias
vector**: ``kappa * (prior + correction)``, added to the policy's scores
``(<h', v_a> + b_a + wide_a + bias_a) / tau``, with ``kappa = config.feedback_posterior``
times the standard deviation of the model's own scores for a user with no history (so the
setting is free of the model's score scale). For a new user the prior term is ``mu``; a
known (training) user's prior is the model's own state, so only the correction is added.
"""
from __future__ import annotations

import threading

import numpy as np

__all__ = ["RewardPosterior", "of_model", "score_scale"]

_LOCK = threading.RLock()  # re-entrant: score_scale runs model code under it


class RewardPosterior:
    """Gaussian reward posterior over a model's catalogue, from its training log.

    Parameters
    ----------
    offsets, items, rewards : the training histories in CSR form (users' rows of the log:
        ``items[offsets[u]:offsets[u+1]]`` with their rewards)
    n_items : catalogue size N
    reward_scale : rewards are divided by it (and negative ones clipped to 0), as the model
        reads them
    """

    def __init__(self, offsets: np.ndarray, items: np.ndarray, rewards: np.ndarray, n_items: int,
                 reward_scale: float = 1.0):
        offsets = np.asarray(offsets, np.int64)
        items = np.asarray(items, np.int64)
        rewards = np.asarray(rewards, np.float64)
        if offsets.ndim != 1 or len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != len(items):
            raise ValueError("offsets must be a CSR offset array over items")
        if len(items) != len(rewards):
            raise ValueError(f"items ({len(items)}) and rewards ({len(rewards)}) differ in length")
        if not np.isfinite(reward_scale) or reward_scale <= 0:
            raise ValueError(f"reward_scale must be a finite number > 0, got {reward_scale}")
        if len(items) and (items.min() < 0 or items.max() >= n_items):
            raise ValueError(f"item index out of range [0, {n_items})")
        self._src = (offsets, items, rewards, int(n_items), float(reward_scale))
        U = len(offsets) - 1
        if U < 1:
            raise ValueError("the reward posterior needs at least one training user")
        self.n_items = int(n_items)
        self.n_users = U
        rows = np.repeat(np.arange(U, dtype=np.int64), np.diff(offsets))
        vals = np.maximum(rewards, 0.0) / float(reward_scale)
        # one value per (user, item): the last one if a user has the item twice
        key = rows * n_items + items
        order = np.argsort(key, kind="stable")
        key, vals = key[order], vals[order]
        last = np.ones(len(key), bool)
        last[:-1] = key[1:] != key[:-1]
        key, vals = key[last], vals[last]
        rows, cols = key // n_items, key % n_items
        self.mu = np.bincount(cols, weights=vals, minlength=n_items) / U  # (N,) E[x]
        # the log as CSR by user (rows of X) and by item (columns of X)
        self._by_user = self._csr(rows, cols, vals, U)
        self._by_item = self._csr(cols, rows, vals, n_items)
        # E[x x_a] per item a, computed on first use; at most ~256 MB of them are kept
        self._cache: dict[int, np.ndarray] = {}
        self._cache_max = max(16, (256 << 20) // (8 * max(1, n_items)))
        self._cache_lock = threading.Lock()

    def __reduce__(self):
        # copies and pickles rebuild from the log (and start with an empty column cache)
        return (RewardPosterior, self._src)

    @staticmethod
    def _csr(r: np.ndarray, c: np.ndarray, v: np.ndarray, n_rows: int):
        order = np.argsort(r, kind="stable")
        ptr = np.zeros(n_rows + 1, np.int64)
        np.cumsum(np.bincount(r, minlength=n_rows), out=ptr[1:])
        return ptr, c[order].astype(np.int64), v[order].astype(np.float64)

    def _second_moment(self, a: int) -> np.ndarray:
        """``E[x x_a]`` (N,): the users who have item a, their rows weighted by their reward
        for a, summed (one bincount over those rows), divided by the number of users."""
        c = self._cache.get(a)
        if c is not None:
            return c
        iptr, iusers, ivals = self._by_item
        users, w = iusers[iptr[a]:iptr[a + 1]], ivals[iptr[a]:iptr[a + 1]]
        uptr, uitems, uvals = self._by_user
        starts, lens = uptr[users], uptr[users + 1] - uptr[users]
        tot = int(lens.sum())
        idx = (np.arange(tot, dtype=np.int64) - np.repeat(np.cumsum(lens) - lens, lens)
               + np.repeat(starts, lens))
        c = np.bincount(uitems[idx], weights=uvals[idx] * np.repeat(w, lens),
                        minlength=self.n_items).astype(np.float64) / self.n_users
        c.flags.writeable = False
        with self._cache_lock:
            if len(self._cache) >= self._cache_max:
                self._cache.pop(next(iter(self._cache)))  # the oldest entry
            self._cache[a] = c
        return c

    def columns(self, obs: np.ndarray) -> np.ndarray:
        """``S[:, obs]`` (N, n) float64: the population covariance of every item with the items
        ``obs`` (internal indices)."""
        obs = np.asarray(obs, np.int64)
        if len(obs) == 0:
            return np.zeros((self.n_items, 0))
        G = np.stack([self._second_moment(int(a)) for a in obs], axis=1)
        return G - np.outer(self.mu, self.mu[obs])

    def correction(self, obs: np.ndarray, y: np.ndarray, lam: float, prior: np.ndarray | None = None) -> np.ndarray:
        """``S[:, O] (S[O, O] + lam I)^{-1} (y - m_O)`` (N,) float64 for the observed items ``obs``
        with rewards ``y`` (already normalised), ``m = prior`` (default ``mu``). An item observed
        more than once counts with its last reward."""
        obs = np.asarray(obs, np.int64)
        y = np.asarray(y, np.float64)
        if obs.shape != y.shape or obs.ndim != 1:
            raise ValueError(f"obs and y must be 1-D of one length, got {obs.shape} and {y.shape}")
        if not np.isfinite(lam) or lam <= 0:
            raise ValueError(f"lam must be a finite number > 0, got {lam}")
        if len(obs) == 0:
            return np.zeros(self.n_items)
        if obs.min() < 0 or obs.max() >= self.n_items:
            raise ValueError(f"observed item index out of range [0, {self.n_items})")
        if not np.isfinite(y).all():
            raise ValueError("observed rewards must be finite")
        # the last observation of each item
        _, rev_i = np.unique(obs[::-1], return_index=True)
        keep = len(obs) - 1 - rev_i
        obs, y = obs[keep], y[keep]
        m = self.mu if prior is None else np.asarray(prior, np.float64)
        C = self.columns(obs)  # (N, n)
        A = C[obs] + lam * np.eye(len(obs))
        return C @ np.linalg.solve(A, y - m[obs])


def of_model(model) -> RewardPosterior:
    """The :class:`RewardPosterior` of a :class:`~recmeta_sdk.api.Recommender`'s training log
    (built on first use and kept with the model; its log never changes)."""
    p = model.__dict__.get("_reward_posterior")
    if p is None:
        with _LOCK:
            p = model.__dict__.get("_reward_posterior")
            if p is None:
                p = RewardPosterior(model._hist_offsets, model._hist_items, model._hist_rewards,
                                    model.n_items, model._reward_scale)
                model._reward_posterior = p
    return p


def score_scale(model) -> float:
    """Standard deviation over the catalogue of a model's scores (before the temperature) for
    a user with no history, the unit of ``config.feedback_posterior`` (computed once per model)."""
    sc = model.__dict__.get("_feedback_score_scale")
    if sc is None:
        # Under the lock, once: concurrent first feedback calls must all use one value (each
        # computing its own could differ in the last bits, e.g. a BLAS product run on another
        # number of threads, and a state built with a value later overwritten would not match
        # a replay of the log: the "1 of 1,898 online results" of issue 18).
        with _LOCK:
            sc = model.__dict__.get("_feedback_score_scale")
            if sc is None:
                st = model.adapt([])
                z = model._V.numpy() @ st.vector + model._bias.numpy()
                extra = model._state_bias(st)  # the state's wide part, if the model has one
                if extra is not None:
                    z = z + extra
                sc = float(np.std(z.astype(np.float64))) or 1.0
                model._feedback_score_scale = sc
    return sc
