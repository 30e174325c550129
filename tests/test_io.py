"""Saving and loading run directories, and reading SAELens and dictionary_learning SAEs, on real files."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import msae.io as io
from msae.io import SAELoadError
from msae.sae import SAE

D_IN, D_SAE = 16, 64
WIDTHS = [8, 24, 64]


def random_sae(widths=WIDTHS, activation="batchtopk", k=4, seed=0, dtype=torch.float32) -> SAE:
    """An SAE with every tensor random (biases included), unit decoder rows as msae trains them, and a
    learned-looking threshold, in eval mode."""
    sae = SAE(D_IN, widths, k=k, activation=activation, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)
        sae.normalize_decoder()
        if activation == "jumprelu":
            sae.threshold = torch.rand(sae.d_sae, generator=g, dtype=torch.float64).to(dtype) * 0.5
        else:
            sae.threshold.fill_(0.25)
    return sae.eval()


def inputs(n=32, seed=1) -> torch.Tensor:
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed)) * 2


def jumprelu_ref(x, W_enc, b_enc, b_dec, threshold) -> torch.Tensor:
    """SAELens's and dictionary_learning's thresholded encode, written out."""
    pre = (x - b_dec) @ W_enc + b_enc
    return torch.relu(pre) * (pre > threshold)


def saved_run(tmp_path: Path, sae: SAE | None = None) -> Path:
    return io.save_sae(sae or random_sae(), tmp_path / "run", cfg={"msae": {"model": "toy", "layer": 3}})


def rewrite_weights(run: Path, edit) -> None:
    """Rewrite sae_weights.safetensors after `edit(tensors)` changed the dict in place."""
    tensors = load_file(str(run / io.WEIGHTS_FILE))
    edit(tensors)
    save_file(tensors, str(run / io.WEIGHTS_FILE))


def rewrite_cfg(run: Path, **changes) -> None:
    cfg = json.loads((run / io.CFG_FILE).read_text())
    (run / io.CFG_FILE).write_text(json.dumps({**cfg, **changes}))


# ------------------------------------------------------------------------------------------- round trip


@pytest.mark.parametrize(
    "widths, activation, architecture, training_architecture",
    [
        (WIDTHS, "batchtopk", "jumprelu", "matryoshka_batchtopk"),
        ([64], "batchtopk", "jumprelu", "batchtopk"),
        ([64], "topk", "topk", "topk"),
        ([16, 64], "relu", "standard", "standard"),
        ([64], "jumprelu", "jumprelu", "jumprelu"),
    ],
)
def test_a_saved_sae_loads_back_with_the_same_tensors_and_a_saelens_cfg(tmp_path, widths, activation, architecture, training_architecture):
    sae = random_sae(widths, activation)
    run = io.save_sae(sae, tmp_path / "run", cfg={"msae": {"model": "toy", "layer": 3}, "msae_version": "0.1.0"})
    loaded, cfg = io.load_sae(run)
    for name, tensor in sae.state_dict().items():
        if name == "threshold" and activation in ("topk", "relu"):
            continue  # not stored: those rules never read it
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert (loaded.d_in, loaded.widths, loaded.k, loaded.activation) == (D_IN, widths, 4, activation)
    assert not loaded.training
    assert cfg["architecture"] == architecture
    assert cfg["metadata"]["training_architecture"] == training_architecture
    assert cfg["metadata"]["sae_lens_version"] == io.SAE_LENS_LAYOUT
    assert cfg["d_in"] == D_IN and cfg["d_sae"] == 64 and cfg["k"] == 4
    assert cfg["matryoshka_widths"] == widths and cfg["dtype"] == "float32" and cfg["device"] == "cpu"
    assert cfg["apply_b_dec_to_input"] is True and cfg["normalize_activations"] == "none"
    assert cfg["msae"] == {"model": "toy", "layer": 3} and cfg["msae_version"] == "0.1.0"
    assert io.read_cfg(run) == cfg
    x = inputs()
    torch.testing.assert_close(loaded.decode(loaded.encode(x)), sae.decode(sae.encode(x)), rtol=0, atol=0)


def test_load_accepts_the_weights_file_and_a_dtype(tmp_path):
    sae = random_sae()
    run = io.save_sae(sae, tmp_path / "run", dtype=torch.bfloat16)
    assert io.read_cfg(run)["dtype"] == "bfloat16"
    stored, _ = io.load_sae(run / io.WEIGHTS_FILE)
    assert stored.W_enc.dtype == torch.bfloat16
    assert torch.equal(stored.W_dec, sae.W_dec.to(torch.bfloat16))
    widened, _ = io.load_sae(run, dtype=torch.float64)
    assert widened.W_enc.dtype == widened.threshold.dtype == torch.float64


def test_act_scale_is_folded_into_the_saved_weights(tmp_path):
    """Trained on x * scale with unit rows: the saved SAE reads raw x, its rows stay unit, so its latents are the
    trained ones divided by scale (b_enc and θ with them) and its reconstructions the trained ones divided by scale."""
    sae = random_sae()
    before = {name: t.clone() for name, t in sae.state_dict().items()}
    scale = 3.7
    loaded, cfg = io.load_sae(io.save_sae(sae, tmp_path / "run", act_scale=scale))
    assert all(torch.equal(sae.state_dict()[name], t) for name, t in before.items()), "the module was modified"
    x = inputs()
    latents_scaled = sae.encode(x * scale)
    assert (latents_scaled > 0).any() and not torch.equal(latents_scaled, sae.encode(x))
    torch.testing.assert_close(loaded.encode(x), latents_scaled / scale)
    torch.testing.assert_close(loaded.decode(loaded.encode(x)), sae.decode(latents_scaled) / scale)
    torch.testing.assert_close(loaded.W_dec, sae.W_dec)
    torch.testing.assert_close(loaded.b_enc, sae.b_enc / scale)
    torch.testing.assert_close(loaded.threshold, sae.threshold / scale)


def _rows_of_norms(sae: SAE, norms: torch.Tensor) -> SAE:
    with torch.no_grad():
        sae.W_dec.mul_(norms.to(sae.W_dec.dtype)[:, None])
    return sae


@pytest.mark.parametrize("activation", ["relu", "jumprelu"])
def test_rows_of_any_norm_are_saved_unit_with_each_norm_folded_into_its_latent(tmp_path, activation):
    """In float64, so that "the same to float rounding" is tight: latent i comes back n_i times itself (its
    threshold too) and every reconstruction is the same."""
    norms = torch.linspace(0.05, 40.0, D_SAE, dtype=torch.float64)
    sae = _rows_of_norms(random_sae([64], activation, dtype=torch.float64), norms)
    loaded, _ = io.load_sae(io.save_sae(sae, tmp_path / "run", act_scale=2.5))
    torch.testing.assert_close(loaded.W_dec.norm(dim=1), torch.ones(D_SAE, dtype=torch.float64), rtol=0, atol=1e-12)
    x = inputs().double()
    theirs = sae.encode(x * 2.5)
    assert (theirs > 0).sum() > x.shape[0], "too few latents fire for the comparison to say anything"
    torch.testing.assert_close(loaded.encode(x), theirs * norms / 2.5)
    torch.testing.assert_close(loaded.decode(loaded.encode(x)), sae.decode(theirs) / 2.5)


@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
def test_a_ranking_rule_folds_the_norm_its_rows_share_and_keeps_its_choice(tmp_path, activation):
    """TopK and BatchTopK compare latents: one common factor keeps which latents win. Rows of one norm (what msae
    trains) are saved unit; rows of different norms keep their ratios, so the choice is still the same."""
    x = inputs().double()
    for norms, unit in ((torch.full((D_SAE,), 7.0, dtype=torch.float64), True),
                        (torch.linspace(0.5, 2.0, D_SAE, dtype=torch.float64), False)):
        sae = _rows_of_norms(random_sae([64], activation, dtype=torch.float64), norms)
        loaded, _ = io.load_sae(io.save_sae(sae, tmp_path / f"run-{unit}"))
        saved_norms = loaded.W_dec.norm(dim=1)
        torch.testing.assert_close(saved_norms, norms / norms.mean())
        assert bool(((saved_norms - 1).abs() < 1e-12).all()) == unit
        theirs, ours = sae.encode(x), loaded.encode(x)
        assert torch.equal(theirs > 0, ours > 0) and (ours > 0).any()
        torch.testing.assert_close(ours, theirs * norms.mean())
        torch.testing.assert_close(loaded.decode(ours), sae.decode(theirs))


def test_saving_a_loaded_run_again_changes_no_bit(tmp_path):
    sae = _rows_of_norms(random_sae(), torch.full((D_SAE,), 0.01))
    first = io.save_sae(sae, tmp_path / "first", act_scale=3.0)
    again = io.save_sae(io.load_sae(first)[0], tmp_path / "again")
    for name, tensor in load_file(str(first / io.WEIGHTS_FILE)).items():
        assert torch.equal(load_file(str(again / io.WEIGHTS_FILE))[name], tensor), name


def test_cfg_fields_that_contradict_the_sae_are_refused(tmp_path):
    with pytest.raises(ValueError, match="d_sae"):
        io.save_sae(random_sae(), tmp_path / "run", cfg={"d_sae": 5})
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------ atomic writes


def test_saving_leaves_only_the_run_files(tmp_path):
    run = saved_run(tmp_path)
    io.save_sae(random_sae(seed=2), run)
    assert sorted(p.name for p in run.iterdir()) == [io.CFG_FILE, io.WEIGHTS_FILE]


def _fail_writing_weights(monkeypatch):
    def half_write(tensors, path, metadata=None):
        Path(path).write_bytes(b"\x00" * 100)
        raise OSError("disk full")

    monkeypatch.setattr(io, "save_file", half_write)


def _fail_flushing_cfg(monkeypatch):
    real_fsync = io._fsync

    def fsync(path):
        if io.CFG_FILE in path.name:
            raise OSError("disk full")
        real_fsync(path)

    monkeypatch.setattr(io, "_fsync", fsync)


@pytest.mark.parametrize("break_it", [_fail_writing_weights, _fail_flushing_cfg])
def test_a_failed_save_keeps_the_existing_run(tmp_path, monkeypatch, break_it):
    old = random_sae(seed=0)
    run = saved_run(tmp_path, old)
    old_cfg = (run / io.CFG_FILE).read_text()
    break_it(monkeypatch)
    with pytest.raises(OSError, match="disk full"):
        io.save_sae(random_sae([64], seed=5), run, cfg={"msae": {"model": "other"}})
    assert sorted(p.name for p in run.iterdir()) == [io.CFG_FILE, io.WEIGHTS_FILE]
    assert (run / io.CFG_FILE).read_text() == old_cfg
    monkeypatch.undo()
    loaded, _ = io.load_sae(run)
    assert torch.equal(loaded.W_enc, old.W_enc) and loaded.widths == WIDTHS


def test_atomic_writers_replace_whole_files(tmp_path):
    text_path = tmp_path / "metrics.jsonl"
    io.atomic_write_text(text_path, "a\n")
    io.atomic_write_text(text_path, "b\n")
    assert text_path.read_text() == "b\n"
    st_path = tmp_path / "state.safetensors"
    io.atomic_save_safetensors({"w": torch.ones(3)}, st_path, metadata={"step": "7"})
    with pytest.raises(Exception):
        io.atomic_save_safetensors({"w": torch.ones(4, 4).T}, st_path)  # non-contiguous: safetensors refuses
    assert torch.equal(load_file(str(st_path))["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "state.safetensors"]


# ----------------------------------------------------------------------------------------------- errors


class _Trap:
    """Unpickling this creates `marker`; the loaders must never let that happen."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _truncate(run: Path) -> None:
    data = (run / io.WEIGHTS_FILE).read_bytes()
    (run / io.WEIGHTS_FILE).write_bytes(data[: len(data) // 2])


def _pickle_as_weights(run: Path) -> None:
    torch.save({"W_enc": torch.zeros(D_IN, D_SAE), "trap": _Trap(run / "unpickled")}, run / io.WEIGHTS_FILE)


def _plain_pickle_as_weights(run: Path) -> None:
    (run / io.WEIGHTS_FILE).write_bytes(pickle.dumps(_Trap(run / "unpickled"), protocol=0))


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (_truncate, r"sae_weights.safetensors: not a safetensors file, or truncated"),
        (_pickle_as_weights, r"sae_weights.safetensors: not a safetensors file \(it looks like a pickle"),
        (_plain_pickle_as_weights, r"sae_weights.safetensors: not a safetensors file"),
        (lambda run: (run / io.CFG_FILE).unlink(), r"cfg.json: missing"),
        (lambda run: (run / io.WEIGHTS_FILE).unlink(), r"sae_weights.safetensors: missing"),
        (lambda run: (run / io.CFG_FILE).write_text("{not json"), r"cfg.json: not valid JSON"),
        (
            lambda run: rewrite_weights(run, lambda t: t.update(W_dec=torch.zeros(100, D_IN))),
            r"sae_weights.safetensors: W_dec has shape \(100, 16\), expected \(64, 16\) from cfg.json d_sae=64$",
        ),
        (
            lambda run: rewrite_weights(run, lambda t: t.update(W_enc=torch.zeros(D_IN + 1, D_SAE))),
            r"W_enc has shape \(17, 64\), expected \(16, 64\) from cfg.json d_in=16$",
        ),
        (
            lambda run: rewrite_weights(run, lambda t: t.update(b_dec=torch.zeros(1, D_IN))),
            r"b_dec has shape \(1, 16\), expected \(16,\) from cfg.json d_in=16$",
        ),
        (lambda run: rewrite_weights(run, lambda t: t.pop("b_enc")), r"tensor b_enc is missing"),
        (
            lambda run: rewrite_weights(run, lambda t: t["W_enc"].__setitem__((3, 5), float("nan"))),
            r"sae_weights.safetensors: W_enc has 1 NaN or Inf values",
        ),
        (
            lambda run: rewrite_weights(run, lambda t: t["b_dec"].__setitem__(0, float("inf"))),
            r"b_dec has 1 NaN or Inf values",
        ),
        (
            lambda run: rewrite_weights(run, lambda t: t.update(b_enc=torch.zeros(D_SAE, dtype=torch.int32))),
            r"b_enc is torch.int32, expected a floating-point tensor",
        ),
        (lambda run: rewrite_cfg(run, matryoshka_widths=[8, 24, 60]), r"cfg.json: matryoshka_widths \[8, 24, 60\] must be strictly increasing and end at d_sae=64"),
        (lambda run: rewrite_cfg(run, matryoshka_widths=[24, 8, 64]), r"matryoshka_widths \[24, 8, 64\] must be strictly increasing"),
        (lambda run: rewrite_cfg(run, d_sae=0), r"cfg.json: d_sae must be a positive integer, got 0"),
        (lambda run: rewrite_cfg(run, k=65), r"cfg.json: k=65 exceeds d_sae=64"),
        (lambda run: rewrite_cfg(run, architecture="gated"), r"cfg.json: architecture 'gated' is not supported"),
        (
            lambda run: rewrite_cfg(run, normalize_activations="expected_average_only_in"),
            r"cfg.json: normalize_activations='expected_average_only_in' rescales inputs at run time",
        ),
    ],
)
def test_broken_runs_are_refused_with_a_clear_message(tmp_path, corrupt, message):
    run = saved_run(tmp_path)
    corrupt(run)
    with pytest.raises(SAELoadError, match=message) as info:
        io.load_sae(run)
    assert "\n" not in str(info.value)
    assert not (run / "unpickled").exists()


