"""How related the latents of a tree are, by a measure the link rule does not use: whether the tokens they fire on
most share a small WordNet noun category (msae.taxonomy), against random trees of the same sizes."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from msae.analysis.validate import bootstrap_mean
from msae.results import Interval
from msae.taxonomy import Taxonomy

RELATED_CATEGORY_MAX = 100
"""Two tokens are related when one WordNet noun category of at most this many single-token words holds both (a
category as broad as "entity" or "abstraction" would relate nearly any two nouns)."""


def token_categories(taxonomy: Taxonomy, max_size: int = RELATED_CATEGORY_MAX) -> dict[int, frozenset[int]]:
    """Token id -> the categories of at most `max_size` tokens that hold it."""
    out: dict[int, set[int]] = defaultdict(set)
    for offset, members in taxonomy.members().items():
        if len(members) <= max_size:
            for token in members:
                out[token].add(offset)
    return {token: frozenset(cats) for token, cats in out.items()}


def related(a: Sequence[int], b: Sequence[int], cats: dict[int, frozenset[int]]) -> bool:
    """Whether a top token of one latent and a top token of the other share a small category."""
    mine = frozenset().union(*(cats.get(t, frozenset()) for t in a))
    return any(mine & cats.get(t, frozenset()) for t in b)


def tree_coherence(tree: Sequence[int], top_tokens: Mapping[int, Sequence[int]], cats: dict[int, frozenset[int]]) -> float:
    """Share of the pairs of a tree's latents (root and every node under it) whose top tokens are related."""
    pairs = [(a, b) for i, a in enumerate(tree) for b in tree[i + 1:]]
    return sum(related(top_tokens[a], top_tokens[b], cats) for a, b in pairs) / max(len(pairs), 1)


@dataclass
class Coherence:
    """Mean coherence of some trees (an interval over trees) and of random trees of the same sizes."""

    trees: Interval
    """Mean over the trees, with the 2.5th and 97.5th percentiles of means over resampled trees."""
    null: Interval
    """Mean over `reps` random forests (each tree's latents drawn at random from the pool), with the 2.5th and
    97.5th percentiles of those forests' means."""
    related_category_max: int = RELATED_CATEGORY_MAX


def forest_coherence(trees: list[list[int]], top_tokens: Mapping[int, Sequence[int]], cats: dict[int, frozenset[int]],
                     pool: Sequence[int], reps: int = 200, seed: int = 0,
                     root_pool: Sequence[int] | None = None) -> Coherence | None:
    """The coherence of `trees` (lists of latents, root first) against random trees of the same sizes drawn from
    `pool` (the latents a tree could hold), each random tree's root from `root_pool` when given (the latents that
    could root a tree of the kind shown) and the rest from `pool`; None without a tree of two latents or more."""
    trees = [t for t in trees if len(t) >= 2]
    if not trees:
        return None
    observed = torch.tensor([tree_coherence(t, top_tokens, cats) for t in trees])
    g = torch.Generator().manual_seed(seed)
    pool_t = torch.tensor(list(pool))
    roots_t = None if root_pool is None else torch.tensor(list(root_pool))

    def random_tree(size: int) -> list[int]:
        if roots_t is None:
            return pool_t[torch.randperm(pool_t.numel(), generator=g)[:size]].tolist()
        root = int(roots_t[torch.randint(roots_t.numel(), (1,), generator=g)])
        rest = pool_t[pool_t != root]
        return [root] + rest[torch.randperm(rest.numel(), generator=g)[: size - 1]].tolist()

    null_means = []
    for _ in range(reps):
        values = [tree_coherence(random_tree(len(t)), top_tokens, cats) for t in trees]
        null_means.append(sum(values) / len(values))
    nulls = torch.tensor(null_means, dtype=torch.float64)
    low, high = torch.quantile(nulls, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return Coherence(trees=bootstrap_mean(observed, seed=seed),
                     null=Interval(mean=float(nulls.mean()), low=low, high=high, n=reps))
