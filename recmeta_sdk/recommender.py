"""The trained model, :class:`Recommender`: adapt, recommend, evaluate, feedback, save
(:mod:`recmeta_sdk.api` re-exports it; :func:`recmeta_sdk.api.load` reads its files).

(Usage: :mod:`recmeta_sdk.api`.)

Thread safety: after construction a :class:`Recommender`'s weights are never mutated;
``adapt``, ``user_state``, ``recommend`` and ``evaluate`` only read them, so concurrent calls
from several threads are safe. The only writes on the serving path are caches of pure
functions, each published by one atomic assignment: the model's serving snapshot (built once,
under a lock) and a state's wide-part cache (:class:`UserState`).

Serving path: ``recommend`` on a :class:`UserState` is one call of the compiled kernel
(``_core.policy_topk``) on numpy arrays: the read-only item table and bias of the snapshot,
the state's vector, and as bias vector the item bias plus the state's wide part, which
``adapt`` / ``user_state`` computed once; the results are those of
:func:`recmeta_sdk.ops.policy_topk` on the same inputs, bit for bit (``tests/test_serving.py``).
"""
from __future__ import annotations

import logging
import math
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import numpy as np
import pandas as pd
import torch

from . import ops
from .data import IdMap
from .evaluation.metrics import beyond_accuracy, ranking_metrics
from .model.io import list_to_tensors, write_model_file
from .model.network import Config, ItemFeatures, RecMetaNet, SparseWide
from .model.state import Recommendations, UserState
from .ops import _native, backends, reference
from .serving import SERVING_VERSION
from .serving.snapshot import sparse_rows_sum
from .training.loop import encode_features, history_tensors, schema_names
from .training.meta_tasks import task_phi as _task_phi

if TYPE_CHECKING:  # names used in annotations only
    import os

    from .online import OnlineStore, OnlineUser
    from .online.store import StateBackend
    from .training.meta_tasks import TaskState

logger = logging.getLogger("recmeta")

__all__ = ["Recommender", "MAX_ADAPT_STEPS", "KNOWN_STATE_CACHE_BYTES"]


def _is_scalar_id(x) -> bool:
    return isinstance(x, (int, np.integer, str)) and not isinstance(x, bool)


_U64 = (1 << 64) - 1
#: The most adaptation steps ``adapt`` / ``adapt_task`` / ``user_state`` accept per call (a
#: bound on the time of one call; training configs use a handful).
MAX_ADAPT_STEPS = 1000
#: memory a model spends on its known users' serving states (state vectors and wide parts),
#: least recently used first out: a known user's state is a pure function of the model, so it is
#: computed once (by ``recommend`` / ``user_state`` with the default ``steps`` and no ``task``)
KNOWN_STATE_CACHE_BYTES = 256 << 20
_TABLE_LOCK = threading.Lock()


def _core_module():
    """``recmeta_sdk._core`` (through :mod:`recmeta_sdk.ops._native`), or None when the compiled
    core is not built."""
    return _native.core() if backends.available("cpp") else None


def _readonly(t: torch.Tensor) -> np.ndarray:
    """A read-only, C-contiguous float32 numpy view of a CPU tensor (no copy when it is one)."""
    a = t.detach().contiguous().numpy().view()
    a.flags.writeable = False
    return a


class _ServingTable:
    """What serving reads on every call, as an immutable snapshot of the model's weights.

    ``V`` (N, d) and ``bias`` (N,) are read-only numpy views of the served item table and
    bias (the tensors that :func:`recmeta_sdk.ops.policy_topk` scored), so that a call hands them
    to the compiled kernel with no torch op and no copy. A :class:`Recommender`'s weights never
    change after construction (training, ``resume`` and :func:`load` build a new one), so
    one snapshot per model is valid for its lifetime; ``token`` identifies it in the
    wide-part cache of the states it adapted.
    """

    __slots__ = ("V", "W", "_alpha", "_src", "bias", "has_core", "net", "sorted_int_ids", "sparse", "token")

    def __init__(self, V: torch.Tensor, bias: torch.Tensor, item_ids: np.ndarray, net: RecMetaNet):
        self._src = (V, bias, item_ids, net)
        self.V = _readonly(V)
        self.bias = _readonly(bias)
        self.token = object()
        self.net = net
        self.W = _readonly(net.wide) if net.wide.numel() else None  # the dense wide (EASE) weights (N, N)
        self.sparse = net.wide_sparse is not None  # a sparse wide part (item neighbourhoods, CSR)
        self._alpha: dict[tuple, np.float32] = {}
        self.has_core = _core_module() is not None
        # integer item ids in increasing order (the usual case) are looked up by binary search
        ids = np.asarray(item_ids)
        self.sorted_int_ids = ids if (np.issubdtype(ids.dtype, np.integer) and len(ids)
                                      and bool(np.all(ids[1:] > ids[:-1]))) else None

    def __reduce__(self):
        # a copied or unpickled model rebuilds its snapshot from its own tensors (a new token:
        # the states' caches are recomputed; numpy views keep the canonical dtypes the
        # compiled core checks for)
        return (_ServingTable, self._src)

    def alpha(self, n: int, new: bool = False) -> np.float32:
        """``alpha(n)`` of the wide part (of a new user's history with ``new``), by the
        network's own formula (memoised)."""
        a = self._alpha.get((n, new))
        if a is None:
            with torch.inference_mode():
                a = np.float32(self.net.wide_alpha(torch.tensor([n], dtype=torch.int64), new)[0].item())
            self._alpha[(n, new)] = a
        return a


