"""Matryoshka level layouts on the built-in layer-15 cache: how the smallest level's width, the number
of levels and `balance` move held-out and fresh-text FVU, each group's share of the L0 and the last group's alive
share, against a vanilla SAE of the same width; with several seeds, how much of it is noise. Writes a JSON.

    python benchmarks/sweep_levels.py [--cache DIR] [--width 2048] [--k 32] [--steps 1000] [--batch-size 4096]
        [--seeds 0,1,2] [--configs m4-1/64,vanilla] [--runs /work/sweep] [--out benchmarks/results/sweep.json]

Configs (W = --width; every one BatchTopK with --k, TrainConfig's defaults otherwise, checkpoints every 250 steps):
    m4-1/64, m4-1/32, m4-1/16           4 levels from W/64, W/32, W/16 to W
    m4-1/64-b0.5, m4-1/32-b0.5, ...     the same with balance 0.5 (level weights 0.125, 0.25, 0.5, 1, summed)
    m4-1/32-b0.25                       balance 0.25 (level weights 1/64, 1/16, 1/4, 1): what ships at 8,192
    m3-1/32                             3 levels from W/32 (against m4-1/32: the number of levels)
    vanilla                             one dictionary of width W
The levels are geometric (one ratio between all of them) from the smallest to W, each rounded to a multiple of 16,
so that only the smallest width changes between the m4 configs. At W = 2048: m4-1/64 32,128,512,2048; m4-1/32
64,208,640,2048; m4-1/16 128,320,816,2048; m3-1/32 64,368,2048. The JSON records each config's widths.

Each (config, seed) trains into RUNS/<config>-s<seed> (the / written as "of"); a run whose cfg.json already has
steps_done == --steps with the same settings is measured again but not retrained, one stopped midway resumes from
its checkpoint, so the sweep can be started again after a stop. A run directory trained with other settings is
refused (use another --runs, e.g. one per --steps). Every run is measured with bench_quality.measure (the held-out
shard, benchmarks/data/fresh_prose.txt, θ against BatchTopK on held-in batches of --batch-size rows); the JSON,
written after every run, holds under a key naming the sweep's settings, per config, each seed's figures, their mean
and standard deviation (ddof 1) across seeds, and the training time.

--hierarchy then runs the taxonomy benchmark of `msae taxonomy-bench` (WordNet categories: parent recall as
average precision, overall and per nested width, absorption, member-specific latents) over every run the JSON holds at
these settings, all configs and seeds, in one pass; figures per run under "hierarchy", mean and std per config under
"hierarchy_mean" / "hierarchy_std", and the paired differences against the shipped layout's seed 0 (m4-1/32-b0.5).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_quality  # noqa: E402  (the measurements, shared with benchmarks/bench_quality.py)

from msae.activations import cache_key, cache_path_for, extraction_info, read_manifest  # noqa: E402
from msae.activations import CachedActivations  # noqa: E402
from msae.config import ExtractConfig, TrainConfig  # noqa: E402
from msae.analysis.validate import mean_std  # noqa: E402  (element-wise across seeds)
from msae.lm import load_lm  # noqa: E402
from msae.results import RunInfo  # noqa: E402
from msae.run import Run, checkpoint_path, locked  # noqa: E402
from msae.train import BatchSource, Trainer, sae_dirs  # noqa: E402

LAYER, TOKENS = 15, 1_500_000
"""The built-in cache the sweep trains on by default (`msae extract --layer 15 --tokens 1500000`)."""
CHECKPOINT_EVERY = 250
WIDTH_MULTIPLE = 16


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """One SAE layout of the sweep."""

    name: str
    levels: int
    """Nested widths (1: vanilla)."""
    smallest: int
    """The smallest level is W / smallest (unused for vanilla)."""
    balance: float | None = None
    """TrainConfig.balance."""

    def widths(self, width: int) -> tuple[int, ...]:
        """Geometric levels from width / smallest to width, rounded to multiples of WIDTH_MULTIPLE (of the smallest
        width, when that is below it)."""
        if self.levels == 1:
            return (width,)
        first = width / self.smallest
        multiple = max(1, min(WIDTH_MULTIPLE, int(first)))
        ratio = self.smallest ** (1 / (self.levels - 1))
        inner = [max(multiple, round(first * ratio**i / multiple) * multiple) for i in range(self.levels - 1)]
        return (*inner, width)

    def train_config(self, width: int, k: int, steps: int, batch_size: int, seed: int) -> TrainConfig:
        return TrainConfig(arch="vanilla" if self.levels == 1 else "matryoshka", widths=self.widths(width), k=k,
                           steps=steps, batch_size=batch_size, balance=self.balance, seed=seed,
                           checkpoint_every=CHECKPOINT_EVERY, device="cpu")

    @property
    def dir_name(self) -> str:
        return self.name.replace("/", "of")


CHOSEN = "m4-1/32-b0.5"
"""The layout the sweep chose at 2,048 latents (assets/make_default.sh ships it at 8,192 latents with balance 0.25,
the m4-1/32-b0.25 row); the hierarchy pass compares every run with it."""
CONFIGS = {c.name: c for c in [
    *(SweepConfig(f"m4-1/{s}", 4, s) for s in (64, 32, 16)),
    *(SweepConfig(f"m4-1/{s}-b0.5", 4, s, balance=0.5) for s in (64, 32, 16)),
    SweepConfig("m4-1/32-b0.25", 4, 32, balance=0.25),
    SweepConfig("m3-1/32", 3, 32),
    SweepConfig("vanilla", 1, 1),
]}


def default_cache() -> Path:
    """The built-in layer-15 cache; refused unless its extraction has finished (a growing cache moves the
    held-out shard)."""
    cfg = ExtractConfig(layer=LAYER, tokens=TOKENS)
    cache = cache_path_for(cache_key(cfg, LAYER), name=cfg.model)
    manifest = read_manifest(cache)
    if manifest.rows < TOKENS and not manifest.exhausted:
        sys.exit(f"{cache} holds {manifest.rows:,} of {TOKENS:,} rows: let `msae extract --layer {LAYER} "
                 f"--tokens {TOKENS}` finish first")
    return cache


def builtin_extraction(cache: Path) -> ExtractConfig:
    """The extraction settings of a cache of the built-in corpus (what each run's cfg.json records)."""
    manifest = read_manifest(cache)
    key = manifest.key
    if not key["corpus"].startswith("builtin:"):
        sys.exit(f"{cache} is not a cache of the built-in corpus")
    # Caches keyed by what the model is keep its name beside the key; older ones keyed it by name.
    return ExtractConfig(model=manifest.model_name or key["model"], layer=key["layer"], ctx_len=key["ctx_len"],
                         outlier_factor=key["outlier_factor"], cache_dtype=key["cache_dtype"])


def train_run(cfg: TrainConfig, source: BatchSource, run_info: RunInfo, run_dir: Path) -> dict:
    """Train (or resume, or leave as it is) the run in `run_dir` on `source`; `cfg` has its steps fixed
    (TrainConfig.for_rows). Finished means every SAE of the run saved at the last step. Returns how: trained_now,
    resumed, train_s (this process's wall time when it trained, else the run's own logged training time)."""
    saved = [Run(d) for d in sae_dirs(cfg, run_dir).values()]
    if any(run.exists for run in saved):
        infos = [run.info() for run in saved if run.exists]
        if any(info.train != cfg for info in infos):
            sys.exit(f"{run_dir} holds a run trained with other settings: use another --runs")
        if len(infos) == len(saved) and all(info.steps_done == cfg.steps for info in infos):
            return {"trained_now": False, "resumed": False, "train_s": saved[0].metrics()[-1].elapsed_s}
    resume = checkpoint_path(run_dir).exists()
    started = time.perf_counter()
    with locked(run_dir):
        Trainer(cfg, source, run_dir, run_info=run_info).train(resume=resume)
    return {"trained_now": True, "resumed": resume, "train_s": round(time.perf_counter() - started, 1)}


def headline(result: dict) -> dict:
    """The figures averaged across seeds."""
    return {
        "heldout_fvu": result["heldout"]["fvu"],
        "part_fvu": {p["part"]: p["fvu"] for p in result["heldout"]["parts"]},
        "fresh_fvu": result["fresh_text"]["fvu"],
        "l0": result["heldout"]["l0"],
        "l0_share": result["groups"]["l0_share"],
        "alive_per_100k": result["groups"]["alive_per_100k"],
        "theta_ratio": result["held_in_theta"]["ratio"],
        "dead_fraction": result["heldout"]["dead_fraction"],
        "train_s": result["train_s"],
    }


def _fmt(values, digits: int = 3) -> str:
    return "/".join("-" if v is None else f"{v:.{digits}f}" for v in values)


def table(configs: dict[str, dict]) -> str:
    """One line per config: mean across its seeds (± std of the full-width held-out FVU when several)."""
    lines = [f"{'config':<14} {'widths':<18} {'seeds':>5} {'held-out FVU per width':<30} {'± full':>6} {'worst part':>10} "
             f"{'fresh':>6} {'L0':>5} {'θ/BTK':>6} {'L0 share per group':<24} {'last alive':>10} {'train s':>8}"]
    for name, c in configs.items():
        m, s = c["mean"], c["std"]
        lines.append(f"{name:<14} {','.join(map(str, c['widths'])):<18} {len(c['runs']):>5} "
                     f"{_fmt(m['heldout_fvu']):<30} {s['heldout_fvu'][-1]:>6.3f} {max(m['part_fvu'].values()):>10.3f} "
                     f"{m['fresh_fvu']:>6.3f} {m['l0']:>5.1f} {m['theta_ratio']:>6.3f} {_fmt(m['l0_share'], 2):<24} "
                     f"{m['alive_per_100k'][-1]:>10.3f} {m['train_s']:>8.0f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, help="activation cache of the built-in corpus (default: layer 15, "
                                                   "1.5M tokens)")
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--seeds", default="0", help="comma-separated seeds; every config runs once per seed")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of: {', '.join(CONFIGS)}")
    parser.add_argument("--runs", type=Path, default=Path("/work/sweep"), help="where the run directories go")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "sweep.json")
    parser.add_argument("--hierarchy", action="store_true",
                        help="then run the taxonomy benchmark over every run the JSON holds at these settings")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    unknown = [n for n in args.configs.split(",") if n not in CONFIGS]
    if unknown:
        sys.exit(f"unknown config(s) {', '.join(unknown)}; known: {', '.join(CONFIGS)}")
    chosen = [CONFIGS[n] for n in args.configs.split(",")]
    train_cfgs = {(c.name, seed): c.train_config(args.width, args.k, args.steps, args.batch_size, seed)
                  for c in chosen for seed in seeds}  # every setting checked before the slow part starts

    cache = args.cache or default_cache()
    extract_cfg = builtin_extraction(cache)
    run_info = RunInfo(extraction=extraction_info(cache, extract_cfg))
    lm = load_lm(extract_cfg.model, "cpu")
    fresh = bench_quality.fresh_rows_for(lm, cache, extract_cfg.layer)
    del lm  # 0.5 GB the training does not need
    held_in = bench_quality.held_in_batches(cache, batch_size=args.batch_size)

    key = f"W{args.width} k{args.k} steps{args.steps} batch{args.batch_size}"
    out = json.loads(args.out.read_text()) if args.out.exists() else {}
    sweep = out.setdefault(key, {"configs": {}})
    sweep["settings"] = {"width": args.width, "k": args.k, "steps": args.steps, "batch_size": args.batch_size,
                         "cache": str(cache), "cache_rows": read_manifest(cache).rows, "runs": str(args.runs),
                         "checkpoint_every": CHECKPOINT_EVERY, "fresh_text": str(bench_quality.FRESH_TEXT.name),
                         "fresh_rows": fresh.rows.shape[0], "held_in_rows": sum(b.shape[0] for b in held_in)}
    sweep["machine"] = {"cpus": len(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads(),
                        "torch": torch.__version__, "platform": platform.platform()}
    for config in chosen:
        entry = sweep["configs"].setdefault(config.name, {"runs": {}})
        for seed in seeds:
            cfg = train_cfgs[config.name, seed]
            entry.update(levels=config.levels, widths=list(cfg.widths), balance=config.balance,
                         level_weights=list(cfg.level_weights_for(len(cfg.widths))))
            run_dir = args.runs / f"{config.dir_name}-s{seed}"
            print(f"{config.name} seed {seed}: {run_dir}", flush=True)
            how = train_run(cfg, CachedActivations(cache), run_info, run_dir)
            result = {**bench_quality.measure(run_dir, cache, fresh, held_in), **how}
            kept = entry["runs"].get(str(seed), {}).get("hierarchy")
            if kept is not None and not how["trained_now"]:
                result["hierarchy"] = kept  # the same SAE: its taxonomy figures still hold
            elif kept is not None:  # retrained: the config's hierarchy figures are out of date until --hierarchy
                entry.pop("hierarchy_mean", None), entry.pop("hierarchy_std", None)
            entry["runs"][str(seed)] = result
            figures = [headline(r) for r in entry["runs"].values()]
            entry["mean"], entry["std"] = mean_std(figures)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(out, indent=1) + "\n")
            print(bench_quality.table({f"{config.name} s{seed}": result}), flush=True)
    print(table({c.name: sweep["configs"][c.name] for c in chosen}))
    if args.hierarchy:
        hierarchy(sweep, args.runs, cache, args.out, out)


