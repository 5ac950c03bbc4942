"""Context parallelism on gloo: every method on 2 and 4 CPU processes against the single-process kernel
on the gathered sequence (out, LSE, dq, dk, dv), float64 (tight) and float32.

One spawn per world size runs every case (process start-up dominates); a hang fails the test after
a timeout instead of blocking CI, and a rank that refuses a call makes every rank raise.
"""
import os
import socket
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT_S = 240
DEVICE = torch.device("cpu")  # each rank's device: cuda:rank under NCCL (set by _worker)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _full(seed, b, hq, hk, n, d, dtype):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, n, d, generator=gen, dtype=torch.float64).to(dtype)
    k = torch.randn(b, hk, n, d, generator=gen, dtype=torch.float64).to(dtype)
    v = torch.randn(b, hk, n, d, generator=gen, dtype=torch.float64).to(dtype)
    g = torch.randn(b, hq, n, d, generator=gen, dtype=torch.float64).to(dtype)
    return tuple(t.to(DEVICE) for t in (q, k, v, g))


def _check_case(rank, world, name, run, shard, full_kwargs, dtype, n=48):
    import attnkernels

    # GQA on 2 ranks (Hq=4, Hk=2); on 4 ranks Hk=4 so that Ulysses can split the kv heads too
    q, k, v, g = _full(len(name) + world, 2, 4, 2 if world == 2 else 4, n, 8, dtype)
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = attnkernels.attention(*ref_in, return_lse=True, **full_kwargs)
    ref_grads = torch.autograd.grad(ref_out, ref_in, g)
    mine = [shard(t).clone().requires_grad_() for t in (q, k, v)]
    out, lse = run(*mine)
    grads = torch.autograd.grad(out, mine, shard(g))
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
    for what, got, expected in [("out", out, shard(ref_out)), ("dq", grads[0], shard(ref_grads[0])),
                                ("dk", grads[1], shard(ref_grads[1])), ("dv", grads[2], shard(ref_grads[2]))] + (
                               [("lse", lse, shard(ref_lse[..., None])[..., 0])] if lse is not None else []):
        torch.testing.assert_close(got, expected, **tol, msg=lambda m: f"{name} rank {rank}/{world} {what}: {m}")


def _check_module(rank, world, kind, options, dtype=torch.float64):
    """nn.MultiheadAttention(process_group=): each rank's output shard and the summed parameter gradients
    equal one process running the whole sequence."""
    from attnkernels.nn import MultiheadAttention

    torch.manual_seed(0)
    whole = MultiheadAttention(32, 4, num_kv_heads=2, dtype=dtype, device=DEVICE, **options)
    sharded = MultiheadAttention(32, 4, num_kv_heads=2, dtype=dtype, process_group=dist.group.WORLD,
                                 device=DEVICE, **options)
    sharded.load_state_dict(whole.state_dict())
    x = torch.randn(2, 40, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(5)).to(DEVICE, dtype).requires_grad_()
    g = torch.randn(2, 40, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(6)).to(DEVICE, dtype)
    out, _ = whole(x)
    out.backward(g)
    x_mine = x.detach().chunk(world, dim=1)[rank].clone().requires_grad_()
    out_mine, _ = sharded(x_mine)
    out_mine.backward(g.chunk(world, dim=1)[rank])
    tol = dict(rtol=1e-9, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-5)
    torch.testing.assert_close(out_mine, out.chunk(world, dim=1)[rank], **tol,
                               msg=lambda m: f"module {kind} rank {rank}: out: {m}")
    torch.testing.assert_close(x_mine.grad, x.grad.chunk(world, dim=1)[rank], **tol)
    for (name, p), (_, p_whole) in zip(sharded.named_parameters(), whole.named_parameters()):
        grad = p.grad.clone()
        dist.all_reduce(grad)  # what data parallelism over the shards would sum
        torch.testing.assert_close(grad, p_whole.grad, **tol,
                                   msg=lambda m: f"module {kind} rank {rank}: {name}.grad: {m}")


