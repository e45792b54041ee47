"""The online layer: a deployed model learning from its users' feedback.

Feedback, per-user online states, exploration helpers and the incremental off-policy update
(:mod:`.engine`), and the reward posterior of feedback (:mod:`.posterior`).
"""
from __future__ import annotations

from .engine import (
    EVENT_COLUMNS,
    OnlineStore,
    OnlineUser,
    current,
    epsilon_slate,
    feedback,
    feedback_log,
    log_from_file,
    log_to_file,
    parse_events,
    recommend,
    resume_train,
    slate_propensity,
    store,
)

__all__ = [
    "EVENT_COLUMNS",
    "OnlineStore",
    "OnlineUser",
    "current",
    "epsilon_slate",
    "feedback",
    "feedback_log",
    "log_from_file",
    "log_to_file",
    "parse_events",
    "recommend",
    "resume_train",
    "slate_propensity",
    "store",
]
