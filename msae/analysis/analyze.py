"""`msae analyze`: one streaming pass over a run's activation cache, then the feature store, the hierarchy
across nested widths, splitting and matching against other runs, and absorption, all written beside the run
(msae.analysis.store for the store's layout) so the app only reads."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd
import torch

from msae import io
from msae.activations import (ExtractionEstimate, cache_key, cache_path_for, cache_root, check_corpus,
                              estimate_extraction, extract, has_manifest, lm_dtype_name, read_manifest)
from msae.analysis import features, hierarchy, matching, validate
from msae.analysis.store import (STORE_FORMAT, Against, FeatureStore, StoreError, load_store, store_kind,
                                 write_links_only, write_store)
from msae.analysis.stream import Sparse, add_class_sums, encode_rows, stream
from msae.config import (AbsorptionConfig, AnalyzeConfig, ExtractConfig, GalleryConfig, LinkConfig,
                         TaxonomyBenchConfig)
from msae.corpus import CorpusError
from msae.lm import LMLoadError, LoadedLM, check_before_load, is_identity, load_lm, model_identity
from msae.results import (AbsorptionResult, ActivationsAnalysis, AgainstSummary, ExtractionInfo, Gallery,
                          TaxonomyBench, HierarchySummary, InputFile, GroupSummary, StoreManifest)
from msae.run import Run, RunError, locked
from msae.sae import SAE


def split_thresholds(cfg: LinkConfig) -> tuple[float, ...]:
    """The decoder cosines the splitting share is reported at: the configured one with 0.3 and 0.7 beside it."""
    return tuple(sorted({0.3, 0.7, cfg.split_cosine}))


class AnalysisError(RuntimeError):
    """Why an analysis cannot run, in words for the user."""


def extract_config(run: Run, acfg: AnalyzeConfig, how: str = "pass --model and --layer") -> ExtractConfig:
    """The extraction the run was trained on (its cfg.json), with the user's overrides; `how` tells the user how
    to name the model and layer where cfg.json does not."""
    ext = run.info().extraction or ExtractionInfo()
    model, layer = run.source()
    model = acfg.model or model
    layer = acfg.layer if acfg.layer is not None else layer
    if model is None or layer is None:
        raise AnalysisError(f"{run.path}: cfg.json does not record the model and layer it was trained on; {how}")
    corpus, _why = corpus_choice(run, acfg)
    out = ExtractConfig(model=model, layer=int(layer), corpus=corpus, device=acfg.device, precision=acfg.precision)
    for name in ("ctx_len", "outlier_factor", "cache_dtype"):
        if getattr(ext, name) is not None:
            setattr(out, name, getattr(ext, name))
    context_size = io.sae_lens_field(run.cfg(), "context_size")
    if ext.ctx_len is None and isinstance(context_size, int) and context_size > 0:  # SAELens's, as it trained
        out.ctx_len = context_size
    if run.info().extraction is not None:  # the activations the run was trained on: its LM's dtype
        out.precision = ext.lm_dtype or "float32"
    out.tokens = acfg.tokens or ext.rows or out.tokens
    return out


def saelens_dataset(run: Run) -> tuple[str, Path | None] | None:
    """The dataset SAELens recorded in the SAE's cfg.json (dataset_path: under metadata in 6.x, at the top level
    before) and where it is on this machine: as written (absolute, or relative to the working directory), else
    relative to the SAE's folder or one of the three above it (SAELens writes checkpoints/RUN_ID/NAME under the
    folder it ran in); None as the second item when it is not here (a hub dataset's id, another machine's path).
    None when cfg.json names no dataset."""
    recorded = io.sae_lens_field(run.cfg(), "dataset_path")
    if not isinstance(recorded, str) or not recorded.strip():
        return None
    path = Path(recorded).expanduser()
    places = [path] if path.is_absolute() else [path, *(d / path for d in [run.path, *run.path.resolve().parents[:3]])]
    return recorded, next((p for p in places if p.exists()), None)


def corpus_choice(run: Run, acfg: AnalyzeConfig) -> tuple[str, str]:
    """The text a run is analysed on, and why, in words: --corpus; else the corpus our cfg.json records; else the
    dataset SAELens recorded, when it is on this machine; else the built-in corpus."""
    if acfg.corpus:
        return acfg.corpus, f"{acfg.corpus} (--corpus)"
    recorded = run.info().extraction.corpus if run.info().extraction else None
    if recorded is not None:
        named = recorded.file.path if recorded.kind == "file" else recorded.kind
        return named, f"{named}, the corpus the run was trained on"
    dataset = saelens_dataset(run)
    if dataset is None:
        return "builtin", "the built-in corpus (cfg.json names no dataset; --corpus FILE_OR_FOLDER picks the text)"
    if dataset[1] is None:
        return "builtin", (f"the built-in corpus: the dataset SAELens recorded in cfg.json ({dataset[0]}) is not on "
                           f"this machine (--corpus FILE_OR_FOLDER picks its text)")
    return str(dataset[1]), f"{dataset[1]}, the dataset SAELens recorded in cfg.json"


KEY_FIELDS = ("layer", "ctx_len", "outlier_factor", "cache_dtype")


def same_model(keyed: str, name: str) -> bool:
    """Whether a cache keyed by model `keyed` (a model identity, or a name in caches written before identities)
    holds model `name`'s activations: the same name, or the same identity (msae.lm.model_identity), so the built-in
    name, its hub id and its folder all find one cache."""
    if keyed == name:
        return True
    try:
        wanted = model_identity(name)
        return keyed == wanted or (not is_identity(keyed) and model_identity(keyed) == wanted)
    except LMLoadError:  # one of them cannot be resolved here: it is not known to be the same model
        return False


def find_cache(ecfg: ExtractConfig, cache_id: str | None) -> Path | None:
    """The cache the run recorded (by its id, under the cache root) if it is there and holds the same
    extraction, else the one the extraction key points to; None when neither exists yet. The recorded cache
    needs no corpus file: a run whose corpus moved is still analysed on the activations it was trained on."""
    candidates = [cache_root() / cache_id] if cache_id else []
    try:
        candidates.append(cache_path_for(cache_key(ecfg, ecfg.layer), name=ecfg.model))
    except (CorpusError, LMLoadError):  # no corpus file, or a model not on this machine: no cache to point to
        pass
    for cand in candidates:
        if has_manifest(cand):
            m = read_manifest(cand)
            same = (all(m.key.get(f) == getattr(ecfg, f) for f in KEY_FIELDS)
                    and m.key.get("lm_dtype", "float32") == lm_dtype_name(ecfg)
                    and same_model(m.key.get("model", ""), ecfg.model))
            if same and (m.rows >= (ecfg.tokens or 0) or m.exhausted):
                return cand
    return None


def _load(run: Run, device: str, precision: str = "auto") -> SAE:
    try:
        return run.load_sae(device=device, precision=precision)
    except (io.SAELoadError, RunError) as exc:
        raise AnalysisError(str(exc)) from None


def _l0_per_width(sp: Sparse, widths: list[int]) -> list[float]:
    cols = sp.cols.long()
    return [float((cols < w).sum()) / max(sp.n_rows, 1) for w in widths]


TEXT_STORE, ACTIVATIONS_STORE = "msae analyze", "msae analyze --activations"


def check_store_replaceable(run: Run, command: str, overwrite: bool) -> None:
    """A store is replaced only by the kind of analysis that made it, or when the user says --overwrite: the
    text analysis of the shipped run took half an hour, and --activations would leave its links alone."""
    store = run.store_dir
    made_by = {"text": TEXT_STORE, "activations": ACTIVATIONS_STORE, None: None}[store_kind(store)]
    if made_by not in (None, command) and not overwrite:
        raise AnalysisError(f"{store} holds the feature store `{made_by}` made; `{command}` would replace it: pass "
                            f"--overwrite to replace it")


def analyze(
    run_dir: Path | str,
    against: Sequence[Path | str] = (),
    acfg: AnalyzeConfig | None = None,
    lm: LoadedLM | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    cache: Path | None = None,
    overwrite: bool = False,
    say: Callable[[str], None] | None = None,
) -> StoreManifest:
    """Analyse a run (and its relation to `against` runs); writes RUN_DIR/features (and absorption.json) and
    returns the store's manifest. `cache` overrides the activation cache the run recorded. The run's lock is held
    throughout: a second analysis of it is refused. A store `msae analyze --activations` made is replaced only
    with `overwrite`. `say` is told which text is read and, before an extraction, how long it will take."""
    with locked(run_dir):
        check_store_replaceable(Run(run_dir), TEXT_STORE, overwrite)
        return _analyze(Run(run_dir), against, acfg or AnalyzeConfig(), lm, progress, cache, say or (lambda _m: None))


def extraction_note(ecfg: ExtractConfig, why: str, estimate: ExtractionEstimate) -> str:
    """Which text an extraction reads, how many tokens, and how long it will take, in words."""
    whole = " (all of it)" if estimate.text_rows < ecfg.tokens else ""
    cached = f", {estimate.cached_rows:,} of them cached already" if estimate.cached_rows else ""
    minutes = estimate.seconds / 60
    return (f"text: {why}\nextracting activations: {estimate.text_rows:,} tokens{whole}{cached}; "
            f"about {minutes:.1f} min for {estimate.rows:,} at {estimate.rows_per_second:,.0f} tokens/s "
            f"({estimate.how})")


def _analyze(run: Run, against: Sequence[Path | str], acfg: AnalyzeConfig, lm: LoadedLM | None,
             progress: Callable[[str, int, int], None] | None, cache: Path | None,
             say: Callable[[str], None]) -> StoreManifest:
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    sae = _load(run, acfg.device, acfg.precision)
    others = [(Run(p), _load(Run(p), acfg.device, acfg.precision)) for p in against]
    for other_run, other in others:
        if other.d_in != sae.d_in:
            raise AnalysisError(f"{other_run.path} has d_in={other.d_in} but {run.path} has d_in={sae.d_in}; they "
                                f"cannot read the same activations")
    ecfg = extract_config(run, acfg)
    ext = run.info().extraction
    given = cache
    cache = cache or find_cache(ecfg, ext.cache_id if ext else None)
    if cache is None:
        check_corpus(ecfg.corpus)  # a corpus that cannot be read is refused before the model loads
    if lm is None:
        check_before_load(ecfg.model, ecfg.layer, ecfg.ctx_len)  # a --layer the model lacks costs no model load
        try:
            lm = load_lm(ecfg.model, acfg.device, precision=ecfg.precision)
        except LMLoadError as exc:
            raise AnalysisError(f"{run.path} was trained on model {ecfg.model!r}, which cannot be loaded here: {exc}") from None
    try:
        io.check_fits(sae, lm.d_model, f"model {ecfg.model!r}")
    except io.SAELoadError as exc:
        raise AnalysisError(str(exc)) from None
    why = corpus_choice(run, acfg)[1]
    if cache is None:
        say(extraction_note(ecfg, why, estimate_extraction(ecfg, lm, ecfg.layer)))
        cache = extract(ecfg, lm=lm)
    elif given is None:
        say(f"text: {why}; its activations are cached ({cache})")
    timings["load"] = time.perf_counter() - t0

    def stage(name: str) -> Callable[[int, int], None] | None:
        return None if progress is None else (lambda done, total: progress(name, done, total))

    cache_manifest = read_manifest(cache)
    median_norm = cache_manifest.median_norm
    max_norm = acfg.max_norm_factor * median_norm if acfg.max_norm_factor and median_norm else None
    try:
        result = stream([sae] + [o for _r, o in others], cache, top_n=acfg.store.top_n,
                        sample_n=acfg.store.quantiles * acfg.store.per_quantile, window=acfg.store.window,
                        max_rows=acfg.tokens, progress=stage("stream"), max_norm=max_norm, class_sums=acfg.sample_rows)
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

    manifest = StoreManifest(
        format=STORE_FORMAT, run=run.name, model=ecfg.model, layer=ecfg.layer, cache_id=Path(cache).name,
        rows=result.n_rows, max_norm=max_norm, high_norm_rows_silenced=result.skipped_rows, d_sae=sae.d_sae,
        widths=list(sae.widths), k=sae.k, activation=sae.activation, l0_per_width=_l0_per_width(sp, sae.widths),
        dead_fraction=float((stats["count"] == 0).double().mean()), hist_edges=edges.tolist(), store=acfg.store,
        link_config=acfg.links, timings_s=timings)

    links = None
    directions = result.class_sums.lda_directions() if result.class_sums is not None else None
    if sae.n_groups > 1:
        t = time.perf_counter()
        links = hierarchy.nested_links(sp, sae.widths, stats, sae.W_dec, acfg.links, directions=directions)
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
        manifest.hierarchy = _hierarchy_summary(links, latents, sae.widths, alive)
        manifest.splitting = {
            f"prefix_{w}": hierarchy.split_share(sae.W_dec[:w], sae.W_dec, alive[:w], split_thresholds(acfg.links))
            for w in sae.widths[:-1]
        }
        timings["hierarchy"] = time.perf_counter() - t
        t = time.perf_counter()
        link_rows, split = validate.link_split(result.row_doc(), result.row_context)
        manifest.link_validation = validate.validate_links(sp, sae.widths, acfg.links, link_rows, split,
                                                           result.row_part, cache_manifest.parts)
        timings["link validation"] = time.perf_counter() - t
    t = time.perf_counter()
    manifest.hierarchy_figures = validate.hierarchy_figures(sp, links, sae.W_dec, acfg.links.criterion, directions,
                                                            treesae_rows=acfg.sample_rows)
    timings["hierarchy figures"] = time.perf_counter() - t

    compared = {}
    for i, (other_run, other) in enumerate(others, start=1):
        t = time.perf_counter()
        compared[other_run.name] = _against(sae, sp, stats, other, result.sparse[i], edges, acfg.links)
        timings[f"against {other_run.name}"] = time.perf_counter() - t
    manifest.against = {name: ag.summary for name, ag in compared.items()}

    if acfg.absorption:
        t = time.perf_counter()
        measure_absorption(run.path, [r.path for r, _o in others], lm, ecfg.layer)
        timings["absorption"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    write_store(FeatureStore(run.path, manifest, latents, examples, contexts, links, vocab, compared))
    return manifest


def _hierarchy_summary(links: pd.DataFrame, latents: pd.DataFrame, widths: list[int], alive: torch.Tensor) -> HierarchySummary:
    """Links per nested group and how much of the parents' firing their children cover."""
    linked = links[links["linked"]]
    per_group = []
    for g in range(1, len(widths)):
        kids = latents[(latents["group"] == g) & alive.numpy()]
        lg = linked[linked["child_group"] == g]
        per_group.append(GroupSummary(
            group=g, width=widths[g], live_latents=int(len(kids)), links=int(len(lg)),
            children_with_a_parent=int(lg["child"].nunique()),
            share_with_a_parent=float(lg["child"].nunique() / len(kids)) if len(kids) else None))
    parents = latents[latents.get("children", 0) > 0]
    return HierarchySummary(
        links=int(len(linked)), per_group=per_group, parents_with_children=int(len(parents)),
        parents_with_2plus_children=int((latents.get("children", 0) >= 2).sum()),
        mean_children_per_parent=float(parents["children"].mean()) if len(parents) else None,
        mean_coverage=float(parents["coverage"].mean()) if len(parents) else None)


