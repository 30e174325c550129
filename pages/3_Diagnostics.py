"""Diagnostics: absorption per first letter (vanilla vs Matryoshka), feature splitting, FVU per nested width against
L0, and the toy model with known features; each plot with one line on how to read it."""

import streamlit as st

from explorer import figures, loaders, state, tables
from msae import toy
from msae.results import AbsorptionResult, TaxonomyBench
from msae.run import Run

run = state.setup("Diagnostics")
st.title("Diagnostics")
if run is None:
    st.stop()
store = loaders.store_of(run)
manifest = store.manifest if store else None
compared = state.against_runs(run, manifest)

st.header("Absorption")
absorption = loaders.result_of(run, AbsorptionResult, list(compared.values()))
if absorption is None:
    st.info(f"Absorption has not been measured for this run: `msae analyze {run} --against OTHER_RUN` measures it "
            f"(it is on by default) for both runs on the same first-letter probes.")
else:
    if absorption.validity is not None and not absorption.validity.valid:
        st.warning(absorption.validity.note, icon="⚠️")
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
    if any(r.variants for r in absorption.saes.values()):
        st.caption("The variant columns change one thing each and are labelled as such: the absorber cosine scaled to "
                   f"this model's width ({absorption.config.cos_sigmas} standard deviations of a random cosine, as "
                   f"SAEBench's 0.1 is on Gemma-2-2B), and absorbers limited to latents that fire on at most "
                   f"{absorption.config.sparse_absorber_share:.0%} of the words (dense latents that fire on every letter "
                   f"are not absorbing one). The first columns are SAEBench's definition.")

st.header("Hierarchy: do the links hold?")
if manifest is not None and manifest.link_validation is not None:
    st.dataframe(tables.link_validation_table(manifest.link_validation), hide_index=True)
    st.caption(f"Reading: links made on half the analysed rows ({manifest.link_validation.split}); on the other "
               "half, how often the parent fires where its tree child fires, beside a parent picked at random among "
               "latents of earlier groups that fire about as often, and beside another candidate parent of the child "
               "that passes the lift bound (the harder null). Rows \"without P, measured on P\" make the configured "
               "rule on every corpus part but P and measure it on P. 95% bootstrap intervals resample parents (the "
               "links of one parent together); stores made before this measured alternate contexts and resampled "
               "links.")
curve = loaders.link_curve(run)
if curve is not None:
    st.subheader("The link rule's trade-off")
    st.plotly_chart(figures.link_curve_figure(curve))
    st.caption(tables.link_curve_text(curve))
figs = {}
if manifest is not None and manifest.hierarchy_figures is not None:
    figs[Run(run).name] = manifest.hierarchy_figures
for name, path in compared.items():
    other = loaders.store_of(path, quiet=True)
    if other is not None and other.manifest.hierarchy_figures is not None:
        figs[name] = other.manifest.hierarchy_figures
if figs:
    st.dataframe(tables.hierarchy_figures_table(figs), hide_index=True)
    st.dataframe(tables.published_hierarchy_figures(), hide_index=True)
    st.caption("Reading: the figures papers report, so this SAE can be set beside them. P(p|c) and P(c|p) over tree "
               "links (HSAE); Hamming: the share of rows where the parent and its children disagree; sibling IoU: "
               "how often two children of one parent fire together; Tree SAE's score: the share of frequent latents' "
               "children for which parent and child are both among the five decoder rows nearest the child's "
               "detection direction. The second table: the ranges papers publish, on larger models.")
bench = loaders.result_of(run, TaxonomyBench, list(compared.values()))
if bench is not None:
    st.subheader("Taxonomy benchmark (WordNet categories)")
    st.dataframe(tables.taxonomy_table(bench), hide_index=True)
    st.markdown("\n".join(f"- {line}" for line in tables.taxonomy_difference_lines(bench)))
    st.caption(f"Reading: {bench.categories} WordNet noun categories, {bench.occurrences:,} occurrences of their "
               "member tokens. Parent AP: how well the category's best latent (chosen on half the contexts) finds "
               "its members on the other half, free of a threshold; absorption: member occurrences where that latent "
               "is silent and a latent for the member's own token fires; link precision: tree links whose parent's "
               "category contains the child's, beside a random parent of the same group (only links whose two latents "
               "are labelled by a category count; DAG: every linked parent, not only the tree's). 95% intervals "
               "resample categories and members.")
    with st.expander("per category"):
        sae_name = st.selectbox("SAE", [b.name for b in bench.saes], key="measure_sae")
        st.dataframe(tables.taxonomy_categories_table(bench, sae_name), hide_index=True)
elif not figs:
    st.info(f"Not measured yet: `msae analyze {run}` validates the links, `msae taxonomy-bench {run} --against "
            f"OTHER_RUN` runs the taxonomy benchmark.")

st.header("Feature splitting")
if manifest is not None and (manifest.splitting or manifest.against):
    st.plotly_chart(figures.splitting_figure(manifest))
    st.caption("Reading: the share of a narrower dictionary's live latents that the wider one represents by two or "
               "more latents (decoder cosine at least the threshold). For a Matryoshka SAE each prefix is compared "
               "with the full width: a low share means the early latents stay whole instead of splitting.")
    if manifest.hierarchy is not None:
        st.dataframe([level.to_json() for level in manifest.hierarchy.per_group], hide_index=True)
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
    st.caption("FVU against L0 needs FVU per width: msae measures it for the runs it trains (eval.json, "
               "metrics.jsonl), and this run has neither.")

st.header("Width sweep: absorption against dictionary width")
sweeps = loaders.width_sweep()
if sweeps:
    key = st.selectbox("sweep settings", list(sweeps), key="width_sweep") if len(sweeps) > 1 else next(iter(sweeps))
    st.plotly_chart(figures.width_sweep_figure(sweeps[key]))
    st.dataframe(tables.width_sweep_differences(sweeps[key]), hide_index=True)
    st.markdown("\n".join(f"- {line}" for line in tables.width_sweep_verdicts(sweeps[key])))
    across = tables.width_sweep_seed_lines(sweeps[key])
    if across:
        st.markdown("Across seeds (mean ± standard deviation of the seeds' paired differences):\n"
                    + "\n".join(f"- {line}" for line in across))
    st.caption(f"Reading: a Matryoshka SAE and a vanilla SAE of each width trained on the same batches ({key}); "
               "taxonomy absorption is the share of a WordNet category's member occurrences where its parent latent "
               "is silent and a latent for the member's own token fires, first-letter absorption the share of a "
               "letter probe's signal moved out of the letter's main latents; lower is better. Each point has its "
               "95% interval (bootstrap over categories or letters); the table gives the paired differences "
               "Matryoshka − vanilla over the same categories and letters, where an interval that excludes 0 is a "
               "difference.")
    runs = sweeps[key]["runs"]
    widest = max(runs, key=int)
    validity = runs[widest][min(runs[widest], key=int)]["first_letter"]["validity"]
    if not validity["valid"]:
        st.warning(f"First-letter absorption at {int(widest):,} latents: {validity['note']}", icon="⚠️")
else:
    st.info("The width sweep has not been run: `python benchmarks/sweep_width.py` trains a Matryoshka and a vanilla "
            "SAE at 4,096 to 32,768 latents on 10M tokens of the large corpus and measures their absorption "
            "(hours on 2 CPU cores: README's Benchmarks section gives the estimate for bf16 and for float32 CPUs); "
            "its results then appear here.")

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
