"""Recipe: train a tiny Llama with its sequence sharded over P CPU processes (context parallelism).

    python examples/context_parallel_llama.py --world 2 --steps 20

Each rank holds the same model (same seed) and a contiguous shard of every sequence: tokens
[rL, (r+1)L) with their global `position_ids` (RoPE needs them). Attention runs through the HF
backend registered with `context_parallel=` (ring attention over gloo, our C++ kernels per rank);
every other layer is position-wise and runs on the shard alone. The loss is the sum over the shard's
tokens divided by the global token count, so summing gradients over the ranks (all_reduce) gives the
single-process gradient, and the optimizer steps stay identical. The script prints both loss curves
(one process, then P) and their largest difference.
"""
from __future__ import annotations

import argparse
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

VOCAB, SEQ, BATCH = 128, 64, 2


def _model():
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                      num_key_value_heads=2, num_hidden_layers=2, vocab_size=VOCAB,
                                      max_position_embeddings=SEQ, attention_dropout=0.0)
    return transformers.LlamaForCausalLM(config).double()


def _data(step: int):
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=gen)


def train(rank: int, world: int, steps: int, port: int | None = None) -> list[float]:
    """Loss per step of a tiny Llama trained on the same data, its sequence sharded over `world` ranks."""
    from attnkernels.integrations import transformers as hf_backend

    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    name = hf_backend.register("attnkernels_cp", context_parallel=True) if world > 1 else hf_backend.register()
    model = _model()
    model.set_attn_implementation(name)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    shard = SEQ // world
    positions = torch.arange(SEQ)[None].expand(BATCH, SEQ)
    losses = []
    for step in range(steps):
        tokens = _data(step)
        inputs, labels = tokens[:, :-1], tokens[:, 1:]  # next-token targets over the global sequence
        mine = slice(rank * shard, (rank + 1) * shard)
        logits = model(input_ids=inputs[:, mine], position_ids=positions[:, mine]).logits
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), labels[:, mine].reshape(-1), reduction="sum") / labels.numel()
        optimizer.zero_grad()
        loss.backward()
        total = loss.detach().clone()
        if world > 1:
            dist.all_reduce(total)
            for p in model.parameters():
                dist.all_reduce(p.grad)  # the sum over shards is the whole sequence's gradient
        optimizer.step()
        losses.append(float(total))
    if world > 1:
        dist.barrier()  # no rank tears gloo down while another still talks to it
        dist.destroy_process_group()
    return losses


def _rank_main(rank, world, steps, port, queue):
    losses = train(rank, world, steps, port)
    if rank == 0:
        queue.put(losses)
    # Skip the interpreter's teardown: on this host a thread-pool destructor now and then aborts
    # ("terminate called without an active exception") after the work is done.
    os._exit(0)


def train_sharded(world: int, steps: int) -> list[float]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(_rank_main, args=(world, steps, port, queue), nprocs=world, start_method="spawn")
    return queue.get()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    single = train(0, 1, args.steps)
    sharded = train_sharded(args.world, args.steps)
    for step, (a, b) in enumerate(zip(single, sharded)):
        print(f"step {step:3d}  one process {a:.10f}  {args.world} processes {b:.10f}")
    print(f"largest difference: {max(abs(a - b) for a, b in zip(single, sharded)):.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
