"""Loading a model file into a :class:`~recmeta_sdk.recommender.Recommender`, every count, shape,
index and value checked first (:func:`load`)."""
from __future__ import annotations

import logging
import math
import os
from typing import Optional, Union

import numpy as np
import torch

from .model.io import (DEFAULT_LIMITS, LoadLimits, ModelFileError, list_from_tensors, list_tensor_names,
                       read_model_file)
from .model.io import check_csr as _check_csr
from .model.io import check_values as _check_values
from .model.io import ids_from_tensors as _ids_from_tensors
from .model.network import Config, ItemFeatures, RecMetaNet, SparseWide
from .recommender import Recommender
from .serving import check_serving_section
from .training.loop import schema_names

logger = logging.getLogger("recmeta")

__all__ = ["load"]


def _schema_from_tensors(schema, tensors: dict, path, what: str, limit: int, limits: LoadLimits, used: set):
    """A format-3 schema with the categorical values read back from their tensors (the rest is
    checked by :func:`_schema_from_file`)."""
    if not isinstance(schema, list):
        return schema
    out = []
    for j, f in enumerate(schema):
        if isinstance(f, dict) and f.get("kind") in ("multi", "cat"):
            if f.get("values") != {"kind": "str"}:
                raise ModelFileError(f"{path}: {what}[{j}].values must be {{'kind': 'str'}} in format 3 (the values "
                                     f"in the tensors lists.{what}.{j}.values.*), got {_short(f.get('values'))}")
            name = f"{what}.{j}.values"
            f = dict(f, values=list_from_tensors(tensors, name, "str", path, limit, limits, distinct=False))
            used.update(list_tensor_names(name))
        out.append(f)
    return out


def _ids_to_json(ids: np.ndarray) -> dict:
    """The id map as written in the metadata by format 1 and 2 (kept for reference and tests)."""
    if np.issubdtype(ids.dtype, np.integer):
        return {"kind": "int", "values": [int(x) for x in ids]}
    return {"kind": "str", "values": [str(x) for x in ids]}


def _ids_from_json(d, path, what: str, limit: int, limits: LoadLimits) -> np.ndarray:
    """An id map of the file as an array (int64 or object), checked: kinds, ranges, lengths, distinct."""
    if not isinstance(d, dict) or d.get("kind") not in ("int", "str") or not isinstance(d.get("values"), list):
        raise ModelFileError(f"{path}: malformed id map {what} (a dict with kind 'int' or 'str' and a list of values)")
    vals = d["values"]
    if len(vals) > limit:
        raise ModelFileError(f"{path}: {what} has {len(vals)} ids (limit {limit})")
    if d["kind"] == "int":
        bad = next((v for v in vals if isinstance(v, bool) or not isinstance(v, int)
                    or not _I64_MIN <= v <= _I64_MAX), None)
        if bad is not None or not all(isinstance(v, int) for v in vals):
            raise ModelFileError(f"{path}: id map {what} of kind int holds {_short(bad)}, not an int64")
        arr = np.asarray(vals, dtype=np.int64)
    else:
        bad = next((v for v in vals if not isinstance(v, str) or len(v) > limits.max_id_chars), None)
        if bad is not None:
            raise ModelFileError(f"{path}: id map {what} of kind str holds {_short(bad)} (strings of at most "
                                 f"max_id_chars={limits.max_id_chars} characters)")
        arr = np.asarray(vals, dtype=object)
    if len(set(vals)) != len(vals):
        raise ModelFileError(f"{path}: id map {what} has duplicate ids")
    return arr


_I64_MIN, _I64_MAX = -(2**63), 2**63 - 1
# Config fields whose bound is a LoadLimits attribute (the others: max_config_int / _float)
_CONFIG_LIMITS = {"dim": "max_dim", "hidden": "max_hidden", "layers": "max_layers", "heads": "max_heads",
                  "seq_len": "max_seq_len", "inner_steps": "max_inner_steps"}


