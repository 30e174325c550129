"""An SAE SAELens trained, analysed with no flag beyond its folder: the dataset SAELens recorded in cfg.json (a
folder of jsonl files here, as a SAELens user trains from) is found and read, the text and the time the extraction
will take are said before it starts, and corpus folders work wherever a corpus file does."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from msae import corpus as corpus_mod
from msae.activations import corpus_sha256, read_manifest
from msae.analysis.analyze import analyze, corpus_choice, extract_config
from msae.analysis.store import load_store
from msae.config import AnalyzeConfig
from msae.corpus import CorpusError
from msae.lm import BUILTIN
from msae.run import Run

SHIPPED = Path(__file__).resolve().parents[1] / "assets" / "default" / "vanilla"
INTEROP_PYTHON = Path.home() / ".cache" / "msae" / "interop-venv" / "bin" / "python"

PARAGRAPHS = [
    "The river bends around the old mill, where the miller kept sacks of grain stacked against the wall.",
    "A compiler reads source code, builds a syntax tree and emits instructions the processor can execute.",
    "Bees carry pollen between flowers; without them many fruit trees would bear almost nothing each summer.",
    "The treaty was signed in the spring, and the two kingdoms kept the peace for nearly forty years after.",
]


def jsonl_folder(root: Path) -> Path:
    """A dataset folder as a SAELens user trains from: jsonl shards of {"text": ...}, one in a sub-folder."""
    data = root / "my-dataset"
    (data / "more").mkdir(parents=True)
    for i, name in enumerate(["train-00000.jsonl", "train-00001.jsonl", "more/train-00002.jsonl"]):
        lines = [json.dumps({"text": f"{p} (part {i}, line {j})"}) for j, p in enumerate(PARAGRAPHS * 3)]
        (data / name).write_text("\n".join(lines) + "\n")
    (data / "README.md").write_text("not text the corpus reads")
    (data / ".cache").mkdir()
    (data / ".cache" / "hidden.jsonl").write_text(json.dumps({"text": "hidden"}) + "\n")
    return data


def saelens_run(root: Path, dataset_path: str, context_size: int = 64) -> Path:
    """An SAE folder as SAELens 6's runner writes it: the shipped vanilla SAE's weights and a cfg.json with
    SAELens's fields only, the model, hook, dataset and context size under metadata (no msae fields)."""
    run = root / "checkpoints" / "abc123" / "final_2000"
    run.mkdir(parents=True)
    shutil.copy(SHIPPED / "sae_weights.safetensors", run)
    cfg = json.loads((SHIPPED / "cfg.json").read_text())
    cfg.pop("msae")
    cfg["metadata"].pop("msae_model")
    cfg["metadata"].update(model_name=BUILTIN["smollm2-135m"].hub_id, dataset_path=dataset_path,
                           context_size=context_size, seqpos_slice=[None], exclude_special_tokens=True,
                           sequence_separator_token="bos", disable_concat_sequences=False)
    (run / "cfg.json").write_text(json.dumps(cfg, indent=2))
    return run


def test_a_folders_documents_are_its_text_files_in_sorted_order(tmp_path):
    data = jsonl_folder(tmp_path)
    docs = list(corpus_mod.documents(str(data)))
    assert len(docs) == 3 * len(PARAGRAPHS) * 3
    assert [d.source for d in docs[:2]] == ["more/train-00002.jsonl:1", "more/train-00002.jsonl:2"]
    assert docs[-1].source == f"train-00001.jsonl:{len(PARAGRAPHS) * 3}"
    assert not any("hidden" in d.text for d in docs)

    before = corpus_sha256(data)
    moved = tmp_path / "elsewhere"
    shutil.move(data, moved)
    assert corpus_sha256(moved) == before, "a moved folder keeps its hash (and its cache)"
    (moved / "train-00001.jsonl").write_text(json.dumps({"text": "edited"}) + "\n")
    assert corpus_sha256(moved) != before

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.md").write_text("markdown is not read")
    with pytest.raises(CorpusError, match="a folder without text files"):
        list(corpus_mod.documents(str(empty)))


