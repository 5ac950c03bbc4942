"""Shared benchmark plumbing: sizes, FLOP formulas, and the interleaved comparison.

Quick mode (default; what CI runs) uses tiny sizes and few rounds so the suite
cannot rot; `ATTNKERNELS_BENCH=full` runs the sizes the issues name.
Each benchmark times our kernel with pytest-benchmark, then runs ours, every
peer and a fixed `torch.mm` interleaved (A B C A B C ...) in the same process,
and stores in `extra_info` the medians of the per-round ratios: speed-up over
each peer, useful GFLOP/s, and that as a fraction of `torch.mm`'s GFLOP/s in
the same rounds (the host throttles, so only same-run ratios mean anything).
"""
from __future__ import annotations

import os
import statistics

import pytest
import torch

from attnkernels.tools.timing import time_interleaved

FULL = os.environ.get("ATTNKERNELS_BENCH", "quick") == "full"
ROUNDS = 7 if FULL else 1

MM_SIZE = 1024  # torch.mm of two (MM_SIZE, MM_SIZE) matrices in the case's dtype: the machine's yardstick
MM_FLOPS = 2 * MM_SIZE**3


# Every benchmark runs in both: fp32 (AVX-512 FMA) and bf16 (AMX through oneDNN for torch's peers).
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def sweep_direction_and_dtype(test):
    """The axes every benchmark sweeps: fwd / fwd+bwd, and each dtype of DTYPES."""
    test = pytest.mark.parametrize("direction", ["fwd", "fwd+bwd"])(test)
    return pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())(test)


def qkv(seq_len: int, heads: int, head_dim: int, dtype, backward: bool) -> list:
    """Seeded q, k, v (1, H, N, D), requiring grad for a forward+backward benchmark."""
    torch.manual_seed(0)
    return [torch.randn(1, heads, seq_len, head_dim, dtype=dtype, requires_grad=backward) for _ in range(3)]


def sizes(full: list, quick: list) -> list:
    return full if FULL else quick


def softmax_attention_flops(batch, heads, q_len, kv_len, head_dim, *, visible_fraction=1.0, backward=False) -> float:
    """Useful FLOPs: forward = 2 matmuls (QKᵀ, PV) × 2 flops/MAC over the visible entries;
    forward+backward = 3.5 × forward (FlashAttention's convention: the backward's
    5 matmuls counted as 2.5 forwards)."""
    forward = 4.0 * batch * heads * q_len * kv_len * head_dim * visible_fraction
    return forward * (3.5 if backward else 1.0)


def timed_call(fn, inputs, backward: bool):
    """A no-argument callable running fn(*inputs): forward only (no autograd graph), or forward and
    backward with a fixed upstream gradient. Returns the output."""
    if not backward:
        def forward():
            with torch.no_grad():
                return fn(*inputs)
        return forward

    def forward_backward():
        for t in inputs:
            t.grad = None
        out = fn(*inputs)
        out.backward(torch.ones_like(out))
        return out
    return forward_backward


def compare(benchmark, ours, peers: dict, flops: float, *, dtype=torch.float32, rounds: int | None = None) -> dict:
    """Time `ours` with pytest-benchmark, then interleave ours/peers/mm (in `dtype`) and record the ratios."""
    rounds = rounds or ROUNDS
    benchmark.pedantic(ours, rounds=rounds, iterations=1, warmup_rounds=1)
    a = torch.randn(MM_SIZE, MM_SIZE, dtype=dtype)
    b = torch.randn(MM_SIZE, MM_SIZE, dtype=dtype)
    fns = [ours, *peers.values(), lambda: torch.mm(a, b)]
    samples = time_interleaved(fns, rounds=rounds, warmup=0)
    ours_t, mm_t = samples[0], samples[-1]
    info = {
        "ours_ms": statistics.median(ours_t) * 1e3,
        "gflops": flops / statistics.median(ours_t) / 1e9,
        "fraction_of_mm": statistics.median((flops / o) / (MM_FLOPS / m) for o, m in zip(ours_t, mm_t)),
    }
    for (name, _), peer_t in zip(peers.items(), samples[1:-1]):
        info[f"{name}_ms"] = statistics.median(peer_t) * 1e3
        info[f"speedup_vs_{name}"] = statistics.median(p / o for p, o in zip(peer_t, ours_t))
    benchmark.extra_info.update(info)
    return info
