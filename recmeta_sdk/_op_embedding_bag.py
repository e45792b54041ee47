"""The embedding-bag operation: validation, backend dispatch.

(Initial version: torch backend only; the C++ backend and the torch custom op with
autograd are added by the compiled-core work.)
"""
from __future__ import annotations

from typing import Optional

import torch

from . import backends, reference
from ._ops_common import as_table, as_tensor, check_float, check_ids, check_offsets, to_kind
from .reference import QuantizedTable

__all__ = ["embedding_bag", "embedding_bag_backward"]


def embedding_bag(weight, indices, offsets, *, per_sample_weights=None, mode: str = "sum",
                  backend: Optional[str] = None):
    """Pooled lookup of bags of table rows (one table, or a list of tables: TBE).

    Parameters
    ----------
    weight : (N, d) float32 array/tensor, QuantizedTable, or a list of T such tables
    indices : (nnz,) int32 or int64
    offsets : (B+1,) CSR offsets (``(T*B+1,)`` table-major for a list of tables)
    per_sample_weights : (nnz,) float32, optional
    mode : {"sum", "mean"}
    backend : {"cpp", "torch"} or None

    Returns
    -------
    (B, d) float32 (``(B, sum d_t)`` for a list), numpy if the indices were numpy.
    """
    if mode not in ("sum", "mean"):
        raise ValueError(f"embedding_bag: mode must be 'sum' or 'mean', got {mode!r}")
    idx, kind = as_tensor(indices, "indices")
    off, _ = as_tensor(offsets, "offsets")
    tables = weight if isinstance(weight, (list, tuple)) else [weight]
    if not tables:
        raise ValueError("embedding_bag: the list of tables is empty")
    tabs = [as_table(w, f"weight[{t}]")[0] for t, w in enumerate(tables)]
    T = len(tabs)
    off = check_offsets(off, "offsets", idx.numel())
    if (off.numel() - 1) % T != 0:
        raise ValueError(f"offsets: {off.numel() - 1} bags is not a multiple of the {T} tables")
    B = (off.numel() - 1) // T
    if idx.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"indices: ids must be int32 or int64, got {idx.dtype}")
    for t, tab in enumerate(tabs):
        lo, hi = int(off[t * B]), int(off[(t + 1) * B])
        check_ids(idx[lo:hi], "indices" if T == 1 else f"indices of table {t}", tab.shape[0])
    psw = None
    if per_sample_weights is not None:
        psw, _ = as_tensor(per_sample_weights, "per_sample_weights")
        check_float(psw, "per_sample_weights", (idx.numel(),))
    backends.resolve(backend, "cpu" if idx.device.type == "cpu" else "cuda")
    if T == 1 and not isinstance(weight, (list, tuple)):
        out = reference.embedding_bag(tabs[0], idx, off, psw, mode)
    else:
        out = reference.embedding_bag_tbe(tabs, idx, off, psw, mode)
    return to_kind(kind, out)


def embedding_bag_backward(weight, indices, offsets, grad_output, *, per_sample_weights=None,
                           mode: str = "sum", optimizer: str = "sgd", lr: float = 0.01,
                           eps: float = 1e-8, state=None, backend: Optional[str] = None) -> None:
    """Backward of :func:`embedding_bag` fused with a sparse SGD / row-wise Adagrad step, in place."""
    w, _ = as_tensor(weight, "weight")
    idx, _ = as_tensor(indices, "indices")
    off, _ = as_tensor(offsets, "offsets")
    g, _ = as_tensor(grad_output, "grad_output")
    if w.dtype != torch.float32 or w.dim() != 2:
        raise TypeError(f"weight: the fused update needs a 2-D float32 table, got {w.dtype} {tuple(w.shape)}")
    check_ids(idx, "indices", w.shape[0])
    off = check_offsets(off, "offsets", idx.numel())
    check_float(g, "grad_output", (off.numel() - 1, w.shape[1]))
    psw = None
    if per_sample_weights is not None:
        psw, _ = as_tensor(per_sample_weights, "per_sample_weights")
        check_float(psw, "per_sample_weights", (idx.numel(),))
    st = None
    if state is not None:
        st, _ = as_tensor(state, "state")
        check_float(st, "state", (w.shape[0],))
    backends.resolve(backend, "cpu")
    reference.embedding_bag_backward(w, idx, off, g, psw, mode, optimizer, lr, eps, st)
