"""Input conversion and validation shared by every operation in :mod:`recmeta_sdk.ops`.

Every check here is real code (never ``assert``) and runs before any native call, so that
no input can make a backend read or write outside its buffers. Errors name the argument
and the bad value.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch

from . import reference
from .reference import QuantizedTable

__all__ = [
    "as_tensor",
    "check_ids",
    "check_offsets",
    "check_csr",
    "check_float",
    "as_table",
    "quantize",
    "to_kind",
]

_INT_DTYPES = (torch.int32, torch.int64)


def as_tensor(x, name: str) -> Tuple[torch.Tensor, str]:
    """A torch tensor view of ``x`` (numpy arrays without copying) and the input kind.

    Returns
    -------
    (tensor, kind) with kind ``"numpy"`` or ``"torch"``.
    """
    if isinstance(x, torch.Tensor):
        return x, "torch"
    if isinstance(x, np.ndarray):
        if x.dtype == np.float64:
            raise TypeError(f"{name}: float64 arrays are not accepted (use float32), got dtype {x.dtype}")
        if not x.flags.writeable:
            x = x.copy()
        return torch.from_numpy(np.ascontiguousarray(x)), "numpy"
    raise TypeError(f"{name}: expected a numpy array or torch tensor, got {type(x).__name__}")


def to_kind(kind: str, *tensors):
    """Return tensors as numpy arrays when the caller passed numpy, else unchanged."""
    if kind == "numpy":
        out = tuple(t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else t for t in tensors)
    else:
        out = tensors
    return out[0] if len(out) == 1 else out


def check_ids(t: torch.Tensor, name: str, n: int) -> torch.Tensor:
    """Check a 1-D int32/int64 id array with every id in [0, n); returns it contiguous."""
    if t.dtype not in _INT_DTYPES:
        raise TypeError(f"{name}: ids must be int32 or int64, got {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"{name}: expected a 1-D array, got shape {tuple(t.shape)}")
    if t.numel():
        bad = (t < 0) | (t >= n)
        if bool(bad.any()):
            pos = int(torch.nonzero(bad)[0, 0])
            raise ValueError(
                f"{name}: id {int(t[pos])} at position {pos} is out of range [0, {n})"
            )
    return t.contiguous()


def check_offsets(t: torch.Tensor, name: str, nnz: int, num_bags: Optional[int] = None) -> torch.Tensor:
    """Check CSR offsets: 1-D int, offsets[0] == 0, non-decreasing, offsets[-1] == nnz."""
    if t.dtype not in _INT_DTYPES:
        raise TypeError(f"{name}: offsets must be int32 or int64, got {t.dtype}")
    if t.dim() != 1 or t.numel() < 1:
        raise ValueError(f"{name}: expected a 1-D array of B+1 >= 1 offsets, got shape {tuple(t.shape)}")
    if num_bags is not None and t.numel() != num_bags + 1:
        raise ValueError(f"{name}: expected {num_bags + 1} offsets (B+1), got {t.numel()}")
    if int(t[0]) != 0:
        raise ValueError(f"{name}: offsets[0] must be 0, got {int(t[0])}")
    if t.numel() > 1:
        d = t[1:] - t[:-1]
        if bool((d < 0).any()):
            pos = int(torch.nonzero(d < 0)[0, 0])
            raise ValueError(
                f"{name}: offsets decrease at position {pos + 1} ({int(t[pos])} -> {int(t[pos + 1])})"
            )
    if int(t[-1]) != nnz:
        raise ValueError(f"{name}: offsets[-1] must equal the number of indices {nnz}, got {int(t[-1])}")
    return t.contiguous()


def check_csr(pair, name: str, batch: int, n: int) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """Check an ``(offsets, ids)`` pair with B+1 offsets and ids in [0, n)."""
    if pair is None:
        return None
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise TypeError(f"{name}: expected an (offsets, ids) pair, got {type(pair).__name__}")
    off, _ = as_tensor(pair[0], f"{name} offsets")
    ids, _ = as_tensor(pair[1], f"{name} ids")
    ids = check_ids(ids, f"{name} ids", n)
    off = check_offsets(off, f"{name} offsets", ids.numel(), batch)
    return off, ids


def check_float(t: torch.Tensor, name: str, shape: Sequence[Optional[int]], finite: bool = True) -> torch.Tensor:
    """Check a floating tensor's shape (None = any size) and that it holds no NaN/inf."""
    if not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point array, got {t.dtype}")
    if t.dim() != len(shape) or any(s is not None and s != a for s, a in zip(shape, t.shape)):
        want = tuple("?" if s is None else s for s in shape)
        raise ValueError(f"{name}: expected shape {want}, got {tuple(t.shape)}")
    if finite and t.numel() and not bool(torch.isfinite(t).all()):
        pos = int(torch.nonzero(~torch.isfinite(t.reshape(-1)))[0, 0])
        raise ValueError(f"{name}: non-finite value {float(t.reshape(-1)[pos])} at flat position {pos}")
    return t


