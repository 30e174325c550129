"""First-letter absorption: the word list and prompts on the real tokenizer, the definitions on hand-built SAEs
whose absorption is known, and the whole measurement on a slice of the real model with the shipped SAEs."""

import math
import re
from pathlib import Path

import pytest
import torch

from msae.analysis import absorption as ab
from msae.io import SAELoadError, save_sae
from msae.lm import residual_after
from msae.results import AbsorptionResult
from msae.run import Run
from msae.sae import SAE

from helpers import shipped_d_sae

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "default"
SLICE = ab.AbsorptionConfig(letters="abst", per_letter=40)


@pytest.fixture(scope="module")
def measured(lm):
    return ab.measure({"vanilla": ASSETS / "vanilla", "matryoshka": ASSETS / "matryoshka"}, lm, SLICE)


# ------------------------------------------------------------------------------------------- words and prompts


def test_letter_words_are_single_tokens_labelled_by_their_first_letter(lm):
    words = ab.letter_words(lm.tokenizer, letters="aqz", per_letter=25, seed=1)
    assert len(words.words) == len(words.token_ids) == len(words.labels) > 0
    assert words.token_ids.tolist() == sorted(words.token_ids.tolist())
    for token_id, word, label in zip(words.token_ids.tolist(), words.words, words.labels.tolist()):
        assert re.fullmatch(r" [A-Za-z]{2,}", word), word
        assert lm.tokenizer.decode([token_id]) == word
        assert lm.tokenizer(word, add_special_tokens=False)["input_ids"] == [token_id]
        assert ab.LETTERS[label] == word[1].lower()
    counts = torch.bincount(words.labels, minlength=26)
    assert set(counts.nonzero().squeeze(1).tolist()) == {0, 16, 25}
    assert counts.max() <= 25
    again = ab.letter_words(lm.tokenizer, letters="aqz", per_letter=25, seed=1)
    assert again.words == words.words, "the sample is seeded"
    assert ab.letter_words(lm.tokenizer, letters="aqz", per_letter=25, seed=2).words != words.words


def test_prompts_end_at_the_word_and_batching_leaves_activations_unchanged(lm):
    words = ab.letter_words(lm.tokenizer, letters="bc", per_letter=3)
    prompts = ab._prompts(lm.tokenizer, words.token_ids, 2, seed=0)
    for word_id, word, prompt in zip(words.token_ids.tolist(), words.words, prompts):
        assert prompt[-1] == word_id
        examples = re.findall(r"( [A-Za-z]+) has the first letter: ([A-Z])\n", lm.tokenizer.decode(prompt[:-1]))
        assert len(examples) == 2 and word not in [w for w, _ in examples]
        assert all(w in words.words and letter == w[1].upper() for w, letter in examples)
    one_by_one = ab.word_activations(lm, 15, words.token_ids, batch=1, icl_examples=2)
    batched = ab.word_activations(lm, 15, words.token_ids, batch=4, icl_examples=2)
    torch.testing.assert_close(batched, one_by_one, atol=1e-3, rtol=1e-4)
    ids = torch.tensor([prompts[0]])
    direct = residual_after(lm, ids, torch.ones_like(ids), 15)[0, -1]
    torch.testing.assert_close(one_by_one[0], direct, atol=1e-3, rtol=1e-4)


def test_word_activations_are_kept_per_model_layer_and_words_and_a_broken_file_is_made_again(lm, tmp_path):
    words = ab.letter_words(lm.tokenizer, letters="bc", per_letter=3)
    direct = ab.word_activations(lm, 15, words.token_ids, icl_examples=2)
    first = ab.cached_word_activations(lm, 15, words.token_ids, icl_examples=2, root=tmp_path)
    (kept,) = list(tmp_path.glob("*.safetensors"))
    torch.testing.assert_close(first, direct)
    heard = []
    again = ab.cached_word_activations(lm, 15, words.token_ids, icl_examples=2, root=tmp_path, progress=heard.append)
    assert torch.equal(again, first) and heard == [], "read from the file: no forward pass reports progress"
    ab.cached_word_activations(lm, 14, words.token_ids, icl_examples=2, root=tmp_path)
    ab.cached_word_activations(lm, 15, words.token_ids[:4], icl_examples=2, root=tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) == 3, "another layer and other words are other files"
    kept.write_bytes(b"not a safetensors file")
    mended = ab.cached_word_activations(lm, 15, words.token_ids, icl_examples=2, root=tmp_path, progress=heard.append)
    torch.testing.assert_close(mended, direct)
    assert heard, "the broken file was made again by a forward pass"
    assert not list(tmp_path.glob("*.tmp")), "no temp file is left behind"


# ------------------------------------------------------------------------------------ hand-built, known answers

D_IN = 6
E = torch.eye(D_IN)
COS_CHILD = 2 / math.sqrt(5)  # the absorbing latent's decoder is (2 e0 + e2) / sqrt(5)
FULL, PARTIAL = 1, 3  # test words (odd indices) of letter a carrying the child feature


