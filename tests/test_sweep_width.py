"""benchmarks/sweep_width.py end to end at tiny sizes: the real SmolLM2 (layer 15) over about a thousand tokens of
sentences about WordNet fruits, birds and insects, pairs at 64 and 128 latents; one pair stopped midway and resumed,
a second invocation that keeps what is done, every figure with its interval, and the figure and table of the
Diagnostics page."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from explorer import figures
from explorer.tables import WIDTH_SWEEP_DIFFERENCES, width_sweep_differences
from msae.config import AbsorptionConfig, ExtractConfig, TaxonomyBenchConfig
from msae.results import AbsorptionResult, TaxonomyBench
from msae.run import Run, checkpoint_path
from msae.taxonomy import load_taxonomy
from msae.train import Trainer, sae_dirs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import sweep_levels  # noqa: E402
import sweep_width  # noqa: E402

CATEGORIES = (13134947, 1503061, 2159955)  # fruit, bird, insect: the taxonomy benchmark needs members in the text
TEMPLATES = ("We found{w} behind the barn this morning.", "Nobody in the village had seen{w} before.",
             "The children drew{w} on the wall of the school.", "The old book had a chapter on{w} and its habits.")
WIDTHS, SEEDS, K, BATCH = [64, 128], [0], 4, 32
SLICE = AbsorptionConfig(letters="abst", per_letter=40)
STOP_AFTER = 15
"""Batches the stopped pair trains on before its stream fails (its last checkpoint is at step 10)."""


class Stopped(Exception):
    """The stream failed (a stand-in for a kill after a checkpoint)."""


class StopsAfter:
    """The sweep's stream that fails after `n` batches: a training stopped midway, after a checkpoint."""

    def __init__(self, source, n: int):
        self.source, self.n = source, n
        self.d_in, self.n_rows = source.d_in, source.n_rows

    def batches(self, start_step, batch_size, seed):
        for i, batch in enumerate(self.source.batches(start_step, batch_size, seed)):
            if i == self.n:
                raise Stopped(f"after {self.n} batches")
            yield batch


