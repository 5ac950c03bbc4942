"""Block-sparse layouts: the `BlockMask` object and its constructors.

A `BlockMask` describes which (query block, key block) tiles of the attention
matrix are computed, with FlexAttention's field names. Every kernel of the
block-sparse family reads its int32 tables; the float64 reference reads
`element_mask()`.

Conventions (shared by every constructor)
-----------------------------------------
* Blocks are square, `block_size` (a power of two >= 16) queries by
  `block_size` keys. `nQb = ceil(q_len / block_size)`, `nKb = ceil(kv_len /
  block_size)`; the last block of either side may be partial.
* Leading dims `(Bm, Hm)`: `Bm` is 1 or the batch size, `Hm` is 1 or the number
  of *query* heads; 1 broadcasts.
* `kv_num_blocks (Bm, Hm, nQb)` / `kv_indices (Bm, Hm, nQb, nKb)`: row i of
  `kv_indices` lists in its first `kv_num_blocks[..., i]` entries **every**
  key block visible to query block i, distinct and ascending; the rest of the
  row is padding, filled with 0, ignored.
* `full_kv_num_blocks` / `full_kv_indices`: same shapes, the **subset** of the
  listed blocks whose element mask is all-true: a complete tile (not in a
  partial last block) not cut by the causal diagonal. Kernels may skip the
  element mask there. `None` means "mask every block". Note: FlexAttention's
  own `kv_*` holds only the *partial* blocks, disjoint from `full_kv_*`;
  `to_flex_block_mask()` converts.
* `q_num_blocks (Bm, Hm, nKb)` / `q_indices (Bm, Hm, nKb, nQb)` (and
  `full_q_*`): the exact transpose, ascending query blocks per key block, for
  the dK/dV backward.
* `causal=True`: attention with this mask also applies the bottom-right causal
  element rule, query i sees key j only if `j <= i + kv_len - q_len`
  (FlashAttention's alignment, as everywhere in attnkernels).
* The element-level visibility is exactly
  `layout[i // block_size, j // block_size] and (not causal or j <= i + kv_len - q_len)`
  for `i < q_len`, `j < kv_len`: the tables plus the `causal` flag are the
  whole contract. Nothing else (in particular no element window) is implied.
* Tables are contiguous int32 tensors, on the CPU unless built from a layout on
  another device; `.to(device)` copies.
"""
from __future__ import annotations

import numbers

import torch

from .windows import UNBOUNDED, resolve_window

__all__ = ["BlockMask", "from_dense", "bigbird", "longformer", "sliding_window", "causal"]

_TABLES = (
    "kv_num_blocks",
    "kv_indices",
    "full_kv_num_blocks",
    "full_kv_indices",
    "q_num_blocks",
    "q_indices",
    "full_q_num_blocks",
    "full_q_indices",
)


