"""Context parallelism on one machine: 2 and 4 gloo processes (one thread each) vs one process.

    python -m benchmarks.context_parallel [--n 16384] [--worlds 2 4] [--rounds 3] [--json PATH]

Per method (ring contiguous causal, ring zigzag causal, halo window (256, 0)) and world size P:
median time of a forward+backward step on each rank, against the single-process kernel on the
whole sequence with P threads; bytes sent per rank per step, measured (comm.stats) and by formula
(ring: (P−1) K/V blocks forward + (P−1)+1 K/V+dK/dV blocks backward, O(N·D); halo: left + right rows
of k and v per direction, O(w·D)); load balance = max/min over ranks of the time spent in kernels
(ring: forward and backward kernels; halo: its forward kernel).
B=1, H=8, D=64, fp32.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HEADS, HEAD_DIM = 8, 64


def _methods(world: int):
    from attnkernels import distributed as cp

    return {
        "ring causal": (lambda q, k, v: cp.ring_attention(q, k, v, causal=True), "contiguous"),
        "zigzag causal": (lambda q, k, v: cp.ring_attention(q, k, v, causal=True, layout="zigzag"), "zigzag"),
        "halo window (256,0)": (lambda q, k, v: cp.halo_window_attention(q, k, v, (256, 0)), "contiguous"),
    }


def _worker(rank, world, port, n, rounds, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from attnkernels.distributed import comm

    rows = {}
    for name, (fn, layout) in _methods(world).items():
        full = [torch.randn(1, HEADS, n, HEAD_DIM, generator=torch.Generator().manual_seed(i)) for i in range(3)]
        if layout == "zigzag":
            from attnkernels.distributed import zigzag_shard
            shards = [zigzag_shard(t, rank, world).clone().requires_grad_() for t in full]
        else:
            shards = [t.chunk(world, dim=2)[rank].clone().requires_grad_() for t in full]
        times, busy, sent = [], [], []
        for r in range(rounds + 1):
            comm.stats.update(bytes_sent=0, busy_s=0.0)
            dist.barrier()
            start = time.perf_counter()
            out = fn(*shards)
            out.backward(torch.ones_like(out))
            dist.barrier()
            if r:  # the first round warms up
                times.append(time.perf_counter() - start)
                busy.append(comm.stats["busy_s"])
                sent.append(comm.stats["bytes_sent"])
        rows[name] = dict(ms=statistics.median(times) * 1e3, busy_ms=statistics.median(busy) * 1e3,
                          bytes_sent=statistics.median(sent))
    queue.put((rank, rows))
    dist.barrier()  # no rank tears gloo down while another still talks to it
    dist.destroy_process_group()
    os._exit(0)  # a thread-pool destructor at interpreter exit sometimes aborts on this host


def _single(n, threads, rounds):
    import attnkernels

    torch.set_num_threads(threads)
    out = {}
    for name, kwargs in (("ring causal", dict(causal=True)), ("zigzag causal", dict(causal=True)),
                         ("halo window (256,0)", dict(window_size=(256, 0)))):
        q, k, v = (torch.randn(1, HEADS, n, HEAD_DIM, requires_grad=True) for _ in range(3))
        times = []
        for r in range(rounds + 1):
            start = time.perf_counter()
            o = attnkernels.attention(q, k, v, **kwargs)
            o.backward(torch.ones_like(o))
            if r:
                times.append(time.perf_counter() - start)
        out[name] = statistics.median(times) * 1e3
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.context_parallel", description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=16384)
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    results = []
    row_bytes = HEADS * HEAD_DIM * 4  # one fp32 row of k (or v) over the heads
    for world in args.worlds:
        single = _single(args.n, world, args.rounds)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        queue = mp.get_context("spawn").SimpleQueue()
        mp.start_processes(_worker, args=(world, port, args.n, args.rounds, queue), nprocs=world, start_method="spawn")
        per_rank = dict(queue.get() for _ in range(world))
        shard = args.n // world
        # ring: forward P-1 hops of a K/V block (2 shard rows), backward P-1 hops of K/V + dK/dV (4) and a
        # last dK/dV hop home (2): 6P-4 shard rows. halo (256, 0): k and v's 256 last rows forward and the
        # same rows' gradients backward; an end rank does one of the two, an interior rank both.
        ring = (6 * world - 4) * shard * row_bytes
        formula = {"ring causal": ring, "zigzag causal": ring,
                   "halo window (256,0)": (2 if world == 2 else 4) * 256 * row_bytes}
        for name in single:
            ranks = [per_rank[r][name] for r in range(world)]
            row = dict(world=world, method=name, n=args.n, ms=max(r["ms"] for r in ranks), single_ms=single[name],
                       bytes_sent_max=max(r["bytes_sent"] for r in ranks), bytes_formula=formula[name],
                       balance=max(r["busy_ms"] for r in ranks) / max(min(r["busy_ms"] for r in ranks), 1e-9))
            results.append(row)
            print(f"P={world} {name:<22} step {row['ms']:9.1f} ms (1 process, {world} threads: {row['single_ms']:9.1f} ms) "
                  f"sent/rank {row['bytes_sent_max'] / 1e6:8.2f} MB (formula {row['bytes_formula'] / 1e6:8.2f}) "
                  f"busy max/min {row['balance']:.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
