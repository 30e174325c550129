"""Feature absorption on the real model (Chanin et al. 2024, "A is for Absorption", arXiv 2409.14507; SAEBench
`evals/absorption`): first-letter probes on single-token words, k-sparse probing over SAE latents, and how much of
the probe's signal an SAE moves out of a letter's main latents into others.

The steps, each a function:
1. `letter_words`: single-token words of the vocabulary (a leading space, then ASCII letters only); the label is
   the first letter.
2. `word_activations`: the residual stream after block `layer` at the word token, in an in-context prompt of
   solved examples (" cat has the first letter: C" lines) followed by the word; the forward stops after the block.
3. `train_letter_probes`: one-vs-rest logistic probes, one a letter, on a seeded train/test split (stratified by
   letter); test F1 per letter.
4. `k_sparse_probing`: per letter, latents ranked by their mean activation on the letter's words minus on the
   others, over their standard deviation (train split); logistic probes on the top k = 1..max_k latents; test F1
   per k. `main_latents` keeps the top k while F1 rises by more than `f1_jump` (0.03) over the best so far
   (always at least one).
5. `word_absorption` / `absorption`: on the test words the probe classifies correctly as the letter, the
   absorption fraction and full absorption of each word, averaged per letter, then over the letters whose probe
   F1 exceeds 0.6 (SAEBench's rule).
`measure` runs the steps once for several SAEs on the same word activations (msae.run saves the result).

Definitions, per word x with SAE latents a (u = the letter's unit probe direction, d_i = decoder row i):
- projection of latent i: p_i = a_i (d_i . u), its share of the reconstruction along the probe. SAEBench writes
  a_i cos(d_i, u), the same for unit-norm decoder rows (ours are saved unit; an SAE from elsewhere may not be,
  so the row norm counts).
- total projection P = x . u (the raw activation, as SAEBench); main projection M = sum of p_i over main latents.
- absorbers: latents outside the main set with cos(d_i, u) >= 0.1 and p_i > 0; S = the sum of the
  `max_absorbers` (3) largest of their p_i.
- absorption fraction (SAEBench's normalisation exactly): 0 where M >= P, P <= 0 or S < 0.4 P; 1 where M <= 0;
  else A / (A + M) with A = min(S, P - M).
- full absorption (SAEBench's, a single absorbing latent): every main latent silent (a_i <= 1e-8), P > 0, and the
  latent with the largest p_i has cos(d_i, u) >= 0.025 and p_i >= 0.4 P.
Where this differs from SAEBench: latents are ranked for k-sparse probing by standardised mean activation
difference (SAEBench ranks them by an L1-regularised probe on all latents; the raw difference favours dense, large
latents that barely tell letters apart: on the shipped pair the main latents it chose reached k-sparse F1 0.38
(vanilla) and 0.20 (Matryoshka), against 0.44 and 0.28 standardised); every probe is a class-balanced,
L2-regularised logistic regression fit by full-batch L-BFGS in torch (SAEBench: Adam for 50 epochs, sklearn for
the k-sparse probes); the decoder row norm counts in p_i; the split is stratified by letter; there is no minimum
number of usable letters (SAEBench wants 20): the count is reported.

Sizes, adapted from SAEBench (Gemma-2-2B on a GPU, every alphabetic token of the vocabulary, 10 in-context
examples, probes trained for 50 epochs) to SmolLM2-135M on a 2-core CPU: words of at least 2 letters, at most 128
a letter (3,135 of the 31.5k, as x, y and z have fewer), 2 in-context examples (prompts of 17 tokens instead of
~80; on 12 letters, 1, 2 and 4 examples gave probe F1 0.82, 0.83 and 0.83), probes fit to convergence by L-BFGS.
The word activations (about 53k tokens through half the model) take most of the time.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path
from typing import Callable, Mapping, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from msae.activations import pad_batch
from msae.analysis.stream import encode_rows
from msae.config import LETTERS, AbsorptionConfig
from msae.io import atomic_save_safetensors, check_fits
from msae.lm import (DEFAULT_MODEL, LoadedLM, cache_dir, check_before_load, check_layer, load_lm, residual_after,
                     same_model)
from msae.results import (AbsorptionMean, AbsorptionResult, AbsorptionValidity, AbsorptionVariant, LetterAbsorption,
                          SAEAbsorption, mean_or_none)
from msae.run import Run
from msae.sae import SAE

PROMPT_LINE = "{word} has the first letter: {letter}\n"
"""One solved in-context example. A prompt ends with the word token itself: SAEBench reads the same position in
"<examples> word has the first letter:", and a causal model's later tokens cannot change it."""

