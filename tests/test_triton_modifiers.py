"""Score modifiers in the Triton softmax-attention kernels (softcap, ALiBi, attn_bias with its
gradient, dropout; sinks around them, applied by the ops) under TRITON_INTERPRET=1 on CPU
tensors, through the public API (`attnkernels.attention(...)` inside
`attnkernels.backend("triton")`), against the float64 reference (reference.py).

Tolerance: FlashAttention's rule (tests/tolerance.py): the kernel's max error against the
float64 reference at most 2x that of the same computation in the input dtype
(`attention_reference(..., upcast=False)`) plus a small floor. fp32 everywhere, plus one fp16
case per modifier (bf16 `tl.dot` is wrong under the interpreter: bf16 is the compile gate's).

Dropout: the kernels regenerate dropout.py's Philox mask; its exactness is checked bit for
bit (an identity V makes out[i, j] != 0 exactly where key j is kept), and out / grads agree
with the reference backend run with the same-seeded generator.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math

import pytest
import torch

import attnkernels
from attnkernels import masks
from attnkernels.softmax import triton_launch as A
from attnkernels.softmax.dropout import draw_seed, effective_rate, keep_mask
from attnkernels.softmax.reference import attention_reference
from tests.backend_params import backend_param
from tests.tolerance import assert_within_rule

# Outputs the kernels allocate are NaN until written (fixture in conftest.py).
pytestmark = pytest.mark.usefixtures("poison_empty")

NEG_INF = float("-inf")


@dataclasses.dataclass(frozen=True)
class Case:
    b: int
    hq: int
    hk: int
    nq: int
    nk: int
    d: int
    causal: bool = False
    window: tuple | None = None
    sparse: str | None = None  # "bigbird" | "sliding" (block 16)
    kpm: bool = False
    softcap: float = 0.0
    alibi: str | None = None  # "h" -> (Hq,), "bh" -> (B, Hq)
    bias: str | None = None  # "bhnm" (1,H,N,M) | "b11m" (B,1,1,M) | "nm" (N,M) | "bool" | "rowinf" | "full"
    sinks: bool = False
    dropout: float = 0.0
    dtype: torch.dtype = torch.float32
    tiles: tuple | None = None

    @property
    def id(self) -> str:
        parts = [f"B{self.b}-H{self.hq}-Hk{self.hk}-N{self.nq}-M{self.nk}-D{self.d}"]
        parts.append("causal" if self.causal else f"win{self.window[0]}_{self.window[1]}" if self.window else "dense")
        if self.sparse:
            parts.append(self.sparse)
        if self.kpm:
            parts.append("kpm")
        if self.softcap:
            parts.append("softcap")
        if self.alibi:
            parts.append(f"alibi_{self.alibi}")
        if self.bias:
            parts.append(f"bias_{self.bias}")
        if self.sinks:
            parts.append("sinks")
        if self.dropout:
            parts.append(f"drop{round(self.dropout * 100)}")
        if self.dtype != torch.float32:
            parts.append({torch.float16: "fp16", torch.bfloat16: "bf16"}[self.dtype])
        if self.tiles:
            parts.append(f"M{self.tiles[0]}N{self.tiles[1]}")
        return "-".join(parts)


def _bias(case: Case, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(the bias the API gets, its float form for the reference, whether it takes a gradient)."""
    b, h, n, m = case.b, case.hq, case.nq, case.nk
    if case.bias == "bool":  # SDPA's attn_mask, True = attend; query row 2 of batch 0 sees nothing
        mask = torch.rand(b, 1, n, m, generator=gen) < 0.7
        mask[0, :, 2] = False
        return mask, torch.zeros(mask.shape).masked_fill(~mask, NEG_INF), False
    shape = {"bhnm": (1, h, n, m), "b11m": (b, 1, 1, m), "nm": (n, m), "rowinf": (b, h, n, m),
             "full": (b, h, n, m)}[case.bias]
    bias = torch.randn(shape, generator=gen)
    if case.bias == "rowinf":  # rows hidden entirely by the bias, and scattered hidden keys
        bias[0, 0, 1] = NEG_INF
        bias[-1, -1, n - 1] = NEG_INF
        bias[..., 3] = NEG_INF
    return bias, bias, True


