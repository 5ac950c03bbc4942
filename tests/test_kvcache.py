"""attention_with_kvcache (softmax/kvcache.py) against the float64 reference, run per batch row over the row's prefix.

Each case keeps a *logical* cache (B, Hk, capacity, D) and stores it either as is (contiguous) or
as shuffled pages (num_pages, Hk, page_size, D) with a block table, plus spare pages that no row
uses. The expected result appends the new tokens to the logical cache and runs
`attention_reference` on row b's first cache_seqlens[b] + Nnew keys; the kernel never sees the
logical cache. Tolerances: FlashAttention's rule (tests/tolerance.py): error against the float64
reference <= 2 x the same-dtype computation's error (`upcast=False`) + FLOOR[dtype].
"""
from __future__ import annotations

import math

import pytest
import torch

import attnkernels
from attnkernels import flash_attn_interface as fa
from attnkernels.softmax import kvcache
from attnkernels.softmax.reference import attention_reference

from .backend_params import backend_unavailable
from .cpu_helpers import one_thread  # noqa: F401 (autouse fixture)
from .tolerance import assert_within_rule

_REASON = backend_unavailable("cpu", kvcache.FAMILY)
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"C++ kvcache kernel unavailable: {_REASON}")

DTYPE_IDS = {torch.float64: "fp64", torch.float32: "fp32", torch.bfloat16: "bf16"}
# mode -> attention_with_kvcache keywords (slopes are filled in per case)
MODES = {
    "dense": {},
    "causal": {"causal": True},
    "win8_0": {"window_size": (8, 0)},
    "win5_3": {"window_size": (5, 3)},
    "softcap": {"softcap": 2.5},
    "alibi-causal": {"causal": True, "alibi": True},
}


def make_cache(batch, kv_heads, capacity, dim, dtype, page_size, gen):
    """(logical (B, Hk, capacity, dim), stored, block_table or None): stored is the logical cache itself
    (page_size 0) or its pages in a shuffled order among 3 spare pages."""
    logical = torch.randn(batch, kv_heads, capacity, dim, generator=gen, dtype=torch.float64).to(dtype)
    if not page_size:
        return logical, logical.clone(), None
    per_row = capacity // page_size
    num_pages = batch * per_row + 3
    order = torch.randperm(num_pages, generator=gen)[: batch * per_row]
    stored = torch.randn(num_pages, kv_heads, page_size, dim, generator=gen, dtype=torch.float64).to(dtype)
    # page p of row b holds logical[b, :, p·ps : (p+1)·ps]
    stored[order] = logical.reshape(batch, kv_heads, per_row, page_size, dim).transpose(1, 2).flatten(0, 1)
    return logical, stored, order.reshape(batch, per_row).to(torch.int32)


def logical_of(stored, table, batch):
    """The logical (B, Hk, capacity, dim) cache a stored one holds."""
    if table is None:
        return stored
    pages = stored[table.long()]  # (B, per_row, Hk, ps, dim)
    return pages.transpose(1, 2).flatten(2, 3)


def expected(q, k_log, v_log, lengths, *, upcast, causal=False, window_size=None, softcap=0.0, slopes=None,
             scale=None):
    """Per batch row, attention_reference over the row's first lengths[b] keys (float64 when upcast, else in
    q's dtype): (out (B, Hq, Nq, Dv), lse (B, Hq, Nq))."""
    outs, lses = [], []
    dtype = torch.float64 if upcast else q.dtype
    for b, length in enumerate(lengths):
        if length == 0:
            outs.append(torch.zeros(q.shape[1], q.shape[2], v_log.shape[-1], dtype=dtype))
            lses.append(torch.full(q.shape[1:3], float("-inf"), dtype=dtype))
            continue
        out, lse = attention_reference(q[b : b + 1], k_log[b : b + 1, :, :length], v_log[b : b + 1, :, :length],
                                       causal=causal, window_size=window_size, softcap=softcap, scale=scale,
                                       alibi_slopes=None if slopes is None else slopes[b : b + 1], upcast=upcast)
        outs.append(out[0])
        lses.append(lse[0])
    return torch.stack(outs), torch.stack(lses)


