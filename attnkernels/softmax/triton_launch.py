"""Launchers of the Triton softmax-attention kernels (`triton_kernels.py`): tile configs,
grids, the launcher's own invariants, and the two entry points the ops call:

    forward(call, q, k, v) -> (out (B, Hq, Nq, Dv) in q's dtype, lse (B, Hq, Nq) float32)
    backward(call, dout, q, k, v, out, lse, bias_grad) -> (dq, dk, dv, dbias or None)
    decode_forward(q, k_cache, v_cache, cache_seqlens, block_table, *, scale, ...) -> (out, lse)
      (split-K decode over a contiguous or paged KV cache; its own checks, see its docstring)

`call` carries scale, window_left, window_right, kv_num_blocks, kv_indices, q_num_blocks,
q_indices, sparse_block_size, key_padding_mask and the score modifiers softcap,
alibi_slopes, attn_bias, dropout_p, dropout_seed (call.py; `sinks` are the ops' and never
read here) with the op arguments' meanings, already validated by the public API; calls
with Nq or Nk == 0 are answered by the ops. A call object without the modifier fields
(the tests' plain namespaces) runs without modifiers. What is checked here is only what
stops a kernel from reading out of bounds on a direct call (tensor ranks, table dtypes and
shapes, the key padding mask's shape, the bias's sizes against (B, Hq, Nq, Nk), the
slopes' shape, the seed's dtype).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton

from ..conventions import default_softmax_scale
from ..triton_common import cdiv, dot_precision, last_dim_contiguous, launch_options, Override, pad_dim, row_strides
from .dropout import keep_scale, keep_threshold
from .triton_kernels import attn_bwd_dkdv, attn_bwd_dq, attn_bwd_preprocess, attn_decode, attn_decode_combine, attn_fwd

__all__ = ["forward", "backward", "block_config", "config_arch", "dkdv_passes", "override_blocks", "BlockConfig",
           "PREPROCESS_BLOCK_M", "ARCHS", "modifier_tier", "decode_forward", "decode_config", "decode_num_splits",
           "DecodeConfig"]

LOG2E = 1.4426950408889634
PREPROCESS_BLOCK_M = 64

# ----------------------------------------------------------------------------------------
# Block configs
# ----------------------------------------------------------------------------------------


class BlockConfig(NamedTuple):
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    # registers per thread ptxas may use (None: its own choice). ptxas otherwise aims at an
    # occupancy (e.g. 168 regs = 3 blocks of 128 threads) and spills to get there.
    maxnreg: int | None = None
    # with block-sparse tables, run fully visible table blocks without the element mask
    # (a second loop body); False where that body would make the config spill
    table_skip: bool = True
    # dK/dV only: dK and dV in two launches (attn_bwd_dkdv's WITH_DK / WITH_DV), each holding
    # one [block_n, D] float32 accumulator, where two would spill (D = 256 on sm_90a)
    split_dkdv: bool = False


_BLOCKS = Override()


def override_blocks(block_m: int, block_n: int):
    """Test hook: launch every kernel with these BLOCK_M/BLOCK_N (powers of two >= 16), so
    that small interpreter shapes still span many blocks and all three loop segments."""
    return _BLOCKS.set((block_m, block_n))


# (kernel, padded head dim class) -> (config for 16-bit inputs, config for fp32 inputs).
# Found with `python -m attnkernels.tools.compile_report`: each is the largest tile tried
# that compiles without a spill and within shared memory on both sm_80 and sm_90a, for
# every mask variant (the masked/sparse loops are the register-hungry ones). Why the
# tiles shrink with D: the accumulators ([BLOCK_M, D] in fwd/dQ, two [BLOCK_N, D] in
# dK/dV) and, on sm_80, each warp's full copy of the mma B operand ([D, BLOCK_N] k^T in
# fwd/dQ, [D, BLOCK_M] q^T in dK/dV) grow with D; more warps split the accumulators.
# fp32 inputs double every operand tile, and exact fp32 dots ("ieee") run on FMA units
# with operands spread over registers, hence the small fp32 tiles; at those sizes ptxas
# would rather spill a few bytes than drop below 2-3 blocks per SM, so the fp32 configs
# let it use all 255 registers per thread (`maxnreg`).
# On an H200 (benchmarks/gpu_tune.py, docs/gpu_tune_h200.json) larger dK/dV tiles ran up to
# 3x faster at D=128 (32x128: 1.8 ms vs 5.9 ms causal fwd+bwd); the D<=64 16-bit fwd and
# dK/dV tiles below are the fastest spill-free ones of that sweep. sm_90a has its own dK/dV
# tiles (`_CONFIGS_SM90`).
# `table_skip=False` (every table block masked): the configs whose table walk spills on
# sm_80 with the second, unmasked loop body (compile gate, Triton 3.8).
# fp32 at D=256 (fwd, dQ): 16x16 tiles on 8 warps. The [16, 256] fp32 accumulator and
# operands need the registers of 8 warps: with 4 warps (or 32x16 on 8) the exact-fp32 ("ieee")
# build spills 24-180 bytes at 255 regs on sm_90a and in the masked loops on sm_80; 16x16 w8
# is spill-free on both for every mask variant (fwd 203-238 regs, dQ 192-228; TF32 109-150).
# TF32 (fp32 inputs, torch.backends.cuda.matmul.allow_tf32) has its own tiles where the
# exact-fp32 one would waste tensor-core work (`_TF32_CONFIGS`).
_FP32_REGS = 255
_NO_SKIP = dict(table_skip=False)
_CONFIGS = {
    # forward: BLOCK_M query rows resident, BLOCK_N key rows stream
    ("fwd", 64): (BlockConfig(64, 64, 4, 3, **_NO_SKIP), BlockConfig(32, 16, 4, 2, _FP32_REGS)),
    ("fwd", 128): (BlockConfig(128, 64, 8, 3), BlockConfig(16, 16, 4, 2, _FP32_REGS)),
    ("fwd", 256): (BlockConfig(64, 32, 8, 2), BlockConfig(16, 16, 8, 2, _FP32_REGS, **_NO_SKIP)),
    # dK/dV: BLOCK_N key rows resident, BLOCK_M query rows stream. The chained dots (s^T,
    # dp^T) keep their warps along the keys, one 16-key mma slice per warp at best, so on
    # sm_80 D = 128 takes 32 x 32 on 4 warps (1.0x the minimum MMA work) and D = 256 16 x 16
    # on 4 (1.5x; 16 x 32 spills with tables); 16 x 32 / 16 x 16 on 8 warps did 2.5x.
    ("dkdv", 64): (BlockConfig(16, 128, 8, 2), BlockConfig(16, 16, 4, 2, _FP32_REGS)),
    ("dkdv", 128): (BlockConfig(32, 32, 4, 2), BlockConfig(16, 16, 8, 2, _FP32_REGS)),
    ("dkdv", 256): (BlockConfig(16, 16, 4, 1), BlockConfig(16, 16, 8, 1, _FP32_REGS, **_NO_SKIP)),
    # dQ: BLOCK_M query rows resident, BLOCK_N key rows stream
    ("dq", 64): (BlockConfig(64, 32, 4, 3, **_NO_SKIP), BlockConfig(32, 16, 4, 2, _FP32_REGS)),
    ("dq", 128): (BlockConfig(64, 32, 4, 2), BlockConfig(16, 16, 4, 2, _FP32_REGS)),
    ("dq", 256): (BlockConfig(32, 16, 4, 2), BlockConfig(16, 16, 8, 2, _FP32_REGS, **_NO_SKIP)),
}


# sm_90a (Hopper): a wgmma needs >= 64 rows per warpgroup, so the dK/dV programs hold 128
# keys on 8 warps (two warpgroups; K, V in shared memory) and every dot of the loop runs on
# wgmma; spill-free since the GQA group no longer wraps the loops in a runtime loop. With
# block-sparse tables the walk keeps a loop over the group's heads and two loop bodies
# (masked, unmasked), hence the shorter query tiles there.
# At D = 256 two [64, 256] fp32 accumulators per warpgroup spill (4.4-4.9 KB at 128 x 16
# w8 or 64 x 16 w4, Triton 3.8): dK and dV run as two launches of 128 keys x 16 queries on
# 8 warps (`split_dkdv`), one accumulator each, on wgmma (212-246 regs, 0 spills, every
# mask variant); the dK launch recomputes Sᵀ, 1.25x the matmul work of one program. The
# D = 256 dQ holds 128 queries on 8 warps (217 regs; 64 x 16 on 4 warps spills 160 B).
_CONFIGS_SM90 = dict(_CONFIGS)
_CONFIGS_SM90.update({
    ("dkdv", 64): (BlockConfig(64, 128, 8, 2), _CONFIGS["dkdv", 64][1]),
    ("dkdv", 128): (BlockConfig(32, 128, 8, 2), _CONFIGS["dkdv", 128][1]),
    ("dkdv", 256): (BlockConfig(16, 128, 8, 2, split_dkdv=True), _CONFIGS["dkdv", 256][1]),
    ("dq", 256): (BlockConfig(128, 16, 8, 2), _CONFIGS["dq", 256][1]),
})
_SPARSE_CONFIGS_SM90 = {
    ("dkdv", 64): BlockConfig(32, 128, 8, 1),
    ("dkdv", 128): BlockConfig(16, 128, 8, 2),
}
# TF32 (fp32 inputs with TF32 dots, `dot_precision`): 4-byte operands on tensor cores need
# far fewer registers than exact fp32's FMA dots, so these tiles spread the warps over the
# tile instead of copying it. An mma.sync tile is 16 rows, and a dot feeding another dot
# (the scores) keeps its warps along its rows, so 8 warps on 16 rows compute the scores 8
# times (the exact-fp32 16 x 16 w8 tiles: >= 2x the minimum MMA work, compile gate). Each
# below is spill-free on sm_80 and sm_90a for every mask variant (255 regs allowed) at
# <= 1.67x the minimum work (1.0x for the D <= 64 fwd / dQ); the others keep the fp32 tile.
_TF32_CONFIGS = {
    ("fwd", 64): BlockConfig(64, 16, 4, 2, _FP32_REGS),
    ("fwd", 256): BlockConfig(16, 16, 4, 2, _FP32_REGS, **_NO_SKIP),
    ("dkdv", 128): BlockConfig(16, 32, 4, 2, _FP32_REGS),
    ("dkdv", 256): BlockConfig(32, 16, 8, 1, _FP32_REGS, **_NO_SKIP),
    # sm_80: 64 x 16 on 4 warps spills 12 B with block-sparse tables at D = 64
    ("dq", 64): BlockConfig(32, 16, 2, 2, _FP32_REGS),
    ("dq", 256): BlockConfig(16, 16, 4, 2, _FP32_REGS, **_NO_SKIP),
}
_TF32_CONFIGS_SM90 = dict(_TF32_CONFIGS)
_TF32_CONFIGS_SM90["dq", 64] = BlockConfig(64, 16, 4, 2, _FP32_REGS)  # a warpgroup of 64 rows: wgmma
ARCHS = (80, 90)  # the config tables: sm_80 (Ampere and Ada) and sm_90a (Hopper and later)

# Score modifiers (16-bit inputs): each adds live [BLOCK_M, BLOCK_N] tiles to the loop (the
# tanh for the backward's chain rule, the bias tile and its layout change, Philox's four
# words), so the configs above spill with them (compile gate, Triton 3.8). Three tiers:
# "light" (softcap, ALiBi: a few ALU ops on the scores), "heavy" (attn_bias or dropout) and
# "full" (attn_bias and dropout; it falls back to "heavy" where it has no entry).
# (arch, kernel, d class, tier) -> config, each the largest tried that compiles without a
# spill for every modifier combination of its tier; the kept dimensions are those wgmma
# needs on sm_90a (>= 64 resident rows per warpgroup: 128 keys on 8 warps in dK/dV, 64+
# queries per warpgroup in fwd/dQ), so only the streamed dimension shrinks there.
_MODIFIER_CONFIGS = {
    (90, "dkdv", 64, "light"): BlockConfig(32, 128, 8, 2),
    (80, "fwd", 64, "full"): BlockConfig(64, 32, 4, 3),
    (80, "fwd", 128, "heavy"): BlockConfig(128, 32, 8, 2),
    (80, "fwd", 128, "full"): BlockConfig(128, 16, 8, 2),
    (90, "fwd", 128, "heavy"): BlockConfig(128, 32, 8, 2),
    (90, "dkdv", 64, "heavy"): BlockConfig(16, 128, 8, 2),
    (90, "dkdv", 128, "heavy"): BlockConfig(16, 128, 8, 2),
    (80, "dq", 64, "heavy"): BlockConfig(64, 16, 4, 3),
    (90, "dq", 64, "heavy"): BlockConfig(64, 16, 4, 3),
    (80, "dq", 128, "heavy"): BlockConfig(32, 32, 4, 2),
    (90, "dq", 128, "heavy"): BlockConfig(64, 16, 4, 2),
}
_TIER_FALLBACK = {"light": ("light",), "heavy": ("heavy",), "full": ("full", "heavy")}


def modifier_tier(modifiers) -> str | None:
    """None (no modifier), "light" (softcap / alibi only), "heavy" (attn_bias or dropout) or
    "full" (attn_bias and dropout)."""
    modifiers = frozenset(modifiers)
    if {"attn_bias", "dropout"} <= modifiers:
        return "full"
    if modifiers & {"attn_bias", "dropout"}:
        return "heavy"
    return "light" if modifiers else None


def dkdv_passes(cfg: BlockConfig) -> tuple:
    """(WITH_DK, WITH_DV) of each attn_bwd_dkdv launch of a dK/dV config: one launch for
    both, or dV then dK with `split_dkdv`."""
    return ((False, True), (True, False)) if cfg.split_dkdv else ((True, True),)


def config_arch(device: torch.device) -> int:
    """The config table a launch on `device` uses: 90 on compute capability >= 9.0, else 80
    (also for CPU tensors under the interpreter)."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9:
        return 90
    return 80


