"""Train: configure a run and start `msae train` in the background; it survives a page reload (its state is in
files beside its output), shows progress and metrics as they come, and can be stopped and resumed."""

import dataclasses
from pathlib import Path

import streamlit as st
import torch

from explorer import figures, state
from msae import jobs
from msae.config import PRECISION_HELP, ConfigError, ExtractConfig, TrainConfig, TrainJob, choices, widths_from_text
from msae.lm import precision_note
from msae.uploads import UploadError, max_upload_mb, safe_name, save_corpus_upload

REFRESH_S = 2
SOURCES = {"builtin": "the built-in corpus", "large": "the large corpus (built-in + Debian's text packages)",
           "upload": "an uploaded text file", "activations": "an activations file on this machine"}

state.setup("Train")
st.title("Train")
cuda = torch.cuda.is_available()
root = state.write_dir()
st.caption(f"New runs are written under {root}; finished ones appear on Home. "
           + ("CUDA is available: device 'auto' trains on the GPU." if cuda else
              "No CUDA here: training runs on the CPU (device 'auto' would use a GPU where there is one)."))


def show_job(out_dir: Path) -> None:
    status = jobs.status(out_dir)
    if status is None:
        st.warning(f"{out_dir}: no job there any more.")
        return
    logged = jobs.metrics(out_dir)
    step = max((m[-1].step for m in logged.values() if m), default=0)
    icon = {"running": "⏳", "finished": "✅", "failed": "❌", "stopped": "⏹️"}[status.state]
    of = f"{status.steps:,}" if status.steps is not None else "one pass (its steps are known once the text is extracted)"
    st.markdown(f"{icon} **{status.state}** · step {step:,} of {of}"
                + (f" · exit status {status.exit_code}" if status.exit_code not in (None, 0) else ""))
    st.progress(min(step / max(status.steps or 0, 1), 1.0))
    c1, c2, c3 = st.columns([1, 1, 2])
    if status.running:
        if c1.button("Stop", key="job_stop"):
            jobs.stop(out_dir)
            st.rerun(scope="app")
    elif status.resumable:
        more = c2.number_input("train to step", min_value=1, value=status.steps or step or 1, step=100,
                               key=f"job_steps_{out_dir}")
        if c1.button("Resume", key="job_resume", help="Continue from the last checkpoint (same settings)."):
            job = dataclasses.replace(status.job, train=dataclasses.replace(status.job.train, steps=int(more),
                                                                            passes=None))
            try:
                jobs.start(out_dir, job, resume=True)
            except (jobs.JobError, ConfigError) as exc:
                st.error(str(exc))
            else:
                st.rerun(scope="app")
    widths_of = dict(status.job.train.sae_specs())
    for name, metrics in logged.items():
        if metrics:
            widths = widths_of.get(name) or status.job.train.widths
            st.plotly_chart(figures.training_figure(metrics, widths, title=f"{name}: FVU per nested width"),
                            key=f"job_fig_{name}")
    tail = jobs.log_tail(out_dir, 15)
    if tail:
        st.code(tail, language=None)
    # When the training ends, rerun the whole page once: the live refresh stops and the new runs reach the picker.
    if status.running:
        st.session_state["job_was_running"] = str(out_dir)
    elif st.session_state.get("job_was_running") == str(out_dir):
        del st.session_state["job_was_running"]
        st.rerun(scope="app")


found = jobs.find_jobs(root)
if found:
    st.header("Trainings")
    if "job_started" in st.session_state:  # set by start_training, before the selectbox below exists
        st.session_state["job"] = st.session_state.pop("job_started")
    if st.session_state.get("job") not in [str(d) for d in found]:
        st.session_state["job"] = str(found[0])
    chosen = st.selectbox("training", [str(d) for d in found], key="job", format_func=state.short_name)
    running = jobs.status(Path(chosen)).running
    st.fragment(show_job, run_every=REFRESH_S if running else None)(Path(chosen))

st.header("New run")
train_defaults, extract_defaults = TrainConfig(), ExtractConfig()
c1, c2, c3 = st.columns(3)
name = c1.text_input("name", key="train_name", placeholder="my-run", help=f"Written to {root}/NAME.")
model = c2.text_input("model", value=extract_defaults.model, key="train_model",
                      help="Built-in name, local transformers directory or Hugging Face id.")
