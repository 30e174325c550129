"""Several processes under torchrun (torch.distributed): the job's ranks, data-parallel training and BatchTopK over
every rank's rows.

Data parallel, exactly: every rank reads the same global batch (B rows) and keeps its own consecutive slice
(`World.part`). `DataParallelSAE` selects BatchTopK over all B rows (`select_batchtopk`: the very entries one
process holding the whole batch keeps) and reports the whole batch's figures (mse, fvu, l0, l1, AuxK) while its
gradients come from the rank's own rows, weighted by its share of the batch; `World.sum_grads` adds the ranks' parts
up to the whole batch's gradient. Every rank then takes the same optimiser step, so the weights stay equal without
being sent again. `World()` is a single process, whose reductions return their input: the same code runs either way.

Why not DistributedDataParallel: the gradient sum is the only part of a step DDP would do (the loss weighting, the
selection, the dead-latent counters and θ need collectives of their own), and its overlap of the all-reduce with
backward has little to hide: the sparse backward is short and gives the decoder's gradient only just before the
encoder's. benchmarks/bench_distributed.py measures both (2 CPU processes: 0.124 s a step against DDP's 0.134 s).
"""

from __future__ import annotations

import math
import os
import re
import signal
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor

from msae import sparse
from msae.config import ConfigError
from msae.lm import resolve_device
from msae.sae import SAE, SAEOutput
from msae.sparse import Entries

POOL_DEPTH = 1.25
"""Each rank first keeps its ceil(1.25·k)·B_rank largest pre-activations. The global threshold lies between the
smallest and the largest of the ranks' own (k·B_rank)-th values, far above this pool's floor for ranks whose rows come
from one shuffled batch; a rank whose pool stops short (rows unlike the others') takes a second pass for the rest."""


class RankLost(RuntimeError):
    """A collective failed or the launcher stopped this rank: another rank of the job has stopped."""


def _collective(run: Callable[[], object]) -> None:
    try:
        run()
    except RankLost:
        raise
    except RuntimeError as exc:
        # gloo and NCCL open with the source line ("[.../pair.cc:537] Read error ...: Connection reset by peer. ...")
        text = re.sub(r"^\[[^\]]*\]\s*", "", str(exc).strip())
        reason = text.splitlines()[0].split(". ")[0] if text else type(exc).__name__
        raise RankLost(f"lost contact with the other ranks ({reason})") from None


