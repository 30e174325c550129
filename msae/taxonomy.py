"""A ground-truth hierarchy a 135M model has: WordNet's noun taxonomy, as sets of single-token words.

Parsed straight from WordNet's `data.noun` (Debian's `wordnet-base` installs it in /usr/share/wordnet; it has no
`lexnames` file for NLTK). Each synset becomes the set of vocabulary tokens of its own lemmas and of every lemma
below it (hyponyms through `@` and `@i` pointers, read upwards), the way Park et al. (ICLR 2025) built theirs: a
lemma counts in any of its single-token forms — with a leading space, capitalised, plural. Synsets with at least
`min_tokens` such tokens are categories. The derived taxonomy ships as JSON (assets/taxonomy/, with WordNet's
licence), so the benchmark runs where apt does not; `build_taxonomy` makes it again from the package."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from msae.lm import same_model
from msae.records import Record, RecordError

DATA_NOUN = Path("/usr/share/wordnet/data.noun")
SHIPPED = Path(__file__).resolve().parents[1] / "assets" / "taxonomy" / "smollm2-135m-wordnet.json"
"""The taxonomy built for SmolLM2's vocabulary, shipped so the benchmark runs where apt does not."""
HYPERNYM_POINTERS = ("@", "@i")
"""Hypernym and instance hypernym: the edges from a synset up to its parents."""


class TaxonomyError(ValueError):
    """WordNet's files are missing or not in the format expected; the message names the file and the line."""


@dataclass
class Synset:
    """One noun synset of data.noun."""

    offset: int
    """Its byte offset: WordNet's id."""
    lemmas: list[str]
    """Its words, underscores as spaces."""
    hypernyms: list[int]
    """Offsets of its parents (`@`, `@i`)."""
    gloss: str
    """Its definition."""


def parse_data_noun(lines: Iterable[str], where: str = "data.noun") -> dict[int, Synset]:
    """The synsets of data.noun's lines (the licence header, lines starting with spaces, is skipped).

    A line: offset lex_filenum ss_type w_cnt(hex) [word lex_id]... p_cnt [symbol offset pos source/target]... | gloss"""
    synsets = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip() or line.startswith(" "):
            continue
        head, _, gloss = line.partition(" | ")
        fields = head.split()
        try:
            offset, n_words = int(fields[0]), int(fields[3], 16)
            words = fields[4 : 4 + 2 * n_words : 2]
            at = 4 + 2 * n_words
            n_pointers = int(fields[at])
            pointers = [fields[at + 1 + 4 * i : at + 5 + 4 * i] for i in range(n_pointers)]
        except (IndexError, ValueError):
            raise TaxonomyError(f"{where}: line {number} is not a data.noun synset line") from None
        hypernyms = [int(p[1]) for p in pointers if p[0] in HYPERNYM_POINTERS and p[2] == "n"]
        lemmas = [re.sub(r"\(.*\)$", "", w).replace("_", " ") for w in words]  # "nap(a)" markers dropped
        synsets[offset] = Synset(offset, lemmas, hypernyms, gloss.strip())
    return synsets


def word_forms(lemma: str) -> list[str]:
    """The forms of a one-word lemma looked for in the vocabulary: with a leading space, capitalised, plural."""
    if " " in lemma or not lemma.isalpha():
        return []
    plural = lemma + ("es" if lemma.endswith(("s", "x", "z", "ch", "sh")) else "s")
    forms = {lemma, lemma.capitalize(), plural, plural.capitalize()}
    return sorted(" " + f for f in forms)


def single_token_ids(tokenizer, lemmas: Iterable[str]) -> dict[int, str]:
    """Vocabulary tokens that are, on their own, one form of one of `lemmas` (token id -> its text)."""
    found = {}
    for lemma in lemmas:
        for form in word_forms(lemma):
            ids = tokenizer(form, add_special_tokens=False)["input_ids"]
            if len(ids) == 1:
                found[ids[0]] = form
    return found


@dataclass
class Category(Record):
    """A synset with at least `min_tokens` single-token words at or below it."""

    offset: int
    """WordNet's id."""
    name: str
    """Its first lemma."""
    gloss: str
    """Its definition."""
    parents: list[int]
    """Offsets of its nearest ancestors that are categories too (the taxonomy's edges)."""
    size: int
    """Tokens at or below it (its member set's size)."""
    tokens: list[int]
    """The token ids it adds to its child categories' (its own lemmas and those of hyponyms that are not
    categories): its members are these and its child categories' members (`Taxonomy.members`)."""


