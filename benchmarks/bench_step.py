"""Training-step time of msae's SAEs against the ways multi-scale dictionaries are trained today; writes a JSON.

    python benchmarks/bench_step.py [--steps 10] [--out benchmarks/results/step.json] [--peers-python PY]

Measured at d_in 576, k 32, batch 4096, widths 1024..16384 (the shipped size), each in both allocator modes (glibc
default, and glibc keeping freed memory: peers.MALLOC_KEEP_ENV), each timing in a fresh process. Our step always
runs as `msae train` runs it, whose process keeps freed memory itself (msae.lm.keep_freed_memory) in either mode:
  (a) Matryoshka vs vanilla BatchTopK of the same width        target <= 1.2x
  (b) one Matryoshka vs five vanilla SAEs of the nested widths target >= 1.6x cheaper
  (c) our vanilla vs a plain dense PyTorch TopK step           target >= 1.8x faster
  (d) our Matryoshka vs SAELens / dictionary_learning           target >= 4x SAELens, same mode
      (with AuxK running every step on both sides, and without it on both sides)
  (e) each precision (--precisions): our encoder in float32 and in bfloat16 (float32 weights, Adam and loss), the
      encoder's forward matmul alone as the floor, and the peers under their bf16 autocast for the bf16 rows.
      bf16 targets: Matryoshka step >= 2.5x its float32 time, within 1.5x of the bf16 encoder-matmul floor,
      >= 6x SAELens with autocast.
bfloat16 is measured only where this CPU has bf16 matmul instructions (msae.lm.bf16_is_fast), unless --precisions
names it: without them torch's bf16 matmuls run hundreds of times slower than float32. The CPU is recorded
(msae.lm.cpu_description).
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
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import peers  # noqa: E402  (plain torch; the peer packages themselves load only in the peers venv)

D_IN, K, BATCH = 576, 32, 4096
WIDTHS = (1024, 2048, 4096, 8192, 16384)

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


def time_ours(acts_path: str, widths: list[int], steps: int, aux: bool, precision: str = "float32",
              warmup: int = 2) -> dict:
    """Median seconds of msae's full training step (forward, loss with AuxK, backward, Adam, constraints), with the
    encoder in `precision` (float32 weights either way).

    With `aux`, every latent that did not fire in the previous step counts as dead, so AuxK runs every step,
    as the peers' with-aux variants do."""
    import torch
    from safetensors.torch import load_file

    from msae.config import TrainConfig
    from msae.lm import keep_freed_memory
    from msae.train import geometric_median, make_state, sae_step

    keep_freed_memory()  # as every `msae` command does (msae.cli.main)
    acts = load_file(acts_path)["activations"]
    cfg = TrainConfig(widths=tuple(widths), k=K, batch_size=BATCH, steps=100_000, threshold_start_step=0,
                      dead_tokens=1 if aux else 10_000_000, precision=precision)
    state = make_state("bench", tuple(widths), D_IN, cfg, torch.device("cpu"), torch.float32)
    scale = 1.0 / acts.pow(2).sum(1).mean().sqrt()
    with torch.no_grad():
        state.sae.b_dec.copy_(geometric_median((acts[:BATCH] * scale).double()).float())
    n_batches = acts.shape[0] // BATCH
    times, dead = [], []
    for i in range(warmup + steps):
        x = acts[(i % n_batches) * BATCH : (i % n_batches + 1) * BATCH] * scale
        start = time.perf_counter()
        metrics = sae_step(state, x, i, cfg)
        times.append(time.perf_counter() - start)
        dead.append(round(metrics["dead_fraction"] * state.sae.d_sae))
    return {"median_s": statistics.median(times[warmup:]), "steps_s": times[warmup:], "dead_latents": dead[warmup:]}


def time_encoder_floor(acts_path: str, steps: int, precision: str) -> dict:
    """Median seconds of the encoder's forward matmul alone (the batch against 16,384 latents, in the row chunks
    the step uses, bias added): the step's floor, since every other part is sparse or O(B · d_in)."""
    import torch
    from safetensors.torch import load_file

    from msae.sparse import CHUNK_ROWS

    dtype = getattr(torch, precision)
    x = load_file(acts_path)["activations"][:BATCH].to(dtype)
    W = torch.randn(D_IN, WIDTHS[-1]).to(dtype)
    b = torch.zeros(WIDTHS[-1], dtype=dtype)
    times = []
    for _ in range(2 + steps):
        start = time.perf_counter()
        for row0 in range(0, BATCH, CHUNK_ROWS):
            torch.addmm(b, x[row0 : row0 + CHUNK_ROWS], W)
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times[2:]), "steps_s": times[2:]}


def time_dense(acts_path: str, steps: int) -> dict:
    from safetensors.torch import load_file

    return peers.time_plain_dense_topk(load_file(acts_path)["activations"], d_sae=WIDTHS[-1], k=K, n_steps=steps)


