"""Display tables as the app hands them to Streamlit, which converts every frame to Arrow: a column that mixes
text and numbers fails there (ArrowInvalid in the server log) and the table is shown without its types."""

from pathlib import Path

import pyarrow as pa
import pytest

from explorer import tables
from msae.analysis import taxbench
from msae.results import Interval, TaxonomyBench
from msae.run import Run
from msae.analysis.store import load_store

SHIPPED = Path(__file__).resolve().parents[1] / "assets" / "default" / "matryoshka"


def text(kind: pa.DataType) -> bool:
    """pandas' string columns arrive as string or large_string, depending on pandas' version."""
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def test_hierarchy_figures_convert_to_arrow_with_one_type_per_column():
    measured = load_store(SHIPPED).manifest.hierarchy_figures
    # A second SAE without the figures an SAE of one width lacks: None must stay a missing number, not text.
    bare = type(measured)(criterion=measured.criterion, tree_links=0, p_parent_given_child=None,
                          p_child_given_parent=None, hamming=None, sibling_iou=None, sibling_pairs=0,
                          treesae_score=None, treesae_pairs=0, tree_links_probe_share=None, rows=measured.rows)
    table = tables.hierarchy_figures_table({"matryoshka": measured, "vanilla": bare})
    arrow = pa.Table.from_pandas(table)
    assert text(arrow.schema.field("SAE").type)
    for column in ("P(p|c)", "P(c|p)", "Hamming", "sibling IoU", "Tree SAE score", "tree links passing Eq. 5"):
        assert pa.types.is_floating(arrow.schema.field(column).type), column
    for column in ("tree links", "Tree SAE pairs"):
        assert pa.types.is_integer(arrow.schema.field(column).type), column
    row = table.set_index("SAE").loc["matryoshka"]
    assert row["P(p|c)"] == round(measured.p_parent_given_child, 3)
    assert row["tree links"] == measured.tree_links
    assert table.set_index("SAE")["P(p|c)"].isna().tolist() == [False, True]


def test_published_ranges_are_a_text_table():
    arrow = pa.Table.from_pandas(tables.published_hierarchy_figures())
    assert all(text(f.type) for f in arrow.schema)
    assert "0.65–0.80" in arrow.column("published").to_pylist()


def test_a_model_is_named_as_a_reader_knows_it_not_by_a_machine_path(tmp_path):
    folder = tmp_path / "models" / "my-llama"
    folder.mkdir(parents=True)
    assert tables.model_label(str(folder)) == "my-llama"
    assert tables.model_label("HuggingFaceTB/SmolLM2-135M-Instruct") == "smollm2-135m"
    assert tables.model_label("smollm2-135m") == "smollm2-135m"
    assert tables.model_label("EleutherAI/pythia-70m") == "EleutherAI/pythia-70m"
    assert tables.model_label(None) == "—"


def test_width_sweep_verdicts_say_which_way_each_interval_points():
    def diff(mean, low, high):
        return {"mean": mean, "low": low, "high": high, "n": 60}

    sweep = {"runs": {
        "16384": {"0": {"difference": {"taxonomy_absorption": diff(-0.012, -0.02, -0.004),
                                       "absorption_given_member": diff(-0.04, -0.11, 0.03),
                                       "first_letter_absorption": diff(0.05, -0.01, 0.1)}}},
        "4096": {"0": {"difference": {"taxonomy_absorption": diff(0.01, 0.004, 0.02),
                                      "absorption_given_member": None,  # vanilla has no member latent
                                      "first_letter_absorption": None}}},
    }}
    lines = tables.width_sweep_verdicts(sweep)
    assert lines == [
        "4,096 latents (seed 0), Matryoshka − vanilla: taxonomy absorption 0.010 [0.004, 0.020]: Matryoshka absorbs "
        "more than vanilla.",
        "16,384 latents (seed 0), Matryoshka − vanilla: taxonomy absorption -0.012 [-0.020, -0.004]: Matryoshka "
        "absorbs less than vanilla; absorption where a member latent fires -0.040 [-0.110, 0.030]: no difference (the "
        "interval includes 0); first-letter absorption 0.050 [-0.010, 0.100]: no difference (the interval "
        "includes 0).",
    ]


def test_width_sweep_seed_lines_spread_each_difference_across_the_seeds():
    """Mean ± standard deviation (ddof 1) of the seeds' paired differences and the seeds whose interval lies above
    or below 0; a difference one seed lacks is left out, and a width with one seed gets no line."""
    def diff(mean, low, high):
        return {"mean": mean, "low": low, "high": high, "n": 60}

    sweep = {"runs": {
        "16384": {"0": {"difference": {"taxonomy_absorption": diff(0.01, 0.004, 0.016),
                                       "absorption_given_member": diff(-0.04, -0.11, 0.03)}},
                  "1": {"difference": {"taxonomy_absorption": diff(0.02, 0.01, 0.03),
                                       "absorption_given_member": None}},
                  "2": {"difference": {"taxonomy_absorption": diff(-0.01, -0.02, -0.001),
                                       "absorption_given_member": diff(0.01, -0.05, 0.07)}}},
        "4096": {"0": {"difference": {"taxonomy_absorption": diff(0.01, 0.004, 0.02)}}},
    }}
    spread = tables.seed_spread(sweep["runs"]["16384"])
    assert spread["mean"]["taxonomy_absorption"] == pytest.approx(0.02 / 3)
    assert spread["std"]["taxonomy_absorption"] == pytest.approx(0.01527525, abs=1e-7)
    assert spread["mean"]["absorption_given_member"] is None and spread["std"]["absorption_given_member"] is None
    assert tables.width_sweep_seed_lines(sweep) == [
        "16,384 latents across seeds 0, 1, 2, Matryoshka − vanilla: taxonomy absorption +0.007 ± 0.015 (Matryoshka "
        "more absorbed on 2 of 3 seeds, less on 1).",
    ]


def test_taxonomy_differences_are_said_with_what_the_absorption_interval_says():
    bench = Run(SHIPPED).result(TaxonomyBench)
    first, others = bench.saes[0].name, [b.name for b in bench.saes[1:]]
    bench.differences = {
        taxbench.difference_key(first, others[0], "average precision"): Interval(-0.004, -0.027, 0.021, 60),
        taxbench.difference_key(first, others[0], "absorption"): Interval(0.011, 0.006, 0.016, 60),
        taxbench.difference_key(first, others[0], "member latent fires"): Interval(0.016, 0.011, 0.020, 60),
        taxbench.difference_key(first, others[0], "absorption where a member latent fires"):
            Interval(-0.042, -0.110, -0.025, 60),
        taxbench.difference_key(first, others[1], "absorption"): Interval(-0.001, -0.004, 0.002, 60),
        taxbench.difference_key(first, others[1], "absorption where a member latent fires"): None,  # none fires in both
    }
    assert tables.taxonomy_difference_lines(bench) == [
        f"**{first} − {others[0]}, average precision**: -0.004 [-0.027, 0.021]",
        f"**{first} − {others[0]}, absorption**: 0.011 [0.006, 0.016]: {first} absorbs more than {others[0]}",
        f"**{first} − {others[0]}, member latent fires**: 0.016 [0.011, 0.020]",
        f"**{first} − {others[0]}, absorption where a member latent fires**: -0.042 [-0.110, -0.025]: {first} absorbs "
        f"less than {others[0]}",
        f"**{first} − {others[1]}, absorption**: -0.001 [-0.004, 0.002]: no difference (the interval includes 0)",
    ]