def toy_words(full_mag=1.5, partial_mag=0.8):
    """100 words of letter a (along e0), 100 of letter b (along e1); a few a-words carry a child feature e2.
    Odd indices are the test split."""
    acts = torch.cat([E[0].repeat(100, 1), E[1].repeat(100, 1)])
    labels = torch.tensor([0] * 100 + [1] * 100)
    acts[0] += full_mag * E[2]  # children in the train split too
    acts[2] += partial_mag * E[2]
    acts[FULL] += full_mag * E[2]
    acts[PARTIAL] += partial_mag * E[2]
    is_test = torch.arange(200) % 2 == 1
    directions = E[:2].clone()
    probes = ab.LetterProbes(torch.tensor([0, 1]), 10 * directions, torch.tensor([-5.0, -5.0]), directions,
                             torch.tensor([1.0, 1.0]), is_test)
    return acts, labels, probes


def toy_sae(parent_suppressed: bool, scale: float = 1.0) -> SAE:
    """Latent 0: letter a (silenced by the child feature when `parent_suppressed`); 1: letter b; 2: the child,
    decoding partly along a; 3: unused. `scale` multiplies decoder rows and divides the encoder (same
    reconstruction, decoder rows of norm `scale`)."""
    sae = SAE(D_IN, widths=[2, 4], activation="relu", init=False)
    W_enc = torch.stack([E[0] - (1.0 if parent_suppressed else 0.0) * E[2], E[1], E[2], E[3]], dim=1)
    W_dec = torch.stack([E[0], E[1], (2 * E[0] + E[2]) / math.sqrt(5), E[3]])
    with torch.no_grad():
        sae.W_enc.copy_(W_enc / scale)
        sae.W_dec.copy_(W_dec * scale)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae.eval()


@pytest.mark.parametrize("scale", [1.0, 5.0])
def test_absorbed_parent_gives_the_expected_fraction_and_full_absorption(scale):
    acts, labels, probes = toy_words()
    result = ab.absorption(toy_sae(parent_suppressed=True, scale=scale), acts, labels, probes)
    rows = {row.letter: row for row in result.letters}
    assert rows["a"].main_latents == [0] and rows["a"].main_groups == [0]
    assert rows["b"].main_latents == [1]
    assert rows["a"].n_probe_true_positives == 50
    # The full child (magnitude 1.5): the parent is silent, the child carries 1.5 * cos of a projection of 1.
    assert 1.5 * COS_CHILD >= 0.4
    full_fraction = 1.0
    # The partial child (0.8): the parent fires at 1 - 0.8 = 0.2, the child projects 0.8 * cos.
    main, child = 0.2, 0.8 * COS_CHILD
    partial_fraction = min(child, 1.0 - main) / (min(child, 1.0 - main) + main)
    expected_a = (full_fraction + partial_fraction) / 50
    assert rows["a"].absorption_fraction == pytest.approx(expected_a, abs=1e-5)
    assert rows["a"].full_absorption_rate == pytest.approx(1 / 50)
    assert rows["a"].n_full_absorption == 1
    assert rows["b"].absorption_fraction == 0.0 and rows["b"].full_absorption_rate == 0.0
    assert result.mean.absorption_fraction == pytest.approx(expected_a / 2, abs=1e-5)
    assert result.mean.full_absorption_rate == pytest.approx(1 / 100)
    assert result.mean.n_letters == 2 and result.mean.n_main_latents == 1
    weak_b = ab.absorption(toy_sae(parent_suppressed=True, scale=scale), acts, labels,
                           probes._replace(f1=torch.tensor([1.0, 0.6])))
    assert weak_b.mean.letters == "a", "a probe F1 of 0.6 or less leaves the letter out of the means"
    assert weak_b.mean.absorption_fraction == pytest.approx(expected_a, abs=1e-5)


def test_a_clean_parent_latent_gives_no_absorption():
    acts, labels, probes = toy_words()
    result = ab.absorption(toy_sae(parent_suppressed=False), acts, labels, probes)
    assert result.mean.absorption_fraction == pytest.approx(0.0, abs=1e-6)
    assert result.mean.full_absorption_rate == 0.0
    assert [row.main_latents for row in result.letters] == [[0], [1]]


def test_word_absorption_follows_saebench_rules_word_by_word():
    # Latent 0 is the main one; 1 an absorber (cosine 1); 2 a long decoder row (norm 20) at cosine 0.05.
    latents = torch.tensor([
        [0.0, 0.3, 0.0],  # the absorber carries 30% of the projection: under the 40% gate
        [0.0, 0.5, 0.0],  # main silent, absorber above the gate: fully absorbed
        [0.5, 0.9, 0.0],  # absorber overshoots: counted up to what the main latent leaves, 0.5 / (0.5 + 0.5)
        [1.0, 0.5, 0.0],  # the main latent alone covers the projection
        [0.0, 0.0, 0.8],  # cosine 0.05: no absorber, but full absorption's cosine gate is 0.025
        [0.0, 0.5, 0.0],  # negative projection
    ])
    total = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, -1.0])
    fraction, full = ab.word_absorption(latents, total, torch.tensor([1.0, 1.0, 1.0]),
                                        torch.tensor([1.0, 1.0, 0.05]), torch.tensor([0]))
    assert fraction.tolist() == [0.0, 1.0, 0.5, 0.0, 0.0, 0.0]
    assert full.tolist() == [False, True, False, False, True, False]


