"""The one place that decides which backend runs an op: the table, availability, the choice.

A backend runs the operations of :mod:`recmeta_sdk.ops`:

* ``"cpp"``: the compiled core (``recmeta_sdk._core``), CPU tensors and numpy arrays.
* ``"torch"``: the plain PyTorch reference (:mod:`recmeta_sdk.ops.reference`), any device.
* ``"triton"`` / ``"cuda"``: GPU kernels (CUDA tensors), when built and a GPU is present.

**The table** maps (op, device, dtype) to the backends that can run that combination, in the
order the default prefers them, and says for each what actually runs (``runs``: a backend
asked for a combination its kernels do not cover runs the torch reference, e.g. ``"cpp"`` on
a bfloat16 table). :func:`table` lists it, ``recmeta env`` prints it. ``op`` is one of
:data:`OPS` (the public ops, with the variants that change which kernels exist: ``mode="max"``,
``scale_grad_by_freq``, ``table_offsets``, a list of tables in the backward), ``device`` one of
:data:`DEVICES`, ``dtype`` one of :data:`DTYPES` (the table's; ``"int8"`` is a row-wise int8
``QuantizedTable``).

**The choice** (:func:`select`), in order: the ``backend=`` argument of a call, the
``RECMETA_BACKEND`` environment variable (read here and nowhere else), then the first backend of
the combination's row that is available on this machine. An explicit choice that is not a
backend raises ``ValueError``, one that is not available here ``RuntimeError`` (saying why), one
that cannot run the combination :class:`BackendError` (a ``ValueError``) naming the op, the
device, the dtype and the backends that exist for it.
"""
from __future__ import annotations

import os
from typing import Dict, List, NamedTuple, Optional, Tuple

from . import _native

__all__ = ["available", "describe", "select", "table", "format_table", "resolve", "default_cpu",
           "env_override", "BackendError", "Entry", "BACKENDS", "OPS", "DEVICES", "DTYPES", "ENV_VAR"]

BACKENDS = ("cpp", "torch", "triton", "cuda")
#: the devices of the table: CPU data (numpy arrays, CPU tensors) and CUDA tensors
DEVICES = ("cpu", "cuda")
#: the table dtypes of the table ("int8": a row-wise int8 QuantizedTable; "float16" also an fp16 one)
DTYPES = ("float32", "float16", "int8", "bfloat16", "float64")
#: the ops of the table and what each covers
OPS: Dict[str, str] = {
    "embedding_bag": "ops.embedding_bag, mode 'sum' / 'mean', one table or a list",
    "embedding_bag_max": "ops.embedding_bag with mode='max'",
    "embedding_bag_freq": "ops.embedding_bag with scale_grad_by_freq=True",
    "embedding_bag_table_offsets": "ops.embedding_bag with table_offsets= (one table holding T tables)",
    "embedding_bag_backward": "ops.embedding_bag_backward, one table (the fused SGD / Adagrad update)",
    "embedding_bag_backward_tbe": "ops.embedding_bag_backward over a list of tables",
    "embedding_bag_backward_table_offsets": "ops.embedding_bag_backward with table_offsets=",
    "policy_topk": "ops.policy_topk (fused scoring, exclusion / candidates, top-k, log-normaliser)",
    "policy_sample": "ops.policy_sample (fused Gumbel-top-k sampling with propensities)",
}


class BackendError(ValueError):
    """No backend runs an (op, device, dtype) combination, or the one asked for cannot; the
    message names the op, the device, the dtype and the backends that exist for it."""


class Entry(NamedTuple):
    """One cell of the backend table: ``backend`` (asked for, or chosen by default) runs
    ``op`` on ``device`` data with a ``dtype`` table as ``runs`` (the implementation that
    executes), preferred as number ``rank`` (0 first) by the default choice."""

    op: str
    device: str
    dtype: str
    backend: str
    runs: str
    rank: int
    note: str


# ---------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------
_CORE = ("float32", "float16", "int8")  # what the compiled core, Triton and CUDA kernels read
_WIDE = ("bfloat16", "float64")  # tables only the torch reference reads
_REF_CPU = ("torch", "torch", "the torch reference")
_REF_DEV = ("torch", "torch", "the torch reference, on the tensors' device")
_REF_OP = "the torch reference, inside the recmeta::embedding_bag_forward custom op (autograd, torch.compile)"
_ROWS: Dict[Tuple[str, str, str], Tuple[Tuple[str, str, str], ...]] = {}


