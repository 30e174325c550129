"""The real built-in model on small slices: hooks, early exit, the activation cache, corpora, end to end."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from msae import corpus as corpus_mod
from msae import lm as lm_mod
from msae.activations import (MANIFEST, OLD_MANIFEST, SHARD_TENSORS, CachedActivations, cache_root, extract,
                              has_manifest, heldout_contexts, iter_shards, read_manifest, read_shard)
from msae.analysis.analyze import find_cache
from msae.config import ExtractConfig
from msae.cli import main as cli_main
from msae.corpus import CorpusError, file_documents, strip_wiki_markup
from msae.evaluate import HELDOUT_CONTEXTS_FILE, evaluate_run, spread_rows
from msae.io import load_sae, save_sae, sha256_file
from msae.lm import BUILTIN, builtin_model_dir, decoder_layers, load_lm, residual_after
from msae.run import Run


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "notes.txt"
    paragraphs = [
        "The cat sat on the mat and looked at the rain falling over the quiet village street.",
        "Rivers carry water from the mountains to the sea, shaping valleys over millions of years.",
        "A compiler translates source code into machine instructions that a processor can execute.",
    ]
    path.write_text("\n\n".join(paragraphs * 6) + "\n")
    return path


def test_hook_equals_the_full_models_hidden_state(lm):
    ids = lm.tokenizer(["The capital of France is Paris.", "Sparse autoencoders find features."], padding=True, return_tensors="pt")
    layer = 15
    hooked = residual_after(lm, ids["input_ids"], ids["attention_mask"], layer)
    full = lm.model(**ids, output_hidden_states=True).hidden_states[layer + 1]
    assert hooked.shape == (2, ids["input_ids"].shape[1], lm.d_model)
    torch.testing.assert_close(hooked, full)


def test_forward_stops_after_the_hooked_block(lm):
    ran = []
    handle = decoder_layers(lm.model)[16].register_forward_hook(lambda *a: ran.append(True))
    try:
        ids = lm.tokenizer("early exit", return_tensors="pt")
        residual_after(lm, ids["input_ids"], ids["attention_mask"], 15)
    finally:
        handle.remove()
    assert ran == []


HUB_ID = BUILTIN["smollm2-135m"].hub_id


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No hub and an empty Hugging Face cache: what a machine that never downloaded the model has."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-hub"))


def test_the_builtins_hub_id_loads_offline_as_the_builtin(lm, offline):
    by_id = load_lm(HUB_ID, device="cpu", precision="float32")
    assert by_id.name == HUB_ID and by_id.identity == lm.identity
    ids = lm.tokenizer(["Sparse autoencoders find features."], return_tensors="pt")
    torch.testing.assert_close(residual_after(by_id, ids["input_ids"], ids["attention_mask"], 15),
                               residual_after(lm, ids["input_ids"], ids["attention_mask"], 15), rtol=0, atol=0)


def test_every_name_of_the_builtin_extracts_into_one_cache(lm, offline, text_file, tmp_path, monkeypatch):
    """The built-in name, its hub id and its converted folder are one model: one cache, extracted once (each name
    loads the model itself, as `msae extract --model NAME` does). A run that records any of them finds it, and so
    does a run recording a cache written before caches were keyed by what the model is (its key held the name)."""
    names = ["smollm2-135m", HUB_ID, str(builtin_model_dir("smollm2-135m"))]
    caches = []
    for name in names:
        cfg = ExtractConfig(model=name, corpus=str(text_file), tokens=100, ctx_len=32, lm_batch=2, layer=15,
                            device="cpu", precision="float32")
        caches.append(extract(cfg, root=tmp_path / "caches"))
        if len(caches) == 1:
            written = {p.name: p.stat().st_mtime_ns for p in caches[0].iterdir()}
    assert caches == [caches[0]] * 3
    assert {p.name: p.stat().st_mtime_ns for p in caches[0].iterdir()} == written, "extracted again"
    manifest = read_manifest(caches[0])
    assert manifest.key["model"] == lm.identity and manifest.model_name == "smollm2-135m"

    monkeypatch.setenv("MSAE_ACTIVATION_CACHE", str(tmp_path / "caches"))
    old = tmp_path / "caches" / "0123456789abcdef"
    old.mkdir()
    for f in caches[0].iterdir():
        if f.name != MANIFEST:
            (old / f.name).write_bytes(f.read_bytes())
    # A cache from before caches were keyed by the model's identity, with its manifest under the name it had then.
    (old / OLD_MANIFEST).write_text(json.dumps({**manifest.to_json(), "key": {**manifest.key, "model": "smollm2-135m"}}))
    for name in names:
        cfg = ExtractConfig(model=name, corpus=str(text_file), tokens=100, ctx_len=32, layer=15, device="cpu",
                            precision="float32")
        assert find_cache(cfg, None) == caches[0], name
        assert find_cache(cfg, old.name) == old, name
    other = ExtractConfig(model=str(tmp_path), corpus=str(text_file), tokens=100, ctx_len=32, layer=15,
                          precision="float32")
    assert find_cache(other, old.name) is None, "a folder that is no model is not the built-in"


def test_bad_layer_is_refused(lm):
    ids = lm.tokenizer("x", return_tensors="pt")
    with pytest.raises(ValueError, match="layer must be between 0 and 29"):
        residual_after(lm, ids["input_ids"], ids["attention_mask"], 30)


def test_unknown_model_gives_a_clear_error():
    from msae.lm import LMLoadError

    with pytest.raises(LMLoadError, match="could not load model 'no-such-org/no-such-model'"):
        load_lm("no-such-org/no-such-model", device="cpu")


def test_bf16_forward_stays_within_bf16_rounding_of_float32_and_keys_its_own_cache(lm, text_file, tmp_path):
    """The bf16 model's residual stream at layer 15 against float32's on the same contexts: per token a relative L2
    error of median under 2% and 99th percentile under 4% (measured 1.2% and 2.2%; bf16 keeps 8 significant bits,
    0.4% per rounding, over 16 blocks). Its extraction is another cache (the key holds the model's dtype) and the
    cache records it."""
    bf16 = load_lm("smollm2-135m", device="cpu", precision="bfloat16")
    assert bf16.dtype == torch.bfloat16 and lm.dtype == torch.float32
    ids = torch.tensor([lm.tokenizer("The cat sat on the mat because it was warm and the house was quiet.")["input_ids"]])
    mask = torch.ones_like(ids)
    ref, got = residual_after(lm, ids, mask, 15)[0, 1:], residual_after(bf16, ids, mask, 15)[0, 1:].float()
    rel = (got - ref).norm(dim=1) / ref.norm(dim=1)
    assert rel.median() < 0.02 and rel.quantile(0.99) < 0.04, rel
    assert rel.median() > 1e-4, "the bf16 model must differ, or it did not run in bf16"

    cfg = ExtractConfig(corpus=str(text_file), tokens=100, ctx_len=32, lm_batch=2, layer=15)
    caches = {name: extract(cfg, lm=model, root=tmp_path) for name, model in (("float32", lm), ("bfloat16", bf16))}
    assert caches["float32"] != caches["bfloat16"]
    assert "lm_dtype" not in read_manifest(caches["float32"]).key, "float32 caches keep the key they had"
    assert read_manifest(caches["bfloat16"]).key["lm_dtype"] == "bfloat16"


def test_asking_for_bf16_where_the_cpu_lacks_bf16_instructions_warns_and_auto_picks_float32(monkeypatch):
    """The verdict itself comes from the CPU's flags (cpu_description records them); here both verdicts are set,
    so that the messages of the CPU this test does not run on are checked as well."""
    cpu = torch.device("cpu")
    monkeypatch.setattr(lm_mod, "bf16_is_fast", lambda _device: False)
    assert lm_mod.compute_dtype("auto", cpu) == torch.float32
    note = lm_mod.precision_note("bfloat16", cpu)
    assert "warning" in note and "slower" in note and "--precision auto" in note
    assert "float32 is faster" in lm_mod.precision_note("auto", cpu)
    monkeypatch.setattr(lm_mod, "bf16_is_fast", lambda _device: True)
    assert lm_mod.compute_dtype("auto", cpu) == torch.bfloat16
    assert "warning" not in lm_mod.precision_note("bfloat16", cpu)
    assert "bf16 matmul instructions" in lm_mod.precision_note("auto", cpu)


def test_cpu_description_names_the_cpu_and_agrees_with_the_precision_verdict():
    info = lm_mod.cpu_description()
    assert info["capability"] == torch.backends.cpu.get_cpu_capability() and info["capability"]
    assert info["bf16_fast"] == lm_mod.bf16_is_fast(torch.device("cpu")) == (info["amx"] or info["avx512_bf16"])
    assert info["cores"] >= 1
    if Path("/proc/cpuinfo").exists():
        assert info["model"], "the model name is read from /proc/cpuinfo"
    # Benchmarks measure bfloat16 only where it is fast, unless asked for it.
    cpu = torch.device("cpu")
    assert lm_mod.precisions_to_measure(None, cpu) == (["float32", "bfloat16"] if info["bf16_fast"] else ["float32"])
    assert lm_mod.precisions_to_measure("bfloat16, float32", cpu) == ["bfloat16", "float32"]


def test_cache_is_written_reused_and_resumed(lm, text_file, tmp_path):
    cfg = ExtractConfig(corpus=str(text_file), tokens=250, ctx_len=32, lm_batch=2, shard_rows=60, layer=15)
    straight = extract(cfg, lm=lm, root=tmp_path / "a")
    manifest = read_manifest(straight)
    assert manifest.rows >= 250 and len(manifest.shards) >= 3
    assert manifest.dropped["position_0"] == manifest.contexts_done

    stamp = (straight / MANIFEST).stat().st_mtime_ns
    assert extract(cfg, lm=lm, root=tmp_path / "a") == straight
    assert (straight / MANIFEST).stat().st_mtime_ns == stamp, "a full cache is reused untouched"

    class Interrupted(Exception):
        pass

    def stop_after_two_shards(rows, _total):
        written = tmp_path / "b" / straight.name
        if has_manifest(written) and len(read_manifest(written).shards) >= 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        extract(cfg, lm=lm, root=tmp_path / "b", progress=stop_after_two_shards)
    resumed = extract(cfg, lm=lm, root=tmp_path / "b")
    assert read_manifest(resumed).rows == manifest.rows
    for shard in manifest.shards:
        want, got = read_shard(straight, shard, SHARD_TENSORS), read_shard(resumed, shard, SHARD_TENSORS)
        assert want.keys() == got.keys() == set(SHARD_TENSORS)
        for key in want:
            torch.testing.assert_close(want[key], got[key], atol=1e-2, rtol=1e-3)


def assert_aligned(cache: Path) -> list[int]:
    """Every shard's rows point at its own contexts, the shards' contexts follow one another; returns the starts."""
    manifest = read_manifest(cache)
    starts = []
    for shard in manifest.shards:
        t = read_shard(cache, shard, ["context_start", "context_tokens", "context", "position", "token_ids"])
        start = int(t["context_start"][0])
        ctx_tokens, context = t["context_tokens"], t["context"] - start
        assert t["token_ids"].shape[0] == shard.rows and ctx_tokens.shape[0] == shard.contexts
        assert context.min() >= 0 and context.max() < ctx_tokens.shape[0]
        assert torch.equal(ctx_tokens[context, t["position"].long()], t["token_ids"]), \
            f"{shard.file}: rows point at other contexts"
        starts.append(start)
    assert starts == [sum(s.contexts for s in manifest.shards[:i]) for i in range(len(starts))]
    return starts


def test_the_held_out_shard_is_never_a_sliver(lm, text_file, tmp_path):
    """The cache's last shard is held out: rows left over at the end that are fewer than half a shard join the shard
    before them (when two or more were written: one must stay held out), so the last holds from half a shard to one
    and a half, and the cache the same rows as one written in a single shard."""
    tokens = 250
    single = extract(ExtractConfig(corpus=str(text_file), tokens=tokens, ctx_len=32, lm_batch=1, shard_rows=10**6,
                                   layer=15), lm=lm, root=tmp_path / "single")
    want = read_manifest(single)
    merged = 0
    for shard_rows in (60, 70, 80, 90, 100):  # one context (≤ 31 rows) a batch: a tail is often under half a shard
        cache = extract(ExtractConfig(corpus=str(text_file), tokens=tokens, ctx_len=32, lm_batch=1,
                                      shard_rows=shard_rows, layer=15), lm=lm, root=tmp_path / str(shard_rows))
        m = read_manifest(cache)
        assert (m.rows, m.contexts_done) == (want.rows, want.contexts_done)
        assert sum(s.rows for s in m.shards) == m.rows and len(m.shards) >= 2
        assert m.shards[-1].rows >= shard_rows // 2, f"shard_rows {shard_rows}: a held-out sliver"
        assert sorted(p.name for p in cache.glob("*.safetensors")) == sorted(s.file for s in m.shards), \
            "no file of a replaced shard is left"
        assert_aligned(cache)
        rows = torch.cat([t["token_ids"] for _i, _s, t in iter_shards(cache, ["token_ids"])])
        assert torch.equal(rows, read_shard(single, want.shards[0], ["token_ids"])["token_ids"])
        merged += m.shards[-1].file.count("_") == 2  # shard_NNNNN_ROWS.safetensors: the tail joined it
    assert merged, "no shard size left a tail to join: the check above tested nothing"
    # One shard and a short tail: the tail stays a shard of its own, or nothing would be held out.
    cache = extract(ExtractConfig(corpus=str(text_file), tokens=tokens, ctx_len=32, lm_batch=1, shard_rows=200,
                                  layer=15), lm=lm, root=tmp_path / "one")
    m = read_manifest(cache)
    assert len(m.shards) == 2 and m.shards[-1].rows < 100 and m.rows == want.rows
    assert len(m.heldout_shards()) == 1


def test_a_cache_grown_with_another_batch_size_keeps_rows_and_contexts_aligned(lm, text_file, tmp_path):
    # 3 contexts a batch, then 4: the second extraction starts inside one of its batches.
    first = extract(ExtractConfig(corpus=str(text_file), tokens=100, ctx_len=32, lm_batch=3, shard_rows=60, layer=15),
                    lm=lm, root=tmp_path)
    done = read_manifest(first).contexts_done
    assert done % 4, "the first extraction must stop inside a batch of the second"
    grown = extract(ExtractConfig(corpus=str(text_file), tokens=400, ctx_len=32, lm_batch=4, shard_rows=60, layer=15),
                    lm=lm, root=tmp_path)
    assert grown == first
    manifest = read_manifest(grown)
    assert_aligned(grown)
    rows = manifest.rows
    # No context was extracted twice: the stored contexts are the corpus's, in order.
    stored = torch.cat([t["context_tokens"] for _i, _s, t in iter_shards(grown, ["context_tokens"])])
    straight = extract(ExtractConfig(corpus=str(text_file), tokens=rows, ctx_len=32, lm_batch=4, shard_rows=10**6,
                                     layer=15), lm=lm, root=tmp_path / "straight")
    expected = read_shard(straight, read_manifest(straight).shards[0], ["context_tokens"])["context_tokens"]
    n = min(len(stored), len(expected))
    assert torch.equal(stored[:n], expected[:n])


def test_cached_rows_match_the_model(lm, text_file, tmp_path):
    cfg = ExtractConfig(corpus=str(text_file), tokens=40, ctx_len=32, lm_batch=2, layer=15)
    cache = extract(cfg, lm=lm, root=tmp_path)
    t = read_shard(cache, read_manifest(cache).shards[0], ["activations", "context_tokens", "context", "position"])
    acts, ctx_tokens, context, position = t["activations"], t["context_tokens"], t["context"], t["position"]
    ids = ctx_tokens[:1].long()
    mask = (ids >= 0).long()
    full = residual_after(lm, ids.clamp_min(0), mask, 15)[0]
    rows = context == 0
    torch.testing.assert_close(acts[rows].float(), full[position[rows].long()], atol=0.5, rtol=2e-3)
    assert (position > 0).all(), "position 0 never enters the cache"


def test_shuffled_buffer_is_bounded_and_covers_every_row(lm, text_file, tmp_path):
    cfg = ExtractConfig(corpus=str(text_file), tokens=300, ctx_len=32, lm_batch=2, shard_rows=50, layer=15)
    cache = extract(cfg, lm=lm, root=tmp_path)
    source = CachedActivations(cache, buffer_rows=100)
    assert source.n_rows > 2 * source.buffer_rows, "the corpus must be larger than the buffer"
    per_epoch = source.n_rows // 16
    seen = torch.cat([b for _, b in zip(range(per_epoch), source.batches(0, 16, seed=0))])
    all_rows = torch.cat([source.load(s) for s in source.shards])
    assert seen.shape[0] >= all_rows.shape[0] - 16 * 4  # at most one partial batch per buffer group is carried off
    # The text repeats, so equal rows exist: an epoch may show each row only as often as the cache holds it.
    from collections import Counter

    held = Counter(tuple(r[:8].tolist()) for r in all_rows)
    shown = Counter(tuple(r[:8].tolist()) for r in seen)
    assert all(shown[key] <= held[key] for key in shown), "a row repeats within an epoch"
    assert not torch.equal(seen[:16], all_rows[:16]), "rows are shuffled"
    again = torch.cat([b for _, b in zip(range(3), source.batches(2, 16, seed=0))])
    torch.testing.assert_close(again[:16], seen[32:48]), "starting at step 2 gives step 2's batch"


def test_wiki_markup_is_stripped_to_its_text():
    raw = "{{Infobox|x={{y}}}}'''Anarchism''' is a [[political philosophy]] that [[self-governance|self-governs]].<ref>cite</ref>\n==History==\n[[Category:Politics]]"
    assert strip_wiki_markup(raw) == "Anarchism is a political philosophy that self-governs.\nHistory"


def test_builtin_corpus_documents_are_long_text_without_wiki_markup():
    docs = corpus_mod.builtin_documents()
    first = [next(docs) for _ in range(5)]
    assert all(len(d.text) > 200 for d in first)
    assert not any("[[" in d.text or "{{" in d.text for d in first)


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("bad.txt", b"fine line\n\xff\xfe broken\n", "line 2, byte 1: not valid UTF-8"),
        ("empty.txt", b"", "the file is empty"),
        ("blank.txt", b"\n\n\n", "no text found"),
        ("bin.txt", b"ELF\x00\x01\x02", "looks like a binary file"),
        ("rows.csv", b"id,body\n1,hello\n", "no 'text' column (columns: id, body)"),
        ("rows.jsonl", b'{"text": "ok"}\n{"body": "x"}\n', 'line 2: no "text" field'),
        ("rows.jsonl", b'{"text": "ok"}\nnot json\n', "line 2: not valid JSON"),
        ("data.parquet", b"PAR1 not really", "not a readable parquet file"),
        ("notes.docx", b"whatever", "unsupported file type .docx"),
    ],
)
def test_bad_corpora_are_refused_with_the_place(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(CorpusError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        list(file_documents(path))
    assert name in str(info.value)


def test_txt_jsonl_csv_and_parquet_files_read_as_their_documents(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.txt").write_text("first doc\nstill first\n\nsecond doc\n")
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n\n{"text": "two"}\n')
    (tmp_path / "a.csv").write_text('text,id\n"multi\nline",1\nplain,2\n')
    pq.write_table(pa.table({"text": ["p1", "p2", None]}), tmp_path / "a.parquet")
    assert [d.text for d in file_documents(tmp_path / "a.txt")] == ["first doc\nstill first", "second doc"]
    assert [d.text for d in file_documents(tmp_path / "a.jsonl")] == ["one", "two"]
    assert [d.text for d in file_documents(tmp_path / "a.csv")] == ["multi\nline", "plain"]
    assert [d.text for d in file_documents(tmp_path / "a.parquet")] == ["p1", "p2"]


def test_msae_train_end_to_end_on_a_tiny_corpus(lm, text_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MSAE_ACTIVATION_CACHE", str(tmp_path / "cache"))
    argv = ["train", "--model", "smollm2-135m", "--layer", "3", "--corpus", str(text_file), "--tokens", "600",
            "--ctx-len", "64", "--shard-rows", "100", "--eval-contexts", "4", "--arch", "matryoshka", "--also-vanilla", "--widths", "32,128", "--k", "8",
            "--steps", "12", "--batch-size", "64", "--device", "cpu", "--precision", "float32",
            "--out", str(tmp_path / "run")]  # float32: the float16 copy below must differ by its storage alone
    assert cli_main(argv) == 0, capsys.readouterr().err
    for name in ("matryoshka", "vanilla"):
        sae, cfg = load_sae(tmp_path / "run" / name)
        assert sae.d_in == 576
        info = cfg["msae"]["extraction"]
        assert info["model"] == "smollm2-135m" and info["layer"] == 3
        assert info["exhausted"] and 0 < info["rows"] < 600, "the tiny corpus runs out before 600 tokens"
        assert info["corpus"] == {"kind": "file", "sources": [],
                                  "file": {"path": str(text_file), "sha256": sha256_file(text_file)}}
        assert str(tmp_path / "cache") not in json.dumps(cfg), "the cache is recorded by its id, not this machine's path"
        assert info["cache_id"] in {p.name for p in (tmp_path / "cache").iterdir()}
    lines = (tmp_path / "run" / "matryoshka" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["step"] == 12
    held = json.loads((tmp_path / "run" / "matryoshka" / "eval.json").read_text())
    assert len(held["fvu"]) == 2 and held["rows"] > 0 and 0 < held["l0"]
    assert sum(held["l0_per_group"]) == pytest.approx(held["l0"]) and len(held["alive_per_100k_per_group"]) == 2
    assert all(a <= b <= c for a, b, c in held["freq_quantiles_per_group"])
    assert cfg["msae"]["threshold"]["rows"] > 0, "θ was calibrated on held-in rows"
    assert [p["part"] for p in held["parts"]] == [text_file.name] and held["parts"][0]["rows"] == held["rows"]
    assert held["parts"][0]["fvu"] == pytest.approx(held["fvu"][-1], rel=1e-4), "one part: its FVU is the whole's"
    assert held["ce_clean"] < held["ce_sae"] < held["ce_zero"], "a barely trained SAE sits between clean and zero"
    assert "CE loss recovered" in capsys.readouterr().out
    # the held-out contexts the CE loss ran on, spread over the held-out shard, beside eval.json
    cache = cache_root() / Run(tmp_path / "run" / "matryoshka").info().extraction.cache_id
    every = heldout_contexts(cache)
    with safe_open(str(tmp_path / "run" / "matryoshka" / HELDOUT_CONTEXTS_FILE), framework="pt") as f:
        saved = f.get_tensor("context_tokens")
    assert saved.dtype == torch.int32 and saved.shape == (min(4, every.shape[0]), every.shape[1])
    assert torch.equal(saved[0], every[0].to(torch.int32)) and torch.equal(saved[-1], every[-1].to(torch.int32))
    assert all(any(torch.equal(row, e.to(torch.int32)) for e in every) for row in saved)

    # a float16 copy (how the shipped runs are stored) evaluates like the float32 run it came from
    sae, cfg = load_sae(tmp_path / "run" / "matryoshka")
    save_sae(sae, tmp_path / "half", cfg={"msae": cfg["msae"]}, dtype=torch.float16)
    half = evaluate_run(tmp_path / "half", cache_root() / Run(tmp_path / "half").info().extraction.cache_id,
                        lm, n_contexts=4)
    assert half.rows == held["rows"] and half.fvu == pytest.approx(held["fvu"], abs=2e-3)
    assert half.ce_sae == pytest.approx(held["ce_sae"], abs=2e-2)
    assert json.loads((tmp_path / "half" / "eval.json").read_text())["fvu"] == pytest.approx(half.fvu)


def test_spread_rows_takes_evenly_spaced_rows_from_first_to_last():
    x = torch.arange(10)[:, None]
    assert spread_rows(x, 4)[:, 0].tolist() == [0, 3, 6, 9]
    assert spread_rows(x, 10)[:, 0].tolist() == list(range(10)) and spread_rows(x, 50).shape == (10, 1)
    assert spread_rows(x, 1)[:, 0].tolist() == [0]


def test_contexts_never_cross_documents(lm):
    docs = [corpus_mod.Document("alpha " * 150, "a"), corpus_mod.Document("beta gamma " * 40, "b")]
    out = list(corpus_mod.contexts(iter(docs), lm.tokenizer, ctx_len=64))
    ids = {i: lm.tokenizer(d.text, add_special_tokens=False)["input_ids"] for i, d in enumerate(docs)}
    rebuilt = {0: [], 1: []}
    for tokens, doc in out:
        assert len(tokens) <= 64
        rebuilt[doc].extend(tokens)
    assert rebuilt == ids


def test_cache_records_the_document_of_every_context(lm, text_file, tmp_path):
    cache = extract(ExtractConfig(corpus=str(text_file), tokens=100, ctx_len=16, lm_batch=4, layer=2), lm=lm, root=tmp_path)
    t = read_shard(cache, read_manifest(cache).shards[0], ["context_doc", "context_tokens", "context_part"])
    docs, ctx = t["context_doc"], t["context_tokens"]
    assert docs.shape[0] == ctx.shape[0] and docs[0] == 0 and (docs[1:] >= docs[:-1]).all()
    assert docs[-1] > 0, "several documents were read"
    parts = t["context_part"]
    assert parts.shape == docs.shape and (parts == 0).all()
    assert read_manifest(cache).parts == [text_file.name], "every context's part is named in the manifest"


def test_corpus_command_names_every_builtin_part(capsys):
    assert cli_main(["corpus"]) == 0
    out = capsys.readouterr().out
    for name in ("wikipedia", "news", "python-docs"):
        assert f"{name}:" in out


def test_wordnet_entries_read_as_words_definition_and_examples(tmp_path):
    lines = (Path(__file__).parent / "fixtures" / "data.noun.sample").read_text().splitlines()
    entries = [e for e in map(corpus_mod.wordnet_entry, lines) if e is not None]
    assert len(entries) == len(lines) - 2, "the licence header is skipped, every synset line read"
    lexfile, text = next(e for e in entries if e[1].startswith("dog,"))
    assert lexfile == "05"
    assert text.startswith("dog, domestic dog, Canis familiaris: a member of the genus Canis")
    assert '"the dog barked all night"' in text
    # A data file of its own groups consecutive synsets of one lexicographer file into documents.
    (tmp_path / "data.noun").write_text("\n".join(lines) + "\n")
    source = corpus_mod.BuiltinSource("wordnet-noun", "wordnet-base", "data.noun", "test", system=str(tmp_path))
    docs = list(corpus_mod.source_documents(source))
    assert docs and all(d.source.startswith("wordnet-noun#") for d in docs)
    assert sum(d.text.count("\n") + 1 for d in docs) * corpus_mod.WORDNET_DOCUMENT_STRIDE >= len(entries) // 2


def test_builtin_parts_are_interleaved_and_missing_apt_parts_skipped_with_a_note(tmp_path, monkeypatch):
    absent = corpus_mod.BuiltinSource("wordnet-noun", "wordnet-base", "data.noun", "test", system=str(tmp_path / "none"))
    pip_parts = tuple(s for s in corpus_mod.BUILTIN_SOURCES if s.system is None)
    monkeypatch.setattr(corpus_mod, "BUILTIN_SOURCES", pip_parts + (absent,))
    assert corpus_mod.present_sources() == pip_parts
    assert "wordnet-noun" in corpus_mod.missing_note() and "apt install wordnet-base" in corpus_mod.missing_note()
    docs = list(corpus_mod.builtin_documents())
    parts = [corpus_mod.part_of(d) for d in docs]
    assert set(parts) == {s.name for s in pip_parts}
    # Every part appears in the first and in the last tenth of the stream (read one after another, the Python
    # documentation would all sit at the end).
    tenth = len(docs) // 10
    assert set(parts[:tenth]) == set(parts) and set(parts[-tenth:]) == set(parts)
    assert sorted(d.source for d in docs) == sorted(d.source for s in pip_parts for d in corpus_mod.source_documents(s))
