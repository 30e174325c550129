"""Speed of the language-model side of msae; writes a JSON.

    python benchmarks/bench_pipeline.py [--out benchmarks/results/pipeline.json]

(a) activation extraction tokens/s with early exit at the default layer against a full forward with
    output_hidden_states, on the same built-in-corpus batches               target >= 2.5x
(b) end-to-end `msae train` tokens/s with a warm activation cache (both SAEs of the shipped configuration)
(c) one run producing a Matryoshka SAE (one extraction, one training) against five vanilla runs of the nested
    widths, each extracting its own activations, all run for real on the same token budget  target >= 4x
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from itertools import islice
from pathlib import Path

import torch

from msae import corpus
from msae.activations import CachedActivations, extract, pad_batch
from msae.config import ExtractConfig
from msae.lm import load_lm, residual_after
from msae.config import TrainConfig
from msae.train import Trainer

HERE = Path(__file__).resolve().parent
WIDTHS = (128, 512, 2048, 8192)
"""The shipped default run's nested widths."""
FIVE_WIDTHS = (512, 1024, 2048, 4096, 8192)
"""Five nested widths for the one-run-against-five comparison."""


def bench_extraction(lm, n_contexts: int, batch: int = 16) -> dict:
    ctxs = [t for t, _ in islice(corpus.contexts(corpus.builtin_documents(), lm.tokenizer, 128), n_contexts)]
    batches = [pad_batch(ctxs[i : i + batch], 128, lm.tokenizer.pad_token_id or 0) for i in range(0, len(ctxs), batch)]
    tokens = sum(int(m.sum()) for _, m in batches)
    layer = lm.default_layer

    def early():
        for ids, mask in batches:
            residual_after(lm, ids, mask, layer)

    def full():
        with torch.no_grad():
            for ids, mask in batches:
                lm.model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False).hidden_states[layer + 1]

    times = {}
    for name, fn in (("early_exit", early), ("full_forward", full)):
        fn()  # warm-up
        start = time.perf_counter()
        fn()
        times[name] = time.perf_counter() - start
    return {
        "layer": layer,
        "tokens": tokens,
        "early_exit_tok_s": tokens / times["early_exit"],
        "full_forward_tok_s": tokens / times["full_forward"],
        "speedup": times["full_forward"] / times["early_exit"],
    }


def bench_train_warm(cache: Path, steps: int) -> dict:
    source = CachedActivations(cache)
    cfg = TrainConfig(widths=WIDTHS, k=32, also_vanilla=True, steps=steps, batch_size=4096, log_every=steps,
                      checkpoint_every=10 * steps)
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        Trainer(cfg, source, Path(out)).train()
        elapsed = time.perf_counter() - start
    return {"steps": steps, "batch": 4096, "saes": 2, "seconds": elapsed, "tok_s": steps * 4096 / elapsed}


def one_run(lm, tokens: int, widths: tuple[int, ...], arch: str, steps: int, root: Path) -> float:
    """Seconds for a complete run from text: extraction into a fresh cache, then training."""
    start = time.perf_counter()
    cache = extract(ExtractConfig(tokens=tokens, shard_rows=tokens), lm=lm, root=root)
    cfg = TrainConfig(arch=arch, widths=widths, k=32, steps=steps, batch_size=2048, log_every=steps,
                      checkpoint_every=10 * steps)
    Trainer(cfg, CachedActivations(cache), root / "run").train()
    return time.perf_counter() - start


def bench_one_vs_five(lm, tokens: int, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        matryoshka = one_run(lm, tokens, FIVE_WIDTHS, "matryoshka", steps, Path(tmp) / "m")
        vanillas = {w: one_run(lm, tokens, (w,), "vanilla", steps, Path(tmp) / f"v{w}") for w in FIVE_WIDTHS}
    return {
        "tokens": tokens,
        "steps": steps,
        "matryoshka_run_s": matryoshka,
        "vanilla_runs_s": vanillas,
        "widths": FIVE_WIDTHS,
        "five_over_one": sum(vanillas.values()) / matryoshka,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "pipeline.json")
    parser.add_argument("--contexts", type=int, default=96)
    parser.add_argument("--train-steps", type=int, default=30)
    parser.add_argument("--run-tokens", type=int, default=40_000)
    args = parser.parse_args()
    lm = load_lm("smollm2-135m", "cpu")
    report = {"threads": torch.get_num_threads(), "extraction": bench_extraction(lm, args.contexts)}
    cache = extract(ExtractConfig(tokens=300_000), lm=lm)
    report["train_warm_cache"] = bench_train_warm(cache, args.train_steps)
    report["one_vs_separate_runs"] = bench_one_vs_five(lm, args.run_tokens, args.train_steps)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(args.out)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
