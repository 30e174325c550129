"""The gallery: one concrete absorption case and one splitting case, mined from the taxonomy benchmark and the
parent–child links, with what a reader needs to see them: a member × latent heatmap, decoder cosines, example
contexts and a one-line reading. `msae gallery` writes RUN/gallery.json; the Gallery page reads it. The bars
below are GalleryConfig's fields, saved in gallery.json beside the cases.

- Absorption: a category whose parent latent is silent on some members while a latent specific to that member
  fires instead (taxonomy benchmark), shown beside the other SAE's latents for the same members. Clean when the
  parent latent fires on at least clean_recall of the members' held-out occurrences and is absorbed on at least
  clean_absorption of them: a real parent that loses some members.
- Splitting: a latent of the narrow vanilla SAE that the wide vanilla SAE represents by several latents (coverage
  links from narrow to wide over the same rows), beside the Matryoshka latent nearest it (decoder cosine) with its
  tree children. Clean when the narrow latent is specific (fires on at most specific_density of the tokens), no
  wide latent keeps it whole (fires on kept_whole of its tokens), and at least two wide latents each fire inside
  it (P(narrow | wide) >= clean_coverage) and together cover clean_union of its firings.
- Member latents of an absorption case must be specific too (specific_density): a dense latent that happens to fire
  on a member is not that member's latent.
When no case meets its bar, the closest one is shown, and its reading says plainly that it is not a clean case and
what it lacks."""

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
from msae.analysis.stream import Sparse, encode_rows
from msae.config import GalleryConfig, LinkConfig
from msae.results import Gallery, GalleryCase, GalleryExample, TaxonomyBench
from msae.sae import SAE

def splitting_verdict(density: float, n_strong: int, union: float, kept_whole: float,
                      cfg: GalleryConfig) -> tuple[bool, str]:
    """Whether a narrow latent is a clean splitting case, and why (or what it lacks), in words: `density` its
    share of tokens, `n_strong` wide latents firing inside it, `union` the share of its firings they cover,
    `kept_whole` the largest share of its firings one wide latent fires on."""
    lacks = []
    if density > cfg.specific_density:
        lacks.append(f"it fires on {density:.1%} of tokens (a specific latent: at most {cfg.specific_density:.0%})")
    if kept_whole >= cfg.kept_whole:
        lacks.append(f"one wide latent fires on {kept_whole:.0%} of its tokens and so keeps it whole (at most "
                     f"{cfg.kept_whole:.0%} allowed)")
    if n_strong < 2 or union < cfg.clean_union:
        lacks.append(f"{n_strong} pieces with P(narrow | piece) >= {cfg.clean_coverage} cover {union:.0%} of its "
                     f"firings (needs 2 covering >= {cfg.clean_union:.0%})")
    if lacks:
        return False, "not a clean case: " + "; ".join(lacks)
    return True, (f"fires on {density:.2%} of tokens; {n_strong} wide latents each fire inside it (P(narrow | piece) "
                  f">= {cfg.clean_coverage}) and together cover {union:.0%} of its firings; no wide latent fires on "
                  f"more than {kept_whole:.0%} of them")


