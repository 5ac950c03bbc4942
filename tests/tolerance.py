"""FlashAttention's tolerance rule, shared by the kernel tests.

A kernel's max error against the float64 reference may be at most FACTOR × the
max error of the same computation done plainly in the input dtype, plus a small
absolute floor (for outputs where the plain computation happens to be exact).
"""
import torch

FACTOR = 2.0
FLOOR = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def assert_within_rule(name: str, actual: torch.Tensor, expected: torch.Tensor, baseline: torch.Tensor, dtype: torch.dtype, factor: float = FACTOR):
    """actual/baseline: the kernel's and the plain same-dtype result; expected: float64 reference."""
    expected = expected.double()
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(actual), finite), f"{name}: non-finite entries differ from the reference"
    error = (actual.double() - expected)[finite].abs().max().item() if finite.any() else 0.0
    baseline_error = (baseline.double() - expected)[finite].abs().max().item() if finite.any() else 0.0
    bound = factor * baseline_error + FLOOR[dtype]
    assert error <= bound, f"{name}: max error {error:.3e} > {factor} x same-dtype error {baseline_error:.3e} + {FLOOR[dtype]:.0e}"
