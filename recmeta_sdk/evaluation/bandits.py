"""Baseline online policies for :func:`recmeta_sdk.evaluation.sim.run_online`.

Every policy implements the protocol of :class:`recmeta_sdk.evaluation.sim.OnlinePolicy`:
``recommend(user_ctx, k, exclude) -> (k,) int64 item ids`` and
``feedback(user, item, reward)``; per-user state is keyed by ``user_ctx.user``.

==========================  ================================================================
:class:`RandomPolicy`       uniform over the items not excluded
:class:`PopularityPolicy`   the most popular items not excluded (fixed scores)
:class:`EpsilonGreedyPopularity`  popularity, each position replaced by a uniform item w.p. ε
:class:`LinUCB`             per-user ridge regression on item features with an upper
                            confidence bonus (Li et al. 2010), optionally shrunk towards a
                            prior preference vector (e.g. the mean existing user)
:class:`EASEOnline`         EASE (Steck 2019) trained on the existing users; a new user's
                            liked items so far are folded in each round
:class:`OraclePolicy`       the environment's optimal slate (needs ``env.optimal_slate``)
:class:`MyopicOracle`       the slate of highest expected immediate reward (true model of a
                            :class:`~recmeta_sdk.evaluation.sim.LongSessionSimulator`)
:class:`PlanningOracle`     the true model of a :class:`~recmeta_sdk.evaluation.sim.LongSessionSimulator`,
                            choosing the slate by its value over the remaining session
                            budget (a value-based lookahead), not only the next click
:class:`RecommenderPolicy`  serves with a trained ``Recommender``, updated online by its feedback
==========================  ================================================================

Helpers: :func:`fit_ease` (the EASE item-item matrix), :func:`svd_item_embeddings` (item
embeddings and the mean user vector from a truncated SVD of a user-item matrix).
"""
from __future__ import annotations

import logging
from collections.abc import Hashable

import numpy as np

from .baselines import ease_weights, topk_from_scores
from .sim import UserContext

logger = logging.getLogger("recmeta")

__all__ = [
    "EASEOnline",
    "EpsilonGreedyPopularity",
    "LinUCB",
    "MyopicOracle",
    "OraclePolicy",
    "PlanningOracle",
    "PopularityPolicy",
    "RandomPolicy",
    "RecommenderPolicy",
    "fit_ease",
    "svd_item_embeddings",
]


def _top_k(scores: np.ndarray, k: int, exclude: np.ndarray) -> np.ndarray:
    """Ids of the k highest scores outside ``exclude`` (ties broken by the lower id)."""
    return topk_from_scores(scores, k, exclude)


def _check_scores(name: str, scores) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1 or s.shape[0] < 1:
        raise ValueError(f"{name} must be a non-empty 1-D array, got shape {s.shape}")
    if not np.isfinite(s).all():
        i = int(np.flatnonzero(~np.isfinite(s))[0])
        raise ValueError(f"{name} must be finite; entry {i} is {s[i]}")
    return s


class RandomPolicy:
    """Uniformly random items (without replacement within a slate)."""

    def __init__(self, n_items: int, *, seed: int = 0):
        if int(n_items) < 1:
            raise ValueError(f"n_items must be >= 1, got {n_items}")
        self.n_items = int(n_items)
        self._rng = np.random.default_rng(seed)

    def recommend(self, user_ctx: UserContext, k: int, exclude: np.ndarray) -> np.ndarray:
        if exclude.size:
            mask = np.ones(self.n_items, dtype=bool)
            mask[exclude] = False
            allowed = np.flatnonzero(mask)
        else:
            allowed = np.arange(self.n_items)
        return self._rng.choice(allowed, size=k, replace=False).astype(np.int64)

    def feedback(self, user: Hashable, item: int, reward: float) -> None:
        pass


class PopularityPolicy:
    """The ``k`` items with the highest fixed popularity score, excluding ``exclude``."""

    def __init__(self, scores):
        self.scores = _check_scores("scores", scores)

    def recommend(self, user_ctx: UserContext, k: int, exclude: np.ndarray) -> np.ndarray:
        return _top_k(self.scores, k, exclude)

    def feedback(self, user: Hashable, item: int, reward: float) -> None:
        pass


