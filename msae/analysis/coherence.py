"""How related the latents of a tree are, by a measure the link rule does not use: whether the tokens they fire on
most share a small WordNet noun category (msae.taxonomy), against random trees of the same sizes."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import Tensor

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
    return not _categories(a, cats).isdisjoint(_categories(b, cats))


def _categories(tokens: Sequence[int], cats: dict[int, frozenset[int]]) -> frozenset[int]:
    """The small categories that hold any of `tokens`."""
    return frozenset().union(*(cats.get(t, frozenset()) for t in tokens))


def tree_coherence(tree: Sequence[int], top_tokens: Mapping[int, Sequence[int]], cats: dict[int, frozenset[int]],
                   memo: dict[int, frozenset[int]] | None = None) -> float:
    """Share of the pairs of a tree's latents (root and every node under it) whose top tokens are related. `memo`
    keeps each latent's categories across calls."""
    memo = {} if memo is None else memo
    sets = []
    for latent in tree:
        if latent not in memo:
            memo[latent] = _categories(top_tokens[latent], cats)
        sets.append(memo[latent])
    n = len(sets)
    hits = sum(not sets[i].isdisjoint(sets[j]) for i in range(n) for j in range(i + 1, n) if sets[i] and sets[j])
    return hits / max(n * (n - 1) // 2, 1)


def _draw(pool: Tensor, size: int, g: torch.Generator, exclude: int | None = None) -> list[int]:
    """`size` distinct members of `pool` (none equal to `exclude`) at random: a few random picks, repeats dropped,
    for the small trees drawn from large pools; a permutation where that comes up short."""
    picks = pool[torch.randint(pool.numel(), (2 * size + 8,), generator=g)].tolist()
    out = [v for v in dict.fromkeys(picks) if v != exclude][:size]
    if len(out) < size:
        rest = pool[pool != exclude] if exclude is not None else pool
        out = rest[torch.randperm(rest.numel(), generator=g)[:size]].tolist()
    return out


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
    memo: dict[int, frozenset[int]] = {}
    observed = torch.tensor([tree_coherence(t, top_tokens, cats, memo) for t in trees])
    g = torch.Generator().manual_seed(seed)
    pool_t = torch.tensor(list(pool))
    roots_t = None if root_pool is None else torch.tensor(list(root_pool))

    def random_tree(size: int) -> list[int]:
        if roots_t is None:
            return _draw(pool_t, size, g)
        root = int(roots_t[torch.randint(roots_t.numel(), (1,), generator=g)])
        return [root] + _draw(pool_t, size - 1, g, exclude=root)

    null_means = []
    for _ in range(reps):
        values = [tree_coherence(random_tree(len(t)), top_tokens, cats, memo) for t in trees]
        null_means.append(sum(values) / len(values))
    nulls = torch.tensor(null_means, dtype=torch.float64)
    low, high = torch.quantile(nulls, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return Coherence(trees=bootstrap_mean(observed, seed=seed),
                     null=Interval(mean=float(nulls.mean()), low=low, high=high, n=reps))
