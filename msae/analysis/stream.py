"""One streaming pass of SAEs over an activation cache: every SAE's active latents kept in compressed sparse
rows, plus, per latent of the first SAE, its top activating examples and a uniform sample, each with the
±window tokens around it and the latent's activation on every one of them.

Memory is bounded by the number of active entries (rows × L0), never by rows × latents; the examples are
merged shard by shard, so only one shard's rows and one shard's entries are in RAM beside them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor

from msae.activations import SHARD_TENSORS, first_shards, iter_shards, read_manifest
from msae.faults import pause_at
from msae.sae import SAE


@dataclass
class Sparse:
    """Active latents of `n_rows` cache rows as compressed sparse rows (latents sorted within a row)."""

    row_ptr: Tensor
    """(n_rows + 1,) int64: entries of row r are [row_ptr[r], row_ptr[r + 1])."""
    cols: Tensor
    """(nnz,) int32 latent indices."""
    vals: Tensor
    """(nnz,) float32 activations (> 0)."""
    d_sae: int

    @property
    def n_rows(self) -> int:
        return self.row_ptr.numel() - 1

    def dense(self) -> Tensor:
        """(n_rows, d_sae) float32 activations (small row counts only: probes, tests)."""
        rows, cols, vals = self.slice_rows(0, self.n_rows)
        out = torch.zeros(self.n_rows, self.d_sae)
        out[rows, cols] = vals
        return out

    def subset(self, keep: Tensor) -> "Sparse":
        """The rows where the (n_rows,) bool mask `keep` is set, in order."""
        counts = self.row_ptr.diff()
        entry_kept = torch.repeat_interleave(keep, counts)
        row_ptr = torch.zeros(int(keep.sum()) + 1, dtype=torch.long)
        row_ptr[1:] = counts[keep].cumsum(0)
        return Sparse(row_ptr, self.cols[entry_kept], self.vals[entry_kept], self.d_sae)

    def entry_rows(self) -> Tensor:
        """(nnz,) int64 the row of every entry."""
        return torch.repeat_interleave(torch.arange(self.n_rows), self.row_ptr.diff())

    def slice_rows(self, start: int, stop: int) -> tuple[Tensor, Tensor, Tensor]:
        """(rows relative to start, cols int64, vals) of rows [start, stop)."""
        a, b = int(self.row_ptr[start]), int(self.row_ptr[stop])
        counts = self.row_ptr[start : stop + 1].diff()
        rows = torch.repeat_interleave(torch.arange(stop - start), counts)
        return rows, self.cols[a:b].long(), self.vals[a:b]


@dataclass
class Examples:
    """Per latent, `n` example tokens chosen by a key (largest key wins), with their windows.

    Slots not filled yet have key -inf and row -1."""

    key: Tensor
    """(F, n) float32 the ranking key (the activation for top examples, a random priority for samples)."""
    act: Tensor
    """(F, n) float32 activation of the latent on the example token."""
    row: Tensor
    """(F, n) int64 cache row of the example."""
    context: Tensor
    """(F, n) int64 global context index."""
    position: Tensor
    """(F, n) int64 position of the token in its context."""
    tokens: Tensor
    """(F, n, 2w+1) int32 token ids around the example (-1 outside the context)."""
    acts: Tensor
    """(F, n, 2w+1) float32 the latent's activation on each of those tokens (0 where it does not fire or the row
    was dropped from the cache)."""

    @classmethod
    def empty(cls, d_sae: int, n: int, window: int) -> "Examples":
        span = 2 * window + 1
        return cls(
            key=torch.full((d_sae, n), -torch.inf),
            act=torch.zeros(d_sae, n),
            row=torch.full((d_sae, n), -1, dtype=torch.long),
            context=torch.full((d_sae, n), -1, dtype=torch.long),
            position=torch.full((d_sae, n), -1, dtype=torch.long),
            tokens=torch.full((d_sae, n, span), -1, dtype=torch.int32),
            acts=torch.zeros(d_sae, n, span),
        )

    @property
    def n(self) -> int:
        return self.key.shape[1]

    @property
    def window(self) -> int:
        return (self.tokens.shape[2] - 1) // 2


@dataclass
class ClassSums:
    """What a detection direction per latent needs, from the pass: Σx over the rows where each latent fires, Σx
    and Σxxᵀ over all rows (float64; rows silenced for their norm are left out of all three)."""

    by_latent: Tensor
    """(d_sae, d_in) Σ x over the rows where the latent fires."""
    count: Tensor
    """(d_sae,) rows where the latent fires."""
    total: Tensor
    """(d_in,) Σ x."""
    outer: Tensor
    """(d_in, d_in) Σ x xᵀ."""
    n: int
    """Rows summed."""

    def lda_directions(self, ridge: float = 1e-3) -> Tensor:
        """(d_sae, d_in) per latent, Σ⁻¹(μ_fires − μ_rest): the linear discriminant that tells the rows where it
        fires from the others, with the total covariance Σ (plus ridge × its mean variance) as the shared one. A
        cheap stand-in for a logistic probe trained on the latent's firing (Tree SAE's Eq. 5); zero for a latent
        that never fires or always does."""
        n, c = float(self.n), self.count.double().unsqueeze(1)
        mu = self.total / n
        cov = self.outer / n - torch.outer(mu, mu)
        cov += ridge * cov.diagonal().mean() * torch.eye(cov.shape[0], dtype=cov.dtype)
        fires = self.by_latent / c.clamp_min(1)
        rest = (self.total - self.by_latent) / (n - c).clamp_min(1)
        delta = torch.where((c > 0) & (c < n), fires - rest, torch.zeros_like(fires))
        return torch.linalg.solve(cov, delta.T).T.float()


@dataclass
class StreamResult:
    """What one pass gathered."""

    sparse: list[Sparse]
    """Active latents of every SAE, in the order given."""
    top: Examples
    """The first SAE's top activating examples per latent."""
    sample: Examples
    """A uniform random sample of each latent's firings (for quantile examples)."""
    context_tokens: Tensor
    """(n_contexts, ctx_len) int32 token ids of every context read, by global context index (-1 padded)."""
    context_doc: dict[int, int]
    """Document index of every context seen (empty for caches written before documents were recorded)."""
    n_rows: int
    seconds: float
    skipped_rows: int = 0
    """Rows left silent because their norm exceeded `max_norm` (they count in n_rows, with no latent active)."""
    row_context: Tensor | None = None
    """(n_rows,) int64 the global context index of every row (for splits by context)."""
    row_part: Tensor | None = None
    """(n_rows,) int64 the corpus part of every row (an index into the cache manifest's "parts"), when recorded."""
    class_sums: ClassSums | None = None
    """The first SAE's per-latent sums for detection directions, when asked for."""

    def row_doc(self) -> Tensor | None:
        """(n_rows,) int64 the document of every row; None when the cache does not record documents."""
        if self.row_context is None or not self.context_doc:
            return None
        known = torch.tensor(list(self.context_doc.keys()), dtype=torch.long)
        by_context = torch.full((max(int(self.row_context.max()), int(known.max())) + 1,), -1, dtype=torch.long)
        by_context[known] = torch.tensor(list(self.context_doc.values()), dtype=torch.long)
        docs = by_context[self.row_context]
        return None if bool((docs < 0).any()) else docs


