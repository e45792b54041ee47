"""The online loop of a Recommender: feedback in, fresh user states and model updates out.

For a :class:`~recmeta_sdk.api.Recommender`: feedback, per-user online states, auditable
exploration helpers and the incremental off-policy update.

::

    model.feedback([{"user": "u7", "item": 50, "reward": 1.0, "propensity": 0.12}])
    st = online.current(model, "u7")          # OnlineUser: .state (a UserState), .version
    online.recommend(model, "u7", k=10)       # reflects the click at once (and its version)
    new = rm.train(None, resume=model)         # off-policy update from the feedback log

Feedback
--------
Each event ``(user, item, reward, propensity, timestamp, position)`` updates that user's
state at once: the user's encoder history gains the item (with ``encode="positive"``, the
default, only items with a positive reward are read by the model — it is trained on
positive interactions, and reading the misses as interactions hurts it; the misses are
kept in :attr:`OnlineUser.seen` and excluded by :func:`recommend`), the state ``h`` is
recomputed, and the user's
own fast parameters ``phi = (gamma, delta)`` take **one** gradient step of the model's
support loss (the reward-weighted likelihood of the positive items, the closed-form
gradient of :meth:`RecMetaNet.support_grad`, with the model's — meta-learned — step
sizes) from their current value (a miss, whose support gradient is zero, takes no step).
Every event, miss or hit, also updates the user's adapted **item-bias vector**: the
posterior mean of the user's rewards over the catalogue given all its feedback rewards,
under the Gaussian prior that the training users' rewards define
(:mod:`recmeta_sdk.online.posterior`; weight ``config.feedback_posterior``, 0 turns it off). The
misses matter there: an item shown and not rewarded lowers the items that go with it in the
population beyond what the user's hits explain. On the MovieLens replay this is what lifts
the online policy above EASE's fold-in of the hits (``bench/bench_online.py``).
A user's first event starts from the model's prior:
a known (training) user from its training state (``Recommender.user_state``), a new user
from ``Recommender.adapt`` of that first event (``config.inner_steps`` steps). With
``update="readapt"`` every event instead recomputes ``adapt`` of the whole history from
the initial ``phi`` (what meta-training optimises; a few ms more).

Persistence
-----------
``Recommender.save`` writes the feedback log (and the store's ``encode`` / ``update``) into
the model file, under its SHA-256 (:func:`log_to_file`, format version 2);
``recmeta_sdk.load`` gives the loaded model a store with that log, whose users' states are
rebuilt from it on first use (:func:`log_from_file`), so ``train(None, resume=loaded)``
learns from the same log. A file without a log (format 1) loads with an empty one.

User ids
--------
A user id that is a training user of the model starts from its training state; a host whose
user ids are another id space (a simulator's or replay's dense indices) passes
``known_users=False`` (as :class:`recmeta_sdk.evaluation.bandits.RecommenderPolicy` does by default),
so that no new user is served from the training history of a stranger with the same id.

Concurrency
-----------
A user's state is an immutable :class:`OnlineUser`; a writer computes the next version
and publishes it with one dict item assignment (atomic under the GIL), so a reader
(``current``, ``recommend``) takes no lock and sees a whole version, old or new, never a
mix. Writers of the same user serialise on a per-user lock (so no update is lost and the
per-user order of the feedback log is the order of application); writers of different
users run in parallel. The model itself (weights, item vectors) is never changed:
``train(..., resume=model)`` builds a new model, the host swaps its reference.

Exploration
-----------
``Recommender.recommend(..., explore="sample", seed=s)`` draws a Plackett-Luce slate by
Gumbel-top-k and reports each item's ``pi(a|s)``; :func:`slate_propensity` turns those
into the probability of the whole ranked slate. :func:`epsilon_slate` draws an
epsilon-greedy slate and reports the probability of each pick given the picks above it
(and of the slate).
"""
from __future__ import annotations

import copy
import logging
import threading
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from ..model.state import Recommendations, UserState

if TYPE_CHECKING:  # names used in annotations only
    import os

    from numpy.typing import ArrayLike

    from ..model.io import LoadLimits
    from ..model.network import Config

#: what this layer serves: a :class:`recmeta_sdk.Recommender`, the facade one layer up, which this
#: module does not import (the name is for the annotations)
Recommender = Any

logger = logging.getLogger("recmeta")

__all__ = [
    "EVENT_COLUMNS",
    "OnlineStore",
    "OnlineUser",
    "current",
    "epsilon_slate",
    "feedback",
    "feedback_log",
    "log_from_file",
    "log_to_file",
    "parse_events",
    "recommend",
    "resume_train",
    "slate_propensity",
    "store",
]

EVENT_COLUMNS = ("user", "item", "reward", "propensity", "timestamp", "position")


# ============================================================================ events

def _scalar_id(x) -> bool:
    return isinstance(x, (int, np.integer, str)) and not isinstance(x, bool)


