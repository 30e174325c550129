"""Figures, tables and HTML for the explorer: plain functions from the library's results (runs, feature stores,
live latents, absorption and toy results) to plotly figures, pandas tables and escaped HTML. No Streamlit here
(DESIGN.md §1): the pages only lay these out.

Token text is user data. Every string that reaches HTML goes through `html.escape`, and so does every string
that reaches a plotly label, because plotly renders a few tags (<b>, <i>, <br>, ...) in its text and turns
entities back into characters."""

from __future__ import annotations

import html
from collections import defaultdict
from typing import Iterable, Mapping, Sequence

import pandas as pd
import plotly.graph_objects as go

HIGHLIGHT_RGB = "255, 140, 0"
"""Token highlight colour; its opacity is the activation over the scale."""
GROUP_COLOURS = ("#636efa", "#ef553b", "#00cc96", "#ab63fa", "#ffa15a", "#19d3f3", "#ff6692", "#b6e880")
TREE_KINDS = ("icicle", "treemap", "sunburst")


# ------------------------------------------------------------------------------------------------ token text


def token_label(token: str) -> str:
    """A token as plain text in a table: leading/trailing spaces and line breaks made visible."""
    out = token.replace("\n", "↵").replace("\t", "⇥")
    stripped = out.strip(" ")
    if stripped != out:
        lead = len(out) - len(out.lstrip(" "))
        trail = len(out) - len(out.rstrip(" "))
        out = "␣" * lead + stripped + "␣" * trail
    return out or "␣"


def escape_token(token: str, breaks: bool = False) -> str:
    """A token as HTML: escaped, with tabs made visible and line breaks shown as ↵ (and broken when `breaks`)."""
    text = html.escape(token).replace("\t", "⇥")
    return text.replace("\n", "↵<br>" if breaks else "↵")


def plot_text(text: str, limit: int = 60) -> str:
    """Text for a plotly label or hover: shortened, line breaks visible, escaped."""
    text = text.replace("\n", "↵")
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return html.escape(text)


def tokens_html(tokens: Sequence[str], acts: Sequence[float], scale: float | None = None, center: int | None = None,
                titles: Sequence[str] | None = None, breaks: bool = False) -> str:
    """Tokens in a row, each shaded by its activation over `scale` (default: the largest); `center` is underlined;
    `titles` are hover texts (default: the activation)."""
    scale = scale or max((float(a) for a in acts), default=0.0) or 1.0
    spans = []
    for i, (token, act) in enumerate(zip(tokens, acts)):
        alpha = min(max(float(act) / scale, 0.0), 1.0)
        style = f"background-color: rgba({HIGHLIGHT_RGB}, {alpha:.2f});" if alpha > 0 else ""
        if i == center:
            style += " border-bottom: 2px solid #c0392b; font-weight: 600;"
        title = titles[i] if titles is not None else (f"{float(act):.3f}" if act > 0 else "")
        title_attr = f' title="{html.escape(title)}"' if title else ""
        active = " msae-active" if alpha > 0 else ""
        spans.append(f'<span class="msae-tok{active}" style="{style}"{title_attr}>{escape_token(token, breaks)}</span>')
    return ('<div class="msae-tokens" style="font-family: ui-monospace, monospace; white-space: pre-wrap; '
            f'line-height: 1.8;">{"".join(spans)}</div>')


def example_tokens(token_ids: Sequence[int], acts: Sequence[float], center: int, vocab: Sequence[str]
                   ) -> tuple[list[str], list[float], int]:
    """Tokens, activations and the centre's index of a stored example window (-1 marks slots outside the context)."""
    kept = [(i, int(t), float(a)) for i, (t, a) in enumerate(zip(token_ids, acts)) if int(t) >= 0]
    new_center = next((j for j, (i, _t, _a) in enumerate(kept) if i == center), -1)
    return [vocab[t] for _i, t, _a in kept], [a for _i, _t, a in kept], new_center


