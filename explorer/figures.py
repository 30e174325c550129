"""Every plotly figure of the app, from the library's results (metrics, feature stores, node tables of
explorer.tree, live latents, absorption, splitting and toy results).

Token text is user data, and plotly renders a few tags (<b>, <i>, <br>, ...) in its text and turns entities back
into characters: every string that reaches a plotly label or hover goes through `plot_text`."""

from __future__ import annotations

import html
from typing import Mapping, Sequence

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from explorer.tables import token_label
from explorer.tree import children_of
from msae.results import AbsorptionResult, GalleryCase, StoreManifest, ToyResult, TrainMetrics

GROUP_COLOURS = ("#636efa", "#ef553b", "#00cc96", "#ab63fa", "#ffa15a", "#19d3f3", "#ff6692", "#b6e880")
TREE_KINDS = ("icicle", "treemap", "sunburst")
TOY_ROWS = ("parent_absorption", "parent_fires_alone", "parent_cosine", "child_cosine", "child_fire_rate", "mean_cosine", "fvu")
"""The toy result's rates and cosines (0 to 1) that `toy_figure` draws; counts such as l0 would dwarf them."""


def plot_text(text: str, limit: int = 60) -> str:
    """Text for a plotly label or hover: shortened, line breaks visible, escaped."""
    text = text.replace("\n", "↵")
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    # Quotes stay as they are: plotly turns &lt; &gt; &amp; back into characters but shows &quot; as written.
    return html.escape(text, quote=False)


def group_colours(groups: Sequence[int]) -> list[str]:
    return [GROUP_COLOURS[int(g) % len(GROUP_COLOURS)] for g in groups]


# ------------------------------------------------------------------------------------------------ runs


def training_figure(metrics: Sequence[TrainMetrics], widths: Sequence[int],
                    title: str = "FVU per nested width during training") -> go.Figure:
    """FVU of every nested width against the step, from metrics.jsonl lines."""
    fig = go.Figure()
    steps = [m.step for m in metrics]
    for i, width in enumerate(widths):
        fig.add_scatter(x=steps, y=[m.fvu[i] for m in metrics], name=f"width {width}", mode="lines")
    fig.update_layout(title=title, xaxis_title="step", yaxis_title="FVU", yaxis_type="log", height=360)
    return fig


def l0_figure(metrics: Sequence[TrainMetrics]) -> go.Figure:
    """L0 and the dead fraction against the step."""
    fig = go.Figure()
    steps = [m.step for m in metrics]
    fig.add_scatter(x=steps, y=[m.l0 for m in metrics], name="L0", mode="lines")
    fig.add_scatter(x=steps, y=[m.dead_fraction for m in metrics], name="dead fraction", mode="lines", yaxis="y2")
    fig.update_layout(title="L0 and dead latents during training", xaxis_title="step", yaxis_title="L0", height=320,
                      yaxis2=dict(title="dead fraction", overlaying="y", side="right", rangemode="tozero"))
    return fig


# ------------------------------------------------------------------------------------------------ one feature


def histogram_figure(edges: Sequence[float], counts: Sequence[int], title: str = "activation histogram") -> go.Figure:
    """Counts (n_bins,) over log-spaced bins (edges: n_bins + 1) drawn as steps (the last count repeated to close
    the last bin)."""
    counts = [int(c) for c in counts]
    fig = go.Figure(go.Scatter(x=list(edges), y=counts + counts[-1:], mode="lines", line_shape="hv", fill="tozeroy",
                               name="tokens", hovertemplate="activation ≥ %{x:.3g}: %{y} tokens<extra></extra>"))
    fig.update_layout(title=title, xaxis_title="activation", yaxis_title="tokens", xaxis_type="log", height=300,
                      margin=dict(t=40, b=40))
    return fig


# ------------------------------------------------------------------------------------------------ hierarchy


def node_id(latent: int) -> str:
    return f"L{int(latent)}"


def latent_of_node(node: str) -> int | None:
    """The latent behind a node id of `hierarchy_figure` (None for anything else)."""
    return int(node[1:]) if isinstance(node, str) and node.startswith("L") and node[1:].isdigit() else None


