"""The policy-scoring operations (top-k and Gumbel-top-k sampling): validation, dispatch.

(Initial version: torch backend only; the C++ backend is added by the compiled-core work.)
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from . import backends, reference
from ._ops_common import as_table, as_tensor, check_csr, check_float, to_kind

__all__ = ["policy_topk", "policy_sample"]


def _prepare(user_states, items, k, bias, exclude, candidates, temperature):
    u, kind = as_tensor(user_states, "user_states")
    tab, _ = as_table(items, "items")
    N, d = tab.shape
    if u.dtype != torch.float32:
        raise TypeError(f"user_states: expected float32, got {u.dtype}")
    check_float(u, "user_states", (None, d))
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"k must be a non-negative int, got {k!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    b = None
    if bias is not None:
        b, _ = as_tensor(bias, "bias")
        check_float(b, "bias", (N,))
    B = u.shape[0]
    exc = check_csr(exclude, "exclude", B, N)
    cand = check_csr(candidates, "candidates", B, N)
    return u, tab, b, exc, cand, kind


def policy_topk(user_states, items, k, *, bias=None, exclude=None, candidates=None,
                temperature: float = 1.0, backend: Optional[str] = None):
    """Top-k items of the softmax policy ``s = (U @ I.T + b) / temperature`` and its log-normaliser.

    Returns ``(ids (B, k) int64, scores (B, k) float32, log_normalizer (B,) float32)``.
    See :func:`recmeta_sdk.reference.policy_topk` for the exact semantics.
    """
    u, tab, b, exc, cand, kind = _prepare(user_states, items, k, bias, exclude, candidates, temperature)
    backends.resolve(backend, u.device.type)
    out = reference.policy_topk(u, tab, k, b, exc, cand, float(temperature))
    return to_kind(kind, *out)


def policy_sample(user_states, items, k, *, seed, bias=None, exclude=None, candidates=None,
                  temperature: float = 1.0, backend: Optional[str] = None):
    """Draw k distinct items per user from the policy (Gumbel-top-k) with their propensities.

    Returns ``(ids, scores, propensities, slate_log_prob)``.
    See :func:`recmeta_sdk.reference.policy_sample` for the exact semantics.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    u, tab, b, exc, cand, kind = _prepare(user_states, items, k, bias, exclude, candidates, temperature)
    backends.resolve(backend, u.device.type)
    out = reference.policy_sample(u, tab, k, seed, b, exc, cand, float(temperature))
    return to_kind(kind, *out)
