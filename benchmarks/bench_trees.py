"""What the Hierarchy page opens on, measured: the default view of a run's feature store under the library's link
rule (LinkConfig's defaults, as the page applies them), the share of its nodes under roots firing on more than
tree.HUB_DENSITY of the tokens, and the WordNet coherence of its trees against random trees of the same sizes drawn as
tree.band_pools says (roots that could root a tree of the band; for concept trees, word latents only). Per view, every band of
tree.BAND_KINDS; the page opens on the first (concept trees: a specific root whose top tokens are words). Writes a
JSON.

    python benchmarks/bench_trees.py RUN_DIR [--max-nodes 400] [--out benchmarks/results/trees.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def interval(x) -> dict | None:
    return None if x is None else {"mean": round(x.mean, 4), "low": round(x.low, 4), "high": round(x.high, 4), "n": x.n}


def view_figures(latents, links, store_cfg, rule, max_nodes: int, cats, words: set[int], top: dict) -> dict:
    """The page's view at `rule`'s specificity bounds (where stricter than the store's), band by band (the first
    is the default), and their figures."""
    from explorer import tree

    min_reverse = max(rule.min_reverse, store_cfg.min_reverse)
    max_parent = min(rule.max_parent_density, store_cfg.max_parent_density)
    min_lift = max(rule.min_lift, store_cfg.min_lift)
    nodes = tree.hierarchy_nodes(latents, links, store_cfg.score_threshold, threshold=store_cfg.score_threshold,
                                 min_reverse=min_reverse, max_parent_freq=max_parent, min_lift=min_lift)
    freq = latents.set_index("latent")["freq"]
    whole_hubs = float((nodes["root"].map(freq) > tree.HUB_DENSITY).mean()) if len(nodes) else None
    return {"min_reverse": min_reverse, "max_parent_density": max_parent, "min_lift": min_lift,
            "all_nodes": len(nodes), "all_nodes_share_under_hub_roots": whole_hubs,
            "bands": {kind: band_figures(latents, nodes, max_nodes, cats, words, top, freq, kind)
                      for kind, nodes in tree.bands(nodes, words).items()}}


def band_figures(latents, band, max_nodes: int, cats, words: set[int], top: dict, freq, kind: str) -> dict:
    """One band's view as the page draws it (its largest trees, whole, within `max_nodes`): its size, the share of
    its nodes under hub roots, its coherence against random trees rooted like its trees, and its first trees."""
    from explorer import tree
    from msae.analysis import coherence

    shown = tree.largest_trees(band, max_nodes)
    roots, others = tree.band_pools(latents, words, kind)
    coh = coherence.forest_coherence(tree.tree_members(shown), top, cats, others, root_pool=roots)
    table = tree.trees_table(shown, latents)
    return {"nodes": len(shown), "trees": int((shown["parent"] < 0).sum()), "band_nodes": len(band),
            "share_under_hub_roots": float((shown["root"].map(freq) > tree.HUB_DENSITY).mean()) if len(shown) else None,
            "coherence": interval(coh.trees) if coh else None, "random_tree_null": interval(coh.null) if coh else None,
            "coherence_above_null": bool(coh.trees.low > coh.null.high) if coh else None,
            "first_trees": table.head(10).to_dict(orient="records")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--max-nodes", type=int, default=400)
    ap.add_argument("--out", default=str(HERE / "results" / "trees.json"))
    args = ap.parse_args()

    from explorer import tree
    from msae import taxonomy
    from msae.analysis import coherence
    from msae.analysis.store import load_store
    from msae.config import LinkConfig

    t0 = time.perf_counter()
    store = load_store(args.run_dir)
    cats = coherence.token_categories(taxonomy.load_taxonomy(taxonomy.SHIPPED, store.manifest.model))
    store_cfg = store.manifest.link_config
    words, top = tree.word_latents(store.latents, store.vocab), tree.top_tokens(store.latents)
    report = {"run": args.run_dir, "rows": store.manifest.rows, "store_rule": store_cfg.to_json(),
              "related_category_max": coherence.RELATED_CATEGORY_MAX, "default_band": tree.BAND_KINDS[0],
              "word_latents": len(words),
              "views": {"the store's rule": view_figures(store.latents, store.links, store_cfg, store_cfg,
                                                         args.max_nodes, cats, words, top),
                        "the library's rule": view_figures(store.latents, store.links, store_cfg, LinkConfig(),
                                                           args.max_nodes, cats, words, top)}}
    report["seconds"] = round(time.perf_counter() - t0, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1, default=str))
    tmp.replace(out)
    print(json.dumps({view: {kind: {k: v for k, v in band.items() if k != "first_trees"}
                             for kind, band in figures["bands"].items()} for view, figures in report["views"].items()},
                     indent=1))


if __name__ == "__main__":
    main()
