"""Launchers of the Triton linear-attention kernels (`triton_kernels.py`): chunk configs,
grids, the launcher's own invariants, and the two entry points the ops call:

    forward(call, q, k, v) -> (out (B, Hq, Nq, Dv) in q's dtype, final S (B, Hk, D, Dv),
                               final z (B, Hk, D), both float32)
    backward(call, dout, q, k, v) -> (dq, dk, dv) in the inputs' dtypes

`call` carries feature_map, causal, normalize, eps, scale, initial_s, initial_z with the op
arguments' meanings, already validated by the public API; calls with Nq or Nk == 0 are
answered by the ops (the launchers still handle them). What is checked here is only what
stops a kernel from reading out of bounds on a direct call (ranks and shapes, the GQA
ratio, causal Nq == Nk, the initial state's shapes) and the dtypes these kernels support.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ..triton_common import Override, cdiv, dot_precision, last_dim_contiguous, launch_options, pad_dim
from .triton_kernels import FEATURE_MAPS, linear_bwd_dk, linear_bwd_dq, linear_bwd_dv, linear_fwd, linear_state

__all__ = ["forward", "backward", "chunk_config", "override_chunk", "ChunkConfig", "FEATURE_MAPS"]


# ----------------------------------------------------------------------------------------
# Chunk configs
# ----------------------------------------------------------------------------------------


class ChunkConfig(NamedTuple):
    block_c: int  # chunk length C
    block_t: int  # the tiled dim: Dv for "state"/"fwd"/"dv", D for "dq"/"dk" (the other is whole)
    num_warps: int
    num_stages: int
    # all 255 registers per thread: else ptxas may spill a few bytes to keep 2 blocks per SM
    maxnreg: int = 255


STATE_SPLIT_MIN_CHUNKS = 4  # fewest key chunks one `linear_state` program sums
_CHUNK = Override()


def override_chunk(block_c: int):
    """Test hook: launch every kernel with chunk length `block_c` (a power of two >= 16), so
    small interpreter shapes span several chunks. Only the tile size changes."""
    return _CHUNK.set(block_c)


def chunk_config(kernel: str, head_dim: int, head_dim_v: int, dtype: torch.dtype = torch.float16,
                 causal: bool = True) -> ChunkConfig:
    """GPU launch config per kernel ("state", "fwd", "dq", "dk", "dv") and padded dims.

    Every program keeps a state tile in registers across its chunk loop ([D, Dv tile] for
    state/fwd/dv, [D tile, Dv] for dq/dk) next to the chunk's [C, D] / [C, Dv] tiles, and
    mma.sync (sm_80) holds each dot's whole-K operands in registers, float32 ones for the
    state products. So the chunk is short (16-32) and the tiles narrow; chosen so that
    nothing spills on sm_80/sm_90a (`python -m attnkernels.tools.compile_report`). fp32
    inputs also keep the raw-input dot operands in 4 bytes, and an exact fp32 dot runs as
    FMAs, so their tiles are narrower.
    """
    d, dv = pad_dim(head_dim), pad_dim(head_dim_v)
    big = max(d, dv)
    wide = dtype == torch.float32
    tile = 32 if big <= 32 or (big <= 64 and not wide) else 16
    if kernel in ("state", "fwd"):
        cfg = ChunkConfig(32 if big <= 32 else 16, min(dv, tile), 8, 1)
    elif kernel == "dq":
        cfg = ChunkConfig(16, min(d, tile), 8, 1)
    # the warp counts below are empirical: ptxas sometimes spills a few bytes at 8 warps
    # where 4 fit (fp32 D=64 dK, non-causal dV), and the reverse for causal fp32 dV
    elif kernel == "dk":
        cfg = ChunkConfig(16, min(d, tile), 4 if wide and big <= 64 else 8, 1)
    elif kernel == "dv":
        if causal:
            cfg = ChunkConfig(16, min(dv, tile), 8 if wide and big >= 64 else 4, 1)
        else:
            cfg = ChunkConfig(16, min(dv, 32) if wide else min(dv, tile), 8 if wide else 4, 1)
    else:
        raise ValueError(f"chunk_config: unknown kernel {kernel!r}")
    if _CHUNK.value is not None:
        cfg = cfg._replace(block_c=_CHUNK.value)
    return cfg


# ----------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------


def _feature_map_id(name: str) -> int:
    """The kernels' constexpr for an elementwise map; a direct op call with another name is refused here."""
    if name not in FEATURE_MAPS:
        raise ValueError(f"feature_map: the Triton kernels fuse {sorted(FEATURE_MAPS)}, got {name!r}")
    return FEATURE_MAPS[name]


