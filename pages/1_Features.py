"""Features: find latents (by id, by a token they fire on, by a token they promote, by words in their contexts, by
running text through the model) and read one latent's dashboard."""

import streamlit as st

from explorer import figures, html, loaders, search, state, tables
from msae.analysis.inference import MAX_TOKENS, top_latents

SEARCH_MODES = {
    "id": "latent id",
    "token": "a token it fires on",
    "promoted": "a token it promotes",
    "words": "words in its top contexts",
    "text": "text run through the model",
}

run = state.setup("Features")
st.title("Features")
store = loaders.require_store(run)
latents = store.latents
n_latents = len(latents)
alive = latents.loc[latents["count"] > 0, "latent"]
latent = state.current_latent(n_latents, default=int(alive.iat[0]) if len(alive) else 0)


def search_results(mode: str, query: str):
    if mode == "token":
        return search.by_token(store, query, n=50)
    if mode == "promoted":
        return search.by_promoted(store, query, n=50)
    if mode == "words":
        return search.by_context_words(store, query, n=50)
    result = loaders.read_text([run], query)
    if result is None:
        return None
    if result.truncated:
        st.warning(f"The text was cut to its first {MAX_TOKENS} tokens.")
    return tables.with_labels(top_latents(result.latents[0], 50), latents)


def pick_result() -> None:
    chosen = st.session_state.get("search_pick")
    if chosen is not None:
        state.set_latent(chosen)


def pick_row() -> None:
    rows = st.session_state["search_table"].selection.rows
    if rows:
        state.set_latent(int(st.session_state["search_rows"][rows[0]]))


with st.container(border=True):
    c1, c2 = st.columns([1, 3])
    mode = c1.radio("Search by", list(SEARCH_MODES), format_func=SEARCH_MODES.get, key="search_mode")
    if mode == "id":
        st.session_state["latent_input"] = latent
        c2.number_input(f"latent (0 to {n_latents - 1})", min_value=0, max_value=n_latents - 1, step=1,
                        key="latent_input", on_change=lambda: state.set_latent(st.session_state["latent_input"]))
    else:
        query = c2.text_input("query", key=f"search_query_{mode}",
                              placeholder={"token": "e.g. the", "promoted": "e.g. Paris", "words": "e.g. battle war",
                                           "text": "e.g. The cat sat on the mat."}[mode])
        if query.strip():
            try:
                found = search_results(mode, query)
            except search.SearchError as exc:
                c2.warning(str(exc))
                found = None
            if found is not None and found.empty:
                c2.info("No latent matches.")
            elif found is not None:
                shown = [c for c in ("latent", "label", "group", "freq", "max_act", "examples", "contexts",
                                     "promoted_rank", "n_tokens") if c in found]
                st.session_state["search_rows"] = found["latent"].astype(int).tolist()
                c2.dataframe(found[shown], hide_index=True, height=240, key="search_table", on_select=pick_row,
                             selection_mode="single-row")
                c2.selectbox("open a result", found["latent"].astype(int).tolist(), index=None, key="search_pick",
                             format_func=lambda l: tables.latent_caption(latents.iloc[l]), on_change=pick_result,
                             placeholder="choose a latent (or click a row)")

row = latents.iloc[latent]
widths = store.manifest.widths
st.header(tables.latent_caption(row) if row["label"] else f"#{latent}")
nav = st.columns([1, 1, 8])
nav[0].button("◀ previous", disabled=latent == 0, on_click=state.set_latent, args=(latent - 1,))
nav[1].button("next ▶", disabled=latent >= n_latents - 1, on_click=state.set_latent, args=(latent + 1,))

cols = st.columns(6)
cols[0].metric("group", f"{int(row['group'])} of {len(widths)}" if widths else str(int(row["group"])))
cols[1].metric("first width", f"{int(row['width']):,}")
cols[2].metric("fires on", f"{row['freq']:.3%}")
cols[3].metric("times", f"{int(row['count']):,}")
cols[4].metric("mean act", f"{row['mean_act']:.3f}")
cols[5].metric("max act", f"{row['max_act']:.3f}")
if len(widths) > 1:
    st.caption(f"Appears first in the nested dictionary of width {int(row['width']):,} (group {int(row['group'])}); "
               f"every wider one keeps it. Statistics over the {store.manifest.rows:,} analysed tokens.")
for other, ag in store.against.items():
    pairs = ag.tables.get("matching")
    if pairs is not None and len(pairs):
        hit = pairs[pairs["a"] == latent]
        st.caption(f"In {other}: " + (f"matched to latent {int(hit['b'].iat[0])} (decoder cosine "
                                      f"{hit['cos'].iat[0]:.2f})" if len(hit) else "no matching latent"))

if int(row["count"]) == 0:
    st.info(f"This latent never fired on the {store.manifest.rows:,} analysed tokens.")
else:
    left, right = st.columns([3, 2])
    with left:
        st.plotly_chart(figures.histogram_figure(store.manifest.hist_edges, row["hist"]))
    with right:
        st.markdown("**Promoted and suppressed tokens** (decoder direction through the unembedding)")
        table = tables.promoted_table(row)
        if table.empty:
            st.caption("This store has no unembedding to read them from.")
        else:
            st.dataframe(table, hide_index=True, height=280)


def relatives(title: str, links, side: str) -> None:
    st.markdown(f"**{title}**")
    table = tables.relatives_table(links, latents, side)
    if table.empty:
        st.caption("none")
        return
    for rel in table.head(12).itertuples():
        st.button(f"#{rel.latent} {rel.label} · group {rel.group} · score {rel.score:.2f}", key=f"{side}-{rel.latent}",
                  on_click=state.set_latent, args=(int(rel.latent),))
    if len(table) > 12:
        st.caption(f"and {len(table) - 12} more")


if store.links is not None:
    weak = st.toggle("include candidates below the link threshold", key="weak_links",
                     help=tables.link_rule_text(store.manifest.link_config) +
                          " The store keeps each child's best candidates that are not links too.")
    c1, c2 = st.columns(2)
    with c1:
        relatives("Parents (earlier groups)", store.parents_of(latent, linked_only=not weak), "parent")
    with c2:
        relatives("Children (later groups)", store.children_of(latent, linked_only=not weak), "child")
else:
    st.caption("A single-width SAE: no parents or children inside it (the Diagnostics page shows splitting against "
               "other runs).")

if int(row["count"]) > 0:
    scale = float(row["max_act"])
    st.subheader("Top activating contexts")
    st.caption("Each token shaded by this latent's activation (darkest = its maximum); the example token is underlined.")
    st.html(html.examples_html(store.examples_of(latent, "top"), store.vocab, scale))
    st.subheader("Samples across the activation range")
    n_q = store.manifest.store.quantiles
    tabs = st.tabs([f"quantile {q + 1} of {n_q}" for q in range(n_q)])
    quantile = store.examples_of(latent, "quantile")
    for q, tab in enumerate(tabs):
        with tab:
            st.html(html.examples_html(quantile[quantile["rank"] == q], store.vocab, scale))
