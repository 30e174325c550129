"""`msae analyze`: one streaming pass over a run's activation cache, then the feature store, the hierarchy
across nested widths, splitting and matching against other runs, and absorption, all written beside the run
(RUN_DIR/features/) so the app only reads.

Layout of RUN_DIR/features/:
  manifest.json     what was analysed, sizes, timings, per-width L0, splitting and matching summaries
  latents.parquet   one row per latent (msae.analysis.features.latents_frame, plus hierarchy columns)
  examples.parquet  top activating examples and quantile samples: context, position, the latent's activations
                    on the ±window tokens around it
  contexts.parquet  the token ids of every context an example comes from
  links.parquet     parent–child candidates across nested groups (Matryoshka runs)
  vocab.json        every token id's text, to render examples
  against/NAME/     links.parquet (this run's latents -> NAME's, or NAME's -> this run's when NAME is narrower),
                    matching.parquet, summary.json
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch

from msae import io
from msae.activations import MANIFEST, ExtractConfig, cache_key, cache_path_for, extract, read_manifest
from msae.analysis import features, hierarchy, matching
from msae.analysis.stream import Sparse, stream
from msae.lm import LMLoadError, LoadedLM, load_lm
from msae.sae import SAE

STORE_DIR = "features"
STORE_FORMAT = 1


def split_thresholds(cfg: hierarchy.LinkConfig) -> tuple[float, ...]:
    """The decoder cosines the splitting share is reported at: the configured one with 0.3 and 0.7 beside it."""
    return tuple(sorted({0.3, 0.7, cfg.split_cosine}))


class AnalysisError(RuntimeError):
    """Why an analysis cannot run, in words for the user."""


@dataclass
class AnalyzeConfig:
    """What `msae analyze` does."""

    tokens: int | None = None
    """Cache rows to analyse (default: the whole cache)."""
    store: features.StoreConfig = field(default_factory=features.StoreConfig)
    links: hierarchy.LinkConfig = field(default_factory=hierarchy.LinkConfig)
    absorption: bool = True
    """Measure first-letter absorption on the model (needs the LM; a few minutes on a CPU)."""
    device: str = "cpu"
    """Device for the SAEs' encoders."""
    model: str | None = None
    """Override the model recorded in the run's cfg.json."""
    layer: int | None = None
    """Override the layer recorded in the run's cfg.json."""
    corpus: str | None = None
    """Override the corpus recorded in the run's cfg.json."""
    max_norm_factor: float | None = 2.0
    """Rows whose norm exceeds this multiple of the cache's median norm are analysed as silent (None: none are).
    Extraction drops rows past 10x the median; on the shipped SmolLM2 cache 99.99% of rows are under 1.43x, and the
    14 rows between 2x and 10x (runs of spaces, first tokens of contexts cut mid-document) were each the top example
    of 100 to 850 latents at once, crowding out what those latents stand for."""


def run_name(run_dir: Path) -> str:
    return Path(run_dir).resolve().name


def _extraction(cfg: dict, run_dir: Path) -> dict:
    return cfg.get("msae", {}).get("extraction") or {}


def extract_config(cfg: dict, run_dir: Path, acfg: AnalyzeConfig) -> ExtractConfig:
    """The extraction the run was trained on (cfg.json), with the user's overrides."""
    ext = _extraction(cfg, run_dir)
    model = acfg.model or ext.get("model")
    layer = acfg.layer if acfg.layer is not None else ext.get("layer")
    if model is None or layer is None:
        raise AnalysisError(f"{run_dir}: cfg.json does not record the model and layer it was trained on; "
                            f"pass --model and --layer")
    recorded = str(ext.get("corpus", "builtin"))
    if acfg.corpus:
        corpus = acfg.corpus
    elif recorded.startswith("builtin"):
        corpus = "builtin"
    else:  # "file:PATH:SIZE:MTIME"
        corpus = recorded[len("file:"):].rsplit(":", 2)[0] if recorded.startswith("file:") else recorded
    out = ExtractConfig(model=model, layer=int(layer), corpus=corpus)
    for name in ("ctx_len", "outlier_factor", "cache_dtype"):
        if name in ext:
            setattr(out, name, ext[name])
    out.tokens = acfg.tokens or ext.get("rows") or out.tokens
    return out


