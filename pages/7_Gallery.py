"""Gallery: the toy hierarchies' exact absorption as a reference, then one absorption case and one splitting case
mined from the taxonomy benchmark and the links (`msae gallery`), each with its member × latent heatmap, decoder
cosines, example contexts and a reading that says what the panel shows (and plainly when no case is clean)."""

import streamlit as st

from explorer import figures, html, loaders, state
from msae import toy
from msae.results import Gallery

run = state.setup("Gallery")
st.title("Gallery")
if run is None:
    st.stop()
st.header("Reference: toy hierarchies, where absorption is exact")
st.caption("Synthetic activations with known features (assets/toy/, trained as the README shows: `msae toy "
           "--preset NAME`). A parent feature is present with one of its children; absorption is the share of those "
           "inputs where the parent's latent stays silent. No probe and no threshold: the features are known.")
for preset in toy.PRESETS:
    result = loaders.shipped_toy(preset)
    if result is None:
        st.info(f"No shipped toy result for {preset} (assets/toy/{preset}.json).")
        continue
    v, m = result.vanilla.per_parent["absorption"], result.matryoshka.per_parent["absorption"]
    rows = [{"toy": preset, "parent": i, "vanilla: parent silent beside a child": v[i],
             "Matryoshka: parent silent beside a child": m[i]} for i in range(len(v))]
    st.dataframe(rows, hide_index=True, key=f"gallery_toy_{preset}")
st.caption("Reading: each row is one true parent feature; a value near 0 means the SAE's latent for it fires "
           "whenever it is present, children or not; a larger value is absorption, measured exactly.")

store = loaders.store_of(run, quiet=True)
compared = state.against_runs(run, store.manifest if store else None)
gallery = loaders.result_of(run, Gallery, list(compared.values()))
if gallery is None:
    st.info(f"No gallery for this run yet. `msae taxonomy-bench {run} --against WIDE_RUN` and then "
            f"`msae gallery {run} --wide WIDE_RUN --narrow NARROW_RUN` mine one absorption and one splitting case.")
    st.stop()

st.caption(f"{gallery.model}, layer {gallery.layer}; runs: " +
           ", ".join(f"{role} = {name}" for role, name in gallery.runs.items()))
for kind in ("absorption", "splitting"):
    st.header(kind.capitalize())
    case = next((c for c in gallery.cases if c.kind == kind), None)
    if case is None:
        st.info(f"No {kind} case: {gallery.missing.get(kind, 'not looked for')}.")
        continue
    if case.clean:
        st.success(f"A clean case: {case.why}.")
    else:
        st.warning(f"No clean {kind} case in these SAEs; the closest candidate is shown, and it is {case.why}.")
    st.markdown(f"**Reading:** {case.reading}")
    st.plotly_chart(figures.gallery_heatmap(case), key=f"gallery_{kind}")
    c1, c2 = st.columns([3, 2])
    with c1:
        st.subheader("Example contexts")
        for ex in case.examples:
            shade = [1.0 if i == ex.center else 0.0 for i in range(len(ex.tokens))]
            st.markdown(html.tokens_html(ex.tokens, shade, center=ex.center), unsafe_allow_html=True)
            st.caption(", ".join(f"{col}: {a:.2f}" for col, a in zip(case.columns, ex.acts) if a > 0) or "none fire")
    with c2:
        st.subheader("Decoder cosines")
        st.dataframe(figures.gallery_cosines(case), key=f"gallery_cos_{kind}")