def hierarchy_figure(nodes: pd.DataFrame, kind: str = "icicle", max_depth: int | None = None) -> go.Figure:
    """The forest (`tree.hierarchy_nodes`) as an icicle, treemap or sunburst: one node per latent labelled with
    its label (top tokens), coloured by group; ids are `L<latent>`."""
    if kind not in TREE_KINDS:
        raise ValueError(f"kind must be one of {TREE_KINDS}, got {kind!r}")
    trace = {"icicle": go.Icicle, "treemap": go.Treemap, "sunburst": go.Sunburst}[kind]
    labels = [f"{l} {plot_text(str(t), 30)}".strip() for l, t in zip(nodes["latent"], nodes["label"])]
    custom = list(zip(nodes["latent"].astype(int), nodes["group"].astype(int), nodes["width"].astype(int),
                      nodes["freq"].astype(float), nodes["score"].fillna(-1).astype(float)))
    fig = go.Figure(trace(
        ids=[node_id(l) for l in nodes["latent"]],
        parents=[node_id(p) if p >= 0 else "" for p in nodes["parent"]],
        labels=labels,
        customdata=custom,
        marker=dict(colors=group_colours(nodes["group"])),
        hovertemplate=("latent %{customdata[0]}<br>%{label}<br>group %{customdata[1]} (first in width "
                       "%{customdata[2]})<br>fires on %{customdata[3]:.3%} of tokens<br>link score "
                       "%{customdata[4]:.2f}<extra></extra>"),
        maxdepth=max_depth if max_depth else -1,
    ))
    # An icicle stacks the roots in one column: give each at least 16 px, so their labels stay readable.
    roots = int((nodes["parent"] < 0).sum())
    height = min(4000, max(640, 16 * roots)) if kind == "icicle" else 640
    fig.update_layout(height=height, margin=dict(t=10, l=10, r=10, b=10))
    return fig


def node_link_figure(nodes: pd.DataFrame) -> go.Figure:
    """A subtree (`tree.subtree`) as nodes and links: depth left to right, leaves spread top to bottom, parents
    centred on their children; link width by score. The node trace's customdata is the latent id."""
    children = children_of(nodes)
    y: dict[int, float] = {}
    next_leaf = [0]

    def place(latent: int) -> float:
        kids = children.get(latent, [])
        if not kids:
            y[latent] = next_leaf[0]
            next_leaf[0] += 1
        else:
            y[latent] = sum(place(k) for k in kids) / len(kids)
        return y[latent]

    for root in children.get(-1, []):
        place(root)
    info = nodes.set_index("latent")
    fig = go.Figure()
    for latent, parent, score in zip(nodes["latent"], nodes["parent"], nodes["score"]):
        if parent >= 0:
            fig.add_scatter(x=[info.at[parent, "depth"], info.at[latent, "depth"]], y=[-y[parent], -y[latent]],
                            mode="lines", line=dict(width=1 + 4 * max(min(float(score), 1.0), 0.0), color="#aaa"),
                            hoverinfo="skip", showlegend=False)
    fig.add_scatter(
        x=nodes["depth"].tolist(), y=[-y[l] for l in nodes["latent"]], mode="markers+text", name="latents",
        text=[f"{l} {plot_text(str(t), 24)}" for l, t in zip(nodes["latent"], nodes["label"])],
        textposition="middle right", customdata=nodes["latent"].astype(int).tolist(),
        marker=dict(size=14, color=group_colours(nodes["group"]), line=dict(width=1, color="#333")),
        hovertemplate="latent %{customdata}<br>%{text}<extra></extra>", showlegend=False)
    depth = int(nodes["depth"].max()) if len(nodes) else 0
    fig.update_layout(height=max(300, 28 * max(next_leaf[0], 1)), margin=dict(t=10, l=10, r=10, b=10),
                      xaxis=dict(visible=False, range=[-0.3, depth + 1.2]), yaxis=dict(visible=False))
    return fig


# ------------------------------------------------------------------------------------------------ live text


