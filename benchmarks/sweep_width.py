"""Matryoshka against vanilla across dictionary widths (issue 23): where does a vanilla SAE on SmolLM2-135M start
absorbing, and does a Matryoshka SAE of the same width then keep its parents? Writes a JSON.

    python benchmarks/sweep_width.py [--widths 4096,8192,16384,32768] [--seeds 0] [--tokens 10000000]
        [--corpus large] [--layer 15] [--k 32] [--batch-size 4096] [--runs /work/sweep_width]
        [--out benchmarks/results/sweep_width.json] [--measure-again] [--precision auto|float32|bfloat16]

    python benchmarks/sweep_width.py --seeds 0,1,2 --widths 16384     # the seeds at one width
    python benchmarks/sweep_width.py --ship-width                     # the re-ship's WIDTHS and NARROW (ship_width)
    python benchmarks/sweep_width.py --table                          # every entry of the JSON as Markdown tables

At every width W a Matryoshka SAE and a vanilla SAE of width W train on the same batches (one Trainer, one stream:
TrainConfig.also_vanilla), BatchTopK with k, on the first --tokens rows of the --corpus extraction at --layer (`msae
extract`, run first when the cache holds fewer), each row read once (steps None: one pass). --precision (default
auto: bf16 where the CPU is fast at it, msae.lm.bf16_is_fast) is the model's forward and the SAEs' encoder matmuls
alike; a bf16 extraction is a cache of its own, so bf16 pairs land in an entry of their own (sweep_key: the settings'
name ends in " bf16"), never beside float32 pairs, and the settings record the precision and the CPU. The Matryoshka layout is the shipped one scaled to W: 4 geometric levels
from W/32 with balance 0.25 (benchmarks/sweep_levels.py's m4-1/32-b0.25 row; assets/make_default.sh ships it at
8,192 as 256,816,2576,8192). Both SAEs of a pair start from the same seed, as the shipped pair does; pairs of
different seeds are independent.

Each (W, seed) trains into RUNS/w<W>-s<seed>/{matryoshka,vanilla} with a checkpoint every 250 steps: a stopped
pair resumes from its checkpoint, a finished one is not trained again, and one already measured in the JSON is not
measured again either (--measure-again measures every pair the command names anew). The JSON, written (atomically)
after every pair, holds under a key naming the sweep's settings, per width and seed:
- per SAE: held-out FVU per nested width, per corpus part and on fresh prose, L0, each group's share of it, the
  last group's alive share, θ against BatchTopK, dead fraction (benchmarks/bench_quality.py's `measure`);
- per SAE, the taxonomy benchmark (msae.analysis.taxbench, `msae hierarchy-bench`: WordNet categories on the real
  model): parent AP (95% interval over categories and member tokens), absorption, how often a member latent fires
  and the parent's silence where one does, and member-specific latents (intervals over categories), and each
  category's figures;
- per SAE, first-letter absorption (msae.analysis.absorption, `msae absorption`): the absorption fraction and the
  full-absorption rate as means over the letters used, with 95% bootstrap intervals over those letters, the main
  latents' F1 and the variants; and once per pair the validity note that code reports;
- the paired differences Matryoshka − vanilla: parent AP resampling categories and members, the others resampling
  the same categories (or letters) for both.
Every (W, seed) with both SAEs measured also lands in "by_width": the mean and standard deviation (ddof 1) of the
main figures across the width's seeds, and of each paired difference, with how many seeds' intervals exclude 0 on
either side (`--table` prints them where a width has two seeds or more). Each pair's files also get the results:
matryoshka/hierarchy_bench.json and matryoshka/absorption.json, as `msae hierarchy-bench` and `msae absorption`
write them.

Duration on 2 quiet CPU cores (estimates from step times, not a measurement of this sweep; README's Benchmarks
section gives the arithmetic): with bf16 on an Intel Xeon with AMX, about 2 h 40 min of training for the four widths
with one seed and two more seeds at 16,384; in float32 on an AMD EPYC (Zen 3) without bf16 instructions, about
7 h 35 min. On an AMD EPYC (Zen 4) with AVX-512 BF16, one-off bf16 step times (Matryoshka + vanilla, random rows:
0.83 s at 16,384, 1.43 s at 32,768 latents) give about 34 and 58 min a pair. Measuring adds roughly 30 min, and
extracting the rows first where the cache lacks them 35 min (bf16, AMX), 79 min (bf16, Zen 4: 2,120 rows/s,
results/extract_amd_epyc_zen4.json) or 2 h 40 min (float32) per 10M rows.
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
import bench_quality  # noqa: E402  (held-out, per-part and fresh-text FVU, L0, groups)
import sweep_levels  # noqa: E402  (the layouts, resumable training, means across seeds)

from msae import io  # noqa: E402
from msae.activations import CachedActivations, extract, extraction_info, read_manifest  # noqa: E402
from msae.analysis import absorption, taxbench  # noqa: E402
from explorer.tables import WIDTH_SWEEP_DIFFERENCES, interval_text, seed_spread  # noqa: E402  (the paired differences)
from msae.analysis.validate import bootstrap_mean  # noqa: E402
from msae.config import AbsorptionConfig, ExtractConfig, TaxonomyBenchConfig, TrainConfig  # noqa: E402
from msae.lm import LoadedLM, compute_dtype, cpu_description, load_lm  # noqa: E402
from msae.results import AbsorptionResult, TaxonomyBench, Interval, RunInfo, SAEAbsorption, TaxonomyBenchSAE  # noqa: E402
from msae.run import Run  # noqa: E402
from msae.taxonomy import Taxonomy, load_taxonomy  # noqa: E402
from msae.train import sae_dirs  # noqa: E402

WIDTHS = (4096, 8192, 16384, 32768)
TOKENS = 10_000_000
LAYOUT = sweep_levels.CONFIGS["m4-1/32-b0.25"]
"""The shipped layout (assets/make_default.sh), scaled to each width."""
ARCHS = ("matryoshka", "vanilla")


@dataclasses.dataclass
class Shared:
    """What every pair is trained on and measured with (loaded once per invocation)."""

    cache: Path
    source: CachedActivations
    """The first --tokens rows of the cache's training shards."""
    run_info: RunInfo
    lm: LoadedLM
    layer: int
    fresh: bench_quality.TextRows
    held_in: list[torch.Tensor]
    taxonomy: Taxonomy
    taxonomy_cfg: TaxonomyBenchConfig
    """The taxonomy benchmark's settings."""
    prepared: taxbench.Prepared
    """The taxonomy benchmark's categories and pool of rows."""
    absorption_cfg: AbsorptionConfig
    probed: absorption.ProbedWords
    """The first-letter words, their activations and probes."""
    precision: str = "auto"
    """The SAEs' encoder precision (the model's forward ran in the same: ExtractConfig.precision)."""


