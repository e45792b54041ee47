"""A learned, meta-learned world model of users: response to a slate, next state, session end.

The world model is learned from the same interaction logs as the policy (the frames that
:func:`recmeta_sdk.train` accepts) and predicts, for a user in state ``h``:

* the **response** to a slate: the probability that the item at each position is clicked /
  positive, ``σ((A h)·v_i + w·h + b_i + β_p)``, with ``v_i`` the item's vector (an id
  embedding plus a projection of its side features, pooled with the fused
  :func:`recmeta_sdk.ops.embedding_bag`), ``b_i`` an item bias and ``β_p`` a position bias
  (position-biased click model in logit space);
* the **next state** after a slate and its response: a GRU update
  ``h' = GRU(x, h)`` over the step's summary ``x = [Σ r_k v_k, Σ (1 - r_k) v_k, Σ r_k, Σ (1 - r_k)]``;
* whether the **session ends** after the step (when the logs have session ids; the last step
  of a session is "ended"), ``σ(e·[h', Σ r, Σ (1 - r), K])``, trained with a Bernoulli loss;
* the **next item** the logs show the user (a softmax over the catalogue, ``(Q h)·v_i + c_i``):
  in organic logs (ratings, views) what the user picks next, in logged bandit feedback what
  the logging policy showed. It serves the next-item ranking of :meth:`WorldModel.evaluate`
  (items ranked by ``log P(next = i) + log P(positive | i)``) and is exposed as
  :meth:`WorldModel.next_item_scores`.

Meta-learning across users (tasks): every user starts from a learned prior state (one per
segment when a segment column is given) and the GRU is trained, through the whole sequence of
each training user, to predict the user's next responses from the prior and the events seen
so far. Rolling a new user's first few events through the update (:meth:`WorldModel.adapt`)
is the fast adaptation: adapt the model, then plan with :meth:`predict` / :meth:`step` /
:meth:`sample_response`.

Training (:class:`WorldModelConfig`): AdamW over minibatches of whole users, early stopping on
a fraction of the training users (``validation``, default 10%), then a Platt scaling of the
response logits fitted on those users' events (``calibrate``).

Typical use::

    from recmeta_sdk.model.world import WorldModel

    wm = WorldModel.fit(log, item_features=items, epochs=20, seed=0)
    h = wm.adapt(history_items, history_rewards)          # (hidden,) state of one user
    p = wm.predict(h[None], [[10, 20, 30]])               # (1, 3) click probabilities
    r = wm.sample_response(h[None], [[10, 20, 30]], rng)  # (1, 3) 0/1 draws
    h2 = wm.step(h[None], [[10, 20, 30]], r)              # (1, hidden) next state
    wm.save("wm.safetensors"); wm2 = WorldModel.load("wm.safetensors")
    report = wm.evaluate(held_out_log, support=10)        # vs no adaptation and popularity

Items are named by their external ids everywhere in the public API; states are (B, hidden)
float32 numpy arrays. Nothing here seeds a global random number generator: parameters are
initialised and batches are drawn from a ``torch.Generator`` seeded by ``seed``.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..data import FeatureEncoder, IdMap
from .io import LoadLimits, ModelFileError, read_model_file, write_model_file
from ..ops import embedding_bag

logger = logging.getLogger("recmeta")

__all__ = ["WORLD_MODEL_KIND", "WORLD_MODEL_VERSION", "WorldModel", "WorldModelConfig"]

#: ``kind`` written in a world-model file's metadata (a recommender file has none).
WORLD_MODEL_KIND = "recmeta-world-model"
#: version of the world-model layout inside the file.
WORLD_MODEL_VERSION = 1

_EPS = 1e-6


# =========================================================================== configuration

@dataclass
class WorldModelConfig:
    """Hyper-parameters of :class:`WorldModel` (all have working defaults).

    Attributes
    ----------
    dim : int
        Item vector size ``d``.
    hidden : int
        User state size ``H``.
    epochs : int
        Passes over the training users (at most: see ``validation``).
    batch_users : int
        Users per minibatch (each contributes its whole sequence, up to ``max_steps``).
    lr : float
        Adam learning rate.
    weight_decay : float
        Decoupled weight decay (AdamW) of the weight matrices and embeddings (not of the
        biases and priors).
    next_item_weight : float
        Weight of the next-item (softmax) loss; 0 disables the head's training.
    end_weight : float
        Weight of the session-end loss (used when the logs have sessions).
    max_steps : int
        Steps kept per training user (the first ``max_steps``).
    validation : float
        Fraction of the training users held out for early stopping on their loss (the
        training objective) (0 disables it; used
        with 10 users or more).
    patience : int
        Epochs without a better validation loss before training stops.
    calibrate : bool
        Fit a Platt scaling (a scale and a shift of the response logits) on the validation
        users' events after training (needs ``validation > 0``).
    event_dropout : float
        Probability that a training event is left out of the state update (its response is
        still predicted): without it, a user's sequence of randomly shown items is a
        fingerprint the recurrent state can memorise the clicks of.
    next_item_sample : int
        Events per minibatch on which the next-item softmax (a (E, n_items) matrix) is
        computed, drawn uniformly without replacement (all when fewer): an unbiased
        estimate of the mean loss at a bounded cost.
    seed : int
        Seed of the parameter initialisation and the minibatch order.
    """

    dim: int = 32
    hidden: int = 64
    epochs: int = 20
    batch_users: int = 64
    lr: float = 0.01
    weight_decay: float = 1e-4
    next_item_weight: float = 1.0
    end_weight: float = 1.0
    max_steps: int = 2000
    validation: float = 0.1
    patience: int = 3
    calibrate: bool = True
    event_dropout: float = 0.0
    next_item_sample: int = 1024
    seed: int = 0

    def validate(self) -> WorldModelConfig:
        for name, lo, hi in (("dim", 1, 4096), ("hidden", 1, 4096), ("epochs", 0, 100_000),
                             ("batch_users", 1, 1_000_000), ("max_steps", 1, 10_000_000),
                             ("next_item_sample", 1, 100_000_000), ("patience", 1, 100_000),
                             ("seed", 0, 2**63 - 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not lo <= v <= hi:
                raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {v!r}")
            setattr(self, name, int(v))
        for name in ("lr", "weight_decay", "next_item_weight", "end_weight", "validation",
                     "event_dropout"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)) \
                    or not math.isfinite(float(v)) or float(v) < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
            setattr(self, name, float(v))
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if not isinstance(self.calibrate, (bool, np.bool_)):
            raise TypeError(f"calibrate must be a bool, got {type(self.calibrate).__name__}")
        self.calibrate = bool(self.calibrate)
        if self.event_dropout >= 1.0:
            raise ValueError(f"event_dropout must be in [0, 1), got {self.event_dropout!r}")
        if self.validation >= 0.5:
            raise ValueError(f"validation must be a fraction in [0, 0.5), got {self.validation!r}")
        return self


# =========================================================================== the network

def _init_params(module: nn.Module, gen: torch.Generator) -> None:
    """Initialise every parameter from ``gen`` (no global RNG)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name in ("prior", "seg_prior", "item_bias", "next_bias", "pos_bias") or name.endswith("bias") \
                    or name.startswith("gru.bias"):
                p.zero_()
            elif name.startswith("gru."):
                bound = 1.0 / math.sqrt(module.hidden)
                p.uniform_(-bound, bound, generator=gen)
            else:
                fan_in = p.shape[1] if p.dim() == 2 else p.shape[0]
                if name in ("item_emb", "tok_emb"):
                    p.normal_(0.0, 0.1, generator=gen)
                else:
                    p.uniform_(-1.0 / math.sqrt(fan_in), 1.0 / math.sqrt(fan_in), generator=gen)