def test_variants_raise_the_cosine_and_drop_dense_absorbers():
    latents = torch.tensor([
        [0.0, 0.5, 0.0],  # absorber 1 at cosine 0.15: in at 0.1, out at the dimension-aware 0.2
        [0.0, 0.0, 0.6],  # absorber 2 at cosine 1: in everywhere, unless it is barred as dense
    ])
    total = torch.tensor([1.0, 1.0])
    proj, cos = torch.tensor([1.0, 1.0, 1.0]), torch.tensor([1.0, 0.15, 1.0])
    main = torch.tensor([0])
    fraction, _ = ab.word_absorption(latents, total, proj, cos, main)
    assert fraction.tolist() == [1.0, 1.0]
    fraction, _ = ab.word_absorption(latents, total, proj, cos, main, cos_threshold=0.2)
    assert fraction.tolist() == [0.0, 1.0]
    fraction, full = ab.word_absorption(latents, total, proj, cos, main, allowed=torch.tensor([True, True, False]))
    assert fraction.tolist() == [1.0, 0.0] and full.tolist() == [True, False]


def test_validity_note_names_the_sizes(lm):
    result = ab.SAEAbsorption(mean=ab.AbsorptionMean(0.3, 0.1, 2.0, 0.44, 20, "abc"), letters=[], d_sae=8192)
    v = ab.validity(lm, 576, {"vanilla": result})
    assert not v.valid and 130e6 < v.model_parameters < 140e6 and v.random_cosine_sd == pytest.approx(1 / 24)
    assert "135M parameters" in v.note and "vanilla has fewer latents" in v.note and "2.4 sd" in v.note
    assert "vanilla: main latents' k-sparse F1 0.44" in v.note


def test_main_latents_grow_while_f1_rises_by_more_than_the_jump():
    f1 = torch.tensor([[0.5, 0.6, 0.62, 0.9], [0.8, 0.82, 0.95, 0.99], [0.0, 0.27, 0.31, 0.35]])
    assert ab.main_latents(f1, 0.03).tolist() == [2, 1, 4]


def test_no_usable_probe_and_wrong_width_are_refused(lm, tmp_path):
    acts, labels, probes = toy_words()
    weak = probes._replace(f1=torch.tensor([0.5, 0.55]))
    with pytest.raises(ab.AbsorptionError, match="F1 > 0.6"):
        ab.absorption(toy_sae(True), acts, labels, weak)
    narrow = SAE(8, widths=[16], k=4, activation="topk")
    save_sae(narrow, tmp_path / "narrow", cfg={"msae": {"extraction": {"layer": 3}}})
    with pytest.raises(SAELoadError, match="d_in=8"):
        ab.measure({"narrow": tmp_path / "narrow"}, lm, SLICE)


# ------------------------------------------------------------------------------------------------- real model


def test_letter_probes_beat_chance_on_the_real_model(measured):
    f1 = measured.probe_f1
    assert set(f1) == set("abst")
    # Four letters: always answering "yes" scores F1 0.4 at best.
    assert sum(f1.values()) / 4 > 0.6
    assert measured.layer == 15 and measured.n_words == 160 and measured.n_test_words == 32


def test_shipped_saes_measure_within_bounds(measured, tmp_path):
    assert set(measured.saes) == {"vanilla", "matryoshka"}
    for name, result in measured.saes.items():
        d_sae = shipped_d_sae()
        assert len(result.letters) == 4
        for row in result.letters:
            assert 1 <= len(row.main_latents) <= 10
            assert all(0 <= i < d_sae for i in row.main_latents)
            assert len(row.k_sparse_f1) == 10 and all(0.0 <= f <= 1.0 for f in row.k_sparse_f1)
            if row.n_probe_true_positives:
                assert 0.0 <= row.absorption_fraction <= 1.0
                assert 0.0 <= row.full_absorption_rate <= 1.0
                assert row.n_full_absorption <= row.n_probe_true_positives <= row.n_test_words
        mean = result.mean
        assert 1 <= mean.n_letters <= 4 and 0.0 <= mean.absorption_fraction <= 1.0
        names = [v.name for v in result.variants]
        assert names == ["dimension-aware cosine", "sparse absorbers"] and result.d_sae == d_sae
        assert result.variants[0].cos_threshold == pytest.approx(4.8 / 24)
        for variant in result.variants:  # measured over the same letters as the mean, so never missing
            assert 0 <= variant.absorption_fraction <= 1 and 0 <= variant.full_absorption_rate <= 1, variant
    assert measured.validity is not None and not measured.validity.valid
    groups = {g for row in measured.saes["matryoshka"].letters for g in row.main_groups}
    assert groups <= {0, 1, 2, 3}
    path = Run(tmp_path).write_result(measured)
    assert path.name == "absorption.json" and Run(tmp_path).result(AbsorptionResult) == measured
