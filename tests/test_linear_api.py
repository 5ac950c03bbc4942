"""The public linear-attention API: custom-op registration, compile, Performer features, bad input.

Kernel accuracy per backend lives in test_linear_kernels.py; this file checks the
plumbing every backend shares and the FAVOR+ features.
"""
import math

import pytest
import torch

import attnkernels
from attnkernels.linear import LinearAttentionState, PerformerFeatures, linear_attention, linear_attention_step
from attnkernels.linear.reference import linear_attention_reference
from attnkernels.linear.reference import linear_attention_reference_backward

from .backend_params import backend_param
from .linear_helpers import LINEAR_BACKENDS, linear_backend_or_skip, make_qkv, make_state, one_torch_thread  # noqa: F401


def _dtype_for(backend):
    return torch.float32 if backend == "triton" else torch.float64


# --- the reference backward formulas (used by the "reference" backend's bwd op)

FORMULA_CASES = [
    dict(causal=False), dict(causal=True), dict(causal=True, normalize=False), dict(feature_map="relu", causal=True),
    dict(feature_map="identity", normalize=False, scale=0.5), dict(causal=True, with_state=True),
    dict(causal=False, with_state=True, normalize=False), dict(nq=9, nk=14),
]


@pytest.mark.parametrize("options", FORMULA_CASES, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_reference_backward_formula_matches_autograd(options):
    options = dict(options)
    nq, nk = options.pop("nq", 11), options.pop("nk", 11)
    state = make_state(2, 2, 5, 3) if options.pop("with_state", False) else None
    q, k, v = (t.requires_grad_() for t in make_qkv(2, 4, 2, nq, nk, 5, 3))
    out, _ = linear_attention_reference(q, k, v, initial_state=state, **options)
    dout = torch.randn_like(out)
    expected = torch.autograd.grad(out, (q, k, v), dout)
    got = linear_attention_reference_backward(dout, q.detach(), k.detach(), v.detach(), initial_state=state, **options)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)


# --- custom ops: opcheck, compile, empty sequences

@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("backend", LINEAR_BACKENDS)
def test_opcheck_both_ops(backend, causal):
    linear_backend_or_skip(backend, causal, "one opcheck run on Triton (the interpreter is slow)")
    dtype = _dtype_for(backend)
    q, k, v = (t.requires_grad_() for t in make_qkv(1, 4, 2, 17, 17, 8, 6, dtype=dtype))
    s0, z0 = make_state(1, 2, 8, 6, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    args = (q, k, v, "elu", causal, True, 1e-6, 0.5, s0, z0)
    with attnkernels.backend(backend):
        torch.library.opcheck(torch.ops.attnkernels.linear_attention_fwd.default, args)
        torch.library.opcheck(torch.ops.attnkernels.linear_attention_fwd.default, (q, k, v, "relu", causal, False, 1e-6, 1.0, None, None))
        dout = torch.randn(1, 4, 17, 6, dtype=dtype)
        bwd_args = (dout, q.detach(), k.detach(), v.detach(), "elu", causal, True, 1e-6, 0.5, s0, z0)
        torch.library.opcheck(torch.ops.attnkernels.linear_attention_bwd.default, bwd_args)


@pytest.mark.parametrize("backend", LINEAR_BACKENDS)
def test_compile_fullgraph_forward_and_backward(backend):
    backend_param(backend, "linear")
    dtype = _dtype_for(backend)
    q, k, v = (t.requires_grad_() for t in make_qkv(1, 4, 2, 70, 70, 8, 8, dtype=dtype))
    state = make_state(1, 2, 8, 8, dtype=torch.float64 if dtype == torch.float64 else torch.float32)

    def step(q, k, v):
        out, new_state = linear_attention(q, k, v, causal=True, initial_state=state, return_final_state=True)
        return (out * out).sum(), new_state.S

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    with attnkernels.backend(backend):
        loss, final_s = compiled(q, k, v)
        grads = torch.autograd.grad(loss, (q, k, v))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out, (s64, _) = linear_attention_reference(q64, k64, v64, causal=True, initial_state=tuple(t.double() for t in state))
    expected = torch.autograd.grad((out * out).sum(), (q64, k64, v64))
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-4)
    torch.testing.assert_close(loss.double(), (out * out).sum(), **tol)
    torch.testing.assert_close(final_s.double(), s64, **tol)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g.double(), e, **tol)


