"""The activation cache: residual-stream rows extracted once into safetensors shards with their token ids and
contexts, and read back through a shuffled buffer of bounded size.

A shard holds, per row: `activations` (n, d_model), `token_ids`, `context` (global context index) and
`position` (in its context); per context: `context_tokens` (n_ctx, ctx_len, -1 padded) and `context_doc`
(document index in the corpus; absent in shards written before it was added); and `context_start`, the
global index of its first context."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import safe_open
from torch import Tensor

from msae import corpus as corpus_mod
from msae import io
from msae.lm import DEFAULT_MODEL, LoadedLM, cache_dir, load_lm, residual_after

MANIFEST = "manifest.json"
CACHE_FORMAT = 1


@dataclass
class ExtractConfig:
    """What activations to extract. Everything but `tokens` and `device` is part of the cache key."""

    model: str = DEFAULT_MODEL
    """Built-in model name, local path or Hugging Face id."""
    layer: int | None = None
    """Residual stream after this block; None is the middle block."""
    corpus: str = "builtin"
    """'builtin' or a path to a .txt / .jsonl / .csv / .parquet file."""
    tokens: int = 2_000_000
    """Activation rows to have in the cache (after filtering); the cache grows to this if it holds fewer."""
    ctx_len: int = 128
    """Tokens per context; contexts never cross a document boundary."""
    outlier_factor: float = 10.0
    """Drop rows whose norm exceeds this multiple of the median norm (attention-sink-like outliers)."""
    cache_dtype: str = "float16"
    """Storage dtype of the cached rows."""
    lm_batch: int = 16
    """Contexts per forward pass of the LM."""
    shard_rows: int = 131_072
    """Rows per shard file (about 150 MB at d_model 576 in float16)."""
    device: str = "auto"
    """Device for the LM: auto (CUDA when present), cpu or cuda."""


def _corpus_fingerprint(corpus: str) -> str:
    if corpus == "builtin":
        return "builtin:" + ",".join(f"{s.name}={s.path()}" for s in corpus_mod.BUILTIN_SOURCES)
    path = Path(corpus).resolve()
    stat = path.stat()
    return f"file:{path}:{stat.st_size}:{int(stat.st_mtime)}"


def cache_key(cfg: ExtractConfig, layer: int) -> dict:
    return {
        "format": CACHE_FORMAT,
        "model": cfg.model,
        "layer": layer,
        "corpus": _corpus_fingerprint(cfg.corpus),
        "ctx_len": cfg.ctx_len,
        "outlier_factor": cfg.outlier_factor,
        "cache_dtype": cfg.cache_dtype,
    }


def cache_path_for(key: dict, root: Path | None = None) -> Path:
    """The cache directory for `key` under `root`; default $MSAE_ACTIVATION_CACHE, else the msae cache's
    activations/ (caches are large: the variable puts them on another disk)."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    if root is None:
        root = Path(os.environ.get("MSAE_ACTIVATION_CACHE", cache_dir() / "activations"))
    return Path(root) / digest


def _new_manifest(key: dict, d_model: int) -> dict:
    return {
        "key": key,
        "d_model": d_model,
        "shards": [],
        "rows": 0,
        "contexts_done": 0,
        "exhausted": False,
        "median_norm": None,
        "dropped": {"position_0": 0, "special_token": 0, "outlier": 0},
    }