KEY_FIELDS = ("model", "layer", "ctx_len", "outlier_factor", "cache_dtype")


def find_cache(ecfg: ExtractConfig, recorded: str | None) -> Path | None:
    """The cache the run recorded if it is still there and holds the same extraction, else the one the
    extraction key points to (None when neither exists yet)."""
    key = cache_key(ecfg, ecfg.layer)
    candidates = [cache_path_for(key)]
    if recorded and ecfg.corpus == "builtin":
        candidates.insert(0, Path(recorded))
    for cand in candidates:
        if (cand / MANIFEST).exists():
            m = read_manifest(cand)
            same = all(m["key"].get(f) == key[f] for f in KEY_FIELDS)
            if same and (m["rows"] >= (ecfg.tokens or 0) or m["exhausted"]):
                return cand
    return None


def _load(run_dir: Path, device: str) -> tuple[SAE, dict]:
    try:
        sae, cfg = io.load_sae(run_dir, device=device, dtype=torch.float32)
    except io.SAELoadError as exc:
        raise AnalysisError(str(exc)) from None
    return sae.eval(), cfg


def _l0_per_width(sp: Sparse, widths: list[int]) -> list[float]:
    cols = sp.cols.long()
    return [float((cols < w).sum()) / max(sp.n_rows, 1) for w in widths]


def _write_dir(final: Path, fill: Callable[[Path], None]) -> None:
    """Build a directory beside `final` and swap it in, so a crash never leaves a half-written store."""
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    fill(tmp)
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def _narrow(frame: pd.DataFrame) -> pd.DataFrame:
    """int64 columns (and int64 array cells) as int32 where the values fit."""
    out = frame.copy()
    for name in out.columns:
        col = out[name]
        if pd.api.types.is_integer_dtype(col.dtype) and col.dtype.itemsize > 4:
            if len(col) == 0 or (col.min() >= -(2**31) and col.max() < 2**31):
                out[name] = col.astype("int32")
        elif col.dtype == object and len(col) and isinstance(col.iloc[0], np.ndarray) and col.iloc[0].dtype == np.int64:
            if all(len(a) == 0 or (a.min() >= -(2**31) and a.max() < 2**31) for a in col):
                out[name] = [a.astype(np.int32) for a in col]
    return out


def _parquet(frame: pd.DataFrame, path: Path) -> None:
    """A store table, ints narrowed, zstd level 19. Precision: every statistic, link score and each example's
    activation (`act`) in full; the per-token activations of an example's window (`acts`, for shading) and the
    promoted and suppressed logits (for display) come as float16 from features.py. So the shipped pair's two stores
    (8192 latents each) and the SAEs fit in the 60 MB that assets/ may hold."""
    _narrow(frame).to_parquet(path, index=False, compression="zstd", compression_level=19)


