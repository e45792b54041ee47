"""The recmeta network: item tower, user tower, softmax policy and adaptation parameters.

* **Item tower.** Every item is a bag of rows of one table: its id row, its genre rows
  (weight ``1/n_genres``) and its year-bucket row (see :class:`ItemFeatures`). Two such
  tables (an *input* table used to read histories and an *output* table used to score) are
  pooled in one fused table-batched :func:`recmeta_sdk.ops.embedding_bag` call, giving the
  (N, d) input item vectors ``X`` and output item vectors ``V``.
* **User tower.** The history is pooled by a second :func:`~recmeta_sdk.ops.embedding_bag`
  over ``X`` (weights ``1/sqrt(n)``), the most recent ``seq_len`` items go through a small
  causal transformer (or a GRU, ``encoder="gru"``; ``"none"`` disables it), the user's
  side features (if any) through a third bag; the three are concatenated and fused by a
  two-layer MLP into the user state ``h``.
* **Adaptation parameters.** ``phi = (gamma, delta)`` in R^d act on the state as
  ``h' = h * (1 + gamma) + delta`` (a FiLM layer). Only :meth:`RecMetaNet.adapt_state`
  (and so ``Recommender.adapt``) changes them per user, by a few gradient steps on the
  support set with per-coordinate step sizes ``exp(log_lr)``; meta-training learns their
  initial value and the step sizes (see :mod:`recmeta_sdk.training.loop`).
* **Policy.** ``pi(a|s) = softmax_a((<h'(s), V_a> + b_a) / tau)`` over the catalogue,
  served by :func:`recmeta_sdk.ops.policy_topk` / :func:`~recmeta_sdk.ops.policy_sample`.
* **Behaviour head.** ``beta(a|s) = softmax_a(<W_beta h(s), V_a> + c_a)`` on a
  gradient-blocked copy of the state, estimating the logging policy when the logs carry no
  propensities (Chen et al. 2019).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Optional, Tuple

import numpy as np
import torch
from torch import nn

from .. import ops

__all__ = ["Config", "ItemFeatures", "RecMetaNet"]


#: Bytes per N^2 of the dense wide part at its peak (see :func:`dense_wide_bytes`)
DENSE_WIDE_BYTES_PER_PAIR = 72


#: ``config.validation`` where it is None (the default) and validation-tuned training applies:
#: the fraction of the users (with 5 or more interactions, at most 2,000) who hold out part
#: of their interactions as the validation set (see :attr:`Config.validation`)
AUTO_VALIDATION = 0.5
#: ``Config.epochs=None``: at most this many epochs ...
AUTO_EPOCHS = 30
#: ... and as many as fit in this many optimiser steps (at least one epoch)
AUTO_STEPS = 900


def auto_epochs(steps_per_epoch: int) -> int:
    """The number of epochs ``Config.epochs=None`` resolves to: ``AUTO_STEPS //
    steps_per_epoch`` within ``[1, AUTO_EPOCHS]``."""
    return int(min(AUTO_EPOCHS, max(1, AUTO_STEPS // max(int(steps_per_epoch), 1))))


def dense_wide_bytes(n_items: int) -> int:
    """Peak bytes of the dense wide part of ``n_items`` items, ``72 N^2``: the float64 Gram
    matrix (8 N^2), the Cholesky factor, inverse and weights of one EASE fit (24 N^2 in
    float64), the served float32 weights (4 N^2), five cross-fitted float32 copies (20 N^2)
    and one fold's Gram update (16 N^2). Compared with ``config.wide_budget_bytes``."""
    return DENSE_WIDE_BYTES_PER_PAIR * int(n_items) * int(n_items)


class SparseWide:
    """Sparse wide-part weights ``W`` (N, N) in CSR form: row ``j`` lists the items that history
    item ``j`` scores, ``W[j, indices[indptr[j]:indptr[j+1]]] = values[...]``.

    Parameters
    ----------
    indptr : (N+1,) int64 torch tensor, nondecreasing from 0.
    indices : (nnz,) int32 torch tensor, column indices in ``[0, N)``.
    values : (nnz,) float32 torch tensor.
    n : int, the number of items N.
    """

    __slots__ = ("indptr", "indices", "values", "n")

    def __init__(self, indptr: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, n: int):
        self.indptr, self.indices, self.values, self.n = indptr, indices, values, int(n)

    @classmethod
    def from_scipy(cls, m) -> "SparseWide":
        """From a scipy sparse (N, N) matrix (converted to CSR with sorted indices)."""
        m = m.tocsr()
        m.sort_indices()
        return cls(torch.from_numpy(m.indptr.astype(np.int64)), torch.from_numpy(m.indices.astype(np.int32)),
                   torch.from_numpy(m.data.astype(np.float32)), m.shape[0])

    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    @property
    def nbytes(self) -> int:
        return int(self.indptr.numel() * 8 + self.indices.numel() * 4 + self.values.numel() * 4)

    def scale_columns(self, scale: torch.Tensor) -> "SparseWide":
        """``W diag(scale)`` (scale (N,) float32): a new matrix with the same pattern."""
        return SparseWide(self.indptr, self.indices, self.values * scale[self.indices.to(torch.int64)], self.n)

    def to_dense(self) -> torch.Tensor:
        """(N, N) float32 (for tests and small catalogues)."""
        rows = torch.repeat_interleave(torch.arange(self.n), torch.diff(self.indptr))
        out = torch.zeros(self.n, self.n)
        out[rows, self.indices.to(torch.int64)] = self.values
        return out

    def rows_sum(self, items: torch.Tensor, offsets: torch.Tensor, weights: Optional[torch.Tensor] = None,
                 ) -> torch.Tensor:
        """(B, N) float32 ``sum_{p in bag b} weights[p] W[items[p], :]`` for the CSR bags
        ``items`` (H,) int64 / ``offsets`` (B+1,) int64 (weights 1 when None): the sparse
        counterpart of an embedding bag over the rows of a dense ``W``, in memory
        ``B x N`` plus the touched rows' entries. Entries are added in bag order (deterministic)."""
        items = torch.as_tensor(items, dtype=torch.int64)
        offsets = torch.as_tensor(offsets, dtype=torch.int64)
        B, N = offsets.numel() - 1, self.n
        out = torch.zeros(B * N, dtype=torch.float32)
        if items.numel():
            starts = self.indptr[items]
            lens = self.indptr[items + 1] - starts
            total = int(lens.sum())
            if total:
                excl = torch.cumsum(lens, 0) - lens
                pos = torch.repeat_interleave(starts - excl, lens) + torch.arange(total)
                bag = torch.repeat_interleave(torch.arange(B), torch.diff(offsets))
                vals = self.values[pos]
                if weights is not None:
                    vals = vals * torch.repeat_interleave(torch.as_tensor(weights, dtype=torch.float32), lens)
                flat = torch.repeat_interleave(bag, lens) * N + self.indices[pos].to(torch.int64)
                out.index_add_(0, flat, vals)
        return out.view(B, N)


