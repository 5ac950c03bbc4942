"""FAVOR+ positive random features (Performer) for the softmax kernel.

    exp(qᵀk) = E_w[ exp(wᵀq − |q|²/2) · exp(wᵀk − |k|²/2) ],  w ~ N(0, I_D)

so with M draws w_1..w_M stacked in a projection W (M, D),
φ(x) = exp(W x − |x|²/2) / √M gives φ(q)ᵀφ(k) ≈ exp(qᵀk), always positive.
Orthogonal draws (blocks of D orthonormal rows from a QR, each row rescaled by
the norm of an independent D-dim Gaussian so its length is chi-distributed as
for iid rows) keep the estimator unbiased and lower its variance.

Stabiliser: exp(Wx − |x|²/2) overflows for large inputs, so a constant c is
subtracted inside the exp: per row (max over features) for queries, one value
per (batch, head) (max over tokens and features) for keys. Both are detached.
A query row's constant scales its numerator and its denominator alike, and the
key constant scales every key of the head alike, so both cancel in the
normalised output; they do not cancel without normalisation, which is why
`linear_attention` refuses `normalize=False` with these features.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def gaussian_orthogonal_projection(num_features: int, head_dim: int, *, orthogonal: bool, generator: torch.Generator | None) -> Tensor:
    """W (num_features, head_dim), float32: iid N(0, 1) rows, or orthogonal blocks with chi row norms."""
    if not orthogonal:
        return torch.randn(num_features, head_dim, generator=generator)
    blocks = []
    for _ in range(math.ceil(num_features / head_dim)):
        gaussian = torch.randn(head_dim, head_dim, generator=generator)
        basis, _ = torch.linalg.qr(gaussian)  # columns orthonormal
        blocks.append(basis.T)  # rows orthonormal  [D, D]
    rows = torch.cat(blocks)[:num_features]  # [M, D]
    norms = torch.randn(num_features, head_dim, generator=generator).norm(dim=1, keepdim=True)  # chi(D) lengths
    return rows * norms


class PerformerFeatures(nn.Module):
    """FAVOR+ features; pass an instance as `linear_attention(..., feature_map=features)`.

    Args:
        head_dim: D, the last dimension of q and k.
        num_features: M, the number of random features (the state is (M, Dv)).
        orthogonal: orthogonal random projections (lower variance) or iid Gaussian rows.
        generator / seed: where the projection is drawn from (never the global
            RNG unless neither is given); `redraw()` draws again from it.

    `features(x, is_query=...)` maps (..., N, D) to (..., N, M) with the raw
    FAVOR+ map; `linear_attention` first scales q and k by scale^(1/2)
    (default D^(-1/4)), so by default it approximates softmax(q kᵀ/√D) v.
    The projection is a buffer: it follows `.to(device)` and the state_dict.
    """

    def __init__(self, head_dim: int, num_features: int = 256, *, orthogonal: bool = True,
                 generator: torch.Generator | None = None, seed: int | None = None):
        super().__init__()
        if not isinstance(head_dim, int) or head_dim < 1:
            raise ValueError(f"head_dim: expected a positive int, got {head_dim!r}")
        if not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"num_features: expected a positive int, got {num_features!r}")
        if generator is not None and seed is not None:
            raise ValueError("PerformerFeatures: pass a generator or a seed, not both")
        if seed is not None:
            generator = torch.Generator().manual_seed(seed)
        self.head_dim = head_dim
        self.num_features = num_features
        self.orthogonal = orthogonal
        self._generator = generator
        self.register_buffer("projection", self._draw(generator))

    def _draw(self, generator: torch.Generator | None) -> Tensor:
        return gaussian_orthogonal_projection(self.num_features, self.head_dim, orthogonal=self.orthogonal, generator=generator)

    @torch.no_grad()
    def redraw(self, generator: torch.Generator | None = None) -> None:
        """Draw a new projection (from `generator`, else the one given at construction)."""
        generator = generator if generator is not None else self._generator
        self.projection.copy_(self._draw(generator).to(self.projection.device))

    def forward(self, x: Tensor, *, is_query: bool) -> Tensor:
        if x.shape[-1] != self.head_dim:
            raise ValueError(f"PerformerFeatures: expected last dim {self.head_dim}, got shape {tuple(x.shape)}")
        projection = self.projection.to(x.dtype)
        if x.shape[-2] == 0:  # no tokens: nothing to stabilise (amax of nothing is an error)
            return x.new_empty(*x.shape[:-1], self.num_features)
        # exp(wᵀx − |x|²/2 − c) / √M as exp(wᵀx − b − ln(M)/2) with one per-row b = |x|²/2 + c
        # [..., N, 1], computed in place on the matmul's output: three in-place passes over the
        # (N, M) features forward and two back (the exp's product, the sum for b), where
        # subtracting, shifting and dividing them one by one took ~3x as long (B1 H8
        # N4096 M256, torch profiler). The stabiliser c is detached, as before.
        logits = x @ projection.T  # [..., N, M]: wᵀx
        half_norm = 0.5 * (x * x).sum(-1, keepdim=True)  # |x|²/2, [..., N, 1]
        log_root = 0.5 * math.log(self.num_features)
        with torch.no_grad():
            row_max = logits.amax(dim=-1, keepdim=True)  # max_j wⱼᵀx, [..., N, 1]
        if is_query:
            # c = max_j(wⱼᵀx) − |x|²/2 per row, so b = max_j(wⱼᵀx) (+ ln(M)/2) in value, without
            # the large |x|²/2 added and taken away again (exact: the row's top feature is 1/√M);
            # half_norm − half_norm.detach() is exactly 0 and carries the norm's gradient.
            bias = (half_norm - half_norm.detach()) + row_max
        else:
            # c = max over the head's rows of (max_j wⱼᵀx − |x|²/2), per (batch, head)
            with torch.no_grad():
                shift = (row_max - half_norm).amax(dim=-2, keepdim=True)
            bias = half_norm + shift
        # ln(M)/2 apart, after the large terms cancel: added to b it would be rounded at b's scale
        # (add_ of −b: its backward sums the gradient for b, where sub_'s negates the whole (N, M) first)
        return logits.add_(-bias).sub_(log_root).exp_()

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, num_features={self.num_features}, orthogonal={self.orthogonal}"
