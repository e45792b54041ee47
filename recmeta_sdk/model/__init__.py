"""The model layer: the policy network (:mod:`.network`) and its file format (:mod:`.io`)."""
from __future__ import annotations

from .network import Config, ItemFeatures, RecMetaNet

__all__ = ["Config", "ItemFeatures", "RecMetaNet"]
