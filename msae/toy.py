"""Synthetic hierarchical features with known directions, to measure feature absorption exactly.

A `ToyHierarchy` is a forest of features: a root fires with its own probability, a child only where its parent
fires (with a probability given the parent), and the children of one parent may be mutually exclusive. An input
is the sum of magnitude x direction over the features present. Because every direction and every presence is
known, absorption needs no probe: the parent's latent should fire whenever the parent is present, and
absorption is the fraction of parent-with-child inputs where it does not.

`compare` trains a vanilla and a Matryoshka SAE on the same batches and evaluates both; `msae toy` prints it.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor

from msae import io
from msae.config import LinkConfig, ToyConfig, TrainConfig, add_config_args, config_from_args
from msae.results import RunInfo, ToyMetrics, ToyResult, TreeRecovery, mean_or_none
from msae.run import TOY_EVAL_ACTIVATIONS, Run, locked, refuse_other_runs
from msae.sae import SAE
from msae.train import TensorBatches, Trainer


@dataclass
class ToyHierarchy:
    """A forest of features with unit directions in `n_dims` dimensions; features are indexed 0..n_features-1."""

    n_dims: int
    """Dimension of the activations."""
    parent_of: tuple[int | None, ...]
    """Parent index of every feature (None for a root); a parent's index is below its children's."""
    probs: tuple[float, ...]
    """Firing probability of every feature: unconditional for a root, given its parent for a child."""
    exclusive_children: bool = True
    """At most one child of a parent fires at a time (each with its probability, none with the rest)."""
    magnitude: float = 1.0
    """Mean magnitude of a present feature."""
    magnitude_std: float = 0.0
    """Standard deviation of the magnitude (clipped below at 0.1 x magnitude: a present feature is never off)."""
    direction_noise: float = 0.0
    """0 gives orthonormal directions (needs n_features <= n_dims); more perturbs them towards random ones."""
    seed: int = 0
    """Seeds the directions (`sample` takes its own generator)."""
    directions: Tensor = field(init=False, repr=False)
    """(n_features, n_dims) unit direction of every feature."""

    def __post_init__(self) -> None:
        self.parent_of = tuple(None if p is None else int(p) for p in self.parent_of)
        self.probs = tuple(float(p) for p in self.probs)
        if len(self.probs) != len(self.parent_of):
            raise ValueError(f"probs has {len(self.probs)} entries for {len(self.parent_of)} features")
        for i, p in enumerate(self.parent_of):
            if p is not None and not 0 <= p < i:
                raise ValueError(f"feature {i}: its parent must be an earlier feature, got {p}")
        if any(not 0.0 <= p <= 1.0 for p in self.probs):
            raise ValueError(f"probabilities must lie in [0, 1], got {self.probs}")
        if self.exclusive_children:
            for parent in self.parents:
                total = sum(self.probs[c] for c in self.children_of(parent))
                if total > 1.0 + 1e-9:
                    raise ValueError(f"feature {parent}: its exclusive children's probabilities sum to {total} > 1")
        self.directions = make_directions(self.n_features, self.n_dims, self.direction_noise, self.seed)

    @property
    def n_features(self) -> int:
        return len(self.parent_of)

    def children_of(self, feature: int) -> list[int]:
        return [i for i, p in enumerate(self.parent_of) if p == feature]

    @property
    def parents(self) -> list[int]:
        """Features with at least one child."""
        return sorted({p for p in self.parent_of if p is not None})

    @property
    def children(self) -> list[int]:
        """Features with a parent."""
        return [i for i, p in enumerate(self.parent_of) if p is not None]

    def marginal_probs(self) -> list[float]:
        """Unconditional firing probability of every feature (a child's times its parent's)."""
        out: list[float] = []
        for i, p in enumerate(self.parent_of):
            out.append(self.probs[i] * (1.0 if p is None else out[p]))
        return out

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """n inputs: (acts (n, n_dims) float32, present (n, n_features) bool)."""
        present = torch.zeros(n, self.n_features, dtype=torch.bool)
        roots = [i for i, p in enumerate(self.parent_of) if p is None]
        present[:, roots] = torch.rand(n, len(roots), generator=generator) < torch.tensor([self.probs[i] for i in roots])
        # Parents in index order: a parent's own presence is settled before its children are drawn.
        for parent in self.parents:
            kids = self.children_of(parent)
            p_kids = torch.tensor([self.probs[c] for c in kids])
            if self.exclusive_children:
                # One uniform per row split into consecutive intervals, one per child; past them, no child.
                upper = p_kids.cumsum(0)
                u = torch.rand(n, 1, generator=generator)
                fires = (u >= upper - p_kids) & (u < upper)
            else:
                fires = torch.rand(n, len(kids), generator=generator) < p_kids
            present[:, kids] = fires & present[:, parent, None]
        mags = self.magnitude + self.magnitude_std * torch.randn(n, self.n_features, generator=generator)
        mags = mags.clamp_min(0.1 * self.magnitude)
        acts = (present * mags) @ self.directions
        return acts, present


def make_directions(n_features: int, n_dims: int, noise: float, seed: int) -> Tensor:
    """(n_features, n_dims) unit rows: orthonormal plus `noise` x a random unit-scale perturbation."""
    g = torch.Generator().manual_seed(seed)
    gauss = torch.randn(n_dims, max(n_features, 1), generator=g, dtype=torch.float64)
    if n_features <= n_dims:
        base = torch.linalg.qr(gauss).Q[:, :n_features].t()
    elif noise == 0.0:
        raise ValueError(f"{n_features} features cannot be orthogonal in {n_dims} dims; give direction_noise > 0")
    else:
        base = torch.zeros(n_features, n_dims, dtype=torch.float64)
    dirs = base + noise * torch.randn(n_features, n_dims, generator=g, dtype=torch.float64) / math.sqrt(n_dims)
    return (dirs / dirs.norm(dim=1, keepdim=True)).float()


def nabeshima(seed: int = 0) -> ToyHierarchy:
    """Nabeshima's toy: 20 dims; 3 parents (p 0.15), each with 3 exclusive children (0.2 each given the
    parent, none 0.4); 8 independent features (p 0.05). Features 0-2 are the parents, 3-11 their children
    (3-5 under 0, 6-8 under 1, 9-11 under 2), 12-19 the independents."""
    parent_of = [None] * 3 + [p for p in range(3) for _ in range(3)] + [None] * 8
    probs = [0.15] * 3 + [0.2] * 9 + [0.05] * 8
    # 20 features in 20 dims could be exactly orthogonal; the toy asks for near-orthogonal (cosines ~0.03).
    return ToyHierarchy(20, tuple(parent_of), tuple(probs), exclusive_children=True, magnitude_std=0.1,
                        direction_noise=0.1, seed=seed)


def chanin(seed: int = 0) -> ToyHierarchy:
    """Chanin et al.'s toy: 4 orthogonal features in 50 dims; f0 fires with p 0.25, f1-f3 with p 0.05 each
    and only together with f0 (0.2 each given f0, drawn independently of each other)."""
    return ToyHierarchy(50, (None, 0, 0, 0), (0.25, 0.2, 0.2, 0.2), exclusive_children=False, magnitude_std=0.1,
                        direction_noise=0.0, seed=seed)


def deep(seed: int = 0) -> ToyHierarchy:
    """A three-level tree: 2 roots (p 0.2), each with 3 mutually exclusive children (0.25 each given the root),
    each child with 2 mutually exclusive grandchildren (0.35 each given the child), and 4 independent features
    (p 0.05); 24 near-orthogonal features in 32 dims. Features 0-1 are the roots, 2-7 the children (2-4 under 0),
    8-19 the grandchildren (8-9 under 2, ...), 20-23 the independents."""
    parent_of = [None] * 2 + [r for r in range(2) for _ in range(3)] + [c for c in range(2, 8) for _ in range(2)]
    parent_of += [None] * 4
    probs = [0.25] * 2 + [0.2] * 6 + [0.3] * 12 + [0.05] * 4
    return ToyHierarchy(32, tuple(parent_of), tuple(probs), exclusive_children=True, magnitude_std=0.3,
                        direction_noise=0.1, seed=seed)


def assign(score: Tensor) -> Tensor:
    """The assignment of rows to distinct columns (rows <= columns) with the largest total score: the Hungarian
    algorithm (shortest augmenting paths with potentials), O(rows² · columns). Returns each row's column."""
    n, m = score.shape
    if n > m:
        raise ValueError(f"{n} rows cannot be assigned to {m} distinct columns")
    cost = (-score.double()).tolist()
    inf = float("inf")
    u, v = [0.0] * (n + 1), [0.0] * (m + 1)
    owner = [0] * (m + 1)  # owner[j]: the row (1-based) holding column j; 0: free
    way = [0] * (m + 1)
    for i in range(1, n + 1):
        owner[0] = i
        j0 = 0
        minv = [inf] * (m + 1)
        used = [False] * (m + 1)
        while True:
            used[j0] = True
            i0, delta, j1 = owner[j0], inf, 0
            for j in range(1, m + 1):
                if not used[j]:
                    cur = cost[i0 - 1][j - 1] - u[i0] - v[j]
                    if cur < minv[j]:
                        minv[j], way[j] = cur, j0
                    if minv[j] < delta:
                        delta, j1 = minv[j], j
            for j in range(m + 1):
                if used[j]:
                    u[owner[j]] += delta
                    v[j] -= delta
                else:
                    minv[j] -= delta
            j0 = j1
            if owner[j0] == 0:
                break
        while j0:
            j1 = way[j0]
            owner[j0] = owner[j1]
            j0 = j1
    out = torch.full((n,), -1, dtype=torch.long)
    for j in range(1, m + 1):
        if owner[j]:
            out[owner[j] - 1] = j - 1
    return out


