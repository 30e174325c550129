"""benchmarks/bench_quality.py's measurements on a tiny SAE trained on a tiny real cache (SmolLM2, layer 2):
θ against BatchTopK, fresh-text FVU against a direct computation, and a whole run's figures."""

import json
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from msae.activations import CachedActivations, extract, extraction_info, read_manifest
from msae.config import ExtractConfig, TrainConfig
from msae.lm import residual_after
from msae.results import RunInfo
from msae.run import Run
from msae.train import Trainer, calibrate_threshold

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench_quality as bench  # noqa: E402  (a script, not part of the package)

LAYER, CTX_LEN, BATCH = 2, 16, 64


@pytest.fixture(scope="module")
def trained(lm, tmp_path_factory):
    """(cache, run dir) of a Matryoshka SAE trained 40 steps on ~900 rows of the fresh prose."""
    root = tmp_path_factory.mktemp("bench_quality")
    ecfg = ExtractConfig(corpus=str(bench.FRESH_TEXT), tokens=900, ctx_len=CTX_LEN, lm_batch=8, shard_rows=300,
                         layer=LAYER)
    cache = extract(ecfg, lm=lm, root=root / "cache")
    cfg = TrainConfig(widths=(16, 64), k=4, steps=40, batch_size=BATCH, lr=3e-3, checkpoint_every=40,
                      threshold_batches=4, device="cpu")
    source = CachedActivations(cache)
    Trainer(cfg, source, root / "run", run_info=RunInfo(extraction=extraction_info(cache, ecfg))).train()
    return cache, root / "run"


@pytest.fixture
def short_text(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("The kettle clicked off while the cat watched the rain run down the kitchen window.\n\n"
                    "Glaciers grind rock into flour so fine that the rivers below them turn milky blue in summer, "
                    "and the silt settles into layered clay at the bottom of the lakes.\n")
    return path


def test_theta_l0_matches_batchtopk_where_theta_was_calibrated(trained):
    """θ is calibrated in float32 (a figure of the run), so float32 inference keeps exactly BatchTopK's count; bf16
    inference rounds pre-activations into bins of 2^-8 of their size and keeps within the bin at θ (under 1%)."""
    cache, run_dir = trained
    sae = Run(run_dir).load_sae(precision="float32")
    batches = bench.held_in_batches(cache, n=4, batch_size=BATCH)

    own = bench.theta_vs_batchtopk(sae, batches)
    assert own["l0_batchtopk"] == sae.k and own["rows"] == 4 * BATCH
    assert abs(own["ratio"] - 1) < 0.25, "θ calibrated on the stream's next batches is close on other held-in rows"

    calibrate_threshold(sae, batches, sae.k)  # the raw-scale SAE: θ set on these very rows
    exact = bench.theta_vs_batchtopk(sae, batches)
    assert exact["ratio"] == pytest.approx(1.0) and exact["within_5pct"]
    sae.compute_dtype = torch.bfloat16
    in_bf16 = bench.theta_vs_batchtopk(sae, batches)["ratio"]
    assert abs(in_bf16 - 1) < 0.01 and in_bf16 != 1.0, in_bf16
    sae.compute_dtype = torch.float32

    with torch.no_grad():
        sae.threshold.mul_(2)
    assert bench.theta_vs_batchtopk(sae, batches)["ratio"] < 0.95, "a θ too high keeps fewer than BatchTopK"


def test_text_fvu_equals_a_direct_computation(lm, trained, short_text):
    cache, run_dir = trained
    sae = Run(run_dir).load_sae()
    median = read_manifest(cache).median_norm
    factor = 1.1  # tight, so that the norm filter drops some rows and is checked too
    text = bench.text_rows(lm, short_text, LAYER, median, factor, ctx_len=CTX_LEN)
    got = bench.text_quality(sae, text)

    rows, outliers = [], 0
    for paragraph in short_text.read_text().split("\n\n"):
        ids = lm.tokenizer(paragraph.strip(), add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids), CTX_LEN):
            chunk = torch.tensor([ids[start : start + CTX_LEN]])
            resid = residual_after(lm, chunk, torch.ones_like(chunk), LAYER)[0, 1:].float()  # one context, no padding
            ok = resid.norm(dim=1) <= factor * median
            rows.append(resid[ok])
            outliers += int((~ok).sum())
    x = torch.cat(rows).double()
    sae.eval()
    recon = sae.decode(sae.encode(x.float())).double()
    fvu = ((recon - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()

    assert 0 < outliers < len(x) + outliers
    assert text.dropped["outlier"] == outliers and got["rows"] == len(x)
    assert got["fvu"] == pytest.approx(fvu.item(), rel=1e-4)
    assert got["l0"] == pytest.approx((sae.encode(x.float()) > 0).sum().item() / len(x))


def test_measure_reports_every_figure_and_target(lm, trained):
    cache, run_dir = trained
    fresh = bench.fresh_rows_for(lm, cache, LAYER)
    result = bench.measure(run_dir, cache, fresh, bench.held_in_batches(cache, n=2, batch_size=BATCH))

    assert result["widths"] == [16, 64] and len(result["heldout"]["fvu"]) == 2
    assert [p["part"] for p in result["heldout"]["parts"]] == read_manifest(cache).parts
    assert sum(result["groups"]["l0_share"]) == pytest.approx(1.0)
    assert result["fresh_text"]["fvu"] == pytest.approx(bench.text_quality(Run(run_dir).load_sae(), fresh)["fvu"])
    # Each target is the verdict its name states on the figures reported beside it (a two-width SAE with θ: all apply).
    parts = [p["fvu"] for p in result["heldout"]["parts"]] or [result["heldout"]["fvu"][-1]]
    assert result["targets"] == {
        "heldout_fvu_every_part_le_0.20": max(parts) <= 0.20,
        "fresh_fvu_le_0.25": result["fresh_text"]["fvu"] <= 0.25,
        "inference_l0_le_k": result["heldout"]["l0"] <= result["k"],
        "theta_l0_within_5pct_of_batchtopk": abs(result["held_in_theta"]["ratio"] - 1) <= 0.05,
        "no_group_over_40pct_of_l0": max(result["groups"]["l0_share"]) <= 0.40,
        "last_group_alive_ge_80pct": result["groups"]["alive_per_100k"][-1] >= 0.80,
    }
    assert result["groups"]["store_alive_per_100k"] is None, "the run has no feature store"
    assert "θ/BTK" in bench.table({"tiny": result})
    # BatchTopK at k on the same rows: L0 exactly k (every row keeps some positive pre-activation here), and the
    # nested FVUs in their usual order.
    at_k = result["batchtopk_at_k"]
    assert at_k["heldout_l0"] == pytest.approx(result["k"]) and at_k["fresh_l0"] <= result["k"] + 1e-9
    assert at_k["heldout_fvu"][0] >= at_k["heldout_fvu"][-1] > 0


def test_store_alive_counts_latents_at_a_rate_of_one_per_100k_per_group(tmp_path):
    run = Run(tmp_path / "run")
    assert bench.store_alive(run, 2) is None, "no store, no figure"
    run.store_dir.mkdir(parents=True)
    pd.DataFrame({"group": [0, 0, 1, 1, 1], "freq": [0.0, 2e-5, 1e-6, 1e-5, 0.3]}).to_parquet(
        run.store_dir / "latents.parquet")
    (run.store_dir / "manifest.json").write_text(json.dumps({"rows": 1_500_000}))
    got = bench.store_alive(run, 2)
    assert got["rows"] == 1_500_000
    assert got["alive_per_100k"] == [pytest.approx(0.5), pytest.approx(2 / 3)]
