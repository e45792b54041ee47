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

The same item bias carries the **in-session evidence** (:func:`evidence_coefficients`,
:class:`ItemKernel`): each event's residual against the user's running mean reward, spread to
similar items by a kernel on the model's item vectors and decayed per event, weighted by
``config.feedback_evidence`` in the same score units. With ``config.feedback_linear`` (off by
default; models with dense item features) it also carries the **linear evidence**
(:class:`ItemBasis`): the user's ridge regression of its rewards on the items' features, the
item vectors' principal directions and the model's cold score, plus a confidence bonus. All
parts live in one :class:`SparseCorrection` (O(feedback window + rank^2) numbers per user).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from ..model.view import ModelView

__all__ = ["ItemBasis", "ItemKernel", "RewardPosterior", "SparseCorrection", "basis_of_model",
           "evidence_coefficients", "evidence_window", "has_dense_features", "kernel_of_model", "of_model",
           "score_scale"]

_LOCK = threading.RLock()  # re-entrant: score_scale runs model code under it
# Per model, built on first use and kept in the model object's own attribute dict under this
# module's keys (the model's log and weights never change; copies and pickles carry them):
_POSTERIOR_KEY = "_reward_posterior"
_SCALE_KEY = "_feedback_score_scale"


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

    def coefficients(self, obs: np.ndarray, y: np.ndarray, lam: float,
                     prior: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The sparse form of :meth:`correction`: ``(items, coef)`` with ``items`` the distinct
        observed items (an item observed more than once counts with its last reward) and
        ``coef = (S[O, O] + lam I)^{-1} (y_O - m_O)``, so that the correction is
        ``S[:, items] @ coef``. Needs only ``S[O, O]``: no (N, n) product."""
        obs = np.asarray(obs, np.int64)
        y = np.asarray(y, np.float64)
        if obs.shape != y.shape or obs.ndim != 1:
            raise ValueError(f"obs and y must be 1-D of one length, got {obs.shape} and {y.shape}")
        if not np.isfinite(lam) or lam <= 0:
            raise ValueError(f"lam must be a finite number > 0, got {lam}")
        if len(obs) == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float64)
        if obs.min() < 0 or obs.max() >= self.n_items:
            raise ValueError(f"observed item index out of range [0, {self.n_items})")
        if not np.isfinite(y).all():
            raise ValueError("observed rewards must be finite")
        # the last observation of each item
        _, rev_i = np.unique(obs[::-1], return_index=True)
        keep = len(obs) - 1 - rev_i
        obs, y = obs[keep], y[keep]
        m = self.mu if prior is None else np.asarray(prior, np.float64)
        # S[O, O]: the same numbers as columns(obs)[obs] (element for element), from the
        # observed rows of the second-moment columns only
        G = np.stack([self._second_moment(int(a))[obs] for a in obs], axis=1)
        A = (G - np.outer(self.mu[obs], self.mu[obs])) + lam * np.eye(len(obs))
        return obs, np.linalg.solve(A, y - m[obs])

    def correction(self, obs: np.ndarray, y: np.ndarray, lam: float, prior: np.ndarray | None = None) -> np.ndarray:
        """``S[:, O] (S[O, O] + lam I)^{-1} (y - m_O)`` (N,) float64 for the observed items ``obs``
        with rewards ``y`` (already normalised), ``m = prior`` (default ``mu``). An item observed
        more than once counts with its last reward."""
        items, coef = self.coefficients(obs, y, lam, prior)
        if len(items) == 0:
            return np.zeros(self.n_items)
        return self.columns(items) @ coef

    def dense(self, correction: SparseCorrection) -> np.ndarray:
        """The (N,) float32 item-bias vector of a :class:`SparseCorrection`:
        ``scale * (S[:, items] @ coef [+ mu])``."""
        b = self.columns(correction.items) @ correction.coef if len(correction.items) else np.zeros(self.n_items)
        if correction.with_prior:
            b = b + self.mu
        return (correction.scale * b).astype(np.float32)


_EMPTY_I = np.zeros(0, np.int64)
_EMPTY_F = np.zeros(0, np.float64)
_EMPTY_I.flags.writeable = False
_EMPTY_F.flags.writeable = False


@dataclass(frozen=True, eq=False)
class SparseCorrection:
    """A user's online item-bias vector in sparse form: the items its feedback touched, one
    coefficient each, and a scale (memory O(feedback window), not O(catalogue)).

    Two parts. The reward posterior's, whose dense form (:meth:`RewardPosterior.dense`) is
    ``scale * (S[:, items] @ coef + prior)`` with ``prior = mu`` for a new user
    (``with_prior``) and 0 for a known one. The in-session evidence's
    (:class:`ItemKernel`), ``ev_scale * K[:, ev_items] @ ev_coef`` (empty when
    ``config.feedback_evidence`` is 0). The user's item bias is their sum.

    Attributes
    ----------
    items : (n,) int64, the distinct observed items (internal indices)
    coef : (n,) float64, their coefficients ``(S[O, O] + lam I)^{-1} (y_O - mu_O)``
    scale : ``config.feedback_posterior * score_scale(model)``
    with_prior : whether the population mean ``mu`` is added (a new user)
    ev_items : (m,) int64, the distinct items of the evidence window
    ev_coef : (m,) float64, their summed decayed residuals (:func:`evidence_coefficients`)
    ev_scale : ``config.feedback_evidence * score_scale(model)``
    lin_coef : (r,) float64, the linear evidence's posterior mean over :class:`ItemBasis`
        (empty when it is off); its dense form is ``lin_scale * (Z @ lin_coef + bonus)``
    lin_scale : ``config.feedback_linear * score_scale(model)``
    lin_inv : (r, r) float64 or None, ``LINEAR_UCB ** 2`` times the posterior covariance
        ``(reg I + Z_O^T Z_O)^{-1}``: the bonus is ``sqrt(z_i^T lin_inv z_i)``
    """

    items: np.ndarray
    coef: np.ndarray
    scale: float
    with_prior: bool
    ev_items: np.ndarray = field(default_factory=lambda: _EMPTY_I)
    ev_coef: np.ndarray = field(default_factory=lambda: _EMPTY_F)
    ev_scale: float = 0.0
    lin_coef: np.ndarray = field(default_factory=lambda: _EMPTY_F)
    lin_scale: float = 0.0
    lin_inv: np.ndarray | None = None

    @property
    def nbytes(self) -> int:
        """Bytes held by the arrays."""
        return int(self.items.nbytes + self.coef.nbytes + self.ev_items.nbytes + self.ev_coef.nbytes
                   + self.lin_coef.nbytes + (0 if self.lin_inv is None else self.lin_inv.nbytes))


#: the running mean reward a user's first event is compared with, and its weight in events
EVIDENCE_PRIOR_MEAN = 0.5
EVIDENCE_PRIOR_WEIGHT = 1.0
#: events whose decayed weight falls below this are dropped from the evidence window
EVIDENCE_MIN_WEIGHT = 1e-3


#: the online **linear evidence** (:class:`ItemBasis`; weight ``config.feedback_linear``, for
#: models with dense item side features): the rank of the item vectors' principal part of the
#: basis, the ridge (prior precision), the prior weight of the model's cold score (reward units
#: per standard deviation of it) and the width of the confidence bonus (LinUCB's alpha),
#: chosen on validation seeds 101-104 of the multi-task simulator (``bench/bench_online.py
#: --sim-seed``; LinUCB's own settings there: ridge 1, alpha 0.5)
LINEAR_RANK = 16
LINEAR_REG = 1.0
LINEAR_PRIOR = 1.0
LINEAR_UCB = 0.25


def has_dense_features(model: ModelView) -> bool:
    """Whether the model's items have dense side features (what the linear evidence reads)."""
    return getattr(model.network, "item_dense", None) is not None and int(getattr(model.network, "n_dense", 0)) > 0


def evidence_window(decay: float, window: int) -> int:
    """How many of a user's latest events the in-session evidence reads: ``window``, or fewer
    where ``decay ** age`` falls below :data:`EVIDENCE_MIN_WEIGHT`."""
    if decay >= 1.0:
        return int(window)
    return int(min(window, int(np.floor(np.log(EVIDENCE_MIN_WEIGHT) / np.log(decay))) + 1))


def evidence_coefficients(items: np.ndarray, y: np.ndarray, decay: float,
                          keep: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The in-session evidence of a user's events, in sparse form: ``(distinct items, coef)``.

    Event ``e`` (of ``n``, oldest first; ``y`` its normalised reward) contributes its residual
    ``y_e - m_e`` with weight ``decay ** (n - 1 - e)`` to its item's coefficient, where ``m_e``
    is the user's running mean reward before it over all the given events,
    ``(EVIDENCE_PRIOR_MEAN * EVIDENCE_PRIOR_WEIGHT + sum_{f<e} y_f) / (EVIDENCE_PRIOR_WEIGHT + e)``:
    a click above the user's usual rate raises the item and its neighbours, a miss lowers them.
    Only the latest ``keep`` events contribute (default all; :func:`evidence_window`). An item
    shown more than once sums its events."""
    items = np.asarray(items, np.int64)
    y = np.asarray(y, np.float64)
    n = len(items)
    if n == 0:
        return _EMPTY_I, _EMPTY_F
    before = np.concatenate([[0.0], np.cumsum(y)[:-1]])
    m = (EVIDENCE_PRIOR_MEAN * EVIDENCE_PRIOR_WEIGHT + before) / (EVIDENCE_PRIOR_WEIGHT + np.arange(n))
    w = float(decay) ** np.arange(n - 1, -1, -1, dtype=np.float64)
    r = w * (y - m)
    if keep is not None and keep < n:
        items, r = items[n - keep:], r[n - keep:]
    uniq, inv = np.unique(items, return_inverse=True)
    return uniq, np.bincount(inv, weights=r, minlength=len(uniq))


class ItemKernel:
    """The similarity kernel of the in-session evidence, on a model's item vectors:
    ``K(i, j) = exp((cos(v_i, v_j) - 1) / bandwidth)`` (1 on the diagonal).

    Parameters
    ----------
    vectors : (N, d) array, the items' vectors (the policy's output table)
    bandwidth : float > 0
    """

    def __init__(self, vectors: np.ndarray, bandwidth: float):
        V = np.asarray(vectors, np.float64)
        if V.ndim != 2:
            raise ValueError(f"vectors must be (N, d), got shape {V.shape}")
        if not np.isfinite(bandwidth) or bandwidth <= 0:
            raise ValueError(f"bandwidth must be a finite number > 0, got {bandwidth}")
        norm = np.linalg.norm(V, axis=1, keepdims=True)
        self.unit = V / np.maximum(norm, 1e-12)
        self.unit.flags.writeable = False
        self.bandwidth = float(bandwidth)

    def columns(self, items: np.ndarray) -> np.ndarray:
        """``K[:, items]`` (N, n) float64."""
        U = self.unit
        return np.exp((U @ U[np.asarray(items, np.int64)].T - 1.0) / self.bandwidth)

    def apply(self, items: np.ndarray, coef: np.ndarray) -> np.ndarray:
        """``K[:, items] @ coef`` (N,) float64 (zeros for no items)."""
        if len(items) == 0:
            return np.zeros(self.unit.shape[0])
        return self.columns(items) @ np.asarray(coef, np.float64)


class ItemBasis:
    """The item representation of the online **linear evidence**: a per-user Bayesian ridge
    regression of the rewards on ``z_i`` (LinUCB's model, on the SDK's own representation and
    with the model's prediction as its prior).

    ``z_i = [p_i, f_i, s_i, 1]``: ``p_i`` the item's coordinates on the top ``rank`` principal
    directions of the centred item vectors, ``f_i`` its centred dense side features (each block
    scaled so that its rows have mean squared norm 1, then both together again), ``s_i`` the
    model's cold score standardised over the catalogue (column :attr:`n_basis`) and a constant.

    Parameters
    ----------
    vectors : (N, d) array, the items' vectors (the policy's output table)
    rank : int >= 0 (capped at ``min(N, d)``)
    features : (N, D) array, optional, dense item side features
    score : (N,) array, optional, the model's score of each item for a user with no history
    """

    def __init__(self, vectors: np.ndarray, rank: int, features: np.ndarray | None = None,
                 score: np.ndarray | None = None):
        V = np.asarray(vectors, np.float64)
        if V.ndim != 2:
            raise ValueError(f"vectors must be (N, d), got shape {V.shape}")
        if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 0:
            raise ValueError(f"rank must be an int >= 0, got {rank!r}")
        if not np.isfinite(V).all():
            raise ValueError("item vectors must be finite")
        parts = []
        r = int(min(rank, V.shape[0], V.shape[1]))
        if r > 0:
            Vc = V - V.mean(axis=0, keepdims=True)
            _, _, vt = np.linalg.svd(Vc, full_matrices=False)
            parts.append(self._unit(Vc @ vt[:r].T))
        if features is not None and np.asarray(features).shape[1]:
            F = np.asarray(features, np.float64)
            parts.append(self._unit(F - F.mean(axis=0, keepdims=True)))
        Z = np.hstack(parts) if parts else np.zeros((V.shape[0], 0))
        Z = self._unit(Z)
        self.n_basis = Z.shape[1]
        if score is not None:
            sc = np.asarray(score, np.float64)
            sd = float(sc.std()) or 1.0
            Z = np.hstack([Z, ((sc - sc.mean()) / sd)[:, None], np.ones((len(Z), 1))])
        self.Z = np.ascontiguousarray(Z)
        self.Z.flags.writeable = False
        self.rank = Z.shape[1]
        self.key = (r, None if features is None else np.asarray(features).shape[1])

    @staticmethod
    def _unit(Z):
        ms = float((Z * Z).sum(axis=1).mean()) if len(Z) else 0.0
        return Z / np.sqrt(ms) if ms > 0 else Z

    def coefficients(self, items: np.ndarray, y: np.ndarray, reg: float, prior: np.ndarray | None = None) -> np.ndarray:
        """The posterior mean ``w = (reg I + Z_O^T Z_O)^{-1} (reg w0 + Z_O^T y)`` (rank,) float64 of
        the rewards ``y`` of the events on ``items`` (one row per event: an item shown twice
        counts twice), under the prior ``N(w0 = prior (default 0), I / reg)``."""
        if not np.isfinite(reg) or reg <= 0:
            raise ValueError(f"reg must be a finite number > 0, got {reg}")
        items = np.asarray(items, np.int64)
        y = np.asarray(y, np.float64)
        Zo = self.Z[items]
        A = Zo.T @ Zo + reg * np.eye(self.rank)
        b = Zo.T @ y
        if prior is not None:
            b = b + reg * prior
        return np.linalg.solve(A, b)

    def inverse(self, items: np.ndarray, reg: float) -> np.ndarray:
        """``(reg I + Z_O^T Z_O)^{-1}`` (rank, rank)."""
        Zo = self.Z[np.asarray(items, np.int64)]
        return np.linalg.inv(Zo.T @ Zo + reg * np.eye(self.rank))

    def bonus(self, inv: np.ndarray) -> np.ndarray:
        """``sqrt(z_i^T inv z_i)`` (N,) for every item."""
        return np.sqrt(np.maximum(((self.Z @ inv) * self.Z).sum(axis=1), 0.0))

    def apply(self, coef: np.ndarray) -> np.ndarray:
        """``Z @ coef`` (N,) float64."""
        return self.Z @ np.asarray(coef, np.float64)


_BASIS_KEY = "_feedback_item_basis"


def basis_of_model(model: ModelView, rank: int = LINEAR_RANK) -> ItemBasis:
    """The :class:`ItemBasis` of a model for the linear evidence: the top ``rank`` principal
    directions of its item table, its items' dense side features (where it has them) and its
    cold score (``score_all(adapt([]))``); built on first use and kept with the model."""
    b = model.__dict__.get(_BASIS_KEY)
    if b is None or b[0] != int(rank):
        with _LOCK:
            b = model.__dict__.get(_BASIS_KEY)
            if b is None or b[0] != int(rank):
                dense = getattr(model.network, "item_dense", None)
                F = None if dense is None else dense.detach().numpy()
                S = model.score_all(model.adapt([])).astype(np.float64)
                b = (int(rank), ItemBasis(model.item_table.detach().numpy(), int(rank), F, S))
                model.__dict__[_BASIS_KEY] = b
    return b[1]


_KERNEL_KEY = "_feedback_item_kernel"


def kernel_of_model(model: ModelView) -> ItemKernel:
    """The :class:`ItemKernel` of a model's item table (``model.item_table``) at
    ``config.feedback_bandwidth``; built on first use and kept with the model."""
    bw = float(model.config.feedback_bandwidth)
    k = model.__dict__.get(_KERNEL_KEY)
    if k is None or k.bandwidth != bw:
        with _LOCK:
            k = model.__dict__.get(_KERNEL_KEY)
            if k is None or k.bandwidth != bw:
                k = ItemKernel(model.item_table.detach().numpy(), bw)
                model.__dict__[_KERNEL_KEY] = k
    return k

def of_model(model: ModelView) -> RewardPosterior:
    """The :class:`RewardPosterior` of a model's training log (:meth:`ModelView.training_log`;
    built on first use and kept for the model's lifetime: its log never changes)."""
    p = model.__dict__.get(_POSTERIOR_KEY)
    if p is None:
        with _LOCK:
            p = model.__dict__.get(_POSTERIOR_KEY)
            if p is None:
                offsets, items, rewards = model.training_log()
                p = RewardPosterior(offsets, items, rewards, model.n_items, model.reward_scale)
                model.__dict__[_POSTERIOR_KEY] = p
    return p


def score_scale(model: ModelView) -> float:
    """Standard deviation over the catalogue of a model's scores (before the temperature) for
    a user with no history, the unit of ``config.feedback_posterior`` (computed once per model)."""
    sc = model.__dict__.get(_SCALE_KEY)
    if sc is None:
        # Under the lock, once: concurrent first feedback calls must all use one value (each
        # computing its own could differ in the last bits, e.g. a BLAS product run on another
        # number of threads, and a state built with a value later overwritten would not match
        # a replay of the log: the "1 of 1,898 online results" of issue 18).
        with _LOCK:
            sc = model.__dict__.get(_SCALE_KEY)
            if sc is None:
                z = model.score_all(model.adapt([]))
                sc = float(np.std(z.astype(np.float64))) or 1.0
                model.__dict__[_SCALE_KEY] = sc
    return sc