class EpsilonGreedyPopularity:
    """Popularity, with each slate position replaced by a uniform random item w.p. ``epsilon``."""

    def __init__(self, scores, epsilon: float = 0.1, *, seed: int = 0):
        self.scores = _check_scores("scores", scores)
        if not 0.0 <= float(epsilon) <= 1.0:
            raise ValueError(f"epsilon must lie in [0, 1], got {epsilon}")
        self.epsilon = float(epsilon)
        self._rng = np.random.default_rng(seed)

    def recommend(self, user_ctx: UserContext, k: int, exclude: np.ndarray) -> np.ndarray:
        n = self.scores.shape[0]
        taken = np.zeros(n, dtype=bool)
        if exclude.size:
            taken[exclude] = True
        out = np.empty(k, dtype=np.int64)
        for pos in range(k):
            if self._rng.random() < self.epsilon:
                i = int(self._rng.choice(np.flatnonzero(~taken)))
            else:
                i = int(_top_k(self.scores, 1, np.flatnonzero(taken))[0])
            out[pos] = i
            taken[i] = True
        return out

    def feedback(self, user: Hashable, item: int, reward: float) -> None:
        pass


class LinUCB:
    """Disjoint-user LinUCB on item features.

    Each user ``u`` keeps a ridge regression of the reward on the item features ``x_i``
    (:math:`A_u = λI + Σ x x^T`, :math:`b_u = λθ_0 + Σ r x`) and is served the items with the
    highest :math:`x_i^T θ_u + α \\sqrt{x_i^T A_u^{-1} x_i}`, :math:`θ_u = A_u^{-1} b_u`. A
    prior ``theta0`` (e.g. the mean existing user) makes a new user start from it instead of
    from zero. ``A_u^{-1}`` is updated by Sherman–Morrison.

    Parameters
    ----------
    item_features : (n_items, d) float
    alpha : float
        Width of the confidence bonus.
    lam : float
        Ridge strength (prior precision).
    theta0 : (d,) float, optional
        Prior mean of the preference vector.
    """

    def __init__(self, item_features, *, alpha: float = 1.0, lam: float = 1.0, theta0=None):
        X = np.asarray(item_features, dtype=np.float64)
        if X.ndim != 2 or X.shape[0] < 1 or X.shape[1] < 1:
            raise ValueError(f"item_features must be (n_items, d), got shape {X.shape}")
        if not np.isfinite(X).all():
            raise ValueError("item_features must be finite")
        if not np.isfinite(alpha) or alpha < 0:
            raise ValueError(f"alpha must be finite and >= 0, got {alpha}")
        if not np.isfinite(lam) or lam <= 0:
            raise ValueError(f"lam must be finite and > 0, got {lam}")
        self.X = X
        self.alpha = float(alpha)
        self.lam = float(lam)
        d = X.shape[1]
        if theta0 is None:
            self.theta0 = np.zeros(d)
        else:
            self.theta0 = np.asarray(theta0, dtype=np.float64)
            if self.theta0.shape != (d,):
                raise ValueError(f"theta0 must have shape ({d},), got {self.theta0.shape}")
        self._state: dict[Hashable, list] = {}

    def _get(self, user):
        st = self._state.get(user)
        if st is None:
            d = self.X.shape[1]
            st = [np.eye(d) / self.lam, self.lam * self.theta0.copy()]  # A^{-1}, b
            self._state[user] = st
        return st

    def scores(self, user) -> np.ndarray:
        """UCB score of every item for ``user``, (n_items,)."""
        A_inv, b = self._get(user)
        theta = A_inv @ b
        mean = self.X @ theta
        if self.alpha == 0.0:
            return mean
        var = ((self.X @ A_inv) * self.X).sum(axis=1)
        return mean + self.alpha * np.sqrt(np.maximum(var, 0.0))

    def recommend(self, user_ctx: UserContext, k: int, exclude: np.ndarray) -> np.ndarray:
        return _top_k(self.scores(user_ctx.user), k, exclude)

    def feedback(self, user: Hashable, item: int, reward: float) -> None:
        A_inv, b = self._get(user)
        x = self.X[int(item)]
        Ax = A_inv @ x
        A_inv -= np.outer(Ax, Ax) / (1.0 + x @ Ax)
        b += float(reward) * x


def fit_ease(X, lam: float = 250.0) -> np.ndarray:
    """EASE's item-item weights: ``B = I - P / diag(P)``, ``P = (XᵀX + λI)⁻¹``, ``diag(B) = 0``.

    Parameters
    ----------
    X : (n_users, n_items) float 0/1
    lam : float > 0

    Returns
    -------
    (n_items, n_items) float64
    """
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise ValueError(f"X must be 2-D (n_users, n_items), got shape {X.shape}")
    if not np.isfinite(lam) or lam <= 0:
        raise ValueError(f"lam must be finite and > 0, got {lam}")
    return ease_weights(X.T @ X, lam)


