"""Matching the latents of two SAEs by decoder cosine (vanilla ↔ Matryoshka).

Rule (greedy, stated): take every latent's 5 nearest decoder rows in the other SAE, in both directions; sort
these candidate pairs by cosine, highest first; accept a pair when neither latent is matched yet and its cosine
is at least `min_cos`. A latent left without a partner is unmatched. Greedy matching reaches at least half the
total cosine of the best assignment over the same candidates (a maximum-weight matching bound)."""

from __future__ import annotations

import pandas as pd
import torch
from torch import Tensor

from msae.analysis.hierarchy import decoder_neighbours
from msae.results import MatchingSummary

MIN_COS = 0.5
"""Decoder cosine below which two latents are not called the same feature (see LinkConfig.split_cosine)."""


def match(W_a: Tensor, W_b: Tensor, min_cos: float = MIN_COS, top: int = 5) -> pd.DataFrame:
    """Matched pairs (a, b, cos), best first."""
    ab = decoder_neighbours(W_a, W_b, (), top=top)
    ba = decoder_neighbours(W_b, W_a, (), top=top)
    n_a, n_b = W_a.shape[0], W_b.shape[0]
    a_idx = torch.cat([torch.arange(n_a).repeat_interleave(ab["top_i"].shape[1]), ba["top_i"].reshape(-1)])
    b_idx = torch.cat([ab["top_i"].reshape(-1), torch.arange(n_b).repeat_interleave(ba["top_i"].shape[1])])
    cos = torch.cat([ab["top_v"].reshape(-1), ba["top_v"].reshape(-1)])
    order = torch.argsort(cos, descending=True, stable=True)
    used_a = torch.zeros(n_a, dtype=torch.bool)
    used_b = torch.zeros(n_b, dtype=torch.bool)
    pairs = []
    for a, b, c in zip(a_idx[order].tolist(), b_idx[order].tolist(), cos[order].tolist()):
        if c < min_cos:
            break
        if used_a[a] or used_b[b]:
            continue
        used_a[a] = used_b[b] = True
        pairs.append((a, b, c))
    return pd.DataFrame(pairs, columns=["a", "b", "cos"])


def _matched_per_group(matched: pd.Series, groups: Tensor) -> tuple[list[int], list[float]]:
    """How many latents of each nested group have a partner, and as a share of the group."""
    n_groups = int(groups.max()) + 1
    hit = torch.bincount(groups[torch.tensor(matched.to_numpy(), dtype=torch.long)], minlength=n_groups)
    size = torch.bincount(groups, minlength=n_groups)
    return hit.tolist(), (hit.double() / size.clamp_min(1)).tolist()


def matching_summary(pairs: pd.DataFrame, n_a: int, n_b: int, groups_a: Tensor | None = None,
                     alive_a: Tensor | None = None, alive_b: Tensor | None = None) -> MatchingSummary:
    """Counts of matched and unmatched latents on each side and, for a Matryoshka side a, matches per group."""
    out = MatchingSummary(pairs=len(pairs), unmatched_a=n_a - len(pairs), unmatched_b=n_b - len(pairs),
                          mean_cos=float(pairs["cos"].mean()) if len(pairs) else None)
    if alive_a is not None:
        out.unmatched_a_alive = int(alive_a.sum()) - int(alive_a[torch.tensor(pairs["a"].to_numpy(), dtype=torch.long)].sum())
    if alive_b is not None:
        out.unmatched_b_alive = int(alive_b.sum()) - int(alive_b[torch.tensor(pairs["b"].to_numpy(), dtype=torch.long)].sum())
    if groups_a is not None:
        out.matched_per_group, out.matched_share_per_group = _matched_per_group(pairs["a"], groups_a)
    return out
