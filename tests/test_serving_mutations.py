"""Hostile serving files: every mutant of what recmeta_sdk.serving reads is refused with
ModelFileError, or loads and serves finite scores; nothing else escapes (the serving
counterpart of tests/test_model_file_mutations.py, written with a recomputed SHA-256 as a
forger would)."""
from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest

import recmeta_sdk as rm
from recmeta_sdk import serving
from recmeta_sdk.model.io import ModelFileError, read_model_arrays, write_model_file

_BAD = [None, True, 1.5, -1.0, 0, 1e300, -1e300, float("nan"), float("inf"), "x", [], {}, [1, 2]]


@pytest.fixture(scope="module", params=["dense", "sparse", "none"])
def source(request, tmp_path_factory):
    rng = np.random.default_rng(11)
    rows = [(u, int(i), t, 1.0) for u in range(23) for t, i in enumerate(rng.choice(31, size=6, replace=False))]
    log = pd.DataFrame(rows, columns=["user", "item", "timestamp", "reward"])
    cfg = {"dim": 8, "hidden": 8, "seq_len": 3, "epochs": 1, "heads": 2, "batch_size": 32,
           "wide_recency": 0.5, "wide_recency_decay": 0.3}
    if request.param == "sparse":
        cfg.update(wide_budget_bytes=1000, wide_neighbours=5)
    if request.param == "none":
        cfg = dict(cfg, wide="none")
        cfg.pop("wide_recency"), cfg.pop("wide_recency_decay")
    model = rm.train(log, config=cfg, progress=False)
    p = tmp_path_factory.mktemp("sv") / "m.recmeta"
    model.save(p, serving=True)
    arrays, meta = read_model_arrays(p)
    meta = {k: v for k, v in meta.items() if k not in ("sha256", "format", "format_version", "library_version",
                                                       "torch_version")}
    return arrays, meta


def _mutants(arrays: dict, meta: dict, rng: np.random.Generator):
    read = [n for n in arrays if n.startswith(("serving.", "lists.item_ids", "lists.user_ids", "hist_",
                                               "net.wide"))]
    for name in sorted(read):
        a = arrays[name]
        yield f"drop {name}", {name: None}, None
        if a.ndim >= 1 and a.shape[0] > 0:
            yield f"short {name}", {name: a[:-1].copy()}, None
            yield f"long {name}", {name: np.concatenate([a, a[-1:]])}, None
        if a.ndim == 2 and a.size:
            yield f"transposed {name}", {name: np.ascontiguousarray(a.T)}, None
        if a.dtype == np.float32:
            yield f"float64 {name}", {name: a.astype(np.float64)}, None
            for v in (np.nan, np.inf, -np.inf, 3e38, -1e9):
                if a.size:
                    b = a.copy()
                    b.flat[int(rng.integers(a.size))] = v
                    yield f"{name}[.]={v}", {name: b}, None
        elif a.dtype.kind in "iu" and a.size:
            yield f"int32 {name}", {name: a.astype(np.int32)}, None
            for v in sorted({min(x, int(np.iinfo(a.dtype).max)) for x in (-1, 2**31, 2**62, int(a.max()) + 1)}):
                b = a.copy()
                b.flat[int(rng.integers(a.size))] = v
                yield f"{name}[.]={v}", {name: b}, None
            if a.size > 1:
                yield f"reversed {name}", {name: a[::-1].copy()}, None
    for key in ("serving", "config", "item_ids", "user_ids"):
        for v in _BAD:
            yield f"meta {key}={v!r}", None, {key: v}
    for key in ("temperature", "wide_recency", "wide_recency_decay", "dim"):
        for v in _BAD:
            yield f"config.{key}={v!r}", None, {"config": dict(meta["config"], **{key: v})}
    for v in _BAD + [2, 0]:
        yield f"serving.version={v!r}", None, {"serving": {"version": v}}
    yield "serving extra key", None, {"serving": {"version": 1, "x": 1}}
    yield "serving.extra tensor", {"serving.extra": np.zeros(2, np.float32)}, None


def test_serving_mutants_are_refused_or_serve(source, tmp_path):
    arrays, meta = source
    rng = np.random.default_rng(2026)
    path = tmp_path / "mut.recmeta"
    cases = rejected = 0
    escapes = []
    for label, tchange, mchange in _mutants(arrays, meta, rng):
        a2 = dict(arrays)
        for k, v in (tchange or {}).items():
            if v is None:
                a2.pop(k, None)
            else:
                a2[k] = v
        m2 = copy.deepcopy(meta)
        m2.update(mchange or {})
        try:
            write_model_file(path, a2, m2)
        except (TypeError, ValueError):  # the writer refuses (e.g. NaN in the metadata JSON): no file
            continue
        cases += 1
        try:
            sm = serving.load(path)
            users = [u.item() if hasattr(u, "item") else u for u in sm.user_ids]
            r = sm.recommend(users, k=4)
            assert np.isfinite(r.scores[r.valid]).all(), f"{label}: non-finite scores"
        except ModelFileError:
            rejected += 1
        except Exception as e:  # noqa: BLE001 - what this test counts
            escapes.append(f"{label}: {type(e).__name__}: {str(e)[:150]}")
    print(f"\n{cases} serving mutants, {rejected} refused with ModelFileError, {cases - rejected - len(escapes)} served")
    assert cases > 150 and rejected > cases // 2, (cases, rejected)
    assert not escapes, f"{len(escapes)} of {cases} mutants escaped:\n" + "\n".join(escapes[:30])