def _against(sae: SAE, sp: Sparse, stats: dict, other: SAE, osp: Sparse, edges, cfg: LinkConfig) -> Against:
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
    summary = AgainstSummary(
        narrow="this" if this_narrow else "other", this_d_sae=sae.d_sae, other_d_sae=other.d_sae,
        other_widths=list(other.widths),
        split_share_decoder=hierarchy.split_share(n_sae.W_dec, w_sae.W_dec, alive_n, split_thresholds(cfg)),
        split_share_links=float(((kids["children"].to_numpy() >= 2) & alive_n.numpy()).sum() / max(int(alive_n.sum()), 1)),
        mean_coverage=float(torch.nanmean(cover[kids["children"].to_numpy() > 0])) if (kids["children"] > 0).any() else None,
        links=int(links["linked"].sum()),
        matching=matching.matching_summary(pairs, sae.d_sae, other.d_sae, groups_a=groups,
                                           alive_a=stats["count"] > 0, alive_b=ostats["count"] > 0),
        other_dead_fraction=float((ostats["count"] == 0).double().mean()))
    if groups is not None:
        pairs["a_group"] = groups[torch.tensor(pairs["a"].to_numpy(), dtype=torch.long)].numpy()
    kids["coverage"] = cover.numpy()
    return Against(summary, {"links": links, "matching": pairs, "parents": kids})


