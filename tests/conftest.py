import os

# The Triton interpreter must be switched on before triton is first imported;
# it cannot be toggled per test. CPU-tensor Triton tests rely on it.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