def read_manifest(cache: Path) -> dict:
    return json.loads((Path(cache) / MANIFEST).read_text())


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
    """Accumulates kept rows and writes them as a shard (then the manifest), each file atomically."""

    def __init__(self, cache: Path, manifest: dict, dtype: torch.dtype):
        self.cache, self.manifest, self.dtype = cache, manifest, dtype
        self.parts: dict[str, list[Tensor]] = {"activations": [], "token_ids": [], "context": [], "position": []}
        self.contexts: list[Tensor] = []
        self.context_docs: list[Tensor] = []
        self.pending_rows = 0
        self.pending_contexts = 0
        self.pending_dropped = {k: 0 for k in manifest["dropped"]}

    def add(self, acts: Tensor, token_ids: Tensor, context: Tensor, position: Tensor, ctx_tokens: Tensor,
            ctx_docs: Tensor, dropped: dict):
        for name, value in zip(self.parts, (acts.to(self.dtype), token_ids, context, position)):
            self.parts[name].append(value.cpu())
        self.contexts.append(ctx_tokens.cpu())
        self.context_docs.append(ctx_docs)
        self.pending_rows += acts.shape[0]
        self.pending_contexts += ctx_tokens.shape[0]
        for k, v in dropped.items():
            self.pending_dropped[k] += v

    def flush(self, exhausted: bool = False) -> None:
        m = self.manifest
        if self.pending_rows:
            index = len(m["shards"])
            name = f"shard_{index:05d}.safetensors"
            tensors = {k: torch.cat(v) for k, v in self.parts.items()}
            tensors["context_tokens"] = torch.cat(self.contexts)
            tensors["context_doc"] = torch.cat(self.context_docs)
            tensors["context_start"] = torch.tensor([m["contexts_done"]], dtype=torch.long)
            io.atomic_save_safetensors(tensors, self.cache / name)
            m["shards"].append({"file": name, "rows": self.pending_rows, "contexts": self.pending_contexts})
        m["rows"] += self.pending_rows
        m["contexts_done"] += self.pending_contexts
        for k, v in self.pending_dropped.items():
            m["dropped"][k] += v
        m["exhausted"] = exhausted
        io.atomic_write_text(self.cache / MANIFEST, json.dumps(m, indent=1))
        self.parts = {k: [] for k in self.parts}
        self.contexts = []
        self.context_docs = []
        self.pending_rows = self.pending_contexts = 0
        self.pending_dropped = {k: 0 for k in self.pending_dropped}


def _pad(batch: list[list[int]], ctx_len: int, pad_id: int) -> tuple[Tensor, Tensor]:
    ids = torch.full((len(batch), ctx_len), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), ctx_len), dtype=torch.long)
    for i, tokens in enumerate(batch):
        ids[i, : len(tokens)] = torch.tensor(tokens)
        mask[i, : len(tokens)] = 1
    return ids, mask


def extract(
    cfg: ExtractConfig,
    lm: LoadedLM | None = None,
    progress: Callable[[int, int], None] | None = None,
    root: Path | None = None,
) -> Path:
    """Make sure the cache for `cfg` holds `cfg.tokens` rows (or the whole corpus); returns its directory.

    A cache with the same key is reused; an interrupted extraction continues after its last written shard."""
    from tqdm.auto import tqdm

    lm = lm or load_lm(cfg.model, cfg.device)
    layer = lm.default_layer if cfg.layer is None else cfg.layer
    key = cache_key(cfg, layer)
    cache = cache_path_for(key, root)
    manifest = read_manifest(cache) if (cache / MANIFEST).exists() else _new_manifest(key, lm.d_model)
    if manifest["rows"] >= cfg.tokens or manifest["exhausted"]:
        return cache
    cache.mkdir(parents=True, exist_ok=True)
    special = torch.tensor(sorted(set(lm.tokenizer.all_special_ids)), dtype=torch.long)
    pad_id = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    writer = _ShardWriter(cache, manifest, getattr(torch, cfg.cache_dtype))
    done = manifest["contexts_done"]
    contexts = corpus_mod.contexts(corpus_mod.documents(cfg.corpus), lm.tokenizer, cfg.ctx_len)
    bar = tqdm(total=cfg.tokens, initial=manifest["rows"], unit="tok", desc="activations", mininterval=1.0)
    next_ctx = 0
    for batch in _batched(contexts, cfg.lm_batch):
        if next_ctx + len(batch) <= done:  # written before an interruption
            next_ctx += len(batch)
            continue
        if next_ctx < done:  # the cache ends inside this batch (it was written with another lm_batch)
            batch = batch[done - next_ctx:]
            next_ctx = done
        tokens = [t for t, _doc in batch]
        ids, mask = _pad(tokens, cfg.ctx_len, pad_id)
        resid = residual_after(lm, ids, mask, layer).float()  # (B, T, d)
        position = torch.arange(cfg.ctx_len).expand_as(ids)
        is_special = torch.isin(ids, special)
        keep = mask.bool() & (position > 0) & ~is_special
        rows = resid[keep.to(resid.device)]
        norms = rows.norm(dim=1)
        if manifest["median_norm"] is None:
            manifest["median_norm"] = norms.median().item()
        ok = (norms <= cfg.outlier_factor * manifest["median_norm"]).cpu()
        context = (torch.arange(len(batch)) + next_ctx).unsqueeze(1).expand_as(ids)[keep]
        dropped = {
            "position_0": int(mask[:, 0].sum()),
            "special_token": int((mask.bool() & (position > 0) & is_special).sum()),
            "outlier": int((~ok).sum()),
        }
        ctx_tokens = ids.masked_fill(~mask.bool(), -1).to(torch.int32)
        ctx_docs = torch.tensor([doc for _t, doc in batch], dtype=torch.int32)
        writer.add(rows[ok.to(rows.device)], ids[keep][ok].to(torch.int32), context[ok], position[keep][ok].to(torch.int16),
                   ctx_tokens, ctx_docs, dropped)
        next_ctx += len(batch)
        bar.update(int(ok.sum()))
        if progress is not None:
            progress(manifest["rows"] + writer.pending_rows, cfg.tokens)
        if writer.pending_rows >= cfg.shard_rows:
            writer.flush()
        if manifest["rows"] + writer.pending_rows >= cfg.tokens:
            break
    else:
        writer.flush(exhausted=True)
        bar.close()
        return cache
    writer.flush()
    bar.close()
    return cache


