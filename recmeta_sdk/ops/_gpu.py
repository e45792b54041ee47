"""GPU launchers: the ops on CUDA tensors, run by the Triton kernels or the CUDA extension.

CUDA tensors go to the Triton kernels (``recmeta_sdk.kernels``) or the CUDA kernels
(``recmeta_sdk._core_cuda``), both loaded by :mod:`recmeta_sdk.ops._native`; which one is
decided by :mod:`recmeta_sdk.ops.backends`.

Every entry point validates its inputs on the host with the same checks as the CPU path
(:mod:`recmeta_sdk.ops._common`) before any kernel runs, so an out-of-range id or a bad
offset raises ``ValueError`` here, never a device-side assert or an illegal memory
access. Nothing here imports Triton or the CUDA extension at import time: this module
imports fine on a machine without either.

Entry points (all take torch tensors on one CUDA device; see :mod:`recmeta_sdk.ops` for
the arguments):

* :func:`gpu_embedding_bag`, :func:`gpu_embedding_bag_backward`
* :func:`gpu_policy_topk`, :func:`gpu_policy_sample`
* :func:`is_cuda_input`: whether an op's argument lives on a CUDA device (the dispatch test)
"""
from __future__ import annotations

import contextvars
import logging
from typing import Optional

import torch

from . import backends
from . import reference
from ._common import (
    _check_bias_finite, _nonfinite_row, _parts_to_table, _table_parts, as_seed, as_table, as_tensor, check_bags,
    check_float, check_policy_args, check_update_args, check_update_inputs, table_dtype,
)
from ._native import core_cuda, load_kernel_module
from .reference import QuantizedTable

__all__ = [
    "is_cuda_input",
    "load_kernel_module",
    "gpu_embedding_bag",
    "gpu_embedding_bag_backward",
    "gpu_policy_topk",
    "gpu_policy_sample",
]

log = logging.getLogger("recmeta")
_KIND_CODE = {"fp32": 0, "fp16": 1, "int8": 2}


# ---------------------------------------------------------------------------------------
# Loading the kernels
# ---------------------------------------------------------------------------------------
def _cuda_ext():
    return core_cuda()


# ---------------------------------------------------------------------------------------
# Validation shared by the entry points
# ---------------------------------------------------------------------------------------
def is_cuda_input(x) -> bool:
    """True when ``x`` (a tensor, a QuantizedTable, or a list of tables) lives on CUDA."""
    if isinstance(x, (list, tuple)):
        return any(is_cuda_input(t) for t in x)
    if isinstance(x, QuantizedTable):
        return isinstance(x.data, torch.Tensor) and x.data.is_cuda
    return isinstance(x, torch.Tensor) and x.is_cuda


def _table_tensors(tab):
    if isinstance(tab, QuantizedTable):
        return [t for t in (tab.data, tab.row_scale, tab.row_min) if t is not None]
    return [tab]


def _check_device(device: torch.device, named) -> None:
    for name, t in named:
        if t is None:
            continue
        for x in (_table_tensors(t) if isinstance(t, QuantizedTable) else [t]):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{name}: expected a torch tensor on {device}, got {type(x).__name__}")
            if x.device != device:
                raise ValueError(f"{name}: on {x.device}, but the inputs are on {device}")


def _check_quantized(tab, name: str) -> None:
    if isinstance(tab, QuantizedTable):
        n, d = tab.shape
        if tab.dtype == "int8":
            if tab.data.dtype != torch.uint8:
                raise TypeError(f"{name}: int8 table codes must be uint8, got {tab.data.dtype}")
            check_float(tab.row_scale, f"{name} row_scale", (n,))
            check_float(tab.row_min, f"{name} row_min", (n,))
        elif tab.dtype == "fp16":
            if tab.data.dtype != torch.float16:
                raise TypeError(f"{name}: fp16 table data must be float16, got {tab.data.dtype}")
        else:
            raise ValueError(f"{name}: unknown table dtype {tab.dtype!r}")


def _resolve(op: str, tables, backend: Optional[str]) -> str:
    """The backend of ``op`` on CUDA tensors, from the backend table
    (:func:`recmeta_sdk.ops.backends.select`; a backend that cannot run CUDA tensors is refused
    there, naming the op, the device, the dtype and the backends that exist)."""
    return backends.select(op, "cuda", table_dtype(tables), backend)


def _stream(device) -> int:
    return int(torch.cuda.current_stream(device).cuda_stream)


