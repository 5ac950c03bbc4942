"""linear_attention(..., cu_seqlens=): packed sequences whose state restarts at each boundary,
against the float64 reference run per sequence (forward, final state and gradients)."""
import pytest
import torch

import attnkernels
from attnkernels.linear import linear_attention
from attnkernels.linear.reference import linear_attention_reference

from .backend_params import backend_param
from .linear_helpers import LINEAR_BACKENDS

LENGTHS = [5, 0, 1, 17, 9]  # a 0- and a 1-token sequence; total 32, not a multiple of any tile


def _packed(lengths, hq=4, hk=2, d=8, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q = torch.randn(total, hq, d, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(total, hk, d, generator=gen, dtype=torch.float64) for _ in range(2))
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    return tuple(t.to(dtype).requires_grad_() for t in (q, k, v)), cu


@pytest.mark.parametrize("backend", LINEAR_BACKENDS)
@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "initial-state"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_packed_5_0_1_17_9_Hq4_Hk2_D8_matches_each_sequence_alone(causal, with_state, backend):
    backend_param(backend, "linear")
    dtype = torch.float32 if backend == "triton" else torch.float64
    (q, k, v), cu = _packed(LENGTHS, dtype=dtype)
    batch = len(LENGTHS)
    gen = torch.Generator().manual_seed(3)
    state = (torch.randn(batch, 2, 8, 8, generator=gen, dtype=dtype),
             torch.rand(batch, 2, 8, generator=gen, dtype=dtype) * 4) if with_state else None
    with attnkernels.backend(backend):
        out, (final_s, final_z) = linear_attention(q, k, v, causal=causal, cu_seqlens=cu, initial_state=state,
                                                   return_final_state=True)
        dout = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), dout)
    assert out.shape == (sum(LENGTHS), 4, 8) and final_s.shape == (batch, 2, 8, 8) and final_z.shape == (batch, 2, 8)
    tol = 1e-10 if dtype == torch.float64 else 2e-4
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    bounds = cu.tolist()
    for i, (start, end) in enumerate(zip(bounds, bounds[1:])):
        q_i, k_i, v_i = (t[start:end].transpose(0, 1)[None] for t in leaves)
        state_i = None if state is None else (state[0][i:i + 1].double(), state[1][i:i + 1].double())
        if end == start:  # an empty sequence: nothing out, its state passes through
            expected_s = state_i[0] if state_i else torch.zeros(1, 2, 8, 8, dtype=torch.float64)
            torch.testing.assert_close(final_s[i:i + 1].double(), expected_s, rtol=tol, atol=tol)
            continue
        ref, (ref_s, ref_z) = linear_attention_reference(q_i, k_i, v_i, causal=causal, initial_state=state_i)
        torch.testing.assert_close(out[start:end].double(), ref[0].transpose(0, 1), rtol=tol, atol=tol)
        torch.testing.assert_close(final_s[i:i + 1].double(), ref_s, rtol=tol, atol=tol)
        torch.testing.assert_close(final_z[i:i + 1].double(), ref_z, rtol=tol, atol=tol)
        (ref[0].transpose(0, 1) * dout[start:end].double()).sum().backward()
    for name, got, leaf in zip(("dq", "dk", "dv"), grads, leaves):
        torch.testing.assert_close(got.double(), leaf.grad, rtol=tol, atol=tol, msg=name)


def test_packed_state_does_not_leak_between_sequences():
    (q, k, v), cu = _packed([6, 6])
    out = linear_attention(q, k, v, causal=True, cu_seqlens=cu)
    alone = linear_attention(q[6:].transpose(0, 1)[None], k[6:].transpose(0, 1)[None], v[6:].transpose(0, 1)[None],
                             causal=True)
    torch.testing.assert_close(out[6:], alone[0].transpose(0, 1), rtol=1e-12, atol=1e-12)
    whole = linear_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], causal=True)
    assert not torch.allclose(out[6:], whole[0, :, 6:].transpose(0, 1))  # one long sequence differs


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(cu_seqlens=torch.tensor([0, 4, 9])), TypeError, "cu_seqlens: expected dtype torch.int32"),
    (dict(cu_seqlens=torch.tensor([0, 4, 8], dtype=torch.int32)), ValueError, "last entry 8 must equal"),
    (dict(cu_seqlens=torch.tensor([1, 9], dtype=torch.int32)), ValueError, "must start at 0"),
    (dict(cu_seqlens=torch.tensor([0, 5, 4, 9], dtype=torch.int32)), ValueError, "non-decreasing"),
    (dict(cu_seqlens=torch.tensor([0, 9], dtype=torch.int32), initial_state=(torch.zeros(2, 2, 8, 8),
                                                                            torch.zeros(2, 2, 8))),
     ValueError, "initial_state.S: with cu_seqlens expected one state per sequence"),
    (dict(cu_seqlens=torch.tensor([0, 9], dtype=torch.int32), key_padding_mask=torch.zeros(1, 9, dtype=torch.bool)),
     ValueError, "key_padding_mask: not supported with a packed"),
], ids=["int64", "wrong-total", "not-from-0", "decreasing", "state-per-sequence", "with-padding-mask"])
def test_packed_bad_input(kwargs, error, match):
    q = torch.randn(9, 2, 8)
    with pytest.raises(error, match=match):
        linear_attention(q, q, q, causal=True, **kwargs)
