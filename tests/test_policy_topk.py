"""policy_topk / policy_sample: the compiled core against recmeta_sdk.ops.reference.

Top-k checks are tie-aware: the returned scores must match the reference's sorted top-k
scores within tolerance, every returned id must be eligible, unique, and carry (under the
reference) the score reported for it, so ids can differ from the reference's only where
scores tie.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from recmeta_sdk import ops
from recmeta_sdk.ops import reference as R
from recmeta_sdk.ops.reference import QuantizedTable

_core = pytest.importorskip("recmeta_sdk._core")

RTOL, ATOL = 2e-5, 2e-4
DTYPES = ["fp32", "fp16", "int8"]


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------
def make_table(rng, N, d, dtype):
    w = torch.from_numpy(rng.standard_normal((N, d)).astype(np.float32))
    return w if dtype == "fp32" else ops.quantize(w, dtype)


def make_csr(rng, B, N, per_user, dtype=np.int64, dup=False):
    counts = rng.integers(0, per_user + 1, size=B)
    off = np.zeros(B + 1, dtype=dtype)
    off[1:] = np.cumsum(counts)
    ids = rng.integers(0, N, size=int(off[-1])).astype(dtype)
    if dup and ids.size > 3:
        ids[1::3] = ids[0:-1:3][: ids[1::3].size]  # repeat ids inside lists
    return torch.from_numpy(off), torch.from_numpy(ids)


def ref_matrix(u, tab, bias, exc, cand, tau):
    """Reference scores (B, N) and the eligibility mask."""
    s = R._scores(u, tab, bias, tau)
    mask = R.eligible_mask(u.shape[0], tab.shape[0], exc, cand)
    return s, mask


def check_topk(ids, scores, keys_full, mask, k, ref_sorted_keys, key_of_ids=None):
    """Tie-aware check of a top-k (by `keys_full`) result.

    ids, scores: ours (B, k). keys_full (B, N): the reference ranking values. mask (B, N).
    ref_sorted_keys (B, k): the reference's top-k ranking values (-inf padded).
    key_of_ids: our ranking values for our ids (defaults to `scores`).
    """
    ids = np.asarray(ids)
    scores = np.asarray(scores)
    keys_full = keys_full.numpy().astype(np.float64)
    mask = mask.numpy()
    B = ids.shape[0]
    k = min(k, keys_full.shape[1])  # k above the catalogue is capped at N columns
    assert ids.shape == (B, k) and scores.shape == (B, k)
    assert ids.dtype == np.int64 and scores.dtype == np.float32
    ours_key = scores if key_of_ids is None else np.asarray(key_of_ids)
    for b in range(B):
        n_valid = min(k, int(mask[b].sum()))
        row = ids[b]
        assert (row[:n_valid] >= 0).all(), (b, row)
        assert (row[n_valid:] == -1).all(), (b, row)
        assert np.isneginf(scores[b, n_valid:]).all()
        got = row[:n_valid]
        assert len(set(got.tolist())) == n_valid, f"duplicate ids in row {b}: {got}"
        assert mask[b, got].all(), f"ineligible (excluded / not a candidate) id returned in row {b}"
        # each returned id carries its reference ranking value
        np.testing.assert_allclose(ours_key[b, :n_valid], keys_full[b, got], rtol=RTOL, atol=ATOL)
        # the sorted values equal the reference's top-k values
        np.testing.assert_allclose(ours_key[b, :n_valid], np.asarray(ref_sorted_keys)[b, :n_valid],
                                   rtol=RTOL, atol=ATOL)
        assert (np.diff(ours_key[b, :n_valid]) <= 1e-6).all(), "not sorted best first"


def run_case(rng, B, N, d, k, dtype="fp32", bias=True, exclude=0, cand=0, tau=1.0,
             idx_dtype=np.int64, dup=False):
    u = torch.from_numpy(rng.standard_normal((B, d)).astype(np.float32))
    tab = make_table(rng, N, d, dtype)
    b = torch.from_numpy(rng.standard_normal(N).astype(np.float32)) if bias else None
    exc = make_csr(rng, B, N, exclude, idx_dtype, dup) if exclude else None
    cnd = make_csr(rng, B, N, cand, idx_dtype, dup) if cand else None
    ids, sc, ln = ops.policy_topk(u, tab, k, bias=b, exclude=exc, candidates=cnd, temperature=tau,
                                  backend="cpp")
    rids, rsc, rln = R.policy_topk(u, tab, k, b, exc, cnd, tau)
    s, mask = ref_matrix(u, tab, b, exc, cnd, tau)
    check_topk(ids, sc, s, mask, k, rsc)
    np.testing.assert_allclose(ln.numpy(), rln.numpy(), rtol=1e-5, atol=1e-5)
    return u, tab, b, exc, cnd


# ---------------------------------------------------------------------------------------
# top-k against the reference
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("exclude", [0, 40])
def test_topk_matches_reference(rng, dtype, bias, exclude):
    run_case(rng, B=13, N=20011, d=17, k=11, dtype=dtype, bias=bias, exclude=exclude, tau=0.7)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("idx_dtype", [np.int32, np.int64])
def test_topk_candidates_with_duplicates_and_exclusions(rng, dtype, idx_dtype):
    # candidates (with duplicates) intersected with exclusions drawn from a small id range
    B, N, d = 11, 211, 33
    u = torch.from_numpy(rng.standard_normal((B, d)).astype(np.float32))
    tab = make_table(rng, N, d, dtype)
    b = torch.from_numpy(rng.standard_normal(N).astype(np.float32))
    cnd = make_csr(rng, B, N, 300, idx_dtype, dup=True)
    exc = make_csr(rng, B, N, 120, idx_dtype, dup=True)
    for k in (0, 5, 400):
        ids, sc, ln = ops.policy_topk(u, tab, k, bias=b, exclude=exc, candidates=cnd, temperature=1.3)
        _, rsc, rln = R.policy_topk(u, tab, k, b, exc, cnd, 1.3)
        s, mask = ref_matrix(u, tab, b, exc, cnd, 1.3)
        check_topk(ids, sc, s, mask, k, rsc)
        np.testing.assert_allclose(ln.numpy(), rln.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "B,N,d,k",
    [(1, 1, 1, 1), (3, 2, 5, 7), (7, 131, 1, 3), (5, 997, 129, 1000), (2, 50021, 64, 100),
     (67, 4099, 23, 13), (131, 3001, 8, 5), (0, 100, 8, 4), (4, 100, 8, 0)],
)
def test_topk_odd_sizes(rng, B, N, d, k):
    run_case(rng, B, N, d, k, bias=True, exclude=3 if N > 3 else 0, tau=1.0)


def test_topk_all_excluded_gives_padding_and_neg_inf_lognorm(rng):
    B, N, d = 3, 7, 5
    u = torch.from_numpy(rng.standard_normal((B, d)).astype(np.float32))
    w = torch.from_numpy(rng.standard_normal((N, d)).astype(np.float32))
    off = torch.tensor([0, 7, 7, 10])
    ids_ = torch.tensor([0, 1, 2, 3, 4, 5, 6, 2, 2, 3])
    ids, sc, ln = ops.policy_topk(u, w, 4, exclude=(off, ids_))
    assert (ids[0] == -1).all() and torch.isneginf(sc[0]).all() and torch.isneginf(ln[0])
    assert torch.isfinite(ln[1:]).all()
    assert set(ids[2].tolist()) == {0, 1, 4, 5}
    # an empty candidate list is the same
    cand = (torch.tensor([0, 0, 2, 3]), torch.tensor([1, 1, 6]))
    ids, sc, ln = ops.policy_topk(u, w, 2, candidates=cand)
    assert (ids[0] == -1).all() and torch.isneginf(ln[0])
    assert ids[1].tolist() == [1, -1] and ids[2].tolist() == [6, -1]


def test_topk_ties(rng):
    B, N, d, k = 5, 1009, 16, 20
    base = rng.standard_normal((40, d)).astype(np.float32)
    w = torch.from_numpy(base[rng.integers(0, 40, size=N)])  # many identical rows
    u = torch.from_numpy(rng.standard_normal((B, d)).astype(np.float32))
    ids, sc, ln = ops.policy_topk(u, w, k)
    _, rsc, rln = R.policy_topk(u, w, k)
    s, mask = ref_matrix(u, w, None, None, None, 1.0)
    check_topk(ids, sc, s, mask, k, rsc)
    # ties are broken by the smaller id
    for b in range(B):
        for j in range(k - 1):
            if sc[b, j] == sc[b, j + 1]:
                assert ids[b, j] < ids[b, j + 1]
    np.testing.assert_allclose(ln.numpy(), rln.numpy(), rtol=1e-5, atol=1e-5)


def test_numpy_in_numpy_out_and_backend_choice(rng):
    B, N, d = 4, 300, 12
    u = rng.standard_normal((B, d)).astype(np.float32)
    w = rng.standard_normal((N, d)).astype(np.float32)
    eo, ei = np.array([0, 2, 2, 3, 5], np.int32), np.array([1, 2, 3, 4, 5], np.int32)
    out = ops.policy_topk(u, w, 6, exclude=(eo, ei))
    assert all(isinstance(o, np.ndarray) for o in out)
    ref = ops.policy_topk(u, w, 6, exclude=(eo, ei), backend="torch")
    assert all(isinstance(o, np.ndarray) for o in ref)
    np.testing.assert_allclose(out[1], ref[1], rtol=RTOL, atol=ATOL)
    out = ops.policy_sample(torch.from_numpy(u), w, 6, seed=3)
    assert all(isinstance(o, torch.Tensor) for o in out)


def test_fp16_table_given_directly(rng):
    u = torch.from_numpy(rng.standard_normal((3, 9)).astype(np.float32))
    w = torch.from_numpy(rng.standard_normal((101, 9)).astype(np.float16))
    ids, sc, ln = ops.policy_topk(u, w, 5)
    _, rsc, rln = R.policy_topk(u, QuantizedTable("fp16", w), 5)
    np.testing.assert_allclose(sc.numpy(), rsc.numpy(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(ln.numpy(), rln.numpy(), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------
# kernel paths: small tiles (3..8 users: one pass over each row for all users), exclusions
# at block / chunk boundaries, the generic and AVX2 variants
# ---------------------------------------------------------------------------------------
def boundary_exclusions(rng, u, tab, b, N, tau, per_user=20, boundaries=()):
    """CSR exclusions per user: the user's 5 best items (so dropping them changes the top-k),
    the given boundary ids, and random ids (with repeats)."""
    s = R._scores(u, tab, b, tau)
    best = torch.topk(s, min(5, N), dim=1).indices.numpy()
    lists = []
    for r in range(u.shape[0]):
        ids = np.concatenate([best[r], [x for x in boundaries if x < N], rng.integers(0, N, per_user)])
        lists.append(rng.permutation(ids))
    off = np.concatenate([[0], np.cumsum([len(x) for x in lists])]).astype(np.int64)
    return torch.from_numpy(off), torch.from_numpy(np.concatenate(lists).astype(np.int64))


def check_against_reference(u, tab, b, exc, k, tau, cand=None):
    ids, sc, ln = ops.policy_topk(u, tab, k, bias=b, exclude=exc, candidates=cand, temperature=tau,
                                  backend="cpp")
    _, rsc, rln = R.policy_topk(u, tab, k, b, exc, cand, tau)
    s, mask = ref_matrix(u, tab, b, exc, cand, tau)
    check_topk(ids, sc, s, mask, k, rsc)
    np.testing.assert_allclose(ln.numpy(), rln.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B", [3, 5, 8])
@pytest.mark.parametrize("d", [1, 7, 64, 70])
def test_small_tile_kernel(rng, dtype, B, d):
    # N crosses item blocks (1024 rows at d = 64) and ends inside a group of 16 rows
    N = 2053
    u = torch.from_numpy(rng.standard_normal((B, d)).astype(np.float32))
    tab = make_table(rng, N, d, dtype)
    b = torch.from_numpy(rng.standard_normal(N).astype(np.float32))
    exc = boundary_exclusions(rng, u, tab, b, N, 0.8, boundaries=(0, 15, 16, 1023, 1024, 1025, 2047, 2048, N - 1))
    for k in (1, 10):
        check_against_reference(u, tab, b, exc, k, 0.8)
    check_against_reference(u, tab, None, None, 7, 1.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B", [1, 2])
@pytest.mark.parametrize("d", [16, 32, 48, 64, 128])
def test_row_kernel_fixed_dims(rng, dtype, B, d):
    """The row kernel (B <= 2, and the candidate lists) has variants for d = 32, 64, 128 (u
    held in registers) beside the general one: each against the reference, N crossing item
    blocks and ending inside a group of 16 rows, with exclusions at the boundaries, with
    candidate lists (rows in any order), and with a table whose rows are strided."""
    N = 4099
    u = torch.from_numpy(rng.standard_normal((B, d)).astype(np.float32))
    tab = make_table(rng, N, d, dtype)
    b = torch.from_numpy(rng.standard_normal(N).astype(np.float32))
    exc = boundary_exclusions(rng, u, tab, b, N, 0.8, boundaries=(0, 15, 16, 1023, 1024, 1025, 4095, 4096, N - 1))
    for k in (1, 10):
        check_against_reference(u, tab, b, exc, k, 0.8)
    check_against_reference(u, tab, None, None, 7, 1.0)
    cand = make_csr(rng, B, N, 300, dup=True)
    check_against_reference(u, tab, b, exc, 9, 1.3, cand=cand)
    if dtype == "fp32":  # rows with a stride larger than d (a column slice of a wider table)
        wide = torch.from_numpy(rng.standard_normal((N, d + 5)).astype(np.float32))
        sliced = wide[:, 2:2 + d]
        ids, sc, ln = _core.policy_topk(u.numpy(), sliced.numpy(), 6, bias=b.numpy())
        rids, rsc, rln = _core.policy_topk(u.numpy(), sliced.contiguous().numpy(), 6, bias=b.numpy())
        np.testing.assert_array_equal(ids, rids)
        np.testing.assert_array_equal(sc, rsc)
        np.testing.assert_array_equal(ln, rln)
        check_against_reference(u, sliced.contiguous(), b, None, 6, 1.0)


@pytest.mark.parametrize("B", [1, 2, 5, 9])
def test_exclusions_straddle_blocks_and_chunks(rng, B):
    # d = 64: blocks of 1024 items, chunks of 16384 items; each user's best items are excluded
    N, d = 33011, 64
    u = torch.from_numpy(rng.standard_normal((B, d)).astype(np.float32))
    tab = make_table(rng, N, d, "fp32")
    b = torch.from_numpy(rng.standard_normal(N).astype(np.float32))
    bounds = (1023, 1024, 16383, 16384, 16385, 32767, 32768, N - 1)
    exc = boundary_exclusions(rng, u, tab, b, N, 1.0, per_user=100, boundaries=bounds)
    check_against_reference(u, tab, b, exc, 10, 1.0)
    ids, _, prop, slp = ops.policy_sample(u, tab, 6, seed=99, bias=b, exclude=exc)
    rids, _, rprop, rslp = R.policy_sample(u, tab, 6, 99, b, exc, None, 1.0)
    assert torch.equal(ids, rids)
    np.testing.assert_allclose(prop.numpy(), rprop.numpy(), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(slp.numpy(), rslp.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B, N, d", [(70, 2999, 37), (600, 1501, 16), (130, 5003, 64)])
def test_large_batches_tiles_and_sub_tiles_match_reference(rng, dtype, B, N, d):
    """Tiles of up to 512 users share one packed block and are scored and folded in sub-tiles
    of at most 64 (B = 600: two tiles of 300, five sub-tiles of 60 each; B = 70: two sub-tiles
    of 35); several blocks per user (N = 5003 at d = 64: blocks of 1024) exercise the
    per-64-item skip of the threshold test."""
    run_case(rng, B, N, d, 7, dtype=dtype, exclude=40)
    run_case(rng, B, N, d, 1, dtype=dtype, bias=False, tau=0.7)


def test_excluded_and_kept_items_far_above_the_rest_do_not_underflow_the_normaliser(rng):
    """An excluded item 1000 above the others of its block (and a kept one 900 above): the
    exp pass's shift must be the maximum of what remains, not of what the first pass saw, or
    every remaining term underflows. Blocks of 1024 items at d = 64; the outliers sit in the
    second block, beside ordinary items."""
    N, d, B = 3000, 64, 2
    u = torch.from_numpy(rng.standard_normal((B, d)).astype(np.float32))
    w = rng.standard_normal((N, d)).astype(np.float32) * 0.01
    w[1500] = 1000.0 * u[0].numpy() / float(u[0].norm() ** 2)  # user 0 scores ~1000 on item 1500
    w[1700] = 900.0 * u[1].numpy() / float(u[1].norm() ** 2)  # user 1 scores ~900 on item 1700
    w = torch.from_numpy(w)
    exc = (torch.tensor([0, 1, 1]), torch.tensor([1500]))  # user 0 excludes its outlier
    for k in (1, 3):
        ids, sc, ln = ops.policy_topk(u, w, k, exclude=exc, backend="cpp")
        rids, rsc, rln = R.policy_topk(u, w, k, None, exc, None, 1.0)
        np.testing.assert_allclose(ln.numpy(), rln.numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(sc.numpy(), rsc.numpy(), rtol=RTOL, atol=ATOL)
        assert 1500 not in ids[0].tolist() and ids[1, 0] == 1700
        sids, _, prop, slp = ops.policy_sample(u, w, k, seed=5, exclude=exc, backend="cpp")
        rsids, _, rprop, rslp = R.policy_sample(u, w, k, 5, None, exc, None, 1.0)
        assert torch.equal(sids, rsids)
        np.testing.assert_allclose(slp.numpy(), rslp.numpy(), rtol=1e-4, atol=1e-4)


_ISA_SCRIPT = r"""
import sys
import numpy as np, torch
from recmeta_sdk import _core, ops
from recmeta_sdk.ops import reference as R
assert _core.cpu_isa() == sys.argv[1], (_core.cpu_isa(), sys.argv[1])
rng = np.random.default_rng(5)
for B, N, d in ((1, 3001, 64), (2, 1499, 7), (1, 1003, 70), (2, 999, 37), (5, 2053, 70), (8, 1100, 33),
                (13, 517, 16)):
    u = torch.from_numpy(rng.standard_normal((B, d)).astype(np.float32))
    w = torch.from_numpy(rng.standard_normal((N, d)).astype(np.float32))
    b = torch.from_numpy(rng.standard_normal(N).astype(np.float32))
    cnt = rng.integers(0, 40, B)
    off = torch.from_numpy(np.concatenate([[0], np.cumsum(cnt)]).astype(np.int64))
    exc = (off, torch.from_numpy(rng.integers(0, N, int(cnt.sum())).astype(np.int64)))
    for tab in (w, ops.quantize(w, "fp16"), ops.quantize(w, "int8")):
        ids, sc, ln = ops.policy_topk(u, tab, 9, bias=b, exclude=exc, temperature=0.9, backend="cpp")
        rids, rsc, rln = R.policy_topk(u, tab, 9, b, exc, None, 0.9)
        np.testing.assert_allclose(sc.numpy(), rsc.numpy(), rtol=2e-5, atol=2e-4)
        np.testing.assert_allclose(ln.numpy(), rln.numpy(), rtol=1e-5, atol=1e-5)
        s = R._scores(u, tab, b, 0.9)
        mask = R.eligible_mask(B, N, exc, None)
        assert bool(mask.gather(1, ids).all())
        np.testing.assert_allclose(sc.numpy(), s.gather(1, ids).numpy(), rtol=2e-5, atol=2e-4)
        sids = ops.policy_sample(u, tab, 5, seed=3, bias=b, exclude=exc, backend="cpp")[0]
        assert torch.equal(sids, R.policy_sample(u, tab, 5, 3, b, exc, None, 1.0)[0])
        # per-user candidate lists (the row kernels read rows by id)
        cc = rng.integers(1, 60, B)
        coff = torch.from_numpy(np.concatenate([[0], np.cumsum(cc)]).astype(np.int64))
        cand = (coff, torch.from_numpy(rng.integers(0, N, int(cc.sum())).astype(np.int64)))
        ids, sc, ln = ops.policy_topk(u, tab, 9, bias=b, exclude=exc, candidates=cand, backend="cpp")
        rids, rsc, rln = R.policy_topk(u, tab, 9, b, exc, cand, 1.0)
        np.testing.assert_allclose(sc.numpy(), rsc.numpy(), rtol=2e-5, atol=2e-4)
        np.testing.assert_allclose(ln.numpy(), rln.numpy(), rtol=1e-5, atol=1e-5)
