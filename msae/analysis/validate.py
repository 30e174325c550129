"""Whether the links hold: both criteria made on one half of the analysed rows and measured on the other, and the
hierarchy figures of the literature (HSAE's P(p|c), P(c|p) and Hamming distance, sibling IoU, Tree SAE's
hierarchy score), all from sparse entries.

A link says "when the child fires, the parent fires". Measured on the rows it was made on, that is partly true by
construction; on held-out contexts, against a parent of the same frequency picked at random, it is evidence. The
split is by context (even contexts make the links, odd ones measure them), so no context is on both sides."""

from __future__ import annotations

import pandas as pd
import torch
from torch import Tensor

from msae.analysis import hierarchy
from msae.analysis.coact import PAIR_FIELDS, Pairs, coactivation
from msae.analysis.features import histogram_edges, latent_stats
from msae.analysis.stream import Sparse
from msae.config import LinkConfig
from msae.results import CriterionValidation, HierarchyFigures, Interval, LinkValidation

MIN_HELD_FIRES = 10
"""A tree link is measured on the held-out rows when its child fires on at least this many of them."""
TREESAE_CHILDREN = 5
TREESAE_MIN_CHILD_FIRES = 100
TREESAE_TOP = 5
"""Tree SAE's hierarchy score: 5 children a parent, children firing >= 100 times, both in the top 5 (their Eq. 5)."""
SIBLING_PAIRS_MAX = 20_000


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


def pair_cofires(sp: Sparse, parent: Tensor, child: Tensor, chunk: int = 1 << 24) -> Tensor:
    """(P,) rows of `sp` on which both latents of each (parent, child) pair fire."""
    rows = sp.entry_rows()
    cols = sp.cols.long()
    keys = rows * sp.d_sae + cols  # sorted: rows ascend, latents ascend within a row
    order = torch.argsort(cols, stable=True)
    rows_by_latent = rows[order]
    ptr = torch.zeros(sp.d_sae + 1, dtype=torch.long)
    ptr[1:] = torch.bincount(cols, minlength=sp.d_sae).cumsum(0)
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
        q = rows_by_latent[ptr[c][rep] + within] * sp.d_sae + p[rep]
        if keys.numel():
            at = torch.searchsorted(keys, q).clamp_max(keys.numel() - 1)
            hit = keys[at] == q
            out[start:stop] = torch.bincount(rep[hit], minlength=p.numel())
        start = stop
    return out


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


def _stats(sp: Sparse) -> dict[str, Tensor]:
    return latent_stats(sp, histogram_edges(sp.vals, 4) if sp.vals.numel() else torch.tensor([0.0, 1.0]))


def context_split(row_context: Tensor) -> Tensor:
    """(n_rows,) True on the rows that make links (even contexts), False on those that measure them (odd)."""
    return row_context % 2 == 0


COVERAGE_GRID = (0.5, 0.6, 0.7, 0.8, 0.9)
"""The coverage rule's P(p | c) thresholds validated side by side (the rest of its settings from the config)."""


def coverage_tree(links: pd.DataFrame, min_coverage: float) -> pd.DataFrame:
    """The tree of a links table's coverage links at a stricter P(p | c) bound: each child under its most specific
    linked parent (fewest firings, then higher coverage, then lower id), as links_table chooses it."""
    linked = links[links["linked_coverage"] & (links["coverage"] >= min_coverage)]
    order = linked.sort_values(["child", "parent_fires", "coverage", "parent"], ascending=[True, True, False, True])
    return order.drop_duplicates("child")


