"""Long-horizon bench: the return of new users served until they leave, over many seeds.

The environment is ``recmeta_sdk.evaluation.sim.LongSessionSimulator`` (:data:`CONFIG`): items in
clusters with a latent appeal and a latent quality (negatively correlated: the most
clickable items are the worst), users with drifting interests and satiation with repeated
clusters / items, and a time budget that a click returns in proportion to the clicked
item's quality while every step costs one unit: the user leaves when it runs out. Each seed
draws a new world (items, users) and its own uniform-random logs of the existing users
(``log_sessions``, one full run per user until they leave); every policy serves the same
new users with the same per-user randomness (``run_sessions``), so differences are paired.

Policies (``recmeta_sdk.evaluation.bandits``), fitted on the existing users' logs only:

- random;
- popularity: the items' click rate in the logs (Laplace-smoothed);
- LinUCB on ``[item features, logit log-CTR, 1]`` starting from the popularity ranking,
  ``alpha`` tuned by ``run_sessions`` on existing users (never the new users);
- greedy ridge: the same model with ``alpha = 0``;
- the SDK's default online loop: ``recmeta_sdk.train`` on the logs (every shown item, reward
  = click; the item embeddings as a dense side feature ``items_frame()``), library defaults
  except ``epochs`` and ``seed``, served through ``bandits.RecommenderPolicy`` (``adapt([])``
  for a new user, ``recommend``, ``feedback`` per shown item; repeats allowed as in the env);
- the myopic oracle (true model, highest expected immediate reward) and the planning oracle
  (true model, value over the remaining session budget);
- the world model's uses (issue 15 item 2; ``--no-world`` skips them): a
  ``recmeta_sdk.model.WorldModel`` fitted on the same logs serves through
  ``recmeta_sdk.online.planning.Planner`` with each switch: myopic without in-session
  adaptation (the state stays at the prior), myopic with in-session adaptation (the world
  state steps per slate plus the in-session evidence, whose strength is tuned on existing
  users like LinUCB's alpha), and planning (lookahead rollouts in the model) with
  adaptation; and myopic with the world state's own update alone (no evidence);
- with ``--dyna``: the SDK's default online loop trained on the logs plus world-model
  rollouts (``recmeta_sdk.training.dyna.model_rollouts``, an ensemble of 3 world models whose
  disagreement truncates the rollouts), beside the same loop without them.

Also printed: how much the slate moves from one step to the next (the share of its items
replaced) after a step with a click and after one without, per policy.

Prints per policy the mean return (± s.e. over seeds of the per-seed means, and over all
users pooled), steps per user, and the paired difference and ratio against the best
non-oracle baseline (chosen after the fact among random / popularity / LinUCB / ridge, which
favours the baseline), and planning vs myopic oracle.

    PYTHONPATH=. .venv/bin/python bench/bench_long_horizon.py --quick        # < 2 min on 2 cores
    PYTHONPATH=. .venv/bin/python bench/bench_long_horizon.py --seeds 10 --users 60
    PYTHONPATH=. .venv/bin/python bench/bench_long_horizon.py --seeds 5 --users 40 --no-sdk   # world-model rows
"""
from __future__ import annotations

import argparse
import logging
import time
import warnings

import numpy as np

from recmeta_sdk.evaluation import bandits
from recmeta_sdk.evaluation import sim

CONFIG = sim.LongSimConfig(n_items=200, dim=8, n_clusters=10, n_train_users=200, n_test_users=100,
                           slate_size=3, max_steps=100, max_sessions=1)
ALPHAS = (0.1, 0.3, 1.0, 3.0, 10.0)
EVIDENCE = (1.0, 3.0, 5.0)   # in-session evidence strengths tried on existing users (the Planner's evidence=)
PLANNER = {"bandwidth": 0.05, "evidence_decay": 0.9}
PLANNING = {"horizon": 8, "n_rollouts": 4}
WM_ROWS = ("WM myopic, no in-session adaptation", "WM myopic + in-session adaptation",
           "WM planning + in-session adaptation", "WM myopic + world-state update only")
SDK_ROW = "SDK (train + adapt/recommend/feedback)"
DYNA_ROW = "SDK + Dyna (world-model rollouts)"


