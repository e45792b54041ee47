"""The embedding-bag operation: validation, backend dispatch, torch custom ops with autograd.

Backends
--------
* ``"cpp"`` (the default on CPU): the compiled core, ``recmeta_sdk._core.embedding_bag_forward``
  / ``embedding_bag_backward``. Nothing is copied: numpy arrays go as they are, torch CPU
  tensors as numpy views (``Tensor.numpy()``) or, on the forward's hot path, as
  (address, type, sizes) descriptors of plain contiguous tensors, which cost less per call.
  Strided inputs are made contiguous first. Dtypes and shapes are checked here and in the binding;
  the value checks (every id in range, offsets well formed, weights finite) run in the core,
  before any row is read, and raise the same ``ValueError`` messages as the torch backend's
  checks, so that the checks cost one pass over the ids instead of a dozen torch calls.
* ``"torch"``: :mod:`recmeta_sdk.ops.reference`, after the checks of :mod:`._common`.

Torch custom ops (namespace ``recmeta``)
----------------------------------------
* ``recmeta::embedding_bag_forward(weights, row_scales, row_mins, indices, offsets,
  per_sample_weights, mode) -> Tensor``: differentiable with respect to float32 tables (a dense
  gradient, via ``recmeta::embedding_bag_grad``) and the per-sample weights. :func:`embedding_bag`
  goes through it when autograd needs it or under ``torch.compile``; otherwise it calls the core
  directly (less dispatch overhead).
* ``recmeta::embedding_bag_backward(weight, indices, offsets, grad_output, per_sample_weights,
  pooling, optimizer, lr, eps, state)``: the fused sparse-optimiser update (mutates the
  table and the Adagrad state).
"""
from __future__ import annotations

import itertools
import math
from typing import List, Optional, Sequence

import numpy as np
import torch

from . import _native
from . import backends
from . import reference
from ._common import _FLOAT_TABLES, _nonfinite_row, _parts_to_table, _table_parts  # noqa: F401
from ._common import (
    as_table,
    as_tensor,
    check_bags,
    check_float,
    check_update_args,
    check_update_inputs,
    table_dtype,
    to_kind,
)
from .reference import QuantizedTable

__all__ = ["embedding_bag", "embedding_bag_backward"]

_FWD_MODES = ("sum", "mean", "max")
# Table dtypes of the autograd op; float32 / float16 / uint8 (int8 codes) run on the compiled
# core, bfloat16 / float64 (and mode "max") on the reference (see _forward_reference).
_CORE_TABLES = (torch.float32, torch.float16, torch.uint8)


def _core():
    return _native.core()


# ---------------------------------------------------------------------------------------------
# numpy views for the compiled core
# ---------------------------------------------------------------------------------------------
def _np(x, name: str):
    """A numpy view (no copy) of a contiguous CPU tensor or numpy array; a contiguous copy of a
    strided one."""
    if isinstance(x, torch.Tensor):
        if x.requires_grad:
            x = x.detach()
        if not x.is_contiguous():
            x = x.contiguous()
        try:
            return x.numpy()
        except (TypeError, RuntimeError) as e:  # a CUDA tensor, bfloat16, ...
            raise TypeError(f"{name}: cannot be viewed as a CPU numpy array ({e})") from None
    if isinstance(x, np.ndarray):
        if x.ndim and x.strides[-1] != x.itemsize:
            x = np.ascontiguousarray(x)
        return x
    raise TypeError(f"{name}: expected a numpy array or torch tensor, got {type(x).__name__}")


def _np_inplace(x, name: str):
    """A numpy view sharing memory with x (for in-place updates): refuses what would copy."""
    if isinstance(x, np.ndarray):
        if not x.flags.writeable:
            raise ValueError(f"{name}: the array is read-only; the update is in place")
        if x.size and x.ndim and x.shape[-1] > 1 and x.strides[-1] != x.itemsize:
            raise ValueError(f"{name}: the last dimension must be contiguous for an in-place update")
        return x
    if isinstance(x, torch.Tensor):
        if x.device.type != "cpu":
            raise ValueError(f"{name}: the cpp backend needs CPU data, got a tensor on {x.device}")
        if x.numel() and x.dim() and x.shape[-1] > 1 and x.stride(-1) != 1:
            raise ValueError(f"{name}: the last dimension must be contiguous for an in-place update")
        if x.dtype != torch.float32:
            raise TypeError(f"{name}: expected float32, got {x.dtype}")
        return x.detach().numpy()
    raise TypeError(f"{name}: expected a numpy array or torch tensor, got {type(x).__name__}")


def _core_table(w, t: int):
    """The binding's form of table t: a 2-D float32/float16 array or an int8 (codes, scale, min) tuple."""
    if isinstance(w, torch.Tensor) and (w.dtype is torch.float32 or w.dtype is torch.float16):
        return _np(w, "weight")  # the common case first; shapes are checked in the binding
    name = f"weight[{t}]"
    if isinstance(w, QuantizedTable):
        if w.dtype == "fp16":
            return _np(w.data, name)
        if w.dtype == "int8":
            return (_np(w.data, name), _np(w.row_scale, f"{name} row_scale"), _np(w.row_min, f"{name} row_min"))
        raise ValueError(f"{name}: unknown QuantizedTable dtype {w.dtype!r}")
    if isinstance(w, torch.Tensor):
        raise TypeError(f"{name}: tables must be float32 or float16 (or quantize() them), got {w.dtype}")
    if isinstance(w, np.ndarray):
        if w.dtype != np.float32 and w.dtype != np.float16:
            raise TypeError(f"{name}: tables must be float32 or float16 (or quantize() them), got dtype {w.dtype}")
        return _np(w, name)
    raise TypeError(f"{name}: expected a numpy array, torch tensor or QuantizedTable, got {type(w).__name__}")


# Descriptors (see the binding's docstring): (address, type code, sizes...) of torch CPU
# tensors, which skip Tensor.numpy() (a few microseconds each, which matters for small
# batches). Only plain contiguous CPU tensors are described; anything else takes the numpy path,
# whose checks name the bad argument. The tensors stay referenced by the caller for the call.
def _plain(x: torch.Tensor) -> bool:
    return x.is_cpu and x.layout is torch.strided and x.is_contiguous()


def _ids_arg(x, name: str):
    if isinstance(x, torch.Tensor) and _plain(x) and x.dim() == 1:
        if x.dtype is torch.int64:
            return (x.data_ptr(), 1, x.numel())
        if x.dtype is torch.int32:
            return (x.data_ptr(), 0, x.numel())
    return _np(x, name)


def _table_arg(w, t: int):
    if isinstance(w, torch.Tensor) and _plain(w) and w.dim() == 2:
        code = 0 if w.dtype is torch.float32 else 1 if w.dtype is torch.float16 else -1
        if code >= 0:
            n, d = w.shape
            return (w.data_ptr(), code, n, d, d, 0, 0)
    elif isinstance(w, QuantizedTable) and isinstance(w.data, torch.Tensor) and _plain(w.data) and w.data.dim() == 2:
        n, d = w.data.shape
        if w.dtype == "fp16" and w.data.dtype is torch.float16:
            return (w.data.data_ptr(), 1, n, d, d, 0, 0)
        sc, mn = w.row_scale, w.row_min
        if (w.dtype == "int8" and w.data.dtype is torch.uint8 and all(
                isinstance(v, torch.Tensor) and _plain(v) and v.dtype is torch.float32 and v.dim() == 1
                and v.numel() == n for v in (sc, mn))):
            return (w.data.data_ptr(), 2, n, d, d, sc.data_ptr(), mn.data_ptr())
    return _core_table(w, t)


