"""Environments for online recommendation: a multi-task user simulator, a MovieLens replay,
and the online benchmark loop.

The loop (:func:`run_online`) serves each of an environment's new users for ``T`` rounds::

    ctx = env.context(user, t)                          # UserContext(user, t, features)
    slate = policy.recommend(ctx, k, exclude)           # k item ids, none in exclude
    rewards = env.step(user, slate, t)                  # one reward per slate position
    policy.feedback(user, item, reward)                 # for every item of the slate

and reports the mean cumulative reward per user after ``t`` rounds with standard errors.

A policy is any object with ``recommend(user_ctx, k, exclude) -> item ids`` and
``feedback(user, item, reward)`` (:class:`OnlinePolicy`); ready-made baselines are in
:mod:`recmeta_sdk.evaluation.bandits`, and :class:`recmeta_sdk.evaluation.bandits.RecommenderPolicy` adapts an
object with ``adapt`` / ``recommend`` / ``feedback`` (a trained recommender) to it.

Environments
------------
:class:`UserSimulator`
    Configurable (:class:`SimConfig`): user segments with different latent preferences
    (the tasks), items with latent features and popularity, a position-biased click model,
    interest drift, and unseen segments for the test users. Its optimal slate and the
    expected reward of any slate are known exactly.
:class:`MovieLensReplay`
    Replay over real ratings (quality.md section 3): users split 80/20 (seed 2020); each
    new user is served one item per round, no repeats; reward 1 if the user rated the item
    4 or more, else 0 (unrated counts as 0).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable, Dict, Hashable, Mapping, Optional, Protocol, Sequence, Union

import numpy as np

logger = logging.getLogger("recmeta")

__all__ = [
    "UserContext",
    "OnlinePolicy",
    "SimConfig",
    "UserSimulator",
    "MovieLensReplay",
    "OnlineResult",
    "run_online",
    "run_benchmark",
    "format_table",
    "plot_curves",
    "DEFAULT_CHECKPOINTS",
]

DEFAULT_CHECKPOINTS = (1, 5, 10, 20, 50)


@dataclass(frozen=True)
class UserContext:
    """What a policy sees about the user it serves in one round.

    Attributes
    ----------
    user : hashable
        The user's id (stable over the rounds).
    t : int
        The round, 0-based.
    features : (d,) float or None
        Observable user features, if the environment has any.
    """

    user: Hashable
    t: int
    features: Optional[np.ndarray] = None


class OnlinePolicy(Protocol):
    """The protocol of an online policy (see the module doc)."""

    def recommend(self, user_ctx: UserContext, k: int, exclude: np.ndarray) -> np.ndarray:
        """Return ``k`` distinct item ids (int), none of them in ``exclude``."""

    def feedback(self, user: Hashable, item: int, reward: float) -> None:
        """Observe the reward of one recommended item."""


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _check_slate(slate, k: int, n_items: int, exclude: np.ndarray, who: str) -> np.ndarray:
    s = np.asarray(slate)
    if s.ndim != 1 or s.shape[0] != k:
        raise ValueError(f"{who} returned a slate of shape {s.shape}, expected ({k},)")
    if not np.issubdtype(s.dtype, np.integer):
        raise TypeError(f"{who} returned item ids of dtype {s.dtype}, expected integers")
    s = s.astype(np.int64)
    if s.min() < 0 or s.max() >= n_items:
        raise ValueError(f"{who} returned item id(s) outside [0, {n_items}): {s}")
    if np.unique(s).shape[0] != k:
        raise ValueError(f"{who} returned duplicate item ids: {s}")
    if exclude.size and np.isin(s, exclude).any():
        raise ValueError(f"{who} returned excluded item id(s): {s[np.isin(s, exclude)]}")
    return s


# =========================================================================== simulator

@dataclass(frozen=True)
class SimConfig:
    """Configuration of :class:`UserSimulator`.

    Attributes
    ----------
    n_items : int
        Catalogue size.
    dim : int
        Latent dimension of items and user preferences.
    n_segments : int
        Segments (tasks) of the existing users, available for (meta-)training.
    n_test_segments : int
        Segments that appear only among the test users (new tasks at test time).
    users_per_segment : int
        Users drawn per segment.
    slate_size : int
        Items per round.
    position_bias : float
        Examination probability of position ``p`` (0-based) is ``1 / (1 + p) ** position_bias``.
    preference_scale : float
        Norm scale of the segment preference vectors (how different the tasks are).
    user_noise : float
        Standard deviation of a user's deviation from their segment's preference.
    popularity_scale : float
        Standard deviation of the item popularity logit (shared by all users).
    click_offset : float
        Baseline click logit.
    drift : float
        Standard deviation per round of the random walk of a user's preference vector
        (interest drift); 0 disables it.
    feature_noise : float
        Standard deviation of the noise on the observable item features.
    allow_repeats : bool
        Whether an item may be recommended to the same user again.
    seed : int
        Seed of everything the simulator draws.
    """

    n_items: int = 200
    dim: int = 8
    n_segments: int = 8
    n_test_segments: int = 4
    users_per_segment: int = 25
    slate_size: int = 1
    position_bias: float = 1.0
    preference_scale: float = 2.0
    user_noise: float = 0.3
    popularity_scale: float = 0.5
    click_offset: float = -1.5
    drift: float = 0.0
    feature_noise: float = 0.0
    allow_repeats: bool = True
    seed: int = 0

    def validate(self) -> "SimConfig":
        for name in ("n_items", "dim", "n_segments", "users_per_segment", "slate_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"SimConfig.{name} must be a positive integer, got {v!r}")
        if isinstance(self.n_test_segments, bool) or not isinstance(self.n_test_segments, (int, np.integer)) \
                or self.n_test_segments < 0:
            raise ValueError(f"SimConfig.n_test_segments must be an integer >= 0, got {self.n_test_segments!r}")
        if self.slate_size > self.n_items:
            raise ValueError(f"SimConfig.slate_size={self.slate_size} exceeds n_items={self.n_items}")
        for name in ("position_bias", "preference_scale", "user_noise", "popularity_scale", "drift",
                     "feature_noise"):
            v = float(getattr(self, name))
            if not np.isfinite(v) or v < 0:
                raise ValueError(f"SimConfig.{name} must be finite and >= 0, got {v!r}")
        if not np.isfinite(self.click_offset):
            raise ValueError(f"SimConfig.click_offset must be finite, got {self.click_offset!r}")
        return self


class UserSimulator:
    """A multi-task user simulator with a known optimum.

    Users belong to segments; a segment ``s`` has a preference vector ``μ_s`` and user ``u``
    of segment ``s`` has ``θ_u(0) = μ_s + user_noise · ε``; with interest drift,
    ``θ_u(t+1) = θ_u(t) + drift · ε_t``. Item ``i`` has latent features ``v_i`` and a
    popularity logit ``b_i``. The probability that the user clicks item ``i`` shown at
    position ``p`` in round ``t`` is ``exam(p) · σ(click_offset + θ_u(t)·v_i + b_i)`` with
    ``exam(p) = (1 + p) ** -position_bias``. Clicks at different positions are independent,
    so the slate with the highest expected reward puts the ``k`` most attractive items in
    decreasing order of attractiveness (:meth:`optimal_slate`).

    Existing users (:attr:`train_users`) come from ``n_segments`` segments, new users
    (:attr:`test_users`, the default population of :func:`run_online`) from
    ``n_test_segments`` further segments never seen in training (or from the training
    segments when ``n_test_segments == 0``, with fresh users).

    Parameters
    ----------
    config : SimConfig, optional
    **overrides
        Fields of :class:`SimConfig` to override.
    """

    def __init__(self, config: Optional[SimConfig] = None, **overrides):
        cfg = config if config is not None else SimConfig()
        if overrides:
            bad = set(overrides) - set(SimConfig.__dataclass_fields__)
            if bad:
                raise ValueError(f"unknown SimConfig field(s): {sorted(bad)}")
            cfg = SimConfig(**{**cfg.__dict__, **overrides})
        self.config = cfg.validate()
        c = self.config
        rng = np.random.default_rng([c.seed, 0])
        self.n_items = int(c.n_items)
        self.slate_size = int(c.slate_size)
        self.allow_repeats = bool(c.allow_repeats)
        self.item_latent = rng.standard_normal((c.n_items, c.dim)) / np.sqrt(c.dim)
        self.item_bias = rng.normal(0.0, c.popularity_scale, c.n_items)
        n_seg = c.n_segments + c.n_test_segments
        self.segment_prefs = rng.standard_normal((n_seg, c.dim)) * (c.preference_scale / np.sqrt(c.dim))
        self.item_features = self.item_latent + rng.normal(0.0, c.feature_noise, self.item_latent.shape) \
            if c.feature_noise > 0 else self.item_latent.copy()
        n_train = c.n_segments * c.users_per_segment
        test_segs = range(c.n_segments, n_seg) if c.n_test_segments > 0 else range(c.n_segments)
        segs = [s for s in range(c.n_segments) for _ in range(c.users_per_segment)]
        segs += [s for s in test_segs for _ in range(c.users_per_segment)]
        self.user_segment = np.asarray(segs, dtype=np.int64)
        noise = rng.standard_normal((len(segs), c.dim)) * (c.user_noise / np.sqrt(c.dim))
        self.user_pref0 = self.segment_prefs[self.user_segment] + noise
        self.train_users = np.arange(n_train, dtype=np.int64)
        self.test_users = np.arange(n_train, len(segs), dtype=np.int64)
        self.examination = (1.0 + np.arange(c.slate_size)) ** (-float(c.position_bias))
        self._traj: Dict[int, np.ndarray] = {}
        self._traj_rng: Dict[int, np.random.Generator] = {}

    # ------------------------------------------------------------------ truth
    @property
    def users(self) -> np.ndarray:
        """The new (test) users served by :func:`run_online`."""
        return self.test_users

    def _check_user(self, user) -> int:
        u = int(user)
        if not 0 <= u < self.user_segment.shape[0]:
            raise ValueError(f"unknown user {user!r}; users are 0..{self.user_segment.shape[0] - 1}")
        return u

    def preference(self, user, t: int = 0) -> np.ndarray:
        """``θ_u(t)``, the user's latent preference in round ``t``, (dim,)."""
        u = self._check_user(user)
        t = int(t)
        if t < 0:
            raise ValueError(f"round t must be >= 0, got {t}")
        if self.config.drift == 0.0 or t == 0:
            return self.user_pref0[u]
        # cum[t] = sum of the first t drift steps, drawn in blocks of 64 from the user's own
        # stream, so θ_u(t) does not depend on the order in which rounds are queried
        cum = self._traj.get(u)
        if cum is None:
            cum = np.zeros((1, self.config.dim))
        if cum.shape[0] <= t:
            rng = self._traj_rng.setdefault(u, np.random.default_rng([self.config.seed, 1, u]))
            scale = self.config.drift / np.sqrt(self.config.dim)
            blocks = [cum]
            last = cum[-1]
            have = cum.shape[0]
            while have <= t:
                ext = last + np.cumsum(rng.standard_normal((64, self.config.dim)) * scale, axis=0)
                blocks.append(ext)
                last = ext[-1]
                have += 64
            cum = np.vstack(blocks)
            self._traj[u] = cum
        return self.user_pref0[u] + cum[t]

    def attractiveness(self, user, t: int = 0) -> np.ndarray:
        """Click probability of every item at the first position in round ``t``, (n_items,)."""
        theta = self.preference(user, t)
        return _sigmoid(self.config.click_offset + self.item_latent @ theta + self.item_bias)

    def expected_reward(self, user, slate, t: int = 0) -> float:
        """Expected number of clicks on ``slate`` (item ids by position) in round ``t``."""
        s = np.asarray(slate, dtype=np.int64)
        if s.ndim != 1 or not 1 <= s.shape[0] <= self.slate_size:
            raise ValueError(f"slate must be 1-D with 1..{self.slate_size} items, got shape {s.shape}")
        return float((self.examination[: s.shape[0]] * self.attractiveness(user, t)[s]).sum())

    def optimal_slate(self, user, k: Optional[int] = None, exclude=None, t: int = 0) -> np.ndarray:
        """The slate of ``k`` items (default ``slate_size``) with the highest expected reward."""
        k = self.slate_size if k is None else int(k)
        a = self.attractiveness(user, t).copy()
        if exclude is not None and np.size(exclude):
            a[np.asarray(exclude, dtype=np.int64)] = -np.inf
        order = np.argsort(-a, kind="stable")[:k]
        return order.astype(np.int64)

    def item_popularity(self, users: Optional[Sequence[int]] = None) -> np.ndarray:
        """Mean first-position click probability of each item over ``users`` (default: the
        existing users) in round 0 — what a popularity count over their logs estimates."""
        us = self.train_users if users is None else np.asarray(users, dtype=np.int64)
        logits = self.config.click_offset + self.user_pref0[us] @ self.item_latent.T + self.item_bias
        return _sigmoid(logits).mean(axis=0)

    # ------------------------------------------------------------------ environment
    def context(self, user, t: int) -> UserContext:
        """The user's context: the simulator exposes no user features (a new user is unknown)."""
        return UserContext(user=int(self._check_user(user)), t=int(t), features=None)

    def step(self, user, slate, t: int, rng: np.random.Generator) -> np.ndarray:
        """Draw the clicks on ``slate`` in round ``t``; returns (len(slate),) float 0/1."""
        s = np.asarray(slate, dtype=np.int64)
        p = self.examination[: s.shape[0]] * self.attractiveness(user, t)[s]
        return (rng.random(s.shape[0]) < p).astype(np.float64)

    def log_random(self, users: Optional[Sequence[int]] = None, n_rounds: int = 20, *, seed: int = 0):
        """Logged bandit feedback of a uniform-random slate policy (for offline training / OPE).

        Returns a pandas DataFrame with columns user, item, reward, propensity (the
        marginal probability of the item at its position, 1 / n_items), position (0-based)
        and timestamp (the round).
        """
        import pandas as pd

        us = self.train_users if users is None else np.asarray(users, dtype=np.int64)
        rng = np.random.default_rng([self.config.seed, 2, seed])
        rows = []
        for u in us:
            for t in range(int(n_rounds)):
                slate = rng.choice(self.n_items, size=self.slate_size, replace=False)
                r = self.step(u, slate, t, rng)
                for p, (i, ri) in enumerate(zip(slate, r)):
                    rows.append((int(u), int(i), float(ri), 1.0 / self.n_items, p, t))
        return pd.DataFrame(rows, columns=["user", "item", "reward", "propensity", "position", "timestamp"])


