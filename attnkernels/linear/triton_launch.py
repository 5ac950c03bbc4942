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

from ..triton_common import cdiv, dot_precision, last_dim_contiguous, launch_options, Override, pad_dim, row_strides
from .triton_kernels import (FEATURE_MAPS, linear_chunk_bwd_dkdv, linear_chunk_bwd_dq, linear_chunk_fwd,
                             linear_chunk_state)

__all__ = ["forward", "backward", "chunk_config", "override_chunk", "ChunkConfig", "FEATURE_MAPS", "KERNELS"]


# ----------------------------------------------------------------------------------------
# Chunk configs
# ----------------------------------------------------------------------------------------


class ChunkConfig(NamedTuple):
    block_c: int  # chunk length C
    block_m: int  # state rows (features) per program: an M tile ("state"), the padded D otherwise
    block_v: int  # state columns per program: a Dv tile ("state"), the padded Dv otherwise
    num_warps: int
    num_stages: int
    # all 255 registers per thread: else ptxas may spill to keep 2 blocks per SM
    maxnreg: int = 255
    block_t: int = 0  # "dkdv": output columns per program (of dK and of dV)


KERNELS = ("state", "fwd", "dq", "dkdv")
CHUNK = 64  # C: 64 rows fill one warpgroup's wgmma (m64) and keep the state pass N/64 steps long
STATE_TILE = 64  # the state pass's [M, Dv] tile: 64 x 64, one wgmma-sized matmul per chunk
_CHUNK = Override()


def override_chunk(block_c: int):
    """Test hook: launch every kernel with chunk length `block_c` (a power of two >= 16) and
    state-pass tiles of at most `block_c` x `block_c`, so small interpreter shapes span
    several chunks and state tiles. Only the tile sizes change."""
    return _CHUNK.set(block_c)


def chunk_config(kernel: str, head_dim: int, head_dim_v: int, dtype: torch.dtype = torch.float16,
                 causal: bool = True, prec: str | None = None, arch: int = 90) -> ChunkConfig:
    """GPU launch config per kernel ("state", "fwd", "dq", "dkdv"), for the padded dims, the
    dot precision (`dot_precision(dtype)` unless given) and the arch (80: sm_80, 90: sm_90a).
    The chunk length depends on the call only, never on the kernel or the arch: the passes
    exchange per-chunk states.

    fp16/bf16: C = 64 (one warpgroup's wgmma m64). The state pass holds one [64, 64] float32
    state tile and streams [C, 64] operand tiles: 2 stages overlap the next chunk's loads with
    the dot. The output and dq passes hold whole [C, D] / [C, Dv] tiles and a [D, Dv] state
    operand with no loop (4 warps, 8 at 128); dk/dv holds both gradients (8 warps, 4 at
    D <= 64 on sm_80; its GQA group loop is pipelined on sm_90a at 64, not at 128 nor on
    sm_80, where 2 stages spill).
    sm_80's mma.sync keeps whole operands in registers: there the output pass tiles Dv and dq
    tiles D by 64 at 128 (φ then recomputed per tile), and the causal passes, whose [C, C]
    product feeds another dot, run on 4 warps (8 would compute every mma slice twice), dq's
    D tiles 32 wide at 128. TF32 (fp32 with TF32 matmuls): 4-byte
    operands, C = 32, 64-wide output tiles at 128. Exact fp32 ("ieee") dots run as FMAs that
    keep whole operand rows per thread: C = 16, 64-wide output tiles at 128 (dk/dv: 64 on
    sm_90a, 32 on sm_80). 8 warps x 255 registers is the register file: no more warps.
    Checked spill-free by the compile gate (`python -m attnkernels.tools.compile_report
    --filter linear_`).
    """
    d, dv = pad_dim(head_dim), pad_dim(head_dim_v)
    prec = dot_precision(dtype) if prec is None else prec
    exact = dtype == torch.float32 and prec == "ieee"
    tf32 = dtype == torch.float32 and not exact
    big = max(d, dv)
    if _CHUNK.value is not None:
        c, tile = _CHUNK.value, min(STATE_TILE, _CHUNK.value)
    else:
        c, tile = (16 if exact else 32 if tf32 else CHUNK), STATE_TILE
    split = big > 64 and (exact or tf32 or arch < 90)  # 64-wide output tiles in fwd / dq
    warps = 8 if exact or tf32 or big > 64 else 4
    # 16-bit on sm_80 (mma.sync), causal: the [C, C] product feeds another dot, so Triton lays
    # all warps along the C = 64 rows, and 8 warps would compute each 16-row mma slice twice
    # (2.0x, compile gate): these passes run on 4 warps (1.0x), spill-free since the kernels
    # read q / k for φ' only at the end and take den's float32 sums before the dots
    mma80_causal = causal and arch < 90 and not (exact or tf32)
    if kernel == "state":
        cfg = ChunkConfig(c, min(d, tile), min(dv, tile), 8 if exact or tf32 else 4, 2)
    elif kernel == "fwd":
        cfg = ChunkConfig(c, d, min(dv, 64) if split else dv, 4 if mma80_causal else warps, 1)
    elif kernel == "dq":
        # sm_80 causal at D = 128: 32-wide D tiles on 4 warps (64-wide ones spill 4-72 B), P
        # then recomputed per D tile; else 8 warps (4 spill), but 4 for fp16 at D <= 64
        if mma80_causal:
            cfg = ChunkConfig(c, min(d, 32) if big > 64 else d, dv, 4, 1)
        else:
            cfg = ChunkConfig(c, min(d, 64) if split else d, dv,
                              warps if arch >= 90 else 4 if dtype == torch.float16 and big <= 64 else 8, 1)
    elif kernel == "dkdv":
        # sm_80, 16-bit, D <= 64: 8 warps on the 64 rows would compute each 16-row mma slice
        # twice (compile gate, 2.0x); 4 are spill-free there
        warps = 4 if not (exact or tf32) and big <= 64 and arch < 90 else 8
        cfg = ChunkConfig(c, d, dv, warps, 2 if big <= 64 and arch >= 90 else 1, block_t=(64 if arch >= 90 else 32) if exact and big > 64 else big)
    else:
        raise ValueError(f"chunk_config: unknown kernel {kernel!r}; expected one of {KERNELS}")
    return cfg