def rank_within(child: Tensor, score: Tensor) -> Tensor:
    """Rank of every item's score among the items with the same `child` (0 = best, ties to the earlier item); any
    grouping key works: a pair's child or its parent (for a parent's best children), an entry's latent (for its top
    examples)."""
    if score.dtype == torch.float32 and child.numel() and int(child.max()) < 2**30:
        # One stable sort of int64 keys (group, then score descending), not two: a float32's bits, read as an
        # integer, order like the float once the negative ones are flipped (+ 0.0 makes -0.0 equal to 0.0).
        bits = (score + 0.0).view(torch.int32).long()
        ordered = torch.where(bits < 0, -(bits & 0x7FFFFFFF) - 1, bits)  # in [-2³¹, 2³¹), ascending with score
        order = torch.argsort(child.long() * 2**32 + (2**31 - 1 - ordered), stable=True)
    else:
        order = torch.argsort(score, descending=True, stable=True)
        order = order[torch.argsort(child[order], stable=True)]
    sorted_child = child[order]
    first = torch.ones_like(sorted_child, dtype=torch.bool)
    first[1:] = sorted_child[1:] != sorted_child[:-1]
    start = torch.cummax(torch.where(first, torch.arange(order.numel()), torch.zeros_like(order)), dim=0).values
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel()) - start
    return rank


