"""Training: supervised warm start + off-policy REINFORCE, meta-learned adaptation.

Samples
-------
Each step draws a batch of users (the tasks; ``tasks="user"``). For each user one
*support* set (what the model is shown) and one *query* set (what it must rank) are cut
from the user's time-ordered training history:

* with probability ``prefix_prob`` a time-ordered **prefix** of 1..``max_prefix`` items
  (support) and the rest of the history (query) — this is exactly the situation of a new
  user with a few interactions, so the model is good for cold users;
* otherwise a **denoising** cut (Mult-DAE): each item is hidden with probability
  ``input_dropout``; the kept items are the support, the hidden ones the query — this is
  the situation of a warm user whose next items we rank.

Objective on the query set
--------------------------
``L = ce_weight * CE + rl_weight * L_RL - entropy * H(pi) + L_beta`` where, with ``pi`` the policy after
adaptation and support items masked out of the softmax:

* ``CE``: multi-target cross-entropy ``-mean_{a in query} log pi(a|s)`` (the supervised
  warm start; YouTube-DNN / Mult-DAE style over the full catalogue);
* ``L_RL``: REINFORCE with the top-K off-policy correction of Chen et al. 2019,
  ``-mean_a r_a * min(pi(a|s)/beta(a|s), is_cap) * K (1 - pi(a|s))^(K-1) * log pi(a|s)``,
  the weights held constant; ``beta`` is the logged ``propensity`` when the logs carry
  one, else the behaviour head's estimate (trained by cross-entropy on the logged actions
  with the state gradient blocked);
* each sample's CE and RL terms are means over its query items, and the samples of a batch
  are weighted by ``(query size) ** query_weight`` (normalised to sum to 1). With equal
  weights (0) a user with 300 future items counts as much as one with 3, and the policy
  learns too little of what the long futures have in common (popular films): on an inner
  split of MovieLens-100K training users the new-user NDCG@10 fell below popularity's, the
  model winning on users with short futures and losing on long ones. 0.5 lifted new-user
  NDCG@10 by 0.05-0.07 at k = 5, 10, 20 at about the same recall; 1 (Mult-DAE's summed
  likelihood) cost recall; the warm model of the demo keeps 0 (better on the warm
  validation part);
* catalogues larger than ``full_softmax_max`` use a sampled softmax over the batch's
  query items plus ``n_negatives`` items drawn from the popularity distribution Q, with
  the logits corrected by ``- log(expected count under Q)`` (log-Q correction).

Meta-learning (``meta="fomaml"``)
---------------------------------
We use **first-order MAML restricted to the head** (ANIL-style): the inner loop changes
only the adaptation parameters ``phi = (gamma, delta)`` (a FiLM layer on the user state)
by ``inner_steps`` gradient steps of the support loss (the reward-weighted likelihood of
the support items under the policy), with per-coordinate step sizes that are themselves
learned (Meta-SGD). The outer loss is the query objective above at the adapted ``phi``;
its gradient flows to the shared weights, to the initial ``phi`` and to the step sizes,
with the support gradients treated as constants (first order). Why this variant: the
shared encoder already reads the support set, so what a few steps should add is a
cheap, per-user correction of the state toward what the user actually chose; adapting
only ``2d`` numbers keeps ``adapt`` a few milliseconds with a closed-form gradient (no
autograd at serving time), head-only adaptation is as good as full MAML in practice
(Raghu et al. 2020, ANIL), and first-order updates cost one extra catalogue-wide
softmax per step instead of second derivatives through the encoder. Learned step sizes
let meta-training shrink an unhelpful step to nothing, so adaptation never has to hurt.
``meta="none"`` trains the same network without the inner loop; with ``prefix_prob=0`` as
well it has no support / query tasks either: the network trained without meta-learning,
the baseline of the demo's cold-start table (on MovieLens the tasks carry the gain there,
and the inner loop alone is neutral).

Reproducibility: all randomness comes from ``numpy.random.default_rng(seed)`` and a local
``torch.Generator``; dropout draws happen inside ``torch.random.fork_rng`` seeded from it,
so the global RNG state is left as it was.
"""
from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pandas as pd
import torch

from .. import ops
from ..data import IdMap
from ..evaluation.baselines import ease_weights as _ease_weights
from ..model.io import LoadLimits
from ..model.network import AUTO_VALIDATION, Config, auto_epochs, ItemFeatures, RecMetaNet, SparseWide, dense_wide_bytes

logger = logging.getLogger("recmeta")

__all__ = ["Prepared", "prepare", "prepare_codes", "check_codes", "fit", "make_batch", "batch_loss",
           "reinforce_weights", "sparse_ease"]


# ---------------------------------------------------------------------------- features

def _is_listlike(v) -> bool:
    return isinstance(v, (list, tuple, np.ndarray, set, frozenset))


def build_schema(df: Optional[pd.DataFrame], year_bucket: int) -> list:
    """A JSON-able feature schema from a side-feature DataFrame (indexed by external id).

    Each column becomes ``{"column", "kind", ...}``: ``"multi"`` (list values or
    ``|``-separated strings: one row per distinct value), ``"cat"`` (one row per value),
    ``"num"`` (buckets: ``year_bucket``-wide for a column named like ``year``, else
    deciles, stored as edges), ``"dense"`` (fixed-length float vectors, e.g. text
    embeddings: no table rows; see :func:`dense_matrix`).
    """
    schema = []
    if df is None:
        return schema
    for col in df.columns:
        s = df[col]
        nonnull = s.dropna()
        if len(nonnull) == 0:
            continue
        first = nonnull.iloc[0]
        if _is_dense_value(first):
            schema.append(_dense_schema(col, nonnull))
            continue
        if _is_listlike(first) or (isinstance(first, str) and nonnull.astype(str).str.contains(r"\|").any()):
            vals = set()
            for v in nonnull:
                vals.update(_multi_values(v))
            schema.append({"column": str(col), "kind": "multi", "values": sorted(map(str, vals))})
        elif pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s):
            x = nonnull.to_numpy(dtype=np.float64)
            if "year" in str(col).lower():
                lo = math.floor(x.min() / year_bucket) * year_bucket
                hi = math.floor(x.max() / year_bucket) * year_bucket + year_bucket
                edges = list(np.arange(lo + year_bucket, hi, year_bucket, dtype=np.float64))
            else:
                edges = sorted(set(np.quantile(x, np.linspace(0.1, 0.9, 9)).tolist()))
            schema.append({"column": str(col), "kind": "num", "edges": [float(e) for e in edges]})
        else:
            vals = sorted(set(map(str, nonnull)))
            if len(vals) > max(50, len(nonnull) // 10):
                continue  # identifier-like (titles, zip codes): no generalisation, skip
            schema.append({"column": str(col), "kind": "cat", "values": vals})
    return schema


def _multi_values(v):
    if _is_listlike(v):
        return [str(x) for x in v]
    if isinstance(v, str):
        return [x for x in v.split("|") if x]
    return [str(v)]


def schema_names(schema: list) -> list:
    names = []
    for f in schema:
        if f["kind"] == "dense":
            continue  # no table rows: projected by the item tower (see dense_matrix)
        if f["kind"] in ("multi", "cat"):
            names += [f"{f['column']}={v}" for v in f["values"]]
        else:
            e = [f"{x:g}" for x in f["edges"]]
            if not e:
                names.append(f"{f['column']}=any")
                continue
            names.append(f"{f['column']}<{e[0]}")
            names += [f"{f['column']} in [{a}, {b})" for a, b in zip(e[:-1], e[1:])]
            names.append(f"{f['column']}>={e[-1]}")
    return names


def encode_features(schema: list, record) -> tuple:
    """Feature rows (local to the feature block) and weights of one record (a mapping)."""
    rows, weights = [], []
    base = 0
    for f in schema:
        if f["kind"] == "dense":
            continue  # no table rows (see dense_matrix)
        v = record.get(f["column"]) if hasattr(record, "get") else None
        if f["kind"] in ("multi", "cat"):
            lookup = {val: j for j, val in enumerate(f["values"])}
            if v is not None and not (isinstance(v, float) and math.isnan(v)):
                vals = _multi_values(v) if f["kind"] == "multi" else [str(v)]
                hits = [lookup[x] for x in vals if x in lookup]
                for j in hits:
                    rows.append(base + j)
                    weights.append(1.0 / len(hits))
            base += len(f["values"])
        else:
            if v is not None and not (isinstance(v, float) and math.isnan(v)):
                try:
                    x = float(v)
                except (TypeError, ValueError):
                    x = float("nan")
                if math.isfinite(x):
                    rows.append(base + int(np.searchsorted(f["edges"], x, side="right")))
                    weights.append(1.0)
            base += len(f["edges"]) + 1
    return rows, weights


def item_features(schema: list, items: Optional[pd.DataFrame], item_ids: np.ndarray) -> ItemFeatures:
    N = len(item_ids)
    names = schema_names(schema)
    offsets = [0]
    indices, weights = [], []
    recs = None
    if items is not None and schema:
        recs = items.reindex(pd.Index(item_ids))
        recs = recs.to_dict("records")
    for i in range(N):
        indices.append(i)
        weights.append(1.0)
        if recs is not None:
            r, w = encode_features(schema, recs[i])
            indices += [N + x for x in r]
            weights += w
        offsets.append(len(indices))
    return ItemFeatures(N, names, np.asarray(offsets, np.int64), np.asarray(indices, np.int64),
                        np.asarray(weights, np.float32), dense_matrix(schema, items, item_ids))


# ---------------------------------------------------------------------------- dense features
#
# A side-feature column whose values are fixed-length float vectors (numpy float arrays,
# or lists / tuples of numbers holding at least one float: integer lists stay categorical
# "multi" codes) is a *dense* feature, such as a language model's embedding of a title.
# The schema keeps its width, its offset in the item tower's dense matrix, and the
# centring and scaling learned from the training items (the mean vector and
# 1 / RMS distance to it), so that a new item is encoded exactly like the training ones.
# Missing values (None / NaN) encode as the zero vector (the mean item).

def _is_dense_value(v) -> bool:
    if isinstance(v, np.ndarray):
        return v.ndim == 1 and v.size > 0 and v.dtype.kind == "f"
    if isinstance(v, (list, tuple)) and len(v) > 0:
        real = all(isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))
                   for x in v)
        return real and any(isinstance(x, (float, np.floating)) for x in v)
    return False


def _is_missing(v) -> bool:
    return v is None or (isinstance(v, (float, np.floating)) and math.isnan(v))


def _dense_vector(column, key, v, dim: int | None) -> np.ndarray:
    """One dense value as a float64 vector; ValueError naming the column and id if bad."""
    if isinstance(v, (str, bytes)) or not _is_listlike(v) or isinstance(v, (set, frozenset)):
        raise ValueError(f"dense feature column {column!r}: id {key!r} has {type(v).__name__} value {v!r:.60}, "
                         f"expected a vector of {dim if dim is not None else 'fixed'} numbers")
    try:
        x = np.asarray(v, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"dense feature column {column!r}: id {key!r} has non-numeric entries") from None
    if x.ndim != 1 or (dim is not None and x.shape[0] != dim):
        raise ValueError(f"dense feature column {column!r}: id {key!r} has a vector of shape {x.shape}, "
                         f"expected ({dim},): all vectors of a dense column must have the same length")
    if not np.isfinite(x).all():
        raise ValueError(f"dense feature column {column!r}: id {key!r} has non-finite entries (NaN or inf)")
    return x


def _dense_schema(col, nonnull: pd.Series) -> dict:
    first = nonnull.iloc[0]
    dim = len(first)
    M = np.stack([_dense_vector(str(col), k, v, dim) for k, v in nonnull.items()])
    mean = M.mean(0)
    ms = float(((M - mean) ** 2).sum(1).mean())
    scale = 1.0 / math.sqrt(ms) if ms > 0 and math.isfinite(ms) else 1.0
    return {"column": str(col), "kind": "dense", "dim": int(dim),
            "mean": [float(x) for x in mean], "scale": float(scale)}


def dense_schema(schema: list) -> list:
    """The dense entries of a schema, in the order of the dense matrix's columns."""
    return [f for f in schema if f["kind"] == "dense"]


def dense_width(schema: list) -> int:
    return int(sum(f["dim"] for f in dense_schema(schema)))


def encode_dense(schema: list, record, key=None) -> np.ndarray:
    """The concatenated, centred and scaled dense features (D,) float32 of one record."""
    parts = []
    for f in dense_schema(schema):
        v = record.get(f["column"]) if hasattr(record, "get") else None
        if _is_missing(v):
            parts.append(np.zeros(f["dim"], np.float64))
        else:
            x = _dense_vector(f["column"], key, v, f["dim"])
            parts.append((x - np.asarray(f["mean"], np.float64)) * f["scale"])
    if not parts:
        return np.zeros(0, np.float32)
    return np.concatenate(parts).astype(np.float32)


def dense_matrix(schema: list, items: pd.DataFrame | None, item_ids: np.ndarray) -> np.ndarray | None:
    """(N, D) float32 dense features of ``item_ids`` (rows of items absent from ``items``
    are zero); None when the schema has no dense column."""
    D = dense_width(schema)
    if D == 0:
        return None
    out = np.zeros((len(item_ids), D), np.float32)
    if items is None:
        return out
    recs = items.reindex(pd.Index(item_ids)).to_dict("records")
    for i, (key, r) in enumerate(zip(item_ids, recs)):
        out[i] = encode_dense(schema, r, key)
    return out


# ---------------------------------------------------------------------------- prepared data

@dataclass
class Prepared:
    """Interactions encoded for training: per-user time-ordered item indices (CSR)."""

    user_ids: np.ndarray       # (U,) external ids
    item_ids: np.ndarray       # (N,) external ids
    offsets: np.ndarray        # (U+1,)
    items: np.ndarray          # (nnz,) internal item index, time-ordered per user
    rewards: np.ndarray        # (nnz,) float32
    propensity: Optional[np.ndarray]  # (nnz,) float32 or None
    item_count: np.ndarray     # (N,) training popularity


#: columns that look like a reward under another name: :func:`check_log` warns when one is
#: present without a ``reward`` column (it would be ignored)
REWARD_LIKE = ("rating", "ratings", "score", "stars", "click", "clicks", "clicked", "label",
               "watch_time", "watchtime", "dwell", "dwell_time", "purchase", "purchased", "like", "liked")


def _id_types(values: np.ndarray) -> set:
    """The Python types of an object-dtype id column (numpy scalars by kind)."""
    kinds = set()
    for v in values:
        if isinstance(v, (bool, np.bool_)):
            kinds.add("bool")
        elif isinstance(v, (int, np.integer)):
            kinds.add("int")
        elif isinstance(v, (float, np.floating)):
            kinds.add("float")
        elif isinstance(v, str):
            kinds.add("str")
        else:
            kinds.add(type(v).__name__)
    return kinds


