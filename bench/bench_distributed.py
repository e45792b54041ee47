"""Distributed training: samples/s and peak RSS per rank for 1 and 2 processes, side by side.

    python bench/bench_distributed.py [--items 120000] [--users 3000] [--dim 32] [--epochs 1]

One synthetic log (Zipf item popularity, seeded) is trained three ways in one run:

* 1 process, 1 torch thread (``distributed=False``);
* 1 process, 2 torch threads;
* 2 processes (gloo, the torchrun environment, 1 thread each) with the item tables sharded:
  ``table_budget_bytes`` is set to 60% of the tables' id rows, so one rank cannot hold them.

Samples/s is the training samples (users) of every epoch over the wall time of
:func:`recmeta_sdk.training.loop.fit` (its setup included; in the 2-process run the slower
rank's); CPU-s per 1000 samples sums the ranks' process CPU time over the same span (on a
machine shared with other jobs the wall time is noisy, the CPU time less so). Training peak
RSS is each process's high-water mark over ``loop.fit``: ``VmHWM`` reset
(``/proc/self/clear_refs``) when it starts (in the 2-process run the tables are sharded by
then) and read when it returns (before they are gathered back: every rank builds the full
tables before sharding and holds the full model at the end; the process's lifetime peak is
printed beside it). The item tables' bytes per
rank (parameters, gradients and AdamW moments of their id rows) are printed beside it.

TorchRec's table-wise ``DistributedModelParallel`` is run beside them when ``torchrec`` and
``fbgemm_gpu`` import; otherwise the run says so (they are not installed in this project's
environment, and installing them offline was not attempted).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np


def synthetic_log(n_users: int, n_items: int, zipf: float = 1.05, seed: int = 0):
    """A log of ``n_users`` users with 10-60 interactions each over ``n_items`` items of Zipf
    popularity (exponent ``zipf``; repeats of a (user, item) pair dropped), star rewards 1-5 and
    increasing timestamps."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, n_items + 1) ** zipf
    p /= p.sum()
    lens = rng.integers(10, 61, n_users)
    users = np.repeat(np.arange(n_users), lens)
    items = rng.permutation(n_items)[rng.choice(n_items, int(lens.sum()), p=p)]
    log = pd.DataFrame({"user": users, "item": items, "reward": rng.integers(1, 6, len(users)).astype(float),
                        "timestamp": np.arange(len(users))})
    return log.drop_duplicates(["user", "item"]).reset_index(drop=True)


