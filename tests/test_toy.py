"""The toy hierarchies: the generator's statistics, the absorption metric on hand-built SAEs, the published
pattern (Matryoshka absorbs less than vanilla) and `msae toy` end to end."""

import json
import math

import pytest
import torch

from msae import toy
from msae.cli import main as cli_main
from msae.results import ToyResult
from msae.run import TOY_EVAL_ACTIVATIONS
from msae.sae import SAE

N = 200_000


def sample(t, n=N, seed=0):
    return t.sample(n, torch.Generator().manual_seed(seed))


def test_nabeshima_frequencies_match_the_configured_probabilities():
    t = toy.nabeshima()
    assert t.n_features == 20 and t.n_dims == 20 and t.parents == [0, 1, 2]
    _, present = sample(t)
    freq = present.float().mean(0)
    # 5 binomial standard deviations at p = 0.15 and N = 200k is 0.004.
    torch.testing.assert_close(freq, torch.tensor(t.marginal_probs()), atol=0.005, rtol=0)
    for parent in t.parents:
        kids = t.children_of(parent)
        given_parent = present[present[:, parent]][:, kids]
        assert (given_parent.sum(1) <= 1).all(), "the children of a parent are mutually exclusive"
        torch.testing.assert_close(given_parent.float().mean(0), torch.full((3,), 0.2), atol=0.015, rtol=0)
        assert given_parent.any(1).float().mean().item() == pytest.approx(0.6, abs=0.015)
        assert not present[~present[:, parent]][:, kids].any(), "a child fires only with its parent"


def test_chanin_children_fire_only_with_f0_and_independently_of_each_other():
    t = toy.chanin()
    assert t.n_dims == 50 and t.parent_of == (None, 0, 0, 0)
    torch.testing.assert_close(t.directions @ t.directions.t(), torch.eye(4), atol=1e-6, rtol=0)
    _, present = sample(t)
    torch.testing.assert_close(present.float().mean(0), torch.tensor([0.25, 0.05, 0.05, 0.05]), atol=0.005, rtol=0)
    assert not present[~present[:, 0]][:, 1:].any()
    with_f0 = present[present[:, 0]]
    assert (with_f0[:, 1] & with_f0[:, 2]).float().mean().item() == pytest.approx(0.04, abs=0.005)


def test_activations_are_the_sum_of_present_directions():
    t = toy.ToyHierarchy(8, (None, 0, 0, None), (0.5, 0.3, 0.3, 0.2), magnitude=2.0, seed=3)
    torch.testing.assert_close(t.directions.norm(dim=1), torch.ones(4))
    acts, present = sample(t, n=1000)
    torch.testing.assert_close(acts, 2.0 * present.float() @ t.directions)


def test_invalid_hierarchies_are_refused():
    with pytest.raises(ValueError, match="earlier feature"):
        toy.ToyHierarchy(4, (1, None), (0.5, 0.5))
    with pytest.raises(ValueError, match="sum to"):
        toy.ToyHierarchy(4, (None, 0, 0), (0.5, 0.6, 0.6))
    with pytest.raises(ValueError, match="cannot be orthogonal"):
        toy.ToyHierarchy(2, (None, None, None), (0.1, 0.1, 0.1))


def exact_toy():
    """Nabeshima's hierarchy with orthonormal directions and fixed magnitudes: a perfect SAE reconstructs it exactly."""
    t = toy.nabeshima()
    return toy.ToyHierarchy(t.n_dims, t.parent_of, t.probs, exclusive_children=True, direction_noise=0.0)


def relu_sae(W_enc, b_enc, W_dec):
    sae = SAE(W_enc.shape[0], [W_enc.shape[1]], activation="relu")
    with torch.no_grad():
        sae.W_enc.copy_(W_enc)
        sae.b_enc.copy_(b_enc)
        sae.W_dec.copy_(W_dec)
        sae.b_dec.zero_()
    return sae


def test_a_perfect_sae_scores_no_absorption():
    t = exact_toy()
    acts, present = sample(t, n=20_000)
    # Every magnitude is 1: 2 <d, x> - 1 is 1 for a present feature and -1 for an absent one, with no
    # rounding-error firings in between.
    sae = relu_sae(2 * t.directions.t(), -torch.ones(t.n_features), t.directions)
    m = toy.evaluate(sae, t, acts, present)
    assert m.parent_absorption == 0.0
    assert m.parent_fires_alone == 1.0
    assert m.parent_cosine == pytest.approx(1.0) and m.child_cosine == pytest.approx(1.0)
    assert m.child_fire_rate == 1.0
    assert m.fvu == pytest.approx(0.0, abs=1e-10)
    assert m.l0 == pytest.approx(present.sum().item() / present.shape[0])
    assert m.dead_latents == 0
    assert m.per_feature["latent"] == list(range(t.n_features))


