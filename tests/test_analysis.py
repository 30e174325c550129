"""Feature analysis: co-activation against a dense reference, the hierarchy and splitting on a toy with known
parents and children, and the feature store on the real SmolLM2 over a small cache."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from msae import io, toy
from msae.run import Run
from msae.activations import MANIFEST, SHARD_TENSORS, extract, iter_shards
from msae.config import AnalyzeConfig, ExtractConfig
from explorer import search
from msae.analysis import hierarchy, validate
from msae.analysis.analyze import AnalysisError, analyze
from msae.analysis.store import StoreError, load_store
from msae.analysis import coact
from msae.analysis.coact import coactivation
from msae.analysis.features import latent_stats, histogram_edges
from msae.analysis.inference import text_latents, top_latents
from msae.analysis.matching import match
from msae.analysis.stream import Sparse, encode_rows, rank_within, stream
from msae.sae import SAE

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "default"


def random_sparse(n_rows: int, d_sae: int, k: int, seed: int) -> tuple[Sparse, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    dense = torch.zeros(n_rows, d_sae, dtype=torch.float64)
    idx = torch.rand(n_rows, d_sae, generator=g).topk(k, dim=1).indices
    dense.scatter_(1, idx, torch.rand(n_rows, k, generator=g, dtype=torch.float64) + 0.1)
    dense[::7] = 0  # some rows with nothing active
    nz = dense.nonzero()
    row_ptr = torch.zeros(n_rows + 1, dtype=torch.long)
    row_ptr[1:] = torch.bincount(nz[:, 0], minlength=n_rows).cumsum(0)
    return Sparse(row_ptr, nz[:, 1].int(), dense[nz[:, 0], nz[:, 1]].float(), d_sae), dense


@pytest.mark.parametrize("parent_block", [512, 7], ids=["one-block", "blocks-of-7-parents"])
def test_coactivation_matches_dense_products(parent_block):
    """Every sum of every pair against dense products, in one block of parents or many; the pairs come sorted by
    parent then child; counts_only gives the counts."""
    par, dp = random_sparse(3000, 96, 9, seed=0)
    chi, dc = random_sparse(3000, 160, 12, seed=1)
    pairs = coactivation(par, chi, parent_limit=64, child_from=20, parent_block=parent_block)
    counted = coactivation(par, chi, parent_limit=64, child_from=20, parent_block=parent_block, counts_only=True)
    assert torch.equal(counted.parent, pairs.parent) and torch.equal(counted.child, pairs.child)
    assert torch.equal(counted.count, pairs.count) and not counted.dot.any()
    key = pairs.parent * 1000 + pairs.child
    assert bool((key.diff() > 0).all()), "sorted by parent, then child, each pair once"
    a, b = dp[:, :64].double(), dc[:, 20:].double()
    dp, dc = a.float().double(), b.float().double()  # the stored values are float32
    want = {"dot": dp.T @ dc, "parent_sq": (dp**2).T @ (dc > 0).double(), "count": (dp > 0).double().T @ (dc > 0).double(),
            "child_sum": (dp > 0).double().T @ dc}
    for name, ref in want.items():
        got = torch.zeros_like(ref)
        got[pairs.parent, pairs.child - 20] = getattr(pairs, name).double()
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    assert pairs.parent.numel() == int((want["count"] > 0).sum())


def test_a_product_whose_entries_come_out_otherwise_is_matched_by_key():
    """values_of matches another product's entries by (row, column) when they do not come out in the same order,
    and gives 0 where that product has no entry."""
    left = torch.tensor([[1.0, 0.0, 2.0], [0.0, 3.0, 0.0]]).to_sparse_csr()
    right = torch.tensor([[1.0, 0.0], [0.0, 5.0], [4.0, 0.0]]).to_sparse_csr()
    both = coact.Product(left, right)  # entries (0, 0) = 9 and (1, 1) = 15
    assert both.row.tolist() == [0, 1] and both.column.tolist() == [0, 1] and both.value.tolist() == [9.0, 15.0]
    other = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]]).to_sparse_csr()  # only (0, 0) = 4
    assert both.values_of(other, right).tolist() == [4.0, 0.0]


def test_pruning_in_blocks_keeps_each_childs_best_candidates():
    sp, _ = random_sparse(3000, 300, 10, seed=3)
    stats = latent_stats(sp, histogram_edges(sp.vals, 8))
    cfg = hierarchy.LinkConfig(keep_per_child=3)
    W_dec = torch.randn(300, 16)
    full = hierarchy.links_table(coactivation(sp, sp), stats, stats, W_dec, W_dec, cfg, sp.n_rows)
    pruned = coactivation(sp, sp, prune=hierarchy.candidate_filter(stats, stats, cfg, sp.n_rows), parent_block=37)
    assert pruned.parent.numel() < coactivation(sp, sp).parent.numel()
    again = hierarchy.links_table(pruned, stats, stats, W_dec, W_dec, cfg, sp.n_rows)
    pd.testing.assert_frame_equal(full.reset_index(drop=True), again.reset_index(drop=True))


def test_rank_within_sorts_float32_scores_once_with_the_same_ranks():
    """The one-sort path for float32 scores gives the two-sort path's ranks: ties (to the earlier pair), -inf,
    negative scores and -0.0 against 0.0 included."""
    g = torch.Generator().manual_seed(7)
    group = torch.randint(0, 50, (4000,), generator=g)
    score = (torch.randint(-3, 6, (4000,), generator=g).float() / 5)
    score[torch.rand(4000, generator=g) < 0.1] = -torch.inf
    score[:40] = -0.0
    score[40:80] = 0.0
    fast = rank_within(group, score)
    assert torch.equal(fast, rank_within(group, score.double()))
    for c in range(50):  # and it is a ranking: 0..n-1 in each group, best first, ties in order
        mine = (group == c).nonzero().squeeze(1)
        want = sorted(range(mine.numel()), key=lambda i: (-score[mine[i]].item(), i))
        assert fast[mine][want].tolist() == list(range(mine.numel()))


def test_link_scores_follow_the_definition():
    """cos(acts_A, acts_B over the rows where B fires) × max(B)/max(A), the ratio capped at 1."""
    sp, dense = random_sparse(2000, 40, 6, seed=2)
    dense = dense.float().double()
    stats = latent_stats(sp, histogram_edges(sp.vals, 8))
    pairs = coactivation(sp, sp)
    score, masked_cos, ratio = hierarchy.score_pairs(pairs, stats, stats)
    for i in torch.randperm(pairs.parent.numel(), generator=torch.Generator().manual_seed(0))[:50].tolist():
        a, b = int(pairs.parent[i]), int(pairs.child[i])
        on = dense[:, b] > 0
        cos = torch.nn.functional.cosine_similarity(dense[on, a], dense[on, b], dim=0)
        expect = cos * (dense[:, b].max() / dense[:, a].max()).clamp_max(1.0)
        assert score[i].item() == pytest.approx(expect.item(), rel=1e-4)


@pytest.fixture(scope="module")
def toy_pair(tmp_path_factory):
    """A Matryoshka SAE and its vanilla twin trained on Chanin et al.'s toy (parent f0, children f1..f3),
    with held-out samples."""
    h = toy.chanin()
    out = tmp_path_factory.mktemp("toy")
    result = toy.compare(h, out_dir=out, **toy.PRESETS["chanin"].train)
    acts, present = h.sample(2**14, torch.Generator().manual_seed(123))
    saes = {name: io.load_sae(out / name, dtype=torch.float32)[0] for name in ("matryoshka", "vanilla")}
    return h, saes, acts, present, result


@pytest.mark.parametrize("criterion", ["coverage", "cosine"])
def test_toy_tree_puts_every_true_child_under_its_true_parent(toy_pair, criterion):
    h, saes, acts, present, result = toy_pair
    sae = saes["matryoshka"]
    latent_of = result.matryoshka.per_feature["latent"]
    sp = encode_rows(sae, acts)
    stats = latent_stats(sp, histogram_edges(sp.vals, 16))
    links = hierarchy.nested_links(sp, sae.widths, stats, sae.W_dec, toy.toy_link_config(criterion))
    tree = links[links["tree"]].set_index("child")["parent"]
    assert h.children
    for child in h.children:
        parent = h.parent_of[child]
        assert tree.get(latent_of[child]) == latent_of[parent], f"feature {child} under the wrong parent"
    # Only true children are linked: no latent of another true feature hangs under a parent. The coverage rule may
    # also link a latent that stands for no single feature but fires only inside the parent's (here one that fires
    # on f0 without a child): by its definition that is a child, so it is left out of this check.
    matched = set(latent_of)
    linked = set(tree.index) if criterion == "cosine" else set(tree.index) & matched
    assert linked == {latent_of[c] for c in h.children}
    if criterion == "coverage":
        extra = links[links["tree"] & ~links["child"].isin(list(matched))]
        assert (extra["parent"] == latent_of[h.parents[0]]).all() and (extra["coverage"] >= 0.99).all()
    cover = hierarchy.coverage(sp, sp, links[links["child"].isin(list(matched))])
    for parent in h.parents:
        on = present[:, parent]
        expected = present[on][:, h.children_of(parent)].any(dim=1).double().mean().item()
        assert cover[latent_of[parent]].item() == pytest.approx(expected, abs=0.05)


def test_toy_splitting_and_absorption_rank_vanilla_worse(toy_pair):
    h, saes, acts, present, result = toy_pair
    share, absorbed = {}, {}
    for name, sae in saes.items():
        latents = torch.tensor([getattr(result, name).per_feature["latent"][p] for p in h.parents])
        alive = torch.ones(len(latents), dtype=torch.bool)
        share[name] = hierarchy.split_share(sae.W_dec[latents], sae.W_dec, alive, (0.5,))["0.5"]
        absorbed[name] = getattr(result, name).parent_absorption
    assert share["vanilla"] > share["matryoshka"]
    assert absorbed["vanilla"] > absorbed["matryoshka"]


def test_a_vanilla_sae_has_no_nested_hierarchy(toy_pair):
    _h, saes, acts, _p, _r = toy_pair
    sae = saes["vanilla"]
    sp = encode_rows(sae, acts)
    with pytest.raises(ValueError, match="two nested widths"):
        hierarchy.nested_links(sp, sae.widths, latent_stats(sp, histogram_edges(sp.vals, 4)), sae.W_dec,
                               hierarchy.LinkConfig())


def test_matching_pairs_identical_and_permuted_dictionaries():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(64, 32, generator=g)
    perm = torch.randperm(64, generator=g)
    W_b = torch.cat([W[perm] + 0.01 * torch.randn(64, 32, generator=g), torch.randn(8, 32, generator=g)])
    pairs = match(W, W_b)
    got = dict(zip(pairs["a"], pairs["b"]))
    assert all(got[int(perm[j])] == j for j in range(64))
    assert len(pairs) == 64  # the 8 random extra rows stay unmatched


# ---- the real model over a small cache -------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_runs(lm, tmp_path_factory):
    """Copies of the shipped runs (their SAEs only) with a small cache of real text on the shipped layer."""
    root = tmp_path_factory.mktemp("runs")
    text = root / "text.txt"
    paragraphs = [
        "The cat sat on the mat while the dog slept by the door. Cats and dogs are common pets in many homes.",
        "def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # Python functions return values",
        "In 1815 the battle of Waterloo ended the Napoleonic wars; the treaty was signed in Vienna.",
        "Photosynthesis converts light energy into chemical energy stored in glucose molecules.",
    ] * 6
    text.write_text("\n\n".join(paragraphs))
    runs = {}
    for name in ("matryoshka", "vanilla"):
        runs[name] = root / name
        runs[name].mkdir()
        for f in ("sae_weights.safetensors", "cfg.json"):
            shutil.copy(ASSETS / name / f, runs[name] / f)
    # ctx_len as the shipped runs record it, so analyze() finds this cache by its key.
    cache = extract(ExtractConfig(corpus=str(text), layer=15, ctx_len=128, tokens=10_000, lm_batch=8, shard_rows=300),
                    lm=lm, root=root / "cache")
    return runs, cache, text


def cache_shards(cache: Path) -> list[dict]:
    """Every shard of an activation cache, in order, as its tensors."""
    return [t for _i, _shard, t in iter_shards(cache, SHARD_TENSORS)]


def _analyze(runs, text, lm, against=("vanilla",), **kw):
    acfg = AnalyzeConfig(corpus=str(text), absorption=False, **kw)
    return analyze(runs["matryoshka"], against=[runs[a] for a in against], acfg=acfg, lm=lm)


def test_store_on_the_real_model_round_trips_and_matches_a_dense_pass(small_runs, lm, monkeypatch):
    runs, cache, text = small_runs
    monkeypatch.setenv("MSAE_ACTIVATION_CACHE", str(cache.parent))
    manifest = _analyze(runs, text, lm)
    store = load_store(runs["matryoshka"])
    assert store.manifest == manifest
    sae = Run(runs["matryoshka"]).load_sae()  # as the analysis loads it (its precision)
    lat = store.latents
    assert len(lat) == sae.d_sae and (lat["group"].diff().fillna(0) >= 0).all()
    assert manifest.rows == sum(s["rows"] for s in json.loads((cache / MANIFEST).read_text())["shards"])

    # Every statistic agrees with a dense pass over the same rows.
    shards = cache_shards(cache)
    x = torch.cat([s["activations"] for s in shards]).float()
    dense = sae.eval().encode(x)
    too_large = x.norm(dim=1) > manifest.max_norm
    assert manifest.high_norm_rows_silenced == int(too_large.sum())
    dense[too_large] = 0
    count = (dense > 0).sum(0)
    assert (lat["count"].to_numpy() == count.numpy()).all()
    torch.testing.assert_close(torch.tensor(lat["max_act"].to_numpy()).float(), dense.max(0).values, rtol=1e-5, atol=1e-5)
    top = store.examples[store.examples["kind"] == "top"]
    for latent in lat.sort_values("count", ascending=False)["latent"].head(25):
        ex = store.examples_of(latent)
        want = dense[:, latent].topk(min(20, int(count[latent]))).values
        torch.testing.assert_close(torch.tensor(ex["act"].to_numpy()).float(), want, rtol=1e-5, atol=1e-5)
        for _, row in ex.iterrows():
            # The window's activations are stored as float16 (for shading), the example's own at full precision.
            assert row["acts"].dtype == np.float16
            assert row["acts"][row["center"]] == pytest.approx(row["act"], rel=1e-3)
            assert row["tokens"][row["center"]] == int(torch.cat([s["token_ids"] for s in shards])[row["row"]])
        q = store.examples_of(latent, "quantile")
        assert len(q) == min(20, int(count[latent])) and (q["act"] <= ex["act"].max() + 1e-6).all()
        assert q.groupby("rank")["act"].min().is_monotonic_increasing
    assert len(top) == int(count.clamp_max(20).sum())
    assert (lat.loc[count.numpy() == 0, "label"] == "").all()  # never-firing latents: no examples, no label
    assert store.examples_of(int(lat.loc[count.numpy() == 0, "latent"].iloc[0])).empty

    # The hierarchy: parents in earlier groups, scores finite, coverage a fraction.
    links = store.links
    assert (links["parent_group"] < links["child_group"]).all() and links["score"].notna().all()
    cov = lat["coverage"].dropna()
    assert ((cov >= 0) & (cov <= 1)).all()
    assert set(manifest.against) == {"vanilla"} and "matching" in store.against["vanilla"].tables
    # The coverage rule validated on held-out documents at every bound of the grid, and the literature's figures
    # with the Tree SAE score.
    names = [c.criterion for c in manifest.link_validation.criteria]
    assert names == [f"coverage, P(p|c) >= {t:g}" for t in validate.COVERAGE_GRID]
    assert manifest.link_validation.split.startswith("documents")
    assert manifest.link_validation.link_rows + manifest.link_validation.measured_rows == manifest.rows
    fig = manifest.hierarchy_figures
    assert fig.criterion == "coverage" and fig.tree_links == int(links["tree"].sum())
    assert fig.treesae_score is None or 0 <= fig.treesae_score <= 1
    assert {"probe_rank_parent", "probe_rank_child", "coverage", "lift", "cosine_score"} <= set(links.columns)
    # A Matryoshka SAE's nested L0 grows with the width.
    assert manifest.l0_per_width == sorted(manifest.l0_per_width)

    # Search finds what the store holds.
    busiest = lat.sort_values("count", ascending=False).iloc[0]
    first = store.examples_of(int(busiest["latent"])).iloc[0]
    centre = store.vocab[int(first["tokens"][first["center"]])]
    assert int(busiest["latent"]) in set(search.by_token(store, centre, n=1000)["latent"])
    assert set(search.by_context_words(store, "Waterloo")["latent"])
    promoted = store.vocab[int(busiest["promoted_ids"][0])]
    assert int(busiest["latent"]) in set(search.by_promoted(store, promoted, n=10_000)["latent"])
    with pytest.raises(search.SearchError, match="does not exist"):
        search.by_id(store, 10**6)


def test_stream_silences_rows_above_the_norm_limit(small_runs):
    runs, cache, _ = small_runs
    sae, _ = io.load_sae(runs["matryoshka"], dtype=torch.float32)
    x = torch.cat([s["activations"] for s in cache_shards(cache)]).float()
    norms = x.norm(dim=1)
    limit = float(norms.median())
    result = stream([sae], cache, max_norm=limit)
    silenced = norms > limit
    assert result.skipped_rows == int(silenced.sum()) > 0 and result.n_rows == x.shape[0]
    sp = result.sparse[0]
    per_row = sp.row_ptr.diff()
    assert (per_row[silenced] == 0).all() and per_row[~silenced].sum() == sp.cols.numel()
    dense = sae.eval().encode(x)
    dense[silenced] = 0
    assert torch.equal(torch.bincount(sp.cols.long(), minlength=sae.d_sae), (dense > 0).sum(0))
    kept_rows = set(result.top.row[result.top.row >= 0].tolist())
    assert kept_rows and not kept_rows & set(silenced.nonzero().squeeze(1).tolist())


def test_stream_keeps_each_latents_largest_activations_across_shards(lm, tmp_path):
    """Shards merge into each latent's top examples; later shards pass only entries that can still enter them.
    Text that does not repeat (prose no corpus holds), one context of 128 tokens a shard."""
    text = tmp_path / "prose.txt"
    prose = Path(__file__).resolve().parents[1] / "benchmarks" / "data" / "fresh_prose.txt"
    text.write_text(prose.read_text()[:4000])
    cache = extract(ExtractConfig(corpus=str(text), layer=15, ctx_len=128, tokens=1000, lm_batch=1, shard_rows=100),
                    lm=lm, root=tmp_path / "cache")
    sae, _ = io.load_sae(ASSETS / "matryoshka", dtype=torch.float32)
    shards = cache_shards(cache)
    assert len(shards) > 3
    x = torch.cat([s["activations"] for s in shards]).float()
    n = 5
    result = stream([sae], cache, top_n=n)
    dense = sae.eval().encode(x)  # (rows, d_sae)
    want = dense.T.topk(n, dim=1).values
    want = torch.where(want > 0, want, torch.full_like(want, -torch.inf))
    top = result.top
    assert torch.equal(torch.isinf(top.key), torch.isinf(want))
    kept = torch.isfinite(want)
    assert torch.allclose(top.key[kept], want[kept], rtol=1e-5, atol=1e-5)
    lat, slot = kept.nonzero(as_tuple=True)
    assert torch.allclose(dense[top.row[lat, slot], lat], top.act[lat, slot], rtol=1e-5, atol=1e-5)


def test_a_cache_whose_rows_point_at_other_contexts_is_refused(small_runs, tmp_path):
    runs, cache, _ = small_runs
    from safetensors.torch import load_file, save_file

    broken = tmp_path / cache.name
    shutil.copytree(cache, broken)
    last = json.loads((broken / MANIFEST).read_text())["shards"][-1]["file"]
    tensors = load_file(str(broken / last))
    tensors["context"] = tensors["context"] - 1  # the shift an extraction resumed mid-batch used to leave
    save_file(tensors, str(broken / last))
    sae, _ = io.load_sae(runs["matryoshka"], dtype=torch.float32)
    with pytest.raises(ValueError, match=rf"{last}: its rows do not point at their tokens"):
        stream([sae], broken)


def test_text_latents_match_the_cache(small_runs, lm):
    runs, cache, text = small_runs
    sae, _ = io.load_sae(runs["matryoshka"], dtype=torch.float32)
    result = text_latents(lm, [sae.eval()], 15, "The cat sat on the <b>mat</b>.")
    assert "".join(result.tokens) == "The cat sat on the <b>mat</b>."
    frame = result.latents[0]
    assert len(frame) and frame["token"].max() < len(result.tokens) and (frame["act"] > 0).all()
    assert top_latents(frame, 5)["max_act"].is_monotonic_decreasing


def test_clear_errors_for_runs_that_cannot_be_analysed(small_runs, lm, tmp_path):
    runs, cache, text = small_runs
    missing = tmp_path / "missing-model"
    shutil.copytree(runs["vanilla"], missing, ignore=shutil.ignore_patterns("features*"))
    cfg = json.loads((missing / "cfg.json").read_text())
    cfg["msae"]["extraction"]["model"] = "/nowhere/no-such-model"
    (missing / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(AnalysisError, match="no-such-model"):
        analyze(missing, acfg=AnalyzeConfig(absorption=False))

    wrong = tmp_path / "wrong-width"
    wrong.mkdir()
    io.save_sae(SAE(64, [32, 128], k=4), wrong)
    with pytest.raises(AnalysisError, match="d_in"):
        analyze(runs["matryoshka"], against=[wrong], acfg=AnalyzeConfig(corpus=str(text), absorption=False), lm=lm)
    with pytest.raises(StoreError, match="msae analyze"):
        load_store(tmp_path / "wrong-width")
