"""Inputs and comparisons shared by the tests/test_linear_*.py files."""
import pytest
import torch

from attnkernels.linear.reference import linear_attention_reference

from .backend_params import BACKENDS, backend_param
from .tolerance import FACTOR, FLOOR

# Backends for the linear tests; Triton runs under the interpreter here (seconds per
# call), so its cases carry the `slow` mark: `-m "not slow"` leaves them out.
LINEAR_BACKENDS = [pytest.param(b, marks=pytest.mark.slow) if b == "triton" else b for b in BACKENDS]


def case_id(b, hq, hk, nq, nk, d, dv, causal):
    """B2-H4-N65-D16-causal; GQA, Nq != Nk and Dv != D spelt out only when they occur."""
    heads = f"H{hq}" if hq == hk else f"Hq{hq}-Hk{hk}"
    lens = f"N{nq}" if nq == nk else f"Nq{nq}-Nk{nk}"
    dims = f"D{d}" if dv == d else f"D{d}-Dv{dv}"
    return f"B{b}-{heads}-{lens}-{dims}-{'causal' if causal else 'noncausal'}"


def linear_backend_or_skip(backend: str, causal: bool, noncausal_triton_reason: str) -> None:
    """Skip unless `backend` runs linear attention here; non-causal Triton cases skip with the reason given
    (the interpreter is slow: those cases live in the Triton kernels' own tests)."""
    backend_param(backend, "linear")
    if backend == "triton" and not causal:
        pytest.skip(noncausal_triton_reason)


def make_qkv(b, hq, hk, nq, nk, d, dv, *, dtype=torch.float64, seed=0, positive=False):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, nq, d, generator=gen, dtype=torch.float64)
    k = torch.randn(b, hk, nk, d, generator=gen, dtype=torch.float64)
    v = torch.randn(b, hk, nk, dv, generator=gen, dtype=torch.float64)
    if positive:
        q, k = q.abs(), k.abs()
    return tuple(t.to(dtype) for t in (q, k, v))


def make_state(b, hk, m, dv, *, dtype=torch.float64, seed=1):
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(b, hk, m, dv, generator=gen, dtype=torch.float64)
    z = torch.rand(b, hk, m, generator=gen, dtype=torch.float64) * 5  # positive, like a real Σ φ(k)
    return s.to(dtype), z.to(dtype)


def reference_with_grads(q, k, v, dout, **kwargs):
    """(out, (S, z), (dq, dk, dv)) of the reference in q's dtype, by autograd."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, state = linear_attention_reference(*leaves, **kwargs)
    grads = torch.autograd.grad(out, leaves, dout.to(out.dtype))
    return out.detach(), tuple(s.detach() for s in state), grads


# A chunked kernel sums up to CHUNK terms of the intra-chunk product q̃_i·k̃_j v_j in
# one accumulator, where the literal reference sums per-feature states and then
# dots them: its rounding errors average over the M features, the kernel's do
# not. Both are rounding-level; the kernel's is up to ~sqrt(CHUNK) ulps of the
# output's magnitude (measured: 3-8x the fp32 reference's error on causal dv
# with elu+1 features, ~3e-7 relative). So the rule gets a relative floor of
# sqrt(CHUNK) ulps of the largest expected entry, on top of FlashAttention's 2x.
CHUNK_ULPS = 8.0


def assert_close_to_oracle(name, actual, expected64, dtype, baseline=None):
    """fp64: tight relative check. Other dtypes: FlashAttention's rule (<= 2x the
    same-dtype reference's error) + max(absolute floor, CHUNK_ULPS ulps of max|expected|)."""
    if dtype == torch.float64:
        atol = 1e-10 * max(1.0, expected64.abs().max().item())
        torch.testing.assert_close(actual.double(), expected64, rtol=1e-9, atol=atol, msg=lambda m: f"{name}: {m}")
        return
    expected = expected64.double()
    assert torch.isfinite(actual).all(), f"{name}: non-finite entries"
    error = (actual.double() - expected).abs().max().item() if expected.numel() else 0.0
    baseline_error = (baseline.double() - expected).abs().max().item() if expected.numel() else 0.0
    scale = expected.abs().max().item() if expected.numel() else 0.0
    floor = max(FLOOR[dtype], CHUNK_ULPS * torch.finfo(dtype).eps * scale)
    bound = FACTOR * baseline_error + floor
    assert error <= bound, (
        f"{name}: max error {error:.3e} > {FACTOR} x same-dtype reference error {baseline_error:.3e} + floor {floor:.1e}"
    )


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Run each linear test on one intra-op thread.

    The shapes here are tiny; with 2 threads on a loaded 2-core host every small
    torch op (the reference's einsums, mm) waits on an OpenMP barrier for a
    descheduled thread (~20 ms per call measured), which made this suite ~5x
    slower. The multi-threaded C++ paths are checked against the one-thread
    results bit for bit in test_cpu_deterministic_across_thread_counts.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