def tree_recovery(toy: ToyHierarchy, W_dec: Tensor, links, criterion: str, min_cos: float = 0.9) -> TreeRecovery:
    """Edge precision, recall and F1 of a links table's tree (columns parent, child, tree) against the toy's true
    tree. Features are matched to latents one-to-one by decoder cosine (`assign`), kept at >= `min_cos`. A tree
    link is judged when its child latent is matched: correct when its parent latent is the match of that
    feature's true parent. best_f1 is a perfect criterion's F1 on this SAE (precision 1, recall the share of true
    edges with both features matched)."""
    dec = W_dec.detach().float().cpu()
    cos = toy.directions @ (dec / dec.norm(dim=1, keepdim=True).clamp_min(1e-12)).t()  # (features, latents)
    latent_of = assign(cos)
    matched = cos[torch.arange(toy.n_features), latent_of] >= min_cos
    feature_of = {int(latent_of[f]): f for f in range(toy.n_features) if matched[f]}
    true_edges = [(toy.parent_of[f], f) for f in toy.children]
    tree = links[links["tree"]] if links is not None else links
    judged = correct = 0
    for parent, child in ([] if tree is None else zip(tree["parent"].tolist(), tree["child"].tolist())):
        f = feature_of.get(int(child))
        if f is None:
            continue
        judged += 1
        correct += int(toy.parent_of[f] is not None and feature_of.get(int(parent)) == toy.parent_of[f])
    possible = sum(1 for p, c in true_edges if matched[p] and matched[c])
    precision = correct / judged if judged else None
    recall = correct / len(true_edges) if true_edges else None
    f1 = (2 * precision * recall / (precision + recall) if precision and recall else 0.0) if judged else None
    best_recall = possible / len(true_edges) if true_edges else 0.0
    return TreeRecovery(criterion=criterion, matched_features=int(matched.sum()), true_edges=len(true_edges),
                        predicted_edges=judged, correct_edges=correct, precision=precision, recall=recall, f1=f1,
                        best_f1=2 * best_recall / (1 + best_recall) if best_recall else 0.0, min_cos=min_cos)


