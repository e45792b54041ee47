"""The one place that picks the backend running an op: what is available, and which is chosen.

A backend runs the operations of :mod:`recmeta_sdk.ops`:

* ``"cpp"``: the compiled core (``recmeta_sdk._core``), CPU tensors and numpy arrays.
* ``"torch"``: the plain PyTorch reference (:mod:`recmeta_sdk.ops.reference`), any device.
* ``"triton"`` / ``"cuda"``: GPU kernels (CUDA tensors), when built and a GPU is present.

The choice is, in order: the ``backend=`` argument of a call, the ``RECMETA_BACKEND``
environment variable, then the fastest available backend for the data's device.
"""
from __future__ import annotations

import os
from typing import Dict, Optional, Tuple

from . import _native

__all__ = ["available", "resolve", "describe", "default_cpu", "env_override", "BACKENDS", "ENV_VAR"]

BACKENDS = ("cpp", "torch", "triton", "cuda")


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
    if name not in _PROBES:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")
    if name not in _cache:
        _cache[name] = _PROBES[name]()
    return _cache[name][0]


#: the environment variable that overrides the default backend (read here and nowhere else)
ENV_VAR = "RECMETA_BACKEND"
# The mapping behind os.environ (kept current by its __setitem__ / __delitem__): one dict look-up
# instead of os.environ's Python-level __contains__, which matters on the ops' hot path because
# the interpreter's own code is cold in the caches after a kernel has streamed a table's rows.
_ENVIRON = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey(ENV_VAR) if _ENVIRON is not None and hasattr(os.environ, "encodekey") else None
_DEFAULT_CPU: Optional[str] = None


def env_override() -> bool:
    """Whether ``RECMETA_BACKEND`` is set (the ops' fast paths then defer to :func:`resolve`)."""
    if _ENV_KEY is not None:
        return _ENV_KEY in _ENVIRON
    return ENV_VAR in os.environ


def default_cpu() -> str:
    """``resolve(None, "cpu")`` when ``RECMETA_BACKEND`` is not set: the compiled core if it
    loads, else the torch reference (probed once)."""
    global _DEFAULT_CPU
    if _DEFAULT_CPU is None:
        _DEFAULT_CPU = "cpp" if available("cpp") else "torch"
    return _DEFAULT_CPU


def resolve(backend: Optional[str], device_type: str = "cpu") -> str:
    """The backend a call runs on.

    Parameters
    ----------
    backend : str or None
        Explicit choice; None uses ``RECMETA_BACKEND`` or the default for ``device_type``.
    device_type : {"cpu", "cuda"}
    """
    choice = backend if backend is not None else (os.environ.get(ENV_VAR) or None)
    if choice is not None:
        if choice not in _PROBES:
            raise ValueError(f"unknown backend {choice!r}; choose one of {BACKENDS}")
        ok, why = describe()[choice] if choice not in _cache else _cache[choice]
        if not ok:
            raise RuntimeError(f"backend {choice!r} is not available: {why}")
        if device_type == "cpu" and choice in ("triton", "cuda"):
            raise ValueError(f"backend {choice!r} needs CUDA tensors; got CPU data")
        if device_type == "cuda" and choice == "cpp":
            raise ValueError("backend 'cpp' needs CPU data; got CUDA tensors")
        return choice
    if device_type == "cuda":
        for name in ("cuda", "triton"):
            if available(name):
                return name
        return "torch"
    return "cpp" if available("cpp") else "torch"
