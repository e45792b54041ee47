"""Serving from a saved model without torch: :func:`load` and :class:`ServingModel`.

A model saved with ``model.save(path, serving=True)`` carries, besides the network, what
serving a known user reads: the served item table and biases, each known user's state and
the wide part's ``alpha(n)`` table (the ``serving.*`` tensors). :func:`load` reads those with
numpy only (the model file's checks, :mod:`recmeta_sdk.model.io`, torch-free) and
:meth:`ServingModel.recommend` scores with the compiled core (``policy_topk``, and the fused
embedding bag for the wide part), the same calls :meth:`recmeta_sdk.Recommender.recommend`
makes, so ids and scores are the same as the model's that saved the file. torch is not
imported (``python -X importtime`` shows it; a test checks it in a fresh interpreter).

What needs the network (new users' ``adapt``, online ``feedback``, exploration,
explanations, diversity re-ranking) is the full model's: ``recmeta_sdk.load(path)`` loads it
from the same file (that imports torch). A host process typically loads a
:class:`ServingModel` per worker (start-up in milliseconds, memory = the arrays) and the
full model only where new users or feedback are served.
"""
from __future__ import annotations

from .snapshot import SERVING_VERSION, ServingModel, check_serving_section, load

__all__ = ["ServingModel", "load", "check_serving_section", "SERVING_VERSION"]
