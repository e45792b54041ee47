"""Torch-free serving (recmeta_sdk.serving) beside the full model, on MovieLens-100K.

Prints, for a model saved with ``serving=True``:

* the cost of the serving section: save time and file size with and without it;
* a fresh process's start-up: import + load + the first ``recommend`` of a known user, wall
  time and peak RSS, for ``recmeta_sdk.serving.load`` and for ``recmeta_sdk.load`` (each run
  ``--starts`` times in alternation, medians);
* per-call latency of ``recommend(user_id)`` and of a 64-user batch, both models measured in
  alternation in one process, with the ratio; and that the two return the same ids and scores.

    python bench/bench_serving_start.py [--epochs 3] [--model m.recmeta]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import recmeta_sdk as rm  # noqa: E402
from bench_recommend import _side_by_side  # noqa: E402  (p50 wall ms of two callables in alternation)
from recmeta_sdk import serving  # noqa: E402

_CHILD = """
import resource, sys, time
t0 = time.perf_counter()
if {light}:
    from recmeta_sdk import serving
    m = serving.load({path!r})
else:
    import recmeta_sdk as rm
    m = rm.load({path!r})
r = m.recommend({user!r}, k=10)
t = time.perf_counter() - t0
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")]  # ru_maxrss survives exec
rss = int(hwm[0].split()[1]) / 1024 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(t, rss, "torch" in sys.modules)
"""


def _start(path: str, user, light: bool) -> tuple:
    code = _CHILD.format(light=light, path=path, user=user)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if out.returncode:
        raise RuntimeError(out.stderr)
    t, rss, torch_loaded = out.stdout.split()
    return float(t), float(rss), torch_loaded == "True"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=3, help="training epochs (serving cost does not depend on them)")
    ap.add_argument("--model", help="a saved model file to use instead of training")
    ap.add_argument("--starts", type=int, default=5)
    args = ap.parse_args(argv)
    ds = rm.datasets.load("ml-100k")
    model = rm.load(args.model) if args.model else rm.train(ds.interactions, users=ds.users, items=ds.items,
                                                             config={"epochs": args.epochs})
    print(repr(model), f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    with tempfile.TemporaryDirectory() as d:
        plain, full = os.path.join(d, "plain.recmeta"), os.path.join(d, "serving.recmeta")
        t0 = time.perf_counter()
        model.save(plain)
        t1 = time.perf_counter()
        model.save(full, serving=True)
        t2 = time.perf_counter()
        print(f"save: {1e3 * (t1 - t0):.0f} ms plain, {1e3 * (t2 - t1):.0f} ms with serving=True; file "
              f"{os.path.getsize(plain) / 2**20:.2f} MiB plain, {os.path.getsize(full) / 2**20:.2f} MiB with it")
        user = model.user_ids[0].item()
        light, heavy = [], []
        for _ in range(args.starts):
            light.append(_start(full, user, True))
            heavy.append(_start(full, user, False))
        lt, lr = np.median([x[0] for x in light]), np.median([x[1] for x in light])
        ht, hr = np.median([x[0] for x in heavy]), np.median([x[1] for x in heavy])
        print(f"fresh process to the first recommendation (median of {args.starts}): serving.load {1e3 * lt:.0f} ms, "
              f"peak RSS {lr:.0f} MiB, torch imported: {light[0][2]}; rm.load {1e3 * ht:.0f} ms, peak RSS {hr:.0f} MiB, "
              f"torch imported: {heavy[0][2]}; ratio {ht / lt:.1f}x time, {hr / lr:.1f}x memory")
        sm = serving.load(full)
        fm = rm.load(full)
        users = [u.item() for u in model.user_ids[:64]]
        a, b = fm.recommend(users, k=10), sm.recommend(users, k=10)
        same = np.array_equal(a.ids, b.ids) and np.array_equal(a.scores, b.scores)
        print(f"same ids and scores for 64 users: {same}")
        ka, kb = _side_by_side(lambda: fm.recommend(user, k=10), lambda: sm.recommend(user, k=10), n=300)
        print(f"recommend(user_id), alternating calls: full model p50 {ka:.3f} ms, serving p50 {kb:.3f} ms, "
              f"ratio serving/full {kb / ka:.2f}")
        ba, bb = _side_by_side(lambda: fm.recommend(users, k=10), lambda: sm.recommend(users, k=10), n=60)
        print(f"recommend(64 users), alternating calls: full model p50 {ba:.3f} ms, serving p50 {bb:.3f} ms, "
              f"ratio serving/full {bb / ba:.2f}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
