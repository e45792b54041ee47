"""The policy-scoring operations (top-k and Gumbel-top-k sampling): validation, dispatch.

Backends: ``"cpp"`` (the fused streaming kernel of the compiled core, default for CPU data)
and ``"torch"`` (:mod:`recmeta_sdk.ops.reference`). The C++ kernel is also registered as the torch
custom ops ``recmeta::policy_topk`` and ``recmeta::policy_sample`` (with fake implementations,
so they trace under ``torch.compile``; no autograd formula: they serve ids and scores). The
public functions call the same implementation directly, without the dispatcher's overhead.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Tuple

import torch

from . import _native
from . import backends
from . import reference
from ._common import _U64, _check_bias_finite, as_seed, check_policy_args, table_dtype, to_kind
from .reference import QuantizedTable

if TYPE_CHECKING:  # names used in annotations only
    import numpy as np

__all__ = ["policy_topk", "policy_sample"]

def _prepare(user_states, items, k, bias, exclude, candidates, temperature):
    """Convert and check the arguments (:func:`recmeta_sdk.ops._common.check_policy_args`, the
    GPU launchers' checks too). The finiteness of ``bias`` is checked by the caller for the
    torch / GPU backends (:func:`_check_bias_finite`); the compiled core screens the bias (and
    an int8 table's row_scale / row_min) itself while it reads them and raises a ValueError
    naming the first bad value before returning any output, so the cpp backend skips the
    separate scan (it cost ~1.4 ms per call at N = 1M)."""
    return check_policy_args(user_states, items, k, bias, exclude, candidates, temperature)


# ---------------------------------------------------------------------------------------
# torch custom ops over the compiled core
# ---------------------------------------------------------------------------------------
def _np(t: Optional[torch.Tensor]):
    """Zero-copy numpy view of a CPU tensor (None stays None)."""
    return None if t is None else t.detach().contiguous().numpy()


def _core_kwargs(row_scale, row_min, bias, exclude_offsets, exclude_ids, candidate_offsets,
                 candidate_ids, temperature):
    return dict(row_scale=_np(row_scale), row_min=_np(row_min), bias=_np(bias),
                exclude_offsets=_np(exclude_offsets), exclude_ids=_np(exclude_ids),
                candidate_offsets=_np(candidate_offsets), candidate_ids=_np(candidate_ids),
                temperature=float(temperature))


def _topk_cpp(user_states, items, k, row_scale, row_min, bias, exclude_offsets, exclude_ids,
              candidate_offsets, candidate_ids, temperature):
    ids, scores, lognorm = _native.core().policy_topk(
        _np(user_states), _np(items), int(k),
        **_core_kwargs(row_scale, row_min, bias, exclude_offsets, exclude_ids, candidate_offsets,
                       candidate_ids, temperature))
    return torch.from_numpy(ids), torch.from_numpy(scores), torch.from_numpy(lognorm)


def _sample_cpp(user_states, items, k, seed, row_scale, row_min, bias, exclude_offsets, exclude_ids,
                candidate_offsets, candidate_ids, temperature):
    ids, scores, _, logtail = _native.core().policy_sample(
        _np(user_states), _np(items), int(k), int(seed) & _U64,
        **_core_kwargs(row_scale, row_min, bias, exclude_offsets, exclude_ids, candidate_offsets,
                       candidate_ids, temperature))
    ids_t, sc_t = torch.from_numpy(ids), torch.from_numpy(scores)
    prop, slate = reference.slate_probabilities(sc_t, ids_t >= 0, torch.from_numpy(logtail))
    return ids_t, sc_t, prop, slate


@torch.library.custom_op("recmeta::policy_topk", mutates_args=())
def _policy_topk_op(user_states: torch.Tensor, items: torch.Tensor, k: int,
                    row_scale: Optional[torch.Tensor], row_min: Optional[torch.Tensor],
                    bias: Optional[torch.Tensor], exclude_offsets: Optional[torch.Tensor],
                    exclude_ids: Optional[torch.Tensor], candidate_offsets: Optional[torch.Tensor],
                    candidate_ids: Optional[torch.Tensor], temperature: float
                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused top-k (compiled core); ``items`` holds float32, float16 or uint8 codes."""
    return _topk_cpp(user_states, items, k, row_scale, row_min, bias, exclude_offsets, exclude_ids,
                     candidate_offsets, candidate_ids, temperature)


@_policy_topk_op.register_fake
def _(user_states, items, k, row_scale, row_min, bias, exclude_offsets, exclude_ids,
      candidate_offsets, candidate_ids, temperature):
    B, k = user_states.shape[0], min(k, items.shape[0])
    return (user_states.new_empty((B, k), dtype=torch.int64),
            user_states.new_empty((B, k), dtype=torch.float32),
            user_states.new_empty((B,), dtype=torch.float32))


@torch.library.custom_op("recmeta::policy_sample", mutates_args=())
def _policy_sample_op(user_states: torch.Tensor, items: torch.Tensor, k: int, seed: int,
                      row_scale: Optional[torch.Tensor], row_min: Optional[torch.Tensor],
                      bias: Optional[torch.Tensor], exclude_offsets: Optional[torch.Tensor],
                      exclude_ids: Optional[torch.Tensor], candidate_offsets: Optional[torch.Tensor],
                      candidate_ids: Optional[torch.Tensor], temperature: float
                      ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused Gumbel-top-k sample (compiled core); ``seed`` is the signed view of seed mod 2**64."""
    return _sample_cpp(user_states, items, k, seed, row_scale, row_min, bias, exclude_offsets,
                       exclude_ids, candidate_offsets, candidate_ids, temperature)


@_policy_sample_op.register_fake
def _(user_states, items, k, seed, row_scale, row_min, bias, exclude_offsets, exclude_ids,
      candidate_offsets, candidate_ids, temperature):
    B, k = user_states.shape[0], min(k, items.shape[0])
    return (user_states.new_empty((B, k), dtype=torch.int64),
            user_states.new_empty((B, k), dtype=torch.float32),
            user_states.new_empty((B, k), dtype=torch.float32),
            user_states.new_empty((B,), dtype=torch.float32))


def _table_parts(tab):
    if isinstance(tab, QuantizedTable):
        data = torch.as_tensor(tab.data)
        if tab.dtype == "int8":
            return data, torch.as_tensor(tab.row_scale), torch.as_tensor(tab.row_min)
        return data, None, None
    return tab, None, None


def _op_args(u, tab, b, exc, cand):
    data, scale, rmin = _table_parts(tab)
    eo, ei = exc if exc is not None else (None, None)
    co, ci = cand if cand is not None else (None, None)
    return data, scale, rmin, b, eo, ei, co, ci


# ---------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------
_SEMANTICS = """
    Semantics shared by :func:`policy_topk` and :func:`policy_sample` (every backend):

    * ``k``: an integer (``int`` or a numpy integer; a bool or a float is a TypeError),
      ``>= 0``. The results have ``min(k, N)`` columns: ``k`` above the catalogue is capped
      at N (no more memory than the catalogue), and slots beyond the eligible items are
      padding (id -1, score -inf, propensity 0). An empty table (N = 0) gives (B, 0) results
      and a log-normaliser of -inf.
    * Order: best first; among equal scores (sampling: equal perturbed scores) the smaller
      id comes first.
    * ``bias``: -inf masks an item (never returned, zero probability, no mass in the
      log-normaliser); NaN and +inf raise ValueError naming the position.
    * NaN / inf values: in ``user_states`` a ValueError naming the position; in an item row
      that the op reads (every row; with ``candidates``, the eligible ones) a ValueError
      naming the row. Finite inputs whose score overflows float32 (``|s| > 3.4e38``) raise a
      ValueError naming the item row: no result holds an inf or NaN score.
"""


def policy_topk(user_states: np.ndarray | torch.Tensor, items: np.ndarray | torch.Tensor | QuantizedTable,
                k: int, *,
                bias: np.ndarray | torch.Tensor | None = None,
                exclude: tuple[np.ndarray | torch.Tensor, np.ndarray | torch.Tensor] | None = None,
                candidates: tuple[np.ndarray | torch.Tensor, np.ndarray | torch.Tensor] | None = None,
                temperature: float = 1.0, backend: Optional[str] = None,
                ) -> tuple[np.ndarray | torch.Tensor, np.ndarray | torch.Tensor, np.ndarray | torch.Tensor]:
    """Top-k items of the softmax policy ``s = (U @ I.T + b) / temperature`` and its log-normaliser.

    Returns ``(ids (B, min(k, N)) int64, scores (B, min(k, N)) float32, log_normalizer (B,)
    float32)``, best first, ties broken by the smaller id.
    See :func:`recmeta_sdk.ops.reference.policy_topk` for the exact semantics.
    """
    u, tab, b, exc, cand, kind, k = _prepare(user_states, items, k, bias, exclude, candidates, temperature)
    be = backends.select("policy_topk", u.device.type, table_dtype(tab), backend)
    if be != "cpp":
        _check_bias_finite(b)
    if be in ("triton", "cuda"):
        from ._gpu import gpu_policy_topk

        return gpu_policy_topk(u, tab, k, b, exc, cand, float(temperature), backend=be)
    if be == "cpp":
        data, scale, rmin, b_, eo, ei, co, ci = _op_args(u, tab, b, exc, cand)
        # The public function calls the core directly: the custom op adds dispatcher overhead
        # (and imports torch._dynamo on its first call); it is there for torch.compile users.
        out = _topk_cpp(u, data, k, scale, rmin, b_, eo, ei, co, ci, float(temperature))
    else:
        out = reference.policy_topk(u, tab, k, b, exc, cand, float(temperature))
    return to_kind(kind, *out)


def policy_sample(user_states: np.ndarray | torch.Tensor, items: np.ndarray | torch.Tensor | QuantizedTable,
                  k: int, *, seed: int,
                  bias: np.ndarray | torch.Tensor | None = None,
                  exclude: tuple[np.ndarray | torch.Tensor, np.ndarray | torch.Tensor] | None = None,
                  candidates: tuple[np.ndarray | torch.Tensor, np.ndarray | torch.Tensor] | None = None,
                  temperature: float = 1.0, backend: Optional[str] = None,
                  ) -> tuple[np.ndarray | torch.Tensor, np.ndarray | torch.Tensor, np.ndarray | torch.Tensor,
                             np.ndarray | torch.Tensor]:
    """Draw k distinct items per user from the policy (Gumbel-top-k) with their propensities.

    Returns ``(ids, scores, propensities, slate_log_prob)`` with ``min(k, N)`` columns;
    ``slate_log_prob`` (B,) is the Plackett-Luce log-probability of the slate, computed in
    float64 from the mass outside the slate (exact also when the slate holds nearly all of
    it). ``seed``: an integer in [0, 2**64) (TypeError / ValueError otherwise).
    See :func:`recmeta_sdk.ops.reference.policy_sample` for the exact semantics.
    """
    seed = as_seed(seed)
    u, tab, b, exc, cand, kind, k = _prepare(user_states, items, k, bias, exclude, candidates, temperature)
    be = backends.select("policy_sample", u.device.type, table_dtype(tab), backend)
    if be != "cpp":
        _check_bias_finite(b)
    if be in ("triton", "cuda"):
        from ._gpu import gpu_policy_sample

        return gpu_policy_sample(u, tab, k, seed, b, exc, cand, float(temperature), backend=be)
    if be == "cpp":
        data, scale, rmin, b_, eo, ei, co, ci = _op_args(u, tab, b, exc, cand)
        out = _sample_cpp(u, data, k, seed, scale, rmin, b_, eo, ei, co, ci, float(temperature))
    else:
        out = reference.policy_sample(u, tab, k, seed, b, exc, cand, float(temperature))
    return to_kind(kind, *out)


policy_topk.__doc__ += _SEMANTICS
policy_sample.__doc__ += _SEMANTICS
