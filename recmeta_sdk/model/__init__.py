"""The model layer: the policy network (:mod:`.network`), user states and recommendation records
(:mod:`.state`), the model file format (:mod:`.io`) and the learned world model (:mod:`.world`)."""
from __future__ import annotations

from .network import Config, ItemFeatures, RecMetaNet
from .world import WorldModel, WorldModelConfig

__all__ = ["Config", "ItemFeatures", "RecMetaNet", "WorldModel", "WorldModelConfig"]