def _tab_cpu(tab):
    if isinstance(tab, QuantizedTable):
        return QuantizedTable(tab.dtype, *(None if t is None else t.cpu()
                                           for t in (tab.data, tab.row_scale, tab.row_min)))
    return tab.cpu()


# ---------------------------------------------------------------------------------------
# Embedding bag
# ---------------------------------------------------------------------------------------
def gpu_embedding_bag(weight, indices, offsets, per_sample_weights=None, mode: str = "sum",
                      backend: Optional[str] = None) -> torch.Tensor:
    """Pooled lookup (one table or a TBE list of tables) of CUDA tensors → (B, sum d) float32."""
    if mode not in ("sum", "mean"):
        raise ValueError(f"embedding_bag: mode must be 'sum' or 'mean', got {mode!r}")
    idx, _ = as_tensor(indices, "indices")
    off, _ = as_tensor(offsets, "offsets")
    tables = list(weight) if isinstance(weight, (list, tuple)) else [weight]
    if not tables:
        raise ValueError("embedding_bag: the list of tables is empty")
    tabs = [as_table(w, f"weight[{t}]")[0] for t, w in enumerate(tables)]
    for t, tab in enumerate(tabs):
        _check_quantized(tab, f"weight[{t}]")
    dev = idx.device
    if dev.type != "cuda":
        raise ValueError(f"gpu_embedding_bag: indices must be a CUDA tensor, got device {dev}")
    psw = None
    if per_sample_weights is not None:
        psw, _ = as_tensor(per_sample_weights, "per_sample_weights")
    _check_device(dev, [("offsets", off), ("per_sample_weights", psw)]
                  + [(f"weight[{t}]", tab) for t, tab in enumerate(tabs)])
    off = check_bags(tabs, idx, off, psw)
    idx = idx.contiguous()
    if psw is not None:
        if psw.dtype != torch.float32:
            raise TypeError(f"per_sample_weights: expected float32, got {psw.dtype}")
        psw = psw.contiguous()
    name = _resolve("embedding_bag", tabs, backend)
    if torch.compiler.is_compiling() or _needs_graph(tabs, psw):
        return _forward_through_op(name, tabs, idx, off, psw, mode)
    return _embedding_bag_run(name, tabs, idx, off, psw, mode)


# The backend a differentiable GPU forward runs on: the custom op
# ``recmeta::embedding_bag_forward`` has no backend argument, so :func:`gpu_embedding_bag`
# passes its ``backend=`` choice to the op's CUDA kernel through this context variable.
_OP_BACKEND: contextvars.ContextVar = contextvars.ContextVar("recmeta_gpu_op_backend", default=None)


def _needs_graph(tabs, psw) -> bool:
    """Whether the forward must record an autograd graph (a float32 table or the
    per-sample weights require a gradient and grad mode is on)."""
    if not torch.is_grad_enabled():
        return False
    return any(isinstance(t, torch.Tensor) and t.requires_grad for t in tabs) or (
        psw is not None and psw.requires_grad)


def _forward_through_op(name, tabs, idx, off, psw, mode):
    """The differentiable forward: ``recmeta::embedding_bag_forward`` (whose CUDA kernel is
    :func:`_forward_op_cuda`, gradient ``recmeta::embedding_bag_grad``) on validated inputs."""
    parts = [_table_parts(t, f"weight[{i}]") for i, t in enumerate(tabs)]
    token = _OP_BACKEND.set(name)
    try:
        # through the op registry: the op module (above this one) registered it before calling here
        return torch.ops.recmeta.embedding_bag_forward([p[0] for p in parts], [p[1] for p in parts],
                                                       [p[2] for p in parts], idx, off, psw, mode)
    finally:
        _OP_BACKEND.reset(token)


def _forward_op_cuda(weights, row_scales, row_mins, indices, offsets, per_sample_weights, mode):
    """CUDA kernel of the custom op ``recmeta::embedding_bag_forward`` (registered by
    :mod:`recmeta_sdk.ops._embedding_bag`). Its inputs were validated by
    :func:`gpu_embedding_bag`; a direct call of the op is checked here again."""
    tabs = [_parts_to_table(w, s, m) for w, s, m in zip(weights, row_scales, row_mins)]
    name = _OP_BACKEND.get()
    if name is None:  # called directly (e.g. from a compiled graph): validate, default backend
        with torch.no_grad():
            return gpu_embedding_bag(tabs, indices, offsets, per_sample_weights, mode)
    return _embedding_bag_run(name, tabs, indices, offsets, per_sample_weights, mode)


