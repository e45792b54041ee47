"""The model layer: the policy network (:mod:`.network`), user states and recommendation records
(:mod:`.state`), the model file format (:mod:`.io`) and the learned world model (:mod:`.world`)."""
from __future__ import annotations

import importlib

# loaded on first use, so that the torch-free parts (.io's reader, .state) import without torch
_LAZY = {"Config": "network", "ItemFeatures": "network", "RecMetaNet": "network",
         "WorldModel": "world", "WorldModelConfig": "world"}

__all__ = ["Config", "ItemFeatures", "RecMetaNet", "WorldModel", "WorldModelConfig"]


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
