"""What the commands print: a run's training and held-out figures, an extraction, and the headline figures of an
analysis, of absorption, of the taxonomy benchmark and of a gallery, as terminal text."""

from __future__ import annotations

from pathlib import Path

from msae.activations import CacheManifest
from msae.config import TrainConfig
from msae.results import (AbsorptionResult, EvalResult, Gallery, TaxonomyBench, HierarchyFigures, LinkValidation,
                          StoreManifest, TrainMetrics)


def training_line(name: str, run_dir: Path, last: TrainMetrics) -> str:
    """A trained SAE's figures at its last logged step."""
    fvu = ", ".join(f"{v:.4f}" for v in last.fvu)
    return f"{name}: {run_dir}  training fvu per width [{fvu}]  l0 {last.l0:.1f}  dead {last.dead_fraction:.3f}"


def extraction_line(cache: Path, m: CacheManifest) -> str:
    """What an extraction left in the cache."""
    ran_out = " (the corpus ran out)" if m.exhausted else ""
    return f"{cache}: {m.rows:,} rows from {m.contexts_done:,} contexts{ran_out}"


def heldout_lines(name: str, r: EvalResult) -> str:
    """A run's held-out evaluation (msae.evaluate), with its FVU per corpus part where the cache records parts."""
    fvu = ", ".join(f"{v:.4f}" for v in r.fvu)
    text = (f"{name} held-out ({r.rows:,} rows): fvu per width [{fvu}]  l0 {r.l0:.1f}  dead {r.dead_fraction:.3f}  "
            f"CE loss recovered {r.ce_loss_recovered:.3f} (clean {r.ce_clean:.3f}, SAE {r.ce_sae:.3f}, "
            f"zero {r.ce_zero:.3f})")
    if r.parts:
        parts = ", ".join(f"{p.part} {p.fvu:.3f} ({p.rows:,} rows)" for p in r.parts)
        text += f"\n    held-out fvu by corpus part: {parts}"
    return text


def format_analysis(m: StoreManifest) -> str:
    """The headline figures of an analysis, for the terminal."""
    lines = [f"{m.run}: {m.rows:,} rows, d_sae {m.d_sae}, widths {m.widths}, dead {m.dead_fraction:.3f}",
             "  L0 per width: " + ", ".join(f"{w}: {v:.1f}" for w, v in zip(m.widths, m.l0_per_width))]
    if m.hierarchy_figures is not None:
        lines.append(format_hierarchy_figures(m.hierarchy_figures, m.link_validation))
    if m.hierarchy is not None:
        h = m.hierarchy
        lines.append(f"  parent-child links: {h.links:,}; parents with >= 2 children: {h.parents_with_2plus_children}; "
                     f"mean coverage {h.mean_coverage}")
        for grp in h.per_group:
            lines.append(f"    group {grp.group} (width {grp.width}): {grp.links} links, "
                         f"{grp.children_with_a_parent}/{grp.live_latents} live latents have a parent")
        for name, share in m.splitting.items():
            lines.append(f"  {name}: share of latents split into >= 2 (decoder cos 0.3/0.5/0.7): "
                         + " / ".join(f"{v:.3f}" for v in share.values()))
    for name, s in m.against.items():
        lines.append(f"  against {name}: split share by decoder cos (0.3/0.5/0.7) "
                     + " / ".join(f"{v:.3f}" for v in s.split_share_decoder.values())
                     + f", by links {s.split_share_links:.3f}; matched pairs {s.matching.pairs}")
    lines.append("  time: " + ", ".join(f"{k} {v:.1f}s" for k, v in m.timings_s.items()))
    return "\n".join(lines)


def format_hierarchy_figures(fig: HierarchyFigures, validation: LinkValidation | None) -> str:
    """The literature's hierarchy figures and the held-out validation, for the terminal."""

    def f(v) -> str:
        return "-" if v is None else f"{v:.3f}"

    lines = [f"  hierarchy ({fig.criterion} tree links: {fig.tree_links}): P(p|c) {f(fig.p_parent_given_child)}, "
             f"P(c|p) {f(fig.p_child_given_parent)}, Hamming {f(fig.hamming)}, sibling IoU {f(fig.sibling_iou)}; "
             f"Tree SAE score {f(fig.treesae_score)} ({fig.treesae_pairs} pairs)"]
    rows = (validation.criteria + validation.left_out) if validation is not None else []
    for c in rows:
        held, null, lift = c.heldout_coverage, c.null_coverage, c.lift_null_coverage
        lines.append(f"  held-out P(p|c), {c.criterion}: {f(held and held.mean)} "
                     f"[{f(held and held.low)}, {f(held and held.high)}] over {c.measured_links} tree links; "
                     f"frequency-matched random parent {f(null and null.mean)}; lift-passing candidate "
                     f"{f(lift and lift.mean)}")
    return "\n".join(lines)