print("ok", _core.cpu_isa())
"""


def test_generic_and_avx2_variants_match_reference():
    """The variants this CPU does not run by default, each in a subprocess (RECMETA_CPU_ISA
    only lowers the choice, so a variant above this CPU's is skipped)."""
    import os
    import subprocess
    import sys

    import recmeta_sdk

    order = ["generic", "avx2", "avx512"]
    best = order.index(_core.cpu_isa())
    root = os.path.dirname(os.path.dirname(os.path.abspath(recmeta_sdk.__file__)))
    procs = {}
    for isa in order[:best]:
        env = dict(os.environ, RECMETA_CPU_ISA=isa)
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        procs[isa] = subprocess.Popen([sys.executable, "-c", _ISA_SCRIPT, isa], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, cwd=root)
    if not procs:
        pytest.skip(f"this CPU runs the {_core.cpu_isa()} variant only")
    for isa, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{isa}: {err[-3000:]}"
        assert out.startswith("ok"), f"{isa}: {out}"


# ---------------------------------------------------------------------------------------
# determinism across thread counts
# ---------------------------------------------------------------------------------------
@pytest.fixture
def threads():
    old = _core.get_num_threads()
    yield
    _core.set_num_threads(old)


@pytest.mark.parametrize("B", [1, 3, 130])
def test_same_result_for_any_thread_count(rng, threads, B):
    N, d = 70001, 64  # large enough (B*N*d >= 4M) for the core to run in parallel
    u = torch.from_numpy(rng.standard_normal((B, d)).astype(np.float32))
    w = torch.from_numpy(rng.standard_normal((N, d)).astype(np.float32))
    b = torch.from_numpy(rng.standard_normal(N).astype(np.float32))
    exc = make_csr(rng, B, N, 50)
    outs = []
    for t in (1, 2, 3):
        _core.set_num_threads(t)
        outs.append(ops.policy_topk(u, w, 17, bias=b, exclude=exc, temperature=0.9)
                    + ops.policy_sample(u, w, 9, seed=11, bias=b, exclude=exc))
    for o in outs[1:]:
        for x, y in zip(outs[0], o):
            assert torch.equal(x, y)


# ---------------------------------------------------------------------------------------
# the sampler
# ---------------------------------------------------------------------------------------
def test_gumbel_uniform_bits_match_reference():
    rows = torch.tensor([0, 1, 7, 12345, 2**31 - 1])
    items = torch.tensor([0, 1, 99, 2**32 + 5, 2**40 + 3])
    for seed in (0, 1, 2**33 + 17, 2**64 - 1):
        ref = R.hash_uniform(seed, rows[:, None], items[None, :])
        for i, r in enumerate(rows.tolist()):
            for j, it in enumerate(items.tolist()):
                assert _core.gumbel_uniform(seed, r, it) == ref[i, j].item()


@pytest.mark.parametrize("dtype", DTYPES)
def test_sample_matches_reference(rng, dtype):
    B, N, d, k = 9, 30011, 19, 8
    u = torch.from_numpy(rng.standard_normal((B, d)).astype(np.float32))
    tab = make_table(rng, N, d, dtype)
    b = torch.from_numpy(rng.standard_normal(N).astype(np.float32))
    exc = make_csr(rng, B, N, 30)
    for seed in (0, 123456789012):
        ids, sc, prop, slp = ops.policy_sample(u, tab, k, seed=seed, bias=b, exclude=exc, temperature=1.7)
        rids, rsc, rprop, rslp = R.policy_sample(u, tab, k, seed, b, exc, None, 1.7)
        s, mask = ref_matrix(u, tab, b, exc, None, 1.7)
        pert = s + R.gumbel_noise(seed, torch.arange(B)[:, None], torch.arange(N)[None, :])
        ref_keys = torch.gather(pert, 1, rids.clamp(min=0)).masked_fill(rids < 0, float("-inf"))
        our_keys = torch.gather(pert, 1, ids.clamp(min=0)).masked_fill(ids < 0, float("-inf"))
        check_topk(ids, our_keys.numpy().astype(np.float32), pert, mask, k, ref_keys)
        np.testing.assert_allclose(sc.numpy(), torch.gather(s, 1, ids.clamp(min=0)).numpy(), rtol=RTOL, atol=ATOL)
        # random data has no near-ties in s + G: the slates are the reference's
        assert torch.equal(ids, rids)
        np.testing.assert_allclose(prop.numpy(), rprop.numpy(), rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(slp.numpy(), rslp.numpy(), rtol=1e-4, atol=1e-4)


def test_sample_candidates_and_padding(rng):
    B, N, d = 6, 157, 10
    u = torch.from_numpy(rng.standard_normal((B, d)).astype(np.float32))
    w = torch.from_numpy(rng.standard_normal((N, d)).astype(np.float32))
    cnd = make_csr(rng, B, N, 12, np.int32, dup=True)
    exc = make_csr(rng, B, N, 60, np.int32)
    ids, sc, prop, slp = ops.policy_sample(u, w, 15, seed=5, exclude=exc, candidates=cnd)
    rids, rsc, rprop, rslp = R.policy_sample(u, w, 15, 5, None, exc, cnd)
    assert torch.equal(ids, rids)
    np.testing.assert_allclose(sc.numpy(), rsc.numpy(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(prop.numpy(), rprop.numpy(), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(slp.numpy(), rslp.numpy(), rtol=1e-4, atol=1e-4)
    assert ((prop == 0) == (ids < 0)).all()


def test_sample_reproducible_and_seed_dependent(rng, threads):
    B, N, d = 4, 5003, 16
    u = torch.from_numpy(rng.standard_normal((B, d)).astype(np.float32))
    w = torch.from_numpy(rng.standard_normal((N, d)).astype(np.float32)) * 0.1
    a = ops.policy_sample(u, w, 10, seed=42)
    _core.set_num_threads(1)
    b = ops.policy_sample(u, w, 10, seed=42)
    c = ops.policy_sample(u, w, 10, seed=43)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert not torch.equal(a[0], c[0])
    # seeds outside [0, 2**64) are refused, not wrapped (test_k_and_seed_types)
    with pytest.raises(ValueError, match="seed must be in"):
        ops.policy_sample(u, w, 10, seed=42 + 2**64)


def test_sampler_first_two_positions_follow_softmax():
    """Chi-square: the (first, second) pair frequencies over many rows match Plackett-Luce."""
    chisquare = pytest.importorskip("scipy.stats").chisquare

    rng = np.random.default_rng(7)
    N, d, rows = 6, 4, 60000
    w = rng.standard_normal((N, d)).astype(np.float32)
    u1 = rng.standard_normal(d).astype(np.float32) * 0.6
    u = np.repeat(u1[None, :], rows, axis=0)
    b = rng.standard_normal(N).astype(np.float32) * 0.3
    ids, sc, prop, _ = ops.policy_sample(u, w, 2, seed=2026, bias=b)
    s = (w.astype(np.float64) @ u1.astype(np.float64) + b)
    p = np.exp(s - s.max())
    p /= p.sum()
    first = np.bincount(ids[:, 0], minlength=N)
    assert chisquare(first, p * rows).pvalue > 1e-3
    pair_obs = np.zeros((N, N))
    np.add.at(pair_obs, (ids[:, 0], ids[:, 1]), 1)
    pair_exp = p[:, None] * p[None, :] / (1 - p[:, None])
    np.fill_diagonal(pair_exp, 0)
    off = ~np.eye(N, dtype=bool)
    assert pair_obs[~off].sum() == 0
    assert chisquare(pair_obs[off], pair_exp[off] * rows).pvalue > 1e-3
    np.testing.assert_allclose(prop[0], p[ids[0]], rtol=1e-4)
    # the test can fail: uniform noise would not follow the softmax
    assert chisquare(first, np.full(N, rows / N)).pvalue < 1e-6


# ---------------------------------------------------------------------------------------
# torch custom ops
# ---------------------------------------------------------------------------------------
def test_opcheck(rng):
    B, N, d = 5, 97, 11
    u = torch.from_numpy(rng.standard_normal((B, d)).astype(np.float32))
    w = torch.from_numpy(rng.standard_normal((N, d)).astype(np.float32))
    q = ops.quantize(w, "int8")
    b = torch.from_numpy(rng.standard_normal(N).astype(np.float32))
    eo, ei = make_csr(rng, B, N, 4)
    torch.library.opcheck(torch.ops.recmeta.policy_topk.default,
                          (u, w, 7, None, None, b, eo, ei, None, None, 0.5))
    torch.library.opcheck(torch.ops.recmeta.policy_topk.default,
                          (u, q.data, 3, q.row_scale, q.row_min, None, None, None, eo, ei, 1.0))
    torch.library.opcheck(torch.ops.recmeta.policy_sample.default,
                          (u, w, 4, -5, None, None, b, eo, ei, None, None, 2.0))


def test_custom_op_under_compile(rng):
    u = torch.from_numpy(rng.standard_normal((3, 8)).astype(np.float32))
    w = torch.from_numpy(rng.standard_normal((50, 8)).astype(np.float32))

    def f(u, w):
        return torch.ops.recmeta.policy_topk(u, w, 4, None, None, None, None, None, None, None, 1.0)

    got = torch.compile(f, backend="eager", fullgraph=True)(u, w)
    want = f(u, w)
    for x, y in zip(got, want):
        assert torch.equal(x, y)


# ---------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------
def _small(rng, B=3, N=20, d=4):
    u = rng.standard_normal((B, d)).astype(np.float32)
    w = rng.standard_normal((N, d)).astype(np.float32)
    return u, w


@pytest.mark.parametrize("which", ["exclude", "candidates"])
@pytest.mark.parametrize("bad", [20, -1, 2**40])
def test_bad_ids_rejected(rng, which, bad):
    u, w = _small(rng)
    pair = (np.array([0, 1, 2, 3]), np.array([1, bad, 2]))
    with pytest.raises(ValueError, match=str(bad)):
        ops.policy_topk(u, w, 2, **{which: pair})
    with pytest.raises(ValueError, match=str(bad)):
        ops.policy_sample(u, w, 2, seed=0, **{which: pair})
    # the core checks too (no input can make it read outside its buffers)
    kw = {f"{'exclude' if which == 'exclude' else 'candidate'}_offsets": pair[0],
          f"{'exclude' if which == 'exclude' else 'candidate'}_ids": pair[1]}
    with pytest.raises(ValueError, match=str(bad)):
        _core.policy_topk(u, w, 2, **kw)


@pytest.mark.parametrize("off,msg", [
    ([0, 2, 1, 3], "decrease"), ([1, 1, 2, 3], "offsets\\[0\\]"), ([0, 1, 2, 4], "3"),
    ([0, 1, 3], "4 offsets"),
])
def test_bad_offsets_rejected(rng, off, msg):
    u, w = _small(rng)
    pair = (np.array(off), np.array([1, 2, 3]))
    with pytest.raises(ValueError, match=msg):
        ops.policy_topk(u, w, 2, exclude=pair)
    with pytest.raises(ValueError):
        _core.policy_topk(u, w, 2, exclude_offsets=pair[0], exclude_ids=pair[1])


def test_bad_values_rejected(rng):
    u, w = _small(rng)
    bad_u = u.copy()
    bad_u[1, 2] = np.nan
    with pytest.raises(ValueError, match="nan"):
        ops.policy_topk(bad_u, w, 2)
    with pytest.raises(ValueError, match="nan"):
        _core.policy_topk(bad_u, w, 2)
    b = np.ones(20, np.float32)
    b[7] = np.inf
    with pytest.raises(ValueError, match="inf"):
        ops.policy_sample(u, w, 2, seed=1, bias=b)
    with pytest.raises(ValueError, match="inf"):
        _core.policy_topk(u, w, 2, bias=b)
    for t in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            ops.policy_topk(u, w, 2, temperature=t)
        with pytest.raises(ValueError, match="temperature"):
            _core.policy_topk(u, w, 2, temperature=t)
    with pytest.raises(ValueError, match="k must"):
        ops.policy_topk(u, w, -1)
    for k in (2.0, True):  # not integers: TypeError (test_k_and_seed_types)
        with pytest.raises(TypeError, match="k must"):
            ops.policy_topk(u, w, k)
    with pytest.raises(ValueError, match="-3"):
        _core.policy_topk(u, w, -3)


@pytest.mark.parametrize("B", [1, 5, 70])
@pytest.mark.parametrize("pos", [0, 1023, 1024, 20000, 40960])
def test_non_finite_bias_and_scales_found_by_the_streaming_pass(rng, threads, B, pos):
    """The dense pass screens bias / row_scale / row_min block by block: a bad value in any
    block (also one that only the first user tile reads) is reported with its position,
    whatever the thread count; with candidate lists it is found before any work."""
    N, d = 40961, 8
    u = rng.standard_normal((B, d)).astype(np.float32)
    q = ops.quantize(torch.from_numpy(rng.standard_normal((N, d)).astype(np.float32)), "int8")
    data, scale, rmin = q.data.numpy(), q.row_scale.numpy().copy(), q.row_min.numpy().copy()
    cand = (np.arange(B + 1, dtype=np.int64), np.full(B, 3, np.int64))
    for t in (1, 2):
        _core.set_num_threads(t)
        b = np.ones(N, np.float32)
        b[pos] = np.nan
        with pytest.raises(ValueError, match=f"bias: non-finite value nan at position {pos}"):
            _core.policy_topk(u, data, 3, row_scale=scale, row_min=rmin, bias=b)
        with pytest.raises(ValueError, match=f"at position {pos}"):
            _core.policy_sample(u, data, 3, 7, row_scale=scale, row_min=rmin, bias=b)
        with pytest.raises(ValueError, match=f"at position {pos}"):
            _core.policy_topk(u, data, 3, row_scale=scale, row_min=rmin, bias=b,
                              candidate_offsets=cand[0], candidate_ids=cand[1])
        for arr in (scale, rmin):
            old = arr[pos]
            arr[pos] = -np.inf
            with pytest.raises(ValueError, match=f"non-finite row_scale/row_min at row {pos}"):
                _core.policy_topk(u, data, 3, row_scale=scale, row_min=rmin)
            arr[pos] = old
        # and the same arrays, all finite again, work
        _core.policy_topk(u, data, 3, row_scale=scale, row_min=rmin, bias=np.ones(N, np.float32))


@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B", [0, 1, 4])
@pytest.mark.parametrize("bad", [np.nan, np.inf])  # -inf masks an item (test_neg_inf_bias_masks_items)
def test_public_functions_reject_non_finite_bias_on_every_backend(rng, backend, dtype, B, bad):
    """The public functions skip their own bias scan on the cpp backend (the core screens the
    bias during the pass): a bad value must still raise a ValueError naming the bias and the
    bad value, with or without exclusions, candidates, k = 0, numpy or torch input."""
    N, d = 3001, 7
    u = rng.standard_normal((B, d)).astype(np.float32)
    tab = make_table(rng, N, d, dtype)
    pos = int(rng.integers(0, N))
    b = np.ones(N, np.float32)
    b[pos] = bad
    exc = (np.arange(B + 1, dtype=np.int64) * 2, rng.integers(0, N, 2 * B))
    cand = (np.arange(B + 1, dtype=np.int64), rng.integers(0, N, B))
    want = "bias: non-finite value " + ("nan" if np.isnan(bad) else str(float(bad)))
    for kw in ({}, {"exclude": exc}, {"candidates": cand}):
        for k in (0, 3):
            for bias in (b, torch.from_numpy(b)):
                with pytest.raises(ValueError, match=want):
                    ops.policy_topk(u, tab, k, bias=bias, backend=backend, **kw)
                with pytest.raises(ValueError, match=want):
                    ops.policy_sample(torch.from_numpy(u), tab, k, seed=5, bias=bias, backend=backend, **kw)


@pytest.mark.parametrize("pos", [0, 16, 1025, 3000])
def test_public_functions_reject_non_finite_int8_scales(rng, pos):
    """A non-finite row_scale / row_min of a quantised table given to the public functions is
    refused (ValueError naming it and the row) by the cpp backend, dense or with candidates."""
    N, d, B = 3001, 9, 2
    u = rng.standard_normal((B, d)).astype(np.float32)
    q = ops.quantize(torch.from_numpy(rng.standard_normal((N, d)).astype(np.float32)), "int8")
    cand = (np.array([0, 2, 3]), np.array([1, pos, 5]))
    for which in ("row_scale", "row_min"):
        arr = getattr(q, which).clone()
        arr[pos] = np.nan
        bad = QuantizedTable("int8", q.data, arr if which == "row_scale" else q.row_scale,
                             arr if which == "row_min" else q.row_min)
        for kw in ({}, {"candidates": cand}):
            with pytest.raises(ValueError, match=f"non-finite row_scale/row_min at row {pos}"):
                ops.policy_topk(u, bad, 4, backend="cpp", **kw)
            with pytest.raises(ValueError, match=f"non-finite row_scale/row_min at row {pos}"):
                ops.policy_sample(u, bad, 4, seed=1, backend="cpp", **kw)


def test_bad_types_and_shapes_rejected(rng):
    u, w = _small(rng)
    with pytest.raises(TypeError, match="float64"):
        ops.policy_topk(u.astype(np.float64), w, 2)
    with pytest.raises(TypeError, match="int"):
        ops.policy_topk(u.astype(np.int32), w, 2)
    with pytest.raises(TypeError):
        ops.policy_topk(u, w.astype(np.int64), 2)
    with pytest.raises(ValueError, match="shape"):
        ops.policy_topk(u[:, :3], w, 2)
    with pytest.raises(ValueError, match="shape"):
        ops.policy_topk(u, w, 2, bias=np.ones(19, np.float32))
    with pytest.raises(TypeError, match="float64"):
        ops.policy_topk(u, w, 2, bias=np.ones(20, np.float64))
    with pytest.raises(TypeError, match="int32 or int64"):
        ops.policy_topk(u, w, 2, exclude=(np.array([0, 0, 0, 1]), np.array([1.0], np.float32)))
    with pytest.raises(TypeError, match="seed"):
        ops.policy_sample(u, w, 2, seed=1.5)
    with pytest.raises(TypeError, match="float64"):
        _core.policy_topk(u.astype(np.float64), w, 2)
    with pytest.raises(ValueError, match="shape"):
        _core.policy_topk(u[:, :3], w, 2)
    with pytest.raises(TypeError, match="int32 or int64"):
        _core.policy_topk(u, w, 2, exclude_offsets=np.array([0, 0, 0, 1.0]), exclude_ids=np.array([1]))
    q = ops.quantize(w, "int8")
    with pytest.raises(ValueError, match="row_scale"):
        _core.policy_topk(u, q.data.numpy(), 2)
    with pytest.raises(ValueError, match="row_min"):
        _core.policy_topk(u, q.data.numpy(), 2, row_scale=q.row_scale.numpy(), row_min=q.row_min.numpy()[:5])


# ---------------------------------------------------------------------------------------
# property tests
# ---------------------------------------------------------------------------------------
try:
    from hypothesis import given, strategies as st
except ImportError:  # pragma: no cover - hypothesis is a test extra
    given = None
needs_hypothesis = pytest.mark.skipif(given is None, reason="needs hypothesis")
if given is None:  # pragma: no cover
    def given(**_):
        return lambda f: f

    class st:  # noqa: N801 - stand-in so the decorators below evaluate
        integers = booleans = sampled_from = one_of = lists = staticmethod(lambda *a, **k: None)


@needs_hypothesis
@given(B=st.integers(0, 9), N=st.integers(1, 400), d=st.integers(1, 40), k=st.integers(0, 30),
       dtype=st.sampled_from(DTYPES), bias=st.booleans(), exclude=st.integers(0, 30),
       cand=st.sampled_from([0, 0, 50]), tau=st.sampled_from([0.3, 1.0, 2.5]),
       seed=st.integers(0, 2**32))
def test_property_matches_reference(B, N, d, k, dtype, bias, exclude, cand, tau, seed):
    rng = np.random.default_rng(seed)
    u, tab, b, exc, cnd = run_case(rng, B, N, d, k, dtype, bias, exclude, cand, tau)
    ids, sc, prop, slp = ops.policy_sample(u, tab, k, seed=seed, bias=b, exclude=exc, candidates=cnd,
                                           temperature=tau)
    s, mask = ref_matrix(u, tab, b, exc, cnd, tau)
    pert = s + R.gumbel_noise(seed, torch.arange(B)[:, None], torch.arange(N)[None, :])
    rids = R.policy_sample(u, tab, k, seed, b, exc, cnd, tau)[0]
    ref_keys = torch.gather(pert, 1, rids.clamp(min=0)).masked_fill(rids < 0, float("-inf"))
    our_keys = torch.gather(pert, 1, ids.clamp(min=0)).masked_fill(ids < 0, float("-inf"))
    check_topk(ids, our_keys.numpy().astype(np.float32), pert, mask, k, ref_keys)


@needs_hypothesis
@given(bad=st.one_of(st.integers(-2**62, -1), st.integers(37, 2**62)), pos=st.integers(0, 4),
       which=st.sampled_from(["exclude", "candidates"]), idx32=st.booleans())
def test_property_hostile_ids(bad, pos, which, idx32):
    rng = np.random.default_rng(0)
    u = rng.standard_normal((2, 3)).astype(np.float32)
    w = rng.standard_normal((37, 3)).astype(np.float32)
    dt = np.int64
    if idx32:
        if not (-2**31 <= bad < 2**31):
            bad = -7 if bad < 0 else 2**31 - 1
        dt = np.int32
    ids = np.array([1, 2, 3, 4, 5], dt)
    ids[pos] = bad
    pair = (np.array([0, 2, 5], dt), ids)
    with pytest.raises(ValueError, match=str(bad)):
        ops.policy_topk(u, w, 3, **{which: pair})


@needs_hypothesis
@given(offs=st.lists(st.integers(-3, 8), min_size=1, max_size=5))
def test_property_hostile_offsets(offs):
    rng = np.random.default_rng(1)
    u = rng.standard_normal((3, 3)).astype(np.float32)
    w = rng.standard_normal((10, 3)).astype(np.float32)
    ids = np.array([0, 1, 2, 3, 4])
    o = np.array(offs)
    ok = (len(offs) == 4 and offs[0] == 0 and all(b >= a for a, b in zip(offs, offs[1:])) and offs[-1] == 5)
    if ok:
        ops.policy_topk(u, w, 2, exclude=(o, ids))
    else:
        with pytest.raises(ValueError):
            ops.policy_topk(u, w, 2, exclude=(o, ids))
        with pytest.raises(ValueError):
            _core.policy_topk(u, w, 2, exclude_offsets=o, exclude_ids=ids)


# ---------------------------------------------------------------------------------------
# hardening (issue 18): slate probability, non-finite rows, overflow, ties, N = 0, -inf
# bias, k above the catalogue, integral k / seed; every CPU backend
# ---------------------------------------------------------------------------------------
BACKENDS = ["cpp", "torch"]


def _exact_slate_log_prob(s, ids, eligible):
    """Plackett-Luce log-probability of the slate `ids` under scores `s` (float64 numpy,
    direct sums over the remaining items)."""
    s = np.asarray(s, np.float64)
    left = set(np.flatnonzero(eligible).tolist())
    lp = 0.0
    for i in ids:
        if i < 0:
            break
        rem = np.array(sorted(left))
        m = s[rem].max()
        lp += s[i] - (m + np.log(np.exp(s[rem] - m).sum()))
        left.discard(int(i))
    return lp


@pytest.mark.parametrize("backend", BACKENDS)
def test_slate_log_prob_exact_when_the_slate_holds_nearly_all_the_mass(backend):
    """The issue's case: s = [20, 0, 0], k = 2: after item 0 the remaining mass is 2e-9 of Z;
    subtracting in float32 gave 670.78 (exact: log(1 / (1 + 2e-9)) + log(1/2))."""
    u = np.array([[20.0]], np.float32)
    w = np.array([[1.0], [0.0], [0.0]], np.float32)
    ids, sc, prop, slate = ops.policy_sample(u, w, 2, seed=0, backend=backend)
    assert ids[0, 0] == 0
    want = _exact_slate_log_prob([20.0, 0.0, 0.0], ids[0], np.ones(3, bool))
    assert abs(want - np.log(0.5)) < 1e-6
    np.testing.assert_allclose(slate[0], want, rtol=0, atol=1e-6)
    np.testing.assert_allclose(prop[0], np.exp(np.array([20.0, 0.0]) - np.logaddexp(20, np.log(2))), rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_slate_log_prob_matches_direct_sums_on_random_sharp_policies(rng, backend):
    """Random slates of sharp and flat policies, with exclusions and masks, odd sizes: the
    slate log-probability equals the direct float64 sums (within float32 rounding of the
    scores) on every backend, and the backends agree."""
    for trial in range(12):
        N, d, B = int(rng.integers(3, 300)), int(rng.integers(1, 9)), int(rng.integers(1, 5))
        scale = [0.1, 3.0, 30.0][trial % 3]
        u = (rng.standard_normal((B, d)) * scale).astype(np.float32)
        w = rng.standard_normal((N, d)).astype(np.float32)
        b = rng.standard_normal(N).astype(np.float32)
        b[rng.integers(0, N, 2)] = -np.inf
        k = int(rng.integers(1, N + 2))
        ids, sc, prop, slate = ops.policy_sample(u, w, k, seed=trial, bias=b, backend=backend)
        s = (u.astype(np.float64) @ w.T.astype(np.float64)) + b
        for r in range(B):
            want = _exact_slate_log_prob(s[r], ids[r], np.isfinite(s[r]))
            np.testing.assert_allclose(slate[r], want, rtol=1e-5, atol=1e-4 * max(1.0, scale))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_item_row_raises_naming_the_row(rng, backend, dtype, bad):
    N, d, B = 2049, 5, 3
    w = rng.standard_normal((N, d)).astype(np.float32)
    for row in (0, 1500, N - 1):
        w2 = w.copy()
        w2[row, 2] = bad
        w2[N - 1 if row != N - 1 else 0, 4] = np.nan  # a second, later-named bad row
        tab = w2 if dtype == "fp32" else w2.astype(np.float16)
        first = min(row, N - 1 if row != N - 1 else 0)
        u = rng.standard_normal((B, d)).astype(np.float32)
        with pytest.raises(ValueError, match=rf"items: non-finite value \S+ at row {first}\b"):
            ops.policy_topk(u, tab, 4, backend=backend)
        with pytest.raises(ValueError, match=rf"at row {first}\b"):
            ops.policy_sample(u, tab, 4, seed=1, backend=backend)
        # excluded rows are still read (and refused) without candidate lists
        exc = (np.arange(B + 1, dtype=np.int64), np.full(B, row, np.int64))
        with pytest.raises(ValueError, match=rf"at row {first}\b"):
            ops.policy_topk(u, tab, 4, exclude=exc, backend=backend)
    # with candidate lists only the listed rows are read
    w2 = w.copy()
    w2[7, 0] = bad
    cand = (np.array([0, 2], np.int64), np.array([3, 9], np.int64))
    ids, _, _ = ops.policy_topk(rng.standard_normal((1, d)).astype(np.float32), w2, 2, candidates=cand,
                                backend=backend)
    assert sorted(ids[0].tolist()) == [3, 9]
    with pytest.raises(ValueError, match="at row 7"):
        ops.policy_topk(rng.standard_normal((1, d)).astype(np.float32), w2, 2,
                        candidates=(np.array([0, 2], np.int64), np.array([3, 7], np.int64)), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_overflowing_scores_raise_a_clear_error(backend):
    """A table of 1e38 (finite) gives scores of inf in float32: a ValueError naming the row,
    never inf scores, a NaN log-normaliser or propensities [1, 1, 1]."""
    u = np.ones((1, 4), np.float32)
    w = np.full((3, 4), 1e38, np.float32)
    with pytest.raises(ValueError, match="overflow float32 at item row 0"):
        ops.policy_topk(u, w, 3, backend=backend)
    with pytest.raises(ValueError, match="overflow float32 at item row 0"):
        ops.policy_sample(u, w, 3, seed=0, backend=backend)
    w = np.ones((3, 4), np.float32)
    w[1] = -1e38  # -inf by overflow is not a mask either
    with pytest.raises(ValueError, match="overflow float32 at item row 1"):
        ops.policy_topk(u, w, 3, backend=backend)
    with pytest.raises(ValueError, match="overflow float32 at item row 2"):  # via the temperature
        ops.policy_topk(u, np.array([[0.0] * 4, [1.0] * 4, [1e30] * 4], np.float32), 1,
                        temperature=1e-20, backend=backend)


def _tie_case():
    u = np.array([[1.0, 0.0], [0.0, 0.0]], np.float32)
    w = np.array([[1.0, 5.0], [2.0, 0.0], [1.0, 1.0], [2.0, 3.0], [0.5, 0.0], [1.0, -2.0], [2.0, 1.0]],
                 np.float32)
    return u, w


@pytest.mark.parametrize("backend", BACKENDS)
def test_tie_order_is_score_descending_then_id_ascending(backend):
    u, w = _tie_case()
    ids, sc, _ = ops.policy_topk(u, w, 5, backend=backend)
    np.testing.assert_array_equal(ids[0], [1, 3, 6, 0, 2])
    np.testing.assert_array_equal(ids[1], [0, 1, 2, 3, 4])  # all scores 0
    big = np.zeros((1, 3), np.float32)
    ids, _, _ = ops.policy_topk(big, np.ones((3001, 3), np.float32), 7, backend=backend)
    np.testing.assert_array_equal(ids[0], np.arange(7))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [0, 3, 10])
def test_empty_table_gives_empty_results(backend, k):
    u = np.ones((2, 4), np.float32)
    w = np.zeros((0, 4), np.float32)
    for tab in (w, torch.zeros((0, 4)), torch.zeros((0, 4))[:, :4]):
        ids, sc, ln = ops.policy_topk(u, tab, k, backend=backend)
        assert tuple(ids.shape) == (2, 0) and tuple(sc.shape) == (2, 0)
        assert np.isneginf(np.asarray(ln)).all()
        ids, sc, pr, sl = ops.policy_sample(u, tab, k, seed=3, backend=backend)
        assert tuple(ids.shape) == (2, 0) and tuple(pr.shape) == (2, 0)
        np.testing.assert_array_equal(np.asarray(sl), 0.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_neg_inf_bias_masks_items(rng, backend):
    N, d, B = 1031, 6, 3
    u = rng.standard_normal((B, d)).astype(np.float32)
    w = rng.standard_normal((N, d)).astype(np.float32)
    b = rng.standard_normal(N).astype(np.float32)
    masked = rng.choice(N, 500, replace=False)
    b[masked] = -np.inf
    ids, sc, ln = ops.policy_topk(u, w, N, bias=b, backend=backend)
    s = u @ w.T + b
    keep = np.isfinite(s)
    for r in range(B):
        got = ids[r][ids[r] >= 0]
        assert len(got) == N - 500 and not set(got.tolist()) & set(masked.tolist())
        assert np.isfinite(sc[r][: len(got)]).all() and np.isneginf(sc[r][len(got):]).all()
        np.testing.assert_allclose(ln[r], np.logaddexp.reduce(s[r][keep[r]].astype(np.float64)), rtol=1e-5)
    ids, sc, pr, _ = ops.policy_sample(u, w, 600, seed=5, bias=b, backend=backend)
    assert not set(ids[ids >= 0].tolist()) & set(masked.tolist())
    assert (ids >= 0).sum(axis=1).tolist() == [N - 500] * B
    assert (pr[ids < 0] == 0).all()
    all_masked = np.full(N, -np.inf, np.float32)
    ids, sc, ln = ops.policy_topk(u, w, 4, bias=all_masked, backend=backend)
    assert (ids == -1).all() and np.isneginf(ln).all()
    for bad in (np.nan, np.inf):
        b2 = b.copy()
        b2[9] = bad
        with pytest.raises(ValueError, match="bias: non-finite value .* at position 9"):
            ops.policy_topk(u, w, 4, bias=b2, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_k_above_the_catalogue_is_capped(rng, backend):
    u = rng.standard_normal((2, 3)).astype(np.float32)
    w = rng.standard_normal((5, 3)).astype(np.float32)
    exc = (np.array([0, 2, 2], np.int64), np.array([1, 3], np.int64))
    ids, sc, ln = ops.policy_topk(u, w, 2**40, exclude=exc, backend=backend)
    assert ids.shape == (2, 5)
    assert (ids[0, 3:] == -1).all() and np.isneginf(sc[0, 3:]).all() and (ids[1] >= 0).all()
    ids, sc, pr, sl = ops.policy_sample(u, w, np.int64(2**40), seed=np.uint64(2**64 - 1), backend=backend)
    assert ids.shape == (2, 5) and (ids >= 0).all()
    np.testing.assert_allclose(pr.sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_k_and_seed_types(rng, backend):
    u = rng.standard_normal((1, 3)).astype(np.float32)
    w = rng.standard_normal((5, 3)).astype(np.float32)
    want = ops.policy_topk(u, w, 2, backend=backend)
    for k in (np.int64(2), np.int32(2), np.uint8(2)):
        np.testing.assert_array_equal(ops.policy_topk(u, w, k, backend=backend)[0], want[0])
    a = ops.policy_sample(u, w, 2, seed=7, backend=backend)
    b = ops.policy_sample(u, w, np.int64(2), seed=np.int64(7), backend=backend)
    np.testing.assert_array_equal(a[0], b[0])
    for bad in (2.0, True, np.float64(2), "2", None, np.bool_(True)):
        with pytest.raises(TypeError, match="k must be an integer"):
            ops.policy_topk(u, w, bad, backend=backend)
    with pytest.raises(ValueError, match="k must be >= 0"):
        ops.policy_topk(u, w, -1, backend=backend)
    for bad in (1.0, True, "1", None):
        with pytest.raises(TypeError, match="seed must be an integer"):
            ops.policy_sample(u, w, 2, seed=bad, backend=backend)
    for bad in (-1, 2**64, -(2**63)):
        with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*64\)"):
            ops.policy_sample(u, w, 2, seed=bad, backend=backend)
    ops.policy_sample(u, w, 2, seed=2**64 - 1, backend=backend)


def test_fma_probe_counts_its_flops():
    """The bench's FMA-peak probe: 12 chains x vector width x 2 flops per step; iters >= 0."""
    width = {"generic": 4, "avx2": 8, "avx512": 16}[_core.cpu_isa()]
    assert _core.fma_probe(1000) == 1000 * 12 * 2 * width
    assert _core.fma_probe(0) == 0
    with pytest.raises(ValueError):
        _core.fma_probe(-1)
