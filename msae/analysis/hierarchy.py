"""Parent–child links between latents: across the nested groups of one Matryoshka SAE, or from a narrow SAE to
a wider one (feature splitting). LinkConfig's two criteria:

    coverage (default): P(p | c) = n_pc / n_c >= min_coverage, min_reverse <= P(c | p) <= max_reverse,
                        n_p > n_c, P(p) <= max_parent_density, lift P(p | c) / P(p) >= min_lift,
                        n_pc >= min_cofires, n_c >= min_child_fires
                        [and both among the decoder rows nearest c's detection direction, with probe_top]
    cosine (baseline):  cos(acts_p, acts_c over the rows where c fires) × max(c) / max(p) >= threshold

Every candidate row carries the figures of both, so a table can be read either way. The full DAG keeps every link;
the tree keeps each child under one linked parent: the most specific (least firing) for coverage, the best score
for cosine. Decoder cosine is reported beside them; it is not a criterion (Matryoshka children drop the parent
direction)."""

from __future__ import annotations

from typing import Callable

import pandas as pd
import torch
from torch import Tensor

from msae.config import LinkConfig
from msae.analysis.coact import PAIR_FIELDS, Pairs, coactivation
from msae.analysis.stream import Sparse, rank_within


def unit_rows(W: Tensor) -> Tensor:
    W = W.detach().float().cpu()
    return W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)


def pair_decoder_cos(W_par: Tensor, W_child: Tensor, parent: Tensor, child: Tensor, chunk: int = 1 << 20) -> Tensor:
    """Cosine between decoder rows of the given pairs (rows need not be unit norm)."""
    a, b = unit_rows(W_par), unit_rows(W_child)
    out = torch.empty(parent.numel())
    for s in range(0, parent.numel(), chunk):
        out[s : s + chunk] = (a[parent[s : s + chunk]] * b[child[s : s + chunk]]).sum(dim=1)
    return out


