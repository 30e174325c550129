"""Training: the config, the Matryoshka loss, one optimiser step, checkpoints, and several SAEs from one stream.

Every SAE in a run sees the same batches in the same order, so a Matryoshka SAE and its vanilla twin are
compared fairly and the activations are read once. `sae_step` holds no global state (it takes the SAE, its
optimiser and the batch) so that a data-parallel wrapper can call it unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Protocol

import torch
from safetensors import safe_open
from torch import Tensor
from tqdm.auto import tqdm

from msae import io
from msae.lm import resolve_device
from msae.sae import SAE, default_lr

CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_FILE = "state.safetensors"
METRICS_FILE = "metrics.jsonl"


class TrainingError(RuntimeError):
    """Training stopped on bad data or a diverging loss; the message names the step."""


@dataclass
class TrainConfig:
    """Everything that defines a training run. The CLI exposes every field as a flag."""

    arch: str = "matryoshka"
    """matryoshka (nested widths) or vanilla (one dictionary of the last width)."""
    widths: tuple[int, ...] = (128, 512, 2048)
    """Nested dictionary widths m_1 < ... < m_G = d_sae; vanilla uses only the last."""
    k: int = 32
    """Active latents per token (BatchTopK: on average over the batch)."""
    activation: str = "batchtopk"
    """batchtopk, topk or relu (relu trains with an L1 penalty, see l1_coeff)."""
    also_vanilla: bool = False
    """Also train a vanilla SAE of width widths[-1] on the same batches (with arch=matryoshka)."""
    steps: int = 1000
    """Optimiser steps."""
    batch_size: int = 4096
    """Activation rows per step."""
    lr: float | None = None
    """Adam learning rate; None gives 2e-4 / sqrt(d_sae / 2^14)."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """Adam's (beta1, beta2)."""
    warmup_steps: int | None = None
    """Linear learning-rate warm-up; None gives min(1000, steps // 10)."""
    decay_fraction: float = 0.2
    """Linear decay of the learning rate to zero over this final fraction of the steps."""
    level_weights: tuple[float, ...] | None = None
    """Weight of each nested width's reconstruction loss (the balance multipliers); None is uniform 1/G."""
    aux_coeff: float = 1 / 32
    """Weight of the AuxK loss."""
    k_aux: int | None = None
    """Dead latents used by AuxK per token; None gives d_in // 2."""
    dead_tokens: int = 10_000_000
    """A latent that has not fired for this many tokens counts as dead (for AuxK and the dead fraction)."""
    l1_coeff: float = 1e-3
    """L1 penalty on latent activations; used only with activation=relu."""
    grad_clip: float = 1.0
    """Clip the global gradient norm of each SAE to this."""
    threshold_beta: float = 0.999
    """EMA decay of BatchTopK's inference threshold θ (the smallest positive activation of each batch)."""
    threshold_start_step: int | None = None
    """First step that updates θ; None gives min(1000, steps // 10)."""
    seed: int = 0
    """Seeds initialisation and the order of batches."""
    checkpoint_every: int = 1000
    """Write a resumable checkpoint every this many steps (and at the end)."""
    log_every: int = 50
    """Append a line to metrics.jsonl every this many steps."""
    device: str = "auto"
    """auto (CUDA when present), cpu or cuda[:N]."""
    dtype: str = "float32"
    """Training dtype of the SAE weights: float32 or float64."""

    def __post_init__(self) -> None:
        self.widths = tuple(int(w) for w in self.widths)
        if self.arch not in ("matryoshka", "vanilla"):
            raise ValueError(f"arch must be matryoshka or vanilla, got {self.arch!r}")
        if self.activation not in ("batchtopk", "topk", "relu"):
            raise ValueError(f"activation must be batchtopk, topk or relu, got {self.activation!r}")
        if self.level_weights is not None:
            self.level_weights = tuple(float(w) for w in self.level_weights)
            if len(self.level_weights) != len(self.widths):
                raise ValueError(f"level_weights has {len(self.level_weights)} entries for {len(self.widths)} widths")
        if self.steps <= 0 or self.batch_size <= 0:
            raise ValueError("steps and batch_size must be positive")

    @property
    def warmup(self) -> int:
        return min(1000, self.steps // 10) if self.warmup_steps is None else self.warmup_steps

    @property
    def threshold_start(self) -> int:
        return min(1000, self.steps // 10) if self.threshold_start_step is None else self.threshold_start_step

    def sae_specs(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, widths) of every SAE this run trains."""
        if self.arch == "vanilla":
            return [("vanilla", (self.widths[-1],))]
        specs = [("matryoshka", self.widths)]
        if self.also_vanilla:
            specs.append(("vanilla", (self.widths[-1],)))
        return specs

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


class BatchSource(Protocol):
    """A deterministic stream of activation batches that can start at any step (for resume)."""

    d_in: int

    def batches(self, start_step: int, batch_size: int, seed: int) -> Iterator[Tensor]: ...


class TensorBatches:
    """Batches from an in-memory (N, d_in) tensor: a fresh seeded permutation every epoch."""

    def __init__(self, acts: Tensor):
        if acts.ndim != 2:
            raise ValueError(f"activations must be 2-D (N, d_in), got shape {tuple(acts.shape)}")
        self.acts = acts
        self.d_in = acts.shape[1]

    def batches(self, start_step: int, batch_size: int, seed: int) -> Iterator[Tensor]:
        per_epoch = self.acts.shape[0] // batch_size
        if per_epoch == 0:
            raise ValueError(f"{self.acts.shape[0]} activation rows is fewer than one batch of {batch_size}")
        step = start_step
        while True:
            epoch, i = divmod(step, per_epoch)
            perm = torch.randperm(self.acts.shape[0], generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
            while i < per_epoch:
                yield self.acts[perm[i * batch_size : (i + 1) * batch_size]]
                i += 1
                step += 1


def geometric_median(points: Tensor, iters: int = 100, tol: float = 1e-7) -> Tensor:
    """Weiszfeld's algorithm; the b_dec initialisation (robust to the outliers a mean would chase)."""
    guess = points.mean(dim=0)
    for _ in range(iters):
        dist = (points - guess).norm(dim=1).clamp_min(1e-12)
        weights = 1.0 / dist
        new = (weights[:, None] * points).sum(dim=0) / weights.sum()
        if (new - guess).norm() < tol * guess.norm().clamp_min(1.0):
            return new
        guess = new
    return guess


def lr_at(step: int, cfg: TrainConfig, base_lr: float) -> float:
    """Linear warm-up, constant, then linear decay to zero over the last `decay_fraction` of the steps."""
    scale = min(1.0, (step + 1) / cfg.warmup) if cfg.warmup > 0 else 1.0
    decay_start = int(cfg.steps * (1 - cfg.decay_fraction))
    if step >= decay_start and cfg.steps > decay_start:
        scale *= (cfg.steps - step) / (cfg.steps - decay_start)
    return base_lr * scale


@dataclass
class SAEState:
    """One SAE under training with everything its step needs."""

    name: str
    sae: SAE
    optimizer: torch.optim.Optimizer
    base_lr: float
    level_weights: Tensor
    tokens_since_fired: Tensor

    def dead_mask(self, dead_tokens: int) -> Tensor:
        return self.tokens_since_fired >= dead_tokens


def make_state(name: str, widths: tuple[int, ...], d_in: int, cfg: TrainConfig, device, dtype) -> SAEState:
    sae = SAE(d_in, widths, k=cfg.k, activation=cfg.activation, dtype=dtype, device=device)
    sae.reset_parameters(generator=torch.Generator().manual_seed(cfg.seed))
    base_lr = cfg.lr if cfg.lr is not None else default_lr(sae.d_sae)
    fused = device.type == "cuda" or dtype in (torch.float32, torch.float64)
    optimizer = torch.optim.Adam(sae.parameters(), lr=base_lr, betas=cfg.adam_betas, fused=fused)
    if len(widths) == 1:
        weights = torch.ones(1)
    elif cfg.level_weights is not None:
        weights = torch.tensor(cfg.level_weights)
    else:
        weights = torch.full((len(widths),), 1.0 / len(widths))
    return SAEState(
        name, sae, optimizer, base_lr, weights.to(device, dtype), torch.zeros(sae.d_sae, dtype=torch.long, device=device)
    )


def sae_step(state: SAEState, x: Tensor, step: int, cfg: TrainConfig) -> dict:
    """One optimiser step of one SAE on batch x (already scaled); returns its metrics for this step."""
    sae = state.sae
    dead = state.dead_mask(cfg.dead_tokens)
    out = sae(x, dead_mask=dead, k_aux=cfg.k_aux)
    loss = (state.level_weights * out.mse).sum() + cfg.aux_coeff * out.aux_loss
    if sae.activation == "relu":
        loss = loss + cfg.l1_coeff * out.l1
    if not torch.isfinite(loss):
        raise TrainingError(f"step {step}: the loss of the {state.name} SAE is {loss.item()}; stopping")

    for group in state.optimizer.param_groups:
        group["lr"] = lr_at(step, cfg, state.base_lr)
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    sae.remove_parallel_decoder_grad()
    torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
    state.optimizer.step()
    sae.normalize_decoder()

    with torch.no_grad():
        fired = torch.bincount(out.entries.cols, minlength=sae.d_sae) > 0
        state.tokens_since_fired += x.shape[0]
        state.tokens_since_fired[fired] = 0
        if sae.activation == "batchtopk" and step >= cfg.threshold_start and out.entries.vals.numel() > 0:
            smallest = out.entries.vals.min().detach()
            theta = sae.threshold
            theta.copy_(smallest if theta.item() < 0 else cfg.threshold_beta * theta + (1 - cfg.threshold_beta) * smallest)
    return {
        "loss": loss.item(),
        "mse": out.mse.detach().tolist(),
        "fvu": out.fvu.detach().tolist(),
        "l0": out.l0.item(),
        "aux_loss": out.aux_loss.item(),
        "dead_fraction": dead.float().mean().item(),
        "lr": state.optimizer.param_groups[0]["lr"],
    }


def _check_finite(x: Tensor, step: int) -> None:
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).any(dim=1).nonzero().squeeze(1)
        raise TrainingError(
            f"step {step}: the activation batch has NaN or Inf in {bad.numel()} rows (first: row {bad[0].item()}); stopping"
        )


@dataclass
class Trainer:
    """Trains every SAE of `cfg.sae_specs()` from one BatchSource, with checkpoints in `out_dir`."""

    cfg: TrainConfig
    source: BatchSource
    out_dir: Path
    run_info: dict = field(default_factory=dict)
    """Extra fields recorded in every run's cfg.json (model, layer, corpus, filters, ...)."""
    progress: Callable[[int, dict], None] | None = None
    """Called after every logged step with (step, {sae name: metrics}); the UI hooks in here."""

    def __post_init__(self):
        self.out_dir = Path(self.out_dir)
        self.device = resolve_device(self.cfg.device)
        self.dtype = getattr(torch, self.cfg.dtype)
        self.states = [
            make_state(name, widths, self.source.d_in, self.cfg, self.device, self.dtype)
            for name, widths in self.cfg.sae_specs()
        ]
        self.step = 0
        self.scale: float | None = None

    def run_dir(self, name: str) -> Path:
        """Where SAE `name` is saved: out_dir itself when it is the only one."""
        return self.out_dir if len(self.states) == 1 else self.out_dir / name

    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / CHECKPOINT_DIR / CHECKPOINT_FILE

    def _init_from_first_batch(self, x: Tensor) -> None:
        """Activation scale to unit mean squared norm, and b_dec at the geometric median of the first batch."""
        mean_sq = x.double().pow(2).sum(dim=1).mean().item()
        if not mean_sq > 0:
            raise TrainingError("step 0: the first activation batch is all zeros; nothing to learn")
        self.scale = 1.0 / math.sqrt(mean_sq)
        median = geometric_median(x.double() * self.scale)
        for state in self.states:
            with torch.no_grad():
                state.sae.b_dec.copy_(median.to(self.dtype))

    def train(self, resume: bool = False) -> dict[str, Path]:
        """Run to cfg.steps (from the last checkpoint when resume) and save every SAE; returns run dirs."""
        if resume:
            if not self.checkpoint_path.exists():
                raise TrainingError(f"--resume: no checkpoint at {self.checkpoint_path}")
            self.load_checkpoint()
        elif self.checkpoint_path.exists():
            raise TrainingError(f"{self.out_dir} already holds a run; pass --resume to continue it or pick a new --out")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for state in self.states:
            self.run_dir(state.name).mkdir(parents=True, exist_ok=True)
            self._trim_metrics(state.name)

        batches = self.source.batches(self.step, self.cfg.batch_size, self.cfg.seed)
        bar = tqdm(total=self.cfg.steps, initial=self.step, unit="step", dynamic_ncols=True, mininterval=1.0)
        started = time.perf_counter()
        try:
            while self.step < self.cfg.steps:
                x = next(batches).to(self.device, self.dtype, non_blocking=True)
                _check_finite(x, self.step)
                if self.scale is None:
                    self._init_from_first_batch(x)
                x = x * self.scale
                metrics = {s.name: sae_step(s, x, self.step, self.cfg) for s in self.states}
                self.step += 1
                bar.update(1)
                if self.step % self.cfg.log_every == 0 or self.step == self.cfg.steps:
                    self._log(metrics, time.perf_counter() - started)
                    bar.set_postfix({n: f"fvu {m['fvu'][-1]:.3f}" for n, m in metrics.items()})
                if self.step % self.cfg.checkpoint_every == 0 or self.step == self.cfg.steps:
                    self.save_checkpoint()
        finally:
            bar.close()
        return {s.name: self.save_run(s) for s in self.states}

    def _log(self, metrics: dict, elapsed: float) -> None:
        tokens = self.step * self.cfg.batch_size
        for name, m in metrics.items():
            line = json.dumps({"step": self.step, "tokens": tokens, "elapsed_s": round(elapsed, 3), **m})
            with open(self.run_dir(name) / METRICS_FILE, "a") as f:
                f.write(line + "\n")
        if self.progress is not None:
            self.progress(self.step, metrics)

    def _trim_metrics(self, name: str) -> None:
        """Drop metric lines past the current step (written after the checkpoint we resume from)."""
        path = self.run_dir(name) / METRICS_FILE
        if not path.exists():
            return
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= self.step]
        io.atomic_write_text(path, "".join(line + "\n" for line in kept))

    def save_run(self, state: SAEState) -> Path:
        """The finished SAE, folded back to raw activation scale, with its cfg.json."""
        run_dir = self.run_dir(state.name)
        dead = state.dead_mask(self.cfg.dead_tokens)
        cfg = {
            "msae": {
                "name": state.name,
                "train": self.cfg.to_json(),
                "steps_done": self.step,
                "tokens_seen": self.step * self.cfg.batch_size,
                "act_scale": self.scale,
                "dead_fraction": dead.float().mean().item(),
                **self.run_info,
            }
        }
        io.save_sae(state.sae, run_dir, cfg=cfg, act_scale=self.scale)
        return run_dir

    def save_checkpoint(self) -> None:
        """Model, optimiser and counters of every SAE in one safetensors file, replaced atomically."""
        tensors: dict[str, Tensor] = {}
        for s in self.states:
            for pname, p in s.sae.state_dict().items():
                tensors[f"{s.name}/model/{pname}"] = p
            for pname, p in s.sae.named_parameters():
                opt_state = s.optimizer.state.get(p, {})
                for key in ("exp_avg", "exp_avg_sq", "step"):
                    if key in opt_state:
                        tensors[f"{s.name}/adam/{pname}/{key}"] = opt_state[key].reshape(-1)
            tensors[f"{s.name}/tokens_since_fired"] = s.tokens_since_fired
        meta = {"step": self.step, "scale": self.scale, "config": self.cfg.to_json()}
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        self.checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
        io.atomic_save_safetensors(tensors, self.checkpoint_path, metadata={"msae": json.dumps(meta)})

    def load_checkpoint(self) -> None:
        with safe_open(str(self.checkpoint_path), framework="pt") as f:
            meta = json.loads(f.metadata()["msae"])
            saved_cfg = {k: v for k, v in meta["config"].items() if k not in ("steps", "checkpoint_every", "log_every", "device")}
            ours = {k: v for k, v in json.loads(json.dumps(self.cfg.to_json())).items() if k in saved_cfg}
            if ours != saved_cfg:
                diff = sorted(k for k in saved_cfg if ours.get(k) != saved_cfg[k])
                raise TrainingError(f"--resume: the checkpoint was made with different settings: {', '.join(diff)}")
            self.step, self.scale = int(meta["step"]), meta["scale"]
            for s in self.states:
                s.sae.load_state_dict(
                    {pname: f.get_tensor(f"{s.name}/model/{pname}") for pname in s.sae.state_dict()}
                )
                s.tokens_since_fired.copy_(f.get_tensor(f"{s.name}/tokens_since_fired"))
                opt_state = {}
                for i, (pname, p) in enumerate(s.sae.named_parameters()):
                    if f"{s.name}/adam/{pname}/step" not in f.keys():
                        continue
                    opt_state[i] = {
                        "step": f.get_tensor(f"{s.name}/adam/{pname}/step").reshape(()),
                        "exp_avg": f.get_tensor(f"{s.name}/adam/{pname}/exp_avg").reshape(p.shape),
                        "exp_avg_sq": f.get_tensor(f"{s.name}/adam/{pname}/exp_avg_sq").reshape(p.shape),
                    }
                s.optimizer.load_state_dict({"state": opt_state, "param_groups": s.optimizer.state_dict()["param_groups"]})