Progress = Callable[[str], None]


class AbsorptionError(ValueError):
    """Absorption cannot be measured; the message says why."""


class LetterWords(NamedTuple):
    """Single-token words and their first letters."""

    token_ids: Tensor
    """(N,) token id of each word."""
    words: list[str]
    """The decoded token, leading space included."""
    labels: Tensor
    """(N,) index of the first letter in LETTERS (a = 0)."""


class LetterProbes(NamedTuple):
    """One-vs-rest logistic probes on the model's activations, one a letter."""

    letters: Tensor
    """(L,) index in LETTERS of the letter of each probe."""
    weight: Tensor
    """(L, d) weights on raw activations: logit = weight . x + bias."""
    bias: Tensor
    """(L,)"""
    directions: Tensor
    """(L, d) unit probe directions (weight / its norm)."""
    f1: Tensor
    """(L,) F1 on the test split."""
    is_test: Tensor
    """(N,) bool, the held-out words."""


class SparseProbing(NamedTuple):
    """k-sparse probes over SAE latents, one letter a row."""

    ranked: Tensor
    """(L, max_k) latents in order of mean activation difference."""
    f1: Tensor
    """(L, max_k) test F1 of the probe on the top k = 1..max_k latents."""
    n_main: Tensor
    """(L,) size of the main set: the first n_main ranked latents."""


# ------------------------------------------------------------------------------------------------ words and prompts


def letter_words(
    tokenizer, letters: str = LETTERS, min_chars: int = 2, per_letter: int | None = None, seed: int = 0
) -> LetterWords:
    """Tokens that decode to a space and at least `min_chars` ASCII letters, and that the tokenizer gives back as
    that single token, sorted by id; with `per_letter`, a seeded sample of at most that many per first letter."""
    pattern = re.compile(rf"^ [A-Za-z]{{{min_chars},}}$")
    letters = letters.lower()
    candidates = [(i, tokenizer.decode([i])) for i in range(len(tokenizer))]
    candidates = [(i, w) for i, w in candidates if pattern.match(w) and w[1].lower() in letters]
    if candidates:
        retokenized = tokenizer([w for _, w in candidates], add_special_tokens=False)["input_ids"]
        candidates = [(i, w) for (i, w), ids in zip(candidates, retokenized) if ids == [i]]
    if not candidates:
        raise AbsorptionError(
            f"the tokenizer has no single-token words of a space and {min_chars}+ ASCII letters "
            f"starting with one of {letters!r}"
        )
    generator = torch.Generator().manual_seed(seed)
    kept: list[tuple[int, str]] = []
    for letter in letters:
        group = [c for c in candidates if c[1][1].lower() == letter]
        if per_letter is not None and len(group) > per_letter:
            order = torch.randperm(len(group), generator=generator)[:per_letter]
            group = [group[j] for j in order.tolist()]
        kept.extend(group)
    kept.sort()
    return LetterWords(
        torch.tensor([i for i, _ in kept]),
        [w for _, w in kept],
        torch.tensor([LETTERS.index(w[1].lower()) for _, w in kept]),
    )


