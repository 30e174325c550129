"""Time and peak memory of `msae analyze`; writes a JSON.

    python benchmarks/bench_analyze.py RUN_DIR [--against OTHER] [--tokens N] [--no-absorption]
        [--precision auto|float32|bfloat16] [--cache CACHE_DIR] [--out benchmarks/results/analyze.json]
    python benchmarks/bench_analyze.py RUN_DIR --random-widths 1024,2048,4096,8192,16384 --no-absorption \
        [--grow-cache 1000000]

The runs are copied (their weights and cfg.json) and the copies analysed, so no run's store changes. --cache
analyses over another activation cache of the same model and layer (a smaller one, say) instead of the recorded one.
With --random-widths, a randomly initialised Matryoshka SAE of those widths is analysed over RUN_DIR's
activation cache instead (the memory bound: 16,384 latents over the cache must fit in 8 GB; a random
SAE fires more evenly than a trained one, which makes the co-activation table larger, not smaller);
--grow-cache repeats the cache's shards (as new contexts) up to that many rows, for more rows than the corpus has.
The analysis runs in a child process so that its peak RSS is its own; results are merged into the JSON under a
key naming the run, so several runs share one file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def grown_cache(cache: Path, rows: int, out: Path) -> tuple[Path, int]:
    """A copy of `cache` (its shards linked, not copied) that goes on with its own shards again from the first,
    re-indexed as new contexts, until it holds at least `rows` rows; returns the copy and its row count. For the
    memory bound on more rows than the built-in corpus gives: the repeated rows are real activations, so an SAE
    fires on them as on the first pass."""
    from safetensors.torch import load_file, save_file

    from msae.activations import MANIFEST, read_manifest

    manifest = read_manifest(cache)
    out.mkdir(parents=True)
    for shard in manifest.shards:
        (out / shard.file).symlink_to(cache / shard.file)
    shards, total = list(manifest.shards), manifest.rows
    n_contexts = sum(s.contexts for s in shards)
    for i, shard in enumerate(manifest.shards * 8):
        if total >= rows:
            break
        tensors = load_file(str(cache / shard.file))  # the whole shard, re-indexed and written again
        shift = n_contexts - int(tensors["context_start"][0])
        tensors["context_start"] = tensors["context_start"] + shift
        tensors["context"] = tensors["context"] + shift
        name = f"repeat_{i:05d}.safetensors"
        save_file(tensors, str(out / name))
        shards.append(dataclasses.replace(shard, file=name))
        total += shard.rows
        n_contexts += shard.contexts
    (out / MANIFEST).write_text(dataclasses.replace(manifest, shards=shards, rows=total).dumps())
    return out, total


def sae_copy(run_dir: Path, to: Path) -> Path:
    """A directory holding the run's SAE (weights and cfg.json) and nothing else, named like the run."""
    from msae.run import Run

    to = to / run_dir.name
    to.mkdir(parents=True)
    for path in Run(run_dir).sae_files:
        shutil.copy2(path, to / path.name)
    return to


def child(args: argparse.Namespace) -> dict:
    import torch

    import dataclasses

    from msae.activations import cache_root
    from msae.analysis.analyze import analyze
    from msae.config import AnalyzeConfig
    from msae.run import Run
    from msae.sae import SAE

    run_dir = Path(args.run_dir)
    cache = Path(args.cache) if args.cache else None
    copies = Path(tempfile.mkdtemp(prefix="msae-bench-analyze-runs-"))
    # The analysis writes its store beside the SAE: it runs on copies of the runs' two files, never on the runs
    # themselves (the shipped runs' stores are assets).
    run_dir, against = sae_copy(run_dir, copies / "run"), [sae_copy(Path(a), copies / f"against-{i}")
                                                           for i, a in enumerate(args.against)]
    if args.random_widths:
        widths = [int(w) for w in args.random_widths.split(",")]
        run = Run(run_dir)
        sae, info = run.load_sae(), run.info()
        rand = SAE(sae.d_in, widths, k=sae.k)
        tmp = Path(tempfile.mkdtemp(prefix="msae-bench-analyze-"))
        if args.grow_cache:
            cache, rows = grown_cache(cache_root() / info.extraction.cache_id, args.grow_cache, tmp / "cache")
            info = dataclasses.replace(info, extraction=dataclasses.replace(info.extraction, rows=rows))
        Run(tmp / "random").save_sae(rand, info)
        run_dir = tmp / "random"
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    manifest = analyze(run_dir, against=against, cache=cache,
                       acfg=AnalyzeConfig(tokens=args.tokens, absorption=not args.no_absorption, precision=args.precision))
    seconds = time.perf_counter() - t0
    if args.random_widths:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(copies, ignore_errors=True)
    return {
        "run": str(args.run_dir) + (f" (random SAE, widths {args.random_widths}"
                                    f"{f', cache grown to {args.grow_cache:,} rows' if args.grow_cache else ''})"
                                    if args.random_widths else "")
               + (f" on cache {Path(args.cache).name}" if args.cache else "") + f", precision {args.precision}",
        "precision": args.precision,
        "against": args.against,
        "rows": manifest.rows,
        "d_sae": manifest.d_sae,
        "seconds": round(seconds, 1),
        "timings_s": {k: round(v, 1) for k, v in manifest.timings_s.items()},
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--against", action="append", default=[])
    parser.add_argument("--tokens", type=int)
    parser.add_argument("--no-absorption", action="store_true")
    parser.add_argument("--random-widths")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--precision", default="auto", choices=("auto", "float32", "bfloat16"),
                        help="the encoders' precision (AnalyzeConfig.precision)")
    parser.add_argument("--cache", help="analyse over this activation cache instead of the one the run records")
    parser.add_argument("--grow-cache", type=int, metavar="ROWS",
                        help="with --random-widths: repeat the cache's shards until it holds ROWS rows")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "analyze.json")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    done = subprocess.run([sys.executable, __file__, "--child", *sys.argv[1:]], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(done.stderr[-3000:])
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["machine"] = {"cpus": len(__import__("os").sched_getaffinity(0)), "platform": platform.platform()}
    out = json.loads(args.out.read_text()) if args.out.exists() else {}
    out[result["run"]] = result
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