def test_weights_whose_header_length_begins_with_a_pickles_first_byte_still_load(tmp_path):
    """A safetensors header of 384 bytes (0x180) makes the file begin with 0x80, a binary pickle's first byte: the
    layout, not that byte, decides (a 16,384-latent Matryoshka run was saved so and refused)."""
    run = saved_run(tmp_path)
    tensors = load_file(str(run / io.WEIGHTS_FILE))
    for pad in range(256):  # metadata of growing length until the header's length is 128 modulo 256
        save_file(tensors, str(run / io.WEIGHTS_FILE), metadata={"pad": "x" * pad})
        if (run / io.WEIGHTS_FILE).read_bytes()[0] == 0x80:
            break
    assert (run / io.WEIGHTS_FILE).read_bytes()[0] == 0x80
    sae, _ = io.load_sae(run)
    assert torch.equal(sae.W_enc.detach(), tensors["W_enc"])


def test_a_directory_without_an_sae_is_refused(tmp_path):
    with pytest.raises(SAELoadError, match="holds neither sae_weights.safetensors"):
        io.load_sae(tmp_path)
    with pytest.raises(SAELoadError, match="no such file or directory"):
        io.load_sae(tmp_path / "nowhere")


def test_check_fits_names_both_widths():
    sae = random_sae()
    io.check_fits(sae, D_IN, "layer 3 of toy")
    with pytest.raises(SAELoadError, match=r"^SAE expects d_in=16 but layer 3 of toy gives 576$"):
        io.check_fits(sae, 576, "layer 3 of toy")


