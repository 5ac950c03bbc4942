"""The window convention and the README's conversion table, row by row.

Each conversion is checked against the other library itself where it runs
here (FlexAttention's mask_mod, lucidrains local-attention, HF transformers'
mask functions), otherwise against that library's documented rule/example.
"""
import importlib.util

import pytest
import torch

from attnkernels import windows
from attnkernels.softmax.reference import attention_reference
from attnkernels.conventions import window_visibility


def test_resolve_window_forms():
    assert windows.resolve_window(None, False) == (-1, -1)
    assert windows.resolve_window(None, True) == (-1, 0)
    assert windows.resolve_window(5, False) == (5, 5)
    assert windows.resolve_window((3, -1), True) == (3, 0)
    assert windows.resolve_window([2, 7], True) == (2, 0)
    assert windows.resolve_window((4, 2), False) == (4, 2)


@pytest.mark.parametrize("bad,error", [((1.5, 2), TypeError), ((-2, 0), ValueError), ("8", TypeError), (True, TypeError), ((1, 2, 3), TypeError)])
def test_resolve_window_rejects(bad, error):
    with pytest.raises(error, match="window_size"):
        windows.resolve_window(bad, False)


@pytest.mark.parametrize("q_len,kv_len", [(9, 9), (5, 9), (9, 5)], ids=lambda n: str(n))
def test_flash_attn_rule(q_len, kv_len):
    # FlashAttention's docstring: query i attends keys
    # [i + Nk - Nq - window_size[0], i + Nk - Nq + window_size[1]] inclusive.
    for window in [(2, 1), (0, 0), (-1, 3), (4, -1)]:
        expected = torch.zeros(q_len, kv_len, dtype=torch.bool)
        for i in range(q_len):
            lo = 0 if window[0] < 0 else i + kv_len - q_len - window[0]
            hi = kv_len - 1 if window[1] < 0 else i + kv_len - q_len + window[1]
            expected[i, max(lo, 0) : max(min(hi, kv_len - 1) + 1, 0)] = True
        assert torch.equal(window_visibility(q_len, kv_len, windows.from_flash_attn(window)), expected)


def test_xformers_documented_example():
    # xformers' LocalAttentionFromBottomRightMask(window_left=1, window_right=2) docstring example.
    window = windows.from_xformers_local(1, 2)
    expected_4x4 = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [0, 1, 1, 1], [0, 0, 1, 1]], dtype=torch.bool)
    expected_4x5 = torch.tensor([[1, 1, 1, 1, 0], [0, 1, 1, 1, 1], [0, 0, 1, 1, 1], [0, 0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(window_visibility(4, 4, window), expected_4x4)
    assert torch.equal(window_visibility(4, 5, window), expected_4x5)


@pytest.mark.parametrize("window", [0, 1, 5, 40])
def test_flex_attention_sliding_window_mask_mod(window):
    from torch.nn.attention.flex_attention import create_mask

    def sliding_window_causal(b, h, q_idx, kv_idx):  # attention-gym's sliding window
        return (q_idx >= kv_idx) & (q_idx - kv_idx <= window)

    flex_mask = create_mask(sliding_window_causal, 1, 1, 33, 33, device="cpu")[0, 0]
    assert torch.equal(window_visibility(33, 33, windows.from_flex_sliding_window(window)), flex_mask)


@pytest.mark.parametrize("sliding_window", [1, 4, 16])
def test_hf_sliding_window(sliding_window):
    if importlib.util.find_spec("transformers") is None:
        # Documented rule (Mistral): W keys including the query itself, causal.
        q = torch.arange(20)[:, None]
        kv = torch.arange(20)[None, :]
        hf_mask = (kv <= q) & (kv > q - sliding_window)
    else:
        from transformers.masking_utils import sliding_window_causal_mask_function

        mask_fn = sliding_window_causal_mask_function(sliding_window)
        # HF's mask functions take index tensors (they are vmapped over positions).
        idx = torch.arange(20)
        hf_mask = mask_fn(torch.tensor(0), torch.tensor(0), idx[:, None], idx[None, :]).expand(20, 20)
    assert torch.equal(window_visibility(20, 20, windows.from_hf_sliding_window(sliding_window)), hf_mask)
    assert hf_mask.sum(-1).max() == min(sliding_window, 20)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("look_backward", [1, 2])
def test_local_attention_exact_windowsize(causal, look_backward):
    local_attention = pytest.importorskip("local_attention", reason="lucidrains local-attention is not installed")
    window_size, seq_len = 8, 48  # a multiple of the window: its autopad pads keys it does not mask when bidirectional
    module = local_attention.LocalAttention(
        window_size=window_size, causal=causal, look_backward=look_backward, exact_windowsize=True, autopad=True
    )
    q, k, v = (torch.randn(1, 2, seq_len, 16, dtype=torch.float64) for _ in range(3))
    expected = module(q, k, v)
    ours, _ = attention_reference(q, k, v, window_size=windows.from_local_attention(window_size, causal=causal, look_backward=look_backward))
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "call",
    [
        lambda: windows.from_hf_sliding_window(0),
        lambda: windows.from_flex_sliding_window(-1),
        lambda: windows.from_xformers_local(-1, 0),
        lambda: windows.from_local_attention(0, causal=True),
    ],
    ids=["hf-0", "flex-negative", "xformers-negative", "local-attention-0"],
)
def test_conversions_reject_bad_sizes(call):
    with pytest.raises(ValueError, match="expected a"):
        call()


@pytest.mark.parametrize("sliding_window", [1, 4, 16])
def test_hf_bidirectional_sliding_window(sliding_window):
    """The sliding_window=W that HF hands a two-sided attention function (ModernBERT, Gemma3 bidirectional)
    means |i - j| < W: (W-1, W-1). ModernBERT passes W = config.sliding_window + 1 and builds its mask with
    `sliding_window_bidirectional_mask_function(config.sliding_window)` (|i - j| <= config value)."""
    if importlib.util.find_spec("transformers") is None:
        idx = torch.arange(20)
        hf_mask = (idx[:, None] - idx[None, :]).abs() < sliding_window  # the documented rule
    else:
        from transformers.masking_utils import sliding_window_bidirectional_mask_function

        mask_fn = sliding_window_bidirectional_mask_function(sliding_window - 1)
        idx = torch.arange(20)
        hf_mask = mask_fn(torch.tensor(0), torch.tensor(0), idx[:, None], idx[None, :]).expand(20, 20)
    assert torch.equal(window_visibility(20, 20, windows.from_hf_bidirectional_window(sliding_window)), hf_mask)
