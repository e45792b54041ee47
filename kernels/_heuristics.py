"""Launch-configuration heuristics for the GPU kernels (Triton and CUDA).

Pure Python, no Triton or CUDA import: the same choices serve the Triton launchers, the
CUDA launchers in :mod:`recmeta_sdk.ops._gpu`, and the interpreter tests (which override
them with tiny blocks to straddle block boundaries).
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "next_pow2",
    "cdiv",
    "BagConfig",
    "bag_config",
    "PolicyConfig",
    "policy_config",
    "MAX_TOPK",
    "num_sms",
]

#: Largest k the fused policy kernels keep per split (a power of two: the running
#: top-k is a bitonic (BLOCK_B, KB) tile held in registers). Larger k uses the
#: reference path.
MAX_TOPK = 256


def next_pow2(x: int) -> int:
    """Smallest power of two >= max(x, 1)."""
    x = max(int(x), 1)
    return 1 << (x - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))


def num_sms(device=None) -> int:
    """Streaming multiprocessors of the CUDA device (132 when there is none: an H100-class
    guess that only shapes the split count in interpreter runs)."""
    try:
        import torch

        if torch.cuda.is_available():
            return int(torch.cuda.get_device_properties(device or 0).multi_processor_count)
    except Exception:  # pragma: no cover - defensive: properties of an odd device
        pass
    return 132


@dataclass(frozen=True)
class BagConfig:
    BLOCK_N: int  # indices of one bag loaded per step
    BLOCK_D: int  # embedding columns per program
    num_warps: int


def bag_config(dim: int, avg_bag: float = 16.0) -> BagConfig:
    """Forward / atomic-backward tiles: one program per (bag, column block).

    Wide column blocks keep each row read a long contiguous run (whole 128 B lines for
    fp32 d >= 32); several indices per step give the memory system independent loads.
    """
    block_d = min(next_pow2(dim), 256)
    block_n = 16 if avg_bag >= 8 else 8
    warps = 4 if block_d * block_n >= 2048 else 2
    return BagConfig(block_n, block_d, warps)


@dataclass(frozen=True)
class PolicyConfig:
    BLOCK_B: int  # users per program
    BLOCK_N: int  # items per tile
    BLOCK_D: int  # feature columns per step of the score loop
    KB: int  # per-split top-k width (power of two >= k)
    splits: int  # programs along the items
    items_per_split: int  # items each split covers (multiple of BLOCK_N)
    use_dot: bool  # tensor-core dot (BLOCK_B >= 16) vs broadcast-multiply-reduce
    num_warps: int


def policy_config(B: int, N: int, D: int, k: int, sms: int = 132,
                  block_b: int = 0, block_n: int = 0, block_d: int = 0, splits: int = 0) -> PolicyConfig:
    """Tiles of the two-stage fused policy scoring.

    Small batches (B <= 8) are memory-bound matrix-vector products: a few users per
    program, broadcast-multiply-reduce, and many splits along the items so that every SM
    streams a slice of the table. Larger batches use 16..64-user tiles with ``tl.dot``.
    Explicit ``block_*``/``splits`` override the choice (the tests use tiny ones).
    """
    kb = max(2, next_pow2(k))
    if kb > MAX_TOPK:
        raise ValueError(f"k={k} is above the fused kernels' limit {MAX_TOPK}")
    if block_b <= 0:
        block_b = next_pow2(B) if B <= 8 else (16 if B <= 16 else (32 if B <= 128 else 64))
    if block_n <= 0:
        block_n = 128 if block_b <= 32 else 64
    block_n = max(block_n, kb)
    if block_d <= 0:
        if block_b >= 16:  # tl.dot needs every block dim >= 16
            block_d = max(16, min(next_pow2(D), 64))
        else:  # the (BLOCK_B, BLOCK_N, BLOCK_D) product lives in registers: ~8K elements
            block_d = max(8, min(next_pow2(D), 8192 // (block_b * block_n)))
    if block_b >= 16:  # tl.dot: every block dim >= 16, also for explicit overrides
        block_n, block_d = max(block_n, 16), max(block_d, 16)
    user_blocks = cdiv(max(B, 1), block_b)
    tiles = max(cdiv(N, block_n), 1)
    if splits <= 0:
        splits = max(1, min(tiles, cdiv(4 * sms, user_blocks)))
    splits = max(1, min(splits, tiles))
    per = cdiv(tiles, splits) * block_n
    splits = max(1, cdiv(N, per)) if N > 0 else 1
    warps = 4 if block_b * block_n <= 4096 else 8
    return PolicyConfig(block_b, block_n, block_d, kb, splits, per, block_b >= 16, warps)
