"""Training: the config, the Matryoshka loss, one optimiser step, checkpoints, and several SAEs from one stream.

Every SAE in a run sees the same batches in the same order, so a Matryoshka SAE and its vanilla twin are
compared fairly and the activations are read once. `sae_step` holds no global state (it takes the SAE, its
optimiser and the batch); under torchrun each rank passes its slice of the batch and the state's World (msae.distributed)
makes the step the whole batch's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor
from tqdm.auto import tqdm

from msae import io, reports, sparse
from msae.activations import CachedActivations, extract, extraction_info, read_activations_file
from msae.config import TrainConfig, TrainJob
from msae.distributed import DataParallelSAE, RankLost, World
from msae.faults import pause_at
from msae.results import InputFile, RunInfo, ThresholdInfo, TrainMetrics
from msae.run import Run, checkpoint_path, locked, refuse_other_runs
from msae.lm import compute_dtype, precision_note, resolve_device
from msae.sae import SAE, default_lr

class TrainingError(RuntimeError):
    """Training stopped on bad data or a diverging loss; the message names the step."""


class BatchSource(Protocol):
    """A deterministic stream of activation batches that can start at any step (for resume)."""

    d_in: int
    n_rows: int
    """Training rows in the stream (one pass reads each once)."""

    def batches(self, start_step: int, batch_size: int, seed: int) -> Iterator[Tensor]: ...


class TensorBatches:
    """Batches from an in-memory (N, d_in) tensor: a fresh seeded permutation every epoch."""

    def __init__(self, acts: Tensor):
        if acts.ndim != 2:
            raise ValueError(f"activations must be 2-D (N, d_in), got shape {tuple(acts.shape)}")
        self.acts = acts
        self.d_in = acts.shape[1]
        self.n_rows = acts.shape[0]

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
    world: World = field(default_factory=World)
    """The ranks whose rows make up each batch (World(): this process alone)."""

    def dead_mask(self, dead_tokens: int) -> Tensor:
        return self.tokens_since_fired >= dead_tokens


def make_state(name: str, widths: tuple[int, ...], d_in: int, cfg: TrainConfig, device, dtype,
               world: World = World()) -> SAEState:
    kind = SAE if world.size == 1 else functools.partial(DataParallelSAE, world=world)
    sae = kind(d_in, widths, k=cfg.k, activation=cfg.activation, dtype=dtype, device=device)
    sae.reset_parameters(generator=torch.Generator().manual_seed(cfg.seed))
    sae.compute_dtype = compute_dtype(cfg.precision, device, dtype)
    base_lr = cfg.lr if cfg.lr is not None else default_lr(sae.d_sae)
    fused = device.type == "cuda" or dtype in (torch.float32, torch.float64)
    optimizer = torch.optim.Adam(sae.parameters(), lr=base_lr, betas=cfg.adam_betas, fused=fused)
    weights = torch.tensor(cfg.level_weights_for(len(widths)))
    return SAEState(
        name, sae, optimizer, base_lr, weights.to(device, dtype), torch.zeros(sae.d_sae, dtype=torch.long, device=device),
        world,
    )


@torch.no_grad()
def calibrate_threshold(sae: SAE, batches: list[Tensor], k: int, world: World = World()) -> ThresholdInfo:
    """Set the SAE's θ so that inference (pre > θ) keeps as many activations on `batches` (held-in, scaled rows:
    this rank's part of each) as BatchTopK keeps: θ is the (T+1)-th largest positive pre-activation over all their
    rows, T the number BatchTopK keeps. The candidates are each batch's 2·k·B largest values, enough unless one batch
    holds over twice its share of the top T (checked, and recorded as `exact`)."""
    running = float(sae.threshold.max())
    # In the weights' dtype whatever the compute dtype: θ is a figure of the run, and bf16 pre-activations tie in
    # bins of 2^-8 of their size, so no θ could make a bf16 count exact (bf16 inference keeps within one such bin).
    x_parts = [sparse.fold_rows(x.to(sae.W_dec.device, sae.W_dec.dtype), sae.b_dec) for x in batches]
    W1 = sparse.fold_weights(sae.W_enc, sae.b_enc)
    per_batch, kept, rows = [], 0, 0
    # Every rank pads its candidates to the largest rank's count: the all-gather needs one shape (an odd batch
    # splits into parts one row apart).
    local_rows = max((x1.shape[0] for x1 in x_parts), default=0)
    n = 2 * k * int(world.gather(torch.tensor([local_rows], device=sae.W_dec.device)).max())
    for x1 in x_parts:
        vals = sparse.select_batchtopk(x1, W1, 2 * k).vals.float()
        kept += min(k * x1.shape[0], vals.numel())
        per_batch.append(torch.cat([vals, vals.new_full((n - vals.numel(),), -math.inf)]))  # (2kB,) padded
        rows += x1.shape[0]
    cand_NC = world.gather(torch.stack(per_batch))  # (ranks, batches, 2kB)
    kept, rows = (int(v) for v in world.sum_(torch.tensor([kept, rows], device=cand_NC.device)).tolist())
    ordered = cand_NC.flatten().sort(descending=True).values
    theta = float(ordered[kept]) if kept < ordered.numel() and math.isfinite(float(ordered[kept])) else 0.0
    theta = max(theta, 0.0)
    exact = bool((cand_NC > theta).sum(dim=-1).lt(cand_NC.shape[-1]).all())
    sae.threshold.fill_(theta)
    l0_theta = int((cand_NC > theta).sum()) / max(rows, 1)
    return ThresholdInfo(theta=theta, running_theta=running, rows=rows, l0_batchtopk=kept / max(rows, 1),
                         l0_theta=l0_theta, exact=exact)


def group_l0(sae: SAE, firings: Tensor, n_rows: int) -> list[float]:
    """Active latents per row within each nested group, from the firings of every latent (d_sae,) over n_rows
    rows; the groups' figures sum to the L0."""
    groups = sae.group_of(torch.arange(sae.d_sae, device=sae.W_dec.device)).to(firings.device)
    per_group = torch.zeros(sae.n_groups, dtype=torch.float64, device=firings.device).index_add_(0, groups, firings.double())
    return (per_group / max(n_rows, 1)).tolist()


