"""The app's cached loaders: the language model, the SAEs, the feature stores, a text's latents, the decoder
matching of two runs and the toy comparison, each behind st.cache_resource or st.cache_data. A loader that fails
shows why on the page and returns None."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence, TypeVar

import pandas as pd
import streamlit as st

from explorer import tree
from explorer.state import APP_DIR, against_runs, short_name
from msae import taxonomy, toy
from msae.analysis import coherence
from msae.analysis.inference import TextLatents, text_latents
from msae.analysis.matching import match
from msae.analysis.store import MANIFEST_FILE, FeatureStore, StoreError, load_store
from msae.config import ToyConfig
from msae.io import SAELoadError, check_fits
from msae.lm import BUILTIN, LMLoadError, LoadedLM, cache_dir, load_lm
from msae.records import Record
from msae.results import ToyResult
from msae.run import Run, RunError
from msae.sae import SAE


def _stamp(path: Path) -> float:
    """Modification time, so a cached object is reloaded when its files are rewritten."""
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


@st.cache_resource(show_spinner="Loading the feature store…", max_entries=6)
def _store(run_dir: str, _stamp_value: float) -> FeatureStore:
    return load_store(run_dir)


def store_of(run: Path, quiet: bool = False) -> FeatureStore | None:
    """The run's feature store, or None after a warning that says how to make it."""
    try:
        return _store(str(run), _stamp(Run(run).store_dir / MANIFEST_FILE))
    except StoreError as exc:
        if not quiet:
            st.warning(f"No feature store for this run: {exc}")
        return None


def require_store(run: Path | None) -> FeatureStore:
    """The chosen run's feature store; stops the page with a message when there is none."""
    if run is None:
        st.stop()
    store = store_of(run)
    if store is None:
        st.stop()
    return store


@st.cache_resource(show_spinner="Loading the SAE…", max_entries=8)
def _sae(run_dir: str, _stamp_value: float) -> SAE:
    return Run(run_dir).load_sae()


def _sae_stamp(run: Path) -> float:
    return sum(_stamp(path) for path in Run(run).sae_files)


def sae_of(run: Path) -> SAE | None:
    """The run's SAE in fp32, or None after an error naming the problem."""
    try:
        return _sae(str(run), _sae_stamp(run))
    except SAELoadError as exc:
        st.error(f"This run's SAE cannot be loaded: {exc}")
        return None


def model_needs_preparing(name: str) -> bool:
    """A built-in model that has not been converted from its GGUF yet (the first start takes ~15 s more)."""
    return name in BUILTIN and not (cache_dir() / "models" / name / "model.safetensors").exists()


@st.cache_resource(show_spinner=False, max_entries=2)
def _lm(name: str) -> LoadedLM:
    return load_lm(name, device="auto")


def lm_of(name: str) -> LoadedLM | None:
    """The language model, loaded once per app; shows progress while it loads, an error if it cannot."""
    note = " (first start: converting it from its GGUF file, about 15 s)" if model_needs_preparing(name) else ""
    try:
        with st.spinner(f"Preparing the language model {name}{note}…"):
            return _lm(name)
    except LMLoadError as exc:
        st.error(str(exc))
        return None


def run_source(run: Path) -> tuple[str | None, int | None]:
    """The model and layer a run reads (None, None after an error when its cfg.json cannot be read)."""
    try:
        return Run(run).source()
    except (SAELoadError, RunError) as exc:
        st.error(f"{short_name(run)}: {exc}")
        return None, None


def lm_for(run: Path, sae: SAE) -> tuple[LoadedLM, int] | None:
    """The model and layer a run reads, checked to fit its SAE; None after an error saying why not."""
    model, layer = run_source(run)
    if model is None or layer is None:
        st.error(f"{short_name(run)} does not record the model and layer it was trained on (cfg.json: "
                 f"msae.extraction.model / layer, or SAELens's model_name / hook_name); upload it again on Home "
                 f"with them.")
        return None
    lm = lm_of(model)
    if lm is None:
        return None
    try:
        check_fits(sae, lm.d_model, f"{model} layer {layer}", layer=layer, n_layers=lm.n_layers)
    except SAELoadError as exc:
        st.error(f"{short_name(run)} does not fit its model: {exc}")
        return None
    return lm, layer


@st.cache_data(show_spinner="Reading the text…", max_entries=256)
def _text_latents(run_dirs: tuple[str, ...], stamps: tuple[float, ...], model: str, layer: int, text: str) -> TextLatents:
    saes = [_sae(r, s) for r, s in zip(run_dirs, stamps)]
    return text_latents(_lm(model), saes, layer, text)


def read_text(runs: Sequence[Path], text: str) -> TextLatents | None:
    """The active latents of every run's SAE on `text` (one LM pass, cached per text); None after an error when
    a run cannot be loaded or its SAE does not read the first run's model and layer."""
    loaded = [sae_of(r) for r in runs]
    if any(item is None for item in loaded):
        return None
    found = lm_for(runs[0], loaded[0])
    if found is None:
        return None
    lm, layer = found
    for other, sae in zip(runs[1:], loaded[1:]):
        model_o, layer_o = run_source(other)
        if sae.d_in != lm.d_model or (layer_o is not None and layer_o != layer):
            st.error(f"{short_name(other)} reads {model_o} layer {layer_o} (d_in {sae.d_in}), not "
                     f"{lm.name} layer {layer} as {short_name(runs[0])} does: they cannot read the same text.")
            return None
    return _text_latents(tuple(str(r) for r in runs), tuple(_sae_stamp(r) for r in runs), lm.name, layer, text)


