"""The `msae` command: one entry point, sub-commands, flags generated from the config dataclasses."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import sys
import typing
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from msae import io
from msae.analysis.analyze import AnalysisError
from msae.activations import CachedActivations, ExtractConfig, extract, extraction_info, heldout_contexts, read_manifest
from msae.corpus import CorpusError
from msae.io import SAELoadError
from msae.lm import LMLoadError
from msae.train import TensorBatches, TrainConfig, Trainer, TrainingError


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def field_docs(cls) -> dict[str, str]:
    """The docstring under each dataclass field, read from the source (so the help text stays in one place)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for stmt, nxt in zip(body, body[1:]):
        if isinstance(stmt, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[stmt.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def _parse_tuple(kind):
    def parse(text: str):
        return tuple(kind(part) for part in text.split(",") if part.strip())

    return parse


def add_dataclass_args(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    """One --flag per field of `cls`, typed from its annotation, documented from its docstring."""
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = docs.get(f.name, "")
        hint = hints[f.name]
        args = typing.get_args(hint)
        base = next((a for a in args if a is not type(None)), hint) if args and type(None) in args else hint
        if base is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
            continue
        if typing.get_origin(base) is tuple:
            item = typing.get_args(base)[0]
            shown = ",".join(str(v) for v in default) if default else None
            parser.add_argument(flag, type=_parse_tuple(item), default=default, metavar="A,B,...", help=f"{help_text} (default: {shown})")
            continue
        parser.add_argument(flag, type=base, default=default, help=f"{help_text} (default: {default})")


def config_from_args(cls, args: argparse.Namespace):
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(args).items() if k in names})


def load_activations_file(path: Path) -> torch.Tensor:
    """The `activations` tensor (N, d_in) of a safetensors file, checked."""
    if not path.exists():
        raise CLIError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            if "activations" not in f.keys():
                raise CLIError(f"{path}: no tensor named 'activations' (found: {', '.join(f.keys()) or 'none'})")
            acts = f.get_tensor("activations")
    except SafetensorError as exc:
        raise CLIError(f"{path}: not a readable safetensors file ({exc})") from None
    if acts.ndim != 2 or not acts.is_floating_point():
        raise CLIError(f"{path}: 'activations' must be a 2-D float tensor (N, d_in), got {tuple(acts.shape)} {acts.dtype}")
    return acts.float() if acts.dtype in (torch.float16, torch.bfloat16) else acts


def cmd_train(args: argparse.Namespace) -> int:
    cfg = config_from_args(TrainConfig, args)
    if args.activations is not None:
        source = TensorBatches(load_activations_file(Path(args.activations)))
        run_info = {"activations": str(args.activations)}
    else:
        extract_cfg = config_from_args(ExtractConfig, args)
        extract_cfg.device = cfg.device
        cache = extract(extract_cfg)
        source = CachedActivations(cache, max_rows=extract_cfg.tokens)
        run_info = {"extraction": extraction_info(cache)}
    trainer = Trainer(cfg, source, Path(args.out), run_info=run_info)
    dirs = trainer.train(resume=args.resume)
    for name, run_dir in dirs.items():
        m = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
        fvu = ", ".join(f"{v:.4f}" for v in m["fvu"])
        print(f"{name}: {run_dir}  training fvu per width [{fvu}]  l0 {m['l0']:.1f}  dead {m['dead_fraction']:.3f}")
    if args.activations is None:
        evaluate_runs(dirs, cache, extract_cfg, args.eval_contexts)
    return 0


def evaluate_runs(dirs: dict[str, Path], cache: Path, extract_cfg: ExtractConfig, n_contexts: int) -> None:
    """Held-out metrics of every run, written to eval.json beside it and printed."""
    from msae.evaluate import ce_loss_recovered, reconstruction_metrics
    from msae.lm import load_lm

    try:
        heldout = CachedActivations(cache, heldout=True)
    except ValueError:
        print("no held-out shard in the activation cache (it has one shard): held-out evaluation skipped")
        return
    contexts = heldout_contexts(cache)[:n_contexts]
    lm = load_lm(extract_cfg.model, extract_cfg.device)
    layer = read_manifest(cache)["key"]["layer"]
    for name, run_dir in dirs.items():
        sae, _cfg = io.load_sae(run_dir, device=lm.device)
        result = reconstruction_metrics(sae, heldout.all_rows(4096))
        result.update(ce_loss_recovered(lm, sae, contexts, layer))
        result["layer"] = layer
        io.atomic_write_text(run_dir / "eval.json", json.dumps(result, indent=2) + "\n")
        fvu = ", ".join(f"{v:.4f}" for v in result["fvu"])
        print(f"{name} held-out ({result['rows']:,} rows): fvu per width [{fvu}]  l0 {result['l0']:.1f}  "
              f"dead {result['dead_fraction']:.3f}  CE loss recovered {result['ce_loss_recovered']:.3f} "
              f"(clean {result['ce_clean']:.3f}, SAE {result['ce_sae']:.3f}, zero {result['ce_zero']:.3f})")


def cmd_corpus(args: argparse.Namespace) -> int:
    from msae.corpus import corpus_info
    from msae.lm import load_lm

    tokenizer = load_lm(args.model, "cpu").tokenizer if args.info else None
    rows = corpus_info(tokenizer)
    for row in rows:
        counts = f"  {row['documents']} documents, {row['tokens']:,} tokens" if "tokens" in row else ""
        print(f"{row['name']}: {row['description']}{counts}\n    {row['file']}")
    if tokenizer is not None:
        print(f"total: {sum(r['tokens'] for r in rows):,} tokens ({args.model} tokenizer)")
    return 0


def cmd_toy(args: argparse.Namespace) -> int:
    from msae import toy

    return toy.main(args)


def cmd_analyze(args: argparse.Namespace) -> int:
    from msae.analysis.analyze import AnalyzeConfig, analyze
    from msae.analysis.features import StoreConfig
    from msae.analysis.hierarchy import LinkConfig

    acfg = AnalyzeConfig(tokens=args.tokens, absorption=not args.no_absorption, device=args.device,
                         model=args.model, layer=args.layer, corpus=args.corpus,
                         store=config_from_args(StoreConfig, args), links=config_from_args(LinkConfig, args))
    manifest = analyze(Path(args.run_dir), against=[Path(p) for p in args.against], acfg=acfg)
    print(format_analysis(manifest))
    absorption_file = Path(args.run_dir) / "absorption.json"
    if acfg.absorption and absorption_file.exists():
        print(format_absorption(json.loads(absorption_file.read_text())))
    return 0


def cmd_absorption(args: argparse.Namespace) -> int:
    from msae.analysis.analyze import measure_absorption

    result = measure_absorption(Path(args.run_dir), [Path(p) for p in args.against], layer=args.layer)
    print(format_absorption(result))
    return 0


def format_absorption(result: dict) -> str:
    """Absorption per SAE, for the terminal."""
    lines = [f"absorption on {result['model']} layer {result['layer']}: {result['n_words']} words"]
    for name, r in result["saes"].items():
        mean = r["mean"]
        lines.append(f"  {name}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                              for k, v in mean.items()))
    return "\n".join(lines)


def format_analysis(m: dict) -> str:
    """The headline figures of an analysis, for the terminal."""
    lines = [f"{m['run']}: {m['rows']:,} rows, d_sae {m['d_sae']}, widths {m['widths']}, "
             f"dead {m['dead_fraction']:.3f}",
             "  L0 per width: " + ", ".join(f"{w}: {v:.1f}" for w, v in zip(m["widths"], m["l0_per_width"]))]
    if "hierarchy" in m:
        h = m["hierarchy"]
        lines.append(f"  parent-child links: {h['links']:,}; parents with >= 2 children: {h['parents_with_2plus_children']}; "
                     f"mean coverage {h['mean_coverage']}")
        for lvl in h["per_level"]:
            lines.append(f"    group {lvl['group']} (width {lvl['width']}): {lvl['links']} links, "
                         f"{lvl['children_with_a_parent']}/{lvl['live_latents']} live latents have a parent")
        for name, share in m["splitting"].items():
            lines.append(f"  {name}: share of latents split into >= 2 (decoder cos 0.3/0.5/0.7): "
                         + " / ".join(f"{v:.3f}" for v in share.values()))
    for name, s in m.get("against", {}).items():
        lines.append(f"  against {name}: split share by decoder cos (0.3/0.5/0.7) "
                     + " / ".join(f"{v:.3f}" for v in s["split_share_decoder"].values())
                     + f", by links {s['split_share_links']:.3f}; matched pairs {s['matching']['pairs']}")
    lines.append("  time: " + ", ".join(f"{k} {v:.1f}s" for k, v in m["timings_s"].items()))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="msae", description="Matryoshka sparse autoencoders: train, analyse, explore.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a Matryoshka and/or vanilla SAE")
    train.add_argument("--activations", help="safetensors file with a tensor 'activations' (N, d_in); "
                       "without it, activations are extracted from --model on --corpus (and cached)")
    train.add_argument("--out", required=True, help="run directory to write (one SAE) or to hold one per SAE")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    train.add_argument("--eval-contexts", type=int, default=64, help="held-out contexts for CE loss recovered (default: 64)")
    add_dataclass_args(train, TrainConfig)
    add_dataclass_args(train, ExtractConfig, skip=("device",))
    train.set_defaults(func=cmd_train)

    corpus = sub.add_parser("corpus", help="the built-in corpus: provenance (and token counts with --info)")
    corpus.add_argument("--info", action="store_true", help="count documents and tokens with the model's tokenizer")
    corpus.add_argument("--model", default="smollm2-135m", help="whose tokenizer counts the tokens")
    corpus.set_defaults(func=cmd_corpus)

    analyze_parser = sub.add_parser("analyze", help="feature store, hierarchy, splitting, matching and absorption of a run")
    analyze_parser.add_argument("run_dir", help="run directory (sae_weights.safetensors + cfg.json)")
    analyze_parser.add_argument("--against", action="append", default=[],
                                help="another run on the same model and layer: splitting and matching (repeatable)")
    analyze_parser.add_argument("--tokens", type=int, help="cache rows to analyse (default: the whole cache)")
    analyze_parser.add_argument("--no-absorption", action="store_true", help="skip first-letter absorption")
    analyze_parser.add_argument("--device", default="cpu", help="device for the SAEs and the LM (cpu, cuda)")
    analyze_parser.add_argument("--model", help="model, when cfg.json does not record it")
    analyze_parser.add_argument("--layer", type=int, help="layer, when cfg.json does not record it")
    analyze_parser.add_argument("--corpus", help="corpus, when cfg.json does not record it")
    from msae.analysis.features import StoreConfig
    from msae.analysis.hierarchy import LinkConfig

    add_dataclass_args(analyze_parser, StoreConfig)
    add_dataclass_args(analyze_parser, LinkConfig)
    analyze_parser.set_defaults(func=cmd_analyze)

    absorption_parser = sub.add_parser("absorption", help="first-letter absorption of one or more runs (one set of probes)")
    absorption_parser.add_argument("run_dir", help="run directory; absorption.json is written here")
    absorption_parser.add_argument("--against", action="append", default=[], help="another run to measure beside it")
    absorption_parser.add_argument("--layer", type=int, help="layer, when cfg.json does not record it")
    absorption_parser.set_defaults(func=cmd_absorption)

    toy_parser = sub.add_parser("toy", help="train vanilla and Matryoshka SAEs on a toy hierarchy and compare them")
    from msae import toy

    toy.add_args(toy_parser)
    toy_parser.set_defaults(func=cmd_toy)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CLIError, TrainingError, CorpusError, LMLoadError, ValueError, AnalysisError, SAELoadError) as exc:
        print(f"msae {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
