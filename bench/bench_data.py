"""Data-layer benchmark: ingest, clean, id-map and build training arrays for N interactions.

Synthetic log: string user ids ("u0000001"), string item ids ("i000001"), int64 Unix
timestamps and float rewards, with ~1% exact duplicates, a few missing / non-finite /
out-of-range rows and one bot user, so every cleaning rule does real work.

Timed stages: ingest (Parquet file -> DataFrame), clean (all rules), encode (dense ids + id
maps), sequences (last-L history index of every row, then a padded batch), CSR of
positives, negatives (one sampled negative per row, avoiding positives), and targets
(multi-hot full-catalogue targets for a batch of users). Peak memory is the process's
peak resident set size (``resource.getrusage``), which includes making the synthetic
data. Targets: under 60 s for the timed stages and under 3 GB peak for 10 million rows.
The log is written to a temporary Parquet file first (not timed); ingest reads it back.

Usage: python bench/bench_data.py [--n 10000000] [--users 200000] [--items 50000] [--L 50]
"""
from __future__ import annotations

import argparse
import gc
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def peak_rss_gb() -> float:
    """Peak resident set size of this process in GB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1 << 30) if sys.platform == "darwin" else r / (1 << 20)


def make_log(n: int, n_users: int, n_items: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    users = rng.integers(0, n_users, n)
    # popularity-skewed items
    items = np.minimum((rng.pareto(1.2, n) * n_items / 20).astype(np.int64), n_items - 1)
    ts = 1_600_000_000 + rng.integers(0, 365 * 86400, n)
    reward = rng.integers(1, 6, n).astype(np.float64)
    # messiness: duplicates, missing / inf / out-of-range rewards, one bot
    k = n // 100
    dup_src = rng.integers(0, n, k)
    dup_dst = rng.integers(0, n, k)
    users[dup_dst], items[dup_dst], ts[dup_dst], reward[dup_dst] = (
        users[dup_src], items[dup_src], ts[dup_src], reward[dup_src])
    reward[rng.integers(0, n, 1000)] = np.nan
    reward[rng.integers(0, n, 1000)] = np.inf
    reward[rng.integers(0, n, 1000)] = 9.0
    users[rng.integers(0, n, 20_000)] = n_users  # a bot with ~20k events
    user_names = pa.array([f"u{j:07d}" for j in range(n_users + 1)])
    item_names = pa.array([f"i{j:06d}" for j in range(n_items)])
    user_col = pa.DictionaryArray.from_arrays(pa.array(users.astype(np.int32)), user_names).cast(pa.string())
    item_col = pa.DictionaryArray.from_arrays(pa.array(items.astype(np.int32)), item_names).cast(pa.string())
    return pa.table({"user": user_col, "item": item_col, "timestamp": ts, "reward": reward})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000_000)
    ap.add_argument("--users", type=int, default=200_000)
    ap.add_argument("--items", type=int, default=50_000)
    ap.add_argument("--L", type=int, default=50)
    ap.add_argument("--batch", type=int, default=4096)
    args = ap.parse_args(argv)

    from recmeta_sdk import data

    t0 = time.perf_counter()
    table = make_log(args.n, args.users, args.items)
    t_gen = time.perf_counter() - t0
    print(f"generated {args.n:,} interactions ({args.users:,} users, {args.items:,} items) in {t_gen:.1f} s, "
          f"peak RSS so far {peak_rss_gb():.2f} GB", flush=True)

    times = {}

    cpu = {}

    def stage(name, fn):
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        times[name] = time.perf_counter() - t
        cpu[name] = time.process_time() - c
        print(f"  {name:<10} {times[name]:7.2f} s wall {cpu[name]:7.2f} s CPU   peak RSS {peak_rss_gb():.2f} GB",
              flush=True)
        return out

    with tempfile.TemporaryDirectory(prefix="recmeta-bench-") as tmp:
        path = Path(tmp) / "log.parquet"
        pq.write_table(table, path)
        table = None  # free the source
        gc.collect()
        df = stage("ingest", lambda: data.read_interactions(path))
    cleaned, report = stage("clean", lambda: data.clean(df, reward_range=(1, 5), max_events_per_user=5000))
    df = None
    gc.collect()
    enc = stage("encode", lambda: data.encode(cleaned))
    cleaned = None
    gc.collect()
    seqs = stage("sequences", lambda: data.build_sequences(enc.item_ids, enc.user_ids, enc.timestamps, L=args.L))
    batch_rows = np.random.default_rng(1).integers(0, len(enc), args.batch)
    hist = stage("batch", lambda: seqs.padded(batch_rows))
    pos = stage("csr", lambda: data.user_item_csr(enc.user_ids, enc.item_ids, enc.n_users))
    neg = stage("negatives", lambda: data.sample_negatives(enc.user_ids, enc.n_items, 1, positives=pos, seed=0))
    tgt = stage("targets", lambda: data.full_catalogue_targets(pos, enc.user_ids[batch_rows[:256]], enc.n_items))
    total = sum(times.values())
    print(report)
    print(f"encoded: {len(enc):,} rows, {enc.n_users:,} users, {enc.n_items:,} items; "
          f"history batch {hist.shape}, negatives {neg.shape}, targets {tgt.shape}")
    print(f"TOTAL {total:.1f} s wall, {sum(cpu.values()):.1f} s CPU (target < 60 s), "
          f"peak RSS {peak_rss_gb():.2f} GB (target < 3 GB); "
          f"1-min load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    return 0 if total < 60 and peak_rss_gb() < 3 else 1


if __name__ == "__main__":
    raise SystemExit(main())
