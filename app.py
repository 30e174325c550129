"""msae explorer, home page: the runs found on disk, the chosen run's summary and training curves, and adding an
SAE by upload (sae_weights.safetensors + cfg.json, SAELens layout)."""

from pathlib import Path

import streamlit as st

from explorer import figures, loaders, state, tables
from msae.lm import DEFAULT_MODEL
from msae.results import EvalResult
from msae.run import Run, RunError, RunSummary, cfg_source
from msae.uploads import UploadError, add_sae_upload, max_upload_mb, read_cfg_json, safe_name

run = state.setup("Home")
st.title("msae: Matryoshka SAE explorer")
st.caption("Sparse autoencoders on a language model's residual stream, Matryoshka (nested dictionaries) beside "
           "vanilla. Pick a run in the sidebar; every page shows it.")

def row_of(run: Path) -> RunSummary:
    try:
        return Run(run).summary()
    except (OSError, ValueError) as exc:
        return RunSummary(run=str(run), architecture=f"unreadable: {type(exc).__name__}: {exc}")


runs = state.all_runs()
if runs:
    rows = [row_of(r) for r in runs]
    st.subheader(f"{len(runs)} runs found")
    st.dataframe(tables.runs_table(rows, [state.short_name(r) for r in runs]), hide_index=True)
else:
    st.info("No trained runs found under assets/, runs/ or $MSAE_RUNS. Train one on the Train page (or with "
            "`msae train ... --out runs/NAME`), or add one below.")


def show_summary(run: Path) -> None:
    try:
        info = Run(run).summary()
    except (OSError, ValueError) as exc:
        st.error(f"{state.short_name(run)}: its cfg.json cannot be read ({exc})")
        return
    try:
        heldout = Run(run).result(EvalResult)
    except RunError as exc:
        st.warning(f"Held-out figures not shown: {exc}")
        heldout = None
    metrics = Run(run).metrics()
    store = loaders.store_of(run, quiet=True)
    st.subheader(f"Run {state.short_name(run)}")
    fvu = heldout.fvu if heldout is not None else info.fvu
    cols = st.columns([2.2, 0.8, 1.2, 0.6, 1.4, 0.8])  # room for a model name such as smollm2-135m
    cols[0].metric("model", tables.model_label(info.model))
    cols[1].metric("layer", str(info.layer if info.layer is not None else "—"))
    cols[2].metric("latents (d_sae)", f"{info.d_sae:,}")
    cols[3].metric("k", str(info.k))
    cols[4].metric("FVU, full width" + (" (held-out)" if heldout else ""), f"{fvu[-1]:.3f}" if fvu else "—")
    l0, l0_label = heldout.l0 if heldout is not None else info.l0, "L0"
    if l0 is None and store is not None:  # a run trained elsewhere: the L0 its analysis measured
        l0, l0_label = store.manifest.l0_per_width[-1], "L0 (analysed)"
    cols[5].metric(l0_label, f"{l0:.1f}" if l0 is not None else "—")
    st.dataframe(tables.summary_table(info, heldout, store.manifest if store else None), hide_index=True)
    if store is None:
        st.info(f"This run has no feature store yet, so Features, Hierarchy and Diagnostics have nothing to show: "
                f"run `msae analyze {run}` (add `--against OTHER_RUN` to compare it with another).")
    if metrics:
        st.plotly_chart(figures.training_figure(metrics, info.widths))
        st.plotly_chart(figures.l0_figure(metrics))
    elif info.steps is None:
        st.caption("No training curves: this run was trained elsewhere (msae logs the runs it trains in "
                   "metrics.jsonl).")


if run is not None:
    show_summary(run)


def add_uploaded_sae() -> None:
    limit = max_upload_mb()
    st.caption(f"Both files of an SAE in SAELens's layout (ours too); at most {limit} MB each. The SAE is checked "
               f"against its config and against the model it reads before it is added.")
    c1, c2 = st.columns(2)
    weights = c1.file_uploader("sae_weights.safetensors", key="upload_weights", max_upload_size=limit)
    cfg_file = c2.file_uploader("cfg.json", key="upload_cfg", max_upload_size=limit)
    cfg = None
    if cfg_file is not None:
        try:
            cfg = read_cfg_json(cfg_file.name, cfg_file.getvalue())
        except UploadError as exc:
            st.error(str(exc))
    if cfg is None:
        return
    model_cfg, layer_cfg = cfg_source(cfg)
    c1, c2, c3 = st.columns(3)
    # Keyed by the cfg.json upload, so a new cfg.json brings its own model and layer as defaults.
    name = c1.text_input("name", key=f"upload_name_{cfg_file.file_id}", placeholder="my-sae",
                         help="The run's directory name under runs/uploaded/.")
    model = c2.text_input("model", value=model_cfg or DEFAULT_MODEL, key=f"upload_model_{cfg_file.file_id}",
                          help="Built-in name, local path or Hugging Face id of the model the SAE reads.")
    layer = c3.number_input("layer", min_value=0, value=layer_cfg if layer_cfg is not None else 15, step=1,
                            key=f"upload_layer_{cfg_file.file_id}",
                            help="The block whose residual stream the SAE reads.")
    if not st.button("Add this SAE", disabled=weights is None, key="upload_add"):
        return
    if not name.strip():
        st.error("Not added: give the run a name.")
        return
    try:
        dest = add_sae_upload(weights.getvalue(), cfg_file.getvalue(), state.upload_dir() / safe_name(name),
                              model.strip(), int(layer), loaders.lm_of)
    except UploadError as exc:
        st.error(f"Not added: {exc}")
        return
    state.select_run(dest)
    st.session_state["flash"] = f"Added {state.short_name(dest)}; it is now the chosen run."
    st.rerun()


st.divider()
with st.expander("Add an SAE by upload", expanded=False):
    add_uploaded_sae()
if "flash" in st.session_state:
    st.success(st.session_state.pop("flash"))

if loaders.model_needs_preparing(DEFAULT_MODEL):
    st.info(f"The built-in model {DEFAULT_MODEL} has not been prepared on this machine yet: the first page that "
            f"reads text converts it from its GGUF file (about 15 s, once).")
    if st.button("Prepare it now"):
        loaders.lm_of(DEFAULT_MODEL)
        st.rerun()