TOY_MIN_LIFT = 2.0
"""The lift bound toy hierarchies are linked with. A toy parent is present on 15-25% of samples, so its lift is at
most 1 / P(p) = 4-6.7: the real-text default (LinkConfig.min_lift, chosen against word-piece hubs) would link none."""


def toy_link_config(criterion: str) -> LinkConfig:
    """The link settings toy trees are recovered with: the defaults, with the lift bound a dense toy parent can pass."""
    return LinkConfig(criterion=criterion, min_lift=TOY_MIN_LIFT)


def toy_tree_recovery(toy: ToyHierarchy, sae: SAE, acts: Tensor,
                      criteria: Sequence[str] = ("coverage", "cosine")) -> list[TreeRecovery]:
    """A Matryoshka SAE's links on `acts` under each criterion (default thresholds), against the true tree."""
    from msae.analysis import hierarchy
    from msae.analysis.features import histogram_edges, latent_stats
    from msae.analysis.stream import encode_rows

    sae.eval()
    sp = encode_rows(sae, acts)
    stats = latent_stats(sp, histogram_edges(sp.vals, 8))
    out = []
    for criterion in criteria:
        links = hierarchy.nested_links(sp, list(sae.widths), stats, sae.W_dec, toy_link_config(criterion))
        out.append(tree_recovery(toy, sae.W_dec, links, criterion))
    return out


