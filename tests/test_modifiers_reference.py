"""The score modifiers' contract: the Philox mask, the reference's explicit backward, sinks
(applied by the ops around every backend) and the user-facing checks.

The kernels' own tests (test_cpu_modifiers.py, test_triton_modifiers.py) compare against
the reference checked here.
"""
import math
import struct

import pytest
import torch

import attnkernels
from attnkernels.softmax.dropout import effective_rate, keep_mask, keep_scale, keep_threshold, philox4x32
from attnkernels.softmax.modifiers import alibi_bias
from attnkernels.softmax.reference import attention_reference, attention_reference_backward
from tests.backend_params import backend_param


def _qkv(b, hq, hk, nq, nk, d, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*shape, generator=gen, dtype=dtype)
                 for shape in ((b, hq, nq, d), (b, hk, nk, d), (b, hk, nk, d)))


# --- Philox --------------------------------------------------------------------------------


@pytest.mark.parametrize("seed, counter, expected", [
    # Random123's known-answer tests for philox4x32-10
    (0, (0, 0, 0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    (-1, (0xFFFFFFFF,) * 4, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
], ids=["zeros", "ones"])
def test_philox4x32_known_answers(seed, counter, expected):
    words = philox4x32(seed, *(torch.tensor(c, dtype=torch.int64) for c in counter))
    assert tuple(int(w) for w in words) == expected


def test_B2_H3_N64_M100_keep_mask_rate_and_independence():
    p = 0.3  # t = 77: the rate is 77/256
    keep = keep_mask(1234, p, 2, 3, 64, 100)
    n = keep.numel()
    rate, q = keep.double().mean().item(), effective_rate(p)
    assert abs(rate - (1 - q)) < 5 * math.sqrt(q * (1 - q) / n), rate  # 5 sigma
    # every (batch, head) draws its own mask, and neighbouring columns are not copies
    flat = keep.view(6, -1)
    for a in range(6):
        for b in range(a + 1, 6):
            agree = (flat[a] == flat[b]).double().mean().item()
            assert abs(agree - (q * q + (1 - q) ** 2)) < 0.05, (a, b, agree)
    for shift in (1, 4, 16):  # the bytes of one word, the words of one call, neighbouring calls
        assert not torch.equal(keep[..., :-shift], keep[..., shift:])
    assert not torch.equal(keep_mask(1235, p, 2, 3, 64, 100), keep)


def test_keep_threshold_rounds_p_to_a_multiple_of_1_256():
    assert keep_threshold(0.0) == 0  # p = 0 keeps every byte
    assert keep_threshold(0.1) == 26 and effective_rate(0.1) == 0.1015625  # round(25.6)
    assert keep_threshold(0.5) == 128 and effective_rate(0.5) == 0.5
    assert keep_threshold(3 / 512) == 2  # ties round half up, floor(p · 256 + 0.5), as C++ does: 1.5 -> 2
    assert keep_threshold(5 / 512) == 3  # 2.5 -> 3 (Python's half-even round() would give 2)
    assert keep_threshold(1 / 512) == 1  # the smallest p > 0 accepted
    assert keep_threshold(0.998) == 255 and keep_threshold(1 - 2**-40) == 255  # at most 255 of 256
    assert keep_scale(0.1) == 256 / 230 and keep_scale(0.0) == 1.0


@pytest.mark.parametrize("p", [1e-9, 0.001, 1 / 512 - 1e-6])
def test_tiny_dropout_p_raises_instead_of_becoming_no_dropout(p):
    with pytest.raises(ValueError, match="dropout_p: .* rounds to 0"):
        keep_threshold(p)
    q = torch.zeros(1, 1, 4, 8)
    with pytest.raises(ValueError, match="dropout_p: .* rounds to 0"):
        attnkernels.attention(q, q, q, dropout_p=p)


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5])
def test_dropout_p_outside_0_1_raises(p):
    with pytest.raises(ValueError, match=r"dropout_p: expected a float in \[0, 1\)"):
        keep_threshold(p)


def test_keep_rate_of_an_unrounded_p_is_the_rounded_rate():
    """p = 0.1 drops 26/256 = 0.1015625: 8M scores tell the two apart (sigma 1.06e-4, gap 1.56e-3
    = 14.7 sigma, so both 5-sigma checks hold together)."""
    p = 0.1
    keep = keep_mask(77, p, 2, 4, 1024, 1024)
    n = keep.numel()
    drop = 1 - keep.double().mean().item()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(drop - effective_rate(p)) < 5 * sigma, drop
    assert abs(drop - p) > 5 * sigma, drop  # the unrounded rate is not what is applied


def _bytes_by_hand(seed, i, bh, n_keys):
    """The keys' bytes of query row i, head bh: each Philox call's four words packed little-endian
    (struct), 16 bytes per call in key order, independent of keep_mask's gather and shifts."""
    out = b""
    for c in range((n_keys + 15) // 16):
        words = philox4x32(seed, *(torch.tensor(x, dtype=torch.int64) for x in (c, i, bh, 0)))
        out += struct.pack("<4I", *(int(w) for w in words))
    return list(out[:n_keys])


def test_key_j_is_byte_j_mod_4_of_word_j_div_4_mod_4_of_counter_j_div_16():
    seed, b, h, nq, nk = -987654321, 2, 3, 3, 37  # 37 keys: two full calls and a partial one
    for t in (1, 77, 200, 255):
        keep = keep_mask(seed, t / 256, b, h, nq, nk)
        for bh in range(b * h):
            for i in range(nq):
                expected = torch.tensor([byte >= t for byte in _bytes_by_hand(seed, i, bh, nk)])
                assert torch.equal(keep[bh // h, bh % h, i], expected), (t, bh, i)
    # flipping one key's side of the threshold changes exactly the keys with that byte
    row = _bytes_by_hand(seed, 1, 4, nk)
    j = max(range(nk), key=lambda c: row[c] if row[c] < 255 else -1)
    at, above = (keep_mask(seed, t / 256, b, h, nq, nk)[1, 1, 1] for t in (row[j], row[j] + 1))
    changed = (at != above).nonzero().flatten().tolist()
    assert j in changed and changed == [c for c in range(nk) if row[c] == row[j]]


# --- the reference -------------------------------------------------------------------------

MODIFIER_CASES = {
    "softcap": dict(softcap=2.5),
    "alibi": dict(alibi_slopes="slopes"),
    "bias-1H1M": dict(attn_bias=(1, 4, 1, 13)),
    "bias-B1NM": dict(attn_bias=(2, 1, 9, 13)),
    "sinks": dict(sinks=True),
    "dropout": dict(dropout_p=0.25),
    "all": dict(softcap=3.0, alibi_slopes="slopes", attn_bias=(1, 4, 9, 13), sinks=True, dropout_p=0.2),
}


def _modifier_kwargs(case, b, hq, nq, nk, seed=1):
    gen = torch.Generator().manual_seed(seed)
    spec = MODIFIER_CASES[case]
    kwargs = {}
    if "softcap" in spec:
        kwargs["softcap"] = spec["softcap"]
    if "alibi_slopes" in spec:
        kwargs["alibi_slopes"] = torch.rand(b, hq, generator=gen, dtype=torch.float64)
    if "attn_bias" in spec:
        kwargs["attn_bias"] = torch.randn(*spec["attn_bias"], generator=gen, dtype=torch.float64).requires_grad_()
    if "sinks" in spec:
        kwargs["sinks"] = torch.randn(hq, generator=gen, dtype=torch.float64).requires_grad_()
    if "dropout_p" in spec:
        kwargs.update(dropout_p=spec["dropout_p"], dropout_seed=987654321)
    return kwargs


@pytest.mark.parametrize("causal", [False, True], ids=["dense", "causal"])
@pytest.mark.parametrize("case", list(MODIFIER_CASES))
def test_B2_H4_Hk2_N9_M13_D8_reference_backward_is_the_autograd_gradient(case, causal):
    q, k, v = (t.requires_grad_() for t in _qkv(2, 4, 2, 9, 13, 8))
    kwargs = _modifier_kwargs(case, 2, 4, 9, 13)
    out, lse = attention_reference(q, k, v, causal=causal, **kwargs)
    dout = torch.randn_like(out)
    leaves = [q, k, v] + [kwargs[n] for n in ("sinks", "attn_bias") if n in kwargs]
    expected = torch.autograd.grad(out, leaves, dout)
    dq, dk, dv, dsinks, dbias = attention_reference_backward(dout, q.detach(), k.detach(), v.detach(), causal=causal,
                                                             **kwargs)
    got = [dq, dk, dv]
    if "sinks" in kwargs:
        got.append(dsinks)
    if "attn_bias" in kwargs:
        got.append(dbias.sum_to_size(kwargs["attn_bias"].shape))
    for name, g, e in zip(("dq", "dk", "dv", "extra1", "extra2"), got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10, msg=name)


def test_B1_H2_N6_M6_softcap_alibi_bias_order_written_out():
    """The logits of modifiers.py, computed by hand for one small case."""
    q, k, v = _qkv(1, 2, 2, 6, 6, 4)
    slopes = torch.tensor([[0.5, 0.25]], dtype=torch.float64)
    bias = torch.randn(6, 6, dtype=torch.float64)
    s = q @ k.transpose(-1, -2) * 0.5
    s = 2.0 * torch.tanh(s / 2.0)
    i = torch.arange(6.0, dtype=torch.float64)
    s = s - slopes[..., None, None] * (i[:, None] - i[None, :]).abs() + bias
    s = s.masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1), float("-inf"))
    expected = torch.softmax(s, -1) @ v
    out, _ = attention_reference(q, k, v, causal=True, scale=0.5, softcap=2.0, alibi_slopes=slopes, attn_bias=bias)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(alibi_bias(slopes, 6, 6)[0, 1, 3], -0.25 * (i[3] - i).abs())


def test_B1_H2_N5_M7_sinks_join_the_denominator_as_gpt_oss_eager():
    """gpt-oss eager: append the sink column to the logits, softmax, drop it."""
    q, k, v = _qkv(1, 2, 2, 5, 7, 4)
    sinks = torch.tensor([0.3, -1.2], dtype=torch.float64)
    logits = q @ k.transpose(-1, -2) * 0.5
    combined = torch.cat([logits, sinks[None, :, None, None].expand(1, 2, 5, 1)], dim=-1)
    probs = torch.softmax(combined, -1)[..., :-1]
    out, lse = attention_reference(q, k, v, scale=0.5, sinks=sinks)
    torch.testing.assert_close(out, probs @ v, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, torch.logsumexp(combined, -1), rtol=1e-12, atol=1e-12)


def test_B1_H1_N4_M4_bias_minus_inf_row_is_empty():
    q, k, v = (t.requires_grad_() for t in _qkv(1, 1, 1, 4, 4, 4))
    bias = torch.zeros(4, 4, dtype=torch.float64)
    bias[2] = float("-inf")
    out, lse = attention_reference(q, k, v, attn_bias=bias)
    assert torch.all(out[0, 0, 2] == 0) and lse[0, 0, 2] == float("-inf")
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.all(q.grad[0, 0, 2] == 0)


# --- through the ops: sinks on every backend (the ops apply them) ---------------------------


@pytest.mark.parametrize("backend, dtype", [("reference", torch.float64), ("cpu", torch.float64), ("cpu", torch.float32),
                                            ("triton", torch.float32)],  # Triton takes fp16/bf16/fp32
                         ids=["reference-fp64", "cpu-fp64", "cpu-fp32", "triton-fp32"])
def test_B2_H4_Hk2_N33_M47_D16_causal_sinks_every_backend(backend, dtype):
    backend_param(backend)
    q, k, v = (t.to(dtype).requires_grad_() for t in _qkv(2, 4, 2, 33, 47, 16))
    sinks = torch.randn(4, dtype=dtype, requires_grad=True)
    padding = torch.zeros(2, 47, dtype=torch.bool)
    padding[1] = True  # batch 1 sees no key: out 0, lse = the sink
    with attnkernels.backend(backend):
        out, lse = attnkernels.attention(q, k, v, causal=True, sinks=sinks, key_padding_mask=padding, return_lse=True)
        dout = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v, sinks), dout)
    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v, sinks)]
    out64, lse64 = attention_reference(*leaves64[:3], causal=True, sinks=leaves64[3], key_padding_mask=padding)
    expected = torch.autograd.grad(out64, leaves64, dout.double())
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(out.double(), out64, rtol=tol, atol=tol)
    torch.testing.assert_close(lse.double(), lse64, rtol=tol, atol=tol)
    torch.testing.assert_close(lse[1].double(), sinks.detach().double()[:, None].expand(4, 33))
    for name, g, e in zip(("dq", "dk", "dv", "dsinks"), grads, expected):
        torch.testing.assert_close(g.double(), e, rtol=tol, atol=tol * 10, msg=name)


