"""Ahead-of-time compile declarations of the Triton linear-attention kernels: `AOT_SPECS`,
which `python -m attnkernels.tools.compile_report` compiles for sm_80 and sm_90a. Tiles come
from the launcher's own `chunk_config`, so the gate compiles what ships."""
from __future__ import annotations

import torch

from ..triton_common import TRITON_DTYPE, KernelSpec, divisibility, pad_dim, signature
from .triton_kernels import FEATURE_MAPS, linear_bwd_dk, linear_bwd_dq, linear_bwd_dv, linear_fwd, linear_state
from .triton_launch import chunk_config

__all__ = ["AOT_SPECS"]

# argument typing, by the naming convention of triton_kernels.py: data tensors upper-case in
# the input dtype, states and per-row DEN/CC float32; strides and sizes i32 (every stride is
# divisible by 16 at launch on the shipping layouts: `divisibility` marks them all)
_TYPES = dict(int_args={"Hq", "Hk", "N", "Nq", "Nk", "group", "chunks_per_split"}, fp32_args={"scale", "eps"},
              fp32_ptrs={"S_IN", "Z_IN", "S_OUT", "Z_OUT", "DEN", "CC"})

# known, and the subject of issue 13 item 2 (the two-pass rewrite): 16-bit inputs dot on
# float32 operands (TF32 MMAs) in 16-32-row chunks (mma.sync on sm_90a)
_WAIVE_16BIT = (("tf32-16bit", "chunked linear kernels dot on fp32 state operands (issue 13 item 2)"),
                ("mma.sync-sm90", "16-32-row chunks, under 64 rows per warpgroup (issue 13 item 2)"))
_AOT_HEAD_DIMS = (32, 64, 128)
_AOT_QUICK = (64, True, "elu", True)  # (D, causal, map, normalize) of each group's --quick spec
# (label, torch dtype, dot precision): fp32 ships exact ("ieee": FMA on CUDA cores, no mma by
# design) and TF32 (torch.backends.cuda.matmul.allow_tf32); 16-bit inputs always dot in TF32
_AOT_DTYPES = [
    ("fp16", torch.float16, "tf32"),
    ("bf16", torch.bfloat16, "tf32"),
    ("fp32", torch.float32, "ieee"),
    ("tf32", torch.float32, "tf32"),
]
# (feature map, normalize) variants: every map with the denominator, and elu without it;
# the TF32 label ships the same code as fp32, so it is compiled for the default one only
_AOT_MAPS = [("elu", True), ("relu", True), ("identity", True), ("elu", False)]


def _kernel_constexprs(kernel: str, d: int, fm: str, causal: bool, normalize: bool, dtype, prec: str) -> tuple:
    """(fn, constexprs, config) of one kernel as the launchers call it, for D = Dv = d."""
    cfg = chunk_config("fwd" if kernel == "fwd-den" else kernel, d, d, dtype, causal)
    pad = pad_dim(d)
    const = dict(HEAD_DIM=d, HEAD_DIM_V=d, BLOCK_C=cfg.block_c, FEATURE_MAP=FEATURE_MAPS[fm], DOT_PREC=prec)
    if kernel == "state":
        return linear_state, dict(const, BLOCK_D=pad, BLOCK_DV=cfg.block_t, HAS_STATE_IN=True), cfg
    const.update(CAUSAL=causal, NORMALIZE=normalize)
    if kernel in ("fwd", "fwd-den"):
        return linear_fwd, dict(const, BLOCK_D=pad, BLOCK_DV=cfg.block_t, HAS_STATE_IN=True,
                                DEN_ONLY=kernel == "fwd-den"), cfg
    if kernel == "dq":
        return linear_bwd_dq, dict(const, BLOCK_DT=cfg.block_t, BLOCK_DV=pad, HAS_STATE_IN=True), cfg
    if kernel == "dk":
        return linear_bwd_dk, dict(const, BLOCK_DT=cfg.block_t, BLOCK_DV=pad), cfg
    return linear_bwd_dv, dict(const, BLOCK_D=pad, BLOCK_DVT=cfg.block_t), cfg


def _build_aot_specs() -> list[KernelSpec]:
    specs = []
    for label, dtype, prec in _AOT_DTYPES:
        tdt = TRITON_DTYPE[dtype]
        uses_tc = prec != "ieee"
        maps = _AOT_MAPS[:1] if label == "tf32" else _AOT_MAPS
        for d in _AOT_HEAD_DIMS:
            variants = [("state", fm, False, True) for fm, norm in maps if norm]
            for causal in (False, True):
                for fm, normalize in maps:
                    variants += [(kernel, fm, causal, normalize) for kernel in ("fwd", "dq", "dk", "dv")]
                    if normalize:
                        variants.append(("fwd-den", fm, causal, normalize))
            for kernel, fm, causal, normalize in variants:
                fn, const, cfg = _kernel_constexprs(kernel, d, fm, causal, normalize, dtype, prec)
                mode = "" if kernel == "state" else ("-causal" if causal else "-full")
                norm = "" if normalize else "-nonorm"
                name = f"linear_{kernel}-{label}-D{d}{mode}-{fm}{norm}-C{cfg.block_c}-T{cfg.block_t}"
                # the non-causal den pass is φ(q) · z alone: no dot
                has_dot = uses_tc and not (kernel == "fwd-den" and not causal)
                quick = kernel != "fwd-den" and (d, causal or kernel == "state", fm, normalize) == _AOT_QUICK
                sig = signature(fn, tdt, const, **_TYPES)
                specs.append(KernelSpec(name, fn, sig, const, attrs=divisibility(sig), num_warps=cfg.num_warps,
                                        num_stages=cfg.num_stages, maxnreg=cfg.maxnreg, uses_dot=has_dot,
                                        dtype=label, quick=quick,
                                        waive=_WAIVE_16BIT if label in ("fp16", "bf16") else ()))
    return specs


AOT_SPECS: list[KernelSpec] = _build_aot_specs()
