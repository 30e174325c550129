"""Training: the nested loss, decoder constraint, schedule, checkpoints and resume, bad data, the CLI."""

import json

import pytest
import torch
from safetensors.torch import save_file

from msae import io
from msae.cli import main as cli_main
from msae.reports import reads_note
from msae.run import Run
from msae.sae import SAE
from msae.config import ConfigError, TrainConfig
from msae.train import TensorBatches, Trainer, TrainingError, geometric_median, lr_at

D_IN = 16


def toy_acts(n=2048, seed=0):
    """Sparse non-negative combinations of 48 random directions, plus a constant offset."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(48, D_IN, generator=g)
    coef = torch.rand(n, 48, generator=g) * (torch.rand(n, 48, generator=g) < 0.08)
    return coef @ dirs + 3.0


def small_cfg(**kw):
    base = dict(widths=(8, 24, 64), k=4, steps=30, batch_size=128, checkpoint_every=10, log_every=5, lr=3e-3, seed=3)
    base.update(kw)
    return TrainConfig(**base)


def test_cumulative_loss_equals_naive_per_prefix_sum():
    torch.manual_seed(0)
    sae = SAE(D_IN, [8, 24, 64], k=4, dtype=torch.float64)
    x = torch.randn(50, D_IN, dtype=torch.float64)
    out = sae(x)
    acts = out.entries.dense(50, 64)
    naive = torch.stack([((acts[:, :w] @ sae.W_dec[:w] + sae.b_dec - x) ** 2).sum(-1).mean() for w in sae.widths])
    torch.testing.assert_close(out.mse, naive)
    weights = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)
    torch.testing.assert_close((weights * out.mse).sum(), (weights * naive).sum())
    assert len(set(out.mse.tolist())) == 3, "the prefixes must differ, or the comparison proves nothing"


def test_decoder_rows_stay_unit_norm_and_loss_falls(tmp_path):
    trainer = Trainer(small_cfg(steps=60), TensorBatches(toy_acts()), tmp_path / "run")
    trainer.train()
    sae = trainer.states[0].sae
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(sae.d_sae), atol=1e-5, rtol=0)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["fvu"][-1] < 0.5 * lines[0]["fvu"][-1]
    assert sae.threshold.item() > 0, "BatchTopK's inference threshold is learned"


def test_nested_widths_order_their_fvu(tmp_path):
    trainer = Trainer(small_cfg(steps=60), TensorBatches(toy_acts()), tmp_path / "run")
    trainer.train()
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["fvu"] == sorted(last["fvu"], reverse=True)


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path):
    acts = toy_acts()
    cfg = small_cfg(also_vanilla=True)
    straight = Trainer(cfg, TensorBatches(acts), tmp_path / "straight")
    straight.train()

    class Killed(Exception):
        pass

    def kill_at_step_25(step, _metrics):
        if step == 25:
            raise Killed

    first = Trainer(cfg, TensorBatches(acts), tmp_path / "resumed", progress=kill_at_step_25)
    with pytest.raises(Killed):
        first.train()
    resumed = Trainer(cfg, TensorBatches(acts), tmp_path / "resumed")
    resumed.train(resume=True)

    for a, b in zip(straight.states, resumed.states):
        for (name, p), q in zip(a.sae.state_dict().items(), b.sae.state_dict().values()):
            assert torch.equal(p, q), f"{a.name}.{name} differs after resume"
        assert torch.equal(a.tokens_since_fired, b.tokens_since_fired)
    steps = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "matryoshka" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 30


def test_a_stopped_run_leaves_a_usable_sae_at_its_last_checkpoint_with_calibrated_theta(tmp_path):
    acts = toy_acts()

    class Killed(Exception):
        pass

    def kill_at_step_25(step, _metrics):
        if step == 25:
            raise Killed

    with pytest.raises(Killed):
        Trainer(small_cfg(also_vanilla=True), TensorBatches(acts), tmp_path / "run", progress=kill_at_step_25).train()
    for name in ("matryoshka", "vanilla"):
        info = Run(tmp_path / "run" / name).info()
        assert info.steps_done == 20, "the snapshot of the last checkpoint (step 20), not a later state"
        assert info.threshold.rows == 8 * 128, "θ calibrated on the last 8 batches trained on"
        assert info.threshold.l0_theta == pytest.approx(info.threshold.l0_batchtopk, rel=0.02)
        assert info.threshold.theta != info.threshold.running_theta
        sae = Run(tmp_path / "run" / name).load_sae()
        assert torch.isfinite(sae.W_dec).all()
        # θ is on the training's scale; the saved SAE reads raw rows with unit decoder rows: θ / act_scale.
        assert sae.threshold.max().item() == pytest.approx(info.threshold.theta / info.act_scale, rel=1e-6)
        torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(sae.d_sae), rtol=0, atol=1e-6)

    # Snapshots leave training alone: the same run with no checkpoint on the way ends with the same weights.
    a = Trainer(small_cfg(), TensorBatches(acts), tmp_path / "every10")
    a.train()
    b = Trainer(small_cfg(checkpoint_every=1000), TensorBatches(acts), tmp_path / "none")
    b.train()
    for p, q in zip(a.states[0].sae.state_dict().values(), b.states[0].sae.state_dict().values()):
        assert torch.equal(p, q)


def test_resume_refuses_changed_settings(tmp_path):
    Trainer(small_cfg(steps=10), TensorBatches(toy_acts()), tmp_path / "run").train()
    with pytest.raises(TrainingError, match="different settings: k"):
        Trainer(small_cfg(steps=20, k=5), TensorBatches(toy_acts()), tmp_path / "run").train(resume=True)


def test_nan_in_data_stops_with_the_step_and_keeps_the_last_checkpoint(tmp_path):
    acts = toy_acts(n=128 * 15)
    bad_row = 128 * 12 + 7
    acts[bad_row, 3] = float("nan")
    # The first epoch's batch order (TensorBatches seeds epoch 0 with seed * 1_000_003) says which step meets it.
    perm = torch.randperm(acts.shape[0], generator=torch.Generator().manual_seed(3 * 1_000_003))
    bad_step = (perm == bad_row).nonzero().item() // 128
    assert bad_step >= 5, "this seed must put the bad row after the first checkpoint"
    trainer = Trainer(small_cfg(steps=15, checkpoint_every=5), TensorBatches(acts), tmp_path / "run")
    with pytest.raises(TrainingError, match=f"step {bad_step}: the activation batch has NaN or Inf"):
        trainer.train()
    ckpt = tmp_path / "run" / "checkpoint" / "state.safetensors"
    assert ckpt.exists()
    resumed = Trainer(small_cfg(steps=15, checkpoint_every=5), TensorBatches(acts), tmp_path / "run")
    resumed.load_checkpoint()
    assert resumed.step == (bad_step // 5) * 5
    assert all(torch.isfinite(p).all() for s in resumed.states for p in s.sae.parameters())


def test_existing_run_is_not_overwritten_without_resume(tmp_path):
    Trainer(small_cfg(steps=10), TensorBatches(toy_acts()), tmp_path / "run").train()
    with pytest.raises(TrainingError, match="already holds a run"):
        Trainer(small_cfg(steps=10), TensorBatches(toy_acts()), tmp_path / "run").train()


def test_saved_run_is_folded_back_to_raw_scale(tmp_path):
    acts = toy_acts()
    trainer = Trainer(small_cfg(steps=60), TensorBatches(acts), tmp_path / "run")
    trainer.train()
    sae, cfg = io.load_sae(tmp_path / "run")
    x = acts[:256]
    recon = sae.decode(sae.encode(x))
    fvu_raw = ((recon - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    trained = trainer.states[0].sae.eval()
    xs = x * trainer.scale
    recon_scaled = trained.decode(trained.encode(xs))
    fvu_scaled = ((recon_scaled - xs) ** 2).sum() / ((xs - xs.mean(0)) ** 2).sum()
    torch.testing.assert_close(fvu_raw, fvu_scaled, atol=1e-4, rtol=1e-3)
    # Measured 0.55 with the learned θ after 60 steps (an untrained SAE is near 1): the saved SAE works.
    assert fvu_raw < 0.75
    assert cfg["d_in"] == D_IN and cfg["d_sae"] == 64


def test_lr_schedule_warms_up_and_decays():
    cfg = TrainConfig(steps=100, warmup_steps=10, decay_fraction=0.2)
    assert lr_at(0, cfg, 1.0) == pytest.approx(0.1)
    assert lr_at(50, cfg, 1.0) == 1.0
    assert lr_at(90, cfg, 1.0) == pytest.approx(0.5)
    assert lr_at(99, cfg, 1.0) == pytest.approx(0.05)


def test_geometric_median_resists_outliers():
    pts = torch.cat([torch.randn(200, 3, dtype=torch.float64) * 0.1, torch.full((20, 3), 1000.0, dtype=torch.float64)])
    med = geometric_median(pts)
    assert med.norm() < 0.2
    assert pts.mean(0).norm() > 50


def test_msae_train_writes_a_matryoshka_and_a_vanilla_run(tmp_path, capsys):
    path = tmp_path / "acts.safetensors"
    save_file({"activations": toy_acts()}, str(path))
    argv = ["train", "--activations", str(path), "--arch", "matryoshka", "--widths", "8,24,64", "--k", "4",
            "--steps", "20", "--batch-size", "128", "--seed", "1", "--out", str(tmp_path / "run"), "--also-vanilla"]
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    assert "matryoshka:" in out and "vanilla:" in out
    mat, _ = io.load_sae(tmp_path / "run" / "matryoshka")
    van, _ = io.load_sae(tmp_path / "run" / "vanilla")
    assert mat.widths == [8, 24, 64] and van.widths == [64]


@pytest.mark.parametrize(
    "tensors, message",
    [
        ({"acts": torch.zeros(10, 4)}, "no tensor named 'activations'"),
        ({"activations": torch.zeros(10)}, "must be a 2-D float tensor"),
    ],
)
def test_cli_rejects_bad_activation_files(tmp_path, capsys, tensors, message):
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path))
    assert cli_main(["train", "--activations", str(path), "--out", str(tmp_path / "r")]) == 2
    assert message in capsys.readouterr().err


def test_cli_rejects_a_file_that_is_not_safetensors(tmp_path, capsys):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"not safetensors at all")  # a pickle header is refused as a pickle (test_bad_input.py)
    assert cli_main(["train", "--activations", str(path), "--out", str(tmp_path / "r")]) == 2
    assert "not a readable safetensors file" in capsys.readouterr().err


def _l0_with_theta_and_batchtopk(run_dir, x):
    """Inference L0 of a saved run with its θ, and BatchTopK's L0, on rows x."""
    sae = Run(run_dir).load_sae(dtype=torch.float64)
    with_theta = sae.select(x.double()).vals.numel() / x.shape[0]
    sae.threshold.fill_(-1.0)  # an unset θ: inference falls back to BatchTopK over the batch
    return with_theta, sae.select(x.double()).vals.numel() / x.shape[0]


