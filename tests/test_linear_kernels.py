"""Linear-attention kernels (reference, C++, Triton) against the float64 reference.

Every backend runs the same cases through the public API; the expected values
are the reference's literal sums in float64, with gradients by autograd through
them. Chunk edges (the C++ and Triton kernels work in chunks of 64 rows) are
covered by N in {1, 63, 64, 65, 1000}.
"""
import pytest
import torch

import attnkernels
from attnkernels.linear.reference import linear_attention_reference

from .backend_params import backend_param
from .linear_helpers import (  # noqa: F401  (one_torch_thread is an autouse fixture)
    LINEAR_BACKENDS, assert_close_to_oracle, case_id, linear_backend_or_skip, make_qkv, make_state, one_torch_thread, reference_with_grads,
)

# (B, Hq, Hk, Nq, Nk, D, Dv, causal)
CASES = [
    (2, 4, 4, 1, 1, 16, 16, True),
    (2, 4, 4, 1, 1, 16, 16, False),
    (2, 4, 4, 63, 63, 16, 16, True),
    (2, 4, 4, 64, 64, 16, 16, True),
    (2, 4, 4, 65, 65, 16, 16, True),
    (2, 4, 4, 65, 65, 16, 16, False),
    (1, 2, 2, 1000, 1000, 16, 16, True),
    (1, 2, 2, 1000, 1000, 16, 16, False),
    (1, 6, 2, 130, 130, 16, 24, True),     # GQA, Dv != D, two full chunks + 2
    (1, 4, 1, 70, 70, 60, 7, False),       # MQA, odd D and Dv
    (2, 2, 2, 37, 101, 16, 16, False),     # Nq != Nk
    (2, 2, 1, 100, 9, 8, 12, False),       # more queries than keys
]

# The Triton interpreter takes seconds per call: the Triton backend runs a subset of the
# cases here (chunk edges 1/63/64/65, GQA, Nq != Nk), its own test file covers the rest.
TRITON_CASES = {case_id(*c) for c in CASES if max(c[3], c[4]) <= 200 and c[3] != 64}


def _skip_slow_triton(backend, case):
    if backend == "triton" and case_id(*case) not in TRITON_CASES:
        pytest.skip("case left to the Triton kernels' own tests (the interpreter is slow)")


def _dtype_for(backend):
    return torch.float32 if backend == "triton" else torch.float64


def _run(q, k, v, dout, backend, **kwargs):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    with attnkernels.backend(backend):
        out, state = attnkernels.linear_attention(q, k, v, return_final_state=True, **kwargs)
        grads = torch.autograd.grad(out, (q, k, v), dout)
    return out.detach(), state, grads


def _compare(backend, q, k, v, dtype, **kwargs):
    """Run `backend` in `dtype` and check out, final state and dq/dk/dv against the oracle."""
    q64, k64, v64 = (t.double() for t in (q, k, v))
    dout64 = torch.randn(q.shape[0], q.shape[1], q.shape[2], v.shape[-1], dtype=torch.float64)
    state64 = kwargs.pop("initial_state", None)
    ref_kwargs = dict(kwargs, initial_state=state64)
    out64, (s64, z64), grads64 = reference_with_grads(q64, k64, v64, dout64, **ref_kwargs)
    state = None if state64 is None else tuple(t.to(torch.float64 if dtype == torch.float64 else torch.float32) for t in state64)
    qd, kd, vd, doutd = (t.to(dtype) for t in (q64, k64, v64, dout64))
    out, (s, z), grads = _run(qd, kd, vd, doutd, backend, initial_state=state, **kwargs)
    base_out, (base_s, base_z), base_grads = (None, (None, None), (None,) * 3)
    if dtype != torch.float64:
        base_state = None if state is None else tuple(t.to(dtype) for t in state)
        base_out, (base_s, base_z), base_grads = reference_with_grads(qd, kd, vd, doutd, **dict(kwargs, initial_state=base_state))
    assert out.dtype == dtype and s.dtype == z.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert not s.requires_grad and not z.requires_grad
    assert_close_to_oracle("out", out, out64, dtype, base_out)
    assert_close_to_oracle("final S", s, s64, dtype, base_s)
    assert_close_to_oracle("final z", z, z64, dtype, base_z)
    for name, g, e, bg in zip(("dq", "dk", "dv"), grads, grads64, base_grads):
        assert g.dtype == dtype
        assert_close_to_oracle(name, g, e, dtype, bg)