def _prompts(tokenizer, token_ids: Tensor, n_examples: int, seed: int) -> list[list[int]]:
    """Token ids of each word's prompt: `n_examples` other words of the set, solved, then the word."""
    words = [tokenizer.decode([i]) for i in token_ids.tolist()]
    n = len(words)
    if n_examples >= n:
        raise AbsorptionError(f"{n_examples} in-context examples need more than {n} words")
    generator = torch.Generator().manual_seed(seed)
    texts = []
    for i in range(n):
        picks = torch.randperm(n - 1, generator=generator)[:n_examples]
        picks = picks + (picks >= i).long()  # skip the word itself
        lines = (PROMPT_LINE.format(word=words[j], letter=words[j].strip()[0].upper()) for j in picks.tolist())
        texts.append("".join(lines))
    prefixes = tokenizer(texts)["input_ids"] if n_examples else [[] for _ in texts]
    return [list(prefix) + [word_id] for prefix, word_id in zip(prefixes, token_ids.tolist())]


@torch.no_grad()
def word_activations(
    lm: LoadedLM,
    layer: int,
    token_ids: Tensor,
    batch: int = 64,
    icl_examples: int = 2,
    seed: int = 0,
    progress: Progress | None = None,
) -> Tensor:
    """(N, d_model) float32 residual stream after block `layer` at each word, in its in-context prompt.

    Prompts are right-padded: a causal model's last real token never sees the padding."""
    prompts = _prompts(lm.tokenizer, token_ids, icl_examples, seed)
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    out = torch.empty(len(prompts), lm.d_model)
    for start in range(0, len(prompts), batch):
        chunk = prompts[start : start + batch]
        lengths = torch.tensor([len(p) for p in chunk])
        ids, mask = pad_batch(chunk, int(lengths.max()), pad)
        resid = residual_after(lm, ids, mask, layer)  # (B, T, d_model)
        rows = torch.arange(len(chunk), device=resid.device)
        out[start : start + len(chunk)] = resid[rows, lengths.to(resid.device) - 1].float().cpu()
        if progress is not None:
            progress(f"word activations {min(start + batch, len(prompts))}/{len(prompts)}")
    return out