def test_reference_backend_runs_every_modifier_with_gradients():
    q, k, v = (t.requires_grad_() for t in _qkv(2, 4, 2, 9, 13, 8))
    kwargs = _modifier_kwargs("all", 2, 4, 9, 13)
    seed = kwargs.pop("dropout_seed")
    gen = torch.Generator().manual_seed(5)
    dout = torch.randn(2, 4, 9, 8, dtype=torch.float64)
    leaves = (q, k, v, kwargs["sinks"], kwargs["attn_bias"])
    with attnkernels.backend("reference"):
        out = attnkernels.attention(q, k, v, causal=True, generator=gen, **kwargs)
        got = torch.autograd.grad(out, leaves, dout)
    drawn = torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64, generator=torch.Generator().manual_seed(5))
    expected, _ = attention_reference(q, k, v, causal=True, dropout_seed=int(drawn), **kwargs)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert seed != int(drawn)
    want = torch.autograd.grad(expected, leaves, dout)
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)


def test_dropout_zero_is_the_plain_call_and_draws_nothing():
    q, k, v = _qkv(1, 2, 2, 8, 8, 4)
    gen = torch.Generator().manual_seed(3)
    state = gen.get_state()
    with attnkernels.backend("reference"):
        plain = attnkernels.attention(q, k, v)
        zero = attnkernels.attention(q, k, v, dropout_p=0.0, generator=gen)
    assert torch.equal(plain, zero) and torch.equal(gen.get_state(), state)