@dataclass
class Config:
    """Every setting of the model and its training (all have defaults).

    Each field is documented at its definition below (``#:`` comments, read by Sphinx
    autodoc). The groups:

    * **Model**: ``dim``, ``hidden``, ``encoder``, ``layers``, ``heads``, ``seq_len``,
      ``dropout``, ``temperature``.
    * **Training**: ``epochs``, ``batch_size``, ``lr``, ``weight_decay``, ``l2``,
      ``input_dropout``, ``prefix_prob``, ``max_prefix``, ``user_feature_dropout``,
      ``query_weight``, ``year_bucket``, ``seed``.
    * **RL**: ``ce_weight``, ``rl_weight``, ``is_cap``, ``topk_k``, ``entropy``,
      ``full_softmax_max``, ``n_negatives``.
    * **Meta-learning**: ``meta``, ``inner_steps``, ``inner_lr``, ``meta_scalar``,
      ``meta_tasks``.
    * **Wide part** (a full-rank EASE item-to-item component, wide & deep): ``wide``,
      ``wide_reg``, ``wide_max_items``, ``wide_budget_bytes``, ``wide_neighbours``, ``wide_init``,
      ``wide_slope``, ``scalar_lr``;
      its calibration ``calib_users``, ``calib_holdout``.
    * **Validation-tuned training** (on by default where it applies): ``validation``,
      ``validation_holdout``, ``validation_cold``, ``patience``, ``wide_train``,
      ``new_user_alpha``, ``wide_recency``, ``wide_recency_decay``, ``wide_pop_exp``.
    * **Online feedback** (:mod:`recmeta_sdk.online`): ``feedback_posterior``,
      ``feedback_reg``, ``feedback_window``, ``feedback_evidence``, ``feedback_bandwidth``,
      ``feedback_evidence_decay``, ``feedback_linear``.
    * **Rewards**: ``positive_threshold``.

    Fields that training may choose (``validation``, ``wide_reg``, ``wide_recency``, ``wide_recency_decay``,
    ``wide_pop_exp``, ``new_user_alpha``, ``positive_threshold``, and ``temperature`` when
    re-fitted) are written back, so the trained model's config records the values used.
    """

    # ------------------------------------------------------------------ model
    #: Width ``d`` of the item vectors and of the user states (a positive int; with
    #: ``encoder="transformer"`` a multiple of ``heads``).
    dim: int = 128
    #: Width of the hidden layer of the two-layer fusion MLP that turns the pooled history,
    #: the sequence encoding and the user features into the user state (a positive int).
    hidden: int = 256
    #: Sequence encoder of the most recent ``seq_len`` items: ``"transformer"`` (a small
    #: causal transformer), ``"gru"``, or ``"none"`` (no sequence encoder: the pooled history
    #: and the user features only).
    encoder: str = "transformer"
    #: Number of layers of the sequence encoder (transformer or GRU layers; a positive int).
    layers: int = 1
    #: Attention heads of the transformer encoder (a positive int dividing ``dim``; unused by
    #: ``"gru"`` and ``"none"``).
    heads: int = 2
    #: L, the number of most recent history items read by the sequence encoder (a positive
    #: int); the whole history is still pooled by the bag.
    seq_len: int = 20
    #: Dropout probability, in [0, 1), of the transformer layers and of the fusion MLP's
    #: hidden layer (training only).
    dropout: float = 0.1
    #: tau, the temperature of the softmax policy ``pi(a|s) = softmax((<h', V_a> + b_a) / tau)``
    #: (a finite number > 0). Re-fitted after training by the wide part's calibration
    #: (``calib_users > 0``) and by validation-tuned training (the held-out likelihood).
    temperature: float = 1.0

    # --------------------------------------------------------------- training
    #: Passes over the training users (a positive int), or None (the default): as many as
    #: fit in :data:`AUTO_STEPS` optimiser steps, at most :data:`AUTO_EPOCHS` and at least
    #: one (30 on MovieLens-100K's 943 users, 19 on 6,000 users, 2 on 50,000: a large log
    #: needs fewer passes, and the cost stays near linear in the log); the value used is
    #: written back. With a validation set it is the maximum, and the best epoch's weights
    #: are kept (early stopping ends training ``patience`` epochs after the best one).
    epochs: Optional[int] = None
    #: Samples (one per user) per optimiser step (a positive int); group tasks
    #: (:mod:`recmeta_sdk.training.meta_tasks`) draw ``batch_size // users_per_task`` tasks.
    batch_size: int = 128
    #: Learning rate of AdamW for the network's parameters (a finite number > 0), all but the
    #: few scalars trained at ``scalar_lr``.
    lr: float = 2e-3
    #: AdamW's decoupled weight decay of the parameters trained at ``lr`` (>= 0; 0: none; the
    #: ``scalar_lr`` group never decays).
    weight_decay: float = 0.0
    #: Weight (>= 0) of an L2 penalty on the adapted user states ``h'``: the batch mean of
    #: ``||h'||^2`` times ``l2`` is added to the loss (0: off).
    l2: float = 1e-6
    #: Fraction, in [0, 1), of a history hidden from the encoder and used as targets in the
    #: denoising samples (at least one item is hidden and one kept).
    input_dropout: float = 0.5
    #: Fraction of samples that are time-ordered prefixes of 1..``max_prefix`` items
    #: predicting the rest, for cold users (0: none; 1: every sample); the other samples are
    #: denoising ones (``input_dropout``).
    prefix_prob: float = 0.5
    #: Longest prefix, in items, of the prefix samples (a positive int; a prefix also leaves at
    #: least one item to predict).
    max_prefix: int = 20
    #: Probability, in [0, 1), that a training sample's user side features are dropped (so the
    #: model also learns to serve users without features).
    user_feature_dropout: float = 0.3

    # --------------------------------------------------------------------- RL
    #: Weight (>= 0) of the supervised multi-target cross-entropy in the loss.
    ce_weight: float = 1.0
    #: Weight (>= 0) of the off-policy corrected REINFORCE loss beside the supervised
    #: multi-target cross-entropy (0: off).
    rl_weight: float = 0.1
    #: Cap of the importance ratio pi/beta in the REINFORCE weights (a finite number > 0).
    is_cap: float = 10.0
    #: K of the top-K off-policy correction ``K (1 - pi)^(K-1)`` (a positive int; 1: the plain
    #: one-action correction).
    topk_k: int = 10
    #: Weight (>= 0) of the entropy bonus: ``entropy * H(pi)`` is subtracted from the loss
    #: (0: off).
    entropy: float = 0.0
    #: Largest catalogue size, in items, trained with the full softmax; above it the losses
    #: use a sampled softmax with ``n_negatives`` popularity-sampled negatives and log-Q
    #: correction.
    full_softmax_max: int = 50000
    #: Negatives drawn (with replacement, from the popularity distribution) per batch for the
    #: sampled softmax, shared by its samples (a positive int; used only above
    #: ``full_softmax_max`` items).
    n_negatives: int = 1024

    # ---------------------------------------------------------- meta-learning
    #: ``"fomaml"``: first-order MAML of the adaptation parameters with learned step sizes;
    #: ``"none"``: plain training.
    meta: str = "fomaml"
    #: Gradient steps of the inner loop that adapts the parameters phi on a support set
    #: (an int >= 0; 0: no adaptation during training); also the default ``steps`` of
    #: ``Recommender.adapt`` and ``Recommender.user_state``.
    inner_steps: int = 1
    #: Initial step size of the inner loop (a finite number > 0); learned (per coordinate)
    #: with ``"fomaml"``, fixed otherwise.
    inner_lr: float = 0.5
    #: Width, in the column's units (years), of the buckets of a numeric side-feature column
    #: named like ``year`` (a positive int; other numeric columns use deciles).
    year_bucket: int = 5

    # -------------------------------------------------------------- wide part
    #: ``"ease"`` adds a full-rank item-to-item component to the policy,
    #: ``alpha(n) * (x W)_a`` with ``x`` the multi-hot history, ``W`` the closed-form EASE
    #: weights of the training log (ridge ``wide_reg``, zero diagonal; Steck 2019) and
    #: ``alpha(n) = softplus(c0 + c1 log(1 + n))`` learned (initial ``c0 = wide_init``,
    #: ``c1 = wide_slope``), so the deep towers learn what the linear item-item model misses
    #: (wide & deep). It is the same inner-product policy with the state ``[h', alpha(n) x]``
    #: and item vectors ``[v_a, W[:, a]]``. ``"none"``: the deep part alone.
    wide: str = "ease"
    #: Ridge of the EASE weights (a finite number > 0). ``None`` (default): tuned on the
    #: validation set when there is one, else ``DEFAULT_WIDE_REG`` (250) of
    #: :mod:`recmeta_sdk.training.loop`; the trained model's config records the value used.
    #: The served EASE weights are refit on the whole log.
    wide_reg: Optional[float] = None
    #: Catalogues larger than this (in items) skip the wide part; an int >= 0.
    wide_max_items: int = 10_000_000
    #: Memory budget, in bytes, of the dense wide part (an int > 0, or None: no budget, the
    #: dense EASE matrix at every size as before this field existed). The dense path holds
    #: :func:`dense_wide_bytes` ``(N)`` = 72 N^2 bytes at its peak (the float64 Gram matrix,
    #: its factor and inverse, the float32 weights and five cross-fitted copies); when that
    #: exceeds the budget the wide part is **sparse**: each item's ``wide_neighbours`` most
    #: co-occurring items (an item-neighbourhood EASE, see
    #: :func:`recmeta_sdk.training.loop.sparse_ease`), built from a sparse users x items matrix
    #: in memory linear in the log and stored as a CSR matrix. The default, 1 GiB, keeps the
    #: dense path up to 3,861 items (MovieLens-100K's 1,682 included).
    wide_budget_bytes: Optional[int] = 2**30
    #: Neighbours kept per item by the sparse wide part (a positive int; see
    #: ``wide_budget_bytes``).
    wide_neighbours: int = 32
    #: Initial ``c0`` of ``alpha(n) = softplus(c0 + c1 log(1 + n))``: with ``wide_slope``,
    #: small for short histories, where item-to-item evidence is thin.
    wide_init: float = -8.0
    #: Initial ``c1`` of ``alpha(n)``: how fast the wide part's weight grows with the history
    #: length ``n``.
    wide_slope: float = 4.0
    #: Learning rate (a finite number > 0) of ``alpha``'s two coefficients (and, with
    #: ``meta_scalar``, of the inner loop's step sizes), which the main ``lr`` would barely
    #: move.
    scalar_lr: float = 0.05
    #: Learn the inner loop's step sizes at ``scalar_lr`` instead of ``lr`` (a bool): with the
    #: main ``lr`` they barely move from ``inner_lr`` in a short training.
    meta_scalar: bool = False
    #: ``"all"``: every sample is a task of the inner loop; ``"prefix"``: only the
    #: time-ordered prefixes, the new-user samples, are; the others are scored at the initial
    #: adaptation parameters.
    meta_tasks: str = "all"
    #: Each sample's loss is the mean over its query items, and samples are weighted by
    #: ``(query size) ** query_weight`` (a number in [-1, 1]): 0 counts every user the same,
    #: 1 every query item, as Mult-DAE's summed likelihood does. Per-user means alone
    #: under-weight the users with long futures, whose query items lean to popular films, and
    #: rank worse than popularity on NDCG for new users; 0.5 was chosen on an inner split of
    #: training users, see :mod:`recmeta_sdk.training.loop`.
    query_weight: float = 0.5
    #: Fraction, in [0, 1), of the users whose ``calib_holdout`` share of interactions is held
    #: out to calibrate the wide part (0, the default: off). ``alpha`` is learned against
    #: weights cross-fitted over user folds while the deep part sees every training user, so
    #: the deep part ends up trusted more than it deserves on held-out items; with
    #: ``calib_users > 0`` training therefore multiplies alpha after training by m (buffer
    #: ``wide_scale``), fitted on those held-out items, and then re-fits ``temperature`` (see
    #: :func:`recmeta_sdk.training.loop.calibrate_wide`); the served EASE weights are then
    #: refit on the whole log. Off by default: on MovieLens-100K it lifts warm (known-user)
    #: ranking on the validation part but the deep part trained without the held-out
    #: interactions ranks cold users worse.
    calib_users: float = 0.0
    #: Share, in [0, 1), of a chosen user's interactions held out: for the calibration users
    #: (``calib_users``) and for the validation users (``validation``).
    calib_holdout: float = 0.2

    # ------------------------------------------------ validation-tuned training
    #: Fraction, in [0, 1), of the users with 5 or more interactions (at most 2,000) whose
    #: ``calib_holdout`` share of interactions is held out as a validation set; None (the
    #: default): :data:`AUTO_VALIDATION` where validation-tuned training applies (per-user
    #: tasks, a dense wide part, not distributed, no ``calib_users``, ``ce_weight > 0``; otherwise 0), written
    #: back as the value used. 0: no validation set (the wide part's weight ``alpha(n)`` is
    #: learned in training for every user, the last epoch kept). A validation set can
    #: also be given as ``train(..., validation=frame)``; either turns on validation-tuned
    #: training (:func:`recmeta_sdk.training.loop.fit`): ``wide_reg``, ``wide_recency``,
    #: ``wide_recency_decay`` and ``wide_pop_exp`` tuned when None, the best epoch kept
    #: (early stopping after ``patience`` epochs without a better validation score),
    #: ``wide_train``, the cold stand-ins ``validation_cold`` (off by default),
    #: and after training the known users' wide-part weight ``alpha(n)`` fitted per history
    #: length (on the validation users' whole histories and their first 5 / 10 / 20 items)
    #: and the temperature by the held-out likelihood. ``Recommender.history`` records the
    #: scores behind the values chosen. Measured on MovieLens-100K: see the README's
    #: "Warm quality" section (``bench/bench_quality.py`` and the cold-start protocol).
    validation: Optional[float] = None
    #: Fraction, in [0, 1), of the users with more than 20 interactions (at most 500 users)
    #: held out of training whole as stand-ins for new users (their first 5 / 10 / 20
    #: interactions as the history, their positives after the first 20 as the truth: the
    #: cold-start protocol). Used only with a validation set: the epoch kept is then the one
    #: that scores best on them, and with ``wide_train="residual"`` new users' ``alpha(n)``
    #: is fitted on them. 0 (default): nobody is held out whole, the epoch is chosen on the
    #: validation users. Measured on MovieLens-100K with the default ``"learned"``: holding
    #: 10% out cost warm quality (per-user random 80/20 NDCG@10 0.4621 against 0.4702) and
    #: new users too (cold-start Recall@10 at k = 5 / 10 / 20 0.0637 / 0.0716 / 0.0935
    #: against 0.0654 / 0.0744 / 0.0971 over the five folds): the deep part trains on fewer users.
    validation_cold: float = 0.0
    #: The new users' wide-part weight: the five values ``(c0, c1, s0, s1, s2)`` of
    #: :meth:`RecMetaNet.wide_alpha` (``s1 < s2`` the history lengths where its ramp starts
    #: and ends), fitted by validation-tuned training (``adapt``) on the held-out new users.
    #: None (default): new users get the known users' weight.
    new_user_alpha: Optional[list] = None
    #: With a validation set: ``"learned"`` (default) trains the deep part with EASE in its
    #: logits at the learned weight ``alpha(n)``, against cross-fitted EASE weights (5 folds of
    #: users, the tuned ridge and popularity exponent), as training without a validation set
    #: does; new users keep that learned weight (``new_user_alpha``) and known users' weight
    #: is re-fitted on the validation users after training. ``"residual"`` trains it with EASE
    #: at the fixed weight that fits the validation items best (the deep part learns what
    #: EASE misses; new users' weight fitted on the cold stand-ins); ``"none"`` trains it alone.
    wide_train: str = "learned"
    #: Recency weight ``g`` of the wide part's input: each history item weighs
    #: ``1 + wide_recency * exp(-wide_recency_decay * r)`` (r: its rank from the end of the
    #: history, 0 the last), a number in [0, 1000]. None (default): tuned with a validation
    #: set, else 0 (every item weighs 1).
    wide_recency: Optional[float] = None
    #: Decay, per rank from the end of the history, of the recency weight (in [0, 1000]);
    #: unused while ``wide_recency`` is 0 or None. None (default): tuned with a validation
    #: set (1.0 when ``wide_recency`` is given and this is not).
    wide_recency_decay: Optional[float] = None
    #: Popularity exponent of the wide part: the EASE columns are scaled by
    #: ``(count + 1) ** -wide_pop_exp`` (in [0, 1000]; 0: no scaling). None (default): tuned
    #: with a validation set, else 0.
    wide_pop_exp: Optional[float] = None
    #: Which interactions of each validation user are held out: ``"random"``, ``"latest"``
    #: (each user's most recent interactions: their future) or ``"mixed"`` (half the users
    #: each way).
    validation_holdout: str = "mixed"
    #: Early stopping: training stops this many epochs after the best validation score (a
    #: positive int; ``epochs`` is the maximum) and keeps the best epoch's weights. The
    #: default runs every one of the default 30 epochs: the cold stand-ins' score that
    #: chooses the epoch is noisy from one epoch to the next, and stopping 3 epochs after a
    #: lucky one left new users an undertrained deep part (cold-start Recall@10 at k = 10
    #: 0.0662 against 0.0716 on MovieLens-100K's five folds).
    patience: int = 30

    # --------------------------------------------------------- online feedback
    #: Weight (>= 0; 0 turns it off) of each user's adapted item-bias vector from the Gaussian
    #: reward posterior of :mod:`recmeta_sdk.online.posterior` (the training users' rewards as
    #: the prior, conditioned on the user's observed rewards, misses included), in standard
    #: deviations of the model's scores per unit of normalised reward. Defaults chosen on an
    #: inner replay of existing MovieLens users (see ``bench/bench_online.py``).
    feedback_posterior: float = 40.0
    #: The observation-noise variance ``lam`` of the rewards (normalised to [0, 1]) in that
    #: posterior (a finite number > 0).
    feedback_reg: float = 0.1
    #: The number of a user's latest feedback events the posterior conditions on (a positive
    #: int).
    feedback_window: int = 200
    #: Weight (>= 0; 0 turns it off) of the **in-session evidence** of the online loop
    #: (:mod:`recmeta_sdk.online`): each feedback event's residual ``y - m`` (its normalised
    #: reward minus the user's running mean reward before it, prior 0.5) is spread to every
    #: item through a kernel on the model's item vectors, ``exp((cos(v_i, v_j) - 1) /
    #: feedback_bandwidth)``, and added to the user's item bias; in standard deviations of
    #: the model's scores per unit of residual. The defaults (30, 0.5, 0.7) were chosen on
    #: validation seeds 100-103 of the long-horizon simulator, never the reported ones
    #: (``bench/bench_long_horizon.py --first-seed 100 --seeds 4 --evidence-grid ...``; 40 new
    #: users per seed, LinUCB 11.5: (30, 0.5, 0.7) 13.3, (30, 1.0, 0.7) 12.8, (40, 0.7, 0.75)
    #: 13.1, (60, 1.0, 0.8) 13.4; on 3 of them with 20 users, off 7.6, weaker, narrower or more
    #: lasting evidence 8-12.4), among the two tied best the one that keeps the MovieLens replay
    #: where it was (``bench/bench_online.py``, paired to EASE at t = 10 / 50: off +0.48 / +0.90,
    #: (30, 0.5, 0.7) +0.46 / +0.85, (60, 1.0, 0.8) +0.36 / +0.68).
    feedback_evidence: float = 30.0
    #: Width (> 0) of that kernel: small spreads a click only to the item and its nearest
    #: neighbours.
    feedback_bandwidth: float = 0.5
    #: Per-event decay, in (0, 1], of the in-session evidence (older events weigh
    #: ``decay ** age``; events whose weight is below 1e-3 are dropped).
    feedback_evidence_decay: float = 0.7
    #: Weight (>= 0; 0, the default, turns it off) of the online **linear evidence**
    #: (:mod:`recmeta_sdk.online.posterior`, ``ItemBasis``), used only by models whose items
    #: have dense side features: each user's Bayesian ridge regression of its rewards on the
    #: items' dense features, the item vectors' principal directions and the model's cold score
    #: (its prior), whose prediction plus a confidence bonus is added to the user's item bias,
    #: in standard deviations of the model's scores per unit of predicted reward. 100 (chosen on
    #: validation seeds of the multi-task simulator) brings the online loop to LinUCB's level in
    #: that simulator, but costs it on the long-horizon one, hence off by default (see the
    #: README's online section).
    feedback_linear: float = 0.0

    # ---------------------------------------------------------------- rewards
    #: The reward at or above which a logged row is a positive (a reward <= 0 never is): a
    #: supervised target, and in the wide part's EASE matrix. Rows below it (impressions with
    #: reward 0, low ratings) are never targets: they are context in the history the encoder
    #: reads and logged actions for the off-policy RL term and the behaviour estimate.
    #: ``None`` (default): decided from the data by
    #: :func:`recmeta_sdk.training.loop.positive_threshold` (star-rating-like rewards: 0.8 x
    #: the maximum, i.e. 4 of 5 stars; otherwise reward > 0) and logged; the trained model's
    #: config records the value used.
    positive_threshold: Optional[float] = None
    #: Seed of training's random draws (numpy and torch generators seeded from it): makes
    #: training reproducible (an int).
    seed: int = 0

    def validate(self) -> "Config":
        pos_int = ("dim", "hidden", "layers", "heads", "seq_len", "epochs", "batch_size",
                   "max_prefix", "topk_k", "full_softmax_max", "n_negatives", "year_bucket",
                   "feedback_window", "patience")
        for name in pos_int:
            v = getattr(self, name)
            if v is None and name == "epochs":  # auto (see Config.epochs)
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"config.{name} must be a positive int, got {v!r}")
        if isinstance(self.inner_steps, bool) or not isinstance(self.inner_steps, int) or self.inner_steps < 0:
            raise ValueError(f"config.inner_steps must be an int >= 0, got {self.inner_steps!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"config.seed must be an int, got {self.seed!r}")
        for name in ("dropout", "input_dropout", "prefix_prob", "user_feature_dropout", "calib_users", "validation",
                     "calib_holdout", "validation_cold"):
            v = getattr(self, name)
            if v is None and name == "validation":
                continue
            if not isinstance(v, (int, float)) or not 0.0 <= v < 1.0 + (name == "prefix_prob"):
                raise ValueError(f"config.{name} must be in [0, 1), got {v!r}")
        for name in ("lr", "temperature", "is_cap", "inner_lr", "scalar_lr"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"config.{name} must be a finite number > 0, got {v!r}")
        if (isinstance(self.feedback_reg, bool) or not isinstance(self.feedback_reg, (int, float))
                or not math.isfinite(self.feedback_reg) or self.feedback_reg <= 0):
            raise ValueError(f"config.feedback_reg must be a finite number > 0, got {self.feedback_reg!r}")
        for name in ("feedback_bandwidth", "feedback_evidence_decay"):
            v = getattr(self, name)
            if (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0
                    or (name == "feedback_evidence_decay" and v > 1)):
                raise ValueError(f"config.{name} must be a number in "
                                 f"{'(0, 1]' if name == 'feedback_evidence_decay' else '(0, inf)'}, got {v!r}")
        for name in ("weight_decay", "l2", "ce_weight", "rl_weight", "entropy", "feedback_posterior",
                     "feedback_evidence", "feedback_linear"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"config.{name} must be a finite number >= 0, got {v!r}")
        if self.encoder not in ("transformer", "gru", "none"):
            raise ValueError(f"config.encoder must be 'transformer', 'gru' or 'none', got {self.encoder!r}")
        if self.wide not in ("ease", "none"):
            raise ValueError(f"config.wide must be 'ease' or 'none', got {self.wide!r}")
        if self.wide_reg is not None and (isinstance(self.wide_reg, bool) or not isinstance(self.wide_reg, (int, float))
                                          or not math.isfinite(self.wide_reg) or not self.wide_reg > 0):
            raise ValueError(f"config.wide_reg must be None (tuned) or a finite number > 0, got {self.wide_reg!r}")
        if isinstance(self.wide_max_items, bool) or not isinstance(self.wide_max_items, int) or self.wide_max_items < 0:
            raise ValueError(f"config.wide_max_items must be an int >= 0, got {self.wide_max_items!r}")
        if self.wide_budget_bytes is not None and (isinstance(self.wide_budget_bytes, bool)
                                                   or not isinstance(self.wide_budget_bytes, int)
                                                   or not 0 < self.wide_budget_bytes <= 2**62):
            raise ValueError(f"config.wide_budget_bytes must be None or an int in [1, 2**62], "
                             f"got {self.wide_budget_bytes!r}")
        if (isinstance(self.wide_neighbours, bool) or not isinstance(self.wide_neighbours, int)
                or not 0 < self.wide_neighbours <= 2**31 - 1):
            raise ValueError(f"config.wide_neighbours must be a positive int, got {self.wide_neighbours!r}")
        if not isinstance(self.meta_scalar, bool):
            raise TypeError(f"config.meta_scalar must be a bool, got {self.meta_scalar!r}")
        if self.meta_tasks not in ("all", "prefix"):
            raise ValueError(f"config.meta_tasks must be 'all' or 'prefix', got {self.meta_tasks!r}")
        if (isinstance(self.query_weight, bool) or not isinstance(self.query_weight, (int, float))
                or not -1.0 <= self.query_weight <= 1.0):
            raise ValueError(f"config.query_weight must be a number in [-1, 1], got {self.query_weight!r}")
        t = self.positive_threshold
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t)):
            raise ValueError(f"config.positive_threshold must be None or a finite number, got {t!r}")
        for name in ("wide_recency", "wide_recency_decay", "wide_pop_exp"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                                  or not 0 <= v <= 1e3):
                raise ValueError(f"config.{name} must be None (tuned) or a number in [0, 1000], got {v!r}")
        a = self.new_user_alpha
        if a is not None:
            if (not isinstance(a, (list, tuple)) or len(a) != 5
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                               and abs(v) <= 1e6 for v in a)
                    or not 0 <= a[3] < a[4] or abs(a[2]) > 100):
                raise ValueError("config.new_user_alpha must be None or 5 finite numbers (c0, c1, s0, s1, s2) "
                                 f"with |s0| <= 100 and 0 <= s1 < s2 <= 1e6, got {a!r}")
            self.new_user_alpha = [float(v) for v in a]
        if self.validation_holdout not in ("random", "latest", "mixed"):
            raise ValueError(f"config.validation_holdout must be 'random', 'latest' or 'mixed', got "
                             f"{self.validation_holdout!r}")
        if self.wide_train not in ("residual", "learned", "none"):
            raise ValueError(f"config.wide_train must be 'residual', 'learned' or 'none', got {self.wide_train!r}")
        if self.meta not in ("fomaml", "none"):
            raise ValueError(f"config.meta must be 'fomaml' or 'none', got {self.meta!r}")
        if self.encoder == "transformer" and self.dim % self.heads:
            raise ValueError(f"config.dim={self.dim} must be a multiple of config.heads={self.heads}")
        return self

    @classmethod
    def from_dict(cls, d: Optional[dict]) -> "Config":
        if d is None:
            return cls().validate()
        if isinstance(d, Config):
            return Config(**asdict(d)).validate()
        if not isinstance(d, dict):
            raise TypeError(f"config must be a dict or Config, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; known: {sorted(names)}")
        return cls(**d).validate()

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ItemFeatures:
    """Each item's bag over the feature table: CSR ``offsets`` (N+1), ``indices``, ``weights``.

    Row ``i`` (< N) of the table is item i's own id row; rows N.. are feature values
    (``names[j]`` is the name of row ``N + j``, e.g. ``"genre=Comedy"``, ``"year=1990"``).
    ``dense`` (N, D) float32, optional: the items' dense features (e.g. text embeddings,
    centred and scaled; see :func:`recmeta_sdk.training.loop.dense_matrix`), projected linearly
    into the item vectors.
    """

    n_items: int
    names: list
    offsets: np.ndarray
    indices: np.ndarray
    weights: np.ndarray
    dense: np.ndarray | None = None

    @property
    def n_dense(self) -> int:
        return 0 if self.dense is None else int(np.asarray(self.dense).shape[1])

    @property
    def n_rows(self) -> int:
        return self.n_items + len(self.names)

    @staticmethod
    def identity(n_items: int) -> "ItemFeatures":
        return ItemFeatures(n_items, [], np.arange(n_items + 1, dtype=np.int64),
                            np.arange(n_items, dtype=np.int64), np.ones(n_items, dtype=np.float32))


