"""The run directory and its typed files (msae.run, msae.results, msae.records): records round-trip, every file is
read and written through them, and the shipped runs record no machine's paths."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from msae.config import TrainConfig
from msae.corpus import BUILTIN_SOURCES, CORPORA, LARGE_EXTRA_SOURCES, LARGE_PARTS
from msae.records import Record, RecordError
from msae.results import AbsorptionResult, EvalResult, RunInfo, StoreManifest, TrainMetrics
from msae.run import Run, RunError, find_runs
from msae.sae import SAE

ASSETS = Path(__file__).resolve().parent.parent / "assets"


@dataclass
class Inner(Record):
    name: str
    """A name."""
    size: int | None = None
    """Optional."""


@dataclass
class Outer(Record):
    inner: Inner
    """Nested."""
    items: list[Inner]
    """A list of them."""
    by_name: dict[str, Inner]
    """A dict of them."""
    widths: tuple[int, ...] = (1, 2)
    """A tuple."""


def test_records_round_trip_nested_and_leave_out_what_is_unknown():
    rec = Outer(Inner("a", 3), [Inner("b")], {"c": Inner("c", 5)}, (4, 8))
    data = rec.to_json()
    assert data == {"inner": {"name": "a", "size": 3}, "items": [{"name": "b"}], "by_name": {"c": {"name": "c", "size": 5}},
                    "widths": [4, 8]}
    assert Outer.from_json(data) == rec and Outer.loads(rec.dumps()) == rec
    assert Outer.from_json({**data, "added_later": 1}) == rec, "a key a newer writer added is ignored"
    with pytest.raises(RecordError, match=r"Outer.items\[0\]: the field 'name' is missing"):
        Outer.from_json({**data, "items": [{}]})
    with pytest.raises(RecordError, match="not valid JSON"):
        Outer.loads("{")


def test_a_run_reads_and_writes_every_file_through_records(tmp_path):
    run = Run(tmp_path / "r")
    sae = SAE(8, [4, 16], k=2)
    info = RunInfo(name="matryoshka", train=TrainConfig(widths=(4, 16), k=2), steps_done=3, tokens_seen=30)
    run.save_sae(sae, info, act_scale=0.5)
    assert run.exists and run.info() == info and run.name == "r"
    for step in (1, 2, 3):
        run.append_metrics(TrainMetrics(step, step * 10, 0.1, 1.0, [0.5, 0.4], [0.9, 0.8], 2.0, 0.0, 0.0, 1e-3))
    with open(run.path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "tok')  # a writer killed mid-line
    assert [m.step for m in run.metrics()] == [1, 2, 3]
    run.trim_metrics(2)
    assert [m.step for m in run.metrics()] == [1, 2]
    assert run.result(EvalResult) is None
    result = EvalResult(rows=10, widths=[4, 16], fvu=[0.5, 0.3], explained_variance=[0.5, 0.7], l0=2.0,
                        dead_fraction=0.1)
    run.write_result(result)
    assert run.result(EvalResult) == result
    (run.path / "eval.json").write_text("[1, 2]")
    with pytest.raises(RunError, match="eval.json: cannot be read"):
        run.result(EvalResult)
    assert find_runs(tmp_path) == [run.path]
    summary = run.summary()
    assert summary.widths == [4, 16] and summary.steps == 3 and summary.fvu == [0.9, 0.8]


def test_source_reads_ours_and_saelens_layouts(tmp_path):
    ours = Run(tmp_path / "ours")
    ours.save_sae(SAE(8, [16], k=2), RunInfo())
    assert ours.source() == (None, None)
    ours.set_source("smollm2-135m", 3)
    assert ours.source() == ("smollm2-135m", 3) and ours.load_sae().d_sae == 16
    cfg = ours.cfg()
    del cfg["msae"]
    ours.import_files((ours.path / "sae_weights.safetensors").read_bytes(),
                      {**cfg, "model_name": "gpt2", "hook_name": "blocks.7.hook_resid_post"})
    assert ours.source() == ("gpt2", 7)


def test_absorption_is_found_where_it_was_measured(tmp_path):
    shipped = AbsorptionResult.loads((ASSETS / "default" / "matryoshka" / "absorption.json").read_text())
    pair = tmp_path / "pair"
    for name in ("matryoshka", "vanilla"):
        Run(pair / name).save_sae(SAE(8, [16], k=2), RunInfo(name=name))
    Run(pair / "matryoshka").write_result(shipped)
    assert Run(pair / "vanilla").result(AbsorptionResult) is None
    assert Run(pair / "vanilla").result_covering(AbsorptionResult) == shipped, "the pair's result is kept beside it"
    Run(tmp_path / "alone").save_sae(SAE(8, [16], k=2), RunInfo())
    assert Run(tmp_path / "alone").result_covering(AbsorptionResult) is None


def test_shipped_runs_read_as_records_and_hold_no_machine_paths():
    runs = sorted(path.parent for path in (ASSETS / "default").glob("*/cfg.json"))
    assert {"matryoshka", "vanilla"} <= {path.name for path in runs}
    for path in runs:
        run = Run(path)
        info = run.info()
        corpus = info.extraction.corpus
        assert info.train is not None and corpus.kind in CORPORA
        packages = [s.package for s in corpus.sources]
        if corpus.kind == "builtin":
            # The prose and code parts; WordNet's four parts follow where the machine that trained them had
            # wordnet-base.
            assert packages[:3] == ["gensim", "gensim", "pydoc_data"] and set(packages[3:]) <= {"wordnet-base"}
        else:  # large: builtin's parts and the Debian packages of text the training machine had, in their order
            known = {s.package for s in (*BUILTIN_SOURCES, *LARGE_EXTRA_SOURCES)}
            assert {"gensim", "pydoc_data"} <= set(packages) <= known
            names = [s.name for s in corpus.sources]
            assert names == [part for part in LARGE_PARTS if part in names]
        assert run.result(EvalResult).fvu and run.metrics()
        StoreManifest.from_json(json.loads((run.store_dir / "manifest.json").read_text()))
        for path in run.path.rglob("*.json*"):
            text = path.read_text()
            assert "/work/" not in text and "/root/" not in text and "site-packages" not in text, path


def test_shipped_assets_stay_within_160_mb():
    """The budget for the shipped runs with their stores, the toys and the taxonomy (git holds them): 160 MB since
    issue 23, which lets a 16,384-latent pair ship in float16 with its stores."""
    total = sum(path.stat().st_size for path in ASSETS.rglob("*") if path.is_file())
    assert total <= 160e6, f"assets/ holds {total / 1e6:.1f} MB"


def test_make_default_finish_goes_on_where_it_stopped_and_redoes_all_for_new_weights(tmp_path):
    """assets/make_default.sh finish skips the steps marked done for the weights in $OUT and runs every step again
    for other weights. Run in a copy of the script whose .venv's programs fail at once, so no step can touch the
    repository's assets."""
    import hashlib
    import re
    import subprocess

    script = ASSETS / "make_default.sh"
    tree = tmp_path / "tree"
    (tree / "assets").mkdir(parents=True)
    (tree / "assets" / "make_default.sh").write_text(script.read_text())
    (tree / ".venv" / "bin").mkdir(parents=True)
    for program in ("python", "msae"):
        (tree / ".venv" / "bin" / program).write_text("#!/bin/sh\nexit 3\n")
        (tree / ".venv" / "bin" / program).chmod(0o755)
    steps = re.search(r"^FINISH_STEPS=\((.*)\)$", script.read_text(), re.M).group(1).split()
    out = tmp_path / "out"
    (out / "matryoshka").mkdir(parents=True)
    (out / "finished").mkdir()
    weights = out / "matryoshka" / "sae_weights.safetensors"
    weights.write_bytes(b"the weights finished before")
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()[:16]
    for step in steps:
        (out / "finished" / step).write_text(f"{digest} 2026-12-05T00:00:00Z, 7 s\n")

    def finish(*named):
        return subprocess.run(["bash", str(tree / "assets" / "make_default.sh"), "finish", *named], text=True,
                              capture_output=True, env={**os.environ, "OUT": str(out)})

    done = finish()
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("skipped") == len(steps) and " took " not in done.stdout
    again = finish("bench")  # a step named runs whatever its mark
    assert again.returncode == 3 and "== bench: done before" not in again.stdout and "bench\n" in again.stdout
    weights.write_bytes(b"new weights")
    stale = finish()
    assert stale.returncode == 3 and "skipped" not in stale.stdout and f"{steps[0]}\n" in stale.stdout
    assert (out / "finished" / steps[0]).read_text().startswith(digest)  # a failed step leaves its old mark


