"""attnkernels.flash_attn_interface: FlashAttention's API on our kernels, and packed (varlen) batches.

Against the float64 reference run per sequence / per cache prefix, forward and backward.
"""
import pytest
import torch

import attnkernels
from attnkernels import flash_attn_interface as fa
from attnkernels.softmax.reference import attention_reference

from .backend_params import backend_modifier_param, backend_param


def _bnhd(*shape, dtype=torch.float64, grad=False):
    return torch.randn(*shape, dtype=dtype, requires_grad=grad)


@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)), (False, (5, 3))],
                         ids=["dense", "causal", "window5-3"])
def test_flash_attn_func_B2_Nq37_Nk45_Hq4_Hk2_D16_matches_our_api(causal, window):
    q, k, v = _bnhd(2, 37, 4, 16), _bnhd(2, 45, 2, 16), _bnhd(2, 45, 2, 16)
    out, lse, probs = fa.flash_attn_func(q, k, v, causal=causal, window_size=window, softmax_scale=0.3,
                                         return_attn_probs=True)
    ref_out, ref_lse = attention_reference(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal,
                                           window_size=window, scale=0.3)
    assert out.shape == (2, 37, 4, 16) and lse.shape == (2, 4, 37) and probs is None
    torch.testing.assert_close(out, ref_out.transpose(1, 2), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, ref_lse.to(lse.dtype), rtol=1e-10, atol=1e-10)


def test_empty_rows_get_flash_attentions_plus_inf_lse_B1_Nq6_Nk3_causal():
    q, k = _bnhd(1, 6, 2, 8), _bnhd(1, 3, 2, 8)
    out, lse, _ = fa.flash_attn_func(q, k, k, causal=True, return_attn_probs=True)
    assert torch.isinf(lse[:, :, :3]).all() and (lse[:, :, :3] > 0).all()  # rows 0..2 see no key (bottom-right)
    assert torch.isfinite(lse[:, :, 3:]).all() and (out[:, :3] == 0).all()


def test_packed_functions_equal_the_unpacked_one_B2_N19_H2_D8():
    qkv = _bnhd(2, 19, 3, 2, 8)
    q, k, v = qkv.unbind(2)
    expected = fa.flash_attn_func(q, k, v, causal=True)
    torch.testing.assert_close(fa.flash_attn_qkvpacked_func(qkv, causal=True), expected, rtol=0, atol=0)
    torch.testing.assert_close(fa.flash_attn_kvpacked_func(q, torch.stack([k, v], 2), causal=True), expected,
                               rtol=0, atol=0)


def _lengths(gen, batch, longest):
    lengths = torch.randint(0, longest + 1, (batch,), generator=gen)
    lengths[0], lengths[1] = 0, 1  # an empty and a one-token sequence, on purpose
    return lengths


def _cu(lengths):
    return torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).to(torch.int32)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("causal,window", [(False, None), (True, None), (False, (4, 2))], ids=["dense", "causal", "window4-2"])
def test_varlen_B6_Hq4_Hk2_D16_matches_reference_per_sequence(backend, causal, window):
    backend_param(backend)
    if backend == "triton" and window is not None:
        pytest.skip("one varlen shape per mode on Triton (the interpreter is slow)")
    gen = torch.Generator().manual_seed(3)
    lq, lk = _lengths(gen, 6, 23), _lengths(gen, 6, 29)  # Nq != Nk per sequence, sums not tile multiples
    lk[1] = 2
    dtype = torch.float64 if backend == "cpu" else torch.float32
    q = torch.randn(int(lq.sum()), 4, 16, dtype=dtype, requires_grad=True)
    k = torch.randn(int(lk.sum()), 2, 16, dtype=dtype, requires_grad=True)
    v = torch.randn(int(lk.sum()), 2, 16, dtype=dtype, requires_grad=True)
    cu_q, cu_k = _cu(lq), _cu(lk)
    with attnkernels.backend(backend):
        out, lse = attnkernels.attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=int(lq.max()),
                                         max_seqlen_k=int(lk.max()), causal=causal, window_size=window, return_lse=True)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-5)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    for i in range(6):
        qs, ks = slice(int(cu_q[i]), int(cu_q[i + 1])), slice(int(cu_k[i]), int(cu_k[i + 1]))
        ref, ref_lse = attention_reference(q64[qs].transpose(0, 1)[None], k64[ks].transpose(0, 1)[None],
                                           v64[ks].transpose(0, 1)[None], causal=causal, window_size=window)
        torch.testing.assert_close(out[qs].double(), ref[0].transpose(0, 1), **tol)
        torch.testing.assert_close(lse[:, qs].double(), ref_lse[0], **tol)
        ref_grads = torch.autograd.grad(ref, (q64, k64, v64), dout[qs].double().transpose(0, 1)[None],
                                        allow_unused=True)
        for name, g, r, sl in (("dq", grads[0], ref_grads[0], qs), ("dk", grads[1], ref_grads[1], ks),
                               ("dv", grads[2], ref_grads[2], ks)):
            torch.testing.assert_close(g[sl].double(), r[sl], **tol, msg=lambda m: f"seq {i} {name}: {m}")