def examples_html(examples: pd.DataFrame, vocab: Sequence[str], scale: float | None = None) -> str:
    """One line per stored example: its activation, then its window with every token shaded by the latent."""
    if examples.empty:
        return '<div class="msae-examples"><i>no examples</i></div>'
    rows = []
    for ex in examples.itertuples():
        tokens, acts, center = example_tokens(ex.tokens, ex.acts, int(ex.center), vocab)
        body = tokens_html(tokens, acts, scale=scale, center=center)
        rows.append('<div class="msae-example" style="display: flex; gap: 0.8em; padding: 2px 0; '
                    'border-bottom: 1px solid rgba(128,128,128,0.2);">'
                    f'<span style="min-width: 4.5em; color: #888; font-family: monospace;">{float(ex.act):.3f}</span>'
                    f'{body}</div>')
    return f'<div class="msae-examples">{"".join(rows)}</div>'


# ------------------------------------------------------------------------------------------------ runs


def training_figure(metrics: Sequence[Mapping], widths: Sequence[int], title: str = "FVU per nested width during training"
                    ) -> go.Figure:
    """FVU of every nested width against the step, from metrics.jsonl lines."""
    fig = go.Figure()
    steps = [m["step"] for m in metrics]
    for i, width in enumerate(widths):
        fig.add_scatter(x=steps, y=[m["fvu"][i] for m in metrics], name=f"width {width}", mode="lines")
    fig.update_layout(title=title, xaxis_title="step", yaxis_title="FVU", yaxis_type="log", height=360)
    return fig


def l0_figure(metrics: Sequence[Mapping]) -> go.Figure:
    """L0 and the dead fraction against the step."""
    fig = go.Figure()
    steps = [m["step"] for m in metrics]
    fig.add_scatter(x=steps, y=[m["l0"] for m in metrics], name="L0", mode="lines")
    fig.add_scatter(x=steps, y=[m.get("dead_fraction") for m in metrics], name="dead fraction", mode="lines", yaxis="y2")
    fig.update_layout(title="L0 and dead latents during training", xaxis_title="step", yaxis_title="L0", height=320,
                      yaxis2=dict(title="dead fraction", overlaying="y", side="right", rangemode="tozero"))
    return fig


def runs_table(summaries: Sequence[Mapping], labels: Sequence[str]) -> pd.DataFrame:
    """One row per run, for the home page (`runs.summary` rows under their short names)."""
    table = pd.DataFrame(list(summaries))
    if table.empty:
        return table
    table.insert(0, "name", list(labels))
    for column, fmt in (("widths", str), ("fvu", "{:.3f}".format)):
        if column in table:
            table[column] = table[column].map(
                lambda values: ", ".join(fmt(v) for v in values) if isinstance(values, (list, tuple)) else "")
    return table


def summary_table(info: Mapping, heldout: Mapping | None, manifest: Mapping | None) -> pd.DataFrame:
    """The chosen run in rows: model, layer, widths, k, FVU per width (held-out when measured), L0, dead fraction."""
    widths = list(info.get("widths") or [])

    def per_width(values) -> str:
        return ", ".join(f"{w}: {v:.3f}" for w, v in zip(widths, values)) if values else "—"

    rows = [
        ("architecture", info.get("architecture")),
        ("model", info.get("model") or "—"),
        ("layer", info.get("layer") if info.get("layer") is not None else "—"),
        ("d_in", info.get("d_in")),
        ("widths", ", ".join(str(w) for w in widths)),
        ("k", info.get("k")),
        ("training steps", info.get("steps")),
        ("training tokens", f"{info['tokens']:,}" if info.get("tokens") else "—"),
        ("FVU per width (last training step)", per_width(info.get("fvu"))),
        ("L0 (last training step)", f"{info['l0']:.1f}" if info.get("l0") is not None else "—"),
    ]
    if heldout:
        rows += [
            ("FVU per width (held-out)", per_width(heldout.get("fvu"))),
            ("L0 (held-out)", f"{heldout['l0']:.1f}" if heldout.get("l0") is not None else "—"),
            ("dead fraction (held-out)", f"{heldout['dead_fraction']:.3f}" if heldout.get("dead_fraction") is not None else "—"),
        ]
        if heldout.get("ce_loss_recovered") is not None:
            rows.append(("CE loss recovered (held-out)", f"{heldout['ce_loss_recovered']:.3f}"))
    rows.append(("dead fraction (training)", f"{info['dead_fraction']:.3f}" if info.get("dead_fraction") is not None else "—"))
    if manifest:
        rows.append(("feature store", f"{manifest.get('rows', 0):,} tokens analysed"))
        rows.append(("L0 per width (feature store)", per_width(manifest.get("l0_per_width"))))
    else:
        rows.append(("feature store", "none (run `msae analyze` on this run)"))
    return pd.DataFrame(rows, columns=["", "value"]).astype({"value": str})


