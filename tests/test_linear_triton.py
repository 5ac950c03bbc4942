"""Triton linear attention (forward + backward) under TRITON_INTERPRET=1 on CPU tensors,
against the float64 reference `attnkernels.linear.reference`.

Tolerance (FlashAttention's rule, as in tests/tolerance.py): the kernel's max error against
the float64 reference may be at most 2x the max error of the same computation done plainly
by PyTorch in the input dtype (the reference run on fp32/fp16 inputs, which computes in
their dtype) plus a floor. Unlike softmax outputs, linear-attention states, unnormalised
outputs and their gradients grow with N (values in the hundreds here), where tolerance.py's
absolute fp32 floor of 1e-5 is below one ulp; so the floor here is the absolute floor plus
about one input-dtype rounding of the largest reference value (REL_FLOOR). That matters
where the chunked kernel sums N/C chunk partials in order while torch's single reduction
sums pairwise (and the interpreter's column sums are sequential); a real bug is orders of
magnitude above it. bf16 is covered by the ahead-of-time compile gate.

Sizes straddle the chunk lengths the launcher ships (C = 64 for fp16/bf16/TF32, 16 for exact
fp32): N = 63, 64, 65 and 200 (4 chunks of 64, 13 of 16), D = 40 padded to 64, Dv != D, GQA
4:2 and 6:2, Nq != Nk non-causal. A 16-long override (`override_chunk(16)`) also cuts the
state pass into 16 x 16 tiles, so D = 40, Dv = 24 spans 3 x 2 state tiles. Exact fp32 at
D or Dv = 128 tiles the output pass by Dv and dq by D (64 wide): covered at D = 128.
"""
from __future__ import annotations

import itertools
import types

import pytest
import torch

from attnkernels.linear import triton_launch as L
from attnkernels.linear import triton_specs
from attnkernels.linear.reference import linear_attention_reference
from tests.tolerance import FACTOR, FLOOR

DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16"}
EPS = 1e-6
# ~ a few ulps (fp32) / one rounding (fp16) of the largest reference value, see the doc
REL_FLOOR = {torch.float32: 1e-6, torch.float16: 1e-3}


# Outputs the kernels allocate are NaN until written (fixture in conftest.py).
pytestmark = pytest.mark.usefixtures("poison_empty")


# ----------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------


def _call(feature_map, causal, normalize, eps, scale, initial_s, initial_z):
    """The call object the launchers take (the ops build the same from their arguments)."""
    return types.SimpleNamespace(feature_map=feature_map, causal=causal, normalize=normalize, eps=eps, scale=scale,
                                 initial_s=initial_s, initial_z=initial_z)


def linear_attention_forward(q, k, v, *options):
    return L.forward(_call(*options), q, k, v)


def linear_attention_backward(dout, q, k, v, *options):
    return L.backward(_call(*options), dout, q, k, v)


def assert_within_rule(name, actual, expected, baseline, dtype):
    """max |actual - expected| <= FACTOR * max |baseline - expected| + floor (see the doc)."""
    expected = expected.detach().double()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite entries (unwritten output?)"
    if expected.numel() == 0:
        return
    error = (actual.double() - expected).abs().max().item()
    baseline_error = (baseline.detach().double() - expected).abs().max().item()
    floor = FLOOR[dtype] + REL_FLOOR[dtype] * expected.abs().max().item()
    bound = FACTOR * baseline_error + floor
    assert error <= bound, f"{name}: max error {error:.3e} > {FACTOR} x same-dtype error {baseline_error:.3e} + {floor:.1e}"


def _case_id(b, hq, hk, nq, nk, d, dv, causal, fm="elu", normalize=True, extra=""):
    n = f"N{nq}" if nq == nk else f"Nq{nq}-Nk{nk}"
    dvs = f"-Dv{dv}" if dv != d else ""
    mode = "causal" if causal else "full"
    norm = "" if normalize else "-nonorm"
    return f"B{b}-Hq{hq}-Hk{hk}-{n}-D{d}{dvs}-{mode}-{fm}{norm}{extra}"


def _inputs(shape, fm, normalize, dtype, with_state):
    b, hq, hk, nq, nk, d, dv = shape
    q = torch.randn(b, hq, nq, d).to(dtype)
    k = torch.randn(b, hk, nk, d).to(dtype)
    v = torch.randn(b, hk, nk, dv).to(dtype)
    if fm == "identity" and normalize:
        # identity means "φ already applied": give it positive features, as a caller would,
        # so the denominator stays away from 0
        q, k = q.abs(), k.abs()
    state = None
    if with_state:
        # a state as a previous call would leave it: z = Σ φ(k) >= 0
        state = (torch.randn(b, hk, d, dv) * 4, torch.rand(b, hk, d) * 8)
    return q, k, v, state


