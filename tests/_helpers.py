"""Input builders and result checks shared by the op test modules (one copy of each).

Torch-generator builders (``gen``, ``torch_bags``, ``torch_csr``: tests/test_gpu.py,
tests/test_triton_kernels.py), numpy-generator builders for the property fuzz
(``floats``, ``with_repeats``, ``table_pair``, ``csr``, ``bags``, ``policy_case``:
tests/test_ops_fuzz.py, tests/test_triton_fuzz.py), ``to_device`` for tables, and the
tie-aware top-k comparisons (``check_ranked``, ``check_topk``). Nothing here imports a Triton
kernel module (tests/_triton_setup.py must set TRITON_INTERPRET first). Also the CPU backends
as a parametrize list (``CPU_BACKENDS``, ``HAS_CPP``, ``needs_cpp``: tests/test_embedding_bag*.py).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

import pytest

from recmeta_sdk import ops
from recmeta_sdk.ops import backends
from recmeta_sdk.ops import reference as R
from recmeta_sdk.ops.reference import QuantizedTable

#: whether the compiled core is built; the CPU backends as a parametrize list (cpp skipped without
#: the core) and the mark of tests that need the core
HAS_CPP = backends.available("cpp")
CPU_BACKENDS = [pytest.param("cpp", marks=pytest.mark.skipif(not HAS_CPP, reason="no compiled core")), "torch"]
needs_cpp = pytest.mark.skipif(not HAS_CPP, reason="the compiled core is not built")


# ---------------------------------------------------------------------------------------
# torch-generator builders
# ---------------------------------------------------------------------------------------
def gen(seed: int) -> torch.Generator:
    """A seeded CPU torch generator."""
    return torch.Generator().manual_seed(seed)


def torch_bags(B: int, N: int, g: torch.Generator, max_len: int, *, empty: int, itype=torch.int64):
    """(indices, offsets) of B bags of up to ``max_len`` ids in [0, N), bag ``empty`` empty."""
    lens = torch.randint(0, max_len + 1, (B,), generator=g)
    lens[empty] = 0
    off = torch.zeros(B + 1, dtype=torch.int64)
    off[1:] = torch.cumsum(lens, 0)
    idx = torch.randint(0, N, (int(off[-1]),), generator=g)
    return idx.to(itype), off.to(itype)


def torch_csr(B: int, N: int, g: torch.Generator, max_len: int):
    """(offsets, ids): B lists of up to ``max_len`` ids in [0, N) (exclusion / candidates)."""
    lens = torch.randint(0, max_len + 1, (B,), generator=g)
    off = torch.zeros(B + 1, dtype=torch.int64)
    off[1:] = torch.cumsum(lens, 0)
    return off, torch.randint(0, N, (int(off[-1]),), generator=g)


def to_device(tab, dev):
    """A table (tensor or QuantizedTable) on ``dev``."""
    if isinstance(tab, QuantizedTable):
        return QuantizedTable(tab.dtype, *(None if t is None else t.to(dev)
                                           for t in (tab.data, tab.row_scale, tab.row_min)))
    return tab.to(dev)


# ---------------------------------------------------------------------------------------
# numpy-generator builders (the property fuzz)
# ---------------------------------------------------------------------------------------
def floats(rng, shape, integer: bool) -> np.ndarray:
    """Gaussian floats, or small integers (exact in fp16 and in every dot product: exact ties)."""
    if integer:
        return rng.integers(-2, 3, size=shape).astype(np.float32)
    return rng.standard_normal(shape).astype(np.float32)


def with_repeats(rng, w: np.ndarray, frac: float) -> np.ndarray:
    """Copy ``max(1, int(frac * n))`` random rows onto others (ties between different ids)."""
    n = w.shape[0]
    if n > 1 and frac > 0:
        dst = rng.choice(n, size=max(1, int(frac * n)), replace=False)
        w[dst] = w[rng.integers(0, n, size=dst.size)]
    return w


def table_pair(w: np.ndarray, fmt: str, device: Optional[str] = None):
    """(the table the op or kernel gets, on ``device`` if given; the same table as the
    reference sees it, on the CPU). ``fmt``: "fp32", "fp16", "int8" (``ops.quantize``), or
    "fp16_array" (a raw float16 numpy array, not a QuantizedTable)."""
    t = torch.from_numpy(w)
    if fmt == "fp32":
        return (t if device is None else t.to(device)), t
    if fmt == "fp16_array":
        h = t.to(torch.float16)
        return h.numpy(), QuantizedTable("fp16", h)
    q = ops.quantize(t, fmt)
    return (q if device is None else to_device(q, device)), q


def csr(rng, B: int, N: int, per_user, dtype=np.int64):
    """(offsets, ids) torch tensors: B lists of up to ``per_user`` ids in [0, N) with repeated
    ids and empty lists; None when ``per_user`` is None."""
    if per_user is None:
        return None
    counts = rng.integers(0, per_user + 1, size=B)
    off = np.zeros(B + 1, dtype=dtype)
    off[1:] = np.cumsum(counts)
    ids = rng.integers(0, N, size=int(off[-1])).astype(dtype)
    if ids.size > 3:
        ids[1::3] = ids[0:-1:3][: ids[1::3].size]
    return torch.from_numpy(off), torch.from_numpy(ids)


def bags(rng, num_bags: int, max_len: int, p_empty: float, id_dtype, n_rows):
    """(indices, offsets) numpy arrays of ``num_bags`` bags (table-major for a list of row
    counts ``n_rows``: the ids of table t in [0, n_rows[t])), empty with probability
    ``p_empty``, with repeated ids within a table."""
    lens = rng.integers(0, max_len + 1, size=num_bags)
    lens[rng.random(num_bags) < p_empty] = 0
    off = np.concatenate([[0], np.cumsum(lens)]).astype(id_dtype)
    rows = [n_rows] if np.isscalar(n_rows) else list(n_rows)
    tab_of = np.repeat(np.repeat(np.arange(len(rows)), num_bags // len(rows)), lens)
    idx = (rng.random(int(off[-1])) * np.asarray(rows)[tab_of]).astype(np.int64)
    if idx.size > 3:  # repeated ids (within a table)
        dst = np.arange(1, idx.size, 4)
        dst = dst[tab_of[dst] == tab_of[dst - 1]]
        idx[dst] = idx[dst - 1]
    return idx.astype(id_dtype), off


def policy_case(B, N, d, fmt, bias, exclude, cand, ties, seed, *, device=None, repeat_frac=0.3,
                idx_dtype=np.int64):
    """(user_states, table, reference table, bias, exclude, candidates) of a policy fuzz case:
    ``ties`` "none" / "repeat" (rows copied) / "integer" (integer values: exact ties); ``bias``
    "none" / "plain" / "mask" (30% -inf) / "all_masked"; ``exclude`` / ``cand`` the lists'
    maximum length or None."""
    rng = np.random.default_rng(seed)
    integer = ties == "integer"
    u = torch.from_numpy(floats(rng, (B, d), integer))
    w = with_repeats(rng, floats(rng, (N, d), integer), repeat_frac if ties != "none" else 0.0)
    tab, ref = table_pair(w, fmt, device)
    b = None
    if bias != "none":
        bb = floats(rng, N, integer)
        if bias in ("mask", "all_masked"):
            bb[rng.random(N) < (1.0 if bias == "all_masked" else 0.3)] = -np.inf
        b = torch.from_numpy(bb)
    return u, tab, ref, b, csr(rng, B, N, exclude, idx_dtype), csr(rng, B, N, cand, idx_dtype)


# ---------------------------------------------------------------------------------------
# tie-aware top-k comparisons
# ---------------------------------------------------------------------------------------
def check_ranked(ids, keys, full, mask, ref_ids, k, exact_ties: bool, *, ref_keys=None, rtol: float, atol: float):
    """Tie-aware comparison of a ranked (top-k) result with the reference's.

    ids / keys: ours, (B, min(k, N)) (tensors on any device or arrays); full: the reference
    ranking values (B, N); mask: eligibility; ref_ids (/ ref_keys): the reference's result.
    Valid, distinct, eligible ids first, padding (-1) past the eligible items in both; keys equal
    to the reference values of our ids (and to ``ref_keys``); ids differ from the reference's only
    where the reference values tie; ``exact_ties`` (the values are exact, no rounding anywhere):
    the reference's ids exactly (id ascending among ties)."""
    ids = ids.cpu().numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)
    keys = (keys.cpu().numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)).astype(np.float64)
    ref_ids = ref_ids.numpy() if isinstance(ref_ids, torch.Tensor) else np.asarray(ref_ids)
    if ref_keys is not None:
        ref_keys = np.asarray(ref_keys, dtype=np.float64)
    full, mask = full.numpy().astype(np.float64), mask.numpy()
    B = full.shape[0]
    kk = min(k, full.shape[1])
    assert ids.shape == (B, kk) and keys.shape == (B, kk) and ids.dtype == np.int64
    assert ref_ids.shape == (B, kk)
    for r in range(B):
        n_valid = min(kk, int(mask[r].sum()))
        got, want = ids[r, :n_valid], ref_ids[r, :n_valid]
        assert (got >= 0).all() and (ids[r, n_valid:] == -1).all(), (r, ids[r])
        assert (ref_ids[r, n_valid:] == -1).all()
        assert len(set(got.tolist())) == n_valid, f"duplicate ids in row {r}: {got}"
        assert mask[r, got].all(), f"ineligible id returned in row {r}"
        np.testing.assert_allclose(keys[r, :n_valid], full[r, got], rtol=rtol, atol=atol)
        if ref_keys is not None:
            np.testing.assert_allclose(keys[r, :n_valid], ref_keys[r, :n_valid], rtol=rtol, atol=atol)
        if exact_ties:
            np.testing.assert_array_equal(got, want)
        else:  # ids differ only where the reference values tie
            np.testing.assert_allclose(full[r, got], full[r, want], rtol=rtol, atol=atol)