def heatmap_figure(tokens: Sequence[str], frame: pd.DataFrame, latent_ids: Sequence[int], labels: Sequence[str]) -> go.Figure:
    """Activation of the chosen latents (rows) on every token (columns), from a text's long frame (token, latent,
    act)."""
    index = {int(l): r for r, l in enumerate(latent_ids)}
    z_LT = [[0.0] * len(tokens) for _ in latent_ids]  # (chosen latents, tokens)
    for t, l, a in zip(frame["token"], frame["latent"], frame["act"]):
        r = index.get(int(l))
        if r is not None:
            z_LT[r][int(t)] = float(a)
    rows = [f"{l} {plot_text(lab, 24)}".strip() for l, lab in zip(latent_ids, labels)]
    fig = go.Figure(go.Heatmap(z=z_LT, x=list(range(len(tokens))), y=rows, colorscale="Oranges", zmin=0,
                               hovertemplate="token %{x}<br>%{y}<br>activation %{z:.3f}<extra></extra>"))
    fig.update_layout(height=max(240, 22 * len(rows) + 120), margin=dict(t=10, l=10, r=10, b=10),
                      xaxis=dict(tickmode="array", tickvals=list(range(len(tokens))),
                                 ticktext=[plot_text(token_label(t), 12) for t in tokens], tickangle=-60),
                      yaxis=dict(autorange="reversed"))
    return fig


# ------------------------------------------------------------------------------------------------ gallery


def gallery_heatmap(case: GalleryCase) -> go.Figure:
    """A gallery case's rows (tokens) × columns (latents) mean activations."""
    fig = go.Figure(go.Heatmap(z=case.heatmap, x=[f"[{i}]" for i in range(len(case.columns))],
                               y=[plot_text(token_label(r), 20) for r in case.rows], colorscale="Oranges", zmin=0,
                               customdata=[[c for c in case.columns] for _ in case.rows],
                               hovertemplate="%{y}<br>%{customdata}<br>mean activation %{z:.3f}<extra></extra>"))
    fig.update_layout(height=max(260, 26 * len(case.rows) + 120), margin=dict(t=10, l=10, r=10, b=10),
                      yaxis=dict(autorange="reversed"),
                      xaxis=dict(tickmode="array", tickvals=[f"[{i}]" for i in range(len(case.columns))],
                                 ticktext=[plot_text(c, 28) for c in case.columns], tickangle=-40))
    return fig


def gallery_cosines(case: GalleryCase) -> pd.DataFrame:
    """The case's decoder cosines as a table, columns named like the heatmap's."""
    names = [f"[{i}]" for i in range(len(case.columns))]
    frame = pd.DataFrame(case.decoder_cos, index=names, columns=names).round(2)
    frame.insert(0, "latent", case.columns)
    return frame


# ------------------------------------------------------------------------------------------------ diagnostics


ABSORPTION_MEASURES = {"absorption_fraction": "absorption fraction", "full_absorption_rate": "full absorption rate"}
"""The per-letter fields of an absorption result that `absorption_figure` draws, and their names."""


def absorption_figure(result: AbsorptionResult, metric: str = "absorption_fraction") -> go.Figure:
    """One bar per letter and SAE (letters whose probe is good enough, as the means use)."""
    fig = go.Figure()
    for name, res in result.saes.items():
        rows = [r for r in res.letters if r.used]
        fig.add_bar(x=[r.letter for r in rows], y=[getattr(r, metric) for r in rows], name=name)
    title = ABSORPTION_MEASURES[metric]
    fig.update_layout(barmode="group", xaxis_title="first letter", yaxis_title=title, height=360,
                      margin=dict(t=30, b=40), title=f"{title} per letter (lower is better)")
    return fig


def splitting_figure(manifest: StoreManifest) -> go.Figure:
    """Share of a narrow dictionary's live latents that a wider one splits into >= 2 (decoder cosine >= t): each
    Matryoshka prefix against the full SAE, and this SAE against the runs it was compared with."""
    bars: dict[str, dict[str, float]] = {}
    for name, shares in manifest.splitting.items():
        bars[f"{name.replace('prefix_', 'first ')} → {manifest.d_sae}"] = shares
    for other, summary in manifest.against.items():
        narrow = "this" if summary.narrow == "this" else other
        wide = other if narrow == "this" else "this"
        bars[f"{narrow} → {wide} ({other})"] = summary.split_share_decoder
    thresholds = sorted({t for shares in bars.values() for t in shares}, key=float)
    fig = go.Figure()
    for t in thresholds:
        fig.add_bar(x=list(bars), y=[bars[k].get(t) for k in bars], name=f"cos ≥ {t}")
    fig.update_layout(barmode="group", yaxis_title="share split into ≥ 2", height=360, margin=dict(t=30, b=40),
                      title="feature splitting")
    return fig


