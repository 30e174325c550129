"""`msae export` as a new user meets it: it writes into the run itself or into a directory that holds no SAE yet
(unless --overwrite), under that directory's lock; every refusal is one line, exit status 2, and every run that
was there is byte-for-byte the same after."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from msae.run import LOCK_FILE, Run
from helpers import (copy_shipped, file_hashes, kill_when_paused, paused_at, refused, refused_unchanged, run_cli,
                     shipped_narrow, wait_paused)

NARROW = shipped_narrow()
"""The shipped narrow vanilla run."""


@pytest.fixture
def runs(tmp_path) -> Path:
    """Two shipped runs, with their stores, in a directory of their own."""
    return copy_shipped(tmp_path / "runs", "vanilla", NARROW)


def test_export_into_another_run_is_refused_and_both_stay_as_they_were(runs, capsys):
    line = refused_unchanged(["export", str(runs / "vanilla"), "--to", "saelens", str(runs / NARROW)], capsys,
                             "already holds a run (sae_weights.safetensors)", runs)
    assert "--overwrite" in line
    refused_unchanged(["export", str(runs / "vanilla"), "--to", "dictionary_learning", str(runs)], capsys,
                      "vanilla/sae_weights.safetensors", runs)


def test_export_refuses_its_own_earlier_output_unless_told_to_overwrite(runs, tmp_path, capsys):
    out = tmp_path / "exported"
    assert run_cli(["export", str(runs / "vanilla"), "--to", "saelens", str(out)], capsys)[0] == 0
    refused_unchanged(["export", str(runs / NARROW), "--to", "saelens", str(out)], capsys,
                      "already holds a run", out)
    assert run_cli(["export", str(runs / NARROW), "--to", "saelens", str(out), "--overwrite"], capsys)[0] == 0
    assert Run(out).load_sae().d_sae == Run(runs / NARROW).load_sae().d_sae
    assert sorted(p.name for p in out.iterdir()) == ["cfg.json", "sae_weights.safetensors"], "no lock or temp left"


def test_export_in_place_keeps_the_run_and_its_permissions(runs, capsys):
    run = runs / "vanilla"
    (run / "sae_weights.safetensors").chmod(0o644)
    store = file_hashes(run / "features")
    before = load_file(str(run / "sae_weights.safetensors"))
    assert run_cli(["export", str(run), "--to", "saelens", str(run)], capsys)[0] == 0
    assert stat.S_IMODE((run / "sae_weights.safetensors").stat().st_mode) == 0o644
    after = load_file(str(run / "sae_weights.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert file_hashes(run / "features") == store
    assert not (run / LOCK_FILE).exists() and not [p for p in run.iterdir() if p.name.endswith(".tmp")]


def test_export_in_place_refuses_to_rescale_a_run_beside_its_store(runs, capsys):
    """A run saved before decoder rows were unit (rows 173.5 long, as the shipped runs were): rewritten in place its
    latents would be 173.5 times those its feature store holds."""
    run = runs / "vanilla"
    tensors = load_file(str(run / "sae_weights.safetensors"))
    tensors["W_dec"], tensors["W_enc"] = tensors["W_dec"] * 173.5, tensors["W_enc"] / 173.5
    save_file(tensors, str(run / "sae_weights.safetensors"))
    refused_unchanged(["export", str(run), "--to", "saelens", str(run)], capsys,
                      "feature store (features/)", runs)


def test_export_to_a_path_it_cannot_write_is_one_line(runs, tmp_path, capsys):
    a_file = tmp_path / "taken"
    a_file.write_text("mine")
    refused_unchanged(["export", str(runs / "vanilla"), "--to", "saelens", str(a_file)], capsys,
                      "is a file, not a directory", runs, tmp_path)
    refused_unchanged(["export", str(runs / "vanilla"), "--to", "saelens", str(a_file / "sub")], capsys,
                      "cannot write there (Not a directory)", runs, tmp_path)
    if os.geteuid() != 0:  # root writes anywhere
        locked_dir = tmp_path / "readonly"
        locked_dir.mkdir(mode=0o500)
        refused(["export", str(runs / "vanilla"), "--to", "saelens", str(locked_dir / "out")], capsys,
                "cannot write there (Permission denied)")
    refused_unchanged(["export", str(tmp_path / "nowhere"), "--to", "saelens", str(tmp_path / "out")], capsys,
                      "no such file or directory", runs)
    assert not (tmp_path / "out").exists(), "a refused export leaves no directory"


def _export_process(run: Path, out: Path, point: str, marker: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "msae.cli", "export", str(run), "--to", "saelens", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, **paused_at(point, marker)})


def test_a_second_export_into_the_same_directory_is_refused_while_the_first_writes(runs, tmp_path, capsys):
    out = tmp_path / "exported"
    marker = tmp_path / "paused"
    first = _export_process(runs / "vanilla", out, "export locked", marker)
    try:
        wait_paused(first, marker)
        refused(["export", str(runs / NARROW), "--to", "saelens", str(out)], capsys,
                f"is in use by process {first.pid}")
    finally:
        first.kill()
        first.wait()
    assert not (out / "sae_weights.safetensors").exists()


def test_temp_files_of_a_killed_export_are_swept_by_the_next(runs, tmp_path, capsys):
    out = tmp_path / "exported"
    marker = tmp_path / "paused"
    kill_when_paused(_export_process(runs / "vanilla", out, "files staged", marker), marker)
    staged = [p for p in out.iterdir() if p.name.endswith(".tmp")]
    assert len(staged) == 2 and not (out / "sae_weights.safetensors").exists(), "killed between staging and renaming"
    assert run_cli(["export", str(runs / "vanilla"), "--to", "saelens", str(out)], capsys)[0] == 0
    assert sorted(p.name for p in out.iterdir()) == ["cfg.json", "sae_weights.safetensors"]


def test_ctrl_c_mid_export_is_one_line_and_leaves_nothing(runs, tmp_path):
    out = tmp_path / "exported"
    marker = tmp_path / "paused"
    before = file_hashes(runs)
    # SIGINT's default action restored in the child: a shell without job control starts background jobs (a CI
    # runner's pytest, say) with SIGINT ignored, and an ignored signal stays ignored across exec.
    proc = subprocess.Popen([sys.executable, "-m", "msae.cli", "export", str(runs / "vanilla"), "--to", "saelens",
                             str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **paused_at("files staged", marker)},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    wait_paused(proc, marker)  # both files written to temp names, neither renamed yet
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith("msae export: interrupted; run the same command again to finish"), err
    assert not out.exists(), "its temp files and the directory it made are gone"
    assert file_hashes(runs) == before
