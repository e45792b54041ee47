"""Parquet ingest for training: the pandas path against the streamed one, side by side.

A seeded log of ``--rows`` interactions (string user ids, int64 item ids, float32 rewards,
datetime timestamps, two context columns) is written as a hive-partitioned Parquet folder
(``day=D/part-K.parquet``, row groups of ``--row-group`` rows; not timed). Then, each in a fresh
child process so that each peak RSS is its own:

* ``pandas``: what ``recmeta_sdk.train`` did with a Parquet path before: one DataFrame of the
  whole log (``data.read_interactions``, i.e. ``pandas.read_parquet``), then
  ``training.loop.prepare``;
* ``stream``: ``data.scan_parquet`` (record batches into int32 ids, float32 rewards, int64
  times) then ``training.loop.prepare_codes``: what ``train`` does now;
* ``rank 0 of 2``: the same scan of one rank's share (``rank=0, world_size=2``): the decoding
  one rank does in distributed training (the id merge and the gather of the arrays are not in
  it).

Printed per path: seconds, peak RSS above the interpreter with the imports, the tracemalloc
peak (numpy / pandas allocations; Arrow's own pool is not in it, so RSS is the figure to
compare), and the ratios to the pandas path. Both paths give the same prepared arrays
(checked by ``tests/test_data_stream.py``).

Usage: python bench/bench_ingest.py [--rows 3000000] [--users 150000] [--items 50000]
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


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _cur_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def write_log(folder: str, rows: int, users: int, items: int, row_group: int, seed: int = 0) -> None:
    """A seeded log as ``day=D/part-K.parquet`` files (7 days, files of at most 1M rows)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    done, k = 0, 0
    while done < rows:
        m = min(1_000_000, rows - done)
        day = k % 7
        t = pa.table({
            "user": pa.array([f"u{x:07d}" for x in rng.integers(0, users, m)]),
            "item": rng.integers(0, items, m).astype(np.int64),
            "reward": rng.integers(1, 6, m).astype(np.float32),
            "timestamp": pa.array(np.datetime64("2026-01-01", "s") + rng.integers(0, 86400 * 90, m),
                                  pa.timestamp("s")),
            "ctx_a": rng.random(m),
            "ctx_b": rng.integers(0, 1000, m),
        })
        d = os.path.join(folder, f"day={day}")
        os.makedirs(d, exist_ok=True)
        pq.write_table(t, os.path.join(d, f"part-{k}.parquet"), row_group_size=row_group)
        done += m
        k += 1


def child(mode: str, folder: str) -> dict:
    import tracemalloc

    from recmeta_sdk import data
    from recmeta_sdk.training import loop

    base = _cur_mb()
    tracemalloc.start()
    t = time.perf_counter()
    if mode == "pandas":
        df = data.read_interactions(folder)
        prep = loop.prepare(df, np.sort(df["item"].unique()))
        del df
    else:
        rank, world = (0, 2) if mode == "rank0of2" else (0, 1)
        a = data.scan_parquet(folder, rank=rank, world_size=world)
        prep = loop.prepare_codes(a.user_map.ids, a.item_map.ids, a.users, a.items, a.timestamps, a.rewards,
                                  a.propensities) if mode == "stream" else None
        rows = len(a)
        del a
    secs = time.perf_counter() - t
    _, tm_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    out = {"seconds": secs, "peak_rss_mb": _rss_mb() - base, "tracemalloc_peak_mb": tm_peak / 2**20}
    out["rows"] = int(prep.offsets[-1]) if prep is not None else rows
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=3_000_000)
    ap.add_argument("--users", type=int, default=150_000)
    ap.add_argument("--items", type=int, default=50_000)
    ap.add_argument("--row-group", type=int, default=128_000)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "log")
        t = time.perf_counter()
        write_log(folder, args.rows, args.users, args.items, args.row_group)
        size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(folder) for f in fs)
        print(f"log: {args.rows:,} rows, {args.users:,} users, {args.items:,} items; {size / 2**20:.0f} MiB of "
              f"Parquet (written in {time.perf_counter() - t:.1f} s)")
        res = {}
        for mode in ("pandas", "stream", "rank0of2"):
            p = subprocess.run([sys.executable, __file__, "--child", mode, folder], capture_output=True, text=True,
                               check=False)
            if p.returncode != 0:
                print(f"{mode}: failed\n{p.stderr[-2000:]}")
                continue
            res[mode] = json.loads(p.stdout.strip().splitlines()[-1])
    ref = res.get("pandas")
    print(f"{'path':<12}{'rows':>11}{'seconds':>10}{'peak RSS MiB':>14}{'tracemalloc MiB':>17}"
          f"{'time / pandas':>15}{'RSS / pandas':>14}")
    for mode, r in res.items():
        rt = f"{r['seconds'] / ref['seconds']:.2f}x" if ref else "-"
        rr = f"{r['peak_rss_mb'] / ref['peak_rss_mb']:.2f}x" if ref else "-"
        print(f"{mode:<12}{r['rows']:>11,}{r['seconds']:>10.2f}{r['peak_rss_mb']:>14.0f}"
              f"{r['tracemalloc_peak_mb']:>17.0f}{rt:>15}{rr:>14}")


if __name__ == "__main__":
    main()
