"""The prepared device script: everything worth knowing from one short GPU lease, in one go.

    python -m benchmarks.gpu_check [--out DIR] [--quick] [--skip-tests]

Sized for an H100/H200 to finish in about 8 minutes (`--quick`: N=4096 only, ~3 minutes).
In order, each step printing as it goes (so a killed run still says what it got):
1. versions: torch, triton, ptxas, CUDA, the device;
2. the GPU test subset (tests/test_gpu_*.py, out/LSE/grads vs float64), in a child process;
3. softmax, bf16, B=2, H=16: dense and causal at N in {4096, 16384}, D in {64, 128}, forward
   and forward+backward, against SDPA's FlashAttention backend and compiled FlexAttention;
   window (256, 0) and BigBird (block 128, 3 random) at D=128 against FlexAttention; each of
   ours first checked against the peer at the same size (max |diff|);
4. linear attention (elu+1) causal, D=128, forward and forward+backward, against SDPA-flash
   causal (for scale) and fla's `chunk_linear_attn` when it is installed;
5. a decode step (split-K, `triton_launch.decode_forward`): B=8, Hq=32, Hk=8, Nq=1, D=128,
   bf16, a KV cache of Nk in {4096, 32768} (`--quick`: 4096), contiguous and paged (256-key
   pages, shuffled), against SDPA's FlashAttention backend (enable_gqa) on the same keys and
   a device copy of the same K/V bytes; GB/s = K/V bytes read / time (the copy: read + write);
6. per-kernel device times (torch.profiler) for causal N=4096 D=128 fwd+bwd and linear
   causal N=4096: forward, preprocess, dK/dV, dQ; with TFLOP/s of the dK/dV and dQ kernels;
7. registers and spills of every kernel the run compiled, as the driver reports them.
TFLOP/s next to every time, FLOPs = 4·B·H·Nq·Nk·D × visible fraction forward, × 3.5 for
forward+backward (FlashAttention's convention); linear 4·B·H·N·D·Dv (+ the intra-chunk
products of 64-token chunks: 4·B·H·N·64·(D+Dv)/2), also × 3.5.
Writes DIR/gpu_check.json and DIR/gpu_check.log (default: $OUT when set, else docs/);
`python -m benchmarks.report` folds the JSON into BENCHMARKS.md with date, device, versions.

`--smoke` runs the same flow on CPU tensors under the Triton interpreter at tiny sizes
(no peers that need CUDA): the test that keeps this script from rotting between leases.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

BATCH, HEADS = 2, 16


class Log:
    """Prints and keeps every line, so the log file holds exactly what the console showed."""

    def __init__(self):
        self.lines: list[str] = []

    def __call__(self, *parts):
        line = " ".join(str(p) for p in parts)
        print(line, flush=True)
        self.lines.append(line)


def _timer(device: str):
    if device == "cuda":
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")

    def cpu_median_ms(fn, reps=3):
        fn()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        return sorted(times)[len(times) // 2]

    return cpu_median_ms


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.1e}"


def _fwd_bwd(fn, q, k, v):
    dout = torch.randn_like(q)

    def run():
        out = fn(q, k, v)
        torch.autograd.grad(out, (q, k, v), dout)
    return run


def softmax_flops(n: int, d: int, visible: float, backward: bool) -> float:
    return 4.0 * BATCH * HEADS * n * n * d * visible * (3.5 if backward else 1.0)


def linear_flops(n: int, d: int, backward: bool, chunk: int = 64) -> float:
    state = 4.0 * BATCH * HEADS * n * d * d
    intra = 4.0 * BATCH * HEADS * n * chunk * d  # q kᵀ and P v inside a chunk, half of it causal-masked
    return (state + intra) * (3.5 if backward else 1.0)


def versions(device: str) -> dict:
    import triton

    info = dict(torch=torch.__version__, triton=triton.__version__, python=sys.version.split()[0],
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    try:
        ptxas = triton.knobs.nvidia.ptxas.path
        info["ptxas"] = subprocess.run([ptxas, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    except Exception as exc:  # noqa: BLE001 - report whatever is missing
        info["ptxas"] = f"unknown ({exc})"
    if device == "cuda":
        info.update(device=torch.cuda.get_device_name(), cuda=torch.version.cuda,
                    capability=".".join(map(str, torch.cuda.get_device_capability())))
    else:
        info.update(device="cpu (smoke run, Triton interpreter)", cuda=None, capability=None)
    return info


def run_gpu_tests(log: Log, timeout: int) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_gpu_attention.py",
           "tests/test_gpu_linear.py"]
    t = time.time()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        last = [line for line in done.stdout.splitlines() if line.strip()][-1:] or ["(no output)"]
        result = dict(returncode=done.returncode, summary=last[0], seconds=round(time.time() - t, 1))
    except subprocess.TimeoutExpired:
        result = dict(returncode=None, summary=f"timed out after {timeout} s", seconds=timeout)
    log(f"GPU tests: {result['summary']} (exit {result['returncode']}, {result['seconds']} s)")
    return result


def softmax_cases(device: str, n: int, d: int, smoke: bool):
    """(name, visible fraction, ours, {peer name: peer}) for one size."""
    import attnkernels
    from attnkernels import masks

    cases = []
    peers_dense, peers_causal = {}, {}
    flex = None
    if device == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        flex = torch.compile(flex_attention)

        def sdpa_flash(causal):
            def run(q, k, v):
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            return run

        causal_mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, n, n, device=device)
        peers_dense = {"sdpa-flash": sdpa_flash(False), "flex": lambda q, k, v: flex(q, k, v)}
        peers_causal = {"sdpa-flash": sdpa_flash(True), "flex": lambda q, k, v: flex(q, k, v, block_mask=causal_mask)}
    cases.append(("dense", 1.0, lambda q, k, v: attnkernels.attention(q, k, v), peers_dense))
    cases.append(("causal", (n + 1) / (2 * n), lambda q, k, v: attnkernels.attention(q, k, v, causal=True), peers_causal))
    if d == 128 or smoke:
        window = 256 if not smoke else 16
        bigbird = masks.bigbird(n, block_size=128 if not smoke else 16, num_random_blocks=3, num_heads=HEADS, seed=0)
        bigbird = bigbird.to(device)
        peers_window, peers_bigbird = {}, {}
        if flex is not None:
            win_mask = create_block_mask(lambda b, h, qi, ki: (qi >= ki) & (qi - ki <= window), None, None, n, n,
                                         device=device)
            flex_bb = bigbird.to_flex_block_mask()
            peers_window = {"flex": lambda q, k, v: flex(q, k, v, block_mask=win_mask)}
            peers_bigbird = {"flex": lambda q, k, v: flex(q, k, v, block_mask=flex_bb)}
        visible_window = min(1.0, (window + 1) / n)
        cases.append((f"window ({window},0)", visible_window,
                      lambda q, k, v: attnkernels.attention(q, k, v, window_size=(window, 0)), peers_window))
        cases.append(("bigbird b128 r3", bigbird.density(),
                      lambda q, k, v: attnkernels.sparse_attention(q, k, v, bigbird), peers_bigbird))
    return cases


def linear_peers(device: str, n: int) -> dict:
    peers = {}
    if device != "cuda":
        return peers
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa_flash_causal(q, k, v):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    peers["sdpa-flash causal"] = sdpa_flash_causal
    try:
        from fla.ops.linear_attn import chunk_linear_attn

        def fla_chunk(q, k, v):
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # fla's (B, T, H, D)
            out = chunk_linear_attn(F.elu(q) + 1, F.elu(k) + 1, v, scale=1.0, normalize=True)
            out = out[0] if isinstance(out, tuple) else out
            return out.transpose(1, 2)

        peers["fla chunk_linear_attn"] = fla_chunk
    except Exception:  # noqa: BLE001 - fla is optional; absent on a bare lease
        pass
    return peers


def time_case(log: Log, timer, rows: list, family: str, name: str, n: int, d: int, flops_of, ours, peers,
              q, k, v, check: bool = True):
    with torch.no_grad():
        ref = ours(q, k, v)
        diffs = {p: (ref.float() - fn(q, k, v).float()).abs().max().item() for p, fn in peers.items()} if check else {}
    for direction in ("fwd", "fwd+bwd"):
        backward = direction == "fwd+bwd"
        make = (lambda fn: _fwd_bwd(fn, q, k, v)) if backward else (lambda fn: (lambda: fn(q, k, v)))
        ours_ms = timer(make(ours))
        flops = flops_of(backward)
        row = dict(family=family, case=name, n=n, d=d, direction=direction, ours_ms=ours_ms,
                   ours_tflops=flops / ours_ms / 1e9, peers={})
        for peer_name, peer in peers.items():
            try:
                peer_ms = timer(make(peer))
            except Exception as exc:  # noqa: BLE001 - a peer that cannot run is reported, not fatal
                log(f"  {peer_name}: failed ({type(exc).__name__}: {str(exc)[:120]})")
                continue
            row["peers"][peer_name] = dict(ms=peer_ms, tflops=flops / peer_ms / 1e9, ratio=peer_ms / ours_ms,
                                           max_diff=diffs.get(peer_name))
        rows.append(row)
        peer_text = "  ".join(f"{p} {r['ms']:.3f} ms ({r['ratio']:.2f}x, diff {_fmt(r['max_diff'])})"
                              for p, r in row["peers"].items())
        log(f"{name:<20} N={n:<6} D={d:<4} {direction:<8} ours {ours_ms:8.3f} ms {row['ours_tflops']:7.1f} TFLOP/s  {peer_text}")


DECODE_BATCH, DECODE_HQ, DECODE_HK, DECODE_D, DECODE_PAGE = 8, 32, 8, 128, 256


def decode_step(log: Log, timer, rows: list, device: str, dtype, nk: int, smoke: bool):
    """One decode step (Nq = 1) against a full cache of nk keys, contiguous and paged: rows
    with ms, TFLOP/s (4·B·Hq·Nk·D) and GB/s of the K/V bytes, the peers' the same way."""
    from attnkernels.softmax.triton_launch import decode_forward

    b, hq, hk, d = (1, 4, 2, 16) if smoke else (DECODE_BATCH, DECODE_HQ, DECODE_HK, DECODE_D)
    page = 16 if smoke else DECODE_PAGE
    q = torch.randn(b, hq, 1, d, device=device, dtype=dtype)
    k = torch.randn(b, hk, nk, d, device=device, dtype=dtype)
    v = torch.randn(b, hk, nk, d, device=device, dtype=dtype)
    lens = torch.full((b,), nk, dtype=torch.int32, device=device)
    # paged: the same keys in shuffled pages (num_pages, Hk, page, D)
    n_pages = b * (nk // page)
    perm = torch.randperm(n_pages, device=device)
    pages_k = torch.empty(n_pages, hk, page, d, device=device, dtype=dtype)
    pages_v = torch.empty_like(pages_k)
    pages_k[perm] = k.reshape(b, hk, nk // page, page, d).transpose(1, 2).reshape(n_pages, hk, page, d)
    pages_v[perm] = v.reshape(b, hk, nk // page, page, d).transpose(1, 2).reshape(n_pages, hk, page, d)
    table = perm.reshape(b, nk // page).to(torch.int32)
    scale = d ** -0.5
    kv_bytes = 2 * k.numel() * k.element_size()
    flops = 4.0 * b * hq * nk * d
    peers = {}
    if device == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def sdpa_flash():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)
        peers["sdpa-flash gqa"] = (sdpa_flash, kv_bytes)
    copy_src = torch.cat([k.reshape(-1), v.reshape(-1)])
    copy_dst = torch.empty_like(copy_src)
    peers["copy K/V bytes"] = (lambda: copy_dst.copy_(copy_src), 2 * kv_bytes)  # read + write
    cases = [("decode contiguous", lambda: decode_forward(q, k, v, lens, None, scale=scale)[0]),
             (f"decode paged{page}", lambda: decode_forward(q, pages_k, pages_v, lens, table, scale=scale)[0])]
    for name, ours in cases:
        with torch.no_grad():
            ref = ours()
            diffs = {}
            if "sdpa-flash gqa" in peers:
                try:
                    diffs["sdpa-flash gqa"] = (ref.float() - peers["sdpa-flash gqa"][0]().float()).abs().max().item()
                except Exception as exc:  # noqa: BLE001 - a peer that cannot run is reported, not fatal
                    log(f"  sdpa-flash gqa: failed ({type(exc).__name__}: {str(exc)[:120]})")
        ours_ms = timer(ours)
        row = dict(family="decode", case=name, n=nk, d=d, direction="fwd", ours_ms=ours_ms,
                   ours_tflops=flops / ours_ms / 1e9, ours_gbps=kv_bytes / ours_ms / 1e6, peers={})
        for peer_name, (peer, peer_bytes) in peers.items():
            if peer_name.startswith("sdpa") and peer_name not in diffs:
                continue
            try:
                peer_ms = timer(peer)
            except Exception as exc:  # noqa: BLE001
                log(f"  {peer_name}: failed ({type(exc).__name__}: {str(exc)[:120]})")
                continue
            row["peers"][peer_name] = dict(ms=peer_ms, tflops=flops / peer_ms / 1e9, ratio=peer_ms / ours_ms,
                                           gbps=peer_bytes / peer_ms / 1e6, max_diff=diffs.get(peer_name))
        rows.append(row)
        peer_text = "  ".join(f"{p} {r['ms']:.3f} ms {r['gbps']:.0f} GB/s ({r['ratio']:.2f}x, diff {_fmt(r['max_diff'])})"
                              for p, r in row["peers"].items())
        log(f"{name:<20} N={nk:<6} D={d:<4} fwd      ours {ours_ms:8.3f} ms {row['ours_gbps']:7.0f} GB/s  {peer_text}")


def kernel_times(log: Log, device: str, fn, flops_by_kernel: dict) -> dict:
    """Device time per kernel name (summed over calls, per call of fn), from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    activities = [ProfilerActivity.CUDA] if device == "cuda" else [ProfilerActivity.CPU]
    reps = 5
    with profile(activities=activities) as prof:
        for _ in range(reps):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
    times = {}
    for event in prof.key_averages():
        total_us = getattr(event, "device_time_total", None) if device == "cuda" else event.cpu_time_total
        if total_us is None:
            total_us = getattr(event, "cuda_time_total", 0)
        if total_us and any(event.key.startswith(p) for p in ("attn_", "linear_", "_attn", "_linear")):
            times[event.key] = total_us / reps / 1e3
    for name, ms in sorted(times.items()):
        flops = flops_by_kernel.get(name)
        extra = f"  {flops / ms / 1e9:7.1f} TFLOP/s" if flops else ""
        log(f"  kernel {name:<28} {ms:8.3f} ms{extra}")
    return times


def compiled_kernel_resources() -> list:
    """(kernel, registers, spills) of every kernel compiled in this process, as the JIT cache reports them."""
    import importlib

    out = []
    for module_name in ("attnkernels.softmax.triton_kernels", "attnkernels.linear.triton_kernels"):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        for attr in dir(module):
            fn = getattr(module, attr)
            caches = getattr(fn, "device_caches", None)
            if not caches:
                continue
            for cache in caches.values():
                kernels = cache[0] if isinstance(cache, tuple) else cache
                for compiled in getattr(kernels, "values", lambda: [])():
                    meta = getattr(compiled, "metadata", None)
                    out.append(dict(kernel=attr, regs=getattr(compiled, "n_regs", None),
                                    spills=getattr(compiled, "n_spills", None),
                                    warps=getattr(meta, "num_warps", None), stages=getattr(meta, "num_stages", None),
                                    smem=getattr(meta, "shared", None)))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or "docs")
    parser.add_argument("--quick", action="store_true", help="N=4096 only")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="CPU + Triton interpreter, tiny sizes: checks the flow")
    args = parser.parse_args(argv)
    if args.smoke:
        global BATCH, HEADS
        os.environ["TRITON_INTERPRET"] = "1"
        BATCH, HEADS = 1, 2
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (use --smoke to check the flow on CPU)")
        return 2
    import contextlib

    import attnkernels

    # the smoke run forces the Triton kernels onto CPU tensors (the interpreter); on CUDA they are the default
    with attnkernels.backend("triton") if args.smoke else contextlib.nullcontext():
        return _run(args, device, attnkernels)


def _run(args, device: str, attnkernels) -> int:
    log, started = Log(), time.time()
    result = dict(versions=versions(device), rows=[], kernels={}, resources=[])
    log("gpu_check:", json.dumps(result["versions"]))
    if not args.skip_tests and not args.smoke:
        result["tests"] = run_gpu_tests(log, timeout=240)
    timer = _timer(device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # the interpreter's bf16 dot is wrong
    seq_lens = [48] if args.smoke else ([4096] if args.quick else [4096, 16384])
    head_dims = [16] if args.smoke else [64, 128]
    for n in seq_lens:
        for d in head_dims:
            q, k, v = (torch.randn(BATCH, HEADS, n, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
            for name, visible, ours, peers in softmax_cases(device, n, d, args.smoke):
                time_case(log, timer, result["rows"], "softmax", name, n, d,
                          lambda backward, visible=visible: softmax_flops(n, d, visible, backward), ours, peers, q, k, v)
        d = head_dims[-1]
        q, k, v = (torch.randn(BATCH, HEADS, n, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        time_case(log, timer, result["rows"], "linear", "linear elu+1 causal", n, d,
                  lambda backward: linear_flops(n, d, backward),
                  lambda q, k, v: attnkernels.linear_attention(q, k, v, causal=True), linear_peers(device, n),
                  q, k, v, check=False)
        log(f"(N={n} done at {time.time() - started:.0f} s)")

    for nk in [64] if args.smoke else ([4096] if args.quick else [4096, 32768]):
        decode_step(log, timer, result["rows"], device, dtype, nk, args.smoke)
    log(f"(decode done at {time.time() - started:.0f} s)")

    n, d = seq_lens[0], head_dims[-1]
    q, k, v = (torch.randn(BATCH, HEADS, n, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    causal_matmul = 2.0 * BATCH * HEADS * n * n * d * (n + 1) / (2 * n)  # one causal N×N×D product
    log(f"per-kernel device time, causal N={n} D={d} fwd+bwd:")
    result["kernels"]["causal"] = kernel_times(
        log, device, _fwd_bwd(lambda q, k, v: attnkernels.attention(q, k, v, causal=True), q, k, v),
        {"attn_fwd": 2 * causal_matmul, "attn_bwd_dkdv": 4 * causal_matmul, "attn_bwd_dq": 3 * causal_matmul})
    log(f"per-kernel device time, linear causal N={n} D={d} fwd+bwd:")
    result["kernels"]["linear"] = kernel_times(
        log, device, _fwd_bwd(lambda q, k, v: attnkernels.linear_attention(q, k, v, causal=True), q, k, v), {})
    result["resources"] = compiled_kernel_resources()
    for r in result["resources"]:
        log(f"  compiled {r['kernel']:<24} regs {r['regs']} spills {r['spills']} warps {r['warps']} "
            f"stages {r['stages']} smem {r['smem']}")
    result["seconds"] = round(time.time() - started, 1)
    log(f"gpu_check done in {result['seconds']} s")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(args.out, "gpu_check.log"), "w") as f:
        f.write("\n".join(log.lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