# --------------------------------------------------------------------------
# vectorised helpers: layout <-> tables
# --------------------------------------------------------------------------
def _tables_from_layout(layout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool (..., R, C) -> (num int32 (..., R), indices int32 (..., R, C)), zero padded.

    O(numel) scan plus O(listed) writes: `nonzero` yields row-major (row, col)
    pairs, so columns come out ascending within each row.
    """
    width = layout.shape[-1]
    flat = layout.reshape(-1, width)  # (rows, C)
    num = flat.sum(-1)  # (rows,) int64
    rows, cols = flat.nonzero(as_tuple=True)  # (nnz,), (nnz,)
    row_start = num.cumsum(0) - num  # (rows,) offset of each row's first entry in the nnz list
    slot = torch.arange(rows.numel(), device=layout.device) - row_start[rows]  # (nnz,)
    out = torch.zeros(flat.shape, dtype=torch.int32, device=layout.device)  # (rows, C)
    out[rows, slot] = cols.to(torch.int32)
    return num.to(torch.int32).reshape(layout.shape[:-1]), out.reshape(layout.shape)


def _layout_from_tables(num: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """(num (..., R), indices (..., R, C)) -> bool layout (..., R, C); padding ignored."""
    width = indices.shape[-1]
    listed = torch.arange(width, device=indices.device) < num[..., None].long()  # (..., R, C)
    cols = torch.where(listed, indices.long(), width)
    out = torch.zeros(*indices.shape[:-1], width + 1, dtype=torch.bool, device=indices.device)
    out.scatter_(-1, cols, True)
    return out[..., :width]


def _block_bounds(n_blocks: int, length: int, block_size: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """First and last element index (inclusive) of each block, int64 (n_blocks,)."""
    first = torch.arange(n_blocks, device=device) * block_size
    last = torch.clamp(first + block_size, max=length) - 1
    return first, last


def _causal_reachable(q_len: int, kv_len: int, block_size: int, device=None) -> torch.Tensor:
    """Bool (nQb, nKb): the block holds at least one (i, j) with j <= i + kv_len - q_len."""
    n_q, n_k = -(-q_len // block_size), -(-kv_len // block_size)
    _, q_last = _block_bounds(n_q, q_len, block_size, device)
    k_first, _ = _block_bounds(n_k, kv_len, block_size, device)
    return k_first[None, :] <= q_last[:, None] + (kv_len - q_len)


def _complete_blocks(q_len: int, kv_len: int, block_size: int, causal: bool, device=None) -> torch.Tensor:
    """Bool (nQb, nKb): a listed block here has an all-true element mask.

    A complete tile (block_size x block_size, not a partial last block) and, if
    causal, entirely on or below the bottom-right diagonal.
    """
    n_q, n_k = -(-q_len // block_size), -(-kv_len // block_size)
    q_first, q_last = _block_bounds(n_q, q_len, block_size, device)
    k_first, k_last = _block_bounds(n_k, kv_len, block_size, device)
    q_whole = (q_last - q_first + 1) == block_size  # (nQb,)
    k_whole = (k_last - k_first + 1) == block_size  # (nKb,)
    complete = q_whole[:, None] & k_whole[None, :]
    if causal:
        complete &= k_last[None, :] <= q_first[:, None] + (kv_len - q_len)
    return complete


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an int, got {value!r} of type {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name}: must be >= {minimum}, got {value}")
    return int(value)


def _check_block_size(block_size) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, numbers.Integral):
        raise TypeError(f"block_size: expected an int (a power of two >= 16), got {block_size!r}")
    block_size = int(block_size)
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size: must be a power of two >= 16, got {block_size}")
    return block_size


def _check_length(name: str, length, n_blocks: int, block_size: int, table: str) -> int:
    length = _check_int(name, length, 1)
    needed = -(-length // block_size)
    if needed != n_blocks:
        raise ValueError(
            f"{name}: {name}={length} needs ceil({length}/{block_size})={needed} blocks, "
            f"but {table} has {n_blocks}"
        )
    return length


def _make_generator(seed, generator) -> tuple[torch.Generator, int | None]:
    """A private generator: from `seed`, the given `generator`, or a fresh OS seed. Never the global RNG."""
    if seed is not None and generator is not None:
        raise ValueError("seed/generator: give one of them, not both")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator: expected a torch.Generator, got {type(generator).__name__}")
        return generator, None
    generator = torch.Generator()
    if seed is None:
        seed = generator.seed()  # non-deterministic, recorded so the mask can be rebuilt
    else:
        seed = _check_int("seed", seed, 0)
        generator.manual_seed(seed)
    return generator, seed


# --------------------------------------------------------------------------
# the object
# --------------------------------------------------------------------------
class BlockMask:
    """A block-sparse attention layout with FlexAttention's field names.

    See the module docstring for the exact format. Build one with the
    constructors (`from_dense`, `bigbird`, `longformer`, `sliding_window`,
    `causal`) rather than by hand; the constructor here validates every table
    (`check=False` skips that, for internal use) and computes `q_*` (and
    `full_q_*` when `full_kv_*` is given) when they are left out.

    Treat instances as immutable; every method returns new tensors or a new
    mask.

    Attributes besides the tables: `block_size`, `q_len`, `kv_len`, `causal`,
    `window` (the element window `(left, right)` a `sliding_window` mask was
    built for, else None; informational only, not applied by `element_mask`),
    and `params` (the constructor's name and arguments, used by `redraw`).
    """

    def __init__(
        self,
        kv_num_blocks: torch.Tensor,
        kv_indices: torch.Tensor,
        *,
        block_size: int,
        q_len: int | None = None,
        kv_len: int | None = None,
        causal: bool = False,
        full_kv_num_blocks: torch.Tensor | None = None,
        full_kv_indices: torch.Tensor | None = None,
        q_num_blocks: torch.Tensor | None = None,
        q_indices: torch.Tensor | None = None,
        full_q_num_blocks: torch.Tensor | None = None,
        full_q_indices: torch.Tensor | None = None,
        window: tuple[int, int] | None = None,
        params: dict | None = None,
        check: bool = True,
    ) -> None:
        if check:
            block_size = _check_block_size(block_size)
            self._check_table("kv_num_blocks", kv_num_blocks, 3)
            self._check_table("kv_indices", kv_indices, 4)
            bm, hm, n_q, n_k = kv_indices.shape
            if tuple(kv_num_blocks.shape) != (bm, hm, n_q):
                raise ValueError(
                    f"kv_num_blocks: shape {tuple(kv_num_blocks.shape)} does not match kv_indices "
                    f"{tuple(kv_indices.shape)}; expected (Bm, Hm, nQb) = {(bm, hm, n_q)}"
                )
            if n_q == 0 or n_k == 0 or bm == 0 or hm == 0:
                raise ValueError(f"kv_indices: every dim must be >= 1, got shape {tuple(kv_indices.shape)}")
            if kv_indices.device != kv_num_blocks.device:
                raise ValueError(f"kv_indices: on {kv_indices.device} but kv_num_blocks on {kv_num_blocks.device}")
            q_len = n_q * block_size if q_len is None else _check_length("q_len", q_len, n_q, block_size, "kv_indices")
            kv_len = n_k * block_size if kv_len is None else _check_length("kv_len", kv_len, n_k, block_size, "kv_indices")
            if not isinstance(causal, bool):
                raise TypeError(f"causal: expected a bool, got {causal!r}")
        else:
            bm, hm, n_q, n_k = kv_indices.shape
            q_len = n_q * block_size if q_len is None else q_len
            kv_len = n_k * block_size if kv_len is None else kv_len

        self.block_size = block_size
        self.q_len = int(q_len)
        self.kv_len = int(kv_len)
        self.causal = bool(causal)
        self.window = window
        self.params = params
        self.kv_num_blocks = kv_num_blocks
        self.kv_indices = kv_indices

        if (full_kv_num_blocks is None) != (full_kv_indices is None):
            raise ValueError("full_kv_num_blocks/full_kv_indices: give both or neither")
        if (full_q_num_blocks is None) != (full_q_indices is None):
            raise ValueError("full_q_num_blocks/full_q_indices: give both or neither")
        if (q_num_blocks is None) != (q_indices is None):
            raise ValueError("q_num_blocks/q_indices: give both or neither")
        if full_kv_num_blocks is None and full_q_num_blocks is not None:
            raise ValueError("full_q_num_blocks: given without full_kv_num_blocks/full_kv_indices")

        meta = kv_indices.device.type == "meta"
        layout = None
        if check and not meta:
            layout = self._check_listing("kv", kv_num_blocks, kv_indices, n_k)
        self.full_kv_num_blocks = full_kv_num_blocks
        self.full_kv_indices = full_kv_indices
        if full_kv_num_blocks is not None and check:
            for name, table, dims in (("full_kv_num_blocks", full_kv_num_blocks, 3), ("full_kv_indices", full_kv_indices, 4)):
                self._check_table(name, table, dims)
                want = tuple(kv_num_blocks.shape) if dims == 3 else tuple(kv_indices.shape)
                if tuple(table.shape) != want:
                    raise ValueError(f"{name}: shape {tuple(table.shape)} must equal {want}, like kv_*")
            if not meta:
                full = self._check_listing("full_kv", full_kv_num_blocks, full_kv_indices, n_k)
                if (full & ~layout).any():
                    raise ValueError("full_kv_indices: lists a block that kv_indices does not list (full_kv_* must be a subset)")
                complete = _complete_blocks(self.q_len, self.kv_len, block_size, self.causal, kv_indices.device)
                if (full & ~complete).any():
                    raise ValueError(
                        "full_kv_indices: lists a block whose element mask is not all-true "
                        "(a partial last block, or cut by the causal diagonal)"
                    )

        # q_* : the transpose; computed when left out, else checked.
        if q_num_blocks is None:
            if layout is None:
                layout = _layout_from_tables(kv_num_blocks, kv_indices)
            q_num_blocks, q_indices = _tables_from_layout(layout.transpose(-1, -2))
        elif check:
            self._check_transpose("q", q_num_blocks, q_indices, kv_num_blocks, kv_indices, meta)
        self.q_num_blocks, self.q_indices = q_num_blocks, q_indices

        if full_kv_num_blocks is not None and full_q_num_blocks is None:
            full = _layout_from_tables(full_kv_num_blocks, full_kv_indices)
            full_q_num_blocks, full_q_indices = _tables_from_layout(full.transpose(-1, -2))
        elif full_q_num_blocks is not None and check:
            self._check_transpose("full_q", full_q_num_blocks, full_q_indices, full_kv_num_blocks, full_kv_indices, meta)
        self.full_q_num_blocks, self.full_q_indices = full_q_num_blocks, full_q_indices

    # ---- construction-time validation -----------------------------------
    @staticmethod
    def _check_table(name: str, table, dims: int) -> None:
        if not isinstance(table, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(table).__name__}")
        if table.dtype != torch.int32:
            raise ValueError(f"{name}: dtype must be torch.int32, got {table.dtype}")
        if table.dim() != dims:
            raise ValueError(f"{name}: expected {dims} dims, got shape {tuple(table.shape)}")

    @staticmethod
    def _check_listing(prefix: str, num: torch.Tensor, indices: torch.Tensor, width: int) -> torch.Tensor:
        """Counts in range, listed entries in range, distinct and ascending; returns the layout."""
        lo, hi = int(num.min()), int(num.max())
        if lo < 0 or hi > width:
            raise ValueError(f"{prefix}_num_blocks: counts must be in [0, {width}] (the table width), got [{lo}, {hi}]")
        listed = torch.arange(width, device=indices.device) < num[..., None].long()  # (Bm, Hm, R, C)
        values = indices[listed]
        if values.numel() and (int(values.min()) < 0 or int(values.max()) >= width):
            raise ValueError(
                f"{prefix}_indices: listed block indices must be in [0, {width}), "
                f"got [{int(values.min())}, {int(values.max())}]"
            )
        steps = indices[..., 1:] - indices[..., :-1]  # (Bm, Hm, R, C-1)
        if (steps[listed[..., 1:]] <= 0).any():
            raise ValueError(f"{prefix}_indices: the listed blocks of each row must be distinct and ascending")
        return _layout_from_tables(num, indices)

    def _check_transpose(self, prefix, num, indices, kv_num, kv_indices, meta) -> None:
        bm, hm, n_q, n_k = kv_indices.shape
        self._check_table(f"{prefix}_num_blocks", num, 3)
        self._check_table(f"{prefix}_indices", indices, 4)
        if tuple(num.shape) != (bm, hm, n_k) or tuple(indices.shape) != (bm, hm, n_k, n_q):
            raise ValueError(
                f"{prefix}_indices: shapes {tuple(num.shape)}, {tuple(indices.shape)} must be "
                f"(Bm, Hm, nKb) = {(bm, hm, n_k)} and (Bm, Hm, nKb, nQb) = {(bm, hm, n_k, n_q)}"
            )
        if meta:
            return
        layout_t = self._check_listing(prefix, num, indices, n_q)
        kv_prefix = prefix.replace("q", "kv")
        if not torch.equal(layout_t.transpose(-1, -2), _layout_from_tables(kv_num, kv_indices)):
            raise ValueError(f"{prefix}_indices: not the transpose of {kv_prefix}_indices")

    # ---- shapes and conversions -----------------------------------------
    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(Bm, Hm, nQb, nKb)."""
        return tuple(self.kv_indices.shape)

    @property
    def device(self) -> torch.device:
        return self.kv_indices.device

    def to(self, device) -> "BlockMask":
        """A copy with every table on `device`."""
        tables = {
            name: (None if getattr(self, name) is None else getattr(self, name).to(device, copy=True).contiguous())
            for name in _TABLES
        }
        num, idx = tables.pop("kv_num_blocks"), tables.pop("kv_indices")
        return BlockMask(
            num, idx, block_size=self.block_size, q_len=self.q_len, kv_len=self.kv_len, causal=self.causal,
            window=self.window, params=self.params, check=False, **tables,
        )

    def to_dense(self) -> torch.Tensor:
        """Bool (Bm, Hm, nQb, nKb): the block-level layout."""
        return _layout_from_tables(self.kv_num_blocks, self.kv_indices)

    def full_to_dense(self) -> torch.Tensor | None:
        """Bool (Bm, Hm, nQb, nKb) of the full blocks, or None when `full_kv_*` is absent."""
        if self.full_kv_num_blocks is None:
            return None
        return _layout_from_tables(self.full_kv_num_blocks, self.full_kv_indices)

    def element_mask(self, q_len: int | None = None, kv_len: int | None = None) -> torch.Tensor:
        """Bool (Bm, Hm, q_len, kv_len): exactly which key each query sees.

        The layout expanded to elements, cropped to (q_len, kv_len), and ANDed
        with the bottom-right causal rule `j <= i + kv_len - q_len` when
        `causal`. No element window is applied (see `sliding_window`).
        Raises ValueError if q_len / kv_len differ from the mask's.
        """
        if q_len is not None and q_len != self.q_len:
            raise ValueError(f"q_len: the mask was built for q_len={self.q_len}, got {q_len}")
        if kv_len is not None and kv_len != self.kv_len:
            raise ValueError(f"kv_len: the mask was built for kv_len={self.kv_len}, got {kv_len}")
        rows = torch.arange(self.q_len, device=self.device)  # (Nq,)
        cols = torch.arange(self.kv_len, device=self.device)  # (Nk,)
        layout = self.to_dense()  # (Bm, Hm, nQb, nKb)
        visible = layout[:, :, rows // self.block_size][:, :, :, cols // self.block_size]  # (Bm, Hm, Nq, Nk)
        if self.causal:
            visible = visible & (cols[None, :] <= rows[:, None] + (self.kv_len - self.q_len))
        return visible

    def num_blocks(self) -> int:
        """Total number of listed blocks, over all (Bm, Hm) rows."""
        return int(self.kv_num_blocks.sum())

    def density(self) -> float:
        """Fraction of the Bm * Hm * nQb * nKb blocks that are listed."""
        return self.num_blocks() / self.kv_indices.numel()

    # ---- use-site validation ---------------------------------------------
    def check_compatible(self, batch: int, q_heads: int, q_len: int, kv_len: int) -> None:
        """Raise ValueError naming the mismatch if this mask cannot serve that call."""
        bm, hm = self.kv_indices.shape[:2]
        if q_len != self.q_len:
            raise ValueError(f"q_len: the block mask was built for q_len={self.q_len}, but the query has N={q_len}")
        if kv_len != self.kv_len:
            raise ValueError(f"kv_len: the block mask was built for kv_len={self.kv_len}, but the key has N={kv_len}")
        if bm not in (1, batch):
            raise ValueError(f"batch: the block mask's batch dim Bm={bm} must be 1 or the batch size B={batch}")
        if hm not in (1, q_heads):
            raise ValueError(f"heads: the block mask's head dim Hm={hm} must be 1 or the number of query heads Hq={q_heads}")

    def validate(self, q: torch.Tensor, k: torch.Tensor) -> None:
        """`check_compatible` for q (B, Hq, Nq, D) and k (B, Hk, Nk, D)."""
        if q.dim() != 4 or k.dim() != 4:
            raise ValueError(f"q/k: expected (B, H, N, D) tensors, got shapes {tuple(q.shape)} and {tuple(k.shape)}")
        self.check_compatible(q.shape[0], q.shape[1], q.shape[2], k.shape[2])

    # ---- interop -----------------------------------------------------------
    def to_flex_block_mask(self):
        """The same pattern as a `torch.nn.attention.flex_attention.BlockMask`.

        Flex's `kv_*` lists only partial blocks (disjoint from `full_kv_*`), so
        the partial tables are computed here; its `mask_mod` reproduces
        `element_mask` (layout lookup, causal rule; Flex bounds the partial
        last blocks itself through `seq_lengths`).
        """
        from torch.nn.attention.flex_attention import BlockMask as FlexBlockMask

        layout = self.to_dense()  # (Bm, Hm, nQb, nKb)
        full = self.full_to_dense()
        if full is None:
            full = torch.zeros_like(layout)
        part_num, part_idx = _tables_from_layout(layout & ~full)
        full_num, full_idx = _tables_from_layout(full)
        bm, hm = layout.shape[:2]
        block_size, offset, is_causal = self.block_size, self.kv_len - self.q_len, self.causal

        def mask_mod(b, h, q_idx, kv_idx):
            visible = layout[b if bm > 1 else 0, h if hm > 1 else 0, q_idx // block_size, kv_idx // block_size]
            if is_causal:
                visible = visible & (kv_idx <= q_idx + offset)
            return visible

        return FlexBlockMask.from_kv_blocks(
            part_num, part_idx, full_num, full_idx,
            BLOCK_SIZE=block_size, mask_mod=mask_mod, seq_lengths=(self.q_len, self.kv_len),
        )

    def redraw(self, generator: torch.Generator | None = None, seed: int | None = None) -> "BlockMask":
        """A BigBird mask with fresh random blocks and every other parameter unchanged.

        With neither `generator` nor `seed`, a fresh non-deterministic seed is
        used (recorded in `params["seed"]`); the global RNG is never touched.
        """
        if not self.params or self.params.get("kind") != "bigbird":
            raise TypeError("redraw: only masks built by bigbird() have random blocks to redraw")
        kwargs = {k: v for k, v in self.params.items() if k not in ("kind", "seed")}
        return bigbird(**kwargs, seed=seed, generator=generator)

    def __repr__(self) -> str:
        bm, hm, n_q, n_k = self.shape
        kind = self.params.get("kind") if self.params else "custom"
        return (
            f"BlockMask({kind}, Bm={bm}, Hm={hm}, nQb={n_q}, nKb={n_k}, block_size={self.block_size}, "
            f"q_len={self.q_len}, kv_len={self.kv_len}, causal={self.causal}, blocks={self.num_blocks()}, "
            f"density={self.density():.3f}, device={self.device})"
        )


def _from_layout(layout: torch.Tensor, *, block_size, q_len, kv_len, causal, window=None, params=None) -> BlockMask:
    """Tables (kv, full_kv, q, full_q) from a trusted bool layout (Bm, Hm, nQb, nKb); no re-validation."""
    full = layout & _complete_blocks(q_len, kv_len, block_size, causal, layout.device)
    kv_num, kv_idx = _tables_from_layout(layout)
    full_num, full_idx = _tables_from_layout(full)
    q_num, q_idx = _tables_from_layout(layout.transpose(-1, -2))
    full_q_num, full_q_idx = _tables_from_layout(full.transpose(-1, -2))
    return BlockMask(
        kv_num, kv_idx, block_size=block_size, q_len=q_len, kv_len=kv_len, causal=causal,
        full_kv_num_blocks=full_num, full_kv_indices=full_idx,
        q_num_blocks=q_num, q_indices=q_idx, full_q_num_blocks=full_q_num, full_q_indices=full_q_idx,
        window=window, params=params, check=False,
    )


# --------------------------------------------------------------------------
# constructors
# --------------------------------------------------------------------------
def from_dense(
    layout: torch.Tensor,
    *,
    block_size: int,
    q_len: int | None = None,
    kv_len: int | None = None,
    causal: bool = False,
) -> BlockMask:
    """A mask from a bool block layout `(nQb, nKb)`, `(Hm, nQb, nKb)` or `(Bm, Hm, nQb, nKb)`.

    `q_len` / `kv_len` default to `nQb * block_size` / `nKb * block_size`; a
    shorter length makes the last block partial. The layout is kept as given
    (blocks wholly above the causal diagonal are not dropped; they simply see
    nothing). Tables live on the layout's device.
    """
    if not isinstance(layout, torch.Tensor) or layout.dtype != torch.bool:
        got = layout.dtype if isinstance(layout, torch.Tensor) else type(layout).__name__
        raise TypeError(f"layout: expected a bool tensor, got {got}")
    if layout.dim() not in (2, 3, 4):
        raise ValueError(f"layout: expected (nQb, nKb), (H, nQb, nKb) or (B, H, nQb, nKb), got shape {tuple(layout.shape)}")
    if 0 in layout.shape:
        raise ValueError(f"layout: every dim must be >= 1, got shape {tuple(layout.shape)}")
    block_size = _check_block_size(block_size)
    layout4 = layout.reshape((1,) * (4 - layout.dim()) + tuple(layout.shape))  # (Bm, Hm, nQb, nKb)
    _, _, n_q, n_k = layout4.shape
    q_len = n_q * block_size if q_len is None else _check_length("q_len", q_len, n_q, block_size, "layout")
    kv_len = n_k * block_size if kv_len is None else _check_length("kv_len", kv_len, n_k, block_size, "layout")
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {causal!r}")
    return _from_layout(layout4.contiguous(), block_size=block_size, q_len=q_len, kv_len=kv_len, causal=causal,
                        params={"kind": "from_dense"})


def _global_flags(n_blocks: int, blocks, name: str) -> torch.Tensor:
    """Bool (n_blocks,) from a list of block indices (negative counts from the end)."""
    flags = torch.zeros(n_blocks, dtype=torch.bool)
    for b in blocks:
        b = _check_int(name, b, -n_blocks)
        if b >= n_blocks:
            raise ValueError(f"{name}: block {b} out of range for {n_blocks} blocks")
        flags[b] = True
    return flags


def _window_band(n_blocks: int, num_window_blocks) -> torch.Tensor:
    """Bool (n, n): |i - j| <= num_window_blocks // 2."""
    num_window_blocks = _check_int("num_window_blocks", num_window_blocks, 1)
    if num_window_blocks % 2 == 0:
        raise ValueError(f"num_window_blocks: must be odd (centred on the diagonal), got {num_window_blocks}")
    idx = torch.arange(n_blocks)
    return (idx[:, None] - idx[None, :]).abs() <= num_window_blocks // 2


def bigbird(
    seq_len: int,
    *,
    block_size: int = 64,
    num_global_blocks: int = 1,
    num_window_blocks: int = 3,
    num_random_blocks: int = 3,
    num_heads: int = 1,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    causal: bool = False,
) -> BlockMask:
    """BigBird's block pattern (paper / HF convention), per head: shape (1, num_heads, nb, nb).

    * global: the first and last `num_global_blocks` blocks are global rows
      (they attend to every block) and global columns (every block attends to
      them);
    * window: `num_window_blocks` (odd) blocks centred on the diagonal,
      `{i - w//2, ..., i + w//2}`;
    * random: for each non-global query block and each head,
      `num_random_blocks` key blocks drawn uniformly without replacement from
      the blocks outside the window and the global columns (and, if `causal`,
      at or below the diagonal); fewer only when not enough remain.

    `causal=True` keeps only blocks at or below the diagonal and sets the
    element-level causal rule. `seq_len` not a multiple of `block_size` makes
    the last block partial. Randomness comes from `seed` or `generator` (never
    the global RNG; with neither, a fresh seed is drawn from the OS and stored
    in `params["seed"]`); heads draw independently. `redraw()` gives a new draw.
    """
    block_size = _check_block_size(block_size)
    seq_len = _check_int("seq_len", seq_len, 1)
    num_global_blocks = _check_int("num_global_blocks", num_global_blocks, 0)
    num_random_blocks = _check_int("num_random_blocks", num_random_blocks, 0)
    num_heads = _check_int("num_heads", num_heads, 1)
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {causal!r}")
    n = -(-seq_len // block_size)
    window = _window_band(n, num_window_blocks)  # (n, n)
    gen, used_seed = _make_generator(seed, generator)

    idx = torch.arange(n)
    is_global = (idx < num_global_blocks) | (idx >= n - num_global_blocks)  # (n,)
    allowed = _causal_reachable(seq_len, seq_len, block_size) if causal else torch.ones(n, n, dtype=torch.bool)
    base = (window | is_global[:, None] | is_global[None, :]) & allowed  # (n, n)
    # Random candidates: outside window and global columns, non-global rows only.
    candidates = ~window & ~is_global[None, :] & ~is_global[:, None] & allowed  # (n, n)

    layout = base.expand(num_heads, n, n).clone()  # (H, n, n)
    picks_per_row = min(num_random_blocks, n)
    if picks_per_row > 0:
        # Uniform keys, non-candidates pushed past 1: the k smallest are a uniform
        # sample without replacement from the candidates (fewer if fewer remain).
        keys = torch.rand(num_heads, n, n, generator=gen, device=gen.device).to("cpu")  # (H, n, n)
        keys.masked_fill_(~candidates, 2.0)
        values, picks = keys.topk(picks_per_row, dim=-1, largest=False)  # (H, n, k)
        chosen = torch.zeros(num_heads, n, n, dtype=torch.bool)  # (H, n, n)
        chosen.scatter_(-1, picks, values < 2.0)  # picks are distinct within a row
        layout |= chosen

    params = {
        "kind": "bigbird", "seq_len": seq_len, "block_size": block_size, "num_global_blocks": num_global_blocks,
        "num_window_blocks": num_window_blocks, "num_random_blocks": num_random_blocks, "num_heads": num_heads,
        "causal": causal, "seed": used_seed,
    }
    return _from_layout(layout[None], block_size=block_size, q_len=seq_len, kv_len=seq_len, causal=causal, params=params)


def longformer(
    seq_len: int,
    *,
    block_size: int,
    num_window_blocks: int,
    global_blocks=(0,),
    causal: bool = False,
    num_heads: int = 1,
) -> BlockMask:
    """Longformer's block pattern: a sliding window of blocks plus global blocks.

    The window is `num_window_blocks` (odd) blocks centred on the diagonal;
    each block in `global_blocks` (indices, negative from the end) is a global
    row and a global column. `causal=True` keeps blocks at or below the
    diagonal and sets the element causal rule. Same layout for every head:
    shape (1, num_heads, nb, nb).
    """
    block_size = _check_block_size(block_size)
    seq_len = _check_int("seq_len", seq_len, 1)
    num_heads = _check_int("num_heads", num_heads, 1)
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {causal!r}")
    n = -(-seq_len // block_size)
    is_global = _global_flags(n, tuple(global_blocks), "global_blocks")  # (n,)
    layout = _window_band(n, num_window_blocks) | is_global[:, None] | is_global[None, :]  # (n, n)
    if causal:
        layout &= _causal_reachable(seq_len, seq_len, block_size)
    params = {"kind": "longformer", "seq_len": seq_len, "block_size": block_size, "num_window_blocks": num_window_blocks,
              "global_blocks": tuple(int(b) for b in global_blocks), "causal": causal, "num_heads": num_heads}
    return _from_layout(layout.expand(1, num_heads, n, n).contiguous(), block_size=block_size, q_len=seq_len,
                        kv_len=seq_len, causal=causal, params=params)


def sliding_window(
    seq_len: int,
    *,
    block_size: int,
    window_size,
    causal: bool = False,
    kv_len: int | None = None,
) -> BlockMask:
    """The blocks that cover the element window `window_size=(left, right)`.

    attnkernels' window convention (bottom-right aligned, -1 unbounded, an int
    w meaning (w, w)): query i sees key j iff
    `i + kv_len - q_len - left <= j <= i + kv_len - q_len + right`, with
    `q_len = seq_len`, `kv_len` defaulting to `seq_len`. `causal=True` clips
    `right` to 0 and sets the mask's causal flag.

    Exactness: a block is listed iff it holds at least one element of the
    window, so the **block mask alone is coarser than the element window**:
    `element_mask()` (and every kernel that reads only the tables) sees whole
    blocks, ANDed with the causal rule only. For the exact element window, pass
    it to the attention call as well: `attention(q, k, v,
    window_size=mask.window, block_mask=mask)`; the mask then only lets the
    kernels skip the blocks outside the band. `mask.window` holds the resolved
    `(left, right)`.
    """
    block_size = _check_block_size(block_size)
    q_len = _check_int("seq_len", seq_len, 1)
    kv_len = q_len if kv_len is None else _check_int("kv_len", kv_len, 1)
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {causal!r}")
    left, right = resolve_window(window_size, causal)
    n_q, n_k = -(-q_len // block_size), -(-kv_len // block_size)
    q_first, q_last = _block_bounds(n_q, q_len, block_size)
    k_first, k_last = _block_bounds(n_k, kv_len, block_size)
    offset = kv_len - q_len
    # Key range seen by the rows of each query block (window bounds grow with i): [lo, hi].
    lo = (q_first + offset - left).clamp(min=0) if left != UNBOUNDED else torch.zeros_like(q_first)  # (nQb,)
    hi = (q_last + offset + right).clamp(max=kv_len - 1) if right != UNBOUNDED else torch.full_like(q_last, kv_len - 1)
    layout = (k_first[None, :] <= hi[:, None]) & (k_last[None, :] >= lo[:, None]) & (lo <= hi)[:, None]  # (nQb, nKb)
    params = {"kind": "sliding_window", "seq_len": seq_len, "block_size": block_size, "window_size": (left, right),
              "causal": causal, "kv_len": kv_len}
    return _from_layout(layout[None, None].contiguous(), block_size=block_size, q_len=q_len, kv_len=kv_len,
                        causal=causal, window=(left, right), params=params)


def causal(seq_len: int, *, block_size: int, kv_len: int | None = None) -> BlockMask:
    """Bottom-right causal: every block holding an element with `j <= i + kv_len - q_len`, and `causal=True`.

    `q_len = seq_len`; `kv_len` defaults to `seq_len`. With `kv_len < q_len`
    the first queries see nothing (their rows are empty).
    """
    block_size = _check_block_size(block_size)
    q_len = _check_int("seq_len", seq_len, 1)
    kv_len = q_len if kv_len is None else _check_int("kv_len", kv_len, 1)
    layout = _causal_reachable(q_len, kv_len, block_size)  # (nQb, nKb)
    params = {"kind": "causal", "seq_len": seq_len, "block_size": block_size, "kv_len": kv_len}
    return _from_layout(layout[None, None].contiguous(), block_size=block_size, q_len=q_len, kv_len=kv_len,
                        causal=True, params=params)
