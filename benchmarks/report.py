"""`python -m benchmarks.report [--quick]`: the benchmark report a user reads before choosing us.

Sweeps every family (dense, causal, window, BigBird, linear causal / non-causal,
FAVOR+) over N (and window size / density), forward and forward+backward, on CPU
fp32, against the peers that are installed, and writes BENCHMARKS.md plus PNG
plots under docs/. Each row:
- median ms of ours, with the spread (min–max over rounds);
- speed-up against the best peer = median over rounds of (peer time / our time),
  ours and every peer and a fixed torch.mm interleaved in each round (the host
  throttles: only same-run ratios mean anything);
- useful GFLOP/s and its fraction of torch.mm's GFLOP/s in the same rounds;
- peak extra memory (resident set high-water mark during one call, above the
  resident set before it), ours and the peer's.
Correctness gates speed: a family's rows are printed only after its output (and
gradients) matched the float64 reference at a small size.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import gc
import importlib.util
import json
import os
import platform
import re
import statistics
import subprocess
import tempfile
import sys
from typing import Callable

import torch
import torch.nn.functional as F

import attnkernels
from attnkernels import masks
from attnkernels.softmax.reference import attention_reference
from attnkernels.conventions import window_visibility
from attnkernels.tools.timing import time_interleaved

from . import peers
from .common import timed_call

HEADS, HEAD_DIM = 8, 64
MM_SIZE = 1024


# --------------------------------------------------------------------------------------
# memory: the resident-set high-water mark (Linux), reset before each measured call
# --------------------------------------------------------------------------------------

def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_extra_mb(fn: Callable[[], object]) -> float | None:
    """Peak resident memory a call adds above what was resident before it, in MB."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
    except OSError:
        return None
    before = _status_kib("VmRSS")
    result = fn()
    peak = _status_kib("VmHWM")
    del result
    if before is None or peak is None:
        return None
    return max(peak - before, 0) / 1024


# --------------------------------------------------------------------------------------
# cases
# --------------------------------------------------------------------------------------

@dataclasses.dataclass
class Case:
    family: str
    label: str  # the swept value, e.g. "N=4096" or "w=256"
    seq_len: int
    direction: str  # "fwd" | "fwd+bwd"
    ours: Callable[[], object]
    peers: dict  # name -> callable
    flops: float  # useful FLOPs of one call
    dtype: torch.dtype = torch.float32  # of the inputs, ours and the peers alike


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def _inputs(seq_len, backward, dtype, heads=HEADS, head_dim=HEAD_DIM):
    return [torch.randn(1, heads, seq_len, head_dim, dtype=dtype, requires_grad=backward) for _ in range(3)]


def _softmax_flops(seq_len, visible, backward):
    return 4.0 * HEADS * seq_len * seq_len * HEAD_DIM * visible * (3.5 if backward else 1.0)


def dense_cases(seq_lens, causal, dtype=torch.float32):
    family = "causal" if causal else "dense"
    for n in seq_lens:
        for backward in (False, True):
            t = _inputs(n, backward, dtype)
            ours = timed_call(lambda q, k, v: attnkernels.attention(q, k, v, causal=causal), t, backward)
            sdpa = timed_call(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal), t, backward)
            yield Case(family, f"N={n}", n, "fwd+bwd" if backward else "fwd", ours, {"sdpa": sdpa},
                       _softmax_flops(n, 0.5 if causal else 1.0, backward), dtype)


def window_cases(seq_lens, windows, *, masked_max_n=4096, flex=True, dtype=torch.float32):
    for n in seq_lens:
        for w in windows:
            visible = window_visibility(n, n, (w, w)).double().mean().item() if n <= 16384 else min(1.0, (2 * w + 1) / n)
            for backward in (False, True):
                t = _inputs(n, backward, dtype)
                ours = timed_call(lambda q, k, v, w=w: attnkernels.attention(q, k, v, window_size=(w, w)), t, backward)
                peer_calls = {}
                if n <= masked_max_n:
                    peer_calls["masked_sdpa"] = timed_call(peers.masked_sdpa_fn(window_visibility(n, n, (w, w))), t, backward)
                local = peers.local_attention_fn(w, causal=False)
                if local is not None and n % w == 0 and n <= 16384:
                    peer_calls["local_attention"] = timed_call(local, t, backward)
                if flex and not backward and n <= 16384:
                    peer_calls["flex"] = timed_call(peers.flex_attention_fn(
                        lambda b, h, qi, ki, w=w: (qi - ki <= w) & (ki - qi <= w), None, None, n, n), t, False)
                yield Case("window", f"N={n} w={w}", n, "fwd+bwd" if backward else "fwd", ours, peer_calls,
                           _softmax_flops(n, visible, backward), dtype)


def bigbird_cases(seq_lens, random_blocks, *, masked_max_n=4096, dtype=torch.float32):
    for n in seq_lens:
        for r in random_blocks:
            mask = masks.bigbird(n, block_size=64, num_global_blocks=1, num_window_blocks=3, num_random_blocks=r, num_heads=HEADS, seed=0)
            for backward in (False, True):
                t = _inputs(n, backward, dtype)
                ours = timed_call(lambda q, k, v, mask=mask: attnkernels.sparse_attention(q, k, v, mask), t, backward)
                peer_calls = {}
                if n <= masked_max_n:
                    peer_calls["masked_sdpa"] = timed_call(peers.masked_sdpa_fn(mask.element_mask()), t, backward)
                if not backward and n <= 16384:
                    peer_calls["flex"] = timed_call(peers.flex_from_block_mask(mask), t, False)
                hf = peers.hf_bigbird_fn(n, HEADS, HEAD_DIM, block_size=64, num_random_blocks=r, dtype=dtype) if n <= 8192 else None
                if hf is not None:
                    hf_fn, hidden = hf
                    peer_calls["hf_bigbird"] = timed_call(
                        hf_fn, [torch.randn(1, n, hidden, dtype=dtype, requires_grad=backward)], backward)
                yield Case("bigbird", f"N={n} r={r}", n, "fwd+bwd" if backward else "fwd", ours, peer_calls,
                           _softmax_flops(n, mask.density(), backward), dtype)


