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


BLOCK_PAIRS = 1 << 21
"""Padded pairs formed at once, at most (unless one row alone has more): about 25 MB of keys and sums."""


@dataclass
class PairBlock:
    """The entry pairs of a block of rows as padded outer products: (g, Kp) parents against (g, Kc) children.
    Padding holds the latent index n_par (parents) or n_child (children) and the activation 0, so that a table
    with one spare row and column takes the padded pairs and the real ones are never touched by them."""

    rows: Tensor
    """(g,) the block's rows, relative to the chunk."""
    p_col: Tensor
    """(g, Kp) parent latents (n_par where padded)."""
    p_val: Tensor
    """(g, Kp) float32 parent activations."""
    c_col: Tensor
    """(g, Kc) child latents minus child_from (n_child where padded)."""
    c_val: Tensor
    """(g, Kc) float32 child activations."""

    def keys(self, n_child: int, offset: Tensor | int = 0) -> Tensor:
        """(g·Kp·Kc,) flat keys p·(n_child + 1) + c (+ `offset`, a (g,) per-row shift or an int)."""
        key = self.p_col[:, :, None] * (n_child + 1) + self.c_col[:, None, :]
        if isinstance(offset, Tensor):
            key = key + offset[:, None, None]
        elif offset:
            key = key + offset
        return key.reshape(-1)


def _padded(rows: Tensor, cols: Tensor, vals: Tensor, start: Tensor, count: Tensor, block: Tensor,
            pad: int) -> tuple[Tensor, Tensor]:
    """(g, K) latents and activations of the rows `block` (entries sorted by row: row r's are at start[r],
    count[r] of them), padded with `pad` and 0."""
    k = int(count[block].max())
    idx = start[block][:, None] + torch.arange(k)[None, :]
    ok = torch.arange(k)[None, :] < count[block][:, None]
    idx = torch.where(ok, idx, torch.zeros_like(idx))
    return torch.where(ok, cols[idx], torch.full_like(idx, pad)), torch.where(ok, vals[idx], torch.zeros(()))


