"""BigBird block-sparse attention on CPU (fp32) vs FlexAttention, HF BigBird and masked SDPA.

Full: B=1, H=8, D=64, N in {1024, 4096, 16384}; BigBird block 64, 3 window, 1 global
block at each end (2 in all), 3 random blocks. Targets (issue 4) at N=4096: forward >= 1.5x
FlexAttention (block 64) and >= 8x HF BigBird; forward+backward >= 5x HF BigBird.
HF BigBird includes its own q/k/v projections (see peers.hf_bigbird_fn).
"""
import pytest
import torch

import attnkernels
from attnkernels import masks

from . import peers
from .common import compare, qkv, sizes, softmax_attention_flops, sweep_direction_and_dtype, timed_call

SEQ_LENS = sizes(full=[1024, 4096, 16384], quick=[768])  # HF BigBird needs N >= (5 + 2·random)·block
HEADS, HEAD_DIM, BLOCK = 8, 64, 64
MASKED_SDPA_MAX_N = 4096


@pytest.mark.parametrize("seq_len", SEQ_LENS, ids=lambda n: f"N{n}")
@sweep_direction_and_dtype
def test_bigbird(benchmark, direction, seq_len, dtype):
    backward = direction == "fwd+bwd"
    mask = masks.bigbird(seq_len, block_size=BLOCK, num_global_blocks=1, num_window_blocks=3, num_random_blocks=3, num_heads=HEADS, seed=0)
    q, k, v = qkv(seq_len, HEADS, HEAD_DIM, dtype, backward)
    ours = lambda q, k, v: attnkernels.sparse_attention(q, k, v, mask)  # noqa: E731
    peer_fns = {}
    if seq_len <= MASKED_SDPA_MAX_N:
        peer_fns["masked_sdpa"] = peers.masked_sdpa_fn(mask.element_mask())
    if not backward:
        peer_fns["flex_block64"] = peers.flex_from_block_mask(mask)
    ours_fn = timed_call(ours, (q, k, v), backward)
    peer_calls = {name: timed_call(fn, (q, k, v), backward) for name, fn in peer_fns.items()}
    hf = peers.hf_bigbird_fn(seq_len, HEADS, HEAD_DIM, block_size=BLOCK, num_random_blocks=3, dtype=dtype)
    if hf is not None:
        hf_fn, hidden = hf
        hidden_states = torch.randn(1, seq_len, hidden, dtype=dtype, requires_grad=backward)
        peer_calls["hf_bigbird"] = timed_call(hf_fn, [hidden_states], backward)
    flops = softmax_attention_flops(1, HEADS, seq_len, seq_len, HEAD_DIM, visible_fraction=mask.density(), backward=backward)
    benchmark.group = f"bigbird-{direction}-N{seq_len}-{dtype}"
    with torch.enable_grad() if backward else torch.no_grad():
        info = compare(benchmark, ours_fn, peer_calls, flops, dtype=dtype)
    assert info["ours_ms"] > 0
