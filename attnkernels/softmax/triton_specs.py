"""Ahead-of-time compile declarations of the Triton softmax-attention kernels: `AOT_SPECS`,
which `python -m attnkernels.tools.compile_report` compiles for sm_80 and sm_90a. Tiles come
from the launcher's own `block_config`, so the gate compiles what ships."""
from __future__ import annotations

import dataclasses

import torch

from ..triton_common import TRITON_DTYPE, KernelSpec, divisibility, pad_dim, signature
from .triton_kernels import attn_bwd_dkdv, attn_bwd_dq, attn_bwd_preprocess, attn_decode, attn_decode_combine, attn_fwd
from .triton_launch import (ARCHS, DECODE_COMBINE_WARPS, DECODE_MAX_SPLITS, PREPROCESS_BLOCK_M, block_config,
                            decode_combine_block_s, decode_config, dkdv_passes)

__all__ = ["AOT_DOTS", "AOT_SPECS"]

# argument typing, by the naming convention of triton_kernels.py: data tensors upper-case,
# LSE/DELTA float32, tables int32, KPM uint8; strides and sizes i32
# (the score modifiers: SLOPES, DBIAS float32, SEED int64, BIAS in the data dtype)
_TYPES = dict(int_args={"Hq", "Hk", "Nq", "Nk", "group", "window_left", "window_right", "dropout_threshold"},
              fp32_args={"qk_scale", "scale", "cap_in", "cap_out", "dropout_rscale"},
              fp32_ptrs={"LSE", "DELTA", "SLOPES", "DBIAS"},
              i32_ptrs={"KV_NUM", "KV_IDX", "Q_NUM", "Q_IDX"}, u8_ptrs={"KPM"}, i64_ptrs={"SEED"})
# table, key-padding and bias strides are arbitrary: no divisibility assumed for them
_ARBITRARY_STRIDES = ("stride_t", "stride_kpm", "stride_bias")
_MODIFIERS_OFF = dict(HAS_SOFTCAP=False, HAS_ALIBI=False, HAS_BIAS=False, HAS_DROPOUT=False)
_MODIFIER_NAMES = dict(softcap="HAS_SOFTCAP", alibi="HAS_ALIBI", attn_bias="HAS_BIAS", dropout="HAS_DROPOUT")

# score-modifier variants (on the causal mask): (name, flags); the dQ kernel also stores
# dbias where there is a bias. 16-bit dtypes, the head dims below.
_AOT_MODIFIER_VARIANTS = [
    ("causal-softcap-alibi", dict(HAS_SOFTCAP=True, HAS_ALIBI=True)),
    ("causal-bias", dict(HAS_BIAS=True)),
    ("causal-dropout", dict(HAS_DROPOUT=True)),
    ("causal-all", dict(HAS_SOFTCAP=True, HAS_ALIBI=True, HAS_BIAS=True, HAS_DROPOUT=True)),
]
_AOT_MODIFIER_HEAD_DIMS = (64, 128)
_AOT_MODIFIER_DTYPES = [("bf16", torch.bfloat16, "tf32")]  # fp16 compiles alike
# exact fp32 (CUDA cores, the fp32 tiles of the plain kernels, already the smallest): every
# modifier at D = 64 is spill-free; at D = 128 the sm_90a dK/dV and dQ spill 16 and 12 bytes
# with all four modifiers on (Triton 3.8), so that one is not a shipped spec yet
_AOT_MODIFIER_FP32 = [(64, "causal-all")]

# mask variants that ship: (name, HAS_LEFT, HAS_RIGHT, IS_SPARSE, HAS_KPM)
_AOT_VARIANTS = [
    ("dense", False, False, False, False),
    ("causal", False, True, False, False),
    ("window", True, True, False, False),
    ("sparse-window-kpm", True, True, True, True),
]
_AOT_SPARSE_BLOCK = 128
_AOT_HEAD_DIMS = (32, 64, 128, 256)
# `--quick` compiles, per kernel and dtype, the variant with every feature on (all code paths)
_AOT_QUICK_HEAD_DIM, _AOT_QUICK_VARIANT = 128, "sparse-window-kpm"
# (label, torch dtype, dot precision); fp32 ships exact ("ieee", CUDA cores) and TF32
_AOT_DTYPES = [
    ("fp16", torch.float16, "tf32"),
    ("bf16", torch.bfloat16, "tf32"),
    ("fp32", torch.float32, "ieee"),
    ("tf32", torch.float32, "tf32"),
]


