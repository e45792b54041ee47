"""Triton fused policy scoring: top-k and Gumbel-top-k sampling without the (B, N) matrix.

Semantics: :func:`recmeta_sdk.ops.reference.policy_topk` / :func:`~recmeta_sdk.ops.reference.policy_sample`.

Two stages:

1. ``_policy_topk_fwd_kernel``: the grid is (user blocks, item splits). A program scores
   ``BLOCK_B`` users against its split of the items ``BLOCK_N`` at a time (``tl.dot`` for
   16+ users, a broadcast multiply-reduce below), applies bias / temperature and the
   candidate / exclusion masks (binary search of the sorted ``row * N + id`` keys per
   tile), keeps an online log-sum-exp (max, sum of exp) per user and a running top-KB of
   packed ``(score, id)`` int64 keys (per tile: ``tl.topk`` of the tile, then a bitonic
   merge with the running list). With ``SAMPLE`` the keys rank ``s + Gumbel(seed, row,
   item)``, the noise computed in-kernel with the 32-bit counter hash of
   :func:`recmeta_sdk.ops.reference.hash_uniform` (bit-identical uniforms to the CPU's).
   It writes (B, splits, KB) keys and (B, splits) max / sum-exp: a few KB per user.
2. :func:`recmeta_sdk.kernels._common.merge_topk` / ``merge_lse`` (torch): ``torch.topk``
   over the small buffer and the log-sum-exp merge.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import (KEY_SENTINEL, check_item_count, gather_scores, item_hi_mix, merge_lse,
                      merge_topk, seed_key, sorted_pair_keys)
from ._heuristics import cdiv, num_sms, policy_config

__all__ = ["policy_topk", "policy_sample", "policy_stage1", "hash_uniform"]


@triton.jit
def _mix32(x):
    """lowbias32 finaliser on uint32 (wrap-around multiplies)."""
    x = x ^ (x >> 16)
    x = x * tl.full(x.shape, 0x7FEB352D, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full(x.shape, 0x846CA68B, tl.uint32)
    x = x ^ (x >> 16)
    return x


@triton.jit
def _hash_uniform(seed_key, hi_mix, rows, cols):
    """(BLOCK_B, BLOCK_N) float32 uniforms: reference.hash_uniform(seed, rows, cols) bit for bit."""
    r = rows.to(tl.uint32) + tl.full(rows.shape, 0x85EBCA6B, tl.uint32)
    h = _mix32(seed_key ^ _mix32(r))  # (BLOCK_B,)
    h = _mix32(h[:, None] ^ cols.to(tl.uint32)[None, :])  # item_lo
    h = _mix32(h ^ hi_mix)  # item_hi == 0 for ids < 2**32: mix32(0 + 0xC2B2AE35)
    return ((h >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07  # 2**-23: exact, u < 1


@triton.jit
def _gumbel(seed_key, hi_mix, rows, cols):
    """Gumbel noise -log(-log(u)) with u = hash_uniform(seed, row, item) (float32)."""
    u = _hash_uniform(seed_key, hi_mix, rows, cols)
    return -tl.log(-tl.log(u))


@triton.jit(do_not_specialize=["seed_key", "hi_mix"])
def _hash_uniform_fwd_kernel(
    out_ptr,  # (B, N) float32 out: hash_uniform(seed, row, item)
    B, N,  # rows, items
    seed_key,  # uint32 key of the seed
    hi_mix,  # uint32 mix32(0xC2B2AE35)
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    u = _hash_uniform(seed_key.to(tl.uint32), hi_mix.to(tl.uint32), rows, cols)
    m = (rows < B)[:, None] & (cols < N)[None, :]
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :], u, mask=m)


def hash_uniform(seed: int, B: int, N: int, device="cpu") -> torch.Tensor:
    """(B, N) float32 uniforms of rows 0..B-1 and items 0..N-1 from the kernels' hash (the
    function the policy kernel perturbs with; tests compare it bit for bit to the reference)."""
    out = torch.empty(B, N, dtype=torch.float32, device=device)
    if B and N:
        _hash_uniform_fwd_kernel[(cdiv(B, 4), cdiv(N, 32))](out, B, N, seed_key(seed), item_hi_mix(),
                                                          BLOCK_B=4, BLOCK_N=32)
    return out


@triton.jit
def _lower_bound(keys_ptr, n, target, STEPS):
    """Per element of ``target`` (int64): first position p in the sorted keys[0:n] with
    keys[p] >= target (``STEPS`` >= ceil(log2(n + 1)) halvings)."""
    lo = tl.zeros(target.shape, dtype=tl.int64)
    hi = lo + n
    for _ in range(STEPS):
        active = lo < hi
        mid = (lo + hi) // 2
        v = tl.load(keys_ptr + mid, mask=active, other=0)
        right = active & (v < target)
        hi = tl.where(active & (v >= target), mid, hi)
        lo = tl.where(right, mid + 1, lo)
    return lo


@triton.jit
def _pair_hits(keys_ptr, lo, hi, rows, cols, N):
    """(BLOCK_B, BLOCK_N) bool: item cols[j] is listed for user rows[i] among keys[lo:hi]."""
    hit = (rows[:, None] < 0) & (cols[None, :] < 0)  # all False
    cnt = hi - lo
    for j in range(0, tl.max(cnt, axis=0)):
        ok = j < cnt
        key = tl.load(keys_ptr + lo + j, mask=ok, other=-1)
        item = key - rows.to(tl.int64) * N
        hit = hit | ((item[:, None] == cols[None, :].to(tl.int64)) & ok[:, None])
    return hit


@triton.jit(do_not_specialize=["seed_key", "hi_mix", "n_excl", "n_cand", "excl_steps", "cand_steps"])
def _policy_topk_fwd_kernel(
    u_ptr,  # (B, D) float32 user states
    item_ptr,  # (N, D) item table: float32, float16 or uint8 codes
    scale_ptr,  # (N,) float32 int8 row scales (IS_INT8), else unused
    rmin_ptr,  # (N,) float32 int8 row minima (IS_INT8), else unused
    bias_ptr,  # (N,) float32 item bias (HAS_BIAS), else unused
    excl_ptr,  # (E,) int64 sorted keys row * N + id of excluded pairs (HAS_EXCL)
    cand_ptr,  # (C,) int64 sorted keys row * N + id of candidate pairs (HAS_CAND)
    keys_ptr,  # (B, SPLITS, KB) int64 out: per-split top-KB packed (score, id), best first
    max_ptr,  # (B, SPLITS) float32 out: per-split max of the eligible scores (-inf if none)
    sum_ptr,  # (B, SPLITS) float32 out: per-split sum of exp(s - max); NaN if a score read was not finite
    B, N, D,  # batch, items, feature dim
    items_per_split,  # items of one split (a multiple of BLOCK_N)
    temperature,  # scores are (u . item + bias) / temperature
    seed_key,  # uint32 key of the seed (SAMPLE)
    hi_mix,  # uint32 mix32(0xC2B2AE35): the item_hi term of the hash (SAMPLE)
    n_excl, excl_steps,  # number of excluded keys, binary-search steps
    n_cand, cand_steps,  # number of candidate keys, binary-search steps
    stride_ub, stride_ud,  # user_states strides (elements)
    stride_in, stride_id,  # item table strides (elements)
    SPLITS,  # programs along the items (grid dim 1)
    IS_INT8: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_EXCL: tl.constexpr,
    HAS_CAND: tl.constexpr,
    SAMPLE: tl.constexpr,  # rank by s + Gumbel noise (policy_sample) instead of s
    USE_DOT: tl.constexpr,  # tl.dot (BLOCK_B >= 16) or broadcast multiply-reduce
    BLOCK_B: tl.constexpr,  # users per program
    BLOCK_N: tl.constexpr,  # items per tile
    BLOCK_D: tl.constexpr,  # features per step
    KB: tl.constexpr,  # kept per split (power of two <= BLOCK_N, >= k)
):
    pid_b = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    rows64 = rows.to(tl.int64)
    n_begin = pid_s.to(tl.int64) * items_per_split
    n_end = tl.minimum(n_begin + items_per_split, N)
    sentinel = (tl.zeros([BLOCK_B, KB], dtype=tl.int64) - 2147483648) * 4294967296
    best = sentinel
    m_run = tl.full([BLOCK_B], float("-inf"), dtype=tl.float32)
    l_run = tl.zeros([BLOCK_B], dtype=tl.float32)
    nonfinite = rows < 0  # per user: a non-finite score was read (all False)
    if HAS_EXCL:
        e_lo = _lower_bound(excl_ptr, n_excl, rows64 * N + n_begin, excl_steps)
    if HAS_CAND:
        c_lo = _lower_bound(cand_ptr, n_cand, rows64 * N + n_begin, cand_steps)
    for n0 in range(n_begin, n_end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        cmask = cols < n_end
        if IS_INT8:
            sc = tl.load(scale_ptr + cols, mask=cmask, other=0.0)
            mn = tl.load(rmin_ptr + cols, mask=cmask, other=0.0)
        acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            dmask = dd < D
            u = tl.load(u_ptr + rows64[:, None] * stride_ub + dd[None, :] * stride_ud,
                        mask=rmask[:, None] & dmask[None, :], other=0.0)
            im = cmask[:, None] & dmask[None, :]
            it = tl.load(item_ptr + cols[:, None] * stride_in + dd[None, :] * stride_id,
                         mask=im, other=0).to(tl.float32)
            if IS_INT8:
                it = tl.where(im, it * sc[:, None] + mn[:, None], 0.0)
            if USE_DOT:
                acc += tl.dot(u, tl.trans(it), input_precision="ieee")
            else:
                acc += tl.sum(u[:, None, :] * it[None, :, :], axis=2)
        s = acc
        if HAS_BIAS:
            bv = tl.load(bias_ptr + cols, mask=cmask, other=0.0)
            s = s + bv[None, :]
        s = s / temperature
        elig = rmask[:, None] & cmask[None, :]
        # a NaN / +-inf score (NaN / inf item values or int8 scale / min, or a float32
        # overflow) of a row the op reads, other than -inf from a -inf bias (a mask)
        bad = (s != s) | (s == float("inf")) | (s == float("-inf"))  # noqa: PLR0124 - s != s: NaN
        if HAS_BIAS:
            bad = bad & ~((s == float("-inf")) & (bv == float("-inf"))[None, :])
        tile_end = rows64 * N + n0 + BLOCK_N
        if HAS_CAND:
            c_hi = _lower_bound(cand_ptr, n_cand, tile_end, cand_steps)
            elig = elig & _pair_hits(cand_ptr, c_lo, c_hi, rows, cols, N)
            c_lo = c_hi
        if HAS_EXCL:
            e_hi = _lower_bound(excl_ptr, n_excl, tile_end, excl_steps)
            elig = elig & ~_pair_hits(excl_ptr, e_lo, e_hi, rows, cols, N)
            e_lo = e_hi
        # the rows read: every row, or with candidates the eligible ones (as the CPU backends)
        if HAS_CAND:
            bad = bad & elig
        else:
            bad = bad & rmask[:, None] & cmask[None, :]
        nonfinite = nonfinite | (tl.max(bad.to(tl.int32), axis=1) > 0)
        # online log-sum-exp over the eligible scores
        sm = tl.where(elig, s, float("-inf"))
        m_new = tl.maximum(m_run, tl.max(sm, axis=1))
        safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.where(m_run == float("-inf"), 0.0, tl.exp(m_run - safe))
        p = tl.where(elig, tl.exp(s - safe[:, None]), 0.0)
        l_run = l_run * alpha + tl.sum(p, axis=1)
        m_run = m_new
        # packed keys: ordered float bits << 32 | (2**32 - 1 - id)
        v = s
        if SAMPLE:
            v = s + _gumbel(seed_key.to(tl.uint32), hi_mix.to(tl.uint32), rows, cols)
        bits = v.to(tl.int32, bitcast=True)
        ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
        key = ordered.to(tl.int64) * 4294967296 + (4294967295 - cols.to(tl.int64))[None, :]
        key = tl.where(elig, key, (tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.int64) - 2147483648) * 4294967296)
        # Merge only when some key beats its user's current KB-th best (after the first
        # tiles, most tiles are skipped at the cost of one comparison per element).
        kth = tl.min(best, axis=1)
        if tl.max((key > kth[:, None]).to(tl.int32)) > 0:
            top = tl.topk(key, KB, dim=1)  # (BLOCK_B, KB) descending
            # bitonic merge: max(desc, asc) holds the KB largest of both lists
            best = tl.sort(tl.maximum(best, tl.flip(top, 1)), dim=1, descending=True)
    kcols = tl.arange(0, KB)
    out = keys_ptr + (rows64[:, None] * SPLITS + pid_s) * KB + kcols[None, :]
    tl.store(out, best, mask=rmask[:, None])
    tl.store(max_ptr + rows64 * SPLITS + pid_s, m_run, mask=rmask)
    # a user that read a non-finite score gets a NaN sum: merge_lse makes its log-normaliser
    # NaN, which the caller's screen turns into the ValueError naming the row
    l_run = tl.where(nonfinite, float("nan"), l_run)
    tl.store(sum_ptr + rows64 * SPLITS + pid_s, l_run, mask=rmask)


def _table_parts(items):
    if isinstance(items, torch.Tensor):
        return items, items, items, False
    if items.dtype == "int8":
        return items.data, items.row_scale, items.row_min, True
    return items.data, items.data, items.data, False


def _steps(n: int) -> int:
    return max(1, (int(n) + 1).bit_length())


def policy_stage1(user_states, items, k: int, bias=None, exclude=None, candidates=None,
                  temperature: float = 1.0, seed: Optional[int] = None, **overrides):
    """Stage 1: per-split top-KB keys (B, splits, KB) and log-sum-exp parts (B, splits) x2.

    ``overrides``: block_b / block_n / block_d / splits for :func:`policy_config`.
    """
    data, scale, rmin, is_int8 = _table_parts(items)
    B, D = user_states.shape
    N = data.shape[0]
    check_item_count(N)
    dev = user_states.device
    cfg = policy_config(B, N, D, k, num_sms(dev) if dev.type == "cuda" else 132, **overrides)
    keys = torch.empty(B, cfg.splits, cfg.KB, dtype=torch.int64, device=dev)
    mx = torch.empty(B, cfg.splits, dtype=torch.float32, device=dev)
    sm = torch.empty(B, cfg.splits, dtype=torch.float32, device=dev)
    if B == 0:
        return keys, mx, sm
    if N == 0:
        keys.fill_(KEY_SENTINEL)
        mx.fill_(float("-inf"))
        sm.zero_()
        return keys, mx, sm
    ex = sorted_pair_keys(exclude, N, dev)
    ca = sorted_pair_keys(candidates, N, dev)
    has_ex = ex is not None and ex.numel() > 0
    dummy = keys
    grid = (cdiv(B, cfg.BLOCK_B), cfg.splits)
    _policy_topk_fwd_kernel[grid](
        user_states, data, scale, rmin,
        bias if bias is not None else user_states,
        ex if has_ex else dummy,
        ca if ca is not None and ca.numel() > 0 else dummy,
        keys, mx, sm,
        B, N, D, cfg.items_per_split, float(temperature),
        seed_key(seed) if seed is not None else 0, item_hi_mix(),
        ex.numel() if has_ex else 0, _steps(ex.numel()) if has_ex else 1,
        ca.numel() if ca is not None else 0, _steps(ca.numel()) if ca is not None else 1,
        user_states.stride(0), user_states.stride(1), data.stride(0), data.stride(1),
        cfg.splits, IS_INT8=is_int8, HAS_BIAS=bias is not None, HAS_EXCL=has_ex,
        HAS_CAND=ca is not None and ca.numel() > 0, SAMPLE=seed is not None, USE_DOT=cfg.use_dot,
        BLOCK_B=cfg.BLOCK_B, BLOCK_N=cfg.BLOCK_N, BLOCK_D=cfg.BLOCK_D, KB=cfg.KB,
        num_warps=cfg.num_warps,
    )
    if ca is not None and ca.numel() == 0:  # candidates given, none listed: nothing eligible
        keys.fill_(KEY_SENTINEL)
        mx.fill_(float("-inf"))
        sm.zero_()
    return keys, mx, sm


def policy_topk(user_states, items, k: int, bias=None, exclude=None, candidates=None,
                temperature: float = 1.0, **overrides):
    """(ids (B, min(k, N)) int64, scores (B, min(k, N)) float32, log_normalizer (B,) float32),
    best first, ties broken by the smaller id (the packed keys' order)."""
    k = min(int(k), _table_parts(items)[0].shape[0])  # at most N columns, as every backend
    keys, mx, sm = policy_stage1(user_states, items, k, bias, exclude, candidates, temperature,
                                 None, **overrides)
    ids, vals = merge_topk(keys, k)
    return ids, vals, merge_lse(mx, sm)


def policy_sample(user_states, items, k: int, seed: int, bias=None, exclude=None,
                  candidates=None, temperature: float = 1.0, exact_tail=None, screen=None,
                  **overrides):
    """(ids, scores, propensities, slate_log_prob): Gumbel-top-k with the shared hash.

    The slate probability needs the mass outside the slate; the kernel returns only the
    log-normaliser, so it is ``Z - slate`` (:func:`recmeta_sdk.ops.reference.logtail_from_lognorm`),
    recomputed by ``exact_tail(ids)(rows)`` where that difference cancels. A -inf score (a
    -inf bias's mask) is never drawn: such slots become padding. ``screen(ids, values,
    lognorm) -> (ids, values)``: the caller's check of the merged result (it raises on a
    non-finite score), optional."""
    from recmeta_sdk.ops.reference import slate_probabilities, logtail_from_lognorm

    k = min(int(k), _table_parts(items)[0].shape[0])  # at most N columns, as every backend
    keys, mx, sm = policy_stage1(user_states, items, k, bias, exclude, candidates, temperature,
                                 int(seed), **overrides)
    ids, vals = merge_topk(keys, k)
    lognorm = merge_lse(mx, sm)
    if screen is not None:
        ids, vals = screen(ids, vals, lognorm)
    ids = ids.masked_fill(torch.isneginf(vals), -1)
    sc = gather_scores(user_states, items, ids, bias, temperature)
    valid = ids >= 0
    logtail = logtail_from_lognorm(sc, valid, lognorm, None if exact_tail is None else exact_tail(ids))
    return (ids, sc) + slate_probabilities(sc, valid, logtail)
