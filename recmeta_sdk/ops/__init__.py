"""The public ops of recmeta (embedding bags, policy scoring, quantisation), numpy or torch.

* :func:`embedding_bag` / :func:`embedding_bag_backward`: fused (table-batched) embedding
  bags, forward and backward with a fused sparse optimiser (SGD or row-wise Adagrad, a state
  per table), over one table, a list of tables, or one table holding several tables' rows
  with per-table row offsets (``table_offsets=``, FBGEMM's ``hash_size_cumsum``).
* :func:`policy_topk` / :func:`policy_sample`: fused policy scoring with top-k or
  Gumbel-top-k sampling, with the softmax log-normaliser and propensities.
* :func:`quantize`: float16 / row-wise int8 tables for all of the above.

Each accepts numpy arrays or torch tensors and returns the same kind it was given; a
``backend=`` argument (or ``RECMETA_BACKEND``) chooses the implementation
(see :mod:`recmeta_sdk.ops.backends`).
"""
import importlib
import sys

# The op modules (and their torch custom ops) load on first use, so that torch-free serving
# (recmeta_sdk.serving) can reach the compiled core through ._native without importing torch.
# When torch is already imported, they load now: torch.ops.recmeta.* is registered as soon as
# this package is imported.
_LAZY = {"embedding_bag": "_embedding_bag", "embedding_bag_backward": "_embedding_bag",
         "policy_sample": "_policy_topk", "policy_topk": "_policy_topk", "quantize": "_common",
         "QuantizedTable": "reference"}

__all__ = [
    "embedding_bag",
    "embedding_bag_backward",
    "policy_topk",
    "policy_sample",
    "quantize",
    "QuantizedTable",
]


def _load_ops() -> None:
    """Import every op module (registering torch.ops.recmeta.*) and bind the public names."""
    for name, module in _LAZY.items():
        globals()[name] = getattr(importlib.import_module(f".{module}", __name__), name)


def __getattr__(name):
    if name in _LAZY:  # the first use of any op loads them all
        _load_ops()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


if "torch" in sys.modules:
    _load_ops()
