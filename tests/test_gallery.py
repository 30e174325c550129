"""The taxonomy benchmark and the gallery on the real model: copies of the shipped pair and a narrow vanilla SAE
(the Matryoshka SAE's first 2,048 latents, a real dictionary of its own), over a small cache of text that uses the
members of three WordNet categories; the files they write, the CLI report and the Gallery page in AppTest."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from streamlit.testing.v1 import AppTest

from explorer import loaders
from msae import io, toy
from msae.activations import extract
from msae.analysis import gallery as gallery_mod
from msae.analysis.analyze import taxonomy_bench, make_gallery
from msae.cli import ProgressLines
from msae.reports import format_gallery, format_taxonomy_bench
from msae.config import ConfigError, ExtractConfig, GalleryConfig, TaxonomyBenchConfig
from msae.lm import DEFAULT_MODEL
from msae.results import Gallery, ToyResult
from msae.run import Run
from msae.sae import SAE
from msae.taxonomy import load_taxonomy

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "assets" / "default"
CATEGORIES = (13134947, 1503061, 2159955)  # fruit, bird, insect
GALLERY = GalleryConfig(max_rows=6, examples=2)
"""Fewer heatmap rows and examples than the defaults, so that the test sees the config obeyed and saved."""


@pytest.fixture(scope="module")
def lm():
    return loaders._lm(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def made(lm, tmp_path_factory):
    root = tmp_path_factory.mktemp("gallery")
    tax = load_taxonomy(model="smollm2-135m")
    members = tax.members()
    picks = [c for c in tax.categories if c.offset in CATEGORIES]
    assert [c.name for c in picks] == ["fruit", "bird", "insect"]
    sentences = []
    for c in picks:
        for t in sorted(members[c.offset])[:10]:
            w = lm.tokenizer.decode([t])
            sentences += [f"Yesterday I saw{w} near the old house.", f"My friend told me about{w} again.",
                          f"There was{w} in the picture on the wall."]
    text = root / "text.txt"
    text.write_text("\n\n".join(sentences))
    runs = {}
    for name in ("matryoshka", "vanilla"):
        runs[name] = root / "runs" / "pair" / name
        runs[name].mkdir(parents=True)
        for f in ("sae_weights.safetensors", "cfg.json"):
            shutil.copy(ASSETS / name / f, runs[name] / f)
    m, cfg = io.load_sae(runs["matryoshka"], dtype=torch.float32)
    narrow = SAE(m.d_in, [2048], k=m.k, activation=m.activation)
    with torch.no_grad():
        narrow.W_enc.copy_(m.W_enc[:, :2048])
        narrow.b_enc.copy_(m.b_enc[:2048])
        narrow.W_dec.copy_(m.W_dec[:2048])
        narrow.b_dec.copy_(m.b_dec)
        narrow.threshold.copy_(m.threshold[:2048] if m.threshold.numel() > 1 else m.threshold)
    runs["narrow"] = root / "runs" / "pair" / "vanilla-2048"
    io.save_sae(narrow, runs["narrow"], cfg={"msae": cfg["msae"]})
    cache = extract(ExtractConfig(corpus=str(text), layer=15, ctx_len=128, tokens=20_000, lm_batch=8), lm=lm,
                    root=root / "cache")
    heard = []
    small = TaxonomyBenchConfig(background_rows=200, bootstrap_reps=200)
    bench = taxonomy_bench(runs["matryoshka"], [runs["vanilla"]], small, lm=lm, cache=cache,
                            progress=lambda *report: heard.append(report))
    result = make_gallery(runs["matryoshka"], runs["vanilla"], runs["narrow"], config=GALLERY, lm=lm, cache=cache)
    return runs, bench, result, heard


def test_benchmark_writes_every_category_for_both_saes(made):
    runs, result, _g, _p = made
    assert result.categories >= 3 and result.occurrences > 0
    on_disk = json.loads((runs["matryoshka"] / "hierarchy_bench.json").read_text())
    assert on_disk["categories"] == result.categories
    assert [b.name for b in result.saes] == ["matryoshka", "vanilla"]
    for b in result.saes:
        assert len(b.categories) == result.categories
        assert all(0 <= r.average_precision <= 1 and 0 <= r.absorption <= 1 for r in b.categories)
        assert b.average_precision.low <= b.average_precision.mean <= b.average_precision.high
    m = result.saes[0]
    assert len(m.average_precision_per_width) == 4
    assert m.average_precision_per_width[-1] == pytest.approx(m.average_precision.mean)
    assert "matryoshka - vanilla average precision" in result.differences
    v = result.saes[1]
    for measure, field in (("absorption", "absorption"), ("member latents", "member_latents")):
        d = result.differences[f"matryoshka - vanilla {measure}"]  # paired over the same categories
        assert d.n == result.categories and d.low <= d.mean <= d.high
        assert d.mean == pytest.approx(sum(getattr(a, field) - getattr(b, field)
                                           for a, b in zip(m.categories, v.categories)) / result.categories)
    for b in result.saes:  # absorption split into how often a member latent fires and the parent's silence then
        assert all(r.absorption <= r.member_fired <= 1 for r in b.categories)
        assert b.member_fired.mean == pytest.approx(sum(r.member_fired for r in b.categories) / result.categories)
        given = [r.absorption / r.member_fired for r in b.categories if r.member_fired > 0]
        assert (b.absorption_given_member is None) == (not given)
        if given:
            assert b.absorption_given_member.n == len(given)
            assert b.absorption_given_member.mean == pytest.approx(sum(given) / len(given))
    both = [(a.absorption / a.member_fired) - (b.absorption / b.member_fired)
            for a, b in zip(m.categories, v.categories) if a.member_fired > 0 and b.member_fired > 0]
    d = result.differences.get("matryoshka - vanilla absorption where a member latent fires")
    assert (d is None) == (not both)  # paired over the categories where a member latent fires in both
    if both:
        assert d.n == len(both) and d.mean == pytest.approx(sum(both) / len(both))
    report = format_taxonomy_bench(result)
    assert "parent AP" in report and "matryoshka - vanilla" in report and "where it does, the parent" in report


def test_benchmark_reports_each_stage_to_its_end(made):
    _r, result, _g, heard = made
    stages = list(dict.fromkeys(stage for stage, _d, _t in heard))
    assert stages[0] == "member occurrences (cache shards)" and stages[-2:] == ["matryoshka (categories)",
                                                                               "vanilla (categories)"]
    for stage in stages:
        counts = [(done, total) for s, done, total in heard if s == stage]
        assert [d for d, _t in counts] == sorted(d for d, _t in counts), f"{stage} counts up"
        assert counts[-1][0] == counts[-1][1], f"{stage} reaches its total"
    assert [t for s, _d, t in heard if s == "vanilla (categories)"][-1] == result.categories


def test_progress_lines_keep_a_stages_ends_and_thin_out_the_rest(capsys):
    now = [0.0]
    say = ProgressLines("hierarchy-bench", every=5.0, clock=lambda: now[0])
    for done in range(1, 101):  # a count a second
        now[0] = float(done)
        say("stage a", done, 100)
    say("stage b", 1, 2)
    # The first count, then one every five seconds, the last, and the next stage's first at once.
    assert capsys.readouterr().err.splitlines() == [f"msae hierarchy-bench: stage a {done}/100" for done in
                                                    [*range(1, 100, 5), 100]] + ["msae hierarchy-bench: stage b 1/2"]


def test_gallery_cases_hold_consistent_tables(made):
    runs, _b, result, _p = made
    assert (runs["matryoshka"] / "gallery.json").exists()
    assert Run(runs["matryoshka"]).result(Gallery).config == GALLERY, "the bars are saved with the cases"
    assert all(len(c.rows) <= GALLERY.max_rows and len(c.examples) <= GALLERY.examples for c in result.cases)
    assert result.runs == {"matryoshka": "matryoshka", "wide": "vanilla", "narrow": "vanilla-2048"}
    kinds = {c.kind for c in result.cases} | set(result.missing)
    assert kinds == {"absorption", "splitting"}
    for case in result.cases:
        n_cols = len(case.columns)
        assert n_cols >= 2 and len(case.column_latents) == len(case.column_runs) == n_cols
        assert len(case.heatmap) == len(case.rows) >= 1 and all(len(r) == n_cols for r in case.heatmap)
        assert len(case.decoder_cos) == n_cols and all(c[i] == pytest.approx(1.0, abs=1e-4)
                                                       for i, c in enumerate(case.decoder_cos))
        assert all(0 <= ex.center < len(ex.tokens) and len(ex.acts) == n_cols for ex in case.examples)
        assert case.reading and case.why
    splitting = next(c for c in result.cases if c.kind == "splitting")
    assert splitting.column_runs[0] == "vanilla-2048" and "matryoshka" in splitting.column_runs
    # The split latent fires on every token shown (rows are the tokens it fires on most).
    assert all(row[0] > 0 for row in splitting.heatmap)
    absorption = next((c for c in result.cases if c.kind == "absorption"), None)
    if absorption is not None:
        # The top row is an absorbed member (a member latent of the parent's SAE fires there), unless the reading
        # says the shown occurrences hold none; the rows below it are the members the parent fires on most.
        n_main = absorption.column_runs.count(absorption.column_runs[0])
        top = absorption.heatmap[0]
        assert any(v > 0 for v in top[1:n_main]) or "shows no absorption" in absorption.reading, absorption.rows
    assert "splitting" in format_gallery(result)


def test_gallery_page_shows_each_case_or_says_why(made, monkeypatch):
    runs, _b, result, _p = made
    monkeypatch.setenv("MSAE_RUNS", str(runs["matryoshka"].parents[1]))
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=120)
    at.session_state["run"] = str(runs["matryoshka"])
    at.switch_page("pages/7_Gallery.py")
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    headers = [h.value for h in at.header]
    assert headers == ["Reference: toy hierarchies, where absorption is exact", "Absorption", "Splitting"]
    # The reference panel: every toy preset's shipped result, parent by parent, exactly as assets/toy holds it.
    toy_frames = {d.value["toy"].iat[0]: d.value for d in at.dataframe if "toy" in d.value.columns}
    assert set(toy_frames) == {p for p in toy.PRESETS if (REPO / "assets" / "toy" / f"{p}.json").exists()} != set()
    for preset, frame in toy_frames.items():
        shipped = ToyResult.loads((REPO / "assets" / "toy" / f"{preset}.json").read_text())
        assert frame["vanilla: parent silent beside a child"].tolist() == pytest.approx(
            shipped.vanilla.per_parent["absorption"])
        assert frame["Matryoshka: parent silent beside a child"].tolist() == pytest.approx(
            shipped.matryoshka.per_parent["absorption"])
    charts = at.get("plotly_chart")
    assert len(charts) == len(result.cases)
    spec = json.loads(charts[-1].proto.spec)
    case = result.cases[-1]
    assert torch.allclose(torch.tensor(spec["data"][0]["z"]), torch.tensor(case.heatmap), atol=1e-6)
    verdicts = [m.value for m in at.success] + [m.value for m in at.warning]
    assert len(verdicts) == len(result.cases)
    for kind in result.missing:
        assert any(kind in i.value for i in at.info)
    # The wide run is in the gallery too, so its page shows it; a run in no gallery gets how to make one.
    bare = runs["matryoshka"].parents[1] / "other" / "bare"
    bare.mkdir(parents=True, exist_ok=True)
    for f in ("sae_weights.safetensors", "cfg.json"):
        shutil.copy(runs["vanilla"] / f, bare / f)
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=120)
    at.session_state["run"] = str(bare)
    at.switch_page("pages/7_Gallery.py")
    at.run()
    assert not at.exception and any("msae gallery" in i.value for i in at.info)


def test_a_dense_narrow_latent_is_never_a_clean_splitting_case():
    """The case once shown as clean: a narrow latent on 24% of tokens whose wide counterpart fires on 92% of them,
    with many rare pieces inside it. Dense, or kept whole, is rejected; the same case made specific and split passes.
    The bars are the config's: a looser density bar lets the dense one through."""
    cfg = GalleryConfig()
    clean, why = gallery_mod.splitting_verdict(density=0.24, n_strong=192, union=0.95, kept_whole=0.92, cfg=cfg)
    assert not clean and "24.0% of tokens" in why and "keeps it whole" in why
    clean, why = gallery_mod.splitting_verdict(density=0.24, n_strong=5, union=0.9, kept_whole=0.3, cfg=cfg)
    assert not clean and "fires on 24.0%" in why
    clean, why = gallery_mod.splitting_verdict(density=0.004, n_strong=3, union=0.85, kept_whole=0.4, cfg=cfg)
    assert clean, why
    clean, why = gallery_mod.splitting_verdict(density=0.004, n_strong=3, union=0.85, kept_whole=0.85, cfg=cfg)
    assert not clean and "keeps it whole" in why
    loose = GalleryConfig(specific_density=0.3)
    assert gallery_mod.splitting_verdict(density=0.24, n_strong=5, union=0.9, kept_whole=0.3, cfg=loose)[0]


def test_dense_member_latents_are_dropped_from_absorption_cases():
    density = torch.tensor([0.017, 0.002, 0.0004, 0.3])
    members = [(0, 101), (1, 102), (2, 103), (3, 104)]
    assert gallery_mod.specific_members(members, density, GalleryConfig()) == [(1, 102), (2, 103)]
    assert gallery_mod.specific_members(members, density, GalleryConfig(specific_density=0.02)) == members[:3]


def test_gallery_bars_outside_their_range_are_refused():
    with pytest.raises(ConfigError, match="specific_density must be a share"):
        GalleryConfig(specific_density=1.5).validate()
    with pytest.raises(ConfigError, match="examples must be at least 1"):
        GalleryConfig(examples=0).validate()
