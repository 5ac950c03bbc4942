"""Sweep the Triton softmax-attention tile configs on a CUDA device (run by hand on a borrowed GPU).

    python -m benchmarks.gpu_tune [--json PATH]

For 16-bit inputs (bf16), B=2, H=16, N=4096, causal, D in {64, 128}: each candidate config of
one kernel (fwd, dkdv, dq) is swapped into `_CONFIGS` while the others keep theirs; the forward
(fwd) or forward+backward (dkdv, dq) is timed with `triton.testing.do_bench`, its results are
checked against the current config's, and ptxas' registers/spills are read from the compiled
kernel where Triton exposes them. The chosen configs must then pass the ahead-of-time compile
gate for sm_80 and sm_90a (`python -m attnkernels.tools.compile_report`) before they ship.
"""
from __future__ import annotations

import argparse
import json
import os

import torch

os.environ.setdefault("TRITON_INTERPRET", "0")

CANDIDATES = {
    "fwd": [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (128, 32, 4, 3), (64, 128, 4, 2)],
    "dkdv": [(16, 64, 8, 2), (16, 32, 8, 2), (32, 64, 4, 2), (32, 64, 8, 2), (64, 64, 4, 2), (64, 64, 8, 2),
             (32, 128, 8, 2), (64, 128, 8, 2), (16, 128, 8, 2), (32, 32, 4, 2), (64, 32, 4, 2)],
    "dq": [(64, 32, 4, 3), (64, 32, 4, 2), (64, 64, 4, 2), (128, 64, 8, 2), (64, 64, 8, 2), (128, 32, 8, 2),
           (32, 64, 4, 2), (128, 128, 8, 2)],
}
KERNEL_FN = {"fwd": "attn_fwd", "dkdv": "attn_bwd_dkdv", "dq": "attn_bwd_dq"}


def _compiled(fn) -> list:
    """The kernels Triton has compiled for `fn` so far (empty where this version hides them)."""
    found = []
    try:
        for caches in fn.device_caches.values():
            cache = caches[0] if isinstance(caches, tuple) else caches
            found.extend(cache.values())
    except Exception:  # noqa: BLE001 - the cache layout differs across Triton versions
        pass
    return found


def _spills(fn, before: list) -> tuple:
    """(max regs, max spills) over the variants compiled since `before`, or (None, None)."""
    new = [kern for kern in _compiled(fn) if not any(kern is old for old in before)]
    regs = [getattr(kern, "n_regs", None) for kern in new]
    spills = [getattr(kern, "n_spills", None) for kern in new]
    if not regs or None in regs:
        return None, None
    return max(regs), max(spills)


def main() -> int:
    import triton.testing

    from attnkernels.softmax import triton_launch as A
    import attnkernels

    parser = argparse.ArgumentParser()
    parser.add_argument("--json")
    args = parser.parse_args()
    results = []
    # the launcher's config table for this GPU's arch (sm_80 or sm_90a)
    table = A._CONFIGS_SM90 if A.config_arch(torch.device("cuda")) == 90 else A._CONFIGS
    for head_dim in (64, 128):
        torch.manual_seed(0)
        q, k, v = (torch.randn(2, 16, 4096, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        dout = torch.randn_like(q)

        def forward():
            return attnkernels.attention(q, k, v, causal=True)

        def forward_backward():
            return torch.autograd.grad(forward(), (q, k, v), dout)

        ref_out = forward().detach()
        ref_grads = forward_backward()
        for kernel, candidates in CANDIDATES.items():
            key = (kernel, head_dim)
            original = table[key]
            for cand in candidates:
                table[key] = (A.BlockConfig(*cand), original[1])
                fn = getattr(A, KERNEL_FN[kernel])
                before = _compiled(fn)
                row = dict(head_dim=head_dim, kernel=kernel, config=list(cand), current=cand == tuple(original[0][:4]))
                try:
                    if kernel == "fwd":
                        diff = (forward().detach() - ref_out).abs().max().item()
                        row["ms"] = triton.testing.do_bench(forward, warmup=5, rep=30, return_mode="median")
                    else:
                        grads = forward_backward()
                        diff = max((g - r).abs().max().item() for g, r in zip(grads, ref_grads))
                        row["ms"] = triton.testing.do_bench(forward_backward, warmup=5, rep=30, return_mode="median")
                    row["max_diff"] = diff
                    row["regs"], row["spills"] = _spills(fn, before)
                except Exception as exc:  # noqa: BLE001 - a config that does not launch is a result too
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:120]}"
                results.append(row)
                print(json.dumps(row), flush=True)
            table[key] = original
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=results), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
