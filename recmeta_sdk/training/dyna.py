"""Dyna-style augmentation: world-model rollouts as extra logs for policy training.

:func:`model_rollouts` serves synthetic users in an ensemble of fitted world models
(:class:`recmeta_sdk.model.WorldModel`, e.g. the same log fitted with different seeds) and
returns the rollouts as log rows in the training format, to append to the real logs before
``recmeta_sdk.train``::

    from recmeta_sdk.model import WorldModel
    from recmeta_sdk.training.dyna import model_rollouts

    ens = [WorldModel.fit(log, item_features=items, seed=s) for s in range(3)]
    fake = model_rollouts(ens, n_users=200, horizon=20, max_disagreement=0.1, seed=0)
    model = recmeta_sdk.train(pd.concat([log, fake]), items=items)

The ensemble's disagreement limits how far a rollout is trusted (as in MBPO / MOPO): each
step the members predict the click probability of every slate position; when the largest
standard deviation across members exceeds ``max_disagreement`` the rollout stops before
that step (its rows are not emitted). The responses are drawn from one member chosen at
random per step, and every member's state moves with the same responses; the session ends
with that member's end probability (when it has a session head).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

__all__ = ["model_rollouts"]


def model_rollouts(worlds: Sequence[Any], *, n_users: int = 100, horizon: int = 20, slate_size: int = 3,
                   max_disagreement: float | None = 0.1, policy: str = "uniform", seed: int = 0,
                   user_prefix: str = "dyna-", first_user: int | None = None) -> pd.DataFrame:
    """Synthetic sessions from an ensemble of world models, as training-log rows.

    Parameters
    ----------
    worlds : sequence of WorldModel
        The ensemble (one model gives rollouts without an uncertainty limit; then
        ``max_disagreement`` must be None). All members must share one catalogue.
    n_users : int
        Synthetic users, each starting from the members' prior states.
    horizon : int
        Steps per user at most.
    slate_size : int
        Items per step (at most the members' trained positions).
    max_disagreement : float or None
        Stop a rollout before the first step where the ensemble's standard deviation of a
        position's click probability exceeds it (None: no limit).
    policy : ``"uniform"``
        The rollout policy: uniformly random slates (the logging policy of the real logs in
        the long-horizon bench), logged with propensity ``1 / n_items``.
    seed : int
        Seed of the slates, the member choice and the responses.
    user_prefix : str
        Synthetic users are named ``f"{user_prefix}{j}"`` (never a real user id) ...
    first_user : int, optional
        ... or, when given, numbered ``first_user + j`` (for logs with integer user ids, which
        ``recmeta_sdk.train`` does not mix with strings; pick it above every real id).

    Returns
    -------
    DataFrame
        Columns ``user``, ``item``, ``reward`` (0/1), ``position``, ``propensity``,
        ``timestamp`` (the step), ``session`` (0); ``attrs["steps"]`` is the number of steps
        emitted, ``attrs["truncated"]`` the number of rollouts stopped by the ensemble's
        disagreement.
    """
    ws = list(worlds)
    if not ws:
        raise ValueError("worlds is empty: pass at least one fitted WorldModel")
    for w in ws:
        if not callable(getattr(w, "_dense_step", None)):
            raise TypeError(f"worlds must hold recmeta_sdk.model.WorldModel objects, got {type(w).__name__}")
    ids = np.asarray(ws[0].item_map.ids)
    for j, w in enumerate(ws[1:], 1):
        if len(w.item_map) != len(ids) or not np.array_equal(np.asarray(w.item_map.ids), ids):
            raise ValueError(f"worlds[{j}] has another catalogue than worlds[0]")
    for name, v in (("n_users", n_users), ("horizon", horizon), ("slate_size", slate_size)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    k = int(slate_size)
    if k > len(ids) or any(k > w.n_positions for w in ws):
        raise ValueError(f"slate_size={k} exceeds the catalogue or a member's trained positions")
    if max_disagreement is not None:
        if isinstance(max_disagreement, bool) or not np.isfinite(float(max_disagreement)) or max_disagreement <= 0:
            raise ValueError(f"max_disagreement must be a number > 0 or None, got {max_disagreement!r}")
        if len(ws) < 2:
            raise ValueError("max_disagreement needs an ensemble of at least 2 world models")
    if policy != "uniform":
        raise ValueError(f"policy must be 'uniform', got {policy!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    if first_user is not None and (isinstance(first_user, bool) or not isinstance(first_user, (int, np.integer))):
        raise TypeError(f"first_user must be an int, got {first_user!r}")
    name = (lambda j: f"{user_prefix}{j}") if first_user is None else (lambda j: int(first_user) + int(j))
    rng = np.random.default_rng([int(seed), 31])
    U, M, N = int(n_users), len(ws), len(ids)
    cols = {c: [] for c in ("user", "item", "reward", "position", "propensity", "timestamp", "session")}
    truncated = steps = 0
    with torch.no_grad():
        Vs = [w._item_vectors() for w in ws]
        hs = [torch.as_tensor(w.initial_state(U)) for w in ws]
        alive = np.ones(U, bool)
        pos = torch.arange(k)
        for t in range(int(horizon)):
            if not alive.any():
                break
            slates = np.argsort(rng.random((U, N)), axis=1)[:, :k]            # uniform, distinct
            st = torch.as_tensor(slates)
            probs = []
            for w, V, h in zip(ws, Vs, hs):
                net = w._net
                lg = net.response_logits(h, V[st], net.item_bias[st], pos[None, :].expand(U, -1))
                probs.append(torch.sigmoid(lg).numpy())
            P = np.stack(probs)                                                 # (M, U, k)
            if max_disagreement is not None:
                bad = alive & (P.std(axis=0).max(axis=1) > float(max_disagreement))
                truncated += int(bad.sum())
                alive &= ~bad
            member = rng.integers(0, M, size=U)
            p = P[member, np.arange(U)]
            resp = (rng.random((U, k)) < p).astype(np.float32)
            r = torch.as_tensor(resp)
            ends = np.zeros(U, bool)
            u_end = rng.random(U)
            new_hs = []
            for m, (w, V, h) in enumerate(zip(ws, Vs, hs)):
                h2, pend = w._dense_step(h, st, r, V, True)
                new_hs.append(h2)
                if pend is not None:
                    ends |= (member == m) & (u_end < pend.numpy())
            hs = new_hs
            live = np.flatnonzero(alive)
            for u in live:
                cols["user"].extend([name(u)] * k)
                cols["item"].extend(ids[slates[u]].tolist())
                cols["reward"].extend(resp[u].astype(np.float64).tolist())
                cols["position"].extend(range(k))
                cols["propensity"].extend([1.0 / N] * k)
                cols["timestamp"].extend([t] * k)
                cols["session"].extend([0] * k)
            steps += len(live)
            alive &= ~ends
    df = pd.DataFrame(cols)
    df = df.astype({"position": np.int64, "timestamp": np.int64, "session": np.int64, "reward": np.float64})
    df.attrs["steps"] = int(steps)
    df.attrs["truncated"] = int(truncated)
    return df
