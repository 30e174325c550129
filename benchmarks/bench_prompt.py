"""How long a prompt's features take once the app is warm (the target: a 128-token prompt in under 1 s on the CPU);
writes a JSON.

    python benchmarks/bench_prompt.py [--runs assets/default/matryoshka,assets/default/vanilla] [--repeats 10]
        [--threads 1,2] [--out benchmarks/results/prompt.json]

The LM and the SAEs are loaded once (as the app's st.cache_resource does); each timing is one call of
msae.analysis.inference.text_latents on the same 128-token text (the LM to the SAE's layer with early exit, then
every SAE), median of --repeats after two warm-up calls, at each torch thread count.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from msae.analysis.inference import text_latents
from msae.io import load_sae
from msae.lm import load_lm

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TEXT = ("The history of the city begins in the Roman period, when a small fort was built beside the river crossing. "
        "Over the following centuries the settlement grew into a market town, and by the twelfth century it had a "
        "cathedral, a castle and a charter granting its merchants the right to hold an annual fair. ") * 4


def prompt_of(tokenizer, n_tokens: int) -> str:
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"][:n_tokens]
    return tokenizer.decode(ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="assets/default/matryoshka,assets/default/vanilla")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "prompt.json")
    args = parser.parse_args()

    runs = [ROOT / r if not Path(r).is_absolute() else Path(r) for r in args.runs.split(",")]
    saes = []
    for run in runs:
        sae, cfg = load_sae(run, dtype=torch.float32)
        saes.append(sae.eval())
    layer = int(cfg["msae"]["extraction"]["layer"])
    t0 = time.perf_counter()
    lm = load_lm()
    load_s = time.perf_counter() - t0
    text = prompt_of(lm.tokenizer, args.tokens)
    n_tokens = len(lm.tokenizer(text, add_special_tokens=False)["input_ids"])
    results = {}
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        for _ in range(2):
            text_latents(lm, saes, layer, text)
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            text_latents(lm, saes, layer, text)
            times.append(time.perf_counter() - start)
        results[f"threads_{threads}"] = {"median_s": statistics.median(times), "times_s": times}
    report = {
        "what": f"text_latents on a {n_tokens}-token prompt through {len(saes)} SAEs (layer {layer}), warm",
        "runs": [str(r.relative_to(ROOT)) if r.is_relative_to(ROOT) else str(r) for r in runs],
        "lm_load_s": load_s,
        "results": results,
        "load_avg_after": os.getloadavg(),
        "machine": {"cpus": len(os.sched_getaffinity(0)), "platform": platform.platform(), "torch": torch.__version__},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: v["median_s"] for k, v in results.items()}, indent=1))


if __name__ == "__main__":
    main()
