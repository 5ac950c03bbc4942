import os

# The Triton interpreter must be switched on before triton is first imported;
# it cannot be toggled per test. CPU-tensor Triton tests rely on it. (Set here,
# at the root, so it holds whichever of tests/ and benchmarks/ is collected first.)
os.environ.setdefault("TRITON_INTERPRET", "1")
