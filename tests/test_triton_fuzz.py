"""Property fuzz of the Triton kernels against the pure-torch reference, as
``tests/test_ops_fuzz.py`` fuzzes the ``cpp`` backend (issue 18; reliability.md "Tests that
prove it": "Triton under TRITON_INTERPRET=1").

Without a GPU the kernels run on the CPU under ``TRITON_INTERPRET=1`` (a Python interpreter
of the kernel language: about a second per policy call), so the shapes are tiny and the
examples few: odd sizes with explicit tiny blocks (every size straddles a tile, a split or
a feature block), float32 / float16 / row-wise int8 tables, ties, -inf bias masks,
exclusion / candidate lists with repeats, empty bags. With a GPU (and no
``TRITON_INTERPRET``) the same properties run the compiled kernels on CUDA tensors.

* Valid inputs: ``policy_topk`` / ``policy_sample`` (tie-aware: scores equal within
  tolerance, ids differ only where the reference ties, the exact reference ids where ties
  are exact), the embedding-bag forward (one table or a TBE list) and the fused backward
  (SGD / row-wise Adagrad, deterministic or atomic).
* Hostile tables (a NaN / inf value, a float32 overflow, an int8 NaN scale in a random row)
  through the GPU dispatch (:mod:`recmeta_sdk.ops._gpu`): the compiled core's outcome, the same
  ValueError message or the same result.

Seeded and derandomized. ``RECMETA_TRITON_FUZZ_EXAMPLES`` scales the examples per property
(default 1: 6 to 12 examples per property, 58 in all: about 20 CPU-s, 35-75 s wall on 2 shared cores).
The examples run and the outcomes are printed at the end of the module (``pytest -s``). Skipped when
Triton or hypothesis is not installed.
"""
from __future__ import annotations

import collections
import os
import sys

import numpy as np
import pytest
import torch

from _triton_setup import DEV, same_outcome  # noqa: E402  (sets TRITON_INTERPRET first)

pytest.importorskip("triton", reason="the triton package is not installed")
hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is not installed")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from recmeta_sdk import ops  # noqa: E402
from recmeta_sdk.ops import _gpu
from recmeta_sdk.ops import backends
from recmeta_sdk.ops import reference as R
from recmeta_sdk.ops._common import check_csr  # noqa: E402

from _helpers import bags, check_ranked, csr, floats, policy_case, table_pair, to_device  # noqa: E402

EB = _gpu.load_kernel_module("embedding_bag")
PT = _gpu.load_kernel_module("policy_topk")
SCALE = float(os.environ.get("RECMETA_TRITON_FUZZ_EXAMPLES", "1"))


def _fuzz(n: int):
    return settings(derandomize=True, deadline=None, max_examples=max(1, int(n * SCALE)), database=None,
                    suppress_health_check=list(HealthCheck))


RTOL, ATOL = 2e-5, 2e-4
FIGURES: collections.Counter[str] = collections.Counter()


@pytest.fixture(scope="module", autouse=True)
def _print_figures():
    yield
    print(f"\ntriton fuzz ({'interpreter' if DEV == 'cpu' else 'GPU'}): {sum(FIGURES.values())} examples "
          f"({', '.join(f'{k} {v}' for k, v in sorted(FIGURES.items()))})", file=sys.stderr)
SEEDS = st.integers(0, 2**32 - 1)


POLICY = {
    "B": st.sampled_from([0, 1, 2, 3, 5]), "N": st.sampled_from([1, 2, 3, 5, 17, 31, 37]),
    "d": st.sampled_from([1, 2, 3, 5, 9]), "k": st.sampled_from([0, 1, 2, 3, 7, 40]),
    "fmt": st.sampled_from(["fp32", "fp16", "int8"]), "bias": st.sampled_from(["none", "plain", "mask"]),
    "exclude": st.sampled_from([None, 0, 4]), "cand": st.sampled_from([None, None, 0, 6]),
    "ties": st.sampled_from(["none", "repeat", "integer"]), "tau": st.sampled_from([0.5, 1.0]),
    "blocks": st.sampled_from([(2, 16, 8, 1), (4, 16, 8, 2), (2, 32, 16, 3)]), "seed": SEEDS,
}