# ------------------------------------------------------------------------------------------------ one feature


def histogram_figure(edges: Sequence[float], counts: Sequence[int], title: str = "activation histogram") -> go.Figure:
    """Counts over log-spaced bins drawn as steps (the last count repeated to close the last bin)."""
    counts = [int(c) for c in counts]
    fig = go.Figure(go.Scatter(x=list(edges), y=counts + counts[-1:], mode="lines", line_shape="hv", fill="tozeroy",
                               name="tokens", hovertemplate="activation ≥ %{x:.3g}: %{y} tokens<extra></extra>"))
    fig.update_layout(title=title, xaxis_title="activation", yaxis_title="tokens", xaxis_type="log", height=300,
                      margin=dict(t=40, b=40))
    return fig


def promoted_table(latent: Mapping) -> pd.DataFrame:
    """The tokens a latent promotes and suppresses most through the unembedding, with their logits."""
    if "promoted" not in latent or latent["promoted"] is None:
        return pd.DataFrame()
    return pd.DataFrame({
        "promoted": [token_label(t) for t in latent["promoted"]],
        "promoted logit": [float(v) for v in latent["promoted_logits"]],
        "suppressed": [token_label(t) for t in latent["suppressed"]],
        "suppressed logit": [float(v) for v in latent["suppressed_logits"]],
    })


def relatives_table(links: pd.DataFrame, latents: pd.DataFrame, side: str) -> pd.DataFrame:
    """Parents (`side` = "parent") or children ("child") of a latent from its links, with their labels."""
    if links is None or links.empty:
        return pd.DataFrame(columns=["latent", "label", "group", "score", "decoder_cos", "cofires"])
    ids = links[side].astype(int).to_numpy()
    info = latents.set_index("latent").loc[ids]
    return pd.DataFrame({
        "latent": ids,
        "label": info["label"].to_numpy(),
        "group": info["group"].to_numpy(),
        "score": links["score"].to_numpy(),
        "decoder_cos": links["decoder_cos"].to_numpy(),
        "cofires": links["cofires"].to_numpy(),
    })


def latent_caption(row: Mapping) -> str:
    """`#id label` for buttons and lists."""
    label = str(row.get("label") or "").strip()
    return f"#{int(row['latent'])} {label}" if label else f"#{int(row['latent'])}"


# ------------------------------------------------------------------------------------------------ hierarchy


def hierarchy_nodes(latents: pd.DataFrame, links: pd.DataFrame, min_score: float, groups: Iterable[int] | None = None,
                    min_freq: float = 0.0) -> pd.DataFrame:
    """The forest of the Hierarchy page: latents of `groups` that fire on at least `min_freq` of tokens, each
    child under its best-scoring parent among them with a link score >= `min_score`. Latents in no such link
    are left out. Columns: latent, parent (-1: a root), score, label, group, width, freq, depth, root, descendants.
    Parents always sit in earlier groups than their children, so the result is a forest."""
    keep = latents[latents["count"] > 0]
    if groups is not None:
        keep = keep[keep["group"].isin(list(groups))]
    keep = keep[keep["freq"] >= min_freq]
    ids = set(keep["latent"].tolist())
    cand = links[(links["score"] >= min_score) & links["parent"].isin(ids) & links["child"].isin(ids)]
    best = cand.sort_values(["score", "parent"], ascending=[False, True]).drop_duplicates("child").set_index("child")
    in_tree = set(best.index.tolist()) | set(best["parent"].tolist())
    nodes = keep[keep["latent"].isin(in_tree)][["latent", "label", "group", "width", "freq"]].copy()
    nodes["parent"] = nodes["latent"].map(best["parent"]).fillna(-1).astype(int)
    nodes["score"] = nodes["latent"].map(best["score"]).astype(float)
    nodes = nodes.sort_values(["group", "latent"], ignore_index=True)

    depth, root = {}, {}
    for latent, parent in zip(nodes["latent"].tolist(), nodes["parent"].tolist()):
        depth[latent] = 0 if parent < 0 else depth[parent] + 1
        root[latent] = latent if parent < 0 else root[parent]
    below = defaultdict(int)
    for latent, parent in zip(reversed(nodes["latent"].tolist()), reversed(nodes["parent"].tolist())):
        if parent >= 0:
            below[parent] += below[latent] + 1
    nodes["depth"] = nodes["latent"].map(depth)
    nodes["root"] = nodes["latent"].map(root)
    nodes["descendants"] = nodes["latent"].map(lambda l: below[l]).astype(int)
    return nodes[["latent", "parent", "score", "label", "group", "width", "freq", "depth", "root", "descendants"]]


