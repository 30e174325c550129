"""Step-time benchmark of peer Matryoshka BatchTopK SAE trainers (SAELens, dictionary_learning) on this CPU.

Times one full training step of each peer's *real* trainer class -- forward, loss
(including the auxiliary dead-latent loss), backward, gradient clipping, optimizer
and scheduler step, exactly as their own training loop calls it -- at the shared
benchmark shape: d_in 576, k 32, batch 4096, Matryoshka widths
1024, 2048, 4096, 8192, 16384 (16,384 latents), fp32 on CPU (``--autocast``: under the
trainers' bf16 autocast, the precision of msae's bf16 encoder).  A plain dense
PyTorch TopK SAE step is timed alongside as a baseline.

This module does not import msae.  It runs in the separate peers virtual
environment, which has the peer packages installed::

    python3 -m venv /work/peers-venv
    /work/peers-venv/bin/pip install torch==2.13.0
    /work/peers-venv/bin/pip install torch==2.13.0 sae-lens dictionary-learning
    # PyPI's torchvision is a CUDA build that cannot load next to torch+cpu and
    # breaks `import transformers` (pulled in by dictionary_learning -> nnsight).
    # Nothing on the trainer path uses it:
    /work/peers-venv/bin/pip uninstall -y torchvision

Usage (from the repository root)::

    /work/peers-venv/bin/python benchmarks/peers.py --out peers.json
    /work/peers-venv/bin/python benchmarks/peers.py --out peers-keep.json --malloc-keep
    # identical data on both sides: a safetensors file with a tensor "activations" (N, 576)
    /work/peers-venv/bin/python benchmarks/peers.py --out p.json --activations acts.safetensors

It prints and writes ``{peer: {median_s, steps_s, version, ...}}``.  Each peer runs
in its own child process, so one peer's heap never affects the next one's timing
and ``max_rss_mib`` is that peer's own peak.

Peers (``--peers``, comma separated):

* ``saelens`` -- ``sae_lens.MatryoshkaBatchTopKTrainingSAE`` driven by
  ``sae_lens.training.sae_trainer.SAETrainer``: each step is the body of
  ``SAETrainer.fit()`` less wandb/checkpointing (``maybe_reset_sparsity()``,
  ``step(batch)``, ``n_training_steps += 1``).
* ``dictionary_learning`` -- ``dictionary_learning.trainers.matryoshka_batch_top_k.
  MatryoshkaBatchTopKTrainer.update(step, batch)``.  The first warm-up step is
  step 0 (the trainer sets ``b_dec`` to the geometric median there); later steps
  are numbered past ``threshold_start_step`` so the steady-state path (threshold
  EMA update) is what gets timed.
* ``saelens_noaux``, ``dictionary_learning_noaux`` -- the same with the trainers'
  default dead-latent windows (1000 steps / 10M tokens), so early in training no
  latent counts as dead and the auxiliary loss is skipped.
* ``plain_dense_topk`` -- see ``time_plain_dense_topk``.

The auxiliary loss only runs once some latents count as dead, which a fresh
trainer never reaches within a few steps.  The default variants therefore set the
trainers' own dead-latent window to its minimum (SAELens
``SAETrainerConfig.dead_feature_window=0``; dictionary_learning
``trainer.dead_feature_threshold=1``): every latent that did not fire in the
previous step (SAELens) / this batch (dictionary_learning) counts as dead, and the
aux path runs every step.  Its cost does not depend on how many latents are dead
(dense masking, top-k over all latents, dense decode), only that some are.
``dead_latents`` in the output records the counts seen.

Allocator mode (``--malloc-keep``): by default glibc serves every large temporary
(a 4096 x 16,384 fp32 tensor is 256 MiB) with its own mmap and unmaps it on
free, so each step faults all those pages in again.  ``--malloc-keep`` re-executes
this script with::

    MALLOC_MMAP_THRESHOLD_=17179869184   # 16 GiB: large blocks come from the heap
    MALLOC_TRIM_THRESHOLD_=17179869184   # 16 GiB: freed heap is not given back
    MALLOC_TOP_PAD_=1073741824           # 1 GiB: grow the heap in big steps

These are read by glibc only at process start, hence the re-exec.  Checked on this
machine (glibc 2.36, Debian 12): the 32 MiB upper limit on M_MMAP_THRESHOLD that
mallopt(3) documents for 64-bit does not apply -- with MALLOC_MMAP_THRESHOLD_=16 GiB
a 300 MiB malloc comes from the brk heap, and ``mallopt(M_MMAP_THRESHOLD, 2**31-1)``
returns 1 -- so no ``MALLOC_MMAP_MAX_=0`` is needed.  Minor page faults per
step (``minor_faults_per_step`` in the output) with these settings fall from
~450k (plain dense) / ~2.4M (SAELens) by default to 0 once the heap has grown,
which takes 2-4 steps (so the first timed steps after a 2-step warm-up may still
fault; the median absorbs them).  Peak RSS roughly doubles (SAELens 3.9 -> 6.6 GB).
Alternatives measured: ``MALLOC_MMAP_MAX_=0`` with the trim/top-pad settings
(no mmap at all) also reaches ~0 faults but with occasional 65k-fault steps and
a larger peak RSS; trim/top-pad alone, or the threshold alone, leave 100k-200k
faults per step.  Compare implementations only in the same mode.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from typing import Callable

import torch

D_IN = 576
K = 32
BATCH = 4096
WIDTHS = (1024, 2048, 4096, 8192, 16384)
D_SAE = WIDTHS[-1]
SEED = 0

PEERS = (
    "saelens",
    "dictionary_learning",
    "plain_dense_topk",
    "saelens_noaux",
    "dictionary_learning_noaux",
)
DEFAULT_PEERS = PEERS[:3]

MALLOC_KEEP_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(16 << 30),
    "MALLOC_TRIM_THRESHOLD_": str(16 << 30),
    "MALLOC_TOP_PAD_": str(1 << 30),
}

StepFn = Callable[[torch.Tensor], None]


# --------------------------------------------------------------------------- data


def make_activations(n: int, d_in: int = D_IN, rank: int = 64, seed: int = SEED) -> torch.Tensor:
    """Fixed-seed Gaussian activations with low-rank structure: (n, d_in) float32.

    A rank-`rank` signal with decaying per-direction scales plus isotropic noise
    (variance about 0.5 per coordinate).  Needs only torch, so the msae side can
    import it to build identical data.
    """
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(d_in, rank, generator=g))[0].T  # (rank, d_in), orthonormal rows
    scales = torch.linspace(1.0, 0.1, rank) * (d_in / rank) ** 0.5
    coeff = torch.randn(n, rank, generator=g) * scales
    return (coeff @ basis + 0.3 * torch.randn(n, d_in, generator=g)).contiguous()


def load_activations(path: str) -> torch.Tensor:
    """Load the tensor named ``activations`` from a safetensors file as (N, 576) float32."""
    from safetensors.torch import load_file

    acts = load_file(path)["activations"]
    if acts.ndim != 2 or acts.shape[1] != D_IN:
        raise ValueError(f"expected (N, {D_IN}) activations, got {tuple(acts.shape)}")
    return acts.float().contiguous()


def batch_at(acts: torch.Tensor, i: int, batch: int = BATCH) -> torch.Tensor:
    """The i-th batch of `batch` rows, cycling through `acts` (which needs >= `batch` rows)."""
    n_batches = acts.shape[0] // batch
    if n_batches == 0:
        raise ValueError(f"need at least {batch} activation rows, got {acts.shape[0]}")
    j = i % n_batches
    return acts[j * batch : (j + 1) * batch]


# --------------------------------------------------------------------------- peers


def build_saelens(aux: bool = True, autocast: bool = False) -> tuple[StepFn, Callable[[], int], str]:
    """SAELens 6 Matryoshka BatchTopK trainer; returns (step_fn, dead_count_fn, version). `autocast` turns on its
    own bf16 autocast (SAETrainerConfig.autocast: torch.autocast on the trainer's device, bfloat16)."""
    import sae_lens
    from sae_lens import MatryoshkaBatchTopKTrainingSAE, MatryoshkaBatchTopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(SEED)
    sae_cfg = MatryoshkaBatchTopKTrainingSAEConfig(
        d_in=D_IN, d_sae=D_SAE, k=K, matryoshka_widths=list(WIDTHS), dtype="float32", device="cpu"
    )
    sae = MatryoshkaBatchTopKTrainingSAE(sae_cfg)
    lr = 3e-4
    trainer_cfg = SAETrainerConfig(
        total_training_samples=10**6 * BATCH,
        train_batch_size_samples=BATCH,
        lr=lr,
        lr_end=lr / 10,  # what LanguageModelSAERunnerConfig fills in
        device="cpu",
        dead_feature_window=0 if aux else 1000,
        autocast=autocast,
    )
    trainer = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=iter(()))

    def step(batch: torch.Tensor) -> None:
        # The loop body of SAETrainer.fit(), less wandb logging and checkpointing.
        trainer.maybe_reset_sparsity()
        trainer.step(batch)
        trainer.n_training_steps += 1

    def dead() -> int:  # the mask the next step's aux loss will use
        return int(trainer.dead_neurons.sum())

    return step, dead, sae_lens.__version__


