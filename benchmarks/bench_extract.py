"""Extraction speed: `msae extract` against a plain torch forward of the same layers, per precision; writes a JSON.

    python benchmarks/bench_extract.py [--tokens 60000] [--busy] [--out benchmarks/results/extract.json]

For float32 and bfloat16 alike, on the built-in SmolLM2 at layer 15:
  plain   transformers' forward of the model stopped after block 15 (a forward hook that raises), batches of 16
          contexts of 128 tokens from the built-in corpus, counted in real (unpadded) tokens per second;
  msae    `msae extract` (msae.activations.extract) of the same number of rows into an empty cache: reading and
          tokenising the corpus, the forward, the filters and the shard writes, in kept rows per second.
Targets: msae bfloat16 >= 3x the float32 figure of the issue (1,707 rows/s quiet) and within 1.2x of the plain
bfloat16 forward. `--busy` runs everything again with a second process spinning on one of the cores (the load
another user's work puts on a shared machine). Each figure is one timed pass after a warm-up pass.
bfloat16 is measured only where this CPU has bf16 matmul instructions (msae.lm.bf16_is_fast; --precisions to force
it): without them torch's bf16 matmuls run hundreds of times slower than float32, and the JSON says it was skipped.
The CPU is recorded (msae.lm.cpu_description): figures from one CPU say little about another.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import tempfile
import time
from itertools import islice
from pathlib import Path

import torch

from msae import corpus
from msae.activations import extract, pad_batch, read_manifest
from msae.config import ExtractConfig
from msae.lm import bf16_is_fast, cpu_description, precisions_to_measure, load_lm, residual_after

HERE = Path(__file__).resolve().parent
LAYER, CTX, BATCH = 15, 128, 16
BASELINE_FP32_ROWS_S = 1707.0
"""`msae extract` in float32 on a quiet machine before bf16 (the issue's measurement)."""


def plain_forward(lm, n_tokens: int) -> dict:
    """Tokens per second of the model's own forward to block LAYER on built-in-corpus batches."""
    want = n_tokens // (CTX - 1) + 1
    ctxs = [t for t, _ in islice(corpus.contexts(corpus.builtin_documents(), lm.tokenizer, CTX), want)]
    pad = lm.tokenizer.pad_token_id or 0
    batches = [pad_batch(ctxs[i : i + BATCH], CTX, pad) for i in range(0, len(ctxs), BATCH)]
    tokens = sum(int(m.sum()) for _, m in batches)
    for ids, mask in batches[:2]:  # warm-up
        residual_after(lm, ids, mask, LAYER)
    start = time.perf_counter()
    for ids, mask in batches:
        residual_after(lm, ids, mask, LAYER)
    seconds = time.perf_counter() - start
    return {"tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1)}


def msae_extract(lm, precision: str, n_tokens: int) -> dict:
    """Kept rows per second of a whole extraction into an empty cache."""
    with tempfile.TemporaryDirectory() as root:
        cfg = ExtractConfig(corpus="builtin", layer=LAYER, tokens=n_tokens, precision=precision, device="cpu",
                            lm_batch=BATCH, ctx_len=CTX)
        extract(ExtractConfig(**{**cfg.to_json(), "tokens": 2000}), lm=lm, root=Path(root) / "warm")
        start = time.perf_counter()
        cache = extract(cfg, lm=lm, root=Path(root) / "timed")
        seconds = time.perf_counter() - start
        rows = read_manifest(cache).rows
    return {"rows": rows, "seconds": round(seconds, 3), "rows_per_s": round(rows / seconds, 1)}


def _spin(stop) -> None:
    x = 0
    while not stop.is_set():
        x = (x * 31 + 7) % 1_000_003


def measure(n_tokens: int, precisions: list[str]) -> dict:
    out = {}
    for precision in precisions:
        lm = load_lm("smollm2-135m", "cpu", precision=precision)
        plain = plain_forward(lm, n_tokens)
        ours = msae_extract(lm, precision, n_tokens)
        out[precision] = {"plain_forward": plain, "msae_extract": ours,
                          "msae_rows_per_plain_token": round(ours["rows_per_s"] / plain["tokens_per_s"], 3)}
    if "float32" in out:
        out["float32"]["over_the_issue_baseline"] = round(
            out["float32"]["msae_extract"]["rows_per_s"] / BASELINE_FP32_ROWS_S, 2)
    if "bfloat16" not in out:
        out["targets"] = {"not measured": "bfloat16 was not run on this CPU (no bf16 matmul instructions)"}
        return out
    bf16 = out["bfloat16"]["msae_extract"]["rows_per_s"]
    if "float32" in out:
        out["bf16_over_fp32_now"] = round(bf16 / out["float32"]["msae_extract"]["rows_per_s"], 2)
    out["bf16_over_fp32_before"] = round(bf16 / BASELINE_FP32_ROWS_S, 2)
    out["targets"] = {"bf16 >= 3x the float32 baseline": out["bf16_over_fp32_before"] >= 3.0,
                      "within 1.2x of the plain bf16 forward": out["bfloat16"]["msae_rows_per_plain_token"] >= 1 / 1.2}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=60_000)
    parser.add_argument("--busy", action="store_true", help="also measure with a second process spinning on a core")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "extract.json")
    parser.add_argument("--precisions", help="comma-separated; default float32, and bfloat16 where this CPU has bf16 "
                                             "matmul instructions")
    args = parser.parse_args()
    fast = bf16_is_fast(torch.device("cpu"))
    precisions = precisions_to_measure(args.precisions, torch.device("cpu"))
    result = {"machine": platform.processor() or platform.machine(), "cpu": cpu_description(),
              "torch": torch.__version__, "threads": torch.get_num_threads(), "precisions": precisions,
              "bf16_fast_here": fast, "tokens": args.tokens, "load_before": os.getloadavg()[0],
              "quiet": measure(args.tokens, precisions)}
    if args.busy:
        stop = multiprocessing.Event()
        spinner = multiprocessing.Process(target=_spin, args=(stop,))
        spinner.start()
        try:
            result["busy"] = measure(args.tokens, precisions)
        finally:
            stop.set()
            spinner.join()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