def _embedding_bag_run(name, tabs, idx, off, psw, mode):
    """The forward on validated inputs (also what bench/gpu_check.py times).

    A table row read that holds NaN / inf (int8: a non-finite row_scale / row_min) raises
    the compiled core's ValueError naming the table, the row and its position: such a row
    makes its bag's output non-finite (sum and mean; per-sample weights are finite), so one
    ``isfinite`` reduction over the (B, sum d) output and one host sync per call find it,
    and only then are the rows read looked at (:func:`recmeta_sdk.ops._common._nonfinite_row`).
    A finite output whose sum overflows float32 is returned, as on the CPU."""
    out = _embedding_bag_kernels(name, tabs, idx, off, psw, mode)
    if out.numel() and not bool(torch.isfinite(out).all()):
        _nonfinite_row(tabs, idx, off)
    return out


def _embedding_bag_kernels(name, tabs, idx, off, psw, mode):
    dev = idx.device
    T = len(tabs)
    B = (off.numel() - 1) // T
    if name == "torch":
        out = reference.embedding_bag_tbe([_tab_cpu(t) for t in tabs], idx.cpu(), off.cpu(),
                                          None if psw is None else psw.cpu(), mode)
        return out.to(dev)
    if name == "triton":
        EB = load_kernel_module("embedding_bag")
        return EB.embedding_bag_tbe_fwd(tabs, idx, off, psw, mode)
    ext = _cuda_ext()
    dims = [int(t.shape[1]) for t in tabs]
    out = torch.empty(B, sum(dims), dtype=torch.float32, device=dev)
    col = 0
    stream = _stream(dev)
    for t, tab in enumerate(tabs):
        data, scale, rmin, kind = _cuda_table(tab)
        o = off[t * B:(t + 1) * B + 1]
        ext.embedding_bag_fwd(kind, data.data_ptr(), _ptr(scale), _ptr(rmin), int(data.shape[0]), dims[t],
                              int(data.stride(0)), idx.data_ptr(), idx.dtype == torch.int64, idx.numel(),
                              o.data_ptr(), o.dtype == torch.int64, B,
                              0 if psw is None else psw.data_ptr(), mode == "mean",
                              out[:, col:].data_ptr(), int(out.stride(0)), stream)
        col += dims[t]
    return out


def _cuda_table(tab):
    """(data with contiguous columns, row_scale, row_min, kind code) for the CUDA kernels;
    the caller keeps the returned tensors alive while their pointers are in use."""
    if isinstance(tab, QuantizedTable):
        data = tab.data if tab.data.stride(1) == 1 else tab.data.contiguous()
        if tab.dtype == "int8":
            return data, tab.row_scale.contiguous(), tab.row_min.contiguous(), _KIND_CODE["int8"]
        return data, None, None, _KIND_CODE["fp16"]
    data = tab if tab.stride(1) == 1 else tab.contiguous()
    return data, None, None, _KIND_CODE["fp32"]


def _ptr(t) -> int:
    return 0 if t is None else int(t.data_ptr())