def analyze(
    run_dir: Path | str,
    against: Sequence[Path | str] = (),
    acfg: AnalyzeConfig | None = None,
    lm: LoadedLM | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict:
    """Analyse a run (and its relation to `against` runs); writes RUN_DIR/features and returns its manifest."""
    acfg = acfg or AnalyzeConfig()
    run_dir = Path(run_dir)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    sae, cfg = _load(run_dir, acfg.device)
    others = [(Path(p), *_load(Path(p), acfg.device)) for p in against]
    for path, other, _ in others:
        if other.d_in != sae.d_in:
            raise AnalysisError(f"{path} has d_in={other.d_in} but {run_dir} has d_in={sae.d_in}; they cannot "
                                f"read the same activations")
    ecfg = extract_config(cfg, run_dir, acfg)
    cache = find_cache(ecfg, _extraction(cfg, run_dir).get("cache"))
    if lm is None:
        try:
            lm = load_lm(ecfg.model, acfg.device)
        except LMLoadError as exc:
            raise AnalysisError(f"{run_dir} was trained on model {ecfg.model!r}, which cannot be loaded here: {exc}") from None
    try:
        io.check_fits(sae, lm.d_model, f"model {ecfg.model!r}")
    except io.SAELoadError as exc:
        raise AnalysisError(str(exc)) from None
    if cache is None:
        cache = extract(ecfg, lm=lm)
    timings["load"] = time.perf_counter() - t0

    def stage(name: str) -> Callable[[int, int], None] | None:
        return None if progress is None else (lambda done, total: progress(name, done, total))

    median_norm = read_manifest(cache).get("median_norm")
    max_norm = acfg.max_norm_factor * median_norm if acfg.max_norm_factor and median_norm else None
    try:
        result = stream([sae] + [o[1] for o in others], cache, top_n=acfg.store.top_n,
                        sample_n=acfg.store.quantiles * acfg.store.per_quantile, window=acfg.store.window,
                        max_rows=acfg.tokens, progress=stage("stream"), max_norm=max_norm)
    except ValueError as exc:
        raise AnalysisError(str(exc)) from None
    timings["stream"] = result.seconds
    if result.n_rows == 0:
        raise AnalysisError(f"{cache}: the activation cache holds no rows")

    t = time.perf_counter()
    sp = result.sparse[0]
    edges = features.histogram_edges(sp.vals, acfg.store.hist_bins)
    stats = features.latent_stats(sp, edges)
    vocab = features.vocab_strings(lm.tokenizer)
    latents = features.latents_frame(sae, stats, result.n_rows, result.top, acfg.store, vocab, features.unembedding(lm))
    examples = features.examples_frame(result, acfg.store)
    contexts = features.contexts_frame(result, examples["context"])
    timings["features"] = time.perf_counter() - t

    manifest = {
        "format": STORE_FORMAT,
        "run": run_name(run_dir),
        "model": ecfg.model,
        "layer": ecfg.layer,
        "cache": str(cache),
        "rows": result.n_rows,
        "max_norm": max_norm,
        "high_norm_rows_silenced": result.skipped_rows,
        "d_sae": sae.d_sae,
        "widths": sae.widths,
        "k": sae.k,
        "activation": sae.activation,
        "l0_per_width": _l0_per_width(sp, sae.widths),
        "dead_fraction": float((stats["count"] == 0).double().mean()),
        "hist_edges": edges.tolist(),
        "store": asdict(acfg.store),
        "link_config": asdict(acfg.links),
    }
    eval_path = run_dir / "eval.json"
    if eval_path.exists():
        manifest["heldout_eval"] = json.loads(eval_path.read_text())

    links = None
    if sae.n_groups > 1:
        t = time.perf_counter()
        links = hierarchy.nested_links(sp, sae.widths, stats, sae.W_dec, acfg.links)
        kids = hierarchy.children_per_parent(links, sae.d_sae)
        latents["children"] = kids["children"].to_numpy()
        latents["tree_children"] = kids["tree_children"].to_numpy()
        latents["coverage"] = hierarchy.coverage(sp, sp, links).numpy()
        tree = links[links["tree"]].set_index("child")
        latents["tree_parent"] = latents["latent"].map(tree["parent"]).fillna(-1).astype(int)
        latents["tree_score"] = latents["latent"].map(tree["score"])
        best = links.sort_values("score", ascending=False).drop_duplicates("child").set_index("child")
        latents["best_parent"] = latents["latent"].map(best["parent"]).fillna(-1).astype(int)
        latents["best_score"] = latents["latent"].map(best["score"])
        alive = stats["count"] > 0
        manifest["hierarchy"] = _hierarchy_summary(links, latents, sae.widths, alive)
        manifest["splitting"] = {
            f"prefix_{w}": hierarchy.split_share(sae.W_dec[:w], sae.W_dec, alive[:w], split_thresholds(acfg.links))
            for w in sae.widths[:-1]
        }
        timings["hierarchy"] = time.perf_counter() - t

    against_out = {}
    for i, (path, other, _ocfg) in enumerate(others, start=1):
        t = time.perf_counter()
        against_out[run_name(path)] = _against(sae, sp, stats, other, result.sparse[i], edges, acfg.links)
        timings[f"against {run_name(path)}"] = time.perf_counter() - t

    absorption = None
    if acfg.absorption:
        t = time.perf_counter()
        absorption = measure_absorption(run_dir, [p for p, *_ in others], lm, ecfg.layer)
        timings["absorption"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    manifest["timings_s"] = timings

    def fill(tmp: Path) -> None:
        _parquet(latents, tmp / "latents.parquet")
        _parquet(examples, tmp / "examples.parquet")
        _parquet(contexts, tmp / "contexts.parquet")
        if links is not None:
            _parquet(links, tmp / "links.parquet")
        (tmp / "vocab.json").write_text(json.dumps(vocab))
        for name, (frames, summary) in against_out.items():
            sub = tmp / "against" / name
            sub.mkdir(parents=True)
            for fname, frame in frames.items():
                _parquet(frame, sub / f"{fname}.parquet")
            (sub / "summary.json").write_text(json.dumps(summary, indent=1))
        manifest["against"] = {name: summary for name, (_f, summary) in against_out.items()}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))

    _write_dir(run_dir / STORE_DIR, fill)
    return manifest