class _ShardView:
    """A shard's rows addressed by (context, position), for cutting windows."""

    def __init__(self, context: Tensor, position: Tensor, context_tokens: Tensor, context_start: int, row0: int):
        self.context_tokens = context_tokens  # (n_ctx, ctx_len) int32, -1 padded
        self.context_start = context_start
        n_ctx, ctx_len = context_tokens.shape
        self.row_at = torch.full((n_ctx, ctx_len), -1, dtype=torch.long)  # shard-local row, -1 when dropped
        self.row_at[context - context_start, position] = torch.arange(context.numel())
        self.context, self.position, self.row0 = context, position, row0

    def windows(self, local_rows: Tensor, latents: Tensor, window: int, lookup: Callable[[Tensor, Tensor], Tensor]):
        """Tokens (m, 2w+1) and the given latents' activations on them for examples at `local_rows`."""
        ctx_local = self.context[local_rows] - self.context_start
        offsets = torch.arange(-window, window + 1)
        pos = self.position[local_rows].unsqueeze(1) + offsets  # (m, 2w+1)
        ctx_len = self.context_tokens.shape[1]
        inside = (pos >= 0) & (pos < ctx_len)
        pos_c = pos.clamp(0, ctx_len - 1)
        ctx_e = ctx_local.unsqueeze(1).expand_as(pos_c)
        tokens = torch.where(inside, self.context_tokens[ctx_e, pos_c], torch.tensor(-1, dtype=torch.int32))
        rows = torch.where(inside, self.row_at[ctx_e, pos_c], torch.tensor(-1))
        acts = torch.zeros(pos.shape)
        have = rows >= 0
        acts[have] = lookup(rows[have], latents.unsqueeze(1).expand_as(rows)[have])
        return tokens, acts


def _merge(ex: Examples, cols: Tensor, keys: Tensor, vals: Tensor, local_rows: Tensor, view: _ShardView,
           lookup: Callable[[Tensor, Tensor], Tensor]) -> None:
    """Merge one shard's candidate entries into `ex` (largest keys win) and cut windows for the new winners."""
    d_sae, n = ex.key.shape
    # Only entries at least as large as their latent's n-th kept key can enter the top n (ex.key is sorted, largest
    # first): the rest lose to all n kept ones in the merge below, so leaving them out keeps the same top n keys.
    # Among equal keys at the cut the merge's topk picks by its own order either way (on the shipped runs' 250k rows,
    # 1 of 163,840 top slots took another row of the same key).
    contender = (keys >= ex.key[:, n - 1][cols.long()]).nonzero().squeeze(1)
    rank = rank_within(cols[contender], keys[contender])
    best = contender[rank < n]
    best_rank = rank[rank < n]
    cand_key = torch.full((d_sae, n), -torch.inf)
    cand_idx = torch.full((d_sae, n), -1, dtype=torch.long)
    cand_key[cols[best], best_rank] = keys[best]
    cand_idx[cols[best], best_rank] = best
    merged_key, pick = torch.cat([ex.key, cand_key], dim=1).topk(n, dim=1)  # (F, n), pick in [0, 2n)
    from_new = (pick >= n) & torch.isfinite(merged_key)
    old = pick.clamp_max(n - 1)
    for name in ("act", "row", "context", "position", "tokens", "acts"):
        field = getattr(ex, name)
        idx = old if field.dim() == 2 else old.unsqueeze(2).expand(-1, -1, field.shape[2])
        setattr(ex, name, field.gather(1, idx))
    ex.key = merged_key
    lat, slot = from_new.nonzero(as_tuple=True)
    entry = cand_idx[lat, pick[lat, slot] - n]
    rows_local = local_rows[entry]
    ex.act[lat, slot] = vals[entry]
    ex.row[lat, slot] = rows_local + view.row0
    ex.context[lat, slot] = view.context[rows_local]
    ex.position[lat, slot] = view.position[rows_local].long()
    tokens, acts = view.windows(rows_local, lat, ex.window, lookup)
    ex.tokens[lat, slot] = tokens
    ex.acts[lat, slot] = acts


