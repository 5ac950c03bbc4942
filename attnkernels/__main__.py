"""`python -m attnkernels`: the environment, then each family on CPU vs the reference and torch's best.

For every family built so far it runs our kernel on CPU tensors, checks it
against the float64 reference, times it against the best plain-torch
baseline in one interleaved run, and prints a small table.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import os
import platform

import torch
import torch.nn.functional as F

import attnkernels
from attnkernels import backends
from attnkernels.reference import attention_reference, window_visibility
from attnkernels.tools.timing import median_ratio, time_interleaved


def environment_lines() -> list[str]:
    from attnkernels import _cpu_backend

    cpu = _cpu_backend.load()
    triton_ok, triton_why = backends.triton_status()
    triton_version = "not installed"
    if importlib.util.find_spec("triton") is not None:
        import triton

        triton_version = triton.__version__
    return [
        f"attnkernels {attnkernels.__version__}  python {platform.python_version()}  torch {torch.__version__}  triton {triton_version}",
        f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
        f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}",
        f"backend cpu (C++):    {'usable, build ' + cpu.capability if cpu.available else 'unusable: ' + (cpu.error or '')}",
        f"backend triton:       "
        + (
            ("usable on CUDA" if torch.cuda.is_available() else "importable; no CUDA device here")
            + (", interpreter on (TRITON_INTERPRET=1)" if backends.triton_interpreted() else "")
            if triton_ok
            else "unusable: " + triton_why
        ),
        "backend reference:    usable (float64 oracle)",
    ]


def _max_error(out: torch.Tensor, expected: torch.Tensor) -> float:
    return (out.double() - expected).abs().max().item()


def softmax_cases(batch: int, heads: int, seq_len: int, head_dim: int):
    """(name, ours, baseline name, baseline, reference) for the softmax families built so far."""
    q, k, v = (torch.randn(batch, heads, seq_len, head_dim) for _ in range(3))
    band = window_visibility(seq_len, seq_len, (256, 256))
    yield ("dense", lambda: attnkernels.attention(q, k, v), "torch SDPA",
           lambda: F.scaled_dot_product_attention(q, k, v), lambda: attention_reference(q, k, v)[0])
    yield ("causal", lambda: attnkernels.attention(q, k, v, causal=True), "torch SDPA causal",
           lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
           lambda: attention_reference(q, k, v, causal=True)[0])
    yield ("window (256,256)", lambda: attnkernels.attention(q, k, v, window_size=256), "SDPA + band mask",
           lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=band),
           lambda: attention_reference(q, k, v, window_size=256)[0])


def family_cases(batch: int, heads: int, seq_len: int, head_dim: int):
    yield from softmax_cases(batch, heads, seq_len, head_dim)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m attnkernels", description=__doc__)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)

    print("\n".join(environment_lines()))
    ok, why = backends.cpu_status()
    if not ok:
        print(f"\nThe C++ kernels are not built: {why}")
        return 1
    torch.manual_seed(0)
    print(f"\nCPU, float32, B=1 H={args.heads} N={args.seq_len} D={args.head_dim}; "
          f"ratio = baseline time / our time (median of {args.rounds} interleaved rounds)")
    header = f"{'family':<22}{'max |err| vs fp64 ref':>22}{'ours ms':>10}{'baseline':>22}{'base ms':>10}{'ratio':>8}"
    print(header)
    print("-" * len(header))
    worst = 0.0
    with torch.no_grad():
        for name, ours, baseline_name, baseline, reference in family_cases(1, args.heads, args.seq_len, args.head_dim):
            error = _max_error(ours(), reference())
            worst = max(worst, error)
            ours_t, base_t = time_interleaved([ours, baseline], rounds=args.rounds)
            ratio = median_ratio(base_t, ours_t)
            median = lambda t: sorted(t)[len(t) // 2] * 1e3  # noqa: E731
            print(f"{name:<22}{error:>22.2e}{median(ours_t):>10.2f}{baseline_name:>22}{median(base_t):>10.2f}{ratio:>7.2f}x")
    if not math.isfinite(worst) or worst > 1e-3:
        print(f"\nFAILED: an error against the reference is {worst:.2e} (> 1e-3)")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