def analyze_activations(run_dir: Path | str, acts: torch.Tensor, source: InputFile,
                        cfg: LinkConfig | None = None, overwrite: bool = False) -> ActivationsAnalysis:
    """Latent statistics, links (a Matryoshka SAE's nested ones), their validation (even rows make the links, odd
    rows measure them) and the hierarchy figures of the run's SAE on `acts` (N, d_in), read from `source`;
    written to RUN/features/ (links.parquet, activations_analysis.json), replacing what was there: a store the
    text analysis made only with `overwrite`."""
    cfg = cfg or LinkConfig()
    with locked(run_dir):
        run = Run(run_dir)
        check_store_replaceable(run, ACTIVATIONS_STORE, overwrite)
        t0 = time.perf_counter()
        sae = _load(run, "cpu")
        if acts.shape[1] != sae.d_in:
            raise AnalysisError(f"{source.path}: its activations have {acts.shape[1]} columns but {run.path}'s SAE "
                                f"reads d_in={sae.d_in}")
        sae.eval()
        sp = encode_rows(sae, acts)
        rows, cols, _ = sp.slice_rows(0, sp.n_rows)
        sums = add_class_sums(None, acts.float(), rows, cols, torch.ones(sp.n_rows, dtype=torch.bool), sae.d_sae)
        directions = sums.lda_directions()
        stats = features.latent_stats(sp, features.histogram_edges(sp.vals, 8))
        links = validation = None
        if sae.n_groups > 1:
            links = hierarchy.nested_links(sp, list(sae.widths), stats, sae.W_dec, cfg, directions=directions)
            validation = validate.validate_links(sp, list(sae.widths), cfg, torch.arange(sp.n_rows) % 2 == 0,
                                                 "rows: even ones make the links, odd ones measure them")
        figures = validate.hierarchy_figures(sp, links, sae.W_dec, cfg.criterion, directions)
        report = ActivationsAnalysis(
            activations=source, rows=sp.n_rows, d_sae=sae.d_sae, widths=list(sae.widths), link_config=cfg,
            links=0 if links is None else int(links["linked"].sum()),
            tree_links=0 if links is None else int(links["tree"].sum()),
            dead_fraction=float((stats["count"] == 0).double().mean()), hierarchy_figures=figures,
            link_validation=validation, seconds=round(time.perf_counter() - t0, 2))
        write_links_only(run.path, links, report)
        return report


