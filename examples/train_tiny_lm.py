"""Train a tiny causal language model once per attention family and plot the loss curves.

    python examples/train_tiny_lm.py                 # all families, 300 steps each
    python examples/train_tiny_lm.py --steps 400 --families dense window
    python examples/train_tiny_lm.py --backend reference

The data is generated here: each sequence is a run of random chunks of
`--chunk` tokens (default 8), every chunk written twice in a row ("abcdefg abcdefg hij…").
The first copy is unpredictable (loss log V), the second can be copied from
`chunk` positions back, so the loss on second copies ("copy loss") falls only
if the attention learns to look back — a small induction task. The window is
sized to reach the first copy; BigBird reaches it through its window blocks.

Each family is the same model with `attnkernels.nn.MultiheadAttention(attention=...)`.
Families whose kernels are not in this build (linear, performer before
`attnkernels.linear_attention` lands) are skipped with the reason printed.
Writes examples/tiny_lm_loss.png.
"""
from __future__ import annotations

import argparse
import math
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

try:
    import attnkernels
except ImportError:  # run from a checkout without `pip install -e .`: use the repository's package
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import attnkernels
from attnkernels.nn import MultiheadAttention

FAMILIES = {
    # family -> MultiheadAttention options (causal is set for all)
    "dense": {},
    "window": {"window_size": (16, 0)},  # reaches the first copy of a chunk of <= 16 tokens
    "bigbird": {"block_size": 16, "num_global_blocks": 1, "num_window_blocks": 3, "num_random_blocks": 1, "seed": 0},
    "linear": {"feature_map": "elu"},
    "performer": {"num_features": 64, "seed": 0},
}


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x)). x: (B, N, E)."""

    def __init__(self, dim: int, heads: int, family: str, options: dict):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = MultiheadAttention(dim, heads, attention=family, causal=True, **options)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))[0]
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    def __init__(self, vocab: int, seq_len: int, dim: int, heads: int, layers: int, family: str):
        super().__init__()
        options = FAMILIES[family]
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(seq_len, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, family, options) for _ in range(layers))
        self.ln, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab, bias=False)

    def forward(self, ids):  # ids (B, N) -> logits (B, N, V)
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def copy_batches(batch: int, seq_len: int, vocab: int, chunk: int, seed: int):
    """Endless (ids (B, N), is_copy (B, N)) batches from a fixed generator: chunks written twice."""
    gen = torch.Generator().manual_seed(seed)
    reps = -(-seq_len // (2 * chunk))
    while True:
        chunks = torch.randint(0, vocab, (batch, reps, 1, chunk), generator=gen)  # (B, reps, 1, chunk)
        ids = chunks.expand(batch, reps, 2, chunk).reshape(batch, -1)[:, :seq_len]
        is_copy = torch.zeros(reps, 2, chunk, dtype=torch.bool)
        is_copy[:, 1] = True
        yield ids, is_copy.reshape(-1)[:seq_len].expand(batch, seq_len)


def family_unavailable(family: str) -> str | None:
    if family in ("linear", "performer") and not hasattr(attnkernels, "linear_attention"):
        return "attnkernels.linear_attention is not in this build yet"
    if family == "performer" and not hasattr(attnkernels, "PerformerFeatures"):
        return "attnkernels.PerformerFeatures is not in this build yet"
    return None


def pick_backend(requested: str) -> str | None:
    """None = the library's own dispatch (C++ on CPU); fall back to the reference when it is not built."""
    if requested != "auto":
        return requested
    ok, why = attnkernels.backends.cpu_status()
    if ok:
        return None
    print(f"note: C++ kernels unavailable ({why.split('.')[0]}); using the reference backend")
    return "reference"


def train(family: str, args, backend: str | None) -> dict:
    torch.manual_seed(args.seed)
    model = TinyLM(args.vocab, args.seq_len, args.dim, args.heads, args.layers, family)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    data = copy_batches(args.batch, args.seq_len + 1, args.vocab, args.chunk, args.seed)
    losses, copy_losses = [], []
    steps = range(args.steps)
    try:
        from tqdm import tqdm

        steps = tqdm(steps, desc=f"{family:>9}", ncols=90, leave=True)
    except ImportError:  # the progress bar is optional
        pass
    start = time.perf_counter()
    for _ in steps:
        ids, is_copy = next(data)
        inputs, targets, is_copy = ids[:, :-1], ids[:, 1:], is_copy[:, 1:]  # predict the next token
        context = attnkernels.backend(backend) if backend else _nullcontext()
        with context:  # the backend is read when each op runs, the backward's included
            logits = model(inputs)
            per_token = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)
            loss = per_token.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        copy_losses.append(per_token[is_copy].mean().item())
        if hasattr(steps, "set_postfix"):
            steps.set_postfix(loss=f"{losses[-1]:.3f}", copy=f"{copy_losses[-1]:.3f}")
    return {"loss": losses, "copy_loss": copy_losses, "seconds": time.perf_counter() - start}


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def plot(results: dict, args, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    window = max(1, args.steps // 25)  # moving average, for readability
    for family, r in results.items():
        for ax, key in zip(axes, ("loss", "copy_loss")):
            y = torch.tensor(r[key])
            smooth = y.unfold(0, window, 1).mean(-1) if len(y) >= window else y
            ax.plot(range(window - 1, window - 1 + len(smooth)), smooth, label=family)
    floor = math.log(args.vocab) / 2  # perfect copying: first copies cost log V, second copies 0
    axes[0].axhline(floor, color="gray", ls=":", lw=1, label="perfect copy")
    axes[1].axhline(0.0, color="gray", ls=":", lw=1)
    axes[0].set(title="training loss (all tokens)", xlabel="step", ylabel="cross-entropy (nats)")
    axes[1].set(title="loss on second copies (needs look-back)", xlabel="step")
    axes[0].legend()
    fig.suptitle(f"tiny causal LM, copy task: V={args.vocab}, N={args.seq_len}, chunk={args.chunk}, "
                 f"{args.layers} layers, E={args.dim}, {args.heads} heads")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    p.add_argument("--backend", default="auto", choices=["auto", "reference", "cpu", "triton"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--chunk", type=int, default=8)
    p.add_argument("--vocab", type=int, default=16)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--seed", type=int, default=0)
    # One thread by default: at this size thread synchronisation costs more than it saves, and on a
    # shared 2-core machine two threads ran 20x slower than one (measured).
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny_lm_loss.png"))
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    backend = pick_backend(args.backend)
    results = {}
    for family in args.families:
        reason = family_unavailable(family)
        if reason:
            print(f"skip {family}: {reason}")
            continue
        results[family] = train(family, args, backend)
    if not results:
        raise SystemExit("no attention family could run")
    tail = max(1, args.steps // 10)
    print(f"\nfinal losses (mean of the last {tail} steps; perfect copying gives {math.log(args.vocab) / 2:.3f} "
          f"overall and 0 on second copies; backend {backend or 'default'})")
    for family, r in results.items():
        loss, copy = sum(r["loss"][-tail:]) / tail, sum(r["copy_loss"][-tail:]) / tail
        print(f"  {family:>9}: loss {loss:.3f}   copy loss {copy:.3f}   ({r['seconds']:.1f} s)")
    plot(results, args, args.out)
    return results


if __name__ == "__main__":
    main()