# =========================================================================== replay

class MovieLensReplay:
    """Replay environment over real ratings (quality.md section 3).

    Users are split into existing users (``1 - test_fraction``) and new users
    (``test_fraction``) with ``np.random.default_rng(seed).permutation`` of the sorted user
    ids. A new user is served one item per round (``slate_size`` = 1), never the same item
    twice; the reward is 1 when the user rated the item ``like_threshold`` or more, else 0
    (an unrated item counts as 0).

    Parameters
    ----------
    ratings : DataFrame, optional
        Columns ``user``, ``item``, ``reward`` (the rating). Default: MovieLens-100K from
        ``recmeta_sdk.datasets.load("ml-100k")``.
    test_fraction : float, default 0.2
    seed : int, default 2020
    like_threshold : float, default 4.0

    Attributes
    ----------
    n_items : int
        Items are the dense ids ``0..n_items-1`` (:attr:`item_ids` maps them back).
    users : (n_new,) int64
        The new users' dense ids (the population of :func:`run_online`).
    train_users : (n_existing,) int64
    """

    slate_size = 1
    allow_repeats = False

    def __init__(self, ratings=None, *, test_fraction: float = 0.2, seed: int = 2020,
                 like_threshold: float = 4.0):
        import pandas as pd

        if ratings is None:
            from .. import datasets

            ratings = datasets.load("ml-100k").interactions
        if not isinstance(ratings, pd.DataFrame):
            raise TypeError(f"ratings must be a pandas DataFrame, got {type(ratings).__name__}")
        missing = {"user", "item", "reward"} - set(ratings.columns)
        if missing:
            raise ValueError(f"ratings lacks column(s) {sorted(missing)}")
        if not 0.0 < float(test_fraction) < 1.0:
            raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
        r = ratings["reward"].to_numpy(np.float64)
        if not np.isfinite(r).all():
            i = int(np.flatnonzero(~np.isfinite(r))[0])
            raise ValueError(f"ratings.reward must be finite; row {i} is {r[i]}")
        self.user_ids, uidx = np.unique(ratings["user"].to_numpy(), return_inverse=True)
        self.item_ids, iidx = np.unique(ratings["item"].to_numpy(), return_inverse=True)
        self.n_users = int(self.user_ids.shape[0])
        self.n_items = int(self.item_ids.shape[0])
        self.like_threshold = float(like_threshold)
        perm = np.random.default_rng(seed).permutation(self.n_users)
        n_test = int(self.n_users * float(test_fraction))
        if n_test < 1 or n_test >= self.n_users:
            raise ValueError(f"test_fraction={test_fraction} leaves no new or no existing users "
                             f"among {self.n_users}")
        self.users = np.sort(perm[:n_test]).astype(np.int64)
        self.train_users = np.sort(perm[n_test:]).astype(np.int64)
        # a user's rating of an item (the last one if rated twice); 0 = unrated
        self._rating = np.zeros((self.n_users, self.n_items), dtype=np.float32)
        self._rating[uidx, iidx] = r
        self._rated = np.zeros((self.n_users, self.n_items), dtype=bool)
        self._rated[uidx, iidx] = True
        self._is_test = np.zeros(self.n_users, dtype=bool)
        self._is_test[self.users] = True

    def train_matrix(self, *, liked_only: bool = False) -> np.ndarray:
        """The existing users' (n_existing, n_items) float32 0/1 matrix: every rating is a
        positive (RecBole's implicit default), or only ratings >= like_threshold."""
        m = self._liked(self.train_users) if liked_only else self._rated[self.train_users]
        return m.astype(np.float32)

    def _liked(self, users) -> np.ndarray:
        return self._rated[users] & (self._rating[users] >= self.like_threshold)

    def liked_items(self, user) -> np.ndarray:
        """Item ids the user rated >= like_threshold."""
        return np.flatnonzero(self._liked(self._check_user(user))).astype(np.int64)

    def rating(self, user, item) -> float:
        """The user's rating of the item, NaN when unrated."""
        u = self._check_user(user)
        i = int(item)
        return float(self._rating[u, i]) if self._rated[u, i] else float("nan")

    def _check_user(self, user) -> int:
        u = int(user)
        if not 0 <= u < self.n_users:
            raise ValueError(f"unknown user {user!r}; users are 0..{self.n_users - 1}")
        return u

    def context(self, user, t: int) -> UserContext:
        return UserContext(user=self._check_user(user), t=int(t), features=None)

    def expected_reward(self, user, slate, t: int = 0) -> float:
        """The (deterministic) reward of the slate."""
        s = np.asarray(slate, dtype=np.int64)
        return float(self._liked(self._check_user(user))[s].sum())

    def step(self, user, slate, t: int, rng: Optional[np.random.Generator] = None) -> np.ndarray:
        s = np.asarray(slate, dtype=np.int64)
        return self._liked(self._check_user(user))[s].astype(np.float64)

    def optimal_slate(self, user, k: int = 1, exclude=None, t: int = 0) -> np.ndarray:
        """Liked, not yet excluded items first (lowest id first), then the other items."""
        u = self._check_user(user)
        score = self._liked(u).astype(np.float64)
        if exclude is not None and np.size(exclude):
            score[np.asarray(exclude, dtype=np.int64)] = -np.inf
        return np.argsort(-score, kind="stable")[: int(k)].astype(np.int64)


