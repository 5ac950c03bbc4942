"""C++ CPU softmax attention (csrc/softmax.cpp), forward + backward, against the float64 reference.

Tolerances:
- float64: the kernels accumulate in float64, so out/lse/grads must match the
  float64 reference to ~1e-10 (absolute; values are O(1)).
- float32 / bfloat16 / float16: FlashAttention's rule (tests/tolerance.py): max error
  against the float64 reference <= 2 x the max error of the same computation done
  plainly in the input dtype (`attention_reference(..., upcast=False)`) + a small floor.

The ops are called directly (`torch.ops.attnkernels_cpu_<cap>.attention_fwd/bwd`) so
that every argument the kernels accept is exercised; API-level tests go through
`attnkernels.attention` under `attnkernels.backend("cpu")`.
"""
from __future__ import annotations

import math

import pytest
import torch

import attnkernels
from attnkernels import masks
from attnkernels.softmax.reference import TableLayout, attention_reference, attention_reference_backward
from attnkernels.conventions import window_visibility

from .backend_params import backend_unavailable
from .cpu_helpers import CAUSAL, DENSE, one_thread, ops, window_mode  # noqa: F401 (one_thread: autouse fixture)
from .tolerance import assert_within_rule

_REASON = backend_unavailable("cpu")
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"C++ CPU kernels unavailable: {_REASON}")

