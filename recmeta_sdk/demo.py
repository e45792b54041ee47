"""``recmeta demo``: meta-train on MovieLens-100K and compare with the classical peers.

Prints, in one run:

1. **Warm top-10** under RecBole's protocol (random 8:1:1 split per user, seed 2020; full
   ranking over all items with the user's training and validation items excluded;
   metrics on the test part) for the model beside popularity and EASE (ridge tuned on the valid part)
   fitted on the same training part.
2. **Cold start** for k = 5, 10, 20 support interactions (new users: 5 folds of users,
   seed 2020; the first k interactions by time are the support set, the query set is
   everything after the first 20, the first 20 are excluded from ranking) for the
   meta-adapted model, the same model without adaptation, the same network without
   meta-training (trained the ordinary way on the existing users' histories, no support /
   query tasks, no inner loop; then fine-tuned on the support set with the same steps),
   an ablation (meta-training tasks kept, inner loop removed), popularity and EASE
   fold-in. The full protocol averages all 5 folds (``--folds 5``); the default runs fewer
   to fit a few minutes, and says so.

   What meta-training means here (:mod:`recmeta_sdk.training.loop`): each training sample is a
   user task split into a support set and a query set (a time-ordered prefix of
   1..``max_prefix`` items and the rest, with probability ``prefix_prob``: the new-user
   tasks; else a random part hidden from the encoder); the outer loss is the query loss
   after adaptation on the support set (the encoder reads it, and ``inner_steps``
   learned-step-size gradient steps adapt the FiLM parameters). Without meta-training the
   network learns only the denoising samples (``prefix_prob=0``, ``meta="none"``). On MovieLens the tasks carry the gain and the gradient steps are neutral:
   the ablation without them ties the full model (it is printed so that this shows).
3. Example recommendations with explanations for one cold user.
4. A save / load round trip with bit-identical recommendations.
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from typing import Callable, Optional

import numpy as np
import pandas as pd
import torch

from .evaluation.baselines import EASE, Popularity, topk_from_scores
from .evaluation.metrics import ranking_metrics

logger = logging.getLogger("recmeta")

__all__ = ["run", "DEFAULT_CONFIG"]

#: The configuration the demo trains with: the library defaults, with the protocols'
#: definition of a positive (RecBole's implicit MovieLens-100K: every rating is one, so the
#: star-rating threshold the library would choose for the 1-5 ratings is set to 1).
DEFAULT_CONFIG: dict = {"positive_threshold": 1.0}

#: Extra settings of the warm (known-user) model: none. The library's defaults tune
#: themselves on a validation split carved from the training part (``config.validation``);
#: the demo used to pass settings chosen on its own split here.
WARM_CONFIG: dict = {}
#: EASE's ridge grid, chosen on the split's valid part (the peer is tuned, as quality.md asks)
EASE_GRID = (50.0, 100.0, 250.0, 500.0, 1000.0, 2000.0)

KS = (5, 10, 20)


def _fmt_row(name, vals, width=34):
    return f"  {name:<{width}s}" + "".join(f"{v:>10.4f}" for v in vals)


def _histories(df: pd.DataFrame, users, item_map):
    """Per user (in the given order): internal item indices, rewards, time-ordered."""
    df = df.sort_values(["user", "timestamp"], kind="stable")
    groups = {u: g for u, g in df.groupby("user", sort=False)}
    out = []
    for u in users:
        g = groups.get(u)
        if g is None:
            out.append((np.zeros(0, np.int64), np.zeros(0, np.float32)))
        else:
            out.append((item_map.to_index(g["item"].to_numpy()).astype(np.int64),
                        g["reward"].to_numpy(dtype=np.float32) if "reward" in g else np.ones(len(g), np.float32)))
    return out


def _warm(ds, cfg, out) -> dict:
    from . import data
    from .api import train

    parts = data.split(ds.interactions, "ratio", seed=2020)
    t0 = time.perf_counter()
    model = train(parts.train, users=ds.users, items=ds.items, config=dict(WARM_CONFIG, **cfg))
    secs = time.perf_counter() - t0
    ours = model.evaluate(parts.test, k=10, exclude=parts.valid)
    idx = model.item_map
    users = np.unique(parts.test["user"])
    tr = _histories(parts.train, users, idx)
    va = _histories(parts.valid, users, idx)
    te = _histories(parts.test, users, idx)
    truth = [set(t[0].tolist()) for t in te]
    excl = [np.concatenate([a[0], b[0]]) for a, b in zip(tr, va)]
    pop = Popularity(len(idx)).fit(idx.to_index(parts.train["item"].to_numpy()))
    pop_m = ranking_metrics(pop.recommend(len(users), 10, excl), truth, 10)
    all_tr = _histories(parts.train, model.user_ids, idx)
    uidx = np.repeat(np.arange(len(all_tr)), [len(h[0]) for h in all_tr])
    # EASE's ridge tuned on the valid part (train items excluded), then scored on the test part
    vusers = np.unique(parts.valid["user"])
    vtr = _histories(parts.train, vusers, idx)
    vtruth = [set(v[0][v[0] >= 0].tolist()) for v in _histories(parts.valid, vusers, idx)]
    vexcl = [h[0] for h in vtr]
    best_reg, best_v, ease = None, -1.0, None
    for reg in EASE_GRID:
        e = EASE(len(idx), reg=reg).fit(uidx, np.concatenate([h[0] for h in all_tr]), len(all_tr))
        v = ranking_metrics(topk_from_scores(e.scores([h[0] for h in vtr]), 10, vexcl), vtruth, 10)["ndcg@10"]
        if v > best_v:
            best_reg, best_v, ease = reg, v, e
    ease_m = ranking_metrics(topk_from_scores(ease.scores([h[0] for h in tr]), 10, excl), truth, 10)
    keys = ["recall@10", "ndcg@10", "mrr@10", "hit@10", "precision@10"]
    out("")
    out("(1) Warm top-10, RecBole's protocol: random 8:1:1 per user (seed 2020), full ranking, "
        "train+valid items excluded, test part")
    out(f"  {'model':<34s}" + "".join(f"{k.split('@')[0]:>10s}" for k in keys))
    out(_fmt_row("popularity", [pop_m[k] for k in keys]))
    out(_fmt_row(f"EASE (lambda={best_reg:g}, tuned)", [ease_m[k] for k in keys]))
    out(_fmt_row(f"recmeta (meta-trained, {secs:.0f}s)", [ours[k] for k in keys]))
    c = model.config
    out(f"  (recmeta with its defaults{' and ' + str(cfg) if cfg else ''}: tuned on {c.validation:g} of its training "
        f"users, EASE ridge {c.wide_reg:.3g}, best epoch {model.history.get('best_epoch', c.epochs)} of "
        f"{len(model.history.get('loss', []))}, temperature {c.temperature:.3g}; EASE's ridge chosen on the "
        f"valid part from {', '.join(f'{g:g}' for g in EASE_GRID)})")
    out(f"  recmeta beyond accuracy: coverage@10 {ours['coverage@10']:.3f}, "
        f"intra-list diversity@10 {ours['diversity@10']:.3f}, novelty@10 {ours['novelty@10']:.2f} bits")
    out("  (bars measured with RecBole 1.2.1's own split: EASE NDCG@10 0.3295, Recall@10 0.2805)")
    return {"model": model, "parts": parts, "ours": ours, "pop": pop_m, "ease": ease_m, "train_seconds": secs}


def _cold(ds, cfg, folds: int, out) -> dict:
    sums: dict[str, dict[int, list]] = {}
    example = None
    secs = []
    for fold in range(folds):
        part, ex, sec = _cold_fold(ds, cfg, fold)
        for name, per_k in part.items():
            for k, v in per_k.items():
                sums.setdefault(name, {}).setdefault(k, []).append(v)
        secs.append(sec)
        example = example if example is not None else ex
    return _cold_report(sums, folds, out, example, secs)


def _cold_fold(ds, cfg, fold: int):
    """One fold of the cold-start protocol: ({method: {k: (n_users, metrics)}}, example, seconds)."""
    from . import data
    from .api import train

    log = ds.interactions
    sums: dict[str, dict[int, tuple]] = {}
    splits = {k: data.split(log, "cold_users", fold=fold, n_folds=5, seed=2020, k=k, query_after=20) for k in KS}
    s20 = splits[20]
    t0 = time.perf_counter()
    meta = train(s20.train, users=ds.users, items=ds.items, config=dict(cfg, meta="fomaml"))
    secs = time.perf_counter() - t0
    # the same network without meta-training: no support/query tasks, no inner loop
    plain = train(s20.train, users=ds.users, items=ds.items, config=dict(cfg, meta="none", prefix_prob=0.0))
    # ablation: the meta-training tasks without the inner loop
    tasks_only = train(s20.train, users=ds.users, items=ds.items, config=dict(cfg, meta="none"))
    idx = meta.item_map
    held = [u for u in s20.held_out if (s20.query["user"] == u).any()]
    first20 = _histories(pd.concat([s20.support, s20.gap]), held, idx)
    query = _histories(s20.query, held, idx)
    truth = [set(q[0][q[0] >= 0].tolist()) for q in query]
    keep = [i for i, t in enumerate(truth) if t]
    held = [held[i] for i in keep]
    truth = [truth[i] for i in keep]
    first20 = [first20[i] for i in keep]
    excl = [f[0][f[0] >= 0] for f in first20]
    pop = Popularity(len(idx)).fit(idx.to_index(s20.train["item"].to_numpy()))
    tr = _histories(s20.train, meta.user_ids, idx)
    uidx = np.repeat(np.arange(len(tr)), [len(h[0]) for h in tr])
    ease = EASE(len(idx), reg=250.0).fit(uidx, np.concatenate([h[0] for h in tr]), len(tr))
    feats = [ds.users.loc[u].to_dict() if ds.users is not None and u in ds.users.index else None for u in held]
    for k in KS:
        sup = _histories(splits[k].support, held, idx)
        sup_items = [meta.item_ids[s[0][s[0] >= 0]] for s in sup]
        sup_rew = [s[1][s[0] >= 0] for s in sup]
        methods = {
            "recmeta, meta-adapted": lambda: meta._topk_many(sup_items, sup_rew, feats, None, 10, excl),
            "same model, no adaptation": lambda: meta._topk_many(sup_items, sup_rew, feats, 0, 10, excl),
            "no meta-training, fine-tuned": lambda: plain._topk_many(sup_items, sup_rew, feats, None, 10, excl),
            "ablation: tasks, no inner loop": lambda: tasks_only._topk_many(sup_items, sup_rew, feats, None, 10,
                                                                            excl),
            "popularity": lambda: pop.recommend(len(held), 10, excl),
            "EASE fold-in": lambda: topk_from_scores(ease.scores([s[0][s[0] >= 0] for s in sup]), 10, excl),
        }
        for name, fn in methods.items():
            m = ranking_metrics(fn(), truth, 10)
            sums.setdefault(name, {})[k] = (len(held), m)
    u = held[0]
    sup = splits[5].support
    sup = sup[sup["user"] == u].sort_values("timestamp", kind="stable")
    example = {"model": meta, "user": u, "support": sup, "query": truth[0], "exclude": excl[0],
               "features": feats[0]}
    return sums, example, secs


def _cold_report(sums, folds: int, out, example=None, secs=()) -> dict:
    """Print the cold-start table from per-fold results ({method: {k: [(n_users, metrics)]}})."""
    # average over users (weighted by the number of held-out users of each fold)
    table = {}
    for name, per_k in sums.items():
        table[name] = {}
        for k, lst in per_k.items():
            n = sum(c for c, _ in lst)
            table[name][k] = {key: sum(c * m[key] for c, m in lst) / n for key in lst[0][1]}
    n_users = sum(c for c, _ in sums["popularity"][5])
    out("")
    scope = ("all 5 folds (the full protocol)" if folds == 5 else
             f"{folds} of the 5 folds ({n_users} of 943 users; run `recmeta demo --folds 5` for the full protocol)")
    out(f"(2) Cold start: new users with k support interactions, 5-fold new-user protocol (seed 2020), {scope}; "
        "query = interactions after the first 20, first 20 excluded, full ranking, @10")
    out(f"  {'method':<34s}" + "".join(f"{'k=' + str(k) + ' Rec':>10s}{'NDCG':>10s}" for k in KS))
    for name in table:
        vals = []
        for k in KS:
            vals += [table[name][k]["recall@10"], table[name][k]["ndcg@10"]]
        out(_fmt_row(name, vals))
    folds_tab = {name: {k: [m for _, m in lst] for k, lst in per_k.items()} for name, per_k in sums.items()}
    if folds > 1:
        out(f"  standard error over the {folds} folds (of each fold's mean):")
        for name in table:
            vals = []
            for k in KS:
                for key in ("recall@10", "ndcg@10"):
                    x = np.array([m[key] for m in folds_tab[name][k]])
                    vals.append(float(x.std(ddof=1) / np.sqrt(len(x))))
            out(_fmt_row("  +- " + name, vals))
    for f in range(folds):
        out(f"  fold {f} ({sums['popularity'][5][f][0]} users): " + "; ".join(
            f"{name.split(',')[0]} " + " ".join(f"{folds_tab[name][k][f]['recall@10']:.4f}/{folds_tab[name][k][f]['ndcg@10']:.4f}"
                                                for k in KS) for name in table))
    out("  (anchors measured on all 5 folds with the peers' code: EASE fold-in Recall@10 0.0611 / 0.0658 / 0.0850, "
        "popularity NDCG@10 0.3464)")
    return {"table": table, "folds": folds_tab, "example": example, "train_seconds": list(secs), "n_users": n_users}


def _example(ds, ex, out) -> None:
    model = ex["model"]
    titles = ds.items["title"] if ds.items is not None and "title" in ds.items else None

    def name(i):
        return f"{titles.get(i, i)} [{i}]" if titles is not None else str(i)
    sup = ex["support"]
    out("")
    out(f"(3) A cold user ({ex['user']}) after 5 interactions:")
    for item, reward in zip(sup["item"].tolist(), sup["reward"].tolist()):
        out(f"      saw {name(item)} (rating {reward:g})")
    state = model.adapt(sup[["item", "reward", "timestamp"]], features=ex["features"])
    exclude = model.item_ids[ex["exclude"]]
    recs = model.recommend(state, k=5, exclude=exclude, explain=True)
    for item, score, e in zip(recs.ids, recs.scores, recs.explanations):
        hit = "  <- in the user's later history" if model.item_map.position(item) in ex["query"] else ""
        because = ", ".join(f"{name(h)} ({c:+.2f})" for h, c in e["history"][:2])
        feats = ", ".join(f"{n} ({c:+.2f})" for n, c in e["features"][:2])
        out(f"    {name(item)}: score {score:.2f}{hit}")
        out(f"        because of: {because}; features: {feats}; popularity bias {e['bias']:+.2f}")


def _roundtrip(model, out) -> bool:
    from .api import load

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "model.recmeta")
        model.save(path)
        size = os.path.getsize(path)
        loaded = load(path)
        users = list(model.user_ids[:100])
        a, b = model.recommend(users, k=10), loaded.recommend(users, k=10)
        sa = model.adapt(list(model.item_ids[:5]))
        sb = loaded.adapt(list(model.item_ids[:5]))
        same = (np.array_equal(a.ids, b.ids) and a.scores.tobytes() == b.scores.tobytes()
                and sa.vector.tobytes() == sb.vector.tobytes())
    out("")
    out(f"(4) Save / load round trip ({size / 1e6:.1f} MB safetensors + JSON, SHA-256 checked): "
        f"recommendations for 100 users and a cold state {'bit-identical' if same else 'DIFFERENT'}")
    return same


def run(*, folds: int = 1, epochs: Optional[int] = None, config: Optional[dict] = None,
        out: Callable[[str], None] = print) -> dict:
    """Run the demo; returns the numbers it printed."""
    from . import datasets

    if not isinstance(folds, int) or not 1 <= folds <= 5:
        raise ValueError(f"folds must be an int in [1, 5], got {folds!r}")
    cfg = dict(DEFAULT_CONFIG, **(config or {}))
    if epochs is not None:
        cfg["epochs"] = int(epochs)
    t0 = time.perf_counter()
    ds = datasets.load("ml-100k")
    out(f"recmeta demo on MovieLens-100K: {len(ds.interactions):,} ratings, {ds.interactions['user'].nunique()} users, "
        f"{ds.interactions['item'].nunique():,} items (torch threads: {torch.get_num_threads()})")
    warm = _warm(ds, cfg, out)
    cold = _cold(ds, cfg, folds, out)
    _example(ds, cold["example"], out)
    same = _roundtrip(warm["model"], out)
    total = time.perf_counter() - t0
    out("")
    out(f"total {total:.0f}s (meta-training the warm model: {warm['train_seconds']:.0f}s)")
    return {"warm": {k: warm[k] for k in ("ours", "pop", "ease", "train_seconds")},
            "cold": cold["table"], "cold_folds": cold["folds"], "roundtrip_identical": same, "seconds": total}
