"""Ring attention: the sequence sharded over the ranks of a process group, K/V blocks passed around.

Each rank holds q, k, v shards (B, H, L, D) of one global sequence (N = P·L). For P steps,
rank r attends its queries to the K/V block it holds, then passes the block to rank r+1
(the next block's transfer overlaps the current block's kernels); partial outputs are
merged in fp32 by their LSE. The backward walks the ring again with the global output
and LSE (so each block's P = exp(S − lse) is its exact slice of the softmax), dK/dV
accumulators travelling with their K/V block and arriving home after the last step.

Layouts: "contiguous" (rank r holds positions [rL, (r+1)L)) or "zigzag" for causal load
balance (rank r holds chunks r and 2P−1−r of size N/2P: every rank does the same work;
`zigzag_shard` / `zigzag_unshard` convert). Causal is over the global sequence; windows go
to the halo exchange (halo.py) instead of the ring.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..conventions import UNBOUNDED
from ..op_call import accumulation_dtype
from ..softmax.call import SoftmaxCall
from . import comm

LAYOUTS = ("contiguous", "zigzag")


def segments(layout: str, rank: int, world: int, shard_len: int) -> list[tuple[int, int]]:
    """(global start, length) of the pieces a rank holds, in the order they are concatenated."""
    if layout == "contiguous":
        return [(rank * shard_len, shard_len)]
    chunk = shard_len // 2
    return [(rank * chunk, chunk), ((2 * world - 1 - rank) * chunk, chunk)]


def zigzag_shard(x: Tensor, rank: int, world: int, dim: int = 2) -> Tensor:
    """This rank's zigzag shard of a full sequence: chunks rank and 2·world−1−rank of 2·world."""
    chunks = x.chunk(2 * world, dim=dim)
    return torch.cat([chunks[rank], chunks[2 * world - 1 - rank]], dim=dim)


def zigzag_unshard(shards: list[Tensor], dim: int = 2) -> Tensor:
    """The full sequence from every rank's zigzag shard (in rank order)."""
    world = len(shards)
    firsts = [s.chunk(2, dim=dim)[0] for s in shards]
    seconds = [s.chunk(2, dim=dim)[1] for s in shards]
    return torch.cat(firsts + seconds[::-1], dim=dim)


def pair_window(q_seg: tuple[int, int], k_seg: tuple[int, int], causal: bool) -> tuple[int, int] | None:
    """The kernel's (left, right) for queries q_seg against keys k_seg under the global rule, or None
    when no query sees a key. Global causal jg <= ig is, in local indices, j <= i + (q0 - k0); the
    kernel's bottom-right band is j <= i + (Lk - Lq) + right."""
    if not causal:
        return UNBOUNDED, UNBOUNDED
    (q0, q_len), (k0, k_len) = q_seg, k_seg
    if k0 > q0 + q_len - 1:
        return None  # every key is after every query
    right = (q0 - k0) - (k_len - q_len)
    if right >= q_len - 1:
        return UNBOUNDED, UNBOUNDED  # every query sees every key: the dense path, not a wide band
    if right < 0:  # a diagonal inside the tile but not expressible as a band: equal aligned pieces never do this
        raise ValueError(f"ring attention: pieces {q_seg} / {k_seg} cut the causal diagonal unevenly")
    return UNBOUNDED, right


def _merge(acc_out: Tensor, acc_lse: Tensor, out: Tensor, lse: Tensor) -> tuple[Tensor, Tensor]:
    """Two partial softmax results over disjoint keys -> their union (fp32 or fp64 accumulators)."""
    new = torch.logaddexp(acc_lse, lse)
    finite = torch.where(torch.isneginf(new), torch.zeros_like(new), new)  # both empty: weights exp(-inf) = 0
    out = acc_out * torch.exp(acc_lse - finite)[..., None] + out.to(acc_out.dtype) * torch.exp(lse - finite)[..., None]
    return out, new


