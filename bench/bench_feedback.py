"""Cost of one online feedback event and the online store's memory per user, beside `implicit`.

On MovieLens-100K (the SDK's model trained with ``--epochs``, or ``--model FILE``), for users who
already have n = 1, 10, 100 feedback events (a session of that length), known (training) users
and new users, it times one more event through ``OnlineStore.feedback`` (warm path: the user's
state exists), hits (reward 1) and misses (reward 0) separately. Since the deferred online
state (``OnlineUser``), an event records what it changes (a hit its gradient step) and the
encoder, the step and the item bias (reward posterior and in-session evidence) are computed at
the next read of the state; the bench times that read too (``current(user).state``, what
``recommend`` does first) and the sum of the two. The events are given

* as a list of plain tuples (the fast path, no pandas), and
* as a one-row DataFrame (the pandas path every call took before),

and prints p50 / p99 of the wall clock and the p50 of the calling thread's CPU time (which a busy
shared machine inflates less), the ratio of the two paths, and beside them ``implicit``'s
``AlternatingLeastSquares.partial_fit_users`` for one user with the same n + 1 items (its
per-event fold-in) on the same catalogue with ``factors`` = the model's dim. Then the store's
memory per user (``OnlineUser.nbytes``: what the backend keeps) against the item-length
per-user state kept before (a dense N-float bias, plus the N-float wide part recommend cached
in it).

    PYTHONPATH=. taskset -c 0 .venv/bin/python bench/bench_feedback.py [--epochs 1] [--model FILE]
        [--save FILE] [--users 12] [--events 6]

The load average is printed: on a shared machine compare numbers of the same run.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import recmeta_sdk as rm


def _pct(xs, q):
    return float(np.percentile(np.asarray(xs) * 1e3, q)) if len(xs) else float("nan")


def _time(fn):
    c0 = time.thread_time()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0, time.thread_time() - c0


def _line(label, wall, cpu):
    return (f"{label:<44} p50 {_pct(wall, 50):7.3f} ms  p99 {_pct(wall, 99):7.3f} ms  "
            f"cpu p50 {_pct(cpu, 50):7.3f} ms  (n={len(wall)})")


def main(argv=None) -> int:
    from threadpoolctl import threadpool_limits

    for peer in ("scipy.sparse", "implicit"):  # the peer and the BLAS it loads, before the limits are set
        try:
            importlib.import_module(peer)
        except ImportError:
            print(f"{peer}: not installed (its timings are skipped)")

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--model", help="load this model instead of training")
    ap.add_argument("--save", help="save the trained model here")
    ap.add_argument("--users", type=int, default=12, help="users per (n, kind)")
    ap.add_argument("--events", type=int, default=6, help="timed events per user (alternately hit / miss)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    # numpy's BLAS too (the reward posterior's solve): a multi-threaded BLAS on a small matrix
    # spins its threads against the other processes of a shared machine
    with threadpool_limits(args.threads):
        return _run(args)


def _run(args) -> int:
    print(f"load average before: {os.getloadavg()}")
    ds = rm.datasets.load("ml-100k")
    if args.model:
        model = rm.load(args.model)
    else:
        t0 = time.time()
        model = rm.train(ds.interactions, config={"epochs": args.epochs}, progress=False)
        print(f"trained ({args.epochs} epoch(s)) in {time.time() - t0:.1f}s")
        if args.save:
            model.save(args.save)
    print(f"{model}; torch threads {torch.get_num_threads()}")
    rng = np.random.default_rng(0)
    N = model.n_items
    known_pool = [u for u in model.user_ids.tolist()]
    rng.shuffle(known_pool)
    ours: dict = {}
    mem: dict = {}
    for n in (1, 10, 100):
        for kind in ("known", "new"):
            fast_w, fast_c, slow_w, slow_c = {"hit": [], "miss": []}, {"hit": [], "miss": []}, \
                {"hit": [], "miss": []}, {"hit": [], "miss": []}
            sizes = []
            read_w, read_c = {"hit": [], "miss": []}, {"hit": [], "miss": []}
            for path in ("fast", "slow"):
                st = model.online_store()
                for s in range(args.users):
                    user = known_pool.pop() if kind == "known" else f"new-{n}-{s}-{path}"
                    items = rng.choice(N, n + args.events, replace=False)
                    ids = model.item_ids[items]
                    # the session so far (not timed): ~30% hits
                    st.feedback([(user, int(ids[j]), float(rng.random() < 0.3)) for j in range(n)])
                    for j in range(args.events):
                        r = 1.0 if j % 2 == 0 else 0.0
                        ev = [(user, int(ids[n + j]), r)]
                        if path == "slow":
                            ev = pd.DataFrame(ev, columns=["user", "item", "reward"])
                        w, c = _time(lambda st=st, ev=ev: st.feedback(ev))
                        key = "hit" if r > 0 else "miss"
                        (fast_w if path == "fast" else slow_w)[key].append(w)
                        (fast_c if path == "fast" else slow_c)[key].append(c)
                        if path == "fast":
                            # the next read of the state (what the next recommend does first):
                            # the deferred step and the item bias are computed here
                            w, c = _time(lambda st=st, user=user: st.current(user).state)
                            read_w[key].append(w)
                            read_c[key].append(c)
                    if path == "fast":
                        cur = st.current(user)
                        corr = cur.correction.nbytes if cur.correction is not None else 0
                        sizes.append((cur.nbytes, cur.nbytes - corr + 8 * N))
            for key in ("hit", "miss"):
                print(_line(f"n={n:>3} {kind:<5} {key:<4} tuples (fast path)", fast_w[key], fast_c[key]))
                print(_line(f"n={n:>3} {kind:<5} {key:<4} DataFrame (pandas path)", slow_w[key], slow_c[key]))
                print(f"{'':<44} ratio fast / pandas p50: {_pct(fast_w[key], 50) / _pct(slow_w[key], 50):.2f}")
                print(_line(f"n={n:>3} {kind:<5} {key:<4} next state read (deferred)", read_w[key], read_c[key]))
                tot = np.asarray(fast_w[key]) + np.asarray(read_w[key])
                print(_line(f"n={n:>3} {kind:<5} {key:<4} event + next read", tot, np.asarray(fast_c[key]) + np.asarray(read_c[key])))
            ours[(n, kind)] = (_pct(fast_w["hit"], 50), _pct(fast_w["miss"], 50))
            mem[(n, kind)] = np.mean(np.asarray(sizes, np.float64), axis=0)
    # implicit: partial_fit_users for one user with n + 1 items (its per-event fold-in)
    try:
        import implicit
        import scipy.sparse as sp
    except ImportError as e:  # optional peer
        print(f"implicit: not available ({e}); skipped")
        implicit = None
    if implicit is not None:
        log = ds.interactions
        uidx = pd.Index(model.user_ids).get_indexer(log["user"])
        iidx = model.item_positions(log["item"].to_numpy())
        keep = (uidx >= 0) & (iidx >= 0)
        X = sp.csr_matrix((np.ones(int(keep.sum()), np.float32), (uidx[keep], iidx[keep])),
                          shape=(len(model.user_ids), N))
        als = implicit.cpu.als.AlternatingLeastSquares(factors=model.config.dim, iterations=2,
                                                       random_state=0, num_threads=args.threads)
        als.fit(X, show_progress=False)
        for n in (1, 10, 100):
            ws = []
            for s in range(args.users * args.events):
                items = rng.choice(N, n + 1, replace=False)
                row = sp.csr_matrix((np.ones(n + 1, np.float32), (np.zeros(n + 1, int), items)), shape=(1, N))
                uid = int(s % len(model.user_ids))
                w, _ = _time(lambda uid=uid, row=row: als.partial_fit_users([uid], row))
                ws.append(w)
            hit, miss = ours[(n, "known")]
            print(f"implicit {implicit.__version__} ALS partial_fit_users, one user with {n + 1:>3} items: "
                  f"p50 {_pct(ws, 50):.3f} ms p99 {_pct(ws, 99):.3f} ms; ratio ours (known user) / implicit: "
                  f"hit {hit / _pct(ws, 50):.1f}, miss {miss / _pct(ws, 50):.1f}")
    print(f"memory per user in the store (OnlineUser.nbytes) vs the item-length state kept before "
          f"(the same arrays without the sparse coefficients, + 2 x 4 x N = {8 * N} bytes at N = {N}; "
          f"Python id tuples not counted):")
    for (n, kind), (b, before) in mem.items():
        print(f"  n={n:>3} {kind:<5}: {b:9.0f} bytes  (before: {before:9.0f}; ratio before / now {before / b:.1f})")
    print(f"load average after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
