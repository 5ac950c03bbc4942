"""attnkernels.nn.MultiheadAttention: parity with torch's module, each family, padding, bad input."""
import pytest
import torch
import torch.nn.functional as F

import attnkernels
from attnkernels.nn import MultiheadAttention

from .backend_params import BACKENDS, backend_feature_param, backend_modifier_param, backend_param

# Head dim 16: the smallest the Triton kernels take (tl.dot dims >= 16).
E, H = 64, 4


def _dtype_tol(backend):
    # Triton runs under the interpreter here: keep it to float32 (and tiny shapes).
    if backend == "triton":
        return torch.float32, dict(rtol=2e-5, atol=2e-5)
    return torch.float64, dict(rtol=1e-10, atol=1e-10)


def _torch_pair(dtype, bias=True, batch_first=True):
    ref = torch.nn.MultiheadAttention(E, H, bias=bias, batch_first=batch_first, dtype=dtype)
    ours = MultiheadAttention(E, H, bias=bias, batch_first=batch_first, dtype=dtype)
    ours.load_state_dict(ref.state_dict())  # torch's parameter names and shapes, unchanged
    return ref.eval(), ours.eval()


def _padding(batch, length, pads):
    mask = torch.zeros(batch, length, dtype=torch.bool)
    for b, p in enumerate(pads):
        if p > 0:
            mask[b, :p] = True  # left padding
    return mask


PARITY_CASES = {
    "self-B2-N13": dict(nq=13, nk=None),
    "self-causal-B2-N13": dict(nq=13, nk=None, causal=True),
    "self-causalmask-B2-N13": dict(nq=13, nk=None, attn_mask=True),
    "self-pad-B2-N13": dict(nq=13, nk=None, pads=(3, 0)),
    "self-causal-pad-B2-N13": dict(nq=13, nk=None, causal=True, pads=(0, 5)),
    "cross-pad-B2-Nq7-Nk19": dict(nq=7, nk=19, pads=(4, 1)),
    "self-nobias-seqfirst-B2-N9": dict(nq=9, nk=None, bias=False, batch_first=False),
}


@pytest.mark.parametrize("backend", BACKENDS, ids=str)
@pytest.mark.parametrize("case", list(PARITY_CASES), ids=str)
def test_matches_torch_multihead_attention(backend, case):
    spec = PARITY_CASES[case]
    backend_feature_param(backend, *(["key_padding_mask"] if "pads" in spec else []))
    dtype, tol = _dtype_tol(backend)
    ref, ours = _torch_pair(dtype, bias=spec.get("bias", True), batch_first=spec.get("batch_first", True))
    batch, nq, nk = 2, spec["nq"], spec["nk"] or spec["nq"]
    x = torch.randn(batch, nq, E, dtype=dtype)
    mem = x if spec["nk"] is None else torch.randn(batch, nk, E, dtype=dtype)
    kpm = _padding(batch, nk, spec["pads"]) if "pads" in spec else None
    causal_mask = torch.nn.Transformer.generate_square_subsequent_mask(nq, dtype=torch.bool) if (
        spec.get("causal") or spec.get("attn_mask")) else None  # bool, True = blocked
    if not spec.get("batch_first", True):
        x, mem = x.transpose(0, 1), mem.transpose(0, 1)
    expected, _ = ref(x, mem, mem, key_padding_mask=kpm, attn_mask=causal_mask, need_weights=False,
                      is_causal=causal_mask is not None)
    kwargs = {"attn_mask": causal_mask} if spec.get("attn_mask") else {"is_causal": bool(spec.get("causal"))}
    with attnkernels.backend(backend):
        got, weights = ours(x, mem, mem, key_padding_mask=kpm, **kwargs)
    assert weights is None
    torch.testing.assert_close(got, expected, **tol)


@pytest.mark.parametrize("backend", ["reference", "cpu"], ids=str)
def test_gradients_match_torch_B2_N11_causal_pad(backend):
    backend_feature_param(backend, "key_padding_mask")
    ref, ours = _torch_pair(torch.float64)
    x = torch.randn(2, 11, E, dtype=torch.float64)
    kpm = _padding(2, 11, (2, 0))
    causal_mask = torch.nn.Transformer.generate_square_subsequent_mask(11, dtype=torch.bool)
    expected, _ = ref(x, x, x, key_padding_mask=kpm, attn_mask=causal_mask, need_weights=False, is_causal=True)
    expected.square().sum().backward()
    with attnkernels.backend(backend):
        got, _ = ours(x, key_padding_mask=kpm, is_causal=True)  # key/value default to query
        got.square().sum().backward()  # the backend is chosen when the backward op runs, too
    for (name, p_ref), (_, p_ours) in zip(ref.named_parameters(), ours.named_parameters()):
        torch.testing.assert_close(p_ours.grad, p_ref.grad, rtol=1e-9, atol=1e-9, msg=lambda m: f"{name}: {m}")