def build_dictionary_learning(aux: bool = True, autocast: bool = False) -> tuple[StepFn, Callable[[], int], str]:
    """dictionary_learning Matryoshka BatchTopK trainer; returns (step_fn, dead_count_fn, version). It has no
    precision setting: `autocast` wraps its update in torch.autocast("cpu", bfloat16)."""
    from dictionary_learning.trainers.matryoshka_batch_top_k import MatryoshkaBatchTopKTrainer

    group_sizes = [WIDTHS[0]] + [b - a for a, b in zip(WIDTHS, WIDTHS[1:])]  # 1024,1024,2048,4096,8192
    trainer = MatryoshkaBatchTopKTrainer(
        steps=10**6,
        activation_dim=D_IN,
        dict_size=D_SAE,
        k=K,
        layer=0,
        lm_name="benchmark",
        group_fractions=[s / D_SAE for s in group_sizes],
        seed=SEED,
        device="cpu",
    )
    assert trainer.group_sizes == group_sizes, trainer.group_sizes
    if aux:
        trainer.dead_feature_threshold = 1
    counter = iter(range(10**9))

    def step(batch: torch.Tensor) -> None:
        i = next(counter)
        # Step 0 initialises b_dec (geometric median); later steps run past
        # threshold_start_step, i.e. the steady-state path with the threshold update.
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            trainer.update(0 if i == 0 else trainer.threshold_start_step + i, batch)

    def dead() -> int:  # what the last step's aux loss saw
        return int(trainer.dead_features)

    return step, dead, metadata.version("dictionary-learning")


