"""Training on several processes with ``torch.distributed``: data-parallel, item tables sharded.

``recmeta_sdk.train`` runs here when a process group of more than one rank is initialised,
or when it runs under ``torchrun`` (the ``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR`` /
``MASTER_PORT`` environment), with ``distributed="auto"`` (the default) or ``True``::

    torchrun --nproc_per_node=2 -m recmeta_sdk train --data log.parquet --out model.recmeta

    # or in your own script, launched by torchrun on every rank:
    model = rm.train(log, items=items)                     # the same call
    recmeta_sdk.training.distributed.save(model, "model.recmeta")   # rank 0 writes, all wait

What each rank does
-------------------
* **Process group.** An existing default group is used as it is; otherwise one is
  initialised from the torchrun environment (``env://``): gloo on CPU, NCCL when CUDA is
  available (:class:`DistributedConfig` ``backend``). Training computes on the CPU as the
  single-process trainer does; with NCCL the collectives run on ``cuda:LOCAL_RANK``, the
  tensors staged through it. The group is left initialised.
* **Data.** A Parquet file or folder (``recmeta_sdk.train(path)``) is read by each rank
  for its own share of the row groups only (:func:`read_parquet`): the distinct ids are
  all-gathered so that every rank builds the same id maps, then the compact arrays (dense
  ids, float32 rewards, timestamps) are all-gathered in row order. Any other log is read
  whole by every rank. Every rank then holds the same prepared log (checked: a rank
  whose log, catalogue or config differs from rank 0's raises :class:`ValueError`). All
  ranks draw the same user permutation and the same support / query cuts from the seed,
  and rank ``r`` trains on the ``r``-th contiguous part of each global batch of
  ``config.batch_size`` users (:func:`recmeta_sdk.training.loop.make_batch` ``part``): the
  global batch is the one a single process would train on.
* **Dense parameters** (towers, biases, the feature rows of the item tables, the user
  feature table) are replicated. Synchronisation is an explicit all-reduce (sum) of the
  gradients in one flat buffer per step, not DDP: each rank's loss is its share of the
  global batch loss (the sample weights are normalised by their sum over the ranks, the
  batch means taken over the global batch), so the sum is the gradient of the global
  batch. Gradient clipping uses the global norm; every rank then takes the same AdamW step.
* **Item tables, sharded row-wise.** The id rows of the input and output item tables
  (``2 * n_items * dim`` float32: the part that grows with the catalogue) are split into
  ``world_size`` contiguous ranges of items when they exceed ``table_budget_bytes``
  (:class:`DistributedConfig`; ``shard_tables=True`` forces it). Each rank keeps its rows
  and their AdamW moments only, pools the item vectors of its own items with our fused
  :func:`recmeta_sdk.ops.embedding_bag` (its id rows and the replicated feature rows, in
  the bag's order: bit-identical to the unsharded lookup), and the pooled rows are
  all-gathered (every rank scores the whole catalogue). Backward: the gradient of the
  pooled rows is all-reduced and each rank back-propagates its own items' rows through the
  bag; a rank's id rows get exactly the gradient the unsharded table gets.
* **The result.** After training the shards are all-gathered, so every rank returns the
  same full :class:`~recmeta_sdk.Recommender` (the full tables exist on every rank at that
  point). :func:`save` writes the model file on rank 0 only (the atomic writer of
  :mod:`recmeta_sdk.model.io`) and makes every rank wait for it, so each can then load it.
* **Failures.** Every collective is bounded by ``timeout_s``; a collective that fails
  (another rank died, or timed out) raises :class:`DistributedTrainingError` on the
  surviving ranks naming the rank and the step; nothing is written.

Parity: with the same seed and global batch, a 2-rank run gives the model of one process
up to float summation order (the sums over ranks and over the halves of a batch) when
``config.dropout`` is 0: the served scores within :data:`PARITY_TOL` (relative), every
parameter within :data:`PARAM_ATOL` (absolute). Dropout masks are drawn per rank (from the
torch RNG, seeded per rank from the run's seed), so with dropout the runs are equivalent in
distribution, not equal. Supported: per-user tasks, no validation or calibration set
(``validation=None``, ``config.validation == 0``, ``config.calib_users == 0``); other
combinations raise :class:`ValueError`.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as tdist
from torch import nn

from .. import ops
from ..model.network import Config, RecMetaNet

logger = logging.getLogger("recmeta")

__all__ = [
    "PARAM_ATOL",
    "PARITY_TOL",
    "DistributedConfig",
    "DistributedContext",
    "DistributedTrainingError",
    "ShardedItemTables",
    "fit",
    "read_parquet",
    "resolve",
    "save",
    "shard",
    "table_bytes",
    "unshard",
]

#: relative tolerance of the 2-rank vs 1-process parity (dropout 0) of the served scores
#: (``max |a - b| / max |b|`` over every user and item), as ``tests/test_distributed.py``
#: checks it; measured: 5e-8 after 2 epochs on its tiny log
PARITY_TOL = 1e-5
#: absolute tolerance of the same parity per parameter. Most parameters agree to 1e-6 of
#: their scale; the exception is a direction whose exact gradient is 0 (the transformer's
#: attention key bias: softmax ignores it), where AdamW turns float rounding noise into steps
#: of up to ``lr`` each: measured 1.4e-4 after 8 steps at lr 2e-3
PARAM_ATOL = 1e-3


class DistributedTrainingError(RuntimeError):
    """A collective of distributed training failed (another rank died or timed out)."""


@dataclass
class DistributedConfig:
    """Options of distributed training (``recmeta_sdk.train(..., distributed=DistributedConfig(...))``).

    Attributes
    ----------
    table_budget_bytes : int
        Per-rank budget of the item tables' id rows (``2 * n_items * dim * 4`` bytes,
        float32; their AdamW moments and gradient take three times as much again). Above it
        the rows are sharded across the ranks; a shard still above it raises
        :class:`ValueError` naming the number of ranks needed. Default 1 GiB.
    shard_tables : bool or None
        ``None`` (default): shard by the budget; ``True``: always shard; ``False``: never
        (replicated tables, the budget is not checked).
    backend : str or None
        ``"gloo"`` or ``"nccl"`` when this call initialises the process group; ``None``:
        NCCL when CUDA is available, else gloo. Ignored when a group exists.
    timeout_s : float
        Timeout of the process group this call initialises (each collective waits at most
        this long for the other ranks). Default 300.
    """

    table_budget_bytes: int = 1 << 30
    shard_tables: bool | None = None
    backend: str | None = None
    timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if isinstance(self.table_budget_bytes, bool) or not isinstance(self.table_budget_bytes, (int, np.integer)) \
                or self.table_budget_bytes < 0:
            raise ValueError(f"table_budget_bytes must be an int >= 0, got {self.table_budget_bytes!r}")
        if self.shard_tables not in (None, True, False):
            raise ValueError(f"shard_tables must be None, True or False, got {self.shard_tables!r}")
        if self.backend not in (None, "gloo", "nccl"):
            raise ValueError(f"backend must be None, 'gloo' or 'nccl', got {self.backend!r}")
        if not (isinstance(self.timeout_s, (int, float)) and not isinstance(self.timeout_s, bool)
                and np.isfinite(self.timeout_s) and self.timeout_s > 0):
            raise ValueError(f"timeout_s must be a finite number > 0, got {self.timeout_s!r}")


_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _torchrun_env() -> bool:
    return all(k in os.environ for k in _TORCHRUN_ENV)


def resolve(distributed: bool | str | DistributedConfig | None = "auto",
            options: DistributedConfig | None = None) -> DistributedContext | None:
    """The distributed context ``recmeta_sdk.train`` trains in, or None (one process).

    ``"auto"``: a context when a default process group of more than one rank is initialised,
    or when the torchrun environment (``RANK``, ``WORLD_SIZE`` > 1, ``MASTER_ADDR``,
    ``MASTER_PORT``) is set (the group is then initialised here); else None. ``True`` or a
    :class:`DistributedConfig`: a context (of any size, 1 included), or :class:`ValueError`
    when there is neither a group nor the torchrun environment. ``False`` / ``None``: None.
    ``options``: the :class:`DistributedConfig` of ``"auto"`` / ``True`` (default: the defaults).
    """
    if distributed is None or distributed is False:
        return None
    if isinstance(distributed, DistributedConfig):
        opts, required = distributed, True
    elif distributed is True:
        opts, required = options or DistributedConfig(), True
    elif isinstance(distributed, str) and distributed == "auto":
        opts, required = options or DistributedConfig(), False
    else:
        raise ValueError(f"distributed must be True, False, 'auto' or a DistributedConfig, got {distributed!r}")
    if not tdist.is_available():
        if required:
            raise ValueError("distributed training needs torch.distributed, which this torch build lacks")
        return None
    if tdist.is_initialized():
        if not required and tdist.get_world_size() < 2:
            return None
        return DistributedContext(opts, initialised_here=False)
    if _torchrun_env():
        try:
            world = int(os.environ["WORLD_SIZE"])
        except ValueError:
            raise ValueError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an int") from None
        if world < 2 and not required:
            return None
        backend = opts.backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        tdist.init_process_group(backend, init_method="env://",
                                 timeout=datetime.timedelta(seconds=float(opts.timeout_s)))
        return DistributedContext(opts, initialised_here=True)
    if required:
        raise ValueError("distributed training needs an initialised torch.distributed process group or the "
                         "torchrun environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT): launch with "
                         "torchrun --nproc_per_node=N, or call torch.distributed.init_process_group first")
    return None


class DistributedContext:
    """One rank's view of the process group during training (made by :func:`resolve`).

    Attributes: ``rank``, ``world_size``, ``backend``, ``options`` (the
    :class:`DistributedConfig`), ``device`` (where collectives run: CPU for gloo,
    ``cuda:LOCAL_RANK`` for NCCL), ``global_batch`` (the size of the global batch of the
    current step), ``where`` (the step, for error messages), ``collective_seconds`` (wall
    time spent in collectives so far, waiting for the other ranks included).
    """

    def __init__(self, options: DistributedConfig, initialised_here: bool = False):
        self.options = options
        self.rank = tdist.get_rank()
        self.world_size = tdist.get_world_size()
        self.backend = str(tdist.get_backend())
        self.device = (torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl"
                       else torch.device("cpu"))
        self.initialised_here = initialised_here
        self.global_batch = 0
        self.collective_seconds = 0.0  # wall time spent in collectives (waiting for the others included)
        self.where = "setup"
        self.sharded: set = set()  # ids of the sharded parameters (their gradients are not all-reduced)

    # ---------------------------------------------------------------- collectives
    def _run(self, what: str, fn):
        t0 = time.perf_counter()
        try:
            return fn()
        except Exception as e:  # gloo / NCCL errors: RuntimeError, DistBackendError, timeouts
            raise DistributedTrainingError(
                f"distributed training, rank {self.rank} of {self.world_size}: {what} failed at {self.where} "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); another rank has probably "
                f"died or stopped responding (timeout {self.options.timeout_s:g} s when this call set up the "
                f"group); no model file is written") from e
        finally:
            self.collective_seconds += time.perf_counter() - t0

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """The sum over the ranks of ``t`` (every rank passes a tensor of the same shape); a
        new CPU tensor, no autograd."""
        buf = t.detach().to(self.device, copy=True).contiguous()
        self._run("all_reduce", lambda: tdist.all_reduce(buf))
        return buf.cpu() if self.device.type != "cpu" else buf

    def all_gather_rows(self, local: torch.Tensor, counts: list) -> torch.Tensor:
        """The ranks' (counts[r], ...) blocks concatenated in rank order (no autograd)."""
        m = max(counts)
        pad = torch.zeros((m,) + tuple(local.shape[1:]), dtype=local.dtype, device=self.device)
        pad[:local.shape[0]] = local.detach().to(self.device)
        out = [torch.empty_like(pad) for _ in range(self.world_size)]
        self._run("all_gather", lambda: tdist.all_gather(out, pad))
        full = torch.cat([o[:c] for o, c in zip(out, counts)])
        return full.cpu() if self.device.type != "cpu" else full

    def barrier(self, what: str = "barrier") -> None:
        """Wait for every rank (an all-reduce of one number: works on every backend)."""
        self.all_reduce_sum(torch.zeros(1))

    # ---------------------------------------------------------------- data
    def part(self, n: int) -> slice:
        """This rank's contiguous part of a global batch of ``n`` samples."""
        r, w = self.rank, self.world_size
        return slice(n * r // w, n * (r + 1) // w)

    def check_same_inputs(self, prep, cfg: Config, n_user_rows: int) -> None:
        """ValueError when the ranks' logs, catalogues or configs differ (they must be the same)."""
        h = hashlib.sha256()
        for a in (prep.offsets, prep.items, prep.rewards, prep.propensity if prep.propensity is not None else None):
            h.update(b"-" if a is None else np.ascontiguousarray(a).tobytes())
        h.update(repr(list(map(str, prep.item_ids))).encode())
        h.update(repr(list(map(str, prep.user_ids))).encode())
        h.update(json.dumps(asdict(cfg), sort_keys=True, default=str).encode())
        h.update(str(n_user_rows).encode())
        mine = torch.tensor([int.from_bytes(h.digest()[:7], "little")], dtype=torch.int64)
        every = self.all_gather_rows(mine, [1] * self.world_size)
        bad = [r for r in range(self.world_size) if int(every[r]) != int(every[0])]
        if bad:
            raise ValueError(f"distributed training: the log, catalogue or config of rank(s) {bad} differs from "
                             f"rank 0's; every rank must train on the same data with the same config and seed")

    # ---------------------------------------------------------------- one step
    def train_step(self, net: RecMetaNet, prep, users: np.ndarray, cfg: Config, rng: np.random.Generator,
                   user_feats, logq: torch.Tensor, gen: torch.Generator, cross, params: list) -> float:
        """Forward and backward of this rank's part of the global batch ``users``, the
        gradients summed over the ranks and clipped by their global norm (5, as in
        :func:`recmeta_sdk.training.loop.fit`). Returns the global batch's loss (the sum of
        the ranks' losses). A rank whose part is empty (a last batch smaller than the world)
        still takes part in every collective, with a zero loss."""
        from .loop import batch_loss, make_batch

        batch = make_batch(prep, users, cfg, rng, user_feats, part=self.part(len(users)))
        self.global_batch = len(users)
        if batch.B:
            loss, _ = batch_loss(net, batch, cfg, logq, gen, cross=cross, dist=self)
        else:
            X, V = net.item_vectors()
            self.all_reduce_sum(torch.zeros(2))  # batch_loss's weight normalisers
            if net.n_items > cfg.full_softmax_max:  # its negatives: keep gen in step with the other ranks
                torch.multinomial(torch.exp(logq), cfg.n_negatives, replacement=True, generator=gen)
            loss = (X.sum() + V.sum()) * 0.0
        loss.backward()
        return self.sync_grads(params, loss.detach(), max_norm=5.0)

    def sync_grads(self, params: list, loss: torch.Tensor, max_norm: float | None = None) -> float:
        """Sum the replicated parameters' gradients over the ranks (one flat all-reduce that
        also sums ``loss``, the presence of each gradient, and the squared norm of the
        sharded gradients), then clip every gradient by the global norm ``max_norm``.
        Returns the summed loss."""
        rep = [p for p in params if id(p) not in self.sharded]
        shard = [p for p in params if id(p) in self.sharded and p.grad is not None]
        sq_shard = sum((p.grad.double().pow(2).sum() for p in shard), torch.zeros((), dtype=torch.float64))
        flags = torch.tensor([p.grad is not None for p in rep], dtype=torch.float32)
        parts = [p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel()) for p in rep]
        tail = torch.stack([loss.float().reshape(()), sq_shard.float()])
        flat = self.all_reduce_sum(torch.cat(parts + [flags, tail]))
        pos = 0
        for p, f in zip(rep, flat[-2 - len(rep):-2]):
            n = p.numel()
            p.grad = flat[pos:pos + n].view_as(p).clone() if float(f) > 0 else None
            pos += n
        if max_norm is not None:
            sq = sum((p.grad.pow(2).sum() for p in rep if p.grad is not None), torch.zeros(()))
            total = float(torch.sqrt(sq + flat[-1]))
            scale = max_norm / (total + 1e-6)
            if scale < 1.0:
                for p in params:
                    if p.grad is not None:
                        p.grad.mul_(scale)
        return float(flat[-2])