def _put(op: str, device: str, dtypes, *cells: Tuple[str, str, str]) -> None:
    for dtype in dtypes:
        _ROWS[(op, device, dtype)] = tuple(cells)


def _gpu_as_reference(why: str):
    return (("cuda", "torch", why), ("triton", "torch", why), _REF_DEV)


_put("embedding_bag", "cpu", _CORE, ("cpp", "cpp", "the compiled core's fused TBE forward"), _REF_CPU)
_put("embedding_bag", "cpu", _WIDE, ("cpp", "torch", f"the core reads float32/float16/int8: {_REF_OP}"), _REF_CPU)
_put("embedding_bag", "cuda", _CORE, ("cuda", "cuda", "the CUDA extension's kernel"),
     ("triton", "triton", "the Triton kernel"), _REF_DEV)
_put("embedding_bag", "cuda", _WIDE, *_gpu_as_reference("the GPU kernels read float32/float16/int8"))
_put("embedding_bag_max", "cpu", _CORE + _WIDE, ("cpp", "torch", f"no max kernel in the core: {_REF_OP}"), _REF_CPU)
_put("embedding_bag_max", "cuda", _CORE + _WIDE, *_gpu_as_reference("no max kernel on the GPU"))
_put("embedding_bag_freq", "cpu", _CORE, ("cpp", "cpp", "the compiled core (the scaling changes the gradient only)"),
     _REF_CPU)
_put("embedding_bag_freq", "cpu", _WIDE, ("cpp", "torch", f"the core reads float32/float16/int8: {_REF_OP}"), _REF_CPU)
_put("embedding_bag_freq", "cuda", _CORE + _WIDE, *_gpu_as_reference("the GPU forward has no scale_grad_by_freq"))
_put("embedding_bag_table_offsets", "cpu", _CORE, ("cpp", "cpp", "the compiled core, on views of the table"), _REF_CPU)
_put("embedding_bag_table_offsets", "cpu", _WIDE, ("cpp", "torch", f"the core reads float32/float16/int8: {_REF_OP}"),
     _REF_CPU)
_put("embedding_bag_table_offsets", "cuda", _CORE + _WIDE)  # none: the GPU paths take a list of tables
_put("embedding_bag_backward", "cpu", ("float32",), ("cpp", "cpp", "the compiled core's fused backward + update"),
     ("torch", "torch", "the torch reference, in place"))
_put("embedding_bag_backward", "cuda", ("float32",), ("cuda", "cuda", "the CUDA extension's kernels"),
     ("triton", "triton", "the Triton kernels"), ("torch", "torch", "the torch reference, in place on the device"))
_put("embedding_bag_backward_tbe", "cpu", ("float32",), ("cpp", "cpp", "the compiled core's TBE backward"),
     ("torch", "torch", "the torch reference, in place"))
_put("embedding_bag_backward_tbe", "cuda", ("float32",),
     ("torch", "torch", "the torch reference, in place on the device (no TBE backward kernel on the GPU)"))
_put("embedding_bag_backward_table_offsets", "cpu", ("float32",),
     ("cpp", "cpp", "the compiled core, on views of the table"), ("torch", "torch", "the torch reference, in place"))
_put("embedding_bag_backward_table_offsets", "cuda", ("float32",))  # none
for _op in ("policy_topk", "policy_sample"):
    _put(_op, "cpu", _CORE, ("cpp", "cpp", "the compiled core's fused streaming kernel"), _REF_CPU)
    _put(_op, "cuda", _CORE, ("cuda", "cuda", "the CUDA extension's kernels (k above the fused limit: the reference)"),
         ("triton", "triton", "the Triton kernels (k above the fused limit: the reference)"),
         ("torch", "torch", "the torch reference on CPU copies, results on the device"))
del _op


def table() -> List[Entry]:
    """Every cell of the backend table, as :class:`Entry` rows: for each op of :data:`OPS`,
    device of :data:`DEVICES` and dtype of :data:`DTYPES`, the backends that run it in the
    default's order of preference (none: the combination is refused, by :func:`select`, with a
    :class:`BackendError`). Availability on this machine is :func:`describe`'s."""
    rows = []
    for op in OPS:
        for device in DEVICES:
            for dtype in DTYPES:
                for rank, (backend, runs, note) in enumerate(_ROWS.get((op, device, dtype), ())):
                    rows.append(Entry(op, device, dtype, backend, runs, rank, note))
    return rows