def run_case(shape, causal, dtype, fm="elu", normalize=True, with_state=False, backward=True, scale=0.3):
    b, hq, hk, nq, nk, d, dv = shape
    q, k, v, state = _inputs(shape, fm, normalize, dtype, with_state)
    s0, z0 = state if state is not None else (None, None)
    kw = dict(feature_map=fm, causal=causal, normalize=normalize, eps=EPS, scale=scale)

    out, s, z = linear_attention_forward(q, k, v, fm, causal, normalize, EPS, scale, s0, z0)
    assert out.dtype == dtype and out.shape == (b, hq, nq, dv)
    assert s.dtype == torch.float32 and s.shape == (b, hk, d, dv)
    assert z.dtype == torch.float32 and z.shape == (b, hk, d)

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    st64 = tuple(t.double() for t in state) if state is not None else None
    out64, (s64, z64) = linear_attention_reference(q64, k64, v64, initial_state=st64, **kw)
    qs, ks, vs = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out_s, (s_s, z_s) = linear_attention_reference(qs, ks, vs, initial_state=state, **kw)
    assert_within_rule("out", out, out64, out_s, dtype)
    # the state is float32 for every input dtype: its plain counterpart is the fp32 sum
    st32 = tuple(t.float() for t in state) if state is not None else None
    _, (s_32, z_32) = linear_attention_reference(q.float(), k.float(), v.float(), initial_state=st32, **kw)
    assert_within_rule("final S", s, s64, s_32, torch.float32)
    assert_within_rule("final z", z, z64, z_32, torch.float32)
    if not backward:
        return
    dout = torch.randn(b, hq, nq, dv).to(dtype)
    out64.backward(dout.double())
    out_s.backward(dout)
    dq, dk, dv_ = linear_attention_backward(dout, q, k, v, fm, causal, normalize, EPS, scale, s0, z0)
    for name, got, g64, gs in (("dq", dq, q64.grad, qs.grad), ("dk", dk, k64.grad, ks.grad),
                               ("dv", dv_, v64.grad, vs.grad)):
        assert got.dtype == dtype and got.shape == g64.shape, name
        assert_within_rule(name, got, g64, gs, dtype)


# ----------------------------------------------------------------------------------------
# the main grid: causal and not, chunk edges, padded D, Dv != D, GQA, Nq != Nk
# ----------------------------------------------------------------------------------------

# (B, Hq, Hk, Nq, Nk, D, Dv); causal cases have Nq == Nk
CAUSAL_SHAPES = [
    (1, 2, 2, 1, 1, 16, 16),
    (2, 4, 2, 63, 63, 16, 24),  # GQA 4:2, B > 1, Dv != D, one row short of a 64-chunk
    (1, 2, 1, 64, 64, 32, 32),  # exactly one 64-chunk (MQA)
    (1, 2, 2, 65, 65, 40, 16),  # one row into the second chunk, D padded to 64
    (1, 6, 2, 200, 200, 16, 16),  # GQA 6:2, 4 chunks of 64 (13 of 16), the last ragged
    (1, 2, 1, 40, 40, 128, 72),  # D = 128: exact fp32 dq in D tiles
]
FULL_SHAPES = [
    (1, 2, 2, 1, 1, 16, 16),
    (2, 4, 2, 63, 100, 16, 24),  # Nq < Nk, GQA
    (1, 2, 1, 65, 64, 40, 32),  # Nq > Nk, padded D
    (1, 1, 1, 200, 37, 32, 16),
    (1, 2, 1, 40, 33, 72, 128),  # Dv = 128: exact fp32 output in Dv tiles
]
GRID = [(s, True) for s in CAUSAL_SHAPES] + [(s, False) for s in FULL_SHAPES]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("shape,causal", GRID, ids=[_case_id(*s, c) for s, c in GRID])
def test_linear_matches_reference(shape, causal, dtype):
    run_case(shape, causal, dtype)


# feature maps x normalize, and many chunks (C = 16: N = 200 spans 13 chunks, the last ragged)
MAP_CASES = [(fm, norm, causal) for fm in ("elu", "relu", "identity") for norm in (True, False)
             for causal in (True, False)]