def test_make_default_copy_replaces_the_shipped_runs_only_when_every_new_one_loads(tmp_path):
    """`make_default.sh finish copy` writes the three new runs in float16 beside the shipped ones first: when one of
    them cannot be read nothing shipped is touched; when all can, they replace the shipped runs and a narrow run of
    another width goes."""
    import subprocess

    from msae.io import load_sae
    from msae.train import TensorBatches, Trainer

    tree = tmp_path / "tree"
    (tree / "assets" / "default" / "vanilla-8").mkdir(parents=True)
    (tree / "assets" / "default" / "vanilla-8" / "kept.txt").write_text("shipped")
    (tree / "assets" / "make_default.sh").write_text((ASSETS / "make_default.sh").read_text())
    (tree / ".venv" / "bin").mkdir(parents=True)
    (tree / ".venv" / "bin" / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (tree / ".venv" / "bin" / "python").chmod(0o755)
    cfg = TrainConfig(widths=(4, 16), k=2, steps=4, batch_size=64, device="cpu", also_vanilla=True, also_narrow=4)
    dirs = Trainer(cfg, TensorBatches(torch.randn(512, 8)), tmp_path / "out").train()
    assert sorted(d.name for d in dirs.values()) == ["matryoshka", "vanilla", "vanilla-4"]

    def copy():
        return subprocess.run(["bash", str(tree / "assets" / "make_default.sh"), "finish", "copy"], text=True,
                              capture_output=True, env={**os.environ, "OUT": str(tmp_path / "out"), "NARROW": "4"})

    (tmp_path / "out" / "vanilla-4" / "sae_weights.safetensors").write_bytes(b"not safetensors")
    broken = copy()
    assert broken.returncode != 0 and "vanilla-4" in broken.stderr
    assert sorted(p.name for p in (tree / "assets" / "default").iterdir()) == ["vanilla-8"]
    Trainer(cfg, TensorBatches(torch.randn(512, 8)), tmp_path / "again").train()
    (tmp_path / "out" / "vanilla-4" / "sae_weights.safetensors").write_bytes(
        (tmp_path / "again" / "vanilla-4" / "sae_weights.safetensors").read_bytes())
    done = copy()
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tree / "assets").iterdir()) == ["default", "make_default.sh"]
    assert sorted(p.name for p in (tree / "assets" / "default").iterdir()) == ["matryoshka", "vanilla", "vanilla-4"]
    sae, _ = load_sae(tree / "assets" / "default" / "matryoshka")
    assert sae.W_dec.dtype == torch.float16 and sae.d_sae == 16


def test_checkpoint_refuses_to_resume_with_other_settings(tmp_path):
    from msae.train import TensorBatches, Trainer, TrainingError

    acts = torch.randn(512, 8)
    cfg = TrainConfig(widths=(4, 16), k=2, steps=4, batch_size=64, device="cpu", checkpoint_every=2)
    Trainer(cfg, TensorBatches(acts), tmp_path / "run").train()
    other = TrainConfig(widths=(4, 16), k=2, steps=8, batch_size=64, device="cpu", lr=1e-3)
    with pytest.raises(TrainingError, match="different settings: lr"):
        Trainer(other, TensorBatches(acts), tmp_path / "run").train(resume=True)
