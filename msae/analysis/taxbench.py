"""A taxonomy benchmark on the real model: WordNet's noun categories (msae.taxonomy) as ground truth for parents.

First-letter absorption needs a model of 1B parameters or more; what a 135M model does have is the categories
of the nouns it reads. For every category chosen, its member tokens' occurrences in the corpus (templates fill in
for tokens the corpus lacks) are the positives, the occurrences of every other benchmark token and a sample of
random corpus rows the negatives. Per SAE:

- parent recall: the latent that detects the category best on the selection half of the occurrences (even
  contexts), by average precision, and its average precision on the held-out half (odd contexts): threshold-free;
- absorption: the share of held-out member occurrences where that latent is silent and a latent specific to the
  member's token fires instead; and its two parts: the share where such a member latent fires at all, and among
  those, the share where the parent is silent (which does not grow with the number of member latents);
- splitting: latents specific to one member token (at least half of their firings on it), per category;
- labels: each latent's best category by F1 over the whole pool (labelled at F1 >= label_f1), and the precision of
  the SAE's tree links against WordNet ancestry (the parent's category is the child's or an ancestor of it),
  beside a null that replaces each parent with a random labelled latent of the same group.

Intervals are bootstrap percentiles: over categories and, for average precision, over member tokens within each
category too. A token that belongs to two chosen categories neither of which contains the other ("bass": fish,
instrument) is left out of the benchmark, and counted. Every size and threshold is a TaxonomyBenchConfig field,
saved in the result."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from msae.activations import context_tokens_at, iter_shards, read_manifest, read_rows, read_shard
from msae.analysis.stream import Sparse, encode_rows
from msae.analysis.validate import bootstrap_mean
from msae.config import TaxonomyBenchConfig
from msae.results import CategoryResult, TaxonomyBench, Interval, TaxonomyBenchSAE
from msae.sae import SAE
from msae.taxonomy import Category, Taxonomy

DEFAULTS = TaxonomyBenchConfig()
PLACE_TENSORS = ("token_ids", "context", "position")
"""What finding rows by token needs of a shard: each row's token and its place in the corpus."""
Progress = Callable[[str, int, int], None]
"""(stage, done, total): called as each stage advances (a long benchmark otherwise says nothing for minutes)."""
Count = Callable[[int, int], None]
"""(done, total) of one stage."""
TEMPLATES = ("They talked about the{w} for a long time.", "In the old story, the{w} came back at night.")
"""The member token goes where {w} is (its own leading space included); the first sentence is in the selection
half, the second in the held-out half."""


@dataclass
class Pool:
    """The benchmark's rows: member-token occurrences and background rows, with their activations."""

    acts: Tensor
    """(n, d_in) float32."""
    token: Tensor
    """(n,) int64 token id."""
    selection: Tensor
    """(n,) bool: in the selection half (even contexts; the first template), else held out."""
    background: Tensor
    """(n,) bool: a random corpus row, not chosen for its token."""
    from_template: int
    origin: pd.DataFrame | None = None
    """Where each corpus row is (shard, row, context, position), in order; the template rows follow them."""
    template_ids: list[list[int]] | None = None
    """The template rows' sentences as token ids, with the member at `template_pos`."""
    template_pos: list[int] | None = None


def choose_categories(tax: Taxonomy, available: set[int],
                      cfg: TaxonomyBenchConfig = DEFAULTS) -> list[tuple[Category, set[int]]]:
    """Up to cfg.categories categories of cfg.category_size with cfg.min_members available members, largest
    coverage first, no two overlapping by more than cfg.max_overlap; with each one's full member set."""
    members = tax.members()
    candidates = []
    for c in tax.categories:
        if cfg.category_size[0] <= c.size <= cfg.category_size[1]:
            have = members[c.offset] & available
            if len(have) >= cfg.min_members:
                candidates.append((len(have), c.offset, c))
    chosen: list[tuple[Category, set[int]]] = []
    for _n, _o, c in sorted(candidates, key=lambda t: (-t[0], t[1])):
        mine = members[c.offset]
        if all(len(mine & other) / len(mine | other) <= cfg.max_overlap for _c, other in chosen):
            chosen.append((c, mine))
        if len(chosen) == cfg.categories:
            break
    return chosen


