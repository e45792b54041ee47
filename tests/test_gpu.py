"""GPU path: dispatch, validation and parity with the CPU backend.

Tests marked ``gpu`` need an NVIDIA GPU and are skipped without one (tests/conftest.py);
they run each available GPU backend ("triton", "cuda") against the CPU backend of
:mod:`recmeta_sdk.ops`. The unmarked tests run everywhere: the GPU modules import and
reject bad input without CUDA or Triton.
"""
import sys

import pytest
import torch

from recmeta_sdk import ops
from recmeta_sdk.ops import _gpu
from recmeta_sdk.ops import backends
from recmeta_sdk.ops import reference as R

from _helpers import check_topk, gen, to_device, torch_bags, torch_csr

HAS_GPU = torch.cuda.is_available()


def _gpu_backends():
    names = []
    if HAS_GPU:
        for name in ("triton", "cuda"):
            if backends.available(name):
                names.append(name)
    return names or ["none"]


def _need(backend):
    if backend == "none":
        pytest.skip("no GPU backend available")


# ---------------------------------------------------------------------------------------
# Everywhere (no GPU needed)
# ---------------------------------------------------------------------------------------
def test_kernels_package_imports_without_triton_or_cuda_as_recmeta_sdk_kernels():
    H = _gpu.load_kernel_module("_heuristics")
    C = _gpu.load_kernel_module("_common")
    assert H.__name__ == "recmeta_sdk.kernels._heuristics"
    assert C.__name__ == "recmeta_sdk.kernels._common"
    assert "kernels" not in sys.modules  # never a top-level package named kernels
    cfg = H.policy_config(B=3, N=1000, D=70, k=10)
    assert cfg.KB == 16 and cfg.BLOCK_N >= cfg.KB and cfg.splits * cfg.items_per_split >= 1000
    with pytest.raises(ValueError, match="k=300"):
        H.policy_config(B=3, N=1000, D=70, k=300)


def test_seed_key_matches_reference_hash():
    C = _gpu.load_kernel_module("_common")
    rows = torch.tensor([0, 1, 7, 1000])[:, None]
    items = torch.tensor([0, 5, 2**31 - 1])[None, :]
    for seed in (0, 3, 2**40 + 11, -1):
        key, hm = C.seed_key(seed), C.item_hi_mix()
        h = torch.zeros(4, 3, dtype=torch.int64)
        for i in range(4):
            for j in range(3):
                x = C.mix32(key ^ C.mix32(int(rows[i, 0]) + 0x85EBCA6B))
                x = C.mix32(x ^ int(items[0, j]))
                h[i, j] = C.mix32(x ^ hm)
        u = (((h >> 9).to(torch.float64) + 0.5) * 2.0 ** -23).to(torch.float32)
        assert torch.equal(u, R.hash_uniform(seed, rows, items))