def _weights_arg(x, name: str):
    if x is None:
        return None
    if isinstance(x, torch.Tensor) and _plain(x) and x.dim() == 1 and x.dtype is torch.float32:
        return (x.data_ptr(), x.numel())
    return _np(x, name)


def _parts_to_core(w: torch.Tensor, sc: torch.Tensor, mn: torch.Tensor, name: str):
    if w.dtype == torch.uint8:
        return (_np(w, name), _np(sc, f"{name} row_scale"), _np(mn, f"{name} row_min"))
    return _np(w, name)


# ---------------------------------------------------------------------------------------------
# torch custom ops
# ---------------------------------------------------------------------------------------------
def _out_dtype(weights) -> torch.dtype:
    """The pooled output's dtype: float64 where a table is float64 (as torch), else float32."""
    return torch.float64 if any(w.dtype == torch.float64 for w in weights) else torch.float32


def _padding_per_position(rows: List[int], offsets: torch.Tensor, nnz: int, padding_idx: int):
    """padding_idx as the local id of each table (``N_t + padding_idx`` if negative, checked to
    lie in [-N_t, N_t)): an int for one table, else one per position ((nnz,) int64)."""
    if isinstance(padding_idx, bool) or not isinstance(padding_idx, (int, np.integer)):
        raise TypeError(f"padding_idx: expected an int or None, got {type(padding_idx).__name__}")
    padding_idx = int(padding_idx)
    pads = []
    for t, n in enumerate(rows):
        if not -n <= padding_idx < n:
            where = "" if len(rows) == 1 else f" of table {t}"
            raise ValueError(f"padding_idx: {padding_idx} is outside the rows{where} [-{n}, {n})")
        pads.append(padding_idx + n if padding_idx < 0 else padding_idx)
    if len(rows) == 1:
        return pads[0]
    T = len(rows)
    B = (offsets.numel() - 1) // T
    off = offsets.to(torch.int64)
    ends = off[torch.arange(T + 1, device=off.device) * B]
    return torch.repeat_interleave(torch.tensor(pads, dtype=torch.int64, device=off.device), ends[1:] - ends[:-1],
                                   output_size=nnz)


def _check_pooled(out: torch.Tensor, tables, indices: torch.Tensor, offsets: torch.Tensor, mode: str) -> None:
    """The torch paths' check of the table rows read, as the core's kernel checks them: a NaN /
    inf row shows in a sum or mean (one isfinite over the output), not always in a max (the
    rows are then checked)."""
    if mode == "max" or (out.numel() and not bool(torch.isfinite(out).all())):
        _nonfinite_row(tables, indices, offsets)


def _forward_reference(weights, row_scales, row_mins, indices, offsets, psw, mode):
    """The op's forward on the reference (mode "max", bfloat16 / float64 tables), checked."""
    tabs = [_parts_to_table(w.detach(), s, m) for w, s, m in zip(weights, row_scales, row_mins)]
    with torch.no_grad():
        out = reference.embedding_bag_tbe(tabs, indices, offsets, None if psw is None else psw.detach(), mode)
    _check_pooled(out, tabs, indices, offsets, mode)
    return out


def _op_inputs(weights, indices, offsets, per_sample_weights, padding_idx):
    """The op's inputs with the padding positions dropped (as reference.drop_padding)."""
    if padding_idx is None:
        return indices, offsets, per_sample_weights
    pad = _padding_per_position([int(w.shape[0]) for w in weights], offsets, indices.numel(), padding_idx)
    idx, off, psw, _ = reference.drop_padding(indices, offsets, per_sample_weights, pad)
    return idx, off, psw


def _forward_impl(weights: List[torch.Tensor], row_scales: List[torch.Tensor], row_mins: List[torch.Tensor],
                indices: torch.Tensor, offsets: torch.Tensor, per_sample_weights: Optional[torch.Tensor],
                mode: str, padding_idx: Optional[int] = None, scale_grad_by_freq: bool = False) -> torch.Tensor:
    """Table-batched embedding bag on the compiled core; uint8 tables are row-wise int8 with
    their row_scales / row_mins (empty tensors for float tables). ``mode`` is "sum", "mean" or
    "max"; ``padding_idx`` (a local id of every table) and ``scale_grad_by_freq`` as in
    :func:`recmeta_sdk.ops.reference.embedding_bag` (the latter changes only the gradient). Mode
    "max" and bfloat16 / float64 tables run on the reference."""
    indices, offsets, psw = _op_inputs(weights, indices, offsets, per_sample_weights, padding_idx)
    if mode == "max" or any(w.dtype not in _CORE_TABLES for w in weights):
        return _forward_reference(weights, row_scales, row_mins, indices, offsets, psw, mode)
    tabs = [_parts_to_core(w, s, m, f"weight[{t}]") for t, (w, s, m) in enumerate(zip(weights, row_scales, row_mins))]
    psw = None if psw is None else _np(psw, "per_sample_weights")
    out = _core().embedding_bag_forward(tabs, _np(indices, "indices"), _np(offsets, "offsets"), psw, mode)
    return torch.from_numpy(out)


_forward_op = torch.library.custom_op("recmeta::embedding_bag_forward", mutates_args=(),
                                      device_types="cpu")(_forward_impl)


@_forward_op.register_fake
def _forward_fake(weights, row_scales, row_mins, indices, offsets, per_sample_weights, mode, padding_idx=None,
                  scale_grad_by_freq=False):
    T = len(weights)
    B = (offsets.shape[0] - 1) // T
    D = sum(w.shape[1] for w in weights)
    return indices.new_empty((B, D), dtype=_out_dtype(weights))


