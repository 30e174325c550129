"""The activation cache: residual-stream rows extracted once into safetensors shards with their token ids and
contexts, and read back through a shuffled buffer of bounded size. This module is the cache's one owner: its
manifest (CacheManifest) and its shards (read_shard, iter_shards, read_rows) are read nowhere else.

A shard holds, per row: `activations` (n, d_model), `token_ids`, `context` (global context index) and
`position` (in its context); per context: `context_tokens` (n_ctx, ctx_len, -1 padded), `context_doc`
(document index in the corpus) and `context_part` (index into the manifest's parts), both absent in shards
written before they were added; and `context_start`, the global index of its first context."""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from msae import corpus as corpus_mod
from msae import io
from msae.config import ExtractConfig
from msae.distributed import World
from msae.faults import pause_at
from msae.records import Record
from msae.results import BuiltinFile, CorpusInfo, ExtractionInfo, InputFile
from msae.lm import (LoadedLM, cache_dir, check_before_load, check_layer, check_sizes, compute_dtype, load_lm,
                     model_identity, residual_after, resolve_device)

MANIFEST = "cache.json"
"""The cache's manifest (a feature store's manifest is another file: msae.analysis.store)."""
OLD_MANIFEST = "manifest.json"
"""The name caches written before MANIFEST had: read, and kept for the cache's life (other versions share caches)."""
CACHE_FORMAT = 1


def corpus_provenance(corpus: str) -> CorpusInfo:
    """Where the text comes from, as cfg.json records it: the built-in parts (package, file inside it, content
    hash) or the user's file (the path as given, content hash). No absolute path of this machine."""
    if corpus in corpus_mod.CORPORA:
        sources = []
        for part in corpus_mod.present_sources(corpus):
            sources.append(BuiltinFile(part.name, part.package, part.relpath, corpus_mod.source_sha256(part)))
        return CorpusInfo(kind=corpus, sources=sources)
    path = Path(corpus)
    if not path.exists():
        raise corpus_mod.CorpusError(f"{corpus}: no such file or folder, nor a corpus name "
                                     f"({', '.join(corpus_mod.CORPORA)})")
    return CorpusInfo(kind="file", file=InputFile(path=corpus, sha256=corpus_sha256(path)))


def corpus_sha256(path: Path) -> str:
    """A user corpus's content hash: a file's SHA-256; a folder's, that of its files' paths (relative to it) and
    hashes, so a moved folder keeps its cache and an added, removed or edited file makes another."""
    if not path.is_dir():
        return io.sha256_file(path)
    listing = "".join(f"{f.relative_to(path).as_posix()}={io.sha256_file(f)}\n" for f in corpus_mod.corpus_files(path))
    return hashlib.sha256(listing.encode()).hexdigest()


def check_corpus(corpus: str) -> CorpusInfo:
    """The corpus's provenance, refused (CorpusError) before any model loads when it is missing, empty, binary or
    unreadable (a folder: its first file)."""
    info = corpus_provenance(corpus)
    if corpus not in corpus_mod.CORPORA:
        next(corpus_mod.documents(corpus))
    return info


@dataclass
class ExtractionEstimate:
    """How long an extraction will take, said before it starts."""

    rows: int
    """Rows still to extract: the text's (up to cfg.tokens) less those already cached."""
    text_rows: int
    """Rows the text gives, counted up to cfg.tokens (fewer: the text runs out first)."""
    cached_rows: int
    rows_per_second: float
    how: str
    """Where the rate comes from."""

    @property
    def seconds(self) -> float:
        return self.rows / self.rows_per_second if self.rows_per_second > 0 else float("inf")