def test_flash_attn_varlen_func_returns_lse_H_total():
    cu = torch.tensor([0, 4, 11], dtype=torch.int32)
    q, k, v = (torch.randn(11, 2, 8, dtype=torch.float64) for _ in range(3))
    out, lse, _ = fa.flash_attn_varlen_func(q, k, v, cu, cu, 7, 7, causal=True, return_attn_probs=True)
    assert out.shape == (11, 2, 8) and lse.shape == (2, 11)
    qkv = torch.stack([q, k, v], 1)
    torch.testing.assert_close(fa.flash_attn_varlen_qkvpacked_func(qkv, cu, 7, causal=True), out, rtol=0, atol=0)


@pytest.mark.parametrize("case,kwargs,error,match", [
    ("cu-int64", dict(cu_seqlens_q=torch.tensor([0, 5])), TypeError, "cu_seqlens_q: expected dtype torch.int32"),
    ("cu-2d", dict(cu_seqlens_q=torch.tensor([[0, 5]], dtype=torch.int32)), ValueError, "cu_seqlens_q: expected a 1-D"),
    ("cu-start", dict(cu_seqlens_q=torch.tensor([1, 5], dtype=torch.int32)), ValueError, "cu_seqlens_q: must start at 0"),
    ("cu-decreasing", dict(cu_seqlens_q=torch.tensor([0, 3, 2, 5], dtype=torch.int32)), ValueError, "non-decreasing"),
    ("cu-last", dict(cu_seqlens_q=torch.tensor([0, 4], dtype=torch.int32)), ValueError, "must equal the packed length 5"),
    ("batch-mismatch", dict(cu_seqlens_q=torch.tensor([0, 2, 5], dtype=torch.int32)), ValueError, "batch sizes differ"),
    ("max-too-small", dict(max_seqlen_q=4), ValueError, "max_seqlen_q: 4 is smaller than the longest sequence"),
    ("one-side", dict(cu_seqlens_k=None), ValueError, "needs both"),
    ("with-kpm", dict(key_padding_mask=torch.zeros(1, 5, dtype=torch.bool)), ValueError, "key_padding_mask: not supported"),
], ids=lambda x: x if isinstance(x, str) else "")
def test_varlen_bad_input_names_the_argument(case, kwargs, error, match):
    q = torch.randn(5, 2, 8)
    args = dict(cu_seqlens_q=torch.tensor([0, 5], dtype=torch.int32), cu_seqlens_k=torch.tensor([0, 5], dtype=torch.int32))
    args.update(kwargs)
    with pytest.raises(error, match=match):
        attnkernels.attention(q, q, q, **args)


