"""Off-policy learning on the Open Bandit Dataset sample, evaluated off-policy.

For each campaign (all / men / women) the uniform-random logs are split in time: the first
70 % train, the last 30 % are held out. Policies:

``recmeta per-campaign``
    ``recmeta_sdk.train`` on the campaign's training rows (reward = click, the logged
    ``propensity`` as the behaviour probability beta of the off-policy REINFORCE term,
    no supervised cross-entropy: impressions of a random policy are not preferences),
    user and item side features.
``recmeta meta (other two) + adapt``
    trained the same way on the *other two* campaigns' training rows (items of all three
    campaigns are in the catalogue through their side features, ids prefixed by campaign),
    then adapted to the target campaign from its first ``--adapt-rows`` impressions: the
    users' states read them (``adapt``), and ``train(..., resume=model)`` takes an
    off-policy step on them when they hold a user with two clicks (else that is reported).
``recmeta meta (other two), zero-shot``
    the cross-campaign model without the target's impressions.
``recmeta tasks=campaign (other two) + adapt_task on N``
    meta-learned ACROSS the two campaigns (``train(..., tasks="campaign")``: each meta-batch
    draws both campaigns and users in each; one adaptation phi per campaign is adapted on
    some users' impressions and must serve the others; see ``recmeta_sdk.training.meta_tasks``),
    epochs chosen the same way (served without per-user steps), then ``adapt_task`` on the target's first
    ``--adapt-rows`` impressions and every user served with ``task=`` (no adaptation:
    the row ``..., no task``, with the model's initial phi; neither row takes per-user steps,
    as in training across tasks). Only clicks carry support weight, so a few hundred
    impressions (about one click) give the task's phi little to learn from.

Each policy is the softmax policy over the campaign's items (the same distribution at each
of the three positions), given the user's state. Its value (click rate per impression) is
estimated on the held-out random logs with IPS, SNIPS and DR (reward model: smoothed
per-(item, position) click rate, 3-fold cross-fitted) with percentile bootstrap 95 % CIs,
next to the on-policy click rates of the random policy (same held-out rows) and of
Bernoulli TS (its own logs, all rows) with bootstrap CIs. The sample is small (about 40
clicks per 10,000 impressions; about 12 in a held-out part), so the intervals are wide.

    PYTHONPATH=. .venv/bin/python bench/bench_obd_learning.py [--epoch-grid 1,3,10] [--seed 0]
"""
from __future__ import annotations

import argparse
import logging
import time

import numpy as np
import pandas as pd
import torch

import recmeta_sdk as rm
from recmeta_sdk import datasets, online
from recmeta_sdk.evaluation import ope

CAMPAIGNS = ("all", "men", "women")
BASE_CONFIG = {"dim": 32, "hidden": 64, "encoder": "none", "seq_len": 10, "batch_size": 32, "lr": 5e-3,
               "ce_weight": 0.0, "rl_weight": 1.0, "topk_k": 3, "is_cap": 20.0, "input_dropout": 0.3,
               "dropout": 0.1, "inner_steps": 1, "meta": "fomaml"}


def load(campaign: str, policy: str, prefix: bool = False):
    ds = datasets.load("obd", campaign=campaign, policy=policy)
    df = ds.interactions.sort_values("timestamp", kind="stable").reset_index(drop=True)
    items = ds.items.copy()
    if prefix:
        df = df.assign(item=[f"{campaign}:{i}" for i in df["item"]])
        items.index = pd.Index([f"{campaign}:{i}" for i in items.index], name="item")
    return df, ds.users, items


def split(df: pd.DataFrame, frac: float = 0.7):
    cut = int(round(frac * len(df)))
    return df.iloc[:cut].reset_index(drop=True), df.iloc[cut:].reset_index(drop=True)


def train_frame(df: pd.DataFrame) -> pd.DataFrame:
    return df[["user", "item", "timestamp", "reward", "propensity"]]


