"""Finding run directories on disk and reading their training metrics, for the CLI and the app."""

from __future__ import annotations

import json
from pathlib import Path

from msae.io import CFG_FILE, WEIGHTS_FILE


def find_runs(*roots: Path) -> list[Path]:
    """Every directory under `roots` that holds an SAE (weights + cfg.json), sorted by path."""
    found = set()
    for root in roots:
        root = Path(root)
        if root.is_dir():
            found.update(p.parent for p in root.rglob(CFG_FILE) if (p.parent / WEIGHTS_FILE).exists())
    return sorted(found)


def read_metrics(run_dir: Path) -> list[dict]:
    """The logged metric lines of a run (empty when it has none); a torn last line is skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def summary(run_dir: Path) -> dict:
    """One row describing a run: its shape, training length and final quality per nested width."""
    cfg = json.loads((Path(run_dir) / CFG_FILE).read_text())
    ours = cfg.get("msae", {})
    metrics = read_metrics(run_dir)
    last = metrics[-1] if metrics else {}
    widths = cfg.get("matryoshka_widths") or [cfg.get("d_sae")]
    return {
        "run": str(run_dir),
        "architecture": cfg.get("architecture"),
        "d_in": cfg.get("d_in"),
        "d_sae": cfg.get("d_sae"),
        "widths": widths,
        "k": cfg.get("k"),
        "steps": ours.get("steps_done"),
        "tokens": ours.get("tokens_seen"),
        "fvu": last.get("fvu"),
        "l0": last.get("l0"),
        "dead_fraction": ours.get("dead_fraction"),
    }