def _paged(cache, page_size, gen):
    """(B, Nc, H, D) -> (pages (B·Nc/page, page, H, D) in shuffled order, block_table (B, Nc/page))."""
    batch, n, heads, dim = cache.shape
    per_row = n // page_size
    order = torch.randperm(batch * per_row, generator=gen)
    pages = torch.empty(batch * per_row, page_size, heads, dim, dtype=cache.dtype)
    pages[order] = cache.reshape(batch * per_row, page_size, heads, dim)
    return pages, order.view(batch, per_row).to(torch.int32)


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged16"])
@pytest.mark.parametrize("n_q", [1, 3, 17])
def test_kvcache_append_then_attend_B3_Hq4_Hk2_D8(paged, n_q):
    gen = torch.Generator().manual_seed(n_q)
    batch, n_cache, page = 3, 64, 16
    k_full, v_full = (torch.randn(batch, n_cache, 2, 8, dtype=torch.float64, generator=gen) for _ in range(2))
    lengths = torch.tensor([0, 13, 30], dtype=torch.int32)  # appends of n_q cross page boundaries (16, 32)
    q = torch.randn(batch, n_q, 4, 8, dtype=torch.float64, generator=gen)
    k_new, v_new = (torch.randn(batch, n_q, 2, 8, dtype=torch.float64, generator=gen) for _ in range(2))
    if paged:
        k_cache, table = _paged(k_full.clone(), page, gen)
        v_cache = torch.empty_like(k_cache)  # the same shuffled pages as k (one table for both)
        v_cache[table.flatten().long()] = v_full.reshape(-1, page, 2, 8)
    else:
        k_cache, v_cache, table = k_full.clone(), v_full.clone(), None
    out, lse = fa.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=lengths, block_table=table,
                                         causal=True, return_softmax_lse=True)
    for b in range(batch):
        n = int(lengths[b])
        keys = torch.cat([k_full[b, :n], k_new[b]])  # the prefix plus the appended tokens
        vals = torch.cat([v_full[b, :n], v_new[b]])
        ref, _ = attention_reference(q[b].transpose(0, 1)[None], keys.transpose(0, 1)[None],
                                     vals.transpose(0, 1)[None], causal=True)
        torch.testing.assert_close(out[b], ref[0].transpose(0, 1), rtol=1e-10, atol=1e-10)
        written = k_cache[table[b].long()].reshape(-1, 2, 8) if paged else k_cache[b]
        torch.testing.assert_close(written[n:n + n_q], k_new[b], rtol=0, atol=0)  # appended in place
    assert lse.shape == (batch, 4, n_q)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("modifier", ["softcap", "alibi", "alibi-batch", "dropout"])
def test_flash_attn_func_modifiers_match_our_api_B2_N11_M13(modifier, backend):
    """softcap / alibi_slopes / dropout_p as FlashAttention's arguments = the same call on our API."""
    backend_modifier_param(backend, {"alibi-batch": "alibi"}.get(modifier, modifier))
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 11, 4, 16, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(2, 13, 2, 16, generator=gen, dtype=torch.float64) for _ in range(2))
    fa_kwargs = {"softcap": dict(softcap=3.0), "alibi": dict(alibi_slopes=torch.rand(4, generator=gen)),
                 "alibi-batch": dict(alibi_slopes=torch.rand(2, 4, generator=gen)),
                 "dropout": dict(dropout_p=0.3)}[modifier]
    with attnkernels.backend(backend):
        torch.manual_seed(7)
        out = fa.flash_attn_func(q, k, v, causal=True, **fa_kwargs)
        torch.manual_seed(7)
        expected = attnkernels.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True, **fa_kwargs)
    torch.testing.assert_close(out, expected.transpose(1, 2), rtol=1e-12, atol=1e-12)


def test_kvcache_refusals_and_bounds():
    q, cache = torch.randn(1, 1, 2, 8), torch.zeros(1, 8, 2, 8)
    with pytest.raises(NotImplementedError, match="rotary_cos"):
        fa.flash_attn_with_kvcache(q, cache, cache, rotary_cos=torch.ones(1))
    with pytest.raises(ValueError, match="cache_seqlens: row 0 holds 8 tokens \\+ 1 new > the cache's 8 slots"):
        fa.flash_attn_with_kvcache(q, cache, cache, q[:, :, :2], q[:, :, :2], cache_seqlens=8)
    with pytest.raises(ValueError, match="block_table: page indices"):
        fa.flash_attn_with_kvcache(q, torch.zeros(2, 16, 2, 8), torch.zeros(2, 16, 2, 8),
                                   block_table=torch.tensor([[5]], dtype=torch.int32), cache_seqlens=4)
    with pytest.raises(ValueError, match="page size 8 must be a power of two >= 16"):
        fa.flash_attn_with_kvcache(q, torch.zeros(2, 8, 2, 8), torch.zeros(2, 8, 2, 8),
                                   block_table=torch.tensor([[1]], dtype=torch.int32), cache_seqlens=4)
