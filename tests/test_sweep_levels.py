"""benchmarks/sweep_levels.py's layouts and its averaging across seeds (the training itself is the engine's, tested
elsewhere)."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import sweep_levels  # noqa: E402


@pytest.mark.parametrize("name, widths", [
    ("m4-1/64", (32, 128, 512, 2048)),
    ("m4-1/32", (64, 208, 640, 2048)),
    ("m4-1/16", (128, 320, 816, 2048)),
    ("m3-1/32", (64, 368, 2048)),
    ("vanilla", (2048,)),
])
def test_layouts_are_the_documented_geometric_levels(name, widths):
    assert sweep_levels.CONFIGS[name].widths(2048) == widths


def test_the_shipped_layout_at_16384_latents_is_what_make_default_trains():
    """The sweep's layout scaled to 16,384 latents; its balance lowered from 0.5 to 0.25, as at 8,192 latents, where
    0.5 let the first group pass 40% of the L0 (benchmarks/results/probe_8192.json)."""
    script = (Path(__file__).resolve().parents[1] / "assets" / "make_default.sh").read_text()
    widths = sweep_levels.CONFIGS[sweep_levels.CHOSEN].widths(16384)
    assert f"WIDTHS=${{WIDTHS:-{','.join(map(str, widths))}}}" in script
    assert f"NARROW=${{NARROW:-{widths[2]}}}" in script
    assert sweep_levels.CONFIGS[sweep_levels.CHOSEN].balance == 0.5
    assert "BALANCE=${BALANCE:-0.25}" in script
    probes = json.loads((Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "probe_8192.json").read_text())
    assert max(probes["1/32 b0.5"]["trajectory"][-1]["l0_share"]) > 0.4
    assert max(probes["1/32 b0.25"]["trajectory"][-1]["l0_share"]) < 0.4


def test_mean_std_averages_numbers_lists_and_dicts_element_wise():
    mean, std = sweep_levels.mean_std([{"a": 1.0, "b": [1.0, 4.0]}, {"a": 3.0, "b": [3.0, 4.0]}])
    assert mean == {"a": 2.0, "b": [2.0, 4.0]}
    assert std["a"] == pytest.approx(2 ** 0.5)
    assert std["b"] == [pytest.approx(2 ** 0.5), 0.0]
    assert sweep_levels.mean_std([5.0]) == (5.0, 0.0)


def test_a_figure_missing_from_any_seed_has_no_mean():
    mean, std = sweep_levels.mean_std([{"w": [0.5, None]}, {"w": [0.7, 0.2]}])
    assert mean["w"][0] == pytest.approx(0.6)
    assert mean["w"][1] is None and std["w"][1] is None
    assert sweep_levels._fmt([0.5, None]) == "0.500/-"


def test_group_share_reads_each_groups_share_of_the_l0_every_n_steps(tmp_path):
    import group_share
    from msae.results import TrainMetrics
    from msae.run import Run

    run = Run(tmp_path / "run")
    run.path.mkdir()
    for step in (50, 100, 150, 200):
        run.append_metrics(TrainMetrics(step=step, tokens=step * 8, elapsed_s=1.0, loss=0.5, mse=[0.4, 0.2],
                                        fvu=[0.6, 0.3], l0=8.0, aux_loss=0.0, dead_fraction=0.0, lr=1e-3,
                                        l0_per_group=[6.0, 2.0] if step < 200 else [2.0, 6.0]))
    got = group_share.trajectory(run.path, every=100)
    assert [g["step"] for g in got] == [100, 200]
    assert got[0]["l0_share"] == [0.75, 0.25] and got[1]["l0_share"] == [0.25, 0.75]
    assert got[1]["fvu"] == [0.6, 0.3]