# ------------------------------------------------------------------------------------ dictionary_learning


def write_dictionary_learning(directory: Path, dict_class: str, state: dict, **trainer) -> Path:
    """ae.pt (a torch.save'd state dict) + config.json, as dictionary_learning's trainSAE writes them."""
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(state, directory / "ae.pt")
    config = {
        "trainer": {"dict_class": dict_class, "activation_dim": D_IN, "dict_size": D_SAE, "lm_name": "toy", "layer": 3, **trainer},
        "buffer": {"ctx_len": 128},
    }
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def random_dl_tensors(seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "W_enc": torch.randn(D_IN, D_SAE, generator=g) * 0.5,
        "b_enc": torch.randn(D_SAE, generator=g) * 0.5,
        "W_dec": torch.randn(D_SAE, D_IN, generator=g) * 0.5,
        "b_dec": torch.randn(D_IN, generator=g) * 0.5,
    }


def test_dictionary_learning_batchtopk_loads_its_tensors_k_and_threshold(tmp_path):
    t = random_dl_tensors()
    state = {
        "k": torch.tensor(4, dtype=torch.int),
        "threshold": torch.tensor(0.3),
        "decoder.weight": t["W_dec"].T.clone(),
        "encoder.weight": t["W_enc"].T.clone(),
        "encoder.bias": t["b_enc"],
        "b_dec": t["b_dec"],
    }
    sae, cfg = io.load_sae(write_dictionary_learning(tmp_path / "trainer_0", "BatchTopKSAE", state, k=4))
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(sae, name), t[name]), name
    assert (sae.activation, sae.widths, sae.k, sae.threshold.item()) == ("batchtopk", [D_SAE], 4, pytest.approx(0.3))
    assert io.training_architecture(cfg) == "batchtopk" and cfg["dictionary_learning"]["trainer"]["dict_class"] == "BatchTopKSAE"
    x = inputs()
    expected = jumprelu_ref(x, t["W_enc"], t["b_enc"], t["b_dec"], 0.3)
    assert (expected > 0).any() and (expected == 0).any()
    torch.testing.assert_close(sae.encode(x), expected)