def largest_trees(nodes: pd.DataFrame, max_nodes: int) -> pd.DataFrame:
    """Whole trees, largest first, while they fit in `max_nodes` (at least the largest one)."""
    if len(nodes) <= max_nodes:
        return nodes
    sizes = nodes.groupby("root").size().sort_values(ascending=False, kind="stable")
    kept, total = [], 0
    for root, size in sizes.items():
        if kept and total + size > max_nodes:
            continue
        kept.append(root)
        total += size
    return nodes[nodes["root"].isin(kept)]


def subtree(nodes: pd.DataFrame, top: int) -> pd.DataFrame:
    """`top` and everything under it, `top` made the root."""
    children = defaultdict(list)
    for latent, parent in zip(nodes["latent"].tolist(), nodes["parent"].tolist()):
        children[parent].append(latent)
    wanted, stack = [], [top]
    while stack:
        latent = stack.pop()
        wanted.append(latent)
        stack.extend(children[latent])
    out = nodes[nodes["latent"].isin(wanted)].copy()
    out.loc[out["latent"] == top, "parent"] = -1
    return out


def node_id(latent: int) -> str:
    return f"L{int(latent)}"


def latent_of_node(node: str) -> int | None:
    """The latent behind a node id of `hierarchy_figure` (None for anything else)."""
    return int(node[1:]) if isinstance(node, str) and node.startswith("L") and node[1:].isdigit() else None


def hierarchy_figure(nodes: pd.DataFrame, kind: str = "icicle", max_depth: int | None = None) -> go.Figure:
    """The forest as an icicle, treemap or sunburst: one node per latent labelled with its label (top tokens),
    coloured by group; ids are `L<latent>`."""
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
        marker=dict(colors=[GROUP_COLOURS[g % len(GROUP_COLOURS)] for g in nodes["group"]]),
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
    """A subtree as nodes and links: depth left to right, leaves spread top to bottom, parents centred on their
    children; link width by score. The node trace's customdata is the latent id."""
    children = defaultdict(list)
    for latent, parent in zip(nodes["latent"].tolist(), nodes["parent"].tolist()):
        children[parent].append(latent)
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
        marker=dict(size=14, color=[GROUP_COLOURS[g % len(GROUP_COLOURS)] for g in nodes["group"]],
                    line=dict(width=1, color="#333")),
        hovertemplate="latent %{customdata}<br>%{text}<extra></extra>", showlegend=False)
    depth = int(nodes["depth"].max()) if len(nodes) else 0
    fig.update_layout(height=max(300, 28 * max(next_leaf[0], 1)), margin=dict(t=10, l=10, r=10, b=10),
                      xaxis=dict(visible=False, range=[-0.3, depth + 1.2]), yaxis=dict(visible=False))
    return fig


def ancestry(latents: pd.DataFrame, latent: int) -> list[int]:
    """The latent's chain of tree parents, root first, ending with the latent itself (store column tree_parent)."""
    if "tree_parent" not in latents:
        return [int(latent)]
    parent_of = latents["tree_parent"].to_numpy()
    chain = [int(latent)]
    while parent_of[chain[-1]] >= 0 and len(chain) <= len(parent_of):
        chain.append(int(parent_of[chain[-1]]))
    return chain[::-1]


# ------------------------------------------------------------------------------------------------ live text


def labels_of(latents: pd.DataFrame | None, ids: Iterable[int]) -> list[str]:
    """Labels of latents from a store's table ('' without one)."""
    ids = [int(i) for i in ids]
    if latents is None:
        return [""] * len(ids)
    return latents["label"].to_numpy()[ids].tolist() if ids else []


def with_labels(table: pd.DataFrame, latents: pd.DataFrame | None, column: str = "latent") -> pd.DataFrame:
    """`table` with a label (and group, when known) column after `column`."""
    out = table.copy()
    at = list(out.columns).index(column) + 1
    out.insert(at, "label", labels_of(latents, out[column]))
    if latents is not None and "group" in latents:
        out.insert(at + 1, "group", latents["group"].to_numpy()[out[column].astype(int).to_numpy()])
    return out