def score_pairs(pairs: Pairs, parent_stats: dict[str, Tensor], child_stats: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """(cosine score, masked cosine, max ratio) of every pair: the baseline criterion.

    The ratio max(child) / max(parent) is capped at 1: it is there to discount a parent far stronger than the
    child, and uncapped it lets a rare, strong child pass the threshold with nearly any frequent latent (on the
    shipped Matryoshka run, children then had 231 "parents" each on average)."""
    child_sq = child_stats["sum_sq"][pairs.child]
    masked_cos = pairs.dot / (pairs.parent_sq * child_sq).sqrt().clamp_min(1e-30)
    ratio = (child_stats["max"][pairs.child] / parent_stats["max"][pairs.parent].clamp_min(1e-30)).clamp_max(1.0)
    return (masked_cos * ratio).float(), masked_cos.float(), ratio.float()


def pair_figures(pairs: Pairs, parent_stats: dict[str, Tensor], child_stats: dict[str, Tensor],
                 n_rows: int) -> dict[str, Tensor]:
    """Every figure of both criteria for every pair (float64 tensors of the pairs' length, counts int64)."""
    n_c = child_stats["count"][pairs.child]
    n_p = parent_stats["count"][pairs.parent]
    cos_score, masked_cos, ratio = score_pairs(pairs, parent_stats, child_stats)
    coverage = pairs.count.double() / n_c.clamp_min(1)
    child_total = child_stats["mean"][pairs.child] * n_c
    return {
        "cosine_score": cos_score, "masked_cos": masked_cos, "max_ratio": ratio,
        "coverage": coverage,
        "weighted_coverage": pairs.child_sum / child_total.clamp_min(1e-30),
        "reverse_coverage": pairs.count.double() / n_p.clamp_min(1),
        "lift": coverage * n_rows / n_p.clamp_min(1),
        "parent_density": n_p.double() / max(n_rows, 1),
        "cofires": pairs.count, "child_fires": n_c, "parent_fires": n_p,
    }


def is_link(fig: dict[str, Tensor], cfg: LinkConfig, criterion: str | None = None) -> Tensor:
    """The pairs that `criterion` (default: cfg's) links, without the probe condition (links_table adds it)."""
    if (criterion or cfg.criterion) == "cosine":
        return (fig["cosine_score"] >= cfg.threshold) & (fig["cofires"] >= cfg.min_cofires)
    return coverage_rule(fig, cfg)


def coverage_rule(fig: dict[str, Tensor], cfg: LinkConfig) -> Tensor:
    """The coverage criterion on pairs' figures (keys of pair_figures; counts may come from any rows)."""
    return ((fig["coverage"] >= cfg.min_coverage) & (fig["reverse_coverage"] <= cfg.max_reverse)
            & (fig["reverse_coverage"] >= cfg.min_reverse) & (fig["parent_density"] <= cfg.max_parent_density)
            & (fig["parent_fires"] > fig["child_fires"]) & (fig["lift"] >= cfg.min_lift)
            & (fig["cofires"] >= cfg.min_cofires) & (fig["child_fires"] >= cfg.min_child_fires))


def rank_score(fig: dict[str, Tensor], cfg: LinkConfig) -> Tensor:
    """What orders a child's candidates (the table's `score`): P(p | c) for coverage, the cosine score for cosine."""
    return (fig["cosine_score"] if cfg.criterion == "cosine" else fig["coverage"]).float()


def candidate_filter(parent_stats: dict, child_stats: dict, cfg: LinkConfig, n_rows: int,
                     parent_group: Tensor | None = None, child_group: Tensor | None = None) -> Callable[[Pairs], Tensor]:
    """The pairs links_table can use: parent in an earlier group (when groups are given), and among the child's
    `keep_per_child` best in the batch of pairs at hand, or a link (of either criterion: the table reports both)."""

    def keep(pairs: Pairs) -> Tensor:
        ok = torch.ones(pairs.parent.numel(), dtype=torch.bool)
        if parent_group is not None:
            ok = parent_group[pairs.parent] < child_group[pairs.child]
        fig = pair_figures(pairs, parent_stats, child_stats, n_rows)
        score = torch.where(ok, rank_score(fig, cfg), torch.full((pairs.parent.numel(),), -torch.inf))
        # Ranked among the usable pairs only: the others would rank after them (their score is -inf) and go anyway.
        rank = torch.full_like(pairs.child, cfg.keep_per_child)
        rank[ok] = rank_within(pairs.child[ok], score[ok])
        return ok & ((rank < cfg.keep_per_child) | is_link(fig, cfg, "coverage") | is_link(fig, cfg, "cosine"))

    return keep


def _tree_rank(fig: dict[str, Tensor], linked: Tensor, child: Tensor, parent: Tensor, criterion: str) -> Tensor:
    """Rank of every link among its child's links by the tree's preference (0 = the tree parent): the most specific
    parent (fewest firings; then higher coverage, then lower id) for coverage, the best score for cosine."""
    if criterion == "cosine":
        key = fig["cosine_score"].double()
    else:
        # Fewest firings first; coverage (in [0, 1]) and the id break ties without reordering counts.
        key = -fig["parent_fires"].double() + 0.5 * fig["coverage"] - 1e-9 * parent.double()
    return rank_within(child, torch.where(linked, key, torch.full_like(key, -torch.inf)))


@torch.no_grad()
def probe_ranks(directions: Tensor, W_dec: Tensor, parent: Tensor, child: Tensor, chunk: int = 512) -> tuple[Tensor, Tensor]:
    """For each pair, the rank (0 = nearest) of the parent's and of the child's decoder row among all rows of
    W_dec by cosine with the child's detection direction (directions: (d_sae, d_in), one per latent)."""
    W = unit_rows(W_dec)
    D = unit_rows(directions)
    rank_p = torch.empty(parent.numel(), dtype=torch.long)
    rank_c = torch.empty(parent.numel(), dtype=torch.long)
    kids, inverse = torch.unique(child, return_inverse=True)
    for s in range(0, kids.numel(), chunk):
        block = kids[s : s + chunk]
        # Row i's cosines shifted by 4i (they lie in [-1, 1]; exact in float64), so that the block's sorted rows
        # make one ascending sequence and a pair's rank (its row's values above the pair's) is one binary search.
        shifted = (D[block] @ W.T).double() + 4.0 * torch.arange(block.numel(), dtype=torch.float64)[:, None]
        flat = shifted.sort(dim=1).values.reshape(-1)
        sel = ((inverse >= s) & (inverse < s + block.numel())).nonzero().squeeze(1)
        row = inverse[sel] - s
        row_end = (row + 1) * shifted.shape[1]
        rank_p[sel] = row_end - torch.searchsorted(flat, shifted[row, parent[sel]], right=True)
        rank_c[sel] = row_end - torch.searchsorted(flat, shifted[row, child[sel]], right=True)
    return rank_p, rank_c


def links_table(pairs: Pairs, parent_stats: dict, child_stats: dict, W_par: Tensor, W_child: Tensor,
                cfg: LinkConfig, n_rows: int, parent_group: Tensor | None = None, child_group: Tensor | None = None,
                directions: Tensor | None = None) -> pd.DataFrame:
    """Every child's best `keep_per_child` candidates and every link of either criterion, one row each, best
    first within a child; `linked` marks the DAG's edges by cfg's criterion, `tree` the child's tree parent,
    `linked_cosine` / `linked_coverage` what each criterion says. With `directions` (one detection direction
    per child latent, in the same dictionary as W_par: nested links), the probe ranks are columns and, with
    cfg.probe_top, a condition of coverage links."""
    fig = pair_figures(pairs, parent_stats, child_stats, n_rows)
    score = rank_score(fig, cfg)
    linked_by = {c: is_link(fig, cfg, c) for c in ("coverage", "cosine")}
    ranks = None
    if directions is not None:
        ranks = probe_ranks(directions, W_par, pairs.parent, pairs.child)
        if cfg.probe_top > 0:
            linked_by["coverage"] &= (ranks[0] < cfg.probe_top) & (ranks[1] < cfg.probe_top)
    linked = linked_by[cfg.criterion]
    rank = rank_within(pairs.child, score)
    tree_rank = _tree_rank(fig, linked, pairs.child, pairs.parent, cfg.criterion)
    keep = ((rank < cfg.keep_per_child) | linked_by["coverage"] | linked_by["cosine"]).nonzero().squeeze(1)
    keep = keep[torch.argsort(pairs.child[keep] * (pairs.child.numel() + 1) + rank[keep])]  # by child, best first
    parent, child = pairs.parent[keep], pairs.child[keep]
    frame = pd.DataFrame({
        "parent": parent.numpy(),
        "child": child.numpy(),
        "score": score[keep].numpy(),
        "linked": linked[keep].numpy(),
        "tree": (linked & (tree_rank == 0))[keep].numpy(),
        "coverage": fig["coverage"][keep].float().numpy(),
        "weighted_coverage": fig["weighted_coverage"][keep].float().numpy(),
        "reverse_coverage": fig["reverse_coverage"][keep].float().numpy(),
        "lift": fig["lift"][keep].float().numpy(),
        "cosine_score": fig["cosine_score"][keep].numpy(),
        "masked_cos": fig["masked_cos"][keep].numpy(),
        "max_ratio": fig["max_ratio"][keep].numpy(),
        "decoder_cos": pair_decoder_cos(W_par, W_child, parent, child).numpy(),
        "cofires": pairs.count[keep].numpy(),
        "child_fires": fig["child_fires"][keep].numpy(),
        "parent_fires": fig["parent_fires"][keep].numpy(),
        "linked_coverage": linked_by["coverage"][keep].numpy(),
        "linked_cosine": linked_by["cosine"][keep].numpy(),
    })
    if ranks is not None:
        frame["probe_rank_parent"] = ranks[0][keep].numpy()
        frame["probe_rank_child"] = ranks[1][keep].numpy()
    if parent_group is not None:
        frame["parent_group"] = parent_group[parent].numpy()
    if child_group is not None:
        frame["child_group"] = child_group[child].numpy()
    return frame


def group_index(widths: list[int]) -> Tensor:
    """(d_sae,) the nested group of every latent."""
    return torch.bucketize(torch.arange(widths[-1]), torch.tensor(widths), right=True)


def nested_links(sp: Sparse, widths: list[int], stats: dict, W_dec: Tensor, cfg: LinkConfig,
                 directions: Tensor | None = None) -> pd.DataFrame:
    """Links across the groups of one Matryoshka SAE: parents in earlier groups than their children."""
    if len(widths) < 2:
        raise ValueError("a hierarchy needs at least two nested widths; this SAE has one (a vanilla SAE: use "
                         "--against with a wider SAE to see how its features split)")
    group = group_index(widths)
    prune = candidate_filter(stats, stats, cfg, sp.n_rows, group, group)
    pairs = coactivation(sp, sp, parent_limit=widths[-2], child_from=widths[0], prune=prune)
    pairs = Pairs(*(getattr(pairs, f)[prune(pairs)] for f in PAIR_FIELDS))
    return links_table(pairs, stats, stats, W_dec, W_dec, cfg, sp.n_rows, group, group, directions)


def cross_links(narrow: Sparse, wide: Sparse, narrow_stats: dict, wide_stats: dict, W_narrow: Tensor, W_wide: Tensor,
                cfg: LinkConfig) -> pd.DataFrame:
    """Links from the latents of one SAE (parents) to those of another over the same rows (children)."""
    prune = candidate_filter(narrow_stats, wide_stats, cfg, narrow.n_rows)
    pairs = coactivation(narrow, wide, prune=prune)
    return links_table(pairs, narrow_stats, wide_stats, W_narrow, W_wide, cfg, narrow.n_rows)


def coverage(parents: Sparse, children: Sparse, links: pd.DataFrame, chunk_rows: int = 65536) -> Tensor:
    """(parent d_sae,) fraction of each parent's firing rows on which at least one of its linked children fires
    (NaN for a parent that never fires)."""
    edges = links[links["linked"]]
    n_par = parents.d_sae
    covered = torch.zeros(n_par, dtype=torch.long)
    if len(edges):
        e_child = torch.tensor(edges["child"].to_numpy(), dtype=torch.long)
        e_parent = torch.tensor(edges["parent"].to_numpy(), dtype=torch.long)
        order = torch.argsort(e_child, stable=True)
        e_child, e_parent = e_child[order], e_parent[order]
        ptr = torch.zeros(children.d_sae + 1, dtype=torch.long)
        ptr[1:] = torch.bincount(e_child, minlength=children.d_sae).cumsum(0)
        for start in range(0, parents.n_rows, chunk_rows):
            stop = min(start + chunk_rows, parents.n_rows)
            cr, cc, _ = children.slice_rows(start, stop)
            n_links = ptr[cc + 1] - ptr[cc]
            rep = torch.repeat_interleave(torch.arange(cc.numel()), n_links)
            first = torch.repeat_interleave(ptr[cc], n_links)
            within = torch.arange(rep.numel()) - torch.repeat_interleave(n_links.cumsum(0) - n_links, n_links)
            child_keys = torch.unique(cr[rep] * n_par + e_parent[first + within])
            pr, pc, _ = parents.slice_rows(start, stop)
            hit = torch.isin(pr * n_par + pc, child_keys)
            covered += torch.bincount(pc[hit], minlength=n_par)
    fires = torch.bincount(parents.cols.long(), minlength=n_par)
    return torch.where(fires > 0, covered.double() / fires.clamp_min(1), torch.tensor(float("nan"), dtype=torch.float64))


def children_per_parent(links: pd.DataFrame, n_parents: int) -> pd.DataFrame:
    """Per parent: linked children in the DAG and in the tree."""
    dag = links[links["linked"]].groupby("parent").size()
    tree = links[links["tree"]].groupby("parent").size()
    frame = pd.DataFrame({"latent": range(n_parents)})
    frame["children"] = frame["latent"].map(dag).fillna(0).astype(int)
    frame["tree_children"] = frame["latent"].map(tree).fillna(0).astype(int)
    return frame


@torch.no_grad()
def decoder_neighbours(W_a: Tensor, W_b: Tensor, thresholds: tuple[float, ...], top: int = 5, chunk: int = 1024) -> dict:
    """For every row of W_a: how many rows of W_b reach each decoder-cosine threshold, and its `top` nearest
    rows of W_b (indices, cosines)."""
    a, b = unit_rows(W_a), unit_rows(W_b)
    counts = {t: [] for t in thresholds}
    top_i, top_v = [], []
    for s in range(0, a.shape[0], chunk):
        cos = a[s : s + chunk] @ b.T
        for t in thresholds:
            counts[t].append((cos >= t).sum(dim=1))
        v, i = cos.topk(min(top, b.shape[0]), dim=1)
        top_v.append(v)
        top_i.append(i)
    return {"counts": {t: torch.cat(c) for t, c in counts.items()}, "top_i": torch.cat(top_i), "top_v": torch.cat(top_v)}


def split_share(W_narrow: Tensor, W_wide: Tensor, alive: Tensor, thresholds: tuple[float, ...]) -> dict[str, float]:
    """Share of the narrow dictionary's live latents that the wide one represents by >= 2 latents, each with
    decoder cosine >= t (a narrow latent reused unchanged in the wide one counts as one of them)."""
    nb = decoder_neighbours(W_narrow, W_wide, thresholds)
    n_alive = int(alive.sum())
    return {str(t): (float(((nb["counts"][t] >= 2) & alive).sum()) / n_alive if n_alive else float("nan"))
            for t in thresholds}
