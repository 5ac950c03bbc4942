"""Softmax attention on a real CUDA device (Triton kernels), against the float64 reference.

Skipped, with the reason printed, where there is no CUDA device (CI, this
project's machines). Run on a borrowed GPU: `python -m pytest tests/test_gpu_attention.py`.
"""
import pytest
import torch

import attnkernels
from attnkernels.softmax.reference import attention_reference

from .tolerance import assert_within_rule

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (Triton kernels on GPU)")

CASES = [
    # (B, Hq, Hk, Nq, Nk, D, causal, window)
    (2, 8, 2, 127, 127, 64, False, None),
    (2, 8, 2, 1000, 1000, 64, True, None),
    (1, 4, 4, 300, 1000, 128, True, None),
    (1, 4, 1, 1000, 300, 40, True, None),  # Nq > Nk: rows with no key
    (1, 4, 2, 4097, 4097, 64, False, (256, 256)),
    (1, 2, 2, 1000, 1000, 256, False, (-1, 32)),
    (3, 2, 2, 17, 17, 16, False, (0, 0)),
]


def _case_id(case):
    b, hq, hk, nq, nk, d, causal, window = case
    return f"B{b}-Hq{hq}-Hk{hk}-Nq{nq}-Nk{nk}-D{d}" + ("-causal" if causal else "") + (f"-w{window[0]}_{window[1]}" if window else "")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_triton_on_gpu_matches_reference(case, dtype):
    b, hq, hk, nq, nk, d, causal, window = case
    torch.manual_seed(0)
    q = torch.randn(b, hq, nq, d, device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(b, hk, nk, d, device="cuda", dtype=dtype, requires_grad=True)
    v = torch.randn(b, hk, nk, d, device="cuda", dtype=dtype, requires_grad=True)
    dout = torch.randn(b, hq, nq, d, device="cuda", dtype=dtype)
    _check_against_reference(q, k, v, dout, dtype, causal=causal, window_size=window)


def _check_against_reference(q, k, v, dout, dtype, **options):
    """Triton out, lse and grads vs the float64 reference, by FlashAttention's rule."""
    out, lse = attnkernels.attention(q, k, v, return_lse=True, **options)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)

    def run_reference(upcast):
        inputs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        ref_out, ref_lse = attention_reference(*inputs, upcast=upcast, **options)
        grads = torch.autograd.grad(ref_out, inputs, dout.to(ref_out.dtype))
        return (ref_out, ref_lse, *grads)

    expected = run_reference(True)
    baseline = run_reference(False)
    for name, got, exp, base in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, dq, dk, dv), expected, baseline):
        assert_within_rule(name, got, exp, base, dtype)


SPARSE_CASES = [
    # (B, Hq, Hk, N, D, block, causal, padded)
    (2, 8, 2, 1000, 64, 64, False, False),
    (1, 4, 4, 777, 128, 128, True, True),
    (2, 4, 1, 300, 64, 32, False, True),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", SPARSE_CASES, ids=lambda c: f"B{c[0]}-Hq{c[1]}-Hk{c[2]}-N{c[3]}-D{c[4]}-bigbird{c[5]}"
                         + ("-causal" if c[6] else "") + ("-padded" if c[7] else ""))
def test_triton_bigbird_and_padding_on_gpu_match_reference(case, dtype):
    from attnkernels import masks

    b, hq, hk, n, d, block, causal, padded = case
    torch.manual_seed(0)
    mask = masks.bigbird(n, block_size=block, num_heads=hq, seed=1, causal=causal).to("cuda")
    padding = (torch.rand(b, n, device="cuda") < 0.2) if padded else None
    q = torch.randn(b, hq, n, d, device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(b, hk, n, d, device="cuda", dtype=dtype, requires_grad=True)
    v = torch.randn(b, hk, n, d, device="cuda", dtype=dtype, requires_grad=True)
    dout = torch.randn(b, hq, n, d, device="cuda", dtype=dtype)
    _check_against_reference(q, k, v, dout, dtype, block_mask=mask, key_padding_mask=padding)
