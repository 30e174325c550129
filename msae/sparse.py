"""Sparse kernels for the SAE step: latent selection without a dense latent matrix, and decode / encoder
gradients that touch only the k·B active latents.

Only the encoder matmul is dense. Its operands carry b_enc folded in (`fold_rows`, `fold_weights`: a column of
ones and a bias row), so each chunk of pre-activations is one plain matmul: adding a broadcast bias to a chunk cost
almost as much as the matmul itself. Pre-activations are produced in row chunks and reduced at once to the
entries that survive (BatchTopK, TopK, a threshold or ReLU), so the (B, d_sae) matrix never exists. Every
gradient is then computed from the surviving entries alone:

    d b_enc[i]   = sum_j dpre_j                      over entries j of latent i
    d W_enc[:,i] = sum_j dpre_j (x_j - b_dec)         (an embedding_bag over rows, bagged by latent)
    d b_dec      = -W_enc @ d b_enc                   (b_dec enters the encoder as x - b_dec)
    d W_dec[i]   = sum_j f_j grad_out[bag_j]          (an embedding_bag over grad rows, bagged by latent)
    d f_j        = <grad_out[bag_j], W_dec[col_j]>    (embedding_bag's per-sample-weight backward)

`tests/test_sparse.py` checks every one of these against the plain dense computation in float64.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

CHUNK_ROWS = 256
"""Rows of pre-activations computed at a time: 256 x 16,384 fp32 is 16 MB, small enough to stay in cache
while it is reduced to its surviving entries."""

BATCHTOPK_MARGIN = (2.0, 8.0)
"""BatchTopK first keeps every pre-activation above a threshold estimated on the first chunk so that about
MARGIN x k x B candidates survive, then takes the exact top k·B among them. If too few survive (a batch
unlike its first chunk) it retries with the next, larger margin, and finally with every positive value."""

ESTIMATE_STRIDE = 7
"""BatchTopK estimates its candidate threshold on every 7th pre-activation of the first chunk."""


class Entries(NamedTuple):
    """Active latents of a batch in coordinate form, sorted by row (then by latent within a row)."""

    rows: Tensor
    """(nnz,) int64: batch row of each entry."""
    cols: Tensor
    """(nnz,) int64: latent index of each entry."""
    vals: Tensor
    """(nnz,) activation value of each entry (> 0)."""

    def dense(self, n_rows: int, d_sae: int) -> Tensor:
        """The (n_rows, d_sae) latent matrix; for inspection and tests, never on the training path."""
        out = self.vals.new_zeros(n_rows, d_sae)
        out[self.rows, self.cols] = self.vals
        return out


def _empty_entries(like: Tensor) -> Entries:
    empty = torch.empty(0, dtype=torch.long, device=like.device)
    return Entries(empty, empty, like.new_empty(0))


def _concat(parts: list[Entries], like: Tensor) -> Entries:
    if not parts:
        return _empty_entries(like)
    return Entries(*(torch.cat(field) for field in zip(*parts)))


def _positions_above(flat: Tensor, threshold: float) -> Tensor:
    """Indices of the values of `flat` above a scalar `threshold` >= 0.

    In bf16 the compare is on the bit patterns: for a threshold >= 0 the order of bf16 values above it is the order
    of their bits read as int16 (negative values and -0 read as negative integers), and the integer compare is
    about 2.5x faster than torch's bf16 one."""
    if flat.dtype == torch.bfloat16:
        bits = torch.tensor([threshold], dtype=torch.bfloat16).view(torch.int16).item()
        return _set_positions(flat.view(torch.int16) > bits)
    return _set_positions(flat > threshold)


def _set_positions(mask: Tensor) -> Tensor:
    """Indices of the set entries of a flat bool mask, scanned 8 bytes at a time: few entries pass a selection, so
    only the words holding a set byte are opened."""
    if mask.numel() % 8:
        return mask.nonzero().squeeze(1)
    words = mask.view(torch.int64).nonzero().squeeze(1)
    hits = mask.view(-1, 8)[words].nonzero()
    return words[hits[:, 0]] * 8 + hits[:, 1]