def validate_links(sp: Sparse, widths: list[int], W_dec: Tensor, cfg: LinkConfig, link_rows: Tensor,
                   row_part: Tensor | None = None, part_names: list[str] | None = None,
                   grid: tuple[float, ...] = COVERAGE_GRID, seed: int = 0) -> LinkValidation:
    """Links made on the rows where `link_rows` is set and measured on the others: the coverage rule at every
    P(p | c) bound of `grid` and the cosine rule (cfg's settings otherwise). Per rule, held-out P(p | c) of the
    tree links with its frequency-matched null, per child group and per corpus part (`row_part` indexes
    `part_names`)."""
    sp_a, sp_b = sp.subset(link_rows), sp.subset(~link_rows)
    stats_a, stats_b = _stats(sp_a), _stats(sp_b)
    group = hierarchy.group_index(widths)
    live_children = int(((stats_a["count"] > 0) & (group > 0)).sum())
    part_b = row_part[~link_rows] if row_part is not None else None
    loose = LinkConfig.from_json({**cfg.to_json(), "criterion": "coverage", "min_coverage": min(grid)})
    coverage_links = hierarchy.nested_links(sp_a, widths, stats_a, W_dec, loose)
    trees = {f"coverage, P(p|c) >= {t:g}": (coverage_tree(coverage_links, t),
                                            int((coverage_links["linked_coverage"]
                                                 & (coverage_links["coverage"] >= t)).sum()))
             for t in grid}
    cosine_cfg = LinkConfig.from_json({**cfg.to_json(), "criterion": "cosine"})
    cosine_links = hierarchy.nested_links(sp_a, widths, stats_a, W_dec, cosine_cfg)
    trees["cosine"] = (cosine_links[cosine_links["tree"]], int(cosine_links["linked"].sum()))
    out = []
    for name, (tree, n_links) in trees.items():
        out.append(_measure_tree(name, tree, n_links, sp_b, stats_a, stats_b, group, live_children, part_b,
                                 part_names, len(widths), seed))
    return LinkValidation(split="contexts: even ones make the links, odd ones measure them",
                          link_rows=sp_a.n_rows, measured_rows=sp_b.n_rows, criteria=out)


def _measure_tree(name: str, tree: pd.DataFrame, n_links: int, sp_b: Sparse, stats_a: dict, stats_b: dict,
                  group: Tensor, live_children: int, part_b: Tensor | None, part_names: list[str] | None,
                  n_groups: int, seed: int) -> CriterionValidation:
    """Held-out P(p | c) of one rule's tree links (children firing >= MIN_HELD_FIRES times there), its null, per
    group and per part."""
    parent = torch.tensor(tree["parent"].to_numpy(), dtype=torch.long)
    child = torch.tensor(tree["child"].to_numpy(), dtype=torch.long)
    n_c = stats_b["count"][child]
    measured = n_c >= MIN_HELD_FIRES
    parent, child, n_c = parent[measured], child[measured], n_c[measured]
    held = pair_cofires(sp_b, parent, child).double() / n_c.clamp_min(1)
    null_parent = matched_null_parents(parent, child, stats_a["count"], group, seed)
    has_null = null_parent >= 0
    null = pair_cofires(sp_b, null_parent[has_null], child[has_null]).double() / n_c[has_null].clamp_min(1)
    per_group = []
    for g in range(n_groups):
        sel = group[child] == g
        per_group.append(float(held[sel].mean()) if sel.any() else None)
    per_part = {}
    if part_b is not None and part_names:
        for i, part in enumerate(part_names):
            rows = part_b == i
            if int(rows.sum()) == 0:
                continue
            sub = sp_b.subset(rows)
            n_sub = torch.bincount(sub.cols.long(), minlength=sub.d_sae)[child]
            ok = n_sub >= MIN_HELD_FIRES
            if ok.any():
                per_part[part] = float((pair_cofires(sub, parent[ok], child[ok]).double() / n_sub[ok]).mean())
    return CriterionValidation(
        criterion=name, links=n_links, tree_links=len(tree),
        share_with_parent=len(tree) / live_children if live_children else None,
        measured_links=int(measured.sum()), heldout_coverage=bootstrap_mean(held, seed=seed),
        null_coverage=bootstrap_mean(null, seed=seed), heldout_coverage_per_group=per_group,
        heldout_coverage_per_part=per_part)


def treesae_pairs(sp: Sparse, stats: dict[str, Tensor], chunk_rows: int = 8192) -> tuple[Tensor, Tensor]:
    """Tree SAE's pairs: for each latent of the most frequent half, its TREESAE_CHILDREN children by binary masked
    cosine (which orders like P(p | c) for a fixed parent) among latents firing >= TREESAE_MIN_CHILD_FIRES times."""
    count = stats["count"]
    n_par = sp.d_sae // 2
    dense = torch.argsort(count, descending=True, stable=True)[:n_par]
    is_dense = torch.zeros(sp.d_sae, dtype=torch.bool)
    is_dense[dense] = True

    def keep(pairs: Pairs) -> Tensor:
        ok = is_dense[pairs.parent] & (count[pairs.child] >= TREESAE_MIN_CHILD_FIRES) & (pairs.parent != pairs.child)
        score = torch.where(ok, pairs.count.double() / count[pairs.child].clamp_min(1), torch.full_like(pairs.dot, -1.0))
        return ok & (hierarchy.rank_within(pairs.parent, score) < TREESAE_CHILDREN)

    pairs = coactivation(sp, sp, chunk_rows=chunk_rows, prune=keep)
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