def _load_named(runs: list[Run], device: str) -> dict[str, SAE]:
    """The SAEs of `runs` by run name, which must differ: results are keyed by it."""
    saes = {r.name: _load(r, device) for r in runs}
    if len(saes) < len(runs):
        raise AnalysisError("two of the runs have the same name; compare runs with different folder names")
    return saes


def _shared_inputs(runs: list[Run], taxonomy: Path | str | None, lm: LoadedLM | None, device: str,
                   cache: Path | None) -> tuple[ExtractConfig, object, LoadedLM, Path]:
    """What the benchmark and the gallery read for runs on one model and layer (the first run's): its
    extraction, the taxonomy for the model, the model and the activation cache (extracted when there is none)."""
    from msae import taxonomy as tax_mod

    run = runs[0]
    ecfg = extract_config(run, AnalyzeConfig(), how="add them to its cfg.json (msae.extraction.model and .layer)")
    for r in runs[1:]:
        if r.source() != run.source():
            raise AnalysisError(f"{r.path} reads {r.source()}, {run.path} reads {run.source()}: not the same "
                                f"activations")
    try:
        tax = tax_mod.load_taxonomy(taxonomy or tax_mod.SHIPPED, ecfg.model)
    except tax_mod.TaxonomyError as exc:
        raise AnalysisError(str(exc)) from None
    if lm is None:
        try:
            lm = load_lm(ecfg.model, device, precision=ecfg.precision)
        except LMLoadError as exc:
            raise AnalysisError(f"{run.path} was trained on model {ecfg.model!r}, which cannot be loaded here: {exc}") from None
    ext = run.info().extraction
    cache = cache or find_cache(ecfg, ext.cache_id if ext else None) or extract(ecfg, lm=lm)
    return ecfg, tax, lm, cache


