"""The gallery: one concrete absorption case and one splitting case, mined from the taxonomy benchmark and the
parent–child links, with what a reader needs to see them: a member × latent heatmap, decoder cosines, example
contexts and a one-line reading. `msae gallery` writes RUN/gallery.json; the Gallery page reads it.

- Absorption: a category whose parent latent is silent on some members while a latent specific to that member
  fires instead (taxonomy benchmark), shown beside the other SAE's latents for the same members. Clean when the
  parent latent fires on at least CLEAN_RECALL of the members' held-out occurrences and is absorbed on at least
  CLEAN_ABSORPTION of them: a real parent that loses some members.
- Splitting: a latent of the narrow vanilla SAE that the wide vanilla SAE represents by several latents (coverage
  links from narrow to wide over the same rows), beside the Matryoshka latent nearest it (decoder cosine) with its
  tree children. Clean when at least two wide latents each fire inside the narrow one (P(narrow | wide) >=
  CLEAN_COVERAGE) and together cover CLEAN_UNION of its firings.
When no case meets its bar, the closest one is shown with what it lacks."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from msae.activations import iter_shards
from msae.analysis import hierarchy, taxbench
from msae.analysis.features import histogram_edges, latent_stats
from msae.analysis.stream import encode_rows
from msae.config import LinkConfig
from msae.results import Gallery, GalleryCase, GalleryExample, TaxonomyBench
from msae.sae import SAE

CLEAN_ABSORPTION = 0.2
CLEAN_RECALL = 0.3
CLEAN_COVERAGE = 0.8
CLEAN_UNION = 0.7
SAMPLE_ROWS = 200_000
"""Cache rows the splitting case is mined from."""
MAX_ROWS = 10
MAX_CHILDREN = 4
WINDOW = 8
N_EXAMPLES = 3


def _decode(tokenizer, ids) -> list[str]:
    return [tokenizer.decode([int(t)]) for t in ids]


def _cos(W: list[Tensor]) -> list[list[float]]:
    rows = torch.stack([w / w.norm().clamp_min(1e-12) for w in W])
    return (rows @ rows.T).tolist()


def _mean_by_token(acts: np.ndarray, tokens: np.ndarray, rows_tokens: list[int]) -> list[list[float]]:
    """(len(rows_tokens), columns) mean activation of each column over the rows of each token."""
    return [acts[tokens == t].mean(axis=0).tolist() if (tokens == t).any() else [0.0] * acts.shape[1]
            for t in rows_tokens]


def _column_acts(by: taxbench.ByLatent, latents: list[int]) -> np.ndarray:
    """(n_rows, len(latents)) the latents' activations (`by`: one SAE's activations, grouped once per SAE)."""
    return np.stack([by.scores(l) for l in latents], axis=1) if latents else np.zeros((by.n_rows, 0))


@torch.no_grad()
def absorption_case(bench: TaxonomyBench, saes: dict[str, SAE], cache: Path, lm, layer: int, tax) -> GalleryCase | None:
    """The benchmark's most absorbed category (a clean one when there is one), with both SAEs' latents."""
    candidates = []
    for b in bench.saes:
        for c in b.categories:
            if c.members >= 4 and c.absorption > 0:
                clean = c.absorption >= CLEAN_ABSORPTION and c.recall >= CLEAN_RECALL
                candidates.append((clean, c.absorption, b.name, c))
    if not candidates:
        return None
    clean, _a, name, cat = max(candidates, key=lambda t: (t[0], t[1]))
    members = tax.members()[cat.offset]
    every = set().union(*(set(c.tokens) for c in tax.categories))
    occ = taxbench.corpus_occurrences(cache, torch.tensor(sorted(members), dtype=torch.long))
    pool = taxbench.build_pool(cache, lm, layer, members, every, occ, background=0)
    token = pool.token.numpy()
    columns, runs, latents, W = [], [], [], []
    order = [name] + [n for n in saes if n != name][:1]
    mats = []
    member_token = []  # per column of the first SAE: the member its latent is specific to (-1: the parent)
    for n in order:
        sae = saes[n].eval()
        sp = encode_rows(sae, pool.acts)
        by = taxbench.ByLatent(sp)
        specific = taxbench.member_specific(sp, pool.token)
        parent = next(c.parent_latent for b in bench.saes if b.name == n for c in b.categories
                      if c.offset == cat.offset)
        acts_p = by.scores(parent)
        # Member latents: the ones that fire on their own member most often where the parent is silent (the
        # absorbed occurrences), then by how often the parent is silent on their member.
        own = [(l, t) for l, t in specific.items() if t in members]
        own_acts = _column_acts(by, [l for l, _t in own])
        silent_share = {t: float((acts_p[token == t] == 0).mean()) for t in set(token.tolist())}
        took = {l: int(((acts_p == 0) & (own_acts[:, i] > 0) & (token == t)).sum()) for i, (l, t) in enumerate(own)}
        mine = sorted(own, key=lambda lt: (-took[lt[0]], -silent_share.get(lt[1], 0.0), lt[0]))
        mine = mine[: MAX_CHILDREN if n == name else 2]
        cols = [parent] + [l for l, _t in mine]
        if n == name:
            member_token = [-1] + [t for _l, t in mine]
        for i, l in enumerate(cols):
            role = "parent" if i == 0 else f"member latent of '{lm.tokenizer.decode([specific[l]]).strip()}'"
            columns.append(f"{n} #{l} ({role})")
            runs.append(n)
            latents.append(int(l))
            W.append(saes[n].W_dec[l].detach().float().cpu())
        mats.append(_column_acts(by, cols))
    acts = np.concatenate(mats, axis=1)
    main_parent = acts[:, 0]
    # Absorbed, as the benchmark counts it: the parent silent while a latent specific to the row's own member fires.
    own_fires = np.zeros(len(token), dtype=bool)
    for j, t in enumerate(member_token[1:], start=1):
        own_fires |= (acts[:, j] > 0) & (token == t)
    absorbed_row = (main_parent == 0) & own_fires
    tokens = sorted(set(token.tolist()))
    absorbed = {t: float(absorbed_row[token == t].mean()) for t in tokens}
    parent_mean = {t: float(main_parent[token == t].mean()) for t in tokens}
    # Rows: the absorbed members first (most absorbed on top), then the members the parent fires on most, so the
    # parent column reads dark above and lit below.
    top = sorted((t for t in tokens if absorbed[t] > 0), key=lambda t: (-absorbed[t], t))[: MAX_ROWS // 2]
    rest = sorted((t for t in tokens if t not in top), key=lambda t: (-parent_mean[t], t))
    shown = top + rest[: MAX_ROWS - len(top)]
    examples = []
    absorbed_rows = np.nonzero(absorbed_row)[0]
    for i in list(absorbed_rows)[:N_EXAMPLES]:
        ids, center = taxbench.pool_window(cache, pool, int(i), WINDOW)
        examples.append(GalleryExample(tokens=_decode(lm.tokenizer, ids), center=center, acts=acts[i].tolist()))
    why = (f"the parent latent fires on {cat.recall:.0%} of the members' held-out occurrences and is silent, with a "
           f"member latent firing instead, on {cat.absorption:.0%}" if clean else
           f"closest case: absorption {cat.absorption:.0%}, parent recall {cat.recall:.0%} (a clean case needs "
           f">= {CLEAN_ABSORPTION:.0%} and >= {CLEAN_RECALL:.0%})")
    reading = (f"'{cat.category}': {name}'s parent latent (first column) is dark on the top {len(top)} rows, "
               f"where a latent for that one member fires instead, and lit on the members below; the other SAE's "
               f"columns show whether it keeps the parent there." if top else
               f"'{cat.category}': on these occurrences no member latent of {name} fires where its parent latent "
               f"(first column) is silent, so the heatmap shows no absorption; the benchmark found it on other "
               f"occurrences.")
    return GalleryCase(kind="absorption", clean=clean, why=why, reading=reading,
                       rows=[lm.tokenizer.decode([t]) for t in shown], columns=columns, column_runs=runs,
                       column_latents=latents, heatmap=_mean_by_token(acts, token, shown), decoder_cos=_cos(W),
                       examples=examples)


def read_sample(cache: Path, n_rows: int) -> dict[str, Tensor]:
    """The first `n_rows` rows of the cache with their tokens and context windows' positions."""
    out = {"acts": [], "token": [], "context": [], "position": []}
    contexts = {}
    names = ["activations", "token_ids", "context", "position", "context_start", "context_tokens"]
    for _i, _shard, t in iter_shards(cache, names, max_rows=n_rows):
        out["acts"].append(t["activations"].float())
        out["token"].append(t["token_ids"].long())
        context = t["context"].long()
        out["context"].append(context)
        out["position"].append(t["position"].long())
        start = int(t["context_start"][0])
        for c in torch.unique(context).tolist():
            contexts[c] = t["context_tokens"][c - start]
    sample = {k: torch.cat(v) for k, v in out.items()}
    sample["contexts"] = contexts
    return sample


