"""Linear attention on a real CUDA device (Triton kernels), against the float64 reference.

Skipped, with the reason printed, where there is no CUDA device (CI, this project's
machines). Run on a borrowed GPU: `python -m pytest tests/test_gpu_linear.py`.
"""
import pytest
import torch

import attnkernels
from attnkernels.linear.reference import linear_attention_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (Triton kernels on GPU)")

CASES = [
    # (B, Hq, Hk, N, D, causal, feature_map)
    (2, 8, 2, 1000, 64, True, "elu"),
    (2, 8, 2, 1000, 64, False, "elu"),
    (1, 4, 4, 4097, 128, True, "relu"),
    (1, 4, 1, 65, 32, False, "relu"),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}-Hq{c[1]}-Hk{c[2]}-N{c[3]}-D{c[4]}"
                         + ("-causal" if c[5] else "") + f"-{c[6]}")
def test_triton_linear_on_gpu_matches_reference(case, dtype):
    b, hq, hk, n, d, causal, feature_map = case
    torch.manual_seed(0)
    q = torch.randn(b, hq, n, d, device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(b, hk, n, d, device="cuda", dtype=dtype, requires_grad=True)
    v = torch.randn(b, hk, n, d, device="cuda", dtype=dtype, requires_grad=True)
    dout = torch.randn(b, hq, n, d, device="cuda", dtype=dtype)
    out = attnkernels.linear_attention(q, k, v, causal=causal, feature_map=feature_map)
    grads = torch.autograd.grad(out, (q, k, v), dout)

    def run_reference(upcast):
        inputs = [t.detach().clone().to(torch.float64 if upcast else dtype).requires_grad_() for t in (q, k, v)]
        ref = linear_attention_reference(*inputs, causal=causal, feature_map=feature_map)[0]
        return (ref, *torch.autograd.grad(ref, inputs, dout.to(ref.dtype)))

    expected, baseline = run_reference(True), run_reference(False)
    for name, got, exp, base in zip(("out", "dq", "dk", "dv"), (out, *grads), expected, baseline):
        error = (got.double() - exp).abs().max().item()
        base_error = (base.double() - exp).abs().max().item()
        # FlashAttention's rule (2x the same-dtype error) plus 8 ulps of the output's size,
        # as in the CPU linear tests (chunked sums of 64 terms; see tests/linear_helpers.py).
        ulp = {torch.float16: 2**-10, torch.bfloat16: 2**-7, torch.float32: 2**-23}[dtype]
        bound = 2 * base_error + 8 * ulp * exp.abs().max().item()
        assert error <= bound, f"{name}: max error {error:.3e} > {bound:.3e} (same-dtype error {base_error:.3e})"