def format_table() -> str:
    """The table as text (what ``recmeta env`` prints): per op, device and group of dtypes with
    the same row, the backends in order of preference, ``*`` after the one chosen here by
    default, ``(not available)`` after those this machine lacks, ``-> torch`` where the
    backend asked for runs the torch reference."""
    lines = []
    for op in OPS:
        for device in DEVICES:
            groups: Dict[Tuple, List[str]] = {}
            for dtype in DTYPES:
                groups.setdefault(_ROWS.get((op, device, dtype), ()), []).append(dtype)
            for cells, dtypes in groups.items():
                default = _default(op, device, dtypes[0]) if cells else None
                parts = []
                for backend, runs, _ in cells:
                    s = backend + ("" if runs == backend else f" -> {runs}")
                    if backend == default:
                        s += " *"
                    elif not available(backend):
                        s += " (not available)"
                    parts.append(s)
                lines.append(f"{op:37s} {device:4s} {'/'.join(dtypes):38s} "
                             f"{', '.join(parts) if parts else 'none (refused)'}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Availability
# ---------------------------------------------------------------------------------------
def _probe_cpp() -> Tuple[bool, str]:
    try:
        _core = _native.core()
    except ImportError as e:  # pragma: no cover - depends on the build
        return False, f"the compiled extension recmeta_sdk._core did not import ({e})"
    return True, f"compiled core, CPU kernels '{_core.cpu_isa()}', OpenMP {'on' if _core.has_openmp() else 'off'}"


def _probe_torch() -> Tuple[bool, str]:
    import torch

    return True, f"PyTorch {torch.__version__} reference"


def _probe_triton() -> Tuple[bool, str]:
    try:
        import torch
    except ImportError:  # pragma: no cover
        return False, "PyTorch is not installed"
    if not torch.cuda.is_available():
        return False, "no CUDA device is visible to PyTorch"
    try:
        import triton  # noqa: F401
    except ImportError:
        return False, "the triton package is not installed (pip install 'recmeta[triton]')"
    try:
        _native.load_kernel_module("_heuristics")
    except ImportError as e:
        return False, f"recmeta_sdk.kernels did not import ({e})"
    return True, f"Triton {triton.__version__} on {torch.cuda.get_device_name()}"


def _probe_cuda() -> Tuple[bool, str]:
    try:
        import torch
    except ImportError:  # pragma: no cover
        return False, "PyTorch is not installed"
    if not torch.cuda.is_available():
        return False, "no CUDA device is visible to PyTorch"
    try:
        _native.core_cuda()
    except ImportError:
        return False, "the CUDA extension was not built (RECMETA_ENABLE_CUDA=OFF or no CUDA compiler)"
    return True, f"CUDA kernels on {torch.cuda.get_device_name()}"


_PROBES = {"cpp": _probe_cpp, "torch": _probe_torch, "triton": _probe_triton, "cuda": _probe_cuda}
_cache: Dict[str, Tuple[bool, str]] = {}


def describe() -> Dict[str, Tuple[bool, str]]:
    """For each backend: (available, why)."""
    for name, probe in _PROBES.items():
        if name not in _cache:
            _cache[name] = probe()
    return dict(_cache)


def available(name: str) -> bool:
    """Whether backend ``name`` runs on this machine (probed once; ValueError if not a backend)."""
    if name not in _PROBES:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")
    if name not in _cache:
        _cache[name] = _PROBES[name]()
    return _cache[name][0]


# ---------------------------------------------------------------------------------------
# The choice
# ---------------------------------------------------------------------------------------
#: the environment variable that overrides the default backend (read here and nowhere else)
ENV_VAR = "RECMETA_BACKEND"
# The mapping behind os.environ (kept current by its __setitem__ / __delitem__): one dict look-up
# instead of os.environ's Python-level __contains__, which matters on the ops' hot path because
# the interpreter's own code is cold in the caches after a kernel has streamed a table's rows.
_ENVIRON = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey(ENV_VAR) if _ENVIRON is not None and hasattr(os.environ, "encodekey") else None
_DEFAULTS: Dict[Tuple[str, str, str], Optional[str]] = {}


def env_override() -> bool:
    """Whether ``RECMETA_BACKEND`` is set (the ops' fast paths then defer to :func:`select`)."""
    if _ENV_KEY is not None:
        return _ENV_KEY in _ENVIRON
    return ENV_VAR in os.environ


def _default(op: str, device: str, dtype: str) -> Optional[str]:
    """The first available backend of the combination's row (None: none is), cached: the
    probes' answers do not change within a process."""
    key = (op, device, dtype)
    try:
        return _DEFAULTS[key]
    except KeyError:
        pass
    name = next((b for b, _, _ in _ROWS.get(key, ()) if available(b)), None)
    _DEFAULTS[key] = name
    return name


def _exists(op: str) -> str:
    """Where ``op`` runs at all, for the error messages: 'cpu float32/float16: cpp, torch; ...'."""
    groups: Dict[Tuple[str, Tuple[str, ...]], List[str]] = {}
    for (o, device, dtype), cells in _ROWS.items():
        if o == op and cells:
            groups.setdefault((device, tuple(c[0] for c in cells)), []).append(dtype)
    return "; ".join(f"{device} {'/'.join(dtypes)}: {', '.join(names)}" for (device, names), dtypes in groups.items())


def _check_key(op: str, device: str, dtype: str) -> None:
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; the table has {tuple(OPS)}")
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; the table has {DEVICES}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; the table has {DTYPES}")


def select(op: str, device: str = "cpu", dtype: str = "float32", backend: Optional[str] = None) -> str:
    """The backend that runs ``op`` on ``device`` data with a ``dtype`` table.

    Parameters
    ----------
    op : one of :data:`OPS`
    device : {"cpu", "cuda"}
    dtype : one of :data:`DTYPES`
    backend : str or None
        The caller's ``backend=``; None uses ``RECMETA_BACKEND`` if set, else the first
        available backend of the table's row.

    Returns
    -------
    The backend's name (one of :data:`BACKENDS`); :func:`table` says what it runs there.

    Raises
    ------
    ValueError
        ``backend`` (or ``RECMETA_BACKEND``) is not a backend; ``op`` / ``device`` / ``dtype``
        is not in the table.
    RuntimeError
        The backend asked for is not available on this machine (the message says why).
    BackendError
        The backend asked for cannot run the combination, or none available can; the message
        names the op, the device, the dtype and the backends that exist.
    """
    if backend is None and (_ENV_KEY is None or _ENV_KEY in _ENVIRON):
        backend = os.environ.get(ENV_VAR) or None
    key = (op, device, dtype)
    if backend is None:
        name = _DEFAULTS.get(key)
        if name is not None:
            return name
        if key not in _ROWS:
            _check_key(op, device, dtype)
        name = _default(op, device, dtype)
        if name is None:
            cells = _ROWS.get(key, ())
            have = (f"its backends ({', '.join(c[0] for c in cells)}) are not available here" if cells
                    else "no backend runs it")
            raise BackendError(f"{op} on {device} {dtype}: {have}; {op} runs on {_exists(op) or 'nothing'}")
        return name
    if backend not in _PROBES:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if key not in _ROWS:
        _check_key(op, device, dtype)
    ok, why = _cache[backend] if backend in _cache else describe()[backend]
    if not ok:
        raise RuntimeError(f"backend {backend!r} is not available: {why}")
    cells = _ROWS.get(key, ())
    for name, _, _ in cells:
        if name == backend:
            return name
    hint = {"cpp": " (cpp runs CPU data)", "triton": " (triton runs CUDA tensors)",
            "cuda": " (cuda runs CUDA tensors)"}.get(backend, "")
    have = f"the backends for it: {', '.join(c[0] for c in cells)}" if cells else "no backend runs it"
    raise BackendError(f"{op} on {device} {dtype}: backend {backend!r} cannot run it{hint}; {have}; "
                       f"{op} runs on {_exists(op) or 'nothing'}")


def resolve(backend: Optional[str], device_type: str = "cpu") -> str:
    """The backend of a plain call on ``device_type`` data: :func:`select` for
    ``policy_topk`` on a float32 table (what ``recmeta env`` reports as the default)."""
    return select("policy_topk", device_type, "float32", backend)


def default_cpu() -> str:
    """The default backend of the embedding bag on CPU float32 data when ``RECMETA_BACKEND`` is
    not set (the ops' fast paths): the compiled core if it loads, else the torch reference."""
    return _default("embedding_bag", "cpu", "float32") or "torch"