@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "nonorm"])
@pytest.mark.parametrize("case", CASES, ids=[case_id(*c) for c in CASES])
@pytest.mark.parametrize("backend", LINEAR_BACKENDS)
def test_elu_matches_reference(backend, case, normalize):
    backend_param(backend, "linear")
    _skip_slow_triton(backend, case)
    if backend == "triton" and not normalize and case_id(*case) != "B2-H4-N65-D16-causal":
        pytest.skip("normalize=False on Triton: one case here, the rest in its own tests (the interpreter is slow)")
    b, hq, hk, nq, nk, d, dv, causal = case
    q, k, v = make_qkv(b, hq, hk, nq, nk, d, dv)
    _compare(backend, q, k, v, _dtype_for(backend), feature_map="elu", causal=causal, normalize=normalize)


FEATURE_CASES = [(2, 4, 2, 65, 65, 16, 12, True), (1, 2, 2, 70, 33, 16, 16, False)]


@pytest.mark.parametrize("feature_map", ["relu", "identity"])
@pytest.mark.parametrize("case", FEATURE_CASES, ids=[case_id(*c) for c in FEATURE_CASES])
@pytest.mark.parametrize("backend", LINEAR_BACKENDS)
def test_relu_identity_and_scale(backend, case, feature_map):
    backend_param(backend, "linear")
    if backend == "triton" and case != FEATURE_CASES[0]:
        pytest.skip("case left to the Triton kernels' own tests (the interpreter is slow)")
    b, hq, hk, nq, nk, d, dv, causal = case
    # identity with normalize=True needs non-negative features (refused otherwise)
    q, k, v = make_qkv(b, hq, hk, nq, nk, d, dv, positive=feature_map == "identity")
    for normalize in (True, False) if backend != "triton" else (True,):
        _compare(backend, q, k, v, _dtype_for(backend), feature_map=feature_map, causal=causal, normalize=normalize, scale=0.37)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("backend", LINEAR_BACKENDS)
def test_initial_state_matches_reference(backend, causal):
    linear_backend_or_skip(backend, causal, "non-causal state on Triton is left to its own tests (the interpreter is slow)")
    q, k, v = make_qkv(2, 4, 2, 65, 65, 16, 8)
    state = make_state(2, 2, 16, 8)
    for normalize in (True, False):
        _compare(backend, q, k, v, _dtype_for(backend), causal=causal, normalize=normalize, initial_state=state, eps=1e-3)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("backend", LINEAR_BACKENDS)
def test_streaming_in_pieces_equals_whole(backend, causal):
    """Pieces of 63 + 2 + 64 + 1 tokens, each starting from the last one's final state."""
    backend_param(backend, "linear")
    dtype = _dtype_for(backend)
    q, k, v = make_qkv(1, 4, 2, 130, 130, 16, 16, dtype=dtype)
    with attnkernels.backend(backend):
        whole, whole_state = attnkernels.linear_attention(q, k, v, causal=causal, return_final_state=True)
        state, outs, start = None, [], 0
        for length in (63, 2, 64, 1):
            piece = slice(start, start + length)
            out, state = attnkernels.linear_attention(
                q[:, :, piece], k[:, :, piece], v[:, :, piece], causal=causal, initial_state=state, return_final_state=True
            )
            outs.append(out)
            start += length
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(state.S, whole_state.S, **tol)
    torch.testing.assert_close(state.z, whole_state.z, **tol)
    if causal:  # non-causal pieces see only their own keys plus the past, by design
        torch.testing.assert_close(torch.cat(outs, dim=2), whole, **tol)