def test_gpu_entry_points_reject_cpu_tensors_and_bad_input():
    g = gen(1)
    w = torch.randn(11, 4, generator=g)
    idx, off = torch_bags(5, 11, g, 9, empty=5 // 3)
    assert not _gpu.is_cuda_input(w) and not _gpu.is_cuda_input([w, R.quantize(w, "int8")])
    with pytest.raises(ValueError, match="CUDA"):
        _gpu.gpu_embedding_bag(w, idx, off)
    with pytest.raises(ValueError, match="mode"):
        _gpu.gpu_embedding_bag(w, idx, off, mode="max")
    with pytest.raises(ValueError, match="CUDA"):
        _gpu.gpu_policy_topk(torch.randn(2, 4), w, 3)
    with pytest.raises(TypeError, match="seed"):
        _gpu.gpu_policy_sample(torch.randn(2, 4), w, 3, seed=1.5)
    with pytest.raises(ValueError, match="optimizer"):
        _gpu.gpu_embedding_bag_backward(w, idx, off, torch.randn(5, 4), optimizer="adam")


def test_cuda_extension_checks_scalar_arguments_before_launching():
    """The _core_cuda entry points reject bad sizes with ValueError (no GPU touched)."""
    try:
        from recmeta_sdk import _core_cuda as ext
    except ImportError:
        pytest.skip("recmeta_sdk._core_cuda was not built (RECMETA_ENABLE_CUDA off or no nvcc)")
    with pytest.raises(ValueError, match="kb must be a power of two"):
        ext.policy_topk_stage1(0, 4, 2, 4, 0, 0, 4, 0, 0, 10, 0, 0, 0, 0, 0, 1.0, False, 0, 0,
                               8, 8, 8, 1, 10, 3, 0)
    with pytest.raises(ValueError, match="splits do not cover"):
        ext.policy_topk_stage1(0, 4, 2, 4, 0, 0, 4, 0, 0, 10, 0, 0, 0, 0, 0, 1.0, False, 0, 0,
                               8, 8, 8, 2, 4, 4, 0)
    with pytest.raises(ValueError, match="stride"):
        # row_stride 2 < dim 4
        ext.embedding_bag_fwd(0, 8, 0, 0, 10, 4, 2, 8, True, 3, 8, True, 3, 0, False, 8, 4, 0)
    with pytest.raises(ValueError, match="hash_uniform: bad shape"):
        ext.hash_uniform(0, -1, 5, 0, 0, 0)
    with pytest.raises(ValueError, match="table kind"):
        ext.embedding_bag_fwd(5, 8, 0, 0, 10, 4, 4, 8, True, 3, 8, True, 3, 0, False, 8, 4, 0)


def test_embedding_bag_op_has_cuda_kernels_for_training_on_gpu():
    """The custom op and its gradient op are registered for CUDA (a model on the GPU trains
    through ``recmeta::embedding_bag_forward`` like on the CPU)."""
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    assert has("recmeta::embedding_bag_forward", "CUDA")
    assert has("recmeta::embedding_bag_grad", "CUDA")


def test_cuda_op_kernel_rebuilds_tables_from_parts():
    """The op's CUDA kernel turns (data, row_scale, row_min) parts back into tables and runs
    the chosen backend; checked here on CPU tensors with the torch backend."""
    from recmeta_sdk.ops import _embedding_bag as ebo

    g = gen(11)
    B = 23
    tabs = [torch.randn(41, 5, generator=g), R.quantize(torch.randn(37, 3, generator=g), "int8"),
            R.quantize(torch.randn(29, 4, generator=g), "fp16")]
    idx_parts, lens = [], []
    for tab in tabs:
        ll = torch.randint(0, 6, (B,), generator=g)
        lens.append(ll)
        idx_parts.append(torch.randint(0, tab.shape[0], (int(ll.sum()),), generator=g))
    off = torch.zeros(3 * B + 1, dtype=torch.int64)
    off[1:] = torch.cumsum(torch.cat(lens), 0)
    idx = torch.cat(idx_parts)
    psw = torch.rand(idx.numel(), generator=g)
    parts = [ebo._table_parts(t, "w") for t in tabs]
    token = _gpu._OP_BACKEND.set("torch")
    try:
        got = _gpu._forward_op_cuda([p[0] for p in parts], [p[1] for p in parts], [p[2] for p in parts],
                                    idx, off, psw, "mean")
    finally:
        _gpu._OP_BACKEND.reset(token)
    want = R.embedding_bag_tbe(tabs, idx, off, psw, "mean")
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------
# On a GPU: parity with the CPU backend
# ---------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("backend", _gpu_backends())
@pytest.mark.parametrize("fmt", ["fp32", "fp16", "int8"])
@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_gpu_embedding_bag_matches_cpu(backend, fmt, mode):
    _need(backend)
    g = gen(2)
    N, D, B = 1009, 67, 131
    w = torch.randn(N, D, generator=g)
    tab = w if fmt == "fp32" else R.quantize(w, fmt)
    idx, off = torch_bags(B, N, g, 9, empty=B // 3)
    psw = torch.rand(idx.numel(), generator=g)
    cpu = ops.embedding_bag(tab, idx, off, per_sample_weights=psw, mode=mode)
    got = _gpu.gpu_embedding_bag(to_device(tab, "cuda"), idx.cuda(), off.cuda().to(torch.int32), psw.cuda(), mode,
                                 backend=backend)
    torch.testing.assert_close(got.cpu(), cpu, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", _gpu_backends())
def test_gpu_tbe_matches_cpu(backend):
    _need(backend)
    g = gen(3)
    B = 29
    tabs = [torch.randn(101, 16, generator=g), R.quantize(torch.randn(53, 33, generator=g), "int8"),
            R.quantize(torch.randn(7, 64, generator=g), "fp16")]
    parts, lens = [], []
    for t in tabs:
        i, o = torch_bags(B, t.shape[0], g, 9, empty=B // 3)
        parts.append(i)
        lens.append(o[1:] - o[:-1])
    idx = torch.cat(parts)
    off = torch.zeros(3 * B + 1, dtype=torch.int64)
    off[1:] = torch.cumsum(torch.cat(lens), 0)
    cpu = ops.embedding_bag(tabs, idx, off, mode="mean")
    got = _gpu.gpu_embedding_bag([to_device(t, "cuda") for t in tabs], idx.cuda(), off.cuda(), mode="mean",
                                 backend=backend)
    torch.testing.assert_close(got.cpu(), cpu, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", _gpu_backends())
@pytest.mark.parametrize("optimizer", ["sgd", "rowwise_adagrad"])
@pytest.mark.parametrize("deterministic", [True, False])
def test_gpu_backward_matches_cpu(backend, optimizer, deterministic):
    _need(backend)
    g = gen(4)
    N, D, B = 211, 37, 97
    w0 = torch.randn(N, D, generator=g)
    st0 = torch.rand(N, generator=g)
    idx, off = torch_bags(B, N, g, 13, empty=B // 3)
    grad = torch.randn(B, D, generator=g)
    psw = torch.rand(idx.numel(), generator=g)
    w_cpu, st_cpu = w0.clone(), st0.clone()
    ops.embedding_bag_backward(w_cpu, idx, off, grad, per_sample_weights=psw, mode="mean",
                               optimizer=optimizer, lr=0.05, state=st_cpu)
    w, st = w0.cuda(), st0.cuda()
    _gpu.gpu_embedding_bag_backward(w, idx.cuda(), off.cuda(), grad.cuda(), psw.cuda(), "mean", optimizer, 0.05,
                                    1e-8, st, backend=backend, deterministic=deterministic)
    torch.testing.assert_close(w.cpu(), w_cpu, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(st.cpu(), st_cpu, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", _gpu_backends())
def test_gpu_deterministic_backward_is_bitwise_repeatable(backend):
    _need(backend)
    g = gen(5)
    N, D, B = 13, 64, 4099  # few rows, many occurrences each: atomics would reorder sums
    w0 = torch.randn(N, D, generator=g).cuda()
    st0 = torch.rand(N, generator=g).cuda()
    idx, off = torch_bags(B, N, g, 17, empty=B // 3)
    grad = torch.randn(B, D, generator=g).cuda()
    results = []
    for _ in range(3):
        w, st = w0.clone(), st0.clone()
        _gpu.gpu_embedding_bag_backward(w, idx.cuda(), off.cuda(), grad, None, "sum", "rowwise_adagrad", 0.1,
                                        1e-8, st, backend=backend, deterministic=True)
        results.append((w.cpu(), st.cpu()))
    for w, st in results[1:]:
        assert torch.equal(w, results[0][0]) and torch.equal(st, results[0][1])


@pytest.mark.gpu
@pytest.mark.parametrize("backend", _gpu_backends())
@pytest.mark.parametrize("fmt,B", [("fp32", 1), ("fp16", 7), ("int8", 67), ("fp16", 67)])
def test_gpu_policy_topk_matches_cpu(backend, fmt, B):
    _need(backend)
    g = gen(6)
    N, D, k = 10007, 61, 13
    u = torch.randn(B, D, generator=g)
    w = torch.randn(N, D, generator=g)
    tab = w if fmt == "fp32" else R.quantize(w, fmt)
    bias = torch.randn(N, generator=g)
    exc = torch_csr(B, N, g, 40)
    cpu = ops.policy_topk(u, tab, k, bias=bias, exclude=exc, temperature=0.9)
    got = _gpu.gpu_policy_topk(u.cuda(), to_device(tab, "cuda"), k, bias.cuda(), (exc[0].cuda(), exc[1].cuda()), None,
                               0.9, backend=backend)
    s_full = (u @ R.dequantize(tab).T + bias) / 0.9
    check_topk(got, cpu, s_full, R.eligible_mask(B, N, exc, None), rtol=1e-4, atol=1e-4, lz_atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", _gpu_backends())
def test_gpu_policy_topk_candidates_matches_cpu(backend):
    _need(backend)
    g = gen(7)
    B, N, D, k = 9, 3001, 32, 10
    u = torch.randn(B, D, generator=g)
    w = torch.randn(N, D, generator=g)
    cand = torch_csr(B, N, g, 30)
    exc = torch_csr(B, N, g, 5)
    cpu = ops.policy_topk(u, w, k, exclude=exc, candidates=cand)
    got = _gpu.gpu_policy_topk(u.cuda(), w.cuda(), k, None, exc, cand, backend=backend)
    check_topk(got, cpu, u @ w.T, R.eligible_mask(B, N, exc, cand), rtol=1e-4, atol=1e-4, lz_atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", _gpu_backends())
@pytest.mark.parametrize("fmt", ["fp32", "int8"])
def test_gpu_policy_sample_draws_the_cpu_slates(backend, fmt):
    _need(backend)
    g = gen(8)
    B, N, D, k = 33, 5003, 48, 8
    u = torch.randn(B, D, generator=g) * 0.3
    w = torch.randn(N, D, generator=g)
    tab = w if fmt == "fp32" else R.quantize(w, fmt)
    exc = torch_csr(B, N, g, 20)
    for seed in (0, 123456789, 2**63 + 5):
        cpu = ops.policy_sample(u, tab, k, seed=seed, exclude=exc)
        got = _gpu.gpu_policy_sample(u.cuda(), to_device(tab, "cuda"), k, seed, None, exc, backend=backend)
        # Same uniforms bit for bit; float32 summation order may only swap items whose
        # perturbed scores tie within rounding.
        gids, cids = got[0].cpu(), cpu[0]
        diff = gids != cids
        if bool(diff.any()):
            s_full = u @ R.dequantize(tab).T
            pert = s_full + R.gumbel_noise(seed, torch.arange(B)[:, None], torch.arange(N)[None, :])
            rows = torch.nonzero(diff)[:, 0]
            a_, b_ = pert[rows, gids[diff]], pert[rows, cids[diff]]
            torch.testing.assert_close(a_, b_, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[2].cpu().sort(dim=1).values, cpu[2].sort(dim=1).values,
                                   rtol=1e-3, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", _gpu_backends())
def test_gpu_hash_uniform_is_bit_identical_to_reference(backend):
    _need(backend)
    C = _gpu.load_kernel_module("_common")
    B, N = 37, 1031
    for seed in (0, 99, 2**64 - 1):
        out = torch.empty(B, N, device="cuda")
        if backend == "cuda":
            from recmeta_sdk import _core_cuda

            _core_cuda.hash_uniform(out.data_ptr(), B, N, C.seed_key(seed), C.item_hi_mix(),
                                    int(torch.cuda.current_stream().cuda_stream))
        else:
            out = _gpu.load_kernel_module("policy_topk").hash_uniform(seed, B, N, "cuda")
        ref = R.hash_uniform(seed, torch.arange(B)[:, None], torch.arange(N)[None, :])
        assert torch.equal(out.cpu(), ref), seed


@pytest.mark.gpu
@pytest.mark.parametrize("backend", _gpu_backends())
def test_gpu_out_of_range_ids_raise_on_host(backend):
    _need(backend)
    w = torch.randn(10, 4, device="cuda")
    idx = torch.tensor([1, 10], device="cuda")
    off = torch.tensor([0, 2], device="cuda")
    with pytest.raises(ValueError, match="out of range"):
        _gpu.gpu_embedding_bag(w, idx, off, backend=backend)
    with pytest.raises(ValueError, match="out of range"):
        _gpu.gpu_embedding_bag_backward(w, idx, off, torch.randn(1, 4, device="cuda"), backend=backend)
    with pytest.raises(ValueError, match="offsets"):
        _gpu.gpu_embedding_bag(w, torch.tensor([1, 2], device="cuda"), torch.tensor([0, 3], device="cuda"),
                               backend=backend)
    u = torch.randn(2, 4, device="cuda")
    with pytest.raises(ValueError, match="out of range"):
        _gpu.gpu_policy_topk(u, w, 3, exclude=(torch.tensor([0, 1, 1]), torch.tensor([-1])), backend=backend)
    with pytest.raises(ValueError, match="non-finite"):
        _gpu.gpu_policy_topk(u * float("nan"), w, 3, backend=backend)
    with pytest.raises(ValueError, match="on cpu"):
        _gpu.gpu_policy_topk(u, w.cpu(), 3, backend=backend)
    torch.cuda.synchronize()  # the context is healthy: nothing reached a kernel


@pytest.mark.gpu
@pytest.mark.parametrize("backend", _gpu_backends())
def test_gpu_forward_is_differentiable_like_the_cpu(backend):
    """Training on the GPU: gradients of the tables and per-sample weights through the op
    equal the CPU op's."""
    _need(backend)
    g = gen(12)
    N1, N2, D1, D2, B = 211, 97, 13, 8, 57
    w1, w2 = torch.randn(N1, D1, generator=g), torch.randn(N2, D2, generator=g)
    i1, o1 = torch_bags(B, N1, g, 9, empty=B // 3)
    i2, o2 = torch_bags(B, N2, g, 9, empty=B // 3)
    idx = torch.cat([i1, i2])
    off = torch.cat([o1, o2[1:] + o1[-1]])
    psw = torch.rand(idx.numel(), generator=g)
    up = torch.randn(B, D1 + D2, generator=g)

    def run(dev, be):
        a = w1.to(dev).requires_grad_()
        b = w2.to(dev).requires_grad_()
        p = psw.to(dev).requires_grad_()
        out = ops.embedding_bag([a, b], idx.to(dev), off.to(dev), per_sample_weights=p, mode="mean", backend=be)
        (out * up.to(dev)).sum().backward()
        return out.detach().cpu(), a.grad.cpu(), b.grad.cpu(), p.grad.cpu()

    for want, got in zip(run("cpu", "cpp"), run("cuda", backend)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