@dataclass(frozen=True)
class World:
    """The ranks of a job (the default process group). World() is one process: every reduction returns its input."""

    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        """The rank that writes files (rank 0)."""
        return self.rank == 0

    def part(self, n_rows: int) -> slice:
        """This rank's consecutive rows of a batch of n_rows (the ranks' sizes differ by at most one)."""
        return slice(self.rank * n_rows // self.size, (self.rank + 1) * n_rows // self.size)

    def sum_(self, t: Tensor) -> Tensor:
        """t summed over the ranks, in place; returns t."""
        if self.size > 1:
            _collective(lambda: dist.all_reduce(t))
        return t

    def min_(self, t: Tensor) -> Tensor:
        """t's elementwise minimum over the ranks, in place; returns t."""
        if self.size > 1:
            _collective(lambda: dist.all_reduce(t, op=dist.ReduceOp.MIN))
        return t

    def broadcast_(self, t: Tensor) -> Tensor:
        """The main rank's t on every rank, in place; returns t."""
        if self.size > 1:
            _collective(lambda: dist.broadcast(t, src=0))
        return t

    def gather(self, t: Tensor) -> Tensor:
        """(size, *t.shape): every rank's t, on every rank (each rank's t must have the same shape)."""
        if self.size == 1:
            return t.unsqueeze(0)
        parts = [torch.empty_like(t) for _ in range(self.size)]
        _collective(lambda: dist.all_gather(parts, t.contiguous()))
        return torch.stack(parts)

    def gather_to_main(self, t: Tensor) -> Tensor | None:
        """(size, *t.shape) of every rank's t on the main rank, None elsewhere (same shapes on every rank)."""
        if self.size == 1:
            return t.unsqueeze(0)
        parts = [torch.empty_like(t) for _ in range(self.size)] if self.main else None
        _collective(lambda: dist.gather(t.contiguous(), parts, dst=0))
        return torch.stack(parts) if self.main else None

    def barrier(self) -> None:
        if self.size > 1:
            _collective(dist.barrier)

    def sum_grads(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Each parameter's gradient summed over the ranks: one all-reduce per tensor, all in flight at once."""
        if self.size == 1:
            return
        grads = [p.grad for p in params if p.grad is not None]

        def run() -> None:
            for work in [dist.all_reduce(g, async_op=True) for g in grads]:
                work.wait()

        _collective(run)


def _stopped_by_launcher(_signum, _frame) -> None:
    raise RankLost("the launcher stopped this rank (another rank failed, or the job was cancelled)")


@contextmanager
def launch(device: str = "auto") -> Iterator[World]:
    """The job's World. Under torchrun (WORLD_SIZE > 1 in the environment) this joins the process group, NCCL for
    CUDA tensors and gloo for CPU ones, each rank on its own GPU (cuda:LOCAL_RANK, which `cuda` and `auto` then
    mean); otherwise it is World(), a single process, and nothing is started."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        yield World()
        return
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    cuda = resolve_device(device).type == "cuda"
    if cuda:
        if ":" in device and int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
            raise ConfigError(f"device {device} would put every rank of this machine on one GPU; under torchrun "
                              f"use --device cuda (or auto): each rank takes cuda:LOCAL_RANK")
        torch.cuda.set_device(resolve_device(device) if ":" in device else local_rank)
    dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo")
    previous = signal.signal(signal.SIGTERM, _stopped_by_launcher)
    try:
        yield World(rank, size)
        # The ranks leave together: a rank that tore its group down while rank 0 was still saving and evaluating
        # was seen to abort in gloo's teardown ("terminate called without an active exception") after a whole run.
        dist.barrier()
    finally:
        signal.signal(signal.SIGTERM, previous)
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------ BatchTopK over ranks


def _kth_largest(vals: Tensor, k: int) -> Tensor:
    """The k-th largest of vals (0 when there are fewer: every value then counts)."""
    if vals.numel() < k or k == 0:
        return vals.new_zeros(())
    return vals.kthvalue(vals.numel() - k + 1).values


def _in_float32(entries: Entries) -> Entries:
    return entries if entries.vals.dtype == torch.float64 else entries._replace(vals=entries.vals.float())


@torch.no_grad()
def select_batchtopk(x1: Tensor, W1: Tensor, k: int, world: World) -> Entries:
    """This rank's entries of BatchTopK over the global batch (the encoder's operands x1, W1: sparse.fold_rows,
    sparse.fold_weights): the k·B largest positive pre-activations of all ranks'
    rows (B rows in all), exactly those one process holding the whole batch keeps.

    The k·B-th value t lies between the smallest and the largest of the ranks' own (k·B_rank)-th values, lo and hi.
    Values above hi are kept, the few between lo and hi are gathered to find t, and ties at t are kept in rank and
    row order until k·B entries are kept (a single process's topk breaks such ties in no stated order; activations
    tie with probability zero). Three small all-gathers; the encoder runs once unless a rank's pool stops above lo."""
    n_rows = x1.shape[0]
    depth = math.ceil(POOL_DEPTH * k)
    # Values compared and gathered in float32: every bf16 value is exact in it, and the row count is not in bf16.
    pool = _in_float32(sparse.select_batchtopk(x1, W1, depth))
    complete = pool.vals.numel() < depth * n_rows  # the pool holds every positive value of this rank
    floor = pool.vals.new_zeros(()) if complete else pool.vals.min()  # every value above it is in the pool
    info = world.gather(torch.stack([_kth_largest(pool.vals, k * n_rows), floor,
                                     pool.vals.new_tensor(float(n_rows))]))  # (ranks, 3)
    lo, hi = info[:, 0].min(), info[:, 0].max()
    n_keep = k * int(info[:, 2].sum().item())
    if not complete and floor >= lo:
        below = lo.to(x1.dtype)  # lo is one of the pool's values, so exact in the compute dtype
        pool = _in_float32(sparse.select_above(x1, W1, torch.nextafter(below, below.new_tensor(-math.inf))))

    contested = pool.vals[(pool.vals >= lo) & (pool.vals <= hi)]
    counts = world.gather(torch.tensor([int((pool.vals > hi).sum()), contested.numel()]))  # (ranks, 2)
    width = int(counts[:, 1].max())
    padded = torch.cat([contested, contested.new_full((width - contested.numel(),), -math.inf)])
    gathered = world.gather(padded)  # (ranks, width)
    per_rank = [gathered[r, : int(counts[r, 1])] for r in range(world.size)]
    need = n_keep - int(counts[:, 0].sum())  # entries to keep from the contested values
    every = torch.cat(per_rank)
    if need > every.numel():  # fewer than k·B positive values in all: keep them all
        return pool
    t = every.topk(need).values[-1]
    ties = [int((v == t).sum()) for v in per_rank]
    ties_wanted = need - int((every > t).sum())
    mine = min(ties[world.rank], max(0, ties_wanted - sum(ties[: world.rank])))
    keep = pool.vals > t
    keep[(pool.vals == t).nonzero().squeeze(1)[:mine]] = True
    return Entries(pool.rows[keep], pool.cols[keep], pool.vals[keep])


# ------------------------------------------------------------------------------------------ the data-parallel SAE


def _total(share: Tensor, total: Tensor) -> Tensor:
    """total's value with share's gradient: the rank's part of a whole-batch figure."""
    return share + (total - share).detach()


def whole_batch(out: SAEOutput, x: Tensor, world: World) -> SAEOutput:
    """`out` (one rank's rows x) with the whole batch's mse, fvu, l0, l1 and AuxK loss; their gradients are this rank's
    share, so the ranks' gradients add up to the whole batch's. Two all-reduces of a few numbers."""
    n_rows, d_in = x.shape
    tiny = torch.finfo(x.dtype).tiny
    residual = -out.errors[-1]  # x - x̂, no gradient
    sums = world.sum_(torch.cat([x.sum(dim=0), residual.sum(dim=0), x.new_tensor([n_rows])]))
    n_total = sums[-1]
    x_ss = (x - sums[:d_in] / n_total).pow(2).sum()
    residual_ss = (residual - sums[d_in : 2 * d_in] / n_total).pow(2).sum()
    # SAE.forward divided this rank's AuxK error by its own residual variance; undo that to get the summed error.
    own_var = (residual - residual.mean(dim=0)).pow(2).sum(dim=-1).mean().clamp_min(tiny)
    share = n_rows / n_total
    mse, l1 = out.mse * share, out.l1 * share
    aux_sq = out.aux_loss * own_var * n_rows
    totals = world.sum_(torch.cat([mse.detach(), torch.stack([l1.detach(), aux_sq.detach(), x_ss, residual_ss,
                                                              x.new_tensor(float(out.entries.vals.numel()))])]))
    mse_t, (l1_t, aux_sq_t, x_ss_t, residual_ss_t, nnz_t) = totals[: mse.numel()], totals[mse.numel() :]
    aux = aux_sq / residual_ss_t.clamp_min(tiny)  # Σ‖error‖² / B over the whole batch's residual variance
    return out._replace(
        mse=_total(mse, mse_t), fvu=mse_t / (x_ss_t / n_total).clamp_min(tiny), l0=nnz_t / n_total,
        l1=_total(l1, l1_t), aux_loss=_total(aux, aux_sq_t / residual_ss_t.clamp_min(tiny)))


class DataParallelSAE(SAE):
    """An SAE trained on a batch spread over the ranks of `world`: in training, BatchTopK selects over every rank's
    rows and the forward pass reports the whole batch's figures with this rank's share of their gradients
    (`whole_batch`); every rank must then call it together. In eval mode it is a plain SAE."""

    def __init__(self, *args, world: World, **kwargs):
        super().__init__(*args, **kwargs)
        self.world = world

    def select_from(self, x1: Tensor, W1: Tensor) -> Entries:
        if not (self.training and self.uses_batchtopk()):
            return super().select_from(x1, W1)
        entries = select_batchtopk(x1, W1, self.k, self.world)
        return entries._replace(vals=entries.vals.to(self.W_dec.dtype))

    def forward(self, x: Tensor, dead_mask: Tensor | None = None, k_aux: int | None = None) -> SAEOutput:
        out = super().forward(x, dead_mask, k_aux)
        return whole_batch(out, x, self.world) if self.training else out