def parse_events(model: Recommender, events: pd.DataFrame | Sequence[Mapping[str, Any] | tuple]) -> pd.DataFrame:
    """Validate feedback events into a DataFrame with :data:`EVENT_COLUMNS`.

    ``events``: a DataFrame, or a list of dicts or of tuples in the order of
    :data:`EVENT_COLUMNS` (``user``, ``item``, ``reward`` required; ``propensity``,
    ``timestamp``, ``position`` optional: NaN, NaN, 0). Raises ValueError naming an item
    unknown to the model, a propensity outside (0, 1] or a non-finite reward, TypeError for
    a malformed container.
    """
    if isinstance(events, pd.DataFrame):
        df = events
    elif isinstance(events, dict):
        raise TypeError("events must be a DataFrame or a list of dicts / tuples, got a dict "
                        "(wrap a single event in a list)")
    else:
        try:
            rows = list(events)
        except TypeError:
            raise TypeError(f"events must be a DataFrame or a list of dicts / tuples, "
                            f"got {type(events).__name__}") from None
        if rows and all(isinstance(r, dict) for r in rows):
            bad = sorted({k for r in rows for k in r} - set(EVENT_COLUMNS))
            if bad:
                raise ValueError(f"unknown event field(s) {bad}; known: {list(EVENT_COLUMNS)}")
            df = pd.DataFrame(rows)
        elif all(isinstance(r, (tuple, list)) for r in rows):
            for r in rows:
                if not 3 <= len(r) <= len(EVENT_COLUMNS):
                    raise ValueError(f"an event tuple has {len(r)} fields; expected 3..6 in the order "
                                     f"{list(EVENT_COLUMNS)}: {r!r}")
            df = pd.DataFrame([tuple(r) + (None,) * (len(EVENT_COLUMNS) - len(r)) for r in rows],
                              columns=list(EVENT_COLUMNS))
        else:
            raise TypeError("events must be a DataFrame or a list of dicts or of tuples (not mixed)")
    for col in ("user", "item", "reward"):
        if col not in df.columns:
            raise ValueError(f"events need a {col!r} column; they have {list(df.columns)}")
    n = len(df)
    users = df["user"].to_numpy(dtype=object)
    for u in users:
        if not _scalar_id(u):
            raise ValueError(f"event user ids must be int or str, got {u!r}")
    items = df["item"].to_numpy()
    idx = model.item_map.to_index(items) if n else np.zeros(0, np.int64)
    if (idx < 0).any():
        bad = [x.item() if hasattr(x, "item") else x for x in items[idx < 0][:10]]
        raise ValueError(f"feedback has item(s) unknown to the model: {bad}")
    try:
        reward = pd.to_numeric(df["reward"], errors="raise").to_numpy(dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"event rewards must be numbers, got {df['reward'].tolist()[:5]}") from None
    # finite in float32 too: the online state stores rewards as float32 (1e300 would be inf)
    with np.errstate(over="ignore"):
        finite32 = np.isfinite(reward.astype(np.float32))
    if not finite32.all():
        i = int(np.flatnonzero(~finite32)[0])
        raise ValueError(f"event reward must be finite (in float32, |reward| <= 3.4e38); row {i} has {reward[i]}")
    prop = (pd.to_numeric(df["propensity"], errors="coerce").to_numpy(dtype=np.float64)
            if "propensity" in df.columns else np.full(n, np.nan))
    if "propensity" in df.columns:
        given = df["propensity"].notna().to_numpy()
        bad = given & ~((prop > 0) & (prop <= 1))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"event propensity must be in (0, 1]; row {i} has {df['propensity'].iloc[i]!r}")
    ts = np.full(n, np.nan)
    if "timestamp" in df.columns:
        given = df["timestamp"].notna().to_numpy()
        ts = pd.to_numeric(df["timestamp"], errors="coerce").to_numpy(dtype=np.float64)
        bad = given & ~np.isfinite(ts)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"event timestamp must be a finite number; row {i} has "
                             f"{df['timestamp'].iloc[i]!r}")
    pos = np.zeros(n, np.int64)
    if "position" in df.columns:
        raw = df["position"].to_numpy(dtype=object)
        for i, p in enumerate(raw):
            if p is None or (isinstance(p, float) and np.isnan(p)):
                continue  # not given: 0
            if isinstance(p, (bool, np.bool_)):
                raise TypeError(f"event position must be an integer; row {i} has {p!r}")
            if isinstance(p, (int, np.integer)):
                pos[i] = int(p)
            elif isinstance(p, (float, np.floating)) and float(p).is_integer():
                pos[i] = int(p)  # 2.0 from a float column of whole numbers
            else:
                raise ValueError(f"event position must be an integer; row {i} has {p!r}")
        if (pos < 0).any():
            raise ValueError(f"event positions must be >= 0, got {int(pos.min())}")
    return pd.DataFrame({"user": users, "item": items, "reward": reward, "propensity": prop,
                         "timestamp": ts, "position": pos, "_idx": idx.astype(np.int64)})


# ============================================================================ states