def test_theta_is_calibrated_to_batchtopk_l0_where_the_old_ema_was_not(tmp_path):
    """A short run (150 steps): the calibrated θ gives BatchTopK's L0 within 2% on held-in rows it was not
    calibrated on; the old running estimate (EMA β 0.999 from step steps/10, no calibration) misses by more."""
    g = torch.Generator().manual_seed(3)
    basis = torch.randn(96, 32, generator=g)
    def sample(n):
        codes = torch.rand(n, 96, generator=g).lt(0.06).double() * torch.rand(n, 96, generator=g).double()
        return codes @ basis.double() + 0.05 * torch.randn(n, 32, generator=g).double()
    train, fresh = sample(40_000), sample(8192)
    common = dict(widths=(32, 128), k=6, steps=150, batch_size=512, device="cpu", dtype="float64", lr=3e-3)
    new = Trainer(TrainConfig(**common), TensorBatches(train), tmp_path / "new").train()["matryoshka"]
    old = Trainer(TrainConfig(**common, threshold_beta=0.999, threshold_start_step=15, threshold_batches=0),
                  TensorBatches(train), tmp_path / "old").train()["matryoshka"]
    info = Run(new).info().threshold
    assert info.rows == 8 * 512 and info.exact and info.l0_theta == pytest.approx(info.l0_batchtopk, abs=1e-9)
    theta_l0, topk_l0 = _l0_with_theta_and_batchtopk(new, fresh)
    assert abs(theta_l0 / topk_l0 - 1) < 0.02, (theta_l0, topk_l0)
    old_theta_l0, old_topk_l0 = _l0_with_theta_and_batchtopk(old, fresh)
    assert abs(old_theta_l0 / old_topk_l0 - 1) > 0.02, (old_theta_l0, old_topk_l0)
    assert Run(old).info().threshold.rows == 0