def train_shards(manifest: dict) -> list[dict]:
    """Every shard but the last, which is held out for evaluation (a single shard is all training)."""
    shards = manifest["shards"]
    return shards[:-1] if len(shards) >= 2 else shards


def heldout_shards(manifest: dict) -> list[dict]:
    shards = manifest["shards"]
    return shards[-1:] if len(shards) >= 2 else []


def heldout_contexts(cache: Path) -> Tensor | None:
    """(n, ctx_len) token ids (-1 padded) of the held-out contexts, or None when nothing is held out."""
    shards = heldout_shards(read_manifest(cache))
    if not shards:
        return None
    with safe_open(str(Path(cache) / shards[0]["file"]), framework="pt") as f:
        return f.get_tensor("context_tokens")


class CachedActivations:
    """A BatchSource over a cache: shards in a seeded order each epoch, shuffled through a bounded buffer.

    RAM holds at most `buffer_rows` rows plus one shard, whatever the cache size. Shards are taken a group at
    a time (as many as fit in the buffer), the group's rows permuted and cut into batches; rows left over
    carry into the next group, so an epoch visits every row once but the last, partial batch."""

    def __init__(self, cache: Path, buffer_rows: int = 1 << 19, max_rows: int | None = None, heldout: bool = False):
        self.cache = Path(cache)
        self.manifest = read_manifest(self.cache)
        self.shards = heldout_shards(self.manifest) if heldout else train_shards(self.manifest)
        if max_rows is not None:
            kept, total = [], 0
            for shard in self.shards:
                if total >= max_rows:
                    break
                kept.append(shard)
                total += shard["rows"]
            self.shards = kept
        if not self.shards:
            which = "held-out" if heldout else "training"
            raise ValueError(f"{self.cache}: the activation cache holds no {which} shards")
        self.d_in = int(self.manifest["d_model"])
        self.buffer_rows = buffer_rows
        self.n_rows = sum(s["rows"] for s in self.shards)

    def _load(self, shard: dict) -> Tensor:
        with safe_open(str(self.cache / shard["file"]), framework="pt") as f:
            return f.get_tensor("activations").float()

    def _epoch(self, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
        order = torch.randperm(len(self.shards), generator=generator).tolist()
        carry = torch.empty(0, self.d_in)
        i = 0
        while i < len(order):
            group = [carry]
            rows = carry.shape[0]
            while i < len(order) and (rows == carry.shape[0] or rows + self.shards[order[i]]["rows"] <= self.buffer_rows):
                group.append(self._load(self.shards[order[i]]))
                rows += group[-1].shape[0]
                i += 1
            buffer = torch.cat(group)
            buffer = buffer[torch.randperm(buffer.shape[0], generator=generator)]
            n_full = buffer.shape[0] // batch_size
            for b in range(n_full):
                yield buffer[b * batch_size : (b + 1) * batch_size]
            carry = buffer[n_full * batch_size :]

    def all_rows(self, batch_size: int) -> Iterator[Tensor]:
        """Every row once, in cache order (for evaluation)."""
        for shard in self.shards:
            rows = self._load(shard)
            yield from rows.split(batch_size)

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


def extraction_info(cache: Path) -> dict:
    """What a cache holds, for a run's cfg.json."""
    m = read_manifest(cache)
    return {"cache": str(cache), "rows": m["rows"], "contexts": m["contexts_done"], "exhausted": m["exhausted"],
            "dropped": m["dropped"],
            "median_norm": m["median_norm"], **{k: v for k, v in m["key"].items() if k != "format"}}