def _short(v) -> str:
    s = repr(v)
    return s if len(s) <= 80 else s[:77] + "..."


def _config_from_file(d, path, limits: LoadLimits) -> Config:
    """The file's config, every value type-checked and bounded by ``limits`` before use."""
    from dataclasses import fields

    if not isinstance(d, dict):
        raise ModelFileError(f"{path}: config must be a JSON object, got {_short(d)}")
    known = {f.name: f for f in fields(Config)}
    for name, v in d.items():
        f = known.get(name)
        if f is None:
            raise ModelFileError(f"{path}: unknown config key {_short(name)}")
        kind = type(f.default)
        if name == "wide_budget_bytes":
            if v is None:  # no budget (Config.validate bounds an int)
                continue
            kind = int
        if f.default is None:  # an optional value (e.g. Optional[float]): None or a bounded number
            kind = float if "float" in str(f.type) or "int" in str(f.type) else None
            if v is None or kind is None:  # (other kinds: Config.validate checks them)
                continue
        if kind is bool:
            ok = isinstance(v, bool)
        elif kind is int:
            if name == "seed":  # a torch generator seed (and seed + 7919 for the dense part)
                lo, hi = _I64_MIN, 2**64 - 1 - 7919
            elif name == "wide_budget_bytes":  # bytes (Config.validate's bound)
                lo, hi = 1, 2**62
            else:
                lim = getattr(limits, _CONFIG_LIMITS.get(name, "max_config_int"))
                lo, hi = -limits.max_config_int, lim
            ok = isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi
            if not ok and isinstance(v, int) and not isinstance(v, bool):
                raise ModelFileError(f"{path}: config.{name} = {_short(v)} is outside [{lo}, {hi}]"
                                     + (f" (limit {_CONFIG_LIMITS[name]})" if name in _CONFIG_LIMITS else ""))
        elif kind is float:
            ok = (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                  and abs(v) <= limits.max_config_float)
        else:
            ok = isinstance(v, str) and len(v) <= 64
        if not ok:
            raise ModelFileError(f"{path}: config.{name} has an invalid value {_short(v)} "
                                 f"(expected {kind.__name__})")
    if "wide_budget_bytes" not in d:  # files from before the budget: the dense wide part at every size
        d = dict(d, wide_budget_bytes=None)
    try:
        cfg = Config.from_dict(d)
    except (TypeError, ValueError) as e:
        raise ModelFileError(f"{path}: invalid config ({e})") from None
    if cfg.temperature < limits.min_temperature:
        raise ModelFileError(f"{path}: config.temperature = {cfg.temperature!r} is below min_temperature="
                             f"{limits.min_temperature:g}")
    if abs(math.log(cfg.inner_lr)) > limits.max_log_step:
        raise ModelFileError(f"{path}: config.inner_lr = {cfg.inner_lr!r}: its log is beyond max_log_step="
                             f"{limits.max_log_step:g}")
    return cfg