def _hierarchy_summary(links: pd.DataFrame, latents: pd.DataFrame, widths: list[int], alive: torch.Tensor) -> dict:
    """Links per level and how much of the parents' firing their children cover."""
    linked = links[links["linked"]]
    per_level = []
    for g in range(1, len(widths)):
        kids = latents[(latents["group"] == g) & alive.numpy()]
        lg = linked[linked["child_group"] == g]
        per_level.append({
            "group": g,
            "width": widths[g],
            "live_latents": int(len(kids)),
            "links": int(len(lg)),
            "children_with_a_parent": int(lg["child"].nunique()),
            "share_with_a_parent": float(lg["child"].nunique() / len(kids)) if len(kids) else None,
        })
    parents = latents[latents.get("children", 0) > 0]
    return {
        "links": int(len(linked)),
        "per_level": per_level,
        "parents_with_children": int(len(parents)),
        "parents_with_2plus_children": int((latents.get("children", 0) >= 2).sum()),
        "mean_children_per_parent": float(parents["children"].mean()) if len(parents) else None,
        "mean_coverage": float(parents["coverage"].mean()) if len(parents) else None,
    }


def _against(sae: SAE, sp: Sparse, stats: dict, other: SAE, osp: Sparse, edges, cfg: hierarchy.LinkConfig):
    """Links from the narrower SAE to the wider one over the same rows, the splitting share, and matching."""
    ostats = features.latent_stats(osp, edges)
    this_narrow = sae.d_sae <= other.d_sae
    n_sae, n_sp, n_stats, w_sae, w_sp, w_stats = (
        (sae, sp, stats, other, osp, ostats) if this_narrow else (other, osp, ostats, sae, sp, stats))
    links = hierarchy.cross_links(n_sp, w_sp, n_stats, w_stats, n_sae.W_dec, w_sae.W_dec, cfg)
    kids = hierarchy.children_per_parent(links, n_sae.d_sae)
    alive_n = n_stats["count"] > 0
    cover = hierarchy.coverage(n_sp, w_sp, links)
    pairs = matching.match(sae.W_dec, other.W_dec)
    groups = sae.group_of(torch.arange(sae.d_sae)).cpu() if sae.n_groups > 1 else None
    summary = {
        "narrow": "this" if this_narrow else "other",
        "this_d_sae": sae.d_sae,
        "other_d_sae": other.d_sae,
        "other_widths": other.widths,
        "split_share_decoder": hierarchy.split_share(n_sae.W_dec, w_sae.W_dec, alive_n, split_thresholds(cfg)),
        "split_share_links": float(((kids["children"].to_numpy() >= 2) & alive_n.numpy()).sum() / max(int(alive_n.sum()), 1)),
        "mean_coverage": float(torch.nanmean(cover[kids["children"].to_numpy() > 0])) if (kids["children"] > 0).any() else None,
        "links": int(links["linked"].sum()),
        "matching": matching.matching_summary(pairs, sae.d_sae, other.d_sae, groups_b=None,
                                              alive_a=stats["count"] > 0, alive_b=ostats["count"] > 0),
        "other_dead_fraction": float((ostats["count"] == 0).double().mean()),
    }
    if groups is not None:
        g = groups[torch.tensor(pairs["a"].to_numpy(), dtype=torch.long)]
        size = torch.bincount(groups, minlength=sae.n_groups)
        summary["matching"]["this_matched_per_group"] = torch.bincount(g, minlength=sae.n_groups).tolist()
        summary["matching"]["this_matched_share_per_group"] = (
            torch.bincount(g, minlength=sae.n_groups).double() / size.clamp_min(1)).tolist()
        pairs["a_group"] = g.numpy()
    kids["coverage"] = cover.numpy()
    return {"links": links, "matching": pairs, "parents": kids}, summary


