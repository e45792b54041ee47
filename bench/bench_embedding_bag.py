"""Benchmark of the fused embedding bag against PyTorch (and FBGEMM's CPU TBE when it loads).

Usage::

    python bench/bench_embedding_bag.py            # full grid
    python bench/bench_embedding_bag.py --quick    # reduced grid (a minute or two)

Everything runs in one process on the same seeded random data, for 1 and then 2 threads
(``_core.set_num_threads`` and ``torch.set_num_threads``, and the process pinned to that many
CPUs). Each case times ours and the peers interleaved, ``--reps`` times, and reports the best
time of each (the machine is shared; the best is the least disturbed), the ratio peer / ours
(> 1: we are faster) and our fraction of the memory-bandwidth floor (bytes that must be read
over the measured streaming-read bandwidth; 100% = at the floor).

Forward cases cycle through ``--index-sets`` (16) sets of random ids, each callable starting at
a different place in the cycle: every call reads ids the call before did not, as batch after
batch of training does, so rows of a table larger than the caches come from memory. With
``--index-sets 1`` every call reads the same ids and their rows stay in the 300 MB L3 between
calls, which measures the caches rather than the gather. The tables are allocated by torch (4
KiB pages where transparent huge pages are ``madvise``, as for an ``nn.Embedding`` weight);
each row read from memory then also costs a page walk.

Cases
-----
* forward vs ``torch.nn.functional.embedding_bag`` (sum, mean): N in {100k, 1M}, d in {32, 64,
  128}, B in {64, 1024, 8192}, bags of 15..25 (about 20) ids;
* float16 and row-wise int8 tables vs our float32 (and torch's float32);
* TBE over 8 tables in one call vs 8 torch calls (and + torch.cat, the same output), and vs
  fbgemm-gpu-cpu's ``SplitTableBatchedEmbeddingBagsCodegen`` if it imports;
* fused backward + SGD / row-wise Adagrad vs torch's sparse-gradient backward + optimiser step
  (``F.embedding_bag`` on a sparse=True weight, then ``torch.optim.SGD`` / ``Adagrad``), and
  fbgemm's TBE with its fused optimiser, at B = 8192, d = 64;
* the same over 8 tables in one call (a list of tables, and the one-table ``table_offsets``
  form) vs torch over 8 sparse weights and fbgemm's 8-table TBE (``--only tbe_backward``).
"""
from __future__ import annotations

import argparse
import itertools
import os
import platform
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from recmeta_sdk import _core, ops  # noqa: E402

SEED = 20261129


def best_times(fns, reps, budget_s=0.4, max_reps=300):
    """Interleaved timing: the best of at least `reps` runs of each callable, in ms. Fast cases
    get more runs (up to `max_reps`, within about `budget_s` per callable): on a shared machine
    the best of many is the least disturbed run."""
    first = []
    for f in fns:
        t = time.perf_counter()
        f()
        first.append(time.perf_counter() - t)
    reps = max(reps, min(max_reps, int(budget_s / max(max(first), 1e-6))))
    best = [float("inf")] * len(fns)
    for _ in range(reps):
        for i, f in enumerate(fns):
            t = time.perf_counter()
            f()
            best[i] = min(best[i], time.perf_counter() - t)
    return [b * 1e3 for b in best]


def measure_bandwidth(threads):
    """Streaming-read bandwidth in bytes/s: the best of a few sums over a 256 MiB float32 array."""
    x = torch.from_numpy(np.random.default_rng(SEED).random(64 << 20, dtype=np.float32))
    torch.set_num_threads(threads)
    t = min(best_times([lambda: x.sum()], 5)[0], best_times([lambda: np.add.reduce(x.numpy())], 3)[0]
            if threads == 1 else float("inf"))
    return x.numel() * 4 / (t * 1e-3)


def make_bags(rng, n, b, lo=15, hi=25):
    lens = rng.integers(lo, hi + 1, size=b)
    off = torch.from_numpy(np.concatenate([[0], np.cumsum(lens)]).astype(np.int64))
    idx = torch.from_numpy(rng.integers(0, n, size=int(off[-1])).astype(np.int64))
    return idx, off