FP64_ATOL = 1e-10
DTYPE_IDS = {torch.float64: "fp64", torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


# ----------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------


def case_id(b, hq, hk, nq, nk, d, dv, window, extra="") -> str:
    heads = f"H{hq}" if hq == hk else f"Hq{hq}-Hk{hk}"
    n = f"N{nq}" if nq == nk else f"Nq{nq}-Nk{nk}"
    dvs = f"-Dv{dv}" if dv != d else ""
    return f"B{b}-{heads}-{n}-D{d}{dvs}-{window_mode(window)}{extra}"


def tables_from_layout(layout: torch.Tensor):
    """Bool (Bm, Hm, R, C) -> (num int32 (Bm, Hm, R), indices int32 (Bm, Hm, R, C)): listed ascending, then 0."""
    n_cols = layout.shape[-1]
    order = (~layout).to(torch.int64) * n_cols + torch.arange(n_cols)
    indices = torch.argsort(order, dim=-1).to(torch.int32)
    num = layout.sum(-1).to(torch.int32)
    indices = torch.where(torch.arange(n_cols) < num[..., None], indices, torch.zeros_like(indices))
    return num.contiguous(), indices.contiguous()


class Tables:
    """A block layout (Bm, Hm, nQb, nKb) and both table pairs, for any block size (not only powers of two)."""

    def __init__(self, layout: torch.Tensor, block_size: int):
        self.layout, self.block_size = layout, block_size
        self.kv_num_blocks, self.kv_indices = tables_from_layout(layout)
        self.q_num_blocks, self.q_indices = tables_from_layout(layout.transpose(-1, -2).contiguous())

    @classmethod
    def from_block_mask(cls, bm) -> "Tables":
        t = cls.__new__(cls)
        t.layout, t.block_size = bm.to_dense(), bm.block_size
        t.kv_num_blocks, t.kv_indices, t.q_num_blocks, t.q_indices = bm.kv_num_blocks, bm.kv_indices, bm.q_num_blocks, bm.q_indices
        return t

    def reference_layout(self):
        return TableLayout(self.kv_num_blocks, self.kv_indices, self.block_size)


def random_layout(bm, hm, n_q_blocks, n_k_blocks, density, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(bm, hm, n_q_blocks, n_k_blocks, generator=g) < density


def make_inputs(shape, dtype, seed=0):
    b, hq, hk, nq, nk, d, dv = shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, nq, d, generator=g).to(dtype)
    k = torch.randn(b, hk, nk, d, generator=g).to(dtype)
    v = torch.randn(b, hk, nk, dv, generator=g).to(dtype)
    dout = torch.randn(b, hq, nq, dv, generator=g).to(dtype)
    return q, k, v, dout


def run_kernels(q, k, v, dout, scale, window, tables=None, kpm=None, q_tables=True, kernels=None):
    """(out, lse, dq, dk, dv) from the C++ ops (`kernels`: a torch.ops namespace, default the chosen build)."""
    kernels = kernels or ops()
    kv = (tables.kv_num_blocks, tables.kv_indices) if tables is not None else (None, None)
    qt = (tables.q_num_blocks, tables.q_indices) if tables is not None and q_tables else (None, None)
    sbs = tables.block_size if tables is not None else 0
    out, lse = kernels.attention_fwd(q, k, v, scale, window[0], window[1], *kv, sbs, kpm)
    dq, dk, dv, _ = kernels.attention_bwd(dout, q, k, v, out, lse, scale, window[0], window[1], *kv, *qt, sbs, kpm)
    return out, lse, dq, dk, dv


def check_case(shape, window, dtype, tables=None, kpm=None, q_tables=True, seed=0):
    """Runs the kernels and checks out, lse, dq, dk, dv against the float64 reference."""
    q, k, v, dout = make_inputs(shape, dtype, seed)
    scale = 1.0 / math.sqrt(shape[5])
    out, lse, dq, dk, dv = run_kernels(q, k, v, dout, scale, window, tables, kpm, q_tables)
    b, hq, hk, nq, nk, d, dv_dim = shape
    assert out.dtype == dtype and out.shape == (b, hq, nq, dv_dim)
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and lse.shape == (b, hq, nq)
    for name, got, like in (("dq", dq, q), ("dk", dk, k), ("dv", dv, v)):
        assert got.dtype == dtype and got.shape == like.shape, name
        assert torch.isfinite(got).all(), f"{name}: non-finite gradient"
    assert torch.isfinite(out).all(), "out: non-finite"

    ref_kw = dict(window_size=window, scale=scale, key_padding_mask=kpm,
                  block_mask=tables.reference_layout() if tables is not None else None)
    q64, k64, v64, do64 = (t.double() for t in (q, k, v, dout))
    out64, lse64 = attention_reference(q64, k64, v64, **ref_kw)
    grads64 = attention_reference_backward(do64, q64, k64, v64, **ref_kw)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(lse64)), "lse: the rows that see no key differ"
    # rows that see nothing: out exactly 0 and their dq exactly 0
    empty = torch.isneginf(lse64)
    assert (out[empty] == 0).all() and (dq[empty] == 0).all()

    if dtype == torch.float64:
        for name, got, ref in (("out", out, out64), ("lse", lse, lse64), ("dq", dq, grads64[0]),
                               ("dk", dk, grads64[1]), ("dv", dv, grads64[2])):
            fin = torch.isfinite(ref)
            err = (got[fin] - ref[fin]).abs().max().item() if fin.any() else 0.0
            assert err <= FP64_ATOL, f"{name}: max error {err:.3e} > {FP64_ATOL:g}"
        return
    # same-dtype baseline: the plain computation in the input dtype, autograd for its grads
    qs, ks, vs = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out_s, lse_s = attention_reference(qs, ks, vs, upcast=False, **ref_kw)
    out_s.backward(dout)
    assert_within_rule("out", out, out64, out_s, dtype)
    assert_within_rule("lse", lse, lse64, lse_s, dtype)
    for name, got, ref, base in (("dq", dq, grads64[0], qs.grad), ("dk", dk, grads64[1], ks.grad),
                                 ("dv", dv, grads64[2], vs.grad)):
        assert_within_rule(name, got, ref, base, dtype)


# ----------------------------------------------------------------------------------------
# dense, causal, windows; GQA/MQA; Nq != Nk both ways; odd N; D != Dv; D up to 256
# ----------------------------------------------------------------------------------------

