"""Tables for reading results: pandas frames built from live-text latents (`inference.TextLatents`), feature
stores, absorption results and run summaries, with tokens and latents as plain text. No markup here: the app
lays these out as they are and downloads them as CSV.

A text's latents come as a long frame, one row per active (token, latent): columns token (position), latent,
act."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import pandas as pd

from explorer.tree import HUB_DENSITY, ancestry
from msae.config import LinkConfig
from msae.analysis.taxbench import DIFFERENCE_MEASURES, difference_key
from msae.analysis.validate import mean_std
from msae.lm import builtin_of
from msae.results import (AbsorptionResult, EvalResult, TaxonomyBench, HierarchyFigures, Interval, LinkValidation,
                          StoreManifest)
from msae.run import Run, RunSummary

RESULT_COLUMNS = ["prompt", "position", "token", "latent", "act", "label"]


# ------------------------------------------------------------------------------------------------ text


def token_label(token: str) -> str:
    """A token as plain text in a table: leading/trailing spaces and line breaks made visible."""
    out = token.replace("\n", "↵").replace("\t", "⇥")
    stripped = out.strip(" ")
    if stripped != out:
        lead = len(out) - len(out.lstrip(" "))
        trail = len(out) - len(out.rstrip(" "))
        out = "␣" * lead + stripped + "␣" * trail
    return out or "␣"


def latent_caption(row: Mapping) -> str:
    """`#id label` of a store's latent row, for buttons and lists."""
    label = str(row.get("label") or "").strip()
    return f"#{int(row['latent'])} {label}" if label else f"#{int(row['latent'])}"


def example_tokens(token_ids: Sequence[int], acts: Sequence[float], center: int, vocab: Sequence[str]
                   ) -> tuple[list[str], list[float], int]:
    """Tokens, activations and the centre's index of a stored example window (-1 marks slots outside the context)."""
    kept = [(i, int(t), float(a)) for i, (t, a) in enumerate(zip(token_ids, acts)) if int(t) >= 0]
    new_center = next((j for j, (i, _t, _a) in enumerate(kept) if i == center), -1)
    return [vocab[t] for _i, t, _a in kept], [a for _i, _t, a in kept], new_center


# ------------------------------------------------------------------------------------------------ labels


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


def strongest(ids: Iterable[int], acts: Iterable[float], latents: pd.DataFrame | None) -> str:
    """Latents with their activations as `#id label (act) · ...`, in the order given."""
    ids = [int(i) for i in ids]
    return " · ".join(f"#{l} {lab} ({a:.2f})".replace("  ", " ")
                      for l, lab, a in zip(ids, labels_of(latents, ids), acts))


# ------------------------------------------------------------------------------------------------ live text


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
        rows.append((i, token_label(token), len(g), strongest(top["latent"], top["act"], latents)))
    return pd.DataFrame(rows, columns=["position", "token", "active", "strongest latents"])


def latent_acts(frame: pd.DataFrame, latent: int, n_tokens: int) -> list[float]:
    """One latent's activation on every token of a text, (n_tokens,) with 0 where it is silent."""
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
        rows.append((i, prompt[:80].replace("\n", "↵"), len(r.tokens), f["latent"].nunique() if len(f) else 0,
                     strongest(top.index, top, latents)))
    return pd.DataFrame(rows, columns=["prompt", "text", "tokens", "latents active", "strongest latents"])


def results_frame(results: Sequence, latents: pd.DataFrame | None, which: int = 0) -> pd.DataFrame:
    """Every (prompt, token, active latent) of many prompts' results in SAE `which`, for download: columns
    RESULT_COLUMNS, prompt being the result's index."""
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
        return pd.DataFrame(columns=RESULT_COLUMNS)
    return pd.concat(frames, ignore_index=True)


def results_csv(results: Sequence, latents: pd.DataFrame | None, which: int = 0) -> bytes:
    """`results_frame` as the CSV file a user downloads (UTF-8, no index)."""
    return results_frame(results, latents, which).to_csv(index=False).encode()


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