def train_config(width: int, k: int, batch_size: int, seed: int, precision: str = "auto") -> TrainConfig:
    """The pair at `width`: the shipped layout and a vanilla twin on the same batches, one pass (steps None), the
    encoder's matmuls in `precision`."""
    return dataclasses.replace(LAYOUT.train_config(width, k, None, batch_size, seed), also_vanilla=True,
                               precision=precision)


def interval(x: Interval | None) -> dict | None:
    return None if x is None else x.to_json()


def taxonomy_figures(sae: TaxonomyBenchSAE) -> dict:
    """One SAE's taxonomy figures with their intervals, and each category's."""
    return {
        "average_precision": interval(sae.average_precision),
        "average_precision_per_width": sae.average_precision_per_width,
        "absorption": interval(sae.absorption),
        "member_fired": interval(sae.member_fired),
        "absorption_given_member": interval(sae.absorption_given_member),
        "member_latents": interval(sae.member_latents),
        "labelled_latents": sae.labelled_latents,
        "categories": [{"category": c.category, "average_precision": c.average_precision, "absorption": c.absorption,
                        "member_latents": c.member_latents, "member_fired": c.member_fired}
                       for c in sae.categories],
    }


def used_letters(result: SAEAbsorption) -> dict[str, tuple[float, float]]:
    """(absorption fraction, full-absorption rate) of each letter the means use."""
    return {r.letter: (r.absorption_fraction, r.full_absorption_rate) for r in result.letters if r.used}