def linear_cases(seq_lens, causal, dtype=torch.float32):
    if importlib.util.find_spec("attnkernels.linear") is None:
        print("attnkernels.linear is not built yet: linear rows skipped")
        return
    from attnkernels import linear_attention

    family = "linear-causal" if causal else "linear"
    for n in seq_lens:
        for backward in (False, True):
            t = _inputs(n, backward, dtype)
            ours = timed_call(lambda q, k, v: linear_attention(q, k, v, feature_map="elu", causal=causal), t, backward)
            peer_calls = {}
            fla = peers.fla_naive_linear_fn(causal)
            if fla is not None:
                peer_calls["fla_naive"] = timed_call(fla, t, backward)
            performer = peers.performer_linear_fn(causal)
            if performer is not None and (not causal or n <= 8192):
                peer_calls["performer"] = timed_call(performer, t, backward)
            # φ(q)(φ(k)ᵀv): 2 products of N·D·D multiply-adds (+ the normaliser), ×2 flops
            flops = 4.0 * HEADS * n * HEAD_DIM * HEAD_DIM * (3.5 if backward else 1.0)
            yield Case(family, f"N={n}", n, "fwd+bwd" if backward else "fwd", ours, peer_calls, flops, dtype)


DECODE_PAGE_SIZE = 64


def _paged_copy(cache, page_size, gen):
    """(B, Hk, N, D) -> (pages (B·N/page_size, Hk, page_size, D) in a shuffled order, block_table int32 (B, N/ps))."""
    batch, heads, n, dim = cache.shape
    per_row = n // page_size
    order = torch.randperm(batch * per_row, generator=gen)
    pages = torch.empty(batch * per_row, heads, page_size, dim, dtype=cache.dtype)
    pages[order] = cache.reshape(batch, heads, per_row, page_size, dim).transpose(1, 2).flatten(0, 1)
    return pages, order.reshape(batch, per_row).to(torch.int32)


def decode_cases(kv_lens, batches, dtype=torch.float32, q_heads=32, kv_heads=8, head_dim=128):
    """One decode step (Nq=1) of a GQA model against a filled KV cache, vs SDPA(enable_gqa=True).

    Memory-bound: the floor is reading K and V once. The "copy" peer clones K alone, which moves as
    many bytes (read + write) as reading K and V: its ratio is the fraction of copy bandwidth we reach.
    Each size has a second row, "paged": attention_with_kvcache on the same K / V stored as shuffled
    pages of DECODE_PAGE_SIZE rows (read through the block table, no gather) against the same peers
    on the contiguous cache (SDPA cannot read pages: its row is the cost of a contiguous cache).
    """
    gen = torch.Generator().manual_seed(0)
    for n in kv_lens:
        for b in batches:
            q = torch.randn(b, q_heads, 1, head_dim, dtype=dtype)
            k, v = (torch.randn(b, kv_heads, n, head_dim, dtype=dtype) for _ in range(2))
            ours = timed_call(lambda q, k, v: attnkernels.attention(q, k, v), [q, k, v], False)
            sdpa = timed_call(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), [q, k, v], False)
            copy = timed_call(lambda k: k.clone(), [k], False)
            yield Case("decode", f"B={b} Nk={n}", n, "fwd", ours, {"sdpa_gqa": sdpa, "copy_same_bytes": copy},
                       4.0 * b * q_heads * n * head_dim, dtype)
            if n % DECODE_PAGE_SIZE:
                continue
            k_pages, table = _paged_copy(k, DECODE_PAGE_SIZE, gen)
            v_pages = torch.empty_like(k_pages)  # the same pages as k (one table for both)
            v_pages[table.flatten().long()] = v.reshape(b, kv_heads, -1, DECODE_PAGE_SIZE, head_dim).transpose(1, 2) \
                .flatten(0, 1)
            lens = torch.full((b,), n, dtype=torch.int32)
            # (the table and lengths bound now: every case is built before any is timed)
            paged = timed_call(lambda q, kp, vp, lens=lens, table=table: attnkernels.attention_with_kvcache(
                q, kp, vp, cache_seqlens=lens, block_table=table), [q, k_pages, v_pages], False)
            yield Case("decode", f"B={b} Nk={n} paged{DECODE_PAGE_SIZE}", n, "fwd", paged,
                       {"sdpa_gqa": sdpa, "copy_same_bytes": copy}, 4.0 * b * q_heads * n * head_dim, dtype)


def varlen_cases(total, num_seqs, dtype=torch.float32, heads=HEADS, head_dim=HEAD_DIM):
    """A packed causal training batch (random lengths summing to `total`), fwd+bwd, vs SDPA on the
    same batch padded to the longest sequence (right padding: top-left causal keeps real rows exact)."""
    gen = torch.Generator().manual_seed(0)
    cuts = torch.sort(torch.randperm(total - 1, generator=gen)[: num_seqs - 1] + 1).values
    bounds = torch.cat([torch.tensor([0]), cuts, torch.tensor([total])])
    lengths = (bounds[1:] - bounds[:-1]).tolist()
    cu = bounds.to(torch.int32)
    longest = max(lengths)
    packed = [torch.randn(total, heads, head_dim, dtype=dtype, requires_grad=True) for _ in range(3)]
    padded = [torch.randn(num_seqs, heads, longest, head_dim, dtype=dtype, requires_grad=True) for _ in range(3)]
    ours = timed_call(lambda q, k, v: attnkernels.attention(q, k, v, causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu),
                      packed, True)
    sdpa = timed_call(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), padded, True)
    useful = sum(n * (n + 1) / 2 for n in lengths) * 4.0 * heads * head_dim * 3.5
    yield Case("varlen", f"{num_seqs} seqs, total {total}, longest {longest}", total, "fwd+bwd", ours,
               {"sdpa_padded": sdpa}, useful, dtype)