# (B, Hq, Hk, Nq, Nk, D, Dv), (left, right)
CASES = [
    ((1, 2, 1, 1, 1, 16, 16), DENSE),
    ((2, 4, 4, 17, 17, 64, 64), DENSE),
    ((2, 4, 2, 97, 97, 64, 64), CAUSAL),  # GQA 2:1
    ((1, 4, 1, 300, 300, 80, 80), CAUSAL),  # MQA, N crosses several 64x128 tiles
    ((1, 2, 2, 97, 300, 128, 128), CAUSAL),  # Nq < Nk
    ((1, 2, 2, 300, 97, 64, 64), CAUSAL),  # Nq > Nk: the first 203 rows see nothing
    ((1, 2, 1, 300, 97, 32, 48), DENSE),  # Dv != D, Nq > Nk
    ((2, 2, 1, 97, 300, 64, 16), DENSE),  # Dv != D, Nq < Nk
    ((1, 1, 1, 97, 97, 256, 256), DENSE),  # D = 256 (the maximum)
    ((1, 2, 1, 97, 97, 16, 16), (0, 0)),  # each query sees only its diagonal key
    ((1, 2, 1, 300, 300, 64, 64), (1, 1)),
    ((1, 4, 2, 300, 300, 64, 64), (17, 17)),
    ((1, 2, 2, 300, 300, 32, 32), (64, 64)),
    ((1, 1, 1, 300, 300, 64, 64), (255, 255)),
    ((1, 2, 1, 300, 300, 32, 32), (0, 128)),
    ((1, 2, 1, 300, 300, 32, 32), (128, 0)),
    ((1, 2, 1, 97, 300, 32, 32), (-1, 32)),
    ((1, 2, 1, 300, 97, 32, 32), (32, -1)),
    # windows with causal (causal arrives as window_right = 0)
    ((1, 2, 1, 300, 300, 64, 64), (17, 0)),
    ((1, 2, 2, 300, 97, 64, 64), (64, 0)),  # Nq > Nk: empty rows and a window
    ((1, 2, 1, 97, 300, 16, 16), (255, 0)),
]
CASE_IDS = [case_id(*s, w) for s, w in CASES]


@pytest.mark.parametrize("shape,window", CASES, ids=CASE_IDS)
def test_fp64_matches_reference(shape, window):
    check_case(shape, window, torch.float64)


@pytest.mark.parametrize("shape,window", CASES, ids=CASE_IDS)
def test_fp32_matches_reference(shape, window):
    check_case(shape, window, torch.float32)


