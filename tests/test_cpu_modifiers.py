"""Score modifiers in the C++ CPU softmax kernels (csrc/softmax.cpp): softcap, ALiBi, attn_bias (+dbias),
dropout, and sinks (applied by the ops around the kernel), forward and backward, against the float64 reference.

Everything goes through the public API (`attnkernels.attention(..., softcap=, alibi_slopes=, sinks=,
attn_bias=, dropout_p=, generator=)`) under `attnkernels.backend("cpu")`, so the call's checks, the ops'
sink handling and the bias gradient's reduction to the bias's own shape are part of what is tested.

Tolerances (as tests/test_cpu_attention.py):
- float64: out / lse / dq / dk / dv / dsinks / dbias within 1e-10 of the float64 reference
  (`attention_reference_backward`, the backward spelled out).
- float32 / bfloat16 / float16: FlashAttention's rule (tests/tolerance.py): <= 2 x the error of the same
  computation done plainly in the input dtype (`attention_reference(..., upcast=False)` with autograd).
Dropout: the kernel's keep mask is the reference's bit for bit (the call draws its seed from `generator`;
the reference gets the same seed from a same-seeded generator), so dropout cases use the same tolerances.
"""
from __future__ import annotations

import math

import pytest
import torch

import attnkernels
from attnkernels import masks
from attnkernels.softmax import cpu_launch
from attnkernels.softmax.dropout import draw_seed, effective_rate, keep_mask, keep_scale
from attnkernels.softmax.reference import attention_reference, attention_reference_backward

from .backend_params import backend_unavailable
from .cpu_helpers import CAUSAL, DENSE, one_thread, ops, window_mode  # noqa: F401 (one_thread: autouse fixture)
from .tolerance import assert_within_rule

_REASON = backend_unavailable("cpu")
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"C++ CPU kernels unavailable: {_REASON}")