def gpu_embedding_bag_backward(weight, indices, offsets, grad_output, per_sample_weights=None,
                               mode: str = "sum", optimizer: str = "sgd", lr: float = 0.01,
                               eps: float = 1e-8, state=None, backend: Optional[str] = None,
                               deterministic: bool = True) -> None:
    """Backward fused with SGD / row-wise Adagrad on CUDA tensors, in place.

    ``deterministic=True`` (default): no float atomics, bit-identical run to run.
    """
    check_update_args(mode, optimizer, lr, eps)
    w, _ = as_tensor(weight, "weight")
    idx, _ = as_tensor(indices, "indices")
    off, _ = as_tensor(offsets, "offsets")
    g, _ = as_tensor(grad_output, "grad_output")
    if w.dtype != torch.float32 or w.dim() != 2:
        raise TypeError(f"weight: the fused update needs a 2-D float32 table, got {w.dtype} {tuple(w.shape)}")
    if w.device.type != "cuda":
        raise ValueError(f"gpu_embedding_bag_backward: weight must be a CUDA tensor, got device {w.device}")
    if w.stride(1) != 1:
        raise ValueError("weight: the fused update writes in place and needs contiguous columns "
                         f"(stride {tuple(w.stride())})")
    psw = st = None
    if per_sample_weights is not None:
        psw, _ = as_tensor(per_sample_weights, "per_sample_weights")
    if state is not None:
        st, _ = as_tensor(state, "state")
    _check_device(w.device, [("indices", idx), ("offsets", off), ("grad_output", g),
                             ("per_sample_weights", psw), ("state", st)])
    if optimizer == "rowwise_adagrad" and st is None:
        raise ValueError("state: rowwise_adagrad needs a (N,) float32 state")
    # the CPU path's checks, then what the kernels need on top
    idx, off = check_update_inputs(int(w.shape[0]), int(w.shape[1]), idx, off, g, psw, st)
    if psw is not None:
        if psw.dtype != torch.float32:
            raise TypeError(f"per_sample_weights: expected float32, got {psw.dtype}")
        psw = psw.contiguous()
    if st is not None and not st.is_contiguous():
        raise ValueError("state: must be contiguous (it is updated in place)")
    name = _resolve("embedding_bag_backward", w, backend)
    if name == "torch":
        wc, sc = w.cpu(), None if st is None else st.cpu()
        reference.embedding_bag_backward(wc, idx.cpu(), off.cpu(), g.cpu(),
                                         None if psw is None else psw.cpu(), mode, optimizer, lr, eps, sc)
        w.copy_(wc)
        if st is not None:
            st.copy_(sc)
        return
    if name == "triton":
        EB = load_kernel_module("embedding_bag")
        EB.embedding_bag_bwd(w, idx, off, g, psw, mode, optimizer, lr, eps, st, deterministic)
        return
    _cuda_backward(w, idx, off, g.contiguous(), psw, mode, optimizer, float(lr), float(eps), st,
                   deterministic)


def _cuda_backward(w, idx, off, g, psw, mode, optimizer, lr, eps, st, deterministic):
    C = load_kernel_module("_common")
    ext = _cuda_ext()
    stream = _stream(w.device)
    nnz, D = idx.numel(), w.shape[1]
    if nnz == 0 or D == 0:
        return
    adagrad = optimizer == "rowwise_adagrad"
    psw_p = 0 if psw is None else psw.data_ptr()
    st_p = 0 if st is None else st.data_ptr()
    B = off.numel() - 1
    if deterministic:
        sorted_pos, uniq, seg = C.backward_segments(idx)
        bag = C.bag_of_positions(off, nnz)
        ext.embedding_bag_bwd(w.data_ptr(), D, int(w.stride(0)), st_p, g.data_ptr(), int(g.stride(0)),
                              sorted_pos.data_ptr(), seg.data_ptr(), uniq.data_ptr(), uniq.numel(),
                              bag.data_ptr(), off.data_ptr(), off.dtype == torch.int64, B, psw_p,
                              mode == "mean", adagrad, lr, eps, stream)
        return
    if not adagrad:
        ext.embedding_bag_bwd_atomic(w.data_ptr(), int(w.stride(0)), D, g.data_ptr(), int(g.stride(0)),
                                     idx.data_ptr(), idx.dtype == torch.int64, off.data_ptr(),
                                     off.dtype == torch.int64, B, psw_p, mode == "mean", -lr, stream)
        return
    uniq, inverse = torch.unique(idx.to(torch.int64), return_inverse=True)
    inverse = inverse.contiguous()
    gbuf = torch.zeros(uniq.numel(), D, dtype=torch.float32, device=w.device)
    ext.embedding_bag_bwd_atomic(gbuf.data_ptr(), D, D, g.data_ptr(), int(g.stride(0)),
                                 inverse.data_ptr(), True, off.data_ptr(), off.dtype == torch.int64, B,
                                 psw_p, mode == "mean", 1.0, stream)
    ext.rowwise_adagrad_apply(w.data_ptr(), int(w.stride(0)), st_p, gbuf.data_ptr(), uniq.data_ptr(),
                              uniq.numel(), D, lr, eps, stream)


# ---------------------------------------------------------------------------------------
# Policy scoring
# ---------------------------------------------------------------------------------------
def _prepare_policy(user_states, items, k, bias, exclude, candidates, temperature):
    """The CPU path's checks (:func:`recmeta_sdk.ops._common.check_policy_args`: the same
    messages for the same bad input), then what the kernels need on top: CUDA tensors on one
    device, a well-formed QuantizedTable, a bias without NaN / +inf (-inf masks an item)."""
    u, tab, b, exc, cand, _, k = check_policy_args(user_states, items, k, bias, exclude, candidates, temperature)
    _check_quantized(tab, "items")
    if b is not None:
        _check_bias_finite(b)  # -inf masks an item; NaN / +inf refused (as the CPU path)
        b = b.contiguous()
    if u.device.type != "cuda":
        raise ValueError(f"user_states: expected a CUDA tensor, got device {u.device}")
    _check_device(u.device, [("items", tab), ("bias", b)])
    return u, tab, b, exc, cand, k