class SlateMoves:
    """Wraps a policy; records how many slate items change after steps with / without clicks."""

    def __init__(self, policy, k: int):
        self.policy, self.k = policy, k
        self._last: dict = {}
        self._clicked: dict = {}
        self.moved = {True: [], False: []}

    def recommend(self, ctx, k, exclude):
        slate = self.policy.recommend(ctx, k, exclude)
        u = ctx.user
        if u in self._last and ctx.t > 0:
            prev = set(self._last[u].tolist())
            self.moved[self._clicked[u]].append(len(set(np.asarray(slate).tolist()) - prev) / k)
        self._last[u] = np.asarray(slate).copy()
        self._clicked[u] = False
        return slate

    def feedback(self, user, item, reward):
        if reward > 0:
            self._clicked[user] = True
        self.policy.feedback(user, item, reward)


def _moves(env, fac, seed, name):
    box = {}

    def wrapped(e):
        box["w"] = SlateMoves(fac(e), env.slate_size)
        return box["w"]

    res = sim.run_sessions(env, wrapped, seed=seed, name=name)
    m = box["w"].moved
    return res, (float(np.mean(m[True])) if m[True] else float("nan"),
                 float(np.mean(m[False])) if m[False] else float("nan"))


def tune_evidence(env, wm, seed: int, n_users: int) -> tuple:
    """The Planner's in-session evidence strength with the highest mean return on existing users
    (myopic serving, so the tuning is cheap; never the new users)."""
    from recmeta_sdk.online.planning import Planner

    users = env.train_users[:n_users]
    scores = {}
    for ev in EVIDENCE:
        r = sim.run_sessions(env, lambda e, ev=ev: Planner(wm, plan=False, evidence=ev, **PLANNER),
                             users=users, seed=20_000 + seed)
        scores[ev] = r.mean()
    return max(scores, key=scores.get), scores
BASELINES = ("random", "popularity", "LinUCB", "greedy ridge (alpha 0)")
ORACLES = ("myopic oracle", "planning oracle")


def log_features(env, logs):
    """Popularity (smoothed log CTR) and LinUCB features from the logs, with a prior that starts
    from the popularity ranking."""
    shows = np.bincount(logs["item"], minlength=env.n_items)
    clicks = np.bincount(logs["item"], weights=(logs["reward"] > 0).astype(float), minlength=env.n_items)
    ctr = (clicks + 1.0) / (shows + 2.0)
    feats = np.hstack([env.item_features, np.log(ctr / (1 - ctr))[:, None], np.ones((env.n_items, 1))])
    prior = np.zeros(feats.shape[1])
    prior[-2] = 1.0
    return ctr, feats, prior


def tune_alpha(env, feats, prior, seed: int, n_users: int) -> tuple:
    """LinUCB's alpha with the highest mean return on existing users (not the new users)."""
    users = env.train_users[:n_users]
    scores = {}
    for a in ALPHAS:
        r = sim.run_sessions(env, lambda e, a=a: bandits.LinUCB(feats, alpha=a, lam=1.0, theta0=prior),
                             users=users, seed=10_000 + seed)
        scores[a] = r.mean()
    best = max(scores, key=scores.get)
    return best, scores


