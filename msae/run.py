"""A run directory: the one module that knows its layout, reads each file in it as its record (msae.results) and
writes each file atomically (a temp file beside it, flushed, then renamed), so a crash never leaves half a file.

    RUN/sae_weights.safetensors   the SAE in SAELens's layout (msae.io, which names SAELens's two files), activation
    RUN/cfg.json                  scale folded in; SAELens's fields + ours under "msae" (RunInfo: settings, provenance)
    RUN/metrics.jsonl             TrainMetrics, one line every log_every steps
    RUN/eval.json                 EvalResult: held-out FVU per width, L0, CE loss recovered
    RUN/absorption.json           AbsorptionResult: first-letter absorption of this run (and runs beside it)
    RUN/hierarchy_bench.json      TaxonomyBench: the taxonomy benchmark of this run (and runs beside it)
    RUN/gallery.json              Gallery: the cases mined for this run and the one it was compared with
    RUN/features/                 the feature store (msae.analysis.store names its own files)
    RUN/.msae.lock                held by the process writing the directory

A training directory (`msae train --out DIR`) is a run itself when it trains one SAE, else holds one run per SAE
(DIR/matryoshka, DIR/vanilla); its resumable state is DIR/checkpoint/state.safetensors. A training started from
the app (msae.jobs) adds DIR/job.json (what was started), DIR/train.log and, once it ends, DIR/job-exit.json. A toy
comparison (`msae toy --out DIR`) adds DIR/eval_activations.safetensors, the rows its links were scored on."""

from __future__ import annotations

import fcntl
import json
import os
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

import torch

from msae import io
from msae.io import CFG_FILE, WEIGHTS_FILE
from msae.lm import compute_dtype
from msae.records import Record, RecordError
from msae.results import AbsorptionResult, EvalResult, Gallery, TaxonomyBench, RunInfo, TrainMetrics
from msae.sae import SAE

METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.json"
ABSORPTION_FILE = "absorption.json"
TAXONOMY_BENCH_FILE = "hierarchy_bench.json"
"""The taxonomy benchmark's result, under the name it had when the command was hierarchy-bench (runs keep it)."""
GALLERY_FILE = "gallery.json"
STORE_DIR = "features"
CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_FILE = "state.safetensors"
LOCK_FILE = ".msae.lock"
JOB_FILE = "job.json"
JOB_LOG_FILE = "train.log"
JOB_EXIT_FILE = "job-exit.json"
TOY_EVAL_ACTIVATIONS = "eval_activations.safetensors"
"""In a kept toy comparison's directory: the held-out sample its figures were measured on (tensor `activations`)."""

R = TypeVar("R", bound=Record)


@dataclass(frozen=True)
class ResultFile:
    """Where a result record lives in a run, and which runs a result names (one measured beside others, e.g. a
    pair's absorption, is kept in one run of the pair and covers the others)."""

    name: str
    covers: Callable[[Any], set[str]]


RESULT_FILES: dict[type, ResultFile] = {
    EvalResult: ResultFile(EVAL_FILE, lambda _result: set()),
    AbsorptionResult: ResultFile(ABSORPTION_FILE, lambda result: set(result.saes)),
    TaxonomyBench: ResultFile(TAXONOMY_BENCH_FILE, lambda result: {sae.name for sae in result.saes}),
    Gallery: ResultFile(GALLERY_FILE, lambda result: set(result.runs.values())),
}


class RunError(ValueError):
    """A run's file is unreadable or does not hold what it should; the message names the file."""


def checkpoint_path(out_dir: Path | str) -> Path:
    """The resumable state of the training in `out_dir`."""
    return Path(out_dir) / CHECKPOINT_DIR / CHECKPOINT_FILE


def checkpoint_steps(out_dir: Path | str) -> int | None:
    """The steps the training in `out_dir` runs to, as its last checkpoint records them (a run of one pass knows its
    steps only once its text is extracted); None before the first checkpoint or when it cannot be read."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(checkpoint_path(out_dir)), framework="pt") as f:
            return int(json.loads(f.metadata()["msae"])["config"]["steps"])
    except (OSError, ValueError, KeyError, TypeError, SafetensorError):
        return None


class RunInUse(RunError):
    """Another process holds the directory's lock; the message names it."""


