"""Off-policy evaluation on the Open Bandit Dataset sample, beside the Open Bandit Pipeline.

For each campaign (all / men / women):

* the on-policy truth: the click rate of each logging policy on its own logs;
* a sanity check: IPS of each logging policy on its own logs (action_prob = propensity)
  must reproduce that rate exactly;
* the Open Bandit paper's protocol: estimate Bernoulli TS from the random logs and random
  from the BTS logs with IPS / SNIPS / DM / DR / SNDR and report the relative error
  |V̂ - V| / V against the other policy's on-policy rate, with bootstrap intervals, on the
  full log and averaged over bootstrap resamples of the log (OBP's protocol).

The evaluation policy's action probabilities follow OBP: Bernoulli TS with the ZOZOTOWN
production prior (OBP's ``obp/policy/conf/prior_bts.yaml``, copied below, Apache-2.0,
ZOZO Technologies), simulated by Monte Carlo (``recmeta_sdk.evaluation.ope.bernoulli_ts_action_dist``,
OBP's ``compute_batch_action_dist``, 100,000 simulations); the random policy puts 1 /
n_items on every item at every position. The reward model for DM / DR / SNDR is the
smoothed per-(item, position) click rate (``ope.ClickRateModel``), cross-fitted over 3 folds.

The OBP numbers are those measured with OBP 0.5.7 on the same sample (quality.md, section 4).

    PYTHONPATH=. .venv/bin/python bench/bench_ope_obd.py [--n-bootstrap 1000] [--seed 0]
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from recmeta_sdk import datasets
from recmeta_sdk.evaluation import ope

# OBP 0.5.7, obp/policy/conf/prior_bts.yaml (ZOZOTOWN's production prior for Bernoulli TS).
_ZOZOTOWN_BTS_PRIOR = {
    "all": {
        "alpha": [47, 8, 62, 142, 3, 14, 7, 857, 12, 15, 6, 100, 48, 23, 71, 61, 13, 16, 518, 30, 7, 4, 23, 8, 10, 11, 11, 18, 121, 11, 11, 10, 14, 9, 204, 58, 3, 19, 42, 1013, 2, 328, 15, 31, 14, 138, 45, 55, 23, 38, 10, 401, 52, 6, 3, 6, 5, 32, 35, 133, 52, 820, 43, 195, 8, 42, 40, 4, 32, 30, 9, 22, 6, 23, 5, 54, 8, 22, 65, 246],
        "beta": [12198, 3566, 15993, 35522, 2367, 4609, 3171, 181745, 4372, 4951, 3100, 24665, 13210, 7061, 18061, 17449, 5644, 6787, 111326, 8776, 3334, 2271, 7389, 2659, 3665, 4724, 3561, 5085, 27407, 4601, 4756, 4120, 4736, 3788, 45292, 14719, 2189, 5589, 11995, 222255, 2308, 70034, 4801, 8274, 5421, 31912, 12213, 13576, 6230, 10382, 4141, 85731, 12811, 2707, 2250, 2668, 2886, 9581, 9465, 28336, 12062, 162793, 12107, 41240, 3162, 11604, 10818, 2923, 8897, 8654, 4000, 6580, 3174, 6766, 2602, 14506, 3968, 7523, 16532, 51964],
    },
    "men": {
        "alpha": [47, 8, 62, 142, 3, 6, 100, 48, 23, 71, 61, 13, 16, 518, 30, 7, 4, 23, 8, 10, 11, 11, 18, 121, 11, 4, 32, 30, 9, 22, 6, 23, 5, 54],
        "beta": [12198, 3566, 15993, 35522, 2367, 3100, 24665, 13210, 7061, 18061, 17449, 5644, 6787, 111326, 8776, 3334, 2271, 7389, 2659, 3665, 4724, 3561, 5085, 27407, 4601, 2923, 8897, 8654, 4000, 6580, 3174, 6766, 2602, 14506],
    },
    "women": {
        "alpha": [12, 7, 984, 13, 15, 15, 11, 14, 9, 200, 72, 3, 14, 49, 1278, 3, 325, 14, 27, 14, 169, 48, 47, 18, 40, 12, 447, 46, 5, 3, 5, 7, 35, 34, 99, 30, 880, 51, 182, 6, 45, 39, 10, 24, 72, 229],
        "beta": [3612, 3173, 204484, 4517, 4765, 5331, 4131, 4728, 4028, 44280, 17918, 2309, 4339, 12922, 270771, 2480, 68475, 5129, 7367, 5819, 38026, 13047, 11604, 5394, 10912, 4439, 94485, 10700, 2679, 2319, 2578, 3288, 9566, 9775, 20120, 7317, 172026, 13673, 37329, 3365, 10911, 10734, 4278, 7574, 16826, 47462],
    },
}

# Measured with OBP 0.5.7 on this sample (quality.md section 4).
OBP_ON_POLICY = {"all": (0.0038, 0.0042), "men": (0.0046, 0.0069), "women": (0.0046, 0.0046)}
OBP_REL_ERR_BTS_FROM_RANDOM = {
    "all": {"ips": 0.31, "snips": 0.31, "dr": 0.29, "dm": 0.15},
    "men": {"ips": 0.33, "snips": 0.33, "dr": 0.34, "dm": 0.37},
    "women": {"ips": 0.57, "snips": 0.58, "dr": 0.60, "dm": 0.15},
}
ESTIMATORS = ("ips", "snips", "dm", "dr", "sndr")


def load_logs(campaign: str, policy: str) -> dict:
    """The OBD sample as arrays: actions, positions (0-based), rewards, propensities."""
    ds = datasets.load("obd", campaign=campaign, policy=policy)
    df = ds.interactions
    n_actions = len(ds.items)
    pos = df["position"].to_numpy(np.int64)
    return {
        "actions": df["item"].to_numpy(np.int64),
        "positions": pos - pos.min(),
        "rewards": df["reward"].to_numpy(np.float64),
        "pscore": df["propensity"].to_numpy(np.float64),
        "n_actions": n_actions,
        "len_list": int(pos.max() - pos.min() + 1),
    }


def action_dist_of(policy: str, campaign: str, n_actions: int, len_list: int, seed: int) -> np.ndarray:
    """(n_actions, len_list) action distribution per position of an evaluation policy."""
    if policy == "random":
        return np.full((n_actions, len_list), 1.0 / n_actions)
    prior = _ZOZOTOWN_BTS_PRIOR[campaign]
    if len(prior["alpha"]) != n_actions:
        raise ValueError(f"BTS prior for {campaign} has {len(prior['alpha'])} arms, data has {n_actions}")
    return ope.bernoulli_ts_action_dist(prior["alpha"], prior["beta"], len_list, n_sim=100_000,
                                        random_state=seed)


def evaluate(logs: dict, dist: np.ndarray, *, n_bootstrap: int, seed: int) -> dict:
    """All five estimates of the policy with per-position distribution ``dist`` on ``logs``."""
    a, p, r, ps = logs["actions"], logs["positions"], logs["rewards"], logs["pscore"]
    n = a.shape[0]
    action_prob = dist[a, p]
    model = ope.ClickRateModel(logs["n_actions"], logs["len_list"], prior_strength=10.0)
    q_full = model.fit_predict(a, p, r, n_folds=3, random_state=seed)  # (n, A, L)
    q_hat = ope.logged_reward(q_full, a, p)
    v_hat = ope.expected_reward(q_full, np.broadcast_to(dist, (n,) + dist.shape), p)
    kw = dict(positions=p, n_bootstrap=n_bootstrap, random_state=seed)
    return {
        "ips": ope.ips(r, ps, action_prob, **kw),
        "snips": ope.snips(r, ps, action_prob, **kw),
        "dm": ope.dm(r, v_hat, **kw),
        "dr": ope.dr(r, ps, action_prob, q_hat, v_hat, **kw),
        "sndr": ope.sndr(r, ps, action_prob, q_hat, v_hat, **kw),
    }


def resampled_rel_errors(logs: dict, dist: np.ndarray, truth: float, *, n_runs: int, seed: int) -> dict:
    """Mean relative error over ``n_runs`` bootstrap resamples of the logs (OBP's protocol:
    ``sample_bootstrap_bandit_feedback`` per run, relative error averaged over runs)."""
    rng = np.random.default_rng(seed)
    n = logs["rewards"].shape[0]
    errs = {k: [] for k in ESTIMATORS}
    for _ in range(n_runs):
        idx = rng.integers(0, n, n)
        boot = dict(logs, **{k: logs[k][idx] for k in ("actions", "positions", "rewards", "pscore")})
        est = evaluate(boot, dist, n_bootstrap=1, seed=int(rng.integers(2**31)))
        for k in ESTIMATORS:
            errs[k].append(abs(est[k].value - truth) / truth)
    return {k: float(np.mean(v)) for k, v in errs.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-bootstrap", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--campaigns", default="all,men,women")
    ap.add_argument("--n-runs", type=int, default=30,
                    help="bootstrap resamples of the logs for the mean relative error (OBP's protocol)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    for campaign in args.campaigns.split(","):
        logs = {pol: load_logs(campaign, pol) for pol in ("random", "bts")}
        truth = {pol: float(logs[pol]["rewards"].mean()) for pol in logs}
        print(f"\n== campaign {campaign} (n = {len(logs['random']['rewards'])} / "
              f"{len(logs['bts']['rewards'])} random / BTS impressions)")
        print("on-policy click rate   ours            OBP      IPS on own logs (95% CI)")
        for i, pol in enumerate(("random", "bts")):
            own = ope.ips(logs[pol]["rewards"], logs[pol]["pscore"], logs[pol]["pscore"],
                          n_bootstrap=args.n_bootstrap, random_state=args.seed)
            exact = "exact" if own.value == truth[pol] else f"MISMATCH {own.value - truth[pol]:+.3g}"
            print(f"  {pol:<6}               {truth[pol]:.4%}        {OBP_ON_POLICY[campaign][i]:.3%}   "
                  f"{own.value:.4%} ({own.ci_low:.3%}, {own.ci_high:.3%}) {exact}")
        for target, source in (("bts", "random"), ("random", "bts")):
            lg = logs[source]
            dist = action_dist_of(target, campaign, lg["n_actions"], lg["len_list"], args.seed)
            est = evaluate(lg, dist, n_bootstrap=args.n_bootstrap, seed=args.seed)
            v = truth[target]
            mre = resampled_rel_errors(lg, dist, v, n_runs=args.n_runs, seed=args.seed)
            print(f"  {target} from {source} logs (truth {v:.4%}):")
            print("    estimator  estimate   95% CI                rel. error  "
                  f"mean rel. error ({args.n_runs} resamples)  OBP rel. error")
            for name in ESTIMATORS:
                e = est[name]
                obp = OBP_REL_ERR_BTS_FROM_RANDOM[campaign].get(name) if target == "bts" else None
                obp_s = f"{obp:.2f}" if obp is not None else "-"
                print(f"    {name:<9}  {e.value:.4%}   ({e.ci_low:.4%}, {e.ci_high:.4%})   "
                      f"{abs(e.value - v) / v:.2f}        {mre[name]:.2f}                             {obp_s}")
    print(f"\n({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