def per_token_table(tokens: Sequence[str], frame: pd.DataFrame, latents: pd.DataFrame | None, n: int = 5) -> pd.DataFrame:
    """Per token: its text, how many latents fire on it, and the strongest `n` as `#id label (act)`."""
    grouped = {t: g for t, g in frame.groupby("token")} if len(frame) else {}
    rows = []
    for i, token in enumerate(tokens):
        g = grouped.get(i)
        if g is None:
            rows.append((i, token_label(token), 0, ""))
            continue
        top = g.nlargest(n, "act")
        labels = labels_of(latents, top["latent"])
        parts = [f"#{l} {lab} ({a:.2f})".replace("  ", " ") for l, lab, a in zip(top["latent"], labels, top["act"])]
        rows.append((i, token_label(token), len(g), " · ".join(parts)))
    return pd.DataFrame(rows, columns=["position", "token", "active", "strongest latents"])


def latent_acts(frame: pd.DataFrame, latent: int, n_tokens: int) -> list[float]:
    """One latent's activation on every token of a text (0 where it is silent)."""
    acts = [0.0] * n_tokens
    hit = frame[frame["latent"] == latent]
    for t, a in zip(hit["token"], hit["act"]):
        acts[int(t)] = float(a)
    return acts


def prompts_overview(prompts: Sequence[str], results: Sequence, latents: pd.DataFrame | None, n: int = 5) -> pd.DataFrame:
    """One row per prompt: its start, its token count, how many latents fire, and its strongest `n` latents."""
    rows = []
    for i, (prompt, r) in enumerate(zip(prompts, results)):
        f = r.latents[0]
        top = f.groupby("latent")["act"].max().nlargest(n) if len(f) else pd.Series(dtype=float)
        labels = labels_of(latents, top.index)
        rows.append((i, prompt[:80].replace("\n", "↵"), len(r.tokens), f["latent"].nunique() if len(f) else 0,
                     " · ".join(f"#{l} {lab} ({a:.2f})".replace("  ", " ") for l, lab, a in zip(top.index, labels, top))))
    return pd.DataFrame(rows, columns=["prompt", "text", "tokens", "latents active", "strongest latents"])


def heatmap_figure(tokens: Sequence[str], frame: pd.DataFrame, latent_ids: Sequence[int], labels: Sequence[str]) -> go.Figure:
    """Activation of the chosen latents (rows) on every token (columns)."""
    index = {int(l): r for r, l in enumerate(latent_ids)}
    z = [[0.0] * len(tokens) for _ in latent_ids]
    for t, l, a in zip(frame["token"], frame["latent"], frame["act"]):
        r = index.get(int(l))
        if r is not None:
            z[r][int(t)] = float(a)
    rows = [f"{l} {plot_text(lab, 24)}".strip() for l, lab in zip(latent_ids, labels)]
    fig = go.Figure(go.Heatmap(z=z, x=list(range(len(tokens))), y=rows, colorscale="Oranges", zmin=0,
                               hovertemplate="token %{x}<br>%{y}<br>activation %{z:.3f}<extra></extra>"))
    fig.update_layout(height=max(240, 22 * len(rows) + 120), margin=dict(t=10, l=10, r=10, b=10),
                      xaxis=dict(tickmode="array", tickvals=list(range(len(tokens))),
                                 ticktext=[plot_text(token_label(t), 12) for t in tokens], tickangle=-60),
                      yaxis=dict(autorange="reversed"))
    return fig


def paths_table(latents: pd.DataFrame, top: pd.DataFrame) -> pd.DataFrame:
    """For each of a text's top latents, its path down the hierarchy tree (root first); ancestors that fire on the
    text too are marked ●."""
    active = set(top["latent"].astype(int).tolist())
    rows = []
    for latent in top["latent"].astype(int):
        chain = ancestry(latents, latent)
        steps = [f"{'●' if c in active else '○'} #{c} {latents['label'].iat[c]}".rstrip() for c in chain]
        rows.append((latent, latents["label"].iat[latent], int(latents["group"].iat[latent]), len(chain) - 1,
                     sum(c in active for c in chain[:-1]), "  ›  ".join(steps)))
    return pd.DataFrame(rows, columns=["latent", "label", "group", "depth", "active ancestors", "path"])


