"""The facade: :func:`train` and :func:`load`, and the trained model :class:`Recommender`
(:mod:`recmeta_sdk.recommender`; files read by :mod:`recmeta_sdk.loading`), over the layers below.

It also re-exports the records :class:`UserState` and :class:`Recommendations`
(:mod:`recmeta_sdk.model.state`).

::

    import recmeta_sdk as rm
    ds = rm.datasets.load("ml-100k")
    model = rm.train(ds.interactions, users=ds.users, items=ds.items)
    state = model.adapt([50, 172, 181])              # a new user's first items, in ms
    recs = model.recommend(state, k=10, explain=True)
    recs.ids, recs.scores, recs.explanations[0]
    model.recommend([1, 2, 3], k=10)                 # known users, batched: ids (3, 10)
    model.evaluate(test, k=10)                       # Recall/NDCG/MRR/Hit/Precision@10 ...
    model.save("model.recmeta"); same = rm.load("model.recmeta")

Thread safety and the serving path: see :mod:`recmeta_sdk.recommender`.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Optional, Union

import numpy as np
import pandas as pd
import torch

from .loading import _ids_from_json, _ids_to_json, _net_shapes, load  # noqa: F401  (re-exported)
from .model.io import LoadLimits, ModelFileError
from .model.io import check_csr as _check_csr  # noqa: F401  (re-exported)
from .model.network import Config, RecMetaNet
from .model.state import Recommendations, UserState
from .recommender import (  # noqa: F401  (re-exported)
    KNOWN_STATE_CACHE_BYTES, MAX_ADAPT_STEPS, Recommender, _ServingTable,
)
from .training.loop import (
    build_schema, check_log, encode_features, fit, item_features, positive_threshold, prepare, schema_names,
)
from .training.meta_tasks import parse_tasks, task_sampler

logger = logging.getLogger("recmeta")

__all__ = ["train", "load", "Recommender", "UserState", "Recommendations", "ModelFileError", "LoadLimits"]


def _as_log(interactions: Any, columns: Optional[Dict[str, str]]) -> pd.DataFrame:
    """The log as a DataFrame with the standard columns: a DataFrame as it is (renamed by
    ``columns``); a scipy sparse (users x items) matrix as one row per stored entry (``user``,
    ``item`` = row, column; ``reward`` = the value); anything else through
    :func:`recmeta_sdk.data.read_interactions` (Arrow tables, mappings of arrays, CSV / TSV /
    Parquet paths)."""
    if hasattr(interactions, "tocoo") and hasattr(interactions, "nnz"):  # scipy.sparse, not imported here
        if columns is not None:
            raise ValueError("columns= does not apply to a sparse matrix (rows are users, columns items)")
        coo = interactions.tocoo()
        if coo.nnz == 0:
            raise ValueError("interactions: the sparse matrix stores no entries")
        return pd.DataFrame({"user": coo.row.astype(np.int64), "item": coo.col.astype(np.int64),
                             "reward": np.asarray(coo.data, dtype=np.float32)})
    if isinstance(interactions, pd.DataFrame) and columns is None:
        return interactions
    from .data import read_interactions

    return read_interactions(interactions, columns=columns)


def train(interactions: Any, *, users: Optional[pd.DataFrame] = None,
          items: Optional[pd.DataFrame] = None, config: Union[Config, Dict[str, Any], None] = None,
          tasks: str = "user",
          progress: Optional[bool] = None, resume: Optional[Recommender] = None,
          validation: Optional[pd.DataFrame] = None, num_threads: Optional[int] = None,
          columns: Optional[Dict[str, str]] = None,
          distributed: Union[bool, str, Any, None] = "auto") -> Recommender:
    """Meta-train a recommender on an interaction log.

    Parameters
    ----------
    interactions : DataFrame with ``user``, ``item`` and optional ``timestamp``, ``reward``,
        ``propensity`` (as returned by :func:`recmeta_sdk.datasets.load`), or what the data
        layer reads (:func:`recmeta_sdk.data.read_interactions`: a pyarrow Table, a mapping of
        column name to 1-D array, a ``.csv`` / ``.tsv`` / ``.parquet`` path), or a scipy
        sparse users x items matrix (one interaction per stored entry, its value the
        reward). A Parquet file, a folder of them (hive partitions allowed) or a
        ``pyarrow.dataset.Dataset`` is streamed by record batches into compact arrays, never
        a DataFrame of the whole log (per-user tasks; only ``user``, ``item``,
        ``timestamp``, ``reward`` and ``propensity`` are read; in distributed training each
        rank reads its share of the row groups). Rewards: a row
        is a *positive* when its reward reaches ``config["positive_threshold"]`` (default:
        decided from the data and logged: 4 of 5 stars for star-rating-like rewards, else
        reward > 0; without a ``reward`` column every row is a positive). Positives are the
        supervised targets; the other rows (e.g. impressions with reward 0) are never
        targets: they are context in the history the user state reads (what the user was
        shown) and logged actions for the off-policy RL term and the behaviour estimate, so
        the model does not imitate the logging policy. A reward-like column under another name (``rating``, ``click``, ...)
        is ignored with a warning; duplicate (user, item) rows are kept as repeats with a
        warning; an id column mixing types (``1`` and ``"1"``) raises TypeError.
    users, items : side features indexed by external user / item id, optional; every item
        in ``items`` joins the catalogue (items without interactions can be recommended
        through their features). Item columns may be categorical (``|``-separated or
        lists), numeric, or dense: fixed-length float vectors such as text embeddings
        (:func:`recmeta_sdk.data.text.embed_texts`), projected linearly into the item vectors;
        :meth:`Recommender.add_items` adds new items from the same columns later
    config : dict or :class:`~recmeta_sdk.model.Config` (see its docstring), optional
    tasks : ``"user"`` (one meta-learning task per user, the default) or a group-task kind
        with its column: ``"segment:COL"`` / ``"category:COL"`` / ``"campaign[:COL]"``, a tuple
        ``(kind, column)`` or a dict (see :func:`recmeta_sdk.training.meta_tasks.parse_tasks`)
    progress : show a progress bar (default: when stderr is a terminal)
    resume : a Recommender to update incrementally (off-policy, logged propensities as beta)
        from ``interactions`` (feedback events; None: its feedback log); see
        :func:`recmeta_sdk.online.resume_train`
    validation : DataFrame of held-out interactions (``user``, ``item``, optional ``reward``)
        of users in ``interactions``, optional. With a validation set training chooses on
        it: the wide part (EASE ridge, recency and popularity weights), the number of epochs
        (early stopping after ``config["patience"]`` epochs without improvement, up to
        ``config["epochs"]``; by default as many epochs as fit in 900 optimiser steps, at most
        30), the wide part's weight per history length and the temperature
        (see :func:`recmeta_sdk.training.loop.fit`). Without it, ``config["validation"]``
        carves one from ``interactions`` (``calib_holdout`` of the interactions of that
        fraction of the users with 5 or more, at most 2,000): by default (None) half of them
        wherever validation-tuned training applies (per-user tasks, a dense wide part, not
        distributed); 0 turns it off (see :class:`~recmeta_sdk.model.Config`). The returned model's
        ``history`` holds the loss per epoch and, with a validation set, the validation
        score per epoch and the choices made.
    num_threads : threads for training (``torch.set_num_threads`` for the call, restored
        after; default: torch's current setting)
    columns : mapping ``{name in the log: standard name}``, optional, e.g.
        ``{"user_id": "user", "rating": "reward"}``, applied before anything else
    distributed : ``"auto"`` (default), ``True``, ``False`` or a
        :class:`recmeta_sdk.training.distributed.DistributedConfig`. ``"auto"`` trains
        data-parallel across the ranks of an initialised ``torch.distributed`` group of more
        than one rank, or under ``torchrun`` (``WORLD_SIZE`` > 1), else in this process;
        ``True`` requires a group or the torchrun environment. Every rank makes the same call
        on the same log and returns the same model (see
        :mod:`recmeta_sdk.training.distributed`: item tables sharded above a per-rank budget;
        per-user tasks without validation, resume or calibration)

    Returns
    -------
    Recommender (``.history``: the training history)
    """
    if num_threads is not None:
        if isinstance(num_threads, bool) or not isinstance(num_threads, (int, np.integer)) or num_threads < 1:
            raise ValueError(f"num_threads must be a positive int, got {num_threads!r}")
        before = torch.get_num_threads()
        torch.set_num_threads(int(num_threads))
        try:
            return train(interactions, users=users, items=items, config=config, tasks=tasks, progress=progress,
                         resume=resume, validation=validation, columns=columns, distributed=distributed)
        finally:
            torch.set_num_threads(before)
    if validation is not None and not isinstance(validation, pd.DataFrame):
        raise TypeError(f"validation must be a DataFrame of held-out interactions, got {type(validation).__name__}")
    if validation is not None and (resume is not None or parse_tasks(tasks).kind != "user"):
        raise ValueError("validation= is supported for per-user tasks without resume")
    from .training import distributed as _dist

    dctx = _dist.resolve(distributed)
    if dctx is not None:
        why = ("resume=" if resume is not None else "validation=" if validation is not None
               else f"tasks={tasks!r}" if parse_tasks(tasks).kind != "user" else None)
        if why is not None:
            raise ValueError(f"distributed training (rank {dctx.rank} of {dctx.world_size}) does not support {why}; "
                             f"pass distributed=False to train in each process on its own")
    if resume is not None:
        from .online.engine import resume_train

        return resume_train(resume, interactions, config=config, progress=progress)
    spec = parse_tasks(tasks)
    from .data import is_parquet_source

    streamed = spec.kind == "user" and is_parquet_source(interactions)
    if not streamed:
        interactions = _as_log(interactions, columns)
    cfg = Config.from_dict(config)
    if cfg.wide_recency and cfg.wide_recency_decay is None and validation is None and not (cfg.validation or 0) > 0:
        raise ValueError(f"config.wide_recency={cfg.wide_recency!r} needs config.wide_recency_decay: only "
                         "validation-tuned training (validation= or config.validation > 0) chooses it")
    if items is not None and not isinstance(items, pd.DataFrame):
        raise TypeError(f"items must be a DataFrame indexed by item id, got {type(items).__name__}")
    if users is not None and not isinstance(users, pd.DataFrame):
        raise TypeError(f"users must be a DataFrame indexed by user id, got {type(users).__name__}")
    ingest = None
    if streamed:
        prep, has_reward, ingest = _stream_prepare(interactions, columns, items, dctx)
    else:
        if not isinstance(interactions, pd.DataFrame):
            raise TypeError(f"interactions must be a pandas DataFrame, got {type(interactions).__name__}")
        for col in ("user", "item"):
            if col not in interactions.columns:
                raise ValueError(f"interactions needs a {col!r} column; it has {list(interactions.columns)}")
        check_log(interactions)
        item_ids = pd.unique(interactions["item"].to_numpy())
        if item_ids is not None and items is not None:
            item_ids = np.union1d(item_ids, items.index.to_numpy())
        elif item_ids is not None:
            item_ids = np.sort(item_ids)
        prep = prepare(interactions, item_ids)
        has_reward = "reward" in interactions.columns
    thr, strict, why = positive_threshold(prep.rewards, cfg.positive_threshold)
    positive = (prep.rewards > thr if strict else prep.rewards >= thr) & (prep.rewards > 0)
    if has_reward:
        logger.info("positives: reward %s %g (%s): %d of %d rows; the others are logged actions only "
                    "(no supervised target)", ">" if strict else ">=", thr, why, int(positive.sum()),
                    len(positive))
    if not strict:
        cfg.positive_threshold = float(thr)
    if not positive.any():
        raise ValueError(f"no interaction is a positive (reward {'>' if strict else '>='} {thr:g}): "
                         f"nothing to learn from; set config positive_threshold")
    prep.rewards = np.where(positive, prep.rewards, 0.0).astype(np.float32)
    prep.item_count = np.bincount(prep.items[prep.rewards > 0], minlength=len(prep.item_ids)).astype(np.int64)
    pos_r = prep.rewards[positive]
    reward_scale = float(pos_r.mean()) if len(pos_r) else 1.0
    prep.rewards = prep.rewards / reward_scale
    item_schema = build_schema(items, cfg.year_bucket)
    feats = item_features(item_schema, items, prep.item_ids)
    user_schema = build_schema(users, cfg.year_bucket)
    n_uf = len(schema_names(user_schema))
    uf_off = np.zeros(len(prep.user_ids) + 1, np.int64)
    uf_idx = np.zeros(0, np.int64)
    if users is not None and user_schema:
        recs = users.reindex(pd.Index(prep.user_ids)).to_dict("records")
        rows = [np.asarray(encode_features(user_schema, r)[0], np.int64) for r in recs]
        uf_off = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
        uf_idx = np.concatenate(rows).astype(np.int64) if uf_off[-1] else np.zeros(0, np.int64)
    net = RecMetaNet(cfg, feats, n_uf)
    with torch.no_grad():  # start the item bias at log-popularity
        lp = torch.log(torch.as_tensor(prep.item_count, dtype=torch.float32) + 1.0)
        net.item_bias.copy_(lp - lp.mean())
    batches = None if spec.kind == "user" else task_sampler(spec, interactions, prep, cfg, users, items,
                                                            reward_scale)
    if dctx is not None:
        if (cfg.validation or 0) > 0 or cfg.calib_users > 0:
            raise ValueError(f"distributed training (rank {dctx.rank} of {dctx.world_size}) does not support "
                             f"config validation={cfg.validation!r} / calib_users={cfg.calib_users!r} (> 0); pass "
                             f"distributed=False to train in each process on its own")
        history = _dist.fit(net, prep, cfg, (uf_off, uf_idx) if n_uf else None, dctx, progress=progress)
    else:
        history = fit(net, prep, cfg, (uf_off, uf_idx) if n_uf else None, progress=progress, batches=batches,
                      validation=validation, tune=True)
    model = Recommender(net, cfg, prep.item_ids, prep.user_ids, prep.offsets, prep.items,
                        prep.rewards * reward_scale, prep.item_count, item_schema, user_schema,
                        uf_off, uf_idx, reward_scale)
    model.history = history
    if ingest is not None:
        model.history["ingest"] = ingest
    return model


def _stream_prepare(source: Any, columns: dict | None, items: pd.DataFrame | None, dctx) -> tuple:
    """A Parquet file / folder / dataset streamed into the training arrays without a DataFrame
    of the whole log (:func:`recmeta_sdk.data.scan_parquet`); in distributed training each rank
    reads its share (:func:`recmeta_sdk.training.distributed.read_parquet`). Returns
    ``(Prepared, has a reward column, {"rows", "rows_read", "parts", "bytes"})``."""
    from .data import scan_parquet
    from .training.loop import check_codes, prepare_codes

    extra = items.index.to_numpy() if items is not None else None
    if dctx is not None:
        from .training import distributed as _dist

        arrays, mine = _dist.read_parquet(source, dctx, columns=columns, extra_items=extra)
    else:
        arrays = scan_parquet(source, columns=columns, extra_items=extra)
        mine = (len(arrays), arrays.parts)
    if len(arrays) == 0:
        raise ValueError("interactions is empty")
    ingest = {"rows": len(arrays), "rows_read": int(mine[0]), "parts": int(mine[1]), "bytes": arrays.nbytes}
    check_codes(arrays.columns, arrays.users, arrays.items, len(arrays.item_map), stacklevel=4)
    prep = prepare_codes(arrays.user_map.ids, arrays.item_map.ids, arrays.users, arrays.items, arrays.timestamps,
                         arrays.rewards, arrays.propensities)
    logger.info("streamed %d interactions from Parquet (%d read here in %d row groups): %d users, %d items",
                ingest["rows"], ingest["rows_read"], ingest["parts"], len(prep.user_ids), len(prep.item_ids))
    return prep, arrays.rewards is not None, ingest