def _prepare(call, q, k, v):
    """The launcher's own invariants (the user-facing checks are the public API's), and the
    arguments as the kernels take them: (q, k, v, initial_s, initial_z)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"linear attention (triton): {name}: expected a 4-D tensor (B, H, N, D), got {tuple(t.shape)}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"linear attention (triton): dtype {q.dtype} is not supported (fp16, bf16, fp32); "
                        "float64 runs on the C++ kernels")
    batch, q_heads, q_len, head_dim = q.shape
    _, kv_heads, kv_len, _ = k.shape
    head_dim_v = v.shape[-1]
    if (k.shape[0], k.shape[3]) != (batch, head_dim) or tuple(v.shape[:3]) != (batch, kv_heads, kv_len):
        raise ValueError(f"linear attention (triton): q, k, v shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)} "
                         "do not fit (B, Hq, Nq, D), (B, Hk, Nk, D), (B, Hk, Nk, Dv)")
    if kv_heads == 0 or q_heads % kv_heads:
        raise ValueError(f"linear attention (triton): Hq={q_heads} is not a multiple of Hk={kv_heads}")
    if call.causal and q_len != kv_len:  # the causal kernels read k, v rows by the query index
        raise ValueError(f"linear attention (triton): causal needs Nq == Nk, got {q_len} and {kv_len}")
    initial_s, initial_z = call.initial_s, call.initial_z
    if (initial_s is None) != (initial_z is None):
        raise ValueError("linear attention (triton): initial_s and initial_z must be given together")
    if initial_s is not None:
        if tuple(initial_s.shape) != (batch, kv_heads, head_dim, head_dim_v) or tuple(initial_z.shape) != (batch, kv_heads, head_dim):
            raise ValueError(f"linear attention (triton): initial state must be S {(batch, kv_heads, head_dim, head_dim_v)} "
                             f"and z {(batch, kv_heads, head_dim)}, got {tuple(initial_s.shape)} and {tuple(initial_z.shape)}")
        initial_s = initial_s.to(device=q.device, dtype=torch.float32).contiguous()
        initial_z = initial_z.to(device=q.device, dtype=torch.float32).contiguous()
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    return q, k, v, initial_s, initial_z


def _full_state(k, v, fm, initial_s, initial_z, prec):
    """(S, z) = initial state + the sums over all keys, float32, by `linear_state`."""
    batch, kv_heads, kv_len, head_dim = k.shape
    head_dim_v = v.shape[-1]
    s = torch.empty(batch, kv_heads, head_dim, head_dim_v, dtype=torch.float32, device=k.device)
    z = torch.empty(batch, kv_heads, head_dim, dtype=torch.float32, device=k.device)
    if s.numel() == 0:
        return s, z
    cfg = chunk_config("state", head_dim, head_dim_v, k.dtype)
    has_in = initial_s is not None
    n_dv = cdiv(head_dim_v, cfg.block_t)
    n_chunks = cdiv(kv_len, cfg.block_c)
    # chunk-parallel: enough programs to fill a GPU (~2 per SM of a 132-SM part), each summing
    # a run of >= STATE_SPLIT_MIN_CHUNKS chunks; the partials are added in split order
    n_split = max(1, min(cdiv(n_chunks, STATE_SPLIT_MIN_CHUNKS), cdiv(264, batch * kv_heads * n_dv)))
    per_split = cdiv(n_chunks, n_split) if n_chunks else 1
    n_split = cdiv(n_chunks, per_split) if n_chunks else 1
    if n_split > 1:
        s_part = torch.empty(n_split, *s.shape, dtype=torch.float32, device=k.device)
        z_part = torch.empty(n_split, *z.shape, dtype=torch.float32, device=k.device)
    else:
        s_part, z_part = s, z
    linear_state[(batch * kv_heads, n_dv, n_split)](
        k, v, initial_s if has_in else s, initial_z if has_in else z, s_part, z_part,
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        kv_heads, kv_len, per_split,
        HEAD_DIM=head_dim, HEAD_DIM_V=head_dim_v, BLOCK_C=cfg.block_c, BLOCK_D=pad_dim(head_dim),
        BLOCK_DV=cfg.block_t, FEATURE_MAP=fm, HAS_STATE_IN=has_in, DOT_PREC=prec,
        **launch_options(cfg),
    )
    if n_split > 1:
        torch.sum(s_part, 0, out=s)
        torch.sum(z_part, 0, out=z)
    return s, z


def _launch_fwd(q, k, v, out, fm, causal, normalize, eps, scale, initial_s, initial_z, prec, full_state=None,
                den_only=False):
    """Runs `linear_fwd`: out and, causal, the final state (returned as (S, z)); or, with
    `den_only` (the backward's recompute), only den per query row (returned)."""
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, head_dim_v = k.shape[1], v.shape[-1]
    cfg = chunk_config("fwd", head_dim, head_dim_v, q.dtype)
    f32 = dict(dtype=torch.float32, device=q.device)
    if den_only:
        n_dv = 1  # den does not depend on Dv
        den = torch.empty(batch, q_heads, q_len, **f32)
        out = s_out = z_out = den  # unused
    else:
        n_dv = cdiv(head_dim_v, cfg.block_t)
        den = out  # unused
        s_out = torch.empty(batch, kv_heads, head_dim, head_dim_v, **f32)
        z_out = torch.empty(batch, kv_heads, head_dim, **f32)
    if causal:
        has_in = initial_s is not None
        s_in, z_in = (initial_s, initial_z) if has_in else (s_out, z_out)
        grid = (1, batch * q_heads, n_dv)  # one program walks all chunks in order
    else:
        s_in, z_in = full_state
        has_in = True
        grid = (cdiv(q_len, cfg.block_c), batch * q_heads, n_dv)
    if grid[0] * grid[1] > 0:
        linear_fwd[grid](
            q, k, v, out, s_in, z_in, s_out, z_out, den,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            0 if den_only else out.stride(0), 0 if den_only else out.stride(1), 0 if den_only else out.stride(2),
            q_heads, q_len, q_heads // kv_heads, scale, float(eps),
            HEAD_DIM=head_dim, HEAD_DIM_V=head_dim_v, BLOCK_C=cfg.block_c, BLOCK_D=pad_dim(head_dim),
            BLOCK_DV=cfg.block_t, FEATURE_MAP=fm, CAUSAL=causal, NORMALIZE=normalize,
            HAS_STATE_IN=has_in, DEN_ONLY=den_only, DOT_PREC=prec, **launch_options(cfg),
        )
    return den if den_only else (s_out, z_out)


def forward(call, q, k, v):
    """(out (B, Hq, Nq, Dv) in q's dtype, final S (B, Hk, D, Dv), final z (B, Hk, D) float32)."""
    q, k, v, initial_s, initial_z = _prepare(call, q, k, v)
    causal, normalize, eps, scale = call.causal, call.normalize, call.eps, float(call.scale)
    batch, q_heads, q_len, head_dim = q.shape
    fm, prec = _feature_map_id(call.feature_map), dot_precision(q.dtype)
    out = torch.empty(batch, q_heads, q_len, v.shape[-1], dtype=q.dtype, device=q.device)
    if causal:
        s_out, z_out = _launch_fwd(q, k, v, out, fm, True, normalize, eps, scale, initial_s, initial_z, prec)
    else:
        s_out, z_out = _full_state(k, v, fm, initial_s, initial_z, prec)
        _launch_fwd(q, k, v, out, fm, False, normalize, eps, scale, None, None, prec, full_state=(s_out, z_out))
    return out, s_out, z_out


def backward(call, dout, q, k, v):
    """(dq, dk, dv) in the inputs' dtypes; the forward is recomputed (no gradient to the state).

    With normalize, `linear_fwd` first recomputes out and (DEN_ONLY) den, giving
    c = -(do · o) / den per query row; then `linear_bwd_dq` (per D tile), `linear_bwd_dk` (per D tile) and `linear_bwd_dv`
    (per Dv tile) run independently."""
    q, k, v, initial_s, initial_z = _prepare(call, q, k, v)
    if tuple(dout.shape) != (*q.shape[:3], v.shape[-1]):
        raise ValueError(f"linear attention (triton): dout: expected shape {(*q.shape[:3], v.shape[-1])}, got {tuple(dout.shape)}")
    causal, normalize, eps, scale = call.causal, call.normalize, call.eps, float(call.scale)
    dout = last_dim_contiguous(dout.to(q.dtype))
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, kv_len, head_dim_v = k.shape[1], k.shape[2], v.shape[-1]
    fm, prec = _feature_map_id(call.feature_map), dot_precision(q.dtype)
    group = q_heads // kv_heads
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if dq.numel() == 0 and dk.numel() == 0 and dv.numel() == 0:
        return dq, dk, dv
    full_state = None if causal else _full_state(k, v, fm, initial_s, initial_z, prec)
    if normalize:
        # recompute out, then den; c = -(do · o) / den per query row (float32, (B, Hq, Nq))
        out = torch.empty(batch, q_heads, q_len, head_dim_v, dtype=q.dtype, device=q.device)
        _launch_fwd(q, k, v, out, fm, causal, True, eps, scale, initial_s, initial_z, prec, full_state=full_state)
        den = _launch_fwd(q, k, v, None, fm, causal, True, eps, scale, initial_s, initial_z, prec,
                          full_state=full_state, den_only=True)
        cc = -(dout.float() * out.float()).sum(-1) / den
    else:
        den = cc = torch.zeros(1, dtype=torch.float32, device=q.device)  # unused
    common = dict(HEAD_DIM=head_dim, HEAD_DIM_V=head_dim_v, FEATURE_MAP=fm, CAUSAL=causal, NORMALIZE=normalize,
                  DOT_PREC=prec)
    pad_d, pad_dv = pad_dim(head_dim), pad_dim(head_dim_v)

    if causal:
        has_in = initial_s is not None
        s_in, z_in = (initial_s, initial_z) if has_in else (den, den)  # unused without a state
    else:
        (s_in, z_in), has_in = full_state, True
    cfg = chunk_config("dq", head_dim, head_dim_v, q.dtype)
    grid = (1 if causal else cdiv(q_len, cfg.block_c), batch * q_heads, cdiv(head_dim, cfg.block_t))
    if grid[0] * grid[1] > 0:
        linear_bwd_dq[grid](
            q, k, v, dout, dq, s_in, z_in, den, cc,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            dout.stride(0), dout.stride(1), dout.stride(2),
            dq.stride(0), dq.stride(1), dq.stride(2),
            q_heads, q_len, group, scale,
            BLOCK_C=cfg.block_c, BLOCK_DT=cfg.block_t, BLOCK_DV=pad_dv, HAS_STATE_IN=has_in,
            **launch_options(cfg), **common,
        )
    if kv_len == 0:
        return dq, dk, dv
    cfg = chunk_config("dk", head_dim, head_dim_v, q.dtype)
    linear_bwd_dk[(batch * kv_heads, cdiv(head_dim, cfg.block_t))](
        q, k, v, dout, dk, den, cc,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        dout.stride(0), dout.stride(1), dout.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2),
        kv_heads, q_len, kv_len, group, scale,
        BLOCK_C=cfg.block_c, BLOCK_DT=cfg.block_t, BLOCK_DV=pad_dv,
        **launch_options(cfg), **common,
    )
    cfg = chunk_config("dv", head_dim, head_dim_v, q.dtype, causal)
    linear_bwd_dv[(batch * kv_heads, cdiv(head_dim_v, cfg.block_t))](
        q, k, dout, dv, den,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        dout.stride(0), dout.stride(1), dout.stride(2),
        dv.stride(0), dv.stride(1), dv.stride(2),
        kv_heads, q_len, kv_len, group, scale,
        BLOCK_C=cfg.block_c, BLOCK_D=pad_d, BLOCK_DVT=cfg.block_t,
        **launch_options(cfg), **common,
    )
    return dq, dk, dv