def _lacking_partner(top: pd.DataFrame, partner: pd.Series, other_active: pd.Series, latents: pd.DataFrame | None,
                     other: str) -> pd.DataFrame:
    """The active latents of one side whose matched partner is silent on the other side, or that have none."""
    p = top["latent"].map(partner)
    lacking = p.isna() | ~p.isin(other_active.index)
    out = with_labels(top[lacking][["latent", "max_act", "n_tokens"]], latents)
    out[f"{other} partner"] = p[lacking].map(lambda v: "none" if pd.isna(v) else f"#{int(v)} (silent)").to_numpy()
    return out.reset_index(drop=True)


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
    return {
        "matched": matched,
        f"only {na}": _lacking_partner(top_a, pairs.set_index("a")["b"], b_act, latents_a, nb),
        f"only {nb}": _lacking_partner(top_b, pairs.set_index("b")["a"], a_act, latents_b, na),
    }


# ------------------------------------------------------------------------------------------------ one feature


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


def link_rule_text(cfg: LinkConfig) -> str:
    """One sentence saying what makes a link under `cfg` (captions and help texts)."""
    if cfg.criterion == "cosine":
        return (f"A link (the baseline rule, Bussmann et al.): cosine of the two latents' activations where the child "
                f"fires × max(child) / max(parent) ≥ {cfg.threshold}; each child sits under its best-scoring link.")
    probe = (f", and both among the {cfg.probe_top} decoder rows nearest the child's detection direction"
             if cfg.probe_top else "")
    reverse = (f"between {cfg.min_reverse:.0%} and {cfg.max_reverse:.0%}" if cfg.min_reverse > 0
               else f"≤ {cfg.max_reverse:.0%}")
    dense = (f", the parent on ≤ {cfg.max_parent_density:.0%} of all tokens" if cfg.max_parent_density < 1 else "")
    return (f"A link: the parent fires on ≥ {cfg.min_coverage:.0%} of the child's tokens (score = P(parent | child)), "
            f"the child on {reverse} of the parent's{dense}, the parent more often than the child and ≥ "
            f"{cfg.min_lift:g}× as often as at random, on ≥ {cfg.min_cofires} shared tokens{probe}; each child sits "
            f"under its most specific such parent.")


def relatives_table(links: pd.DataFrame | None, latents: pd.DataFrame, side: str) -> pd.DataFrame:
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


# ------------------------------------------------------------------------------------------------ runs


def model_label(model: str | None) -> str:
    """A model as a reader knows it: the built-in model by its name (also when recorded by its hub id), a local
    folder by its own name rather than the machine's path to it, a hub id as it is."""
    if not isinstance(model, str) or not model:  # none recorded (NaN in a table's column)
        return "—"
    builtin = builtin_of(model)
    if builtin is not None:
        return builtin
    if model.startswith(("/", "~", ".")) or Path(model).expanduser().is_dir():
        return Path(model).expanduser().name or model
    return model


def runs_table(summaries: Sequence[RunSummary], labels: Sequence[str]) -> pd.DataFrame:
    """One row per run, for the home page (`Run.summary` rows under their short names); counts stay whole numbers
    where a run trained elsewhere has none."""
    table = pd.DataFrame([dataclasses.asdict(s) for s in summaries])
    if table.empty:
        return table
    table.insert(0, "name", list(labels))
    table["model"] = table["model"].map(model_label)
    table = table.astype({column: "Int64" for column in ("d_in", "d_sae", "k", "layer", "steps", "tokens")})
    for column, fmt in (("widths", str), ("fvu", "{:.3f}".format)):
        table[column] = table[column].map(
            lambda values: ", ".join(fmt(v) for v in values) if isinstance(values, (list, tuple)) else "")
    return table


