"""Python mirrors of the softmax Triton kernels' loop bounds (`_kv_bounds`, `_q_bounds` in
attnkernels/softmax/triton_kernels.py), and a probe that runs the jitted helpers, so tests
can check both against brute force. Test-only: nothing in the package imports this."""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from attnkernels.softmax.triton_kernels import _kv_bounds, _q_bounds
from attnkernels.triton_common import cdiv as _cdiv


class BlockRange(NamedTuple):
    """Blocks [start, end) are visited; [full_start, full_end) need no element mask."""

    start: int
    full_start: int
    full_end: int
    end: int

    @property
    def count(self) -> int:
        return self.end - self.start


def kv_block_range(q_block: int, block_m: int, block_n: int, q_len: int, kv_len: int,
                   window_left: int, window_right: int) -> BlockRange:
    """Key blocks visited by query block `q_block` in the forward and dQ kernels (`_kv_bounds`)."""
    off = kv_len - q_len
    m0 = q_block * block_m
    m_last = min(m0 + block_m, q_len) - 1
    if window_left >= 0:
        lo = max(m0 + off - window_left, 0)
        full_lo = _cdiv(max(m_last + off - window_left, 0), block_n)
    else:
        lo, full_lo = 0, 0
    if window_right >= 0:
        hi = min(m_last + off + window_right + 1, kv_len)
        full_hi = min(max(m0 + off + window_right + 1, 0) // block_n, kv_len // block_n)
    else:
        hi, full_hi = kv_len, kv_len // block_n
    start = lo // block_n
    end = _cdiv(hi, block_n) if hi > lo else start
    full_lo = min(max(full_lo, start), end)
    full_hi = min(max(full_hi, full_lo), end)
    return BlockRange(start, full_lo, full_hi, end)


def q_block_range(k_block: int, block_m: int, block_n: int, q_len: int, kv_len: int,
                  window_left: int, window_right: int) -> BlockRange:
    """Query blocks visited by key block `k_block` in the dK/dV kernel (`_q_bounds`)."""
    off = kv_len - q_len
    n0 = k_block * block_n
    n_last = min(n0 + block_n, kv_len) - 1
    if window_right >= 0:
        lo = max(n0 - off - window_right, 0)
        full_lo = _cdiv(max(n_last - off - window_right, 0), block_m)
    else:
        lo, full_lo = 0, 0
    if window_left >= 0:
        hi = min(n_last - off + window_left + 1, q_len)
        x = n0 - off + window_left
        full_hi = q_len if q_len - 1 <= x else max(x + 1, 0) // block_m
    else:
        hi, full_hi = q_len, _cdiv(q_len, block_m)
    start = lo // block_m
    end = _cdiv(hi, block_m) if hi > lo else start
    full_lo = min(max(full_lo, start), end)
    full_hi = min(max(full_hi, full_lo), end)
    return BlockRange(start, full_lo, full_hi, end)


@triton.jit
def _bounds_probe(OUT, Nq, Nk, window_left, window_right,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, KV: tl.constexpr):
    """Test hook: writes what the kernels' bound helpers compute for block program_id(0)."""
    i = tl.program_id(0)
    if KV:
        a, b, c, d = _kv_bounds(i * BLOCK_M, Nq, Nk, window_left, window_right, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    else:
        a, b, c, d = _q_bounds(i * BLOCK_N, Nq, Nk, window_left, window_right, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    tl.store(OUT + i * 4 + 0, a)
    tl.store(OUT + i * 4 + 1, b)
    tl.store(OUT + i * 4 + 2, c)
    tl.store(OUT + i * 4 + 3, d)


def kernel_block_ranges(kind: str, block_m: int, block_n: int, q_len: int, kv_len: int,
                        window_left: int, window_right: int, device="cpu") -> list[BlockRange]:
    """The bounds the jitted helpers compute, one per query block (kind="kv") or key block
    (kind="q"), so tests can compare them with the Python mirrors."""
    n_blocks = _cdiv(q_len, block_m) if kind == "kv" else _cdiv(kv_len, block_n)
    out = torch.zeros(n_blocks, 4, dtype=torch.int32, device=device)
    if n_blocks:
        _bounds_probe[(n_blocks,)](out, q_len, kv_len, window_left, window_right,
                                   BLOCK_M=block_m, BLOCK_N=block_n,
                                   HAS_LEFT=window_left >= 0, HAS_RIGHT=window_right >= 0, KV=kind == "kv")
    return [BlockRange(*map(int, row)) for row in out.tolist()]