# --- bad input -----------------------------------------------------------------------------

BAD_INPUTS = [
    (dict(softcap=-1.0), ValueError, "softcap"),
    (dict(softcap=float("inf")), ValueError, "softcap"),
    (dict(softcap="2"), TypeError, "softcap"),
    (dict(alibi_slopes=torch.ones(3)), ValueError, r"alibi_slopes: expected shape \(Hq,\)"),
    (dict(alibi_slopes=torch.ones(4, dtype=torch.int64)), TypeError, "alibi_slopes"),
    (dict(sinks=torch.ones(2, 4)), ValueError, "sinks: expected shape"),
    (dict(attn_bias=torch.ones(3, 8, 8)), ValueError, "attn_bias: .* dim Hq is 3, expected 1 or 4"),
    (dict(attn_bias=torch.ones(8, 9)), ValueError, "dim Nk is 9"),
    (dict(attn_bias=torch.ones(1, 1, 1, 8, 8)), ValueError, "at most 4 dims"),
    (dict(attn_bias=torch.ones(8, 8, dtype=torch.int32)), TypeError, "attn_bias"),
    (dict(dropout_p=1.0), ValueError, r"dropout_p: expected a float in \[0, 1\)"),
    (dict(dropout_p=-0.1), ValueError, "dropout_p"),
]


@pytest.mark.parametrize("kwargs, error, message", BAD_INPUTS, ids=[f"{list(c[0])[0]}-{i}" for i, c in enumerate(BAD_INPUTS)])
def test_bad_modifier_arguments_name_the_argument(kwargs, error, message):
    q, k, v = _qkv(2, 4, 2, 8, 8, 4, dtype=torch.float32)
    with pytest.raises(error, match=message):
        attnkernels.attention(q, k, v, **kwargs)


def test_packed_batch_refuses_attn_bias():
    q = torch.randn(10, 2, 8)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    with pytest.raises(ValueError, match="attn_bias: not supported with a packed"):
        attnkernels.attention(q, q, q, cu_seqlens_q=cu, cu_seqlens_k=cu, attn_bias=torch.zeros(10, 10))
