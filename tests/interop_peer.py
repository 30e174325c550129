"""The peer side of tests/test_interop.py: runs inside the side environment (sae-lens, dictionary-learning,
sae-bench, eai-sparsify), never imports msae, and does what a user of those packages would.

    python interop_peer.py JOBS.json

JOBS.json lists jobs; "inputs" names a safetensors file whose tensor "x" holds the rows to encode:
  load_saelens: [{"dir", "inputs", "out", "dtype"?}]   SAE.load_from_disk(dir, dtype=dtype or float32); writes
      encode(x), decode(encode(x)) to out
  load_dictionary_learning: [{"dir", "inputs", "out"}]   dictionary_learning.utils.load_dictionary(dir), the same
  saebench: [{"dir"}]                        SAEBench's load_and_format_sae on the loaded SAE, as it takes a user's
      SAE (no fold); reports its cfg and how far the decoder rows are from unit
  hook: [{"dir", "model_dir", "inputs", "out"}]   the residual stream SAELens hooks for the SAE at dir (its
      metadata's model_class_name and hook_name) in the model at model_dir, on token ids "ids"
  train_saelens: {"acts", "inputs", "out", "d_sae", "k", "widths", "steps", "lr"}   tiny BatchTopK and Matryoshka
      SAEs trained by SAELens, each saved as its training checkpoint (save_model) and for inference
      (save_inference_model), with the inference SAE's outputs on x as the reference
  train_dictionary_learning: {the same}       dictionary_learning's trainers, saved as trainSAE saves (ae.pt + config.json)
  load_sparsify: [{"dir", "inputs", "out"}]   sparsify's SparseCoder.load_from_disk(dir), the same (its top-k
      activations scattered into dense latents)
  train_saelens_runner: {"workdir", "model", "layer", "dataset", "d_sae", "widths", "k", "steps", "batch_tokens",
      "context_size"}   a Matryoshka BatchTopK SAE trained by SAELens's own runner as its users run it, from
      workdir: the model (a local folder) through AutoModelForCausalLM, the hook model.layers.L, a local folder of
      jsonl text, the inference SAE saved under workdir/output; reports its cfg's model, hook and dataset
  train_sparsify: {"acts", "inputs", "out", "d_sae", "k", "steps", "lr"}   a tiny TopK SparseCoder trained the way
      sparsify's trainer steps one (FVU loss, unit decoder rows, the parallel gradient removed), saved with
      save_to_disk under out/layers.3, with its outputs on x as the reference
  saebench_core: {"runs", "model_dir", "tokens", "batch_prompts", "reconstruction_batches", "sparsity_batches",
      "out"}   SAEBench's core eval (run_evals with a CoreEvalConfig) of each SAE in runs, as its multiple_evals runs
      one: the model at model_dir (a local folder) as a TransformerLens HookedTransformer, the SAE's hook_name set to
      its TransformerLens name, a SAELens ActivationsStore over the pretokenized contexts "ids" of tokens (position
      0 the tokenizer's BOS), the special tokens left out of the figures and of the reconstruction; writes
      {run: SAEBench's metrics} to out
and prints one JSON object of what it found (per job: class, architecture, ...).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def _outputs(encode, decode, x: torch.Tensor, out: Path) -> None:
    with torch.no_grad():
        latents = encode(x)
        save_file({"latents": latents.contiguous(), "recons": decode(latents).contiguous()}, str(out))


def _inputs(job: dict) -> torch.Tensor:
    return load_file(job["inputs"])["x"]


def load_saelens(job: dict) -> dict:
    from sae_lens import SAE

    sae = SAE.load_from_disk(job["dir"], device="cpu", dtype=job.get("dtype", "float32"))
    _outputs(sae.encode, sae.decode, _inputs(job).to(sae.dtype), Path(job["out"]))
    return {"class": type(sae).__name__, "architecture": sae.cfg.architecture(), "metadata": sae.cfg.metadata.to_dict()}


def load_dictionary_learning(job: dict) -> dict:
    from dictionary_learning.utils import load_dictionary

    ae, config = load_dictionary(job["dir"], "cpu")
    _outputs(ae.encode, ae.decode, _inputs(job), Path(job["out"]))
    return {"class": type(ae).__name__, "dict_class": config["trainer"]["dict_class"]}


def saebench(job: dict) -> dict:
    from sae_bench.sae_bench_utils.general_utils import load_and_format_sae
    from sae_lens import SAE

    sae = SAE.load_from_disk(job["dir"], device="cpu", dtype="float32")
    _, sae, _ = load_and_format_sae("msae", sae, "cpu")  # no fold: it checks that the decoder rows are unit
    fields = ("model_name", "hook_name", "hook_layer", "context_size", "prepend_bos", "architecture_str")
    return {name: getattr(sae.cfg, name) for name in fields} | {"W_dec_norm_max_error": (sae.W_dec.norm(dim=1) - 1).abs().max().item()}


def _hooked_transformer(model_dir: str):
    """The model folder as TransformerLens's HookedTransformer, offline: TransformerLens knows models by their hub
    name only, so its official-name lookup is told that this folder names itself (its config.json is then read
    from the folder) and the weights and tokenizer are handed over loaded."""
    import transformer_lens.loading_from_pretrained as loading
    from transformer_lens import HookedTransformer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    official = loading.get_official_model_name
    loading.get_official_model_name = lambda name: name if name == model_dir else official(name)
    try:
        return HookedTransformer.from_pretrained_no_processing(model_dir, hf_model=hf_model, tokenizer=tokenizer,
                                                               device="cpu", dtype=torch.float32)
    finally:
        loading.get_official_model_name = official


def saebench_core(job: dict) -> dict:
    from datasets import Dataset
    from sae_bench.evals.core.eval_config import CoreEvalConfig
    from sae_bench.evals.core.main import run_evals
    from sae_bench.sae_bench_utils.general_utils import load_and_format_sae
    from sae_lens import SAE
    from sae_lens.training.activations_store import ActivationsStore

    model = _hooked_transformer(job["model_dir"])
    tokenizer = model.tokenizer
    ids = load_file(job["tokens"])["ids"]
    found = {}
    for run in job["runs"]:
        sae = SAE.load_from_disk(run, device="cpu", dtype="float32")
        sae.cfg.metadata.hook_name = sae.cfg.metadata.hook_name_transformer_lens
        _, sae, _ = load_and_format_sae("msae", sae, "cpu")  # no fold: the decoder rows are unit
        # A fresh store per SAE: each reads the same contexts, reconstruction batches first.
        store = ActivationsStore.from_sae(model, sae, Dataset.from_dict({"input_ids": ids.tolist()}),
                                          context_size=ids.shape[1])
        config = CoreEvalConfig(model_name=sae.cfg.model_name, batch_size_prompts=job["batch_prompts"],
                                n_eval_reconstruction_batches=job["reconstruction_batches"],
                                n_eval_sparsity_variance_batches=job["sparsity_batches"], context_size=ids.shape[1],
                                compute_ce_loss=True, compute_sparsity_metrics=True, compute_variance_metrics=True,
                                exclude_special_tokens_from_reconstruction=True)
        special = {tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id}  # as multiple_evals
        metrics, _ = run_evals(sae, store, model, config, ignore_tokens=special)
        found[run] = metrics
    Path(job["out"]).write_text(json.dumps(found, indent=1))
    return {run: sorted(metrics) for run, metrics in found.items()}


def hook(job: dict) -> dict:
    from sae_lens import SAE
    from sae_lens.load_model import load_model

    meta = SAE.load_from_disk(job["dir"]).cfg.metadata
    model = load_model(meta.model_class_name, job["model_dir"], device="cpu", hook_names=[meta.hook_name])
    with torch.no_grad():
        _, cache = model.run_with_cache(load_file(job["inputs"])["ids"], names_filter=[meta.hook_name])
    save_file({"acts": cache[meta.hook_name].float().contiguous()}, job["out"])
    return {"model_class_name": meta.model_class_name, "hook_name": meta.hook_name}


def _sparsify_outputs(sae, x: torch.Tensor, out: Path) -> None:
    with torch.no_grad():
        top_acts, top_indices, _ = sae.encode(x.to(sae.dtype))
        latents = torch.zeros(x.shape[0], sae.num_latents, dtype=top_acts.dtype).scatter_(1, top_indices, top_acts)
        save_file({"latents": latents.contiguous(), "recons": sae.decode(top_acts, top_indices).contiguous()}, str(out))


def load_sparsify(job: dict) -> dict:
    from sparsify import SparseCoder

    sae = SparseCoder.load_from_disk(job["dir"], device="cpu")
    _sparsify_outputs(sae, _inputs(job), Path(job["out"]))
    return {"class": type(sae).__name__, "num_latents": sae.num_latents, "k": sae.cfg.k, "dtype": str(sae.dtype)}


def train_sparsify(job: dict) -> dict:
    from sparsify import SparseCoder, SparseCoderConfig

    acts = load_file(job["acts"])["x"]
    torch.manual_seed(0)
    sae = SparseCoder(acts.shape[1], SparseCoderConfig(num_latents=job["d_sae"], k=job["k"]), device="cpu")
    optimizer = torch.optim.Adam(sae.parameters(), lr=job["lr"])
    for batch in _toy_batches(acts, 256, job["steps"]):
        out = sae(batch)
        optimizer.zero_grad()
        out.fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        sae.set_decoder_norm_to_unit_norm()
    run = Path(job["out"]) / "layers.3"
    sae.save_to_disk(run)
    _sparsify_outputs(sae, _inputs(job), run / "reference.safetensors")
    return {"fvu": out.fvu.item()}


def train_saelens_runner(job: dict) -> dict:
    import os

    from sae_lens import (LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, LoggingConfig,
                          MatryoshkaBatchTopKTrainingSAEConfig)

    os.chdir(job["workdir"])
    cfg = LanguageModelSAERunnerConfig(
        sae=MatryoshkaBatchTopKTrainingSAEConfig(d_in=576, d_sae=job["d_sae"], k=job["k"],
                                                 matryoshka_widths=job["widths"]),
        model_name=job["model"], model_class_name="AutoModelForCausalLM", hook_name=f"model.layers.{job['layer']}",
        dataset_path=job["dataset"], is_dataset_tokenized=False, streaming=False, context_size=job["context_size"],
        training_tokens=job["steps"] * job["batch_tokens"], train_batch_size_tokens=job["batch_tokens"],
        store_batch_size_prompts=8, n_batches_in_buffer=4, n_batches_for_norm_estimate=4, lr=1e-3,
        device="cpu", dtype="float32", prepend_bos=False, exclude_special_tokens=True,
        logger=LoggingConfig(log_to_wandb=False), output_path="output", checkpoint_path="checkpoints", seed=0,
        verbose=False,
    )
    LanguageModelSAETrainingRunner(cfg).run()
    saved = json.loads(Path("output", "cfg.json").read_text())
    meta = saved.get("metadata", {})
    return {"architecture": saved.get("architecture"), "model_name": meta.get("model_name"),
            "hook_name": meta.get("hook_name"), "dataset_path": meta.get("dataset_path"),
            "context_size": meta.get("context_size"), "files": sorted(p.name for p in Path("output").iterdir())}


def _toy_batches(acts: torch.Tensor, batch: int, steps: int):
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        yield acts[torch.randint(0, acts.shape[0], (batch,), generator=g)]


def train_saelens(job: dict) -> dict:
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.matryoshka_batchtopk_sae import MatryoshkaBatchTopKTrainingSAE, MatryoshkaBatchTopKTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput

    acts = load_file(job["acts"])["x"]
    common = dict(d_in=acts.shape[1], d_sae=job["d_sae"], k=job["k"], dtype="float32", device="cpu")
    saes = {
        "batchtopk": BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(**common)),
        "matryoshka": MatryoshkaBatchTopKTrainingSAE(MatryoshkaBatchTopKTrainingSAEConfig(**common, matryoshka_widths=job["widths"])),
    }
    found = {}
    for name, sae in saes.items():
        torch.manual_seed(0)
        optimizer = torch.optim.Adam(sae.parameters(), lr=job["lr"])
        for step, batch in enumerate(_toy_batches(acts, 256, job["steps"])):
            out = sae.training_forward_pass(TrainStepInput(batch, {}, None, step, False))
            optimizer.zero_grad()
            out.loss.backward()
            optimizer.step()
        run = Path(job["out"]) / name
        sae.save_model(run / "checkpoint")
        sae.save_inference_model(run / "inference")
        inference = load_saelens({"dir": str(run / "inference"), "inputs": job["inputs"], "out": str(run / "reference.safetensors")})
        found[name] = {"topk_threshold": sae.topk_threshold.item(), **inference}
    return found


def train_dictionary_learning(job: dict) -> dict:
    from dictionary_learning.trainers.batch_top_k import BatchTopKTrainer
    from dictionary_learning.trainers.matryoshka_batch_top_k import MatryoshkaBatchTopKTrainer

    acts = load_file(job["acts"])["x"]
    common = dict(steps=job["steps"], activation_dim=acts.shape[1], dict_size=job["d_sae"], k=job["k"], layer=0,
                  lm_name="toy", lr=job["lr"], warmup_steps=1, threshold_start_step=job["steps"] // 2, seed=0, device="cpu")
    widths = job["widths"]
    trainers = {
        "batchtopk": BatchTopKTrainer(**common),
        "matryoshka": MatryoshkaBatchTopKTrainer(**common, group_fractions=[(b - a) / widths[-1] for a, b in zip([0, *widths], widths)]),
    }
    found = {}
    for name, trainer in trainers.items():
        for step, batch in enumerate(_toy_batches(acts, 256, job["steps"])):
            trainer.update(step, batch)
        run = Path(job["out"]) / name
        run.mkdir(parents=True, exist_ok=True)
        # As dictionary_learning's trainSAE saves a finished SAE.
        torch.save({key: value.cpu() for key, value in trainer.ae.state_dict().items()}, run / "ae.pt")
        (run / "config.json").write_text(json.dumps({"trainer": trainer.config}))
        ae = trainer.ae.eval()
        _outputs(ae.encode, ae.decode, _inputs(job), run / "reference.safetensors")
        found[name] = {"threshold": ae.threshold.item(), "group_sizes": trainer.config.get("group_sizes")}
    return found


def main(jobs_path: str) -> None:
    jobs = json.loads(Path(jobs_path).read_text())
    report: dict = {}
    for name, load in (("load_saelens", load_saelens), ("load_dictionary_learning", load_dictionary_learning),
                       ("load_sparsify", load_sparsify), ("saebench", saebench), ("hook", hook)):
        report[name] = {job["dir"]: load(job) for job in jobs.get(name, [])}
    for name, train in (("train_saelens", train_saelens), ("train_dictionary_learning", train_dictionary_learning),
                        ("train_sparsify", train_sparsify), ("train_saelens_runner", train_saelens_runner),
                       ("saebench_core", saebench_core)):
        if name in jobs:
            report[name] = train(jobs[name])
    print(json.dumps(report, default=str))


if __name__ == "__main__":
    main(sys.argv[1])
