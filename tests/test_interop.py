"""Runs that other tools load, checked against the real packages: SAELens, dictionary_learning and SAEBench run in a
side environment (tests/interop_peer.py, a subprocess) and their encode / decode are compared with ours.

The side environment is a virtual environment under msae's cache ($MSAE_CACHE, default ~/.cache/msae), built once
(3.5 to 7 minutes on 2 cores: torch from the local wheel, then the peers from PyPI, about 2.3 GB) and reused while
its pins are unchanged; with it, this file takes under a minute. Without the package registry those tests are
skipped, and say why; the layout tests above them run everywhere.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from msae import export, io
from msae.run import RunError
from msae.lm import BUILTIN, LMLoadError, builtin_model_dir, cache_dir, load_lm, residual_after
from msae.sae import SAE
from msae.train import TensorBatches, TrainConfig, Trainer
from test_io import WIDTHS, random_sae
from test_train import D_IN, toy_acts

REPO = Path(__file__).resolve().parent.parent
PEER = Path(__file__).with_name("interop_peer.py")
TORCH_PIN = f"torch=={torch.__version__.split('+')[0]}"
"""The torch we run on, so that the peers compute with the same kernels."""
PEERS = ("sae-lens==6.54.12", "dictionary-learning==0.1.0")
NO_DEPS = ("sae-bench==0.6.0",)
"""SAEBench's own dependencies would replace torch with a CUDA build; its SAE loading needs only SAELens."""
EXTRAS = ("eai-sparsify==1.3.3", "natsort==8.4.0", "schedulefree==1.4.1", "tabulate==0.9.0")
"""EleutherAI's sparsify, without its dependencies (an unpinned torch among them): SAELens brought the rest, it
needs only natsort and schedulefree beside them; and tabulate, the one dependency of SAEBench's core eval that
SAELens does not bring (its module imports sae_selection_utils, which imports it). Added over a built environment
under a stamp of their own, so a new extra does not rebuild the rest."""
TOLERANCE = 1e-5
K = 4
SHIPPED = [REPO / "assets" / "default" / name for name in ("matryoshka", "vanilla")]


