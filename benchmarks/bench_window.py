"""Sliding-window attention on CPU (fp32) vs FlexAttention, masked SDPA and local-attention.

Full: B=1, H=8, D=64, N in {1024, 4096, 16384}, window (256, 256) and causal (256, 0).
Targets (issue 3) at N=4096: forward >= 2x FlexAttention; forward+backward >= 10x
masked SDPA; time at N=16384 <= 4.5x time at N=4096 (linear growth).
Masked SDPA is skipped at N=16384 (its 8×N×N float scores alone take 8.6 GB).
"""
import pytest
import torch

import attnkernels
from attnkernels.conventions import window_visibility

from . import peers
from .common import compare, qkv, sizes, softmax_attention_flops, sweep_direction_and_dtype, timed_call

SEQ_LENS = sizes(full=[1024, 4096, 16384], quick=[320])
HEADS, HEAD_DIM, WINDOW = 8, 64, 256
MASKED_SDPA_MAX_N = 4096


@pytest.mark.parametrize("causal", [False, True], ids=["w256_256", "causal-w256"])
@pytest.mark.parametrize("seq_len", SEQ_LENS, ids=lambda n: f"N{n}")
@sweep_direction_and_dtype
def test_window(benchmark, direction, seq_len, causal, dtype):
    backward = direction == "fwd+bwd"
    window = (WINDOW, 0) if causal else (WINDOW, WINDOW)
    q, k, v = qkv(seq_len, HEADS, HEAD_DIM, dtype, backward)
    band = window_visibility(seq_len, seq_len, window)
    ours = lambda q, k, v: attnkernels.attention(q, k, v, window_size=window)  # noqa: E731
    peer_fns = {}
    if seq_len <= MASKED_SDPA_MAX_N:
        peer_fns["masked_sdpa"] = peers.masked_sdpa_fn(band)
    local = peers.local_attention_fn(WINDOW, causal)
    if local is not None:
        peer_fns["local_attention"] = local
    if not backward:  # FlexAttention has no CPU backward
        peer_fns["flex"] = peers.flex_attention_fn(
            lambda b, h, q_idx, kv_idx: (q_idx - kv_idx <= window[0]) & (kv_idx - q_idx <= window[1]),
            None, None, seq_len, seq_len,
        )
    ours_fn = timed_call(ours, (q, k, v), backward)
    peer_calls = {name: timed_call(fn, (q, k, v), backward) for name, fn in peer_fns.items()}
    flops = softmax_attention_flops(1, HEADS, seq_len, seq_len, HEAD_DIM, visible_fraction=band.double().mean().item(), backward=backward)
    benchmark.group = f"window-{direction}-N{seq_len}-{dtype}"
    with torch.enable_grad() if backward else torch.no_grad():
        info = compare(benchmark, ours_fn, peer_calls, flops, dtype=dtype)
    assert info["ours_ms"] > 0
