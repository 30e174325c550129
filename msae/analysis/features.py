"""The feature store: per latent, how often and how strongly it fires, its activation histogram, its top
activating contexts and samples from its activation quantiles, and the tokens it promotes through the
unembedding. Built from one streaming pass (msae.analysis.stream) and written as parquet beside the run."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from msae.config import StoreConfig
from msae.analysis.stream import Examples, Sparse, StreamResult
from msae.sae import SAE


def histogram_edges(vals: Tensor, bins: int) -> Tensor:
    """Log-spaced edges from just below the smallest to just above the largest activation (0.1th percentile
    floor, so one tiny value does not stretch every histogram)."""
    if vals.numel() == 0:
        return torch.logspace(-3, 0, bins + 1, dtype=torch.float64)
    sample = vals[:: max(1, vals.numel() // 1_000_000)].double()
    lo = max(float(torch.quantile(sample, 0.001)), float(sample.min()), 1e-12)
    hi = float(vals.max()) * 1.0001
    hi = max(hi, lo * 10)
    return torch.logspace(torch.log10(torch.tensor(lo)).item(), torch.log10(torch.tensor(hi)).item(), bins + 1,
                          dtype=torch.float64)


def latent_stats(sp: Sparse, edges: Tensor) -> dict[str, Tensor]:
    """Per-latent count, mean, max, Σ a² and histogram counts (values below the first edge go in bin 0)."""
    cols = sp.cols.long()
    vals = sp.vals.double()
    F = sp.d_sae
    count = torch.bincount(cols, minlength=F)
    total = torch.zeros(F, dtype=torch.float64).index_add_(0, cols, vals)
    sum_sq = torch.zeros(F, dtype=torch.float64).index_add_(0, cols, vals * vals)
    vmax = torch.zeros(F, dtype=torch.float64).scatter_reduce_(0, cols, vals, "amax", include_self=True)
    bins = edges.numel() - 1
    b = (torch.bucketize(vals, edges, right=True) - 1).clamp(0, bins - 1)
    hist = torch.bincount(cols * bins + b, minlength=F * bins).view(F, bins)
    mean = torch.where(count > 0, total / count.clamp_min(1), torch.zeros(()))
    return {"count": count, "mean": mean, "max": vmax, "sum_sq": sum_sq, "hist": hist}


def unembedding(lm) -> Tensor | None:
    """(vocab, d_model) W_U of a causal LM, or None when it has no output embedding."""
    head = lm.model.get_output_embeddings() if lm is not None else None
    return None if head is None else head.weight.detach().float().cpu()


@torch.no_grad()
def promoted_tokens(W_dec: Tensor, W_U: Tensor, n: int, chunk: int = 512) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Top and bottom `n` tokens of every latent's direct effect on the logits, W_dec · W_Uᵀ (logit lens)."""
    top_v, top_i, bot_v, bot_i = [], [], [], []
    W_U = W_U.float()
    for start in range(0, W_dec.shape[0], chunk):
        logits = W_dec[start : start + chunk].float() @ W_U.T  # (chunk, vocab)
        v, i = logits.topk(n, dim=1)
        top_v.append(v)
        top_i.append(i)
        v, i = logits.topk(n, dim=1, largest=False)
        bot_v.append(v)
        bot_i.append(i)
    return torch.cat(top_v), torch.cat(top_i), torch.cat(bot_v), torch.cat(bot_i)


def vocab_strings(tokenizer) -> list[str]:
    """Every token id decoded on its own (how it reads inside text, leading space included)."""
    return tokenizer.batch_decode([[i] for i in range(len(tokenizer))])


