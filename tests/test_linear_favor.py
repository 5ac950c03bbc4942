"""The fused C++ FAVOR+ path (attnkernels/linear/favor.py, csrc/linear.cpp favor_*).

`linear_attention(..., feature_map=PerformerFeatures)` on CPU, non-causal, without a mask
or a state, runs the projection, the stabilisers and the exp inside the kernel. Checked
against the float64 unfused path (the torch feature map, then the reference backend),
forward and backward; low precision with FlashAttention's rule against the same map run
plainly in the input dtype.
"""
import math

import pytest
import torch

import attnkernels
from attnkernels.linear import PerformerFeatures, favor, linear_attention

from .backend_params import backend_param
from .linear_helpers import assert_close_to_oracle, make_qkv, one_torch_thread  # noqa: F401

# (B, Hq, Hk, Nq, Nk, D, Dv, M): odd lengths, Nq != Nk, N not a multiple of the 64-row
# chunk, GQA, M not a multiple of the vector width, one token, the benchmark's width.
CASES = [
    (2, 4, 2, 97, 70, 16, 12, 40),
    (1, 2, 2, 130, 130, 64, 64, 256),
    (1, 1, 1, 1, 3, 8, 5, 7),
    (1, 3, 1, 64, 129, 32, 40, 64),
    (1, 4, 2, 200, 257, 64, 64, 256),  # the benchmark's widths over several chunks, a 1-row last key chunk, GQA
]


def case_id(c):
    b, hq, hk, nq, nk, d, dv, m = c
    heads = f"H{hq}" if hq == hk else f"Hq{hq}-Hk{hk}"
    lens = f"N{nq}" if nq == nk else f"Nq{nq}-Nk{nk}"
    return f"B{b}-{heads}-{lens}-D{d}-Dv{dv}-M{m}"


def _run(q, k, v, features, dout, backend=None, **kwargs):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    if backend is None:
        out = linear_attention(*leaves, feature_map=features, **kwargs)
    else:
        with attnkernels.backend(backend):
            out = linear_attention(*leaves, feature_map=features, **kwargs)
    grads = torch.autograd.grad(out, leaves, dout.to(out.dtype))
    return out.detach(), grads


