"""Whether the links hold: both criteria made on one half of the analysed rows and measured on the other, and the
hierarchy figures of the literature (HSAE's P(p|c), P(c|p) and Hamming distance, sibling IoU, Tree SAE's
hierarchy score), all from sparse entries.

A link says "when the child fires, the parent fires". Measured on the rows it was made on, that is partly true by
construction; on text it was not made on, against a parent that co-fires with the child more than chance (and one
of the same frequency), it is evidence. The rows are split by document (a random half of the documents makes the
links, the other half measures them), and the rule is also made without each corpus part and measured on it. The
intervals resample parents, not links: the links of one parent stand or fall together."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

import pandas as pd
import torch
from torch import Tensor

from msae.analysis import hierarchy
from msae.analysis.coact import PAIR_FIELDS, Pairs, coactivation, latent_major, row_major
from msae.analysis.features import histogram_edges, latent_stats
from msae.analysis.stream import Sparse, rank_within
from msae.config import LinkConfig
from msae.results import CriterionValidation, HierarchyFigures, Interval, LinkValidation

MIN_HELD_FIRES = 10
"""A tree link is measured on the held-out rows when its child fires on at least this many of them."""
TREESAE_CHILDREN = 5
TREESAE_MIN_CHILD_FIRES = 100
TREESAE_TOP = 5
"""Tree SAE's hierarchy score: 5 children a parent, children firing >= 100 times, both in the top 5 (their Eq. 5)."""
SIBLING_PAIRS_MAX = 20_000


def mean_std(values: list) -> tuple:
    """Element-wise mean and standard deviation (ddof 1; 0 for one value) of numbers, lists or dicts alike (None
    where a value is missing from any of them)."""
    first = values[0]
    if isinstance(first, dict):
        pairs = {key: mean_std([v[key] for v in values]) for key in first}
        return {k: p[0] for k, p in pairs.items()}, {k: p[1] for k, p in pairs.items()}
    if isinstance(first, list):
        pairs = [mean_std(list(column)) for column in zip(*values)]
        return [p[0] for p in pairs], [p[1] for p in pairs]
    if any(v is None for v in values):
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def bootstrap_mean(values: Tensor, reps: int = 1000, seed: int = 0) -> Interval | None:
    """The mean of `values` with the 2.5th and 97.5th percentiles of `reps` resampled means (None when empty)."""
    values = values.double().flatten()
    n = values.numel()
    if n == 0:
        return None
    g = torch.Generator().manual_seed(seed)
    means = values[torch.randint(n, (reps, n), generator=g)].mean(dim=1)
    low, high = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return Interval(mean=float(values.mean()), low=low, high=high, n=n)


class PairIndex:
    """The entries of a Sparse ordered for counting how often given (parent, child) pairs fire together: sorted
    once, then asked for any pairs (pair_cofires sorts again at every call)."""

    def __init__(self, sp: Sparse):
        rows = sp.entry_rows()
        cols = sp.cols.long()
        self.d_sae = sp.d_sae
        self.keys = rows * sp.d_sae + cols  # sorted: rows ascend, latents ascend within a row
        self.rows_by_latent = rows[torch.argsort(cols, stable=True)]
        self.ptr = torch.zeros(sp.d_sae + 1, dtype=torch.long)
        self.ptr[1:] = torch.bincount(cols, minlength=sp.d_sae).cumsum(0)

    def count(self, parent: Tensor, child: Tensor, chunk: int = 1 << 24) -> Tensor:
        """(P,) rows on which both latents of each (parent, child) pair fire."""
        keys, ptr = self.keys, self.ptr
        n_c = ptr[child + 1] - ptr[child]
        out = torch.zeros(parent.numel(), dtype=torch.long)
        # Pairs in groups whose children's rows fit in `chunk` entries at once.
        ends = torch.cumsum(n_c, 0)
        start = 0
        while start < parent.numel():
            base = int(ends[start - 1]) if start else 0
            stop = max(int(torch.searchsorted(ends, base + chunk, right=True)), start + 1)
            p, c, n = parent[start:stop], child[start:stop], n_c[start:stop]
            rep = torch.repeat_interleave(torch.arange(p.numel()), n)
            within = torch.arange(rep.numel()) - torch.repeat_interleave(n.cumsum(0) - n, n)
            q = self.rows_by_latent[ptr[c][rep] + within] * self.d_sae + p[rep]
            if keys.numel():
                at = torch.searchsorted(keys, q).clamp_max(keys.numel() - 1)
                hit = keys[at] == q
                out[start:stop] = torch.bincount(rep[hit], minlength=p.numel())
            start = stop
        return out


