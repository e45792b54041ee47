"""What the online layer reads of a trained model: a small, read-only, typed interface.

:class:`ModelView` is the whole of what :mod:`recmeta_sdk.online` (feedback, the online store, the
reward posterior, resume training) and :mod:`recmeta_sdk.training.meta_tasks` (task adaptation)
use of a :class:`recmeta_sdk.Recommender`; the facade implements it. It lives in the model layer so that the online layer can name it without
importing the facade above it (issue 19: imports only go downward, and no layer reads another's
private attributes).

Indices are the model's *internal* item / user positions (``0 .. n_items - 1``), tensors are the
model's own (never written to), and numpy arrays returned are views of the model's arrays: treat
them as read-only.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:  # annotations only: importing this module costs no torch
    import torch

    from .network import Config, RecMetaNet
    from .state import Recommendations, UserState

__all__ = ["ModelView"]


@runtime_checkable
class ModelView(Protocol):
    """The read-only model interface of the online layer (implemented by ``Recommender``).

    Attributes
    ----------
    config : Config
        The model's hyper-parameters (the online loop reads ``meta``, ``inner_steps``,
        ``inner_lr``, ``seq_len``, ``feedback_*``).
    item_ids : (N,) array
        External item ids; position ``i`` is internal item ``i``.
    """

    config: Config
    item_ids: np.ndarray

    @property
    def n_items(self) -> int:
        """Catalogue size N."""

    @property
    def network(self) -> RecMetaNet:
        """The policy network (in eval mode, no gradients; never modified by the online layer)."""

    @property
    def input_table(self) -> torch.Tensor:
        """(N, d) float32: the items' input vectors the user encoder reads (``RecMetaNet.item_vectors()[0]``)."""

    @property
    def item_table(self) -> torch.Tensor:
        """(N, d) float32: the items' output vectors the policy scores against (``item_vectors()[1]``)."""

    @property
    def reward_scale(self) -> float:
        """Rewards are divided by it before the model reads them (> 0)."""

    @property
    def default_online_store(self) -> Any:
        """The model's default online store (None until the first feedback); assignable."""

    @default_online_store.setter
    def default_online_store(self, store: Any) -> None: ...

    def item_positions(self, items: np.ndarray) -> np.ndarray:
        """(n,) int64 internal indices of external item ids, -1 where unknown."""

    def item_position(self, item: Any) -> int:
        """The internal index of one external item id, -1 if unknown (a hash look-up)."""

    def user_position(self, user: Any) -> int:
        """The internal index of a training user's id, -1 if the id is not a training user."""

    def adapt_steps(self, steps: int | None) -> int:
        """The number of adaptation steps to run for ``steps`` (None: ``config.inner_steps``),
        validated (an int in ``[0, MAX_ADAPT_STEPS]``, else ValueError naming it)."""

    def user_history(self, position: int) -> tuple[np.ndarray, np.ndarray]:
        """A training user's history (time order): ``(items (n,) int64, rewards (n,) float32)``."""

    def user_feature_rows(self, position: int) -> np.ndarray:
        """A training user's encoded side-feature rows (int64; empty without user features)."""

    def training_log(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All training histories in CSR form: ``(offsets (U+1,) int64, items int64, rewards float32)``."""

    def encode_history(self, items: np.ndarray, feature_rows: np.ndarray) -> torch.Tensor:
        """The encoder state ``h`` (1, d) float32 of one history (internal indices, time order)
        and the user's encoded side-feature rows (no gradients)."""

    def history_offset(self, items: np.ndarray, new: bool = False) -> torch.Tensor | None:
        """(1, N) float32: the wide (item-to-item) part of the logits of one history (internal
        indices; ``new``: a new user's weight), ``RecMetaNet.wide_offset``; None without one."""

    def score_all(self, state: UserState) -> np.ndarray:
        """(N,) float32: the policy's scores of every item for ``state`` before the temperature
        (``<h', v_a> + b_a`` plus the state's wide part and item bias)."""

    def with_network(self, network: RecMetaNet, config: Config) -> ModelView:
        """A new model of the same kind, catalogue and training log with other weights / config."""

    def adapt(self, history: Any) -> UserState:
        """A new user's state from a history (see ``Recommender.adapt``)."""

    def user_state(self, user_id: Any, *, steps: int | None = None, task: Any = None) -> UserState:
        """A training user's serving state (see ``Recommender.user_state``)."""

    def recommend(self, users_or_states: Any, k: int = 10, **kwargs: Any) -> Recommendations:
        """Rank items for a user id or a :class:`UserState` (see ``Recommender.recommend``)."""