def _vm(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def worker(args) -> dict:
    """One process's run (one rank under the torchrun environment, or the single process)."""
    import torch

    import recmeta_sdk as rm
    from recmeta_sdk.training import distributed as dist
    from recmeta_sdk.training import loop

    torch.set_num_threads(args.threads)
    log = synthetic_log(args.users, args.items, args.zipf)
    cfg = {"epochs": args.epochs, "batch_size": args.batch_size, "dim": args.dim, "hidden": 2 * args.dim,
           "seq_len": 10, "seed": 0, "wide": "none"}  # the wide part is an N x N matrix: not at this scale
    marks = {}
    real_fit = loop.fit

    def fit(*a, **k):  # measure the training (in distributed runs: the tables already sharded)
        marks["hwm_reset"] = _reset_hwm()
        t, c = time.perf_counter(), time.process_time()
        out = real_fit(*a, **k)
        marks["wall"], marks["cpu"] = time.perf_counter() - t, time.process_time() - c
        marks["train_peak"] = _vm("VmHWM")
        return out

    loop.fit = fit
    distributed = False
    n_proc = int(os.environ.get("WORLD_SIZE", "1"))
    n_items = int(log["item"].nunique())  # the catalogue: the items of the log
    if n_proc > 1:
        full = 2 * n_items * args.dim * 4
        distributed = dist.DistributedConfig(table_budget_bytes=int(0.6 * full), timeout_s=600)
    t0 = time.perf_counter()
    model = rm.train(log, config=cfg, distributed=distributed)
    wall = time.perf_counter() - t0
    h = model.history
    n_samples = args.epochs * int(((log.groupby("user").size() >= 2)).sum())
    rank = int(os.environ.get("RANK", "0"))
    per_rank_items = -(-n_items // n_proc) if n_proc > 1 and h.get("distributed", {}).get("sharded") else n_items
    return {"rank": rank, "processes": n_proc, "threads": args.threads, "fit_s": marks["wall"], "train_s": wall,
            "samples_per_s": n_samples / marks["wall"], "n_items": n_items, "cpu_s": marks["cpu"],
            "n_samples": n_samples, "collective_s": h.get("distributed", {}).get("collective_seconds"),
            "sharded": bool(h.get("distributed", {}).get("sharded")),
            "train_peak_rss": marks.get("train_peak") if marks.get("hwm_reset") else None,
            "lifetime_peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            # id rows of the two item tables: parameters, gradients, AdamW's two moments
            "table_bytes": 4 * 2 * per_rank_items * args.dim * 4}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args, n_proc: int, threads: int, out_dir: str) -> list:
    import recmeta_sdk  # the workers import the same package as this process

    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(recmeta_sdk.__file__)))
    port = _free_port()
    procs = []
    for r in range(n_proc):
        env = dict(os.environ, PYTHONPATH=pkg_parent + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   OMP_NUM_THREADS=str(threads))
        if n_proc > 1:
            env.update(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(n_proc), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port))
        out = os.path.join(out_dir, f"p{n_proc}t{threads}r{r}.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", out, "--threads", str(threads),
               "--items", str(args.items), "--users", str(args.users), "--dim", str(args.dim), "--zipf", str(args.zipf),
               "--epochs", str(args.epochs), "--batch-size", str(args.batch_size)]
        procs.append((subprocess.Popen(cmd, env=env), out))
    res = []
    for p, out in procs:
        if p.wait(timeout=args.timeout) != 0:
            raise SystemExit(f"a worker failed (exit {p.returncode})")
        with open(out) as f:
            res.append(json.load(f))
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, default=300_000)
    ap.add_argument("--users", type=int, default=6000)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--zipf", type=float, default=0.5, help="item popularity exponent (flatter: more distinct items)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per launch")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        res = worker(args)
        with open(args.worker, "w") as f:
            json.dump(res, f)
        return 0
    mib = 2.0 ** 20
    print(f"synthetic log: {args.users} users x 10-60 interactions over {args.items} items (Zipf {args.zipf:g}), "
          f"dim {args.dim}, "
          f"{args.epochs} epoch(s), global batch {args.batch_size}, no wide part")
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start "
          f"(shared with other jobs: timings are noisy)")
    with tempfile.TemporaryDirectory() as d:
        runs = [("1 process, 1 thread", _launch(args, 1, 1, d)),
                ("1 process, 2 threads", _launch(args, 1, 2, d)),
                ("2 processes x 1 thread, sharded", _launch(args, 2, 1, d))]
    n = runs[0][1][0]["n_items"]
    print(f"catalogue {n} items: the item tables' id rows are {2 * n * args.dim * 4 / mib:.1f} MiB (x4 with their "
          f"gradients and AdamW moments); the 2-process run's budget is 60% of that, so they are sharded")
    base = runs[0][1][0]["samples_per_s"]
    print(f"{'run':34s} {'samples/s':>10s} {'x 1p1t':>7s} {'CPU-s/1k':>9s} {'rank':>4s} {'train peak RSS':>15s} "
          f"{'lifetime peak':>14s} {'table MiB':>10s} {'in collectives':>16s}")
    for name, res in runs:
        sps = min(r["samples_per_s"] for r in res)  # the slower rank's
        cpu = 1000.0 * sum(r["cpu_s"] for r in res) / res[0]["n_samples"]
        for r in res:
            tp = f"{r['train_peak_rss'] / mib:.0f} MiB" if r["train_peak_rss"] else "n/a"
            coll = f"{r['collective_s']:.1f} of {r['fit_s']:.1f} s" if r["collective_s"] is not None else "-"
            print(f"{name:34s} {sps:10.1f} {sps / base:7.2f} {cpu:9.2f} {r['rank']:4d} {tp:>15s} "
                  f"{r['lifetime_peak_rss'] / mib:11.0f} MiB {r['table_bytes'] / mib:10.1f} {coll:>16s}")
            name = ""
    print("(x 1p1t: samples/s over the 1-process 1-thread run's; CPU-s/1k: CPU seconds of all the run's "
          "processes per 1000 samples; table MiB: the item tables' id rows per process with gradients and "
          "AdamW moments; in collectives: wall time in the collectives, waiting for the other rank included, "
          "of the training's)")
    try:
        import fbgemm_gpu  # noqa: F401
        import torchrec  # noqa: F401
        print("torchrec imports, but its table-wise DMP run is not written yet: no TorchRec numbers")
    except ImportError as e:
        print(f"TorchRec: not run ({e}); torchrec and fbgemm-gpu-cpu are not installed in this environment "
              f"and were not installed offline for this benchmark")
    return 0


if __name__ == "__main__":
    sys.exit(main())