def test_float32_matches_torch_B2_N13_causal_pad():
    """fp32 in, fp32 out: within fp32 tolerance of torch's module (issue 6's bar)."""
    ref, ours = _torch_pair(torch.float32)
    x = torch.randn(2, 13, E)
    kpm = _padding(2, 13, (3, 0))
    causal_mask = torch.nn.Transformer.generate_square_subsequent_mask(13, dtype=torch.bool)
    expected, _ = ref(x, x, x, key_padding_mask=kpm, attn_mask=causal_mask, need_weights=False, is_causal=True)
    with attnkernels.backend("reference"):
        got, _ = ours(x, key_padding_mask=kpm, is_causal=True)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "cpu"], ids=str)
@pytest.mark.parametrize("kdim,vdim,causal,batch_first", [(24, 40, False, True), (48, None, True, False)],
                         ids=["k24-v40-pad", "k48-causal-seqfirst-pad"])
def test_kdim_vdim_match_torch_float64(backend, kdim, vdim, causal, batch_first):
    backend_feature_param(backend, "key_padding_mask")
    ref = torch.nn.MultiheadAttention(E, H, kdim=kdim, vdim=vdim, batch_first=batch_first, dtype=torch.float64).eval()
    ours = MultiheadAttention(E, H, kdim=kdim, vdim=vdim, batch_first=batch_first, dtype=torch.float64).eval()
    assert ours.in_proj_weight is None and ours.k_proj_weight.shape == (E, kdim)
    assert set(ours.state_dict()) == set(ref.state_dict())
    ours.load_state_dict(ref.state_dict())  # torch's separate q/k/v weights, unchanged
    n = 10
    x = torch.randn(2, n, E, dtype=torch.float64)
    key = torch.randn(2, n, kdim, dtype=torch.float64)
    value = torch.randn(2, n, vdim or E, dtype=torch.float64)
    kpm = _padding(2, n, (0, 3)).flip(-1)  # right padding: no causal row is left without a key
    mask = torch.nn.Transformer.generate_square_subsequent_mask(n, dtype=torch.bool) if causal else None
    if not batch_first:
        x, key, value = x.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
    expected, expected_w = ref(x, key, value, key_padding_mask=kpm, attn_mask=mask, need_weights=True)
    with attnkernels.backend(backend):
        got, got_w = ours(x, key, value, key_padding_mask=kpm, is_causal=causal, need_weights=True)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got_w, expected_w, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="key: last dim"):
        ours(x)  # key defaults to query, whose width is embed_dim, not kdim


def test_unbatched_input_matches_batched_N6():
    ours = MultiheadAttention(E, H, dtype=torch.float64).eval()
    x = torch.randn(6, E, dtype=torch.float64)
    with attnkernels.backend("reference"):
        single, _ = ours(x, key_padding_mask=torch.tensor([True, False, False, False, False, False]))
        batched, _ = ours(x[None], key_padding_mask=torch.tensor([[True, False, False, False, False, False]]))
    assert single.shape == (6, E)
    torch.testing.assert_close(single, batched[0])


# ---- need_weights: the reference-path weights ---------------------------------------------------
@pytest.mark.parametrize("average", [True, False], ids=["avg", "per-head"])
@pytest.mark.parametrize("spec", [dict(nq=9, nk=None), dict(nq=9, nk=None, causal=True, pads=(2, 0)),
                                  dict(nq=6, nk=11, pads=(0, 3)), dict(nq=7, nk=None, batch_first=False, pads=(1, 2))],
                         ids=["self", "self-causal-pad", "cross-pad", "seqfirst-pad"])
