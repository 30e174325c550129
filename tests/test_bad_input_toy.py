"""`msae toy` and `msae train` as a new user meets them: a new run is written only where no run is, sizes the
machine cannot hold are refused before anything is allocated, and every refusal is one line, exit status 2, with
every run that was there byte-for-byte the same after."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import copy_shipped, refused, refused_unchanged, run_cli
from test_bad_input import acts, train_argv  # noqa: F401 (acts: a fixture)

TOY = ["toy", "--preset", "chanin", "--steps", "5", "--json"]


@pytest.fixture
def shipped(tmp_path) -> Path:
    """The shipped pair, with stores and eval.json, as a training directory holds them."""
    return copy_shipped(tmp_path / "shipped", "matryoshka", "vanilla")


def test_toy_never_writes_over_runs_that_are_there(shipped, tmp_path, capsys):
    line = refused_unchanged([*TOY, "--out", str(shipped)], capsys, "already holds a run", shipped)
    assert "matryoshka/sae_weights.safetensors" in line and "vanilla/sae_weights.safetensors" in line
    own = tmp_path / "toy"
    assert run_cli([*TOY, "--out", str(own)], capsys)[0] == 0
    line = refused_unchanged([*TOY, "--out", str(own)], capsys, "already holds a run", own)
    assert "checkpoint/state.safetensors" in line and "--resume" not in line, "toy has no --resume to offer"


def test_train_never_writes_over_runs_that_are_there(shipped, acts, capsys):
    refused_unchanged(train_argv(acts, shipped), capsys, "already holds a run", shipped)
    refused_unchanged(train_argv(acts, shipped / "matryoshka", "--widths", "64", "--no-also-vanilla"), capsys,
                      "already holds a run (sae_weights.safetensors)", shipped)


def test_toy_outputs_it_cannot_write_are_one_line(tmp_path, capsys):
    a_file = tmp_path / "taken"
    a_file.write_text("mine")
    refused_unchanged([*TOY, "--out", str(a_file)], capsys, "is a file, not a directory", tmp_path)
    refused_unchanged([*TOY, "--out", str(a_file / "sub")], capsys, "cannot write there (Not a directory)", tmp_path)
    if os.geteuid() != 0:  # root writes anywhere
        (tmp_path / "readonly").mkdir(mode=0o500)
        refused([*TOY, "--out", str(tmp_path / "readonly" / "out")], capsys, "cannot write there (Permission denied)")


@pytest.mark.parametrize("more", [["--widths", "100000000"], ["--widths", "8,4000000000"],
                                  ["--batch-size", "1000000000"]])
def test_toy_sizes_beyond_the_machines_memory_are_refused_before_allocating(tmp_path, capsys, more):
    out = tmp_path / "toy"
    refused([*TOY, *more, "--out", str(out)], capsys, "GiB is free: pick smaller sizes")
    assert not out.exists()


@pytest.mark.parametrize("more", [["--widths", "4,8", "--k", "9"], ["--k", "99999999"]])
def test_toy_refuses_a_k_above_its_largest_width(tmp_path, capsys, more):
    out = tmp_path / "toy"
    refused([*TOY, *more, "--out", str(out)], capsys, "k must be between 1 and the largest width")
    assert not out.exists()
