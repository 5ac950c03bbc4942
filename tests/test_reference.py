"""The oracle itself, checked against torch's SDPA and against hand-made masks."""
import pytest
import torch
import torch.nn.functional as F

from attnkernels.softmax.reference import attention_reference
from attnkernels.conventions import window_visibility


@pytest.mark.parametrize("causal", [False, True], ids=["dense", "causal"])
@pytest.mark.parametrize("shape", [(2, 4, 97, 64), (1, 2, 1, 16), (1, 3, 300, 40)], ids=lambda s: "B{}-H{}-N{}-D{}".format(*s))
def test_reference_matches_sdpa(shape, causal):
    b, h, n, d = shape
    q, k, v = (torch.randn(b, h, n, d, dtype=torch.float64) for _ in range(3))
    out, lse = attention_reference(q, k, v, causal=causal)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    scores = (q @ k.transpose(-1, -2)) / d**0.5
    if causal:
        scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1), rtol=1e-10, atol=1e-10)


def test_reference_gqa_equals_repeated_heads():
    q = torch.randn(2, 8, 33, 16, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 41, 16, dtype=torch.float64) for _ in range(2))
    out, _ = attention_reference(q, k, v, causal=True)
    for h in range(8):
        expected, _ = attention_reference(q[:, h : h + 1], k[:, h // 4 : h // 4 + 1], v[:, h // 4 : h // 4 + 1], causal=True)
        torch.testing.assert_close(out[:, h : h + 1], expected)


def test_bottom_right_alignment_rule():
    # Nq=3, Nk=5, causal: query i sees keys j <= i + 2.
    visible = window_visibility(3, 5, (-1, 0))
    expected = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(visible, expected)
    # Nq=5 > Nk=3, causal: the first two queries see nothing.
    visible = window_visibility(5, 3, (-1, 0))
    assert visible.sum(-1).tolist() == [0, 0, 1, 2, 3]
    # window (1, 0) with Nq == Nk: a band of width 2.
    assert window_visibility(4, 4, (1, 0)).sum(-1).tolist() == [1, 2, 2, 2]


def test_fully_masked_rows_give_zero_output_and_finite_zero_gradients():
    q = torch.randn(1, 2, 5, 16, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 3, 16, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, 3, 16, dtype=torch.float64, requires_grad=True)
    out, lse = attention_reference(q, k, v, causal=True)  # rows 0 and 1 see no key
    assert torch.equal(out[:, :, :2], torch.zeros_like(out[:, :, :2]))
    assert torch.isneginf(lse[:, :, :2]).all() and torch.isfinite(lse[:, :, 2:]).all()
    out.sum().backward()
    for grad in (q.grad, k.grad, v.grad):
        assert torch.isfinite(grad).all()
    assert torch.equal(q.grad[:, :, :2], torch.zeros_like(q.grad[:, :, :2]))