def pair_blocks(pr: Tensor, pc: Tensor, pv: Tensor, cr: Tensor, cc: Tensor, cv: Tensor, n: int, n_par: int,
                n_child: int, block_pairs: int | None = None):
    """Every (parent entry, child entry) pair on the same row of a chunk of `n` rows (entries sorted by row), as
    PairBlocks. Rows are ordered by their numbers of parent and child entries and a block holds rows of one
    parent count, so that padding wastes little (on one SAE's rows against themselves, none: 41,389,124 pairs
    formed for as many real ones over 32,768 rows of the shipped Matryoshka); pairing entry by entry instead costs
    several times as much a pair (index arithmetic per entry, then a gather per pair)."""
    block_pairs = block_pairs or BLOCK_PAIRS
    p_count, c_count = torch.bincount(pr, minlength=n), torch.bincount(cr, minlength=n)
    p_start, c_start = p_count.cumsum(0) - p_count, c_count.cumsum(0) - c_count
    live = ((p_count > 0) & (c_count > 0)).nonzero().squeeze(1)
    if live.numel() == 0:
        return
    live = live[torch.argsort(p_count[live] * (int(c_count.max()) + 1) + c_count[live], stable=True)]
    kp, kc = p_count[live], c_count[live]
    # Segments of one parent count; each cut where its padded pairs (rows x kp x the last row's kc) would pass
    # block_pairs.
    seg_start = torch.ones(live.numel(), dtype=torch.bool)
    seg_start[1:] = kp[1:] != kp[:-1]
    bounds = seg_start.nonzero().squeeze(1).tolist() + [live.numel()]
    for a, b in zip(bounds[:-1], bounds[1:]):
        i = a
        while i < b:
            per_row = int(kp[i]) * int(kc[b - 1])
            j = min(b, i + max(1, block_pairs // per_row))
            # rows i..j-1, sorted by kc: _padded pads the children to the last one's count
            block = live[i:j]
            p_col, p_val = _padded(pr, pc, pv, p_start, p_count, block, n_par)
            c_col, c_val = _padded(cr, cc, cv, c_start, c_count, block, n_child)
            yield PairBlock(block, p_col, p_val, c_col, c_val)
            i = j


def _block_sums(blk: PairBlock) -> Tensor:
    """(g·Kp·Kc, N_SUMS) float64 sums of every pair of a block (padded pairs included), for the sparse table."""
    a_p, a_c = blk.p_val.double()[:, :, None], blk.c_val.double()[:, None, :]
    shape = (blk.p_val.shape[0], blk.p_val.shape[1], blk.c_val.shape[1])
    return torch.stack([(a_p * a_c).expand(shape), (a_p * a_p).expand(shape), torch.ones(shape, dtype=torch.float64),
                        a_c.expand(shape)], dim=-1).reshape(-1, N_SUMS)


def _subset(pairs: Pairs, keep: Tensor) -> Pairs:
    return Pairs(*(getattr(pairs, f)[keep] for f in PAIR_FIELDS))


def _chunk_entries(sp: Sparse, start: int, stop: int, lo: int, hi: int) -> tuple[Tensor, Tensor, Tensor]:
    """(rows, latents - lo, activations) of the entries of rows [start, stop) with latents in [lo, hi)."""
    r, c, v = sp.slice_rows(start, stop)
    keep = (c >= lo) & (c < hi)
    return r[keep], c[keep] - lo, v[keep].float()


def coactivation(
    parents: Sparse,
    children: Sparse,
    parent_limit: int | None = None,
    child_from: int = 0,
    chunk_rows: int = 8192,
    dense_budget: int = DENSE_BUDGET_BYTES,
    prune: Callable[[Pairs], Tensor] | None = None,
    parent_block: int = 512,
    counts_only: bool = False,
) -> Pairs:
    """Statistics for every parent < `parent_limit` of `parents` and child >= `child_from` of `children`.

    Both must cover the same rows. Only pairs that fire together on a row are ever formed (about L0² a row);
    they are summed into dense parents × children tables (one per sum) when they fit `dense_budget`, else into a
    sorted sparse one. `prune(pairs) -> keep mask` drops pairs as they are read out of the dense tables,
    `parent_block` parents at a time, so the pairs never all exist at once (it must keep whatever a later
    block could need: e.g. a child's best candidates within the block, not overall). `counts_only` sums the
    counts alone (dot, parent_sq and child_sum come back 0), in about a third of the time."""
    if parents.n_rows != children.n_rows:
        raise ValueError(f"the two SAEs cover {parents.n_rows} and {children.n_rows} rows; they must match")
    n_par = parents.d_sae if parent_limit is None else parent_limit
    n_child = children.d_sae - child_from
    size = (n_par + 1) * (n_child + 1)  # a spare row and column take the padding's pairs
    # One table a sum: a 1-D scatter of 4 bytes a pair is several times faster on this CPU than one of 16 bytes
    # into a (size, 4) table. float32 sums stay within ~1e-6 relative over a million rows; counts are int32.
    n_sums = 1 if counts_only else N_SUMS
    dense = size * n_sums * 4 <= dense_budget
    if dense:
        count = torch.zeros(size, dtype=torch.int32)
        sums = [torch.zeros(size) for _ in range(n_sums - 1)]
    keys_acc, vals_acc = torch.zeros(0, dtype=torch.long), torch.zeros(0, N_SUMS, dtype=torch.float64)
    for start in range(0, parents.n_rows, chunk_rows):
        stop = min(start + chunk_rows, parents.n_rows)
        pr, pc, pv = _chunk_entries(parents, start, stop, 0, n_par)
        cr, cc, cv = _chunk_entries(children, start, stop, child_from, children.d_sae)
        blocks = pair_blocks(pr, pc, pv, cr, cc, cv, stop - start, n_par, n_child)
        if not dense:
            blocks = list(blocks)
            if blocks:
                keys_acc, inverse = torch.unique(torch.cat([keys_acc] + [b.keys(n_child) for b in blocks]),
                                                 return_inverse=True)
                vals_acc = torch.zeros(keys_acc.numel(), N_SUMS, dtype=torch.float64).index_add_(
                    0, inverse, torch.cat([vals_acc] + [_block_sums(b) for b in blocks]))
            continue
        for blk in blocks:
            key = blk.keys(n_child)
            count.index_add_(0, key, torch.ones((), dtype=torch.int32).expand(key.numel()))
            if sums:
                a_p, a_c = blk.p_val[:, :, None], blk.c_val[:, None, :]
                shape = (blk.p_val.shape[0], blk.p_val.shape[1], blk.c_val.shape[1])
                sums[0].index_add_(0, key, (a_p * a_c).reshape(-1))
                sums[1].index_add_(0, key, (a_p * a_p).expand(shape).reshape(-1))
                sums[2].index_add_(0, key, a_c.expand(shape).reshape(-1))
    if not dense:
        real = (keys_acc // (n_child + 1) < n_par) & (keys_acc % (n_child + 1) < n_child)
        pairs = _as_pairs(keys_acc[real], vals_acc[real], n_child, child_from)
        if counts_only:
            pairs = Pairs(pairs.parent, pairs.child, *(torch.zeros_like(pairs.dot) for _ in range(2)), pairs.count,
                          torch.zeros_like(pairs.dot))
        return pairs if prune is None else _subset(pairs, prune(pairs))
    count = count.view(n_par + 1, n_child + 1)
    sums = [t.view(n_par + 1, n_child + 1) for t in sums]
    out = []
    for p0 in range(0, n_par, parent_block):
        p1 = min(p0 + parent_block, n_par)
        local = (count[p0:p1, :n_child] > 0).nonzero()
        p, c = local[:, 0] + p0, local[:, 1]
        got = [t[p, c].double() for t in sums] if sums else [torch.zeros(p.numel(), dtype=torch.float64)] * 3
        pairs = Pairs(p, c + child_from, got[0], got[1], count[p, c].long(), got[2])
        out.append(pairs if prune is None else _subset(pairs, prune(pairs)))
    return Pairs(*(torch.cat([getattr(b, f) for b in out]) for f in PAIR_FIELDS))


def _as_pairs(keys: Tensor, vals: Tensor, n_child: int, child_from: int) -> Pairs:
    """Pairs from keys p·(n_child + 1) + c and their (·, N_SUMS) sums."""
    return Pairs(keys // (n_child + 1), keys % (n_child + 1) + child_from, vals[:, 0], vals[:, 1],
                 vals[:, 2].round().long(), vals[:, 3])
