"""The `msae` command: one entry point, sub-commands, flags generated from the config dataclasses (msae.config)."""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open

from msae import io
from msae.activations import CachedActivations, extract, extraction_info, first_non_finite_row, read_manifest
from msae.analysis.analyze import AnalysisError
from msae.config import (TRAIN_SKIP, AbsorptionConfig, AnalyzeConfig, ConfigError, ExtractConfig, TrainJob,
                         add_config_args, check_device_name, config_from_args)
from msae.corpus import CorpusError
from msae.distributed import RankLost, World, launch
from msae.io import SAELoadError
from msae.lm import LMLoadError, precision_note, resolve_device
from msae.records import RecordError
from msae.results import AbsorptionResult, InputFile, RunInfo, StoreManifest
from msae.run import Run, RunError, locked
from msae.train import TensorBatches, Trainer, TrainingError, check_new_run

class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def load_activations_file(path: Path) -> torch.Tensor:
    """The `activations` tensor (N, d_in) of a safetensors file, checked: finite, with rows and columns."""
    if not path.exists():
        raise CLIError(f"{path}: no such file")
    if path.is_dir():
        raise CLIError(f"{path}: a directory, not a safetensors file")
    io.refuse_pickle(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            if "activations" not in f.keys():
                raise CLIError(f"{path}: no tensor named 'activations' (found: {', '.join(f.keys()) or 'none'})")
            acts = f.get_tensor("activations")
    except SafetensorError as exc:
        raise CLIError(f"{path}: not a readable safetensors file ({exc})") from None
    if acts.ndim != 2 or not acts.is_floating_point():
        raise CLIError(f"{path}: 'activations' must be a 2-D float tensor (N, d_in), got {tuple(acts.shape)} {acts.dtype}")
    if acts.shape[0] == 0 or acts.shape[1] == 0:
        raise CLIError(f"{path}: 'activations' has shape {tuple(acts.shape)}: it needs rows and columns")
    bad = first_non_finite_row(acts)
    if bad is not None:
        raise CLIError(f"{path}: row {bad} of 'activations' holds NaN or Inf; remove such rows and run again")
    return acts.float() if acts.dtype in (torch.float16, torch.bfloat16) else acts


def train(job: TrainJob, out: Path, resume: bool = False, world: World = World()) -> dict[str, Path]:
    """Train every SAE of `job` into `out` (from its checkpoint when `resume`) and, when it trained from text,
    evaluate each on the cache's held-out shard; returns the run directories by SAE name. Under several ranks
    (torchrun) every rank calls this: they extract and train together, the main rank writes, reports and evaluates.
    The main rank holds `out`'s lock throughout (msae.run.locked): a second training there is refused."""
    with locked(out) if world.main else contextlib.nullcontext():
        return _train(job, out, resume, world)


def _train(job: TrainJob, out: Path, resume: bool, world: World) -> dict[str, Path]:
    if not resume:
        check_new_run(out)
    if world.main:
        print(precision_note(job.train.precision, resolve_device(job.train.device)))
    if job.activations is not None:
        path = Path(job.activations)
        source = TensorBatches(load_activations_file(path))
        run_info = RunInfo(activations=InputFile(path=job.activations, sha256=io.sha256_file(path)))
        cache = None
    else:
        cache = extract(job.extract, world=world)
        source = CachedActivations(cache, max_rows=job.extract.tokens)
        source.check_finite()
        run_info = RunInfo(extraction=extraction_info(cache, job.extract))
    dirs = Trainer(job.train, source, out, run_info=run_info, world=world).train(resume=resume)
    if not world.main:
        return dirs
    for name, run_dir in dirs.items():
        m = Run(run_dir).metrics()[-1]
        fvu = ", ".join(f"{v:.4f}" for v in m.fvu)
        print(f"{name}: {run_dir}  training fvu per width [{fvu}]  l0 {m.l0:.1f}  dead {m.dead_fraction:.3f}")
    if cache is not None:
        evaluate_runs(dirs, cache, job)
    return dirs


def evaluate_runs(dirs: dict[str, Path], cache: Path, job: TrainJob) -> None:
    """Held-out metrics of every run, written to its eval.json and printed."""
    from msae.evaluate import evaluate_run
    from msae.lm import load_lm

    lm = load_lm(job.extract.model, job.extract.device, precision=job.extract.precision)
    for name, run_dir in dirs.items():
        try:
            r = evaluate_run(run_dir, cache, lm, job.eval_contexts)
        except ValueError as exc:
            print(f"{name}: held-out evaluation skipped ({exc})")
            continue
        fvu = ", ".join(f"{v:.4f}" for v in r.fvu)
        print(f"{name} held-out ({r.rows:,} rows): fvu per width [{fvu}]  l0 {r.l0:.1f}  dead {r.dead_fraction:.3f}  "
              f"CE loss recovered {r.ce_loss_recovered:.3f} (clean {r.ce_clean:.3f}, SAE {r.ce_sae:.3f}, "
              f"zero {r.ce_zero:.3f})")
        if r.parts:
            print("    held-out fvu by corpus part: " + ", ".join(f"{p.part} {p.fvu:.3f} ({p.rows:,} rows)" for p in r.parts))


def cmd_train(args: argparse.Namespace) -> int:
    job = config_from_args(TrainJob, args, skip=TRAIN_SKIP)
    with launch(job.train.device) as world:
        train(job, Path(args.out), resume=args.resume, world=world)
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    cfg = config_from_args(ExtractConfig, args)
    with launch(cfg.device) as world:
        if world.main:
            print(precision_note(cfg.precision, resolve_device(cfg.device)))
        cache = extract(cfg, world=world)
    if world.main:
        m = read_manifest(cache)
        print(f"{cache}: {m.rows:,} rows from {m.contexts_done:,} contexts"
              + (" (the corpus ran out)" if m.exhausted else ""))
    return 0


def check_output_file(path: Path, is_own: Callable[[Path], bool]) -> None:
    """An output file is written only where it can be, and replaces only a file of its own kind (`is_own`)."""
    if path.is_dir():
        raise CLIError(f"{path}: a directory; --out names the file to write")
    if not path.parent.is_dir():
        raise CLIError(f"{path}: {path.parent} is not a directory")
    if path.exists() and not is_own(path):
        raise CLIError(f"{path} exists and is not what this command writes: pick another --out")
    # A file made and removed, not os.access: root passes os.access everywhere, even where nothing can be made
    # (under /proc, on a read-only mount), and the failure would come after the work, naming a temp file.
    try:
        tempfile.TemporaryFile(dir=path.parent).close()
    except OSError as exc:
        raise CLIError(f"{path}: cannot write in {path.parent} ({exc.strerror})") from None


def cmd_taxonomy(args: argparse.Namespace) -> int:
    from msae import taxonomy
    from msae.lm import load_lm

    if args.min_tokens < 1:
        raise CLIError(f"--min-tokens must be at least 1, got {args.min_tokens}")
    check_output_file(Path(args.out), taxonomy.is_taxonomy_file)
    built = taxonomy.build_taxonomy(taxonomy.read_data_noun(Path(args.data_noun)), load_lm(args.model, "cpu").tokenizer,
                                    args.model, args.min_tokens, source=f"WordNet 3.0 {Path(args.data_noun).name}")
    if not built.categories:  # the benchmarks would refuse it later, after their model load and extraction
        raise CLIError(f"no category of {args.data_noun} has {args.min_tokens:,} single-token words: lower --min-tokens")
    taxonomy.write_taxonomy(built, Path(args.out))
    print(f"{args.out}: {len(built.categories):,} categories with >= {args.min_tokens} single-token words")
    return 0


def cmd_corpus(args: argparse.Namespace) -> int:
    from msae.corpus import CORPORA, corpus_info, missing_note
    from msae.lm import load_lm

    tokenizer = load_lm(args.model, "cpu").tokenizer if args.info else None
    rows = corpus_info(tokenizer)
    for row in rows:
        counts = f"  {row['documents']:,} documents, {row['tokens']:,} tokens" if "tokens" in row else ""
        print(f"{row['name']}: {row['description']}{counts}\n    licence: {row['licence']}; in: "
              f"{', '.join(row['corpora'])}\n    {row['file']}")
    for corpus in CORPORA:
        if tokenizer is not None:
            total = sum(r.get("tokens", 0) for r in rows if corpus in r["corpora"])
            print(f"total {corpus}: {total:,} distinct tokens ({args.model} tokenizer)")
        if missing_note(corpus):
            print(f"note: {missing_note(corpus)}")
    return 0


def cmd_toy(args: argparse.Namespace) -> int:
    from msae import toy

    return toy.main(args)


def cmd_analyze(args: argparse.Namespace) -> int:
    from msae.analysis.analyze import analyze

    acfg = config_from_args(AnalyzeConfig, args)
    if not Path(args.run_dir).exists():
        raise CLIError(f"{args.run_dir}: no such run directory")
    check_against(args.run_dir, args.against)
    if args.activations is not None:
        return _analyze_activations(args, acfg)
    manifest = analyze(Path(args.run_dir), against=[Path(p) for p in args.against], acfg=acfg,
                       overwrite=args.overwrite, say=print)
    print(format_analysis(manifest))
    absorption = Run(args.run_dir).result(AbsorptionResult)
    if acfg.absorption and absorption is not None:
        print(format_absorption(absorption))
    return 0


def _analyze_activations(args: argparse.Namespace, acfg: AnalyzeConfig) -> int:
    from msae.analysis.analyze import analyze_activations

    if args.against:
        raise CLIError("--activations analyses one run; --against needs the corpus (leave one of them out)")
    path = Path(args.activations)
    acts = load_activations_file(path)
    report = analyze_activations(args.run_dir, acts, InputFile(path=args.activations, sha256=io.sha256_file(path)),
                                 acfg.links, overwrite=args.overwrite)
    print(f"{args.run_dir}: {report.rows:,} rows of {args.activations}; {report.links} links "
          f"({report.link_config.criterion}), {report.tree_links} in the tree; written to "
          f"{Path(args.run_dir) / 'features'}")
    print(format_hierarchy_figures(report.hierarchy_figures, report.link_validation))
    return 0


def format_hierarchy_figures(fig, validation) -> str:
    """The literature's hierarchy figures and the held-out validation, for the terminal."""

    def f(v) -> str:
        return "-" if v is None else f"{v:.3f}"

    lines = [f"  hierarchy ({fig.criterion} tree links: {fig.tree_links}): P(p|c) {f(fig.p_parent_given_child)}, "
             f"P(c|p) {f(fig.p_child_given_parent)}, Hamming {f(fig.hamming)}, sibling IoU {f(fig.sibling_iou)}; "
             f"Tree SAE score {f(fig.treesae_score)} ({fig.treesae_pairs} pairs)"]
    for c in validation.criteria if validation is not None else []:
        held, null = c.heldout_coverage, c.null_coverage
        lines.append(f"  held-out P(p|c), {c.criterion}: {f(held and held.mean)} "
                     f"[{f(held and held.low)}, {f(held and held.high)}] over {c.measured_links} tree links; "
                     f"frequency-matched random parent {f(null and null.mean)}")
    return "\n".join(lines)


def check_against(run_dir: str, others: list[str], flag: str = "--against") -> None:
    """A run compared with itself is a mistake (a typo, a copied line): its figures would read as a comparison."""
    for other in others:
        if Path(other).exists() and Path(other).resolve() == Path(run_dir).resolve():
            raise CLIError(f"{flag} {other} is the run itself: name another run to compare it with")


def locked_run(run_dir: str):
    """A run that a command writes a result into, held under its lock (a run that is not there is named, not
    made)."""
    if not Path(run_dir).is_dir():
        raise CLIError(f"{run_dir}: not a run directory")
    return locked(run_dir)


class ProgressLines:
    """A long command's stages as lines on stderr: a stage's first and last count, and between them at most one
    line every `every` seconds (a line a step would bury the result; none leaves the user guessing for minutes)."""

    def __init__(self, command: str, every: float = 5.0, clock: Callable[[], float] = time.monotonic):
        self.command, self.every, self.clock = command, every, clock
        self.stage, self.last = None, 0.0

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = self.clock()
        if stage != self.stage or done >= total or now - self.last >= self.every:
            print(f"msae {self.command}: {stage} {done:,}/{total:,}", file=sys.stderr, flush=True)
            self.stage, self.last = stage, now


def cmd_hierarchy_bench(args: argparse.Namespace) -> int:
    from msae.analysis.analyze import hierarchy_bench

    check_against(args.run_dir, args.against)
    with locked_run(args.run_dir):
        result = hierarchy_bench(Path(args.run_dir), [Path(p) for p in args.against], args.taxonomy,
                                 device=args.device, progress=ProgressLines("hierarchy-bench"))
    print(format_hierarchy_bench(result))
    return 0


def format_hierarchy_bench(result) -> str:
    """The benchmark's headline table, for the terminal."""

    def iv(x) -> str:
        return "-" if x is None else f"{x.mean:.3f} [{x.low:.3f}, {x.high:.3f}]"

    lines = [f"taxonomy benchmark on {result.model} layer {result.layer}: {result.categories} WordNet categories, "
             f"{result.occurrences:,} member occurrences ({result.from_templates:,} from templates), "
             f"{result.background_rows:,} background rows, {result.ambiguous_tokens} ambiguous tokens left out"]
    for b in result.saes:
        widths = ", ".join("-" if v is None else f"{v:.3f}" for v in b.average_precision_per_width)
        lines.append(f"  {b.name}: parent AP {iv(b.average_precision)} (per width: {widths}); absorption "
                     f"{iv(b.absorption)}; member latents/category {iv(b.member_latents)}; labelled latents "
                     f"{b.labelled_latents}; link precision {iv(b.link_precision)} vs null {iv(b.link_null)} "
                     f"(n {b.link_precision.n if b.link_precision else 0}), over the DAG {iv(b.dag_link_precision)} "
                     f"vs null {iv(b.dag_link_null)} (n {b.dag_link_precision.n if b.dag_link_precision else 0})")
    for name, d in result.differences.items():
        lines.append(f"  {name}: {iv(d)}")
    return "\n".join(lines)


def cmd_gallery(args: argparse.Namespace) -> int:
    from msae.analysis.analyze import make_gallery

    check_against(args.run_dir, [args.against])
    check_against(args.run_dir, [args.narrow] if args.narrow else [], "--narrow")
    with locked_run(args.run_dir):
        result = make_gallery(Path(args.run_dir), Path(args.against), Path(args.narrow) if args.narrow else None,
                              args.taxonomy, device=args.device)
    print(format_gallery(result))
    return 0


def format_gallery(result) -> str:
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


def cmd_absorption(args: argparse.Namespace) -> int:
    from msae.analysis.analyze import measure_absorption

    config = config_from_args(AbsorptionConfig, args)
    check_against(args.run_dir, args.against)
    with locked_run(args.run_dir):
        result = measure_absorption(Path(args.run_dir), [Path(p) for p in args.against], layer=args.layer,
                                    config=config)
    print(format_absorption(result))
    return 0


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
        for lvl in h.per_level:
            lines.append(f"    group {lvl.group} (width {lvl.width}): {lvl.links} links, "
                         f"{lvl.children_with_a_parent}/{lvl.live_latents} live latents have a parent")
        for name, share in m.splitting.items():
            lines.append(f"  {name}: share of latents split into >= 2 (decoder cos 0.3/0.5/0.7): "
                         + " / ".join(f"{v:.3f}" for v in share.values()))
    for name, s in m.against.items():
        lines.append(f"  against {name}: split share by decoder cos (0.3/0.5/0.7) "
                     + " / ".join(f"{v:.3f}" for v in s.split_share_decoder.values())
                     + f", by links {s.split_share_links:.3f}; matched pairs {s.matching.pairs}")
    lines.append("  time: " + ", ".join(f"{k} {v:.1f}s" for k, v in m.timings_s.items()))
    return "\n".join(lines)


class OneLineParser(argparse.ArgumentParser):
    """A flag argparse refuses (a choice outside a Literal, a number that is not one) costs one line, exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="msae", description="Matryoshka sparse autoencoders: train, analyse, explore.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    train = sub.add_parser("train", help="train a Matryoshka and/or vanilla SAE")
    train.add_argument("--out", required=True, help="run directory to write (one SAE) or to hold one per SAE")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    add_config_args(train, TrainJob, skip=TRAIN_SKIP)
    train.set_defaults(func=cmd_train)

    extract_parser = sub.add_parser("extract", help="extract activations into the cache (on every rank under torchrun)")
    add_config_args(extract_parser, ExtractConfig)
    extract_parser.set_defaults(func=cmd_extract)

    corpus = sub.add_parser("corpus", help="the named corpora's parts: provenance, licence (and token counts with --info)")
    corpus.add_argument("--info", action="store_true", help="count documents and tokens with the model's tokenizer")
    corpus.add_argument("--model", default="smollm2-135m", help="whose tokenizer counts the tokens")
    corpus.set_defaults(func=cmd_corpus)

    analyze_parser = sub.add_parser("analyze", help="feature store, hierarchy, splitting, matching and absorption of a run")
    analyze_parser.add_argument("run_dir", help="run directory (sae_weights.safetensors + cfg.json)")
    analyze_parser.add_argument("--against", action="append", default=[],
                                help="another run on the same model and layer: splitting and matching (repeatable)")
    analyze_parser.add_argument("--activations", default=None,
                                help="a safetensors file with a tensor 'activations' (N, d_in): latent statistics and "
                                     "links on these rows (a toy's sample, say) instead of the run's corpus; writes "
                                     "RUN/features/links.parquet and activations_analysis.json")
    analyze_parser.add_argument("--overwrite", action="store_true",
                                help="replace a feature store the other kind of analysis (on text, or on "
                                     "--activations) made")
    add_config_args(analyze_parser, AnalyzeConfig)
    analyze_parser.set_defaults(func=cmd_analyze)

    absorption_parser = sub.add_parser("absorption", help="first-letter absorption of one or more runs (one set of probes)")
    absorption_parser.add_argument("run_dir", help="run directory; absorption.json is written here")
    absorption_parser.add_argument("--against", action="append", default=[], help="another run to measure beside it")
    absorption_parser.add_argument("--layer", type=int, help="layer, when cfg.json does not record it")
    add_config_args(absorption_parser, AbsorptionConfig)
    absorption_parser.set_defaults(func=cmd_absorption)

    bench_parser = sub.add_parser("hierarchy-bench", help="WordNet categories as ground truth: parent recall, absorption, "
                                                          "splitting and link precision per SAE")
    bench_parser.add_argument("run_dir", help="run directory; hierarchy_bench.json is written here")
    bench_parser.add_argument("--against", action="append", default=[], help="another run on the same activations "
                              "(repeatable); differences are taken run minus each")
    bench_parser.add_argument("--taxonomy", default=None, help="a taxonomy JSON (default: the shipped SmolLM2 one)")
    bench_parser.add_argument("--device", default="cpu", help="device for the LM and the SAEs")
    bench_parser.set_defaults(func=cmd_hierarchy_bench)

    gallery_parser = sub.add_parser("gallery", help="one absorption and one splitting case, with heatmaps and contexts")
    gallery_parser.add_argument("run_dir", help="a Matryoshka run; gallery.json is written here")
    gallery_parser.add_argument("--against", required=True, help="its vanilla twin of the same width")
    gallery_parser.add_argument("--narrow", default=None, help="a narrower vanilla SAE (for the splitting case)")
    gallery_parser.add_argument("--taxonomy", default=None, help="a taxonomy JSON (default: the shipped SmolLM2 one)")
    gallery_parser.add_argument("--device", default="cpu", help="device for the LM and the SAEs")
    gallery_parser.set_defaults(func=cmd_gallery)

    tax = sub.add_parser("taxonomy", help="WordNet's noun hierarchy as token sets of a model's vocabulary")
    tax.add_argument("--model", default="smollm2-135m", help="whose tokenizer (default: smollm2-135m)")
    tax.add_argument("--data-noun", default="/usr/share/wordnet/data.noun", help="WordNet's data.noun (wordnet-base)")
    tax.add_argument("--min-tokens", type=int, default=5, help="smallest category kept (default: 5)")
    tax.add_argument("--out", required=True, help="the JSON to write")
    tax.set_defaults(func=cmd_taxonomy)

    export_parser = sub.add_parser("export", help="write a run in SAELens's or dictionary_learning's layout")
    from msae import export

    export.add_args(export_parser)
    export_parser.set_defaults(func=export.main)

    toy_parser = sub.add_parser("toy", help="train vanilla and Matryoshka SAEs on a toy hierarchy and compare them")
    from msae import toy

    toy.add_args(toy_parser)
    toy_parser.set_defaults(func=cmd_toy)
    return parser


def check_device(device: str | None) -> None:
    """Every command's --device, refused in one line before any work: a name torch does not know, CUDA where
    there is none, a GPU index past the last."""
    if device is not None:
        check_device_name(device)
        resolve_device(device)


def os_error_text(exc: OSError) -> str:
    """An OSError as the user needs it: the path and what the system said about it."""
    where = " -> ".join(str(p) for p in (exc.filename, exc.filename2) if p is not None)
    return f"{where}: {exc.strerror}" if where and exc.strerror else str(exc)


INTERRUPTED = 128 + 2
"""The exit status of a command stopped by Ctrl-C (SIGINT), as shells report it: not a mistake (2), not a crash."""


def close_progress_bars() -> None:
    """End the progress bars a failed or interrupted command left open, so that its one line starts a line of its
    own instead of being glued onto a bar."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_device(getattr(args, "device", None))
        return args.func(args)
    except (CLIError, TrainingError, CorpusError, LMLoadError, ValueError, AnalysisError, SAELoadError, ConfigError,
            RecordError, RunError, RankLost) as exc:
        message = str(exc)
    except torch.OutOfMemoryError:
        message = "the device ran out of memory: pick smaller sizes (--batch-size, widths) or another --device"
    except OSError as exc:
        message = os_error_text(exc)
    except KeyboardInterrupt:
        close_progress_bars()
        again = " with --resume" if args.command == "train" else ""
        print(f"msae {args.command}: interrupted; run the same command again{again} to finish", file=sys.stderr)
        return INTERRUPTED
    close_progress_bars()
    print(f"msae {args.command}: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