def check(out, lse, q, k_log, v_log, lengths, **kw):
    ref_out, ref_lse = expected(q, k_log, v_log, lengths, upcast=True, **kw)
    assert out.shape == ref_out.shape and out.dtype == q.dtype
    assert lse.dtype == (torch.float64 if q.dtype == torch.float64 else torch.float32)
    assert not out.isnan().any() and not lse.isnan().any()
    if q.dtype == torch.float64:
        torch.testing.assert_close(out, ref_out, atol=1e-10, rtol=0)
        torch.testing.assert_close(lse, ref_lse, atol=1e-10, rtol=0)
        return
    base_out, base_lse = expected(q, k_log, v_log, lengths, upcast=False, **kw)
    assert_within_rule("out", out, ref_out, base_out, q.dtype)
    assert_within_rule("lse", lse, ref_lse, base_lse, q.dtype)


def run_case(batch, q_heads, kv_heads, q_len, dim, capacity, before, n_new, page_size, mode, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    k_log, k_cache, table = make_cache(batch, kv_heads, capacity, dim, dtype, page_size, gen)
    v_log, v_cache, _ = make_cache(batch, kv_heads, capacity, dim, dtype, 0, gen)
    if table is not None:  # v in the same shuffled pages as k (one table for both)
        v_cache = torch.randn(k_cache.shape, generator=gen, dtype=torch.float64).to(dtype)
        v_cache[table.flatten().long()] = v_log.reshape(batch, kv_heads, -1, page_size, dim).transpose(1, 2) \
            .flatten(0, 1)
    q = torch.randn(batch, q_heads, q_len, dim, generator=gen, dtype=torch.float64).to(dtype)
    k_new = torch.randn(batch, kv_heads, n_new, dim, generator=gen, dtype=torch.float64).to(dtype) if n_new else None
    v_new = torch.randn(batch, kv_heads, n_new, dim, generator=gen, dtype=torch.float64).to(dtype) if n_new else None
    kw = dict(MODES[mode])
    slopes = None
    if kw.pop("alibi", False):
        slopes = torch.rand(batch, q_heads, generator=gen, dtype=torch.float64).float() * 0.5
    seqlens = torch.tensor(before, dtype=torch.int32)
    out, lse = attnkernels.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, k_new=k_new,
                                                  v_new=v_new, block_table=table, alibi_slopes=slopes,
                                                  return_lse=True, **kw)
    assert seqlens.tolist() == list(before), "cache_seqlens must not change"
    # the append, in place: the new tokens at [before, before + n_new), everything else untouched
    for b, start in enumerate(before):
        if n_new:
            k_log[b, :, start : start + n_new] = k_new[b]
            v_log[b, :, start : start + n_new] = v_new[b]
    assert torch.equal(logical_of(k_cache, table, batch), k_log)
    assert torch.equal(logical_of(v_cache, table, batch), v_log)
    lengths = [start + n_new for start in before]
    check(out, lse, q, k_log, v_log, lengths, slopes=slopes, **kw)
    return out, lse


LAYOUTS = {"contig": 0, "paged16": 16, "paged32": 32}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("q_len", [1, 3, 17])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_append_then_attend_B4_Hq8_Hk2_D64_C96(layout, q_len, mode, dtype):
    """Appends of Nq tokens at lengths that cross page boundaries (14 + 3 over 16; 30 + 17 over 32)."""
    before = [0, 14, 30, 96 - q_len]
    run_case(4, 8, 2, q_len, 64, 96, before, q_len, LAYOUTS[layout], mode, dtype)