@pytest.fixture(scope="module")
def swept(lm, tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep_width")
    members = load_taxonomy(model="smollm2-135m").members()
    words = [lm.tokenizer.decode([t]) for c in CATEGORIES for t in sorted(members[c])[:10]]
    (root / "text.txt").write_text("\n\n".join(t.format(w=w) for t in TEMPLATES for w in words))
    mp = pytest.MonkeyPatch()
    mp.setattr(sweep_levels, "CHECKPOINT_EVERY", 10)
    ecfg = ExtractConfig(corpus=str(root / "text.txt"), layer=15, tokens=20_000, lm_batch=16, shard_rows=300)
    shared = sweep_width.shared_inputs(ecfg, 20_000, SLICE, lm=lm, held_in=2, batch_size=BATCH, root=root / "cache",
                                       taxonomy_cfg=TaxonomyBenchConfig(background_rows=200, bootstrap_reps=200))
    out, runs = root / "sweep_width.json", root / "runs"

    def sweep(**kw):
        return sweep_width.run_sweep(kw.pop("widths", WIDTHS), SEEDS, K, BATCH, 20_000, shared, runs, out, "tiny", **kw)

    first = sweep_width.train_config(WIDTHS[0], K, BATCH, SEEDS[0]).for_rows(shared.source.n_rows)
    stopped = runs / f"w{WIDTHS[0]}-s{SEEDS[0]}"
    with pytest.raises(Stopped):
        Trainer(first, StopsAfter(shared.source, STOP_AFTER), stopped, run_info=shared.run_info).train()
    stopped_at = {name: Run(d).info().steps_done for name, d in sae_dirs(first, stopped).items()}
    result = sweep()
    yield {"sweep": result, "out": out, "runs": runs, "shared": shared, "first": first, "stopped_at": stopped_at,
           "again": sweep}
    mp.undo()


def test_every_pair_holds_every_figure_with_intervals_around_their_points(swept):
    sweep = swept["sweep"]
    assert json.loads(swept["out"].read_text())["tiny"] == sweep
    assert sorted(sweep["runs"], key=int) == [str(w) for w in WIDTHS]
    settings = sweep["settings"]
    assert sweep["runs"]["64"]["0"]["widths"]["matryoshka"] == [2, 6, 20, 64], "the shipped layout at 64 latents"
    assert settings["steps"] == settings["training_rows"] // BATCH and settings["passes"] <= 1, "one pass"
    for width in WIDTHS:
        entry = sweep["runs"][str(width)]["0"]
        assert entry["widths"] == {"matryoshka": list(sweep_width.LAYOUT.widths(width)), "vanilla": [width]}
        for arch in sweep_width.ARCHS:
            a = entry[arch]
            run = Run(Path(entry["run"]) / arch)
            assert run.info().steps_done == entry["steps"] == settings["steps"]
            assert len(a["quality"]["heldout_fvu"]) == len(entry["widths"][arch])
            assert 0 < a["quality"]["heldout_fvu"][-1] < 1.5 and 0 < a["quality"]["l0"]
            assert 0 <= a["quality"]["dead_fraction"] <= 1
            intervals = [a["taxonomy"]["average_precision"], a["taxonomy"]["absorption"], a["taxonomy"]["member_latents"],
                         a["first_letter"]["absorption_fraction"], a["first_letter"]["full_absorption_rate"]]
            for x in intervals:
                assert x["low"] <= x["mean"] <= x["high"], x
            assert a["taxonomy"]["absorption"]["n"] == len(a["taxonomy"]["categories"]) == entry["taxonomy"]["categories"] >= 3
            assert a["taxonomy"]["member_latents"]["mean"] == pytest.approx(
                sum(c["member_latents"] for c in a["taxonomy"]["categories"]) / entry["taxonomy"]["categories"])
            letters = a["first_letter"]["letters"]
            assert a["first_letter"]["absorption_fraction"]["n"] == len(letters) >= 1
            assert a["first_letter"]["absorption_fraction"]["mean"] == pytest.approx(sum(letters.values()) / len(letters))
        assert entry["difference"].keys() == WIDTH_SWEEP_DIFFERENCES.keys()
        m, v = (entry[arch]["taxonomy"]["categories"] for arch in sweep_width.ARCHS)
        # Absorption where a member latent fires: paired over the categories where one fires in both SAEs.
        both = [a["absorption"] / a["member_fired"] - b["absorption"] / b["member_fired"]
                for a, b in zip(m, v) if a["member_fired"] > 0 and b["member_fired"] > 0]
        given = entry["difference"]["absorption_given_member"]
        assert (given is None) == (not both)
        if both:
            assert given["n"] == len(both) and given["mean"] == pytest.approx(sum(both) / len(both))
        for name, x in entry["difference"].items():
            if x is not None or name != "absorption_given_member":
                assert x["low"] <= x["mean"] <= x["high"], (name, x)
        assert entry["difference"]["member_fired"]["mean"] == pytest.approx(
            sum(a["member_fired"] - b["member_fired"] for a, b in zip(m, v)) / len(m))
        assert entry["difference"]["taxonomy_absorption"]["mean"] == pytest.approx(
            sum(a["absorption"] - b["absorption"] for a, b in zip(m, v)) / len(m))
        assert [c["category"] for c in m] == [c["category"] for c in v], "paired over the same categories"
        ml, vl = (entry[arch]["first_letter"]["letters"] for arch in sweep_width.ARCHS)
        assert ml.keys() == vl.keys()
        assert entry["difference"]["first_letter_absorption"]["mean"] == pytest.approx(
            sum(ml[x] - vl[x] for x in ml) / len(ml))
        validity = entry["first_letter"]["validity"]
        assert validity["valid"] is False and "SAEBench" in validity["note"]
        # The pair's own files hold the same results as `msae hierarchy-bench` and `msae absorption` write them.
        matryoshka = Run(Path(entry["run"]) / "matryoshka")
        assert matryoshka.result(TaxonomyBench).saes[1].absorption.mean == entry["vanilla"]["taxonomy"]["absorption"]["mean"]
        assert set(matryoshka.result(AbsorptionResult).saes) == {"matryoshka", "vanilla"}
    spread = sweep["by_width"][str(WIDTHS[1])]
    assert spread["seeds"] == ["0"]
    assert spread["vanilla"]["mean"]["taxonomy_absorption"] == sweep["runs"][str(WIDTHS[1])]["0"]["vanilla"]["taxonomy"]["absorption"]["mean"]
    assert spread["vanilla"]["std"]["taxonomy_absorption"] == 0.0


def test_a_pair_stopped_midway_resumes_from_its_checkpoint(swept):
    first, stopped_at = swept["first"], swept["stopped_at"]
    assert set(stopped_at.values()) == {10}, "the stop left the snapshot of step 10"
    entry = swept["sweep"]["runs"][str(WIDTHS[0])]["0"]
    assert entry["trained_now"] and entry["resumed"]
    other = swept["sweep"]["runs"][str(WIDTHS[1])]["0"]
    assert other["trained_now"] and not other["resumed"]
    for d in sae_dirs(first, Path(entry["run"])).values():
        steps = [m.step for m in Run(d).metrics()]
        assert steps == sorted(set(steps)) and steps[-1] == first.steps, "one metrics line per logged step"
    assert checkpoint_path(Path(entry["run"])).exists()


def test_a_second_invocation_keeps_finished_and_measured_pairs(swept, capsys):
    before = swept["out"].read_text()
    weights = {d: (d / "sae_weights.safetensors").stat().st_mtime_ns for d in swept["runs"].glob("*/*") if d.is_dir()
               and (d / "sae_weights.safetensors").exists()}
    assert len(weights) == 2 * len(WIDTHS)
    swept["again"]()
    assert capsys.readouterr().out.count("trained and measured before: kept") == len(WIDTHS)
    assert swept["out"].read_text() == before
    assert all((d / "sae_weights.safetensors").stat().st_mtime_ns == t for d, t in weights.items())


def test_measuring_again_gives_the_same_figures_without_training(swept):
    before = swept["sweep"]["runs"][str(WIDTHS[0])]["0"]
    again = swept["again"](widths=WIDTHS[:1], measure_again=True)["runs"][str(WIDTHS[0])]["0"]
    assert not again["trained_now"] and not again["resumed"]
    for arch in sweep_width.ARCHS:
        assert again[arch]["taxonomy"] == before[arch]["taxonomy"]
        assert again[arch]["first_letter"] == before[arch]["first_letter"]
        assert again[arch]["quality"]["heldout_fvu"] == pytest.approx(before[arch]["quality"]["heldout_fvu"])
    assert again["difference"] == before["difference"]


def test_a_width_trained_with_other_settings_is_refused(swept):
    shared = swept["shared"]
    with pytest.raises(SystemExit, match="other settings"):
        sweep_width.run_sweep(WIDTHS[:1], SEEDS, K + 1, BATCH, 20_000, shared, swept["runs"], swept["out"], "tiny")


def test_the_figure_draws_both_architectures_with_their_intervals(swept):
    sweep = swept["sweep"]
    fig = figures.width_sweep_figure(sweep).to_plotly_json()
    traces = fig["data"]
    assert [t["name"] for t in traces] == ["matryoshka", "vanilla"] * 2
    for trace, (part, field) in zip(traces, [p for p in figures.WIDTH_SWEEP_PANELS for _ in range(2)]):
        assert [w for w, _s in trace["customdata"]] == WIDTHS  # the width itself, for the hover
        side = -1 if trace["name"] == "matryoshka" else 1  # beside its width, not on it: no interval hides another
        assert [(x - w) * side > 0 and abs(math.log2(x / w)) < 0.1 for x, w in zip(trace["x"], WIDTHS)] == \
            [True] * len(WIDTHS)
        shown = [sweep["runs"][str(w)]["0"][trace["name"]][part][field] for w in WIDTHS]
        assert list(trace["y"]) == pytest.approx([x["mean"] for x in shown])
        assert list(trace["error_y"]["array"]) == pytest.approx([x["high"] - x["mean"] for x in shown])
        assert list(trace["error_y"]["arrayminus"]) == pytest.approx([x["mean"] - x["low"] for x in shown])
    for axis in ("xaxis", "xaxis2"):  # a tick at each measured width, on a log axis
        assert fig["layout"][axis]["type"] == "log" and list(fig["layout"][axis]["tickvals"]) == WIDTHS
    table = width_sweep_differences(sweep)
    assert list(table["width"]) == WIDTHS
    d = sweep["runs"][str(WIDTHS[0])]["0"]["difference"]["taxonomy_absorption"]
    assert table["taxonomy absorption M − V"][0] == f"{d['mean']:.3f} [{d['low']:.3f}, {d['high']:.3f}]"


def test_the_seeds_of_a_width_are_drawn_apart():
    """Three seeds of one width: six points (two architectures), each at its own place around the width and in the
    order Matryoshka's seeds, then vanilla's."""
    figure = {"mean": 0.1, "low": 0.05, "high": 0.15}
    entry = {arch: {part: {field: figure} for part, field in figures.WIDTH_SWEEP_PANELS} for arch in sweep_width.ARCHS}
    sweep = {"runs": {"4096": {str(seed): entry for seed in (2, 0, 1)}}}
    traces = figures.width_sweep_figure(sweep).to_plotly_json()["data"][:2]
    xs = [x for trace in traces for x in trace["x"]]
    assert xs == sorted(xs) and len(set(xs)) == 6
    assert [s for trace in traces for _w, s in trace["customdata"]] == [0, 1, 2] * 2
    assert xs[2] < 4096 < xs[3] and math.isclose(xs[0] * xs[5], 4096 ** 2)


def test_the_readme_table_has_a_row_per_pair_with_the_json_figures(swept):
    sweep = swept["sweep"]
    lines = sweep_width.markdown_table(sweep).splitlines()
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    assert head == list(sweep_width.TABLE_COLUMNS)
    rows = [dict(zip(head, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]
    assert [(r["width"], r["seed"]) for r in rows] == [(f"{w:,}", str(s)) for w in WIDTHS for s in SEEDS]
    for row, width in zip(rows, WIDTHS):
        e = sweep["runs"][str(width)]["0"]
        assert row["held-out FVU M / V"] == " / ".join(f"{e[a]['quality']['heldout_fvu'][-1]:.3f}"
                                                       for a in sweep_width.ARCHS)
        d = e["difference"]["taxonomy_absorption"]
        assert row["taxonomy absorption M − V"] == f"{d['mean']:.3f} [{d['low']:.3f}, {d['high']:.3f}]"
        v = e["vanilla"]["first_letter"]["absorption_fraction"]
        assert row["first-letter absorption V"] == f"{v['mean']:.3f} [{v['low']:.3f}, {v['high']:.3f}]"


def test_a_bf16_sweep_is_an_entry_of_its_own_and_the_table_prints_every_entry(swept, tmp_path):
    """Pairs whose model and encoders ran in bf16 train on another cache with other rounding: they never land beside
    float32 pairs. The float32 entry keeps the name the shipped JSON uses; --table prints every entry; --ship-width
    reads the float32 entry unless told, and names the entries there are when it is missing."""
    sweep = swept["sweep"]
    precision = sweep_width.resolved_precision("auto")
    assert sweep["settings"]["precision"] == precision  # what this machine ran the tiny sweep in
    dirs = sae_dirs(swept["first"], swept["runs"] / f"w{WIDTHS[0]}-s{SEEDS[0]}")
    assert {Run(d).info().compute_dtype for d in dirs.values()} == {precision}
    f32 = sweep_width.sweep_key("large", 15, 32, 10_000_000, 4096)
    assert f32 == sweep_width.sweep_key("large", 15, 32, 10_000_000, 4096, "float32")
    assert f32 in json.loads((Path(sweep_width.__file__).parent / "results" / "sweep_width.json").read_text())
    bf16 = sweep_width.sweep_key("large", 15, 32, 10_000_000, 4096, "bfloat16")
    assert bf16 == f32 + " bf16"
    out = tmp_path / "sweep_width.json"
    out.write_text(json.dumps({bf16: sweep}))
    script = [sys.executable, str(Path(sweep_width.__file__)), "--out", str(out)]
    missing = subprocess.run([*script, "--ship-width"], capture_output=True, text=True)
    assert missing.returncode != 0 and repr(f32) in missing.stderr and repr(bf16) in missing.stderr
    out.write_text(json.dumps({f32: sweep, bf16: sweep}))
    table = subprocess.run([*script, "--table"], capture_output=True, text=True, check=True).stdout
    assert table.count("| width | seed |") == 2
    assert f"### {f32} ({precision})" in table and f"### {bf16} ({precision})" in table


def test_the_spread_across_seeds_counts_the_seeds_whose_interval_excludes_0(swept):
    """With three seeds at a width (the measured pair copied, its differences moved), by_width and the README's
    across-seeds table give each paired difference's mean ± standard deviation over the seeds and how many seeds'
    intervals lie above and below 0; a width with one seed gets no row."""
    sweep = copy.deepcopy(swept["sweep"])
    assert sweep_width.spread_table(sweep) is None, "one seed per width: nothing to spread"
    width = str(WIDTHS[1])
    base = sweep["runs"][width]["0"]
    for seed, (mean, low, high) in {"0": (0.01, 0.004, 0.016), "1": (0.02, 0.01, 0.03),
                                    "2": (-0.01, -0.02, -0.001)}.items():
        entry = copy.deepcopy(base)
        entry["difference"]["taxonomy_absorption"] = {"mean": mean, "low": low, "high": high, "n": 60}
        entry["difference"]["absorption_given_member"] = None if seed == "2" else entry["difference"]["parent_ap"]
        sweep["runs"][width][seed] = entry
    spread = sweep_width.by_width(sweep["runs"])[width]["difference"]
    assert spread["mean"]["taxonomy_absorption"] == pytest.approx(0.02 / 3)
    assert spread["std"]["taxonomy_absorption"] == pytest.approx(0.01527525, abs=1e-7)
    assert spread["seeds_above_0"]["taxonomy_absorption"] == 2 and spread["seeds_below_0"]["taxonomy_absorption"] == 1
    assert spread["mean"]["absorption_given_member"] is None, "a seed without the figure: no mean"
    lines = sweep_width.spread_table(sweep).splitlines()
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [dict(zip(head, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]
    assert [(r["width"], r["seeds"]) for r in rows] == [(f"{WIDTHS[1]:,}", "0, 1, 2")]
    assert rows[0]["taxonomy absorption M − V"] == "+0.007 ± 0.015 (2 above 0, 1 below)"
    assert rows[0]["absorption where a member latent fires M − V"] == "-"


def _difference(mean: float, low: float, high: float) -> dict:
    return {"difference": {"taxonomy_absorption": {"mean": mean, "low": low, "high": high, "n": 60}}}


@pytest.mark.parametrize("by_width, width", [
    ({4096: (-0.01, -0.02, -0.001), 8192: (-0.01, -0.02, -0.002), 16384: (-0.02, -0.03, -0.01)}, 16384),
    ({4096: (-0.01, -0.02, -0.001), 8192: (-0.01, -0.02, -0.002), 16384: (-0.01, -0.03, 0.01)}, 8192),
    ({4096: (0.01, 0.004, 0.02), 8192: (0.002, -0.01, 0.01), 16384: (0.0, -0.01, 0.0)}, 16384),
])
def test_the_shipped_width_is_the_widest_where_vanilla_absorbs_more(by_width, width):
    """README's rule, stated before the sweep ran: the widest shippable width whose paired interval (Matryoshka −
    vanilla taxonomy absorption) lies below 0, else the widest shippable; an upper end at exactly 0 does not count."""
    sweep = {"runs": {str(w): {"0": _difference(*d)} for w, d in by_width.items()}}
    chosen, why = sweep_width.ship_width(sweep)
    assert chosen == width
    assert ("no width" in why) == all(d[2] >= 0 for d in by_width.values())


def test_the_shipped_width_needs_every_shippable_width_measured(tmp_path):
    sweep = {"runs": {"16384": {"0": _difference(0.01, 0.0, 0.02)}, "32768": {"0": _difference(-0.1, -0.2, -0.05)}}}
    with pytest.raises(ValueError, match="4096, 8192"):
        sweep_width.ship_width(sweep)
    sweep["runs"].update({"4096": {"0": _difference(0.0, -0.01, 0.01)},
                          "8192": {"0": _difference(-0.02, -0.03, -0.01)}})
    out = tmp_path / "sweep_width.json"
    out.write_text(json.dumps({sweep_width.sweep_key("large", 15, 32, 10_000_000, 4096): sweep}))
    run = subprocess.run([sys.executable, str(Path(sweep_width.__file__)), "--ship-width", "--out", str(out)],
                         capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "WIDTHS=256,816,2576,8192 NARROW=2576"  # 32,768 is not shippable
    assert "shipped width 8192" in run.stderr