@st.cache_resource(show_spinner="Matching the two dictionaries by decoder cosine…", max_entries=8)
def _matching(run_a: str, stamp_a: float, run_b: str, stamp_b: float) -> pd.DataFrame:
    # Decoders (d_sae_a, d_in) and (d_sae_b, d_in).
    return match(_sae(run_a, stamp_a).W_dec, _sae(run_b, stamp_b).W_dec)


def matching(run: Path, other: Path, store: FeatureStore | None) -> pd.DataFrame | None:
    """Matched latent pairs (a in `run`, b in `other`, cos): the store's when it was analysed against `other`,
    else computed from the decoders; None after an error when the two cannot be matched."""
    name = Run(other).name
    compared = store.against.get(name) if store is not None else None
    if compared is not None and against_runs(run, store.manifest).get(name) == other and "matching" in compared.tables:
        return compared.tables["matching"]
    loaded = [sae_of(run), sae_of(other)]
    if any(item is None for item in loaded):
        return None
    if loaded[0].d_in != loaded[1].d_in:
        st.error(f"{short_name(run)} has d_in {loaded[0].d_in} and {short_name(other)} {loaded[1].d_in}: "
                 f"their latents cannot be matched.")
        return None
    return _matching(str(run), _sae_stamp(run), str(other), _sae_stamp(other))


@st.cache_data(show_spinner="Training both SAEs on the toy…", max_entries=16)
def toy_result(preset: str, steps: int, seed: int) -> ToyResult:
    """A vanilla and a Matryoshka SAE trained on the same batches of a toy preset, evaluated (`msae toy`'s)."""
    return toy.run_preset(ToyConfig(preset=preset, steps=steps, seed=seed))


def shipped_toy(preset: str) -> ToyResult | None:
    """The toy comparison shipped in assets/toy/ (None when there is none, or it cannot be read)."""
    path = APP_DIR / "assets" / "toy" / f"{preset}.json"
    try:
        return ToyResult.loads(path.read_text())
    except (OSError, ValueError):
        return None


WIDTH_SWEEP = APP_DIR / "benchmarks" / "results" / "sweep_width.json"
"""benchmarks/sweep_width.py's results, where the script writes them by default."""


def width_sweep() -> dict | None:
    """The width sweep's results (one entry per settings), or None when it has not been run; None after a warning
    when the file cannot be read."""
    return _benchmark_json(WIDTH_SWEEP)


LINK_CURVE = APP_DIR / "benchmarks" / "results" / "links.json"
"""benchmarks/bench_links.py's results (the link rule's trade-off on one run), where the script writes them."""


def link_curve(run: Path) -> dict | None:
    """The link rule's trade-off curve when bench_links.py measured `run` (its "run", relative to the app's folder
    or absolute, is that folder); None otherwise, or after a warning when the file cannot be read."""
    curve = _benchmark_json(LINK_CURVE)
    if curve is None or "run" not in curve:
        return None
    measured = Path(curve["run"])
    measured = measured if measured.is_absolute() else APP_DIR / measured
    return curve if measured.resolve() == Path(run).resolve() else None


def _benchmark_json(path: Path) -> dict | None:
    """A benchmark's JSON, or None when it is not there; None after a warning when it cannot be read."""
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        st.warning(f"{path} cannot be read: {exc}")
        return None


R = TypeVar("R", bound=Record)


def result_of(run: Path, kind: type[R], compared: Sequence[Path]) -> R | None:
    """The result of `kind` (AbsorptionResult, TaxonomyBench, Gallery) that measured `run`: its own, or one of a run
    it was compared with or that lies beside it (msae.run.Run.result_covering); None after a warning when its own
    file is unreadable."""
    try:
        return Run(run).result_covering(kind, [Run(p) for p in compared])
    except RunError as exc:
        st.warning(f"{kind.__name__} could not be read: {exc}")
        return None


@st.cache_resource(show_spinner="Reading WordNet's categories…", max_entries=2)
def _token_categories(model: str) -> dict[int, frozenset[int]] | None:
    try:
        return coherence.token_categories(taxonomy.load_taxonomy(taxonomy.SHIPPED, model))
    except taxonomy.TaxonomyError:
        return None


@st.cache_data(show_spinner="Measuring the trees' coherence against random trees…", max_entries=32)
def tree_coherence(model: str, trees: tuple[tuple[int, ...], ...], _latents: pd.DataFrame, run_dir: str,
                   pools: tuple[tuple[int, ...], tuple[int, ...]]) -> coherence.Coherence | None:
    """The WordNet coherence of `trees` (msae.analysis.coherence) for the store of `run_dir`, against random trees
    drawn from `pools` (explorer.tree.band_pools: their roots, their other latents); None when the shipped taxonomy
    is not for `model`'s vocabulary."""
    cats = _token_categories(model)
    if cats is None:
        return None
    return coherence.forest_coherence([list(t) for t in trees], tree.top_tokens(_latents), cats, list(pools[1]),
                                      root_pool=list(pools[0]))