def as_table(weight, name: str = "weight") -> Tuple[Union[torch.Tensor, QuantizedTable], str]:
    """Accept a (N, d) float32 array/tensor or a QuantizedTable; returns (table, kind)."""
    if isinstance(weight, QuantizedTable):
        return weight, "torch"
    t, kind = as_tensor(weight, name)
    if t.dtype == torch.float16:
        return QuantizedTable("fp16", t.contiguous()), kind
    if t.dtype != torch.float32:
        raise TypeError(f"{name}: tables must be float32 (or quantize() them), got {t.dtype}")
    if t.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D (N, d) table, got shape {tuple(t.shape)}")
    return t, kind


def quantize(weight: np.ndarray | torch.Tensor, dtype: str) -> QuantizedTable:
    """Quantise a float32 table to ``"fp16"`` or row-wise ``"int8"``.

    Parameters
    ----------
    weight : (N, d) float32 numpy array or torch tensor
    dtype : {"fp16", "int8"}

    Returns
    -------
    QuantizedTable, accepted wherever a float32 table is (``embedding_bag``,
    ``policy_topk``, ``policy_sample``). Its arrays are CPU torch tensors.
    """
    from . import reference

    t, _ = as_tensor(weight, "weight")
    if t.dtype != torch.float32:
        raise TypeError(f"quantize: weight must be float32, got {t.dtype}")
    if t.dim() != 2:
        raise ValueError(f"quantize: weight must be 2-D (N, d), got shape {tuple(t.shape)}")
    check_float(t, "weight", (None, None))
    q = reference.quantize(t, dtype)
    return QuantizedTable(q.dtype, *(None if a is None else _numpy_backed(a)
                                     for a in (q.data, q.row_scale, q.row_min)))


# Arrays of at least this many bytes are moved into numpy-allocated memory (below).
_NUMPY_BACKED_MIN_BYTES = 4 << 20


def _numpy_backed(a: torch.Tensor) -> torch.Tensor:
    """`a` in memory numpy allocated: numpy advises the kernel to back large arrays with
    transparent huge pages (madvise), which torch's allocator does not, and a table read
    from end to end (policy scoring) or at random rows (embedding bags) then needs far fewer
    page walks. Measured here at B = 1, 1M x 64 int8: 7.1 ms from torch memory, 6.5 ms from
    numpy memory (bench/bench_policy_topk.py). Small arrays are returned as they are."""
    if a.numel() * a.element_size() < _NUMPY_BACKED_MIN_BYTES:
        return a
    out = torch.from_numpy(np.empty(tuple(a.shape), dtype=_NP_DTYPES[a.dtype]))
    out.copy_(a)
    return out


_NP_DTYPES = {torch.float16: np.float16, torch.float32: np.float32, torch.uint8: np.uint8}


