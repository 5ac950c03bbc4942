"""The peers we compare against, built the way their users would build them.

Each builder returns a callable or None when the peer cannot run here (the
reason is printed, never hidden).
"""
from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F


def flex_attention_fn(mask_mod, batch, heads, q_len, kv_len, *, block_size=128, score_mod=None):
    """FlexAttention compiled on CPU (forward only: it has no CPU backward), with an optional score_mod."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    block_mask = create_block_mask(mask_mod, batch, heads, q_len, kv_len, device="cpu", BLOCK_SIZE=block_size)
    compiled = torch.compile(flex_attention, dynamic=False)
    return lambda q, k, v: compiled(q, k, v, block_mask=block_mask, score_mod=score_mod)


def flex_from_block_mask(block_mask):
    """FlexAttention compiled, running exactly our BlockMask's pattern."""
    from torch.nn.attention.flex_attention import flex_attention

    flex_mask = block_mask.to_flex_block_mask()
    compiled = torch.compile(flex_attention, dynamic=False)
    return lambda q, k, v: compiled(q, k, v, block_mask=flex_mask)


def masked_sdpa_fn(bool_mask):
    """torch SDPA with a materialised boolean mask (True = attend)."""
    return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=bool_mask)


def local_attention_fn(window_size: int, causal: bool):
    """lucidrains local-attention with exact_windowsize=True, or None if not installed."""
    if importlib.util.find_spec("local_attention") is None:
        print("local-attention is not installed: peer skipped")
        return None
    from local_attention import LocalAttention

    module = LocalAttention(window_size=window_size, causal=causal, look_backward=1, exact_windowsize=True, autopad=True)
    return lambda q, k, v: module(q, k, v)


def hf_bigbird_fn(seq_len, heads, head_dim, *, block_size, num_random_blocks, dtype=torch.float32):
    """HF transformers' BigBirdBlockSparseAttention (pure PyTorch), random-init config, no downloads.

    Takes (B, N, H·D) hidden states and does its own q/k/v projections, so its
    timing includes three (N × H·D) × (H·D × H·D) matmuls that ours does not:
    a small extra at H·D = 512. Train mode, so its random blocks are really random.
    Returns (fn taking hidden states, hidden size) or None.
    """
    if importlib.util.find_spec("transformers") is None:
        print("transformers is not installed: HF BigBird peer skipped")
        return None
    from transformers import BigBirdConfig
    from transformers.models.big_bird.modeling_big_bird import BigBirdBlockSparseAttention, BigBirdModel

    hidden = heads * head_dim
    config = BigBirdConfig(
        hidden_size=hidden, num_attention_heads=heads, attention_type="block_sparse", block_size=block_size,
        num_random_blocks=num_random_blocks, max_position_embeddings=max(seq_len, 4096), use_bias=True,
    )
    module = BigBirdBlockSparseAttention(config, seed=0).train().to(dtype)
    attention_mask = torch.ones(1, seq_len, dtype=dtype)
    blocked, band, from_mask, to_mask = BigBirdModel.create_masks_for_block_sparse_attn(attention_mask, block_size)

    def run(hidden_states):
        return module(hidden_states, band_mask=band, from_mask=from_mask, to_mask=to_mask,
                      from_blocked_mask=blocked, to_blocked_mask=blocked)[0]

    return run, hidden


def _elu_plus_one(x):
    return F.elu(x) + 1


def fla_naive_linear_fn(causal: bool):
    """flash-linear-attention's pure-PyTorch chunked linear attention (causal only), elu+1 applied by us.

    Its layout is (B, T, H, K); the transposes are views and counted in its time, as a
    user would have to do them too.
    """
    if not causal:
        return None
    if importlib.util.find_spec("fla") is None:
        print("fla (flash-linear-attention) is not installed: peer skipped")
        return None
    from fla.ops.linear_attn.naive import naive_chunk_linear_attn

    def run(q, k, v):
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        out = naive_chunk_linear_attn(_elu_plus_one(q), _elu_plus_one(k), v, scale=1.0, normalize=True)
        return out.transpose(1, 2)  # fla 0.6 returns the output alone
    return run


def performer_linear_fn(causal: bool):
    """performer-pytorch's linear attention (non-causal) / causal_linear_attention_noncuda, elu+1 applied by us."""
    if importlib.util.find_spec("performer_pytorch") is None:
        print("performer-pytorch is not installed: peer skipped")
        return None
    from performer_pytorch.performer_pytorch import causal_linear_attention_noncuda, linear_attention

    attend = causal_linear_attention_noncuda if causal else linear_attention
    return lambda q, k, v: attend(_elu_plus_one(q), _elu_plus_one(k), v)


def performer_fast_attention_fn(head_dim: int, num_features: int, dtype=torch.float32):
    """performer-pytorch's FastAttention (FAVOR+ softmax kernel, non-causal)."""
    if importlib.util.find_spec("performer_pytorch") is None:
        print("performer-pytorch is not installed: peer skipped")
        return None
    from performer_pytorch import FastAttention

    module = FastAttention(dim_heads=head_dim, nb_features=num_features, causal=False).to(dtype)
    return lambda q, k, v: module(q, k, v)