def run_seed(seed: int, n_users: int, epochs: int, sdk: bool, n_tune: int, world: bool = True,
             dyna: bool = False, evidence_grid: list | None = None) -> dict:
    env = sim.LongSessionSimulator(CONFIG, seed=seed, n_test_users=n_users)
    t0 = time.perf_counter()
    logs = env.log_sessions(seed=seed)
    ctr, feats, prior = log_features(env, logs)
    alpha, tuned = tune_alpha(env, feats, prior, seed, n_tune)
    facs = {
        "random": lambda e: bandits.RandomPolicy(e.n_items, seed=seed),
        "popularity": lambda e: bandits.PopularityPolicy(ctr),
        "LinUCB": lambda e: bandits.LinUCB(feats, alpha=alpha, lam=1.0, theta0=prior),
        "greedy ridge (alpha 0)": lambda e: bandits.LinUCB(feats, alpha=0.0, lam=1.0, theta0=prior),
        "myopic oracle": bandits.MyopicOracle,
        "planning oracle": bandits.PlanningOracle,
    }
    out = {}
    moves = {}
    for nm, fac in facs.items():
        out[nm], moves[nm] = _moves(env, fac, seed, nm)
    info = {"alpha": alpha, "tuned": tuned, "log_rows": len(logs), "log_ctr": float((logs["reward"] > 0).mean()),
            "moves": moves}
    if world or dyna:
        from recmeta_sdk.model import WorldModel
        from recmeta_sdk.online.planning import Planner

        t1 = time.perf_counter()
        wm = WorldModel.fit(logs, item_features=env.items_frame(), seed=seed)
        info["wm_fit_s"] = time.perf_counter() - t1
    if world:
        ev, ev_scores = tune_evidence(env, wm, seed, n_tune)
        info["evidence"], info["evidence_tuned"] = ev, ev_scores
        wfacs = {
            WM_ROWS[0]: lambda e: Planner(wm, plan=False, adapt=False),
            WM_ROWS[1]: lambda e: Planner(wm, plan=False, evidence=ev, **PLANNER),
            WM_ROWS[2]: lambda e: Planner(wm, plan=True, evidence=ev, seed=seed, **PLANNER, **PLANNING),
            WM_ROWS[3]: lambda e: Planner(wm, plan=False),   # the GRU state steps, no in-session evidence
        }
        for nm, fac in wfacs.items():
            out[nm], moves[nm] = _moves(env, fac, seed, nm)
        steps = int(out[WM_ROWS[2]].steps.sum())
        info["plan_ms_per_step"] = 1e3 * out[WM_ROWS[2]].seconds / max(steps, 1)
    if sdk:
        from recmeta_sdk import api

        t1 = time.perf_counter()
        with warnings.catch_warnings():
            # a random logger shows a user some items twice: kept as repeats (what was served)
            warnings.filterwarnings("ignore", message=".*duplicate \\(user, item\\) rows.*")
            model = api.train(logs, items=env.items_frame(), progress=False,
                              config={"epochs": epochs, "seed": seed})
        info["sdk_train_s"] = time.perf_counter() - t1
        ids = np.arange(env.n_items)
        out[SDK_ROW], moves[SDK_ROW] = _moves(
            env, lambda e: bandits.RecommenderPolicy(model, item_ids=ids, exclude_seen=not e.allow_repeats),
            seed, "SDK")
        ev = int(out[SDK_ROW].steps.sum()) * env.slate_size
        info["sdk_ms_per_event"] = 1e3 * out[SDK_ROW].seconds / max(ev, 1)
        for setting in evidence_grid or ():
            # the same trained model with other in-session evidence settings (the validation
            # run that chose the library defaults: on seeds that are not reported)
            import copy
            from dataclasses import replace

            ev_w, bw, dec = setting
            m = copy.copy(model)
            m.config = replace(model.config, feedback_evidence=float(ev_w), feedback_bandwidth=float(bw),
                               feedback_evidence_decay=float(dec))
            m.default_online_store = None
            nm = f"SDK evidence={ev_w:g} bandwidth={bw:g} decay={dec:g}"
            out[nm], moves[nm] = _moves(
                env, lambda e, m=m: bandits.RecommenderPolicy(m, item_ids=ids, exclude_seen=not e.allow_repeats),
                seed, nm)
        if dyna:
            import pandas as pd

            from recmeta_sdk.training.dyna import model_rollouts

            ens = [wm] + [WorldModel.fit(logs, item_features=env.items_frame(), seed=1000 * (m + 1) + seed)
                          for m in range(2)]
            fake = model_rollouts(ens, n_users=env.config.n_train_users, horizon=env.max_steps,
                                  max_disagreement=0.1, seed=seed,
                                  first_user=int(max(logs["user"].max(), env.users.max())) + 1)
            info["dyna_rows"], info["dyna_truncated"] = len(fake), fake.attrs["truncated"]
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*duplicate \\(user, item\\) rows.*")
                dmodel = api.train(pd.concat([logs, fake], ignore_index=True), items=env.items_frame(),
                                   progress=False, config={"epochs": epochs, "seed": seed})
            out[DYNA_ROW], moves[DYNA_ROW] = _moves(
                env, lambda e: bandits.RecommenderPolicy(dmodel, item_ids=ids, exclude_seen=not e.allow_repeats),
                seed, "SDK + Dyna")
    info["seconds"] = time.perf_counter() - t0
    return {"results": out, "info": info}