def test_dictionary_learning_matryoshka_loads_nested_widths_from_its_group_sizes(tmp_path):
    t = random_dl_tensors(seed=1)
    state = {
        "k": torch.tensor(4, dtype=torch.int),
        "threshold": torch.tensor(0.2),
        "group_sizes": torch.tensor([8, 16, 40]),
        **t,
    }
    run = write_dictionary_learning(tmp_path / "m", "MatryoshkaBatchTopKSAE", state, k=4, group_fractions=[0.125, 0.25, 0.625], group_sizes=[8, 16, 40])
    sae, cfg = io.load_sae(run / "ae.pt")
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(sae, name), t[name]), name
    assert (sae.widths, sae.k, io.training_architecture(cfg)) == ([8, 24, 64], 4, "matryoshka_batchtopk")
    x = inputs()
    torch.testing.assert_close(sae.encode(x), jumprelu_ref(x, t["W_enc"], t["b_enc"], t["b_dec"], 0.2))


def test_dictionary_learning_autoencoder_loads_as_a_relu_sae(tmp_path):
    t = random_dl_tensors(seed=2)
    state = {"bias": t["b_dec"], "encoder.weight": t["W_enc"].T.clone(), "encoder.bias": t["b_enc"], "decoder.weight": t["W_dec"].T.clone()}
    sae, _ = io.load_sae(write_dictionary_learning(tmp_path / "s", "AutoEncoder", state))
    x = inputs()
    assert sae.activation == "relu" and torch.equal(sae.b_dec, t["b_dec"])
    torch.testing.assert_close(sae.encode(x), jumprelu_ref(x, t["W_enc"], t["b_enc"], t["b_dec"], 0.0))