def _block_mask(case: Case):
    if case.sparse == "bigbird":
        return masks.bigbird(case.nq, block_size=16, num_global_blocks=1, num_window_blocks=3, num_random_blocks=1,
                             num_heads=case.hq, seed=case.nq + case.hq, causal=case.causal)
    if case.sparse == "sliding":
        return masks.sliding_window(case.nq, block_size=16, window_size=(20, 0), causal=case.causal)
    return None


def _inputs(case: Case):
    gen = torch.Generator().manual_seed(case.nq * 131 + case.nk * 7 + case.hq)
    q = torch.randn(case.b, case.hq, case.nq, case.d, generator=gen)
    k = torch.randn(case.b, case.hk, case.nk, case.d, generator=gen)
    v = torch.randn(case.b, case.hk, case.nk, case.d, generator=gen)
    kw, ref_kw, grads = {}, {}, {}
    if case.causal:
        kw["causal"] = ref_kw["causal"] = True
    if case.window:
        kw["window_size"] = ref_kw["window_size"] = case.window
    block_mask = _block_mask(case)
    if block_mask is not None:
        kw["block_mask"] = ref_kw["block_mask"] = block_mask
    if case.kpm:
        kpm = torch.rand(case.b, case.nk, generator=gen) < 0.25
        kpm[:, -3:] = True
        kw["key_padding_mask"] = ref_kw["key_padding_mask"] = kpm
    if case.softcap:
        kw["softcap"] = ref_kw["softcap"] = case.softcap
    if case.alibi:
        slopes = torch.rand(case.hq if case.alibi == "h" else (case.b, case.hq), generator=gen) * 0.5
        kw["alibi_slopes"] = slopes
        ref_kw["alibi_slopes"] = slopes.double().expand(case.b, case.hq)
    if case.bias:
        bias, bias_ref, needs_grad = _bias(case, gen)
        kw["attn_bias"], ref_kw["attn_bias"] = bias, bias_ref
        if needs_grad:
            grads["attn_bias"] = bias
    if case.sinks:
        grads["sinks"] = kw["sinks"] = ref_kw["sinks"] = torch.randn(case.hq, generator=gen)
    if case.dropout:
        kw["dropout_p"] = ref_kw["dropout_p"] = case.dropout
    return (q, k, v), kw, ref_kw, grads


def _seed_of(generator_seed: int) -> int:
    """The dropout seed the API draws from a generator seeded so (what SoftmaxCall.build does)."""
    return int(draw_seed(torch.Generator().manual_seed(generator_seed), "cpu"))


def _reference(qkv, ref_kw, grads, dout, dtype, seed):
    """(out, lse, {name: grad}) of attention_reference in float64 (dtype None) or in `dtype`."""
    upcast = dtype is None
    cast = (lambda t: t.double()) if upcast else (lambda t: t.to(dtype))
    leaves = {n: cast(t).detach().requires_grad_() for n, t in zip("qkv", qkv)}
    kw = dict(ref_kw, dropout_seed=seed)
    for name in grads:
        kw[name] = leaves[name] = cast(ref_kw[name]).detach().requires_grad_()
    if "attn_bias" in kw and "attn_bias" not in grads:
        kw["attn_bias"] = cast(kw["attn_bias"])
    out, lse = attention_reference(leaves["q"], leaves["k"], leaves["v"], upcast=upcast, **kw)
    names = list(leaves)
    g = torch.autograd.grad(out, [leaves[n] for n in names], cast(dout))
    return out, lse, dict(zip(names, g))