def modifier_cases(seq_len, dtype=torch.float32, *, window=1024, softcap=50.0):
    """Each score modifier's cost over the plain kernel (peer `ours_plain`: its ratio is plain/modified,
    so 1/ratio is the modifier's cost), causal, N = seq_len; the bias against SDPA given the same float
    mask; Gemma2's softcap + causal window against FlexAttention compiled with the same score_mod.
    softcap: Gemma 2's attention cap (50; its final-logit cap is 30)."""
    n = seq_len
    gen = torch.Generator().manual_seed(0)
    slopes = torch.rand(HEADS, generator=gen)
    sinks = torch.randn(HEADS, generator=gen, dtype=dtype)
    modified = {
        f"softcap {softcap:g}": dict(softcap=softcap), "alibi": dict(alibi_slopes=slopes), "sinks": dict(sinks=sinks),
        "dropout p=0.1": dict(dropout_p=0.1),
    }
    flops = lambda backward: _softmax_flops(n, 0.5, backward)  # noqa: E731
    for name, kwargs in modified.items():
        for backward in (False, True):
            t = _inputs(n, backward, dtype)
            ours = timed_call(lambda q, k, v, kw=kwargs: attnkernels.attention(q, k, v, causal=True, **kw), t, backward)
            plain = timed_call(lambda q, k, v: attnkernels.attention(q, k, v, causal=True), t, backward)
            yield Case("modifiers", f"N={n} causal {name}", n, "fwd+bwd" if backward else "fwd", ours,
                       {"ours_plain": plain}, flops(backward), dtype)
    causal_mask = torch.ones(n, n, dtype=torch.bool).tril()
    bias = (torch.randn(1, HEADS, n, n, generator=gen) * 0.5).masked_fill(~causal_mask, float("-inf")).to(dtype)
    for backward in (False, True):
        t = _inputs(n, backward, dtype)
        ours = timed_call(lambda q, k, v: attnkernels.attention(q, k, v, attn_bias=bias), t, backward)
        sdpa = timed_call(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=bias), t, backward)
        yield Case("modifiers", f"N={n} float bias (1,H,N,N)", n, "fwd+bwd" if backward else "fwd", ours,
                   {"sdpa_same_mask": sdpa}, _softmax_flops(n, 1.0, backward), dtype)
    visible = window_visibility(n, n, (window - 1, 0)).double().mean().item()
    t = _inputs(n, False, dtype)
    ours = timed_call(lambda q, k, v: attnkernels.attention(q, k, v, causal=True, window_size=(window - 1, 0),
                                                            softcap=softcap), t, False)
    flex = peers.flex_attention_fn(lambda b, h, qi, ki: (ki <= qi) & (qi - ki < window), None, None, n, n,
                                   score_mod=lambda score, b, h, qi, ki: softcap * torch.tanh(score / softcap))
    yield Case("modifiers", f"N={n} Gemma2 softcap {softcap:g} + window {window}", n, "fwd", ours,
               {"flex_score_mod": timed_call(flex, t, False)},
               _softmax_flops(n, visible, False), dtype)


def favor_cases(seq_lens, num_features=256, dtype=torch.float32):
    if importlib.util.find_spec("attnkernels.linear") is None:
        return
    from attnkernels import PerformerFeatures, linear_attention

    features = PerformerFeatures(HEAD_DIM, num_features=num_features, generator=torch.Generator().manual_seed(0)).to(dtype)
    for n in seq_lens:
        for backward in (False, True):
            t = _inputs(n, backward, dtype)
            ours = timed_call(lambda q, k, v: linear_attention(q, k, v, feature_map=features), t, backward)
            peer_calls = {}
            performer = peers.performer_fast_attention_fn(HEAD_DIM, num_features, dtype=dtype)
            if performer is not None:
                peer_calls["performer"] = timed_call(performer, t, backward)
            flops = 4.0 * HEADS * n * (HEAD_DIM * num_features * 2) * (3.5 if backward else 1.0)
            yield Case("favor+", f"N={n}", n, "fwd+bwd" if backward else "fwd", ours, peer_calls, flops, dtype)


# --------------------------------------------------------------------------------------
# correctness gate
# --------------------------------------------------------------------------------------

def _check(ours, reference, tensors):
    """Max |ours - reference| over the output and the three gradients, fp32 vs float64."""
    out = ours(*tensors)
    grads = torch.autograd.grad(out, tensors, torch.ones_like(out))
    ref_inputs = [t.detach().double().requires_grad_() for t in tensors]
    ref_out = reference(*ref_inputs)
    ref_grads = torch.autograd.grad(ref_out, ref_inputs, torch.ones_like(ref_out))
    return max((a.double() - b).abs().max().item() for a, b in zip((out, *grads), (ref_out, *ref_grads)))


