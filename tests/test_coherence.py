"""Tree coherence by WordNet categories, on a hand-made taxonomy, against its random-tree null."""

from __future__ import annotations

import pandas as pd

from explorer import tree
from msae.analysis import coherence
from msae.taxonomy import Category, Taxonomy


def small_taxonomy() -> Taxonomy:
    """animal (tokens 1..4) with dog (1, 2) below it; tool (10..12); and a huge category holding everything."""
    return Taxonomy(tokenizer="t", source="hand", min_tokens=2, categories=[
        Category(offset=0, name="entity", gloss="", parents=[], size=500, tokens=list(range(100, 600))),
        Category(offset=1, name="animal", gloss="", parents=[0], size=4, tokens=[3, 4]),
        Category(offset=2, name="dog", gloss="", parents=[1], size=2, tokens=[1, 2]),
        Category(offset=3, name="tool", gloss="", parents=[0], size=3, tokens=[10, 11, 12]),
    ])


def test_related_tokens_share_a_small_category_only():
    cats = coherence.token_categories(small_taxonomy(), max_size=100)
    assert coherence.related([1], [4], cats), "dog and animal tokens share 'animal'"
    assert not coherence.related([1], [10], cats), "only 'entity' (too broad) holds both"
    assert not coherence.related([7], [7], cats), "a token in no category relates to nothing"


def test_a_coherent_forest_beats_random_trees_and_a_mixed_one_does_not():
    cats = coherence.token_categories(small_taxonomy(), max_size=100)
    # Latent i fires most on token i; latents 20..59 on tokens in no small category.
    top = {i: [i] for i in range(60)}
    pool = list(range(60))
    coherent = [[1, 2, 3, 4], [10, 11, 12]]
    got = coherence.forest_coherence(coherent, top, cats, pool, reps=200)
    assert got.trees.mean == 1.0 and got.trees.low > got.null.high
    mixed = [[1, 10, 30, 40], [11, 3, 50]]
    bad = coherence.forest_coherence(mixed, top, cats, pool, reps=200)
    assert bad.trees.mean == 0.0 and bad.trees.low <= bad.null.high


def test_hubs_are_split_from_concept_trees_by_their_roots_density():
    nodes = pd.DataFrame({"latent": [0, 1, 2, 3, 4], "parent": [-1, 0, -1, 2, 3], "root": [0, 0, 2, 2, 2],
                          "freq": [0.2, 0.01, 0.03, 0.001, 0.0001], "label": list("abcde"), "descendants": [1, 0, 2, 1, 0]})
    concept, hubs = tree.split_hubs(nodes, hub_density=0.05)
    assert concept["latent"].tolist() == [2, 3, 4] and hubs["latent"].tolist() == [0, 1]
    table = tree.trees_table(nodes, pd.DataFrame({"latent": range(5), "coverage": [0.5, 0, 0.9, 0, 0]}))
    assert table["root"].tolist() == [2, 0] and table["children"].tolist() == [1, 1]
    assert table["children cover"].tolist() == [0.9, 0.5]
    assert tree.tree_members(concept) == [[2, 3, 4]]


def test_words_are_letters_only_three_or_more_and_not_function_words():
    assert tree.is_word(" York") and tree.is_word("evergreen") and tree.is_word(" Lincoln")
    for token in (" of", "The", " p", "8", ").__", "\n", " ", "e.g", " well-known", " whom"):
        assert not tree.is_word(token), token


def test_bands_split_trees_by_their_root_and_the_null_draws_like_trees():
    """Concept trees: a root firing on at most HUB_DENSITY whose top tokens are at least half words; symbol trees:
    such a root on anything else; hubs: a denser root. The null's roots come from the latents that could root a tree
    of the band, and a concept tree's other latents from word latents only."""
    vocab = [" York", " Ohio", " of", ",", "8", " the", " river", " sea"]
    latents = pd.DataFrame({"latent": range(6), "count": [50, 5, 40, 9, 0, 7],
                            "freq": [0.02, 0.001, 0.2, 0.01, 0.0, 0.004],
                            "top_token_ids": [[0, 1, 2], [1], [2, 5], [3, 4, 6], [7], [6, 7, 3]]})
    words = tree.word_latents(latents, vocab)
    assert words == {0, 1, 4, 5}  # #3 has one word in three; #4 is dead but its tokens are words
    nodes = pd.DataFrame({"latent": [0, 1, 2, 5, 3], "parent": [-1, 0, -1, 2, -1], "root": [0, 0, 2, 2, 3],
                          "freq": [0.02, 0.001, 0.2, 0.004, 0.01]})
    by_kind = tree.bands(nodes, words)
    assert list(by_kind) == list(tree.BAND_KINDS)
    assert [by_kind[k]["latent"].tolist() for k in tree.BAND_KINDS] == [[0, 1], [3], [2, 5]]
    assert tree.band_pools(latents, words, "concept") == ([0, 1, 5], [0, 1, 5])
    assert tree.band_pools(latents, words, "symbol") == ([3], [0, 1, 2, 3, 5])
    assert tree.band_pools(latents, words, "hub") == ([2], [0, 1, 2, 3, 5])


def test_the_null_roots_its_random_trees_in_the_root_pool():
    cats = coherence.token_categories(small_taxonomy(), max_size=100)
    top = {i: [i] for i in range(60)}
    # Every random tree is [1, 2] (dog, dog): the null is exactly 1, and the same tree cannot beat it.
    got = coherence.forest_coherence([[1, 2]], top, cats, [1, 2], root_pool=[1], reps=20)
    assert got.null.mean == got.null.low == got.null.high == 1.0 and got.trees.mean == 1.0
    # Roots from the coherent pool, the rest from unrelated latents: the null stays 0.
    far = coherence.forest_coherence([[1, 2, 3]], top, cats, list(range(20, 60)), root_pool=[1, 2, 3], reps=50)
    assert far.null.high == 0.0 and far.trees.mean == 1.0