@pytest.mark.parametrize(
    "state_edit, trainer, message",
    [
        (lambda s: s.update({"group_sizes": torch.tensor([8, 16, 30])}), {}, r"group_sizes \[8, 16, 30\] give widths \[8, 24, 54\] must be strictly increasing and end at dict_size=64"),
        (lambda s: None, {"group_sizes": [8, 8, 48]}, r"group_sizes \[8, 8, 48\] but ae.pt has \[8, 16, 40\]"),
        (lambda s: None, {"k": 5}, r"k=5 but ae.pt has k=4"),
        (lambda s: s.update(W_dec=torch.zeros(D_SAE - 1, D_IN)), {}, r"ae.pt: W_dec has shape \(63, 16\), expected \(64, 16\) from config.json dict_size=64$"),
        (lambda s: s.pop("W_enc"), {}, r"ae.pt: tensor W_enc is missing"),
        (lambda s: None, {"dict_class": "GatedAutoEncoder"}, r"config.json: dict_class 'GatedAutoEncoder' is not supported"),
    ],
)
def test_broken_dictionary_learning_files_are_refused(tmp_path, state_edit, trainer, message):
    state = {"k": torch.tensor(4, dtype=torch.int), "threshold": torch.tensor(0.2), "group_sizes": torch.tensor([8, 16, 40]), **random_dl_tensors()}
    state_edit(state)
    fields = {"dict_class": "MatryoshkaBatchTopKSAE", "k": 4, **trainer}
    run = write_dictionary_learning(tmp_path / "m", fields.pop("dict_class"), state, **fields)
    with pytest.raises(SAELoadError, match=message):
        io.load_sae(run)


