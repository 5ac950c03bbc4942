"""C++ CPU softmax attention in bf16 / fp16: the 16-bit GEMM path and the fp32-upcast path.

Each case runs on both GEMM paths: "16bit" (16-bit operands, float accumulation, P and dS
rounded to the input dtype for their products: on the AMX tile units, or for bf16 on
AVX512-BF16's vdpbf16ps where the CPU has no AMX) where this CPU has one, and "upcast"
(forced with ATTNKERNELS_CPU_NO_AMX=1, which the C++ ops read at every call).
`gemm_path(dtype)` says which one runs.

Tolerance: FlashAttention's rule (tests/tolerance.py): max error against the float64
reference (backward: autograd of the float64 reference) <= 2 x the max error of the same
computation done plainly in the input dtype (`attention_reference(..., upcast=False)` and
its autograd) + the floor FLOOR[dtype] (bf16 1.6e-2, fp16 2e-3 absolute on O(1) values).
"""
from __future__ import annotations

import math

import pytest
import torch

import attnkernels

from .backend_params import backend_unavailable
from .cpu_helpers import CAUSAL, DENSE, one_thread, ops, window_mode  # noqa: F401 (one_thread: autouse fixture)
from .test_cpu_attention import Tables, case_id, make_inputs, random_layout, run_kernels
from .tolerance import assert_within_rule

_REASON = backend_unavailable("cpu")
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"C++ CPU kernels unavailable: {_REASON}")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16"}


SIXTEEN_BIT_PATHS = ("amx-bf16", "amx-fp16", "avx512-bf16")


@pytest.fixture(params=["16bit", "upcast"])
def gemm_path(request, monkeypatch):
    """Selects the GEMM path for the test; yields a function dtype -> the path name that runs."""
    if request.param == "upcast":
        monkeypatch.setenv("ATTNKERNELS_CPU_NO_AMX", "1")
    else:
        monkeypatch.delenv("ATTNKERNELS_CPU_NO_AMX", raising=False)

    def path_for(dtype):
        name = ops().gemm_path(DTYPE_NAMES[dtype])
        if request.param == "16bit" and name not in SIXTEEN_BIT_PATHS:
            pytest.skip(f"this CPU has no 16-bit GEMM engine for {dtype} (gemm_path: {name}); the upcast param covers it")
        if request.param == "upcast":
            assert name == "fp32-upcast"
        return name

    return path_for


def check_lowp(shape, window, dtype, tables=None, kpm=None, seed=0, inputs=None):
    q, k, v, dout = inputs if inputs is not None else make_inputs(shape, dtype, seed)
    scale = 1.0 / math.sqrt(shape[5])
    out, lse, dq, dk, dv = run_kernels(q, k, v, dout, scale, window, tables, kpm)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert dq.dtype == dk.dtype == dv.dtype == dtype
    for name, t in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert torch.isfinite(t).all(), f"{name}: non-finite"

    ref_kw = dict(window_size=window, scale=scale, key_padding_mask=kpm,
                  block_mask=tables.reference_layout() if tables is not None else None)
    # float64 oracle, its gradients by autograd
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    out64, lse64 = attnkernels.attention_reference(q64, k64, v64, **ref_kw)
    out64.backward(dout.double())
    # same-dtype baseline
    qs, ks, vs = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out_s, lse_s = attnkernels.attention_reference(qs, ks, vs, upcast=False, **ref_kw)
    out_s.backward(dout)

    empty = torch.isneginf(lse64.detach())
    assert torch.equal(torch.isneginf(lse), empty), "lse: the rows that see no key differ"
    assert (out[empty] == 0).all() and (dq[empty] == 0).all(), "rows that see no key: out and dq must be 0"
    assert_within_rule("out", out, out64.detach(), out_s.detach(), dtype)
    assert_within_rule("lse", lse, lse64.detach(), lse_s.detach(), dtype)
    for name, got, ref, base in (("dq", dq, q64.grad, qs.grad), ("dk", dk, k64.grad, ks.grad),
                                 ("dv", dv, v64.grad, vs.grad)):
        assert_within_rule(name, got, ref, base, dtype)


