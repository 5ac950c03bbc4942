"""Attention dropout's random numbers: one counter-based function every backend computes.

The keep decision of score (b, h, i, j) of a call is a pure function of the call's seed
and those four indices, so no backend stores a mask: the backward regenerates it, and
the float64 reference builds the same mask to compare exactly.

    words = Philox4x32-10(key = (seed mod 2^32, seed >> 32),
                          counter = (j >> 4, i, b * Hq + h, 0))
    byte  = (words[(j >> 2) & 3] >> (8 * (j & 3))) & 0xFF   # one byte per score
    t     = min(round(dropout_p * 256), 255)                  # the 8-bit threshold
    keep  = byte >= t                                         # P(keep) = 1 - t / 256 exactly

(Random123's Philox4x32 with 10 rounds, the generator of torch's CUDA RNG, curand and
Triton's `tl.philox`.) One call yields 16 bytes, the bytes of 16 neighbouring keys in
order (read as little-endian memory, the four words are keys 16c .. 16c + 15), so the
generator costs a quarter of what one 32-bit word per score did (issue 15: bf16 dropout
was Philox-bound). The price is resolution: dropout_p is rounded to a multiple of 1/256,
as FlashAttention's uint8 threshold. Kept probabilities are scaled by 1 / (1 - t / 256)
(`keep_scale`), the rounded rate's, so E[out] is exactly the undropped output.

`effective_rate(p)` = t / 256 is the rate a call applies. p = 0 means no dropout (the
plain kernels). A p > 0 that rounds to t = 0 (p < 1/512) raises a ValueError naming
dropout_p rather than silently dropping nothing (and rather than silently dropping at
1/256, several times the rate asked for).

The seed is an int64 scalar tensor on the tensors' device, drawn from a torch generator
(`draw_seed`), so a compiled graph draws a fresh one each step.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

# Random123's Philox4x32 constants.
ROUND_A = 0xD2511F53
ROUND_B = 0xCD9E8D57
KEY_A = 0x9E3779B9
KEY_B = 0xBB67AE85
ROUNDS = 10
MASK32 = 0xFFFFFFFF


RESOLUTION = 256  # the threshold is a byte: dropout_p is rounded to a multiple of 1/256


def keep_threshold(dropout_p: float) -> int:
    """The byte t below which a score is dropped: min(round(p · 256), 255), for p in (0, 1).

    Raises ValueError for p outside [0, 1) and for 0 < p < 1/512 (t would be 0: no dropout);
    p = 0 gives 0 (keep everything)."""
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p: expected a float in [0, 1), got {dropout_p}")
    # floor(x + 0.5): round half up (Python's round() is half-to-even; C++ and the launcher
    # use the same floor so every backend agrees on the ties p = (2k + 1) / 512)
    t = min(math.floor(dropout_p * RESOLUTION + 0.5), RESOLUTION - 1)
    if dropout_p > 0 and t == 0:
        raise ValueError(f"dropout_p: {dropout_p} rounds to 0 at the kernels' 1/256 resolution (the keep "
                         "threshold is one byte per score); use dropout_p = 0 for no dropout or >= 1/512")
    return t


def effective_rate(dropout_p: float) -> float:
    """The dropout rate a call with `dropout_p` applies: keep_threshold(p) / 256."""
    return keep_threshold(dropout_p) / RESOLUTION


def keep_scale(dropout_p: float) -> float:
    """The factor of the kept probabilities: 1 / (1 - effective_rate(p)) (1 for p = 0)."""
    return RESOLUTION / (RESOLUTION - keep_threshold(dropout_p))


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
    words = philox4x32(seed, (cols >> 4).expand(shape), rows.expand(shape), batch_head.expand(shape),
                       torch.zeros((), **ints))
    word = torch.stack(words, dim=-1).gather(-1, ((cols >> 2) & 3).expand(shape)[..., None]).squeeze(-1)
    byte = (word >> (8 * (cols & 3))) & 0xFF
    return byte >= keep_threshold(dropout_p)


def draw_seed(generator: torch.Generator | None, device) -> Tensor:
    """A fresh int64 seed (a 0-d tensor on `device`) from `generator` (None: torch's default)."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    seed = torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64, generator=generator, device=gen_device)
    return seed.to(device)
