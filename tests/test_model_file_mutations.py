"""Model-file hardening: a seeded mutation suite over a small model's file, forged files with a
recomputed SHA-256, pathological headers, SIGKILL during save, and the temp-file clean-up.

Every mutant must raise :class:`ModelFileError` or load and then serve, within a time bound.
The figures (cases, escapes, hangs, worst time) are printed (``pytest -s``). Environment:
``RECMETA_MUTATION_SEED`` (default 20261207), ``RECMETA_MUTATION_BOUND_S`` (the per-case bound,
default 1.0 s: a hang detector on a loaded CI machine; the figures report the cases over
100 ms), ``RECMETA_SIGKILL_RUNS`` (default 30; hundreds for a long run).
"""
from __future__ import annotations

import json
import os
import signal
import struct
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import recmeta_sdk as rm
from recmeta_sdk.model import io as rio
from recmeta_sdk import online
from recmeta_sdk.model.io import LoadLimits, ModelFileError

from _model_file_formats import legacy_blob, to_legacy

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SEED = int(os.environ.get("RECMETA_MUTATION_SEED", "20261207"))
BOUND_S = float(os.environ.get("RECMETA_MUTATION_BOUND_S", "1.0"))
SIGKILL_RUNS = int(os.environ.get("RECMETA_SIGKILL_RUNS", "30"))
N_ITEMS, N_USERS = 16, 24