def _grad_impl(grad: torch.Tensor, weights: List[torch.Tensor], row_scales: List[torch.Tensor],
             row_mins: List[torch.Tensor], indices: torch.Tensor, offsets: torch.Tensor,
             per_sample_weights: Optional[torch.Tensor], mode: str, need_weight_grad: List[bool],
             need_psw_grad: bool, padding_idx: Optional[int] = None,
             scale_grad_by_freq: bool = False) -> List[torch.Tensor]:
    """Gradients of ``recmeta::embedding_bag_forward``: a dense (N_t, d_t) gradient (of the
    table's dtype) for each table with ``need_weight_grad[t]`` (an empty tensor otherwise), then
    the (nnz,) gradient of the per-sample weights (empty unless ``need_psw_grad``; zero at
    padding positions). Plain torch code: the same implementation serves CPU and CUDA tensors.
    Mode "max" sends each bag's gradient, column by column, to the first position holding the
    maximum (reference.max_positions)."""
    dev = grad.device
    T = len(weights)
    if (dev.type == "cpu" and mode in ("sum", "mean") and padding_idx is None and not scale_grad_by_freq
            and not need_psw_grad and all(need_weight_grad) and grad.dtype == torch.float32
            and all(w.dtype == torch.float32 and w.device.type == "cpu" for w in weights)
            and all(s.numel() == 0 for s in row_scales)):
        return _grad_core(grad, weights, indices, offsets, per_sample_weights, mode)
    nnz_all = indices.numel()
    keep = None
    if padding_idx is not None:
        pad = _padding_per_position([int(w.shape[0]) for w in weights], offsets, nnz_all, padding_idx)
        indices, offsets, per_sample_weights, keep = reference.drop_padding(indices, offsets, per_sample_weights, pad)
    nnz = indices.numel()
    B = (offsets.numel() - 1) // T
    off = offsets.to(torch.int64)
    idx = indices.to(torch.int64)
    counts = off[1:] - off[:-1]
    bag = torch.repeat_interleave(torch.arange(T * B, device=dev), counts, output_size=nnz)
    sample = bag % B if B > 0 else bag
    acc = _out_dtype(weights)
    scale = torch.ones(nnz, dtype=acc, device=dev)
    if mode == "mean":
        scale = 1.0 / counts.clamp(min=1).to(acc)[bag]
    coef = scale if per_sample_weights is None else per_sample_weights.to(acc) * scale
    g = grad.to(acc)
    outs: List[torch.Tensor] = []
    psw_grad = torch.zeros(nnz if need_psw_grad else 0, dtype=torch.float32, device=dev)
    col = 0
    for t in range(T):
        w = weights[t]
        d = int(w.shape[1])
        lo, hi = int(off[t * B]), int(off[(t + 1) * B])
        if need_weight_grad[t]:
            gw = torch.zeros(w.shape[0], d, dtype=acc, device=dev)
            if mode == "max":
                rows = reference.dequantize(_parts_to_table(w, row_scales[t], row_mins[t]), idx[lo:hi])
                arg = reference.max_positions(rows, bag[lo:hi] - t * B, B)  # (B, d), hi - lo where empty
                hit = arg < hi - lo
                ids = torch.cat([idx[lo:hi], idx.new_zeros(1)])[arg]
                cols = torch.arange(d, device=dev).expand(B, d)
                gw.index_put_((ids[hit], cols[hit]), g[:, col:col + d][hit], accumulate=True)
            else:
                c = coef[lo:hi]
                if scale_grad_by_freq:
                    c = c * reference.inverse_frequency(idx[lo:hi]).to(acc)
                gw.index_add_(0, idx[lo:hi], g[sample[lo:hi], col:col + d] * c[:, None])
            outs.append(gw.to(w.dtype))
        else:
            outs.append(torch.empty(0, dtype=torch.float32, device=dev))
        if need_psw_grad:
            rows = reference.dequantize(_parts_to_table(w, row_scales[t], row_mins[t]), idx[lo:hi])
            psw_grad[lo:hi] = ((rows * g[sample[lo:hi], col:col + d]).sum(dim=1) * scale[lo:hi]).to(torch.float32)
        col += d
    if keep is not None and need_psw_grad:
        full = torch.zeros(nnz_all, dtype=torch.float32, device=dev)
        full[keep] = psw_grad
        psw_grad = full
    outs.append(psw_grad)
    return outs


def _grad_core(grad: torch.Tensor, weights: List[torch.Tensor], indices: torch.Tensor, offsets: torch.Tensor,
               per_sample_weights: Optional[torch.Tensor], mode: str) -> List[torch.Tensor]:
    """:func:`_grad_impl` for plain float32 CPU tables (sum / mean, every table's gradient, no
    per-sample-weight gradient) on the compiled core: the core's fused backward with plain SGD
    applied to zero tables at learning rate -1 leaves each table holding ``0 + grad``, the
    dense gradient (the same sums as the torch code, accumulated row by row in the core's
    deterministic order; tested against torch by test_core_gradient_path_matches_torch in
    tests/test_embedding_bag.py)."""
    outs = [torch.zeros(w.shape[0], w.shape[1], dtype=torch.float32) for w in weights]
    psw = None if per_sample_weights is None else _np(per_sample_weights.to(torch.float32), "per_sample_weights")
    g = _np(grad, "grad")
    if len(weights) == 1:
        _core().embedding_bag_backward(outs[0].numpy(), _np(indices, "indices"), _np(offsets, "offsets"), g, psw,
                                       mode, "sgd", -1.0)
    else:
        _core().embedding_bag_backward_tbe([o.numpy() for o in outs], _np(indices, "indices"),
                                           _np(offsets, "offsets"), g, psw, mode, "sgd", -1.0)
    outs.append(torch.zeros(0, dtype=torch.float32))
    return outs


_grad_op = torch.library.custom_op("recmeta::embedding_bag_grad", mutates_args=(),
                                   device_types=("cpu", "cuda"))(_grad_impl)


@_grad_op.register_fake
def _grad_fake(grad, weights, row_scales, row_mins, indices, offsets, per_sample_weights, mode,
               need_weight_grad, need_psw_grad, padding_idx=None, scale_grad_by_freq=False):
    outs = [grad.new_empty(tuple(w.shape), dtype=w.dtype) if need else grad.new_empty((0,), dtype=torch.float32)
            for w, need in zip(weights, need_weight_grad)]
    outs.append(grad.new_empty((indices.shape[0],) if need_psw_grad else (0,), dtype=torch.float32))
    return outs


def _forward_setup(ctx, inputs, output):
    weights, row_scales, row_mins, indices, offsets, psw, mode, padding_idx, scale_grad_by_freq = (
        tuple(inputs) + (None, False)[len(inputs) - 7:])
    # Every floating table gets its gradient (float16 ones too: they once got None silently).
    ctx.need_w = [bool(w.requires_grad) and w.dtype in _FLOAT_TABLES for w in weights]
    ctx.need_psw = psw is not None and bool(psw.requires_grad)
    ctx.mode = mode
    ctx.padding_idx = padding_idx
    ctx.scale_grad_by_freq = scale_grad_by_freq
    ctx.T = len(weights)
    ctx.has_psw = psw is not None
    ctx.save_for_backward(indices, offsets, psw if psw is not None else indices.new_empty(0),
                          *weights, *row_scales, *row_mins)


def _forward_backward(ctx, grad):
    T = ctx.T
    saved = ctx.saved_tensors
    indices, offsets, psw = saved[0], saved[1], saved[2]
    weights = list(saved[3:3 + T])
    scales = list(saved[3 + T:3 + 2 * T])
    mins = list(saved[3 + 2 * T:3 + 3 * T])
    grads = _grad_op(grad, weights, scales, mins, indices, offsets, psw if ctx.has_psw else None,
                     ctx.mode, ctx.need_w, ctx.need_psw, ctx.padding_idx, ctx.scale_grad_by_freq)
    wgrads = [grads[t] if ctx.need_w[t] else None for t in range(T)]
    out = (wgrads, [None] * T, [None] * T, None, None, (grads[T] if ctx.need_psw else None), None, None, None)
    # Trailing arguments left at their defaults are not among the inputs the returned gradients
    # must match (ctx.needs_input_grad has their structure).
    return out[:len(ctx.needs_input_grad)]


