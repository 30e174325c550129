"""The app's shared state: where runs are found and written, the page set-up every page starts with (the run
picker: one choice for all pages, in st.session_state), and navigation to a feature."""

from __future__ import annotations

import os
from pathlib import Path

import streamlit as st
import torch

from msae.results import StoreManifest
from msae.run import Run, find_runs

APP_DIR = Path(__file__).resolve().parents[1]
"""The folder of app.py, pages/ and assets/."""
DEFAULT_RUN = APP_DIR / "assets" / "default" / "matryoshka"
FEATURES_PAGE = "pages/1_Features.py"
RUN_KEY = "run"
"""st.session_state key of the chosen run (a path string), shared by every page."""
LATENT_KEY = "latent"
"""st.session_state key (and query parameter) of the latent the Features page shows."""
APP_THREADS = int(os.environ.get("MSAE_APP_THREADS") or 1)
"""torch threads of the app process ($MSAE_APP_THREADS). One: a warm 128-token prompt took 0.33 s with 1 thread and
0.73 s with 2 while another job used both cores of a 2-core machine (benchmarks/bench_prompt.py); a training job
started from the Train page runs in its own process with its own threads."""


def write_dir() -> Path:
    """Where the app writes runs (training and uploads): $MSAE_WRITE_DIR, default runs/ beside the app."""
    return Path(os.environ.get("MSAE_WRITE_DIR") or APP_DIR / "runs")


def upload_dir() -> Path:
    return write_dir() / "uploaded"


def roots() -> tuple[Path, ...]:
    """Where runs are looked for: the shipped assets, runs/, the write directory and every path in $MSAE_RUNS."""
    extra = [Path(p) for p in os.environ.get("MSAE_RUNS", "").split(os.pathsep) if p]
    return tuple(dict.fromkeys([APP_DIR / "assets", APP_DIR / "runs", write_dir(), *extra]))


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
    """What every page shares, run first by each: torch's thread count (not set on import, so importing the app's
    modules leaves a process's threads alone), the page config and the sidebar's run picker; returns the chosen
    run (None when there is none)."""
    torch.set_num_threads(APP_THREADS)
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


def against_runs(run: Path, manifest: StoreManifest | None) -> dict[str, Path]:
    """The runs a store was analysed against (found beside `run` first, then anywhere), by name; without a store,
    the runs trained beside it."""
    runs = all_runs()
    names = list(manifest.against) if manifest is not None else []
    if not names:
        return {Run(r).name: r for r in runs if r.parent == run.parent and r != run}
    found = {}
    for name in names:
        beside = [r for r in runs if r.name == name and r.parent == run.parent]
        anywhere = [r for r in runs if r.name == name and r != run]
        if beside or anywhere:
            found[name] = (beside or anywhere)[0]
    return found


def partner_candidates(run: Path) -> list[Path]:
    """Other runs to compare `run` with: siblings first (a pair trained together), then the rest."""
    others = [r for r in all_runs() if r != run]
    siblings = [r for r in others if r.parent == run.parent]
    rest = [r for r in others if r.parent != run.parent]
    return siblings + rest
