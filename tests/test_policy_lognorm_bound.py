"""The log-normaliser of the compiled core against an exact float64 log-sum-exp, within the
error bound of its vectorised exp (issue 20).

The exp pass of the fused kernels computes exp(s - m) as 2^t with a degree-5 polynomial; the
kernel documents the bound (per term, relative: 2.1e-7 for the polynomial plus |s - m| * 6e-8
for rounding t; |m| * 6e-8 for the shift's own rounding; the float32 sum of a block at most
2.1e-6), which puts the log-normaliser within about 2.4e-6 + 1e-7 * |m| of the exact one. These tests make every score exact in float32
(integer items and bias, users in multiples of 1/8, temperatures that are powers of two), so
the only error left is the exp pass's and the final rounding to float32, and check that bound
(with a margin of 3x on the terms' part) on every kernel: the row kernel (B = 1, 2; also the candidate lists),
the small-tile kernel (B = 3..8), the packed micro-kernel (B > 8), float16 and int8 tables, and
policy_sample's log-normaliser. The reference tests (test_policy_topk.py) allow 1e-5.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from recmeta_sdk import ops
from recmeta_sdk.ops.reference import QuantizedTable

_core = pytest.importorskip("recmeta_sdk._core")


def exact_lognorm(s: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """log sum exp over the eligible entries of each row, in float64 (s exact)."""
    out = np.full(s.shape[0], -np.inf)
    for b in range(s.shape[0]):
        v = s[b][mask[b]]
        if v.size:
            m = v.max()
            out[b] = m + np.log(np.exp(v - m).sum())
    return out


def exact_case(rng, B, N, d, scale):
    """Items in {-3..3}, users in multiples of 1/8 up to `scale`, bias in multiples of 1/8:
    every score and partial sum is exact in float32 (|s| * 8 < 2^24)."""
    items = rng.integers(-3, 4, size=(N, d)).astype(np.float32)
    users = (rng.integers(-8 * scale, 8 * scale + 1, size=(B, d)) / 8.0).astype(np.float32)
    bias = (rng.integers(-16, 17, size=N) / 8.0).astype(np.float32)
    s = users.astype(np.float64) @ items.astype(np.float64).T + bias.astype(np.float64)
    assert np.abs(s).max() * 8 < 2 ** 24
    return users, items, bias, s


def check_bound(ln, exact, margin=3.0):
    ln = np.asarray(ln, dtype=np.float64)
    err = np.abs(ln - exact)
    # the kernel's bound: terms ~3e-7 + 1e-7 |m| (m <= |log-normaliser| + log N), the float32
    # block sums <= 2.1e-6 (worst case; typically ~3e-7), the float32 rounding of the result
    bound = margin * (3e-7 + 1e-7 * (np.abs(exact) + 20.0)) + 2.1e-6 + 6e-8 * np.abs(exact)
    assert (err <= bound).all(), (err.max(), (err / bound).max())


@pytest.mark.parametrize("B", [1, 2, 5, 8, 70])
@pytest.mark.parametrize("scale", [1, 4, 40])
@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_topk_lognorm_within_exp_bound(rng, B, scale, tau):
    N, d = 5003, 24  # several blocks of items, a partial last group
    users, items, bias, s = exact_case(rng, B, N, d, scale)
    _, _, ln = _core.policy_topk(users, items, 7, bias=bias, temperature=tau)
    check_bound(ln, exact_lognorm(s / tau, np.ones_like(s, dtype=bool)))


@pytest.mark.parametrize("dtype", ["fp16", "int8"])
@pytest.mark.parametrize("B", [1, 5, 70])
def test_quantized_tables_lognorm_within_exp_bound(rng, dtype, B):
    """float16 holds the integer items exactly; an int8 table with scale 1 and min -3 holds
    them exactly too (value = code * 1 + (-3))."""
    N, d = 3001, 32
    users, items, bias, s = exact_case(rng, B, N, d, 4)
    if dtype == "fp16":
        tab = QuantizedTable("fp16", torch.from_numpy(items.astype(np.float16)))
    else:
        tab = QuantizedTable("int8", torch.from_numpy((items + 3).astype(np.uint8)),
                             torch.ones(N), torch.full((N,), -3.0))
    _, _, ln = ops.policy_topk(torch.from_numpy(users), tab, 5, bias=torch.from_numpy(bias), backend="cpp")
    check_bound(ln.numpy(), exact_lognorm(s, np.ones_like(s, dtype=bool)))


def test_lognorm_with_exclusions_candidates_and_sampling_within_exp_bound(rng):
    B, N, d = 6, 4099, 16
    users, items, bias, s = exact_case(rng, B, N, d, 8)
    mask = np.ones_like(s, dtype=bool)
    ex = [rng.choice(N, size=30, replace=False) for _ in range(B)]
    for b, e in enumerate(ex):
        mask[b, e] = False
    eo = np.arange(0, 30 * B + 1, 30, dtype=np.int64)
    ei = np.concatenate(ex).astype(np.int64)
    _, _, ln = _core.policy_topk(users, items, 9, bias=bias, exclude_offsets=eo, exclude_ids=ei)
    check_bound(ln, exact_lognorm(s, mask))
    _, _, ln_s, _ = _core.policy_sample(users, items, 9, 5, bias=bias, exclude_offsets=eo, exclude_ids=ei)
    check_bound(ln_s, exact_lognorm(s, mask))
    # candidate lists (the row kernel over gathered rows), one user per call and all together
    cand = [rng.choice(N, size=500, replace=False) for _ in range(B)]
    co = np.arange(0, 500 * B + 1, 500, dtype=np.int64)
    ci = np.concatenate(cand).astype(np.int64)
    cmask = np.zeros_like(mask)
    for b, c in enumerate(cand):
        cmask[b, c] = True
    _, _, ln_c = _core.policy_topk(users, items, 9, bias=bias, candidate_offsets=co, candidate_ids=ci)
    check_bound(ln_c, exact_lognorm(s, cmask))


@pytest.mark.parametrize("B", [1, 5, 70])
def test_block_sum_overflow_is_not_mistaken_for_a_non_finite_score(rng, B):
    """The dense pass screens a block for non-finite scores with its sum; two finite scores
    whose sum overflows float32 send it to the slow screen, which must find nothing and go on."""
    N, d = 2000, 8
    users = np.zeros((B, d), np.float32)
    users[:, 0] = 1.0
    items = rng.standard_normal((N, d)).astype(np.float32)
    items[5, 0] = 2e38
    items[900, 0] = 1.5e38
    ids, sc, ln = _core.policy_topk(users, items, 3)
    assert (ids[:, :2] == [5, 900]).all()
    np.testing.assert_array_equal(sc[:, :2], np.float32([[2e38, 1.5e38]] * B))
    np.testing.assert_allclose(ln, np.float32(2e38), rtol=1e-6)