def ambiguous_tokens(chosen: list[tuple[Category, set[int]]], ancestors: dict[int, set[int]]) -> set[int]:
    """Tokens in two chosen categories of which neither is the other's ancestor."""
    by_token: dict[int, list[int]] = {}
    for c, mine in chosen:
        for t in mine:
            by_token.setdefault(t, []).append(c.offset)
    out = set()
    for t, offs in by_token.items():
        for i, a in enumerate(offs):
            for b in offs[i + 1 :]:
                if a not in ancestors.get(b, set()) and b not in ancestors.get(a, set()):
                    out.add(t)
    return out


def corpus_occurrences(cache: Path, tokens: Tensor, progress: Count | None = None,
                       cfg: TaxonomyBenchConfig = DEFAULTS) -> pd.DataFrame:
    """Rows of the cache whose token is in `tokens`: at most cfg.per_token a token (a sample seeded with cfg.seed);
    columns shard, row (in the shard), token, context, position."""
    g = torch.Generator().manual_seed(cfg.seed)
    found = []
    n_shards = len(read_manifest(cache).shards)
    for i, _shard, t in iter_shards(cache, PLACE_TENSORS):
        ids, context, position = t["token_ids"].long(), t["context"].long(), t["position"].long()
        hit = torch.isin(ids, tokens).nonzero().squeeze(1)
        found.append(pd.DataFrame({"shard": i, "row": hit.numpy(), "token": ids[hit].numpy(),
                                   "context": context[hit].numpy(), "position": position[hit].numpy()}))
        if progress is not None:
            progress(i + 1, n_shards)
    occ = (pd.concat(found, ignore_index=True) if found
           else pd.DataFrame(columns=["shard", "row", "token", "context", "position"]))
    occ["key"] = torch.rand(len(occ), generator=g).numpy()
    occ = occ.sort_values(["token", "key"]).groupby("token").head(cfg.per_token)
    return occ.drop(columns="key").reset_index(drop=True)


def background_rows(cache: Path, exclude: Tensor, n: int, seed: int = 0) -> pd.DataFrame:
    """`n` random rows of the cache whose token is not in `exclude`."""
    g = torch.Generator().manual_seed(seed + 1)
    shards = read_manifest(cache).shards
    total = sum(s.rows for s in shards)
    picks = torch.randperm(total, generator=g)[: 2 * n].sort().values
    starts = np.cumsum([0] + [s.rows for s in shards])
    out = []
    for i, shard in enumerate(shards):
        local = picks[(picks >= starts[i]) & (picks < starts[i + 1])] - int(starts[i])
        if local.numel() == 0:
            continue
        t = read_shard(cache, shard, PLACE_TENSORS, local)
        ids, context, position = t["token_ids"].long(), t["context"].long(), t["position"].long()
        keep = ~torch.isin(ids, exclude)
        out.append(pd.DataFrame({"shard": i, "row": local[keep].numpy(), "token": ids[keep].numpy(),
                                 "context": context[keep].numpy(), "position": position[keep].numpy()}))
    frame = pd.concat(out, ignore_index=True)
    return frame.sample(n=min(n, len(frame)), random_state=seed).sort_index()


def pool_window(cache: Path, pool: Pool, index: int, window: int) -> tuple[list[int], int]:
    """The token ids around pool row `index` (its corpus context, or its template sentence) and its place there."""
    n_corpus = len(pool.origin)
    if index >= n_corpus:
        ids, pos = pool.template_ids[index - n_corpus], pool.template_pos[index - n_corpus]
    else:
        o = pool.origin.iloc[index]
        row = context_tokens_at(cache, int(o["shard"]), int(o["context"]))
        ids, pos = [t for t in row.tolist() if t >= 0], int(o["position"])
    lo = max(0, pos - window)
    return ids[lo : pos + window + 1], pos - lo


def frame_activations(cache: Path, frame: pd.DataFrame) -> Tensor:
    """The activations (float32) of the frame's (shard, row) pairs, in the frame's order."""
    if frame.empty:
        return torch.zeros(0, 0)
    return read_rows(cache, torch.tensor(frame["shard"].to_numpy(dtype="int64")),
                      torch.tensor(frame["row"].to_numpy(dtype="int64"))).float()