def pair_cofires(sp: Sparse, parent: Tensor, child: Tensor, chunk: int = 1 << 24) -> Tensor:
    """(P,) rows of `sp` on which both latents of each (parent, child) pair fire."""
    return PairIndex(sp).count(parent, child, chunk)


def matched_null_parents(parent: Tensor, child: Tensor, count: Tensor, group: Tensor, seed: int = 0,
                         window: int = 10) -> Tensor:
    """For each (parent, child), a random latent of an earlier group than the child's (not the parent, not the
    child), among the `window` live latents whose firing count is nearest the parent's; -1 where there is none."""
    g = torch.Generator().manual_seed(seed)
    out = torch.full_like(parent, -1)
    alive = count > 0
    for grp in torch.unique(group[child]).tolist():
        pool = (alive & (group < grp)).nonzero().squeeze(1)
        pool = pool[torch.argsort(count[pool], stable=True)]
        if pool.numel() < 3:
            continue
        sel = (group[child] == grp).nonzero().squeeze(1)
        pos = torch.searchsorted(count[pool].contiguous(), count[parent[sel]].contiguous())
        half = min(window, pool.numel()) // 2
        lo = (pos - half).clamp(0, pool.numel() - min(window, pool.numel()))
        idx = lo + torch.randint(min(window, pool.numel()), (sel.numel(),), generator=g)
        # The parent or the child drawn: the pool's next latent (wrapping) instead, twice at most.
        for _ in range(2):
            clash = (pool[idx] == parent[sel]) | (pool[idx] == child[sel])
            idx = torch.where(clash, (idx + 1) % pool.numel(), idx)
        out[sel] = pool[idx]
    return out


def cluster_bootstrap_mean(values: Tensor, clusters: Tensor, reps: int = 1000, seed: int = 0) -> Interval | None:
    """The mean of `values` with a 95% interval that resamples whole clusters (all the links of one parent
    together), not single values: links that share a parent are not independent draws (None when empty)."""
    values = values.double().flatten()
    if values.numel() == 0:
        return None
    ids, inverse = torch.unique(clusters, return_inverse=True)
    sums = torch.zeros(ids.numel(), dtype=torch.float64).index_add_(0, inverse, values)
    sizes = torch.bincount(inverse, minlength=ids.numel()).double()
    g = torch.Generator().manual_seed(seed)
    pick = torch.randint(ids.numel(), (reps, ids.numel()), generator=g)
    means = sums[pick].sum(1) / sizes[pick].sum(1)
    low, high = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return Interval(mean=float(values.mean()), low=low, high=high, n=int(ids.numel()))


def document_halves(row_doc: Tensor, seed: int = 0) -> Tensor:
    """(n_rows,) True on the rows whose document falls in a seeded random half of the documents (they make the
    links), False on the rest (they measure them): no document is on both sides."""
    docs, inverse = torch.unique(row_doc, return_inverse=True)
    in_half = torch.randperm(docs.numel(), generator=torch.Generator().manual_seed(seed)) < (docs.numel() + 1) // 2
    return in_half[inverse]


def link_split(row_doc: Tensor | None, row_context: Tensor, seed: int = 0) -> tuple[Tensor, str]:
    """The rows that make links (True) and those that measure them, and how they were chosen, in words: by
    document where the cache records documents, else by context."""
    if row_doc is not None:
        return document_halves(row_doc, seed), "documents: a random half makes the links, the other half measures them"
    return context_split(row_context), ("contexts: even ones make the links, odd ones measure them (the cache does "
                                        "not record documents)")


def context_split(row_context: Tensor) -> Tensor:
    """(n_rows,) True on the rows that make links (even contexts), False on those that measure them (odd): the
    split of caches that do not record documents (contexts of one document then sit on both sides)."""
    return row_context % 2 == 0


