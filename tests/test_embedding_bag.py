"""Tests of the fused embedding bag (forward, TBE, fused backward, autograd, custom ops).

Every result is compared against :mod:`recmeta_sdk.ops.reference` (the specification) and, where it
has the same meaning, ``torch.nn.functional.embedding_bag``, on seeded random data with odd
(prime) sizes, empty bags, int32 and int64 ids, over the "cpp" and "torch" backends.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from recmeta_sdk import ops
from recmeta_sdk.ops import reference

from _helpers import CPU_BACKENDS as BACKENDS, HAS_CPP, needs_cpp  # noqa: E402

ATOL = 2e-5
RTOL = 1e-5


def make_offsets(rng, num_bags, max_len=7, p_empty=0.2):
    """(num_bags+1,) int64 CSR offsets with some empty bags."""
    lens = rng.integers(1, max_len + 1, size=num_bags)
    lens[rng.random(num_bags) < p_empty] = 0
    return np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)


def make_table(rng, n, d, dtype):
    """(table passed to ops, the same table as the reference sees it)."""
    w = torch.from_numpy(rng.standard_normal((n, d)).astype(np.float32))
    if dtype == "fp32":
        return w, w
    q = reference.quantize(w, dtype)
    return q, q


def ref_forward(tables, idx, off, psw, mode):
    t = lambda x: None if x is None else torch.from_numpy(np.asarray(x))  # noqa: E731
    if isinstance(tables, list):
        return reference.embedding_bag_tbe(tables, t(idx), t(off), t(psw), mode).numpy()
    return reference.embedding_bag(tables, t(idx), t(off), t(psw), mode).numpy()


# ---------------------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "int8"])
@pytest.mark.parametrize("mode", ["sum", "mean"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("id_dtype", [np.int32, np.int64])
def test_forward_matches_reference(backend, dtype, mode, weighted, id_dtype):
    rng = np.random.default_rng(zlib.crc32(f"{dtype}/{mode}/{weighted}/{id_dtype.__name__}".encode()))
    N, d, B = 97, 37, 31
    tab, ref_tab = make_table(rng, N, d, dtype)
    off = make_offsets(rng, B).astype(id_dtype)
    idx = rng.integers(0, N, size=int(off[-1])).astype(id_dtype)
    psw = rng.standard_normal(idx.size).astype(np.float32) if weighted else None
    out = ops.embedding_bag(tab, idx, off, per_sample_weights=psw, mode=mode, backend=backend)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == (B, d)
    np.testing.assert_allclose(out, ref_forward(ref_tab, idx, off, psw, mode), rtol=RTOL, atol=ATOL)
    empty = np.diff(off) == 0
    assert empty.any() and np.all(out[empty] == 0)


@needs_cpp
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "int8"])
@pytest.mark.parametrize("d", [1, 3, 16, 67, 131, 257])
def test_forward_odd_dims(dtype, d):
    """Dims around and past the vector widths (16) and the register-block size (128)."""
    rng = np.random.default_rng(1000 + d)
    N, B = 53, 23
    tab, ref_tab = make_table(rng, N, d, dtype)
    off = make_offsets(rng, B, max_len=11)
    idx = rng.integers(0, N, size=int(off[-1]))
    psw = rng.random(idx.size).astype(np.float32)
    for mode in ("sum", "mean"):
        out = ops.embedding_bag(tab, idx, off, per_sample_weights=psw, mode=mode, backend="cpp")
        np.testing.assert_allclose(out, ref_forward(ref_tab, idx, off, psw, mode), rtol=RTOL, atol=ATOL)


@needs_cpp
@pytest.mark.parametrize("dtype, n", [("fp32", 131101), ("fp16", 262147), ("int8", 524309)])
def test_forward_large_tables(dtype, n):
    """Tables over 32 MiB, read for over 32 MiB of rows, take the kernels' two-stage prefetch path."""
    rng = np.random.default_rng(zlib.crc32(f"large/{dtype}".encode()))
    d, B = 67, 131071
    w = torch.from_numpy(rng.standard_normal((n, d), dtype=np.float32))
    tab = w if dtype == "fp32" else reference.quantize(w, dtype)
    nbytes = n * d * {"fp32": 4, "fp16": 2, "int8": 1}[dtype]
    assert nbytes > 32 << 20
    off = make_offsets(rng, B, max_len=9)
    idx = rng.integers(0, n, size=int(off[-1]))
    idx[:5] = [0, n - 1, n - 1, n // 2, 0]
    assert idx.size * nbytes // n > 32 << 20
    psw = rng.standard_normal(idx.size).astype(np.float32)
    for mode, weights in (("sum", None), ("mean", psw)):
        got = ops.embedding_bag(tab, idx, off, per_sample_weights=weights, mode=mode, backend="cpp")
        np.testing.assert_allclose(got, ref_forward(tab, idx, off, weights, mode), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_forward_matches_torch_embedding_bag(backend, mode):
    rng = np.random.default_rng(7)
    N, d, B = 1009, 61, 113
    w = torch.from_numpy(rng.standard_normal((N, d)).astype(np.float32))
    off = torch.from_numpy(make_offsets(rng, B, max_len=23))
    idx = torch.from_numpy(rng.integers(0, N, size=int(off[-1])))
    psw = torch.from_numpy(rng.random(idx.numel()).astype(np.float32)) if mode == "sum" else None
    out = ops.embedding_bag(w, idx, off, per_sample_weights=psw, mode=mode, backend=backend)
    assert isinstance(out, torch.Tensor)
    want = F.embedding_bag(idx, w, off, mode=mode, per_sample_weights=psw, include_last_offset=True)
    torch.testing.assert_close(out, want, rtol=RTOL, atol=ATOL)
    # float16 tables: torch pools the float16 rows converted to float32
    h = w.half()
    out16 = ops.embedding_bag(h, idx, off, per_sample_weights=psw, mode=mode, backend=backend)
    want16 = F.embedding_bag(idx, h.float(), off, mode=mode, per_sample_weights=psw, include_last_offset=True)
    torch.testing.assert_close(out16, want16, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float16_special_values(backend):
    """Subnormal, zero and extreme float16 values convert exactly."""
    bits = np.array([0x0001, 0x03FF, 0x8001, 0x0200, 0x0000, 0x8000, 0x7BFF, 0xFBFF, 0x0400, 0x3C00, 0x83FF],
                    dtype=np.uint16)
    h = np.resize(bits, (7, 11)).view(np.float16).copy()
    out = ops.embedding_bag(h, np.arange(7), np.arange(8), backend=backend)
    assert np.array_equal(out, h.astype(np.float32))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_bags_and_empty_batch(backend):
    rng = np.random.default_rng(11)
    w = rng.standard_normal((13, 7)).astype(np.float32)
    off = np.array([0, 0, 0, 3, 3, 5, 5], dtype=np.int64)
    idx = rng.integers(0, 13, size=5)
    for mode in ("sum", "mean"):
        out = ops.embedding_bag(w, idx, off, mode=mode, backend=backend)
        np.testing.assert_allclose(out, ref_forward(torch.from_numpy(w), idx, off, None, mode), rtol=RTOL, atol=ATOL)
        assert np.all(out[[0, 1, 3, 5]] == 0)
    # every bag empty, and no bag at all
    out = ops.embedding_bag(w, np.zeros(0, np.int64), np.zeros(4, np.int64), backend=backend)
    assert out.shape == (3, 7) and np.all(out == 0)
    out = ops.embedding_bag(w, np.zeros(0, np.int64), np.zeros(1, np.int64), backend=backend)
    assert out.shape == (0, 7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["sum", "mean"])
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_tbe_different_dims_and_dtypes(backend, mode, id_dtype):
    rng = np.random.default_rng(23)
    specs = [(101, 5, "fp32"), (37, 16, "fp16"), (211, 33, "int8"), (7, 67, "fp32")]
    T, B = len(specs), 19
    tabs = [make_table(rng, n, d, dt)[0] for n, d, dt in specs]
    off = make_offsets(rng, T * B, max_len=9)
    idx = np.concatenate([rng.integers(0, specs[t][0], size=int(off[(t + 1) * B] - off[t * B])) for t in range(T)])
    psw = rng.standard_normal(idx.size).astype(np.float32)
    off_t, idx_t = torch.from_numpy(off).to(id_dtype), torch.from_numpy(idx).to(id_dtype)
    out = ops.embedding_bag(tabs, idx_t, off_t, per_sample_weights=torch.from_numpy(psw), mode=mode, backend=backend)
    assert isinstance(out, torch.Tensor) and out.shape == (B, sum(s[1] for s in specs))
    torch.testing.assert_close(out, torch.from_numpy(ref_forward(tabs, idx, off, psw, mode)), rtol=RTOL, atol=ATOL)
    # the same as T separate single-table calls
    col = 0
    for t, (n, d, _) in enumerate(specs):
        lo, hi = off[t * B], off[(t + 1) * B]
        one = ops.embedding_bag(tabs[t], idx[lo:hi], off[t * B:(t + 1) * B + 1] - lo,
                                per_sample_weights=psw[lo:hi], mode=mode, backend=backend)
        np.testing.assert_allclose(out[:, col:col + d].numpy(), one, rtol=RTOL, atol=ATOL)
        col += d


@needs_cpp
def test_torch_inputs_strided_and_malformed():
    """Torch tensors reach the core without copies when plain; strided ones are copied, and a
    malformed quantised table is refused, not read past its end."""
    rng = np.random.default_rng(29)
    big = torch.from_numpy(rng.standard_normal((41, 30)).astype(np.float32))
    w = big[:, 3:20]  # row-strided view
    off = torch.from_numpy(make_offsets(rng, 11))
    idx = torch.from_numpy(rng.integers(0, 41, size=int(off[-1])).astype(np.int32))
    psw = torch.from_numpy(rng.random(2 * idx.numel()).astype(np.float32))[::2]  # strided
    out = ops.embedding_bag(w, idx, off, per_sample_weights=psw, backend="cpp")
    want = reference.embedding_bag(w.contiguous(), idx, off, psw.contiguous(), "sum")
    torch.testing.assert_close(out, want, rtol=RTOL, atol=ATOL)
    q = reference.quantize(w.contiguous(), "int8")
    bad = reference.QuantizedTable("int8", q.data, q.row_scale[:-1], q.row_min)
    with pytest.raises(ValueError, match="row_scale"):
        ops.embedding_bag(bad, idx, off, backend="cpp")
    bad = reference.QuantizedTable("int8", q.data, q.row_scale, q.row_min.double())
    with pytest.raises(TypeError, match="row_min"):
        ops.embedding_bag(bad, idx, off, backend="cpp")


@needs_cpp
def test_binding_rejects_bad_descriptors():
    from recmeta_sdk import _core

    w = np.ones((5, 3), np.float32)
    off = np.array([0, 2], np.int64)
    idx = np.array([1, 4], np.int64)
    with pytest.raises(TypeError, match="indices.*descriptor has 3 integers"):
        _core.embedding_bag_forward([w], (idx.ctypes.data, 1), off)
    with pytest.raises(TypeError, match="indices.*int32 or int64"):
        _core.embedding_bag_forward([w], (idx.ctypes.data, 7, 2), off)
    with pytest.raises(TypeError, match="bad table type code"):
        _core.embedding_bag_forward([(w.ctypes.data, 9, 5, 3, 3, 0, 0)], idx, off)
    with pytest.raises(ValueError, match="bad table descriptor"):
        _core.embedding_bag_forward([(w.ctypes.data, 0, 5, 3, 2, 0, 0)], idx, off)
    with pytest.raises(ValueError, match=r"id 4 at position 1 is out of range \[0, 4\)"):
        _core.embedding_bag_forward([(w.ctypes.data, 0, 4, 3, 3, 0, 0)], idx, off)
    out = _core.embedding_bag_forward([(w.ctypes.data, 0, 5, 3, 3, 0, 0)], (idx.ctypes.data, 1, 2), off)
    assert np.array_equal(out, np.full((1, 3), 2, np.float32))


@needs_cpp
def test_forward_threads_and_concurrency():
    """Same result for 1 and 2 core threads, and from 4 Python threads at once (GIL released)."""
    from recmeta_sdk import _core

    rng = np.random.default_rng(31)
    w = rng.standard_normal((4099, 67)).astype(np.float32)
    off = make_offsets(rng, 1499, max_len=29)
    idx = rng.integers(0, 4099, size=int(off[-1])).astype(np.int32)
    psw = rng.random(idx.size).astype(np.float32)
    old = _core.get_num_threads()
    try:
        _core.set_num_threads(1)
        one = ops.embedding_bag(w, idx, off, per_sample_weights=psw, mode="mean", backend="cpp")
        _core.set_num_threads(2)
        two = ops.embedding_bag(w, idx, off, per_sample_weights=psw, mode="mean", backend="cpp")
    finally:
        _core.set_num_threads(old)
    assert np.array_equal(one, two)
    results, errors = [], []

    def work():
        try:
            for _ in range(5):
                results.append(ops.embedding_bag(w, idx, off, per_sample_weights=psw, mode="mean", backend="cpp"))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors and len(results) == 20
    assert all(np.array_equal(r, one) for r in results)


@needs_cpp
def test_lower_isa_variants_match_reference():
    """The generic and AVX2 kernels (chosen at start-up by RECMETA_CPU_ISA) agree with the
    reference (one child process per variant, run side by side)."""
    code = r"""
import numpy as np, torch
from recmeta_sdk import ops, _core
from recmeta_sdk.ops import reference
import sys
assert _core.cpu_isa() == sys.argv[1] or _core.cpu_best_isa() == "generic", _core.cpu_isa()
rng = np.random.default_rng(5)
for d in (1, 7, 16, 37, 131):
    for dt in ("fp32", "fp16", "int8"):
        w = torch.from_numpy(rng.standard_normal((59, d)).astype(np.float32))
        tab = w if dt == "fp32" else reference.quantize(w, dt)
        lens = rng.integers(0, 9, 17); off = np.concatenate([[0], np.cumsum(lens)])
        idx = rng.integers(0, 59, int(off[-1])); psw = rng.random(idx.size).astype(np.float32)
        for mode in ("sum", "mean"):
            out = ops.embedding_bag(tab, idx, off, per_sample_weights=psw, mode=mode, backend="cpp")
            ref = reference.embedding_bag(tab, torch.from_numpy(idx), torch.from_numpy(off), torch.from_numpy(psw), mode)
            np.testing.assert_allclose(out, ref.numpy(), rtol=1e-5, atol=2e-5)
# float16 specials: subnormals, signed zeros, the largest finite value
bits = np.array([0x0001, 0x03FF, 0x8001, 0x0200, 0x0000, 0x8000, 0x7BFF, 0xFBFF, 0x0400, 0x3C00, 0x83FF], np.uint16)
h = np.resize(bits, (7, 11)).view(np.float16).copy()
out = ops.embedding_bag(h, np.arange(7), np.arange(8), backend="cpp")
assert np.array_equal(out, h.astype(np.float32)), (out, h.astype(np.float32))
w = rng.standard_normal((41, 19)).astype(np.float32); st = rng.random(41).astype(np.float32)
off = np.concatenate([[0], np.cumsum(rng.integers(0, 9, 13))]); idx = rng.integers(0, 41, int(off[-1]))
g = rng.standard_normal((13, 19)).astype(np.float32)
wt, stt = torch.from_numpy(w.copy()), torch.from_numpy(st.copy())
ops.embedding_bag_backward(w, idx, off, g, optimizer="rowwise_adagrad", lr=0.1, state=st, backend="cpp")
reference.embedding_bag_backward(wt, torch.from_numpy(idx), torch.from_numpy(off), torch.from_numpy(g), None, "sum", "rowwise_adagrad", 0.1, 1e-8, stt)
np.testing.assert_allclose(w, wt.numpy(), rtol=1e-5, atol=2e-5); np.testing.assert_allclose(st, stt.numpy(), rtol=1e-5, atol=1e-5)
# the range checks fused into the gather: a bad id, a bad offset inside the bags, a 0-wide table
import re
for d in (0, 5, 131):
    w = rng.standard_normal((23, d)).astype(np.float32)
    off = np.concatenate([[0], np.cumsum(rng.integers(1, 6, 150))]); idx = rng.integers(0, 23, int(off[-1]))
    for dt in ("fp32", "fp16", "int8"):
        tab = w if dt == "fp32" or d == 0 else ops.quantize(w, dt)
        bad = idx.copy(); bad[int(off[77]) + 1] = 23
        try:
            ops.embedding_bag(tab, bad, off, backend="cpp"); raise AssertionError("bad id not found")
        except ValueError as e:
            assert re.search(rf"id 23 at position {int(off[77]) + 1} is out of range", str(e)), str(e)
        o2 = off.copy(); o2[100] = o2[99] - 1
        try:
            ops.embedding_bag(tab, idx, o2, backend="cpp"); raise AssertionError("bad offset not found")
        except ValueError as e:
            assert "offsets decrease at position 100" in str(e), str(e)
print("ok", _core.cpu_isa())
"""
    import recmeta_sdk

    # the package under test (installed, or the source tree when run with PYTHONPATH=.)
    root = os.path.dirname(os.path.dirname(os.path.abspath(recmeta_sdk.__file__)))
    procs = {}
    for isa in ("generic", "avx2"):
        env = dict(os.environ, RECMETA_CPU_ISA=isa)
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        procs[isa] = subprocess.Popen([sys.executable, "-c", code, isa], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, cwd=root)
    for isa, proc in procs.items():
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, f"{isa}: {err[-2000:]}"
        assert out.startswith("ok"), f"{isa}: {out}"


# ---------------------------------------------------------------------------------------------
# fused backward
# ---------------------------------------------------------------------------------------------
def _backward_case(rng, N=61, d=37, B=29, max_len=9):
    w = rng.standard_normal((N, d)).astype(np.float32)
    off = make_offsets(rng, B, max_len=max_len)
    # few distinct ids: repeats inside and across bags
    idx = rng.integers(0, max(N // 4, 1), size=int(off[-1]))
    g = rng.standard_normal((B, d)).astype(np.float32)
    psw = rng.standard_normal(idx.size).astype(np.float32)
    st = rng.random(N).astype(np.float32)
    return w, off, idx, g, psw, st


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("optimizer", ["sgd", "rowwise_adagrad"])
@pytest.mark.parametrize("mode", ["sum", "mean"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("id_dtype", [np.int32, np.int64])
def test_backward_matches_reference(backend, optimizer, mode, weighted, id_dtype):
    rng = np.random.default_rng(zlib.crc32(f"{optimizer}/{mode}/{weighted}/{id_dtype.__name__}".encode()))
    w, off, idx, g, psw, st = _backward_case(rng)
    idx, off = idx.astype(id_dtype), off.astype(id_dtype)
    psw = psw if weighted else None
    w_ref, st_ref = torch.from_numpy(w.copy()), torch.from_numpy(st.copy())
    reference.embedding_bag_backward(w_ref, torch.from_numpy(idx), torch.from_numpy(off), torch.from_numpy(g),
                                     None if psw is None else torch.from_numpy(psw), mode, optimizer, 0.05, 1e-8,
                                     st_ref if optimizer == "rowwise_adagrad" else None)
    w0 = w.copy()
    state = st if optimizer == "rowwise_adagrad" else None
    ops.embedding_bag_backward(w, idx, off, g, per_sample_weights=psw, mode=mode, optimizer=optimizer, lr=0.05,
                               state=state, backend=backend)
    np.testing.assert_allclose(w, w_ref.numpy(), rtol=RTOL, atol=ATOL)
    if state is not None:
        np.testing.assert_allclose(st, st_ref.numpy(), rtol=RTOL, atol=ATOL)
    untouched = np.setdiff1d(np.arange(w.shape[0]), idx)
    assert untouched.size > 0 and np.array_equal(w[untouched], w0[untouched])


@needs_cpp
@pytest.mark.parametrize("optimizer", ["sgd", "rowwise_adagrad"])
def test_backward_torch_tensors_in_place(optimizer):
    rng = np.random.default_rng(3)
    w, off, idx, g, psw, st = _backward_case(rng)
    wt, stt = torch.from_numpy(w.copy()).requires_grad_(), torch.from_numpy(st.copy())
    w_ref, st_ref = torch.from_numpy(w.copy()), torch.from_numpy(st.copy())
    args = (torch.from_numpy(idx), torch.from_numpy(off), torch.from_numpy(g))
    ops.embedding_bag_backward(wt, *args, per_sample_weights=torch.from_numpy(psw), optimizer=optimizer,
                               lr=0.1, state=stt, backend="cpp")
    ops.embedding_bag_backward(w_ref, *args, per_sample_weights=torch.from_numpy(psw), optimizer=optimizer,
                               lr=0.1, state=st_ref, backend="torch")
    torch.testing.assert_close(wt.detach(), w_ref, rtol=RTOL, atol=ATOL)
    if optimizer == "rowwise_adagrad":
        torch.testing.assert_close(stt, st_ref, rtol=RTOL, atol=ATOL)


@needs_cpp
@pytest.mark.parametrize("optimizer", ["sgd", "rowwise_adagrad"])
@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_backward_bit_identical_across_thread_counts(optimizer, mode):
    from recmeta_sdk import _core

    rng = np.random.default_rng(41)
    w, off, idx, g, psw, st = _backward_case(rng, N=20011, d=67, B=4999, max_len=41)
    assert idx.size > 1 << 16  # large enough for the threaded sort and update
    results = []
    old = _core.get_num_threads()
    try:
        for n in (1, 2, 1, 2):
            _core.set_num_threads(n)
            wc, sc = w.copy(), st.copy()
            ops.embedding_bag_backward(wc, idx, off, g, per_sample_weights=psw, mode=mode, optimizer=optimizer,
                                       lr=0.01, state=sc, backend="cpp")
            results.append((wc, sc))
    finally:
        _core.set_num_threads(old)
    for wc, sc in results[1:]:
        assert np.array_equal(wc, results[0][0])
        assert np.array_equal(sc, results[0][1])
    assert not np.array_equal(results[0][0], w)


# ---------------------------------------------------------------------------------------------
# autograd and custom ops
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_autograd_matches_torch(backend, mode):
    rng = np.random.default_rng(53)
    N, d, B = 83, 29, 41
    w0 = torch.from_numpy(rng.standard_normal((N, d)).astype(np.float32))
    off = torch.from_numpy(make_offsets(rng, B))
    idx = torch.from_numpy(rng.integers(0, N // 3, size=int(off[-1])))
    go = torch.from_numpy(rng.standard_normal((B, d)).astype(np.float32))
    p0 = torch.from_numpy(rng.random(idx.numel()).astype(np.float32))
    w1, w2 = w0.clone().requires_grad_(), w0.clone().requires_grad_()
    p1 = p0.clone().requires_grad_() if mode == "sum" else None
    p2 = p0.clone().requires_grad_() if mode == "sum" else None
    out = ops.embedding_bag(w1, idx, off, per_sample_weights=p1, mode=mode, backend=backend)
    (out * go).sum().backward()
    want = F.embedding_bag(idx, w2, off, mode=mode, per_sample_weights=p2, include_last_offset=True)
    (want * go).sum().backward()
    torch.testing.assert_close(out.detach(), want.detach(), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=RTOL, atol=ATOL)
    if mode == "sum":
        torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-4, atol=1e-4)


@needs_cpp
def test_autograd_tbe_mixed_tables():
    """Gradients reach the float32 tables of a TBE call; quantised tables need none."""
    rng = np.random.default_rng(59)
    specs = [(31, 7), (53, 16), (17, 3)]
    B = 13
    ws = [torch.from_numpy(rng.standard_normal(s).astype(np.float32)).requires_grad_() for s in specs]
    q = reference.quantize(ws[1].detach(), "int8")
    off = torch.from_numpy(make_offsets(rng, 3 * B))
    idx = torch.from_numpy(np.concatenate([rng.integers(0, specs[t][0], size=int(off[(t + 1) * B] - off[t * B]))
                                           for t in range(3)]))
    go = torch.from_numpy(rng.standard_normal((B, 26)).astype(np.float32))
    out = ops.embedding_bag([ws[0], q, ws[2]], idx, off, mode="mean", backend="cpp")
    (out * go).sum().backward()
    refs = [w.detach().clone().requires_grad_() for w in ws]
    want = reference.embedding_bag_tbe([refs[0], q, refs[2]], idx, off, None, "mean")
    (want * go).sum().backward()
    torch.testing.assert_close(out.detach(), want.detach(), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(ws[0].grad, refs[0].grad, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(ws[2].grad, refs[2].grad, rtol=RTOL, atol=ATOL)
    assert ws[1].grad is None


@needs_cpp
def test_training_through_the_op_matches_torch():
    """A few SGD steps of a model built on ops.embedding_bag follow the same path as on F.embedding_bag."""
    rng = np.random.default_rng(61)
    N, d, B = 97, 11, 23
    w0 = torch.from_numpy(rng.standard_normal((N, d)).astype(np.float32))
    off = torch.from_numpy(make_offsets(rng, B))
    idx = torch.from_numpy(rng.integers(0, N, size=int(off[-1])))
    target = torch.from_numpy(rng.standard_normal((B, d)).astype(np.float32))
    losses = {}
    for name in ("ours", "torch"):
        emb = torch.nn.Parameter(w0.clone())
        opt = torch.optim.SGD([emb], lr=0.1)
        hist = []
        for _ in range(5):
            opt.zero_grad()
            if name == "ours":
                out = ops.embedding_bag(emb, idx, off, mode="mean")
            else:
                out = F.embedding_bag(idx, emb, off, mode="mean", include_last_offset=True)
            loss = ((out - target) ** 2).mean()
            loss.backward()
            opt.step()
            hist.append(float(loss.detach()))
        losses[name] = hist
    np.testing.assert_allclose(losses["ours"], losses["torch"], rtol=1e-5)
    assert losses["ours"][-1] < losses["ours"][0]


@needs_cpp
def test_opcheck_custom_ops():
    rng = np.random.default_rng(67)
    w = torch.from_numpy(rng.standard_normal((43, 13)).astype(np.float32)).requires_grad_()
    w2 = torch.from_numpy(rng.standard_normal((29, 5)).astype(np.float32)).requires_grad_()
    q = reference.quantize(torch.from_numpy(rng.standard_normal((19, 8)).astype(np.float32)), "int8")
    B = 7
    off = torch.from_numpy(make_offsets(rng, 3 * B))
    idx = torch.from_numpy(np.concatenate([rng.integers(0, n, size=int(off[(t + 1) * B] - off[t * B]))
                                           for t, n in enumerate((43, 29, 19))]))
    psw = torch.from_numpy(rng.random(idx.numel()).astype(np.float32)).requires_grad_()
    e = torch.empty(0)
    fwd = torch.ops.recmeta.embedding_bag_forward.default
    torch.library.opcheck(fwd, ([w], [e], [e], idx[: int(off[B])], off[: B + 1], None, "sum"))
    torch.library.opcheck(fwd, ([w, w2, q.data], [e, e, q.row_scale], [e, e, q.row_min], idx, off, psw, "mean"))
    wb = torch.from_numpy(rng.standard_normal((43, 13)).astype(np.float32))
    st = torch.from_numpy(rng.random(43).astype(np.float32))
    g = torch.from_numpy(rng.standard_normal((B, 13)).astype(np.float32))
    torch.library.opcheck(torch.ops.recmeta.embedding_bag_backward.default,
                          (wb, idx[: int(off[B])], off[: B + 1], g, None, "sum", "rowwise_adagrad", 0.1, 1e-8, st))


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------
def _valid(rng):
    w = rng.standard_normal((11, 5)).astype(np.float32)
    off = np.array([0, 2, 2, 5], dtype=np.int64)
    idx = np.array([1, 3, 10, 0, 4], dtype=np.int64)
    return w, idx, off


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case, exc, match", [
    ("id_too_large", ValueError, r"id 11 at position 2 is out of range \[0, 11\)"),
    ("id_negative", ValueError, r"id -1 at position 4 is out of range"),
    ("offsets_decrease", ValueError, r"offsets decrease at position 2 \(2 -> 1\)"),
    ("offsets_past_end", ValueError, r"offsets\[-1\] must equal the number of indices 5, got 6"),
    ("offsets_first", ValueError, r"offsets\[0\] must be 0, got 1"),
    ("float_ids", TypeError, r"indices.*int32 or int64.*float"),
    ("float_offsets", TypeError, r"offsets.*int32 or int64.*float"),
    ("float16_numpy_ids", TypeError, r"indices.*int32 or int64.*float16"),
    ("int_table", TypeError, r"int64"),
    ("table_1d", ValueError, r"2-D"),
    ("ids_2d", ValueError, r"indices.*1-D"),
    ("psw_nan", ValueError, r"per_sample_weights: non-finite value nan at flat position 3"),
    ("psw_shape", ValueError, r"per_sample_weights"),
    ("psw_dtype", TypeError, r"per_sample_weights"),
    ("bad_mode", ValueError, r"mode must be 'sum', 'mean' or 'max', got 'median'"),
    ("tbe_not_multiple", ValueError, r"3 bags is not a multiple of the 2 tables"),
    ("tbe_id_range", ValueError, r"indices of table 1: id 10 at position"),
])
def test_forward_rejects_bad_input(backend, case, exc, match):
    rng = np.random.default_rng(71)
    w, idx, off = _valid(rng)
    kw = {}
    mode = "sum"
    if case == "id_too_large":
        idx[2] = 11
    elif case == "id_negative":
        idx[4] = -1
    elif case == "offsets_decrease":
        off = np.array([0, 2, 1, 5])
    elif case == "offsets_past_end":
        off = np.array([0, 2, 2, 6])
    elif case == "offsets_first":
        off = np.array([1, 2, 2, 5])
    elif case == "float_ids":
        idx = idx.astype(np.float32)
    elif case == "float_offsets":
        off = off.astype(np.float32)
    elif case == "float16_numpy_ids":
        idx = idx.astype(np.float16)
    elif case == "int_table":
        w = w.astype(np.int64)
    elif case == "table_1d":
        w = w[:, 0].copy()
    elif case == "ids_2d":
        idx = idx.reshape(5, 1)
    elif case == "psw_nan":
        kw["per_sample_weights"] = np.array([1, 2, 3, np.nan, 5], dtype=np.float32)
    elif case == "psw_shape":
        kw["per_sample_weights"] = np.ones(4, dtype=np.float32)
    elif case == "psw_dtype":
        kw["per_sample_weights"] = np.ones(5, dtype=np.int32)
    elif case == "bad_mode":
        mode = "median"
    elif case == "tbe_not_multiple":
        w = [w, w]
    elif case == "tbe_id_range":
        w = [w, w[:10]]
        off = np.array([0, 2, 5])
    with pytest.raises(exc, match=match):
        ops.embedding_bag(w, idx, off, mode=mode, backend=backend, **kw)
    # the process stays usable
    w, idx, off = _valid(rng)
    out = ops.embedding_bag(w, idx, off, backend=backend)
    np.testing.assert_allclose(out, ref_forward(torch.from_numpy(w), idx, off, None, "sum"), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case, exc, match", [
    ("id_too_large", ValueError, r"id 11 at position 2 is out of range \[0, 11\)"),
    ("offsets_decrease", ValueError, r"offsets decrease at position 2"),
    ("grad_shape", ValueError, r"grad_output.*\(3, 5\)"),
    ("grad_nan", ValueError, r"grad_output: non-finite value nan at flat position 8"),
    ("grad_dtype", TypeError, r"grad_output"),
    ("weight_dtype", TypeError, r"weight.*float32"),
    ("weight_readonly", ValueError, r"weight.*read-only"),
    ("no_state", ValueError, r"rowwise_adagrad needs a \(N,\) float32 state"),
    ("state_shape", ValueError, r"state"),
    ("bad_optimizer", ValueError, r"optimizer must be 'sgd' or 'rowwise_adagrad', got 'adam'"),
    ("lr_nan", ValueError, r"lr: must be a finite number, got nan"),
])
def test_backward_rejects_bad_input(backend, case, exc, match):
    rng = np.random.default_rng(73)
    w, idx, off = _valid(rng)
    g = rng.standard_normal((3, 5)).astype(np.float32)
    st = np.ones(11, dtype=np.float32)
    kw = dict(optimizer="rowwise_adagrad", state=st, lr=0.1)
    if case == "id_too_large":
        idx[2] = 11
    elif case == "offsets_decrease":
        off = np.array([0, 2, 1, 5])
    elif case == "grad_shape":
        g = g[:2]
    elif case == "grad_nan":
        g[1, 3] = np.nan
    elif case == "grad_dtype":
        g = g.astype(np.float16)
    elif case == "weight_dtype":
        w = w.astype(np.float16)
    elif case == "weight_readonly":
        w.flags.writeable = False
    elif case == "no_state":
        kw["state"] = None
    elif case == "state_shape":
        kw["state"] = np.ones(10, dtype=np.float32)
    elif case == "bad_optimizer":
        kw["optimizer"] = "adam"
    elif case == "lr_nan":
        kw["lr"] = float("nan")
    w_before = w.copy()
    st_before = st.copy()
    with pytest.raises(exc, match=match):
        ops.embedding_bag_backward(w, idx, off, g, backend=backend, **kw)
    assert np.array_equal(w, w_before) and np.array_equal(st, st_before)  # nothing written


# ---------------------------------------------------------------------------------------------
# property test over shapes and hostile inputs
# ---------------------------------------------------------------------------------------------
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

HOSTILE = ["none", "id_oob", "id_negative", "offsets_decrease", "offsets_past_end", "psw_nan",
           "ids_float", "table_float64", "offsets_short"]


@given(
    n=st.integers(1, 40), d=st.integers(1, 40), b=st.integers(0, 12), t=st.integers(1, 3),
    max_len=st.integers(0, 6), dtype=st.sampled_from(["fp32", "fp16", "int8"]),
    mode=st.sampled_from(["sum", "mean"]), weighted=st.booleans(), id64=st.booleans(),
    hostile=st.sampled_from(HOSTILE), seed=st.integers(0, 2**31 - 1),
    backend=st.sampled_from(["cpp", "torch"] if HAS_CPP else ["torch"]),
)
def test_property_shapes_and_hostile_inputs(n, d, b, t, max_len, dtype, mode, weighted, id64, hostile, seed, backend):
    rng = np.random.default_rng(seed)
    tabs = [make_table(rng, n, d + k, dtype)[0] for k in range(t)]
    lens = rng.integers(0, max_len + 1, size=t * b)
    off = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64 if id64 else np.int32)
    idx = rng.integers(0, n, size=int(off[-1])).astype(off.dtype)
    psw = rng.standard_normal(idx.size).astype(np.float32) if weighted else None
    weight = tabs if t > 1 else tabs[0]
    expect = None
    if hostile == "id_oob" and idx.size:
        idx[rng.integers(idx.size)] = n + int(rng.integers(0, 1000))
        expect = ValueError
    elif hostile == "id_negative" and idx.size:
        idx[rng.integers(idx.size)] = -1 - int(rng.integers(0, 1000))
        expect = ValueError
    elif hostile == "offsets_decrease" and off.size > 2 and off[-2] > 0:
        off[-2] = off[-1] + 1
        expect = ValueError
    elif hostile == "offsets_past_end":
        off[-1] += 1 + int(rng.integers(0, 5))
        expect = ValueError
    elif hostile == "psw_nan" and idx.size:
        psw = np.ones(idx.size, dtype=np.float32) if psw is None else psw
        psw[rng.integers(idx.size)] = np.nan
        expect = ValueError
    elif hostile == "ids_float":
        idx = idx.astype(np.float32)
        expect = TypeError
    elif hostile == "table_float64" and dtype == "fp32":
        weight = [w.double().numpy() for w in tabs] if t > 1 else tabs[0].double().numpy()
        expect = TypeError
    elif hostile == "offsets_short" and t > 1 and b > 0:
        off = off[:-1].copy()
        off[-1] = idx.size
        expect = ValueError
    if expect is not None:
        with pytest.raises(expect):
            ops.embedding_bag(weight, idx, off, per_sample_weights=psw, mode=mode, backend=backend)
    else:
        out = ops.embedding_bag(weight, idx, off, per_sample_weights=psw, mode=mode, backend=backend)
        want = ref_forward(tabs if t > 1 else tabs[0], idx, off, psw, mode)
        assert out.shape == (b, sum(d + k for k in range(t)))
        np.testing.assert_allclose(out, want, rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------------------------------------
# the one-table TBE form (table_offsets) and the table-batched backward
# ---------------------------------------------------------------------------------------------
def _tbe_case(rng, rows=(53, 1, 97, 29), B=23, max_len=9, few=True):
    """Offsets (T*B+1,) and local ids of T tables with `rows` rows; with `few`, ids drawn from a
    quarter of each table (repeats inside and across bags)."""
    T = len(rows)
    off = make_offsets(rng, T * B, max_len=max_len)
    lens = np.diff(off).reshape(T, B)
    lens[np.asarray(rows) == 0] = 0  # a table without rows has only empty bags
    off = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    idx = np.concatenate([rng.integers(0, max(n // 4, 1) if few else n, size=int(off[(t + 1) * B] - off[t * B]))
                          for t, n in enumerate(rows)])
    return off, idx


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "int8"])
@pytest.mark.parametrize("mode", ["sum", "mean"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("id_dtype", [np.int32, np.int64])
def test_table_offsets_forward_matches_list_and_reference(backend, dtype, mode, weighted, id_dtype):
    rng = np.random.default_rng(zlib.crc32(f"to/{dtype}/{mode}/{weighted}/{id_dtype.__name__}".encode()))
    rows, d, B = (53, 1, 97, 0, 29), 19, 23
    T = len(rows)
    cum = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)
    whole_f = torch.from_numpy(rng.standard_normal((int(cum[-1]), d)).astype(np.float32))
    whole = whole_f if dtype == "fp32" else reference.quantize(whole_f, dtype)
    off, idx = _tbe_case(rng, rows=rows, B=B, few=False)
    idx, off = idx.astype(id_dtype), off.astype(id_dtype)
    psw = rng.standard_normal(idx.size).astype(np.float32) if weighted else None
    out = ops.embedding_bag(whole, idx, off, per_sample_weights=psw, mode=mode, backend=backend, table_offsets=cum)
    assert isinstance(out, np.ndarray) and out.shape == (B, T * d)
    ref = reference.embedding_bag_table_offsets(whole, *(None if x is None else torch.from_numpy(np.asarray(x))
                                                         for x in (cum, idx, off, psw)), mode).numpy()
    np.testing.assert_allclose(out, ref, rtol=RTOL, atol=ATOL)
    # the same as the list form over the T row ranges (copies, not views)
    if dtype == "fp32":
        parts = [whole_f[cum[i]:cum[i + 1]].clone() for i in range(T)]
    else:
        parts = [reference.QuantizedTable(dtype, whole.data[cum[i]:cum[i + 1]].clone(),
                                          None if whole.row_scale is None else whole.row_scale[cum[i]:cum[i + 1]].clone(),
                                          None if whole.row_min is None else whole.row_min[cum[i]:cum[i + 1]].clone())
                 for i in range(T)]
    lst = ops.embedding_bag(parts, idx, off, per_sample_weights=psw, mode=mode, backend=backend)
    np.testing.assert_allclose(out, lst, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(ref, ref_forward(parts, idx, off, psw, mode), rtol=RTOL, atol=ATOL)
    assert np.abs(out).max() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_table_offsets_torch_inputs_and_autograd(backend):
    rng = np.random.default_rng(71)
    rows, d, B = (31, 17, 43), 11, 13
    cum = torch.tensor(np.concatenate([[0], np.cumsum(rows)]), dtype=torch.int64)
    w = torch.from_numpy(rng.standard_normal((int(cum[-1]), d)).astype(np.float32)).requires_grad_()
    off, idx = _tbe_case(rng, rows=rows, B=B)
    off_t, idx_t = torch.from_numpy(off), torch.from_numpy(idx)
    out = ops.embedding_bag(w, idx_t, off_t, mode="mean", backend=backend, table_offsets=cum)
    w_ref = w.detach().clone().requires_grad_()
    ref = reference.embedding_bag_table_offsets(w_ref, cum, idx_t, off_t, None, "mean")
    torch.testing.assert_close(out, ref, rtol=RTOL, atol=ATOL)
    g = torch.from_numpy(rng.standard_normal((B, len(rows) * d)).astype(np.float32))
    out.backward(g)
    ref.backward(g)
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=RTOL, atol=ATOL)
    assert float(w.grad.abs().max()) > 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case, exc, match", [
    ("first_not_zero", ValueError, r"table_offsets: table_offsets\[0\] must be 0, got 1"),
    ("decreasing", ValueError, r"table_offsets: offsets decrease at position 2 \(40 -> 30\)"),
    ("wrong_total", ValueError, r"table_offsets: table_offsets\[-1\] must equal the number of rows of weight 91"),
    ("float", TypeError, r"table_offsets: expected int32 or int64"),
    ("two_d", ValueError, r"table_offsets: expected a 1-D array of T\+1 >= 2 offsets"),
    ("list_weight", TypeError, r"weight: with table_offsets, give one"),
    ("id_of_table", ValueError, r"indices of table 1: id 50 at position \d+ is out of range \[0, 50\)"),
    ("bags", ValueError, r"offsets: 7 bags is not a multiple of the 3 tables"),
])
def test_table_offsets_rejects_bad_input(backend, case, exc, match):
    rng = np.random.default_rng(5)
    d, B = 6, 4  # tables of 40, 50 and 1 rows
    cum = np.array([0, 40, 90, 91], dtype=np.int64)
    w = rng.standard_normal((91, d)).astype(np.float32)
    off = np.arange(0, 3 * B + 1, dtype=np.int64)
    idx = np.array([0, 39, 7, 1, 0, 49, 3, 2, 0, 0, 0, 0], dtype=np.int64)
    if case == "first_not_zero":
        cum = np.array([1, 40, 90, 91])
    elif case == "decreasing":
        cum = np.array([0, 40, 30, 91])
    elif case == "wrong_total":
        cum = np.array([0, 40, 90, 92])
    elif case == "float":
        cum = cum.astype(np.float64)
    elif case == "two_d":
        cum = cum[None, :]
    elif case == "list_weight":
        w = [w]
    elif case == "id_of_table":
        idx[5] = 50
    elif case == "bags":
        off = off[:-5]
        idx = idx[:7]
    with pytest.raises(exc, match=match):
        ops.embedding_bag(w, idx, off, backend=backend, table_offsets=cum)


def _tbe_backward_tables(rng, rows, dims):
    return [rng.standard_normal((n, d)).astype(np.float32) for n, d in zip(rows, dims)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("optimizer", ["sgd", "rowwise_adagrad"])
@pytest.mark.parametrize("mode", ["sum", "mean"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("id_dtype", [np.int32, np.int64])
def test_tbe_backward_matches_reference(backend, optimizer, mode, weighted, id_dtype):
    """A list of tables of different sizes and dims, one call, a state per table."""
    rng = np.random.default_rng(zlib.crc32(f"tbeb/{optimizer}/{mode}/{weighted}/{id_dtype.__name__}".encode()))
    rows, dims, B = (61, 1, 97, 13), (37, 5, 16, 67), 29
    tabs = _tbe_backward_tables(rng, rows, dims)
    off, idx = _tbe_case(rng, rows=rows, B=B)
    idx, off = idx.astype(id_dtype), off.astype(id_dtype)
    g = rng.standard_normal((B, sum(dims))).astype(np.float32)
    psw = rng.standard_normal(idx.size).astype(np.float32) if weighted else None
    sts = [rng.random(n).astype(np.float32) for n in rows] if optimizer == "rowwise_adagrad" else None
    w_ref = [torch.from_numpy(w.copy()) for w in tabs]
    s_ref = None if sts is None else [torch.from_numpy(s.copy()) for s in sts]
    reference.embedding_bag_backward_tbe(w_ref, torch.from_numpy(idx), torch.from_numpy(off), torch.from_numpy(g),
                                         None if psw is None else torch.from_numpy(psw), mode, optimizer, 0.05, 1e-8,
                                         s_ref)
    w0 = [w.copy() for w in tabs]
    ops.embedding_bag_backward(tabs, idx, off, g, per_sample_weights=psw, mode=mode, optimizer=optimizer, lr=0.05,
                               state=sts, backend=backend)
    for t in range(len(rows)):
        np.testing.assert_allclose(tabs[t], w_ref[t].numpy(), rtol=RTOL, atol=ATOL)
        if sts is not None:
            np.testing.assert_allclose(sts[t], s_ref[t].numpy(), rtol=RTOL, atol=ATOL)
        ids_t = idx[off[t * B]:off[(t + 1) * B]]
        untouched = np.setdiff1d(np.arange(rows[t]), ids_t)
        assert np.array_equal(tabs[t][untouched], w0[t][untouched])
        if ids_t.size:
            assert not np.array_equal(tabs[t][ids_t], w0[t][ids_t])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("optimizer", ["sgd", "rowwise_adagrad"])
@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_table_offsets_backward_matches_list_and_reference(backend, optimizer, mode):
    rng = np.random.default_rng(zlib.crc32(f"tob/{optimizer}/{mode}".encode()))
    rows, d, B = (61, 1, 0, 97, 13), 23, 31
    T = len(rows)
    cum = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)
    whole = rng.standard_normal((int(cum[-1]), d)).astype(np.float32)
    off, idx = _tbe_case(rng, rows=rows, B=B)
    g = rng.standard_normal((B, T * d)).astype(np.float32)
    psw = rng.standard_normal(idx.size).astype(np.float32)
    st = rng.random(int(cum[-1])).astype(np.float32) if optimizer == "rowwise_adagrad" else None
    # reference (whole table, global ids)
    w_ref = torch.from_numpy(whole.copy())
    s_ref = None if st is None else torch.from_numpy(st.copy())
    reference.embedding_bag_backward_table_offsets(w_ref, torch.from_numpy(cum), torch.from_numpy(idx),
                                                   torch.from_numpy(off), torch.from_numpy(g), torch.from_numpy(psw),
                                                   mode, optimizer, 0.03, 1e-8, s_ref)
    # list form on copies of the row ranges
    parts = [whole[cum[t]:cum[t + 1]].copy() for t in range(T)]
    pst = None if st is None else [st[cum[t]:cum[t + 1]].copy() for t in range(T)]
    ops.embedding_bag_backward(parts, idx, off, g, per_sample_weights=psw, mode=mode, optimizer=optimizer, lr=0.03,
                               state=pst, backend=backend)
    # the table_offsets form, in place on the whole table (torch tensors this time)
    w_t = torch.from_numpy(whole.copy())
    s_t = None if st is None else torch.from_numpy(st.copy())
    ops.embedding_bag_backward(w_t, torch.from_numpy(idx), torch.from_numpy(off), torch.from_numpy(g),
                               per_sample_weights=torch.from_numpy(psw), mode=mode, optimizer=optimizer, lr=0.03,
                               state=s_t, backend=backend, table_offsets=torch.from_numpy(cum))
    np.testing.assert_allclose(w_t.numpy(), w_ref.numpy(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(np.concatenate(parts), w_ref.numpy(), rtol=RTOL, atol=ATOL)
    if st is not None:
        np.testing.assert_allclose(s_t.numpy(), s_ref.numpy(), rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(np.concatenate(pst), s_ref.numpy(), rtol=RTOL, atol=ATOL)
    assert not np.array_equal(w_t.numpy(), whole)


@needs_cpp
@pytest.mark.parametrize("optimizer", ["sgd", "rowwise_adagrad"])
def test_tbe_backward_bit_identical_across_thread_counts(optimizer):
    from recmeta_sdk import _core

    rng = np.random.default_rng(43)
    rows, dims, B = (20011, 5003, 30011), (67, 16, 33), 4001
    tabs0 = _tbe_backward_tables(rng, rows, dims)
    off, idx = _tbe_case(rng, rows=rows, B=B, max_len=61)
    # large enough for the threaded sort and update of each table
    assert all(off[(t + 1) * B] - off[t * B] > 1 << 16 for t in range(len(rows)))
    g = rng.standard_normal((B, sum(dims))).astype(np.float32)
    psw = rng.standard_normal(idx.size).astype(np.float32)
    sts0 = [rng.random(n).astype(np.float32) for n in rows]
    results = []
    old = _core.get_num_threads()
    try:
        for n in (1, 2, 1, 2):
            _core.set_num_threads(n)
            ws, ss = [w.copy() for w in tabs0], [s.copy() for s in sts0]
            ops.embedding_bag_backward(ws, idx, off, g, per_sample_weights=psw, mode="mean", optimizer=optimizer,
                                       lr=0.01, state=ss if optimizer == "rowwise_adagrad" else None, backend="cpp")
            results.append((ws, ss))
    finally:
        _core.set_num_threads(old)
    for ws, ss in results[1:]:
        for t in range(len(rows)):
            assert np.array_equal(ws[t], results[0][0][t])
            assert np.array_equal(ss[t], results[0][1][t])
    assert all(not np.array_equal(results[0][0][t], tabs0[t]) for t in range(len(rows)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case, exc, match", [
    ("id_of_table", ValueError, r"indices of table 1: id 9 at position 5 is out of range \[0, 9\)"),
    ("grad_shape", ValueError, r"grad_output: expected shape \(4, 11\)"),
    ("grad_nan", ValueError, r"grad_output: non-finite value"),
    ("state_list", ValueError, r"state: for a list of 2 tables, give a list of 2"),
    ("state_len", ValueError, r"state\[1\]: expected shape \(9,\)"),
    ("state_nan", ValueError, r"state\[0\]: non-finite value"),
    ("table_dtype", TypeError, r"weight\[1\]: the fused update needs a 2-D float32 table"),
    ("bags", ValueError, r"offsets: 7 bags is not a multiple of the 2 tables"),
])
def test_tbe_backward_rejects_bad_input_before_any_update(backend, case, exc, match):
    rng = np.random.default_rng(9)
    tabs = [rng.standard_normal((13, 4)).astype(np.float32), rng.standard_normal((9, 7)).astype(np.float32)]
    off = np.array([0, 2, 3, 3, 4, 6, 7, 7, 8], dtype=np.int64)
    idx = np.array([0, 12, 5, 1, 2, 8, 0, 3], dtype=np.int64)
    g = rng.standard_normal((4, 11)).astype(np.float32)
    sts = [np.ones(13, np.float32), np.ones(9, np.float32)]
    if case == "id_of_table":
        idx[5] = 9
    elif case == "grad_shape":
        g = g[:, :10]
    elif case == "grad_nan":
        g[3, 10] = np.nan
    elif case == "state_list":
        sts = sts[0]
    elif case == "state_len":
        sts[1] = np.ones(8, np.float32)
    elif case == "state_nan":
        sts[0][4] = np.inf
    elif case == "table_dtype":
        tabs[1] = tabs[1].astype(np.float64)
    elif case == "bags":
        off = off[:-1]
        idx = idx[:7]
    before = [w.copy() for w in tabs]
    with pytest.raises(exc, match=match):
        ops.embedding_bag_backward(tabs, idx, off, g, optimizer="rowwise_adagrad", state=sts, backend=backend)
    for w, w0 in zip(tabs, before):
        assert np.array_equal(w, w0)


def test_recmeta_backend_variable_is_read_on_every_call(monkeypatch):
    """The short path for plain tensors still honours RECMETA_BACKEND, set or unset at any time."""
    rng = np.random.default_rng(13)
    w = torch.from_numpy(rng.standard_normal((17, 5)).astype(np.float32))
    idx, off = torch.tensor([3, 16, 0], dtype=torch.int64), torch.tensor([0, 2, 3], dtype=torch.int64)
    want = reference.embedding_bag(w, idx, off)
    torch.testing.assert_close(ops.embedding_bag(w, idx, off), want, rtol=RTOL, atol=ATOL)
    monkeypatch.setenv("RECMETA_BACKEND", "no-such-backend")
    with pytest.raises(ValueError, match="unknown backend 'no-such-backend'"):
        ops.embedding_bag(w, idx, off)
    monkeypatch.setenv("RECMETA_BACKEND", "torch")
    torch.testing.assert_close(ops.embedding_bag(w, idx, off), want, rtol=0, atol=0)
    monkeypatch.delenv("RECMETA_BACKEND")
    torch.testing.assert_close(ops.embedding_bag(w, idx, off), want, rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------------------------------------
# the forward's range checks are fused into the gather: bad values anywhere in a large call
# (many work items, both thread counts, every table layout and dtype) are found and named
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("id_dtype", [np.int32, np.int64])
@pytest.mark.parametrize("where", ["first", "middle", "last"])
@pytest.mark.parametrize("kind", ["id_too_large", "id_negative", "offsets_decrease", "offsets_leave_table"])
@pytest.mark.parametrize("table", ["f32", "fp16", "int8", "f32_d200"])
def test_forward_fused_checks_name_the_bad_value(threads, id_dtype, where, kind, table):
    from recmeta_sdk import _core

    rng = np.random.default_rng(zlib.crc32(f"{where}{kind}{table}".encode()))
    T, B = 3, 517  # several work items per table, the last one partial
    dims = [200, 37, 200] if table == "f32_d200" else [37, 16, 5]
    rows = [1009, 211, 97]
    tabs = [rng.standard_normal((n, d)).astype(np.float32) for n, d in zip(rows, dims)]
    if table in ("fp16", "int8"):
        tabs = [ops.quantize(w, table) for w in tabs]
    lens = rng.integers(0, 9, size=T * B)
    off = np.concatenate([[0], np.cumsum(lens)]).astype(id_dtype)
    idx = np.concatenate([rng.integers(0, rows[t], size=int(lens[t * B:(t + 1) * B].sum()))
                          for t in range(T)]).astype(id_dtype)
    good = ops.embedding_bag(tabs, idx, off, backend="cpp")
    np.testing.assert_allclose(good, ops.embedding_bag(tabs, idx, off, backend="torch"), rtol=1e-5, atol=1e-5)
    t = {"first": 0, "middle": 1, "last": 2}[where]
    lo, hi = int(off[t * B]), int(off[(t + 1) * B])
    pos = {"first": lo, "middle": (lo + hi) // 2, "last": hi - 1}[where]
    bag = {"first": t * B + 1, "middle": t * B + B // 2, "last": (t + 1) * B - 2}[where]
    name = "indices" if T == 1 else f"indices of table {t}"
    if kind == "id_too_large":
        idx[pos] = rows[t]
        match = rf"{name}: id {rows[t]} at position {pos} is out of range \[0, {rows[t]}\)"
    elif kind == "id_negative":
        idx[pos] = -3
        match = rf"{name}: id -3 at position {pos} is out of range"
    elif kind == "offsets_decrease":
        off[bag] = off[bag - 1] - 1 if off[bag - 1] > 0 else off[bag + 1] + 1
        match = r"offsets decrease at position"
    else:  # inside table t's bags, past its span (the next offsets are larger still)
        off[bag] = off[(t + 1) * B] + 1
        match = r"offsets decrease at position"
    old = _core.get_num_threads()
    try:
        _core.set_num_threads(threads)
        with pytest.raises(ValueError, match=match):
            ops.embedding_bag(tabs, idx, off, backend="cpp")
        if table == "f32":  # the one-table fast path (torch tensors, default backend) too
            one = torch.from_numpy(np.ascontiguousarray(idx[lo:hi]))
            o1 = torch.from_numpy((off[t * B:(t + 1) * B + 1] - off[t * B]).astype(id_dtype))
            if kind.startswith("id"):
                with pytest.raises(ValueError, match=rf"indices: id -?\d+ at position {pos - lo} is out of range"):
                    ops.embedding_bag(torch.from_numpy(tabs[t]), one, o1)
    finally:
        _core.set_num_threads(old)


@needs_cpp
@pytest.mark.parametrize("dtype", ["f32", "fp16", "int8"])
@pytest.mark.parametrize("T", [1, 2])
def test_forward_small_calls_split_over_threads_give_the_same_bags(dtype, T):
    """A call with work enough for the threads but fewer than 2 * threads ranges of 64 bags is
    split into ranges of down to 8 bags. Every batch size around those boundaries gives, on 2
    threads, bit for bit the 1-thread output and the reference's; a bad id in the last, partial
    range of a split call is found and named; with bags of very different lengths per table, the
    threads' runs (balanced by cost) still give the 1-thread output bit for bit."""
    from recmeta_sdk import _core

    rng = np.random.default_rng(zlib.crc32(f"split{dtype}{T}".encode()))
    rows, d = 3001, 128
    tabs = [rng.standard_normal((rows, d)).astype(np.float32) for _ in range(T)]
    qtabs = tabs if dtype == "f32" else [ops.quantize(w, dtype) for w in tabs]
    old = _core.get_num_threads()
    try:
        for B in (1, 7, 8, 9, 17, 20, 31, 33, 40, 63, 64, 65, 100, 127, 129):
            lens = rng.integers(18, 31, size=T * B)  # bags of about 24 ids: B >= 11 is split
            lens[B // 2] = 0  # an empty bag
            off = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
            idx = rng.integers(0, rows, size=int(off[-1])).astype(np.int64)
            want = ops.embedding_bag(qtabs if T > 1 else qtabs[0], idx, off, backend="torch")
            outs = []
            for threads in (1, 2):
                _core.set_num_threads(threads)
                outs.append(ops.embedding_bag(qtabs if T > 1 else qtabs[0], idx, off, backend="cpp"))
            assert np.array_equal(outs[0], outs[1]), f"B={B}: 1 and 2 threads differ"
            # int8 rows are summed as sum(s_i q_i) + sum(m_i) (a documented reordering) whose
            # intermediates reach about 24 ids x 3: a few of their float32 ulps
            np.testing.assert_allclose(outs[1], want, rtol=1e-5, atol=1e-4 if dtype == "int8" else 1e-5,
                                       err_msg=f"B={B}")
            assert not outs[1][B // 2, :d].any()
        if T == 2:  # runs balanced by cost: table 0's bags hold 60 ids, table 1's one id
            B = 300
            lens = np.concatenate([rng.integers(55, 66, size=B), np.ones(B, dtype=np.int64)])
            off = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
            idx = rng.integers(0, rows, size=int(off[-1])).astype(np.int64)
            outs = []
            for threads in (1, 2):
                _core.set_num_threads(threads)
                outs.append(ops.embedding_bag(qtabs, idx, off, backend="cpp"))
            assert np.array_equal(outs[0], outs[1])
            np.testing.assert_allclose(outs[1], ops.embedding_bag(qtabs, idx, off, backend="torch"),
                                       rtol=1e-5, atol=2e-4 if dtype == "int8" else 2e-5)
        # 40 bags per table (ranges of 8 bags on 2 threads); a bad id at the very end
        B = 40
        off = np.concatenate([[0], np.cumsum(rng.integers(18, 31, size=T * B))]).astype(np.int64)
        idx = rng.integers(0, rows, size=int(off[-1])).astype(np.int64)
        idx[-1] = rows + 5
        name = "indices" if T == 1 else f"indices of table {T - 1}"
        _core.set_num_threads(2)
        with pytest.raises(ValueError, match=rf"{name}: id {rows + 5} at position {len(idx) - 1} is out of range"):
            ops.embedding_bag(qtabs if T > 1 else qtabs[0], idx, off, backend="cpp")
        # hostile inner offsets (the split reads them before any check): refused, named
        idx[-1] = 0
        for v in (2**60, -(2**60)):
            bad = off.copy()
            bad[B // 2 + 3] = v
            with pytest.raises(ValueError, match=r"offsets decrease at position"):
                ops.embedding_bag(qtabs if T > 1 else qtabs[0], idx, bad, backend="cpp")
    finally:
        _core.set_num_threads(old)


@needs_cpp
@pytest.mark.parametrize("table_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("ids_dtype, offs_dtype", [(torch.int64, torch.int64), (torch.int32, torch.int64),
                                                   (torch.int64, torch.int32), (torch.int32, torch.int32)])
@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_forward_fast_path_matches_reference(monkeypatch, table_dtype, ids_dtype, offs_dtype, mode):
    """The one-table torch call on the default backend takes the short path (a counted wrapper
    shows it), and gives the reference's result, empty bags included; calls it must not take
    (a table that needs a gradient, a strided table, RECMETA_BACKEND set) take the general path
    and still give that result."""
    from recmeta_sdk.ops import _embedding_bag as m

    rng = np.random.default_rng(zlib.crc32(f"{table_dtype}{ids_dtype}{offs_dtype}{mode}".encode()))
    w = torch.from_numpy(rng.standard_normal((1009, 37)).astype(np.float32)).to(table_dtype)
    off = make_offsets(rng, 131, max_len=23)
    off[5] = off[4]  # an empty bag
    off[6:] = np.maximum(off[6:], off[5])
    idx = torch.from_numpy(rng.integers(0, 1009, size=int(off[-1]))).to(ids_dtype)
    offt = torch.from_numpy(off).to(offs_dtype)
    ref = reference.embedding_bag(w.float(), idx.long(), offt.long(), None, mode)
    real = m._init_fast_core()
    assert real is not None
    calls = []
    monkeypatch.setattr(m, "_FAST_CORE", lambda *a: calls.append(a) or real(*a))
    out = ops.embedding_bag(w, idx, offt, mode=mode)
    assert len(calls) == 1 and isinstance(out, torch.Tensor) and out.dtype == torch.float32
    assert torch.equal(out[4], torch.zeros(37))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # calls the short path must leave to the general one
    wg = w.float().clone().requires_grad_(True)
    out_g = ops.embedding_bag(wg, idx, offt, mode=mode)
    out_g.sum().backward()
    assert wg.grad is not None
    wide = torch.zeros((1009, 74), dtype=table_dtype)
    wide[:, ::2] = w
    out_s = ops.embedding_bag(wide[:, ::2], idx, offt, mode=mode)
    monkeypatch.setenv("RECMETA_BACKEND", "torch")
    out_t = ops.embedding_bag(w, idx, offt, mode=mode)
    assert len(calls) == 1
    for o in (out_g.detach(), out_s, out_t):
        torch.testing.assert_close(o, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", ["fp16", "int8"])
def test_quantize_large_table_moved_to_numpy_memory_unchanged(dtype):
    """Arrays of 4 MB and more are moved into numpy-allocated memory (huge pages where the
    kernel allows them); their values are the reference quantisation's, bit for bit, and the
    ops read them as before."""
    from recmeta_sdk.ops import _common as _ops_common

    rng = np.random.default_rng(97)
    w = torch.from_numpy(rng.standard_normal((70001, 64)).astype(np.float32))
    q = ops.quantize(w, dtype)
    ref = reference.quantize(w, dtype)
    assert q.data.numel() * q.data.element_size() >= _ops_common._NUMPY_BACKED_MIN_BYTES
    assert isinstance(q.data, torch.Tensor) and q.data.is_contiguous() and q.data.dtype == ref.data.dtype
    assert torch.equal(q.data, ref.data)
    for a, b in ((q.row_scale, ref.row_scale), (q.row_min, ref.row_min)):
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b))
    off = torch.from_numpy(make_offsets(rng, 257, max_len=11))
    idx = torch.from_numpy(rng.integers(0, 70001, size=int(off[-1])))
    torch.testing.assert_close(ops.embedding_bag(q, idx, off), reference.embedding_bag(ref, idx, off, None, "sum"),
                               rtol=1e-5, atol=2e-5)


@needs_cpp
@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_eager_autograd_equals_custom_op(mode):
    """Eager calls go through a plain autograd.Function (no torch._dynamo import); the
    custom op (used under torch.compile) must give the same values and gradients."""
    from recmeta_sdk.ops import _embedding_bag as eb

    rng = np.random.default_rng(7)
    tabs = [torch.tensor(rng.standard_normal((13, 5)), dtype=torch.float32, requires_grad=True),
            torch.tensor(rng.standard_normal((9, 3)), dtype=torch.float32, requires_grad=True)]
    B = 11
    off = [make_offsets(rng, B) for _ in tabs]
    idx = [rng.integers(0, t.shape[0], off[i][-1]) for i, t in enumerate(tabs)]
    offsets = torch.from_numpy(np.concatenate([off[0], off[1][1:] + off[0][-1]]).astype(np.int64))
    indices = torch.from_numpy(np.concatenate(idx).astype(np.int64))
    psw = torch.tensor(rng.standard_normal(len(indices)), dtype=torch.float32, requires_grad=True)
    g = torch.tensor(rng.standard_normal((B, 8)), dtype=torch.float32)
    out = ops.embedding_bag(tabs, indices, offsets, per_sample_weights=psw, mode=mode)
    assert out.grad_fn is not None and "EagerBag" in type(out.grad_fn).__name__
    got = torch.autograd.grad(out, tabs + [psw], g)
    e = torch.empty(0)
    ref = eb._forward_op(tabs, [e, e], [e, e], indices, offsets, psw, mode, None, False)
    want = torch.autograd.grad(ref, tabs + [psw], g)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@needs_cpp
def test_training_does_not_import_dynamo(tmp_path):
    """A fresh process that trains a small model never imports torch._dynamo (importing it
    cost 2.7-4.4 CPU-s of each training process through the custom op's wrapper)."""
    from _helpers import run_package_child

    code = textwrap.dedent("""
        import sys
        import numpy as np, pandas as pd
        import recmeta_sdk as rm
        rng = np.random.default_rng(0)
        df = pd.DataFrame({"user": rng.integers(0, 40, 600), "item": rng.integers(0, 30, 600)})
        m = rm.train(df, config={"epochs": 1, "dim": 8, "hidden": 8}, progress=False)
        print("torch._dynamo" in sys.modules)
    """)
    out = run_package_child(code, tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False", out.stdout


@needs_cpp
@pytest.mark.parametrize("mode", ["sum", "mean"])
@pytest.mark.parametrize("n_tables", [1, 2])
def test_core_gradient_path_matches_torch(mode, n_tables):
    """Table gradients without a per-sample-weight gradient go through the compiled core
    (``_grad_core``); they must equal torch's F.embedding_bag gradients on random data, odd
    sizes, repeated ids and an empty bag included."""
    from recmeta_sdk.ops import _embedding_bag as eb

    rng = np.random.default_rng(71 + n_tables)
    specs = [(37, 13), (19, 5)][:n_tables]
    B = 17
    tabs = [torch.tensor(rng.standard_normal(s), dtype=torch.float32, requires_grad=True) for s in specs]
    offs = [make_offsets(rng, B) for _ in specs]
    for o in offs:
        o[5:] -= o[5] - o[4]  # bag 4 empty
    idx = [rng.integers(0, s[0] // 2, o[-1]) for s, o in zip(specs, offs)]
    offsets = np.concatenate([offs[0]] + [o[1:] + sum(x[-1] for x in offs[:t + 1]) for t, o in enumerate(offs[1:])])
    indices = torch.from_numpy(np.concatenate(idx).astype(np.int64))
    psw = torch.tensor(rng.random(len(indices)) + 0.25, dtype=torch.float32)  # no gradient asked
    g = torch.tensor(rng.standard_normal((B, sum(s[1] for s in specs))), dtype=torch.float32)
    calls = []
    orig = eb._grad_core
    eb._grad_core = lambda *a: calls.append(1) or orig(*a)
    try:
        out = ops.embedding_bag(tabs if n_tables > 1 else tabs[0], indices, torch.from_numpy(offsets.astype(np.int64)),
                                per_sample_weights=psw, mode=mode)
        got = torch.autograd.grad(out, tabs, g)
    finally:
        eb._grad_core = orig
    assert calls, "the core gradient path was not taken"
    col = 0
    for t, (w, o, i) in enumerate(zip(tabs, offs, idx)):
        lo = int(sum(x[-1] for x in offs[:t]))
        ref_w = w.detach().clone().requires_grad_()
        want = F.embedding_bag(torch.from_numpy(i.astype(np.int64)), ref_w, torch.from_numpy(o.astype(np.int64)),
                               mode=mode, per_sample_weights=psw[lo:lo + len(i)] if mode == "sum" else None,
                               include_last_offset=True)
        if mode == "mean":  # torch's mean ignores per-sample weights: weigh the rows by hand
            rows = ref_w[torch.from_numpy(i.astype(np.int64))] * psw[lo:lo + len(i), None]
            bag = np.repeat(np.arange(B), np.diff(o))
            want = torch.zeros(B, w.shape[1]).index_add(0, torch.from_numpy(bag), rows)
            want = want / torch.from_numpy(np.maximum(np.diff(o), 1)).to(torch.float32)[:, None]
        gw, = torch.autograd.grad(want, [ref_w], g[:, col:col + w.shape[1]])
        torch.testing.assert_close(got[t], gw, rtol=1e-5, atol=1e-5)
        col += w.shape[1]