torch.library.register_autograd("recmeta::embedding_bag_forward", _forward_backward, setup_context=_forward_setup)


class _EagerBag(torch.autograd.Function):
    """The same forward and gradient as ``recmeta::embedding_bag_forward`` (the same two
    functions, :func:`_forward_impl` and :func:`_grad_impl`) as a plain autograd Function, for
    eager calls. A call through a ``torch.library`` custom op goes through torch's
    ``_disable_dynamo`` wrapper, whose first call imports ``torch._dynamo`` (2.7-4.4 CPU-s
    per process, most of a small model's training time); eager training does not need it. Under
    ``torch.compile`` the custom op is used (it has the fake kernels the compiler needs)."""

    @staticmethod
    def forward(ctx, indices, offsets, psw, mode, scale_grad_by_freq, T, *tensors):
        weights, scales, mins = list(tensors[:T]), list(tensors[T:2 * T]), list(tensors[2 * T:])
        ctx.need_w = [bool(ctx.needs_input_grad[6 + t]) and w.dtype in _FLOAT_TABLES for t, w in enumerate(weights)]
        ctx.need_psw = psw is not None and bool(ctx.needs_input_grad[2])
        ctx.mode, ctx.scale_grad_by_freq, ctx.T, ctx.has_psw = mode, scale_grad_by_freq, T, psw is not None
        ctx.save_for_backward(indices, offsets, psw if psw is not None else indices.new_empty(0), *tensors)
        return _forward_impl(weights, scales, mins, indices, offsets, psw, mode, None, scale_grad_by_freq)

    @staticmethod
    def backward(ctx, grad):
        T = ctx.T
        saved = ctx.saved_tensors
        indices, offsets, psw = saved[0], saved[1], saved[2]
        weights, scales, mins = list(saved[3:3 + T]), list(saved[3 + T:3 + 2 * T]), list(saved[3 + 2 * T:])
        grads = _grad_impl(grad, weights, scales, mins, indices, offsets, psw if ctx.has_psw else None,
                           ctx.mode, ctx.need_w, ctx.need_psw, None, ctx.scale_grad_by_freq)
        wgrads = [grads[t] if ctx.need_w[t] else None for t in range(T)]
        return (None, None, grads[T] if ctx.need_psw else None, None, None, None,
                *wgrads, *([None] * (2 * T)))


@_forward_op.register_kernel("cuda")
def _forward_op_cuda(weights, row_scales, row_mins, indices, offsets, per_sample_weights, mode, padding_idx=None,
                     scale_grad_by_freq=False):
    """CUDA tensors: the Triton or CUDA kernels (see :mod:`recmeta_sdk.ops._gpu`), so a model on
    the GPU trains through the same op; its gradient op is device-agnostic. Padding is dropped
    first; mode "max" and bfloat16 / float64 tables run on the reference (torch on the GPU)."""
    from ._gpu import _forward_op_cuda as run

    indices, offsets, psw = _op_inputs(weights, indices, offsets, per_sample_weights, padding_idx)
    if mode == "max" or any(w.dtype not in _CORE_TABLES for w in weights):
        return _forward_reference(weights, row_scales, row_mins, indices, offsets, psw, mode)
    return run(weights, row_scales, row_mins, indices, offsets, psw, mode)


@torch.library.custom_op("recmeta::embedding_bag_backward", mutates_args=("weight", "state"), device_types="cpu")
def _backward_op(weight: torch.Tensor, indices: torch.Tensor, offsets: torch.Tensor, grad_output: torch.Tensor,
                 per_sample_weights: Optional[torch.Tensor], pooling: str, optimizer: str, lr: float, eps: float,
                 state: Optional[torch.Tensor]) -> None:
    """Fused backward + sparse optimiser on the compiled core, updating weight (and state) in place.
    (``pooling`` is the forward's mode; an argument named ``mode`` clashes with torch's
    functionalisation of mutating ops.)"""
    _core().embedding_bag_backward(
        _np_inplace(weight, "weight"), _np(indices, "indices"), _np(offsets, "offsets"),
        _np(grad_output, "grad_output"),
        None if per_sample_weights is None else _np(per_sample_weights, "per_sample_weights"),
        pooling, optimizer, lr, eps, None if state is None else _np_inplace(state, "state"))


@_backward_op.register_fake
def _backward_fake(weight, indices, offsets, grad_output, per_sample_weights, pooling, optimizer, lr, eps, state):
    return None


def _compiling() -> bool:
    return bool(torch.compiler.is_compiling())


# ---------------------------------------------------------------------------------------------
# public functions
# ---------------------------------------------------------------------------------------------
def _table_bounds(table_offsets, rows: int) -> List[int]:
    """The validated (T+1,) cumulative row offsets of the one-table TBE form as a list."""
    if isinstance(table_offsets, torch.Tensor):
        if table_offsets.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"table_offsets: expected int32 or int64, got {table_offsets.dtype}")
        arr = table_offsets.detach().cpu().numpy()
    elif isinstance(table_offsets, np.ndarray):
        if table_offsets.dtype not in (np.int32, np.int64):
            raise TypeError(f"table_offsets: expected int32 or int64, got dtype {table_offsets.dtype}")
        arr = table_offsets
    elif isinstance(table_offsets, (list, tuple)):
        if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in table_offsets):
            raise TypeError("table_offsets: expected integers")
        arr = np.asarray(table_offsets, dtype=np.int64)
    else:
        raise TypeError(f"table_offsets: expected a (T+1,) int array or tensor, got {type(table_offsets).__name__}")
    if arr.ndim != 1 or arr.shape[0] < 2:
        raise ValueError(f"table_offsets: expected a 1-D array of T+1 >= 2 offsets, got shape {tuple(arr.shape)}")
    if int(arr[0]) != 0:
        raise ValueError(f"table_offsets: table_offsets[0] must be 0, got {int(arr[0])}")
    steps = np.diff(arr)
    if steps.size and int(steps.min()) < 0:
        pos = int(np.argmax(steps < 0)) + 1
        raise ValueError(f"table_offsets: offsets decrease at position {pos} ({int(arr[pos - 1])} -> {int(arr[pos])})")
    if int(arr[-1]) != rows:
        raise ValueError(f"table_offsets: table_offsets[-1] must equal the number of rows of weight {rows}, "
                         f"got {int(arr[-1])}")
    return [int(v) for v in arr.tolist()]


def _split_table(weight, table_offsets, name: str = "weight", with_bounds: bool = False):
    """The T tables of the one-table TBE form: views (no copy) of the row ranges of ``weight``
    (and the validated bounds if ``with_bounds``)."""
    if isinstance(weight, (list, tuple)):
        raise TypeError(f"{name}: with table_offsets, give one (sum_t N_t, d) table, not a list of tables")
    if isinstance(weight, QuantizedTable):
        shape = tuple(weight.data.shape)
    elif isinstance(weight, (np.ndarray, torch.Tensor)):
        shape = tuple(weight.shape)
    else:
        raise TypeError(f"{name}: expected a numpy array, torch tensor or QuantizedTable, got {type(weight).__name__}")
    if len(shape) != 2:
        raise ValueError(f"{name}: expected a 2-D (sum_t N_t, d) table, got shape {shape}")
    bounds = _table_bounds(table_offsets, shape[0])
    pairs = list(itertools.pairwise(bounds))
    if isinstance(weight, QuantizedTable):
        if weight.dtype == "int8":
            parts = [QuantizedTable("int8", weight.data[a:b], weight.row_scale[a:b], weight.row_min[a:b])
                     for a, b in pairs]
        else:
            parts = [QuantizedTable(weight.dtype, weight.data[a:b]) for a, b in pairs]
    else:
        parts = [weight[a:b] for a, b in pairs]
    return (parts, bounds) if with_bounds else parts