def first_letter_figures(result: SAEAbsorption) -> dict:
    """One SAE's first-letter means with bootstrap intervals over the letters used."""
    letters = used_letters(result)
    fractions = torch.tensor([v[0] for v in letters.values()])
    full = torch.tensor([v[1] for v in letters.values()])
    return {
        "absorption_fraction": interval(bootstrap_mean(fractions)),
        "full_absorption_rate": interval(bootstrap_mean(full)),
        "main_f1": result.mean.main_f1,
        "n_main_latents": result.mean.n_main_latents,
        "variants": {v.name: {"absorption_fraction": v.absorption_fraction,
                              "full_absorption_rate": v.full_absorption_rate} for v in result.variants},
        "letters": {letter: v[0] for letter, v in letters.items()},
    }


def paired_differences(bench: TaxonomyBench, letters: AbsorptionResult) -> dict:
    """Matryoshka − vanilla, paired over the same categories and the same letters (95% intervals)."""
    m, v = bench.saes
    diff = {key: interval(bench.differences[taxbench.difference_key(m.name, v.name, taxbench.DIFFERENCE_MEASURES[f])])
            for key, f in (("parent_ap", "average_precision"), ("taxonomy_absorption", "absorption"),
                           ("member_latents", "member_latents"), ("member_fired", "member_fired"),
                           ("absorption_given_member", "absorption_given_member"))}  # paired by the benchmark
    lm_, lv = (used_letters(letters.saes[arch]) for arch in ARCHS)
    common = [letter for letter in lm_ if letter in lv]  # one set of probes: the same letters for both
    for key, i in (("first_letter_absorption", 0), ("first_letter_full_absorption", 1)):
        diff[key] = interval(bootstrap_mean(torch.tensor([lm_[x][i] - lv[x][i] for x in common])))
    return diff


def measure_pair(dirs: dict[str, Path], shared: Shared) -> dict:
    """Every figure of both SAEs of a pair and their paired differences; the pair's files get the taxonomy
    benchmark and the absorption result."""
    started = time.perf_counter()
    # Both SAEs trained together: the training time is the pair's (its entry's train_s), not each SAE's.
    out = {arch: {"quality": sweep_levels.headline(
        {**bench_quality.measure(dirs[arch], shared.cache, shared.fresh, shared.held_in), "train_s": None})}
        for arch in ARCHS}
    saes = {arch: Run(dirs[arch]).load_sae() for arch in ARCHS}
    bench = taxbench.run_bench(saes, shared.cache, shared.lm, shared.layer, shared.taxonomy, links={},
                               cfg=shared.taxonomy_cfg, prepared=shared.prepared)
    Run(dirs["matryoshka"]).write_result(bench)
    letters = absorption.measure(dirs, lm=shared.lm, config=shared.absorption_cfg, probed=shared.probed)
    Run(dirs["matryoshka"]).write_result(letters)
    for arch, sae in zip(ARCHS, bench.saes):
        out[arch]["taxonomy"] = taxonomy_figures(sae)
        out[arch]["first_letter"] = first_letter_figures(letters.saes[arch])
    out["difference"] = paired_differences(bench, letters)
    out["taxonomy"] = {"categories": bench.categories, "occurrences": bench.occurrences,
                       "from_templates": bench.from_templates, "seconds": bench.seconds}
    out["first_letter"] = {"letters": letters.saes["matryoshka"].mean.letters, "n_words": letters.n_words,
                           "n_test_words": letters.n_test_words, "validity": letters.validity.to_json()}
    out["measure_s"] = round(time.perf_counter() - started, 1)
    return out


