"""The schema of every JSON file a run holds: cfg.json's msae block (RunInfo), the metric lines (TrainMetrics), the
held-out evaluation (EvalResult), absorption (AbsorptionResult), the taxonomy benchmark (TaxonomyBench), the
gallery (Gallery), the feature store's manifest (StoreManifest, or ActivationsAnalysis), and a toy comparison
(ToyResult). Records only: the code that fills them lives with the computation (train, evaluate, analysis, toy);
which file holds which, and the code that reads and writes them, is msae.run (the store's files: the store)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable, Literal

from msae.config import AbsorptionConfig, GalleryConfig, LinkConfig, StoreConfig, TaxonomyBenchConfig, TrainConfig
from msae.records import Record


def mean_or_none(values: Iterable[float | None]) -> float | None:
    """The mean of the values that are not None; None when none are (an undefined figure stays undefined)."""
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


# ------------------------------------------------------------------------------------------ cfg.json: provenance


@dataclass
class InputFile(Record):
    """A file the user gave as input."""

    path: str
    """The path as the user gave it (not resolved: it means something on the user's machine)."""
    sha256: str
    """Hex SHA-256 of its content, so a moved file is still recognised and a changed one is not."""


@dataclass
class BuiltinFile(Record):
    """One part of the built-in corpus: a data file inside an installed package."""

    name: str
    """The part's name (wikipedia, news, python-docs)."""
    package: str
    """The Python or Debian package that ships it."""
    file: str
    """Its path inside the package."""
    sha256: str | None = None
    """Hex SHA-256 of its content (None: the package is not installed here)."""


@dataclass
class CorpusInfo(Record):
    """Which text the activations were extracted from."""

    kind: Literal["builtin", "large", "file"]
    """A named corpus (the parts in `sources`) or a user file or folder (`file`; a folder's sha256 is that of its
    files' relative paths and hashes, msae.activations.corpus_sha256)."""
    sources: list[BuiltinFile] = field(default_factory=list)
    """The named corpus's parts."""
    file: InputFile | None = None
    """The user's corpus file or folder."""


@dataclass
class ExtractionInfo(Record):
    """The model, layer and activation cache a run was trained on. An SAE added by upload records only the
    model and layer it reads."""

    model: str | None = None
    """Built-in model name, local path or Hugging Face id."""
    layer: int | None = None
    """The residual stream after this block."""
    corpus: CorpusInfo | None = None
    """Which text."""
    ctx_len: int | None = None
    """Tokens per context."""
    outlier_factor: float | None = None
    """Rows past this multiple of the median norm were dropped."""
    cache_dtype: str | None = None
    """Storage dtype of the cached rows."""
    rows: int | None = None
    """Activation rows in the cache."""
    contexts: int | None = None
    """Contexts extracted."""
    exhausted: bool | None = None
    """The corpus ran out before `rows` reached the requested tokens."""
    dropped: dict[str, int] | None = None
    """Rows dropped: position 0, special tokens, norm outliers."""
    median_norm: float | None = None
    """Median activation norm of the cache."""
    lm_dtype: str | None = None
    """The dtype the LM ran in (`precision`); None: extracted before this was recorded, in float32."""
    cache_id: str | None = None
    """The cache's directory name under the activation cache root (a digest of model, layer, corpus content and
    filters): the same on every machine that extracts the same activations."""


@dataclass
class ThresholdInfo(Record):
    """How a BatchTopK SAE's inference threshold θ was set."""

    theta: float
    """The saved θ (on scaled activations: the training's scale)."""
    running_theta: float
    """The running estimate (an EMA of each batch's smallest kept activation) at the end of training."""
    rows: int
    """Held-in rows θ was calibrated on (the training batches after the last step); 0: θ is the running estimate."""
    l0_batchtopk: float | None = None
    """BatchTopK's L0 on those rows."""
    l0_theta: float | None = None
    """Inference L0 with θ on those rows."""
    exact: bool = True
    """Every batch kept fewer than 2·k·B activations above θ, so θ is the exact global cut (else an estimate)."""


@dataclass
class RunInfo(Record):
    """Our fields of a run's cfg.json (under "msae", beside SAELens's)."""

    name: str | None = None
    """The SAE's name in its training run (matryoshka, vanilla)."""
    train: TrainConfig | None = None
    """The settings it was trained with."""
    steps_done: int | None = None
    """Optimiser steps taken."""
    tokens_seen: int | None = None
    """Activation rows trained on (steps × batch size)."""
    act_scale: float | None = None
    """The factor that scaled activations to unit mean squared norm in training (folded into the saved weights)."""
    dead_fraction: float | None = None
    """Share of latents that had not fired for `dead_tokens` tokens at the end of training."""
    world_size: int | None = None
    """Processes that trained it together (torchrun ranks, each on a slice of every batch); 1 for a single process
    (None: saved before this was recorded)."""
    extraction: ExtractionInfo | None = None
    """Model, layer and activations, for a run trained from text (or an upload's model and layer)."""
    activations: InputFile | None = None
    """The activations file, for a run trained from a tensor (`--activations`)."""
    toy: dict[str, Any] | None = None
    """The toy hierarchy's definition, for a toy run (msae.toy.toy_info)."""
    threshold: ThresholdInfo | None = None
    """How θ was set (BatchTopK runs)."""
    compute_dtype: str | None = None
    """Dtype of the encoder matmul and the selection in training (`precision`): bfloat16 or float32 (float64 for
    float64 weights); None: trained before this was recorded, in float32."""


# ------------------------------------------------------------------------------------------ metrics.jsonl, eval.json


@dataclass
class TrainMetrics(Record):
    """One line of metrics.jsonl: one SAE's training batch at a logged step."""

    step: int
    """Steps done."""
    tokens: int
    """Rows trained on so far."""
    elapsed_s: float
    """Seconds since this (or the resumed) process started training."""
    loss: float
    """The step's total loss (weighted nested MSE + AuxK (+ L1))."""
    mse: list[float]
    """Mean squared error per nested width, on scaled activations."""
    fvu: list[float]
    """Fraction of variance unexplained per nested width, on this batch."""
    l0: float
    """Active latents per row."""
    aux_loss: float
    """The AuxK loss (0 while no latent is dead)."""
    dead_fraction: float
    """Share of latents that have not fired for `dead_tokens` tokens."""
    lr: float
    """The step's learning rate."""
    l0_per_group: list[float] | None = None
    """Active latents per row within each nested group (they sum to l0): how the L0 is shared out."""


@dataclass
class PartFVU(Record):
    """Held-out reconstruction on the rows of one corpus part."""

    part: str
    """The part's name (wikipedia, news, python-docs, wordnet-noun, ...)."""
    rows: int
    """Its held-out rows."""
    fvu: float
    """FVU at full width against the part's own mean."""


@dataclass
class EvalResult(Record):
    """Held-out quality of one SAE (msae.evaluate)."""

    rows: int
    """Held-out activation rows."""
    widths: list[int]
    """Nested widths, one entry per figure below."""
    fvu: list[float]
    """Fraction of variance unexplained per nested width."""
    explained_variance: list[float]
    """1 - FVU per nested width."""
    l0: float
    """Active latents per row, at inference (θ for BatchTopK)."""
    dead_fraction: float
    """Share of latents that never fired on the held-out rows."""
    l0_per_group: list[float] | None = None
    """Active latents per row within each nested group (they sum to l0)."""
    freq_quantiles: list[float] | None = None
    """The quantiles of a latent's firing frequency that freq_quantiles_per_group reports (0.1, 0.5, 0.9)."""
    freq_quantiles_per_group: list[list[float]] | None = None
    """Per nested group, those quantiles of its latents' firing frequencies (firings / rows)."""
    alive_per_100k_per_group: list[float] | None = None
    """Per nested group, the share of its latents that fire at least once per 100k held-out tokens."""
    parts: list[PartFVU] | None = None
    """Full-width FVU on the held-out rows of each corpus part (the built-in corpus's sources; a user file is one)."""
    layer: int | None = None
    """The layer spliced for CE loss recovered."""
    tokens: int | None = None
    """Predicted tokens of the CE measurement."""
    ce_clean: float | None = None
    """The LM's next-token loss, untouched."""
    ce_sae: float | None = None
    """... with the layer's output replaced by the SAE's reconstruction."""
    ce_zero: float | None = None
    """... with it replaced by zeros."""
    ce_loss_recovered: float | None = None
    """(ce_zero - ce_sae) / (ce_zero - ce_clean)."""


# ------------------------------------------------------------------------------------------ absorption.json


@dataclass
class LetterAbsorption(Record):
    """Absorption of one SAE on one first letter."""

    letter: str
    """The letter."""
    probe_f1: float
    """Test F1 of the letter's probe on the model's activations."""
    n_test_words: int
    """Test words with this first letter."""
    n_probe_true_positives: int
    """Those the probe classifies correctly (absorption is measured on these)."""
    main_latents: list[int]
    """The letter's main latents (k-sparse probing)."""
    main_groups: list[int]
    """Their nested groups."""
    k_sparse_f1: list[float]
    """Test F1 of the k-sparse probe for k = 1..max_k."""
    main_f1: float
    """Test F1 of the probe on the main latents."""
    absorption_fraction: float | None
    """Mean absorption fraction over the true positives."""
    full_absorption_rate: float | None
    """Share of the true positives fully absorbed."""
    n_full_absorption: int
    """Fully absorbed true positives."""
    used: bool
    """Counted in the means (probe F1 above the bound and at least one true positive)."""


@dataclass
class AbsorptionMean(Record):
    """Means over the letters used."""

    absorption_fraction: float | None
    """Mean of the letters' absorption fractions."""
    full_absorption_rate: float | None
    """Mean of the letters' full-absorption rates."""
    n_main_latents: float | None
    """Mean size of the main set."""
    main_f1: float | None
    """Mean k-sparse F1 of the main latents."""
    n_letters: int
    """Letters used."""
    letters: str
    """The letters used, in order."""


@dataclass
class AbsorptionVariant(Record):
    """A variant of the measurement, labelled as such: never in place of the SAEBench-faithful figure."""

    name: str
    """What changes."""
    cos_threshold: float
    """The absorber cosine it used."""
    max_absorber_share: float | None
    """Absorbers limited to latents firing on at most this share of the words (None: no limit)."""
    absorption_fraction: float | None
    full_absorption_rate: float | None


@dataclass
class SAEAbsorption(Record):
    """One SAE's absorption."""

    mean: AbsorptionMean
    """Means over letters (SAEBench's definitions and thresholds)."""
    letters: list[LetterAbsorption]
    """One row a letter probed."""
    variants: list[AbsorptionVariant] = field(default_factory=list)
    """The dimension-aware cosine and the sparse-absorber variants (means over the same letters)."""
    d_sae: int | None = None
    """The SAE's width (the validity note compares it with SAEBench's 16k)."""


@dataclass
class AbsorptionValidity(Record):
    """Whether first-letter absorption is a valid measurement here (SAEBench recommends models of >= 1B parameters
    and SAEs of >= 16k latents)."""

    model_parameters: int
    d_in: int
    random_cosine_sd: float
    """1/√d_in: the spread of a random direction's cosine with the probe."""
    valid: bool
    """Model and every SAE at or above SAEBench's recommended sizes."""
    note: str
    """In words, with the main latents' mean k-sparse F1 per SAE."""


@dataclass
class AbsorptionResult(Record):
    """First-letter absorption of one or more SAEs from one set of probes (msae.analysis.absorption)."""

    model: str
    """The model probed."""
    layer: int
    """Its layer."""
    config: AbsorptionConfig
    """Every size and threshold used."""
    n_words: int
    """Single-token words."""
    n_test_words: int
    """Of which held out."""
    probe_f1: dict[str, float]
    """Test F1 of each letter's probe."""
    saes: dict[str, SAEAbsorption]
    """By run name."""
    seconds: dict[str, float] = field(default_factory=dict)
    """Time of each step."""
    validity: AbsorptionValidity | None = None
    """The validity note (None in results measured before it existed)."""


# ------------------------------------------------------------------------------------------ features/manifest.json


@dataclass
class GroupSummary(Record):
    """Parent links of one nested group's latents."""

    group: int
    """The group (1 = the second)."""
    width: int
    """The nested width it completes."""
    live_latents: int
    """Its latents that fired."""
    links: int
    """Links from an earlier group to its latents."""
    children_with_a_parent: int
    """Its latents with at least one linked parent."""
    share_with_a_parent: float | None
    """children_with_a_parent / live_latents."""


@dataclass
class HierarchySummary(Record):
    """The parent–child links across a Matryoshka SAE's nested groups."""

    RENAMED: ClassVar[dict[str, str]] = {"per_level": "per_group"}

    links: int
    """Links made, over every child group."""
    per_group: list[GroupSummary]
    """Per child group."""
    parents_with_children: int
    """Latents with at least one linked child."""
    parents_with_2plus_children: int
    """Latents with two or more."""
    mean_children_per_parent: float | None
    """Over parents with children."""
    mean_coverage: float | None
    """Mean share of a parent's firings that its children cover."""


@dataclass
class Interval(Record):
    """A mean with its 95% bootstrap interval (percentiles of the resampled means)."""

    mean: float
    low: float
    high: float
    n: int
    """Items resampled (links, pairs, members...)."""


@dataclass
class CriterionValidation(Record):
    """One link criterion, links made on one part of the rows and measured on the other (msae.analysis.validate)."""

    criterion: str
    """coverage or cosine."""
    links: int
    """DAG links made on the link rows."""
    tree_links: int
    """Tree links made on the link rows."""
    share_with_parent: float | None
    """Share of the live latents that can have a parent (groups after the first) that got one in the tree."""
    measured_links: int
    """Tree links whose child fires on at least MIN_HELD_FIRES held-out rows (the ones measured)."""
    heldout_coverage: Interval | None
    """P(parent | child) of those tree links on the held-out rows."""
    null_coverage: Interval | None
    """The same with each parent replaced by a random latent of an earlier group firing about as often (within
    the 10 nearest in frequency on the link rows)."""
    lift_null_coverage: Interval | None = None
    """The harder null: each parent replaced by a random other candidate parent of the child that also passes the
    lift bound and min_cofires on the link rows (over the links whose child has one)."""
    lift_null_share: float | None = None
    """Share of the measured links whose child has such a candidate."""
    heldout_coverage_per_group: list[float | None] = field(default_factory=list)
    """Mean held-out P(p | c) by the child's group (index = group; None where no link was measured)."""
    heldout_coverage_per_part: dict[str, float] = field(default_factory=dict)
    """Mean held-out P(p | c) on the held-out rows of each corpus part (text of one source)."""


@dataclass
class LinkValidation(Record):
    """The coverage rule made on one part of the analysed rows and measured on the other (intervals resample
    parents), and made without each corpus part and measured on it."""

    split: str
    """How the rows were split."""
    link_rows: int
    measured_rows: int
    criteria: list[CriterionValidation]
    left_out: list[CriterionValidation] = field(default_factory=list)
    """The configured rule made on every corpus part but one and measured on that one, one entry a part (empty
    when the rows come from one part)."""


@dataclass
class HierarchyFigures(Record):
    """The hierarchy figures the literature reports, for one SAE over the analysed rows (msae.analysis.validate).
    Published values for comparison: HSAE (arXiv 2602.11881, Gemma-2-2B) P(p|c) 0.65–0.80, P(c|p) 0.33–0.46;
    Tree SAE (arXiv 2605.07922, GPT-2 small) hierarchy score 0.05–0.19 for Matryoshka, 0.48–0.88 for Tree SAE."""

    criterion: str
    """The criterion of the tree links measured."""
    tree_links: int
    p_parent_given_child: float | None
    """Mean P(p | c) over tree links."""
    p_child_given_parent: float | None
    """Mean P(c | p) over tree links."""
    hamming: float | None
    """Mean over parents with tree children of |P Δ C| / |P ∪ C|: P the rows where the parent fires, C where any
    of its children does (0: the children fire exactly where the parent does)."""
    sibling_iou: float | None
    """Mean intersection-over-union of the firing rows of two children of one parent (0: mutually exclusive)."""
    sibling_pairs: int
    treesae_score: float | None
    """Tree SAE's hierarchy score: for the most frequent half of the latents as parents, each one's 5 children by
    binary masked cosine (P(p | c), children firing >= 100 times), the share of pairs with both decoder rows among
    the 5 nearest the child's detection direction (an LDA direction here, a logistic probe in the paper; every
    parent once, not a sample of 2,000)."""
    treesae_pairs: int
    tree_links_probe_share: float | None
    """The same Eq. 5 test on this SAE's own tree links."""
    rows: int
    """Rows the figures were measured on."""


@dataclass
class ActivationsAnalysis(Record):
    """`msae analyze RUN --activations FILE`: latent statistics and links on activations held in a file (a toy's
    sample, another model's rows), written to RUN/features/ as links.parquet and activations_analysis.json."""

    activations: InputFile
    """The file (path as given, content hash)."""
    rows: int
    d_sae: int
    widths: list[int]
    link_config: LinkConfig
    links: int
    """DAG links of link_config's criterion."""
    tree_links: int
    dead_fraction: float
    """Share of latents that never fire on the file's rows."""
    hierarchy_figures: HierarchyFigures
    link_validation: LinkValidation | None = None
    """Both criteria made on the even rows and measured on the odd ones (rows carry no contexts here)."""
    seconds: float | None = None


@dataclass
class CategoryResult(Record):
    """One WordNet category on one SAE (msae.analysis.taxbench)."""

    category: str
    """The synset's first lemma."""
    offset: int
    """Its WordNet offset."""
    members: int
    """Unambiguous member tokens with occurrences."""
    positives: int
    """Held-out occurrences of its members."""
    parent_latent: int
    """The latent that detects it best on the selection half (average precision)."""
    average_precision: float
    """That latent's average precision on the held-out half: parent recall, free of a threshold."""
    recall: float
    """Share of held-out member occurrences on which it fires."""
    absorption: float
    """Share of held-out member occurrences where it is silent and a member-specific latent fires instead."""
    member_latents: int
    """Latents specific to one member token (splitting)."""
    member_fired: float | None = None
    """Share of held-out member occurrences where a latent specific to the member's own token fires, whether or not
    the parent does: how much room absorption has (absorption / member_fired is the parent's silence where a member
    latent fires). None in results made before it was measured."""


@dataclass
class TaxonomyBenchSAE(Record):
    """The taxonomy benchmark's figures for one SAE."""

    name: str
    d_sae: int
    average_precision: Interval | None
    """Mean over categories of the parent latent's held-out average precision."""
    average_precision_per_width: list[float | None]
    """The same with only the first w latents, for every nested width w (a vanilla SAE: one entry)."""
    absorption: Interval | None
    member_latents: Interval | None
    """Member-specific latents per category."""
    labelled_latents: int
    """Latents whose best category reaches F1 >= LABEL_F1 on the occurrence pool."""
    link_precision: Interval | None
    """Tree links with both latents labelled whose parent's category is the child's or one of its ancestors."""
    link_null: Interval | None
    """The same with every parent replaced by a random labelled latent of the parent's group."""
    categories: list[CategoryResult] = field(default_factory=list)
    dag_link_precision: Interval | None = None
    """link_precision over every link of the DAG (a child with several linked parents counts each), not only the
    tree's one parent per child: more labelled pairs than the tree alone."""
    dag_link_null: Interval | None = None
    """Its null, as link_null."""
    member_fired: Interval | None = None
    """Mean over categories of CategoryResult.member_fired (None in results made before it was measured)."""
    absorption_given_member: Interval | None = None
    """Mean over the categories with member_fired > 0 of absorption / member_fired: where a member latent fires, the
    share of occurrences on which the parent is silent. Absorption separated from how many member latents there are."""


@dataclass
class TaxonomyBench(Record):
    """`msae taxonomy-bench`: WordNet categories as ground truth on the real model (RUN/hierarchy_bench.json)."""

    model: str
    layer: int
    taxonomy: str
    """The taxonomy file's source and tokenizer."""
    categories: int
    occurrences: int
    """Member-token rows in the pool (corpus occurrences, and template sentences for tokens the corpus lacks)."""
    from_templates: int
    background_rows: int
    """Random corpus rows in the pool as negatives."""
    ambiguous_tokens: int
    """Tokens left out as members of unrelated categories (polysemy)."""
    split: str
    saes: list[TaxonomyBenchSAE]
    differences: dict[str, Interval | None] = field(default_factory=dict)
    """Paired over categories, the run's SAE A against each other one B: "A - B average precision", "A - B absorption",
    "A - B member latents", "A - B member latent fires" and "A - B absorption where a member latent fires" (None where
    no category has a member latent firing in both; msae.analysis.taxbench.difference_key)."""
    seconds: float | None = None
    config: TaxonomyBenchConfig | None = None
    """Every size and threshold it used (None in results written before they were recorded)."""


@dataclass
class GalleryExample(Record):
    """One context of a gallery case: its tokens around the example token, and each column latent's activation on
    that token."""

    tokens: list[str]
    center: int
    """Index of the example token in `tokens`."""
    acts: list[float]
    """Per column of the case, its activation on the example token."""


@dataclass
class GalleryCase(Record):
    """A concrete splitting or absorption case mined from the benchmark and the links (msae.analysis.gallery)."""

    kind: str
    """absorption or splitting."""
    clean: bool
    """The case meets the kind's bar (see `why`); otherwise it is the closest one found."""
    why: str
    """What makes it clean, or what it lacks."""
    reading: str
    """One line on what the heatmap shows."""
    rows: list[str]
    """Heatmap rows: member or context tokens."""
    columns: list[str]
    """Heatmap columns: latents, as 'run #latent (role)'."""
    column_runs: list[str]
    column_latents: list[int]
    heatmap: list[list[float]]
    """rows × columns: the latent's mean activation over the row token's occurrences."""
    decoder_cos: list[list[float]]
    """columns × columns decoder cosines (within one run; across runs too, both read the same stream)."""
    examples: list[GalleryExample] = field(default_factory=list)


@dataclass
class Gallery(Record):
    """`msae gallery`: one case of each kind for a run and the runs it is compared with (RUN/gallery.json)."""

    model: str
    layer: int
    runs: dict[str, str]
    """Role (matryoshka, wide, narrow) -> run name."""
    cases: list[GalleryCase]
    missing: dict[str, str] = field(default_factory=dict)
    """Kind -> why no case of it could be looked for."""
    seconds: float | None = None
    config: GalleryConfig | None = None
    """The bars the cases were held to (None in a gallery.json written before they were saved)."""


@dataclass
class MatchingSummary(Record):
    """Decoder-cosine matching of two SAEs' latents (a = this run, b = the other)."""

    pairs: int
    """Matched pairs."""
    unmatched_a: int
    """Latents of a without a partner."""
    unmatched_b: int
    """Latents of b without a partner."""
    mean_cos: float | None
    """Mean decoder cosine of the pairs."""
    unmatched_a_alive: int | None = None
    """Live latents of a without a partner."""
    unmatched_b_alive: int | None = None
    """Live latents of b without a partner."""
    matched_per_group: list[int] | None = None
    """Matched latents per nested group of a (a Matryoshka SAE)."""
    matched_share_per_group: list[float] | None = None
    """The same as a share of each group."""


@dataclass
class AgainstSummary(Record):
    """This run against another on the same rows: splitting from the narrower to the wider, and matching."""

    narrow: Literal["this", "other"]
    """Which of the two is narrower (the parents of the links)."""
    this_d_sae: int
    """This run's width."""
    other_d_sae: int
    """The other's width."""
    other_widths: list[int]
    """The other's nested widths."""
    split_share_decoder: dict[str, float]
    """Share of the narrow SAE's live latents split into >= 2 wide ones, by decoder cosine threshold."""
    split_share_links: float
    """The same by activation links."""
    mean_coverage: float | None
    """Mean share of a narrow latent's firings its linked wide latents cover."""
    links: int
    """Links from the narrow SAE to the wide one."""
    matching: MatchingSummary
    """Decoder-cosine matching."""
    other_dead_fraction: float
    """Share of the other's latents that never fired on these rows."""


@dataclass
class StoreManifest(Record):
    """What a feature store holds (msae.analysis.store)."""

    format: int
    """Store format; a store of another format must be rebuilt."""
    run: str
    """The run's name."""
    model: str
    """The model of the activations."""
    layer: int
    """Its layer."""
    cache_id: str
    """The activation cache analysed (its directory name under the cache root)."""
    rows: int
    """Rows analysed."""
    max_norm: float | None
    """Rows above this norm were analysed as silent."""
    high_norm_rows_silenced: int
    """Rows analysed as silent for their norm (above max_norm)."""
    d_sae: int
    """The SAE's latents."""
    widths: list[int]
    """Nested widths."""
    k: int | None
    """Top-k's k."""
    activation: str
    """Activation rule."""
    l0_per_width: list[float]
    """Active latents per row within each nested width."""
    dead_fraction: float
    """Share of latents that never fired on these rows."""
    hist_edges: list[float]
    """Shared edges of the activation histograms."""
    store: StoreConfig
    """What the store keeps."""
    link_config: LinkConfig
    """How links were chosen."""
    timings_s: dict[str, float]
    """Seconds per stage."""
    hierarchy: HierarchySummary | None = None
    """Links across nested groups (Matryoshka runs)."""
    hierarchy_figures: HierarchyFigures | None = None
    """The literature's hierarchy figures (every SAE: a vanilla one gets Tree SAE's score and nothing else)."""
    link_validation: LinkValidation | None = None
    """Both link criteria validated on held-out rows (Matryoshka runs)."""
    splitting: dict[str, dict[str, float]] = field(default_factory=dict)
    """Per nested prefix: share of its live latents the full width splits into >= 2, by decoder cosine."""
    against: dict[str, AgainstSummary] = field(default_factory=dict)
    """By other run's name."""


# ------------------------------------------------------------------------------------------ toy comparison


@dataclass
class ToyMetrics(Record):
    """One SAE on a toy hierarchy with known features (msae.toy.evaluate)."""

    parent_absorption: float | None
    """Share of (parent, sample) pairs with the parent and a child present where the parent's latent is off."""
    parent_fires_alone: float | None
    """Share of samples with a parent and no child where the parent's latent fires."""
    parent_cosine: float | None
    """Mean decoder cosine of parents with their best latent."""
    child_cosine: float | None
    """The same for children."""
    child_fire_rate: float | None
    """Share of samples with a child present where its latent fires."""
    mean_cosine: float
    """Mean best decoder cosine over all features."""
    fvu: float
    """Fraction of variance unexplained."""
    l0: float
    """Active latents per sample."""
    dead_latents: int
    """Latents that never fired."""
    dead_fraction: float
    """Their share."""
    per_parent: dict[str, list[float | None]]
    """absorption and fires_alone per parent."""
    per_feature: dict[str, list[Any]]
    """latent, cosine and fire_rate per true feature."""


@dataclass
class TreeRecovery(Record):
    """How well a criterion's tree links recover a toy's true tree (msae.toy.tree_recovery)."""

    criterion: str
    matched_features: int
    """True features matched to a latent (Hungarian on decoder cosine, cosine >= min_cos)."""
    true_edges: int
    """Parent–child edges of the true tree."""
    predicted_edges: int
    """Tree links whose child latent is matched to a feature (the ones that can be judged)."""
    correct_edges: int
    """Of those, links between the latents of a true parent and its child."""
    precision: float | None
    recall: float | None
    f1: float | None
    best_f1: float | None
    """The F1 a perfect criterion would reach on this SAE: every true edge whose two features have latents."""
    min_cos: float


@dataclass
class ToyResult(Record):
    """A vanilla and a Matryoshka SAE trained on the same toy batches (msae.toy.compare)."""

    toy: dict[str, Any]
    """The toy's definition."""
    train: TrainConfig
    """The training settings."""
    train_seconds: float
    """Time to train both."""
    vanilla: ToyMetrics
    """The vanilla SAE."""
    matryoshka: ToyMetrics
    """The Matryoshka SAE."""
    tree_recovery: list[TreeRecovery] | None = None
    """The Matryoshka SAE's tree links against the true tree, per criterion."""
    out: str | None = None
    """Where the runs were kept (None: a temporary directory)."""
    preset: str | None = None
    """The preset's name."""