MAP_SHAPE = (1, 2, 1, 200, 200, 16, 24)


@pytest.mark.parametrize("fm,normalize,causal", MAP_CASES,
                         ids=[_case_id(*MAP_SHAPE, c, fm, n, "-C16") for fm, n, c in MAP_CASES])
def test_feature_maps_many_chunks(fm, normalize, causal):
    with L.override_chunk(16):
        run_case(MAP_SHAPE, causal, torch.float32, fm=fm, normalize=normalize)


FP16_MAP_CASES = [(fm, norm) for fm in ("elu", "relu", "identity") for norm in (True, False)]


@pytest.mark.parametrize("fm,normalize", FP16_MAP_CASES,
                         ids=[_case_id(1, 2, 1, 130, 130, 16, 24, True, fm, n, "-fp16") for fm, n in FP16_MAP_CASES])
def test_feature_maps_fp16(fm, normalize):
    """The 16-bit paths (φ rounded to fp16 for the dots; elu's split state sum) over 3 chunks of 64."""
    run_case((1, 2, 1, 130, 130, 16, 24), True, torch.float16, fm=fm, normalize=normalize)


# sm_80's tiles (the interpreter runs sm_90a's by default), made the launch's by the arch
# hook: 16-bit causal passes on 4 warps, the output pass in 64-wide Dv tiles and dq in
# 32-wide D tiles at 128 (P recomputed per tile); chunk edges N = 63, 64, 65 and GQA
SM80_CASES = [
    ((1, 4, 2, 65, 65, 128, 128), True),  # B1-Hq4-Hk2-N65-D128-causal: 4 dq D tiles, 2 Dv tiles
    ((1, 2, 1, 63, 63, 128, 72), True),
    ((2, 2, 2, 64, 64, 64, 64), True),
    ((1, 4, 2, 65, 97, 128, 128), False),
]


@pytest.mark.parametrize("shape,causal", SM80_CASES, ids=[_case_id(*s, c, extra="-sm80") for s, c in SM80_CASES])
def test_sm80_tiles_match_reference(shape, causal, monkeypatch):
    monkeypatch.setattr(L, "device_arch", lambda device: 80)
    d = shape[5]
    if causal and d == 128:
        assert L.chunk_config("dq", d, d, torch.float16, True, arch=80).block_m == 32
    run_case(shape, causal, torch.float16)


# ----------------------------------------------------------------------------------------
# state: initial state in, final state out; two calls == one call on the concatenation
# ----------------------------------------------------------------------------------------