@pytest.mark.parametrize("backend", LINEAR_BACKENDS)
def test_step_by_step_decode_equals_causal(backend):
    backend_param(backend, "linear")
    dtype = _dtype_for(backend)
    n = 9 if backend == "triton" else 70
    q, k, v = make_qkv(2, 4, 2, n, n, 16, 8, dtype=dtype)
    with attnkernels.backend(backend):
        whole, whole_state = attnkernels.linear_attention(q, k, v, causal=True, return_final_state=True)
        state, outs = None, []
        for t in range(n):
            out, state = attnkernels.linear_attention_step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], state)
            outs.append(out)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.cat(outs, dim=2), whole, **tol)
    torch.testing.assert_close(state.S, whole_state.S, **tol)


def _positive_features(x):
    """An elementwise-then-widened map, M = D + 3, to check M != D end to end."""
    return torch.cat([torch.nn.functional.elu(x) + 1, torch.sigmoid(x[..., :3])], dim=-1)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("backend", LINEAR_BACKENDS)
def test_callable_features_with_m_not_d(backend, causal):
    backend_param(backend, "linear")
    dtype = _dtype_for(backend)
    q, k, v = make_qkv(1, 2, 2, 65, 65, 12, 5)
    dout = torch.randn(1, 2, 65, 5, dtype=torch.float64)
    _, (s64, _), grads64 = reference_with_grads(q, k, v, dout, feature_map=_positive_features, causal=causal)
    out64 = linear_attention_reference(q, k, v, feature_map=_positive_features, causal=causal)[0]
    out, (s, z), grads = _run(q.to(dtype), k.to(dtype), v.to(dtype), dout.to(dtype), backend,
                              feature_map=_positive_features, causal=causal)
    assert s.shape == (1, 2, 15, 5) and z.shape == (1, 2, 15)
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-4)
    torch.testing.assert_close(out.double(), out64, **tol)
    torch.testing.assert_close(s.double(), s64, **tol)
    for g, e in zip(grads, grads64):
        torch.testing.assert_close(g.double(), e, **tol)


# --- dtypes on the compiled kernels: fp32/bf16/fp16 on C++, fp32/fp16 under the Triton interpreter
DTYPE_CASES = [(2, 4, 2, 65, 65, 16, 16, True), (1, 2, 2, 200, 200, 32, 32, True), (2, 2, 2, 65, 90, 16, 24, False)]
DTYPE_BY_BACKEND = [("cpu", torch.float32), ("cpu", torch.bfloat16), ("cpu", torch.float16),
                    pytest.param("triton", torch.float32, marks=pytest.mark.slow),
                    pytest.param("triton", torch.float16, marks=pytest.mark.slow)]


@pytest.mark.parametrize("case", DTYPE_CASES, ids=[case_id(*c) for c in DTYPE_CASES])
@pytest.mark.parametrize("backend,dtype", DTYPE_BY_BACKEND,
                         ids=["cpu-float32", "cpu-bfloat16", "cpu-float16", "triton-float32", "triton-float16"])
def test_low_precision_within_flash_rule(backend, dtype, case):
    """Error vs the fp64 oracle at most 2x the reference's own error in that dtype (+ a small floor)."""
    backend_param(backend, "linear")
    if backend == "triton" and case != DTYPE_CASES[2 if dtype == torch.float32 else 0]:
        pytest.skip("case left to the Triton kernels' own tests (the interpreter is slow)")
    b, hq, hk, nq, nk, d, dv, causal = case
    q, k, v = make_qkv(b, hq, hk, nq, nk, d, dv)
    _compare(backend, q, k, v, dtype, causal=causal, normalize=True)
    _compare(backend, q, k, v, dtype, causal=causal, normalize=False, initial_state=make_state(b, hk, d, dv))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_gradcheck_float64(backend, causal):
    backend_param(backend, "linear")
    q, k, v = make_qkv(1, 4, 2, 11, 11, 5, 3)
    state = make_state(1, 2, 5, 3)
    inputs = tuple(t.requires_grad_() for t in (q, k, v))

    def fn(q, k, v):
        return attnkernels.linear_attention(q, k, v, causal=causal, initial_state=state, scale=0.8, eps=1e-2)

    with attnkernels.backend(backend):
        assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-6, fast_mode=True)


