"""GPU timings of the Triton kernels against torch SDPA (FlashAttention backend) and FlexAttention.

Needs a CUDA device; this project's machines have none, so it is run by hand
on a borrowed one: `python -m benchmarks.gpu_report --json gpu.json --markdown gpu.md`.
BENCHMARKS.md folds in the markdown it wrote, with the device and versions.

TFLOP/s use the FlashAttention convention: forward 4·B·H·Nq·Nk·D × the visible
fraction; forward+backward 3.5 × that.
"""
from __future__ import annotations

import argparse
import json
import platform

import torch
import torch.nn.functional as F

import attnkernels
from attnkernels.reference import window_visibility


def _flops(batch, heads, seq_len, head_dim, visible_fraction, backward):
    return 4.0 * batch * heads * seq_len * seq_len * head_dim * visible_fraction * (3.5 if backward else 1.0)


def _bench(fn):
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100)  # ms, median


def _run_fwd_bwd(fn, q, k, v, dout):
    def run():
        out = fn(q, k, v)
        torch.autograd.grad(out, (q, k, v), dout)
    return run


def cases(quick: bool):
    tokens = 8192 if quick else 16384
    seq_lens = [1024, 4096] if quick else [1024, 2048, 4096, 8192, 16384]
    for head_dim in (64, 128):
        for seq_len in seq_lens:
            for mode in ("dense", "causal", "window256"):
                yield dict(batch=max(tokens // seq_len, 1), heads=2048 // head_dim, seq_len=seq_len, head_dim=head_dim, mode=mode)


def flex_window(seq_len, device):
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None

    def band(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx <= 256) & (kv_idx - q_idx <= 256)

    block_mask = create_block_mask(band, None, None, seq_len, seq_len, device=device)
    compiled = torch.compile(flex_attention)
    return lambda q, k, v: compiled(q, k, v, block_mask=block_mask)


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--json")
    parser.add_argument("--markdown")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16"])
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    device = torch.device("cuda")
    rows = []
    for case in cases(args.quick):
        b, h, n, d, mode = case["batch"], case["heads"], case["seq_len"], case["head_dim"], case["mode"]
        q, k, v = (torch.randn(b, h, n, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        dout = torch.randn_like(q)
        causal = mode == "causal"
        window = (256, 256) if mode == "window256" else None
        ours = lambda q, k, v: attnkernels.attention(q, k, v, causal=causal, window_size=window)  # noqa: E731
        if mode == "window256":
            visible = window_visibility(n, n, (256, 256)).double().mean().item()
            try:
                peer_name, peer = "flex", flex_window(n, device)
            except Exception as exc:  # noqa: BLE001 - report and go on with no peer
                print(f"flex attention unavailable: {exc}")
                peer_name, peer = "flex", None
        else:
            visible = 0.5 if causal else 1.0
            peer_name, peer = "sdpa", (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal))
        for direction in ("fwd", "fwd+bwd"):
            backward = direction == "fwd+bwd"
            ours_fn = _run_fwd_bwd(ours, q, k, v, dout) if backward else (lambda: ours(q, k, v))
            ms = _bench(ours_fn)
            row = dict(case, dtype=args.dtype, direction=direction, ours_ms=ms,
                       ours_tflops=_flops(b, h, n, d, visible, backward) / ms / 1e9)
            if peer is not None:
                peer_fn = _run_fwd_bwd(peer, q, k, v, dout) if backward else (lambda: peer(q, k, v))
                try:
                    peer_ms = _bench(peer_fn)
                    row.update(peer=peer_name, peer_ms=peer_ms, speedup=peer_ms / ms)
                except Exception as exc:  # noqa: BLE001
                    row.update(peer=peer_name, peer_error=str(exc)[:120])
            rows.append(row)
            print(json.dumps(row), flush=True)
        del q, k, v, dout
        torch.cuda.empty_cache()
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, python=platform.python_version())
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        pass
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(to_markdown(meta, rows))


def to_markdown(meta, rows) -> str:
    lines = [
        f"Device: {meta['device']}; torch {meta['torch']}, triton {meta.get('triton', '?')}. "
        "Times are `triton.testing.do_bench` medians; speed-up = peer time / our time.",
        "",
        "| D | N | B×H | mode | dir | dtype | ours ms | ours TFLOP/s | peer | peer ms | speed-up |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        peer_ms = f"{r['peer_ms']:.3f}" if "peer_ms" in r else r.get("peer_error", "n/a")
        speedup = f"{r['speedup']:.2f}x" if "speedup" in r else "n/a"
        lines.append(
            f"| {r['head_dim']} | {r['seq_len']} | {r['batch']}×{r['heads']} | {r['mode']} | {r['direction']} | {r['dtype']} | "
            f"{r['ours_ms']:.3f} | {r['ours_tflops']:.0f} | {r.get('peer', '-')} | {peer_ms} | {speedup} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