def test_a_dead_latent_gets_gradient_through_auxk_and_the_dead_window_scales_with_the_run():
    assert TrainConfig(steps=1000, batch_size=4096).dead_window == 409_600, "a tenth of a 4.1M-token run"
    assert TrainConfig(steps=100_000, batch_size=4096).dead_window == 10_000_000
    sae = SAE(D_IN, [16, 64], k=4, dtype=torch.float64)
    x = toy_acts(n=256).double()
    with torch.no_grad():  # latent 5: a small positive pre-activation everywhere, never among the top k
        sae.W_enc[:, 5] = 0.0
        sae.b_enc[5] = 1e-3
    dead = torch.zeros(64, dtype=torch.bool)
    dead[5] = True
    out = sae(x, dead_mask=dead, k_aux=8)
    assert 5 not in out.entries.cols.tolist()
    out.aux_loss.backward()
    assert sae.W_dec.grad[5].abs().sum() > 0 and sae.W_enc.grad[:, 5].abs().sum() > 0
    assert sae.W_dec.grad[6:].abs().sum() == 0, "AuxK reaches only the dead latents"


def test_balance_weights_follow_the_paper_and_per_group_l0_adds_up(tmp_path):
    cfg = TrainConfig(widths=(8, 16, 32, 64), k=4, balance=0.5)
    assert cfg.level_weights_for(4) == (0.125, 0.25, 0.5, 1.0)
    assert TrainConfig(widths=(8, 64), k=4).level_weights_for(2) == (0.5, 0.5)
    with pytest.raises(ValueError, match="not both"):
        TrainConfig(widths=(8, 64), k=4, balance=0.5, level_weights=(1.0, 1.0))
    run = Trainer(TrainConfig(widths=(16, 64), k=4, steps=6, batch_size=128, device="cpu", log_every=2,
                              balance=0.25), TensorBatches(toy_acts(n=1024)), tmp_path / "b").train()["matryoshka"]
    for m in Run(run).metrics():
        assert len(m.l0_per_group) == 2 and sum(m.l0_per_group) == pytest.approx(m.l0)