_Tensor = torch.Tensor
_STRIDED = torch.strided
_IDS_CODE = {torch.int32: 0, torch.int64: 1}
_TABLE_CODE = {torch.float32: 0, torch.float16: 1}


def _fast_forward(w, indices, offsets, mode):
    """The common call, one plain CPU float32/float16 tensor table and plain CPU id tensors on
    the default backend (the compiled core) without autograd, with the fewest Python steps;
    None where anything differs (the general path then handles, or refuses, the call). The
    values (ids in range, offsets well formed) are checked in the core as on the general path.
    Each test below costs about 0.1 us, and a call of 64 bags takes about 10 us in all."""
    fast = _FAST_CORE
    if fast is None or backends.env_override():
        return None
    if fast is _UNSET:
        fast = _init_fast_core()
        if fast is None:
            return None
    if (w.requires_grad and _grad_enabled()) or _is_compiling():
        return None
    code = _TABLE_CODE.get(w.dtype)
    ic = _IDS_CODE.get(indices.dtype)
    oc = _IDS_CODE.get(offsets.dtype)
    if (code is None or ic is None or oc is None or (mode != "sum" and mode != "mean")
            or w.layout is not _STRIDED or indices.layout is not _STRIDED or offsets.layout is not _STRIDED
            or not (w.is_cpu and indices.is_cpu and offsets.is_cpu)
            or not (w.is_contiguous() and indices.is_contiguous() and offsets.is_contiguous())
            or indices.dim() != 1 or offsets.dim() != 1):
        return None
    ws = w.shape
    if len(ws) != 2:
        return None
    return _from_numpy(fast(w.data_ptr(), code, ws[0], ws[1], indices.data_ptr(), ic, indices.numel(),
                            offsets.data_ptr(), oc, offsets.numel(), mode == "mean"))


def _check_adagrad_state(state) -> None:
    """A row-wise Adagrad state is a sum of squares: every value finite and >= 0 (a negative
    one would make sqrt(state) NaN); ValueError naming the first bad row (and table)."""
    states = state if isinstance(state, (list, tuple)) else [state]
    for t, st in enumerate(states):
        if not isinstance(st, (np.ndarray, torch.Tensor)):
            continue  # type errors are reported by the checks that follow
        v = torch.as_tensor(st) if isinstance(st, np.ndarray) else st.detach()
        if not v.is_floating_point() or v.numel() == 0:
            continue  # dtype and shape errors are reported by the checks that follow
        bad = ~torch.isfinite(v) | (v < 0)
        if bool(bad.any()):
            r = int(torch.nonzero(bad.reshape(-1))[0, 0])
            where = f"state[{t}]" if isinstance(state, (list, tuple)) else "state"
            x = float(v.reshape(-1)[r])
            what = "non-finite value" if not math.isfinite(x) else "negative value"
            raise ValueError(f"{where}: {what} {x} at row {r} (a row-wise Adagrad state must be finite and >= 0)")


def _init_fast_core():
    """The core's one-table forward when the default CPU backend is the compiled core (None
    otherwise: the fast path is then skipped). Looked up once, at the first call.

    The fast forward takes raw addresses, so the core does not expose it as a module
    function: it hands out one handle per process (``_claim_embedding_bag_fast_forward``),
    kept here; if something else claimed it first, the fast path stays off (every call then
    takes the general path, which converts and checks its arrays)."""
    global _FAST_CORE, _FAST_HANDLE
    if backends.default_cpu() != "cpp":  # the table's default for embedding_bag on CPU float32
        _FAST_CORE = None
        return None
    if _FAST_HANDLE is _UNSET:
        try:
            _FAST_HANDLE = _core()._claim_embedding_bag_fast_forward()
        except (AttributeError, RuntimeError):
            _FAST_HANDLE = None
    _FAST_CORE = _FAST_HANDLE
    return _FAST_CORE


_grad_enabled = torch.is_grad_enabled
_is_compiling = torch.compiler.is_compiling
_from_numpy = torch.from_numpy
_UNSET = object()
_FAST_CORE = _UNSET
_FAST_HANDLE = _UNSET  # the core's raw-address forward, claimed once (see _init_fast_core)


def _is_wide(w) -> bool:
    """A bfloat16 / float64 table (the reference path: the compiled core reads float32 /
    float16 / int8)."""
    if isinstance(w, torch.Tensor):
        return w.dtype is torch.float64 or w.dtype is torch.bfloat16
    return isinstance(w, np.ndarray) and w.dtype == np.float64


def _torch_table(w, name: str):
    """A table as the reference takes it (bfloat16 / float64 tensors and float64 numpy arrays
    as they are, the rest through as_table)."""
    if _is_wide(w):
        t = torch.from_numpy(w) if isinstance(w, np.ndarray) else w
        if t.dim() != 2:
            raise ValueError(f"{name}: expected a 2-D (N, d) table, got shape {tuple(t.shape)}")
        return t
    return as_table(w, name)[0]


def _csr_inputs(indices, offsets, psw, include_last_offset):
    """(indices, offsets, per_sample_weights) in the CSR form: torch's 2-D (B, L) indices with
    offsets=None become B bags of L; with include_last_offset=False the (B,) bag starts get nnz
    appended. Arrays stay numpy or torch, as given."""
    if not isinstance(include_last_offset, bool):
        raise TypeError(f"include_last_offset: expected a bool, got {type(include_last_offset).__name__}")
    if not isinstance(indices, (np.ndarray, torch.Tensor)):
        return indices, offsets, psw  # refused, naming the argument, by the checks downstream
    if offsets is None:
        if indices.ndim != 2:
            raise ValueError(f"offsets: required for 1-D indices (None only with 2-D (B, L) indices), "
                             f"got indices of shape {tuple(indices.shape)}")
        B, L = (int(v) for v in indices.shape)
        if psw is not None:
            if tuple(psw.shape) != (B, L):
                raise ValueError(f"per_sample_weights: expected the shape of the indices {(B, L)}, "
                                 f"got {tuple(psw.shape)}")
            psw = psw.reshape(-1)
        if isinstance(indices, torch.Tensor):
            off = torch.arange(B + 1, dtype=torch.int64, device=indices.device) * L
            return indices.reshape(-1), off, psw
        return indices.reshape(-1), np.arange(B + 1, dtype=np.int64) * L, psw
    if indices.ndim == 2:
        raise ValueError(f"indices: expected a 1-D array with offsets (2-D (B, L) indices take offsets=None, as "
                         f"in torch), got shape {tuple(indices.shape)}")
    if include_last_offset:
        return indices, offsets, psw
    if not isinstance(offsets, (np.ndarray, torch.Tensor)) or offsets.ndim != 1:
        raise ValueError(f"offsets: expected a 1-D array of bag starts, got "
                         f"{getattr(offsets, 'shape', type(offsets).__name__)}")
    nnz = int(indices.shape[0]) if indices.ndim else 1
    if isinstance(offsets, torch.Tensor):
        return indices, reference.csr_offsets(offsets, nnz, False), psw
    return indices, np.concatenate([offsets, np.array([nnz], dtype=offsets.dtype)]), psw