def policy_dist(model, rows: pd.DataFrame, users: pd.DataFrame, cand_ids, store=None, task=None, steps=None):
    """(n, A) softmax policy over ``cand_ids`` for every row, from each row's user state.

    A user with feedback in ``store`` (a ``recmeta_sdk.online.OnlineStore``) gets its
    online state; else a user known to the model its training state; else the cold state
    from its side features.
    """
    cand_ids = list(cand_ids)
    uniq = pd.unique(rows["user"])
    states = []
    for u in uniq:
        cur = store.current(u) if store is not None else None
        if cur is not None:
            states.append(cur.state)
        elif model.user_map.position(u) >= 0:
            states.append(model.user_state(u, task=task, steps=steps))
        else:
            states.append(model.adapt([], features=users.loc[u].to_dict() if u in users.index else None, task=task,
                                      steps=steps))
    recs = model.recommend(states, len(cand_ids), candidates=cand_ids, exclude_seen=False)
    sc = recs.scores.astype(np.float64)
    p = np.exp(sc - sc.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    col = pd.Index(cand_ids)
    dist_u = np.zeros((len(uniq), len(cand_ids)))
    for b in range(len(uniq)):
        dist_u[b, col.get_indexer(recs.ids[b])] = p[b]
    row_u = pd.Index(uniq).get_indexer(rows["user"])
    return dist_u[row_u]


def estimate(rows: pd.DataFrame, dist: np.ndarray, cand_ids, *, n_bootstrap: int, seed: int) -> dict:
    a = pd.Index(list(cand_ids)).get_indexer(rows["item"])
    pos = rows["position"].to_numpy(np.int64) - 1
    r = rows["reward"].to_numpy(np.float64)
    ps = rows["propensity"].to_numpy(np.float64)
    n, A = dist.shape
    L = int(pos.max()) + 1
    action_prob = dist[np.arange(n), a]
    q_full = ope.ClickRateModel(A, L, prior_strength=10.0).fit_predict(a, pos, r, n_folds=3, random_state=seed)
    q_hat = ope.logged_reward(q_full, a, pos)
    v_hat = ope.expected_reward(q_full, np.repeat(dist[:, :, None], L, axis=2), pos)
    kw = dict(positions=pos, n_bootstrap=n_bootstrap, random_state=seed)
    return {"ips": ope.ips(r, ps, action_prob, **kw), "snips": ope.snips(r, ps, action_prob, **kw),
            "dr": ope.dr(r, ps, action_prob, q_hat, v_hat, **kw)}


def choose_epochs(parts, cfg, args, label, tasks="user", steps=None) -> int:
    """The epochs (of ``--epoch-grid``) with the highest pooled IPS on inner validation splits.

    ``parts``: (training rows, users, items, candidate ids) per campaign; each is split
    70/30 in time, trained on the first part and evaluated on the second. ``tasks``: as in
    ``recmeta_sdk.train`` (a group kind keeps its column); ``steps``: per-user steps when serving.
    """
    best, best_v = None, -np.inf
    frames = [(split(tr), u, it, cand) for tr, u, it, cand in parts]
    inner = pd.concat([f[0][0] for f in frames], ignore_index=True)
    users, items = parts[0][1], parts[0][2]
    vals = {}
    for ep in args.epoch_grid:
        frame = train_frame(inner) if tasks == "user" else inner[[*train_frame(inner).columns, "campaign"]]
        m = rm.train(frame, users=users, items=items, config={**cfg, "epochs": ep}, tasks=tasks, progress=False)
        num = den = 0.0
        for (itr, iva), _, _, cand in frames:
            e = estimate(iva, policy_dist(m, iva, users, cand, steps=steps), cand, n_bootstrap=1,
                         seed=args.seed)["ips"]
            num += e.value * len(iva)
            den += len(iva)
        vals[ep] = num / den
        if vals[ep] > best_v:
            best, best_v = ep, vals[ep]
    print(f"  epochs for {label} (inner-validation IPS): " + ", ".join(f"{k}: {v:.3%}" for k, v in vals.items())
          + f" -> {best}")
    return best


def fmt(e) -> str:
    return f"{e.value:.3%} ({e.ci_low:.3%}, {e.ci_high:.3%})"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epoch-grid", default="1,3,10",
                    help="epochs to choose from by IPS on an inner split of the training rows")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-bootstrap", type=int, default=1000)
    ap.add_argument("--adapt-rows", type=int, default=300)
    ap.add_argument("--campaigns", default="all,men,women")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    args.epoch_grid = [int(x) for x in args.epoch_grid.split(",")]
    cfg = {**BASE_CONFIG, "seed": args.seed}
    t00 = time.perf_counter()
    data = {c: load(c, "random", prefix=True) for c in CAMPAIGNS}
    for c in args.campaigns.split(","):
        df, users, items = load(c, "random")
        tr, te = split(df)
        cand = list(items.index)
        print(f"\n== campaign {c}: {len(items)} items; train {len(tr)} impressions ({int(tr['reward'].sum())} clicks), "
              f"held-out {len(te)} ({int(te['reward'].sum())} clicks)")
        bts, _, _ = load(c, "bts")
        kw = dict(n_bootstrap=args.n_bootstrap, random_state=args.seed)
        r_te = te["reward"].to_numpy(np.float64)
        rnd = ope.ips(r_te, te["propensity"].to_numpy(), te["propensity"].to_numpy(), **kw)
        b = bts["reward"].to_numpy(np.float64)
        bt = ope.ips(b, bts["propensity"].to_numpy(), bts["propensity"].to_numpy(), **kw)
        print(f"  {'random (on-policy, held-out rows)':<44} {fmt(rnd)}")
        print(f"  {'Bernoulli TS (on-policy, its own logs)':<44} {fmt(bt)}")
        rows = {}
        # per campaign; epochs chosen by IPS on an inner split of the training rows
        t0 = time.perf_counter()
        ep = choose_epochs([(tr, users, items, cand)], cfg, args, f"{c} per-campaign")
        m = rm.train(train_frame(tr), users=users, items=items, config={**cfg, "epochs": ep}, progress=False)
        rows["recmeta per-campaign"] = (estimate(te, policy_dist(m, te, users, cand), cand, **_ekw(args)),
                                        time.perf_counter() - t0)
        # meta-learned across the other two campaigns
        t0 = time.perf_counter()
        others = [o for o in CAMPAIGNS if o != c]
        pdf = pd.concat([split(data[o][0])[0] for o in others], ignore_index=True)
        pusers = pd.concat([data[o][1] for o in CAMPAIGNS])
        pusers = pusers[~pusers.index.duplicated()]
        pitems = pd.concat([data[o][2] for o in CAMPAIGNS])
        ep = choose_epochs([(split(data[o][0])[0], pusers, pitems, list(data[o][2].index))
                            for o in others], cfg, args, f"{c} meta (on {'+'.join(others)})")
        mm = rm.train(train_frame(pdf), users=pusers, items=pitems, config={**cfg, "epochs": ep}, progress=False)
        tdf, _, _ = data[c]
        ttr, tte = split(tdf)
        pcand = [f"{c}:{i}" for i in cand]
        rows["recmeta meta (other two), zero-shot"] = (
            estimate(te, policy_dist(mm, tte, users, pcand), cand, **_ekw(args)), time.perf_counter() - t0)
        few = ttr.iloc[-args.adapt_rows:]  # the impressions just before the held-out period
        t0 = time.perf_counter()
        clicks = few[few["reward"] > 0].groupby("user").size()
        note = ""
        adapted = mm
        events = few[["user", "item", "reward", "propensity", "position"]].assign(
            timestamp=np.arange(len(few), dtype=float))
        if len(clicks) and clicks.max() >= 2:
            adapted = rm.train(events, resume=mm, config={"epochs": ep}, progress=False)
        else:
            note = (f" (resume skipped: {int(few['reward'].sum())} click(s) in {len(few)} impressions, "
                    f"no user with two; only the users' states adapt, by Recommender.feedback)")
        store = online.OnlineStore(adapted)
        store.feedback(events)  # each impression updates its user's state (misses: exclusion only)
        rows[f"recmeta meta (other two) + adapt on {len(few)}"] = (
            estimate(te, policy_dist(adapted, tte, users, pcand, store=store), cand, **_ekw(args)),
            time.perf_counter() - t0)
        # meta-learned across the other two campaigns as tasks, adapted to this one by adapt_task
        t0 = time.perf_counter()
        ep_t = choose_epochs([(split(data[o][0])[0], pusers, pitems, list(data[o][2].index)) for o in others],
                             cfg, args, f"{c} tasks=campaign (on {'+'.join(others)})", tasks="campaign", steps=0)
        mt = rm.train(pdf[["user", "item", "timestamp", "reward", "propensity", "campaign"]], users=pusers,
                      items=pitems, config={**cfg, "epochs": ep_t}, tasks="campaign", progress=False)
        rows["recmeta tasks=campaign (other two), no task"] = (  # as with a task: no per-user steps
            estimate(te, policy_dist(mt, tte, users, pcand, steps=0), cand, **_ekw(args)), time.perf_counter() - t0)
        ts = mt.adapt_task(few[["user", "item", "reward", "timestamp"]])
        rows[f"recmeta tasks=campaign + adapt_task on {len(few)}"] = (
            estimate(te, policy_dist(mt, tte, users, pcand, task=ts), cand, **_ekw(args)), time.perf_counter() - t0)
        print(f"  {'policy':<48} {'IPS (95% CI)':<27} {'SNIPS (95% CI)':<27} {'DR (95% CI)':<27}")
        for name, (est, secs) in rows.items():
            print(f"  {name:<48} {fmt(est['ips']):<27} {fmt(est['snips']):<27} {fmt(est['dr']):<27} "
                  f"[{secs:.0f} s]")
        if note:
            print("  " + note.strip())
        for name, (est, _) in rows.items():
            lo = est["dr"].ci_low
            verdict = ("above" if lo > bt.ci_high else "overlaps" if est["dr"].ci_high >= bt.ci_low else "below")
            print(f"  {name}: DR interval {verdict} Bernoulli TS's interval; "
                  f"{'above' if lo > rnd.ci_high else 'overlaps' if est['dr'].ci_high >= rnd.ci_low else 'below'}"
                  f" random's")
    print(f"\n({time.perf_counter() - t00:.0f} s)")


def _ekw(args) -> dict:
    return {"n_bootstrap": args.n_bootstrap, "seed": args.seed}


if __name__ == "__main__":
    main()