# ---------------------------------------------------------------------------------------------
# shared by the op modules and the GPU launchers (which must not import the op modules)
# ---------------------------------------------------------------------------------------------
_U64 = (1 << 64) - 1
_FLOAT_TABLES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def as_count(k, name: str = "k") -> int:
    """``k`` as an int: any integral (``int``, numpy integers), not a bool or a float
    (TypeError naming it), >= 0 (ValueError)."""
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, numbers.Integral):
        raise TypeError(f"{name} must be an integer (int or numpy integer), got {k!r} "
                        f"of type {type(k).__name__}")
    k = int(k)
    if k < 0:
        raise ValueError(f"{name} must be >= 0, got {k}")
    return k


def as_seed(seed) -> int:
    """``seed`` as an int in [0, 2**64): any integral, not a bool or a float (TypeError);
    outside that range a ValueError (seeds are not wrapped modulo 2**64)."""
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an integer (int or numpy integer), got {seed!r} "
                        f"of type {type(seed).__name__}")
    seed = int(seed)
    if not 0 <= seed <= _U64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    return seed


def _check_bias_finite(b) -> None:
    """The bias check for the backends that do not screen it themselves (torch, GPU): no
    NaN, no +inf (-inf masks an item). Fast path: a sum that is not NaN / +inf implies it."""
    if b is not None and b.numel():
        t = float(b.sum(dtype=torch.float64))
        if math.isnan(t) or t == math.inf:
            bad = torch.isnan(b) | (b == math.inf)
            pos = int(torch.nonzero(bad.reshape(-1))[0, 0])
            raise ValueError(f"bias: non-finite value {float(b.reshape(-1)[pos])} at position {pos} "
                             f"(-inf masks an item; NaN and +inf are refused)")


def _table_parts(w, name: str):
    """(data, row_scale, row_min) torch tensors of a table, for the custom op (empty scale/min
    for float tables)."""
    if isinstance(w, QuantizedTable):
        data = w.data if isinstance(w.data, torch.Tensor) else torch.from_numpy(np.asarray(w.data))
        if w.dtype == "int8":
            sc = w.row_scale if isinstance(w.row_scale, torch.Tensor) else torch.from_numpy(np.asarray(w.row_scale))
            mn = w.row_min if isinstance(w.row_min, torch.Tensor) else torch.from_numpy(np.asarray(w.row_min))
            return data, sc, mn
        return data, data.new_empty(0, dtype=torch.float32), data.new_empty(0, dtype=torch.float32)
    t = w if isinstance(w, torch.Tensor) else torch.from_numpy(np.asarray(w))
    if t.dtype not in _FLOAT_TABLES:
        raise TypeError(f"{name}: tables must be float32, float16, bfloat16 or float64 (or quantize() them), "
                        f"got {t.dtype}")
    e = t.new_empty(0, dtype=torch.float32)
    return t, e, e


def _parts_to_table(w: torch.Tensor, sc: torch.Tensor, mn: torch.Tensor):
    if w.dtype == torch.uint8:
        return QuantizedTable("int8", w, sc, mn)
    if w.dtype == torch.float16:
        return QuantizedTable("fp16", w)
    return w


def _nonfinite_row(tables, indices: torch.Tensor, offsets: torch.Tensor) -> None:
    """Raise the core's ValueError naming the first table row (in the order of the indices)
    that holds a NaN / inf (int8: a non-finite row_scale / row_min); return if none does."""
    T = len(tables)
    B = (offsets.numel() - 1) // T
    idx = indices.to(torch.int64)
    for t, tab in enumerate(tables):
        name = "weight" if T == 1 else f"weight[{t}]"
        lo, hi = int(offsets[t * B]), int(offsets[(t + 1) * B])
        ids = idx[lo:hi]
        if isinstance(tab, QuantizedTable) and tab.dtype == "int8":
            for part, vals in (("row_scale", tab.row_scale), ("row_min", tab.row_min)):
                v = torch.as_tensor(vals)[ids.to(torch.as_tensor(vals).device)]
                bad = ~torch.isfinite(v)
                if bool(bad.any()):
                    p = int(torch.nonzero(bad)[0, 0])
                    raise ValueError(f"{name}: row {int(ids[p])} has a non-finite {part} ({float(v[p])}), "
                                     f"read at position {lo + p} of indices")
            continue
        rows = reference.dequantize(tab, ids).detach()
        bad = ~torch.isfinite(rows)
        if bool(bad.any()):
            p, c = (int(x) for x in torch.nonzero(bad)[0])
            raise ValueError(f"{name}: row {int(ids[p])} holds a non-finite value ({float(rows[p, c])} at column {c}), "
                             f"read at position {lo + p} of indices")


