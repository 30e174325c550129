"""Co-activation statistics between two sets of latents on the same rows, from sparse entries only.

For a candidate parent A and child B, over the rows where both fire: Σ a_A·a_B, Σ a_A² and the count. Since A's
activation is 0 where it does not fire, these are also the sums over all rows where B fires, which is what the
directed masked cosine needs (parent–child links, msae.analysis.hierarchy)."""

from __future__ import annotations

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
N_SUMS = 4
"""Sums kept per pair: Σ a_p·a_c, Σ a_p², the count and Σ a_c."""

DENSE_BUDGET_BYTES = 2 << 30
"""Accumulate into a dense (parents × children) table when it fits in this; otherwise sparsely, by sorting."""


def entry_pairs(pr: Tensor, cr: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """(parent entry, child entry) indices of every pair of entries on the same row of a chunk of `n` rows
    (`pr`, `cr`: the rows of the parent and child entries, sorted)."""
    c_count = torch.bincount(cr, minlength=n)
    c_start = c_count.cumsum(0) - c_count
    m = c_count[pr]  # children on the row of each parent entry
    rep = torch.repeat_interleave(torch.arange(pr.numel()), m)
    within = torch.arange(rep.numel()) - torch.repeat_interleave(m.cumsum(0) - m, m)
    return rep, c_start[pr[rep]] + within


def _pairs_in_chunk(pr: Tensor, pc: Tensor, pv: Tensor, cr: Tensor, cc: Tensor, cv: Tensor, n: int):
    """Every (parent entry, child entry) on the same row of a chunk of `n` rows (entries sorted by row)."""
    rep, child = entry_pairs(pr, cr, n)
    a_p, a_c = pv[rep], cv[child]
    return pc[rep], cc[child], torch.stack([a_p * a_c, a_p * a_p, torch.ones_like(a_p), a_c], dim=1)


def _subset(pairs: Pairs, keep: Tensor) -> Pairs:
    return Pairs(*(getattr(pairs, f)[keep] for f in PAIR_FIELDS))


def coactivation(
    parents: Sparse,
    children: Sparse,
    parent_limit: int | None = None,
    child_from: int = 0,
    chunk_rows: int = 4096,
    dense_budget: int = DENSE_BUDGET_BYTES,
    prune: Callable[[Pairs], Tensor] | None = None,
    parent_block: int = 512,
) -> Pairs:
    """Statistics for every parent < `parent_limit` of `parents` and child >= `child_from` of `children`.

    Both must cover the same rows. Only pairs that fire together on a row are ever formed (about L0² a row);
    their products are summed into a dense parents × children table when it fits `dense_budget`, else into a
    sorted sparse one. `prune(pairs) -> keep mask` drops pairs as they are read out of the dense table,
    `parent_block` parents at a time, so the pairs never all exist at once (it must keep whatever a later
    block could need: e.g. a child's best candidates within the block, not overall)."""
    if parents.n_rows != children.n_rows:
        raise ValueError(f"the two SAEs cover {parents.n_rows} and {children.n_rows} rows; they must match")
    n_par = parents.d_sae if parent_limit is None else parent_limit
    n_child = children.d_sae - child_from
    # float32 halves the table; its sums stay within ~1e-6 relative over a million rows and counts are exact
    # below 2^24 co-firings.
    dense = n_par * n_child * N_SUMS * 4 <= dense_budget
    table = torch.zeros(n_par * n_child, N_SUMS, dtype=torch.float32) if dense else None
    keys_acc, vals_acc = torch.zeros(0, dtype=torch.long), torch.zeros(0, N_SUMS, dtype=torch.float64)
    for start in range(0, parents.n_rows, chunk_rows):
        stop = min(start + chunk_rows, parents.n_rows)
        pr, pc, pv = parents.slice_rows(start, stop)
        keep = pc < n_par
        pr, pc, pv = pr[keep], pc[keep], pv[keep].double()
        cr, cc, cv = children.slice_rows(start, stop)
        keep = cc >= child_from
        cr, cc, cv = cr[keep], cc[keep] - child_from, cv[keep].double()
        if pr.numel() == 0 or cr.numel() == 0:
            continue
        p, c, v = _pairs_in_chunk(pr, pc, pv, cr, cc, cv, stop - start)
        key = p * n_child + c
        if dense:
            table.index_add_(0, key, v.float())
        else:
            keys_acc, inverse = torch.unique(torch.cat([keys_acc, key]), return_inverse=True)
            vals_acc = torch.zeros(keys_acc.numel(), N_SUMS, dtype=torch.float64).index_add_(
                0, inverse, torch.cat([vals_acc, v]))
    if not dense:
        pairs = _as_pairs(keys_acc, vals_acc, n_child, child_from)
        return pairs if prune is None else _subset(pairs, prune(pairs))
    table = table.view(n_par, n_child, N_SUMS)
    blocks = []
    for p0 in range(0, n_par, parent_block):
        block = table[p0 : p0 + parent_block]
        local = (block[:, :, 2] > 0).reshape(-1).nonzero().squeeze(1)
        pairs = _as_pairs(local + p0 * n_child, block.reshape(-1, N_SUMS)[local].double(), n_child, child_from)
        blocks.append(pairs if prune is None else _subset(pairs, prune(pairs)))
    return Pairs(*(torch.cat([getattr(b, f) for b in blocks]) for f in PAIR_FIELDS))


def _as_pairs(keys: Tensor, vals: Tensor, n_child: int, child_from: int) -> Pairs:
    return Pairs(keys // n_child, keys % n_child + child_from, vals[:, 0], vals[:, 1], vals[:, 2].round().long(),
                 vals[:, 3])
