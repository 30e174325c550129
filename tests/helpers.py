"""What the tests of commands share: running `msae` in this process and checking a refusal, hashing what a command
must leave as it was, copies of the shipped runs, and stopping a msae process at a named point (msae.faults) to
kill it there."""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

from msae.cli import main as cli_main
from msae.faults import PAUSE_AT, PAUSE_MARKER


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """Exit status and stderr of `msae ARGV` run in this process (argparse's refusals included)."""
    try:
        code = cli_main(argv)
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def refused(argv: list[str], capsys, message: str) -> str:
    code, err = run_cli(argv, capsys)
    assert code == 2, err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert "Traceback" not in err and len(errors) == 1, f"one line, not a traceback: {err}"
    assert message in errors[0], err
    return errors[0]


def file_hashes(root: Path) -> dict[str, str]:
    """SHA-256 of every file under `root` (hidden ones included), by path: equal before and after means nothing
    under it was written, added or removed."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def refused_unchanged(argv: list[str], capsys, message: str, *roots: Path) -> str:
    """`refused`, and every file under `roots` byte-for-byte as it was."""
    before = [file_hashes(r) for r in roots]
    line = refused(argv, capsys, message)
    assert [file_hashes(r) for r in roots] == before, f"{argv} changed what was there"
    return line


SHIPPED = Path(__file__).resolve().parents[1] / "assets" / "default"


def shipped_narrow() -> str:
    """The shipped narrow vanilla run's name (vanilla-<width>: its width follows the shipped Matryoshka's layout)."""
    (name,) = [p.name for p in SHIPPED.glob("vanilla-*")]
    return name


def shipped_d_sae(name: str = "matryoshka") -> int:
    """Latents of a shipped run, as its cfg.json records them."""
    return int(json.loads((SHIPPED / name / "cfg.json").read_text())["d_sae"])


def copy_shipped(root: Path, *names: str) -> Path:
    """Shipped runs (with their stores) copied into `root`, for tests that must leave them as they were."""
    for name in names:
        shutil.copytree(SHIPPED / name, root / name)
    return root


def paused_at(point: str, marker: Path) -> dict:
    """The environment that makes a msae process stop at `point` (msae.faults) and say so in `marker`."""
    return {PAUSE_AT: point, PAUSE_MARKER: str(marker)}


def wait_paused(proc: subprocess.Popen, marker: Path, timeout: float = 300.0) -> None:
    """Return once `proc` waits at its pause point (it holds whatever it holds there until killed)."""
    wait_until(lambda: marker.exists() or proc.poll() is not None, timeout)
    assert marker.exists(), f"the process ended (code {proc.returncode}) before it reached its pause point"


def kill_when_paused(proc: subprocess.Popen, marker: Path, timeout: float = 300.0) -> None:
    """Kill -9 `proc` once it has reached its pause point: the kill lands exactly there, however fast the machine."""
    wait_paused(proc, marker, timeout)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def wait_until(predicate, timeout: float = 120.0, explain=None) -> None:
    """Poll `predicate` until it holds; fail the test after `timeout` seconds (saying `explain()` when given)."""
    end = time.time() + timeout
    while not predicate():
        assert time.time() < end, f"timed out after {timeout:g} s" + (f": {explain()}" if explain else "")
        time.sleep(0.05)