def test_an_absorbing_sae_scores_full_absorption():
    """Each child's latent carries parent + child and the parent's latent is switched off by any child: the
    reconstruction stays exact, but the parent's latent misses every input where a child is present."""
    t = exact_toy()
    acts, present = sample(t, n=20_000)
    d = t.directions
    # As in the perfect SAE, 2 <w, x> - 1 is 1 where a latent should fire and <= -1 elsewhere.
    W_enc, W_dec = 2 * d.t(), d.clone()
    b_enc = -torch.ones(t.n_features + 1)
    for parent in t.parents:
        for child in t.children_of(parent):
            W_enc[:, parent] -= 2 * d[child]
            W_enc[:, child] *= math.sqrt(2)
            b_enc[child] = -math.sqrt(2)
            W_dec[child] = (d[parent] + d[child]) / math.sqrt(2)
    # One more latent that never fires: it must be counted dead.
    W_enc = torch.cat([W_enc, torch.zeros(t.n_dims, 1)], dim=1)
    W_dec = torch.cat([W_dec, d[:1]])
    b_enc[-1] = -1.0
    m = toy.evaluate(relu_sae(W_enc, b_enc, W_dec), t, acts, present)
    assert m.parent_absorption == 1.0
    assert m.per_parent["absorption"] == [1.0, 1.0, 1.0]
    assert m.parent_fires_alone == 1.0
    assert m.child_cosine == pytest.approx(1 / math.sqrt(2), abs=1e-5)
    assert m.child_fire_rate == 1.0
    assert m.fvu == pytest.approx(0.0, abs=1e-10)
    assert m.dead_latents == 1


def test_matryoshka_absorbs_less_than_vanilla_on_nabeshima():
    """Measured with these settings (800 steps of 512, k 1, widths 3,12,20; θ calibrated at the end as in every
    run), parent absorption vanilla vs Matryoshka, seeds 0-4: 0.532/0.123, 0.513/0.089, 0.766/0.337, 0.256/0.108,
    0.566/0.224 (seed 3's gap is the smallest, 0.15; seed 0's 0.41); the Matryoshka parent latent fires alone on
    0.919, 1.000, 0.984, 0.987, 0.983 of its feature's rows. (With the running θ alone, as first measured:
    0.547/0.113, 0.550/0.107, 0.777/0.334, 0.415/0.108, 0.566/0.224 and fires alone > 0.95 on seed 0: the
    calibrated cut, set for BatchTopK's L0 on the whole distribution, is a little higher for the parent latent.)
    The test runs seed 0."""
    result = toy.compare(toy.nabeshima(seed=0), seed=0, steps=800)
    vanilla, matryoshka = result.vanilla.parent_absorption, result.matryoshka.parent_absorption
    assert vanilla - matryoshka > 0.25, (vanilla, matryoshka)
    assert vanilla > 0.4 and matryoshka < 0.25
    assert result.matryoshka.parent_fires_alone > 0.88


def test_msae_toy_json_reports_both_saes_and_writes_their_runs(tmp_path, capsys):
    out = tmp_path / "runs"
    argv = ["toy", "--preset", "chanin", "--steps", "30", "--seed", "1", "--json", "--out", str(out)]
    assert cli_main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["preset"] == "chanin" and result["train"]["steps"] == 30
    assert result["train"]["widths"] == [1, 8] and result["train"]["also_vanilla"]
    for name in ("vanilla", "matryoshka"):
        assert {key for key, _ in toy.TABLE_ROWS} <= result[name].keys()
        assert (out / name / "cfg.json").exists()
    table = toy.format_table(ToyResult.from_json(result))
    assert table.splitlines()[0].split() == ["vanilla", "matryoshka"]
    assert "parent absorption" in table


def test_hungarian_assignment_is_optimal():
    import itertools

    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        score = torch.rand(4, 6, generator=g)
        best = max(itertools.permutations(range(6), 4), key=lambda p: sum(score[i, p[i]] for i in range(4)))
        got = toy.assign(score)
        assert len(set(got.tolist())) == 4
        assert sum(score[i, got[i]] for i in range(4)) == pytest.approx(sum(score[i, best[i]] for i in range(4)))