def results_frame(prompts: Sequence[str], results: Sequence, latents: pd.DataFrame | None, which: int = 0) -> pd.DataFrame:
    """Every (prompt, token, active latent) of many prompts, for download."""
    frames = []
    for p, r in enumerate(results):
        f = r.latents[which]
        frames.append(pd.DataFrame({
            "prompt": p,
            "position": f["token"].astype(int).to_numpy(),
            "token": [r.tokens[int(t)] for t in f["token"]],
            "latent": f["latent"].astype(int).to_numpy(),
            "act": f["act"].to_numpy(),
            "label": labels_of(latents, f["latent"]),
        }))
    if not frames:
        return pd.DataFrame(columns=["prompt", "position", "token", "latent", "act", "label"])
    return pd.concat(frames, ignore_index=True)


# ------------------------------------------------------------------------------------------------ compare


def side_by_side(tokens: Sequence[str], frame_a: pd.DataFrame, frame_b: pd.DataFrame, latents_a: pd.DataFrame | None,
                 latents_b: pd.DataFrame | None, names: tuple[str, str], n: int = 4) -> pd.DataFrame:
    """Per token, the strongest latents of SAE a and of SAE b."""
    a = per_token_table(tokens, frame_a, latents_a, n)
    b = per_token_table(tokens, frame_b, latents_b, n)
    return pd.DataFrame({
        "position": a["position"], "token": a["token"],
        f"{names[0]} active": a["active"], f"{names[0]} latents": a["strongest latents"],
        f"{names[1]} active": b["active"], f"{names[1]} latents": b["strongest latents"],
    })


def compare_tables(top_a: pd.DataFrame, top_b: pd.DataFrame, pairs: pd.DataFrame, latents_a: pd.DataFrame | None,
                   latents_b: pd.DataFrame | None, names: tuple[str, str]) -> dict[str, pd.DataFrame]:
    """From the active latents of a text in SAEs a and b (`inference.top_latents`, all of them) and the decoder
    matching (columns a, b, cos): the matched pairs with either side active, and the active latents whose
    partner is silent or that have no partner, on each side."""
    a_act = top_a.set_index("latent")["max_act"]
    b_act = top_b.set_index("latent")["max_act"]
    na, nb = names
    hit = pairs[pairs["a"].isin(a_act.index) | pairs["b"].isin(b_act.index)]
    matched = pd.DataFrame({
        f"{na} latent": hit["a"].astype(int).to_numpy(),
        f"{na} label": labels_of(latents_a, hit["a"]),
        f"{na} max act": hit["a"].map(a_act).fillna(0.0).to_numpy(),
        f"{nb} latent": hit["b"].astype(int).to_numpy(),
        f"{nb} label": labels_of(latents_b, hit["b"]),
        f"{nb} max act": hit["b"].map(b_act).fillna(0.0).to_numpy(),
        "decoder cos": hit["cos"].to_numpy(),
    })
    if len(matched):
        both = (matched[f"{na} max act"] > 0) & (matched[f"{nb} max act"] > 0)
        matched.insert(0, "both active", both.to_numpy())
        matched = matched.sort_values(["both active", "decoder cos"], ascending=False, ignore_index=True)
    partner_of_a = pairs.set_index("a")["b"]
    partner_of_b = pairs.set_index("b")["a"]

    def only(top: pd.DataFrame, partner: pd.Series, other_active: pd.Series, latents, other: str) -> pd.DataFrame:
        p = top["latent"].map(partner)
        lacking = p.isna() | ~p.isin(other_active.index)
        out = with_labels(top[lacking][["latent", "max_act", "n_tokens"]], latents)
        out[f"{other} partner"] = p[lacking].map(lambda v: "none" if pd.isna(v) else f"#{int(v)} (silent)").to_numpy()
        return out.reset_index(drop=True)

    return {
        "matched": matched,
        f"only {na}": only(top_a, partner_of_a, b_act, latents_a, nb),
        f"only {nb}": only(top_b, partner_of_b, a_act, latents_b, na),
    }


# ------------------------------------------------------------------------------------------------ diagnostics