@torch.no_grad()
def template_rows(lm, layer: int, tokens: list[int],
                  progress: Count | None = None) -> tuple[Tensor, Tensor, Tensor, list[list[int]], list[int]]:
    """Activations of each token in each of TEMPLATES: (acts (2·T, d), token ids, selection flags, the sentences'
    token ids, the member's position in each)."""
    from msae.activations import pad_batch
    from msae.lm import residual_after

    seqs, where, toks, sel = [], [], [], []
    for ti, template in enumerate(TEMPLATES):
        before, after = template.split("{w}")
        pre = lm.tokenizer(before, add_special_tokens=False)["input_ids"]
        post = lm.tokenizer(after, add_special_tokens=False)["input_ids"]
        for t in tokens:
            seqs.append(pre + [t] + post)
            where.append(len(pre))
            toks.append(t)
            sel.append(ti == 0)
    out = []
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    length = max((len(s) for s in seqs), default=1)
    for start in range(0, len(seqs), 64):
        batch = seqs[start : start + 64]
        ids, mask = pad_batch(batch, length, pad)
        resid = residual_after(lm, ids, mask, layer).float().cpu()
        out.append(resid[torch.arange(len(batch)), torch.tensor(where[start : start + 64])])
        if progress is not None:
            progress(min(start + 64, len(seqs)), len(seqs))
    acts = torch.cat(out) if out else torch.zeros(0, lm.d_model)
    return acts, torch.tensor(toks, dtype=torch.long), torch.tensor(sel, dtype=torch.bool), seqs, where


def build_pool(cache: Path, lm, layer: int, tokens: set[int], exclude: set[int], occurrences: pd.DataFrame,
               background: int | None = None, progress: Count | None = None,
               cfg: TaxonomyBenchConfig = DEFAULTS) -> Pool:
    """The `occurrences` (corpus_occurrences) of `tokens`, templates for those with fewer than
    cfg.min_occurrences, and `background` (default cfg.background_rows) rows whose token is not in `exclude`."""
    occ = occurrences[occurrences["token"].isin(list(tokens))]
    counts = occ["token"].value_counts()
    rare = [t for t in sorted(tokens) if counts.get(t, 0) < cfg.min_occurrences]
    occ = occ[~occ["token"].isin(rare)]
    n_back = cfg.background_rows if background is None else background
    back = (background_rows(cache, torch.tensor(sorted(exclude), dtype=torch.long), n_back, cfg.seed) if n_back
            else None)
    frame = pd.concat([occ, back], ignore_index=True) if back is not None else occ.reset_index(drop=True)
    acts = frame_activations(cache, frame)
    t_acts, t_tok, t_sel, t_ids, t_pos = template_rows(lm, layer, rare, progress)
    n_occ = len(occ)
    return Pool(
        acts=torch.cat([acts, t_acts]),
        token=torch.cat([torch.tensor(frame["token"].to_numpy(), dtype=torch.long), t_tok]),
        selection=torch.cat([torch.tensor(frame["context"].to_numpy() % 2 == 0), t_sel]),
        background=torch.cat([torch.arange(len(frame)) >= n_occ, torch.zeros(len(t_tok), dtype=torch.bool)]),
        from_template=int(t_tok.numel()), origin=frame[["shard", "row", "context", "position"]],
        template_ids=t_ids, template_pos=t_pos)


def average_precision(vals: np.ndarray, rel: np.ndarray, n_pos: float | np.ndarray,
                      weight: np.ndarray | None = None) -> np.ndarray | float:
    """Average precision of a latent as a detector, from the rows where it fires: `vals` its activations there,
    `rel` whether each is a positive, `n_pos` all positives (silent rows are never retrieved, so positives it
    misses only count here). With `weight` (reps, m) and `n_pos` (reps,), a row counts as often as its weight (a
    resampled member drawn twice counts twice); returns (reps,) then."""
    order = np.argsort(-vals, kind="stable")
    rel = rel[order]
    w = np.ones((1, len(vals))) if weight is None else weight[:, order]
    w_pos = np.where(rel, w, 0.0)
    cum_pos = np.cumsum(w_pos, axis=1)
    cum_all = np.cumsum(w, axis=1)
    precision = np.divide(cum_pos, cum_all, out=np.zeros_like(cum_pos), where=cum_all > 0)
    ap = (w_pos * precision).sum(axis=1) / np.maximum(n_pos, 1e-12)
    return ap if weight is not None else float(ap[0])


