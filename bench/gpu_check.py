"""GPU check helpers for bench/gpu_check.sh (needs an NVIDIA GPU, PyTorch with CUDA, Triton).

  python bench/gpu_check.py --sanitize   one short call of every CUDA kernel (run it under
                                         compute-sanitizer)
  python bench/gpu_check.py --bench      time Triton, CUDA and PyTorch; print a table last

Timings: CUDA events around each call after warm-up, median of the repeats; the kernels
are timed on validated inputs (``_gpu._policy_run`` / ``_embedding_bag_run``: the host-side
checks, which synchronise, are left out, as PyTorch's ops have none). "%bw" is the
kernel's compulsory traffic (table bytes it must read: the whole item table for policy
scoring, the gathered rows for the embedding bag) over its time, as a fraction of the
measured device-to-device copy bandwidth (bytes read + written per second of a 1 GiB
copy_). PyTorch baselines: F.embedding_bag on the float16 table (it has no row-wise
int8), and float16 matmul + topk for policy scoring (the int8 rows are timed against the
same float16 baseline).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from recmeta_sdk.ops import _gpu  # noqa: E402
from recmeta_sdk.ops import backends
from recmeta_sdk.ops import reference as R  # noqa: E402

BUDGET_S = float(os.environ.get("RECMETA_BENCH_BUDGET_S", "300"))


def timeit(fn, warmup=2, iters=7):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)  # ms


def copy_bandwidth():
    x = torch.empty(1 << 28, dtype=torch.float32, device="cuda")  # 1 GiB
    y = torch.empty_like(x)
    ms = timeit(lambda: y.copy_(x), warmup=3, iters=10)
    return 2 * x.numel() * 4 / (ms * 1e-3)  # bytes / s


def make_table(N, d, fmt, g):
    w = torch.randn(N, d, device="cuda", generator=g)
    if fmt == "fp16":
        t = R.QuantizedTable("fp16", w.half())
    else:
        t = R.quantize(w, "int8")
    del w
    return t


def table_bytes_per_row(d, fmt):
    return d * 2 if fmt == "fp16" else d + 8


def gpu_backends():
    return [b for b in ("triton", "cuda") if backends.available(b)]


def sanitize():
    """One small call of each CUDA kernel (and the Triton ones, harmless under memcheck)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    dev = "cuda"
    N, d, B = 1013, 37, 9
    w = torch.randn(N, d, device=dev, generator=g)
    tabs = {"fp32": w, "fp16": R.QuantizedTable("fp16", w.half()), "int8": R.quantize(w, "int8")}
    lens = torch.randint(0, 6, (B,), device=dev, generator=g)
    off = torch.zeros(B + 1, dtype=torch.int64, device=dev)
    off[1:] = torch.cumsum(lens, 0)
    idx = torch.randint(0, N, (int(off[-1]),), device=dev, generator=g)
    psw = torch.rand(idx.numel(), device=dev, generator=g)
    exc = (torch.tensor([0, 2, 2, 3, 3, 3, 3, 3, 3, 5]), torch.tensor([1, 2, 3, 4, 5]))
    cand = (torch.arange(0, 10 * (B + 1), 10), torch.randint(0, N, (10 * B,), generator=torch.Generator().manual_seed(2)))
    for be in ["cuda"]:
        for fmt, t in tabs.items():
            _gpu.gpu_embedding_bag(t, idx, off, psw, "mean", backend=be)
            _gpu.gpu_policy_topk(torch.randn(B, d, device=dev, generator=g), t, 5, exclude=exc, backend=be)
            _gpu.gpu_policy_sample(torch.randn(B, d, device=dev, generator=g), t, 5, 7, candidates=cand,
                                   backend=be)
        for opt in ("sgd", "rowwise_adagrad"):
            for det in (True, False):
                ww = w.clone()
                st = torch.zeros(N, device=dev)
                _gpu.gpu_embedding_bag_backward(ww, idx, off, torch.randn(B, d, device=dev, generator=g), psw,
                                                "sum", opt, 0.1, 1e-8, st, backend=be, deterministic=det)
    torch.cuda.synchronize()
    print("sanitize: every CUDA kernel ran once")


def bench(out_json=None):
    t0 = time.time()
    bw = copy_bandwidth()
    print(f"device: {torch.cuda.get_device_name()}, copy bandwidth {bw / 1e9:.0f} GB/s", flush=True)
    g = torch.Generator(device="cuda").manual_seed(1)
    rows = []
    impls = gpu_backends()
    try:
        _bench_rows(rows, impls, bw, g, t0)
    except _Stopped:
        rows.append(dict(op="-", impl="stopped (SIGTERM)", N=0, d=0, B=0, fmt="-"))
    _print_table(rows, bw, out_json)


