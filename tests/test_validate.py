"""Link validation and the literature's hierarchy figures, against dense computations and hand-built cases."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from msae.analysis import hierarchy, validate
from msae.analysis.stream import ClassSums, Sparse
from msae.config import LinkConfig


def sparse_of(dense: torch.Tensor) -> Sparse:
    nz = dense.nonzero()
    row_ptr = torch.zeros(dense.shape[0] + 1, dtype=torch.long)
    row_ptr[1:] = torch.bincount(nz[:, 0], minlength=dense.shape[0]).cumsum(0)
    return Sparse(row_ptr, nz[:, 1].int(), dense[nz[:, 0], nz[:, 1]].float(), dense.shape[1])


def test_bootstrap_mean_on_a_hand_built_case():
    assert validate.bootstrap_mean(torch.tensor([])) is None
    same = validate.bootstrap_mean(torch.full((50,), 0.3))
    assert (same.mean, same.low, same.high, same.n) == pytest.approx((0.3, 0.3, 0.3, 50))
    # Half zeros, half ones: mean 0.5, and the interval of a mean of 400 coin flips is about ±1.96·0.5/√400.
    coin = validate.bootstrap_mean(torch.tensor([0.0, 1.0] * 200), reps=4000)
    assert coin.mean == 0.5
    assert coin.low == pytest.approx(0.5 - 0.049, abs=0.012) and coin.high == pytest.approx(0.5 + 0.049, abs=0.012)


def test_pair_cofires_and_subset_match_dense_counts():
    g = torch.Generator().manual_seed(0)
    dense = torch.rand(500, 40, generator=g) * (torch.rand(500, 40, generator=g) < 0.2)
    sp = sparse_of(dense)
    parent = torch.randint(40, (300,), generator=g)
    child = torch.randint(40, (300,), generator=g)
    on = (dense > 0).double()
    want = (on[:, parent] * on[:, child]).sum(0).long()
    assert torch.equal(validate.pair_cofires(sp, parent, child), want)
    assert torch.equal(validate.pair_cofires(sp, parent, child, chunk=7), want), "chunked the same"
    keep = torch.arange(500) % 3 == 0
    sub = validate.pair_cofires(sp.subset(keep), parent, child)
    assert torch.equal(sub, (on[keep][:, parent] * on[keep][:, child]).sum(0).long())


def test_hierarchy_figures_on_a_hand_built_tree():
    """Parent 0 with children 2 and 3 (mutually exclusive, each inside 0); latent 1 fires alone elsewhere."""
    n = 1000
    dense = torch.zeros(n, 4)
    dense[:400, 0] = 1.0          # parent on rows 0..399
    dense[:100, 2] = 1.0          # child A on 0..99 (inside the parent)
    dense[100:200, 3] = 1.0       # child B on 100..199
    dense[380:420, 3] = 1.0       # ... and on 380..419, half of which (400..419) outside the parent
    dense[600:700, 1] = 1.0
    sp = sparse_of(dense)
    links = pd.DataFrame({"parent": [0, 0], "child": [2, 3], "tree": [True, True]})
    fig = validate.hierarchy_figures(sp, links, torch.eye(4), "coverage")
    # P(p|c): A 1.0, B 120/140; P(c|p): A 100/400, B 120/400.
    assert fig.p_parent_given_child == pytest.approx((1.0 + 120 / 140) / 2)
    assert fig.p_child_given_parent == pytest.approx((100 / 400 + 120 / 400) / 2)
    # Children's union: rows 0..199 and 380..419 (240 rows); parent 0..399; Δ = 200..379 and 400..419 = 200 rows;
    # union 420 rows.
    assert fig.hamming == pytest.approx(200 / 420)
    assert fig.sibling_pairs == 1 and fig.sibling_iou == 0.0
    assert fig.treesae_score is None, "no detection directions given"


def test_lda_direction_finds_the_direction_a_latent_fires_on():
    g = torch.Generator().manual_seed(1)
    n, d = 4000, 16
    x = torch.randn(n, d, generator=g) * torch.linspace(0.5, 3.0, d)  # anisotropic noise
    u = torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0)
    fires = torch.rand(n, generator=g) < 0.2
    x[fires] += 2.0 * u
    by_latent = torch.stack([x[fires].double().sum(0), x[~fires].double().sum(0)])
    sums = ClassSums(by_latent, torch.tensor([int(fires.sum()), int((~fires).sum())]), x.double().sum(0),
                     x.double().T @ x.double(), n)
    w = sums.lda_directions()
    # LDA's direction is Σ⁻¹·shift, not the shift itself; it must separate the classes along u's whitened image.
    cov = torch.cov(x[~fires].T.double())
    expected = torch.linalg.solve(cov, u.double())
    assert torch.nn.functional.cosine_similarity(w[0].double(), expected, dim=0) > 0.95
    assert torch.nn.functional.cosine_similarity(w[1].double(), -expected, dim=0) > 0.95


def three_parent_layout(n: int, seed: int) -> torch.Tensor:
    """Widths [4, 10]: parents 0..2 and a decoy 3 in group 0, two exclusive children per parent in group 1
    (latents 4..9); the decoy fires on 40% of parent 0's rows; a few stray firings everywhere."""
    g = torch.Generator().manual_seed(seed)
    dense = torch.zeros(n, 10)
    parent_on = torch.rand(n, 3, generator=g) < 0.25
    dense[:, :3] = parent_on.float()
    which = torch.randint(3, (n, 3), generator=g)  # 0/1: that child, 2: none
    for p in range(3):
        for c in range(2):
            dense[:, 4 + 2 * p + c] = (parent_on[:, p] & (which[:, p] == c)).float() * 0.5
    dense[:, 3] = (parent_on[:, 0] & (torch.rand(n, generator=g) < 0.4)).float() * 0.7
    noise = (torch.rand(n, 10, generator=g) < 0.01) & (dense == 0)
    dense[noise] = 0.3  # stray firings: coverage below 1, lift finite
    return dense