def device_arch(device: torch.device) -> int:
    """80 / 90 (the config family) of a CUDA device; 90 for CPU tensors (the interpreter)."""
    if device.type != "cuda":
        return 90
    major, _ = torch.cuda.get_device_capability(device)
    return 90 if major >= 9 else 80


# ----------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------


def _feature_map_id(name: str) -> int:
    """The kernels' constexpr for an elementwise map; a direct op call with another name is refused here."""
    if name not in FEATURE_MAPS:
        raise ValueError(f"feature_map: the Triton kernels fuse {sorted(FEATURE_MAPS)}, got {name!r}")
    return FEATURE_MAPS[name]


def split_phi(dtype: torch.dtype, fm: int) -> bool:
    """Whether the forward state pass adds φ(k)'s 16-bit rounding remainder (see triton_kernels)."""
    return dtype in (torch.float16, torch.bfloat16) and fm == FEATURE_MAPS["elu"]


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


def _state_pass(x, y, w, s_in, z_in, *, group, scale, fm, reverse, store_chunks, store_final, has_z, prec,
                split=False):
    """`linear_chunk_state` over x (B, Hk·group, N, M), y (B, Hk·group, N, Dv): returns
    (H (B, Hk, N/C, M, Dv), HZ (B, Hk, N/C, M)) with store_chunks, else (None, None), and
    (S, z) (B, Hk, M, Dv), (B, Hk, M) with store_final, else (None, None); float32."""
    batch, x_heads, n, feat = x.shape
    head_dim_v = y.shape[-1]
    kv_heads = x_heads // group
    cfg = chunk_config("state", feat, head_dim_v, x.dtype, prec=prec, arch=device_arch(x.device))
    f32 = dict(dtype=torch.float32, device=x.device)
    n_t = cdiv(n, cfg.block_c)
    h = hz = s = z = None
    if store_chunks:
        h = torch.empty(batch, kv_heads, n_t, feat, head_dim_v, **f32)
        hz = torch.empty(batch, kv_heads, n_t, feat, **f32)
    if store_final:
        s = torch.empty(batch, kv_heads, feat, head_dim_v, **f32)
        z = torch.empty(batch, kv_heads, feat, **f32)
    grid = (batch * kv_heads, cdiv(feat, cfg.block_m), cdiv(head_dim_v, cfg.block_v))
    if grid[0] * grid[1] * grid[2] == 0:
        return (h, hz), (s, z)
    dummy = next(t for t in (h, s) if t is not None)  # pointer of a disabled argument, never read
    has_in = s_in is not None
    linear_chunk_state[grid](
        x, y, dummy if w is None else w, s_in if has_in else dummy, z_in if has_in else dummy,
        dummy if h is None else h, dummy if hz is None else hz, dummy if s is None else s, dummy if z is None else z,
        *row_strides(x),
        *row_strides(y),
        kv_heads, n, group, float(scale),
        HEAD_DIM=feat, HEAD_DIM_V=head_dim_v, BLOCK_C=cfg.block_c, BLOCK_M=cfg.block_m, BLOCK_V=cfg.block_v,
        FEATURE_MAP=fm, REVERSE=reverse, STORE_CHUNKS=store_chunks, STORE_FINAL=store_final,
        HAS_STATE_IN=has_in, HAS_Z=has_z, HAS_W=w is not None, SPLIT_PHI=split, DOT_PREC=prec,
        **launch_options(cfg),
    )
    return (h, hz), (s, z)


