"""Bad input and crashes, as a user meets them: every mistake gets one line naming the problem and exit status 2,
and nothing is lost (the run directory still loads, earlier checkpoints are unchanged, no litter is left). Kill -9
during training, during a checkpoint write, during extraction and during analysis leaves state that the next run
completes to the same result as an uninterrupted one."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from helpers import kill_when_paused, paused_at, refused, run_cli, wait_until
from msae.activations import MANIFEST, has_manifest, iter_shards
from msae.run import LOCK_FILE, Run, checkpoint_path, lock_holder

D_IN = 16
SMALL = ["--widths", "64,256", "--k", "8", "--batch-size", "256", "--device", "cpu", "--also-vanilla"]


@pytest.fixture
def acts(tmp_path) -> Path:
    path = tmp_path / "acts.safetensors"
    g = torch.Generator().manual_seed(0)
    save_file({"activations": torch.randn(2048, D_IN, generator=g) @ torch.randn(D_IN, D_IN, generator=g)}, str(path))
    return path












def train_argv(acts: Path, out: Path, *more: str, steps: int = 20) -> list[str]:
    return ["train", "--activations", str(acts), "--out", str(out), "--steps", str(steps), *SMALL, *more]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "sae_weights.safetensors"))


@pytest.mark.parametrize("more, message", [
    (["--checkpoint-every", "0"], "checkpoint_every must be positive"),
    (["--log-every", "0"], "log_every must be positive"),
    (["--device", "banana"], "device must be auto, cpu, cuda or cuda:N"),
    (["--dtype", "int8"], "invalid choice: 'int8'"),
    (["--dtype", "foo"], "invalid choice: 'foo'"),
    (["--cache-dtype", "int8"], "invalid choice: 'int8'"),
    (["--ctx-len", "0"], "ctx_len must be at least 2"),
    (["--ctx-len", "1"], "ctx_len must be at least 2"),
    (["--tokens", "0"], "tokens must be positive"),
    (["--outlier-factor", "0"], "outlier_factor must be above 1"),
    (["--decay-fraction", "5"], "decay_fraction must be between 0 and 1"),
    (["--warmup-steps", "-10"], "warmup_steps must be at least 0"),
    (["--k", "0"], "k must be between 1 and the largest width 256"),
    (["--steps", "many"], "invalid int value: 'many'"),
])
def test_settings_out_of_range_are_refused_before_anything_is_written(acts, tmp_path, capsys, more, message):
    out = tmp_path / "run"
    refused(train_argv(acts, out, *more), capsys, message)
    assert not out.exists()


def test_a_device_that_is_not_here_is_refused(acts, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    refused(train_argv(acts, tmp_path / "run", "--device", "cuda"), capsys, "torch sees no CUDA device here")
    assert not (tmp_path / "run").exists()


def test_bad_inputs_and_outputs_name_the_problem(acts, tmp_path, capsys):
    out = tmp_path / "run"
    refused(train_argv(tmp_path, out), capsys, "a directory, not a safetensors file")
    pickled = tmp_path / "acts.pt"
    torch.save({"activations": torch.randn(4, D_IN)}, pickled)
    refused(train_argv(pickled, out), capsys, "never unpickled")
    with open(tmp_path / "acts.pkl", "wb") as f:
        pickle.dump([1, 2, 3], f)
    refused(train_argv(tmp_path / "acts.pkl", out), capsys, "never unpickled")
    empty = tmp_path / "empty.safetensors"
    save_file({"activations": torch.zeros(4096, 0)}, str(empty))
    refused(train_argv(empty, out), capsys, "has shape (4096, 0): it needs rows and columns")
    nan = tmp_path / "nan.safetensors"
    x = torch.randn(4096, D_IN)
    x[3000, 5] = float("nan")
    save_file({"activations": x}, str(nan))
    refused(train_argv(nan, out, steps=1), capsys, "row 3000 of 'activations' holds NaN or Inf")
    assert not out.exists(), "a refused run leaves no empty directory"

    a_file = tmp_path / "taken"
    a_file.write_text("mine")
    refused(train_argv(acts, a_file), capsys, "is a file, not a directory")
    refused(train_argv(acts, a_file / "sub"), capsys, "cannot write there")
    assert a_file.read_text() == "mine"
    refused(["train", "--corpus", str(tmp_path / "nowhere.txt"), "--out", str(out), *SMALL, "--layer", "3"], capsys,
            "nowhere.txt: no such file")
    assert not out.exists()


def test_a_directory_that_is_not_a_model_is_named(tmp_path, capsys):
    (tmp_path / "notamodel").mkdir()
    refused(["train", "--model", str(tmp_path / "notamodel"), "--out", str(tmp_path / "run"), *SMALL], capsys,
            "a directory, but not a transformers model (no config.json)")


def test_analyze_settings_are_checked(capsys):
    refused(["analyze", "assets/default/matryoshka", "--hist-bins", "0"], capsys, "hist_bins must be positive")


def test_resume_refuses_other_activations_and_a_damaged_checkpoint(acts, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(train_argv(acts, out, "--checkpoint-every", "10"), capsys)[0] == 0
    before = weights(out / "matryoshka")
    ckpt = checkpoint_path(out)
    saved = ckpt.read_bytes()

    same_shape = tmp_path / "other.safetensors"
    save_file({"activations": torch.randn(2048, D_IN)}, str(same_shape))
    refused(train_argv(same_shape, out, "--resume", steps=30), capsys, "trained on other activations")
    wider = tmp_path / "wider.safetensors"
    save_file({"activations": torch.randn(2048, 24)}, str(wider))
    refused(train_argv(wider, out, "--resume", steps=30), capsys, "trained on other activations")

    ckpt.write_bytes(saved[: len(saved) // 2])  # a copy cut short
    refused(train_argv(acts, out, "--resume", steps=30), capsys, "cannot be read")
    assert torch.equal(weights(out / "matryoshka")["W_dec"], before["W_dec"]), "the run itself is untouched"
    Run(out / "matryoshka").load_sae()


def test_a_torn_metrics_line_and_stale_temp_files_do_not_block_resume(acts, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(train_argv(acts, out, "--checkpoint-every", "10"), capsys)[0] == 0
    with open(out / "vanilla" / "metrics.jsonl", "a") as f:
        f.write('{"step": 21, "tok')
    stale = checkpoint_path(out).parent / ".state.safetensors.12345.deadbeef.tmp"
    stale.write_bytes(b"half a checkpoint")
    assert run_cli(train_argv(acts, out, "--resume", steps=30), capsys)[0] == 0
    assert not stale.exists(), "the next run sweeps what a crash left"
    assert [m.step for m in Run(out / "vanilla").metrics()][-1] == 30


def _train_process(acts: Path, out: Path, steps: int, checkpoint_every: int, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "msae.cli", *train_argv(acts, out, steps=steps),
                             "--checkpoint-every", str(checkpoint_every), "--log-every", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def test_a_second_writer_is_refused_while_the_first_holds_the_run(acts, tmp_path, capsys):
    out = tmp_path / "run"
    first = _train_process(acts, out, steps=100_000, checkpoint_every=1000)
    try:
        wait_until(lambda: lock_holder(out) is not None)
        err = refused(train_argv(acts, out), capsys, f"is in use by process {first.pid}")
        assert "msae.cli train" in err or "msae" in err
    finally:
        first.kill()
        first.wait()
    assert lock_holder(out) is None, "kill -9 releases the lock: nothing stale"
    assert (out / LOCK_FILE).exists()


def test_kill_9_mid_training_then_resume_gives_the_uninterrupted_weights(acts, tmp_path, capsys):
    straight = tmp_path / "straight"
    assert run_cli(train_argv(acts, straight, "--checkpoint-every", "5", steps=40), capsys)[0] == 0

    out = tmp_path / "killed"
    marker = tmp_path / "paused"
    proc = _train_process(acts, out, steps=40, checkpoint_every=5, env=paused_at("train step 12 rank 0", marker))
    kill_when_paused(proc, marker)  # after the checkpoint of step 10, mid-way to the next
    assert json.loads(safe_open(str(checkpoint_path(out)), "pt").metadata()["msae"])["step"] == 10
    # Killed before the end: the run directory holds its last checkpoint's snapshot, not a finished run.
    assert Run(out / "matryoshka").info().steps_done < 40
    assert run_cli(train_argv(acts, out, "--checkpoint-every", "5", "--resume", steps=40), capsys)[0] == 0
    for name in ("matryoshka", "vanilla"):
        a, b = weights(straight / name), weights(out / name)
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)


def test_kill_9_during_checkpoint_writes_leaves_a_checkpoint_that_loads(acts, tmp_path):
    """A checkpoint every step, killed at 8 moments: whenever the kill lands (inside a write or not), the file in
    place is a whole checkpoint of some step."""
    out = tmp_path / "run"
    ckpt = checkpoint_path(out)

    def step() -> int:
        return json.loads(safe_open(str(ckpt), "pt").metadata()["msae"])["step"] if ckpt.exists() else 0

    steps_seen = []
    for attempt in range(8):
        log = tmp_path / f"attempt-{attempt}.log"
        with open(log, "w") as err:
            proc = subprocess.Popen([sys.executable, "-m", "msae.cli", *train_argv(acts, out, steps=100_000),
                                     "--checkpoint-every", "1", "--log-every", "1", *(["--resume"] if attempt else [])],
                                    stdout=subprocess.DEVNULL, stderr=err, env={**os.environ, "OMP_NUM_THREADS": "1"})
        start = step()

        def three_more_steps() -> bool:
            assert proc.poll() is None, f"attempt {attempt} ended ({proc.returncode}): {log.read_text()[-2000:]}"
            return step() > start + 2

        # A deadline, not a wait: on a machine busy enough to miss it the log says how far the run got.
        wait_until(three_more_steps, timeout=600, explain=lambda: log.read_text()[-2000:])
        time.sleep(0.013 * attempt)  # where the kill lands within a step: any moment is a valid one
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        with safe_open(str(ckpt), "pt") as f:
            steps_seen.append(json.loads(f.metadata()["msae"])["step"])
            assert all(f.get_tensor(k).isfinite().all() for k in f.keys() if f.get_tensor(k).is_floating_point())
    assert steps_seen == sorted(steps_seen) and steps_seen[-1] > steps_seen[0]


# ---- kill -9 of the real model's extraction and of an analysis -----------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    docs = [" ".join(f"Sentence {i} of part {d} talks about topic {i % 7}, the number {i * i} and a {['cat', 'river', 'song'][i % 3]}."
                     for i in range(40)) for d in range(6)]
    path.write_text("\n\n".join(docs))
    return path


EXTRACT = ["--model", "smollm2-135m", "--layer", "3", "--tokens", "900", "--ctx-len", "32", "--lm-batch", "2",
           "--shard-rows", "100", "--device", "cpu"]


def _cache_rows(cache_root: Path) -> dict[tuple[int, int], torch.Tensor]:
    """Every row of the one cache under `cache_root`, keyed by (context, position)."""
    (cache,) = [p for p in cache_root.iterdir() if has_manifest(p)]
    rows = {}
    for _i, _shard, t in iter_shards(cache, ["context", "position", "activations"]):
        for c, p, a in zip(t["context"].tolist(), t["position"].tolist(), t["activations"]):
            rows[(c, p)] = a
    return rows


def test_kill_9_during_extraction_then_the_rerun_equals_an_uninterrupted_cache(corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MSAE_ACTIVATION_CACHE", str(tmp_path / "straight"))
    assert run_cli(["extract", "--corpus", str(corpus), *EXTRACT], capsys)[0] == 0

    killed = tmp_path / "killed"
    marker = tmp_path / "paused"
    proc = subprocess.Popen([sys.executable, "-m", "msae.cli", "extract", "--corpus", str(corpus), *EXTRACT],
                            env={**os.environ, "MSAE_ACTIVATION_CACHE": str(killed),
                                 **paused_at("extract shard 2", marker)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_when_paused(proc, marker)  # two shards written, the third under way
    (manifest,) = killed.glob(f"*/{MANIFEST}")
    assert not json.loads(manifest.read_text())["exhausted"] and len(_cache_rows(killed)) < 900, "killed mid-way"
    monkeypatch.setenv("MSAE_ACTIVATION_CACHE", str(killed))
    assert run_cli(["extract", "--corpus", str(corpus), *EXTRACT], capsys)[0] == 0
    want, got = _cache_rows(tmp_path / "straight"), _cache_rows(killed)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_kill_9_during_analysis_then_the_rerun_writes_the_same_store(corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MSAE_ACTIVATION_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    argv = ["train", "--corpus", str(corpus), "--out", str(out), *EXTRACT, "--widths", "32,128", "--k", "8",
            "--steps", "10", "--batch-size", "64", "--eval-contexts", "2"]
    assert run_cli(argv, capsys)[0] == 0
    analyze = ["analyze", str(out), "--no-absorption", "--top-n", "5"]
    marker = tmp_path / "paused"
    proc = subprocess.Popen([sys.executable, "-m", "msae.cli", *analyze], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "MSAE_ACTIVATION_CACHE": str(tmp_path / "cache"),
                                                            **paused_at("stream shard 1", marker)})
    kill_when_paused(proc, marker)  # the model loaded, the first shard of the cache streamed
    assert lock_holder(out) is None, "kill -9 releases the run's lock"
    assert not (out / "features" / "manifest.json").exists(), "killed before it wrote the store"
    assert run_cli(analyze, capsys)[0] == 0
    first = (out / "features" / "latents.parquet").read_bytes()
    assert not (out / "features.tmp").exists() and not (out / "features.old").exists()
    assert run_cli(analyze, capsys)[0] == 0, "and once more, uninterrupted"
    import pandas as pd
    from io import BytesIO

    pd.testing.assert_frame_equal(pd.read_parquet(BytesIO(first)), pd.read_parquet(out / "features" / "latents.parquet"))


def test_analyze_finds_the_cache_of_a_moved_or_touched_corpus(corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MSAE_ACTIVATION_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "mine.txt"
    text.write_bytes(corpus.read_bytes())
    out = tmp_path / "run"
    argv = ["train", "--corpus", str(text), "--out", str(out), *EXTRACT, "--widths", "32,128", "--k", "8",
            "--steps", "5", "--batch-size", "64", "--eval-contexts", "2"]
    assert run_cli(argv, capsys)[0] == 0
    caches = sorted((tmp_path / "cache").iterdir())
    os.utime(text, (1, 1))  # touched: same content, so the same cache
    assert run_cli(["extract", "--corpus", str(text), *EXTRACT], capsys)[0] == 0
    assert sorted((tmp_path / "cache").iterdir()) == caches
    text.rename(tmp_path / "moved.txt")  # moved: the run's cache is found by its id
    assert run_cli(["analyze", str(out), "--no-absorption", "--top-n", "3"], capsys)[0] == 0
    assert sorted((tmp_path / "cache").iterdir()) == caches, "analysed on the cache it was trained on"
    assert (out / "features" / "manifest.json").exists()


@pytest.mark.parametrize("name, data, message", [
    ("latin1.txt", "café au lait\n".encode("latin-1"), "not valid UTF-8"),
    ("empty.txt", b"", "empty"),
    ("binary.txt", bytes(range(256)) * 4, "looks like a binary file"),
    ("cols.csv", b"a,b\n1,2\n", "no 'text' column"),
    ("rows.jsonl", b'{"body": "x"}\n', "text"),
])
def test_bad_corpora_are_refused_with_their_problem(tmp_path, capsys, monkeypatch, name, data, message):
    monkeypatch.setenv("MSAE_ACTIVATION_CACHE", str(tmp_path / "cache"))
    (tmp_path / name).write_bytes(data)
    out = tmp_path / "run"
    refused(["train", "--corpus", str(tmp_path / name), "--out", str(out), *EXTRACT], capsys, message)
    assert not out.exists() and not any((tmp_path / "cache").glob("*")), "no empty run or cache directory"


def test_bad_weights_are_refused_by_every_command_that_reads_them(tmp_path, capsys):
    good = Path("assets/default/vanilla")
    for problem, make, message in [
        ("truncated", lambda d: (d / "sae_weights.safetensors").write_bytes(
            (good / "sae_weights.safetensors").read_bytes()[:1000]), "truncated"),
        ("pickle", lambda d: torch.save({"W_enc": torch.zeros(2)}, d / "sae_weights.safetensors"), "never unpickled"),
        ("shape", lambda d: save_file({k: v[:-1] if k == "W_dec" else v for k, v in
                                       load_file(str(good / "sae_weights.safetensors")).items()},
                                      str(d / "sae_weights.safetensors")), "W_dec has shape"),
    ]:
        run = tmp_path / problem
        run.mkdir()
        (run / "cfg.json").write_bytes((good / "cfg.json").read_bytes())
        make(run)
        refused(["export", str(run), "--to", "saelens", str(tmp_path / f"{problem}-out")], capsys, message)
        refused(["analyze", str(run), "--no-absorption"], capsys, message)
        assert not (tmp_path / f"{problem}-out").exists()
