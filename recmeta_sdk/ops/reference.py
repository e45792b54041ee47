"""Plain PyTorch reference of every recmeta operation.

This module is the *specification* of the operations: the C++ core, the Triton kernels
and the CUDA kernels must agree with it (up to floating-point summation order), and it
is the ``"torch"`` fallback backend. It is written for clarity, not speed, but it never
builds anything larger than one (B, N) score matrix.

All functions take torch tensors and return torch tensors; validation of user input
happens in :mod:`recmeta_sdk.ops` before any backend is called.

Table formats (see :func:`quantize`)
------------------------------------
* ``"fp32"``: a (N, d) float32 tensor.
* ``"fp16"``: a (N, d) float16 tensor.
* ``"int8"``: row-wise 8-bit quantisation as in FBGEMM: (N, d) uint8 codes ``q`` and per-row
  float32 ``row_scale`` and ``row_min`` with ``value = q * row_scale + row_min``.

Gumbel noise (see :func:`gumbel_noise`)
---------------------------------------
Policy sampling adds Gumbel noise that is a pure function of ``(seed, row, item)``, where
``row`` is the user's row in the batch and ``item`` the item id, computed with 32-bit
integer hashing only, so the CPU, Triton and CUDA backends draw bit-identical noise bits.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch

__all__ = [
    "QuantizedTable",
    "csr_offsets",
    "drop_padding",
    "inverse_frequency",
    "max_positions",
    "quantize",
    "dequantize",
    "embedding_bag",
    "embedding_bag_tbe",
    "embedding_bag_table_offsets",
    "embedding_bag_backward",
    "embedding_bag_backward_tbe",
    "embedding_bag_backward_table_offsets",
    "policy_topk",
    "policy_sample",
    "slate_probabilities",
    "gumbel_noise",
    "hash_uniform",
    "eligible_mask",
]

_M32 = 0xFFFFFFFF


@dataclass(frozen=True)
class QuantizedTable:
    """A table stored as float16 or row-wise int8 (see the module docstring).

    Attributes
    ----------
    dtype : {"fp16", "int8"}
    data : (N, d) float16 or uint8
    row_scale, row_min : (N,) float32 for ``"int8"``, None for ``"fp16"``
    """

    dtype: str
    data: object
    row_scale: object = None
    row_min: object = None

    @property
    def shape(self) -> Tuple[int, int]:
        return tuple(self.data.shape)  # type: ignore[return-value]

    @property
    def num_rows(self) -> int:
        return int(self.data.shape[0])

    @property
    def dim(self) -> int:
        return int(self.data.shape[1])


Table = Union[torch.Tensor, QuantizedTable]


def quantize(weight: torch.Tensor, dtype: str) -> QuantizedTable:
    """Quantise a float table.

    Parameters
    ----------
    weight : (N, d) float32
    dtype : {"fp16", "int8"}
        ``"int8"`` is row-wise asymmetric: ``row_min = min(row)``,
        ``row_scale = (max(row) - min(row)) / 255`` (1.0 for a constant row, so that the
        row is reproduced exactly), ``q = round((x - row_min) / row_scale)`` clamped to
        [0, 255] (round half to even).
    """
    w = weight.detach().to(torch.float32)
    if dtype == "fp16":
        return QuantizedTable("fp16", w.to(torch.float16).contiguous())
    if dtype == "int8":
        lo = w.min(dim=1).values if w.shape[1] > 0 else torch.zeros(w.shape[0])
        hi = w.max(dim=1).values if w.shape[1] > 0 else torch.zeros(w.shape[0])
        scale = (hi - lo) / 255.0
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round((w - lo[:, None]) / scale[:, None]).clamp_(0, 255).to(torch.uint8)
        return QuantizedTable("int8", q.contiguous(), scale.contiguous(), lo.contiguous())
    raise ValueError(f"quantize: dtype must be 'fp16' or 'int8', got {dtype!r}")


def dequantize(table: Table, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Float32 values of a table (optionally only of the given rows); a float64 table's values
    stay float64."""
    if isinstance(table, QuantizedTable):
        data = table.data if rows is None else table.data[rows]
        if table.dtype == "fp16":
            return data.to(torch.float32)
        scale = table.row_scale if rows is None else table.row_scale[rows]
        rmin = table.row_min if rows is None else table.row_min[rows]
        return data.to(torch.float32) * scale[:, None] + rmin[:, None]
    data = table if rows is None else table[rows]
    return data.to(torch.float64 if data.dtype == torch.float64 else torch.float32)


