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

    torch.testing.assert_close(x + out.errors, recons, atol=1e-10, rtol=1e-8)
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
    entries = sparse.select_batchtopk(sparse.fold_rows(x, None), sparse.fold_weights(W, b), k=4, chunk_rows=256)
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


# ---- bf16 compute (msae.lm.compute_dtype): float32 weights, bf16 encoder matmul and selection -------------------

BF16_U = 2.0**-8
"""bf16's unit roundoff (8 significant bits)."""


def bf16_copy(sae64: SAE) -> SAE:
    """The float64 SAE's weights in float32 (the master weights), computing its encoder in bf16."""
    sae = SAE(D_IN, WIDTHS, k=K, activation=sae64.activation, dtype=torch.float32)
    sae.load_state_dict({name: t.float() for name, t in sae64.state_dict().items()})
    sae.compute_dtype = torch.bfloat16
    return sae


def test_bf16_selection_and_values_are_the_float64_ones_within_bf16_rounding():
    """Bound per entry: x - b_dec and W_enc are rounded to bf16 (u each), their products summed in float32, b_enc and
    the result rounded (u each): |pre_bf16 - pre| <= 4u (sum_i |x_i W_i| + |b|). BatchTopK on the rounded values
    keeps k·B entries, and no entry left out beats a kept one by more than both their bounds."""
    sae64 = make_sae("batchtopk")
    sae = bf16_copy(sae64)
    x = torch.randn(B, D_IN, dtype=torch.float64)
    entries = sae.select(x.float())
    assert entries.vals.dtype == torch.float32 and entries.vals.numel() == K * B
    W, b_enc, b_dec = (sae.state_dict()[n].double() for n in ("W_enc", "b_enc", "b_dec"))
    pre = (x - b_dec) @ W + b_enc
    bound = 4 * BF16_U * ((x - b_dec).abs() @ W.abs() + b_enc.abs())
    kept = torch.zeros_like(pre, dtype=torch.bool)
    kept[entries.rows, entries.cols] = True
    err = (entries.vals.double() - pre[kept.nonzero(as_tuple=True)]).abs()
    assert (err <= bound[kept.nonzero(as_tuple=True)]).all(), err.max()
    assert err.max() > 0, "bf16 rounding must show, or the matmul did not run in bf16"
    # For every kept s and left-out t: pre[t] - pre[s] <= bound[t] + bound[s].
    assert (pre - bound)[~kept].max() <= (pre + bound)[kept].min()


def test_bf16_gradients_are_the_float64_ones_within_bf16_rounding():
    """Same entries, values carrying bf16's rounding (<= 4u relative to sum |x W| + |b|, about 1.6%): every gradient
    is linear in the values, so each parameter's gradient is within 5% (relative L2) of float64's on the same
    entries. A stale or untransposed encoder gives errors of order 100%."""
    sae64 = make_sae("batchtopk")
    sae = bf16_copy(sae64)
    x = torch.randn(B, D_IN, dtype=torch.float64)
    dead = torch.zeros(sae.d_sae, dtype=torch.bool)
    dead[::3] = True
    weights = torch.tensor([0.2, 0.3, 0.5])
    out = sae(x.float(), dead_mask=dead, k_aux=5)
    ((weights * out.mse).sum() + 0.5 * out.aux_loss).backward()

    latents_mask = torch.zeros(B, sae.d_sae, dtype=torch.float64)
    latents_mask[out.entries.rows, out.entries.cols] = 1.0
    pre = ((x - sae64.b_dec) @ sae64.W_enc + sae64.b_enc).detach()
    top = pre.masked_fill(~dead, float("-inf")).topk(5, dim=1)
    aux_mask = torch.zeros_like(pre).scatter(1, top.indices, (top.values > 0).double())
    recons, mse, aux = dense_forward(sae64, x, latents_mask, aux_mask)
    ((weights.double() * mse).sum() + 0.5 * aux).backward()
    torch.testing.assert_close(out.mse.double(), mse.detach(), rtol=0.05, atol=0.0)
    for name, p in sae.named_parameters():
        ref = dict(sae64.named_parameters())[name].grad
        rel = (p.grad.double() - ref).norm() / ref.norm()
        assert rel < 0.05, (name, rel.item())


@pytest.mark.parametrize("n", [4096, 4099])
def test_bf16_bit_pattern_compare_equals_the_float_compare(n):
    """The int16 compare of bf16 bit patterns (and the 8-bytes-at-a-time scan) keeps exactly what `>` keeps, for
    thresholds >= 0 and values of both signs, zeros of both signs, and values equal to the threshold."""
    torch.manual_seed(0)
    flat = torch.randn(n).bfloat16()
    flat[:50] = 0.0
    flat[50:100] = -0.0
    flat[100:150] = 0.5
    for threshold in (0.0, 0.5, 1.25, 3.0):
        want = (flat.float() > threshold).nonzero().squeeze(1)
        assert torch.equal(sparse._positions_above(flat, threshold), want), threshold
