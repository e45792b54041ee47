"""Meta-learning across group tasks: segments, item categories, campaigns.

``recmeta_sdk.train(..., tasks=...)`` meta-learns across one of the data layer's task
kinds (:data:`recmeta_sdk.data.TASK_KINDS`, grouping by :func:`recmeta_sdk.data.make_tasks`):

* ``"user"`` (default): one task per user; the per-user path of :mod:`recmeta_sdk.training.loop`.
* ``"segment:COL"``: one task per value of the user feature ``COL`` (a column of the log,
  else of ``users``).
* ``"category:COL"``: one task per value of the item feature ``COL`` (a column of the log,
  else of ``items``; multi-valued features put a row in each of its categories' tasks).
* ``"campaign"`` / ``"campaign:COL"``: one task per value of the log's column ``COL``
  (default ``"campaign"``).

The same can be written ``("segment", "age_bucket")`` or as a dict
``{"by": "campaign", "column": "campaign", "users_per_task": 32, "tasks_per_batch": 4,
"support_frac": 0.5}`` to set how meta-batches are drawn.

Meta-batches (first-order MAML with the FiLM adaptation parameters ``phi``)
---------------------------------------------------------------------------
Each training step draws ``tasks_per_batch`` distinct tasks uniformly, and for each task
``users_per_task`` distinct users with interactions in it (all of them when it has fewer).
The drawn users of a task are shuffled and split: the first ``support_frac`` of them
(at least one, and at least one left over) are *support users*, the others *query users*.

* A support user's row reads the user's whole history, and its interactions in the
  task are the task's support set (weighted by their rewards).
* A query user's row reads the user's history *without* the task's interactions (and
  without earlier interactions with the same items), and its interactions in the task are
  the query set the row must rank.

The inner loop adapts ONE ``phi`` per task: ``config.inner_steps`` steps of the task's
support loss ``-sum_i w_i log pi(a_i | h'_{user(i)}) / sum_i w_i`` over all the task's
support interactions (the rows' closed-form gradients aggregated with their support
weights, :meth:`RecMetaNet.support_grad` with ``groups``), with the learned step sizes.
The outer loss (:func:`recmeta_sdk.training.loop.batch_loss`) of every row of the task uses that
shared adapted ``phi``; its first-order gradient trains the shared weights, the initial
``phi`` and the step sizes. This is exactly the serving situation: a new task is seen
through some users' interactions (:func:`adapt_task`) and then serves other users.

Serving: ``Recommender.adapt_task(frame) -> TaskState`` and ``task=`` on ``recommend`` /
``adapt`` / ``user_state`` (the task's ``phi`` replaces the initial one; per-user steps,
if any, start from it). A :class:`TaskState` is a pure function of the model and the
frame, so it needs no saving.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..data import TASK_KINDS, IdMap, make_tasks, timestamp_array
from .loop import Batch, Prepared, history_tensors, user_feature_rows

logger = logging.getLogger("recmeta")

__all__ = ["TaskSampler", "TaskSpec", "TaskState", "adapt_task", "parse_tasks", "task_phi", "task_sampler"]

_OPTION_KEYS = ("by", "column", "users_per_task", "tasks_per_batch", "support_frac")


@dataclass(frozen=True)
class TaskSpec:
    """How training groups interactions into tasks and draws meta-batches of them."""

    kind: str = "user"
    column: str | None = None
    users_per_task: int = 32
    tasks_per_batch: int | None = None  # None: max(1, batch_size // users_per_task)
    support_frac: float = 0.5


def parse_tasks(tasks: Any) -> TaskSpec:
    """A :class:`TaskSpec` from ``tasks``: ``"user"``, ``"KIND"``, ``"KIND:COLUMN"``,
    ``(KIND, COLUMN)`` or a dict with ``by`` and optional ``column``, ``users_per_task``,
    ``tasks_per_batch``, ``support_frac``.

    Raises ValueError for an unknown kind, a missing column (``segment`` and ``category``
    need one) or invalid options; TypeError for another type.
    """
    opts: dict = {}
    if isinstance(tasks, TaskSpec):
        opts = {"by": tasks.kind, "column": tasks.column, "users_per_task": tasks.users_per_task,
                "tasks_per_batch": tasks.tasks_per_batch, "support_frac": tasks.support_frac}
    elif isinstance(tasks, str):
        kind, sep, col = tasks.partition(":")
        opts = {"by": kind.strip(), "column": col.strip() if sep else None}
        if sep and not opts["column"]:
            raise ValueError(f"tasks={tasks!r}: empty column after ':'")
    elif isinstance(tasks, tuple):
        if len(tasks) != 2 or not all(isinstance(x, str) for x in tasks):
            raise ValueError(f"tasks as a tuple must be (kind, column) strings, got {tasks!r}")
        opts = {"by": tasks[0], "column": tasks[1]}
    elif isinstance(tasks, dict):
        unknown = sorted(set(tasks) - set(_OPTION_KEYS))
        if unknown:
            raise ValueError(f"unknown tasks options {unknown}; known: {list(_OPTION_KEYS)}")
        if "by" not in tasks:
            raise ValueError(f"tasks dict needs 'by' (one of {list(TASK_KINDS)}), got {tasks!r}")
        opts = dict(tasks)
    else:
        raise TypeError(f"tasks must be a str, a (kind, column) tuple or a dict, got {type(tasks).__name__}")
    kind = opts["by"]
    if kind not in TASK_KINDS:
        raise ValueError(f"unknown task kind {kind!r} in tasks={tasks!r}; choose one of {list(TASK_KINDS)}")
    col = opts.get("column")
    if col is not None and not isinstance(col, str):
        raise TypeError(f"tasks column must be a str, got {col!r}")
    if kind == "user" and col is not None:
        raise ValueError(f"tasks={tasks!r}: 'user' tasks take no column")
    if kind in ("segment", "category") and col is None:
        feature = "user" if kind == "segment" else "item"
        raise ValueError(f"tasks={tasks!r} needs the {feature} feature column naming the {kind}, "
                         f"e.g. '{kind}:COLUMN' or ({kind!r}, 'COLUMN')")
    if kind == "campaign" and col is None:
        col = "campaign"
    upt = opts.get("users_per_task", 32)
    if isinstance(upt, bool) or not isinstance(upt, (int, np.integer)) or upt < 2:
        raise ValueError(f"tasks users_per_task must be an int >= 2, got {upt!r}")
    tpb = opts.get("tasks_per_batch")
    if tpb is not None and (isinstance(tpb, bool) or not isinstance(tpb, (int, np.integer)) or tpb < 1):
        raise ValueError(f"tasks tasks_per_batch must be a positive int, got {tpb!r}")
    sf = opts.get("support_frac", 0.5)
    if isinstance(sf, bool) or not isinstance(sf, (int, float)) or not 0.0 < float(sf) < 1.0:
        raise ValueError(f"tasks support_frac must be in (0, 1), got {sf!r}")
    return TaskSpec(kind, col, int(upt), None if tpb is None else int(tpb), float(sf))


def _user_csr(interactions: pd.DataFrame, user_ids: np.ndarray, item_ids: np.ndarray, reward_scale: float):
    """Per-user time-ordered rows of the log: (order, offsets, user code per row, items,
    rewards / reward_scale, propensities or None), ``order`` mapping these positions to rows."""
    df = interactions
    uc = IdMap(user_ids).to_index(df["user"].to_numpy())
    it = IdMap(item_ids).to_index(df["item"].to_numpy())
    if (uc < 0).any() or (it < 0).any():
        raise ValueError("interactions has users or items outside the training id maps")
    ts = timestamp_array(df["timestamp"]) if "timestamp" in df.columns else np.zeros(len(df))
    order = np.lexsort((np.arange(len(df)), ts, uc))
    counts = np.bincount(uc, minlength=len(user_ids))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    rew = (df["reward"].to_numpy(dtype=np.float32) if "reward" in df.columns
           else np.ones(len(df), np.float32)) / np.float32(reward_scale)
    prop = df["propensity"].to_numpy(dtype=np.float32)[order] if "propensity" in df.columns else None
    return order, offsets, uc[order].astype(np.int64), it[order].astype(np.int64), rew[order], prop


class TaskSampler:
    """Draws group-task meta-batches (see the module docstring) for :func:`recmeta_sdk.training.loop.fit`.

    Built by :func:`task_sampler`. ``pair_*`` list the (task, user) pairs: the rows (positions
    in the per-user time-ordered log) of pair p are ``pair_rows[pair_off[p]:pair_off[p + 1]]``,
    the pairs of task t are ``task_off[t]:task_off[t + 1]``.
    """

    def __init__(self, spec: TaskSpec, cfg, keys: np.ndarray, offsets: np.ndarray, items: np.ndarray,
                 rewards: np.ndarray, prop: np.ndarray | None, pair_user: np.ndarray, pair_off: np.ndarray,
                 pair_rows: np.ndarray, task_off: np.ndarray, n_items: int):
        self.spec, self.cfg = spec, cfg
        self.keys = keys
        self.offsets, self.items, self.rewards, self.prop = offsets, items, rewards, prop
        self.pair_user, self.pair_off, self.pair_rows, self.task_off = pair_user, pair_off, pair_rows, task_off
        self.n_items = n_items
        self.users_per_task = spec.users_per_task
        self.tasks_per_batch = spec.tasks_per_batch or max(1, cfg.batch_size // spec.users_per_task)
        per_batch = min(self.tasks_per_batch, len(keys)) * self.users_per_task
        self.steps_per_epoch = math.ceil(len(pair_user) / per_batch)

    @property
    def n_tasks(self) -> int:
        return len(self.keys)

    def draw(self, rng: np.random.Generator, user_feats=None) -> Batch:
        """One meta-batch: tasks, then users per task, then the support / query split of them."""
        cfg = self.cfg
        T = self.n_tasks
        chosen = rng.choice(T, size=min(T, self.tasks_per_batch), replace=False)
        hists, hist_r, q, q_r, q_p, inner_r, inner_i, inner_w, groups, users = ([] for _ in range(10))
        for g, t in enumerate(chosen):
            lo, hi = self.task_off[t], self.task_off[t + 1]
            m = min(self.users_per_task, hi - lo)
            pairs = lo + rng.choice(hi - lo, size=m, replace=False)
            n_sup = min(max(1, round(self.spec.support_frac * m)), m - 1)
            for j, p in enumerate(pairs):
                u = int(self.pair_user[p])
                rows = self.pair_rows[self.pair_off[p]:self.pair_off[p + 1]]
                ulo, uhi = self.offsets[u], self.offsets[u + 1]
                b = len(hists)
                if j < n_sup:  # support user: whole history; the task's rows are support
                    hists.append(self.items[ulo:uhi])
                    hist_r.append(self.rewards[ulo:uhi])
                    inner_r.append(np.full(len(rows), b, np.int64))
                    inner_i.append(self.items[rows])
                    inner_w.append(np.maximum(self.rewards[rows], 0.0))
                    q.append(np.zeros(0, np.int64))
                    q_r.append(np.zeros(0, np.float32))
                    if self.prop is not None:
                        q_p.append(np.zeros(0, np.float32))
                else:  # query user: history without the task's rows (nor their items)
                    pos = np.arange(ulo, uhi)
                    qi = self.items[rows]
                    keep = ~np.isin(pos, rows) & ~np.isin(self.items[ulo:uhi], qi)
                    hists.append(self.items[ulo:uhi][keep])
                    hist_r.append(self.rewards[ulo:uhi][keep])
                    q.append(qi)
                    q_r.append(self.rewards[rows])
                    if self.prop is not None:
                        q_p.append(self.prop[rows])
                groups.append(g)
                users.append(u)
        B = len(hists)
        bag_idx, bag_off, bag_w, sq, sl = history_tensors(hists, cfg.seq_len, self.n_items)
        sup_rows = torch.from_numpy(np.repeat(np.arange(B), [len(h) for h in hists]))
        q_rows = torch.from_numpy(np.repeat(np.arange(B), [len(x) for x in q]))
        uo, ui = user_feature_rows(user_feats, users, cfg, rng)
        sup_w = np.maximum(np.concatenate(hist_r), 0.0).astype(np.float32) if B else np.zeros(0, np.float32)

        def cat(parts, dtype):
            return torch.from_numpy(np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype))

        inner = (cat(inner_r, np.int64), cat(inner_i, np.int64), cat(inner_w, np.float32))
        return Batch(bag_idx, bag_off, bag_w, sq, sl, torch.from_numpy(ui), torch.from_numpy(uo),
                     sup_rows, bag_idx.clone(), torch.from_numpy(sup_w),
                     q_rows, cat(q, np.int64), cat(q_r, np.float32),
                     cat(q_p, np.float32) if self.prop is not None else None, B,
                     torch.from_numpy(np.asarray(users, np.int64)),
                     groups=torch.from_numpy(np.asarray(groups, np.int64)), inner=inner)


def task_sampler(spec: TaskSpec, interactions: pd.DataFrame, prep: Prepared, cfg,
                 users: pd.DataFrame | None = None, items: pd.DataFrame | None = None,
                 reward_scale: float = 1.0) -> TaskSampler:
    """The meta-batch sampler of group tasks ``spec`` over the training log.

    Tasks come from :func:`recmeta_sdk.data.make_tasks`; a task needs interactions of at
    least two users (one support and one query user); training needs at least two tasks.
    Raises ValueError (naming the kind and column) otherwise, or when the column is missing.
    """
    if spec.kind == "user":
        raise ValueError("task_sampler is for group tasks; 'user' tasks use recmeta_sdk.training.loop.make_batch")
    if cfg.calib_users > 0:
        raise ValueError(f"config.calib_users={cfg.calib_users!r} (wide-part calibration) is not supported with "
                         f"tasks={spec.kind!r}; set it to 0")
    ts = make_tasks(interactions, spec.kind, users=users, items=items, column=spec.column,
                    min_interactions=2, temporal=False, seed=cfg.seed)
    order, offsets, ucode, icode, rew, prop = _user_csr(interactions, prep.user_ids, prep.item_ids, reward_scale)
    inv = np.empty(len(order), np.int64)
    inv[order] = np.arange(len(order))
    pos = inv[ts.rows]  # positions in the per-user time-ordered log
    task = ts.task_of_row
    # one entry per (task, position); a row counted twice in a task (cannot happen) is kept once
    srt = np.lexsort((pos, ucode[pos], task))
    task, pos = task[srt], pos[srt]
    user = ucode[pos]
    new_pair = np.ones(len(pos), bool)
    new_pair[1:] = (task[1:] != task[:-1]) | (user[1:] != user[:-1])
    starts = np.flatnonzero(new_pair)
    pair_task, pair_user = task[starts], user[starts]
    pair_off = np.concatenate([starts, [len(pos)]]).astype(np.int64)
    n_users = np.bincount(pair_task, minlength=len(ts))
    ok = n_users >= 2
    if (~ok).any():
        logger.info("tasks=%r: dropped %d task(s) with interactions of fewer than 2 users", spec.kind, int((~ok).sum()))
    if ok.sum() < 2:
        raise ValueError(f"tasks={spec.kind!r} (column {spec.column!r}) gives {int(ok.sum())} task(s) with "
                         f"interactions of 2 or more users; meta-learning across tasks needs at least 2")
    keep_pair = ok[pair_task]
    # re-index the kept tasks 0..T-1 and keep their pairs (pairs stay sorted by task)
    new_id = np.cumsum(ok) - 1
    pair_rows = np.concatenate([pos[pair_off[p]:pair_off[p + 1]] for p in np.flatnonzero(keep_pair)])
    sizes = np.diff(pair_off)[keep_pair]
    pair_task, pair_user = new_id[pair_task[keep_pair]], pair_user[keep_pair]
    pair_off = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    task_off = np.concatenate([[0], np.cumsum(np.bincount(pair_task, minlength=int(ok.sum())))]).astype(np.int64)
    sampler = TaskSampler(spec, cfg, np.asarray(ts.keys)[ok], offsets, icode, rew, prop, pair_user, pair_off,
                          pair_rows, task_off, len(prep.item_ids))
    logger.info("meta-learning across %d %s tasks (column %r): %d (task, user) pairs, %d tasks x %d users "
                "per meta-batch, %d steps per epoch", sampler.n_tasks, spec.kind, spec.column, len(pair_user),
                sampler.tasks_per_batch, sampler.users_per_task, sampler.steps_per_epoch)
    return sampler


# ---------------------------------------------------------------------------- serving

@dataclass(frozen=True)
class TaskState:
    """A task's adapted parameters (from :meth:`Recommender.adapt_task`); pass as ``task=``.

    Attributes
    ----------
    gamma, delta : (d,) float32
        The task's adaptation parameters ``phi`` (FiLM: ``h' = h * (1 + gamma) + delta``).
    steps : int
        Adaptation steps taken (0: the model's initial ``phi``).
    n_interactions : int
        Support interactions it was adapted on.
    n_users, n_new_users : int
        Users in the frame, and how many of them were unknown to the model.
    """

    gamma: np.ndarray
    delta: np.ndarray
    steps: int
    n_interactions: int
    n_users: int
    n_new_users: int


def task_phi(model, task) -> tuple:
    """(gamma, delta) tensors of ``task`` for ``model``; TypeError / ValueError if it does not fit."""
    if not isinstance(task, TaskState):
        raise TypeError(f"task must be a TaskState from Recommender.adapt_task, got {type(task).__name__}")
    d = model.config.dim
    if np.shape(task.gamma) != (d,) or np.shape(task.delta) != (d,):
        raise ValueError(f"TaskState has parameters of shape {np.shape(task.gamma)}, this model needs ({d},)")
    return torch.as_tensor(np.asarray(task.gamma, np.float32)), torch.as_tensor(np.asarray(task.delta, np.float32))


def adapt_task(model, interactions: pd.DataFrame, *, steps: int | None = None) -> TaskState:
    """Adapt ``model`` to a new task from its interactions (pure: the model is unchanged).

    ``interactions``: a DataFrame with ``user``, ``item`` and optional ``reward`` and
    ``timestamp`` (time order within a user). Known users read their training history
    followed by their rows here; new users read only their rows here (and no features).
    ONE ``phi`` is adapted by ``steps`` (default ``config.inner_steps``) gradient steps of
    the task's support loss over all the rows (as in meta-training across tasks), starting
    from the model's initial ``phi``. Items unknown to the model raise ValueError.
    """
    if not isinstance(interactions, pd.DataFrame):
        raise TypeError(f"interactions must be a pandas DataFrame, got {type(interactions).__name__}")
    for col in ("user", "item"):
        if col not in interactions.columns:
            raise ValueError(f"adapt_task: interactions need a {col!r} column; they have {list(interactions.columns)}")
    if len(interactions) == 0:
        raise ValueError("adapt_task: interactions are empty")
    steps = model._check_steps(steps)
    df = interactions
    if df["user"].isna().any():
        raise ValueError("adapt_task: interactions have missing user ids")
    it = model.item_map.to_index(df["item"].to_numpy())
    if (it < 0).any():
        bad = df["item"].to_numpy()[it < 0][:10].tolist()
        raise ValueError(f"adapt_task: {int((it < 0).sum())} interaction(s) with items unknown to the model: {bad}")
    scale = model._reward_scale
    rew = (df["reward"].to_numpy(dtype=np.float64) if "reward" in df.columns else np.full(len(df), scale))
    if not np.isfinite(rew).all():
        raise ValueError("adapt_task: reward has non-finite values")
    ucodes, uniq = pd.factorize(df["user"], sort=True)
    ts = timestamp_array(df["timestamp"]) if "timestamp" in df.columns else np.zeros(len(df))
    order = np.lexsort((np.arange(len(df)), ts, ucodes))
    starts = np.concatenate([[0], np.cumsum(np.bincount(ucodes, minlength=len(uniq)))])
    known = model.user_map.to_index(uniq.to_numpy())
    hists, rews, ufs, sup_i, sup_w, sup_r = [], [], [], [], [], []
    for b, u in enumerate(known):
        sel = order[starts[b]:starts[b + 1]]
        f_items, f_rew = it[sel].astype(np.int64), rew[sel].astype(np.float32)
        if u >= 0:
            lo, hi = model._hist_offsets[u], model._hist_offsets[u + 1]
            hists.append(np.concatenate([model._hist_items[lo:hi], f_items]))
            rews.append(np.concatenate([model._hist_rewards[lo:hi], f_rew]))
            ufs.append(model._uf_idx[model._uf_off[u]:model._uf_off[u + 1]] if len(model._uf_off) > u + 1
                       else np.zeros(0, np.int64))
        else:
            hists.append(f_items)
            rews.append(f_rew)
            ufs.append(np.zeros(0, np.int64))
        sup_i.append(f_items)
        sup_w.append(np.maximum(f_rew, 0.0) / scale)
        sup_r.append(np.full(len(f_items), b, np.int64))
    net = model._net
    B = len(hists)
    bi, bo, bw, sq, sl = history_tensors(hists, model.config.seq_len, model.n_items)
    uo = np.concatenate([[0], np.cumsum([len(x) for x in ufs])]).astype(np.int64)
    ui = np.concatenate(ufs).astype(np.int64) if uo[-1] else np.zeros(0, np.int64)
    with torch.no_grad():
        h = net.user_state(model._X, bi, bo, bw, sq, sl, torch.from_numpy(ui), torch.from_numpy(uo))
        rows = torch.from_numpy(np.repeat(np.arange(B), [len(x) for x in hists]))
        offset = net.wide_offset(rows, bi, B)
        lr = None if model.config.meta == "fomaml" else model.config.inner_lr
        inner = (torch.from_numpy(np.concatenate(sup_r)), torch.from_numpy(np.concatenate(sup_i)),
                 torch.from_numpy(np.concatenate(sup_w).astype(np.float32)))
        gamma, delta = net.adapt_phi(h, model._V, *inner, steps, lr=lr, offset=offset,
                                     groups=torch.zeros(B, dtype=torch.int64))
    return TaskState(gamma[0].numpy().copy(), delta[0].numpy().copy(), steps, len(df), B, int((known < 0).sum()))
