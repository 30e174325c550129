"""Hierarchy: the parent–child tree across a Matryoshka SAE's nested widths, as an icicle, treemap or sunburst with
filters, a node-link view of one subtree, and a way to open any node's feature."""

import streamlit as st

from explorer import figures, loaders, state, tables, tree
from msae.config import LinkConfig

FREQ_STEPS = (0.0, 1e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1)
LIFT_STEPS = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0)
REVERSE_STEPS = (0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)
DENSITY_STEPS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 1.0)
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
    rule = LinkConfig()
    # A coverage store's score is P(p | c): the library's bound applies where it is stricter, as the bounds below do.
    strength = max(threshold, rule.min_coverage) if link_cfg.criterion == "coverage" else threshold
    min_score = c3.slider("link strength at least", 0.0, round(max_score, 2), value=strength, step=0.05,
                          key="tree_score",
                          help="Below the link threshold you see the store's best candidates too. The default is the "
                               "library's current P(parent | child) bound where it is stricter than the store's.")
    min_reverse = c2.select_slider("P(child | parent) at least", REVERSE_STEPS, key="tree_reverse",
                                   value=max(rule.min_reverse, link_cfg.min_reverse),
                                   help="Drops links whose child is a sliver of a far broader parent. The default is "
                                        "the library's current rule (chosen on held-out parts: README) where it is "
                                        "stricter than the rule this store was made with.")
    max_parent = c3.select_slider("parent fires on at most", DENSITY_STEPS, key="tree_parent_freq",
                                  value=min(rule.max_parent_density, link_cfg.max_parent_density),
                                  format_func=lambda f: f"{f:.0%}" if f < 1 else "any",
                                  help="Drops links under parents that fire on more than this share of all tokens "
                                       "(same default as above).")
    min_lift = c1.select_slider("lift at least", LIFT_STEPS, key="tree_lift",
                                value=max(rule.min_lift, link_cfg.min_lift),
                                help="P(parent | child) / P(parent): drops links a dense parent makes by its frequency "
                                     "alone (same default as below).")
    kind = c4.radio("view", figures.TREE_KINDS, horizontal=True, key="tree_kind")
    max_nodes = c4.number_input("at most nodes", 50, 20_000, 400, step=100, key="tree_max",
                                help="The largest trees are drawn first, whole, while they fit.")

stricter = [f"{name} {value:g}" for name, value, tighter in (
    ("link strength ≥", min_score, min_score > threshold),
    ("lift ≥", min_lift, min_lift > link_cfg.min_lift),
    ("P(child | parent) ≥", min_reverse, min_reverse > link_cfg.min_reverse),
    ("parent density ≤", max_parent, max_parent < link_cfg.max_parent_density)) if tighter]
if stricter:
    st.caption("This view keeps only this store's links with " + ", ".join(stricter) + " (stricter than the rule "
               "above, which the store was made with; the library's rule is chosen on held-out corpus parts: "
               "assets/README.md).")
nodes = tree.hierarchy_nodes(latents, links, min_score, groups, min_freq, threshold, min_reverse, max_parent,
                             min_lift)
if nodes.empty:
    st.info("No links at these settings: lower the link strength, the lift or the frequency, or add groups.")
    st.stop()
words = tree.word_latents(latents, store.vocab)
by_kind = tree.bands(nodes, words)
BANDS = dict(zip(tables.TREE_BANDS, tree.BAND_KINDS))
band = st.radio("trees", list(BANDS), horizontal=True, key="tree_band",
                format_func=lambda b: f"{b} · {int((by_kind[BANDS[b]]['parent'] < 0).sum()):,} trees, "
                                      f"{len(by_kind[BANDS[b]]):,} latents")
in_band = by_kind[BANDS[band]]
if in_band.empty:
    st.info("No tree in this band at these settings.")
    st.stop()
shown = tree.largest_trees(in_band, int(max_nodes))
n_roots = int((shown["parent"] < 0).sum())
st.caption(f"{len(shown):,} latents in {n_roots:,} trees" + (f" (the largest trees of {len(in_band):,} latents)"
                                                               if len(shown) < len(in_band) else "")
           + ". A tree's band is decided by its root alone: a hub's fires on more than "
             f"{tree.HUB_DENSITY:.0%} of tokens; of the others, a concept tree's root has top tokens that are at "
             "least half words (letters only, 3 or more, not a function word such as \"of\" or \"the\"), a symbol "
             "tree's does not. Trees are ordered by size (latents below the root), largest first, then by the rarer "
             "root. Click a node to select it (and zoom into it); colours are groups.")
with st.expander(f"The trees in view ({n_roots:,}): size, how much of the root its children cover, coherence",
                 expanded=True):
    st.dataframe(tree.trees_table(shown, latents), hide_index=True,
                 column_config={"fires on": st.column_config.NumberColumn(format="percent"),
                                "children cover": st.column_config.NumberColumn(format="percent")})
    members = tuple(tuple(t) for t in tree.tree_members(shown))
    coh = loaders.tree_coherence(store.manifest.model, members, latents, str(run),
                                 tuple(map(tuple, tree.band_pools(latents, words, BANDS[band]))))
    st.caption(tables.coherence_text(coh) if coh else "Coherence needs the shipped WordNet taxonomy of this model's "
                                                       "vocabulary.")


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
