"""The explorer's Streamlit side, shared by app.py and every page: where runs live, the run picker (one choice
for all pages, in st.session_state), cached loaders for the LM, the SAEs and the feature stores, escaped HTML
output, and navigation to a feature. Everything computed lives in msae/; this module only wires it to Streamlit."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import pandas as pd
import streamlit as st
import torch

from msae.analysis.analyze import STORE_DIR, FeatureStore, StoreError, load_store
from msae.analysis.inference import TextLatents, text_latents
from msae.analysis.matching import match
from msae.io import CFG_FILE, WEIGHTS_FILE, SAELoadError, check_fits, load_sae, run_source
from msae.lm import BUILTIN, LMLoadError, LoadedLM, cache_dir, load_lm
from msae.runs import find_runs
from msae.sae import SAE

HERE = Path(__file__).resolve().parent
DEFAULT_RUN = HERE / "assets" / "default" / "matryoshka"
FEATURES_PAGE = "pages/1_Features.py"
RUN_KEY = "run"
"""st.session_state key of the chosen run (a path string), shared by every page."""
LATENT_KEY = "latent"
"""st.session_state key (and query parameter) of the latent the Features page shows."""
APP_THREADS = int(os.environ.get("MSAE_APP_THREADS") or 1)
"""torch threads of the app process ($MSAE_APP_THREADS). One: a warm 128-token prompt took 0.33 s with 1 thread and
0.73 s with 2 while another job used both cores of a 2-core machine (benchmarks/bench_prompt.py); a training job
started from the Train page runs in its own process with its own threads."""
torch.set_num_threads(APP_THREADS)


def write_dir() -> Path:
    """Where the app writes runs (training and uploads): $MSAE_WRITE_DIR, default runs/ beside the app."""
    return Path(os.environ.get("MSAE_WRITE_DIR") or HERE / "runs")


def upload_dir() -> Path:
    return write_dir() / "uploaded"


def roots() -> tuple[Path, ...]:
    """Where runs are looked for: the shipped assets, runs/, the write directory and every path in $MSAE_RUNS."""
    extra = [Path(p) for p in os.environ.get("MSAE_RUNS", "").split(os.pathsep) if p]
    return tuple(dict.fromkeys([HERE / "assets", HERE / "runs", write_dir(), *extra]))


def all_runs() -> list[Path]:
    return find_runs(*roots())


def short_name(run: Path | str) -> str:
    """A run's path relative to the root it was found under (the full path when it is under none)."""
    run = Path(run)
    for root in roots():
        try:
            rel = run.relative_to(root)
        except ValueError:
            continue
        return f"{root.name}/{rel}" if str(rel) != "." else root.name
    return str(run)


def setup(title: str) -> Path | None:
    """Page config and the sidebar's run picker; returns the chosen run (None when there is none)."""
    st.set_page_config(page_title=f"{title} · msae", layout="wide")
    return run_picker()


def select_run(run: Path | str) -> None:
    """Make `run` the chosen run of every page."""
    st.session_state[RUN_KEY] = str(run)


def run_picker() -> Path | None:
    """The sidebar selectbox of every run found; its choice lives in st.session_state[RUN_KEY]."""
    runs = [str(r) for r in all_runs()]
    if not runs:
        st.sidebar.info("No runs found. Train one on the Train page, upload one on Home, or set $MSAE_RUNS.")
        return None
    current = st.session_state.get(RUN_KEY)
    if current not in runs:
        current = str(DEFAULT_RUN) if str(DEFAULT_RUN) in runs else runs[0]
        st.session_state[RUN_KEY] = current
    # The widget's own state is dropped when the user changes page; re-seed it from the shared choice.
    st.session_state["run_picker"] = current
    st.sidebar.selectbox("Run", runs, format_func=short_name, key="run_picker",
                         on_change=lambda: select_run(st.session_state["run_picker"]),
                         help="Every page shows this run. Runs are looked for under assets/, runs/ and $MSAE_RUNS.")
    return Path(st.session_state[RUN_KEY])


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
        return _store(str(run), _stamp(run / STORE_DIR / "manifest.json"))
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
def _sae(run_dir: str, _stamp_value: float) -> tuple[SAE, dict]:
    sae, cfg = load_sae(run_dir, dtype=torch.float32)
    return sae.eval(), cfg


def _sae_stamp(run: Path) -> float:
    return _stamp(run / WEIGHTS_FILE) + _stamp(run / CFG_FILE)


def sae_of(run: Path) -> tuple[SAE, dict] | None:
    """The run's SAE in fp32 and its cfg, or None after an error naming the problem."""
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


def lm_for(run: Path, sae: SAE, cfg: dict) -> tuple[LoadedLM, int] | None:
    """The model and layer a run reads, checked to fit its SAE; None after an error saying why not."""
    model, layer = run_source(cfg)
    if model is None or layer is None:
        st.error(f"{short_name(run)} does not record the model and layer it was trained on (cfg.json: "
                 f"msae.extraction.model / layer, or SAELens's model_name / hook_name); upload it again on Home "
                 f"with them.")
        return None
    lm = lm_of(model)
    if lm is None:
        return None
    try:
        check_fits(sae, lm.d_model, f"{model} layer {layer}")
    except SAELoadError as exc:
        st.error(f"{short_name(run)} does not fit its model: {exc}")
        return None
    if not 0 <= layer < lm.n_layers:
        st.error(f"{short_name(run)} records layer {layer}, but {model} has layers 0 to {lm.n_layers - 1}")
        return None
    return lm, layer


