"""Planning at serving time with a learned world model, and in-session adaptation.

:class:`Planner` serves slates from a :class:`recmeta_sdk.model.WorldModel` (issue 15,
"uses of the model"):

* **in-session adaptation** (``adapt=True``): every slate's feedback moves the user's world
  state (:meth:`WorldModel.step`), so the next slate is chosen from the state after the
  clicks and the misses, not from the cold state;
* **planning** (``plan=True``): the slate is chosen by its expected long-term value, not by
  the next click only. A family of candidate policies is scored per item as
  ``log p_i + ρ · c_i``, with ``p_i`` the model's click probability in the current state
  and ``c_i`` the model's *continuation value* of a click on ``i`` (how much a click on it
  lowers the predicted probability that the session ends,
  ``P(end | no click) − P(end | click on i)`` from the model's end head, standardised over
  the catalogue); ``ρ = 0`` is the myopic policy. Each candidate policy is rolled out ``horizon`` steps in
  the world model (``n_rollouts`` sampled response paths, the same random numbers for every
  candidate, so the comparison is paired): its value is the sum over the steps of the
  expected clicks times the probability that the session is still alive (the model's
  end probability), discounted by ``discount``. The first slate of the best candidate is
  served. With ``plan=False`` the slate is the myopic one (the ``k`` items of highest
  ``p_i``).

It follows the online-policy protocol of :func:`recmeta_sdk.evaluation.sim.run_sessions`
(``recommend(user_ctx, k, exclude)``, ``feedback(user, item, reward)``), and can be called
directly by a host::

    from recmeta_sdk.model import WorldModel
    from recmeta_sdk.online.planning import Planner

    wm = WorldModel.fit(log, item_features=items, seed=0)
    planner = Planner(wm, horizon=10)
    slate = planner.recommend("u1", k=3)             # external item ids, best first
    for item, reward in zip(slate, rewards):
        planner.feedback("u1", item, reward)         # the state moves after the whole slate
    planner.plan("u1", 3).value                      # the estimated value of the next slate

Items are the world model's external ids. Nothing draws from global random state: the
rollouts use ``numpy.random.default_rng([seed, call counter])``.
"""
from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["PlanResult", "Planner"]

#: the values of ρ (weight of the continuation value of a click) tried by default.
DEFAULT_RHOS = (0.0, 0.1, 0.2, 0.4, 0.7, 1.0, 1.5)


@dataclass
class PlanResult:
    """The outcome of :meth:`Planner.plan`.

    Attributes
    ----------
    slate : (k,) ndarray
        External item ids, best first.
    rho : float
        The ρ of the chosen candidate policy (0: the myopic one).
    value : float
        Its estimated value over the horizon (expected clicks while the session lasts; NaN
        with ``plan=False``).
    values : dict
        ``{ρ: value}`` of every candidate (empty without planning).
    """

    slate: np.ndarray
    rho: float
    value: float
    values: dict


class _UserState:
    __slots__ = ("h", "off", "resp", "slate", "steps")

    def __init__(self, h: np.ndarray, n_items: int):
        self.h = h
        self.off = torch.zeros(n_items)  # in-session evidence: logit offsets per item
        self.slate: list | None = None
        self.resp: dict = {}
        self.steps = 0


