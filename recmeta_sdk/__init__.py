"""recmeta: an embeddable meta-RL recommender SDK with a compiled core.

Public API: :func:`train`, :func:`load`, :class:`Recommender`, :class:`UserState`,
:class:`Recommendations`, :class:`ModelFileError`, :class:`LoadLimits`; submodules :mod:`~recmeta_sdk.data`,
:mod:`~recmeta_sdk.datasets` and :mod:`~recmeta_sdk.ops` (``data`` and ``datasets`` are imported on first use).
"""
from __future__ import annotations

import importlib
import logging

__version__ = "0.1.0"

logging.getLogger("recmeta").addHandler(logging.NullHandler())

from . import backends, ops, reference  # noqa: E402
from .io import LoadLimits, ModelFileError  # noqa: E402
# imported eagerly: importing the submodule recmeta_sdk.train would otherwise shadow the function
from .api import Recommendations, Recommender, UserState, load, train  # noqa: E402

_LAZY: dict = {}
_SUBMODULES = ("data", "datasets", "api", "model", "evaluate", "baselines", "io")

__all__ = ["__version__", "backends", "ops", "reference", "data", "datasets", "train", "load",
           "Recommender", "UserState", "Recommendations", "ModelFileError", "LoadLimits"]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'recmeta_sdk' has no attribute {name!r}")
