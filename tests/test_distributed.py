"""Several ranks under torchrun (gloo, 2 processes on loopback): the same weights as one process, BatchTopK over
the ranks, a killed rank and --resume, and sharded extraction into the cache one process writes.

The file is also torchrun's worker for the selection check (`python tests/test_distributed.py select`)."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from msae import sparse
from msae.activations import extract, iter_shards, read_manifest
from msae.cli import main as cli_main
from msae.config import ExtractConfig, TrainConfig, to_flags
from msae.distributed import World, launch, select_batchtopk
from msae.train import TensorBatches, Trainer, TrainingError

ROOT = Path(__file__).resolve().parents[1]


def small_cfg(**kw) -> TrainConfig:
    """Widths, k and dead_tokens such that latents die within a few steps: AuxK is part of every comparison."""
    base = dict(widths=(16, 64, 256), k=2, batch_size=128, lr=3e-3, seed=3, dtype="float64", also_vanilla=True,
                dead_tokens=256, device="cpu")
    return TrainConfig(**{**base, **kw})


def toy_acts(n=2048, d_in=16, seed=0) -> torch.Tensor:
    """Sparse combinations of 48 directions, an offset and a little noise (no two rows equal: no ties)."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(48, d_in, generator=g, dtype=torch.float64)
    coef = torch.rand(n, 48, generator=g, dtype=torch.float64) * (torch.rand(n, 48, generator=g, dtype=torch.float64) < 0.08)
    return coef @ dirs + 3.0 + 0.01 * torch.randn(n, d_in, generator=g, dtype=torch.float64)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str) -> list[str]:
    """The command that runs `args` on 2 local ranks, rendezvous on a free loopback port."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", *args]


def run_env(**extra: str) -> dict:
    return {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **extra}


def run2(*args: str, timeout: float = 120, **extra: str) -> subprocess.CompletedProcess:
    done = subprocess.run(torchrun(*args), env=run_env(**extra), cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def checkpoint(out: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(out / "checkpoint" / "state.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def assert_same_state(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].double(), b[key].double(), atol=atol, rtol=0), \
            f"{key}: {(a[key].double() - b[key].double()).abs().max().item()}"


@pytest.fixture(scope="module")
def acts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("acts") / "acts.safetensors"
    save_file({"activations": toy_acts()}, str(path))
    return path


def tensor_source(path: Path) -> TensorBatches:
    with safe_open(str(path), "pt") as f:
        return TensorBatches(f.get_tensor("activations"))


@pytest.mark.parametrize("activation, batch", [("batchtopk", 127), ("topk", 127)])
def test_two_ranks_give_the_weights_of_one_process(acts_file, tmp_path, activation, batch):
    """Float64, Matryoshka and vanilla, AuxK on: model, Adam state and dead counters equal to 1e-6 after 30 steps.
    127 rows split 63 / 64: the ranks' unequal shares are weighted exactly."""
    cfg = small_cfg(activation=activation, batch_size=batch, steps=30, checkpoint_every=10)
    Trainer(cfg, tensor_source(acts_file), tmp_path / "one").train()
    run2("-m", "msae.cli", "train", "--activations", str(acts_file), *to_flags(cfg), "--out", str(tmp_path / "two"))

    assert_same_state(checkpoint(tmp_path / "one"), checkpoint(tmp_path / "two"), atol=1e-6)
    one = [json.loads(line) for line in (tmp_path / "one" / "matryoshka" / "metrics.jsonl").read_text().splitlines()]
    two = [json.loads(line) for line in (tmp_path / "two" / "matryoshka" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in one] == [m["step"] for m in two]
    assert max(m["aux_loss"] for m in one) > 0 and max(m["dead_fraction"] for m in one) > 0, "AuxK was exercised"
    for a, b in zip(one, two):
        for key in ("loss", "l0", "aux_loss", "dead_fraction"):
            assert a[key] == pytest.approx(b[key], abs=1e-9), key
        assert a["fvu"] == pytest.approx(b["fvu"], abs=1e-9)
    for name in ("matryoshka", "vanilla"):
        saved = [load_file(str(tmp_path / run / name / "sae_weights.safetensors")) for run in ("one", "two")]
        for key in saved[0]:  # θ included: calibrated on the same held-in rows, gathered across the ranks
            torch.testing.assert_close(saved[0][key], saved[1][key], atol=1e-6, rtol=0)
        assert json.loads((tmp_path / "one" / name / "cfg.json").read_text())["msae"]["world_size"] == 1
        assert json.loads((tmp_path / "two" / name / "cfg.json").read_text())["msae"]["world_size"] == 2


def check_selection() -> None:
    """torchrun worker: BatchTopK over 2 ranks against one process on the whole batch, in the cases that take each
    path: like ranks, ranks so unlike that one needs its second pass, fewer positive values than k·B, and ties."""
    with launch("cpu") as world:
        g = torch.Generator().manual_seed(1)
        d_in, d_sae, n, k = 8, 64, 16, 3
        W_enc = torch.randn(d_in, d_sae, generator=g, dtype=torch.float64)
        cases = {
            "like": (torch.randn(2 * n, d_in, generator=g, dtype=torch.float64), torch.zeros(d_sae, dtype=torch.float64)),
            "unlike": (torch.randn(2 * n, d_in, generator=g, dtype=torch.float64) * torch.tensor([[4.0]] * n + [[0.5]] * n,
                       dtype=torch.float64), torch.zeros(d_sae, dtype=torch.float64)),
            "few positive": (torch.randn(2 * n, d_in, generator=g, dtype=torch.float64),
                             torch.full((d_sae,), -6.0, dtype=torch.float64)),
        }
        for name, (x, b_enc) in cases.items():
            W1 = sparse.fold_weights(W_enc, b_enc)
            mine = select_batchtopk(sparse.fold_rows(x[world.part(2 * n)], None), W1, k, world)
            rows = world.gather(torch.nn.functional.pad(mine.rows + world.part(2 * n).start, (0, 2 * n * k - mine.rows.numel()), value=-1))
            cols = world.gather(torch.nn.functional.pad(mine.cols, (0, 2 * n * k - mine.cols.numel()), value=-1))
            got = {(r, c) for r, c in zip(rows.flatten().tolist(), cols.flatten().tolist()) if r >= 0}
            ref = sparse.select_batchtopk(sparse.fold_rows(x, None), W1, k)
            assert got == set(zip(ref.rows.tolist(), ref.cols.tolist())), name
        # Ties: both ranks hold the same rows, whose pre-activations are 3, 2, 2, 1 (k·B = 8 of 16 values: the four 3s
        # and four of the eight 2s); the ties go to rank 0, in row order.
        x = torch.tensor([[3.0, 2.0, 2.0, 1.0]] * 2, dtype=torch.float64)
        W1 = sparse.fold_weights(torch.eye(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64))
        mine = select_batchtopk(sparse.fold_rows(x, None), W1, 2, world)
        assert sorted(mine.vals.tolist()) == ([2.0] * 4 + [3.0] * 2 if world.rank == 0 else [3.0] * 2), mine
        print(f"rank {world.rank}: selection ok", flush=True)


def test_batchtopk_over_ranks_selects_what_one_process_selects():
    done = run2(str(Path(__file__)), "select", timeout=60)
    assert "rank 0: selection ok" in done.stdout and "rank 1: selection ok" in done.stdout


def test_killed_rank_stops_the_job_and_resume_ends_as_an_uninterrupted_run(acts_file, tmp_path, capsys):
    cfg = small_cfg(steps=80, checkpoint_every=10, log_every=10)
    flags = ["--activations", str(acts_file), *to_flags(cfg)]
    run2("-m", "msae.cli", "train", *flags, "--out", str(tmp_path / "straight"))

    out = tmp_path / "killed"
    marker = tmp_path / "paused"
    # Rank 1 stops after step 12 (msae.faults) and is killed there; rank 0 waits for it in the next collective.
    job = subprocess.Popen(torchrun("-m", "msae.cli", "train", *flags, "--out", str(out)),
                           env=run_env(MSAE_PAUSE_AT="train step 12 rank 1", MSAE_PAUSE_MARKER=str(marker)), cwd=ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 90
    while not marker.exists():
        assert job.poll() is None and time.monotonic() < deadline, "the run ended before rank 1 reached step 12"
        time.sleep(0.02)
    os.kill(int(marker.read_text()), signal.SIGKILL)
    log, _ = job.communicate(timeout=60)
    assert job.returncode != 0
    assert "lost contact with the other ranks" in log or "the launcher stopped this rank" in log, log[-3000:]
    assert "run the same command with --resume" in log

    step = json.loads(safe_open(str(out / "checkpoint" / "state.safetensors"), "pt").metadata()["msae"])["step"]
    assert 10 <= step < 80
    one_process = tmp_path / "one_process"
    shutil.copytree(out, one_process)
    run2("-m", "msae.cli", "train", *flags, "--out", str(out), "--resume")
    assert_same_state(checkpoint(tmp_path / "straight"), checkpoint(out), atol=0.0)

    # Another world size continues the same run: the same batches and selection, float sums in another order.
    assert cli_main(["train", *flags, "--out", str(one_process), "--resume"]) == 0
    assert "the checkpoint was written by 2 process(es), this job has 1" in capsys.readouterr().err
    assert_same_state(checkpoint(tmp_path / "straight"), checkpoint(one_process), atol=1e-6)


def test_too_small_a_batch_for_the_ranks_is_refused():
    with pytest.raises(TrainingError, match="batch_size 7 leaves fewer than 2 rows to each of 4 ranks"):
        Trainer(TrainConfig(widths=(8,), k=1, batch_size=7, device="cpu"), TensorBatches(toy_acts(64)), "unused",
                world=World(rank=1, size=4))


def shard_rows(cache: Path) -> dict[tuple[int, int], tuple[int, torch.Tensor]]:
    """Every cached row keyed by (context, position): (token id, activation)."""
    rows = {}
    for _i, _shard, t in iter_shards(cache, ["activations", "token_ids", "context", "position"]):
        acts = t["activations"].float()
        for i, key in enumerate(zip(t["context"].tolist(), t["position"].tolist())):
            rows[key] = (int(t["token_ids"][i]), acts[i])
    return rows


def test_sharded_extraction_writes_the_cache_of_one_process(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join([
        "Glaciers grind the rock beneath them into fine flour that turns meltwater rivers a milky blue.",
        "The printing press let a single workshop produce more books in a year than scribes made in a lifetime.",
        "Bees tell their sisters where flowers are by dancing a figure of eight on the comb.",
    ] * 5) + "\n")
    flags = dict(corpus=str(corpus), tokens=170, ctx_len=16, lm_batch=3, shard_rows=70, layer=4, device="cpu")
    one = extract(ExtractConfig(**flags), root=tmp_path / "one")
    run2("-m", "msae.cli", "extract", *[a for k, v in flags.items() for a in (f"--{k.replace('_', '-')}", str(v))],
         timeout=180, MSAE_ACTIVATION_CACHE=str(tmp_path / "two"))
    two = tmp_path / "two" / one.name
    m1, m2 = read_manifest(one), read_manifest(two)
    assert m1.rows >= 170 and not m1.exhausted and m1.contexts_done // 3 % 2 == 1, \
        "the extraction stops on --tokens after an odd number of batches: inside a round of two"
    for key in ("rows", "contexts_done", "dropped", "median_norm", "exhausted", "shards"):
        assert getattr(m1, key) == getattr(m2, key), key
    rows1, rows2 = shard_rows(one), shard_rows(two)
    assert rows1.keys() == rows2.keys()
    for key, (token, act) in rows1.items():
        assert rows2[key][0] == token
        torch.testing.assert_close(rows2[key][1], act, atol=1e-2, rtol=1e-3)


if __name__ == "__main__" and sys.argv[1:] == ["select"]:
    check_selection()
