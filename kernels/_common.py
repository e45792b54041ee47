"""Torch-side pieces shared by the Triton and the CUDA GPU paths (no Triton import).

* the packed (score, id) keys that the fused policy kernels write per split, and the
  second stage that merges them (``torch.topk`` over a small (B, splits * KB) buffer,
  never the (B, N) score matrix) with the per-split online log-sum-exp;
* the host-side preparation of masks (sorted ``row * N + id`` keys) and of the
  deterministic backward (rows sorted, one segment per unique row);
* the seed key of the counter-based Gumbel hash (identical to
  :func:`recmeta_sdk.ops.reference.hash_uniform`).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

__all__ = [
    "KEY_SENTINEL",
    "mix32",
    "seed_key",
    "item_hi_mix",
    "sorted_pair_keys",
    "merge_topk",
    "merge_lse",
    "gather_scores",
    "bag_of_positions",
    "backward_segments",
]

_M32 = 0xFFFFFFFF
#: Key of an ineligible slot: below every packed (score, id) key.
KEY_SENTINEL = -(1 << 63)


def mix32(x: int) -> int:
    """lowbias32 on one Python int (the same finaliser as ``reference._mix32``)."""
    x &= _M32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _M32
    x ^= x >> 16
    return x


def seed_key(seed: int) -> int:
    """``mix32(seed_lo ^ mix32(seed_hi + 0x9E3779B9))`` with the seed taken modulo 2**64."""
    s = int(seed) & 0xFFFFFFFFFFFFFFFF
    return mix32((s & _M32) ^ mix32((s >> 32) + 0x9E3779B9))


def item_hi_mix() -> int:
    """``mix32(item_hi + 0xC2B2AE35)`` for item ids below 2**32 (item_hi == 0)."""
    return mix32(0xC2B2AE35)


def sorted_pair_keys(pair, num_items: int, device) -> Optional[torch.Tensor]:
    """Sorted int64 keys ``row * N + id`` of a CSR ``(offsets, ids)`` pair (None if absent
    or empty). The kernels binary-search them per (user, item tile)."""
    if pair is None:
        return None
    off, ids = pair
    if ids.numel() == 0:
        return torch.empty(0, dtype=torch.int64, device=device)
    off = off.to(device=device, dtype=torch.int64)
    counts = off[1:] - off[:-1]
    rows = torch.repeat_interleave(torch.arange(counts.numel(), device=device), counts,
                                   output_size=ids.numel())
    keys = rows * int(num_items) + ids.to(device=device, dtype=torch.int64)
    return torch.sort(keys).values.contiguous()


def decode_keys(keys: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(ids int64 with -1 for the sentinel, values float32 with -inf) of packed keys.

    A key is ``ordered(score) << 32 | (2**32 - 1 - id)`` where ``ordered`` maps the
    float32 bits to an int32 of the same order, so larger keys are better scores and, on
    equal scores, smaller ids.
    """
    valid = keys != KEY_SENTINEL
    low = keys & _M32
    ids = torch.where(valid, _M32 - low, torch.full_like(keys, -1))
    ordered = (keys >> 32).to(torch.int32)
    bits = ordered ^ ((ordered >> 31) & 0x7FFFFFFF)
    vals = bits.view(torch.float32)
    vals = torch.where(valid, vals, torch.full_like(vals, float("-inf")))
    return ids, vals


def merge_topk(keys: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Stage 2: the top k of the (B, splits, KB) per-split keys → (ids (B, k), values (B, k))."""
    B = keys.shape[0]
    flat = keys.reshape(B, keys.shape[1] * keys.shape[2])  # (not -1: ambiguous for B = 0)
    if k == 0:
        return (torch.empty(B, 0, dtype=torch.int64, device=keys.device),
                torch.empty(B, 0, dtype=torch.float32, device=keys.device))
    top = torch.topk(flat, k, dim=1, sorted=True).values
    return decode_keys(top)


def merge_lse(m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Stage 2 of the online log-sum-exp: splits' (max, sum exp(x - max)) → (B,) logsumexp.

    NaN for a user where a split's sum or max is NaN or a max is +inf (the kernels mark a
    user that read a non-finite score with a NaN sum): never -inf, which means "no eligible
    item" and which the callers' screens accept."""
    big = m.max(dim=1).values
    finite = torch.isfinite(big)
    safe = torch.where(finite, big, torch.zeros_like(big))
    w = torch.where(torch.isfinite(m), s * torch.exp(m - safe[:, None]), torch.zeros_like(s))
    total = w.sum(dim=1)
    out = torch.where(finite & (total > 0), safe + torch.log(total), torch.full_like(big, float("-inf")))
    bad = (torch.isnan(s) | torch.isnan(m) | (m == float("inf"))).any(dim=1)
    return out.masked_fill(bad, float("nan")).to(torch.float32)


def gather_scores(user_states, items, ids, bias, temperature: float) -> torch.Tensor:
    """Policy scores ``(u . item + b) / T`` of the given (B, k) ids (-inf where id < 0)."""
    from recmeta_sdk.ops.reference import dequantize

    B, k = ids.shape
    valid = ids >= 0
    safe = ids.clamp(min=0).reshape(-1)
    rows = dequantize(items, safe)
    rows = rows.reshape(B, k, rows.shape[-1])  # (not -1: ambiguous when B * k = 0)
    s = torch.einsum("bd,bkd->bk", user_states.to(torch.float32), rows)
    if bias is not None:
        s = s + bias.to(torch.float32)[safe].reshape(B, k)
    s = s / float(temperature)
    return s.masked_fill(~valid, float("-inf"))


def bag_of_positions(offsets: torch.Tensor, nnz: int) -> torch.Tensor:
    """(nnz,) int64: the bag of each position of the indices (CSR offsets → bag ids)."""
    off = offsets.to(torch.int64)
    counts = off[1:] - off[:-1]
    return torch.repeat_interleave(torch.arange(counts.numel(), device=offsets.device), counts,
                                   output_size=nnz)


def backward_segments(indices: torch.Tensor):
    """Deterministic-backward plan: positions sorted by row (stable, so each row's
    occurrences stay in input order), the unique rows and their segment starts.

    Returns (sorted_pos (nnz,), uniq (U,), seg (U+1,)), all int64 on the indices' device.
    """
    idx = indices.to(torch.int64)
    sorted_rows, sorted_pos = torch.sort(idx, stable=True)
    uniq, counts = torch.unique_consecutive(sorted_rows, return_counts=True)
    seg = torch.zeros(uniq.numel() + 1, dtype=torch.int64, device=idx.device)
    seg[1:] = torch.cumsum(counts, 0)
    return sorted_pos.contiguous(), uniq.contiguous(), seg


def check_item_count(num_items: int) -> None:
    """The packed keys hold 32-bit item ids."""
    if num_items >= (1 << 31):
        raise ValueError(f"GPU policy kernels take at most 2**31 - 1 items, got N={num_items}")