class ByLatent:
    """A pool's sparse activations grouped by latent: each latent's rows and values."""

    def __init__(self, sp: Sparse):
        rows, cols, vals = sp.slice_rows(0, sp.n_rows)
        order = torch.argsort(cols, stable=True)
        self.rows, self.vals = rows[order].numpy(), vals[order].numpy()
        self.ptr = np.concatenate([[0], torch.bincount(cols, minlength=sp.d_sae).cumsum(0).numpy()])
        self.entry_rows, self.entry_cols = rows.numpy(), cols.numpy()
        self.n_rows = sp.n_rows

    def of(self, latent: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.ptr[latent], self.ptr[latent + 1]
        return self.rows[a:b], self.vals[a:b]

    def scores(self, latent: int) -> np.ndarray:
        """(n_rows,) its activation on every row, 0 where silent."""
        out = np.zeros(self.n_rows)
        r, v = self.of(latent)
        out[r] = v
        return out

    def ap(self, latent: int, positive: np.ndarray, half: np.ndarray) -> float:
        """Its average precision for `positive` over the rows of `half`."""
        r, v = self.of(latent)
        m = half[r]
        return average_precision(v[m], positive[r[m]], float((positive & half).sum()))


def member_specific(sp: Sparse, token: Tensor, cfg: TaxonomyBenchConfig = DEFAULTS) -> dict[int, int]:
    """Latent -> the token it is specific to (cfg.member_specific of its firings, at least cfg.member_min_fires)."""
    rows, cols, _ = sp.slice_rows(0, sp.n_rows)
    frame = pd.DataFrame({"latent": cols.numpy(), "token": token[rows].numpy()})
    fires = frame.groupby("latent").size()
    top = frame.groupby(["latent", "token"]).size().reset_index(name="n").sort_values("n", ascending=False)
    top = top.drop_duplicates("latent").set_index("latent")
    share = top["n"] / fires[top.index]
    keep = (share >= cfg.member_specific) & (fires[top.index] >= cfg.member_min_fires)
    return {int(l): int(top.loc[l, "token"]) for l in top.index[keep]}


def label_latents(sp: Sparse, token: Tensor, tax: Taxonomy,
                  cfg: TaxonomyBenchConfig = DEFAULTS) -> dict[int, tuple[int, float]]:
    """Latent -> (its best category's offset, F1) over the pool, for latents reaching cfg.label_f1 (categories of
    at most cfg.label_max_size tokens)."""
    members = tax.members()
    offsets = [c.offset for c in tax.categories if c.size <= cfg.label_max_size]
    tok_index = {int(t): i for i, t in enumerate(torch.unique(token).tolist())}
    inc_rows, inc_cols = [], []
    for ci, off in enumerate(offsets):
        for t in members[off]:
            if t in tok_index:
                inc_rows.append(tok_index[t])
                inc_cols.append(ci)
    n_tok, n_cat = len(tok_index), len(offsets)
    incidence = torch.sparse_coo_tensor(torch.tensor([inc_rows, inc_cols]), torch.ones(len(inc_rows)),
                                        (n_tok, n_cat), check_invariants=False).coalesce()
    tok_of_row = torch.tensor([tok_index[int(t)] for t in token.tolist()])
    pos_per_cat = torch.sparse.mm(incidence.t(), torch.bincount(tok_of_row, minlength=n_tok).float().unsqueeze(1))
    rows, cols, _ = sp.slice_rows(0, sp.n_rows)
    fires = torch.bincount(cols, minlength=sp.d_sae).float()
    firing = torch.sparse_coo_tensor(torch.stack([cols, tok_of_row[rows]]), torch.ones(cols.numel()),
                                     (sp.d_sae, n_tok), check_invariants=False).coalesce()
    tp = torch.sparse.mm(firing, incidence.to_dense())  # (d_sae, categories)
    f1 = 2 * tp / (fires.unsqueeze(1) + pos_per_cat.squeeze(1).unsqueeze(0)).clamp_min(1)
    best, which = f1.max(dim=1)
    return {l: (offsets[int(which[l])], float(best[l])) for l in (best >= cfg.label_f1).nonzero().squeeze(1).tolist()}


def link_precision(links: pd.DataFrame | None, labels: dict[int, tuple[int, float]], ancestors: dict[int, set[int]],
                   groups: Tensor, seed: int = 0, which: str = "tree") -> tuple[Interval | None, Interval | None]:
    """Links with both ends labelled (`which`: the table's "tree" or its "linked" column, the DAG): share whose
    parent's category is the child's or an ancestor of it, and the same with each parent swapped for a random
    labelled latent of its group (the null)."""
    if links is None or links.empty:
        return None, None
    measured = links[links[which] & links["parent"].isin(list(labels)) & links["child"].isin(list(labels))]
    if measured.empty:
        return None, None

    def correct(p: int, c: int) -> float:
        lp, lc = labels[p][0], labels[c][0]
        return float(lp == lc or lp in ancestors.get(lc, set()))

    hits = torch.tensor([correct(p, c) for p, c in zip(measured["parent"], measured["child"])])
    g = torch.Generator().manual_seed(seed)
    by_group: dict[int, list[int]] = {}
    for l in labels:
        by_group.setdefault(int(groups[l]), []).append(l)
    null = []
    for p, c in zip(measured["parent"], measured["child"]):
        pool = by_group[int(groups[p])]
        pick = pool[int(torch.randint(len(pool), (1,), generator=g))]
        null.append(correct(pick, c))
    return bootstrap_mean(hits, seed=seed), bootstrap_mean(torch.tensor(null), seed=seed)


def _bootstrap_members(by: ByLatent, latent: int, positive: np.ndarray, half: np.ndarray, token: np.ndarray,
                       reps: int, rng: np.random.Generator) -> np.ndarray:
    """(reps,) the latent's average precision over `half` with the category's member tokens resampled (with
    replacement) in each rep: a member drawn twice counts its occurrences twice."""
    members = np.unique(token[positive & half])
    if len(members) == 0:
        return np.full(reps, np.nan)
    draws = rng.integers(0, len(members), size=(reps, len(members)))
    mult = np.zeros((reps, len(members)))
    np.add.at(mult, (np.repeat(np.arange(reps), len(members)), draws.ravel()), 1.0)
    per_member = np.bincount(np.searchsorted(members, token[positive & half]), minlength=len(members))
    n_pos = mult @ per_member  # (reps,) weighted positives
    r, v = by.of(latent)
    m = half[r]
    r, v = r[m], v[m]
    rel = positive[r]
    weight = np.ones((reps, len(r)))
    weight[:, rel] = mult[:, np.searchsorted(members, token[r[rel]])]
    return average_precision(v, rel, n_pos, weight)


def measure_sae(name: str, sae: SAE, pool: Pool, chosen: list[tuple[Category, set[int]]], excluded: set[int],
                tax: Taxonomy, ancestors: dict[int, set[int]], links: pd.DataFrame | None,
                cfg: TaxonomyBenchConfig = DEFAULTS,
                progress: Count | None = None) -> tuple[TaxonomyBenchSAE, np.ndarray]:
    """One SAE's figures, and its (categories, reps) member-resampled held-out APs for paired comparisons."""
    seed = cfg.seed
    sae.eval()
    sp = encode_rows(sae, pool.acts)
    by = ByLatent(sp)
    sel = pool.selection.numpy()
    held = ~sel
    token = pool.token.numpy()
    background = pool.background.numpy()
    specific = member_specific(sp, pool.token, cfg)
    # Rows where a latent specific to the row's own token fires (absorption's "member latent fires instead").
    spec_of = np.full(sae.d_sae, -1)
    for latent, tok in specific.items():
        spec_of[latent] = tok
    own = spec_of[by.entry_cols] == token[by.entry_rows]
    member_fires = np.zeros(sp.n_rows, dtype=bool)
    member_fires[by.entry_rows[own]] = True
    rng = np.random.default_rng(seed)
    results, reps_ap = [], []
    per_width: list[list[float]] = [[] for _ in sae.widths]
    for c, mine in chosen:
        positive = np.isin(token, np.array(sorted(mine - excluded))) & ~background
        # Candidates: latents firing on at least 3 positives of the selection half.
        on = positive[by.entry_rows] & sel[by.entry_rows]
        counts = np.bincount(by.entry_cols[on], minlength=sae.d_sae)
        cand = np.nonzero(counts >= 3)[0].tolist() or [int(np.argmax(counts))]
        ap_sel = {l: by.ap(l, positive, sel) for l in cand}
        best = max(cand, key=lambda l: (ap_sel[l], -l))
        for wi, w in enumerate(sae.widths):
            inside = [l for l in cand if l < w]
            per_width[wi].append(by.ap(max(inside, key=lambda l: (ap_sel[l], -l)), positive, held) if inside else 0.0)
        pos_held = positive & held
        n_pos = int(pos_held.sum())
        fires = by.scores(best) > 0
        reps_ap.append(_bootstrap_members(by, best, positive, held, token, cfg.bootstrap_reps, rng))
        results.append(CategoryResult(
            category=c.name, offset=c.offset, members=len(np.unique(token[pos_held])), positives=n_pos,
            parent_latent=int(best), average_precision=by.ap(best, positive, held),
            recall=float(fires[pos_held].mean()) if n_pos else 0.0,
            absorption=float((pos_held & ~fires & member_fires).sum() / n_pos) if n_pos else 0.0,
            member_latents=sum(1 for t in specific.values() if t in mine),
            member_fired=float((pos_held & member_fires).sum() / n_pos) if n_pos else 0.0))
        if progress is not None:
            progress(len(results), len(chosen))
    labels = label_latents(sp, pool.token, tax, cfg)
    groups = sae.group_of(torch.arange(sae.d_sae)).cpu()
    precision, null = link_precision(links, labels, ancestors, groups, seed)
    dag_precision, dag_null = link_precision(links, labels, ancestors, groups, seed, which="linked")
    reps = np.stack(reps_ap) if reps_ap else np.zeros((0, cfg.bootstrap_reps))
    bench = TaxonomyBenchSAE(
        name=name, d_sae=sae.d_sae, average_precision=_two_level(reps, [r.average_precision for r in results], rng),
        average_precision_per_width=[float(np.mean(v)) if v else None for v in per_width],
        absorption=bootstrap_mean(torch.tensor([r.absorption for r in results]), seed=seed),
        member_latents=bootstrap_mean(torch.tensor([float(r.member_latents) for r in results]), seed=seed),
        labelled_latents=len(labels), link_precision=precision, link_null=null, categories=results,
        dag_link_precision=dag_precision, dag_link_null=dag_null,
        member_fired=bootstrap_mean(torch.tensor([r.member_fired for r in results]), seed=seed),
        absorption_given_member=bootstrap_mean(torch.tensor(
            [g for g in map(absorbed_given_member, results) if g is not None]), seed=seed))
    return bench, reps


def absorbed_given_member(r: CategoryResult) -> float | None:
    """Where a member latent fires on the category's held-out occurrences, the share on which its parent latent is
    silent (None where no member latent fires, or in a result made before member_fired was measured)."""
    return r.absorption / r.member_fired if r.member_fired else None


def _two_level(reps: np.ndarray, point: Sequence[float], rng: np.random.Generator) -> Interval | None:
    """Mean over categories with an interval from resampling categories and, within each, member tokens:
    `reps` (categories, R) holds each category's member-resampled values."""
    if len(point) == 0:
        return None
    n, r = reps.shape
    pick = rng.integers(0, n, size=(r, n))
    means = np.nanmean(reps[pick, np.arange(r)[:, None]], axis=1)
    low, high = np.nanpercentile(means, [2.5, 97.5])
    return Interval(mean=float(np.mean(point)), low=float(low), high=float(high), n=n)


DIFFERENCE_MEASURES = {"average_precision": "average precision", "absorption": "absorption",
                       "member_latents": "member latents", "member_fired": "member latent fires",
                       "absorption_given_member": "absorption where a member latent fires"}
"""The paired differences (the run's SAE − each other one) a benchmark records, by field, as their keys name them."""


def difference_key(first: str, other: str, measure: str) -> str:
    """The key of TaxonomyBench.differences for `first` − `other` on `measure` (a DIFFERENCE_MEASURES value)."""
    return f"{first} - {other} {measure}"


def paired_difference(a: np.ndarray, b: np.ndarray, pa: Sequence[float], pb: Sequence[float],
                      seed: int = 0) -> Interval | None:
    """Mean over categories of AP(a) - AP(b), resampling categories (the same ones for both) and members."""
    if len(pa) == 0:
        return None
    return _two_level(a - b, [x - y for x, y in zip(pa, pb)], np.random.default_rng(seed + 7))


@dataclass
class Prepared:
    """What every SAE of a benchmark is measured on (`prepare`)."""

    chosen: list[tuple[Category, set[int]]]
    """The categories and their full member sets."""
    ambiguous: set[int]
    """Tokens left out (ambiguous_tokens)."""
    ancestors: dict[int, set[int]]
    pool: Pool


def _stage(progress: Progress | None, name: str) -> Count | None:
    return None if progress is None else (lambda done, total: progress(name, done, total))


def prepare(cache: Path, lm, layer: int, tax: Taxonomy, cfg: TaxonomyBenchConfig = DEFAULTS,
            progress: Progress | None = None) -> Prepared:
    """The categories the cache's text can measure and the pool of their members' occurrences (the slow part: a
    pass over the cache's shards and the template sentences through the model), shared by every SAE measured."""
    ancestors = tax.ancestors()
    every = set().union(*(set(c.tokens) for c in tax.categories))
    occurrences = corpus_occurrences(cache, torch.tensor(sorted(every), dtype=torch.long),
                                     _stage(progress, "member occurrences (cache shards)"), cfg)
    counts = occurrences["token"].value_counts()
    # Categories are chosen by their members that the corpus holds; templates only fill in the rest.
    chosen = choose_categories(tax, {int(t) for t, n in counts.items() if n >= cfg.min_occurrences}, cfg)
    ambiguous = ambiguous_tokens(chosen, ancestors)
    tokens = set().union(*(m for _c, m in chosen)) - ambiguous
    pool = build_pool(cache, lm, layer, tokens, every, occurrences, progress=_stage(progress, "template sentences"),
                      cfg=cfg)
    return Prepared(chosen, ambiguous, ancestors, pool)


PAIRED: dict[str, Callable[[CategoryResult], float | None]] = {
    "absorption": lambda r: r.absorption, "member_latents": lambda r: r.member_latents,
    "member_fired": lambda r: r.member_fired, "absorption_given_member": absorbed_given_member}
"""The per-category figures whose paired differences resample categories (average precision also resamples
members); a category counts where both SAEs have the figure (absorption_given_member: a member latent fires in
both)."""


def run_bench(saes: dict[str, SAE], cache: Path, lm, layer: int, tax: Taxonomy,
              links: dict[str, pd.DataFrame | None], cfg: TaxonomyBenchConfig = DEFAULTS,
              progress: Progress | None = None, prepared: Prepared | None = None) -> TaxonomyBench:
    """The benchmark for every SAE of `saes` (the first is the run's; differences are taken against it);
    `progress` hears each stage: the cache's shards read, the template sentences run, each SAE's categories.
    `prepared` (`prepare` of the same cache, model, layer, taxonomy and config) saves building the pool again when
    several calls share it; `seconds` then counts the SAEs' part only."""
    t0 = time.perf_counter()
    prepared = prepared or prepare(cache, lm, layer, tax, cfg, progress)
    chosen, ambiguous, pool = prepared.chosen, prepared.ambiguous, prepared.pool
    out, reps = [], {}
    for name, sae in saes.items():
        bench, reps[name] = measure_sae(name, sae, pool, chosen, ambiguous, tax, prepared.ancestors, links.get(name),
                                        cfg, _stage(progress, f"{name} (categories)"))
        out.append(bench)
    differences = {}
    first = out[0]
    for other in out[1:]:
        key = difference_key(first.name, other.name, DIFFERENCE_MEASURES["average_precision"])
        differences[key] = paired_difference(reps[first.name], reps[other.name],
                                             [r.average_precision for r in first.categories],
                                             [r.average_precision for r in other.categories], cfg.seed)
        for field_, get in PAIRED.items():  # the same categories for both, resampled together
            values = [(get(a), get(b)) for a, b in zip(first.categories, other.categories)]
            pairs = [float(x) - float(y) for x, y in values if x is not None and y is not None]
            differences[difference_key(first.name, other.name, DIFFERENCE_MEASURES[field_])] = bootstrap_mean(
                torch.tensor(pairs), seed=cfg.seed)
    return TaxonomyBench(
        model=lm.name, layer=layer, taxonomy=f"{tax.source} ({tax.tokenizer})", categories=len(chosen),
        occurrences=int((~pool.background).sum()), from_templates=pool.from_template,
        background_rows=int(pool.background.sum()), ambiguous_tokens=len(ambiguous),
        split="occurrences: even contexts (and the first template) choose each category's parent latent, odd "
              "contexts (and the second template) measure it", saes=out, differences=differences,
        seconds=round(time.perf_counter() - t0, 1), config=cfg)