def outputs(sae: SAE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    latents = sae.encode(x)
    return latents, sae.decode(latents)


def max_diff(ours: tuple[torch.Tensor, torch.Tensor], path: Path) -> float:
    """The largest absolute difference between our (latents, recons) and a peer's, written at `path`."""
    theirs = load_file(str(path))
    assert theirs["latents"].shape == ours[0].shape
    return max((ours[0] - theirs["latents"]).abs().max().item(), (ours[1] - theirs["recons"]).abs().max().item())


EXTRACTION = {"model": "smollm2-135m", "layer": 3, "ctx_len": 128}
PROMPT_IDS = torch.tensor([[504, 2365, 6354, 16438, 27003, 690, 260, 23790, 2767, 30]])
"""A sentence in SmolLM2's tokens."""


# --------------------------------------------------------------------------------- the layout, without the peers


def test_batchtopk_is_saved_as_saelens_saves_it_for_inference(tmp_path):
    sae = random_sae()
    run = io.save_sae(sae, tmp_path / "run", cfg={"msae": {"extraction": EXTRACTION}}, act_scale=2.0)
    tensors = load_file(str(run / io.WEIGHTS_FILE))
    assert sorted(tensors) == ["W_dec", "W_enc", "b_dec", "b_enc", "threshold"]
    assert torch.equal(tensors["threshold"], torch.full((64,), 0.25 / 2.0)), "θ follows the latents: 1/act_scale"
    torch.testing.assert_close(tensors["W_dec"].norm(dim=1), torch.ones(64), rtol=0, atol=1e-6)
    cfg = io.read_cfg(run)
    assert cfg["architecture"] == "jumprelu" and cfg["d_sae"] == 64
    meta = cfg["metadata"]
    assert meta["sae_lens_version"] == io.SAE_LENS_LAYOUT
    assert meta["training_architecture"] == "matryoshka_batchtopk"
    assert meta["training_architecture_details"] == {"k": K, "matryoshka_widths": WIDTHS}
    assert meta["model_name"] == BUILTIN["smollm2-135m"].hub_id and meta["msae_model"] == "smollm2-135m"
    assert (meta["hook_name"], meta["hook_name_transformer_lens"]) == ("model.layers.3", "blocks.3.hook_resid_post")
    assert (meta["model_class_name"], meta["context_size"], meta["prepend_bos"]) == ("AutoModelForCausalLM", 128, False)
    loaded, _ = io.load_sae(run)
    assert (loaded.activation, loaded.widths, loaded.k, loaded.threshold.item()) == ("batchtopk", WIDTHS, K, 0.125)


@pytest.mark.parametrize("activation, architecture", [("topk", "topk"), ("relu", "standard")])
def test_topk_and_relu_keep_their_architecture_and_no_threshold(tmp_path, activation, architecture):
    run = io.save_sae(random_sae(activation=activation), tmp_path / "run", cfg={"msae": {"extraction": {**EXTRACTION, "model": "gpt2"}}})
    cfg = io.read_cfg(run)
    assert cfg["architecture"] == architecture and "threshold" not in load_file(str(run / io.WEIGHTS_FILE))
    assert cfg["metadata"]["model_name"] == "gpt2" and "msae_model" not in cfg["metadata"]


def test_a_run_trained_on_a_tensor_names_no_model(tmp_path):
    meta = io.read_cfg(io.save_sae(random_sae(), tmp_path / "run", cfg={"msae": {"extraction": None}}))["metadata"]
    assert "model_name" not in meta and "hook_name" not in meta


def test_an_unlearned_threshold_is_kept_as_batchtopk_and_cannot_be_exported(tmp_path):
    sae = random_sae()
    sae.threshold.fill_(-1.0)
    run = io.save_sae(sae, tmp_path / "run")
    cfg = io.read_cfg(run)
    assert cfg["architecture"] == "matryoshka_batchtopk" and "never learned" in cfg["not_exportable"]
    loaded, _ = io.load_sae(run)
    assert loaded.uses_batchtopk()
    for target in export.TARGETS:
        with pytest.raises(ValueError, match=r"cannot export to .*θ < 0"):
            export.export_run(run, target, tmp_path / target)


def test_a_per_latent_threshold_stays_jumprelu(tmp_path):
    run = io.save_sae(random_sae(), tmp_path / "run")
    tensors = load_file(str(run / io.WEIGHTS_FILE))
    tensors["threshold"] = torch.linspace(0.1, 0.5, 64)
    save_file(tensors, str(run / io.WEIGHTS_FILE))
    loaded, _ = io.load_sae(run)
    assert loaded.activation == "jumprelu" and torch.equal(loaded.threshold, tensors["threshold"])


def _old_layout(run: Path) -> None:
    """Rewrite a run as msae saved BatchTopK runs before the SAELens 6 layout: its training architecture, scalar θ."""
    cfg = io.read_cfg(run)
    cfg["architecture"] = cfg.pop("metadata")["training_architecture"]
    (run / io.CFG_FILE).write_text(json.dumps(cfg))
    tensors = load_file(str(run / io.WEIGHTS_FILE))
    tensors["threshold"] = tensors["threshold"][0].clone()
    save_file(tensors, str(run / io.WEIGHTS_FILE))


def test_export_migrates_an_old_run_in_place(tmp_path, capsys):
    sae = random_sae()
    run = io.save_sae(sae, tmp_path / "run", cfg={"msae": {"extraction": EXTRACTION}, "msae_version": "0.1.0"})
    new_cfg = io.read_cfg(run)
    _old_layout(run)
    (run / "metrics.jsonl").write_text("{}\n")
    parser = argparse.ArgumentParser()
    export.add_args(parser)
    assert export.main(parser.parse_args([str(run), "--to", "saelens", str(run)])) == 0
    assert "sae_weights.safetensors + cfg.json" in capsys.readouterr().out
    assert io.read_cfg(run) == new_cfg
    assert (run / "metrics.jsonl").read_text() == "{}\n"
    x = toy_acts(64)
    loaded, _ = io.load_sae(run)
    for ours, theirs in zip(outputs(sae, x), outputs(loaded, x)):
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("widths, activation", [(WIDTHS, "batchtopk"), ([64], "batchtopk"), ([64], "topk"), (WIDTHS, "relu"), ([64], "jumprelu")])
def test_dictionary_learning_export_reads_back_the_same(tmp_path, widths, activation):
    sae = random_sae(widths, activation)
    out = export.export_run(io.save_sae(sae, tmp_path / "run", cfg={"msae": {"extraction": EXTRACTION}}), "dictionary_learning", tmp_path / "dl")
    state = torch.load(out / io.DL_WEIGHTS_FILE, weights_only=True)
    assert all(isinstance(t, torch.Tensor) for t in state.values())
    config = json.loads((out / io.DL_CFG_FILE).read_text())
    assert (config["trainer"]["lm_name"], config["trainer"]["layer"]) == (BUILTIN["smollm2-135m"].hub_id, 3)
    loaded, cfg = io.load_sae(out)
    assert cfg["msae"]["extraction"] == EXTRACTION
    assert loaded.activation == activation and (loaded.widths == widths or activation == "relu")
    x = toy_acts(64)
    for ours, theirs in zip(outputs(sae, x), outputs(loaded, x)):
        torch.testing.assert_close(theirs, ours, rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("widths", [WIDTHS, [64]])
def test_sparsify_export_reads_back_the_same(tmp_path, widths):
    sae = random_sae(widths, "topk")
    run = io.save_sae(sae, tmp_path / "run", cfg={"msae": {"extraction": EXTRACTION}}, act_scale=2.0)
    out = export.export_run(run, "sparsify", tmp_path / "sparsify")
    tensors = load_file(str(out / io.SPARSIFY_WEIGHTS_FILE))
    assert sorted(tensors) == ["W_dec", "b_dec", "encoder.bias", "encoder.weight"]
    assert tensors["encoder.weight"].shape == (64, D_IN)
    torch.testing.assert_close(tensors["W_dec"].norm(dim=1), torch.ones(64), rtol=0, atol=1e-6)
    cfg = json.loads((out / io.CFG_FILE).read_text())
    assert (cfg["activation"], cfg["num_latents"], cfg["k"], cfg["d_in"]) == ("topk", 64, K, D_IN)
    assert not (cfg["transcode"] or cfg["skip_connection"] or cfg["multi_topk"])
    loaded, loaded_cfg = io.load_sae(out)
    assert (loaded.activation, loaded.widths, loaded.k) == ("topk", widths, K)
    assert loaded_cfg["msae"]["extraction"] == EXTRACTION and loaded_cfg["sparsify"]["num_latents"] == 64
    original, _ = io.load_sae(run)
    x = toy_acts(64)
    for ours, theirs in zip(outputs(original, x), outputs(loaded, x)):
        torch.testing.assert_close(theirs, ours, rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("activation", ["batchtopk", "relu", "jumprelu"])
def test_sparsify_export_refuses_what_a_per_row_topk_cannot_compute(tmp_path, activation):
    run = io.save_sae(random_sae([64], activation), tmp_path / "run")
    with pytest.raises(ValueError, match="per-row TopK only"):
        export.export_run(run, "sparsify", tmp_path / "sparsify")
    assert not (tmp_path / "sparsify" / io.SPARSIFY_WEIGHTS_FILE).exists()


def test_sparsify_export_into_the_run_itself_is_refused(tmp_path):
    run = io.save_sae(random_sae([64], "topk"), tmp_path / "run")
    before = (run / io.CFG_FILE).read_text()
    with pytest.raises(RunError, match="would replace the run's own"):
        export.export_run(run, "sparsify", run)
    assert (run / io.CFG_FILE).read_text() == before and not (run / io.SPARSIFY_WEIGHTS_FILE).exists()


@pytest.mark.parametrize("change, message", [
    ({"activation": "groupmax"}, "sparsify activation 'groupmax' is not supported"),
    ({"transcode": True}, "a transcoder"),
    ({"skip_connection": True}, "a skip connection"),
    ({"num_latents": 0, "expansion_factor": 2, "matryoshka_widths": None},
     r"encoder.weight has shape \(64, 16\), expected \(32, 16\) from cfg.json d_in × expansion_factor=32"),
    ({"k": 65}, "k=65 exceeds d_sae=64"),
])
def test_sparsify_configs_msae_cannot_compute_are_refused(tmp_path, change, message):
    out = export.export_run(io.save_sae(random_sae([64], "topk"), tmp_path / "run"), "sparsify", tmp_path / "sparsify")
    cfg = json.loads((out / io.CFG_FILE).read_text())
    (out / io.CFG_FILE).write_text(json.dumps({**cfg, **change}))
    with pytest.raises(io.SAELoadError, match=message):
        io.load_sae(out)


# ------------------------------------------------------------------------------------------- the side environment


def _pip(python: Path, *args: str) -> None:
    """Run pip in the side environment; a registry that cannot be reached skips, any other failure fails."""
    done = subprocess.run([str(python), "-m", "pip", "install", "--quiet", *args], capture_output=True, text=True)
    if done.returncode == 0:
        return
    tail = " ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
    unreachable = ("NewConnectionError", "Max retries exceeded", "Temporary failure in name resolution", "No matching distribution")
    if any(sign in done.stderr for sign in unreachable):
        pytest.skip(f"side environment not built: the package registry cannot be reached ({tail})")
    pytest.fail(f"pip install {' '.join(args)} failed in the side environment: {tail}")


@pytest.fixture(scope="session")
def side_python() -> Path:
    """The side environment's python, built once under msae's cache and reused while its pins are the same."""
    root = cache_dir() / "interop-venv"
    stamp = root / "msae-pins.txt"
    pins = "\n".join((TORCH_PIN, *PEERS, *NO_DEPS)) + "\n"
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / "interop-venv.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two test runs at once build it once
        if not (stamp.exists() and stamp.read_text() == pins):
            print(f"\nbuilding the interop side environment in {root} (a few minutes, once)", file=sys.stderr)
            shutil.rmtree(root, ignore_errors=True)
            subprocess.run([sys.executable, "-m", "venv", str(root)], check=True)
            python = root / "bin" / "python"
            _pip(python, TORCH_PIN)  # first and pinned: an unpinned torch pulls a multi-GB CUDA build
            _pip(python, TORCH_PIN, *PEERS)
            _pip(python, "--no-deps", *NO_DEPS)
            # PyPI's torchvision (pulled in by dictionary_learning) cannot load beside torch+cpu; nothing here uses it.
            subprocess.run([str(python), "-m", "pip", "uninstall", "--quiet", "-y", "torchvision"], check=True)
            stamp.write_text(pins)
        extras_stamp, extras = root / "msae-extras.txt", "\n".join(EXTRAS) + "\n"
        if not (extras_stamp.exists() and extras_stamp.read_text() == extras):
            _pip(root / "bin" / "python", "--no-deps", *EXTRAS)
            extras_stamp.write_text(extras)
    return root / "bin" / "python"


def run_peer(python: Path, jobs: dict, work: Path, timeout: float = 600) -> dict:
    path = work / "jobs.json"
    path.write_text(json.dumps(jobs))
    done = subprocess.run([str(python), str(PEER), str(path)], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def train_runs(root: Path) -> dict[str, Path]:
    """Tiny runs of every rule we train, Matryoshka and vanilla each, by our own trainer."""
    runs = {}
    acts = TensorBatches(toy_acts(4096))
    for activation in ("batchtopk", "topk", "relu"):
        cfg = TrainConfig(widths=tuple(WIDTHS), k=K, activation=activation, also_vanilla=True, steps=60, batch_size=128,
                          checkpoint_every=60, log_every=30, lr=3e-3, seed=3)
        for name, run in Trainer(cfg, acts, root / activation).train().items():
            runs[f"{activation}/{name}"] = run
    return runs


@pytest.fixture(scope="module")
def peers(side_python, tmp_path_factory) -> dict:
    """Everything the peers do, in one subprocess (their imports alone take ~20 s here)."""
    work = tmp_path_factory.mktemp("interop")
    x = toy_acts(256, seed=1) + torch.randn(256, D_IN, generator=torch.Generator().manual_seed(2))
    save_file({"x": x}, str(work / "x.safetensors"))
    save_file({"x": toy_acts(4096)}, str(work / "acts.safetensors"))
    runs = train_runs(work / "ours")
    exports = {name: export.export_run(run, "dictionary_learning", work / "dl" / name) for name, run in runs.items()}
    sparsify = {name: export.export_run(run, "sparsify", work / "sparsify-exports" / name)
                for name, run in runs.items() if name.startswith("topk/")}
    io.save_sae(random_sae(), work / "with_model", cfg={"msae": {"extraction": EXTRACTION}})
    try:
        model_dir = builtin_model_dir(EXTRACTION["model"])
        save_file({"ids": PROMPT_IDS}, str(work / "ids.safetensors"))
        hook = [{"dir": str(work / "with_model"), "model_dir": str(model_dir), "inputs": str(work / "ids.safetensors"), "out": str(work / "hooked.safetensors")}]
    except LMLoadError:
        hook = []  # the built-in model's package is not installed: test_saelens_hooks_... says so
    inputs = str(work / "x.safetensors")
    training = {"acts": str(work / "acts.safetensors"), "inputs": inputs, "d_sae": 64, "k": K, "widths": WIDTHS, "steps": 150, "lr": 3e-3}
    jobs = {
        "load_saelens": [{"dir": str(run), "inputs": inputs, "out": str(run / "saelens.safetensors")} for run in runs.values()],
        "load_dictionary_learning": [{"dir": str(d), "inputs": inputs, "out": str(d / "dl.safetensors")} for d in exports.values()],
        "load_sparsify": [{"dir": str(d), "inputs": inputs, "out": str(d / "sparsify.safetensors")} for d in sparsify.values()],
        "saebench": [{"dir": str(work / "with_model")}],
        "hook": hook,
        "train_saelens": {**training, "out": str(work / "saelens")},
        "train_dictionary_learning": {**training, "out": str(work / "dictionary_learning")},
        "train_sparsify": {**training, "out": str(work / "sparsify")},
    }
    return {"report": run_peer(side_python, jobs, work), "runs": runs, "exports": exports, "sparsify": sparsify, "x": x,
            "work": work}


def test_our_runs_load_in_saelens_with_the_same_encode_and_decode(peers):
    loaded = peers["report"]["load_saelens"]
    classes = {"batchtopk": "JumpReLUSAE", "topk": "TopKSAE", "relu": "StandardSAE"}
    for name, run in peers["runs"].items():
        sae, _ = io.load_sae(run)
        assert loaded[str(run)]["class"] == classes[sae.activation], name
        ours = outputs(sae, peers["x"])
        assert (ours[0] > 0).any(), f"{name}: no latent fires, the comparison would prove nothing"
        diff = max_diff(ours, run / "saelens.safetensors")
        print(f"SAELens loads our {name}: max |diff| {diff:.3g}")
        assert diff <= TOLERANCE, name


def test_our_runs_load_in_dictionary_learning_with_the_same_encode_and_decode(peers):
    for name, run in peers["runs"].items():
        sae, _ = io.load_sae(run)
        out = peers["exports"][name]
        latents, recons = outputs(sae, peers["x"])
        # dictionary_learning's AutoEncoder.from_pretrained rescales a ReLU SAE to unit decoder rows
        # (normalize_decoder=True); ours are unit already, so its latents must come back as they are.
        diff = max_diff((latents, recons), out / "dl.safetensors")
        print(f"dictionary_learning loads our {name} ({peers['report']['load_dictionary_learning'][str(out)]['class']}): max |diff| {diff:.3g}")
        assert diff <= TOLERANCE, name


@pytest.mark.parametrize("arch, widths", [("batchtopk", [64]), ("matryoshka", WIDTHS)])
@pytest.mark.parametrize("save", ["checkpoint", "inference"])
def test_saes_trained_by_saelens_load_in_msae(peers, arch, widths, save):
    run = peers["work"] / "saelens" / arch
    sae, _ = io.load_sae(run / save)
    assert (sae.activation, sae.widths, sae.k) == ("batchtopk", widths, K)
    assert sae.threshold.item() == pytest.approx(peers["report"]["train_saelens"][arch]["topk_threshold"], rel=1e-6)
    diff = max_diff(outputs(sae, peers["x"]), run / "reference.safetensors")
    print(f"msae loads SAELens's {arch} {save} save: max |diff| {diff:.3g} against SAELens's inference SAE")
    assert diff <= TOLERANCE


@pytest.mark.parametrize("arch, widths", [("batchtopk", [64]), ("matryoshka", WIDTHS)])
def test_saes_trained_by_dictionary_learning_load_in_msae(peers, arch, widths):
    run = peers["work"] / "dictionary_learning" / arch
    report = peers["report"]["train_dictionary_learning"][arch]
    sae, _ = io.load_sae(run)
    assert (sae.activation, sae.widths, sae.k) == ("batchtopk", widths, K)
    assert report["threshold"] > 0, "dictionary_learning learned no threshold: its encode would be a plain ReLU"
    diff = max_diff(outputs(sae, peers["x"]), run / "reference.safetensors")
    print(f"msae loads dictionary_learning's {arch}: max |diff| {diff:.3g}")
    assert diff <= TOLERANCE


def test_our_topk_runs_load_in_sparsify_with_the_same_encode_and_decode(peers):
    assert len(peers["sparsify"]) == 2, "the Matryoshka and the vanilla TopK run"
    for name, out in peers["sparsify"].items():
        sae, _ = io.load_sae(peers["runs"][name])
        found = peers["report"]["load_sparsify"][str(out)]
        assert (found["class"], found["num_latents"], found["k"]) == ("SparseCoder", sae.d_sae, sae.k)
        ours = outputs(sae, peers["x"])
        assert (ours[0] > 0).any(), f"{name}: no latent fires, the comparison would prove nothing"
        diff = max_diff(ours, out / "sparsify.safetensors")
        print(f"sparsify loads our {name}: max |diff| {diff:.3g}")
        assert diff <= TOLERANCE, name


def test_saes_trained_by_sparsify_load_in_msae_and_go_on_as_a_run(peers, tmp_path):
    folder = peers["work"] / "sparsify" / "layers.3"
    sae, cfg = io.load_sae(folder)
    assert (sae.activation, sae.widths, sae.k, cfg["sparsify"]["d_in"]) == ("topk", [64], K, D_IN)
    reference = folder / "reference.safetensors"
    assert (load_file(str(reference))["latents"] > 0).any()
    diff = max_diff(outputs(sae, peers["x"]), reference)
    print(f"msae loads sparsify's TopK SAE: max |diff| {diff:.3g}")
    assert diff <= TOLERANCE
    run = export.export_run(folder, "saelens", tmp_path / "run")  # a run msae analyses and SAELens loads
    again, _ = io.load_sae(run)
    assert max_diff(outputs(again, peers["x"]), reference) <= TOLERANCE


def test_saebench_reads_the_model_and_layer_of_our_run(peers):
    (found,) = peers["report"]["saebench"].values()
    assert found["model_name"] == BUILTIN["smollm2-135m"].hub_id
    assert (found["hook_name"], found["hook_layer"]) == ("model.layers.3", 3)
    assert (found["context_size"], found["prepend_bos"], found["architecture_str"]) == (128, False, "jumprelu")
    assert found["W_dec_norm_max_error"] < 1e-5


def test_the_shipped_runs_load_in_saelens_with_the_same_encode_and_decode(side_python, tmp_path):
    """In float64 on both sides: the residual stream reaches ~176 here, where one float32 step is 1.5e-5, so float32
    reconstructions differ in their last bit (2.3e-5 seen) with the same active latents."""
    jobs, ours = [], {}
    for run in SHIPPED:
        sae, cfg = io.load_sae(run, dtype=torch.float64)
        # Rows around b_dec at the norm of the activations the run was trained on.
        scale = cfg["msae"]["extraction"]["median_norm"] / sae.d_in**0.5
        x = sae.b_dec + torch.randn(128, sae.d_in, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * scale
        save_file({"x": x}, str(tmp_path / f"{run.name}-x.safetensors"))
        jobs.append({"dir": str(run), "inputs": str(tmp_path / f"{run.name}-x.safetensors"), "out": str(tmp_path / f"{run.name}.safetensors"), "dtype": "float64"})
        ours[run] = outputs(sae, x)
        assert (ours[run][0] > 0).sum(dim=1).float().mean() > 1, run.name
    report = run_peer(side_python, {"load_saelens": jobs}, tmp_path)
    for run in SHIPPED:
        assert report["load_saelens"][str(run)]["class"] == "JumpReLUSAE"
        diff = max_diff(ours[run], tmp_path / f"{run.name}.safetensors")
        print(f"SAELens loads the shipped {run.name}: max |diff| {diff:.3g}")
        assert diff <= TOLERANCE, run.name


def test_saelens_hooks_the_residual_stream_that_our_hook_name_names(peers):
    if not peers["report"]["hook"]:
        pytest.skip(f"the built-in model {EXTRACTION['model']} is not installed (make setup installs it)")
    (found,) = peers["report"]["hook"].values()
    assert found == {"model_class_name": "AutoModelForCausalLM", "hook_name": "model.layers.3"}
    lm = load_lm(EXTRACTION["model"], device="cpu", dtype=torch.float32)
    ours = residual_after(lm, PROMPT_IDS, torch.ones_like(PROMPT_IDS), EXTRACTION["layer"])
    theirs = load_file(str(peers["work"] / "hooked.safetensors"))["acts"]
    diff = (ours - theirs).abs().max().item()
    print(f"SAELens's AutoModelForCausalLM hook at model.layers.3 against ours: max |diff| {diff:.3g}")
    assert diff <= TOLERANCE


def test_the_shipped_runs_have_unit_decoder_rows_and_their_stores_the_same_scale():
    """Saved with unit rows, as msae saves every run: float16's rounding leaves the rows within SAEBench's
    float16 tolerance (1e-2), and a stored top activation is what the run's encoder gives on that context now."""
    import pyarrow.parquet as pq

    from msae.run import Run

    lm = load_lm(EXTRACTION["model"], device="cpu", dtype=torch.float32)
    for run in SHIPPED:
        sae, _ = io.load_sae(run)
        error = (sae.W_dec.double().norm(dim=1) - 1).abs().max().item()
        print(f"{run.name}: decoder rows within {error:.2g} of unit ({sae.W_dec.dtype})")
        assert sae.W_dec.dtype == torch.float16 and error < 1e-3
        examples = pq.read_table(run / "features" / "examples.parquet").to_pandas()
        contexts = pq.read_table(run / "features" / "contexts.parquet").to_pandas().set_index("context")
        top = examples[(examples["kind"] == "top") & (examples["rank"] == 0)].head(4)
        sae = Run(run).load_sae(precision="float32")
        for example in top.itertuples():
            ids = torch.tensor([list(contexts.loc[example.context, "tokens"])])
            x = residual_after(lm, ids, torch.ones_like(ids), 15)[0, example.position : example.position + 1]
            live = sae.encode(x)[0, example.latent].item()
            assert live == pytest.approx(example.act, rel=0.05), (run.name, example.latent)


# ------------------------------------------------------------------------------ SAEBench's core eval of the shipped runs

SAEBENCH_PROMPTS = 8
SAEBENCH_BATCHES = {"reconstruction_batches": 1, "sparsity_batches": 2}
"""8 contexts for SAEBench's CE loss, 16 more for its L0 and variance: 2 × 4 forwards of 8 × 128 tokens."""
SAEBENCH_L0_TOLERANCE = 0.3
"""Relative. Of random draws of 16 held-out contexts, 99% give an L0 (every row but BOS) within -6% and +26% of
eval.json's: one context's L0 has a standard deviation of ~9, and SAEBench counts the rare rows above 10x the median
norm that eval.json drops, each firing thousands of latents. An unmasked position 0 gives 82 (+150%)."""
SAEBENCH_CE_TOLERANCE = 0.1
"""Nats. One held-out context's CE loss increase has a standard deviation of 0.11 nats, so 8 contexts have 0.04;
no SAE spliced in would be 0.14 off, one that breaks the attention sink over 2."""


def heldout_sample(run: Path, n: int, bos: int, tokenizer) -> torch.Tensor:
    """(n, ctx_len) token ids: n contexts of the held-out shard that the run's eval.json was measured on, evenly
    spaced over it, each as SAEBench's pretokenized contexts begin: the tokenizer's BOS, then the context's first
    ctx_len - 1 tokens.

    From the held-out contexts eval.json's CE loss ran on, saved beside it (msae.evaluate.HELDOUT_CONTEXTS_FILE), the
    full-length ones. A run evaluated before that file existed: the corpus is read again as extraction read it
    (msae.corpus.contexts, in corpus order); the held-out shard is the extraction's last, so its last
    ceil(rows / (ctx_len - 1)) contexts are held out whatever the shard's size."""
    from msae.evaluate import HELDOUT_CONTEXTS_FILE, spread_rows

    _, cfg = io.load_sae(run)
    extraction = cfg["msae"]["extraction"]
    if (run / HELDOUT_CONTEXTS_FILE).exists():
        saved = load_file(str(run / HELDOUT_CONTEXTS_FILE))["context_tokens"]
        full = [row.tolist() for row in saved if bool((row >= 0).all())]
    else:
        full = _heldout_contexts_from_the_corpus(run, extraction, tokenizer)
    assert len(full) >= n, f"{len(full)} full held-out contexts"
    picked = spread_rows(torch.tensor(full), n)[:, : extraction["ctx_len"] - 1]
    return torch.cat([torch.full((n, 1), bos, dtype=picked.dtype), picked], dim=1)


def _heldout_contexts_from_the_corpus(run: Path, extraction: dict, tokenizer) -> list[list[int]]:
    """The full-length held-out contexts of a run evaluated before HELDOUT_CONTEXTS_FILE existed, read again from the
    corpus as extraction read it (skips when the corpus here is another one)."""
    from msae import corpus
    from msae.activations import corpus_provenance

    kind = extraction["corpus"]["kind"]
    here = dataclasses.asdict(corpus_provenance(kind))["sources"]
    if here != extraction["corpus"]["sources"]:
        pytest.skip(f"the {kind} corpus here is not the one {run.name} was extracted from "
                    f"({corpus.missing_note(kind) or 'other content'})")
    ctx_len, last = extraction["ctx_len"], extraction["contexts"]
    first = last - math.ceil(json.loads((run / "eval.json").read_text())["rows"] / (ctx_len - 1))
    held = []
    for i, (ids, _doc) in enumerate(corpus.contexts(corpus.documents(kind), tokenizer, ctx_len)):
        if i >= last:
            break
        if i >= first and len(ids) == ctx_len:
            held.append(ids)
    return held


def test_saebench_core_eval_of_the_shipped_runs_agrees_with_eval_json(side_python, tmp_path):
    """SAEBench's core eval (run_evals, leaving out the special tokens its multiple_evals leaves out) on both shipped
    runs: L0 and the CE loss increase against eval.json's; its CE loss score and FVU printed (they are defined
    otherwise: README).

    Each context starts with the tokenizer's BOS, which SAEBench leaves out of its figures and (with
    exclude_special_tokens_from_reconstruction) of the reconstruction: the attention sink sits there, as msae's
    position 0 that its training and eval.json leave out. Without it SAEBench reconstructs the first text token,
    ≈140× the median norm, where ~6,200 of the 8,192 latents fire: L0 82 and a CE increase of 2.2 nats (measured by
    hand)."""
    from transformers import AutoTokenizer

    try:
        model_dir = builtin_model_dir("smollm2-135m")
    except LMLoadError as e:
        pytest.skip(str(e))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    n = SAEBENCH_PROMPTS * sum(SAEBENCH_BATCHES.values())
    ids = heldout_sample(SHIPPED[0], n, tokenizer.bos_token_id, tokenizer)
    save_file({"ids": ids}, str(tmp_path / "ids.safetensors"))
    job = {"runs": [str(run) for run in SHIPPED], "model_dir": str(model_dir), "tokens": str(tmp_path / "ids.safetensors"),
           "batch_prompts": SAEBENCH_PROMPTS, **SAEBENCH_BATCHES, "out": str(tmp_path / "saebench.json")}
    run_peer(side_python, {"saebench_core": job}, tmp_path)
    found = json.loads((tmp_path / "saebench.json").read_text())
    for run in SHIPPED:
        ours = json.loads((run / "eval.json").read_text())
        metrics = found[str(run)]
        ce = metrics["model_performance_preservation"]
        figures = {
            "L0": (metrics["sparsity"]["l0"], ours["l0"]),
            "CE increase": (ce["ce_loss_with_sae"] - ce["ce_loss_without_sae"], ours["ce_sae"] - ours["ce_clean"]),
            "CE loss score": (ce["ce_loss_score"], ours["ce_loss_recovered"]),
            "zero-ablation CE": (ce["ce_loss_with_ablation"], ours["ce_zero"]),
            "FVU": (1 - metrics["reconstruction_quality"]["explained_variance"], ours["fvu"][-1]),
            "FVU (legacy)": (1 - metrics["reconstruction_quality"]["explained_variance_legacy"], ours["fvu"][-1]),
        }
        said = f"{run.name}, SAEBench / eval.json: " + ", ".join(f"{k} {a:.4g} / {b:.4g}" for k, (a, b) in figures.items())
        print(said)
        l0, ours_l0 = figures["L0"]
        assert abs(l0 / ours_l0 - 1) <= SAEBENCH_L0_TOLERANCE, said
        increase, ours_increase = figures["CE increase"]
        assert abs(increase - ours_increase) <= SAEBENCH_CE_TOLERANCE, said