def check_log(interactions: pd.DataFrame) -> None:
    """Refuse or warn about logs whose meaning would otherwise be guessed silently.

    * an id column mixing types (e.g. ``1`` and ``"1"``): :class:`TypeError` naming both
      types and an example of each (they would be two different ids);
    * a reward-like column (:data:`REWARD_LIKE`, e.g. ``rating``) without a ``reward``
      column: a :class:`UserWarning` (it is ignored: every row counts as a positive);
    * duplicate (user, item) rows: a :class:`UserWarning` with their count (they are kept as
      repeated interactions).
    """
    import warnings

    for col in ("user", "item"):
        v = interactions[col].to_numpy()
        if v.dtype == object and len(v):
            kinds = _id_types(pd.unique(v))
            if len(kinds) > 1:
                ex = {}
                for x in pd.unique(v):
                    ex.setdefault(sorted(_id_types([x]))[0], x)
                    if len(ex) == len(kinds):
                        break
                shown = ", ".join(f"{k} {ex[k]!r}" for k in sorted(ex))
                raise TypeError(f"interactions.{col} mixes id types ({shown}); ids of different "
                                f"types are different ids: convert the column to one type first")
    if "reward" not in interactions.columns:
        like = [c for c in interactions.columns if str(c).lower() in REWARD_LIKE]
        if like:
            warnings.warn(f"interactions has a {like[0]!r} column but no 'reward' column: {like[0]!r} is "
                          f"ignored and every row counts as a positive interaction (rename it to "
                          f"'reward' to learn from it)", UserWarning, stacklevel=3)
    dup = int(interactions.duplicated(subset=["user", "item"]).sum())
    if dup:
        warnings.warn(f"interactions has {dup} duplicate (user, item) rows: they are kept as repeated "
                      f"interactions (drop_duplicates(['user', 'item']) to count each pair once)",
                      UserWarning, stacklevel=3)


def positive_threshold(rewards: np.ndarray, threshold: Optional[float]) -> tuple:
    """The reward at or above which a row is a positive, and why (see :class:`Config`).

    ``threshold`` given: it is used. ``None`` (the default): rewards that look like star
    ratings (multiples of 0.5, all > 0, at least 3 distinct values, maximum 5 or 10) use
    ``0.8 * max`` (4 of 5 stars, 8 of 10); any other reward column uses "greater than 0"
    (returned as ``0.0`` with ``strict`` True). Returns ``(threshold, strict, reason)``:
    a row is positive when ``reward > threshold`` (strict) or ``reward >= threshold``.
    """
    if threshold is not None:
        return float(threshold), False, "given"
    r = np.asarray(rewards, np.float64)
    if len(r) and r.min() > 0 and np.all(np.mod(r * 2.0, 1.0) == 0.0):
        top = float(r.max())
        if top in (5.0, 10.0) and len(np.unique(r)) >= 3:
            return 0.8 * top, False, f"rewards look like 1-{top:g} star ratings"
    return 0.0, True, "rewards > 0"


def prepare(interactions: pd.DataFrame, item_ids: Optional[np.ndarray] = None) -> Prepared:
    """A log DataFrame (``user``, ``item``, optional ``timestamp``, ``reward``, ``propensity``)
    as a :class:`Prepared`: sorted user ids, the catalogue ``item_ids`` (default the log's
    items, sorted), through :func:`prepare_codes`."""
    if not isinstance(interactions, pd.DataFrame):
        raise TypeError(f"interactions must be a pandas DataFrame, got {type(interactions).__name__}")
    for col in ("user", "item"):
        if col not in interactions.columns:
            raise ValueError(f"interactions needs a {col!r} column; it has {list(interactions.columns)}")
    if len(interactions) == 0:
        raise ValueError("interactions is empty")
    df = interactions
    if df["user"].isna().any() or df["item"].isna().any():
        raise ValueError("interactions has missing user or item ids")
    if item_ids is None:
        item_ids = np.sort(pd.unique(df["item"].to_numpy()))
    it = IdMap(item_ids).to_index(df["item"].to_numpy())
    if (it < 0).any():
        raise ValueError("interactions has items outside the catalogue")
    user_ids = np.sort(pd.unique(df["user"].to_numpy()))
    uc = IdMap(user_ids).to_index(df["user"].to_numpy())
    ts = None
    if "timestamp" in df.columns:
        ts = df["timestamp"].to_numpy()
        if not np.issubdtype(np.asarray(ts).dtype, np.number):
            ts = pd.to_datetime(df["timestamp"]).astype("int64").to_numpy()
    rewards = df["reward"].to_numpy(dtype=np.float32) if "reward" in df.columns else None
    prop = df["propensity"].to_numpy(dtype=np.float32) if "propensity" in df.columns else None
    return prepare_codes(user_ids, item_ids, uc, it, ts, rewards, prop)


def prepare_codes(user_ids: np.ndarray, item_ids: np.ndarray, users: np.ndarray, items: np.ndarray,
                  timestamps: np.ndarray | None = None, rewards: np.ndarray | None = None,
                  propensity: np.ndarray | None = None) -> Prepared:
    """A :class:`Prepared` from a log's dense ids (what :func:`prepare` computes from a
    DataFrame, and :func:`recmeta_sdk.data.scan_parquet` streams from Parquet files).

    Parameters
    ----------
    user_ids : (U,) sorted external user ids; item_ids : (N,) external ids of the catalogue.
    users, items : (n,) int32 / int64 dense ids into them, in the log's row order.
    timestamps : (n,) numbers or None; each user's rows are ordered by it, ties (and every row
        without timestamps) in row order.
    rewards : (n,) float32 or None (every row 1); propensity : (n,) in (0, 1] or None.

    Raises
    ------
    ValueError
        An empty log, an id outside the maps, a non-finite reward, a propensity outside (0, 1].
    """
    n = len(users)
    if n == 0:
        raise ValueError("interactions is empty")
    if len(items) != n or any(a is not None and len(a) != n for a in (timestamps, rewards, propensity)):
        raise ValueError("prepare_codes: the per-row arrays differ in length")
    if (np.asarray(items) < 0).any() or (len(items) and int(np.max(items)) >= len(item_ids)):
        raise ValueError("interactions has items outside the catalogue")
    if (np.asarray(users) < 0).any() or int(np.max(users)) >= len(user_ids):
        raise ValueError("interactions has users outside the user ids")
    # (np.lexsort is stable: rows of one user with equal timestamps keep their order)
    order = np.lexsort((timestamps, users)) if timestamps is not None else np.argsort(users, kind="stable")
    rewards = np.asarray(rewards, np.float32) if rewards is not None else np.ones(n, np.float32)
    if not np.isfinite(rewards).all():
        raise ValueError("interactions.reward has non-finite values")
    prop = None
    if propensity is not None:
        prop = np.asarray(propensity, np.float32)
        if not ((prop > 0) & (prop <= 1)).all():
            raise ValueError("interactions.propensity must be in (0, 1]")
        prop = prop[order]
    counts = np.bincount(users, minlength=len(user_ids))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return Prepared(np.asarray(user_ids), np.asarray(item_ids), offsets, items[order].astype(np.int64),
                    rewards[order], prop, np.bincount(items, minlength=len(item_ids)).astype(np.int64))


def check_codes(columns, users: np.ndarray, items: np.ndarray, n_items: int, stacklevel: int = 3) -> int:
    """:func:`check_log`'s warnings for a log given as dense ids (a streamed Parquet log, whose
    id columns each have one type): a reward-like column (``columns``: the log's names) without
    ``reward``, and duplicate (user, item) rows. Returns the number of duplicate rows."""
    import warnings

    if "reward" not in columns:
        like = [c for c in columns if str(c).lower() in REWARD_LIKE]
        if like:
            warnings.warn(f"interactions has a {like[0]!r} column but no 'reward' column: {like[0]!r} is "
                          f"ignored and every row counts as a positive interaction (rename it to "
                          f"'reward' to learn from it)", UserWarning, stacklevel=stacklevel)
    keys = users.astype(np.int64) * int(n_items) + items
    keys.sort()
    dup = int((keys[1:] == keys[:-1]).sum()) if len(keys) > 1 else 0
    del keys
    if dup:
        warnings.warn(f"interactions has {dup} duplicate (user, item) rows: they are kept as repeated "
                      f"interactions (drop_duplicates(['user', 'item']) to count each pair once)",
                      UserWarning, stacklevel=stacklevel)
    return dup


# ---------------------------------------------------------------------------- batches

@dataclass
class Batch:
    """One training batch of ``B`` samples (rows), as :func:`make_batch` and
    :meth:`recmeta_sdk.training.meta_tasks.TaskSampler.draw` cut it; items are indices
    ``0..N-1`` into the catalogue (N items), users indices into the log's users.

    Attributes
    ----------
    bag_idx : torch.Tensor
        (H,) int64, the items of every sample's input history (its support), concatenated
        in time order: the bag pooled by the user tower.
    bag_off : torch.Tensor
        (B+1,) int64, CSR offsets: sample ``b``'s history is ``bag_idx[bag_off[b]:bag_off[b+1]]``.
    bag_w : torch.Tensor
        (H,) float32, the bag weights, ``1/sqrt(n_b)`` for a history of ``n_b`` items.
    seq : torch.Tensor
        (B, L) int64, the most recent ``L = config.seq_len`` history items of each sample in
        time order, right-padded with ``N`` (the padding index).
    seq_len : torch.Tensor
        (B,) int64, the number of real items in each row of ``seq`` (``min(n_b, L)``).
    uf_idx : torch.Tensor
        (F,) int64, the users' side-feature rows (rows of the user-feature table), after
        ``config.user_feature_dropout``; empty without user features.
    uf_off : torch.Tensor
        (B+1,) int64, CSR offsets of ``uf_idx`` per sample.
    sup_rows : torch.Tensor
        (H,) int64, the sample (row in ``0..B-1``) of each support item, nondecreasing.
    sup_items : torch.Tensor
        (H,) int64, the support items (a copy of ``bag_idx``): masked out of the sample's
        logits, the wide part's input and the inner loop's support set.
    sup_w : torch.Tensor
        (H,) float32, each support item's reward clipped at 0 (``max(reward, 0)``): its
        weight in the inner loop's support loss.
    q_rows : torch.Tensor
        (Q,) int64, the sample of each query item, nondecreasing.
    q_items : torch.Tensor
        (Q,) int64, the query items: the held-out actions the sample is scored on (targets
        of the cross-entropy when positive, logged actions of the RL term and the behaviour
        head).
    q_reward : torch.Tensor
        (Q,) float32, the query items' rewards as prepared (0 for the rows below the
        positive threshold: :func:`recmeta_sdk.train` zeroes them).
    q_prop : torch.Tensor or None
        (Q,) float32, the logged propensities (behaviour probabilities) of the query
        actions; None when the log carries none (the behaviour head estimates them).
    B : int
        The number of samples.
    users : torch.Tensor or None
        (B,) int64, the user of each sample (None when not recorded).
    groups : torch.Tensor or None
        (B,) int64, group tasks only (:mod:`recmeta_sdk.training.meta_tasks`): the task
        index of each sample; None for per-user tasks.
    inner : tuple of torch.Tensor or None
        Group tasks only: the inner loop's support set ``(rows (S,) int64, items (S,) int64,
        weights (S,) float32)`` when it differs from the input history (``sup_*``); None for
        per-user tasks.
    prefix : torch.Tensor or None
        (B,) bool, True where the sample is a time-ordered prefix (a new-user sample);
        None for group tasks.
    """

    bag_idx: torch.Tensor
    bag_off: torch.Tensor
    bag_w: torch.Tensor
    seq: torch.Tensor
    seq_len: torch.Tensor
    uf_idx: torch.Tensor
    uf_off: torch.Tensor
    sup_rows: torch.Tensor
    sup_items: torch.Tensor
    sup_w: torch.Tensor
    q_rows: torch.Tensor
    q_items: torch.Tensor
    q_reward: torch.Tensor
    q_prop: Optional[torch.Tensor]
    B: int
    users: Optional[torch.Tensor] = None
    # group tasks (recmeta_sdk.training.meta_tasks): task index of each row and the inner-loop support
    # set when it differs from the input history (sup_*); None for per-user tasks
    groups: Optional[torch.Tensor] = None
    inner: Optional[tuple] = None
    prefix: torch.Tensor | None = None  # (B,) bool: the sample is a time-ordered prefix


def history_tensors(hists, L: int, n_items: int):
    """Bag CSR (weights 1/sqrt(n)) and right-padded recent sequences for item lists."""
    B = len(hists)
    lens = np.array([len(h) for h in hists], np.int64)
    off = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    idx = np.concatenate(hists).astype(np.int64) if B and off[-1] else np.zeros(0, np.int64)
    w = np.repeat(1.0 / np.sqrt(np.maximum(lens, 1)), lens).astype(np.float32)
    seq = np.full((B, L), n_items, np.int64)
    sl = np.minimum(lens, L)
    for b, h in enumerate(hists):
        if sl[b]:
            seq[b, :sl[b]] = h[-sl[b]:]
    return (torch.from_numpy(idx), torch.from_numpy(off), torch.from_numpy(w),
            torch.from_numpy(seq), torch.from_numpy(sl))


def user_feature_rows(user_feats, users, cfg: Config, rng: np.random.Generator, part: Optional[slice] = None):
    """CSR (offsets (B+1,), rows) of the users' side-feature rows for one batch, each user's
    features dropped with probability ``cfg.user_feature_dropout`` (empty without features).
    ``part``: the draws are made for every user of ``users``, the rows returned for
    ``users[part]`` only (one rank's part of a global batch, see :func:`make_batch`)."""
    if user_feats is None:
        B = len(users) if part is None else len(range(len(users))[part])
        return np.zeros(B + 1, np.int64), np.zeros(0, np.int64)
    uf_off_np, uf_idx_np = user_feats
    keepu = rng.random(len(users)) >= cfg.user_feature_dropout
    if part is not None:
        users, keepu = users[part], keepu[part]
    rows = [uf_idx_np[uf_off_np[u]:uf_off_np[u + 1]] if keepu[b] else np.zeros(0, np.int64)
            for b, u in enumerate(users)]
    uo = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
    ui = np.concatenate(rows).astype(np.int64) if uo[-1] else np.zeros(0, np.int64)
    return uo, ui