def correctness_gate() -> dict:
    """family -> max error at a small size (fp32 kernel vs float64 reference, out and grads)."""
    n = 300
    t = [torch.randn(1, 4, n, 32, requires_grad=True) for _ in range(3)]
    bigbird = masks.bigbird(n, block_size=32, num_random_blocks=2, num_heads=4, seed=1)
    errors = {
        "dense": _check(lambda q, k, v: attnkernels.attention(q, k, v), lambda q, k, v: attention_reference(q, k, v)[0], t),
        "causal": _check(lambda q, k, v: attnkernels.attention(q, k, v, causal=True),
                         lambda q, k, v: attention_reference(q, k, v, causal=True)[0], t),
        "window": _check(lambda q, k, v: attnkernels.attention(q, k, v, window_size=37),
                         lambda q, k, v: attention_reference(q, k, v, window_size=37)[0], t),
        "bigbird": _check(lambda q, k, v: attnkernels.sparse_attention(q, k, v, bigbird),
                          lambda q, k, v: attention_reference(q, k, v, block_mask=bigbird)[0], t),
    }
    if importlib.util.find_spec("attnkernels.linear") is not None:
        from attnkernels import PerformerFeatures, linear_attention
        from attnkernels.linear.reference import linear_attention_reference

        for causal in (False, True):
            errors["linear-causal" if causal else "linear"] = _check(
                lambda q, k, v: linear_attention(q, k, v, causal=causal),
                lambda q, k, v: linear_attention_reference(q, k, v, causal=causal)[0], t)
        features = PerformerFeatures(32, num_features=64, generator=torch.Generator().manual_seed(0))
        features64 = copy.deepcopy(features).double()  # .double() converts in place: keep ours fp32

        def favor_reference(q, k, v):
            # The same FAVOR+ features, then the float64 literal sums of the reference backend.
            with attnkernels.backend("reference"):
                return linear_attention(q, k, v, feature_map=features64)

        errors["favor+"] = _check(lambda q, k, v: linear_attention(q, k, v, feature_map=features), favor_reference, t)
    return errors


GATE_TOLERANCE = 1e-3


# --------------------------------------------------------------------------------------
# measuring and writing
# --------------------------------------------------------------------------------------

# The families each case generator yields (for --families).
CASE_FAMILIES = {
    "dense_cases": {"dense", "causal"}, "window_cases": {"window"}, "bigbird_cases": {"bigbird"},
    "linear_cases": {"linear", "linear-causal"}, "favor_cases": {"favor+"}, "decode_cases": {"decode"},
    "varlen_cases": {"varlen"}, "modifier_cases": {"modifiers"},
}


def cpu_description() -> str:
    """The CPU's model name and its 16-bit matrix / dot-product units (Linux /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    field = lambda key: next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith(key)), "")  # noqa: E731
    flags = field("flags").split()
    units = [u for u in ("amx_bf16", "amx_fp16", "avx512_bf16", "avx512_fp16") if u in flags]
    return f"{field('model name') or platform.machine()} ({', '.join(units) or 'no 16-bit units'})"


def yardstick_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype whose torch.mm runs on the unit our C++ kernels use for `dtype`: a 16-bit dtype
    they upcast (no AMX-FP16 for fp16, say) runs on the fp32 FMA units, and fp16's torch.mm on
    such a CPU is a slow fallback (~1 GFLOP/s here), no peak at all."""
    if dtype in (torch.bfloat16, torch.float16):
        from attnkernels import _cpu_backend

        cpu = _cpu_backend.load()
        name = "bfloat16" if dtype == torch.bfloat16 else "float16"
        if cpu.available and hasattr(cpu.ops, "gemm_path") and cpu.ops.gemm_path(name) == "fp32-upcast":
            return torch.float32
    return dtype


def _gemm_paths() -> str:
    from attnkernels import _cpu_backend

    paths = _cpu_backend.load().gemm_paths(("bfloat16", "float16"))
    short = {str(t).replace("torch.", ""): name for name, t in DTYPES.items()}  # "bfloat16" -> "bf16"
    return "" if paths is None else ", ".join(f"{short[d]} {p}" for d, p in paths.items())


def measure(case: Case, rounds: int) -> dict:
    # The yardstick runs on the unit our kernel uses for the case's dtype (fp32: AVX-512 FMA; bf16:
    # AMX or AVX512-BF16 through oneDNN; a dtype our kernels upcast: fp32).
    mm_dtype = yardstick_dtype(case.dtype)
    a, b = torch.randn(MM_SIZE, MM_SIZE, dtype=mm_dtype), torch.randn(MM_SIZE, MM_SIZE, dtype=mm_dtype)
    mm = lambda: torch.mm(a, b)  # noqa: E731
    # Every compiled Flex peer wraps the same flex_attention code object: past dynamo's recompile
    # limit (8 shapes / masks / dtypes a run) it silently ran eager, 30-70x slower (a bf16 row read
    # "71x Flex"). A fresh cache per case compiles each peer for its own case (in the warm-up).
    torch._dynamo.reset()
    names = list(case.peers)
    samples = time_interleaved([case.ours, *case.peers.values(), mm], rounds=rounds, warmup=1)
    ours_t, mm_t = samples[0], samples[-1]
    mm_flops = 2 * MM_SIZE**3
    row = dict(
        family=case.family, label=case.label, seq_len=case.seq_len, direction=case.direction,
        dtype=DTYPE_NAMES[case.dtype],
        ours_ms=statistics.median(ours_t) * 1e3, ours_min_ms=min(ours_t) * 1e3, ours_max_ms=max(ours_t) * 1e3,
        gflops=case.flops / statistics.median(ours_t) / 1e9,
        fraction_of_mm=statistics.median((case.flops / o) / (mm_flops / m) for o, m in zip(ours_t, mm_t)),
        mm_gflops=statistics.median(mm_flops / m for m in mm_t) / 1e9,
        ours_mem_mb=peak_extra_mb(case.ours), peers={},
    )
    for name, peer_t in zip(names, samples[1:-1]):
        row["peers"][name] = dict(
            ms=statistics.median(peer_t) * 1e3,
            speedup=statistics.median(p / o for p, o in zip(peer_t, ours_t)),
            mem_mb=peak_extra_mb(case.peers[name]),
        )
    rivals = [n for n in row["peers"] if not n.startswith("copy")]  # a copy is the bytes floor, not a peer
    if rivals:
        best = min(rivals, key=lambda n: row["peers"][n]["ms"])
        row["best_peer"], row["speedup_vs_best"] = best, row["peers"][best]["speedup"]
    return row


