"""The torch-free serving model: a saved model's ``serving.*`` section, checked, served by the compiled core."""
from __future__ import annotations

import math
import os
import threading
from collections import OrderedDict
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np

from ..data import IdMap
from ..model.io import (DEFAULT_LIMITS, LoadLimits, ModelFileError, _short, check_csr, check_values,
                        ids_from_tensors, read_model_arrays)
from ..model.state import Recommendations
from ..ops import _native, backends

__all__ = ["ServingModel", "load", "check_serving_section", "SERVING_VERSION", "WIDE_CACHE_BYTES"]

#: the version of the ``serving.*`` section (``meta["serving"]["version"]``) this reader knows
SERVING_VERSION = 1
#: the bytes of known users' wide-part vectors (4 bytes per item each) a :class:`ServingModel`
#: keeps, least recently used out (the same budget as the full model's state cache)
WIDE_CACHE_BYTES = 256 * 2**20


def _is_scalar_id(x) -> bool:
    return isinstance(x, (int, np.integer, str)) and not isinstance(x, (bool, np.bool_))


def _array(arrays: dict, name: str, shape: tuple, dtype, path) -> np.ndarray:
    a = arrays.get(name)
    if a is None:
        raise ModelFileError(f"{path}: tensor {name!r} is missing")
    a = a if isinstance(a, np.ndarray) else a.numpy()
    if a.shape != tuple(shape) or a.dtype != np.dtype(dtype):
        raise ModelFileError(f"{path}: tensor {name} has shape {a.shape} {a.dtype}, expected {tuple(shape)} "
                             f"{np.dtype(dtype)}")
    return a


def sparse_rows_sum(indptr: np.ndarray, indices: np.ndarray, values: np.ndarray, items: np.ndarray,
                    weights: Optional[np.ndarray], n: int) -> np.ndarray:
    """(n,) float32 ``sum_p weights[p] W[items[p], :]`` of a CSR matrix ``W`` (``indptr`` (n+1,)
    int64, ``indices`` (nnz,) int32, ``values`` (nnz,) float32), the rows' entries added in
    order (numpy only): one user's sparse wide part, as the full model and
    :class:`ServingModel` both compute it."""
    items = np.asarray(items, np.int64)
    starts, lens = indptr[items], indptr[items + 1] - indptr[items]
    pos = np.repeat(starts - (np.cumsum(lens) - lens), lens) + np.arange(int(lens.sum()))
    vals = values[pos] if weights is None else values[pos] * np.repeat(np.asarray(weights, np.float32), lens)
    row = np.zeros(int(n), np.float32)
    np.add.at(row, indices[pos], vals)
    return row


def _len1(a) -> int:
    return int(a.shape[0]) if a is not None and len(a.shape) == 1 else -1


