"""Attention dropout's random numbers: one counter-based function every backend computes.

The keep decision of score (b, h, i, j) of a call is a pure function of the call's seed
and those four indices, so no backend stores a mask: the backward regenerates it, and
the float64 reference builds the same mask to compare exactly.

    words = Philox4x32-10(key = (seed mod 2^32, seed >> 32),
                          counter = (j >> 2, i, b * Hq + h, 0))
    u     = words[j & 3]                          # one uint32 per score
    keep  = u >= floor(dropout_p * 2^32)          # P(keep) = 1 - dropout_p (to 2^-32)

(Random123's Philox4x32 with 10 rounds, the generator of torch's CUDA RNG, curand and
Triton's `tl.philox`; one call yields the words of four neighbouring columns.) Kept
probabilities are scaled by 1 / (1 - dropout_p). The seed is an int64 scalar tensor on
the tensors' device, drawn from a torch generator (`draw_seed`), so a compiled graph
draws a fresh one each step.
"""
from __future__ import annotations

import torch
from torch import Tensor

# Random123's Philox4x32 constants.
ROUND_A = 0xD2511F53
ROUND_B = 0xCD9E8D57
KEY_A = 0x9E3779B9
KEY_B = 0xBB67AE85
ROUNDS = 10
MASK32 = 0xFFFFFFFF


def keep_threshold(dropout_p: float) -> int:
    """The uint32 below which a score is dropped: floor(p · 2^32), at most 2^32 - 1."""
    return min(int(dropout_p * 2.0**32), MASK32)


def _mul_hi_lo(constant: int, x: Tensor) -> tuple[Tensor, Tensor]:
    """(hi, lo) 32-bit words of constant · x for uint32 values held in int64 (split in 16-bit
    halves so that no product exceeds 2^48 and int64 never overflows)."""
    x_hi, x_lo = x >> 16, x & 0xFFFF
    high_part = constant * x_hi  # < 2^48
    low_part = constant * x_lo  # < 2^48
    hi = (high_part + (low_part >> 16)) >> 16
    lo = (((high_part & 0xFFFF) << 16) + low_part) & MASK32
    return hi, lo


def philox4x32(seed: int, c0: Tensor, c1: Tensor, c2: Tensor, c3: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Philox4x32-10 of the counters (uint32 values in int64 tensors, broadcast together)."""
    k0, k1 = seed & MASK32, (seed >> 32) & MASK32
    for _ in range(ROUNDS):
        hi_b, lo_b = _mul_hi_lo(ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + KEY_A) & MASK32, (k1 + KEY_B) & MASK32
    return c0, c1, c2, c3


def keep_mask(seed: int, dropout_p: float, batch: int, heads: int, q_len: int, kv_len: int, device=None) -> Tensor:
    """Bool (B, Hq, Nq, Nk): True where score (b, h, i, j) is kept (the module docstring's rule)."""
    ints = dict(dtype=torch.int64, device=device)
    batch_head = torch.arange(batch * heads, **ints).view(batch, heads, 1, 1)
    rows = torch.arange(q_len, **ints).view(1, 1, q_len, 1)
    cols = torch.arange(kv_len, **ints).view(1, 1, 1, kv_len)
    shape = (batch, heads, q_len, kv_len)
    words = philox4x32(seed, (cols >> 2).expand(shape), rows.expand(shape), batch_head.expand(shape),
                       torch.zeros((), **ints))
    u = torch.stack(words, dim=-1).gather(-1, (cols & 3).expand(shape)[..., None]).squeeze(-1)
    return u >= keep_threshold(dropout_p)


def draw_seed(generator: torch.Generator | None, device) -> Tensor:
    """A fresh int64 seed (a 0-d tensor on `device`) from `generator` (None: torch's default)."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    seed = torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64, generator=generator, device=gen_device)
    return seed.to(device)
