"""Dense and causal softmax attention on CPU vs torch's own SDPA kernel (fp32).

Full: B=1, H=8, D=64, N in {1024, 4096}. Targets (issue 2): >= 1.0x SDPA
forward and forward+backward; causal >= 1.2x SDPA causal.
"""
import pytest
import torch
import torch.nn.functional as F

import attnkernels

from .common import compare, qkv, sizes, softmax_attention_flops, sweep_direction_and_dtype, timed_call

SEQ_LENS = sizes(full=[1024, 4096], quick=[128])
HEADS, HEAD_DIM = 8, 64


@pytest.mark.parametrize("causal", [False, True], ids=["dense", "causal"])
@pytest.mark.parametrize("seq_len", SEQ_LENS, ids=lambda n: f"N{n}")
@sweep_direction_and_dtype
def test_dense_vs_sdpa(benchmark, direction, seq_len, causal, dtype):
    backward = direction == "fwd+bwd"
    q, k, v = qkv(seq_len, HEADS, HEAD_DIM, dtype, backward)
    ours = lambda q, k, v: attnkernels.attention(q, k, v, causal=causal)  # noqa: E731
    sdpa = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # noqa: E731
    ours_fn, peers = timed_call(ours, (q, k, v), backward), {"sdpa": timed_call(sdpa, (q, k, v), backward)}
    flops = softmax_attention_flops(1, HEADS, seq_len, seq_len, HEAD_DIM, visible_fraction=0.5 if causal else 1.0, backward=backward)
    benchmark.group = f"dense-{direction}-N{seq_len}-{dtype}"
    with torch.no_grad() if not backward else torch.enable_grad():
        info = compare(benchmark, ours_fn, peers, flops, dtype=dtype)
    assert info["ours_ms"] > 0
