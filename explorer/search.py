"""Finding latents in a feature store: by id, by a token they fire on, by a token they promote, by words in
their top contexts (live text goes through msae.analysis.inference)."""

from __future__ import annotations

import re

import pandas as pd

from msae.analysis.store import FeatureStore


class SearchError(ValueError):
    """A query that cannot be answered, in words for the user."""


def by_id(store: FeatureStore, latent: int) -> pd.Series:
    n = len(store.latents)
    if not 0 <= latent < n:
        raise SearchError(f"latent {latent} does not exist: this SAE has latents 0 to {n - 1}")
    return store.latents.iloc[latent]


def token_ids(store: FeatureStore, token: str) -> list[int]:
    """Vocabulary ids whose text equals `token` once surrounding spaces are ignored (case-insensitive)."""
    if not token:
        raise SearchError("type a token to look for")
    want = token.strip().lower()
    if not want:  # a whitespace token ("\n", "  ") is looked up as it is
        return [i for i, t in enumerate(store.vocab) if t == token]
    return [i for i, t in enumerate(store.vocab) if t.strip().lower() == want]


def by_token(store: FeatureStore, token: str, n: int = 20) -> pd.DataFrame:
    """Latents whose top examples centre on `token`, most such examples first (ties: higher max activation)."""
    ids = set(token_ids(store, token))
    if not ids:
        raise SearchError(f"{token!r} is not a token of this model's vocabulary; try 'by text' to run it through the model")
    top = store.examples[store.examples["kind"] == "top"]
    center = top["tokens"].map(lambda t: int(t[len(t) // 2]))
    hits = top[center.isin(ids)].groupby("latent").size().rename("examples")
    out = store.latents.set_index("latent").join(hits, how="inner").reset_index()
    return out.sort_values(["examples", "max_act"], ascending=False, ignore_index=True).head(n)


def by_promoted(store: FeatureStore, token: str, n: int = 20) -> pd.DataFrame:
    """Latents that have `token` among the tokens they promote most, best rank first."""
    if "promoted_ids" not in store.latents:
        raise SearchError("this store has no promoted tokens (the model has no unembedding)")
    ids = set(token_ids(store, token))
    if not ids:
        raise SearchError(f"{token!r} is not a token of this model's vocabulary")
    rank = store.latents["promoted_ids"].map(lambda row: next((r for r, t in enumerate(row) if int(t) in ids), None))
    out = store.latents.assign(promoted_rank=rank).dropna(subset=["promoted_rank"])
    return out.sort_values(["promoted_rank", "max_act"], ascending=[True, False], ignore_index=True).head(n)


def by_context_words(store: FeatureStore, words: str, n: int = 20) -> pd.DataFrame:
    """Latents whose top contexts contain every word of `words` (whole words, case-insensitive), most
    matching contexts first."""
    terms = [w for w in re.findall(r"\w+", words.lower())]
    if not terms:
        raise SearchError("type one or more words to look for in the top contexts")
    is_top = store.examples["kind"] == "top"
    top = store.examples[is_top]
    text = store.example_texts[is_top].str.lower()
    mask = pd.Series(True, index=top.index)
    for term in terms:
        mask &= text.str.contains(rf"\b{re.escape(term)}\b", regex=True)
    hits = top[mask].groupby("latent").size().rename("contexts")
    out = store.latents.set_index("latent").join(hits, how="inner").reset_index()
    return out.sort_values(["contexts", "max_act"], ascending=False, ignore_index=True).head(n)