def cached_word_activations(lm: LoadedLM, layer: int, token_ids: Tensor, batch: int = 64, icl_examples: int = 2,
                            seed: int = 0, progress: Progress | None = None, root: Path | None = None) -> Tensor:
    """word_activations, kept on disk under the model's identity, the layer, the LM's dtype, the words and the
    prompts' settings (root: default $MSAE_CACHE/probe-activations): every absorption measurement on one model
    and layer probes the same words, and their forward passes are most of its time (44 s of the 205 s that
    `msae analyze` of the shipped Matryoshka run against vanilla took over 300,000 rows on a 2-core AMD EPYC). A
    model without an identity (no local folder) is not cached; a file that cannot be read is made again."""
    identity = lm.identity
    if identity is None:
        return word_activations(lm, layer, token_ids, batch, icl_examples, seed, progress)
    ids = token_ids.long().contiguous()
    key = hashlib.sha256(json.dumps({"model": identity, "layer": layer, "dtype": str(lm.dtype),
                                     "icl_examples": icl_examples, "seed": seed}).encode() + ids.numpy().tobytes())
    path = (root or cache_dir() / "probe-activations") / f"{key.hexdigest()[:24]}.safetensors"
    from safetensors.torch import load_file

    try:
        saved = load_file(str(path))
        if torch.equal(saved["token_ids"], ids) and saved["activations"].shape == (ids.numel(), lm.d_model):
            return saved["activations"]
    except Exception:  # absent, or unreadable: made again below
        pass
    acts = word_activations(lm, layer, token_ids, batch, icl_examples, seed, progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors({"token_ids": ids, "activations": acts.contiguous()}, path)
    return acts


# ----------------------------------------------------------------------------------------------------- probes


def _logits(X: Tensor, W: Tensor, b: Tensor) -> Tensor:
    """(P, n) logits of P probes; X is (n, f) shared by all probes or (P, n, f) one per probe."""
    if X.dim() == 2:
        return W @ X.t() + b[:, None]
    return torch.einsum("pnf,pf->pn", X, W) + b[:, None]


def fit_logistic(X: Tensor, Y: Tensor, l2: float, steps: int) -> tuple[Tensor, Tensor]:
    """P independent logistic regressions fit together by full-batch L-BFGS: weights (P, f) and biases (P,).

    Y (P, n) bool. Class-balanced (positives and negatives weigh half each), plus l2 * |w|^2 per probe; the
    losses are summed, so each probe's gradient is its own."""
    Y = Y.bool()
    targets = Y.float()
    n_pos = Y.sum(1, keepdim=True).clamp_min(1)
    n_neg = (~Y).sum(1, keepdim=True).clamp_min(1)
    sample_weight = torch.where(Y, 0.5 / n_pos, 0.5 / n_neg)
    W = torch.zeros(Y.shape[0], X.shape[-1], requires_grad=True)
    b = torch.zeros(Y.shape[0], requires_grad=True)
    optimizer = torch.optim.LBFGS([W, b], lr=1.0, max_iter=steps, history_size=20, line_search_fn="strong_wolfe",
                                  tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        optimizer.zero_grad()
        bce = F.binary_cross_entropy_with_logits(_logits(X, W, b), targets, reduction="none")
        loss = (bce * sample_weight).sum() + l2 * W.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return W.detach(), b.detach()


def f1_score(predicted: Tensor, actual: Tensor) -> Tensor:
    """F1 along the last dimension of two bool tensors (0 where there is nothing to find and nothing found)."""
    tp = (predicted & actual).sum(-1).float()
    wrong = (predicted ^ actual).sum(-1).float()
    return torch.where(tp > 0, 2 * tp / (2 * tp + wrong).clamp_min(1), torch.zeros_like(tp))


def stratified_split(labels: Tensor, test_fraction: float, seed: int) -> Tensor:
    """(N,) bool test mask: a seeded `test_fraction` of each label's items, at least one of any label with two."""
    generator = torch.Generator().manual_seed(seed)
    is_test = torch.zeros(labels.shape[0], dtype=torch.bool)
    for label in labels.unique().tolist():
        members = (labels == label).nonzero().squeeze(1)
        n_test = round(test_fraction * len(members))
        if len(members) >= 2:
            n_test = min(max(n_test, 1), len(members) - 1)
        is_test[members[torch.randperm(len(members), generator=generator)[:n_test]]] = True
    return is_test


def train_letter_probes(
    acts: Tensor, labels: Tensor, test_fraction: float = 0.2, seed: int = 0, l2: float = 1e-4, steps: int = 200
) -> LetterProbes:
    """A one-vs-rest logistic probe for each letter present in `labels`, fit on a stratified train split.

    The probes see activations centred and divided by their RMS norm; weights are mapped back to raw
    activations (the direction is unchanged by either)."""
    acts = acts.float()
    is_test = stratified_split(labels, test_fraction, seed)
    letters = labels.unique()
    Y = labels[None, :] == letters[:, None]  # (L, N)
    train = acts[~is_test]
    mean = train.mean(0)
    scale = (train - mean).pow(2).sum(1).mean().sqrt().clamp_min(torch.finfo(acts.dtype).tiny)
    W, b = fit_logistic((train - mean) / scale, Y[:, ~is_test], l2, steps)
    weight = W / scale
    bias = b - weight @ mean
    logits = _logits(acts[is_test], weight, bias)
    f1 = f1_score(logits > 0, Y[:, is_test])
    directions = weight / weight.norm(dim=1, keepdim=True).clamp_min(torch.finfo(weight.dtype).tiny)
    return LetterProbes(letters, weight, bias, directions, f1, is_test)


# --------------------------------------------------------------------------------------------- k-sparse probing


def main_latents(f1_by_k: Tensor, f1_jump: float = 0.03) -> Tensor:
    """(L,) how many top-ranked latents form each letter's main set: k grows while F1 at k beats the best so far
    by more than `f1_jump`; k = 1 always counts. f1_by_k is (L, max_k) for k = 1..max_k."""
    counts = []
    for row in f1_by_k.tolist():
        best, n = row[0], 1
        for score in row[1:]:
            if score <= best + f1_jump:
                break
            best, n = score, n + 1
        counts.append(n)
    return torch.tensor(counts)


def k_sparse_probing(
    latents_train: Tensor,
    labels_train: Tensor,
    latents_test: Tensor,
    labels_test: Tensor,
    letters: Tensor,
    max_k: int = 10,
    f1_jump: float = 0.03,
    l2: float = 1e-4,
    steps: int = 200,
) -> SparseProbing:
    """For each letter, latents ranked by mean activation on its train words minus on the others, over the
    latent's standard deviation; a logistic probe on the top k latents (each standardised on the train split) for
    every k = 1..max_k; test F1; main set.

    All L * max_k probes are fit together: probe (letter, k) sees the top max_k latents with those past k zeroed."""
    max_k = min(max_k, latents_train.shape[1])
    Y_train = labels_train[None, :] == letters[:, None]  # (L, n_train)
    Y_test = labels_test[None, :] == letters[:, None]
    pos_mean = (Y_train.float() @ latents_train) / Y_train.sum(1, keepdim=True).clamp_min(1)
    neg_mean = ((~Y_train).float() @ latents_train) / (~Y_train).sum(1, keepdim=True).clamp_min(1)
    spread = latents_train.std(0).clamp_min(torch.finfo(latents_train.dtype).tiny)
    ranked = ((pos_mean - neg_mean) / spread).topk(max_k, dim=1).indices  # (L, max_k)

    def features(latents: Tensor) -> Tensor:  # (L * max_k, n, max_k), probe (l, k) keeps the first k columns
        top = latents[:, ranked].permute(1, 0, 2)  # (L, n, max_k)
        keep = torch.arange(max_k)[None, :] < torch.arange(1, max_k + 1)[:, None]  # (k, column)
        return (top[:, None] * keep[None, :, None, :]).flatten(0, 1)

    X_train, X_test = features(latents_train), features(latents_test)
    mean = X_train.mean(1, keepdim=True)
    std = X_train.std(1, keepdim=True).clamp_min(1e-6)
    W, b = fit_logistic((X_train - mean) / std, Y_train.repeat_interleave(max_k, 0), l2, steps)
    predicted = _logits((X_test - mean) / std, W, b) > 0
    f1 = f1_score(predicted, Y_test.repeat_interleave(max_k, 0)).view(len(letters), max_k)
    return SparseProbing(ranked, f1, main_latents(f1, f1_jump))


# --------------------------------------------------------------------------------------------------- absorption


def word_absorption(
    latents: Tensor,
    total: Tensor,
    decoder_proj: Tensor,
    decoder_cos: Tensor,
    main: Tensor,
    config: AbsorptionConfig | None = None,
    cos_threshold: float | None = None,
    allowed: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Absorption fraction (n,) and full absorption (n,) bool of n words, by the module's definitions.

    latents (n, d_sae) SAE activations; total (n,) the activations' projection on the unit probe direction u;
    decoder_proj (d_sae,) each decoder row's dot product with u; decoder_cos (d_sae,) its cosine with u;
    main: indices of the letter's main latents. Variants: `cos_threshold` replaces the config's absorber cosine,
    `allowed` (d_sae,) bool limits the absorbers (and full absorption's single absorber) to those latents."""
    cfg = config or AbsorptionConfig()
    cos_threshold = cfg.cos_threshold if cos_threshold is None else cos_threshold
    proj = latents * decoder_proj  # (n, d_sae) each latent's share of the reconstruction along u
    is_main = torch.zeros(latents.shape[1], dtype=torch.bool)
    is_main[main] = True
    main_proj = proj[:, is_main].sum(1)
    candidate = ~is_main & (decoder_cos >= cos_threshold)
    if allowed is not None:
        candidate &= allowed
        proj_for_top = torch.where(allowed | is_main, proj, torch.zeros_like(proj))
    else:
        proj_for_top = proj
    absorber_proj = torch.where(candidate & (proj > 0), proj, torch.zeros_like(proj))
    absorbed = absorber_proj.topk(min(cfg.max_absorbers, proj.shape[1]), dim=1).values.sum(1)

    none = (main_proj >= total) | (total <= 0) | (absorbed < cfg.projection_threshold * total)
    share = torch.minimum(absorbed, total - main_proj)
    partial = share / (share + main_proj).clamp_min(torch.finfo(proj.dtype).tiny)
    fraction = torch.where(none, 0.0, torch.where(main_proj <= 0, 1.0, partial.clamp(0, 1)))

    top_proj, top_latent = proj_for_top.max(dim=1)
    full = (
        (latents[:, is_main] <= cfg.silent).all(1)
        & (total > 0)
        & (decoder_cos[top_latent] >= cfg.full_cos_threshold)
        & (top_proj >= cfg.projection_threshold * total)
    )
    return fraction, full


@torch.no_grad()
def encode(sae: SAE, acts: Tensor, batch: int = 1024) -> Tensor:
    """(N, d_sae) dense latents of `acts`, in chunks."""
    sae.eval()
    return encode_rows(sae, acts, batch).dense()


@torch.no_grad()
def absorption(
    sae: SAE, acts: Tensor, labels: Tensor, probes: LetterProbes, config: AbsorptionConfig | None = None
) -> SAEAbsorption:
    """k-sparse probing and absorption of one SAE on word activations: a row per letter and the means over
    letters whose probe F1 exceeds `min_probe_f1`."""
    cfg = config or AbsorptionConfig()
    check_fits(sae, acts.shape[1], "the word activations")
    usable = probes.f1 > cfg.min_probe_f1
    if not usable.any():
        raise AbsorptionError(
            f"no letter probe reaches F1 > {cfg.min_probe_f1} (best {probes.f1.max().item():.2f}): "
            "the model does not represent first letters linearly at this layer, or there are too few words"
        )
    latents = encode(sae, acts)
    train, test = ~probes.is_test, probes.is_test
    sparse = k_sparse_probing(latents[train], labels[train], latents[test], labels[test], probes.letters,
                              cfg.max_k, cfg.f1_jump, cfg.probe_l2, cfg.probe_steps)
    W_dec = sae.W_dec.detach().float().cpu()
    decoder_proj = W_dec @ probes.directions.t()  # (d_sae, L)
    decoder_cos = decoder_proj / W_dec.norm(dim=1, keepdim=True).clamp_min(torch.finfo(W_dec.dtype).tiny)
    probe_logits = _logits(acts[test].float(), probes.weight, probes.bias)  # (L, n_test)

    # The variants: SAEBench's cosine scaled to this d_in, and absorbers among latents firing on few words.
    dim_cos = cfg.cos_sigmas / acts.shape[1] ** 0.5
    sparse_ok = (latents > 0).double().mean(0) <= cfg.sparse_absorber_share
    variant_args = {"dimension-aware cosine": (dim_cos, None), "sparse absorbers": (cfg.cos_threshold, sparse_ok)}
    variant_rows: dict[str, list[tuple[float | None, float | None]]] = {k: [] for k in variant_args}
    rows = []
    for l, letter in enumerate(probes.letters.tolist()):
        right = (labels[test] == letter) & (probe_logits[l] > 0)
        main = sparse.ranked[l, : sparse.n_main[l]]
        total = acts[test][right].float() @ probes.directions[l]
        fraction, full = word_absorption(latents[test][right], total, decoder_proj[:, l], decoder_cos[:, l], main, cfg)
        n_right = int(right.sum())
        for key, (cos_t, allowed) in variant_args.items():
            vf, vfull = word_absorption(latents[test][right], total, decoder_proj[:, l], decoder_cos[:, l], main, cfg,
                                        cos_t, allowed)
            variant_rows[key].append((vf.mean().item() if n_right else None,
                                      vfull.float().mean().item() if n_right else None))
        rows.append(LetterAbsorption(
            letter=LETTERS[letter],
            probe_f1=probes.f1[l].item(),
            n_test_words=int((labels[test] == letter).sum()),
            n_probe_true_positives=n_right,
            main_latents=main.tolist(),
            main_groups=sae.group_of(main.to(sae.W_dec.device)).tolist(),
            k_sparse_f1=sparse.f1[l].tolist(),
            main_f1=sparse.f1[l, sparse.n_main[l] - 1].item(),
            absorption_fraction=fraction.mean().item() if n_right else None,
            full_absorption_rate=full.float().mean().item() if n_right else None,
            n_full_absorption=int(full.sum()),
            used=bool(usable[l]) and n_right > 0,
        ))
    used = [r for r in rows if r.used]
    if not used:
        raise AbsorptionError(f"no letter with probe F1 > {cfg.min_probe_f1} has a correctly probed test word")
    variants = []
    for key, (cos_t, allowed) in variant_args.items():
        kept = [v for v, r in zip(variant_rows[key], rows) if r.used]
        variants.append(AbsorptionVariant(
            name=key, cos_threshold=cos_t,
            max_absorber_share=cfg.sparse_absorber_share if allowed is not None else None,
            absorption_fraction=mean_or_none([v[0] for v in kept]),
            full_absorption_rate=mean_or_none([v[1] for v in kept])))
    mean = AbsorptionMean(
        absorption_fraction=mean_or_none([r.absorption_fraction for r in used]),
        full_absorption_rate=mean_or_none([r.full_absorption_rate for r in used]),
        n_main_latents=mean_or_none([len(r.main_latents) for r in used]),
        main_f1=mean_or_none([r.main_f1 for r in used]),
        n_letters=len(used),
        letters="".join(r.letter for r in used),
    )
    return SAEAbsorption(mean=mean, letters=rows, variants=variants, d_sae=sae.d_sae)


SAEBENCH_MIN_PARAMETERS = 1_000_000_000
SAEBENCH_MIN_D_SAE = 16_384


def validity(lm: LoadedLM, d_in: int, results: Mapping[str, SAEAbsorption]) -> AbsorptionValidity:
    """Whether the first-letter measurement is valid for this model and these SAEs (SAEBench's recommendation),
    in numbers and words."""
    params = sum(p.numel() for p in lm.model.parameters())
    sd = 1 / d_in**0.5
    small = [name for name, r in results.items() if (r.d_sae or 0) < SAEBENCH_MIN_D_SAE]
    valid = params >= SAEBENCH_MIN_PARAMETERS and not small
    f1 = "; ".join(f"{name}: main latents' k-sparse F1 {r.mean.main_f1:.2f}" for name, r in results.items()
                   if r.mean.main_f1 is not None)
    if valid:
        note = f"Model and SAEs are at SAEBench's recommended sizes. {f1}."
    else:
        note = (f"Not a valid measurement here: SAEBench recommends first-letter absorption for models of >= 1B "
                f"parameters and SAEs of >= 16k latents; this model has {params / 1e6:.0f}M parameters"
                + (f" and {', '.join(small)} {'has' if len(small) == 1 else 'have'} fewer latents" if small else "")
                + f". At d_in = {d_in} a random cosine has sd {sd:.3f}, so the absorber cosine 0.1 is "
                f"{0.1 / sd:.1f} sd (4.8 at Gemma-2-2B's 2,304). {f1}: where the main latents barely detect the letter, "
                f"the absorption fraction says little. Read it as indicative, with the variants beside it.")
    return AbsorptionValidity(model_parameters=params, d_in=d_in, random_cosine_sd=sd, valid=valid, note=note)


# ------------------------------------------------------------------------------------------------- whole runs


class ProbedWords(NamedTuple):
    """The words, their activations and the letter probes that every SAE of a measurement is read against."""

    words: LetterWords
    acts: Tensor
    """(N, d_model) float32 word activations (word_activations)."""
    probes: LetterProbes
    seconds: dict[str, float]
    """Time of each step (activations, probes)."""


def probe_words(lm: LoadedLM, layer: int, config: AbsorptionConfig | None = None,
                progress: Progress | None = None) -> ProbedWords:
    """The single-token words of `config`, their activations at `layer` and the letter probes fit on them;
    AbsorptionError when no probe is good enough to measure with."""
    cfg = config or AbsorptionConfig()
    say = progress or (lambda _msg: None)
    seconds = {}
    start = time.perf_counter()
    words = letter_words(lm.tokenizer, cfg.letters, cfg.min_chars, cfg.per_letter, cfg.seed)
    say(f"{len(words.words)} single-token words")
    acts = cached_word_activations(lm, layer, words.token_ids, cfg.batch, cfg.icl_examples, cfg.seed, progress)
    seconds["activations"] = time.perf_counter() - start

    start = time.perf_counter()
    probes = train_letter_probes(acts, words.labels, cfg.test_fraction, cfg.seed, cfg.probe_l2, cfg.probe_steps)
    seconds["probes"] = time.perf_counter() - start
    if not (probes.f1 > cfg.min_probe_f1).any():
        raise AbsorptionError(
            f"no letter probe reaches F1 > {cfg.min_probe_f1} on {lm.name} layer {layer} "
            f"(best {probes.f1.max().item():.2f}); try another layer or more words"
        )
    n_usable = int((probes.f1 > cfg.min_probe_f1).sum())
    say(f"letter probes: {n_usable}/{len(probes.letters)} with F1 > {cfg.min_probe_f1}")
    return ProbedWords(words, acts, probes, seconds)


def measure(
    run_dirs: Mapping[str, Path | str],
    lm: LoadedLM | None = None,
    config: AbsorptionConfig | None = None,
    layer: int | None = None,
    progress: Progress | None = None,
    probed: ProbedWords | None = None,
) -> AbsorptionResult:
    """Absorption of several SAEs (name -> run dir) from one set of word activations and letter probes.

    The layer is `layer`, else the one the runs record (they must agree); the model is `lm`, else the one the
    first run records (default: the built-in model). `probed` (probe_words of that model, layer and config) saves
    making the words' activations and probes again when several calls share them."""
    cfg = config or AbsorptionConfig()
    if not run_dirs:
        raise AbsorptionError("no SAE to measure")
    say = progress or (lambda _msg: None)
    runs = {name: Run(run_dir) for name, run_dir in run_dirs.items()}
    saes = {name: run.load_sae(precision=cfg.precision) for name, run in runs.items()}
    sources = {name: run.source() for name, run in runs.items()}
    models = {name: source[0] for name, source in sources.items() if source[0] is not None}
    if any(not same_model(model, next(iter(models.values()))) for model in models.values()):
        raise AbsorptionError(f"the runs read different models {models}: measure them separately")
    layers = {name: source[1] for name, source in sources.items() if source[1] is not None}
    if layer is not None and any(v != layer for v in layers.values()):
        raise AbsorptionError(f"--layer {layer}, but the runs record layers {layers}: an SAE measured on another "
                              f"layer's activations tells nothing; leave --layer out")
    if len(set(layers.values())) > 1:
        raise AbsorptionError(f"the runs record different layers {layers}: measure them separately")
    if layer is None:
        if not layers:
            raise AbsorptionError("no run records the layer it was trained on: pass --layer")
        layer = next(iter(layers.values()))
    if lm is None:
        model = next(iter(models.values()), DEFAULT_MODEL)
        check_before_load(model, layer)  # a layer the model lacks costs no model load
        lm = load_lm(model, precision=cfg.precision)
    check_layer(lm, layer)
    for name, sae in saes.items():
        check_fits(sae, lm.d_model, f"{lm.name} ({name}: {run_dirs[name]})")

    probed = probed or probe_words(lm, layer, cfg, progress)
    seconds = dict(probed.seconds)
    results = {}
    for name, sae in saes.items():
        start = time.perf_counter()
        results[name] = absorption(sae, probed.acts, probed.words.labels, probed.probes, cfg)
        seconds[name] = time.perf_counter() - start
        say(f"{name}: mean absorption fraction {results[name].mean.absorption_fraction:.3f}")
    return AbsorptionResult(
        model=lm.name, layer=layer, config=cfg, n_words=len(probed.words.words),
        n_test_words=int(probed.probes.is_test.sum()),
        probe_f1={LETTERS[l]: f for l, f in zip(probed.probes.letters.tolist(), probed.probes.f1.tolist())},
        saes=results, seconds=seconds, validity=validity(lm, probed.acts.shape[1], results))