def _check_int8_scales(tab) -> None:
    """As the compiled core's policy ops: every row_scale / row_min of an int8 item table is
    finite (the whole table, whatever the batch and candidates), else ValueError naming the
    first bad row; one (N,) reduction on the device."""
    if isinstance(tab, QuantizedTable) and tab.dtype == "int8" and tab.shape[0]:
        bad = ~torch.isfinite(tab.row_scale) | ~torch.isfinite(tab.row_min)
        if bool(bad.any()):
            raise ValueError(f"items: non-finite row_scale/row_min at row {int(torch.nonzero(bad)[0, 0])}")


def _cpu_args(u, tab, b, exc, cand):
    mv = lambda p: None if p is None else (p[0].cpu(), p[1].cpu())  # noqa: E731
    return u.cpu(), _tab_cpu(tab), None if b is None else b.cpu(), mv(exc), mv(cand)


def _screen_gpu_result(u, tab, b, exc, cand, temperature, ids, vals, lognorm):
    """The fused GPU kernels mark a user that read a non-finite score (a NaN / inf item value,
    int8 scale or minimum, or a float32 overflow, in any row without candidates, in the
    eligible rows with them; not a -inf bias's mask) with a NaN log-normaliser, so one look
    at the (B,) log-normalisers finds it and the reference (on the CPU, only in that error
    case) raises the compiled core's ValueError naming the row. A -inf score (a -inf bias's
    mask) is never returned: such slots become padding."""
    if not bool((torch.isfinite(lognorm) | torch.isneginf(lognorm)).all()):
        cu, ct, cb, ce, cc = _cpu_args(u, tab, b, exc, cand)
        reference.policy_topk(cu, ct, 0, cb, ce, cc, float(temperature))  # raises, naming the row
        raise ValueError("policy scores: a non-finite score was found")  # not reached
    masked = torch.isneginf(vals)
    return ids.masked_fill(masked, -1), vals


def _exact_logtail(u, tab, b, exc, cand, temperature, ids):
    """exact(rows) for reference.logtail_from_lognorm: the mass outside the slate summed
    directly (on the CPU, for the rows whose slate holds nearly all of the mass)."""
    def exact(rows):
        cu, ct, cb, ce, cc = _cpu_args(u, tab, b, exc, cand)
        s = reference._scores(cu, ct, cb, temperature).to(torch.float64)
        mask = reference.eligible_mask(cu.shape[0], ct.shape[0], ce, cc) & (s > float("-inf"))
        ic = ids.cpu()
        r = torch.arange(ic.shape[0])[:, None].expand_as(ic)
        v = ic >= 0
        mask[r[v], ic[v]] = False
        return torch.logsumexp(s.masked_fill(~mask, float("-inf")), dim=1)[rows.cpu()]
    return exact


def _policy(user_states, items, k, seed, bias, exclude, candidates, temperature, backend):
    u, tab, b, exc, cand, k = _prepare_policy(user_states, items, k, bias, exclude, candidates, temperature)
    op = "policy_topk" if seed is None else "policy_sample"
    return _policy_run(_resolve(op, tab, backend), u, tab, k, seed, b, exc, cand, temperature)


