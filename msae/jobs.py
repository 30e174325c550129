"""Training in the background: `msae train` as a detached process whose whole state lives in files in its output
directory, so a page reload, or a restarted app, finds it again; and stop and resume.

OUT/job.json       the flags, the supervisor's pid, when it started, whether a stop was asked for
OUT/train.log      everything the training printed
OUT/job-exit.json  the exit status, written by the supervisor when the training ends

`python -m msae.jobs OUT` is the supervisor: it runs `python -m msae.cli train FLAGS --out OUT` and records how
it ended. It leads its own session, so stopping signals the supervisor and the training together."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from msae.io import atomic_write_text
from msae.runs import read_metrics
from msae.train import CHECKPOINT_DIR, CHECKPOINT_FILE, METRICS_FILE, TrainConfig

JOB_FILE = "job.json"
LOG_FILE = "train.log"
EXIT_FILE = "job-exit.json"

_started: dict[int, subprocess.Popen] = {}
"""Supervisors started by this process, kept so their exit is collected (no zombies) and seen at once."""


class JobError(RuntimeError):
    """A job that cannot be started or stopped; the message says why."""


@dataclass
class JobStatus:
    """Where a background training stands."""

    out_dir: Path
    state: str
    """running, finished, failed or stopped."""
    flags: list[str]
    pid: int | None
    started: float
    ended: float | None
    exit_code: int | None
    steps: int
    """Steps the run is configured for."""
    resumable: bool
    """A checkpoint exists, so `start(..., resume=True)` can continue the run."""

    @property
    def running(self) -> bool:
        return self.state == "running"


def train_flags(settings: Mapping[str, object]) -> list[str]:
    """`msae train` flags from {field name: value}: booleans as --x / --no-x, tuples comma-joined, None left out."""
    flags: list[str] = []
    for key, value in settings.items():
        if value is None:
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, (tuple, list)):
            flags += [flag, ",".join(str(v) for v in value)]
        else:
            flags += [flag, str(value)]
    return flags


def check_train_settings(settings: Mapping[str, object]) -> TrainConfig:
    """The TrainConfig these settings make, or a ValueError saying what is wrong with them."""
    names = TrainConfig.__dataclass_fields__
    cfg = TrainConfig(**{k: v for k, v in settings.items() if k in names and v is not None})
    widths = list(cfg.widths)
    if not widths or any(w <= 0 for w in widths) or widths != sorted(set(widths)):
        raise ValueError(f"widths must be increasing positive numbers, got {','.join(map(str, widths)) or 'none'}")
    if cfg.activation != "relu" and not 0 < cfg.k <= widths[-1]:
        raise ValueError(f"k must be between 1 and the largest width {widths[-1]}, got {cfg.k}")
    return cfg


def checkpoint_path(out_dir: Path) -> Path:
    return Path(out_dir) / CHECKPOINT_DIR / CHECKPOINT_FILE


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
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


def _steps(flags: list[str]) -> int:
    if "--steps" in flags and flags.index("--steps") + 1 < len(flags):
        return int(flags[flags.index("--steps") + 1])
    return TrainConfig.steps


def status(out_dir: Path) -> JobStatus | None:
    """The job in `out_dir` (None when none was ever started there)."""
    out_dir = Path(out_dir)
    job = _read_json(out_dir / JOB_FILE)
    if job is None:
        return None
    ended = _read_json(out_dir / EXIT_FILE)
    pid = job.get("pid")
    if ended is not None:
        code = ended.get("exit_code")
        state = "finished" if code == 0 else "stopped" if job.get("stop_requested") else "failed"
    elif _alive(pid):
        state = "running"
    else:
        code = None
        state = "stopped" if job.get("stop_requested") else "failed"
    return JobStatus(out_dir, state, list(job.get("flags", [])), pid, job.get("started", 0.0),
                     (ended or {}).get("ended"), (ended or {}).get("exit_code"), _steps(job.get("flags", [])),
                     checkpoint_path(out_dir).exists())


def find_jobs(*roots: Path) -> list[Path]:
    """Every directory under `roots` that holds a job, newest first."""
    found = {p.parent for root in roots if Path(root).is_dir() for p in Path(root).rglob(JOB_FILE)}
    return sorted(found, key=lambda d: (d / JOB_FILE).stat().st_mtime, reverse=True)


def command(out_dir: Path, flags: list[str], resume: bool) -> list[str]:
    """The training command the supervisor runs."""
    return [sys.executable, "-m", "msae.cli", "train", *flags, "--out", str(out_dir), *(["--resume"] if resume else [])]


def start(out_dir: Path, flags: list[str], resume: bool = False) -> JobStatus:
    """Start (or, with `resume`, continue from its checkpoint) a training in the background."""
    out_dir = Path(out_dir)
    current = status(out_dir)
    if current is not None and current.running:
        raise JobError(f"{out_dir}: a training is running there already (pid {current.pid})")
    has_checkpoint = checkpoint_path(out_dir).exists()
    if resume and not has_checkpoint:
        raise JobError(f"{out_dir}: nothing to resume (no checkpoint yet)")
    if not resume and has_checkpoint:
        raise JobError(f"{out_dir} already holds a run: resume it or pick another name")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / EXIT_FILE).unlink(missing_ok=True)
    job = {"flags": list(flags), "resume": resume, "started": time.time(), "pid": None,
           "command": command(out_dir, list(flags), resume)}
    atomic_write_text(out_dir / JOB_FILE, json.dumps(job, indent=1))
    with open(out_dir / LOG_FILE, "ab") as log:
        log.write(f"\n=== {'resume' if resume else 'start'} {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                  f"{' '.join(job['command'])}\n".encode())
        log.flush()
        proc = subprocess.Popen([sys.executable, "-m", "msae.jobs", str(out_dir)], stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    _started[proc.pid] = proc
    job["pid"] = proc.pid
    atomic_write_text(out_dir / JOB_FILE, json.dumps(job, indent=1))
    return status(out_dir)


def stop(out_dir: Path) -> JobStatus:
    """Stop a running training (its last checkpoint stays, so it can be resumed)."""
    out_dir = Path(out_dir)
    current = status(out_dir)
    if current is None or not current.running:
        raise JobError(f"{out_dir}: no training is running there")
    job = _read_json(out_dir / JOB_FILE) or {}
    job["stop_requested"] = time.time()
    atomic_write_text(out_dir / JOB_FILE, json.dumps(job, indent=1))
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
    path = Path(out_dir) / LOG_FILE
    if not path.exists():
        return ""
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - 64_000))
        text = f.read().decode("utf-8", errors="replace")
    shown = [line.rsplit("\r", 1)[-1] if line.rstrip("\r") else "" for line in text.split("\n")]
    shown = [line for line in shown if line.strip()]
    return "\n".join(shown[-lines:])


def metrics(out_dir: Path) -> dict[str, list[dict]]:
    """The metric lines logged so far, per SAE (out_dir itself holds them when it trains one SAE)."""
    out_dir = Path(out_dir)
    if (out_dir / METRICS_FILE).exists():
        return {out_dir.name: read_metrics(out_dir)}
    return {d.name: read_metrics(d) for d in sorted(out_dir.iterdir()) if (d / METRICS_FILE).exists()} if out_dir.is_dir() else {}


def _supervise(out_dir: Path) -> int:
    job = _read_json(out_dir / JOB_FILE)
    if job is None:
        print(f"msae.jobs: {out_dir / JOB_FILE} is missing or unreadable", file=sys.stderr)
        return 2
    child = subprocess.Popen(command(out_dir, job["flags"], job.get("resume", False)))
    signal.signal(signal.SIGTERM, lambda signum, _frame: child.send_signal(signum))
    code = child.wait()
    atomic_write_text(out_dir / EXIT_FILE, json.dumps({"exit_code": code, "ended": time.time()}))
    print(f"=== training ended with exit status {code}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_supervise(Path(sys.argv[1])))