def fvu_l0_figure(points: Sequence[Mapping]) -> go.Figure:
    """FVU against L0, one marker per nested width; each SAE a line (`points`: tables.l0_fvu_point)."""
    fig = go.Figure()
    for p in points:
        fig.add_scatter(x=list(p["l0"]), y=list(p["fvu"]), mode="lines+markers+text", name=p["name"],
                        text=[str(w) for w in p["widths"]], textposition="top center")
    fig.update_layout(xaxis_title="L0 (active latents per token)", yaxis_title="FVU", height=380,
                      margin=dict(t=30, b=40), title="reconstruction against sparsity, per nested width")
    return fig


def toy_figure(result: ToyResult) -> go.Figure:
    """The toy comparison's rates and cosines (`toy.compare`), vanilla beside Matryoshka."""
    fig = go.Figure()
    for name in ("vanilla", "matryoshka"):
        fig.add_bar(x=list(TOY_ROWS), y=[getattr(getattr(result, name), k) for k in TOY_ROWS], name=name)
    fig.update_layout(barmode="group", height=360, margin=dict(t=30, b=40), yaxis_title="value",
                      title="toy hierarchy with known features")
    return fig


WIDTH_SWEEP_PANELS = {
    ("taxonomy", "absorption"): "taxonomy absorption (WordNet categories)",
    ("first_letter", "absorption_fraction"): "first-letter absorption fraction",
}
"""The figures of benchmarks/sweep_width.py's JSON that `width_sweep_figure` draws (where each SAE's entry keeps
them), and their titles."""
ARCH_COLOURS = {"matryoshka": GROUP_COLOURS[0], "vanilla": GROUP_COLOURS[1]}


DODGE_OCTAVES = 0.06
"""How far apart, in octaves on the log width axis, the width sweep figure draws the points of one width."""


def dodged_width(width: int, slot: int, slots: int) -> float:
    """Where the width sweep figure draws point `slot` of the `slots` at `width`: centred on it, DODGE_OCTAVES
    apart."""
    return width * 2 ** (DODGE_OCTAVES * (slot - (slots - 1) / 2))


def width_sweep_figure(sweep: Mapping) -> go.Figure:
    """Absorption against dictionary width for both architectures, one panel per measure: every (width, seed) a
    point with its 95% interval (`sweep`: one settings' entry of benchmarks/results/sweep_width.json). The points of
    one width sit side by side around it (`dodged_width`), Matryoshka's seeds left of vanilla's, so that no interval
    hides another; the hover gives the width itself."""
    fig = make_subplots(rows=1, cols=len(WIDTH_SWEEP_PANELS), subplot_titles=list(WIDTH_SWEEP_PANELS.values()))
    pairs = [(int(width), int(seed), entry) for width, seeds in sweep["runs"].items() for seed, entry in seeds.items()]
    pairs.sort(key=lambda p: (p[0], p[1]))
    widths = sorted({w for w, _s, _e in pairs})
    seeds = {w: [s for pw, s, _e in pairs if pw == w] for w in widths}
    for col, (part, field) in enumerate(WIDTH_SWEEP_PANELS, start=1):
        for a, (arch, colour) in enumerate(ARCH_COLOURS.items()):
            points = [(w, s, e[arch][part][field]) for w, s, e in pairs if e[arch][part][field] is not None]
            fig.add_scatter(
                x=[dodged_width(w, a * len(seeds[w]) + seeds[w].index(s), len(ARCH_COLOURS) * len(seeds[w]))
                   for w, s, _p in points],
                y=[p["mean"] for _w, _s, p in points], customdata=[[w, s] for w, s, _p in points],
                error_y=dict(type="data", symmetric=False, array=[p["high"] - p["mean"] for _w, _s, p in points],
                             arrayminus=[p["mean"] - p["low"] for _w, _s, p in points]),
                mode="markers", name=arch, legendgroup=arch, showlegend=col == 1, marker=dict(color=colour, size=9),
                row=1, col=col,
                hovertemplate=f"{arch}<br>width %{{customdata[0]:,}} seed %{{customdata[1]}}<br>%{{y:.3f}}<extra></extra>")
        fig.update_xaxes(type="log", title_text="latents", tickvals=widths, ticktext=[f"{w:,}" for w in widths],
                         row=1, col=col)
        fig.update_yaxes(title_text="absorption (lower is better)", rangemode="tozero", row=1, col=col)
    fig.update_layout(height=400, margin=dict(t=50, b=40), title="absorption against dictionary width (95% intervals)")
    return fig


