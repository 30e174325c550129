"""The home page, driven headlessly: it lists the runs it finds and plots the chosen one's training."""

import json
from pathlib import Path

import torch
from streamlit.testing.v1 import AppTest

from msae.config import TrainConfig
from msae.train import TensorBatches, Trainer

APP = str(Path(__file__).resolve().parents[1] / "app.py")


def test_home_lists_runs_and_plots_fvu_per_width(tmp_path, monkeypatch):
    acts = torch.randn(1024, 8) @ torch.randn(8, 8)
    cfg = TrainConfig(widths=(4, 16), k=2, steps=10, batch_size=128, log_every=2, also_vanilla=True)
    Trainer(cfg, TensorBatches(acts), tmp_path / "pair").train()
    monkeypatch.setenv("MSAE_RUNS", str(tmp_path))

    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception
    table = at.dataframe[0].value
    ours = table[table["run"].str.startswith(str(tmp_path))]
    assert sorted(Path(r).name for r in ours["run"]) == ["matryoshka", "vanilla"]

    at.selectbox[0].select(str(tmp_path / "pair" / "matryoshka")).run()
    fig = json.loads(at.get("plotly_chart")[0].proto.spec)
    assert [trace["name"] for trace in fig["data"]] == ["width 4", "width 16"]
    logged = [json.loads(line) for line in (tmp_path / "pair" / "matryoshka" / "metrics.jsonl").read_text().splitlines()]
    assert fig["data"][1]["y"] == [m["fvu"][1] for m in logged]