def test_cpu_deterministic_across_thread_counts():
    backend_param("cpu", "linear")
    q, k, v = make_qkv(2, 4, 2, 300, 300, 32, 32, dtype=torch.float32)
    dout = torch.randn(2, 4, 300, 32)
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for causal in (True, False):
                results.append((threads, causal, _run(q, k, v, dout, "cpu", causal=causal)))
    finally:
        torch.set_num_threads(1)
    for (_, causal_a, (out_a, st_a, gr_a)), (_, causal_b, (out_b, st_b, gr_b)) in zip(results[:2], results[2:]):
        assert causal_a == causal_b
        for a, b in zip((out_a, *st_a, *gr_a), (out_b, *st_b, *gr_b)):
            assert torch.equal(a, b)


# --- the C++ causal backward at the head dims the kernels are used with: D in {40, 64, 128},
# chunk edges (63, 64, 65, 97, 1000 rows), GQA, Dv != D, with and without the normaliser and
# a carried state, in float64 (tight), float32 and bfloat16 (FlashAttention's rule).
WIDE_CASES = [
    (1, 4, 2, 97, 97, 40, 40, True),      # GQA, D = 40, one full chunk + 33
    (1, 2, 2, 63, 63, 64, 64, True),
    (1, 2, 2, 64, 64, 64, 64, True),
    (1, 3, 1, 65, 65, 128, 96, True),     # MQA, D = 128, Dv != D
    (1, 2, 2, 1000, 1000, 64, 64, True),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["float64", "float32", "bfloat16"])
@pytest.mark.parametrize("case", WIDE_CASES, ids=[case_id(*c) for c in WIDE_CASES])
def test_cpu_causal_backward_head_dims(case, dtype):
    backend_param("cpu", "linear")
    b, hq, hk, nq, nk, d, dv, causal = case
    q, k, v = make_qkv(b, hq, hk, nq, nk, d, dv)
    _compare("cpu", q, k, v, dtype, causal=causal, normalize=True)
    _compare("cpu", q, k, v, dtype, causal=causal, normalize=False)
    _compare("cpu", q, k, v, dtype, causal=causal, normalize=True, initial_state=make_state(b, hk, d, dv), eps=1e-3)


# --- bf16 on the matrix units (AMX tiles, or vdpbf16ps on AVX512-BF16 without AMX: csrc/linear.cpp
# mx_gemm rounds each product's operands to bf16, fp32 accumulation and state; the triangular
# intra-chunk products skip their zero halves) and forced onto the fp32 products (ATTNKERNELS_CPU_NO_AMX=1),
# both within FlashAttention's rule: odd N and N not a multiple of the 64-row chunk, GQA / MQA,
# odd D and Dv (an odd GEMM K gets a zero VNNI pad), Nq != Nk, a carried state, key padding.
MX_CASES = [
    (1, 2, 2, 97, 97, 64, 64, True),       # B1-H2-N97-D64-causal: one chunk + 33 rows
    (2, 4, 2, 130, 130, 40, 40, True),     # GQA 4:2, D 40, two chunks + 2
    (1, 3, 1, 65, 65, 33, 17, True),       # MQA, odd D and Dv
    (1, 2, 2, 1000, 1000, 64, 64, True),   # 15 chunks + 40 rows of carried state
    (2, 2, 2, 65, 90, 16, 24, False),      # non-causal, Nq != Nk
]


@pytest.fixture(params=["16bit", "upcast"])
def gemm_path(request, monkeypatch):
    """The CPU kernels' GEMM path under test: 16-bit operands (AMX, or AVX512-BF16 without it)
    where the CPU has them, or forced to the fp32 products (ATTNKERNELS_CPU_NO_AMX=1)."""
    if request.param == "upcast":
        monkeypatch.setenv("ATTNKERNELS_CPU_NO_AMX", "1")
    else:
        monkeypatch.delenv("ATTNKERNELS_CPU_NO_AMX", raising=False)
    return request.param


