"""Model-file header bound: 16 MB hostile headers and large id maps, format 3 against format 2.

Prints:
1. the time ``rm.load`` takes to refuse 16 MB files whose header is the attack (the cases of
   ``tests/test_model_file_mutations.py``), under the default limits (the 1 MiB header cap,
   checked from the length prefix) and under ``max_header_bytes=LEGACY_MAX_HEADER`` (what a
   file of format 1 or 2 with large id maps may need: the checks on the raw bytes, then
   parsing): median and worst of ``--repeats`` runs per case;
2. for id maps of ``--ids`` int and string ids: the header bytes and the time to encode /
   decode and check them as format 2 (JSON in the header) and format 3 (tensors), and the ratio.

    python bench/bench_model_file.py [--repeats 20] [--ids 1000000]
"""
from __future__ import annotations

import argparse
import json
import struct
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import recmeta_sdk as rm  # noqa: E402
from recmeta_sdk.model import io as rio  # noqa: E402
from recmeta_sdk.api import _ids_from_json, _ids_to_json  # noqa: E402


def hostile_cases(M: int) -> dict:
    mt = json.dumps({"format": "recmeta-model", "format_version": 2, "sha256": "0" * 64})
    return {
        "nested [": b"[" * M,
        "nested inside an object": b'{"a":' + b"[" * (M - 6) + b"}",
        "one huge integer": b'{"a":' + b"1" * (M - 6) + b"}",
        "one huge float": b'{"a":1.' + b"1" * (M - 8) + b"}",
        "8M integers": b'{"a":[' + b",".join([b"0"] * (M // 2 - 4)) + b"]}",
        "5M strings": b'{"a":[' + b",".join([b'""'] * (M // 3 - 4)) + b"]}",
        "one long string": b'{"a":"' + b"x" * (M - 8) + b'"}',
        "whitespace": b"{" + b" " * (M - 2) + b"}",
        "escapes": b'{"a":"' + b'\\"' * (M // 2 - 4) + b'"}',
        "metadata of 4M ints": json.dumps({"__metadata__": {"recmeta": mt[:-1] + ', "x": ['
                                                            + ",".join(["0"] * (M // 4)) + "]}"}}).encode(),
    }


def time_rejections(d: Path, repeats: int, limits) -> dict:
    M = 16 * 2**20
    out = {}
    for label, head in hostile_cases(M).items():
        p = d / "big.recmeta"
        p.write_bytes(struct.pack("<Q", len(head)) + head + b"\0" * max(0, M - len(head)))
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            try:
                rm.load(p, limits=limits)
                raise SystemExit(f"{label}: loaded")
            except rm.ModelFileError:
                pass
            ts.append(time.perf_counter() - t0)
        out[label] = (float(np.median(ts)), max(ts))
    return out


def time_it(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def id_maps(n: int) -> None:
    lim = rio.LoadLimits(max_items=10**9, max_users=10**9)
    rng = np.random.default_rng(7)
    ints = rng.choice(10**12, size=n, replace=False).astype(np.int64)
    strs = np.asarray([f"usér-{x:x}" for x in ints], dtype=object)
    print(f"\nid maps of {n} ids (best of 3): header bytes, encode + decode + checks")
    print(f"{'ids':8s} {'v2 header':>12s} {'v3 header':>10s} {'v2 s':>8s} {'v3 s':>8s} {'v2/v3':>7s}")
    for label, ids in (("int", ints), ("str", strs)):
        def v2():
            raw = json.dumps(_ids_to_json(ids), ensure_ascii=False).encode()
            d = rio._bounded_json(raw, "metadata", "bench", lim, 10**9)
            _ids_from_json(d, "bench", "ids", 10**9, lim)
            return len(raw)

        def v3():
            kind, t = rio.list_to_tensors("ids", ids if label == "int" else list(ids))
            rio.list_from_tensors(t, "ids", kind, "bench", 10**9, lim)
            return len(json.dumps({"kind": kind}))

        hb2, hb3 = v2(), v3()
        t2, t3 = time_it(v2), time_it(v3)
        print(f"{label:8s} {hb2:12d} {hb3:10d} {t2:8.3f} {t3:8.3f} {t2 / t3:7.2f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--ids", type=int, default=1_000_000)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        default = time_rejections(Path(d), a.repeats, None)
        legacy = time_rejections(Path(d), a.repeats, rio.LoadLimits(max_header_bytes=rio.LEGACY_MAX_HEADER))
    print(f"16 MB hostile headers, {a.repeats} loads each: median / worst ms")
    print(f"{'case':26s} {'default (1 MiB cap)':>22s} {'max_header_bytes=1e8':>22s} {'worst ratio':>12s}")
    for label in default:
        (m1, w1), (m2, w2) = default[label], legacy[label]
        print(f"{label:26s} {m1 * 1e3:10.3f} / {w1 * 1e3:8.3f} {m2 * 1e3:10.1f} / {w2 * 1e3:8.1f} {w2 / w1:12.0f}")
    print(f"{'worst':26s} {max(w for _, w in default.values()) * 1e3:21.3f} "
          f"{max(w for _, w in legacy.values()) * 1e3:22.1f}")
    id_maps(a.ids)


if __name__ == "__main__":
    main()
