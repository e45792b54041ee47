"""Off-policy evaluation: estimate a target policy's value from logged bandit feedback.

Five estimators with fixed names, each returning an :class:`Estimate` (the value and a
percentile bootstrap confidence interval):

========  ==========================================================================
``ips``   inverse propensity scoring, mean of ``w * r``
``snips`` self-normalised IPS, ``sum(w * r) / sum(w)``
``dm``    direct method, mean of ``v_hat``
``dr``    doubly robust, mean of ``v_hat + w * (r - q_hat)``
``sndr``  self-normalised doubly robust, ``mean(v_hat) + sum(w * (r - q_hat)) / sum(w)``
========  ==========================================================================

with the importance weight ``w = action_prob / propensities``.

Signature (one per logged round ``i``, all 1-D of length ``n``):

* ``rewards[i]``: the observed reward of the logged action.
* ``propensities[i]``: the logging policy's probability of the logged action (at the
  logged position for slates), in ``(0, 1]``.
* ``action_prob[i]``: the target policy's probability of the same action (at the same
  position), in ``[0, 1]``.
* ``q_hat[i]``: a reward model's prediction for the logged action, ``q̂(x_i, a_i)``.
* ``v_hat[i]``: the reward model's value of the target policy in that round,
  ``E_{a~π(·|x_i)}[q̂(x_i, a)]``. :func:`expected_reward` and :func:`logged_reward`
  compute both from a full ``(n, n_actions[, n_positions])`` reward-model table and the
  target policy's full action distribution.

Slates: pass ``positions`` (integer position of each logged row; ``action_prob``,
``propensities`` and the reward model are then per position, as in the Open Bandit
Pipeline's position-wise "independent" estimators). The value is then the value per
impression (the mean over all rows, i.e. the per-position estimates averaged with weights
equal to each position's share of the rows; the self-normalised estimators normalise over
all rows, as the Open Bandit Pipeline does), and :attr:`Estimate.by_position` holds the
estimate of each position on its own rows.

Validation follows the Open Bandit Pipeline: propensities must lie in ``(0, 1]``,
probabilities in ``[0, 1]``, no NaN or infinity anywhere, equal lengths; a violation raises
``ValueError`` naming the field and the first bad row.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

logger = logging.getLogger("recmeta")

__all__ = [
    "Estimate",
    "ips",
    "snips",
    "dm",
    "dr",
    "sndr",
    "expected_reward",
    "logged_reward",
    "world_model_q",
    "ClickRateModel",
    "bernoulli_ts_action_dist",
]

_DEFAULT_N_BOOTSTRAP = 1000
_BOOTSTRAP_CHUNK_ELEMS = 4_000_000  # resampled indices held at once (32 MB of int64)


@dataclass(frozen=True)
class Estimate:
    """An off-policy estimate of a policy's value.

    Attributes
    ----------
    value : float
        The point estimate on the full log.
    ci_low, ci_high : float
        The ``alpha / 2`` and ``1 - alpha / 2`` percentiles of the bootstrap distribution.
    n : int
        Number of logged rows used.
    by_position : dict[int, Estimate]
        For slates (``positions`` given): the estimate of each position on its own rows.
        Empty otherwise.
    """

    value: float
    ci_low: float
    ci_high: float
    n: int
    by_position: dict = field(default_factory=dict)

    def __repr__(self) -> str:  # compact, the by_position table is long
        return (f"Estimate(value={self.value:.6g}, ci=({self.ci_low:.6g}, "
                f"{self.ci_high:.6g}), n={self.n})")


# --------------------------------------------------------------------------- validation

def _first_bad(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def _as_1d(name: str, x, n: Optional[int]) -> np.ndarray:
    if x is None:
        raise ValueError(f"{name} is required")
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be a numeric array, got {type(x).__name__}") from exc
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if n is not None and arr.shape[0] != n:
        raise ValueError(f"{name} has length {arr.shape[0]}, expected {n} (the length of rewards)")
    bad = ~np.isfinite(arr)
    if bad.any():
        i = _first_bad(bad)
        raise ValueError(f"{name} must be finite; row {i} is {arr[i]}")
    return arr


def _check_inputs(rewards, propensities=None, action_prob=None, q_hat=None, v_hat=None,
                  positions=None, *, need=()):
    r = _as_1d("rewards", rewards, None)
    n = r.shape[0]
    if n == 0:
        raise ValueError("rewards is empty: at least one logged round is needed")
    out = {"rewards": r}
    if "propensities" in need:
        p = _as_1d("propensities", propensities, n)
        bad = (p <= 0.0) | (p > 1.0)
        if bad.any():
            i = _first_bad(bad)
            raise ValueError(f"propensities must lie in (0, 1]; row {i} is {p[i]}")
        out["propensities"] = p
    if "action_prob" in need:
        a = _as_1d("action_prob", action_prob, n)
        bad = (a < 0.0) | (a > 1.0)
        if bad.any():
            i = _first_bad(bad)
            raise ValueError(f"action_prob must lie in [0, 1]; row {i} is {a[i]}")
        out["action_prob"] = a
    if "q_hat" in need:
        out["q_hat"] = _as_1d("q_hat", q_hat, n)
    if "v_hat" in need:
        out["v_hat"] = _as_1d("v_hat", v_hat, n)
    if positions is not None:
        pos = np.asarray(positions)
        if pos.ndim != 1 or pos.shape[0] != n:
            raise ValueError(f"positions must be 1-D of length {n}, got shape {pos.shape}")
        if not np.issubdtype(pos.dtype, np.integer):
            posf = np.asarray(pos, dtype=np.float64)
            bad = ~np.isfinite(posf) | (posf != np.round(posf))
            if bad.any():
                i = _first_bad(bad)
                raise ValueError(f"positions must be integers; row {i} is {pos[i]}")
            pos = posf.astype(np.int64)
        bad = pos < 0
        if bad.any():
            i = _first_bad(bad)
            raise ValueError(f"positions must be >= 0; row {i} is {pos[i]}")
        out["positions"] = pos.astype(np.int64)
    return out


def _check_bootstrap(n_bootstrap, alpha):
    if isinstance(n_bootstrap, bool) or not isinstance(n_bootstrap, (int, np.integer)) or n_bootstrap < 1:
        raise ValueError(f"n_bootstrap must be a positive integer, got {n_bootstrap!r}")
    if not (0.0 < float(alpha) < 1.0):
        raise ValueError(f"alpha must lie in (0, 1), got {alpha!r}")


# --------------------------------------------------------------------------- core

def _stat(a: np.ndarray, b: Optional[np.ndarray], c: Optional[np.ndarray], idx=None) -> np.ndarray:
    """mean(a) + sum(b) / sum(c) over rows ``idx`` (a (B, n) matrix) or all rows."""
    if idx is None:
        v = a.mean()
        if b is not None:
            v = v + b.sum() / c.sum() if c.sum() > 0 else v
        return np.asarray(v, dtype=np.float64)
    v = a[idx].mean(axis=1)
    if b is not None:
        sc = c[idx].sum(axis=1)
        sb = b[idx].sum(axis=1)
        v = v + np.divide(sb, sc, out=np.zeros_like(sb), where=sc > 0)
    return v


def _estimate(a, b, c, n_bootstrap, alpha, random_state, positions=None, _top=True) -> Estimate:
    n = a.shape[0]
    value = float(_stat(a, b, c))
    rng = np.random.default_rng(random_state)
    chunk = max(1, _BOOTSTRAP_CHUNK_ELEMS // n)
    boots = np.empty(n_bootstrap, dtype=np.float64)
    for s in range(0, n_bootstrap, chunk):
        m = min(chunk, n_bootstrap - s)
        idx = rng.integers(0, n, size=(m, n))
        boots[s:s + m] = _stat(a, b, c, idx)
    lo, hi = np.quantile(boots, [alpha / 2.0, 1.0 - alpha / 2.0])
    by_pos = {}
    if positions is not None and _top:
        for p in np.unique(positions):
            m = positions == p
            by_pos[int(p)] = _estimate(a[m], None if b is None else b[m], None if c is None else c[m],
                                       n_bootstrap, alpha, rng, None, _top=False)
    return Estimate(value=value, ci_low=float(lo), ci_high=float(hi), n=int(n), by_position=by_pos)


# --------------------------------------------------------------------------- estimators

def ips(rewards, propensities, action_prob, *, positions=None, n_bootstrap: int = _DEFAULT_N_BOOTSTRAP,
        alpha: float = 0.05, random_state=0) -> Estimate:
    """Inverse propensity scoring: ``mean(r * action_prob / propensities)``.

    Parameters
    ----------
    rewards : (n,) float
    propensities : (n,) float in (0, 1]
        Logging policy's probability of each logged action (at its position).
    action_prob : (n,) float in [0, 1]
        Target policy's probability of each logged action (at its position).
    positions : (n,) int, optional
        Slate position of each row; adds per-position estimates (see the module doc).
    n_bootstrap : int
        Number of bootstrap resamples of the rows for the interval.
    alpha : float
        The interval is the central ``1 - alpha`` percentile interval.
    random_state : int or numpy Generator
        Seed of the bootstrap.
    """
    _check_bootstrap(n_bootstrap, alpha)
    d = _check_inputs(rewards, propensities, action_prob, positions=positions,
                      need=("propensities", "action_prob"))
    w = d["action_prob"] / d["propensities"]
    return _estimate(w * d["rewards"], None, None, n_bootstrap, alpha, random_state, d.get("positions"))


def snips(rewards, propensities, action_prob, *, positions=None, n_bootstrap: int = _DEFAULT_N_BOOTSTRAP,
          alpha: float = 0.05, random_state=0) -> Estimate:
    """Self-normalised IPS: ``sum(w * r) / sum(w)`` with ``w = action_prob / propensities``.

    Parameters as :func:`ips`. When every weight is 0 the estimate is 0.
    """
    _check_bootstrap(n_bootstrap, alpha)
    d = _check_inputs(rewards, propensities, action_prob, positions=positions,
                      need=("propensities", "action_prob"))
    w = d["action_prob"] / d["propensities"]
    zeros = np.zeros_like(w)
    return _estimate(zeros, w * d["rewards"], w, n_bootstrap, alpha, random_state, d.get("positions"))


def dm(rewards, v_hat, *, positions=None, n_bootstrap: int = _DEFAULT_N_BOOTSTRAP,
       alpha: float = 0.05, random_state=0) -> Estimate:
    """Direct method: ``mean(v_hat)``.

    Parameters
    ----------
    rewards : (n,) float
        Used only for validation and the row count (the direct method ignores them).
    v_hat : (n,) float
        ``E_{a~π}[q̂(x_i, a)]`` per round (per row and position for slates); see
        :func:`expected_reward`.
    positions, n_bootstrap, alpha, random_state
        As :func:`ips`.
    """
    _check_bootstrap(n_bootstrap, alpha)
    d = _check_inputs(rewards, v_hat=v_hat, positions=positions, need=("v_hat",))
    return _estimate(d["v_hat"], None, None, n_bootstrap, alpha, random_state, d.get("positions"))


def dr(rewards, propensities, action_prob, q_hat, v_hat, *, positions=None,
       n_bootstrap: int = _DEFAULT_N_BOOTSTRAP, alpha: float = 0.05, random_state=0) -> Estimate:
    """Doubly robust: ``mean(v_hat + w * (r - q_hat))``, ``w = action_prob / propensities``.

    Parameters
    ----------
    q_hat : (n,) float
        Reward model's prediction for the logged action (see :func:`logged_reward`).
    v_hat : (n,) float
        Reward model's expected reward under the target policy (see :func:`expected_reward`).
    others
        As :func:`ips`.
    """
    _check_bootstrap(n_bootstrap, alpha)
    d = _check_inputs(rewards, propensities, action_prob, q_hat, v_hat, positions,
                      need=("propensities", "action_prob", "q_hat", "v_hat"))
    w = d["action_prob"] / d["propensities"]
    a = d["v_hat"] + w * (d["rewards"] - d["q_hat"])
    return _estimate(a, None, None, n_bootstrap, alpha, random_state, d.get("positions"))


def sndr(rewards, propensities, action_prob, q_hat, v_hat, *, positions=None,
         n_bootstrap: int = _DEFAULT_N_BOOTSTRAP, alpha: float = 0.05, random_state=0) -> Estimate:
    """Self-normalised doubly robust: ``mean(v_hat) + sum(w * (r - q_hat)) / sum(w)``.

    Parameters as :func:`dr`. When every weight is 0 the correction term is 0.
    """
    _check_bootstrap(n_bootstrap, alpha)
    d = _check_inputs(rewards, propensities, action_prob, q_hat, v_hat, positions,
                      need=("propensities", "action_prob", "q_hat", "v_hat"))
    w = d["action_prob"] / d["propensities"]
    return _estimate(d["v_hat"], w * (d["rewards"] - d["q_hat"]), w, n_bootstrap, alpha,
                     random_state, d.get("positions"))


# --------------------------------------------------------------------------- reward-model helpers

def _full_index(name, table, positions, n):
    t = np.asarray(table, dtype=np.float64)
    if t.ndim == 2 and t.shape[0] == n:
        return t, None
    if t.ndim == 3 and t.shape[0] == n:
        if positions is None:
            raise ValueError(f"{name} has a position axis (shape {t.shape}); positions are required")
        pos = np.asarray(positions, dtype=np.int64)
        if pos.shape != (n,) or pos.min() < 0 or pos.max() >= t.shape[2]:
            raise ValueError(f"positions must be (n,) in [0, {t.shape[2]}), got shape {pos.shape}")
        return t, pos
    raise ValueError(f"{name} must have shape (n, n_actions) or (n, n_actions, n_positions), got {t.shape}")


def expected_reward(q_full, action_dist, positions=None) -> np.ndarray:
    """``v_hat[i] = sum_a action_dist[i, a(, pos_i)] * q_full[i, a(, pos_i)]``.

    Parameters
    ----------
    q_full : (n, n_actions) or (n, n_actions, n_positions) float
        Reward-model predictions for every action (and position) in each round.
    action_dist : same shape as ``q_full``
        The target policy's action distribution in each round (per position).
    positions : (n,) int, required with a position axis
        The logged position of each row.

    Returns
    -------
    (n,) float64
    """
    q = np.asarray(q_full, dtype=np.float64)
    pi = np.asarray(action_dist, dtype=np.float64)
    if q.shape != pi.shape:
        raise ValueError(f"q_full shape {q.shape} differs from action_dist shape {pi.shape}")
    if pi.ndim >= 2 and pi.size:
        # a distribution over the actions (axis 1) in each round (and position)
        bad = ~np.isfinite(pi) | (pi < 0)
        if bad.any():
            at = tuple(int(x) for x in np.argwhere(bad)[0])
            raise ValueError(f"action_dist must hold finite probabilities >= 0; {pi[at]} at {at}")
        tot = pi.sum(axis=1)
        off = np.abs(tot - 1.0) > 1e-6 * max(1, pi.shape[1])
        if off.any():
            at = tuple(int(x) for x in np.argwhere(off)[0])
            where = f"round {at[0]}" + (f", position {at[1]}" if len(at) > 1 else "")
            raise ValueError(f"action_dist must sum to 1 over the actions; {where} sums to {tot[at]}")
    n = q.shape[0]
    q, pos = _full_index("q_full", q, positions, n)
    if pos is None:
        return (q * pi).sum(axis=1)
    rows = np.arange(n)
    return (q[rows, :, pos] * pi[rows, :, pos]).sum(axis=1)


def logged_reward(q_full, actions, positions=None) -> np.ndarray:
    """``q_hat[i] = q_full[i, actions[i](, positions[i])]`` — the model's logged-action prediction.

    Parameters
    ----------
    q_full : (n, n_actions) or (n, n_actions, n_positions) float
    actions : (n,) int
    positions : (n,) int, required with a position axis

    Returns
    -------
    (n,) float64
    """
    q = np.asarray(q_full, dtype=np.float64)
    n = q.shape[0]
    q, pos = _full_index("q_full", q, positions, n)
    raw = np.asarray(actions)
    if raw.dtype == bool or not (np.issubdtype(raw.dtype, np.integer) or np.issubdtype(raw.dtype, np.floating)):
        raise TypeError(f"actions must be integers, got dtype {raw.dtype}")
    if np.issubdtype(raw.dtype, np.floating):
        frac = ~np.isfinite(raw) | (raw != np.floor(raw))
        if frac.any():
            i = int(np.flatnonzero(frac.reshape(-1))[0])
            raise ValueError(f"actions must be integers (action indices), got {float(raw.reshape(-1)[i])!r} at row {i}")
    a = raw.astype(np.int64)
    if a.shape != (n,) or (n and (a.min() < 0 or a.max() >= q.shape[1])):
        raise ValueError(f"actions must be (n,) ints in [0, {q.shape[1]}), got shape {a.shape}")
    rows = np.arange(n)
    return q[rows, a] if pos is None else q[rows, a, pos]


def world_model_q(world, states, *, n_positions: Optional[int] = None, items=None) -> np.ndarray:
    """A world model as the reward model of :func:`dm` / :func:`dr`: its predicted click rates.

    ``q_full[i, a, p]`` is ``world``'s probability that item ``items[a]`` is clicked at
    position ``p`` by a user in state ``states[i]`` (``world.item_probabilities``); feed it
    to :func:`expected_reward` (``v_hat``, with the target policy's action distribution) and
    :func:`logged_reward` (``q_hat``, with the logged actions). For logged data, the state
    of each round is ``world.log_states(log)`` (the user's state before the round).

    Parameters
    ----------
    world : recmeta_sdk.model.WorldModel
    states : (n, hidden) float
        One user state per logged round.
    n_positions : int, optional
        Positions of the table (default: the model's trained positions); ``None`` with one
        position gives a 2-D table.
    items : (n_actions,) sequence, optional
        The world model's external ids of the actions ``0..n_actions-1`` (default: its
        catalogue order, ``world.item_map.ids``).

    Returns
    -------
    ndarray
        (n, n_actions, n_positions) float64, or (n, n_actions) when the table has one position.
    """
    if not callable(getattr(world, "item_probabilities", None)):
        raise TypeError(f"world must be a recmeta_sdk.model.WorldModel, got {type(world).__name__}")
    P = int(world.n_positions if n_positions is None else n_positions)
    if isinstance(n_positions, bool) or not 1 <= P <= world.n_positions:
        raise ValueError(f"n_positions must be in [1, {world.n_positions}] (the model's positions), got {n_positions!r}")
    s = np.asarray(states, dtype=np.float32)
    if s.ndim != 2:
        raise ValueError(f"states must be (n, hidden), got shape {s.shape}")
    cols = None
    if items is not None:
        cols = world.item_map.to_index(np.asarray(items))
        if (cols < 0).any():
            raise ValueError(f"items holds ids unknown to the world model: {np.asarray(items)[cols < 0][:5].tolist()}")
    out = []
    for p in range(P):
        q = world.item_probabilities(s, position=p).astype(np.float64)
        out.append(q if cols is None else q[:, cols])
    return out[0] if P == 1 else np.stack(out, axis=2)


class ClickRateModel:
    """Context-free reward model: smoothed click rate per (action, position).

    ``q̂(a, p) = (clicks(a, p) + prior_strength * m) / (shows(a, p) + prior_strength)`` with
    ``m`` the overall click rate: a Beta-smoothed empirical rate that shrinks rarely shown
    actions towards the mean.

    Parameters
    ----------
    n_actions : int
    n_positions : int, default 1
    prior_strength : float, default 10.0
        Pseudo-count of the shrinkage towards the global rate.
    """

    def __init__(self, n_actions: int, n_positions: int = 1, prior_strength: float = 10.0):
        if int(n_actions) < 1:
            raise ValueError(f"n_actions must be >= 1, got {n_actions}")
        if int(n_positions) < 1:
            raise ValueError(f"n_positions must be >= 1, got {n_positions}")
        if not np.isfinite(prior_strength) or prior_strength < 0:
            raise ValueError(f"prior_strength must be finite and >= 0, got {prior_strength}")
        self.n_actions = int(n_actions)
        self.n_positions = int(n_positions)
        self.prior_strength = float(prior_strength)
        self.table_: Optional[np.ndarray] = None

    def _counts(self, actions, positions, rewards):
        a = np.asarray(actions, dtype=np.int64)
        r = _as_1d("rewards", rewards, a.shape[0])
        p = np.zeros_like(a) if positions is None else np.asarray(positions, dtype=np.int64)
        if a.ndim != 1 or p.shape != a.shape:
            raise ValueError("actions and positions must be 1-D of the same length as rewards")
        if a.size and (a.min() < 0 or a.max() >= self.n_actions):
            i = _first_bad((a < 0) | (a >= self.n_actions))
            raise ValueError(f"actions must lie in [0, {self.n_actions}); row {i} is {a[i]}")
        if p.size and (p.min() < 0 or p.max() >= self.n_positions):
            i = _first_bad((p < 0) | (p >= self.n_positions))
            raise ValueError(f"positions must lie in [0, {self.n_positions}); row {i} is {p[i]}")
        flat = a * self.n_positions + p
        size = self.n_actions * self.n_positions
        shows = np.bincount(flat, minlength=size).reshape(self.n_actions, self.n_positions)
        clicks = np.bincount(flat, weights=r, minlength=size).reshape(self.n_actions, self.n_positions)
        return shows.astype(np.float64), clicks

    def fit(self, actions, positions, rewards) -> "ClickRateModel":
        """Fit on logged (action, position, reward) rows; ``positions`` may be None."""
        shows, clicks = self._counts(actions, positions, rewards)
        m = clicks.sum() / max(shows.sum(), 1.0)
        self.table_ = (clicks + self.prior_strength * m) / np.maximum(shows + self.prior_strength, 1e-12)
        return self

    def predict(self, n_rounds: int) -> np.ndarray:
        """The (n_rounds, n_actions, n_positions) prediction table (the same in every round)."""
        if self.table_ is None:
            raise ValueError("ClickRateModel is not fitted: call fit first")
        return np.broadcast_to(self.table_, (int(n_rounds),) + self.table_.shape)

    def fit_predict(self, actions, positions, rewards, *, n_folds: int = 1, random_state=0) -> np.ndarray:
        """Predictions for every logged row, cross-fitted over ``n_folds`` random folds.

        With ``n_folds > 1`` each row's prediction comes from a model fitted on the other
        folds (the Open Bandit Pipeline's cross-fitting for DR). Returns
        (n, n_actions, n_positions) float64.
        """
        a = np.asarray(actions, dtype=np.int64)
        n = a.shape[0]
        if int(n_folds) < 1:
            raise ValueError(f"n_folds must be >= 1, got {n_folds}")
        if n_folds == 1:
            self.fit(actions, positions, rewards)
            return np.array(self.predict(n))
        p = None if positions is None else np.asarray(positions, dtype=np.int64)
        r = np.asarray(rewards, dtype=np.float64)
        fold = np.random.default_rng(random_state).permutation(n) % int(n_folds)
        out = np.empty((n, self.n_actions, self.n_positions), dtype=np.float64)
        for f in range(int(n_folds)):
            tr = fold != f
            self.fit(a[tr], None if p is None else p[tr], r[tr])
            out[fold == f] = self.table_
        self.fit(actions, positions, rewards)
        return out


def bernoulli_ts_action_dist(alpha, beta, len_list: int, *, n_sim: int = 100_000,
                             random_state=0) -> np.ndarray:
    """Action distribution per position of a Bernoulli Thompson sampling policy without data.

    Monte Carlo, as the Open Bandit Pipeline's ``BernoulliTS.compute_batch_action_dist``:
    each simulation draws ``θ_a ~ Beta(alpha_a, beta_a)`` and ranks actions by ``θ``; the
    top ``len_list`` fill positions 0, 1, ... Returns the (n_actions, len_list) frequency
    with which each action lands in each position.

    Parameters
    ----------
    alpha, beta : (n_actions,) float > 0
    len_list : int
    n_sim : int
    random_state : int or numpy Generator
    """
    a = _as_1d("alpha", alpha, None)
    b = _as_1d("beta", beta, a.shape[0])
    if (a <= 0).any() or (b <= 0).any():
        raise ValueError("alpha and beta must be > 0")
    k = int(len_list)
    if not 1 <= k <= a.shape[0]:
        raise ValueError(f"len_list must lie in [1, {a.shape[0]}], got {len_list}")
    rng = np.random.default_rng(random_state)
    counts = np.zeros((a.shape[0], k), dtype=np.float64)
    chunk = max(1, 2_000_000 // a.shape[0])
    done = 0
    while done < n_sim:
        m = min(chunk, n_sim - done)
        theta = rng.beta(a, b, size=(m, a.shape[0]))
        top = np.argsort(-theta, axis=1)[:, :k]
        for pos in range(k):
            counts[:, pos] += np.bincount(top[:, pos], minlength=a.shape[0])
        done += m
    return counts / float(n_sim)
