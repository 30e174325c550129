"""The one config mechanism (msae.config): configs refuse bad settings with one line naming the setting, flags are
made from the configs and rebuild them, and a refused `msae train` writes nothing."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import pytest

from msae.cli import main as cli_main
from msae.config import (TRAIN_SKIP, AnalyzeConfig, ConfigError, Config, ExtractConfig, TrainConfig, TrainJob,
                         add_config_args, config_from_args, to_flags, widths_from_text)


def test_config_validation_names_the_setting():
    for kwargs, message in [
        ({"widths": (512, 128)}, "widths must be positive and strictly increasing, got 512,128"),
        ({"widths": (64, 256), "k": 300}, "k must be between 1 and the largest width 256, got 300"),
        ({"checkpoint_every": 0}, "checkpoint_every must be positive, got 0"),
        ({"log_every": 0}, "log_every must be positive"),
        ({"decay_fraction": 5}, "decay_fraction must be between 0 and 1"),
        ({"warmup_steps": -10}, "warmup_steps must be at least 0"),
        ({"device": "banana"}, "device must be auto, cpu, cuda or cuda:N"),
        ({"dtype": "int8"}, "dtype must be one of float32, float64"),
        ({"arch": "tree"}, "arch must be one of matryoshka, vanilla"),
        ({"level_weights": (1.0,), "widths": (8, 16), "k": 4}, "level_weights has 1 entries for 2 widths"),
    ]:
        with pytest.raises(ConfigError, match=message):
            TrainConfig(**kwargs)
    with pytest.raises(ConfigError, match="cache_dtype must be one of float16, bfloat16, float32, got 'int8'"):
        ExtractConfig(cache_dtype="int8")
    with pytest.raises(ConfigError, match="ctx_len must be at least 2"):
        ExtractConfig(ctx_len=1)
    with pytest.raises(ConfigError, match="outlier_factor must be above 1"):
        ExtractConfig(outlier_factor=0)
    with pytest.raises(ConfigError, match="hist_bins must be positive"):
        AnalyzeConfig(store=AnalyzeConfig().store.__class__(hist_bins=0))


def test_flags_rebuild_the_config_they_came_from():
    job = TrainJob(train=TrainConfig(widths=(64, 256), k=8, also_vanilla=True, lr=1e-3, level_weights=(0.5, 0.5),
                                     device="cpu"),
                   extract=ExtractConfig(corpus="notes.txt", tokens=5000, cache_dtype="float32"), eval_contexts=4)
    parser = argparse.ArgumentParser()
    add_config_args(parser, TrainJob, skip=TRAIN_SKIP)
    flags = to_flags(job, skip=TRAIN_SKIP)
    assert "--also-vanilla" in flags and flags[flags.index("--widths") + 1] == "64,256"
    again = config_from_args(TrainJob, parser.parse_args(flags), skip=TRAIN_SKIP)
    assert again == job and again.extract.device == "cpu", "one --device for the LM and the SAEs"
    with pytest.raises(SystemExit):
        parser.parse_args(["--cache-dtype", "int8"])  # a Literal field offers only its choices


@dataclass
class Leaf(Config):
    k: int = 1
    """k."""


@dataclass
class Clash(Config):
    leaf: Leaf
    """Nested."""
    k: int = 2
    """Another k."""


def test_nested_configs_may_not_share_a_flag():
    with pytest.raises(TypeError, match="Clash: k and leaf.k would both be --k"):
        add_config_args(argparse.ArgumentParser(), Clash)


@pytest.mark.parametrize("flags, message", [
    (["--checkpoint-every", "0"], "checkpoint_every must be positive"),
    (["--cache-dtype", "int8"], None),
    (["--ctx-len", "0"], "ctx_len must be at least 2"),
    (["--device", "banana"], "device must be auto, cpu, cuda or cuda:N"),
    (["--decay-fraction", "5"], "decay_fraction must be between 0 and 1"),
])
def test_bad_train_flags_stop_with_one_line_and_exit_2(flags, message, tmp_path, capsys):
    argv = ["train", "--activations", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "run"), *flags]
    try:
        code = cli_main(argv)
    except SystemExit as exc:  # argparse refuses a choice outside a Literal
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2
    if message:
        assert err.strip().count("\n") == 0 and message in err
    else:
        assert "invalid choice: 'int8'" in err
    assert not (tmp_path / "run").exists(), "nothing is written for a refused command"


def test_widths_as_typed_are_read_and_a_word_among_them_is_named():
    assert widths_from_text(" 128, 512,2048,") == (128, 512, 2048)
    with pytest.raises(ConfigError, match="widths must be whole numbers separated by commas, got 'abc'"):
        widths_from_text("128,abc")


def test_a_store_written_before_a_field_was_renamed_still_reads():
    """HierarchySummary.per_level became per_group (the nested dictionaries are groups); the shipped stores and
    any store written before say per_level, and read the same; a store written now says per_group."""
    from msae.results import HierarchySummary

    old = {"links": 3, "per_level": [{"group": 1, "width": 64, "live_latents": 10, "links": 3,
                                      "children_with_a_parent": 2, "share_with_a_parent": 0.2}],
           "parents_with_children": 1, "parents_with_2plus_children": 1, "mean_children_per_parent": 2.0,
           "mean_coverage": 0.5}
    summary = HierarchySummary.from_json(old)
    assert summary.per_group[0].children_with_a_parent == 2
    again = summary.to_json()
    assert "per_group" in again and "per_level" not in again
    assert HierarchySummary.from_json(again) == summary