def _torch_bag(w, bags, mode="sum"):
    idx, off = bags
    return F.embedding_bag(idx, w, off, mode=mode, include_last_offset=True)


def rotations(sets, n):
    """One endless iterator over `sets` per timed callable, callable j starting j/n of the way
    round: every callable reads the same index sets in the same order, and the set a callable
    reads was last read (by any of them) several calls before, not by the callable just before
    it (which would hand it the rows it just brought into the caches)."""
    k = len(sets)
    return [itertools.cycle(sets[(j * k) // n:] + sets[:(j * k) // n]) for j in range(n)]


def fmt_case(name, ours, peers, floor_ms=None):
    parts = [f"{name:44s} ours {ours:8.3f} ms"]
    for pname, pt in peers:
        if pt is None:
            continue
        parts.append(f"{pname} {pt:8.3f} ms (x{pt / ours:5.2f})")
    if floor_ms is not None:
        parts.append(f"floor {floor_ms:7.3f} ms ({100 * floor_ms / ours:4.0f}% of floor)")
    print(" | ".join(parts), flush=True)


def load_fbgemm():
    try:
        import fbgemm_gpu  # noqa: F401
        from fbgemm_gpu.split_embedding_configs import EmbOptimType, SparseType
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import PoolingMode
        from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
            ComputeDevice,
            EmbeddingLocation,
            SplitTableBatchedEmbeddingBagsCodegen,
        )
    except Exception as e:  # noqa: BLE001 - any failure to load means: no peer
        print(f"note: fbgemm-gpu-cpu did not load beside torch {torch.__version__} ({type(e).__name__}: {e}); "
              "skipping the FBGEMM TBE peer")
        return None

    def make(tables, optimizer="sgd", lr=0.01, eps=1e-8):
        opt = {"sgd": EmbOptimType.EXACT_SGD, "rowwise_adagrad": EmbOptimType.EXACT_ROWWISE_ADAGRAD}[optimizer]
        m = SplitTableBatchedEmbeddingBagsCodegen(
            [(w.shape[0], w.shape[1], EmbeddingLocation.HOST, ComputeDevice.CPU) for w in tables],
            optimizer=opt, learning_rate=lr, eps=eps, pooling_mode=PoolingMode.SUM,
            weights_precision=SparseType.FP32)
        with torch.no_grad():
            for dst, src in zip(m.split_embedding_weights(), tables):
                dst.copy_(src)
        return m

    return make


def pin(threads):
    cpus = sorted(os.sched_getaffinity(0)) if not hasattr(pin, "all") else pin.all
    pin.all = cpus
    os.sched_setaffinity(0, set(cpus[:threads]))
    torch.set_num_threads(threads)
    _core.set_num_threads(threads)


def bench_forward(args, threads, bw, tables_by_n):
    print(f"\n== forward vs torch.nn.functional.embedding_bag ({threads} thread(s)) ==")
    rng = np.random.default_rng(SEED + 1)
    Ns = [100_000] if args.quick else [100_000, 1_000_000]
    ds = [64] if args.quick else [32, 64, 128]
    Bs = [64, 1024, 8192]
    for N in Ns:
        for d in ds:
            w = tables_by_n[N][d]
            for B in Bs:
                sets = [make_bags(rng, N, B) for _ in range(args.index_sets)]
                nnz = np.mean([i.numel() for i, _ in sets])
                nbytes = nnz * (d * 4 + 8) + (B + 1) * 8 + B * d * 4
                floor = nbytes / bw * 1e3
                for mode in ("sum", "mean"):
                    c0, c1 = rotations(sets, 2)
                    ours, tor = best_times([
                        lambda: ops.embedding_bag(w, *next(c0), mode=mode),
                        lambda: _torch_bag(w, next(c1), mode),
                    ], args.reps)
                    fmt_case(f"N={N:>7d} d={d:3d} B={B:4d} {mode:4s}", ours, [("torch", tor)], floor)


def bench_quantized(args, threads, bw, tables_by_n):
    print(f"\n== float16 / int8 tables vs float32 ({threads} thread(s), sum) ==")
    rng = np.random.default_rng(SEED + 2)
    N = 100_000 if args.quick else 1_000_000
    for d in ([64] if args.quick else [64, 128]):
        w = tables_by_n[N][d]
        h = ops.quantize(w, "fp16")
        q = ops.quantize(w, "int8")
        for B in (1024, 8192):
            sets = [make_bags(rng, N, B) for _ in range(args.index_sets)]
            nnz = np.mean([i.numel() for i, _ in sets])
            c = rotations(sets, 4)
            f32, f16, i8, tor = best_times([
                lambda: ops.embedding_bag(w, *next(c[0])),
                lambda: ops.embedding_bag(h, *next(c[1])),
                lambda: ops.embedding_bag(q, *next(c[2])),
                lambda: _torch_bag(w, next(c[3])),
            ], args.reps)
            for name, t, bpe in (("fp32", f32, 4), ("fp16", f16, 2), ("int8", i8, 1)):
                nbytes = nnz * (d * bpe + 8 + (8 if name == "int8" else 0)) + B * d * 4
                fmt_case(f"N={N:>7d} d={d:3d} B={B:4d} {name}", t,
                         [("ours fp32", f32), ("torch fp32", tor)], nbytes / bw * 1e3)


def bench_tbe(args, threads, bw, fbgemm):
    print(f"\n== TBE: 8 tables in one call vs 8 torch calls ({threads} thread(s), sum) ==")
    rng = np.random.default_rng(SEED + 3)
    T = 8
    N = 50_000 if args.quick else 250_000
    d = 64
    tables = [torch.from_numpy(rng.random((N, d), dtype=np.float32)).clone() for _ in range(T)]
    fb = fbgemm(tables) if fbgemm is not None else None
    whole = torch.cat(tables)
    cum = torch.tensor([t * N for t in range(T + 1)], dtype=torch.int64)
    for B in ((1024, 8192) if not args.quick else (8192,)):
        sets = []  # (per-table bags, all ids, all offsets)
        for _ in range(args.index_sets if B <= 1024 else max(2, args.index_sets // 4)):
            parts = [make_bags(rng, N, B) for _ in range(T)]
            lens = torch.cat([p[1][1:] - p[1][:-1] for p in parts])
            sets.append((parts, torch.cat([p[0] for p in parts]),
                         torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(lens, 0)])))
        nnz = np.mean([x[1].numel() for x in sets])
        c = rotations(sets, 5 if fb is not None else 4)
        fns = [
            lambda: ops.embedding_bag(tables, *next(c[0])[1:]),
            lambda: [_torch_bag(tables[t], p) for t, p in enumerate(next(c[1])[0])],
            lambda: torch.cat([_torch_bag(tables[t], p) for t, p in enumerate(next(c[2])[0])], dim=1),
            lambda: ops.embedding_bag(whole, *next(c[3])[1:], table_offsets=cum),
        ]
        if fb is not None:
            def run_fb():
                with torch.no_grad():
                    return fb(*next(c[4])[1:])
            fns.append(run_fb)
        times = best_times(fns, args.reps)
        idx, off = sets[0][1], sets[0][2]
        nbytes = nnz * (d * 4 + 8) + B * T * d * 4
        peers = [("8 torch calls", times[1]), ("+cat", times[2]), ("ours table_offsets", times[3])]
        if fb is not None:
            peers.append(("fbgemm TBE", times[4]))
            if threads == 1 and B == 8192:
                got = ops.embedding_bag(tables, idx, off)
                with torch.no_grad():
                    err = float((got - fb(idx, off)).abs().max())
                print(f"   (check: max |ours - fbgemm| = {err:.2e})")
        fmt_case(f"T={T} N={N} d={d} B={B:4d}", times[0], peers, nbytes / bw * 1e3)


def bench_backward(args, threads, bw, fbgemm):
    print(f"\n== fused backward + optimiser vs torch sparse backward + optimiser step ({threads} thread(s)) ==")
    rng = np.random.default_rng(SEED + 4)
    N = 100_000 if args.quick else 1_000_000
    d, B = 64, 8192
    w0 = torch.from_numpy(rng.random((N, d), dtype=np.float32)).clone()
    idx, off = make_bags(rng, N, B)
    g = torch.from_numpy(rng.standard_normal((B, d)).astype(np.float32))
    lr = 0.01
    for optimizer in ("sgd", "rowwise_adagrad"):
        ours_w = w0.clone()
        state = torch.zeros(N, dtype=torch.float32)

        def ours():
            ops.embedding_bag_backward(ours_w, idx, off, g, optimizer=optimizer, lr=lr, state=state)

        param = torch.nn.Parameter(w0.clone())
        topt = torch.optim.SGD([param], lr=lr) if optimizer == "sgd" else torch.optim.Adagrad([param], lr=lr)
        holder = {}

        def torch_fwd():
            holder["out"] = F.embedding_bag(idx, param, off, include_last_offset=True, sparse=True)

        def torch_bwd_step():
            holder["out"].backward(g)
            topt.step()
            topt.zero_grad(set_to_none=True)

        # forward (untimed) before each timed torch backward+step
        best_ours, best_torch = float("inf"), float("inf")
        ours()
        torch_fwd()
        torch_bwd_step()
        for _ in range(max(3, args.reps // 2)):
            t = time.perf_counter()
            ours()
            best_ours = min(best_ours, time.perf_counter() - t)
            torch_fwd()
            t = time.perf_counter()
            torch_bwd_step()
            best_torch = min(best_torch, time.perf_counter() - t)
        peers = [("torch " + ("SGD" if optimizer == "sgd" else "Adagrad"), best_torch * 1e3)]
        if fbgemm is not None:
            fb = fbgemm([w0], optimizer=optimizer, lr=lr)
            best_fb = float("inf")
            for _ in range(max(3, args.reps // 2)):
                out = fb(idx, off)
                t = time.perf_counter()
                out.backward(g)
                best_fb = min(best_fb, time.perf_counter() - t)
            peers.append(("fbgemm TBE fused", best_fb * 1e3))
        # floor: read the ids and the gradient rows of the occurrences, read+write the touched rows
        uniq = int(torch.unique(idx).numel())
        nbytes = idx.numel() * (8 + d * 4) + uniq * d * 4 * 2
        fmt_case(f"{optimizer:15s} N={N} d={d} B={B}", best_ours * 1e3, peers, nbytes / bw * 1e3)
    fwd_ours, fwd_torch = best_times([lambda: ops.embedding_bag(w0, idx, off),
                                      lambda: F.embedding_bag(idx, w0, off, include_last_offset=True)], args.reps)
    print(f"   (the forward alone at this size: ours {fwd_ours:.3f} ms, torch {fwd_torch:.3f} ms)")


def bench_tbe_backward(args, threads, bw, fbgemm):
    print(f"\n== TBE fused backward + optimiser: 8 tables in one call ({threads} thread(s)) ==")
    rng = np.random.default_rng(SEED + 5)
    T = 8
    N = 50_000 if args.quick else 250_000
    d, B = 64, 8192
    w0 = [torch.from_numpy(rng.random((N, d), dtype=np.float32)).clone() for _ in range(T)]
    parts = [make_bags(rng, N, B) for _ in range(T)]
    idx = torch.cat([p[0] for p in parts])
    lens = torch.cat([p[1][1:] - p[1][:-1] for p in parts])
    off = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(lens, 0)])
    g = torch.from_numpy(rng.standard_normal((B, T * d)).astype(np.float32))
    cum = torch.tensor([t * N for t in range(T + 1)], dtype=torch.int64)
    lr = 0.01
    reps = max(3, args.reps // 2)
    for optimizer in ("sgd", "rowwise_adagrad"):
        ours_w = [w.clone() for w in w0]
        states = [torch.zeros(N, dtype=torch.float32) for _ in range(T)]
        whole = torch.cat(w0)
        whole_state = torch.zeros(T * N, dtype=torch.float32)

        def ours():
            ops.embedding_bag_backward(ours_w, idx, off, g, optimizer=optimizer, lr=lr, state=states)

        def ours_whole():
            ops.embedding_bag_backward(whole, idx, off, g, optimizer=optimizer, lr=lr, state=whole_state,
                                       table_offsets=cum)

        params = [torch.nn.Parameter(w.clone()) for w in w0]
        topt = torch.optim.SGD(params, lr=lr) if optimizer == "sgd" else torch.optim.Adagrad(params, lr=lr)
        holder = {}

        def torch_fwd():
            holder["out"] = torch.cat([F.embedding_bag(p[0], params[t], p[1], include_last_offset=True, sparse=True)
                                       for t, p in enumerate(parts)], dim=1)

        def torch_bwd_step():
            holder["out"].backward(g)
            topt.step()
            topt.zero_grad(set_to_none=True)

        fb = fbgemm(w0, optimizer=optimizer, lr=lr) if fbgemm is not None else None
        best = {"ours": float("inf"), "whole": float("inf"), "torch": float("inf"), "fb": float("inf")}
        for _ in range(reps):
            t0 = time.perf_counter()
            ours()
            best["ours"] = min(best["ours"], time.perf_counter() - t0)
            t0 = time.perf_counter()
            ours_whole()
            best["whole"] = min(best["whole"], time.perf_counter() - t0)
            torch_fwd()
            t0 = time.perf_counter()
            torch_bwd_step()
            best["torch"] = min(best["torch"], time.perf_counter() - t0)
            if fb is not None:
                out = fb(idx, off)
                t0 = time.perf_counter()
                out.backward(g)
                best["fb"] = min(best["fb"], time.perf_counter() - t0)
        peers = [("table_offsets form", best["whole"] * 1e3),
                 ("torch 8x " + ("SGD" if optimizer == "sgd" else "Adagrad"), best["torch"] * 1e3)]
        if fb is not None:
            peers.append(("fbgemm TBE fused", best["fb"] * 1e3))
        uniq = sum(int(torch.unique(p[0]).numel()) for p in parts)
        nbytes = idx.numel() * (8 + d * 4) + uniq * d * 4 * 2
        fmt_case(f"{optimizer:15s} T={T} N={N} d={d} B={B}", best["ours"] * 1e3, peers, nbytes / bw * 1e3)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="reduced grid")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions per case")
    ap.add_argument("--index-sets", type=int, default=16,
                    help="index sets per case, cycled so that each call reads ids other than the "
                         "call before (as training does, batch after batch: the rows come from "
                         "memory); 1 = the same ids every call (rows stay cached between calls)")
    ap.add_argument("--only", default="forward,quantized,tbe,backward,tbe_backward", help="which sections to run")
    args = ap.parse_args()
    if args.reps is None:
        args.reps = 7 if args.quick else 15
    sections = set(args.only.split(","))
    print(f"recmeta bench_embedding_bag: python {platform.python_version()}, torch {torch.__version__}, "
          f"numpy {np.__version__}")
    print(f"core: CPU kernels '{_core.cpu_isa()}', OpenMP {'on' if _core.has_openmp() else 'off'}; "
          f"CPUs available: {len(os.sched_getaffinity(0))}; best of {args.reps} interleaved runs per case; "
          f"{args.index_sets} index set(s) per case, cycled")
    fbgemm = load_fbgemm() if sections & {"tbe", "backward", "tbe_backward"} else None
    rng = np.random.default_rng(SEED)
    tables_by_n = {}
    if sections & {"forward", "quantized"}:
        for N in ([100_000] if args.quick else [100_000, 1_000_000]):
            base = rng.random((N, 128), dtype=np.float32)
            # torch-allocated (64-byte aligned, like an nn.Embedding weight); numpy's own
            # allocations are only 16-byte aligned, which splits every 64-byte row load
            tables_by_n[N] = {d: torch.from_numpy(base[:, :d]).clone(memory_format=torch.contiguous_format)
                              for d in (32, 64, 128)}
            del base
    for threads in [int(x) for x in args.threads.split(",")]:
        pin(threads)
        bw = measure_bandwidth(threads)
        print(f"\n######## threads = {threads} (core {_core.get_num_threads()}, torch {torch.get_num_threads()}); "
              f"measured streaming read bandwidth {bw / 1e9:.1f} GB/s ########")
        if "forward" in sections:
            bench_forward(args, threads, bw, tables_by_n)
        if "quantized" in sections:
            bench_quantized(args, threads, bw, tables_by_n)
        if "tbe" in sections:
            bench_tbe(args, threads, bw, fbgemm)
        if "backward" in sections:
            bench_backward(args, threads, bw, fbgemm)
        if "tbe_backward" in sections:
            bench_tbe_backward(args, threads, bw, fbgemm)


if __name__ == "__main__":
    main()