def sae_step(state: SAEState, x: Tensor, step: int, cfg: TrainConfig) -> dict[str, Any]:
    """One optimiser step of one SAE on batch x (already scaled; this rank's rows of it under several ranks, whose
    figures and gradients are then the whole batch's); returns its metrics for this step."""
    sae, world = state.sae, state.world
    dead = state.dead_mask(cfg.dead_window)
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
    world.sum_grads(sae.parameters())
    sae.remove_parallel_decoder_grad()
    torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
    state.optimizer.step()
    sae.normalize_decoder()

    with torch.no_grad():
        counts = world.sum_(torch.cat([torch.bincount(out.entries.cols, minlength=sae.d_sae),
                                       out.entries.cols.new_tensor([x.shape[0]])]))  # firings per latent, rows
        state.tokens_since_fired += counts[-1]
        state.tokens_since_fired[counts[:-1] > 0] = 0
        if sae.activation == "batchtopk" and step >= cfg.threshold_start:
            vals = out.entries.vals.detach()
            smallest = world.min_(vals.min() if vals.numel() else vals.new_tensor(math.inf))
            theta = sae.threshold
            if torch.isfinite(smallest):
                theta.copy_(smallest if theta.item() < 0 else cfg.threshold_beta * theta + (1 - cfg.threshold_beta) * smallest)
    return {
        "loss": loss.item(),
        "mse": out.mse.detach().tolist(),
        "fvu": out.fvu.detach().tolist(),
        "l0": out.l0.item(),
        "l0_per_group": group_l0(sae, counts[:-1], int(counts[-1])),
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


def sae_dirs(cfg: TrainConfig, out_dir: Path | str) -> dict[str, Path]:
    """Where each SAE of a run is saved, by name: out_dir itself when the run trains one, else a folder per SAE."""
    specs = cfg.sae_specs()
    return {name: Path(out_dir) if len(specs) == 1 else Path(out_dir) / name for name, _widths in specs}


def check_new_run(out_dir: Path) -> None:
    """A training without --resume starts only where no run is: neither its own checkpoint nor another SAE."""
    if checkpoint_path(out_dir).exists():
        raise TrainingError(f"{out_dir} already holds a run; pass --resume to continue it or pick a new --out")
    refuse_other_runs(out_dir)


@dataclass
class Trainer:
    """Trains every SAE of `cfg.sae_specs()` from one BatchSource, with checkpoints in `out_dir`."""

    cfg: TrainConfig
    source: BatchSource
    out_dir: Path
    run_info: RunInfo = field(default_factory=RunInfo)
    """What every run's cfg.json records beside the training itself (extraction or input file, toy)."""
    progress: Callable[[int, dict], None] | None = None
    """Called after every logged step with (step, {sae name: metrics}); the UI hooks in here."""
    world: World = field(default_factory=World)
    """The ranks of a torchrun job: each trains on its slice of every batch, the main rank writes every file."""

    def __post_init__(self):
        self.out_dir = Path(self.out_dir)
        if self.cfg.batch_size < 2 * self.world.size:
            raise TrainingError(f"batch_size {self.cfg.batch_size} leaves fewer than 2 rows to each of "
                                f"{self.world.size} ranks")
        self.cfg = self.cfg.for_rows(self.source.n_rows)
        self.device = resolve_device(self.cfg.device)
        self.dtype = getattr(torch, self.cfg.dtype)
        self.states = [
            make_state(name, widths, self.source.d_in, self.cfg, self.device, self.dtype, self.world)
            for name, widths in self.cfg.sae_specs()
        ]
        self.step = 0
        self.checkpoint_step = 0
        self.thresholds: dict[str, ThresholdInfo | None] = {}
        self.scale: float | None = None

    @property
    def compute_dtype_name(self) -> str:
        """The dtype of the SAEs' encoder matmuls, as cfg.json and the checkpoint record it."""
        return io.dtype_name(self.states[0].sae.compute_dtype)

    def run_dir(self, name: str) -> Path:
        """Where SAE `name` is saved (`sae_dirs`)."""
        return sae_dirs(self.cfg, self.out_dir)[name]

    @property
    def checkpoint_path(self) -> Path:
        return checkpoint_path(self.out_dir)

    def _init_from_first_batch(self, x: Tensor) -> None:
        """Activation scale to unit mean squared norm, and b_dec at the geometric median of the first (whole) batch:
        the main rank's, so that every rank starts from the very same weights."""
        mean_sq = x.double().pow(2).sum(dim=1).mean().item()
        if not mean_sq > 0:
            raise TrainingError("step 0: the first activation batch is all zeros; nothing to learn")
        scale = torch.tensor([1.0 / math.sqrt(mean_sq)], dtype=torch.float64, device=x.device)
        median = self.world.broadcast_(torch.cat([scale, geometric_median(x.double() * scale)]))
        self.scale, median = median[0].item(), median[1:]
        for state in self.states:
            with torch.no_grad():
                state.sae.b_dec.copy_(median.to(self.dtype))

    def train(self, resume: bool = False) -> dict[str, Path]:
        """Run to cfg.steps (from the last checkpoint when resume) and save every SAE; returns run dirs.
        Under several ranks every rank calls this; only the main rank writes."""
        if resume:
            if not self.checkpoint_path.exists():
                raise TrainingError(f"--resume: no checkpoint at {self.checkpoint_path}")
            self.load_checkpoint()
        else:
            check_new_run(self.out_dir)
        if self.world.main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            for state in self.states:
                self.run_dir(state.name).mkdir(parents=True, exist_ok=True)
                Run(self.run_dir(state.name)).trim_metrics(self.step)

        batches = self.source.batches(self.step, self.cfg.batch_size, self.cfg.seed)
        part = self.world.part(self.cfg.batch_size)
        bar = tqdm(total=self.cfg.steps, initial=self.step, unit="step", dynamic_ncols=True, mininterval=1.0,
                   disable=not self.world.main)
        started = time.perf_counter()
        recent: deque[Tensor] = deque(maxlen=self.cfg.threshold_batches)  # held-in batches for a checkpoint's θ
        try:
            while self.step < self.cfg.steps:
                batch = next(batches)
                _check_finite(batch, self.step)
                if self.scale is None:
                    self._init_from_first_batch(batch.to(self.device, self.dtype))
                x = batch[part].to(self.device, self.dtype, non_blocking=True) * self.scale
                metrics = {s.name: sae_step(s, x, self.step, self.cfg) for s in self.states}
                recent.append(x)
                self.step += 1
                bar.update(1)
                if self.step % self.cfg.log_every == 0 or self.step == self.cfg.steps:
                    self._log(metrics, time.perf_counter() - started)
                    bar.set_postfix({n: f"fvu {m['fvu'][-1]:.3f}" for n, m in metrics.items()})
                if self.step % self.cfg.checkpoint_every == 0 or self.step == self.cfg.steps:
                    self.save_checkpoint()
                    if self.step < self.cfg.steps:
                        self.save_snapshot(list(recent))
                pause_at(f"train step {self.step} rank {self.world.rank}")
            held_in = [next(batches)[part].to(self.device, self.dtype) * self.scale
                       for _ in range(self.cfg.threshold_batches)]
            self.thresholds = {s.name: self._set_threshold(s, held_in) for s in self.states}
        except RankLost as exc:
            raise TrainingError(f"step {self.step}: {exc}; the last checkpoint is at step {self.checkpoint_step}: "
                                f"run the same command with --resume to continue from it") from None
        finally:
            bar.close()
        return {s.name: self.save_run(s) for s in self.states}

    def save_snapshot(self, held_in: list[Tensor]) -> None:
        """Every SAE as it stands at a checkpoint, usable like a finished run (cfg.json's steps_done says how far
        it got): θ calibrated on the last batches it trained on, while training goes on with its running θ."""
        for state in self.states:
            running = state.sae.threshold.detach().clone()
            self.thresholds[state.name] = self._set_threshold(state, held_in)
            self.save_run(state)
            with torch.no_grad():
                state.sae.threshold.copy_(running)

    def _set_threshold(self, state: SAEState, held_in: list[Tensor]) -> ThresholdInfo | None:
        """Calibrate a BatchTopK SAE's θ on the held-in batches (after the checkpoint: it keeps the running θ)."""
        if state.sae.activation != "batchtopk":
            return None
        if not held_in:
            theta = float(state.sae.threshold.max())
            return ThresholdInfo(theta=theta, running_theta=theta, rows=0)
        return calibrate_threshold(state.sae, held_in, self.cfg.k, self.world)

    def _log(self, metrics: dict[str, dict[str, Any]], elapsed: float) -> None:
        if not self.world.main:
            return
        tokens = self.step * self.cfg.batch_size
        for name, m in metrics.items():
            Run(self.run_dir(name)).append_metrics(
                TrainMetrics(step=self.step, tokens=tokens, elapsed_s=round(elapsed, 3), **m))
        if self.progress is not None:
            self.progress(self.step, metrics)

    def save_run(self, state: SAEState) -> Path:
        """The finished SAE, folded back to raw activation scale, with its cfg.json (written by the main rank)."""
        run = Run(self.run_dir(state.name))
        if not self.world.main:
            return run.path
        dead = state.dead_mask(self.cfg.dead_window)
        info = dataclasses.replace(
            self.run_info, name=state.name, train=self.cfg, steps_done=self.step,
            tokens_seen=self.step * self.cfg.batch_size, act_scale=self.scale,
            dead_fraction=dead.float().mean().item(), world_size=self.world.size,
            compute_dtype=self.compute_dtype_name,
            threshold=self.thresholds.get(state.name))
        run.save_sae(state.sae, info, act_scale=self.scale)
        return run.path

    def save_checkpoint(self) -> None:
        """Model, optimiser and counters of every SAE in one safetensors file, replaced atomically (by the main
        rank: every rank holds the same state)."""
        self.checkpoint_step = self.step
        if not self.world.main:
            return
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
        meta = {"step": self.step, "scale": self.scale, "config": self.cfg.to_json(), "world_size": self.world.size,
                "input": self._input_id(), "d_in": self.source.d_in, "compute_dtype": self.compute_dtype_name}
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        self.checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
        io.atomic_save_safetensors(tensors, self.checkpoint_path, metadata={"msae": json.dumps(meta)})

    def _input_id(self) -> str | None:
        """What the run trains on: the activations file's content hash, or the activation cache's id."""
        info = self.run_info
        if info.activations is not None:
            return f"sha256:{info.activations.sha256}"
        return f"cache:{info.extraction.cache_id}" if info.extraction is not None else None

    def load_checkpoint(self) -> None:
        try:
            self._load_checkpoint()
        except (SafetensorError, KeyError, ValueError) as exc:
            raise TrainingError(f"--resume: {self.checkpoint_path} cannot be read ({type(exc).__name__}: {exc}); "
                                f"it is damaged (a disk error or a copy cut short): start a new run") from None

    def _load_checkpoint(self) -> None:
        with safe_open(str(self.checkpoint_path), framework="pt") as f:
            meta = json.loads(f.metadata()["msae"])
            saved_input = meta.get("input")
            if saved_input is not None and saved_input != self._input_id():
                raise TrainingError(f"--resume: the checkpoint was trained on other activations ({saved_input}) than "
                                    f"these ({self._input_id()}); resume it on its own input or start a new run")
            if meta.get("d_in", self.source.d_in) != self.source.d_in:
                raise TrainingError(f"--resume: the checkpoint's SAEs read d_in={meta['d_in']} but these activations "
                                    f"have d_in={self.source.d_in}")
            saved_dtype = meta.get("compute_dtype", "float32")  # checkpoints from before bf16 computed in float32
            if saved_dtype != self.compute_dtype_name:
                raise TrainingError(f"--resume: the checkpoint was trained with {saved_dtype} matmuls and this run "
                                    f"would use {self.compute_dtype_name}; pass --precision {saved_dtype} to continue "
                                    f"it as it started")
            saved = TrainConfig.from_json(meta["config"])
            may_change = ("steps", "passes", "checkpoint_every", "log_every", "device", "precision")
            diff = [f.name for f in dataclasses.fields(TrainConfig)
                    if f.name not in may_change and getattr(saved, f.name) != getattr(self.cfg, f.name)]
            if diff:
                raise TrainingError(f"--resume: the checkpoint was made with different settings: {', '.join(diff)}")
            self.step, self.scale = int(meta["step"]), meta["scale"]
            self.checkpoint_step = self.step
            saved_world = int(meta.get("world_size", 1))
            if saved_world != self.world.size and self.world.main:
                print(f"--resume: the checkpoint was written by {saved_world} process(es), this job has "
                      f"{self.world.size}: the batches and the BatchTopK selection stay the same, only the order in "
                      f"which floats are summed changes", file=sys.stderr)
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


def train_job(job: TrainJob, out: Path, resume: bool = False, world: World = World(),
              say: Callable[[str], None] = print) -> dict[str, Path]:
    """`msae train`: every SAE of `job` trained into `out` (from its checkpoint when `resume`) on its activations
    file or its extraction and, when it trained from text, evaluated on the cache's held-out shard; returns the run
    directories by SAE name. Under several ranks (torchrun) every rank calls this: they extract and train together,
    the main rank writes, `say`s what it did and evaluates. The main rank holds `out`'s lock throughout
    (msae.run.locked): a second training there is refused."""
    with locked(out) if world.main else contextlib.nullcontext():
        return _train_job(job, out, resume, world, say)


def _train_job(job: TrainJob, out: Path, resume: bool, world: World, say: Callable[[str], None]) -> dict[str, Path]:
    if not resume:
        check_new_run(out)
    if world.main:
        say(precision_note(job.train.precision, resolve_device(job.train.device)))
    if job.activations is not None:
        path = Path(job.activations)
        source = TensorBatches(read_activations_file(path))
        run_info = RunInfo(activations=InputFile(path=job.activations, sha256=io.sha256_file(path)))
        cache = None
    else:
        cache = extract(job.extract, world=world)
        source = CachedActivations(cache, max_rows=job.extract.tokens)
        source.check_finite()
        run_info = RunInfo(extraction=extraction_info(cache, job.extract))
    trainer = Trainer(job.train, source, out, run_info=run_info, world=world)
    if world.main:
        say(reports.reads_note(trainer.cfg, source.n_rows))
    dirs = trainer.train(resume=resume)
    if not world.main:
        return dirs
    for name, run_dir in dirs.items():
        say(reports.training_line(name, run_dir, Run(run_dir).metrics()[-1]))
    if cache is not None:
        evaluate_runs(dirs, cache, job, say)
    return dirs


def evaluate_runs(dirs: dict[str, Path], cache: Path, job: TrainJob, say: Callable[[str], None] = print) -> None:
    """Held-out metrics of every run, written to its eval.json and said."""
    from msae.evaluate import evaluate_run
    from msae.lm import load_lm

    lm = load_lm(job.extract.model, job.extract.device, precision=job.extract.precision)
    for name, run_dir in dirs.items():
        try:
            result = evaluate_run(run_dir, cache, lm, job.eval_contexts)
        except ValueError as exc:
            say(f"{name}: held-out evaluation skipped ({exc})")
            continue
        say(reports.heldout_lines(name, result))
