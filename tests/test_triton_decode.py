"""The Triton split-K decode kernels (`triton_launch.decode_forward`: attn_decode and
attn_decode_combine) under TRITON_INTERPRET=1 on CPU tensors, against the float64 reference
(reference.py) run per batch row over its filled prefix k_cache[b, :, :L_b].

Caches are contiguous, strided views (FlashAttention's (B, Nc, Hk, D) layout transposed) or
paged with shuffled pages; lengths include 0, 1 and values that are not multiples of the
key tile or the page. The split count is forced (`override_decode`) so that the combine
kernel runs, including splits that get no tile; one split writes the rows directly.
Tolerance: FlashAttention's rule (tests/tolerance.py) against the same computation in the
input dtype. fp32 and fp16 (bf16 `tl.dot` is wrong under the interpreter: bf16 is the
compile gate's, see DESIGN.md).
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from attnkernels.softmax import triton_launch as A
from attnkernels.softmax.reference import attention_reference
from tests.tolerance import assert_within_rule

# Outputs the kernels allocate (out, lse, the split workspaces) are NaN until written.
pytestmark = pytest.mark.usefixtures("poison_empty")


@dataclasses.dataclass(frozen=True)
class Case:
    b: int
    hq: int
    hk: int
    nq: int
    lens: tuple  # L_b per batch row
    nc: int  # cache capacity (Nc, or max_pages * page)
    d: int
    dv: int | None = None
    page: int = 0  # 0: contiguous (B, Hk, Nc, D)
    layout: str = "bhnd"  # "bnhd": a transposed view of FlashAttention's (B, Nc, Hk, D) / (pages, page, Hk, D)
    causal: bool = False
    window: tuple = (-1, -1)
    softcap: float = 0.0
    alibi: str | None = None  # "h": (Hq,), "bh": (B, Hq)
    dtype: torch.dtype = torch.float32
    block_n: int | None = 16
    splits: int | None = 3  # None: the launcher's own choice

    @property
    def id(self) -> str:
        lens = "_".join(map(str, self.lens))
        parts = [f"B{self.b}-H{self.hq}-Hk{self.hk}-N{self.nq}-L{lens}-Nc{self.nc}-D{self.d}"]
        if self.dv:
            parts.append(f"Dv{self.dv}")
        parts.append(f"page{self.page}" if self.page else "contig")
        if self.layout != "bhnd":
            parts.append(self.layout)
        left, right = self.window
        parts.append("causal" if self.causal else f"win{left}_{right}" if self.window != (-1, -1) else "dense")
        if self.softcap:
            parts.append("softcap")
        if self.alibi:
            parts.append(f"alibi_{self.alibi}")
        parts.append({torch.float32: "fp32", torch.float16: "fp16"}[self.dtype])
        parts.append(f"N{self.block_n}" if self.block_n else "Nauto")
        parts.append(f"S{self.splits}" if self.splits else "Sauto")
        return "-".join(parts)


CASES = [
    # GQA 8/2, one query, lengths 0 (no key: out 0, lse -inf, every split empty), 1, 37
    Case(3, 8, 2, 1, (0, 1, 37), 48, 32, causal=True),
    # three queries: with L = 1 only the last sees a key; shuffled pages of 16, L not multiples of 16
    Case(3, 8, 2, 3, (1, 47, 64), 64, 32, page=16, causal=True),
    # group 1, no mask, one split (rows written by attn_decode itself)
    Case(2, 2, 2, 3, (20, 33), 40, 16, splits=1),
    Case(2, 2, 2, 3, (20, 33), 48, 16, page=16, splits=1, causal=True),
    # sliding window (left only, and two-sided with right > 0: later queries see appended keys)
    Case(2, 8, 2, 3, (50, 9), 64, 32, page=16, window=(8, 0), splits=4),
    # the group's first visible key (L - Nq - left = 31) is the last of a 16-key tile
    Case(2, 8, 2, 3, (50, 9), 64, 32, window=(16, 0), splits=2),
    Case(2, 4, 2, 3, (45, 30), 48, 32, window=(5, 2), alibi="bh"),
    # softcap and ALiBi together (the library's order: cap, then the slope)
    Case(2, 8, 2, 3, (41, 17), 48, 32, causal=True, softcap=2.0, alibi="h"),
    Case(2, 4, 4, 1, (33, 64), 64, 64, page=32, softcap=1.5, alibi="bh", splits=5),
    # Dv != D, more splits than tiles for the short row (empty splits in the combine)
    Case(2, 4, 2, 1, (70, 3), 80, 32, dv=16, causal=True, splits=6),
    # Nq = 16 with group 4: 64 rows, four 16-row blocks on fp32
    Case(1, 8, 2, 16, (40,), 48, 16, causal=True, splits=2),
    # strided caches: FlashAttention's layouts, transposed views (no copy)
    Case(2, 8, 2, 3, (29, 48), 48, 32, layout="bnhd", causal=True),
    Case(2, 8, 2, 3, (29, 48), 64, 32, page=16, layout="bnhd", causal=True),
    # the launcher's own tiles and split count
    Case(2, 4, 1, 1, (200, 77), 256, 32, causal=True, block_n=None, splits=None),
    # fp16
    Case(3, 8, 2, 3, (0, 23, 64), 64, 32, page=16, causal=True, dtype=torch.float16),
    Case(2, 8, 2, 1, (40, 7), 48, 64, causal=True, softcap=2.0, alibi="h", dtype=torch.float16),
    Case(2, 4, 2, 3, (48, 31), 48, 32, window=(6, 1), dtype=torch.float16, splits=1),
]


def _paged(cache: torch.Tensor, page: int, gen: torch.Generator, layout: str):
    """(pages (num_pages, Hk, page, D), block_table (B, max_pages) int32) holding `cache`'s
    (B, Hk, Nc, D) rows, the pages in a shuffled order with two unused ones."""
    b, hk, nc, d = cache.shape
    max_pages = nc // page
    num_pages = b * max_pages + 2
    perm = torch.randperm(num_pages, generator=gen)[: b * max_pages]
    pages = torch.randn(num_pages, page, hk, d, generator=gen).to(cache.dtype)  # unused pages: noise
    blocks = cache.reshape(b, hk, max_pages, page, d).permute(0, 2, 3, 1, 4).reshape(b * max_pages, page, hk, d)
    pages[perm] = blocks
    table = perm.reshape(b, max_pages).to(torch.int32)
    pages = pages.transpose(1, 2)  # (num_pages, Hk, page, D): a strided view in the "bnhd" layout
    return (pages if layout == "bnhd" else pages.contiguous()), table


def _inputs(case: Case):
    gen = torch.Generator().manual_seed(sum(case.lens) * 31 + case.nq * 7 + case.hq)
    dv = case.dv or case.d
    q = torch.randn(case.b, case.hq, case.nq, case.d, generator=gen).to(case.dtype)
    # filled with noise past each row's length: the kernel must never read it
    k = torch.randn(case.b, case.nc, case.hk, case.d, generator=gen).to(case.dtype).transpose(1, 2)
    v = torch.randn(case.b, case.nc, case.hk, dv, generator=gen).to(case.dtype).transpose(1, 2)
    if case.layout == "bhnd":
        k, v = k.contiguous(), v.contiguous()
    lens = torch.tensor(case.lens, dtype=torch.int32)
    slopes = None
    if case.alibi:
        slopes = torch.rand(case.hq if case.alibi == "h" else (case.b, case.hq), generator=gen) * 0.5
    return q, k, v, lens, slopes


def _window(case: Case) -> tuple[int, int]:
    left, right = case.window
    return (left, 0 if right == -1 else min(right, 0)) if case.causal else (left, right)


def _run(case: Case, q, k, v, lens, slopes):
    scale = 1.0 / math.sqrt(case.d)
    left, right = _window(case)
    table = None
    k_in, v_in = k, v
    if case.page:
        gen = torch.Generator().manual_seed(case.nc)
        k_in, table = _paged(k, case.page, gen, case.layout)
        v_in, table_v = _paged(v, case.page, torch.Generator().manual_seed(case.nc), case.layout)
        assert torch.equal(table, table_v)
    with A.override_decode(case.block_n, case.splits):
        return A.decode_forward(q, k_in, v_in, lens, table, scale=scale, window_left=left, window_right=right,
                                softcap=case.softcap, alibi_slopes=slopes)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_decode_matches_reference(case: Case):
    q, k, v, lens, slopes = _inputs(case)
    out, lse = _run(case, q, k, v, lens, slopes)
    dv = case.dv or case.d
    assert out.shape == (case.b, case.hq, case.nq, dv) and out.dtype == case.dtype
    assert lse.shape == (case.b, case.hq, case.nq) and lse.dtype == torch.float32
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    scale = 1.0 / math.sqrt(case.d)
    left, right = _window(case)
    for b, n in enumerate(case.lens):
        if n == 0:  # no key at all: out 0, lse -inf
            assert torch.equal(out[b], torch.zeros_like(out[b])), f"row {b}: out of an empty cache"
            assert torch.isneginf(lse[b]).all(), f"row {b}: lse of an empty cache"
            continue
        kw = dict(window_size=(left, right), scale=scale, softcap=case.softcap)
        if slopes is not None:
            kw["alibi_slopes"] = slopes.double().expand(case.b, case.hq)[b:b + 1]
        qb, kb, vb = q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n]
        out64, lse64 = attention_reference(qb, kb, vb, **kw)
        if slopes is not None:
            kw["alibi_slopes"] = kw["alibi_slopes"].to(case.dtype)
        out_s, lse_s = attention_reference(qb, kb, vb, upcast=False, **kw)
        assert_within_rule(f"out[{b}]", out[b:b + 1], out64, out_s, case.dtype)
        assert_within_rule(f"lse[{b}]", lse[b:b + 1], lse64, lse_s.float(), case.dtype)


def test_split_count_does_not_change_the_result_beyond_rounding():
    """1, 2 and 7 splits of the same call agree to float32 rounding (the combine is exact
    algebra on the partial states), and one call is bit-for-bit repeatable."""
    case = Case(2, 8, 2, 3, (61, 38), 64, 32, page=16, causal=True)
    q, k, v, lens, slopes = _inputs(case)
    outs = [_run(dataclasses.replace(case, splits=s), q, k, v, lens, slopes) for s in (1, 2, 7, 7)]
    for out, lse in outs[1:]:
        torch.testing.assert_close(out, outs[0][0], rtol=0, atol=1e-5)
        torch.testing.assert_close(lse, outs[0][1], rtol=0, atol=1e-5)
    assert torch.equal(outs[2][0], outs[3][0]) and torch.equal(outs[2][1], outs[3][1])


def test_lengths_past_the_capacity_are_clamped():
    """A cache_seqlens entry beyond the cache (not checked on the host: that would sync) reads
    as the full cache, never past it: the same result as the capacity itself."""
    for page in (0, 16):
        case = Case(2, 4, 2, 1, (48, 48), 48, 16, page=page, causal=True, splits=2)
        q, k, v, lens, slopes = _inputs(case)
        full = _run(case, q, k, v, lens, slopes)
        over = _run(case, q, k, v, lens + torch.tensor([5, 1000], dtype=torch.int32), slopes)
        assert torch.equal(full[0], over[0]) and torch.equal(full[1], over[1])


def test_num_splits_from_the_shapes():
    # a grid that already fills two programs per SM: no split, no combine
    assert A.decode_num_splits(8 * 32, 1024, 132) == 1
    # the gpu_check decode step (B=8, Hk=8 on an H200, 64-key tiles): splits, each >= 4 tiles
    for tiles in (4096 // 64, 32768 // 64):
        s = A.decode_num_splits(8 * 8, tiles, 132)
        assert 1 < s <= A.DECODE_MAX_SPLITS and tiles // s >= 4
        assert (64 * s) % 264 == 0 or (64 * s) / 264 > 0.85  # a full (or nearly full) set of waves
    # a short cache: never more splits than runs of 4 tiles
    assert A.decode_num_splits(1, 8, 132) == 2
    assert A.decode_num_splits(1, 3, 132) == 1


def test_decode_config_pads_rows_for_the_mma():
    # 16-bit: the group's rows padded to 64 (4 warps, one warpgroup) or 128 (8 warps)
    for arch in A.ARCHS:
        assert A.decode_config(128, 128, torch.bfloat16, 1, arch).block_m == 64
        assert A.decode_config(128, 128, torch.bfloat16, 4, arch).num_warps == 4
        cfg = A.decode_config(128, 128, torch.float16, 100, arch)
        assert (cfg.block_m, cfg.num_warps) == (128, 8)
        assert A.decode_config(256, 256, torch.bfloat16, 100, arch).block_m == 64  # D=256: at most 64 rows
        assert A.decode_config(64, 64, torch.float32, 64, arch).block_m == 16
    with pytest.raises(ValueError, match="arch"):
        A.decode_config(64, 64, torch.float16, 1, 75)


def _bad(**over):
    q = torch.randn(2, 4, 1, 16)
    k = torch.randn(2, 2, 32, 16)
    args = dict(q=q, k_cache=k, v_cache=k.clone(), cache_seqlens=torch.tensor([3, 32], dtype=torch.int32),
                block_table=None)
    args.update(over)
    return A.decode_forward(args.pop("q"), args.pop("k_cache"), args.pop("v_cache"), args.pop("cache_seqlens"),
                            args.pop("block_table"), scale=0.25, **args)


@pytest.mark.parametrize("over, match", [
    (dict(cache_seqlens=torch.tensor([3, 32])), "cache_seqlens: expected an int32"),
    (dict(cache_seqlens=torch.tensor([3], dtype=torch.int32)), r"cache_seqlens: expected an int32 tensor \(B,\)"),
    (dict(k_cache=torch.randn(2, 3, 32, 16), v_cache=torch.randn(2, 3, 32, 16)), "multiple of Hk"),
    (dict(k_cache=torch.randn(2, 2, 32, 8), v_cache=torch.randn(2, 2, 32, 8)), "k_cache, v_cache: shapes"),
    (dict(k_cache=torch.randn(5, 2, 24, 16), v_cache=torch.randn(5, 2, 24, 16),
          block_table=torch.zeros(2, 2, dtype=torch.int32)), "page_size a power of two"),
    (dict(k_cache=torch.randn(5, 2, 16, 16), v_cache=torch.randn(5, 2, 16, 16),
          block_table=torch.zeros(2, 2, dtype=torch.int64)), "block_table: expected an int32"),
    (dict(k_cache=torch.randn(3, 2, 32, 16), v_cache=torch.randn(3, 2, 32, 16)), "without a block_table"),
    (dict(v_cache=torch.randn(2, 2, 32, 16, dtype=torch.float16)), "q's dtype"),
    (dict(alibi_slopes=torch.rand(3)), r"alibi_slopes: expected a float tensor \(Hq,\)"),
    (dict(window_left=-2), "window_left: expected an int >= -1"),
    (dict(window_right=1.5), "window_right: expected an int >= -1"),
])
def test_bad_inputs_name_the_argument(over, match):
    with pytest.raises(ValueError, match=match):
        _bad(**over)