@torch.no_grad()
def splitting_case(saes: dict[str, SAE], roles: dict[str, str], cache: Path, lm, n_rows: int = SAMPLE_ROWS) -> GalleryCase | None:
    """The narrow latent the wide SAE splits into the most linked pieces, beside the Matryoshka latent nearest it
    and its tree children."""
    narrow, wide, mat = saes[roles["narrow"]].eval(), saes[roles["wide"]].eval(), saes[roles["matryoshka"]].eval()
    sample = read_sample(cache, n_rows)
    sp = {r: encode_rows(s, sample["acts"]) for r, s in (("narrow", narrow), ("wide", wide), ("matryoshka", mat))}
    stats = {r: latent_stats(x, histogram_edges(x.vals, 8)) for r, x in sp.items()}
    cfg = LinkConfig()
    links = hierarchy.cross_links(sp["narrow"], sp["wide"], stats["narrow"], stats["wide"], narrow.W_dec, wide.W_dec, cfg)
    linked = links[links["linked"]]
    if linked.empty:
        return None
    cover = hierarchy.coverage(sp["narrow"], sp["wide"], links)
    kids = linked.groupby("parent")
    strong = kids.apply(lambda g: int((g["coverage"] >= CLEAN_COVERAGE).sum()), include_groups=False)
    union = pd.Series(cover.numpy()).reindex(strong.index)
    clean_ids = strong[(strong >= 2) & (union >= CLEAN_UNION)].index
    pick_from = clean_ids if len(clean_ids) else strong.index
    score = strong[pick_from] + union[pick_from].fillna(0)
    n_latent = int(score.idxmax())
    clean = n_latent in set(clean_ids)
    children = linked[linked["parent"] == n_latent].sort_values("coverage", ascending=False)["child"].tolist()[:MAX_CHILDREN]
    # The Matryoshka latent nearest the narrow one, outside the last group, and its tree children.
    Wm = mat.W_dec.detach().float().cpu()
    Wn = narrow.W_dec[n_latent].detach().float().cpu()
    cos_m = (Wm @ Wn) / (Wm.norm(dim=1) * Wn.norm()).clamp_min(1e-12)
    cos_m[mat.widths[-2]:] = -2.0
    m_latent = int(cos_m.argmax())
    nested = hierarchy.nested_links(sp["matryoshka"], list(mat.widths), stats["matryoshka"], mat.W_dec, cfg)
    m_children = nested[nested["tree"] & (nested["parent"] == m_latent)].sort_values(
        "child_fires", ascending=False)["child"].tolist()[:MAX_CHILDREN]
    cols = [("narrow", n_latent, "split latent")] + [("wide", c, "piece") for c in children] + \
           [("matryoshka", m_latent, "nearest parent")] + [("matryoshka", c, "tree child") for c in m_children]
    by = {r: taxbench.ByLatent(sp[r]) for r in {r for r, _l, _role in cols}}
    acts = np.stack([by[r].scores(l) for r, l, _role in cols], axis=1)
    token = sample["token"].numpy()
    fires = acts[:, 0] > 0
    counts = pd.Series(token[fires]).value_counts()
    shown = [int(t) for t in counts.index[:MAX_ROWS]]
    examples = []
    seen_children = set()
    for i in np.nonzero(fires)[0]:
        firing_kid = tuple(np.nonzero(acts[i, 1 : 1 + len(children)] > 0)[0].tolist())
        if firing_kid in seen_children:
            continue
        seen_children.add(firing_kid)
        ctx = sample["contexts"][int(sample["context"][i])]
        pos = int(sample["position"][i])
        lo, hi = max(0, pos - WINDOW), min(int((ctx >= 0).sum()), pos + WINDOW + 1)
        examples.append(GalleryExample(tokens=_decode(lm.tokenizer, ctx[lo:hi].tolist()), center=pos - lo,
                                       acts=acts[i].tolist()))
        if len(examples) == N_EXAMPLES:
            break
    names = {r: roles[r] for r in roles}
    W = [saes[names[r]].W_dec[l].detach().float().cpu() for r, l, _role in cols]
    n_strong = int(strong[n_latent])
    why = (f"{n_strong} {names['wide']} latents each fire inside it (P(narrow | piece) >= {CLEAN_COVERAGE}) and "
           f"together cover {float(union[n_latent]):.0%} of its firings" if clean else
           f"closest case: {n_strong} strong pieces covering {float(union[n_latent]):.0%} (a clean case needs 2 "
           f"pieces with P >= {CLEAN_COVERAGE} covering >= {CLEAN_UNION:.0%})")
    reading = (f"{names['narrow']} #{n_latent} (first column) fires on all these tokens; {names['wide']} splits it "
               f"into pieces that each take some of them, while the Matryoshka keeps one latent with children below it.")
    return GalleryCase(kind="splitting", clean=clean, why=why, reading=reading,
                       rows=_decode(lm.tokenizer, shown),
                       columns=[f"{names[r]} #{l} ({role})" for r, l, role in cols],
                       column_runs=[names[r] for r, _l, _role in cols], column_latents=[int(l) for _r, l, _ro in cols],
                       heatmap=_mean_by_token(acts, token, shown), decoder_cos=_cos(W), examples=examples)


def build(saes: dict[str, SAE], roles: dict[str, str], cache: Path, lm, layer: int, tax,
          bench: TaxonomyBench | None) -> Gallery:
    """Both cases for the runs in `roles` (matryoshka, wide and, for splitting, narrow: role -> run name)."""
    t0 = time.perf_counter()
    cases, missing = [], {}
    if bench is None:
        missing["absorption"] = "no taxonomy benchmark for this run: run msae taxonomy-bench first"
    else:
        case = absorption_case(bench, {n: saes[n] for n in saes if n in {b.name for b in bench.saes}}, cache, lm,
                               layer, tax)
        if case is None:
            missing["absorption"] = "no category with a member absorbed in either SAE"
        else:
            cases.append(case)
    if "narrow" not in roles:
        missing["splitting"] = "needs a narrow vanilla SAE (--narrow) beside the wide one"
    else:
        case = splitting_case(saes, roles, cache, lm)
        if case is None:
            missing["splitting"] = "the wide SAE has no latent linked under a narrow one on the sampled rows"
        else:
            cases.append(case)
    return Gallery(model=lm.name, layer=layer, runs=dict(roles), cases=cases, missing=missing,
                   seconds=round(time.perf_counter() - t0, 1))
