"""Property fuzz of every public op of :mod:`recmeta_sdk.ops` on the ``cpp`` backend against
the pure-torch reference (:mod:`recmeta_sdk.ops.reference` / ``backend="torch"``). Issue 18,
reliability.md "Tests that prove it" (kernels and inputs).

* Valid inputs: shapes include primes and non-multiples of every block size (SIMD widths 4 /
  8 / 16, micro-tiles of 4 / 6 users, 64-user tiles, 1024-item blocks, 64-bag work items),
  ties (repeated rows, integer-valued tables whose scores tie exactly), -inf bias masks,
  exclusion / candidate lists with repeats, empty bags and batches, float32 / float16 /
  row-wise int8 tables. Results must match the reference: top-k tie-aware (scores equal
  within tolerance, ids differ only where the reference scores tie, no duplicates, and the
  exact reference ids wherever ties are exact: score descending, then id ascending, on every
  backend).
* Invalid inputs (ids out of range, malformed offsets, NaN / inf values, wrong dtypes):
  ValueError or TypeError, never another exception, never a crash.

Seeded and derandomized: every run tries the same examples. ``RECMETA_FUZZ_EXAMPLES`` sets
the examples per property (default 50: the file runs in about 10-25 s on 2 shared cores).
``.ci/sanitize`` runs this file against an ASan/UBSan build of the core. The figures
(properties x examples run, counterexamples) are printed in the terminal summary
(``pytest_terminal_summary`` in conftest.py).
"""
from __future__ import annotations

import collections
import os

import numpy as np
import pytest
import torch

from recmeta_sdk import ops
from recmeta_sdk.ops import backends
from recmeta_sdk.ops import reference as R
from _helpers import bags, check_ranked, floats, policy_case, table_pair, with_repeats

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

if not backends.available("cpp"):  # pragma: no cover
    pytest.skip("the compiled core is not built", allow_module_level=True)

EXAMPLES = int(os.environ.get("RECMETA_FUZZ_EXAMPLES", "50"))
FUZZ = settings(derandomize=True, deadline=None, max_examples=EXAMPLES, database=None,
                suppress_health_check=list(HealthCheck))

# Examples run per property; read by conftest.py's pytest_terminal_summary.
FIGURES: "collections.Counter[str]" = collections.Counter()


@pytest.fixture(scope="module", autouse=True)
def _report_figures(request):
    request.config._recmeta_fuzz_figures = FIGURES
    yield


def _count(name: str) -> None:
    FIGURES[name] += 1


RTOL, ATOL = 2e-5, 2e-4  # scores (as tests/test_policy_topk.py)
EB_RTOL, EB_ATOL = 1e-5, 2e-5  # pooled rows (as tests/test_embedding_bag.py)

# Sizes: primes and non-multiples of every block size, with the boundaries themselves.
USERS = st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 11, 13, 17, 31, 37, 65, 67])
ITEMS = st.sampled_from([1, 2, 3, 5, 7, 8, 13, 16, 17, 31, 61, 64, 97, 127, 129, 251, 1021, 1024, 1031, 2053])
DIMS = st.sampled_from([1, 2, 3, 4, 5, 7, 8, 9, 13, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 131])
TABLE_DTYPES = st.sampled_from(["fp32", "fp16", "int8", "fp16_array"])
SEEDS = st.integers(0, 2**32 - 1)


# (input builders and the tie-aware comparison: tests/_helpers.py)


# ---------------------------------------------------------------------------------------
# valid inputs: cpp against the reference
# ---------------------------------------------------------------------------------------
POLICY_ARGS = dict(
    B=USERS, N=ITEMS, d=DIMS, k=st.sampled_from([0, 1, 2, 3, 5, 7, 16, 17, 33, 100, 5000]),
    dtype=TABLE_DTYPES, bias=st.sampled_from(["none", "plain", "mask", "all_masked"]),
    exclude=st.sampled_from([None, None, 0, 3, 40]), cand=st.sampled_from([None, None, 0, 5, 60]),
    ties=st.sampled_from(["none", "repeat", "integer"]), tau=st.sampled_from([0.3, 1.0, 2.5]),
    seed=SEEDS,
)


