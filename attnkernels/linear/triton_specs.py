"""Ahead-of-time compile declarations of the Triton linear-attention kernels: `AOT_SPECS`,
which `python -m attnkernels.tools.compile_report` compiles for sm_80 and sm_90a. Tiles,
warps and stages come from the launcher's own `chunk_config`, and the constexprs are the
ones `triton_launch` passes, so the gate compiles what ships.

Kernels (triton_kernels.py): `linear_chunk_state` as the forward state pass ("state-fwd",
on (φ(k), v); causal stores every chunk's entering state) and as the backward's reverse
pass ("state-rev", on (φ(q), g, c) over the GQA group); `linear_chunk_fwd` (output pass;
"fwd-den" is the backward's recompute that also writes den); `linear_chunk_bwd_dq`;
`linear_chunk_bwd_dkdv`.
"""
from __future__ import annotations

import torch

from ..triton_common import TRITON_DTYPE, KernelSpec, divisibility, signature
from .triton_kernels import (FEATURE_MAPS, linear_chunk_bwd_dkdv, linear_chunk_bwd_dq, linear_chunk_fwd,
                             linear_chunk_state)
from .triton_launch import chunk_config, split_phi

__all__ = ["AOT_DOTS", "AOT_SPECS"]

# argument typing, by the naming convention of triton_kernels.py: data tensors upper-case in
# the input dtype; states, weights and per-row DEN/CP float32; strides and sizes i32 (every
# stride is divisible by 16 at launch on the shipping layouts: `divisibility` marks them all)
_TYPES = dict(int_args={"Hq", "Hk", "N", "Nq", "Nk", "group", "n_state"}, fp32_args={"scale", "eps"},
              fp32_ptrs={"W", "S_IN", "Z_IN", "H", "HZ", "S_OUT", "Z_OUT", "DEN", "CP", "DH", "DHZ", "RINV"})

_AOT_HEAD_DIMS = (64, 128)
ARCHS = (80, 90)  # the launcher's config families (triton_launch.device_arch)
_AOT_QUICK = (64, True, "elu", True)  # (D, causal, map, normalize) of each group's --quick spec
# (label, torch dtype, dot precision): fp32 ships exact ("ieee": FMA on CUDA cores, no mma by
# design) and TF32 (torch.backends.cuda.matmul.allow_tf32); 16-bit inputs dot on 16-bit operands
_AOT_DTYPES = [
    ("fp16", torch.float16, "tf32"),
    ("bf16", torch.bfloat16, "tf32"),
    ("fp32", torch.float32, "ieee"),
    ("tf32", torch.float32, "tf32"),
]
# (feature map, normalize) variants: every map with the denominator, and elu without it;
# the TF32 label ships the same code as fp32, so it is compiled for the default one only
_AOT_MAPS = [("elu", True), ("relu", True), ("identity", True), ("elu", False)]


# Tiles at >= 2x the minimum MMA work ("dup-mma", compile gate), with the measured reason,
# keyed by (kernel, padded D, arch, warps), so a retuned tile drops its waiver. None today:
# sm_80's 16-bit causal passes, whose intra-chunk [C, C] product feeds another dot (Triton
# then lays every warp along the C = 64 rows), run on 4 warps (chunk_config), 1.0x.
_DUP_MMA_KNOWN: dict[tuple, str] = {}


def _dup_mma_waiver(kernel: str, label: str, d: int, causal: bool, arch, cfg) -> tuple:
    base = "fwd" if kernel == "fwd-den" else kernel
    reason = _DUP_MMA_KNOWN.get((base, d, arch, cfg.num_warps)) if causal and label in ("fp16", "bf16") else None
    return (("dup-mma", f"C{cfg.block_c} {kernel} on {cfg.num_warps} warps, causal: {reason}"),) if reason else ()


def _kernel_constexprs(kernel: str, d: int, fm: str, causal: bool, normalize: bool, dtype, prec: str, arch: int) -> tuple:
    """(fn, constexprs, config) of one kernel as the launchers call it, for D = Dv = d."""
    base = "state" if kernel.startswith("state") else ("fwd" if kernel == "fwd-den" else kernel)
    cfg = chunk_config(base, d, d, dtype, causal, prec, arch)
    fm_id = FEATURE_MAPS[fm]
    const = dict(HEAD_DIM=d, HEAD_DIM_V=d, BLOCK_C=cfg.block_c, FEATURE_MAP=fm_id, DOT_PREC=prec)
    if kernel == "state-fwd":
        return linear_chunk_state, dict(const, BLOCK_M=cfg.block_m, BLOCK_V=cfg.block_v, REVERSE=False,
                                        STORE_CHUNKS=causal, STORE_FINAL=True, HAS_STATE_IN=True, HAS_Z=True,
                                        HAS_W=False, SPLIT_PHI=split_phi(dtype, fm_id)), cfg
    if kernel == "state-rev":
        return linear_chunk_state, dict(const, BLOCK_M=cfg.block_m, BLOCK_V=cfg.block_v, REVERSE=True,
                                        STORE_CHUNKS=causal, STORE_FINAL=not causal, HAS_STATE_IN=False,
                                        HAS_Z=normalize, HAS_W=normalize, SPLIT_PHI=False), cfg
    const.update(BLOCK_D=cfg.block_m, BLOCK_DV=cfg.block_v, CAUSAL=causal, NORMALIZE=normalize)
    if kernel in ("fwd", "fwd-den"):
        return linear_chunk_fwd, dict(const, WRITE_DEN=kernel == "fwd-den"), cfg
    if kernel == "dq":
        return linear_chunk_bwd_dq, const, cfg
    return linear_chunk_bwd_dkdv, dict(const, BLOCK_T=cfg.block_t), cfg