@dataclass
class Totals:
    """Counts summed over some row groups."""

    pair: Tensor | None
    """(n_parents, n_children) int32 rows on which both fire (child index minus child_from); None where only a
    few pairs are asked for (`index` then counts them)."""
    latent: Tensor
    """(d_sae,) rows on which each latent fires."""
    rows: int
    index: PairIndex | None = None

    def cofires(self, parent: Tensor, child: Tensor, child_from: int) -> Tensor:
        """(P,) float64 rows on which both latents of each (parent, child) pair fire."""
        if self.pair is not None:
            return self.pair[parent, child - child_from].double()
        return self.index.count(parent, child).double()


def pair_table(sp: Sparse, widths: list[int], parent_block: int = 256) -> Tensor:
    """(n_parents, n_children) int32: the rows of `sp` on which each earlier-group parent (latents before the last
    group) and later-group child (latents after the first, index minus widths[0]) fire together; one sparse
    product a block of parents."""
    n_par, child_from = widths[-2], widths[0]
    table = torch.zeros(n_par, sp.d_sae - child_from, dtype=torch.int32)
    if sp.n_rows == 0 or sp.cols.numel() == 0:
        return table
    left = latent_major(sp, 0, n_par)
    right = row_major(sp, child_from)
    right_fires = right.csr(torch.ones_like(right.val))
    for p0 in range(0, n_par, parent_block):
        blk = left.rows(p0, min(p0 + parent_block, n_par))
        out = torch.sparse.mm(blk.csr(torch.ones_like(blk.val)), right_fires)
        ptr, col = out.crow_indices(), out.col_indices()
        parent = torch.repeat_interleave(torch.arange(ptr.numel() - 1), ptr.diff()) + p0
        table[parent, col] = out.values().round().int()
    return table


@dataclass
class CofireCounts:
    """How often the (parent, child) pairs of a nested SAE fire together over any union of groups of rows, so that
    links made on some groups can be measured on others. Parents are the latents before the last group, children
    those after the first. Per group only each latent's firings are kept; a union's pair table is made when asked
    for, so memory holds a few tables of n_parents x n_children whatever the number of groups (one per group
    would be 13 GB at 16,384 latents over 20 corpus parts)."""

    sp: Sparse
    row_group: Tensor
    """(n_rows,) int64 the group of every row."""
    widths: list[int]
    latent: Tensor
    """(G, d_sae) int64: rows of group g on which each latent fires."""
    rows: Tensor
    """(G,) int64 rows per group."""
    child_from: int
    group: Tensor
    """(d_sae,) the nested group of every latent."""
    parent_block: int = 256
    _all: Tensor | None = field(default=None, init=False, repr=False)
    """The pair table over every row, once a table needs it."""
    _kept: tuple[frozenset, Tensor] | None = field(default=None, init=False, repr=False)
    """The last table made from rows directly, with its groups: asked for next, it or its complement is free."""

    def over(self, groups: Tensor, dense: bool = True) -> Totals:
        """The counts summed over the row groups where the (G,) bool mask is set; with `dense` False, no pair table
        but an index that counts the pairs asked for (measuring a tree's links on a small part)."""
        latent, rows = self.latent[groups].sum(0), int(self.rows[groups].sum())
        if not dense:
            return Totals(None, latent, rows, PairIndex(self.sp.subset(groups[self.row_group])))
        return Totals(self._table(groups), latent, rows)

    def _table(self, groups: Tensor) -> Tensor:
        # Made over the chosen rows when they are at most half of all rows, else as every row's table less the
        # other rows'. The returned table may be shared: callers read it, never write it.
        chosen = frozenset(groups.nonzero().squeeze(1).tolist())
        others = frozenset(range(groups.numel())) - chosen
        if self._kept is not None and self._kept[0] == chosen:
            return self._kept[1]
        if not others:
            return self._every_row()
        if self._kept is None or self._kept[0] != others:
            direct = 2 * int(self.rows[groups].sum()) <= int(self.rows.sum())
            made = groups if direct else ~groups
            self._kept = (chosen if direct else others,
                          pair_table(self.sp.subset(made[self.row_group]), self.widths, self.parent_block))
            if direct:
                return self._kept[1]
        return self._every_row() - self._kept[1]

    def _every_row(self) -> Tensor:
        if self._all is None:
            self._all = pair_table(self.sp, self.widths, self.parent_block)
        return self._all


