"""Training in the background: `msae train` as a detached process whose whole state lives in files in its output
directory, so a page reload, or a restarted app, finds it again; and stop and resume. The files (msae.run names
them): JOB_FILE, a JobFile (the TrainJob, the supervisor's pid, when it started, whether a stop was asked for);
JOB_LOG_FILE, everything the training printed; JOB_EXIT_FILE, the exit status the supervisor writes as it ends.

`python -m msae.jobs OUT` is the supervisor: it runs `python -m msae.cli train FLAGS --out OUT` and records how
it ended. It leads its own session, so stopping signals the supervisor and the training together. The flags are
made from the job's TrainJob (msae.config.to_flags), so the app and the command line train the same way."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from msae.config import TRAIN_SKIP, TrainJob, to_flags
from msae.io import atomic_write_text
from msae.records import Record
from msae.results import TrainMetrics
from msae.run import (JOB_EXIT_FILE, JOB_FILE, JOB_LOG_FILE, METRICS_FILE, Run, checkpoint_path, checkpoint_steps,
                      lock_holder)

_started: dict[int, subprocess.Popen] = {}
"""Supervisors started by this process, kept so their exit is collected (no zombies) and seen at once."""


class JobError(RuntimeError):
    """A job that cannot be started or stopped; the message says why."""


@dataclass
class JobFile(Record):
    """job.json: what a background training runs and how it stands."""

    job: TrainJob
    """The training."""
    resume: bool = False
    """Continue from the checkpoint."""
    started: float = 0.0
    """When it started (seconds since the epoch)."""
    pid: int | None = None
    """The supervisor's process id."""
    command: list[str] = field(default_factory=list)
    """The command the supervisor runs."""
    stop_requested: float | None = None
    """When a stop was asked for."""


@dataclass
class JobStatus:
    """Where a background training stands."""

    out_dir: Path
    job: TrainJob
    """What it trains."""
    state: str
    """running, finished, failed or stopped."""
    pid: int | None
    started: float
    ended: float | None
    exit_code: int | None
    resumable: bool
    """A checkpoint exists, so `start(..., resume=True)` can continue the run."""

    @property
    def running(self) -> bool:
        return self.state == "running"

    @property
    def steps(self) -> int | None:
        """Steps the run trains to: as asked, or for a run of whole passes as its checkpoint fixed them (None before)."""
        return self.job.train.steps if self.job.train.steps is not None else checkpoint_steps(self.out_dir)


def _read_job(out_dir: Path) -> JobFile | None:
    try:
        return JobFile.loads((Path(out_dir) / JOB_FILE).read_text())
    except (OSError, ValueError):
        return None


def _read_exit(out_dir: Path) -> dict | None:
    try:
        return json.loads((Path(out_dir) / JOB_EXIT_FILE).read_text())
    except (OSError, ValueError):
        return None


def _alive(pid: int | None) -> bool:
    """The supervisor with this pid is still running (not a zombie, not a reused pid)."""
    if pid is None:
        return False
    if pid in _started:
        return _started[pid].poll() is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    proc = Path(f"/proc/{pid}")
    if proc.exists():
        try:
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError):
            return False
        return state != "Z" and b"msae.jobs" in cmdline
    return True


def status(out_dir: Path) -> JobStatus | None:
    """The job in `out_dir` (None when none was ever started there)."""
    out_dir = Path(out_dir)
    record = _read_job(out_dir)
    if record is None:
        return None
    ended = _read_exit(out_dir)
    if ended is not None:
        state = "finished" if ended.get("exit_code") == 0 else "stopped" if record.stop_requested else "failed"
    elif _alive(record.pid):
        state = "running"
    else:
        state = "stopped" if record.stop_requested else "failed"
    return JobStatus(out_dir, record.job, state, record.pid, record.started, (ended or {}).get("ended"),
                     (ended or {}).get("exit_code"), checkpoint_path(out_dir).exists())


def find_jobs(*roots: Path) -> list[Path]:
    """Every directory under `roots` that holds a job, newest first."""
    found = {p.parent for root in roots if Path(root).is_dir() for p in Path(root).rglob(JOB_FILE)}
    return sorted(found, key=lambda d: (d / JOB_FILE).stat().st_mtime, reverse=True)


def command(out_dir: Path, job: TrainJob, resume: bool) -> list[str]:
    """The training command the supervisor runs."""
    return [sys.executable, "-m", "msae.cli", "train", *to_flags(job, skip=TRAIN_SKIP), "--out", str(out_dir),
            *(["--resume"] if resume else [])]


