"""Hierarchy: the parent–child tree across a Matryoshka SAE's nested widths, as an icicle, treemap or sunburst with
filters, a node-link view of one subtree, and a way to open any node's feature."""

import streamlit as st

from explorer import figures, loaders, state, tables
from msae.analysis import tree

FREQ_STEPS = (0.0, 1e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1)
SUBTREE_LIMIT = 200

run = state.setup("Hierarchy")
st.title("Hierarchy")
store = loaders.require_store(run)
if store.links is None or store.links.empty:
    st.info("This SAE has a single width, so there is no nested hierarchy inside it. Analyse a Matryoshka run, or "
            "see feature splitting against other runs on the Diagnostics page.")
    st.stop()
latents, links = store.latents, store.links
widths = store.manifest.widths
link_cfg = store.manifest.link_config
threshold = link_cfg.score_threshold
st.caption(tables.link_rule_text(link_cfg) + " Node labels are the tokens each latent fires on most.")
held = tables.heldout_line(store.manifest.link_validation, link_cfg)
if held:
    st.caption(held)

with st.container(border=True):
    c1, c2, c3, c4 = st.columns([3, 2, 2, 2])
    groups = c1.multiselect("groups", list(range(len(widths))), default=list(range(len(widths))), key="tree_groups",
                            format_func=lambda g: f"group {g} (width {widths[g]:,})")
    min_freq = c2.select_slider("fires on at least", FREQ_STEPS, value=0.0, key="tree_freq",
                                format_func=lambda f: f"{f:.3%}" if f else "any")
    # P(p | c) tops out at 1; the cosine score (× a max ratio capped at 1) too, but older stores went above.
    max_score = max(1.0, float(links["score"].max()))
    min_score = c3.slider("link strength at least", 0.0, round(max_score, 2), value=threshold, step=0.05,
                          key="tree_score", help="Below the link threshold you see the store's best candidates too.")
    kind = c4.radio("view", figures.TREE_KINDS, horizontal=True, key="tree_kind")
    max_nodes = c4.number_input("at most nodes", 50, 20_000, 400, step=100, key="tree_max",
                                help="The largest trees are drawn first, whole, while they fit.")

nodes = tree.hierarchy_nodes(latents, links, min_score, groups, min_freq, threshold)
if nodes.empty:
    st.info("No links at these settings: lower the link strength or the frequency, or add groups.")
    st.stop()
shown = tree.largest_trees(nodes, int(max_nodes))
n_roots = int((shown["parent"] < 0).sum())
st.caption(f"{len(shown):,} latents in {n_roots:,} trees" + (f" (the largest trees of {len(nodes):,} latents)"
                                                               if len(shown) < len(nodes) else "")
           + ". Click a node to select it (and zoom into it); colours are groups.")


def _pick_from(key: str, field: str) -> None:
    points = st.session_state[key].selection.points
    if points:
        value = points[0].get(field)
        latent = figures.latent_of_node(value) if field == "id" else value
        if latent is not None and int(latent) in set(shown["latent"]):
            st.session_state["tree_node"] = int(latent)


st.plotly_chart(figures.hierarchy_figure(shown, kind, max_depth=4 if kind == "sunburst" else None), key="tree_fig",
                on_select=lambda: _pick_from("tree_fig", "id"), selection_mode="points")

order = shown.sort_values(["descendants", "freq"], ascending=False)["latent"].astype(int).tolist()
if st.session_state.get("tree_node") not in set(order):
    st.session_state["tree_node"] = order[0]
st.session_state["tree_pick"] = st.session_state["tree_node"]
info = shown.set_index("latent")

c1, c2 = st.columns([3, 1])
c1.selectbox("selected node", order, key="tree_pick",
             format_func=lambda l: f"{tables.latent_caption(latents.iloc[l])} · {info.at[l, 'descendants']} below",
             on_change=lambda: st.session_state.update(tree_node=st.session_state["tree_pick"]))
node = int(st.session_state["tree_node"])
c2.write("")
if c2.button(f"Open #{node} in Features", key="tree_open", type="primary"):
    state.open_feature(node)

parent = int(info.at[node, "parent"])
chain = tree.ancestry(latents, node)
st.markdown(f"**#{node}** fires on {info.at[node, 'freq']:.3%} of tokens; group {int(info.at[node, 'group'])} (first in "
            f"width {int(info.at[node, 'width']):,}); "
            + (f"parent #{parent} (score {info.at[node, 'score']:.2f}); " if parent >= 0 else "a root here; ")
            + f"{int(info.at[node, 'descendants'])} latents below it.")
if len(chain) > 1:
    st.caption("Its path in the store's tree: " + " › ".join(tables.latent_caption(latents.iloc[c]) for c in chain))

st.subheader("Subtree")
whole = st.toggle("from the top of its tree", key="tree_whole", value=False)
top = int(info.at[node, "root"]) if whole else node
sub = tree.subtree(shown, top)
if len(sub) > SUBTREE_LIMIT:
    st.info(f"This subtree has {len(sub):,} latents; the node-link view draws at most {SUBTREE_LIMIT}. Select a "
            f"smaller branch.")
else:
    st.plotly_chart(figures.node_link_figure(sub), key="subtree_fig",
                    on_select=lambda: _pick_from("subtree_fig", "customdata"), selection_mode="points")
    st.caption("Link width is the link score; click a node to select it.")
