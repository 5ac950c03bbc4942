"""The point-to-point and all-to-all plumbing of context parallelism, on torch.distributed.

Ranks are positions in `group` (None = the default group); the helpers translate them to
global ranks for the p2p calls. gloo (CPU) and NCCL (GPU) both run these calls.
"""
from __future__ import annotations

import contextlib
import time

import torch
import torch.distributed as dist
from torch import Tensor


# What this process sent and how long it spent in kernels, for the benchmarks (reset by the caller).
stats = {"bytes_sent": 0, "busy_s": 0.0}


def rank_and_world(group) -> tuple[int, int]:
    return dist.get_rank(group), dist.get_world_size(group)


def control_device(group) -> torch.device:
    """Where small control tensors (flags, lengths) live: NCCL only moves CUDA tensors, gloo CPU ones."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _global(group, rank: int) -> int:
    return rank if group is None else dist.get_global_rank(group, rank)


def exchange(send: list[tuple[int, Tensor]], recv: list[tuple[int, Tensor]], group) -> list:
    """Start the isend of each (peer, tensor) in `send` and the irecv into each of `recv` (peers are group
    ranks, matched in order per peer pair); returns the requests to wait on."""
    stats["bytes_sent"] += sum(t.numel() * t.element_size() for _, t in send)
    ops = [dist.P2POp(dist.isend, t, _global(group, peer), group) for peer, t in send if t.numel()]
    ops += [dist.P2POp(dist.irecv, t, _global(group, peer), group) for peer, t in recv if t.numel()]
    return dist.batch_isend_irecv(ops) if ops else []


def wait(requests: list) -> None:
    for request in requests:
        request.wait()


@contextlib.contextmanager
def busy():
    """Counts the time inside the block as kernel work (the load-balance measure of the benchmarks)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        stats["busy_s"] += time.perf_counter() - start


def agree(ok: bool, message: str, group) -> None:
    """Every rank raises when any rank's check failed, so none is left waiting in a collective."""
    flag = torch.tensor([0 if ok else 1], dtype=torch.int64, device=control_device(group))
    dist.all_reduce(flag, group=group)
    if int(flag) or not ok:
        raise ValueError(message if not ok else f"another rank refused this call ({int(flag)} rank(s) failed a check)")


class AllToAll(torch.autograd.Function):
    """Split `x` along `scatter_dim` into world pieces, send piece p to rank p, concatenate what arrives
    along `gather_dim`. Its gradient is the same exchange with the two dims swapped."""

    @staticmethod
    def forward(ctx, x: Tensor, scatter_dim: int, gather_dim: int, group):
        ctx.dims, ctx.group = (scatter_dim, gather_dim), group
        return _all_to_all(x, scatter_dim, gather_dim, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        scatter_dim, gather_dim = ctx.dims
        return _all_to_all(grad.contiguous(), gather_dim, scatter_dim, ctx.group), None, None, None


def _all_to_all(x: Tensor, scatter_dim: int, gather_dim: int, group) -> Tensor:
    world = dist.get_world_size(group)
    pieces = [p.contiguous() for p in x.chunk(world, dim=scatter_dim)]
    send = torch.stack(pieces)  # [world, ...piece]
    received = torch.empty_like(send)
    stats["bytes_sent"] += send.numel() * send.element_size() * (world - 1) // world
    dist.all_to_all_single(received, send, group=group)
    return torch.cat(received.unbind(0), dim=gather_dim)