def _triton(qkv, kw, grads, dout, generator_seed, tiles):
    leaves = {n: t.clone().requires_grad_() for n, t in zip("qkv", qkv)}
    kw = dict(kw)
    for name in grads:
        kw[name] = leaves[name] = grads[name].clone().requires_grad_()
    with attnkernels.backend("triton"), (A.override_blocks(*tiles) if tiles else contextlib.nullcontext()):
        out, lse = attnkernels.attention(leaves["q"], leaves["k"], leaves["v"], return_lse=True,
                                         generator=torch.Generator().manual_seed(generator_seed), **kw)
        names = list(leaves)
        g = torch.autograd.grad(out, [leaves[n] for n in names], dout)
    return out, lse, dict(zip(names, g))


def run_case(case: Case):
    backend_param("triton")
    qkv, kw, ref_kw, grads = _inputs(case)
    qkv = tuple(t.to(case.dtype) for t in qkv)
    dout = torch.randn(case.b, case.hq, case.nq, case.d).to(case.dtype)
    generator_seed = 1000 + case.nq
    seed = _seed_of(generator_seed) if case.dropout else 0
    out, lse, g = _triton(qkv, kw, grads, dout, generator_seed, case.tiles)
    assert out.dtype == case.dtype and lse.dtype == torch.float32
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    out64, lse64, g64 = _reference(qkv, ref_kw, grads, dout, None, seed)
    out_s, lse_s, g_s = _reference(qkv, ref_kw, grads, dout, case.dtype, seed)
    assert_within_rule("out", out, out64, out_s, case.dtype)
    assert_within_rule("lse", lse, lse64, lse_s.float(), case.dtype)
    for name in g64:
        assert g[name].shape == g64[name].shape, name
        assert not torch.isnan(g[name]).any(), f"d{name}: NaN"
        assert_within_rule(f"d{name}", g[name], g64[name], g_s[name], case.dtype)
    return out, lse, g, lse64


