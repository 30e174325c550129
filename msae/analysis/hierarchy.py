"""Parent–child links between latents: across the nested groups of one Matryoshka SAE, or from a narrow SAE to
a wider one (feature splitting). DESIGN.md §3: for child B and candidate parent A,

    score(A → B) = cos(acts_A, acts_B over the rows where B fires) × max(B) / max(A),

linked at score >= threshold (0.6). The full DAG keeps every link; the tree keeps each child under its best
linked parent. Decoder cosine is reported beside the score as a second signal."""

from __future__ import annotations

from typing import Callable

import pandas as pd
import torch
from torch import Tensor

from msae.config import LinkConfig
from msae.analysis.coact import Pairs, coactivation
from msae.analysis.stream import Sparse


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
    """(score, masked cosine, max ratio) of every pair.

    The ratio max(child) / max(parent) is capped at 1: it is there to discount a parent far stronger than the
    child, and uncapped it lets a rare, strong child pass the threshold with nearly any frequent latent (on the
    shipped Matryoshka run, children then had 231 "parents" each on average)."""
    child_sq = child_stats["sum_sq"][pairs.child]
    masked_cos = pairs.dot / (pairs.parent_sq * child_sq).sqrt().clamp_min(1e-30)
    ratio = (child_stats["max"][pairs.child] / parent_stats["max"][pairs.parent].clamp_min(1e-30)).clamp_max(1.0)
    return (masked_cos * ratio).float(), masked_cos.float(), ratio.float()


def candidate_filter(parent_stats: dict, child_stats: dict, cfg: LinkConfig, parent_group: Tensor | None = None,
                     child_group: Tensor | None = None) -> Callable[[Pairs], Tensor]:
    """The pairs links_table can use: parent in an earlier group (when groups are given), and among the child's
    `keep_per_child` best in the batch of pairs at hand or at the threshold."""

    def keep(pairs: Pairs) -> Tensor:
        ok = torch.ones(pairs.parent.numel(), dtype=torch.bool)
        if parent_group is not None:
            ok = parent_group[pairs.parent] < child_group[pairs.child]
        score = score_pairs(pairs, parent_stats, child_stats)[0]
        score = torch.where(ok, score, torch.full_like(score, -torch.inf))
        rank = _rank_in_child(pairs.child, score)
        return ok & ((rank < cfg.keep_per_child) | _is_link(score, pairs, cfg))

    return keep


def _is_link(score: Tensor, pairs: Pairs, cfg: LinkConfig) -> Tensor:
    return (score >= cfg.threshold) & (pairs.count >= cfg.min_cofires)


def _rank_in_child(child: Tensor, score: Tensor) -> Tensor:
    """Rank of every pair's score among the pairs of the same child (0 = best)."""
    order = torch.argsort(score, descending=True, stable=True)
    order = order[torch.argsort(child[order], stable=True)]
    sorted_child = child[order]
    first = torch.ones_like(sorted_child, dtype=torch.bool)
    first[1:] = sorted_child[1:] != sorted_child[:-1]
    start = torch.cummax(torch.where(first, torch.arange(order.numel()), torch.zeros_like(order)), dim=0).values
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel()) - start
    return rank


def links_table(pairs: Pairs, parent_stats: dict, child_stats: dict, W_par: Tensor, W_child: Tensor,
                cfg: LinkConfig, parent_group: Tensor | None = None, child_group: Tensor | None = None) -> pd.DataFrame:
    """Every child's best `keep_per_child` candidates and every link, one row each; `linked` marks the DAG's
    edges and `tree` the child's best linked parent."""
    score, masked_cos, ratio = score_pairs(pairs, parent_stats, child_stats)
    is_link = _is_link(score, pairs, cfg)
    rank = _rank_in_child(pairs.child, score)
    # The tree parent is the best-scoring link, which need not be the best-scoring candidate.
    link_rank = _rank_in_child(pairs.child, torch.where(is_link, score, torch.full_like(score, -torch.inf)))
    keep = ((rank < cfg.keep_per_child) | is_link).nonzero().squeeze(1)
    keep = keep[torch.argsort(pairs.child[keep] * (pairs.child.numel() + 1) + rank[keep])]  # by child, best first
    parent, child = pairs.parent[keep], pairs.child[keep]
    linked = is_link[keep]
    frame = pd.DataFrame({
        "parent": parent.numpy(),
        "child": child.numpy(),
        "score": score[keep].numpy(),
        "masked_cos": masked_cos[keep].numpy(),
        "max_ratio": ratio[keep].numpy(),
        "decoder_cos": pair_decoder_cos(W_par, W_child, parent, child).numpy(),
        "cofires": pairs.count[keep].numpy(),
        "child_fires": child_stats["count"][child].numpy(),
        "parent_fires": parent_stats["count"][parent].numpy(),
        "linked": linked.numpy(),
        "tree": (linked & (link_rank[keep] == 0)).numpy(),
    })
    if parent_group is not None:
        frame["parent_group"] = parent_group[parent].numpy()
    if child_group is not None:
        frame["child_group"] = child_group[child].numpy()
    return frame


def nested_links(sp: Sparse, widths: list[int], stats: dict, W_dec: Tensor, cfg: LinkConfig,
                 chunk_rows: int = 8192) -> pd.DataFrame:
    """Links across the groups of one Matryoshka SAE: parents in earlier groups than their children."""
    if len(widths) < 2:
        raise ValueError("a hierarchy needs at least two nested widths; this SAE has one (a vanilla SAE: use "
                         "--against with a wider SAE to see how its features split)")
    group = torch.bucketize(torch.arange(widths[-1]), torch.tensor(widths), right=True)
    prune = candidate_filter(stats, stats, cfg, group, group)
    pairs = coactivation(sp, sp, parent_limit=widths[-2], child_from=widths[0], chunk_rows=chunk_rows, prune=prune)
    pairs = Pairs(*(getattr(pairs, f)[prune(pairs)] for f in ("parent", "child", "dot", "parent_sq", "count")))
    return links_table(pairs, stats, stats, W_dec, W_dec, cfg, group, group)


def cross_links(narrow: Sparse, wide: Sparse, narrow_stats: dict, wide_stats: dict, W_narrow: Tensor, W_wide: Tensor,
                cfg: LinkConfig, chunk_rows: int = 8192) -> pd.DataFrame:
    """Links from the latents of one SAE (parents) to those of another over the same rows (children)."""
    pairs = coactivation(narrow, wide, chunk_rows=chunk_rows, prune=candidate_filter(narrow_stats, wide_stats, cfg))
    return links_table(pairs, narrow_stats, wide_stats, W_narrow, W_wide, cfg)


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