def test_ae_pt_is_read_without_unpickling_objects(tmp_path):
    run = write_dictionary_learning(tmp_path / "m", "BatchTopKSAE", {"trap": _Trap(tmp_path / "unpickled")}, k=4)
    with pytest.raises(SAELoadError, match=r"ae.pt: cannot be read as a weights-only state dict"):
        io.load_sae(run)
    assert not (tmp_path / "unpickled").exists()
    (run / "ae.pt").write_bytes(b"garbage")
    with pytest.raises(SAELoadError, match=r"ae.pt: cannot be read as a weights-only state dict"):
        io.load_sae(run)
    (run / "config.json").unlink()
    with pytest.raises(SAELoadError, match=r"config.json: missing"):
        io.load_sae(run)


# ------------------------------------------------------------------------------------------------ SAELens

SAE_LENS_METADATA = {
    "sae_lens_version": "6.54.12",
    "sae_lens_training_version": "6.54.12",
    "model_name": "gpt2",
    "hook_name": "blocks.3.hook_resid_post",
}
TRAINING_DETAILS = {
    "decoder_init_norm": 0.1,
    "k": 4,
    "use_sparse_activations": False,
    "aux_loss_coefficient": 1.0,
    "rescale_acts_by_decoder_norm": True,
    "topk_threshold_lr": 0.01,
    "matryoshka_widths": [16, 64],
    "use_matryoshka_aux_loss": False,
}
V6_BASE = {
    "d_in": D_IN,
    "d_sae": D_SAE,
    "dtype": "float32",
    "device": "cpu",
    "apply_b_dec_to_input": True,
    "normalize_activations": "none",
    "reshape_activations": "none",
}
V6_MATRYOSHKA_INFERENCE = {
    **V6_BASE,
    "metadata": {**SAE_LENS_METADATA, "training_architecture": "matryoshka_batchtopk", "training_architecture_details": TRAINING_DETAILS},
    "architecture": "jumprelu",
}
"""What SAELens 6.54 writes for a Matryoshka BatchTopK SAE saved for inference (save_inference_model)."""
V6_MATRYOSHKA_TRAINING = {
    **V6_BASE,
    "metadata": V6_MATRYOSHKA_INFERENCE["metadata"],
    **TRAINING_DETAILS,
    "architecture": "matryoshka_batchtopk",
}
"""... and for the training SAE itself (save_model): the threshold is the scalar topk_threshold."""
V6_JUMPRELU = {**V6_BASE, "metadata": SAE_LENS_METADATA, "architecture": "jumprelu"}
PRE_6_TOPK = {
    "architecture": "standard",
    "d_in": D_IN,
    "d_sae": D_SAE,
    "activation_fn_str": "topk",
    "activation_fn_kwargs": {"k": 4},
    "apply_b_dec_to_input": True,
    "finetuning_scaling_factor": False,
    "model_name": "gpt2",
    "hook_name": "blocks.3.hook_resid_pre",
    "hook_layer": 3,
    "normalize_activations": False,
    "dtype": "float32",
    "device": "cpu",
    "sae_lens_training_version": "3.13.0",
}


