"""Gallery: one absorption case and one splitting case mined from the taxonomy benchmark and the links (`msae
gallery`), each with its member × latent heatmap, decoder cosines, example contexts and a one-line reading."""

import streamlit as st

from explorer import figures, html, loaders, state
from msae.results import Gallery

run = state.setup("Gallery")
st.title("Gallery")
if run is None:
    st.stop()
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
        st.warning(f"The shipped SAEs hold no clean {kind} case; this is the closest one: {case.why}.")
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
