"""The C++ decode kernel (csrc/decode.cpp: few query rows, split-KV, strided K/V) against the float64 reference.

Tolerances:
- float64: the kernel accumulates in float64, so out / lse must match the float64
  reference to FP64_ATOL (absolute; values are O(1)).
- float32 / bfloat16 / float16: FlashAttention's rule (tests/tolerance.py): max error
  against the float64 reference <= 2 x the max error of the same computation done
  plainly in the input dtype (`attention_reference(..., upcast=False)`) + the floor
  FLOOR[dtype] stated there (1e-5 fp32, 2e-3 fp16, 1.6e-2 bf16).

The op is called directly (`torch.ops.attnkernels_cpu_<cap>.attention_decode_fwd`) for the
kernel's own arguments, and through `attnkernels.attention` to check that the CPU backend
routes small-Nq calls to it.
"""
from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

import attnkernels
from attnkernels import backends
from attnkernels.softmax import cpu_launch
from attnkernels.softmax.reference import attention_reference

from .backend_params import backend_unavailable
from .cpu_helpers import CAUSAL, DENSE, one_thread, ops, window_mode  # noqa: F401 (one_thread: autouse fixture)
from .tolerance import assert_within_rule

_REASON = backend_unavailable("cpu")
if _REASON is None and not hasattr(backends.cpu_kernels(), "attention_decode_fwd"):
    _REASON = "this build of the C++ kernels has no attention_decode_fwd (rebuild: python setup.py build_ext --inplace)"
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"C++ decode kernel unavailable: {_REASON}")