def write_sae_lens(directory: Path, cfg: dict, tensors: dict) -> Path:
    directory.mkdir(parents=True)
    save_file({name: t.contiguous() for name, t in tensors.items()}, str(directory / "sae_weights.safetensors"))
    (directory / "cfg.json").write_text(json.dumps(cfg))
    return directory


def test_sae_lens_v6_matryoshka_saved_for_inference_loads_as_batchtopk_with_one_theta(tmp_path):
    t = random_dl_tensors(seed=3)
    t["threshold"] = torch.full((D_SAE,), 0.3)
    sae, cfg = io.load_sae(write_sae_lens(tmp_path / "sl", V6_MATRYOSHKA_INFERENCE, t))
    for name, tensor in t.items():
        assert torch.equal(getattr(sae, name), tensor[0] if name == "threshold" else tensor), name
    # Read back as the BatchTopK SAE it was trained as: one θ, nested widths from the metadata.
    assert (sae.activation, sae.widths, sae.k, sae.threshold.dim()) == ("batchtopk", [16, 64], 4, 0)
    assert cfg == V6_MATRYOSHKA_INFERENCE and io.training_architecture(cfg) == "matryoshka_batchtopk"
    x = inputs()
    torch.testing.assert_close(sae.encode(x), jumprelu_ref(x, t["W_enc"], t["b_enc"], t["b_dec"], t["threshold"]))


