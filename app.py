"""msae explorer: the home page lists the trained runs found on disk and shows each one's training."""

import os
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from msae.runs import find_runs, read_metrics, summary

HERE = Path(__file__).resolve().parent
ROOTS = (HERE / "assets", HERE / "runs", *(Path(p) for p in os.environ.get("MSAE_RUNS", "").split(os.pathsep) if p))

st.set_page_config(page_title="msae explorer", layout="wide")
st.title("msae: Matryoshka SAE explorer")

runs = find_runs(*ROOTS)
if not runs:
    st.info("No trained runs found under assets/, runs/ or $MSAE_RUNS. Train one with `msae train ... --out runs/NAME`.")
    st.stop()

table = pd.DataFrame([summary(r) for r in runs])
st.subheader(f"{len(runs)} runs found")
st.dataframe(table, hide_index=True, use_container_width=True)

choice = st.selectbox("Run", [str(r) for r in runs])
metrics = read_metrics(Path(choice))
if metrics:
    info = summary(Path(choice))
    fig = go.Figure()
    for i, width in enumerate(info["widths"]):
        fig.add_scatter(x=[m["step"] for m in metrics], y=[m["fvu"][i] for m in metrics], name=f"width {width}")
    fig.update_layout(title="FVU per nested width during training", xaxis_title="step", yaxis_title="FVU", yaxis_type="log")
    st.plotly_chart(fig, use_container_width=True)
else:
    st.caption("This run has no metrics.jsonl.")