def estimate_extraction(cfg: ExtractConfig, lm: LoadedLM, layer: int, root: Path | None = None) -> ExtractionEstimate:
    """The rows an extraction of `cfg` will add and the time it will take at a rate measured here: the text's
    contexts counted (tokenised) up to cfg.tokens as the extraction counts them (position 0 dropped; special
    tokens and outliers, a few per thousand, not foreseen), and the model timed on its first batch of contexts
    (run twice, the second timed: the first pays one-off set-up)."""
    cache = cache_for(cfg, lm, layer, root)
    cached = read_manifest(cache).rows if has_manifest(cache) else 0
    first: list[list[int]] = []
    text_rows = 0
    for tokens, _doc in corpus_mod.contexts(corpus_mod.documents(cfg.corpus), lm.tokenizer, cfg.ctx_len):
        if len(first) < cfg.lm_batch:
            first.append(tokens)
        text_rows += len(tokens) - 1
        if text_rows >= cfg.tokens:
            break
    pad_id = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    batch = pad_batch(first, cfg.ctx_len, pad_id)
    residual_after(lm, *batch, layer)
    started = time.perf_counter()
    residual_after(lm, *batch, layer)
    rate = sum(len(t) - 1 for t in first) / max(time.perf_counter() - started, 1e-9)
    text_rows = min(text_rows, cfg.tokens)
    return ExtractionEstimate(rows=max(text_rows - cached, 0), text_rows=text_rows, cached_rows=cached,
                              rows_per_second=rate,
                              how=f"measured here on one batch of {len(first)} contexts ({io.dtype_name(lm.dtype)} on {lm.device})")


def cache_for(cfg: ExtractConfig, lm: LoadedLM, layer: int, root: Path | None = None,
              corpus: CorpusInfo | None = None) -> Path:
    """The cache directory extracting `cfg` with `lm` fills: the model given decides its dtype and identity (one
    built in memory has no folder: then cfg.model's identity)."""
    key = cache_key(cfg, layer, corpus, lm_dtype=io.dtype_name(lm.dtype), model=lm.identity)
    return cache_path_for(key, root, name=cfg.model)


def _corpus_fingerprint(info: CorpusInfo) -> str:
    """The corpus's part of the cache key: its content, so a moved file keeps its cache and an edited one does
    not (and the key is the same on every machine)."""
    if info.kind != "file":
        return f"{info.kind}:" + ",".join(f"{s.name}={s.sha256}" for s in info.sources)
    return f"file:{info.file.sha256}"


def cache_key(cfg: ExtractConfig, layer: int, corpus: CorpusInfo | None = None, lm_dtype: str | None = None,
              model: str | None = None) -> dict:
    """What a cache holds, as a dict whose digest names its directory; `corpus` saves hashing it again, `lm_dtype`
    is the dtype the model runs in (default: the one `cfg.precision` gives on its device), `model` what the model
    is (default: msae.lm.model_identity of cfg.model; LMLoadError when that cannot be known without loading it).
    The model is keyed by what it is, not by its name, so the built-in name, the hub id and the folder of one model
    share one cache."""
    key = {
        "format": CACHE_FORMAT,
        "model": model or model_identity(cfg.model),
        "layer": layer,
        "corpus": _corpus_fingerprint(corpus or corpus_provenance(cfg.corpus)),
        "ctx_len": cfg.ctx_len,
        "outlier_factor": cfg.outlier_factor,
        "cache_dtype": cfg.cache_dtype,
    }
    lm_dtype = lm_dtype or lm_dtype_name(cfg)
    if lm_dtype != "float32":  # float32 caches keep the key (and so the directory) they had before bf16 existed
        key["lm_dtype"] = lm_dtype
    return key


def lm_dtype_name(cfg: ExtractConfig) -> str:
    """The dtype the LM runs in for this extraction (its precision on its device)."""
    return io.dtype_name(compute_dtype(cfg.precision, resolve_device(cfg.device)))


def cache_root() -> Path:
    """Where activation caches live: $MSAE_ACTIVATION_CACHE, else the msae cache's activations/ (caches are
    large: the variable puts them on another disk)."""
    return Path(os.environ.get("MSAE_ACTIVATION_CACHE", cache_dir() / "activations"))