def _fmt_mem(mb):
    return "n/a" if mb is None else f"{mb:.0f}"


def _per_dtype(mm_gflops) -> dict:
    """meta's torch.mm GFLOP/s per dtype (runs saved before the dtype axis hold one fp32 number)."""
    return mm_gflops if isinstance(mm_gflops, dict) else {"fp32": mm_gflops}


def markdown(meta, gate, rows, compile_section, plots) -> str:
    out = [
        "# Benchmarks",
        "",
        "Produced by `python -m benchmarks.report" + (" --quick" if meta["quick"] else "") + "`; do not edit by hand.",
        "",
        f"- date: {meta['date']}",
        f"- machine: {meta['machine']}, {meta['cores']} cores; torch threads {meta['threads']}",
        f"- torch {meta['torch']}, triton {meta['triton']}, python {meta['python']}; CPU capability {meta['capability']} "
        f"(C++ build used: {meta['build']}" + (f"; tile GEMMs {meta['gemm_paths']}" if meta.get("gemm_paths") else "") + ")",
        *(f"- re-measured on {u['date']} with `--update` (same flags; C++ build {u['build']}): " + "; ".join(u["sections"])
          for u in meta.get("updates", [])),
        f"- torch.mm {MM_SIZE}³ on the unit our kernels use for the row's dtype (in that dtype; fp32 for a dtype they "
        "upcast), in the same rounds: median "
        + ", ".join(f"{d} {g:.0f}" for d, g in _per_dtype(meta["mm_gflops"]).items()) + " GFLOP/s over the rows; `of mm` is against it",
        "- all rows CPU, B=1, H=8, D=64, peers in the row's dtype; times are medians of interleaved rounds, spread = min–max;",
        "  speed-up = median over rounds of (peer time / our time); memory = peak resident memory a call adds (MB).",
        "- FLOPs: softmax forward 4·H·N²·D × visible fraction, forward+backward 3.5×; linear 4·H·N·D·M; decode 4·B·Hq·Nk·D "
        "(memory-bound: its `copy_same_bytes` peer moves the bytes of reading K and V once, so that ratio is our "
        "fraction of copy bandwidth); varlen Σ causal N_i² terms, vs SDPA on the batch padded to the longest sequence.",
        "",
        "## Correctness gate (fp32 kernel vs float64 reference, max |error| over output and gradients, N=300)",
        "",
        "| family | max error | passed |",
        "|---|---|---|",
    ]
    for family, error in gate.items():
        out.append(f"| {family} | {error:.2e} | {'yes' if error < GATE_TOLERANCE else 'NO'} |")
    sections = []
    for r in rows:
        if (r["family"], r.get("dtype", "fp32")) not in sections:
            sections.append((r["family"], r.get("dtype", "fp32")))
    for family, dtype in sections:
        out += ["", f"## {family}, {dtype}", "",
                "| case | dir | ours ms (spread) | GFLOP/s | of mm | ours MB | peers: ms (speed-up, MB) | vs best |",
                "|---|---|---|---|---|---|---|---|"]
        for r in (r for r in rows if r["family"] == family and r.get("dtype", "fp32") == dtype):
            peer_text = "; ".join(
                f"{n} {p['ms']:.1f} ({p['speedup']:.2f}x, {_fmt_mem(p['mem_mb'])})" for n, p in r["peers"].items()
            ) or "none installed"
            best = f"**{r['speedup_vs_best']:.2f}x** {r['best_peer']}" if "best_peer" in r else "-"
            out.append(
                f"| {r['label']} | {r['direction']} | {r['ours_ms']:.1f} ({r['ours_min_ms']:.1f}–{r['ours_max_ms']:.1f}) | "
                f"{r['gflops']:.1f} | {r['fraction_of_mm']:.0%} | {_fmt_mem(r['ours_mem_mb'])} | {peer_text} | {best} |"
            )
    if plots:
        out += ["", "## Plots", ""] + [f"![{name}]({path})" for name, path in plots]
    if compile_section:
        out += ["", compile_section]
    return "\n".join(out) + "\n"


# Per-SM limits of the two targets (CUDA occupancy calculator's numbers).
_SM_LIMITS = {80: dict(smem=167936, regs=65536, warps=64, blocks=32),
              90: dict(smem=233472, regs=65536, warps=64, blocks=32)}


