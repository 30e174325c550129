"""WordNet's noun taxonomy as token sets: the data.noun parser on real lines, the categories and their edges with the
real tokenizer, and the shipped taxonomy."""

from __future__ import annotations

from pathlib import Path

import pytest

from msae.lm import load_lm
from msae.taxonomy import Taxonomy, TaxonomyError, build_taxonomy, parse_data_noun, word_forms

HERE = Path(__file__).resolve().parent
SAMPLE = HERE / "fixtures" / "data.noun.sample"
SHIPPED = HERE.parent / "assets" / "taxonomy" / "smollm2-135m-wordnet.json"
CANINE, DOG, WOLF, FOX, TOY_DOG, PUG, CORGI, DHOLE, RED_FOX, DOMESTIC = (
    2083346, 2084071, 2114100, 2118333, 2085374, 2110958, 2112826, 2115913, 2119022, 1317541)


@pytest.fixture(scope="module")
def tokenizer():
    return load_lm("smollm2-135m", "cpu").tokenizer


def test_data_noun_lines_parse_into_synsets_with_their_hypernyms():
    synsets = parse_data_noun(SAMPLE.read_text().splitlines())
    assert len(synsets) == 10, "the licence header is skipped"
    dog = synsets[DOG]
    assert dog.lemmas == ["dog", "domestic dog", "Canis familiaris"]
    assert dog.hypernyms == [CANINE, DOMESTIC], "@ pointers to nouns, in order; #m and ~ are not hypernyms"
    assert dog.gloss.startswith("a member of the genus Canis")
    assert synsets[RED_FOX].hypernyms == [FOX] and synsets[PUG].lemmas == ["pug", "pug-dog"]
    with pytest.raises(TaxonomyError, match="line 1 is not a data.noun synset line"):
        parse_data_noun(["02084071 05 n zz dog"])


def test_word_forms_follow_park_et_al():
    assert word_forms("fox") == [" Fox", " Foxes", " fox", " foxes"]
    assert word_forms("dog") == [" Dog", " Dogs", " dog", " dogs"]
    assert word_forms("domestic dog") == [] and word_forms("pug-dog") == []


def test_categories_hold_the_tokens_below_them_and_link_to_their_nearest_category(tokenizer):
    synsets = parse_data_noun(SAMPLE.read_text().splitlines())
    tax = build_taxonomy(synsets, tokenizer, "smollm2-135m", min_tokens=4)
    by_name = {c.name: c for c in tax.categories}
    members = tax.members()
    words = {c.name: {tokenizer.decode([t]) for t in members[c.offset]} for c in tax.categories}
    assert {" dog", " dogs", " wolf", " fox", " foxes", " toy"} <= words["canine"]
    assert {" dog", " Dog", " toy"} <= words["dog"] and " wolf" not in words["dog"]
    assert " pug" not in words["dog"], "two tokens in SmolLM2's vocabulary: not a single-token word"
    assert by_name["dog"].parents == [DOMESTIC, CANINE], "WordNet's dog is a canine and a domestic animal"
    assert all(len(members[c.offset]) == c.size >= 4 for c in tax.categories)
    assert "toy dog" not in by_name or by_name["toy dog"].parents == [DOG]
    assert tax.ancestors()[DOG] == {CANINE, DOMESTIC} and tax.ancestors()[CANINE] == set()
    assert Taxonomy.loads(tax.dumps()) == tax


def test_the_shipped_taxonomy_is_large_and_consistent(tokenizer):
    tax = Taxonomy.loads(SHIPPED.read_text())
    assert tax.tokenizer == "smollm2-135m" and tax.min_tokens == 5 and len(tax.categories) >= 1000
    members = tax.members()
    offsets = {c.offset for c in tax.categories}
    assert all(len(members[c.offset]) == c.size >= 5 for c in tax.categories)
    assert all(set(c.parents) <= offsets for c in tax.categories)
    ancestors = tax.ancestors()
    for c in tax.categories[:200]:
        for a in ancestors[c.offset]:
            assert members[c.offset] <= members[a], "a category's words are its ancestors' words too"
    (january,) = tokenizer(" January", add_special_tokens=False)["input_ids"]
    months = min((c for c in tax.categories if january in members[c.offset]), key=lambda c: c.size)
    assert months.name == "Gregorian calendar month"
    assert {tokenizer.decode([t]) for t in members[months.offset]} >= {" January", " March", " June", " December"}


def test_the_taxonomy_answers_to_every_name_of_its_model_and_no_other(tmp_path):
    """Built for smollm2-135m: a run recording the hub id (as SAELens users do) or the model's folder reads the same
    vocabulary; another model's vocabulary is refused."""
    from msae.lm import BUILTIN, builtin_model_dir
    from msae.taxonomy import load_taxonomy

    for name in ("smollm2-135m", BUILTIN["smollm2-135m"].hub_id, str(builtin_model_dir("smollm2-135m"))):
        assert load_taxonomy(SHIPPED, name).tokenizer == "smollm2-135m", name
    other = tmp_path / "not-smollm2"
    other.mkdir()
    (other / "config.json").write_text("{}")
    (other / "model.safetensors").write_bytes(b"other weights")
    for name in ("gpt2", str(other)):
        with pytest.raises(TaxonomyError, match="vocabulary, not"):
            load_taxonomy(SHIPPED, name)