def _entry_lookup(rows: Tensor, cols: Tensor, vals: Tensor, d_sae: int) -> Callable[[Tensor, Tensor], Tensor]:
    """Activation at (row, latent) pairs from entries sorted by row then latent (0 where absent)."""
    keys = rows * d_sae + cols

    def lookup(q_rows: Tensor, q_cols: Tensor) -> Tensor:
        q = q_rows * d_sae + q_cols
        at = torch.searchsorted(keys, q).clamp_max(max(keys.numel() - 1, 0))
        if keys.numel() == 0:
            return torch.zeros(q.shape)
        return torch.where(keys[at] == q, vals[at], torch.zeros(()))

    return lookup


def _check_rows_match_contexts(path: Path, context: Tensor, position: Tensor, context_tokens: Tensor,
                               token_ids: Tensor) -> None:
    """Every row's token must be the one its (context, position) points at in the shard's stored contexts, or the
    examples would show another text."""
    n_ctx, ctx_len = context_tokens.shape
    inside = (context >= 0) & (context < n_ctx) & (position >= 0) & (position < ctx_len)
    if not inside.all() or not torch.equal(context_tokens[context, position], token_ids.to(context_tokens.dtype)):
        raise ValueError(
            f"{path}: its rows do not point at their tokens in the stored contexts (an extraction resumed with "
            f"another lm_batch, before msae fixed that); delete {path.parent} and extract it again"
        )


@torch.no_grad()
def stream(
    saes: Sequence[SAE],
    cache: Path,
    top_n: int = 20,
    sample_n: int = 20,
    window: int = 16,
    max_rows: int | None = None,
    chunk_rows: int = 8192,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
    max_norm: float | None = None,
    class_sums: int = 0,
) -> StreamResult:
    """Run every SAE over the cache once; examples are kept for the first SAE (and, over its first `class_sums`
    rows, the sums its latents' detection directions need).

    Rows whose norm exceeds `max_norm` count as rows with no latent active: one such row (a massive activation
    the cache's own filter let through) is otherwise the top example of hundreds of latents at once."""
    import time

    t0 = time.perf_counter()
    cache = Path(cache)
    # Every shard, training and held-out: the analysis describes the whole corpus.
    shards = first_shards(read_manifest(cache).shards, max_rows)
    total = sum(s.rows for s in shards) if max_rows is None else min(max_rows, sum(s.rows for s in shards))
    main = saes[0]
    top = Examples.empty(main.d_sae, top_n, window)
    sample = Examples.empty(main.d_sae, sample_n, window)
    parts = [{"counts": [], "cols": [], "vals": []} for _ in saes]
    generator = torch.Generator().manual_seed(seed)
    context_doc: dict[int, int] = {}
    context_parts: list[Tensor] = []
    row_contexts: list[Tensor] = []
    row_parts: list[Tensor] | None = []
    sums = None
    row0 = skipped = 0
    for _i, shard, t in iter_shards(cache, SHARD_TENSORS, shards, max_rows):
        acts, context, position = t["activations"], t["context"].long(), t["position"].long()
        n_take = acts.shape[0]
        context_tokens, context_start = t["context_tokens"], int(t["context_start"][0])
        if context_start != sum(c.shape[0] for c in context_parts):
            raise ValueError(f"{cache / shard.file}: contexts do not follow on from the previous shard")
        _check_rows_match_contexts(cache / shard.file, context - context_start, position, context_tokens,
                                   t["token_ids"])
        context_parts.append(context_tokens)
        row_contexts.append(context)
        if row_parts is not None and "context_part" in t:
            row_parts.append(t["context_part"].long()[context - context_start])
        else:
            row_parts = None
        if "context_doc" in t:
            context_doc.update({context_start + i: d for i, d in enumerate(t["context_doc"].tolist())})
        view = _ShardView(context, position, context_tokens, context_start, row0)
        too_large = torch.zeros(n_take, dtype=torch.bool)
        if max_norm is not None:
            too_large = acts.float().norm(dim=1) > max_norm
        skipped += int(too_large.sum())
        for i, sae in enumerate(saes):
            rows, cols, vals = encode_rows(sae, acts, chunk_rows).slice_rows(0, n_take)
            if too_large.any():
                kept = ~too_large[rows]
                rows, cols, vals = rows[kept], cols[kept], vals[kept]
            parts[i]["counts"].append(torch.bincount(rows, minlength=n_take))
            parts[i]["cols"].append(cols.to(torch.int32))
            parts[i]["vals"].append(vals)
            if i == 0 and row0 < class_sums:
                # The shard's rows up to the sample's end.
                ok = ~too_large & (torch.arange(n_take) < class_sums - row0)
                sums = add_class_sums(sums, acts.float(), rows, cols, ok, sae.d_sae)
            if i == 0:
                lookup = _entry_lookup(rows, cols, vals, sae.d_sae)
                _merge(top, cols, vals, vals, rows, view, lookup)
                priority = torch.rand(vals.shape, generator=generator)
                _merge(sample, cols, priority, vals, rows, view, lookup)
        row0 += n_take
        if progress is not None:
            progress(row0, total)
        pause_at(f"stream shard {len(row_contexts)}")
    sparse = []
    for sae, p in zip(saes, parts):
        counts = torch.cat(p["counts"]) if p["counts"] else torch.zeros(0, dtype=torch.long)
        row_ptr = torch.zeros(counts.numel() + 1, dtype=torch.long)
        row_ptr[1:] = counts.cumsum(0)
        sparse.append(Sparse(row_ptr, torch.cat(p["cols"]) if p["cols"] else torch.zeros(0, dtype=torch.int32),
                             torch.cat(p["vals"]) if p["vals"] else torch.zeros(0), sae.d_sae))
    context_tokens = torch.cat(context_parts) if context_parts else torch.zeros(0, 0, dtype=torch.int32)
    return StreamResult(sparse, top, sample, context_tokens, context_doc, row0, time.perf_counter() - t0,
                        skipped, torch.cat(row_contexts) if row_contexts else torch.zeros(0, dtype=torch.long),
                        torch.cat(row_parts) if row_parts else None, sums)


