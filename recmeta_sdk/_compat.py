"""Old import paths of the flat 0.1 layout, kept for one release with a DeprecationWarning.

``import recmeta_sdk.train`` / ``from recmeta_sdk import sim`` and the like still work: a
meta-path finder answers for the old module names with the module at its new place (for
``recmeta_sdk.train``, a proxy that is also callable, so that the package attribute ``train``,
which the import machinery rebinds to the imported module, still trains).
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings

PACKAGE = __name__.rsplit(".", 1)[0]

#: old module name (under ``recmeta_sdk``) -> its new place
MOVED = {
    "backends": "ops.backends",
    "reference": "ops.reference",
    "_gpu": "ops._gpu",
    "_op_embedding_bag": "ops._embedding_bag",
    "_op_policy": "ops._policy_topk",
    "_ops_common": "ops._common",
    "io": "model.io",
    "train": "training.loop",
    "meta_tasks": "training.meta_tasks",
    "posterior": "online.posterior",
    "evaluate": "evaluation.metrics",
    "ope": "evaluation.ope",
    "baselines": "evaluation.baselines",
    "bandits": "evaluation.bandits",
    "sim": "evaluation.sim",
    "text": "data.text",
}


def warn_moved(old: str, stacklevel: int = 3) -> None:
    warnings.warn(f"{PACKAGE}.{old} moved to {PACKAGE}.{MOVED[old]}; the old name works for one more "
                  "release", DeprecationWarning, stacklevel=stacklevel)


class _TrainProxy(types.ModuleType):
    """``recmeta_sdk.train`` imported as a module: the training loop's names, and callable as
    :func:`recmeta_sdk.train` (the function the package attribute used to be)."""

    def __getattr__(self, name):
        return getattr(importlib.import_module(f"{PACKAGE}.{MOVED['train']}"), name)

    def __call__(self, *args, **kwargs):
        from .api import train

        return train(*args, **kwargs)


class _Loader(importlib.abc.Loader):
    def __init__(self, old: str):
        self.old = old

    def create_module(self, spec):
        warn_moved(self.old, stacklevel=2)
        if self.old == "train":
            return _TrainProxy(spec.name, "deprecated alias of recmeta_sdk.training.loop")
        return importlib.import_module(f"{PACKAGE}.{MOVED[self.old]}")

    def exec_module(self, module):
        return None


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        head, _, old = fullname.rpartition(".")
        if head != PACKAGE or old not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, _Loader(old))


def install() -> None:
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.append(_Finder())
