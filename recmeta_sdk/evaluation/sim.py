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
:class:`LongSessionSimulator`
    Long-horizon sessions (:class:`LongSimConfig`) where planning pays off: drifting latent
    interests, satiation with repeated clusters / items, a latent item quality that shows
    only in the responses, and a per-user time budget that good content extends and poor
    content drains (the user leaves when it runs out; optionally returns for a later
    session). Served by :func:`run_sessions` (the loop above, until the environment says
    the user is done); its uniform-random logs (:meth:`LongSessionSimulator.log_sessions`)
    train offline models.
:class:`WorldModelSimulator`
    A learned simulator: users whose responses, state moves and session ends are drawn
    from a fitted :class:`recmeta_sdk.model.WorldModel`, served by :func:`run_sessions` like
    the others (a host can try its policies in it before serving real users).
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
    "LongSimConfig",
    "LongSessionSimulator",
    "SessionState",
    "SessionResult",
    "WorldModelSimulator",
    "run_sessions",
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


# =========================================================================== long-horizon sessions

@dataclass(frozen=True)
class LongSimConfig:
    """Configuration of :class:`LongSessionSimulator`.

    Attributes
    ----------
    n_items : int
        Catalogue size.
    dim : int
        Latent dimension of item embeddings and user interests.
    n_clusters : int
        Item clusters (topics); an item's embedding is its cluster's centre plus noise, and
        satiation accrues per cluster.
    cluster_spread : float
        Standard deviation of an item's embedding around its cluster centre.
    n_train_users, n_test_users : int
        Existing users (for logs and tuning) and new users (the population of
        :func:`run_sessions`), drawn from the same population.
    slate_size : int
        Items per step.
    position_bias : float
        Examination probability of position ``p`` (0-based) is ``(1 + p) ** -position_bias``.
    preference_scale : float
        Weight of a user's favourite cluster in their interest vector.
    user_noise : float
        Standard deviation of the user-specific part of the interest vector.
    drift : float
        Standard deviation per step of the random walk of the interest vector (0: none).
    click_offset : float
        Baseline click logit.
    appeal_scale : float
        Standard deviation of an item's appeal ("clickbait") logit, shared by all users.
    quality_scale : float
        Standard deviation of the latent item quality ``q_i`` (never observed directly).
    quality_appeal_corr : float in [-1, 1]
        Correlation of appeal and quality (negative: the most clickable items are the worst).
    satiation_weight : float
        Click-logit penalty per unit of cluster satiation.
    item_satiation_weight : float
        Click-logit penalty per unit of item satiation (repeats of the same item).
    satiation_decay : float in [0, 1)
        Per-step decay factor of satiation; each shown item adds 1 to its cluster's and its
        own satiation.
    initial_budget : float
        Time budget at the start of a session.
    step_cost : float
        Budget one step costs.
    budget_return : float
        Budget a click returns, times the clicked item's watch fraction ``σ(q_i)``.
    leave_on_miss : float in [0, 1]
        Probability that the user leaves after a slate without any click.
    max_steps : int
        Steps per session at most.
    max_sessions : int
        Sessions per user at most; after a session the user returns with probability
        ``return_scale`` times the mean watch fraction of the session's clicks (0 without
        clicks).
    return_scale : float in [0, 1]
    reward : ``"clicks"`` or ``"watch"``
        Reward per click: 1, or the clicked item's watch fraction.
    feature_noise : float
        Standard deviation of the noise on the observable item features (the embeddings).
    seed : int
        Seed of everything the simulator draws (items, users, drift).
    """

    n_items: int = 200
    dim: int = 8
    n_clusters: int = 10
    cluster_spread: float = 0.5
    n_train_users: int = 200
    n_test_users: int = 200
    slate_size: int = 3
    position_bias: float = 1.0
    preference_scale: float = 2.0
    user_noise: float = 0.5
    drift: float = 0.05
    click_offset: float = -1.0
    appeal_scale: float = 1.0
    quality_scale: float = 1.5
    quality_appeal_corr: float = -0.6
    satiation_weight: float = 0.5
    item_satiation_weight: float = 1.0
    satiation_decay: float = 0.8
    initial_budget: float = 10.0
    step_cost: float = 1.0
    budget_return: float = 2.0
    leave_on_miss: float = 0.0
    max_steps: int = 100
    max_sessions: int = 1
    return_scale: float = 0.8
    reward: str = "clicks"
    feature_noise: float = 0.0
    seed: int = 0

    def validate(self) -> LongSimConfig:
        for name in ("n_items", "dim", "n_clusters", "n_train_users", "n_test_users", "slate_size",
                     "max_steps", "max_sessions"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"LongSimConfig.{name} must be a positive integer, got {v!r}")
        if self.slate_size > self.n_items:
            raise ValueError(f"LongSimConfig.slate_size={self.slate_size} exceeds n_items={self.n_items}")
        if self.n_clusters > self.n_items:
            raise ValueError(f"LongSimConfig.n_clusters={self.n_clusters} exceeds n_items={self.n_items}")
        for name in ("cluster_spread", "position_bias", "preference_scale", "user_noise", "drift",
                     "appeal_scale", "quality_scale", "satiation_weight", "item_satiation_weight",
                     "budget_return", "feature_noise"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) \
                    or not np.isfinite(v) or v < 0:
                raise ValueError(f"LongSimConfig.{name} must be finite and >= 0, got {v!r}")
        for name in ("click_offset",):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not np.isfinite(v):
                raise ValueError(f"LongSimConfig.{name} must be finite, got {v!r}")
        for name, lo, hi in (("quality_appeal_corr", -1.0, 1.0), ("leave_on_miss", 0.0, 1.0),
                             ("return_scale", 0.0, 1.0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) \
                    or not lo <= v <= hi:
                raise ValueError(f"LongSimConfig.{name} must lie in [{lo}, {hi}], got {v!r}")
        v = self.satiation_decay
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not 0.0 <= v < 1.0:
            raise ValueError(f"LongSimConfig.satiation_decay must lie in [0, 1), got {v!r}")
        for name in ("initial_budget", "step_cost"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) \
                    or not np.isfinite(v) or v <= 0:
                raise ValueError(f"LongSimConfig.{name} must be finite and > 0, got {v!r}")
        if self.reward not in ("clicks", "watch"):
            raise ValueError(f"LongSimConfig.reward must be 'clicks' or 'watch', got {self.reward!r}")
        return self


@dataclass
class SessionState:
    """The true state of one user in :class:`LongSessionSimulator` (read by the oracles).

    Attributes
    ----------
    t : int
        Steps served so far over all sessions (the next step's ``t``).
    session : int
        The current session, 0-based.
    step_in_session : int
        Steps served in the current session.
    budget : float
        Remaining time budget of the current session.
    interest : (dim,) float
        The current interest vector ``θ_u(t)``.
    cluster_satiation : (n_clusters,) float
    item_satiation : (n_items,) float
    done : bool
        The user has left for good.
    session_watch : list of float
        Watch fractions of the current session's clicks.
    """

    t: int
    session: int
    step_in_session: int
    budget: float
    interest: np.ndarray
    cluster_satiation: np.ndarray
    item_satiation: np.ndarray
    done: bool = False
    session_watch: list = None


class LongSessionSimulator:
    """Long-horizon sessions with satiation, latent item quality and a time budget.

    Items belong to ``n_clusters`` clusters: item ``i`` of cluster ``c_i`` has the
    embedding ``v_i = z_{c_i} + cluster_spread · ε`` (``z_c`` unit-norm cluster centres),
    an appeal logit ``a_i`` and a latent quality ``q_i``, jointly normal with correlation
    ``quality_appeal_corr``. User ``u`` has a favourite cluster ``f_u`` and interests
    ``θ_u(0) = preference_scale · z_{f_u} + user_noise · ε`` that drift,
    ``θ_u(t+1) = θ_u(t) + drift · ε_t`` (from the user's own seeded stream, so the
    trajectory is the same whatever the policy). In step ``t`` the user clicks item ``i``
    shown at position ``p`` with probability ``exam(p) · σ(click_offset + θ_u(t)·v_i + a_i
    − satiation_weight · S_c(c_i) − item_satiation_weight · S_i(i))``, independently per
    position, ``exam(p) = (1 + p) ** -position_bias``. After the step every satiation
    decays by ``satiation_decay`` and each shown item adds 1 to its own and its cluster's.

    A click watches the fraction ``w_i = σ(q_i)`` of the item and returns
    ``budget_return · w_i`` of the time budget; every step costs ``step_cost``. The
    session ends when the budget is spent (``budget <= 0``), after ``max_steps`` steps, or
    (with probability ``leave_on_miss``) after a slate without clicks. The user then
    returns for another session (up to ``max_sessions``, budget reset, satiation decayed
    as over 10 steps) with probability ``return_scale · mean(w of the session's clicks)``.
    The reward per click is 1 (``reward="clicks"``) or ``w_i`` (``"watch"``).

    So a myopic policy that shows the most clickable items burns the budget on poor items
    and loses the user early; a policy that plans for the budget trades a little click
    rate now for quality that extends the session. The expected immediate reward of any
    slate is exact (:meth:`expected_reward`), as is the myopic optimum
    (:meth:`optimal_slate`) and the expected budget change (:meth:`expected_budget_change`).

    The environment keeps each user's state: :meth:`reset` starts a user afresh,
    :meth:`step` draws the responses and moves the state, :meth:`done` says whether the
    user has left. :func:`run_sessions` drives it. Observable item features
    (:attr:`item_features`, the embeddings, optionally noisy) hold neither the appeal nor
    the quality; they show only in responses.

    Parameters
    ----------
    config : LongSimConfig, optional
    **overrides
        Fields of :class:`LongSimConfig` to override.

    Attributes
    ----------
    item_cluster : (n_items,) int64
    item_latent : (n_items, dim) float
    item_appeal : (n_items,) float
    item_quality : (n_items,) float
    watch : (n_items,) float
        ``σ(item_quality)``.
    item_features : (n_items, dim) float
        What a policy may observe.
    train_users, test_users : int64 arrays
        ``users`` is ``test_users``.
    """

    allow_repeats = True

    def __init__(self, config: LongSimConfig | None = None, **overrides):
        cfg = config if config is not None else LongSimConfig()
        if not isinstance(cfg, LongSimConfig):
            raise TypeError(f"config must be a LongSimConfig, got {type(cfg).__name__}")
        if overrides:
            bad = set(overrides) - set(LongSimConfig.__dataclass_fields__)
            if bad:
                raise ValueError(f"unknown LongSimConfig field(s): {sorted(bad)}")
            cfg = LongSimConfig(**{**cfg.__dict__, **overrides})
        self.config = c = cfg.validate()
        rng = np.random.default_rng([c.seed, 10])
        self.n_items = int(c.n_items)
        self.slate_size = int(c.slate_size)
        self.max_steps = int(c.max_steps)
        self.max_sessions = int(c.max_sessions)
        centres = rng.standard_normal((c.n_clusters, c.dim))
        self.cluster_centres = centres / np.linalg.norm(centres, axis=1, keepdims=True)
        # every cluster gets items: a permutation of a balanced assignment
        self.item_cluster = rng.permutation(np.arange(c.n_items) % c.n_clusters).astype(np.int64)
        self.item_latent = self.cluster_centres[self.item_cluster] \
            + rng.standard_normal((c.n_items, c.dim)) * (c.cluster_spread / np.sqrt(c.dim))
        z1, z2 = rng.standard_normal((2, c.n_items))
        rho = float(c.quality_appeal_corr)
        self.item_appeal = c.appeal_scale * z1
        self.item_quality = c.quality_scale * (rho * z1 + np.sqrt(max(1.0 - rho * rho, 0.0)) * z2)
        self.watch = _sigmoid(self.item_quality)
        self.item_features = self.item_latent + rng.normal(0.0, c.feature_noise, self.item_latent.shape) \
            if c.feature_noise > 0 else self.item_latent.copy()
        n_users = c.n_train_users + c.n_test_users
        self.user_favourite = rng.integers(0, c.n_clusters, n_users).astype(np.int64)
        self.user_interest0 = c.preference_scale * self.cluster_centres[self.user_favourite] \
            + rng.standard_normal((n_users, c.dim)) * (c.user_noise / np.sqrt(c.dim))
        self.train_users = np.arange(c.n_train_users, dtype=np.int64)
        self.test_users = np.arange(c.n_train_users, n_users, dtype=np.int64)
        self.examination = (1.0 + np.arange(c.slate_size)) ** (-float(c.position_bias))
        self.reward_per_click = self.watch.copy() if c.reward == "watch" else np.ones(c.n_items)
        self.budget_per_click = c.budget_return * self.watch
        self._states: dict[int, SessionState] = {}
        self._drift: dict[int, np.ndarray] = {}

    # ------------------------------------------------------------------ truth
    @property
    def users(self) -> np.ndarray:
        """The new (test) users served by :func:`run_sessions`."""
        return self.test_users

    @property
    def n_users(self) -> int:
        return int(self.user_interest0.shape[0])

    def _check_user(self, user) -> int:
        if isinstance(user, bool) or not isinstance(user, (int, np.integer)):
            raise TypeError(f"user must be an integer id, got {user!r}")
        u = int(user)
        if not 0 <= u < self.n_users:
            raise ValueError(f"unknown user {user!r}; users are 0..{self.n_users - 1}")
        return u

    def _drift_step(self, u: int, t: int) -> np.ndarray:
        """The drift increment after step ``t``: a pure function of (seed, user, t), drawn once
        for every step the user can have, so the trajectory is the same whatever the policy."""
        c = self.config
        d = self._drift.get(u)
        if d is None:
            n = c.max_steps * c.max_sessions
            d = np.random.default_rng([c.seed, 11, u]).standard_normal((n, c.dim)) * (c.drift / np.sqrt(c.dim))
            self._drift[u] = d
        return d[t]

    def reset(self, user) -> SessionState:
        """Start ``user`` afresh (first session, full budget, no satiation); returns the state."""
        u = self._check_user(user)
        c = self.config
        st = SessionState(t=0, session=0, step_in_session=0, budget=float(c.initial_budget),
                          interest=self.user_interest0[u].copy(), cluster_satiation=np.zeros(c.n_clusters),
                          item_satiation=np.zeros(c.n_items), done=False, session_watch=[])
        self._states[u] = st
        return st

    def state(self, user) -> SessionState:
        """The user's current true state (reset first if never served)."""
        u = self._check_user(user)
        st = self._states.get(u)
        return self.reset(u) if st is None else st

    def done(self, user) -> bool:
        """Whether the user has left for good."""
        return bool(self.state(user).done)

    def _check_t(self, st: SessionState, t: int) -> None:
        if int(t) != st.t:
            raise ValueError(f"step t={t} does not match the user's state (next step is t={st.t})")

    def click_logits(self, user, state: SessionState | None = None) -> np.ndarray:
        """First-position click logit of every item in the user's current state, (n_items,)."""
        st = self.state(user) if state is None else state
        c = self.config
        return (c.click_offset + self.item_latent @ st.interest + self.item_appeal
                - c.satiation_weight * st.cluster_satiation[self.item_cluster]
                - c.item_satiation_weight * st.item_satiation)

    def attractiveness(self, user, t: int | None = None) -> np.ndarray:
        """Click probability of every item at the first position now, (n_items,)."""
        st = self.state(user)
        if t is not None:
            self._check_t(st, t)
        return _sigmoid(self.click_logits(user, st))

    def _slate(self, slate) -> np.ndarray:
        s = np.asarray(slate)
        if s.ndim != 1 or not 1 <= s.shape[0] <= self.slate_size:
            raise ValueError(f"slate must be 1-D with 1..{self.slate_size} items, got shape {s.shape}")
        if s.size and not np.issubdtype(s.dtype, np.integer):
            raise TypeError(f"slate item ids must be integers, got dtype {s.dtype}")
        s = s.astype(np.int64)
        if s.min() < 0 or s.max() >= self.n_items:
            raise ValueError(f"slate has item id(s) outside [0, {self.n_items}): {s}")
        return s

    def expected_reward(self, user, slate, t: int | None = None) -> float:
        """Exact expected reward of ``slate`` (item ids by position) in the user's current state."""
        s = self._slate(slate)
        p = self.examination[: s.shape[0]] * self.attractiveness(user, t)[s]
        return float((p * self.reward_per_click[s]).sum())

    def expected_budget_change(self, user, slate, t: int | None = None) -> float:
        """Exact expected change of the budget over one step with ``slate`` (negative: drains)."""
        s = self._slate(slate)
        p = self.examination[: s.shape[0]] * self.attractiveness(user, t)[s]
        return float((p * self.budget_per_click[s]).sum() - self.config.step_cost)

    def optimal_slate(self, user, k: int | None = None, exclude=None, t: int | None = None) -> np.ndarray:
        """The slate with the highest expected *immediate* reward (the myopic optimum): the
        ``k`` items of highest ``σ(logit) · reward_per_click``, best on the first position."""
        k = self.slate_size if k is None else int(k)
        a = self.attractiveness(user, t) * self.reward_per_click
        if exclude is not None and np.size(exclude):
            a[np.asarray(exclude, dtype=np.int64)] = -np.inf
        return np.argsort(-a, kind="stable")[:k].astype(np.int64)

    # ------------------------------------------------------------------ environment
    def context(self, user, t: int) -> UserContext:
        """The user's context: no user features (a new user is unknown)."""
        u = self._check_user(user)
        return UserContext(user=u, t=int(t), features=None)

    def step(self, user, slate, t: int, rng: np.random.Generator) -> np.ndarray:
        """Draw the responses to ``slate`` in step ``t`` and move the user's state.

        Draws exactly ``k + 2`` uniforms from ``rng`` per step (clicks, leaving, returning),
        so two policies served with the same per-user stream see the same randomness step by
        step.

        Returns
        -------
        (len(slate),) float
            Reward per position (0 without a click).
        """
        u = self._check_user(user)
        st = self.state(u)
        if st.done:
            raise ValueError(f"user {u} has left (done); reset() the user to serve them again")
        self._check_t(st, t)
        s = self._slate(slate)
        if np.unique(s).shape[0] != s.shape[0]:
            raise ValueError(f"slate has duplicate item ids: {s}")
        c = self.config
        p = self.examination[: s.shape[0]] * _sigmoid(self.click_logits(u, st))[s]
        draws = rng.random(s.shape[0] + 2)
        clicks = draws[: s.shape[0]] < p
        reward = np.where(clicks, self.reward_per_click[s], 0.0)
        st.budget += float(self.budget_per_click[s][clicks].sum()) - c.step_cost
        st.session_watch.extend(float(w) for w in self.watch[s][clicks])
        # satiation and drift move the state on
        st.cluster_satiation *= c.satiation_decay
        st.item_satiation *= c.satiation_decay
        np.add.at(st.cluster_satiation, self.item_cluster[s], 1.0)
        st.item_satiation[s] += 1.0
        if c.drift > 0:
            st.interest = st.interest + self._drift_step(u, st.t)
        st.t += 1
        st.step_in_session += 1
        ends = st.budget <= 0 or st.step_in_session >= c.max_steps \
            or (not clicks.any() and draws[-2] < c.leave_on_miss)
        if ends:
            w = st.session_watch
            p_return = c.return_scale * (float(np.mean(w)) if w else 0.0)
            if st.session + 1 < c.max_sessions and draws[-1] < p_return:
                gap = c.satiation_decay ** 10
                st.session += 1
                st.step_in_session = 0
                st.budget = float(c.initial_budget)
                st.cluster_satiation *= gap
                st.item_satiation *= gap
                st.session_watch = []
            else:
                st.done = True
        return reward.astype(np.float64)

    def items_frame(self):
        """The observable item features as ``recmeta_sdk.train``'s ``items`` argument: a
        DataFrame indexed by item id with one dense column ``features`` ((dim,) float32)."""
        import pandas as pd

        return pd.DataFrame({"features": list(self.item_features.astype(np.float32))},
                            index=pd.Index(np.arange(self.n_items), name="item"))

    def log_sessions(self, users: Sequence[int] | None = None, *, seed: int = 0,
                     with_features: bool = False):
        """Logged feedback of a uniform-random slate policy, one full run per user.

        Each user is reset and served uniformly random slates (``k`` distinct items, each
        ordering equally likely) until they leave, as :func:`run_sessions` would serve them;
        the log is what ``recmeta_sdk.train`` reads, with :meth:`items_frame` as ``items``.
        The logged users' states are dropped afterwards (a later run resets them).

        Parameters
        ----------
        users : sequence of int, optional
            Default: the existing users (:attr:`train_users`).
        seed : int
            Seed of the logging policy and of the responses.
        with_features : bool
            Also add the shown item's features as a column ``features`` ((dim,) float32 per
            row).

        Returns
        -------
        DataFrame
            One row per shown item: ``user``, ``item``, ``reward``, ``position`` (0-based),
            ``propensity`` (the logging policy's probability of that item at that position,
            ``1 / n_items``), ``timestamp`` (the user's step ``t``), ``session`` (the user's
            session, 0-based) [, ``features``].
        """
        import pandas as pd

        us = self.train_users if users is None else np.asarray(users)
        if us.ndim != 1 or us.shape[0] == 0:
            raise ValueError(f"users must be a non-empty 1-D sequence, got shape {us.shape}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise TypeError(f"seed must be an int, got {seed!r}")
        policy_rng = np.random.default_rng([self.config.seed, 12, int(seed)])
        cols = {k: [] for k in ("user", "item", "reward", "position", "propensity", "timestamp", "session")}
        k = self.slate_size
        for j, user in enumerate(us):
            u = self._check_user(user)
            self.reset(u)
            rng = np.random.default_rng([self.config.seed, 13, int(seed), j])
            st = self.state(u)
            while not st.done:
                slate = policy_rng.choice(self.n_items, size=k, replace=False)
                t, sess = st.t, st.session
                r = self.step(u, slate, t, rng)
                cols["user"].extend([u] * k)
                cols["item"].extend(int(i) for i in slate)
                cols["reward"].extend(float(x) for x in r)
                cols["position"].extend(range(k))
                cols["propensity"].extend([1.0 / self.n_items] * k)
                cols["timestamp"].extend([t] * k)
                cols["session"].extend([sess] * k)
            del self._states[u]
        df = pd.DataFrame(cols)
        df = df.astype({"user": np.int64, "item": np.int64, "position": np.int64, "timestamp": np.int64,
                        "session": np.int64})
        if with_features:
            df["features"] = list(self.item_features.astype(np.float32)[df["item"].to_numpy()])
        return df


@dataclass
class SessionResult:
    """Outcome of :func:`run_sessions` for one policy.

    Attributes
    ----------
    name : str
    users : (n_users,) the users served, in order
    reward : (n_users,) float
        Each user's total reward until they left (the return).
    expected : (n_users,) float or None
        Each user's summed expected immediate reward of the slates served.
    steps : (n_users,) int
        Steps served until the user left.
    sessions : (n_users,) int
        Sessions the user had.
    clicks : (n_users,) int
    seconds : float
    """

    name: str
    users: np.ndarray
    reward: np.ndarray
    expected: np.ndarray | None
    steps: np.ndarray
    sessions: np.ndarray
    clicks: np.ndarray
    seconds: float = 0.0

    def mean(self, what: str = "reward") -> float:
        """Mean per user of ``reward`` (default), ``steps``, ``sessions``, ``clicks`` or ``expected``."""
        return float(np.mean(getattr(self, what)))

    def se(self, what: str = "reward") -> float:
        """Standard error of :meth:`mean` over users."""
        v = np.asarray(getattr(self, what), dtype=np.float64)
        return float(v.std(ddof=1) / np.sqrt(v.shape[0])) if v.shape[0] > 1 else float("nan")

    def difference(self, other: SessionResult, what: str = "reward") -> tuple:
        """``(mean, se)`` of the per-user difference ``self - other`` (paired: the same users
        in the same order and seed, as :func:`run_sessions` serves them)."""
        if other.users.shape != self.users.shape or not np.array_equal(other.users, self.users):
            raise ValueError("paired difference needs the same users in the same order")
        d = np.asarray(getattr(self, what), dtype=np.float64) - np.asarray(getattr(other, what), dtype=np.float64)
        n = d.shape[0]
        return float(d.mean()), (float(d.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan"))


def run_sessions(env, policy_factory: Callable[[object], OnlinePolicy], *, users: Sequence | None = None,
                 k: int | None = None, seed: int = 0, name: str = "policy",
                 max_total_steps: int | None = None) -> SessionResult:
    """Serve every new user of ``env`` until they leave; collect each user's return.

    The loop of :func:`run_online` with sessions that end: each user is ``env.reset`` and
    served while ``not env.done(user)``::

        ctx = env.context(user, t)                  # t counts the user's steps over sessions
        slate = policy.recommend(ctx, k, exclude)   # exclude: the served items if the env
                                                    # forbids repeats, else empty
        rewards = env.step(user, slate, t, rng)     # moves the user's state
        policy.feedback(user, item, reward)         # for every item of the slate

    Parameters
    ----------
    env : LongSessionSimulator or any object with ``users``, ``n_items``, ``slate_size``,
        ``allow_repeats``, ``reset(user)``, ``done(user)``, ``context(user, t)`` and
        ``step(user, slate, t, rng)`` (optionally ``expected_reward(user, slate, t)``).
    policy_factory : callable ``env -> OnlinePolicy``
        Called once; the policy keeps its per-user state keyed by the user id.
    users : sequence, optional
        Users to serve (default ``env.users``).
    k : int, optional
        Slate size (default ``env.slate_size``).
    seed : int
        Seed of the responses (user ``j`` uses ``default_rng([seed, j])``, so every policy
        sees the same randomness per user and step).
    name : str
    max_total_steps : int, optional
        Safety cap on one user's steps (default ``env.max_steps * env.max_sessions`` when
        the env has them); a user still served past it raises RuntimeError.

    Returns
    -------
    SessionResult
    """
    import time

    for attr in ("reset", "done", "context", "step"):
        if not callable(getattr(env, attr, None)):
            raise TypeError(f"env has no {attr}() method: {type(env).__name__} (run_online serves "
                            "environments without sessions)")
    k = int(env.slate_size if k is None else k)
    if k < 1 or k > env.n_items:
        raise ValueError(f"k must lie in [1, {env.n_items}], got {k}")
    us = list(env.users if users is None else users)
    if not us:
        raise ValueError("no users to serve")
    if max_total_steps is None:
        cap = int(getattr(env, "max_steps", 10_000)) * int(getattr(env, "max_sessions", 1))
    else:
        cap = int(max_total_steps)
        if cap < 1:
            raise ValueError(f"max_total_steps must be >= 1, got {max_total_steps}")
    has_exp = hasattr(env, "expected_reward")
    t0 = time.perf_counter()
    policy = policy_factory(env)
    n = len(us)
    rew, exp = np.zeros(n), (np.zeros(n) if has_exp else None)
    steps, sessions, clicks = np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(n, np.int64)
    no_exclusion = np.zeros(0, dtype=np.int64)
    for j, user in enumerate(us):
        rng = np.random.default_rng([int(seed), j])
        env.reset(user)
        served: list = []
        t = 0
        while not env.done(user):
            if t >= cap:
                raise RuntimeError(f"user {user!r} was still served after max_total_steps={cap} steps")
            exclude = no_exclusion if env.allow_repeats else np.asarray(served, dtype=np.int64)
            ctx = env.context(user, t)
            slate = _check_slate(policy.recommend(ctx, k, exclude), k, env.n_items, exclude, name)
            if has_exp:
                exp[j] += env.expected_reward(user, slate, t)
            r = env.step(user, slate, t, rng)
            for item, ri in zip(slate, r):
                policy.feedback(user, int(item), float(ri))
            rew[j] += float(r.sum())
            clicks[j] += int((r > 0).sum())
            if not env.allow_repeats:
                served.extend(int(i) for i in slate)
            t += 1
        steps[j] = t
        st = getattr(env, "state", None)
        sessions[j] = (st(user).session + 1) if callable(st) else 1
    return SessionResult(name=name, users=np.asarray(us), reward=rew, expected=exp, steps=steps,
                         sessions=sessions, clicks=clicks, seconds=time.perf_counter() - t0)


class WorldModelSimulator:
    """A learned simulator: a fitted world model as an environment for :func:`run_sessions`.

    Each user starts from the world model's prior state (or from a history rolled in with
    ``world.adapt``); in every step the responses to the slate are drawn from
    ``world.predict``, the state moves with ``world.step``, and the session ends with
    probability ``world.end_probability`` (when the model has a session head) or after
    ``max_steps`` steps. The reward of a position is its 0/1 response. Randomness comes only
    from the ``rng`` that :func:`run_sessions` passes (``k + 1`` uniforms per step), so two
    policies served with the same seed meet the same draws.

    Environment items are ``0..n_items-1``: index ``j`` is the world model's item
    ``item_ids[j]`` (default ``world.item_map.ids``), and ``item_ids`` maps them back.

    Parameters
    ----------
    world : recmeta_sdk.model.WorldModel
    n_users : int
        Users ``0..n_users-1`` (ignored when ``histories`` is given).
    histories : sequence of (items, rewards) pairs, optional
        One per user: the user's observed history, rolled in with ``world.adapt``.
    slate_size : int
        Items per step (at most the model's trained positions).
    max_steps : int
        Steps per user at most.
    item_ids : sequence, optional
        The world model's external ids of the environment items (default: its catalogue).
    """

    allow_repeats = True

    def __init__(self, world, *, n_users: int = 100, histories: Sequence | None = None, slate_size: int = 3,
                 max_steps: int = 100, item_ids: Sequence | None = None):
        for attr in ("initial_state", "adapt", "predict", "step", "item_map", "n_positions"):
            if not hasattr(world, attr):
                raise TypeError(f"world must be a recmeta_sdk.model.WorldModel (no {attr!r} on {type(world).__name__})")
        for name, v in (("n_users", n_users), ("slate_size", slate_size), ("max_steps", max_steps)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        self.world = world
        self.item_ids = np.asarray(world.item_map.ids if item_ids is None else item_ids)
        if self.item_ids.ndim != 1 or self.item_ids.shape[0] < 1:
            raise ValueError(f"item_ids must be a non-empty 1-D sequence, got shape {self.item_ids.shape}")
        bad = world.item_map.to_index(self.item_ids) < 0
        if bad.any():
            raise ValueError(f"item_ids holds items the world model does not know: {self.item_ids[bad][:5].tolist()}")
        self.n_items = int(self.item_ids.shape[0])
        if slate_size > min(self.n_items, world.n_positions):
            raise ValueError(f"slate_size={slate_size} exceeds the catalogue ({self.n_items}) or the model's "
                             f"trained positions ({world.n_positions})")
        self.slate_size = int(slate_size)
        self.max_steps = int(max_steps)
        self.max_sessions = 1
        if histories is not None:
            hs = list(histories)
            if not hs:
                raise ValueError("histories is empty")
            self._start = [np.asarray(world.adapt(it, rw), np.float32) for it, rw in hs]
        else:
            self._start = list(world.initial_state(int(n_users)))
        self._h: dict = {}
        self._t: dict = {}
        self._done: dict = {}

    @property
    def users(self) -> np.ndarray:
        return np.arange(len(self._start))

    def _check_user(self, user) -> int:
        if isinstance(user, bool) or not isinstance(user, (int, np.integer)) or not 0 <= user < len(self._start):
            raise ValueError(f"user must be an integer in [0, {len(self._start)}), got {user!r}")
        return int(user)

    def reset(self, user) -> np.ndarray:
        """Start ``user`` afresh from their initial state; returns the (hidden,) state."""
        u = self._check_user(user)
        self._h[u] = np.array(self._start[u], np.float32)
        self._t[u] = 0
        self._done[u] = False
        return self._h[u].copy()

    def done(self, user) -> bool:
        """Whether the user's session has ended."""
        u = self._check_user(user)
        if u not in self._h:
            self.reset(u)
        return bool(self._done[u])

    def context(self, user, t: int) -> UserContext:
        """The user's context (no features)."""
        return UserContext(user=self._check_user(user), t=int(t), features=None)

    def _slate(self, slate) -> np.ndarray:
        s = np.asarray(slate)
        if s.ndim != 1 or not 1 <= s.shape[0] <= self.slate_size or not np.issubdtype(s.dtype, np.integer):
            raise ValueError(f"slate must be 1-D integers with 1..{self.slate_size} items, got {s!r}")
        if s.min() < 0 or s.max() >= self.n_items:
            raise ValueError(f"slate has item id(s) outside [0, {self.n_items}): {s}")
        return s.astype(np.int64)

    def expected_reward(self, user, slate, t: int | None = None) -> float:
        """The model's expected clicks of ``slate`` in the user's current state."""
        u = self._check_user(user)
        if u not in self._h:
            self.reset(u)
        s = self._slate(slate)
        return float(self.world.predict(self._h[u], self.item_ids[s]).sum())

    def step(self, user, slate, t: int, rng: np.random.Generator) -> np.ndarray:
        """Draw the responses to ``slate`` from the model, move the state, maybe end the session."""
        u = self._check_user(user)
        if u not in self._h:
            self.reset(u)
        if self._done[u]:
            raise ValueError(f"user {u} is done; reset() the user to serve them again")
        if int(t) != self._t[u]:
            raise ValueError(f"step t={t} does not match the user's state (next step is t={self._t[u]})")
        s = self._slate(slate)
        if np.unique(s).shape[0] != s.shape[0]:
            raise ValueError(f"slate has duplicate item ids: {s}")
        ids = self.item_ids[s]
        h = self._h[u]
        p = self.world.predict(h, ids)
        draws = rng.random(s.shape[0] + 1)
        r = (draws[:-1] < p).astype(np.float32)
        ends = False
        if getattr(self.world, "has_sessions", False):
            ends = bool(draws[-1] < float(self.world.end_probability(h, ids, r)))
        self._h[u] = np.asarray(self.world.step(h, ids, r), np.float32)
        self._t[u] += 1
        self._done[u] = ends or self._t[u] >= self.max_steps
        return r.astype(np.float64)