@dataclass
class Taxonomy(Record):
    """WordNet noun categories as token sets for one tokenizer."""

    tokenizer: str
    """Whose vocabulary (the model's name)."""
    source: str
    """Where it was built from."""
    min_tokens: int
    """Smallest category kept."""
    categories: list[Category] = field(default_factory=list)
    """Largest first."""

    def members(self) -> dict[int, set[int]]:
        """Every category's token ids: its own and, recursively, its child categories'."""
        children = defaultdict(list)
        for c in self.categories:
            for p in c.parents:
                children[p].append(c.offset)
        own = {c.offset: c.tokens for c in self.categories}
        out: dict[int, set[int]] = {}

        def collect(offset: int) -> set[int]:
            if offset not in out:
                out[offset] = set(own[offset]).union(*(collect(ch) for ch in children[offset]))
            return out[offset]

        for offset in own:
            collect(offset)
        return out

    def ancestors(self) -> dict[int, set[int]]:
        """Every category's ancestors among the categories (transitively)."""
        parents = {c.offset: c.parents for c in self.categories}
        out: dict[int, set[int]] = {}

        def up(offset: int) -> set[int]:
            if offset not in out:
                out[offset] = set()
                for p in parents.get(offset, []):
                    out[offset] |= {p} | up(p)
            return out[offset]

        for offset in parents:
            up(offset)
        return out


def build_taxonomy(synsets: dict[int, Synset], tokenizer, tokenizer_name: str, min_tokens: int = 5,
                   source: str = str(DATA_NOUN)) -> Taxonomy:
    """The categories of `synsets` with at least `min_tokens` single-token words below them, and the edges between
    them (each category's nearest category ancestors)."""
    own = {o: single_token_ids(tokenizer, s.lemmas) for o, s in synsets.items()}
    children = defaultdict(list)
    for s in synsets.values():
        for h in s.hypernyms:
            children[h].append(s.offset)
    below: dict[int, dict[int, str]] = {}

    def collect(offset: int) -> dict[int, str]:
        if offset not in below:
            below[offset] = {}  # a cycle (none in WordNet 3.0) would stop here
            tokens = dict(own[offset])
            for child in children[offset]:
                tokens.update(collect(child))
            below[offset] = tokens
        return below[offset]

    import sys

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10_000))  # the noun hierarchy is about 20 deep, but wide recursion adds up
    try:
        for offset in synsets:
            collect(offset)
    finally:
        sys.setrecursionlimit(limit)
    kept = {o for o, tokens in below.items() if len(tokens) >= min_tokens}

    def nearest(offset: int, seen: set[int]) -> list[int]:
        found = []
        for h in synsets[offset].hypernyms:
            if h in seen or h not in synsets:
                continue
            seen.add(h)
            found += [h] if h in kept else nearest(h, seen)
        return found

    parents = {o: sorted(set(nearest(o, set()))) for o in kept}
    child_categories = defaultdict(list)
    for o, ps in parents.items():
        for p in ps:
            child_categories[p].append(o)
    categories = []
    for o in sorted(kept, key=lambda o: (-len(below[o]), o)):
        inherited = set().union(*(below[c] for c in child_categories[o]))
        categories.append(Category(o, synsets[o].lemmas[0], synsets[o].gloss, parents[o], len(below[o]),
                                   sorted(set(below[o]) - inherited)))
    return Taxonomy(tokenizer_name, source, min_tokens, categories)


def write_taxonomy(taxonomy: Taxonomy, path: Path) -> None:
    """Save compact JSON (about 1.4 MB for SmolLM2's vocabulary), atomically."""
    from msae.io import atomic_write_text

    atomic_write_text(path, json.dumps(taxonomy.to_json(), separators=(",", ":")) + "\n")


def read_data_noun(path: Path = DATA_NOUN) -> dict[int, Synset]:
    """The synsets of a data.noun file."""
    if path.is_dir():
        raise TaxonomyError(f"{path}: a directory, not WordNet's data.noun file")
    if not path.is_file():
        raise TaxonomyError(f"{path}: missing (Debian's package wordnet-base installs it: apt-get install wordnet-base)")
    with open(path, encoding="utf-8", errors="replace") as f:
        return parse_data_noun(f, str(path))


def is_taxonomy_file(path: Path) -> bool:
    """`path` holds a taxonomy JSON (what `msae taxonomy` may replace)."""
    try:
        load_taxonomy(path)
    except (OSError, TaxonomyError):
        return False
    return True


def load_taxonomy(path: Path | str = SHIPPED, model: str | None = None) -> Taxonomy:
    """A taxonomy JSON (`msae taxonomy` writes one); with `model`, refused unless built for that model's
    tokenizer (token ids mean nothing in another vocabulary), whichever name it goes by (msae.lm.same_model)."""
    path = Path(path)
    if path.is_dir():
        raise TaxonomyError(f"{path}: a directory, not a taxonomy JSON (msae taxonomy --model MODEL --out FILE makes one)")
    if not path.is_file():
        raise TaxonomyError(f"{path}: no such taxonomy file (msae taxonomy --model MODEL --out FILE makes one)")
    try:
        tax = Taxonomy.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, RecordError) as exc:
        raise TaxonomyError(f"{path}: not a taxonomy JSON ({exc})") from None
    if model is not None and not same_model(tax.tokenizer, model):
        raise TaxonomyError(f"{path} holds token ids of {tax.tokenizer!r}'s vocabulary, not {model!r}'s; make one "
                            f"with `msae taxonomy --model {model} --out FILE` and pass it with --taxonomy FILE")
    return tax