def _above(pre_CF: Tensor, threshold: float | Tensor, row0: int) -> Entries:
    """Entries of one chunk whose pre-activation exceeds `threshold` (>= 0; a scalar or one per latent)."""
    flat = pre_CF.reshape(-1)
    if isinstance(threshold, Tensor) and threshold.numel() > 1:  # per latent: broadcast over the rows
        idx = _set_positions((pre_CF > threshold).reshape(-1))
    else:
        idx = _positions_above(flat, float(threshold))
    d_sae = pre_CF.shape[1]
    return Entries(idx // d_sae + row0, idx % d_sae, flat[idx])


@torch.no_grad()
def fold_rows(x: Tensor, b_dec: Tensor | None, dtype: torch.dtype | None = None) -> Tensor:
    """(B, d_in + 1): the encoder's input x - b_dec (x itself when b_dec is None) with a column of ones, in `dtype`
    (default x's), made in one pass, without gradient (an operand of the selection)."""
    x1 = x.new_empty((x.shape[0], x.shape[1] + 1), dtype=dtype or x.dtype)
    if b_dec is None:
        x1[:, :-1].copy_(x)
    else:
        torch.sub(x, b_dec, out=x1[:, :-1])
    x1[:, -1] = 1
    return x1


@torch.no_grad()
def fold_weights(W_enc: Tensor, b_enc: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """(d_in + 1, d_sae): W_enc with b_enc as its last row, in `dtype` (default W_enc's), so that
    fold_rows(x, b_dec) @ fold_weights(W_enc, b_enc) = (x - b_dec) @ W_enc + b_enc. One pass, the cast included."""
    W1 = W_enc.new_empty((W_enc.shape[0] + 1, W_enc.shape[1]), dtype=dtype or W_enc.dtype)
    W1[:-1].copy_(W_enc)
    W1[-1].copy_(b_enc)
    return W1


def _pre_chunks(x1: Tensor, W1: Tensor, chunk_rows: int):
    """Yield (row0, pre-activations of rows row0:row0+chunk) for folded operands (fold_rows, fold_weights)."""
    for row0 in range(0, x1.shape[0], chunk_rows):
        yield row0, x1[row0 : row0 + chunk_rows] @ W1


def _top_values(entries: Entries, n: int) -> Entries:
    """The n largest entries, back in row-major order."""
    if entries.vals.numel() <= n:
        return entries
    keep = entries.vals.topk(n, sorted=False).indices.sort().values
    return Entries(entries.rows[keep], entries.cols[keep], entries.vals[keep])


@torch.no_grad()
def select_batchtopk(x1: Tensor, W1: Tensor, k: int, chunk_rows: int = CHUNK_ROWS) -> Entries:
    """Exact BatchTopK: the k·B largest positive pre-activations of the whole batch (folded operands x1, W1)."""
    n_rows = x1.shape[0]
    n_keep = k * n_rows
    first_rows = min(chunk_rows, n_rows)
    pre0 = x1[:first_rows] @ W1
    # The estimate only sets how many candidates survive, never which: a strided sample of the chunk suffices
    # (an odd stride, so the sample does not alias the power-of-two latent dimension).
    sample = pre0.reshape(-1)[::ESTIMATE_STRIDE]
    for margin in (*BATCHTOPK_MARGIN, None):
        threshold = 0.0
        if margin is not None:
            n_cand = int(margin * k * first_rows / ESTIMATE_STRIDE)
            if 0 < n_cand < sample.numel():
                threshold = max(0.0, sample.topk(n_cand, sorted=False).values.min().item())
        parts = [_above(pre0, threshold, 0)]
        for row0, pre in _pre_chunks(x1[first_rows:], W1, chunk_rows):
            parts.append(_above(pre, threshold, row0 + first_rows))
        cand = _concat(parts, x1)
        # Exact when at least n_keep values exceed the threshold: everything left out is <= threshold.
        if cand.vals.numel() >= n_keep or threshold == 0.0:
            return _top_values(cand, n_keep)
    raise AssertionError("unreachable: the last margin keeps every positive value")


@torch.no_grad()
def select_topk(x1: Tensor, W1: Tensor, k: int, chunk_rows: int = CHUNK_ROWS) -> Entries:
    """Per-row TopK of the positive pre-activations (folded operands x1, W1)."""
    parts = []
    for row0, pre in _pre_chunks(x1, W1, chunk_rows):
        vals, cols = pre.topk(k, dim=1)
        cols, order = cols.sort(dim=1)
        vals = vals.gather(1, order)
        rows = torch.arange(row0, row0 + pre.shape[0], device=pre.device).unsqueeze(1).expand_as(cols)
        keep = vals > 0
        parts.append(Entries(rows[keep], cols[keep], vals[keep]))
    return _concat(parts, x1)


@torch.no_grad()
def select_above(x1: Tensor, W1: Tensor, threshold: float | Tensor, chunk_rows: int = CHUNK_ROWS) -> Entries:
    """Every pre-activation above `threshold`, a scalar or a (d_sae,) vector (JumpReLU), never below 0 (folded
    operands x1, W1).

    0 gives ReLU; BatchTopK's learned θ gives its inference rule."""
    threshold = threshold.clamp_min(0.0) if isinstance(threshold, Tensor) else max(threshold, 0.0)
    parts = [_above(pre, threshold, row0) for row0, pre in _pre_chunks(x1, W1, chunk_rows)]
    return _concat(parts, x1)


@torch.no_grad()
def select_aux(x1: Tensor, W1: Tensor, dead_idx: Tensor, k_aux: int, chunk_rows: int = CHUNK_ROWS) -> Entries:
    """AuxK: per row, the k_aux largest positive pre-activations among the dead latents `dead_idx` (folded
    operands x1, W1)."""
    k_aux = min(k_aux, dead_idx.numel())
    if k_aux == 0:
        return _empty_entries(x1)
    W_dead = W1[:, dead_idx]
    parts = []
    for row0, pre in _pre_chunks(x1, W_dead, chunk_rows):
        vals, local = pre.topk(k_aux, dim=1)
        rows = torch.arange(row0, row0 + pre.shape[0], device=pre.device).unsqueeze(1).expand_as(local)
        keep = vals > 0
        parts.append(Entries(rows[keep], dead_idx[local[keep]], vals[keep]))
    return _concat(parts, x1)


def _bag_offsets(sorted_keys: Tensor, n_bags: int) -> Tensor:
    """Start offset of every bag for keys already sorted ascending (empty bags allowed)."""
    counts = torch.bincount(sorted_keys, minlength=n_bags)
    return torch.cumsum(counts, 0) - counts


def _per_entry_dot(grad_out: Tensor, weight: Tensor, cols: Tensor, offsets: Tensor, bags: Tensor) -> Tensor:
    """<grad_out[bags_j], weight[cols_j]> for every entry j, without materialising either gather."""
    return torch.ops.aten._embedding_bag_per_sample_weights_backward(grad_out, weight, cols, offsets, bags, 0, -1)


def _sum_by_latent(src: Tensor, src_rows: Tensor, cols: Tensor, weights: Tensor, d_sae: int) -> Tensor:
    """(d_sae, d) with row i = sum over entries j of latent i of weights_j * src[src_rows_j]."""
    order = torch.argsort(cols)
    cols_sorted = cols[order]
    return F.embedding_bag(
        src_rows[order], src, _bag_offsets(cols_sorted, d_sae), mode="sum", per_sample_weights=weights[order]
    )


class _EncodeAt(torch.autograd.Function):
    """Pre-activations at the selected entries, with gradients to W_enc, b_enc and b_dec from those alone."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_dec, rows, cols, vals):
        ctx.save_for_backward(x, W_enc, b_dec, rows, cols)
        return vals.clone()

    @staticmethod
    def backward(ctx, dvals):
        x, W_enc, b_dec, rows, cols = ctx.saved_tensors
        d_sae = W_enc.shape[1]
        db_enc = torch.bincount(cols, weights=dvals, minlength=d_sae).to(dvals.dtype)
        dW_enc = None
        if ctx.needs_input_grad[1]:
            dW_enc = _sum_by_latent(x - b_dec, rows, cols, dvals, d_sae).t().contiguous()
        db_dec = -(W_enc @ db_enc) if ctx.needs_input_grad[3] else None
        return None, dW_enc, db_enc, db_dec, None, None, None


class _DecodeBags(torch.autograd.Function):
    """out[b] = sum of vals_j W_dec[cols_j] over the entries j of bag b (entries sorted by bag)."""

    @staticmethod
    def forward(ctx, vals, W_dec, cols, bags, n_bags):
        offsets = _bag_offsets(bags, n_bags)
        ctx.save_for_backward(vals, W_dec, cols, bags, offsets)
        return F.embedding_bag(cols, W_dec, offsets, mode="sum", per_sample_weights=vals)

    @staticmethod
    def backward(ctx, grad_out):
        vals, W_dec, cols, bags, offsets = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        dvals = _per_entry_dot(grad_out, W_dec, cols, offsets, bags) if ctx.needs_input_grad[0] else None
        dW_dec = _sum_by_latent(grad_out, bags, cols, vals, W_dec.shape[0]) if ctx.needs_input_grad[1] else None
        return dvals, dW_dec, None, None, None


class _NestedReconstruction(torch.autograd.Function):
    """The squared errors of the nested reconstructions x̂_g = b_dec + Σ_{h<=g} part_h, from the active entries, in
    one embedding_bag and a running sum over the levels made in place; with a fused backward.

    Entries are sorted by bag = level * B + row, so the bag sums are the levels' parts (G, B, d_in), which the
    running sum turns into the errors e_g = x̂_g - x where they lie: neither the parts, the reconstructions nor a
    cumsum's copy are kept beside them. The gradient of part h collects the errors of every width that contains it
    (g >= h): one pass a level from the widest down."""

    @staticmethod
    def forward(ctx, vals, W_dec, cols, bags, b_dec, x, n_levels):
        n_rows, d_in = x.shape
        offsets = _bag_offsets(bags, n_levels * n_rows)
        errors = F.embedding_bag(cols, W_dec, offsets, mode="sum", per_sample_weights=vals).view(n_levels, n_rows, d_in)
        errors[0].add_(b_dec).sub_(x)
        for g in range(1, n_levels):
            errors[g].add_(errors[g - 1])
        # Each level's sum of squares as a batched dot product: one read of the errors, no squared copy of them.
        flat = errors.view(n_levels, 1, -1)
        mse = torch.bmm(flat, flat.transpose(1, 2)).view(n_levels) / n_rows  # (G,)
        ctx.save_for_backward(vals, W_dec, cols, bags, offsets, errors)
        ctx.mark_non_differentiable(errors)
        return mse, errors

    @staticmethod
    def backward(ctx, grad_mse, _grad_errors):
        vals, W_dec, cols, bags, offsets, errors = ctx.saved_tensors
        n_levels, n_rows, d_in = errors.shape
        scale = (grad_mse * (2.0 / n_rows)).tolist()
        grad = torch.empty_like(errors)  # (G, B, d_in): d loss / d part_h
        torch.mul(errors[-1], scale[-1], out=grad[-1])
        for h in range(n_levels - 2, -1, -1):
            torch.add(grad[h + 1], errors[h], alpha=scale[h], out=grad[h])
        grad_bags = grad.view(n_levels * n_rows, d_in)
        dvals = _per_entry_dot(grad_bags, W_dec, cols, offsets, bags) if ctx.needs_input_grad[0] else None
        dW_dec = _sum_by_latent(grad_bags, bags, cols, vals, W_dec.shape[0]) if ctx.needs_input_grad[1] else None
        db_dec = grad[0].sum(dim=0) if ctx.needs_input_grad[4] else None
        return dvals, dW_dec, None, None, db_dec, None, None


def nested_reconstruction(
    vals: Tensor, W_dec: Tensor, cols: Tensor, bags: Tensor, b_dec: Tensor, x: Tensor, n_levels: int
) -> tuple[Tensor, Tensor]:
    """(mse (G,), errors (G, B, d_in)) of the nested reconstructions of x (B, d_in) from entries (vals, cols) in
    bags level * B + row, sorted ascending; errors[g] = x̂_g - x carries no gradient."""
    return _NestedReconstruction.apply(vals, W_dec, cols, bags, b_dec, x, n_levels)


def encode_at(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, entries: Entries) -> Tensor:
    """Differentiable pre-activation values of `entries` (computed already, without grad, by a selector)."""
    return _EncodeAt.apply(x, W_enc, b_enc, b_dec, entries.rows, entries.cols, entries.vals)


def decode_bags(vals: Tensor, W_dec: Tensor, cols: Tensor, bags: Tensor, n_bags: int) -> Tensor:
    """(n_bags, d_in) sums of vals_j W_dec[cols_j] per bag; `bags` must be sorted ascending."""
    return _DecodeBags.apply(vals, W_dec, cols, bags, n_bags)
