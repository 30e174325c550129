"""What bf16 compute costs in accuracy, at the shipped size; writes a JSON.

    python benchmarks/bench_precision.py [--steps 1000] [--work /work/bench-precision]
                                         [--out benchmarks/results/precision.json] [--parts train,toy,cache]

  train  The shipped Matryoshka's settings (widths 256/816/2,576/8,192, k 32, balance 0.25, batch 4,096, seed 0) trained
         twice on the very same batches, once with the encoder in float32 and once in bfloat16 (float32 weights,
         Adam and loss either way): held-out FVU per width, L0, dead fraction and FVU per corpus part, and their
         differences. The batches come from a bf16 extraction of the shipped runs' text (built-in corpus, layer 15),
         what `msae train` extracts by default on this CPU; both runs read the same rows, so only the SAE's compute
         differs. Each run checkpoints in --work and resumes.
  toy    The toy presets (nabeshima, chanin) trained both ways: the toy's exact absorption and recovery figures.
  cache  The shipped Matryoshka (float32 compute) on the held-out rows of a float32 and of a bf16 extraction of the
         same text: FVU per width and per part, and the residual stream's own difference between the two caches.

Each part's figures are written as soon as it ends, so a stop loses only the part it was in.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SHIPPED = ROOT / "assets" / "default" / "matryoshka"
PRECISIONS = ("float32", "bfloat16")


def shipped_extract_config(precision: str):
    """The extraction the shipped runs were trained on (their cfg.json), in `precision`."""
    from msae.config import ExtractConfig

    return ExtractConfig(model="smollm2-135m", layer=15, corpus="builtin", tokens=1_500_000, precision=precision)


def train_config(steps: int, precision: str):
    """The shipped Matryoshka's training settings (assets/make_default.sh), for `steps` steps."""
    from msae.config import TrainConfig

    return TrainConfig(arch="matryoshka", widths=(256, 816, 2576, 8192), k=32, balance=0.25, steps=steps,
                       batch_size=4096, seed=0, checkpoint_every=100, log_every=20, precision=precision)


def heldout_figures(sae, cache: Path) -> dict:
    """Held-out FVU per width, L0, dead fraction and full-width FVU per corpus part of `sae` on `cache`."""
    from msae.activations import CachedActivations
    from msae.evaluate import fvu_by_part, reconstruction_metrics

    heldout = CachedActivations(cache, heldout=True)
    r = reconstruction_metrics(sae, heldout.all_rows(4096))
    parts = fvu_by_part(sae, heldout) or []
    return {"rows": r.rows, "fvu": r.fvu, "l0": r.l0, "dead_fraction": r.dead_fraction,
            "fvu_by_part": {p.part: p.fvu for p in parts}}


def part_train(steps: int, work: Path) -> dict:
    from msae.activations import CachedActivations, extract
    from msae.run import Run
    from msae.train import Trainer

    cache = extract(shipped_extract_config("bfloat16"))
    out = {"cache": cache.name, "steps": steps, "tokens": steps * 4096, "runs": {}}
    for precision in PRECISIONS:
        run_dir = work / f"matryoshka-{precision}"
        trainer = Trainer(train_config(steps, precision), CachedActivations(cache, max_rows=1_500_000), run_dir)
        started = time.perf_counter()
        # A checkpoint also leaves a usable cfg.json, so "finished" is the steps it records, not the file's presence.
        finished = (run_dir / "cfg.json").exists() and Run(run_dir).info().steps_done == steps
        if not finished:
            trainer.train(resume=trainer.checkpoint_path.exists())
        seconds = time.perf_counter() - started
        last = Run(run_dir).metrics()[-1]
        sae = Run(run_dir).load_sae(precision=precision)
        out["runs"][precision] = {"train_seconds_this_call": round(seconds, 1), "training_fvu": last.fvu,
                                  "training_l0": last.l0, "heldout": heldout_figures(sae, cache)}
    a, b = (out["runs"][p]["heldout"] for p in PRECISIONS)
    out["bf16_minus_float32"] = {
        "heldout_fvu": [y - x for x, y in zip(a["fvu"], b["fvu"])],
        "l0": b["l0"] - a["l0"],
        "dead_fraction": b["dead_fraction"] - a["dead_fraction"],
        "fvu_by_part": {k: b["fvu_by_part"][k] - v for k, v in a["fvu_by_part"].items() if k in b["fvu_by_part"]},
    }
    return out


def part_toy() -> dict:
    from msae.toy import PRESETS, compare

    out = {}
    for name in ("nabeshima", "chanin"):
        preset = PRESETS[name]
        out[name] = {}
        for precision in PRECISIONS:
            result = compare(preset.make(seed=0), **{**preset.train, "precision": precision})
            out[name][precision] = {"vanilla": result.vanilla.to_json(), "matryoshka": result.matryoshka.to_json()}
    return out


def part_cache() -> dict:
    """The shipped SAE on both extractions' held-out rows, and the two residual streams' difference row by row."""
    from msae.activations import CachedActivations, extract
    from msae.run import Run

    caches = {p: extract(shipped_extract_config(p)) for p in PRECISIONS}
    sae = Run(SHIPPED).load_sae(precision="float32")
    out = {"caches": {p: c.name for p, c in caches.items()},
           "shipped_sae": {p: heldout_figures(sae, c) for p, c in caches.items()}}
    a, b = (out["shipped_sae"][p] for p in PRECISIONS)
    out["bf16_minus_float32"] = {"heldout_fvu": [y - x for x, y in zip(a["fvu"], b["fvu"])], "l0": b["l0"] - a["l0"]}
    rel = []
    rows_a = CachedActivations(caches["float32"], heldout=True).all_rows(4096)
    rows_b = CachedActivations(caches["bfloat16"], heldout=True).all_rows(4096)
    for x, y in zip(rows_a, rows_b):
        if x.shape != y.shape:  # the two extractions filtered different rows (an outlier cut at the edge)
            out["rows_differ"] = True
            break
        rel.append(((y.double() - x.double()).norm(dim=1) / x.double().norm(dim=1).clamp_min(1e-12)))
    if rel:
        rel_all = torch.cat(rel)
        q = torch.quantile(rel_all[: 1 << 24], torch.tensor([0.5, 0.99], dtype=torch.float64)).tolist()
        out["residual_relative_l2"] = {"median": q[0], "p99": q[1], "rows": int(rel_all.numel())}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--work", type=Path, default=Path("/work/bench-precision"))
    parser.add_argument("--out", type=Path, default=HERE / "results" / "precision.json")
    parser.add_argument("--parts", default="train,toy,cache")
    args = parser.parse_args()

    from msae import io
    from msae.lm import bf16_is_fast, keep_freed_memory

    keep_freed_memory()
    result = json.loads(args.out.read_text()) if args.out.exists() else {}
    result["machine"] = {"cpu": platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                         "bf16_fast": bf16_is_fast(torch.device("cpu")), "cpus": os.cpu_count()}
    runners = {"train": lambda: part_train(args.steps, args.work), "toy": part_toy, "cache": part_cache}
    for name in args.parts.split(","):
        started = time.perf_counter()
        result[name] = runners[name]()
        result[name]["seconds"] = round(time.perf_counter() - started, 1)
        io.atomic_write_text(args.out, json.dumps(result, indent=1))
        print(f"{name}: {json.dumps(result[name])[:2000]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
