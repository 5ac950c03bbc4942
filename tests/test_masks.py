"""BlockMask and its constructors: format invariants, BigBird's properties, validation, FlexAttention parity."""
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnkernels import masks
from attnkernels.masks import BlockMask
from attnkernels.softmax.reference import attention_reference
from attnkernels.conventions import window_visibility


# --------------------------------------------------------------------------
# independent oracles (written the slow, obvious way)
# --------------------------------------------------------------------------
def expand_layout(layout, block_size, q_len, kv_len, causal):
    """(Bm, Hm, nQb, nKb) -> (Bm, Hm, q_len, kv_len) by repeat_interleave, then the causal rule."""
    dense = layout.repeat_interleave(block_size, -2).repeat_interleave(block_size, -1)[..., :q_len, :kv_len]
    if causal:
        dense = dense & window_visibility(q_len, kv_len, (-1, 0))
    return dense


def rows_from_tables(num, indices):
    """Python lists of the listed entries of every row, for (..., R) / (..., R, C) tables."""
    flat_num, flat_idx = num.reshape(-1).tolist(), indices.reshape(-1, indices.shape[-1]).tolist()
    return [row[:n] for n, row in zip(flat_num, flat_idx)]


def assert_consistent(mask: BlockMask):
    """Every format invariant the kernels rely on."""
    bm, hm, n_q, n_k = mask.shape
    bs = mask.block_size
    assert n_q == -(-mask.q_len // bs) and n_k == -(-mask.kv_len // bs)
    for name in masks._TABLES:
        table = getattr(mask, name)
        assert table is not None, name
        assert table.dtype == torch.int32 and table.is_contiguous(), name
    assert mask.kv_num_blocks.shape == (bm, hm, n_q) and mask.q_num_blocks.shape == (bm, hm, n_k)
    assert mask.q_indices.shape == (bm, hm, n_k, n_q) and mask.full_kv_indices.shape == mask.kv_indices.shape
    layout = mask.to_dense()
    # rows: distinct, ascending, padding zero
    for num, idx in (
        (mask.kv_num_blocks, mask.kv_indices), (mask.full_kv_num_blocks, mask.full_kv_indices),
        (mask.q_num_blocks, mask.q_indices), (mask.full_q_num_blocks, mask.full_q_indices),
    ):
        width = idx.shape[-1]
        for row, full_row in zip(rows_from_tables(num, idx), idx.reshape(-1, width).tolist()):
            assert row == sorted(set(row)), row
            assert all(0 <= c < width for c in row)
            assert full_row[len(row):] == [0] * (width - len(row))
    # q_* is the exact transpose of kv_*; full_q_* of full_kv_*
    assert torch.equal(masks._layout_from_tables(mask.q_num_blocks, mask.q_indices), layout.transpose(-1, -2))
    full = mask.full_to_dense()
    assert torch.equal(masks._layout_from_tables(mask.full_q_num_blocks, mask.full_q_indices), full.transpose(-1, -2))
    # full_* are exactly the listed blocks whose (padded) element tile is all-true
    elem = mask.element_mask()
    assert torch.equal(elem, expand_layout(layout, bs, mask.q_len, mask.kv_len, mask.causal))
    padded = torch.zeros(bm, hm, n_q * bs, n_k * bs, dtype=torch.bool)
    padded[..., : mask.q_len, : mask.kv_len] = elem
    tiles_all_true = padded.reshape(bm, hm, n_q, bs, n_k, bs).all(5).all(3)
    assert torch.equal(full, tiles_all_true & layout)
    # the validating constructor accepts what the constructors produce
    BlockMask(
        mask.kv_num_blocks, mask.kv_indices, block_size=bs, q_len=mask.q_len, kv_len=mask.kv_len, causal=mask.causal,
        full_kv_num_blocks=mask.full_kv_num_blocks, full_kv_indices=mask.full_kv_indices,
        q_num_blocks=mask.q_num_blocks, q_indices=mask.q_indices,
        full_q_num_blocks=mask.full_q_num_blocks, full_q_indices=mask.full_q_indices,
    )


# --------------------------------------------------------------------------
# BigBird
# --------------------------------------------------------------------------
BIGBIRD_CASES = [
    # (seq_len, block, global, window, random, heads, causal)
    (1000, 32, 1, 3, 3, 4, False),
    (1000, 32, 2, 5, 2, 3, True),
    (512, 64, 1, 3, 3, 2, False),
    (2048, 64, 0, 1, 4, 2, False),
    (200, 16, 1, 3, 30, 2, False),  # not enough candidates: fewer random blocks
    (300, 16, 1, 3, 10, 2, True),  # causal, not enough below the diagonal early on
    (40, 16, 1, 3, 3, 2, False),  # 3 blocks, all global or window
]


def bigbird_id(case):
    n, b, g, w, r, h, c = case
    return f"N{n}-b{b}-g{g}-w{w}-r{r}-H{h}" + ("-causal" if c else "")


@pytest.mark.parametrize("case", BIGBIRD_CASES, ids=bigbird_id)
def test_bigbird_pattern(case):
    seq_len, bs, g, w, r, heads, is_causal = case
    mask = masks.bigbird(seq_len, block_size=bs, num_global_blocks=g, num_window_blocks=w, num_random_blocks=r,
                         num_heads=heads, seed=123, causal=is_causal)
    nb = -(-seq_len // bs)
    assert mask.shape == (1, heads, nb, nb) and mask.causal is is_causal
    assert (mask.q_len, mask.kv_len, mask.block_size) == (seq_len, seq_len, bs)
    layout = mask.to_dense()[0].tolist()  # [H][nb][nb]
    globals_ = set(range(g)) | set(range(nb - g, nb))
    for h in range(heads):
        for i in range(nb):
            allowed = set(range(i + 1)) if is_causal else set(range(nb))
            listed = {j for j in range(nb) if layout[h][i][j]}
            assert listed <= allowed, "block above the diagonal in a causal mask"
            window = {j for j in range(i - w // 2, i + w // 2 + 1) if 0 <= j < nb}
            if i in globals_:
                assert listed == allowed, "global row incomplete"
                continue
            assert (globals_ & allowed) <= listed, "global column missing"
            assert (window & allowed) <= listed, "window block missing"
            candidates = allowed - window - globals_
            random_blocks = listed - window - globals_
            assert random_blocks <= candidates
            assert len(random_blocks) == min(r, len(candidates)), (h, i, random_blocks, candidates)
    assert_consistent(mask)


def test_bigbird_fewer_random_blocks_when_not_enough_remain():
    # 8 blocks; row 3 has window {2,3,4}, globals {0,7}: only {1,5,6} remain for 5 requested.
    mask = masks.bigbird(128, block_size=16, num_random_blocks=5, num_heads=3, seed=0)
    layout = mask.to_dense()[0]
    assert layout[:, 3].all()
    assert mask.kv_num_blocks[0, :, 3].tolist() == [8, 8, 8]
    # 64 blocks: every non-global row gets exactly 5 random blocks
    big = masks.bigbird(64 * 16, block_size=16, num_random_blocks=5, num_heads=2, seed=0).kv_num_blocks[0, :, 2:-2]
    assert (big == 3 + 2 + 5).all()


def test_bigbird_reproducible_from_seed_and_generator():
    kwargs = dict(block_size=16, num_heads=4, num_random_blocks=3)
    a = masks.bigbird(1024, seed=7, **kwargs)
    b = masks.bigbird(1024, seed=7, **kwargs)
    assert torch.equal(a.kv_indices, b.kv_indices) and torch.equal(a.kv_num_blocks, b.kv_num_blocks)
    assert not torch.equal(a.to_dense(), masks.bigbird(1024, seed=8, **kwargs).to_dense())
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    c = masks.bigbird(1024, generator=g1, **kwargs)
    assert torch.equal(c.to_dense(), masks.bigbird(1024, generator=g2, **kwargs).to_dense())
    assert torch.equal(c.to_dense(), a.to_dense())  # seed=s draws like a generator seeded with s
    assert not torch.equal(c.to_dense(), masks.bigbird(1024, generator=g1, **kwargs).to_dense())  # g1 advanced
    assert a.params["seed"] == 7


def test_bigbird_never_uses_the_global_rng():
    state = torch.get_rng_state()
    masks.bigbird(512, block_size=16, num_heads=2, seed=1)
    unseeded = masks.bigbird(512, block_size=16, num_heads=2)
    assert torch.equal(state, torch.get_rng_state())
    assert isinstance(unseeded.params["seed"], int)
    assert torch.equal(unseeded.to_dense(), masks.bigbird(512, block_size=16, num_heads=2, seed=unseeded.params["seed"]).to_dense())


def test_bigbird_heads_differ():
    layout = masks.bigbird(2048, block_size=32, num_heads=4, seed=0).to_dense()[0]
    for a in range(4):
        for b in range(a + 1, 4):
            assert not torch.equal(layout[a], layout[b]), (a, b)


def test_bigbird_redraw():
    mask = masks.bigbird(1000, block_size=32, num_global_blocks=2, num_random_blocks=2, num_heads=3, seed=0, causal=True)
    fresh = mask.redraw(seed=1)
    assert not torch.equal(fresh.to_dense(), mask.to_dense())
    assert not torch.equal(mask.redraw().to_dense(), mask.to_dense())
    same_params = {k: v for k, v in mask.params.items() if k != "seed"}
    assert {k: v for k, v in fresh.params.items() if k != "seed"} == same_params
    assert (fresh.shape, fresh.causal, fresh.q_len, fresh.block_size) == (mask.shape, True, 1000, 32)
    assert torch.equal(fresh.kv_num_blocks, mask.kv_num_blocks)  # same counts, other blocks
    expected = masks.bigbird(1000, block_size=32, num_global_blocks=2, num_random_blocks=2, num_heads=3, seed=1, causal=True)
    assert torch.equal(fresh.kv_indices, expected.kv_indices)
    assert torch.equal(mask.redraw(generator=torch.Generator().manual_seed(1)).to_dense(), expected.to_dense())
    with pytest.raises(TypeError, match="redraw"):
        masks.causal(64, block_size=16).redraw()


def test_bigbird_partial_last_block_N1000_b64():
    mask = masks.bigbird(1000, block_size=64, num_heads=2, seed=0)
    assert mask.shape == (1, 2, 16, 16)
    assert mask.element_mask().shape == (1, 2, 1000, 1000)
    full = mask.full_to_dense()
    assert not full[..., -1, :].any() and not full[..., :, -1].any()
    assert full[..., 0, 0].all()


def test_bigbird_large_N65536_b64_H8_builds():
    mask = masks.bigbird(65536, block_size=64, num_heads=8, seed=0)
    assert mask.shape == (1, 8, 1024, 1024)
    assert mask.q_indices.shape == (1, 8, 1024, 1024) and mask.full_kv_num_blocks.shape == (1, 8, 1024)
    counts = mask.kv_num_blocks[0]
    assert (counts[:, [0, -1]] == 1024).all()
    assert (counts[:, 3:-3] == 3 + 2 + 3).all()
    assert mask.num_blocks() == int(mask.q_num_blocks.sum()) == int(mask.to_dense().sum())


# --------------------------------------------------------------------------
# from_dense and the table format
# --------------------------------------------------------------------------
@st.composite
def layouts(draw):
    bm, hm = draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 3]))
    n_q, n_k = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    bits = draw(st.lists(st.booleans(), min_size=bm * hm * n_q * n_k, max_size=bm * hm * n_q * n_k))
    layout = torch.tensor(bits, dtype=torch.bool).reshape(bm, hm, n_q, n_k)
    if draw(st.booleans()):  # force an empty row and an empty column
        layout[..., draw(st.integers(0, n_q - 1)), :] = False
        layout[..., :, draw(st.integers(0, n_k - 1))] = False
    bs = draw(st.sampled_from([16, 32]))
    q_len = (n_q - 1) * bs + draw(st.integers(1, bs))
    kv_len = (n_k - 1) * bs + draw(st.integers(1, bs))
    return layout, bs, q_len, kv_len, draw(st.booleans())


@settings(max_examples=60, deadline=None)
@given(layouts())
def test_from_dense_round_trip_and_invariants(case):
    layout, bs, q_len, kv_len, is_causal = case
    mask = masks.from_dense(layout, block_size=bs, q_len=q_len, kv_len=kv_len, causal=is_causal)
    assert torch.equal(mask.to_dense(), layout)
    assert mask.num_blocks() == int(layout.sum())
    assert mask.density() == pytest.approx(layout.float().mean().item())
    assert_consistent(mask)


@pytest.mark.parametrize("shape", [(3, 5), (2, 3, 5), (2, 1, 3, 5)], ids=lambda s: "x".join(map(str, s)))
def test_from_dense_accepts_2d_3d_4d(shape):
    layout = torch.rand(shape, generator=torch.Generator().manual_seed(0)) < 0.5
    mask = masks.from_dense(layout, block_size=16)
    assert mask.to_dense().shape == (1,) * (4 - len(shape)) + shape
    assert torch.equal(mask.to_dense().reshape(shape), layout)
    assert (mask.q_len, mask.kv_len) == (3 * 16, 5 * 16)


def test_tables_of_a_known_layout_nQb2_nKb3():
    layout = torch.tensor([[0, 1, 1], [0, 0, 0]], dtype=torch.bool)
    mask = masks.from_dense(layout, block_size=16, q_len=20, kv_len=48, causal=False)
    assert mask.kv_num_blocks.tolist() == [[[2, 0]]]
    assert mask.kv_indices.tolist() == [[[[1, 2, 0], [0, 0, 0]]]]
    assert mask.q_num_blocks.tolist() == [[[0, 1, 1]]]
    assert mask.q_indices.tolist() == [[[[0, 0], [0, 0], [0, 0]]]]
    assert mask.full_kv_num_blocks.tolist() == [[[2, 0]]]  # row 0 is whole; row 1 (partial) lists nothing
    assert mask.density() == pytest.approx(2 / 6) and mask.num_blocks() == 2


@pytest.mark.parametrize("lens", [(100, 100), (70, 50), (50, 70), (64, 64)], ids=lambda s: f"Nq{s[0]}-Nk{s[1]}")
def test_causal_constructor_is_exact_bottom_right(lens):
    q_len, kv_len = lens
    mask = masks.causal(q_len, block_size=16, kv_len=kv_len)
    assert mask.causal
    elem = mask.element_mask()[0, 0]
    assert torch.equal(elem, window_visibility(q_len, kv_len, (-1, 0)))
    # minimal: every listed block holds a visible element
    layout = mask.to_dense()[0, 0]
    for i, j in layout.nonzero().tolist():
        assert elem[i * 16 : (i + 1) * 16, j * 16 : (j + 1) * 16].any()
    assert_consistent(mask)


@pytest.mark.parametrize(
    "case",
    [(100, None, (20, 5), False), (100, None, (-1, 0), False), (130, 90, (33, -1), False), (90, 130, (17, 40), True),
     (64, None, 0, False), (100, None, (0, 0), True)],
    ids=lambda c: f"Nq{c[0]}-Nk{c[1] or c[0]}-w{c[2]}" + ("-causal" if c[3] else ""),
)
def test_sliding_window_covers_the_element_window(case):
    q_len, kv_len, window_size, is_causal = case
    mask = masks.sliding_window(q_len, block_size=16, window_size=window_size, causal=is_causal, kv_len=kv_len)
    kv_len = kv_len or q_len
    from attnkernels.windows import resolve_window

    window = resolve_window(window_size, is_causal)
    assert mask.window == window and mask.causal is is_causal
    exact = window_visibility(q_len, kv_len, window)
    elem = mask.element_mask()[0, 0]
    assert not (exact & ~elem).any(), "the block layout must cover the element window"
    layout = mask.to_dense()[0, 0]
    for i, j in layout.nonzero().tolist():  # minimal: each listed block holds a window element
        assert exact[i * 16 : (i + 1) * 16, j * 16 : (j + 1) * 16].any(), (i, j)
    assert_consistent(mask)


@pytest.mark.parametrize("is_causal", [False, True], ids=["bidir", "causal"])
def test_longformer_N300_b32_w3_globals(is_causal):
    mask = masks.longformer(300, block_size=32, num_window_blocks=3, global_blocks=(0, -1), causal=is_causal, num_heads=2)
    n = 10
    assert mask.shape == (1, 2, n, n)
    layout = mask.to_dense()[0]
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    expected = ((i - j).abs() <= 1) | (i == 0) | (j == 0) | (i == n - 1) | (j == n - 1)
    if is_causal:
        expected &= j <= i
    assert torch.equal(layout, expected.expand(2, n, n))
    assert_consistent(mask)


@pytest.mark.parametrize(
    "build",
    [
        lambda: masks.bigbird(333, block_size=16, num_heads=3, seed=4, causal=True),
        lambda: masks.bigbird(333, block_size=32, num_global_blocks=2, num_window_blocks=5, num_heads=2, seed=4),
        lambda: masks.longformer(200, block_size=16, num_window_blocks=5, global_blocks=(3,)),
    ],
    ids=["bigbird-N333-b16-H3-causal", "bigbird-N333-b32-g2-w5-H2", "longformer-N200-b16-w5"],
)
def test_constructors_satisfy_the_format(build):
    assert_consistent(build())


def test_element_mask_rejects_other_lengths():
    mask = masks.causal(100, block_size=16)
    assert mask.element_mask(100, 100).shape == (1, 1, 100, 100)
    with pytest.raises(ValueError, match="q_len"):
        mask.element_mask(99, 100)
    with pytest.raises(ValueError, match="kv_len"):
        mask.element_mask(100, 128)


def test_to_device_copies():
    mask = masks.bigbird(200, block_size=16, num_heads=2, seed=0)
    cpu = mask.to("cpu")
    assert cpu.kv_indices.data_ptr() != mask.kv_indices.data_ptr()
    assert torch.equal(cpu.to_dense(), mask.to_dense()) and cpu.params == mask.params
    meta = mask.to("meta")
    assert meta.device.type == "meta" and meta.q_indices.shape == mask.q_indices.shape
    assert mask.device.type == "cpu"


# --------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------
def _tables(layout, **kw):
    mask = masks.from_dense(layout, block_size=16, **kw)
    return {name: getattr(mask, name).clone() for name in masks._TABLES}


LAYOUT = torch.tensor([[1, 1, 0], [0, 1, 1]], dtype=torch.bool)  # nQb=2, nKb=3


def _make(edit=None, drop=(), **kw):
    t = _tables(LAYOUT)
    if edit:
        edit(t)
    for name in drop:
        t[name] = None
    num, idx = t.pop("kv_num_blocks"), t.pop("kv_indices")
    kw.setdefault("block_size", 16)
    return BlockMask(num, idx, **t, **kw)


def _set(name, value):
    def edit(t):
        t[name] = value(t[name]) if callable(value) else value
    return edit


def _poke(name, index, value):
    def edit(t):
        t[name][index] = value
    return edit


INVALID = [
    ("block_size-48", lambda: _make(block_size=48), ValueError, "block_size: must be a power of two"),
    ("block_size-8", lambda: _make(block_size=8), ValueError, "block_size: must be a power of two"),
    ("block_size-float", lambda: _make(block_size=16.0), TypeError, "block_size"),
    ("kv_indices-int64", lambda: _make(_set("kv_indices", lambda x: x.long())), ValueError, "kv_indices: dtype must be torch.int32"),
    ("kv_num_blocks-int64", lambda: _make(_set("kv_num_blocks", lambda x: x.long())), ValueError, "kv_num_blocks: dtype"),
    ("kv_num_blocks-shape", lambda: _make(_set("kv_num_blocks", lambda x: x[..., :1].contiguous())), ValueError, "kv_num_blocks: shape"),
    ("kv_indices-3d", lambda: _make(_set("kv_indices", lambda x: x[0])), ValueError, "kv_indices: expected 4 dims"),
    ("count-over-width", lambda: _make(_poke("kv_num_blocks", (0, 0, 0), 4), drop=("q_num_blocks", "q_indices")), ValueError, r"kv_num_blocks: counts must be in \[0, 3\]"),
    ("count-negative", lambda: _make(_poke("kv_num_blocks", (0, 0, 1), -1)), ValueError, "kv_num_blocks: counts"),
    ("index-out-of-range", lambda: _make(_poke("kv_indices", (0, 0, 1, 1), 3)), ValueError, r"kv_indices: listed block indices must be in \[0, 3\)"),
    ("index-negative", lambda: _make(_poke("kv_indices", (0, 0, 0, 0), -1)), ValueError, "kv_indices: listed block indices"),
    ("not-ascending", lambda: _make(_poke("kv_indices", (0, 0, 1, slice(0, 2)), torch.tensor([2, 1], dtype=torch.int32))), ValueError, "distinct and ascending"),
    ("duplicate", lambda: _make(_poke("kv_indices", (0, 0, 0, 1), 0)), ValueError, "distinct and ascending"),
    ("q_len-too-long", lambda: _make(q_len=33), ValueError, r"q_len: q_len=33 needs ceil\(33/16\)=3 blocks"),
    ("q_len-too-short", lambda: _make(q_len=16), ValueError, "q_len"),
    ("kv_len", lambda: _make(kv_len=70), ValueError, "kv_len: kv_len=70"),
    ("q_len-zero", lambda: _make(q_len=0), ValueError, "q_len: must be >= 1"),
    ("full-not-subset", lambda: _make(_poke("full_kv_indices", (0, 0, 0, 1), 2), drop=("full_q_num_blocks", "full_q_indices")), ValueError, "full_kv_indices: lists a block that kv_indices does not"),
    ("full-partial-block", lambda: _make(kv_len=40), ValueError, "full_kv_indices: lists a block whose element mask is not all-true"),
    ("full-causal-cut", lambda: _make(causal=True), ValueError, "full_kv_indices: .*causal"),
    ("full-half-given", lambda: _make(drop=("full_kv_indices",)), ValueError, "full_kv_num_blocks/full_kv_indices: give both"),
    ("full_q-without-full_kv", lambda: _make(drop=("full_kv_num_blocks", "full_kv_indices")), ValueError, "full_q_num_blocks: given without"),
    ("q_indices-not-transpose", lambda: _make(_poke("q_indices", (0, 0, 0, 0), 1)), ValueError, "q_indices: not the transpose of kv_indices"),
    ("q_indices-shape", lambda: _make(_set("q_indices", lambda x: x[..., :1].contiguous())), ValueError, r"q_indices: shapes"),
    ("full_q-not-transpose", lambda: _make(_poke("full_q_num_blocks", (0, 0, 0), 0)), ValueError, "full_q_indices: not the transpose of full_kv_indices"),
    ("full_kv-shape", lambda: _make(_set("full_kv_indices", lambda x: x[..., :2].contiguous()), drop=("full_q_num_blocks", "full_q_indices")), ValueError, "full_kv_indices: shape"),
    ("from_dense-int-layout", lambda: masks.from_dense(LAYOUT.int(), block_size=16), TypeError, "layout: expected a bool tensor"),
    ("from_dense-5d", lambda: masks.from_dense(LAYOUT[None, None, None], block_size=16), ValueError, "layout: expected"),
    ("from_dense-empty", lambda: masks.from_dense(LAYOUT[:0], block_size=16), ValueError, "layout: every dim"),
    ("from_dense-kv_len", lambda: masks.from_dense(LAYOUT, block_size=16, kv_len=100), ValueError, "kv_len"),
    ("bigbird-even-window", lambda: masks.bigbird(256, block_size=16, num_window_blocks=4, seed=0), ValueError, "num_window_blocks: must be odd"),
    ("bigbird-seed-and-generator", lambda: masks.bigbird(256, block_size=16, seed=0, generator=torch.Generator()), ValueError, "seed/generator"),
    ("bigbird-negative-random", lambda: masks.bigbird(256, block_size=16, num_random_blocks=-1), ValueError, "num_random_blocks"),
    ("bigbird-block_size", lambda: masks.bigbird(256, block_size=24), ValueError, "block_size"),
    ("bigbird-seq_len", lambda: masks.bigbird(0, block_size=16), ValueError, "seq_len"),
    ("longformer-global-out-of-range", lambda: masks.longformer(64, block_size=16, num_window_blocks=1, global_blocks=(4,)), ValueError, "global_blocks"),
    ("sliding_window-bad-window", lambda: masks.sliding_window(64, block_size=16, window_size=(-2, 3)), ValueError, "window_size"),
    ("causal-kv_len", lambda: masks.causal(64, block_size=16, kv_len=0), ValueError, "kv_len"),
]


@pytest.mark.parametrize("build, error, message", [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_validation_errors_name_the_argument(build, error, message):
    with pytest.raises(error, match=message):
        build()


def test_validating_constructor_computes_missing_transposes():
    t = _tables(LAYOUT)
    mask = BlockMask(t["kv_num_blocks"], t["kv_indices"], block_size=16,
                     full_kv_num_blocks=t["full_kv_num_blocks"], full_kv_indices=t["full_kv_indices"])
    assert torch.equal(mask.q_indices, t["q_indices"]) and torch.equal(mask.full_q_indices, t["full_q_indices"])
    bare = BlockMask(t["kv_num_blocks"], t["kv_indices"], block_size=16)
    assert bare.full_kv_num_blocks is None and bare.full_to_dense() is None
    assert (bare.q_len, bare.kv_len, bare.causal) == (32, 48, False)


@pytest.mark.parametrize(
    "call, message",
    [
        ((2, 4, 99, 100), "q_len: the block mask was built for q_len=100, but the query has N=99"),
        ((2, 4, 100, 101), "kv_len: the block mask was built for kv_len=100, but the key has N=101"),
        ((3, 4, 100, 100), "batch: the block mask's batch dim Bm=2 must be 1 or the batch size B=3"),
        ((2, 8, 100, 100), "heads: the block mask's head dim Hm=4 must be 1 or the number of query heads Hq=8"),
    ],
    ids=["q_len", "kv_len", "batch", "heads"],
)
def test_check_compatible_names_the_mismatch(call, message):
    mask = masks.from_dense(torch.ones(2, 4, 7, 7, dtype=torch.bool), block_size=16, q_len=100, kv_len=100)
    mask.check_compatible(2, 4, 100, 100)
    with pytest.raises(ValueError, match=message):
        mask.check_compatible(*call)
    b, h, nq, nk = call
    with pytest.raises(ValueError, match=message.split(":")[0]):
        mask.validate(torch.empty(b, h, nq, 8), torch.empty(b, 1, nk, 8))


def test_broadcast_dims_are_compatible_with_any_batch_and_heads():
    mask = masks.bigbird(100, block_size=16, seed=0)  # (1, 1, ...)
    mask.check_compatible(5, 12, 100, 100)
    mask.validate(torch.empty(3, 6, 100, 8), torch.empty(3, 2, 100, 8))


# --------------------------------------------------------------------------
# FlexAttention parity
# --------------------------------------------------------------------------
FLEX_CASES = {
    "bigbird-N100-b16-H4-r1": lambda: masks.bigbird(100, block_size=16, num_heads=4, num_random_blocks=1, seed=0),
    "bigbird-N100-b16-H4-causal": lambda: masks.bigbird(100, block_size=16, num_heads=4, seed=1, causal=True),
    "causal-Nq70-Nk50-b16": lambda: masks.causal(70, block_size=16, kv_len=50),
    "dense-B2-Nq40-Nk60-emptyrows": lambda: masks.from_dense(
        torch.tensor([[[[1, 0, 1, 0], [0, 0, 0, 0], [0, 1, 1, 1]]], [[[0, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 1]]]], dtype=torch.bool),
        block_size=16, q_len=40, kv_len=60),
    "sliding-Nq48-Nk80-w(20,3)": lambda: masks.sliding_window(48, block_size=16, window_size=(20, 3), kv_len=80),
    "longformer-N90-b32-H4": lambda: masks.longformer(90, block_size=32, num_window_blocks=1, global_blocks=(1,), num_heads=4),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("name", list(FLEX_CASES))
def test_to_flex_block_mask_matches_reference(name, dtype):
    from torch.nn.attention.flex_attention import flex_attention

    mask = FLEX_CASES[name]()
    batch, q_heads, kv_heads, dim = 2, 4, 2, 16
    q = torch.randn(batch, q_heads, mask.q_len, dim, dtype=dtype)
    k = torch.randn(batch, kv_heads, mask.kv_len, dim, dtype=dtype)
    v = torch.randn(batch, kv_heads, mask.kv_len, dim, dtype=dtype)
    flex_mask = mask.to_flex_block_mask()
    assert torch.equal(flex_mask.to_dense().bool(), mask.to_dense())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex_attention warns that it is not compiled
        out, lse = flex_attention(q, k, v, block_mask=flex_mask, enable_gqa=True, return_lse=True)
    ref_out, ref_lse = attention_reference(q, k, v, block_mask=mask)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.double(), ref_out, **tol)
    empty = torch.isneginf(ref_lse)
    torch.testing.assert_close(out[empty].double(), torch.zeros_like(ref_out[empty]))
    assert torch.equal(torch.isneginf(lse), empty)
    torch.testing.assert_close(lse[~empty].double(), ref_lse[~empty], **tol)
