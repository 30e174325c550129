"""Co-activation statistics between two sets of latents on the same rows, from sparse entries only.

For a candidate parent A and child B, over the rows where both fire: Σ a_A·a_B, Σ a_A² and the count. Since A's
activation is 0 where it does not fire, these are also the sums over all rows where B fires, which is what the
directed masked cosine needs (parent–child links, msae.analysis.hierarchy). Each sum is a product of two sparse
matrices (latents × rows by rows × latents), which torch hands to MKL's sparse GEMM."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from msae.analysis.stream import Sparse


@dataclass
class Pairs:
    """Pair statistics, one entry per (parent, child) that fired together at least once."""

    parent: Tensor
    """(P,) int64 parent latent."""
    child: Tensor
    """(P,) int64 child latent."""
    dot: Tensor
    """(P,) float64 Σ a_parent · a_child over rows where both fire."""
    parent_sq: Tensor
    """(P,) float64 Σ a_parent² over rows where the child fires."""
    count: Tensor
    """(P,) int64 rows where both fire."""
    child_sum: Tensor
    """(P,) float64 Σ a_child over rows where both fire (the activation-weighted coverage's numerator)."""


PAIR_FIELDS = ("parent", "child", "dot", "parent_sq", "count", "child_sum")


@dataclass
class EntryMatrix:
    """Sparse entries as compressed rows: row i's column indices and values are idx[ptr[i]:ptr[i + 1]]. Either
    rows × latents (one row a cache row) or latents × rows (one row a latent: the rows where it fires)."""

    ptr: Tensor
    """(n + 1,) int32 (int64 beyond 2³¹ entries), as idx."""
    idx: Tensor
    """(nnz,) column indices."""
    val: Tensor
    """(nnz,) float64 values."""
    n_cols: int

    def rows(self, a: int, b: int) -> "EntryMatrix":
        """Rows [a, b) (views, no copy)."""
        lo, hi = int(self.ptr[a]), int(self.ptr[b])
        return EntryMatrix(self.ptr[a : b + 1] - lo, self.idx[lo:hi], self.val[lo:hi], self.n_cols)

    def csr(self, values: Tensor | None = None) -> Tensor:
        """torch's sparse CSR matrix of these entries (with `values` in place of val)."""
        with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state": products of two are all we use
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)
            return torch.sparse_csr_tensor(self.ptr, self.idx, self.val if values is None else values,
                                           (self.ptr.numel() - 1, self.n_cols), check_invariants=False)


def row_major(sp: Sparse, lo: int = 0, hi: int | None = None) -> EntryMatrix:
    """rows × (latents lo..hi-1, as 0..hi-lo-1) of `sp`."""
    hi = sp.d_sae if hi is None else hi
    rows, cols, vals = _entries_in(sp, lo, hi)
    ptr = torch.zeros(sp.n_rows + 1, dtype=torch.long)
    ptr[1:] = torch.bincount(rows, minlength=sp.n_rows).cumsum(0)
    n_cols = hi - lo
    index = _index_dtype(max(cols.numel(), n_cols))
    return EntryMatrix(ptr.to(index), cols.to(index), vals.double(), n_cols)


def latent_major(sp: Sparse, lo: int = 0, hi: int | None = None) -> EntryMatrix:
    """(latents lo..hi-1) × rows of `sp`: each latent's firing rows (ascending) and activations."""
    hi = sp.d_sae if hi is None else hi
    rows, cols, vals = _entries_in(sp, lo, hi)
    order = torch.argsort(cols, stable=True)
    ptr = torch.zeros(hi - lo + 1, dtype=torch.long)
    ptr[1:] = torch.bincount(cols, minlength=hi - lo).cumsum(0)
    index = _index_dtype(max(cols.numel(), sp.n_rows))
    return EntryMatrix(ptr.to(index), rows[order].to(index), vals[order].double(), sp.n_rows)


def _entries_in(sp: Sparse, lo: int, hi: int) -> tuple[Tensor, Tensor, Tensor]:
    """(row, latent - lo, activation) of every entry of `sp` with its latent in [lo, hi), in row order."""
    rows, cols, vals = sp.slice_rows(0, sp.n_rows)
    keep = (cols >= lo) & (cols < hi)
    return rows[keep], cols[keep] - lo, vals[keep]