def block_config(kernel: str, head_dim: int, head_dim_v: int, dtype: torch.dtype,
                 sparse_block_size: int = 0, arch: int = 80, modifiers=frozenset(),
                 prec: str | None = None) -> BlockConfig:
    """GPU launch config per kernel ("fwd", "dkdv", "dq"), padded head dim, dtype, arch
    (80 or 90, see `config_arch`; `_CONFIGS`, `_CONFIGS_SM90`), the score modifiers in use
    (names of call.FEATURES; `_MODIFIER_CONFIGS`) and the dot precision the kernels get
    (DOT_PREC; `dot_precision(dtype)` when None): fp32 inputs on TF32 take `_TF32_CONFIGS`.
    With a block-sparse table the blocks must divide `sparse_block_size` (all are powers of
    two, so min() does it)."""
    if kernel not in ("fwd", "dkdv", "dq"):
        raise ValueError(f"block_config: unknown kernel {kernel!r}")
    if arch not in ARCHS:
        raise ValueError(f"block_config: arch must be one of {ARCHS}, got {arch!r}")
    d = max(pad_dim(head_dim), pad_dim(head_dim_v))
    d_class = 64 if d <= 64 else 128 if d <= 128 else 256
    wide = dtype == torch.float32
    cfg = (_CONFIGS_SM90 if arch == 90 else _CONFIGS)[kernel, d_class][1 if wide else 0]
    if wide and (dot_precision(dtype) if prec is None else prec) == "tf32":
        cfg = (_TF32_CONFIGS_SM90 if arch == 90 else _TF32_CONFIGS).get((kernel, d_class), cfg)
    if arch == 90 and sparse_block_size and not wide:
        cfg = _SPARSE_CONFIGS_SM90.get((kernel, d_class), cfg)
    tier = modifier_tier(modifiers)
    if tier and not wide:
        cfg = next((_MODIFIER_CONFIGS[key] for key in ((arch, kernel, d_class, t) for t in _TIER_FALLBACK[tier])
                    if key in _MODIFIER_CONFIGS), cfg)
    if _BLOCKS.value is not None:
        cfg = cfg._replace(block_m=_BLOCKS.value[0], block_n=_BLOCKS.value[1])
    if sparse_block_size:
        cfg = cfg._replace(block_m=min(cfg.block_m, sparse_block_size), block_n=min(cfg.block_n, sparse_block_size))
    return cfg