def cache_path_for(key: dict, root: Path | None = None, name: str | None = None) -> Path:
    """The cache directory for `key` under `root` (default: cache_root()); its name is the key's digest. With
    `name` (the model's name), a cache written before caches were keyed by what the model is (its key held the
    name) is the one returned when it exists and the digest's directory does not: it holds the same rows."""
    root = Path(root if root is not None else cache_root())
    path = root / _digest(key)
    if name is not None and not has_manifest(path):
        by_name = root / _digest({**key, "model": name})
        if has_manifest(by_name):
            return by_name
    return path


def _digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


ROW_TENSORS = ("activations", "token_ids", "context", "position")
"""A shard's tensors with one entry per row (the others have one per context, or one)."""
SHARD_TENSORS = (*ROW_TENSORS, "context_tokens", "context_doc", "context_part", "context_start")
"""Every tensor a shard holds."""


@dataclass
class Shard(Record):
    """One shard file of a cache."""

    file: str
    """Its name in the cache directory."""
    rows: int
    contexts: int


@dataclass
class CacheManifest(Record):
    """A cache's manifest (MANIFEST), rewritten after every shard: what the cache holds and how far extraction got."""

    key: dict[str, Any]
    """What the cache holds (model identity, layer, corpus fingerprint, ...); its digest names the directory."""
    d_model: int
    model_name: str | None = None
    """The model's name when it was first extracted, for people and for re-extraction."""
    shards: list[Shard] = field(default_factory=list)
    rows: int = 0
    contexts_done: int = 0
    """Contexts of the corpus read so far (the next extraction continues after them)."""
    exhausted: bool = False
    """The corpus ran out before the requested tokens."""
    median_norm: float | None = None
    """Median row norm of the first batch: the outlier filter's unit."""
    parts: list[str] = field(default_factory=list)
    """The corpus parts in order of first appearance (a shard's context_part indexes them)."""
    dropped: dict[str, int] = field(default_factory=lambda: {"position_0": 0, "special_token": 0, "outlier": 0})
    """Rows left out, by reason."""

    @property
    def layer(self) -> int:
        return self.key["layer"]

    def train_shards(self) -> list[Shard]:
        """Every shard but the last, which is held out for evaluation (a single shard is all training)."""
        return self.shards[:-1] if len(self.shards) >= 2 else self.shards

    def heldout_shards(self) -> list[Shard]:
        return self.shards[-1:] if len(self.shards) >= 2 else []


def manifest_path(cache: Path) -> Path:
    """Where the manifest of `cache` is, or will be written: an older cache keeps its OLD_MANIFEST."""
    path = Path(cache) / MANIFEST
    old = Path(cache) / OLD_MANIFEST
    return old if not path.exists() and old.exists() else path


def read_manifest(cache: Path) -> CacheManifest:
    return CacheManifest.loads(manifest_path(cache).read_text())


def has_manifest(cache: Path) -> bool:
    """Whether `cache` is a cache directory (a first shard has been written)."""
    return manifest_path(cache).exists()


def read_shard(cache: Path, shard: Shard, names: Sequence[str], rows: int | Tensor | None = None) -> dict[str, Tensor]:
    """The tensors `names` of one shard of `cache`; the per-row ones (ROW_TENSORS) cut to their first `rows` rows
    (an int: only those are read) or to the rows at the indices `rows` (a tensor). A name the shard lacks (written
    before it was added) is left out of the result."""
    with safe_open(str(Path(cache) / shard.file), framework="pt") as f:
        have = set(f.keys())
        out = {}
        for name in names:
            if name not in have:
                continue
            if name in ROW_TENSORS and isinstance(rows, int):
                out[name] = f.get_slice(name)[:rows]
            elif name in ROW_TENSORS and rows is not None:
                out[name] = f.get_tensor(name)[rows]
            else:
                out[name] = f.get_tensor(name)
        return out