# =========================================================================== benchmark loop

@dataclass
class OnlineResult:
    """Outcome of :func:`run_online` for one policy.

    Attributes
    ----------
    name : str
    cumulative : (n_users, T) float
        Each user's cumulative reward after rounds 1..T.
    expected : (n_users, T) float or None
        Cumulative expected reward (environments with ``expected_reward``).
    optimal : (n_users, T) float or None
        Cumulative expected reward of the environment's optimal slate in each round given
        the same exclusions (environments with ``optimal_slate``).
    checkpoints : tuple of int
    """

    name: str
    cumulative: np.ndarray
    expected: Optional[np.ndarray] = None
    optimal: Optional[np.ndarray] = None
    checkpoints: tuple = DEFAULT_CHECKPOINTS
    seconds: float = 0.0

    def mean(self, t: int) -> float:
        """Mean cumulative reward per user after ``t`` rounds."""
        return float(self.cumulative[:, t - 1].mean())

    def se(self, t: int) -> float:
        """Standard error of :meth:`mean` over users."""
        n = self.cumulative.shape[0]
        return float(self.cumulative[:, t - 1].std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")

    def table(self) -> Dict[int, tuple]:
        """``{t: (mean, se)}`` at the checkpoints."""
        return {t: (self.mean(t), self.se(t)) for t in self.checkpoints if t <= self.cumulative.shape[1]}

    def difference(self, other: OnlineResult, t: int) -> tuple:
        """``(mean, se)`` of the per-user difference ``self - other`` of the cumulative reward
        after ``t`` rounds (a paired comparison: both runs must have served the same users
        in the same order, as :func:`run_benchmark` does)."""
        if other.cumulative.shape[0] != self.cumulative.shape[0]:
            raise ValueError(f"paired difference needs the same users: {self.cumulative.shape[0]} vs "
                             f"{other.cumulative.shape[0]}")
        if not 1 <= int(t) <= min(self.cumulative.shape[1], other.cumulative.shape[1]):
            raise ValueError(f"t={t} is outside the rounds of both runs")
        d = self.cumulative[:, int(t) - 1] - other.cumulative[:, int(t) - 1]
        n = d.shape[0]
        return float(d.mean()), (float(d.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan"))


def run_online(env, policy_factory: Callable[[object], OnlinePolicy], T: int = 50, *,
               users: Optional[Sequence] = None, k: Optional[int] = None, seed: int = 0,
               checkpoints: Sequence[int] = DEFAULT_CHECKPOINTS, name: str = "policy",
               track_optimal: bool = False) -> OnlineResult:
    """Serve every new user of ``env`` for ``T`` rounds with a policy; collect the rewards.

    Parameters
    ----------
    env : UserSimulator, MovieLensReplay or any object with ``users``, ``n_items``,
        ``slate_size``, ``allow_repeats``, ``context(user, t)`` and
        ``step(user, slate, t, rng)`` (optionally ``expected_reward(user, slate, t)`` and
        ``optimal_slate(user, k, exclude, t)``).
    policy_factory : callable ``env -> OnlinePolicy``
        Called once; the policy keeps its per-user state keyed by the user id.
    T : int
        Rounds per user.
    users : sequence, optional
        Users to serve (default ``env.users``).
    k : int, optional
        Slate size (default ``env.slate_size``).
    seed : int
        Seed of the environment's reward draws (user ``j`` uses ``default_rng([seed, j])``,
        so every policy sees the same randomness per user).
    checkpoints : sequence of int
        Rounds at which :meth:`OnlineResult.table` reports.
    name : str
    track_optimal : bool
        Also accumulate the expected reward of the optimal slate each round (given the same
        exclusions), for regret curves.

    Returns
    -------
    OnlineResult
    """
    import time

    T = int(T)
    if T < 1:
        raise ValueError(f"T must be >= 1, got {T}")
    k = int(env.slate_size if k is None else k)
    if k < 1 or k > env.n_items:
        raise ValueError(f"k must lie in [1, {env.n_items}], got {k}")
    us = list(env.users if users is None else users)
    if not us:
        raise ValueError("no users to serve")
    if not env.allow_repeats and T * k > env.n_items:
        raise ValueError(f"T * k = {T * k} exceeds n_items = {env.n_items} without repeats")
    has_exp = hasattr(env, "expected_reward")
    has_opt = track_optimal and hasattr(env, "optimal_slate")
    t0 = time.perf_counter()
    policy = policy_factory(env)
    rew = np.zeros((len(us), T))
    exp = np.zeros((len(us), T)) if has_exp else None
    opt = np.zeros((len(us), T)) if has_opt else None
    no_exclusion = np.zeros(0, dtype=np.int64)
    for j, user in enumerate(us):
        rng = np.random.default_rng([int(seed), j])
        served: list = []
        for t in range(T):
            exclude = no_exclusion if env.allow_repeats else np.asarray(served, dtype=np.int64)
            ctx = env.context(user, t)
            slate = _check_slate(policy.recommend(ctx, k, exclude), k, env.n_items, exclude, name)
            if has_opt:
                opt[j, t] = env.expected_reward(user, env.optimal_slate(user, k, exclude, t), t)
            if has_exp:
                exp[j, t] = env.expected_reward(user, slate, t)
            r = env.step(user, slate, t, rng)
            for item, ri in zip(slate, r):
                policy.feedback(user, int(item), float(ri))
            rew[j, t] = r.sum()
            served.extend(int(i) for i in slate)
    return OnlineResult(
        name=name,
        cumulative=np.cumsum(rew, axis=1),
        expected=None if exp is None else np.cumsum(exp, axis=1),
        optimal=None if opt is None else np.cumsum(opt, axis=1),
        checkpoints=tuple(int(c) for c in checkpoints),
        seconds=time.perf_counter() - t0,
    )


def run_benchmark(env, factories: Mapping[str, Callable], T: int = 50, **kwargs) -> Dict[str, OnlineResult]:
    """:func:`run_online` for each named policy factory (same users, same seed)."""
    out = {}
    for nm, fac in factories.items():
        out[nm] = run_online(env, fac, T, name=nm, **kwargs)
        logger.info("online benchmark: %s done in %.1f s", nm, out[nm].seconds)
    return out


def format_table(results: Mapping[str, OnlineResult], bars: Optional[Mapping[str, Mapping[int, float]]] = None) -> str:
    """A text table of mean ± standard error at each checkpoint (and the bars if given)."""
    first = next(iter(results.values()))
    ts = [t for t in first.checkpoints if t <= first.cumulative.shape[1]]
    head = f"{'policy':<36}" + "".join(f"{'t=' + str(t):>16}" for t in ts) + f"{'s':>7}"
    lines = [head]
    for nm, res in results.items():
        cells = "".join(f"{res.mean(t):>9.2f} ± {res.se(t):<4.2f}" for t in ts)
        lines.append(f"{nm:<36}{cells}{res.seconds:>7.1f}")
        if bars and nm in bars:
            ref = "".join(f"{bars[nm][t]:>16.2f}" if t in bars[nm] else f"{'':>16}" for t in ts)
            lines.append(f"{'  (bar)':<36}{ref}")
    return "\n".join(lines)


def plot_curves(results: Mapping[str, OnlineResult], path: Union[str, os.PathLike], *,
                title: str = "cumulative reward per user") -> bool:
    """Draw mean cumulative reward curves (± 1 standard error) to a PNG.

    Needs matplotlib (the ``plot`` extra); without it, logs a note and returns False.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed (pip install recmeta[plot]); skipping the plot %s", path)
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for nm, res in results.items():
        T = res.cumulative.shape[1]
        x = np.arange(1, T + 1)
        m = res.cumulative.mean(axis=0)
        se = res.cumulative.std(axis=0, ddof=1) / np.sqrt(res.cumulative.shape[0])
        ax.plot(x, m, label=nm)
        ax.fill_between(x, m - se, m + se, alpha=0.2)
    ax.set_xlabel("round t")
    ax.set_ylabel("mean cumulative reward")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
