"""Context parallelism on torch.distributed (gloo on CPU, NCCL on GPU): one sequence sharded over ranks.

ring_attention (contiguous or zigzag-balanced causal), halo_window_attention (windows: only the
boundary rows travel), sharded_sparse_attention (only the key blocks a rank's rows list travel), ulysses_attention (all-to-all to head shards); zigzag_shard/unshard.
"""
from .block_sparse import sharded_sparse_attention
from .halo import halo_bytes, halo_window_attention
from .ring import ring_attention, zigzag_shard, zigzag_unshard
from .ulysses import ulysses_attention

__all__ = ["ring_attention", "sharded_sparse_attention", "halo_window_attention", "halo_bytes", "ulysses_attention", "zigzag_shard",
           "zigzag_unshard"]
