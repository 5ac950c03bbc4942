"""Linear attention on CPU (fp32): elu+1 causal / non-causal and FAVOR+ (256 features).

Full: B=1, H=8, D=64, N in {1024, 4096, 16384, 65536}. Peers: flash-linear-attention's
pure-PyTorch `naive_chunk_linear_attn` (causal only), performer-pytorch's
`linear_attention` / `causal_linear_attention_noncuda` (elu+1 applied by the caller, as
for ours) and its FAVOR+ `FastAttention`. Targets (issue 5) at N=4096: causal forward
and forward+backward >= 3x fla's naive_chunk; FAVOR+ >= 3x performer-pytorch; time at
N=65536 <= 18x the time at N=4096 (see the report's scaling table).
performer-pytorch's causal path is skipped above N=4096 (about 9 GB at 4096 fwd+bwd).
"""
import pytest
import torch

import attnkernels

from . import peers
from .common import compare, qkv, sizes, sweep_direction_and_dtype, timed_call

SEQ_LENS = sizes(full=[1024, 4096, 16384, 65536], quick=[256])
HEADS, HEAD_DIM, NUM_FEATURES = 8, 64, 256
PERFORMER_CAUSAL_MAX_N = 4096


def linear_flops(seq_len: int, feat_dim: int, backward: bool) -> float:
    """φ(q)(φ(k)ᵀv): two products of N·M·Dv multiply-adds, ×2 flops; fwd+bwd counted 3.5×."""
    return 4.0 * HEADS * seq_len * feat_dim * HEAD_DIM * (3.5 if backward else 1.0)


def _run(benchmark, ours, peer_fns, inputs, flops, backward):
    dtype = inputs[0].dtype
    ours_fn = timed_call(ours, inputs, backward)
    peer_calls = {name: timed_call(fn, inputs, backward) for name, fn in peer_fns.items()}
    with torch.enable_grad() if backward else torch.no_grad():
        return compare(benchmark, ours_fn, peer_calls, flops, dtype=dtype)


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("seq_len", SEQ_LENS, ids=lambda n: f"N{n}")
@sweep_direction_and_dtype
def test_linear_elu(benchmark, direction, seq_len, causal, dtype):
    backward = direction == "fwd+bwd"
    inputs = qkv(seq_len, HEADS, HEAD_DIM, dtype, backward)
    ours = lambda q, k, v: attnkernels.linear_attention(q, k, v, feature_map="elu", causal=causal)  # noqa: E731
    peer_fns = {}
    fla = peers.fla_naive_linear_fn(causal)
    if fla is not None:
        peer_fns["fla_naive_chunk"] = fla
    performer = peers.performer_linear_fn(causal)
    if performer is not None and (not causal or seq_len <= PERFORMER_CAUSAL_MAX_N):
        peer_fns["performer"] = performer
    benchmark.group = f"linear-{'causal' if causal else 'noncausal'}-{direction}-N{seq_len}-{inputs[0].dtype}"
    info = _run(benchmark, ours, peer_fns, inputs, linear_flops(seq_len, HEAD_DIM, backward), backward)
    assert info["ours_ms"] > 0


@pytest.mark.parametrize("seq_len", SEQ_LENS, ids=lambda n: f"N{n}")
@sweep_direction_and_dtype
def test_favor_plus(benchmark, direction, seq_len, dtype):
    backward = direction == "fwd+bwd"
    inputs = qkv(seq_len, HEADS, HEAD_DIM, dtype, backward)
    features = attnkernels.PerformerFeatures(HEAD_DIM, num_features=NUM_FEATURES, generator=torch.Generator().manual_seed(0)).to(dtype)
    ours = lambda q, k, v: attnkernels.linear_attention(q, k, v, feature_map=features)  # noqa: E731
    peer_fns = {}
    performer = peers.performer_fast_attention_fn(HEAD_DIM, NUM_FEATURES, dtype=dtype)
    if performer is not None:
        peer_fns["performer_fast_attention"] = performer
    benchmark.group = f"favor+-{direction}-N{seq_len}-{dtype}"
    info = _run(benchmark, ours, peer_fns, inputs, linear_flops(seq_len, NUM_FEATURES, backward), backward)
    assert info["ours_ms"] > 0
