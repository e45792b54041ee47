"""Plain records of a user's policy state and a ranked answer, for the facade and the online layer.

What the model says about one user (:class:`UserState`) and a ranked answer
(:class:`Recommendations`); :mod:`recmeta_sdk.api` re-exports both.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

__all__ = ["UserState", "Recommendations"]


@dataclass(frozen=True)
class UserState:
    """A user's policy state (from :meth:`Recommender.adapt` or :meth:`Recommender.user_state`).

    Attributes
    ----------
    vector : (d,) float32
        The adapted state h'(s) that scores items.
    base : (d,) float32
        The state before adaptation (the encoder's output with the initial parameters).
    history : (n,) int64
        Internal indices of the history items (time order), excluded by ``exclude_seen``.
    history_ids : tuple
        The same items as external ids.
    rewards : (n,) float32
    user : external id or None
        The known user this state belongs to (None for an adapted new user).
    dropped : tuple
        History items that were unknown to the model and dropped (``unknown="drop"``).
    steps : int
        Adaptation steps taken.
    item_bias : (N,) float32 or None
        The user's adapted item-bias vector, added to the item bias when the state is
        scored (the online loop sets it from the reward posterior of the user's feedback,
        misses included: :mod:`recmeta_sdk.online.posterior`); None for none.

    The state also carries, internally, the wide (item-to-item) part of its scores,
    ``alpha(n) * sum_{j in history} W[j, :]``, computed once by the model that made it so
    that :meth:`Recommender.recommend` scores a state with one fused kernel call; it is
    recomputed when the state is served by another model or its history was replaced.
    """

    vector: np.ndarray
    base: np.ndarray
    history: np.ndarray
    history_ids: tuple
    rewards: np.ndarray
    user: Any = None
    dropped: tuple = ()
    steps: int = 0
    features: Optional[dict] = None
    item_bias: Optional[np.ndarray] = None
    # (serving-table token, the history array it was computed from, (N,) float32 wide part
    # or None): a cache of a pure function of (model, history), never compared or printed
    _serving: Any = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class Recommendations:
    """Recommended items for one user (arrays of shape (k,)) or a batch ((B, k)).

    Attributes
    ----------
    ids : external item ids, best first; where ``valid`` is False the slot is padding
        (-1 for integer ids, None for other ids).
    scores : float32 policy scores ``(<h', v_a> + b_a) / tau`` (-inf in padding).
    valid : bool, False where fewer than k items were eligible.
    propensities : float32 ``pi(a|s)`` of each item under the (exploring) policy, with
        ``explore="sample"``; else None.
    explanations : with ``explain=True``, per user a list (per item) of dicts
        ``{"item", "history": [(history item id, contribution)...],
        "features": [(feature name, contribution)...], "bias": item bias}`` (plus
        ``"feedback"``: the share of the state's online item bias, when it has one); else None.
    """

    ids: np.ndarray
    scores: np.ndarray
    valid: np.ndarray
    propensities: Optional[np.ndarray] = None
    explanations: Optional[list] = None

    def __len__(self) -> int:
        return int(self.ids.shape[0])