def _drop_padding(tables, indices, offsets, psw, padding_idx):
    """The inputs with the positions holding padding_idx (a local id of every table) removed
    (reference.drop_padding), after the checks that name bad ids and offsets by their
    positions in the caller's arrays. Arrays stay numpy or torch, as given."""
    idx, kind = as_tensor(indices, "indices")
    off, _ = as_tensor(offsets, "offsets")
    p = None if psw is None else as_tensor(psw, "per_sample_weights")[0]
    off = check_bags(tables, idx, off, p)
    rows = [int(t.shape[0]) for t in tables]
    pad = _padding_per_position(rows, off, idx.numel(), padding_idx)
    idx, off, p, _ = reference.drop_padding(idx, off, p, pad)
    if kind == "numpy":
        return idx.numpy(), off.numpy(), None if p is None else p.detach().numpy()
    if psw is not None and not isinstance(psw, torch.Tensor):
        p = p.numpy()
    return idx, off, p


def embedding_bag(weight: (np.ndarray | torch.Tensor | QuantizedTable
                          | Sequence[np.ndarray | torch.Tensor | QuantizedTable]),
                  indices: np.ndarray | torch.Tensor, offsets: np.ndarray | torch.Tensor | None = None, *,
                  per_sample_weights: np.ndarray | torch.Tensor | None = None, mode: str = "sum",
                  backend: Optional[str] = None,
                  table_offsets: np.ndarray | torch.Tensor | Sequence[int] | None = None,
                  padding_idx: Optional[int] = None,
                  include_last_offset: bool = True, max_norm: Optional[float] = None, norm_type: float = 2.0,
                  scale_grad_by_freq: bool = False) -> np.ndarray | torch.Tensor:
    """Pooled lookup of bags of table rows (one table, or a list of tables: TBE).

    Parameters
    ----------
    weight : (N, d) float32 / float16 / bfloat16 / float64 array or tensor, QuantizedTable, or
        a list of T such tables (possibly of different N_t and d_t); with ``table_offsets``, one
        (sum_t N_t, d) table of any of these kinds holding the T tables' rows one after the other
    indices : (nnz,) int32 or int64, row ids (local to their table: in [0, N_t)); or, with
        ``offsets=None``, (B, L): B bags of L ids (torch's 2-D form)
    offsets : (B+1,) CSR offsets (``(T*B+1,)`` table-major for T tables: bag ``t*B+b``
        is sample b of table t), like torch's ``include_last_offset=True``; with
        ``include_last_offset=False``, the (B,) (``(T*B,)``) bag starts of torch's default form.
        Unlike torch, the last offset must equal nnz (torch lets trailing ids join the last bag).
    per_sample_weights : (nnz,) float32, optional ((B, L) with 2-D indices); not with ``"max"``
    mode : {"sum", "mean", "max"}; an empty bag gives a zero row. ``max`` takes each column's
        maximum over the bag's rows; its gradient goes to the first position holding it, per
        bag and column (as torch).
    backend : {"cpp", "torch"} or None (``RECMETA_BACKEND`` or the default)
    table_offsets : (T+1,) int32 / int64 cumulative row offsets, optional (FBGEMM's
        ``hash_size_cumsum``): table t is rows ``table_offsets[t] .. table_offsets[t+1]-1`` of
        ``weight``; ``table_offsets[0] == 0`` and ``table_offsets[T]`` is the number of rows.
        The tables are views of ``weight``, nothing is copied.
    padding_idx : int, optional
        Ids equal to ``padding_idx`` (``N_t + padding_idx`` if negative; it must lie in
        [-N_t, N_t) for each table, a local id of every table) are skipped: not pooled, not
        counted by ``mean``, no gradient to their row (as torch). Their positions are dropped
        before the kernels run (one pass over the ids).
    include_last_offset : bool, default True (recmeta's CSR offsets); False for torch's default
    max_norm, norm_type : not supported: torch renormalises the table's rows in place during
        the forward; a ``max_norm`` raises ValueError (renormalise the table before the call)
    scale_grad_by_freq : bool
        Divide each row's gradient by the number of positions holding its id (within its
        table), as documented for torch (see :func:`recmeta_sdk.ops.reference.embedding_bag`).
        Not with ``"max"``.

    Returns
    -------
    (B, d) float32 (``(B, sum_t d_t)`` for a list, ``(B, T*d)`` with ``table_offsets``);
    float64 where a table is float64 (as torch); numpy if the indices were numpy, else a torch
    tensor, differentiable with respect to floating tables (float32, float16, bfloat16,
    float64: the gradient has the table's dtype; the whole table with ``table_offsets``) and
    the per-sample weights.

    Backends: the compiled core pools float32 / float16 / int8 tables in sum and mean mode and
    checks each bag's rows as it reads them. Mode ``"max"`` and bfloat16 / float64 tables run
    the torch reference (:mod:`recmeta_sdk.ops.reference`, also on CUDA tensors), which gathers
    the (nnz, d) rows. A table row holding NaN or inf that a bag reads (an int8 row with a
    non-finite scale or minimum) raises ValueError naming the table, the row and its position
    in ``indices``, on every CPU backend.
    """
    if (type(weight) is _Tensor and type(indices) is _Tensor and type(offsets) is _Tensor
            and per_sample_weights is None and backend is None and table_offsets is None
            and padding_idx is None and include_last_offset is True and max_norm is None
            and scale_grad_by_freq is False):
        out = _fast_forward(weight, indices, offsets, mode)
        if out is not None:
            return out
    if mode not in _FWD_MODES:
        raise ValueError(f"embedding_bag: mode must be 'sum', 'mean' or 'max', got {mode!r}")
    if max_norm is not None:
        raise ValueError(f"max_norm: not supported (got {max_norm!r}): torch renormalises the rows it reads in "
                         "place, during the forward; renormalise the table before the call (e.g. with "
                         "torch.embedding_renorm_) and pass max_norm=None")
    if not isinstance(scale_grad_by_freq, bool):
        raise TypeError(f"scale_grad_by_freq: expected a bool, got {type(scale_grad_by_freq).__name__}")
    if mode == "max" and per_sample_weights is not None:
        raise ValueError("per_sample_weights: not supported with mode='max' (as in torch)")
    if mode == "max" and scale_grad_by_freq:
        raise ValueError("scale_grad_by_freq: not supported with mode='max' (as in torch)")
    indices, offsets, per_sample_weights = _csr_inputs(indices, offsets, per_sample_weights, include_last_offset)
    whole = None
    if table_offsets is not None:
        whole = weight
        weight = _split_table(weight, table_offsets)
        tables = weight
    else:
        tables = weight if isinstance(weight, (list, tuple)) else (weight,)
    if not tables:
        raise ValueError("embedding_bag: the list of tables is empty")
    if padding_idx is not None:
        indices, offsets, per_sample_weights = _drop_padding(tables, indices, offsets, per_sample_weights,
                                                             padding_idx)
    use_ref = mode == "max" or any(_is_wide(w) for w in tables)
    is_torch = isinstance(indices, torch.Tensor)
    # the backend table's op: the variants whose kernels differ (see ops.backends.OPS)
    op = ("embedding_bag_table_offsets" if whole is not None else "embedding_bag_max" if mode == "max"
          else "embedding_bag_freq" if scale_grad_by_freq else "embedding_bag")
    be = backends.select(op, "cuda" if is_torch and indices.is_cuda else "cpu", table_dtype(tables), backend)
    if (be == "triton" or be == "cuda") and not (use_ref or scale_grad_by_freq):
        from ._gpu import gpu_embedding_bag

        return gpu_embedding_bag(weight, indices, offsets, per_sample_weights, mode, backend=be)
    if be == "cpp":
        needs_graph = False
        if is_torch:
            if torch.compiler.is_compiling():
                needs_graph = True
            elif torch.is_grad_enabled():
                for w in tables:
                    if isinstance(w, torch.Tensor) and w.requires_grad:
                        needs_graph = True
                        break
                if isinstance(per_sample_weights, torch.Tensor) and per_sample_weights.requires_grad:
                    needs_graph = True
        if needs_graph:
            if not isinstance(offsets, torch.Tensor):
                raise TypeError(f"offsets: expected a torch tensor like the indices, got {type(offsets).__name__}")
            parts = [_table_parts(w, f"weight[{t}]") for t, w in enumerate(tables)]
            psw = per_sample_weights
            if psw is not None and not isinstance(psw, torch.Tensor):
                raise TypeError(f"per_sample_weights: expected a torch tensor, got {type(psw).__name__}")
            if use_ref:  # the op runs the reference without checks of its own
                check_bags([p[0] for p in parts], indices, offsets, psw)
            if not torch.compiler.is_compiling():
                return _EagerBag.apply(indices, offsets, psw, mode, scale_grad_by_freq, len(parts),
                                       *[p[0] for p in parts], *[p[1] for p in parts], *[p[2] for p in parts])
            return _forward_op([p[0] for p in parts], [p[1] for p in parts], [p[2] for p in parts],
                               indices, offsets, psw, mode, None, scale_grad_by_freq)
        if not use_ref:
            if is_torch:
                out = _core().embedding_bag_forward(
                    [_table_arg(w, t) for t, w in enumerate(tables)], _ids_arg(indices, "indices"),
                    _ids_arg(offsets, "offsets"), _weights_arg(per_sample_weights, "per_sample_weights"), mode)
                return torch.from_numpy(out)
            tabs = [_core_table(w, t) for t, w in enumerate(tables)]
            psw = None if per_sample_weights is None else _np(per_sample_weights, "per_sample_weights")
            return _core().embedding_bag_forward(tabs, _np(indices, "indices"), _np(offsets, "offsets"), psw, mode)
    # torch reference backend (also mode "max" and bfloat16 / float64 tables on every backend)
    idx, kind = as_tensor(indices, "indices")
    off, _ = as_tensor(offsets, "offsets")
    tabs = [_torch_table(w, f"weight[{t}]") for t, w in enumerate(tables)]
    psw = None
    if per_sample_weights is not None:
        psw, _ = as_tensor(per_sample_weights, "per_sample_weights")
    off = check_bags(tabs, idx, off, psw)
    if whole is not None:
        bounds = torch.tensor([0] + [0] * len(tabs), dtype=torch.int64)
        bounds[1:] = torch.cumsum(torch.tensor([t.shape[0] for t in tabs], dtype=torch.int64), 0)
        out = reference.embedding_bag_table_offsets(_torch_table(whole, "weight"), bounds, idx, off, psw, mode,
                                                    scale_grad_by_freq=scale_grad_by_freq)
    elif len(tabs) == 1 and not isinstance(weight, (list, tuple)):
        out = reference.embedding_bag(tabs[0], idx, off, psw, mode, scale_grad_by_freq=scale_grad_by_freq)
    else:
        out = reference.embedding_bag_tbe(tabs, idx, off, psw, mode, scale_grad_by_freq=scale_grad_by_freq)
    _check_pooled(out.detach(), tabs, idx, off, mode)
    return to_kind(kind, out)


