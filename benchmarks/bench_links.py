"""The link rule's trade-off on a Matryoshka run: for every rule of a grid over its conditions (P(p | c), the
parent's density, P(c | p), lift), the tree links it keeps on all the analysed rows against their held-out
P(parent | child) on each corpus part left out (links made without the part, measured on it), with the two nulls;
and the rule chosen from the curve by a rule stated here in advance. Writes a JSON.

    python benchmarks/bench_links.py RUN_DIR [--tokens N] [--cache CACHE_DIR] [--out benchmarks/results/links.json]

How the shipped rule is chosen (CHOICE): among the rules that meet the target on every left-out part (mean
held-out P(p | c) >= 0.8, the lift-passing null at most half of it) and keep >= 1,000 tree links on all the rows,
the one keeping the most tree links; when none does, the one with the highest worst-part held-out P(p | c) among
those keeping >= 1,000 tree links. Nothing else (no look at the trees) enters the choice.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
TARGET_HELD, TARGET_NULL_SHARE, TARGET_LINKS = 0.8, 0.5, 1000
DENSE_ROOT = 0.05
"""A root firing on more than this share of the tokens is a hub (the issue's bound for the default view)."""
GRID = {
    "min_coverage": (0.7, 0.8, 0.9),
    "max_parent_density": (1.0, 0.05, 0.02, 0.01),
    "min_reverse": (0.0, 0.05, 0.1, 0.2),
    "min_lift": (2.0, 10.0),
}
CHOICE = ("the most tree links among rules with held-out P(p|c) >= 0.8 and the lift-passing null <= half of it on "
          "every left-out part and >= 1,000 tree links on all rows; else the best worst-part P(p|c) among rules "
          "with >= 1,000 tree links")


def interval(x) -> dict | None:
    return None if x is None else {"mean": round(x.mean, 4), "low": round(x.low, 4), "high": round(x.high, 4), "n": x.n}


def hub_share(parent: torch.Tensor, child: torch.Tensor, density: torch.Tensor) -> float | None:
    """Share of a tree's nodes (roots and children) that hang under a root firing on more than DENSE_ROOT."""
    if child.numel() == 0:
        return None
    up = torch.arange(density.numel())
    up[child] = parent
    root = up.clone()
    for _ in range(density.numel()):
        nxt = up[root]
        if torch.equal(nxt, root):
            break
        root = nxt
    nodes = torch.unique(torch.cat([parent, child]))
    return float((density[root[nodes]] > DENSE_ROOT).double().mean())


def rule_row(cfg, pooled_fig, counts, names, left_out, rows: int) -> dict:
    from msae.analysis import validate

    parent, child = validate.rule_tree(pooled_fig, cfg)
    total = counts.latent.sum(0)
    parts = []
    for name, m in zip(names, left_out):
        parts.append({"part": name, "tree_links": m.tree_links, "measured": m.measured_links,
                      "heldout": interval(m.heldout_coverage), "null_same_frequency": interval(m.null_coverage),
                      "null_lift_passing": interval(m.lift_null_coverage), "lift_null_share": m.lift_null_share})
    held = [p["heldout"]["mean"] for p in parts if p["heldout"]]
    ratio = [p["null_lift_passing"]["mean"] / p["heldout"]["mean"] for p in parts
             if p["heldout"] and p["null_lift_passing"] and p["heldout"]["mean"] > 0]
    meets = (len(held) == len(parts) and min(held) >= TARGET_HELD and len(ratio) == len(parts)
             and max(ratio) <= TARGET_NULL_SHARE and int(child.numel()) >= TARGET_LINKS)
    return {"rule": {k: getattr(cfg, k) for k in GRID}, "tree_links": int(child.numel()),
            "hub_share": hub_share(parent, child, total.double() / rows),
            "worst_part_heldout": min(held) if held else None, "worst_lift_null_ratio": max(ratio) if ratio else None,
            "meets_target": meets, "left_out": parts}


def choose(rows: list[dict]) -> dict | None:
    meeting = [r for r in rows if r["meets_target"]]
    if meeting:
        return max(meeting, key=lambda r: r["tree_links"])
    enough = [r for r in rows if r["tree_links"] >= TARGET_LINKS and r["worst_part_heldout"] is not None]
    return max(enough, key=lambda r: r["worst_part_heldout"]) if enough else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--tokens", type=int, default=None, help="cache rows to read (default: all)")
    ap.add_argument("--cache", default=None, help="activation cache (default: the one the run recorded)")
    ap.add_argument("--out", default=str(HERE / "results" / "links.json"))
    args = ap.parse_args()

    from msae.activations import read_manifest
    from msae.analysis.analyze import extract_config, find_cache
    from msae.analysis import validate
    from msae.analysis.stream import stream
    from msae.config import AnalyzeConfig, LinkConfig
    from msae.run import Run

    t0 = time.perf_counter()
    run = Run(args.run_dir)
    sae = run.load_sae(device="cpu")
    ecfg = extract_config(run, AnalyzeConfig())
    ecfg.tokens = args.tokens or ecfg.tokens
    cache = Path(args.cache) if args.cache else find_cache(ecfg, run.info().extraction.cache_id)
    if cache is None:
        raise SystemExit(f"no activation cache of {args.run_dir}'s extraction with {ecfg.tokens:,} rows: "
                         f"`msae extract` it (or pass --cache and --tokens)")
    manifest = read_manifest(cache)
    result = stream([sae], cache, top_n=1, sample_n=1, max_rows=args.tokens)
    sp, widths = result.sparse[0], list(sae.widths)
    row_doc = result.row_doc()
    if row_doc is None or result.row_part is None:
        raise SystemExit(f"{cache}: the cache records no documents or parts; extract it again")
    names = list(manifest.parts)
    groups, n_groups = validate.row_groups(validate.document_halves(row_doc), result.row_part)
    counts = validate.cofire_counts(sp, groups, n_groups, widths)
    t_counts = time.perf_counter() - t0

    base = LinkConfig()
    rules = {}
    for values in itertools.product(*GRID.values()):
        rules[json.dumps(dict(zip(GRID, values)))] = LinkConfig.from_json({**base.to_json(), **dict(zip(GRID, values))})
    left_out = validate.leave_each_part_out(counts, names, rules)
    pooled = counts.over(torch.ones(n_groups, dtype=torch.bool))
    pooled_fig = validate.candidate_figures(counts, pooled, base.min_cofires)
    curve = [rule_row(cfg, pooled_fig, counts, names, left_out[key], sp.n_rows) for key, cfg in rules.items()]
    chosen = choose(curve)
    report = {
        "run": args.run_dir, "cache": cache.name, "rows": sp.n_rows, "cache_rows": manifest.rows,
        "rows_per_part": {names[i]: int(counts.rows[2 * i : 2 * i + 2].sum()) for i in range(len(names))},
        "documents": int(torch.unique(row_doc).numel()),
        "split": "leave one part out: links made on every other part (all their rows), measured on the part",
        "fixed": {k: getattr(base, k) for k in ("max_reverse", "min_cofires", "min_child_fires")},
        "target": {"heldout_per_part": TARGET_HELD, "lift_null_share_of_heldout": TARGET_NULL_SHARE,
                   "tree_links": TARGET_LINKS},
        "choice": CHOICE, "chosen": chosen, "curve": curve,
        "seconds": {"stream_and_counts": round(t_counts, 1), "total": round(time.perf_counter() - t0, 1)},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(out)
    for r in sorted(curve, key=lambda r: -r["tree_links"]):
        print(f"{r['tree_links']:6d} links  worst part P(p|c) {r['worst_part_heldout'] or float('nan'):.3f}  "
              f"lift-null ratio {r['worst_lift_null_ratio'] or float('nan'):.2f}  hubs {r['hub_share'] or 0:.2f}  "
              f"{r['rule']}{'  MEETS' if r['meets_target'] else ''}")
    print("chosen:", chosen and chosen["rule"], f"({report['seconds']['total']} s)")


if __name__ == "__main__":
    main()