def _sm90_waiver(kernel: str, cfg, d: int) -> tuple:
    """A wgmma needs >= 64 rows per warpgroup; a tile with fewer on sm_90a runs on mma.sync,
    said so in the gate (a note only: the gate counts it where the PTX has mma.sync). No
    16-bit kernel uses it today: the D = 256 backward, where a wgmma-sized tile's two dK/dV
    accumulators spill, runs dK and dV as two launches (`BlockConfig.split_dkdv`), and the
    D = 256 forward's 64 rows on 8 warps compile to wgmma."""
    rows = cfg.block_n if kernel == "dkdv" else cfg.block_m  # the rows of the resident operand
    if rows // max(1, cfg.num_warps // 4) >= 64:
        return ()
    return (("mma.sync-sm90", f"{rows}-row {kernel} tile on {cfg.num_warps} warps at D={d}: under 64 rows "
             "per warpgroup (larger tiles spill)"),)


# Tiles whose loop body does >= 2x the MMA work its dots need ("dup-mma", compile gate): the
# tile has fewer 16-row mma slices than warps, and Triton gives the spare warps copies of the
# same product (a dot feeding another dot keeps its warps along M only). Keyed by (kernel,
# dtype label, head dim, BLOCK_M, BLOCK_N, warps) -> the measured reason, so a retuned tile
# drops its waiver. None today: every shipped tile is under 2x (`block_config`, `_TF32_CONFIGS`).
_DUP_MMA_KNOWN: dict[tuple, str] = {}


def _dup_mma_waiver(kernel: str, label: str, d: int, cfg) -> tuple:
    reason = _DUP_MMA_KNOWN.get((kernel, label, d, cfg.block_m, cfg.block_n, cfg.num_warps))
    return (("dup-mma", f"{cfg.block_m}x{cfg.block_n} {kernel} tile on {cfg.num_warps} warps: {reason}"),) \
        if reason else ()


def _loop_dots(kernel: str, bm: int, bn: int, d: int, dv: int, with_dk: bool = True, with_dv: bool = True) -> tuple:
    """(M, N, K) of each tl.dot in one iteration of the kernel's inner loop (triton_kernels.py
    `_fwd_tiles`, `_dkdv_tiles`, `_dq_tiles`), for the compile gate's MMA-work check. d, dv:
    the padded head dims (BLOCK_D, BLOCK_DV); with_dk / with_dv: the dK/dV kernel's
    WITH_DK / WITH_DV (a split launch does only its gradient's dots, and s^T)."""
    if kernel == "fwd":  # s = q k^T; acc += p v
        return ((bm, bn, d), (bm, dv, bn))
    if kernel == "dkdv":  # s^T = k q^T; dv += p^T do; dp^T = v do^T; dk += ds^T q
        return ((bn, bm, d),) + (((bn, dv, bm),) if with_dv else ()) + (((bn, bm, dv), (bn, d, bm)) if with_dk else ())
    # dq: s = q k^T; dp = do v^T; dq += ds k
    return ((bm, bn, d), (bm, bn, dv), (bm, d, bn))


def _spec(name, fn, dtype_label, tdt, const, **kw) -> KernelSpec:
    sig = signature(fn, tdt, const, **_TYPES)
    if const.get("HAS_BIAS"):
        # a bias with a contiguous key dim: the JIT specializes its stride 1 as a constant
        sig["stride_biasn"] = "constexpr"
        const = dict(const, stride_biasn=1)
    return KernelSpec(name, fn, sig, const, attrs=divisibility(sig, _ARBITRARY_STRIDES), dtype=dtype_label, **kw)


