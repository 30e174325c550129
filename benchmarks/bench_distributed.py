"""Data-parallel training under torchrun: steps and tokens per second for 1 and N processes, and the gradient sum
done by msae (one all-reduce per tensor after backward) against DistributedDataParallel's; writes a JSON.

    python benchmarks/bench_distributed.py                # CPU, small size: 1 process on every core, 1 on one core,
                                                          # 2 processes (gloo) sharing the cores
    python benchmarks/bench_distributed.py --device cuda --sizes shipped,65k --runs 1x4,2x4,4x4,8x4   # GPUs (NCCL)

Every measurement is `msae train --activations` on the same synthetic activations (d_in 576, bench_step's),
launched as a user would: `python -m msae.cli train ...` for one process, `torchrun --nproc-per-node N -m msae.cli
train ...` for N (the exact commands are in the JSON), each process with OMP_NUM_THREADS threads (a run `PxT`:
P processes of T threads). Steps per second come from metrics.jsonl, between the first
and the last logged step (start-up and the first step left out); tokens per second = steps per second x batch.
The sync comparison (`--sync`) runs this file under torchrun: the same DataParallelSAE forward and backward, the
gradients summed by World.sum_grads or by DDP (which starts its all-reduce from backward hooks).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from bench_step import D_IN, K, make_activations  # noqa: E402

SIZES = {
    "small": {"widths": (128, 512, 2048), "batch": 1024},
    "shipped": {"widths": (128, 512, 2048, 8192), "batch": 4096},
    "65k": {"widths": (2048, 6144, 14336, 30720, 65536), "batch": 4096},
}
"""Matryoshka SAEs (trained beside a vanilla one of the last width, as the shipped pair); 65k: the paper's groups."""


def train_command(procs: int, acts: Path, size: str, steps: int, device: str, out: Path) -> list[str]:
    s = SIZES[size]
    flags = ["-m", "msae.cli", "train", "--activations", str(acts), "--widths", ",".join(map(str, s["widths"])),
             "--k", str(K), "--batch-size", str(s["batch"]), "--steps", str(steps), "--also-vanilla",
             "--log-every", "1", "--checkpoint-every", str(steps), "--device", device, "--out", str(out)]
    if procs == 1:
        return [sys.executable, *flags]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs), *flags]


def time_training(procs: int, threads: int, acts: Path, size: str, steps: int, device: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = train_command(procs, acts, size, steps, device, Path(tmp) / "run")
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        if device == "cpu":
            env["GLOO_SOCKET_IFNAME"] = "lo"
        done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
        lines = [json.loads(line) for line in (Path(tmp) / "run" / "matryoshka" / "metrics.jsonl").read_text().splitlines()]
    first, last = lines[0], lines[-1]
    steps_per_s = (last["step"] - first["step"]) / (last["elapsed_s"] - first["elapsed_s"])
    command = " ".join(c for c in cmd if c != sys.executable).replace("-m torch.distributed.run", "torchrun")
    return {"size": size, "processes": procs, "threads": threads, "device": device, "steps_per_s": round(steps_per_s, 3),
            "tokens_per_s": round(steps_per_s * SIZES[size]["batch"]), "command": command.strip()}


def sync_worker(steps: int) -> None:
    """Under torchrun: median seconds of forward + backward + gradient sum, msae's sum against DDP's."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from msae.config import TrainConfig
    from msae.distributed import launch
    from msae.train import make_state

    s = SIZES["small"]
    with launch("cpu") as world:
        cfg = TrainConfig(widths=s["widths"], k=K, batch_size=s["batch"], device="cpu")
        g = torch.Generator().manual_seed(world.rank)
        x = torch.randn(s["batch"] // world.size, D_IN, generator=g)
        results = {}
        for mode in ("msae", "ddp", "msae", "ddp"):  # twice each, alternating: the second of each is reported
            state = make_state("bench", s["widths"], D_IN, cfg, torch.device("cpu"), torch.float32, world)
            module = DistributedDataParallel(state.sae) if mode == "ddp" else state.sae
            times, sync_times = [], []
            for _ in range(steps):
                dist.barrier()
                t0 = time.perf_counter()
                out = module(x)
                (out.mse.sum() + out.aux_loss).backward()
                t1 = time.perf_counter()
                if mode == "msae":
                    world.sum_grads(state.sae.parameters())
                times.append(time.perf_counter() - t0)
                sync_times.append(time.perf_counter() - t1)
                state.sae.zero_grad(set_to_none=True)
            results[mode] = {"step_s": statistics.median(times), "after_backward_s": statistics.median(sync_times)}
        if world.main:
            print(json.dumps(results))


def main() -> None:
    if sys.argv[1:2] == ["--sync-worker"]:
        sync_worker(int(sys.argv[2]))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL, one process per GPU)")
    parser.add_argument("--sizes", default="small", help=f"comma-separated, of {', '.join(SIZES)}")
    cores = os.cpu_count() or 1
    parser.add_argument("--runs", default=f"1x{cores},1x1,2x{max(1, cores // 2)}",
                        help="processes x threads of each run (comma-separated)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--sync-steps", type=int, default=10, help="steps of the DDP comparison (0: skip it)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "distributed.json")
    parser.add_argument("--activations", type=Path, default=HERE / "results" / "bench_acts.safetensors")
    args = parser.parse_args()
    if not args.activations.exists():
        make_activations(args.activations)
    import torch

    runs = [tuple(map(int, run.split("x"))) for run in args.runs.split(",")]
    train = [time_training(procs, threads, args.activations, size, args.steps, args.device)
             for size in args.sizes.split(",") for procs, threads in runs]
    for row in train:
        print(f"{row['size']}, {row['processes']} process(es) x {row['threads']} thread(s): {row['steps_per_s']} "
              f"steps/s, {row['tokens_per_s']:,} tokens/s")
    report = {
        "setup": {"d_in": D_IN, "k": K, "sizes": {s: SIZES[s] for s in args.sizes.split(",")}, "steps": args.steps,
                  "saes": "matryoshka + vanilla of the last width"},
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": cores,
                    "torch": torch.__version__, "gpus": torch.cuda.device_count()},
        "train": train,
    }
    if args.sync_steps and args.device == "cpu":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", __file__,
               "--sync-worker", str(args.sync_steps)]
        env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
        done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, check=True)
        report["sync_2_processes_small"] = json.loads(done.stdout.strip().splitlines()[-1])
        print("gradient sum, 2 processes:", report["sync_2_processes_small"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(args.out)


if __name__ == "__main__":
    main()