def check_topk(got, want, s_full, mask, *, rtol: float, atol: float, lz_atol: float):
    """Tie-aware comparison of a ``(ids, scores, log_normalizer)`` top-k with another's (the
    reference's or the CPU backend's): scores and log-normalisers match; the same slots hold
    ids; ids may differ only among equal scores (each id's full score is its score); no
    duplicates; no ineligible id."""
    ids, sc, lz = (t.cpu() for t in got)
    rids, rsc, rlz = want
    torch.testing.assert_close(sc, rsc, rtol=rtol, atol=atol)
    torch.testing.assert_close(lz, rlz, rtol=1e-5, atol=lz_atol)
    assert torch.equal(ids >= 0, rids >= 0)
    for b in range(ids.shape[0]):
        g = ids[b][ids[b] >= 0]
        assert g.unique().numel() == g.numel()
        assert bool(mask[b, g].all())
        torch.testing.assert_close(s_full[b, g], sc[b, :g.numel()], rtol=rtol, atol=atol)


__all__ = ["HAS_CPP", "CPU_BACKENDS", "needs_cpp", "gen", "torch_bags", "torch_csr", "to_device", "floats", "with_repeats", "table_pair", "csr", "bags",
           "policy_case", "check_ranked", "check_topk", "R"]


def segments_log(n_users=90, seed=0):
    """Three segments of users; a user of segment s interacts with items 10s..10s+9."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        seg = u % 3
        for t, i in enumerate(rng.choice(np.arange(seg * 10, seg * 10 + 10), size=6, replace=False)):
            rows.append((f"u{u}", int(i), t, 1.0))
    return pd.DataFrame(rows, columns=["user", "item", "timestamp", "reward"])


def run_package_child(code: str, cwd, timeout: int = 300):
    """``python -c code`` in a fresh process that imports the package this test imported
    (installed in CI, the source tree with PYTHONPATH=.), run from the neutral directory ``cwd``
    so that it does not pick up a source tree without the compiled core. Returns the
    CompletedProcess (text stdout / stderr)."""
    import os
    import subprocess
    import sys

    import recmeta_sdk as rm

    parent = os.path.dirname(os.path.dirname(os.path.abspath(rm.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([parent, os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          cwd=cwd, env=env)