FP64_ATOL = 1e-10
DTYPE_IDS = {torch.float64: "fp64", torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def case_id(b, hq, hk, nq, nk, d, dv, window, extra="") -> str:
    dvs = f"-Dv{dv}" if dv != d else ""
    return f"B{b}-Hq{hq}-Hk{hk}-Nq{nq}-Nk{nk}-D{d}{dvs}-{window_mode(window)}{extra}"


def make_inputs(shape, dtype, seed=0):
    b, hq, hk, nq, nk, d, dv = shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, nq, d, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(b, hk, nk, d, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(b, hk, nk, dv, generator=g, dtype=torch.float64).to(dtype)
    return q, k, v


def check_outputs(q, k, v, window, kpm, scale, out, lse):
    dtype = q.dtype
    expected = dict(window_size=window, key_padding_mask=kpm, scale=scale)
    ref_out, ref_lse = attention_reference(q, k, v, **expected)
    assert out.dtype == dtype and out.shape == ref_out.shape
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and lse.shape == ref_lse.shape
    assert not out.isnan().any() and not lse.isnan().any()
    if dtype == torch.float64:
        torch.testing.assert_close(out, ref_out, atol=FP64_ATOL, rtol=0)
        torch.testing.assert_close(lse, ref_lse, atol=FP64_ATOL, rtol=0)
        return
    base_out, base_lse = attention_reference(q, k, v, upcast=False, **expected)
    assert_within_rule("out", out, ref_out, base_out, dtype)
    assert_within_rule("lse", lse, ref_lse, base_lse, dtype)


def run_op(q, k, v, window, kpm=None, scale=None):
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return ops().attention_decode_fwd(q, k, v, scale, window[0], window[1], kpm)


def check_case(shape, window, dtype, kpm=None, scale=None):
    q, k, v = make_inputs(shape, dtype)
    scale = 1.0 / math.sqrt(shape[5]) if scale is None else scale
    out, lse = run_op(q, k, v, window, kpm, scale)
    check_outputs(q, k, v, window, kpm, scale, out, lse)
    return out, lse


# (B, Hq, Hk, Nq, Nk, D, Dv), window: GQA groups 1 / 4 / 8, Nq 1 / 3 / 16, odd Nk,
# Nq > Nk (leading rows see nothing under causal), head dims with a vector tail.
CASES = [
    ((1, 4, 4, 1, 1, 32, 32), DENSE),
    ((1, 4, 4, 16, 7, 32, 32), CAUSAL),
    ((2, 8, 2, 3, 1000, 64, 64), CAUSAL),
    ((2, 8, 2, 3, 1000, 64, 64), DENSE),
    ((1, 32, 8, 1, 5000, 128, 128), DENSE),
    ((1, 8, 1, 16, 5000, 64, 64), CAUSAL),
    ((1, 16, 2, 1, 1000, 64, 64), (100, 0)),
    ((2, 8, 2, 16, 5000, 40, 40), (300, 2)),
    ((1, 4, 1, 3, 7, 48, 24), (2, 1)),
    ((1, 8, 8, 16, 3, 17, 33), CAUSAL),
    ((1, 8, 2, 5, 1000, 64, 80), (0, 0)),
]


# bf16 query blocks of R = group · Nq <= kDirectRows rows on the vector path (K / V widened in registers,
# csrc/decode.cpp; forced with ATTNKERNELS_CPU_NO_AMX=1, since these shapes would otherwise take the tile
# units on an AMX CPU): Dv with whole 64-column register blocks and a 32-column rest, Dv != D, odd Nk,
# R = 4 / 6 / 8 / 3.
BF16_DIRECT_CASES = [
    ((2, 8, 2, 1, 97, 64, 64), DENSE),
    ((1, 32, 8, 1, 4099, 128, 128), DENSE),
    ((2, 8, 2, 1, 97, 128, 96), CAUSAL),
    ((1, 4, 2, 3, 301, 32, 160), CAUSAL),
    ((1, 8, 1, 1, 777, 96, 64), (100, 0)),
    ((1, 3, 1, 1, 97, 64, 64), DENSE),
]


@pytest.mark.parametrize("shape,window", BF16_DIRECT_CASES, ids=[case_id(*s, w, "-bf16") for s, w in BF16_DIRECT_CASES])
def test_bf16_direct_rows(shape, window, monkeypatch):
    monkeypatch.setenv("ATTNKERNELS_CPU_NO_AMX", "1")
    check_case(shape, window, torch.bfloat16)


# bf16 on the tile units (R = group · Nq <= 16, D and Dv multiples of 32) and, the same shapes, forced onto the
# vector path (ATTNKERNELS_CPU_NO_AMX=1): odd Nk (a partial last tile, odd pairs of V rows), Nk = 1, Dv != D with a
# 32-column rest, D 256, R = 16, windows whose band starts off the 16-key grid; D 48 stays on the vector path.
BF16_TILE_CASES = [
    ((2, 8, 2, 1, 97, 64, 64), DENSE),
    ((2, 8, 2, 1, 1, 64, 64), DENSE),
    ((1, 32, 8, 1, 4099, 128, 128), DENSE),
    ((1, 8, 2, 3, 301, 128, 96), CAUSAL),
    ((1, 16, 4, 4, 1000, 256, 256), (100, 0)),
    ((1, 8, 1, 2, 777, 32, 160), (37, 3)),
    ((1, 8, 1, 1, 200, 48, 48), DENSE),
]


@pytest.mark.parametrize("no_amx", ["0", "1"], ids=["tile-units", "vector"])
@pytest.mark.parametrize("shape,window", BF16_TILE_CASES, ids=[case_id(*s, w, "-bf16") for s, w in BF16_TILE_CASES])
def test_bf16_tile_units_and_vector_path(shape, window, no_amx, monkeypatch):
    monkeypatch.setenv("ATTNKERNELS_CPU_NO_AMX", no_amx)
    check_case(shape, window, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("shape,window", CASES, ids=[case_id(*s, w) for s, w in CASES])
def test_decode_vs_reference(shape, window, dtype):
    check_case(shape, window, dtype)


@pytest.mark.parametrize("shape,window", CASES[2:6], ids=[case_id(*s, w) for s, w in CASES[2:6]])
def test_decode_fp16(shape, window):
    check_case(shape, window, torch.float16)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("window", [DENSE, CAUSAL, (50, 0)], ids=window_mode)
def test_key_padding_with_a_fully_padded_row(window, dtype):
    shape = (3, 8, 2, 3, 1000, 64, 64)
    kpm = torch.rand(3, 1000, generator=torch.Generator().manual_seed(1)) < 0.3
    kpm[1] = True  # batch element 1 sees no key: out 0, lse -inf
    kpm[2, -40:] = True  # the window's keys of the last rows are padded
    out, lse = check_case(shape, window, dtype, kpm=kpm)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.isneginf(lse[1]).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=DTYPE_IDS.get)
def test_rows_that_see_nothing(dtype):
    # Nq > Nk under bottom-right causal: with Nq=5, Nk=2, rows 0..2 see no key.
    out, lse = check_case((1, 4, 2, 5, 2, 32, 32), CAUSAL, dtype)
    assert torch.equal(out[:, :, :3], torch.zeros_like(out[:, :, :3]))
    assert torch.isneginf(lse[:, :, :3]).all() and torch.isfinite(lse[:, :, 3:]).all()


def test_empty_key_range():
    q, k, v = make_inputs((2, 4, 2, 3, 0, 32, 16), torch.float32)
    out, lse = run_op(q, k, v, DENSE)
    assert out.shape == (2, 4, 3, 16) and torch.equal(out, torch.zeros_like(out))
    assert lse.shape == (2, 4, 3) and torch.isneginf(lse).all()


def test_scale_is_used():
    check_case((1, 8, 2, 2, 700, 64, 64), CAUSAL, torch.float64, scale=0.37)


# ----------------------------------------------------------------------------------------
# strided K/V: cache prefixes and (B, N, H, D) caches, read in place
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("layout", ["prefix", "transposed", "transposed-prefix", "strided-rows"])
def test_strided_kv_views(layout, dtype):
    b, hq, hk, nq, n, d = 2, 8, 2, 3, 1001, 64
    g = torch.Generator().manual_seed(3)
    q = torch.randn(b, hq, nq, d, generator=g).to(dtype)
    if layout == "prefix":  # a (B, H, Nc, D) cache, the first n slots filled
        k_full, v_full = (torch.randn(b, hk, 1500, d, generator=g).to(dtype) for _ in range(2))
        k, v = k_full[:, :, :n], v_full[:, :, :n]
    elif layout.startswith("transposed"):  # FlashAttention's (B, N, H, D) cache seen as (B, H, N, D)
        nc = 1500 if layout.endswith("prefix") else n
        k_bnhd, v_bnhd = (torch.randn(b, nc, hk, d, generator=g).to(dtype) for _ in range(2))
        k, v = k_bnhd[:, :n].transpose(1, 2), v_bnhd[:, :n].transpose(1, 2)
    else:  # every other row of a longer cache
        k_full, v_full = (torch.randn(b, hk, 2 * n, d, generator=g).to(dtype) for _ in range(2))
        k, v = k_full[:, :, ::2], v_full[:, :, ::2]
    assert not k.is_contiguous() and k.stride(-1) == 1
    for window in (DENSE, CAUSAL):
        out, lse = run_op(q, k, v, window)
        check_outputs(q, k, v, window, None, 1.0 / math.sqrt(d), out, lse)
        out_c, lse_c = run_op(q, k.contiguous(), v.contiguous(), window)
        assert torch.equal(out, out_c) and torch.equal(lse, lse_c)  # a view reads the same bits


def test_non_contiguous_last_dim_is_copied():
    q, k, v = make_inputs((1, 4, 2, 2, 300, 32, 32), torch.float32)
    k_t = k.transpose(-1, -2).contiguous().transpose(-1, -2)  # last-dim stride != 1
    out, lse = run_op(q, k_t, v, CAUSAL)
    out_c, lse_c = run_op(q, k, v, CAUSAL)
    assert torch.equal(out, out_c) and torch.equal(lse, lse_c)


# ----------------------------------------------------------------------------------------
# split-KV: the chunking depends on the shapes only -> the same bits on any thread count
# ----------------------------------------------------------------------------------------


def test_plan_depends_on_shapes_only():
    lo, chunk, n_chunks = ops().attention_decode_plan(1, 8, 1, 32768, -1, -1)
    assert lo == 0 and n_chunks > 1 and chunk * n_chunks >= 32768 and chunk * (n_chunks - 1) < 32768
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert ops().attention_decode_plan(1, 8, 1, 32768, -1, -1) == [lo, chunk, n_chunks]
    finally:
        torch.set_num_threads(threads)
    # a window: the split covers only the band the rows see
    lo, chunk, n_chunks = ops().attention_decode_plan(1, 8, 4, 32768, 1000, 0)
    assert lo == 32768 - 4 - 1000 and chunk * n_chunks >= 1004


@pytest.mark.parametrize("helpers", ["openmp", "interop"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
def test_bitwise_equal_across_thread_counts(dtype, helpers, monkeypatch):
    # helpers: the threads that pull split-KV tasks (ATTNKERNELS_CPU_DECODE_HELPERS, read per call)
    monkeypatch.setenv("ATTNKERNELS_CPU_DECODE_HELPERS", helpers)
    shape = (1, 8, 2, 3, 9000, 64, 64)  # several chunks per kv head
    assert ops().attention_decode_plan(1, 2, 3, 9000, -1, -1)[2] > 1
    q, k, v = make_inputs(shape, dtype)
    kpm = torch.rand(1, 9000, generator=torch.Generator().manual_seed(5)) < 0.2
    threads = torch.get_num_threads()
    try:
        for window, mask in ((DENSE, None), (CAUSAL, kpm), ((2000, 0), None)):
            torch.set_num_threads(1)
            single = run_op(q, k, v, window, mask)
            torch.set_num_threads(2)
            first = run_op(q, k, v, window, mask)
            second = run_op(q, k, v, window, mask)
            for a, b, c in zip(single, first, second):
                assert torch.equal(a, b) and torch.equal(b, c)
    finally:
        torch.set_num_threads(threads)


def test_unknown_decode_helpers_value_is_refused(monkeypatch):
    q, k, v = make_inputs((1, 8, 2, 1, 9000, 64, 64), torch.float32)
    monkeypatch.setenv("ATTNKERNELS_CPU_DECODE_HELPERS", "fibers")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)  # the variable is read where a call splits across threads
        with pytest.raises(RuntimeError, match="ATTNKERNELS_CPU_DECODE_HELPERS=fibers: expected 'openmp'"):
            run_op(q, k, v, DENSE, None)
    finally:
        torch.set_num_threads(threads)


_THREADS_SCRIPT = """
import sys, torch
torch.set_num_threads(int(sys.argv[1]))
from attnkernels import backends
g = torch.Generator().manual_seed(0)
q = torch.randn(2, 16, 1, 128, generator=g); k = torch.randn(2, 4, 20000, 128, generator=g)
v = torch.randn(2, 4, 20000, 128, generator=g)
out, lse = backends.cpu_kernels().attention_decode_fwd(q, k, v, 0.088, -1, -1, None)
torch.save((out, lse), sys.argv[2])
"""


def test_bitwise_equal_across_processes_with_other_thread_counts(tmp_path):
    results = []
    for threads in (1, 2):
        path = tmp_path / f"t{threads}.pt"
        subprocess.run([sys.executable, "-c", _THREADS_SCRIPT, str(threads), str(path)], check=True, timeout=300)
        results.append(torch.load(path))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


# ----------------------------------------------------------------------------------------
# routing: attnkernels.attention runs small-Nq CPU calls on the decode kernel
# ----------------------------------------------------------------------------------------


class _CountingOps:
    """A stand-in for the ops namespace that records the arguments of each op that ran."""

    def __init__(self, real):
        self.real = real
        self.args = {"attention_decode_fwd": [], "attention_fwd": []}

    @property
    def calls(self) -> dict:
        return {name: len(a) for name, a in self.args.items()}

    def __getattr__(self, name):
        fn = getattr(self.real, name)
        if name not in self.args:
            return fn

        def recorded(*args):
            self.args[name].append(args)
            return fn(*args)

        return recorded


@pytest.fixture
def counting_ops(monkeypatch):
    counter = _CountingOps(backends.cpu_kernels())
    monkeypatch.setattr(cpu_launch, "cpu_kernels", lambda: counter)
    return counter


@pytest.mark.parametrize("nq", [1, 3, 16, 17])
def test_api_routes_small_q_to_the_decode_kernel(counting_ops, nq):
    q, k, v = make_inputs((2, 8, 2, nq, 700, 64, 64), torch.float32)
    with torch.no_grad(), attnkernels.backend("cpu"):
        out = attnkernels.attention(q, k, v, causal=True)
    decode = nq <= cpu_launch.DECODE_MAX_Q_LEN
    assert counting_ops.calls == {"attention_decode_fwd": int(decode), "attention_fwd": int(not decode)}
    if decode:
        direct, _ = run_op(q, k, v, CAUSAL)
        assert torch.equal(out, direct)
    ref, _ = attention_reference(q, k, v, causal=True)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)


def test_api_passes_kv_views_without_a_copy(counting_ops):
    g = torch.Generator().manual_seed(4)
    k_full, v_full = (torch.randn(1, 2, 900, 32, generator=g) for _ in range(2))
    q = torch.randn(1, 8, 1, 32, generator=g)
    k, v = k_full[:, :, :601], v_full[:, :, :601]
    with torch.no_grad(), attnkernels.backend("cpu"):
        out = attnkernels.attention(q, k, v)
    (_, k_seen, v_seen, *_), = counting_ops.args["attention_decode_fwd"]
    assert k_seen.data_ptr() == k_full.data_ptr() and k_seen.stride() == k_full.stride()
    assert v_seen.data_ptr() == v_full.data_ptr()
    ref, _ = attention_reference(q, k, v)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)


def test_api_key_padding_and_lse_through_decode(counting_ops):
    q, k, v = make_inputs((2, 8, 2, 2, 500, 32, 32), torch.float64)
    kpm = torch.zeros(2, 500, dtype=torch.bool)
    kpm[0, :100] = True
    with torch.no_grad(), attnkernels.backend("cpu"):
        out, lse = attnkernels.attention(q, k, v, window_size=(64, 0), key_padding_mask=kpm, return_lse=True)
    assert counting_ops.calls["attention_decode_fwd"] == 1
    ref, ref_lse = attention_reference(q, k, v, window_size=(64, 0), key_padding_mask=kpm)
    torch.testing.assert_close(out, ref, atol=FP64_ATOL, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=FP64_ATOL, rtol=0)


def test_gradients_of_a_small_q_call_are_right():
    """The backward (attention_bwd) recomputes from the saved out / lse, whichever forward kernel ran."""
    q, k, v = (t.requires_grad_() for t in make_inputs((1, 4, 2, 3, 200, 32, 32), torch.float64))
    with attnkernels.backend("cpu"):
        out = attnkernels.attention(q, k, v, causal=True)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ref, _ = attention_reference(q2, k2, v2, causal=True)
    ref_grads = torch.autograd.grad(ref, (q2, k2, v2), dout)
    torch.testing.assert_close(out, ref, atol=FP64_ATOL, rtol=0)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-9, rtol=0)