STATE_CASES = [((2, 2, 1, 65, 65, 16, 24), True), ((1, 2, 1, 33, 70, 40, 16), False)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("shape,causal", STATE_CASES, ids=[_case_id(*s, c, extra="-state") for s, c in STATE_CASES])
def test_initial_state(shape, causal, dtype):
    run_case(shape, causal, dtype, with_state=True)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_state_tiles(causal):
    """State-pass tiles of 16 x 16: D = 40, Dv = 24 spans 3 x 2 tiles; with a carried state, GQA."""
    with L.override_chunk(16):
        run_case((1, 4, 2, 70, 70 if causal else 45, 40, 24), causal, torch.float32, with_state=True)


def test_long_forward_fp32():
    """N = 1000: 63 chunks of 16 in the serial state pass (forward only: the interpreter is slow)."""
    run_case((1, 1, 1, 1000, 1000, 16, 16), True, torch.float32, backward=False)


def test_fp16_gradients_with_a_large_denominator():
    """1/den below fp16's normal range (den ~ 1e6, as at N ~ 10^4 tokens): g = R·do/den is
    scaled by a power of two into range. Without R, g would be fp16 subnormals with a few
    bits, errors of percents; with it the kernel stays within fp16 rounding of float64."""
    b, hq, hk, n, d, dv = 1, 2, 1, 65, 16, 16
    q, k, v = torch.randn(b, hq, n, d).half(), torch.randn(b, hk, n, d).half(), torch.randn(b, hk, n, dv).half()
    s0, z0 = torch.randn(b, hk, d, dv) * 1e4, torch.full((b, hk, d), 5e4)  # S0 within fp16 range
    dout = torch.randn(b, hq, n, dv).half()
    dq, dk, dv_ = linear_attention_backward(dout, q, k, v, "elu", True, True, EPS, 0.3, s0, z0)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    out64, _ = linear_attention_reference(q64, k64, v64, feature_map="elu", causal=True, eps=EPS, scale=0.3,
                                          initial_state=(s0.double(), z0.double()))
    out64.backward(dout.double())
    for name, got, ref in (("dq", dq, q64.grad), ("dk", dk, k64.grad), ("dv", dv_, v64.grad)):
        rel = ((got.double() - ref).abs().max() / ref.abs().max()).item()
        assert torch.isfinite(got).all() and rel < 1e-2, f"{name}: relative error {rel:.2e}"


@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "nonorm"])
def test_state_carries_across_calls(normalize):
    """Causal over [x1; x2] == causal over x1, then x2 from x1's final state."""
    b, hq, hk, n1, n2, d, dv = 1, 4, 2, 50, 31, 16, 24
    q, k = torch.randn(b, hq, n1 + n2, d), torch.randn(b, hk, n1 + n2, d)
    v = torch.randn(b, hk, n1 + n2, dv)
    args = ("elu", True, normalize, EPS, 0.5)
    out, s, z = linear_attention_forward(q, k, v, *args, None, None)
    out1, s1, z1 = linear_attention_forward(q[:, :, :n1], k[:, :, :n1], v[:, :, :n1], *args, None, None)
    out2, s2, z2 = linear_attention_forward(q[:, :, n1:], k[:, :, n1:], v[:, :, n1:], *args, s1, z1)
    close = dict(rtol=1e-5, atol=1e-5 * out.abs().max().item())  # nonorm outputs reach the hundreds
    torch.testing.assert_close(torch.cat([out1, out2], 2), out, **close)
    torch.testing.assert_close(s2, s, rtol=1e-5, atol=1e-5 * s.abs().max().item())
    torch.testing.assert_close(z2, z, rtol=1e-5, atol=1e-5 * z.abs().max().item())
    # non-causal: the state after x2 from x1's state is the state of the concatenation
    _, s1f, z1f = linear_attention_forward(q, k[:, :, :n1], v[:, :, :n1], "elu", False, normalize, EPS, 0.5, None, None)
    _, s2f, z2f = linear_attention_forward(q, k[:, :, n1:], v[:, :, n1:], "elu", False, normalize, EPS, 0.5, s1f, z1f)
    torch.testing.assert_close(s2f, s, rtol=1e-5, atol=1e-5 * s.abs().max().item())
    torch.testing.assert_close(z2f, z, rtol=1e-5, atol=1e-5 * z.abs().max().item())