def check_serving_section(arrays: dict, meta: dict, n_items: int, n_users: int, hist_offsets: np.ndarray,
                          hist_items: np.ndarray, limits: LoadLimits, path) -> dict:
    """Check a model file's ``serving.*`` tensors against its id maps and histories; returns
    them as numpy arrays by short name (``item_table``, ``item_bias``, ``user_states``,
    ``user_bases`` (the states before adaptation, which the full model's online updates start
    from), ``log_pop``, and ``wide_alpha`` and ``wide`` when the model has a wide part).

    Shapes and dtypes must agree with each other (one ``dim``), with ``n_items`` / ``n_users``
    and, for ``wide_alpha``, cover the longest distinct history; every value is finite and
    bounded by ``limits.max_abs_weight``. Any failure raises :class:`ModelFileError` naming
    the tensor. Used by :func:`load` and by :func:`recmeta_sdk.api.load` (which serves from
    the network but refuses a file whose serving section is inconsistent).
    """
    sv = meta.get("serving")
    if not isinstance(sv, dict) or set(sv) != {"version"}:
        raise ModelFileError(f"{path}: malformed serving entry {_short(sv)} (expected {{'version': "
                             f"{SERVING_VERSION}}})")
    if isinstance(sv["version"], bool) or sv["version"] != SERVING_VERSION:
        raise ModelFileError(f"{path}: serving section version {_short(sv['version'])} (this version reads "
                             f"{SERVING_VERSION})")
    table = arrays.get("serving.item_table")
    d = int(table.shape[1]) if table is not None and len(table.shape) == 2 else -1
    if not 1 <= d <= limits.max_dim:
        raise ModelFileError(f"{path}: tensor serving.item_table must be (items, dim) with 1 <= dim <= "
                             f"{limits.max_dim}, got shape {None if table is None else tuple(table.shape)}")
    out = {
        "item_table": _array(arrays, "serving.item_table", (n_items, d), np.float32, path),
        "item_bias": _array(arrays, "serving.item_bias", (n_items,), np.float32, path),
        "user_states": _array(arrays, "serving.user_states", (n_users, d), np.float32, path),
        "user_bases": _array(arrays, "serving.user_bases", (n_users, d), np.float32, path),
        "log_pop": _array(arrays, "serving.log_pop", (n_items,), np.float32, path),
    }
    wide = arrays.get("net.wide")
    sparse = "net.wide_indptr" in arrays  # a sparse wide part (CSR; see RecMetaNet.wide_mode)
    if sparse or (wide is not None and tuple(wide.shape) != (0, 0)):  # (0, 0): a model without a wide part
        if sparse:
            out["wide_indptr"] = _array(arrays, "net.wide_indptr", (n_items + 1,), np.int64, path)
            ix = arrays.get("net.wide_indices")
            out["wide_indices"] = _array(arrays, "net.wide_indices", (_len1(ix),), np.int32, path)
            out["wide_values"] = _array(arrays, "net.wide_values", (_len1(ix),), np.float32, path)
            check_csr(out["wide_indptr"], out["wide_indices"], n_items, "sparse wide part", path)
        else:
            out["wide"] = _array(arrays, "net.wide", (n_items, n_items), np.float32, path)
        lens = [len(np.unique(hist_items[a:b])) for a, b in zip(hist_offsets[:-1], hist_offsets[1:])]
        need = max(lens, default=0) + 1
        alpha = arrays.get("serving.wide_alpha")
        if alpha is None or _len1(alpha) < need:
            raise ModelFileError(f"{path}: tensor serving.wide_alpha must hold alpha(n) for n = 0 .. {need - 1} "
                                 f"(the longest distinct history), got "
                                 f"{'none' if alpha is None else tuple(alpha.shape)}")
        out["wide_alpha"] = _array(arrays, "serving.wide_alpha", (_len1(alpha),), np.float32, path)
    elif "serving.wide_alpha" in arrays:
        raise ModelFileError(f"{path}: tensor serving.wide_alpha without a wide part (net.wide)")
    for k, v in out.items():
        if k not in ("wide_indptr", "wide_indices"):
            check_values(v, "net." + k if k.startswith("wide") and k != "wide_alpha" else "serving." + k,
                         limits.max_abs_weight, path)
    if "wide_alpha" in out and (out["wide_alpha"] < 0).any():
        raise ModelFileError(f"{path}: tensor serving.wide_alpha holds a negative alpha")
    extra = sorted(k for k in arrays if k.startswith("serving.") and k[8:] not in out and k != "serving.wide")
    if extra:
        raise ModelFileError(f"{path}: unexpected tensors {extra[:5]}")
    return out


def _config_number(cfg: dict, key: str, path, limits: LoadLimits, *, positive: bool = False,
                   optional: bool = False) -> Optional[float]:
    v = cfg.get(key)
    if v is None and optional:
        return None
    if (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0
            or (positive and v <= 0) or v > limits.max_config_float):
        raise ModelFileError(f"{path}: config.{key} {_short(v)} must be a finite number "
                             f"{'> 0' if positive else '>= 0'} (at most {limits.max_config_float:g})")
    return float(v)