def test_tree_recovery_scores_a_perfect_and_a_wrong_tree():
    import pandas as pd

    t = toy.deep()
    perm = torch.randperm(t.n_features, generator=torch.Generator().manual_seed(0))
    W_dec = t.directions[perm]  # latent j is feature perm[j]
    latent = {int(f): j for j, f in enumerate(perm.tolist())}
    edges = [(latent[t.parent_of[c]], latent[c]) for c in t.children]
    perfect = pd.DataFrame({"parent": [p for p, _ in edges], "child": [c for _, c in edges], "tree": True})
    r = toy.tree_recovery(t, W_dec, perfect, "coverage")
    assert (r.matched_features, r.true_edges, r.correct_edges) == (24, 18, 18)
    assert r.precision == r.recall == r.f1 == r.best_f1 == 1.0
    # Grandchildren hung under their roots (an ancestor, not the parent): half the edges wrong.
    wrong = perfect.copy()
    for i, c in enumerate(t.children):
        if t.parent_of[t.parent_of[c]] is not None:
            wrong.loc[i, "parent"] = latent[t.parent_of[t.parent_of[c]]]
    r = toy.tree_recovery(t, W_dec, wrong, "coverage")
    assert r.correct_edges == 6 and r.precision == pytest.approx(6 / 18) and r.f1 == pytest.approx(6 / 18)


def test_deep_toy_tree_recovery_per_criterion():
    """The three-level toy (seed 0, 1500 steps, k 1, widths 2,8,24): the trained Matryoshka SAE matches 15 of 24
    features at decoder cosine >= 0.9, so at best half the 18 true edges can be found (best F1 0.667). Measured:
    coverage links F1 0.667 (precision 1.0), the cosine baseline 0.370 (precision 0.556); with 3000 steps 0.667
    against 0.444, and on seed 1 (3000 steps) both 0.462 of a possible 0.500. The training, not the criterion,
    bounds the toy; the test checks that coverage links reach that bound here and never exceed it."""
    result = toy.compare(toy.deep(seed=0), seed=0, **toy.PRESETS["deep"].train)
    by = {r.criterion: r for r in result.tree_recovery}
    assert set(by) == {"coverage", "cosine"}
    cov = by["coverage"]
    assert cov.matched_features >= 12 and cov.best_f1 >= 0.5
    assert cov.f1 >= cov.best_f1 - 0.01 and cov.precision >= 0.9
    assert all(r.f1 <= r.best_f1 + 1e-9 for r in by.values())


def test_cli_analyze_activations_writes_the_links_table(tmp_path, capsys):
    import pandas as pd

    out = tmp_path / "runs"
    assert cli_main(["toy", "--preset", "nabeshima", "--steps", "300", "--out", str(out), "--json"]) == 0
    capsys.readouterr()
    acts_file = out / TOY_EVAL_ACTIVATIONS
    # Toy parents are present on 15-25% of samples: linked at lift 2, as README says (the default 10 is out of reach).
    assert cli_main(["analyze", str(out / "matryoshka"), "--activations", str(acts_file), "--min-lift", "2"]) == 0
    printed = capsys.readouterr().out
    assert "links" in printed and "held-out P(p|c), coverage" in printed
    links = pd.read_parquet(out / "matryoshka" / "features" / "links.parquet")
    assert {"parent", "child", "linked", "tree", "score", "coverage", "lift", "cosine_score"} <= set(links.columns)
    assert links["tree"].any() and (links.loc[links["tree"], "linked"]).all()
    assert (links.groupby("child")["tree"].sum() <= 1).all(), "one tree parent a child"
    report = json.loads((out / "matryoshka" / "features" / "activations_analysis.json").read_text())
    assert report["rows"] == 2**15 and report["tree_links"] == int(links["tree"].sum())
    # A file of the wrong width is refused with both widths named, and the links written before stay.
    from safetensors.torch import save_file

    save_file({"activations": torch.randn(10, 7)}, str(tmp_path / "narrow.safetensors"))
    assert cli_main(["analyze", str(out / "matryoshka"), "--activations", str(tmp_path / "narrow.safetensors")]) != 0
    err = capsys.readouterr().err
    assert "have 7 columns but" in err and "d_in=20" in err
    assert (out / "matryoshka" / "features" / "links.parquet").exists()
