"""Learned-simulator fidelity: does ``WorldModelSimulator`` rank policies as the real simulator does?

For each seed, a ``recmeta_sdk.model.WorldModel`` is fitted on the uniform-random logs of
``bench_long_horizon``'s long-horizon simulator; the same policies (random, popularity,
LinUCB alpha 1, greedy ridge, the world model's Planner frozen / with in-session evidence)
serve 30 new users in the real simulator and in
``recmeta_sdk.evaluation.sim.WorldModelSimulator`` built from the model. Prints both returns
and their Spearman rank correlation per seed.

    PYTHONPATH=. .venv/bin/python bench/bench_world_sim.py --seeds 3
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch
from scipy.stats import spearmanr

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_long_horizon as B

from recmeta_sdk.evaluation import bandits, sim
from recmeta_sdk.model import WorldModel
from recmeta_sdk.online.planning import Planner


def _policies(seed, ctr, feats, prior, wm) -> dict:
    return {"random": lambda e: bandits.RandomPolicy(e.n_items, seed=seed),
            "popularity": lambda e: bandits.PopularityPolicy(ctr),
            "LinUCB (alpha 1)": lambda e: bandits.LinUCB(feats, alpha=1.0, lam=1.0, theta0=prior),
            "greedy ridge": lambda e: bandits.LinUCB(feats, alpha=0.0, lam=1.0, theta0=prior),
            "WM myopic, frozen": lambda e: Planner(wm, plan=False, adapt=False),
            "WM myopic + evidence 5": lambda e: Planner(wm, plan=False, evidence=5.0, **B.PLANNER)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--users", type=int, default=30)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rhos = []
    for seed in range(args.seeds):
        env = sim.LongSessionSimulator(B.CONFIG, seed=seed, n_test_users=args.users)
        logs = env.log_sessions(seed=seed)
        ctr, feats, prior = B.log_features(env, logs)
        wm = WorldModel.fit(logs, item_features=env.items_frame(), seed=seed)
        wenv = sim.WorldModelSimulator(wm, n_users=args.users, max_steps=env.max_steps,
                                       item_ids=np.arange(env.n_items))
        facs = _policies(seed, ctr, feats, prior, wm)
        real, learned = [], []
        for n, f in facs.items():
            a = sim.run_sessions(env, f, seed=seed).mean()
            b = sim.run_sessions(wenv, f, seed=seed).mean()
            real.append(a)
            learned.append(b)
            print(f"seed {seed} {n:<24} real {a:6.2f}   learned simulator {b:6.2f}", flush=True)
        rho = float(spearmanr(real, learned).correlation)
        rhos.append(rho)
        print(f"seed {seed}: Spearman rank correlation of the policies' returns {rho:+.2f}", flush=True)
    print(f"mean Spearman over {args.seeds} seeds: {np.mean(rhos):+.2f}")


if __name__ == "__main__":
    main()
