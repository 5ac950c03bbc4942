"""Triton softmax attention (forward + backward) under TRITON_INTERPRET=1 on CPU tensors,
against the float64 reference.

Tolerance (FlashAttention's rule): the kernel's max error against the float64 reference
may be at most 2x the max error of the same-dtype PyTorch computation
(`attention_reference(..., upcast=False)`) plus an absolute floor of 1e-5 (fp32) or
2e-3 (fp16); the floor only matters where the same-dtype error is ~0 (tiny or exact cases).
bf16 is not run here: bf16 `tl.dot` is wrong under the interpreter; it is covered by the
ahead-of-time compile gate (tests/test_compile_report.py).
"""
from __future__ import annotations

import contextlib
import math
import types

import pytest
import torch

import attnkernels
from attnkernels import masks
from attnkernels.softmax import triton_launch as A
from attnkernels.softmax.reference import attention_reference
from attnkernels.conventions import window_visibility
from tests import triton_block_ranges as BR

FLOOR = {torch.float32: 1e-5, torch.float16: 2e-3}
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16"}


# Outputs the kernels allocate are NaN until written (fixture in conftest.py).
pytestmark = pytest.mark.usefixtures("poison_empty")


# ----------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------


def _call(scale, window_left, window_right, kv_num_blocks=None, kv_indices=None, q_num_blocks=None,
          q_indices=None, sparse_block_size=0, key_padding_mask=None):
    """The call object the launchers take (the ops build the same from their arguments)."""
    return types.SimpleNamespace(scale=scale, window_left=window_left, window_right=window_right,
                                 kv_num_blocks=kv_num_blocks, kv_indices=kv_indices, q_num_blocks=q_num_blocks,
                                 q_indices=q_indices, sparse_block_size=sparse_block_size,
                                 key_padding_mask=key_padding_mask)


def attention_forward(q, k, v, scale, window_left, window_right, **tables_and_kpm):
    return A.forward(_call(scale, window_left, window_right, **tables_and_kpm), q, k, v)


def attention_backward(dout, q, k, v, out, lse, scale, window_left, window_right, **tables_and_kpm):
    dq, dk, dv, _ = A.backward(_call(scale, window_left, window_right, **tables_and_kpm), dout, q, k, v, out, lse)
    return dq, dk, dv


class TableMask:
    """A tiny stand-in for a BlockMask: a bool block layout (Bm, Hm, nQb, nKb) and its tables."""

    def __init__(self, layout: torch.Tensor, block_size: int):
        self.layout, self.block_size = layout, block_size
        n_kb, n_qb = layout.shape[-1], layout.shape[-2]
        self.kv_num_blocks, self.kv_indices = _tables(layout, n_kb)
        self.q_num_blocks, self.q_indices = _tables(layout.transpose(-1, -2), n_qb)

    def element_mask(self, q_len: int, kv_len: int) -> torch.Tensor:
        b = self.block_size
        return self.layout.repeat_interleave(b, -2)[..., :q_len, :].repeat_interleave(b, -1)[..., :kv_len]


def _sparse_kwargs(block_mask) -> dict:
    """The forward's table arguments from a TableMask or an attnkernels BlockMask."""
    if block_mask is None:
        return {}
    return dict(kv_num_blocks=block_mask.kv_num_blocks, kv_indices=block_mask.kv_indices,
                sparse_block_size=block_mask.block_size)


def _tables(layout: torch.Tensor, n_cols: int):
    """(num, indices): per row, the listed columns ascending first, then padding."""
    order = (~layout).to(torch.int64) * n_cols + torch.arange(n_cols)  # listed first, ascending
    indices = torch.argsort(order, dim=-1).to(torch.int32)
    return layout.sum(-1).to(torch.int32), indices


def _case_id(b, hq, hk, nq, nk, d, dv, window, extra=""):
    if window == (-1, -1):
        mode = "dense"
    elif window == (-1, 0):
        mode = "causal"
    else:
        mode = f"win{window[0]}_{window[1]}"
    dvs = f"-Dv{dv}" if dv != d else ""
    return f"B{b}-Hq{hq}-Hk{hk}-Nq{nq}-Nk{nk}-D{d}{dvs}-{mode}{extra}"


