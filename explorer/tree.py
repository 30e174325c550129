"""The hierarchy as a forest for display: the tree of a store's links under filters, its largest trees, one
subtree, and one latent's chain of parents. Node tables (one row per latent) in, node tables out."""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable

import pandas as pd

NODE_COLUMNS = ["latent", "parent", "score", "label", "group", "width", "freq", "depth", "root", "descendants"]
HUB_DENSITY = 0.05
"""A tree whose root fires on more than this share of all tokens is a hub (a word-piece or part-of-speech latent
with many unrelated children): shown in a band of its own, not by default."""


def hierarchy_nodes(latents: pd.DataFrame, links: pd.DataFrame, min_score: float, groups: Iterable[int] | None = None,
                    min_freq: float = 0.0, threshold: float | None = None, min_reverse: float = 0.0,
                    max_parent_freq: float = 1.0, min_lift: float = 0.0) -> pd.DataFrame:
    """The forest of the Hierarchy page: latents of `groups` that fire on at least `min_freq` of tokens, each
    child under one parent among them with a score >= `min_score`: its tree parent when that is there, else its
    best-scoring candidate. From `threshold` (the criterion's, LinkConfig.score_threshold) up only links count;
    below it the store's unlinked candidates join. `min_reverse`, `max_parent_freq` and `min_lift` keep only links
    whose child fires on at least that share of the parent's tokens (P(c | p)), whose parent fires on at most that
    share of all tokens, and whose lift reaches it (LinkConfig's min_reverse, max_parent_density and min_lift,
    applied to a store made with looser ones); a child
    whose tree parent they drop goes under its best remaining one. Latents in no such link are left out. Columns: NODE_COLUMNS
    (parent -1: a root). Parents always sit in earlier groups than their children, so the result is a forest."""
    keep = latents[latents["count"] > 0]
    if groups is not None:
        keep = keep[keep["group"].isin(list(groups))]
    keep = keep[keep["freq"] >= min_freq]
    ids = set(keep["latent"].tolist())
    cand = links[(links["score"] >= min_score) & links["parent"].isin(ids) & links["child"].isin(ids)]
    if min_reverse > 0:
        cand = cand[cand["reverse_coverage"] >= min_reverse]
    if min_lift > 0:
        cand = cand[cand["lift"] >= min_lift]
    if max_parent_freq < 1:
        cand = cand[cand["parent"].map(latents.set_index("latent")["freq"]) <= max_parent_freq]
    if threshold is not None and min_score >= threshold:
        cand = cand[cand["linked"]]
    best = (cand.sort_values(["tree", "score", "parent"], ascending=[False, False, True])
            .drop_duplicates("child").set_index("child"))
    in_tree = set(best.index.tolist()) | set(best["parent"].tolist())
    nodes = keep[keep["latent"].isin(in_tree)][["latent", "label", "group", "width", "freq"]].copy()
    nodes["parent"] = nodes["latent"].map(best["parent"]).fillna(-1).astype(int)
    nodes["score"] = nodes["latent"].map(best["score"]).astype(float)
    # Sorted by group, every parent comes before its children: one pass down sets depth and root, one pass up
    # counts descendants.
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
    return nodes[NODE_COLUMNS]


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


def children_of(nodes: pd.DataFrame) -> dict[int, list[int]]:
    """Each node's children, by parent (-1: the roots)."""
    children = defaultdict(list)
    for latent, parent in zip(nodes["latent"].tolist(), nodes["parent"].tolist()):
        children[parent].append(latent)
    return children


def subtree(nodes: pd.DataFrame, top: int) -> pd.DataFrame:
    """`top` and everything under it, `top` made the root (parent -1, depth 0; the depths below it follow)."""
    children = children_of(nodes)
    wanted, stack = [], [top]
    while stack:
        latent = stack.pop()
        wanted.append(latent)
        stack.extend(children[latent])
    out = nodes[nodes["latent"].isin(wanted)].copy()
    out.loc[out["latent"] == top, "parent"] = -1
    out["depth"] -= int(out.loc[out["latent"] == top, "depth"].iat[0])
    return out


def ancestry(latents: pd.DataFrame, latent: int) -> list[int]:
    """The latent's chain of tree parents, root first, ending with the latent itself (store column tree_parent)."""
    if "tree_parent" not in latents:
        return [int(latent)]
    parent_of = latents["tree_parent"].to_numpy()  # (d_sae,), -1 for a root
    chain = [int(latent)]
    while parent_of[chain[-1]] >= 0 and len(chain) <= len(parent_of):
        chain.append(int(parent_of[chain[-1]]))
    return chain[::-1]