def _check_update_table(w, name: str) -> None:
    if isinstance(w, np.ndarray):
        bad = w.dtype != np.float32 or w.ndim != 2
    elif isinstance(w, torch.Tensor):
        bad = w.dtype != torch.float32 or w.dim() != 2
    else:
        raise TypeError(f"{name}: expected a numpy array or torch tensor, got {type(w).__name__}")
    if bad:
        raise TypeError(f"{name}: the fused update needs a 2-D float32 table, got {w.dtype} {tuple(w.shape)}")


def _torch_state(st, name: str, n: int) -> torch.Tensor:
    st = torch.from_numpy(_np_inplace(st, name)) if isinstance(st, np.ndarray) else st
    if not isinstance(st, torch.Tensor) or st.dtype != torch.float32:
        raise TypeError(f"{name}: expected a float32 array, got {getattr(st, 'dtype', type(st).__name__)}")
    check_float(st, name, (n,))
    return st


def _backward_tbe(weight, indices, offsets, grad_output, per_sample_weights, mode, optimizer, lr, eps, state,
                  be, table_offsets):
    """embedding_bag_backward over a list of tables or the one-table form with table_offsets."""
    whole = None
    if table_offsets is not None:
        _check_update_table(weight, "weight")
        whole = weight
        tables, bounds = _split_table(weight, table_offsets, with_bounds=True)
        if state is not None:
            if isinstance(state, (list, tuple)):
                raise TypeError("state: with table_offsets, give one (sum_t N_t,) float32 state, not a list")
            shape = tuple(state.shape) if isinstance(state, (np.ndarray, torch.Tensor)) else None
            if shape != (bounds[-1],):
                raise ValueError(f"state: expected shape ({bounds[-1]},), got {shape}")
            states = [state[a:b] for a, b in itertools.pairwise(bounds)]
        else:
            states = None
    else:
        tables = list(weight)
        if not tables:
            raise ValueError("embedding_bag_backward: the list of tables is empty")
        for t, w in enumerate(tables):
            _check_update_table(w, f"weight[{t}]")
        if state is not None:
            if not isinstance(state, (list, tuple)) or len(state) != len(tables):
                raise ValueError(f"state: for a list of {len(tables)} tables, give a list of {len(tables)} "
                                 "(N_t,) float32 states (one per table)")
            states = list(state)
        else:
            states = None
    T = len(tables)
    if be == "cpp":
        for t, w in enumerate(tables):
            if isinstance(w, torch.Tensor) and w.device.type != "cpu":
                raise ValueError(f"weight[{t}]: the cpp backend needs CPU data, got a tensor on {w.device}")
        _core().embedding_bag_backward_tbe(
            [_np_inplace(w, f"weight[{t}]") for t, w in enumerate(tables)], _np(indices, "indices"),
            _np(offsets, "offsets"), _np(grad_output, "grad_output"),
            None if per_sample_weights is None else _np(per_sample_weights, "per_sample_weights"),
            mode, optimizer, float(lr), float(eps),
            None if states is None else [_np_inplace(st, f"state[{t}]") for t, st in enumerate(states)])
        return
    # torch reference backend: every check first, then in-place on views of the caller's memory
    ws = [torch.from_numpy(_np_inplace(w, f"weight[{t}]")) if isinstance(w, np.ndarray) else w
          for t, w in enumerate(tables)]
    idx, _ = as_tensor(indices, "indices")
    off, _ = as_tensor(offsets, "offsets")
    g, _ = as_tensor(grad_output, "grad_output")
    off = check_bags(ws, idx, off, None)
    B = (off.numel() - 1) // T
    if g.dtype != torch.float32:
        raise TypeError(f"grad_output: expected float32, got {g.dtype}")
    check_float(g, "grad_output", (B, sum(int(w.shape[1]) for w in ws)))
    psw = None
    if per_sample_weights is not None:
        psw, _ = as_tensor(per_sample_weights, "per_sample_weights")
        check_float(psw, "per_sample_weights", (idx.numel(),))
    sts = None if states is None else [_torch_state(st, f"state[{t}]", int(ws[t].shape[0]))
                                       for t, st in enumerate(states)]
    if whole is not None:
        w_all = torch.from_numpy(whole) if isinstance(whole, np.ndarray) else whole
        st_all = None if state is None else (torch.from_numpy(state) if isinstance(state, np.ndarray) else state)
        reference.embedding_bag_backward_table_offsets(
            w_all, torch.tensor(bounds, dtype=torch.int64), idx, off, g, psw, mode, optimizer, float(lr), float(eps),
            st_all)
    else:
        reference.embedding_bag_backward_tbe(ws, idx, off, g, psw, mode, optimizer, float(lr), float(eps), sts)


