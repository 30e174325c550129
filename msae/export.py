"""`msae export`: write a run in the layout another tool loads, SAELens 6's, dictionary_learning's or sparsify's.

Runs saved from now on are already in SAELens 6's inference layout; this rewrites older runs (in place when the
output directory is the run itself: only sae_weights.safetensors and cfg.json are replaced, atomically) and runs
or SAEs from elsewhere that msae reads. Any other output directory must hold no SAE yet, unless --overwrite. The
decoder rows are written unit norm with their norms folded into the encoder (msae.io.save_sae), so reconstructions
are unchanged and an older run's latents come back rescaled: in place, a run holding a feature store is refused
then, since its store would be on the old scale.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from msae import io
from msae.faults import pause_at
from msae.run import STORE_DIR, RunError, locked, refuse_other_runs

TARGETS = ("saelens", "dictionary_learning", "sparsify")
FILES = {
    "saelens": f"{io.WEIGHTS_FILE} + {io.CFG_FILE}",
    "dictionary_learning": f"{io.DL_WEIGHTS_FILE} + {io.DL_CFG_FILE}",
    "sparsify": f"{io.SPARSIFY_WEIGHTS_FILE} + {io.CFG_FILE}",
}


def _own_fields(cfg: dict) -> dict:
    """The fields of a loaded cfg that are ours to carry over: "msae..." keys. SAELens's own (and an older
    version's, such as a top-level sae_lens_version that would send SAELens down its pre-6.0 path) are written
    afresh by save_sae."""
    return {key: value for key, value in cfg.items() if key.startswith("msae")}


def _refuse_rescaling_a_store(sae, run_dir: Path) -> None:
    """A run saved before decoder rows were unit comes back with its latents rescaled; the feature store beside it
    would then hold activations on the old scale."""
    eps = torch.finfo(sae.W_dec.dtype).eps
    if bool((io.decoder_fold_factors(sae.W_dec.detach(), sae.activation, eps) != 1).any()):
        raise RunError(
            f"{run_dir}: its decoder rows are not unit norm, so the rewritten run's latents would be on another scale "
            f"than its feature store ({STORE_DIR}/) holds; export into a new directory and run msae analyze there"
        )


def export_run(run: Path | str, target: str, out_dir: Path | str, overwrite: bool = False) -> Path:
    """Write the SAE at `run` (anything msae.io.load_sae reads) to `out_dir` for `target`; returns `out_dir`.

    `out_dir` is held under its lock. Unless it is the run itself, it must hold no SAE yet (RunError), or
    `overwrite` says to replace what is there; sparsify's cfg.json would replace the run's own, so never the run
    itself. Raises ValueError when the target would compute something else (a BatchTopK θ never learned, a rule
    sparsify does not have)."""
    if target not in TARGETS:
        raise ValueError(f"export target must be one of {', '.join(TARGETS)}, got {target!r}")
    run, out_dir = Path(run), Path(out_dir)
    run_dir = run if run.is_dir() else run.parent
    in_place = out_dir.resolve() == run_dir.resolve()
    if in_place and target == "sparsify":
        raise RunError(f"{out_dir}: sparsify's {io.CFG_FILE} would replace the run's own; export into another directory")
    with locked(out_dir):
        if not (overwrite or in_place):
            refuse_other_runs(out_dir, "--overwrite")
        sae, cfg = io.load_sae(run)
        reason = io.unexportable_reason(sae) or (io.sparsify_refusal(sae) if target == "sparsify" else None)
        if reason is not None:
            raise ValueError(f"{run}: cannot export to {target}: {reason}")
        if in_place and target == "saelens" and (run_dir / STORE_DIR).is_dir():
            _refuse_rescaling_a_store(sae, run_dir)
        ours = _own_fields(cfg)
        pause_at("export locked")
        if target == "saelens":
            return io.save_sae(sae, out_dir, cfg=ours)
        if target == "sparsify":
            return io.save_sparsify(sae, out_dir, ours.get("msae"))
        return io.save_dictionary_learning(sae, out_dir, ours.get("msae"))


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run directory (or an SAE from SAELens / dictionary_learning / sparsify that msae reads)")
    parser.add_argument("--to", required=True, choices=TARGETS, help="the layout to write")
    parser.add_argument("out", help="output directory; the run directory itself rewrites the run in place")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the SAE files in an output directory that already holds an SAE")


def main(args: argparse.Namespace) -> int:
    out = export_run(args.run, args.to, args.out, overwrite=args.overwrite)
    print(f"wrote {out}: {FILES[args.to]} ({args.to})")
    return 0