def add_class_sums(sums: ClassSums | None, x: Tensor, rows: Tensor, cols: Tensor, ok: Tensor, d_sae: int) -> ClassSums:
    """Add one shard's rows `x` (n, d) and their entries to the running sums (rows where `ok` is False left out)."""
    d = x.shape[1]
    if sums is None:
        sums = ClassSums(torch.zeros(d_sae, d, dtype=torch.float64), torch.zeros(d_sae, dtype=torch.long),
                         torch.zeros(d, dtype=torch.float64), torch.zeros(d, d, dtype=torch.float64), 0)
    x = x[ok]
    keep = ok[rows]
    new_row = torch.cumsum(ok.long(), 0) - 1
    a = torch.sparse_coo_tensor(torch.stack([cols[keep], new_row[rows[keep]]]), torch.ones(int(keep.sum())),
                                (d_sae, x.shape[0]), check_invariants=False)
    sums.by_latent += torch.sparse.mm(a, x).double()
    sums.count += torch.bincount(cols[keep], minlength=d_sae)
    for start in range(0, x.shape[0], 16384):  # float32 products, float64 totals: the mean is large next to the spread
        chunk = x[start : start + 16384]
        sums.total += chunk.double().sum(0)
        sums.outer += (chunk.T @ chunk).double()
    sums.n += x.shape[0]
    return sums


@torch.no_grad()
def encode_rows(sae: SAE, x: Tensor, chunk_rows: int = 8192) -> Sparse:
    """Active latents of the rows of `x` (for activations held in memory: toys, tests, small texts)."""
    counts, cols, vals = [], [], []
    for start in range(0, x.shape[0], chunk_rows):
        chunk = x[start : start + chunk_rows].to(sae.W_enc.device, sae.W_enc.dtype)
        e = sae.select(chunk)
        counts.append(torch.bincount(e.rows.cpu(), minlength=chunk.shape[0]))
        cols.append(e.cols.cpu().to(torch.int32))
        vals.append(e.vals.float().cpu())
    row_ptr = torch.zeros(x.shape[0] + 1, dtype=torch.long)
    if counts:
        row_ptr[1:] = torch.cat(counts).cumsum(0)
    return Sparse(row_ptr, torch.cat(cols) if cols else torch.zeros(0, dtype=torch.int32),
                  torch.cat(vals) if vals else torch.zeros(0), sae.d_sae)