def _check(name, got, ref64, ref_same, floor):
    got, ref_same = got.double(), ref_same.double()
    assert not torch.isnan(got).any(), f"{name}: NaN"
    err = (got - ref64).abs().max().item() if got.numel() else 0.0
    base = (ref_same - ref64).abs().max().item() if got.numel() else 0.0
    assert err <= 2 * base + floor, f"{name}: max error {err:.3g} > 2 * {base:.3g} (same-dtype torch) + {floor:g}"


def _check_lse(got, ref64, ref_same, floor):
    assert got.dtype == torch.float32
    inf_ref = torch.isneginf(ref64)
    assert torch.equal(torch.isneginf(got), inf_ref), "lse: -inf rows differ"
    assert torch.isfinite(got[~inf_ref]).all()
    _check("lse", got[~inf_ref], ref64[~inf_ref], ref_same[~inf_ref].float(), floor)


def run_case(shape, window, dtype, block_mask=None, key_padding_mask=None, transpose=False, backward=True):
    b, hq, hk, nq, nk, d, dv = shape
    q = torch.randn(b, hq, nq, d).to(dtype)
    k = torch.randn(b, hk, nk, d).to(dtype)
    v = torch.randn(b, hk, nk, dv).to(dtype)
    if transpose:  # (B, N, H, D) storage, as a model's projections produce: non-contiguous views
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    scale = 1.0 / math.sqrt(d)
    ref_kw = dict(window_size=window, scale=scale, block_mask=block_mask, key_padding_mask=key_padding_mask)
    sparse_kw = _sparse_kwargs(block_mask)

    out, lse = attention_forward(q, k, v, scale, *window, key_padding_mask=key_padding_mask, **sparse_kw)
    assert out.dtype == dtype and out.shape == (b, hq, nq, dv)

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out64, lse64 = attention_reference(q64, k64, v64, **ref_kw)
    qs, ks, vs = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out_s, lse_s = attention_reference(qs, ks, vs, upcast=False, **ref_kw)
    floor = FLOOR[dtype]
    _check("out", out, out64, out_s, floor)
    _check_lse(lse, lse64, lse_s, floor)
    if not backward:
        return
    dout = torch.randn(b, hq, nq, dv).to(dtype)
    out64.backward(dout.double())
    out_s.backward(dout)
    if block_mask is not None:
        sparse_kw.update(q_num_blocks=block_mask.q_num_blocks, q_indices=block_mask.q_indices)
    dq, dk, dv_ = attention_backward(dout, q, k, v, out, lse, scale, *window,
                                       key_padding_mask=key_padding_mask, **sparse_kw)
    for name, got, g64, gs in (("dq", dq, q64.grad, qs.grad), ("dk", dk, k64.grad, ks.grad), ("dv", dv_, v64.grad, vs.grad)):
        assert got.dtype == dtype and got.shape == g64.shape, name
        _check(name, got, g64, gs, floor)
    # rows that see no key: zero gradient, exactly (not merely small)
    empty = torch.isneginf(lse64)  # (B, Hq, Nq)
    assert torch.equal(dq[empty], torch.zeros_like(dq[empty])), "dq of rows that see no key"


# ----------------------------------------------------------------------------------------
# phase 1: dense, causal, window; GQA; Nq != Nk; ragged N; Dv != D; empty rows
# ----------------------------------------------------------------------------------------

