"""Serving and training speed of the SDK on MovieLens-100K, beside `implicit`.

Measures (p50 / p90 over repeated calls, one thread by default):

* meta-training time with the default config (full ml-100k);
* ``adapt`` for a new user with 20 support items (default adaptation steps);
* ``recommend`` for one user end to end from a history (``adapt`` + top-10);
* ``recommend`` for one user from a precomputed ``UserState``;
* one online feedback event (hit or miss) of a new user with 10 / 50 events, with the
  reward posterior on and off;
* ``ops.policy_topk`` alone on the deep item table (catalogue x dim of the model), and the
  compiled kernel ``_core.policy_topk`` alone (what ``recommend`` from a state calls once);
* ``implicit``'s ``AlternatingLeastSquares.recommend`` for one user (N=10, filtering the
  user's items) on the same catalogue with ``factors`` = the model's dim, if installed, and
  it beside ``recommend`` from the state in alternating calls (the same load for both).

Each line also gives the p50 of the calling thread's CPU time, which a busy shared machine
inflates much less than the wall clock (time slices taken by other processes).

Usage::

    taskset -c 0 .venv/bin/python bench/bench_recommend.py [--epochs N] [--model FILE] [--save FILE]
                                                           [--threads 1] [--repeats 200]

The load average is printed before and after: on a shared machine, compare numbers measured
in the same run.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import recmeta_sdk as rm  # noqa: E402
from recmeta_sdk import ops  # noqa: E402


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:  # pragma: no cover - not on every platform
        return "n/a"


class _Timing(tuple):
    """(p50, p90) wall-clock ms, with ``.cpu`` the p50 of this thread's CPU time (ms), which a
    busy shared machine inflates much less than the wall clock (time slices lost to others)."""

    cpu: float = float("nan")

    def __str__(self) -> str:
        return f"p50 {self[0]:.3f} ms, p90 {self[1]:.3f} ms (thread CPU p50 {self.cpu:.3f} ms)"


def _timeit(fn, n=200, warm=20):
    for _ in range(warm):
        fn()
    ts, cs = [], []
    for _ in range(n):
        c0 = time.thread_time()
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
        cs.append(time.thread_time() - c0)
    ts = np.array(ts) * 1e3
    out = _Timing((float(np.percentile(ts, 50)), float(np.percentile(ts, 90))))
    out.cpu = float(np.median(cs) * 1e3)
    return out


def _side_by_side(fa, fb, n=200, warm=20):
    """p50 wall ms of fa and fb measured in alternation (call a, call b, ...): the same load."""
    for _ in range(warm):
        fa()
        fb()
    ta, tb = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        fa()
        t1 = time.perf_counter()
        fb()
        tb.append(time.perf_counter() - t1)
        ta.append(t1 - t0)
    return float(np.median(ta) * 1e3), float(np.median(tb) * 1e3)


def _feedback_timings(model, rng, repeats: int) -> None:
    """One online feedback event (``OnlineStore._apply``, a pure function of the user's current
    version and the event: what ``Recommender.feedback`` runs per event) for a new user who
    already has n events, half of them misses, with the reward posterior on (the default)
    and off (``feedback_posterior=0``: the encoder step alone)."""
    import copy

    from recmeta_sdk import online

    off = copy.copy(model)
    off.config = copy.copy(model.config)
    off.config.feedback_posterior = 0.0
    for label, m in (("posterior on", model), ("posterior off", off)):
        for n in (10, 50):
            st = online.OnlineStore(m, known_users=False)
            items = rng.choice(m.n_items, n + 2, replace=False)
            st.feedback([("x", m.item_ids[i], float(j % 2), 0.5) for j, i in enumerate(items[:n])])
            cur = st.current("x")
            for r, kind in ((1.0, "hit"), (0.0, "miss")):
                t = _timeit(lambda: st._apply(cur, "x", int(items[n]), r), repeats)
                print(f"feedback, one {kind} after {n} events ({label}): {t}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, help="override the default epochs (the training time is then not the default's)")
    ap.add_argument("--model", help="load this model file instead of training")
    ap.add_argument("--save", help="save the trained model here")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=200)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    ds = rm.datasets.load("ml-100k")
    print(f"ml-100k: {len(ds.interactions):,} interactions; torch threads {torch.get_num_threads()}; "
          f"backend {rm.ops.backends.resolve(None, 'cpu')}; load average {_load()}")
    if args.model:
        model = rm.load(args.model)
    else:
        cfg = {} if args.epochs is None else {"epochs": args.epochs}
        t0 = time.perf_counter()
        model = rm.train(ds.interactions, users=ds.users, items=ds.items, config=cfg)
        secs = time.perf_counter() - t0
        label = "defaults" if args.epochs is None else f"defaults but epochs={args.epochs}"
        print(f"meta-training ({label}): {secs:.1f} s  [target < 300 s with the defaults]")
        if args.save:
            model.save(args.save)
    print(repr(model))
    rng = np.random.default_rng(0)
    support = list(rng.choice(model.item_ids, 20, replace=False))
    t = _timeit(lambda: model.adapt(support), args.repeats)
    print(f"adapt, 20 support items, {model.config.inner_steps} steps: {t}  [target < 20 ms]")
    t = _timeit(lambda: model.recommend(model.adapt(support), k=10), args.repeats)
    print(f"recommend one new user from its history (adapt + top-10): {t}  [target < 2 ms]")
    u0 = int(model.user_ids[0])
    t = _timeit(lambda: model._compute_user_states([u0], [model._known(u0)], None, None), args.repeats)
    print(f"a known user's state from its history (computed once per model, then cached): {t}")
    t = _timeit(lambda: model.recommend(u0, k=10), args.repeats)
    print(f"recommend one known user by id (cached state + top-10, seen excluded): {t}")
    batch = [int(u) for u in model.user_ids[:64]]
    model.recommend(batch, k=10)
    t = _timeit(lambda: model.recommend(batch, k=10), max(10, args.repeats // 10), warm=2)
    print(f"recommend 64 known users by id in one call (cached states): {t}; per user "
          f"{t[0] / len(batch):.3f} ms")
    _feedback_timings(model, rng, args.repeats)
    state = model.adapt(support)
    ts = _timeit(lambda: model.recommend(state, k=10), args.repeats)
    p50s = ts[0]
    print(f"recommend from a precomputed UserState (top-10, seen excluded): {ts}")
    V = model._V
    U = torch.from_numpy(state.vector[None, :].copy())
    t = _timeit(lambda: ops.policy_topk(U, V, 10, bias=model._bias), args.repeats)
    print(f"ops.policy_topk alone, {V.shape[0]} items x {V.shape[1]} dims: {t}")
    from recmeta_sdk.ops._native import core

    _core = core()

    Un, Vn, bn = U.numpy(), V.numpy(), model._bias.numpy()
    ex = np.asarray(state.history, np.int64)
    exo = np.array([0, len(ex)], np.int64)
    t = _timeit(lambda: _core.policy_topk(Un, Vn, 10, bias=bn, exclude_offsets=exo, exclude_ids=ex),
                args.repeats)
    print(f"_core.policy_topk alone (seen excluded): {t}")
    try:
        import implicit
        import scipy.sparse as sp
        from threadpoolctl import threadpool_limits
    except ImportError as e:
        print(f"implicit: not installed ({e}); skipped")
        return 0
    idx_u = model.user_map.to_index(ds.interactions["user"].to_numpy())
    idx_i = model.item_map.to_index(ds.interactions["item"].to_numpy())
    X = sp.csr_matrix((np.ones(len(idx_u), np.float32), (idx_u, idx_i)), shape=(len(model.user_ids), model.n_items))
    with threadpool_limits(args.threads):
        als = implicit.cpu.als.AlternatingLeastSquares(factors=model.config.dim, iterations=2, random_state=0,
                                                       num_threads=args.threads)
        als.fit(X, show_progress=False)
        row = X[0]
        ti = _timeit(lambda: als.recommend(0, row, N=10, filter_already_liked_items=True), args.repeats)
        pa, pb = _side_by_side(lambda: model.recommend(state, k=10),
                               lambda: als.recommend(0, row, N=10, filter_already_liked_items=True), args.repeats)
        ka, kb = _side_by_side(lambda: model.recommend(u0, k=10),
                               lambda: als.recommend(0, row, N=10, filter_already_liked_items=True), args.repeats)
        rows = X[:64]
        ba, bb = _side_by_side(lambda: model.recommend(batch, k=10),
                               lambda: als.recommend(np.arange(64), rows, N=10, filter_already_liked_items=True),
                               max(10, args.repeats // 10))
    print(f"implicit {implicit.__version__} ALS recommend one user ({model.n_items} items x {model.config.dim} factors, "
          f"seen filtered): {ti}")
    print(f"ratio ours(UserState) / implicit: {p50s / ti[0]:.2f}  (ours scores a {state.vector.shape[0]}-dim deep state"
          f"{' plus the wide item-to-item part' if model._net.has_wide else ''})")
    print(f"side by side, alternating calls: ours(UserState) p50 {pa:.3f} ms, implicit p50 {pb:.3f} ms, "
          f"ratio {pa / pb:.2f}")
    print(f"side by side, a known user by id: ours p50 {ka:.3f} ms, implicit p50 {kb:.3f} ms, ratio {ka / kb:.2f}")
    print(f"side by side, 64 known users by id in one call: ours p50 {ba:.3f} ms, implicit p50 {bb:.3f} ms, "
          f"ratio {ba / bb:.2f}")
    print(f"load average at the end: {_load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