def make_batch(prep: Prepared, users: np.ndarray, cfg: Config, rng: np.random.Generator,
               user_feats=None, part: Optional[slice] = None) -> Batch:
    """Cut one support / query sample per user (see the module docstring).

    ``part`` (a slice of ``users``, optional): the random cuts are drawn for every user, in
    the same order and with the same draws as without it, but only the samples of
    ``users[part]`` are built: one rank's part of a global batch in distributed training
    (:mod:`recmeta_sdk.training.distributed`), so that the ranks' parts together are the
    batch one process would cut and ``rng`` stays in step on every rank."""
    N = len(prep.item_ids)
    own = np.ones(len(users), bool)
    if part is not None:
        own[:] = False
        own[part] = True
    sup, sup_r, q, q_r, q_p, is_prefix = [], [], [], [], [], []
    for j, u in enumerate(users):
        lo, hi = prep.offsets[u], prep.offsets[u + 1]
        seq, rew = prep.items[lo:hi], prep.rewards[lo:hi]
        prop = prep.propensity[lo:hi] if prep.propensity is not None else None
        n = hi - lo
        prefix = bool(rng.random() < cfg.prefix_prob)
        if prefix:
            m = int(rng.integers(1, min(cfg.max_prefix, n - 1) + 1))
            keep = np.zeros(n, bool)
            keep[:m] = True
        else:
            keep = rng.random(n) >= cfg.input_dropout
            if keep.all():
                keep[rng.integers(n)] = False
            if not keep.any():
                keep[rng.integers(n)] = True
        if not own[j]:
            continue
        is_prefix.append(prefix)
        # non-positive rows (impressions, low ratings: reward 0 after train's threshold) are
        # context in the support (what the user was shown) and logged actions in the query
        # (behaviour estimate, RL term), never CE targets (see batch_loss)
        sup.append(seq[keep]); sup_r.append(rew[keep])
        q.append(seq[~keep]); q_r.append(rew[~keep])
        if prop is not None:
            q_p.append(prop[~keep])
    uo, ui = user_feature_rows(user_feats, users, cfg, rng, part)
    users = np.asarray(users)[own]
    bag_idx, bag_off, bag_w, sq, sl = history_tensors(sup, cfg.seq_len, N)
    B = len(users)
    sup_rows = torch.from_numpy(np.repeat(np.arange(B), [len(s) for s in sup]))
    q_rows = torch.from_numpy(np.repeat(np.arange(B), [len(s) for s in q]))
    def cat(parts, dtype):
        return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)

    sup_w = cat(sup_r, np.float32)
    return Batch(bag_idx, bag_off, bag_w, sq, sl, torch.from_numpy(ui), torch.from_numpy(uo),
                 sup_rows, bag_idx.clone(), torch.from_numpy(np.maximum(sup_w, 0.0)),
                 q_rows, torch.from_numpy(cat(q, np.int64)), torch.from_numpy(cat(q_r, np.float32)),
                 torch.from_numpy(cat(q_p, np.float32)) if q_p else None, B,
                 torch.from_numpy(np.asarray(users, dtype=np.int64)), prefix=torch.tensor(is_prefix, dtype=torch.bool))


# ---------------------------------------------------------------------------- losses

def reinforce_weights(pi: torch.Tensor, beta: torch.Tensor, cap: float, K: int) -> torch.Tensor:
    """Chen et al. 2019 off-policy top-K weights ``min(pi/beta, cap) * K (1 - pi)^(K-1)``."""
    ratio = torch.clamp(pi / beta.clamp(min=1e-12), max=cap)
    lam = K * torch.pow((1.0 - pi).clamp(min=0.0), K - 1)
    return ratio * lam


def reinforce_loss(logp_a: torch.Tensor, reward: torch.Tensor, beta: torch.Tensor,
                   cap: float, K: int) -> torch.Tensor:
    """Per-action corrected REINFORCE loss ``-r * w(pi, beta) * log pi`` (w held constant).

    Its gradient with respect to the logits s of the state is
    ``-r * w * (e_a - softmax(s))`` (tested in closed form).
    """
    w = reinforce_weights(torch.exp(logp_a.detach()), beta, cap, K)
    return -(reward * w * logp_a)


def _segment_mean(values, rows, B):
    tot = torch.zeros(B).index_add(0, rows, values)
    cnt = torch.zeros(B).index_add(0, rows, torch.ones_like(values)).clamp(min=1)
    return tot / cnt


def _user_weights(rows, B, power: float, normalise: bool = True) -> torch.Tensor:
    """Weights (B,) summing to 1 of the samples of a batch: proportional to
    ``(query size) ** power`` (0: every sample counts the same; 1: every query item does,
    as in Mult-DAE's summed multinomial likelihood). ``normalise=False``: not divided by
    their sum."""
    n = torch.bincount(rows, minlength=B).to(torch.float32)
    w = torch.where(n > 0, n.clamp(min=1.0).pow(power), torch.zeros_like(n))
    return w / w.sum().clamp(min=1e-12) if normalise else w


def batch_loss(net: RecMetaNet, batch: Batch, cfg: Config, item_logq: Optional[torch.Tensor] = None,
               gen: Optional[torch.Generator] = None, meta: Optional[bool] = None, cross=None,
               use_wide: bool = True, dist=None):
    """The training objective on one batch (see the module docstring). Returns (loss, stats).

    ``dist`` (distributed training, :mod:`recmeta_sdk.training.distributed`): ``batch`` is
    this rank's part of a global batch of ``dist.global_batch`` samples; the sample weights
    are normalised by their sums over every rank (``dist.all_reduce_sum``) and the batch
    means taken over the global batch, so that the ranks' losses sum to the loss one process
    computes on the whole batch."""
    meta = (cfg.meta == "fomaml") if meta is None else meta
    X, V = net.item_vectors()
    h = net.user_state(X, batch.bag_idx, batch.bag_off, batch.bag_w, batch.seq, batch.seq_len,
                       batch.uf_idx, batch.uf_off)
    B = batch.B
    if cross is not None and net.has_wide:
        # cross-fitted wide part: users of fold f use the weights fitted without fold f (each
        # fold's rows pooled on their own: one (B, N) result, not one per fold)
        offset = _fold_offsets(net, batch.sup_rows, batch.sup_items, B, cross[0][batch.users], cross[1])
    elif use_wide:
        offset = net.wide_offset(batch.sup_rows, batch.sup_items, B)
    else:  # the deep part alone (the wide part is weighed in after training: tune_fusion)
        offset = None
    if meta and cfg.inner_steps > 0 and batch.groups is not None:
        gamma, delta = net.adapt_phi(h, V, *batch.inner, cfg.inner_steps, offset=offset, groups=batch.groups)
    elif meta and cfg.inner_steps > 0:
        gamma, delta = net.adapt_phi(h, V, batch.sup_rows, batch.sup_items, batch.sup_w, cfg.inner_steps,
                                     offset=offset)
        if cfg.meta_tasks == "prefix" and batch.prefix is not None:
            # only the cold-start samples (prefixes) are meta-learning tasks; the others are
            # scored at the initial adaptation parameters
            sel = batch.prefix[:, None]
            gamma = torch.where(sel, gamma, net.phi_gamma.expand(B, -1))
            delta = torch.where(sel, delta, net.phi_delta.expand(B, -1))
    else:
        gamma, delta = net.phi_gamma.expand(B, -1), net.phi_delta.expand(B, -1)
    hp = net.apply_phi(h, gamma, delta)
    N = net.n_items
    sampled = N > cfg.full_softmax_max
    if not sampled:
        logits = net.logits(hp, V, offset)
        logits = logits.index_put((batch.sup_rows, batch.sup_items), torch.tensor(-1e9))
        logp_all = torch.log_softmax(logits, 1)
        logp = logp_all[batch.q_rows, batch.q_items]
        blog = torch.log_softmax(net.behaviour_logits(h, V), 1)
        blogp = blog[batch.q_rows, batch.q_items]
        ent = -(logp_all.exp() * logp_all).sum(1).mean() if cfg.entropy > 0 else torch.zeros(())
    else:
        # sampled softmax with log-Q correction over in-batch query items + negatives
        q = torch.exp(item_logq)
        neg = torch.multinomial(q, cfg.n_negatives, replacement=True, generator=gen)
        cand, inv = torch.unique(torch.cat([batch.q_items, neg]), return_inverse=True)
        corr = torch.log((cfg.n_negatives * q[cand]).clamp(min=1e-12))
        Vc = V[cand]
        sc = hp @ Vc.T + net.item_bias[cand]
        if offset is not None:
            sc = sc + offset[:, cand]
        logits = sc / cfg.temperature - corr
        pos = torch.searchsorted(cand, batch.sup_items)
        hit = (pos < cand.numel()) & (cand[pos.clamp(max=cand.numel() - 1)] == batch.sup_items)
        logits = logits.index_put((batch.sup_rows[hit], pos[hit]), torch.tensor(-1e9))
        logp_all = torch.log_softmax(logits, 1)
        qpos = inv[: batch.q_items.numel()]
        logp = logp_all[batch.q_rows, qpos]
        bl = net.beta_map(h.detach()) @ Vc.detach().T + net.beta_bias[cand] - corr
        blogp = torch.log_softmax(bl, 1)[batch.q_rows, qpos]
        ent = -(logp_all.exp() * logp_all).sum(1).mean() if cfg.entropy > 0 else torch.zeros(())
    # supervised targets: the positive query rows only (reward > 0; see train's
    # positive_threshold); the others inform the RL term and the behaviour estimate
    pos = batch.q_reward > 0
    if dist is not None:
        return _dist_loss(net, batch, cfg, dist, pos, logp, blogp, ent, hp)
    if bool(pos.all()):
        uw = _user_weights(batch.q_rows, B, cfg.query_weight)
        ce = (uw * _segment_mean(-logp, batch.q_rows, B)).sum()
    else:
        prow = batch.q_rows[pos]
        ce = (_user_weights(prow, B, cfg.query_weight) * _segment_mean(-logp[pos], prow, B)).sum()
        uw = _user_weights(batch.q_rows, B, cfg.query_weight)
    loss = cfg.ce_weight * ce
    if cfg.rl_weight > 0:
        beta = batch.q_prop if batch.q_prop is not None else torch.exp(blogp.detach())
        rl = (uw * _segment_mean(reinforce_loss(logp, batch.q_reward, beta, cfg.is_cap, cfg.topk_k),
                                 batch.q_rows, B)).sum()
        loss = loss + cfg.rl_weight * rl
    if batch.q_prop is None:
        loss = loss + _segment_mean(-blogp, batch.q_rows, B).mean()
    if cfg.entropy > 0:
        loss = loss - cfg.entropy * ent
    if cfg.l2 > 0:
        loss = loss + cfg.l2 * (hp.pow(2).sum(1).mean())
    return loss, {"ce": float(ce.detach())}


def _dist_loss(net, batch, cfg, dist, pos, logp, blogp, ent, hp):
    """The tail of :func:`batch_loss` for one rank's part of a global batch (see ``dist``
    there): the same terms, normalised over the global batch."""
    B = batch.B
    prow = batch.q_rows[pos]
    w_all = _user_weights(batch.q_rows, B, cfg.query_weight, normalise=False)
    w_pos = _user_weights(prow, B, cfg.query_weight, normalise=False)
    tot = dist.all_reduce_sum(torch.stack([w_all.sum(), w_pos.sum()]).detach())
    frac = B / dist.global_batch  # this rank's share of the batch means
    uw = w_all / tot[0].clamp(min=1e-12)
    ce = (w_pos / tot[1].clamp(min=1e-12) * _segment_mean(-logp[pos], prow, B)).sum()
    loss = cfg.ce_weight * ce
    if cfg.rl_weight > 0:
        beta = batch.q_prop if batch.q_prop is not None else torch.exp(blogp.detach())
        rl = (uw * _segment_mean(reinforce_loss(logp, batch.q_reward, beta, cfg.is_cap, cfg.topk_k),
                                 batch.q_rows, B)).sum()
        loss = loss + cfg.rl_weight * rl
    if batch.q_prop is None:
        loss = loss + _segment_mean(-blogp, batch.q_rows, B).mean() * frac
    if cfg.entropy > 0:
        loss = loss - cfg.entropy * ent * frac
    if cfg.l2 > 0:
        loss = loss + cfg.l2 * (hp.pow(2).sum(1).mean()) * frac
    return loss, {"ce": float(ce.detach())}


# ---------------------------------------------------------------------------- wide part

def ease_from_gram(G: torch.Tensor, reg: float) -> torch.Tensor:
    """EASE weights (N, N) float32 from the (N, N) float64 Gram matrix ``X^T X`` (not changed).

    The weights are :func:`recmeta_sdk.evaluation.baselines.ease_weights` (Cholesky), as float32."""
    W = _ease_weights(G, reg)
    # (the LAPACK inverse is column-major: made row-major once here, not copied by every
    # embedding bag over its rows, 11 MB per fold per training step on MovieLens-100K)
    return W.to(torch.float32).contiguous()


def _interaction_matrix(prep: Prepared):
    """(U, N) float64 multi-hot matrix of the positive rows (reward > 0), as a scipy CSR
    matrix (memory linear in the log; never a dense users x items array)."""
    import scipy.sparse as sp

    U, N = len(prep.user_ids), len(prep.item_ids)
    users = np.repeat(np.arange(U, dtype=np.int64), np.diff(prep.offsets))
    pos = prep.rewards > 0
    X = sp.csr_matrix((np.ones(int(pos.sum())), (users[pos], prep.items[pos])), shape=(U, N))
    X.sum_duplicates()
    X.data[:] = 1.0  # a repeated (user, item) pair is one 1, as in a multi-hot matrix
    return X


def _gram(X) -> torch.Tensor:
    """(N, N) float64 dense Gram matrix ``X^T X`` of a sparse (U, N) 0/1 matrix (integer
    counts: exact in float64, so equal bit for bit to the dense product)."""
    return torch.from_numpy(np.ascontiguousarray((X.T @ X).toarray()))


def _rows(X, mask: np.ndarray):
    """The rows of the sparse matrix ``X`` where ``mask`` (U,) bool is True."""
    return X[np.flatnonzero(mask)]


