"""Training-step time of msae's SAEs against the ways multi-scale dictionaries are trained today; writes a JSON.

    python benchmarks/bench_step.py [--steps 10] [--out benchmarks/results/step.json] [--peers-python PY]

Measured at d_in 576, k 32, batch 4096, widths 1024..16384 (issue 2), each in both allocator modes (glibc
default, and glibc keeping freed memory: see MALLOC_KEEP below), each timing in a fresh process:
  (a) Matryoshka vs vanilla BatchTopK of the same width        target <= 1.2x
  (b) one Matryoshka vs five vanilla SAEs of the nested widths target >= 1.6x cheaper
  (c) our vanilla vs a plain dense PyTorch TopK step           target >= 1.8x faster
  (d) our Matryoshka vs SAELens / dictionary_learning           target >= 4x SAELens, same mode
(d) needs the peers installed in another interpreter (--peers-python; see benchmarks/peers.py).
All sides train on the same activations file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
D_IN, K, BATCH = 576, 32, 4096
WIDTHS = (1024, 2048, 4096, 8192, 16384)

MALLOC_KEEP = {
    "MALLOC_MMAP_THRESHOLD_": str(1 << 30),
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": str(16 << 30),
    "MALLOC_TOP_PAD_": str(1 << 30),
}
"""glibc otherwise returns each large temporary to the OS and faults its pages in again on the next step."""


def make_activations(path: Path, n_rows: int = BATCH * 4, seed: int = 0) -> None:
    """Low-rank structured Gaussian activations with a few large-norm rows, like a residual stream."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(256, D_IN, generator=g)
    acts = torch.randn(n_rows, 256, generator=g) @ basis + 0.5 * torch.randn(n_rows, D_IN, generator=g)
    acts *= torch.exp(0.3 * torch.randn(n_rows, 1, generator=g))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"activations": acts.contiguous()}, str(path))


def time_ours(acts_path: str, widths: list[int], steps: int, warmup: int = 2) -> dict:
    """Median seconds of msae's full training step (forward, loss with AuxK, backward, Adam, constraints)."""
    import torch
    from safetensors.torch import load_file

    from msae.train import TrainConfig, geometric_median, make_state, sae_step

    acts = load_file(acts_path)["activations"]
    cfg = TrainConfig(widths=tuple(widths), k=K, batch_size=BATCH, steps=100_000, threshold_start_step=0)
    state = make_state("bench", tuple(widths), D_IN, cfg, torch.device("cpu"), torch.float32)
    scale = 1.0 / acts.pow(2).sum(1).mean().sqrt()
    with torch.no_grad():
        state.sae.b_dec.copy_(geometric_median((acts[:BATCH] * scale).double()).float())
    n_batches = acts.shape[0] // BATCH
    times = []
    for i in range(warmup + steps):
        x = acts[(i % n_batches) * BATCH : (i % n_batches + 1) * BATCH] * scale
        start = time.perf_counter()
        sae_step(state, x, i, cfg)
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times[warmup:]), "steps_s": times[warmup:]}


def time_dense(acts_path: str, steps: int) -> dict:
    sys.path.insert(0, str(HERE))
    import peers
    from safetensors.torch import load_file

    return peers.time_plain_dense_topk(load_file(acts_path)["activations"], d_sae=WIDTHS[-1], k=K, n_steps=steps)


def run_child(args: list[str], malloc_keep: bool, python: str = sys.executable) -> dict:
    """Run one timing in a fresh process, so allocator state and mode never leak between measurements."""
    env = dict(os.environ)
    if malloc_keep:
        env.update(MALLOC_KEEP)
    out = subprocess.run([python, *args], env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        return {"error": (out.stderr or out.stdout).strip().splitlines()[-1:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(acts_path: Path, steps: int, peers_python: str | None) -> dict:
    results: dict = {}
    for mode, keep in (("default", False), ("malloc_keep", True)):
        me = [str(Path(__file__).resolve()), "--child"]
        r = {
            "matryoshka": run_child([*me, "ours", str(acts_path), ",".join(map(str, WIDTHS)), str(steps)], keep),
            "vanilla": run_child([*me, "ours", str(acts_path), str(WIDTHS[-1]), str(steps)], keep),
            "plain_dense_topk": run_child([*me, "dense", str(acts_path), "", str(steps)], keep),
        }
        for w in WIDTHS[:-1]:
            r[f"vanilla_{w}"] = run_child([*me, "ours", str(acts_path), str(w), str(steps)], keep)
        if peers_python:
            peer = run_child(
                [str(HERE / "peers.py"), "--activations", str(acts_path), "--steps", str(steps), "--stdout-json"],
                keep,
                python=peers_python,
            )
            r.update({f"peer_{k}": v for k, v in peer.items()})
        results[mode] = r
    return results


def ratios(mode: dict) -> dict:
    med = {k: v.get("median_s") for k, v in mode.items()}
    out = {}
    if med.get("matryoshka") and med.get("vanilla"):
        out["a_matryoshka_over_vanilla"] = med["matryoshka"] / med["vanilla"]
        five = [med.get(f"vanilla_{w}") for w in WIDTHS[:-1]] + [med["vanilla"]]
        if all(five):
            out["b_five_vanillas_over_matryoshka"] = sum(five) / med["matryoshka"]
    if med.get("plain_dense_topk") and med.get("vanilla"):
        out["c_dense_topk_over_our_vanilla"] = med["plain_dense_topk"] / med["vanilla"]
    for peer in ("sae_lens", "dictionary_learning"):
        if med.get(f"peer_{peer}") and med.get("matryoshka"):
            out[f"d_{peer}_over_our_matryoshka"] = med[f"peer_{peer}"] / med["matryoshka"]
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        what, acts_path, widths, steps = sys.argv[2:6]
        if what == "ours":
            result = time_ours(acts_path, [int(w) for w in widths.split(",")], int(steps))
        else:
            result = time_dense(acts_path, int(steps))
        print(json.dumps(result))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "step.json")
    parser.add_argument("--activations", type=Path, default=HERE / "results" / "bench_acts.safetensors")
    parser.add_argument("--peers-python", help="python of a venv with sae-lens / dictionary_learning")
    args = parser.parse_args()
    if not args.activations.exists():
        make_activations(args.activations)
    import torch

    results = measure(args.activations, args.steps, args.peers_python)
    report = {
        "setup": {"d_in": D_IN, "k": K, "batch": BATCH, "widths": WIDTHS, "steps": args.steps},
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "device": "cpu"},
        "results": results,
        "ratios": {mode: ratios(r) for mode, r in results.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(args.out)
    print(json.dumps(report["ratios"], indent=2))


if __name__ == "__main__":
    main()