@dataclass(frozen=True)
class OnlineUser:
    """One published version of a user's online state (never mutated).

    Attributes
    ----------
    user : the user's id
    version : number of feedback events applied
    state : :class:`~recmeta_sdk.api.UserState` to pass to ``recommend``; its ``history``
        is the history the model reads (with ``encode="positive"``: the training history
        and the positively rewarded feedback), so ``exclude_seen`` removes those items;
        the misses are in ``seen`` (pass :meth:`exclude_ids` as ``exclude``, as
        :func:`recommend` does)
    enc_items, enc_rewards : the encoder history (internal indices, rewards)
    seen, seen_rewards : every item interacted with (training history and all feedback)
    gamma, delta : (d,) float32, the user's fast parameters
    known : whether the user is a training user of the model
    n_prior : how many leading items of ``seen`` are the training history (a known user's),
        not feedback
    """

    user: Any
    version: int
    state: Any
    enc_items: np.ndarray
    enc_rewards: np.ndarray
    gamma: np.ndarray
    delta: np.ndarray
    known: bool
    seen: np.ndarray
    seen_rewards: np.ndarray
    n_prior: int = 0

    @property
    def seen_ids(self) -> tuple:
        """External ids of every item the user interacted with (training and feedback)."""
        return self._seen_ids

    def _with_ids(self, model) -> OnlineUser:
        ids = _ext(model, self.seen)
        object.__setattr__(self, "_seen_ids", ids)
        object.__setattr__(self, "_ids_of", dict(zip(self.seen.tolist(), ids)))
        return self

    def exclude_ids(self) -> list:
        """The seen items that ``state.history`` does not already exclude (the misses)."""
        extra = np.setdiff1d(self.seen, self.state.history)
        return [self._ids_of[i] for i in extra] if len(extra) else []


def _ext(model, idx: np.ndarray) -> tuple:
    return tuple(x.item() if hasattr(x, "item") else x for x in model.item_ids[idx])


