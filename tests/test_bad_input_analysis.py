"""The commands that read a run and write beside it (analyze --activations, absorption, gallery, hierarchy-bench),
and taxonomy and extract, as a new user meets them: settings are checked against the run before any work, a store
another command made is replaced only with --overwrite, and every refusal is one line, exit status 2, with every
run that was there byte-for-byte the same after."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from msae import io
from msae.run import LOCK_FILE, Run
from msae.sae import SAE
from helpers import (copy_shipped, file_hashes, kill_when_paused, paused_at, refused, refused_unchanged, run_cli,
                     shipped_d_sae, wait_paused)

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


@pytest.fixture
def runs(tmp_path) -> Path:
    return copy_shipped(tmp_path / "runs", "matryoshka", "vanilla")


@pytest.fixture
def empty_cache(tmp_path, monkeypatch) -> Path:
    """An activation cache root that a refused command must leave empty: no extraction was started."""
    root = tmp_path / "cache"
    root.mkdir()
    monkeypatch.setenv("MSAE_ACTIVATION_CACHE", str(root))
    return root


def _with_cfg(run: Path, change) -> Path:
    cfg = json.loads((run / "cfg.json").read_text())
    change(cfg)
    (run / "cfg.json").write_text(json.dumps(cfg))
    return run


def test_analyze_activations_never_replaces_the_store_of_the_text_analysis_unasked(runs, tmp_path, capsys):
    acts = tmp_path / "acts.safetensors"
    save_file({"activations": torch.randn(512, 576, generator=torch.Generator().manual_seed(0))}, str(acts))
    run = runs / "matryoshka"
    line = refused_unchanged(["analyze", str(run), "--activations", str(acts)], capsys,
                             "holds the feature store `msae analyze` made", runs)
    assert "--overwrite" in line
    assert run_cli(["analyze", str(run), "--activations", str(acts), "--overwrite"], capsys)[0] == 0
    assert (run / "features" / "activations_analysis.json").exists() and not (run / "features" / "manifest.json").exists()
    assert run_cli(["analyze", str(run), "--activations", str(acts)], capsys)[0] == 0, "its own store it replaces"
    refused_unchanged(["analyze", str(run), "--no-absorption"], capsys,
                      "holds the feature store `msae analyze --activations` made", runs)


def test_absorption_refuses_a_layer_or_model_other_than_the_runs(runs, empty_cache, capsys):
    run = runs / "matryoshka"
    refused_unchanged(["absorption", str(run), "--layer", "3"], capsys,
                      "--layer 3, but the runs record layers {'matryoshka': 15}", runs)
    other = _with_cfg(copy_shipped(runs.parent / "other", "vanilla") / "vanilla",
                      lambda c: c["msae"]["extraction"].update(model="gpt2"))
    refused_unchanged(["absorption", str(run), "--against", str(other)], capsys, "the runs read different models",
                      runs, other)


def test_absorption_without_a_recorded_layer_says_pass_layer(tmp_path, capsys):
    bare = tmp_path / "bare"
    io.save_sae(SAE(576, [64], k=8), bare)
    refused_unchanged(["absorption", str(bare)], capsys, "no run records the layer it was trained on: pass --layer",
                      tmp_path)


def test_gallery_checks_its_runs_before_extracting_anything(runs, empty_cache, capsys):
    refused_unchanged(["gallery", str(runs / "vanilla"), "--against", str(runs / "matryoshka")], capsys,
                      "is not a Matryoshka SAE", runs)
    wide = copy_shipped(runs.parent / "more", "vanilla") / "vanilla"
    wide = wide.rename(wide.with_name("vanilla-same-width"))
    refused_unchanged(["gallery", str(runs / "matryoshka"), "--against", str(runs / "vanilla"), "--narrow", str(wide)],
                      capsys, f"has {shipped_d_sae('vanilla')} latents, not fewer than", runs, wide)
    assert not any(empty_cache.iterdir()), "refused before any extraction"


def test_benchmarks_name_what_to_fix_without_flags_they_do_not_have(runs, tmp_path, capsys):
    bare = tmp_path / "bare"
    io.save_sae(SAE(576, [16, 64], k=8), bare)
    for argv in (["hierarchy-bench", str(bare)], ["gallery", str(bare), "--against", str(runs / "vanilla")]):
        line = refused_unchanged(argv, capsys, "does not record the model and layer", tmp_path)
        assert "--model" not in line and "add them to its cfg.json" in line
    bad = tmp_path / "taxonomy.json"
    bad.write_text("{not json")
    refused_unchanged(["taxonomy-bench", str(runs / "vanilla"), "--taxonomy", str(bad)], capsys,
                      f"{bad}: not a taxonomy JSON", runs)


@NO_CUDA
@pytest.mark.parametrize("command", [["analyze", "RUN", "--no-absorption"], ["hierarchy-bench", "RUN"],
                                     ["gallery", "RUN", "--against", "RUN"], ["extract", "--layer", "3"]])
@pytest.mark.parametrize("device, message", [("cuda", "torch sees no CUDA device here"),
                                             ("banana", "device must be auto, cpu, cuda or cuda:N")])
def test_every_command_refuses_a_device_that_is_not_here(runs, empty_cache, capsys, command, device, message):
    argv = [str(runs / "matryoshka") if a == "RUN" else a for a in command]
    refused_unchanged([*argv, "--device", device], capsys, message, runs)


def test_analyze_of_a_file_or_an_empty_directory_leaves_them_as_they_were(tmp_path, capsys):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    line = refused_unchanged(["analyze", str(a_file)], capsys, "is a file, not a directory", tmp_path)
    assert "--out" not in line
    empty = tmp_path / "empty"
    empty.mkdir()
    refused(["analyze", str(empty), "--no-absorption"], capsys, "holds neither")
    assert list(empty.iterdir()) == [], "no lock file left behind"


# ---- taxonomy ------------------------------------------------------------------------------------------------------

SAMPLE = Path("tests/fixtures/data.noun.sample")


@pytest.mark.parametrize("min_tokens", ["0", "-3"])
def test_taxonomy_refuses_a_minimum_below_one(tmp_path, capsys, min_tokens):
    out = tmp_path / "t.json"
    refused(["taxonomy", "--data-noun", str(SAMPLE), "--min-tokens", min_tokens, "--out", str(out)], capsys,
            "--min-tokens must be at least 1")
    assert not out.exists()


def test_taxonomy_outputs_and_inputs_it_cannot_use_are_one_line(runs, tmp_path, capsys):
    argv = ["taxonomy", "--data-noun", str(SAMPLE), "--out"]
    refused_unchanged([*argv, str(tmp_path)], capsys, "a directory; --out names the file to write", runs)
    a_file = tmp_path / "taken"
    a_file.write_text("mine")
    refused_unchanged([*argv, str(a_file / "t.json")], capsys, "is not a directory", tmp_path)
    refused_unchanged([*argv, str(runs / "vanilla" / "cfg.json")], capsys, "is not what this command writes", runs)
    refused_unchanged(["taxonomy", "--data-noun", str(tmp_path), "--out", str(tmp_path / "t.json")], capsys,
                      "a directory, not WordNet's data.noun file", tmp_path)


# ---- extract -------------------------------------------------------------------------------------------------------


def test_extract_refuses_an_empty_corpus_and_a_layer_the_model_lacks_on_a_line_of_their_own(tmp_path, empty_cache,
                                                                                            capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    refused(["extract", "--corpus", str(empty), "--device", "cpu"], capsys, "the file is empty")
    text = tmp_path / "text.txt"
    text.write_text("A few words of text to extract from.\n\nAnd a second document.")
    line = refused(["extract", "--corpus", str(text), "--layer", "99", "--device", "cpu"], capsys,
                   "layer must be between 0 and 29")
    assert line.startswith("msae extract: error:"), "not glued onto a progress bar"
    assert not any(empty_cache.iterdir())


# ---- kill -9 between the store's two renames -----------------------------------------------------------------------


def test_kill_between_the_stores_renames_keeps_the_last_store_readable_and_the_rerun_restores_it(tmp_path, capsys):
    out = tmp_path / "toy"
    assert run_cli(["toy", "--preset", "chanin", "--steps", "30", "--json", "--out", str(out)], capsys)[0] == 0
    run, acts = out / "matryoshka", out / "eval_activations.safetensors"
    argv = ["analyze", str(run), "--activations", str(acts)]
    assert run_cli(argv, capsys)[0] == 0
    first = (run / "features" / "links.parquet").read_bytes()
    marker = tmp_path / "paused"
    proc = subprocess.Popen([sys.executable, "-m", "msae.cli", *argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, **paused_at("store between renames", marker)})
    kill_when_paused(proc, marker)  # the old store moved aside, the new one not yet in
    assert not (run / "features").exists() and Run(run).store_dir == run / "features.old"
    assert (Run(run).store_dir / "links.parquet").read_bytes() == first, "the last whole store is read"
    assert run_cli(argv, capsys)[0] == 0
    assert (run / "features" / "links.parquet").read_bytes() == first
    assert not (run / "features.old").exists() and not (run / "features.tmp").exists()
    assert not (run / LOCK_FILE).exists()


def test_a_replace_whose_rename_fails_leaves_no_temp_file(tmp_path):
    target = tmp_path / "cfg.json"
    target.mkdir()  # a directory where the file should go: the rename fails
    with pytest.raises(OSError):
        io.atomic_write_text(target, "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.json"]
    assert file_hashes(tmp_path) == {}


# ---- a second pass: mistakes a new user makes with the run, its --against and its layer ---------------------------


@pytest.mark.parametrize("command", [["analyze", "RUN", "--against", "RUN", "--no-absorption"],
                                     ["absorption", "RUN", "--against", "RUN"],
                                     ["hierarchy-bench", "RUN", "--against", "RUN/"],
                                     ["gallery", "RUN", "--against", "RUN"],
                                     ["gallery", "RUN", "--against", "VANILLA", "--narrow", "RUN"]])
def test_a_run_compared_with_itself_is_refused_before_any_work(runs, empty_cache, capsys, command):
    argv = [str(runs / "matryoshka") + a[3:] if a.startswith("RUN") else str(runs / "vanilla") if a == "VANILLA" else a
            for a in command]
    refused_unchanged(argv, capsys, "is the run itself", runs)
    assert not any(empty_cache.iterdir()), "refused before any extraction"


def test_absorption_refuses_two_runs_of_one_name_instead_of_measuring_one(runs, capsys):
    twin = copy_shipped(runs.parent / "elsewhere", "vanilla") / "vanilla"
    refused_unchanged(["absorption", str(runs / "vanilla"), "--against", str(twin)], capsys,
                      "two of the runs have the same name", runs, twin)


def test_analyze_of_a_run_that_is_not_there_says_so(tmp_path, capsys):
    refused(["analyze", str(tmp_path / "nowhere"), "--no-absorption"], capsys, "nowhere: no such run directory")
    assert not (tmp_path / "nowhere").exists()


def test_a_taxonomy_that_is_a_directory_is_named_as_one(runs, capsys):
    refused_unchanged(["hierarchy-bench", str(runs / "vanilla"), "--taxonomy", str(runs)], capsys,
                      "a directory, not a taxonomy JSON", runs)


def test_other_commands_on_a_run_in_use_are_refused_without_offering_flags_they_lack(runs, tmp_path, capsys):
    run, marker = runs / "vanilla", tmp_path / "paused"
    holder = subprocess.Popen([sys.executable, "-m", "msae.cli", "export", str(run), "--to", "saelens", str(run)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env={**os.environ, **paused_at("export locked", marker)})
    try:
        wait_paused(holder, marker)
        for argv in (["absorption", str(run)], ["hierarchy-bench", str(run)], ["analyze", str(run), "--no-absorption"]):
            line = refused(argv, capsys, f"is in use by process {holder.pid}")
            assert "--out" not in line, "these commands have no --out"
    finally:
        holder.kill()
        holder.wait()


# ---- layers and context lengths are checked from the model's config.json, before it loads -------------------------


def test_absorption_checks_the_layer_against_the_models_config_before_loading_it(tmp_path, capsys):
    bare = tmp_path / "bare"
    io.save_sae(SAE(576, [64], k=8), bare)
    code, err = run_cli(["absorption", str(bare), "--layer", "99"], capsys)
    assert code == 2 and "Traceback" not in err, err
    assert "layer must be between 0 and 29 for smollm2-135m, got 99" in err
    assert "Loading weights" not in err, "refused before the model loaded"
    assert sorted(p.name for p in bare.iterdir()) == ["cfg.json", "sae_weights.safetensors"]


@pytest.mark.parametrize("more, message", [(["--layer", "99"], "layer must be between 0 and 29 for smollm2-135m"),
                                           (["--layer", "3", "--ctx-len", "100000000"],
                                            "ctx_len must be at most 8,192 for smollm2-135m")])
def test_extract_checks_layer_and_context_length_before_loading_the_model(tmp_path, empty_cache, capsys, more, message):
    text = tmp_path / "text.txt"
    text.write_text("A few words of text to extract from.\n\nAnd a second document.")
    code, err = run_cli(["extract", "--corpus", str(text), "--device", "cpu", *more], capsys)
    assert code == 2 and "Traceback" not in err and message in err, err
    assert "Loading weights" not in err, "refused before the model loaded"
    assert not any(empty_cache.iterdir())


@pytest.mark.parametrize("corpus, message", [
    ("DIR", "a folder without text files (none ending in .txt, .jsonl, .csv, .parquet)"),
    ("biultin", "biultin: no such file or folder, nor a corpus name (builtin, large)")])
def test_extract_names_a_corpus_it_cannot_read_for_what_it_is(tmp_path, empty_cache, capsys, corpus, message):
    refused(["extract", "--corpus", str(tmp_path) if corpus == "DIR" else corpus, "--device", "cpu"], capsys, message)
    assert not any(empty_cache.iterdir())


def test_taxonomy_refuses_to_write_an_empty_taxonomy_or_where_it_cannot(tmp_path, capsys):
    out = tmp_path / "t.json"
    refused(["taxonomy", "--data-noun", str(SAMPLE), "--min-tokens", str(10**20), "--out", str(out)], capsys,
            "has 100,000,000,000,000,000,000 single-token words: lower --min-tokens")
    assert not out.exists()
    if Path("/proc").is_dir():  # a directory where nothing can be made, even by root
        refused(["taxonomy", "--data-noun", str(SAMPLE), "--out", "/proc/t.json"], capsys,
                "/proc/t.json: cannot write in /proc")
