"""Triton kernels on a CUDA device vs torch's SDPA (FlashAttention backend) and FlexAttention.

    python -m benchmarks.gpu_bench [--json PATH]

Run by hand on a borrowed GPU (none is lent to CI or to this project's build machine).
bf16, B=2, H=16, D=128; forward and forward+backward; `triton.testing.do_bench` medians.
Each of our configurations is first checked against SDPA / Flex at the same size.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F


def bench(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def fwd_bwd(fn, q, k, v):
    dout = torch.randn_like(q)

    def run():
        out = fn(q, k, v)
        torch.autograd.grad(out, (q, k, v), dout)
    return run


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 16384])
    args = parser.parse_args()
    os.environ.setdefault("TRITON_INTERPRET", "0")
    import attnkernels
    from attnkernels import masks
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    flex = torch.compile(flex_attention)
    batch, heads, head_dim, dtype = 2, 16, 128, torch.bfloat16
    rows = []
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  B={batch} H={heads} D={head_dim} bf16")
    print(f"{'case':<34}{'dir':<9}{'ours ms':>9}{'peer':>14}{'peer ms':>9}{'ratio':>8}{'max|diff|':>11}")
    for n in args.seq_lens:
        q, k, v = (torch.randn(batch, heads, n, head_dim, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
        window = 256
        bigbird = masks.bigbird(n, block_size=128, num_heads=heads, seed=0).to("cuda")
        bb_dense = bigbird.to_dense()  # (1, H, nb, nb) bool
        t0 = time.time()

        def bb_mod(b, h, q_idx, kv_idx):
            return bb_dense[0, h, q_idx // 128, kv_idx // 128]

        flex_bb_mask = create_block_mask(bb_mod, None, heads, n, n, device="cuda", BLOCK_SIZE=128)
        flex_win_mask = create_block_mask(lambda b, h, qi, ki: (qi >= ki) & (qi - ki <= window), None, None, n, n, device="cuda")
        cases = [
            ("causal", lambda q, k, v: attnkernels.attention(q, k, v, causal=True),
             "sdpa-flash", lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
            (f"window ({window},0)", lambda q, k, v: attnkernels.attention(q, k, v, window_size=(window, 0)),
             "flex", lambda q, k, v: flex(q, k, v, block_mask=flex_win_mask)),
            ("bigbird b128 r3", lambda q, k, v: attnkernels.sparse_attention(q, k, v, bigbird),
             "flex", lambda q, k, v: flex(q, k, v, block_mask=flex_bb_mask)),
            ("linear elu+1 causal", lambda q, k, v: attnkernels.linear_attention(q, k, v, causal=True),
             "sdpa-flash(c)", lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
        ]
        print(f"(N={n}: masks built in {time.time() - t0:.1f} s)")
        for name, ours, peer_name, peer in cases:
            with torch.no_grad():
                diff = float("nan")
                if not name.startswith("linear"):
                    diff = (ours(q, k, v).float() - peer(q, k, v).float()).abs().max().item()
            for direction in ("fwd", "fwd+bwd"):
                if direction == "fwd":
                    ours_fn, peer_fn = (lambda: ours(q, k, v)), (lambda: peer(q, k, v))
                else:
                    ours_fn, peer_fn = fwd_bwd(ours, q, k, v), fwd_bwd(peer, q, k, v)
                ours_ms, peer_ms = bench(ours_fn), bench(peer_fn)
                row = dict(n=n, case=name, direction=direction, ours_ms=ours_ms, peer=peer_name, peer_ms=peer_ms,
                           ratio=peer_ms / ours_ms, max_diff=diff)
                rows.append(row)
                print(f"{name + f' N={n}':<34}{direction:<9}{ours_ms:>9.3f}{peer_name:>14}{peer_ms:>9.3f}{peer_ms / ours_ms:>7.2f}x{diff:>11.2e}",
                      flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