class OnlineStore:
    """Per-user online states and the feedback log of one model (see the module doc).

    Parameters
    ----------
    model : Recommender
    encode : ``"positive"`` (default) or ``"all"``: which fed-back items the encoder reads
    update : ``"step"`` (default: one step of the fast parameters per event) or
        ``"readapt"`` (re-run ``adapt`` on the whole history per event)
    log : a feedback log (DataFrame) to start from, its users' states rebuilt on first use
    known_users : bool, default True
        A user id that is a training user of the model starts from that user's training
        state. False: every user starts as a new user (from ``adapt`` of its first event),
        for hosts whose user ids live in another id space than the training log's (a
        simulator's dense user indices would otherwise collide with training user ids and
        serve a new user from a stranger's history).
    """

    def __init__(self, model: Recommender, *, encode: str = "positive", update: str = "step",
                 log: pd.DataFrame | None = None, known_users: bool = True):
        if encode not in ("positive", "all"):
            raise ValueError(f"encode must be 'positive' or 'all', got {encode!r}")
        if update not in ("step", "readapt"):
            raise ValueError(f"update must be 'step' or 'readapt', got {update!r}")
        if not isinstance(known_users, bool):
            raise TypeError(f"known_users must be a bool, got {type(known_users).__name__}")
        self.model = model
        self.encode = encode
        self.update = update
        self.known_users = known_users
        self._states: dict[Any, OnlineUser] = {}
        self._locks: dict[Any, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._log: list[tuple] = []
        self._pending: dict[Any, pd.DataFrame] = {}
        if log is not None and len(log):
            ev = parse_events(model, log)
            for u, grp in ev.groupby("user", sort=False):
                self._pending[u] = grp
            self._log.extend(ev[list(EVENT_COLUMNS)].itertuples(index=False, name=None))
        cfg = model.config
        net = model._net
        with torch.no_grad():
            if cfg.meta == "fomaml":
                self._lr = (torch.exp(net.log_lr[0]).clone(), torch.exp(net.log_lr[1]).clone())
            else:
                lr = torch.tensor(float(cfg.inner_lr))
                self._lr = (lr, lr)

    # ---------------------------------------------------------------- low level
    def _lock(self, user) -> threading.Lock:
        lk = self._locks.get(user)
        if lk is None:
            with self._locks_guard:
                lk = self._locks.setdefault(user, threading.Lock())
        return lk

    def _encode(self, enc_items: np.ndarray, ufeat: np.ndarray) -> torch.Tensor:
        from ..training.loop import history_tensors

        m = self.model
        bi, bo, bw, sq, sl = history_tensors([enc_items], m.config.seq_len, m.n_items)
        uo = torch.tensor([0, len(ufeat)], dtype=torch.int64)
        with torch.no_grad():
            return m._net.user_state(m._X, bi, bo, bw, sq, sl, torch.from_numpy(ufeat.astype(np.int64)), uo)

    def _support(self, enc_items, enc_rewards):
        rows = torch.zeros(len(enc_items), dtype=torch.int64)
        w = torch.from_numpy(np.maximum(enc_rewards, 0.0).astype(np.float32)) / self.model._reward_scale
        return rows, torch.from_numpy(enc_items.astype(np.int64)), w

    def _adapt(self, h, enc_items, enc_rewards, steps, known):
        m = self.model
        rows, it, w = self._support(enc_items, enc_rewards)
        lr = None if m.config.meta == "fomaml" else m.config.inner_lr
        with torch.no_grad():
            return m._net.adapt_phi(h, m._V, rows, it, w, steps, lr=lr, **self._offset_kw(rows, it, known))

    def _ufeat(self, user, known) -> np.ndarray:
        m = self.model
        if not known or len(m._uf_off) <= 1:
            return np.zeros(0, np.int64)
        u = m.user_map.position(user)
        return m._uf_idx[m._uf_off[u]:m._uf_off[u + 1]]

    def _publish(self, user, version, h, gamma, delta, seen, seen_r, enc_items, enc_rewards, known, steps,
                 n_prior=0):
        m = self.model
        with torch.no_grad():
            hp = m._net.apply_phi(h, gamma, delta)
        st = UserState(hp[0].numpy().copy(), h[0].numpy().copy(), enc_items, _ext(m, enc_items), enc_rewards,
                       user if known else None, (), int(steps), None,
                       self._item_bias(seen[n_prior:], seen_r[n_prior:], known))
        ou = OnlineUser(user, int(version), st, enc_items, enc_rewards,
                        gamma[0].detach().numpy().copy(), delta[0].detach().numpy().copy(), known, seen, seen_r,
                        int(n_prior))
        return ou._with_ids(m)

    def _item_bias(self, items: np.ndarray, rewards: np.ndarray, known: bool) -> np.ndarray | None:
        """The user's adapted item-bias vector from its feedback events (hits and misses):
        ``kappa * (mu + correction)`` for a new user, ``kappa * correction`` for a known one,
        from the reward posterior (:mod:`recmeta_sdk.online.posterior`); None when
        ``config.feedback_posterior`` is 0 or there is no feedback yet."""
        from . import posterior

        m = self.model
        cfg = m.config
        if cfg.feedback_posterior <= 0 or len(items) == 0:
            return None
        items, rewards = items[-cfg.feedback_window:], rewards[-cfg.feedback_window:]
        post = posterior.of_model(m)
        y = np.maximum(np.asarray(rewards, np.float64), 0.0) / m._reward_scale
        b = post.correction(items, y, float(cfg.feedback_reg))
        if not known:
            b = b + post.mu
        return (float(cfg.feedback_posterior) * posterior.score_scale(m) * b).astype(np.float32)

    def _offset_kw(self, rows, items, known) -> dict:
        """The wide (item-to-item) part of the logits, for models that have one (a new user's
        weight for an unknown user, see :meth:`RecMetaNet.wide_alpha`)."""
        f = getattr(self.model._net, "wide_offset", None)
        off = f(rows, items, 1, new=not known) if f is not None else None
        return {} if off is None else {"offset": off}

    def _prior(self, user) -> OnlineUser | None:
        """Version 0 of a known user (its training state), or None for a new user."""
        m = self.model
        if not self.known_users:
            return None
        u = m.user_map.position(user) if _scalar_id(user) else -1
        if u < 0:
            return None
        lo, hi = m._hist_offsets[u], m._hist_offsets[u + 1]
        items = m._hist_items[lo:hi].astype(np.int64)
        rews = m._hist_rewards[lo:hi].astype(np.float32)
        uf = self._ufeat(user, True)
        h = self._encode(items, uf)
        steps = m.config.inner_steps
        g, d = self._adapt(h, items, rews, steps, True)
        return self._publish(user, 0, h, g, d, items, rews, items, rews, True, steps, len(items))

    def _apply(self, cur: OnlineUser | None, user, idx: int, reward: float) -> OnlineUser:
        """The next version of ``user`` after one event (pure function of cur and the event)."""
        m = self.model
        if cur is None:
            cur = self._prior(user)
        new_user = cur is None
        if new_user:
            seen = np.zeros(0, np.int64)
            seen_r = np.zeros(0, np.float32)
            enc_i, enc_r = np.zeros(0, np.int64), np.zeros(0, np.float32)
            known, version, steps0 = False, 0, 0
        else:
            seen, seen_r = cur.seen, cur.seen_rewards
            enc_i, enc_r = cur.enc_items, cur.enc_rewards
            known, version, steps0 = cur.known, cur.version, cur.state.steps
        seen = np.append(seen, np.int64(idx))
        seen_r = np.append(seen_r, np.float32(reward)).astype(np.float32)
        if self.encode == "all" or reward > 0:
            enc_i = np.append(enc_i, np.int64(idx))
            enc_r = np.append(enc_r, np.float32(reward)).astype(np.float32)
        if not new_user and self.encode == "positive" and not reward > 0:
            # a miss: not read by the encoder, and its support gradient is zero; seen grows and
            # the reward posterior (which reads misses) gives the state a new item bias
            n0 = cur.n_prior
            st = replace(cur.state, item_bias=self._item_bias(seen[n0:], seen_r[n0:], known))
            return replace(cur, version=version + 1, seen=seen, seen_rewards=seen_r, state=st)._with_ids(m)
        uf = self._ufeat(user, known)
        h = self._encode(enc_i, uf)
        if new_user or self.update == "readapt":
            steps = m.config.inner_steps
            g, d = self._adapt(h, enc_i, enc_r, steps, known)
            total = steps
        else:
            rows, it, w = self._support(enc_i, enc_r)
            g0 = torch.from_numpy(cur.gamma)[None]
            d0 = torch.from_numpy(cur.delta)[None]
            with torch.no_grad():
                gg, gd = m._net.support_grad(h, g0, d0, m._V, rows, it, w, 1, **self._offset_kw(rows, it, known))
                g = g0 - self._lr[0] * gg
                d = d0 - self._lr[1] * gd
            total = steps0 + 1
        return self._publish(user, version + 1, h, g, d, seen, seen_r, enc_i, enc_r, known, total,
                             0 if new_user else cur.n_prior)

    def _materialise(self, user) -> OnlineUser | None:
        """Rebuild a user's state from a carried-over log (first use after ``resume``)."""
        grp = self._pending.get(user)
        if grp is None:
            return None
        with self._lock(user):
            cur = self._states.get(user)
            if cur is not None or user not in self._pending:
                return cur
            for idx, r in zip(grp["_idx"].to_numpy(), grp["reward"].to_numpy()):
                cur = self._apply(cur, user, int(idx), float(r))
            self._states[user] = cur
            del self._pending[user]
            return cur

    # ---------------------------------------------------------------- public
    def current(self, user: Any) -> OnlineUser | None:
        """The latest published version of ``user`` (None if it has no feedback yet)."""
        st = self._states.get(user)
        if st is None and self._pending:
            st = self._materialise(user)
        return st

    def feedback(self, events: pd.DataFrame | Sequence[Mapping[str, Any] | tuple]) -> dict[Any, OnlineUser]:
        """Apply events in their order (per user); returns each touched user's new version.

        Atomic: every event is validated (:func:`parse_events`) before any is applied, and the
        new versions of all the call's users are computed before any is published; if one
        fails (ValueError naming the event, also for a state that would not be finite),
        nothing of the call is published or logged."""
        ev = parse_events(self.model, events)
        groups = list(ev.groupby("user", sort=False))
        for user, _ in groups:
            if user in self._pending:
                self._materialise(user)
        # the users' locks, in one global order (no deadlock between concurrent calls), held
        # while the new versions are computed and published
        locks = sorted(((type(u).__name__, str(u), self._lock(u)) for u, _ in groups), key=lambda t: t[:2])
        new: dict[Any, OnlineUser] = {}
        logs: list[tuple] = []
        for _, _, lk in locks:
            lk.acquire()
        try:
            for user, grp in groups:
                cols = [grp[c].to_numpy() for c in ("_idx", "item", "reward", "propensity", "timestamp", "position")]
                cur = self._states.get(user)
                for row, (idx, item, r, p, t, pos) in zip(grp.index, zip(*cols)):
                    cur = self._apply(cur, user, int(idx), float(r))
                    if not np.isfinite(cur.state.vector).all():
                        raise ValueError(f"feedback event {row} (user {user!r}, reward {float(r)!r}) would "
                                         f"make the user's state non-finite; nothing of this call was applied")
                    logs.append((user, item.item() if hasattr(item, "item") else item,
                                 float(r), float(p), float(t), int(pos)))
                new[user] = cur
            for user, cur in new.items():
                self._states[user] = cur  # atomic publish of each whole new version
            self._log.extend(logs)
        finally:
            for _, _, lk in reversed(locks):
                lk.release()
        return new

    def log(self) -> pd.DataFrame:
        """The feedback log so far (a copy), columns :data:`EVENT_COLUMNS`."""
        rows = list(self._log)
        return pd.DataFrame(rows, columns=list(EVENT_COLUMNS))


_STORE_GUARD = threading.Lock()


def store(model: Recommender, **options: Any) -> OnlineStore:
    """The model's default :class:`OnlineStore` (created on first use).

    ``options`` (``encode``, ``update``; see :class:`OnlineStore`) configure it; they can
    only be given before the first feedback (ValueError otherwise, if they differ).
    """
    st = getattr(model, "_online_store", None)
    if st is None or options:
        with _STORE_GUARD:
            st = getattr(model, "_online_store", None)
            if st is None:
                st = OnlineStore(model, **options)
                model._online_store = st
            elif options:
                same = all(getattr(st, k, None) == v for k, v in options.items())
                if not same:
                    if st._log or st._pending:
                        raise ValueError(f"the model already has feedback under {st.encode=}, {st.update=}; "
                                         f"cannot reconfigure to {options}")
                    st = OnlineStore(model, **options)
                    model._online_store = st
    return st


def feedback(model: Recommender, events: pd.DataFrame | Sequence[Mapping[str, Any] | tuple]) -> dict[Any, OnlineUser]:
    """``Recommender.feedback``: apply feedback events to the model's default store."""
    return store(model).feedback(events)


def current(model: Recommender, user: Any) -> OnlineUser | None:
    """The latest online version of ``user`` in the model's default store (None if none)."""
    return store(model).current(user)


def recommend(model: Recommender, user: Any, k: int = 10, **kwargs: Any) -> tuple[Recommendations, int]:
    """``model.recommend`` from the user's latest online state (with ``exclude_seen``, the
    default, its misses are excluded too); a user without feedback is served as the model
    would (``user_state`` for a known user; ``adapt([])`` for a new one).

    Returns ``(Recommendations, version)`` with the version of the state used (0: none).
    The state is read once: a feedback event published while the call runs is not seen
    (a known user at version 0 is served from ``user_state``, not by id, because
    ``model.recommend(user)`` would read the store again and could serve a newer version
    than the one returned).
    """
    st = store(model).current(user)
    if st is not None:
        if kwargs.get("exclude_seen", True):
            extra = st.exclude_ids()
            if extra:
                kwargs["exclude"] = list(kwargs.get("exclude") or []) + extra
        return model.recommend(st.state, k, **kwargs), st.version
    if _scalar_id(user) and model.user_map.position(user) >= 0:
        return model.recommend(model.user_state(user, task=kwargs.get("task")), k, **kwargs), 0
    return model.recommend(model.adapt([]), k, **kwargs), 0


def feedback_log(model: Recommender) -> pd.DataFrame:
    """The model's feedback log (DataFrame with :data:`EVENT_COLUMNS`)."""
    return store(model).log()


# ============================================================================ persistence

#: the tensors of a saved feedback log (one entry per event, in log order)
LOG_TENSORS = ("feedback.user", "feedback.item", "feedback.reward", "feedback.propensity",
               "feedback.timestamp", "feedback.position")


def log_to_file(model: Recommender) -> tuple[dict, dict | None]:
    """The model's feedback log as model-file parts: ``(tensors, meta)``.

    ``tensors``: ``feedback.user`` (int64 index into ``meta["users"]``), ``feedback.item``
    (int64 internal item index), ``feedback.reward`` / ``propensity`` / ``timestamp``
    (float64; NaN where not logged) and ``feedback.position`` (int64), one entry per event
    in log order; ``meta``: ``{"users": [the distinct user ids, int or str], "encode",
    "update"}`` (the store's options). ``({}, None)`` when the model has no feedback.
    Both are covered by the file's SHA-256 (:mod:`recmeta_sdk.model.io`).
    """
    st = getattr(model, "_online_store", None)
    if st is None or not st._log:
        return {}, None
    log = st.log()
    users = log["user"].to_numpy(dtype=object)
    distinct: dict = {}
    uidx = np.empty(len(users), np.int64)
    for j, u in enumerate(users):
        key = ("s", str(u)) if isinstance(u, str) else ("i", int(u))
        uidx[j] = distinct.setdefault(key, len(distinct))
    user_list = [k[1] for k in sorted(distinct, key=distinct.get)]
    items = model.item_map.to_index(log["item"].to_numpy())
    if (items < 0).any():  # cannot happen: parse_events checked every event
        raise ValueError("the feedback log has items unknown to the model")
    tensors = {
        "feedback.user": torch.from_numpy(uidx),
        "feedback.item": torch.from_numpy(items.astype(np.int64)),
        "feedback.reward": torch.from_numpy(np.array(log["reward"], dtype=np.float64)),
        "feedback.propensity": torch.from_numpy(np.array(log["propensity"], dtype=np.float64)),
        "feedback.timestamp": torch.from_numpy(np.array(log["timestamp"], dtype=np.float64)),
        "feedback.position": torch.from_numpy(np.array(log["position"], dtype=np.int64)),
    }
    return tensors, {"users": user_list, "encode": st.encode, "update": st.update}


def log_from_file(model: Recommender, tensors: dict, meta: dict | None, path: str | os.PathLike,
                  limits: LoadLimits | None = None) -> None:
    """Give ``model`` (just loaded) the online store saved by :func:`log_to_file`: its log
    and options, the users' states rebuilt from the log on first use (as after ``resume``).

    ``meta`` is the file's ``feedback`` entry (None: no log, as in a version-1 file);
    ``limits`` a :class:`~recmeta_sdk.model.io.LoadLimits` (default ``LoadLimits()``) bounding the
    number of events and users, the length of string ids and the rewards (divided by the
    model's reward scale). Raises :class:`~recmeta_sdk.model.io.ModelFileError`, naming the field,
    if the parts are inconsistent or out of bounds.
    """
    from ..model.io import DEFAULT_LIMITS, ModelFileError

    limits = DEFAULT_LIMITS if limits is None else limits
    present = [k for k in tensors if k.startswith("feedback.")]
    if meta is None:
        if present:
            raise ModelFileError(f"{path}: feedback tensors {present[:3]} without feedback metadata")
        return
    if not isinstance(meta, dict) or set(meta) != {"users", "encode", "update"}:
        raise ModelFileError(f"{path}: malformed feedback metadata")
    users = meta["users"]
    if (not isinstance(users, list) or len(users) > limits.max_users
            or not all((type(u) is int and -(2**63) <= u < 2**63)
                       or (type(u) is str and len(u) <= limits.max_id_chars) for u in users)
            or len({(type(u), u) for u in users}) != len(users)):
        raise ModelFileError(f"{path}: the feedback log's user ids must be distinct int64s or strings "
                             f"(at most {limits.max_users} of them)")
    if (not isinstance(meta["encode"], str) or not isinstance(meta["update"], str)
            or meta["encode"] not in ("positive", "all") or meta["update"] not in ("step", "readapt")):
        raise ModelFileError(f"{path}: feedback options {meta['encode']!r:.40} / {meta['update']!r:.40} unknown")
    if sorted(present) != sorted(LOG_TENSORS):
        raise ModelFileError(f"{path}: feedback tensors {sorted(present)[:8]} do not match {sorted(LOG_TENSORS)}")
    want = {"feedback.user": torch.int64, "feedback.item": torch.int64, "feedback.position": torch.int64}
    n = tensors["feedback.user"].numel()
    if n > limits.max_feedback_events:
        raise ModelFileError(f"{path}: the feedback log has {n} events (limit max_feedback_events="
                             f"{limits.max_feedback_events})")
    for name in LOG_TENSORS:
        t = tensors[name]
        if t.dim() != 1 or t.numel() != n or t.dtype != want.get(name, torch.float64):
            raise ModelFileError(f"{path}: tensor {name} has shape {tuple(t.shape)} {t.dtype}; "
                                 f"expected ({n},) {want.get(name, torch.float64)}")
    u = tensors["feedback.user"].numpy()
    it = tensors["feedback.item"].numpy()
    if n == 0 or u.min() < 0 or u.max() >= len(users) or it.min() < 0 or it.max() >= model.n_items:
        raise ModelFileError(f"{path}: the feedback log's user or item indices are out of range")
    reward = tensors["feedback.reward"].numpy()
    scaled = reward / model._reward_scale
    if not np.isfinite(scaled).all() or np.abs(scaled).max() > limits.max_abs_weight:
        raise ModelFileError(f"{path}: feedback.reward holds {reward[~np.isfinite(scaled) | (np.abs(scaled) > limits.max_abs_weight)][0]!r}: "
                             f"rewards must be finite and at most {limits.max_abs_weight:g} reward scales")
    ts = tensors["feedback.timestamp"].numpy()
    if np.isinf(ts).any():
        raise ModelFileError(f"{path}: feedback.timestamp holds an infinite timestamp")
    user_col = np.empty(n, dtype=object)
    user_col[:] = [users[j] for j in u.tolist()]
    log = pd.DataFrame({"user": user_col, "item": model.item_ids[it],
                        "reward": reward,
                        "propensity": tensors["feedback.propensity"].numpy(),
                        "timestamp": ts,
                        "position": tensors["feedback.position"].numpy()})
    try:
        model._online_store = OnlineStore(model, encode=meta["encode"], update=meta["update"], log=log)
    except (TypeError, ValueError, OverflowError) as e:
        raise ModelFileError(f"{path}: invalid feedback log ({e})") from None


# ============================================================================ exploration

def slate_propensity(propensities: ArrayLike,
                     explore: str = "sample") -> np.ndarray:
    """Probability of the whole ranked slate from the per-item propensities.

    ``explore="sample"``: the items' ``pi(a|s)`` from ``recommend(..., explore="sample")``
    (Plackett-Luce: ``prod_j p_j / (1 - sum_{i<j} p_i)``); ``"epsilon"``: the conditional
    per-position probabilities of :func:`epsilon_slate` (their product). Zero entries
    (padding) are skipped. Works on (k,) or (B, k); float64.
    """
    p = np.asarray(propensities, dtype=np.float64)
    if p.ndim not in (1, 2):
        raise ValueError(f"propensities must be (k,) or (B, k), got shape {p.shape}")
    if not np.isfinite(p).all() or (p < 0).any() or (p > 1).any():
        raise ValueError("propensities must lie in [0, 1]")
    if explore not in ("sample", "epsilon"):
        raise ValueError(f"explore must be 'sample' or 'epsilon', got {explore!r}")
    q = np.atleast_2d(p)
    valid = q > 0
    if explore == "sample":
        before = np.cumsum(q, axis=1) - q
        cond = np.where(valid, q / np.maximum(1.0 - before, 1e-300), 1.0)
    else:
        cond = np.where(valid, q, 1.0)
    out = cond.prod(axis=1)
    return out if p.ndim == 2 else out[0]


def epsilon_slate(model: Recommender, state: UserState | int | np.integer | str, k: int, *,
                  epsilon: float, seed: int, **kwargs: Any) -> Recommendations:
    """An epsilon-greedy slate for one user, with the probability of each pick.

    Position by position: with probability ``1 - epsilon`` the best remaining item of the
    greedy ranking (``model.recommend(state, n_items, **kwargs)``: the same exclusions and
    candidates), else a uniformly random remaining eligible item. ``propensities[j]`` is the
    probability of the item at position ``j`` given the items above it:
    ``(1 - epsilon) [best remaining] + epsilon / n_remaining``; the slate's probability is
    their product (:func:`slate_propensity` with ``explore="epsilon"``). Randomness comes
    only from ``numpy.random.default_rng(seed)``: same seed and inputs, same slate.

    Returns :class:`~recmeta_sdk.api.Recommendations` with ``propensities``.
    """
    if not isinstance(epsilon, (int, float)) or isinstance(epsilon, bool) or not 0.0 <= epsilon <= 1.0:
        raise ValueError(f"epsilon must be a number in [0, 1], got {epsilon!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"epsilon_slate needs an int seed, got {seed!r}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if not (isinstance(state, UserState) or _scalar_id(state)):
        raise TypeError(f"epsilon_slate serves one user (a UserState or a user id), got {type(state).__name__}")
    for bad in ("explore", "diversity", "explain"):
        if kwargs.get(bad):
            raise ValueError(f"epsilon_slate cannot be combined with {bad}=")
    full = model.recommend(state, model.n_items, **kwargs)
    ranked = np.flatnonzero(full.valid)
    ids_all, sc_all = full.ids[ranked], full.scores[ranked]
    rng = np.random.default_rng(int(seed))
    avail = list(range(len(ranked)))  # positions in the greedy ranking still available
    pick_pos, props = [], []
    eps = float(epsilon)
    for _ in range(min(int(k), len(ranked))):
        n = len(avail)
        if rng.random() < eps:
            j = int(rng.integers(n))
        else:
            j = 0  # the best remaining
        props.append((1.0 - eps) * (j == 0) + eps / n)
        pick_pos.append(avail.pop(j))
    m = len(pick_pos)
    ids = np.empty(int(k), dtype=full.ids.dtype)
    if np.issubdtype(ids.dtype, np.integer):
        ids[:] = -1
    else:
        ids[:] = None
    scores = np.full(int(k), -np.inf, np.float32)
    prop = np.zeros(int(k), np.float32)
    valid = np.zeros(int(k), bool)
    ids[:m] = ids_all[pick_pos]
    scores[:m] = sc_all[pick_pos]
    prop[:m] = np.asarray(props, np.float32)
    valid[:m] = True
    return Recommendations(ids, scores, valid, prop, None)


# ============================================================================ resume

def resume_train(model: Recommender, interactions: pd.DataFrame | None = None, *,
                 config: Config | dict[str, Any] | None = None, progress: bool | None = None) -> Recommender:
    """An incremental off-policy update of the shared weights (``train(..., resume=model)``).

    The training rows are ``interactions`` (a DataFrame with :data:`EVENT_COLUMNS`;
    default: the model's feedback log). The rows with a positive reward form each user's
    time-ordered history (support and query sets are cut from it as in
    :mod:`recmeta_sdk.training.loop`); the REINFORCE term of the objective uses the logged
    ``propensity`` as the behaviour probability beta (rows with a zero reward carry no
    REINFORCE gradient, so dropping them changes nothing but the encoder input, which reads
    positive interactions only, as in serving with ``encode="positive"``). Training starts
    from a copy of the model's weights; ``config`` overrides the model's config for this
    update (default: ``epochs=5`` and a quarter of the model's learning rate). Users need
    at least two positive rows to be trained on.

    Returns a new Recommender (the old one is unchanged: swap the reference), carrying the
    old feedback log; its users' online states are rebuilt on first use.
    """
    from ..model.network import Config
    from ..training.loop import fit, prepare

    log = feedback_log(model) if interactions is None else interactions
    if not isinstance(log, pd.DataFrame):
        raise TypeError(f"interactions must be a DataFrame of feedback events, got {type(log).__name__}")
    ev = parse_events(model, log)
    if ev["propensity"].isna().any():
        i = int(np.flatnonzero(ev["propensity"].isna().to_numpy())[0])
        raise ValueError(f"resume needs a logged propensity on every row; row {i} has none")
    pos = ev[ev["reward"] > 0]
    counts = pos.groupby("user").size() if len(pos) else pd.Series(dtype=int)
    if not len(counts) or counts.max() < 2:
        raise ValueError("resume: no user has 2 or more positively rewarded rows; nothing to train on")
    base = model.config.to_dict()
    over = {"epochs": 5, "lr": model.config.lr * 0.25}
    if config is not None:
        if isinstance(config, Config):
            config = config.to_dict()
        if not isinstance(config, dict):
            raise TypeError(f"config must be a dict or Config, got {type(config).__name__}")
        over.update(config)
    cfg = Config.from_dict({**base, **over})
    for name in ("dim", "hidden", "encoder", "layers", "heads", "seq_len"):
        if getattr(cfg, name) != getattr(model.config, name):
            raise ValueError(f"resume cannot change config.{name} ({getattr(model.config, name)!r} -> "
                             f"{getattr(cfg, name)!r})")
    ts = pos["timestamp"].to_numpy(dtype=np.float64)
    frame = pd.DataFrame({"user": pos["user"].to_numpy(),
                          "item": pos["item"].to_numpy(), "reward": pos["reward"].to_numpy(np.float32),
                          "propensity": pos["propensity"].to_numpy(np.float32),
                          "timestamp": np.where(np.isfinite(ts), ts, 0.0)})
    prep = prepare(frame, model.item_ids)
    prep.rewards = prep.rewards / model._reward_scale
    net = copy.deepcopy(model._net)
    for p in net.parameters():
        p.requires_grad_(True)
    hist = fit(net, prep, cfg, None, progress=progress)
    logger.info("resume: %d rows, %d users, %.1fs", len(frame), len(prep.user_ids), hist["seconds"])
    new = type(model)(net, cfg, model.item_ids, model.user_ids, model._hist_offsets, model._hist_items,
                      model._hist_rewards, model._item_count, model._item_schema, model._user_schema,
                      model._uf_off, model._uf_idx, model._reward_scale)
    old = store(model)
    carried = old.log()
    new._online_store = OnlineStore(new, encode=old.encode, update=old.update,
                                    log=carried if len(carried) else None)
    return new