def _rate(hits: Tensor, of: Tensor) -> float | None:
    """hits / of over boolean masks; None when `of` is empty (the metric is undefined, not 0)."""
    n = int(of.sum())
    return None if n == 0 else int((hits & of).sum()) / n


@torch.no_grad()
def evaluate(sae: SAE, toy: ToyHierarchy, acts: Tensor, present: Tensor) -> ToyMetrics:
    """Match every true feature to a latent and measure absorption, recovery and reconstruction.

    The SAE runs in eval mode (its learned threshold replaces BatchTopK) on held-out `acts` (N, n_dims) with
    the true `present` (N, n_features). A feature's latent is the one whose decoder row has the highest cosine
    with the feature's direction. Rates pool samples over features (parent_absorption is the fraction of all
    (parent, sample) pairs with the parent and one of its children present where the parent's latent is off).
    """
    was_training = sae.training
    sae.eval()
    try:
        x = acts.to(sae.W_dec.device, sae.W_dec.dtype)
        latents_NF = sae.encode(x)
        recon = sae.decode(latents_NF)
    finally:
        sae.train(was_training)
    fires_NF = (latents_NF > 0).cpu()
    dec = sae.W_dec.detach().float().cpu()
    dec = dec / dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cos_TF = toy.directions @ dec.t()  # (n_features, d_sae)
    best_cos, match = cos_TF.max(dim=1)
    matched_fires = fires_NF[:, match]  # (N, n_features): the feature's matched latent fires
    present = present.cpu()

    absorbed = with_child = fired_alone = alone = 0
    per_parent = {"absorption": [], "fires_alone": []}
    for parent in toy.parents:
        any_child = present[:, toy.children_of(parent)].any(dim=1)
        both = present[:, parent] & any_child
        only = present[:, parent] & ~any_child
        on = matched_fires[:, parent]
        absorbed += int((both & ~on).sum())
        with_child += int(both.sum())
        fired_alone += int((only & on).sum())
        alone += int(only.sum())
        per_parent["absorption"].append(_rate(~on, both))
        per_parent["fires_alone"].append(_rate(on, only))

    fire_rate = [_rate(matched_fires[:, i], present[:, i]) for i in range(toy.n_features)]
    err = (recon - x).pow(2).sum()
    total = (x - x.mean(dim=0)).pow(2).sum()
    fired_ever = fires_NF.any(dim=0)
    return ToyMetrics(
        parent_absorption=absorbed / with_child if with_child else None,
        parent_fires_alone=fired_alone / alone if alone else None,
        parent_cosine=mean_or_none([best_cos[i].item() for i in toy.parents]),
        child_cosine=mean_or_none([best_cos[i].item() for i in toy.children]),
        child_fire_rate=mean_or_none([fire_rate[i] for i in toy.children]),
        mean_cosine=best_cos.mean().item(),
        fvu=(err / total.clamp_min(1e-12)).item(),
        l0=fires_NF.sum().item() / max(fires_NF.shape[0], 1),
        dead_latents=int((~fired_ever).sum()),
        dead_fraction=(~fired_ever).float().mean().item(),
        per_parent=per_parent,
        per_feature={"latent": match.tolist(), "cosine": best_cos.tolist(), "fire_rate": fire_rate},
    )


