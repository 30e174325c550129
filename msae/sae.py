"""The sparse autoencoder: one module for Matryoshka (several nested widths) and vanilla (one width) SAEs.

Latents are split into consecutive groups; the nested dictionaries are the prefixes of `widths`
(m_1 < m_2 < ... < m_G = d_sae). A vanilla SAE is the case G = 1. Tensors are named and shaped as in
SAELens: W_enc (d_in, d_sae), b_enc (d_sae), W_dec (d_sae, d_in), b_dec (d_in), threshold ().
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
from torch import Tensor, nn

from msae import sparse
from msae.config import check_widths
from msae.sparse import Entries

ACTIVATIONS = ("batchtopk", "topk", "relu", "jumprelu")
"""jumprelu (pre-activation kept above a per-latent threshold) is for SAEs loaded from elsewhere; not trained here."""


class SAEOutput(NamedTuple):
    """What one forward pass returns."""

    entries: Entries
    """Active latents of every row, in coordinate form (rows, cols, vals)."""
    errors: Tensor
    """(G, B, d_in) reconstruction error x̂_g - x at every nested width, the last being the full SAE's (no gradient):
    the reconstruction is x + errors[g]."""
    mse: Tensor
    """(G,) squared error summed over d_in, averaged over rows, at every width (the loss terms)."""
    fvu: Tensor
    """(G,) fraction of variance unexplained at every width: squared error / squared deviation from the batch mean."""
    l0: Tensor
    """() mean number of active latents per row."""
    l1: Tensor
    """() mean over rows of the summed latent activations (the ReLU SAE's sparsity penalty)."""
    aux_loss: Tensor
    """() AuxK loss: dead latents reconstructing the residual, over the residual's variance (0 without dead)."""


class SAE(nn.Module):
    """A Matryoshka (or, with one width, vanilla) sparse autoencoder."""

    def __init__(
        self,
        d_in: int,
        widths: Sequence[int],
        k: int = 32,
        activation: str = "batchtopk",
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        init: bool = True,
    ):
        """`init=False` leaves the weights uninitialised, for a loader that overwrites them at once."""
        super().__init__()
        widths = [int(w) for w in widths]
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        check_widths(widths, k if activation in ("batchtopk", "topk") else None)
        self.d_in = int(d_in)
        self.widths = widths
        self.k = int(k)
        self.activation = activation
        d_sae = widths[-1]
        factory = dict(dtype=dtype, device=device)
        self.W_enc = nn.Parameter(torch.empty(d_in, d_sae, **factory))
        self.b_enc = nn.Parameter(torch.zeros(d_sae, **factory))
        self.W_dec = nn.Parameter(torch.empty(d_sae, d_in, **factory))
        self.b_dec = nn.Parameter(torch.zeros(d_in, **factory))
        # BatchTopK's inference threshold θ: negative until learned (BatchTopK is then used in eval too).
        # A (d_sae,) vector holds per-latent JumpReLU thresholds of SAEs loaded from elsewhere.
        self.register_buffer("threshold", torch.tensor(-1.0, **factory))
        self.compute_dtype = dtype
        """Dtype of the encoder matmul and the selection (msae.lm.compute_dtype): bfloat16 makes them 3-6x faster
        where the hardware has bf16 matmuls; the weights, decoder, gradients and loss stay in the weights' dtype."""
        if init:
            self.reset_parameters()

    @property
    def d_sae(self) -> int:
        return self.widths[-1]

    @property
    def n_groups(self) -> int:
        return len(self.widths)

    @property
    def group_bounds(self) -> Tensor:
        """(G,) end index of each group (= the nested widths)."""
        return torch.tensor(self.widths, device=self.W_dec.device)

    def group_of(self, latents: Tensor) -> Tensor:
        """Group index (0-based) of each latent index."""
        return torch.bucketize(latents, self.group_bounds, right=True)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Unit-norm random decoder rows, encoder = decoder transpose, zero biases."""
        w = torch.randn(self.d_sae, self.d_in, generator=generator, dtype=torch.float64)
        w /= w.norm(dim=1, keepdim=True)
        self.W_dec.copy_(w)
        self.W_enc.copy_(w.t())
        self.b_enc.zero_()
        self.b_dec.zero_()
        self.threshold.fill_(-1.0)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale every decoder row to unit norm."""
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(torch.finfo(self.W_dec.dtype).tiny)

    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """Project out of each decoder row's gradient its component along the (unit) row itself."""
        if self.W_dec.grad is None:
            return
        parallel = torch.linalg.vecdot(self.W_dec.grad, self.W_dec)  # (d_sae,), no (d_sae, d_in) product made
        self.W_dec.grad.addcmul_(self.W_dec, parallel.unsqueeze(1), value=-1)

    def uses_batchtopk(self) -> bool:
        """True when selection is BatchTopK over the batch (training, or a threshold not learned yet)."""
        return self.activation == "batchtopk" and (self.training or bool((self.threshold < 0).all()))

    def encoder_weights(self) -> Tensor:
        """(d_in + 1, d_sae): W_enc with b_enc as its last row (sparse.fold_weights), in the compute dtype, without
        gradient. Made on every call: a cached copy could not tell when the weights change (the fused Adam step
        updates them without bumping their version counter), and the copy costs about 5% of the matmul it feeds."""
        return sparse.fold_weights(self.W_enc, self.b_enc, self.compute_dtype)

    def encoder_rows(self, x: Tensor) -> Tensor:
        """(B, d_in + 1): x - b_dec with a column of ones (sparse.fold_rows), in the compute dtype, without gradient."""
        return sparse.fold_rows(x, self.b_dec, self.compute_dtype)

    def select(self, x: Tensor) -> Entries:
        """The active latents of x (B, d_in) (no gradient), by the SAE's activation rule, in the compute dtype;
        the values come back in the weights' dtype."""
        return self.select_from(self.encoder_rows(x), self.encoder_weights())

    def select_from(self, x1: Tensor, W1: Tensor) -> Entries:
        """`select` on the encoder's operands already made (encoder_rows(x), encoder_weights())."""
        threshold = self.threshold.to(self.compute_dtype)
        if self.activation == "relu":
            entries = sparse.select_above(x1, W1, 0.0)
        elif self.activation == "jumprelu":
            entries = sparse.select_above(x1, W1, threshold)
        elif self.activation == "topk":
            entries = sparse.select_topk(x1, W1, self.k)
        elif self.uses_batchtopk():
            entries = sparse.select_batchtopk(x1, W1, self.k)
        else:
            entries = sparse.select_above(x1, W1, threshold)
        return entries._replace(vals=entries.vals.to(self.W_dec.dtype))

    def encode(self, x: Tensor) -> Tensor:
        """Dense (B, d_sae) latent activations; use `select` for large batches."""
        entries = self.select(x)
        return entries.dense(x.shape[0], self.d_sae)

    def decode(self, latents_BF: Tensor, width: int | None = None) -> Tensor:
        """Reconstruction from dense latents using the first `width` latents (default: all)."""
        width = self.d_sae if width is None else width
        return latents_BF[:, :width] @ self.W_dec[:width] + self.b_dec

    def forward(self, x: Tensor, dead_mask: Tensor | None = None, k_aux: int | None = None) -> SAEOutput:
        """Encode x (B, d_in), reconstruct it at every nested width in one cumulative pass (errors: (G, B, d_in)),
        and measure it.

        Gradients reach the SAE's parameters only: x is treated as data. `dead_mask` (d_sae,) turns on AuxK
        with the k_aux (default d_in // 2) largest pre-activations of the dead latents."""
        n_rows = x.shape[0]
        x1, W1 = self.encoder_rows(x), self.encoder_weights()
        entries = self.select_from(x1, W1)
        aux_entries = None
        if dead_mask is not None and dead_mask.any():
            dead_idx = dead_mask.nonzero().squeeze(1)
            k_aux = self.d_in // 2 if k_aux is None else k_aux
            aux_entries = sparse.select_aux(x1, W1, dead_idx, k_aux)
            aux_entries = aux_entries._replace(vals=aux_entries.vals.to(self.W_dec.dtype))
        del x1, W1
        all_entries = entries if aux_entries is None else Entries(*(torch.cat(p) for p in zip(entries, aux_entries)))
        all_vals = sparse.encode_at(x, self.W_enc, self.b_enc, self.b_dec, all_entries)
        vals = all_vals[: entries.vals.numel()]

        # One bag per (group, row): the group's part of each row's reconstruction; a running sum over groups nests them.
        groups = self.group_of(entries.cols)
        bag = groups * n_rows + entries.rows
        order = torch.argsort(bag, stable=True)
        mse, errors = sparse.nested_reconstruction(vals[order], self.W_dec, entries.cols[order], bag[order], self.b_dec,
                                                   x, self.n_groups)
        total_var = x.var(dim=0, correction=0).sum()  # squared deviation from the batch mean, per row
        fvu = mse / total_var.clamp_min(torch.finfo(x.dtype).tiny)
        l0 = x.new_tensor(entries.vals.numel() / max(n_rows, 1))
        l1 = vals.sum() / max(n_rows, 1)

        aux_loss = x.new_zeros(())
        if aux_entries is not None and aux_entries.vals.numel() > 0:
            aux_vals = all_vals[entries.vals.numel() :]
            aux_recon = sparse.decode_bags(aux_vals, self.W_dec, aux_entries.cols, aux_entries.rows, n_rows)
            # The residual x - x̂_G is -errors[-1]: AuxK's reconstruction of it errs by aux_recon + errors[-1].
            residual_var = errors[-1].var(dim=0, correction=0).sum()
            aux_loss = (aux_recon + errors[-1]).pow(2).sum(dim=-1).mean() / residual_var.clamp_min(
                torch.finfo(x.dtype).tiny
            )
        return SAEOutput(entries._replace(vals=vals), errors, mse, fvu, l0, l1, aux_loss)


def default_lr(d_sae: int) -> float:
    """The scaling-law learning rate used by the reference trainers: 2e-4 / sqrt(d_sae / 2^14)."""
    return 2e-4 / math.sqrt(d_sae / 2**14)
