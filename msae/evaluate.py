"""Held-out quality of a trained SAE: reconstruction per nested width, sparsity, and the LM's loss with the
SAE's reconstruction spliced into the residual stream ("CE loss recovered")."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor

from msae.activations import CachedActivations, heldout_contexts, read_manifest, row_parts
from msae.io import atomic_save_safetensors
from msae.lm import LoadedLM, decoder_layers
from msae.results import EvalResult, PartFVU
from msae.train import group_l0
from msae.run import Run
from msae.sae import SAE


HELDOUT_CONTEXTS_FILE = "heldout_contexts.safetensors"
"""Beside eval.json: the token ids of the held-out contexts its CE loss was measured on, so that another tool (SAEBench,
tests/test_interop.py) can run the same text without the corpus or the activation cache."""
FREQ_QUANTILES = (0.1, 0.5, 0.9)
ALIVE_RATE = 1e-5
"""A latent counts as alive when it fires on at least this share of rows (once per 100k tokens)."""


@torch.no_grad()
def reconstruction_metrics(sae: SAE, batches: Iterator[Tensor]) -> EvalResult:
    """FVU and explained variance (1 - FVU, against the mean) at every nested width, L0 and the fraction of
    latents that never fired, over all rows of `batches` (raw activations, SAE in eval mode); per nested group, its
    part of the L0, its latents' firing-frequency quantiles and the share that fire once per 100k tokens."""
    sae.eval()
    sq_err = None
    n_rows, total_active = 0, 0
    sums, sq_sums = None, None
    firings = torch.zeros(sae.d_sae, dtype=torch.long, device=sae.W_dec.device)
    for x in batches:
        x = x.to(sae.W_dec.device, sae.W_dec.dtype)
        out = sae(x)
        err = out.errors.pow(2).sum(dim=(1, 2)).double()  # (G,)
        sq_err = err if sq_err is None else sq_err + err
        sums = x.double().sum(0) if sums is None else sums + x.double().sum(0)
        sq_sums = x.double().pow(2).sum() if sq_sums is None else sq_sums + x.double().pow(2).sum()
        n_rows += x.shape[0]
        total_active += out.entries.vals.numel()
        firings += torch.bincount(out.entries.cols, minlength=sae.d_sae)
    if n_rows == 0:
        raise ValueError("no held-out rows to evaluate on")
    total_var = sq_sums - sums.pow(2).sum() / n_rows
    fvu = (sq_err / total_var).tolist()
    freq = firings.double().cpu() / n_rows
    groups = sae.group_of(torch.arange(sae.d_sae, device=sae.W_dec.device)).cpu()
    per_group = [freq[groups == g] for g in range(sae.n_groups)]
    q = torch.tensor(FREQ_QUANTILES, dtype=torch.float64)
    return EvalResult(rows=n_rows, widths=list(sae.widths), fvu=fvu, explained_variance=[1 - v for v in fvu],
                      l0=total_active / n_rows, dead_fraction=(firings == 0).double().mean().item(),
                      l0_per_group=group_l0(sae, firings, n_rows), freq_quantiles=list(FREQ_QUANTILES),
                      freq_quantiles_per_group=[torch.quantile(f, q).tolist() for f in per_group],
                      alive_per_100k_per_group=[(f >= ALIVE_RATE).double().mean().item() for f in per_group])


@torch.no_grad()
def fvu_by_part(sae: SAE, source: CachedActivations, batch_size: int = 4096) -> list[PartFVU] | None:
    """Full-width FVU on the rows of each corpus part of `source` (each against its own mean); None when the
    cache does not record parts."""
    sae.eval()
    names = source.manifest.parts
    n = len(names)
    if not n:
        return None
    err = torch.zeros(n, dtype=torch.float64)
    sums = torch.zeros(n, source.d_in, dtype=torch.float64)
    sq = torch.zeros(n, dtype=torch.float64)
    rows = torch.zeros(n, dtype=torch.long)
    for shard in source.shards:
        parts = row_parts(source.cache, shard)
        if parts is None:
            return None
        x_all = source.load(shard)
        for start in range(0, x_all.shape[0], batch_size):
            x = x_all[start : start + batch_size].to(sae.W_dec.device, sae.W_dec.dtype)
            p = parts[start : start + batch_size]
            err.index_add_(0, p, sae(x).errors[-1].pow(2).sum(1).double().cpu())
            sums.index_add_(0, p, x.double().cpu())
            sq.index_add_(0, p, x.double().pow(2).sum(1).cpu())
            rows += torch.bincount(p, minlength=n)
    out = []
    for i, name in enumerate(names):
        if rows[i] > 1:
            var = sq[i] - sums[i].pow(2).sum() / rows[i]
            out.append(PartFVU(part=name, rows=int(rows[i]), fvu=float(err[i] / var)))
    return out


