"""Re-saves the shipped runs (assets/default/) with unit decoder rows, and puts their stores on the new scale.

The runs were saved with the activation scale folded into W_dec (every row 1/act_scale = 173.5 long), which SAEBench
refuses. msae.io.save_sae now folds the rows' norm into the encoder instead: each latent becomes 173.5 times
itself and every reconstruction stays the same. Analysing the runs again would take about an hour here, so their
stored figures are rescaled by the same factor instead, exactly: a latent's activations, mean, max and histogram
edges times the factor, its promoted and suppressed logits (W_dec · W_U) divided by it, the gallery's activations
times their run's factor; counts, frequencies, links, cosines and absorption (probes on standardised latents) do not
depend on the scale. Run once, from the repository root (new runs are saved this way from the start):

    .venv/bin/python assets/unit_decoders.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from msae import io
from msae.run import STORE_DIR

DEFAULT = Path(__file__).resolve().parent / "default"
RUNS = ("matryoshka", "vanilla", "vanilla-2576")


def fold_factor(run: Path) -> float:
    """The one factor save_sae folds into a BatchTopK run's latents (its rows' mean norm), checked to be every row's."""
    sae, _ = io.load_sae(run)
    eps = torch.finfo(sae.W_dec.dtype).eps
    factors = io.decoder_fold_factors(sae.W_dec, sae.activation, eps)
    norms = sae.W_dec.detach().double().norm(dim=1)
    assert float((norms / factors - 1).abs().max()) < 1e-3, f"{run}: rows of different norms"
    return float(factors[0])


def _scaled(table: pa.Table, column: str, factor: float) -> pa.Table:
    """`table` with `column` (numbers, or lists of numbers) multiplied by `factor`, in its own type."""
    col = table[column]
    if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
        chunks = []
        for chunk in col.chunks:
            values = pc.multiply(pc.cast(chunk.values, pa.float64()), factor).cast(chunk.type.value_type)
            chunks.append(type(chunk).from_arrays(chunk.offsets, values, mask=chunk.is_null() if chunk.null_count else None))
        new = pa.chunked_array(chunks, col.type)
    else:
        new = pc.multiply(pc.cast(col, pa.float64()), factor).cast(col.type)
    return table.set_column(table.schema.get_field_index(column), column, new)


def _rewrite_parquet(path: Path, scale: dict[str, float]) -> None:
    table = pq.read_table(path)
    for column, factor in scale.items():
        if column in table.column_names:
            table = _scaled(table, column, factor)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    io.atomic_write_bytes(path, sink.getvalue().to_pybytes())


def rescale_store(run: Path, factor: float) -> None:
    store = run / STORE_DIR
    _rewrite_parquet(store / "latents.parquet", {"mean_act": factor, "max_act": factor,
                                                 "promoted_logits": 1 / factor, "suppressed_logits": 1 / factor})
    _rewrite_parquet(store / "examples.parquet", {"act": factor, "acts": factor})
    manifest = json.loads((store / "manifest.json").read_text())
    manifest["hist_edges"] = [edge * factor for edge in manifest["hist_edges"]]
    io.atomic_write_text(store / "manifest.json", json.dumps(manifest, indent=2) + "\n")


def rescale_gallery(path: Path, factors: dict[str, float]) -> None:
    """The gallery's heatmap and examples hold activations of several runs, one column each."""
    gallery = json.loads(path.read_text())
    for case in gallery["cases"]:
        column_factor = [factors[name] for name in case["column_runs"]]
        case["heatmap"] = [[v * f for v, f in zip(row, column_factor)] for row in case["heatmap"]]
        for example in case["examples"]:
            example["acts"] = [v * f for v, f in zip(example["acts"], column_factor)]
    io.atomic_write_text(path, json.dumps(gallery, indent=2) + "\n")


def main() -> None:
    factors = {name: fold_factor(DEFAULT / name) for name in RUNS}
    for name, factor in factors.items():
        run = DEFAULT / name
        sae, cfg = io.load_sae(run)
        io.save_sae(sae, run, cfg={key: value for key, value in cfg.items() if key.startswith("msae")}, dtype=sae.W_dec.dtype)
        rescale_store(run, factor)
        print(f"{name}: latents x {factor:.6g}; rows now {io.load_sae(run)[0].W_dec.double().norm(dim=1).sub(1).abs().max():.2g} from unit")
    rescale_gallery(DEFAULT / "matryoshka" / "gallery.json", factors)


if __name__ == "__main__":
    main()
