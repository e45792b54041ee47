"""The online layer: a deployed model learning from its users' feedback.

Feedback, per-user online states, exploration helpers and the incremental off-policy update
(:mod:`.engine`), where the states are kept (:mod:`.store`: a pluggable, bounded backend) and the
reward posterior of feedback (:mod:`.posterior`).
"""
from __future__ import annotations

from . import engine as _engine
from .engine import *  # noqa: F401,F403  (the names of engine.__all__)
from .store import MemoryBackend, StateBackend

__all__ = list(_engine.__all__) + ["MemoryBackend", "StateBackend"]