@pytest.mark.parametrize("mode", ["dense", "causal", "alibi-causal"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_rows_of_length_0_and_1_B4_Hq8_Hk2_Nq3_D40_C64_fp32(layout, mode):
    """No append: rows holding 0 and 1 keys (out 0 / lse -inf where a row sees nothing), odd D."""
    run_case(4, 8, 2, 3, 40, 64, [0, 1, 2, 64], 0, LAYOUTS[layout], mode, torch.float32)


@pytest.mark.parametrize("q_len", [1, 17])
@pytest.mark.parametrize("layout", ["contig", "paged16"])
def test_float64_exact_B3_Hq4_Hk1_D32_C128(layout, q_len):
    run_case(3, 4, 1, q_len, 32, 128, [5, 77, 100], 4, LAYOUTS[layout], "causal", torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("q_len", [1, 4])
def test_long_paged_split_kv_B2_Hq8_Hk2_D64_C4096_page64(q_len, dtype):
    """Rows of very different lengths: the split is planned on the longest row, the shorter row's tail chunks
    are empty tasks; appends straddle a page boundary (4030 + 4 over 4032)."""
    run_case(2, 8, 2, q_len, 64, 4096, [4030, 1500], 4, 64, "dense", dtype)


@pytest.mark.parametrize("layout", ["contig", "paged16"])
def test_thread_count_determinism_B2_Hq8_Hk2_Nq2_D64_C2048(layout):
    results = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        results.append(run_case(2, 8, 2, 2, 64, 2048, [2040, 999], 2, LAYOUTS[layout], "causal", torch.float32,
                                seed=3))
    for out, lse in results[1:]:
        assert torch.equal(out, results[0][0]) and torch.equal(lse, results[0][1])


def test_forward_only_no_grad_B1_Hq2_Hk1_Nq1_D16():
    """As FlashAttention's kvcache call: inputs that require grad are read detached; the output has no grad."""
    q = torch.randn(1, 2, 1, 16, requires_grad=True)
    cache = torch.randn(1, 1, 32, 16, requires_grad=True)
    out = attnkernels.attention_with_kvcache(q, cache, cache, cache_seqlens=torch.tensor([7], dtype=torch.int32))
    assert not out.requires_grad and out.grad_fn is None


def test_int_seqlens_and_default_scale_B2_Hq4_Hk2_Nq1_D16():
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(2, 4, 1, 16, generator=gen)
    k, v = torch.randn(2, 2, 32, 16, generator=gen), torch.randn(2, 2, 32, 16, generator=gen)
    out = attnkernels.attention_with_kvcache(q, k, v, cache_seqlens=20, scale=0.3)
    ref, _ = expected(q, k, v, [20, 20], upcast=True, scale=0.3)
    base, _ = expected(q, k, v, [20, 20], upcast=False, scale=0.3)
    assert_within_rule("out", out, ref, base, torch.float32)


def test_opcheck_B2_Hq4_Hk2_Nq2_D16_paged16():
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 2, 16, generator=gen)
    pages = torch.randn(5, 2, 16, 16, generator=gen)
    table = torch.tensor([[3, 0], [4, 1]], dtype=torch.int32)
    args = (q, pages, pages.clone(), torch.tensor([20, 9], dtype=torch.int32), table, 0.25, -1, 0, 0.0, None)
    torch.library.opcheck(torch.ops.attnkernels.attention_kvcache_fwd.default, args)


def test_reference_backend_matches_B2_Hq8_Hk2_Nq3_D32_paged16():
    """The op's "reference" backend (the float64 oracle the registry offers) on the same paged call."""
    gen = torch.Generator().manual_seed(2)
    k_log, k_cache, table = make_cache(2, 2, 64, 32, torch.float32, 16, gen)
    q = torch.randn(2, 8, 3, 32, generator=gen)
    seqlens = torch.tensor([40, 17], dtype=torch.int32)
    ours = attnkernels.attention_with_kvcache(q, k_cache, k_cache, cache_seqlens=seqlens, block_table=table,
                                              causal=True)
    with attnkernels.backend("reference"):
        ref = attnkernels.attention_with_kvcache(q, k_cache, k_cache, cache_seqlens=seqlens, block_table=table,
                                                 causal=True)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_triton_decode_route_B2_Hq8_Hk2_Nq1_D32_paged16():
    """CUDA tensors (and the "triton" backend under the interpreter) go to triton_launch.decode_forward."""
    why = backend_unavailable("triton", kvcache.FAMILY)
    if why is None and kvcache.triton_decode_forward() is None:
        why = "triton_launch.decode_forward is not in this tree yet (written by the Triton decode helper)"
    if why:
        print(f"skipped: {why}")
        pytest.skip(why)
    gen = torch.Generator().manual_seed(4)
    k_log, k_cache, table = make_cache(2, 2, 64, 32, torch.float32, 16, gen)
    v_log, v_cache, _ = make_cache(2, 2, 64, 32, torch.float32, 0, gen)
    v_cache = torch.randn(k_cache.shape, generator=gen)
    v_cache[table.flatten().long()] = v_log.reshape(2, 2, -1, 16, 32).transpose(1, 2).flatten(0, 1)
    q = torch.randn(2, 8, 1, 32, generator=gen)
    seqlens = torch.tensor([50, 3], dtype=torch.int32)
    with attnkernels.backend("triton"):
        out, lse = attnkernels.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, block_table=table,
                                                      causal=True, softcap=3.0, return_lse=True)
    check(out, lse, q, k_log, v_log, [50, 3], causal=True, softcap=3.0)


# --- the FlashAttention wrapper on the same data ------------------------------------------


@pytest.mark.parametrize("paged", [False, True], ids=["contig", "paged16"])
def test_fa_wrapper_matches_api_B3_Hq8_Hk2_Nq2_D32_C64(paged):
    gen = torch.Generator().manual_seed(6)
    batch, heads, n_cache, dim, page = 3, 2, 64, 32, 16
    q = torch.randn(batch, 2, 8, dim, generator=gen)  # FA layout (B, Nq, Hq, D)
    k_new, v_new = (torch.randn(batch, 2, heads, dim, generator=gen) for _ in range(2))
    if paged:
        k_fa, v_fa = (torch.randn(batch * n_cache // page + 1, page, heads, dim, generator=gen) for _ in range(2))
        table = torch.randperm(k_fa.shape[0], generator=gen)[: batch * n_cache // page].reshape(batch, -1) \
            .to(torch.int32)
    else:
        k_fa, v_fa = (torch.randn(batch, n_cache, heads, dim, generator=gen) for _ in range(2))
        table = None
    seqlens = torch.tensor([0, 15, 62], dtype=torch.int32)
    k_ours, v_ours = k_fa.transpose(1, 2).contiguous(), v_fa.transpose(1, 2).contiguous()
    slopes = torch.rand(8, generator=gen)
    out_fa, lse_fa = fa.flash_attn_with_kvcache(q, k_fa, v_fa, k_new, v_new, cache_seqlens=seqlens, block_table=table,
                                                causal=True, alibi_slopes=slopes, return_softmax_lse=True)
    out, lse = attnkernels.attention_with_kvcache(q.transpose(1, 2), k_ours, v_ours, cache_seqlens=seqlens,
                                                  k_new=k_new.transpose(1, 2), v_new=v_new.transpose(1, 2),
                                                  block_table=table, causal=True, alibi_slopes=slopes,
                                                  return_lse=True)
    assert torch.equal(out_fa, out.transpose(1, 2))
    assert torch.equal(lse_fa, torch.where(lse == float("-inf"), float("inf"), lse))
    assert torch.equal(k_fa.transpose(1, 2), k_ours) and torch.equal(v_fa.transpose(1, 2), v_ours)


# --- bad inputs -----------------------------------------------------------------------------


def _bad_cases():
    q = torch.randn(2, 4, 1, 16)
    cache = torch.zeros(2, 2, 32, 16)
    pages = torch.zeros(6, 2, 16, 16)
    table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    lens = torch.tensor([3, 4], dtype=torch.int32)
    new = torch.zeros(2, 2, 1, 16)
    call = attnkernels.attention_with_kvcache
    return [
        ("seqlens-dtype", lambda: call(q, cache, cache, cache_seqlens=lens.long()), ValueError,
         r"cache_seqlens: expected an int32 tensor of shape \(B,\) = \(2,\)"),
        ("seqlens-shape", lambda: call(q, cache, cache, cache_seqlens=lens[:1]), ValueError,
         r"cache_seqlens: expected an int32 tensor"),
        ("seqlens-negative", lambda: call(q, cache, cache, cache_seqlens=torch.tensor([-1, 0], dtype=torch.int32)),
         ValueError, r"cache_seqlens: row 0 is -1; expected >= 0"),
        ("seqlens-full", lambda: call(q, cache, cache, cache_seqlens=torch.tensor([3, 32], dtype=torch.int32),
                                      k_new=new, v_new=new), ValueError,
         r"cache_seqlens: row 1 holds 32 tokens \+ 1 new > the cache's 32 slots"),
        ("paged-full", lambda: call(q, pages, pages, cache_seqlens=torch.tensor([32, 0], dtype=torch.int32),
                                    block_table=table, k_new=new, v_new=new), ValueError,
         r"cache_seqlens: row 0 holds 32 tokens \+ 1 new > the cache's 32 slots"),
        ("table-dtype", lambda: call(q, pages, pages, cache_seqlens=lens, block_table=table.long()), ValueError,
         r"block_table: expected int32 \(B=2, max_pages\)"),
        ("table-shape", lambda: call(q, pages, pages, cache_seqlens=lens, block_table=table[:1]), ValueError,
         r"block_table: expected int32 \(B=2, max_pages\)"),
        ("table-range", lambda: call(q, pages, pages, cache_seqlens=lens, block_table=table + 3), ValueError,
         r"block_table: page indices must lie in \[0, 6\)"),
        ("page-size", lambda: call(q, torch.zeros(6, 2, 24, 16), torch.zeros(6, 2, 24, 16), cache_seqlens=lens,
                                   block_table=table), ValueError, r"k_cache: page size 24 must be a power of two"),
        ("page-small", lambda: call(q, torch.zeros(6, 2, 8, 16), torch.zeros(6, 2, 8, 16), cache_seqlens=lens,
                                    block_table=table), ValueError, r"page size 8 must be a power of two >= 16"),
        ("heads", lambda: call(torch.randn(2, 3, 1, 16), cache, cache, cache_seqlens=lens), ValueError,
         r"the number of query heads \(3\) must be a multiple of the number of key/value heads \(2\)"),
        ("head-dim", lambda: call(torch.randn(2, 4, 1, 8), cache, cache, cache_seqlens=lens), ValueError,
         r"k_cache: head dim 16 must equal q's head dim 8"),
        ("v-shape", lambda: call(q, cache, torch.zeros(2, 2, 31, 16), cache_seqlens=lens), ValueError,
         r"v_cache: expected"),
        ("cache-batch", lambda: call(q, cache[:1], cache[:1], cache_seqlens=lens), ValueError,
         r"k_cache: batch size 1 must match q's 2"),
        ("new-only-k", lambda: call(q, cache, cache, cache_seqlens=lens, k_new=new), ValueError,
         r"k_new, v_new: give both"),
        ("new-heads", lambda: call(q, cache, cache, cache_seqlens=lens, k_new=torch.zeros(2, 1, 1, 16),
                                   v_new=torch.zeros(2, 1, 1, 16)), ValueError,
         r"k_new: expected \(B, Hk, Nnew, D\) = \(2, 2, Nnew, 16\)"),
        ("new-dtype", lambda: call(q, cache, cache, cache_seqlens=lens, k_new=new.double(), v_new=new.double()),
         TypeError, r"k_new: dtype torch.float64 differs from k_cache's torch.float32"),
        ("cache-dtype", lambda: call(q, cache.double(), cache.double(), cache_seqlens=lens), TypeError,
         r"k_cache: dtype torch.float64 differs from q's torch.float32"),
        ("window", lambda: call(q, cache, cache, cache_seqlens=lens, window_size=(-2, 0)), ValueError,
         r"window_size: left must be >= -1"),
        ("softcap", lambda: call(q, cache, cache, cache_seqlens=lens, softcap=-1.0), ValueError, r"softcap"),
        ("alibi-shape", lambda: call(q, cache, cache, cache_seqlens=lens, alibi_slopes=torch.ones(3)), ValueError,
         r"alibi_slopes: expected shape"),
    ]


@pytest.mark.parametrize("name,fn,exc,match", _bad_cases(), ids=[c[0] for c in _bad_cases()])
def test_bad_inputs(name, fn, exc, match):
    with pytest.raises(exc, match=match):
        fn()


def test_bad_input_writes_nothing():
    """The bounds are checked before the append: a refused call leaves the cache as it was."""
    cache = torch.zeros(2, 2, 8, 16)
    with pytest.raises(ValueError, match="cache_seqlens: row 1 holds 8 tokens"):
        attnkernels.attention_with_kvcache(torch.randn(2, 4, 1, 16), cache, cache,
                                           cache_seqlens=torch.tensor([0, 8], dtype=torch.int32),
                                           k_new=torch.ones(2, 2, 1, 16), v_new=torch.ones(2, 2, 1, 16))
    assert not cache.any()


def test_direct_op_checks_bounds_B1():
    """The C++ op keeps the checks that keep a direct call in bounds."""
    ops = attnkernels.backends.cpu_kernels()
    q, pages = torch.randn(1, 2, 1, 16), torch.zeros(4, 1, 16, 16)
    with pytest.raises(RuntimeError, match="block_table entries must lie in"):
        ops.attention_kvcache_fwd(q, pages, pages, torch.tensor([3], dtype=torch.int32),
                                  torch.tensor([[4]], dtype=torch.int32), 1.0, -1, -1, 0.0, None)
    with pytest.raises(RuntimeError, match="cache_seqlens must lie in"):
        ops.attention_kvcache_fwd(q, pages, pages, torch.tensor([17], dtype=torch.int32),
                                  torch.tensor([[1]], dtype=torch.int32), 1.0, -1, -1, 0.0, None)
    assert math.isfinite(float(ops.attention_kvcache_fwd(
        q, pages, pages, torch.tensor([16], dtype=torch.int32), torch.tensor([[1]], dtype=torch.int32), 1.0, -1, -1,
        0.0, None)[1].min()))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("paged", [False, True], ids=["contig", "paged16"])
def test_torch_compile_fullgraph_B2_Hq4_Hk2_Nq3_D16_C48(paged, backend):
    """attention_with_kvcache inside torch.compile(fullgraph=True): the same output, LSE and in-place append
    as eager; the cache bounds (a host sync in eager) become an asserting op that raises when the graph runs."""
    gen = torch.Generator().manual_seed(5)
    k_log, k_cache, table = make_cache(2, 2, 48, 16, torch.float32, 16 if paged else 0, gen)
    v_cache = torch.randn(k_cache.shape, generator=gen)
    q = torch.randn(2, 4, 3, 16, generator=gen)
    k_new, v_new = torch.randn(2, 2, 3, 16, generator=gen), torch.randn(2, 2, 3, 16, generator=gen)

    def step(q, k_cache, v_cache, k_new, v_new, seqlens):
        return attnkernels.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, k_new=k_new,
                                                  v_new=v_new, block_table=table, causal=True, return_lse=True)

    seqlens = torch.tensor([14, 20], dtype=torch.int32)
    k_eager, v_eager = k_cache.clone(), v_cache.clone()
    out_eager, lse_eager = step(q, k_eager, v_eager, k_new, v_new, seqlens)
    compiled = torch.compile(step, fullgraph=True, backend=backend)
    out, lse = compiled(q, k_cache, v_cache, k_new, v_new, seqlens)
    torch.testing.assert_close(out, out_eager, atol=1e-6, rtol=0)
    torch.testing.assert_close(lse, lse_eager, atol=1e-6, rtol=0)
    assert torch.equal(k_cache, k_eager) and torch.equal(v_cache, v_eager), "the append must happen in place"
    with pytest.raises(RuntimeError, match="cache_seqlens: a row is negative or holds more than the cache's 48"):
        compiled(q, k_cache, v_cache, k_new, v_new, torch.tensor([14, 46], dtype=torch.int32))


# bf16 through the kernel's register-blocked paths: head dims with whole 64-column blocks, a 32-column rest
# (96, 160) and none (32); GQA groups of 2 / 4 / 8 (R = 2 · 3 = 6: a 4-row block and a 2-row rest); Nq 1 / 3 /
# 17 (17 runs as blocks of 16 + 1); rows of length 0, 1 and odd; contiguous and shuffled 16-row pages.
@pytest.mark.parametrize("layout", ["contig", "paged16"])
@pytest.mark.parametrize("q_heads,kv_heads,q_len,dim", [(8, 2, 1, 128), (8, 2, 1, 96), (8, 1, 1, 160), (4, 2, 3, 64),
                                                        (8, 2, 17, 64), (8, 8, 1, 32)],
                         ids=["Hq8-Hk2-Nq1-D128", "Hq8-Hk2-Nq1-D96", "Hq8-Hk1-Nq1-D160", "Hq4-Hk2-Nq3-D64",
                              "Hq8-Hk2-Nq17-D64", "Hq8-Hk8-Nq1-D32"])
def test_bf16_rows_B4_C112(layout, q_heads, kv_heads, q_len, dim):
    run_case(4, q_heads, kv_heads, q_len, dim, 112, [0, 1, 97 - q_len, 112 - q_len], q_len, LAYOUTS[layout], "causal",
             torch.bfloat16)


@pytest.fixture(params=["tile-units", "vector"])
def bf16_path(request, monkeypatch):
    """bf16 decode on the tile units (csrc/decode.cpp: K straight from the cache as the A operand, P·V from V's
    VNNI pairs, where the CPU has AMX-BF16) or forced onto the vector fallback (ATTNKERNELS_CPU_NO_AMX=1)."""
    if request.param == "vector":
        monkeypatch.setenv("ATTNKERNELS_CPU_NO_AMX", "1")
    else:
        monkeypatch.delenv("ATTNKERNELS_CPU_NO_AMX", raising=False)
    return request.param


# Both bf16 paths: head dims 64 / 128 / 256 (whole 64-column P·V passes) and 96 (a 32-column rest); R = 4 · Nq:
# 4, 12 (<= 16: the tile units), 17 = blocks of 16 rows (R = 64: the vector path) + 1; rows of length 0, 1, odd
# and full; 16-row pages (a half tile per page) and 32-row ones, shuffled; windows start tiles off the 16-key grid
# (staged halves); softcap and ALiBi on the tile units' scores.
@pytest.mark.parametrize("mode", ["causal", "win5_3", "softcap", "alibi-causal"])
@pytest.mark.parametrize("layout", ["contig", "paged16", "paged32"])
@pytest.mark.parametrize("q_len,dim", [(1, 64), (1, 128), (3, 256), (17, 64), (3, 96)],
                         ids=["Nq1-D64", "Nq1-D128", "Nq3-D256", "Nq17-D64", "Nq3-D96"])
def test_bf16_paths_B4_Hq8_Hk2_C160(bf16_path, layout, q_len, dim, mode):
    run_case(4, 8, 2, q_len, dim, 160, [0, 1, 97 - q_len, 160 - q_len], q_len, LAYOUTS[layout], mode, torch.bfloat16)


def test_bf16_paths_long_split_B2_Hq32_Hk8_Nq1_D128_C4160_page64(bf16_path):
    """A split cache (several chunks per kv head merged by LSE) with a partial last tile, both paths."""
    run_case(2, 32, 8, 1, 128, 4160, [4099, 2050], 1, 64, "dense", torch.bfloat16)