class _Net(nn.Module):
    def __init__(self, n_items: int, n_tokens: int, n_numeric: int, n_positions: int, n_segments: int,
                 dim: int, hidden: int):
        super().__init__()
        self.dim, self.hidden = dim, hidden
        self.item_emb = nn.Parameter(torch.zeros(n_items, dim))
        self.tok_emb = nn.Parameter(torch.zeros(max(n_tokens, 1), dim))
        self.num_proj = nn.Parameter(torch.zeros(max(n_numeric, 1), dim))
        self.item_bias = nn.Parameter(torch.zeros(n_items))
        self.next_bias = nn.Parameter(torch.zeros(n_items))
        self.pos_bias = nn.Parameter(torch.zeros(n_positions))
        self.prior = nn.Parameter(torch.zeros(hidden))
        self.seg_prior = nn.Parameter(torch.zeros(n_segments, hidden))
        self.gru = nn.GRU(2 * dim + 2, hidden, batch_first=True)
        self.resp_proj = nn.Linear(hidden, dim)
        self.resp_user = nn.Linear(hidden, 1)
        self.next_proj = nn.Linear(hidden, dim)
        self.end = nn.Linear(hidden + 3, 1)
        # Platt scaling of the response logits (scale, shift), fitted on validation users
        self.register_buffer("calib", torch.tensor([1.0, 0.0]))

    def item_vectors(self, feats: dict) -> torch.Tensor:
        """(N, d): id embedding + mean of the feature-token embeddings + numeric projection."""
        v = self.item_emb
        if feats["n_tokens"]:
            v = v + embedding_bag(self.tok_emb, feats["indices"], feats["offsets"], mode="mean")
        if feats["n_numeric"]:
            v = v + feats["numeric"] @ self.num_proj
        return v

    def h0(self, seg: torch.Tensor) -> torch.Tensor:
        """(B, H) prior states of segment codes ``seg`` (B,) (0: no segment / global)."""
        return self.prior[None, :] + self.seg_prior[seg]

    @staticmethod
    def step_input(v: torch.Tensor, r: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(..., 2d+2) step summaries from (..., K, d) item vectors, (..., K) responses and mask."""
        m = mask.to(v.dtype)
        rp = r * m
        rn = (1.0 - r) * m
        return torch.cat([(rp[..., None] * v).sum(-2), (rn[..., None] * v).sum(-2),
                          rp.sum(-1, keepdim=True), rn.sum(-1, keepdim=True)], dim=-1)

    def response_logits(self, h: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                        pos: torch.Tensor) -> torch.Tensor:
        """(..., K) logits from states (..., H), item vectors (..., K, d), item biases and positions (..., K)."""
        q = self.resp_proj(h)
        raw = (v * q[..., None, :]).sum(-1) + self.resp_user(h) + bias + self.pos_bias[pos]
        return self.calib[0] * raw + self.calib[1]

    def end_logits(self, h_next: torch.Tensor, x: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        d = self.dim
        extra = torch.stack([x[..., 2 * d], x[..., 2 * d + 1], n], dim=-1)
        return self.end(torch.cat([h_next, extra], dim=-1)).squeeze(-1)

    def gru_step(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """One update: (B, 2d+2), (B, H) -> (B, H)."""
        out, _ = self.gru(x[:, None, :], h[None].contiguous())
        return out[:, 0, :]


# =========================================================================== the log

@dataclass
class _Log:
    """An interaction log as steps (slates) in time order, grouped by user."""

    items: np.ndarray       # (E,) dense item ids
    resp: np.ndarray        # (E,) float32 0/1
    pos: np.ndarray         # (E,) int64 positions
    step_ptr: np.ndarray    # (S+1,) events of step s: step_ptr[s]:step_ptr[s+1]
    step_end: np.ndarray    # (S,) float32 1 where the session ends after the step
    user_ptr: np.ndarray    # (U+1,) steps of user u
    user_seg: np.ndarray    # (U,) int64 segment code (0: none)
    user_ids: np.ndarray    # (U,) external user ids
    has_sessions: bool
    dropped: int = 0
    rows: np.ndarray | None = None  # (E,) the input row of each event


_STAR_VALUES = (5.0, 10.0)


def _positive_rule(rewards: np.ndarray, threshold: float | None) -> tuple:
    """``(threshold, strict, reason)``: the rule of :func:`recmeta_sdk.training.loop.positive_threshold`."""
    if threshold is not None:
        return float(threshold), False, "given"
    r = rewards.astype(np.float64)
    if len(r) and np.isin(r, (0.0, 1.0)).all():
        return 1.0, False, "binary rewards"
    if len(r) and r.min() > 0 and np.all(np.mod(r * 2.0, 1.0) == 0.0) and float(r.max()) in _STAR_VALUES \
            and len(np.unique(r)) >= 3:
        return 0.8 * float(r.max()), False, f"rewards look like 1-{float(r.max()):g} star ratings"
    return 0.0, True, "rewards > 0"


def _column(df: pd.DataFrame, name: str | None, default: str, what: str, required: bool) -> str | None:
    """The column to use for ``what``: ``name`` must exist when given explicitly."""
    if name is None:
        if required:
            raise ValueError(f"{what} column name must be given")
        return None
    if not isinstance(name, str):
        raise TypeError(f"{what}_col must be a column name (str), got {type(name).__name__}")
    if name in df.columns:
        return name
    if required or name != default:
        raise ValueError(f"{what} column {name!r} not in interactions (columns: {list(df.columns)})")
    return None


def _finite_numeric(df: pd.DataFrame, col: str) -> np.ndarray:
    """(n,) float64 values of a numeric (or bool) column; TypeError / ValueError naming the column and row."""
    s = df[col]
    if pd.api.types.is_bool_dtype(s):
        return s.to_numpy(dtype=np.float64)
    if not pd.api.types.is_numeric_dtype(s):
        raise TypeError(f"column {col!r} must be numeric, got dtype {s.dtype}")
    x = s.to_numpy(dtype=np.float64, na_value=np.nan)
    bad = ~np.isfinite(x)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ValueError(f"column {col!r} has a non-finite or missing value {x[row]!r} at row {row} "
                         f"(index {df.index[row]!r})")
    return x


# =========================================================================== the model

class WorldModel:
    """A learned user-response, transition and session-end model (see the module docstring).

    Build one with :meth:`fit` or :meth:`load`; the constructor is internal.

    Attributes
    ----------
    config : WorldModelConfig
    item_map : IdMap
        External item id <-> dense row of the catalogue.
    n_items : int
    hidden : int
        Size of a user state.
    n_positions : int
        Slate positions seen in training (predictions at other positions need ``positions=``).
    has_sessions : bool
        Whether the end-of-session head was trained.
    segments : list or None
        The segment values with their own prior (``segment_col`` of :meth:`fit`).
    positive_threshold : tuple
        ``(threshold, strict)``: a reward is a positive when ``> threshold`` (strict) or ``>=``.
    history : list of float
        Training loss per epoch.
    validation_history : list of float
        Loss (the training objective) of the validation users per epoch (empty without validation); the parameters
        are those of the epoch with the lowest.
    """

    def __init__(self, net: _Net, config: WorldModelConfig, item_map: IdMap, feats: dict,
                 encoder: FeatureEncoder | None, segment_map: IdMap | None, has_sessions: bool,
                 threshold: tuple, pop: dict, columns: dict):
        self._net = net.eval()
        self.config = config
        self.item_map = item_map
        self._feats = feats
        self._encoder = encoder
        self._segment_map = segment_map
        self.has_sessions = bool(has_sessions)
        self.positive_threshold = (float(threshold[0]), bool(threshold[1]))
        self._pop = pop
        self._columns = dict(columns)
        self.history: list = []
        self.validation_history: list = []

    # ------------------------------------------------------------------ properties
    @property
    def n_items(self) -> int:
        return len(self.item_map)

    @property
    def hidden(self) -> int:
        return self._net.hidden

    @property
    def n_positions(self) -> int:
        return int(self._net.pos_bias.shape[0])

    @property
    def segments(self) -> list | None:
        return None if self._segment_map is None else self._segment_map.ids.tolist()

    def __repr__(self) -> str:
        return (f"WorldModel(items={self.n_items}, hidden={self.hidden}, positions={self.n_positions}, "
                f"sessions={self.has_sessions}, segments={0 if self._segment_map is None else len(self._segment_map)})")

    # ------------------------------------------------------------------ fitting
    @classmethod
    def fit(cls, interactions: pd.DataFrame, *, item_features: pd.DataFrame | None = None,
            user_col: str = "user", item_col: str = "item", reward_col: str | None = "reward",
            timestamp_col: str | None = "timestamp", position_col: str | None = "position",
            propensity_col: str | None = "propensity", session_col: str | None = "session",
            segment_col: str | None = None, positive_threshold: float | None = None,
            epochs: int | None = None, seed: int | None = None,
            config: WorldModelConfig | dict | None = None) -> WorldModel:
        """Learn a world model from an interaction log.

        Parameters
        ----------
        interactions : DataFrame
            (n, c) log, one row per shown (or consumed) item: ``user_col``, ``item_col`` and,
            optionally, ``reward_col`` (a row is a positive when its reward passes
            ``positive_threshold``; without the column every row is a positive),
            ``timestamp_col`` (the order of events; rows without it keep their order),
            ``position_col`` (0-based slate position: rows of one user with the same
            timestamp form one slate; without a timestamp a slate ends where the position
            stops increasing; without positions every row is a slate of one at position 0),
            ``propensity_col`` (validated to lie in (0, 1]; the response model conditions on
            the shown item, so it needs no propensity weighting), ``session_col`` (the last
            step of each session is the "session ended" label of the end head) and
            ``segment_col`` (a per-user value, constant for each user, with a learned prior
            state per value). The optional columns are used when present; a name given
            explicitly that is absent raises ValueError.
        item_features : DataFrame, optional
            (n_items, f) side features indexed by external item id; every column is encoded
            with :class:`recmeta_sdk.data.FeatureEncoder` (kinds inferred: numbers are
            normalised, ``|``-separated strings and lists are multi-valued, the rest
            categorical). Items that appear only here join the catalogue (their vectors come
            from their features).
        positive_threshold : float, optional
            A reward ``>=`` it is a positive. Default: rewards in {0, 1} as they are, star
            ratings (1-5 or 1-10, half steps) from 4 of 5 (8 of 10), otherwise reward > 0.
        epochs, seed : int, optional
            Overrides of ``config.epochs`` (default 20) / ``config.seed`` (default 0).
        config : WorldModelConfig or dict, optional
            Other hyper-parameters.

        Returns
        -------
        WorldModel
            ``history`` holds the mean training loss per epoch, ``validation_history`` the
            validation users' loss per epoch (the parameters kept are the best epoch's).

        Raises
        ------
        TypeError
            If ``interactions`` / ``item_features`` are not DataFrames or a column has a wrong dtype.
        ValueError
            If a column is missing, holds a missing / non-finite value, a negative or
            non-integer position, a propensity outside (0, 1], a segment that varies within a
            user, a session that is not contiguous in time, or the log is empty.
        """
        if isinstance(config, dict):
            bad = set(config) - set(WorldModelConfig.__dataclass_fields__)
            if bad:
                raise ValueError(f"unknown WorldModelConfig field(s): {sorted(bad)}")
            cfg = WorldModelConfig(**config)
        elif config is None:
            cfg = WorldModelConfig()
        elif isinstance(config, WorldModelConfig):
            cfg = WorldModelConfig(**asdict(config))
        else:
            raise TypeError(f"config must be a WorldModelConfig or a dict, got {type(config).__name__}")
        if epochs is not None:
            cfg.epochs = epochs
        if seed is not None:
            cfg.seed = seed
        cfg.validate()
        if not isinstance(interactions, pd.DataFrame):
            raise TypeError(f"interactions must be a pandas DataFrame, got {type(interactions).__name__}")
        if item_features is not None and not isinstance(item_features, pd.DataFrame):
            raise TypeError(f"item_features must be a DataFrame indexed by item id, got {type(item_features).__name__}")
        if len(interactions) == 0:
            raise ValueError("interactions is empty: nothing to learn from")
        cols = {"user": _column(interactions, user_col, "user", "user", True),
                "item": _column(interactions, item_col, "item", "item", True),
                "reward": _column(interactions, reward_col, "reward", "reward", False),
                "timestamp": _column(interactions, timestamp_col, "timestamp", "timestamp", False),
                "position": _column(interactions, position_col, "position", "position", False),
                "propensity": _column(interactions, propensity_col, "propensity", "propensity", False),
                "session": _column(interactions, session_col, "session", "session", False),
                "segment": _column(interactions, segment_col, "", "segment", False) if segment_col else None}
        for c in ("user", "item"):
            if interactions[cols[c]].isna().any():
                row = int(np.flatnonzero(interactions[cols[c]].isna().to_numpy())[0])
                raise ValueError(f"column {cols[c]!r} has a missing value at row {row}")
        # the catalogue: items of the log, then items that only have features
        log_items = pd.unique(interactions[cols["item"]].to_numpy())
        if item_features is not None:
            if not item_features.index.is_unique:
                raise ValueError("item_features must be indexed by unique item ids")
            extra = item_features.index[~item_features.index.isin(log_items)]
            item_map = IdMap(pd.Index(log_items).append(extra) if len(extra) else log_items)
        else:
            item_map = IdMap(log_items)
        rewards = (_finite_numeric(interactions, cols["reward"]) if cols["reward"]
                   else np.ones(len(interactions)))
        thr, strict, why = _positive_rule(rewards, positive_threshold)
        logger.info("world model: positives are rewards %s %g (%s)", ">" if strict else ">=", thr, why)
        segment_map = None
        if cols["segment"]:
            if interactions[cols["segment"]].isna().any():
                raise ValueError(f"segment column {cols['segment']!r} has missing values")
            segment_map = IdMap.fit(interactions[cols["segment"]])
        encoder, feats = None, _empty_feats(len(item_map))
        if item_features is not None and item_features.shape[1]:
            for col in item_features.columns:
                s = item_features[col]
                if pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s):
                    x = s.to_numpy(dtype=np.float64, na_value=np.nan)
                    if np.isinf(x).any():
                        row = int(np.flatnonzero(np.isinf(x))[0])
                        raise ValueError(f"item feature {col!r} is infinite for item {item_features.index[row]!r}")
            encoder = FeatureEncoder().fit(item_features)
            enc = encoder.transform(item_features, index=item_map)
            feats = _feats_from(enc)
        log = _build_log(interactions, cols, item_map, (thr, strict), segment_map, unknown="raise")
        n_positions = int(log.pos.max()) + 1 if len(log.pos) else 1
        gen = torch.Generator().manual_seed(cfg.seed)
        net = _Net(len(item_map), feats["n_tokens"], feats["n_numeric"], n_positions,
                   1 + (len(segment_map) if segment_map is not None else 0), cfg.dim, cfg.hidden)
        _init_params(net, gen)
        pop = _popularity(log, len(item_map), n_positions)
        with torch.no_grad():  # start the biases at the empirical rates
            net.item_bias.copy_(torch.as_tensor(pop["item_logit"], dtype=torch.float32))
            net.pos_bias.copy_(torch.as_tensor(pop["pos_logit"], dtype=torch.float32))
            shown = torch.as_tensor(pop["shown"], dtype=torch.float32)
            lp = torch.log(shown + 1.0)
            net.next_bias.copy_(lp - lp.mean())
        model = cls(net, cfg, item_map, feats, encoder, segment_map, log.has_sessions, (thr, strict),
                    {k: pop[k] for k in ("item_logit", "pos_logit", "positives", "end_rate")}, cols)
        model.history, model.validation_history = _train(net, log, feats, cfg, gen)
        net.eval()
        return model

    # ------------------------------------------------------------------ state API
    def initial_state(self, n: int | None = None, *, segments: Sequence[Any] | None = None) -> np.ndarray:
        """The learned prior states (no interaction seen yet).

        Parameters
        ----------
        n : int, optional
            Number of states (default 1, or ``len(segments)``).
        segments : sequence, optional
            (n,) segment values (of ``segment_col`` at :meth:`fit`); ``None`` entries take the
            global prior.

        Returns
        -------
        ndarray
            (n, hidden) float32.

        Raises
        ------
        ValueError
            If ``n`` is not a positive integer, disagrees with ``len(segments)``, or a
            segment is unknown (or the model has no segments).
        """
        if segments is not None:
            codes = self._segment_codes(segments)
            if n is not None and int(n) != len(codes):
                raise ValueError(f"n={n} disagrees with len(segments)={len(codes)}")
        else:
            if n is None:
                n = 1
            if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
                raise ValueError(f"n must be a positive integer, got {n!r}")
            codes = np.zeros(int(n), np.int64)
        with torch.no_grad():
            return self._net.h0(torch.as_tensor(codes)).numpy().copy()

    def adapt(self, history_items: Any, history_rewards: Any = None, *, positions: Any = None,
              segment: Any = None) -> np.ndarray:
        """Roll a user's first interactions through the update from the prior: the fast adaptation.

        Parameters
        ----------
        history_items : array-like
            (n,) external item ids, one step (a slate of one) each, in time order; or
            (T, K) slates of K items.
        history_rewards : array-like, optional
            Same shape: the rewards as in the training logs, turned into 0/1 responses with
            the model's ``positive_threshold`` (for a model trained on 1-5 star ratings a
            reward of 1 is a negative). Default: every item is a positive.
        positions : array-like, optional
            Same shape: positions, validated (the state update does not depend on them).
        segment : optional
            The user's segment value (its prior); default the global prior.

        Returns
        -------
        ndarray
            (hidden,) float32 state after the history (the prior for an empty history).
        """
        items = np.asarray(history_items)
        if items.ndim not in (1, 2):
            raise ValueError(f"history_items must be 1-D (n,) or 2-D (T, K), got shape {items.shape}")
        slates = items[:, None] if items.ndim == 1 else items
        if history_rewards is None:
            resp = np.ones(slates.shape, np.float32)
        else:
            resp = self._responses(history_rewards, items.shape, "history_rewards").reshape(slates.shape)
        if positions is not None:  # validated only: the state update does not depend on positions
            self._positions(positions, items.shape)
        state = self.initial_state(segments=[segment]) if segment is not None else self.initial_state(1)
        if slates.shape[0] == 0:
            return state[0]
        dense = self._dense_items(slates)
        with torch.no_grad():
            V = self._item_vectors()
            x = self._net.step_input(V[torch.as_tensor(dense)], torch.as_tensor(resp),
                                     torch.ones(dense.shape, dtype=torch.bool))
            out, _ = self._net.gru(x[None], torch.as_tensor(state)[None])
        return out[0, -1].numpy().copy()

    def predict(self, state: Any, slate: Any, *, positions: Any = None) -> np.ndarray:
        """Click (positive-response) probability of each slate position.

        Parameters
        ----------
        state : array-like
            (B, hidden) states (or (hidden,) for one user).
        slate : array-like
            (B, K) external item ids (or (K,)).
        positions : array-like, optional
            (B, K) or (K,) positions; default ``0..K-1`` (must be < ``n_positions``).

        Returns
        -------
        ndarray
            (B, K) float32 probabilities in (0, 1) ((K,) for a 1-D state and slate).
        """
        h, dense, pos, squeeze = self._slate_args(state, slate, positions)
        with torch.no_grad():
            p = torch.sigmoid(self._logits(h, dense, pos)).numpy()
        return p[0] if squeeze else p

    def step(self, state: Any, slate: Any, response: Any, *, positions: Any = None) -> np.ndarray:
        """The next state after showing ``slate`` and observing ``response``.

        Parameters
        ----------
        state : array-like
            (B, hidden) (or (hidden,)).
        slate : array-like
            (B, K) external item ids (or (K,)).
        response : array-like
            (B, K) 0/1 responses (what :meth:`sample_response` draws), same shape as
            ``slate``; raw rewards (e.g. star ratings) go through :meth:`adapt`, which
            applies the model's ``positive_threshold``.
        positions : array-like, optional
            Unused by the update (kept for a uniform signature); validated when given.

        Returns
        -------
        ndarray
            (B, hidden) float32 ((hidden,) for 1-D inputs).
        """
        h, dense, _, squeeze = self._slate_args(state, slate, positions)
        r = self._binary(response, np.shape(slate)).reshape(dense.shape)
        with torch.no_grad():
            h2, _ = self._transition(h, dense, r)
        out = h2.numpy()
        return out[0] if squeeze else out

    def end_probability(self, state: Any, slate: Any, response: Any, *, positions: Any = None) -> np.ndarray:
        """Probability that the session ends after this step (slate shown, response observed).

        Parameters
        ----------
        state, slate, response, positions
            As in :meth:`step`.

        Returns
        -------
        ndarray
            (B,) float32 (a 0-d array for 1-D inputs).

        Raises
        ------
        ValueError
            If the model was trained on logs without sessions (the head is untrained).
        """
        if not self.has_sessions:
            raise ValueError("this world model was trained without session ids (session_col): "
                             "it has no end-of-session model")
        h, dense, _, squeeze = self._slate_args(state, slate, positions)
        r = self._binary(response, np.shape(slate)).reshape(dense.shape)
        with torch.no_grad():
            h2, x = self._transition(h, dense, r)
            n = torch.full((dense.shape[0],), float(dense.shape[1]))
            p = torch.sigmoid(self._net.end_logits(h2, x, n)).numpy()
        return p[0] if squeeze else p

    def sample_response(self, state: Any, slate: Any, rng: np.random.Generator, *,
                        positions: Any = None) -> np.ndarray:
        """Draw responses from the model (a learned simulator for rollouts).

        Parameters
        ----------
        state, slate, positions
            As in :meth:`predict`.
        rng : numpy.random.Generator
            The source of randomness (required: nothing is drawn from global state).

        Returns
        -------
        ndarray
            (B, K) float32 0/1 (independent Bernoulli draws of :meth:`predict`).
        """
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
        p = self.predict(state, slate, positions=positions)
        return (rng.random(p.shape) < p).astype(np.float32)

    def item_probabilities(self, state: Any, *, position: int = 0) -> np.ndarray:
        """Click (positive-response) probability of every catalogue item shown at ``position``.

        Parameters
        ----------
        state : array-like
            (B, hidden) (or (hidden,)).
        position : int
            The slate position (``0 <= position < n_positions``).

        Returns
        -------
        ndarray
            (B, n_items) float32, columns in ``item_map`` order (``item_map.ids``);
            (n_items,) for a 1-D state.
        """
        if isinstance(position, bool) or not isinstance(position, (int, np.integer)) \
                or not 0 <= position < self.n_positions:
            raise ValueError(f"position must be an integer in [0, {self.n_positions}), got {position!r}")
        h, squeeze = self._states(state)
        with torch.no_grad():
            p = torch.sigmoid(self._all_logits(h, int(position))).numpy()
        return p[0] if squeeze else p

    def next_item_scores(self, state: Any) -> np.ndarray:
        """``log P(next item = i) + log P(positive | i, position 0)`` for every catalogue item.

        Parameters
        ----------
        state : array-like
            (B, hidden) (or (hidden,)).

        Returns
        -------
        ndarray
            (B, n_items) float32, columns in ``item_map`` order ((n_items,) for a 1-D state).
        """
        h, squeeze = self._states(state)
        with torch.no_grad():
            s = self._item_scores(h, self._item_vectors()).numpy()
        return s[0] if squeeze else s

    def log_states(self, log: pd.DataFrame) -> np.ndarray:
        """The user's state before each row's step, rolled in through the user's earlier rows.

        What a reward model needs per logged round (e.g. for
        :func:`recmeta_sdk.evaluation.ope.world_model_q`): row ``i``'s state has seen every
        earlier step of the same user in the log (by timestamp, then position), not its own.

        Parameters
        ----------
        log : DataFrame
            A log with the training columns (the same names as :meth:`fit`); every item must
            be in the catalogue.

        Returns
        -------
        ndarray
            (len(log), hidden) float32, in the rows' order.
        """
        if not isinstance(log, pd.DataFrame):
            raise TypeError(f"log must be a pandas DataFrame, got {type(log).__name__}")
        if len(log) == 0:
            raise ValueError("log is empty")
        cols = {key: (name if (name is not None and name in log.columns) else None)
                for key, name in self._columns.items()}
        for key in ("user", "item"):
            if cols[key] is None:
                raise ValueError(f"log lacks the {key} column {self._columns[key]!r}")
        if self._segment_map is not None and cols["segment"] is None:
            raise ValueError(f"log lacks the segment column {self._columns['segment']!r}")
        lg = _build_log(log, cols, self.item_map, self.positive_threshold, self._segment_map,
                        unknown="raise", n_positions=self.n_positions)
        out = np.zeros((len(log), self.hidden), np.float32)
        ev_step = np.repeat(np.arange(len(lg.step_ptr) - 1), np.diff(lg.step_ptr))
        step_user = np.repeat(np.arange(len(lg.user_ptr) - 1), np.diff(lg.user_ptr))
        with torch.no_grad():
            V = self._item_vectors()
            for lo in range(0, len(lg.user_ptr) - 1, 64):
                ub = np.arange(lo, min(lo + 64, len(lg.user_ptr) - 1))
                before = _forward(self._net, _batch(lg, ub, 10**12), V)[0].numpy()
                ev = np.flatnonzero((step_user[ev_step] >= ub[0]) & (step_user[ev_step] <= ub[-1]))
                s = ev_step[ev]
                u = step_user[s]
                out[lg.rows[ev]] = before[u - ub[0], s - lg.user_ptr[u]]
        return out

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, held_out: pd.DataFrame, *, support: int = 10, online: bool = True, k: int = 10,
                 n_bins: int = 10, unknown_items: str = "raise") -> dict:
        """The model's own metrics on held-out users, against no adaptation and popularity.

        Each held-out user's first ``support`` steps are shown to the model (not scored);
        every later step is scored. Three models are scored on the same events:

        * ``world_model``: the state rolled in through the support steps and, with
          ``online=True``, through every later step as its response is revealed
          (one-step-ahead prediction); with ``online=False`` frozen after the support;
        * ``no_adaptation``: the prior state (per segment) for every step, no roll-in;
        * ``popularity``: each item's smoothed positive rate in the training logs, with the
          position biases of the training logs; items ranked by positive count.

        Parameters
        ----------
        held_out : DataFrame
            Log of held-out users with the training columns (same names as :meth:`fit`).
        support : int
            Steps per user used for adaptation only (users with no step beyond it are skipped).
        online : bool
            Keep rolling the state in after the support.
        k : int
            Cut-off of the next-item hit rate.
        n_bins : int
            Equal-width bins of the calibration (reliability) table.
        unknown_items : {"raise", "drop"}
            Rows naming items outside the catalogue: ValueError, or dropped (counted in
            ``dropped_events``).

        Returns
        -------
        dict
            ``{"world_model": m, "no_adaptation": m, "popularity": m, "users": int,
            "events": int, "targets": int, "dropped_events": int, "support": int,
            "online": bool}`` with each ``m`` a dict: ``log_likelihood`` (mean Bernoulli
            log-likelihood per scored event, nats), ``ece`` (expected calibration error of
            the predicted positive rates), ``reliability`` (list of per-bin dicts: ``lo``,
            ``hi``, ``count``, ``mean_predicted``, ``mean_observed``; the means are None for an
            empty bin), ``hit@k`` (fraction of
            scored positive events whose item ranks in the top ``k`` among all catalogue
            items not in the user's earlier history) and, with sessions,
            ``end_log_likelihood`` (per scored step; popularity: the training end rate).
        """
        if not isinstance(held_out, pd.DataFrame):
            raise TypeError(f"held_out must be a pandas DataFrame, got {type(held_out).__name__}")
        for name, v, lo in (("support", support, 0), ("k", k, 1), ("n_bins", n_bins, 1)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
        if unknown_items not in ("raise", "drop"):
            raise ValueError(f"unknown_items must be 'raise' or 'drop', got {unknown_items!r}")
        if len(held_out) == 0:
            raise ValueError("held_out is empty")
        cols = {}
        for key, name in self._columns.items():
            cols[key] = name if (name is not None and name in held_out.columns) else None
        for key in ("user", "item"):
            if cols[key] is None:
                raise ValueError(f"held_out lacks the {key} column {self._columns[key]!r}")
        if self._segment_map is not None and cols["segment"] is None:
            raise ValueError(f"held_out lacks the segment column {self._columns['segment']!r}")
        log = _build_log(held_out, cols, self.item_map, self.positive_threshold, self._segment_map,
                         unknown=unknown_items, n_positions=self.n_positions)
        return _evaluate(self, log, int(support), bool(online), int(k), int(n_bins))

    # ------------------------------------------------------------------ persistence
    def save(self, path) -> None:
        """Write the model atomically (temp file, fsync, :func:`os.replace`) as safetensors + JSON.

        Parameters
        ----------
        path : str or os.PathLike
            Destination file (its directory must exist). Uses
            :func:`recmeta_sdk.model.io.write_model_file`: a SHA-256 over metadata and tensors, no pickle.
        """
        tensors = {f"net.{k}": v.detach().clone() for k, v in self._net.state_dict().items()}
        tensors["feat.indices"] = self._feats["indices"].clone()
        tensors["feat.offsets"] = self._feats["offsets"].clone()
        tensors["feat.numeric"] = self._feats["numeric"].clone()
        for key in ("item_logit", "pos_logit", "positives"):
            tensors[f"pop.{key}"] = torch.as_tensor(self._pop[key])
        meta = {
            "kind": WORLD_MODEL_KIND,
            "world_model_version": WORLD_MODEL_VERSION,
            "config": asdict(self.config),
            "items": self.item_map.to_dict(),
            "segments": None if self._segment_map is None else self._segment_map.to_dict(),
            "feature_encoder": None if self._encoder is None else self._encoder.to_dict(),
            "n_tokens": int(self._feats["n_tokens"]),
            "n_numeric": int(self._feats["n_numeric"]),
            "n_positions": self.n_positions,
            "has_sessions": self.has_sessions,
            "positive_threshold": [self.positive_threshold[0], self.positive_threshold[1]],
            "pop_end_rate": float(self._pop.get("end_rate", 0.0)),
            "columns": self._columns,
            "history": [float(x) for x in self.history],
            "validation_history": [float(x) for x in self.validation_history],
        }
        write_model_file(path, tensors, meta)

    @classmethod
    def load(cls, path, *, limits: LoadLimits | None = None) -> WorldModel:
        """Read a model written by :meth:`save`, validating it before anything is built.

        Parameters
        ----------
        path : str or os.PathLike
        limits : LoadLimits, optional
            Bounds on the file (see :class:`recmeta_sdk.LoadLimits`).

        Returns
        -------
        WorldModel

        Raises
        ------
        FileNotFoundError
            If there is no file at ``path``.
        ModelFileError
            If the file is truncated, tampered with (SHA-256), not a world-model file, of an
            unknown version, or its tensors disagree with its metadata.
        """
        tensors, meta = read_model_file(path, limits)
        try:
            return cls._from_file(tensors, meta)
        except ModelFileError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as e:
            raise ModelFileError(f"{path}: inconsistent world-model file: {e}") from None

    @classmethod
    def _from_file(cls, tensors: dict, meta: dict) -> WorldModel:
        if meta.get("kind") != WORLD_MODEL_KIND:
            raise ModelFileError(f"not a world-model file (kind {meta.get('kind')!r}; a recommender is read "
                                 f"with recmeta_sdk.load)")
        if meta.get("world_model_version") != WORLD_MODEL_VERSION:
            raise ModelFileError(f"unsupported world_model_version {meta.get('world_model_version')!r} "
                                 f"(this version reads {WORLD_MODEL_VERSION})")
        raw_cfg = meta["config"]
        if not isinstance(raw_cfg, dict) or set(raw_cfg) != set(WorldModelConfig.__dataclass_fields__):
            raise ModelFileError("config has missing or unknown fields")
        cfg = WorldModelConfig(**raw_cfg).validate()
        item_map = IdMap.from_dict(meta["items"])
        segment_map = None if meta["segments"] is None else IdMap.from_dict(meta["segments"])
        encoder = None if meta["feature_encoder"] is None else FeatureEncoder.from_dict(meta["feature_encoder"])
        n_tokens, n_numeric, n_pos = (int(meta["n_tokens"]), int(meta["n_numeric"]), int(meta["n_positions"]))
        n_items = len(item_map)
        for name, v in (("n_tokens", n_tokens), ("n_numeric", n_numeric), ("n_positions", n_pos)):
            if not 0 <= v <= 10_000_000 or (name == "n_positions" and v < 1):
                raise ModelFileError(f"{name}={v} is out of range")
        n_seg = 1 + (len(segment_map) if segment_map is not None else 0)
        net = _Net(n_items, n_tokens, n_numeric, n_pos, n_seg, cfg.dim, cfg.hidden)
        expected = {f"net.{k}": tuple(v.shape) for k, v in net.state_dict().items()}
        nnz = int(tensors["feat.indices"].shape[0]) if "feat.indices" in tensors else -1
        expected.update({"feat.indices": (nnz,), "feat.offsets": (n_items + 1,),
                         "feat.numeric": (n_items, n_numeric), "pop.item_logit": (n_items,),
                         "pop.pos_logit": (n_pos,), "pop.positives": (n_items,)})
        if set(tensors) != set(expected):
            missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
            raise ModelFileError(f"tensors do not match the world model: missing {missing}, unexpected {extra}")
        for name, shape in expected.items():
            if tuple(tensors[name].shape) != shape:
                raise ModelFileError(f"tensor {name!r} has shape {tuple(tensors[name].shape)}, expected {shape}")
        for name, t in tensors.items():
            want = torch.int64 if name in ("feat.indices", "feat.offsets", "pop.positives") else \
                (torch.float64 if name.startswith("pop.") else torch.float32)
            if t.dtype != want:
                raise ModelFileError(f"tensor {name!r} has dtype {t.dtype}, expected {want}")
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise ModelFileError(f"tensor {name!r} holds non-finite values")
        if not float(tensors["net.calib"][0]) > 0:
            raise ModelFileError(f"net.calib scale {float(tensors['net.calib'][0])!r} must be > 0")
        off, idx = tensors["feat.offsets"], tensors["feat.indices"]
        if int(off[0]) != 0 or int(off[-1]) != nnz or bool((off[1:] < off[:-1]).any()):
            raise ModelFileError("feat.offsets is not a valid CSR offset array")
        if nnz and (int(idx.min()) < 0 or int(idx.max()) >= n_tokens):
            raise ModelFileError(f"feat.indices outside [0, {n_tokens})")
        if encoder is not None and encoder.n_tokens != n_tokens:
            raise ModelFileError(f"feature encoder has {encoder.n_tokens} tokens, the file {n_tokens}")
        net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")}, strict=True)
        feats = {"indices": idx, "offsets": off, "numeric": tensors["feat.numeric"], "n_tokens": n_tokens,
                 "n_numeric": n_numeric}
        thr = meta["positive_threshold"]
        if not (isinstance(thr, list) and len(thr) == 2 and isinstance(thr[1], bool)
                and isinstance(thr[0], (int, float)) and math.isfinite(float(thr[0]))):
            raise ModelFileError(f"positive_threshold {thr!r} is malformed")
        pop = {k: tensors[f"pop.{k}"].numpy() for k in ("item_logit", "pos_logit", "positives")}
        end_rate = float(meta["pop_end_rate"])
        if not 0.0 <= end_rate <= 1.0:
            raise ModelFileError(f"pop_end_rate {end_rate!r} outside [0, 1]")
        pop["end_rate"] = end_rate
        columns = meta["columns"]
        if not isinstance(columns, dict) or set(columns) != {"user", "item", "reward", "timestamp", "position",
                                                             "propensity", "session", "segment"} \
                or not all(v is None or isinstance(v, str) for v in columns.values()):
            raise ModelFileError(f"columns {columns!r} is malformed")
        if not isinstance(meta["has_sessions"], bool):
            raise ModelFileError("has_sessions must be a bool")
        model = cls(net, cfg, item_map, feats, encoder, segment_map, meta["has_sessions"], (thr[0], thr[1]),
                    pop, columns)
        model.history = [float(x) for x in meta.get("history", [])]
        model.validation_history = [float(x) for x in meta.get("validation_history", [])]
        return model

    # ------------------------------------------------------------------ internals
    def _item_vectors(self) -> torch.Tensor:
        return self._net.item_vectors(self._feats)

    def _logits(self, h: torch.Tensor, dense: np.ndarray, pos: np.ndarray) -> torch.Tensor:
        V = self._item_vectors()
        d = torch.as_tensor(dense)
        return self._net.response_logits(h, V[d], self._net.item_bias[d], torch.as_tensor(pos))

    def _transition(self, h: torch.Tensor, dense: np.ndarray, r: np.ndarray):
        V = self._item_vectors()
        x = self._net.step_input(V[torch.as_tensor(dense)], torch.as_tensor(r),
                                 torch.ones(dense.shape, dtype=torch.bool))
        return self._net.gru_step(x, h), x

    def _all_logits(self, h: torch.Tensor, position: int = 0, V: torch.Tensor | None = None) -> torch.Tensor:
        """(B, n_items) calibrated response logits of every item at ``position`` (no checks)."""
        net = self._net
        V = self._item_vectors() if V is None else V
        raw = net.resp_proj(h) @ V.T + net.resp_user(h) + net.item_bias + net.pos_bias[position]
        return net.calib[0] * raw + net.calib[1]

    def _dense_step(self, h: torch.Tensor, dense: torch.Tensor, r: torch.Tensor, V: torch.Tensor,
                    with_end: bool) -> tuple:
        """Planner fast path (no checks): next states (B, H) and, with ``with_end`` and a
        session model, P(end) (B,) after slates ``dense`` (B, K) with 0/1 responses ``r``."""
        net = self._net
        x = net.step_input(V[dense], r, torch.ones(dense.shape, dtype=torch.bool))
        h2 = net.gru_step(x, h)
        if not (with_end and self.has_sessions):
            return h2, None
        n = torch.full((dense.shape[0],), float(dense.shape[1]))
        return h2, torch.sigmoid(net.end_logits(h2, x, n))

    def _item_scores(self, h: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        net = self._net
        nxt = torch.log_softmax(net.next_proj(h) @ V.T + net.next_bias, dim=-1)
        resp = net.resp_proj(h) @ V.T + net.resp_user(h) + net.item_bias + net.pos_bias[0]
        resp = net.calib[0] * resp + net.calib[1]
        return nxt + torch.nn.functional.logsigmoid(resp)

    def _states(self, state: Any):
        if isinstance(state, torch.Tensor):
            state = state.detach().cpu().numpy()
        s = np.asarray(state)
        if s.dtype.kind not in "fiu":
            raise TypeError(f"state must be a float array, got dtype {s.dtype}")
        squeeze = s.ndim == 1
        s = s[None] if squeeze else s
        if s.ndim != 2 or s.shape[1] != self.hidden:
            raise ValueError(f"state must have shape (B, {self.hidden}) or ({self.hidden},), got {np.shape(state)}")
        if not np.isfinite(s).all():
            raise ValueError("state holds non-finite values")
        return torch.as_tensor(s, dtype=torch.float32), squeeze

    def _dense_items(self, slate: np.ndarray) -> np.ndarray:
        flat = slate.ravel()
        dense = self.item_map.to_index(flat) if len(flat) else np.zeros(0, np.int64)
        if (dense < 0).any():
            bad = flat[dense < 0][:5].tolist()
            raise ValueError(f"unknown item ids {bad} (not in the world model's catalogue of {self.n_items})")
        return np.asarray(dense, np.int64).reshape(slate.shape)

    def _positions(self, positions: Any, shape: tuple) -> np.ndarray:
        p = np.asarray(positions)
        if p.dtype.kind not in "iu":
            if p.dtype.kind == "f" and np.isfinite(p).all() and (p == np.round(p)).all():
                p = p.astype(np.int64)
            else:
                raise TypeError(f"positions must be integers, got dtype {p.dtype}")
        p = np.broadcast_to(p, shape) if p.shape != shape and p.ndim <= len(shape) else p
        if p.shape != shape:
            raise ValueError(f"positions has shape {np.shape(positions)}, expected {shape}")
        if p.size and (p.min() < 0 or p.max() >= self.n_positions):
            bad = p[(p < 0) | (p >= self.n_positions)].ravel()[0]
            raise ValueError(f"position {int(bad)} outside the trained positions [0, {self.n_positions}); "
                             f"pass positions= explicitly for longer slates")
        return p.astype(np.int64)

    def _responses(self, response: Any, shape: tuple, what: str) -> np.ndarray:
        r = np.asarray(response)
        if r.dtype.kind not in "fiub":
            raise TypeError(f"{what} must be numeric, got dtype {r.dtype}")
        r = r.astype(np.float64)
        if r.shape != tuple(shape):
            raise ValueError(f"{what} has shape {r.shape}, expected {tuple(shape)} (the slate's shape)")
        if not np.isfinite(r).all():
            raise ValueError(f"{what} holds a non-finite value {r[~np.isfinite(r)].ravel()[0]!r}")
        thr, strict = self.positive_threshold
        return ((r > thr) if strict else (r >= thr)).astype(np.float32)

    def _binary(self, response: Any, shape: tuple) -> np.ndarray:
        r = np.asarray(response)
        if r.dtype.kind not in "fiub":
            raise TypeError(f"response must be numeric 0/1, got dtype {r.dtype}")
        if r.shape != tuple(shape):
            raise ValueError(f"response has shape {r.shape}, expected {tuple(shape)} (the slate's shape)")
        bad = ~np.isin(r, (0, 1))
        if bad.any():
            raise ValueError(f"response must hold 0/1 values (as sample_response draws), got {r[bad].ravel()[0]!r}; "
                             f"raw rewards go through adapt(), which thresholds them")
        return r.astype(np.float32)

    def _slate_args(self, state: Any, slate: Any, positions: Any):
        h, squeeze = self._states(state)
        s = np.asarray(slate)
        if squeeze != (s.ndim == 1) or s.ndim not in (1, 2):
            raise ValueError(f"slate must be (B, K) with a (B, hidden) state or (K,) with a (hidden,) state, "
                             f"got slate shape {s.shape} and state shape {tuple(np.shape(state))}")
        s2 = s[None] if s.ndim == 1 else s
        if s2.shape[0] != h.shape[0]:
            raise ValueError(f"slate has {s2.shape[0]} rows but state has {h.shape[0]}")
        if s2.shape[1] == 0:
            raise ValueError("slate is empty (K = 0)")
        dense = self._dense_items(s2)
        if positions is None:
            if s2.shape[1] > self.n_positions:
                raise ValueError(f"slate of {s2.shape[1]} positions, the model was trained on positions "
                                 f"[0, {self.n_positions}): pass positions= explicitly")
            pos = np.broadcast_to(np.arange(s2.shape[1]), s2.shape).copy()
        else:
            pp = np.asarray(positions)
            pos = self._positions(pp[None] if squeeze and pp.ndim == 1 else pp, s2.shape)
        return h, dense, pos, squeeze

    def _segment_codes(self, segments: Sequence[Any]) -> np.ndarray:
        seg = list(segments) if not isinstance(segments, (str, bytes)) else [segments]
        if len(seg) == 0:
            raise ValueError("segments is empty")
        out = np.zeros(len(seg), np.int64)
        for j, s in enumerate(seg):
            if s is None:
                continue
            if self._segment_map is None:
                raise ValueError(f"segment {s!r} given but the model was trained without segment_col")
            code = int(self._segment_map.to_index([s])[0])
            if code < 0:
                raise ValueError(f"unknown segment {s!r} (known: {self.segments[:10]})")
            out[j] = code + 1
        return out


# =========================================================================== helpers

def _empty_feats(n_items: int) -> dict:
    return {"indices": torch.zeros(0, dtype=torch.int64), "offsets": torch.zeros(n_items + 1, dtype=torch.int64),
            "numeric": torch.zeros(n_items, 0, dtype=torch.float32), "n_tokens": 0, "n_numeric": 0}


def _feats_from(enc) -> dict:
    return {"indices": torch.as_tensor(enc.indices, dtype=torch.int64),
            "offsets": torch.as_tensor(enc.offsets, dtype=torch.int64),
            "numeric": torch.as_tensor(enc.numeric, dtype=torch.float32),
            "n_tokens": int(enc.n_tokens), "n_numeric": int(enc.numeric.shape[1])}


def _build_log(df: pd.DataFrame, cols: dict, item_map: IdMap, threshold: tuple, segment_map: IdMap | None,
               *, unknown: str, n_positions: int | None = None) -> _Log:
    """Validate a log and turn it into time-ordered steps per user."""
    n = len(df)
    dense = item_map.to_index(df[cols["item"]].to_numpy())
    keep = dense >= 0
    dropped = int((~keep).sum())
    if dropped and unknown == "raise":
        bad = df[cols["item"]].to_numpy()[~keep][:5].tolist()
        raise ValueError(f"{dropped} rows name items outside the catalogue, e.g. {bad} "
                         f"(unknown_items='drop' drops them)")
    if dropped:
        logger.info("world model: dropped %d of %d rows naming unknown items", dropped, n)
    rewards = _finite_numeric(df, cols["reward"]) if cols["reward"] else np.ones(n)
    thr, strict = threshold
    resp = ((rewards > thr) if strict else (rewards >= thr)).astype(np.float32)
    ts = None
    if cols["timestamp"]:
        s = df[cols["timestamp"]]
        if pd.api.types.is_datetime64_any_dtype(s):
            if s.isna().any():
                raise ValueError(f"column {cols['timestamp']!r} has a missing value at row "
                                 f"{int(np.flatnonzero(s.isna().to_numpy())[0])}")
            ts = s.to_numpy(dtype="datetime64[ns]").view(np.int64).astype(np.float64)
        else:
            ts = _finite_numeric(df, cols["timestamp"])
    if cols["position"]:
        p = _finite_numeric(df, cols["position"])
        bad = (p < 0) | (p != np.round(p)) | (p > 100_000)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise ValueError(f"column {cols['position']!r} must hold integers in [0, 100000], got {p[row]!r} "
                             f"at row {row}")
        pos = p.astype(np.int64)
        if n_positions is not None and (pos[keep] >= n_positions).any():
            bad_p = int(pos[keep][pos[keep] >= n_positions][0])
            raise ValueError(f"position {bad_p} outside the model's trained positions [0, {n_positions})")
    else:
        pos = np.zeros(n, np.int64)
    if cols["propensity"]:
        q = _finite_numeric(df, cols["propensity"])
        bad = (q <= 0) | (q > 1)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise ValueError(f"column {cols['propensity']!r} must lie in (0, 1], got {q[row]!r} at row {row}")
    users = df[cols["user"]].to_numpy()
    user_codes, user_uniques = pd.factorize(users)
    sess_codes = None
    if cols["session"]:
        s = df[cols["session"]]
        if s.isna().any():
            raise ValueError(f"column {cols['session']!r} has a missing value at row "
                             f"{int(np.flatnonzero(s.isna().to_numpy())[0])}")
        sess_codes = pd.factorize(s.to_numpy())[0].astype(np.int64)
    seg_codes = None
    if segment_map is not None:
        s = df[cols["segment"]]
        if s.isna().any():
            raise ValueError(f"segment column {cols['segment']!r} has missing values")
        seg_codes = segment_map.to_index(s.to_numpy())
        if (seg_codes < 0).any():
            bad = s.to_numpy()[seg_codes < 0][:3].tolist()
            raise ValueError(f"unknown segment values {bad} (known: {segment_map.ids[:10].tolist()})")
        seg_codes = seg_codes + 1
    rows = np.arange(n)[keep]
    if len(rows) == 0:
        raise ValueError("no row left to build a log from (every item is unknown)")
    # order: user (first appearance), then time, then position, then row
    keys = [rows, pos[rows]] + ([ts[rows]] if ts is not None else []) + [user_codes[rows]]
    order = rows[np.lexsort(keys)]
    u, it, r, pp = user_codes[order], dense[order], resp[order], pos[order]
    new_step = np.ones(len(order), bool)
    if cols["position"]:
        same_user = u[1:] == u[:-1]
        if ts is not None:
            cont = same_user & (ts[order][1:] == ts[order][:-1])
        else:
            cont = same_user & (pp[1:] > pp[:-1])
        if sess_codes is not None:
            cont &= sess_codes[order][1:] == sess_codes[order][:-1]
        new_step[1:] = ~cont
        dup = cont & (pp[1:] == pp[:-1])
        if dup.any():
            j = int(np.flatnonzero(dup)[0]) + 1
            raise ValueError(f"user {users[order[j]]!r} has two rows at position {int(pp[j])} in one slate "
                             f"(same timestamp)")
    step_starts = np.flatnonzero(new_step)
    step_ptr = np.append(step_starts, len(order)).astype(np.int64)
    step_user = u[step_starts]
    user_change = np.ones(len(step_starts), bool)
    user_change[1:] = step_user[1:] != step_user[:-1]
    user_ptr = np.append(np.flatnonzero(user_change), len(step_starts)).astype(np.int64)
    step_end = np.zeros(len(step_starts), np.float32)
    has_sessions = sess_codes is not None
    if has_sessions:
        ss = sess_codes[order][step_starts]
        last_of_session = np.ones(len(step_starts), bool)
        last_of_session[:-1] = (ss[1:] != ss[:-1]) | (step_user[1:] != step_user[:-1])
        # a session must be contiguous in each user's time order
        pair = pd.DataFrame({"u": step_user, "s": ss})
        runs = pair[np.r_[True, (ss[1:] != ss[:-1]) | (step_user[1:] != step_user[:-1])]]
        if runs.duplicated().any():
            j = int(np.flatnonzero(runs.duplicated().to_numpy())[0])
            raise ValueError(f"session {df[cols['session']].to_numpy()[order][step_starts][runs.index[j]]!r} of user "
                             f"{user_uniques[runs['u'].iloc[j]]!r} is not contiguous in time")
        step_end = last_of_session.astype(np.float32)
    user_first = step_user[user_ptr[:-1]]
    user_seg = np.zeros(len(user_ptr) - 1, np.int64)
    if seg_codes is not None:
        sc = seg_codes[order]
        ev_user_step = np.repeat(np.arange(len(step_starts)), np.diff(step_ptr))
        ev_user = np.searchsorted(user_ptr, ev_user_step, side="right") - 1
        first = sc[np.r_[0, np.flatnonzero(np.diff(ev_user)) + 1]]
        varies = np.zeros(len(user_seg), bool)
        np.logical_or.at(varies, ev_user, sc != first[ev_user])
        if varies.any():
            j = int(np.flatnonzero(varies)[0])
            raise ValueError(f"segment of user {user_uniques[user_first[j]]!r} varies across rows; "
                             f"a segment is a per-user value")
        user_seg = first.astype(np.int64)
    return _Log(items=it.astype(np.int64), resp=r, pos=pp, step_ptr=step_ptr, step_end=step_end,
                user_ptr=user_ptr, user_seg=user_seg, user_ids=np.asarray(user_uniques)[user_first],
                has_sessions=has_sessions, dropped=dropped, rows=order)


def _popularity(log: _Log, n_items: int, n_positions: int) -> dict:
    """Smoothed per-item positive rate and per-position logit offset of a training log."""
    shown = np.bincount(log.items, minlength=n_items).astype(np.float64)
    pos_n = np.bincount(log.items, weights=log.resp, minlength=n_items).astype(np.float64)
    g = float(log.resp.mean()) if len(log.resp) else 0.5
    g = min(max(g, _EPS), 1 - _EPS)
    a = 2.0  # prior strength (pseudo-events at the global rate)
    rate = np.clip((pos_n + a * g) / (shown + a), _EPS, 1 - _EPS)
    ctr_p = np.array([log.resp[log.pos == p].mean() if (log.pos == p).any() else g for p in range(n_positions)])
    ctr_p = np.clip(ctr_p, _EPS, 1 - _EPS)
    logit = lambda x: np.log(x) - np.log1p(-x)
    return {"item_logit": logit(rate), "pos_logit": logit(ctr_p) - logit(g), "shown": shown,
            "positives": np.round(pos_n).astype(np.int64),
            "end_rate": float(log.step_end.mean()) if log.has_sessions and len(log.step_end) else 0.0}


def _batch(log: _Log, users: np.ndarray, max_steps: int):
    """Padded tensors of the steps of ``users``: items/resp/pos/emask (B, T, K), smask/end (B, T)."""
    starts = log.user_ptr[users]
    lens = np.minimum(log.user_ptr[users + 1] - starts, max_steps)
    T = int(lens.max())
    t = np.arange(T)
    smask = t[None, :] < lens[:, None]
    st = np.where(smask, starts[:, None] + t[None, :], 0)
    slen = np.where(smask, log.step_ptr[st + 1] - log.step_ptr[st], 0)
    K = max(int(slen.max()), 1)
    kk = np.arange(K)
    emask = kk[None, None, :] < slen[..., None]
    ev = np.where(emask, log.step_ptr[st][..., None] + kk, 0)
    return {"items": torch.as_tensor(log.items[ev]), "resp": torch.as_tensor(log.resp[ev] * emask),
            "pos": torch.as_tensor(np.where(emask, log.pos[ev], 0)), "emask": torch.as_tensor(emask),
            "smask": torch.as_tensor(smask), "end": torch.as_tensor(log.step_end[st] * smask),
            "seg": torch.as_tensor(log.user_seg[users]), "nshown": torch.as_tensor(slen.astype(np.float32))}


def _forward(net: _Net, b: dict, V: torch.Tensor, keep: torch.Tensor | None = None):
    """States before each step (B, T, H), after (B, T, H) and step inputs (B, T, 2d+2).

    ``keep`` (B, T, K) bool, optional: the events that enter the state update (event dropout).
    """
    v = V[b["items"]]
    x = net.step_input(v, b["resp"], b["emask"] if keep is None else b["emask"] & keep)
    h0 = net.h0(b["seg"])
    out, _ = net.gru(x, h0[None].contiguous())
    before = torch.cat([h0[:, None, :], out[:, :-1, :]], dim=1)
    return before, out, x, v


def _losses(net: _Net, b: dict, V: torch.Tensor, cfg: WorldModelConfig, has_sessions: bool,
            gen: torch.Generator | None) -> dict:
    keep = None
    if gen is not None and cfg.event_dropout > 0:
        keep = torch.rand(b["emask"].shape, generator=gen) >= cfg.event_dropout
    before, after, x, _ = _forward(net, b, V, keep)
    em = b["emask"]
    hb = before[:, :, None, :].expand(-1, -1, em.shape[2], -1)[em]           # (E, H)
    items = b["items"][em]
    logit = (net.resp_proj(hb) * V[items]).sum(-1) + net.resp_user(hb).squeeze(-1) + net.item_bias[items] \
        + net.pos_bias[b["pos"][em]]
    out = {"response": nn.functional.binary_cross_entropy_with_logits(logit, b["resp"][em])}
    if cfg.next_item_weight > 0:
        if gen is not None and len(items) > cfg.next_item_sample:
            pick = torch.randperm(len(items), generator=gen)[:cfg.next_item_sample]
            hs, its = hb[pick], items[pick]
        else:
            hs, its = hb, items
        nl = net.next_proj(hs) @ V.T + net.next_bias
        out["next_item"] = nn.functional.cross_entropy(nl, its)
    if has_sessions and cfg.end_weight > 0:
        sm = b["smask"]
        el = net.end_logits(after, x, b["nshown"])
        out["end"] = nn.functional.binary_cross_entropy_with_logits(el[sm], b["end"][sm])
    return out


def _train(net: _Net, log: _Log, feats: dict, cfg: WorldModelConfig, gen: torch.Generator) -> tuple:
    """AdamW over minibatches of whole users; users bucketed by length (shuffled with ``gen``).

    With ``cfg.validation > 0`` (and at least 10 users) that fraction of the users (drawn with
    ``gen``) is held out: after each epoch their loss (the training objective, with the
    full next-item softmax) is measured, training stops after ``cfg.patience`` epochs without improvement and the
    parameters of the best epoch are restored. Returns ``(train_losses, validation_losses)``.
    """
    net.train()
    decay = [p for n, p in net.named_parameters() if n not in ("prior", "seg_prior", "item_bias", "next_bias",
                                                                "pos_bias") and not n.endswith("bias")]
    keep = [p for n, p in net.named_parameters() if all(p is not q for q in decay)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": keep, "weight_decay": 0.0}], lr=cfg.lr)
    n_all = len(log.user_ptr) - 1
    order_all = torch.randperm(n_all, generator=gen).numpy()
    n_val = round(cfg.validation * n_all) if n_all >= 10 else 0
    val_users, train_users = np.sort(order_all[:n_val]), np.sort(order_all[n_val:])
    lens = np.minimum(np.diff(log.user_ptr), cfg.max_steps)
    history, val_history = [], []
    best, best_state, since = float("inf"), None, 0
    for epoch in range(cfg.epochs):
        net.train()
        perm = train_users[torch.randperm(len(train_users), generator=gen).numpy()]
        perm = perm[np.argsort(lens[perm], kind="stable")]  # length buckets, random within ties
        batches = [perm[i:i + cfg.batch_users] for i in range(0, len(perm), cfg.batch_users)]
        order = torch.randperm(len(batches), generator=gen).numpy()
        total, count = 0.0, 0
        for j in order:
            b = _batch(log, batches[j], cfg.max_steps)
            V = net.item_vectors(feats)
            loss = _total(_losses(net, b, V, cfg, log.has_sessions, gen), cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
            opt.step()
            total += float(loss.detach()) * len(batches[j])
            count += len(batches[j])
        history.append(total / max(count, 1))
        if n_val:
            net.eval()
            with torch.no_grad():
                V = net.item_vectors(feats)
                vt, vn = 0.0, 0
                for i in range(0, n_val, cfg.batch_users):
                    ub = val_users[i:i + cfg.batch_users]
                    vt += float(_total(_losses(net, _batch(log, ub, cfg.max_steps), V, cfg, log.has_sessions,
                                               None), cfg)) * len(ub)
                    vn += len(ub)
            val_history.append(vt / vn)
            logger.info("world model epoch %d/%d: loss %.4f, validation %.4f", epoch + 1, cfg.epochs,
                        history[-1], val_history[-1])
            if val_history[-1] < best:
                best, since = val_history[-1], 0
                best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
            else:
                since += 1
                if since >= cfg.patience:
                    logger.info("world model: early stop after epoch %d (best %d)", epoch + 1,
                                int(np.argmin(val_history)) + 1)
                    break
        else:
            logger.info("world model epoch %d/%d: loss %.4f", epoch + 1, cfg.epochs, history[-1])
    if best_state is not None:
        net.load_state_dict(best_state)
    net.eval()
    if n_val and cfg.calibrate:
        _platt(net, log, feats, val_users, cfg)
    return history, val_history


def _platt(net: _Net, log: _Log, feats: dict, users: np.ndarray, cfg: WorldModelConfig) -> None:
    """Fit ``net.calib`` (scale, shift of the response logits) on the events of ``users`` by L-BFGS."""
    logits, ys = [], []
    with torch.no_grad():
        V = net.item_vectors(feats)
        for i in range(0, len(users), cfg.batch_users):
            b = _batch(log, users[i:i + cfg.batch_users], cfg.max_steps)
            before = _forward(net, b, V)[0]
            em = b["emask"]
            hb = before[:, :, None, :].expand(-1, -1, em.shape[2], -1)[em]
            items = b["items"][em]
            logits.append(net.response_logits(hb, V[items][:, None, :], net.item_bias[items][:, None],
                                              b["pos"][em][:, None])[:, 0])
            ys.append(b["resp"][em])
    z, y = torch.cat(logits).double(), torch.cat(ys).double()
    if len(y) < 20 or y.min() == y.max():
        logger.info("world model: %d validation events, one class only or too few: no calibration", len(y))
        return
    ab = torch.tensor([1.0, 0.0], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([ab], lr=1.0, max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(ab[0] * z + ab[1], y)
        loss.backward()
        return loss

    opt.step(closure)
    a, c = (float(x) for x in ab.detach())
    if not (math.isfinite(a) and math.isfinite(c) and 1e-3 < a < 1e3):
        logger.warning("world model: Platt scaling gave scale %r, shift %r: left uncalibrated", a, c)
        return
    with torch.no_grad():  # the calibration multiplies the current one (net.calib is (1, 0) after training)
        old = net.calib.clone()
        net.calib.copy_(torch.tensor([a * float(old[0]), a * float(old[1]) + c]))
    logger.info("world model: response calibration scale %.3f, shift %.3f on %d validation events", a, c, len(y))


def _total(parts: dict, cfg: WorldModelConfig) -> torch.Tensor:
    return parts["response"] + cfg.next_item_weight * parts.get("next_item", 0.0) \
        + cfg.end_weight * parts.get("end", 0.0)


def _bernoulli_ll(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    p = np.clip(p.astype(np.float64), _EPS, 1 - _EPS)
    return y * np.log(p) + (1 - y) * np.log1p(-p)


def _calibration(p: np.ndarray, y: np.ndarray, n_bins: int) -> tuple:
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, n_bins - 1)
    bins, ece = [], 0.0
    for j in range(n_bins):
        m = idx == j
        c = int(m.sum())
        mp = float(p[m].mean()) if c else None
        mo = float(y[m].mean()) if c else None
        if c:
            ece += c / len(p) * abs(mp - mo)
        bins.append({"lo": float(edges[j]), "hi": float(edges[j + 1]), "count": c, "mean_predicted": mp,
                     "mean_observed": mo})
    return float(ece), bins


def _one_step(net: _Net, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """(B, T, H) one GRU update of every state ``h`` (B, T, H) with its step input ``x`` (B, T, 2d+2)."""
    out = net.gru(x.reshape(-1, 1, x.shape[-1]), h.reshape(1, -1, h.shape[-1]).contiguous())[0]
    return out.reshape(h.shape)


def _evaluate(model: WorldModel, log: _Log, support: int, online: bool, k: int, n_bins: int) -> dict:
    net = model._net
    n_items = model.n_items
    pop_item = np.asarray(model._pop["item_logit"], np.float64)
    pop_pos = np.asarray(model._pop["pos_logit"], np.float64)
    pop_rank = np.asarray(model._pop["positives"], np.float64)
    names = ("world_model", "no_adaptation", "popularity")
    preds = {m: [] for m in names}
    ends = {m: [] for m in names}
    ys, end_ys, hits = [], [], {m: [] for m in names}
    n_users = 0
    with torch.no_grad():
        V = model._item_vectors()
        users = np.arange(len(log.user_ptr) - 1)
        for lo in range(0, len(users), 64):
            ub = users[lo:lo + 64]
            b = _batch(log, ub, 10**12)
            before, after, x, _ = _forward(net, b, V)
            h0 = net.h0(b["seg"])
            if not online:  # freeze the state after the support steps; the end head steps once from it
                T = before.shape[1]
                frozen = before[:, min(support, T - 1), :]
                later = (torch.arange(T) >= support)[None, :, None]
                before = torch.where(later, frozen[:, None, :], before)
                after = _one_step(net, x, before)
            T = before.shape[1]
            score_mask = b["smask"].clone()
            score_mask[:, :min(support, T)] = False
            for bi in range(len(ub)):
                if score_mask[bi].any():
                    n_users += 1
            em = b["emask"] & score_mask[:, :, None]
            if not em.any():
                continue
            K = em.shape[2]
            items = b["items"][em]
            pos = b["pos"][em]
            y = b["resp"][em].numpy().astype(np.float64)
            ys.append(y)
            hb = before[:, :, None, :].expand(-1, -1, K, -1)[em]
            h0e = h0[:, None, None, :].expand(-1, before.shape[1], K, -1)[em]
            for name, hh in (("world_model", hb), ("no_adaptation", h0e)):
                lg = net.response_logits(hh, V[items][:, None, :], net.item_bias[items][:, None],
                                         pos[:, None])[:, 0]
                preds[name].append(torch.sigmoid(lg).numpy().astype(np.float64))
            pl = pop_item[items.numpy()] + pop_pos[pos.numpy()]
            preds["popularity"].append(1.0 / (1.0 + np.exp(-pl)))
            if log.has_sessions and model.has_sessions:
                sm = score_mask
                end_ys.append(b["end"][sm].numpy().astype(np.float64))
                ends["world_model"].append(torch.sigmoid(net.end_logits(after, x, b["nshown"])[sm]).numpy())
                after0 = _one_step(net, x, h0[:, None, :].expand(-1, before.shape[1], -1))
                ends["no_adaptation"].append(torch.sigmoid(net.end_logits(after0, x, b["nshown"])[sm]).numpy())
                ends["popularity"].append(np.full(int(sm.sum()), model._pop.get("end_rate", 0.0)))
            # next-item hit@k: positive events among all catalogue items not seen before the step
            pos_ev = em & (b["resp"] > 0.5)
            if pos_ev.any():
                scores_wm = model._item_scores(before.reshape(-1, before.shape[-1]), V).reshape(
                    before.shape[0], before.shape[1], n_items)
                scores_na = model._item_scores(h0, V)
                for bi in range(len(ub)):
                    if not pos_ev[bi].any():
                        continue
                    Tb = int(b["smask"][bi].sum())
                    seen = np.zeros((Tb, n_items), bool)  # seen[t]: items of steps < t
                    it_b = b["items"][bi, :Tb].numpy()
                    em_b = b["emask"][bi, :Tb].numpy()
                    onehot = np.zeros((Tb, n_items), bool)
                    rr, kk = np.nonzero(em_b)
                    onehot[rr, it_b[rr, kk]] = True
                    seen[1:] = np.logical_or.accumulate(onehot, axis=0)[:-1]
                    tt, kk = np.nonzero(pos_ev[bi, :Tb].numpy())
                    tgt = it_b[tt, kk]
                    for name, sc in (("world_model", scores_wm[bi, tt].numpy()),
                                     ("no_adaptation", np.broadcast_to(scores_na[bi].numpy(), (len(tt), n_items))),
                                     ("popularity", np.broadcast_to(pop_rank, (len(tt), n_items)))):
                        s_t = sc[np.arange(len(tt)), tgt]
                        cand = ~seen[tt]
                        cand[np.arange(len(tt)), tgt] = False
                        ahead = ((sc >= s_t[:, None]) & cand).sum(1)  # ties count against the target
                        hits[name].append(ahead < k)
    if not ys:
        raise ValueError(f"no held-out step beyond the first {support} (support) steps: nothing to score")
    y = np.concatenate(ys)
    result = {"users": n_users, "events": len(y), "dropped_events": int(log.dropped), "support": support,
              "online": online}
    result["targets"] = int(sum(len(h) for h in hits["world_model"]))
    for name in names:
        p = np.concatenate(preds[name])
        ece, bins = _calibration(p, y, n_bins)
        m = {"log_likelihood": float(_bernoulli_ll(p, y).mean()), "ece": ece, "reliability": bins,
             f"hit@{k}": float(np.concatenate(hits[name]).mean()) if hits[name] else float("nan")}
        if end_ys:
            m["end_log_likelihood"] = float(_bernoulli_ll(np.concatenate(ends[name]), np.concatenate(end_ys)).mean())
        result[name] = m
    return result