@pytest.mark.parametrize("case", MX_CASES, ids=[case_id(*c) for c in MX_CASES])
def test_cpu_bf16_matrix_units_and_upcast(case, gemm_path):
    backend_param("cpu", "linear")
    b, hq, hk, nq, nk, d, dv, causal = case
    q, k, v = make_qkv(b, hq, hk, nq, nk, d, dv)
    _compare("cpu", q, k, v, torch.bfloat16, causal=causal, normalize=True)
    _compare("cpu", q, k, v, torch.bfloat16, causal=causal, normalize=False, initial_state=make_state(b, hk, d, dv))


def test_cpu_bf16_key_padding_B2_H4_N97_D64_causal(gemm_path):
    """Key padding zeroes padded keys' features and values before the kernel: bf16 on both GEMM paths."""
    backend_param("cpu", "linear")
    q, k, v = make_qkv(2, 4, 4, 97, 97, 64, 64)
    mask = torch.zeros(2, 97, dtype=torch.bool)
    mask[0, 80:] = True
    mask[1, ::7] = True
    dout = torch.randn(2, 4, 97, 64, dtype=torch.float64)
    keep = ~mask[:, None, :, None]

    def masked_reference(q, k, v, dout):
        """The literal sums over the kept keys: elu+1 features, padded keys' features and values zeroed."""
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        fq, fk = (torch.nn.functional.elu(t) + 1 for t in leaves[:2])
        out, _ = linear_attention_reference(fq, fk * keep, leaves[2] * keep, feature_map="identity", causal=True)
        return out.detach(), torch.autograd.grad(out, leaves, dout.to(out.dtype))

    out64, grads64 = masked_reference(q, k, v, dout)
    qd, kd, vd, doutd = (t.to(torch.bfloat16) for t in (q, k, v, dout))
    base_out, base_grads = masked_reference(qd, kd, vd, doutd)
    out, _, grads = _run(qd, kd, vd, doutd, "cpu", causal=True, key_padding_mask=mask)
    assert_close_to_oracle("out", out, out64, torch.bfloat16, base_out)
    for name, g, e, bg in zip(("dq", "dk", "dv"), grads, grads64, base_grads):
        assert_close_to_oracle(name, g, e, torch.bfloat16, bg)


def test_cpu_bf16_deterministic_across_thread_counts_B2_H4_N300_D32(monkeypatch):
    """The bf16 matrix-unit path keeps a fixed summation order per (batch, kv head): 1 and 2 threads agree bitwise."""
    backend_param("cpu", "linear")
    monkeypatch.delenv("ATTNKERNELS_CPU_NO_AMX", raising=False)
    q, k, v = make_qkv(2, 4, 2, 300, 300, 32, 32, dtype=torch.bfloat16)
    dout = torch.randn(2, 4, 300, 32, dtype=torch.bfloat16)
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for causal in (True, False):
                results.append(_run(q, k, v, dout, "cpu", causal=causal))
    finally:
        torch.set_num_threads(1)
    for (out_a, st_a, gr_a), (out_b, st_b, gr_b) in zip(results[:2], results[2:]):
        for a, b in zip((out_a, *st_a, *gr_a), (out_b, *st_b, *gr_b)):
            assert torch.equal(a, b)


# --- the causal kernels carry the state without V's ones column (S [M, Dv rounded up to the
# vector width], z apart): Dv a whole number of vectors (no padding column left over for the
# ones, where the non-causal kernels keep theirs), GQA 4:2, two chunks + 2 rows, a carried
# state and the final state, with and without the normaliser; fp32 and bf16 on both GEMM paths.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_cpu_causal_split_state_B2_H4_N130_D48_Dv32_gqa(dtype, gemm_path):
    backend_param("cpu", "linear")
    q, k, v = make_qkv(2, 4, 2, 130, 130, 48, 32)
    for normalize in (True, False):
        _compare("cpu", q, k, v, dtype, causal=True, normalize=normalize)
        _compare("cpu", q, k, v, dtype, causal=True, normalize=normalize, initial_state=make_state(2, 2, 48, 32), eps=1e-3)
    _compare("cpu", q, k, v, dtype, causal=True, feature_map="relu")
