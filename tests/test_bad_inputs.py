"""Bad input to every public entry point raises a clear error before any kernel runs.

Each case is a row of the README's "Bad input" table (the row id is the first cell);
`test_readme_table_matches_these_cases` keeps the two in step.
"""
from __future__ import annotations

import pathlib
import re

import pytest
import torch

import attnkernels
from attnkernels import flash_attn_interface, masks
from attnkernels import nn as attn_nn

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _softmax_inputs():
    return torch.randn(2, 4, 13, 16), torch.randn(2, 2, 21, 16), torch.randn(2, 2, 21, 16)


def _linear_inputs():
    return torch.randn(2, 4, 13, 16), torch.randn(2, 2, 13, 16), torch.randn(2, 2, 13, 16)


def _table(kv_num, kv_idx):
    return masks.BlockMask(torch.tensor(kv_num, dtype=torch.int32), torch.tensor(kv_idx, dtype=torch.int32),
                           block_size=16, q_len=32, kv_len=32)


def _cases():
    q, k, v = _softmax_inputs()
    lq, lk, lv = _linear_inputs()
    mha = attn_nn.MultiheadAttention(32, 4)
    x = torch.randn(2, 5, 32)
    vq, cu = torch.randn(5, 2, 16), torch.tensor([0, 5], dtype=torch.int32)  # a packed batch of one sequence
    fq = torch.randn(1, 4, 2, 8)  # FlashAttention's (B, N, H, D)
    return [
        # (row id, call, exception type, message fragment)
        ("attention-rank", lambda: attnkernels.attention(q[0], k, v), ValueError, r"q: expected a 4-D tensor"),
        ("attention-gqa-ratio", lambda: attnkernels.attention(torch.randn(2, 3, 13, 16), k, v), ValueError,
         r"query heads \(3\) must be a multiple"),
        ("attention-head-dim-mismatch", lambda: attnkernels.attention(q, torch.randn(2, 2, 21, 8), v), ValueError,
         r"k: head dim 8 must equal q's head dim 16"),
        ("attention-v-shape", lambda: attnkernels.attention(q, k, torch.randn(2, 2, 20, 16)), ValueError,
         r"v: expected \(B, Hk, Nk, Dv\)"),
        ("attention-batch", lambda: attnkernels.attention(q, k[:1], v[:1]), ValueError, r"k, v: batch size must match"),
        ("attention-mixed-dtype", lambda: attnkernels.attention(q, k.double(), v), TypeError,
         r"k: dtype torch.float64 differs from q's"),
        ("attention-mixed-device", lambda: attnkernels.attention(q, k.to("meta"), v), ValueError,
         r"k: device meta differs from q's cpu"),
        ("attention-int-tensor", lambda: attnkernels.attention(q.int(), k.int(), v.int()), TypeError,
         r"q: expected a floating dtype"),
        ("attention-bool-tensor", lambda: attnkernels.attention(q.bool(), k, v), TypeError, r"q: expected a floating dtype"),
        ("attention-complex-tensor", lambda: attnkernels.attention(q.to(torch.complex64), k, v), TypeError,
         r"q: expected a floating dtype"),
        ("attention-head-dim-300", lambda: attnkernels.attention(*(torch.randn(1, 1, 4, 300) for _ in range(3))),
         ValueError, r"head dim D: expected 1 <= D <= 256"),
        ("attention-scale", lambda: attnkernels.attention(q, k, v, scale=-1.0), ValueError, r"scale: expected a finite"),
        ("attention-padding-mask", lambda: attnkernels.attention(q, k, v, key_padding_mask=torch.zeros(2, 13, dtype=torch.bool)),
         ValueError, r"key_padding_mask: expected shape"),
        ("window-missing", lambda: attnkernels.window_attention(q, k, v, None), TypeError, r"window_size: expected an int"),
        ("window-below-minus-one", lambda: attnkernels.attention(q, k, v, window_size=(-3, 1)), ValueError,
         r"window_size: left must be >= -1"),
        ("window-not-integer", lambda: attnkernels.attention(q, k, v, window_size=2.5), TypeError, r"window_size"),
        ("sparse-missing-mask", lambda: attnkernels.sparse_attention(q, k, v, None), TypeError,
         r"block_mask: expected an attnkernels.masks.BlockMask"),
        ("sparse-mask-length", lambda: attnkernels.sparse_attention(q, k, v, masks.bigbird(64, block_size=16)), ValueError,
         r"q_len: the block mask was built for q_len=64"),
        ("sparse-mask-heads", lambda: attnkernels.sparse_attention(
            *(torch.randn(1, 4, 64, 16) for _ in range(3)), masks.bigbird(64, block_size=16, num_heads=3)),
         ValueError, r"heads: the block mask's head dim Hm=3 must be 1 or"),
        ("mask-block-size", lambda: masks.bigbird(64, block_size=24), ValueError, r"block_size: must be a power of two >= 16"),
        ("mask-index-out-of-range", lambda: _table([[[1, 1]]], [[[[5, 0], [0, 0]]]]), ValueError, r"kv_indices"),
        ("mask-count-too-large", lambda: _table([[[3, 1]]], [[[[0, 0], [0, 0]]]]), ValueError, r"kv_num_blocks"),
        ("mask-layout-dtype", lambda: masks.from_dense(torch.ones(2, 2), block_size=16), TypeError,
         r"layout: expected a bool tensor"),
        ("linear-feature-map", lambda: attnkernels.linear_attention(lq, lk, lv, feature_map="softmax"), ValueError,
         r"feature_map: unknown name 'softmax'"),
        ("linear-eps", lambda: attnkernels.linear_attention(lq, lk, lv, eps=0.0), ValueError, r"eps: expected a finite float > 0"),
        ("linear-causal-lengths", lambda: attnkernels.linear_attention(lq, lk[:, :, :5], lv[:, :, :5], causal=True),
         ValueError, r"causal: causal linear attention needs as many queries as keys"),
        ("linear-negative-features", lambda: attnkernels.linear_attention(lq, lk, lv, feature_map="identity"), ValueError,
         r"feature_map: identity gave negative q features with normalize=True"),
        ("linear-padding-mask", lambda: attnkernels.linear_attention(lq, lk, lv, key_padding_mask=torch.zeros(2, 13, dtype=torch.long)),
         TypeError, r"key_padding_mask: expected dtype torch.bool"),
        ("linear-state-shape", lambda: attnkernels.linear_attention(
            lq, lk, lv, initial_state=(torch.zeros(2, 2, 16, 8), torch.zeros(2, 2, 16))),
         ValueError, r"initial_state.S: expected shape \(2, 2, 16, 16\)"),
        ("linear-state-dtype", lambda: attnkernels.linear_attention(
            lq, lk, lv, initial_state=(torch.zeros(2, 2, 16, 16, dtype=torch.float64), torch.zeros(2, 2, 16, dtype=torch.float64))),
         TypeError, r"initial_state.S: expected dtype torch.float32"),
        ("linear-state-requires-grad", lambda: attnkernels.linear_attention(
            lq, lk, lv, initial_state=(torch.zeros(2, 2, 16, 16, requires_grad=True), torch.zeros(2, 2, 16))),
         ValueError, r"initial_state.S: requires grad"),
        ("performer-head-dim", lambda: attnkernels.linear_attention(
            lq, lk, lv, feature_map=attnkernels.PerformerFeatures(8, num_features=16, seed=0)),
         ValueError, r"feature_map: PerformerFeatures was built for head_dim 8"),
        ("mha-embed-dim", lambda: attn_nn.MultiheadAttention(30, 4), ValueError, r"embed_dim: 30 must be divisible by num_heads=4"),
        ("mha-kv-heads", lambda: attn_nn.MultiheadAttention(32, 4, num_kv_heads=3), ValueError,
         r"num_kv_heads: num_heads=4 must be a multiple of num_kv_heads=3"),
        ("mha-family", lambda: attn_nn.MultiheadAttention(32, 4, attention="flash"), ValueError, r"attention: expected one of"),
        ("mha-need-weights", lambda: attn_nn.MultiheadAttention(32, 4, attention="linear")(x, need_weights=True), ValueError,
         r"need_weights: attention='linear' never forms softmax attention weights"),
        ("mha-linformer-max-seq-len", lambda: attn_nn.MultiheadAttention(32, 4, attention="linformer"), ValueError,
         r"max_seq_len: attention='linformer' needs max_seq_len"),
        ("mha-linformer-too-long", lambda: attn_nn.MultiheadAttention(32, 4, attention="linformer", linformer_k=4, max_seq_len=4)(x),
         ValueError, r"max_seq_len: the key sequence has Nk=5 > max_seq_len=4"),
        ("mha-linformer-causal", lambda: attn_nn.MultiheadAttention(32, 4, attention="linformer", max_seq_len=8, causal=True),
         ValueError, r"causal: attention='linformer' is non-causal"),
        ("mha-block-sparse-no-mask", lambda: attn_nn.MultiheadAttention(32, 4, attention="block_sparse")(x), ValueError,
         r"block_mask: attention='block_sparse' needs an attnkernels.masks.BlockMask"),
        ("mha-input-width", lambda: mha(torch.randn(2, 5, 31)), ValueError, r"query: last dim 31 must equal embed_dim=32"),
        ("mha-padding-shape", lambda: mha(x, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool)), ValueError,
         r"key_padding_mask: expected shape \(B, Nk\)"),
        ("mha-linear-dropout-training", lambda: attn_nn.MultiheadAttention(32, 4, attention="linear", dropout=0.1).train()(x),
         NotImplementedError, r"dropout: attention dropout \(0.1\) is implemented by the softmax families' kernels only"),
        ("softcap-negative", lambda: attnkernels.attention(q, q, q, softcap=-1.0), ValueError,
         r"softcap: expected a finite float > 0"),
        ("alibi-shape", lambda: attnkernels.attention(q, q, q, alibi_slopes=torch.ones(3)), ValueError,
         r"alibi_slopes: expected shape \(Hq,\)"),
        ("sinks-shape", lambda: attnkernels.attention(q, q, q, sinks=torch.ones(2, 2)), ValueError,
         r"sinks: expected shape \(Hq,\)"),
        ("bias-broadcast", lambda: attnkernels.attention(q, q, q, attn_bias=torch.ones(3, 1, 1, 1)), ValueError,
         r"attn_bias: shape \(3, 1, 1, 1\) does not broadcast to \(B, Hq, Nq, Nk\)"),
        ("dropout-range", lambda: attnkernels.attention(q, q, q, dropout_p=1.0), ValueError,
         r"dropout_p: expected a float in \[0, 1\)"),
        ("dropout-rounds-to-zero", lambda: attnkernels.attention(q, q, q, dropout_p=0.001), ValueError,
         r"dropout_p: 0.001 rounds to 0 at the kernels' 1/256 resolution"),
        ("varlen-bias", lambda: attnkernels.attention(vq, vq, vq, cu_seqlens_q=cu, cu_seqlens_k=cu,
                                                      attn_bias=torch.zeros(5, 5)),
         ValueError, r"attn_bias: not supported with a packed"),
        ("varlen-cu-dtype", lambda: attnkernels.attention(vq, vq, vq, cu_seqlens_q=cu.long(), cu_seqlens_k=cu), TypeError,
         r"cu_seqlens_q: expected dtype torch.int32"),
        ("varlen-cu-start", lambda: attnkernels.attention(vq, vq, vq, cu_seqlens_q=torch.tensor([1, 5], dtype=torch.int32),
                                                          cu_seqlens_k=cu), ValueError, r"cu_seqlens_q: must start at 0"),
        ("varlen-cu-last", lambda: attnkernels.attention(vq, vq, vq, cu_seqlens_q=torch.tensor([0, 4], dtype=torch.int32),
                                                         cu_seqlens_k=cu), ValueError, r"last entry 4 must equal the packed length 5"),
        ("varlen-max-seqlen", lambda: attnkernels.attention(vq, vq, vq, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=3),
         ValueError, r"max_seqlen_q: 3 is smaller than the longest sequence \(5\)"),
        ("varlen-block-mask", lambda: attnkernels.attention(vq, vq, vq, cu_seqlens_q=cu, cu_seqlens_k=cu,
                                                            block_mask=masks.causal(16, block_size=16)),
         ValueError, r"block_mask: not supported with a packed"),
        ("fa-rotary", lambda: flash_attn_interface.flash_attn_with_kvcache(
            fq[:, :1], torch.zeros(1, 8, 2, 8), torch.zeros(1, 8, 2, 8), rotary_cos=torch.ones(1)), NotImplementedError,
         r"rotary_cos: not supported"),
        ("fa-kvcache-full", lambda: flash_attn_interface.flash_attn_with_kvcache(
            fq[:, :1], torch.zeros(1, 8, 2, 8), torch.zeros(1, 8, 2, 8), fq[:, :1], fq[:, :1], cache_seqlens=8),
         ValueError, r"cache_seqlens: row 0 holds 8 tokens \+ 1 new > the cache's 8 slots"),
        ("mha-context-parallel-family", lambda: attn_nn.MultiheadAttention(32, 4, attention="linear", process_group=object()),
         ValueError, r"process_group: context parallelism supports attention='dense' and 'window'"),
    ]


CASES = _cases()


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_a_clear_error(case):
    _, call, error, message = case
    with pytest.raises(error, match=message):
        call()


def test_readme_table_matches_these_cases():
    rows = set(re.findall(r"^\| `([a-z0-9-]+)` \|", README.read_text(), flags=re.MULTILINE))
    ids = {c[0] for c in CASES}
    assert ids <= rows, f"README's bad-input table lacks rows {sorted(ids - rows)}"
    assert rows <= ids, f"README's bad-input table has rows with no test: {sorted(rows - ids)}"