def _forward_states(q, k, v, call, fm, prec, initial_s, initial_z):
    """The forward's state pass: ((H, HZ, n_state) for the output pass, (final S, final z))."""
    causal = call.causal
    (h, hz), (s, z) = _state_pass(k, v, None, initial_s, initial_z, group=1, scale=1.0, fm=fm, reverse=False,
                                  store_chunks=causal, store_final=True, has_z=True, prec=prec,
                                  split=split_phi(k.dtype, fm))
    if causal:
        return (h, hz, h.shape[2]), (s, z)
    return (s, z, 1), (s, z)  # non-causal: every chunk reads the full state


def _output_pass(q, k, v, states, call, fm, prec, write_den=False):
    """`linear_chunk_fwd`: (out (B, Hq, Nq, Dv) in q's dtype, den (B, Hq, Nq) float32 or None)."""
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, head_dim_v = k.shape[1], v.shape[-1]
    h, hz, n_state = states
    cfg = chunk_config("fwd", head_dim, head_dim_v, q.dtype, call.causal, prec, device_arch(q.device))
    out = torch.empty(batch, q_heads, q_len, head_dim_v, dtype=q.dtype, device=q.device)
    den = torch.empty(batch, q_heads, q_len, dtype=torch.float32, device=q.device) if write_den else None
    grid = (cdiv(q_len, cfg.block_c), batch * q_heads, cdiv(head_dim_v, cfg.block_v))
    if grid[0] * grid[1] * grid[2] > 0:
        linear_chunk_fwd[grid](
            q, k, v, out, h, hz, den if write_den else out,
            *row_strides(q),
            *row_strides(k),
            *row_strides(v),
            *row_strides(out),
            q_heads, q_len, q_heads // kv_heads, n_state, float(call.scale), float(call.eps),
            HEAD_DIM=head_dim, HEAD_DIM_V=head_dim_v, BLOCK_C=cfg.block_c, BLOCK_D=cfg.block_m,
            BLOCK_DV=cfg.block_v, FEATURE_MAP=fm, CAUSAL=call.causal, NORMALIZE=call.normalize,
            WRITE_DEN=write_den, DOT_PREC=prec, **launch_options(cfg),
        )
    return out, den


def forward(call, q, k, v):
    """(out (B, Hq, Nq, Dv) in q's dtype, final S (B, Hk, D, Dv), final z (B, Hk, D) float32).

    Two launches: the serial state pass over the key chunks (`linear_chunk_state`: the state
    entering each chunk, causal, and the final state), then the output pass, one program per
    (query chunk, batch, query head) (`linear_chunk_fwd`)."""
    q, k, v, initial_s, initial_z = _prepare(call, q, k, v)
    fm, prec = _feature_map_id(call.feature_map), dot_precision(q.dtype)
    states, (s_out, z_out) = _forward_states(q, k, v, call, fm, prec, initial_s, initial_z)
    out, _ = _output_pass(q, k, v, states, call, fm, prec)
    return out, s_out, z_out