SPREAD = {
    "heldout_fvu": lambda a: a["quality"]["heldout_fvu"][-1],
    "fresh_fvu": lambda a: a["quality"]["fresh_fvu"],
    "l0": lambda a: a["quality"]["l0"],
    "dead_fraction": lambda a: a["quality"]["dead_fraction"],
    "parent_ap": lambda a: a["taxonomy"]["average_precision"]["mean"],
    "taxonomy_absorption": lambda a: a["taxonomy"]["absorption"]["mean"],
    "member_latents": lambda a: a["taxonomy"]["member_latents"]["mean"],
    "first_letter_absorption": lambda a: a["first_letter"]["absorption_fraction"]["mean"],
}
"""The figures averaged across a width's seeds in "by_width"."""


def by_width(runs: dict[str, dict[str, dict]]) -> dict:
    """Per width and architecture, the mean and standard deviation across seeds of the SPREAD figures; per width,
    those of each paired difference's mean (None where a seed has none) and how many seeds' 95% intervals lie
    entirely above 0 and entirely below it."""
    out = {}
    for width, seeds in runs.items():
        out[width] = {"seeds": sorted(seeds, key=int)}
        for arch in ARCHS:
            values = [{name: get(entry[arch]) for name, get in SPREAD.items()} for entry in seeds.values()]
            out[width][arch] = dict(zip(("mean", "std"), sweep_levels.mean_std(values)))
        out[width]["difference"] = seed_spread(seeds)  # the page's across-seeds lines read the same figures
    return out


SHIPPABLE = (4096, 8192, 16384)
"""Widths whose float16 pair fits assets/'s 160 MB with its stores (32,768 does not)."""


def ship_width(sweep: dict, seed: int = 0) -> tuple[int, str]:
    """The shipped width by the rule README states before the sweep ran: the widest of SHIPPABLE at which vanilla's
    taxonomy absorption exceeds Matryoshka's with a paired 95% interval excluding 0 (Matryoshka − vanilla entirely
    below 0), else the widest of SHIPPABLE; with why. Every SHIPPABLE width must be measured at `seed`."""
    runs = sweep.get("runs", {})
    missing = [w for w in SHIPPABLE if str(seed) not in runs.get(str(w), {})]
    if missing:
        raise ValueError(f"the sweep has not measured width {', '.join(map(str, missing))} at seed {seed}")
    for width in sorted(SHIPPABLE, reverse=True):
        d = runs[str(width)][str(seed)]["difference"]["taxonomy_absorption"]
        if d["high"] < 0:
            return width, (f"widest where vanilla absorbs more: Matryoshka − vanilla taxonomy absorption "
                           f"{d['mean']:.4f} [{d['low']:.4f}, {d['high']:.4f}] at {width}")
    diffs = ", ".join(f"{w}: {runs[str(w)][str(seed)]['difference']['taxonomy_absorption']['high']:.4f}"
                      for w in SHIPPABLE)
    return max(SHIPPABLE), f"no width where vanilla absorbs more (upper ends of Matryoshka − vanilla: {diffs})"


def sweep_key(corpus: str, layer: int, k: int, tokens: int, batch_size: int, precision: str = "float32") -> str:
    """The JSON's entry for these settings. `precision` is the one the model's forward and the SAEs' encoders ran
    in (resolved: float32 or bfloat16): bf16 pairs train on another cache (a bf16 extraction) with other rounding,
    so they get an entry of their own, named with " bf16"; float32 keeps the name it had before bf16 sweeps."""
    key = f"{corpus} layer{layer} k{k} tokens{tokens} batch{batch_size}"
    return key if precision == "float32" else f"{key} {precision.replace('float', 'f')}"


def resolved_precision(precision: str) -> str:
    """float32 or bfloat16: what `precision` (auto, float32, bfloat16) means on this machine's CPU."""
    return io.dtype_name(compute_dtype(precision, torch.device("cpu")))


