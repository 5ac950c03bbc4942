"""`python -m attnkernels`: the environment, then each family on CPU vs the reference and torch's best.

For every family built so far it runs our kernel on CPU tensors, checks it
against the float64 reference, times it against the best plain-torch
baseline in one interleaved run, and prints a small table.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import platform

import torch
import torch.nn.functional as F

import attnkernels
from attnkernels import backends
from attnkernels.conventions import window_visibility
from attnkernels.softmax.reference import attention_reference
from attnkernels.tools.timing import median_ratio, time_interleaved


ERROR_FLOOR = 1e-3


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
        f"C++ tile GEMMs:       {_gemm_paths(cpu)}",
        f"backend triton:       "
        + (
            ("usable on CUDA" if torch.cuda.is_available() else "importable; no CUDA device here")
            + (", interpreter on (TRITON_INTERPRET=1)" if backends.triton_interpreted() else "")
            if triton_ok
            else "unusable: " + triton_why
        ),
        "backend reference:    usable (float64 oracle)",
    ]


def _gemm_paths(cpu) -> str:
    """Which unit each input dtype's tile GEMMs run on (AMX, AVX512-BF16, or fp32 FMA after an upcast)."""
    paths = cpu.gemm_paths()
    return "n/a" if paths is None else ", ".join(f"{d} -> {p}" for d, p in paths.items())


def _max_error(out: torch.Tensor, expected: torch.Tensor) -> float:
    return (out.double() - expected).abs().max().item()


def softmax_cases(batch: int, heads: int, seq_len: int, head_dim: int, dtype=torch.float32):
    """(name, ours, baseline name, baseline, reference) for the softmax families; the baseline in `dtype` too."""
    q, k, v = (torch.randn(batch, heads, seq_len, head_dim, dtype=dtype) for _ in range(3))
    band = window_visibility(seq_len, seq_len, (256, 256))
    if dtype != torch.float32:
        label = str(dtype).replace("torch.", "")
        yield (f"dense {label}", lambda: attnkernels.attention(q, k, v), f"torch SDPA {label}",
               lambda: F.scaled_dot_product_attention(q, k, v), lambda: attention_reference(q, k, v)[0])
        yield (f"causal {label}", lambda: attnkernels.attention(q, k, v, causal=True), f"SDPA causal {label}",
               lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
               lambda: attention_reference(q, k, v, causal=True)[0])
        return
    yield ("dense", lambda: attnkernels.attention(q, k, v), "torch SDPA",
           lambda: F.scaled_dot_product_attention(q, k, v), lambda: attention_reference(q, k, v)[0])
    yield ("causal", lambda: attnkernels.attention(q, k, v, causal=True), "torch SDPA causal",
           lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
           lambda: attention_reference(q, k, v, causal=True)[0])
    yield ("window (256,256)", lambda: attnkernels.attention(q, k, v, window_size=256), "SDPA + band mask",
           lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=band),
           lambda: attention_reference(q, k, v, window_size=256)[0])


def bigbird_cases(batch: int, heads: int, seq_len: int, head_dim: int):
    """BigBird (block 64, 1 global, 3 window, 3 random blocks, per-head) vs SDPA with its element mask."""
    from attnkernels import masks

    q, k, v = (torch.randn(batch, heads, seq_len, head_dim) for _ in range(3))
    mask = masks.bigbird(seq_len, block_size=64, num_heads=heads, seed=0)
    element_mask = mask.element_mask(seq_len, seq_len)
    yield (f"bigbird ({mask.density():.0%} dense)", lambda: attnkernels.sparse_attention(q, k, v, mask),
           "SDPA + element mask", lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=element_mask),
           lambda: attention_reference(q, k, v, block_mask=mask)[0])


def _torch_linear(q, k, v):
    """Non-causal elu+1 linear attention in plain torch: φ(q) (φ(k)ᵀ v) / (φ(q) Σφ(k))."""
    phi_q, phi_k = F.elu(q) + 1, F.elu(k) + 1
    kv = phi_k.transpose(-1, -2) @ v  # [B, H, M, Dv]
    return (phi_q @ kv) / (phi_q @ phi_k.sum(2, keepdim=True).transpose(-1, -2) + 1e-6)


def linear_cases(batch: int, heads: int, seq_len: int, head_dim: int):
    """elu+1 linear attention, non-causal vs plain torch and causal vs fla's chunked torch code."""
    if not hasattr(attnkernels, "linear_attention"):
        return
    from attnkernels.linear.reference import linear_attention_reference

    q, k, v = (torch.randn(batch, heads, seq_len, head_dim) for _ in range(3))
    q64, k64, v64 = (t.double() for t in (q, k, v))
    yield ("linear elu+1", lambda: attnkernels.linear_attention(q, k, v), "plain torch",
           lambda: _torch_linear(q, k, v), lambda: linear_attention_reference(q64, k64, v64)[0])
    if importlib.util.find_spec("fla") is not None:
        from fla.ops.linear_attn.naive import naive_chunk_linear_attn

        def fla_causal():
            qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
            out = naive_chunk_linear_attn(F.elu(qt) + 1, F.elu(kt) + 1, vt, scale=1.0, normalize=True)
            return out.transpose(1, 2)  # fla 0.6 returns the output alone, (B, N, H, Dv)

        yield ("linear elu+1 causal", lambda: attnkernels.linear_attention(q, k, v, causal=True),
               "fla naive_chunk", fla_causal,
               lambda: linear_attention_reference(q64, k64, v64, causal=True)[0])


def family_cases(batch: int, heads: int, seq_len: int, head_dim: int):
    yield from softmax_cases(batch, heads, seq_len, head_dim)
    yield from bigbird_cases(batch, heads, seq_len, head_dim)
    yield from linear_cases(batch, heads, seq_len, head_dim)
    yield from softmax_cases(batch, heads, seq_len, head_dim, torch.bfloat16)


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
    print(f"\nCPU, float32 (and bf16 rows against bf16 torch), B=1 H={args.heads} N={args.seq_len} D={args.head_dim}; "
          f"ratio = baseline time / our time (median of {args.rounds} interleaved rounds); an error passes when it is "
          f"<= 2x the baseline's own error + {ERROR_FLOOR:g} (FlashAttention's rule)")
    header = f"{'family':<26}{'max |err| vs fp64 ref':>22}{'ours ms':>10}{'baseline':>22}{'base ms':>10}{'ratio':>8}"
    print(header)
    print("-" * len(header))
    failed = []
    with torch.no_grad():
        for name, ours, baseline_name, baseline, reference in family_cases(1, args.heads, args.seq_len, args.head_dim):
            expected = reference()
            error = _max_error(ours(), expected)
            if not error <= 2 * _max_error(baseline(), expected) + ERROR_FLOOR:
                failed.append(f"{name} ({error:.2e})")
            ours_t, base_t = time_interleaved([ours, baseline], rounds=args.rounds)
            ratio = median_ratio(base_t, ours_t)
            median = lambda t: sorted(t)[len(t) // 2] * 1e3  # noqa: E731
            print(f"{name:<26}{error:>22.2e}{median(ours_t):>10.2f}{baseline_name:>22}{median(base_t):>10.2f}{ratio:>7.2f}x")
    if failed:
        print(f"\nFAILED: errors against the reference above 2x the baseline's + {ERROR_FLOOR:g}: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
