"""The world model's own metrics on held-out users, against no adaptation and popularity.

``recmeta_sdk.model.world.WorldModel`` is trained on the logs of the training users and
scored on held-out users (issue 15, item 1): each held-out user's first ``--support`` steps
adapt the state (not scored), every later step is scored. Three models on the same events:

* ``world model``: the adapted state, rolled in through each scored step as its response is
  revealed (``online``: one-step-ahead), or frozen after the support (``frozen``);
* ``no adaptation``: the learned prior state for every step;
* ``popularity``: each item's smoothed positive rate in the training logs (and the position
  offsets of the training logs); items ranked by positive count.

Metrics: Bernoulli log-likelihood per scored event (nats; higher is better), expected
calibration error of the predicted positive rates (10 equal-width bins), and next-item
hit@10 (the item of each scored positive event among all catalogue items that the user has
not met before that step).

Environments (``--env``):

``ml100k``
    MovieLens-100K (the ``recbole==1.2.1`` wheel via ``recmeta_sdk.datasets``): users split
    80/20 (seed 2020), every rating one event in time order, positive = rating >= 4, item
    features genres + release year. Items rated only by held-out users are dropped (counted).
``sim``
    ``recmeta_sdk.evaluation.sim.UserSimulator`` (slates of 3, position bias, new users from segments
    never seen in training; 100 users per segment): 20 uniform-random rounds per user, training users' logs for
    training, the test users' logs held out; item features are the simulator's item vectors.

    PYTHONPATH=. .venv/bin/python bench/bench_world_model.py            # both, full
    PYTHONPATH=. .venv/bin/python bench/bench_world_model.py --quick    # < 2 min: 5 epochs, online only
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
import torch

from recmeta_sdk import datasets
from recmeta_sdk.evaluation import sim
from recmeta_sdk.model.world import WorldModel

MODELS = (("world_model", "world model"), ("no_adaptation", "no adaptation"), ("popularity", "popularity"))


def ml100k(epochs: int, support: int, seed: int):
    ds = datasets.load("ml-100k")
    log = ds.interactions
    users = np.sort(log["user"].unique())
    rng = np.random.default_rng(2020)
    rng.shuffle(users)
    held = set(users[: round(0.2 * len(users))].tolist())
    train = log[~log["user"].isin(held)]
    test = log[log["user"].isin(held)]
    items = ds.items[["genres", "release_year"]]
    t0 = time.perf_counter()
    wm = WorldModel.fit(train, item_features=items, positive_threshold=4.0, epochs=epochs, seed=seed)
    fit_s = time.perf_counter() - t0
    info = f"{train['user'].nunique()} training users ({len(train)} events), {len(held)} held-out users"
    return wm, test, fit_s, info


def simulator(epochs: int, support: int, seed: int, users_per_segment: int = 100):
    env = sim.UserSimulator(slate_size=3, drift=0.05, users_per_segment=users_per_segment, seed=0)
    train = env.log_random(env.train_users, n_rounds=20, seed=0)
    test = env.log_random(env.test_users, n_rounds=20, seed=1)
    feats = pd.DataFrame(env.item_features, columns=[f"f{j}" for j in range(env.item_features.shape[1])])
    t0 = time.perf_counter()
    wm = WorldModel.fit(train, item_features=feats, epochs=epochs, seed=seed)
    fit_s = time.perf_counter() - t0
    info = (f"{len(env.train_users)} training users ({len(train)} events, slates of 3), "
            f"{len(env.test_users)} held-out users of unseen segments")
    return wm, test, fit_s, info


def report(name: str, wm: WorldModel, test: pd.DataFrame, fit_s: float, info: str, support: int,
           modes: tuple = (True, False)) -> None:
    print(f"\n== {name}: {info}; support = first {support} steps; fit {fit_s:.1f} s "
          f"({len(wm.history)} epochs, final loss {wm.history[-1]:.4f})")
    for online in modes:
        t0 = time.perf_counter()
        rep = wm.evaluate(test, support=support, online=online, unknown_items="drop")
        ev_s = time.perf_counter() - t0
        mode = "online (state rolled in through every revealed step)" if online else "frozen after the support"
        print(f"-- {mode}: {rep['users']} users, {rep['events']} scored events, {rep['targets']} positive "
              f"targets, {rep['dropped_events']} events dropped (unknown items); evaluate {ev_s:.1f} s")
        end = "end_log_likelihood" in rep["world_model"]
        print(f"{'model':<15} {'LL/event':>9} {'ECE':>7} {'hit@10':>7}" + (f" {'end LL':>8}" if end else ""))
        for key, label in MODELS:
            m = rep[key]
            print(f"{label:<15} {m['log_likelihood']:>9.4f} {m['ece']:>7.4f} {m['hit@10']:>7.4f}"
                  + (f" {m['end_log_likelihood']:>8.4f}" if end else ""))
        w = rep["world_model"]
        for key, label in MODELS[1:]:
            m = rep[key]
            print(f"   vs {label:<13} LL {w['log_likelihood'] - m['log_likelihood']:+.4f} nats/event, "
                  f"ECE x{w['ece'] / m['ece']:.2f}, hit@10 x{w['hit@10'] / max(m['hit@10'], 1e-12):.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--env", default="ml100k,sim", help="comma-separated: ml100k, sim")
    ap.add_argument("--epochs", type=int, default=None, help="most training epochs (default 20; --quick 5)")
    ap.add_argument("--support", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: no oversubscription)")
    ap.add_argument("--quick", action="store_true",
                    help="fewer epochs, online evaluation only (under 2 minutes)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    epochs = args.epochs if args.epochs is not None else (5 if args.quick else 20)
    modes = (True,) if args.quick else (True, False)
    for env in args.env.split(","):
        if env == "ml100k":
            report("MovieLens-100K", *ml100k(epochs, args.support, args.seed), args.support, modes)
        elif env == "sim":
            report("UserSimulator", *simulator(epochs, args.support, args.seed), args.support, modes)
        else:
            raise SystemExit(f"unknown env {env!r}")


if __name__ == "__main__":
    main()