class PlainDenseTopK(torch.nn.Module):
    """Plain dense TopK SAE: dense encoder, per-row top-k, dense (B, d_sae) latents, dense decoder."""

    def __init__(self, d_in: int = D_IN, d_sae: int = D_SAE, k: int = K):
        super().__init__()
        self.k = k
        w = torch.randn(d_sae, d_in)
        w = w / w.norm(dim=1, keepdim=True)
        self.W_dec = torch.nn.Parameter(w)
        self.W_enc = torch.nn.Parameter(w.T.clone())
        self.b_enc = torch.nn.Parameter(torch.zeros(d_sae))
        self.b_dec = torch.nn.Parameter(torch.zeros(d_in))

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        pre = (x - self.b_dec) @ self.W_enc + self.b_enc
        vals, idx = pre.topk(self.k, dim=-1, sorted=False)
        z = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
        x_hat = z @ self.W_dec + self.b_dec
        return (x_hat - x).pow(2).sum(dim=-1).mean()


def build_plain_dense_topk(d_sae: int = D_SAE, k: int = K, fused_adam: bool = False) -> tuple[StepFn, str]:
    """The plain dense TopK baseline; Adam as the peers use it (default, not fused) unless asked."""
    torch.manual_seed(SEED)
    model = PlainDenseTopK(D_IN, d_sae, k)
    opt = torch.optim.Adam(model.parameters(), lr=3e-4, fused=fused_adam)

    def step(batch: torch.Tensor) -> None:
        loss = model.loss(batch)
        loss.backward()
        opt.step()
        opt.zero_grad()

    return step, f"torch {torch.__version__}"


# --------------------------------------------------------------------------- timing


def _time_steps(step: StepFn, acts: torch.Tensor, n_warmup: int, n_steps: int,
                dead: Callable[[], int] | None = None) -> dict:
    times, faults, dead_counts = [], [], []
    for i in range(n_warmup + n_steps):
        batch = batch_at(acts, i)
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        step(batch)
        dt = time.perf_counter() - t0
        if i >= n_warmup:
            times.append(dt)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
            if dead is not None:
                dead_counts.append(dead())
    result = {
        "median_s": statistics.median(times),
        "steps_s": times,
        # pages the step faulted in: ~0 when freed memory is kept (--malloc-keep)
        "minor_faults_per_step": int(statistics.median(faults)),
    }
    if dead is not None:
        result["dead_latents"] = dead_counts
    return result


