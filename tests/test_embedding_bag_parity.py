"""Torch parity of ops.embedding_bag (issue 18): mode="max", padding_idx, include_last_offset,
2-D indices, scale_grad_by_freq, float16 / bfloat16 / float64 tables and their gradients, the
refused max_norm, and NaN / inf table rows refused by name.

The cases port the shapes and options of torch's own embedding_bag tests
(``sample_inputs_embedding_bag`` in torch.testing._internal.common_methods_invocations and
test/nn/test_embedding.py: the known 5 x 2 example, 1-D vs 2-D padding, empty inputs,
per-sample-weight failures, non-contiguous inputs), compared against
``torch.nn.functional.embedding_bag`` and :mod:`recmeta_sdk.ops.reference` on seeded random data
with odd sizes.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from recmeta_sdk import ops
from recmeta_sdk.ops import reference

from _helpers import CPU_BACKENDS as BACKENDS, needs_cpp  # noqa: E402

TABLE_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _tol(dtype):
    """(rtol, atol) of a float32-accumulated result against torch on the float32 table."""
    return (1e-12, 1e-12) if dtype == torch.float64 else (1e-5, 2e-5)


def _grad_tol(dtype):
    return {torch.float16: (1e-2, 1e-3), torch.bfloat16: (2e-2, 1e-2)}.get(dtype, _tol(dtype))


# ---------------------------------------------------------------------------------------------
# torch's OpInfo samples (sample_inputs_embedding_bag), M = 10 -> 11, S = 5 -> 7 (odd sizes)
# ---------------------------------------------------------------------------------------------
M, S = 11, 7


def _samples(gen):
    """(name, weight shape, indices, torch kwargs) of the ported OpInfo samples."""
    def ids(shape, high, noncontiguous=False):
        x = torch.randint(0, high, shape, generator=gen)
        if noncontiguous:  # every other element of a twice-longer tensor, as make_tensor does
            big = torch.randint(0, high, shape[:-1] + (2 * shape[-1],), generator=gen)
            x = big[..., ::2]
            assert not x.is_contiguous()
        return x

    off2 = torch.tensor([0, 3])
    for weighted, mode in itertools.product((True, False), ("sum", "mean", "max")):
        if weighted and mode != "sum":  # torch: per_sample_weights only with mode='sum'
            continue
        yield "1d", (M, S), ids((S,), M), dict(offsets=off2, mode=mode), weighted
        yield "1d_noncontig", (M, S), ids((S,), M, True), dict(offsets=off2, mode=mode), weighted
        yield "empty_bag", (M, S), ids((S,), M, True), dict(offsets=torch.tensor([0, 0, 3]), mode=mode), weighted
        yield "2d", (M, S), ids((S, S), M), dict(mode=mode), weighted
        yield "2d_noncontig", (M, S), ids((S, S), M, True), dict(mode=mode), weighted
        i = ids((6,), S)
        i[0] = 4
        i[4] = 4
        yield "padding_negative", (S, S), i, dict(padding_idx=-1, offsets=off2, mode=mode), weighted
        i = ids((3, 3), S)
        i[0, 0] = 2
        i[1, 1] = 2
        yield "padding_positive_2d", (S, S), i, dict(padding_idx=2, mode=mode), weighted
        yield "include_last_offset", (S, S), ids((6,), S), dict(
            offsets=torch.tensor([0, 3, 6]), mode=mode, include_last_offset=True), False
        if mode != "max":
            i = ids((2, 2), S)
            i[0, 0] = 1
            i[0, 1] = 1
            yield "scale_grad_by_freq", (S, S), i, dict(scale_grad_by_freq=True, mode=mode), weighted


_GEN = torch.Generator().manual_seed(18)
SAMPLES = list(_samples(_GEN))


def _ours_kwargs(kw):
    """torch's keyword arguments as ops.embedding_bag takes them (torch's default offsets form)."""
    out = dict(kw)
    out.setdefault("include_last_offset", False)
    out.setdefault("offsets", None)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", TABLE_DTYPES, ids=str)
@pytest.mark.parametrize("k", range(len(SAMPLES)), ids=[f"{s[0]}-{s[3]['mode']}-{'w' if s[4] else 'u'}"
                                                       for s in SAMPLES])
def test_torch_opinfo_samples_forward_and_gradients(backend, dtype, k):
    name, shape, idx, kw, weighted = SAMPLES[k]
    gen = torch.Generator().manual_seed(1000 + k)
    w32 = torch.randn(shape, generator=gen)
    psw = torch.rand(idx.shape, generator=gen) if weighted else None
    w = w32.to(dtype).requires_grad_()
    # torch on the same values in float32 (float64 for float64): we pool in float32
    ref_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    w_ref = w.detach().to(ref_dtype).requires_grad_()
    p_ours = None if psw is None else psw.clone().to(ref_dtype).requires_grad_()
    p_ref = None if psw is None else psw.clone().to(ref_dtype).requires_grad_()
    kw_ours = _ours_kwargs(kw)
    offsets = kw_ours.pop("offsets")
    if p_ours is not None and ref_dtype == torch.float64:
        p_ours = p_ours.detach().float().requires_grad_()  # our per-sample weights are float32
    out = ops.embedding_bag(w, idx, offsets, per_sample_weights=p_ours, backend=backend, **kw_ours)
    want = F.embedding_bag(idx, w_ref, per_sample_weights=p_ref, **kw)
    assert out.dtype == ref_dtype
    rtol, atol = _tol(dtype) if p_ours is None or dtype != torch.float64 else (1e-6, 1e-6)
    torch.testing.assert_close(out.detach(), want.detach(), rtol=rtol, atol=atol)
    go = torch.randn(want.shape, generator=gen, dtype=ref_dtype)
    (out * go).sum().backward()
    (want * go).sum().backward()
    assert w.grad is not None and w.grad.dtype == dtype
    if kw.get("scale_grad_by_freq"):
        # torch 2.13's CPU embedding_bag divides by the wrong count (pytorch#190063): compare
        # with the embedding + pooling torch computes correctly
        w_chk = w.detach().to(ref_dtype).requires_grad_()
        e = F.embedding(idx, w_chk, scale_grad_by_freq=True)
        if p_ref is not None:
            e = e * p_ref.detach()[..., None]
        pooled = e.sum(1) if kw["mode"] == "sum" else e.mean(1)
        (pooled * go).sum().backward()
        want_grad = w_chk.grad
    else:
        want_grad = w_ref.grad
    rtol, atol = _grad_tol(dtype) if p_ours is None or dtype != torch.float64 else (1e-6, 1e-6)
    torch.testing.assert_close(w.grad.to(ref_dtype), want_grad.to(dtype).to(ref_dtype), rtol=rtol, atol=atol)
    if p_ours is not None:
        torch.testing.assert_close(p_ours.grad.to(ref_dtype), p_ref.grad, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# test_embedding.py: the known example (_test_EmbeddingBag), empty inputs, padding 1-D vs 2-D
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("dtype", TABLE_DTYPES, ids=str)
@pytest.mark.parametrize("id_dtype, off_dtype", [(torch.int32, torch.int64), (torch.int64, torch.int32)])
def test_known_example_with_empty_bags(backend, mode, dtype, id_dtype, off_dtype):
    w = torch.arange(1, 11, dtype=dtype).view(5, 2).requires_grad_()
    idx = torch.tensor([3, 1, 1, 1, 4, 0], dtype=id_dtype)
    off = torch.tensor([0, 0, 3, 3, 6], dtype=off_dtype)
    g = torch.tensor([99, 99, 1, 2, 99, 99, 3, 4, 99, 99], dtype=torch.float32).view(5, 2)
    if mode == "max":
        want = [[0, 0], [7, 8], [0, 0], [9, 10], [0, 0]]
        want_grad = [[0, 0], [0, 0], [0, 0], [1, 2], [3, 4]]
    else:
        den = 1 if mode == "sum" else 3
        want = [[0, 0], [13 / den, 16 / den], [0, 0], [13 / den, 16 / den], [0, 0]]
        want_grad = [[3 / den, 4 / den], [5 / den, 8 / den], [0, 0], [1 / den, 2 / den], [3 / den, 4 / den]]
    out = ops.embedding_bag(w, idx, off, mode=mode, include_last_offset=False, backend=backend)
    out.backward(g.to(out.dtype))
    rtol, atol = _grad_tol(dtype)
    torch.testing.assert_close(out.detach(), torch.tensor(want, dtype=out.dtype), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(w.grad.float(), torch.tensor(want_grad, dtype=torch.float32), rtol=rtol, atol=atol)
    # the same bags as 2-D (2 x 3) indices
    w.grad = None
    out2 = ops.embedding_bag(w, idx.view(2, 3), None, mode=mode, backend=backend)
    out2.backward(g[[1, 3]].to(out2.dtype))
    torch.testing.assert_close(out2.detach(), out.detach()[[1, 3]])
    torch.testing.assert_close(w.grad.float(), torch.tensor(want_grad, dtype=torch.float32), rtol=rtol, atol=atol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("id_dtype, off_dtype", list(itertools.product((torch.int32, torch.int64), repeat=2)))
def test_empty_input(backend, id_dtype, off_dtype):
    w = torch.randn(4, 3, requires_grad=True)
    x = torch.tensor([], dtype=id_dtype)
    for offs in ([0], [0, 0]):
        out = ops.embedding_bag(w, x, torch.tensor(offs, dtype=off_dtype), include_last_offset=False,
                                backend=backend)
        assert out.shape == (len(offs), 3) and not out.detach().any()
    out = ops.embedding_bag(w, x, torch.tensor([0, 0, 0, 0], dtype=off_dtype), mode="max", backend=backend)
    out.sum().backward()
    assert out.shape == (3, 3) and not out.detach().any() and not w.grad.any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("include_last_offset", [False, True])
@pytest.mark.parametrize("allpad", [False, True])
def test_padding_1d_matches_torch_and_padded_2d(backend, dtype, mode, include_last_offset, allpad):
    """test_embedding_bag_1D_padding_idx: bags (one full, one empty) as 1-D ids + offsets and as
    2-D ids filled with padding give the same bags and gradients, here and in torch."""
    rng = np.random.default_rng(97 + 2 * include_last_offset + allpad)
    num_words, num_bags, max_len, d = 101, 11, 10, 3
    lens = rng.integers(1, max_len, size=num_bags)
    lens[0], lens[5] = max_len, 0
    ids = np.ones(int(lens.sum()), dtype=np.int64) if allpad else rng.integers(0, num_words, size=int(lens.sum()))
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    idx1 = torch.from_numpy(ids)
    off = torch.from_numpy(np.concatenate([starts, [ids.size]]) if include_last_offset else starts)
    for pad in sorted(set(ids.tolist()))[:4] + [None]:
        pad2 = pad if pad is not None else num_words
        w0 = torch.from_numpy(rng.standard_normal((num_words + (pad is None), d))).to(dtype)
        idx2 = torch.full((num_bags, max_len), pad2, dtype=torch.int64)
        for b in range(num_bags):
            idx2[b, :lens[b]] = idx1[starts[b]:starts[b] + lens[b]]
        ws = [w0.clone().requires_grad_() for _ in range(3)]
        a = ops.embedding_bag(ws[0], idx1, off, mode=mode, padding_idx=pad, include_last_offset=include_last_offset,
                              backend=backend)
        b2 = ops.embedding_bag(ws[1], idx2, None, mode=mode, padding_idx=pad2, backend=backend)
        t = F.embedding_bag(idx1, ws[2], off, mode=mode, padding_idx=pad, include_last_offset=include_last_offset)
        go = torch.from_numpy(rng.standard_normal((num_bags, d))).to(a.dtype)
        for out in (a, b2):
            rtol, atol = _tol(dtype)
            torch.testing.assert_close(out.detach(), t.detach().to(out.dtype), rtol=rtol, atol=atol)
            (out * go).sum().backward()
        (t * go.to(t.dtype)).sum().backward()
        for wg in (ws[0].grad, ws[1].grad):
            torch.testing.assert_close(wg, ws[2].grad, rtol=1e-5, atol=1e-5)
        if pad is not None:
            assert not ws[0].grad[pad].any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_idx_out_of_range_is_named(backend):
    """test_embedding_bag_padding_idx_error: padding_idx in [-N, N) is accepted, others raise."""
    a = torch.tensor([[1, 3, 2], [0, 2, 1]])
    w = torch.rand(4, 3)
    for p in range(-6, 6):
        if -4 <= p < 4:
            want = F.embedding_bag(a, w, padding_idx=p)
            torch.testing.assert_close(ops.embedding_bag(w, a, None, mode="mean", padding_idx=p, backend=backend),
                                       want)
        else:
            with pytest.raises(ValueError, match=rf"padding_idx: {p} is outside the rows \[-4, 4\)"):
                ops.embedding_bag(w, a, None, padding_idx=p, backend=backend)
    with pytest.raises(TypeError, match="padding_idx"):
        ops.embedding_bag(w, a, None, padding_idx=1.0, backend=backend)
    with pytest.raises(ValueError, match=r"padding_idx: -4 is outside the rows of table 1 \[-3, 3\)"):
        ops.embedding_bag([w, w[:3]], a.reshape(-1), torch.tensor([0, 3, 6]), padding_idx=-4, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("id_kind", ["numpy", "torch"])
def test_padding_tbe_and_ids_named_at_their_position(backend, id_kind):
    """padding_idx is a local id of every table; a bad id is still named at its position in
    the caller's indices (the padding positions are dropped after the checks)."""
    rng = np.random.default_rng(5)
    w0, w1 = (rng.standard_normal((n, 4)).astype(np.float32) for n in (13, 7))
    idx = np.array([0, 2, 0, 6, 0, 0, 3], dtype=np.int64)
    off = np.array([0, 2, 4, 5, 7], dtype=np.int64)  # 2 tables x 2 bags
    cv = (lambda x: x) if id_kind == "numpy" else torch.from_numpy
    out = ops.embedding_bag([cv(w0), cv(w1)], cv(idx), cv(off), padding_idx=0, mode="mean", backend=backend)
    # table 0: bags [0, 2], [0, 6]; table 1: [0] (all padding: zeros), [0, 3]
    want = np.stack([np.concatenate([w0[2], np.zeros(4, np.float32)]), np.concatenate([w0[6], w1[3]])])
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-6)
    bad = idx.copy()
    bad[6] = 7
    with pytest.raises(ValueError, match=r"indices of table 1: id 7 at position 6 is out of range \[0, 7\)"):
        ops.embedding_bag([cv(w0), cv(w1)], cv(bad), cv(off), padding_idx=0, backend=backend)