def _schema_from_file(schema, path, what: str, limits: LoadLimits) -> list:
    """A feature schema of the file (see :func:`recmeta_sdk.training.loop.build_schema`), checked."""
    if schema is None:
        return []
    if not isinstance(schema, list):
        raise ModelFileError(f"{path}: {what} must be a list, got {_short(schema)}")
    for j, f in enumerate(schema):
        where = f"{what}[{j}]"
        if not isinstance(f, dict) or not isinstance(f.get("column"), str) or len(f["column"]) > limits.max_id_chars:
            raise ModelFileError(f"{path}: {where} is malformed (a dict with a string column)")
        kind = f.get("kind")
        if kind in ("multi", "cat"):
            vals = f.get("values")
            if not isinstance(vals, list) or not all(isinstance(v, str) and len(v) <= limits.max_id_chars
                                                     for v in vals):
                raise ModelFileError(f"{path}: {where}.values must be a list of strings")
        elif kind == "num":
            e = f.get("edges")
            if (not isinstance(e, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                   and math.isfinite(x) for x in e)
                    or any(b < a for a, b in zip(e[:-1], e[1:]))):
                raise ModelFileError(f"{path}: {where}.edges must be a sorted list of finite numbers")
        elif kind == "dense":
            dim, mean, scale = f.get("dim"), f.get("mean"), f.get("scale")
            if isinstance(dim, bool) or not isinstance(dim, int) or not 1 <= dim <= limits.max_hidden:
                raise ModelFileError(f"{path}: {where}.dim must be an int in [1, {limits.max_hidden}], got {_short(dim)}")
            if (not isinstance(mean, list) or len(mean) != dim
                    or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
                               and abs(x) <= limits.max_config_float for x in mean)):
                raise ModelFileError(f"{path}: {where}.mean must be {dim} finite numbers")
            if (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale)
                    or not 0 < scale <= limits.max_config_float):
                raise ModelFileError(f"{path}: {where}.scale must be a finite number > 0, got {_short(scale)}")
        else:
            raise ModelFileError(f"{path}: {where} has an unknown kind {_short(kind)}")
    return schema


def _net_shapes(cfg: Config, N: int, R: int, nnz: int, D: int, n_uf: int, wide_nnz: int = 0) -> dict:
    """The name -> (shape, dtype) of every tensor of a :class:`RecMetaNet` state dict, without
    building it (mirrors ``RecMetaNet._build``; ``tests/test_model_file_mutations.py`` checks
    it against real networks): ``R`` table rows, ``nnz`` bag entries, ``D`` dense columns,
    ``wide_nnz`` entries of a sparse wide part."""
    d, f32 = cfg.dim, torch.float32
    n_parts = 3 if cfg.encoder != "none" else 2
    nw = N if RecMetaNet.wide_enabled(cfg, N) else 0
    s = {"emb_in": ((R, d), f32), "emb_out": ((R, d), f32), "item_bias": ((N,), f32),
         "feat_offsets": ((N + 1,), torch.int64), "feat_indices": ((nnz,), torch.int64),
         "feat_weights": ((nnz,), f32), "emb_user": ((max(n_uf, 1), d), f32), "pos": ((cfg.seq_len, d), f32),
         "fuse1.weight": ((cfg.hidden, n_parts * d), f32), "fuse1.bias": ((cfg.hidden,), f32),
         "fuse2.weight": ((d, cfg.hidden), f32), "fuse2.bias": ((d,), f32), "skip.weight": ((d, n_parts * d), f32),
         "phi_gamma": ((d,), f32), "phi_delta": ((d,), f32), "log_lr": ((2, d), f32), "wide": ((nw, nw), f32),
         "wide_coef": ((2,), f32), "wide_scale": ((3,), f32), "beta_map.weight": ((d, d), f32),
         "beta_map.bias": ((d,), f32), "beta_bias": ((N,), f32)}
    if RecMetaNet.wide_mode(cfg, N) == "sparse":
        s.update({"wide_indptr": ((N + 1,), torch.int64), "wide_indices": ((wide_nnz,), torch.int32),
                  "wide_values": ((wide_nnz,), f32)})
    if D:
        s["item_dense"] = ((N, D), f32)
        s["item_dense_proj"] = ((D, 2 * d), f32)
    for i in range(cfg.layers):
        if cfg.encoder == "transformer":
            p = f"seq.layers.{i}."
            s.update({p + "self_attn.in_proj_weight": ((3 * d, d), f32), p + "self_attn.in_proj_bias": ((3 * d,), f32),
                      p + "self_attn.out_proj.weight": ((d, d), f32), p + "self_attn.out_proj.bias": ((d,), f32),
                      p + "linear1.weight": ((2 * d, d), f32), p + "linear1.bias": ((2 * d,), f32),
                      p + "linear2.weight": ((d, 2 * d), f32), p + "linear2.bias": ((d,), f32)})
            for n in ("norm1", "norm2"):
                s.update({p + n + ".weight": ((d,), f32), p + n + ".bias": ((d,), f32)})
        elif cfg.encoder == "gru":
            for w in ("weight_ih", "weight_hh"):
                s[f"seq.{w}_l{i}"] = ((3 * d, d), f32)
            for b in ("bias_ih", "bias_hh"):
                s[f"seq.{b}_l{i}"] = ((3 * d,), f32)
    return s