def _exact(dtype, ties, tau):
    # integer tables and users (float32 / float16 codes) give exact scores on every path;
    # int8 dequantises with rounding, and 1 / tau rounds unless tau == 1.
    return ties == "integer" and dtype in ("fp32", "fp16", "fp16_array") and tau == 1.0


@FUZZ
@given(**POLICY_ARGS)
def test_policy_topk_matches_reference(B, N, d, k, dtype, bias, exclude, cand, ties, tau, seed):
    _count("policy_topk")
    u, tab, ref_tab, b, exc, cnd = policy_case(B, N, d, dtype, bias, exclude, cand, ties, seed,
                                              idx_dtype=np.int32 if seed % 2 else np.int64)
    ids, sc, ln = ops.policy_topk(u, tab, k, bias=b, exclude=exc, candidates=cnd, temperature=tau,
                                  backend="cpp")
    rids, rsc, rln = R.policy_topk(u, ref_tab, k, b, exc, cnd, tau)
    full = R._scores(u, ref_tab, b, tau)
    mask = R.eligible_mask(B, N, exc, cnd) & ~torch.isneginf(full)
    check_ranked(ids, sc, full, mask, rids, k, _exact(dtype, ties, tau), ref_keys=rsc, rtol=RTOL, atol=ATOL)
    assert torch.equal(torch.isneginf(ln), torch.isneginf(rln))
    # the log-normaliser's rounding scales with the largest score it sums
    scale = full.masked_fill(~mask, 0).abs().amax(1) if N else torch.zeros(B)
    fin = torch.isfinite(rln)
    err = (ln[fin].double() - rln[fin].double()).abs()
    assert (err <= 1e-5 + 1e-5 * rln[fin].double().abs() + 1e-6 * scale[fin].double()).all(), (ln, rln)
    # the torch backend follows the same documented order
    tids, tsc, _ = ops.policy_topk(u, tab, k, bias=b, exclude=exc, candidates=cnd, temperature=tau,
                                   backend="torch")
    check_ranked(tids, tsc, full, mask, rids, k, _exact(dtype, ties, tau), ref_keys=rsc, rtol=RTOL, atol=ATOL)