def _kernel_specs(kernel, fn, label, dtype, prec, d, variant, has_left, has_right, is_sparse, has_kpm, modifiers,
                  quick=False) -> list[KernelSpec]:
    """The specs of one kernel, dtype, head dim and variant: one for every arch where the
    launcher's config is shared, else one per arch."""
    tdt = TRITON_DTYPE[dtype]
    uses_tc = prec != "ieee"  # an fp32 "ieee" dot runs on CUDA cores (FMA), by design: no mma expected
    sparse_block = _AOT_SPARSE_BLOCK if is_sparse else 0
    names = frozenset(n for n, flag in _MODIFIER_NAMES.items() if modifiers.get(flag))
    cfgs = {arch: block_config(kernel, d, d, dtype, sparse_block, arch, names, prec) for arch in ARCHS}
    per_arch = [(None, cfgs[ARCHS[0]])] if len(set(cfgs.values())) == 1 else list(cfgs.items())
    specs = []
    for arch, cfg in per_arch:
        const = dict(HEAD_DIM=d, HEAD_DIM_V=d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                     BLOCK_D=pad_dim(d), BLOCK_DV=pad_dim(d),
                     HAS_LEFT=has_left, HAS_RIGHT=has_right, IS_SPARSE=is_sparse,
                     SPARSE_BLOCK=sparse_block, HAS_KPM=has_kpm, DOT_PREC=prec,
                     TABLE_SKIP=cfg.table_skip, **{**_MODIFIERS_OFF, **modifiers})
        if kernel == "dq":
            const["STORE_DBIAS"] = const["HAS_BIAS"]
        name = f"{fn.__name__}-{label}-D{d}-{variant}-M{cfg.block_m}-N{cfg.block_n}"
        name += f"-sm{arch}" if arch else ""
        passes = dkdv_passes(cfg) if kernel == "dkdv" else ((None, None),)
        for with_dk, with_dv in passes:
            part = dict(WITH_DK=with_dk, WITH_DV=with_dv) if kernel == "dkdv" else {}
            suffix = "" if len(passes) == 1 else ("-dk" if with_dk else "-dv")  # a split dK/dV launch
            specs.append(_spec(name + suffix, fn, label, tdt, dict(const, **part),
                               num_warps=cfg.num_warps, num_stages=cfg.num_stages, maxnreg=cfg.maxnreg,
                               uses_dot=uses_tc, archs=(arch,) if arch else None,
                               waive=(_sm90_waiver(kernel, cfg, d) if arch in (None, 90) else ())
                               + _dup_mma_waiver(kernel, label, d, cfg), quick=quick))
    return specs


def _build_aot_specs() -> list[KernelSpec]:
    specs = []
    kernels = (("fwd", attn_fwd), ("dkdv", attn_bwd_dkdv), ("dq", attn_bwd_dq))
    for label, dtype, prec in _AOT_DTYPES:
        tdt = TRITON_DTYPE[dtype]
        for d in _AOT_HEAD_DIMS:
            if label != "tf32":  # the preprocess has no dot: one per storage dtype
                const = dict(HEAD_DIM_V=d, BLOCK_M=PREPROCESS_BLOCK_M, BLOCK_DV=pad_dim(d))
                specs.append(_spec(f"attn_bwd_preprocess-{label}-D{d}", attn_bwd_preprocess, label, tdt, const,
                                   num_warps=4, num_stages=1, uses_dot=False, quick=d == _AOT_QUICK_HEAD_DIM))
            for variant, has_left, has_right, is_sparse, has_kpm in _AOT_VARIANTS:
                for kernel, fn in kernels:
                    specs += _kernel_specs(kernel, fn, label, dtype, prec, d, variant, has_left, has_right, is_sparse,
                                           has_kpm, {},
                                           quick=d == _AOT_QUICK_HEAD_DIM and variant == _AOT_QUICK_VARIANT)
    # the score modifiers. `--quick` keeps the plain kernels' representatives; where a modifier
    # tile makes a (kernel, dtype, archs) group of its own, "causal-all" (every modifier) is it
    plain_groups = {(s.fn.__name__, s.dtype, s.archs) for s in specs}
    for label, dtype, prec in _AOT_MODIFIER_DTYPES:
        for d in _AOT_MODIFIER_HEAD_DIMS:
            for variant, modifiers in _AOT_MODIFIER_VARIANTS:
                for kernel, fn in kernels:
                    for spec in _kernel_specs(kernel, fn, label, dtype, prec, d, variant, False, True, False, False,
                                              modifiers):
                        own_group = (spec.fn.__name__, spec.dtype, spec.archs) not in plain_groups
                        specs.append(dataclasses.replace(spec, quick=own_group and variant == "causal-all"))
    for d, variant in _AOT_MODIFIER_FP32:
        for kernel, fn in kernels:
            specs += _kernel_specs(kernel, fn, "fp32", torch.float32, "ieee", d, variant, False, True, False, False,
                                   dict(_AOT_MODIFIER_VARIANTS)[variant])
    return specs


# ----------------------------------------------------------------------------------------
# Decode (attn_decode, attn_decode_combine): `decode_config` tiles, one spec per distinct
# tile of the row counts below, for each dtype, head dim and variant
# ----------------------------------------------------------------------------------------

_DECODE_TYPES = dict(int_args={"Hq", "Hk", "Nq", "capacity", "group", "num_splits", "window_left", "window_right"},
                     fp32_args={"qk_scale", "cap_in", "cap_out"},
                     fp32_ptrs={"LSE", "WS_M", "WS_L", "WS_ACC", "SLOPES"}, i32_ptrs={"SEQLENS", "BLOCK_TABLE"})