def time_plain_dense_topk(acts: torch.Tensor, d_sae: int = D_SAE, k: int = K,
                          n_warmup: int = 2, n_steps: int = 10, fused_adam: bool = False) -> dict:
    """Median seconds per step of a plain dense PyTorch TopK SAE (the "plain dense TopK" baseline).

    Step: dense encoder matmul, per-row top-k, scatter into a dense (B, d_sae)
    latent matrix, dense decoder matmul, MSE loss, backward, Adam step.
    """
    step, version = build_plain_dense_topk(d_sae, k, fused_adam)
    result = _time_steps(step, acts, n_warmup, n_steps)
    return {**result, "version": version}


def time_peer(name: str, acts: torch.Tensor, n_warmup: int = 2, n_steps: int = 10, autocast: bool = False) -> dict:
    """Time `n_steps` full training steps of peer `name` after `n_warmup` untimed ones.

    `acts` is an (N, 576) float32 tensor, consumed in batches of 4096 (cycling).
    Returns {"median_s", "steps_s", "version", ...}.
    """
    if name == "plain_dense_topk":
        return time_plain_dense_topk(acts, n_warmup=n_warmup, n_steps=n_steps)
    builders = {"saelens": build_saelens, "dictionary_learning": build_dictionary_learning}
    base = name.removesuffix("_noaux")
    if name not in PEERS or base not in builders:
        raise ValueError(f"unknown peer {name!r}; known: {', '.join(PEERS)}")
    aux = name == base
    step, dead, version = builders[base](aux=aux, autocast=autocast)
    result = _time_steps(step, acts, n_warmup, n_steps, dead)
    return {**result, "version": version, "aux": aux, "autocast_bf16": autocast}


# --------------------------------------------------------------------------- script


def _malloc_env() -> dict:
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_")}


def _reexec_with_malloc_keep() -> None:
    """Restart this process with MALLOC_KEEP_ENV set, unless it already is (glibc reads it at start)."""
    if all(os.environ.get(k) == v for k, v in MALLOC_KEEP_ENV.items()):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC_KEEP_ENV})


def _run_one(name: str, args: argparse.Namespace) -> dict:
    acts = load_activations(args.activations) if args.activations else \
        make_activations((args.n_warmup + args.n_steps) * BATCH)
    result = time_peer(name, acts, args.n_warmup, args.n_steps, args.autocast)
    result.update(
        malloc_keep=args.malloc_keep,
        malloc_env=_malloc_env(),
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        loadavg=[round(x, 2) for x in os.getloadavg()],  # > ~2 means other work shared the 2 cores
        max_rss_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    )
    return result


def _run_in_child(name: str, args: argparse.Namespace) -> dict:
    """Run one peer in a fresh process of this script (same interpreter and environment)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--peers", name, "--out", out,
               "--n-warmup", str(args.n_warmup), "--n-steps", str(args.n_steps)]
        if args.activations:
            cmd += ["--activations", args.activations]
        if args.malloc_keep:
            cmd.append("--malloc-keep")
        if args.autocast:
            cmd.append("--autocast")
        proc = subprocess.run(cmd, stdout=subprocess.DEVNULL)  # the parent prints the summary
        if proc.returncode != 0:
            return {"error": f"exit status {proc.returncode}"}
        with open(out) as f:
            return json.load(f)[name]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--malloc-keep", action="store_true",
                        help="re-exec with glibc env vars that keep freed memory (see module docstring)")
    parser.add_argument("--activations", help="safetensors file with an (N, 576) tensor named 'activations'")
    parser.add_argument("--peers", default=",".join(DEFAULT_PEERS),
                        help=f"comma-separated subset of: {', '.join(PEERS)}")
    parser.add_argument("--n-warmup", type=int, default=2)
    parser.add_argument("--n-steps", type=int, default=10)
    parser.add_argument("--autocast", action="store_true", help="the peers' bf16 autocast (the bf16 comparison)")
    args = parser.parse_args(argv)
    if args.malloc_keep:
        _reexec_with_malloc_keep()

    names = [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = set(names) - set(PEERS)
    if unknown:
        parser.error(f"unknown peers: {', '.join(sorted(unknown))}")

    results = {}
    for name in names:
        # A single peer runs here; several run one child process each.
        results[name] = _run_one(name, args) if len(names) == 1 else _run_in_child(name, args)
        r = results[name]
        if "median_s" in r:
            print(f"{name}: median {r['median_s']:.3f} s/step "
                  f"(steps {', '.join(f'{t:.2f}' for t in r['steps_s'])}) [{r['version']}]", flush=True)
        else:
            print(f"{name}: {r}", flush=True)

    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    main()