HIERARCHY_FIGURES = ("average_precision", "absorption", "member_latents")
"""The taxonomy benchmark's per-SAE figures (means over its categories) that the sweep records and averages."""


def hierarchy(sweep: dict, runs: Path, cache: Path, out_path: Path, out: dict) -> None:
    """The taxonomy benchmark (`msae taxonomy-bench`: WordNet categories, parent recall as average precision,
    absorption, member-specific latents) over every run the sweep holds at these settings, in one pass that shares
    the model's activations: each run's figures go under its "hierarchy", each config's mean and spread across
    seeds under "hierarchy_mean" / "hierarchy_std". The first run is the first config's seed 0 (its folder gets
    hierarchy_bench.json with the paired differences against every other run)."""
    from msae.analysis.analyze import taxonomy_bench

    dirs = {(name, seed): runs / f"{CONFIGS[name].dir_name}-s{seed}"
            for name, entry in sweep["configs"].items() for seed in entry["runs"]}
    order = sorted(dirs, key=lambda key: (key[0] != CHOSEN, key[0], int(key[1])))
    started = time.perf_counter()
    bench = taxonomy_bench(dirs[order[0]], against=[dirs[key] for key in order[1:]], cache=cache)
    by_name = {s.name: s for s in bench.saes}
    for name, seed in order:
        sae = by_name[dirs[name, seed].name]
        figures = {f: getattr(sae, f).mean if getattr(sae, f) is not None else None for f in HIERARCHY_FIGURES}
        figures["average_precision_interval"] = dataclasses.asdict(sae.average_precision) \
            if sae.average_precision is not None else None
        figures["average_precision_per_width"] = sae.average_precision_per_width
        figures["labelled_latents"] = sae.labelled_latents
        sweep["configs"][name]["runs"][seed]["hierarchy"] = figures
    for name, entry in sweep["configs"].items():
        values = [r["hierarchy"] for r in entry["runs"].values()]
        numbers = [{f: v[f] for f in (*HIERARCHY_FIGURES, "labelled_latents", "average_precision_per_width")}
                   for v in values]
        if all(n["average_precision"] is not None for n in numbers):
            entry["hierarchy_mean"], entry["hierarchy_std"] = mean_std(numbers)
    sweep["hierarchy"] = {"first_run": str(dirs[order[0]]), "categories": bench.categories,
                          "occurrences": bench.occurrences, "seconds": round(time.perf_counter() - started, 1),
                          "differences": {k: dataclasses.asdict(v) for k, v in bench.differences.items()}}
    out_path.write_text(json.dumps(out, indent=1) + "\n")
    print(hierarchy_table(sweep["configs"]))


def hierarchy_table(configs: dict[str, dict]) -> str:
    """One line per config with taxonomy figures: mean ± std across its seeds."""
    lines = [f"{'config':<14} {'seeds':>5} {'parent AP':>15} {'AP per width':<28} {'absorption':>15} "
             f"{'member latents':>15}"]
    for name, c in configs.items():
        if "hierarchy_mean" not in c:
            continue
        m, s = c["hierarchy_mean"], c["hierarchy_std"]
        lines.append(f"{name:<14} {len(c['runs']):>5} {m['average_precision']:>8.3f} ±{s['average_precision']:.3f} "
                     f"{_fmt(m['average_precision_per_width']):<28} {m['absorption']:>8.3f} ±{s['absorption']:.3f} "
                     f"{m['member_latents']:>8.2f} ±{s['member_latents']:.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