def svd_item_embeddings(X, dim: int = 32):
    """Item embeddings from a truncated SVD ``X ≈ U S Vᵀ``.

    Returns ``(items, mean_user)``: ``items = V S^{1/2}`` with a trailing constant 1
    column, (n_items, dim + 1), and the mean existing user ``mean(U S^{1/2})`` with a
    trailing 0 — a natural LinUCB prior, under which ``items @ mean_user`` ranks the
    items close to their popularity among the existing users.
    """
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise ValueError(f"X must be 2-D, got shape {X.shape}")
    dim = int(dim)
    if not 1 <= dim <= min(X.shape):
        raise ValueError(f"dim must lie in [1, {min(X.shape)}], got {dim}")
    U, S, Vt = np.linalg.svd(X, full_matrices=False)
    root = np.sqrt(S[:dim])
    items = Vt[:dim].T * root[None, :]
    users = U[:, :dim] * root[None, :]
    items = np.hstack([items, np.ones((items.shape[0], 1))])
    mean_user = np.append(users.mean(axis=0), 0.0)
    return items, mean_user


class EASEOnline:
    """EASE with online fold-in: a user's score is ``x_u B`` with ``x_u`` the items the user
    gave a positive reward so far; while ``x_u`` is empty the fallback scores (popularity)
    are used. Ties are broken by the fallback scores.

    Parameters
    ----------
    B : (n_items, n_items) float
        From :func:`fit_ease` on the existing users.
    fallback_scores : (n_items,) float
        Popularity among the existing users.
    """

    def __init__(self, B, fallback_scores):
        self.B = np.asarray(B, dtype=np.float64)
        if self.B.ndim != 2 or self.B.shape[0] != self.B.shape[1]:
            raise ValueError(f"B must be square (n_items, n_items), got shape {self.B.shape}")
        self.fallback = _check_scores("fallback_scores", fallback_scores)
        if self.fallback.shape[0] != self.B.shape[0]:
            raise ValueError(f"fallback_scores has {self.fallback.shape[0]} items, B has {self.B.shape[0]}")
        span = self.fallback.max() - self.fallback.min()
        self._tiebreak = 1e-9 * (self.fallback - self.fallback.min()) / (span if span > 0 else 1.0)
        self._liked: dict[Hashable, list] = {}

    def scores(self, user) -> np.ndarray:
        liked = self._liked.get(user)
        if not liked:
            return self.fallback
        return self.B[liked].sum(axis=0) + self._tiebreak

    def recommend(self, user_ctx: UserContext, k: int, exclude: np.ndarray) -> np.ndarray:
        return _top_k(self.scores(user_ctx.user), k, exclude)

    def feedback(self, user: Hashable, item: int, reward: float) -> None:
        if reward > 0:
            self._liked.setdefault(user, []).append(int(item))


class OraclePolicy:
    """Serves the environment's optimal slate (it reads the truth: an upper bound)."""

    def __init__(self, env):
        if not hasattr(env, "optimal_slate"):
            raise TypeError(f"{type(env).__name__} has no optimal_slate: no oracle for it")
        self.env = env

    def recommend(self, user_ctx: UserContext, k: int, exclude: np.ndarray) -> np.ndarray:
        return self.env.optimal_slate(user_ctx.user, k, exclude, user_ctx.t)

    def feedback(self, user: Hashable, item: int, reward: float) -> None:
        pass


