"""A run's feature store (RUN_DIR/features/): the tables `msae analyze` writes and the app reads, and the
code that writes and reads them. A store is built in a directory beside its final place and swapped in, so a
crash never leaves half of one.

    manifest.json     StoreManifest: what was analysed, sizes, timings, per-width L0, splitting and matching
    latents.parquet   one row per latent (msae.analysis.features.latents_frame, plus hierarchy columns)
    examples.parquet  top activating examples and quantile samples: context, position, the latent's activations
                      on the ±window tokens around it
    contexts.parquet  the token ids of every context an example comes from
    links.parquet     parent–child candidates across nested groups (Matryoshka runs; columns parent, child,
                      linked, tree and the scores)
    vocab.json        every token id's text, to render examples
    activations_analysis.json  instead of all of the above but links.parquet, where `msae analyze --activations`
                      made the store: an ActivationsAnalysis
    against/NAME/     links.parquet (this run's latents -> NAME's, or NAME's -> this run's when NAME is narrower),
                      matching.parquet, parents.parquet, summary.json (an AgainstSummary)
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from msae.analysis import features
from msae.records import RecordError
from msae.results import ActivationsAnalysis, AgainstSummary, StoreManifest
from msae.faults import pause_at
from msae.run import STORE_DIR, Run

STORE_FORMAT = 3
"""2: manifest.json is a StoreManifest (the cache by its id, not its path; no copy of eval.json). 3: links carry
both criteria's figures (coverage, lift, ..., cosine_score) and the manifest's link_config its `criterion`."""
READABLE_FORMATS = (2, 3)
"""A format-2 store is read as it was made: its links are the cosine criterion's."""
MANIFEST_FILE = "manifest.json"


class StoreError(RuntimeError):
    """A feature store that is missing or unreadable."""


@dataclass
class Against:
    """The store's comparison with one other run."""

    summary: AgainstSummary
    tables: dict[str, pd.DataFrame]
    """links, matching and parents (see the module docstring)."""


@dataclass
class FeatureStore:
    """A run's analysis as the app reads it. `examples` carries `tokens` (the ids of each window) and `center`
    (the example token's index in it), rebuilt from the contexts table on loading."""

    run_dir: Path
    manifest: StoreManifest
    latents: pd.DataFrame
    examples: pd.DataFrame
    contexts: pd.DataFrame
    links: pd.DataFrame | None
    vocab: list[str]
    against: dict[str, Against]
    """By other run's name."""

    def examples_of(self, latent: int, kind: str = "top") -> pd.DataFrame:
        ex = self.examples
        return ex[(ex["latent"] == latent) & (ex["kind"] == kind)].sort_values(["rank", "act"], ascending=[True, False])

    def window_text(self, tokens) -> str:
        return "".join(self.vocab[int(t)] for t in tokens if t >= 0)

    @cached_property
    def example_texts(self) -> pd.Series:
        """The text of every example's window (for searching the contexts)."""
        return self.examples["tokens"].map(self.window_text)

    def parents_of(self, latent: int, linked_only: bool = True) -> pd.DataFrame:
        if self.links is None:
            return pd.DataFrame()
        l = self.links[self.links["child"] == latent]
        return (l[l["linked"]] if linked_only else l).sort_values("score", ascending=False)

    def children_of(self, latent: int, linked_only: bool = True) -> pd.DataFrame:
        if self.links is None:
            return pd.DataFrame()
        l = self.links[self.links["parent"] == latent]
        return (l[l["linked"]] if linked_only else l).sort_values("score", ascending=False)


def _write_dir(final: Path, fill: Callable[[Path], None]) -> None:
    """Build a directory beside `final` and swap it in, so a crash never leaves a half-written store. A kill
    between the two renames leaves the last whole store as final.old alone; it is moved back before anything else."""
    tmp = final.with_name(final.name + ".tmp")
    old = final.with_name(final.name + ".old")
    if old.is_dir() and not final.exists():
        old.rename(final)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    fill(tmp)
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    pause_at("store between renames")
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def _narrow(frame: pd.DataFrame) -> pd.DataFrame:
    """int64 columns (and int64 array cells) as int32 where the values fit."""
    out = frame.copy()
    for name in out.columns:
        col = out[name]
        if pd.api.types.is_integer_dtype(col.dtype) and col.dtype.itemsize > 4:
            if len(col) == 0 or (col.min() >= -(2**31) and col.max() < 2**31):
                out[name] = col.astype("int32")
        elif col.dtype == object and len(col) and isinstance(col.iloc[0], np.ndarray) and col.iloc[0].dtype == np.int64:
            if all(len(a) == 0 or (a.min() >= -(2**31) and a.max() < 2**31) for a in col):
                out[name] = [a.astype(np.int32) for a in col]
    return out