def _plain(q, k, v, features, dout, scale=None):
    """The same FAVOR+ attention in plain torch in q's dtype (features.py's map, then φ(q)(φ(k)ᵀv) / φ(q)Σφ(k))."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    q_, k_, v_ = leaves
    root = math.sqrt(scale if scale is not None else 1 / math.sqrt(q.shape[-1]))
    group = q.shape[1] // k.shape[1]
    fq = features(q_ * root, is_query=True)
    fk = features(k_ * root, is_query=False).repeat_interleave(group, dim=1)
    vv = v_.repeat_interleave(group, dim=1)
    out = (fq @ (fk.transpose(-1, -2) @ vv)) / (fq @ fk.sum(2, keepdim=True).transpose(-1, -2) + 1e-6)
    return out.detach(), torch.autograd.grad(out, leaves, dout.to(out.dtype))


def test_fused_path_is_taken_only_where_it_applies():
    backend_param("cpu", "linear")
    features = PerformerFeatures(8, num_features=16, seed=0)
    q, k, v = make_qkv(1, 2, 2, 9, 9, 8, 8, dtype=torch.float32)
    base = dict(causal=False, normalize=True, initial_state=None, return_final_state=False, key_padding_mask=None)
    assert favor.fusable(q, k, v, features, **base)
    assert not favor.fusable(q, k, v, features, **{**base, "causal": True})
    assert not favor.fusable(q, k, v, features, **{**base, "return_final_state": True})
    assert not favor.fusable(q, k, v, features, **{**base, "key_padding_mask": torch.zeros(1, 9, dtype=torch.bool)})
    assert not favor.fusable(q, k, v, "elu", **base)
    assert not favor.fusable(q[:, :, :0], k, v, features, **base)
    with attnkernels.backend("reference"):
        assert not favor.fusable(q, k, v, features, **base)


@pytest.mark.parametrize("scale", [None, 0.3], ids=["default-scale", "scale0.3"])
@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_fused_matches_unfused_float64(case, scale):
    """Same function as features.py + the reference backend: forward and gradients to rounding."""
    backend_param("cpu", "linear")
    b, hq, hk, nq, nk, d, dv, m = case
    features = PerformerFeatures(d, num_features=m, seed=1).double()
    q, k, v = make_qkv(b, hq, hk, nq, nk, d, dv, seed=2)
    dout = torch.randn(b, hq, nq, dv, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    out, grads = _run(q, k, v, features, dout, scale=scale)
    out_r, grads_r = _run(q, k, v, features, dout, backend="reference", scale=scale)
    assert_close_to_oracle("out", out, out_r, torch.float64)
    for name, g, e in zip(("dq", "dk", "dv"), grads, grads_r):
        assert_close_to_oracle(name, g, e, torch.float64)


@pytest.fixture(params=["matrix-units", "fp32-upcast"])
def gemm_path(request, monkeypatch):
    """bf16/fp16 run on the matrix units where the CPU has them (D, Dv even), or forced onto the fp32 path."""
    if request.param == "fp32-upcast":
        monkeypatch.setenv("ATTNKERNELS_CPU_NO_AMX", "1")
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_fused_low_precision_within_flash_rule(case, dtype, gemm_path):
    backend_param("cpu", "linear")
    if dtype == torch.float32 and gemm_path == "fp32-upcast":
        pytest.skip("float32 has one path")
    b, hq, hk, nq, nk, d, dv, m = case
    features64 = PerformerFeatures(d, num_features=m, seed=1).double()
    features = PerformerFeatures(d, num_features=m, seed=1).to(dtype)
    q, k, v = make_qkv(b, hq, hk, nq, nk, d, dv, seed=2)
    dout = torch.randn(b, hq, nq, dv, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    # the oracle sees the dtype's rounded inputs and projection, as the kernel does
    q, k, v = (t.to(dtype).double() for t in (q, k, v))
    features64.projection.copy_(features.projection.double())
    out_r, grads_r = _run(q, k, v, features64, dout, backend="reference")
    lq, lk, lv = (t.to(dtype) for t in (q, k, v))
    out, grads = _run(lq, lk, lv, features, dout)
    out_p, grads_p = _plain(lq, lk, lv, features, dout)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    assert_close_to_oracle("out", out, out_r, dtype, baseline=out_p)
    for name, g, e, p in zip(("dq", "dk", "dv"), grads, grads_r, grads_p):
        assert_close_to_oracle(name, g, e, dtype, baseline=p)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["float64", "bfloat16"])
def test_fused_stable_for_large_inputs(dtype):
    """Logits of ~±100 (exp would overflow without the stabilisers), keys of very different norms."""
    backend_param("cpu", "linear")
    features = PerformerFeatures(16, num_features=48, seed=0).to(dtype)
    features64 = PerformerFeatures(16, num_features=48, seed=0).double()
    features64.projection.copy_(features.projection.double())
    q, k, v = make_qkv(1, 2, 2, 80, 150, 16, 8, seed=4)
    k = k * torch.linspace(1, 40, 150, dtype=torch.float64)[:, None]  # the max moves chunk to chunk
    q, k, v = (t.to(dtype) for t in (q * 30, k, v))
    dout = torch.randn(1, 2, 80, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    out, grads = _run(q, k, v, features, dout)
    out_r, grads_r = _run(q.double(), k.double(), v.double(), features64, dout, backend="reference")
    out_p, grads_p = _plain(q, k, v, features, dout) if dtype != torch.float64 else (None, (None,) * 3)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    assert_close_to_oracle("out", out, out_r, dtype, baseline=out_p)
    for name, g, e, p in zip(("dq", "dk", "dv"), grads, grads_r, grads_p):
        assert_close_to_oracle(name, g, e, dtype, baseline=p)


def test_fused_gradcheck_and_determinism():
    backend_param("cpu", "linear")
    features = PerformerFeatures(6, num_features=20, seed=1).double()
    q, k, v = (t.requires_grad_() for t in make_qkv(1, 4, 2, 9, 11, 6, 5))
    assert torch.autograd.gradcheck(lambda q, k, v: linear_attention(q, k, v, feature_map=features, eps=1e-12),
                                    (q, k, v), fast_mode=True)
    features32 = PerformerFeatures(64, num_features=64, seed=1)
    q, k, v = make_qkv(2, 4, 2, 200, 200, 64, 64, dtype=torch.float32)
    dout = torch.randn(2, 4, 200, 64)
    results = []
    for threads in (1, 2, 1):
        torch.set_num_threads(threads)
        results.append(_run(q, k, v, features32, dout))
    for out, grads in results[1:]:
        assert torch.equal(out, results[0][0]) and all(torch.equal(a, b) for a, b in zip(grads, results[0][1]))


@pytest.mark.parametrize("num_features", [24, 32], ids=["M24-recomputed", "M32-saved-features"])
def test_fused_compiles_fullgraph(num_features):
    backend_param("cpu", "linear")
    features = PerformerFeatures(8, num_features=num_features, seed=0).double()
    q, k, v = (t.requires_grad_() for t in make_qkv(1, 2, 2, 33, 40, 8, 8))
    compiled = torch.compile(lambda q, k, v: linear_attention(q, k, v, feature_map=features).sum(),
                             fullgraph=True, backend="aot_eager")
    loss = compiled(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    eager = linear_attention(q, k, v, feature_map=features).sum()
    torch.testing.assert_close(loss, eager)
    for g, e in zip(grads, torch.autograd.grad(eager, (q, k, v))):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_saved_query_features_bit_identical_to_recomputed(dtype, monkeypatch):
    """The backward from the forward's saved φ(q) equals the one that recomputes it, to the bit
    (favor._save_features: the same code computes φ(q) and its normaliser both ways)."""
    backend_param("cpu", "linear")
    features = PerformerFeatures(64, num_features=64, seed=2).to(dtype)
    q, k, v = make_qkv(1, 4, 2, 131, 70, 64, 40, dtype=dtype)
    dout = torch.randn(1, 4, 131, 40, dtype=dtype)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    assert favor._save_features(*leaves, features.projection)
    saved = _run(q, k, v, features, dout)
    monkeypatch.setattr(favor, "SAVE_FEATURES_MAX_BYTES", 0)
    assert not favor._save_features(*leaves, features.projection)
    recomputed = _run(q, k, v, features, dout)
    assert torch.equal(saved[0], recomputed[0])
    assert all(torch.equal(a, b) for a, b in zip(saved[1], recomputed[1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("where", ["query", "key"])
def test_B1_H2_N70_D64_M256_nan_poisons_what_sees_it(dtype, where):
    """A NaN in one query row poisons exactly that output row; a NaN in one key poisons every row of
    its kv head (non-causal: the state holds it), as in the reference. The stabilisers' max is a plain
    vmaxps that may drop a NaN lane: the NaN must still reach the output through the exp."""
    backend_param("cpu", "linear")
    features = PerformerFeatures(64, num_features=256, seed=1).to(dtype)
    q, k, v = make_qkv(1, 2, 2, 70, 70, 64, 64, dtype=dtype)
    (q if where == "query" else k)[0, 0, 33, 5] = float("nan")
    out = linear_attention(q, k, v, feature_map=features)
    assert favor.fusable(q, k, v, features, causal=False, normalize=True, initial_state=None,
                         return_final_state=False, key_padding_mask=None)
    features64 = PerformerFeatures(64, num_features=256, seed=1).double()
    features64.projection.copy_(features.projection.double())
    with attnkernels.backend("reference"):
        expected = linear_attention(q.double(), k.double(), v.double(), feature_map=features64)
    poisoned = torch.zeros(1, 2, 70, 64, dtype=torch.bool)
    if where == "query":
        poisoned[0, 0, 33] = True
    else:
        poisoned[0, 0] = True
    assert torch.equal(torch.isnan(expected), poisoned)
    assert torch.equal(torch.isnan(out), poisoned)