def absorption_figure(result: Mapping, metric: str = "mean_absorption_fraction") -> go.Figure:
    """One bar per letter and SAE (letters whose probe is good enough, as the means use)."""
    fig = go.Figure()
    for name, res in result.get("saes", {}).items():
        rows = [r for r in res.get("letters", []) if r.get("used")]
        fig.add_bar(x=[r["letter"] for r in rows], y=[r.get(metric) for r in rows], name=name)
    title = {"mean_absorption_fraction": "absorption fraction", "full_absorption_rate": "full absorption rate"}.get(metric, metric)
    fig.update_layout(barmode="group", xaxis_title="first letter", yaxis_title=title, height=360,
                      margin=dict(t=30, b=40), title=f"{title} per letter (lower is better)")
    return fig


def absorption_table(result: Mapping) -> pd.DataFrame:
    """The means over letters, one row per SAE."""
    rows = []
    for name, res in result.get("saes", {}).items():
        mean = res.get("mean", {})
        rows.append({"SAE": name, "absorption fraction": mean.get("absorption_fraction"),
                     "full absorption rate": mean.get("full_absorption_rate"),
                     "main latents per letter": mean.get("n_main_latents"), "main-latent F1": mean.get("main_f1"),
                     "letters used": mean.get("n_letters")})
    return pd.DataFrame(rows)


def splitting_figure(manifest: Mapping) -> go.Figure:
    """Share of a narrow dictionary's live latents that a wider one splits into >= 2 (decoder cosine >= t): each
    Matryoshka prefix against the full SAE, and this SAE against the runs it was compared with."""
    bars: dict[str, dict[str, float]] = {}
    for name, shares in manifest.get("splitting", {}).items():
        bars[f"{name.replace('prefix_', 'first ')} → {manifest.get('d_sae')}"] = shares
    for other, summary in manifest.get("against", {}).items():
        narrow = "this" if summary.get("narrow") == "this" else other
        wide = other if narrow == "this" else "this"
        bars[f"{narrow} → {wide} ({other})"] = summary.get("split_share_decoder", {})
    thresholds = sorted({t for shares in bars.values() for t in shares}, key=float)
    fig = go.Figure()
    for t in thresholds:
        fig.add_bar(x=list(bars), y=[bars[k].get(t) for k in bars], name=f"cos ≥ {t}")
    fig.update_layout(barmode="group", yaxis_title="share split into ≥ 2", height=360, margin=dict(t=30, b=40),
                      title="feature splitting")
    return fig


def fvu_l0_figure(points: Sequence[Mapping]) -> go.Figure:
    """FVU against L0, one marker per nested width; each SAE a line (`points`: name, widths, fvu, l0)."""
    fig = go.Figure()
    for p in points:
        fig.add_scatter(x=list(p["l0"]), y=list(p["fvu"]), mode="lines+markers+text", name=p["name"],
                        text=[str(w) for w in p["widths"]], textposition="top center")
    fig.update_layout(xaxis_title="L0 (active latents per token)", yaxis_title="FVU", height=380,
                      margin=dict(t=30, b=40), title="reconstruction against sparsity, per nested width")
    return fig


def l0_fvu_points(name: str, manifest: Mapping | None, heldout: Mapping | None, training: Mapping | None,
                  widths: Sequence[int]) -> dict | None:
    """FVU (held-out if measured, else the last training step) and L0 per width of one SAE; the nested widths'
    L0 comes from its feature store, else every width gets the overall L0."""
    fvu = (heldout or {}).get("fvu") or (training or {}).get("fvu")
    if not fvu:
        return None
    l0 = (manifest or {}).get("l0_per_width")
    if not l0:
        overall = (heldout or {}).get("l0") or (training or {}).get("l0")
        if overall is None:
            return None
        l0 = [overall] * len(fvu)
    return {"name": name, "widths": list(widths), "fvu": list(fvu), "l0": list(l0)}


TOY_ROWS = ("parent_absorption", "parent_fires_alone", "parent_cosine", "child_cosine", "child_fire_rate", "mean_cosine", "fvu")


def toy_figure(result: Mapping) -> go.Figure:
    """The toy comparison's rates and cosines, vanilla beside Matryoshka."""
    fig = go.Figure()
    for name in ("vanilla", "matryoshka"):
        fig.add_bar(x=list(TOY_ROWS), y=[result[name].get(k) for k in TOY_ROWS], name=name)
    fig.update_layout(barmode="group", height=360, margin=dict(t=30, b=40), yaxis_title="value",
                      title="toy hierarchy with known features")
    return fig
