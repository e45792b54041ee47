"""Triton table-batched embedding bag: forward and backward fused with SGD / row-wise Adagrad.

Semantics: :func:`recmeta_sdk.ops.reference.embedding_bag_tbe` and
:func:`recmeta_sdk.ops.reference.embedding_bag_backward`. Inputs reach these launchers
validated (ids in range, offsets well formed: see :mod:`recmeta_sdk.ops._gpu`); the kernels
do no bounds checks on ids.

Kernels
-------
* ``_embedding_bag_fwd_kernel``: one program per (bag, column block); loops over the
  bag's indices ``BLOCK_N`` at a time, gathers the rows (float32 / float16 / row-wise
  int8, dequantised in registers), weights them and reduces. Empty bags give zeros.
* ``_embedding_bag_bwd_kernel`` (deterministic): one program per unique row; the host
  sorts the positions by row (stable), the program sums its row's contributions in a
  fixed order and applies the optimiser step. No float atomics: bit-identical results
  run to run.
* ``_embedding_bag_bwd_atomic_kernel`` (fast): one program per (bag, column block); for
  SGD it atomically adds ``-lr * c_i * grad_output[bag]`` into the table rows, for
  row-wise Adagrad into a (U, d) gradient buffer that ``_rowwise_adagrad_apply_kernel``
  then applies per unique row.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from ._common import backward_segments, bag_of_positions
from ._heuristics import bag_config, next_pow2

__all__ = ["embedding_bag_fwd", "embedding_bag_tbe_fwd", "embedding_bag_bwd"]

_KIND = {"fp32": 0, "fp16": 1, "int8": 2}


@triton.jit
def _embedding_bag_fwd_kernel(
    weight_ptr,  # (N, D) table rows: float32, float16 or uint8 codes
    scale_ptr,  # (N,) float32 row scales (IS_INT8), else any pointer (unused)
    rmin_ptr,  # (N,) float32 row minima (IS_INT8), else unused
    indices_ptr,  # (nnz,) int32/int64 row ids, positions addressed by the offsets
    offsets_ptr,  # (B+1,) int32/int64 CSR offsets of this table's bags into indices
    psw_ptr,  # (nnz,) float32 per-index weights (HAS_PSW), else unused
    out_ptr,  # (B, >= D) float32 output: this table's column block of the pooled rows
    D,  # embedding dim of this table
    stride_wn,  # elements between table rows
    stride_wd,  # elements between table columns
    stride_ob,  # elements between output rows
    IS_INT8: tl.constexpr,  # row-wise int8 table: value = code * scale[r] + rmin[r]
    HAS_PSW: tl.constexpr,  # multiply each row by its per-index weight
    MEAN: tl.constexpr,  # divide the bag's sum by its size (empty bag: stays 0)
    BLOCK_N: tl.constexpr,  # indices gathered per step
    BLOCK_D: tl.constexpr,  # columns per program
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    start = tl.load(offsets_ptr + pid_b).to(tl.int64)
    end = tl.load(offsets_ptr + pid_b + 1).to(tl.int64)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for i0 in range(start, end, BLOCK_N):
        pos = i0 + tl.arange(0, BLOCK_N)
        pmask = pos < end
        rows = tl.load(indices_ptr + pos, mask=pmask, other=0).to(tl.int64)
        m2 = pmask[:, None] & cmask[None, :]
        vals = tl.load(weight_ptr + rows[:, None] * stride_wn + cols[None, :] * stride_wd,
                       mask=m2, other=0).to(tl.float32)
        if IS_INT8:
            sc = tl.load(scale_ptr + rows, mask=pmask, other=0.0)
            mn = tl.load(rmin_ptr + rows, mask=pmask, other=0.0)
            vals = tl.where(m2, vals * sc[:, None] + mn[:, None], 0.0)
        if HAS_PSW:
            w = tl.load(psw_ptr + pos, mask=pmask, other=0.0)
            vals = vals * w[:, None]
        acc += tl.sum(vals, axis=0)
    if MEAN:
        cnt = tl.maximum(end - start, 1).to(tl.float32)
        acc = acc / cnt
    tl.store(out_ptr + pid_b * stride_ob + cols, acc, mask=cmask)


@triton.jit
def _embedding_bag_bwd_kernel(
    weight_ptr,  # (N, D) float32 table, updated in place
    state_ptr,  # (N,) float32 row-wise Adagrad state (ADAGRAD), updated in place
    grad_ptr,  # (B, D) float32 gradient of the pooled output
    sorted_pos_ptr,  # (nnz,) int64 positions of indices sorted by row, stable
    seg_ptr,  # (U+1,) int64 start of each unique row's run in sorted_pos
    uniq_ptr,  # (U,) int64 the unique rows
    bag_ptr,  # (nnz,) int64 bag of each position
    offsets_ptr,  # (B+1,) int32/int64 CSR offsets (bag sizes for MEAN)
    psw_ptr,  # (nnz,) float32 per-index weights (HAS_PSW)
    D,  # embedding dim
    lr,  # learning rate
    eps,  # Adagrad epsilon
    stride_wn,  # elements between table rows (columns contiguous)
    stride_gb,  # elements between grad_output rows (columns contiguous)
    HAS_PSW: tl.constexpr,
    MEAN: tl.constexpr,
    ADAGRAD: tl.constexpr,  # row-wise Adagrad, else SGD
    BLOCK_N: tl.constexpr,  # occurrences summed per step
    BLOCK_D: tl.constexpr,  # >= D: the whole row (Adagrad needs its mean square)
):
    u = tl.program_id(0).to(tl.int64)
    lo = tl.load(seg_ptr + u)
    hi = tl.load(seg_ptr + u + 1)
    row = tl.load(uniq_ptr + u)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for j0 in range(lo, hi, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        jm = j < hi
        pos = tl.load(sorted_pos_ptr + j, mask=jm, other=0)
        bag = tl.load(bag_ptr + pos, mask=jm, other=0)
        coef = tl.where(jm, 1.0, 0.0)
        if HAS_PSW:
            coef = tl.load(psw_ptr + pos, mask=jm, other=0.0)
        if MEAN:
            b0 = tl.load(offsets_ptr + bag, mask=jm, other=0).to(tl.int64)
            b1 = tl.load(offsets_ptr + bag + 1, mask=jm, other=1).to(tl.int64)
            coef = coef / tl.maximum(b1 - b0, 1).to(tl.float32)
        g = tl.load(grad_ptr + bag[:, None] * stride_gb + cols[None, :],
                    mask=jm[:, None] & cmask[None, :], other=0.0)
        acc += tl.sum(g * coef[:, None], axis=0)
    wp = weight_ptr + row * stride_wn + cols
    w = tl.load(wp, mask=cmask, other=0.0)
    if ADAGRAD:
        st = tl.load(state_ptr + row) + tl.sum(acc * acc, axis=0) / D
        tl.store(state_ptr + row, st)
        w = w - lr * acc / (tl.sqrt(st) + eps)
    else:
        w = w - lr * acc
    tl.store(wp, w, mask=cmask)


@triton.jit
def _embedding_bag_bwd_atomic_kernel(
    target_ptr,  # SGD: (N, D) float32 table; Adagrad: (U, D) float32 zeroed gradient buffer
    grad_ptr,  # (B, D) float32 gradient of the pooled output
    indices_ptr,  # (nnz,) int32/int64 row ids
    inverse_ptr,  # (nnz,) int64 unique-row slot of each position (ADAGRAD)
    offsets_ptr,  # (B+1,) int32/int64 CSR offsets
    psw_ptr,  # (nnz,) float32 per-index weights (HAS_PSW)
    D,  # embedding dim
    scale,  # -lr for SGD, 1.0 for the Adagrad gradient buffer
    stride_tn,  # elements between target rows
    stride_gb,  # elements between grad_output rows
    HAS_PSW: tl.constexpr,
    MEAN: tl.constexpr,
    ADAGRAD: tl.constexpr,
    BLOCK_N: tl.constexpr,  # indices per step
    BLOCK_D: tl.constexpr,  # columns per program
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    start = tl.load(offsets_ptr + pid_b).to(tl.int64)
    end = tl.load(offsets_ptr + pid_b + 1).to(tl.int64)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    g = tl.load(grad_ptr + pid_b * stride_gb + cols, mask=cmask, other=0.0) * scale
    if MEAN:
        g = g / tl.maximum(end - start, 1).to(tl.float32)
    for i0 in range(start, end, BLOCK_N):
        pos = i0 + tl.arange(0, BLOCK_N)
        pmask = pos < end
        if ADAGRAD:
            rows = tl.load(inverse_ptr + pos, mask=pmask, other=0)
        else:
            rows = tl.load(indices_ptr + pos, mask=pmask, other=0).to(tl.int64)
        coef = tl.where(pmask, 1.0, 0.0)
        if HAS_PSW:
            coef = tl.load(psw_ptr + pos, mask=pmask, other=0.0)
        tl.atomic_add(target_ptr + rows[:, None] * stride_tn + cols[None, :],
                      coef[:, None] * g[None, :], mask=pmask[:, None] & cmask[None, :])


@triton.jit
def _rowwise_adagrad_apply_kernel(
    weight_ptr,  # (N, D) float32 table, updated in place
    state_ptr,  # (N,) float32 Adagrad state, updated in place
    gbuf_ptr,  # (U, D) float32 summed row gradients
    uniq_ptr,  # (U,) int64 unique rows
    D, lr, eps,
    stride_wn,  # elements between table rows
    BLOCK_D: tl.constexpr,  # >= D
):
    u = tl.program_id(0).to(tl.int64)
    row = tl.load(uniq_ptr + u)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    g = tl.load(gbuf_ptr + u * D + cols, mask=cmask, other=0.0)
    st = tl.load(state_ptr + row) + tl.sum(g * g, axis=0) / D
    tl.store(state_ptr + row, st)
    wp = weight_ptr + row * stride_wn + cols
    w = tl.load(wp, mask=cmask, other=0.0)
    tl.store(wp, w - lr * g / (tl.sqrt(st) + eps), mask=cmask)


def _table_parts(table):
    """(kind, data, row_scale, row_min) of a float32 tensor or QuantizedTable."""
    if isinstance(table, torch.Tensor):
        return "fp32", table, table, table
    if table.dtype == "int8":
        return "int8", table.data, table.row_scale, table.row_min
    return "fp16", table.data, table.data, table.data


def embedding_bag_fwd(table, indices, offsets, out, per_sample_weights=None, mode: str = "sum",
                      block_n: int = 0, block_d: int = 0) -> torch.Tensor:
    """Pool ``B = offsets.numel() - 1`` bags of ``table`` rows into ``out`` (B, >= d) float32.

    ``out`` may be a column slice of a wider (B, D_total) tensor (TBE); ``table`` may be
    strided. ``block_n``/``block_d`` override the heuristics (tests).
    """
    kind, data, scale, rmin = _table_parts(table)
    B = offsets.numel() - 1
    D = data.shape[1]
    if B == 0 or D == 0:
        return out
    nnz = indices.numel()
    cfg = bag_config(D, nnz / max(B, 1))
    BN = block_n or cfg.BLOCK_N
    BD = block_d or cfg.BLOCK_D
    psw = per_sample_weights if per_sample_weights is not None else out
    grid = (B, triton.cdiv(D, BD))
    _embedding_bag_fwd_kernel[grid](
        data, scale, rmin, indices, offsets, psw, out, D,
        data.stride(0), data.stride(1), out.stride(0),
        IS_INT8=kind == "int8", HAS_PSW=per_sample_weights is not None, MEAN=mode == "mean",
        BLOCK_N=BN, BLOCK_D=BD, num_warps=cfg.num_warps,
    )
    return out


def embedding_bag_tbe_fwd(tables: Sequence, indices, offsets, per_sample_weights=None,
                          mode: str = "sum", block_n: int = 0, block_d: int = 0) -> torch.Tensor:
    """Table-batched forward: T tables, ``(T*B+1,)`` table-major offsets → (B, sum d_t)."""
    T = len(tables)
    B = (offsets.numel() - 1) // T
    dims = [int(_table_parts(t)[1].shape[1]) for t in tables]
    out = torch.empty(B, sum(dims), dtype=torch.float32, device=indices.device)
    col = 0
    for t, tab in enumerate(tables):
        embedding_bag_fwd(tab, indices, offsets[t * B:(t + 1) * B + 1], out[:, col:col + dims[t]],
                          per_sample_weights, mode, block_n, block_d)
        col += dims[t]
    return out


def embedding_bag_bwd(weight: torch.Tensor, indices, offsets, grad_output,
                      per_sample_weights: Optional[torch.Tensor] = None, mode: str = "sum",
                      optimizer: str = "sgd", lr: float = 0.01, eps: float = 1e-8,
                      state: Optional[torch.Tensor] = None, deterministic: bool = True,
                      block_n: int = 0, block_d: int = 0) -> None:
    """Backward of the embedding bag fused with SGD / row-wise Adagrad, in place.

    ``weight``: (N, d) float32 with contiguous columns; ``grad_output``: (B, d) float32.
    ``deterministic=True`` sorts the positions by row and reduces each row in one
    program (no float atomics, bit-reproducible); ``False`` uses float atomics.
    """
    nnz = indices.numel()
    B = offsets.numel() - 1
    D = weight.shape[1]
    if nnz == 0 or D == 0:
        return
    if weight.stride(1) != 1:
        raise ValueError("embedding_bag_bwd: weight columns must be contiguous")
    g = grad_output.contiguous()
    adagrad = optimizer == "rowwise_adagrad"
    has_psw = per_sample_weights is not None
    psw = per_sample_weights if has_psw else g
    st = state if adagrad else weight
    full_d = next_pow2(D)
    if deterministic:
        sorted_pos, uniq, seg = backward_segments(indices)
        bag = bag_of_positions(offsets, nnz)
        _embedding_bag_bwd_kernel[(uniq.numel(),)](
            weight, st, g, sorted_pos, seg, uniq, bag, offsets, psw, D, float(lr), float(eps),
            weight.stride(0), g.stride(0),
            HAS_PSW=has_psw, MEAN=mode == "mean", ADAGRAD=adagrad,
            BLOCK_N=block_n or 8, BLOCK_D=full_d, num_warps=4 if full_d >= 256 else 2,
        )
        return
    cfg = bag_config(D, nnz / max(B, 1))
    BN = block_n or cfg.BLOCK_N
    BD = block_d or cfg.BLOCK_D
    grid = (B, triton.cdiv(D, BD))
    if not adagrad:
        _embedding_bag_bwd_atomic_kernel[grid](
            weight, g, indices, indices, offsets, psw, D, -float(lr), weight.stride(0), g.stride(0),
            HAS_PSW=has_psw, MEAN=mode == "mean", ADAGRAD=False, BLOCK_N=BN, BLOCK_D=BD,
            num_warps=cfg.num_warps,
        )
        return
    uniq, inverse = torch.unique(indices.to(torch.int64), return_inverse=True)
    gbuf = torch.zeros(uniq.numel(), D, dtype=torch.float32, device=weight.device)
    _embedding_bag_bwd_atomic_kernel[grid](
        gbuf, g, indices, inverse.contiguous(), offsets, psw, D, 1.0, D, g.stride(0),
        HAS_PSW=has_psw, MEAN=mode == "mean", ADAGRAD=True, BLOCK_N=BN, BLOCK_D=BD,
        num_warps=cfg.num_warps,
    )
    _rowwise_adagrad_apply_kernel[(uniq.numel(),)](
        weight, st, gbuf, uniq, D, float(lr), float(eps), weight.stride(0), BLOCK_D=full_d,
        num_warps=4 if full_d >= 256 else 2,
    )