def measure_absorption(run_dir: Path, others: Sequence[Path] = (), lm: LoadedLM | None = None,
                       layer: int | None = None) -> dict:
    """First-letter absorption of the run and `others` from one set of probes; written to RUN_DIR/absorption.json."""
    from msae.analysis import absorption

    runs = {run_name(run_dir): Path(run_dir), **{run_name(p): Path(p) for p in others}}
    try:
        result = absorption.measure(runs, lm=lm, layer=layer)
    except (absorption.AbsorptionError, io.SAELoadError) as exc:
        raise AnalysisError(str(exc)) from None
    absorption.write(result, run_dir)
    return result


@dataclass
class FeatureStore:
    """A run's analysis as the app reads it. `examples` carries `tokens` (the ids of each window) and `center`
    (the example token's index in it), rebuilt from the contexts table on loading."""

    run_dir: Path
    manifest: dict
    latents: pd.DataFrame
    examples: pd.DataFrame
    contexts: pd.DataFrame
    links: pd.DataFrame | None
    vocab: list[str]
    against: dict[str, dict]

    def examples_of(self, latent: int, kind: str = "top") -> pd.DataFrame:
        ex = self.examples
        return ex[(ex["latent"] == latent) & (ex["kind"] == kind)].sort_values(["rank", "act"], ascending=[True, False])

    def window_text(self, tokens) -> str:
        return "".join(self.vocab[int(t)] for t in tokens if t >= 0)

    @cached_property
    def example_texts(self) -> pd.Series:
        """The text of every example's window (for searching the contexts)."""
        return self.examples["tokens"].map(self.window_text)

    def parents_of(self, latent: int, linked_only: bool = True) -> pd.DataFrame:
        if self.links is None:
            return pd.DataFrame()
        l = self.links[self.links["child"] == latent]
        return (l[l["linked"]] if linked_only else l).sort_values("score", ascending=False)

    def children_of(self, latent: int, linked_only: bool = True) -> pd.DataFrame:
        if self.links is None:
            return pd.DataFrame()
        l = self.links[self.links["parent"] == latent]
        return (l[l["linked"]] if linked_only else l).sort_values("score", ascending=False)


class StoreError(RuntimeError):
    """A feature store that is missing or unreadable."""


def load_store(run_dir: Path | str) -> FeatureStore:
    run_dir = Path(run_dir)
    root = run_dir / STORE_DIR
    if not (root / "manifest.json").exists():
        raise StoreError(f"{run_dir} has not been analysed yet (no {STORE_DIR}/manifest.json): run "
                         f"`msae analyze {run_dir}`")
    try:
        manifest = json.loads((root / "manifest.json").read_text())
        if manifest.get("format") != STORE_FORMAT:
            raise StoreError(f"{root}: store format {manifest.get('format')} is not {STORE_FORMAT}; run "
                             f"`msae analyze {run_dir}` again")
        latents = pd.read_parquet(root / "latents.parquet")
        examples = pd.read_parquet(root / "examples.parquet")
        contexts = pd.read_parquet(root / "contexts.parquet")
        window = int(manifest["store"]["window"])
        examples["tokens"] = list(features.example_windows(examples, contexts, window))
        examples["center"] = window
        links = pd.read_parquet(root / "links.parquet") if (root / "links.parquet").exists() else None
        vocab = json.loads((root / "vocab.json").read_text())
        against = {}
        for sub in sorted((root / "against").glob("*")) if (root / "against").exists() else []:
            against[sub.name] = {"summary": json.loads((sub / "summary.json").read_text()),
                                 **{p.stem: pd.read_parquet(p) for p in sub.glob("*.parquet")}}
    except (OSError, ValueError, KeyError) as exc:
        raise StoreError(f"{root}: the feature store cannot be read ({type(exc).__name__}: {exc}); run "
                         f"`msae analyze {run_dir}` again") from None
    return FeatureStore(run_dir, manifest, latents, examples, contexts, links, vocab, against)
