"""Reliability sweep for softmax attention (issue 8): fuzzing every backend against the
reference, numerical edge cases, NaN propagation, leaks, memory at N=65536, threads.

Fuzz budget: ATTNKERNELS_FUZZ_EXAMPLES (default 25 for C++, a fifth of that for the
Triton interpreter, which is ~100x slower). CI runs the default; raise it by hand.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnkernels
from attnkernels import masks
from attnkernels.softmax.reference import attention_reference, attention_reference_backward

from .backend_params import backend_param
from .tolerance import assert_within_rule

FUZZ_EXAMPLES = int(os.environ.get("ATTNKERNELS_FUZZ_EXAMPLES", "25"))
FUZZ_BACKENDS = {"cpu": FUZZ_EXAMPLES, "triton": max(2, FUZZ_EXAMPLES // 5)}
# The dtype each backend is fuzzed in: C++ runs float64 (so the check is tight), the
# Triton interpreter float32 (its tl.dot has no float64 path on GPU anyway).
FUZZ_DTYPE = {"cpu": torch.float64, "triton": torch.float32}


@st.composite
def attention_problems(draw):
    """A random (shapes, GQA, window/causal, block layout, padding) softmax attention call."""
    batch = draw(st.integers(1, 2))
    kv_heads = draw(st.integers(1, 2))
    q_heads = kv_heads * draw(st.sampled_from([1, 2, 3]))
    q_len = draw(st.integers(1, 80))
    kv_len = draw(st.integers(1, 80))
    head_dim = draw(st.sampled_from([8, 16, 24, 32, 64]))
    head_dim_v = draw(st.sampled_from([head_dim, 16]))
    causal = draw(st.booleans())
    kind = draw(st.sampled_from(["dense", "window", "sparse"]))
    window = None
    layout = None
    if kind == "window":
        window = (draw(st.integers(-1, 40)), draw(st.integers(-1, 40)))
    elif kind == "sparse":
        rows, cols = -(-q_len // 16), -(-kv_len // 16)
        density = draw(st.floats(0.05, 1.0))
        seed = draw(st.integers(0, 2**16))
        per_head = draw(st.booleans())
        gen = torch.Generator().manual_seed(seed)
        layout = torch.rand(1, q_heads if per_head else 1, rows, cols, generator=gen) < density
    padded = draw(st.booleans())
    return dict(batch=batch, q_heads=q_heads, kv_heads=kv_heads, q_len=q_len, kv_len=kv_len, head_dim=head_dim,
                head_dim_v=head_dim_v, causal=causal, window=window, layout=layout, padded=padded,
                seed=draw(st.integers(0, 2**16)))


def _tensors(problem, dtype):
    gen = torch.Generator().manual_seed(problem["seed"])
    b, hq, hk = problem["batch"], problem["q_heads"], problem["kv_heads"]
    q = torch.randn(b, hq, problem["q_len"], problem["head_dim"], generator=gen, dtype=dtype)
    k = torch.randn(b, hk, problem["kv_len"], problem["head_dim"], generator=gen, dtype=dtype)
    v = torch.randn(b, hk, problem["kv_len"], problem["head_dim_v"], generator=gen, dtype=dtype)
    dout = torch.randn(b, hq, problem["q_len"], problem["head_dim_v"], generator=gen, dtype=dtype)
    padding = torch.rand(b, problem["kv_len"], generator=gen) < 0.3 if problem["padded"] else None
    return q, k, v, dout, padding


def _check_against_reference(backend, problem):
    dtype = FUZZ_DTYPE[backend]
    q, k, v, dout, padding = _tensors(problem, dtype)
    block_mask = None
    if problem["layout"] is not None:
        block_mask = masks.from_dense(problem["layout"], block_size=16, q_len=problem["q_len"],
                                      kv_len=problem["kv_len"], causal=False)
    options = dict(causal=problem["causal"], window_size=problem["window"], block_mask=block_mask,
                   key_padding_mask=padding)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with attnkernels.backend(backend):
        out, lse = attnkernels.attention(*leaves, return_lse=True, **options)
        out.backward(dout)
    expected_out, expected_lse = attention_reference(q, k, v, **options)
    expected_grads = attention_reference_backward(dout, q, k, v, causal=problem["causal"], window_size=problem["window"],
                                                  block_mask=block_mask, key_padding_mask=padding)
    plain_out, _ = attention_reference(q, k, v, upcast=False, **options)
    assert_within_rule("out", out, expected_out, plain_out, dtype)
    seen = torch.isfinite(expected_lse)
    assert torch.equal(torch.isfinite(lse), seen), "lse: rows that see no key must be -inf, the others finite"
    assert torch.all(lse[~seen] == float("-inf"))
    assert torch.allclose(lse[seen].double(), expected_lse[seen], rtol=0, atol=1e-9 if dtype == torch.float64 else 1e-4)
    # Gradients: in float64 the kernels must match to 1e-9 relative to the gradient's size;
    # in float32 the plain same-dtype backward is not at hand, so a relative bound 1e-4 of
    # the largest entry (fp32 accumulation over <= 80 keys is ~1e-6).
    bound = 1e-9 if dtype == torch.float64 else 1e-4
    for name, leaf, expected in zip(("dq", "dk", "dv"), leaves, expected_grads):
        assert torch.isfinite(leaf.grad).all(), f"{name}: non-finite gradient"
        scale = expected.abs().max().item() + 1.0
        error = (leaf.grad.double() - expected).abs().max().item()
        assert error <= bound * scale, f"{name}: max error {error:.3e} > {bound:.0e} x {scale:.2f}"


@pytest.mark.usefixtures("poison_empty")  # Triton outputs are NaN until written
@pytest.mark.parametrize("backend", list(FUZZ_BACKENDS))
def test_fuzz_softmax_attention_against_reference(backend):
    backend_param(backend)

    @settings(max_examples=FUZZ_BACKENDS[backend], deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(problem=attention_problems())
    def run(problem):
        _check_against_reference(backend, problem)

    run()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("magnitude", [1e4, -1e4], ids=["plus1e4", "minus1e4"])
def test_B1_H2_N77_D32_huge_logits_do_not_overflow(dtype, magnitude):
    backend_param("cpu")
    gen = torch.Generator().manual_seed(3)
    # Logits of order ±1e4 (scale 1): exp would overflow without the running max.
    q = torch.randn(1, 2, 77, 32, generator=gen, dtype=dtype) * abs(magnitude) ** 0.5
    k = torch.randn(1, 2, 77, 32, generator=gen, dtype=dtype) * abs(magnitude) ** 0.5 * (1 if magnitude > 0 else -1)
    v = torch.randn(1, 2, 77, 32, generator=gen, dtype=dtype)
    with attnkernels.backend("cpu"):
        out, lse = attnkernels.attention(q, k, v, scale=1.0, causal=True, return_lse=True)
    expected_out, expected_lse = attention_reference(q, k, v, scale=1.0, causal=True)
    plain_out, _ = attention_reference(q, k, v, scale=1.0, causal=True, upcast=False)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert_within_rule("out", out, expected_out, plain_out, dtype)
    # fp32 logits of size L carry rounding error ~L·2^-24·sqrt(D): bound by 1e-6 of the largest.
    lse_bound = (1e-12 if dtype == torch.float64 else 1e-6) * expected_lse.abs().max().item()
    assert (lse.double() - expected_lse).abs().max().item() <= lse_bound


def test_B1_H1_N50_D16_equal_scores_average_the_visible_values():
    backend_param("cpu")
    q = torch.zeros(1, 1, 50, 16, dtype=torch.float64)
    k = torch.randn(1, 1, 50, 16, dtype=torch.float64)
    v = torch.randn(1, 1, 50, 16, dtype=torch.float64)
    with attnkernels.backend("cpu"):
        out = attnkernels.attention(q, k, v, causal=True)
    running_mean = v.cumsum(2) / torch.arange(1, 51, dtype=torch.float64)[:, None]
    torch.testing.assert_close(out, running_mean, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_B2_H2_N33_D16_whole_head_masked_gives_zero_and_finite_gradients(backend):
    backend_param(backend)
    dtype = FUZZ_DTYPE[backend]
    q, k, v = (torch.randn(2, 2, 33, 16, dtype=dtype, requires_grad=True) for _ in range(3))
    padding = torch.zeros(2, 33, dtype=torch.bool)
    padding[1] = True  # every key of batch 1 ignored
    with attnkernels.backend(backend):
        out, lse = attnkernels.attention(q, k, v, key_padding_mask=padding, return_lse=True)
        out.sum().backward()
    assert torch.all(out[1] == 0) and torch.all(lse[1] == float("-inf"))
    for name, leaf in (("dq", q), ("dk", k), ("dv", v)):
        assert torch.isfinite(leaf.grad).all(), name
        assert torch.all(leaf.grad[1] == 0), f"{name}: a masked head must get zero gradient"


@pytest.mark.parametrize("backend, dtype", [("cpu", torch.float64), ("cpu", torch.float32), ("triton", torch.float32)],
                         ids=["cpu-fp64", "cpu-fp32", "triton-fp32"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_B1_H1_N40_D16_bad_key_poisons_exactly_the_rows_that_see_it(backend, dtype, bad):
    """Documented: a NaN/Inf in k spreads to the rows whose window sees it, as in the reference."""
    backend_param(backend)
    q, k, v = (torch.randn(1, 1, 40, 16, dtype=dtype) for _ in range(3))
    k[0, 0, 20, 3] = bad
    with attnkernels.backend(backend):
        out = attnkernels.attention(q, k, v, window_size=(5, 0))
    expected, _ = attention_reference(q, k, v, window_size=(5, 0))
    assert torch.equal(torch.isnan(out), torch.isnan(expected))
    # Rows 20..25 see key 20 (window (5, 0)); NaN poisons all of them, +Inf those whose
    # score is +Inf or Inf·0 (the sign of q decides). No row outside may be touched.
    assert not torch.isnan(out[0, 0, :20]).any() and not torch.isnan(out[0, 0, 26:]).any()
    if bad != bad:
        assert torch.isnan(out[0, 0, 20:26]).all()
    clean = ~torch.isnan(expected)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(out[clean].double(), expected[clean], rtol=tol, atol=tol)


def test_B1_H4_N1_D256_bf16_decode_row():
    backend_param("cpu")
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(1, 4, 1, 256, generator=gen).bfloat16()
    k = torch.randn(1, 2, 300, 256, generator=gen).bfloat16()
    v = torch.randn(1, 2, 300, 256, generator=gen).bfloat16()
    with attnkernels.backend("cpu"):
        out = attnkernels.attention(q, k, v, causal=True)
    expected, _ = attention_reference(q, k, v, causal=True)
    plain, _ = attention_reference(q, k, v, causal=True, upcast=False)
    assert_within_rule("out", out, expected, plain, torch.bfloat16)


def test_cpu_results_identical_across_thread_counts():
    backend_param("cpu")
    q, k, v = (torch.randn(2, 4, 301, 64, requires_grad=True) for _ in range(3))
    mask = masks.bigbird(301, block_size=32, num_heads=4, seed=1)

    def run(threads):
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            for t in (q, k, v):
                t.grad = None
            with attnkernels.backend("cpu"):
                out = attnkernels.attention(q, k, v, block_mask=mask) + attnkernels.attention(q, k, v, window_size=(40, 7))
                out.sum().backward()
            return [out.detach().clone()] + [t.grad.clone() for t in (q, k, v)]
        finally:
            torch.set_num_threads(previous)

    one, two, two_again = run(1), run(2), run(2)
    for a, b, c in zip(one, two, two_again):
        assert torch.equal(a, b) and torch.equal(b, c)


def test_cpu_concurrent_python_threads_get_correct_results():
    backend_param("cpu")
    problems = [tuple(torch.randn(1, 2, 64 + 7 * i, 32, dtype=torch.float64) for _ in range(3)) for i in range(6)]
    expected = [attention_reference(q, k, v, causal=True)[0] for q, k, v in problems]
    results = [None] * len(problems)

    def worker(i):
        with attnkernels.backend("cpu"):  # the backend choice is thread-local
            for _ in range(5):
                q, k, v = problems[i]
                results[i] = attnkernels.attention(q, k, v, causal=True)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(problems))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(results, expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def _run_child(code: str) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="2")
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_repeated_forward_backward_does_not_grow_rss():
    backend_param("cpu")
    out = _run_child("""
        import psutil, torch, attnkernels
        q, k, v = (torch.randn(1, 2, 256, 32, requires_grad=True) for _ in range(3))
        mask = attnkernels.masks.bigbird(256, block_size=16, num_heads=2, seed=0)
        def step():
            for t in (q, k, v):
                t.grad = None
            out = (attnkernels.attention(q, k, v, causal=True) + attnkernels.attention(q, k, v, window_size=64)
                   + attnkernels.sparse_attention(q, k, v, mask))
            out.sum().backward()
        for _ in range(10):
            step()
        before = psutil.Process().memory_info().rss
        for _ in range(100):
            step()
        print((psutil.Process().memory_info().rss - before) / 2**20)
    """)
    growth_mib = float(out.strip().splitlines()[-1])
    assert growth_mib < 16, f"RSS grew by {growth_mib:.1f} MiB over 100 forward+backward calls"


def test_N65536_window_and_causal_never_allocate_n_by_n():
    """One N×N fp32 score matrix at N=65536 is 16 GiB; the fused paths must stay far below."""
    backend_param("cpu")
    out = _run_child("""
        import torch, attnkernels
        n = 65536
        q, k, v = (torch.randn(1, 1, n, 64, requires_grad=True) for _ in range(3))
        out = attnkernels.attention(q, k, v, window_size=(128, 0))
        out.sum().backward()
        mask = attnkernels.masks.bigbird(n, block_size=64, num_random_blocks=1, seed=0)
        out = attnkernels.sparse_attention(q, k, v, mask)
        out.sum().backward()
        with open("/proc/self/status") as f:
            print([line.split()[1] for line in f if line.startswith("VmHWM")][0])
    """)
    peak_mib = int(out.strip().splitlines()[-1]) / 1024
    assert peak_mib < 2048, f"peak RSS {peak_mib:.0f} MiB at N=65536 (an N×N fp32 buffer alone is 16384 MiB)"