class Planner:
    """Serve slates planned in a learned world model, adapting each user's state in session.

    Parameters
    ----------
    world : recmeta_sdk.model.WorldModel
        The learned model (response, transition and, when fitted on logs with sessions,
        session end).
    horizon : int
        Steps of each lookahead rollout (1: the value of the next slate alone).
    rhos : sequence of float >= 0
        Weights of the continuation value of a click that define the candidate policies
        (0, the myopic policy, is always included).
    n_rollouts : int
        Sampled response paths per candidate.
    discount : float in (0, 1]
        Per-step discount of the rollout's rewards.
    plan : bool
        Choose slates by lookahead (True) or myopically by the next click (False): the switch
        of the planning use.
    adapt : bool
        Update the user's state from every slate's feedback (True) or keep the state the user
        started with (False): the switch of the in-session adaptation.
    evidence : float >= 0
        Strength of the in-session evidence (0: off): after each answered slate, every item's
        logit moves by ``evidence · Σ_j K(i, j) (r_j − p_j)`` over the slate's items ``j``
        (``p_j`` the predicted click probability, ``K`` a kernel on the model's item vectors,
        ``exp((cos − 1) / bandwidth)``), and the accumulated offsets decay by
        ``evidence_decay`` per step; the rollouts apply the same update.
    bandwidth : float > 0
        Width of that kernel (small: mostly the item itself and its near neighbours).
    evidence_decay : float in [0, 1]
        Per-step decay of the in-session offsets.
    seed : int
        Seed of the rollouts' random numbers.

    Raises
    ------
    TypeError / ValueError
        If ``world`` lacks the world-model methods or an option is out of range.
    """

    def __init__(self, world: Any, *, horizon: int = 10, rhos: Sequence[float] = DEFAULT_RHOS,
                 n_rollouts: int = 8, discount: float = 1.0, plan: bool = True, adapt: bool = True,
                 evidence: float = 0.0, bandwidth: float = 0.2, evidence_decay: float = 0.8,
                 seed: int = 0):
        for attr in ("initial_state", "adapt", "step", "predict", "item_probabilities", "item_map"):
            if not hasattr(world, attr):
                raise TypeError(f"world must be a recmeta_sdk.model.WorldModel (no {attr!r} on "
                                f"{type(world).__name__})")
        for name, v, lo, hi in (("horizon", horizon, 1, 1000), ("n_rollouts", n_rollouts, 1, 100_000),
                                ("seed", seed, 0, 2**63 - 1)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not lo <= v <= hi:
                raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {v!r}")
        r = np.asarray(rhos, dtype=np.float64)
        if r.ndim != 1 or r.shape[0] < 1 or not np.isfinite(r).all() or (r < 0).any():
            raise ValueError(f"rhos must be a non-empty 1-D sequence of finite values >= 0, got {rhos!r}")
        if isinstance(discount, bool) or not isinstance(discount, (int, float, np.floating)) \
                or not 0.0 < float(discount) <= 1.0:
            raise ValueError(f"discount must be a number in (0, 1], got {discount!r}")
        for name, v, lo, hi in (("evidence", evidence, 0.0, 1e3), ("bandwidth", bandwidth, 1e-6, 1e3),
                                ("evidence_decay", evidence_decay, 0.0, 1.0)):
            if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)) \
                    or not lo <= float(v) <= hi:
                raise ValueError(f"{name} must be a number in [{lo:g}, {hi:g}], got {v!r}")
        for name, v in (("plan", plan), ("adapt", adapt)):
            if not isinstance(v, (bool, np.bool_)):
                raise TypeError(f"{name} must be a bool, got {type(v).__name__}")
        self.world = world
        self.horizon = int(horizon)
        self.rhos = np.unique(np.append(r, 0.0))
        self.n_rollouts = int(n_rollouts)
        self.discount = float(discount)
        self.plan_enabled = bool(plan)
        self.adapt_enabled = bool(adapt)
        self.seed = int(seed)
        self.evidence = float(evidence)
        self.bandwidth = float(bandwidth)
        self.evidence_decay = float(evidence_decay)
        self._kernel = None
        with torch.no_grad():  # the model is frozen while it serves: its item vectors are computed once
            self._V = world._item_vectors().detach()
        if self.evidence > 0:
            with torch.no_grad():
                V = self._V
                Vn = V / V.norm(dim=1, keepdim=True).clamp_min(1e-12)
                self._kernel = torch.exp((Vn @ Vn.T - 1.0) / self.bandwidth)       # (N, N), 1 on the diagonal
        self._ids = np.asarray(world.item_map.ids)
        self._index = {(x.item() if hasattr(x, "item") else x): j for j, x in enumerate(self._ids)}
        self._users: dict = {}
        self._calls = 0
        self.chosen_rho: list = []  # the ρ of every slate served (diagnostics)

    # ------------------------------------------------------------------ users
    def start(self, user: Hashable, history_items: Any = None, history_rewards: Any = None) -> np.ndarray:
        """(Re)start ``user`` from the prior, or from a history rolled in with :meth:`WorldModel.adapt`.

        Returns the user's (hidden,) state.
        """
        if history_items is None:
            h = self.world.initial_state(1)[0]
        else:
            h = self.world.adapt(history_items, history_rewards)
        self._users[user] = _UserState(np.asarray(h, np.float32), len(self._ids))
        return self._users[user].h.copy()

    def state(self, user: Hashable) -> np.ndarray:
        """The user's current (hidden,) world state (the prior for a user never seen)."""
        return self._user(user).h.copy()

    def forget(self, user: Hashable) -> None:
        """Drop the user's state (a later call starts them from the prior)."""
        self._users.pop(user, None)

    def _user(self, user: Hashable) -> _UserState:
        st = self._users.get(user)
        if st is None:
            self.start(user)
            st = self._users[user]
        return st

    # ------------------------------------------------------------------ serving
    def recommend(self, user_ctx: Any, k: int, exclude: Any = None) -> np.ndarray:
        """The next slate: (k,) external item ids, best first.

        Parameters
        ----------
        user_ctx : hashable user id, or an object with a ``user`` attribute
            (:class:`recmeta_sdk.evaluation.sim.UserContext`).
        k : int
            Slate size.
        exclude : array-like, optional
            External item ids not to show.
        """
        user = getattr(user_ctx, "user", user_ctx)
        res = self.plan(user, k, exclude)
        self.chosen_rho.append(res.rho)
        st = self._user(user)
        st.slate, st.resp = [x.item() if hasattr(x, "item") else x for x in res.slate], {}
        return res.slate

    def feedback(self, user: Hashable, item: Any, reward: float) -> None:
        """Observe the reward of one shown item.

        Rewards are thresholded with the world model's ``positive_threshold`` (as in its
        training logs). Feedback on the items of the last recommended slate is collected
        until the whole slate is answered, then the state takes one :meth:`WorldModel.step`
        with the slate and its responses; an item outside that slate is one step of its own
        (a slate of one). With ``adapt=False`` feedback is validated and ignored.
        """
        r = float(reward)
        if not np.isfinite(r):
            raise ValueError(f"reward must be finite, got {reward!r}")
        st = self._user(user)
        key = item.item() if hasattr(item, "item") else item
        resp = float(self.world._responses(np.array([r]), (1,), "reward")[0])
        if st.slate is not None and key in st.slate and key not in st.resp:
            st.resp[key] = resp
            if len(st.resp) < len(st.slate):
                return
            slate, rs = st.slate, [st.resp[i] for i in st.slate]
            st.slate, st.resp = None, {}
        else:
            if key not in self._index:
                raise ValueError(f"unknown item {item!r} (not in the world model's catalogue)")
            slate, rs = [key], [resp]
        st.steps += 1
        if not self.adapt_enabled:
            return
        wm, V = self.world, self._V
        dense = torch.as_tensor([self._index[i] for i in slate], dtype=torch.int64)[None]
        r = torch.as_tensor(rs, dtype=torch.float32)[None]
        with torch.no_grad():
            h = torch.as_tensor(st.h[None])
            if self._kernel is not None:
                p = self._slate_probs(wm._all_logits(h, 0, V) + st.off[None], dense)[0]
                st.off = st.off * self.evidence_decay + self.evidence * (
                    (r[0] - p)[:, None] * self._kernel[dense[0]]).sum(0)
            st.h = wm._dense_step(h, dense, r, V, False)[0][0].numpy().copy()

    # ------------------------------------------------------------------ planning
    def plan(self, user: Hashable, k: int, exclude: Any = None) -> PlanResult:
        """Choose the next slate of ``user`` without serving it (see the module docstring)."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= len(self._ids):
            raise ValueError(f"k must be an integer in [1, {len(self._ids)}], got {k!r}")
        k = int(k)
        if k > self.world.n_positions:
            raise ValueError(f"k={k} exceeds the world model's trained slate positions ({self.world.n_positions})")
        st = self._user(user)
        mask = np.zeros(len(self._ids), bool)
        if exclude is not None and np.size(exclude):
            ex = np.asarray(exclude).ravel()
            dense = self.world.item_map.to_index(ex)
            if (dense < 0).any():
                raise ValueError(f"exclude names unknown items {ex[dense < 0][:5].tolist()}")
            mask[dense] = True
        if len(self._ids) - int(mask.sum()) < k:
            raise ValueError(f"fewer than k={k} items left after exclude")
        wm = self.world
        self._calls += 1
        with torch.no_grad():
            V = self._V
            h = torch.as_tensor(st.h[None], dtype=torch.float32)
            excl = torch.as_tensor(mask)
            p0 = torch.sigmoid(wm._all_logits(h, 0, V) + st.off[None])[0]
            if not self.plan_enabled:
                slate = _topk(p0[None], k, excl)[0]
                return PlanResult(self._ids[slate.numpy()], 0.0, float("nan"), {})
            cont = self._continuation(h, p0, k, excl, V)
            slate, rho, value, values = self._rollouts(h, st.off, cont, k, excl, V)
        return PlanResult(self._ids[slate], rho, value, values)

    def _continuation(self, h: torch.Tensor, p0: torch.Tensor, k: int, excl: torch.Tensor,
                      V: torch.Tensor) -> torch.Tensor:
        """(N,) ``P(end | no click) − P(end | a click on i)`` (zeros without a session model)."""
        wm = self.world
        n = p0.shape[0]
        if not wm.has_sessions:
            return torch.zeros(n)
        base = _topk(p0[None], k, excl)[0]                          # the myopic slate
        # slate of item i: i first, then the myopic slate's items other than i
        others = base[None, :].expand(n, -1)
        is_i = others == torch.arange(n)[:, None]
        order = torch.argsort(is_i.to(torch.int8), dim=1, stable=True)   # i (if present) last
        fill = torch.gather(others, 1, order)[:, :k - 1]
        dense = torch.cat([torch.arange(n)[:, None], fill], dim=1)
        hh = h.expand(n, -1)
        r1 = torch.zeros(n, k)
        r1[:, 0] = 1.0
        _, e1 = wm._dense_step(hh, dense, r1, V, True)
        _, e0 = wm._dense_step(h, dense[:1], torch.zeros(1, k), V, True)
        c = e0[0] - e1
        sd = float(c.std())
        if not sd > 1e-9:  # no item changes the end probability: nothing to plan for
            return torch.zeros(n)
        return (c - c.mean()) / sd  # standardised: ρ is in units of its spread

    def _slate_probs(self, logit0: torch.Tensor, slates: torch.Tensor) -> torch.Tensor:
        """(B, k) click probabilities of ``slates`` at positions 0..k-1 from position-0 logits (B, N)."""
        net = self.world._net
        pos = torch.arange(slates.shape[1])
        shift = net.calib[0] * (net.pos_bias[pos] - net.pos_bias[0])
        return torch.sigmoid(torch.gather(logit0, 1, slates) + shift[None, :])

    def _rollouts(self, h: torch.Tensor, off: torch.Tensor, cont: torch.Tensor, k: int, excl: torch.Tensor,
                  V: torch.Tensor):
        wm = self.world
        C, R, H = len(self.rhos), self.n_rollouts, self.horizon
        rho = torch.as_tensor(self.rhos, dtype=torch.float32).repeat_interleave(R)       # (C*R,)
        u = torch.as_tensor(np.random.default_rng([self.seed, self._calls]).random((H, R, k)),
                            dtype=torch.float32).repeat(1, C, 1)                     # common numbers
        hb = h.expand(C * R, -1).contiguous()
        offb = off[None, :].expand(C * R, -1)
        alive = torch.ones(C * R)
        value = torch.zeros(C * R)
        first = None
        gamma = 1.0
        for t in range(H):
            logit0 = wm._all_logits(hb, 0, V) + offb
            slates = _topk(torch.nn.functional.logsigmoid(logit0) + rho[:, None] * cont[None, :], k, excl)
            if first is None:
                first = slates
            p = self._slate_probs(logit0, slates)
            value += gamma * alive * p.sum(1)
            if t == H - 1:
                break
            resp = (u[t] < p).to(torch.float32)
            if self._kernel is not None and self.adapt_enabled:
                offb = offb * self.evidence_decay + self.evidence * (
                    (resp - p)[:, :, None] * self._kernel[slates]).sum(1)
            hb, pend = wm._dense_step(hb, slates, resp, V, True)
            if pend is not None:
                alive = alive * (1.0 - pend)
            gamma *= self.discount
        per = value.reshape(C, R).mean(1).numpy()
        best = int(np.argmax(per))  # ties: the smaller ρ (myopic first)
        values = {float(r): float(v) for r, v in zip(self.rhos, per)}
        return first[best * R].numpy(), float(self.rhos[best]), float(per[best]), values


def _topk(scores: torch.Tensor, k: int, excl: torch.Tensor) -> torch.Tensor:
    """(B, k) dense ids of the k highest scores per row outside ``excl`` (N,) bool."""
    s = scores.masked_fill(excl[None, :], float("-inf")) if bool(excl.any()) else scores
    return torch.topk(s, k, dim=1).indices