def test_compile_fullgraph_with_performer_features():
    backend_param("cpu", "linear")
    features = PerformerFeatures(8, num_features=24, seed=0).double()
    q, k, v = (t.requires_grad_() for t in make_qkv(1, 2, 2, 33, 33, 8, 8))
    compiled = torch.compile(lambda q, k, v: linear_attention(q, k, v, feature_map=features, causal=True).sum(),
                             fullgraph=True, backend="aot_eager")
    loss = compiled(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    eager = linear_attention(q, k, v, feature_map=features, causal=True).sum()
    torch.testing.assert_close(loss, eager)
    for g, e in zip(grads, torch.autograd.grad(eager, (q, k, v))):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("nq,nk", [(0, 5), (5, 0), (0, 0)], ids=lambda n: str(n))
@pytest.mark.parametrize("backend", LINEAR_BACKENDS)
def test_empty_sequences(backend, nq, nk):
    """No keys: out = φ(q)ᵀS0 / (φ(q)ᵀz0 + eps) from the carried state (0 without one); no queries: empty out."""
    backend_param(backend, "linear")
    dtype = _dtype_for(backend)
    q, k, v = (t.requires_grad_() for t in make_qkv(1, 2, 1, nq, nk, 4, 3, dtype=dtype))
    state = make_state(1, 1, 4, 3, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    with attnkernels.backend(backend):
        out, new_state = linear_attention(q, k, v, initial_state=state, return_final_state=True)
        out.sum().backward()
    expected, (s, z) = linear_attention_reference(q.double(), k.double(), v.double(), initial_state=state)
    assert out.shape == (1, 2, nq, 3)
    torch.testing.assert_close(out.double(), expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(new_state.S.double(), s.detach().double(), rtol=1e-5, atol=1e-6)
    for t in (q, k, v):
        assert t.grad.shape == t.shape and torch.isfinite(t.grad).all()


def test_state_is_detached_and_typed():
    q, k, v = (t.requires_grad_() for t in make_qkv(1, 2, 2, 9, 9, 4, 4, dtype=torch.float32))
    out, state = linear_attention(q, k, v, causal=True, return_final_state=True)
    assert isinstance(state, LinearAttentionState)
    assert out.requires_grad and not state.S.requires_grad and not state.z.requires_grad
    assert state.S.dtype == state.z.dtype == torch.float32
    assert state.S.shape == (1, 2, 4, 4) and state.z.shape == (1, 2, 4)
    q16, k16, v16 = (t.detach().to(torch.bfloat16) for t in (q, k, v))
    _, state16 = linear_attention(q16, k16, v16, return_final_state=True)
    assert state16.S.dtype == torch.float32  # bf16 inputs carry an fp32 state


# --- PerformerFeatures (FAVOR+)

def test_performer_projection_is_seeded_buffer_and_redraws():
    a = PerformerFeatures(16, num_features=40, seed=3)
    b = PerformerFeatures(16, num_features=40, generator=torch.Generator().manual_seed(3))
    assert "projection" in dict(a.named_buffers()) and a.projection.shape == (40, 16)
    assert torch.equal(a.projection, b.projection)
    before = a.projection.clone()
    a.redraw()
    assert not torch.equal(a.projection, before)
    a.redraw(torch.Generator().manual_seed(3))
    assert torch.equal(a.projection, before)
    # orthogonal blocks: rows within a block of D are mutually orthogonal
    block = a.projection[:16]
    gram = block @ block.T
    off_diagonal = gram - torch.diag(torch.diagonal(gram))
    assert off_diagonal.abs().max() < 1e-4 * gram.diagonal().max()


def test_performer_features_positive_and_stable_for_large_inputs():
    features = PerformerFeatures(16, num_features=64, seed=0)
    q, k, v = make_qkv(1, 2, 2, 50, 50, 16, 16, dtype=torch.float32)
    out = linear_attention(q * 30, k * 30, v, feature_map=features)  # exp(wᵀx) alone would overflow
    assert torch.isfinite(out).all()
    phi = features(q * 30, is_query=True)
    assert (phi >= 0).all() and phi.amax(-1).allclose(torch.full_like(phi.amax(-1), 1 / math.sqrt(64)))


def _favor_error(num_features, seed, q, k, v, exact, orthogonal=True):
    features = PerformerFeatures(q.shape[-1], num_features=num_features, orthogonal=orthogonal, seed=seed).double()
    out = linear_attention(q, k, v, feature_map=features)
    return ((out - exact).norm() / exact.norm()).item()


def test_favor_plus_error_falls_with_num_features():
    """Relative error vs exact softmax(q kᵀ/√D) v, mean over 6 seeds; theory: ∝ 1/√M.

    Inputs are N(0, 0.25) so that the FAVOR+ variance exp(|q+k|²)/M is moderate
    (with unit inputs at D=16 it needs far more features). Measured means for
    M = 16, 64, 256, 1024: 0.43, 0.24, 0.13, 0.08 (ratios ~0.55 per 4x, 0.5 in
    theory). Margin: each 4x step must cut the mean error to < 0.75x, and
    M=1024 must be under 0.15.
    """
    gen = torch.Generator().manual_seed(0)
    q, k, v = (s * torch.randn(2, 2, 64, 16, generator=gen, dtype=torch.float64) for s in (0.5, 0.5, 1.0))
    exact = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(16), dim=-1) @ v
    means = []
    for m in (16, 64, 256, 1024):
        means.append(sum(_favor_error(m, seed, q, k, v, exact) for seed in range(6)) / 6)
    for small, large in zip(means, means[1:]):
        assert large < 0.75 * small, f"FAVOR+ mean errors {means} do not fall fast enough with num_features"
    assert means[-1] < 0.15, means


def test_gradient_through_performer_features():
    """C++ kernel vs the reference backend, both through the features' autograd; and gradcheck."""
    backend_param("cpu", "linear")
    features = PerformerFeatures(6, num_features=20, seed=1).double()
    q, k, v = make_qkv(1, 4, 2, 70, 70, 6, 5)
    results = []
    for backend in ("reference", "cpu"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        with attnkernels.backend(backend):
            out = linear_attention(*leaves, feature_map=features, causal=True)
            grads = torch.autograd.grad((out * out).sum(), leaves)
        results.append((out, grads))
    (out_r, grads_r), (out_c, grads_c) = results
    torch.testing.assert_close(out_c, out_r, rtol=1e-9, atol=1e-11)
    for g_c, g_r in zip(grads_c, grads_r):
        torch.testing.assert_close(g_c, g_r, rtol=1e-8, atol=1e-10)
    small = [t[:, :, :9].clone().requires_grad_() for t in (q, k, v)]
    assert torch.autograd.gradcheck(lambda q, k, v: linear_attention(q, k, v, feature_map=features, eps=1e-12),
                                    small, fast_mode=True)


# --- bad input: every refusal names the argument

def _bad_calls():
    q, k, v = make_qkv(1, 2, 2, 5, 5, 4, 4, dtype=torch.float32)
    s, z = make_state(1, 2, 4, 4, dtype=torch.float32)
    perf = PerformerFeatures(4, num_features=8, seed=0)
    return [
        ("unknown-name", lambda: linear_attention(q, k, v, feature_map="gelu"), ValueError, "feature_map: unknown name 'gelu'"),
        ("feature-map-type", lambda: linear_attention(q, k, v, feature_map=3), TypeError, "feature_map: expected a name"),
        ("eps-zero", lambda: linear_attention(q, k, v, eps=0.0), ValueError, "eps: expected a finite float > 0"),
        ("eps-negative", lambda: linear_attention(q, k, v, eps=-1e-3), ValueError, "eps: expected a finite float > 0"),
        ("eps-type", lambda: linear_attention(q, k, v, eps="small"), TypeError, "eps: expected a positive float"),
        ("scale-negative", lambda: linear_attention(q, k, v, scale=-1.0), ValueError, "scale: expected a finite, non-negative"),
        ("state-shape", lambda: linear_attention(q, k, v, initial_state=(s[:, :1], z)), ValueError,
         r"initial_state.S: expected shape \(1, 2, 4, 4\)"),
        ("state-z-shape", lambda: linear_attention(q, k, v, initial_state=(s, z[..., :3])), ValueError,
         r"initial_state.z: expected shape \(1, 2, 4\)"),
        ("state-dtype", lambda: linear_attention(q, k, v, initial_state=(s.double(), z.double())), TypeError,
         "initial_state.S: expected dtype torch.float32"),
        ("state-type", lambda: linear_attention(q, k, v, initial_state=s), TypeError, "initial_state: expected a LinearAttentionState"),
        ("state-requires-grad", lambda: linear_attention(q, k, v, initial_state=(s.clone().requires_grad_(), z)), ValueError,
         "initial_state.S: requires grad"),
        ("causal-lengths", lambda: linear_attention(q, k[:, :, :3], v[:, :, :3], causal=True), ValueError,
         "causal: causal linear attention needs as many queries as keys"),
        ("identity-negative", lambda: linear_attention(q, k, v, feature_map="identity"), ValueError,
         "feature_map: identity gave negative q features with normalize=True"),
        ("callable-negative", lambda: linear_attention(q.abs(), k, v, feature_map=lambda x: x), ValueError,
         "feature_map: the callable gave negative k features"),
        ("gqa", lambda: linear_attention(torch.cat([q, q[:, :1]], dim=1), k, v), ValueError, "must be a multiple of the number of key/value heads"),
        ("performer-nonorm", lambda: linear_attention(q, k, v, feature_map=perf, normalize=False), ValueError,
         "normalize: PerformerFeatures needs normalize=True"),
        ("performer-state", lambda: linear_attention(q, k, v, feature_map=perf, initial_state=(s, z)), ValueError,
         "initial_state/return_final_state: not supported with PerformerFeatures"),
        ("performer-head-dim", lambda: linear_attention(q, k, v, feature_map=PerformerFeatures(8, 8, seed=0)), ValueError,
         "PerformerFeatures was built for head_dim 8"),
        ("step-two-tokens", lambda: linear_attention_step(q[:, :, :2], k[:, :, :2], v[:, :, :2], None), ValueError,
         r"q_t: expected one token \(B, H, 1, D\)"),
        ("dtype-mix", lambda: linear_attention(q, k.double(), v), TypeError, "k: dtype torch.float64 differs"),
    ]


@pytest.mark.parametrize("case", _bad_calls(), ids=lambda c: c[0])
def test_bad_input_is_refused_with_a_clear_message(case):
    _, call, error, message = case
    with pytest.raises(error, match=message):
        call()


def test_identity_with_negative_values_is_fine_without_normalization():
    q, k, v = make_qkv(1, 2, 2, 5, 5, 4, 4)
    out = linear_attention(q, k, v, feature_map="identity", normalize=False)
    expected, _ = linear_attention_reference(q, k, v, feature_map="identity", normalize=False)
    torch.testing.assert_close(out, expected)


def test_refusal_lists_every_backend_and_why(monkeypatch):
    """A forced backend that cannot run the call: one error naming it, why, and every other backend's state."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = make_qkv(1, 1, 1, 3, 3, 4, 4, dtype=torch.float32)
    with attnkernels.backend("triton"), pytest.raises(ValueError) as info:
        linear_attention(q, k, v)
    message = str(info.value)
    assert "backend 'triton'" in message and "TRITON_INTERPRET=1" in message
    assert "reference: available" in message and "cpu: " in message


def test_public_exports():
    for name in ("linear_attention", "linear_attention_step", "LinearAttentionState", "PerformerFeatures"):
        assert hasattr(attnkernels, name) and name in attnkernels.__all__


# --- key_padding_mask: padded keys add nothing to S nor z

def _padding_feature_map(name):
    if name == "performer":
        return PerformerFeatures(8, num_features=24, seed=0).double()
    if name == "callable":
        return lambda x: torch.nn.functional.softplus(x)
    return name


def _scramble(k, v, mask):
    """Garbage in the padded key/value slots (B, H, N, D): must not reach any output."""
    k, v = k.clone(), v.clone()
    k[mask[:, None, :].expand(k.shape[:3])] = 100.0
    v[mask[:, None, :].expand(v.shape[:3])] = -1e4
    return k, v


@pytest.mark.parametrize("feature_map", ["elu", "relu", "performer", "callable"])
def test_key_padding_mask_noncausal_equals_trimmed_keys(feature_map):
    fm = _padding_feature_map(feature_map)
    q, k, v = make_qkv(2, 4, 2, 7, 12, 8, 5)
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[0, :3] = True  # left padding
    mask[1, 9:] = True  # right padding
    k_bad, v_bad = _scramble(k, v, mask)
    out = linear_attention(q, k_bad, v_bad, feature_map=fm, key_padding_mask=mask)
    for b, keep in enumerate((slice(3, None), slice(None, 9))):
        trimmed = linear_attention(q[b:b + 1], k[b:b + 1, :, keep], v[b:b + 1, :, keep], feature_map=fm)
        torch.testing.assert_close(out[b:b + 1], trimmed, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(out, linear_attention(q, k, v, feature_map=fm)), "the mask must change the output"


@pytest.mark.parametrize("feature_map", ["elu", "performer"])
def test_key_padding_mask_causal_padded_positions_contribute_nothing(feature_map):
    fm = _padding_feature_map(feature_map)
    q, k, v = (t.requires_grad_() for t in make_qkv(2, 2, 2, 11, 11, 8, 5))
    mask = torch.zeros(2, 11, dtype=torch.bool)
    mask[0, :4] = True  # left padding
    mask[1, [2, 5, 6]] = True  # holes in the middle
    out = linear_attention(q, k, v, feature_map=fm, causal=True, key_padding_mask=mask)
    k_bad, v_bad = _scramble(k.detach(), v.detach(), mask)
    torch.testing.assert_close(linear_attention(q, k_bad, v_bad, feature_map=fm, causal=True, key_padding_mask=mask), out,
                               rtol=1e-10, atol=1e-10)
    # left padding: the rows after it are those of the trimmed sequence
    trimmed = linear_attention(q[:1, :, 4:], k[:1, :, 4:], v[:1, :, 4:], feature_map=fm, causal=True)
    torch.testing.assert_close(out[:1, :, 4:], trimmed, rtol=1e-10, atol=1e-10)
    # holes: each row equals the plain causal sum over the real keys j <= i
    if feature_map == "elu":
        phi_q, phi_k = torch.nn.functional.elu(q[1]) + 1, (torch.nn.functional.elu(k[1]) + 1) * (~mask[1])[None, :, None]
        scores = (phi_q @ phi_k.transpose(-1, -2)).tril()
        expected = (scores @ v[1]) / (scores.sum(-1, keepdim=True) + 1e-6)
        torch.testing.assert_close(out[1], expected, rtol=1e-10, atol=1e-10)
    out.sum().backward()
    assert k.grad[mask[:, None, :].expand(k.shape[:3])].abs().max() == 0
    assert v.grad[mask[:, None, :].expand(v.shape[:3])].abs().max() == 0
    assert k.grad.abs().sum() > 0


def test_key_padding_mask_without_padding_matches_fused_path():
    q, k, v = make_qkv(1, 2, 2, 9, 9, 8, 4)
    none_padded = torch.zeros(1, 9, dtype=torch.bool)
    for causal in (False, True):
        torch.testing.assert_close(linear_attention(q, k, v, causal=causal, scale=0.7, key_padding_mask=none_padded),
                                   linear_attention(q, k, v, causal=causal, scale=0.7), rtol=1e-10, atol=1e-10)
