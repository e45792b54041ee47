"""The Triton kernels against the reference, on the CPU under TRITON_INTERPRET=1.

Tiny, odd shapes with explicit tiny blocks so that every size straddles block
boundaries (B, N, d primes; splits that leave a ragged last tile), strided inputs, all
table formats, masks, and the Gumbel hash. Skipped when Triton is not installed. With a
GPU and no TRITON_INTERPRET the same tests run the compiled kernels on CUDA tensors.
"""
import os

import pytest
import torch

from _triton_setup import DEV, same_outcome  # noqa: E402  (sets TRITON_INTERPRET first)

pytest.importorskip("triton")

from recmeta_sdk.ops import reference as R  # noqa: E402
from recmeta_sdk.ops._native import load_kernel_module  # noqa: E402

EB = load_kernel_module("embedding_bag")
PT = load_kernel_module("policy_topk")
COMMON = load_kernel_module("_common")

from _helpers import check_topk, gen, to_device, torch_bags, torch_csr  # noqa: E402


def _table(fmt, N, D, g, strided=False):
    """(kernel table on DEV, reference table on CPU)."""
    w = torch.randn(N, D + (5 if strided else 0), generator=g)[:, :D] if strided else torch.randn(N, D, generator=g)
    if fmt == "fp32":
        return w.to(DEV), w
    q = R.quantize(w.contiguous(), fmt)
    if fmt == "fp16" and strided:
        wide = torch.randn(N, D + 3, generator=g).to(torch.float16)
        wide[:, :D] = q.data
        kq = R.QuantizedTable("fp16", wide[:, :D].to(DEV))
        return kq, q
    return to_device(q, DEV), q


