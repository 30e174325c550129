"""The `msae` command: one entry point, sub-commands, flags generated from the config dataclasses (msae.config)."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from msae import io, reports
from msae.activations import extract, read_activations_file, read_manifest
from msae.analysis.analyze import AnalysisError
from msae.config import (TRAIN_SKIP, AbsorptionConfig, AnalyzeConfig, ConfigError, CorpusInfoConfig, ExtractConfig,
                         GalleryConfig, TaxonomyBenchConfig, TaxonomyConfig, TrainJob, add_config_args,
                         check_device_name, config_from_args)
from msae.corpus import CorpusError
from msae.distributed import RankLost, launch
from msae.io import SAELoadError
from msae.lm import LMLoadError, keep_freed_memory, precision_note, resolve_device
from msae.records import RecordError
from msae.results import AbsorptionResult, InputFile
from msae.run import Run, RunError, locked
from msae.train import TrainingError, train_job


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def cmd_train(args: argparse.Namespace) -> int:
    job = config_from_args(TrainJob, args, skip=TRAIN_SKIP)
    with launch(job.train.device) as world:
        train_job(job, Path(args.out), resume=args.resume, world=world, say=print)
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    cfg = config_from_args(ExtractConfig, args)
    with launch(cfg.device) as world:
        if world.main:
            print(precision_note(cfg.precision, resolve_device(cfg.device)))
        cache = extract(cfg, world=world)
    if world.main:
        print(reports.extraction_line(cache, read_manifest(cache)))
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

    cfg = config_from_args(TaxonomyConfig, args)
    check_output_file(Path(args.out), taxonomy.is_taxonomy_file)
    built = taxonomy.build_taxonomy(taxonomy.read_data_noun(Path(cfg.data_noun)), load_lm(cfg.model, "cpu").tokenizer,
                                    cfg.model, cfg.min_tokens, source=f"WordNet 3.0 {Path(cfg.data_noun).name}")
    if not built.categories:  # the benchmarks would refuse it later, after their model load and extraction
        raise CLIError(f"no category of {cfg.data_noun} has {cfg.min_tokens:,} single-token words: lower --min-tokens")
    taxonomy.write_taxonomy(built, Path(args.out))
    print(f"{args.out}: {len(built.categories):,} categories with >= {cfg.min_tokens} single-token words")
    return 0


def cmd_corpus(args: argparse.Namespace) -> int:
    from msae.corpus import CORPORA, corpus_info, missing_note
    from msae.lm import load_lm

    cfg = config_from_args(CorpusInfoConfig, args)
    tokenizer = load_lm(cfg.model, "cpu").tokenizer if cfg.info else None
    rows = corpus_info(tokenizer)
    for row in rows:
        counts = f"  {row['documents']:,} documents, {row['tokens']:,} tokens" if "tokens" in row else ""
        print(f"{row['name']}: {row['description']}{counts}\n    licence: {row['licence']}; in: "
              f"{', '.join(row['corpora'])}\n    {row['file']}")
    for corpus in CORPORA:
        if tokenizer is not None:
            total = sum(r.get("tokens", 0) for r in rows if corpus in r["corpora"])
            print(f"total {corpus}: {total:,} distinct tokens ({cfg.model} tokenizer)")
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
    print(reports.format_analysis(manifest))
    absorption = Run(args.run_dir).result(AbsorptionResult)
    if acfg.absorption and absorption is not None:
        print(reports.format_absorption(absorption))
    return 0


def _analyze_activations(args: argparse.Namespace, acfg: AnalyzeConfig) -> int:
    from msae.analysis.analyze import analyze_activations

    if args.against:
        raise CLIError("--activations analyses one run; --against needs the corpus (leave one of them out)")
    path = Path(args.activations)
    acts = read_activations_file(path)
    report = analyze_activations(args.run_dir, acts, InputFile(path=args.activations, sha256=io.sha256_file(path)),
                                 acfg.links, overwrite=args.overwrite)
    print(f"{args.run_dir}: {report.rows:,} rows of {args.activations}; {report.links} links "
          f"({report.link_config.criterion}), {report.tree_links} in the tree; written to "
          f"{Path(args.run_dir) / 'features'}")
    print(reports.format_hierarchy_figures(report.hierarchy_figures, report.link_validation))
    return 0


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


def cmd_taxonomy_bench(args: argparse.Namespace) -> int:
    from msae.analysis.analyze import taxonomy_bench

    config = config_from_args(TaxonomyBenchConfig, args)
    check_against(args.run_dir, args.against)
    with locked_run(args.run_dir):
        result = taxonomy_bench(Path(args.run_dir), [Path(p) for p in args.against], config,
                                 progress=ProgressLines(args.command))
    print(reports.format_taxonomy_bench(result))
    return 0


def cmd_gallery(args: argparse.Namespace) -> int:
    from msae.analysis.analyze import make_gallery

    config = config_from_args(GalleryConfig, args)
    check_against(args.run_dir, [args.wide], "--wide")
    check_against(args.run_dir, [args.narrow] if args.narrow else [], "--narrow")
    with locked_run(args.run_dir):
        result = make_gallery(Path(args.run_dir), Path(args.wide), Path(args.narrow) if args.narrow else None, config)
    print(reports.format_gallery(result))
    return 0


def cmd_absorption(args: argparse.Namespace) -> int:
    from msae.analysis.analyze import measure_absorption

    config = config_from_args(AbsorptionConfig, args)
    check_against(args.run_dir, args.against)
    with locked_run(args.run_dir):
        result = measure_absorption(Path(args.run_dir), [Path(p) for p in args.against], layer=args.layer,
                                    config=config)
    print(reports.format_absorption(result))
    return 0


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
    add_config_args(corpus, CorpusInfoConfig)
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

    # hierarchy-bench: the command's first name, kept for scripts that use it.
    bench_parser = sub.add_parser("taxonomy-bench", aliases=["hierarchy-bench"],
                                  help="the taxonomy benchmark: WordNet categories as ground truth for parent recall, "
                                       "absorption, splitting and link precision per SAE")
    bench_parser.add_argument("run_dir", help="run directory; its hierarchy_bench.json is written here")
    bench_parser.add_argument("--against", action="append", default=[], help="another run on the same activations "
                              "(repeatable); differences are taken run minus each")
    add_config_args(bench_parser, TaxonomyBenchConfig)
    bench_parser.set_defaults(func=cmd_taxonomy_bench)

    gallery_parser = sub.add_parser("gallery", help="one absorption and one splitting case, with heatmaps and contexts")
    gallery_parser.add_argument("run_dir", help="a Matryoshka run; gallery.json is written here")
    # --against: this flag's first name, kept for scripts; elsewhere --against names runs to compare with.
    gallery_parser.add_argument("--wide", "--against", dest="wide", required=True,
                                help="the run's vanilla twin of the same width")
    gallery_parser.add_argument("--narrow", default=None, help="a narrower vanilla SAE (for the splitting case)")
    add_config_args(gallery_parser, GalleryConfig)
    gallery_parser.set_defaults(func=cmd_gallery)

    tax = sub.add_parser("taxonomy", help="WordNet's noun hierarchy as token sets of a model's vocabulary")
    tax.add_argument("--out", required=True, help="the JSON to write")
    add_config_args(tax, TaxonomyConfig)
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
    if argv is None:  # run as the program, a batch job; not a test or library calling main() in its own process
        keep_freed_memory()
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