def reads_note(cfg: TrainConfig, n_rows: int) -> str:
    """How often a run reads its text, in words: a run over one pass sees each token once."""
    passes = cfg.passes_over(n_rows)
    line = f"training: {cfg.steps:,} steps of {cfg.batch_size:,} rows over {n_rows:,} training rows"
    if passes <= 1.0:
        return f"{line}, each read at most once"
    return (f"{line}: each row read {passes:.1f} times (latents may learn the sample itself; more text with --tokens "
            f"keeps them reading new tokens)")


def format_absorption(result: AbsorptionResult) -> str:
    """Absorption per SAE, for the terminal."""
    lines = [f"absorption on {result.model} layer {result.layer}: {result.n_words} words"]
    for name, r in result.saes.items():
        lines.append(f"  {name}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                              for k, v in r.mean.to_json().items()))
        for v in r.variants:
            fraction = "-" if v.absorption_fraction is None else f"{v.absorption_fraction:.3f}"
            lines.append(f"    variant, {v.name} (cosine >= {v.cos_threshold:.3f}"
                         + (f", absorbers on <= {v.max_absorber_share:.0%} of words" if v.max_absorber_share else "")
                         + f"): absorption fraction {fraction}")
    if result.validity is not None:
        lines.append(f"  validity: {result.validity.note}")
    return "\n".join(lines)


def format_taxonomy_bench(result: TaxonomyBench) -> str:
    """The benchmark's headline table, for the terminal."""

    def iv(x) -> str:
        return "-" if x is None else f"{x.mean:.3f} [{x.low:.3f}, {x.high:.3f}]"

    lines = [f"taxonomy benchmark on {result.model} layer {result.layer}: {result.categories} WordNet categories, "
             f"{result.occurrences:,} member occurrences ({result.from_templates:,} from templates), "
             f"{result.background_rows:,} background rows, {result.ambiguous_tokens} ambiguous tokens left out"]
    for b in result.saes:
        widths = ", ".join("-" if v is None else f"{v:.3f}" for v in b.average_precision_per_width)
        lines.append(f"  {b.name}: parent AP {iv(b.average_precision)} (per width: {widths}); absorption "
                     f"{iv(b.absorption)} (a member latent fires on {iv(b.member_fired)}; where it does, the parent is "
                     f"silent on {iv(b.absorption_given_member)}); member latents/category {iv(b.member_latents)}; "
                     f"labelled latents "
                     f"{b.labelled_latents}; link precision {iv(b.link_precision)} vs null {iv(b.link_null)} "
                     f"(n {b.link_precision.n if b.link_precision else 0}), over the DAG {iv(b.dag_link_precision)} "
                     f"vs null {iv(b.dag_link_null)} (n {b.dag_link_precision.n if b.dag_link_precision else 0})")
    for name, d in result.differences.items():
        lines.append(f"  {name}: {iv(d)}")
    return "\n".join(lines)


def format_gallery(result: Gallery) -> str:
    """The gallery as a report: each case's verdict, reading and heatmap as a table."""
    lines = [f"gallery on {result.model} layer {result.layer} ({result.seconds} s)"]
    for case in result.cases:
        lines.append(f"\n{case.kind}: {'clean case' if case.clean else 'no clean case; the closest one'} - {case.why}")
        lines.append(f"  reading: {case.reading}")
        width = max([len(r) for r in case.rows] + [8])
        lines.append("  " + " " * width + "  " + "  ".join(f"[{i}]" for i in range(len(case.columns))))
        for row, values in zip(case.rows, case.heatmap):
            lines.append(f"  {row!r:<{width}}  " + "  ".join(f"{v:>{len(str(i)) + 2}.2f}" for i, v in enumerate(values)))
        for i, col in enumerate(case.columns):
            lines.append(f"  [{i}] {col}")
    for kind, why in result.missing.items():
        lines.append(f"\n{kind}: not looked for - {why}")
    return "\n".join(lines)
