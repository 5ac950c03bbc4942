"""The public softmax-attention API: dispatch, custom-op registration, compile, bad input.

Kernel accuracy lives in test_cpu_attention.py / test_triton_attention.py;
this file checks the plumbing every backend shares.
"""
import math

import pytest
import torch

import attnkernels
from attnkernels import backends
from attnkernels.softmax.reference import attention_reference, attention_reference_backward

from .backend_params import BACKENDS, backend_param


def _qkv(b=2, hq=4, hk=2, nq=13, nk=21, d=16, dv=None, dtype=torch.float64, requires_grad=False):
    q = torch.randn(b, hq, nq, d, dtype=dtype, requires_grad=requires_grad)
    k = torch.randn(b, hk, nk, d, dtype=dtype, requires_grad=requires_grad)
    v = torch.randn(b, hk, nk, dv or d, dtype=dtype, requires_grad=requires_grad)
    return q, k, v


def test_reference_backward_formula_matches_autograd():
    q, k, v = _qkv(requires_grad=True)
    dout = torch.randn(2, 4, 13, 16, dtype=torch.float64)
    for kwargs in ({}, {"causal": True}, {"window_size": (3, 1)}):
        out, _ = attention_reference(q, k, v, **kwargs)
        expected = torch.autograd.grad(out, (q, k, v), dout)
        got = attention_reference_backward(dout, q, k, v, **kwargs)
        for e, g in zip(expected, got):
            torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS, ids=str)
def test_opcheck(backend):
    backend_param(backend)
    dtype = torch.float32 if backend == "triton" else torch.float64
    q, k, v = _qkv(nq=17, nk=17, d=16, dtype=dtype, requires_grad=True)
    args = (q, k, v, 0.25, -1, 0, None, None, None, None, 0, None)
    with attnkernels.backend(backend):
        torch.library.opcheck(torch.ops.attnkernels.attention_fwd.default, args)
        out, lse = torch.ops.attnkernels.attention_fwd(*args)
        dout = torch.randn_like(out)
        bwd_args = (dout, q.detach(), k.detach(), v.detach(), out.detach(), lse, False, 0.25, -1, 0, None, None, None, None, 0, None)
        torch.library.opcheck(torch.ops.attnkernels.attention_bwd.default, bwd_args)


@pytest.mark.parametrize("backend", BACKENDS, ids=str)
def test_compile_fullgraph_forward_and_backward(backend):
    backend_param(backend)
    dtype = torch.float32 if backend == "triton" else torch.float64
    q, k, v = _qkv(nq=17, nk=33, d=16, dtype=dtype, requires_grad=True)

    def step(q, k, v):
        out = attnkernels.attention(q, k, v, causal=True)
        return (out * out).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    with attnkernels.backend(backend):
        loss = compiled(q, k, v)
        grads = torch.autograd.grad(loss, (q, k, v))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out, _ = attention_reference(q64, k64, v64, causal=True)
    expected = torch.autograd.grad((out * out).sum(), (q64, k64, v64))
    tol = 1e-9 if dtype == torch.float64 else 2e-4
    torch.testing.assert_close(loss.double(), (out * out).sum(), rtol=tol, atol=tol)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g.double(), e, rtol=tol, atol=tol)


def test_return_lse_is_detached_and_matches_reference():
    q, k, v = _qkv(requires_grad=True)
    with attnkernels.backend("reference"):
        out, lse = attnkernels.attention(q, k, v, causal=True, return_lse=True)
    assert not lse.requires_grad and out.requires_grad
    expected_out, expected_lse = attention_reference(q, k, v, causal=True)
    torch.testing.assert_close(lse, expected_lse)
    torch.testing.assert_close(out, expected_out)


@pytest.mark.parametrize("backend", BACKENDS, ids=str)
@pytest.mark.parametrize("nq,nk", [(0, 5), (5, 0), (0, 0)], ids=lambda n: str(n))
def test_empty_sequences_return_empty_outputs(backend, nq, nk):
    backend_param(backend)
    q, k, v = _qkv(nq=nq, nk=nk, dtype=torch.float32, requires_grad=True)
    with attnkernels.backend(backend):
        out, lse = attnkernels.attention(q, k, v, return_lse=True)
        assert out.shape == (2, 4, nq, 16) and lse.shape == (2, 4, nq)
        assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
        out.sum().backward()
    assert torch.equal(q.grad, torch.zeros_like(q)) and torch.equal(k.grad, torch.zeros_like(k))


@pytest.mark.parametrize("backend", BACKENDS, ids=str)
def test_non_contiguous_inputs(backend):
    backend_param(backend)
    base = torch.randn(2, 19, 4, 32, dtype=torch.float32)  # (B, N, H, D) -> transposed view
    q = base.transpose(1, 2)
    k = torch.randn(2, 19, 2, 32).transpose(1, 2)
    v = torch.randn(2, 2, 19, 64)[..., ::2]  # strided last dim
    assert not q.is_contiguous() and not v.is_contiguous()
    with attnkernels.backend(backend):
        out = attnkernels.attention(q, k, v, causal=True)
    expected, _ = attention_reference(q, k, v, causal=True)
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-5)