def _fmt(value, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def summary_table(info: RunSummary, heldout: EvalResult | None, manifest: StoreManifest | None) -> pd.DataFrame:
    """The chosen run in rows: model, layer, widths, k, FVU per width (held-out when measured), L0, dead fraction."""
    widths = list(info.widths)

    def per_width(values) -> str:
        return ", ".join(f"{w}: {v:.3f}" for w, v in zip(widths, values)) if values else "—"

    rows = [
        ("architecture", info.architecture),
        ("model", model_label(info.model)),
        ("layer", _fmt(info.layer, "")),
        ("d_in", info.d_in),
        ("widths", ", ".join(str(w) for w in widths)),
        ("k", info.k),
        ("training steps", _fmt(info.steps, ",")),
        ("training tokens", f"{info.tokens:,}" if info.tokens else "—"),
        ("FVU per width (last training step)", per_width(info.fvu)),
        ("L0 (last training step)", _fmt(info.l0, ".1f")),
    ]
    if heldout is not None:
        rows += [
            ("FVU per width (held-out)", per_width(heldout.fvu)),
            ("L0 (held-out)", _fmt(heldout.l0, ".1f")),
            ("dead fraction (held-out)", _fmt(heldout.dead_fraction, ".3f")),
        ]
        if heldout.ce_loss_recovered is not None:
            rows.append(("CE loss recovered (held-out)", f"{heldout.ce_loss_recovered:.3f}"))
    rows.append(("dead fraction (training)", _fmt(info.dead_fraction, ".3f")))
    if manifest is not None:
        rows.append(("feature store", f"{manifest.rows:,} tokens analysed"))
        rows.append(("L0 per width (feature store)", per_width(manifest.l0_per_width)))
    else:
        rows.append(("feature store", "none (run `msae analyze` on this run)"))
    return pd.DataFrame(rows, columns=["", "value"]).astype({"value": str})


def l0_fvu_point(run: Run, manifest: StoreManifest | None = None) -> dict | None:
    """FVU (held-out if measured, else the last training step) and L0 per width of one run (name, widths, fvu,
    l0); the nested widths' L0 comes from its feature store `manifest`, else every width gets the overall L0.
    None when the run has no figures."""
    heldout, metrics = run.result(EvalResult), run.metrics()
    training = metrics[-1] if metrics else None
    fvu = heldout.fvu if heldout is not None else training.fvu if training is not None else None
    if not fvu:
        return None
    l0 = manifest.l0_per_width if manifest is not None else None
    if not l0:
        l0 = [heldout.l0 if heldout is not None else training.l0] * len(fvu)
    return {"name": run.name, "widths": run.summary().widths, "fvu": list(fvu), "l0": list(l0)}


# ------------------------------------------------------------------------------------------------ diagnostics


def absorption_table(result: AbsorptionResult) -> pd.DataFrame:
    """The means over letters of an absorption result (`absorption.measure`), one row per SAE; the variants'
    absorption fractions in their own, labelled columns."""
    rows = []
    for name, res in result.saes.items():
        mean = res.mean
        row = {"SAE": name, "absorption fraction": mean.absorption_fraction,
               "full absorption rate": mean.full_absorption_rate,
               "main latents per letter": mean.n_main_latents, "main-latent F1": mean.main_f1,
               "letters used": mean.n_letters}
        for v in res.variants:
            row[f"variant: {v.name} (fraction)"] = v.absorption_fraction
        rows.append(row)
    return pd.DataFrame(rows)


def interval_text(x: Interval | None) -> str:
    return "" if x is None else f"{x.mean:.3f} [{x.low:.3f}, {x.high:.3f}]"


def link_curve_text(curve: Mapping) -> str:
    """What benchmarks/bench_links.py's curve (links.json) measured and chose, in words, for the figure's caption."""
    chosen, target = curve.get("chosen"), curve.get("target", {})
    rule = chosen["rule"] if chosen else None
    said = (f"Reading: {len(curve['curve'])} link rules on {curve['rows']:,} rows of {curve.get('documents', '?')} "
            f"documents, each made on every corpus part but one and measured on that part "
            f"(`python benchmarks/bench_links.py RUN`). Each point is a rule: the tree links it keeps on all rows, "
            f"and where a child fires on its worst left-out part, how often its parent fires too (95% interval "
            f"resampling parents). ")
    if rule is not None:
        worst = chosen["worst_part_heldout"]
        density = "any" if rule["max_parent_density"] >= 1 else f"≤ {rule['max_parent_density']:g}"
        said += (f"Chosen ({curve['choice']}): P(p | c) ≥ {rule['min_coverage']:g}, lift ≥ {rule['min_lift']:g}, "
                 f"parent density {density}, P(c | p) ≥ {rule['min_reverse']:g}: "
                 f"{chosen['tree_links']:,} tree links, {worst:.3f} on its worst part, the harder null at most "
                 f"{chosen['worst_lift_null_ratio']:.0%} of the held-out figure. ")
        said += ("It meets the target." if chosen["meets_target"] else
                 f"No rule meets the target (≥ {target.get('heldout_per_part', 0.8):g} on every part left out, the "
                 f"harder null ≤ {target.get('lift_null_share_of_heldout', 0.5):.0%} of it, ≥ "
                 f"{target.get('tree_links', 1000):,} tree links): this is the best trade-off found.")
    return said


TREE_BANDS = (
    "concept trees (a specific root whose top tokens are words)",
    "symbol trees (a specific root on punctuation, digits, code or function words)",
    f"hubs (root fires on > {HUB_DENSITY:.0%} of tokens: word pieces, parts of speech)",
)
"""The Hierarchy page's names of explorer.tree.BAND_KINDS, in that order (the first is the default)."""


def coherence_text(coh) -> str:
    """What the coherence figure of some trees (msae.analysis.coherence.Coherence) says, in words."""
    above = coh.trees.low > coh.null.high
    return (f"Coherence, a check the link rule does not use: {interval_text(coh.trees)} of the pairs of latents within "
            f"a tree have top tokens in one WordNet noun category of ≤ {coh.related_category_max} words "
            f"(interval over the {coh.trees.n} trees); random trees of the same sizes, rooted in latents that could "
            f"root a tree of this band (and for concept trees, made of word latents only): {interval_text(coh.null)} "
            f"({coh.null.n} draws). " + ("The trees are more coherent than random ones." if above else
                                         "The trees are not clearly more coherent than random ones."))


WIDTH_SWEEP_DIFFERENCES = {
    "parent_ap": "parent AP",
    "taxonomy_absorption": "taxonomy absorption",
    "member_fired": "member latent fires",
    "absorption_given_member": "absorption where a member latent fires",
    "member_latents": "member latents",
    "first_letter_absorption": "first-letter absorption",
    "first_letter_full_absorption": "first-letter full absorption",
}
"""The paired differences of benchmarks/sweep_width.py's JSON, and their column names."""


def width_sweep_differences(sweep: Mapping) -> pd.DataFrame:
    """One row per (width, seed) of a width sweep (one settings' entry of benchmarks/results/sweep_width.json):
    each paired difference Matryoshka − vanilla with its 95% interval."""
    rows = []
    for width, seeds in sorted(sweep["runs"].items(), key=lambda item: int(item[0])):
        for seed, entry in sorted(seeds.items(), key=lambda item: int(item[0])):
            diff = entry["difference"]
            rows.append({"width": int(width), "seed": int(seed),
                         **{f"{name} M − V": interval_text(Interval.from_json(diff[key]) if diff.get(key) else None)
                            for key, name in WIDTH_SWEEP_DIFFERENCES.items()}})
    return pd.DataFrame(rows)


WIDTH_SWEEP_VERDICTS = {"taxonomy_absorption": "taxonomy absorption",
                        "absorption_given_member": "absorption where a member latent fires",
                        "first_letter_absorption": "first-letter absorption"}
"""The absorption differences the Diagnostics page states in words, width by width."""


def absorption_verdict(x: Interval, first: str, second: str) -> str:
    """What a paired difference `first` − `second` of an absorption measure says (lower is less absorbed)."""
    if x.high < 0:
        return f"{first} absorbs less than {second}"
    if x.low > 0:
        return f"{first} absorbs more than {second}"
    return "no difference (the interval includes 0)"


def taxonomy_difference_lines(bench: TaxonomyBench) -> list[str]:
    """The taxonomy benchmark's paired differences (the run's SAE − each other one) in words, absorption with what
    its interval says."""
    first, lines = bench.saes[0].name, []
    for other in bench.saes[1:]:
        for measure in DIFFERENCE_MEASURES.values():
            x = bench.differences.get(difference_key(first, other.name, measure))
            if x is None:
                continue
            absorbs = measure in (DIFFERENCE_MEASURES["absorption"], DIFFERENCE_MEASURES["absorption_given_member"])
            verdict = f": {absorption_verdict(x, first, other.name)}" if absorbs else ""
            lines.append(f"**{first} − {other.name}, {measure}**: {interval_text(x)}{verdict}")
    return lines


def width_sweep_verdicts(sweep: Mapping) -> list[str]:
    """One sentence per (width, seed) of a width sweep: each absorption difference Matryoshka − vanilla with its
    95% interval, and whether the interval excludes 0."""
    lines = []
    for width, seeds in sorted(sweep["runs"].items(), key=lambda item: int(item[0])):
        for seed, entry in sorted(seeds.items(), key=lambda item: int(item[0])):
            parts = []
            for key, name in WIDTH_SWEEP_VERDICTS.items():
                if entry["difference"].get(key):
                    x = Interval.from_json(entry["difference"][key])
                    parts.append(f"{name} {interval_text(x)}: {absorption_verdict(x, 'Matryoshka', 'vanilla')}")
            if parts:
                lines.append(f"{int(width):,} latents (seed {seed}), Matryoshka − vanilla: " + "; ".join(parts) + ".")
    return lines


def seed_spread(seeds: Mapping[str, Mapping]) -> dict:
    """Across the seeds of one width of a width sweep (seed -> its entry): each paired difference's mean over the
    seeds' means and their standard deviation (ddof 1; 0 for one seed; None where a seed lacks it), and how many
    seeds' 95% intervals lie entirely above 0 and entirely below it."""
    out: dict = {"mean": {}, "std": {}, "seeds_above_0": {}, "seeds_below_0": {}}
    for key in WIDTH_SWEEP_DIFFERENCES:
        found = [entry["difference"].get(key) or None for entry in seeds.values()]
        out["mean"][key], out["std"][key] = mean_std([d and d["mean"] for d in found]) if found else (None, None)
        out["seeds_above_0"][key] = sum(1 for d in found if d is not None and d["low"] > 0)
        out["seeds_below_0"][key] = sum(1 for d in found if d is not None and d["high"] < 0)
    return out


def width_sweep_seed_lines(sweep: Mapping) -> list[str]:
    """One sentence per width of a width sweep measured at two seeds or more: each absorption difference Matryoshka
    − vanilla as the mean ± standard deviation across the seeds, and on how many seeds its interval excludes 0."""
    lines = []
    for width, seeds in sorted(sweep["runs"].items(), key=lambda item: int(item[0])):
        if len(seeds) < 2:
            continue
        spread, parts = seed_spread(seeds), []
        for key, name in WIDTH_SWEEP_VERDICTS.items():
            if spread["mean"][key] is not None:
                parts.append(f"{name} {spread['mean'][key]:+.3f} ± {spread['std'][key]:.3f} (Matryoshka more "
                             f"absorbed on {spread['seeds_above_0'][key]} of {len(seeds)} seeds, less on "
                             f"{spread['seeds_below_0'][key]})")
        if parts:
            lines.append(f"{int(width):,} latents across seeds {', '.join(sorted(seeds, key=int))}, Matryoshka − "
                         "vanilla: " + "; ".join(parts) + ".")
    return lines


def heldout_line(validation: LinkValidation | None, cfg: LinkConfig) -> str | None:
    """One sentence on how the configured rule's tree links held on held-out contexts (None when not measured)."""
    if validation is None:
        return None
    name = f"coverage, P(p|c) >= {cfg.min_coverage:g}" if cfg.criterion == "coverage" else "cosine"
    row = next((c for c in validation.criteria if c.criterion == name), None)
    if row is None or row.heldout_coverage is None:
        return None
    null = f"; a random parent of the same frequency: {row.null_coverage.mean:.2f}" if row.null_coverage else ""
    lift = (f"; another candidate parent that passes the lift bound: {row.lift_null_coverage.mean:.2f}"
            if row.lift_null_coverage else "")
    parts = [c.heldout_coverage.mean for c in validation.left_out if c.heldout_coverage]
    left = (f" Made without one corpus part and measured on it: {min(parts):.2f}–{max(parts):.2f} over the "
            f"{len(parts)} parts." if parts else "")
    where = "documents" if validation.split.startswith("documents") else "contexts"
    over = "parents" if row.lift_null_coverage else "links"  # stores made before parent-clustered intervals
    return (f"Checked on held-out {where}: where a child fires, its tree parent fires on "
            f"{interval_text(row.heldout_coverage)} of the tokens ({row.measured_links:,} links; interval over "
            f"{over}){null}{lift}.{left}")


def link_validation_table(validation: LinkValidation) -> pd.DataFrame:
    """The rule at each P(p | c) bound, made on one half of the rows and measured on the other, then the configured
    rule made without each corpus part and measured on it: one row each (intervals resample parents)."""
    rows = []
    for c in validation.criteria + validation.left_out:
        rows.append({"criterion": c.criterion, "links": c.links, "tree links": c.tree_links,
                     "share of latents with a parent": c.share_with_parent,
                     "held-out P(parent | child)": interval_text(c.heldout_coverage),
                     "random parent, same frequency": interval_text(c.null_coverage),
                     "random candidate passing the lift bound": interval_text(c.lift_null_coverage),
                     "links measured": c.measured_links,
                     **{f"held-out P(p|c) on {part}": v for part, v in c.heldout_coverage_per_part.items()}})
    return pd.DataFrame(rows)


def hierarchy_figures_table(figures: Mapping[str, HierarchyFigures]) -> pd.DataFrame:
    """The literature's hierarchy figures measured here, one row per SAE (name -> figures); every column one type
    (the published ranges are text, so they are a table of their own: `published_hierarchy_figures`)."""
    rows = []
    for name, f in figures.items():
        rows.append({"SAE": name, "tree links": f.tree_links, "P(p|c)": f.p_parent_given_child,
                     "P(c|p)": f.p_child_given_parent, "Hamming": f.hamming, "sibling IoU": f.sibling_iou,
                     "Tree SAE score": f.treesae_score, "Tree SAE pairs": f.treesae_pairs,
                     "tree links passing Eq. 5": f.tree_links_probe_share})
    columns = ["SAE", "tree links", "P(p|c)", "P(c|p)", "Hamming", "sibling IoU", "Tree SAE score", "Tree SAE pairs",
               "tree links passing Eq. 5"]
    table = pd.DataFrame(rows, columns=columns)
    counts = ["tree links", "Tree SAE pairs"]
    shares = [c for c in columns if c not in ("SAE", *counts)]
    # A missing figure is None: as float NaN (not object) the column keeps one type and rounds once for display.
    return table.astype({c: "float64" for c in shares}).round(3).astype({c: "Int64" for c in counts})


def published_hierarchy_figures() -> pd.DataFrame:
    """The published ranges of the figures in `hierarchy_figures_table`, as text: figure, range, where from."""
    return pd.DataFrame([
        {"figure": "P(p|c)", "published": "0.65–0.80", "source": "HSAE, Gemma-2-2B"},
        {"figure": "P(c|p)", "published": "0.33–0.46", "source": "HSAE, Gemma-2-2B"},
        {"figure": "Tree SAE score", "published": "Matryoshka 0.05–0.19, Tree SAE 0.48–0.88",
         "source": "Tree SAE, GPT-2 small"},
    ])


def taxonomy_table(bench: TaxonomyBench) -> pd.DataFrame:
    """The taxonomy benchmark, one row per SAE, intervals as 'mean [low, high]'."""
    rows = []
    for b in bench.saes:
        rows.append({"SAE": b.name, "parent AP (held out)": interval_text(b.average_precision),
                     "AP per nested width": ", ".join("-" if v is None else f"{v:.3f}"
                                                      for v in b.average_precision_per_width),
                     "absorption": interval_text(b.absorption),
                     "member latent fires": interval_text(b.member_fired),
                     "absorption where a member latent fires": interval_text(b.absorption_given_member),
                     "member latents per category": interval_text(b.member_latents),
                     "labelled latents": b.labelled_latents, "link precision": interval_text(b.link_precision),
                     "link precision, null": interval_text(b.link_null),
                     "links measured": b.link_precision.n if b.link_precision else 0,
                     "DAG link precision": interval_text(b.dag_link_precision),
                     "DAG link precision, null": interval_text(b.dag_link_null),
                     "DAG links measured": b.dag_link_precision.n if b.dag_link_precision else 0})
    return pd.DataFrame(rows)


def taxonomy_categories_table(bench: TaxonomyBench, sae: str) -> pd.DataFrame:
    """One SAE's per-category results."""
    b = next(x for x in bench.saes if x.name == sae)
    return pd.DataFrame([c.to_json() for c in b.categories])