def _variants(maps):
    """(kernel, map, causal, normalize) of every shipping launch."""
    out = []
    for causal in (True, False):
        for fm, normalize in maps:
            if normalize:  # the forward state pass does not depend on normalize
                out.append(("state-fwd", fm, causal, True))
            out += [(kernel, fm, causal, normalize) for kernel in ("fwd", "dq", "dkdv")]
        # the reverse pass and the den recompute: φ only changes an elementwise prologue
        out += [("state-rev", "elu", causal, True), ("state-rev", "elu", causal, False), ("fwd-den", "elu", causal, True)]
    return out


def _build_aot_specs() -> list[KernelSpec]:
    specs = []
    for label, dtype, prec in _AOT_DTYPES:
        tdt = TRITON_DTYPE[dtype]
        uses_tc = prec != "ieee"
        maps = _AOT_MAPS[:1] if label == "tf32" else _AOT_MAPS
        for d in _AOT_HEAD_DIMS:
            for kernel, fm, causal, normalize in _variants(maps):
                built = {arch: _kernel_constexprs(kernel, d, fm, causal, normalize, dtype, prec, arch) for arch in ARCHS}
                # one spec for both archs where the launcher's configs agree, else one per arch
                same = len({(repr(c), cfg) for _, c, cfg in built.values()}) == 1
                for arch in (ARCHS[-1:] if same else ARCHS):
                    fn, const, cfg = built[arch]
                    mode = "-causal" if causal else "-full"
                    norm = "" if normalize else "-nonorm"
                    tile = f"C{cfg.block_c}-M{cfg.block_m}-V{cfg.block_v}" + ("" if same else f"-sm{arch}")
                    name = f"linear_{kernel}-{label}-D{d}{mode}-{fm}{norm}-{tile}"
                    quick = (d, causal, fm, normalize) == _AOT_QUICK
                    sig = signature(fn, tdt, const, **_TYPES)
                    specs.append(KernelSpec(name, fn, sig, const, attrs=divisibility(sig), num_warps=cfg.num_warps,
                                            num_stages=cfg.num_stages, maxnreg=cfg.maxnreg, uses_dot=uses_tc,
                                            dtype=label, quick=quick, archs=None if same else (arch,),
                                            waive=_dup_mma_waiver(kernel, label, d, causal, None if same else arch,
                                                                  cfg)))
    return specs


AOT_SPECS: list[KernelSpec] = _build_aot_specs()


def _dots(spec: KernelSpec) -> tuple:
    """(M, N, K) of each tl.dot in one iteration of the kernel's innermost loop that holds
    dots, or of the whole kernel where none does (triton_kernels.py), for the compile gate's
    MMA-work check (compile_report `mma_per_body`): the state pass's group loop, the causal
    dk/dv's group loop; the output and dq passes and the non-causal dk/dv have no loop."""
    c = spec.constexprs
    ch = c["BLOCK_C"]
    if spec.fn is linear_chunk_state:  # S += φ(x)ᵀ y per (chunk, head), and its lo part with SPLIT_PHI
        return ((c["BLOCK_M"], c["BLOCK_V"], ch),) * (2 if c["SPLIT_PHI"] else 1)
    d, dv = c["BLOCK_D"], c["BLOCK_DV"]
    if spec.fn is linear_chunk_fwd:  # φq S; causal: A = tril(φq φkᵀ), + A v
        return ((ch, dv, d),) + (((ch, ch, d), (ch, dv, ch)) if c["CAUSAL"] else ())
    if spec.fn is linear_chunk_bwd_dq:  # g Sᵀ; causal: P = g vᵀ, + P φk
        return ((ch, d, dv),) + (((ch, ch, dv), (ch, d, ch)) if c["CAUSAL"] else ())
    t = c["BLOCK_T"]
    if c["CAUSAL"]:  # per query head: Pᵀ = v gᵀ, dφk += Pᵀ φq, Aᵀ = φk φqᵀ, dv += Aᵀ g
        return ((ch, ch, dv), (ch, t, ch), (ch, ch, d), (ch, t, ch))
    return ((ch, t, dv), (ch, t, d))  # v dSᵀ, φk dS


# spec name -> the dots of its loop body (or whole kernel), for compile_report's MMA-work check
AOT_DOTS: dict[str, tuple] = {s.name: _dots(s) for s in AOT_SPECS}