def _gradient_weights(dout, out, den, kv_heads, eps):
    """(g = R·do/den in the input dtype, c' = R·c = -R·(do · o)/den float32, 1/R (B, Hk) float32).

    R is a power of two per (batch, kv head) that brings the largest 1/den of the group to
    [1, 2): 1/den shrinks like 1/N, and fp16 (5 exponent bits) would flush it to subnormals
    at a few thousand tokens. Rows whose den is eps alone (φ(q) = 0: they add nothing) do not
    set R. R = 1 for fp32/bf16 (float32's exponent range), where it is not needed."""
    batch, q_heads, q_len, _ = dout.shape
    rden = 1.0 / den  # [B, Hq, Nq]
    cc = -(dout.float() * out.float()).sum(-1) * rden
    if dout.dtype == torch.float16 and q_len:
        live = torch.where(den > 2 * eps, rden, torch.zeros_like(rden))
        top = live.reshape(batch, kv_heads, -1).amax(-1)  # [B, Hk]
        r = torch.where(top > 0, torch.exp2(-torch.floor(torch.log2(top))), torch.ones_like(top))
    else:
        r = torch.ones(batch, kv_heads, dtype=torch.float32, device=dout.device)
    r_q = r.repeat_interleave(q_heads // kv_heads, dim=1)[:, :, None]  # [B, Hq, 1]
    g = dout.float() * (rden * r_q)[..., None]
    if dout.dtype == torch.float16:
        g = g.clamp(-65504.0, 65504.0)
    return g.to(dout.dtype), (cc * r_q).contiguous(), (1.0 / r).contiguous()


def backward(call, dout, q, k, v):
    """(dq, dk, dv) in the inputs' dtypes; the forward is recomputed (no gradient to the state).

    1. the forward state pass (states entering each query chunk, causal; the full state
       otherwise) and, with normalize, the output pass again for out and den, giving
       g = do/den and c = -(do · o)/den per query row (in torch, scaled by R);
    2. the reverse state pass over the query chunks on (φ(q), g, c): dS and dz of the later
       chunks entering each key chunk (causal) or of all queries (non-causal);
    3. `linear_chunk_bwd_dq` per (query chunk, query head) and `linear_chunk_bwd_dkdv` per
       (key chunk, kv head), both parallel."""
    q, k, v, initial_s, initial_z = _prepare(call, q, k, v)
    if tuple(dout.shape) != (*q.shape[:3], v.shape[-1]):
        raise ValueError(f"linear attention (triton): dout: expected shape {(*q.shape[:3], v.shape[-1])}, got {tuple(dout.shape)}")
    causal, normalize, scale = call.causal, call.normalize, float(call.scale)
    dout = last_dim_contiguous(dout.to(q.dtype))
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, kv_len, head_dim_v = k.shape[1], k.shape[2], v.shape[-1]
    fm, prec = _feature_map_id(call.feature_map), dot_precision(q.dtype)
    group = q_heads // kv_heads
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if dq.numel() == 0 and dk.numel() == 0 and dv.numel() == 0:
        return dq, dk, dv
    states, _ = _forward_states(q, k, v, call, fm, prec, initial_s, initial_z)
    if normalize:
        out, den = _output_pass(q, k, v, states, call, fm, prec, write_den=True)
        g, cp, rinv = _gradient_weights(dout, out, den, kv_heads, call.eps)
    else:
        g, cp, rinv = dout, None, None
    f32 = dict(dtype=torch.float32, device=q.device)
    unused = torch.zeros(1, **f32)
    if q_len and kv_len:
        # dS, dz of the queries that see each key chunk: Σ over the later chunks (causal) or all
        (dh, dhz), (ds, dz) = _state_pass(q, g, cp, None, None, group=group, scale=scale, fm=fm, reverse=True,
                                          store_chunks=causal, store_final=not causal, has_z=normalize,
                                          prec=prec)
        d_states = (dh, dhz, dh.shape[2]) if causal else (ds, dz, 1)
    else:  # no query sees any key: dS = 0 everywhere
        d_states = (torch.zeros(batch, kv_heads, 1, head_dim, head_dim_v, **f32),
                    torch.zeros(batch, kv_heads, 1, head_dim, **f32), 1)
    common = dict(HEAD_DIM=head_dim, HEAD_DIM_V=head_dim_v, FEATURE_MAP=fm, CAUSAL=causal, NORMALIZE=normalize,
                  DOT_PREC=prec)
    h, hz, n_state = states
    cfg = chunk_config("dq", head_dim, head_dim_v, q.dtype, causal, prec, device_arch(q.device))
    grid = (cdiv(q_len, cfg.block_c), batch * q_heads, cdiv(head_dim, cfg.block_m))
    if grid[0] * grid[1] * grid[2] > 0:
        linear_chunk_bwd_dq[grid](
            q, k, v, g, unused if cp is None else cp, h, hz, unused if rinv is None else rinv, dq,
            *row_strides(q),
            *row_strides(k),
            *row_strides(v),
            *row_strides(g),
            *row_strides(dq),
            q_heads, q_len, group, n_state, scale,
            BLOCK_C=cfg.block_c, BLOCK_D=cfg.block_m, BLOCK_DV=cfg.block_v, **launch_options(cfg), **common,
        )
    dh, dhz, n_dstate = d_states
    cfg = chunk_config("dkdv", head_dim, head_dim_v, q.dtype, causal, prec, device_arch(q.device))
    grid = (cdiv(kv_len, cfg.block_c), batch * kv_heads, cdiv(max(head_dim, head_dim_v), cfg.block_t))
    if grid[0] * grid[1] > 0:
        linear_chunk_bwd_dkdv[grid](
            q, k, v, g, unused if cp is None else cp, dh, unused if dhz is None else dhz,
            unused if rinv is None else rinv, dk, dv,
            *row_strides(q),
            *row_strides(k),
            *row_strides(v),
            *row_strides(g),
            *row_strides(dk),
            *row_strides(dv),
            kv_heads, q_len, kv_len, group, n_dstate, scale,
            BLOCK_C=cfg.block_c, BLOCK_D=cfg.block_m, BLOCK_DV=cfg.block_v, BLOCK_T=cfg.block_t,
            **launch_options(cfg), **common,
        )
    return dq, dk, dv
