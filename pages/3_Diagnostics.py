"""Diagnostics: absorption per first letter (vanilla vs Matryoshka), feature splitting, FVU per nested width against
L0, and the toy model with known features; each plot with one line on how to read it."""

import streamlit as st

from explorer import figures, loaders, state
from msae import toy
from msae.analysis import tables
from msae.run import Run

run = state.setup("Diagnostics")
st.title("Diagnostics")
if run is None:
    st.stop()
store = loaders.store_of(run)
manifest = store.manifest if store else None
compared = state.against_runs(run, manifest)

st.header("Absorption")
absorption = loaders.absorption_of(run, list(compared.values()))
if absorption is None:
    st.info(f"Absorption has not been measured for this run: `msae analyze {run} --against OTHER_RUN` measures it "
            f"(it is on by default) for both runs on the same first-letter probes.")
else:
    metric = st.radio("measure", list(figures.ABSORPTION_MEASURES), horizontal=True, key="absorption_metric",
                      format_func=figures.ABSORPTION_MEASURES.get)
    st.plotly_chart(figures.absorption_figure(absorption, metric))
    st.caption("Reading: on words whose first letter a linear probe reads correctly, the share of the probe's signal "
               "that has moved out of the letter's main latents into other latents; lower is better. Only letters "
               f"with probe F1 > {absorption.config.min_probe_f1} count ({absorption.model} layer {absorption.layer}, "
               f"{absorption.n_test_words} test words). The paper reports 0.05 for Matryoshka against "
               "0.49 for BatchTopK on Gemma-2-2B. Read it beside the main-latent F1 in the table: far below the "
               "probe's, it means the SAE has no latent for the letter, and the fraction says little about absorption.")
    st.dataframe(tables.absorption_table(absorption), hide_index=True)

st.header("Feature splitting")
if manifest is not None and (manifest.splitting or manifest.against):
    st.plotly_chart(figures.splitting_figure(manifest))
    st.caption("Reading: the share of a narrower dictionary's live latents that the wider one represents by two or "
               "more latents (decoder cosine at least the threshold). For a Matryoshka SAE each prefix is compared "
               "with the full width: a low share means the early latents stay whole instead of splitting.")
    if manifest.hierarchy is not None:
        st.dataframe([level.to_json() for level in manifest.hierarchy.per_level], hide_index=True)
        st.caption("Per group: how many live latents have a parent in an earlier group (the Hierarchy page draws them).")
elif store is not None:
    st.info("This store has no splitting figures (a single-width SAE analysed without `--against`).")

st.header("FVU per nested width against L0")
shown = [tables.l0_fvu_point(Run(run), manifest), *(tables.l0_fvu_point(Run(p)) for p in compared.values())]
points = [p for p in shown if p is not None]
if points:
    st.plotly_chart(figures.fvu_l0_figure(points))
    st.caption("Reading: each point is one nested dictionary (its width beside it), held-out FVU where measured; "
               "wider prefixes use more latents per token and reconstruct better. A vanilla SAE is a single point: "
               "Matryoshka pays a little FVU at full width for usable smaller dictionaries.")
else:
    st.info("No metrics for this run (no eval.json or metrics.jsonl).")

st.header("Toy model with known features")
st.caption("Synthetic activations built from a known hierarchy (parents, mutually exclusive children): absorption "
           "is measured exactly, with no probe. A vanilla and a Matryoshka SAE train on the same batches.")
c1, c2, c3 = st.columns(3)
preset = c1.selectbox("toy", list(toy.PRESETS), key="toy_preset")
steps = c2.number_input("training steps", 50, 5000, 1500, step=50, key="toy_steps")
seed = c3.number_input("seed", 0, 10_000, 0, key="toy_seed")


shipped = loaders.shipped_toy(preset)
if st.button("Train it here with these settings", key="toy_run") or st.session_state.get("toy_done") == (preset, steps, seed):
    result = loaders.toy_result(preset, int(steps), int(seed))
    st.session_state["toy_done"] = (preset, steps, seed)
    source = f"trained here in {result.train_seconds:.1f} s"
elif shipped is not None:
    result = shipped
    source = (f"the shipped result, assets/toy/{preset}.json ({shipped.train.steps} steps, seed "
              f"{shipped.toy['seed']}); press the button to train it again")
else:
    result = None
    st.info("Press the button to train both SAEs on the toy (a few seconds to a minute).")
if result is not None:
    st.plotly_chart(figures.toy_figure(result))
    st.caption("Reading: parent absorption is the share of inputs with a parent and one of its children where the "
               "parent's latent stays silent; lower is better, and Matryoshka should be near 0 where vanilla is "
               f"not. Showing {source}.")
    st.code(toy.format_table(result), language=None)