@_fuzz(8)
@given(**POLICY)
def test_triton_policy_topk_matches_reference(B, N, d, k, fmt, bias, exclude, cand, ties, tau, blocks, seed):
    FIGURES["policy_topk"] += 1
    u, tab, ref, b, exc, cnd = policy_case(B, N, d, fmt, bias, exclude, cand, ties, seed, device=DEV,
                                             repeat_frac=1 / 3)
    bb, bn, bd, sp = blocks
    ku, kb = u.to(DEV), None if b is None else b.to(DEV)
    ids, sc, ln = PT.policy_topk(ku, tab, k, kb, exc, cnd, tau, block_b=bb, block_n=bn, block_d=bd, splits=sp)
    # the screen recmeta_sdk.ops._gpu applies to the kernel's result (as the sampling test below
    # passes it): a masked item's -inf score is padding (id -1), a non-finite score an error
    ids, sc = _gpu._screen_gpu_result(ku, tab, kb, check_csr(exc, "exclude", B, N), check_csr(cnd, "candidates", B, N),
                                      tau, ids, sc, ln)
    rids, rsc, rln = R.policy_topk(u, ref, k, b, exc, cnd, tau)
    full = R._scores(u, ref, b, tau)
    mask = R.eligible_mask(B, N, exc, cnd) & ~torch.isneginf(full)
    check_ranked(ids, sc, full, mask, rids, k, ties == "integer" and fmt != "int8" and tau == 1.0, ref_keys=rsc,
                 rtol=RTOL, atol=ATOL)
    ln = ln.cpu()
    assert torch.equal(torch.isneginf(ln), torch.isneginf(rln))
    fin = torch.isfinite(rln)
    torch.testing.assert_close(ln[fin], rln[fin], rtol=1e-5, atol=1e-4)


@_fuzz(6)
@given(**POLICY, sample_seed=st.one_of(st.integers(0, 2**16), st.integers(2**63, 2**64 - 1)))
def test_triton_policy_sample_matches_reference(B, N, d, k, fmt, bias, exclude, cand, ties, tau, blocks, seed,
                                                 sample_seed):
    FIGURES["policy_sample"] += 1
    u, tab, ref, b, exc, cnd = policy_case(B, N, d, fmt, bias, exclude, cand, ties, seed, device=DEV,
                                             repeat_frac=1 / 3)
    bb, bn, bd, sp = blocks
    ku, kb = u.to(DEV), None if b is None else b.to(DEV)
    ke, kc = check_csr(exc, "exclude", B, N), check_csr(cnd, "candidates", B, N)
    # the exact tail and the screen that recmeta_sdk.ops._gpu passes (the slate log-probability of
    # a slate holding nearly all of the mass is recomputed from the tail items)
    ids, sc, prop, slp = PT.policy_sample(
        ku, tab, k, sample_seed, kb, exc, cnd, tau, block_b=bb, block_n=bn, block_d=bd, splits=sp,
        exact_tail=lambda i: _gpu._exact_logtail(ku, tab, kb, ke, kc, tau, i),
        screen=lambda i, v, ln: _gpu._screen_gpu_result(ku, tab, kb, ke, kc, tau, i, v, ln))
    rids, _, rprop, rslp = R.policy_sample(u, ref, k, sample_seed, b, exc, cnd, tau)
    full = R._scores(u, ref, b, tau)
    mask = R.eligible_mask(B, N, exc, cnd) & ~torch.isneginf(full)
    pert = full + R.gumbel_noise(sample_seed, torch.arange(B)[:, None], torch.arange(N)[None, :])
    ids, sc, prop, slp = ids.cpu(), sc.cpu(), prop.cpu(), slp.cpu()
    key = lambda i: torch.gather(pert, 1, i.clamp(min=0)).masked_fill(i < 0, float("-inf"))  # noqa: E731
    check_ranked(ids, key(ids), pert, mask, rids, k, False, ref_keys=key(rids), rtol=RTOL, atol=ATOL)
    valid = ids >= 0
    np.testing.assert_allclose(sc[valid].numpy(), torch.gather(full, 1, ids.clamp(min=0))[valid].numpy(),
                               rtol=RTOL, atol=ATOL)
    assert torch.isneginf(sc[~valid]).all() and (prop[~valid] == 0).all()
    assert torch.isfinite(prop).all() and (prop >= 0).all() and (prop <= 1 + 1e-6).all()
    if torch.equal(ids, rids):
        np.testing.assert_allclose(prop.numpy(), rprop.numpy(), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(slp.numpy(), rslp.numpy(), rtol=1e-4, atol=1e-4)


EB_ARGS = {"n": st.sampled_from([1, 2, 7, 13, 31]), "d": st.sampled_from([1, 3, 5, 8, 17, 33]),
           "B": st.sampled_from([0, 1, 2, 5, 9]), "T": st.sampled_from([1, 1, 2]),
           "max_len": st.sampled_from([0, 1, 4, 9]), "mode": st.sampled_from(["sum", "mean"]),
           "weighted": st.booleans(), "id32": st.booleans(), "seed": SEEDS}


@_fuzz(10)
@given(**EB_ARGS, fmts=st.sampled_from([("fp32", "fp32"), ("fp16", "int8"), ("int8", "fp32")]),
       blocks=st.sampled_from([(2, 4), (4, 8), (8, 16)]))
def test_triton_embedding_bag_matches_reference(n, d, B, T, max_len, mode, weighted, id32, seed, fmts, blocks):
    FIGURES["embedding_bag"] += 1
    rng = np.random.default_rng(seed)
    tabs, refs, idx, lens = [], [], [], []
    for t in range(T):
        rows = n + 3 * t
        kt, rt = table_pair(floats(rng, (rows, d + t), False), fmts[t], DEV)
        tabs.append(kt)
        refs.append(rt)
        i, o = bags(rng, B, max_len, 0.2, np.int64, rows)
        idx.append(i)
        lens.append(np.diff(o))
    idx = torch.from_numpy(np.concatenate(idx))
    off = torch.zeros(T * B + 1, dtype=torch.int64)
    off[1:] = torch.cumsum(torch.from_numpy(np.concatenate(lens)), 0)
    if id32:
        idx, off = idx.to(torch.int32), off.to(torch.int32)
    w = torch.from_numpy(rng.random(idx.numel()).astype(np.float32) + 0.25) if weighted else None
    out = EB.embedding_bag_tbe_fwd(tabs, idx.to(DEV), off.to(DEV), None if w is None else w.to(DEV), mode,
                                   block_n=blocks[0], block_d=blocks[1])
    ref = R.embedding_bag_tbe(refs, idx, off, w, mode)
    assert out.shape == ref.shape
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-5, atol=2e-5)