def embedding_bag_backward(weight: np.ndarray | torch.Tensor | Sequence[np.ndarray | torch.Tensor],
                           indices: np.ndarray | torch.Tensor, offsets: np.ndarray | torch.Tensor,
                           grad_output: np.ndarray | torch.Tensor, *,
                           per_sample_weights: np.ndarray | torch.Tensor | None = None,
                           mode: str = "sum", optimizer: str = "sgd", lr: float = 0.01, eps: float = 1e-8,
                           state: np.ndarray | torch.Tensor | Sequence[np.ndarray | torch.Tensor] | None = None,
                           backend: Optional[str] = None,
                           table_offsets: np.ndarray | torch.Tensor | Sequence[int] | None = None) -> None:
    """Backward of :func:`embedding_bag` fused with a sparse optimiser step, in place.

    Parameters
    ----------
    weight : (N, d) float32, numpy array or CPU tensor, updated in place (touched rows only);
        or a list of T such tables (the table-batched form); or, with ``table_offsets``, one
        (sum_t N_t, d) float32 table holding the T tables' rows
    indices : (nnz,) int32 or int64, local to their table (in [0, N_t))
    offsets : (B+1,) CSR offsets (``(T*B+1,)`` table-major for T tables)
    grad_output : (B, d) float32, the gradient of the forward output (``(B, sum_t d_t)`` for
        T tables)
    per_sample_weights : (nnz,) float32, optional
    mode : {"sum", "mean"}, the forward's pooling
    optimizer : {"sgd", "rowwise_adagrad"}
    lr : learning rate; eps : Adagrad epsilon
    state : row-wise Adagrad state, updated in place (required for Adagrad): (N,) float32 for
        one table, a list of T (N_t,) float32 states for a list of tables, one (sum_t N_t,)
        float32 state with ``table_offsets``
    backend : {"cpp", "torch"} or None
    table_offsets : (T+1,) int cumulative row offsets, optional (see :func:`embedding_bag`)

    Repeated indices (inside and across bags) accumulate; the cpp backend's result is
    bit-identical for any thread count. With several tables, every input is checked before any
    table changes. See :func:`recmeta_sdk.ops.reference.embedding_bag_backward` and
    :func:`recmeta_sdk.ops.reference.embedding_bag_backward_tbe`.
    """
    check_update_args(mode, optimizer, lr, eps)
    if optimizer == "rowwise_adagrad" and state is None:
        raise ValueError("state: rowwise_adagrad needs a (N,) float32 state")
    if optimizer == "rowwise_adagrad":
        _check_adagrad_state(state)
    if table_offsets is not None or isinstance(weight, (list, tuple)):
        is_cuda = isinstance(indices, torch.Tensor) and indices.is_cuda
        op = "embedding_bag_backward_table_offsets" if table_offsets is not None else "embedding_bag_backward_tbe"
        # the fused update's tables are float32 (checked, naming the table, by _backward_tbe)
        be = backends.select(op, "cuda" if is_cuda else "cpu", "float32", backend)
        return _backward_tbe(weight, indices, offsets, grad_output, per_sample_weights, mode, optimizer, lr, eps,
                             state, be, table_offsets)
    _check_update_table(weight, "weight")
    device = weight.device.type if isinstance(weight, torch.Tensor) else "cpu"
    be = backends.select("embedding_bag_backward", "cpu" if device == "cpu" else "cuda", "float32", backend)
    if be in ("triton", "cuda"):
        from ._gpu import gpu_embedding_bag_backward

        return gpu_embedding_bag_backward(weight, indices, offsets, grad_output, per_sample_weights,
                                          mode, optimizer, lr, eps, state, backend=be)
    if be == "cpp":
        if isinstance(weight, torch.Tensor) and _compiling():
            _backward_op(weight, indices, offsets, grad_output, per_sample_weights, mode, optimizer,
                         float(lr), float(eps), state)
            return None
        _core().embedding_bag_backward(
            _np_inplace(weight, "weight"), _np(indices, "indices"), _np(offsets, "offsets"),
            _np(grad_output, "grad_output"),
            None if per_sample_weights is None else _np(per_sample_weights, "per_sample_weights"),
            mode, optimizer, float(lr), float(eps), None if state is None else _np_inplace(state, "state"))
        return None
    # torch reference backend: in-place on views of the caller's memory
    w = torch.from_numpy(_np_inplace(weight, "weight")) if isinstance(weight, np.ndarray) else weight
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"weight: expected a numpy array or torch tensor, got {type(weight).__name__}")
    idx, _ = as_tensor(indices, "indices")
    off, _ = as_tensor(offsets, "offsets")
    g, _ = as_tensor(grad_output, "grad_output")
    psw = None if per_sample_weights is None else as_tensor(per_sample_weights, "per_sample_weights")[0]
    st = None
    if state is not None:
        st = torch.from_numpy(_np_inplace(state, "state")) if isinstance(state, np.ndarray) else state
        if not isinstance(st, torch.Tensor):
            raise TypeError(f"state: expected a float32 array, got {getattr(st, 'dtype', type(st).__name__)}")
    # (the GPU launcher's checks too)
    idx, off = check_update_inputs(int(w.shape[0]), int(w.shape[1]), idx, off, g, psw, st)
    reference.embedding_bag_backward(w, idx, off, g, psw, mode, optimizer, float(lr), float(eps), st)
    return None