def iter_shards(cache: Path, names: Sequence[str], shards: Sequence[Shard] | None = None,
                max_rows: int | None = None) -> Iterator[tuple[int, Shard, dict[str, Tensor]]]:
    """(index in the manifest, shard, its tensors `names`) for each of `shards` (default: every shard, in order),
    one shard in memory at a time; with `max_rows`, the first `max_rows` rows in all."""
    every = read_manifest(cache).shards
    done = 0
    for shard in every if shards is None else shards:
        if max_rows is not None and done >= max_rows:
            return
        take = shard.rows if max_rows is None else min(shard.rows, max_rows - done)
        yield every.index(shard), shard, read_shard(cache, shard, names, take if take < shard.rows else None)
        done += take


def read_rows(cache: Path, shard_index: Tensor, row: Tensor, name: str = "activations") -> Tensor:
    """The per-row tensor `name` at the (shard index, row in that shard) pairs, in their order; one shard open at
    a time."""
    shards = read_manifest(cache).shards
    out = None
    for i in torch.unique(shard_index).tolist():
        at = (shard_index == i).nonzero().squeeze(1)
        got = read_shard(cache, shards[i], [name], row[at])[name]
        if out is None:
            out = torch.zeros((len(row), *got.shape[1:]), dtype=got.dtype)
        out[at] = got
    return out if out is not None else torch.zeros(0)


def context_tokens_at(cache: Path, shard_index: int, context: int) -> Tensor:
    """(ctx_len,) token ids (-1 padded) of the global context `context`, which shard `shard_index` holds."""
    t = read_shard(cache, read_manifest(cache).shards[shard_index], ["context_tokens", "context_start"])
    return t["context_tokens"][context - int(t["context_start"][0])]


def row_parts(cache: Path, shard: Shard) -> Tensor | None:
    """(rows,) the corpus part (index into the manifest's parts) of every row of `shard`; None for a cache
    written before parts were recorded."""
    t = read_shard(cache, shard, ["context_part", "context_start", "context"])
    if "context_part" not in t:
        return None
    return t["context_part"].long()[t["context"].long() - int(t["context_start"][0])]