def specific_members(members: list[tuple[int, int]], density: Tensor, cfg: GalleryConfig) -> list[tuple[int, int]]:
    """The (latent, member token) pairs whose latent fires on at most cfg.specific_density of the tokens."""
    return [(l, t) for l, t in members if float(density[l]) <= cfg.specific_density]


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
def absorption_case(bench: TaxonomyBench, saes: dict[str, SAE], cache: Path, lm, layer: int, tax,
                    density: dict[str, Tensor], cfg: GalleryConfig) -> GalleryCase | None:
    """The benchmark's most absorbed category (a clean one when there is one), with both SAEs' latents; member
    latents only where specific (`density`: each SAE's latents' share of the sampled tokens, by run name)."""
    candidates = []
    for b in bench.saes:
        for c in b.categories:
            if c.members >= 4 and c.absorption > 0:
                clean = c.absorption >= cfg.clean_absorption and c.recall >= cfg.clean_recall
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
        own = specific_members([(l, t) for l, t in specific.items() if t in members], density[n], cfg)
        own_acts = _column_acts(by, [l for l, _t in own])
        silent_share = {t: float((acts_p[token == t] == 0).mean()) for t in set(token.tolist())}
        took = {l: int(((acts_p == 0) & (own_acts[:, i] > 0) & (token == t)).sum()) for i, (l, t) in enumerate(own)}
        mine = sorted(own, key=lambda lt: (-took[lt[0]], -silent_share.get(lt[1], 0.0), lt[0]))
        mine = mine[: cfg.max_children if n == name else 2]
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
    top = sorted((t for t in tokens if absorbed[t] > 0), key=lambda t: (-absorbed[t], t))[: cfg.max_rows // 2]
    rest = sorted((t for t in tokens if t not in top), key=lambda t: (-parent_mean[t], t))
    shown = top + rest[: cfg.max_rows - len(top)]
    examples = []
    absorbed_rows = np.nonzero(absorbed_row)[0]
    for i in list(absorbed_rows)[:cfg.examples]:
        ids, center = taxbench.pool_window(cache, pool, int(i), cfg.window)
        examples.append(GalleryExample(tokens=_decode(lm.tokenizer, ids), center=center, acts=acts[i].tolist()))
    clean = clean and bool(top)
    why = (f"the parent latent fires on {cat.recall:.0%} of the members' held-out occurrences and is silent, with a "
           f"specific member latent firing instead, on {cat.absorption:.0%}" if clean else
           f"not a clean case: absorption {cat.absorption:.0%}, parent recall {cat.recall:.0%} (a clean case needs "
           f">= {cfg.clean_absorption:.0%} and >= {cfg.clean_recall:.0%}, and a member latent firing on at most "
           f"{cfg.specific_density:.0%} of tokens where the parent is silent)")
    reading = (f"'{cat.category}': rows are members, columns latents, colour the mean activation. {name}'s parent "
               f"latent (first column) is dark on the top {len(top)} rows, where a specific latent for that one "
               f"member fires instead, and lit on the members below; the other SAE's columns show whether it keeps "
               f"the parent there." if clean else
               f"No clean absorption case. '{cat.category}', the closest: rows are members, columns latents, colour "
               f"the mean activation; " + (f"{name}'s parent latent (first column) is dark on the top {len(top)} "
                                           f"rows, but the case misses the bar above." if top else
                                           f"no specific member latent of {name} fires where its parent latent "
                                           f"(first column) is silent, so the heatmap shows no absorption."))
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
def splitting_case(saes: dict[str, SAE], roles: dict[str, str], sample: dict[str, Tensor], sp: dict[str, Sparse],
                   lm, cfg: GalleryConfig) -> GalleryCase | None:
    """The specific narrow latent the wide SAE splits into the most linked pieces without keeping it whole (else the
    closest candidate, said not to be clean), beside the Matryoshka latent nearest it and its tree children; over
    the cache rows of `sample` and each role's sparse codes of them."""
    narrow, wide, mat = saes[roles["narrow"]].eval(), saes[roles["wide"]].eval(), saes[roles["matryoshka"]].eval()
    stats = {r: latent_stats(x, histogram_edges(x.vals, 8)) for r, x in sp.items()}
    link_cfg = LinkConfig()
    links = hierarchy.cross_links(sp["narrow"], sp["wide"], stats["narrow"], stats["wide"], narrow.W_dec, wide.W_dec,
                                  link_cfg)
    linked = links[links["linked"]]
    if linked.empty:
        return None
    cover = hierarchy.coverage(sp["narrow"], sp["wide"], links)
    kids = linked.groupby("parent")
    strong = kids.apply(lambda g: int((g["coverage"] >= cfg.clean_coverage).sum()), include_groups=False)
    union = pd.Series(cover.numpy()).reindex(strong.index).fillna(0.0)
    density = stats["narrow"]["count"].double() / max(sp["narrow"].n_rows, 1)
    whole = links.groupby("parent")["reverse_coverage"].max().reindex(strong.index).fillna(0.0)
    verdicts = {int(n): splitting_verdict(float(density[int(n)]), int(strong[n]), float(union[n]), float(whole[n]),
                                          cfg)
                for n in strong.index}
    clean_ids = [n for n, (ok, _why) in verdicts.items() if ok]
    pick_from = clean_ids or [n for n in verdicts if float(density[n]) <= cfg.specific_density] or list(verdicts)
    n_latent = max(pick_from, key=lambda n: (float(strong[n]) + float(union[n]), -n))
    clean, why = verdicts[n_latent]
    children = linked[linked["parent"] == n_latent].sort_values("coverage", ascending=False)["child"].tolist()
    children = children[: cfg.max_children]
    # The Matryoshka latent nearest the narrow one, outside the last group, and its tree children.
    Wm = mat.W_dec.detach().float().cpu()
    Wn = narrow.W_dec[n_latent].detach().float().cpu()
    cos_m = (Wm @ Wn) / (Wm.norm(dim=1) * Wn.norm()).clamp_min(1e-12)
    cos_m[mat.widths[-2]:] = -2.0
    m_latent = int(cos_m.argmax())
    nested = hierarchy.nested_links(sp["matryoshka"], list(mat.widths), stats["matryoshka"], mat.W_dec, link_cfg)
    m_children = nested[nested["tree"] & (nested["parent"] == m_latent)].sort_values(
        "child_fires", ascending=False)["child"].tolist()[:cfg.max_children]
    cols = [("narrow", n_latent, "split latent")] + [("wide", c, "piece") for c in children] + \
           [("matryoshka", m_latent, "nearest parent")] + [("matryoshka", c, "tree child") for c in m_children]
    by = {r: taxbench.ByLatent(sp[r]) for r in {r for r, _l, _role in cols}}
    acts = np.stack([by[r].scores(l) for r, l, _role in cols], axis=1)
    token = sample["token"].numpy()
    fires = acts[:, 0] > 0
    counts = pd.Series(token[fires]).value_counts()
    shown = [int(t) for t in counts.index[:cfg.max_rows]]
    examples = []
    seen_children = set()
    for i in np.nonzero(fires)[0]:
        firing_kid = tuple(np.nonzero(acts[i, 1 : 1 + len(children)] > 0)[0].tolist())
        if firing_kid in seen_children:
            continue
        seen_children.add(firing_kid)
        ctx = sample["contexts"][int(sample["context"][i])]
        pos = int(sample["position"][i])
        lo, hi = max(0, pos - cfg.window), min(int((ctx >= 0).sum()), pos + cfg.window + 1)
        examples.append(GalleryExample(tokens=_decode(lm.tokenizer, ctx[lo:hi].tolist()), center=pos - lo,
                                       acts=acts[i].tolist()))
        if len(examples) == cfg.examples:
            break
    names = {r: roles[r] for r in roles}
    W = [saes[names[r]].W_dec[l].detach().float().cpu() for r, l, _role in cols]
    panel = (f"Rows are the tokens {names['narrow']} #{n_latent} (first column) fires on most, columns latents, colour "
             f"the mean activation on that token: then {names['wide']}'s latents linked under it (pieces), the "
             f"{names['matryoshka']} latent nearest it by decoder and that latent's tree children.")
    reading = (panel + f" {names['wide']} splits it into pieces that each take some of these tokens." if clean else
               f"No clean splitting case on these rows; the closest candidate is shown. " + panel)
    return GalleryCase(kind="splitting", clean=clean, why=why, reading=reading,
                       rows=_decode(lm.tokenizer, shown),
                       columns=[f"{names[r]} #{l} ({role})" for r, l, role in cols],
                       column_runs=[names[r] for r, _l, _role in cols], column_latents=[int(l) for _r, l, _ro in cols],
                       heatmap=_mean_by_token(acts, token, shown), decoder_cos=_cos(W), examples=examples)


def build(saes: dict[str, SAE], roles: dict[str, str], cache: Path, lm, layer: int, tax,
          bench: TaxonomyBench | None, cfg: GalleryConfig | None = None) -> Gallery:
    """Both cases for the runs in `roles` (matryoshka, wide and, for splitting, narrow: role -> run name), from the
    first cfg.sample_rows rows of the cache (where latent densities are measured too)."""
    cfg = cfg or GalleryConfig()
    t0 = time.perf_counter()
    cases, missing = [], {}
    sample = read_sample(cache, cfg.sample_rows)
    codes = {name: encode_rows(sae.eval(), sample["acts"]) for name, sae in saes.items()}
    density = {name: torch.bincount(x.cols.long(), minlength=x.d_sae).double() / max(x.n_rows, 1)
               for name, x in codes.items()}
    if bench is None:
        missing["absorption"] = "no taxonomy benchmark for this run: run msae taxonomy-bench first"
    else:
        case = absorption_case(bench, {n: saes[n] for n in saes if n in {b.name for b in bench.saes}}, cache, lm,
                               layer, tax, density, cfg)
        if case is None:
            missing["absorption"] = "no category with a member absorbed in either SAE"
        else:
            cases.append(case)
    if "narrow" not in roles:
        missing["splitting"] = "needs a narrow vanilla SAE (--narrow) beside the wide one"
    else:
        case = splitting_case(saes, roles, sample, {role: codes[name] for role, name in roles.items()}, lm, cfg)
        if case is None:
            missing["splitting"] = "the wide SAE has no latent linked under a narrow one on the sampled rows"
        else:
            cases.append(case)
    return Gallery(model=lm.name, layer=layer, runs=dict(roles), cases=cases, missing=missing,
                   seconds=round(time.perf_counter() - t0, 1), config=cfg)