def lock_holder(out_dir: Path | str) -> str | None:
    """Who holds the lock of `out_dir` ("process PID (COMMAND)"), or None when nobody does."""
    path = Path(out_dir) / LOCK_FILE
    if not path.is_file():
        return None
    with open(path, "r+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return _holder_text(path)
        fcntl.flock(f, fcntl.LOCK_UN)
    return None


def _holder_text(path: Path) -> str:
    try:
        holder = json.loads(path.read_text())
        return f"process {holder['pid']} ({holder['command']})"
    except (OSError, ValueError, KeyError):
        return "another process"


def _lock_file(out_dir: Path, tries: int = 3):
    """OUT/.msae.lock opened and exclusively locked. A holder unlinks the file as it releases it, so a lock taken on
    a file that is no longer at that path (its holder finished in between) is dropped and taken again."""
    for _ in range(tries):
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            f = open(out_dir / LOCK_FILE, "a+")
        except OSError as exc:
            raise RunError(f"{out_dir}: cannot write there ({exc.strerror})") from None
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise RunInUse(f"{out_dir} is in use by {_holder_text(out_dir / LOCK_FILE)}: wait for it to finish "
                           f"or stop it") from None
        try:
            if os.stat(out_dir / LOCK_FILE).st_ino == os.fstat(f.fileno()).st_ino:
                return f
        except FileNotFoundError:
            pass
        f.close()
    raise RunInUse(f"{out_dir}: other processes keep taking and releasing it; try again")


@contextmanager
def locked(out_dir: Path | str) -> Iterator[Path]:
    """Own a directory for writing: an exclusive lock on OUT/.msae.lock (flock, so the OS releases it when the
    process dies and kill -9 leaves nothing stale). A second writer is refused with RunInUse naming the holder.
    While it holds the lock it sweeps temp files a crash left. On release it removes the lock file (a refused
    command leaves the directory as it found it; one a killed process left is stale) and the directory if it made
    it and it is empty (a run that failed before writing anything)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise RunError(f"{out_dir} is a file, not a directory: pick another directory")
    created = not out_dir.exists()
    f = _lock_file(out_dir)
    try:
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "command": " ".join(sys.argv)}))
        f.flush()
        for stale in [p for pattern in ("*", "*/*") for p in out_dir.glob(pattern) if io.is_temp_file(p)]:
            stale.unlink(missing_ok=True)
        yield out_dir
    finally:
        # Unlinked while still held: a process that opened the old file can only fail to lock it.
        (out_dir / LOCK_FILE).unlink(missing_ok=True)
        f.close()
        if created and not any(out_dir.iterdir()):
            out_dir.rmdir()


def sae_files_in(directory: Path | str) -> list[Path]:
    """The weights of every SAE msae reads (our / SAELens's layout, dictionary_learning's or sparsify's) and every
    training checkpoint at or under `directory`, sorted."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = {p / WEIGHTS_FILE for p in find_runs(directory)}
    found.update(p for p in directory.rglob(io.DL_WEIGHTS_FILE) if (p.parent / io.DL_CFG_FILE).is_file())
    found.update(p for p in directory.rglob(io.SPARSIFY_WEIGHTS_FILE) if (p.parent / io.CFG_FILE).is_file())
    found.update(directory.rglob(f"{CHECKPOINT_DIR}/{CHECKPOINT_FILE}"))
    return sorted(found)


def refuse_other_runs(out_dir: Path | str, overwrite_flag: str | None = None) -> None:
    """The rule for every command that makes a new run or output: it never writes over a run it was not asked
    to replace. Refuses (RunError) when `out_dir` already holds an SAE or a checkpoint; the message names them and,
    when the command has one, the flag that replaces them."""
    out_dir = Path(out_dir)
    held = sae_files_in(out_dir)
    if not held:
        return
    names = ", ".join(p.relative_to(out_dir).as_posix() for p in held[:4]) + (", ..." if len(held) > 4 else "")
    how = f", or pass {overwrite_flag} to replace what is there" if overwrite_flag else ""
    raise RunError(f"{out_dir} already holds a run ({names}): pick a new directory{how}")


_HOOK_LAYER = re.compile(r"(?:blocks|layers|layer|h)\.(\d+)\b")


def cfg_source(cfg: dict[str, Any]) -> tuple[str | None, int | None]:
    """The model and layer an SAE's cfg.json says it reads: ours record them under msae.extraction; SAELens's
    under model_name and hook_layer (or in hook_name, e.g. blocks.12.hook_resid_post), at the top level or (6.x)
    under metadata."""
    ext = (cfg.get("msae") or {}).get("extraction") or {}
    model = ext.get("model") or io.sae_lens_field(cfg, "model_name")
    layer = ext.get("layer")
    if layer is None:
        layer = io.sae_lens_field(cfg, "hook_layer")
    hook_name = io.sae_lens_field(cfg, "hook_name")
    if layer is None and isinstance(hook_name, str):
        found = _HOOK_LAYER.search(hook_name)
        layer = int(found.group(1)) if found else None
    return model, (int(layer) if layer is not None else None)


@dataclass(frozen=True)
class Run:
    """The run directory at `path` (its files need not all exist)."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @property
    def name(self) -> str:
        """The run's directory name: what feature stores and absorption results call it."""
        return self.path.resolve().name

    @property
    def sae_files(self) -> tuple[Path, Path]:
        """The SAE's two files: its weights and cfg.json."""
        return self.path / WEIGHTS_FILE, self.path / CFG_FILE

    @property
    def exists(self) -> bool:
        """It holds an SAE (weights and cfg.json)."""
        return all(path.is_file() for path in self.sae_files)

    # ------------------------------------------------------------------------------------------- cfg.json

    def cfg(self) -> dict[str, Any]:
        """cfg.json as stored (SAELens's fields and ours)."""
        return io.read_cfg(self.path)

    def info(self, cfg: dict[str, Any] | None = None) -> RunInfo:
        """Our fields of cfg.json (all None for an SAE trained elsewhere); `cfg` saves reading it again."""
        try:
            return RunInfo.from_json((cfg if cfg is not None else self.cfg()).get("msae") or {})
        except RecordError as exc:
            raise RunError(f"{self.path / CFG_FILE}: {exc}") from None

    def source(self) -> tuple[str | None, int | None]:
        """The model and layer the SAE reads (`cfg_source` its cfg.json)."""
        return cfg_source(self.cfg())

    def set_source(self, model: str | None, layer: int | None) -> None:
        """Record the model and layer the SAE reads (an upload's), keeping every other field."""
        cfg = self.cfg()
        ext = cfg.setdefault("msae", {}).setdefault("extraction", {})
        if model is not None:
            ext["model"] = model
        if layer is not None:
            ext["layer"] = int(layer)
        io.atomic_write_text(self.path / CFG_FILE, json.dumps(cfg, indent=2) + "\n")

    # ------------------------------------------------------------------------------------------- the SAE

    def load_sae(self, device: torch.device | str = "cpu", dtype: torch.dtype | None = torch.float32,
                 precision: str = "auto") -> SAE:
        """The SAE in eval mode (msae.io.load_sae), in float32 unless told otherwise: runs may be stored in float16,
        and half-precision matmuls on a CPU are many times slower (None keeps the stored dtype). Its encoder computes
        in `precision`'s dtype (msae.lm.compute_dtype: auto is bf16 where the hardware makes it fast)."""
        sae = io.load_sae(self.path, device=device, dtype=dtype)[0]
        sae.compute_dtype = compute_dtype(precision, sae.W_enc.device, sae.W_enc.dtype)
        return sae

    def save_sae(self, sae: SAE, info: RunInfo, act_scale: float = 1.0) -> None:
        """Write the SAE (trained on activations × act_scale) and its cfg.json with `info` under "msae"."""
        io.save_sae(sae, self.path, cfg={"msae": info.to_json()}, act_scale=act_scale)

    def import_files(self, weights: bytes, cfg: dict[str, Any]) -> None:
        """Write an SAE's two files as given (an upload, checked by its caller)."""
        self.path.mkdir(parents=True, exist_ok=True)
        io.atomic_write_bytes(self.path / WEIGHTS_FILE, weights)
        io.atomic_write_text(self.path / CFG_FILE, json.dumps(cfg, indent=2) + "\n")

    # ------------------------------------------------------------------------------------------- metrics

    def metrics(self) -> list[TrainMetrics]:
        """The logged metric lines (empty when none); a torn last line (a killed writer) is skipped."""
        path = self.path / METRICS_FILE
        if not path.exists():
            return []
        rows = []
        for line in path.read_text().splitlines():
            try:
                rows.append(TrainMetrics.from_json(json.loads(line)))
            except (json.JSONDecodeError, RecordError):
                continue
        return rows

    def append_metrics(self, metrics: TrainMetrics) -> None:
        with open(self.path / METRICS_FILE, "a") as f:
            f.write(json.dumps(metrics.to_json()) + "\n")

    def trim_metrics(self, step: int) -> None:
        """Drop metric lines past `step` (written after the checkpoint a resumed run starts from)."""
        if (self.path / METRICS_FILE).exists():
            kept = [m for m in self.metrics() if m.step <= step]
            io.atomic_write_text(self.path / METRICS_FILE, "".join(json.dumps(m.to_json()) + "\n" for m in kept))

    # ------------------------------------------------------------------------------------------- results

    def result(self, kind: type[R]) -> R | None:
        """The run's result of `kind` (a key of RESULT_FILES: EvalResult, AbsorptionResult, TaxonomyBench,
        Gallery); None when it has none."""
        path = self.path / RESULT_FILES[kind].name
        if not path.exists():
            return None
        try:
            return kind.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, RecordError) as exc:
            raise RunError(f"{path}: cannot be read ({exc})") from None

    def write_result(self, result: Record) -> Path:
        """Write `result` as the run's file of its kind; returns the file."""
        path = self.path / RESULT_FILES[type(result)].name
        io.atomic_write_text(path, result.dumps())
        return path

    def result_covering(self, kind: type[R], others: Iterable[Run] = ()) -> R | None:
        """The result of `kind` that measured this run: its own, else one of `others` (the runs it was compared
        with) or of a run beside it that names this run. Unreadable files of other runs are passed over."""
        own = self.result(kind)
        if own is not None:
            return own
        file = RESULT_FILES[kind]
        beside = sorted(p.parent for p in self.path.parent.glob(f"*/{file.name}") if p.parent != self.path)
        for other in [*others, *map(Run, beside)]:
            try:
                found = other.result(kind)
            except RunError:
                continue
            if found is not None and self.name in file.covers(found):
                return found
        return None

    # ------------------------------------------------------------------------------------------- the store

    @property
    def store_dir(self) -> Path:
        """features/, or features.old when a writer was killed between moving the old store aside and moving the
        new one in: then that is the last whole store (the next writer moves it back first)."""
        final = self.path / STORE_DIR
        old = final.with_name(f"{STORE_DIR}.old")
        return old if not final.exists() and old.is_dir() else final

    def summary(self) -> RunSummary:
        """What the run is and how well it reconstructs."""
        cfg = self.cfg()
        info = self.info(cfg)
        metrics = self.metrics()
        model, layer = cfg_source(cfg)
        widths = io.sae_lens_field(cfg, "matryoshka_widths") or [cfg.get("d_sae")]
        return RunSummary(
            run=str(self.path), architecture=io.training_architecture(cfg), d_in=cfg.get("d_in"), d_sae=cfg.get("d_sae"),
            widths=list(widths), k=io.sae_lens_field(cfg, "k"), model=model, layer=layer, steps=info.steps_done,
            tokens=info.tokens_seen, fvu=metrics[-1].fvu if metrics else None, l0=metrics[-1].l0 if metrics else None,
            dead_fraction=info.dead_fraction)


@dataclass
class RunSummary:
    """One row describing a run, for tables."""

    run: str
    """Its path."""
    architecture: str | None = None
    """SAELens's architecture name (or why the run cannot be read)."""
    d_in: int | None = None
    """Input width."""
    d_sae: int | None = None
    """Latents."""
    widths: list[int] = field(default_factory=list)
    """Nested widths (one for a vanilla SAE)."""
    k: int | None = None
    """Top-k's k."""
    model: str | None = None
    """The model it reads."""
    layer: int | None = None
    """Its layer."""
    steps: int | None = None
    """Training steps."""
    tokens: int | None = None
    """Training rows."""
    fvu: list[float] | None = None
    """FVU per width at the last logged training step."""
    l0: float | None = None
    """L0 at the last logged step."""
    dead_fraction: float | None = None
    """Dead share at the end of training."""


def find_runs(*roots: Path | str) -> list[Path]:
    """Every directory under `roots` that holds an SAE (weights + cfg.json), sorted by path."""
    found = set()
    for root in map(Path, roots):
        if root.is_dir():
            found.update(p.parent for p in root.rglob(CFG_FILE) if (p.parent / WEIGHTS_FILE).exists())
    return sorted(found)
