"""The sparse kernels against the plain dense computation, in float64."""

import pytest
import torch

from msae import sparse
from msae.sae import SAE

D_IN, WIDTHS, K, B = 24, [16, 48, 128], 6, 40


def dense_forward(sae: SAE, x: torch.Tensor, latents_mask: torch.Tensor, aux_mask: torch.Tensor | None):
    """The plain version: dense pre-activations, masks applied, one dense decode per nested width."""
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    acts = pre * latents_mask
    recons = torch.stack([acts[:, :w] @ sae.W_dec[:w] + sae.b_dec for w in sae.widths])
    mse = (recons - x).pow(2).sum(-1).mean(-1)
    aux = x.new_zeros(())
    if aux_mask is not None:
        residual = (x - recons[-1]).detach()
        aux_recon = (pre * aux_mask) @ sae.W_dec
        aux = (aux_recon - residual).pow(2).sum(-1).mean() / (residual - residual.mean(0)).pow(2).sum(-1).mean()
    return recons, mse, aux


def make_sae(activation="batchtopk", seed=0):
    torch.manual_seed(seed)
    sae = SAE(D_IN, WIDTHS, k=K, activation=activation, dtype=torch.float64)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
    return sae


@pytest.mark.parametrize("activation", ["batchtopk", "topk", "relu"])
def test_sparse_forward_and_grads_match_dense(activation):
    sae = make_sae(activation)
    x = torch.randn(B, D_IN, dtype=torch.float64)
    dead = torch.zeros(sae.d_sae, dtype=torch.bool)
    dead[::3] = True
    weights = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)

    out = sae(x, dead_mask=dead, k_aux=5)
    loss = (weights * out.mse).sum() + 0.5 * out.aux_loss
    loss.backward()
    sparse_grads = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad()

    latents_mask = torch.zeros(B, sae.d_sae, dtype=torch.float64)
    latents_mask[out.entries.rows, out.entries.cols] = 1.0
    pre = ((x - sae.b_dec) @ sae.W_enc + sae.b_enc).detach()
    aux_pre = pre.masked_fill(~dead, float("-inf"))
    top = aux_pre.topk(5, dim=1)
    aux_mask = torch.zeros_like(pre).scatter(1, top.indices, (top.values > 0).double())
    recons, mse, aux = dense_forward(sae, x, latents_mask, aux_mask)
    ((weights * mse).sum() + 0.5 * aux).backward()

    torch.testing.assert_close(out.recons, recons, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(out.aux_loss, aux, atol=1e-10, rtol=1e-8)
    assert out.aux_loss.item() > 0
    for name, p in sae.named_parameters():
        torch.testing.assert_close(sparse_grads[name], p.grad, atol=1e-5, rtol=1e-5, msg=name)


def test_batchtopk_keeps_exactly_k_times_batch():
    sae = make_sae("batchtopk")
    x = torch.randn(B, D_IN, dtype=torch.float64)
    entries = sae.select(x)
    assert entries.vals.numel() == K * B
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    kth = pre.flatten().topk(K * B).values[-1]
    assert entries.vals.min() >= kth - 1e-12  # chunked addmm vs one matmul differ in the last bit
    torch.testing.assert_close(entries.vals, pre[entries.rows, entries.cols])


def test_batchtopk_is_exact_when_the_first_chunk_is_unrepresentative():
    """Rows after the first chunk are scaled up so the first-chunk threshold estimate is far too high."""
    torch.manual_seed(1)
    x = torch.randn(600, 32, dtype=torch.float64)
    x[256:] *= 30
    W = torch.randn(32, 200, dtype=torch.float64)
    b = torch.zeros(200, dtype=torch.float64)
    entries = sparse.select_batchtopk(x, W, b, k=4, chunk_rows=256)
    pre = (x @ W).relu()
    expect = pre.flatten().topk(4 * 600).values
    assert entries.vals.numel() == 4 * 600
    torch.testing.assert_close(entries.vals.sort().values, expect.sort().values)
    rows_in_first = (entries.rows < 256).sum().item()
    assert rows_in_first < 4 * 256, "the scaled rows should take most of the batch budget"


def test_entries_are_row_major():
    sae = make_sae("batchtopk")
    entries = sae.select(torch.randn(B, D_IN, dtype=torch.float64))
    key = entries.rows * sae.d_sae + entries.cols
    assert torch.equal(key, key.sort().values)


def test_threshold_inference_uses_learned_threshold():
    sae = make_sae("batchtopk").eval()
    x = torch.randn(B, D_IN, dtype=torch.float64)
    sae.threshold.fill_(0.5)
    acts = sae.encode(x)
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    torch.testing.assert_close(acts, pre * (pre > 0.5))
