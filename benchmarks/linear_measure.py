"""Speed of the C++ linear-attention kernels against fla's pure-PyTorch chunked code.

    python -m benchmarks.linear_measure [--threads 1] [--rounds 5]

fp32, B=1, H=8, D=64, elu+1. Causal: ours vs flash-linear-attention's
`naive_chunk_linear_attn` (elu+1 applied by the caller, layout (B, T, H, D),
normalize=True). Non-causal (fla has no non-causal naive op): ours vs the plain
torch φ(q) (φ(k)ᵀ v) / (φ(q) Σφ(k)). Then our time at N=65536 over N=4096.
Timings are interleaved (A B A B ...) and reported as medians of per-round
ratios (attnkernels.tools.timing), because this host throttles.
"""
from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from attnkernels.tools.timing import median_ratio, time_interleaved
from attnkernels import linear_attention

HEADS, HEAD_DIM = 8, 64


def _elu1(x):
    return F.elu(x) + 1


def fla_chunk_causal():
    """fla's naive_chunk_linear_attn on our (B, H, N, D) tensors, or None if fla is missing."""
    try:
        from fla.ops.linear_attn.naive import naive_chunk_linear_attn
    except ImportError:
        return None

    def run(q, k, v):
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        out = naive_chunk_linear_attn(_elu1(q), _elu1(k), v, scale=1.0, normalize=True)
        out = out[0] if isinstance(out, tuple) else out
        return out.transpose(1, 2)
    return run


def torch_noncausal(q, k, v):
    fq, fk = _elu1(q), _elu1(k)
    return (fq @ (fk.transpose(-1, -2) @ v)) / (fq @ fk.sum(2, keepdim=True).transpose(-1, -2) + 1e-6)


def _call(fn, inputs, backward):
    if not backward:
        def run():
            with torch.no_grad():
                fn(*inputs)
        return run

    def run_bwd():
        leaves = [t.detach().requires_grad_() for t in inputs]
        out = fn(*leaves)
        out.backward(torch.ones_like(out))
    return run_bwd


def _inputs(n):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(1, HEADS, n, HEAD_DIM, generator=gen) for _ in range(3)]


def compare(n, rounds):
    rows = []
    fla = fla_chunk_causal()
    for causal in (True, False):
        peer_name, peer = ("fla naive_chunk", fla) if causal else ("torch φ(q)(φ(k)ᵀv)", torch_noncausal)
        if peer is None:
            print("fla is not importable: causal comparison skipped")
            continue
        ours = lambda q, k, v, c=causal: linear_attention(q, k, v, causal=c)  # noqa: E731
        inputs = _inputs(n)
        for backward in (False, True):
            a, b = _call(ours, inputs, backward), _call(peer, inputs, backward)
            ours_t, peer_t = time_interleaved([a, b], rounds=rounds)
            rows.append((f"N={n} {'causal' if causal else 'non-causal'} {'fwd+bwd' if backward else 'fwd'}",
                         statistics.median(ours_t) * 1e3, peer_name, statistics.median(peer_t) * 1e3,
                         median_ratio(peer_t, ours_t)))
    return rows


def scaling(rounds):
    rows = []
    small, large = _inputs(4096), _inputs(65536)
    for causal in (True, False):
        ours = lambda q, k, v, c=causal: linear_attention(q, k, v, causal=c)  # noqa: E731
        for backward in (False, True):
            t_small, t_large = time_interleaved([_call(ours, small, backward), _call(ours, large, backward)], rounds=rounds)
            rows.append((f"{'causal' if causal else 'non-causal'} {'fwd+bwd' if backward else 'fwd'}",
                         statistics.median(t_small) * 1e3, statistics.median(t_large) * 1e3, median_ratio(t_large, t_small)))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--n", type=int, default=4096)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"threads={args.threads}, fp32, B=1 H={HEADS} D={HEAD_DIM}, elu+1, rounds={args.rounds}")
    for name, ours_ms, peer_name, peer_ms, speedup in compare(args.n, args.rounds):
        print(f"{name:32s} ours {ours_ms:9.2f} ms | {peer_name} {peer_ms:9.2f} ms | speedup x{speedup:.2f}")
    for name, small_ms, large_ms, ratio in scaling(max(3, args.rounds // 2)):
        print(f"scaling {name:20s} N=4096 {small_ms:9.2f} ms  N=65536 {large_ms:10.2f} ms  ratio {ratio:.1f} (linear: 16)")


if __name__ == "__main__":
    main()
