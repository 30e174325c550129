"""msae.jobs, a training in the background: a job is a typed spec whose command rebuilds it, and the supervisor
(`python -m msae.jobs`) run by hand refuses every mistake with one line naming it, exit status 2, no traceback, and
nothing written. (Starting, stopping and resuming a job from the Train page: test_pages.py.)"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import file_hashes
from msae import jobs
from msae.config import TRAIN_SKIP, TrainConfig, TrainJob, add_config_args, config_from_args


def _jobs(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "msae.jobs", *argv], capture_output=True, text=True, cwd=cwd,
                          env={"PYTHONPATH": str(Path.cwd()), "PATH": "/usr/bin:/bin"})


@pytest.mark.parametrize("argv, job, message", [
    ((), None, "usage: python -m msae.jobs OUT"),
    (("--help",), None, "usage: python -m msae.jobs OUT"),
    (("",), None, "usage: python -m msae.jobs OUT"),
    (("a", "b"), None, "usage: python -m msae.jobs OUT"),
    (("job",), None, "job/job.json is missing or unreadable"),
    (("job",), {"job": {}, "command": []}, "job/job.json holds no command to run"),
    (("job",), {"job": {}, "command": ["/nowhere/program"]}, "cannot run /nowhere/program (No such file or directory)"),
])
def test_the_supervisor_refuses_what_it_cannot_run(tmp_path, argv, job, message):
    (tmp_path / "job").mkdir()
    if job is not None:
        (tmp_path / "job" / "job.json").write_text(json.dumps(job))
    before = file_hashes(tmp_path)
    done = _jobs(*argv, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("msae.jobs: error: ") and message in done.stderr, done.stderr
    assert file_hashes(tmp_path) == before


def test_a_job_is_a_typed_spec_whose_command_rebuilds_it(tmp_path):
    job = TrainJob(train=TrainConfig(widths=(32, 128), k=8, steps=5, device="cpu"), activations="acts.safetensors")
    command = jobs.command(tmp_path / "out", job, resume=True)
    assert command[1:4] == ["-m", "msae.cli", "train"] and command[-1] == "--resume"
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    parser.add_argument("--resume", action="store_true")
    add_config_args(parser, TrainJob, skip=TRAIN_SKIP)
    assert config_from_args(TrainJob, parser.parse_args(command[4:]), skip=TRAIN_SKIP) == job
    record = jobs.JobFile(job=job, pid=123, command=command)
    assert jobs.JobFile.loads(record.dumps()) == record


def test_a_new_training_is_refused_where_its_directory_holds_something_or_its_activations_are_not_a_file(tmp_path):
    job = TrainJob(train=TrainConfig(widths=(32, 128), k=8, steps=5, device="cpu"),
                   activations=str(tmp_path / "acts.safetensors"))
    with pytest.raises(jobs.JobError, match="acts.safetensors is not a file"):
        jobs.check_new(tmp_path / "new", job)
    (tmp_path / "acts.safetensors").write_bytes(b"")
    jobs.check_new(tmp_path / "new", job)
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "notes.txt").write_text("mine")
    with pytest.raises(jobs.JobError, match="used exists already"):
        jobs.check_new(tmp_path / "used", job)
    assert not (tmp_path / "new").exists(), "checking writes nothing"
