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
Every event also adds to that item bias its **in-session evidence** (weight
``config.feedback_evidence``, 0 turns it off): its residual ``y - m`` (the normalised reward
minus the user's running mean reward before it, prior 0.5) times a kernel on the model's item
vectors, ``exp((cos(v_i, v_j) - 1) / config.feedback_bandwidth)``, decaying by
``config.feedback_evidence_decay`` per later event, so a click raises the clicked item's
neighbours in the very next slate and a miss lowers them (the world model's ``Planner`` does
the same on its own item vectors).
With ``config.feedback_linear > 0`` (off by default) and a model whose items have dense side
features, the item bias also carries the **linear evidence**: the posterior mean of the user's
Bayesian ridge regression of its rewards on the items' features, the item vectors' principal
directions and the model's cold score (the prior: ``posterior.LINEAR_PRIOR`` on it), plus a
confidence bonus (LinUCB's, width ``posterior.LINEAR_UCB``), a closed-form update of
O(rank^2) numbers per event (:class:`~recmeta_sdk.online.posterior.ItemBasis`).

A hit's encoder pass and gradient step are **deferred**: the event records them
(:attr:`OnlineUser.pending`) and they are computed, with the item bias, at the first read of
the state (normally the next ``recommend``), bit for bit as at the event; a feedback event
itself costs validation and a few appends (``bench/bench_feedback.py``).
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

Storage
-------
The users' latest versions live in the store's state backend (:mod:`recmeta_sdk.online.store`:
the default :class:`~recmeta_sdk.online.store.MemoryBackend` is bounded, LRU by users and
bytes with an optional TTL, and counts what it evicts; a host may pass its own). An
:class:`OnlineUser` holds O(history + d) numbers, its online item bias in sparse form
(:class:`~recmeta_sdk.online.posterior.SparseCorrection`); its dense :attr:`OnlineUser.state`
is built when served and kept in a bounded cache of served states. A user whose entry is gone
is served as if it had no feedback. The store reads the model only through
:class:`recmeta_sdk.model.view.ModelView`.

Concurrency
-----------
A user's state is an immutable :class:`OnlineUser`; a writer computes the next version
and publishes it with one ``backend.put`` (for the default backend, one item assignment
under its lock), so a reader (``current``, ``recommend``) takes no user lock and sees a whole
version, old or new, never a mix. Writers of the same user serialise on the user's lock (one
of a fixed set of lock stripes the user ids hash onto, so the locks do not grow with the
users; no update is lost and the per-user order of the feedback log is the order of
application); writers of users on other stripes run in parallel. The model itself (weights,
item vectors) is never changed: ``train(..., resume=model)`` builds a new model, the host
swaps its reference.

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
import itertools
import logging
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

import numpy as np
import pandas as pd
import torch

from ..model.state import Recommendations, UserState
from . import posterior
from .posterior import SparseCorrection
from .store import MemoryBackend, StateBackend

if TYPE_CHECKING:  # names used in annotations only
    import os

    from numpy.typing import ArrayLike

    from ..model.io import LoadLimits
    from ..model.network import Config

#: what this layer serves: a model offering :class:`recmeta_sdk.model.view.ModelView` (the
#: facade's ``Recommender`` implements it); the online layer reads nothing else of the model
Recommender = Any

logger = logging.getLogger("recmeta")

__all__ = [
    "EVENT_COLUMNS",
    "OnlineStore",
    "OnlineUser",
    "check_events",
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
_EVENT_SET = frozenset(EVENT_COLUMNS)


# ============================================================================ events

def _scalar_id(x) -> bool:
    return isinstance(x, (int, np.integer, str)) and not isinstance(x, bool)


_I64 = (-(2 ** 63), 2 ** 63)
_F32_MAX = float(np.finfo(np.float32).max)


def _is_num(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))


def _fast_events(model: Recommender, events: Any) -> list[tuple] | None:
    """The events of a list of plain tuples / dicts as ``(row, user, item, item index, reward,
    propensity, timestamp, position)`` rows without pandas (the per-event fast path), or None
    when anything is not plainly valid: the caller then takes :func:`parse_events`, which gives
    the same rows for valid input and the documented error for invalid input."""
    if not isinstance(events, (list, tuple)) or not events:
        return None
    first = events[0]
    as_dict = isinstance(first, dict)
    if not as_dict and not isinstance(first, (tuple, list)):
        return None
    out = []
    nan = float("nan")
    for row, e in enumerate(events):
        if as_dict:
            if type(e) is not dict or not e.keys() <= _EVENT_SET or "user" not in e or "item" not in e \
                    or "reward" not in e:
                return None
            user, item, r = e["user"], e["item"], e["reward"]
            p, t, pos = e.get("propensity"), e.get("timestamp"), e.get("position")
        else:
            if not isinstance(e, (tuple, list)) or not 3 <= len(e) <= 6:
                return None
            user, item, r = e[0], e[1], e[2]
            p = e[3] if len(e) > 3 else None
            t = e[4] if len(e) > 4 else None
            pos = e[5] if len(e) > 5 else None
        # ids: plain ints (int64 range) or strings, as a DataFrame column of them gives
        if isinstance(user, np.integer):
            user = int(user)
        elif type(user) is int:
            if not _I64[0] <= user < _I64[1]:
                return None
        elif type(user) is not str:
            return None
        if isinstance(item, np.integer):
            item = int(item)
        elif type(item) is int:
            if not _I64[0] <= item < _I64[1]:
                return None
        elif type(item) is not str:
            return None
        idx = model.item_position(item)
        if idx < 0 or not _is_num(r):
            return None
        r = float(r)
        if math.isnan(r) or abs(r) > _F32_MAX:  # (pandas' path decides what rounds to float32's max)
            return None
        if p is None:
            p = nan
        elif not _is_num(p):
            return None
        else:
            p = float(p)
            if not math.isnan(p) and not 0.0 < p <= 1.0:
                return None
        if t is None:
            t = nan
        elif not _is_num(t):
            return None
        else:
            t = float(t)
            if not math.isnan(t) and not math.isfinite(t):
                return None
        if pos is None:
            pos = 0
        elif isinstance(pos, (int, np.integer)) and not isinstance(pos, (bool, np.bool_)):
            pos = int(pos)
        elif isinstance(pos, (float, np.floating)) and (math.isnan(pos) or float(pos).is_integer()):
            pos = 0 if math.isnan(pos) else int(pos)
        else:
            return None
        if pos < 0:
            return None
        out.append((row, user, item, idx, r, p, t, pos))
    return out


def _event_rows(model: Recommender, events: Any) -> list[tuple]:
    """Validated events as rows ``(row, user, item, item index, reward, propensity, timestamp,
    position)``: the fast path for plain tuples / dicts, else :func:`parse_events`."""
    rows = _fast_events(model, events)
    if rows is not None:
        return rows
    ev = parse_events(model, events)
    cols = [ev[c].to_numpy() for c in ("user", "item", "_idx", "reward", "propensity", "timestamp", "position")]
    return [(row, u, it.item() if hasattr(it, "item") else it, int(i), float(r), float(p), float(t), int(pos))
            for row, (u, it, i, r, p, t, pos) in enumerate(zip(*cols))]


def check_events(model: Recommender, events: pd.DataFrame | Sequence[Mapping[str, Any] | tuple]) -> int:
    """Validate feedback events as :func:`feedback` would, without applying them; returns their
    number. Plain tuples / dicts are checked without pandas (the per-event fast path); anything
    else, or anything not plainly valid, goes through :func:`parse_events`, whose ``ValueError``
    / ``TypeError`` names the bad field (a web service validates a request this way before it
    logs it)."""
    rows = _fast_events(model, events)
    if rows is not None:
        return len(rows)
    return len(parse_events(model, events))


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
    idx = model.item_positions(items) if n else np.zeros(0, np.int64)
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

@dataclass(frozen=True, eq=False)
class OnlineUser:
    """One published version of a user's online state (never changed once published).

    Attributes
    ----------
    user : the user's id
    version : number of feedback events applied
    vector, base : (d,) float32, the adapted state h' and the encoder state h
    enc_items, enc_rewards : the encoder history (internal indices, rewards)
    gamma, delta : (d,) float32, the user's fast parameters
    known : whether the user is a training user of the model
    seen, seen_rewards : every item interacted with (training history and all feedback)
    n_prior : how many leading items of ``seen`` are the training history (a known user's),
        not feedback
    steps : adaptation steps taken
    correction : the user's online item bias in sparse form
        (:class:`~recmeta_sdk.online.posterior.SparseCorrection`: the reward posterior's
        coefficients on the items its feedback touched and the in-session evidence's), or None
        (no feedback yet, or ``config.feedback_posterior`` and ``config.feedback_evidence`` 0)
    stamp : a number unique to this version within its store (tells versions apart across an
        eviction, after which version numbers start again)
    pending : the encoder-history lengths of the gradient steps this version has taken but
        not yet computed (see below)

    **Deferred computation.** ``vector``, ``base``, ``gamma``, ``delta`` and ``correction`` are
    pure functions of the version's fields and the model. A hit event with ``update="step"``
    (the default) records its step in ``pending`` instead of running the encoder and the
    gradient step at once, and the correction is computed from ``seen`` when first read; both
    happen at the first read of those attributes (normally the next ``recommend``), are cached
    in the version, and give the same numbers, bit for bit, as computing them at the event
    (the steps replay in order from the stored ``_gamma`` / ``_delta``). So a feedback event
    costs validation and a few array appends; at most :data:`MAX_PENDING` steps wait (the
    event that would exceed it computes them).

    :attr:`state` is the :class:`~recmeta_sdk.model.state.UserState` to pass to ``recommend``:
    built on demand (its ``item_bias`` is the dense form of ``correction``) and kept in the
    store's bounded cache of served states, so the store itself holds O(history + d) numbers per
    user, not O(catalogue). Its ``history`` is the history the model reads (with
    ``encode="positive"``: the training history and the positively rewarded feedback), so
    ``exclude_seen`` removes those items; the misses are in ``seen`` (pass :meth:`exclude_ids`
    as ``exclude``, as :func:`recommend` does).
    """

    user: Any
    version: int
    _vector: np.ndarray
    _base: np.ndarray
    enc_items: np.ndarray
    enc_rewards: np.ndarray
    _gamma: np.ndarray
    _delta: np.ndarray
    known: bool
    seen: np.ndarray
    seen_rewards: np.ndarray
    n_prior: int = 0
    steps: int = 0
    stamp: int = 0
    # the OnlineStore that serves this version (not pickled: a backend may serialise values;
    # the store binds what it reads back)
    _owner: Any = field(default=None, repr=False, compare=False)
    pending: tuple = ()

    def __getstate__(self) -> dict:
        d = dict(self.__dict__)
        d["_owner"] = None
        return d

    def __setstate__(self, d: dict) -> None:
        self.__dict__.update(d)

    def _bound(self):
        if self._owner is None:
            raise RuntimeError("this OnlineUser is not bound to an OnlineStore (read it through the store)")
        return self._owner

    def _resolved(self) -> tuple:
        """``(vector, base, gamma, delta)`` after the pending steps (computed once, cached)."""
        if not self.pending:
            return self._vector, self._base, self._gamma, self._delta
        out = self.__dict__.get("_resolved_state")
        if out is None:
            out = self._bound()._replay(self)
            object.__setattr__(self, "_resolved_state", out)  # one assignment: readers see all or nothing
        return out

    @property
    def resolved(self) -> bool:
        """Whether the state vectors are computed (no pending steps, or computed since)."""
        return not self.pending or "_resolved_state" in self.__dict__

    @property
    def vector(self) -> np.ndarray:
        """(d,) float32, the adapted state h'."""
        return self._resolved()[0]

    @property
    def base(self) -> np.ndarray:
        """(d,) float32, the encoder state h."""
        return self._resolved()[1]

    @property
    def gamma(self) -> np.ndarray:
        """(d,) float32, the user's fast parameter gamma."""
        return self._resolved()[2]

    @property
    def delta(self) -> np.ndarray:
        """(d,) float32, the user's fast parameter delta."""
        return self._resolved()[3]

    @property
    def correction(self) -> Optional[SparseCorrection]:
        """The sparse online item bias (see the class doc); computed on first read."""
        d = self.__dict__
        if "_correction" not in d:
            n0 = self.n_prior
            corr = self._bound()._correction(self.seen[n0:], self.seen_rewards[n0:], self.known)
            object.__setattr__(self, "_correction", corr)
        return d["_correction"]

    @property
    def nbytes(self) -> int:
        """Bytes held by this version's arrays (what a store keeps per user), counting what it
        computes when read at its size (the state vectors after pending steps, the correction's
        coefficients), so the number is the same before and after they are computed."""
        n = sum(a.nbytes for a in (self._vector, self._base, self.enc_items, self.enc_rewards, self._gamma,
                                   self._delta, self.seen, self.seen_rewards))
        if self.pending:
            n += 8 * len(self.pending) + sum(a.nbytes for a in (self._vector, self._base, self._gamma, self._delta))
        corr = self.__dict__.get("_correction", False)
        if corr is False:
            owner = self._owner
            n += 0 if owner is None else owner._correction_nbytes(self)
        elif corr is not None:
            n += corr.nbytes
        return int(n)

    @property
    def state(self) -> UserState:
        """The :class:`~recmeta_sdk.model.state.UserState` of this version (see the class doc)."""
        return self._bound()._state_of(self)

    @property
    def seen_ids(self) -> tuple:
        """External ids of every item the user interacted with (training and feedback)."""
        return _ext(self._bound().model, self.seen)

    def exclude_ids(self) -> list:
        """The seen items that ``state.history`` does not already exclude (the misses)."""
        extra = np.setdiff1d(self.seen, self.enc_items)
        if not len(extra):
            return []
        return list(_ext(self._bound().model, extra))


#: the most gradient steps an OnlineUser defers (see OnlineUser): the event that would defer
#: one more computes them, so serving never replays more than this many
MAX_PENDING = 16


def _ext(model, idx: np.ndarray) -> tuple:
    return tuple(x.item() if hasattr(x, "item") else x for x in model.item_ids[idx])


#: the largest |reward| / reward scale a feedback event may have: the model file's bound
#: (``LoadLimits.max_abs_weight``), so that every accepted log can be saved and loaded again, and
#: a deferred step (see :class:`OnlineUser`) stays finite
MAX_ABS_REWARD = 1e6
#: default bytes of served states (dense item biases) an OnlineStore keeps for its hot users
SERVED_CACHE_BYTES = 64 << 20
_N_STRIPES = 64  # per-user write locks: users hash onto this many locks (bounded, whatever the user count)


class OnlineStore:
    """Per-user online states and the feedback log of one model (see the module doc).

    Parameters
    ----------
    model : a :class:`~recmeta_sdk.model.view.ModelView` (a ``Recommender``)
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
    backend : a :class:`~recmeta_sdk.online.store.StateBackend` holding the users' latest
        versions; default a new :class:`~recmeta_sdk.online.store.MemoryBackend` (bounded:
        1M users, 1 GiB, LRU). An evicted user is served as if it had no feedback.
    served_cache_bytes : int, default :data:`SERVED_CACHE_BYTES`
        Bytes of materialised :class:`UserState` s (their dense item bias and wide part) kept
        for the most recently served users (at least one).
    """

    def __init__(self, model: Recommender, *, encode: str = "positive", update: str = "step",
                 log: pd.DataFrame | None = None, known_users: bool = True,
                 backend: StateBackend | None = None, served_cache_bytes: int = SERVED_CACHE_BYTES):
        if encode not in ("positive", "all"):
            raise ValueError(f"encode must be 'positive' or 'all', got {encode!r}")
        if update not in ("step", "readapt"):
            raise ValueError(f"update must be 'step' or 'readapt', got {update!r}")
        if not isinstance(known_users, bool):
            raise TypeError(f"known_users must be a bool, got {type(known_users).__name__}")
        if backend is None:
            backend = MemoryBackend()
        missing = [name for name in ("get", "put", "delete", "__len__", "items") if not callable(getattr(backend, name, None))]
        if missing:
            raise TypeError(f"backend must implement the StateBackend methods; {type(backend).__name__} lacks {missing}")
        if isinstance(served_cache_bytes, bool) or not isinstance(served_cache_bytes, int) or served_cache_bytes < 0:
            raise ValueError(f"served_cache_bytes must be an int >= 0, got {served_cache_bytes!r}")
        self.model = model
        self.encode = encode
        self.update = update
        self.known_users = known_users
        self.backend = backend
        self._stripes = [threading.Lock() for _ in range(_N_STRIPES)]
        self._stamps = itertools.count(1)
        self._log: list[tuple] = []
        self._log_lock = threading.Lock()
        self._pending: dict[Any, tuple[np.ndarray, np.ndarray]] = {}
        # user -> (stamp, UserState, bytes): the served states of the hottest users
        self._served: OrderedDict = OrderedDict()
        self._served_bytes = 0
        self._served_max = int(served_cache_bytes)
        self._served_lock = threading.Lock()
        if log is not None and len(log):
            ev = parse_events(model, log)
            for u, grp in ev.groupby("user", sort=False):
                self._pending[u] = (grp["_idx"].to_numpy(), grp["reward"].to_numpy())
            self._log.extend(ev[list(EVENT_COLUMNS)].itertuples(index=False, name=None))
        self._max_abs_reward = MAX_ABS_REWARD * float(model.reward_scale)
        cfg = model.config
        net = model.network
        with torch.no_grad():
            if cfg.meta == "fomaml":
                self._lr = (torch.exp(net.log_lr[0]).clone(), torch.exp(net.log_lr[1]).clone())
            else:
                lr = torch.tensor(float(cfg.inner_lr))
                self._lr = (lr, lr)

    # ---------------------------------------------------------------- low level
    def _lock(self, user) -> threading.Lock:
        return self._stripes[hash(user) % _N_STRIPES]

    def _support(self, enc_items, enc_rewards):
        rows = torch.zeros(len(enc_items), dtype=torch.int64)
        w = torch.from_numpy(np.maximum(enc_rewards, 0.0).astype(np.float32)) / self.model.reward_scale
        return rows, torch.from_numpy(enc_items.astype(np.int64)), w

    def _adapt(self, h, enc_items, enc_rewards, steps, known):
        m = self.model
        rows, it, w = self._support(enc_items, enc_rewards)
        lr = None if m.config.meta == "fomaml" else m.config.inner_lr
        with torch.no_grad():
            return m.network.adapt_phi(h, m.item_table, rows, it, w, steps, lr=lr,
                                       **self._offset_kw(rows, it, known))

    def _ufeat(self, user, known) -> np.ndarray:
        if not known:
            return np.zeros(0, np.int64)
        return self.model.user_feature_rows(self.model.user_position(user))

    def _publish(self, user, version, h, gamma, delta, seen, seen_r, enc_items, enc_rewards, known, steps,
                 n_prior=0) -> OnlineUser:
        with torch.no_grad():
            hp = self.model.network.apply_phi(h, gamma, delta)
        return OnlineUser(user, int(version), hp[0].numpy().copy(), h[0].numpy().copy(), enc_items, enc_rewards,
                          gamma[0].detach().numpy().copy(), delta[0].detach().numpy().copy(), known, seen, seen_r,
                          int(n_prior), int(steps), next(self._stamps), self)

    def _correction(self, items: np.ndarray, rewards: np.ndarray, known: bool) -> SparseCorrection | None:
        """The user's adapted item-bias vector from its feedback events (hits and misses), in
        sparse form: the reward posterior's ``kappa * (mu + correction)`` for a new user,
        ``kappa * correction`` for a known one (:mod:`recmeta_sdk.online.posterior`), plus the
        in-session evidence (``config.feedback_evidence``); None when both are off or there is
        no feedback yet."""
        m = self.model
        cfg = m.config
        ev_w = float(getattr(cfg, "feedback_evidence", 0.0))
        lin_w = float(getattr(cfg, "feedback_linear", 0.0))
        if (cfg.feedback_posterior <= 0 and ev_w <= 0 and lin_w <= 0) or len(items) == 0:
            return None
        items, rewards = items[-cfg.feedback_window:], rewards[-cfg.feedback_window:]
        y = np.maximum(np.asarray(rewards, np.float64), 0.0) / m.reward_scale
        sc = posterior.score_scale(m)
        if cfg.feedback_posterior > 0:
            obs, coef = posterior.of_model(m).coefficients(items, y, float(cfg.feedback_reg))
            scale, with_prior = float(cfg.feedback_posterior) * sc, not known
        else:
            obs, coef, scale, with_prior = np.zeros(0, np.int64), np.zeros(0), 0.0, False
        kw = {}
        if ev_w > 0:
            n = posterior.evidence_window(float(cfg.feedback_evidence_decay), cfg.feedback_window)
            ev_items, ev_coef = posterior.evidence_coefficients(items, y, float(cfg.feedback_evidence_decay), n)
            kw.update(ev_items=ev_items, ev_coef=ev_coef, ev_scale=ev_w * sc)
        if lin_w > 0 and posterior.has_dense_features(m):
            basis = self._basis()
            reg = posterior.LINEAR_REG
            w0 = np.zeros(basis.rank)
            w0[basis.n_basis] = posterior.LINEAR_PRIOR
            w = basis.coefficients(items, y, reg, w0)
            kw.update(lin_coef=w, lin_scale=lin_w * sc)
            ucb = posterior.LINEAR_UCB
            if ucb > 0:
                kw.update(lin_inv=ucb * ucb * basis.inverse(items, reg))
        return SparseCorrection(obs, coef, scale, with_prior, **kw)

    def _basis(self) -> posterior.ItemBasis:
        """The model's :class:`~recmeta_sdk.online.posterior.ItemBasis` of the linear evidence."""
        return posterior.basis_of_model(self.model, posterior.LINEAR_RANK)

    def _correction_nbytes(self, ou: OnlineUser) -> int:
        """``ou.correction.nbytes`` without computing the correction."""
        cfg = self.model.config
        ev_w = float(getattr(cfg, "feedback_evidence", 0.0))
        fb = ou.seen[ou.n_prior:]
        if (cfg.feedback_posterior <= 0 and ev_w <= 0 and float(getattr(cfg, "feedback_linear", 0.0)) <= 0) \
                or len(fb) == 0:
            return 0
        fb = fb[-cfg.feedback_window:]
        n = 16 * len(np.unique(fb)) if cfg.feedback_posterior > 0 else 0
        if ev_w > 0:
            w = posterior.evidence_window(float(cfg.feedback_evidence_decay), cfg.feedback_window)
            n += 16 * len(np.unique(fb[-w:]))
        if float(getattr(cfg, "feedback_linear", 0.0)) > 0 and posterior.has_dense_features(self.model):
            r = self._basis().rank
            n += 8 * r + (8 * r * r if posterior.LINEAR_UCB > 0 else 0)
        return n

    def _dense_bias(self, corr: SparseCorrection) -> np.ndarray:
        """The (N,) float32 item bias of a :class:`SparseCorrection` (both parts)."""
        m = self.model
        lin = corr.lin_scale != 0.0 and len(corr.lin_coef)
        if (corr.ev_scale == 0.0 or not len(corr.ev_items)) and not lin:
            if corr.scale == 0.0 and not corr.with_prior:
                return np.zeros(m.n_items, np.float32)
            return posterior.of_model(m).dense(corr)
        ev = np.zeros(m.n_items)
        if corr.ev_scale != 0.0 and len(corr.ev_items):
            ev = corr.ev_scale * posterior.kernel_of_model(m).apply(corr.ev_items, corr.ev_coef)
        if lin:
            basis = self._basis()
            ev = ev + corr.lin_scale * basis.apply(corr.lin_coef)
            if corr.lin_inv is not None:
                ev = ev + corr.lin_scale * basis.bonus(corr.lin_inv)
        if corr.scale == 0.0 and not corr.with_prior:
            return ev.astype(np.float32)
        return (posterior.of_model(m).dense(corr).astype(np.float64) + ev).astype(np.float32)

    def _offset_kw(self, rows, items, known) -> dict:
        """The wide (item-to-item) part of the logits, for models that have one (a new user's
        weight for an unknown user, see :meth:`RecMetaNet.wide_alpha`); computed per event for
        the support gradient, never stored."""
        off = self.model.history_offset(items.numpy(), new=not known)
        return {} if off is None else {"offset": off}

    def _prior(self, user) -> OnlineUser | None:
        """Version 0 of a known user (its training state), or None for a new user."""
        m = self.model
        if not self.known_users:
            return None
        u = m.user_position(user)
        if u < 0:
            return None
        items, rews = m.user_history(u)
        items = items.astype(np.int64)
        rews = rews.astype(np.float32)
        h = m.encode_history(items, m.user_feature_rows(u))
        steps = m.config.inner_steps
        g, d = self._adapt(h, items, rews, steps, True)
        return self._publish(user, 0, h, g, d, items, rews, items, rews, True, steps, len(items))

    def _apply(self, cur: OnlineUser | None, user, idx: int, reward: float) -> OnlineUser:
        """The next version of ``user`` after one event (pure function of cur and the event).

        A user's first event (``adapt`` of it, or the known user's training state and a step)
        and ``update="readapt"`` are computed at once; a step of ``update="step"`` is deferred
        (recorded in ``pending``, computed when the state is read; see :class:`OnlineUser`)."""
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
            known, version, steps0 = cur.known, cur.version, cur.steps
        seen = np.append(seen, np.int64(idx))
        seen_r = np.append(seen_r, np.float32(reward)).astype(np.float32)
        step = self.encode == "all" or reward > 0
        if step:
            enc_i = np.append(enc_i, np.int64(idx))
            enc_r = np.append(enc_r, np.float32(reward)).astype(np.float32)
        if not new_user:
            # the state vectors to start from: cur's computed ones if it has them, else its
            # stored ones and its pending steps
            if cur.resolved:
                vec, base, g, d = cur._resolved()
                pend = ()
            else:
                vec, base, g, d, pend = cur._vector, cur._base, cur._gamma, cur._delta, cur.pending
        if not new_user and not step:
            # a miss (encode="positive"): not read by the encoder, and its support gradient is
            # zero; seen grows and the item bias (computed when read) changes
            return replace(cur, version=version + 1, seen=seen, seen_rewards=seen_r, stamp=next(self._stamps),
                           _owner=self, _vector=vec, _base=base, _gamma=g, _delta=d, pending=pend)
        if new_user or self.update == "readapt":
            h = m.encode_history(enc_i, self._ufeat(user, known))
            steps = m.config.inner_steps
            g, d = self._adapt(h, enc_i, enc_r, steps, known)
            return self._publish(user, version + 1, h, g, d, seen, seen_r, enc_i, enc_r, known, steps,
                                 0 if new_user else cur.n_prior)
        out = OnlineUser(user, version + 1, vec, base, enc_i, enc_r, g, d, known, seen, seen_r, cur.n_prior,
                         steps0 + 1, next(self._stamps), self, pend + (len(enc_i),))
        if len(out.pending) >= MAX_PENDING:
            out._resolved()
        return out

    def _replay(self, ou: OnlineUser) -> tuple:
        """``(vector, base, gamma, delta)`` of a version with pending steps: each step, in order,
        is what the event computed before steps were deferred (the encoder state of the history
        up to it, one step of the support loss from the fast parameters so far)."""
        m = self.model
        g = torch.from_numpy(ou._gamma)[None]
        d = torch.from_numpy(ou._delta)[None]
        uf = self._ufeat(ou.user, ou.known)
        h = None
        for n in ou.pending:
            ei, er = ou.enc_items[:n], ou.enc_rewards[:n]
            h = m.encode_history(ei, uf)
            rows, it, w = self._support(ei, er)
            with torch.no_grad():
                gg, gd = m.network.support_grad(h, g, d, m.item_table, rows, it, w, 1,
                                                **self._offset_kw(rows, it, ou.known))
                g = g - self._lr[0] * gg
                d = d - self._lr[1] * gd
        with torch.no_grad():
            hp = m.network.apply_phi(h, g, d)
        out = (hp[0].numpy().copy(), h[0].numpy().copy(), g[0].detach().numpy().copy(),
               d[0].detach().numpy().copy())
        if not all(np.isfinite(a).all() for a in out):
            raise ValueError(f"the online state of user {ou.user!r} (version {ou.version}) is not finite")
        return out

    def _state_of(self, ou: OnlineUser) -> UserState:
        """``ou.state``: the served state of a version (from the served-state cache, or built)."""
        with self._served_lock:
            ent = self._served.get(ou.user)
            if ent is not None and ent[0] == ou.stamp:
                self._served.move_to_end(ou.user)
                return ent[1]
        m = self.model
        corr = ou.correction
        bias = None if corr is None else self._dense_bias(corr)
        st = UserState(ou.vector, ou.base, ou.enc_items, _ext(m, ou.enc_items), ou.enc_rewards,
                       ou.user if ou.known else None, (), int(ou.steps), None, bias)
        # its dense bias, and the wide part recommend will cache in it
        nb = 2 * 4 * m.n_items + ou.vector.nbytes * 2 + 256
        with self._served_lock:
            old = self._served.pop(ou.user, None)
            if old is not None:
                self._served_bytes -= old[2]
            if self._served_max > 0:
                self._served[ou.user] = (ou.stamp, st, nb)
                self._served_bytes += nb
                while len(self._served) > 1 and self._served_bytes > self._served_max:
                    _, (_, _, b) = self._served.popitem(last=False)
                    self._served_bytes -= b
        return st

    def _get(self, user) -> OnlineUser | None:
        """The backend's version of ``user`` (bound to this store), or None."""
        ou = self.backend.get(user)
        if ou is not None and ou._owner is not self:
            object.__setattr__(ou, "_owner", self)
        return ou

    def _materialise(self, user) -> OnlineUser | None:
        """Rebuild a user's state from a carried-over log (first use after ``resume``)."""
        grp = self._pending.get(user)
        if grp is None:  # (rebuilt meanwhile by another thread)
            return self._get(user)
        with self._lock(user):
            if user not in self._pending:
                return self._get(user)
            cur = self._get(user)
            for idx, r in zip(*grp):
                cur = self._apply(cur, user, int(idx), float(r))
            self.backend.put(user, cur)
            del self._pending[user]
            return cur

    # ---------------------------------------------------------------- public
    def current(self, user: Any) -> OnlineUser | None:
        """The latest published version of ``user`` (None if it has none: no feedback yet, or
        its entry was evicted / expired from the backend)."""
        if self._pending and user in self._pending:
            return self._materialise(user)
        return self._get(user)

    def feedback(self, events: pd.DataFrame | Sequence[Mapping[str, Any] | tuple]) -> dict[Any, OnlineUser]:
        """Apply events in their order (per user); returns each touched user's new version.

        Atomic: every event is validated (:func:`parse_events`) before any is applied, and the
        new versions of all the call's users are computed before any is published; if one
        fails (ValueError naming the event, also for a state that would not be finite),
        nothing of the call is published or logged. A list of plain tuples or dicts takes a
        fast path without pandas (the same states and log rows)."""
        rows = _event_rows(self.model, events)
        groups: dict[Any, list[tuple]] = {}
        for r in rows:
            if abs(r[4]) > self._max_abs_reward:
                raise ValueError(f"feedback event {r[0]} has reward {r[4]!r}: at most {MAX_ABS_REWARD:g} reward "
                                 f"scales ({self._max_abs_reward:g}) in magnitude, what a model file can hold "
                                 f"(LoadLimits.max_abs_weight); nothing of this call was applied")
            groups.setdefault(r[1], []).append(r)
        if self._pending:
            for user in groups:
                if user in self._pending:
                    self._materialise(user)
        # the users' lock stripes, in one global order (no deadlock between concurrent calls),
        # held while the new versions are computed and published
        locks = sorted({id(lk): lk for lk in (self._lock(u) for u in groups)}.items())
        new: dict[Any, OnlineUser] = {}
        logs: list[tuple] = []
        for _, lk in locks:
            lk.acquire()
        try:
            for user, evs in groups.items():
                cur = self._get(user)
                for row, _, item, idx, r, p, t, pos in evs:
                    cur = self._apply(cur, user, idx, r)
                    if cur.resolved and not np.isfinite(cur.vector).all():
                        raise ValueError(f"feedback event {row} (user {user!r}, reward {r!r}) would "
                                         f"make the user's state non-finite; nothing of this call was applied")
                    logs.append((user, item, r, p, t, pos))
                new[user] = cur
            for user, cur in new.items():
                self.backend.put(user, cur)  # publish each whole new version
            with self._log_lock:
                self._log.extend(logs)
        finally:
            for _, lk in reversed(locks):
                lk.release()
        return new

    def forget(self, user: Any) -> bool:
        """Drop ``user``'s online state (it is served as if it had no feedback; the log keeps
        its events). True if there was one."""
        with self._lock(user):
            self._pending.pop(user, None)
            with self._served_lock:
                old = self._served.pop(user, None)
                if old is not None:
                    self._served_bytes -= old[2]
            return bool(self.backend.delete(user))

    def __len__(self) -> int:
        """Users with an online state in the backend (not counting unreplayed log users)."""
        return len(self.backend)

    def stats(self) -> dict:
        """What the store holds: ``users`` (in the backend), ``events`` (in the log),
        ``pending_users`` (log users not yet rebuilt), ``served_users`` / ``served_bytes`` (the
        served-state cache), ``bytes_per_user`` (mean ``OnlineUser.nbytes`` in the backend) and
        the backend's own ``stats()`` (with :class:`MemoryBackend`: ``bytes``, ``evictions``,
        ``expirations``, the limits)."""
        vals = [v for _, v in self.backend.items()]
        out = {"users": len(self.backend), "events": len(self._log), "pending_users": len(self._pending),
               "served_users": len(self._served), "served_bytes": self._served_bytes,
               "bytes_per_user": float(np.mean([v.nbytes for v in vals])) if vals else 0.0}
        extra = getattr(self.backend, "stats", None)
        if callable(extra):
            out["backend"] = extra()
        return out

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
    st = model.default_online_store
    if st is None or options:
        with _STORE_GUARD:
            st = model.default_online_store
            if st is None:
                st = OnlineStore(model, **options)
                model.default_online_store = st
            elif options:
                same = all(getattr(st, k, None) == v for k, v in options.items())
                if not same:
                    if st._log or st._pending:
                        raise ValueError(f"the model already has feedback under {st.encode=}, {st.update=}; "
                                         f"cannot reconfigure to {options}")
                    st = OnlineStore(model, **options)
                    model.default_online_store = st
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
    if _scalar_id(user) and model.user_position(user) >= 0:
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
    st = model.default_online_store
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
    items = model.item_positions(log["item"].to_numpy())
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
    scaled = reward / model.reward_scale
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
        model.default_online_store = OnlineStore(model, encode=meta["encode"], update=meta["update"], log=log)
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
    prep.rewards = prep.rewards / model.reward_scale
    net = copy.deepcopy(model.network)
    for p in net.parameters():
        p.requires_grad_(True)
    hist = fit(net, prep, cfg, None, progress=progress)
    logger.info("resume: %d rows, %d users, %.1fs", len(frame), len(prep.user_ids), hist["seconds"])
    new = model.with_network(net, cfg)
    old = store(model)
    carried = old.log()
    new.default_online_store = OnlineStore(new, encode=old.encode, update=old.update,
                                           log=carried if len(carried) else None)
    return new