def _bag_ids(offsets: torch.Tensor, nnz: int) -> torch.Tensor:
    """For each position of ``indices``, the bag it belongs to: (nnz,) int64."""
    counts = (offsets[1:] - offsets[:-1]).to(torch.int64)
    return torch.repeat_interleave(torch.arange(counts.numel()), counts, output_size=nnz)


def csr_offsets(offsets: torch.Tensor, nnz: int, include_last_offset: bool = True) -> torch.Tensor:
    """The (B+1,) CSR form of ``offsets``: as given with ``include_last_offset=True`` (recmeta's
    form), else torch's default form of B bag starts, to which ``nnz`` is appended."""
    if include_last_offset:
        return offsets
    return torch.cat([offsets, torch.full((1,), nnz, dtype=offsets.dtype, device=offsets.device)])


def drop_padding(indices: torch.Tensor, offsets: torch.Tensor, per_sample_weights: Optional[torch.Tensor],
                 padding_idx):
    """The bags with every position whose id equals ``padding_idx`` removed (torch's
    ``padding_idx``: such rows are skipped in the pooling, in mean's count and in the gradient).

    Parameters
    ----------
    indices : (nnz,) int; offsets : (B+1,) CSR offsets; per_sample_weights : (nnz,) or None
    padding_idx : a non-negative id, or a (nnz,) tensor of one per position (TBE: each table's)

    Returns
    -------
    (indices, offsets, per_sample_weights, keep): the kept positions' ids, the CSR offsets of
    the same bags over them (offsets' dtype), their weights, and the (nnz,) bool mask of kept
    positions. Indexing with the mask is differentiable in ``per_sample_weights``.
    """
    keep = indices != padding_idx
    before = torch.zeros(keep.numel() + 1, dtype=torch.int64, device=indices.device)
    torch.cumsum(keep.to(torch.int64), 0, out=before[1:])
    off = before[offsets.to(torch.int64)].to(offsets.dtype)
    psw = None if per_sample_weights is None else per_sample_weights[keep]
    return indices[keep], off, psw, keep