@pytest.mark.skipif(not INTEROP_PYTHON.exists(), reason="the interop side venv (with datasets) is not installed")
def test_a_saved_datasets_folder_is_named_when_the_package_is_missing(tmp_path):
    saved = tmp_path / "saved"
    subprocess.run([str(INTEROP_PYTHON), "-c", "import datasets, sys; datasets.Dataset.from_dict("
                    "{'text': ['one document', 'another one']}).save_to_disk(sys.argv[1])", str(saved)], check=True,
                   capture_output=True)
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(CorpusError, match=r"saved by the `datasets` package; reading it needs that package"):
            next(corpus_mod.documents(str(saved)))
    else:
        assert [d.text for d in corpus_mod.documents(str(saved))] == ["one document", "another one"]


def test_the_recorded_dataset_is_used_where_it_is_and_said_where_it_is_not(tmp_path):
    data = jsonl_folder(tmp_path)
    here = Run(saelens_run(tmp_path / "a", str(data)))
    assert corpus_choice(here, AnalyzeConfig()) == (str(data), f"{data}, the dataset SAELens recorded in cfg.json")
    ecfg = extract_config(here, AnalyzeConfig())
    assert (ecfg.model, ecfg.layer, ecfg.corpus, ecfg.ctx_len) == (BUILTIN["smollm2-135m"].hub_id, 15, str(data), 64)

    # Relative to the folder SAELens ran in, three above the SAE's own.
    relative = Run(saelens_run(tmp_path / "b", "../../../../my-dataset"))
    assert Path(corpus_choice(relative, AnalyzeConfig())[0]).resolve() == data.resolve()

    hub = Run(saelens_run(tmp_path / "c", "NeelNanda/pile-10k"))
    corpus, why = corpus_choice(hub, AnalyzeConfig())
    assert corpus == "builtin" and "(NeelNanda/pile-10k) is not on this machine" in why
    assert corpus_choice(hub, AnalyzeConfig(corpus=str(data)))[0] == str(data)


def test_analyze_reads_the_dataset_saelens_recorded_and_says_so_first(tmp_path, monkeypatch):
    """No flag beyond the folder: the store is built from the recorded jsonl folder (the cache's corpus is that
    folder's content, its contexts SAELens's size), and before extracting the text, its token count and an
    estimate of the time are said."""
    monkeypatch.setenv("MSAE_ACTIVATION_CACHE", str(tmp_path / "cache"))
    data = jsonl_folder(tmp_path)
    run = saelens_run(tmp_path, str(data), context_size=64)
    said = []
    manifest = analyze(run, acfg=AnalyzeConfig(absorption=False, precision="float32"), say=said.append)
    assert len(said) == 1
    assert said[0].startswith(f"text: {data}, the dataset SAELens recorded in cfg.json\nextracting activations: ")
    assert "tokens (all of it)" in said[0] and "tokens/s (measured here on one batch of" in said[0]
    cache = read_manifest(Path(tmp_path / "cache" / manifest.cache_id))
    assert cache.key["corpus"] == f"file:{corpus_sha256(data)}" and cache.key["ctx_len"] == 64
    assert cache.exhausted and manifest.rows == cache.rows
    counted = int(said[0].split("extracting activations: ")[1].split(" tokens")[0].replace(",", ""))
    # Special tokens and outlier rows are dropped as extracted, which the count before cannot foresee.
    assert cache.rows <= counted <= cache.rows + sum(cache.dropped.values())
    assert load_store(run).manifest.rows == manifest.rows

    said.clear()
    analyze(run, acfg=AnalyzeConfig(absorption=False, precision="float32"), say=said.append, overwrite=True)
    assert said == [f"text: {data}, the dataset SAELens recorded in cfg.json; its activations are cached "
                    f"({tmp_path / 'cache' / manifest.cache_id})"]