def _batched(items: Iterator, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class _ShardWriter:
    """Accumulates kept rows and writes them as a shard (then the manifest), each file atomically.

    The cache's last shard is held out, so the last flush of an extraction does not leave a sliver there: rows
    fewer than half a shard join the shard before them (written again under a new name, the manifest pointed at it,
    then the old file removed; a stop in between leaves the old shard and manifest intact), unless that would leave
    a single shard, and nothing held out. The last shard then holds from half a shard to one and a half, and the
    cache exactly the rows extracted."""

    def __init__(self, cache: Path, manifest: CacheManifest, dtype: torch.dtype, shard_rows: int):
        self.cache, self.manifest, self.dtype, self.shard_rows = cache, manifest, dtype, shard_rows
        self.parts: dict[str, list[Tensor]] = {"activations": [], "token_ids": [], "context": [], "position": []}
        self.contexts: list[Tensor] = []
        self.context_docs: list[Tensor] = []
        self.context_parts: list[Tensor] = []
        self.pending_rows = 0
        self.pending_contexts = 0
        self.pending_dropped = {k: 0 for k in manifest.dropped}

    def add(self, acts: Tensor, token_ids: Tensor, context: Tensor, position: Tensor, ctx_tokens: Tensor,
            ctx_docs: Tensor, ctx_parts: Tensor, dropped: dict):
        for name, value in zip(self.parts, (acts.to(self.dtype), token_ids, context, position)):
            self.parts[name].append(value.cpu())
        self.contexts.append(ctx_tokens.cpu())
        self.context_docs.append(ctx_docs)
        self.context_parts.append(ctx_parts)
        self.pending_rows += acts.shape[0]
        self.pending_contexts += ctx_tokens.shape[0]
        for k, v in dropped.items():
            self.pending_dropped[k] += v

    def flush(self, exhausted: bool = False, last: bool = False) -> None:
        """Writes the pending rows as a shard, or with `last` (the extraction's end) as part of the shard before
        them when they are fewer than half a shard and two shards or more were written before."""
        # Made at the first write, so an extraction that fails before it leaves no empty cache directory behind.
        self.cache.mkdir(parents=True, exist_ok=True)
        m = self.manifest
        replaced = None
        if self.pending_rows:
            tensors = {k: torch.cat(v) for k, v in self.parts.items()}
            tensors["context_tokens"] = torch.cat(self.contexts)
            tensors["context_doc"] = torch.cat(self.context_docs)
            tensors["context_part"] = torch.cat(self.context_parts)
            tensors["context_start"] = torch.tensor([m.contexts_done], dtype=torch.long)
            before = read_shard(self.cache, m.shards[-1], SHARD_TENSORS) if (
                last and len(m.shards) >= 2 and self.pending_rows < self.shard_rows // 2) else {}
            if before.keys() == set(SHARD_TENSORS):  # not a shard written before every tensor existed
                replaced, kept = m.shards.pop(), tensors
                tensors = {k: before[k] if k == "context_start" else torch.cat([before[k], kept[k]]) for k in kept}
                rows, contexts = replaced.rows + self.pending_rows, replaced.contexts + self.pending_contexts
                name = f"shard_{len(m.shards):05d}_{rows}.safetensors"
            else:
                rows, contexts = self.pending_rows, self.pending_contexts
                name = f"shard_{len(m.shards):05d}.safetensors"
            io.atomic_save_safetensors(tensors, self.cache / name)
            m.shards.append(Shard(file=name, rows=rows, contexts=contexts))
        m.rows += self.pending_rows
        m.contexts_done += self.pending_contexts
        for k, v in self.pending_dropped.items():
            m.dropped[k] += v
        m.exhausted = exhausted
        io.atomic_write_text(manifest_path(self.cache), json.dumps(m.to_json(), indent=1))
        if replaced is not None and replaced.file != m.shards[-1].file:
            (self.cache / replaced.file).unlink(missing_ok=True)
        self.parts = {k: [] for k in self.parts}
        self.contexts = []
        self.context_docs = []
        self.context_parts = []
        self.pending_rows = self.pending_contexts = 0
        self.pending_dropped = {k: 0 for k in self.pending_dropped}


def pad_batch(batch: list[list[int]], length: int, pad_id: int) -> tuple[Tensor, Tensor]:
    """(ids, attention mask), each (B, length): the token lists right-padded with `pad_id`."""
    ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), length), dtype=torch.long)
    for i, tokens in enumerate(batch):
        ids[i, : len(tokens)] = torch.tensor(tokens)
        mask[i, : len(tokens)] = 1
    return ids, mask


def first_non_finite_row(x: Tensor, chunk: int = 1 << 16) -> int | None:
    """Index of the first row of x (N, d) that holds a NaN or Inf (None when every row is finite); read in chunks."""
    for start in range(0, x.shape[0], chunk):
        bad = (~torch.isfinite(x[start : start + chunk])).any(dim=1).nonzero()
        if bad.numel():
            return start + int(bad[0])
    return None


def first_shards(shards: list[Shard], max_rows: int | None) -> list[Shard]:
    """The leading shards that hold `max_rows` rows (all of them when None)."""
    kept, total = [], 0
    for shard in shards:
        if max_rows is not None and total >= max_rows:
            break
        kept.append(shard)
        total += shard.rows
    return kept


class ActivationsFileError(ValueError):
    """A user's activations file that cannot be trained or analysed on; the message names the file and the problem."""


