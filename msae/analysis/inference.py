"""Live inference: the latents of one or more SAEs on the tokens of a user's text.

The text is preceded by the tokenizer's BOS (or end-of-text) token, which takes the attention-sink position 0
that training drops (its residual norm is ~100x the median), so every token of the user's text is read at a
position > 0, as in training."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import pandas as pd
import torch
from torch import Tensor

from msae.lm import LoadedLM, residual_after
from msae.sae import SAE

MAX_TOKENS = 1024
"""Tokens of one text read at once (longer texts are cut, and the caller is told)."""


@dataclass
class TextLatents:
    """Tokens of a text and, per SAE, the (token, latent, activation) of every active latent."""

    token_ids: list[int]
    tokens: list[str]
    """Each token's text as it reads inside the string."""
    latents: list[pd.DataFrame]
    """Per SAE: columns token (index into `tokens`), latent, act; sorted by token then act descending."""
    truncated: bool
    """True when the text had more than MAX_TOKENS tokens and was cut."""

    def dense(self, which: int, d_sae: int) -> Tensor:
        """(n_tokens, d_sae) activations of SAE `which` (small texts only: for tests and heatmaps)."""
        out = torch.zeros(len(self.tokens), d_sae)
        f = self.latents[which]
        out[torch.tensor(f["token"].to_numpy()), torch.tensor(f["latent"].to_numpy())] = torch.tensor(
            f["act"].to_numpy(), dtype=torch.float32)
        return out


def _sink_id(tokenizer) -> int | None:
    for name in ("bos_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return None


@torch.no_grad()
def residual_of_text(lm: LoadedLM, layer: int, text: str, max_tokens: int = MAX_TOKENS) -> tuple[list[int], Tensor, bool]:
    """Token ids of `text` and the (n, d_model) residual after `layer` at each, with the sink token prepended."""
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    truncated = len(ids) > max_tokens
    ids = ids[:max_tokens]
    sink = _sink_id(lm.tokenizer)
    prefix = [sink] if sink is not None else []
    full = torch.tensor([prefix + ids], dtype=torch.long, device=lm.device)
    resid = residual_after(lm, full, torch.ones_like(full), layer)[0, len(prefix):].float()
    return ids, resid, truncated


@torch.no_grad()
def text_latents(lm: LoadedLM, saes: Sequence[SAE], layer: int, text: str, max_tokens: int = MAX_TOKENS) -> TextLatents:
    """Run the LM to `layer` on `text` once and every SAE on the result."""
    ids, resid, truncated = residual_of_text(lm, layer, text, max_tokens)
    frames = []
    for sae in saes:
        if not ids:
            frames.append(pd.DataFrame({"token": [], "latent": [], "act": []}))
            continue
        e = sae.select(resid.to(sae.W_enc.device, sae.W_enc.dtype))
        frame = pd.DataFrame({"token": e.rows.cpu().numpy(), "latent": e.cols.cpu().numpy(),
                              "act": e.vals.float().cpu().numpy()})
        frames.append(frame.sort_values(["token", "act"], ascending=[True, False], ignore_index=True))
    tokens = [lm.tokenizer.decode([i]) for i in ids]
    return TextLatents(ids, tokens, frames, truncated)


def top_latents(latents: pd.DataFrame, n: int = 20) -> pd.DataFrame:
    """Latents of a text ranked by their largest activation: latent, max_act, tokens it fired on, total act."""
    if latents.empty:
        return pd.DataFrame({"latent": [], "max_act": [], "n_tokens": [], "total_act": []})
    g = latents.groupby("latent")["act"]
    out = pd.DataFrame({"max_act": g.max(), "n_tokens": g.size(), "total_act": g.sum()}).reset_index()
    return out.sort_values("max_act", ascending=False, ignore_index=True).head(n)