class Recommender:
    """A trained model: adapt to new users, recommend, evaluate, save (see the module docstring).

    Build one with :func:`train` or :func:`load`; the constructor is internal.

    ``item_ids`` / ``user_ids`` are the catalogue's and the known users' external ids (sorted);
    ``item_map`` / ``user_map`` the same as :class:`recmeta_sdk.data.IdMap` (the package's one
    id map: ``to_index`` for arrays, ``position`` for one id, -1 where unknown).
    """

    def __init__(self, net: RecMetaNet, cfg: Config, item_ids: np.ndarray, user_ids: np.ndarray,
                 hist_offsets: np.ndarray, hist_items: np.ndarray, hist_rewards: np.ndarray,
                 item_count: np.ndarray, item_schema: list, user_schema: list,
                 user_feat_offsets: np.ndarray, user_feat_indices: np.ndarray,
                 reward_scale: float = 1.0):
        self._net = net.eval()
        for p in self._net.parameters():
            p.requires_grad_(False)
        self.config = cfg
        self.item_ids = np.asarray(item_ids)
        self.user_ids = np.asarray(user_ids)
        #: the catalogue's and the known users' id maps (position = the model's internal index)
        self.item_map = IdMap(self.item_ids)
        self.user_map = IdMap(self.user_ids)
        self._hist_offsets = np.asarray(hist_offsets, np.int64)
        self._hist_items = np.asarray(hist_items, np.int64)
        self._hist_rewards = np.asarray(hist_rewards, np.float32)
        self._item_count = np.asarray(item_count, np.int64)
        self._item_schema = item_schema
        self._user_schema = user_schema
        self._uf_off = np.asarray(user_feat_offsets, np.int64)
        self._uf_idx = np.asarray(user_feat_indices, np.int64)
        self._reward_scale = float(reward_scale)
        with torch.no_grad():
            X, V = net.item_vectors()
        self._X = X.contiguous()
        self._V = V.contiguous()
        self._bias = net.item_bias.detach().clone()
        self._feature_names = schema_names(item_schema)
        self._int_ids = np.issubdtype(self.item_ids.dtype, np.integer)
        self._log_pop = torch.log1p(torch.as_tensor(self._item_count, dtype=torch.float32))
        # known users' states (see KNOWN_STATE_CACHE_BYTES): dense user id -> UserState
        self._known_states: OrderedDict = OrderedDict()
        # known users' (vectors, bases) (U, d) each, from a file saved with serving=True (or set by
        # such a save): the states served, instead of recomputing them (see _served_states)
        self._saved_states: Optional[tuple] = None
        self._known_lock = threading.Lock()
        per_state = 4 * (2 * int(X.shape[1]) + len(self.item_ids)) + 512
        self._known_capacity = max(1, KNOWN_STATE_CACHE_BYTES // per_state)
        #: the training history (loss and validation score per epoch, the choices made on
        #: the validation set; see :func:`recmeta_sdk.training.loop.fit`); empty for a loaded model
        self.history: dict = {}

    # ------------------------------------------------------------------ properties
    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def dim(self) -> int:
        return self.config.dim

    def __repr__(self) -> str:
        return (f"Recommender(items={self.n_items}, users={len(self.user_ids)}, dim={self.config.dim}, "
                f"encoder={self.config.encoder!r}, meta={self.config.meta!r})")

    # ------------------------------------------------------------------ the model view
    # recmeta_sdk.model.view.ModelView: what the online layer reads of the model (and nothing else)
    @property
    def network(self) -> RecMetaNet:
        """The policy network (eval mode, no gradients; shared, never modified by serving)."""
        return self._net

    @property
    def input_table(self) -> torch.Tensor:
        """(N, d) float32: the items' input vectors read by the user encoder (read-only)."""
        return self._X

    @property
    def item_table(self) -> torch.Tensor:
        """(N, d) float32: the items' output vectors the policy scores against (read-only)."""
        return self._V

    @property
    def reward_scale(self) -> float:
        """Rewards are divided by it before the model reads them."""
        return self._reward_scale

    @property
    def default_online_store(self) -> Optional[OnlineStore]:
        """The :class:`recmeta_sdk.online.OnlineStore` that :meth:`feedback` writes to (None
        before the first feedback); assign one (e.g. ``model.online_store(backend=...)``, a
        host's state backend) before the first feedback to replace it."""
        return self.__dict__.get("_online_store")

    @default_online_store.setter
    def default_online_store(self, store: Optional[OnlineStore]) -> None:
        self._online_store = store

    def item_positions(self, items: np.ndarray) -> np.ndarray:
        """(n,) int64 internal indices of external item ids (-1 where unknown)."""
        items = np.asarray(items)
        return (self.item_map.to_index(items) if len(items) else np.zeros(0, np.int64)).astype(np.int64)

    def item_position(self, item: Any) -> int:
        """The internal index of one external item id (-1 if unknown): one hash look-up."""
        return self.item_map.position(item)

    def user_position(self, user: Any) -> int:
        """The internal index of a training user's id (-1 if not a training user)."""
        if not _is_scalar_id(user):
            return -1
        return self.user_map.position(user)

    def user_history(self, position: int) -> tuple[np.ndarray, np.ndarray]:
        """Training user ``position``'s history: ``(items (n,) int64, rewards (n,) float32)``."""
        lo, hi = self._hist_offsets[position], self._hist_offsets[position + 1]
        return self._hist_items[lo:hi], self._hist_rewards[lo:hi]

    def adapt_steps(self, steps: Optional[int]) -> int:
        """The number of adaptation steps for ``steps`` (None: ``config.inner_steps``), validated."""
        return self._check_steps(steps)

    def user_feature_rows(self, position: int) -> np.ndarray:
        """Training user ``position``'s encoded side-feature rows (empty without user features)."""
        if len(self._uf_off) <= 1:
            return np.zeros(0, np.int64)
        return self._uf_idx[self._uf_off[position]:self._uf_off[position + 1]]

    def training_log(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The training histories in CSR form: ``(offsets (U+1,), items, rewards)``."""
        return self._hist_offsets, self._hist_items, self._hist_rewards

    def encode_history(self, items: np.ndarray, feature_rows: np.ndarray) -> torch.Tensor:
        """The encoder state ``h`` (1, d) of one history (internal indices) and side-feature rows."""
        hist = np.ascontiguousarray(items, dtype=np.int64)
        N = self.n_items
        with torch.no_grad():
            if 0 < len(hist) < N and hist.min() >= 0 and hist.max() < N:
                return self._net.user_state(*self._one_history_inputs(hist, feature_rows))
            bi, bo, bw, sq, sl = history_tensors([hist], self.config.seq_len, N)
            uo = torch.tensor([0, len(feature_rows)], dtype=torch.int64)
            return self._net.user_state(self._X, bi, bo, bw, sq, sl,
                                        torch.from_numpy(np.asarray(feature_rows).astype(np.int64)), uo)

    def history_offset(self, items: np.ndarray, new: bool = False) -> Optional[torch.Tensor]:
        """(1, N) float32: the wide (item-to-item) part of the logits of one history (internal
        indices; ``new``: a new user's), as ``RecMetaNet.wide_offset``; None without a wide part."""
        wide = self._wide_one(np.asarray(items, np.int64), new)
        return None if wide is None else torch.from_numpy(wide)[None]

    def score_all(self, state: UserState) -> np.ndarray:
        """(N,) float32 scores of every item for ``state`` before the temperature."""
        z = self._V.numpy() @ state.vector + self._bias.numpy()
        extra = self._state_bias(state)  # the state's wide part and item bias, if any
        return z if extra is None else z + extra

    def with_network(self, network: RecMetaNet, config: Config) -> Recommender:
        """A new Recommender with this catalogue and training log and other weights / config."""
        return type(self)(network, config, self.item_ids, self.user_ids, self._hist_offsets, self._hist_items,
                          self._hist_rewards, self._item_count, self._item_schema, self._user_schema,
                          self._uf_off, self._uf_idx, self._reward_scale)

    # ------------------------------------------------------------------ histories
    def _encode_history(self, history, unknown: str):
        if unknown not in ("error", "drop"):
            raise ValueError(f"unknown must be 'error' or 'drop', got {unknown!r}")
        rewards = None
        ts = None
        if isinstance(history, pd.DataFrame):
            if "item" not in history.columns:
                raise ValueError(f"history DataFrame needs an 'item' column; it has {list(history.columns)}")
            items = history["item"].to_numpy()
            if "reward" in history.columns:
                rewards = history["reward"].to_numpy(dtype=np.float64)
            if "timestamp" in history.columns:
                ts = history["timestamp"].to_numpy()
        elif isinstance(history, dict):
            if "item" not in history:
                raise ValueError(f"history dict needs an 'item' key; it has {sorted(history)}")
            items = np.asarray(history["item"])
            if history.get("reward") is not None:
                rewards = np.asarray(history["reward"], dtype=np.float64)
            if history.get("timestamp") is not None:
                ts = np.asarray(history["timestamp"])
        elif isinstance(history, (str, bytes)) or _is_scalar_id(history):
            raise TypeError(f"history must be a sequence of item ids, a dict or a DataFrame, got {history!r}")
        else:
            try:
                items = np.asarray(list(history))
            except TypeError:
                raise TypeError(f"history must be a sequence of item ids, a dict or a DataFrame, "
                                f"got {type(history).__name__}") from None
        if items.ndim != 1:
            raise ValueError(f"history items must be 1-D, got shape {items.shape}")
        if rewards is not None:
            if rewards.shape != items.shape or not np.isfinite(rewards).all():
                raise ValueError("history rewards must be finite and one per item")
        if ts is not None:
            if len(ts) != len(items):
                raise ValueError("history timestamps must be one per item")
            order = np.argsort(ts, kind="stable")
            items = items[order]
            rewards = rewards[order] if rewards is not None else None
        idx = self._item_positions(items) if len(items) else np.zeros(0, np.int64)
        bad = idx < 0
        dropped = ()
        if bad.any():
            names = [x.item() if hasattr(x, "item") else x for x in items[bad]]
            if unknown == "error":
                raise ValueError(f"history has {int(bad.sum())} item(s) unknown to the model: {names[:10]}"
                                 f" (pass unknown='drop' to ignore them)")
            dropped = tuple(names)
            idx, items = idx[~bad], items[~bad]
            rewards = rewards[~bad] if rewards is not None else None
        if rewards is None:
            rewards = np.full(len(idx), self._reward_scale, np.float64)
        return idx.astype(np.int64), items, rewards.astype(np.float32), dropped

    def _encode_user_features(self, features) -> np.ndarray:
        if features is None or not self._user_schema:
            return np.zeros(0, np.int64)
        if isinstance(features, pd.Series):
            features = features.to_dict()
        if not isinstance(features, dict):
            raise TypeError(f"features must be a dict of user side features, got {type(features).__name__}")
        rows, _ = encode_features(self._user_schema, features)
        return np.asarray(rows, np.int64)

    def _table(self) -> _ServingTable:
        """The serving snapshot (built on first use; see :class:`_ServingTable`)."""
        t = self.__dict__.get("_serving_table")
        if t is None:
            with _TABLE_LOCK:
                t = self.__dict__.get("_serving_table")
                if t is None:
                    t = _ServingTable(self._V, self._bias, self.item_ids, self._net)
                    self._serving_table = t
        return t

    def _item_positions(self, items: np.ndarray) -> np.ndarray:
        """Internal indices of external item ids (-1 where unknown), as ``pd.Index.get_indexer``:
        integer ids (of the catalogue's dtype) against a sorted catalogue by binary search, else
        by pandas."""
        ids = self._table().sorted_int_ids
        if ids is None or items.dtype != ids.dtype:
            return self.item_map.to_index(items)
        pos = np.searchsorted(ids, items)
        pos[pos == len(ids)] = 0
        return np.where(ids[pos] == items, pos, -1).astype(np.int64)

    def _one_history_inputs(self, hist: np.ndarray, ufeat: np.ndarray) -> tuple:
        """The encoder's inputs for one in-range, non-empty history ``hist`` (int64, contiguous):
        only the history's rows of X, in order (bag j = row j, the sequence's padding = row n),
        instead of the whole (N, d) table, which the encoder would copy to append its padding
        row. Same values in the same order as ``history_tensors([hist], L, N)`` and X.
        Returns ``(X, bag, bag_offsets, bag_weights, seq, seq_len, feature_rows, feature_offsets)``."""
        L = self.config.seq_len
        n = len(hist)
        m = min(n, L)
        # (numpy builds the small index arrays: cheaper than torch ops)
        seq = np.full((1, L), n, np.int64)
        seq[0, :m] = np.arange(n - m, n)
        ui = np.ascontiguousarray(ufeat, dtype=np.int64)
        uo = np.array([0, len(ui)], np.int64)
        bo, bag, seq, sl, ui, uo = (torch.from_numpy(a) for a in (
            np.array([0, n], np.int64), np.arange(n, dtype=np.int64), seq, np.array([m], np.int64), ui, uo))
        bw = torch.from_numpy(np.full(n, 1.0 / np.sqrt(np.float64(n)), np.float32))
        X = torch.from_numpy(self._X.numpy()[hist])
        return X, bag, bo, bw, seq, sl, ui, uo

    def _adapted(self, hists: list[np.ndarray], rewards: list[np.ndarray], ufeats: list[np.ndarray],
                 steps: int, task=None, new: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(base states, adapted states) (B, d) and the wide part of the scores (B, N) or None,
        for a batch of histories (the wide part is the one :meth:`_wide_bias` computes; ``new``:
        new users' histories); with a ``task`` (a :class:`~recmeta_sdk.training.meta_tasks.TaskState`)
        adaptation starts from its phi."""
        net = self._net
        N = self.n_items
        L = self.config.seq_len
        hist = np.ascontiguousarray(hists[0], dtype=np.int64) if len(hists) == 1 else None
        with torch.inference_mode():
            if hist is not None and 0 < len(hist) < N and hist.min() >= 0 and hist.max() < N:
                # one user (adapt, user_state): the encoder reads only the history's rows of X
                X, bag, bo, bw, seq, sl, ui, uo = self._one_history_inputs(hist, ufeats[0])
                n = len(hist)
                bi, rows = torch.from_numpy(hist), torch.from_numpy(np.zeros(n, np.int64))
                ui, uo = ui.numpy(), uo.numpy()
            else:
                bi, bo, bw, sq, sl = history_tensors(hists, L, N)
                uo = np.concatenate([[0], np.cumsum([len(u) for u in ufeats])]).astype(np.int64)
                ui = np.concatenate(ufeats).astype(np.int64) if uo[-1] else np.zeros(0, np.int64)
                X, bag, seq = self._X, bi, sq
                rows = torch.from_numpy(np.repeat(np.arange(len(hists)), [len(x) for x in hists]))
            h = net.user_state(X, bag, bo, bw, seq, sl, torch.from_numpy(ui), torch.from_numpy(uo))
            B = h.shape[0]
            w = (torch.from_numpy(np.maximum(np.concatenate(rewards), 0.0).astype(np.float32)) / self._reward_scale
                 if B else torch.zeros(0))
            lr = None if self.config.meta == "fomaml" else self.config.inner_lr
            if B == 1:
                wide = self._wide_one(hists[0], new)
                offset = None if wide is None else torch.from_numpy(wide)[None]
            else:
                offset = net.wide_offset(rows, bi, B, new=new)
            init = None if task is None else _task_phi(self, task)  # a task's phi (meta_tasks)
            gamma, delta = net.adapt_phi(h, self._V, rows, bi, w, steps, lr=lr, offset=offset, init=init)
            hp = net.apply_phi(h, gamma, delta)
        return h, hp, offset

    def _states(self, hists: list[np.ndarray], rewards: list[np.ndarray], ufeats: list[np.ndarray],
                steps: int, task=None, new: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(base states, adapted states), each (B, d), for a batch of histories (``new``: new
        users' histories)."""
        h, hp, _ = self._adapted(hists, rewards, ufeats, steps, task, new)
        return h, hp

    def _wide_bias(self, hists: list[np.ndarray], new: bool = False) -> torch.Tensor | None:
        """Per-user wide part of the scores, ``alpha(n) * sum_{j in history} W[j, :]`` (B, N)
        (``new``: of new users' histories, see :meth:`RecMetaNet.wide_alpha`)."""
        if not self._net.has_wide:
            return None
        rows = torch.from_numpy(np.repeat(np.arange(len(hists)), [len(x) for x in hists]))
        items = (torch.from_numpy(np.concatenate(hists).astype(np.int64)) if len(hists)
                 else torch.zeros(0, dtype=torch.int64))
        with torch.inference_mode():
            return self._net.wide_offset(rows, items, len(hists), new=new)

    def _wide_one(self, history: np.ndarray, new: bool = False) -> np.ndarray | None:
        """The wide part of one user's scores (N,) float32, or None: equal to
        ``_wide_bias([history], new)[0]`` (the network's :meth:`~RecMetaNet.wide_offset`), computed
        on the compiled core without torch ops: the sum of the W rows of the distinct history
        items in increasing order (one fused bag), times ``alpha(number of distinct items)``."""
        t = self._table()
        if t.W is None and not t.sparse:
            return None
        if t.W is not None and (not t.has_core or backends.select("embedding_bag", "cpu", "float32") != "cpp"):
            return self._wide_bias([np.asarray(history, np.int64)], new)[0].numpy()
        h = np.asarray(history, np.int64)
        items, last_rev = np.unique(h[::-1], return_index=True)  # first index in reverse = latest
        g = self.config.wide_recency
        w = None
        if g:  # the network's recency weights (RecMetaNet.wide_offset), in float32 as there
            rank = last_rev.astype(np.float32)
            w = (np.float32(1.0) + np.float32(g) * np.exp(np.float32(-float(self.config.wide_recency_decay)) * rank)
                 ).astype(np.float32)
        if t.W is None:  # the sparse wide part (as recmeta_sdk.serving computes it, numpy only)
            Ws = self._net.wide_sparse
            base = sparse_rows_sum(Ws.indptr.numpy(), Ws.indices.numpy(), Ws.values.numpy(), items, w, self.n_items)
            return base * t.alpha(len(items), new)
        base = _core_module().embedding_bag_forward([t.W], items, np.array([0, len(items)], np.int64), w, "sum")
        return base[0] * t.alpha(len(items), new)

    def _serving_cache(self, history: np.ndarray, wide) -> tuple:
        """The value of :attr:`UserState._serving` for a state of this model with ``history``."""
        if isinstance(wide, torch.Tensor):
            wide = wide.numpy()
        return (self._table().token, history, wide)

    def _state_wide(self, s: UserState) -> np.ndarray | None:
        """The wide part of ``s``'s scores (N,) float32 (None without a wide part): the value
        cached in the state when this model made it from the same history, else computed
        (and cached in the state: a pure function of the model and the history)."""
        t = self._table()
        if t.W is None and not t.sparse:
            return None
        c = s._serving
        if c is not None and c[0] is t.token and c[1] is s.history and c[2] is not None:
            return c[2]
        wide = self._wide_one(s.history, s.user is None)
        object.__setattr__(s, "_serving", (t.token, s.history, wide))
        return wide

    def _state_bias(self, s: UserState) -> np.ndarray | None:
        """The per-user part of ``s``'s item bias (N,) float32: its wide part plus its adapted
        item-bias vector (None when it has neither)."""
        wide = self._state_wide(s)
        ib = s.item_bias
        if ib is None:
            return wide
        if not isinstance(ib, np.ndarray) or ib.shape != (self.n_items,):
            raise ValueError(f"UserState item_bias must be a numpy array of shape ({self.n_items},), got "
                             f"{getattr(ib, 'shape', type(ib).__name__)}")
        return ib if wide is None else wide + ib

    def _serve(self, vectors: torch.Tensor, hists: list[np.ndarray], k: int, bias: torch.Tensor,
               exc_lists: list[np.ndarray] | None, cand: np.ndarray | None, tau: float,
               seed: int | None = None, new: bool = False):
        """Score and select with the fused policy kernel, one user per call (torch in and out;
        the wide part is computed from ``hists``, new users' with ``new``). See :meth:`_serve_np`."""
        wide = self._wide_bias(hists, new)
        wides = [None if wide is None else wide[b].numpy() for b in range(vectors.shape[0])]
        U = np.ascontiguousarray(vectors.detach().numpy(), dtype=np.float32)
        ids, scores, props = self._serve_np(U, wides, k, _readonly(bias), exc_lists, cand, tau, seed)
        return (torch.from_numpy(ids), torch.from_numpy(scores),
                None if props is None else torch.from_numpy(props))

    def _serve_np(self, U: np.ndarray, wides: list[np.ndarray | None], k: int, bias: np.ndarray,
                  exc_lists: list[np.ndarray] | None, cand: np.ndarray | None, tau: float,
                  seed: int | None = None):
        """Score and select with the fused policy kernel, one user per call, on numpy arrays.

        The policy is ``(<h', v_a> + b_a + alpha(n) (x W)_a) / tau``: the wide item-to-item
        term of each user (``wides[b]``, (N,) or None) enters the kernel as that user's bias
        vector, so the kernel scores only the d-dimensional deep state. ``U`` (B, d) float32;
        ``exc_lists[b]`` int64 item indices to exclude (duplicates allowed). With ``seed``
        the items are drawn (Gumbel-top-k); user b's noise uses the seed ``seed + b`` so that
        the users of one call draw independently. On the compiled core this calls
        ``_core.policy_topk`` / ``policy_sample`` directly (they validate the inputs and
        raise ValueError naming a bad value); other backends go through :mod:`recmeta_sdk.ops`.
        Returns numpy ``(ids (B, k) int64, scores (B, k) float32, propensities or None)``.
        """
        B = U.shape[0]
        t = self._table()
        V = t.V
        core = t.has_core and backends.select("policy_sample" if seed is not None else "policy_topk",
                                              "cpu", "float32") == "cpp"
        ids = np.empty((B, k), np.int64)
        scores = np.empty((B, k), np.float32)
        props = None if seed is None else np.empty((B, k), np.float32)
        ca = None
        if cand is not None:
            cand = np.ascontiguousarray(cand, dtype=np.int64)
            ca = (np.array([0, len(cand)], np.int64), cand)
        _core = _core_module()
        for b in range(B):
            bb = bias if wides[b] is None else bias + wides[b]
            ex = None
            if exc_lists is not None and len(exc_lists[b]):
                e = np.ascontiguousarray(exc_lists[b], dtype=np.int64)
                ex = (np.array([0, len(e)], np.int64), e)
            u = U[b:b + 1]
            if core:
                kw = {"bias": bb, "temperature": float(tau)}
                if ex is not None:
                    kw["exclude_offsets"], kw["exclude_ids"] = ex
                if ca is not None:
                    kw["candidate_offsets"], kw["candidate_ids"] = ca
                if seed is None:
                    i, sc, _ = _core.policy_topk(u, V, k, **kw)
                    if B == 1:
                        return i, sc, None
                    ids[b], scores[b] = i[0], sc[0]
                else:
                    i, sc, _, logtail = _core.policy_sample(u, V, k, (int(seed) + b) & _U64, **kw)
                    pr, _ = reference.slate_probabilities(torch.from_numpy(sc), torch.from_numpy(i >= 0),
                                                           torch.from_numpy(logtail))
                    ids[b], scores[b], props[b] = i[0], sc[0], pr[0].numpy()
            else:
                tex = None if ex is None else tuple(torch.from_numpy(x) for x in (ex[0], np.unique(ex[1])))
                tca = None if ca is None else tuple(torch.from_numpy(x) for x in ca)
                tu, tb = torch.from_numpy(u.copy()), torch.from_numpy(np.array(bb, np.float32))
                if seed is None:
                    i, sc, _ = ops.policy_topk(tu, self._V, k, bias=tb, exclude=tex, candidates=tca,
                                               temperature=tau)
                else:
                    i, sc, pr, _ = ops.policy_sample(tu, self._V, k, seed=(int(seed) + b) & _U64, bias=tb,
                                                     exclude=tex, candidates=tca, temperature=tau)
                    props[b] = pr[0].numpy()
                ids[b], scores[b] = i[0].numpy(), sc[0].numpy()
        return ids, scores, props

    def _check_steps(self, steps, task=None):
        if steps is None:  # with a task: its meta-trained phi, no per-user steps on top
            return self.config.inner_steps if task is None else 0
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
            raise ValueError(f"steps must be an int >= 0, got {steps!r}")
        if steps > MAX_ADAPT_STEPS:
            raise ValueError(f"steps must be <= {MAX_ADAPT_STEPS} (recmeta_sdk.api.MAX_ADAPT_STEPS: "
                             f"adaptation takes a few steps; each costs a forward and backward), got {steps!r}")
        return int(steps)

    # ------------------------------------------------------------------ public
    def adapt(self, history: Union[Sequence[Any], np.ndarray, Mapping[str, Any], pd.DataFrame], *,
              steps: Optional[int] = None, features: Optional[dict] = None,
              unknown: str = "error", task: Optional[TaskState] = None) -> UserState:
        """The state of a new user from a few interactions (pure: the model is not changed).

        Parameters
        ----------
        history : sequence of item ids (time order), or a dict / DataFrame with ``item`` and
            optional ``reward`` and ``timestamp`` (sorted by it)
        steps : adaptation steps on the history (default ``config.inner_steps``; 0 = none; at
            most :data:`MAX_ADAPT_STEPS`, 1000, else ValueError)
        features : the user's side features (dict), optional
        unknown : ``"error"`` (default: ValueError naming unknown items) or ``"drop"``
            (ignore them; they are listed in ``UserState.dropped``)
        task : a :class:`~recmeta_sdk.training.meta_tasks.TaskState` (from :meth:`adapt_task`) whose
            adaptation parameters replace the initial ones (``steps`` then defaults to 0:
            per-user steps start from the task's parameters), optional
        """
        steps = self._check_steps(steps, task)
        idx, ext, rew, dropped = self._encode_history(history, unknown)
        uf = self._encode_user_features(features)
        h, hp, wide = self._adapted([idx], [rew], [uf], steps, task, new=True)
        wide = None if wide is None else wide[0]
        return UserState(hp[0].numpy().copy(), h[0].numpy().copy(), idx, (tuple(ext.tolist()) if ext.dtype != object else
                                                                     tuple(x.item() if hasattr(x, "item") else x for x in ext)),
                         rew, None, dropped, steps, dict(features) if isinstance(features, dict) else None,
                         _serving=self._serving_cache(idx, wide))

    def _topk_many(self, histories, rewards, features, steps, k: int, exclude, batch_size: int = 256) -> np.ndarray:
        """(U, k) internal indices for many new users at once (evaluation helper).

        ``histories``: external item ids per user; ``rewards``: per user (or None);
        ``features``: per user dict (or None); ``exclude``: internal indices per user.
        """
        steps = self._check_steps(steps)
        out = []
        for s in range(0, len(histories), batch_size):
            hs, rs, ufs = [], [], []
            for j in range(s, min(s + batch_size, len(histories))):
                idx, _, rew, _ = self._encode_history(
                    {"item": np.asarray(histories[j]), "reward": None if rewards is None else rewards[j]}, "error")
                hs.append(idx)
                rs.append(rew)
                ufs.append(self._encode_user_features(features[j] if features is not None else None))
            _, hp = self._states(hs, rs, ufs, steps, new=True)
            ex = [np.unique(np.asarray(exclude[j], np.int64)) for j in range(s, s + len(hs))]
            ids, _, _ = self._serve(hp, hs, int(k), self._bias, ex, None, float(self.config.temperature), new=True)
            out.append(ids.numpy())
        return np.concatenate(out)

    def _known(self, user) -> int:
        if not _is_scalar_id(user):
            raise TypeError(f"user id must be an int or str, got {user!r}")
        u = self.user_map.position(user)
        if u < 0:
            raise ValueError(f"unknown user {user!r}: not in the training data (use adapt(history) for new users)")
        return int(u)

    def user_state(self, user_id: Union[int, np.integer, str], *, steps: Optional[int] = None,
                   task: Optional[TaskState] = None) -> UserState:
        """The state of a known (training) user from their training history (``task``: a
        :class:`~recmeta_sdk.training.meta_tasks.TaskState` whose adaptation parameters are used)."""
        if steps is None and task is None:
            return self._served_states([user_id])[0]
        return self._user_states([user_id], steps, task)[0]

    def adapt_task(self, interactions: pd.DataFrame, *, steps: Optional[int] = None) -> TaskState:
        """Adapt to a new task (campaign, segment, ...) from its interactions; pure. Returns a
        :class:`~recmeta_sdk.training.meta_tasks.TaskState` for ``task=`` (see :func:`recmeta_sdk.training.meta_tasks.adapt_task`)."""
        from .training.meta_tasks import adapt_task

        return adapt_task(self, interactions, steps=steps)

    def __getstate__(self) -> dict:
        # copies and pickles start with an empty known-user state cache (and their own lock)
        state = self.__dict__.copy()
        state["_known_states"] = OrderedDict()
        state.pop("_known_lock", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._known_lock = threading.Lock()

    def _user_states(self, users, steps, task=None) -> List[UserState]:
        """The states of known users, computed together (one batch through the network)."""
        return self._compute_user_states(users, [self._known(u) for u in users], steps, task)

    def _served_states(self, users) -> List[UserState]:
        """The serving states of known users (default steps, no task): each computed once, on
        its own (so that it does not depend on which users it was first asked with: batched
        matmuls may differ from single rows in the last bit), then kept in the model's cache
        (:data:`KNOWN_STATE_CACHE_BYTES`, least recently used out)."""
        us = [self._known(u) for u in users]
        cache = self._known_states
        out = [cache.get(u) for u in us]
        missed = set()
        for b, st in enumerate(out):
            if st is None:
                st = (self._saved_state(users[b], us[b]) if self._saved_states is not None else
                      self._compute_user_states([users[b]], [us[b]], None, None)[0])
                # shared from now on: read-only, so that no caller can change another's state
                for arr in (st.vector, st.base, st.rewards):
                    arr.setflags(write=False)
                out[b] = st
                missed.add(b)
        with self._known_lock:
            for b, u in enumerate(us):
                if b in missed:
                    cache[u] = out[b]
                elif u in cache:
                    cache.move_to_end(u)
            while len(cache) > self._known_capacity:
                cache.popitem(last=False)
        return out

    def _saved_state(self, user, u: int) -> UserState:
        """Known user u's state from the saved states (see :meth:`save`'s ``serving``)."""
        vectors, bases = self._saved_states
        a, b = self._hist_offsets[u], self._hist_offsets[u + 1]
        hist = self._hist_items[a:b]
        return UserState(vectors[u], bases[u], hist, tuple(self.item_ids[hist].tolist()), self._hist_rewards[a:b],
                         user, (), self._check_steps(None), None)

    def _compute_user_states(self, users, us, steps, task) -> List[UserState]:
        steps = self._check_steps(steps, task)
        hists = [self._hist_items[self._hist_offsets[u]:self._hist_offsets[u + 1]] for u in us]
        rews = [self._hist_rewards[self._hist_offsets[u]:self._hist_offsets[u + 1]] for u in us]
        ufs = [self._uf_idx[self._uf_off[u]:self._uf_off[u + 1]] if len(self._uf_off) > u + 1 else np.zeros(0, np.int64)
               for u in us]
        h, hp, wide = self._adapted(hists, rews, ufs, steps, task)
        out = []
        for b, u in enumerate(us):
            out.append(UserState(hp[b].numpy().copy(), h[b].numpy().copy(), hists[b],
                                 tuple(self.item_ids[hists[b]].tolist()), rews[b], users[b], (), steps, None,
                                 _serving=self._serving_cache(hists[b], None if wide is None else wide[b])))
        return out

    def _id_list(self, ids, name) -> np.ndarray:
        return np.zeros(0, np.int64) if ids is None else self.item_map.to_known_index(ids, name)

    def recommend(self, users_or_states: Union[int, np.integer, str, UserState, Sequence[Any], np.ndarray],
                  k: int = 10, *, exclude_seen: bool = True, exclude: Optional[Iterable[Any]] = None,
                  candidates: Optional[Iterable[Any]] = None, explore: Optional[str] = None,
                  temperature: Optional[float] = None,
                  diversity: float = 0.0, popularity_penalty: float = 0.0, seed: Optional[int] = None,
                  explain: bool = False, epsilon: float = 0.1, task: Optional[TaskState] = None) -> Recommendations:
        """Top-k items for one user or a batch.

        Parameters
        ----------
        users_or_states : a known user id, a :class:`UserState`, or a list of either
            (a list gives arrays of shape (B, k)); a user id with online feedback
            (:meth:`feedback`) is served from its latest online state, and the items it was
            shown without reward are excluded too when ``exclude_seen``
        k : int >= 1
        exclude_seen : remove the user's history items
        exclude, candidates : item ids to remove / to choose from (applied to every user)
        explore : None (greedy top-k), ``"sample"`` (Gumbel-top-k from the policy) or
            ``"epsilon"`` (epsilon-greedy over the greedy ranking, see
            :func:`recmeta_sdk.online.epsilon_slate`); both need ``seed`` (user b of a batch
            draws with ``seed + b``) and return propensities
        temperature : softmax temperature of the policy (default ``config.temperature``)
        diversity : in [0, 1): MMR re-ranking weight (0 = pure relevance)
        popularity_penalty : >= 0, subtracts ``penalty * log(1 + training count)`` from the
            scores (long-tail control)
        seed : int, for ``explore="sample"``
        explain : attach per-item explanations (history items by leave-one-out
            contribution, item features by their exact share of the score)
        epsilon : in [0, 1], the exploration rate of ``explore="epsilon"``
        task : a :class:`~recmeta_sdk.training.meta_tasks.TaskState`: known user ids are served with
            the task's adaptation parameters (UserStates, and users with online feedback,
            are served as given; make them with ``adapt(..., task=)`` / ``user_state(..., task=)``)
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        # k above the catalogue is capped at n_items (padding beyond the eligible items)
        k = min(int(k), self.n_items)
        if explore not in (None, "sample", "epsilon"):
            raise ValueError(f"explore must be None, 'sample' or 'epsilon', got {explore!r}")
        if explore is not None and (seed is None or isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
            raise ValueError(f"explore={explore!r} needs an int seed=, got {seed!r}")
        if seed is not None and not isinstance(seed, bool) and isinstance(seed, (int, np.integer)) \
                and not 0 <= int(seed) <= _U64:
            raise ValueError(f"seed must be in [0, 2**64), got {seed!r}")
        if not (isinstance(users_or_states, (UserState, list, tuple, np.ndarray, range))
                or _is_scalar_id(users_or_states)):
            raise TypeError(f"recommend: users_or_states must be a user id (int, numpy integer or str), "
                            f"a UserState, or a list of them, got {users_or_states!r} "
                            f"of type {type(users_or_states).__name__}")
        tau = self.config.temperature if temperature is None else temperature
        if not isinstance(tau, (int, float)) or not math.isfinite(tau) or tau <= 0:
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        if not isinstance(diversity, (int, float)) or not 0.0 <= diversity < 1.0:
            raise ValueError(f"diversity must be in [0, 1), got {diversity!r}")
        if not isinstance(popularity_penalty, (int, float)) or not math.isfinite(popularity_penalty) or popularity_penalty < 0:
            raise ValueError(f"popularity_penalty must be a finite number >= 0, got {popularity_penalty!r}")
        if diversity > 0 and explore is not None:
            raise ValueError(f"diversity re-ranking and explore={explore!r} cannot be combined")
        single = isinstance(users_or_states, UserState) or _is_scalar_id(users_or_states)
        batch = [users_or_states] if single else list(users_or_states)
        if not batch:
            raise ValueError("recommend: empty list of users")
        if explore == "epsilon":
            if task is not None:
                raise ValueError("task= and explore='epsilon' cannot be combined")
            if explain:
                raise ValueError("explain=True and explore='epsilon' cannot be combined")
            from .online.engine import epsilon_slate

            kw = dict(exclude_seen=exclude_seen, exclude=exclude, candidates=candidates,
                      temperature=temperature, popularity_penalty=popularity_penalty)
            recs = [epsilon_slate(self, u, k, epsilon=epsilon, seed=int(seed) + b, **kw)
                    for b, u in enumerate(batch)]
            if single:
                return recs[0]
            return Recommendations(np.stack([r.ids for r in recs]), np.stack([r.scores for r in recs]),
                                   np.stack([r.valid for r in recs]),
                                   np.stack([r.propensities for r in recs]), None)
        states: List[Optional[UserState]] = [s if isinstance(s, UserState) else None for s in batch]
        # users with online feedback are served from their latest published state (one dict
        # read, no lock); the items they were shown without reward count as seen
        misses: dict = {}
        online = getattr(self, "_online_store", None)
        if online is not None:
            for b, u in enumerate(batch):
                if states[b] is None:
                    cur = online.current(u)
                    if cur is not None:
                        states[b] = cur.state
                        misses[b] = np.setdiff1d(cur.seen, np.asarray(states[b].history, np.int64))
        known = [b for b, s in enumerate(states) if s is None]
        if known:
            kusers = [batch[b] for b in known]
            kstates = self._served_states(kusers) if task is None else self._user_states(kusers, None, task)
            for b, st in zip(known, kstates):
                states[b] = st
        for s in states:
            if s.vector.shape != (self.dim,):
                raise ValueError(f"UserState vector has shape {s.vector.shape}, this model needs ({self.dim},)")
        U = np.ascontiguousarray(states[0].vector.reshape(1, -1) if len(states) == 1 else
                                 np.stack([s.vector for s in states]), dtype=np.float32)
        ex_extra = self._id_list(exclude, "exclude")
        exc_lists = []
        for b, s in enumerate(states):
            # the kernel sorts and de-duplicates each list
            parts = [np.asarray(s.history, np.int64)] if exclude_seen else []
            if exclude_seen and b in misses:
                parts.append(misses[b])
            if len(ex_extra):
                parts.append(ex_extra)
            exc_lists.append(parts[0] if len(parts) == 1 else
                             np.concatenate(parts) if parts else np.zeros(0, np.int64))
        cand = None
        if candidates is not None:
            cand = self._id_list(candidates, "candidates")
        if popularity_penalty > 0:
            # in units of the returned scores (which are divided by tau)
            bias = (self._bias - float(popularity_penalty) * float(tau) * self._log_pop).numpy()
            if not np.isfinite(bias).all():
                raise ValueError(f"popularity_penalty={popularity_penalty!r} (with temperature {tau!r}) makes item "
                                 f"biases non-finite in float32; use a smaller penalty")
        else:
            bias = self._table().bias
        wides = [self._state_bias(s) for s in states]
        # the policy's temperature applies to both terms: (<h,v> + b) / tau
        props = None
        if explore == "sample":
            ids_np, sc, props = self._serve_np(U, wides, k, bias, exc_lists, cand, float(tau), seed=int(seed))
        elif diversity > 0:
            pool = min(self.n_items, max(5 * k, 50))
            pids, pscores, _ = self._serve_np(U, wides, pool, bias, exc_lists, cand, float(tau))
            ids, scores = self._mmr(torch.from_numpy(pids), torch.from_numpy(pscores), k, float(diversity))
            ids_np, sc = ids.numpy(), scores.numpy()
        else:
            ids_np, sc, _ = self._serve_np(U, wides, k, bias, exc_lists, cand, float(tau))
        valid = ids_np >= 0
        if self._int_ids and valid.all():
            ext = self.item_ids[ids_np]
        elif self._int_ids:
            ext = np.where(valid, self.item_ids[np.maximum(ids_np, 0)], -1).astype(self.item_ids.dtype)
        else:
            ext = np.empty(ids_np.shape, dtype=object)
            ext[:] = None
            ext[valid] = self.item_ids[ids_np[valid]]
        expl = self._explain(states, ids_np, float(tau)) if explain else None
        sc = sc.astype(np.float32, copy=False)
        pr = props
        if single:
            return Recommendations(ext[0], sc[0], valid[0], None if pr is None else pr[0],
                                   None if expl is None else expl[0])
        return Recommendations(ext, sc, valid, pr, expl)

    def _mmr(self, pids: torch.Tensor, pscores: torch.Tensor, k: int, lam: float):
        """Maximal marginal relevance over the pool: argmax (1-lam) rel - lam max cos(selected)."""
        B, P = pids.shape
        Vn = torch.nn.functional.normalize(self._V, dim=1)
        out_ids = torch.full((B, k), -1, dtype=torch.int64)
        out_sc = torch.full((B, k), float("-inf"))
        for b in range(B):
            m = pids[b] >= 0
            ids = pids[b][m]
            sc = pscores[b][m]
            if ids.numel() == 0:
                continue
            rel = (sc - sc.min()) / (sc.max() - sc.min()).clamp(min=1e-12)
            sim = Vn[ids] @ Vn[ids].T
            chosen = []
            maxsim = torch.full((ids.numel(),), float("-inf"))
            avail = torch.ones(ids.numel(), dtype=torch.bool)
            for j in range(min(k, ids.numel())):
                pen = torch.where(torch.isinf(maxsim), torch.zeros_like(maxsim), maxsim)
                obj = (1 - lam) * rel - lam * pen
                obj = obj.masked_fill(~avail, float("-inf"))
                c = int(torch.argmax(obj))
                chosen.append(c)
                avail[c] = False
                maxsim = torch.maximum(maxsim, sim[c])
            out_ids[b, :len(chosen)] = ids[chosen]
            out_sc[b, :len(chosen)] = sc[chosen]
        return out_ids, out_sc

    def _explain(self, states: List[UserState], ids: np.ndarray, tau: float) -> list:
        net = self._net
        off = net.feat_offsets.numpy()
        fidx = net.feat_indices.numpy()
        fw = net.feat_weights.numpy()
        out = []
        for b, s in enumerate(states):
            items = [int(i) for i in ids[b] if i >= 0]
            hv = torch.from_numpy(s.vector)
            n = len(s.history)
            hist_contrib = None
            if n and items:
                # leave-one-out: score with the full history minus score without item j
                H = s.history[-200:]
                R = s.rewards[-200:]
                m = len(H)
                hists = [np.delete(H, j) for j in range(m)]
                rews = [np.delete(R, j) for j in range(m)]
                uf = self._encode_user_features(s.features) if s.features else np.zeros(0, np.int64)
                _, hp = self._states(hists, rews, [uf] * m, s.steps, new=s.user is None)
                _, full = self._states([H], [R], [uf], s.steps, new=s.user is None)
                Vi = self._V[items]
                base = (full @ Vi.T)[0]
                loo = hp @ Vi.T  # (m, len(items))
                if self._net.has_wide:
                    base = base + self._wide_bias([H], s.user is None)[0, items]
                    loo = loo + self._wide_bias(hists, s.user is None)[:, items]
                hist_contrib = ((base[None, :] - loo) / tau).numpy()
            recs = []
            for j, a in enumerate(items):
                rows = fidx[off[a]:off[a + 1]]
                ws = fw[off[a]:off[a + 1]]
                contrib = []
                for r, w in zip(rows, ws):
                    if r >= self.n_items:
                        name = self._feature_names[r - self.n_items]
                        val = float(w * torch.dot(hv, net.emb_out[int(r)]) / tau)
                        contrib.append((name, val))
                contrib += self._dense_contributions(hv, a, tau)
                contrib.sort(key=lambda t: -t[1])
                hist = []
                if hist_contrib is not None:
                    H = s.history[-200:]
                    order = np.argsort(-hist_contrib[:, j], kind="stable")[:3]
                    hist = [(self.item_ids[H[o]].item() if hasattr(self.item_ids[H[o]], "item") else self.item_ids[H[o]],
                             float(hist_contrib[o, j])) for o in order]
                rec = {"item": self.item_ids[a].item() if hasattr(self.item_ids[a], "item") else self.item_ids[a],
                       "history": hist, "features": contrib[:3],
                       "bias": float(self._bias[a]) / tau}
                if s.item_bias is not None:  # the online feedback's share of the score
                    rec["feedback"] = float(s.item_bias[a]) / tau
                recs.append(rec)
            out.append(recs)
        return out

    def _dense_contributions(self, hv: torch.Tensor, a: int, tau: float) -> list:
        """(column, <h', W_c x_c> / tau) of item a's dense feature columns (their exact share
        of the score, like the feature rows')."""
        net = self._net
        if not getattr(net, "n_dense", 0):
            return []
        d = self.dim
        out, o = [], 0
        for f in self._item_schema:
            if f["kind"] != "dense":
                continue
            x = net.item_dense[a, o:o + f["dim"]]
            v = x @ net.item_dense_proj[o:o + f["dim"], d:]
            out.append((f"{f['column']} (dense)", float(torch.dot(hv, v) / tau)))
            o += f["dim"]
        return out

    def evaluate(self, test: pd.DataFrame, k: int = 10, *, exclude: Optional[pd.DataFrame] = None,
                 batch_size: int = 512) -> Dict[str, float]:
        """Ranking metrics @k on ``test`` (known users), full ranking, training items excluded.

        Recall, NDCG, MRR, Hit, Precision @k with RecBole's definitions (see
        :mod:`recmeta_sdk.evaluation.metrics`), plus coverage, intra-list diversity (over the output
        item vectors) and novelty. ``exclude`` adds more (user, item) pairs to remove from
        ranking (e.g. the validation part under RecBole's protocol). Test users unknown
        to the model raise ValueError.
        """
        if not isinstance(test, pd.DataFrame) or not {"user", "item"} <= set(test.columns):
            raise ValueError("test must be a DataFrame with 'user' and 'item' columns")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        uc = self.user_map.to_index(test["user"])
        if (uc < 0).any():
            bad = test["user"].to_numpy()[uc < 0][:5].tolist()
            raise ValueError(f"test has users unknown to the model: {bad}")
        ic = self.item_map.to_index(test["item"])
        users = np.unique(uc)
        pos = {u: p for p, u in enumerate(users)}
        truth = [set() for _ in users]
        for u, i in zip(uc, ic):
            if i >= 0:
                truth[pos[u]].add(int(i))
        extra = [[] for _ in users]
        if exclude is not None:
            eu = self.user_map.to_index(exclude["user"])
            ei = self.item_map.to_index(exclude["item"])
            for u, i in zip(eu, ei):
                if u in pos and i >= 0:
                    extra[pos[u]].append(int(i))
        tops = []
        for s in range(0, len(users), batch_size):
            chunk = users[s:s + batch_size]
            sts = self._user_states([self.user_ids[u] for u in chunk], None)
            U = torch.from_numpy(np.stack([st.vector for st in sts]))
            exl = [np.unique(np.concatenate([st.history, np.asarray(extra[pos[u]], np.int64)]))
                   for st, u in zip(sts, chunk)]
            ids, _, _ = self._serve(U, [st.history for st in sts], int(k), self._bias, exl, None,
                                    float(self.config.temperature))
            tops.append(ids.numpy())
        top = np.concatenate(tops)
        out = ranking_metrics(top, truth, int(k))
        out.update(beyond_accuracy(top, self.n_items, self._item_count, len(self.user_ids), self._V.numpy()))
        return out

    def feedback(self, events: Union[pd.DataFrame, Sequence[Union[Mapping[str, Any], tuple]]]
                 ) -> Dict[Any, OnlineUser]:
        """Online feedback: ``(user, item, reward, propensity, timestamp, position)`` rows (a
        DataFrame or a list of dicts / tuples). Each event updates that user's online state at
        once (one adaptation step; see :mod:`recmeta_sdk.online`) and is appended to the
        feedback log that ``train(..., resume=model)`` learns from. Returns ``{user:
        OnlineUser}``; ``recmeta_sdk.online.current(model, user).state`` is the user's latest
        state. The states live in :attr:`default_online_store` (bounded; a host may give it its
        own state backend, see :meth:`online_store`). Thread-safe; the model's weights are not
        changed."""
        from . import online

        return online.feedback(self, events)

    # ------------------------------------------------------------------ catalogue
    def online_store(self, *, encode: str = "positive", update: str = "step",
                     known_users: bool = True, backend: Optional[StateBackend] = None) -> OnlineStore:
        """A new online store of this model, separate from the one :meth:`feedback` writes to.

        An :class:`recmeta_sdk.online.OnlineStore`: per-user online states updated by its own
        feedback events (``encode``, ``update`` and ``known_users`` as documented there), for a
        host or a benchmark that serves several independent populations from one model.
        ``backend``: where it keeps the users' states, a
        :class:`recmeta_sdk.online.StateBackend` (default: a bounded in-process
        :class:`recmeta_sdk.online.MemoryBackend`). To make :meth:`feedback` use it, assign it
        to :attr:`default_online_store` before the first feedback.
        """
        from .online.engine import OnlineStore

        return OnlineStore(self, encode=encode, update=update, known_users=known_users, backend=backend)

    def add_items(self, items: pd.DataFrame) -> Recommender:
        """A new Recommender whose catalogue also holds ``items`` (item cold start).

        ``items``: side features of new items, indexed by their external ids (which must
        not be in the catalogue yet, and of the catalogue's id kind), with the columns of
        the training ``items`` (categorical, numeric and dense vector features; missing
        columns or values give no feature, unknown category values map to no row, other
        columns are ignored). A new item has no interactions: its id row is zero, so its
        vectors come from its features alone (the fused bag of its feature rows plus the
        projection of its dense features); its bias is the mean bias of the trained items,
        its wide (EASE) weights are zero and its training count is 0.

        Pure: this model is not changed (its serving caches stay consistent). The new
        Recommender has the same weights for every existing item (at a given user state
        they score exactly as here; adaptation steps, a softmax over the catalogue, now
        see the new items too) and can recommend, evaluate, explain and save the new
        items. Online feedback received so far is carried over (replayed on first use, as
        after ``train(..., resume=)``), and ``train(..., resume=new)`` learns the new items'
        id rows from their interactions.
        """
        from .training.loop import encode_dense

        if not isinstance(items, pd.DataFrame):
            raise TypeError(f"items must be a DataFrame indexed by item id, got {type(items).__name__}")
        if len(items) == 0:
            raise ValueError("add_items: items is empty")
        new_ids = items.index.to_numpy()
        if pd.isna(items.index).any():
            raise ValueError("add_items: items has missing (NaN/None) ids in its index")
        if items.index.has_duplicates:
            dup = items.index[items.index.duplicated()].unique()[:10].tolist()
            raise ValueError(f"add_items: items has duplicate ids {dup}")
        if self._int_ids:
            if not all(isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_)) for x in new_ids):
                bad = [x for x in new_ids if not isinstance(x, (int, np.integer)) or isinstance(x, (bool, np.bool_))]
                raise TypeError(f"add_items: this model's item ids are integers; got {bad[:5]!r}")
            new_ids = new_ids.astype(np.int64)
        else:
            if not all(isinstance(x, str) for x in new_ids):
                bad = [x for x in new_ids if not isinstance(x, str)]
                raise TypeError(f"add_items: this model's item ids are strings; got {bad[:5]!r}")
            new_ids = np.asarray(new_ids, dtype=object)
        known = self.item_map.to_index(new_ids) >= 0
        if known.any():
            raise ValueError(f"add_items: {int(known.sum())} item id(s) are already in the catalogue: "
                             f"{new_ids[known][:10].tolist()} (add_items adds new items only)")
        schema = self._item_schema
        cols = {f["column"] for f in schema}
        if not cols & set(map(str, items.columns)):
            logger.warning("add_items: none of the model's item feature columns %s is in items (columns %s): "
                           "the new items get feature-less (zero) vectors", sorted(cols), list(items.columns))
        net = self._net
        N, M = self.n_items, len(new_ids)
        N2 = N + M
        # feature bags: old item rows keep their index, feature rows shift by M, each new
        # item's bag is its own (zero) id row plus its feature rows
        off = net.feat_offsets.numpy()
        idx = net.feat_indices.numpy()
        idx = np.where(idx >= N, idx + M, idx)
        offsets, indices, weights = [off], [idx], [net.feat_weights.numpy()]
        recs = items.rename(columns=str).to_dict("records")
        dense_new = np.zeros((M, net.n_dense), np.float32) if net.n_dense else None
        end = int(off[-1])
        new_off = []
        for j, (key, rec) in enumerate(zip(new_ids, recs)):
            r, w = encode_features(schema, rec)
            indices.append(np.concatenate([[N + j], N2 + np.asarray(r, np.int64)]).astype(np.int64))
            weights.append(np.concatenate([[1.0], np.asarray(w, np.float64)]).astype(np.float32))
            end += 1 + len(r)
            new_off.append(end)
            if dense_new is not None:
                dense_new[j] = encode_dense(schema, rec, key.item() if hasattr(key, "item") else key)
        offsets.append(np.asarray(new_off, np.int64))
        dense = None if dense_new is None else np.concatenate([net.item_dense.numpy(), dense_new])
        feats = ItemFeatures(N2, list(self._feature_names), np.concatenate(offsets).astype(np.int64),
                             np.concatenate(indices).astype(np.int64), np.concatenate(weights).astype(np.float32),
                             dense)
        net2 = RecMetaNet(self.config, feats, net.n_user_rows)
        old_sd, new_sd = net.state_dict(), net2.state_dict()
        state = {}
        for name, new in new_sd.items():
            old = old_sd[name]
            if name in ("feat_offsets", "feat_indices", "feat_weights", "item_dense"):
                state[name] = new  # built from the new bags above
            elif name in ("emb_in", "emb_out"):  # rows: N items, then the feature values
                state[name] = torch.cat([old[:N], torch.zeros(M, old.shape[1], dtype=old.dtype), old[N:]])
            elif name == "wide_indptr":  # the sparse wide part: new items' rows are empty
                state[name] = torch.cat([old, old[-1:].expand(M)])
            elif name in ("wide_indices", "wide_values"):
                state[name] = old.clone()
            elif name in ("item_bias", "beta_bias"):
                state[name] = torch.cat([old, torch.full((M,), float(old.mean()), dtype=old.dtype)])
            elif old.shape == new.shape:
                state[name] = old.clone()
            elif old.dim() == new.dim() and all(a == b or (a == N and b == N2) for a, b in zip(old.shape, new.shape)):
                # any other per-item tensor (e.g. the wide EASE weights): zero for new items
                t = torch.zeros(new.shape, dtype=old.dtype)
                t[tuple(slice(0, a) for a in old.shape)] = old
                state[name] = t
            else:
                raise RuntimeError(f"add_items: cannot extend network tensor {name!r} "
                                   f"from {tuple(old.shape)} to {tuple(new.shape)}")
        if "wide_indptr" in state:  # (the sparse wide part's lengths are the old model's)
            net2.set_wide_sparse(SparseWide(state["wide_indptr"], state["wide_indices"], state["wide_values"], N2))
        net2.load_state_dict(state)
        out = Recommender(net2, self.config, np.concatenate([self.item_ids, new_ids]), self.user_ids,
                          self._hist_offsets, self._hist_items, self._hist_rewards,
                          np.concatenate([self._item_count, np.zeros(M, np.int64)]),
                          self._item_schema, self._user_schema, self._uf_off, self._uf_idx, self._reward_scale)
        old_store = getattr(self, "_online_store", None)
        if old_store is not None:
            from .online.engine import OnlineStore

            carried = old_store.log()
            out._online_store = OnlineStore(out, encode=old_store.encode, update=old_store.update,
                                            log=carried if len(carried) else None)
        logger.info("add_items: %d new items (catalogue %d -> %d)", M, N, N2)
        return out

    # ------------------------------------------------------------------ persistence
    def save(self, path: Union[str, os.PathLike], *, serving: bool = False) -> None:
        """Write the model to ``path`` atomically (safetensors + JSON; see :mod:`recmeta_sdk.model.io`).

        With ``serving=True`` the file also carries what serving a known user reads (the
        ``serving.*`` tensors: the served item table and biases, every known user's state and
        base state, the wide part's ``alpha(n)`` table), so that :func:`recmeta_sdk.serving.load`
        serves known users from it without torch. The states are computed once, in batches
        (a few seconds per 100k users), and from then on this model and every model
        :func:`load` reads from the file serve them (identical ids and scores to the
        :class:`~recmeta_sdk.serving.ServingModel`); the file grows by ``8 * users * dim`` bytes.
        """
        if not isinstance(serving, bool):
            raise TypeError(f"serving must be True or False, got {serving!r}")
        tensors = {f"net.{k}": v for k, v in self._net.state_dict().items()}
        tensors.update({
            "hist_offsets": torch.from_numpy(self._hist_offsets), "hist_items": torch.from_numpy(self._hist_items),
            "hist_rewards": torch.from_numpy(self._hist_rewards), "item_count": torch.from_numpy(self._item_count),
            "user_feat_offsets": torch.from_numpy(self._uf_off), "user_feat_indices": torch.from_numpy(self._uf_idx),
        })
        # format 3: every list that grows with the users, items or feature values is a tensor
        # (io.list_to_tensors), so that the JSON header stays small (see recmeta_sdk.model.io)
        meta = {
            "config": self.config.to_dict(),
            "item_ids": _ids_to_tensors("item_ids", self.item_ids, tensors),
            "user_ids": _ids_to_tensors("user_ids", self.user_ids, tensors),
            "item_schema": _schema_to_tensors(self._item_schema, "item_schema", tensors),
            "user_schema": _schema_to_tensors(self._user_schema, "user_schema", tensors),
            "n_user_feature_rows": self._net.n_user_rows,
            "reward_scale": self._reward_scale,
        }
        # the online feedback log travels with the model
        from .online.engine import log_to_file

        log_tensors, log_meta = log_to_file(self)
        if log_meta is not None:
            tensors.update(log_tensors)
            kind, t = list_to_tensors("feedback_users", log_meta["users"])
            tensors.update(t)
            meta["feedback"] = dict(log_meta, users={"kind": kind})
        if serving:
            tensors.update(self._serving_tensors())
            meta["serving"] = {"version": SERVING_VERSION}
        write_model_file(path, tensors, meta)

    def _serving_tensors(self) -> dict:
        """The ``serving.*`` tensors of a file saved with ``serving=True`` (see
        :mod:`recmeta_sdk.serving`): exactly the arrays :meth:`recommend` reads for a known user,
        so that serving from them gives the same ids and scores."""
        t = self._table()
        if self._saved_states is None:
            U = len(self.user_ids)
            states = np.zeros((U, self.dim), np.float32)
            bases = np.zeros((U, self.dim), np.float32)
            for s in range(0, U, 512):  # in batches through the network
                us = list(range(s, min(U, s + 512)))
                for j, st in enumerate(self._compute_user_states([None] * len(us), us, None, None)):
                    states[s + j], bases[s + j] = st.vector, st.base
            states.setflags(write=False)
            bases.setflags(write=False)
            with self._known_lock:  # from now on this model serves the saved states
                self._saved_states = (states, bases)
                self._known_states.clear()
        states, bases = self._saved_states
        out = {"serving.item_table": np.ascontiguousarray(t.V), "serving.item_bias": np.ascontiguousarray(t.bias),
               "serving.user_states": states, "serving.user_bases": bases, "serving.log_pop": self._log_pop.numpy()}
        if t.W is not None or t.sparse:
            lens = [len(np.unique(self._hist_items[a:b])) for a, b in zip(self._hist_offsets[:-1], self._hist_offsets[1:])]
            out["serving.wide_alpha"] = np.array([t.alpha(n) for n in range(max(lens, default=0) + 1)], np.float32)
        return out


def _ids_to_tensors(name: str, ids: np.ndarray, tensors: dict) -> dict:
    """An id map as ``lists.<name>.*`` tensors (added to ``tensors``); returns its metadata
    entry ``{"kind": "int" | "str"}`` (non-integer ids are written as strings, as before)."""
    if np.issubdtype(ids.dtype, np.integer):
        kind, t = list_to_tensors(name, ids, kind="int")
    else:
        kind, t = list_to_tensors(name, [str(x) for x in ids], kind="str")
    tensors.update(t)
    return {"kind": kind}


def _schema_to_tensors(schema: list, what: str, tensors: dict) -> list:
    """The schema with each categorical feature's ``values`` replaced by ``{"kind": "str"}``,
    the values written as the tensors ``lists.<what>.<j>.values.*`` (added to ``tensors``)."""
    out = []
    for j, f in enumerate(schema):
        if f.get("kind") in ("multi", "cat"):
            _, t = list_to_tensors(f"{what}.{j}.values", [str(v) for v in f["values"]], kind="str")
            tensors.update(t)
            f = dict(f, values={"kind": "str"})
        out.append(f)
    return out