def _csr_tensors(offsets, indices, weights):
    return (torch.as_tensor(np.asarray(offsets, dtype=np.int64)),
            torch.as_tensor(np.asarray(indices, dtype=np.int64)),
            torch.as_tensor(np.asarray(weights, dtype=np.float32)))


def _init_sequence_encoder(seq: nn.Module, g: torch.Generator) -> None:
    """Re-draw the sequence encoder's initial values from ``g`` with torch's default
    distributions (the constructors drew them from the global RNG)."""
    with torch.no_grad():
        for mod in seq.modules():
            if isinstance(mod, nn.MultiheadAttention):
                nn.init.xavier_uniform_(mod.in_proj_weight, generator=g)
                nn.init.zeros_(mod.in_proj_bias)
                b = 1.0 / math.sqrt(mod.out_proj.in_features)
                nn.init.uniform_(mod.out_proj.weight, -b, b, generator=g)
                nn.init.zeros_(mod.out_proj.bias)
            elif isinstance(mod, nn.Linear) and not isinstance(
                    mod, nn.modules.linear.NonDynamicallyQuantizableLinear):
                b = 1.0 / math.sqrt(mod.in_features)
                nn.init.uniform_(mod.weight, -b, b, generator=g)
                nn.init.uniform_(mod.bias, -b, b, generator=g)
            elif isinstance(mod, nn.LayerNorm):
                nn.init.ones_(mod.weight)
                nn.init.zeros_(mod.bias)
            elif isinstance(mod, nn.GRU):
                b = 1.0 / math.sqrt(mod.hidden_size)
                for p in mod.parameters():
                    nn.init.uniform_(p, -b, b, generator=g)