_DECODE_DTYPES = [("fp16", torch.float16, "tf32"), ("bf16", torch.bfloat16, "tf32"), ("fp32", torch.float32, "ieee")]
_DECODE_HEAD_DIMS = (64, 128, 256)
# (Hq / Hk) * Nq rows per kv head: group 1 x Nq 1, group 4 x Nq 1, group 4 x Nq 16, group 8 x Nq 16
_DECODE_ROWS = (1, 4, 64, 128)
_DECODE_PAGE = 16  # the smallest page size: the most page lookups per tile
# (name, HAS_LEFT, HAS_RIGHT, IS_PAGED, IS_SPLIT, HAS_SOFTCAP, HAS_ALIBI)
_DECODE_VARIANTS = [
    ("dense", False, False, False, False, False, False),
    ("causal-split", False, True, False, True, False, False),
    ("paged-window-softcap-alibi-split", True, True, True, True, True, True),
]
# No waiver: every 16-bit decode tile keeps 64 rows per warpgroup (the D = 256 tile's 8 warps
# split the columns), so sm_90a runs wgmma for all of them; the gate fails one that does not.


def _decode_specs() -> list[KernelSpec]:
    specs = []
    for label, dtype, prec in _DECODE_DTYPES:
        tdt = TRITON_DTYPE[dtype]
        for d in _DECODE_HEAD_DIMS:
            # (arch or None when both archs share the tile, config)
            per_rows = [{arch: decode_config(d, d, dtype, rows, arch) for arch in ARCHS} for rows in _DECODE_ROWS]
            tiles = sorted({(None, c[ARCHS[0]]) if len(set(c.values())) == 1 else (arch, c[arch])
                            for c in per_rows for arch in ARCHS}, key=lambda t: (t[0] or 0, t[1]))
            for arch, cfg in tiles:
                for variant, has_left, has_right, is_paged, is_split, softcap, alibi in _DECODE_VARIANTS:
                    const = dict(HEAD_DIM=d, HEAD_DIM_V=d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                                 BLOCK_D=pad_dim(d), BLOCK_DV=pad_dim(d), HAS_LEFT=has_left, HAS_RIGHT=has_right,
                                 IS_PAGED=is_paged, PAGE_SIZE=_DECODE_PAGE if is_paged else 1, IS_SPLIT=is_split,
                                 DOT_PREC=prec, HAS_SOFTCAP=softcap, HAS_ALIBI=alibi)
                    sig = signature(attn_decode, tdt, const, **_DECODE_TYPES)
                    name = f"attn_decode-{label}-D{d}-{variant}-M{cfg.block_m}-N{cfg.block_n}"
                    specs.append(KernelSpec(
                        name + (f"-sm{arch}" if arch else ""), attn_decode, sig, const,
                        attrs=divisibility(sig, ("stride_btb",)), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                        maxnreg=cfg.maxnreg,
                        uses_dot=prec != "ieee", dtype=label, archs=(arch,) if arch else None,
                        quick=d == 128 and variant.startswith("paged") and cfg.block_m == 64))
            const = dict(HEAD_DIM_V=d, BLOCK_DV=pad_dim(d), BLOCK_S=decode_combine_block_s(DECODE_MAX_SPLITS))
            sig = signature(attn_decode_combine, tdt, const, **_DECODE_TYPES)
            specs.append(KernelSpec(f"attn_decode_combine-{label}-D{d}", attn_decode_combine, sig, const,
                                    attrs=divisibility(sig), num_warps=DECODE_COMBINE_WARPS, num_stages=1,
                                    uses_dot=False, dtype=label, quick=d == 128))
    return specs


AOT_SPECS: list[KernelSpec] = _build_aot_specs() + _decode_specs()
_KERNEL_OF = {attn_fwd: "fwd", attn_bwd_dkdv: "dkdv", attn_bwd_dq: "dq"}
# spec name -> the dots of its loop body (compile_report's MMA-work check)
AOT_DOTS: dict[str, tuple] = {
    s.name: _loop_dots(_KERNEL_OF[s.fn], s.constexprs["BLOCK_M"], s.constexprs["BLOCK_N"],
                       s.constexprs["BLOCK_D"], s.constexprs["BLOCK_DV"],
                       s.constexprs.get("WITH_DK", True), s.constexprs.get("WITH_DV", True))
    for s in AOT_SPECS if s.fn in _KERNEL_OF}
# decode: s = q k^T; acc += p v, the rows padded to BLOCK_M (the padding is the tile's, not
# a duplicate: the gate's ratio stays 1 unless Triton copies the product across warps)
AOT_DOTS.update({
    s.name: ((s.constexprs["BLOCK_M"], s.constexprs["BLOCK_N"], s.constexprs["BLOCK_D"]),
             (s.constexprs["BLOCK_M"], s.constexprs["BLOCK_DV"], s.constexprs["BLOCK_N"]))
    for s in AOT_SPECS if s.fn is attn_decode})