def run_child(args: list[str], malloc_keep: bool) -> dict:
    """Run one of our timings in a fresh process, so allocator state and mode never leak between them."""
    env = dict(os.environ)
    if malloc_keep:
        env.update(peers.MALLOC_KEEP_ENV)
    load_before = os.getloadavg()[0]
    out = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        return {"error": (out.stderr or out.stdout).strip().splitlines()[-1:]}
    result = json.loads(out.stdout.strip().splitlines()[-1])
    # The 1-minute load average around the timing: about the thread count when the machine was otherwise idle.
    result["load_avg"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    return result


def run_peers(python: str, acts_path: Path, steps: int, malloc_keep: bool, autocast: bool = False) -> dict:
    """The peers' real trainers, in their own venv (peers.py applies the allocator mode itself); with `autocast`,
    under their bf16 autocast (the peers' way to the precision of our bf16 encoder)."""
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "peers.json"
        cmd = [python, str(HERE / "peers.py"), "--out", str(out), "--activations", str(acts_path), "--n-steps", str(steps),
               "--peers", "saelens,dictionary_learning,saelens_noaux,dictionary_learning_noaux"]
        cmd += ["--malloc-keep"] if malloc_keep else []
        cmd += ["--autocast"] if autocast else []
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0 or not out.exists():
            return {"peers_error": (done.stderr or done.stdout).strip().splitlines()[-3:]}
        load = [round(load_before, 2), round(os.getloadavg()[0], 2)]
        return {f"peer_{name}": {**result, "load_avg_around_all_peers": load} for name, result in json.loads(out.read_text()).items()}


MODES = {"default": False, "malloc_keep": True}


def measure(acts_path: Path, steps: int, peers_python: str | None, modes: list[str], precision: str) -> dict:
    results: dict = {}
    me = [str(Path(__file__).resolve()), "--child"]

    def ours(widths: str, aux: str, keep: bool) -> dict:
        return run_child([*me, "ours", str(acts_path), widths, str(steps), aux, precision], keep)

    for mode in modes:
        keep = MODES[mode]
        r = {
            "matryoshka": ours(",".join(map(str, WIDTHS)), "0", keep),
            "matryoshka_aux": ours(",".join(map(str, WIDTHS)), "1", keep),
            "vanilla": ours(str(WIDTHS[-1]), "0", keep),
            "encoder_matmul_floor": run_child([*me, "floor", str(acts_path), "", str(steps), "0", precision], keep),
        }
        if precision == "float32":  # the plain dense baseline is a float32 program
            r["plain_dense_topk"] = run_child([*me, "dense", str(acts_path), "", str(steps), "0", precision], keep)
        for w in WIDTHS[:-1]:
            r[f"vanilla_{w}"] = ours(str(w), "0", keep)
        if peers_python:
            r.update(run_peers(peers_python, acts_path, steps, keep, autocast=precision == "bfloat16"))
        results[mode] = r
    return results


def ratios(mode: dict) -> dict:
    med = {k: v.get("median_s") for k, v in mode.items() if isinstance(v, dict)}
    out = {}
    if med.get("matryoshka") and med.get("vanilla"):
        out["a_matryoshka_over_vanilla"] = med["matryoshka"] / med["vanilla"]
        five = [med.get(f"vanilla_{w}") for w in WIDTHS[:-1]] + [med["vanilla"]]
        if all(five):
            out["b_five_vanillas_over_matryoshka"] = sum(five) / med["matryoshka"]
    if med.get("plain_dense_topk") and med.get("vanilla"):
        out["c_dense_topk_over_our_vanilla"] = med["plain_dense_topk"] / med["vanilla"]
    if med.get("encoder_matmul_floor") and med.get("matryoshka"):
        out["matryoshka_over_encoder_floor"] = med["matryoshka"] / med["encoder_matmul_floor"]
    for peer in ("saelens", "dictionary_learning"):
        if med.get(f"peer_{peer}") and med.get("matryoshka_aux"):
            out[f"d_{peer}_over_ours_with_aux"] = med[f"peer_{peer}"] / med["matryoshka_aux"]
        if med.get(f"peer_{peer}_noaux") and med.get("matryoshka"):
            out[f"d_{peer}_over_ours_no_aux"] = med[f"peer_{peer}_noaux"] / med["matryoshka"]
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        what, acts_path, widths, steps, aux, precision = sys.argv[2:8]
        if what == "ours":
            result = time_ours(acts_path, [int(w) for w in widths.split(",")], int(steps), aux == "1", precision)
        elif what == "floor":
            result = time_encoder_floor(acts_path, int(steps), precision)
        else:
            result = time_dense(acts_path, int(steps))
        print(json.dumps(result))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "step.json")
    parser.add_argument("--activations", type=Path, default=HERE / "results" / "bench_acts.safetensors")
    parser.add_argument("--peers-python", help="python of a venv with sae-lens / dictionary_learning (see peers.py)")
    parser.add_argument("--modes", default="default,malloc_keep", help="allocator modes to measure (comma-separated)")
    parser.add_argument("--precisions", help="encoder precisions to measure (comma-separated: float32, bfloat16); "
                                             "default float32, and bfloat16 where this CPU has bf16 matmul instructions")
    args = parser.parse_args()
    if not args.activations.exists():
        make_activations(args.activations)
    import torch

    from msae.lm import bf16_is_fast, cpu_description, precisions_to_measure

    fast = bf16_is_fast(torch.device("cpu"))
    precisions = precisions_to_measure(args.precisions, torch.device("cpu"))
    results = {p: measure(args.activations, args.steps, args.peers_python, args.modes.split(","), p) for p in precisions}
    report = {
        "setup": {"d_in": D_IN, "k": K, "batch": BATCH, "widths": WIDTHS, "steps": args.steps},
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "device": "cpu", "bf16_fast": fast, "cpu_description": cpu_description()},
        "results": results,
        "ratios": {p: {mode: ratios(r) for mode, r in by_mode.items()} for p, by_mode in results.items()},
    }
    if "float32" in results and "bfloat16" in results:
        report["ratios"]["bf16_speedup"] = {
            mode: {name: results["float32"][mode][name]["median_s"] / results["bfloat16"][mode][name]["median_s"]
                   for name in ("matryoshka", "matryoshka_aux", "vanilla", "encoder_matmul_floor")
                   if "median_s" in results["float32"][mode].get(name, {})
                   and "median_s" in results["bfloat16"][mode].get(name, {})}
            for mode in results["bfloat16"]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(args.out)
    print(json.dumps(report["ratios"], indent=2))


if __name__ == "__main__":
    main()