def test_heldout_validation_separates_true_links_from_both_nulls():
    """Parents 0..2 with two exclusive children each (latents 4..9); latent 3 (also group 0) fires on 40% of
    parent 0's rows, so it passes the lift bound for parent 0's children without covering them: the harder null
    sits near 0.4 for those children, well under the tree links' P(p | c) near 1."""
    n, widths = 20_000, [4, 10]
    sp = sparse_of(three_parent_layout(n, 2))
    doc = torch.arange(n) // 50
    parts = (torch.arange(n) // 1000) % 2
    link_rows, split = validate.link_split(doc, torch.arange(n) // 8)
    assert split.startswith("documents")
    result = validate.validate_links(sp, widths, LinkConfig(min_lift=2.0), link_rows, split, parts, ["a", "b"])
    assert result.link_rows + result.measured_rows == n
    by = {c.criterion: c for c in result.criteria}
    assert list(by) == [f"coverage, P(p|c) >= {t:g}" for t in validate.COVERAGE_GRID]
    cov = by["coverage, P(p|c) >= 0.7"]
    assert cov.tree_links == 6 and cov.measured_links == 6 and cov.share_with_parent == 1.0
    assert cov.heldout_coverage.mean > 0.9 and cov.null_coverage.mean < 0.4
    assert cov.heldout_coverage.low > cov.null_coverage.high
    assert cov.heldout_coverage.n == 3, "the interval resamples the three parents"
    assert cov.lift_null_share == pytest.approx(2 / 6), "only parent 0's children have a decoy that passes the lift"
    assert 0.3 < cov.lift_null_coverage.mean < 0.5
    assert set(cov.heldout_coverage_per_part) == {"a", "b"} and cov.heldout_coverage_per_group[0] is None
    assert [m.criterion for m in result.left_out] == ["without a, measured on a", "without b, measured on b"]
    for m in result.left_out:
        assert m.tree_links == 6 and m.heldout_coverage.mean > 0.9


def test_cofire_counts_match_dense_counts_over_any_union_of_row_groups():
    """Every union of the 40 row groups that validation asks for (one group, a part's two, all but a part's two,
    the link half, the measuring half, all of them), asked in the order it asks, dense or counted pair by pair:
    the same counts as a dense product over those rows. Forty groups is twenty corpus parts; the counts keep no
    table per group."""
    g = torch.Generator().manual_seed(3)
    dense = torch.rand(4000, 12, generator=g) * (torch.rand(4000, 12, generator=g) < 0.3)
    sp = sparse_of(dense)
    widths = [3, 7, 12]
    n_groups = 40
    group = torch.randint(n_groups, (4000,), generator=g)
    counts = validate.cofire_counts(sp, group, n_groups, widths, parent_block=2)  # blocks of two parents
    on = (dense > 0).int()
    ids = torch.arange(n_groups)
    asks = [ids % 2 == 0, ids % 2 == 1] + [ids == k for k in (1, 7, 39)]
    for part in (0, 5, 19):
        asks += [ids // 2 != part, ids // 2 == part]  # leave one part out: made without it, measured on it
    asks.append(torch.ones(n_groups, dtype=torch.bool))
    parent, child = torch.randint(7, (50,), generator=g), torch.randint(3, 12, (50,), generator=g)
    for chosen in asks:
        rows = on[chosen[group]]
        totals = counts.over(chosen)
        assert torch.equal(totals.pair, (rows[:, :7].T @ rows[:, 3:]).int())
        assert torch.equal(totals.latent, rows.sum(0).long()) and totals.rows == rows.shape[0]
        few = counts.over(chosen, dense=False)
        assert few.pair is None
        assert torch.equal(few.cofires(parent, child, 3), (rows[:, parent] * rows[:, child]).sum(0).double())
    assert counts.rows.tolist() == torch.bincount(group, minlength=n_groups).tolist()


def test_document_halves_keep_every_document_on_one_side():
    doc = torch.randint(100, (5000,), generator=torch.Generator().manual_seed(4))
    half = validate.document_halves(doc)
    for d in torch.unique(doc).tolist():
        assert half[doc == d].unique().numel() == 1
    assert torch.unique(doc[half]).numel() == 50


def test_cluster_bootstrap_resamples_parents_not_links():
    """Ten parents with twenty links each, every link of a parent scoring the same (0 or 1): the links are not
    200 independent draws, and the interval must be as wide as one over ten."""
    values = torch.tensor([float(p % 2) for p in range(10) for _ in range(20)])
    parents = torch.tensor([p for p in range(10) for _ in range(20)])
    clustered = validate.cluster_bootstrap_mean(values, parents, reps=4000)
    naive = validate.bootstrap_mean(values, reps=4000)
    assert clustered.mean == naive.mean == 0.5 and clustered.n == 10
    assert clustered.high - clustered.low > 3 * (naive.high - naive.low)
    assert clustered.high - clustered.low == pytest.approx(2 * 1.96 * 0.5 / 10 ** 0.5, abs=0.12)


def test_null_parents_come_from_earlier_groups_with_a_similar_frequency():
    count = torch.tensor([1000, 900, 100, 90, 80, 5, 50, 40, 30])
    group = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 1])
    parent = torch.tensor([0, 2, 2, 2])
    child = torch.tensor([6, 7, 8, 6])
    null = validate.matched_null_parents(parent, child, count, group, seed=0, window=2)
    assert ((group[null] < group[child]) & (null != parent)).all()
    assert null[0] == 1, "the nearest other latent in frequency to the busiest parent"
    assert set(null[1:].tolist()) <= {3, 4, 1, 0, 5}


def test_treesae_pairs_take_each_dense_parents_best_children():
    """Latents 0 and 1 are the dense half's top; 0 covers 2 and 3 completely, 1 covers 3 partly."""
    n = 2000
    dense = torch.zeros(n, 4)
    dense[:1200, 0] = 1.0
    dense[800:1800, 1] = 1.0
    dense[:200, 2] = 1.0
    dense[1000:1300, 3] = 1.0
    sp = sparse_of(dense)
    parent, child = validate.treesae_pairs(sp, validate._stats(sp))
    got = set(zip(parent.tolist(), child.tolist()))
    assert {(0, 2), (0, 3), (1, 3), (0, 1), (1, 0)} >= got >= {(0, 2), (0, 3), (1, 3)}
    assert all(p in (0, 1) for p, _ in got)


def test_probe_ranks_count_the_rows_nearer_the_direction():
    W = torch.eye(4)
    directions = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.9, 0.1, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    rank_p, rank_c = hierarchy.probe_ranks(directions, W, torch.tensor([0, 1]), torch.tensor([2, 2]))
    assert rank_c.tolist() == [0, 0] and rank_p.tolist() == [1, 2]


def test_probe_ranks_agree_with_counting_every_row_over_chunks_and_ties():
    g = torch.Generator().manual_seed(6)
    W = torch.randn(300, 8, generator=g)
    W[10] = W[11]  # a tie: two decoder rows alike
    directions = torch.randn(300, 8, generator=g)
    parent, child = torch.randint(300, (2000,), generator=g), torch.randint(300, (2000,), generator=g)
    parent[:20] = 10
    rank_p, rank_c = hierarchy.probe_ranks(directions, W, parent, child, chunk=37)
    sims = hierarchy.unit_rows(directions)[child] @ hierarchy.unit_rows(W).T
    assert torch.equal(rank_p, (sims > sims.gather(1, parent[:, None])).sum(1))
    assert torch.equal(rank_c, (sims > sims.gather(1, child[:, None])).sum(1))


def test_the_tree_from_counts_is_the_links_tables_tree():
    g = torch.Generator().manual_seed(5)
    dense = torch.rand(3000, 40, generator=g) * (torch.rand(3000, 40, generator=g) < 0.15)
    # Latent j >= 8 fires with its parent j % 8 most of the time (and sometimes alone): coverage near 0.5 to 1.
    parent_on = dense[:, torch.arange(8, 40) % 8] > 0
    alone = torch.rand(3000, 32, generator=g) < torch.linspace(0.0, 0.15, 32)
    dense[:, 8:] *= parent_on | alone
    sp = sparse_of(dense)
    from msae.analysis.features import histogram_edges, latent_stats

    stats = latent_stats(sp, histogram_edges(sp.vals, 4))
    counts = validate.cofire_counts(sp, torch.zeros(3000, dtype=torch.long), 1, [8, 40])
    for cfg in (LinkConfig(min_coverage=0.5, min_lift=1.0, min_child_fires=5, min_cofires=3),
                LinkConfig(min_coverage=0.7, min_lift=1.0, min_child_fires=5, min_cofires=3),
                LinkConfig(min_coverage=0.5, min_lift=1.0, min_child_fires=5, min_cofires=3, min_reverse=0.12,
                           max_parent_density=0.15)):
        links = hierarchy.nested_links(sp, [8, 40], stats, torch.randn(40, 6, generator=g), cfg)
        want = links[links["tree"]].sort_values("child")[["parent", "child"]].reset_index(drop=True)
        parent, child = validate.rule_tree(validate.candidate_figures(counts, counts.over(torch.tensor([True])), 3), cfg)
        got = pd.DataFrame({"parent": parent.numpy(), "child": child.numpy()}).sort_values("child")
        assert len(want) > 0
        pd.testing.assert_frame_equal(got.reset_index(drop=True), want, check_dtype=False)


def test_parent_density_and_reverse_bounds_refuse_a_hub():
    """Latent 0 fires on half of all rows and on every row of children 2 and 3; latent 1 fires on a tenth, on all
    of child 2's rows. The density bound leaves 2 under 1 and 3 without a parent; the P(c | p) floor does too."""
    n = 4000
    dense = torch.zeros(n, 4)
    dense[: n // 2, 0] = 1.0
    dense[:400, 1] = 1.0
    dense[:200, 2] = 1.0
    dense[1000:1040, 3] = 1.0
    dense[3000:3010, 1:3] = 0.0
    sp = sparse_of(dense)
    counts = validate.cofire_counts(sp, torch.zeros(n, dtype=torch.long), 1, [2, 4])
    fig = validate.candidate_figures(counts, counts.over(torch.tensor([True])), 1)
    loose = LinkConfig(min_lift=1.5, min_child_fires=5, min_cofires=5)
    assert set(zip(*(t.tolist() for t in validate.rule_tree(fig, loose)))) == {(1, 2), (0, 3)}
    for strict in (LinkConfig.from_json({**loose.to_json(), "max_parent_density": 0.2}),
                   LinkConfig.from_json({**loose.to_json(), "min_reverse": 0.1})):
        assert set(zip(*(t.tolist() for t in validate.rule_tree(fig, strict)))) == {(1, 2)}