@st.cache_data(show_spinner="Reading the text…", max_entries=256)
def _text_latents(run_dirs: tuple[str, ...], stamps: tuple[float, ...], model: str, layer: int, text: str) -> TextLatents:
    saes = [_sae(r, s)[0] for r, s in zip(run_dirs, stamps)]
    return text_latents(_lm(model), saes, layer, text)


def read_text(runs: Sequence[Path], text: str) -> TextLatents | None:
    """The active latents of every run's SAE on `text` (one LM pass, cached per text); None after an error when
    a run cannot be loaded or its SAE does not read the first run's model and layer."""
    loaded = [sae_of(r) for r in runs]
    if any(item is None for item in loaded):
        return None
    found = lm_for(runs[0], *loaded[0])
    if found is None:
        return None
    lm, layer = found
    for other, (sae, cfg) in zip(runs[1:], loaded[1:]):
        model_o, layer_o = run_source(cfg)
        if sae.d_in != lm.d_model or (layer_o is not None and layer_o != layer):
            st.error(f"{short_name(other)} reads {model_o} layer {layer_o} (d_in {sae.d_in}), not "
                     f"{lm.name} layer {layer} as {short_name(runs[0])} does: they cannot read the same text.")
            return None
    return _text_latents(tuple(str(r) for r in runs), tuple(_sae_stamp(r) for r in runs), lm.name, layer, text)


def show_html(markup: str) -> None:
    """HTML built by msae.views (all user text in it escaped there)."""
    st.html(markup)


def current_latent(n_latents: int, default: int = 0) -> int:
    """The latent the Features page shows: the query parameter (a shared link), else the session's, else
    `default`."""
    wanted = st.query_params.get(LATENT_KEY)
    if wanted is not None and wanted.isdigit():
        st.session_state[LATENT_KEY] = int(wanted)
    latent = int(st.session_state.get(LATENT_KEY, default))
    if not 0 <= latent < n_latents:
        latent = default
    set_latent(latent)
    return latent


def set_latent(latent: int) -> None:
    """Show `latent` on the Features page (in the session and the address bar)."""
    st.session_state[LATENT_KEY] = int(latent)
    st.query_params[LATENT_KEY] = str(int(latent))


def open_feature(latent: int) -> None:
    """Go to the Features page showing `latent`."""
    set_latent(latent)
    st.switch_page(FEATURES_PAGE, query_params={LATENT_KEY: str(int(latent))})


def run_name(run: Path) -> str:
    """The name a run has in feature stores (its directory name)."""
    return Path(run).resolve().name


def against_runs(run: Path, manifest: dict) -> dict[str, Path]:
    """The runs a store was analysed against (found beside `run` first, then anywhere), by name; without a store,
    the runs trained beside it."""
    runs = all_runs()
    names = list(manifest.get("against", {}))
    if not names:
        return {run_name(r): r for r in runs if r.parent == run.parent and r != run}
    found = {}
    for name in names:
        beside = [r for r in runs if r.name == name and r.parent == run.parent]
        anywhere = [r for r in runs if r.name == name and r != run]
        if beside or anywhere:
            found[name] = (beside or anywhere)[0]
    return found


@st.cache_resource(show_spinner="Matching the two dictionaries by decoder cosine…", max_entries=8)
def _matching(run_a: str, stamp_a: float, run_b: str, stamp_b: float) -> pd.DataFrame:
    return match(_sae(run_a, stamp_a)[0].W_dec, _sae(run_b, stamp_b)[0].W_dec)


def matching(run: Path, other: Path, store: FeatureStore | None) -> pd.DataFrame | None:
    """Matched latent pairs (a in `run`, b in `other`, cos): the store's when it was analysed against `other`,
    else computed from the decoders; None after an error when the two cannot be matched."""
    name = run_name(other)
    if store is not None and against_runs(run, store.manifest).get(name) == other and "matching" in store.against.get(name, {}):
        return store.against[name]["matching"]
    loaded = [sae_of(run), sae_of(other)]
    if any(item is None for item in loaded):
        return None
    if loaded[0][0].d_in != loaded[1][0].d_in:
        st.error(f"{short_name(run)} has d_in {loaded[0][0].d_in} and {short_name(other)} {loaded[1][0].d_in}: "
                 f"their latents cannot be matched.")
        return None
    return _matching(str(run), _sae_stamp(run), str(other), _sae_stamp(other))


def partner_candidates(run: Path) -> list[Path]:
    """Other runs to compare `run` with: siblings first (a pair trained together), then the rest."""
    others = [r for r in all_runs() if r != run]
    siblings = [r for r in others if r.parent == run.parent]
    rest = [r for r in others if r.parent != run.parent]
    return siblings + rest