def _expect(tensors: dict, name: str, shape: tuple, dtype, path) -> torch.Tensor:
    t = tensors.get(name)
    if t is None:
        raise ModelFileError(f"{path}: tensor {name!r} is missing")
    if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
        raise ModelFileError(f"{path}: tensor {name} has shape {tuple(t.shape)} {t.dtype}, "
                             f"expected {tuple(shape)} {dtype}")
    return t


def _len1(t) -> int:
    """The length of a 1-D tensor, else -1 (a shape no check accepts)."""
    return int(t.shape[0]) if t is not None and t.dim() == 1 else -1


def _load_checked(path, tensors: dict, meta: dict, limits: LoadLimits) -> Recommender:
    from .training.loop import dense_width

    cfg = _config_from_file(meta.get("config"), path, limits)
    used: set = set()  # the lists.* tensors read
    feedback = meta.get("feedback")
    if meta.get("format_version", 0) >= 3:  # the lists are tensors (see Recommender.save)
        item_ids = _ids_from_tensors(meta.get("item_ids"), tensors, path, "item_ids", limits.max_items, limits, used)
        user_ids = _ids_from_tensors(meta.get("user_ids"), tensors, path, "user_ids", limits.max_users, limits, used)
        item_schema = _schema_from_tensors(meta.get("item_schema"), tensors, path, "item_schema", limits.max_items,
                                           limits, used)
        user_schema = _schema_from_tensors(meta.get("user_schema"), tensors, path, "user_schema", limits.max_users,
                                           limits, used)
        if "feature_names" in meta:
            raise ModelFileError(f"{path}: feature_names in a file of format 3 (derived from the item schema)")
        if isinstance(feedback, dict) and "users" in feedback:
            fu = feedback["users"]
            if not isinstance(fu, dict) or set(fu) != {"kind"}:
                raise ModelFileError(f"{path}: malformed feedback users {_short(fu)} (format 3: {{'kind': ...}}, the "
                                     f"ids in the tensors lists.feedback_users.*)")
            users = list_from_tensors(tensors, "feedback_users", fu["kind"], path, limits.max_users, limits)
            used.update(list_tensor_names("feedback_users"))
            feedback = dict(feedback, users=users.tolist() if isinstance(users, np.ndarray) else users)
    else:  # format 1 and 2: the lists are in the metadata
        item_ids = _ids_from_json(meta.get("item_ids"), path, "item_ids", limits.max_items, limits)
        user_ids = _ids_from_json(meta.get("user_ids"), path, "user_ids", limits.max_users, limits)
        item_schema, user_schema = meta.get("item_schema"), meta.get("user_schema")
    N, U = len(item_ids), len(user_ids)
    if N == 0:
        raise ModelFileError(f"{path}: item_ids is empty")
    item_schema = _schema_from_file(item_schema, path, "item_schema", limits)
    user_schema = _schema_from_file(user_schema, path, "user_schema", limits)
    names = meta.get("feature_names") if meta.get("format_version", 0) < 3 else schema_names(item_schema)
    if names != schema_names(item_schema):
        raise ModelFileError(f"{path}: feature_names do not match the item schema's features")
    n_uf = meta.get("n_user_feature_rows")
    if isinstance(n_uf, bool) or not isinstance(n_uf, int) or n_uf != len(schema_names(user_schema)):
        raise ModelFileError(f"{path}: n_user_feature_rows {_short(n_uf)} does not match the user schema's "
                             f"{len(schema_names(user_schema))} feature rows")
    rs = meta.get("reward_scale", 1.0)
    if (isinstance(rs, bool) or not isinstance(rs, (int, float)) or not math.isfinite(rs)
            or not 0 < rs <= limits.max_config_float):
        raise ModelFileError(f"{path}: reward_scale {_short(rs)} must be a finite number > 0")
    rs = float(rs)
    D = dense_width(item_schema)
    R = N + len(names)
    # every shape from the config, the id maps and the schemas, checked before anything is built
    ho = _expect(tensors, "hist_offsets", (U + 1,), torch.int64, path).numpy()
    hi = _expect(tensors, "hist_items", (_len1(tensors.get("hist_items")),), torch.int64, path).numpy()
    hr = _expect(tensors, "hist_rewards", (len(hi),), torch.float32, path)
    cnt = _expect(tensors, "item_count", (N,), torch.int64, path).numpy()
    uo_t = tensors.get("user_feat_offsets")
    uo = _expect(tensors, "user_feat_offsets", (0,) if uo_t is not None and uo_t.shape == (0,) else (U + 1,),
                 torch.int64, path).numpy()
    ui = _expect(tensors, "user_feat_indices", (_len1(tensors.get("user_feat_indices")),), torch.int64,
                 path).numpy()
    want = _net_shapes(cfg, N, R, max(_len1(tensors.get("net.feat_indices")), 0), D, n_uf,
                       max(_len1(tensors.get("net.wide_indices")), 0))
    got = {k[4:]: v for k, v in tensors.items() if k.startswith("net.")}
    if "wide_scale" not in got:
        got["wide_scale"] = torch.tensor([0.0, 1.0, 2.0])  # files from before the calibration: alpha unscaled
    extra = sorted(set(got) - set(want))
    missing = sorted(set(want) - set(got))
    if extra or missing:
        raise ModelFileError(f"{path}: network tensors do not match the config "
                             f"(missing {missing[:5]}, extra {extra[:5]})")
    for k, (shape, dtype) in want.items():
        if tuple(got[k].shape) != shape or got[k].dtype != dtype:
            raise ModelFileError(f"{path}: tensor net.{k} has shape {tuple(got[k].shape)} {got[k].dtype}, "
                                 f"expected {shape} {dtype}")
    others = set(tensors) - {"net." + k for k in got} - {"hist_offsets", "hist_items", "hist_rewards", "item_count",
                                                          "user_feat_offsets", "user_feat_indices"}
    others = sorted(k for k in others - used if not k.startswith(("feedback.", "serving.")))
    if others:
        raise ModelFileError(f"{path}: unexpected tensors {others[:5]}")
    # values: index ranges, finite and bounded floats
    _check_csr(got["feat_offsets"].numpy(), got["feat_indices"].numpy(), R, "item feature bag", path)
    _check_csr(ho, hi, N, "user history", path)
    if "wide_indptr" in got:
        _check_csr(got["wide_indptr"].numpy(), got["wide_indices"].numpy(), N, "sparse wide part", path)
    if len(uo):
        _check_csr(uo, ui, max(n_uf, 1), "user feature bag", path)
    elif len(ui):
        raise ModelFileError(f"{path}: user_feat_indices without user_feat_offsets")
    if len(cnt) and cnt.min() < 0:
        raise ModelFileError(f"{path}: item_count holds a negative count {int(cnt.min())}")
    for k, v in got.items():
        if v.dtype == torch.float32:
            _check_values(v, "net." + k, limits.max_log_step if k == "log_lr" else limits.max_abs_weight, path)
    _check_values(hr / rs, "hist_rewards (divided by reward_scale)", limits.max_abs_weight, path)
    ws = got["wide_scale"]
    if not (abs(float(ws[0])) <= limits.max_log_step and float(ws[1]) >= 0
            and float(torch.log1p(ws[2]) - torch.log1p(ws[1])) > 0):
        raise ModelFileError(f"{path}: net.wide_scale {ws.tolist()} must be (log m, n_lo, n_hi) with "
                             f"|log m| <= {limits.max_log_step:g} and 0 <= n_lo < n_hi")
    feats = ItemFeatures(N, list(names), got["feat_offsets"].numpy(), got["feat_indices"].numpy(),
                         got["feat_weights"].numpy(), got["item_dense"].numpy() if D else None)
    net = RecMetaNet(cfg, feats, n_uf)  # its tensors have the checked shapes of the file's
    if "wide_indptr" in got:  # (the sparse wide part's lengths are the file's)
        net.set_wide_sparse(SparseWide(got["wide_indptr"], got["wide_indices"], got["wide_values"], N))
    net.load_state_dict(got)
    model = Recommender(net, cfg, item_ids, user_ids, ho, hi, hr.numpy(), cnt, item_schema, user_schema,
                        uo, ui, rs)
    from .online.engine import log_from_file

    log_from_file(model, tensors, feedback, path, limits)  # the feedback log, if saved (format 2 and later)
    if "serving" in meta or any(k.startswith("serving.") for k in tensors):
        # served from the network, but a file whose serving section is inconsistent is refused
        sec = check_serving_section(tensors, meta, N, U, ho, hi, limits, path)
        for a in (sec["user_states"], sec["user_bases"]):
            a.setflags(write=False)
        model._saved_states = (sec["user_states"], sec["user_bases"])
    _probe(model, path)
    return model


