"""Each nested group's share of the L0 and the FVU per width as training goes, from runs' metrics.jsonl; writes a JSON.

    python benchmarks/group_share.py NAME=RUN_DIR [NAME=RUN_DIR ...] [--every 100] [--out FILE]

NAME labels the run in the JSON (widths and balance are taken from its cfg.json where it has one).

Made for the target "no group above 40% of the L0" at the shipped size: the sweep (2,048 latents) chose 4 levels
from 1/32 with balance 0.5, whose first group stayed at 31%; at 8,192 latents the same layout's first group grew past
it. The probes in benchmarks/results/probe_8192.json are Matryoshka SAEs of 8,192 latents, k 32, batch 4,096, seed 0,
5,000 planned steps (so that the learning-rate schedule is the shipped one's) stopped early, on the built-in layer-15
cache (the same batches in the same order):

    msae train --model smollm2-135m --layer 15 --corpus builtin --tokens 1500000 --arch matryoshka \\
        --widths W --k 32 --balance B --steps 5000 --batch-size 4096 --seed 0 --log-every 20 --out DIR

with W, B = 256,816,2576,8192 and 0.5 (the sweep's choice; trained with its vanilla twins, stopped at step 1,060),
128,512,2048,8192 and 0.5 (stopped at 700), 256,816,2576,8192 and 0.25 (stopped at 600).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from msae.run import Run

HERE = Path(__file__).resolve().parent


def trajectory(run_dir: Path, every: int) -> list[dict]:
    """Every `every`-th logged step of a Matryoshka run: its L0 share per group and FVU per nested width."""
    out = []
    for m in Run(run_dir).metrics():
        if m.step % every or not m.l0_per_group:
            continue
        total = sum(m.l0_per_group)
        out.append({"step": m.step, "l0_share": [g / total for g in m.l0_per_group], "fvu": list(m.fvu)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="NAME=RUN_DIR")
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "probe_8192.json")
    args = parser.parse_args()
    result = {}
    for spec in args.runs:
        name, _, path = spec.partition("=")
        run = Run(Path(path))
        # A probe stopped before its first checkpoint has no cfg.json: its name says its layout.
        train = run.info().train if (run.path / "cfg.json").exists() else None
        result[name] = {"widths": list(train.widths) if train else None, "balance": train.balance if train else None,
                        "trajectory": trajectory(run.path, args.every)}
        last = result[name]["trajectory"][-1]
        print(f"{name:<12} step {last['step']:>5}: L0 share {'/'.join(f'{s:.2f}' for s in last['l0_share'])}, "
              f"FVU {'/'.join(f'{f:.3f}' for f in last['fvu'])}")
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