LOW_PRECISION_CASES = [CASES[i] for i in (1, 3, 5, 6, 11, 16)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("shape,window", LOW_PRECISION_CASES, ids=[case_id(*s, w) for s, w in LOW_PRECISION_CASES])
def test_low_precision_matches_reference(shape, window, dtype):
    check_case(shape, window, dtype)


# Windows whose band spans several 256-key tiles: the forward's wide chunks (one online-softmax
# step per band of <= 1024 keys, each row reading only its own keys), several chunks when the
# band is wider, and the backward's per-(key tile, query tile) row band.
WIDE_CASES = [
    ((1, 2, 2, 700, 700, 64, 64), (256, 256)),  # one chunk, 3-4 key tiles per query tile
    ((1, 4, 2, 531, 600, 64, 64), (129, 0)),  # one-sided (w, 0), GQA, Nq < Nk, odd band edges
    ((1, 2, 1, 600, 531, 32, 32), (0, 77)),  # (0, w), Nq > Nk: the first rows see nothing
    ((1, 2, 2, 1500, 1500, 32, 32), (700, 650)),  # band > 1024 keys: chunks with online rescale
    ((1, 2, 1, 300, 700, 64, 48), (300, -1)),  # right side unbounded, Dv != D
]
WIDE_IDS = [case_id(*s, w) for s, w in WIDE_CASES]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("shape,window", WIDE_CASES, ids=WIDE_IDS)
def test_wide_windows(shape, window, dtype):
    check_case(shape, window, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=DTYPE_IDS.get)
def test_wide_window_with_key_padding(dtype):
    # B2-H2-N300x557-win200_150 with padded keys inside the band; batch 1 fully padded
    g = torch.Generator().manual_seed(11)
    kpm = torch.rand(2, 557, generator=g) < 0.3
    kpm[1] = True
    check_case((2, 2, 1, 300, 557, 64, 64), (200, 150), dtype, kpm=kpm)


@pytest.mark.parametrize("bs", [32, 45])
def test_wide_block_sparse_adjacent_blocks(bs):
    # runs of adjacent listed blocks merge into one segment; block size 45: odd block starts
    nq = nk = 700
    nb = -(-nq // bs)
    layout = random_layout(1, 2, nb, nb, 0.5, seed=7)
    layout[..., 3, :] = False  # a query block that sees nothing
    layout[..., 5, :8] = True  # a long run of adjacent blocks
    check_case((1, 2, 1, nq, nk, 64, 64), DENSE, torch.float32, tables=Tables(layout, bs))
    check_case((1, 2, 1, nq, nk, 64, 64), (100, 100), torch.float32, tables=Tables(layout, bs))


@pytest.mark.parametrize("d", [16, 64, 80, 128, 256])
def test_head_dims(d):
    check_case((1, 2, 1, 97, 97, d, d), CAUSAL, torch.float32)


def test_window_wider_than_sequence_equals_dense():
    q, k, v, dout = make_inputs((1, 2, 1, 300, 200, 32, 32), torch.float32)
    dense = run_kernels(q, k, v, dout, 0.2, DENSE)
    wide = run_kernels(q, k, v, dout, 0.2, (1000, 1000))
    for a, b in zip(dense, wide):
        assert torch.equal(a, b)


@pytest.mark.parametrize("scale", [0.0, -0.3, 2.0], ids=lambda s: f"scale{s}")
def test_non_default_scales(scale):
    """scale > 0 folds the scale into the exp; 0 and negative scales take the scale-first path."""
    q, k, v, dout = make_inputs((1, 2, 1, 97, 300, 32, 32), torch.float64)
    out, lse, dq, dk, dv = run_kernels(q, k, v, dout, scale, (17, 40))
    ref_out, ref_lse = attention_reference(q, k, v, window_size=(17, 40), scale=scale)
    ref = attention_reference_backward(dout, q, k, v, window_size=(17, 40), scale=scale)
    fin = torch.isfinite(ref_lse)
    assert torch.equal(fin, torch.isfinite(lse))
    assert (out - ref_out).abs().max() < FP64_ATOL and (lse[fin] - ref_lse[fin]).abs().max() < FP64_ATOL
    for got, want in zip((dq, dk, dv), ref):
        assert (got - want).abs().max() < FP64_ATOL


# ----------------------------------------------------------------------------------------
# rows that see no key: out 0, lse -inf, zero finite gradients
# ----------------------------------------------------------------------------------------


def _assert_empty_rows(out, lse, dq, rows):
    assert torch.equal(out[..., rows, :], torch.zeros_like(out[..., rows, :]))
    assert torch.isneginf(lse[..., rows]).all()
    assert torch.equal(dq[..., rows, :], torch.zeros_like(dq[..., rows, :]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=DTYPE_IDS.get)
def test_causal_nq_greater_than_nk_empty_rows(dtype):
    q, k, v, dout = make_inputs((1, 2, 1, 150, 40, 16, 16), dtype)
    out, lse, dq, dk, dv = run_kernels(q, k, v, dout, 0.25, CAUSAL)
    _assert_empty_rows(out, lse, dq, slice(0, 110))
    assert torch.isfinite(lse[..., 110:]).all()
    assert all(torch.isfinite(g).all() for g in (dq, dk, dv))


def test_all_padded_keys_give_zero_output_and_gradients():
    q, k, v, dout = make_inputs((2, 2, 2, 50, 70, 16, 16), torch.float32)
    kpm = torch.zeros(2, 70, dtype=torch.bool)
    kpm[1] = True  # batch 1: every key ignored
    out, lse, dq, dk, dv = run_kernels(q, k, v, dout, 0.25, DENSE, kpm=kpm)
    _assert_empty_rows(out[1], lse[1], dq[1], slice(None))
    assert torch.equal(dk[1], torch.zeros_like(dk[1])) and torch.equal(dv[1], torch.zeros_like(dv[1]))
    assert torch.isfinite(lse[0]).all() and dk[0].abs().sum() > 0


def test_empty_sparse_rows():
    layout = random_layout(1, 2, 5, 5, 0.5, seed=3)
    layout[:, :, 2] = False  # query block 2 sees nothing
    layout[:, 1, 4] = False  # and query block 4 of head 1
    tables = Tables(layout, 32)
    check_case((1, 2, 1, 150, 150, 32, 32), DENSE, torch.float64, tables=tables)
    q, k, v, dout = make_inputs((1, 2, 1, 150, 150, 32, 32), torch.float32)
    out, lse, dq, dk, dv = run_kernels(q, k, v, dout, 0.2, DENSE, tables)
    _assert_empty_rows(out, lse, dq, slice(64, 96))
    _assert_empty_rows(out[:, 1], lse[:, 1], dq[:, 1], slice(128, 150))


# ----------------------------------------------------------------------------------------
# block-sparse tables (any head / batch broadcast), key padding
# ----------------------------------------------------------------------------------------

# (shape, block_size, (Bm, Hm), density, window)
SPARSE_CASES = [
    ((1, 2, 1, 300, 300, 32, 32), 64, (1, 2), 0.3, DENSE),  # block == kernel tile rows; partial last block
    ((2, 4, 2, 300, 300, 64, 64), 16, (2, 4), 0.2, DENSE),  # blocks smaller than the tile, per batch/head
    ((1, 2, 2, 300, 300, 32, 32), 128, (1, 1), 0.5, DENSE),  # blocks larger than the 64-row tile: sub-tiles
    ((1, 2, 1, 300, 300, 32, 32), 32, (1, 2), 0.05, DENSE),  # very sparse
    ((1, 2, 1, 97, 300, 32, 32), 48, (1, 2), 0.4, DENSE),  # block size not a power of two, Nq != Nk
    ((1, 2, 1, 600, 600, 16, 16), 512, (1, 2), 0.7, DENSE),  # blocks larger than the 256-key tile
    ((1, 2, 1, 300, 300, 32, 32), 32, (1, 2), 0.5, CAUSAL),  # tables plus the causal element rule
    ((1, 2, 1, 300, 300, 32, 32), 64, (1, 2), 0.5, (17, 17)),  # tables plus a window
]


def _sparse_id(shape, bs, lead, density, window):
    return case_id(*shape, window, f"-bs{bs}-Bm{lead[0]}Hm{lead[1]}-dens{int(density * 100)}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("shape,bs,lead,density,window", SPARSE_CASES, ids=[_sparse_id(*c) for c in SPARSE_CASES])
def test_sparse_tables(shape, bs, lead, density, window, dtype):
    nq, nk = shape[3], shape[4]
    layout = random_layout(*lead, -(-nq // bs), -(-nk // bs), density, seed=nq + bs)
    check_case(shape, window, dtype, tables=Tables(layout, bs))


def test_sparse_backward_without_q_tables_derives_them():
    layout = random_layout(1, 2, 10, 10, 0.3, seed=1)
    check_case((1, 2, 1, 300, 300, 32, 32), DENSE, torch.float64, tables=Tables(layout, 32), q_tables=False)


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_bigbird(causal):
    bm = masks.bigbird(300, block_size=32, num_global_blocks=1, num_window_blocks=3, num_random_blocks=2,
                       num_heads=4, seed=7, causal=causal)
    assert bm.kv_indices.shape[1] == 4  # per-head random blocks
    window = CAUSAL if causal else DENSE
    check_case((1, 4, 2, 300, 300, 64, 64), window, torch.float32, tables=Tables.from_block_mask(bm))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("window", [DENSE, CAUSAL, (17, 17)], ids=window_mode)
def test_key_padding_mask(window, dtype):
    g = torch.Generator().manual_seed(5)
    kpm = torch.rand(2, 300, generator=g) < 0.3
    kpm[1, 140:] = True  # a padded tail, as in a ragged batch
    check_case((2, 4, 2, 97, 300, 32, 32), window, dtype, kpm=kpm)


def test_key_padding_with_sparse_tables():
    layout = random_layout(2, 2, 5, 5, 0.4, seed=9)
    kpm = torch.rand(2, 150, generator=torch.Generator().manual_seed(2)) < 0.5
    check_case((2, 2, 1, 150, 150, 32, 32), DENSE, torch.float64, tables=Tables(layout, 32), kpm=kpm)


# ----------------------------------------------------------------------------------------
# determinism: bitwise equal across runs and thread counts
# ----------------------------------------------------------------------------------------


def test_deterministic_across_runs_and_thread_counts():
    shape = (2, 4, 2, 300, 300, 64, 64)
    q, k, v, dout = make_inputs(shape, torch.float32)
    layout = random_layout(1, 4, 5, 5, 0.5, seed=4)
    configs = [dict(window=CAUSAL), dict(window=(17, 17)), dict(window=DENSE, tables=Tables(layout, 64))]
    threads = torch.get_num_threads()
    try:
        for cfg in configs:
            torch.set_num_threads(2)
            first = run_kernels(q, k, v, dout, 0.125, **cfg)
            second = run_kernels(q, k, v, dout, 0.125, **cfg)
            torch.set_num_threads(1)
            single = run_kernels(q, k, v, dout, 0.125, **cfg)
            for a, b, c in zip(first, second, single):
                assert torch.equal(a, b) and torch.equal(a, c)
    finally:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------
# iteration bounds: the band-limited loops visit exactly the band's tiles (O(N·w) work)
# ----------------------------------------------------------------------------------------

RANGE_CASES = [
    (300, 300, -1, -1),
    (300, 300, -1, 0),
    (97, 300, -1, 0),
    (300, 97, -1, 0),  # leading query tiles see nothing
    (1000, 1000, 0, 0),
    (1000, 1000, 17, 17),
    (1000, 1000, 255, 255),
    (1000, 1000, 0, 128),
    (1000, 1000, 128, 0),
    (700, 1000, -1, 32),
    (1000, 700, 32, -1),
]


def _tiles_touched(visible: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Bool (n_row_tiles, n_col_tiles): the tile holds at least one visible element."""
    n, m = visible.shape
    padded = torch.zeros(-(-n // rows) * rows, -(-m // cols) * cols, dtype=torch.bool)
    padded[:n, :m] = visible
    return padded.view(-(-n // rows), rows, -(-m // cols), cols).any(3).any(1)


def _as_ranges(touched: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(touched.shape[0], 2, dtype=torch.int64)
    for r, row in enumerate(touched):
        idx = row.nonzero().flatten()
        if idx.numel():
            assert idx[-1] - idx[0] + 1 == idx.numel(), "a band's tiles are contiguous"
            out[r] = torch.tensor([idx[0], idx[-1] + 1])
    return out


@pytest.mark.parametrize("nq,nk,left,right", RANGE_CASES, ids=[f"Nq{a}-Nk{b}-win{c}_{d}" for a, b, c, d in RANGE_CASES])
def test_block_ranges_are_exactly_the_band(nq, nk, left, right):
    block_m, block_n = ops().attention_tile_sizes()
    visible = window_visibility(nq, nk, (left, right))
    touched = _tiles_touched(visible, block_m, block_n)  # (n_q_tiles, n_kv_tiles)
    kv_ranges = ops().attention_kv_block_ranges(nq, nk, left, right)
    q_ranges = ops().attention_q_block_ranges(nq, nk, left, right)
    assert torch.equal(kv_ranges, _as_ranges(touched))
    assert torch.equal(q_ranges, _as_ranges(touched.t()))
    if left >= 0 and right >= 0:  # O(N·w): each query tile visits at most the tiles its band spans
        per_tile = kv_ranges[:, 1] - kv_ranges[:, 0]
        assert per_tile.max() <= (block_m + left + right - 1) // block_n + 2
        per_tile = q_ranges[:, 1] - q_ranges[:, 0]
        assert per_tile.max() <= (block_n + left + right - 1) // block_m + 2


def test_narrow_window_work_is_linear_in_n():
    visited = [int((r[:, 1] - r[:, 0]).sum()) for r in (ops().attention_kv_block_ranges(n, n, 32, 32) for n in (2048, 4096))]
    assert visited[1] <= 2 * visited[0] + 2
    dense = ops().attention_kv_block_ranges(4096, 4096, -1, -1)
    assert visited[1] * 8 < int((dense[:, 1] - dense[:, 0]).sum())


# ----------------------------------------------------------------------------------------
# public API: autograd, non-contiguous inputs, gradcheck
# ----------------------------------------------------------------------------------------


def test_public_api_autograd_non_contiguous():
    b, hq, hk, n, d = 2, 4, 2, 65, 32
    g = torch.Generator().manual_seed(1)
    # (B, N, H, D) storage viewed as (B, H, N, D): non-contiguous, as a model's projections produce
    q = torch.randn(b, n, hq, d, generator=g, dtype=torch.float64).transpose(1, 2).requires_grad_()
    k = torch.randn(b, n, hk, d, generator=g, dtype=torch.float64).transpose(1, 2).requires_grad_()
    v = torch.randn(b, n, hk, d, generator=g, dtype=torch.float64).transpose(1, 2).requires_grad_()
    assert not q.is_contiguous()
    dout = torch.randn(b, hq, n, d, generator=g, dtype=torch.float64)
    with attnkernels.backend("cpu"):
        out, lse = attnkernels.attention(q, k, v, causal=True, return_lse=True)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_out, ref_lse = attention_reference(q.detach(), k.detach(), v.detach(), causal=True)
    ref_grads = attention_reference_backward(dout, q.detach(), k.detach(), v.detach(), causal=True)
    assert (out - ref_out).abs().max() < FP64_ATOL and (lse - ref_lse).abs().max() < FP64_ATOL
    for got, ref in zip(grads, ref_grads):
        assert (got - ref).abs().max() < FP64_ATOL


def test_public_api_sparse_and_padding():
    bm = masks.bigbird(160, block_size=32, num_random_blocks=1, num_heads=2, seed=0)
    q, k, v, dout = make_inputs((2, 2, 2, 160, 160, 16, 16), torch.float64)
    kpm = torch.zeros(2, 160, dtype=torch.bool)
    kpm[0, 150:] = True
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    with attnkernels.backend("cpu"):
        out = attnkernels.attention(q, k, v, block_mask=bm, key_padding_mask=kpm)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_out, _ = attention_reference(q.detach(), k.detach(), v.detach(), block_mask=bm, key_padding_mask=kpm)
    ref_grads = attention_reference_backward(dout, q.detach(), k.detach(), v.detach(), block_mask=bm, key_padding_mask=kpm)
    assert (out - ref_out).abs().max() < FP64_ATOL
    for got, ref in zip(grads, ref_grads):
        assert (got - ref).abs().max() < FP64_ATOL


def test_gradcheck_fp64():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 7, 8, generator=g, dtype=torch.float64).requires_grad_() for _ in range(3))
    with attnkernels.backend("cpu"):
        assert torch.autograd.gradcheck(lambda a, b, c: attnkernels.attention(a, b, c, window_size=(2, 1)), (q, k, v))


# ----------------------------------------------------------------------------------------
# bad inputs: clear errors naming the argument
# ----------------------------------------------------------------------------------------


def _fwd(q, k, v, kvn=None, kvi=None, sbs=0, kpm=None, window=DENSE):
    return ops().attention_fwd(q, k, v, 0.1, window[0], window[1], kvn, kvi, sbs, kpm)


# The ops keep only the invariants that stop a direct torch.ops call from reading out of
# bounds (ranks, matching sizes, dtypes, table shapes and entries); user-facing checks
# (head-dim limit, scale, window meaning) live once in the Python API (test_bad_inputs.py).


def test_error_integer_tensors():
    q = torch.ones(1, 1, 4, 8, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="q must be float32, float64, bfloat16 or float16, got Int"):
        _fwd(q, q, q)


def test_error_shapes_and_heads():
    q = torch.randn(1, 3, 4, 8)
    with pytest.raises(RuntimeError, match=r"query heads \(3\) must be a multiple of the number of key/value heads \(2\)"):
        _fwd(q, torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8))
    with pytest.raises(RuntimeError, match="k's head dim 4 must equal q's head dim 8"):
        _fwd(q, torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 8))
    with pytest.raises(RuntimeError, match=r"v must be \(B, Hk, Nk, Dv\) with Hk=3, Nk=4 like k"):
        _fwd(q, q, torch.randn(1, 3, 5, 8))


def test_error_bad_tables():
    q = torch.randn(1, 2, 100, 8)
    layout = torch.ones(1, 2, 4, 4, dtype=torch.bool)
    num, idx = tables_from_layout(layout)
    with pytest.raises(RuntimeError, match="kv_num_blocks must be int32, got Long"):
        _fwd(q, q, q, num.long(), idx, 32)
    with pytest.raises(RuntimeError, match=r"kv_indices must have shape \(1, 2, 4, 4\)"):
        _fwd(q, q, q, num, idx[..., :3], 32)
    with pytest.raises(RuntimeError, match="kv_num_blocks has 4 block rows, expected 7 for block size 16"):
        _fwd(q, q, q, num, idx, 16)
    with pytest.raises(RuntimeError, match=r"kv_num_blocks head dim must be 1 or Hq=2, got 3"):
        _fwd(q, q, q, num[:, :1].expand(1, 3, 4).contiguous(), idx[:, :1].expand(1, 3, 4, 4).contiguous(), 32)
    bad = idx.clone()
    bad[0, 0, 0, 1] = 9
    with pytest.raises(RuntimeError, match=r"kv_indices lists block 9, outside \[0, 4\)"):
        _fwd(q, q, q, num, bad, 32)
    with pytest.raises(RuntimeError, match="pass both kv_num_blocks and kv_indices, or neither"):
        _fwd(q, q, q, num, None, 32)
    with pytest.raises(RuntimeError, match=r"key_padding_mask must be \(B, Nk\) = \(1, 100\)"):
        _fwd(q, q, q, kpm=torch.zeros(1, 99, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="key_padding_mask must be bool"):
        _fwd(q, q, q, kpm=torch.zeros(1, 100))


# ----------------------------------------------------------------------------------------
# every built capability (default / AVX2 / AVX512) computes the same thing
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("capability", ["default", "avx2", "avx512"])
def test_each_capability_build_matches_reference(capability):
    from attnkernels import _cpu_backend

    if capability not in _cpu_backend._cpu_supported():
        # Loading it would execute instructions this CPU lacks: load() refuses by name instead.
        with pytest.raises(ValueError, match=f"ATTNKERNELS_CPU_CAPABILITY='{capability}': this CPU"):
            _cpu_backend.load(capability)
        pytest.skip(f"this CPU does not support {capability} (load() refused it, as tested)")
    kernels = _cpu_backend.load(capability).ops
    if kernels is None:
        pytest.skip(f"the {capability} build is not present")
    shape, window = (1, 4, 2, 300, 97, 40, 24), (17, 0)
    layout = random_layout(1, 4, 10, 4, 0.5, seed=6)
    for dtype in (torch.float64, torch.float32):
        q, k, v, dout = make_inputs(shape, dtype)
        got = run_kernels(q, k, v, dout, 0.15, window, Tables(layout, 32), kernels=kernels)
        chosen = run_kernels(q, k, v, dout, 0.15, window, Tables(layout, 32))
        tol = FP64_ATOL if dtype == torch.float64 else 1e-4
        for a, b in zip(got, chosen):
            assert torch.equal(torch.isfinite(a), torch.isfinite(b))
            fin = torch.isfinite(b)
            assert (a[fin].double() - b[fin].double()).abs().max() <= tol