def _policy_run(name, u, tab, k, seed, b, exc, cand, temperature):
    """Policy top-k / sampling on validated inputs (also what bench/gpu_check.py times)."""
    dev = u.device
    _check_int8_scales(tab)
    H = load_kernel_module("_heuristics")
    if name != "torch" and max(2, H.next_pow2(k)) > H.MAX_TOPK:
        log.info("policy on %s: k=%d is above the fused kernels' limit %d; using the reference",
                 dev, k, H.MAX_TOPK)
        name = "torch"
    if name == "torch":
        mv = lambda p: None if p is None else (p[0].cpu(), p[1].cpu())  # noqa: E731
        args = (u.cpu(), _tab_cpu(tab), k)
        if seed is None:
            out = reference.policy_topk(*args, None if b is None else b.cpu(), mv(exc), mv(cand),
                                        float(temperature))
        else:
            out = reference.policy_sample(*args, seed, None if b is None else b.cpu(), mv(exc), mv(cand),
                                          float(temperature))
        return tuple(t.to(dev) for t in out)
    if name == "triton":
        PT = load_kernel_module("policy_topk")
        if seed is None:
            ids, vals, lognorm = PT.policy_topk(u, tab, k, b, exc, cand, float(temperature))
            ids, vals = _screen_gpu_result(u, tab, b, exc, cand, temperature, ids, vals, lognorm)
            return ids, vals, lognorm
        return PT.policy_sample(
            u, tab, k, seed, b, exc, cand, float(temperature),
            exact_tail=lambda ids: _exact_logtail(u, tab, b, exc, cand, temperature, ids),
            screen=lambda ids, vals, ln: _screen_gpu_result(u, tab, b, exc, cand, temperature, ids, vals, ln))
    return _cuda_policy(u, tab, k, seed, b, exc, cand, float(temperature))


def _cuda_policy(u, tab, k, seed, b, exc, cand, temperature):
    C = load_kernel_module("_common")
    H = load_kernel_module("_heuristics")
    ext = _cuda_ext()
    dev = u.device
    B, D = u.shape
    N = tab.shape[0]
    C.check_item_count(N)
    u = u if u.stride(1) == 1 else u.contiguous()
    data, scale, rmin, kind = _cuda_table(tab)
    kb = max(2, H.next_pow2(k))
    user_blocks = H.cdiv(max(B, 1), 4)  # csrc/cuda/policy_topk.cu: kUsers users per block
    splits = max(1, min(H.cdiv(N, 256), H.cdiv(4 * H.num_sms(dev), user_blocks), 65535))
    per = H.cdiv(N, splits) if N else 0
    splits = max(1, H.cdiv(N, per)) if N else 1
    keys = torch.full((B, splits, kb), C.KEY_SENTINEL, dtype=torch.int64, device=dev)
    mx = torch.full((B, splits), float("-inf"), dtype=torch.float32, device=dev)
    sm = torch.zeros(B, splits, dtype=torch.float32, device=dev)
    ex = C.sorted_pair_keys(exc, N, dev)
    ca = C.sorted_pair_keys(cand, N, dev)
    cand_empty = ca is not None and ca.numel() == 0
    if B and N and not cand_empty:
        ext.policy_topk_stage1(
            u.data_ptr(), int(u.stride(0)), B, D, kind, data.data_ptr(), int(data.stride(0)), _ptr(scale), _ptr(rmin), N,
            0 if b is None else b.data_ptr(),
            0 if ex is None else ex.data_ptr(), 0 if ex is None else ex.numel(),
            0 if ca is None else ca.data_ptr(), 0 if ca is None else ca.numel(),
            temperature, seed is not None, C.seed_key(seed) if seed is not None else 0, C.item_hi_mix(),
            keys.data_ptr(), mx.data_ptr(), sm.data_ptr(), splits, per, kb, _stream(dev))
    ids, vals = C.merge_topk(keys, k)
    lognorm = C.merge_lse(mx, sm)
    ids, vals = _screen_gpu_result(u, tab, b, exc, cand, temperature, ids, vals, lognorm)
    if seed is None:
        return ids, vals, lognorm
    sc = C.gather_scores(u, tab, ids, b, temperature)
    valid = ids >= 0
    logtail = reference.logtail_from_lognorm(sc, valid, lognorm,
                                             _exact_logtail(u, tab, b, exc, cand, temperature, ids))
    return (ids, sc) + reference.slate_probabilities(sc, valid, logtail)


def gpu_policy_topk(user_states, items, k, bias=None, exclude=None, candidates=None,
                    temperature: float = 1.0, backend: Optional[str] = None):
    """Fused policy top-k on CUDA tensors → (ids, scores, log_normalizer), on the device.

    ``exclude`` / ``candidates`` CSR pairs may be on the CPU or the device.
    """
    return _policy(user_states, items, k, None, bias, exclude, candidates, temperature, backend)


def gpu_policy_sample(user_states, items, k, seed, bias=None, exclude=None, candidates=None,
                      temperature: float = 1.0, backend: Optional[str] = None):
    """Gumbel-top-k sampling on CUDA tensors → (ids, scores, propensities, slate_log_prob);
    the same slates as the CPU backends for the same seed (same counter-based hash)."""

    return _policy(user_states, items, k, as_seed(seed), bias, exclude, candidates, temperature, backend)