def test_default_dispatch_picks_cpu_kernels_for_cpu_tensors():
    assert backends.forced_backend() is None
    for family in ("softmax", "linear"):
        assert backends.select(family, torch.device("cpu")).name == "cpu"
        with attnkernels.backend("reference"):
            assert backends.select(family, torch.device("cpu")).name == "reference"
    assert backends.forced_backend() is None


def test_backend_context_rejects_unknown_names():
    with pytest.raises(ValueError, match="backend: expected one of"):
        with attnkernels.backend("cuda"):
            pass


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with attnkernels.backend("triton"), pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        backends.select("softmax", torch.device("cpu"))


# --- bad input: each error names the argument -------------------------------------------------

def _bad_calls():
    q, k, v = _qkv(dtype=torch.float32)
    return [
        ("q-3D", lambda: attnkernels.attention(q[0], k, v), ValueError, "q: expected a 4-D tensor"),
        ("k-not-tensor", lambda: attnkernels.attention(q, k.numpy(), v), TypeError, "k: expected a torch.Tensor"),
        ("batch-mismatch", lambda: attnkernels.attention(q, k[:1], v[:1]), ValueError, "batch size"),
        ("head-dim-mismatch", lambda: attnkernels.attention(q, k[..., :8], v), ValueError, "k: head dim 8"),
        ("v-len-mismatch", lambda: attnkernels.attention(q, k, v[:, :, :5]), ValueError, "v: expected"),
        ("gqa-ratio", lambda: attnkernels.attention(q, torch.randn(2, 3, 21, 16), torch.randn(2, 3, 21, 16)), ValueError, "multiple of the number of key/value heads"),
        ("mixed-dtype", lambda: attnkernels.attention(q, k.double(), v), TypeError, "k: dtype"),
        ("int-dtype", lambda: attnkernels.attention(q.int(), k.int(), v.int()), TypeError, "q: expected a floating dtype"),
        ("bool-dtype", lambda: attnkernels.attention(q > 0, k, v), TypeError, "q: expected a floating dtype"),
        ("complex-dtype", lambda: attnkernels.attention(q.to(torch.complex64), k, v), TypeError, "q: expected a floating dtype"),
        ("D0", lambda: attnkernels.attention(q[..., :0], k[..., :0], v), ValueError, "head dim D: expected 1 <= D <= 256"),
        ("D300", lambda: attnkernels.attention(*(torch.randn(1, 1, 4, 300) for _ in range(3))), ValueError, "D <= 256"),
        ("Dv300", lambda: attnkernels.attention(q, k, torch.randn(2, 2, 21, 300)), ValueError, "v head dim Dv"),
        ("negative-scale", lambda: attnkernels.attention(q, k, v, scale=-1.0), ValueError, "scale: expected a finite"),
        ("nan-scale", lambda: attnkernels.attention(q, k, v, scale=math.nan), ValueError, "scale: expected a finite"),
        ("inf-scale", lambda: attnkernels.attention(q, k, v, scale=math.inf), ValueError, "scale: expected a finite"),
        ("str-scale", lambda: attnkernels.attention(q, k, v, scale="0.1"), TypeError, "scale: expected a float"),
        ("causal-not-bool", lambda: attnkernels.attention(q, k, v, causal=1), TypeError, "causal: expected a bool"),
        ("window-float", lambda: attnkernels.attention(q, k, v, window_size=2.5), TypeError, "window_size"),
        ("window-below-minus-one", lambda: attnkernels.attention(q, k, v, window_size=(-2, 3)), ValueError, "window_size: left must be >= -1"),
        ("window-three", lambda: attnkernels.attention(q, k, v, window_size=(1, 2, 3)), TypeError, "window_size"),
        ("padding-dtype", lambda: attnkernels.attention(q, k, v, key_padding_mask=torch.zeros(2, 21)), TypeError, "key_padding_mask: expected dtype torch.bool"),
        ("padding-shape", lambda: attnkernels.attention(q, k, v, key_padding_mask=torch.zeros(2, 13, dtype=torch.bool)), ValueError, "key_padding_mask: expected shape"),
        ("block-mask-type", lambda: attnkernels.attention(q, k, v, block_mask=torch.ones(1, 1, 1, 1, dtype=torch.bool)), TypeError, "block_mask: expected an attnkernels.masks.BlockMask"),
    ]


@pytest.mark.parametrize("case", _bad_calls(), ids=lambda c: c[0])
def test_bad_input_raises_naming_the_argument(case):
    _, call, error, message = case
    with pytest.raises(error, match=message):
        call()