# (B, Hq, Hk, Nq, Nk, D): odd sizes, GQA, Nq != Nk; each modifier alone, then together
CASES = [
    Case(2, 4, 2, 37, 45, 16, causal=True, softcap=5.0),
    Case(1, 2, 1, 45, 37, 32, window=(8, 3), softcap=2.0, tiles=(16, 16)),
    Case(2, 4, 2, 37, 45, 16, alibi="h"),
    Case(2, 2, 1, 45, 30, 16, causal=True, alibi="bh", tiles=(16, 16)),
    Case(2, 4, 2, 37, 45, 16, bias="bhnm"),
    Case(2, 2, 2, 33, 50, 16, causal=True, kpm=True, bias="b11m"),
    Case(1, 4, 1, 41, 41, 16, window=(6, 6), bias="nm", tiles=(16, 16)),
    Case(2, 2, 1, 37, 45, 16, bias="bool"),
    Case(2, 2, 2, 40, 33, 16, causal=True, bias="rowinf", sinks=True),
    Case(2, 4, 2, 37, 45, 16, dropout=0.3),
    Case(2, 2, 1, 45, 37, 16, causal=True, kpm=True, dropout=0.5, tiles=(16, 16)),
    Case(1, 4, 2, 64, 64, 16, sparse="bigbird", softcap=4.0, bias="full"),
    Case(1, 2, 2, 70, 70, 16, causal=True, sparse="sliding", alibi="h", dropout=0.2),
    Case(2, 4, 2, 37, 45, 16, causal=True, softcap=5.0, alibi="bh", bias="full", sinks=True, dropout=0.25,
         tiles=(16, 16)),
    Case(2, 2, 1, 33, 47, 32, window=(9, 2), kpm=True, softcap=3.0, alibi="h", bias="b11m", dropout=0.1),
    # one fp16 case per modifier
    Case(1, 2, 1, 37, 45, 16, causal=True, softcap=5.0, dtype=torch.float16),
    Case(1, 2, 1, 37, 45, 16, alibi="h", dtype=torch.float16),
    Case(1, 2, 1, 37, 45, 16, bias="bhnm", dtype=torch.float16),
    Case(1, 2, 1, 37, 45, 16, causal=True, dropout=0.3, dtype=torch.float16),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_modifiers_match_reference(case):
    run_case(case)


def test_rows_hidden_by_bias_are_empty():
    """A float bias that is -inf on a whole row: out 0, lse -inf, zero (not NaN) grads of that
    row's q and bias; with a -inf key column, that key gets dk = dv = 0."""
    case = Case(2, 2, 2, 40, 33, 16, causal=True, bias="rowinf")
    out, lse, g, lse64 = run_case(case)
    assert torch.isneginf(lse[0, 0, 1]) and torch.isneginf(lse[-1, -1, -1])
    assert torch.equal(out[0, 0, 1], torch.zeros_like(out[0, 0, 1]))
    assert torch.equal(g["q"][0, 0, 1], torch.zeros_like(g["q"][0, 0, 1]))
    assert torch.equal(g["attn_bias"][0, 0, 1], torch.zeros_like(g["attn_bias"][0, 0, 1]))
    assert torch.equal(g["k"][..., 3, :], torch.zeros_like(g["k"][..., 3, :]))
    assert torch.equal(torch.isneginf(lse), torch.isneginf(lse64))


# ----------------------------------------------------------------------------------------
# dropout: the mask itself
# ----------------------------------------------------------------------------------------


def _identity_v_out(b, hq, hk, nq, nk, p, generator_seed, backend="triton", **kw):
    """out with V = I (Nk = Dv): out[b, h, i, j] = P_ij · keep_ij / (1 - p), so out != 0 is the
    keep mask exactly (every P_ij > 0 on a dense row)."""
    gen = torch.Generator().manual_seed(b * 1000 + hq * 100 + nq + nk)  # the same q, k on every call
    q = torch.randn(b, hq, nq, 16, generator=gen) * 0.1
    k = torch.randn(b, hk, nk, 16, generator=gen) * 0.1
    v = torch.eye(nk).expand(b, hk, nk, nk).contiguous()
    with attnkernels.backend(backend):
        return attnkernels.attention(q, k, v, dropout_p=p, generator=torch.Generator().manual_seed(generator_seed),
                                     **kw)


@pytest.mark.parametrize("p, blocks", [(0.4, (16, 16)), (0.1, (16, 32)), (1 / 512, (32, 64))],
                         ids=["p0.4-16x16", "p0.1-16x32", "p1_512-32x64"])
def test_dropout_mask_is_the_reference_mask_exactly(p, blocks):
    """Key tiles of 16 (one Philox call each), 32 and 64: the bytes' order within and across calls."""
    backend_param("triton")
    b, hq, hk, nq, nk = 2, 4, 2, 37, 48
    with A.override_blocks(*blocks):
        out = _identity_v_out(b, hq, hk, nq, nk, p, 11)
    keep = keep_mask(_seed_of(11), p, b, hq, nq, nk)
    assert torch.equal(out != 0, keep)
    ref = _identity_v_out(b, hq, hk, nq, nk, p, 11, backend="reference")
    assert torch.equal(ref != 0, keep)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-7)


def test_dropout_keep_rate_and_heads_differ():
    backend_param("triton")
    b, hq, hk, nq, nk, p = 1, 4, 4, 64, 64, 0.3
    out = _identity_v_out(b, hq, hk, nq, nk, p, 5)
    kept = (out != 0).double()
    n = kept.numel()
    rate = kept.mean().item()
    # binomial: 5 standard deviations around the rounded rate (77/256)
    q = effective_rate(p)
    assert abs(rate - (1 - q)) < 5 * math.sqrt(q * (1 - q) / n), rate
    for h in range(1, hq):
        assert not torch.equal(kept[0, 0], kept[0, h]), f"heads 0 and {h} share a dropout mask"
        assert abs((kept[0, 0] != kept[0, h]).double().mean().item() - 2 * q * (1 - q)) < 0.05
    # another seed, another mask
    other = _identity_v_out(b, hq, hk, nq, nk, p, 6) != 0
    assert not torch.equal(other, out != 0)


def test_dropout_p0_equals_the_plain_call():
    backend_param("triton")
    q, k, v = torch.randn(2, 2, 37, 16), torch.randn(2, 1, 45, 16), torch.randn(2, 1, 45, 16)
    with attnkernels.backend("triton"):
        plain = attnkernels.attention(q, k, v, causal=True, softcap=4.0)
        p0 = attnkernels.attention(q, k, v, causal=True, softcap=4.0, dropout_p=0.0,
                                   generator=torch.Generator().manual_seed(3))
    assert torch.equal(plain, p0)