def _parquet(frame: pd.DataFrame, path: Path) -> None:
    """A store table, ints narrowed, zstd level 19. Precision: every statistic, link score and each example's
    activation (`act`) in full; the per-token activations of an example's window (`acts`, for shading) and the
    promoted and suppressed logits (for display) come as float16 from features.py, so that the shipped trio's
    SAEs and stores fit in what assets/ may hold (160 MB)."""
    _narrow(frame).to_parquet(path, index=False, compression="zstd", compression_level=19)

def write_store(store: FeatureStore) -> Path:
    """Write `store` to its run's features/, replacing any store there all at once. Its examples need not carry
    the `tokens` and `center` columns (they are rebuilt on loading, not stored)."""

    def fill(tmp: Path) -> None:
        _parquet(store.latents, tmp / "latents.parquet")
        _parquet(store.examples.drop(columns=["tokens", "center"], errors="ignore"), tmp / "examples.parquet")
        _parquet(store.contexts, tmp / "contexts.parquet")
        if store.links is not None:
            _parquet(store.links, tmp / "links.parquet")
        (tmp / "vocab.json").write_text(json.dumps(store.vocab))
        for name, against in store.against.items():
            sub = tmp / "against" / name
            sub.mkdir(parents=True)
            for fname, frame in against.tables.items():
                _parquet(frame, sub / f"{fname}.parquet")
            (sub / "summary.json").write_text(against.summary.dumps())
        (tmp / MANIFEST_FILE).write_text(store.manifest.dumps())

    final = Path(store.run_dir) / STORE_DIR
    _write_dir(final, fill)
    return final


ACTIVATIONS_ANALYSIS_FILE = "activations_analysis.json"


def store_kind(store_dir: Path) -> str | None:
    """What made the store at `store_dir`: "text" (`msae analyze`: a manifest), "activations" (`msae analyze
    --activations`: links and an ActivationsAnalysis only), or None where there is no store."""
    if (store_dir / MANIFEST_FILE).exists():
        return "text"
    return "activations" if (store_dir / ACTIVATIONS_ANALYSIS_FILE).exists() else None


def write_links_only(run_dir: Path | str, links: pd.DataFrame | None, report: ActivationsAnalysis) -> Path:
    """features/ holding only links.parquet and the ActivationsAnalysis (`msae analyze --activations`): it replaces
    any store there, and the app, finding no manifest, says the run has not been analysed on text."""

    def fill(tmp: Path) -> None:
        if links is not None:
            _parquet(links, tmp / "links.parquet")
        (tmp / ACTIVATIONS_ANALYSIS_FILE).write_text(report.dumps())

    final = Path(run_dir) / STORE_DIR
    _write_dir(final, fill)
    return final


def load_store(run_dir: Path | str) -> FeatureStore:
    run_dir = Path(run_dir)
    root = Run(run_dir).store_dir
    if not (root / MANIFEST_FILE).exists():
        raise StoreError(f"{run_dir} has not been analysed yet (no {STORE_DIR}/{MANIFEST_FILE}): run "
                         f"`msae analyze {run_dir}`")
    try:
        raw = json.loads((root / MANIFEST_FILE).read_text())
        if raw.get("format") not in READABLE_FORMATS:
            raise StoreError(f"{root}: store format {raw.get('format')} is not {STORE_FORMAT}; run "
                             f"`msae analyze {run_dir}` again")
        manifest = StoreManifest.from_json(raw)
        if raw["format"] == 2:
            manifest.link_config.criterion = "cosine"
        latents = pd.read_parquet(root / "latents.parquet")
        examples = pd.read_parquet(root / "examples.parquet")
        contexts = pd.read_parquet(root / "contexts.parquet")
        window = manifest.store.window
        examples["tokens"] = list(features.example_windows(examples, contexts, window))
        examples["center"] = window
        links = pd.read_parquet(root / "links.parquet") if (root / "links.parquet").exists() else None
        vocab = json.loads((root / "vocab.json").read_text())
        against = {}
        for sub in sorted((root / "against").glob("*")) if (root / "against").exists() else []:
            against[sub.name] = Against(AgainstSummary.loads((sub / "summary.json").read_text()),
                                        {p.stem: pd.read_parquet(p) for p in sub.glob("*.parquet")})
    except (OSError, ValueError, KeyError, RecordError) as exc:
        raise StoreError(f"{root}: the feature store cannot be read ({type(exc).__name__}: {exc}); run "
                         f"`msae analyze {run_dir}` again") from None
    return FeatureStore(run_dir, manifest, latents, examples, contexts, links, vocab, against)