def make_gallery(run_dir: Path | str, wide: Path | str, narrow: Path | str | None = None,
                 config: GalleryConfig | None = None, lm: LoadedLM | None = None, cache: Path | None = None) -> Gallery:
    """The gallery (msae.analysis.gallery) of a Matryoshka run with its wide vanilla twin and, for splitting, a
    narrow vanilla SAE; the absorption case comes from the run's hierarchy_bench.json. Written to RUN/gallery.json."""
    from msae.analysis import gallery

    config = config or GalleryConfig()
    run = Run(run_dir)
    runs = [run, Run(wide)] + ([Run(narrow)] if narrow is not None else [])
    saes = _load_named(runs, config.device)
    if saes[run.name].n_groups < 2:
        raise AnalysisError(f"{run.path} is not a Matryoshka SAE: the gallery sets one against its vanilla twins")
    roles = {"matryoshka": run.name, "wide": Run(wide).name}
    if narrow is not None:
        roles["narrow"] = Run(narrow).name
        if saes[roles["narrow"]].d_sae >= saes[run.name].d_sae:
            raise AnalysisError(f"--narrow {narrow} has {saes[roles['narrow']].d_sae} latents, not fewer than "
                                f"{run.path}'s {saes[run.name].d_sae}: splitting needs a narrower SAE")
    ecfg, tax, lm, cache = _shared_inputs(runs, config.taxonomy, lm, config.device, cache)
    result = gallery.build(saes, roles, cache, lm, ecfg.layer, tax, run.result(TaxonomyBench), config)
    run.write_result(result)
    return result


