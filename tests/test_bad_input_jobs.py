"""`python -m msae.jobs`, the background training's supervisor, run by hand: every mistake is one line naming it,
exit status 2, no traceback, and nothing written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from test_bad_input import file_hashes


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