def _paired(runs, a: str, b: str) -> tuple:
    """Mean paired difference a - b: (mean, se over seeds, se over pooled users, ratio of means)."""
    per_seed = np.array([r["results"][a].reward.mean() - r["results"][b].reward.mean() for r in runs])
    d = np.concatenate([r["results"][a].reward - r["results"][b].reward for r in runs])
    ma = np.mean([r["results"][a].reward.mean() for r in runs])
    mb = np.mean([r["results"][b].reward.mean() for r in runs])
    se_seed = per_seed.std(ddof=1) / np.sqrt(len(runs)) if len(runs) > 1 else float("nan")
    return float(per_seed.mean()), float(se_seed), float(d.std(ddof=1) / np.sqrt(d.shape[0])), float(ma / mb)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=10, help="number of seeds (worlds): first..first+seeds-1")
    ap.add_argument("--first-seed", type=int, default=0, help="the first seed (default 0)")
    ap.add_argument("--evidence-grid", default="",
                    help="JSON list of [feedback_evidence, feedback_bandwidth, feedback_evidence_decay]: "
                         "extra SDK rows with those online settings (the validation run of the defaults "
                         "used --first-seed 100 --seeds 4; report on other seeds)")
    ap.add_argument("--users", type=int, default=100, help="new users served per seed")
    ap.add_argument("--tune-users", type=int, default=100, help="existing users LinUCB's alpha is tuned on")
    ap.add_argument("--sdk-epochs", type=int, default=30, help="recmeta_sdk.train epochs (library default 30)")
    ap.add_argument("--no-sdk", action="store_true", help="skip the SDK row")
    ap.add_argument("--no-world", action="store_true", help="skip the world-model (Planner) rows")
    ap.add_argument("--dyna", action="store_true", help="add the SDK + Dyna row (needs the SDK row)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--quick", action="store_true", help="2 seeds x 15 users, 2 SDK epochs (< 2 min on 2 cores)")
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.users, args.tune_users, args.sdk_epochs = 2, 15, 30, 2
    logging.basicConfig(level=logging.WARNING)
    import torch

    torch.set_num_threads(args.threads)
    c = CONFIG
    print(f"== long-horizon sessions: {args.seeds} seeds x {args.users} new users; {c.n_items} items in "
          f"{c.n_clusters} clusters, slates of {c.slate_size}, budget {c.initial_budget} (step cost "
          f"{c.step_cost}, click returns {c.budget_return} x watch), max {c.max_steps} steps; "
          f"quality-appeal corr {c.quality_appeal_corr}; logs: uniform random over {c.n_train_users} "
          f"existing users per seed")
    t0 = time.perf_counter()
    runs = []
    import json

    grid = json.loads(args.evidence_grid) if args.evidence_grid else None
    for s in range(args.first_seed, args.first_seed + args.seeds):
        r = run_seed(s, args.users, args.sdk_epochs, not args.no_sdk, args.tune_users, not args.no_world,
                     args.dyna and not args.no_sdk, grid)
        info = r["info"]
        extra = (f", SDK trained in {info['sdk_train_s']:.0f} s, {info['sdk_ms_per_event']:.1f} ms per served item"
                 if "sdk_train_s" in info else "")
        if "evidence" in info:
            extra += (f", world model fitted in {info['wm_fit_s']:.0f} s, evidence {info['evidence']} (existing "
                      "users: " + ", ".join(f"{a}: {v:.1f}" for a, v in info["evidence_tuned"].items())
                      + f"), planning {info['plan_ms_per_step']:.0f} ms per step")
        if "dyna_rows" in info:
            extra += f", Dyna rows {info['dyna_rows']} ({info['dyna_truncated']} rollouts truncated)"
        print(f"  seed {s}: logs {info['log_rows']} rows (CTR {info['log_ctr']:.3f}), LinUCB alpha "
              f"{info['alpha']} (existing users: " + ", ".join(f"{a}: {v:.1f}" for a, v in info["tuned"].items())
              + f"){extra}; {info['seconds']:.0f} s")
        print("    returns: " + ", ".join(f"{n}: {v.mean():.1f}" for n, v in r["results"].items()))
        runs.append(r)
    names = list(runs[0]["results"])
    means = {n: np.array([r["results"][n].reward.mean() for r in runs]) for n in names}
    best = max(BASELINES, key=lambda n: means[n].mean())
    print(f"\n{'policy':<42}{'return':>9}{'se seeds':>10}{'se users':>10}{'steps':>8}"
          f"{'vs ' + best[:18]:>30}{'ratio':>8}")
    for n in names:
        pooled = np.concatenate([r["results"][n].reward for r in runs])
        steps = np.mean([r["results"][n].mean("steps") for r in runs])
        se_seed = means[n].std(ddof=1) / np.sqrt(len(runs)) if len(runs) > 1 else float("nan")
        cell = ""
        if n != best:
            dm, ds, du, ratio = _paired(runs, n, best)
            cell = f"{dm:+8.2f} ± {ds:5.2f} ({dm / ds if ds > 0 else float('nan'):+5.1f} s.e.)"
            ratio = f"{ratio:8.2f}"
        else:
            ratio = f"{1.0:8.2f}"
        print(f"{n:<42}{means[n].mean():>9.2f}{se_seed:>10.2f}{pooled.std(ddof=1) / np.sqrt(pooled.shape[0]):>10.2f}"
              f"{steps:>8.1f}{cell:>30}{ratio}")
    print("\nslate moves (share of the slate replaced at the next step: after a click / after no click):")
    for n in names:
        mv = np.array([r["info"]["moves"][n] for r in runs])
        print(f"  {n:<42} {np.nanmean(mv[:, 0]):.2f} / {np.nanmean(mv[:, 1]):.2f}")
    pairs = [(WM_ROWS[1], WM_ROWS[0], "in-session adaptation"),
             (WM_ROWS[3], WM_ROWS[0], "world-state update alone"), (WM_ROWS[2], WM_ROWS[1], "planning"),
             (WM_ROWS[2], "LinUCB", "planning + adaptation vs LinUCB"),
             (WM_ROWS[2], "greedy ridge (alpha 0)", "planning + adaptation vs greedy ridge"),
             (DYNA_ROW, SDK_ROW, "Dyna")]
    print()
    for a, b, what in pairs:
        if a in means and b in means:
            dm, ds, du, ratio = _paired(runs, a, b)
            print(f"{what}: {a} - {b}: {dm:+.2f} ± {ds:.2f} (s.e. over seeds; {du:.2f} over users), ratio {ratio:.2f}")
    if WM_ROWS[2] in means:
        dm, ds, du, ratio = _paired(runs, WM_ROWS[2], best)
        print(f"world-model planning - best non-oracle baseline ({best}): {dm:+.2f} ± {ds:.2f} (s.e. over seeds; "
              f"{du:.2f} over users), ratio {ratio:.2f} (issue 15 target: >= 1.1 and > 2 s.e.)")
    dm, ds, du, ratio = _paired(runs, "planning oracle", "myopic oracle")
    print(f"\nplanning oracle - myopic oracle: {dm:+.2f} ± {ds:.2f} (s.e. over seeds; {du:.2f} over users), "
          f"ratio {ratio:.2f}")
    for n in names:
        if n.startswith("SDK evidence=0 ") and SDK_ROW in means:
            dm, ds, du, ratio = _paired(runs, SDK_ROW, n)
            print(f"in-session evidence: {SDK_ROW} - {n}: {dm:+.2f} ± {ds:.2f} (s.e. over seeds; {du:.2f} over "
                  f"users), ratio {ratio:.2f}")
    for sdk in [n for n in names if n.startswith("SDK")]:
        for ref in ("LinUCB", "greedy ridge (alpha 0)"):
            dm, ds, du, ratio = _paired(runs, sdk, ref)
            print(f"{sdk} - {ref}: {dm:+.2f} ± {ds:.2f} (s.e. over seeds; {du:.2f} over users), ratio {ratio:.2f}")
        dm, ds, du, ratio = _paired(runs, sdk, best)
        print(f"{sdk} - best non-oracle baseline ({best}): {dm:+.2f} ± {ds:.2f} (s.e. over seeds; {du:.2f} over "
              f"users), ratio {ratio:.2f} (issue 15 target: >= 1.1 and > 2 s.e.)")
    print(f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