def default_widths(toy: ToyHierarchy) -> tuple[int, ...]:
    """(parents, parents + children, all features): the first nested dictionary has room for exactly the
    parents, and the full one has one latent per true feature, which is also what a vanilla SAE needs to absorb
    every parent (one latent for a parent alone and one for each parent-with-child pair)."""
    levels = (len(toy.parents), len(toy.parents) + len(toy.children), toy.n_features)
    return tuple(sorted({w for w in levels if w > 0}))


def default_k(toy: ToyHierarchy) -> int:
    """The true mean number of active features, rounded down (at least 1).

    Absorption is what a sparsity budget below the true L0 buys: merging a parent into its child's latent saves
    one active latent on every parent-with-child input. With a spare budget a vanilla SAE has no reason to
    absorb and the toy would show nothing."""
    return max(1, math.floor(sum(toy.marginal_probs())))


N_TRAIN, N_EVAL = 2**16, 2**15
"""Rows `compare` samples to train on and to evaluate on."""


@dataclass(frozen=True)
class Preset:
    """A named toy and the training settings it is compared under."""

    make: Callable[..., ToyHierarchy]
    """Builds the toy from a seed."""
    train: dict
    """TrainConfig overrides for `compare` (on top of its toy-derived defaults)."""


PRESETS: dict[str, Preset] = {
    "nabeshima": Preset(nabeshima, {}),
    # Its true L0 is 0.4, below the smallest BatchTopK budget (k = 1 a row), so BatchTopK puts no pressure on
    # it; Chanin et al. trained their toy with ReLU + L1, which does. Eight latents rather than four because a
    # ReLU latent initialised pointing away from all four (non-negative) features never fires again, and AuxK
    # only revives latents with a positive pre-activation.
    "chanin": Preset(chanin, {"activation": "relu", "l1_coeff": 0.1, "widths": (1, 8)}),
    # One nested level per tree level: the roots, then roots and children, then everything.
    "deep": Preset(deep, {"widths": (2, 8, 24)}),
}