def test_a_narrow_vanilla_sae_trains_on_the_same_batches(tmp_path):
    cfg = small_cfg(also_vanilla=True, also_narrow=24, steps=10)
    assert [name for name, _w in cfg.sae_specs()] == ["matryoshka", "vanilla", "vanilla-24"]
    dirs = Trainer(cfg, TensorBatches(toy_acts()), tmp_path / "run").train()
    narrow = Run(dirs["vanilla-24"]).load_sae()
    assert list(narrow.widths) == [24] and Run(dirs["vanilla-24"]).info().train.also_narrow == 24
    with pytest.raises(ValueError, match="also_narrow"):
        small_cfg(arch="vanilla", also_narrow=24)


def test_bf16_compute_trains_as_float32_does(tmp_path):
    """The same batches, seeds and settings with the encoder in bf16 and in float32 (weights, Adam and the loss float32
    in both): final training FVU per nested width within 0.02 and the same L0 (BatchTopK keeps k·B either way). The
    float32 runs of seeds 3, 4, 5 end 0.05 apart, so 0.02 is well inside the spread that seeds alone give; a bf16
    path that trains on stale or wrongly cast weights ends 0.4 higher (seen)."""
    for seed in (3, 4):
        final = {}
        for precision in ("float32", "bfloat16"):
            out = tmp_path / f"{seed}-{precision}"
            trainer = Trainer(small_cfg(steps=60, seed=seed, precision=precision), TensorBatches(toy_acts()), out)
            assert trainer.compute_dtype_name == precision
            trainer.train()
            lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            final[precision] = lines[-1]
        for a, b in zip(final["float32"]["fvu"], final["bfloat16"]["fvu"]):
            assert abs(a - b) < 0.02, (seed, final["float32"]["fvu"], final["bfloat16"]["fvu"])
        assert final["float32"]["l0"] == final["bfloat16"]["l0"] == 4


def test_resume_refuses_another_compute_dtype(tmp_path):
    cfg = small_cfg(steps=20, checkpoint_every=10, precision="bfloat16")
    Trainer(cfg, TensorBatches(toy_acts()), tmp_path / "run").train()
    more = small_cfg(steps=30, checkpoint_every=10, precision="float32")
    with pytest.raises(TrainingError, match="trained with bfloat16 matmuls.*pass --precision bfloat16"):
        Trainer(more, TensorBatches(toy_acts()), tmp_path / "run").train(resume=True)
    assert Run(tmp_path / "run").info().compute_dtype == "bfloat16"


def test_a_run_without_steps_reads_each_training_row_once(tmp_path):
    """steps None: one pass over the stream (each row read once); `passes` asks for more; both at once, or too few
    rows for one batch, are refused naming the setting. The steps fixed are what the run records and trains to."""
    rows = toy_acts(1000)
    trainer = Trainer(small_cfg(steps=None, widths=(8, 64)), TensorBatches(rows), tmp_path / "once")
    assert trainer.cfg.steps == 1000 // 128
    assert trainer.cfg.passes_over(1000) <= 1.0
    run = trainer.train()["matryoshka"]
    assert Run(run).metrics()[-1].step == 1000 // 128
    assert json.loads((run / "cfg.json").read_text())["msae"]["train"]["steps"] == 1000 // 128
    assert "each read at most once" in reads_note(trainer.cfg, 1000)

    twice = Trainer(small_cfg(steps=None, passes=2.5, widths=(8, 64)), TensorBatches(rows), tmp_path / "more")
    assert twice.cfg.steps == 2500 // 128
    assert "read 2.4 times" in reads_note(twice.cfg, 1000)
    with pytest.raises(ConfigError, match="give steps or passes, not both"):
        small_cfg(steps=10, passes=2.0)
    with pytest.raises(ConfigError, match="make no batch of 128"):
        Trainer(small_cfg(steps=None), TensorBatches(rows[:100]), tmp_path / "few")