# ---------------------------------------------------------------------------------------------
# options torch refuses, or we refuse
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_refused_options_name_the_argument(backend):
    """test_EmbeddingBag_per_sample_weights_failures, and max_norm (renormalises the table in
    place in torch)."""
    w = torch.randn(5, 2)
    idx = torch.tensor([3, 1, 1, 1, 4, 0])
    off = torch.tensor([0, 0, 3, 3, 6])
    with pytest.raises(ValueError, match="per_sample_weights: not supported with mode='max'"):
        ops.embedding_bag(w, idx, off, mode="max", per_sample_weights=torch.rand(6), backend=backend)
    with pytest.raises(ValueError, match="scale_grad_by_freq: not supported with mode='max'"):
        ops.embedding_bag(w, idx, off, mode="max", scale_grad_by_freq=True, backend=backend)
    with pytest.raises(ValueError, match=r"per_sample_weights: expected the shape of the indices \(7, 3\)"):
        ops.embedding_bag(w, torch.randint(5, (7, 3)), None, per_sample_weights=torch.rand(21), backend=backend)
    with pytest.raises(ValueError, match="max_norm: not supported"):
        ops.embedding_bag(w, idx, off, max_norm=1.0, backend=backend)
    with pytest.raises(ValueError, match="offsets: required for 1-D indices"):
        ops.embedding_bag(w, idx, None, backend=backend)
    with pytest.raises(ValueError, match=r"indices: expected a 1-D array with offsets"):
        ops.embedding_bag(w, idx.view(2, 3), off, backend=backend)
    with pytest.raises(TypeError, match="include_last_offset"):
        ops.embedding_bag(w, idx, off, include_last_offset=1, backend=backend)
    with pytest.raises(ValueError, match=r"offsets\[-1\] must equal the number of indices 6, got 3"):
        ops.embedding_bag(w, idx, torch.tensor([0, 3, 3]), backend=backend)  # torch lets ids trail


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_scale_grad_by_freq_divides_by_the_id_count(backend, mode):
    """Row 3 occurs once after a repeated id: its gradient is not divided (torch 2.13's CPU
    embedding_bag divides it by 2, pytorch#190063)."""
    w = torch.ones(4, 3, requires_grad=True)
    idx = torch.tensor([1, 1, 3])
    ops.embedding_bag(w, idx, torch.tensor([0, 3]), mode=mode, scale_grad_by_freq=True,
                      backend=backend).sum().backward()
    den = 1.0 if mode == "sum" else 3.0
    torch.testing.assert_close(w.grad[:, 0], torch.tensor([0.0, 1.0, 0.0, 1.0]) / den)