def _pieces(x: Tensor, segs: list[tuple[int, int]]) -> list[Tensor]:
    return list(x.split([length for _, length in segs], dim=2))


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale: float, causal: bool, layout: str, group):
        rank, world = comm.rank_and_world(group)
        shard = q.shape[2]
        acc_dtype = accumulation_dtype(q.dtype)
        q_segs = segments(layout, rank, world, shard)
        q_pieces = _pieces(q, q_segs)
        acc = [(p.new_zeros(*p.shape[:3], v.shape[-1], dtype=acc_dtype),
                torch.full(p.shape[:3], float("-inf"), dtype=acc_dtype, device=p.device)) for p in q_pieces]
        block = torch.cat([k.reshape(-1), v.reshape(-1)])
        for step in range(world):
            source = (rank - step) % world
            requests, incoming = [], None
            if step < world - 1:  # the next block's transfer runs while this one is computed
                incoming = torch.empty_like(block)
                requests = comm.exchange([((rank + 1) % world, block)], [((rank - 1) % world, incoming)], group)
            k_b, v_b = block[: k.numel()].view_as(k), block[k.numel():].view_as(v)
            k_segs = segments(layout, source, world, shard)
            for i, (q_seg, q_piece) in enumerate(zip(q_segs, q_pieces)):
                for k_seg, k_piece, v_piece in zip(k_segs, _pieces(k_b, k_segs), _pieces(v_b, k_segs)):
                    window = pair_window(q_seg, k_seg, causal)
                    if window is None:
                        continue
                    call = SoftmaxCall(scale, *window)
                    with comm.busy():
                        out, lse = torch.ops.attnkernels.attention_fwd(q_piece, k_piece, v_piece, *call.op_args())
                        acc[i] = _merge(*acc[i], out, lse)
            comm.wait(requests)
            if incoming is not None:
                block = incoming
        out = torch.cat([o for o, _ in acc], dim=2).to(q.dtype)
        lse = torch.cat([lse for _, lse in acc], dim=2).to(accumulation_dtype(q.dtype))
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.options = (scale, causal, layout, group)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        scale, causal, layout, group = ctx.options
        rank, world = comm.rank_and_world(group)
        shard = q.shape[2]
        acc_dtype = accumulation_dtype(q.dtype)
        grad_out = grad_out.contiguous()
        q_segs = segments(layout, rank, world, shard)
        q_pieces, do_pieces = _pieces(q, q_segs), _pieces(grad_out, q_segs)
        o_pieces, lse_pieces = _pieces(out, q_segs), list(lse.split([n for _, n in q_segs], dim=2))
        dq = [p.new_zeros(p.shape, dtype=acc_dtype) for p in q_pieces]
        block = torch.cat([k.reshape(-1), v.reshape(-1)])
        grads = block.new_zeros(block.numel(), dtype=acc_dtype)  # dK, dV of the block held, travelling with it
        nxt, prev = (rank + 1) % world, (rank - 1) % world
        for step in range(world):
            source = (rank - step) % world
            k_b, v_b = block[: k.numel()].view_as(k), block[k.numel():].view_as(v)
            dk_b, dv_b = grads[: k.numel()].view(k.shape), grads[k.numel():].view(v.shape)
            k_segs = segments(layout, source, world, shard)
            for i, q_seg in enumerate(q_segs):
                offset = 0
                for k_seg in k_segs:
                    window = pair_window(q_seg, k_seg, causal)
                    rows = slice(offset, offset + k_seg[1])
                    offset += k_seg[1]
                    if window is None:
                        continue
                    call = SoftmaxCall(scale, *window)
                    with comm.busy():
                        dq_p, dk_p, dv_p, _ = torch.ops.attnkernels.attention_bwd(
                            do_pieces[i], q_pieces[i], k_b[:, :, rows], v_b[:, :, rows], o_pieces[i], lse_pieces[i],
                            False, *call.op_args())
                        dq[i] += dq_p
                        dk_b[:, :, rows] += dk_p
                        dv_b[:, :, rows] += dv_p
            if step < world - 1:  # pass the block and its gradients on; receive the previous rank's
                incoming, incoming_grads = torch.empty_like(block), torch.empty_like(grads)
                comm.wait(comm.exchange([(nxt, block), (nxt, grads)], [(prev, incoming), (prev, incoming_grads)], group))
                block, grads = incoming, incoming_grads
        if world > 1:  # the gradients held belong to rank + 1: one more hop brings every block's home
            home = torch.empty_like(grads)
            comm.wait(comm.exchange([(nxt, grads)], [(prev, home)], group))
            grads = home
        dk, dv = grads[: k.numel()].view(k.shape), grads[k.numel():].view(v.shape)
        return (torch.cat(dq, dim=2).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None)


def ring_attention(q: Tensor, k: Tensor, v: Tensor, *, group=None, causal: bool = False, window_size=None,
                   scale: float | None = None, layout: str = "contiguous", return_lse: bool = False):
    """Attention over a sequence sharded along N across the ranks of `group`.

    q (B, Hq, L, D), k/v (B, Hk, L, D/Dv) on every rank, the same L everywhere; rank r holds positions
    [rL, (r+1)L) ("contiguous") or zigzag chunks r and 2P−1−r ("zigzag", L even; see zigzag_shard).
    Returns this rank's out (B, Hq, L, Dv) [and LSE (B, Hq, L)], equal to the single-process kernel
    on the gathered sequence. Differentiable in q, k, v. A `window_size` with both sides bounded goes
    to the halo exchange (halo.py: only boundary rows travel, no ring); (-1, 0) is causal.
    """
    from .. import _checks
    from ..conventions import softmax_scale

    _checks.check_qkv(q, k, v)
    scale = softmax_scale(scale, q.shape[-1])
    _checks.check_bool("causal", causal)
    if window_size is not None:
        from ..softmax.windows import resolve_window
        from .halo import halo_window_attention

        window = resolve_window(window_size, causal)
        if window not in ((UNBOUNDED, UNBOUNDED), (UNBOUNDED, 0)):
            if layout != "contiguous":
                raise ValueError("layout: windows run the halo exchange, which needs layout='contiguous'")
            return halo_window_attention(q, k, v, window, group=group, scale=scale, return_lse=return_lse)
        causal = window == (UNBOUNDED, 0)
    rank, world = comm.rank_and_world(group)
    device = comm.control_device(group)
    lengths = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    mine = torch.tensor([q.shape[2] if q.shape[2] == k.shape[2] else -1], device=device)
    torch.distributed.all_gather(lengths, mine, group=group)
    ok, why = True, ""
    if layout not in LAYOUTS:
        ok, why = False, f"layout: expected one of {LAYOUTS}, got {layout!r}"
    elif q.shape[2] != k.shape[2]:
        ok, why = False, f"k: each rank's key shard must have its query shard's length {q.shape[2]}, got {k.shape[2]}"
    elif len({int(t) for t in lengths}) != 1:
        ok, why = False, f"q: shard lengths differ across ranks ({[int(t) for t in lengths]}); pad or shard evenly"
    elif layout == "zigzag" and q.shape[2] % 2:
        ok, why = False, f"q: a zigzag shard holds two equal chunks, so its length must be even, got {q.shape[2]}"
    comm.agree(ok, why, group)
    q, k, v = (t.contiguous() for t in (q, k, v))
    out, lse = _RingAttention.apply(q, k, v, scale, causal, layout, group)
    return (out, lse) if return_lse else out