class RecommenderPolicy:
    """Serve with a :class:`recmeta_sdk.Recommender`, learning online from the feedback.

    With a ``recmeta_sdk.Recommender`` (``mode="feedback"``, the default for one), every
    observed reward goes through the online loop of :mod:`recmeta_sdk.online`: the user's
    state takes one adaptation step per event (``update="step"``) or is re-adapted from the
    whole history (``update="readapt"``), and each round's slate is
    ``recommender.recommend(state, k=k, exclude=..., exclude_seen=exclude_seen)`` from the
    user's latest state (a user without feedback yet gets ``adapt([])``, the cold state).
    The policy keeps its own :class:`~recmeta_sdk.online.OnlineStore`, so two policies (or
    two benchmark runs) over one model do not share users. Served items are logged with
    propensity 1 (greedy serving).

    Any other object with ``adapt(history, steps=...)`` and ``recommend(state, k=...,
    exclude=..., exclude_seen=...)`` is served by re-adapting from everything the user was
    served so far each round (``mode="readapt"``:
    ``recommender.adapt({"item": ids, "reward": rewards}, steps=adapt_steps)``).

    Environment item indices ``0..n_items-1`` map to the recommender's item ids through
    ``item_ids`` (``MovieLensReplay.item_ids``; default: the same integers).

    Parameters
    ----------
    recommender : a ``recmeta_sdk.Recommender`` or an object with ``adapt`` / ``recommend``
    item_ids : (n_items,) array, optional
    mode : ``"feedback"`` or ``"readapt"``; default: ``"feedback"`` for a Recommender
    update : ``"step"`` (default) or ``"readapt"``: the online update of ``mode="feedback"``
    adapt_steps : int, optional (``mode="readapt"`` only; None: the recommender's default)
    positives_only : bool, optional
        The encoder reads only the positively rewarded items (default: True with
        ``mode="feedback"``, False with ``mode="readapt"``).
    exclude_seen : bool, default True
        Also exclude the items served before (the environment's ``exclude`` is always passed).
    known_users : bool, default False
        Whether the environment's user ids are the recommender's training user ids. By
        default they are not (a simulator numbers its users ``0..n-1``, a replay its dense
        user indices): every user starts as a new user, never from the training state of
        a training user that happens to have the same id.
    """

    def __init__(self, recommender, *, item_ids=None, mode: str | None = None, update: str = "step",
                 adapt_steps: int | None = None, positives_only: bool | None = None,
                 exclude_seen: bool = True, known_users: bool = False):
        for attr in ("adapt", "recommend"):
            if not callable(getattr(recommender, attr, None)):
                raise TypeError(f"recommender has no {attr}() method: {type(recommender).__name__}")
        # a recmeta Recommender (duck-typed: this layer does not import the facade above it)
        is_rec = callable(getattr(recommender, "online_store", None)) and callable(
            getattr(recommender, "feedback", None))
        if mode is None:
            mode = "feedback" if is_rec else "readapt"
        if mode not in ("feedback", "readapt"):
            raise ValueError(f"mode must be 'feedback' or 'readapt', got {mode!r}")
        if mode == "feedback" and not is_rec:
            raise TypeError(f"mode='feedback' needs a recmeta_sdk.Recommender, got {type(recommender).__name__}")
        if mode == "feedback" and adapt_steps is not None:
            raise ValueError("adapt_steps applies to mode='readapt' only")
        self.rec = recommender
        self.mode = mode
        self.item_ids = None if item_ids is None else np.asarray(item_ids)
        self._index = None
        if self.item_ids is not None:
            from ..data import IdMap

            try:
                self._index = IdMap(self.item_ids)
            except ValueError as e:
                raise ValueError(f"item_ids must be unique and not missing: {e}") from None
        self.adapt_steps = adapt_steps
        self.positives_only = (mode == "feedback") if positives_only is None else bool(positives_only)
        self.exclude_seen = bool(exclude_seen)
        self._hist: dict[Hashable, list] = {}
        self._state: dict[Hashable, object] = {}
        self._store = None
        self._cold = None
        if mode == "feedback":
            self._store = recommender.online_store(encode="positive" if self.positives_only else "all",
                                                   update=update, known_users=bool(known_users))
            self._cold = recommender.adapt([])

    def _ext(self, idx) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64)
        return idx if self.item_ids is None else self.item_ids[idx]

    def _state_of(self, user):
        if self._store is not None:
            cur = self._store.current(user)
            return self._cold if cur is None else cur.state
        st = self._state.get(user)
        if st is None:
            hist = self._hist.get(user, [])
            if self.positives_only:
                hist = [(i, r) for i, r in hist if r > 0]
            items = self._ext([i for i, _ in hist])
            history = {"item": items, "reward": np.asarray([r for _, r in hist], dtype=np.float64)}
            kw = {} if self.adapt_steps is None else {"steps": self.adapt_steps}
            st = self.rec.adapt(history, **kw)
            self._state[user] = st
        return st

    def recommend(self, user_ctx: UserContext, k: int, exclude: np.ndarray) -> np.ndarray:
        st = self._state_of(user_ctx.user)
        ex = list(self._ext(exclude))
        if self._store is not None and self.exclude_seen:
            cur = self._store.current(user_ctx.user)
            if cur is not None:
                ex += cur.exclude_ids()  # the misses (the state's history holds the hits)
        out = self.rec.recommend(st, k=k, exclude=ex, exclude_seen=self.exclude_seen)
        ids = out[0] if isinstance(out, tuple) else getattr(out, "ids", out)
        ids = np.asarray(ids).reshape(-1)
        if self._index is None:
            return ids.astype(np.int64)
        pos = self._index.to_index(ids)
        if (pos < 0).any():
            raise ValueError(f"recommender returned item ids unknown to the environment: {ids[pos < 0][:5]}")
        return pos.astype(np.int64)

    def feedback(self, user: Hashable, item: int, reward: float) -> None:
        if self._store is not None:
            ext = self._ext([int(item)])[0]
            self._store.feedback([(user, ext.item() if hasattr(ext, "item") else ext, float(reward), 1.0)])
            return
        self._hist.setdefault(user, []).append((int(item), float(reward)))
        self._state.pop(user, None)  # re-adapt before the next recommendation