@contextmanager
def _single_thread():
    """The toy's matrices are a few dozen wide: threading them costs more in synchronisation than it saves,
    and on a busy machine each op waits for a descheduled worker (measured: 37 ms a step with 2 threads
    against 6 ms with 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def compare(
    toy: ToyHierarchy,
    widths: Sequence[int] | None = None,
    k: int | None = None,
    steps: int = 1500,
    batch_size: int = 512,
    seed: int = 0,
    lr: float = 1e-2,
    n_train: int = N_TRAIN,
    n_eval: int = N_EVAL,
    out_dir: Path | None = None,
    **train_overrides,
) -> ToyResult:
    """Train a Matryoshka SAE and its vanilla twin on the same batches of `toy` and evaluate both.

    Runs are written to `out_dir` (a temporary directory when None) and evaluated from the saved, scale-folded
    weights on a held-out sample. Extra keyword arguments go to TrainConfig."""
    widths = tuple(widths) if widths is not None else default_widths(toy)
    k = default_k(toy) if k is None else k
    g = torch.Generator().manual_seed(seed)
    train_acts, _ = toy.sample(n_train, g)
    eval_acts, eval_present = toy.sample(n_eval, g)
    settings = dict(
        arch="matryoshka",
        also_vanilla=True,
        widths=widths,
        k=k,
        steps=steps,
        batch_size=batch_size,
        # The LM default (2e-4 scaled by width) suits 16k latents trained on hundreds of millions of tokens;
        # a 20-latent toy has to converge in about a thousand steps.
        lr=lr,
        warmup_steps=min(50, steps // 10),
        # The default, 10M tokens, is more than the whole toy run: AuxK would never see a dead latent.
        dead_tokens=20 * batch_size,
        # AuxK's d_in / 2 is for LMs; here it would let every dead latent fire on every row.
        k_aux=k,
        # θ as every other run sets it (TrainConfig's defaults: the running estimate, then calibrated on the last
        # batches so that inference gives BatchTopK's L0). The toys were first measured with the running estimate
        # alone (EMA 0.999 from step steps/10); tests/test_toy.py gives the figures under both rules.
        checkpoint_every=steps,
        log_every=max(1, steps // 10),
        # Kernels a few dozen wide are faster on the CPU than their GPU launch.
        device="cpu",
        # The toys are the exact reference (known features, exact absorption): float32 throughout. Matmuls a few
        # dozen wide gain nothing from bf16, and its rounding would move the measured figures.
        precision="float32",
        seed=seed,
    )
    settings.update(train_overrides)
    cfg = TrainConfig(**settings)

    with _single_thread(), tempfile.TemporaryDirectory(prefix="msae-toy-") as tmp:
        root = Path(out_dir) if out_dir is not None else Path(tmp)
        started = time.perf_counter()
        run_dirs = Trainer(cfg, TensorBatches(train_acts), root, run_info=RunInfo(toy=toy_info(toy))).train()
        train_s = time.perf_counter() - started
        saes = {name: Run(d).load_sae(precision=cfg.precision) for name, d in run_dirs.items()}
        results = {name: evaluate(sae, toy, eval_acts, eval_present) for name, sae in saes.items()}
        recovery = toy_tree_recovery(toy, saes["matryoshka"], eval_acts) if len(widths) > 1 else None
        if out_dir is not None:
            # The held-out sample, for `msae analyze RUN --activations` on the kept runs.
            io.atomic_save_safetensors({"activations": eval_acts.contiguous()}, root / TOY_EVAL_ACTIVATIONS)
    return ToyResult(toy=toy_info(toy), train=cfg, train_seconds=round(train_s, 2),
                     out=None if out_dir is None else str(out_dir), vanilla=results["vanilla"],
                     matryoshka=results["matryoshka"], tree_recovery=recovery)


def toy_info(toy: ToyHierarchy) -> dict:
    """The toy's definition as plain JSON (without the directions, which its seed reproduces)."""
    return {
        "n_dims": toy.n_dims,
        "parent_of": list(toy.parent_of),
        "probs": list(toy.probs),
        "exclusive_children": toy.exclusive_children,
        "magnitude": toy.magnitude,
        "magnitude_std": toy.magnitude_std,
        "direction_noise": toy.direction_noise,
        "seed": toy.seed,
    }


TABLE_ROWS = (
    ("parent_absorption", "parent absorption (lower is better)"),
    ("parent_fires_alone", "parent latent fires, parent alone"),
    ("parent_cosine", "parent decoder cosine"),
    ("child_cosine", "child decoder cosine"),
    ("child_fire_rate", "child latent fires, child present"),
    ("mean_cosine", "mean decoder cosine, all features"),
    ("fvu", "fvu"),
    ("l0", "l0"),
    ("dead_latents", "dead latents"),
)