class _GatherRows(torch.autograd.Function):
    """All-gather of the ranks' pooled rows; backward: the gradient summed over the ranks,
    this rank's rows of it."""

    @staticmethod
    def forward(ctx, local, dist: DistributedContext, counts: list, lo: int, hi: int):
        ctx.dist, ctx.lo, ctx.hi = dist, lo, hi
        return dist.all_gather_rows(local, counts)

    @staticmethod
    def backward(ctx, grad):
        g = ctx.dist.all_reduce_sum(grad.contiguous())
        return g[ctx.lo:ctx.hi], None, None, None, None


class ShardedItemTables(nn.Module):
    """The id rows of a :class:`~recmeta_sdk.model.RecMetaNet`'s input and output item
    tables, sharded row-wise: this rank holds items ``lo .. hi-1`` (a contiguous range,
    ``np.array_split``'s sizes), plus the replicated feature rows (rows ``N ..`` of the
    tables: genres, years, ... shared by many items).

    Parameters ``in_ids``, ``out_ids`` (hi - lo, d) and ``in_feat``, ``out_feat`` (R - N, d).
    :meth:`item_vectors` is what the network's ``item_vectors`` returns while it holds this
    module as ``sharded_tables`` (see :func:`shard`).
    """

    def __init__(self, net: RecMetaNet, dist: DistributedContext):
        super().__init__()
        N, W = net.n_items, dist.world_size
        if N < W:
            raise ValueError(f"cannot shard {N} items across {W} ranks (fewer items than ranks)")
        bounds = [N * r // W for r in range(W + 1)]
        self.lo, self.hi = bounds[dist.rank], bounds[dist.rank + 1]
        self.counts = [bounds[r + 1] - bounds[r] for r in range(W)]
        self.n_items, self.dist = N, dist
        lo, hi = self.lo, self.hi
        self.in_ids = nn.Parameter(net.emb_in.detach()[lo:hi].clone())
        self.out_ids = nn.Parameter(net.emb_out.detach()[lo:hi].clone())
        self.in_feat = nn.Parameter(net.emb_in.detach()[N:].clone())
        self.out_feat = nn.Parameter(net.emb_out.detach()[N:].clone())
        off, idx = net.feat_offsets, net.feat_indices
        a, b = int(off[lo]), int(off[hi])
        lidx = idx[a:b].clone()
        is_id = lidx < N
        stray = is_id & ((lidx < lo) | (lidx >= hi))
        if bool(stray.any()):
            raise ValueError("cannot shard the item tables: an item's bag reads another item's id row")
        # local rows: this rank's id rows first, then the feature rows
        self.bag_indices = torch.where(is_id, lidx - lo, lidx - N + (hi - lo))
        self.bag_offsets = off[lo:hi + 1] - a
        self.bag_weights = net.feat_weights[a:b].clone()

    def item_vectors(self, net: RecMetaNet):
        """(X, V) (N, d) each: this rank's items pooled by the fused bag, all ranks' gathered."""
        t_in = torch.cat([self.in_ids, self.in_feat])
        t_out = torch.cat([self.out_ids, self.out_feat])
        nnz = int(self.bag_offsets[-1])
        offsets = torch.cat([self.bag_offsets, self.bag_offsets[1:] + nnz])
        idx = torch.cat([self.bag_indices, self.bag_indices])
        w = torch.cat([self.bag_weights, self.bag_weights])
        local = ops.embedding_bag([t_in, t_out], idx, offsets, per_sample_weights=w)
        both = _GatherRows.apply(local, self.dist, self.counts, self.lo, self.hi)
        if getattr(net, "n_dense", 0):
            both = both + net.item_dense @ net.item_dense_proj
        d = net.cfg.dim
        return both[:, :d], both[:, d:]

    def full_tables(self):
        """(emb_in, emb_out) (R, d) each: the shards all-gathered, the feature rows appended."""
        ins = self.dist.all_gather_rows(self.in_ids.detach(), self.counts)
        outs = self.dist.all_gather_rows(self.out_ids.detach(), self.counts)
        return torch.cat([ins, self.in_feat.detach()]), torch.cat([outs, self.out_feat.detach()])


def table_bytes(n_items: int, dim: int) -> int:
    """Bytes of the id rows of the input and output item tables (float32)."""
    return 2 * int(n_items) * int(dim) * 4


def shard(net: RecMetaNet, dist: DistributedContext) -> bool:
    """Shard ``net``'s item tables across the ranks when the options say so (see
    :class:`DistributedConfig`); returns whether it did. The full ``emb_in`` / ``emb_out``
    parameters are replaced by a :class:`ShardedItemTables` submodule ``sharded_tables``
    (:func:`unshard` restores them)."""
    o, W = dist.options, dist.world_size
    full = table_bytes(net.n_items, net.cfg.dim)
    per_rank = table_bytes(-(-net.n_items // W), net.cfg.dim)
    if o.shard_tables is False:
        return False
    if o.shard_tables is None and full <= o.table_budget_bytes:
        return False
    if o.shard_tables is None and per_rank > o.table_budget_bytes:
        need = -(-full // max(o.table_budget_bytes, 1))
        raise ValueError(f"the item tables need {full} bytes ({net.n_items} items x dim {net.cfg.dim} x 2 tables, "
                         f"float32), {per_rank} per rank sharded over {W} ranks: above table_budget_bytes "
                         f"{o.table_budget_bytes}; run on at least {need} ranks or raise the budget")
    st = ShardedItemTables(net, dist)
    del net.emb_in, net.emb_out
    net.sharded_tables = st
    dist.sharded = {id(st.in_ids), id(st.out_ids)}
    logger.info("rank %d: item tables sharded, items %d..%d of %d (%d of %d bytes of id rows)", dist.rank,
                st.lo, st.hi - 1, net.n_items, table_bytes(st.hi - st.lo, net.cfg.dim), full)
    return True


def unshard(net: RecMetaNet, dist: DistributedContext) -> None:
    """Gather the shards back into full ``emb_in`` / ``emb_out`` parameters on every rank."""
    st = net._modules.pop("sharded_tables", None)
    if st is None:
        return
    emb_in, emb_out = st.full_tables()
    net.emb_in = nn.Parameter(emb_in)
    net.emb_out = nn.Parameter(emb_out)
    dist.sharded = set()


def fit(net: RecMetaNet, prep, cfg: Config, user_feats, dist: DistributedContext,
        progress: bool | None = None) -> dict:
    """Train ``net`` in place on this rank (see the module docstring): the inputs are
    checked to be the same on every rank, the item tables sharded by the options, then
    :func:`recmeta_sdk.training.loop.fit` with ``dist``, then the tables gathered back.
    Returns the history (``loss``: the global batches' mean loss per epoch), with
    ``distributed``: ``{"world_size", "backend", "sharded", "collective_seconds"}``."""
    from . import loop

    dist.where = "setup"
    dist.check_same_inputs(prep, cfg, net.n_user_rows)
    sharded = shard(net, dist)
    try:
        hist = loop.fit(net, prep, cfg, user_feats, progress=progress, tune=True, dist=_Stepper(dist))
    finally:
        dist.where = "the end of training"
    unshard(net, dist)
    hist["distributed"] = {"world_size": dist.world_size, "backend": dist.backend, "sharded": sharded,
                           "collective_seconds": dist.collective_seconds}
    return hist


class _Stepper:
    """``dist`` as :func:`recmeta_sdk.training.loop.fit` uses it: the context, counting steps
    for the error messages."""

    def __init__(self, dist: DistributedContext):
        self._d, self._step = dist, 0

    def __getattr__(self, name):
        return getattr(self._d, name)

    def train_step(self, *args, **kwargs) -> float:
        self._step += 1
        self._d.where = f"training step {self._step}"
        return self._d.train_step(*args, **kwargs)


def read_parquet(source: Any, dist: DistributedContext, columns: dict | None = None,
                 extra_items: Any = None) -> tuple:
    """Read a Parquet log with each rank decoding only its share of the row groups.

    Rank ``r`` reads the ``r``-th contiguous run of row groups (balanced by rows:
    :func:`recmeta_sdk.data.parquet_parts`) by record batches
    (:func:`recmeta_sdk.data.scan_parquet`). The id maps are agreed first: each rank reads
    its share's id columns, the distinct user and item ids are all-gathered and every rank
    builds the same sorted maps. Then each rank encodes its share (dense ids, float32 rewards,
    timestamps) and the compact arrays are all-gathered in rank order: every rank holds the
    log's arrays in the row order of a whole read (the trained model keeps every user's
    history, so each rank needs them at the end), never a DataFrame and never another rank's
    Parquet pages.

    Returns ``(LogArrays of the whole log, (rows this rank read, row groups it read))``; the
    arrays are equal to :func:`recmeta_sdk.data.scan_parquet` of the whole source.
    """
    from ..data import LogArrays, scan_parquet

    def merge(users: np.ndarray, items: np.ndarray) -> tuple:
        out: list = [None] * dist.world_size
        dist.where = "agreeing on the id maps"
        dist._run("all_gather_object", lambda: tdist.all_gather_object(out, (users, items)))
        import pandas as pd

        return (np.asarray(pd.unique(np.concatenate([o[0] for o in out]))),
                np.asarray(pd.unique(np.concatenate([o[1] for o in out]))))

    local = scan_parquet(source, columns=columns, rank=dist.rank, world_size=dist.world_size,
                         extra_items=extra_items, merge_ids=merge)
    dist.where = "gathering the log's arrays"
    counts = [int(c) for c in dist.all_gather_rows(torch.tensor([len(local)], dtype=torch.int64),
                                                   [1] * dist.world_size)]
    # a timestamp column read as float64 on some rank (integers with nulls) is float64 on all
    ts_float = float(dist.all_reduce_sum(torch.tensor([float(local.timestamps is not None and
                                                               local.timestamps.dtype == np.float64)]))[0]) > 0

    def gather(a, as_float: bool = False):
        if a is None:
            return None
        if as_float:
            a = a.astype(np.float64)
        return dist.all_gather_rows(torch.from_numpy(np.ascontiguousarray(a)), counts).numpy()

    whole = LogArrays(gather(local.users), gather(local.items), local.user_map, local.item_map,
                      gather(local.timestamps, ts_float), gather(local.rewards), gather(local.propensities),
                      columns=local.columns, row_start=0, total_rows=local.total_rows, parts=local.parts)
    mine = (len(local), local.parts)
    del local
    if len(whole) != whole.total_rows:
        raise ValueError(f"distributed Parquet read: {len(whole)} rows gathered, the files' metadata says "
                         f"{whole.total_rows}")
    logger.info("rank %d: read %d of %d interactions (%d row groups) from Parquet", dist.rank, mine[0],
                len(whole), mine[1])
    return whole, mine


def save(model: Any, path: str | os.PathLike) -> None:
    """Write ``model`` (a :class:`~recmeta_sdk.Recommender`) to ``path`` on rank 0 only,
    atomically (:meth:`Recommender.save`), then wait until every rank is there, so that each
    can load the file. Without an initialised process group of more than one rank it is
    ``model.save(path)``. A rank that fails or dies before the barrier raises
    :class:`DistributedTrainingError` on the others."""
    if not (tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1):
        model.save(path)
        return
    ctx = DistributedContext(DistributedConfig())
    ctx.where = f"saving {os.fspath(path)!r}"
    if ctx.rank == 0:
        model.save(path)
    ctx.barrier()