layer = c3.number_input("layer", min_value=0, value=extract_defaults.layer, step=1, key="train_layer",
                        placeholder="the middle block", help="The block whose residual stream the SAEs read.")
source = st.radio("activations from", list(SOURCES), format_func=SOURCES.get, horizontal=True, key="train_source")
corpus_file, acts_path = None, ""
if source == "upload":
    corpus_file = st.file_uploader(f".txt, .jsonl, .csv or .parquet (with a text column); at most {max_upload_mb()} MB",
                                   key="train_corpus", max_upload_size=max_upload_mb())
elif source == "activations":
    acts_path = st.text_input("path of a .safetensors file holding a tensor 'activations' (N, d_in)", key="train_acts")
c1, c2, c3, c4 = st.columns(4)
arch = c1.radio("architecture", choices(TrainConfig, "arch"), key="train_arch")
also_vanilla = c1.checkbox("also a vanilla SAE on the same batches", value=True, key="train_also_vanilla",
                           disabled=arch == "vanilla")
widths_text = c2.text_input("widths", value=",".join(map(str, train_defaults.widths)), key="train_widths",
                            help="Nested dictionary widths, increasing; vanilla uses the last.")
k = c2.number_input("k (active latents per token)", min_value=1, value=train_defaults.k, key="train_k")
activation = c2.selectbox("activation", choices(TrainConfig, "activation"), key="train_activation")
tokens = c3.number_input("activation rows to extract", min_value=1000, value=extract_defaults.tokens, step=10_000,
                         key="train_tokens", help="Tokens of the corpus run through the model (cached once).")
steps = c3.number_input("steps", min_value=1, value=train_defaults.steps, step=100, key="train_steps",
                        placeholder="one pass", help="Empty: one pass over the extracted rows, each token read once. "
                        "More steps than that read tokens again, and latents start to learn the sample itself.")
batch = c3.number_input("batch size", min_value=1, value=train_defaults.batch_size, step=256, key="train_batch")
device = c4.selectbox("device", ["auto", "cpu", "cuda"], key="train_device")
precision = c4.selectbox("precision", choices(TrainConfig, "precision"), key="train_precision",
                         help=PRECISION_HELP + ". The model's forward and the SAE's encoder run in it; weights, "
                              "optimiser state, loss and metrics stay float32.")
c4.caption(precision_note(precision, torch.device("cuda" if device != "cpu" and cuda else "cpu")))
log_every = c4.number_input("log every (steps)", min_value=1, value=train_defaults.log_every, key="train_log_every")
checkpoint_every = c4.number_input("checkpoint every (steps)", min_value=1, value=train_defaults.checkpoint_every,
                                   key="train_ckpt_every")


def training_job(corpus: str | None) -> TrainJob:
    """The TrainJob the form describes (ConfigError when a setting is out of range)."""
    train = TrainConfig(arch=arch, widths=widths_from_text(widths_text), k=int(k), activation=activation,
                        also_vanilla=also_vanilla and arch == "matryoshka",
                        steps=None if steps is None else int(steps), batch_size=int(batch),
                        device=device, precision=precision, log_every=int(log_every),
                        checkpoint_every=int(checkpoint_every))
    if source == "activations":
        return TrainJob(train=train, activations=acts_path)
    extract = ExtractConfig(model=model.strip(), layer=None if layer is None else int(layer), tokens=int(tokens),
                            corpus=corpus or (source if source in ("builtin", "large") else "builtin"))
    return TrainJob(train=train, extract=extract)


def start_training() -> None:
    try:
        out_dir = root / safe_name(name)
        jobs.check_new(out_dir, training_job(None))  # every setting and path checked before anything is written
    except (UploadError, ValueError, jobs.JobError) as exc:
        st.error(f"Not started: {exc}")
        return
    corpus = None
    if source == "upload":
        if corpus_file is None:
            st.error("Not started: upload a corpus file first.")
            return
        try:
            corpus = str(save_corpus_upload(corpus_file.name, corpus_file.getvalue(), out_dir))
        except UploadError as exc:
            st.error(f"Not started: {exc}")
            return
    try:
        jobs.start(out_dir, training_job(corpus))
    except jobs.JobError as exc:
        st.error(f"Not started: {exc}")
        return
    st.session_state["job_started"] = str(out_dir)
    st.rerun()


if st.button("Start training", type="primary", key="train_start", disabled=not name.strip()):
    start_training()