@FUZZ
@given(**POLICY_ARGS, sample_seed=st.one_of(st.integers(0, 2**16), st.integers(2**63, 2**64 - 1)))
def test_policy_sample_matches_reference(B, N, d, k, dtype, bias, exclude, cand, ties, tau, seed, sample_seed):
    _count("policy_sample")
    u, tab, ref_tab, b, exc, cnd = policy_case(B, N, d, dtype, bias, exclude, cand, ties, seed,
                                              idx_dtype=np.int32 if seed % 2 else np.int64)
    ids, sc, prop, slp = ops.policy_sample(u, tab, k, seed=sample_seed, bias=b, exclude=exc, candidates=cnd,
                                           temperature=tau, backend="cpp")
    rids, rsc, rprop, rslp = R.policy_sample(u, ref_tab, k, sample_seed, b, exc, cnd, tau)
    full = R._scores(u, ref_tab, b, tau)
    mask = R.eligible_mask(B, N, exc, cnd) & ~torch.isneginf(full)
    pert = full + R.gumbel_noise(sample_seed, torch.arange(B)[:, None], torch.arange(N)[None, :])
    key = lambda i: torch.gather(pert, 1, i.clamp(min=0)).masked_fill(i < 0, float("-inf"))  # noqa: E731
    check_ranked(ids, key(ids), pert, mask, rids, k, False, ref_keys=key(rids), rtol=RTOL, atol=ATOL)
    valid = ids >= 0
    np.testing.assert_allclose(sc[valid].numpy(), torch.gather(full, 1, ids.clamp(min=0))[valid].numpy(),
                               rtol=RTOL, atol=ATOL)
    assert torch.isneginf(sc[~valid]).all() and (prop[~valid] == 0).all()
    assert torch.isfinite(prop).all() and (prop >= 0).all() and (prop <= 1 + 1e-6).all()
    if torch.equal(ids, rids):  # same slate: same probabilities
        np.testing.assert_allclose(prop.numpy(), rprop.numpy(), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(slp.numpy(), rslp.numpy(), rtol=1e-4, atol=1e-4)
    assert torch.isfinite(slp).all() and (slp <= 1e-5).all()


EB_ROWS = st.sampled_from([1, 2, 3, 7, 13, 17, 61, 97, 251, 1031])
EB_DIMS = st.sampled_from([1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 33, 64, 65, 127, 129, 131])
EB_BAGS = st.sampled_from([0, 1, 2, 3, 7, 13, 63, 64, 65, 131])


@FUZZ
@given(n=EB_ROWS, d=EB_DIMS, B=EB_BAGS, T=st.sampled_from([1, 1, 2, 3]), max_len=st.sampled_from([0, 1, 5, 30]),
       p_empty=st.sampled_from([0.0, 0.3, 1.0]), dtype=TABLE_DTYPES, mode=st.sampled_from(["sum", "mean", "max"]),
       weighted=st.booleans(), id64=st.booleans(), seed=SEEDS)
def test_embedding_bag_matches_reference(n, d, B, T, max_len, p_empty, dtype, mode, weighted, id64, seed):
    _count("embedding_bag")
    rng = np.random.default_rng(seed)
    rows = [n if t == 0 else int(rng.integers(1, 70)) for t in range(T)]
    dims = [d if t == 0 else int(rng.integers(1, 40)) for t in range(T)]
    pairs = [table_pair(with_repeats(rng, floats(rng, (r, dd), False), 0.2), dtype) for r, dd in zip(rows, dims)]
    tabs, ref_tabs = [p[0] for p in pairs], [p[1] for p in pairs]
    idx, off = bags(rng, T * B, max_len, p_empty, np.int64 if id64 else np.int32, rows if T > 1 else n)
    psw = rng.standard_normal(idx.size).astype(np.float32) if weighted and mode != "max" else None
    weight = tabs if T > 1 else tabs[0]
    out = ops.embedding_bag(weight, idx, off, per_sample_weights=psw, mode=mode, backend="cpp")
    t = lambda x: None if x is None else torch.from_numpy(np.asarray(x))  # noqa: E731
    if T > 1:
        want = R.embedding_bag_tbe(ref_tabs, t(idx), t(off), t(psw), mode)
    else:
        want = R.embedding_bag(ref_tabs[0], t(idx), t(off), t(psw), mode)
    out = np.asarray(out)
    assert out.shape == (B, sum(dims)) and out.dtype == np.float32
    np.testing.assert_allclose(out, want.numpy(), rtol=EB_RTOL, atol=EB_ATOL)
    # empty bags pool to zero rows
    empty = np.diff(off.astype(np.int64)).reshape(T, B) == 0
    col = np.cumsum([0] + dims)
    for tt in range(T):
        assert (out[empty[tt], col[tt]:col[tt + 1]] == 0).all()
    # the torch backend agrees
    out_t = ops.embedding_bag(weight, idx, off, per_sample_weights=psw, mode=mode, backend="torch")
    np.testing.assert_allclose(out, np.asarray(out_t), rtol=EB_RTOL, atol=EB_ATOL)


@FUZZ
@given(n=EB_ROWS, d=EB_DIMS, B=EB_BAGS, T=st.sampled_from([1, 1, 2]), max_len=st.sampled_from([0, 1, 5, 30]),
       p_empty=st.sampled_from([0.0, 0.3]), mode=st.sampled_from(["sum", "mean"]),
       optimizer=st.sampled_from(["sgd", "rowwise_adagrad"]), weighted=st.booleans(), id64=st.booleans(),
       lr=st.sampled_from([0.0, 0.01, 0.5]), seed=SEEDS)
def test_embedding_bag_backward_matches_reference(n, d, B, T, max_len, p_empty, mode, optimizer, weighted, id64,
                                                  lr, seed):
    _count("embedding_bag_backward")
    rng = np.random.default_rng(seed)
    rows = [n if t == 0 else int(rng.integers(1, 70)) for t in range(T)]
    dims = [d if t == 0 else int(rng.integers(1, 40)) for t in range(T)]
    ws = [floats(rng, (r, dd), False) for r, dd in zip(rows, dims)]
    states = [np.abs(rng.standard_normal(r)).astype(np.float32) for r in rows]
    idx, off = bags(rng, T * B, max_len, p_empty, np.int64 if id64 else np.int32, rows if T > 1 else n)
    psw = rng.standard_normal(idx.size).astype(np.float32) if weighted else None
    grad = rng.standard_normal((B, sum(dims))).astype(np.float32)
    st_arg = optimizer == "rowwise_adagrad"

    ours_w, ours_s = [w.copy() for w in ws], [s.copy() for s in states]
    ref_w, ref_s = [w.copy() for w in ws], [s.copy() for s in states]
    one = T == 1
    ops.embedding_bag_backward(ours_w[0] if one else ours_w, idx, off, grad, per_sample_weights=psw, mode=mode,
                               optimizer=optimizer, lr=lr, state=(ours_s[0] if one else ours_s) if st_arg else None,
                               backend="cpp")
    ops.embedding_bag_backward(ref_w[0] if one else ref_w, idx, off, grad, per_sample_weights=psw, mode=mode,
                               optimizer=optimizer, lr=lr, state=(ref_s[0] if one else ref_s) if st_arg else None,
                               backend="torch")
    for t in range(T):
        np.testing.assert_allclose(ours_w[t], ref_w[t], rtol=1e-5, atol=1e-5)
        if st_arg:
            np.testing.assert_allclose(ours_s[t], ref_s[t], rtol=1e-5, atol=1e-6)
        else:
            np.testing.assert_array_equal(ours_s[t], states[t])
    # rows no bag reads are untouched
    if one:
        untouched = np.setdiff1d(np.arange(n), idx.astype(np.int64))
        np.testing.assert_array_equal(ours_w[0][untouched], ws[0][untouched])


@FUZZ
@given(N=ITEMS, d=DIMS, dtype=st.sampled_from(["fp16", "int8"]), scale=st.sampled_from([1e-3, 1.0, 1e3]),
       constant_rows=st.booleans(), seed=SEEDS)
def test_quantize_matches_reference(N, d, dtype, scale, constant_rows, seed):
    _count("quantize")
    rng = np.random.default_rng(seed)
    w = (floats(rng, (N, d), False) * scale).astype(np.float32)
    if constant_rows:
        w[rng.random(N) < 0.3] = np.float32(rng.standard_normal())
    q = ops.quantize(w, dtype)
    r = R.quantize(torch.from_numpy(w), dtype)
    assert q.dtype == r.dtype and q.shape == (N, d)
    for a, b in ((q.data, r.data), (q.row_scale, r.row_scale), (q.row_min, r.row_min)):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(torch.as_tensor(a), b)
    deq = R.dequantize(q)
    err = (deq - torch.from_numpy(w)).abs()
    if dtype == "int8":  # half a step per row (plus rounding)
        bound = q.row_scale[:, None] * 0.5 + 1e-6 * torch.from_numpy(np.abs(w)).amax(1, keepdim=True) + 1e-7
        assert (err <= bound).all()
    # the quantised table pools like the reference on the cpp backend (identity bags)
    off = np.arange(N + 1, dtype=np.int64)
    out = ops.embedding_bag(q, np.arange(N, dtype=np.int64), off, backend="cpp")
    np.testing.assert_allclose(out, deq.numpy(), rtol=1e-5, atol=1e-5 * scale)


# ---------------------------------------------------------------------------------------
# invalid inputs: ValueError / TypeError only
# ---------------------------------------------------------------------------------------
POLICY_HOSTILE = ["exclude_id_high", "exclude_id_negative", "candidate_id_high", "offsets_decrease",
                  "offsets_short", "offsets_past_end", "offsets_first", "offsets_float", "user_nan", "user_inf",
                  "item_nan", "item_inf", "int8_scale_nan", "int8_min_inf", "bias_nan", "bias_posinf",
                  "bias_shape", "user_dim", "user_float64", "k_negative", "k_float", "k_bool", "tau_zero",
                  "tau_nan", "seed_negative", "seed_huge", "ids_float", "items_int"]


@FUZZ
@given(B=st.sampled_from([1, 2, 3, 7, 13]), N=st.sampled_from([1, 2, 17, 97, 1031]), d=st.sampled_from([1, 3, 16, 33]),
       hostile=st.sampled_from(POLICY_HOSTILE), op=st.sampled_from(["topk", "sample"]),
       dtype=st.sampled_from(["fp32", "fp16", "int8"]), id64=st.booleans(), seed=SEEDS)
def test_policy_ops_reject_invalid_inputs(B, N, d, hostile, op, dtype, id64, seed):
    _count("policy_invalid")
    rng = np.random.default_rng(seed)
    u = floats(rng, (B, d), False)
    w = floats(rng, (N, d), False)
    b = None
    k, tau, sseed = 3, 1.0, 7
    idt = np.int64 if id64 else np.int32
    off = np.arange(B + 1, dtype=idt)
    ids = rng.integers(0, N, size=B).astype(idt)
    exc = cand = None
    where = rng.integers(0, max(B, 1))
    big = np.iinfo(idt).max
    if hostile in ("exclude_id_high", "candidate_id_high"):
        ids[where] = int(rng.integers(N, big))
    elif hostile == "exclude_id_negative":
        ids[where] = -int(rng.integers(1, big))
    elif hostile == "offsets_decrease" and B > 1:
        off[1] = 2
        off[2] = 1
    elif hostile == "offsets_decrease":
        off[1] = -1
    elif hostile == "offsets_short":
        off = off[:-1]
    elif hostile == "offsets_past_end":
        off[-1] += 1
    elif hostile == "offsets_first":
        off = off + 1
    elif hostile == "offsets_float":
        off = off.astype(np.float32)
    elif hostile == "ids_float":
        ids = ids.astype(np.float32)
    elif hostile in ("user_nan", "user_inf"):
        u[rng.integers(B), rng.integers(d)] = np.nan if hostile == "user_nan" else -np.inf
    elif hostile in ("item_nan", "item_inf"):
        w[rng.integers(N), rng.integers(d)] = np.nan if hostile == "item_nan" else np.inf
    elif hostile in ("bias_nan", "bias_posinf"):
        b = rng.standard_normal(N).astype(np.float32)
        b[rng.integers(N)] = np.nan if hostile == "bias_nan" else np.inf
    elif hostile == "bias_shape":
        b = np.zeros(N + 1, np.float32)
    elif hostile == "user_dim":
        u = floats(rng, (B, d + 1), False)
    elif hostile == "user_float64":
        u = u.astype(np.float64)
    elif hostile == "k_negative":
        k = -1
    elif hostile == "k_float":
        k = 2.0
    elif hostile == "k_bool":
        k = True
    elif hostile == "tau_zero":
        tau = 0.0
    elif hostile == "tau_nan":
        tau = float("nan")
    elif hostile == "seed_negative":
        sseed = -1
    elif hostile == "seed_huge":
        sseed = 2**64
    elif hostile == "items_int":
        w = w.astype(np.int32)
    pair = (off, ids)
    if hostile.startswith("candidate"):
        cand = pair
    else:
        exc = pair
    table = w
    if hostile in ("int8_scale_nan", "int8_min_inf"):
        dtype = "int8"
    if dtype != "fp32" and w.dtype == np.float32 and np.isfinite(w).all():
        q = ops.quantize(w, dtype)
        if hostile == "int8_scale_nan":
            q.row_scale[rng.integers(N)] = float("nan")
        elif hostile == "int8_min_inf":
            q.row_min[rng.integers(N)] = float("inf")
        table = q
    elif dtype == "fp16" and w.dtype == np.float32:
        table = w.astype(np.float16)  # inf / NaN survive the cast
    if hostile == "seed_negative" or hostile == "seed_huge":
        if op == "topk":
            op = "sample"
    with pytest.raises((ValueError, TypeError)):
        if op == "topk":
            ops.policy_topk(u, table, k, bias=b, exclude=exc, candidates=cand, temperature=tau, backend="cpp")
        else:
            ops.policy_sample(u, table, k, seed=sseed, bias=b, exclude=exc, candidates=cand, temperature=tau,
                              backend="cpp")


def _hostile_bags(seed, id64, n, d, B):
    """(rng, w (n, d), offsets, ids, big, pos): random bags of 1-4 ids over an fp32 table, the
    largest value of the id dtype and a random position among the ids, for the hostile cases."""
    rng = np.random.default_rng(seed)
    idt = np.int64 if id64 else np.int32
    w = floats(rng, (n, d), False)
    lens = rng.integers(1, 5, size=B)
    off = np.concatenate([[0], np.cumsum(lens)]).astype(idt)
    idx = rng.integers(0, n, size=int(off[-1])).astype(idt)
    return rng, w, off, idx, np.iinfo(idt).max


def _corrupt_ids_offsets(hostile, rng, idx, off, n, B, big, pos) -> bool:
    """Apply the id / offset cases both embedding-bag ops share, in place; False for others."""
    if hostile == "id_high":
        idx[pos] = int(rng.integers(n, big))
    elif hostile == "id_negative":
        idx[pos] = -int(rng.integers(1, big))
    elif hostile == "offsets_decrease":
        off[1] = off[-1] + 1 if B > 1 else -1
    elif hostile == "offsets_past_end":
        off[-1] += int(rng.integers(1, 10**6))
    elif hostile == "offsets_first":
        off[0] = 1 if off[1] >= 1 else -1
    else:
        return False
    return True


EB_HOSTILE = ["id_high", "id_negative", "offsets_decrease", "offsets_past_end", "offsets_short_of_nnz",
              "offsets_first", "offsets_empty", "offsets_float", "ids_float", "ids_2d_bad", "psw_nan", "psw_shape",
              "row_nan", "row_inf", "int8_scale_nan", "table_int", "table_1d", "mode_bad", "tables_mismatch"]


@FUZZ
@given(n=st.sampled_from([1, 2, 17, 97]), d=st.sampled_from([1, 3, 16, 33]), B=st.sampled_from([1, 2, 7, 65]),
       hostile=st.sampled_from(EB_HOSTILE), dtype=st.sampled_from(["fp32", "fp16", "int8"]), id64=st.booleans(),
       seed=SEEDS)
def test_embedding_bag_rejects_invalid_inputs(n, d, B, hostile, dtype, id64, seed):
    _count("embedding_bag_invalid")
    rng, w, off, idx, big = _hostile_bags(seed, id64, n, d, B)
    psw, mode = None, "sum"
    weight = None
    pos = int(rng.integers(idx.size))
    if _corrupt_ids_offsets(hostile, rng, idx, off, n, B, big, pos):
        pass
    elif hostile == "offsets_short_of_nnz":
        off[-1] -= 1
    elif hostile == "offsets_empty":
        off = off[:0]
    elif hostile == "offsets_float":
        off = off.astype(np.float32)
    elif hostile == "ids_float":
        idx = idx.astype(np.float32)
    elif hostile == "ids_2d_bad":
        idx = idx[: (idx.size // 2) * 2].reshape(2, -1) if idx.size >= 2 else idx.reshape(1, 1)
    elif hostile == "psw_nan":
        psw = np.ones(idx.size, np.float32)
        psw[pos] = np.nan
    elif hostile == "psw_shape":
        psw = np.ones(idx.size + 1, np.float32)
    elif hostile in ("row_nan", "row_inf"):
        w[int(idx[pos]), rng.integers(d)] = np.nan if hostile == "row_nan" else -np.inf
        if dtype == "int8":
            dtype = "fp16"  # quantize() refuses the row itself; fp16 keeps it
    elif hostile == "table_int":
        weight = w.astype(np.int32)
    elif hostile == "table_1d":
        weight = w.reshape(-1)
    elif hostile == "mode_bad":
        mode = "median"
    elif hostile == "tables_mismatch":  # two tables, one table's worth of bags
        weight = [w, w]
        if B % 2 == 0:
            off = off[:-1].copy()
            off[-1] = idx.size
    if weight is None:
        if dtype == "int8" or hostile == "int8_scale_nan":
            weight = ops.quantize(w, "int8")
            if hostile == "int8_scale_nan":
                weight.row_scale[int(idx[pos])] = float("nan")
        elif dtype == "fp16":
            weight = w.astype(np.float16)
        else:
            weight = w
    with pytest.raises((ValueError, TypeError)):
        ops.embedding_bag(weight, idx, off, per_sample_weights=psw, mode=mode,
                          backend="cpp")


BWD_HOSTILE = ["id_high", "id_negative", "offsets_decrease", "offsets_past_end", "offsets_first", "grad_nan",
               "grad_shape", "grad_float64", "psw_nan", "state_negative", "state_nan", "state_missing",
               "state_shape", "lr_nan", "eps_negative", "optimizer_bad", "mode_max", "table_readonly",
               "table_fp16", "ids_float"]


@FUZZ
@given(n=st.sampled_from([1, 2, 17, 97]), d=st.sampled_from([1, 3, 16, 33]), B=st.sampled_from([1, 2, 7, 65]),
       hostile=st.sampled_from(BWD_HOSTILE), id64=st.booleans(), seed=SEEDS)
def test_embedding_bag_backward_rejects_invalid_inputs(n, d, B, hostile, id64, seed):
    _count("embedding_bag_backward_invalid")
    rng, w, off, idx, big = _hostile_bags(seed, id64, n, d, B)
    before = w.copy()
    grad = rng.standard_normal((B, d)).astype(np.float32)
    psw, mode, optimizer, lr, eps = None, "sum", "rowwise_adagrad", 0.1, 1e-8
    state = np.zeros(n, np.float32)
    pos = int(rng.integers(idx.size))
    table = w
    if _corrupt_ids_offsets(hostile, rng, idx, off, n, B, big, pos):
        pass
    elif hostile == "grad_nan":
        grad[rng.integers(B), rng.integers(d)] = np.nan
    elif hostile == "grad_shape":
        grad = np.zeros((B, d + 1), np.float32)
    elif hostile == "grad_float64":
        grad = grad.astype(np.float64)
    elif hostile == "psw_nan":
        psw = np.ones(idx.size, np.float32)
        psw[pos] = np.nan
    elif hostile == "state_negative":
        state[rng.integers(n)] = -1.0
    elif hostile == "state_nan":
        state[rng.integers(n)] = np.nan
    elif hostile == "state_missing":
        state = None
    elif hostile == "state_shape":
        state = np.zeros(n + 1, np.float32)
    elif hostile == "lr_nan":
        lr = float("nan")
    elif hostile == "eps_negative":
        eps = -1.0
    elif hostile == "optimizer_bad":
        optimizer = "adam"
    elif hostile == "mode_max":
        mode = "max"
    elif hostile == "table_readonly":
        table = w.copy()
        table.flags.writeable = False
    elif hostile == "table_fp16":
        table = w.astype(np.float16)
    elif hostile == "ids_float":
        idx = idx.astype(np.float32)
    with pytest.raises((ValueError, TypeError)):
        ops.embedding_bag_backward(table, idx, off, grad, per_sample_weights=psw, mode=mode, optimizer=optimizer,
                                   lr=lr, eps=eps, state=state, backend="cpp")
    np.testing.assert_array_equal(w, before)  # refused before any update


QUANT_HOSTILE = ["nan", "inf", "float64", "int", "one_d", "three_d", "dtype_bad", "list"]


@FUZZ
@given(N=st.sampled_from([1, 2, 17]), d=st.sampled_from([1, 3, 16]), hostile=st.sampled_from(QUANT_HOSTILE),
       dtype=st.sampled_from(["fp16", "int8"]), seed=SEEDS)
def test_quantize_rejects_invalid_inputs(N, d, hostile, dtype, seed):
    _count("quantize_invalid")
    rng = np.random.default_rng(seed)
    w = floats(rng, (N, d), False)
    if hostile in ("nan", "inf"):
        w[rng.integers(N), rng.integers(d)] = np.nan if hostile == "nan" else np.inf
    elif hostile == "float64":
        w = w.astype(np.float64)
    elif hostile == "int":
        w = w.astype(np.int32)
    elif hostile == "one_d":
        w = w.reshape(-1)
    elif hostile == "three_d":
        w = w.reshape(1, N, d)
    elif hostile == "dtype_bad":
        dtype = "int4"
    elif hostile == "list":
        w = w.tolist()
    with pytest.raises((ValueError, TypeError)):
        ops.quantize(w, dtype)