def taxonomy_bench(run_dir: Path | str, against: Sequence[Path | str] = (), config: TaxonomyBenchConfig | None = None,
                   lm: LoadedLM | None = None, cache: Path | None = None,
                   progress: Callable[[str, int, int], None] | None = None) -> TaxonomyBench:
    """The taxonomy benchmark (msae.analysis.taxbench) of the run and `against` runs on the run's model, layer
    and activation cache; tree links come from each run's feature store when it has one. Written to
    RUN/hierarchy_bench.json. `progress` hears its stages (taxbench.run_bench)."""
    from msae.analysis import taxbench

    config = config or TaxonomyBenchConfig()
    run = Run(run_dir)
    runs = [run] + [Run(p) for p in against]
    saes = _load_named(runs, config.device)
    ecfg, tax, lm, cache = _shared_inputs(runs, config.taxonomy, lm, config.device, cache)
    links = {}
    for r in runs:
        try:
            links[r.name] = load_store(r.path).links
        except StoreError:
            links[r.name] = None
    result = taxbench.run_bench(saes, cache, lm, ecfg.layer, tax, links, config, progress=progress)
    run.write_result(result)
    return result


def measure_absorption(run_dir: Path, others: Sequence[Path] = (), lm: LoadedLM | None = None,
                       layer: int | None = None, config: AbsorptionConfig | None = None) -> AbsorptionResult:
    """First-letter absorption of the run and `others` from one set of probes; written to RUN_DIR/absorption.json."""
    from msae.analysis import absorption

    runs = {Run(p).name: Path(p) for p in [run_dir, *others]}
    if len(runs) < 1 + len(others):  # results are keyed by name: one run would silently stand for both
        raise AnalysisError("two of the runs have the same name; compare runs with different folder names")
    try:
        result = absorption.measure(runs, lm=lm, layer=layer, config=config)
    except (absorption.AbsorptionError, io.SAELoadError) as exc:
        raise AnalysisError(str(exc)) from None
    Run(run_dir).write_result(result)
    return result