class _Stopped(Exception):
    pass


def _on_term(signum, frame):
    raise _Stopped()


def _bench_rows(rows, impls, bw, g, t0):
    k = 10
    for N in (1_000_000, 10_000_000):
        for d in (64, 128):
            for fmt in ("fp16", "int8"):
                if time.time() - t0 > BUDGET_S:
                    rows.append(dict(op="-", impl="skipped (time budget)", N=N, d=d, B=0, fmt=fmt))
                    continue
                tab = make_table(N, d, fmt, g)
                half = tab.data if fmt == "fp16" else None
                for B in (1, 64, 1024):
                    u = torch.randn(B, d, device="cuda", generator=g)
                    tb = N * table_bytes_per_row(d, fmt)
                    base = None
                    if fmt == "fp16":
                        uh = u.half()
                        try:
                            base = timeit(lambda: torch.topk(uh @ half.T, k, dim=1), 1, 3)
                        except torch.OutOfMemoryError:
                            base = None
                        rows.append(dict(op="policy_topk", impl="torch", N=N, d=d, B=B, fmt=fmt, ms=base,
                                         bw=None if base is None else tb / (base * 1e-3) / bw))
                    torch_ms = base if base is not None else _last_torch(rows, "policy_topk", N, d, B)
                    for be in impls:
                        ms = timeit(lambda: _gpu._policy_run(be, u, tab, k, None, None, None, None, 1.0), 1,
                                    3 if B == 1024 else 5)
                        rows.append(dict(op="policy_topk", impl=be, N=N, d=d, B=B, fmt=fmt, ms=ms,
                                         bw=tb / (ms * 1e-3) / bw,
                                         speedup=None if torch_ms is None else torch_ms / ms))
                    # embedding bag: B bags of 32 rows
                    L = 32
                    idx = torch.randint(0, N, (B * L,), device="cuda", generator=g)
                    off = torch.arange(0, B * L + 1, L, device="cuda")
                    eb = B * L * table_bytes_per_row(d, fmt)
                    tms = None
                    if fmt == "fp16":
                        tms = timeit(lambda: torch.nn.functional.embedding_bag(idx, half, off[:-1], mode="sum"))
                        rows.append(dict(op="embedding_bag", impl="torch", N=N, d=d, B=B, fmt=fmt, ms=tms,
                                         bw=eb / (tms * 1e-3) / bw))
                    tms = tms if tms is not None else _last_torch(rows, "embedding_bag", N, d, B)
                    for be in impls:
                        ms = timeit(lambda: _gpu._embedding_bag_run(be, [tab], idx, off, None, "sum"))
                        rows.append(dict(op="embedding_bag", impl=be, N=N, d=d, B=B, fmt=fmt, ms=ms,
                                         bw=eb / (ms * 1e-3) / bw,
                                         speedup=None if tms is None else tms / ms))
                    print(f"  done N={N} d={d} {fmt} B={B} ({time.time() - t0:.0f} s)", flush=True)
                tab = half = None  # free the table before the next one
                torch.cuda.empty_cache()


def _print_table(rows, bw, out_json):
    if out_json:
        with open(out_json, "w") as f:
            json.dump(dict(copy_bandwidth_GBps=bw / 1e9, rows=rows), f, indent=1)
    print()
    print(f"{'op':14s} {'impl':7s} {'N':>9s} {'d':>4s} {'B':>5s} {'fmt':5s} {'ms':>9s} {'%bw':>6s} {'xtorch':>7s}")
    for r in rows:
        ms, frac, sp = r.get("ms"), r.get("bw"), r.get("speedup")
        ms_s = "-" if ms is None else "%9.3f" % ms
        bw_s = "-" if frac is None else "%5.1f%%" % (100 * frac)
        sp_s = "-" if sp is None else "%6.2fx" % sp
        print("%-14s %-7s %9d %4d %5d %-5s %9s %6s %7s" % (r["op"], r["impl"], r["N"], r["d"], r["B"], r["fmt"],
                                                          ms_s, bw_s, sp_s))


def _last_torch(rows, op, N, d, B):
    for r in reversed(rows):
        if r["op"] == op and r["impl"] == "torch" and r["N"] == N and r["d"] == d and r["B"] == B:
            return r.get("ms")
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sanitize", action="store_true")
    ap.add_argument("--bench", action="store_true")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device visible to PyTorch")
    if a.sanitize:
        sanitize()
    if a.bench:
        signal.signal(signal.SIGTERM, _on_term)  # `timeout` still gets the table printed
        bench(a.json)


if __name__ == "__main__":
    main()
