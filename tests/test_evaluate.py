"""msae.evaluate: the held-out figures of a run (FVU per nested width, L0, dead and alive latents per group) against
a direct computation. CE loss recovered and a whole run's eval.json are checked on the real model in
test_lm_corpus.py's end-to-end training."""

import pytest
import torch

from msae.evaluate import reconstruction_metrics
from msae.sae import SAE


def test_reconstruction_metrics_equal_a_direct_computation_at_every_width():
    torch.manual_seed(0)
    sae = SAE(12, [8, 32], k=3, activation="topk")
    x = torch.randn(300, 12) * 2 + 1  # a mean away from zero: the FVU is against the rows' own mean
    got = reconstruction_metrics(sae, iter(x.split(70)))

    latents = sae.encode(x)
    x64 = x.double()
    total = ((x64 - x64.mean(0)) ** 2).sum()
    fvu = [((sae.decode(latents, width).double() - x64) ** 2).sum() / total for width in (8, 32)]
    fired = (latents > 0).sum(0)
    assert got.rows == 300 and got.widths == [8, 32]
    assert got.fvu == pytest.approx([f.item() for f in fvu], rel=1e-5)
    assert got.explained_variance == pytest.approx([1 - f.item() for f in fvu], rel=1e-5)
    assert got.l0 == pytest.approx(3.0), "top-k keeps k per row"
    assert got.dead_fraction == pytest.approx((fired == 0).double().mean().item())
    assert got.l0_per_group == pytest.approx([fired[:8].sum().item() / 300, fired[8:].sum().item() / 300])
    assert got.alive_per_100k_per_group == pytest.approx([(fired[:8] > 0).double().mean().item(),
                                                          (fired[8:] > 0).double().mean().item()])


def test_no_rows_is_refused():
    with pytest.raises(ValueError, match="no held-out rows"):
        reconstruction_metrics(SAE(4, [8], k=2, activation="topk"), iter([]))