def cofire_counts(sp: Sparse, row_group: Tensor, n_groups: int, widths: list[int], parent_block: int = 256) -> CofireCounts:
    """The co-firing counts of `sp`'s rows in `n_groups` groups (row_group: (n_rows,) the group of every row, in
    [0, n_groups)): each latent's firings per group now, pair tables of unions of groups when asked for."""
    group = row_group.long()
    latent = torch.bincount(group[sp.entry_rows()] * sp.d_sae + sp.cols.long(), minlength=n_groups * sp.d_sae)
    return CofireCounts(sp, group, list(widths), latent.view(n_groups, sp.d_sae),
                        torch.bincount(group, minlength=n_groups), widths[0], hierarchy.group_index(widths),
                        parent_block)


def candidate_figures(counts: CofireCounts, link: Totals, min_cofires: int) -> dict[str, Tensor]:
    """pair_figures' counts-only figures of every earlier-group parent and later-group child that fire together on
    at least `min_cofires` of the link rows."""
    parent, child = (link.pair >= min_cofires).nonzero().unbind(1)
    child = child + counts.child_from
    keep = counts.group[parent] < counts.group[child]
    parent, child = parent[keep], child[keep]
    n_pc = link.pair[parent, child - counts.child_from].long()
    n_c, n_p = link.latent[child], link.latent[parent]
    coverage = n_pc.double() / n_c.clamp_min(1)
    return {"parent": parent, "child": child, "cofires": n_pc, "child_fires": n_c, "parent_fires": n_p,
            "coverage": coverage, "reverse_coverage": n_pc.double() / n_p.clamp_min(1),
            "lift": coverage * link.rows / n_p.clamp_min(1), "parent_density": n_p.double() / max(link.rows, 1)}


def rule_tree(fig: dict[str, Tensor], cfg: LinkConfig) -> tuple[Tensor, Tensor]:
    """(parent, child) of the tree the coverage rule makes from candidate figures: each linked child under its most
    specific linked parent (fewest firings, then higher coverage, then lower id), as links_table chooses it."""
    linked = hierarchy.coverage_rule(fig, cfg).nonzero().squeeze(1)
    parent, child = fig["parent"][linked], fig["child"][linked]
    key = -fig["parent_fires"][linked].double() + 0.5 * fig["coverage"][linked] - 1e-9 * parent.double()
    first = rank_within(child, key) == 0
    return parent[first], child[first]