def test_need_weights_match_torch_float64(spec, average):
    ref, ours = _torch_pair(torch.float64, batch_first=spec.get("batch_first", True))
    batch, nq, nk = 2, spec["nq"], spec["nk"] or spec["nq"]
    x = torch.randn(batch, nq, E, dtype=torch.float64)
    mem = x if spec["nk"] is None else torch.randn(batch, nk, E, dtype=torch.float64)
    kpm = _padding(batch, nk, spec["pads"]) if "pads" in spec else None
    if kpm is not None and spec.get("causal"):
        kpm = kpm.flip(-1)  # right padding: left padding leaves causal rows with no key (torch: NaN weights)
    causal_mask = torch.nn.Transformer.generate_square_subsequent_mask(nq, dtype=torch.bool) if spec.get("causal") else None
    if not spec.get("batch_first", True):
        x, mem = x.transpose(0, 1), mem.transpose(0, 1)
    expected, expected_w = ref(x, mem, mem, key_padding_mask=kpm, attn_mask=causal_mask, need_weights=True,
                               average_attn_weights=average)
    with attnkernels.backend("reference"):
        got, got_w = ours(x, mem, mem, key_padding_mask=kpm, is_causal=bool(spec.get("causal")), need_weights=True,
                          average_attn_weights=average)
    assert got_w.shape == expected_w.shape == ((batch, nq, nk) if average else (batch, H, nq, nk))
    torch.testing.assert_close(got_w, expected_w, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    if kpm is not None:
        padded_b = int(kpm.any(-1).nonzero()[0])
        assert got_w.amax() > 0 and bool(got_w[padded_b][..., kpm[padded_b]].eq(0).all())


def test_need_weights_unbatched_and_empty_rows_N5():
    ref, ours = _torch_pair(torch.float64)
    x = torch.randn(5, E, dtype=torch.float64)
    _, expected_w = ref(x, x, x, need_weights=True, average_attn_weights=False)
    with attnkernels.backend("reference"):
        _, got_w = ours(x, need_weights=True, average_attn_weights=False)
        _, all_padded = ours(x[None], key_padding_mask=torch.ones(1, 5, dtype=torch.bool), need_weights=True)
    torch.testing.assert_close(got_w, expected_w, rtol=1e-12, atol=1e-12)
    assert torch.equal(all_padded, torch.zeros(1, 5, 5, dtype=torch.float64)), "rows with no key: weights 0, not NaN"


def test_need_weights_window_family_matches_band_softmax_N12():
    module = MultiheadAttention(E, H, num_kv_heads=2, attention="window", window_size=(2, 1), dtype=torch.float64).eval()
    x = torch.randn(1, 12, E, dtype=torch.float64)
    with attnkernels.backend("reference"):
        _, w = module(x, need_weights=True, average_attn_weights=False)
    q, k, _ = F.linear(x, module.in_proj_weight, module.in_proj_bias).split([E, E // 2, E // 2], dim=-1)
    q = q.unflatten(-1, (H, E // H)).transpose(1, 2)
    k = k.unflatten(-1, (2, E // H)).transpose(1, 2).repeat_interleave(2, dim=1)
    i, j = torch.arange(12)[:, None], torch.arange(12)[None, :]
    band = (j >= i - 2) & (j <= i + 1)
    expected = torch.softmax((q @ k.transpose(-1, -2) / (E // H) ** 0.5).masked_fill(~band, float("-inf")), dim=-1)
    torch.testing.assert_close(w, expected, rtol=1e-12, atol=1e-12)


def test_need_weights_refused_for_linear_families():
    module = MultiheadAttention(32, 4, attention="linear").eval()
    with pytest.raises(ValueError, match="need_weights: attention='linear'"):
        module(torch.randn(1, 5, 32), need_weights=True)


# ---- the other families, against an independent masked-SDPA computation ------------------------
def _manual(module, x, mask):
    """Project with the module's weights and run torch SDPA with an explicit bool mask (True = attend)."""
    hk, dh = module.num_kv_heads, module.head_dim
    q, k, v = F.linear(x, module.in_proj_weight, module.in_proj_bias).split([E, hk * dh, hk * dh], dim=-1)
    q = q.unflatten(-1, (H, dh)).transpose(1, 2)
    k, v = (t.unflatten(-1, (hk, dh)).transpose(1, 2).repeat_interleave(H // hk, dim=1) for t in (k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return module.out_proj(out.transpose(1, 2).flatten(2))


@pytest.mark.parametrize("backend", BACKENDS, ids=str)
@pytest.mark.parametrize("window,causal", [((3, 2), False), ((4, 0), True), (2, False)], ids=["L3R2", "L4-causal", "w2"])
def test_window_family_B2_N17_Hk2(backend, window, causal):
    backend_param(backend)
    dtype, tol = _dtype_tol(backend)
    module = MultiheadAttention(E, H, num_kv_heads=2, attention="window", window_size=window, causal=causal, dtype=dtype).eval()
    x = torch.randn(2, 17, E, dtype=dtype)
    left, right = (window, window) if isinstance(window, int) else window
    i, j = torch.arange(17)[:, None], torch.arange(17)[None, :]
    band = (j >= i - left) & (j <= i + (0 if causal else right))
    with attnkernels.backend(backend):
        got, _ = module(x)
    torch.testing.assert_close(got, _manual(module, x, band), **tol)


@pytest.mark.parametrize("backend", BACKENDS, ids=str)
@pytest.mark.parametrize("kv_heads", [1, 2], ids=["Hk1", "Hk2"])
def test_dense_gqa_causal_B2_N15(backend, kv_heads):
    backend_param(backend)
    dtype, tol = _dtype_tol(backend)
    module = MultiheadAttention(E, H, num_kv_heads=kv_heads, causal=True, dtype=dtype).eval()
    assert module.in_proj_weight.shape == (E + 2 * kv_heads * (E // H), E)
    x = torch.randn(2, 15, E, dtype=dtype)
    with attnkernels.backend(backend):
        got, _ = module(x)
    torch.testing.assert_close(got, _manual(module, x, torch.ones(15, 15, dtype=torch.bool).tril()), **tol)


@pytest.mark.parametrize("backend", BACKENDS, ids=str)
def test_bigbird_family_B2_N112_bs16(backend):
    backend_feature_param(backend, "block_mask")
    dtype, tol = _dtype_tol(backend)
    module = MultiheadAttention(E, H, attention="bigbird", block_size=16, num_random_blocks=1, seed=3, dtype=dtype).eval()
    x = torch.randn(1 if backend == "triton" else 2, 112, E, dtype=dtype)  # the interpreter is slow
    with attnkernels.backend(backend):
        got, _ = module(x)
    layout = module.block_mask(112)
    assert module.block_mask(112) is layout, "the layout for one length is drawn once and cached"
    element = layout.element_mask(112, 112)  # (1, H, N, N)
    assert not element.all(), "the test needs a layout that is actually sparse"
    torch.testing.assert_close(got, _manual(module, x, element), **tol)
    with attnkernels.backend(backend):
        _, weights = module(x, need_weights=True, average_attn_weights=False)  # (B, H, N, N)
    assert bool(weights[~element.expand_as(weights)].eq(0).all()) and bool(weights[element.expand_as(weights)].gt(0).all())
    torch.testing.assert_close(weights.sum(-1), torch.ones_like(weights[..., 0]), **tol)


def _random_block_mask(n_blocks, heads, seed, block_size=16, q_len=None, kv_len=None):
    layout = torch.rand(heads, n_blocks, n_blocks, generator=torch.Generator().manual_seed(seed)) < 0.4
    layout |= torch.eye(n_blocks, dtype=torch.bool)  # every query block sees a key block: no empty rows
    return attnkernels.masks.from_dense(layout, block_size=block_size, q_len=q_len, kv_len=kv_len)


@pytest.mark.parametrize("backend", ["reference", "cpu"], ids=str)
def test_block_sparse_family_B2_N60_bs16(backend):
    backend_feature_param(backend, "block_mask")
    mask_a = _random_block_mask(4, H, seed=0, q_len=60, kv_len=60)  # partial last block
    mask_b = _random_block_mask(4, 1, seed=1, q_len=60, kv_len=60)
    module = MultiheadAttention(E, H, attention="block_sparse", block_mask=mask_a, dtype=torch.float64).eval()
    x = torch.randn(2, 60, E, dtype=torch.float64)
    kpm = _padding(2, 60, (0, 3))
    with attnkernels.backend(backend):
        got_a, _ = module(x)
        got_b, w_b = module(x, block_mask=mask_b, need_weights=True, average_attn_weights=False)  # per-call override
        got_pad, _ = module(x, key_padding_mask=kpm)
    element_a, element_b = mask_a.element_mask(60, 60), mask_b.element_mask(60, 60)
    assert not element_a.all() and not element_b.all() and not torch.equal(element_a, element_b.expand_as(element_a))
    torch.testing.assert_close(got_a, _manual(module, x, element_a), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got_b, _manual(module, x, element_b), rtol=1e-10, atol=1e-10)
    assert bool(w_b[~element_b.expand_as(w_b)].eq(0).all())
    with_pad = element_a & ~kpm[:, None, None, :]
    torch.testing.assert_close(got_pad, _manual(module, x, with_pad), rtol=1e-10, atol=1e-10)


def test_block_sparse_errors():
    with pytest.raises(ValueError, match="block_mask"):
        MultiheadAttention(E, H, attention="block_sparse")(torch.randn(1, 32, E))
    with pytest.raises(TypeError, match="block_mask"):
        MultiheadAttention(E, H, attention="block_sparse", block_mask=torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="block_mask"):
        MultiheadAttention(E, H, block_mask=_random_block_mask(2, 1, seed=0))
    with pytest.raises(ValueError, match="block_mask"):
        MultiheadAttention(E, H)(torch.randn(1, 32, E), block_mask=_random_block_mask(2, 1, seed=0))
    module = MultiheadAttention(E, H, attention="block_sparse", block_mask=_random_block_mask(2, 1, seed=0))
    with pytest.raises(ValueError, match="q_len"):
        module(torch.randn(1, 48, E))  # the mask was built for 32


def test_bigbird_seed_reproducible_and_redraw_changes_layout_N128_bs16():
    a = MultiheadAttention(E, H, attention="bigbird", block_size=16, num_random_blocks=2, seed=11)
    b = MultiheadAttention(E, H, attention="bigbird", block_size=16, num_random_blocks=2, seed=11)
    first = a.block_mask(128).to_dense()
    assert torch.equal(first, b.block_mask(128).to_dense())
    a.redraw()
    assert not torch.equal(first, a.block_mask(128).to_dense())


def test_bigbird_rejects_cross_attention_lengths():
    module = MultiheadAttention(E, H, attention="bigbird", block_size=16).eval()
    with pytest.raises(ValueError, match="bigbird"):
        module(torch.randn(1, 32, E), torch.randn(1, 48, E))


@pytest.mark.parametrize("attention,options", [
    ("dense", {}), ("dense", {"causal": True}), ("window", {"window_size": (4, 4)}),
    ("bigbird", {"block_size": 16, "num_random_blocks": 1, "seed": 0}),
], ids=["dense", "causal", "window", "bigbird"])
def test_padded_keys_do_not_change_output_B2_N48(attention, options):
    module = MultiheadAttention(E, H, attention=attention, dtype=torch.float64, **options).eval()
    x = torch.randn(2, 48, E, dtype=torch.float64)
    mem = torch.randn(2, 48, E, dtype=torch.float64)
    kpm = _padding(2, 48, (5, 2))
    scrambled = mem.clone()
    scrambled[kpm] = 1e3 * torch.randn(int(kpm.sum()), E, dtype=torch.float64)  # garbage in padded slots
    with attnkernels.backend("reference"):
        a, _ = module(x, mem, key_padding_mask=kpm)
        b, _ = module(x, scrambled, key_padding_mask=kpm)
        c, _ = module(x, mem)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(a, c), "padding must change the output"


# ---- linformer -----------------------------------------------------------------------------------
def _plain_linformer(module, x, mem, kpm=None):
    """Linformer written plainly in torch with the module's parameters: project K, V along the sequence, softmax."""
    hk, dh, n = module.num_kv_heads, module.head_dim, mem.shape[1]
    w_q, w_k, w_v = module.in_proj_weight.split([E, hk * dh, hk * dh])
    b_q, b_k, b_v = module.in_proj_bias.split([E, hk * dh, hk * dh])
    q = (x @ w_q.T + b_q).unflatten(-1, (H, dh)).transpose(1, 2)
    k = (mem @ w_k.T + b_k).unflatten(-1, (hk, dh)).transpose(1, 2)
    v = (mem @ w_v.T + b_v).unflatten(-1, (hk, dh)).transpose(1, 2)
    if kpm is not None:
        k = k * (~kpm)[:, None, :, None]
        v = v * (~kpm)[:, None, :, None]
    e = module.linformer_E[:, :n]
    f = e if module.share_kv else module.linformer_F[:, :n]
    k = torch.einsum("kn,bhnd->bhkd", e, k).repeat_interleave(H // hk, dim=1)
    v = torch.einsum("kn,bhnd->bhkd", f, v).repeat_interleave(H // hk, dim=1)
    p = torch.softmax(q @ k.transpose(-1, -2) / dh ** 0.5, dim=-1)
    return module.out_proj((p @ v).transpose(1, 2).flatten(2))


@pytest.mark.parametrize("backend", ["reference", "cpu"], ids=str)
@pytest.mark.parametrize("share_kv,kv_heads", [(False, 4), (True, 2)], ids=["EF-H4", "shared-Hk2"])
def test_linformer_matches_plain_torch_B2(backend, share_kv, kv_heads):
    backend_param(backend)
    module = MultiheadAttention(E, H, num_kv_heads=kv_heads, attention="linformer", linformer_k=8, max_seq_len=32,
                                share_kv=share_kv, dtype=torch.float64).eval()
    assert module.linformer_E.shape == (8, 32) and (module.linformer_F is None) == share_kv
    assert abs(float(module.linformer_E.detach().std()) - 8 ** -0.5) < 0.15, "Linformer init: normal, std 1/sqrt(k)"
    x = torch.randn(2, 20, E, dtype=torch.float64)  # shorter than max_seq_len: E[:, :20]
    mem = torch.randn(2, 27, E, dtype=torch.float64)
    with attnkernels.backend(backend):
        self_out, _ = module(x)
        cross_out, _ = module(x, mem)
    torch.testing.assert_close(self_out, _plain_linformer(module, x, x), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(cross_out, _plain_linformer(module, x, mem), rtol=1e-10, atol=1e-10)
    # gradients reach E and F
    cross_out.square().sum().backward()
    assert module.linformer_E.grad is not None and module.linformer_E.grad[:, :27].abs().sum() > 0
    assert module.linformer_E.grad[:, 27:].abs().sum() == 0


def test_linformer_padding_B2_N24():
    module = MultiheadAttention(E, H, attention="linformer", linformer_k=6, max_seq_len=24, dtype=torch.float64).eval()
    x = torch.randn(2, 24, E, dtype=torch.float64)
    kpm = _padding(2, 24, (5, 0))
    scrambled = x.clone()
    scrambled[kpm] = 1e3 * torch.randn(int(kpm.sum()), E, dtype=torch.float64)
    with attnkernels.backend("reference"):
        a, _ = module(x, key_padding_mask=kpm)
        b, _ = module(x, scrambled, key_padding_mask=kpm)
        c, _ = module(x)
    torch.testing.assert_close(a, _plain_linformer(module, x, x, kpm), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)  # padded keys/values contribute nothing
    assert not torch.allclose(a[0], c[0]), "padding must change the padded row"
    torch.testing.assert_close(a[1], c[1], rtol=1e-10, atol=1e-10)


def test_linformer_errors():
    with pytest.raises(ValueError, match="max_seq_len"):
        MultiheadAttention(E, H, attention="linformer")
    with pytest.raises(ValueError, match="causal"):
        MultiheadAttention(E, H, attention="linformer", max_seq_len=16, causal=True)
    with pytest.raises(ValueError, match="linformer_k"):
        MultiheadAttention(E, H, attention="linformer", max_seq_len=16, linformer_k=0)
    with pytest.raises(ValueError, match="max_seq_len"):
        MultiheadAttention(E, H, max_seq_len=16)  # only for linformer
    module = MultiheadAttention(E, H, attention="linformer", linformer_k=4, max_seq_len=16).eval()
    with pytest.raises(ValueError, match="max_seq_len"):
        module(torch.randn(1, 17, E))
    with pytest.raises(ValueError, match="causal"):
        module(torch.randn(1, 8, E), is_causal=True)
    with pytest.raises(ValueError, match="need_weights"):
        module(torch.randn(1, 8, E), need_weights=True)


# ---- linear families ------------------------------------------------------------------------------
def _contract_linear_attention(q, k, v, *, feature_map="elu", causal=False, normalize=True, eps=1e-6, scale=None,
                               key_padding_mask=None, **_):
    """The linear-attention contract written plainly (non-causal and causal), for the plumbing tests."""
    phi = {"elu": lambda t: F.elu(t) + 1, "relu": F.relu, "identity": lambda t: t}[feature_map]
    group = q.shape[1] // k.shape[1]  # GQA: query head h reads kv head h // group
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    q, k = phi(q * (1.0 if scale is None else scale)), phi(k)
    if key_padding_mask is not None:  # padded keys add nothing to S nor z
        keep = (~key_padding_mask)[:, None, :, None].to(k.dtype)
        k, v = k * keep, v * keep
    if causal:
        scores = torch.einsum("bhid,bhjd->bhij", q, k).tril()
        num, den = scores @ v, scores.sum(-1, keepdim=True)
    else:
        num, den = q @ (k.transpose(-1, -2) @ v), q @ k.sum(-2, keepdim=True).transpose(-1, -2)
    return num / (den + eps) if normalize else num


@pytest.fixture
def linear_attention_impl(request, monkeypatch):
    """The real attnkernels.linear_attention when merged; else the plain contract, patched in."""
    if request.param == "merged":
        if not hasattr(attnkernels, "linear_attention"):
            pytest.skip("attnkernels.linear_attention is not merged yet")
    else:
        monkeypatch.setattr(attnkernels, "linear_attention", _contract_linear_attention, raising=False)
    return request.param


@pytest.mark.parametrize("linear_attention_impl", ["merged", "contract-stub"], indirect=True)
@pytest.mark.parametrize("feature_map", ["elu", "relu"])
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_linear_padded_keys_are_removed_B2_N20(linear_attention_impl, feature_map, causal):
    module = MultiheadAttention(E, H, num_kv_heads=2, attention="linear", feature_map=feature_map, causal=causal,
                                dtype=torch.float64).eval()
    x = torch.randn(2, 20, E, dtype=torch.float64)
    kpm = _padding(2, 20, (6, 0))
    scrambled = x.clone()
    scrambled[kpm] = 50 * torch.randn(int(kpm.sum()), E, dtype=torch.float64)
    keep = ~kpm
    a, _ = module(x, key_padding_mask=kpm)
    b, _ = module(x, scrambled, scrambled, key_padding_mask=kpm)  # only the padded keys/values differ
    torch.testing.assert_close(a[keep], b[keep], rtol=1e-9, atol=1e-9)
    # the pre-featurised path (taken with a mask) agrees with the fused feature map (taken without one)
    no_pad = torch.zeros(2, 20, dtype=torch.bool)
    torch.testing.assert_close(module(x, key_padding_mask=no_pad)[0], module(x)[0], rtol=1e-9, atol=1e-9)
    # and removing the padded tokens altogether gives the same rows
    short, _ = module(x[1:, :], key_padding_mask=None)
    torch.testing.assert_close(a[1], short[0], rtol=1e-9, atol=1e-9)
    trimmed, _ = module(x[:1, 6:])
    torch.testing.assert_close(a[0, 6:], trimmed[0], rtol=1e-9, atol=1e-9)


def test_performer_padding_and_redraw_B2_N20():
    if not hasattr(attnkernels, "PerformerFeatures"):
        pytest.skip("attnkernels.PerformerFeatures (linear attention) is not merged yet")
    module = MultiheadAttention(E, H, attention="performer", num_features=32, seed=0, dtype=torch.float64).eval()
    x = torch.randn(2, 20, E, dtype=torch.float64)
    kpm = _padding(2, 20, (4, 0))
    trimmed, _ = module(x[:1, 4:])
    padded, _ = module(x, key_padding_mask=kpm)
    torch.testing.assert_close(padded[0, 4:], trimmed[0], rtol=1e-8, atol=1e-8)
    module.redraw(generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(module(x[:1, 4:])[0], trimmed)


# ---- bad input ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,error,match", [
    ({"embed_dim": 30, "num_heads": 4}, ValueError, "embed_dim"),
    ({"embed_dim": 32, "num_heads": 4, "num_kv_heads": 3}, ValueError, "num_kv_heads"),
    ({"embed_dim": 32, "num_heads": 4, "attention": "longformer"}, ValueError, "attention"),
    ({"embed_dim": 32, "num_heads": 4, "attention": "window"}, ValueError, "window_size"),
    ({"embed_dim": 32, "num_heads": 4, "window_size": 3}, ValueError, "window_size"),
    ({"embed_dim": 32, "num_heads": 4, "attention": "bigbird", "num_window_blocks": 2}, ValueError, "num_window_blocks"),
    ({"embed_dim": 32, "num_heads": 4, "dropout": 1.5}, ValueError, "dropout"),
], ids=["E-not-divisible", "bad-kv-heads", "unknown-family", "window-missing", "window-unused", "even-window-blocks", "dropout-range"])
def test_constructor_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        MultiheadAttention(**kwargs)


def test_forward_errors_name_the_argument():
    module = MultiheadAttention(32, 4).eval()
    x = torch.randn(2, 5, 32)
    with attnkernels.backend("reference"):
        _check_forward_errors(module, x)


def _check_forward_errors(module, x):
    with pytest.raises(TypeError, match="need_weights"):
        module(x, need_weights="yes")
    with pytest.raises(ValueError, match="key_padding_mask"):
        module(x, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="key_padding_mask"):
        module(x, key_padding_mask=torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"attn_mask: expected shape \(Nq, Nk\)"):
        module(x, attn_mask=torch.rand(5, 4) > 0.5)
    with pytest.raises(TypeError, match="attn_mask: expected dtype"):
        module(x, attn_mask=torch.zeros(5, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="query"):
        module(torch.randn(2, 5, 31))


def test_dropout_in_training_refused_by_the_linear_families():
    module = MultiheadAttention(32, 4, attention="linear", dropout=0.1).train()
    x = torch.randn(2, 5, 32)
    with pytest.raises(NotImplementedError, match="dropout"):
        module(x)
    module.eval()
    assert module(x)[0].shape == x.shape  # eval mode with dropout set is fine


def test_float_key_padding_mask_is_converted_B1_N5():
    module = MultiheadAttention(32, 4, dtype=torch.float64).eval()
    x = torch.randn(1, 5, 32, dtype=torch.float64)
    as_bool = torch.tensor([[True, False, False, True, False]])
    as_float = torch.zeros(1, 5, dtype=torch.float64).masked_fill(as_bool, float("-inf"))
    with attnkernels.backend("reference"):
        torch.testing.assert_close(module(x, key_padding_mask=as_float)[0], module(x, key_padding_mask=as_bool)[0])


# ---- attn_mask (any mask torch takes) and dropout ----------------------------------------------
MASK_CASES = {
    "bool-2d": lambda b, h, n: torch.rand(n, n, generator=torch.Generator().manual_seed(3)) > 0.6,
    "float-2d": lambda b, h, n: torch.randn(n, n, generator=torch.Generator().manual_seed(3), dtype=torch.float64),
    "float-3d": lambda b, h, n: torch.randn(b * h, n, n, generator=torch.Generator().manual_seed(3),
                                           dtype=torch.float64),
    "bool-3d": lambda b, h, n: torch.rand(b * h, n, n, generator=torch.Generator().manual_seed(3)) > 0.6,
}


@pytest.mark.parametrize("backend", ["reference", "cpu"], ids=str)
@pytest.mark.parametrize("mask_kind", list(MASK_CASES))
def test_any_attn_mask_matches_torch_B2_N9_float64(mask_kind, backend):
    backend_modifier_param(backend, "attn_bias")
    torch.manual_seed(0)
    ref = torch.nn.MultiheadAttention(E, H, batch_first=True, dtype=torch.float64).eval()
    ours = MultiheadAttention(E, H, batch_first=True, dtype=torch.float64).eval()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 9, E, dtype=torch.float64, requires_grad=True)
    mask = MASK_CASES[mask_kind](2, H, 9)
    if mask.dtype == torch.bool:
        mask[..., 0] = False  # every row keeps a key: torch gives NaN for fully blocked rows
    expected, expected_w = ref(x, x, x, attn_mask=mask, need_weights=True, average_attn_weights=False)
    with attnkernels.backend(backend):
        got, got_w = ours(x, attn_mask=mask, need_weights=True, average_attn_weights=False)
        dx = torch.autograd.grad(got.sum(), x)[0]
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got_w, expected_w, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dx, torch.autograd.grad(expected.sum(), x)[0], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", ["reference", "cpu"], ids=str)
def test_dropout_trains_B2_N12(backend):
    """dropout > 0 in training: outputs differ from eval and between seeds, repeat under one seed, and
    the parameters get finite gradients; eval mode is the plain module."""
    backend_modifier_param(backend, "dropout")
    module = MultiheadAttention(E, H, dropout=0.4, batch_first=True, causal=True).train()
    x = torch.randn(2, 12, E)

    def run(seed):
        torch.manual_seed(seed)
        with attnkernels.backend(backend):
            out = module(x)[0]
            out.square().sum().backward()
        return out.detach()

    first, again, other = run(1), run(1), run(2)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert all(torch.isfinite(p.grad).all() for p in module.parameters())
    module.eval()
    with attnkernels.backend(backend):
        plain = module(x)[0]
    assert not torch.allclose(first, plain)