# ---------------------------------------------------------------------------------------------
# low-precision and float64 tables, gradients through the compiled core's autograd op
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", TABLE_DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_table_dtype_gradients_and_tbe(backend, dtype, mode):
    """Every floating table gets its gradient, in its own dtype (float16 once got None); a TBE
    call mixes dtypes; within 2x the error of torch's own run in that dtype."""
    rng = np.random.default_rng(131)
    specs = [(37, 13), (23, 5)]
    B = 17
    off = torch.from_numpy(np.concatenate([[0], np.cumsum(rng.integers(0, 6, size=2 * B))]))
    idx = torch.from_numpy(np.concatenate([rng.integers(0, specs[t][0], size=int(off[(t + 1) * B] - off[t * B]))
                                           for t in range(2)]))
    w64 = [torch.from_numpy(rng.standard_normal(s)) for s in specs]
    ws = [w64[0].to(dtype).requires_grad_(), w64[1].float().requires_grad_()]
    psw = None if mode != "sum" else torch.from_numpy(rng.random(idx.numel()).astype(np.float32))
    out = ops.embedding_bag(ws, idx, off, mode=mode, per_sample_weights=psw, backend=backend)
    go = torch.from_numpy(rng.standard_normal(out.shape))
    (out * go.to(out.dtype)).sum().backward()
    exact = [w.detach().to(torch.float64).requires_grad_() for w in ws]
    want = reference.embedding_bag_tbe(exact, idx, off, None if psw is None else psw.double(), mode)
    (want * go).sum().backward()
    assert ws[0].grad is not None and ws[0].grad.dtype == dtype and ws[1].grad.dtype == torch.float32
    # torch's own run in the table's dtype, table 0 alone, against the same float64 truth
    lo, hi = int(off[0]), int(off[B])
    wt = ws[0].detach().clone().requires_grad_()
    t_out = F.embedding_bag(idx[lo:hi], wt, off[:B + 1], mode=mode, include_last_offset=True,
                            per_sample_weights=None if psw is None else psw[lo:hi].to(dtype))
    (t_out * go[:, :13].to(t_out.dtype)).sum().backward()
    for ours, theirs, truth in ((out[:, :13].detach(), t_out.detach(), want[:, :13].detach()),
                                (ws[0].grad, wt.grad, exact[0].grad)):
        err = (ours.double() - truth).abs().max().item()
        err_torch = (theirs.double() - truth).abs().max().item()
        assert err <= 2 * err_torch + 1e-6, (err, err_torch)
    torch.testing.assert_close(ws[1].grad.double(), exact[1].grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_numpy_table(backend):
    rng = np.random.default_rng(3)
    w = rng.standard_normal((19, 6))
    idx = rng.integers(0, 19, size=23)
    off = np.array([0, 4, 4, 11, 23])
    out = ops.embedding_bag(w, idx, off, mode="mean", backend=backend)
    assert isinstance(out, np.ndarray) and out.dtype == np.float64
    want = F.embedding_bag(torch.from_numpy(idx), torch.from_numpy(w), torch.from_numpy(off), mode="mean",
                           include_last_offset=True)
    np.testing.assert_allclose(out, want.numpy(), rtol=1e-12, atol=1e-12)


@needs_cpp
def test_custom_op_new_arguments_opcheck():
    """torch.ops.recmeta.embedding_bag_forward takes mode "max", padding_idx and
    scale_grad_by_freq (defaults keep the 7-argument calls), with fake shapes and autograd."""
    rng = np.random.default_rng(67)
    w = torch.from_numpy(rng.standard_normal((43, 13)).astype(np.float32)).requires_grad_()
    w2 = torch.from_numpy(rng.standard_normal((29, 5))).requires_grad_()  # float64
    h = torch.from_numpy(rng.standard_normal((19, 8)).astype(np.float32)).half().requires_grad_()
    B = 7
    off = torch.from_numpy(np.concatenate([[0], np.cumsum(rng.integers(0, 5, size=3 * B))]))
    idx = torch.from_numpy(np.concatenate([rng.integers(0, n, size=int(off[(t + 1) * B] - off[t * B]))
                                           for t, n in enumerate((43, 29, 19))]))
    e = torch.empty(0)
    fwd = torch.ops.recmeta.embedding_bag_forward.default
    one = ([w], [e], [e], idx[: int(off[B])], off[: B + 1])
    torch.library.opcheck(fwd, one + (None, "max"))
    torch.library.opcheck(fwd, one + (None, "mean", 3))
    torch.library.opcheck(fwd, one + (None, "sum", -2, True))
    psw = torch.from_numpy(rng.random(idx.numel()).astype(np.float32)).requires_grad_()
    torch.library.opcheck(fwd, ([w, w2, h], [e, e, e], [e, e, e], idx, off, psw, "sum", 1, True))
    torch.library.opcheck(fwd, ([w, w2, h], [e, e, e], [e, e, e], idx, off, None, "max", 0))


# ---------------------------------------------------------------------------------------------
# NaN / inf table rows are refused by name (the README: a NaN raises)
# ---------------------------------------------------------------------------------------------
def _nan_table(kind, rng, n=41, d=19):
    w = rng.standard_normal((n, d)).astype(np.float32)
    if kind == "fp32":
        w[17, 4] = np.nan
        return torch.from_numpy(w), r"row 17 holds a non-finite value \(nan at column 4\)"
    if kind == "fp32_inf":
        w[17, 0] = -np.inf
        return torch.from_numpy(w), r"row 17 holds a non-finite value \(-inf at column 0\)"
    if kind == "fp16":
        w[17, 18] = np.inf
        return torch.from_numpy(w).half(), r"row 17 holds a non-finite value \(inf at column 18\)"
    q = ops.quantize(w, "int8")
    if kind == "int8_scale":
        q.row_scale[17] = float("nan")
        return q, r"row 17 has a non-finite row_scale \(nan\)"
    q.row_min[17] = float("inf")
    return q, r"row 17 has a non-finite row_min \(inf\)"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["fp32", "fp32_inf", "fp16", "int8_scale", "int8_min"])
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("threads", [1, 2])
def test_nan_rows_raise_naming_the_row(backend, kind, mode, threads):
    rng = np.random.default_rng(11)
    tab, msg = _nan_table(kind, rng)
    B = 301  # enough work for the threads: the bad row is read by a late bag
    lens = rng.integers(0, 9, size=B)
    off = torch.from_numpy(np.concatenate([[0], np.cumsum(lens)]))
    idx = torch.from_numpy(rng.integers(0, 41, size=int(off[-1])))
    idx[idx == 17] = 3
    pos = int(off[250]) + 1 if lens[250] > 1 else int(off[-1]) - 1
    idx[pos] = 17
    n = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with pytest.raises(ValueError, match=rf"^weight: {msg}, read at position {pos} of indices$"):
            ops.embedding_bag(tab, idx, off, mode=mode, backend=backend)
        # not read: no error (a padding row is not read either)
        idx[pos] = 3
        out = ops.embedding_bag(tab, idx, off, mode=mode, backend=backend)
        assert torch.isfinite(torch.as_tensor(out)).all()
        idx[pos] = 17
        ops.embedding_bag(tab, idx, off, mode=mode, backend=backend, padding_idx=17)
    finally:
        torch.set_num_threads(n)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_row_of_second_table_and_fast_path(backend):
    rng = np.random.default_rng(13)
    w0 = rng.standard_normal((11, 5)).astype(np.float32)
    w1 = rng.standard_normal((7, 3)).astype(np.float32)
    w1[2, 1] = np.nan
    idx = np.array([1, 3, 10, 2, 4], dtype=np.int64)
    with pytest.raises(ValueError, match=r"^weight\[1\]: row 2 holds a non-finite value \(nan at column 1\), "
                                         r"read at position 3 of indices$"):
        ops.embedding_bag([w0, w1], idx, np.array([0, 1, 3, 4, 5]), backend=backend)
    # the one-table call of plain tensors (the SDK's fast path on the compiled core)
    w = torch.from_numpy(w1)
    for ids in (torch.tensor([0, 2, 1]), torch.tensor([0, 2, 1], dtype=torch.int32)):
        with pytest.raises(ValueError, match=r"^weight: row 2 holds a non-finite value \(nan at column 1\), "
                                             r"read at position 1 of indices$"):
            ops.embedding_bag(w, ids, torch.tensor([0, 1, 3]), backend=backend)
    with pytest.raises(ValueError, match="row 2"):
        ops.embedding_bag(w.clone().requires_grad_(), torch.tensor([2]), torch.tensor([0, 1]), backend=backend)
    with pytest.raises(ValueError, match="row 2"):
        ops.embedding_bag(w, torch.tensor([3, 2, 1]), torch.tensor([0, 1, 3]), table_offsets=[0, 7], backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_finite_overflow_stays_inf(backend):
    """Finite rows whose sum overflows float32 give inf, as in torch (no row is to blame)."""
    w = torch.full((3, 4), 3e38)
    out = ops.embedding_bag(w, torch.tensor([0, 1, 2]), torch.tensor([0, 3]), backend=backend)
    assert torch.isinf(out).all()
    torch.testing.assert_close(out, F.embedding_bag(torch.tensor([0, 1, 2]), w, torch.tensor([0])))