class ServingModel:
    """Known users' top-k from a model file saved with ``serving=True``, without torch.

    Build one with :func:`load`. Read-only after construction (the arrays are not writable),
    so one instance serves any number of threads; the only shared write is a bounded cache of
    known users' wide-part vectors (:data:`WIDE_CACHE_BYTES`), under a lock.

    Attributes
    ----------
    path : str
        The file it was loaded from (``recmeta_sdk.load(path)`` gives the full model, for what
        needs the network: new users' ``adapt``, feedback, exploration, explanations).
    item_ids, user_ids : ndarray
        The catalogue's and the known users' external ids; ``item_map`` / ``user_map`` the
        same as :class:`recmeta_sdk.data.IdMap`.
    n_items, dim : int
    temperature : float
        The policy's default temperature (``config.temperature``).
    """

    def __init__(self, path: str, arrays: dict, meta: dict, limits: LoadLimits):
        self.path = str(path)
        if meta.get("format_version", 0) < 3 or "serving" not in meta:
            raise ModelFileError(f"{path}: the file has no serving section: save the model with "
                                 f"model.save(path, serving=True) (or serve it with recmeta_sdk.load)")
        cfg = meta.get("config")
        if not isinstance(cfg, dict):
            raise ModelFileError(f"{path}: config is missing or not an object")
        self.temperature = _config_number(cfg, "temperature", path, limits, positive=True)
        self._recency = _config_number(cfg, "wide_recency", path, limits, optional=True) or 0.0
        decay = _config_number(cfg, "wide_recency_decay", path, limits, optional=True)
        if self._recency and decay is None:
            raise ModelFileError(f"{path}: config.wide_recency {self._recency} without wide_recency_decay")
        self._decay = decay
        used: set = set()
        self.item_ids = ids_from_tensors(meta.get("item_ids"), arrays, path, "item_ids", limits.max_items, limits, used)
        self.user_ids = ids_from_tensors(meta.get("user_ids"), arrays, path, "user_ids", limits.max_users, limits, used)
        N, U = len(self.item_ids), len(self.user_ids)
        if N == 0:
            raise ModelFileError(f"{path}: item_ids is empty")
        self._hist_offsets = _array(arrays, "hist_offsets", (U + 1,), np.int64, path)
        hi = arrays.get("hist_items")
        self._hist_items = _array(arrays, "hist_items", (_len1(hi),), np.int64, path)
        check_csr(self._hist_offsets, self._hist_items, N, "user history", path)
        sec = check_serving_section(arrays, meta, N, U, self._hist_offsets, self._hist_items, limits, path)
        self._V = sec["item_table"]
        self._bias = sec["item_bias"]
        self._states = sec["user_states"]
        self._log_pop = sec["log_pop"]
        self._W = sec.get("wide")
        self._Wsp = ((sec["wide_indptr"], sec["wide_indices"], sec["wide_values"]) if "wide_indptr" in sec
                     else None)
        self._alpha = sec.get("wide_alpha")
        for a in (self._V, self._bias, self._states, self._log_pop, self._W, self._alpha, self._hist_offsets,
                  self._hist_items, self.item_ids, self.user_ids):
            if a is not None:
                a.setflags(write=False)
        self.item_map = IdMap(self.item_ids)
        self.user_map = IdMap(self.user_ids)
        self.n_items, self.dim = N, int(self._V.shape[1])
        self._int_ids = np.issubdtype(self.item_ids.dtype, np.integer)
        self._wide_cache: OrderedDict = OrderedDict()
        self._wide_capacity = max(1, WIDE_CACHE_BYTES // (4 * N))
        self._lock = threading.Lock()
        try:
            self._core = _native.core()
        except ImportError as e:
            raise RuntimeError(f"recmeta_sdk.serving needs the compiled core (recmeta_sdk._core did not import: {e}); "
                               f"serve with recmeta_sdk.load(path) instead") from None
        if backends.env_override() and backends.resolve(None, "cpu") != "cpp":
            raise RuntimeError(f"RECMETA_BACKEND={backends.resolve(None, 'cpu')!r}: recmeta_sdk.serving runs on the "
                               f"compiled core only; serve with recmeta_sdk.load(path) for another backend")

    def __repr__(self) -> str:
        return (f"ServingModel(items={self.n_items}, users={len(self.user_ids)}, dim={self.dim}, "
                f"wide={self._W is not None}, path={self.path!r})")

    def known(self, user: Any) -> bool:
        """Whether ``user`` is a known (training) user this model serves."""
        return _is_scalar_id(user) and self.user_map.position(user) >= 0

    def _user(self, user) -> int:
        if not _is_scalar_id(user):
            raise TypeError(f"user id must be an int or str, got {user!r}")
        u = self.user_map.position(user)
        if u < 0:
            raise ValueError(f"unknown user {user!r}: not in the training data (a new user needs the full model: "
                             f"recmeta_sdk.load(path).adapt(history))")
        return u

    def _history(self, u: int) -> np.ndarray:
        return self._hist_items[self._hist_offsets[u]:self._hist_offsets[u + 1]]

    def _wide(self, u: int) -> Optional[np.ndarray]:
        """User u's wide part (N,) float32: ``alpha(n)`` times the recency-weighted sum of the W
        rows of the distinct history items (as :meth:`recmeta_sdk.Recommender.recommend`)."""
        if self._W is None and self._Wsp is None:
            return None
        with self._lock:
            w = self._wide_cache.get(u)
            if w is not None:
                self._wide_cache.move_to_end(u)
                return w
        h = self._history(u)
        items, last_rev = np.unique(h[::-1], return_index=True)  # first index in reverse = latest
        weights = None
        if self._recency:
            rank = last_rev.astype(np.float32)
            weights = (np.float32(1.0) + np.float32(self._recency) * np.exp(np.float32(-self._decay) * rank)
                       ).astype(np.float32)
        if self._Wsp is not None:  # the sparse wide part: the history's CSR rows, added in order
            base = sparse_rows_sum(*self._Wsp, items, weights, self.n_items)[None]
        else:
            base = self._core.embedding_bag_forward([self._W], items, np.array([0, len(items)], np.int64), weights,
                                                    "sum")
        w = base[0] * self._alpha[len(items)]
        w.setflags(write=False)
        with self._lock:
            self._wide_cache[u] = w
            while len(self._wide_cache) > self._wide_capacity:
                self._wide_cache.popitem(last=False)
        return w

    def recommend(self, users: Union[int, np.integer, str, Sequence[Any], np.ndarray], k: int = 10, *,
                  exclude_seen: bool = True, exclude: Optional[Iterable[Any]] = None,
                  candidates: Optional[Iterable[Any]] = None, temperature: Optional[float] = None,
                  popularity_penalty: float = 0.0) -> Recommendations:
        """Top-k items for one known user or a list of them, as the full model's
        :meth:`~recmeta_sdk.Recommender.recommend` with the same arguments (greedy; the
        options that need the network are the full model's, ``recmeta_sdk.load(self.path)``).

        Parameters
        ----------
        users : a known user id, or a list of them (arrays of shape (B, k))
        k : int >= 1 (capped at the number of items)
        exclude_seen : remove the user's training history
        exclude, candidates : item ids to remove / to choose from (every user)
        temperature : the policy's temperature (default ``config.temperature``)
        popularity_penalty : >= 0, subtracts ``penalty * log(1 + training count)`` from the scores
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        k = min(int(k), self.n_items)
        tau = self.temperature if temperature is None else temperature
        if (isinstance(tau, bool) or not isinstance(tau, (int, float, np.floating)) or not math.isfinite(tau)
                or tau <= 0):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        if (isinstance(popularity_penalty, bool) or not isinstance(popularity_penalty, (int, float, np.floating))
                or not math.isfinite(popularity_penalty) or popularity_penalty < 0):
            raise ValueError(f"popularity_penalty must be a finite number >= 0, got {popularity_penalty!r}")
        single = _is_scalar_id(users)
        if not single and not isinstance(users, (list, tuple, np.ndarray, range)):
            raise TypeError(f"recommend: users must be a user id (int, numpy integer or str) or a list of them, "
                            f"got {users!r} of type {type(users).__name__}")
        batch = [users] if single else list(users)
        if not batch:
            raise ValueError("recommend: empty list of users")
        us = [self._user(u) for u in batch]
        extra = self.item_map.to_known_index(exclude, "exclude") if exclude is not None else np.zeros(0, np.int64)
        ca = None
        if candidates is not None:
            cand = np.ascontiguousarray(self.item_map.to_known_index(candidates, "candidates"), dtype=np.int64)
            ca = (np.array([0, len(cand)], np.int64), cand)
        if popularity_penalty > 0:
            bias = self._bias - float(popularity_penalty) * float(tau) * self._log_pop
            if not np.isfinite(bias).all():
                raise ValueError(f"popularity_penalty={popularity_penalty!r} (with temperature {tau!r}) makes item "
                                 f"biases non-finite in float32; use a smaller penalty")
        else:
            bias = self._bias
        B = len(us)
        ids = np.empty((B, k), np.int64)
        scores = np.empty((B, k), np.float32)
        for b, u in enumerate(us):
            wide = self._wide(u)
            bb = bias if wide is None else bias + wide
            parts = ([self._history(u)] if exclude_seen else []) + ([extra] if len(extra) else [])
            kw = {"bias": bb, "temperature": float(tau)}
            if parts:
                e = np.ascontiguousarray(parts[0] if len(parts) == 1 else np.concatenate(parts), dtype=np.int64)
                if len(e):
                    kw["exclude_offsets"], kw["exclude_ids"] = np.array([0, len(e)], np.int64), e
            if ca is not None:
                kw["candidate_offsets"], kw["candidate_ids"] = ca
            i, sc, _ = self._core.policy_topk(self._states[u:u + 1], self._V, k, **kw)
            ids[b], scores[b] = i[0], sc[0]
        valid = ids >= 0
        if self._int_ids:
            ext = np.where(valid, self.item_ids[np.maximum(ids, 0)], -1).astype(self.item_ids.dtype)
        else:
            ext = np.empty(ids.shape, dtype=object)
            ext[:] = None
            ext[valid] = self.item_ids[ids[valid]]
        if single:
            return Recommendations(ext[0], scores[0], valid[0], None, None)
        return Recommendations(ext, scores, valid, None, None)


def load(path: Union[str, os.PathLike], *, limits: Optional[LoadLimits] = None) -> ServingModel:
    """A :class:`ServingModel` from a model file saved with ``serving=True``, without torch.

    The file is read and verified as :func:`recmeta_sdk.load` does (sizes, header, SHA-256;
    :mod:`recmeta_sdk.model.io`), then the id maps, histories and the ``serving.*`` tensors
    are checked (:func:`check_serving_section`).

    Raises
    ------
    FileNotFoundError
        if there is no file at ``path``.
    ModelFileError
        if the file is malformed, inconsistent, exceeds a limit, or has no serving section
        (the message says how to save one).
    """
    limits = DEFAULT_LIMITS if limits is None else limits
    arrays, meta = read_model_arrays(path, limits)
    try:
        return ServingModel(str(path), arrays, meta, limits)
    except ModelFileError:
        raise
    except (TypeError, ValueError, KeyError, IndexError, OverflowError) as e:
        raise ModelFileError(f"{path}: inconsistent model file ({type(e).__name__}: {e})") from None