def fit_wide(net: RecMetaNet, prep: Prepared, cfg: Config, rng: np.random.Generator):
    """Fill the network's wide part with the EASE weights of the whole training log (used at
    serving time) and return cross-fitted weights for training: users are cut into 5 folds and the
    samples of one fold see the weights fitted on the other four, so that the wide part never
    scores a query item it memorised from that very user (which would teach the deep part
    to trust it more than it deserves on new data). Returns (fold of each user, [W_-f])
    or None when the wide part is disabled. A sparse wide part (see
    :meth:`RecMetaNet.wide_mode`) is fitted by :func:`sparse_ease` and its ``W_-f`` are
    :class:`~recmeta_sdk.model.network.SparseWide` matrices."""
    if not net.has_wide:
        return None
    U = len(prep.user_ids)
    X = _interaction_matrix(prep)
    if net.wide_sparse is not None:
        K = 5 if U >= 10 else 2
        fold = rng.permutation(U) % K
        Ws = sparse_ease(X, cfg.wide_reg, cfg.wide_neighbours, folds=fold, block_bytes=_block_bytes(cfg))
        net.set_wide_sparse(Ws[0])
        return torch.from_numpy(fold), Ws[1:]
    G = _gram(X)
    with torch.no_grad():
        net.wide.copy_(ease_from_gram(G, cfg.wide_reg))
    return _cross_fit(X, G, cfg.wide_reg, 0.0, rng, float32=False)


def _cross_fit(X, G: torch.Tensor, reg: float, pop_exp: float, rng: np.random.Generator,
               float32: bool = True) -> tuple:
    """Cross-fitted dense EASE weights of the users (rows) of ``X`` (Gram matrix ``G``): users
    are cut into 5 folds (2 under 10 users) and fold f's users are scored with the weights of
    the other four, ridge ``reg``, popularity-scaled by ``pop_exp``; the Cholesky in float32
    when ``float32`` (half the time; the validation-tuned path) else float64. Returns (fold of
    each user, [W_-f])."""
    U = X.shape[0]
    K = 5 if U >= 10 else 2
    fold = torch.from_numpy(rng.permutation(U) % K)
    others = []
    for f in range(K):
        # the Gram matrix without fold f: G minus fold f's own (integer counts in float64: exact)
        Gf = G - _gram(_rows(X, (fold == f).numpy()))
        W = (_ease_weights(Gf.to(torch.float32), reg).contiguous() if float32 else ease_from_gram(Gf, reg))
        others.append(W * _pop_scale(Gf, pop_exp) if pop_exp else W)
    return fold, others


