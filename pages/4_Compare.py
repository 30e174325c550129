"""Compare: the same text through two SAEs (the chosen run and, by default, the one trained beside it): per-token
active latents side by side, matched pairs, and the latents one has and the other lacks."""

import streamlit as st

from explorer import loaders, state, tables
from msae.analysis.inference import MAX_TOKENS, top_latents
from msae.analysis.matching import MIN_COS
from msae.run import Run

DEFAULT_TEXT = "The cat sat on the mat. In 1815 the battle of Waterloo ended the Napoleonic wars."

run = state.setup("Compare")
st.title("Compare")
if run is None:
    st.stop()
candidates = state.partner_candidates(run)
if not candidates:
    st.info("There is no other run to compare this one with.")
    st.stop()
store = loaders.store_of(run, quiet=True)
against = state.against_runs(run, store.manifest if store else None)
preferred = next(iter(against.values()), candidates[0])
if st.session_state.get("compare_with") not in candidates:
    st.session_state["compare_with"] = preferred
other = st.selectbox("compare with", candidates, format_func=state.short_name, key="compare_with")
names = (Run(run).name, Run(other).name)
if names[0] == names[1]:
    names = (state.short_name(run), state.short_name(other))
text = st.text_area("text", value=DEFAULT_TEXT, key="compare_text", height=100)
if not text.strip():
    st.info("Type a text to compare the two SAEs on.")
    st.stop()

result = loaders.read_text([run, other], text)
if result is None:
    st.stop()
if result.truncated:
    st.warning(f"The text was cut to its first {MAX_TOKENS} tokens.")
other_store = loaders.store_of(other, quiet=True)
pairs = loaders.matching(run, other, store)
if pairs is None:
    st.stop()
latents_a = store.latents if store else None
latents_b = other_store.latents if other_store else None
if store is None or other_store is None:
    st.caption("Latents of a run without a feature store show without labels (run `msae analyze` on it).")

frame_a, frame_b = result.latents
top_a, top_b = top_latents(frame_a, n=len(frame_a)), top_latents(frame_b, n=len(frame_b))
pair_tables = tables.compare_tables(top_a, top_b, pairs, latents_a, latents_b, names)
n_tokens = max(len(result.tokens), 1)
cols = st.columns(4)
cols[0].metric(f"{names[0]}: latents active", f"{len(top_a)}", help="distinct latents over the whole text")
cols[1].metric(f"{names[1]}: latents active", f"{len(top_b)}")
cols[2].metric("matched pairs, both active", f"{int(pair_tables['matched']['both active'].sum()) if len(pair_tables['matched']) else 0}")
cols[3].metric("L0 per token", f"{len(frame_a) / n_tokens:.1f} / {len(frame_b) / n_tokens:.1f}")
st.caption(f"Pairs are matched by decoder cosine (greedy, at least {MIN_COS}). {len(pairs):,} pairs over the two "
           f"dictionaries.")

tab_tokens, tab_matched, tab_a, tab_b = st.tabs(
    ["per token", "matched pairs", f"only in {names[0]}", f"only in {names[1]}"])
with tab_tokens:
    st.dataframe(tables.side_by_side(result.tokens, frame_a, frame_b, latents_a, latents_b, names), hide_index=True)
with tab_matched:
    st.caption("Matched pairs with at least one side active on this text; 'both active' first.")
    st.dataframe(pair_tables["matched"], hide_index=True)
with tab_a:
    st.caption(f"Active in {names[0]} while its matched latent in {names[1]} is silent, or it has no match.")
    st.dataframe(pair_tables[f"only {names[0]}"], hide_index=True)
with tab_b:
    st.caption(f"Active in {names[1]} while its matched latent in {names[0]} is silent, or it has no match.")
    st.dataframe(pair_tables[f"only {names[1]}"], hide_index=True)
