"""Scale: training, memory, model file, serving and feedback on synthetic power-law logs,
beside implicit's ALS on the same data (issue 16, item 5).

For each size ``ITEMS:INTERACTIONS`` (``k`` / ``M`` suffixes: ``10k:1M``, ``100k:5M``,
``1M:20M``) a child process (one per size and library, so each peak RSS is its own)
generates a seeded power-law log (users ~ interactions / 20 with power-law activity, items
drawn from a Zipf-like popularity, timestamps over 90 days, a user segment and an item
category plus a numeric price as side features) and measures:

* ours (``recmeta_sdk.train``, ``--epochs`` epochs, defaults otherwise): the wide part's fit,
  the time per epoch, the peak RSS (``resource.getrusage``) against the log's and the
  parameters' bytes, the model file size, ``recommend`` p50 / p99 for known users (by id)
  and for new users (``adapt`` of 10 items + ``recommend``), one ``ops.policy_topk`` call over
  the same item table, and ``feedback`` per event (p50 / p99);
* implicit's ``AlternatingLeastSquares`` (``factors`` = our ``dim``; ``--als-iters``
  iterations): time per iteration, peak RSS, ``recommend`` p50 / p99 for known users.

Then the targets of issue 16 are printed as pass / fail: peak RSS <= 2 x (log + parameters);
time per epoch growing <= 1.1 x linearly in interactions (between consecutive sizes); at 1M
items recommend p50 <= 1.2 x one ``ops.policy_topk`` call over the same table; feedback p50
<= 1 ms. With matplotlib installed, ``--png`` writes a log-log plot of time per epoch and peak
RSS against interactions (else it says it skipped the plot).

Usage::

    python bench/bench_scale.py                         # 10k items x 100k interactions (< 3 min)
    python bench/bench_scale.py --sizes 10k:1M,100k:5M,1M:20M --png scale.png
    python bench/bench_scale.py --ml100k                # the sparse vs dense wide part on MovieLens-100K

``--ml100k`` trains the default model twice on the same per-user random 80/20 split of
MovieLens-100K (``recmeta_sdk.datasets``), once with the dense wide part and once with the
sparse one forced by a small ``wide_budget_bytes``, and prints NDCG@10 / Recall@10 of both
(and of the two wide parts alone).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def _parse_n(s: str) -> int:
    s = s.strip().lower()
    mult = {"k": 10**3, "m": 10**6}.get(s[-1:], 1)
    return int(float(s[:-1] if s[-1:] in "km" else s) * mult)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def make_log(n_items: int, n_inter: int, seed: int = 0):
    """A seeded synthetic power-law log: (interactions, users, items) DataFrames.

    Users: ``max(n_inter // 20, 10)``, activity ~ rank^-0.7; items: popularity ~
    (rank + 10)^-0.9 over a random permutation of the ids; timestamps uniform over 90 days;
    reward 1. Side features: a user ``segment`` (20 values), an item ``category`` (about
    ``N / 200`` values) and a numeric ``price``."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    n_users = max(n_inter // 20, 10)
    ip = 1.0 / (np.arange(n_items) + 10.0) ** 0.9
    up = 1.0 / (np.arange(n_users) + 1.0) ** 0.7
    ic, uc = np.cumsum(ip / ip.sum()), np.cumsum(up / up.sum())
    perm_i, perm_u = rng.permutation(n_items), rng.permutation(n_users)
    items = perm_i[np.minimum(np.searchsorted(ic, rng.random(n_inter)), n_items - 1)]
    users = perm_u[np.minimum(np.searchsorted(uc, rng.random(n_inter)), n_users - 1)]
    users[:n_users] = np.arange(n_users)  # every user has at least one row
    ts = rng.integers(1_700_000_000, 1_700_000_000 + 90 * 86400, n_inter)
    log = pd.DataFrame({"user": users.astype(np.int64), "item": items.astype(np.int64),
                        "timestamp": ts.astype(np.int64), "reward": np.ones(n_inter, np.float32)})
    log = log.drop_duplicates(["user", "item"], ignore_index=True)
    user_df = pd.DataFrame({"segment": rng.integers(0, 20, n_users).astype(str)}, index=np.arange(n_users))
    item_df = pd.DataFrame({"category": rng.integers(0, max(n_items // 200, 2), n_items).astype(str),
                            "price": np.round(rng.lognormal(3.0, 1.0, n_items), 2)}, index=np.arange(n_items))
    return log, user_df, item_df


def _pcts(ts) -> tuple:
    a = np.asarray(ts) * 1e3
    return float(np.percentile(a, 50)), float(np.percentile(a, 99))


def child_ours(n_items: int, n_inter: int, epochs: int, repeats: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    import recmeta_sdk as rm
    from recmeta_sdk import ops

    rss0 = _rss_mb()  # the interpreter with torch and the SDK imported
    t = time.perf_counter()
    log, users, items = make_log(n_items, n_inter)
    out = {"rss_base_mb": rss0, "gen_s": time.perf_counter() - t, "rows": len(log), "users": int(log["user"].nunique()),
           "items_in_log": int(log["item"].nunique())}
    out["log_bytes"] = int(log.memory_usage(deep=True).sum() + users.memory_usage(deep=True).sum()
                           + items.memory_usage(deep=True).sum())
    out["rss_after_gen_mb"] = _rss_mb()
    t = time.perf_counter()
    model = rm.train(log, users=users, items=items, config={"epochs": epochs, "seed": 0})
    out["train_s"] = time.perf_counter() - t
    h = model.history
    n_ep = len(h["loss"])
    out["wide_s"] = float(h.get("wide_seconds", float("nan")))
    out["epoch_s"] = (float(h["seconds"]) - out["wide_s"]) / max(n_ep, 1)
    out["wide_mode"] = model._net.wide_mode(model.config, model.n_items) or "none"
    out["param_bytes"] = int(sum(v.numel() * v.element_size() for v in model._net.state_dict().values()))
    out["rss_after_train_mb"] = _rss_mb()
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "m.recmeta")
        model.save(p)
        out["file_bytes"] = os.path.getsize(p)
    rng = np.random.default_rng(1)
    uids = model.user_ids[rng.choice(len(model.user_ids), min(100, len(model.user_ids)), replace=False)]
    for u in uids:  # the known users' states: computed once per model
        model.recommend(u, k=10)
    ts = []
    for j in range(repeats):
        u = uids[j % len(uids)]
        t = time.perf_counter()
        model.recommend(u, k=10)
        ts.append(time.perf_counter() - t)
    out["rec_known_ms"] = _pcts(ts)
    ts = []
    pop = np.argsort(-model._item_count)[:1000]
    for j in range(max(repeats // 4, 20)):
        hist = model.item_ids[rng.choice(pop, 10, replace=False)]
        t = time.perf_counter()
        model.recommend(model.adapt(list(hist)), k=10)
        ts.append(time.perf_counter() - t)
    out["rec_new_ms"] = _pcts(ts)
    V = model._table().V
    u = np.ascontiguousarray(rng.standard_normal((1, V.shape[1])).astype(np.float32))
    ops.policy_topk(u, V, 10)
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        ops.policy_topk(u, V, 10)
        ts.append(time.perf_counter() - t)
    out["topk_ms"] = _pcts(ts)
    ts = []
    for j in range(repeats):
        ev = [{"user": uids[j % len(uids)], "item": model.item_ids[pop[j % len(pop)]], "reward": 1.0}]
        t = time.perf_counter()
        model.feedback(ev)
        ts.append(time.perf_counter() - t)
    out["feedback_ms"] = _pcts(ts)
    out["peak_rss_mb"] = _rss_mb()
    return out


def child_als(n_items: int, n_inter: int, iters: int, factors: int, repeats: int, threads: int) -> dict:
    try:
        import implicit
        import scipy.sparse as sp
        from threadpoolctl import threadpool_limits
    except ImportError as e:
        return {"skipped": f"implicit not installed ({e})"}
    log, _, _ = make_log(n_items, n_inter)
    out = {}
    X = sp.csr_matrix((np.ones(len(log), np.float32), (log["user"].to_numpy(), log["item"].to_numpy())),
                      shape=(int(log["user"].max()) + 1, n_items))
    out["rss_after_gen_mb"] = _rss_mb()
    with threadpool_limits(threads):
        als = implicit.cpu.als.AlternatingLeastSquares(factors=factors, iterations=iters, random_state=0,
                                                       num_threads=threads)
        t = time.perf_counter()
        als.fit(X, show_progress=False)
        out["iter_s"] = (time.perf_counter() - t) / iters
        rng = np.random.default_rng(1)
        uids = rng.choice(X.shape[0], min(100, X.shape[0]), replace=False)
        ts = []
        for j in range(repeats):
            u = int(uids[j % len(uids)])
            t = time.perf_counter()
            als.recommend(u, X[u], N=10, filter_already_liked_items=True)
            ts.append(time.perf_counter() - t)
    out["rec_known_ms"] = _pcts(ts)
    out["param_bytes"] = int(als.user_factors.nbytes + als.item_factors.nbytes)
    out["peak_rss_mb"] = _rss_mb()
    return out


def _run_child(args, kind: str, n_items: int, n_inter: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, str(n_items), str(n_inter),
           "--epochs", str(args.epochs), "--repeats", str(args.repeats), "--threads", str(args.threads),
           "--als-iters", str(args.als_iters)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"failed": f"over --timeout {args.timeout} s"}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
        return {"failed": f"exit {p.returncode}: {' | '.join(tail)}"}
    return json.loads(lines[-1][7:])


def _fmt_pair(p) -> str:
    return f"{p[0]:.3f} / {p[1]:.3f}"


def ml100k(args) -> int:
    import torch

    torch.set_num_threads(args.threads)
    import recmeta_sdk as rm
    from recmeta_sdk.evaluation.baselines import ease_weights
    from recmeta_sdk.training.loop import _gram, _interaction_matrix, prepare, sparse_ease

    ds = rm.datasets.load("ml-100k")
    log = ds.interactions
    rng = np.random.default_rng(0)
    test_mask = np.zeros(len(log), bool)
    for _, idx in log.groupby("user").indices.items():  # per-user random 80/20
        idx = np.asarray(idx)
        test_mask[rng.choice(idx, max(1, int(round(0.2 * len(idx)))), replace=False)] = True
    train, test = log[~test_mask].reset_index(drop=True), log[test_mask].reset_index(drop=True)
    print(f"MovieLens-100K: per-user random 80/20 (seed 0): {len(train)} train rows, {len(test)} test rows")
    # the wide parts alone (EASE ridge 250, every rating a positive), scored on the same split
    tr = train.assign(reward=1.0)
    prep = prepare(tr)
    X = _interaction_matrix(prep)
    N = X.shape[1]
    truth = {}
    ti = pd_index(prep.item_ids).get_indexer(test["item"].to_numpy())
    tu = pd_index(prep.user_ids).get_indexer(test["user"].to_numpy())
    for u, i in zip(tu, ti):
        if u >= 0 and i >= 0:
            truth.setdefault(int(u), set()).add(int(i))
    users = np.array(sorted(truth))

    def wide_metrics(W: np.ndarray) -> tuple:
        Xd = X[users].toarray()
        sc = Xd @ W
        sc[Xd > 0] = -np.inf
        top = np.argsort(-sc, axis=1, kind="stable")[:, :10]
        disc = 1.0 / np.log2(np.arange(2, 12))
        nd, rc = [], []
        for r, u in enumerate(users):
            hit = np.array([i in truth[u] for i in top[r]], float)
            idcg = disc[:min(len(truth[u]), 10)].sum()
            nd.append((hit * disc).sum() / idcg)
            rc.append(hit.sum() / len(truth[u]))
        return float(np.mean(nd)), float(np.mean(rc))

    t = time.perf_counter()
    Wd = ease_weights(_gram(X), 250.0).numpy().astype(np.float32)
    td = time.perf_counter() - t
    print(f"wide part alone, dense EASE: NDCG@10 / Recall@10 {wide_metrics(Wd)[0]:.4f} / {wide_metrics(Wd)[1]:.4f} "
          f"({td:.1f} s, {N} x {N} float32 = {Wd.nbytes / 2**20:.1f} MiB)")
    for m in args.neighbours:
        t = time.perf_counter()
        Ws = sparse_ease(X, 250.0, m)[0]
        ts = time.perf_counter() - t
        nd, rc = wide_metrics(Ws.to_dense().numpy())
        print(f"wide part alone, sparse EASE m={m}: NDCG@10 / Recall@10 {nd:.4f} / {rc:.4f} "
              f"({ts:.1f} s, {Ws.nnz} entries = {Ws.nbytes / 2**20:.1f} MiB)")
    if args.skip_models:
        return 0
    res = {}
    for name, extra in (("dense", {}), ("sparse", {"wide_budget_bytes": 1})):
        t = time.perf_counter()
        model = rm.train(train, users=ds.users, items=ds.items, config=dict({"seed": 0}, **extra))
        el = time.perf_counter() - t
        mode = model._net.wide_mode(model.config, model.n_items)
        ev = model.evaluate(test, k=10)
        res[name] = ev
        print(f"model, {mode} wide part: NDCG@10 {ev['ndcg@10']:.4f}, Recall@10 {ev['recall@10']:.4f} "
              f"(train {el:.0f} s)")
    print(f"sparse / dense: NDCG@10 {res['sparse']['ndcg@10'] / res['dense']['ndcg@10']:.3f}, "
          f"Recall@10 {res['sparse']['recall@10'] / res['dense']['recall@10']:.3f}")
    return 0


def pd_index(a):
    import pandas as pd

    return pd.Index(a)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10k:100k", help="comma-separated ITEMS:INTERACTIONS (k / M suffixes)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--als-iters", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=200, help="timed calls per serving measurement")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per child process")
    ap.add_argument("--no-implicit", action="store_true")
    ap.add_argument("--png", default=None, help="write the log-log plot here (needs matplotlib)")
    ap.add_argument("--ml100k", action="store_true", help="sparse vs dense wide part on MovieLens-100K")
    ap.add_argument("--neighbours", type=lambda s: [int(x) for x in s.split(",")], default=[32, 128],
                    help="--ml100k: neighbours of the sparse wide part alone (comma-separated)")
    ap.add_argument("--skip-models", action="store_true", help="--ml100k: the wide parts alone")
    ap.add_argument("--child", nargs=3, metavar=("KIND", "ITEMS", "INTERACTIONS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        kind, ni, nn = args.child[0], int(args.child[1]), int(args.child[2])
        if kind == "ours":
            r = child_ours(ni, nn, args.epochs, args.repeats, args.threads)
        else:
            r = child_als(ni, nn, args.als_iters, 128, args.repeats, args.threads)
        print("RESULT " + json.dumps(r))
        return 0
    if args.ml100k:
        return ml100k(args)
    try:
        print("load average", " ".join(f"{x:.2f}" for x in os.getloadavg()), f"; {os.cpu_count()} CPUs; "
              f"{args.threads} thread(s)")
    except OSError:
        pass
    sizes = []
    for tok in args.sizes.split(","):
        a, b = tok.split(":")
        sizes.append((_parse_n(a), _parse_n(b)))
    rows = []
    for ni, nn in sizes:
        t = time.perf_counter()
        ours = _run_child(args, "ours", ni, nn)
        als = {"skipped": "--no-implicit"} if args.no_implicit else _run_child(args, "als", ni, nn)
        rows.append((ni, nn, ours, als))
        print(f"\n== {ni:,} items x {nn:,} interactions ({time.perf_counter() - t:.0f} s)")
        if "failed" in ours:
            print(f"  ours: FAILED {ours['failed']}")
        else:
            mb = ours["log_bytes"] / 2**20
            pb = ours["param_bytes"] / 2**20
            print(f"  ours: {ours['rows']:,} rows ({ours['users']:,} users); wide part {ours['wide_mode']} "
                  f"{ours['wide_s']:.1f} s; per epoch {ours['epoch_s']:.1f} s; train {ours['train_s']:.1f} s")
            print(f"        peak RSS {ours['peak_rss_mb']:.0f} MiB (after train {ours['rss_after_train_mb']:.0f}; "
                  f"{ours['rss_base_mb']:.0f} after importing torch and the SDK); "
                  f"log {mb:.0f} MiB + parameters {pb:.0f} MiB; model file {ours['file_bytes'] / 2**20:.1f} MiB")
            print(f"        recommend p50 / p99 ms: known {_fmt_pair(ours['rec_known_ms'])}, new (adapt 10 + top-10) "
                  f"{_fmt_pair(ours['rec_new_ms'])}; ops.policy_topk {_fmt_pair(ours['topk_ms'])}; "
                  f"feedback {_fmt_pair(ours['feedback_ms'])}")
        if "failed" in als or "skipped" in als:
            print(f"  implicit ALS: {als.get('failed', als.get('skipped'))}")
        else:
            print(f"  implicit ALS (128 factors): per iteration {als['iter_s']:.2f} s; peak RSS "
                  f"{als['peak_rss_mb']:.0f} MiB; recommend known p50 / p99 {_fmt_pair(als['rec_known_ms'])} ms")
            if "failed" not in ours:
                print(f"  ratios ours / ALS: per epoch vs per iteration {ours['epoch_s'] / als['iter_s']:.1f}, "
                      f"peak RSS {ours['peak_rss_mb'] / als['peak_rss_mb']:.2f}, recommend known p50 "
                      f"{ours['rec_known_ms'][0] / als['rec_known_ms'][0]:.2f}")
    print("\n== issue 16 targets")
    ok_rows = [(ni, nn, o) for ni, nn, o, _ in rows if "failed" not in o]
    for ni, nn, o in ok_rows:
        need = 2 * (o["log_bytes"] + o["param_bytes"]) / 2**20
        print(f"  [{'PASS' if o['peak_rss_mb'] <= need else 'FAIL'}] {ni:,} x {nn:,}: peak RSS "
              f"{o['peak_rss_mb']:.0f} MiB <= 2 x (log + parameters) = {need:.0f} MiB (above the "
              f"{o['rss_base_mb']:.0f} MiB import baseline: {o['peak_rss_mb'] - o['rss_base_mb']:.0f} MiB)")
        fb = o["feedback_ms"][0]
        print(f"  [{'PASS' if fb <= 1.0 else 'FAIL'}] {ni:,} x {nn:,}: feedback p50 {fb:.3f} ms <= 1 ms")
        if ni >= 10**6:
            r = o["rec_known_ms"][0] / o["topk_ms"][0]
            print(f"  [{'PASS' if r <= 1.2 else 'FAIL'}] {ni:,} items: recommend p50 {o['rec_known_ms'][0]:.3f} ms "
                  f"<= 1.2 x policy_topk {o['topk_ms'][0]:.3f} ms (ratio {r:.2f})")
    if not any(ni >= 10**6 for ni, _, _ in ok_rows):
        print("  [n/a] recommend p50 <= 1.2 x policy_topk at 1M items: no 1M-item size in this run")
    by_items: dict = {}
    for ni, nn, o in ok_rows:
        by_items.setdefault(ni, []).append((nn, o["epoch_s"]))
    pairs = [(ni, a, b) for ni, lst in by_items.items() for a, b in zip(sorted(lst), sorted(lst)[1:])]
    pairs += [(None, a, b) for a, b in zip(sorted((nn, o["epoch_s"]) for _, nn, o in ok_rows),
                                          sorted((nn, o["epoch_s"]) for _, nn, o in ok_rows)[1:])
              if not any(p[1] == a and p[2] == b for p in pairs)]
    for ni, (n1, t1), (n2, t2) in pairs:
        g = (t2 / t1) / (n2 / n1) if n2 != n1 else float("nan")
        print(f"  [{'PASS' if g <= 1.1 else 'FAIL'}] per epoch {n1:,} -> {n2:,} interactions"
              f"{'' if ni is None else f' ({ni:,} items)'}: {t1:.1f} -> {t2:.1f} s, growth / linear = {g:.2f} <= 1.1")
    if not pairs:
        print("  [n/a] time per epoch vs interactions: needs two sizes")
    if args.png:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print(f"matplotlib is not installed: no plot written to {args.png}")
            return 0
        fig, ax = plt.subplots(1, 2, figsize=(10, 4))
        for ni in sorted({r[0] for r in ok_rows}):
            pts = sorted((nn, o) for n_i, nn, o in ok_rows if n_i == ni)
            x = [p[0] for p in pts]
            ax[0].loglog(x, [p[1]["epoch_s"] for p in pts], "o-", label=f"ours, {ni:,} items")
            ax[1].loglog(x, [p[1]["peak_rss_mb"] for p in pts], "o-", label=f"ours, {ni:,} items")
            ap_ = sorted((nn, a) for n_i, nn, o, a in rows if n_i == ni and "iter_s" in a)
            if ap_:
                ax[0].loglog([p[0] for p in ap_], [p[1]["iter_s"] for p in ap_], "s--", label=f"ALS/iter, {ni:,} items")
                ax[1].loglog([p[0] for p in ap_], [p[1]["peak_rss_mb"] for p in ap_], "s--",
                             label=f"ALS, {ni:,} items")
        ax[0].set(xlabel="interactions", ylabel="seconds per epoch", title="time")
        ax[1].set(xlabel="interactions", ylabel="peak RSS (MiB)", title="memory")
        for a in ax:
            a.legend(fontsize=7)
            a.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        fig.savefig(args.png, dpi=100)
        print(f"plot written to {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