def check_new(out_dir: Path, job: TrainJob) -> None:
    """Refuse (JobError), before anything is written, a new training whose directory holds something already or
    whose activations file is not a file."""
    out_dir = Path(out_dir)
    if status(out_dir) is not None or (out_dir.exists() and any(out_dir.iterdir())):
        raise JobError(f"{out_dir} exists already; pick another name (or resume it above).")
    if job.activations is not None and not Path(job.activations).is_file():
        raise JobError(f"{job.activations or '(no path)'} is not a file.")


def start(out_dir: Path, job: TrainJob, resume: bool = False) -> JobStatus:
    """Start (or, with `resume`, continue from its checkpoint) a training in the background."""
    out_dir = Path(out_dir)
    current = status(out_dir)
    if current is not None and current.running:
        raise JobError(f"{out_dir}: a training is running there already (pid {current.pid})")
    holder = lock_holder(out_dir)
    if holder is not None:
        raise JobError(f"{out_dir} is in use by {holder}")
    has_checkpoint = checkpoint_path(out_dir).exists()
    if resume and not has_checkpoint:
        raise JobError(f"{out_dir}: nothing to resume (no checkpoint yet)")
    if not resume and has_checkpoint:
        raise JobError(f"{out_dir} already holds a run: resume it or pick another name")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / JOB_EXIT_FILE).unlink(missing_ok=True)
    record = JobFile(job=job, resume=resume, started=time.time(), command=command(out_dir, job, resume))
    atomic_write_text(out_dir / JOB_FILE, record.dumps())
    with open(out_dir / JOB_LOG_FILE, "ab") as log:
        log.write(f"\n=== {'resume' if resume else 'start'} {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                  f"{' '.join(record.command)}\n".encode())
        log.flush()
        proc = subprocess.Popen([sys.executable, "-m", "msae.jobs", str(out_dir)], stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    _started[proc.pid] = proc
    record.pid = proc.pid
    atomic_write_text(out_dir / JOB_FILE, record.dumps())
    return status(out_dir)


def stop(out_dir: Path) -> JobStatus:
    """Stop a running training (its last checkpoint stays, so it can be resumed)."""
    out_dir = Path(out_dir)
    current = status(out_dir)
    if current is None or not current.running:
        raise JobError(f"{out_dir}: no training is running there")
    record = _read_job(out_dir)
    record.stop_requested = time.time()
    atomic_write_text(out_dir / JOB_FILE, record.dumps())
    try:
        os.killpg(current.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    if current.pid in _started:
        try:
            _started[current.pid].wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(current.pid, signal.SIGKILL)
    return status(out_dir)


def log_tail(out_dir: Path, lines: int = 20) -> str:
    """The last lines of the log, progress-bar redraws (carriage returns) collapsed to their latest state."""
    path = Path(out_dir) / JOB_LOG_FILE
    if not path.exists():
        return ""
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - 64_000))
        text = f.read().decode("utf-8", errors="replace")
    shown = [line.rsplit("\r", 1)[-1] if line.rstrip("\r") else "" for line in text.split("\n")]
    shown = [line for line in shown if line.strip()]
    return "\n".join(shown[-lines:])


def metrics(out_dir: Path) -> dict[str, list[TrainMetrics]]:
    """The metric lines logged so far, per SAE (out_dir itself holds them when it trains one SAE)."""
    out_dir = Path(out_dir)
    if (out_dir / METRICS_FILE).exists():
        return {out_dir.name: Run(out_dir).metrics()}
    if not out_dir.is_dir():
        return {}
    return {d.name: Run(d).metrics() for d in sorted(out_dir.iterdir()) if (d / METRICS_FILE).exists()}


def _supervise(out_dir: Path) -> int:
    record = _read_job(out_dir)
    if record is None:
        raise JobError(f"{out_dir / JOB_FILE} is missing or unreadable")
    if not record.command:
        raise JobError(f"{out_dir / JOB_FILE} holds no command to run")
    try:
        child = subprocess.Popen(record.command)
    except OSError as exc:
        raise JobError(f"{out_dir / JOB_FILE}: cannot run {record.command[0]} ({exc.strerror})") from None
    signal.signal(signal.SIGTERM, lambda signum, _frame: child.send_signal(signum))
    code = child.wait()
    atomic_write_text(out_dir / JOB_EXIT_FILE, json.dumps({"exit_code": code, "ended": time.time()}))
    print(f"=== training ended with exit status {code}", flush=True)
    return 0


def main(argv: list[str]) -> int:
    """`python -m msae.jobs OUT`: supervise the job in OUT; a mistake costs one line and exit status 2."""
    try:
        if len(argv) != 1 or not argv[0] or argv[0].startswith("-"):
            raise JobError("usage: python -m msae.jobs OUT, where OUT is a job's directory holding job.json (the "
                           "app's Train page starts this)")
        return _supervise(Path(argv[0]))
    except JobError as exc:
        print(f"msae.jobs: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