class MyopicOracle(OraclePolicy):
    """The slate with the highest expected *immediate* reward under the true model
    (``env.optimal_slate`` of a :class:`~recmeta_sdk.evaluation.sim.LongSessionSimulator`, which reads the
    user's current true state: interests, satiation). An upper bound for policies that
    maximise the next click, and the reference that :class:`PlanningOracle` must beat."""


class PlanningOracle:
    """The true model of a :class:`~recmeta_sdk.evaluation.sim.LongSessionSimulator`, planning for the
    session's budget (a value-based lookahead).

    Each step, for every ``ρ`` in ``rhos`` the slate ``s_ρ`` maximising
    ``E[reward] + ρ · E[budget change]`` is built (the ``k`` items of highest
    ``p_i (r_i + ρ g_i)``, best first; ``p_i`` the true click probability in the current
    state, ``r_i`` the reward and ``g_i`` the budget a click returns), and valued as the
    return of serving it for the rest of the session from the current state:
    ``V_ρ = R · (1 − (1 − h)^n) / h`` (``R`` its expected reward per step, ``n`` =
    ``min(steps left, max(1, budget / D))`` the steps the budget lasts at the expected
    drain ``D = step_cost − E[budget returned]`` (all the steps left when ``D <= 0``), ``h``
    the per-step leaving probability on a slate without clicks, ``n`` when ``h = 0``). The
    slate of the highest ``V_ρ`` is served; the state (satiation, drift, budget) is re-read
    every step. With ``rhos=(0,)`` it is the myopic oracle.

    Parameters
    ----------
    env : LongSessionSimulator
    rhos : sequence of float >= 0
        The values of a unit of budget tried (0, the myopic slate, is always included).
    """

    DEFAULT_RHOS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 8.0)

    def __init__(self, env, rhos: tuple | list | np.ndarray = DEFAULT_RHOS):
        for attr in ("state", "attractiveness", "budget_per_click", "reward_per_click", "examination"):
            if not hasattr(env, attr):
                raise TypeError(f"{type(env).__name__} has no {attr}: PlanningOracle needs a "
                                "LongSessionSimulator-like environment")
        r = np.asarray(rhos, dtype=np.float64)
        if r.ndim != 1 or r.shape[0] < 1 or not np.isfinite(r).all() or (r < 0).any():
            raise ValueError(f"rhos must be a non-empty 1-D sequence of finite values >= 0, got {rhos!r}")
        self.env = env
        self.rhos = np.unique(np.append(r, 0.0))
        self.chosen_rho: list = []  # the ρ of every slate served (diagnostics)

    def plan(self, user: Hashable, k: int, exclude: np.ndarray) -> tuple:
        """The best candidate in the user's current state.

        Returns
        -------
        slate : (k,) int64
        rho : float
            The value of a unit of budget it was built with.
        value : float
            Its estimated return over the rest of the session.
        """
        env = self.env
        c = env.config
        st = env.state(user)
        p1 = env.attractiveness(user)
        rw, g = env.reward_per_click, env.budget_per_click
        exam = env.examination[:k]
        left = max(c.max_steps - st.step_in_session, 1)
        h = float(c.leave_on_miss)
        best = None
        for rho in self.rhos:
            slate = _top_k(p1 * (rw + rho * g), k, exclude)
            p = exam * p1[slate]
            R = float((p * rw[slate]).sum())
            D = c.step_cost - float((p * g[slate]).sum())
            n = float(left) if D <= 0 else min(float(left), max(1.0, st.budget / D))
            q = h * float(np.prod(1.0 - p))
            steps = n if q <= 0 else (1.0 - (1.0 - q) ** n) / q
            v = R * steps
            if best is None or v > best[2] + 1e-12:
                best = (slate, float(rho), v)
        return best

    def recommend(self, user_ctx: UserContext, k: int, exclude: np.ndarray) -> np.ndarray:
        slate, rho, _ = self.plan(user_ctx.user, k, exclude)
        self.chosen_rho.append(rho)
        return slate

    def feedback(self, user: Hashable, item: int, reward: float) -> None:
        pass