def _lm_loss(lm: LoadedLM, ids: Tensor, mask: Tensor) -> Tensor:
    """Summed next-token cross-entropy and the number of predicted tokens, over the unpadded positions."""
    logits = lm.model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
    targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
    return loss, (targets != -100).sum()


@torch.no_grad()
def ce_loss_recovered(lm: LoadedLM, sae: SAE, context_tokens: Tensor, layer: int, batch: int = 8) -> dict:
    """The LM's next-token loss on `context_tokens` (padded with -1) clean, with block `layer`'s output
    replaced by the SAE's reconstruction, and by zeros; recovered = (zero - sae) / (zero - clean).

    Position 0 keeps its clean value in both ablations: it is the attention-sink outlier that training drops."""
    sae.eval()
    block = decoder_layers(lm.model)[layer]
    mode = {"replace": None}

    def splice(_module, _inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        if mode["replace"] is None:
            return output
        new = hidden.clone()
        body = hidden[:, 1:].reshape(-1, hidden.shape[-1])
        if mode["replace"] == "sae":
            recon = sae.decode(sae.encode(body.to(sae.W_dec.dtype))).to(hidden.dtype)
        else:
            recon = torch.zeros_like(body)
        new[:, 1:] = recon.view(hidden.shape[0], -1, hidden.shape[-1])
        return (new, *output[1:]) if isinstance(output, tuple) else new

    totals = {"clean": 0.0, "sae": 0.0, "zero": 0.0}
    count = 0
    handle = block.register_forward_hook(splice)
    try:
        for start in range(0, context_tokens.shape[0], batch):
            chunk = context_tokens[start : start + batch].long()
            mask = (chunk >= 0).long().to(lm.device)
            ids = chunk.clamp_min(0).to(lm.device)
            for name, replace in (("clean", None), ("sae", "sae"), ("zero", "zero")):
                mode["replace"] = replace
                loss, n = _lm_loss(lm, ids, mask)
                totals[name] += loss.item()
            count += n.item()
    finally:
        handle.remove()
    ce = {name: total / max(count, 1) for name, total in totals.items()}
    recovered = (ce["zero"] - ce["sae"]) / (ce["zero"] - ce["clean"]) if ce["zero"] != ce["clean"] else float("nan")
    return {"tokens": count, "ce_clean": ce["clean"], "ce_sae": ce["sae"], "ce_zero": ce["zero"], "ce_loss_recovered": recovered}


def spread_rows(x: Tensor, n: int) -> Tensor:
    """`n` rows of `x` evenly spaced from its first to its last (all of them when it has at most `n`)."""
    if x.shape[0] <= n:
        return x
    if n == 1:
        return x[:1]
    return x[[round(j * (x.shape[0] - 1) / (n - 1)) for j in range(n)]]


def evaluate_run(run_dir: Path | str, cache: Path, lm: LoadedLM, n_contexts: int = 64) -> EvalResult:
    """Held-out metrics of the run at `run_dir` on the held-out shard of `cache` (the one it was trained on), with
    CE loss recovered on `n_contexts` held-out contexts spread evenly over the shard; written to the run's eval.json,
    and those contexts' token ids to HELDOUT_CONTEXTS_FILE beside it.

    Raises ValueError when the cache holds nothing out (a single shard)."""
    run = Run(run_dir)
    heldout = CachedActivations(cache, heldout=True)
    contexts = spread_rows(heldout_contexts(cache), n_contexts)
    layer = read_manifest(cache).layer
    # The encoder in the model's precision: one setting for the forward and the SAE.
    sae = run.load_sae(device=lm.device, precision="bfloat16" if lm.dtype == torch.bfloat16 else "float32")
    result = reconstruction_metrics(sae, heldout.all_rows(4096))
    result = dataclasses.replace(result, layer=layer, parts=fvu_by_part(sae, heldout),
                                 **ce_loss_recovered(lm, sae, contexts, layer))
    run.write_result(result)
    atomic_save_safetensors({"context_tokens": contexts.to(torch.int32).contiguous()},
                            Path(run_dir) / HELDOUT_CONTEXTS_FILE)
    return result