# ---------------------------------------------------------------------------------------------
# argument checks shared by the CPU paths and the GPU launchers (one message per bad input)
# ---------------------------------------------------------------------------------------------
_DTYPE_KEYS = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
               torch.float64: "float64"}


def _dtype_key(w) -> str:
    if isinstance(w, torch.Tensor):
        return _DTYPE_KEYS.get(w.dtype, "float32")
    if isinstance(w, QuantizedTable):
        return "int8" if w.dtype == "int8" else "float16"
    dt = getattr(w, "dtype", None)
    if isinstance(dt, np.dtype) and dt.name in ("float16", "float64"):
        return dt.name
    return "float32"


def table_dtype(tables) -> str:
    """The dtype the backend table (:mod:`recmeta_sdk.ops.backends`) dispatches a call on: of
    one table (tensor, numpy array, QuantizedTable) or a list ("bfloat16" / "float64" when a
    table is, since only the reference reads them; else the first table's). Other dtypes
    dispatch as "float32" and are refused by the op's own checks, naming the argument."""
    if not isinstance(tables, (list, tuple)):
        return _dtype_key(tables)
    keys = [_dtype_key(w) for w in tables]
    for k in keys:
        if k == "bfloat16" or k == "float64":
            return k
    return keys[0] if keys else "float32"