def _worker(rank, world, port, errors, backend="gloo"):
    global DEVICE
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.set_num_threads(1)
        if backend == "nccl":
            DEVICE = torch.device("cuda", rank)
            torch.cuda.set_device(DEVICE)
        dist.init_process_group(backend, rank=rank, world_size=world)
        from attnkernels import distributed as cp

        def contiguous(t):
            return t.chunk(world, dim=2)[rank]

        def zigzag(t):
            return cp.zigzag_shard(t, rank, world)

        # the Triton kernels (CUDA tensors, NCCL) have no float64
        for dtype in ((torch.float32,) if backend == "nccl" else (torch.float64, torch.float32)):
            for causal in (False, True):
                _check_case(rank, world, f"ring-causal{causal}-{dtype}",
                            lambda q, k, v: cp.ring_attention(q, k, v, causal=causal, return_lse=True),
                            contiguous, dict(causal=causal), dtype)
            _check_case(rank, world, f"zigzag-causal-{dtype}",
                        lambda q, k, v: cp.ring_attention(q, k, v, causal=True, layout="zigzag", return_lse=True),
                        zigzag, dict(causal=True), dtype)
            for window in ((5, 0), (3, 4)):
                _check_case(rank, world, f"halo-{window}-{dtype}",
                            lambda q, k, v: cp.halo_window_attention(q, k, v, window, return_lse=True),
                            contiguous, dict(window_size=window), dtype)
            _check_case(rank, world, f"ring-window-routes-to-halo-{dtype}",  # ring_attention(window_size=) too
                        lambda q, k, v: cp.ring_attention(q, k, v, window_size=(4, 2), return_lse=True),
                        contiguous, dict(window_size=(4, 2)), dtype)
            _check_case(rank, world, f"ulysses-causal-{dtype}",
                        lambda q, k, v: (cp.ulysses_attention(q, k, v, causal=True), None),
                        contiguous, dict(causal=True), dtype)
            bigbird = __import__("attnkernels").masks.bigbird(96 if world == 2 else 128, block_size=16,
                                                             num_random_blocks=1, num_heads=4, seed=world)
            n_bb = bigbird.q_len
            _check_case(rank, world, f"bigbird-{dtype}",
                        lambda q, k, v: (cp.sharded_sparse_attention(q, k, v, bigbird), None),
                        contiguous, dict(block_mask=bigbird), dtype, n=n_bb)
        # a block band (each block sees its neighbours): a rank fetches one block from each neighbour, no more
        band = torch.zeros(world * 2, world * 2, dtype=torch.bool)
        for i in range(world * 2):
            band[i, max(i - 1, 0):i + 2] = True
        band_mask = __import__("attnkernels").masks.from_dense(band, block_size=16)
        x = torch.randn(1, 2, 32, 8, device=DEVICE)
        cp.comm.stats["bytes_sent"] = 0
        cp.sharded_sparse_attention(x, x, x, band_mask)
        neighbours = (rank > 0) + (rank < world - 1)
        # k and v, one block (16 rows x 2 heads x 8 fp32) to each neighbour
        assert cp.comm.stats["bytes_sent"] == 2 * neighbours * 16 * 2 * 8 * 4, cp.comm.stats
        for kind, extra in (("dense-causal", dict(causal=True)),
                            ("window", dict(attention="window", window_size=(6, 3)))):
            _check_module(rank, world, kind, extra, torch.float32 if backend == "nccl" else torch.float64)
        # a refusal on one rank (uneven shards) raises on every rank instead of leaving the others waiting
        length = 8 if rank == 0 else 6
        x = torch.randn(1, 2, length, 8, device=DEVICE)
        try:
            cp.ring_attention(x, x, x)
        except ValueError as exc:
            assert "shard lengths differ" in str(exc), str(exc)
        else:
            raise AssertionError("uneven shards were not refused")
        dist.barrier()  # no rank tears gloo down while another still talks to it
        dist.destroy_process_group()
        # Skip the interpreter's teardown: on this host a static destructor of the gloo/ATen thread pools
        # now and then aborts ("terminate called without an active exception") after all work is done and
        # checked, which would read as a failed rank.
        os._exit(0)
    except BaseException:  # report to the parent, which fails the test with the traceback
        errors.put(f"rank {rank}: {traceback.format_exc()}")
        raise


@pytest.mark.parametrize("backend,world", [("gloo", 2), ("gloo", 4), ("nccl", 2)])
def test_context_parallel_matches_single_process(backend, world):
    if backend == "nccl" and (not torch.cuda.is_available() or torch.cuda.device_count() < world):
        pytest.skip(f"NCCL needs {world} CUDA devices; this machine has "
                    f"{torch.cuda.device_count() if torch.cuda.is_available() else 0}")
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    procs = mp.start_processes(_worker, args=(world, _free_port(), errors, backend), nprocs=world, join=False,
                               start_method="spawn")
    deadline = time.time() + TIMEOUT_S
    # every rank ends by itself (a refusal on one makes all raise); only a hang reaches the deadline
    while any(p.is_alive() for p in procs.processes) and time.time() < deadline:
        time.sleep(0.5)
    hung = [p.pid for p in procs.processes if p.is_alive()]
    for p in procs.processes:
        if p.is_alive():
            p.kill()
    messages = []
    while not errors.empty():
        messages.append(errors.get())
    assert not hung, f"context-parallel ranks hung for {TIMEOUT_S} s (killed): {hung}\n" + "\n".join(messages)
    assert not messages, "\n".join(messages)
    assert [p.exitcode for p in procs.processes] == [0] * world, "a rank exited abnormally (before reporting)"


def test_recipe_tiny_llama_sharded_over_2_processes_has_the_same_loss_curve():
    """examples/context_parallel_llama.py: the HF backend's context_parallel option on 2 gloo ranks trains
    to the same losses as one process (float64, 3 Adam steps)."""
    import importlib
    import sys

    pytest.importorskip("transformers", reason="transformers is not installed")
    examples = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
    sys.path.insert(0, examples)  # the spawned ranks import the recipe by module name
    try:
        recipe = importlib.import_module("context_parallel_llama")
        single = recipe.train(0, 1, steps=3)
        sharded = recipe.train_sharded(2, steps=3)
    finally:
        sys.path.remove(examples)
    assert len(sharded) == 3
    for a, b in zip(single, sharded):
        assert abs(a - b) < 1e-10, (single, sharded)
