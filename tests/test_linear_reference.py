"""The linear-attention oracle against a per-token loop (the definition, one query at a time)."""
import pytest
import torch
import torch.nn.functional as F

from attnkernels.linear.reference import apply_feature_map, linear_attention_reference


def _loop(q, k, v, causal, normalize, eps, state):
    """out_i from the definition, token by token, float64."""
    batch, q_heads, q_len, _ = q.shape
    group = q_heads // k.shape[1]
    out = torch.zeros(batch, q_heads, q_len, v.shape[-1], dtype=torch.float64)
    phi_q, phi_k = F.elu(q) + 1, F.elu(k) + 1
    for b in range(batch):
        for h in range(q_heads):
            hk = h // group
            for i in range(q_len):
                s, z = (state[0][b, hk].clone(), state[1][b, hk].clone()) if state else (0.0, 0.0)
                for j in range(i + 1 if causal else k.shape[2]):
                    s = s + torch.outer(phi_k[b, hk, j], v[b, hk, j])
                    z = z + phi_k[b, hk, j]
                num = phi_q[b, h, i] @ s
                out[b, h, i] = num / (phi_q[b, h, i] @ z + eps) if normalize else num
    return out


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "nonorm"])
@pytest.mark.parametrize("with_state", [False, True], ids=["nostate", "state"])
def test_B2_H4_Hk2_N7_D5_Dv3_matches_loop(causal, normalize, with_state):
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 7, 5, generator=gen, dtype=torch.float64)
    k = torch.randn(2, 2, 7, 5, generator=gen, dtype=torch.float64)
    v = torch.randn(2, 2, 7, 3, generator=gen, dtype=torch.float64)
    state = (torch.rand(2, 2, 5, 3, generator=gen, dtype=torch.float64),
             torch.rand(2, 2, 5, generator=gen, dtype=torch.float64)) if with_state else None
    out, (s, z) = linear_attention_reference(q, k, v, causal=causal, normalize=normalize, initial_state=state)
    torch.testing.assert_close(out, _loop(q, k, v, causal, normalize, 1e-6, state), rtol=1e-12, atol=1e-12)
    expected_z = F.elu(k).add(1).sum(2) + (state[1] if state else 0)
    torch.testing.assert_close(z, expected_z, rtol=1e-12, atol=1e-12)


def test_B1_H2_N10_streaming_equals_whole():
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 10, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    whole, whole_state = linear_attention_reference(q, k, v, causal=True)
    first, state = linear_attention_reference(q[:, :, :6], k[:, :, :6], v[:, :, :6], causal=True)
    second, state = linear_attention_reference(q[:, :, 6:], k[:, :, 6:], v[:, :, 6:], causal=True, initial_state=state)
    torch.testing.assert_close(torch.cat([first, second], 2), whole, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state[0], whole_state[0], rtol=1e-12, atol=1e-12)


def test_feature_maps_and_errors():
    x = torch.tensor([-2.0, 0.0, 3.0], dtype=torch.float64)
    torch.testing.assert_close(apply_feature_map(x, "elu"), torch.tensor([torch.exp(torch.tensor(-2.0)).item(), 1.0, 4.0], dtype=torch.float64))
    torch.testing.assert_close(apply_feature_map(x, "relu"), torch.tensor([0.0, 0.0, 3.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="feature_map"):
        apply_feature_map(x, "softmax")
    q = torch.randn(1, 1, 3, 2)
    with pytest.raises(ValueError, match="Nq == Nk"):
        linear_attention_reference(q, q[:, :, :2], q[:, :, :2], causal=True)