def run_sweep(widths: list[int], seeds: list[int], k: int, batch_size: int, tokens: int, shared: Shared, runs: Path,
              out_path: Path, key: str, measure_again: bool = False) -> dict:
    """Train and measure every (width, seed) pair, the JSON at `out_path` rewritten after each; returns the sweep
    (the JSON's entry at `key`)."""
    cfgs = {(w, s): train_config(w, k, batch_size, s, shared.precision).for_rows(shared.source.n_rows)
            for w in widths for s in seeds}
    out = json.loads(out_path.read_text()) if out_path.exists() else {}
    sweep = out.setdefault(key, {"runs": {}})
    steps = next(iter(cfgs.values())).steps
    sweep["settings"] = {
        "k": k, "batch_size": batch_size, "tokens": tokens, "training_rows": shared.source.n_rows, "steps": steps,
        "passes": round(steps * batch_size / shared.source.n_rows, 4), "layout": LAYOUT.name,
        "balance": LAYOUT.balance, "checkpoint_every": sweep_levels.CHECKPOINT_EVERY, "cache": str(shared.cache),
        "cache_rows": read_manifest(shared.cache).rows, "runs": str(runs), "layer": shared.layer,
        "fresh_text": bench_quality.FRESH_TEXT.name, "absorption": shared.absorption_cfg.to_json(),
        "precision": resolved_precision(shared.precision)}
    sweep["machine"] = {"cpus": len(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads(),
                        "torch": torch.__version__, "platform": platform.platform(), "cpu": cpu_description()}
    for (width, seed), cfg in cfgs.items():
        run_dir = runs / f"w{width}-s{seed}"
        print(f"width {width} seed {seed}: {run_dir}", flush=True)
        how = sweep_levels.train_run(cfg, shared.source, shared.run_info, run_dir)
        kept = sweep["runs"].get(str(width), {}).get(str(seed))
        if kept is not None and not how["trained_now"] and not measure_again:
            print("  trained and measured before: kept", flush=True)
            continue
        dirs = sae_dirs(cfg, run_dir)
        entry = {"run": str(run_dir), "widths": {arch: list(w) for arch, w in cfg.sae_specs()}, "steps": cfg.steps,
                 **how, **measure_pair(dirs, shared)}
        sweep["runs"].setdefault(str(width), {})[str(seed)] = entry
        sweep["by_width"] = by_width(sweep["runs"])
        io.atomic_write_text(out_path, json.dumps(out, indent=1) + "\n")
        print(pair_line(width, seed, entry), flush=True)
    return sweep


def _iv(x: dict | None) -> str:
    return "-" if x is None else f"{x['mean']:+.3f} [{x['low']:+.3f}, {x['high']:+.3f}]"


def pair_line(width: int, seed: int, entry: dict) -> str:
    """A pair's main figures on one line each."""
    lines = []
    for arch in ARCHS:
        a = entry[arch]
        lines.append(f"  {arch:<10} held-out FVU {a['quality']['heldout_fvu'][-1]:.3f}  L0 {a['quality']['l0']:.1f}  "
                     f"dead {a['quality']['dead_fraction']:.3f}  parent AP {_iv(a['taxonomy']['average_precision'])}  "
                     f"taxonomy absorption {_iv(a['taxonomy']['absorption'])}  first-letter "
                     f"{_iv(a['first_letter']['absorption_fraction'])}")
    lines.append("  M − V      " + "  ".join(f"{label} {_iv(entry['difference'][key])}"
                                             for key, label in WIDTH_SWEEP_DIFFERENCES.items()))
    return f"width {width} seed {seed}\n" + "\n".join(lines)


TABLE_COLUMNS = ("width", "seed", "held-out FVU M / V", "fresh-prose FVU M / V", "dead M / V", "parent AP M",
                 "parent AP V", "taxonomy absorption M", "taxonomy absorption V", "taxonomy absorption M − V",
                 "member latent fires M / V", "absorption where a member latent fires M / V",
                 "absorption where a member latent fires M − V", "member latents M / V", "first-letter absorption M",
                 "first-letter absorption V", "first-letter absorption M − V")
"""The columns of `markdown_table`."""


def markdown_table(sweep: dict) -> str:
    """A sweep (one settings' entry of the JSON) as a Markdown table for README: one row per (width, seed),
    Matryoshka (M) beside vanilla (V); held-out FVU at full width; intervals are the JSON's 95% ones."""
    def iv(x: dict | None) -> str:
        return interval_text(None if x is None else Interval.from_json(x)) or "-"

    def pair(entry: dict, get, fmt: str) -> str:
        values = (get(entry[arch]) for arch in ARCHS)
        return " / ".join("-" if x is None else format(x, fmt) for x in values)

    def mean_of(sae: dict, name: str) -> float | None:  # None: measured before the figure existed, or no category
        return (sae["taxonomy"].get(name) or {}).get("mean")

    rows = []
    for width, seeds in sorted(sweep["runs"].items(), key=lambda item: int(item[0])):
        for seed, e in sorted(seeds.items(), key=lambda item: int(item[0])):
            m, v, d = e["matryoshka"], e["vanilla"], e["difference"]
            rows.append([f"{int(width):,}", seed, pair(e, lambda a: a["quality"]["heldout_fvu"][-1], ".3f"),
                         pair(e, lambda a: a["quality"]["fresh_fvu"], ".3f"),
                         pair(e, lambda a: a["quality"]["dead_fraction"], ".2%"),
                         iv(m["taxonomy"]["average_precision"]), iv(v["taxonomy"]["average_precision"]),
                         iv(m["taxonomy"]["absorption"]), iv(v["taxonomy"]["absorption"]),
                         iv(d["taxonomy_absorption"]), pair(e, lambda a: mean_of(a, "member_fired"), ".3f"),
                         pair(e, lambda a: mean_of(a, "absorption_given_member"), ".3f"),
                         iv(d.get("absorption_given_member")), pair(e, lambda a: mean_of(a, "member_latents"), ".1f"),
                         iv(m["first_letter"]["absorption_fraction"]), iv(v["first_letter"]["absorption_fraction"]),
                         iv(d["first_letter_absorption"])])
    return _markdown(TABLE_COLUMNS, rows)


def _markdown(columns, rows) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows])