def test_block_tables_take_the_general_kernel(counting_ops):
    q, k, v = make_inputs((1, 4, 4, 16, 256, 32, 32), torch.float32)
    mask = attnkernels.masks.from_dense(torch.tensor([[True, False, True, True]]), block_size=64, q_len=16)
    with torch.no_grad(), attnkernels.backend("cpu"):
        attnkernels.attention(q, k, v, block_mask=mask)
    assert counting_ops.calls == {"attention_decode_fwd": 0, "attention_fwd": 1}


# --- softcap and ALiBi in the decode kernel -------------------------------------------------

MODIFIERS = {
    "softcap": lambda b, hq, g: dict(softcap=1.7),
    "alibi": lambda b, hq, g: dict(alibi_slopes=torch.rand(b, hq, generator=g, dtype=torch.float64).float()),
    "softcap-alibi": lambda b, hq, g: dict(softcap=4.0, alibi_slopes=torch.rand(hq, generator=g).float() * 0.3),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("window", [DENSE, CAUSAL, (40, 0)], ids=window_mode)
@pytest.mark.parametrize("mod", list(MODIFIERS))
def test_api_routes_softcap_alibi_to_the_decode_kernel_B2_Hq8_Hk2_Nq3_Nk700_D64(counting_ops, mod, window, dtype):
    q, k, v = make_inputs((2, 8, 2, 3, 700, 64, 64), dtype)
    kw = MODIFIERS[mod](2, 8, torch.Generator().manual_seed(1))
    with torch.no_grad(), attnkernels.backend("cpu"):
        out, lse = attnkernels.attention(q, k, v, window_size=window, return_lse=True, **kw)
    assert counting_ops.calls == {"attention_decode_fwd": 1, "attention_fwd": 0}
    slopes = kw.get("alibi_slopes")
    ref_kw = dict(window_size=window, softcap=kw.get("softcap", 0.0),
                  alibi_slopes=None if slopes is None else slopes.expand(2, 8).double())
    ref_out, ref_lse = attention_reference(q, k, v, **ref_kw)
    if dtype == torch.float64:
        torch.testing.assert_close(out, ref_out, atol=FP64_ATOL, rtol=0)
        torch.testing.assert_close(lse, ref_lse, atol=FP64_ATOL, rtol=0)
        return
    ref_kw["alibi_slopes"] = None if slopes is None else slopes.expand(2, 8).to(dtype)
    base_out, base_lse = attention_reference(q, k, v, upcast=False, **ref_kw)
    assert_within_rule("out", out, ref_out, base_out, dtype)
    assert_within_rule("lse", lse, ref_lse, base_lse, dtype)


def test_gradients_through_the_decode_forward_with_softcap_alibi_B1_Hq4_Hk2_Nq3_Nk200_D32():
    q, k, v = (t.requires_grad_() for t in make_inputs((1, 4, 2, 3, 200, 32, 32), torch.float64))
    slopes = torch.rand(1, 4, dtype=torch.float64)
    with attnkernels.backend("cpu"):
        out = attnkernels.attention(q, k, v, causal=True, softcap=2.0, alibi_slopes=slopes)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ref, _ = attention_reference(q2, k2, v2, causal=True, softcap=2.0, alibi_slopes=slopes)
    ref_grads = torch.autograd.grad(ref, (q2, k2, v2), dout)
    torch.testing.assert_close(out, ref, atol=FP64_ATOL, rtol=0)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-9, rtol=0)


def test_attn_bias_takes_the_general_kernel(counting_ops):
    q, k, v = make_inputs((1, 4, 2, 2, 128, 32, 32), torch.float32)
    with torch.no_grad(), attnkernels.backend("cpu"):
        attnkernels.attention(q, k, v, softcap=3.0, attn_bias=torch.zeros(1, 1, 2, 128))
    assert counting_ops.calls == {"attention_decode_fwd": 0, "attention_fwd": 1}