# ----------------------------------------------------------------------------------------
# The launcher's invariants (the user-facing checks are the public API's)
# ----------------------------------------------------------------------------------------


def _check_qkv(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name}: expected a 4-D tensor (B, H, N, D), got shape {tuple(t.shape)}")
    batch, q_heads, _, head_dim = q.shape
    _, kv_heads, kv_len, _ = k.shape
    if (k.shape[0], k.shape[3]) != (batch, head_dim) or tuple(v.shape[:3]) != (batch, kv_heads, kv_len):
        raise ValueError(f"q, k, v: shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)} do not fit "
                         "(B, Hq, Nq, D), (B, Hk, Nk, D), (B, Hk, Nk, Dv)")
    if kv_heads == 0 or q_heads % kv_heads:
        raise ValueError(f"q, k: Hq={q_heads} must be a multiple of Hk={kv_heads}")


def _table_strides(t: torch.Tensor) -> list[int]:
    """Strides with 0 on broadcast (size-1) batch/head dims; the last dim must be contiguous."""
    return [0 if t.shape[i] == 1 else t.stride(i) for i in range(t.dim() - 1)]


def _check_tables(name_num: str, num, name_idx: str, idx, batch: int, q_heads: int, n_rows: int, n_cols: int):
    if num is None or idx is None:
        raise ValueError(f"{name_num} and {name_idx} must be given together")
    for name, t, nd in ((name_num, num, 3), (name_idx, idx, 4)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int32 or t.dim() != nd:
            raise ValueError(f"{name}: expected an int32 tensor with {nd} dims, got "
                             f"{getattr(t, 'dtype', type(t))} {tuple(getattr(t, 'shape', ()))}")
    bm, hm = num.shape[0], num.shape[1]
    if bm not in (1, batch) or hm not in (1, q_heads):
        raise ValueError(f"{name_num}: leading dims must be (1|B, 1|Hq) = (1|{batch}, 1|{q_heads}), got {tuple(num.shape)}")
    if tuple(num.shape) != (bm, hm, n_rows):
        raise ValueError(f"{name_num}: expected shape {(bm, hm, n_rows)}, got {tuple(num.shape)}")
    if tuple(idx.shape) != (bm, hm, n_rows, n_cols):
        raise ValueError(f"{name_idx}: expected shape {(bm, hm, n_rows, n_cols)}, got {tuple(idx.shape)}")
    return num.contiguous(), idx.contiguous()


def _check_sparse_block_size(sparse_block_size: int):
    # the kernel tiles must divide the sparse block: both are powers of two >= 16
    if not isinstance(sparse_block_size, int) or sparse_block_size < 16 or sparse_block_size & (sparse_block_size - 1):
        raise ValueError(f"sparse_block_size: expected a power of two >= 16 with block-sparse tables, got {sparse_block_size!r}")


def _check_kpm(key_padding_mask, batch: int, kv_len: int):
    """The mask as the kernels read it: one byte per key, (B, Nk) contiguous; None stays None."""
    if key_padding_mask is None:
        return None
    if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
        raise ValueError(f"key_padding_mask: expected a bool tensor (B, Nk), True = ignore; got {getattr(key_padding_mask, 'dtype', type(key_padding_mask))}")
    if tuple(key_padding_mask.shape) != (batch, kv_len):
        raise ValueError(f"key_padding_mask: expected shape {(batch, kv_len)}, got {tuple(key_padding_mask.shape)}")
    return key_padding_mask.contiguous().view(torch.uint8)


class _Modifiers(NamedTuple):
    """The score modifiers of one call as the kernels take them: the launch's extra pointer
    and scalar arguments, and its constexpr flags (all off: the plain kernels' code)."""

    slopes: torch.Tensor | None  # float32 (B, Hq) contiguous
    bias: torch.Tensor | None  # a 4-D view, read through its strides (0 on broadcast dims)
    seed: torch.Tensor | None  # int64, one element, on the device
    bias_strides: list
    cap_in: float  # scale / softcap
    cap_out: float  # softcap · log2(e)
    threshold: int  # the byte threshold t = round(p · 256) (dropout.keep_threshold)
    rscale: float  # 1 / (1 - t / 256) (dropout.keep_scale)

    def pointers(self, dummy) -> list:
        return [t if t is not None else dummy for t in (self.slopes, self.bias, self.seed)]

    def scalars(self) -> list:
        return [self.cap_in, self.cap_out, self.threshold, self.rscale]

    def names(self) -> frozenset:
        """The call.FEATURES names in use (they pick the tile config)."""
        on = dict(softcap=self.cap_in != 0.0, alibi=self.slopes is not None, attn_bias=self.bias is not None,
                  dropout=self.seed is not None)
        return frozenset(n for n, used in on.items() if used)

    def flags(self) -> dict:
        return dict(HAS_SOFTCAP=self.cap_in != 0.0, HAS_ALIBI=self.slopes is not None, HAS_BIAS=self.bias is not None,
                    HAS_DROPOUT=self.seed is not None)


def _modifiers(call, batch: int, q_heads: int, q_len: int, kv_len: int, device) -> _Modifiers:
    """The call's modifiers checked for what keeps the kernels in bounds, in kernel form."""
    scale = call.scale
    softcap = float(getattr(call, "softcap", 0.0) or 0.0)
    slopes = getattr(call, "alibi_slopes", None)
    bias = getattr(call, "attn_bias", None)
    dropout_p = float(getattr(call, "dropout_p", 0.0) or 0.0)
    seed = getattr(call, "dropout_seed", None) if dropout_p > 0 else None
    if slopes is not None:
        if not isinstance(slopes, torch.Tensor) or tuple(slopes.shape) != (batch, q_heads) \
                or not slopes.is_floating_point():
            raise ValueError(f"alibi_slopes: expected a float tensor (B, Hq) = {(batch, q_heads)}, got "
                             f"{getattr(slopes, 'dtype', type(slopes))} {tuple(getattr(slopes, 'shape', ()))}")
        slopes = slopes.to(device=device, dtype=torch.float32).contiguous()
    bias_strides = [0, 0, 0, 0]
    if bias is not None:
        full = (batch, q_heads, q_len, kv_len)
        if not isinstance(bias, torch.Tensor) or bias.dim() != 4 or not bias.is_floating_point() \
                or any(n not in (1, want) for n, want in zip(bias.shape, full)):
            raise ValueError(f"attn_bias: expected a float 4-D tensor with each dim 1 or (B, Hq, Nq, Nk) = {full}, "
                             f"got {getattr(bias, 'dtype', type(bias))} {tuple(getattr(bias, 'shape', ()))}")
        # stride 0 where the bias broadcasts: one row / column serves all (never expanded)
        bias_strides = [0 if n == 1 else st for n, st in zip(bias.shape, bias.stride())]
        # the kernels address a tile within one (batch, head) slice with int32 offsets
        if (q_len - 1) * bias_strides[2] + (kv_len - 1) * bias_strides[3] >= 2**31:
            raise ValueError(f"attn_bias: a (batch, head) slice of {q_len} x {kv_len} with strides "
                             f"{tuple(bias_strides[2:])} spans more than 2^31 elements, beyond the kernels' "
                             "int32 tile offsets")
    threshold, rscale = 0, 1.0
    if dropout_p > 0:
        if not 0.0 < dropout_p < 1.0:
            raise ValueError(f"dropout_p: expected a float in [0, 1), got {dropout_p}")
        if not isinstance(seed, torch.Tensor) or seed.dtype != torch.int64 or seed.numel() != 1 \
                or seed.device != device:
            raise ValueError(f"dropout_seed: expected an int64 tensor of one element on {device} with dropout_p > 0, "
                             f"got {getattr(seed, 'dtype', type(seed))} {tuple(getattr(seed, 'shape', ()))}")
        seed = seed.reshape(1)
        threshold = keep_threshold(dropout_p)  # a byte, 1 .. 255 (raises for p < 1/512)
        rscale = keep_scale(dropout_p)  # 1 / (1 - t / 256)
    cap_in, cap_out = (scale / softcap, softcap * LOG2E) if softcap > 0 else (0.0, 0.0)
    return _Modifiers(slopes, bias, seed, bias_strides, cap_in, cap_out, threshold, rscale)


class _Tables(NamedTuple):
    """The block tables of one call as the kernels take them (dummies without tables)."""

    is_sparse: bool
    sparse_block: int  # the SPARSE_BLOCK constexpr: 0 without tables
    kv_num: torch.Tensor | None
    kv_idx: torch.Tensor | None
    q_num: torch.Tensor | None
    q_idx: torch.Tensor | None


def _tables(call, batch, q_heads, q_len, kv_len, backward: bool) -> _Tables:
    names = ("kv_num_blocks", "kv_indices") + (("q_num_blocks", "q_indices") if backward else ())
    if all(getattr(call, n) is None for n in names):
        return _Tables(False, 0, None, None, None, None)
    bs = call.sparse_block_size
    _check_sparse_block_size(bs)
    n_qb, n_kb = cdiv(q_len, bs), cdiv(kv_len, bs)
    kv_num, kv_idx = _check_tables("kv_num_blocks", call.kv_num_blocks, "kv_indices", call.kv_indices,
                                   batch, q_heads, n_qb, n_kb)
    q_num = q_idx = None
    if backward:
        q_num, q_idx = _check_tables("q_num_blocks", call.q_num_blocks, "q_indices", call.q_indices,
                                     batch, q_heads, n_kb, n_qb)
    return _Tables(True, bs, kv_num, kv_idx, q_num, q_idx)


def _table_args(num, idx, dummy) -> list:
    """(num, idx, 5 table strides) for a launch; dummies and zeros without a table."""
    if num is None:
        return [dummy, dummy] + [0] * 5
    return [num, idx] + _table_strides(num)[:2] + _table_strides(idx)[:3]


# ----------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------


def forward(call, q, k, v):
    """(out (B, Hq, Nq, Dv) in q's dtype, lse (B, Hq, Nq) float32 natural log)."""
    _check_qkv(q, k, v)
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, kv_len, head_dim_v = k.shape[1], k.shape[2], v.shape[-1]
    tab = _tables(call, batch, q_heads, q_len, kv_len, backward=False)
    kpm = _check_kpm(call.key_padding_mask, batch, kv_len)
    mods = _modifiers(call, batch, q_heads, q_len, kv_len, q.device)
    window_left, window_right = call.window_left, call.window_right

    out = torch.empty(batch, q_heads, q_len, head_dim_v, dtype=q.dtype, device=q.device)
    lse = torch.empty(batch, q_heads, q_len, dtype=torch.float32, device=q.device)
    if out.numel() == 0 and lse.numel() == 0:
        return out, lse
    prec = dot_precision(q.dtype)
    cfg = block_config("fwd", head_dim, head_dim_v, q.dtype, tab.sparse_block, config_arch(q.device), mods.names(),
                       prec)
    table_num, table_idx, *t_strides = _table_args(tab.kv_num, tab.kv_idx, lse)  # lse: an unused dummy
    grid = (cdiv(q_len, cfg.block_m), batch * q_heads)
    attn_fwd[grid](
        q, k, v, out, lse, table_num, table_idx, kpm if kpm is not None else lse, *mods.pointers(lse),
        *row_strides(q),
        *row_strides(k),
        *row_strides(v),
        *row_strides(out),
        *t_strides,
        kpm.stride(0) if kpm is not None else 0,
        *mods.bias_strides,
        q_heads, q_len, kv_len, q_heads // kv_heads, window_left, window_right, call.scale * LOG2E,
        *mods.scalars(),
        HEAD_DIM=head_dim, HEAD_DIM_V=head_dim_v, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_D=pad_dim(head_dim), BLOCK_DV=pad_dim(head_dim_v),
        HAS_LEFT=window_left >= 0, HAS_RIGHT=window_right >= 0,
        IS_SPARSE=tab.is_sparse, SPARSE_BLOCK=tab.sparse_block,
        HAS_KPM=kpm is not None, DOT_PREC=prec, TABLE_SKIP=cfg.table_skip,
        **mods.flags(), **launch_options(cfg),
    )
    return out, lse


def backward(call, dout, q, k, v, out, lse, bias_grad: bool = False):
    """(dq, dk, dv, dbias): grads in the inputs' dtype, dbias the full (B, Hq, Nq, Nk) float32
    gradient of attn_bias when bias_grad (the ops reduce it to the bias's shape), else None.
    Deterministic (see triton_kernels' docstring): dbias is written by the dQ kernel, each
    element once."""
    _check_qkv(q, k, v)
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, kv_len, head_dim_v = k.shape[1], k.shape[2], v.shape[-1]
    if tuple(out.shape) != (batch, q_heads, q_len, head_dim_v) or tuple(dout.shape) != tuple(out.shape):
        raise ValueError(f"out, dout: expected shape {(batch, q_heads, q_len, head_dim_v)}, got "
                         f"{tuple(out.shape)} and {tuple(dout.shape)}")
    if tuple(lse.shape) != (batch, q_heads, q_len) or lse.dtype != torch.float32:
        raise ValueError(f"lse: expected a float32 tensor {(batch, q_heads, q_len)}, got {lse.dtype} {tuple(lse.shape)}")
    q, k, v, out, dout = (last_dim_contiguous(t) for t in (q, k, v, out, dout))
    lse = lse.contiguous()
    tab = _tables(call, batch, q_heads, q_len, kv_len, backward=True)
    kpm = _check_kpm(call.key_padding_mask, batch, kv_len)
    mods = _modifiers(call, batch, q_heads, q_len, kv_len, q.device)
    if bias_grad and mods.bias is None:
        raise ValueError("bias_grad: the gradient of attn_bias was asked for a call without attn_bias")
    window_left, window_right, scale = call.window_left, call.window_right, call.scale

    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    # dbias: zeros, since the dQ kernel writes only the tiles it visits (the others see no key)
    dbias = torch.zeros(batch, q_heads, q_len, kv_len, dtype=torch.float32, device=q.device) if bias_grad else None
    if q.numel() == 0 and k.numel() == 0 and v.numel() == 0:
        return dq, dk, dv, dbias
    if q_len == 0 or batch * q_heads == 0:  # no query: nothing flows back to k, v
        dk.zero_()
        dv.zero_()
        return dq, dk, dv, dbias

    delta = torch.empty(batch, q_heads, q_len, dtype=torch.float32, device=q.device)
    pad_d, pad_dv = pad_dim(head_dim), pad_dim(head_dim_v)
    attn_bwd_preprocess[(cdiv(q_len, PREPROCESS_BLOCK_M), batch * q_heads)](
        out, dout, delta,
        *row_strides(out),
        *row_strides(dout),
        q_heads, q_len, HEAD_DIM_V=head_dim_v, BLOCK_M=PREPROCESS_BLOCK_M, BLOCK_DV=pad_dv,
    )
    common = dict(HEAD_DIM=head_dim, HEAD_DIM_V=head_dim_v, BLOCK_D=pad_d, BLOCK_DV=pad_dv,
                  HAS_LEFT=window_left >= 0, HAS_RIGHT=window_right >= 0,
                  IS_SPARSE=tab.is_sparse, SPARSE_BLOCK=tab.sparse_block,
                  HAS_KPM=kpm is not None, DOT_PREC=dot_precision(q.dtype), **mods.flags())
    kpm_arg = kpm if kpm is not None else delta
    kpm_stride = kpm.stride(0) if kpm is not None else 0
    group = q_heads // kv_heads
    arch = config_arch(q.device)

    kv_tab = _table_args(tab.kv_num, tab.kv_idx, delta)  # delta: an unused dummy without tables
    q_tab = _table_args(tab.q_num, tab.q_idx, delta)
    if kv_len > 0:
        cfg = block_config("dkdv", head_dim, head_dim_v, q.dtype, tab.sparse_block, arch, mods.names(),
                           common["DOT_PREC"])
        for with_dk, with_dv in dkdv_passes(cfg):
            attn_bwd_dkdv[(cdiv(kv_len, cfg.block_n), batch * kv_heads)](
                q, k, v, dout, lse, delta, dk, dv, *q_tab[:2], kpm_arg, *mods.pointers(delta),
                *row_strides(q),
                *row_strides(k),
                *row_strides(v),
                *row_strides(dout),
                *row_strides(dk),
                *row_strides(dv),
                *q_tab[2:], kpm_stride, *mods.bias_strides,
                q_heads, kv_heads, q_len, kv_len, group, window_left, window_right, scale * LOG2E, scale,
                *mods.scalars(),
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, TABLE_SKIP=cfg.table_skip, WITH_DK=with_dk,
                WITH_DV=with_dv, **launch_options(cfg), **common,
            )
    cfg = block_config("dq", head_dim, head_dim_v, q.dtype, tab.sparse_block, arch, mods.names(),
                       common["DOT_PREC"])
    attn_bwd_dq[(cdiv(q_len, cfg.block_m), batch * q_heads)](
        q, k, v, dout, lse, delta, dq, *kv_tab[:2], kpm_arg, *mods.pointers(delta),
        dbias if dbias is not None else delta,
        *row_strides(q),
        *row_strides(k),
        *row_strides(v),
        *row_strides(dout),
        *row_strides(dq),
        *kv_tab[2:], kpm_stride, *mods.bias_strides,
        q_heads, q_len, kv_len, group, window_left, window_right, scale * LOG2E, scale, *mods.scalars(),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, TABLE_SKIP=cfg.table_skip, STORE_DBIAS=dbias is not None,
        **launch_options(cfg), **common,
    )
    return dq, dk, dv, dbias


# ----------------------------------------------------------------------------------------
# Decode: split-K over a KV cache (attn_decode + attn_decode_combine)
# ----------------------------------------------------------------------------------------


class DecodeConfig(NamedTuple):
    block_m: int  # the GQA group's (head, query) rows per program, padded
    block_n: int  # keys per tile
    num_warps: int
    num_stages: int
    maxnreg: int | None = None  # see BlockConfig.maxnreg


# Decode is memory-bound: per key it reads D + Dv elements of K/V once per GQA group and
# does 2·rows·(D + Dv) flops on them. 16-bit: the rows are padded to 64 (4 warps, one 16-row
# mma slice each; one warpgroup, so sm_90a runs wgmma m64) or 128 (8 warps), never fewer:
# a 16-row tile on 4 warps makes Triton compute the same product on every warp (the gate's
# "dup-mma") and runs mma.sync on sm_90a. Even padded to 64 rows the tensor-core work is
# ~64 flop per byte of K/V at D = 128, a third of an H200's ridge point (~200), so padding
# costs no time; the padded rows are never loaded (masked) or stored.
# Exact fp32 ("ieee") dots run on FMA units: the rows are padded only to 16.
# (arch, d class, 16-bit?) -> (block_n, num_stages, warps per 64 rows, most rows per program),
# from the compile gate (the largest key tile spill-free for every variant), not from timing.
# sm_80 gets half of sm_90a's key tile: there each warp holds a full copy of the mma B
# operand (k^T [D, BLOCK_N], v [BLOCK_N, Dv]), which at D = 128, BLOCK_N = 64 spills; wgmma
# reads B from shared memory. At D = 256 the [64, 256] float32 accumulator alone is 128
# registers a thread on 4 warps: 8 warps split it (Triton lays them 4 x 2, along the rows
# and the columns, no copied product), and the rows stop at 64.
_DECODE_TILES = {
    (80, 64, True): (64, 3, 4, 128), (80, 128, True): (32, 3, 4, 128), (80, 256, True): (32, 2, 8, 64),
    (90, 64, True): (128, 3, 4, 128), (90, 128, True): (64, 3, 4, 128), (90, 256, True): (32, 2, 8, 64),
    # exact fp32 ("ieee", FMA units): the fp32 recipe of `_CONFIGS` (16-row tiles, all 255
    # registers; 8 warps at D = 256); 64 rows or a 32-key tile spill at D >= 128. fp32 with
    # allow_tf32 runs these tiles on TF32 mma, where 16 rows on 4 warps repeat the product on
    # every warp (not a gate spec yet: the table is keyed by dtype, as `_CONFIGS` is)
    **{(arch, 64, False): (32, 2, 4, 16) for arch in ARCHS}, **{(arch, 128, False): (16, 2, 4, 16) for arch in ARCHS},
    **{(arch, 256, False): (16, 2, 8, 16) for arch in ARCHS},
}
DECODE_MAX_SPLITS = 64
_DECODE_MIN_TILES_PER_SPLIT = 4  # a split shorter than this costs more in its partial write than it hides
_DEFAULT_SMS = 132  # an H200's SM count: what the split count is chosen for on CPU tensors (interpreter)
_DECODE = Override()


def override_decode(block_n: int | None = None, num_splits: int | None = None):
    """Test hook: decode launches with this key tile (power of two >= 16) and/or split count,
    so that short interpreter caches span many tiles and the combine runs."""
    return _DECODE.set((block_n, num_splits))


def decode_config(head_dim: int, head_dim_v: int, dtype: torch.dtype, rows: int, arch: int = 80) -> DecodeConfig:
    """The decode tile for `rows` = (Hq / Hk) · Nq query rows per kv head on `arch` (80 or 90,
    `config_arch`; see _DECODE_TILES), the same for contiguous and paged caches (a paged tile
    looks up each key's page, so it is not bounded by the page size)."""
    if arch not in ARCHS:
        raise ValueError(f"decode_config: arch must be one of {ARCHS}, got {arch!r}")
    d = max(pad_dim(head_dim), pad_dim(head_dim_v))
    d_class = 64 if d <= 64 else 128 if d <= 128 else 256
    wide = dtype == torch.float32
    block_n, stages, warps_64, max_m = _DECODE_TILES[arch, d_class, not wide]
    rows = max(1, min(rows, max_m))
    if wide:  # FMA dots: no mma slice to fill, 16 rows; `warps_64` is the warps of that tile
        block_m, warps = 16, warps_64
    else:
        block_m = 64 if rows <= 64 else 128
        warps = warps_64 * block_m // 64
    if _DECODE.value is not None and _DECODE.value[0] is not None:
        block_n = _DECODE.value[0]
    return DecodeConfig(block_m, block_n, warps, stages, _FP32_REGS if wide else None)


def decode_num_splits(programs: int, num_tiles: int, num_sms: int = _DEFAULT_SMS) -> int:
    """Splits of each row's key range, from the shapes only: `programs` = B · Hk · row blocks,
    `num_tiles` = key tiles of the longest possible row (the cache's capacity, or the window).

    Decode reads K/V once; what hides the memory latency is enough programs in flight. The
    target is two resident programs per SM (`slots`): among the split counts that leave each
    split >= _DECODE_MIN_TILES_PER_SPLIT tiles (at most DECODE_MAX_SPLITS), the smallest whose
    wave efficiency (programs·s / slots over its ceiling) is within 85% of the best. A grid that
    already fills the slots gets 1 (no combine)."""
    slots = 2 * num_sms
    if programs >= slots:
        return 1
    max_splits = max(1, min(DECODE_MAX_SPLITS, num_tiles // _DECODE_MIN_TILES_PER_SPLIT))
    eff = []
    for s in range(1, max_splits + 1):
        waves = programs * s / slots
        eff.append(waves / -(-waves // 1))
    best = max(eff)
    return next(s for s, e in enumerate(eff, 1) if e >= 0.85 * best)


def _check_decode(q, k_cache, v_cache, cache_seqlens, block_table):
    """(batch, kv heads, page size (0: contiguous), capacity) after the checks that keep the
    kernels in bounds."""
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name}: expected a 4-D tensor, got {tuple(getattr(t, 'shape', ()))}")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"k_cache, v_cache: expected q's dtype {q.dtype}, got {k_cache.dtype}, {v_cache.dtype}")
    batch, q_heads, _, head_dim = q.shape
    n0, kv_heads, n2, kd = k_cache.shape
    if kd != head_dim or tuple(v_cache.shape[:3]) != (n0, kv_heads, n2):
        raise ValueError(f"k_cache, v_cache: shapes {tuple(k_cache.shape)}, {tuple(v_cache.shape)} do not fit "
                         f"q {tuple(q.shape)}: expected (B | num_pages, Hk, Nc | page_size, D={head_dim}) and the "
                         "same with Dv")
    if kv_heads == 0 or q_heads % kv_heads:
        raise ValueError(f"q, k_cache: Hq={q_heads} must be a multiple of Hk={kv_heads}")
    if not isinstance(cache_seqlens, torch.Tensor) or cache_seqlens.dtype != torch.int32 \
            or tuple(cache_seqlens.shape) != (batch,):
        raise ValueError(f"cache_seqlens: expected an int32 tensor (B,) = ({batch},), got "
                         f"{getattr(cache_seqlens, 'dtype', type(cache_seqlens))} "
                         f"{tuple(getattr(cache_seqlens, 'shape', ()))}")
    if block_table is None:
        if n0 != batch:
            raise ValueError(f"k_cache: expected (B, Hk, Nc, D) with B={batch} without a block_table, got "
                             f"{tuple(k_cache.shape)}")
        return batch, kv_heads, 0, n2
    if not isinstance(block_table, torch.Tensor) or block_table.dtype != torch.int32 or block_table.dim() != 2 \
            or block_table.shape[0] != batch:
        raise ValueError(f"block_table: expected an int32 tensor (B, max_pages) with B={batch}, got "
                         f"{getattr(block_table, 'dtype', type(block_table))} "
                         f"{tuple(getattr(block_table, 'shape', ()))}")
    if n2 < 16 or n2 & (n2 - 1):
        raise ValueError(f"k_cache: a paged cache (num_pages, Hk, page_size, D) needs page_size a power of two "
                         f">= 16, got {n2}")
    return batch, kv_heads, n2, block_table.shape[1] * n2


def decode_forward(q, k_cache, v_cache, cache_seqlens, block_table=None, *, scale, window_left=-1, window_right=-1,
                   softcap=0.0, alibi_slopes=None):
    """Attention of a few query rows against a KV cache, split-K (flash-decoding).

    q (B, Hq, Nq, D); k_cache / v_cache (B, Hk, Nc, D / Dv), or paged (num_pages, Hk,
    page_size, D / Dv) with block_table (B, max_pages) int32 (entry p of row b: the page of its
    keys p·page_size .. (p+1)·page_size - 1); any strides with a contiguous last dim. cache_seqlens int32 (B,): row
    b's filled length L_b, clamped on the device to the capacity (Nc, or max_pages·page_size);
    the block table's entries below ceil(L_b / page_size) must be valid pages (not checked:
    that would sync). Query i of row b sees key j < L_b iff
    i + L_b - Nq - window_left <= j <= i + L_b - Nq + window_right (-1: unbounded). softcap
    (0: off) and alibi_slopes ((Hq,) or (B, Hq)) as in modifiers.py, with Nk = L_b.
    Returns (out (B, Hq, Nq, Dv) in q's dtype, lse (B, Hq, Nq) float32); a row that sees no
    key gets out 0, lse -inf.

    One program per (batch · kv head, split, row block): the GQA group's heads × Nq rows
    together, so each K/V tile is read once per group; with several splits each writes its
    partial (m, l, acc) to float32 workspaces and `attn_decode_combine` merges them in split
    order (deterministic). The split count comes from the shapes (`decode_num_splits`)."""
    batch, kv_heads, page_size, capacity = _check_decode(q, k_cache, v_cache, cache_seqlens, block_table)
    q, k_cache, v_cache = (last_dim_contiguous(t) for t in (q, k_cache, v_cache))
    _, q_heads, q_len, head_dim = q.shape
    head_dim_v = v_cache.shape[-1]
    group = q_heads // kv_heads
    scale = default_softmax_scale(head_dim) if scale is None else float(scale)
    for name, side in (("window_left", window_left), ("window_right", window_right)):
        if isinstance(side, bool) or not isinstance(side, int) or side < -1:
            raise ValueError(f"{name}: expected an int >= -1 (-1 = unbounded), got {side!r}")
    softcap = float(softcap or 0.0)
    if softcap < 0:
        raise ValueError(f"softcap: expected >= 0 (0 = off), got {softcap}")
    if alibi_slopes is not None:
        if not isinstance(alibi_slopes, torch.Tensor) or not alibi_slopes.is_floating_point() \
                or tuple(alibi_slopes.shape) not in ((q_heads,), (batch, q_heads)):
            raise ValueError(f"alibi_slopes: expected a float tensor (Hq,) = ({q_heads},) or (B, Hq) = "
                             f"({batch}, {q_heads}), got {getattr(alibi_slopes, 'dtype', type(alibi_slopes))} "
                             f"{tuple(getattr(alibi_slopes, 'shape', ()))}")
        alibi_slopes = alibi_slopes.to(device=q.device, dtype=torch.float32).expand(batch, q_heads).contiguous()

    out = torch.empty(batch, q_heads, q_len, head_dim_v, dtype=q.dtype, device=q.device)
    lse = torch.empty(batch, q_heads, q_len, dtype=torch.float32, device=q.device)
    if out.numel() == 0 and lse.numel() == 0:
        return out, lse
    rows = group * q_len
    cfg = decode_config(head_dim, head_dim_v, q.dtype, rows, config_arch(q.device))
    row_blocks = cdiv(rows, cfg.block_m)
    keys = capacity
    if window_left >= 0 and window_right >= 0:  # a bounded band: no row group sees more keys
        keys = min(keys, q_len + window_left + window_right)
    num_sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.device.type == "cuda" \
        else _DEFAULT_SMS
    num_splits = decode_num_splits(batch * kv_heads * row_blocks, cdiv(max(keys, 1), cfg.block_n), num_sms)
    if _DECODE.value is not None and _DECODE.value[1] is not None:
        num_splits = _DECODE.value[1]
    if not 1 <= num_splits <= DECODE_MAX_SPLITS:
        raise ValueError(f"num_splits: expected 1 .. {DECODE_MAX_SPLITS}, got {num_splits}")
    pad_dv = pad_dim(head_dim_v)
    split = num_splits > 1
    if split:
        ws_m = torch.empty(batch, q_heads, q_len, num_splits, dtype=torch.float32, device=q.device)
        ws_l = torch.empty_like(ws_m)
        ws_acc = torch.empty(batch, q_heads, q_len, num_splits, pad_dv, dtype=torch.float32, device=q.device)
    else:
        ws_m = ws_l = ws_acc = lse  # unused dummies
    seqlens = cache_seqlens.contiguous()
    table = block_table.contiguous() if block_table is not None else seqlens  # a dummy without pages
    cap_in, cap_out = (scale / softcap, softcap * LOG2E) if softcap > 0 else (0.0, 0.0)
    attn_decode[(batch * kv_heads, num_splits, row_blocks)](
        q, k_cache, v_cache, out, lse, ws_m, ws_l, ws_acc, seqlens, table,
        alibi_slopes if alibi_slopes is not None else lse,
        *row_strides(q),
        *row_strides(k_cache),
        *row_strides(v_cache),
        *row_strides(out),
        table.stride(0) if block_table is not None else 0,
        q_heads, kv_heads, q_len, capacity, group, num_splits, window_left, window_right, scale * LOG2E,
        cap_in, cap_out,
        HEAD_DIM=head_dim, HEAD_DIM_V=head_dim_v, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_D=pad_dim(head_dim), BLOCK_DV=pad_dv,
        HAS_LEFT=window_left >= 0, HAS_RIGHT=window_right >= 0,
        IS_PAGED=block_table is not None, PAGE_SIZE=max(page_size, 1), IS_SPLIT=split,
        DOT_PREC=dot_precision(q.dtype), HAS_SOFTCAP=softcap > 0, HAS_ALIBI=alibi_slopes is not None,
        **launch_options(cfg),
    )
    if split:
        attn_decode_combine[(batch * q_heads * q_len,)](
            out, lse, ws_m, ws_l, ws_acc,
            *row_strides(out),
            q_heads, q_len, num_splits,
            HEAD_DIM_V=head_dim_v, BLOCK_DV=pad_dv, BLOCK_S=decode_combine_block_s(num_splits),
            num_warps=DECODE_COMBINE_WARPS, num_stages=1,
        )
    return out, lse


DECODE_COMBINE_WARPS = 1  # one row of Dv <= 256 floats per program: 32 threads cover it


def decode_combine_block_s(num_splits: int) -> int:
    """The combine's vector of split maxima: the next power of two >= 16 (tl.arange's floor)."""
    return max(16, triton.next_power_of_2(num_splits))