def worst_part(entry: Mapping) -> Mapping | None:
    """The left-out corpus part on which a rule of benchmarks/bench_links.py's curve holds least (lowest held-out
    P(p | c) among the parts it measured links on)."""
    parts = [p for p in entry["left_out"] if p.get("heldout")]
    return min(parts, key=lambda p: p["heldout"]["mean"]) if parts else None


def link_curve_figure(curve: Mapping) -> go.Figure:
    """The link rule's trade-off (benchmarks/results/links.json): each rule a point, the tree links it keeps on all
    rows against the held-out P(parent | child) on its worst left-out corpus part (95% interval resampling parents),
    coloured by its lift bound; the targets as lines and the chosen rule ringed."""
    fig = go.Figure()
    lifts = sorted({e["rule"]["min_lift"] for e in curve["curve"]})
    for i, lift in enumerate(lifts):
        rows = [(e, worst_part(e)) for e in curve["curve"] if e["rule"]["min_lift"] == lift]
        rows = [(e, w) for e, w in rows if w is not None]
        fig.add_scatter(
            x=[e["tree_links"] for e, _w in rows], y=[w["heldout"]["mean"] for _e, w in rows],
            error_y=dict(type="data", symmetric=False, array=[w["heldout"]["high"] - w["heldout"]["mean"] for _e, w in rows],
                         arrayminus=[w["heldout"]["mean"] - w["heldout"]["low"] for _e, w in rows], thickness=1),
            customdata=[[e["rule"]["min_coverage"], e["rule"]["max_parent_density"], e["rule"]["min_reverse"], w["part"],
                         e["hub_share"]] for e, w in rows],
            mode="markers", name=f"lift ≥ {lift:g}", marker=dict(color=GROUP_COLOURS[i % len(GROUP_COLOURS)], size=8),
            hovertemplate="P(p | c) ≥ %{customdata[0]}, parent density ≤ %{customdata[1]}, P(c | p) ≥ "
                          "%{customdata[2]}<br>%{x:,} tree links; on %{customdata[3]} (left out): %{y:.3f}"
                          "<br>under hub parents: %{customdata[4]:.0%}<extra></extra>")
    chosen = curve.get("chosen")
    chosen_worst = worst_part(chosen) if chosen is not None else None
    if chosen_worst is not None:
        fig.add_scatter(x=[chosen["tree_links"]], y=[chosen_worst["heldout"]["mean"]], mode="markers",
                        name="chosen rule", hoverinfo="skip",
                        marker=dict(size=18, color="rgba(0,0,0,0)", line=dict(color="black", width=2)))
    target = curve.get("target", {})
    if "heldout_per_part" in target:
        fig.add_hline(y=target["heldout_per_part"], line_dash="dot", annotation_text="target P(p | c)")
    if "tree_links" in target:
        fig.add_vline(x=target["tree_links"], line_dash="dot", annotation_text="target links")
    fig.update_xaxes(type="log", title_text="tree links kept (all rows)")
    fig.update_yaxes(title_text="held-out P(parent | child), worst left-out part")
    fig.update_layout(height=420, margin=dict(t=50, b=40),
                      title="link rules: links kept against how well they hold on a corpus part left out")
    return fig