def _causal_last(enc: nn.TransformerEncoder, e: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """The causal transformer ``enc``'s output at position ``last[b]`` of each sequence
    ``e[b]`` (B, L, d), without computing the other positions of the last layer.

    The layers before the last run on every position (their outputs are the last layer's
    keys and values). In the last (pre-norm) layer only the query at ``last[b]`` is needed:
    it attends to positions ``<= last[b]`` (what the causal mask leaves it), and its
    feed-forward block runs on one row per sequence, so the last layer costs its key / value
    projections instead of L rows of attention output, projection and feed-forward. The
    result equals ``enc(e, mask=causal)[arange(B), last]`` up to float rounding (same
    parameters, same operations per row; dropout draws differ in training)."""
    B, L, _ = e.shape
    layers = enc.layers
    if len(layers) > 1:
        mask = torch.triu(torch.full((L, L), float("-inf")), diagonal=1)
        for layer in layers[:-1]:
            e = layer(e, src_mask=mask, is_causal=True)
    layer = layers[-1]
    if not layer.norm_first:  # the network builds pre-norm layers; anything else: full pass
        mask = torch.triu(torch.full((L, L), float("-inf")), diagonal=1)
        return layer(e, src_mask=mask, is_causal=True)[torch.arange(B), last]
    rows = torch.arange(B)
    x = e[rows, last]  # (B, d): the residual stream at the read-out positions
    y = layer.norm1(e)
    after = torch.arange(L)[None, :] > last[:, None]  # keys the causal mask hides
    mha = layer.self_attn
    if not (mha._qkv_same_embed_dim and mha.in_proj_bias is not None and mha.bias_k is None
            and not mha.add_zero_attn and mha.batch_first):
        a = mha(y[rows, last][:, None], y, y, key_padding_mask=after, need_weights=False)[0][:, 0]
    else:
        # nn.MultiheadAttention's computation for one query per sequence, on the (B, L, d)
        # layout as it is (no transposed copies): projections, scaled dot-product attention
        # with attention dropout in training, output projection
        d, H = mha.embed_dim, mha.num_heads
        w, b = mha.in_proj_weight, mha.in_proj_bias
        q = torch.nn.functional.linear(y[rows, last], w[:d], b[:d]).view(B, H, 1, d // H)
        kv = torch.nn.functional.linear(y, w[d:], b[d:]).view(B, L, 2, H, d // H)
        k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)  # (B, H, L, d / H)
        mask = torch.zeros(B, 1, 1, L).masked_fill(after[:, None, None, :], float("-inf"))
        o = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=mha.dropout if mha.training else 0.0)
        a = mha.out_proj(o.reshape(B, d))
    x = x + layer.dropout1(a)
    return x + layer._ff_block(layer.norm2(x))


class RecMetaNet(nn.Module):
    """The network (see the module docstring). All state lives in parameters and buffers."""

    def __init__(self, cfg: Config, item_features: ItemFeatures, n_user_feature_rows: int = 0):
        super().__init__()
        # every initial value is drawn from a generator seeded by cfg.seed (see _build). The
        # torch modules' constructors also draw their own (discarded) initial values from the
        # global RNG; fork_rng restores the caller's RNG state afterwards, so building a model
        # neither depends on nor changes it.
        with torch.random.fork_rng(devices=[]):
            self._build(cfg, item_features, n_user_feature_rows)

    def _build(self, cfg: Config, item_features: ItemFeatures, n_user_feature_rows: int) -> None:
        self.cfg = cfg
        d = cfg.dim
        self.n_items = item_features.n_items
        N = self.n_items
        R = item_features.n_rows
        g = torch.Generator().manual_seed(cfg.seed)
        self.emb_in = nn.Parameter(torch.randn(R, d, generator=g) * 0.05)
        self.emb_out = nn.Parameter(torch.randn(R, d, generator=g) * 0.05)
        self.item_bias = nn.Parameter(torch.zeros(N))
        off, idx, w = _csr_tensors(item_features.offsets, item_features.indices, item_features.weights)
        self.register_buffer("feat_offsets", off)
        self.register_buffer("feat_indices", idx)
        self.register_buffer("feat_weights", w)
        self._build_dense(cfg, item_features)
        self.n_user_rows = int(n_user_feature_rows)
        self.emb_user = nn.Parameter(torch.randn(max(self.n_user_rows, 1), d, generator=g) * 0.05)
        # sequence encoder
        self.pos = nn.Parameter(torch.randn(cfg.seq_len, d, generator=g) * 0.02)
        if cfg.encoder == "transformer":
            self.seq = nn.TransformerEncoder(
                nn.TransformerEncoderLayer(d, cfg.heads, dim_feedforward=2 * d, dropout=cfg.dropout,
                                           batch_first=True, norm_first=True),
                cfg.layers, enable_nested_tensor=False)
        elif cfg.encoder == "gru":
            self.seq = nn.GRU(d, d, num_layers=cfg.layers, batch_first=True)
        else:
            self.seq = None
        if self.seq is not None:
            _init_sequence_encoder(self.seq, g)
        n_parts = 3 if cfg.encoder != "none" else 2
        self.fuse1 = nn.Linear(n_parts * d, cfg.hidden)
        self.fuse2 = nn.Linear(cfg.hidden, d)
        self.skip = nn.Linear(n_parts * d, d, bias=False)
        for lin in (self.fuse1, self.fuse2, self.skip):
            bound = 1.0 / math.sqrt(lin.in_features)
            with torch.no_grad():
                lin.weight.copy_((torch.rand(lin.weight.shape, generator=g) * 2 - 1) * bound)
                if lin.bias is not None:
                    lin.bias.zero_()
        self.drop = nn.Dropout(cfg.dropout)
        # adaptation parameters (initial values) and their log step sizes
        self.phi_gamma = nn.Parameter(torch.zeros(d))
        self.phi_delta = nn.Parameter(torch.zeros(d))
        self.log_lr = nn.Parameter(torch.full((2, d), math.log(cfg.inner_lr)))
        # wide item-to-item part (filled by training when enabled)
        mode = self.wide_mode(cfg, N)
        nw = N if mode == "dense" else 0
        self.register_buffer("wide", torch.zeros(nw, nw))
        if mode == "sparse":  # the sparse wide part: CSR rows (history item -> scored items)
            self.register_buffer("wide_indptr", torch.zeros(N + 1, dtype=torch.int64))
            self.register_buffer("wide_indices", torch.zeros(0, dtype=torch.int32))
            self.register_buffer("wide_values", torch.zeros(0, dtype=torch.float32))
        self.wide_coef = nn.Parameter(torch.tensor([float(cfg.wide_init), float(cfg.wide_slope)]))
        # multiplier of alpha set by the post-training calibration (1 while training)
        # (log m, n_lo, n_hi): alpha's multiplier, 1 up to n_lo items, m from n_hi on, log-linear
        # in log(1 + n) between (set by the post-training calibration; m = 1 while training)
        self.register_buffer("wide_scale", torch.tensor([0.0, 1.0, 2.0]))
        # behaviour head (blocked gradient)
        self.beta_map = nn.Linear(d, d)
        with torch.no_grad():
            b = 1.0 / math.sqrt(d)
            nn.init.uniform_(self.beta_map.weight, -b, b, generator=g)
            nn.init.uniform_(self.beta_map.bias, -b, b, generator=g)
        self.beta_bias = nn.Parameter(torch.zeros(N))

    def _build_dense(self, cfg: Config, item_features: ItemFeatures) -> None:
        """Dense item features: buffer ``item_dense`` (N, D) and the learned projection
        ``item_dense_proj`` (D, 2d) into [input | output] item vectors. Its row blocks are the
        per-column maps W_c, so the item vector adds ``sum_c W_c x_c``. Registered only when
        D > 0 (models without dense features keep their tensor set); initialised from its own
        generator (seed + 7919) so that it changes no other parameter's initial values."""
        self.n_dense = item_features.n_dense
        if not self.n_dense:
            return
        dense = np.asarray(item_features.dense, dtype=np.float32)
        if dense.shape != (self.n_items, self.n_dense):
            raise ValueError(f"item_features.dense has shape {dense.shape}, expected ({self.n_items}, D)")
        self.register_buffer("item_dense", torch.from_numpy(dense.copy()))
        gd = torch.Generator().manual_seed(cfg.seed + 7919)
        # the dense inputs are centred with unit mean squared norm, so N(0, 0.05^2) weights
        # give projections of the same scale as the embedding rows
        self.item_dense_proj = nn.Parameter(torch.randn(self.n_dense, 2 * cfg.dim, generator=gd) * 0.05)

    @staticmethod
    def wide_mode(cfg: Config, n_items: int) -> Optional[str]:
        """``"dense"`` (an N x N EASE matrix: :func:`dense_wide_bytes` within
        ``config.wide_budget_bytes``), ``"sparse"`` (an item-neighbourhood CSR matrix) or None
        (no wide part: ``config.wide`` is ``"none"`` or the catalogue exceeds ``wide_max_items``)."""
        if cfg.wide != "ease" or n_items > cfg.wide_max_items:
            return None
        budget = getattr(cfg, "wide_budget_bytes", None)
        return "dense" if budget is None or dense_wide_bytes(n_items) <= budget else "sparse"

    @staticmethod
    def wide_enabled(cfg: Config, n_items: int) -> bool:
        """True when the wide part is the dense N x N matrix (see :meth:`wide_mode`)."""
        return RecMetaNet.wide_mode(cfg, n_items) == "dense"

    @property
    def wide_sparse(self) -> Optional["SparseWide"]:
        """The sparse wide weights (a :class:`SparseWide` over the buffers), or None."""
        if not hasattr(self, "wide_indptr"):
            return None
        return SparseWide(self.wide_indptr, self.wide_indices, self.wide_values, self.n_items)

    def set_wide_sparse(self, W: "SparseWide") -> None:
        """Replace the sparse wide weights (the buffers' lengths change with ``W``'s nnz)."""
        if not hasattr(self, "wide_indptr"):
            raise ValueError("this network's wide part is not sparse (see RecMetaNet.wide_mode)")
        if W.n != self.n_items:
            raise ValueError(f"sparse wide weights over {W.n} items, the network has {self.n_items}")
        self.wide_indptr = W.indptr.clone()
        self.wide_indices = W.indices.clone()
        self.wide_values = W.values.clone()

    @property
    def has_wide(self) -> bool:
        return self.wide.numel() > 0 or hasattr(self, "wide_indptr")

    def wide_alpha(self, n: torch.Tensor, new: bool = False) -> torch.Tensor:
        """alpha(n) (B,) for history lengths n (B,): ``exp(s0 ramp(n)) softplus(c0 + c1
        log(1 + n))``, ``ramp`` log-linear from 0 at ``n = s1`` to 1 at ``n = s2``, with ``(c0,
        c1) = wide_coef`` and ``(s0, s1, s2) = wide_scale``; for a new user's history
        (``new``: an adapted user, not one of the training log) the five values of
        ``config.new_user_alpha`` instead when it is set."""
        ln = torch.log1p(n.to(torch.float32))
        if new and self.cfg.new_user_alpha is not None:
            c0, c1, s0, s1, s2 = (torch.tensor(float(v), dtype=torch.float32) for v in self.cfg.new_user_alpha)
        else:
            (c0, c1), (s0, s1, s2) = self.wide_coef, self.wide_scale
        lo, hi = torch.log1p(s1), torch.log1p(s2)
        scale = torch.exp(s0 * ((ln - lo) / (hi - lo)).clamp(0.0, 1.0))
        return scale * torch.nn.functional.softplus(c0 + c1 * ln)

    def wide_input(self, rows: torch.Tensor, items: torch.Tensor, B: int) -> torch.Tensor:
        """alpha(n) * multi-hot history, (B, N), from a CSR-like (rows, items) listing."""
        x = torch.zeros(B, self.n_items)
        x[rows, items] = 1.0
        n = x.sum(1)
        return x * self.wide_alpha(n)[:, None]

    def wide_offset(self, rows: torch.Tensor, items: torch.Tensor, B: int,
                    W: Optional[torch.Tensor] = None, new: bool = False) -> Optional[torch.Tensor]:
        """The wide part of the logits, ``alpha(n_b) * sum_{j in history_b} w_j W[j, :]`` (B, N),
        by an embedding bag over the rows of W (duplicates counted once); None when disabled.

        ``rows`` (nondecreasing) and ``items`` list each history in time order. ``w_j`` is 1,
        or with ``config.wide_recency = g`` ``1 + g exp(-wide_recency_decay * r_j)``, ``r_j``
        the rank of the item's latest occurrence from the end of its history (0: the last).
        ``new``: the histories are new users' (see :meth:`wide_alpha`)."""
        if not self.has_wide:
            return None
        if W is None:
            W = self.wide_sparse if hasattr(self, "wide_indptr") else self.wide
        N = self.n_items
        rows, items = rows.to(torch.int64), items.to(torch.int64)
        key, inv = torch.unique(rows * N + items, return_inverse=True)  # sorted by row
        r, i = key // N, key % N
        counts = torch.bincount(r, minlength=B)
        off = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(counts, 0)])
        w = None
        g = self.cfg.wide_recency
        if g:  # recency: an item's weight 1 + g exp(-decay * rank from the end of its row)
            nocc = torch.bincount(rows, minlength=B)
            pos = torch.arange(rows.numel()) - (torch.cumsum(nocc, 0) - nocc)[rows]
            rank = (nocc[rows] - 1 - pos).to(torch.float32)
            w_occ = 1.0 + g * torch.exp(-float(self.cfg.wide_recency_decay) * rank)
            w = torch.zeros(key.numel()).scatter_reduce(0, inv, w_occ, "amax", include_self=False)
        if isinstance(W, SparseWide):
            base = W.rows_sum(i, off, w)
        else:
            base = ops.embedding_bag(W, i, off, per_sample_weights=w)
        return base * self.wide_alpha(counts, new)[:, None]

    # ------------------------------------------------------------------ towers
    def item_vectors(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(X, V): input and output item vectors, (N, d) each, by one fused TBE bag.

        While the item tables are sharded across ranks (distributed training: a submodule
        ``sharded_tables``, see :mod:`recmeta_sdk.training.distributed`) the shards compute
        them."""
        if "sharded_tables" in self._modules:
            return self._modules["sharded_tables"].item_vectors(self)
        off = self.feat_offsets
        nnz = int(off[-1])
        offsets = torch.cat([off, off[1:] + nnz])
        idx = torch.cat([self.feat_indices, self.feat_indices])
        w = torch.cat([self.feat_weights, self.feat_weights])
        both = ops.embedding_bag([self.emb_in, self.emb_out], idx, offsets, per_sample_weights=w)
        if getattr(self, "n_dense", 0):
            both = both + self.item_dense @ self.item_dense_proj
        d = self.cfg.dim
        return both[:, :d], both[:, d:]

    def user_state(self, X: torch.Tensor, bag_idx: torch.Tensor, bag_off: torch.Tensor,
                   bag_w: torch.Tensor, seq: torch.Tensor, seq_len: torch.Tensor,
                   uf_idx: torch.Tensor, uf_off: torch.Tensor) -> torch.Tensor:
        """User states h (B, d) from the history bag (CSR over item indices, weights),
        the recent sequences (B, L) right-padded with lengths (B,), and user-feature bags."""
        bag = ops.embedding_bag(X, bag_idx, bag_off, per_sample_weights=bag_w)
        parts = [bag]
        B = bag.shape[0]
        if uf_idx.numel() and self.n_user_rows:
            uf = ops.embedding_bag(self.emb_user, uf_idx, uf_off)
        else:
            uf = torch.zeros(B, self.cfg.dim)
        parts.append(uf)
        if self.seq is not None:
            L = seq.shape[1]
            Xp = torch.cat([X, torch.zeros(1, X.shape[1])], 0)  # row N: padding
            e = Xp[seq] + self.pos[:L][None]
            last = (seq_len.clamp(min=1) - 1)
            if self.cfg.encoder == "transformer":
                s = _causal_last(self.seq, e, last)
            else:
                out, _ = self.seq(e)
                s = out[torch.arange(B), last]
            s = torch.where((seq_len > 0)[:, None], s, torch.zeros_like(s))
            parts.append(s)
        z = torch.cat(parts, 1)
        return self.fuse2(self.drop(torch.tanh(self.fuse1(z)))) + self.skip(z)

    # ------------------------------------------------------------------ policy
    def logits(self, h: torch.Tensor, V: torch.Tensor, offset: Optional[torch.Tensor] = None) -> torch.Tensor:
        s = h @ V.T + self.item_bias
        if offset is not None:
            s = s + offset
        return s / self.cfg.temperature

    def apply_phi(self, h, gamma, delta):
        return h * (1.0 + gamma) + delta

    def support_grad(self, h, gamma, delta, V, sup_rows, sup_items, sup_w, B, offset=None, groups=None):
        """Closed-form gradient of the support loss with respect to (gamma, delta), per user.

        The support loss of user b is ``-sum_i w_i log pi(a_i | h'_b) / sum_i w_i`` over
        its support items a_i with weights w_i (rewards). With ``g = dL/dh'``:
        ``dL/dgamma = g * h``, ``dL/ddelta = g``. No autograd graph is built.

        With ``groups`` ((B,) int64 task index of each row, tasks 0..G-1) the rows of a task
        share one phi and the gradient is that of the task's support loss
        ``-sum_{i in task} w_i log pi(a_i | h'_{row(i)}) / sum_{i in task} w_i``: the rows'
        gradients weighted by their total support weight, returned per task, (G, d) each.
        """
        if groups is not None:
            gg, gd = self.support_grad(h, gamma, delta, V, sup_rows, sup_items, sup_w, B, offset)
            with torch.no_grad():
                G = int(groups.max()) + 1 if groups.numel() else 0
                tot = torch.zeros(B).index_add_(0, sup_rows, sup_w)
                gtot = torch.zeros(G).index_add_(0, groups, tot).clamp(min=1e-12)
                wrow = (tot / gtot[groups])[:, None]
                return (torch.zeros(G, gg.shape[1]).index_add_(0, groups, gg * wrow),
                        torch.zeros(G, gd.shape[1]).index_add_(0, groups, gd * wrow))
        with torch.no_grad():
            hp = self.apply_phi(h, gamma, delta)
            p = torch.softmax(self.logits(hp, V, offset), dim=1)  # (B, N)
            tot = torch.zeros(B).index_add_(0, sup_rows, sup_w).clamp(min=1e-12)
            target = torch.zeros_like(p)
            target.index_put_((sup_rows, sup_items), sup_w, accumulate=True)
            dl_ds = (p - target / tot[:, None]) / self.cfg.temperature
            g = dl_ds @ V  # (B, d)
            return g * h, g

    def adapt_phi(self, h, V, sup_rows, sup_items, sup_w, steps: int, lr=None, offset=None,
                  groups=None, init=None):
        """Per-user adaptation parameters after ``steps`` gradient steps on the support set.

        Returns (gamma, delta), each (B, d). With ``lr=None`` the learned step sizes are
        used; the returned tensors keep autograd paths to ``phi_*`` and ``log_lr`` (the
        support gradients themselves are constants: first-order MAML).

        ``groups`` ((B,) int64 task of each row): one phi per task, adapted on the task's
        support set (see :meth:`support_grad`), returned expanded to the rows. ``init``:
        (gamma, delta), each (d,) or (B, d), to start from instead of ``phi_*`` (a task's
        adapted parameters, see :mod:`recmeta_sdk.training.meta_tasks`).
        """
        if groups is not None and init is not None:
            raise ValueError("adapt_phi: init and groups cannot be combined")
        if lr is None:
            lr_g, lr_d = torch.exp(self.log_lr[0]), torch.exp(self.log_lr[1])
        else:
            lr_g = lr_d = torch.tensor(float(lr))
        B = h.shape[0]
        if init is None:
            g0, d0 = self.phi_gamma, self.phi_delta
        else:
            g0, d0 = (torch.as_tensor(x, dtype=h.dtype) for x in init)
        n = B if groups is None else (int(groups.max()) + 1 if groups.numel() else 0)
        gamma, delta = g0.expand(n, -1), d0.expand(n, -1)
        hd = h.detach()
        for _ in range(steps):
            ga, da = gamma.detach(), delta.detach()
            if groups is not None:
                ga, da = ga[groups], da[groups]
            gg, gd = self.support_grad(hd, ga, da, V.detach(), sup_rows, sup_items, sup_w, B,
                                       None if offset is None else offset.detach(), groups=groups)
            gamma = gamma - lr_g * gg
            delta = delta - lr_d * gd
        if groups is not None:
            return gamma[groups], delta[groups]
        return gamma, delta

    def behaviour_logits(self, h: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        return self.beta_map(h.detach()) @ V.detach().T + self.beta_bias