def _tiny_model():
    rng = np.random.default_rng(5)
    rows = [(u, int(i), t, float(rng.integers(1, 6))) for u in range(N_USERS)
            for t, i in enumerate(rng.choice(N_ITEMS, size=5, replace=False))]
    log = pd.DataFrame(rows, columns=["user", "item", "timestamp", "reward"])
    items = pd.DataFrame({"genres": ["a|b" if i % 2 else "c" for i in range(N_ITEMS)],
                          "release_year": [1990 + 2 * i for i in range(N_ITEMS)]},
                         index=pd.Index(range(N_ITEMS), name="item"))
    users = pd.DataFrame({"gender": ["M" if u % 2 else "F" for u in range(N_USERS)]},
                         index=pd.Index(range(N_USERS), name="user"))
    return rm.train(log, users=users, items=items, progress=False,
                    config={"dim": 8, "hidden": 8, "seq_len": 3, "epochs": 1, "heads": 2, "batch_size": 32})


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(model, file bytes, tensors, metadata without digest/format) of a tiny model with feedback."""
    model = _tiny_model()
    model.feedback([(3, 1, 1.0, 0.5, 1.0, 0), (3, 4, 0.0, 0.25, 2.0, 1), ("new", 2, 1.0, 0.5, 3.0, 0)])
    p = tmp_path_factory.mktemp("saved") / "m.recmeta"
    model.save(p)
    tensors, meta = rio.read_model_file(p)
    meta = {k: v for k, v in meta.items() if k not in ("sha256", "format", "format_version")}
    return model, p.read_bytes(), tensors, meta


# ---------------------------------------------------------------------------- file building

def _raw_parts(blob: bytes):
    n = struct.unpack("<Q", blob[:8])[0]
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def _assemble(header, data: bytes) -> bytes:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


_ST = {torch.float32: "F32", torch.float64: "F64", torch.int64: "I64", torch.int32: "I32", torch.bool: "BOOL",
       torch.uint8: "U8"}


def forge(tensors: dict, meta: dict, shapes: dict | None = None, version: int = rio.FORMAT_VERSION) -> bytes:
    """A file with a correctly recomputed SHA-256 (as a forger would write it): tensors laid out
    in name order; ``shapes`` overrides the declared shape of some tensors (any JSON value:
    the digest covers it as written)."""
    meta = dict(meta, format=rio.FORMAT, format_version=version)
    arrays, header, off = {}, {}, 0
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        buf = t.numpy().tobytes()
        shape = (shapes or {}).get(name, list(t.shape))
        arrays[name] = (_ST[t.dtype], shape, memoryview(buf))
        header[name] = {"dtype": _ST[t.dtype], "shape": shape, "data_offsets": [off, off + len(buf)]}
        off += len(buf)
    meta["sha256"] = rio._digest(meta, arrays)
    header["__metadata__"] = {"recmeta": json.dumps(meta, sort_keys=True)}
    return _assemble(header, b"".join(bytes(arrays[n][2]) for n in sorted(arrays)))


# ---------------------------------------------------------------------------- the harness

class _Hang(Exception):
    pass


def _alarm(signum, frame):
    raise _Hang()


class Harness:
    """Runs cases: writes each mutant, loads it, serves it if it loads; keeps the figures."""

    def __init__(self, path: Path, limits: LoadLimits | None = None):
        self.path = path
        self.limits = limits
        self.cases = 0
        self.rejected = 0
        self.loaded = 0
        self.escapes: list = []
        self.hangs: list = []
        self.over_100ms = 0
        self.worst = (0.0, "")  # the load (or rejection) alone
        self.worst_served = (0.0, "")  # load and serve

    def run(self, label: str, blob: bytes) -> None:
        self.path.unlink(missing_ok=True)  # (a new file: much cheaper than truncating one on ext4)
        self.path.write_bytes(blob)
        self.cases += 1
        old = signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, max(BOUND_S * 5, 2.0))  # abort a real hang
        t0 = time.perf_counter()
        t_load = None
        outcome = None
        try:
            m = rm.load(self.path, limits=self.limits)
            t_load = time.perf_counter() - t0
            outcome = "loaded"
            _serve(m)
        except ModelFileError:
            outcome = "rejected" if outcome is None else outcome
        except _Hang:
            outcome = "hang"
        except Exception as e:  # noqa: BLE001 - an escape is what this suite counts
            where = "recommend" if outcome == "loaded" else "load"
            self.escapes.append(f"{label}: {where} raised {type(e).__name__}: {str(e)[:120]}")
            outcome = "escape"
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
        dt = time.perf_counter() - t0
        t_load = dt if t_load is None else t_load  # the load (or rejection) alone
        if outcome == "rejected":
            self.rejected += 1
        elif outcome == "loaded":
            self.loaded += 1
            self.worst_served = max(self.worst_served, (dt, label))
        if dt > BOUND_S or outcome == "hang":
            self.hangs.append(f"{label}: {dt:.2f} s")
        if t_load > 0.1:
            self.over_100ms += 1
        self.worst = max(self.worst, (t_load, label))

    def report(self, title: str) -> str:
        line = (f"{title}: {self.cases} cases, {self.rejected} rejected with ModelFileError, {self.loaded} loaded "
                f"and served, {len(self.escapes)} escapes, {len(self.hangs)} hangs (> {BOUND_S:g} s), "
                f"{self.over_100ms} loads over 100 ms, worst load {self.worst[0] * 1e3:.1f} ms ({self.worst[1]}), "
                f"worst load + serve {self.worst_served[0] * 1e3:.1f} ms ({self.worst_served[1]})")
        print("\n" + line, file=sys.stderr)
        return line

    def check(self, title: str) -> None:
        line = self.report(title)
        assert not self.escapes, line + "\n" + "\n".join(self.escapes[:20])
        assert not self.hangs, line + "\n" + "\n".join(self.hangs[:20])


def _serve(m) -> None:
    """What a host does with a loaded model: known users (one with online feedback), a new user."""
    for u in (0, 3):
        if u in set(m.user_ids.tolist()):
            r = m.recommend(u, k=5)
            assert np.isfinite(r.scores[r.valid]).all(), "non-finite score"
    s = m.adapt([int(m.item_ids[0]), int(m.item_ids[-1])]) if m.item_ids.dtype != object else m.adapt([])
    r = m.recommend(s, k=5)
    assert np.isfinite(r.scores[r.valid]).all(), "non-finite score"
    r, _ = online.recommend(m, "new", k=3)
    assert np.isfinite(r.scores[r.valid]).all(), "non-finite score"


# ---------------------------------------------------------------------------- mutants

def _extreme_ints():
    return [-1, 0, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64, 2**70, 10**7, 10**9, -(2**63) - 1]


_BAD_VALUES = [None, True, 1.5, -1.0, 1e300, -1e300, float("nan"), float("inf"), "x", [], {}, [1, 2]]


def test_mutation_suite(saved, tmp_path):
    """Thousands of seeded mutants: none escapes, none hangs; a file that loads serves."""
    model, blob, tensors, meta = saved
    rng = np.random.default_rng(SEED)
    h = Harness(tmp_path / "mut.recmeta")
    header, data = _raw_parts(blob)
    hlen = struct.unpack("<Q", blob[:8])[0]

    # 1. truncation: at every byte of the length prefix and header (stride 1 up to 1 KiB,
    #    then every 9th), and at random points of the data
    for cut in list(range(0, min(8 + hlen, 1024))) + list(range(1024, 8 + hlen, 9)):
        h.run(f"truncate@{cut}", blob[:cut])
    for cut in rng.integers(8 + hlen, len(blob), 60):
        h.run(f"truncate@{cut}", blob[:int(cut)])

    # 2. byte flips anywhere (one to three bytes per mutant)
    for j in range(500):
        bad = bytearray(blob)
        for pos in rng.integers(0, len(blob), int(rng.integers(1, 4))):
            bad[int(pos)] ^= int(rng.integers(1, 256))
        h.run(f"flip#{j}", bytes(bad))

    # 3. the header's length prefix
    for n in (0, 1, hlen - 1, hlen + 1, len(blob), 2**31, 2**63, 2**64 - 1):
        h.run(f"hlen={n}", struct.pack("<Q", n) + blob[8:])

    # 4. tensor entries edited without recomputing the digest (size fields, dtypes, offsets)
    names = [k for k in header if k != "__metadata__"]
    edits = ([("shape", v) for v in ([2**64], [2**63], [-1], [True, N_ITEMS], [1.5], ["3"], [], [[1]], None,
                                     [2**32, 2**32], [0, 2**62], [10**5000 % 10**30])]
             + [("dtype", v) for v in ("F16", "F64", "I32", "BOOL", ["F32"], None, 7, "")]
             + [("data_offsets", v) for v in ([0, 2**64], [-8, 0], [0], [0, 0, 0], "x", [1.0, 2.0], [True, 5])])
    for name in rng.choice(names, size=min(len(names), 24), replace=False).tolist():
        for field, value in edits:
            hd = json.loads(json.dumps(header))
            hd[name][field] = value
            h.run(f"{name}.{field}={str(value)[:20]}", _assemble(hd, data))
    for name in names[:8]:  # overlapping / shifted offsets
        hd = json.loads(json.dumps(header))
        a, b = hd[name]["data_offsets"]
        hd[name]["data_offsets"] = [a + 4, b + 4]
        h.run(f"{name}.shifted", _assemble(hd, data))

    # 5. pathological JSON: nesting, huge integers, long literals, in the header and the metadata
    for depth in (33, 1000, 200_000):
        h.run(f"header nesting {depth}", _assemble(b'{"a":' + b"[" * depth + b"]" * depth + b"}", data))
        inner = '{"format":"recmeta-model","x":' + "[" * depth + "]" * depth + "}"
        h.run(f"metadata nesting {depth}", _assemble({"__metadata__": {"recmeta": inner}}, data))
    for digits in (21, 400, 5000, 100_000):
        big = "9" * digits
        h.run(f"header int of {digits} digits", _assemble(b'{"a":' + big.encode() + b"}", data))
        h.run(f"float of {digits} digits", _assemble(b'{"a":1.' + big.encode() + b"}", data))
        mt = json.loads(header["__metadata__"]["recmeta"])
        raw = json.dumps(mt).replace('"format_version": 2', '"format_version": ' + big)
        hd = dict(header, __metadata__={"recmeta": raw})
        h.run(f"metadata int of {digits} digits", _assemble(hd, data))
    for junk in (b"", b"{", b"[]", b"null", b'"x"', b"{}", b'{"__metadata__": 5}', b'{"__metadata__": {"recmeta": 5}}',
                 b'{"__metadata__": {"recmeta": "[]"}}', b'\xff\xfe{}', b'{"a": NaN}', b" " * 64 + b"{}"):
        h.run(f"header {junk[:20]!r}", _assemble(junk, data))

    # 6. forged: config values, with the digest recomputed
    cfg = meta["config"]
    special = {"seq_len": [10**7], "hidden": [4 * 10**6], "layers": [10**6], "inner_steps": [10**9, 101],
               "wide_max_items": [10**9, 1e9, 0], "seed": [2**80, 2**64, -(2**63) - 1], "dim": [16, 4, 10**6],
               "heads": [3, 10**6], "temperature": [1e-30, 1e30, 1e-6, 1e-3], "encoder": ["gru", "none", "lstm"],
               "wide": ["none"], "meta": ["none"], "inner_lr": [1e30, 1e12, 2e4, 1e-12], "feedback_window": [10**9]}
    for key in cfg:
        for v in _extreme_ints() + _BAD_VALUES + special.get(key, []):
            m2 = json.loads(json.dumps(meta))
            m2["config"][key] = v
            h.run(f"config.{key}={str(v)[:24]}", forge(tensors, m2))
    for v in ("unknown_key", ""):
        m2 = json.loads(json.dumps(meta))
        m2["config"][v] = 1
        h.run(f"config key {v!r}", forge(tensors, m2))

    # 7. forged: the other metadata fields (format 3; format 2's layout below)
    lt, lm = to_legacy(tensors, meta)
    fn = lm["feature_names"]
    for v in (None, [], ["x"], fn[:-1], fn + ["z"], fn[::-1]):  # format 2 only: format 3 derives them
        h.run(f"v2 feature_names={str(v)[:30]}", forge(lt, dict(lm, feature_names=v), version=2))
    top = {"n_user_feature_rows": _extreme_ints() + _BAD_VALUES + [3 * 10**7, 3e7],
           "reward_scale": _extreme_ints() + _BAD_VALUES + [1e-300, 0.0],
           "feature_names": [None, [], fn],
           "item_schema": [None, 5, [], [{"kind": "cat"}], [{"column": "g", "kind": "multi", "values": [1]}],
                           [{"column": "y", "kind": "num", "edges": [2.0, 1.0]}],
                           [{"column": "e", "kind": "dense", "dim": 10**9, "mean": [], "scale": 1.0}]],
           "user_schema": [None, 5, [], [{"column": "gender", "kind": "cat", "values": ["F", "M", "X"]}]],
           "library_version": [5, "x" * 1000], "torch_version": [[1]],
           "feedback": [None, {}, dict(meta["feedback"], encode="zzz"), dict(meta["feedback"], users=[3, 3]),
                        dict(meta["feedback"], users=[2**70, "new"]), dict(meta["feedback"], users=[True, "new"])]}
    for key, values in top.items():
        for v in values:
            m2 = json.loads(json.dumps(meta))
            m2[key] = v
            h.run(f"{key}={str(v)[:30]}", forge(tensors, m2))
        m2 = {k: x for k, x in meta.items() if k != key}
        h.run(f"no {key}", forge(tensors, m2))
    # the id maps of format 2 (JSON lists in the metadata)
    h.run("format 2, unchanged", forge(lt, lm, version=2))
    for which in ("item_ids", "user_ids"):
        ids = lm[which]["values"]
        for v in ([2**70], [2**63], [True], [1.5], ["s"], [None], [ids[0]]):
            m2 = json.loads(json.dumps(lm))
            m2[which]["values"] = ids[:-1] + v
            h.run(f"v2 {which} last={str(v)[:20]}", forge(lt, m2, version=2))
        for d in (None, [], {"kind": "float", "values": ids}, {"kind": "str", "values": ids},
                  {"kind": "int", "values": ids[:-1]}, {"kind": "int", "values": ids + [10**6]},
                  {"kind": "int", "values": list(range(30_000))}):
            m2 = json.loads(json.dumps(lm))
            m2[which] = d
            h.run(f"v2 {which}={str(d)[:30]}", forge(lt, m2, version=2))
    m2 = json.loads(json.dumps(lm))  # 30,000 item ids and a wide part allowed up to 10**9 items
    m2["item_ids"]["values"] = list(range(30_000))
    m2["config"]["wide_max_items"] = 10**9
    h.run("v2 30000 items, wide_max_items=1e9", forge(lt, m2, version=2))
    for key in ("feature_names", "item_ids"):  # format 3 with format 2's JSON lists, and the reverse
        h.run(f"v3 with v2's {key}", forge(tensors, dict(meta, **{key: lm[key]})))
        h.run(f"v2 with v3's {key}", forge(lt, dict(lm, **{key: meta.get(key)}), version=2))
    h.run("v2 with v3's tensors", forge(tensors, lm, version=2))
    h.run("v3 with v2's layout", forge(lt, lm))
    # the lists of format 3 (tensors): kinds, forged ids, offsets and UTF-8 bytes (digest recomputed)
    for which in ("item_ids", "user_ids"):
        for d in (None, {}, {"kind": "float"}, {"kind": "str"}, {"kind": "mixed"}, {"kind": "int", "x": 1},
                  {"kind": "int", "values": []}):
            m2 = json.loads(json.dumps(meta))
            m2[which] = d
            h.run(f"{which}={str(d)[:30]}", forge(tensors, m2))
        ids = tensors[f"lists.{which}.int"]
        for label, v in (("duplicate", torch.cat([ids[:-1], ids[:1]])), ("30000", torch.arange(30_000)),
                         ("2**62", torch.cat([ids[:-1], torch.tensor([2**62])]))):
            h.run(f"{which} {label}", forge(dict(tensors, **{f"lists.{which}.int": v}), meta))
        kind, t = rio.list_to_tensors(which, [str(x) for x in ids.tolist()], kind="str")
        t2 = {k: v for k, v in tensors.items() if not k.startswith(f"lists.{which}.")}
        m2 = dict(meta, **{which: {"kind": "str"}})
        h.run(f"{which} as strings", forge(dict(t2, **t), m2))  # loads: a model of string ids
    m2 = json.loads(json.dumps(meta))
    m2["config"]["wide_max_items"] = 10**9
    h.run("30000 items, wide_max_items=1e9", forge(dict(tensors, **{"lists.item_ids.int": torch.arange(30_000)}), m2))
    str_lists = sorted(k[:-len(".utf8")] for k in tensors if k.startswith("lists.") and k.endswith(".utf8"))
    assert "lists.feedback_users" in str_lists and "lists.item_schema.0.values" in str_lists
    for base in str_lists:
        buf, off = tensors[base + ".utf8"], tensors[base + ".offsets"]
        for j in range(40):  # random bytes (mostly invalid UTF-8) at random places
            b2 = buf.clone()
            for pos in rng.integers(0, len(b2), int(rng.integers(1, 4))):
                b2[int(pos)] = int(rng.integers(0, 256))
            h.run(f"{base}.utf8 bytes#{j}", forge(dict(tensors, **{base + ".utf8": b2}), meta))
        for j in range(20):  # offsets: permuted, shifted, out of range, wrapping int64
            o2 = off.clone()
            if j % 4 == 0 and len(o2) > 2:
                o2[1:-1] = o2[1:-1][torch.from_numpy(rng.permutation(len(o2) - 2))]
            elif j % 4 == 1:
                o2[int(rng.integers(0, len(o2)))] += int(rng.integers(-3, 4))
            elif j % 4 == 2:
                o2[int(rng.integers(0, len(o2)))] = int(rng.choice([-(2**63), 2**63 - 1, -1, 2**40]))
            else:
                o2 = torch.cat([o2[:1], torch.tensor([2**63 - 1, -(2**63) + 8]), o2[1:]])
            h.run(f"{base}.offsets #{j}", forge(dict(tensors, **{base + ".offsets": o2}), meta))
        n = len(off) - 1  # as many 2-byte characters, each string boundary inside one
        o2 = torch.arange(0, 2 * n + 1, 2)
        o2[1:-1] += 1
        b2 = torch.tensor(list(("é" * n).encode()), dtype=torch.uint8)
        h.run(f"{base} 2-byte chars split", forge(dict(tensors, **{base + ".utf8": b2, base + ".offsets": o2}), meta))
    for v in (1, 3, 0, -1):
        h.run(f"format_version={v}", forge(tensors, meta, version=v))

    # 8. forged: tensor values, shapes and dtypes, with the digest recomputed
    for name, t in sorted(tensors.items()):
        variants = []
        if t.dtype.is_floating_point and t.numel():
            for v in (float("nan"), float("inf"), -float("inf"), 1e38, -1e38, 1e7):
                x = t.clone()
                x.view(-1)[int(rng.integers(0, t.numel()))] = v
                variants.append((f"={v}", x))
        if t.dtype == torch.int64 and t.numel():
            for v in (-1, 2**62, -(2**62), 10**6, int(t.max()) + 1):
                x = t.clone()
                x.view(-1)[int(rng.integers(0, t.numel()))] = v
                variants.append((f"={v}", x))
        variants += [("float64", t.to(torch.float64)), ("int32", t.to(torch.int32)), ("bool", t.to(torch.bool)),
                     ("0-d", t.reshape(-1)[:1].reshape(()) if t.numel() else torch.zeros(()))]
        if t.dim():
            variants += [("row dropped", t[:-1].clone()), ("row added", torch.cat([t, t[-1:]]) if len(t) else t),
                         ("2-D", t.reshape(1, *t.shape).clone())]
        for label, x in variants:
            t2 = dict(tensors)
            t2[name] = x.contiguous()
            h.run(f"{name} {label}", forge(t2, meta))
        t2 = {k: v for k, v in tensors.items() if k != name}
        h.run(f"no {name}", forge(t2, meta))
        if t.dim() and t.numel():  # the declared shape is a JSON value the digest covers
            for shp in ([True] + list(t.shape[1:]), [float(t.shape[0])] + list(t.shape[1:]), [str(t.shape[0])]):
                h.run(f"{name} shape {shp}", forge(tensors, meta, shapes={name: shp}))
    t2 = dict(tensors, extra=torch.zeros(3))
    h.run("extra tensor", forge(t2, meta))
    # a forged, well-formed file: the same model, its digest recomputed, loads and serves
    h.run("recomputed, unchanged", forge(tensors, meta))
    assert h.loaded >= 1
    h.check("model-file mutation suite")
    assert h.cases >= 3000


def test_pathological_16mb_files_are_rejected_fast(tmp_path):
    """16 MB files whose header is the attack: rejected with ModelFileError, each in a bounded time.
    Under the default limits the header length alone refuses them (max_header_bytes = 1 MiB,
    before a byte of the header is read); with the bound that files of format 1 and 2 may need
    (LEGACY_MAX_HEADER) the checks on the raw bytes refuse them before or while parsing."""
    M = 16 * 2**20
    mt = json.dumps({"format": "recmeta-model", "format_version": 2, "sha256": "0" * 64})
    cases = {
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
        "shape 2**64": json.dumps({"t": {"dtype": "F32", "shape": [2**64], "data_offsets": [0, 4]},
                                   "__metadata__": {"recmeta": mt}}).encode() + b" " * (M // 2),
    }
    h = Harness(tmp_path / "big.recmeta")
    legacy = Harness(tmp_path / "big.recmeta", LoadLimits(max_header_bytes=rio.LEGACY_MAX_HEADER))
    for label, head in cases.items():
        blob = _assemble(head, b"\0" * max(0, M - len(head)))
        h.run(label, blob)
        legacy.run(label, blob)
    h.check("16 MB pathological files")
    legacy.check(f"16 MB pathological files, max_header_bytes={rio.LEGACY_MAX_HEADER}")
    assert h.rejected == h.cases and legacy.rejected == legacy.cases


def test_net_shapes_match_real_networks():
    """The loader's shape table (checked before building) is the network's state dict."""
    from recmeta_sdk.api import _net_shapes
    from recmeta_sdk.model import Config, ItemFeatures, RecMetaNet

    for over in ({}, {"encoder": "gru", "layers": 2}, {"encoder": "none"}, {"wide": "none"},
                 {"wide_max_items": 3}, {"layers": 3, "hidden": 5}, {"wide_budget_bytes": 1}):
        cfg = Config.from_dict({"dim": 4, "hidden": 6, "heads": 2, "seq_len": 3, **over})
        f = ItemFeatures(5, ["g=a", "g=b"], np.array([0, 2, 3, 5, 6, 7]), np.array([0, 5, 1, 2, 6, 3, 4]),
                         np.ones(7, np.float32), np.zeros((5, 3), np.float32))
        net = RecMetaNet(cfg, f, 4)
        want = _net_shapes(cfg, 5, 7, 7, 3, 4)
        got = {k: (tuple(v.shape), v.dtype) for k, v in net.state_dict().items()}
        assert got == want, over


def test_limits_are_caller_overridable(saved, tmp_path):
    model, blob, tensors, meta = saved
    p = tmp_path / "m.recmeta"
    p.write_bytes(blob)
    with pytest.raises(ModelFileError, match="max_file_bytes"):
        rm.load(p, limits=LoadLimits(max_file_bytes=1000))
    m2 = json.loads(json.dumps(meta))
    m2["config"]["inner_steps"] = 500
    p.write_bytes(forge(tensors, m2))
    with pytest.raises(ModelFileError, match="inner_steps"):
        rm.load(p)
    big = rm.load(p, limits=LoadLimits(max_inner_steps=1000))
    assert big.config.inner_steps == 500
    with pytest.raises(ModelFileError, match="max_json_depth"):
        p.write_bytes(blob)
        rm.load(p, limits=LoadLimits(max_json_depth=2))
    with pytest.raises(ValueError, match="max_dim"):
        LoadLimits(max_dim=-1)
    with pytest.raises(TypeError, match="LoadLimits"):
        rm.load(p, limits={"max_dim": 3})


def test_versions_are_recorded_and_files_without_them_load(saved, tmp_path):
    model, blob, tensors, meta = saved
    p = tmp_path / "m.recmeta"
    model.save(p)
    _, got = rio.read_model_file(p)
    assert got["library_version"] == rm.__version__ and got["torch_version"] == torch.__version__
    old = {k: v for k, v in meta.items() if k not in ("library_version", "torch_version")}
    lt, lm = to_legacy(tensors, old)
    for blob2 in (forge(tensors, old), legacy_blob(lt, lm, version=2)):
        p.write_bytes(blob2)
        m = rm.load(p)
        np.testing.assert_array_equal(m.recommend(3, k=5).ids, model.recommend(3, k=5).ids)


# ---------------------------------------------------------------------------- temp files, SIGKILL

def _temps(d: Path, name: str) -> list:
    return sorted(x for x in os.listdir(d) if x.startswith(f".{name}.") and x.endswith(".tmp"))


def test_clean_up_removes_only_our_stale_temp_files(saved, tmp_path):
    model = saved[0]
    p = tmp_path / "m.recmeta"
    model.save(p)
    dead = os.fork()
    if dead == 0:
        os._exit(0)
    os.waitpid(dead, 0)
    old = time.time() - 3600
    stale = [f".m.recmeta.{dead}-abcd_123.tmp", ".m.recmeta.zz9_abcd.tmp"]
    keep = [f".m.recmeta.{os.getppid()}-abcdefgh.tmp",       # a live writer
            ".other.recmeta.1-abcdefgh.tmp", f".m.recmeta.x.{dead}-abcdefgh.tmp",  # other files' temps
            ".m.recmeta.abcdefgh.tmp.bak", "m.recmeta.bak", ".m.recmeta.abcdefgh.TMP",
            ".m.recmeta.newlegcy.tmp"]                           # legacy but fresh: its writer may run
    for n in stale + keep:
        (tmp_path / n).write_bytes(b"x")
    os.utime(tmp_path / ".m.recmeta.zz9_abcd.tmp", (old, old))
    os.mkdir(tmp_path / f".m.recmeta.{dead}-dirdirdi.tmp")      # a directory is never removed
    os.symlink(p, tmp_path / f".m.recmeta.{dead}-linklink.tmp")  # nor a link
    rm.load(p)
    left = set(os.listdir(tmp_path))
    assert not (set(stale) & left)
    assert set(keep) <= left
    assert {f".m.recmeta.{dead}-dirdirdi.tmp", f".m.recmeta.{dead}-linklink.tmp", "m.recmeta"} <= left


def test_sigkill_during_save_leaves_old_or_new_and_no_temp_files(saved, tmp_path):
    """A child saves two models alternately; it is killed at seeded random instants. The file is
    always one of the two models, and the next load removes the temp files the kills left."""
    import hashlib

    model = saved[0]
    other = rm.Recommender(model._net, model.config, model.item_ids, model.user_ids, model._hist_offsets,
                           model._hist_items, model._hist_rewards, model._item_count, model._item_schema,
                           model._user_schema, model._uf_off, model._uf_idx, model._reward_scale)
    other.feedback([(u, u % N_ITEMS, 1.0, 0.5, float(u), 0) for u in range(200)])  # a different file
    p = tmp_path / "m.recmeta"
    digests = set()
    for m in (other, model):
        m.save(p)
        digests.add(hashlib.sha256(p.read_bytes()).hexdigest())
    assert len(digests) == 2
    rng = np.random.default_rng(SEED + 1)
    corrupt = left_before = 0
    for run in range(SIGKILL_RUNS):
        pid = os.fork()
        if pid == 0:  # the child: save forever
            try:
                while True:
                    other.save(p)
                    model.save(p)
            finally:
                os._exit(1)
        time.sleep(float(rng.uniform(0.0, 0.05)))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        if hashlib.sha256(p.read_bytes()).hexdigest() not in digests:
            corrupt += 1
        left_before += len(_temps(tmp_path, p.name))
        if run % 2:
            rm.load(p)  # the next load removes them ...
        else:
            model.save(p)  # ... as does the next save
        assert _temps(tmp_path, p.name) == [], run
    print(f"\nSIGKILL during save: {SIGKILL_RUNS} kills, {corrupt} corrupt, {left_before} temp files left by "
          f"the kills, 0 after the next save/load", file=sys.stderr)
    assert corrupt == 0
    assert rm.load(p).n_items == model.n_items


def test_escape_heavy_headers_are_refused_and_non_ascii_ids_are_written_without_escapes(saved, tmp_path):
    """Backslash escapes cost a JSON parser about ten times a plain byte: beyond four per
    value, one per 16 bytes of tensor data and max_json_escapes they are refused, naming the
    limit (the 16 MB case of 8M escapes took 155-490 ms to reject before). Non-ASCII string
    ids are written as UTF-8 (no escapes) and round-trip; a file with the \\uXXXX escapes
    that earlier versions wrote for them still loads."""
    _, _, tensors, meta = saved
    p = tmp_path / "m.recmeta"
    # a header whose one string is 200,000 escaped quotes, with the digest recomputed
    m2 = json.loads(json.dumps(meta))
    m2["config"]["encoder"] = '"' * 200_000
    p.write_bytes(forge(tensors, m2))
    with pytest.raises(ModelFileError, match="backslash escapes .* max_json_escapes=65536"):
        rm.load(p)
    with pytest.raises(ModelFileError, match="encoder"):  # above the bound, the next check runs
        rm.load(p, limits=LoadLimits(max_json_escapes=10**6))
    # non-ASCII ids: written as UTF-8, read back equal; the same ids as \uXXXX escapes load too
    names = ["é" * 40 + str(i) for i in range(N_ITEMS)]
    tensors, meta = to_legacy(tensors, meta)  # the format-2 layout: the ids in the metadata
    m3 = json.loads(json.dumps(meta))
    m3["item_ids"] = {"kind": "str", "values": names}
    fb = m3.get("feedback")
    if fb is not None:  # the feedback log names items by id
        m3.pop("feedback")
        t3 = {k: v for k, v in tensors.items() if not k.startswith("feedback.")}
    else:
        t3 = tensors
    meta3 = dict(m3, format=rio.FORMAT, format_version=2)
    arrays = {n: (_ST[t.dtype], list(t.shape), memoryview(t.contiguous().numpy().tobytes())) for n, t in t3.items()}
    meta3["sha256"] = rio._digest(meta3, arrays)
    for ensure_ascii in (False, True):
        header = {n: {"dtype": a[0], "shape": a[1]} for n, a in arrays.items()}
        off = 0
        for n in sorted(arrays):
            header[n]["data_offsets"] = [off, off + len(arrays[n][2])]
            off += len(arrays[n][2])
        header["__metadata__"] = {"recmeta": json.dumps(meta3, sort_keys=True, ensure_ascii=ensure_ascii)}
        p.write_bytes(_assemble(json.dumps(header, ensure_ascii=False).encode(),
                                b"".join(bytes(arrays[n][2]) for n in sorted(arrays))))
        loaded = rm.load(p)
        assert list(loaded.item_ids) == names
        loaded.save(p)  # the writer: format 3, the ids in a tensor of UTF-8 bytes, no \u escapes
        raw = p.read_bytes()
        head = raw[8:8 + struct.unpack("<Q", raw[:8])[0]]
        assert b"\\u" not in head and "é".encode() not in head
        assert list(rm.load(p).item_ids) == names