def split_hubs(nodes: pd.DataFrame, hub_density: float = HUB_DENSITY) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(concept trees, hub trees): the nodes of trees whose root fires on at most / more than `hub_density`."""
    root_freq = nodes.set_index("latent")["freq"]
    hub = nodes["root"].map(root_freq) > hub_density
    return nodes[~hub], nodes[hub]


FUNCTION_WORDS = frozenset("""
a about above after again against all also am an and any are as at be because been before being below between both
but by can could did do does doing down during each either even ever every few for from further had has have having
he her here hers herself him himself his how however i if in into is it its itself just may me might more most much
must my myself neither no nor not now of off on once one only or other ought our ours ourselves out over own per
rather same shall she should since so some such than that the their theirs them themselves then there these they
this those though through thus to too two under until up upon us very was we were what when where whether which
while who whom whose why will with within without would yet you your yours yourself
""".split())
"""English function words (articles, pronouns, prepositions, conjunctions, auxiliaries): a latent that fires most on
them reads a part of speech, not a concept."""


def is_word(token: str) -> bool:
    """Whether a token's text is a content word: letters only, at least 3 of them, not a function word. Punctuation,
    digits, code, whitespace, word pieces of one or two letters and function words are not."""
    text = token.strip()
    return len(text) >= 3 and text.isalpha() and text.lower() not in FUNCTION_WORDS


def top_tokens(latents: pd.DataFrame) -> dict[int, list[int]]:
    """Each latent's top tokens (store column top_token_ids), by latent: what the coherence figure relates."""
    return {int(l): [int(t) for t in ids] for l, ids in zip(latents["latent"], latents["top_token_ids"])}


def word_latents(latents: pd.DataFrame, vocab: list[str]) -> set[int]:
    """The latents whose top tokens (store column top_token_ids) are at least half content words (`is_word`)."""
    out = set()
    for latent, ids in zip(latents["latent"].tolist(), latents["top_token_ids"]):
        words = [is_word(vocab[int(t)]) for t in ids]
        if words and 2 * sum(words) >= len(words):
            out.add(int(latent))
    return out


def split_words(nodes: pd.DataFrame, words: set[int]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(trees whose root is in `words`, the other trees): the nodes of each."""
    by_word = nodes["root"].isin(words)
    return nodes[by_word], nodes[~by_word]


BAND_KINDS = ("concept", "symbol", "hub")
"""The Hierarchy page's bands of trees, the first its default: concept trees (a specific root whose top tokens are
content words), symbol trees (a specific root on punctuation, digits, code, function words or word pieces) and hubs
(a root firing on more than HUB_DENSITY of all tokens)."""


def bands(nodes: pd.DataFrame, words: set[int], hub_density: float = HUB_DENSITY) -> dict[str, pd.DataFrame]:
    """The nodes of each band of BAND_KINDS (`words`: `word_latents` of the store)."""
    specific, hubs = split_hubs(nodes, hub_density)
    concept, symbol = split_words(specific, words)
    return {"concept": concept, "symbol": symbol, "hub": hubs}


def band_pools(latents: pd.DataFrame, words: set[int], band: str,
               hub_density: float = HUB_DENSITY) -> tuple[list[int], list[int]]:
    """What the coherence null draws random trees of `band` from: (their roots, their other latents). The roots are
    the live latents that could root a tree of the band; the others are every live latent, but for concept trees
    only live word latents, so that random trees of words, not random trees of a word over symbols, are what the
    band's trees must beat."""
    live = latents[latents["count"] > 0]
    dense = live["freq"] > hub_density
    word = live["latent"].isin(words)
    keep = {"concept": ~dense & word, "symbol": ~dense & ~word, "hub": dense}[band]
    roots = live.loc[keep, "latent"].astype(int).tolist()
    others = live.loc[word, "latent"] if band == "concept" else live["latent"]
    return roots, others.astype(int).tolist()


def trees_table(nodes: pd.DataFrame, latents: pd.DataFrame) -> pd.DataFrame:
    """One row per tree, largest first (then the rarer root): its root, how often the root fires, its children and
    all nodes below it, and the share of the root's firings its linked children cover (store column coverage)."""
    roots = nodes[nodes["parent"] < 0]
    kids = nodes.groupby("parent").size()
    table = pd.DataFrame({
        "root": roots["latent"].to_numpy(), "label": roots["label"].to_numpy(), "fires on": roots["freq"].to_numpy(),
        "children": roots["latent"].map(kids).fillna(0).astype(int).to_numpy(),
        "below": roots["descendants"].to_numpy(),
        "children cover": roots["latent"].map(latents.set_index("latent")["coverage"]).to_numpy()
        if "coverage" in latents else None})
    return table.sort_values(["below", "fires on"], ascending=[False, True], ignore_index=True)


def tree_members(nodes: pd.DataFrame) -> list[list[int]]:
    """Every tree's latents, root first."""
    return [[root] + sorted(set(group["latent"].tolist()) - {root})
            for root, group in nodes.groupby("root", sort=True)]