def _index_dtype(largest: int) -> torch.dtype:
    """int32 indices where they fit (half the memory), else int64."""
    return torch.int32 if largest < 2**31 else torch.int64


class Product:
    """A sparse product left @ right (torch's CSR × CSR: MKL's sparse GEMM in torch's CPU builds), its entries
    sorted by row then column."""

    def __init__(self, left: Tensor, right: Tensor, out: Tensor | None = None):
        out = torch.sparse.mm(left, right) if out is None else out
        self.ptr, self.col, val = out.crow_indices(), out.col_indices(), out.values()
        self.n_cols = right.shape[1]
        row = torch.repeat_interleave(torch.arange(self.ptr.numel() - 1), self.ptr.diff())
        self.key = row * self.n_cols + self.col
        self.order = torch.argsort(self.key)
        self.key, self.value = self.key[self.order], val[self.order]

    @property
    def row(self) -> Tensor:
        return self.key // self.n_cols

    @property
    def column(self) -> Tensor:
        return self.key % self.n_cols

    def values_of(self, left: Tensor, right: Tensor) -> Tensor:
        """Another product's values at this one's entries (0 where it has none): in the same order without a sort
        when its entries come out as this one's did (a product of the same two patterns), else matched by key."""
        out = torch.sparse.mm(left, right)
        if torch.equal(out.crow_indices(), self.ptr) and torch.equal(out.col_indices(), self.col):
            return out.values()[self.order]
        other = Product(left, right, out)
        if other.key.numel() == 0:
            return torch.zeros_like(self.value)
        at = torch.searchsorted(other.key, self.key).clamp_max(other.key.numel() - 1)
        return torch.where(other.key[at] == self.key, other.value[at], 0.0)


def coactivation(
    parents: Sparse,
    children: Sparse,
    parent_limit: int | None = None,
    child_from: int = 0,
    prune: Callable[[Pairs], Tensor] | None = None,
    parent_block: int = 512,
    counts_only: bool = False,
) -> Pairs:
    """Statistics for every parent < `parent_limit` of `parents` and child >= `child_from` of `children`, sorted by
    parent then child.

    Both must cover the same rows. Each sum is a sparse matrix product over the rows, `parent_block` parents at
    a time: count = B_pᵀ B_c, Σ a_p·a_c = A_pᵀ A_c, Σ a_p² = (A_p∘A_p)ᵀ B_c, Σ a_c = B_pᵀ A_c (A: activations,
    B: where they fire), in float64. Only the pairs that fire together on a row are ever formed; on the shipped
    Matryoshka's rows a sparse GEMM does so several times faster than forming them one by one and scattering
    them into tables (the way this module worked before). `prune(pairs) -> keep mask` drops pairs block by
    block, so the pairs never all exist at once (it must keep whatever a later block could need: e.g. a child's
    best candidates within the block, not overall). `counts_only` makes the counts alone (dot, parent_sq and
    child_sum come back 0), a quarter of the work. Memory: the entries twice over (about 40 bytes an entry)."""
    if parents.n_rows != children.n_rows:
        raise ValueError(f"the two SAEs cover {parents.n_rows} and {children.n_rows} rows; they must match")
    n_par = parents.d_sae if parent_limit is None else parent_limit
    left = latent_major(parents, 0, n_par)
    right = row_major(children, child_from)
    right_acts, right_fires = right.csr(), right.csr(torch.ones_like(right.val))
    out = []
    for p0 in range(0, n_par, parent_block):
        blk = left.rows(p0, min(p0 + parent_block, n_par))
        fires = blk.csr(torch.ones_like(blk.val))
        both = Product(fires, right_fires)
        count = both.value
        if counts_only:
            dot = parent_sq = child_sum = torch.zeros_like(count)
        else:
            dot = both.values_of(blk.csr(), right_acts)
            parent_sq = both.values_of(blk.csr(blk.val * blk.val), right_fires)
            child_sum = both.values_of(fires, right_acts)
        pairs = Pairs(both.row + p0, both.column + child_from, dot, parent_sq, count.round().long(), child_sum)
        out.append(pairs if prune is None else _subset(pairs, prune(pairs)))
    return Pairs(*(torch.cat([getattr(b, f) for b in out]) for f in PAIR_FIELDS))


def _subset(pairs: Pairs, keep: Tensor) -> Pairs:
    return Pairs(*(getattr(pairs, f)[keep] for f in PAIR_FIELDS))
