"""The one loader of recmeta's native code: the compiled core, the CUDA extension, the GPU kernels.

The compiled CPU core (``recmeta_sdk._core``), the CUDA extension (``recmeta_sdk._core_cuda``,
built only with ``RECMETA_ENABLE_CUDA``) and the Triton / CUDA-launch kernel modules
(``recmeta_sdk.kernels``). Every other module reaches them through these functions; none
imports them by itself."""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys

__all__ = ["core", "core_cuda", "load_kernel_module"]

_CORE = None


def core():
    """``recmeta_sdk._core`` (raises ImportError when the compiled core is not built)."""
    global _CORE
    if _CORE is None:
        from .. import _core

        _CORE = _core
    return _CORE


def core_cuda():
    """``recmeta_sdk._core_cuda`` (raises ImportError when the CUDA extension is not built)."""
    from .. import _core_cuda  # noqa: WPS433 - built only with RECMETA_ENABLE_CUDA

    return _core_cuda


def _ensure_kernels_package() -> None:
    """Make ``recmeta_sdk.kernels`` importable.

    Installed, it ships inside the package (pyproject's wheel.packages maps kernels/ to
    recmeta_sdk/kernels). In the source tree the folder is ``<root>/kernels``: it is then
    loaded *as* ``recmeta_sdk.kernels`` (never as a top-level package named ``kernels``).
    """
    if "recmeta_sdk.kernels" in sys.modules:
        return
    try:
        importlib.import_module("recmeta_sdk.kernels")
        return
    except ModuleNotFoundError as e:
        if e.name != "recmeta_sdk.kernels":
            raise
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # recmeta_sdk/
    src = os.path.join(os.path.dirname(package), "kernels")
    init = os.path.join(src, "__init__.py")
    if not os.path.isfile(init):
        raise ModuleNotFoundError("recmeta_sdk.kernels is not installed and this is not a source tree",
                                  name="recmeta_sdk.kernels")
    spec = importlib.util.spec_from_file_location("recmeta_sdk.kernels", init,
                                                  submodule_search_locations=[src])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["recmeta_sdk.kernels"] = mod
    spec.loader.exec_module(mod)
    setattr(sys.modules["recmeta_sdk"], "kernels", mod)


def load_kernel_module(name: str):
    """``recmeta_sdk.kernels.<name>`` (``"embedding_bag"``, ``"policy_topk"``, ``"_common"``,
    ``"_heuristics"``); the Triton ones import Triton."""
    _ensure_kernels_package()
    return importlib.import_module(f"recmeta_sdk.kernels.{name}")