def check_temperature(temperature) -> float:
    """A softmax temperature: a finite int or float > 0, not a bool (ValueError naming it)."""
    if isinstance(temperature, (bool, np.bool_)) or not (
            isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return float(temperature)


def check_policy_args(user_states, items, k, bias, exclude, candidates, temperature):
    """The argument checks of ``policy_topk`` / ``policy_sample`` on every backend (the CPU
    path and the GPU launchers): ``user_states`` (B, d) float32 and finite, ``items`` a
    float32 / float16 table or QuantizedTable of width d, ``k`` an integer >= 0 (capped at N),
    ``temperature`` (:func:`check_temperature`), ``bias`` (N,) float32 (its finiteness is the
    caller's: the compiled core screens it as it reads it, the other backends call
    :func:`_check_bias_finite`), ``exclude`` / ``candidates`` CSR pairs with B+1 offsets and ids
    in [0, N). Devices are the caller's to check.

    Returns ``(u, tab, b, exc, cand, kind, k)``: tensors, the input kind ("numpy" / "torch")
    of ``user_states``, and k capped at N."""
    u, kind = as_tensor(user_states, "user_states")
    tab, _ = as_table(items, "items")
    N, d = tab.shape
    if u.dtype != torch.float32:
        raise TypeError(f"user_states: expected float32, got {u.dtype}")
    check_float(u, "user_states", (None, d))
    k = min(as_count(k), N)  # at most N columns: k above the catalogue pads up to N
    check_temperature(temperature)
    b = None
    if bias is not None:
        b, _ = as_tensor(bias, "bias")
        if b.dtype != torch.float32:
            raise TypeError(f"bias: expected float32, got {b.dtype}")
        check_float(b, "bias", (N,), finite=False)
    B = u.shape[0]
    exc = check_csr(exclude, "exclude", B, N)
    cand = check_csr(candidates, "candidates", B, N)
    return u, tab, b, exc, cand, kind, k


def check_bags(tabs, idx: torch.Tensor, off: torch.Tensor, psw: Optional[torch.Tensor]) -> torch.Tensor:
    """The embedding bag's index checks on every path that does not leave them to the compiled
    core (the torch reference, the GPU launchers): CSR ``offsets`` over ``indices`` with T*B
    bags for the T tables ``tabs``, ``indices`` 1-D int32 / int64 with the ids of table t in
    [0, N_t) (the error names the position in the whole ``indices``, as the core does),
    ``per_sample_weights`` (nnz,) and finite. Returns the offsets, contiguous."""
    T = len(tabs)
    off = check_offsets(off, "offsets", idx.numel())
    if (off.numel() - 1) % T != 0:
        raise ValueError(f"offsets: {off.numel() - 1} bags is not a multiple of the {T} tables")
    B = (off.numel() - 1) // T
    if idx.dtype not in _INT_DTYPES:
        raise TypeError(f"indices: ids must be int32 or int64, got {idx.dtype}")
    if idx.dim() != 1:
        raise ValueError(f"indices: expected a 1-D array, got shape {tuple(idx.shape)}")
    bounds = off[torch.arange(T + 1, device=off.device) * B].tolist() if T > 1 else [0, idx.numel()]
    for t, tab in enumerate(tabs):
        lo, hi = int(bounds[t]), int(bounds[t + 1])
        n = tab.shape[0]
        ids = idx[lo:hi]
        bad = (ids < 0) | (ids >= n)
        if ids.numel() and bool(bad.any()):
            pos = int(torch.nonzero(bad)[0, 0])
            name = "indices" if T == 1 else f"indices of table {t}"
            # the position in the whole indices array, as the core reports it
            raise ValueError(f"{name}: id {int(ids[pos])} at position {lo + pos} is out of range [0, {n})")
    if psw is not None:
        check_float(psw, "per_sample_weights", (idx.numel(),))
    return off


def check_update_args(mode: str, optimizer: str, lr, eps) -> None:
    """The fused backward's options on every backend: ``mode`` "sum" / "mean", ``optimizer``
    "sgd" / "rowwise_adagrad", ``lr`` a finite number and ``eps`` a finite number >= 0 (neither
    a bool)."""
    if mode not in ("sum", "mean"):
        raise ValueError(f"embedding_bag_backward: mode must be 'sum' or 'mean', got {mode!r}")
    if optimizer not in ("sgd", "rowwise_adagrad"):
        raise ValueError(f"embedding_bag_backward: optimizer must be 'sgd' or 'rowwise_adagrad', got {optimizer!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr):
        raise ValueError(f"lr: must be a finite number, got {lr!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps: must be a finite number >= 0, got {eps!r}")


def check_update_inputs(n_rows: int, dim: int, idx: torch.Tensor, off: torch.Tensor, g: torch.Tensor,
                        psw: Optional[torch.Tensor], st: Optional[torch.Tensor]):
    """The one-table fused backward's inputs on the paths that do not leave them to the compiled
    core (the torch reference, the GPU launcher), for an (n_rows, dim) table: ids in range, CSR
    offsets, ``grad_output`` (B, dim) float32 and finite, ``per_sample_weights`` (nnz,) finite,
    the Adagrad ``state`` (n_rows,) float32 and finite. Returns (indices, offsets) contiguous."""
    idx = check_ids(idx, "indices", n_rows)
    off = check_offsets(off, "offsets", idx.numel())
    if g.dtype != torch.float32:
        raise TypeError(f"grad_output: expected float32, got {g.dtype}")
    check_float(g, "grad_output", (off.numel() - 1, dim))
    if psw is not None:
        check_float(psw, "per_sample_weights", (idx.numel(),))
    if st is not None:
        if st.dtype != torch.float32:
            raise TypeError(f"state: expected a float32 array, got {st.dtype}")
        check_float(st, "state", (n_rows,))
    return idx, off