def _quantile_slots(ex: Examples, quantiles: int, per_quantile: int) -> list[tuple[int, int, int]]:
    """(latent, slot, quantile) of the examples to keep from a uniform sample: sorted by activation, cut into
    `quantiles` equal ranges of rank, `per_quantile` spread evenly through each."""
    chosen = []
    filled = torch.isfinite(ex.key)
    order = torch.argsort(torch.where(filled, ex.act, torch.full_like(ex.act, torch.inf)), dim=1)
    n_filled = filled.sum(dim=1).tolist()
    for latent, m in enumerate(n_filled):
        if m == 0:
            continue
        slots = order[latent, :m].tolist()
        for q in range(quantiles):
            lo, hi = (q * m) // quantiles, ((q + 1) * m) // quantiles
            span = hi - lo
            for j in range(min(per_quantile, span)):
                chosen.append((latent, slots[lo + (j * span) // min(per_quantile, span)], q))
    return chosen


def _example_rows(ex: Examples, picks: list[tuple[int, int, int]], kind: str) -> pd.DataFrame:
    if not picks:
        return pd.DataFrame()
    lat = torch.tensor([p[0] for p in picks])
    slot = torch.tensor([p[1] for p in picks])
    return pd.DataFrame({
        "latent": lat.numpy(),
        "kind": kind,
        "rank": [p[2] for p in picks],
        "act": ex.act[lat, slot].numpy(),
        "row": ex.row[lat, slot].numpy(),
        "context": ex.context[lat, slot].numpy(),
        "position": ex.position[lat, slot].numpy(),
        "acts": list(ex.acts[lat, slot].half().numpy()),  # for shading only: float16, see analyze._parquet
    })


def examples_frame(result: StreamResult, cfg: StoreConfig) -> pd.DataFrame:
    """Top examples (kind 'top', rank 0 = strongest) and quantile samples (kind 'quantile', rank = quantile).

    `acts` is the latent's activation on the ±window tokens around `position` of `context`; the tokens
    themselves are in the contexts table (see contexts_frame and example_windows)."""
    top = result.top
    filled = torch.isfinite(top.key).nonzero().tolist()
    frames = [
        _example_rows(top, [(lat, slot, slot) for lat, slot in filled], "top"),
        _example_rows(result.sample, _quantile_slots(result.sample, cfg.quantiles, cfg.per_quantile), "quantile"),
    ]
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        {"latent": [], "kind": [], "rank": [], "act": [], "row": [], "context": [], "position": [], "acts": []})


def contexts_frame(result: StreamResult, used) -> pd.DataFrame:
    """The token ids (padding removed) and document of every context in `used`."""
    used = sorted({int(c) for c in used})
    rows = result.context_tokens[torch.tensor(used, dtype=torch.long)] if used else torch.zeros(0, 0, dtype=torch.int32)
    return pd.DataFrame({
        "context": used,
        "doc": [result.context_doc.get(c, -1) for c in used],
        "tokens": [r[r >= 0].numpy() for r in rows],
    })


def example_windows(examples: pd.DataFrame, contexts: pd.DataFrame, window: int) -> np.ndarray:
    """(n_examples, 2·window + 1) token ids around every example (-1 outside its context)."""
    if len(examples) == 0:
        return np.zeros((0, 2 * window + 1), dtype=np.int32)
    lengths = contexts["tokens"].map(len).to_numpy()
    table = np.full((len(contexts), max(int(lengths.max(initial=0)), 1)), -1, dtype=np.int32)
    for i, toks in enumerate(contexts["tokens"]):
        table[i, : len(toks)] = toks
    slot = pd.Index(contexts["context"]).get_indexer(examples["context"])
    pos = examples["position"].to_numpy()[:, None] + np.arange(-window, window + 1)
    inside = (pos >= 0) & (pos < table.shape[1]) & (slot[:, None] >= 0)
    out = np.full(pos.shape, -1, dtype=np.int32)
    out[inside] = table[np.broadcast_to(slot[:, None], pos.shape)[inside], pos[inside]]
    return out


def latents_frame(sae: SAE, stats: dict[str, Tensor], n_rows: int, top: Examples, cfg: StoreConfig,
                  vocab: list[str] | None, W_U: Tensor | None) -> pd.DataFrame:
    """One row per latent: group, first width, firing statistics, histogram, label and promoted tokens."""
    F = sae.d_sae
    latents = torch.arange(F)
    group = sae.group_of(latents.to(sae.W_dec.device)).cpu()
    widths = torch.tensor(sae.widths)
    count = stats["count"]
    frame = pd.DataFrame({
        "latent": latents.numpy(),
        "group": group.numpy(),
        "width": widths[group].numpy(),
        "count": count.numpy(),
        "freq": (count.double() / max(n_rows, 1)).numpy(),
        "mean_act": stats["mean"].numpy(),
        "max_act": stats["max"].numpy(),
        "hist": list(stats["hist"].to(torch.int64).numpy()),
    })
    centers = top.tokens[:, :, top.window]  # (F, n)
    labels, top_tokens = [], []
    for latent in range(F):
        ids = [t for t in centers[latent].tolist() if t >= 0]
        common = [t for t, _ in Counter(ids).most_common(cfg.label_tokens)]
        top_tokens.append(common)
        labels.append(" | ".join(vocab[t].strip() or repr(vocab[t]) for t in common) if vocab is not None else "")
    frame["top_token_ids"] = top_tokens
    frame["label"] = labels
    if W_U is not None and W_U.shape[1] == sae.d_in:
        top_v, top_i, bot_v, bot_i = promoted_tokens(sae.W_dec.detach().cpu(), W_U, cfg.promoted)
        frame["promoted_ids"] = list(top_i.numpy())
        frame["promoted_logits"] = list(top_v.half().numpy())
        frame["suppressed_ids"] = list(bot_i.numpy())
        frame["suppressed_logits"] = list(bot_v.half().numpy())
        if vocab is not None:
            frame["promoted"] = [[vocab[t] for t in row] for row in top_i.tolist()]
            frame["suppressed"] = [[vocab[t] for t in row] for row in bot_i.tolist()]
    return frame