def spread_table(sweep: dict) -> str | None:
    """Across the seeds of each width measured at more than one: every paired difference Matryoshka − vanilla as the
    mean ± standard deviation of the seeds' means, and how many seeds' 95% intervals lie above 0 and below it, as a
    Markdown table (None when no width has two seeds)."""
    spread = by_width(sweep["runs"])
    rows = []
    for width, s in sorted(spread.items(), key=lambda item: int(item[0])):
        if len(s["seeds"]) < 2:
            continue
        d, cells = s["difference"], []
        for key in WIDTH_SWEEP_DIFFERENCES:
            mean, std = d["mean"][key], d["std"][key]
            cells.append("-" if mean is None else f"{mean:+.3f} ± {std:.3f} ({d['seeds_above_0'][key]} above 0, "
                                                  f"{d['seeds_below_0'][key]} below)")
        rows.append([f"{int(width):,}", ", ".join(s["seeds"]), *cells])
    if not rows:
        return None
    return _markdown(("width", "seeds", *(f"{label} M − V" for label in WIDTH_SWEEP_DIFFERENCES.values())), rows)


def shared_inputs(ecfg: ExtractConfig, tokens: int, absorption_cfg: AbsorptionConfig, lm: LoadedLM | None = None,
                  held_in: int = bench_quality.HELD_IN_BATCHES, batch_size: int = 4096,
                  root: Path | None = None, taxonomy_cfg: TaxonomyBenchConfig = TaxonomyBenchConfig()) -> Shared:
    """The cache (extracted up to `tokens` rows first when it holds fewer), the first `tokens` of its training
    rows, the model, the fresh text's rows, held-in batches, the taxonomy benchmark's pool and the first-letter
    probes."""
    lm = lm or load_lm(ecfg.model, "cpu", precision=ecfg.precision)
    cache = extract(ecfg, lm=lm, root=root)
    layer = read_manifest(cache).key["layer"]
    source = CachedActivations(cache, max_rows=tokens)
    source.check_finite()
    tax = load_taxonomy(model=ecfg.model)
    return Shared(cache=cache, source=source, run_info=RunInfo(extraction=extraction_info(cache, ecfg)), lm=lm,
                  layer=layer, fresh=bench_quality.fresh_rows_for(lm, cache, layer),
                  held_in=bench_quality.held_in_batches(cache, held_in, batch_size), taxonomy=tax,
                  taxonomy_cfg=taxonomy_cfg, prepared=taxbench.prepare(cache, lm, layer, tax, taxonomy_cfg),
                  absorption_cfg=absorption_cfg,
                  probed=absorption.probe_words(lm, layer, absorption_cfg), precision=ecfg.precision)


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=ints, default=list(WIDTHS), help="comma-separated dictionary widths")
    parser.add_argument("--seeds", type=ints, default=[0], help="comma-separated seeds; every width runs once per seed")
    parser.add_argument("--tokens", type=int, default=TOKENS, help="activation rows to extract and train on once")
    parser.add_argument("--corpus", default="large", help="what `msae extract --corpus` takes")
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--runs", type=Path, default=Path("/work/sweep_width"), help="where the run directories go")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "sweep_width.json")
    parser.add_argument("--measure-again", action="store_true", help="measure pairs already in the JSON again")
    parser.add_argument("--precision", choices=("auto", "float32", "bfloat16"),
                        help="the model's forward and the SAEs' encoder matmuls (default auto: bf16 where this CPU "
                             "is fast at it); bf16 pairs land in an entry of their own (sweep_key). With "
                             "--ship-width: the entry whose pairs the rule reads (default float32)")
    parser.add_argument("--ship-width", action="store_true",
                        help="train nothing: print the re-ship's settings by the stated rule (ship_width) from the "
                             "JSON at --out as shell assignments (WIDTHS=... NARROW=...), and why on stderr")
    parser.add_argument("--table", action="store_true",
                        help="train nothing: print every entry of the JSON at --out as README's Markdown tables")
    args = parser.parse_args()
    if args.table:  # read the JSON only
        for key, sweep in json.loads(args.out.read_text()).items():
            print(f"### {key} ({sweep.get('settings', {}).get('precision', 'float32')})\n")
            print(markdown_table(sweep))
            spread = spread_table(sweep)
            if spread:
                print("\nAcross seeds (mean ± standard deviation of the seeds' paired differences):\n")
                print(spread)
            print()
        return
    if args.ship_width:
        sweeps = json.loads(args.out.read_text())
        key = sweep_key(args.corpus, args.layer, args.k, args.tokens, args.batch_size,
                        resolved_precision(args.precision or "float32"))
        if key not in sweeps:
            sys.exit(f"{args.out} has no sweep {key!r} (it has: {', '.join(map(repr, sweeps))})")
        width, why = ship_width(sweeps[key])
        widths = LAYOUT.widths(width)
        print(f"WIDTHS={','.join(map(str, widths))} NARROW={widths[2]}")
        print(f"shipped width {width}: {why}", file=sys.stderr)
        return
    precision = args.precision or "auto"
    for width in args.widths:  # every setting checked before the slow part starts
        train_config(width, args.k, args.batch_size, args.seeds[0], precision)
    ecfg = ExtractConfig(corpus=args.corpus, layer=args.layer, tokens=args.tokens, precision=precision)
    shared = shared_inputs(ecfg, args.tokens, AbsorptionConfig(), batch_size=args.batch_size)
    key = sweep_key(args.corpus, shared.layer, args.k, args.tokens, args.batch_size, resolved_precision(precision))
    run_sweep(args.widths, args.seeds, args.k, args.batch_size, args.tokens, shared, args.runs, args.out, key,
              args.measure_again)


if __name__ == "__main__":
    main()