def format_table(result: ToyResult) -> str:
    """Rows: metrics; columns: vanilla, matryoshka."""
    names = ("vanilla", "matryoshka")
    label_w = max(len(label) for _, label in TABLE_ROWS)
    lines = [f"{'':<{label_w}}  " + "  ".join(f"{n:>10}" for n in names)]
    for key, label in TABLE_ROWS:
        cells = []
        for n in names:
            v = getattr(getattr(result, n), key)
            cells.append(f"{'-':>10}" if v is None else f"{v:>10d}" if isinstance(v, int) else f"{v:>10.3f}")
        lines.append(f"{label:<{label_w}}  " + "  ".join(cells))
    return "\n".join(lines)


def add_args(parser: argparse.ArgumentParser) -> None:
    add_config_args(parser, ToyConfig)
    parser.add_argument("--json", action="store_true", help="print the full result as JSON instead of a table")
    parser.add_argument("--out", default=None, help="keep the trained runs in this directory (default: a temporary one)")


def memory_needed(n_dims: int, widths: Sequence[int], batch_size: int, n_rows: int = N_TRAIN + N_EVAL) -> int:
    """Bytes a comparison holds at its peak, roughly: both SAEs' weights with their gradients and Adam's two
    moments (float32), a step's (batch, width) pre-activations, activations and gradients for each, and the
    sampled rows."""
    d_sae = max(widths)
    per_sae = 4 * 4 * (2 * n_dims * d_sae + d_sae + n_dims) + 4 * 4 * batch_size * d_sae
    return 2 * per_sae + 4 * n_rows * n_dims


def available_memory() -> int | None:
    """Bytes the system can hand out now (Linux's MemAvailable), or None where it does not say."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def run_preset(cfg: ToyConfig, out_dir: Path | None = None) -> ToyResult:
    """The comparison `msae toy` makes: the preset's toy and settings, with `cfg`'s widths and k where given.
    Sizes whose memory the machine does not have are refused before anything is allocated; a kept `out_dir` is
    held under its lock and must hold no run yet."""
    preset = PRESETS[cfg.preset]
    given = {"widths": cfg.widths, "k": cfg.k}
    settings = {**preset.train, **{key: v for key, v in given.items() if v is not None}}
    toy = preset.make(seed=cfg.seed)
    widths = settings.get("widths") or default_widths(toy)
    if settings.get("k") is not None and settings["k"] > max(widths):  # as msae train refuses it
        raise ValueError(f"k must be between 1 and the largest width {max(widths)}, got {settings['k']}")
    needed, free = memory_needed(toy.n_dims, widths, cfg.batch_size), available_memory()
    if free is not None and needed > free:
        raise ValueError(f"widths up to {max(widths):,} with batch_size {cfg.batch_size:,} need about "
                         f"{needed / 2**30:.1f} GiB, and {free / 2**30:.1f} GiB is free: pick smaller sizes")
    with locked(out_dir) if out_dir is not None else contextlib.nullcontext():
        if out_dir is not None:
            refuse_other_runs(out_dir)
        result = compare(toy, steps=cfg.steps, batch_size=cfg.batch_size, seed=cfg.seed, lr=cfg.lr,
                         out_dir=out_dir, **settings)
    result.preset = cfg.preset
    return result


def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(ToyConfig, args)
    result = run_preset(cfg, None if args.out is None else Path(args.out))
    if args.json:
        print(result.dumps(), end="")
        return 0
    train = result.train
    sparsity = f"k {train.k}" if train.activation != "relu" else f"relu, l1 {train.l1_coeff}"
    print(f"toy {cfg.preset}, seed {cfg.seed}: {train.steps} steps of {train.batch_size}, {sparsity}, "
          f"matryoshka widths {','.join(map(str, train.widths))} ({result.train_seconds:.1f} s to train)")
    print(format_table(result))
    for r in result.tree_recovery or []:
        print(f"tree recovery, {r.criterion} links: F1 {_fmt(r.f1)} (precision {_fmt(r.precision)}, recall "
              f"{_fmt(r.recall)}; best this SAE allows {_fmt(r.best_f1)}, {r.matched_features} of "
              f"{len(result.toy['parent_of'])} features matched)")
    return 0


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
