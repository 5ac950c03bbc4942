"""Context parallelism on torch.distributed (gloo on CPU, NCCL on GPU): one sequence sharded over ranks.

ring_attention (contiguous or zigzag-balanced causal), halo_window_attention (windows: only the
boundary rows travel), ulysses_attention (all-to-all to head shards); zigzag_shard/unshard.
"""
from .halo import halo_bytes, halo_window_attention
from .ring import ring_attention, zigzag_shard, zigzag_unshard
from .ulysses import ulysses_attention

__all__ = ["ring_attention", "halo_window_attention", "halo_bytes", "ulysses_attention", "zigzag_shard",
           "zigzag_unshard"]