class _ScaleGrad(torch.autograd.Function):
    """Identity in the forward; multiplies the gradient of its (n, d) input by the (n,) scale."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.save_for_backward(scale)
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        (scale,) = ctx.saved_tensors
        return grad * scale.to(grad.dtype)[:, None], None


def inverse_frequency(indices: torch.Tensor) -> torch.Tensor:
    """(nnz,) float32: 1 / (the number of positions of ``indices`` holding the same id)."""
    if indices.numel() == 0:
        return torch.ones(0, dtype=torch.float32, device=indices.device)
    _, inv, counts = torch.unique(indices, return_inverse=True, return_counts=True)
    return 1.0 / counts.to(torch.float32)[inv]


def max_positions(rows: torch.Tensor, bag: torch.Tensor, num_bags: int) -> torch.Tensor:
    """(B, d) int64: for each bag and column, the first position (in the order of the indices)
    whose row holds the bag's maximum there; ``nnz`` for an empty bag.

    rows : (nnz, d) the bags' rows in position order; bag : (nnz,) int64 bag of each position.
    """
    nnz, d = rows.shape
    with torch.no_grad():
        where = bag.to(rows.device)[:, None].expand(nnz, d)
        best = torch.full((num_bags, d), float("-inf"), dtype=rows.dtype, device=rows.device)
        best = best.scatter_reduce(0, where, rows, "amax", include_self=True)
        pos = torch.arange(nnz, device=rows.device)[:, None].expand(nnz, d)
        cand = torch.where(rows == best[bag.to(rows.device)], pos, torch.full_like(pos, nnz))
        arg = torch.full((num_bags, d), nnz, dtype=torch.int64, device=rows.device)
        return arg.scatter_reduce(0, where, cand, "amin", include_self=True)


def embedding_bag(
    weight: Table,
    indices: torch.Tensor,
    offsets: torch.Tensor,
    per_sample_weights: Optional[torch.Tensor] = None,
    mode: str = "sum",
    padding_idx: Optional[int] = None,
    include_last_offset: bool = True,
    scale_grad_by_freq: bool = False,
) -> torch.Tensor:
    """Pooled lookup of bags of rows of one table.

    Parameters
    ----------
    weight : (N, d) float32 / float16 / bfloat16 / float64 tensor or QuantizedTable
    indices : (nnz,) int32 or int64, each in [0, N)
    offsets : (B+1,) int32 or int64, non-decreasing, offsets[0] == 0, offsets[B] == nnz
        Bag b is ``indices[offsets[b]:offsets[b+1]]`` (CSR); with ``include_last_offset=False``
        the (B,) bag starts of torch's default form (the last bag ends at nnz).
    per_sample_weights : (nnz,) float32, optional (not with ``"max"``)
    mode : {"sum", "mean", "max"}
        ``mean`` divides the (weighted) sum by the number of indices in the bag; ``max`` takes
        the column-wise maximum of the bag's rows, and its gradient goes, for each bag and
        column, to the first position of the bag holding that maximum (as torch on the CPU).
        An empty bag gives a zero row in every mode.
    padding_idx : int in [-N, N), optional
        Positions whose id is ``padding_idx`` (``N + padding_idx`` if negative) are skipped: not
        pooled, not counted by ``mean``, no gradient (see :func:`drop_padding`).
    include_last_offset : bool, the form of ``offsets`` (see above)
    scale_grad_by_freq : bool
        The gradient of each row is divided by the number of positions of ``indices`` (after
        padding is dropped) holding its id, as documented for torch (torch 2.13's CPU
        ``embedding_bag`` divides some rows by another id's count, pytorch#190063; its
        ``embedding`` and CUDA kernels divide as here). Not with ``"max"``.

    Returns
    -------
    (B, d) float32 (float64 for a float64 table). Differentiable with respect to a floating
    ``weight`` tensor and the per-sample weights.
    """
    offsets = csr_offsets(offsets, indices.numel(), include_last_offset)
    if padding_idx is not None:
        n = weight.shape[0]
        pad = padding_idx + n if padding_idx < 0 else padding_idx
        indices, offsets, per_sample_weights, _ = drop_padding(indices, offsets, per_sample_weights, pad)
    B = offsets.numel() - 1
    nnz = indices.numel()
    idx = indices.to(torch.int64)
    off = offsets.to(torch.int64)
    rows = dequantize(weight, idx)  # (nnz, d)
    if scale_grad_by_freq:
        if mode == "max":
            raise ValueError("scale_grad_by_freq: not supported with mode='max' (as in torch)")
        rows = _ScaleGrad.apply(rows, inverse_frequency(idx))
    if per_sample_weights is not None:
        if mode == "max":
            raise ValueError("per_sample_weights: not supported with mode='max' (as in torch)")
        rows = rows * per_sample_weights.to(rows.dtype)[:, None]
    bag = _bag_ids(off, nnz)
    if mode == "max":
        arg = max_positions(rows, bag, B)
        ext = torch.cat([rows, rows.new_zeros(1, rows.shape[1])])
        return ext.gather(0, arg)
    out = torch.zeros(B, rows.shape[1], dtype=rows.dtype, device=rows.device)
    out = out.index_add(0, bag.to(rows.device), rows)
    if mode == "mean":
        counts = (off[1:] - off[:-1]).clamp(min=1).to(rows.dtype).to(rows.device)
        out = out / counts[:, None]
    elif mode != "sum":
        raise ValueError(f"embedding_bag: mode must be 'sum', 'mean' or 'max', got {mode!r}")
    return out


def embedding_bag_tbe(
    weights: Sequence[Table],
    indices: torch.Tensor,
    offsets: torch.Tensor,
    per_sample_weights: Optional[torch.Tensor] = None,
    mode: str = "sum",
    padding_idx: Optional[int] = None,
    include_last_offset: bool = True,
    scale_grad_by_freq: bool = False,
) -> torch.Tensor:
    """Table-batched embedding bag (FBGEMM's TBE layout).

    Parameters
    ----------
    weights : list of T tables, table t of shape (N_t, d_t)
    indices : (nnz,) int32 or int64; row ids local to their table
    offsets : (T*B+1,) CSR offsets, table-major: bag ``t*B + b`` is sample b of table t
        (``(T*B,)`` bag starts with ``include_last_offset=False``)
    per_sample_weights : (nnz,) float32, optional
    mode : {"sum", "mean", "max"}
    padding_idx : int, optional, a local id applied to every table (``N_t + padding_idx`` if
        negative; in [-N_t, N_t) for each table)
    scale_grad_by_freq : bool, frequencies counted within each table

    Returns
    -------
    (B, sum_t d_t) float32: the T pooled vectors of each sample, concatenated in table order
    (see :func:`embedding_bag` for each option).
    """
    offsets = csr_offsets(offsets, indices.numel(), include_last_offset)
    T = len(weights)
    B = (offsets.numel() - 1) // T
    outs = []
    for t, w in enumerate(weights):
        lo, hi = int(offsets[t * B]), int(offsets[(t + 1) * B])
        off = offsets[t * B : (t + 1) * B + 1].to(torch.int64) - lo
        psw = None if per_sample_weights is None else per_sample_weights[lo:hi]
        outs.append(embedding_bag(w, indices[lo:hi], off, psw, mode, padding_idx=padding_idx,
                                  scale_grad_by_freq=scale_grad_by_freq))
    return torch.cat(outs, dim=1)


def _global_ids(indices: torch.Tensor, offsets: torch.Tensor, table_offsets: torch.Tensor) -> torch.Tensor:
    """Row ids of the one-table TBE form in the whole table: id + table_offsets[t] for the
    indices of table t (bags t*B .. (t+1)*B - 1)."""
    T = table_offsets.numel() - 1
    off = offsets.to(torch.int64)
    B = (off.numel() - 1) // T
    idx = indices.to(torch.int64)
    per_table = off[torch.arange(1, T + 1) * B] - off[torch.arange(T) * B]
    table = torch.repeat_interleave(torch.arange(T), per_table, output_size=idx.numel())
    return idx + table_offsets.to(torch.int64)[table]


def embedding_bag_table_offsets(
    weight: Table,
    table_offsets: torch.Tensor,
    indices: torch.Tensor,
    offsets: torch.Tensor,
    per_sample_weights: Optional[torch.Tensor] = None,
    mode: str = "sum",
    scale_grad_by_freq: bool = False,
) -> torch.Tensor:
    """Table-batched embedding bag over one table holding T tables' rows (FBGEMM's
    ``hash_size_cumsum`` form).

    Parameters
    ----------
    weight : (sum_t N_t, d) float32 tensor or QuantizedTable; table t is rows
        ``table_offsets[t] .. table_offsets[t+1]-1``
    table_offsets : (T+1,) int, cumulative row offsets (table_offsets[0] == 0,
        table_offsets[T] == rows of weight)
    indices : (nnz,) int32 or int64, row ids local to their table (in [0, N_t))
    offsets : (T*B+1,) CSR offsets, table-major as in :func:`embedding_bag_tbe`
    per_sample_weights : (nnz,) float32, optional
    mode : {"sum", "mean", "max"}
    scale_grad_by_freq : bool (the tables' row ranges are disjoint: a global id's frequency is
        its local id's within its table)

    Returns
    -------
    (B, T*d) float32, equal to ``embedding_bag_tbe`` over the T row ranges.
    """
    T = table_offsets.numel() - 1
    B = (offsets.numel() - 1) // T
    # One embedding bag over the whole table with global ids: bag t*B+b -> row t*B+b ...
    pooled = embedding_bag(weight, _global_ids(indices, offsets, table_offsets), offsets, per_sample_weights, mode,
                           scale_grad_by_freq=scale_grad_by_freq)
    d = pooled.shape[1]
    # ... then (T, B, d) -> (B, T*d).
    return pooled.reshape(T, B, d).permute(1, 0, 2).reshape(B, T * d)


def embedding_bag_backward(
    weight: torch.Tensor,
    indices: torch.Tensor,
    offsets: torch.Tensor,
    grad_output: torch.Tensor,
    per_sample_weights: Optional[torch.Tensor] = None,
    mode: str = "sum",
    optimizer: str = "sgd",
    lr: float = 0.01,
    eps: float = 1e-8,
    state: Optional[torch.Tensor] = None,
) -> None:
    """Backward of :func:`embedding_bag` fused with a sparse optimiser step, in place.

    The gradient of row r is ``g_r = sum over occurrences i of r of c_i * grad_output[bag(i)]``
    with ``c_i = per_sample_weights[i]`` (1 without weights) divided by the bag's size for
    ``mean``. Occurrences are summed in the order they appear in ``indices``.

    * ``"sgd"``: ``w_r -= lr * g_r``.
    * ``"rowwise_adagrad"`` (FBGEMM's): ``state_r += mean(g_r ** 2)``;
      ``w_r -= lr * g_r / (sqrt(state_r) + eps)``. ``state`` is (N,) float32.

    Only rows that occur in ``indices`` change.
    """
    nnz = indices.numel()
    idx = indices.to(torch.int64)
    off = offsets.to(torch.int64)
    bag = _bag_ids(off, nnz)
    coef = torch.ones(nnz, dtype=torch.float32)
    if per_sample_weights is not None:
        coef = per_sample_weights.to(torch.float32).clone()
    if mode == "mean":
        counts = (off[1:] - off[:-1]).clamp(min=1).to(torch.float32)
        coef = coef / counts[bag]
    contrib = grad_output.to(torch.float32)[bag] * coef[:, None]  # (nnz, d)
    uniq, inv = torch.unique(idx, sorted=True, return_inverse=True)
    grad = torch.zeros(uniq.numel(), weight.shape[1], dtype=torch.float32)
    grad.index_add_(0, inv, contrib)
    with torch.no_grad():
        if optimizer == "sgd":
            weight[uniq] -= lr * grad
        elif optimizer == "rowwise_adagrad":
            if state is None:
                raise ValueError("embedding_bag_backward: rowwise_adagrad needs state")
            st = state[uniq] + (grad * grad).mean(dim=1)
            state[uniq] = st
            weight[uniq] -= lr * grad / (torch.sqrt(st)[:, None] + eps)
        else:
            raise ValueError(
                f"embedding_bag_backward: optimizer must be 'sgd' or 'rowwise_adagrad', got {optimizer!r}"
            )


def embedding_bag_backward_tbe(
    weights: Sequence[torch.Tensor],
    indices: torch.Tensor,
    offsets: torch.Tensor,
    grad_output: torch.Tensor,
    per_sample_weights: Optional[torch.Tensor] = None,
    mode: str = "sum",
    optimizer: str = "sgd",
    lr: float = 0.01,
    eps: float = 1e-8,
    states: Optional[Sequence[torch.Tensor]] = None,
) -> None:
    """Backward of :func:`embedding_bag_tbe` fused with a sparse optimiser step, in place:
    table t is updated by :func:`embedding_bag_backward` with its bags (``t*B .. (t+1)*B - 1``,
    rebased), its columns of ``grad_output`` and its own state ``states[t]``."""
    T = len(weights)
    B = (offsets.numel() - 1) // T
    col = 0
    for t, w in enumerate(weights):
        lo, hi = int(offsets[t * B]), int(offsets[(t + 1) * B])
        off = offsets[t * B : (t + 1) * B + 1].to(torch.int64) - lo
        d = int(w.shape[1])
        psw = None if per_sample_weights is None else per_sample_weights[lo:hi]
        embedding_bag_backward(w, indices[lo:hi], off, grad_output[:, col:col + d], psw, mode, optimizer, lr, eps,
                               None if states is None else states[t])
        col += d


def embedding_bag_backward_table_offsets(
    weight: torch.Tensor,
    table_offsets: torch.Tensor,
    indices: torch.Tensor,
    offsets: torch.Tensor,
    grad_output: torch.Tensor,
    per_sample_weights: Optional[torch.Tensor] = None,
    mode: str = "sum",
    optimizer: str = "sgd",
    lr: float = 0.01,
    eps: float = 1e-8,
    state: Optional[torch.Tensor] = None,
) -> None:
    """Backward of :func:`embedding_bag_table_offsets` fused with a sparse optimiser step, in
    place. ``grad_output`` is (B, T*d); ``state`` (sum_t N_t,) holds every table's row-wise
    Adagrad state. The tables' row ranges are disjoint, so this is one
    :func:`embedding_bag_backward` over the whole table with global ids and the T*B bags' output
    gradients (bag t*B+b gets ``grad_output[b, t*d:(t+1)*d]``)."""
    T = table_offsets.numel() - 1
    B = (offsets.numel() - 1) // T
    d = int(weight.shape[1])
    g = grad_output.to(torch.float32).reshape(B, T, d).permute(1, 0, 2).reshape(T * B, d)
    embedding_bag_backward(weight, _global_ids(indices, offsets, table_offsets), offsets, g, per_sample_weights,
                           mode, optimizer, lr, eps, state)


def eligible_mask(
    batch: int,
    num_items: int,
    exclude: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    candidates: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
) -> torch.Tensor:
    """(B, N) bool: the items each user may receive.

    With ``candidates`` only the listed ids (duplicates count once) are eligible, else all
    items; ids listed in ``exclude`` are then removed. Both are ``(offsets, ids)`` CSR pairs
    with B+1 offsets.
    """
    if candidates is not None:
        off, ids = candidates
        mask = torch.zeros(batch, num_items, dtype=torch.bool)
        rows = _bag_ids(off.to(torch.int64), ids.numel())
        mask[rows, ids.to(torch.int64)] = True
    else:
        mask = torch.ones(batch, num_items, dtype=torch.bool)
    if exclude is not None:
        off, ids = exclude
        rows = _bag_ids(off.to(torch.int64), ids.numel())
        mask[rows, ids.to(torch.int64)] = False
    return mask


def _scores(user_states, items, bias, temperature) -> torch.Tensor:
    s = user_states.to(torch.float32) @ dequantize(items).T
    if bias is not None:
        s = s + bias.to(torch.float32)[None, :]
    return s / float(temperature)


def _masked_topk(values: torch.Tensor, mask: torch.Tensor, k: int):
    """Top-k of ``values`` over ``mask`` with (-1, -inf) padding; returns ids and values.

    Order (every backend's): value descending, then id ascending among equal values. ``k``
    is the number of output columns (callers cap it at N)."""
    B, N = values.shape
    v = values.masked_fill(~mask, float("-inf"))
    kk = min(k, N)
    ids = torch.full((B, k), -1, dtype=torch.int64)
    out_v = torch.full((B, k), float("-inf"), dtype=torch.float32)
    if kk == 0 or B == 0:
        return ids, out_v
    # torch.topk breaks ties in no documented order: take every value above the k-th one,
    # and of the values equal to it the ones with the smallest ids, then sort the kk chosen
    # (stable, so equal values stay in id order).
    kth = torch.topk(v, kk, dim=1, sorted=True).values[:, -1:]
    above = v > kth
    tie = v == kth
    need = kk - above.sum(dim=1, keepdim=True)
    chosen = above | (tie & (torch.cumsum(tie.to(torch.int64), dim=1) <= need))
    sel = torch.nonzero(chosen)[:, 1].reshape(B, kk)  # ids ascending in each row
    sel_v = torch.gather(v, 1, sel)
    order = torch.sort(sel_v, dim=1, descending=True, stable=True).indices
    top_i = torch.gather(sel, 1, order)
    top_v = torch.gather(sel_v, 1, order)
    valid = torch.gather(mask, 1, top_i)
    ids[:, :kk] = torch.where(valid, top_i, torch.full_like(top_i, -1))
    out_v[:, :kk] = torch.where(valid, top_v, torch.full_like(top_v, float("-inf")))
    return ids, out_v


def item_error(items: Table, row: int) -> ValueError:
    """The error for item ``row`` whose score is not finite (the compiled core's message): a
    non-finite value in the row (int8: a non-finite row_scale / row_min), or finite values
    whose score overflows float32."""
    if isinstance(items, QuantizedTable) and items.dtype == "int8":
        scale_min = torch.as_tensor([float(items.row_scale[row]), float(items.row_min[row])])
        if not bool(torch.isfinite(scale_min).all()):
            return ValueError(f"items: non-finite row_scale/row_min at row {row}")
    vals = dequantize(items, torch.tensor([row]))[0]
    bad = torch.nonzero(~torch.isfinite(vals))
    if bad.numel():
        c = int(bad[0, 0])
        return ValueError(f"items: non-finite value {float(vals[c])} at row {row}, column {c}")
    return ValueError(
        f"policy scores overflow float32 at item row {row}: (user_states . items[{row}] + bias) / "
        f"temperature is not finite although every input is; scale the user states, items or bias "
        f"down (or raise the temperature)")


def _screened_mask(s: torch.Tensor, items: Table, bias, mask: torch.Tensor, candidates) -> torch.Tensor:
    """Check the scores as the compiled core does while it reads them and return the mask
    of the items that can be returned.

    A score of -inf is an item masked by a -inf bias when its bias is -inf; any other
    non-finite score (NaN / inf item values, or an overflow of float32) raises ValueError
    naming the smallest such item row, over the rows the core reads: every row without
    ``candidates``, the eligible ones with them."""
    bad = ~torch.isfinite(s)
    if bias is not None:
        bad &= ~((s == float("-inf")) & (bias == float("-inf"))[None, :])
    if candidates is not None:
        bad &= mask
    if bool(bad.any()):
        raise item_error(items, int(torch.nonzero(bad.any(dim=0))[0, 0]))
    return mask & (s > float("-inf"))


def policy_topk(
    user_states: torch.Tensor,
    items: Table,
    k: int,
    bias: Optional[torch.Tensor] = None,
    exclude: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    candidates: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    temperature: float = 1.0,
):
    """Top-k of the policy scores ``s = (U @ I.T + b) / temperature`` over eligible items.

    Parameters
    ----------
    user_states : (B, d) float32
    items : (N, d) float32 tensor or QuantizedTable
    k : int >= 0
    bias : (N,) float32, optional
    exclude, candidates : (offsets (B+1,), ids) CSR pairs, optional (see :func:`eligible_mask`)
    temperature : float > 0

    Returns
    -------
    ids : (B, min(k, N)) int64, best first (score descending, then id ascending among equal
        scores); -1 where fewer items are eligible. ``k`` above N is capped at N columns.
    scores : (B, min(k, N)) float32; -inf in padded slots
    log_normalizer : (B,) float32, ``logsumexp`` of s over the eligible items (-inf if none),
        so that ``pi(a|s) = exp(score - log_normalizer)``.

    An item whose bias is -inf is masked (never returned, no mass). A NaN / inf item value
    in a row read (every row; with ``candidates``, the eligible ones), or a score that
    overflows float32, raises ValueError naming the row (:func:`item_error`).
    """
    B = user_states.shape[0]
    N = items.shape[0]
    s = _scores(user_states, items, bias, temperature)
    mask = _screened_mask(s, items, bias, eligible_mask(B, N, exclude, candidates), candidates)
    ids, scores = _masked_topk(s, mask, min(k, N))
    lognorm = torch.logsumexp(s.masked_fill(~mask, float("-inf")), dim=1)
    return ids, scores, lognorm.to(torch.float32)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 integer finaliser on uint32 values held in int64 tensors."""
    x = x & _M32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    x = x ^ (x >> 16)
    return x


def hash_uniform(seed: int, rows: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """Counter-based uniforms in (0, 1), a pure function of (seed, row, item).

    With 32-bit unsigned arithmetic (wrap-around)::

        key = mix32(seed_lo ^ mix32(seed_hi + 0x9E3779B9))
        h   = mix32(key ^ mix32(row + 0x85EBCA6B))
        h   = mix32(h ^ item_lo)
        h   = mix32(h ^ mix32(item_hi + 0xC2B2AE35))
        u   = ((h >> 9) + 0.5) * 2**-23                      # exact in float32

    where ``seed`` is taken modulo 2**64 and ``item`` is a non-negative int64. (23 bits:
    with 24, ``(h >> 8) + 0.5`` needs 25 significant bits, so the top values round to
    u = 1.0 in float32 and the Gumbel noise becomes +inf.) u lies in [2**-24, 1 - 2**-24].
    ``rows`` and ``items`` broadcast against each other; returns float32.
    """
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    s_lo, s_hi = seed & _M32, seed >> 32
    key = int(_mix32(torch.tensor(s_lo ^ int(_mix32(torch.tensor(s_hi + 0x9E3779B9))))))
    r = rows.to(torch.int64)
    it = items.to(torch.int64)
    h = _mix32(key ^ _mix32(r + 0x85EBCA6B))
    h = _mix32(h ^ (it & _M32))
    h = _mix32(h ^ _mix32((it >> 32) + 0xC2B2AE35))
    return (((h >> 9).to(torch.float64) + 0.5) * (2.0 ** -23)).to(torch.float32)


def gumbel_noise(seed: int, rows: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise ``-log(-log(u))`` from :func:`hash_uniform`, float32."""
    u = hash_uniform(seed, rows, items)
    return -torch.log(-torch.log(u))


def policy_sample(
    user_states: torch.Tensor,
    items: Table,
    k: int,
    seed: int,
    bias: Optional[torch.Tensor] = None,
    exclude: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    candidates: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    temperature: float = 1.0,
):
    """Draw k distinct items per user from the softmax policy (Gumbel-top-k).

    The slate is the top-k of ``s + G`` over eligible items, with ``G`` from
    :func:`gumbel_noise` keyed by (seed, row in the batch, item id); this is exactly a
    sequential draw without replacement from ``softmax(s)`` (Plackett-Luce).

    Returns
    -------
    ids : (B, min(k, N)) int64 (-1 padding), in draw order (perturbed score descending, then
        id ascending among equal perturbed scores)
    scores : (B, min(k, N)) float32, the unperturbed policy scores s of the drawn items
        (-inf padding)
    propensities : (B, min(k, N)) float32, ``pi(a|s) = exp(s_a - logZ)`` of each drawn item
        (0 padding)
    slate_log_prob : (B,) float32, Plackett-Luce log-probability of the ranked slate of valid
        items: ``sum_j [s_j - log(Z - sum_{i<j} exp(s_i))]`` (0.0 for an empty slate),
        computed in float64 from the mass outside the slate (see :func:`slate_probabilities`)

    Masking (-inf bias), non-finite rows and overflow as in :func:`policy_topk`.
    """
    B = user_states.shape[0]
    N = items.shape[0]
    s = _scores(user_states, items, bias, temperature)
    mask = _screened_mask(s, items, bias, eligible_mask(B, N, exclude, candidates), candidates)
    rows = torch.arange(B)[:, None]
    cols = torch.arange(N)[None, :]
    perturbed = s + gumbel_noise(seed, rows, cols)
    ids, _ = _masked_topk(perturbed, mask, min(k, N))
    valid = ids >= 0
    safe = ids.clamp(min=0)
    sc = torch.gather(s, 1, safe).masked_fill(~valid, float("-inf"))
    drawn = torch.zeros_like(mask)
    drawn[rows.expand_as(ids)[valid], ids[valid]] = True
    tail = mask & ~drawn  # the eligible items not drawn
    logtail = torch.logsumexp(s.to(torch.float64).masked_fill(~tail, float("-inf")), dim=1)
    return (ids, sc) + slate_probabilities(sc, valid, logtail)


def slate_probabilities(sc: torch.Tensor, valid: torch.Tensor, logtail: torch.Tensor):
    """Per-item propensities and the Plackett-Luce slate log-probability, in float64.

    ``sc`` (B, k) are the drawn items' scores (valid ones first), ``logtail`` (B,) the log of
    the mass of the eligible items *not* drawn, summed directly (never Z minus the slate's
    mass, which cancels when the slate holds nearly all of it). The mass left before
    position j is the tail plus the drawn items from j on, a sum of positive terms:
    ``log p = sum_j [s_j - logsumexp(s_j, ..., s_{k-1}, logtail)]``, exact in float64 for
    every slate; the propensities are ``exp(s_j - logZ)`` with ``logZ`` that sum at j = 0."""
    x = torch.cat([sc.to(torch.float64).masked_fill(~valid, float("-inf")),
                   logtail.to(torch.float64)[:, None]], dim=1)
    suffix = torch.logcumsumexp(x.flip(1), dim=1).flip(1)  # suffix[:, j] = logsumexp(x[:, j:])
    k = sc.shape[1]
    logp = x[:, :k] - suffix[:, :1]
    p = torch.where(valid, torch.exp(logp), torch.zeros_like(logp))
    terms = torch.where(valid, x[:, :k] - suffix[:, :k], torch.zeros_like(logp))
    return p.to(torch.float32), terms.sum(dim=1).to(torch.float32)


def logtail_from_lognorm(sc: torch.Tensor, valid: torch.Tensor, lognorm: torch.Tensor,
                         exact=None) -> torch.Tensor:
    """(B,) float64 log of the mass outside the slate, ``log(Z - sum_j exp(s_j))``, for the
    backends whose kernels return only the float32 log-normaliser (Triton, CUDA).

    Where the slate holds more than 1 - 2**-8 of Z the difference has lost most of the
    float32 ``lognorm``'s bits; those rows are recomputed by ``exact(rows) -> (len(rows),)``
    float64 (a direct sum over the tail items) when given."""
    lz = lognorm.to(torch.float64)
    ls = torch.logsumexp(sc.to(torch.float64).masked_fill(~valid, float("-inf")), dim=1)
    frac = torch.exp(ls - lz).nan_to_num(0.0)  # slate share of Z (0 for an empty slate)
    tail = torch.where(frac < 1.0, lz + torch.log1p(-frac.clamp(max=1.0)), torch.full_like(lz, float("-inf")))
    tail = torch.where(torch.isneginf(lz), lz, tail)
    bad = (frac > 1.0 - 2.0 ** -8) & torch.isfinite(lz)
    if exact is not None and bool(bad.any()):
        rows = torch.nonzero(bad)[:, 0]
        tail = tail.clone()
        tail[rows] = exact(rows).to(tail.device, torch.float64)
    return tail
