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

import math

import pytest
import torch

from attnkernels.kernels import attention as A
from attnkernels.reference import attention_reference, window_visibility

FLOOR = {torch.float32: 1e-5, torch.float16: 2e-3}
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16"}


@pytest.fixture(autouse=True)
def _poison_empty(monkeypatch):
    """Uninitialised float outputs are NaN, so an element the kernels never write fails loudly."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    def empty_like(*args, **kwargs):
        t = real_empty_like(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch, "empty_like", empty_like)


# ----------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------


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

    def kwargs(self) -> dict:
        return dict(kv_num_blocks=self.kv_num_blocks, kv_indices=self.kv_indices, sparse_block_size=self.block_size)


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
    sparse_kw = block_mask.kwargs() if block_mask is not None else {}

    out, lse = A.attention_forward(q, k, v, scale, *window, key_padding_mask=key_padding_mask, **sparse_kw)
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
    dq, dk, dv_ = A.attention_backward(dout, q, k, v, out, lse, scale, *window,
                                       key_padding_mask=key_padding_mask, **sparse_kw)
    for name, got, g64, gs in (("dq", dq, q64.grad, qs.grad), ("dk", dk, k64.grad, ks.grad), ("dv", dv_, v64.grad, vs.grad)):
        assert got.dtype == dtype and got.shape == g64.shape, name
        _check(name, got, g64, gs, floor)


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


def test_non_contiguous_inputs():
    run_case((2, 4, 2, 33, 47, 32, 32), (-1, 0), torch.float32, transpose=True)


def test_fully_masked_rows_zero_and_finite():
    # Nq > Nk, causal: rows 0..Nq-Nk-1 see nothing
    q, k, v = torch.randn(1, 2, 40, 16), torch.randn(1, 2, 20, 16), torch.randn(1, 2, 20, 16)
    out, lse = A.attention_forward(q, k, v, 0.25, -1, 0)
    assert torch.equal(out[:, :, :20], torch.zeros_like(out[:, :, :20]))
    assert torch.isneginf(lse[:, :, :20]).all() and torch.isfinite(lse[:, :, 20:]).all()
    dq, dk, dv = A.attention_backward(torch.randn_like(out), q, k, v, out, lse, 0.25, -1, 0)
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
    kv = [A.kv_block_range(i, *case) for i in range(tiles.shape[0])]
    qr = [A.q_block_range(j, *case) for j in range(tiles.shape[1])]
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
    assert A.kernel_block_ranges("kv", *case) == kv
    assert A.kernel_block_ranges("q", *case) == qr


def test_band_visits_few_blocks():
    # a (17, 17) window at N = 4096 with 64-wide blocks touches at most 3 key blocks per query block
    counts = [A.kv_block_range(i, 64, 64, 4096, 4096, 17, 17).count for i in range(64)]
    assert max(counts) <= 3 and min(counts) >= 1


def test_configs_are_gpu_sized():
    for d in (32, 64, 128, 256):
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            for kernel in ("fwd", "dkdv", "dq"):
                cfg = A.block_config(kernel, d, d, dtype)
                assert cfg.block_m >= 16 and cfg.block_n >= 16
                assert cfg.block_m & (cfg.block_m - 1) == 0 and cfg.block_n & (cfg.block_n - 1) == 0
                small = A.block_config(kernel, d, d, dtype, sparse_block_size=16)
                assert small.block_m == 16 and small.block_n == 16


def test_unimplemented_features_raise():
    q = torch.randn(1, 1, 16, 16)
    with pytest.raises(NotImplementedError, match="key_padding_mask"):
        A.attention_forward(q, q, q, 0.25, -1, -1, key_padding_mask=torch.zeros(1, 16, dtype=torch.bool))
    with pytest.raises(NotImplementedError, match="kv_num_blocks"):
        A.attention_forward(q, q, q, 0.25, -1, -1, kv_num_blocks=torch.ones(1, 1, 1, dtype=torch.int32),
                            kv_indices=torch.zeros(1, 1, 1, 1, dtype=torch.int32), sparse_block_size=16)