def read_activations_file(path: Path) -> Tensor:
    """The `activations` tensor (N, d_in) of a user's safetensors file (`--activations`), checked: finite, with
    rows and columns; float16 and bfloat16 are read as float32."""
    if not path.exists():
        raise ActivationsFileError(f"{path}: no such file")
    if path.is_dir():
        raise ActivationsFileError(f"{path}: a directory, not a safetensors file")
    io.refuse_pickle(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            if "activations" not in f.keys():
                found = ", ".join(f.keys()) or "none"
                raise ActivationsFileError(f"{path}: no tensor named 'activations' (found: {found})")
            acts = f.get_tensor("activations")
    except SafetensorError as exc:
        raise ActivationsFileError(f"{path}: not a readable safetensors file ({exc})") from None
    if acts.ndim != 2 or not acts.is_floating_point():
        raise ActivationsFileError(f"{path}: 'activations' must be a 2-D float tensor (N, d_in), got "
                                   f"{tuple(acts.shape)} {acts.dtype}")
    if acts.shape[0] == 0 or acts.shape[1] == 0:
        raise ActivationsFileError(f"{path}: 'activations' has shape {tuple(acts.shape)}: it needs rows and columns")
    bad = first_non_finite_row(acts)
    if bad is not None:
        raise ActivationsFileError(f"{path}: row {bad} of 'activations' holds NaN or Inf; remove such rows and run "
                                   f"again")
    return acts.float() if acts.dtype in (torch.float16, torch.bfloat16) else acts


def _pending_batches(contexts: Iterator, size: int, done: int) -> Iterator[tuple[int, list]]:
    """(index of its first context, batch) for batches of `size` contexts, leaving out the first `done` contexts
    (written before an interruption, maybe with another batch size: the batch that straddles them is cut)."""
    next_ctx = 0
    for batch in _batched(contexts, size):
        if next_ctx + len(batch) <= done:
            next_ctx += len(batch)
            continue
        if next_ctx < done:
            batch = batch[done - next_ctx:]
            next_ctx = done
        yield next_ctx, batch
        next_ctx += len(batch)


def _round_residuals(lm: LoadedLM, batches: list[list], cfg: ExtractConfig, layer: int, pad_id: int,
                     world: World) -> list[Tensor] | None:
    """The residual streams (B, T, d) of a round of batches, one batch a rank (this rank runs the LM on
    batches[rank]), collected on the main rank; None on the others."""
    mine = batches[world.rank] if world.rank < len(batches) else []
    resid = residual_after(lm, *pad_batch([t for t, _doc in mine], cfg.ctx_len, pad_id), layer) if mine else None
    if world.size == 1:
        return [resid]
    padded = torch.zeros(cfg.lm_batch, cfg.ctx_len, lm.d_model, dtype=lm.model.dtype, device=lm.device)
    if resid is not None:
        padded[: resid.shape[0]] = resid
    gathered = world.gather_to_main(padded)
    return None if gathered is None else [gathered[i, : len(batch)] for i, batch in enumerate(batches)]


def extract(
    cfg: ExtractConfig,
    lm: LoadedLM | None = None,
    progress: Callable[[int, int], None] | None = None,
    root: Path | None = None,
    world: World = World(),
) -> Path:
    """Make sure the cache for `cfg` holds `cfg.tokens` rows (or the whole corpus); returns its directory.

    A cache with the same key is reused; an interrupted extraction continues after its last written shard. Under
    several ranks (torchrun) each rank runs the LM on every size-th batch of contexts and the main rank filters and
    writes them in corpus order: the very cache one process writes, stopping after the same batch."""
    from tqdm.auto import tqdm

    corpus = check_corpus(cfg.corpus)
    if lm is None:
        check_before_load(cfg.model, cfg.layer, cfg.ctx_len)  # a mistake costs no model load
        lm = load_lm(cfg.model, cfg.device, precision=cfg.precision)
    layer = lm.default_layer if cfg.layer is None else cfg.layer
    # Again on the loaded model (a hub id's config is known only now), before the progress bar, which the
    # message would be printed into.
    check_layer(lm, layer)
    check_sizes(lm.name, lm.model.config.to_dict(), ctx_len=cfg.ctx_len)
    cache = cache_for(cfg, lm, layer, root, corpus)
    manifest = (read_manifest(cache) if has_manifest(cache)
                else CacheManifest(key=cache_key(cfg, layer, corpus, io.dtype_name(lm.dtype), lm.identity),
                                   d_model=lm.d_model, model_name=cfg.model))
    full, done = world.broadcast_(torch.tensor([manifest.rows >= cfg.tokens or manifest.exhausted,
                                                manifest.contexts_done])).tolist()
    if full:
        return cache
    special = torch.tensor(sorted(set(lm.tokenizer.all_special_ids)), dtype=torch.long)
    pad_id = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    if cfg.corpus in corpus_mod.CORPORA and corpus_mod.missing_note(cfg.corpus) and world.main:
        print(f"note: {corpus_mod.missing_note(cfg.corpus)}")
    writer = _ShardWriter(cache, manifest, getattr(torch, cfg.cache_dtype), cfg.shard_rows)
    doc_parts: list[int] = []  # per document read so far, its part's index in manifest.parts

    def tracked(docs: Iterator[corpus_mod.Document]) -> Iterator[corpus_mod.Document]:
        for doc in docs:
            part = corpus_mod.part_of(doc)
            if part not in manifest.parts:
                manifest.parts.append(part)
            doc_parts.append(manifest.parts.index(part))
            yield doc

    contexts = corpus_mod.contexts(tracked(corpus_mod.documents(cfg.corpus)), lm.tokenizer, cfg.ctx_len)
    bar = tqdm(total=cfg.tokens, initial=manifest.rows, unit="tok", desc="activations", mininterval=1.0,
               disable=not world.main)
    stopped = False
    for batches in _batched(_pending_batches(contexts, cfg.lm_batch, done), world.size):
        residuals = _round_residuals(lm, [batch for _start, batch in batches], cfg, layer, pad_id, world)
        for (next_ctx, batch), resid in zip(batches, residuals or []):
            ids, mask = pad_batch([t for t, _doc in batch], cfg.ctx_len, pad_id)
            resid = resid.float()  # (B, T, d)
            position = torch.arange(cfg.ctx_len).expand_as(ids)
            is_special = torch.isin(ids, special)
            keep = mask.bool() & (position > 0) & ~is_special
            rows = resid[keep.to(resid.device)]
            norms = rows.norm(dim=1)
            if manifest.median_norm is None:
                manifest.median_norm = norms.median().item()
            ok = (norms <= cfg.outlier_factor * manifest.median_norm).cpu()
            context = (torch.arange(len(batch)) + next_ctx).unsqueeze(1).expand_as(ids)[keep]
            dropped = {
                "position_0": int(mask[:, 0].sum()),
                "special_token": int((mask.bool() & (position > 0) & is_special).sum()),
                "outlier": int((~ok).sum()),
            }
            ctx_tokens = ids.masked_fill(~mask.bool(), -1).to(torch.int32)
            ctx_docs = torch.tensor([doc for _t, doc in batch], dtype=torch.int32)
            ctx_parts = torch.tensor([doc_parts[doc] for _t, doc in batch], dtype=torch.int16)
            writer.add(rows[ok.to(rows.device)], ids[keep][ok].to(torch.int32), context[ok],
                       position[keep][ok].to(torch.int16), ctx_tokens, ctx_docs, ctx_parts, dropped)
            bar.update(int(ok.sum()))
            if progress is not None:
                progress(manifest.rows + writer.pending_rows, cfg.tokens)
            if writer.pending_rows >= cfg.shard_rows:
                writer.flush()
                pause_at(f"extract shard {len(manifest.shards)}")
            if manifest.rows + writer.pending_rows >= cfg.tokens:
                stopped = True
                break
        if world.broadcast_(torch.tensor(stopped)).item():
            break
    if world.main:
        writer.flush(exhausted=not stopped, last=True)
    bar.close()
    world.barrier()  # the other ranks read the cache only once the main rank has written it
    return cache


def heldout_contexts(cache: Path) -> Tensor | None:
    """(n, ctx_len) token ids (-1 padded) of the held-out contexts, or None when nothing is held out."""
    shards = read_manifest(cache).heldout_shards()
    if not shards:
        return None
    return read_shard(cache, shards[0], ["context_tokens"])["context_tokens"]


class CachedActivations:
    """A BatchSource over a cache: shards in a seeded order each epoch, shuffled through a bounded buffer.

    RAM holds at most `buffer_rows` rows plus one shard, whatever the cache size. Shards are taken a group at
    a time (as many as fit in the buffer), the group's rows permuted and cut into batches; rows left over
    carry into the next group, so an epoch visits every row once but the last, partial batch."""

    def __init__(self, cache: Path, buffer_rows: int = 1 << 19, max_rows: int | None = None, heldout: bool = False):
        self.cache = Path(cache)
        self.manifest = read_manifest(self.cache)
        chosen = self.manifest.heldout_shards() if heldout else self.manifest.train_shards()
        self.shards = first_shards(chosen, max_rows)
        if not self.shards:
            which = "held-out" if heldout else "training"
            raise ValueError(f"{self.cache}: the activation cache holds no {which} shards")
        self.d_in = self.manifest.d_model
        self.buffer_rows = buffer_rows
        self.n_rows = sum(s.rows for s in self.shards)

    def load(self, shard: Shard) -> Tensor:
        """Every row of `shard` (float32)."""
        return read_shard(self.cache, shard, ["activations"])["activations"].float()

    def _epoch(self, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
        order = torch.randperm(len(self.shards), generator=generator).tolist()
        carry = torch.empty(0, self.d_in)
        i = 0
        while i < len(order):
            group = [carry]
            rows = carry.shape[0]
            while i < len(order) and (rows == carry.shape[0] or rows + self.shards[order[i]].rows <= self.buffer_rows):
                group.append(self.load(self.shards[order[i]]))
                rows += group[-1].shape[0]
                i += 1
            buffer = torch.cat(group)
            buffer = buffer[torch.randperm(buffer.shape[0], generator=generator)]
            n_full = buffer.shape[0] // batch_size
            for b in range(n_full):
                yield buffer[b * batch_size : (b + 1) * batch_size]
            carry = buffer[n_full * batch_size :]

    def check_finite(self) -> None:
        """Refuse a cache with a NaN or Inf row before training starts, naming the shard file and the row in it
        (one shard in memory at a time)."""
        for shard in self.shards:
            bad = first_non_finite_row(self.load(shard))
            if bad is not None:
                raise ValueError(f"{self.cache / shard.file}: row {bad} holds NaN or Inf; extract the cache again")

    def all_rows(self, batch_size: int) -> Iterator[Tensor]:
        """Every row once, in cache order (for evaluation)."""
        for shard in self.shards:
            yield from self.load(shard).split(batch_size)

    def batches(self, start_step: int, batch_size: int, seed: int) -> Iterator[Tensor]:
        if self.n_rows < batch_size:
            raise ValueError(f"the activation cache holds {self.n_rows} rows, fewer than one batch of {batch_size}")
        step, epoch = 0, 0
        while True:
            generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            for batch in self._epoch(batch_size, generator):
                if step >= start_step:
                    yield batch
                step += 1
            epoch += 1


def extraction_info(cache: Path, cfg: ExtractConfig) -> ExtractionInfo:
    """What a run trained on cache `cache` (extracted with `cfg`) records in its cfg.json."""
    m = read_manifest(cache)
    key = m.key
    return ExtractionInfo(
        model=cfg.model, layer=key["layer"], corpus=corpus_provenance(cfg.corpus), ctx_len=key["ctx_len"],
        outlier_factor=key["outlier_factor"], cache_dtype=key["cache_dtype"], lm_dtype=key.get("lm_dtype", "float32"),
        rows=m.rows, contexts=m.contexts_done, exhausted=m.exhausted, dropped=m.dropped, median_norm=m.median_norm,
        cache_id=Path(cache).name)

