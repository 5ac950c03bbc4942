"""Block-sparse attention over a sharded sequence: only the key blocks a rank's rows need travel.

The global BlockMask is sharded by query rows (rank r holds query and key blocks
[r·L/b, (r+1)·L/b) of the contiguous layout). Rank r needs the union of the key blocks its
query blocks list; one all-to-all fetches exactly those from their owners, the local kernel
runs on the fetched keys with the mask's rows re-indexed to them, and the backward sends the
fetched blocks' dK/dV home with the reverse all-to-all. For BigBird that is the window,
global and random blocks, not the sequence.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from ..softmax.api import sparse_attention
from ..softmax.masks import BlockMask, from_dense
from . import comm


def send_counts_of(send_blocks: list) -> list[int]:
    return [len(blocks) for blocks in send_blocks]


class _FetchBlocks(torch.autograd.Function):
    """x (B, H, L, D) -> the requested blocks of every rank's shard, (B, H, n_recv·b, D) in global order."""

    @staticmethod
    def forward(ctx, x: Tensor, send_blocks: list, recv_counts: list, block: int, group):
        batch, heads, _, dim = x.shape
        tiles = x.view(batch, heads, -1, block, dim).permute(2, 0, 1, 3, 4)  # [nb_local, B, H, b, D]
        order = torch.tensor([i for blocks in send_blocks for i in blocks], dtype=torch.long, device=x.device)
        send = tiles[order].contiguous()  # [n_send, B, H, b, D], grouped by destination rank
        recv = send.new_empty(sum(recv_counts), batch, heads, block, dim)
        send_counts = send_counts_of(send_blocks)
        me = dist.get_rank(group)
        per_block = send[0].numel() * send.element_size() if len(send) else 0
        comm.stats["bytes_sent"] += per_block * sum(n for peer, n in enumerate(send_counts_of(send_blocks)) if peer != me)
        dist.all_to_all_single(recv, send, recv_counts, send_counts, group=group)
        ctx.save_for_backward(order)
        ctx.meta = (x.shape, send_counts, recv_counts, block, group)
        return recv.permute(1, 2, 0, 3, 4).reshape(batch, heads, -1, dim)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (order,) = ctx.saved_tensors
        shape, send_counts, recv_counts, block, group = ctx.meta
        batch, heads, _, dim = shape
        grad_tiles = grad.reshape(batch, heads, -1, block, dim).permute(2, 0, 1, 3, 4).contiguous()
        back = grad_tiles.new_empty(sum(send_counts), batch, heads, block, dim)
        dist.all_to_all_single(back, grad_tiles, send_counts, recv_counts, group=group)
        dx = grad.new_zeros(shape[2] // block, batch, heads, block, dim)
        dx.index_add_(0, order, back)  # a block sent to several ranks sums their gradients
        return dx.permute(1, 2, 0, 3, 4).reshape(shape), None, None, None, None


def sharded_sparse_attention(q: Tensor, k: Tensor, v: Tensor, block_mask: BlockMask, *, group=None,
                             scale: float | None = None) -> Tensor:
    """This rank's rows of `sparse_attention(q_full, k_full, v_full, block_mask)`, q/k/v sharded contiguously.

    block_mask: the global mask (N = P·L); its block size must divide L, and it must not be causal (the
    element causal rule would need global indices). Bytes sent: the requested blocks only (comm.stats).
    """
    rank, world = comm.rank_and_world(group)
    block, shard = block_mask.block_size, q.shape[2]
    ok, why = True, ""
    if not isinstance(block_mask, BlockMask):
        ok, why = False, f"block_mask: expected an attnkernels.masks.BlockMask, got {type(block_mask).__name__}"
    elif shard % block or k.shape[2] != shard or block_mask.q_len != shard * world or block_mask.kv_len != shard * world:
        ok, why = False, (f"block_mask: needs N = P·L = {shard * world} on both sides and block size {block} dividing "
                          f"the shard length {shard} (k's shard: {k.shape[2]})")
    elif block_mask.causal:
        ok, why = False, "block_mask: causal block masks are not supported sharded (use ring_attention for causal)"
    comm.agree(ok, why, group)
    per_rank = shard // block
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    layout = block_mask.to_dense()[:, :, mine]  # [Bm, Hm, my query blocks, all key blocks]
    needed = layout.flatten(0, 2).any(0).nonzero().flatten()  # sorted global key blocks any of my rows lists
    # who needs what: every rank's list, padded to the longest, gathered everywhere
    device = comm.control_device(group)
    needed = needed.to(device)
    count = torch.tensor([needed.numel()], device=device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count, group=group)
    longest = max(int(c) for c in counts)
    padded = torch.full((longest,), -1, dtype=torch.long, device=device)
    padded[: needed.numel()] = needed
    lists = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(lists, padded, group=group)
    wanted = [lst[: int(c)] for lst, c in zip(lists, counts)]
    send_blocks = [[int(g) - rank * per_rank for g in w if rank * per_rank <= g < (rank + 1) * per_rank] for w in wanted]
    recv_counts = [int(((needed >= s * per_rank) & (needed < (s + 1) * per_rank)).sum()) for s in range(world)]
    k_f = _FetchBlocks.apply(k.contiguous(), send_blocks, recv_counts, block, group)
    v_f = _FetchBlocks.apply(v.contiguous(), send_blocks, recv_counts, block, group)
    local = from_dense(layout[..., needed.to(layout.device)], block_size=block)  # my query blocks x the fetched key blocks
    with comm.busy():
        return sparse_attention(q, k_f, v_f, local, scale=scale)
