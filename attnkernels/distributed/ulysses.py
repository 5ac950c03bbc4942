"""Ulysses (DeepSpeed's all-to-all) context parallelism: sequence shards -> head shards and back.

q, k, v (B, H, N/P, D) per rank; an all-to-all turns them into (B, H/P, N, D) — every rank the
whole sequence for H/P heads — the local kernel runs any softmax family (dense, causal, window,
block-sparse) and a second all-to-all returns (B, H, N/P, Dv). Needs Hq and Hk divisible by P.
gloo (this torch) and NCCL both have `all_to_all_single`.
"""
from __future__ import annotations

from torch import Tensor

from .. import _checks
from ..softmax.api import attention
from . import comm


def ulysses_attention(q: Tensor, k: Tensor, v: Tensor, *, group=None, **attention_kwargs) -> Tensor:
    """This rank's out (B, Hq, N/P, Dv) of `attention(q, k, v, **attention_kwargs)` on the gathered
    sequence (contiguous sharding: rank r holds positions [rL, (r+1)L))."""
    _checks.check_qkv(q, k, v)
    _, world = comm.rank_and_world(group)
    ok = q.shape[1] % world == 0 and k.shape[1] % world == 0
    comm.agree(ok, f"q, k: Ulysses splits heads over the {world} ranks: Hq={q.shape[1]} and Hk={k.shape[1]} must be "
                   f"multiples of {world}", group)
    if attention_kwargs.get("return_lse"):
        raise ValueError("return_lse: not supported by ulysses_attention (use ring_attention)")
    q, k, v = (comm.AllToAll.apply(t.contiguous(), 1, 2, group) for t in (q, k, v))  # (B, H/P, N, D)
    out = attention(q, k, v, **attention_kwargs)
    return comm.AllToAll.apply(out.contiguous(), 2, 1, group)  # (B, H, N/P, Dv)