# (B, Hq, Hk, Nq, Nk, D, Dv), (left, right)
CASES = [
    ((1, 2, 1, 1, 1, 16, 16), (-1, -1)),
    ((1, 2, 2, 17, 17, 128, 128), (-1, -1)),
    ((2, 8, 2, 97, 300, 40, 40), (-1, 0)),  # Nq < Nk, causal, GQA 4:1, B > 1
    ((1, 2, 1, 300, 97, 64, 64), (-1, 0)),  # Nq > Nk, causal: the first 203 rows see nothing (MQA)
    ((1, 2, 1, 97, 300, 40, 24), (-1, -1)),  # Dv != D
    ((1, 2, 2, 300, 300, 16, 16), (0, 0)),
    ((1, 2, 1, 97, 97, 40, 40), (17, 17)),
    ((1, 1, 1, 300, 300, 32, 32), (0, 128)),
    ((1, 2, 1, 97, 300, 16, 16), (-1, 32)),
    ((1, 2, 1, 300, 97, 16, 16), (32, -1)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("shape,window", CASES, ids=[_case_id(*s, w) for s, w in CASES])
def test_attention_matches_reference(shape, window, dtype):
    run_case(shape, window, dtype)


# small tiles: the same code on many blocks, so each program walks a masked left edge,
# unmasked full blocks and a masked right edge (and GQA groups over several key blocks)
SMALL_BLOCK_CASES = [
    ((1, 4, 2, 97, 300, 40, 40), (-1, 0)),
    ((1, 2, 1, 300, 97, 16, 16), (-1, 0)),
    ((1, 2, 1, 97, 97, 16, 16), (17, 40)),
    ((2, 2, 2, 160, 130, 64, 32), (70, -1)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("shape,window", SMALL_BLOCK_CASES,
                         ids=[_case_id(*s, w, "-M16N32") for s, w in SMALL_BLOCK_CASES])
def test_attention_small_blocks(shape, window, dtype):
    with A.override_blocks(16, 32):
        run_case(shape, window, dtype)


# TF32 (fp32 inputs, torch.backends.cuda.matmul.allow_tf32): its own tiles (A._TF32_CONFIGS),
# sm_80's here (the interpreter's arch). The interpreter's dot is exact whatever DOT_PREC says,
# so these check the TF32 tiles' blocks and masked loop segments at the fp32 tolerance, not
# TF32 rounding (the compile gate checks the TF32 MMAs).
TF32_CASES = [
    ((1, 2, 1, 97, 130, 40, 40), (-1, 0)),  # D <= 64: fwd 64 x 16, dQ 32 x 16 on 2 warps
    ((2, 4, 2, 65, 97, 128, 128), (-1, -1)),  # dK/dV 16 x 32, GQA 2:1
    ((1, 2, 1, 33, 50, 256, 256), (17, 17)),  # D = 256: fwd / dQ 16 x 16 on 4 warps, dK/dV 32 x 16
]


@pytest.mark.parametrize("shape,window", TF32_CASES, ids=[_case_id(*s, w, "-tf32") for s, w in TF32_CASES])
def test_tf32_tiles_match_reference(shape, window, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    d = shape[5]
    tiles = {k: A.block_config(k, d, d, torch.float32) for k in ("fwd", "dkdv", "dq")}
    exact = {k: A.block_config(k, d, d, torch.float32, prec="ieee") for k in ("fwd", "dkdv", "dq")}
    assert tiles != exact and tiles == {k: A.block_config(k, d, d, torch.float32, prec="tf32") for k in tiles}
    run_case(shape, window, torch.float32)


# sm_90a's tiles (A._CONFIGS_SM90), run here by making the launcher pick the arch-90 table:
# at D = 256 (fp16) dK and dV are two launches (`split_dkdv`: 128 keys x 16 queries each,
# dQ 128 x 16); at D = 64 / 128 the one-program dK/dV of 128 keys
SM90_CASES = [
    ((1, 4, 2, 97, 97, 256, 256), (-1, 0)),  # B1-Hq4-Hk2-N97-D256-causal: GQA 2:1, one key block
    ((1, 2, 1, 65, 200, 256, 256), (-1, -1)),  # Nq != Nk, two key blocks (the second ragged)
    ((1, 2, 1, 130, 130, 256, 256), (40, 0)),  # window over two key blocks
    ((1, 4, 2, 97, 160, 128, 128), (-1, 0)),
]


@pytest.mark.parametrize("shape,window", SM90_CASES, ids=[_case_id(*s, w, "-sm90") for s, w in SM90_CASES])
def test_sm90_tiles_match_reference(shape, window, monkeypatch):
    monkeypatch.setattr(A, "config_arch", lambda device: 90)
    d = shape[5]
    assert A.block_config("dkdv", d, d, torch.float16, arch=90).split_dkdv == (d == 256)
    run_case(shape, window, torch.float16)


SPLIT_DKDV_CASES = [
    ((1, 4, 2, 97, 97, 64, 64), (-1, 0), False),  # B1-Hq4-Hk2-N97-D64-causal: GQA
    ((2, 2, 1, 65, 130, 40, 24), (17, 17), False),  # Nq != Nk, Dv != D, window
    ((1, 2, 2, 97, 97, 32, 32), (-1, -1), True),  # key padding
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("shape,window,kpm", SPLIT_DKDV_CASES,
                         ids=[_case_id(*s, w, "-kpm" if p else "") for s, w, p in SPLIT_DKDV_CASES])
def test_split_dkdv_equals_one_program(shape, window, kpm, dtype, monkeypatch):
    """dK and dV as two launches (WITH_DK / WITH_DV) give the bits of the one-program dK/dV:
    the same dots in the same order, each gradient's once."""
    b, hq, hk, nq, nk, d, dv = shape
    gen = torch.Generator().manual_seed(5)
    q, k, v, dout = (torch.randn(b, h, n, e, generator=gen).to(dtype)
                     for h, n, e in ((hq, nq, d), (hk, nk, d), (hk, nk, dv), (hq, nq, dv)))
    pad = torch.arange(nk).expand(b, nk) >= nk - 20 if kpm else None
    scale = 1.0 / math.sqrt(d)
    out, lse = attention_forward(q, k, v, scale, *window, key_padding_mask=pad)
    one = attention_backward(dout, q, k, v, out, lse, scale, *window, key_padding_mask=pad)
    plain = A.block_config

    def split(kernel, *args, **kwargs):
        cfg = plain(kernel, *args, **kwargs)
        return cfg._replace(split_dkdv=True) if kernel == "dkdv" else cfg

    monkeypatch.setattr(A, "block_config", split)
    two = attention_backward(dout, q, k, v, out, lse, scale, *window, key_padding_mask=pad)
    for name, a, c in zip(("dq", "dk", "dv"), one, two):
        assert torch.equal(a, c), name
    run_case(shape, window, dtype, key_padding_mask=pad)  # the split launches against the reference


def test_non_contiguous_inputs():
    run_case((2, 4, 2, 33, 47, 32, 32), (-1, 0), torch.float32, transpose=True)


def test_fully_masked_rows_zero_and_finite():
    # Nq > Nk, causal: rows 0..Nq-Nk-1 see nothing
    q, k, v = torch.randn(1, 2, 40, 16), torch.randn(1, 2, 20, 16), torch.randn(1, 2, 20, 16)
    out, lse = attention_forward(q, k, v, 0.25, -1, 0)
    assert torch.equal(out[:, :, :20], torch.zeros_like(out[:, :, :20]))
    assert torch.isneginf(lse[:, :, :20]).all() and torch.isfinite(lse[:, :, 20:]).all()
    dq, dk, dv = attention_backward(torch.randn_like(out), q, k, v, out, lse, 0.25, -1, 0)
    assert all(torch.isfinite(g).all() for g in (dq, dk, dv))
    assert torch.equal(dq[:, :, :20], torch.zeros_like(dq[:, :, :20]))


# ----------------------------------------------------------------------------------------
# loop bounds: Python mirror == brute force == what the kernels compute
# ----------------------------------------------------------------------------------------

BOUND_CASES = [
    # (block_m, block_n, Nq, Nk, left, right)
    (16, 32, 97, 300, -1, 0),
    (32, 16, 300, 97, -1, 0),
    (16, 16, 97, 97, 17, 17),
    (64, 32, 300, 300, 0, 0),
    (16, 32, 300, 300, 0, 128),
    (32, 16, 97, 300, -1, 32),
    (16, 16, 300, 97, 32, -1),
    (128, 64, 17, 1, -1, -1),
    (16, 16, 1, 300, 5, 0),
]


def _brute_force(block_m, block_n, nq, nk, left, right):
    vis = window_visibility(nq, nk, (left, right))
    n_qb, n_kb = -(-nq // block_m), -(-nk // block_n)
    tiles = torch.zeros(n_qb, n_kb, 2, dtype=torch.bool)  # (any visible, all visible)
    for i in range(n_qb):
        for j in range(n_kb):
            t = vis[i * block_m:(i + 1) * block_m, j * block_n:(j + 1) * block_n]
            tiles[i, j, 0] = t.any()
            # all visible, over valid rows, with a whole key block in range
            tiles[i, j, 1] = t.all() and (j + 1) * block_n <= nk
    return tiles


@pytest.mark.parametrize("case", BOUND_CASES, ids=lambda c: "M{}-N{}-Nq{}-Nk{}-L{}-R{}".format(*c))
def test_block_ranges(case):
    block_m, block_n, nq, nk, left, right = case
    tiles = _brute_force(*case)
    kv = [BR.kv_block_range(i, *case) for i in range(tiles.shape[0])]
    qr = [BR.q_block_range(j, *case) for j in range(tiles.shape[1])]
    for i, r in enumerate(kv):  # forward / dQ: key blocks of query block i
        visited = set(range(r.start, r.end))
        assert visited == set(torch.nonzero(tiles[i, :, 0]).flatten().tolist()), (i, r)
        full = set(range(r.full_start, r.full_end))
        # unmasked blocks are fully visible, and every fully visible block skips the mask
        assert full == set(torch.nonzero(tiles[i, :, 1]).flatten().tolist()), (i, r)
    for j, r in enumerate(qr):  # dK/dV: query blocks of key block j
        assert set(range(r.start, r.end)) == set(torch.nonzero(tiles[:, j, 0]).flatten().tolist()), (j, r)
        # dK/dV needs no key-range mask (rows >= Nk are never stored): full = window-full
        vis = window_visibility(nq, nk, (left, right))[:, j * block_n:(j + 1) * block_n]
        full = {i for i in range(tiles.shape[0]) if vis[i * block_m:(i + 1) * block_m].all()}
        assert set(range(r.full_start, r.full_end)) == full, (j, r)
    # the jitted helpers the kernels call give the same numbers
    assert BR.kernel_block_ranges("kv", *case) == kv
    assert BR.kernel_block_ranges("q", *case) == qr


def test_band_visits_few_blocks():
    # a (17, 17) window at N = 4096 with 64-wide blocks touches at most 3 key blocks per query block
    counts = [BR.kv_block_range(i, 64, 64, 4096, 4096, 17, 17).count for i in range(64)]
    assert max(counts) <= 3 and min(counts) >= 1


def test_configs_are_gpu_sized():
    for arch in A.ARCHS:
        for d in (32, 64, 128, 256):
            for dtype in (torch.float16, torch.bfloat16, torch.float32):
                for kernel in ("fwd", "dkdv", "dq"):
                    for sparse in (0, 128):
                        for prec in ("ieee", "tf32"):
                            cfg = A.block_config(kernel, d, d, dtype, sparse, arch, prec=prec)
                            assert cfg.block_m >= 16 and cfg.block_n >= 16
                            assert cfg.block_m & (cfg.block_m - 1) == 0 and cfg.block_n & (cfg.block_n - 1) == 0
                    for prec in ("ieee", "tf32"):
                        small = A.block_config(kernel, d, d, dtype, sparse_block_size=16, arch=arch, prec=prec)
                        assert small.block_m == 16 and small.block_n == 16
    assert A.config_arch(torch.device("cpu")) == 80  # the interpreter launches the sm_80 tiles


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_sm90_dkdv_tiles_are_wgmma_sized(dtype):
    """sm_90a dK/dV: 128 resident keys on 8 warps (a wgmma needs >= 64 rows per warpgroup),
    >= 32 streamed queries at D = 128 and >= 64 at D = 64 (the gate checks wgmma, no spill)."""
    for d, min_m in ((128, 32), (64, 64)):
        cfg = A.block_config("dkdv", d, d, dtype, arch=90)
        assert cfg.block_n >= 128 and cfg.block_m >= min_m and cfg.num_warps == 8, (d, cfg)
        assert not cfg.split_dkdv
    # D = 256: dK and dV as two launches of 128 keys, and a dQ of 64 rows per warpgroup
    cfg = A.block_config("dkdv", 256, 256, dtype, arch=90)
    assert cfg.split_dkdv and cfg.block_n >= 128 and cfg.num_warps == 8, cfg
    cfg = A.block_config("dq", 256, 256, dtype, arch=90)
    assert cfg.block_m // (cfg.num_warps // 4) >= 64, cfg
    assert A.dkdv_passes(cfg) == ((True, True),) and len(A.dkdv_passes(A.block_config("dkdv", 256, 256, dtype, arch=90))) == 2


# ----------------------------------------------------------------------------------------
# phase 2: block-sparse tables, key padding mask
# ----------------------------------------------------------------------------------------


def _random_layout(bm, hm, nq, nk, block, density, seed, empty_rows=()):
    """A TableMask with each (Bm, Hm) row drawn independently at `density`; `empty_rows`
    query-block rows list no key block at all (their queries see nothing)."""
    gen = torch.Generator().manual_seed(seed)
    layout = torch.rand(bm, hm, -(-nq // block), -(-nk // block), generator=gen) < density  # (Bm, Hm, nQb, nKb)
    for row in empty_rows:
        layout[..., row, :] = False
    return TableMask(layout, block)


# (B, Hq, Hk, Nq, Nk, D, Dv), (left, right), (Bm, Hm, block, density, empty query-block rows), tiles
SPARSE_CASES = [
    # per-(batch, head) tables, GQA 2:1, kernel tile == sparse block
    ((2, 4, 2, 65, 65, 32, 32), (-1, -1), (2, 4, 16, 0.3, ()), None),
    # broadcast Bm = Hm = 1, 5% density (most query blocks see nothing), Nq != Nk, causal
    ((2, 2, 1, 80, 97, 16, 16), (-1, 0), (1, 1, 16, 0.05, ()), None),
    # Bm = B, Hm = 1; explicit empty rows; Dv != D
    ((2, 2, 2, 70, 50, 40, 24), (-1, -1), (2, 1, 16, 0.5, (0, 3)), None),
    # Bm = 1, Hm = Hq with a window: the table is cut to the band; Nq > Nk
    ((1, 2, 1, 97, 70, 64, 64), (20, 5), (1, 2, 32, 0.5, ()), None),
    # kernel tiles smaller than the sparse block: each listed block spans several tiles
    ((1, 2, 1, 150, 150, 32, 32), (-1, -1), (1, 2, 64, 0.4, ()), (16, 32)),
    ((1, 1, 1, 200, 140, 16, 16), (-1, 0), (1, 1, 128, 0.5, ()), (32, 16)),
]


def _sparse_id(shape, window, lay, tiles):
    bm, hm, block, density, empty = lay
    extra = f"-S{block}-Bm{bm}Hm{hm}-{round(density * 100)}pct" + ("-emptyrows" if empty else "")
    extra += f"-M{tiles[0]}N{tiles[1]}" if tiles else ""
    return _case_id(*shape, window, extra)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("shape,window,lay,tiles", SPARSE_CASES, ids=[_sparse_id(*c) for c in SPARSE_CASES])
def test_sparse_matches_reference(shape, window, lay, tiles, dtype):
    b, hq, hk, nq, nk, d, dv = shape
    bm, hm, block, density, empty = lay
    mask = _random_layout(bm, hm, nq, nk, block, density, seed=nq * nk + hq, empty_rows=empty)
    with A.override_blocks(*tiles) if tiles else contextlib.nullcontext():
        run_case(shape, window, dtype, block_mask=mask)


def test_sparse_full_layout_equals_dense():
    """Every block listed: the sparse path walks the same tiles in the same order as the dense
    path, so out, lse and the gradients agree bit for bit (same tiles forced for both)."""
    q, k, v = torch.randn(1, 1, 70, 16), torch.randn(1, 1, 50, 16), torch.randn(1, 1, 50, 16)
    full = TableMask(torch.ones(1, 1, 3, 2, dtype=torch.bool), 32)  # ceil(70/32) x ceil(50/32)
    sparse_kw = _sparse_kwargs(full)
    for window in ((-1, -1), (10, 3)):
        with A.override_blocks(16, 16):
            out, lse = attention_forward(q, k, v, 0.2, *window)
            out_s, lse_s = attention_forward(q, k, v, 0.2, *window, **sparse_kw)
            assert torch.equal(out, out_s) and torch.equal(lse, lse_s), window
            dout = torch.randn_like(out)
            grads = attention_backward(dout, q, k, v, out, lse, 0.2, *window)
            grads_s = attention_backward(dout, q, k, v, out, lse, 0.2, *window, q_num_blocks=full.q_num_blocks,
                                           q_indices=full.q_indices, **sparse_kw)
            for name, g, g_s in zip(("dq", "dk", "dv"), grads, grads_s):
                assert torch.equal(g, g_s), (window, name)


def test_sparse_empty_layout_rows_zero_and_finite():
    """Query blocks that list nothing: out 0, lse -inf; key blocks nobody lists: dk = dv = 0."""
    layout = torch.zeros(1, 1, 3, 3, dtype=torch.bool)
    layout[0, 0, 1, 2] = True  # only query block 1 sees anything (key block 2)
    mask = TableMask(layout, 16)
    q, k, v = torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16)
    out, lse = attention_forward(q, k, v, 0.25, -1, -1, **_sparse_kwargs(mask))
    rows = torch.ones(40, dtype=torch.bool)
    rows[16:32] = False  # the rows of query block 1
    assert torch.equal(out[:, :, rows], torch.zeros_like(out[:, :, rows]))
    assert torch.isneginf(lse[:, :, rows]).all() and torch.isfinite(lse[:, :, ~rows]).all()
    dq, dk, dv = attention_backward(torch.randn_like(out), q, k, v, out, lse, 0.25, -1, -1,
                                      q_num_blocks=mask.q_num_blocks, q_indices=mask.q_indices, **_sparse_kwargs(mask))
    assert all(torch.isfinite(g).all() for g in (dq, dk, dv))
    assert torch.equal(dq[:, :, rows], torch.zeros_like(dq[:, :, rows]))
    assert torch.equal(dk[:, :, :32], torch.zeros_like(dk[:, :, :32]))
    assert torch.equal(dv[:, :, :32], torch.zeros_like(dv[:, :, :32]))


# (B, Hq, Hk, N, D), block, causal, tiles: BigBird with N not a multiple of the block
BIGBIRD_CASES = [
    ((1, 4, 2, 81, 16), 16, False, None),
    ((1, 2, 1, 97, 16), 16, True, None),
    ((1, 2, 2, 150, 32), 64, True, (16, 16)),
]


def _bigbird_id(case):
    (b, hq, hk, n, d), block, is_causal, tiles = case
    return (f"B{b}-Hq{hq}-Hk{hk}-N{n}-D{d}-S{block}-bigbird" + ("-causal" if is_causal else "")
            + (f"-M{tiles[0]}N{tiles[1]}" if tiles else ""))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("case", BIGBIRD_CASES, ids=_bigbird_id)
def test_bigbird_matches_reference(case, dtype):
    (b, hq, hk, n, d), block, is_causal, tiles = case
    mask = masks.bigbird(n, block_size=block, num_global_blocks=1, num_window_blocks=3, num_random_blocks=1,
                         num_heads=hq, seed=n + hq, causal=is_causal)
    # the mask's causal flag reaches the kernels as window_right = 0 (api.py does the same)
    window = (-1, 0) if is_causal else (-1, -1)
    with A.override_blocks(*tiles) if tiles else contextlib.nullcontext():
        run_case((b, hq, hk, n, n, d, d), window, dtype, block_mask=mask)


def _padding(b, nk, seed, fully_padded=(1,)):
    """Bool (B, Nk), True = ignore: ~30% random keys, and whole batch rows padded."""
    kpm = torch.rand(b, nk, generator=torch.Generator().manual_seed(seed)) < 0.3
    kpm[:, -5:] = True  # a padded tail, as variable-length batches have
    for row in fully_padded:
        kpm[row] = True  # every query of this batch row sees nothing
    return kpm


# (B, Hq, Hk, Nq, Nk, D, Dv), (left, right), sparse (Bm, Hm, block, density) or None, tiles
KPM_CASES = [
    ((2, 2, 1, 37, 80, 32, 32), (-1, -1), None, None),
    ((3, 1, 1, 97, 60, 16, 16), (-1, 0), None, (16, 16)),  # causal, Nq > Nk, many blocks
    ((2, 4, 2, 50, 50, 16, 16), (7, 3), None, (16, 16)),  # window, GQA
    ((2, 2, 1, 70, 90, 32, 32), (-1, 0), (1, 2, 16, 0.4), None),  # + sparse tables, causal
]


def _kpm_id(case):
    shape, window, lay, tiles = case
    extra = "-kpm" + (f"-S{lay[2]}-{round(lay[3] * 100)}pct" if lay else "") + (f"-M{tiles[0]}N{tiles[1]}" if tiles else "")
    return _case_id(*shape, window, extra)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("case", KPM_CASES, ids=_kpm_id)
def test_key_padding_matches_reference(case, dtype):
    shape, window, lay, tiles = case
    b, hq, hk, nq, nk, d, dv = shape
    mask = _random_layout(lay[0], lay[1], nq, nk, lay[2], lay[3], seed=nq + nk) if lay else None
    kpm = _padding(b, nk, seed=nq * nk)
    with A.override_blocks(*tiles) if tiles else contextlib.nullcontext():
        run_case(shape, window, dtype, block_mask=mask, key_padding_mask=kpm)


def test_key_padding_fully_padded_batch_row():
    """A batch row whose keys are all padded: out 0, lse -inf, zero and finite gradients;
    padded keys get dk = dv = 0 in every batch row."""
    q, k, v = torch.randn(2, 2, 33, 16), torch.randn(2, 1, 40, 16), torch.randn(2, 1, 40, 16)
    kpm = torch.zeros(2, 40, dtype=torch.bool)
    kpm[0, 30:] = True
    kpm[1] = True
    out, lse = attention_forward(q, k, v, 0.25, -1, 0, key_padding_mask=kpm)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.isneginf(lse[1]).all()
    assert torch.isfinite(lse[0]).all()
    dq, dk, dv = attention_backward(torch.randn_like(out), q, k, v, out, lse, 0.25, -1, 0, key_padding_mask=kpm)
    assert all(torch.isfinite(g).all() for g in (dq, dk, dv))
    for g in (dq[1], dk[1], dv[1], dk[0, :, 30:], dv[0, :, 30:]):
        assert torch.equal(g, torch.zeros_like(g))


def test_bad_tables_and_padding_raise():
    q = torch.randn(1, 2, 40, 16)
    num, idx = torch.ones(1, 1, 3, dtype=torch.int32), torch.zeros(1, 1, 3, 3, dtype=torch.int32)
    with pytest.raises(ValueError, match="kv_num_blocks and kv_indices"):
        attention_forward(q, q, q, 0.25, -1, -1, kv_num_blocks=num, sparse_block_size=16)
    with pytest.raises(ValueError, match="int32"):
        attention_forward(q, q, q, 0.25, -1, -1, kv_num_blocks=num.long(), kv_indices=idx, sparse_block_size=16)
    with pytest.raises(ValueError, match="expected shape"):  # 40 / 32 -> 2 query blocks, not 3
        attention_forward(q, q, q, 0.25, -1, -1, kv_num_blocks=num, kv_indices=idx, sparse_block_size=32)
    with pytest.raises(ValueError, match="leading dims"):
        attention_forward(q, q, q, 0.25, -1, -1, kv_num_blocks=num.expand(1, 3, 3), kv_indices=idx.expand(1, 3, 3, 3),
                            sparse_block_size=16)
    with pytest.raises(ValueError, match="power of two"):
        attention_forward(q, q, q, 0.25, -1, -1, kv_num_blocks=num, kv_indices=idx, sparse_block_size=24)
    with pytest.raises(ValueError, match="key_padding_mask"):
        attention_forward(q, q, q, 0.25, -1, -1, key_padding_mask=torch.zeros(1, 39, dtype=torch.bool))


# ----------------------------------------------------------------------------------------
# through the public API: attnkernels.backend("triton") on CPU tensors (interpreter)
# ----------------------------------------------------------------------------------------


def _api_check(run, ref_kw, q, k, v):
    """run(q, k, v) -> out through the public API; compares out and the input grads with the
    float64 reference, under the same tolerance rule (fp32 inputs)."""
    qkv = [t.clone().requires_grad_() for t in (q, k, v)]
    dout = torch.randn(q.shape[0], q.shape[1], q.shape[2], v.shape[-1])
    with attnkernels.backend("triton"):  # the backward reads the backend too: run it inside
        out = run(*qkv)
        grads = torch.autograd.grad(out, qkv, dout)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    out64, _ = attention_reference(q64, k64, v64, **ref_kw)
    g64 = torch.autograd.grad(out64, (q64, k64, v64), dout.double())
    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    out_s, _ = attention_reference(qs, ks, vs, upcast=False, **ref_kw)
    gs = torch.autograd.grad(out_s, (qs, ks, vs), dout)
    _check("out", out, out64, out_s, FLOOR[torch.float32])
    for name, g, e, base in zip(("dq", "dk", "dv"), grads, g64, gs):
        _check(name, g, e, base, FLOOR[torch.float32])


def test_api_sparse_attention_bigbird_causal():
    # B1-Hq4-Hk2-N97-D16, BigBird block 16, per-head random blocks, causal
    q, k, v = torch.randn(1, 4, 97, 16), torch.randn(1, 2, 97, 16), torch.randn(1, 2, 97, 16)
    mask = masks.bigbird(97, block_size=16, num_random_blocks=1, num_heads=4, seed=3, causal=True)
    _api_check(lambda q, k, v: attnkernels.sparse_attention(q, k, v, mask), dict(block_mask=mask), q, k, v)


def test_api_attention_key_padding_window():
    # B2-Hq2-Hk1-Nq33-Nk47-D16, window (9, 2), batch row 1 fully padded
    q, k, v = torch.randn(2, 2, 33, 16), torch.randn(2, 1, 47, 16), torch.randn(2, 1, 47, 16)
    kpm = _padding(2, 47, seed=5)
    _api_check(lambda q, k, v: attnkernels.attention(q, k, v, window_size=(9, 2), key_padding_mask=kpm),
               dict(window_size=(9, 2), key_padding_mask=kpm), q, k, v)