# ----------------------------------------------------------------------------------------
# determinism, layouts, edge sizes, bad input
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_deterministic(causal):
    q, k, v = torch.randn(1, 4, 40, 16), torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 24)
    s0, z0 = torch.randn(1, 2, 16, 24), torch.rand(1, 2, 16)
    dout = torch.randn(1, 4, 40, 24)
    with L.override_chunk(16):
        runs = [linear_attention_forward(q, k, v, "elu", causal, True, EPS, 0.25, s0, z0)
                + linear_attention_backward(dout, q, k, v, "elu", causal, True, EPS, 0.25, s0, z0)
                for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_non_contiguous_inputs():
    """(B, N, H, D) storage seen as (B, H, N, D): strided heads and rows."""
    q, k = torch.randn(1, 37, 4, 16).transpose(1, 2), torch.randn(1, 37, 2, 16).transpose(1, 2)
    v = torch.randn(1, 37, 2, 24).transpose(1, 2)
    for causal in (True, False):
        out, s, z = linear_attention_forward(q, k, v, "elu", causal, True, EPS, 0.25, None, None)
        ref, (rs, rz) = linear_attention_reference(q.double(), k.double(), v.double(), causal=causal, scale=0.25)
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(s.double(), rs, rtol=1e-5, atol=1e-5)
        dq, dk, dv = linear_attention_backward(torch.ones(1, 4, 37, 24), q, k, v, "elu", causal, True, EPS, 0.25, None, None)
        assert all(torch.isfinite(g).all() for g in (dq, dk, dv))


def test_empty_queries_non_causal():
    """Nq = 0: no output rows, but the state still sums every key; dk = dv = 0."""
    q, k, v = torch.randn(1, 2, 0, 16), torch.randn(1, 2, 9, 16), torch.randn(1, 2, 9, 16)
    out, s, z = linear_attention_forward(q, k, v, "elu", False, True, EPS, 1.0, None, None)
    _, (rs, rz) = linear_attention_reference(q.double(), k.double(), v.double())
    assert out.shape == (1, 2, 0, 16)
    torch.testing.assert_close(s.double(), rs, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(z.double(), rz, rtol=1e-6, atol=1e-6)
    dq, dk, dv = linear_attention_backward(torch.randn(1, 2, 0, 16), q, k, v, "elu", False, True, EPS, 1.0, None, None)
    assert torch.equal(dk, torch.zeros_like(dk)) and torch.equal(dv, torch.zeros_like(dv))


def test_bad_input():
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(TypeError, match="float64"):
        linear_attention_forward(q.double(), q.double(), q.double(), "elu", False, True, EPS, 1.0, None, None)
    with pytest.raises(ValueError, match="initial state"):
        linear_attention_forward(q, q, q, "elu", True, True, EPS, 1.0, torch.zeros(1, 2, 16, 8), torch.zeros(1, 2, 16))
    with pytest.raises(ValueError, match="Nq == Nk"):
        linear_attention_forward(q, q[:, :, :4], q[:, :, :4], "elu", True, True, EPS, 1.0, None, None)


# ----------------------------------------------------------------------------------------
# the ahead-of-time compile declarations
# ----------------------------------------------------------------------------------------


def test_aot_specs_cover_the_shipping_variants():
    names = {s.name for s in triton_specs.AOT_SPECS}
    for kernel in ("linear_fwd", "linear_dq", "linear_dkdv", "linear_state-fwd"):
        for label in ("fp16", "bf16", "fp32"):
            for d in (64, 128):
                for mode in ("causal", "full"):
                    for fm in ("elu", "relu", "identity"):
                        assert any(n.startswith(f"{kernel}-{label}-D{d}-{mode}-{fm}-") for n in names), (kernel, label, d, mode, fm)
                    if kernel != "linear_state-fwd":
                        assert any(n.startswith(f"{kernel}-{label}-D{d}-{mode}-elu-nonorm-") for n in names)
    for kernel in ("linear_fwd-den", "linear_state-rev"):
        for mode in ("causal", "full"):
            assert any(n.startswith(f"{kernel}-fp16-D64-{mode}-") for n in names)
    for spec in triton_specs.AOT_SPECS:
        c = spec.constexprs
        assert all(v >= 16 for n, v in c.items() if n.startswith("BLOCK_")), spec.name
        assert set(spec.signature) >= set(c) and all(spec.signature[n] == "constexpr" for n in c), spec.name
        assert not spec.waive, spec.name  # no gate waiver: every tile at 1.0x-1.5x the minimum MMA work
        if spec.dtype in ("fp16", "bf16"):  # 16-bit: 64-row chunks (wgmma m64), 64 x 64 state tiles
            assert c["BLOCK_C"] >= 64, spec.name
            if "BLOCK_M" in c:
                assert c["BLOCK_M"] >= 64 and c["BLOCK_V"] >= 64, spec.name
        if spec.fn.__name__ == "linear_chunk_state":
            assert spec.num_stages >= 2, spec.name  # the serial chunk loop is pipelined


def test_configs_are_gpu_sized():
    for dtype, arch, d in itertools.product((torch.float16, torch.bfloat16, torch.float32), (80, 90), (16, 32, 40, 64, 128)):
        cfgs = {kernel: L.chunk_config(kernel, d, d, dtype, arch=arch) for kernel in L.KERNELS}
        # the passes exchange per-chunk states: one chunk length per call, whatever the arch
        assert len({cfg.block_c for cfg in cfgs.values()}) == 1, (dtype, d)
        assert cfgs["state"].block_c == L.chunk_config("state", d, d, dtype, arch=90).block_c
        for kernel, cfg in cfgs.items():
            assert cfg.block_c >= 16 and cfg.block_c & (cfg.block_c - 1) == 0
            assert cfg.block_m >= 16 and cfg.block_v >= 16
            assert cfg.num_warps * cfg.maxnreg <= 8 * 255, (kernel, d)  # launchable: 64K registers per SM
        if dtype != torch.float32:
            assert cfgs["state"].block_c >= 64
            if arch == 80:  # causal [C, C] products feeding a dot: at most one 16-row mma slice per warp
                for kernel in ("fwd", "dq") + (("dkdv",) if d <= 64 else ()):
                    assert cfgs[kernel].num_warps * 16 <= cfgs[kernel].block_c, (kernel, d, dtype)
            if d >= 64:
                assert cfgs["state"].block_m >= 64 and cfgs["state"].block_v >= 64
        assert cfgs["state"].num_stages >= 2