def theoretical_occupancy(arch: int, regs: int, smem: int, num_warps: int) -> float:
    """Resident warps / max warps per SM that registers and shared memory allow
    (registers allocated per warp in units of 256)."""
    limits = _SM_LIMITS[arch]
    regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256
    blocks = min(limits["regs"] // (regs_per_warp * num_warps),
                 limits["smem"] // smem if smem else limits["blocks"], limits["blocks"],
                 limits["warps"] // num_warps)
    return blocks * num_warps / limits["warps"]


def compile_report_section() -> str:
    """Runs the GPU compile gate in its own process (no TRITON_INTERPRET) and summarises it:
    one row per kernel and arch, then every spec that failed (all rows: its --json)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    head = ["## GPU compile report (ahead of time)", "",
            "Each Triton kernel config (`AOT_SPECS`) is compiled ahead of time for sm_80 and sm_90a with no GPU: "
            "registers and spills from `ptxas -v`, shared memory from the launch metadata, tensor-core use from "
            "`mma`/`wgmma` in the PTX (`python -m attnkernels.tools.compile_report`); theoretical occupancy = resident warps / 64 "
            "that those registers and that shared memory allow per SM. Exact-fp32 (`ieee`) "
            "configs have no tensor-core requirement.", ""]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "compile.json")
        try:
            subprocess.run([sys.executable, "-m", "attnkernels.tools.compile_report", "--json", path],
                           env=env, capture_output=True, text=True, timeout=3000)
            with open(path) as f:
                report = json.load(f)
        except (OSError, ValueError, subprocess.TimeoutExpired) as exc:
            return "\n".join(head + [f"compile report failed to run: {exc}"])
    summary, results = report["summary"], report["results"]
    head.append(f"{summary['specs']} specs, {summary['compiles']} compiles (triton {report['triton']}, ptxas {report['ptxas']}): "
                f"{summary['errors']} errors, **{summary['spills']} with spills**, {summary['missing_tensor_cores']} "
                f"dot kernels without tensor cores, {summary['smem_over_limit']} over the shared-memory limit. "
                + ("Gate: passed." if report["ok"] else "Gate: **failed** (listed below)."))
    head += ["", "| kernel | arch | configs | max regs | max smem (B) | theoretical occupancy (min–max) "
             "| tensor cores where required | with spills |", "|---|---|---|---|---|---|---|---|"]
    groups: dict = {}
    for r in results:
        groups.setdefault((r["kernel"], r["arch"]), []).append(r)
    for (kernel, arch), rs in sorted(groups.items()):
        dots = [r for r in rs if r["uses_dot"]]
        occupancy = [theoretical_occupancy(arch, r["regs"] or 0, r["smem"] or 0,
                                           int(re.search(r"\bw(\d+)", r["config"]).group(1))) for r in rs]
        head.append(f"| {kernel} | sm_{arch} | {len(rs)} | {max(r['regs'] or 0 for r in rs)} | "
                    f"{max(r['smem'] or 0 for r in rs)} | {min(occupancy):.0%}–{max(occupancy):.0%} | "
                    f"{sum(r['tensor_cores'] for r in dots)}/{len(dots)} | {sum(1 for r in rs if r['spills'])} |")
    failed = [r for r in results if r["status"] != "ok"]
    if failed:
        head += ["", "Failing configs:", "", "| spec | arch | regs | spill bytes | status |", "|---|---|---|---|---|"]
        head += [f"| {r['name']} | sm_{r['arch']} | {r['regs']} | {r['spills']} | {r['status']} |" for r in failed]
    return "\n".join(head) + "\n"


def gpu_sections(directory: str) -> str:
    return compile_report_section() + "\n" + gpu_check_section(directory) + "\n" + gpu_run_section(directory)


def gpu_check_section(directory: str) -> str:
    """The last `python -m benchmarks.gpu_check` run on a lent GPU (its JSON under `directory`), or why none."""
    path = os.path.join(directory, "gpu_check.json")
    out = ["## GPU check (`python -m benchmarks.gpu_check` on a lent GPU)", ""]
    if not os.path.exists(path):
        return "\n".join(out + ["No gpu_check run is recorded: no GPU was lent since the script exists "
                                "(its flow is tested on CPU under the Triton interpreter: tests/test_gpu_check.py).", ""])
    with open(path) as f:
        check = json.load(f)
    ver = check["versions"]
    out += [f"{ver['date']} on {ver['device']} (sm {ver.get('capability')}), torch {ver['torch']}, triton {ver['triton']}, "
            f"ptxas {ver['ptxas']}, CUDA {ver.get('cuda')}; bf16, B=2, H=16; medians of `triton.testing.do_bench`; "
            "ratio = peer time / ours.", ""]
    if "tests" in check:
        out += [f"GPU tests: {check['tests']['summary']}", ""]
    out += ["| case | N | D | dir | ours ms | TFLOP/s | peers: ms (ratio, max diff) |", "|---|---|---|---|---|---|---|"]
    for r in check["rows"]:
        peers_text = "; ".join(f"{n} {p['ms']:.3f} ({p['ratio']:.2f}x, "
                               f"{'n/a' if p['max_diff'] is None else format(p['max_diff'], '.1e')})"
                               for n, p in r["peers"].items()) or "-"
        out.append(f"| {r['case']} | {r['n']} | {r['d']} | {r['direction']} | {r['ours_ms']:.3f} | "
                   f"{r['ours_tflops']:.1f} | {peers_text} |")
    for name, kernels in check.get("kernels", {}).items():
        out += ["", f"Per-kernel device time ({name}): " + ", ".join(f"{k} {ms:.3f} ms" for k, ms in kernels.items())]
    return "\n".join(out) + "\n"


def gpu_run_section(directory: str) -> str:
    """The first borrowed-GPU run (before gpu_check existed), as its script and the GPU tests printed it."""
    bench_path = os.path.join(directory, "gpu_bench_h200.json")
    tests_path = os.path.join(directory, "gpu_tests_h200.log")
    out = ["## GPU runs (a borrowed H200, by hand)", ""]
    if not os.path.exists(bench_path):
        return "\n".join(out + ["No GPU timings exist: no GPU was lent for this run.", ""])
    with open(bench_path) as f:
        bench = json.load(f)
    if os.path.exists(tests_path):
        with open(tests_path) as f:
            last = [line.strip() for line in f if line.strip()][-1]
        out += [f"`pytest tests/test_gpu_attention.py tests/test_gpu_linear.py` on the GPU: {last} "
                f"(log: `{tests_path}`).", ""]
    out += [f"The first H200 run's script (replaced by gpu_check) on {bench['device']}, torch {bench['torch']}; bf16, B=2, H=16, D=128; "
            "`triton.testing.do_bench` medians; ratio = peer time / our time (below 1: we are slower). "
            "The linear row's peer is FlashAttention-2 (SDPA) causal, for scale only.", "",
            "| case | N | dir | ours ms | peer | peer ms | ratio | max abs diff vs peer |", "|---|---|---|---|---|---|---|---|"]
    for r in bench["rows"]:
        out.append(f"| {r['case']} | {r['n']} | {r['direction']} | {r['ours_ms']:.3f} | {r['peer']} | {r['peer_ms']:.3f} | "
                   f"{r['ratio']:.2f}x | {r['max_diff']:.1e} |")
    return "\n".join(out) + "\n"


def plots(rows, directory) -> list:
    """Time vs N per family (fp32 rows, and bf16 rows when there are any) and peak memory vs N."""
    written = []
    for dtype in ("fp32", "bf16"):
        dtype_rows = [r for r in rows if r.get("dtype", "fp32") == dtype]
        if dtype_rows:
            written += _time_plots(dtype_rows, directory, dtype)
    return written + _memory_plot([r for r in rows if r.get("dtype", "fp32") == "fp32"], directory)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots")
        return None
    return plt


def _time_plots(rows, directory, dtype) -> list:
    plt = _pyplot()
    if plt is None:
        return []
    os.makedirs(directory, exist_ok=True)
    written = []
    for direction in ("fwd", "fwd+bwd"):
        families = sorted({r["family"] for r in rows if r["direction"] == direction})
        if not families:
            continue
        fig, axes = plt.subplots(1, len(families), figsize=(4 * len(families), 3.6), squeeze=False)
        for ax, family in zip(axes[0], families):
            family_rows = [r for r in rows if r["family"] == family and r["direction"] == direction]
            series = {"attnkernels": [(r["seq_len"], r["ours_ms"]) for r in family_rows]}
            for r in family_rows:
                for name, p in r["peers"].items():
                    series.setdefault(name, []).append((r["seq_len"], p["ms"]))
            for name, points in series.items():
                points = sorted(dict(points).items())  # one point per N (first swept value)
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name,
                        linewidth=2.5 if name == "attnkernels" else 1.2)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(family)
            ax.set_xlabel("N")
            ax.set_ylabel("ms")
            ax.legend(fontsize=7)
        fig.suptitle(f"CPU {dtype} time vs N ({direction})")
        fig.tight_layout()
        suffix = "" if dtype == "fp32" else f"_{dtype}"
        path = os.path.join(directory, f"bench_time_{direction.replace('+', '_')}{suffix}.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append((f"time vs N, {dtype}, {direction}", path))
    return written


def _memory_plot(rows, directory) -> list:
    """Peak memory: fused kernels vs the materialising baselines (masked SDPA / performer / HF BigBird)."""
    plt = _pyplot()
    if plt is None or not rows:
        return []
    os.makedirs(directory, exist_ok=True)
    families = sorted({r["family"] for r in rows})
    fig, ax = plt.subplots(figsize=(6, 4))
    for family in families:
        family_rows = [r for r in rows if r["family"] == family and r["direction"] == "fwd+bwd" and r["ours_mem_mb"] is not None]
        points = sorted(dict((r["seq_len"], r["ours_mem_mb"]) for r in family_rows).items())
        if points:
            ax.plot([p[0] for p in points], [max(p[1], 0.1) for p in points], marker="o", label=f"{family} (ours)")
        for peer in ("masked_sdpa", "performer", "hf_bigbird"):
            peer_points = sorted(dict((r["seq_len"], r["peers"][peer]["mem_mb"]) for r in family_rows
                                      if peer in r["peers"] and r["peers"][peer]["mem_mb"] is not None).items())
            if peer_points:
                ax.plot([p[0] for p in peer_points], [max(p[1], 0.1) for p in peer_points], linestyle="--", marker="x",
                        label=f"{family}: {peer}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("N")
    ax.set_ylabel("peak extra MB (fwd+bwd)")
    ax.legend(fontsize=6)
    fig.tight_layout()
    path = os.path.join(directory, "bench_memory.png")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return [("peak memory vs N", path)]


def _merge_rows(saved: dict, rows: list, meta: dict) -> list:
    """saved["rows"] with the sections (family, dtype) of `rows` replaced by `rows`, in the saved order (new
    sections last); the update is recorded in saved["meta"]["updates"] (rendered under the header)."""
    measured = {(r["family"], r.get("dtype", "fp32")) for r in rows}
    merged, placed = [], set()
    for r in saved["rows"]:
        section = (r["family"], r.get("dtype", "fp32"))
        if section not in measured:
            merged.append(r)
        elif section not in placed:
            merged += [n for n in rows if (n["family"], n.get("dtype", "fp32")) == section]
            placed.add(section)
    merged += [n for n in rows if (n["family"], n.get("dtype", "fp32")) not in placed]
    saved["meta"].setdefault("updates", []).append(dict(
        date=meta["date"], sections=sorted(f"{f}, {d}" for f, d in measured), build=meta["build"]))
    return merged


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, 3 rounds (under ~5 minutes)")
    parser.add_argument("--output", default="BENCHMARKS.md")
    parser.add_argument("--plots-dir", default="docs")
    parser.add_argument("--json", help="also write the raw rows here")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--dtypes", default="fp32,bf16", help=f"comma-separated, of {list(DTYPES)} (peers run in the same dtype)")
    parser.add_argument("--decode-kv-lens", help="comma-separated cache lengths of the decode rows (default: the plan's)")
    parser.add_argument("--decode-batches", help="comma-separated batch sizes of the decode rows (default: the plan's)")
    parser.add_argument("--sizes", help="comma-separated sequence lengths of the dense, causal, window, bigbird and "
                                        "linear rows (default: the plan's)")
    parser.add_argument("--families", help="comma-separated: measure only these families (e.g. modifiers,decode)")
    parser.add_argument("--render", metavar="JSON",
                        help="re-write BENCHMARKS.md and the plots from the rows a run saved with --json (no timing)")
    parser.add_argument("--update", metavar="JSON",
                        help="measure only --families (in --dtypes), replace those sections' rows in the rows a run saved "
                             "with --json (same --quick and --threads), save them back and re-write BENCHMARKS.md")
    parser.add_argument("--tables-only", action="store_true",
                        help="write the header, the gate and the measured tables only (no plots, no GPU sections): "
                             "a focused document under docs/")
    args = parser.parse_args(argv)
    saved = None
    if args.update:
        with open(args.update) as f:
            saved = json.load(f)
        if not args.families:
            parser.error("--update: name the families to re-measure with --families")
        if saved["meta"]["quick"] != args.quick or saved["meta"]["threads"] != args.threads:
            parser.error(f"--update: {args.update} was measured with quick={saved['meta']['quick']}, threads="
                         f"{saved['meta']['threads']}; re-measure with the same flags (got quick={args.quick}, "
                         f"threads={args.threads})")
    if args.render:
        with open(args.render) as f:
            saved = json.load(f)
        written = [] if args.tables_only else plots(saved["rows"], args.plots_dir)
        with open(args.output, "w") as f:
            f.write(markdown(saved["meta"], saved["gate"], saved["rows"],
                             "" if args.tables_only else gpu_sections(args.plots_dir), written))
        print(f"re-wrote {args.output} from {args.render}")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from tqdm import tqdm

    gate = correctness_gate()
    print("correctness gate:", json.dumps({k: f"{v:.1e}" for k, v in gate.items()}))
    dtypes = [DTYPES[d.strip()] for d in args.dtypes.split(",") if d.strip()]
    plan = []
    rounds = 3 if args.quick else 7
    decode_lens = [int(x) for x in args.decode_kv_lens.split(",")] if args.decode_kv_lens else None
    decode_batches = [int(x) for x in args.decode_batches.split(",")] if args.decode_batches else None
    sizes = [int(x) for x in args.sizes.split(",")] if args.sizes else None
    for dtype in dtypes:
        if args.quick:
            dense_sizes = [512, 1024] if dtype == torch.float32 else [1024, 4096]  # bf16: the N=4096 too
            plan += [dense_cases(sizes or dense_sizes, False, dtype), dense_cases(sizes or dense_sizes, True, dtype),
                     window_cases(sizes or [1024, 2048], [128], dtype=dtype),
                     bigbird_cases(sizes or [1024, 2048], [3], dtype=dtype),
                     linear_cases(sizes or [1024, 4096], True, dtype), linear_cases(sizes or [1024, 4096], False, dtype),
                     favor_cases(sizes or [1024, 4096], dtype=dtype),
                     decode_cases(decode_lens or [4096], decode_batches or [1], dtype), varlen_cases(2048, 8, dtype),
                     modifier_cases(2048, dtype, window=512)]
        else:
            dense_sizes = [1024, 4096, 16384] if dtype != torch.float32 else [1024, 2048, 4096]
            # --sizes replaces the plan's lengths and drops its extra window / block variants at one length
            variants = [] if sizes else [window_cases([4096], [64, 1024], dtype=dtype),
                                         window_cases([65536], [256], flex=False, dtype=dtype),
                                         bigbird_cases([4096], [1, 8], dtype=dtype)]
            plan += [dense_cases(sizes or dense_sizes, False, dtype), dense_cases(sizes or dense_sizes, True, dtype),
                     window_cases(sizes or [1024, 4096, 16384], [256], dtype=dtype),
                     bigbird_cases(sizes or [1024, 4096, 16384], [3], dtype=dtype), *variants,
                     linear_cases(sizes or [1024, 4096, 16384, 65536], True, dtype),
                     linear_cases(sizes or [1024, 4096, 16384, 65536], False, dtype),
                     favor_cases(sizes or [1024, 4096, 16384], dtype=dtype),
                     decode_cases(decode_lens or [4096, 32768, 131072], decode_batches or [1, 8], dtype),
                     varlen_cases(16384, 8, dtype),
                     modifier_cases(4096, dtype)]
    if args.families:  # filtered before the generators run, so skipped families allocate nothing
        wanted = {f.strip() for f in args.families.split(",")}
        plan = [gen for gen in plan if wanted & CASE_FAMILIES[gen.__name__]]
    cases = [c for gen in plan for c in gen]
    rows = []
    for case in tqdm(cases, desc="benchmarks", unit="case"):
        if gate.get(case.family, 0.0) >= GATE_TOLERANCE:
            print(f"skipping {case.family}: failed the correctness gate")
            continue
        rows.append(measure(case, rounds))
    import triton

    from attnkernels import _cpu_backend

    meta = dict(
        quick=args.quick, date=datetime.date.today().isoformat(), machine=cpu_description(),
        cores=os.cpu_count(), threads=torch.get_num_threads(), torch=torch.__version__, triton=triton.__version__,
        python=platform.python_version(), capability=torch.backends.cpu.get_cpu_capability(),
        build=_cpu_backend.load().capability, gemm_paths=_gemm_paths(),
        mm_gflops={d: statistics.median(r["mm_gflops"] for r in rows if r["dtype"] == d)
                   for d in dict.fromkeys(r["dtype"] for r in rows)},
    )
    if saved is not None:  # the re-measured sections replace theirs; every other section keeps its saved rows
        rows, meta, args.json = _merge_rows(saved, rows, meta), saved["meta"], args.json or args.update
    if args.json:  # first, so that a failure below loses no measurement (--render rewrites from it)
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, gate=gate, rows=rows), f, indent=1)
    written = [] if args.tables_only else plots(rows, args.plots_dir)
    with open(args.output, "w") as f:
        f.write(markdown(meta, gate, rows, "" if args.tables_only else gpu_sections(args.plots_dir), written))
    print(f"wrote {args.output} and {len(written)} plots under {args.plots_dir}/")
    return 0 if all(e < GATE_TOLERANCE for e in gate.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
