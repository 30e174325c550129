"""The taxonomy benchmark: average precision and its member bootstrap against brute force, category choice and
polysemy on a hand-built taxonomy, link precision against ancestry, and the whole benchmark on the real model."""

from __future__ import annotations


import numpy as np
import pandas as pd
import pytest
import torch

from msae.analysis import taxbench
from msae.analysis.stream import Sparse
from msae.config import TaxonomyBenchConfig
from msae.taxonomy import Category, Taxonomy


def brute_ap(scores: np.ndarray, positive: np.ndarray) -> float:
    """Σ over the distinct scores t > 0, from the top, of (recall gained at t) × (precision at t): every row scoring
    t or more retrieved (silent rows never are; tied rows count together, as in scikit-learn)."""
    total, last_recall = 0.0, 0.0
    for t in sorted(set(scores[scores > 0].tolist()), reverse=True):
        got = scores >= t
        recall = (got & positive).sum() / max(positive.sum(), 1)
        total += (recall - last_recall) * (got & positive).sum() / got.sum()
        last_recall = recall
    return total


def test_average_precision_matches_brute_force_and_weights_count_as_copies():
    rng = np.random.default_rng(0)
    for _ in range(20):
        scores = rng.random(60) * (rng.random(60) < 0.5)
        positive = rng.random(60) < 0.3
        fired = scores > 0
        got = taxbench.average_precision(scores[fired], positive[fired], float(positive.sum()))
        assert got == pytest.approx(brute_ap(scores, positive))
    # A weight of 2 on a row is the row duplicated (a tie: both copies at its score).
    scores = np.array([0.9, 0.8, 0.7, 0.0])
    positive = np.array([False, True, True, True])
    dup_scores = np.array([0.9, 0.8, 0.8, 0.7, 0.0])
    dup_pos = np.array([False, True, True, True, True])
    weight = np.array([[1.0, 2.0, 1.0]])
    got = taxbench.average_precision(scores[:3], positive[:3], np.array([4.0]), weight)
    assert got[0] == pytest.approx(brute_ap(dup_scores, dup_pos))


def test_member_bootstrap_on_a_hand_built_case():
    """Two members: 'a' always detected at the top, 'b' never. AP is 0.5 with both; resampling members gives
    AP 1 (only a drawn), 0 (only b) or 0.5 (both) in proportions 1/4, 1/4, 1/2."""
    token = np.array([1, 1, 2, 2, 9, 9])
    positive = np.isin(token, [1, 2])
    half = np.ones(6, dtype=bool)
    vals = torch.tensor([2.0, 1.5, 0.5])  # latent 0 fires on rows 0, 1 (member a) and 4 (a negative)
    row_ptr = torch.tensor([0, 1, 2, 2, 2, 3, 3])
    sp = Sparse(row_ptr, torch.zeros(3, dtype=torch.int32), vals, 1)
    by = taxbench.ByLatent(sp)
    assert by.ap(0, positive, half) == pytest.approx(0.5)
    reps = taxbench._bootstrap_members(by, 0, positive, half, token, 4000, np.random.default_rng(0))
    assert set(np.round(reps, 6)) == {0.0, 0.5, 1.0}
    assert (reps == 1.0).mean() == pytest.approx(0.25, abs=0.03) and (reps == 0.5).mean() == pytest.approx(0.5, abs=0.03)
    # The two-level interval of one category is the member bootstrap's percentiles; the point is the mean.
    interval = taxbench._two_level(reps[None, :], [0.5], np.random.default_rng(1))
    assert (interval.mean, interval.low, interval.high, interval.n) == (0.5, 0.0, 1.0, 1)


def tiny_taxonomy() -> Taxonomy:
    """animal > {dog-kind, cat-kind}; instrument (unrelated). Token 7 is both a cat and an instrument."""
    cats = [
        Category(1, "animal", "", [], 12, [100]),
        Category(2, "dog", "", [1], 6, [10, 11, 12, 13, 14, 15]),
        Category(3, "cat", "", [1], 6, [20, 21, 22, 23, 24, 7]),
        Category(4, "instrument", "", [], 8, [30, 31, 32, 33, 34, 35, 36, 7]),
    ]
    return Taxonomy("tiny", "test", 5, cats)


def test_categories_polysemy_and_link_precision_on_a_hand_built_taxonomy():
    tax = tiny_taxonomy()
    available = {10, 11, 12, 13, 14, 20, 21, 22, 23, 24, 7, 30, 31, 32, 33, 34}
    chosen = taxbench.choose_categories(tax, available, TaxonomyBenchConfig(category_size=(6, 8), min_members=5))
    # Most available members first (6, 6, 5), then WordNet offset; animal (12 tokens) is out of the size range.
    assert [c.name for c, _m in chosen] == ["cat", "instrument", "dog"]
    assert taxbench.ambiguous_tokens(chosen, tax.ancestors()) == {7}
    # Links: a latent labelled "animal" over one labelled "dog" is right; "instrument" over "cat" is wrong.
    labels = {0: (1, 0.9), 1: (2, 0.8), 2: (4, 0.7), 3: (3, 0.6)}
    # A third link, in the DAG but not the tree: "instrument" over "dog", wrong.
    links = pd.DataFrame({"parent": [0, 2, 2], "child": [1, 3, 1], "tree": [True, True, False],
                          "linked": [True, True, True]})
    precision, null = taxbench.link_precision(links, labels, tax.ancestors(), torch.tensor([0, 1, 0, 1]))
    assert precision.mean == 0.5 and precision.n == 2
    assert null.n == 2
    dag, dag_null = taxbench.link_precision(links, labels, tax.ancestors(), torch.tensor([0, 1, 0, 1]), which="linked")
    assert dag.mean == pytest.approx(1 / 3) and dag.n == 3 and dag_null.n == 3


def test_labels_are_each_latents_best_category_by_f1():
    tax = tiny_taxonomy()
    # Rows: tokens 10,11 (dogs), 20,21 (cats), 30 (instrument), 99 (none). Latent 0 fires on the dogs, latent 1 on
    # dogs and cats (animal), latent 2 on one dog only.
    token = torch.tensor([10, 11, 20, 21, 30, 99])
    dense = torch.zeros(6, 3)
    dense[[0, 1], 0] = 1.0
    dense[[0, 1, 2, 3], 1] = 1.0
    dense[0, 2] = 1.0
    nz = dense.nonzero()
    row_ptr = torch.zeros(7, dtype=torch.long)
    row_ptr[1:] = torch.bincount(nz[:, 0], minlength=6).cumsum(0)
    sp = Sparse(row_ptr, nz[:, 1].int(), dense[nz[:, 0], nz[:, 1]], 3)
    labels = taxbench.label_latents(sp, token, tax)
    assert labels[0] == (2, pytest.approx(1.0)) and labels[1] == (1, pytest.approx(1.0))
    assert labels[2][0] == 2 and labels[2][1] == pytest.approx(2 / 3)