def test_dropout_backward_regenerates_the_forward_mask():
    """Gradients through the same-seeded reference backend: the backward's mask is the
    forward's (a different mask would move dv by O(1))."""
    backend_param("triton")
    q, k, v = torch.randn(1, 2, 33, 16), torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16)
    dout = torch.randn(1, 2, 33, 16)
    results = {}
    for backend in ("triton", "reference"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        with attnkernels.backend(backend):
            out = attnkernels.attention(*leaves, dropout_p=0.5, generator=torch.Generator().manual_seed(9))
            results[backend] = (out, *torch.autograd.grad(out, leaves, dout))
    for name, got, want in zip(("out", "dq", "dk", "dv"), results["triton"], results["reference"]):
        torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-4, atol=1e-5, msg=name)


# ----------------------------------------------------------------------------------------
# the launcher's own checks (a direct call that would read out of bounds)
# ----------------------------------------------------------------------------------------


def _direct_call(**modifiers):
    from attnkernels.softmax.call import SoftmaxCall

    return dataclasses.replace(SoftmaxCall(0.25), **modifiers)


def test_launcher_checks_modifier_shapes():
    q = torch.randn(2, 2, 20, 16)
    with pytest.raises(ValueError, match="attn_bias"):
        A.forward(_direct_call(attn_bias=torch.zeros(1, 2, 21, 20)), q, q, q)
    with pytest.raises(ValueError, match="attn_bias"):
        A.forward(_direct_call(attn_bias=torch.zeros(20, 20)), q, q, q)  # not 4-D
    with pytest.raises(ValueError, match="alibi_slopes"):
        A.forward(_direct_call(alibi_slopes=torch.zeros(2)), q, q, q)
    with pytest.raises(ValueError, match="dropout_seed"):
        A.forward(_direct_call(dropout_p=0.1), q, q, q)  # no seed
    with pytest.raises(ValueError, match="dropout_seed"):
        A.forward(_direct_call(dropout_p=0.1, dropout_seed=torch.tensor(3, dtype=torch.int32)), q, q, q)


def test_modifier_configs_are_gpu_sized():
    """The modifier tiers' tiles (A._MODIFIER_CONFIGS): powers of two >= 16, never larger than
    the plain tile, and still wgmma-sized on sm_90a (>= 64 resident rows per warpgroup)."""
    assert A.modifier_tier(()) is None and A.modifier_tier({"softcap", "alibi"}) == "light"
    assert A.modifier_tier({"softcap", "dropout"}) == "heavy" and A.modifier_tier({"attn_bias"}) == "heavy"
    for arch in A.ARCHS:
        for d in (32, 64, 128, 256):
            for kernel in ("fwd", "dkdv", "dq"):
                plain = A.block_config(kernel, d, d, torch.bfloat16, arch=arch)
                for mods in ({"softcap"}, {"alibi", "softcap"}, {"attn_bias"}, {"dropout"},
                             {"softcap", "alibi", "attn_bias", "dropout"}):
                    cfg = A.block_config(kernel, d, d, torch.bfloat16, arch=arch, modifiers=mods)
                    for size in (cfg.block_m, cfg.block_n):
                        assert size >= 16 and size & (size - 1) == 0, (arch, d, kernel, mods, cfg)
                    assert cfg.block_m * cfg.block_n <= plain.block_m * plain.block_n, (arch, d, kernel, mods)
                    if arch == 90 and d in (64, 128):
                        rows = cfg.block_n if kernel == "dkdv" else cfg.block_m
                        assert rows // max(1, cfg.num_warps // 4) >= 64, (d, kernel, mods, cfg)
                    sparse = A.block_config(kernel, d, d, torch.bfloat16, 16, arch, mods)
                    assert (sparse.block_m, sparse.block_n) == (16, 16)