def lift_passing_candidates(fig: dict[str, Tensor], cfg: LinkConfig, d_sae: int, seed: int = 0) -> Tensor:
    """(d_sae, 2) for every child, two of its candidate parents drawn at random among those that pass the lift bound
    and min_cofires on the link rows (they co-fire with the child more than chance would); -1 where there are
    fewer. Two, so that one is left when the other is the child's tree parent."""
    ok = (fig["lift"] >= cfg.min_lift) & (fig["cofires"] >= cfg.min_cofires)
    cand_p, cand_c = fig["parent"][ok], fig["child"][ok]
    priority = torch.rand(cand_p.numel(), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    rank = rank_within(cand_c, priority)
    out = torch.full((d_sae, 2), -1, dtype=torch.long)
    top = rank < 2
    out[cand_c[top], rank[top]] = cand_p[top]
    return out


def lift_null_parents(candidates: Tensor, parent: Tensor, child: Tensor) -> Tensor:
    """For each tree link, a random candidate parent of the child (lift_passing_candidates) that is not its tree
    parent; -1 where the child has none. A harder null than a parent of the same frequency, which the lift bound
    alone beats."""
    first, second = candidates[child, 0], candidates[child, 1]
    return torch.where(first == parent, second, first)


def measure_on(counts: CofireCounts, held: Totals, parent: Tensor, child: Tensor) -> tuple[Tensor, Tensor]:
    """(P(p | c) on the `held` rows, child firings there) of every (parent, child) pair; a parent of -1 gives NaN."""
    n_c = held.latent[child]
    ok = parent >= 0
    both = torch.zeros(parent.numel(), dtype=torch.float64)
    both[ok] = held.cofires(parent[ok], child[ok], counts.child_from)
    out = both / n_c.clamp_min(1)
    return torch.where(ok, out, torch.full_like(out, float("nan"))), n_c


def measure_tree(counts: CofireCounts, link: Totals, held: Totals, fig: dict[str, Tensor], cfg: LinkConfig,
                 name: str, live_children: int, parts: dict[str, Totals] | None = None, seed: int = 0,
                 lift_candidates: Tensor | None = None) -> CriterionValidation:
    """Links `cfg`'s rule makes from the candidate figures `fig` of the `link` rows, their tree measured on the
    `held` rows: P(p | c) with parent-clustered intervals, beside a random parent of the same frequency and a
    random other candidate parent that passes the lift bound; per child group and per part (`parts`: each
    part's held-out rows). `lift_candidates`: lift_passing_candidates of `fig` under cfg's lift bound, when the
    caller has them already."""
    parent, child = rule_tree(fig, cfg)
    n_links = int(hierarchy.coverage_rule(fig, cfg).sum())
    n_tree = int(parent.numel())
    value, n_c = measure_on(counts, held, parent, child)
    measured = n_c >= MIN_HELD_FIRES
    parent, child, value = parent[measured], child[measured], value[measured]
    null, _ = measure_on(counts, held, matched_null_parents(parent, child, link.latent, counts.group, seed), child)
    if lift_candidates is None:
        lift_candidates = lift_passing_candidates(fig, cfg, counts.group.numel(), seed)
    lift_null, _ = measure_on(counts, held, lift_null_parents(lift_candidates, parent, child), child)
    groups = counts.group[child]
    per_group = [float(value[groups == g].mean()) if (groups == g).any() else None
                 for g in range(int(counts.group.max()) + 1)]
    per_part = {}
    for part, totals in (parts or {}).items():
        p_value, p_n = measure_on(counts, totals, parent, child)
        ok = p_n >= MIN_HELD_FIRES
        if ok.any():
            per_part[part] = float(p_value[ok].mean())
    has_null, has_lift = ~null.isnan(), ~lift_null.isnan()
    return CriterionValidation(
        criterion=name, links=n_links, tree_links=n_tree,
        share_with_parent=n_tree / live_children if live_children else None,
        measured_links=int(measured.sum()), heldout_coverage=cluster_bootstrap_mean(value, parent, seed=seed),
        null_coverage=cluster_bootstrap_mean(null[has_null], parent[has_null], seed=seed),
        lift_null_coverage=cluster_bootstrap_mean(lift_null[has_lift], parent[has_lift], seed=seed),
        lift_null_share=float(has_lift.double().mean()) if has_lift.numel() else None,
        heldout_coverage_per_group=per_group, heldout_coverage_per_part=per_part)


def _stats(sp: Sparse) -> dict[str, Tensor]:
    return latent_stats(sp, histogram_edges(sp.vals, 4) if sp.vals.numel() else torch.tensor([0.0, 1.0]))


COVERAGE_GRID = (0.5, 0.6, 0.7, 0.8, 0.9)
"""The coverage rule's P(p | c) thresholds validated side by side (the rest of its settings from the config)."""


def row_groups(link_rows: Tensor, row_part: Tensor | None) -> tuple[Tensor, int]:
    """(row group, number of groups): two groups a part, its link rows (2·part) and its measuring rows (2·part + 1)."""
    part = row_part.long() if row_part is not None else torch.zeros(link_rows.numel(), dtype=torch.long)
    n_parts = int(part.max()) + 1 if part.numel() else 1
    return part * 2 + (~link_rows).long(), 2 * n_parts


def live_children(counts: CofireCounts) -> int:
    """Live latents that can have a parent (those after the first group)."""
    return int(((counts.latent.sum(0) > 0) & (counts.group > 0)).sum())


def validate_links(sp: Sparse, widths: list[int], cfg: LinkConfig, link_rows: Tensor, split: str,
                   row_part: Tensor | None = None, part_names: list[str] | None = None,
                   grid: tuple[float, ...] = COVERAGE_GRID, seed: int = 0) -> LinkValidation:
    """The coverage rule (cfg's, and at every P(p | c) bound of `grid`), made on the rows where `link_rows` is set
    and measured on the others (`split` says how they were chosen), per corpus part (`row_part` indexes
    `part_names`); and, where the rows come from two parts or more, the configured rule made without each part
    and measured on it."""
    groups, n_groups = row_groups(link_rows, row_part)
    counts = cofire_counts(sp, groups, n_groups, widths)
    live = live_children(counts)
    n_parts = n_groups // 2
    names = [part_names[i] if part_names and i < len(part_names) else str(i) for i in range(n_parts)]
    link_groups = torch.arange(n_groups) % 2 == 0
    link, held = counts.over(link_groups), counts.over(~link_groups)
    parts = ({names[i]: counts.over(torch.arange(n_groups) == 2 * i + 1, dense=False) for i in range(n_parts)}
             if n_parts > 1 else None)
    rules = {f"coverage, P(p|c) >= {t:g}": LinkConfig.from_json({**cfg.to_json(), "min_coverage": t}) for t in grid}
    rules.setdefault(f"coverage, P(p|c) >= {cfg.min_coverage:g}", cfg)
    fig = candidate_figures(counts, link, cfg.min_cofires)
    criteria = [measure_tree(counts, link, held, fig, rule, name, live, parts, seed) for name, rule in rules.items()]
    return LinkValidation(split=split, link_rows=link.rows, measured_rows=held.rows, criteria=criteria,
                          left_out=leave_each_part_out(counts, names, {"configured": cfg}, seed)["configured"]
                          if n_parts > 1 else [])


def leave_each_part_out(counts: CofireCounts, names: list[str], rules: dict[str, LinkConfig],
                        seed: int = 0) -> dict[str, list[CriterionValidation]]:
    """Every rule of `rules` made on all the parts but one and measured on that one, for every part (the counts'
    row groups are two a part, as row_groups makes them); one list a rule, one entry a part."""
    n_groups = counts.rows.numel()
    live = live_children(counts)
    out: dict[str, list[CriterionValidation]] = {name: [] for name in rules}
    loosest = min(rule.min_cofires for rule in rules.values())
    for i, part in enumerate(names):
        left_out = torch.arange(n_groups) // 2 == i
        link, held = counts.over(~left_out), counts.over(left_out)
        fig = candidate_figures(counts, link, loosest)
        lift_candidates = {}
        for name, rule in rules.items():
            key = (rule.min_lift, rule.min_cofires)
            if key not in lift_candidates:
                lift_candidates[key] = lift_passing_candidates(fig, rule, counts.group.numel(), seed)
            out[name].append(measure_tree(counts, link, held, fig, rule, f"without {part}, measured on {part}",
                                          live, seed=seed, lift_candidates=lift_candidates[key]))
    return out


def treesae_pairs(sp: Sparse, stats: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Tree SAE's pairs: for each latent of the most frequent half, its TREESAE_CHILDREN children by binary masked
    cosine (which orders like P(p | c) for a fixed parent) among latents firing >= TREESAE_MIN_CHILD_FIRES times."""
    count = stats["count"]
    n_par = sp.d_sae // 2
    dense = torch.argsort(count, descending=True, stable=True)[:n_par]
    is_dense = torch.zeros(sp.d_sae, dtype=torch.bool)
    is_dense[dense] = True

    def keep(pairs: Pairs) -> Tensor:
        ok = is_dense[pairs.parent] & (count[pairs.child] >= TREESAE_MIN_CHILD_FIRES) & (pairs.parent != pairs.child)
        rank = torch.full_like(pairs.parent, TREESAE_CHILDREN)  # ranked among the usable pairs only
        rank[ok] = rank_within(pairs.parent[ok], pairs.count[ok].double() / count[pairs.child[ok]].clamp_min(1))
        return ok & (rank < TREESAE_CHILDREN)

    pairs = coactivation(sp, sp, prune=keep, counts_only=True)
    pairs = Pairs(*(getattr(pairs, f)[keep(pairs)] for f in PAIR_FIELDS))
    return pairs.parent, pairs.child


def _both_near(directions: Tensor, W_dec: Tensor, parent: Tensor, child: Tensor) -> Tensor:
    rank_p, rank_c = hierarchy.probe_ranks(directions, W_dec, parent, child)
    return (rank_p < TREESAE_TOP) & (rank_c < TREESAE_TOP)


def hierarchy_figures(sp: Sparse, links: pd.DataFrame | None, W_dec: Tensor, criterion: str,
                      directions: Tensor | None = None, seed: int = 0, treesae_rows: int | None = None) -> HierarchyFigures:
    """The literature's figures for one SAE over the rows of `sp`: on its tree links (when it has any) P(p | c),
    P(c | p), the parent-vs-children Hamming distance and sibling IoU; with `directions`, Tree SAE's hierarchy
    score (over the first `treesae_rows` rows) and the same test on the tree links."""
    stats = _stats(sp)
    count = stats["count"]
    tree = links[links["tree"]] if links is not None else links
    n_tree = 0 if tree is None else len(tree)
    p_pc = p_cp = hamming = sib = None
    n_sib = 0
    probe_share = None
    if n_tree:
        parent = torch.tensor(tree["parent"].to_numpy(), dtype=torch.long)
        child = torch.tensor(tree["child"].to_numpy(), dtype=torch.long)
        both = pair_cofires(sp, parent, child).double()
        p_pc = float((both / count[child].clamp_min(1)).mean())
        p_cp = float((both / count[parent].clamp_min(1)).mean())
        hamming = _parent_children_hamming(sp, parent, child)
        a, b = _sibling_pairs(parent, child, seed)
        n_sib = a.numel()
        if n_sib:
            inter = pair_cofires(sp, a, b).double()
            sib = float((inter / (count[a] + count[b] - inter).clamp_min(1)).mean())
        if directions is not None:
            probe_share = float(_both_near(directions, W_dec, parent, child).double().mean())
    ts_score, ts_n = None, 0
    if directions is not None:
        head = sp if treesae_rows is None or treesae_rows >= sp.n_rows else sp.subset(torch.arange(sp.n_rows) < treesae_rows)
        tp, tc = treesae_pairs(head, _stats(head))
        ts_n = tp.numel()
        if ts_n:
            ts_score = float(_both_near(directions, W_dec, tp, tc).double().mean())
    return HierarchyFigures(criterion=criterion, tree_links=n_tree, p_parent_given_child=p_pc,
                            p_child_given_parent=p_cp, hamming=hamming, sibling_iou=sib, sibling_pairs=n_sib,
                            treesae_score=ts_score, treesae_pairs=ts_n, tree_links_probe_share=probe_share,
                            rows=sp.n_rows)


def _parent_children_hamming(sp: Sparse, parent: Tensor, child: Tensor) -> float | None:
    """Mean over parents of |P Δ C| / |P ∪ C| (P: rows where the parent fires, C: rows where any child does)."""
    rows = sp.entry_rows()
    cols = sp.cols.long()
    parent_of = torch.full((sp.d_sae,), -1, dtype=torch.long)
    parent_of[child] = parent
    is_child = parent_of[cols] >= 0
    c_keys = torch.unique(rows[is_child] * sp.d_sae + parent_of[cols[is_child]])  # (row, parent) some child fires
    parents = torch.unique(parent)
    is_parent = torch.zeros(sp.d_sae, dtype=torch.bool)
    is_parent[parents] = True
    p_keys = rows[is_parent[cols]] * sp.d_sae + cols[is_parent[cols]]
    inter = torch.isin(p_keys, c_keys)
    n_p = torch.bincount(p_keys % sp.d_sae, minlength=sp.d_sae)[parents].double()
    n_c = torch.bincount(c_keys % sp.d_sae, minlength=sp.d_sae)[parents].double()
    n_i = torch.bincount((p_keys % sp.d_sae)[inter], minlength=sp.d_sae)[parents].double()
    union = n_p + n_c - n_i
    ok = union > 0
    return float(((union - n_i)[ok] / union[ok]).mean()) if ok.any() else None


def _sibling_pairs(parent: Tensor, child: Tensor, seed: int) -> tuple[Tensor, Tensor]:
    """Every pair of children of one parent (a seeded sample of SIBLING_PAIRS_MAX when there are more)."""
    a, b = [], []
    order = torch.argsort(parent, stable=True)
    parent, child = parent[order], child[order]
    for p in torch.unique(parent).tolist():
        kids = child[parent == p]
        if kids.numel() >= 2:
            i, j = torch.triu_indices(kids.numel(), kids.numel(), offset=1)
            a.append(kids[i])
            b.append(kids[j])
    if not a:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    a, b = torch.cat(a), torch.cat(b)
    if a.numel() > SIBLING_PAIRS_MAX:
        pick = torch.randperm(a.numel(), generator=torch.Generator().manual_seed(seed))[:SIBLING_PAIRS_MAX]
        a, b = a[pick], b[pick]
    return a, b
