"""recmeta: an embeddable meta-RL recommender SDK with a compiled core.

Public API: :func:`train`, :func:`load`, :class:`Recommender`, :class:`UserState`,
:class:`Recommendations`, :class:`ModelFileError`, :class:`LoadLimits`.

The package in layers, each importing only the ones below it::

    api, cli, demo, datasets   the facade: train / load / Recommender, the command line, the demo
    online/                    feedback, online states, exploration, the incremental update
    training/                  preparation, losses, the training loop, meta-learning tasks
    model/                     the policy network and its model file
    evaluation/                metrics, off-policy estimators, baselines, bandits, simulators
    data/                      ingest, cleaning, id maps, features, splits, tasks, batches
    ops/                       the public ops, the backend table, torch custom ops, reference

Submodules are imported on first use: ``import recmeta_sdk`` does not import torch.
"""
from __future__ import annotations

import importlib
import logging

from . import _compat

__version__ = "0.1.0"

logging.getLogger("recmeta").addHandler(logging.NullHandler())
_compat.install()

#: public name -> the module that defines it (imported on first use)
_LAZY = {
    "train": "api", "load": "api", "Recommender": "api", "UserState": "api", "Recommendations": "api",
    "ModelFileError": "model.io", "LoadLimits": "model.io",
}
_SUBMODULES = ("api", "cli", "demo", "datasets", "online", "training", "model", "evaluation", "data", "ops")

__all__ = ["__version__", "ops", "data", "datasets", "train", "load", "Recommender", "UserState",
           "Recommendations", "ModelFileError", "LoadLimits"]


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    elif name in _compat.MOVED:
        _compat.warn_moved(name)
        return importlib.import_module(f".{_compat.MOVED[name]}", __name__)
    else:
        raise AttributeError(f"module 'recmeta_sdk' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | set(_SUBMODULES))