FP64_ATOL = 1e-10
DTYPE_IDS = {torch.float64: "fp64", torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
GEN_SEED = 1234  # the seed of the generator the dropout cases pass


# ----------------------------------------------------------------------------------------
# one case: the inputs, the API call on the kernels, the references
# ----------------------------------------------------------------------------------------


class Case:
    """Shape (B, Hq, Hk, Nq, Nk, D) and the call's options; `id` names them all."""

    def __init__(self, shape, window=DENSE, *, softcap=None, alibi=None, bias=None, sinks=False, dropout_p=0.0,
                 block_size=0, kpm=False, empty_rows=False, inf_tile=False):
        self.shape, self.window = shape, window
        self.softcap, self.alibi, self.bias, self.sinks, self.dropout_p = softcap, alibi, bias, sinks, dropout_p
        self.block_size, self.kpm, self.empty_rows, self.inf_tile = block_size, kpm, empty_rows, inf_tile

    @property
    def id(self) -> str:
        b, hq, hk, nq, nk, d = self.shape
        parts = [f"B{b}", f"H{hq}", f"Hk{hk}", f"N{nq}", f"M{nk}", f"D{d}", window_mode(self.window)]
        if self.block_size:
            parts.append(f"sparse{self.block_size}")
        if self.kpm:
            parts.append("kpm")
        if self.softcap:
            parts.append(f"softcap{self.softcap:g}")
        if self.alibi:
            parts.append("alibi" + ("BH" if self.alibi == "BH" else "H"))
        if self.bias:
            parts.append("bias" + ("bool" if self.bias == "bool" else "x".join(map(str, self.bias))))
        if self.empty_rows:
            parts.append("infrows")
        if self.inf_tile:
            parts.append("inftile")
        if self.sinks:
            parts.append("sinks")
        if self.dropout_p:
            parts.append(f"drop{self.dropout_p:g}")
        return "-".join(parts)

    def inputs(self, dtype, seed=0):
        """(q, k, v, dout, options): options are attention()'s keywords (tensors in their own dtypes)."""
        b, hq, hk, nq, nk, d = self.shape
        g = torch.Generator().manual_seed(seed)
        q = torch.randn(b, hq, nq, d, generator=g).to(dtype)
        k = torch.randn(b, hk, nk, d, generator=g).to(dtype)
        v = torch.randn(b, hk, nk, d, generator=g).to(dtype)
        dout = torch.randn(b, hq, nq, d, generator=g).to(dtype)
        param = torch.float64 if dtype == torch.float64 else torch.float32
        opts = dict(window_size=self.window)
        if self.softcap:
            opts["softcap"] = self.softcap
        if self.alibi:
            opts["alibi_slopes"] = torch.rand((b, hq) if self.alibi == "BH" else (hq,), generator=g, dtype=param) * 0.3
        if self.bias == "bool":
            mask = torch.rand(b, 1, nq, nk, generator=g) < 0.8
            mask[:, :, :, 0] = True  # every row sees a key (dense)
            if self.empty_rows:
                mask[0, :, 3] = False
            opts["attn_bias"] = mask
        elif self.bias:
            bias = torch.randn(self.bias, generator=g, dtype=param)
            if self.empty_rows:  # rows hidden by a -inf bias: out 0, lse -inf, zero grads
                bias[..., 3, :] = float("-inf")
                bias[..., -1, :] = float("-inf")
            if self.inf_tile:  # a whole key tile (the kernels' tiles are 256 keys) -inf for every row
                bias[..., 256:512] = float("-inf")
            opts["attn_bias"] = bias.requires_grad_()
        if self.sinks:
            opts["sinks"] = (torch.randn(hq, generator=g, dtype=param)).requires_grad_()
        if self.dropout_p:
            opts["dropout_p"] = self.dropout_p
        if self.block_size:
            nb_q, nb_k = -(-nq // self.block_size), -(-nk // self.block_size)
            layout = torch.rand(1, hq, nb_q, nb_k, generator=g) < 0.5
            layout[..., 0] = True
            opts["block_mask"] = masks.from_dense(layout, block_size=self.block_size, q_len=nq, kv_len=nk)
        if self.kpm:
            kpm = torch.rand(b, nk, generator=g) < 0.3
            kpm[:, 0] = False
            opts["key_padding_mask"] = kpm
        return q, k, v, dout, opts


def generator():
    return torch.Generator().manual_seed(GEN_SEED)


def drawn_seed() -> int:
    """The dropout seed a call draws from `generator()`."""
    return int(draw_seed(generator(), "cpu").item())


def run_api(q, k, v, dout, opts, backend="cpu"):
    """{out, lse, dq, dk, dv, dsinks, dbias} of attnkernels.attention under `backend`, autograd for the grads."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    opts = dict(opts)
    leaves = {}
    for name in ("sinks", "attn_bias"):
        t = opts.get(name)
        if t is not None and t.requires_grad:
            opts[name] = leaves[name] = t.detach().clone().requires_grad_()
    with attnkernels.backend(backend):
        out, lse = attnkernels.attention(q, k, v, return_lse=True, generator=generator(), **opts)
    out.backward(dout)
    return dict(out=out.detach(), lse=lse, dq=q.grad, dk=k.grad, dv=v.grad,
                dsinks=leaves["sinks"].grad if "sinks" in leaves else None,
                dbias=leaves["attn_bias"].grad if "attn_bias" in leaves else None)


def reference_kwargs(opts, q, k):
    """attention()'s keywords as the reference's (the bool mask as the call turns it into a bias)."""
    from attnkernels.softmax.call import SoftmaxCall

    call = SoftmaxCall.build(q, k, k, causal=False, window_size=opts.get("window_size"),
                             block_mask=opts.get("block_mask"), key_padding_mask=opts.get("key_padding_mask"),
                             softcap=opts.get("softcap"), alibi_slopes=opts.get("alibi_slopes"),
                             sinks=opts.get("sinks"), attn_bias=opts.get("attn_bias"),
                             dropout_p=opts.get("dropout_p", 0.0), generator=generator())
    return dict(window_size=call.window, block_mask=call.layout(), key_padding_mask=call.key_padding_mask,
                scale=call.scale, softcap=call.softcap, alibi_slopes=call.alibi_slopes, sinks=opts.get("sinks"),
                attn_bias=call.attn_bias, dropout_p=call.dropout_p, dropout_seed=call.seed())


def reference64(q, k, v, dout, opts):
    """The float64 reference: out/lse from attention_reference, grads from attention_reference_backward."""
    q64, k64, v64, do64 = (t.double() for t in (q, k, v, dout))
    kw = reference_kwargs(opts, q, k)
    kw64 = {n: (t.detach().double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t)
            for n, t in kw.items()}
    out, lse = attention_reference(q64, k64, v64, **kw64)
    dq, dk, dv, dsinks, dbias = attention_reference_backward(do64, q64, k64, v64, **kw64)
    bias = opts.get("attn_bias")
    if bias is not None and bias.requires_grad:
        dbias = dbias.sum_to_size(bias.shape)
    else:
        dbias = None
    return dict(out=out, lse=lse, dq=dq, dk=dk, dv=dv, dsinks=dsinks if opts.get("sinks") is not None else None,
                dbias=dbias)


def baseline(q, k, v, dout, opts):
    """The same computation plainly in the input dtype (attention_reference(upcast=False), autograd)."""
    qs, ks, vs = (t.detach().clone().requires_grad_() for t in (q, k, v))
    kw = reference_kwargs(opts, q, k)
    leaves = {}
    for name in ("sinks", "attn_bias"):
        t = kw.get(name)
        if t is not None and t.is_floating_point():
            kw[name] = t.detach().to(q.dtype).requires_grad_()
            leaves[name] = kw[name]
    out, lse = attention_reference(qs, ks, vs, upcast=False, **kw)
    out.backward(dout)
    bias = opts.get("attn_bias")
    dbias = leaves["attn_bias"].grad.sum_to_size(bias.shape) if bias is not None and bias.requires_grad else None
    return dict(out=out.detach(), lse=lse.detach(), dq=qs.grad, dk=ks.grad, dv=vs.grad,
                dsinks=leaves["sinks"].grad if "sinks" in leaves else None, dbias=dbias)


def check(case: Case, dtype, inputs=None):
    q, k, v, dout, opts = inputs if inputs is not None else case.inputs(dtype)
    got = run_api(q, k, v, dout, opts)
    ref = reference64(q, k, v, dout, opts)
    for name, t in got.items():
        assert (t is None) == (ref[name] is None), name
        if t is not None:
            assert not torch.isnan(t).any(), f"{name}: NaN"
    empty = torch.isneginf(ref["lse"])
    assert torch.equal(torch.isneginf(got["lse"]), empty), "lse: the rows that see no key differ"
    assert (got["out"][empty] == 0).all() and (got["dq"][empty] == 0).all(), "empty rows: out / dq not zero"
    if case.empty_rows:
        assert empty.any(), "the case was meant to have empty rows"
    names = [n for n in got if got[n] is not None]
    if dtype == torch.float64:
        for name in names:
            fin = torch.isfinite(ref[name])
            err = (got[name][fin] - ref[name][fin]).abs().max().item() if fin.any() else 0.0
            assert err <= FP64_ATOL, f"{name}: max error {err:.3e} > {FP64_ATOL:g}"
        return
    base = baseline(q, k, v, dout, opts)
    for name in names:
        assert_within_rule(name, got[name], ref[name], base[name], dtype)


# ----------------------------------------------------------------------------------------
# each modifier alone, combinations, with every visibility feature; odd sizes, GQA, Nq != Nk
# ----------------------------------------------------------------------------------------

CASES = [
    Case((2, 4, 2, 97, 61, 64), CAUSAL, softcap=5.0),
    Case((1, 2, 2, 130, 300, 32), DENSE, softcap=2.0),
    Case((1, 4, 1, 97, 300, 64), DENSE, alibi="H"),
    Case((2, 4, 2, 300, 97, 64), (32, 8), alibi="BH"),
    Case((2, 2, 1, 97, 300, 64), CAUSAL, alibi="H"),
    Case((2, 4, 2, 97, 300, 64), DENSE, bias=(2, 4, 97, 300)),
    Case((1, 4, 4, 130, 130, 32), CAUSAL, bias=(1, 4, 130, 130)),
    Case((2, 4, 2, 97, 300, 32), DENSE, bias=(2, 1, 1, 300), kpm=True),
    Case((1, 2, 1, 300, 97, 64), (40, 7), bias=(300, 97)),
    Case((2, 2, 2, 97, 61, 32), DENSE, bias="bool"),
    Case((2, 4, 2, 97, 61, 64), DENSE, bias=(2, 4, 97, 61), empty_rows=True),
    Case((1, 2, 1, 65, 600, 32), DENSE, bias=(1, 2, 65, 600), empty_rows=True, inf_tile=True),
    Case((2, 4, 2, 97, 300, 64), DENSE, dropout_p=0.3),
    Case((1, 4, 2, 130, 97, 32), CAUSAL, dropout_p=0.15),
    Case((1, 4, 2, 130, 200, 32), (64, 64), block_size=32, softcap=4.0, bias=(1, 4, 130, 200), dropout_p=0.2),
    Case((2, 4, 2, 97, 300, 64), (50, 10), softcap=3.0, alibi="BH", bias=(2, 1, 97, 300), sinks=True,
         dropout_p=0.2, kpm=True),
    Case((2, 4, 4, 5, 200, 64), CAUSAL, softcap=3.0, alibi="H", bias=(2, 4, 5, 200), sinks=True, dropout_p=0.1),
    Case((1, 2, 1, 97, 97, 64), CAUSAL, softcap=5.0, sinks=True),
    # softcap alone (with masks, dropout, sinks) takes the fused bf16 passes; odd starts, GQA, a window
    Case((2, 4, 2, 130, 300, 64), DENSE, softcap=4.0, dropout_p=0.2, kpm=True),
    Case((1, 4, 2, 300, 301, 64), (70, 5), softcap=30.0, sinks=True),
    # sinks alone (fused into the general kernel's finalisation; a few query rows take the decode
    # kernel and get them from the ops)
    Case((2, 4, 2, 97, 300, 64), CAUSAL, sinks=True, kpm=True),
    Case((2, 4, 2, 5, 200, 64), CAUSAL, sinks=True),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_fp64(case):
    check(case, torch.float64)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bf16(case):
    check(case, torch.bfloat16)


# The bf16 forward's lazy rescaling with the logits formed first (a bias, a softcap above the
# fixed-max range; ALiBi keeps the max pass): query rows scaled 1 / 8 / 40 in turn and keys growing
# per 256-key tile, so rows outgrow their running max (redone) and rows' first estimates miss
# (redone) — as test_cpu_lowp's plain-score lazy cases (disabling the redo fails the bias cases; the
# softcap bounds its logits, so its rows' estimates hold: it covers the accepted path; the ALiBi case
# checks the same inputs on the max-pass path).
LAZY_CASES = [
    Case((1, 4, 2, 300, 700, 64), CAUSAL, bias=(1, 4, 300, 700)),
    Case((2, 2, 1, 200, 600, 64), (150, 40), bias=(2, 1, 200, 600)),
    Case((1, 2, 1, 300, 700, 64), DENSE, softcap=60.0),
    Case((2, 2, 1, 200, 600, 64), (150, 40), alibi="BH", bias=(2, 2, 200, 600)),
]


@pytest.mark.parametrize("case", LAZY_CASES, ids=[c.id + "-lazy" for c in LAZY_CASES])
def test_bf16_lazy_rescale_with_logit_modifiers(case):
    q, k, v, dout, opts = case.inputs(torch.bfloat16)
    rows = torch.tensor([1.0, 8.0, 40.0]).repeat(q.shape[2] // 3 + 1)[: q.shape[2]]
    keys = 1.0 + 3.0 * (torch.arange(k.shape[2]) // 256).float()
    q = (q.float() * rows[:, None]).to(q.dtype)
    k = (k.float() * keys[:, None]).to(k.dtype)
    check(case, torch.bfloat16, inputs=(q, k, v, dout, opts))


LOWP_CASES = [CASES[i] for i in (0, 3, 5, 11, 12, 15)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("case", LOWP_CASES, ids=[c.id for c in LOWP_CASES])
def test_fp32_fp16(case, dtype):
    check(case, dtype)


# Softcap alone with cap <= 50 and no dropout: the forward fixes every row's max at cap and runs the tanh
# inside the exp pass (csrc/softmax.cpp, fixed_max_softcap); above cap 43 the far keys' P are floored and
# a query tile with a row whose sum falls under the floor's bound runs again with the running max
# (fixed_max_holds); a wider cap keeps the running max.
FIXED_MAX_CASES = [
    Case((2, 4, 2, 97, 61, 64), CAUSAL, softcap=5.0),  # Nq > Nk: rows that see no key
    Case((2, 4, 2, 130, 300, 64), DENSE, softcap=32.0, kpm=True),  # at the limit; padded keys cut tiles
    Case((1, 2, 1, 97, 600, 64), CAUSAL, softcap=30.0),  # three key tiles, the last one cut by the diagonal
    Case((1, 4, 2, 300, 301, 64), (70, 5), softcap=30.0, sinks=True),  # odd tile starts, a sink per head
    Case((2, 4, 2, 97, 300, 32), DENSE, softcap=50.0),  # floored exponents (Gemma 2's cap)
    Case((2, 4, 2, 97, 61, 64), CAUSAL, softcap=50.0),  # floored, and rows that see no key: run again
    Case((2, 4, 2, 97, 300, 32), DENSE, softcap=60.0),  # above the limit: the running max
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("case", FIXED_MAX_CASES, ids=[c.id for c in FIXED_MAX_CASES])
def test_softcap_fixed_max(case, dtype):
    check(case, dtype)


class FarBelowCapCase(Case):
    """The even query rows' raw logits about -2·cap (capped: -cap · tanh 2 = -0.96·cap): under the fixed
    max m = cap their P are about e^(-1.96·cap) (e^-62.8 at cap 32), next to rows of ordinary logits."""

    def inputs(self, dtype, seed=0):
        q, k, v, dout, opts = super().inputs(torch.float32, seed)
        g = torch.Generator().manual_seed(seed + 1)
        d = q.shape[-1]
        u = torch.randn(d, generator=g)
        k = u + 0.3 * torch.randn(k.shape, generator=g)
        alpha = 2 * self.softcap * math.sqrt(d) / u.dot(u)  # (-alpha·u)·u / sqrt(d) = -2·cap
        q[..., ::2, :] = -alpha * u + 0.3 * torch.randn(q[..., ::2, :].shape, generator=g)
        return q.to(dtype), k.to(dtype), v.to(dtype), dout.to(dtype), opts


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("window", [CAUSAL, DENSE], ids=window_mode)
@pytest.mark.parametrize("cap", [30.0, 32.0, 50.0])
def test_softcap_rows_far_below_the_cap(cap, window, dtype):
    case = FarBelowCapCase((1, 4, 2, 97, 300, 64), window, softcap=cap)
    q, k, _, _, opts = case.inputs(torch.float64)
    capped = cap * torch.tanh(q[..., ::2, :] @ k.repeat_interleave(2, 1).transpose(-1, -2) / 8 / cap)
    assert (capped < -0.9 * cap).all()  # the case is what it claims
    check(case, dtype)


class MixedRangeCase(Case):
    """Every query row sees keys of capped logits about +0.83·cap and -0.83·cap (raw ±1.2·cap, even / odd
    keys): at cap 50 the far keys' exponents under the fixed max (about -1.83·cap = -92) sit below the bounded
    exp's range and are floored (P = e^-87 for e^-92), on rows whose sum is far above the floor (the near keys
    give e^-8.5 each), so the fixed max stands; at cap 30 nothing is floored."""

    def inputs(self, dtype, seed=0):
        q, k, v, dout, opts = super().inputs(torch.float32, seed)
        g = torch.Generator().manual_seed(seed + 2)
        d = q.shape[-1]
        u = torch.randn(d, generator=g)
        sign = torch.ones(k.shape[2])
        sign[1::2] = -1
        k = sign[:, None] * u + 0.1 * torch.randn(k.shape, generator=g)
        alpha = 1.2 * self.softcap * math.sqrt(d) / u.dot(u)  # (alpha·u)·(±u) / sqrt(d) = ±1.2·cap
        q = alpha * u + 0.1 * torch.randn(q.shape, generator=g)
        return q.to(dtype), k.to(dtype), v.to(dtype), dout.to(dtype), opts


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("window", [CAUSAL, DENSE], ids=window_mode)
@pytest.mark.parametrize("cap", [30.0, 50.0])
def test_softcap_mixed_range_rows(cap, window, dtype):
    case = MixedRangeCase((1, 4, 2, 97, 300, 64), window, softcap=cap)
    q, k, _, _, opts = case.inputs(torch.float64)
    capped = cap * torch.tanh(q @ k.repeat_interleave(2, 1).transpose(-1, -2) / 8 / cap)
    assert (capped[..., 1::2] < -0.75 * cap).all() and (capped[..., ::2] > 0.75 * cap).all()  # as claimed
    check(case, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=DTYPE_IDS.get)
def test_bias_views_are_read_through_their_strides(dtype):
    """An expanded bias (stride-0 dims) and a transposed one give the same result as their contiguous copies."""
    b, h, n, m = 2, 4, 97, 130
    q, k, v, dout, _ = Case((b, h, h, n, m, 32)).inputs(dtype)
    base = torch.randn(1, h, 1, m, dtype=torch.float32)
    transposed = torch.randn(b, h, m, n, dtype=torch.float32).transpose(-1, -2)
    for view in (base.expand(b, h, n, m), transposed):
        with attnkernels.backend("cpu"):
            got = attnkernels.attention(q, k, v, attn_bias=view)
            want = attnkernels.attention(q, k, v, attn_bias=view.contiguous())
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("bias_dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=DTYPE_IDS.get)
def test_bias_in_any_float_dtype(dtype, bias_dtype):
    """The kernels read the bias in its own dtype (no copy): the result is the one of the bias converted to
    float32 (the accumulation type) first, bit for bit, forward and backward; dbias comes back in its dtype."""
    q, k, v, dout, _ = Case((1, 2, 2, 70, 90, 32)).inputs(dtype)
    bias = torch.randn(1, 2, 70, 90).to(bias_dtype)
    results = []
    for b in (bias, bias.float()):
        b = b.clone().requires_grad_()
        got = run_api(q, k, v, dout, dict(attn_bias=b))
        assert got["dbias"].dtype == b.dtype
        results.append(got)
    for name in ("out", "lse", "dq", "dk", "dv"):
        assert torch.equal(results[0][name], results[1][name]), name
    assert torch.equal(results[0]["dbias"], results[1]["dbias"].to(bias_dtype))


def test_small_query_calls_with_bias_or_dropout_take_the_general_kernel():
    """The decode kernel implements softcap and ALiBi (cpu_launch.DECODE_FEATURES; tests/test_cpu_decode.py checks
    them against the reference): a small-Nq call with those takes it, one with attn_bias or dropout attention_fwd."""
    q, k, v, _, opts = Case((1, 2, 2, 4, 100, 32), softcap=3.0).inputs(torch.float32)
    from attnkernels.softmax.call import SoftmaxCall

    assert cpu_launch.uses_decode(SoftmaxCall.build(q, k, v, softcap=3.0, alibi_slopes=torch.ones(2)), q, k, v)
    assert not cpu_launch.uses_decode(SoftmaxCall.build(q, k, v, dropout_p=0.1), q, k, v)
    bias = torch.zeros(1, 1, 4, 100)
    assert not cpu_launch.uses_decode(SoftmaxCall.build(q, k, v, softcap=3.0, attn_bias=bias), q, k, v)


# ----------------------------------------------------------------------------------------
# dropout: the keep mask bit for bit, its rate, its dependence on (b, h), p = 0
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.3, 0.1, 1 / 512, 0.998], ids=["p0.3", "p0.1", "p1_512", "p0.998"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
def test_dropout_keep_mask_is_the_reference_mask(dtype, p):
    """q = 0 makes P uniform (1/n) and v = I (n x n) makes out = P ∘ keep / (1 - t/256): the forward's
    mask, read off exactly; dout = I makes dV = (P ∘ keep / (1 - t/256))ᵀ: the backward's regenerated
    mask. n = 130: a partial group of 16 keys (one Philox call) at the end, several query tiles.
    p: rounded up (0.3 -> 77/256), down (0.1 -> 26/256), the smallest accepted (t = 1), t = 255."""
    b, h, n = 2, 3, 130
    q = torch.zeros(b, h, n, 16, dtype=dtype)
    k = torch.randn(b, h, n, 16).to(dtype)
    eye = torch.eye(n, dtype=dtype).expand(b, h, n, n).contiguous()
    q.requires_grad_()
    v = eye.clone().requires_grad_()
    with attnkernels.backend("cpu"):
        out = attnkernels.attention(q, k, v, dropout_p=p, generator=generator())
    out.backward(eye)
    expected = keep_mask(drawn_seed(), p, b, h, n, n)
    assert torch.equal(out.detach() > 0, expected)
    assert torch.equal(v.grad.transpose(-1, -2) > 0, expected)
    kept = out.detach()[expected].double()
    assert 0 < expected.sum() < expected.numel()
    torch.testing.assert_close(kept, torch.full_like(kept, keep_scale(p) / n), rtol=1e-2 if dtype == torch.bfloat16
                               else 1e-6, atol=0)


def test_dropout_rate_and_independence():
    b, h, n, p = 2, 4, 200, 0.25
    q = torch.zeros(b, h, n, 16, dtype=torch.float32)
    k = torch.zeros(b, h, n, 16, dtype=torch.float32)
    v = torch.eye(n).expand(b, h, n, n).contiguous()
    with attnkernels.backend("cpu"):
        kept = attnkernels.attention(q, k, v, dropout_p=p, generator=generator()) > 0
    count = kept.numel()
    rate = kept.double().mean().item()
    sigma = math.sqrt(p * (1 - p) / count)
    assert effective_rate(p) == p  # 64/256: no rounding here (test_dropout_rate_of_an_unrounded_p has it)
    assert abs(rate - (1 - p)) < 5 * sigma, f"keep rate {rate:.4f}, expected {1 - p} ± {5 * sigma:.4f}"
    # every (b, h) its own mask: they agree on about (1-p)^2 + p^2 of the entries, not all
    for a, c in (((0, 0), (0, 1)), ((0, 0), (1, 0)), ((1, 2), (1, 3))):
        agree = (kept[a] == kept[c]).double().mean().item()
        assert abs(agree - ((1 - p) ** 2 + p ** 2)) < 0.03, (a, c, agree)
    # another seed, another mask
    with attnkernels.backend("cpu"):
        other = attnkernels.attention(q, k, v, dropout_p=p, generator=torch.Generator().manual_seed(99)) > 0
    assert not torch.equal(kept, other)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
def test_dropout_rate_of_an_unrounded_p(dtype):
    """p = 0.1 drops 26/256 = 0.1015625 of the scores (within 5 sigma of 1M scores), and exactly the
    reference's mask (whose rate test_modifiers_reference.py tells from 0.1 on 8M scores). Forward only
    (out > 0 is the mask), the bf16 fused exp pass included."""
    b, h, n, p = 2, 8, 256, 0.1
    q = torch.zeros(b, h, n, 16, dtype=dtype)
    k = torch.zeros(b, h, n, 16, dtype=dtype)
    v = torch.eye(n, dtype=dtype).expand(b, h, n, n).contiguous()
    with attnkernels.backend("cpu"):
        kept = attnkernels.attention(q, k, v, dropout_p=p, generator=generator()) > 0
    drop = 1 - kept.double().mean().item()
    sigma = math.sqrt(p * (1 - p) / kept.numel())
    assert abs(drop - effective_rate(p)) < 5 * sigma, drop
    assert torch.equal(kept, keep_mask(drawn_seed(), p, b, h, n, n))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=DTYPE_IDS.get)
def test_dropout_zero_is_exactly_the_plain_call(dtype):
    q, k, v, dout, _ = Case((1, 4, 2, 97, 130, 64), CAUSAL).inputs(dtype)
    results = []
    for opts in ({}, dict(dropout_p=0.0, generator=generator())):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        with attnkernels.backend("cpu"):
            out = attnkernels.attention(qq, kk, vv, causal=True, **opts)
        out.backward(dout)
        results.append((out.detach(), qq.grad, kk.grad, vv.grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_dropout_matches_reference_backend():
    """The same generator seed through attnkernels.backend("reference") gives the same dropped output."""
    q, k, v, dout, opts = Case((1, 2, 2, 97, 130, 32), (30, 30), alibi="H", dropout_p=0.4).inputs(torch.float64)
    got = run_api(q, k, v, dout, opts, "cpu")
    ref = run_api(q, k, v, dout, opts, "reference")
    for name in ("out", "lse", "dq", "dk", "dv"):
        torch.testing.assert_close(got[name], ref[name], atol=FP64_ATOL, rtol=0)


# ----------------------------------------------------------------------------------------
# the registry and the C++ op boundary
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
def test_sinks_far_from_the_scores_B1_H4_N70_D32(dtype):
    """Sinks 80 above and 80 below the scores (an e^80 term must not overflow the kernel's row sum),
    -inf (no effect) and 0: the fused finalisation against the ops-level one (the reference backend)."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 4, 70, 32, generator=g).to(dtype) for _ in range(3))
    param = torch.float64 if dtype == torch.float64 else torch.float32
    sinks = torch.tensor([80.0, -80.0, float("-inf"), 0.0], dtype=param)
    with attnkernels.backend("cpu"):
        out, lse = attnkernels.attention(q, k, v, causal=True, sinks=sinks, return_lse=True)
    ref_out, ref_lse = attention_reference(q.double(), k.double(), v.double(), window_size=CAUSAL,
                                           sinks=sinks.double())
    assert torch.isfinite(lse).all() and torch.isfinite(out).all()
    atol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(lse.double(), ref_lse, atol=atol, rtol=0)
    torch.testing.assert_close(out.double(), ref_out, atol=atol, rtol=0)
    assert (out[0, 0].abs() < 1e-20).all(), "a sink e^80 above the scores takes all of each row's mass"
    # a row that sees no key (a -inf bias row): out 0 and lse = the sink (-inf for the -inf sink)
    bias = torch.zeros(1, 1, 70, 70, dtype=param)
    bias[..., 9, :] = float("-inf")
    with attnkernels.backend("cpu"):
        out, lse = attnkernels.attention(q, k, v, causal=True, sinks=sinks, attn_bias=bias, return_lse=True)
    assert (out[0, :, 9] == 0).all()
    assert torch.equal(lse[0, :, 9], sinks.to(lse.dtype))


def test_cpu_backend_declares_every_modifier():
    from attnkernels.softmax import ops as softmax_ops
    from attnkernels.softmax.call import FEATURES

    assert softmax_ops.CPU_FEATURES == frozenset(FEATURES)


def _op_args(q, k, v):
    return (q, k, v, 0.125, -1, -1, None, None, 0, None)


def test_op_checks_modifier_arguments():
    q = torch.randn(2, 4, 33, 16)
    k = v = torch.randn(2, 2, 40, 16)
    kernels = ops()
    with pytest.raises(RuntimeError, match=r"attn_bias .*does not broadcast to \(B, Hq, Nq, Nk\)"):
        kernels.attention_fwd(*_op_args(q, k, v), 0.0, None, torch.zeros(2, 4, 33, 39))
    with pytest.raises(RuntimeError, match=r"attn_bias .*does not broadcast"):
        kernels.attention_fwd(*_op_args(q, k, v), 0.0, None, torch.zeros(3, 4, 33, 40))
    with pytest.raises(RuntimeError, match="attn_bias must be 4-D"):
        kernels.attention_fwd(*_op_args(q, k, v), 0.0, None, torch.zeros(33, 40))
    with pytest.raises(RuntimeError, match="attn_bias must be a float32, float64, bfloat16 or float16"):
        kernels.attention_fwd(*_op_args(q, k, v), 0.0, None, torch.zeros(2, 4, 33, 40, dtype=torch.int32))
    with pytest.raises(RuntimeError, match=r"alibi_slopes must be \(B, Hq\) = \(2, 4\)"):
        kernels.attention_fwd(*_op_args(q, k, v), 0.0, torch.zeros(4))
    with pytest.raises(RuntimeError, match="softcap must be"):
        kernels.attention_fwd(*_op_args(q, k, v), -1.0)
    with pytest.raises(RuntimeError, match="dropout_p must be in"):
        kernels.attention_fwd(*_op_args(q, k, v), 0.0, None, None, 1.0)
    with pytest.raises(RuntimeError, match="dropout_p 0.001 rounds to 0 at the 1/256 resolution"):
        kernels.attention_fwd(*_op_args(q, k, v), 0.0, None, None, 0.001)
    with pytest.raises(RuntimeError, match=r"sinks must be \(Hq,\) = \(4,\)"):
        kernels.attention_fwd(*_op_args(q, k, v), 0.0, None, None, 0.0, 0, torch.zeros(2))
    with pytest.raises(RuntimeError, match="sinks must be a floating CPU tensor"):
        kernels.attention_fwd(*_op_args(q, k, v), 0.0, None, None, 0.0, 0, torch.zeros(4, dtype=torch.int64))
    out, lse = kernels.attention_fwd(*_op_args(q, k, v))
    with pytest.raises(RuntimeError, match="bias_grad needs attn_bias"):
        kernels.attention_bwd(out, q, k, v, out, lse, 0.125, -1, -1, None, None, None, None, 0, None,
                              0.0, None, None, 0.0, 0, True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("nan_key", [3, 97], ids=["vector-part", "scalar-tail"])
def test_softcap_nan_key_poisons_every_row_B1_H1_N100_D16(nan_key, dtype):
    """A NaN score stays NaN through softcap's tanh wherever the key falls in the row (the vector passes or
    their scalar tail, keys past the last whole vector): every row that sees it gives NaN, as the reference."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 1, 100, 16, generator=g).to(dtype) for _ in range(3))
    k[0, 0, nan_key, 0] = float("nan")
    with attnkernels.backend("cpu"):
        out = attnkernels.attention(q, k, v, softcap=30.0)
    ref, _ = attention_reference(q.double(), k.double(), v.double(), softcap=30.0)
    assert torch.isnan(ref).all()
    assert torch.isnan(out).all()