def _probe(model: Recommender, path) -> None:
    """Serve the first known user (else a new user with an empty history) once: a model
    whose scores are not finite is refused at load rather than at its first ``recommend``."""
    if len(model.user_ids):
        u = model.user_ids[0]
        s = model.user_state(u.item() if hasattr(u, "item") else u)
    else:
        s = model.adapt([])
    try:
        r = model.recommend(s, k=min(model.n_items, 10), exclude_seen=False)
    except (ValueError, RuntimeError, FloatingPointError) as e:
        raise ModelFileError(f"{path}: the model cannot serve ({e})") from None
    if not np.isfinite(r.scores[r.valid]).all() or not np.isfinite(s.vector).all():
        raise ModelFileError(f"{path}: the model's scores are not finite (weights out of range)")


def load(path: Union[str, os.PathLike], *, limits: Optional[LoadLimits] = None) -> Recommender:
    """Load a model written by :meth:`Recommender.save`.

    Every count, size and config value the file declares is checked against ``limits``
    before anything is allocated or built, and the tensors' shapes, index ranges and values
    against the config and the id maps, so that a model that loads serves (see
    :mod:`recmeta_sdk.model.io`). Temp files of interrupted saves of ``path`` are removed.

    Parameters
    ----------
    path : str or Path
    limits : :class:`~recmeta_sdk.model.io.LoadLimits`, optional
        The bounds (default ``LoadLimits()``); raise one to load a larger model.

    Raises
    ------
    FileNotFoundError
        if there is no file at ``path``.
    ModelFileError
        (a ``ValueError``) if the file is truncated, tampered with, inconsistent, exceeds a
        limit or is of an unknown format version, with a message naming the field. Never
        unpickles anything.
    """
    tensors, meta = read_model_file(path, limits)
    limits = DEFAULT_LIMITS if limits is None else limits
    try:
        return _load_checked(path, tensors, meta, limits)
    except ModelFileError:
        raise
    except (TypeError, ValueError, KeyError, IndexError, OverflowError, RuntimeError) as e:
        # a check above that is missing: still the one documented exception
        raise ModelFileError(f"{path}: inconsistent model file ({type(e).__name__}: {e})") from None