@_fuzz(10)
@given(**EB_ARGS, optimizer=st.sampled_from(["sgd", "rowwise_adagrad"]), deterministic=st.booleans())
def test_triton_embedding_bag_backward_matches_reference(n, d, B, T, max_len, mode, weighted, id32, seed,
                                                         optimizer, deterministic):
    FIGURES["embedding_bag_backward"] += 1
    rng = np.random.default_rng(seed)
    w0 = torch.from_numpy(floats(rng, (n, d), False))
    i, o = bags(rng, B, max_len, 0.2, np.int64, n)
    idx, off = torch.from_numpy(i), torch.from_numpy(o)
    if id32:
        idx, off = idx.to(torch.int32), off.to(torch.int32)
    g = torch.from_numpy(floats(rng, (B, d), False))
    psw = torch.from_numpy(rng.random(idx.numel()).astype(np.float32) + 0.25) if weighted else None
    st0 = torch.from_numpy(rng.random(n).astype(np.float32)) if optimizer == "rowwise_adagrad" else None
    w_ref, s_ref = w0.clone(), None if st0 is None else st0.clone()
    R.embedding_bag_backward(w_ref, idx, off, g, psw, mode, optimizer, 0.3, 1e-8, s_ref)
    w_k, s_k = w0.clone().to(DEV), None if st0 is None else st0.clone().to(DEV)
    EB.embedding_bag_bwd(w_k, idx.to(DEV), off.to(DEV), g.to(DEV), None if psw is None else psw.to(DEV), mode,
                         optimizer, 0.3, 1e-8, s_k, deterministic)
    torch.testing.assert_close(w_k.cpu(), w_ref, rtol=1e-5, atol=1e-5)
    if s_k is not None:
        torch.testing.assert_close(s_k.cpu(), s_ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------
# hostile tables through the GPU dispatch: the compiled core's outcome
# ---------------------------------------------------------------------------------------
def _poison(rng, w: np.ndarray, u: np.ndarray, kind: str):
    """(table, user states, the poisoned row) with one bad row; int8 poisons after quantising."""
    r = int(rng.integers(0, w.shape[0]))
    if kind in ("nan", "inf", "-inf"):
        w[r, int(rng.integers(0, w.shape[1]))] = float(kind)
    elif kind == "overflow":
        w[r] = 3e38
        u = np.abs(u) + 1.0
    return w, u, r


def _same_outcome(run_gpu, run_cpp):
    error = same_outcome(run_gpu, run_cpp, atol=1e-4)
    FIGURES["(hostile: same ValueError)" if error is not None else "(hostile: same result)"] += 1


@pytest.mark.skipif(not backends.available("cpp"), reason="the compiled core is not built")
@_fuzz(12)
@given(B=st.sampled_from([0, 1, 3]), N=st.sampled_from([1, 3, 17, 37]), d=st.sampled_from([1, 4, 7]),
       kind=st.sampled_from(["nan", "inf", "-inf", "overflow", "int8 scale", "int8 min"]),
       fmt=st.sampled_from(["fp32", "fp16", "int8"]), exclude=st.sampled_from([None, 3]),
       cand=st.sampled_from([None, 2]), sample=st.booleans(), seed=SEEDS)
def test_triton_policy_hostile_tables_behave_as_cpp(B, N, d, kind, fmt, exclude, cand, sample, seed):
    FIGURES["policy hostile"] += 1
    rng = np.random.default_rng(seed)
    w, u, r = _poison(rng, rng.standard_normal((N, d)).astype(np.float32),
                      rng.standard_normal((B, d)).astype(np.float32), kind)
    if kind.startswith("int8"):
        q = R.quantize(torch.from_numpy(w), "int8")
        (q.row_scale if kind == "int8 scale" else q.row_min)[r] = float("nan")
        tab = q
    else:
        tab = torch.from_numpy(w) if fmt == "fp32" else R.quantize(torch.from_numpy(w), fmt)
    u = torch.from_numpy(u)
    exc, cnd = csr(rng, B, N, exclude), csr(rng, B, N, cand)
    kt = to_device(tab, DEV)
    k = 3

    def gpu():
        return _gpu._policy_run("triton", u.to(DEV), kt, min(k, N), 99 if sample else None, None,
                                check_csr(exc, "exclude", B, N), check_csr(cnd, "candidates", B, N), 1.0)

    def cpp():
        kw = {"exclude": exc, "candidates": cnd, "backend": "cpp"}
        return ops.policy_sample(u, tab, k, seed=99, **kw) if sample else ops.policy_topk(u, tab, k, **kw)

    _same_outcome(gpu, cpp)


@pytest.mark.skipif(not backends.available("cpp"), reason="the compiled core is not built")
@_fuzz(12)
@given(n=st.sampled_from([1, 3, 17]), d=st.sampled_from([1, 4, 9]), B=st.sampled_from([1, 2, 5]),
       kind=st.sampled_from(["nan", "inf", "-inf", "int8 scale", "int8 min"]), fmt=st.sampled_from(["fp32", "fp16"]),
       mode=st.sampled_from(["sum", "mean"]), seed=SEEDS)
def test_triton_embedding_bag_hostile_tables_behave_as_cpp(n, d, B, kind, fmt, mode, seed):
    FIGURES["embedding_bag hostile"] += 1
    rng = np.random.default_rng(seed)
    w, _, r = _poison(rng, rng.standard_normal((n, d)).astype(np.float32), np.zeros(1, np.float32), kind)
    if kind.startswith("int8"):
        tab = R.quantize(torch.from_numpy(w), "int8")
        (tab.row_scale if kind == "int8 scale" else tab.row_min)[r] = float("nan")
    else:
        tab = torch.from_numpy(w) if fmt == "fp32" else R.quantize(torch.from_numpy(w), fmt)
    i, o = bags(rng, B, 4, 0.2, np.int64, n)
    idx, off = torch.from_numpy(i), torch.from_numpy(o)
    kt = to_device(tab, DEV)
    _same_outcome(lambda: (_gpu._embedding_bag_run("triton", [kt], idx.to(DEV), off.to(DEV), None, mode),),
                  lambda: (ops.embedding_bag(tab, idx, off, mode=mode, backend="cpp"),))
