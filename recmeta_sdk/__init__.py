"""recmeta: an embeddable meta-RL recommender SDK with a compiled core."""
from __future__ import annotations

import logging

__version__ = "0.1.0"

logging.getLogger("recmeta").addHandler(logging.NullHandler())

from . import backends, ops, reference  # noqa: E402

__all__ = ["__version__", "backends", "ops", "reference"]