def _block_bytes(cfg: Config) -> int:
    """Working memory of one block of :func:`sparse_ease`: a quarter of the wide part's budget
    (64 MiB at least)."""
    b = cfg.wide_budget_bytes if cfg.wide_budget_bytes is not None else 2**30
    return max(int(b) // 4, 64 * 2**20)


def _topm_cooccurrence(X, Xt, XH, H: np.ndarray, m: int, fold_of_row, K: int, block_bytes: int) -> tuple:
    """Each item's ``m`` most co-occurring other items among the candidates ``H`` (sorted item
    ids; ties: the smaller id first) with the co-occurrence counts per user fold
    (``fold_of_row`` (U,) int in ``[0, K)``). ``XH`` is ``X[:, H]``.

    The Gram rows ``X^T X[:, H]`` are computed for blocks of items whose products (the sum over
    the block's users of their history lengths) fit ``block_bytes``, and only the top ``m`` of
    each row are kept, so memory is linear in the log plus ``N m``. Returns ``(indptr (N+1,)
    int64, cols (nnz,) int64 positions in H, counts (K, nnz) float64)`` in CSR order (each row
    by count, descending)."""
    N, U = X.shape[1], X.shape[0]
    row_len = np.diff(XH.indptr).astype(np.float64)
    cost = np.asarray(Xt @ row_len).ravel()  # products of each item's Gram row
    per = max(int(block_bytes) // 48, 1)  # ~48 bytes per product (indices, values, sort keys)
    if K > 1:
        sel_f = [np.flatnonzero(fold_of_row == f) for f in range(K)]
        XHf = [XH[r] for r in sel_f]
        Xtf = [X[r].T.tocsr() for r in sel_f]
    ind_parts, cnt_parts, lens = [], [], np.zeros(N, np.int64)
    start = 0
    csum = np.concatenate([[0.0], np.cumsum(cost)])
    while start < N:
        stop = int(np.searchsorted(csum, csum[start] + per, side="right")) - 1
        stop = min(max(stop, start + 1), N)
        G = (Xt[start:stop] @ XH).tocsr()
        G.sort_indices()
        r = np.repeat(np.arange(stop - start, dtype=np.int64), np.diff(G.indptr))
        c = G.indices.astype(np.int64)
        v = G.data
        keep = H[c] != r + start  # not the item itself
        r, c, v = r[keep], c[keep], v[keep]
        # by row, count descending, id ascending (a stable sort of one key; ids are in order)
        order = np.argsort(r * (U + 1) + (U - v.astype(np.int64)), kind="stable")
        r, c, v = r[order], c[order], v[order]
        cnt = np.bincount(r, minlength=stop - start)
        first = np.concatenate([[0], np.cumsum(cnt)])[:-1]
        sel = (np.arange(len(r)) - first[r]) < m
        r, c, v = r[sel], c[sel], v[sel]
        if K > 1:  # each fold's counts of the kept pairs
            per_fold = np.zeros((K, len(r)))
            q = r * len(H) + c
            for f in range(K):
                Gf = (Xtf[f][start:stop] @ XHf[f]).tocsr()
                Gf.sort_indices()
                kf = np.repeat(np.arange(stop - start, dtype=np.int64), np.diff(Gf.indptr)) * len(H) + Gf.indices
                if len(kf):
                    pos = np.minimum(np.searchsorted(kf, q), len(kf) - 1)
                    per_fold[f] = np.where(kf[pos] == q, Gf.data[pos], 0.0)
        else:
            per_fold = v[None, :]
        ind_parts.append(c)
        cnt_parts.append(per_fold)
        lens[start:stop] = np.minimum(cnt, m)
        del G, r, c, v
        start = stop
    indptr = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    cols = np.concatenate(ind_parts) if ind_parts else np.zeros(0, np.int64)
    counts = np.concatenate(cnt_parts, 1) if cnt_parts else np.zeros((K, 0))
    return indptr, cols, counts


def sparse_ease(X, reg: float, m: int, folds: Optional[np.ndarray] = None, block_bytes: int = 2**28,
                pop_exp: float = 0.0) -> list:
    """Item-neighbourhood EASE: sparse wide weights in memory linear in the log.

    The neighbour candidates ``H`` are the most popular items (the most positives; ties: the
    smaller id), as many as keep the exact Gram block ``X_H^T X_H`` of every user fold
    (float32) within ``block_bytes``: all of them when ``K H^2 * 4 <= block_bytes``. For each
    item ``a`` (a column of EASE's ``W``: the weights with which history items score ``a``),
    ``S_a`` is the set of the ``m`` candidates that co-occur with ``a`` most often (ties: the
    smaller id), and ``W[S_a, a]`` solves EASE's ridge regression restricted to them, with the
    exact Gram block: ``(G[S_a, S_a] + reg I) w = G[S_a, a]``. Relation to the dense EASE
    weights (:func:`recmeta_sdk.evaluation.baselines.ease_weights`): EASE's column ``a`` is
    the same ridge regression over every other item, so when every pair of items co-occurs,
    every item is a candidate and ``m >= N - 1``, the weights are EASE's (up to rounding);
    otherwise each column is EASE's regression on ``a``'s neighbourhood.

    Parameters
    ----------
    X : scipy sparse (U, N) 0/1 matrix of users' positive interactions.
    reg : float > 0, the ridge.
    m : int > 0, neighbours per item.
    folds : (U,) int array or None. With K folds the result also holds, for each fold f, the
        weights fitted on the other folds' users (the same neighbourhoods, counts without fold f).
    block_bytes : the working memory of one block (and of the candidates' Gram blocks).
    pop_exp : popularity exponent: column ``a`` scaled by ``(count_a + 1)^-pop_exp``.

    Returns
    -------
    list of :class:`~recmeta_sdk.model.network.SparseWide`: the weights of the whole log, then
    one per fold (without it).
    """
    import scipy.sparse as sp

    if isinstance(reg, bool) or not isinstance(reg, (int, float)) or not math.isfinite(reg) or reg <= 0:
        raise ValueError(f"sparse EASE reg must be a finite number > 0, got {reg!r}")
    if isinstance(m, bool) or not isinstance(m, int) or m <= 0:
        raise ValueError(f"sparse EASE neighbours m must be a positive int, got {m!r}")
    X = sp.csr_matrix(X, dtype=np.float64)
    U, N = X.shape
    fold_of_row = np.zeros(U, np.int64) if folds is None else np.asarray(folds, np.int64)
    if len(fold_of_row) != U:
        raise ValueError(f"folds has {len(fold_of_row)} entries, X has {U} rows")
    K = 1 if folds is None or U == 0 else int(fold_of_row.max()) + 1
    fold_rows = [np.flatnonzero(fold_of_row == f) for f in range(K)]
    item_count = np.bincount(X.indices, minlength=N)
    n_cand = int(min(N, max(1, math.isqrt(max(int(block_bytes) // (4 * K), 1)))))
    H = np.sort(np.lexsort((np.arange(N), -item_count))[:n_cand])  # the candidates, by id
    XH = X[:, H].tocsr()
    Xt = X.T.tocsr()
    indptr, pos, counts = _topm_cooccurrence(X, Xt, XH, H, m, fold_of_row, K, block_bytes)
    cols = H[pos]
    # the candidates' exact Gram block per fold (float32 counts: exact below 2^24 users)
    GH = np.stack([(XH[r].T @ XH[r]).toarray().astype(np.float32) for r in fold_rows])
    diag_f = np.stack([np.bincount(X[r].indices, minlength=N) for r in fold_rows]).astype(np.float64)
    tot_cnt, tot_diag = counts.sum(0), diag_f.sum(0)
    variants = [(None, tot_cnt, tot_diag)]
    if folds is not None:
        variants += [(f, tot_cnt - counts[f], tot_diag - diag_f[f]) for f in range(K)]
    lens = np.diff(indptr)
    mm = int(lens.max()) if N and len(lens) else 0
    slot = np.arange(len(cols)) - np.repeat(indptr[:-1], lens)
    owner = np.repeat(np.arange(N), lens)
    out_vals = [np.zeros(len(cols), np.float32) for _ in variants]
    if mm:
        S = np.full((N, mm), -1, np.int64)  # each item's neighbours, as positions in H (-1: none)
        S[owner, slot] = pos
        E = np.full((N, mm), -1, np.int64)  # their entries in the CSR lists
        E[owner, slot] = np.arange(len(cols))
        bsz = max(1, min(N, int(block_bytes) // max(1, mm * mm * 8 * (K + 2))))
        ar = np.arange(mm)
        for a0 in range(0, N, bsz):
            a1 = min(N, a0 + bsz)
            Sb, Eb = S[a0:a1], E[a0:a1]
            valid = Sb >= 0
            Sc = np.maximum(Sb, 0)
            blocks = GH[:, Sc[:, :, None], Sc[:, None, :]].astype(np.float64)  # (K, b, mm, mm)
            blocks *= (valid[:, :, None] & valid[:, None, :])[None]
            full = blocks.sum(0)
            for vi, (f, cnt, dg) in enumerate(variants):
                M = full if f is None else full - blocks[f]
                M[:, ar, ar] = np.where(valid, dg[H[Sc]] + reg, 1.0)
                rhs = np.where(valid, cnt[np.maximum(Eb, 0)], 0.0)
                Mt, rt = torch.from_numpy(M), torch.from_numpy(rhs)[:, :, None]
                L, info = torch.linalg.cholesky_ex(Mt)
                sol = torch.cholesky_solve(rt, L)
                bad = info != 0
                if bool(bad.any()):  # (G + reg I is positive definite; only rounding could get here)
                    sol[bad] = torch.linalg.solve(Mt[bad], rt[bad])
                w = sol[:, :, 0].numpy()
                out_vals[vi][Eb[valid]] = w[valid]
    # CSR rows for the embedding-bag-like product: row j (a history item) -> the items a it scores
    results = []
    for vi, (_, _, dg) in enumerate(variants):
        vals = out_vals[vi]
        if pop_exp:
            vals = vals * ((dg + 1.0) ** -pop_exp)[owner].astype(np.float32)
        Wt = sp.csr_matrix((vals, (cols, owner)), shape=(N, N))  # W[j, a] = w of neighbour j for a
        results.append(SparseWide.from_scipy(Wt))
    return results


#: the EASE ridge used when none is given and there is no validation set to tune it on
DEFAULT_WIDE_REG = 250.0
#: at most this many users are held out for the validation set carved from the log
MAX_VAL_USERS = 2000


def _keep_rows(prep: Prepared, keep: np.ndarray) -> Prepared:
    """``prep`` with only the rows where ``keep`` (nnz,) is True (every user stays, with
    fewer or no rows; the popularity is recounted)."""
    n = np.diff(prep.offsets)
    counts = np.bincount(np.repeat(np.arange(len(n)), n)[keep], minlength=len(n))
    return Prepared(prep.user_ids, prep.item_ids, np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
                    prep.items[keep], prep.rewards[keep],
                    prep.propensity[keep] if prep.propensity is not None else None,
                    np.bincount(prep.items[keep], minlength=len(prep.item_ids)).astype(np.int64))


def calibration_split(prep: Prepared, cfg: Config, rng: np.random.Generator, users: Optional[float] = None,
                      holdout: str = "random"):
    """Hold out ``calib_holdout`` of the interactions (at least one) of a random fraction
    ``calib_users`` of the users with 5 or more interactions. Returns (the remaining log as
    a :class:`Prepared`, held-out users (C,), held-out item sets) or None when no user
    qualifies."""
    n = np.diff(prep.offsets)
    cand = np.flatnonzero(n >= 5)
    n_cal = int(round((cfg.calib_users if users is None else users) * len(cand)))
    if users is not None:
        n_cal = min(n_cal, MAX_VAL_USERS)
    if n_cal < 1:
        return None
    cal_users = np.sort(rng.choice(cand, n_cal, replace=False))
    keep = np.ones(len(prep.items), bool)
    truth = []
    latest = (np.zeros(n_cal, bool) if holdout == "random" else np.ones(n_cal, bool) if holdout == "latest"
              else rng.permutation(n_cal) < n_cal // 2)  # mixed: half the users each way
    for j, u in enumerate(cal_users):
        lo, hi = prep.offsets[u], prep.offsets[u + 1]
        m = max(1, int(round(cfg.calib_holdout * (hi - lo))))
        if latest[j]:  # the user's future: the last m interactions by time
            pos = np.arange(hi - m, hi)
        else:
            pos = lo + rng.choice(hi - lo, m, replace=False)
        keep[pos] = False
        # positive feedback only; an item held out and also kept (a repeat) is not a target
        kept = set(prep.items[lo:hi][keep[lo:hi]].tolist())
        truth.append({i for i in prep.items[pos][prep.rewards[pos] > 0].tolist() if i not in kept})
    rest = _keep_rows(prep, keep)
    ok = np.array([len(t) > 0 for t in truth])
    return rest, cal_users[ok], [t for t, o in zip(truth, ok) if o], latest[ok]


#: multipliers of alpha tried by :func:`calibrate_wide`
CALIB_GRID = tuple(float(2.0 ** e) for e in np.arange(-1.0, 4.01, 0.25))
#: temperatures tried after a calibration that moved alpha
TEMPERATURE_GRID = tuple(float(2.0 ** e) for e in np.arange(-1.0, 4.01, 0.25))


#: bytes of one (users x items) float32 score matrix of held-out scoring (calibration, early
#: stopping): the users are scored in blocks of rows that fit it, so that the working memory is a
#: few such blocks whatever the catalogue (one block, the whole set, on MovieLens-sized data)
SCORE_BLOCK_BYTES = 2**24


def _row_blocks(B: int, N: int) -> list:
    """Slices covering ``range(B)`` of at most ``SCORE_BLOCK_BYTES // (4 N)`` rows (1 at least)."""
    step = max(1, SCORE_BLOCK_BYTES // max(4 * int(N), 1))
    return [slice(a, min(a + step, B)) for a in range(0, B, step)] or [slice(0, 0)]


def _fold_offsets(net: RecMetaNet, rows: torch.Tensor, items: torch.Tensor, B: int, fold_of_row: torch.Tensor,
                  Ws) -> torch.Tensor:
    """(B, N) cross-fitted wide logits: row ``b``'s history (``items`` where ``rows == b``,
    ``rows`` nondecreasing) scored by the weights of its fold, ``Ws[fold_of_row[b]]``. Each
    fold's rows are pooled in one bag call of their own (its rows only, copied in): the memory
    is the result and one fold's rows, not a (B, N) matrix per fold."""
    out = torch.zeros(B, net.n_items)
    fold_item = fold_of_row[rows]
    for f, W_other in enumerate(Ws):
        sel = fold_item == f
        if sel.any():
            mine, local = torch.unique_consecutive(rows[sel], return_inverse=True)
            out.index_copy_(0, mine, net.wide_offset(local, items[sel], int(mine.numel()), W_other))
    return out


def calibrate_wide(net: RecMetaNet, prep: Prepared, cal_users: np.ndarray, truth: list, cross,
                   cfg: Config, user_feats=None, k: int = 10) -> dict:
    """Fit alpha's multiplier m (``net.wide_scale``) on held-out items of training users.

    Each held-out user's remaining history is the support; the
    target is its held-out positive items, scored as served (adaptation on the support,
    which is excluded from the ranking) with the cross-fitted EASE weights of the user's
    fold (weights that never saw the user, as the served ones never saw the held-out
    items). The m with the best NDCG@k + Recall@k is kept if its mean per-user gain over
    m = 1 exceeds one standard error (else alpha stays as trained); when it moves, the
    temperature is re-fit by the held-out log-likelihood so that the sharper policy's
    probabilities stay calibrated. Returns {m: score}.

    The users are scored in blocks of rows (:data:`SCORE_BLOCK_BYTES` per users x items
    matrix), so memory is a few blocks plus the top-k lists, never a users x items matrix."""
    N = net.n_items
    hists = [prep.items[prep.offsets[u]:prep.offsets[u + 1]] for u in cal_users]
    rews = [np.maximum(prep.rewards[prep.offsets[u]:prep.offsets[u + 1]], 0.0) for u in cal_users]
    B = len(hists)
    bi, bo, bw, sq, sl = history_tensors(hists, cfg.seq_len, N)
    if user_feats is not None:
        uf_off_np, uf_idx_np = user_feats
        rows_f = [uf_idx_np[uf_off_np[u]:uf_off_np[u + 1]] for u in cal_users]
        uo = np.concatenate([[0], np.cumsum([len(r) for r in rows_f])]).astype(np.int64)
        ui = np.concatenate(rows_f).astype(np.int64) if uo[-1] else np.zeros(0, np.int64)
    else:
        uo, ui = np.zeros(B + 1, np.int64), np.zeros(0, np.int64)
    rows = torch.from_numpy(np.repeat(np.arange(B), [len(x) for x in hists]))
    w = torch.from_numpy(np.concatenate(rews).astype(np.float32))
    lr = None if cfg.meta == "fomaml" else cfg.inner_lr
    fold = cross[0][torch.from_numpy(np.asarray(cal_users, np.int64))]
    n_lo, n_hi = 0.0, 1.0  # one multiplier for every non-empty history
    result, per_user = {}, {}
    blocks = _row_blocks(B, N)
    kk = min(k, N)
    net.eval()
    with torch.no_grad():
        net.wide_scale.copy_(torch.tensor([0.0, n_lo, n_hi]))
        X, V = net.item_vectors()
        h = net.user_state(X, bi, bo, bw, sq, sl, torch.from_numpy(ui), torch.from_numpy(uo))
        # base carries alpha at m = 1; the multiplier of each user at m is m ** ramp(n)
        n_hist = torch.tensor([len(np.unique(x)) for x in hists], dtype=torch.float32)
        ramp = ((torch.log1p(n_hist) - math.log1p(n_lo)) / (math.log1p(n_hi) - math.log1p(n_lo))).clamp(0.0, 1.0)

        def block(b: slice) -> tuple:
            """(rows, items, weights, base (b, N)) of the users in ``b``."""
            lo, hi = int(bo[b.start]), int(bo[b.stop])
            r, it = rows[lo:hi] - b.start, bi[lo:hi]
            return r, it, w[lo:hi], _fold_offsets(net, r, it, b.stop - b.start, fold[b], cross[1])

        def logits_at(m, b: slice, r, it, wb, base):
            offset = torch.pow(torch.tensor(m), ramp[b])[:, None] * base
            gamma, delta = net.adapt_phi(h[b], V, r, it, wb, cfg.inner_steps, lr=lr, offset=offset)
            sc = net.logits(net.apply_phi(h[b], gamma, delta), V, offset)
            sc[r, it] = -float("inf")
            return sc

        tops = {m: np.zeros((B, kk), np.int64) for m in CALIB_GRID}
        for b in blocks:
            parts = block(b)
            for m in CALIB_GRID:
                tops[m][b] = torch.topk(logits_at(m, b, *parts), kk, dim=1).indices.numpy()
            del parts
        for m in CALIB_GRID:
            per_user[m] = _ndcg_plus_recall(tops[m], truth, k)
            result[m] = float(per_user[m].mean())
        del tops
        # keep alpha as trained unless the best m is clearly better on the held-out set (its
        # mean paired per-user gain over m = 1 exceeds one standard error), so that a small
        # or noisy held-out set cannot move it
        top_m = max(result, key=lambda m: result[m])
        diff = per_user[top_m] - per_user[1.0]
        se = float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else float("inf")
        z = float(diff.mean()) / se if se > 0 else 0.0
        best = top_m if z > 1.0 and B >= 10 else 1.0  # (10: a standard error needs some users)
        net.wide_scale[0] = math.log(best)
        tau = nll = None
        if best != 1.0:
            temps = TEMPERATURE_GRID + (float(cfg.temperature),)
            if len(blocks) == 1:
                nll = _heldout_nll(logits_at(best, blocks[0], *block(blocks[0])) * cfg.temperature, truth, temps)
            else:  # the mean over every (user, item) pair, summed block by block
                tot, cnt = dict.fromkeys(temps, 0.0), 0
                for b in blocks:
                    tb = truth[b]
                    n_b = sum(len(t) for t in tb)
                    if n_b:
                        part = _heldout_nll(logits_at(best, b, *block(b)) * cfg.temperature, tb, temps)
                        for t in temps:
                            tot[t] += part[t] * n_b
                        cnt += n_b
                nll = {t: tot[t] / max(cnt, 1) for t in temps}
            tau = min(nll, key=lambda t: (nll[t], abs(math.log(t / cfg.temperature))))
    logger.info("wide part calibrated on %d held-out users: alpha x %.3g "
                "(NDCG+Recall@%d %.4f; x1: %.4f; best x %.3g: %.4f, %.2f standard errors above x1)",
                B, best, k, result[best], result[1.0], top_m, result[top_m], z)
    if tau is not None:
        logger.info("policy temperature re-fit: %.3g (held-out NLL %.4f; at %.3g: %.4f)", tau, nll[tau],
                    cfg.temperature, nll[float(cfg.temperature)])
        cfg.temperature = float(tau)
    return result


def _heldout_nll(sc: torch.Tensor, truth: list, temperatures) -> dict:
    """``{t: mean -log softmax(sc / t)[held-out item]}`` over every (user, held-out item) pair
    of ``truth`` (one set per row of ``sc``), for each temperature ``t``."""
    rows = torch.from_numpy(np.repeat(np.arange(len(truth)), [len(t) for t in truth]))
    items = torch.from_numpy(np.concatenate([sorted(t) for t in truth]).astype(np.int64))
    return {t: float(-torch.log_softmax(sc / t, 1)[rows, items].mean()) for t in temperatures}


#: recent truth lists' sorted keys (see _truth_keys): {id(truth): (truth, (nnz,) int64 keys, (B,) sizes)}
_TRUTH_CACHE: dict = {}


def _truth_keys(truth: list) -> tuple:
    """``truth`` (a list of item sets) as the sorted keys ``row * 2**32 + item`` of its
    members and the sets' sizes (memory linear in the truth, never a users x items matrix),
    kept for the last few lists (the validation scores the same lists many times; the list
    itself is held in the cache, so its id stays its own)."""
    hit = _TRUTH_CACHE.get(id(truth))
    if hit is not None and hit[0] is truth:
        return hit[1], hit[2]
    sizes = np.array([len(t) for t in truth], np.int64)
    rows = np.repeat(np.arange(len(truth), dtype=np.int64), sizes)
    cols = np.fromiter((i for t in truth for i in t), np.int64, count=int(sizes.sum()))
    keys = np.sort(rows * 2**32 + cols)
    if len(_TRUTH_CACHE) >= 16:
        _TRUTH_CACHE.pop(next(iter(_TRUTH_CACHE)))
    _TRUTH_CACHE[id(truth)] = (truth, keys, sizes)
    return keys, sizes


def _ndcg_plus_recall(top: np.ndarray, truth: list, k: int) -> np.ndarray:
    """Per-user NDCG@k + Recall@k (RecBole's definitions) of (B, k) top lists."""
    top = np.asarray(top, np.int64)[:, :k]
    keys, sizes = _truth_keys(truth)
    disc = 1.0 / np.log2(np.arange(2, k + 2))
    if top.size and len(keys):
        q = np.arange(len(truth), dtype=np.int64)[:, None] * 2**32 + top
        pos = np.minimum(np.searchsorted(keys, q), len(keys) - 1)
        hit = ((keys[pos] == q) & (top >= 0)).astype(np.float64)
    else:
        hit = np.zeros((len(truth), top.shape[1] if top.ndim == 2 else 0))
    idcg = np.cumsum(disc)[np.minimum(sizes, k) - 1]
    return (hit * disc[:hit.shape[1]]).sum(1) / idcg + hit.sum(1) / sizes


# ---------------------------------------------------------------------------- validation

#: support sizes of the short-history validation samples (see :class:`Validation`)
VAL_PREFIXES = (5, 10, 20)
#: a held-out new user's truth is their positive items after this many interactions (the
#: cold-start protocol of ``shared/design/quality.md``; see :meth:`Validation.add_cold`)
COLD_QUERY_AFTER = 20
#: at most this many users are held out whole by :func:`cold_split`
MAX_COLD_USERS = 500


def cold_split(prep: Prepared, fraction: float, rng: np.random.Generator, exclude=()) -> tuple:
    """Hold out whole a random ``fraction`` (at most :data:`MAX_COLD_USERS`) of the users
    with a positive among their first 5 interactions and one after their first
    :data:`COLD_QUERY_AFTER`, drawn from those not in ``exclude``: they stand for new users when the wide
    part's weight is fitted per history length (:meth:`Validation.add_cold`). Returns (the
    log without their rows, the held-out users); (``prep``, empty) when fewer than 10 qualify."""
    n = np.diff(prep.offsets)
    ok = np.zeros(len(n), bool)
    for u in np.flatnonzero(n > COLD_QUERY_AFTER):
        r = prep.rewards[prep.offsets[u]:prep.offsets[u + 1]]
        ok[u] = (r[:VAL_PREFIXES[0]] > 0).any() and (r[COLD_QUERY_AFTER:] > 0).any()
    m = min(int(round(fraction * ok.sum())), MAX_COLD_USERS)
    ok[np.asarray(exclude, np.int64)] = False
    cand = np.flatnonzero(ok)
    m = min(m, len(cand))
    if m < 10:
        return prep, np.zeros(0, np.int64)
    users = np.sort(rng.choice(cand, m, replace=False))
    keep = np.ones(len(prep.items), bool)
    for u in users:
        keep[prep.offsets[u]:prep.offsets[u + 1]] = False
    rest = _keep_rows(prep, keep)
    return rest, users
#: EASE ridge values tried first by :func:`tune_wide` (then refined around the best)
WIDE_REG_GRID = (30.0, 100.0, 300.0, 1000.0, 3000.0)
#: (weight g, decay d) of the wide part's recency term tried by :func:`tune_wide` ((0, 1): none)
WIDE_RECENCY_GRID = ((0.0, 1.0),) + tuple((g, d) for g in (0.5, 1.0, 2.0, 4.0) for d in (0.1, 0.3, 1.0))
#: popularity exponents of the wide part tried by :func:`tune_wide`
WIDE_POP_GRID = (0.0, 0.1, 0.2)
#: wide-part weights tried per history length by :func:`tune_fusion`
FUSION_GRID = tuple(float(2.0 ** e) for e in np.arange(-4.0, 12.01, 0.5))


class Validation:
    """Held-out interactions of some training users, scored as served.

    For each user: the history the model reads (the user's remaining training rows, time
    order) and the held-out positive items (the truth). Besides the whole history ("warm"),
    each user also gives the short-history samples of its first 5, 10 and 20 items
    (:data:`VAL_PREFIXES`), so that choices depending on how much is known of a user (the
    wide part's weight) are made for known users with short histories too. ``cold``: the
    samples of users held out whole, standing for new users (:meth:`add_cold`).
    """

    def __init__(self, prep: Prepared, users: np.ndarray, truth: list, user_feats=None, groups=None):
        self.users = np.asarray(users, np.int64)
        self.truth = truth
        # the kind of holdout of each user (True: their latest interactions); the wide part is
        # chosen to do well on every kind present (see tune_wide)
        self.groups = (np.zeros(len(self.users), bool) if groups is None else np.asarray(groups, bool))
        self.samples = []  # (name, n, hists, rews, ufeats, truth, excluded items or None)
        self.cold = []  # the same, of users held out whole (see add_cold)
        hists, rews, ufs = [], [], []
        for u in self.users:
            lo, hi = prep.offsets[u], prep.offsets[u + 1]
            pos = prep.rewards[lo:hi] > 0
            hists.append(prep.items[lo:hi][pos])
            rews.append(prep.rewards[lo:hi][pos])
            ufs.append(np.zeros(0, np.int64) if user_feats is None
                       else user_feats[1][user_feats[0][u]:user_feats[0][u + 1]])
        self.add("warm", hists, rews, ufs, truth)
        for k in VAL_PREFIXES:
            sel = [j for j, h in enumerate(hists) if len(h) > k]
            if len(sel) >= 10:
                self.add(f"first {k}", [hists[j][:k] for j in sel], [rews[j][:k] for j in sel],
                         [ufs[j] for j in sel], [truth[j] for j in sel])

    def add(self, name, hists, rews, ufs, truth, exclude=None, cold=False):
        n = float(np.mean([len(np.unique(h)) for h in hists]))
        (self.cold if cold else self.samples).append((name, n, hists, rews, ufs, truth, exclude))

    def add_cold(self, prep: Prepared, users: np.ndarray, user_feats=None) -> None:
        """The new-user samples (``self.cold``) of ``users``, users held out of training whole
        (see :func:`cold_split`), scored as the cold-start protocol scores a new user: the
        positives among their first k interactions (k = 5, 10, 20) are the history, their
        positive items after their first :data:`COLD_QUERY_AFTER` interactions the truth, the
        items of those first interactions excluded from the ranking."""
        heads, truth, ufs = [], [], []
        for u in users:
            lo, hi = prep.offsets[u], prep.offsets[u + 1]
            it, rw = prep.items[lo:hi], prep.rewards[lo:hi]
            t = set(it[COLD_QUERY_AFTER:][rw[COLD_QUERY_AFTER:] > 0].tolist()) - set(it[:COLD_QUERY_AFTER].tolist())
            if t:
                heads.append((it[:COLD_QUERY_AFTER], rw[:COLD_QUERY_AFTER]))
                truth.append(t)
                ufs.append(np.zeros(0, np.int64) if user_feats is None
                           else user_feats[1][user_feats[0][u]:user_feats[0][u + 1]])
        for k in VAL_PREFIXES:
            sel = [j for j, (it, rw) in enumerate(heads) if (rw[:k] > 0).any()]
            if len(sel) >= 10:
                self.add(f"new users, first {k}", [heads[j][0][:k][heads[j][1][:k] > 0] for j in sel],
                         [heads[j][1][:k][heads[j][1][:k] > 0] for j in sel], [ufs[j] for j in sel],
                         [truth[j] for j in sel], [np.unique(heads[j][0]) for j in sel], cold=True)

    @property
    def warm(self):
        return self.samples[0]


def _val_deep_logits(net: RecMetaNet, cfg: Config, hists, rews, ufs) -> torch.Tensor:
    """(B, N) deep logits (no wide part, before the temperature) as served: adapted on the
    history (``cfg.inner_steps``), history items set to -inf."""
    N = net.n_items
    B = len(hists)
    bi, bo, bw, sq, sl = history_tensors(hists, cfg.seq_len, N)
    uo = np.concatenate([[0], np.cumsum([len(r) for r in ufs])]).astype(np.int64)
    ui = np.concatenate(ufs).astype(np.int64) if uo[-1] else np.zeros(0, np.int64)
    rows = torch.from_numpy(np.repeat(np.arange(B), [len(x) for x in hists]))
    w = torch.from_numpy(np.maximum(np.concatenate(rews), 0.0).astype(np.float32))
    lr = None if cfg.meta == "fomaml" else cfg.inner_lr
    with torch.no_grad():
        X, V = net.item_vectors()
        h = net.user_state(X, bi, bo, bw, sq, sl, torch.from_numpy(ui), torch.from_numpy(uo))
        gamma, delta = net.adapt_phi(h, V, rows, bi, w, cfg.inner_steps, lr=lr)
        sc = net.logits(net.apply_phi(h, gamma, delta), V)
        sc[rows, bi] = -float("inf")
    return sc


def _sample_logits(net: RecMetaNet, cfg: Config, sample) -> torch.Tensor:
    """:func:`_val_deep_logits` of a :class:`Validation` sample, its excluded items at -inf."""
    _, _, hists, rews, ufs, _, excl = sample
    D = _val_deep_logits(net, cfg, hists, rews, ufs)
    for b, e in enumerate(excl or ()):
        D[b, torch.from_numpy(np.asarray(e, np.int64))] = -float("inf")
    return D


def _epoch_samples(val: Validation) -> list:
    """The validation samples early stopping scores: the new-user samples (see
    :meth:`Validation.add_cold`) when there are some, else the warm one. (Where the deep part
    counts most is new users and short histories; warm users are served mostly by the wide
    part, whose weight is fitted after training. Scored on the warm sample too, training
    stopped after two or three epochs, on noise, and new users got an undertrained deep part.)"""
    return list(val.cold) or [val.warm]


def _epoch_score(net: RecMetaNet, cfg: Config, samples: list, wide=None) -> float:
    """The early-stopping score of the deep part: the mean over ``samples`` (see
    :func:`_epoch_samples`) of NDCG@10 + Recall@10 of the deep logits plus ``wide`` (each
    sample's wide logits at their training weight), or of the deep logits alone. The users
    are scored in blocks of rows (:data:`SCORE_BLOCK_BYTES`): memory stays a block of the
    users x items scores."""
    scores = []
    for j, sample in enumerate(samples):
        name, n, hists, rews, ufs, truth, excl = sample
        blocks = _row_blocks(len(hists), net.n_items)
        if len(blocks) == 1:
            sc = _sample_logits(net, cfg, sample)
            if wide is not None:
                sc = sc + wide[j]
            scores.append(_val_score(sc, truth))
            continue
        top = np.zeros((len(hists), min(10, net.n_items)), np.int64)
        for b in blocks:
            sc = _sample_logits(net, cfg, (name, n, hists[b], rews[b], ufs[b], truth[b],
                                           excl[b] if excl is not None else None))
            if wide is not None:
                sc = sc + wide[j][b]
            top[b] = torch.topk(sc, top.shape[1], dim=1).indices.numpy()
            del sc
        scores.append(float(_ndcg_plus_recall(top, truth, 10).mean()))
    return float(np.mean(scores))


def _wide_inputs(hists, N: int, decays=()) -> tuple:
    """(B, N) inputs of the wide part: the multi-hot of the distinct history items, and for
    each recency decay d the matrix of ``exp(-d r)``, ``r`` the rank of the item's latest
    occurrence from the end of the history (0: the last)."""
    B = len(hists)
    x = torch.zeros(B, N)
    rec = {d: torch.zeros(B, N) for d in decays}
    for b, hh in enumerate(hists):
        h = np.asarray(hh, np.int64)
        items, last_rev = np.unique(h[::-1], return_index=True)
        it = torch.from_numpy(items)
        x[b, it] = 1.0
        for d in decays:
            rec[d][b, it] = torch.exp(-d * torch.from_numpy(last_rev.astype(np.float32)))
    return x, rec


def _rows_times(x: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """``x @ W`` for a sparse-valued (B, N) ``x`` (history multi-hots: a few percent of
    nonzeros at most) as one embedding bag over the rows of ``W``: the cost is the nonzeros
    times N, not B N^2 (2x faster on MovieLens-100K's validation users, 8x at 2,000 users of
    3,700 items)."""
    if W.dtype != torch.float32 or x.dtype != torch.float32:
        return x @ W
    rows, cols = x.nonzero(as_tuple=True)  # row-major: each row's nonzeros together
    off = torch.zeros(x.shape[0] + 1, dtype=torch.int64)
    off[1:] = torch.bincount(rows, minlength=x.shape[0]).cumsum(0)
    return ops.embedding_bag(W.contiguous(), cols, off, per_sample_weights=x[rows, cols])


def _wide_scores(W: torch.Tensor, hists, cfg: Optional[Config] = None) -> torch.Tensor:
    """(B, N) ``x W`` of the histories, with the recency weights of ``cfg`` (see
    :meth:`RecMetaNet.wide_offset`; none without ``cfg``)."""
    g = cfg.wide_recency if cfg is not None else None
    d = float(cfg.wide_recency_decay) if g else None
    x, rec = _wide_inputs(hists, W.shape[0], (d,) if g else ())
    if g:
        x = torch.where(x > 0, 1.0 + g * rec[d], x)
    return _rows_times(x, W)


def _val_score(sc: torch.Tensor, truth: list, k: int = 10) -> float:
    top = torch.topk(sc, min(k, sc.shape[1]), dim=1).indices.numpy()
    return float(_ndcg_plus_recall(top, truth, k).mean())


def _pop_scale(G: torch.Tensor, p: float) -> torch.Tensor:
    """(N,) column scale ``(count + 1)^-p`` of the wide weights (popularity penalty)."""
    return (torch.diagonal(G).to(torch.float32) + 1.0).pow(-p)


def tune_wide(G: torch.Tensor, val: Validation, cfg: Config) -> tuple:
    """Tune the wide part on the validation users' whole histories by NDCG@10 + Recall@10:
    the EASE ridge of plain EASE on every validation user (``cfg.wide_reg`` None:
    :data:`WIDE_REG_GRID`, then the geometric midpoints around the best), then at that ridge
    the recency weight and decay (``wide_recency`` None: :data:`WIDE_RECENCY_GRID`) and the
    popularity exponent (``wide_pop_exp`` None: :data:`WIDE_POP_GRID`). Values given in
    ``cfg`` are kept.

    The validation users come in kinds (a random share held out, or their latest
    interactions: see :class:`Validation`). What is best differs between them (recency helps
    predict a user's next items and hurts on items drawn from anywhere in their history), and
    the model should do well on both, so a setting's score is its worst ratio, over the kinds,
    to plain EASE's best score on that kind (no recency, no popularity exponent, the best
    ridge of the grid for that kind): the setting that gains the most where it gains least. Writes the choices to ``cfg`` and returns
    ``(W, {setting: score})`` with ``W`` the float32 EASE weights of ``G`` at the chosen
    values, popularity-scaled."""
    _, _, hists, _, _, truth, _ = val.warm
    kinds = [np.flatnonzero(val.groups == k) for k in (False, True)]
    kinds = [k for k in kinds if len(k)]
    N = G.shape[0]
    g_given, p_given = cfg.wide_recency is not None, cfg.wide_pop_exp is not None
    recs = WIDE_RECENCY_GRID if not g_given else (
        (float(cfg.wide_recency), float(cfg.wide_recency_decay if cfg.wide_recency_decay is not None else 1.0)),)
    pops = WIDE_POP_GRID if not p_given else (float(cfg.wide_pop_exp),)
    if (0.0, 1.0) not in recs:  # plain EASE is the reference (see robust)
        recs = ((0.0, 1.0),) + tuple(recs)
    if 0.0 not in pops:
        pops = (0.0,) + tuple(pops)
    decays = sorted({d for g, d in recs if g})
    x, rec = _wide_inputs(hists, N, decays)
    seen = x > 0
    G32 = G.to(torch.float32)
    scales = {p: _pop_scale(G, p) for p in pops}
    per_kind = {}  # (reg, g, d, p) -> mean score of each kind

    kept = {}  # the weights of the best ridge so far (each fit is a Cholesky of an N x N matrix)

    def ease32(reg):
        if reg not in kept:
            kept.clear()
            kept[reg] = _ease_weights(G32, reg)
        return kept[reg]

    def run(reg):
        B = ease32(reg)
        base = {0.0: _rows_times(x, B)}
        for d in decays:
            base[d] = _rows_times(rec[d].masked_fill(~seen, 0.0), B)
        for g, d in recs:
            sc0 = base[0.0] + g * base[d] if g else base[0.0]
            for p in pops:
                sc = (sc0 * scales[p]).masked_fill(seen, -float("inf"))
                top = torch.topk(sc, min(10, N), dim=1).indices.numpy()
                u = _ndcg_plus_recall(top, truth, 10)
                per_kind[(reg, g, d, p)] = [float(u[k].mean()) for k in kinds]
        return B

    def score_plain(reg):
        B = kept[reg] if reg in kept else _ease_weights(G32, reg)
        top = torch.topk(_rows_times(x, B).masked_fill(seen, -float("inf")), min(10, N), dim=1).indices.numpy()
        sc = float(_ndcg_plus_recall(top, truth, 10).mean())
        if not pooled or sc > max(pooled.values()):
            kept.clear()
            kept[reg] = B
        return sc

    def robust():
        # each kind's reference: plain EASE (no recency, no popularity exponent) at its best ridge
        plain = np.array([v for k, v in per_kind.items() if k[1] == 0 and k[3] == 0] or list(per_kind.values()))
        best = plain.max(axis=0)
        return {key: min(v / max(b, 1e-12) for v, b in zip(vals, best)) for key, vals in per_kind.items()}

    pooled = {}
    if cfg.wide_reg is None:  # the ridge of plain EASE, on every validation user
        for reg in WIDE_REG_GRID:
            pooled[reg] = score_plain(reg)
        reg0 = max(pooled, key=pooled.get)
        for reg in (reg0 / math.sqrt(10.0 / 3.0), reg0 * math.sqrt(10.0 / 3.0)):
            pooled[float(reg)] = score_plain(float(reg))
        cfg.wide_reg = float(max(pooled, key=pooled.get))
    run(float(cfg.wide_reg))
    sc = robust()
    if g_given or p_given:
        sc = {k: v for k, v in sc.items() if (not g_given or k[1] == float(cfg.wide_recency))
              and (not p_given or k[3] == float(cfg.wide_pop_exp))}
    reg, g, d, p = max(sc, key=lambda k: (sc[k], -k[1], -k[3]))
    cfg.wide_reg, cfg.wide_recency, cfg.wide_recency_decay, cfg.wide_pop_exp = float(reg), float(g), float(d), float(p)
    return ease32(reg) * scales[p], sc


def _fit_wide_weight(W: torch.Tensor, val: Validation, cfg: Config) -> float:
    """The weight a of the wide part alone, ``softmax(a x W)``, with the best held-out
    log-likelihood on the warm validation set (a grid of powers of 2)."""
    _, _, hists, _, _, truth, _ = val.warm
    E = _wide_scores(W, hists, cfg)
    for b, hh in enumerate(hists):
        E[b, torch.from_numpy(np.asarray(hh, np.int64))] = -float("inf")
    nll = _heldout_nll(E, truth, [1.0 / a for a in FUSION_GRID])  # weight a = temperature 1 / a
    return 1.0 / min(nll, key=nll.get)


#: history lengths (distinct items) at which :func:`tune_fusion` fits the wide part's weight
#: of short histories: the first and the last of :data:`VAL_PREFIXES`
FUSION_KNOTS = (float(VAL_PREFIXES[0]), float(VAL_PREFIXES[-1]))
#: history lengths tried by :func:`tune_fusion` where the wide part's weight reaches its warm value
FUSION_N_HI = (25.0, 35.0, 50.0, 100.0, 200.0, 500.0)


def _softplus_inv(a: float) -> float:
    """softplus^-1(a) = a + log(1 - exp(-a)), stable for large and small a > 0."""
    return a + math.log(-math.expm1(-a))


#: the largest |log m| of the wide part's multiplier that tune_fusion writes: the default limit
#: a model file is loaded under (LoadLimits.max_log_step); m = e^-10 leaves the wide part 5e-5
#: of its weight at n_hi, as good as off
MAX_LOG_M = LoadLimits.max_log_step


def _alpha_params(a_lo: float, a_mid: float, a_hi: float, n_hi: float) -> tuple:
    """The network's ``(wide_coef, wide_scale)`` (see :meth:`RecMetaNet.wide_alpha`) of the
    curve through ``alpha(FUSION_KNOTS[0]) = a_lo`` and ``alpha(FUSION_KNOTS[1]) = a_mid``
    (``softplus(c0 + c1 log(1 + n))``; ``a_mid >= a_lo``) that reaches ``a_hi`` at ``n_hi``
    (times ``m ** ramp(n)``, the ramp log-linear from ``FUSION_KNOTS[1]`` to ``n_hi``)."""
    l0, l1 = math.log1p(FUSION_KNOTS[0]), math.log1p(FUSION_KNOTS[1])
    y0, y1 = _softplus_inv(a_lo), _softplus_inv(a_mid)
    c1 = (y1 - y0) / (l1 - l0)
    c0 = y0 - c1 * l0
    base_hi = float(torch.nn.functional.softplus(torch.tensor(c0 + c1 * math.log1p(n_hi), dtype=torch.float64)))
    # |log m| within what a model file may hold (LoadLimits.max_log_step), so that every model
    # training writes loads back; the search scores the curve as clamped here (_alpha_curve)
    log_m = min(max(math.log(a_hi / base_hi), -MAX_LOG_M), MAX_LOG_M)
    return (torch.tensor([c0, c1]), torch.tensor([log_m, FUSION_KNOTS[1], n_hi]))


def _alpha_curve(ln: torch.Tensor, a_lo: float, a_mid: float, a_hi: float, n_hi: float) -> torch.Tensor:
    """alpha(n) of :func:`_alpha_params` at ``ln = log(1 + n)`` (the network's formula)."""
    coef, scale = _alpha_params(a_lo, a_mid, a_hi, n_hi)
    lo, hi = math.log1p(float(scale[1])), math.log1p(float(scale[2]))
    ramp = ((ln - lo) / (hi - lo)).clamp(0.0, 1.0)
    return torch.exp(scale[0] * ramp) * torch.nn.functional.softplus(coef[0] + coef[1] * ln)


def _fit_curve(sets: list, warm: Optional[int], known: Optional[tuple] = None, remember: bool = True) -> tuple:
    """``(a_lo, a_mid, a_hi, n_hi)`` of :func:`_alpha_curve` fitted on ``sets`` (``(name, n,
    D, E, log(1 + lengths), truth)``) by NDCG@10 + Recall@10 on :data:`FUSION_GRID`: ``a_lo``
    by the set of shortest histories, ``a_mid`` (not below it) by the mean over the other
    short ones, ``(a_hi, n_hi)`` by the warm set ``sets[warm]`` (with ``known`` instead,
    taken from it), then each value in turn by the joint score (the warm set weighing as
    much as the short ones together). Without short sets, one constant fitted on the warm set.
    ``remember`` (the default) scores each distinct curve of a set once (the same choices as
    scoring every request: tests/test_training_memory.py)."""
    # scores are remembered: the search asks for many curves twice, and a set whose histories
    # are all at most FUSION_KNOTS[1] long sees only (a_lo, a_mid) (the ramp to a_hi is 0)
    # (the test in the curve's own float32 arithmetic: ramp = clamp(ln - log1p(knot), 0) / ...)
    short_only = [bool(((st[4] - math.log1p(FUSION_KNOTS[1])) <= 0).all()) for st in sets]
    memo = {}

    def score(j, *curve):
        key = (j,) + (curve[:2] if short_only[j] else curve)
        if key not in memo or not remember:
            _, _, D, E, ln, truth = sets[j]
            memo[key] = _val_score(D + _alpha_curve(ln, *curve)[:, None] * E, truth)
        return memo[key]

    n_hi0 = FUSION_N_HI[0]
    short = sorted((j for j in range(len(sets)) if j != warm), key=lambda j: sets[j][1])
    if not short:  # the warm sample alone: one weight
        a = max(FUSION_GRID, key=lambda a: score(warm, a, a, a, n_hi0))
        return (a, a, a, n_hi0)
    a_lo = max(FUSION_GRID, key=lambda a: score(short[0], a, a, a, n_hi0))
    mids = [a for a in FUSION_GRID if a >= a_lo]
    rest = short[1:] or short[:1]
    a_mid = max(mids, key=lambda a: float(np.mean([score(j, a_lo, a, a, n_hi0) for j in rest])))
    if warm is None:
        return (a_lo, a_mid) + tuple(known[2:])
    table = {(a_hi, n_hi): score(warm, a_lo, a_mid, a_hi, n_hi) for n_hi in FUSION_N_HI for a_hi in FUSION_GRID}
    a_hi, n_hi = max(table, key=table.get)
    best = (a_lo, a_mid, a_hi, n_hi)

    def joint(curve):
        return 0.5 * score(warm, *curve) + 0.5 * float(np.mean([score(j, *curve) for j in short]))

    cur = joint(best)
    for _ in range(2):
        moved = False
        for i, grid in enumerate((FUSION_GRID, FUSION_GRID, FUSION_GRID, FUSION_N_HI)):
            for v in grid:
                cand = best[:i] + (v,) + best[i + 1:]
                if cand == best or cand[1] < cand[0]:
                    continue
                sc = joint(cand)
                if sc > cur + 1e-9:
                    best, cur, moved = cand, sc, True
        if not moved:
            break
    return best


def tune_fusion(net: RecMetaNet, cfg: Config, val: Validation, W: torch.Tensor,
                W_new: Optional[torch.Tensor] = None, new_user_alpha: Optional[list] = None) -> dict:
    """Weigh the wide part against the deep part on the validation users.

    The served policy is ``deep + alpha(n) (x W)``, ``n`` the number of distinct items of
    the history. ``alpha(n)`` is ``a_lo`` at 5 items, ``a_mid`` at 20 (not below ``a_lo``),
    ``a_hi`` from ``n_hi`` items on (:data:`FUSION_N_HI`), in between the network's form
    (:func:`_alpha_params`), fitted by :func:`_fit_curve`: for known users on the warm
    sample and the first 5 / 10 / 20 items of the validation users, written to the
    network's ``wide_coef`` / ``wide_scale``; for new users (served from a history given to
    ``adapt``) ``a_lo`` and ``a_mid`` on the held-out new users' first 5 / 10 / 20 items
    (:meth:`Validation.add_cold`) and ``a_hi`` / ``n_hi`` those of known users, written to
    ``config.new_user_alpha`` (None, the known users' curve, without new-user samples).
    ``W_new``: the wide weights the new-user samples are scored with (fitted without those
    users; default ``W``). ``new_user_alpha``: the five values of ``config.new_user_alpha``
    to keep for new users instead of fitting them (the weight learned in training, with
    ``wide_train="learned"``); the new-user samples are then only scored with it, for the
    report. The temperature is then re-fit by the held-out log-likelihood of
    the warm set. Returns ``{set name: (mean n, weight at that n, score, score of the deep
    part alone, score of the wide part alone)}`` plus ``"alpha"`` and ``"new_user_alpha"`` (each ``(a_lo, a_mid,
    a_hi, n_hi)`` or None)."""
    def logits(samples, W):
        out = []
        for sample in samples:
            name, n, hists, _, _, truth, _ = sample
            D = _sample_logits(net, cfg, sample)
            E = _wide_scores(W, hists, cfg)
            lens = torch.tensor([len(np.unique(h)) for h in hists], dtype=torch.float32)
            out.append((name, n, D, E, torch.log1p(lens), truth))
        return out

    sets, cold = logits(val.samples, W), logits(val.cold, W if W_new is None else W_new)
    best = _fit_curve(sets, 0)
    best_new = _fit_curve(cold, None, best) if cold and new_user_alpha is None else None
    out = {}
    if new_user_alpha is not None:
        cfg.new_user_alpha = [float(v) for v in new_user_alpha]
        for name, n, D, E, ln, truth in cold:
            with torch.no_grad():
                a = net.wide_alpha(torch.expm1(ln).round().to(torch.int64), new=True)
                a_n = float(net.wide_alpha(torch.tensor([int(round(n))]), new=True)[0])
            wide_only = _val_score(E.masked_fill(torch.isinf(D), -float("inf")), truth)
            out[name] = (n, a_n, _val_score(D + a[:, None] * E, truth), _val_score(D, truth), wide_only)
    for curve, group in ((best, sets), (best_new, cold if best_new is not None else [])):
        for name, n, D, E, ln, truth in group:
            wide_only = _val_score(E.masked_fill(torch.isinf(D), -float("inf")), truth)
            alpha_n = float(_alpha_curve(torch.tensor(math.log1p(n)), *curve))
            fused = _val_score(D + _alpha_curve(ln, *curve)[:, None] * E, truth)
            out[name] = (n, alpha_n, fused, _val_score(D, truth), wide_only)
    coef, scale = _alpha_params(*best)
    if new_user_alpha is None:
        cfg.new_user_alpha = None
    if best_new is not None:
        c, sc = _alpha_params(*best_new)
        cfg.new_user_alpha = [float(c[0]), float(c[1]), float(sc[0]), float(sc[1]), float(sc[2])]
    with torch.no_grad():
        net.wide_coef.copy_(coef)
        net.wide_scale.copy_(scale)
        _, _, D, E, ln, truth = sets[0]
        alpha = net.wide_alpha(torch.expm1(ln).round().to(torch.int64))
        nll = _heldout_nll(D + alpha[:, None] * E, truth, TEMPERATURE_GRID)
    tau = min(nll, key=nll.get)
    cfg.temperature = float(tau)
    out["alpha"] = best
    out["new_user_alpha"] = best_new if new_user_alpha is None else "learned in training"

    def fmt(c):
        return ("as known users" if c is None else "learned in training" if isinstance(c, str) else
                f"{c[0]:.3g} at n = {FUSION_KNOTS[0]:.0f}, {c[1]:.3g} at {FUSION_KNOTS[1]:.0f}, {c[2]:.3g} from {c[3]:.0f}")

    logger.info("wide part weighed on %d validation users: alpha(n) of known users %s, of new users %s; %s; "
                "temperature %.3g", len(val.users), fmt(best), fmt(out["new_user_alpha"]),
                ", ".join(f"{k} (n {v[0]:.0f}): alpha {v[1]:.3g}, {v[2]:.4f} vs deep alone {v[3]:.4f}, "
                          f"wide alone {v[4]:.4f}" for k, v in out.items() if k not in ("alpha", "new_user_alpha")), tau)
    return out


def validation_from_frame(prep: Prepared, frame: pd.DataFrame, user_feats=None) -> Validation:
    """A :class:`Validation` from held-out interactions (``user``, ``item``, optional
    ``reward``) of users in the training log: their histories are their training rows."""
    for col in ("user", "item"):
        if col not in frame.columns:
            raise ValueError(f"validation needs a {col!r} column; it has {list(frame.columns)}")
    uc = IdMap(prep.user_ids).to_index(frame["user"].to_numpy())
    ic = IdMap(prep.item_ids).to_index(frame["item"].to_numpy())
    ok = (uc >= 0) & (ic >= 0)
    if "reward" in frame.columns:
        ok &= frame["reward"].to_numpy(dtype=np.float64) > 0
    if not ok.any():
        raise ValueError("validation has no positive interaction of a user and an item of the training log")
    users = np.unique(uc[ok])
    pos = {u: j for j, u in enumerate(users)}
    truth = [set() for _ in users]
    for u, i in zip(uc[ok], ic[ok]):
        truth[pos[u]].add(int(i))
    for j, u in enumerate(users):  # items already in the history are not held-out targets
        truth[j] -= set(prep.items[prep.offsets[u]:prep.offsets[u + 1]].tolist())
    keep = [j for j, t in enumerate(truth) if t]
    if not keep:
        raise ValueError("validation holds only items its users already have in the training log")
    return Validation(prep, users[keep], [truth[j] for j in keep], user_feats)


# ---------------------------------------------------------------------------- loop

class AdamW:
    """AdamW (Loshchilov & Hutter; torch.optim.AdamW's update, betas (0.9, 0.999), eps
    1e-8, decoupled weight decay) over param groups ``{"params", "base_lr", "lr",
    "weight_decay"}``, with one step count for all parameters (torch counts per parameter;
    the two differ only after a step in which a parameter had no gradient).

    Ours because constructing any ``torch.optim`` optimizer imports ``torch._dynamo``: about
    2.7 CPU-seconds on this machine, a fifth of the whole training budget on MovieLens-100K.
    """

    def __init__(self, groups: list, lr: float, weight_decay: float = 0.0,
                 betas: tuple = (0.9, 0.999), eps: float = 1e-8):
        self.param_groups = [dict({"lr": lr, "weight_decay": weight_decay}, **g) for g in groups]
        self.betas, self.eps, self.t = betas, eps, 0
        self.state = {id(p): (torch.zeros_like(p), torch.zeros_like(p))
                      for g in self.param_groups for p in g["params"]}

    def zero_grad(self) -> None:
        for g in self.param_groups:
            for p in g["params"]:
                p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        b1, b2 = self.betas
        c1, c2 = 1.0 - b1 ** self.t, math.sqrt(1.0 - b2 ** self.t)
        for g in self.param_groups:
            lr, wd = g["lr"], g["weight_decay"]
            ps = [p for p in g["params"] if p.grad is not None]
            if not ps:
                continue
            # the same element-wise update as one loop per parameter, in a few multi-tensor calls
            grads = [p.grad for p in ps]
            ms = [self.state[id(p)][0] for p in ps]
            vs = [self.state[id(p)][1] for p in ps]
            if wd:
                torch._foreach_mul_(ps, 1.0 - lr * wd)
            torch._foreach_lerp_(ms, grads, 1.0 - b1)
            torch._foreach_mul_(vs, b2)
            torch._foreach_addcmul_(vs, grads, grads, value=1.0 - b2)
            den = torch._foreach_sqrt(vs)
            torch._foreach_div_(den, c2)
            torch._foreach_add_(den, self.eps)
            torch._foreach_addcdiv_(ps, ms, den, value=-lr / c1)


def clip_grad_norm(params: list, max_norm: float) -> None:
    """Scale the gradients so that their joint L2 norm is at most ``max_norm``."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    scale = max_norm / (float(total) + 1e-6)
    if scale < 1.0:
        torch._foreach_mul_(grads, scale)


def fit(net: RecMetaNet, prep: Prepared, cfg: Config, user_feats=None, progress: Optional[bool] = None,
        batches=None, validation=None, tune: bool = False, dist=None) -> dict:
    """Train ``net`` in place. Returns the history: ``loss`` per epoch, ``validation`` (the
    validation NDCG@10 + Recall@10 per epoch, when there is a validation set), ``best_epoch``,
    ``wide_reg``, ``wide_seconds`` (the wide part's fit before the epochs), ``fusion`` and ``seconds``.

    ``batches``: None (per-user tasks) or a sampler of group-task meta-batches with
    ``steps_per_epoch`` and ``draw(rng, user_feats) -> Batch`` (see :mod:`recmeta_sdk.training.meta_tasks`).

    ``tune`` (per-user tasks only): choose on a validation set, as :func:`recmeta_sdk.train`
    does by default. The validation set is ``validation`` (a DataFrame of held-out
    interactions of training users) or, with ``cfg.validation > 0``, carved from ``prep``
    (``calib_holdout`` of the interactions of a fraction ``cfg.validation`` of the users with
    5 or more; by ``cfg.validation_holdout`` a random share, their latest interactions, or
    half the users each way). On it: the wide part (EASE ridge, recency weight and decay,
    popularity exponent: those left None in ``cfg``) is tuned (:func:`tune_wide`); the deep
    part is trained (``cfg.wide_train``: alone, or as a residual on EASE at a fixed weight),
    its epochs stopped early when the validation score has not improved for ``cfg.patience``
    epochs (the best epoch's weights are kept); the wide part's weight ``alpha(n)`` and the
    temperature are fitted (:func:`tune_fusion`); the served EASE weights are refit on the
    whole log. Without a validation set (``tune`` False, or fewer than 10 validation users)
    the wide part's weight is learned during training against cross-fitted EASE weights
    (:func:`fit_wide`).

    ``dist``: a :class:`recmeta_sdk.training.distributed.DistributedContext` (use
    :func:`recmeta_sdk.training.distributed.fit`, which sets it up): every rank runs this
    function on the same log with the same seed, cuts the same global batches and trains on
    its part of each (see :meth:`~recmeta_sdk.training.distributed.DistributedContext.train_step`);
    per-user tasks without a validation or calibration set only."""
    if cfg.validation is None:  # auto: a validation set where validation-tuned training applies
        # (it scores the ranking of held-out positives: the supervised objective; a pure-RL
        # configuration, ce_weight 0, trains without it: on the reward-only multi-task problem
        # of the tests the epoch it chose left meta-adaptation undertrained, 0.56 against 0.97)
        auto = (tune and batches is None and dist is None and validation is None and net.has_wide
                and net.wide_sparse is None and cfg.calib_users == 0 and cfg.ce_weight > 0)
        cfg.validation = AUTO_VALIDATION if auto else 0.0
    if (tune and batches is None and net.wide_sparse is not None
            and (validation is not None or cfg.validation > 0)):
        raise ValueError(
            f"validation-tuned training needs the dense wide part, and {net.n_items} items need "
            f"{dense_wide_bytes(net.n_items)} bytes, more than config.wide_budget_bytes={cfg.wide_budget_bytes}: "
            "raise wide_budget_bytes, train without a validation set (the sparse wide part), or set wide='none'")
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    t0 = time.perf_counter()
    full = prep
    hist = {"loss": []}
    val = None
    if tune and batches is None:
        if validation is not None:
            val = validation_from_frame(prep, validation, user_feats)
        elif cfg.validation > 0:
            cal = calibration_split(prep, cfg, rng, users=cfg.validation, holdout=cfg.validation_holdout)
            if cal is not None and len(cal[1]) >= 10:
                prep = cal[0]
                val = Validation(prep, cal[1], cal[2], user_feats, groups=cal[3])
        cold = np.zeros(0, np.int64)
        if val is not None and net.has_wide and cfg.validation_cold > 0:
            before = prep
            prep, cold = cold_split(prep, cfg.validation_cold, rng, exclude=val.users)
            if len(cold):
                val.add_cold(before, cold, user_feats)
                logger.info("%d users held out whole as new users (the wide part's weight for short "
                            "histories is fitted on them)", len(cold))
    cal = None
    if val is None and net.has_wide and cfg.calib_users > 0:
        cal = calibration_split(prep, cfg, rng)
        if cal is not None:
            prep = cal[0]
    if dist is not None and (batches is not None or val is not None or cal is not None):
        raise ValueError("distributed training supports per-user tasks (tasks='user') without a validation "
                         "or calibration set (validation=None, config validation=0 and calib_users=0)")
    W_train = None
    t_wide = time.perf_counter()
    if val is not None:
        cross = None
        if net.has_wide:
            # the wide part is tuned with the held-out new users' rows in its matrix (they hold
            # none of the validation items; leaving them out would change the choices the warm
            # users get); the new users' samples are scored with weights fitted without them
            X = _interaction_matrix(before if len(cold) else prep)
            Xc = X[cold] if len(cold) else None
            G = _gram(X)
            del X
            W_train, report = tune_wide(G, val, cfg)
            hist["wide_tuning"] = {str(k): v for k, v in report.items()}
            logger.info("wide part chosen on %d validation users: EASE ridge %.4g, recency %.3g (decay %.3g), "
                        "popularity exponent %.3g (worst ratio to the best of each kind of holdout %.4f)",
                        len(val.users), cfg.wide_reg, cfg.wide_recency, cfg.wide_recency_decay, cfg.wide_pop_exp,
                        max(report.values()))
            W_cold = W_train
            if Xc is not None:
                Gc = G - _gram(Xc)
                W_cold = ease_from_gram(Gc, cfg.wide_reg) * _pop_scale(Gc, cfg.wide_pop_exp)
                del Gc, Xc
            del G
            with torch.no_grad():
                net.wide.copy_(W_train)
            if cfg.wide_train == "residual":
                # the deep part learns what EASE misses: EASE enters the training logits at a
                # fixed weight, the one whose softmax fits the validation items best
                a = _fit_wide_weight(W_train, val, cfg)
                with torch.no_grad():
                    net.wide_coef.copy_(torch.tensor([a + math.log(-math.expm1(-a)), 0.0]))
                    net.wide_scale.copy_(torch.tensor([0.0, 1.0, 2.0]))
                hist["wide_train_weight"] = a
            elif cfg.wide_train == "learned":
                # as without a validation set: alpha(n) learned in training against cross-fitted
                # EASE weights (the tuned ridge and popularity exponent), on the training users
                Xp = _interaction_matrix(prep)
                cross = _cross_fit(Xp, _gram(Xp), cfg.wide_reg, cfg.wide_pop_exp or 0.0, rng)
                del Xp
    else:
        if cfg.wide_reg is None:
            cfg.wide_reg = DEFAULT_WIDE_REG
        cross = fit_wide(net, prep, cfg, rng)
    hist["wide_reg"] = cfg.wide_reg
    hist["wide_seconds"] = time.perf_counter() - t_wide  # fitting (and tuning) the wide part
    n_per_user = np.diff(prep.offsets)
    users_of_row = np.repeat(np.arange(len(n_per_user)), n_per_user)
    n_pos = np.bincount(users_of_row[prep.rewards > 0], minlength=len(n_per_user))
    eligible = np.flatnonzero((n_per_user >= 2) & (n_pos >= 1))
    if len(eligible) == 0:
        raise ValueError("no user has 2 or more interactions with at least one positive "
                         "(reward above the positive threshold): nothing to train on")
    scalar_names = ("wide_coef", "log_lr") if cfg.meta_scalar else ("wide_coef",)
    named = [(n, p) for n, p in net.named_parameters() if cfg.meta == "fomaml" or n != "log_lr"]
    if val is not None and cfg.wide_train != "learned":  # the wide part's weight is fitted after training
        named = [(n, p) for n, p in named if n != "wide_coef"]
    params = [p for _, p in named]
    groups = [{"params": [p for n, p in named if n not in scalar_names], "base_lr": cfg.lr},
              {"params": [p for n, p in named if n in scalar_names], "base_lr": cfg.scalar_lr, "weight_decay": 0.0}]
    opt = AdamW([g for g in groups if g["params"]], lr=cfg.lr, weight_decay=cfg.weight_decay)
    logq = torch.log(torch.as_tensor(prep.item_count + 1.0, dtype=torch.float32))
    logq = logq - torch.logsumexp(logq, 0)
    show = sys.stderr.isatty() if progress is None else progress
    if dist is not None and dist.rank != 0:
        show = False  # one progress bar, rank 0's
    bar = None
    steps_per_epoch = int(math.ceil(len(eligible) / cfg.batch_size))
    if batches is not None:
        steps_per_epoch = batches.steps_per_epoch
    if cfg.epochs is None:  # auto: the steps of AUTO_STEPS in whole epochs (written back)
        cfg.epochs = auto_epochs(steps_per_epoch)
    total = cfg.epochs * steps_per_epoch
    if show:
        try:
            from tqdm import tqdm

            bar = tqdm(total=total, desc="recmeta train", file=sys.stderr)
        except ImportError:
            if progress:
                logger.warning("progress=True: tqdm is not installed (pip install tqdm, or the "
                               "'progress' extra); progress is logged per epoch instead")
            bar = None
    if val is not None:
        hist["validation"] = []
        best_score, best_state, best_epoch = -1.0, None, -1
        # the wide part's logits of each validation sample at the weight it has in training
        # (none when the deep part trains alone): what early stopping scores the deep part with
        scored = _epoch_samples(val)
        val_wide = None
        if net.has_wide and cfg.wide_train == "residual":
            a = hist["wide_train_weight"]
            W_scored = W_cold if val.cold else W_train  # (the new users' samples: weights without them)
            val_wide = [a * _wide_scores(W_scored, smp[2], cfg) for smp in scored]
        val_E = None
        if net.has_wide and cfg.wide_train == "learned":  # scored at the weight alpha(n) has in training
            W_scored = W_cold if val.cold else W_train
            val_E = [(_wide_scores(W_scored, smp[2], cfg),
                      torch.tensor([len(np.unique(h)) for h in smp[2]], dtype=torch.int64)) for smp in scored]
    net.train()
    # dropout (nn.Dropout and the transformer layer's) takes no generator: it draws from the
    # global RNG, so it runs inside fork_rng, seeded from this run's rng (reproducible) and
    # restored afterwards (the caller's RNG state is neither read nor changed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(rng.integers(2**31)))
        for epoch in range(cfg.epochs):
            perm = rng.permutation(eligible)
            tot = 0.0
            # cosine decay of the learning rate
            for g_ in opt.param_groups:
                g_["lr"] = g_["base_lr"] * 0.5 * (1 + math.cos(math.pi * epoch / cfg.epochs))
            for s in range(steps_per_epoch):
                users = perm[s * cfg.batch_size:(s + 1) * cfg.batch_size]
                if dist is not None:  # this rank's part of the batch, gradients summed over the ranks
                    opt.zero_grad()
                    tot += dist.train_step(net, prep, users, cfg, rng, user_feats, logq, gen, cross, params)
                    opt.step()
                    if bar is not None:
                        bar.update(1)
                    continue
                batch = make_batch(prep, users, cfg, rng, user_feats) if batches is None else batches.draw(rng, user_feats)
                loss, _ = batch_loss(net, batch, cfg, logq, gen, cross=cross,
                                     use_wide=val is None or cfg.wide_train != "none")
                opt.zero_grad()
                loss.backward()
                clip_grad_norm(params, 5.0)
                opt.step()
                tot += float(loss.detach())
                if bar is not None:
                    bar.update(1)
            hist["loss"].append(tot / steps_per_epoch)
            msg = ""
            if val is not None:
                net.eval()
                if val_E is not None:
                    with torch.no_grad():
                        val_wide = [net.wide_alpha(n)[:, None] * E for E, n in val_E]
                score = _epoch_score(net, cfg, scored, val_wide)
                net.train()
                hist["validation"].append(score)
                msg = f" validation NDCG+Recall@10 {score:.4f}"
                if score > best_score:
                    best_score, best_epoch = score, epoch
                    best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
            if show and bar is None or epoch % 10 == 0 or epoch == cfg.epochs - 1:
                logger.info("epoch %d/%d loss %.4f%s (%.1fs)", epoch + 1, cfg.epochs,
                            hist["loss"][-1], msg, time.perf_counter() - t0)
            if val is not None and epoch - best_epoch >= cfg.patience:
                logger.info("early stop after epoch %d: best validation score %.4f at epoch %d",
                            epoch + 1, best_score, best_epoch + 1)
                break
    if bar is not None:
        bar.close()
    net.eval()
    if val is not None:
        net.load_state_dict(best_state)
        hist["best_epoch"] = best_epoch + 1
        if net.has_wide:
            learned = None
            if cfg.wide_train == "learned":  # new users keep the weight learned in training
                (c0, c1), (s0, s1, s2) = net.wide_coef.tolist(), net.wide_scale.tolist()
                learned = [c0, c1, s0, s1, s2]
            hist["fusion"] = tune_fusion(net, cfg, val, W_train, W_cold, new_user_alpha=learned)
            del W_train, W_cold
            with torch.no_grad():  # the served weights: EASE on the whole log
                G = _gram(_interaction_matrix(full))
                net.wide.copy_(ease_from_gram(G, cfg.wide_reg) * _pop_scale(G, cfg.wide_pop_exp or 0.0))
                del G
    elif cal is not None:
        hist["calibration"] = calibrate_wide(net, prep, cal[1], cal[2], cross, cfg, user_feats)
        with torch.no_grad():  # the served weights: EASE on the whole log
            X = _interaction_matrix(full)
            if net.wide_sparse is not None:
                net.set_wide_sparse(sparse_ease(X, cfg.wide_reg, cfg.wide_neighbours,
                                                block_bytes=_block_bytes(cfg))[0])
            else:
                net.wide.copy_(ease_from_gram(_gram(X), cfg.wide_reg))
    hist["seconds"] = time.perf_counter() - t0
    return hist
