"""The prepared device script (`python -m benchmarks.gpu_check`) runs its whole flow here, on CPU tensors
under the Triton interpreter at tiny sizes, so it cannot rot between GPU leases."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_smoke_run_writes_every_case(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--smoke", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    cases = {(r["case"], r["direction"]) for r in result["rows"]}
    for case in ("dense", "causal", "window (16,0)", "bigbird b128 r3", "linear elu+1 causal"):
        for direction in ("fwd", "fwd+bwd"):
            assert (case, direction) in cases
    assert all(r["ours_ms"] > 0 and r["ours_tflops"] > 0 for r in result["rows"])
    assert result["versions"]["triton"] and (tmp_path / "gpu_check.log").read_text().count("ours") == len(result["rows"])