# (B, Hq, Hk, Nq, Nk, D, Dv), (left, right): N never a multiple of a tile, every listed D
CASES = [
    ((2, 4, 4, 97, 97, 64, 64), CAUSAL),
    ((1, 4, 2, 97, 300, 40, 40), DENSE),  # GQA, Nq < Nk
    ((1, 2, 1, 300, 97, 80, 80), CAUSAL),  # MQA, Nq > Nk: the first 203 rows see nothing
    ((1, 2, 2, 300, 300, 16, 16), (17, 3)),  # window, odd band edges
    ((1, 2, 1, 131, 131, 128, 128), (33, 33)),
    ((1, 1, 1, 97, 97, 256, 256), DENSE),
    ((1, 2, 1, 97, 131, 64, 32), DENSE),  # Dv != D
    ((1, 2, 2, 67, 67, 33, 33), DENSE),  # odd D: the upcast path even where AMX runs
    ((1, 2, 1, 300, 200, 64, 64), DENSE),  # dense forward tiles of 128 query rows, a partial last one
]


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape,window", CASES, ids=[case_id(*s, w) for s, w in CASES])
def test_matches_reference(shape, window, dtype, gemm_path):
    gemm_path(dtype)
    check_lowp(shape, window, dtype)


# Windows whose band spans several key tiles: the forward's wide chunks (odd band edges put
# segment starts on odd keys: the VNNI pair padding of each row's own key range), several
# chunks for a band over 1024 keys, and the backward's per-(key tile, query tile) row band.
WIDE_CASES = [
    ((1, 2, 2, 700, 700, 64, 64), (256, 256)),
    ((1, 4, 2, 531, 600, 64, 64), (129, 0)),  # GQA, Nq < Nk, one-sided
    ((1, 2, 1, 600, 531, 32, 32), (0, 77)),  # Nq > Nk: empty rows
    ((1, 2, 2, 1500, 1500, 32, 32), (700, 651)),  # band > 1024 keys
]


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape,window", WIDE_CASES, ids=[case_id(*s, w) for s, w in WIDE_CASES])
def test_wide_windows(shape, window, dtype, gemm_path):
    gemm_path(dtype)
    check_lowp(shape, window, dtype)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_wide_window_key_padding_and_block_runs(dtype, gemm_path):
    gemm_path(dtype)
    g = torch.Generator().manual_seed(11)
    kpm = torch.rand(2, 557, generator=g) < 0.3
    kpm[1] = True  # batch 1: every row empty
    check_lowp((2, 2, 1, 300, 557, 64, 64), (200, 151), dtype, kpm=kpm)
    bs = 45  # odd block starts; runs of adjacent blocks merge into one segment
    layout = random_layout(1, 2, -(-700 // bs), -(-700 // bs), 0.5, seed=7)
    layout[..., 5, :8] = True
    check_lowp((1, 2, 1, 700, 700, 64, 64), DENSE, dtype, tables=Tables(layout, bs))
    # and cut by a window: query tiles start on odd rows, so the backward's partial exp leaves
    # the pair padding column to be zeroed explicitly
    check_lowp((1, 2, 1, 700, 700, 64, 64), (100, 101), dtype, tables=Tables(layout, bs))


# block sizes 17 and 24: blocks start at odd and even rows, so the VNNI pair alignment of
# every sequence-range GEMM is exercised
SPARSE = [((1, 2, 2, 150, 150, 64, 64), 17, DENSE), ((1, 2, 1, 200, 200, 32, 32), 24, CAUSAL)]


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape,bs,window", SPARSE, ids=[case_id(*s, w, f"-bs{bs}") for s, bs, w in SPARSE])
def test_block_sparse(shape, bs, window, dtype, gemm_path):
    gemm_path(dtype)
    b, hq, _, nq, nk, _, _ = shape
    layout = random_layout(1, hq, -(-nq // bs), -(-nk // bs), 0.45, seed=3)
    layout[..., 0, :] = False  # a query block that sees nothing
    check_lowp(shape, window, dtype, tables=Tables(layout, bs))


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("window", [DENSE, CAUSAL], ids=["dense", "causal"])
def test_key_padding_and_fully_masked_rows(window, dtype, gemm_path):
    gemm_path(dtype)
    shape = (2, 2, 1, 97, 131, 64, 64)
    g = torch.Generator().manual_seed(5)
    kpm = torch.rand(2, 131, generator=g) < 0.3
    kpm[1] = True  # batch 1: every key padded, every row empty
    check_lowp(shape, window, dtype, kpm=kpm)


# The forward's tasks on the matrix units: (b, kv head, range of query tiles), each packing the key
# band its tiles read into its own buffers, shared by the GQA group's heads. A window bounded on both
# sides splits a head into ranges of ~1024 query rows (N=2100: three, the last one partial, bands
# starting past key 0); block tables narrow each range's packed keys to the blocks it lists.
RANGE_CASES = [
    ((1, 2, 1, 2100, 2100, 64, 64), (100, 37)),
    ((1, 4, 2, 1500, 1300, 32, 32), (300, 0)),  # GQA, Nq > Nk, one-sided: no range split, empty rows
    ((1, 2, 2, 1100, 1100, 64, 64), (0, 513)),  # one-sided to the right
]


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape,window", RANGE_CASES, ids=[case_id(*s, w, "-ranges") for s, w in RANGE_CASES])
def test_task_ranges_pack_their_band(shape, window, dtype, gemm_path):
    gemm_path(dtype)
    check_lowp(shape, window, dtype)


def banded_layout(n_blocks, seed):
    """Block diagonal +-1 and one random block per block row: later query blocks list no early keys."""
    g = torch.Generator().manual_seed(seed)
    i = torch.arange(n_blocks)
    layout = (i[:, None] - i[None, :]).abs() <= 1
    layout[i, torch.randint(0, n_blocks, (n_blocks,), generator=g)] = True
    return layout[None, None]


# Rows that see whole blocks with even starts and lengths take one exp pass over the run of their
# blocks (bs 64 and 48, BigBird's case); bs 45 puts blocks on odd keys (one pass per block).
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("bs", [64, 48, 45])
def test_block_runs_B1_H2_N1800_D64(bs, dtype, gemm_path):
    gemm_path(dtype)
    n = 1800
    check_lowp((1, 2, 1, n, n, 64, 64), DENSE, dtype, tables=Tables(banded_layout(-(-n // bs), seed=bs), bs))


def test_task_ranges_deterministic_across_thread_counts(gemm_path):
    """The range split follows the thread count; every query tile's result must not."""
    gemm_path(torch.bfloat16)
    shape, window = (1, 2, 1, 2100, 2100, 64, 64), (100, 37)
    q, k, v, dout = make_inputs(shape, torch.bfloat16, seed=21)
    results = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        results.append(run_kernels(q, k, v, dout, 0.125, window, None, None))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


# The forward's lazy rescaling (matrix units): a row takes its P against the running max, or on
# its first key tile against the previous row's max, and is redone only when its own max lands
# more than 8 above (or, for a first estimate, 60 below) it. Inputs that take every branch: the
# keys' norms grow by key tile (a later tile's max outgrows the running max), and the queries'
# norms alternate 1, 8, 40 by row (an estimate far above, far below or close to the row's max).
LAZY_CASES = [
    ((1, 2, 1, 700, 700, 64, 64), DENSE),
    ((1, 2, 1, 700, 700, 64, 64), CAUSAL),
    ((1, 2, 2, 700, 700, 64, 64), (256, 256)),  # wide chunks: one step per query tile
    ((1, 2, 1, 300, 557, 32, 32), (200, 151)),
]


def lazy_inputs(shape, dtype):
    q, k, v, dout = make_inputs(shape, torch.float32, seed=13)
    row_scale = torch.tensor([1.0, 8.0, 40.0]).repeat(q.shape[2] // 3 + 1)[: q.shape[2]]
    key_scale = 1.0 + 3.0 * (torch.arange(k.shape[2]) // 256).float()
    q = q * row_scale[:, None]
    k = k * key_scale[:, None]
    return tuple(t.to(dtype) for t in (q, k, v, dout))


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape,window", LAZY_CASES, ids=[case_id(*s, w, "-lazy") for s, w in LAZY_CASES])
def test_lazy_rescale_rows_redone(shape, window, dtype, gemm_path):
    gemm_path(dtype)
    check_lowp(shape, window, dtype, inputs=lazy_inputs(shape, dtype))


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_lazy_rescale_key_padding_empty_rows(dtype, gemm_path):
    """Rows that see no key in a chunk keep no running max (the next row's estimate is skipped)."""
    gemm_path(dtype)
    shape = (2, 2, 1, 300, 557, 64, 64)
    g = torch.Generator().manual_seed(17)
    kpm = torch.rand(2, 557, generator=g) < 0.3
    kpm[0, :300] = True  # batch 0: the first keys padded, so early query tiles' first chunks are empty
    kpm[1] = True
    check_lowp(shape, DENSE, dtype, kpm=kpm, inputs=lazy_inputs(shape, dtype))
    check_lowp(shape, (40, 40), dtype, kpm=kpm, inputs=lazy_inputs(shape, dtype))


def test_deterministic_across_runs_and_thread_counts(gemm_path):
    gemm_path(torch.bfloat16)
    shape, window = (2, 4, 2, 200, 333, 64, 64), (100, 20)
    layout = random_layout(1, 4, 4, 6, 0.6, seed=8)
    q, k, v, dout = make_inputs(shape, torch.bfloat16, seed=2)
    results = []
    for threads in (1, 2, 1):
        torch.set_num_threads(threads)
        results.append(run_kernels(q, k, v, dout, 0.125, window, Tables(layout, 64)))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_forced_fallback_is_the_fp32_path(monkeypatch):
    """ATTNKERNELS_CPU_NO_AMX=1: a bf16 call is the fp32 kernel on the upcast inputs, rounded."""
    monkeypatch.setenv("ATTNKERNELS_CPU_NO_AMX", "1")
    assert ops().gemm_path("bfloat16") == "fp32-upcast"
    q, k, v, dout = make_inputs((1, 2, 1, 97, 131, 64, 64), torch.bfloat16, seed=4)
    out, lse = ops().attention_fwd(q, k, v, 0.125, 40, 7, None, None, 0, None)
    out32, lse32 = ops().attention_fwd(q.float(), k.float(), v.float(), 0.125, 40, 7, None, None, 0, None)
    assert torch.equal(out, out32.to(torch.bfloat16)) and torch.equal(lse, lse32)
    grads = ops().attention_bwd(dout, q, k, v, out, lse, 0.125, 40, 7, None, None, None, None, 0, None)
    grads32 = ops().attention_bwd(dout.float(), q.float(), k.float(), v.float(), out.float(), lse, 0.125, 40, 7,
                                  None, None, None, None, 0, None)
    for a, b in zip(grads[:3], grads32[:3]):  # (dq, dk, dv); the 4th, dbias, is empty without bias_grad
        assert torch.equal(a, b.to(torch.bfloat16))


def test_gemm_path_names(monkeypatch):
    monkeypatch.delenv("ATTNKERNELS_CPU_NO_AMX", raising=False)
    assert ops().gemm_path() == ops().gemm_path("bfloat16")
    assert ops().gemm_path("bfloat16") in ("amx-bf16", "avx512-bf16", "fp32-upcast")
    assert ops().gemm_path("float16") in ("amx-fp16", "fp32-upcast")
    assert ops().gemm_path("float32") == "fp32-brgemm"
    assert ops().gemm_path("float64") == "fp64-vector"
    monkeypatch.setenv("ATTNKERNELS_CPU_NO_AMX", "0")  # "0" does not disable
    assert ops().gemm_path("bfloat16") == ops().gemm_path()
    with pytest.raises(RuntimeError, match="gemm_path: dtype must be"):
        ops().gemm_path("int8")


def test_public_api_bf16_autograd(gemm_path):
    """Through attnkernels.attention (autograd, the custom op) on both paths."""
    gemm_path(torch.bfloat16)
    q, k, v, dout = make_inputs((1, 2, 2, 70, 70, 64, 64), torch.bfloat16, seed=6)
    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    with attnkernels.backend("cpu"):
        out = attnkernels.attention(qs, ks, vs, causal=True)
    out.backward(dout)
    got = run_kernels(q, k, v, dout, 1 / 8, CAUSAL)
    assert torch.equal(out.detach(), got[0])
    assert torch.equal(qs.grad, got[2]) and torch.equal(ks.grad, got[3]) and torch.equal(vs.grad, got[4])