def test_sae_lens_v6_jumprelu_keeps_its_per_latent_thresholds(tmp_path):
    t = random_dl_tensors(seed=4)
    t["threshold"] = torch.rand(D_SAE, generator=torch.Generator().manual_seed(0))
    sae, _ = io.load_sae(write_sae_lens(tmp_path / "sl", V6_JUMPRELU, t))
    assert (sae.activation, sae.widths) == ("jumprelu", [D_SAE])
    assert torch.equal(sae.threshold, t["threshold"])
    x = inputs()
    expected = jumprelu_ref(x, t["W_enc"], t["b_enc"], t["b_dec"], t["threshold"])
    assert (expected > 0).any()
    torch.testing.assert_close(sae.encode(x), expected)
    bad = {**t, "threshold": torch.rand(D_SAE - 2)}
    with pytest.raises(SAELoadError, match=r"threshold has shape \(62,\), expected \(64,\) from cfg.json d_sae=64"):
        io.load_sae(write_sae_lens(tmp_path / "bad", V6_JUMPRELU, bad))


def test_sae_lens_v6_matryoshka_training_save_with_decoder_norm_rescaling(tmp_path):
    t = random_dl_tensors(seed=5)
    t["W_dec"] = t["W_dec"] * torch.linspace(0.1, 3.0, D_SAE)[:, None]  # rows far from unit norm
    t["topk_threshold"] = torch.tensor(0.3, dtype=torch.float64)
    sae, _ = io.load_sae(write_sae_lens(tmp_path / "sl", V6_MATRYOSHKA_TRAINING, t))
    assert (sae.activation, sae.widths, sae.k, sae.threshold.item()) == ("batchtopk", [16, 64], 4, pytest.approx(0.3))
    # SAELens: pre-activations scaled by the decoder norms, decoded with unit rows.
    x = inputs()
    norms = t["W_dec"].norm(dim=1)
    pre = ((x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]) * norms
    acts = torch.relu(pre) * (pre > 0.3)
    recon = (acts / norms) @ t["W_dec"] + t["b_dec"]
    torch.testing.assert_close(sae.encode(x), acts, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae.decode(sae.encode(x)), recon, rtol=1e-5, atol=1e-5)


def test_sae_lens_pre_6_topk_and_b_dec_not_applied_to_input(tmp_path):
    t = random_dl_tensors(seed=6)
    sae, _ = io.load_sae(write_sae_lens(tmp_path / "old", PRE_6_TOPK, t))
    assert (sae.activation, sae.k) == ("topk", 4)
    x = inputs()
    pre = (x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]
    top = pre.topk(4, dim=1)
    expected = torch.zeros_like(pre).scatter(1, top.indices, top.values.relu())
    torch.testing.assert_close(sae.encode(x), expected)

    raw = write_sae_lens(tmp_path / "raw", {**V6_BASE, "metadata": SAE_LENS_METADATA, "architecture": "standard", "apply_b_dec_to_input": False}, t)
    sae, _ = io.load_sae(raw)
    expected = torch.relu(x @ t["W_enc"] + t["b_enc"])
    torch.testing.assert_close(sae.encode(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae.decode(sae.encode(x)), expected @ t["W_dec"] + t["b_dec"], rtol=1e-5, atol=1e-5)


def test_sae_lens_log_threshold_and_pre_6_scaling_factor_are_applied_on_load(tmp_path):
    """JumpReLU training saves kept log_threshold; SAELens before 6.0 could keep a per-latent decoder scaling_factor."""
    t = random_dl_tensors(seed=7)
    log_threshold = torch.randn(D_SAE, generator=torch.Generator().manual_seed(1)) - 1
    sae, _ = io.load_sae(write_sae_lens(tmp_path / "jr", V6_JUMPRELU, {**t, "log_threshold": log_threshold}))
    torch.testing.assert_close(sae.threshold, log_threshold.exp())

    scaling = torch.linspace(0.5, 2.0, D_SAE)
    old_standard = {**PRE_6_TOPK, "activation_fn_str": "relu", "activation_fn_kwargs": {}, "finetuning_scaling_factor": True}
    sae, _ = io.load_sae(write_sae_lens(tmp_path / "old", old_standard, {**t, "scaling_factor": scaling}))
    x = inputs()
    acts = jumprelu_ref(x, t["W_enc"], t["b_enc"], t["b_dec"], 0.0)
    torch.testing.assert_close(sae.decode(sae.encode(x)), (acts * scaling) @ t["W_dec"] + t["b_dec"])