# ---------------------------------------------------------------------------------------
# embedding bag forward
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["fp32", "fp16", "int8"])
@pytest.mark.parametrize("mode,psw,strided", [("sum", False, False), ("mean", True, True)])
def test_embedding_bag_fwd_matches_reference(fmt, mode, psw, strided):
    g = gen(11)
    N, D, B = 37, 13, 7
    ktab, rtab = _table(fmt, N, D, g, strided)
    idx, off = torch_bags(B, N, g, 7, empty=B // 2, itype=torch.int32 if strided else torch.int64)
    w = torch.rand(idx.numel(), generator=g) + 0.5 if psw else None
    out = torch.empty(B, D, dtype=torch.float32, device=DEV)
    EB.embedding_bag_fwd(ktab, idx.to(DEV), off.to(DEV), out, None if w is None else w.to(DEV), mode,
                         block_n=4, block_d=8)
    ref = R.embedding_bag(rtab, idx, off, w, mode)
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-5, atol=1e-5)
    assert bool((out[B // 2] == 0).all())  # the empty bag


def test_embedding_bag_tbe_fwd_mixed_tables():
    g = gen(12)
    B = 5
    specs = [("fp32", 31, 11), ("int8", 17, 6), ("fp16", 23, 19)]
    ktabs, rtabs, idx_parts, lens = [], [], [], []
    for fmt, N, D in specs:
        kt, rt = _table(fmt, N, D, g)
        ktabs.append(kt)
        rtabs.append(rt)
        i, o = torch_bags(B, N, g, 5, empty=B // 2)
        idx_parts.append(i)
        lens.append(o[1:] - o[:-1])
    idx = torch.cat(idx_parts)
    off = torch.zeros(len(specs) * B + 1, dtype=torch.int64)
    off[1:] = torch.cumsum(torch.cat(lens), 0)
    w = torch.rand(idx.numel(), generator=g)
    out = EB.embedding_bag_tbe_fwd(ktabs, idx.to(DEV), off.to(DEV), w.to(DEV), "mean", block_n=2, block_d=4)
    ref = R.embedding_bag_tbe(rtabs, idx, off, w, "mean")
    assert out.shape == (B, 11 + 6 + 19)
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------
# embedding bag backward with the fused optimiser
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("optimizer", ["sgd", "rowwise_adagrad"])
@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_embedding_bag_bwd_matches_reference(optimizer, deterministic, mode):
    g = gen(13)
    N, D, B = 19, 11, 7
    w0 = torch.randn(N, D, generator=g)
    idx, off = torch_bags(B, N, g, 6, empty=B // 2)
    idx[:3] = idx[3]  # a row repeated across bags
    grad = torch.randn(B, D, generator=g)
    psw = torch.rand(idx.numel(), generator=g) + 0.5
    st0 = torch.rand(N, generator=g)
    w_ref, st_ref = w0.clone(), st0.clone()
    R.embedding_bag_backward(w_ref, idx, off, grad, psw, mode, optimizer, 0.3, 1e-8, st_ref)
    w, st = w0.clone().to(DEV), st0.clone().to(DEV)
    EB.embedding_bag_bwd(w, idx.to(DEV), off.to(DEV), grad.to(DEV), psw.to(DEV), mode, optimizer, 0.3, 1e-8,
                         st, deterministic=deterministic, block_n=4, block_d=8)
    torch.testing.assert_close(w.cpu(), w_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(st.cpu(), st_ref, rtol=1e-5, atol=1e-6)
    untouched = torch.ones(N, dtype=torch.bool)
    untouched[idx] = False
    assert bool((w.cpu()[untouched] == w0[untouched]).all())


def test_embedding_bag_bwd_deterministic_is_bitwise_repeatable():
    g = gen(14)
    N, D, B = 7, 5, 11
    w0 = torch.randn(N, D, generator=g)
    idx, off = torch_bags(B, N, g, 9, empty=B // 2)
    grad = torch.randn(B, D, generator=g)
    outs = []
    for _ in range(2):
        w = w0.clone().to(DEV)
        EB.embedding_bag_bwd(w, idx.to(DEV), off.to(DEV), grad.to(DEV), deterministic=True, lr=0.1, block_n=2)
        outs.append(w.cpu())
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], w0)


# ---------------------------------------------------------------------------------------
# policy scoring
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt,block_b", [("fp32", 4), ("fp16", 16), ("int8", 4), ("int8", 16)])
def test_policy_topk_matches_reference(fmt, block_b):  # block_b 4: broadcast-reduce, 16: tl.dot
    g = gen(21)
    B, N, D, k = 5, 101, 13, 7
    u = torch.randn(B, D + 2, generator=g)[:, 1:D + 1]  # strided users
    ktab, rtab = _table(fmt, N, D, g)
    bias = torch.randn(N, generator=g)
    exc = torch_csr(B, N, g, 9)
    ids, sc, lz = PT.policy_topk(u.to(DEV), ktab, k, bias.to(DEV), exc, None, 0.7,
                                 block_b=block_b, block_n=16, block_d=8, splits=3)
    ref = R.policy_topk(u, rtab, k, bias, exc, None, 0.7)
    mask = R.eligible_mask(B, N, exc, None)
    s_full = (u @ R.dequantize(rtab).T + bias) / 0.7
    check_topk((ids, sc, lz), ref, s_full, mask, rtol=1e-5, atol=1e-5, lz_atol=1e-5)


def test_policy_topk_candidates_exclusion_padding_and_empty_user():
    g = gen(22)
    B, N, D, k = 4, 53, 7, 8
    u = torch.randn(B, D, generator=g)
    items = torch.randn(N, D, generator=g)
    c_off = torch.tensor([0, 5, 5, 30, 33])  # user 1 has no candidate; user 0 has 5 < k
    c_ids = torch.randint(0, N, (33,), generator=g)
    c_ids[1] = c_ids[0]  # a duplicate candidate counts once
    e_off = torch.tensor([0, 1, 1, 4, 6])
    e_ids = torch.cat([c_ids[:1], c_ids[10:13], c_ids[30:32]])
    ids, sc, lz = PT.policy_topk(u.to(DEV), items.to(DEV), k, None, (e_off, e_ids), (c_off, c_ids), 1.0,
                                 block_b=2, block_n=16, block_d=4, splits=2)
    ref = R.policy_topk(u, items, k, None, (e_off, e_ids), (c_off, c_ids), 1.0)
    mask = R.eligible_mask(B, N, (e_off, e_ids), (c_off, c_ids))
    check_topk((ids, sc, lz), ref, u @ items.T, mask, rtol=1e-5, atol=1e-5, lz_atol=1e-5)
    assert bool((ids[1] == -1).all()) and float(lz[1]) == float("-inf")
    assert bool((ids[0, 3:] == -1).all())  # 5 candidates, 1 duplicate, 1 excluded -> 3


def test_policy_topk_k_above_n_and_ties():
    g = gen(23)
    B, N, D = 3, 11, 5
    u = torch.randn(B, D, generator=g)
    items = torch.randn(N, D, generator=g)
    items[7] = items[2]  # tied scores
    ids, sc, lz = PT.policy_topk(u.to(DEV), items.to(DEV), 13, block_b=2, block_n=16)
    ref = R.policy_topk(u, items, 13)
    check_topk((ids, sc, lz), ref, u @ items.T, torch.ones(B, N, dtype=torch.bool), rtol=1e-5, atol=1e-5, lz_atol=1e-5)
    assert bool((ids[:, 11:] == -1).all())


def test_kernel_hash_uniform_is_bit_identical_to_reference():
    for seed in (0, 2**31 + 7, 2**64 - 1, -5):
        u = PT.hash_uniform(seed, 5, 70, DEV).cpu()
        ref = R.hash_uniform(seed, torch.arange(5)[:, None], torch.arange(70)[None, :])
        assert torch.equal(u, ref), seed
        assert bool((u < 1).all()) and bool((u > 0).all())


def test_hash_in_kernel_matches_reference_hash():
    """Gumbel keys of the kernel = reference.gumbel_noise bit for bit on the perturbation
    order: with all scores 0 the sampled slate is the top-k of the reference noise."""
    B, N, D, k = 3, 47, 4, 47
    u = torch.zeros(B, D)
    items = torch.zeros(N, D)
    for seed in (1, 2**31 + 7, -5):
        ids, sc, pr, lp = PT.policy_sample(u.to(DEV), items.to(DEV), k, seed, block_b=2, block_n=16, splits=2)
        noise = R.gumbel_noise(seed, torch.arange(B)[:, None], torch.arange(N)[None, :])
        order = torch.sort(noise, dim=1, descending=True, stable=True).indices
        assert torch.equal(ids.cpu(), order), seed
        keys, _, _ = PT.policy_stage1(u.to(DEV), items.to(DEV), k, seed=seed, block_b=2, block_n=16, splits=2)
        _, vals = COMMON.merge_topk(keys, k)  # s == 0: the perturbed values are the noise
        # float32 logs of two libraries differ by an ulp: 2 ulp of the inner -log(u) ~ 1
        torch.testing.assert_close(vals.cpu(), torch.gather(noise, 1, order), rtol=3e-7, atol=2.4e-7)


@pytest.mark.parametrize("fmt", ["fp32", "int8"])
def test_policy_sample_matches_reference(fmt):
    g = gen(24)
    B, N, D, k = 6, 89, 9, 5
    u = torch.randn(B, D, generator=g)
    ktab, rtab = _table(fmt, N, D, g)
    bias = torch.randn(N, generator=g)
    exc = torch_csr(B, N, g, 6)
    got = PT.policy_sample(u.to(DEV), ktab, k, 987654321, bias.to(DEV), exc, None, 1.3,
                           block_b=2, block_n=16, block_d=4, splits=2)
    ref = R.policy_sample(u, rtab, k, 987654321, bias, exc, None, 1.3)
    assert torch.equal(got[0].cpu(), ref[0])
    for a, b in zip(got[1:], ref[1:]):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-5)


def test_merge_helpers_roundtrip_keys():
    vals = torch.tensor([[3.5, -0.0, 0.0, -7.25, float("inf"), -1e-30]])
    ids = torch.tensor([[0, 5, 9, 2**31 - 1, 4, 3]])
    bits = vals.view(torch.int32)
    ordered = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(torch.int64)
    keys = ordered * (1 << 32) + (0xFFFFFFFF - ids)
    dec_ids, dec_vals = COMMON.decode_keys(keys)
    assert torch.equal(dec_ids, ids) and torch.equal(dec_vals.view(torch.int32), bits)
    order = torch.argsort(keys[0], descending=True)
    assert torch.equal(order, torch.tensor([4, 0, 2, 1, 5, 3]))  # +0 above -0: bit order


# ---------------------------------------------------------------------------------------
# The kernels compile for the GPUs (no GPU needed: Triton's own ptxas)
# ---------------------------------------------------------------------------------------
_COMPILE_SCRIPT = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from recmeta_sdk.ops._gpu import load_kernel_module

EB = load_kernel_module("embedding_bag")
PT = load_kernel_module("policy_topk")


def compile_(fn, types, constexprs, arch):
    sig = {a: types.get(a, "i32") for a in fn.arg_names}
    for c in constexprs:
        sig[c] = "constexpr"
    k = triton.compile(ASTSource(fn, sig, constexprs), target=GPUTarget("cuda", arch, 32))
    assert len(k.asm["cubin"]) > 0, fn


f32 = {n: "*fp32" for n in ("weight_ptr", "scale_ptr", "rmin_ptr", "psw_ptr", "out_ptr", "state_ptr",
                             "grad_ptr", "target_ptr", "gbuf_ptr")}
i64 = {n: "*i64" for n in ("indices_ptr", "offsets_ptr", "sorted_pos_ptr", "seg_ptr", "uniq_ptr", "bag_ptr",
                            "inverse_ptr")}
base = {**f32, **i64, "lr": "fp32", "eps": "fp32", "scale": "fp32"}
compile_(EB._embedding_bag_fwd_kernel, {**base, "weight_ptr": "*u8", "indices_ptr": "*i32"},
         dict(IS_INT8=True, HAS_PSW=True, MEAN=True, BLOCK_N=16, BLOCK_D=64), 80)
compile_(EB._embedding_bag_bwd_kernel, base, dict(HAS_PSW=True, MEAN=True, ADAGRAD=True, BLOCK_N=8, BLOCK_D=64), 90)
compile_(EB._embedding_bag_bwd_atomic_kernel, base,
         dict(HAS_PSW=True, MEAN=True, ADAGRAD=False, BLOCK_N=16, BLOCK_D=64), 90)
compile_(EB._rowwise_adagrad_apply_kernel, base, dict(BLOCK_D=64), 80)
ptypes = {"u_ptr": "*fp32", "item_ptr": "*fp16", "scale_ptr": "*fp32", "rmin_ptr": "*fp32", "bias_ptr": "*fp32",
          "excl_ptr": "*i64", "cand_ptr": "*i64", "keys_ptr": "*i64", "max_ptr": "*fp32", "sum_ptr": "*fp32",
          "temperature": "fp32"}
common = dict(IS_INT8=False, HAS_BIAS=True, HAS_EXCL=True, HAS_CAND=True, SAMPLE=True,
              BLOCK_N=32, BLOCK_D=32, KB=8)
compile_(PT._policy_topk_fwd_kernel, ptypes, dict(common, USE_DOT=True, BLOCK_B=16), 90)
compile_(PT._policy_topk_fwd_kernel, {**ptypes, "item_ptr": "*u8"}, dict(common, IS_INT8=True, USE_DOT=False,
                                                                          BLOCK_B=2), 80)
compile_(PT._hash_uniform_fwd_kernel, {"out_ptr": "*fp32"}, dict(BLOCK_B=4, BLOCK_N=32), 90)
print("compiled 7 kernels")
"""


def test_triton_kernels_compile_for_sm80_and_sm90():
    """Lower every kernel through Triton's full pipeline to a cubin for sm_80 / sm_90 (Triton's
    bundled ptxas; no GPU needed), so a kernel that only the interpreter accepts fails here.
    Runs in a subprocess: the interpreter patches triton.language in this one."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    r = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "compiled 7 kernels" in r.stdout


# ---------------------------------------------------------------------------------------
# non-finite item rows through the GPU dispatch (recmeta_sdk.ops._gpu), as the compiled core
# ---------------------------------------------------------------------------------------
def _same_outcome(run_gpu, run_cpp):
    """Both raise ValueError with the same message, or both return the same results."""
    return same_outcome(run_gpu, run_cpp, atol=1e-5)


def _policy_case(case):
    """(user_states, items (tensor or QuantizedTable), bias, exclude, candidates, expected error or None)."""
    g = gen(31)
    B, N, D = 3, 23, 5
    u = torch.randn(B, D, generator=g)
    items = torch.randn(N, D, generator=g)
    bias = exc = cand = None

    def every(r):  # row r excluded for every user
        return torch.arange(B + 1), torch.full((B,), r)

    if case == "nan row":
        items[5, 2] = float("nan")
        err = "row 5, column 2"
    elif case == "inf row excluded for every user":  # excluded rows are read too (no candidates)
        items[3, 0] = float("inf")
        exc = every(3)
        err = "row 3, column 0"
    elif case == "int8 NaN scale":
        items = R.quantize(items, "int8")
        items.row_scale[4] = float("nan")
        err = "row 4"
    elif case == "float32 overflow":
        items[6] = 3e38
        u = u.abs() + 1.0
        err = "overflow float32 at item row 6"
    elif case == "fp16 NaN row among the candidates":
        items = R.quantize(items, "fp16")
        items.data[7, 1] = float("nan")
        cand = (torch.tensor([0, 3, 4, 6]), torch.tensor([1, 7, 9, 2, 7, 11]))
        err = "row 7, column 1"
    elif case == "NaN row not a candidate":  # not read: no error
        items[8, 0] = float("nan")
        cand = (torch.tensor([0, 2, 4, 5]), torch.tensor([1, 2, 3, 4, 5]))
        err = None
    elif case == "-inf value masked by a -inf bias":
        items[2, 0] = float("-inf")
        u = u.abs() + 0.1
        bias = torch.randn(N, generator=g)
        bias[2] = float("-inf")
        err = None
    else:
        raise AssertionError(case)
    return u, items, bias, exc, cand, err


_POLICY_CASES = ["nan row", "inf row excluded for every user", "int8 NaN scale", "float32 overflow",
                 "fp16 NaN row among the candidates", "NaN row not a candidate", "-inf value masked by a -inf bias"]


def _gpu_backends():
    """"triton" (the interpreter without a GPU), and "cuda" with a GPU and the CUDA extension."""
    from recmeta_sdk.ops import backends

    cuda_ok = DEV == "cuda" and backends.available("cuda")
    return ["triton", pytest.param("cuda", marks=pytest.mark.skipif(
        not cuda_ok, reason="needs a GPU and the CUDA extension (recmeta_sdk._core_cuda)"))]


@pytest.mark.parametrize("backend", _gpu_backends())
@pytest.mark.parametrize("sample", [False, True], ids=["topk", "sample"])
@pytest.mark.parametrize("case", _POLICY_CASES)
def test_gpu_policy_non_finite_rows_raise_as_cpp(case, sample, backend):
    """The GPU dispatch (recmeta_sdk.ops._gpu._policy_run: Triton here, CUDA too with a GPU) raises the compiled core's ValueError naming the row, or returns its results.
    Before, a NaN score made the log-normaliser -inf ("no eligible item"), which the screen
    accepted, and the scores of excluded rows were never looked at."""
    from recmeta_sdk import ops
    from recmeta_sdk.ops import _gpu
    from recmeta_sdk.ops._common import check_csr

    u, items, bias, exc, cand, err = _policy_case(case)
    B, N = u.shape[0], items.shape[0]
    k, seed = 4, 12345
    ke, kc = check_csr(exc, "exclude", B, N), check_csr(cand, "candidates", B, N)
    kt = to_device(items, DEV)
    kb = None if bias is None else bias.to(DEV)

    def gpu():
        return _gpu._policy_run(backend, u.to(DEV), kt, k, seed if sample else None, kb, ke, kc, 1.0)

    def cpp():
        kw = {"bias": bias, "exclude": exc, "candidates": cand, "backend": "cpp"}
        return ops.policy_sample(u, items, k, seed=seed, **kw) if sample else ops.policy_topk(u, items, k, **kw)

    msg = _same_outcome(gpu, cpp)
    if err is None:
        assert msg is None
    else:
        assert msg is not None and err in msg, msg


@pytest.mark.parametrize("backend", _gpu_backends())
@pytest.mark.parametrize("case", ["fp32 NaN row", "int8 NaN row_min", "second table inf row, mean",
                                  "NaN row not read"])
def test_gpu_embedding_bag_non_finite_rows_raise_as_cpp(case, backend):
    """recmeta_sdk.ops._gpu._embedding_bag_run (the Triton and CUDA forwards) raises the compiled
    core's ValueError naming the table, the row and its position; before it returned NaN."""
    from recmeta_sdk import ops
    from recmeta_sdk.ops import _gpu

    g = gen(32)
    w = torch.randn(17, 6, generator=g)
    idx = torch.tensor([3, 9, 9, 0, 16, 5, 3])
    off = torch.tensor([0, 2, 2, 5, 7])
    tabs, mode, err = [w], "sum", None
    if case == "fp32 NaN row":
        w[9, 4] = float("nan")
        err = "weight: row 9 holds a non-finite value (nan at column 4), read at position 1 of indices"
    elif case == "int8 NaN row_min":
        q = R.quantize(w, "int8")
        q.row_min[16] = float("nan")
        tabs = [q]
        err = "row 16 has a non-finite row_min"
    elif case == "second table inf row, mean":
        w2 = torch.randn(11, 3, generator=g)
        w2[2, 1] = float("inf")
        tabs, mode = [w, w2], "mean"
        idx = torch.cat([idx[:5], torch.tensor([2, 7, 2])])
        off = torch.tensor([0, 2, 2, 5, 5, 6, 8])  # 3 bags per table
        err = "weight[1]: row 2 holds a non-finite value (inf at column 1), read at position 5 of indices"
    elif case == "NaN row not read":
        w[12, 0] = float("nan")
    else:
        raise AssertionError(case)
    dev_tabs = [t.to(DEV) if isinstance(t, torch.Tensor) else R.QuantizedTable(
        t.dtype, t.data.to(DEV), t.row_scale.to(DEV), t.row_min.to(DEV)) for t in tabs]
    msg = _same_outcome(
        lambda: (_gpu._embedding_bag_run(backend, dev_tabs, idx.to(DEV), off.to(DEV), None, mode),),
        lambda: (ops.embedding_bag(tabs if len(tabs) > 1 else tabs[0], idx, off, mode=mode, backend="cpp"),))
    if err is None:
        assert msg is None
    else:
        assert msg is not None and err in msg, msg
