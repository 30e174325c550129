"""The named corpora's parts: one reader per format on a small sample of it, the `large` corpus (dedup,
interleaving, missing parts), its provenance, and `msae corpus --info`. Nothing here needs the Debian packages;
the checks on the installed packages skip where they are absent."""

import gzip
import struct
import zlib
from itertools import islice
from pathlib import Path

import pytest

from msae import corpus as corpus_mod
from msae import markup
from msae.activations import _corpus_fingerprint, corpus_provenance
from msae.cli import main as cli_main
from msae.corpus import BuiltinSource, CorpusError


def _b64(n: int) -> str:
    digits = ""
    while True:
        digits = markup._B64[n % 64] + digits
        n //= 64
        if n == 0:
            return digits


def write_dictd(folder: Path, name: str, entries: list[tuple[list[str], str]]) -> None:
    """NAME.index and NAME.dict.dz as dictfmt writes them: entries in order, each under one or more headwords."""
    data, index = b"", []
    for headwords, text in entries:
        raw = text.encode()
        index += [f"{h}\t{_b64(len(data))}\t{_b64(len(raw))}" for h in headwords]
        data += raw
    (folder / f"{name}.index").write_text("\n".join(sorted(index)) + "\n")
    (folder / f"{name}.dict.dz").write_bytes(gzip.compress(data))


GCIDE_SAMPLE = [
    (["00-database-info", "00-gcide-info"], "00-database-info\n   This file was converted from the original database.\n\n"),
    (["Affect", "affect"], 'Affect \\Af*fect"\\, v. t. [L. affectus. See {Fact}.]\n   1. To act upon; to produce\n'
     '      an effect or change upon.\n      [1913 Webster]\n\n            As might affect the earth with cold heat.\n'
     '            --Milton.\n      [1913 Webster]\n\n'),
    (["Cornet"], 'Cornet \\Cor"net\\ (k?r"n?t), n. A musical instrument of the trumpet class.\n   [1913 Webster]\n\n'),
]


def test_dictd_entries_read_once_in_order_without_markup(tmp_path):
    write_dictd(tmp_path, "gcide", GCIDE_SAMPLE)
    source = BuiltinSource("gcide", "dict-gcide", "gcide.index", "test", system=str(tmp_path), format="dictd")
    assert source.files() == [tmp_path / "gcide.index", tmp_path / "gcide.dict.dz"]
    docs = list(corpus_mod.source_documents(source))
    assert len(docs) == 1 and docs[0].source == "gcide:Affect"
    text = docs[0].text
    assert text.startswith("Affect, v. t. [L. affectus. See Fact.] 1. To act upon; to produce an effect or change upon.")
    assert "As might affect the earth with cold heat. --Milton." in text
    assert "Cornet, n. A musical instrument" in text
    for markup_left in ("[1913 Webster]", "\\", "{", "k?r", "database", "  "):
        assert markup_left not in text
    assert text.count("Affect,") == 1, "an entry under two headwords is read once"


def test_dictd_entries_group_into_documents_of_a_few_thousand_characters(tmp_path):
    entries = [([f"word{i:03d}"], f"word{i:03d} n. " + "A plain definition of some length. " * 10 + "\n\n")
               for i in range(100)]
    write_dictd(tmp_path, "devil", entries)
    source = BuiltinSource("devils-dictionary", "dict-devil", "devil.index", "test", system=str(tmp_path), format="dictd")
    docs = list(corpus_mod.source_documents(source))
    assert 2 <= len(docs) <= 100 * 360 // corpus_mod.DICT_DOCUMENT_CHARS + 1
    assert all(len(d.text) >= corpus_mod.DICT_DOCUMENT_CHARS for d in docs[:-1])
    assert sum(d.text.count("A plain definition") for d in docs) == 1000


OSIS_BOOK = (
    '<div osisID="Gen" type="book"/> <title level="1" type="main">The First Book of Moses</title>'
    '<chapter n="1" osisID="Gen.1" sID="Gen.1"/> In the <w lemma="strong:H7225">beginning</w> God created the heaven.'
    '<note placement="foot"><reference type="annotateRef">1.4 </reference>Heb. between</note>'
    '<div sID="gen4" type="x-p"/>And God said, Let there be light: and there was light.<chapter eID="Gen.1"/>'
    '<chapter n="2" osisID="Gen.2" sID="Gen.2"/>Thus the heavens and the earth were finished.<chapter eID="Gen.2"/>'
)


def write_ztext(folder: Path, testament: str, books: list[str]) -> None:
    index, blocks = b"", b""
    for book in books:
        raw = book.encode()
        packed = zlib.compress(raw)
        index += struct.pack("<III", len(blocks), len(packed), len(raw))
        blocks += packed
    (folder / f"{testament}.bzs").write_bytes(index)
    (folder / f"{testament}.bzz").write_bytes(blocks)
    (folder / f"{testament}.bzv").write_bytes(b"")


def test_sword_ztext_reads_one_document_a_chapter_old_testament_first(tmp_path):
    module = tmp_path / "modules" / "kjv"
    module.mkdir(parents=True)
    write_ztext(module, "ot", ['<milestone type="x-importer"/>', OSIS_BOOK])
    write_ztext(module, "nt", ['<chapter n="1" osisID="Matt.1" sID="Matt.1"/>The book of the generation.'])
    source = BuiltinSource("kjv", "sword-text-kjv", "modules/kjv/*.bz[sz]", "test", system=str(tmp_path), format="sword")
    docs = list(corpus_mod.source_documents(source))
    assert [d.source for d in docs] == ["kjv:Gen.1", "kjv:Gen.2", "kjv:Matt.1"]
    assert docs[0].text == "In the beginning God created the heaven.\nAnd God said, Let there be light: and there was light."
    assert docs[1].text == "Thus the heavens and the earth were finished."


def test_html_text_keeps_the_page_and_drops_navigation():
    page = """<html><head><title>T</title><style>p {color: red}</style></head><body>
    <div id="banner"><a>Download the ebook</a></div><ul class="docnav top"><li>Prev</li><li>Next</li></ul>
    <div class="navheader">Chapter 3 nav</div><script>var x = 1;</script>
    <h2>12.3. Automated   Installation</h2><div class="para">The Falcot Corp
    administrators need tools &amp; more.</div><pre>apt install fai
    fai-setup</pre><p>Done.</p></body></html>"""
    assert markup.html_text(page) == ("12.3. Automated Installation\nThe Falcot Corp administrators need tools & more.\n"
                                      "apt install fai\n    fai-setup\nDone.")


def test_rst_text_reduces_sphinx_markup_to_text():
    source = """.. _built-in-funcs:

Built-in Functions
==================

.. index:: builtin

   single: functions

The interpreter has :func:`abs` and :class:`~collections.deque` (see `the docs <https://x.org>`_).
+------+
| A    |
+------+

.. function:: abs(x)
   :noindex:

   Return the ``absolute`` value of a **number**::

      >>> abs(-2)
      2

   .. versionadded:: 3.2
"""
    text = markup.rst_text(source)
    assert text.startswith("Built-in Functions\n\nThe interpreter has abs and collections.deque (see the docs).")
    assert "abs(x)\n\n   Return the absolute value of a number:\n\n      >>> abs(-2)" in text
    assert text.endswith("New in version 3.2.")
    for markup_left in ("..", "===", ":func:", "``", "single:", "+---", ":noindex:"):
        assert markup_left not in text


def test_pod_text_reduces_formatting_codes():
    source = """=pod

=encoding utf8

=head1 NAME

perlintro - a brief introduction

=head1 DESCRIPTION

You are I<strongly> advised to read L<perltoc> and L<the FAQ|perlfaq>; C<< $x->y >> is E<lt>ok E<075> fineE<gt>.
X<index entry>See
F</etc/perl>.

    my $verbatim = 1;

=over 4

=item * First point

=back

=begin html

<p>dropped</p>

=end html

=cut
"""
    assert markup.pod_text(source) == (
        "NAME\nperlintro - a brief introduction\nDESCRIPTION\n"
        "You are strongly advised to read perltoc and the FAQ; $x->y is <ok = fine>. See /etc/perl.\n"
        "    my $verbatim = 1;\nFirst point")


def test_roff_text_renders_man_macros():
    source = r""".\" Copyright comment
.TH OPEN 2 2023-02-05 "Linux man-pages 6.03"
.SH NAME
open, creat \- open and possibly create a file
.SH SYNOPSIS
.nf
.B #include <fcntl.h>
.BI "int open(const char *" pathname ", int " flags );
.fi
.SH DESCRIPTION
The
.BR open ()
system call opens the file specified by
.IR pathname .
It returns \fBa file descriptor\fP \(em a small integer.
.TS
tab(:);
l l.
Interface:Attribute
.TE
.PP
See \fIclose\fR(2).
"""
    assert markup.roff_text(source) == (
        "NAME\nopen, creat - open and possibly create a file\nSYNOPSIS\n#include <fcntl.h>\n"
        "int open(const char *pathname, int flags);\nDESCRIPTION\n"
        "The open() system call opens the file specified by pathname. It returns a file descriptor \u2014 a small integer.\n"
        "See close(2).")


def test_wordnet_rest_is_the_complement_of_builtins_quarter(tmp_path):
    lines = (Path(__file__).parent / "fixtures" / "data.noun.sample").read_text().splitlines()
    (tmp_path / "data.noun").write_text("\n".join(lines) + "\n")
    quarter = BuiltinSource("wordnet-noun", "wordnet-base", "data.noun", "t", system=str(tmp_path))
    rest = BuiltinSource("wordnet-rest", "wordnet-base", "data.*", "t", system=str(tmp_path), format="wordnet-rest")
    groups = [d.text for d in corpus_mod._wordnet_groups(tmp_path / "data.noun", "x")]
    got_quarter = [d.text for d in corpus_mod.source_documents(quarter)]
    got_rest = [d.text for d in corpus_mod.source_documents(rest)]
    assert sorted(got_quarter + got_rest) == sorted(groups) and not set(got_quarter) & set(got_rest)


@pytest.fixture
def small_large(tmp_path, monkeypatch):
    """`large` made of Python's doc topics (builtin's only part here), two dictionaries, a third that repeats the
    first one's document and a part whose package is not installed."""
    write_dictd(tmp_path, "gcide", GCIDE_SAMPLE)
    write_dictd(tmp_path, "jargon", [(["cookie"], "cookie n.\n   A handle.\n\n")])
    write_dictd(tmp_path, "foldoc", GCIDE_SAMPLE)
    python_docs = next(s for s in corpus_mod.BUILTIN_SOURCES if s.name == "python-docs")
    extra = (
        BuiltinSource("gcide", "dict-gcide", "gcide.index", "dictionary", system=str(tmp_path), licence="GPL-2+", format="dictd"),
        BuiltinSource("jargon", "dict-jargon", "jargon.index", "slang", system=str(tmp_path), licence="public domain",
                      format="dictd"),
        BuiltinSource("foldoc", "dict-foldoc", "foldoc.index", "computing", system=str(tmp_path), licence="GFDL-1.1+",
                      format="dictd"),
        BuiltinSource("kjv", "sword-text-kjv", "none/*.bzs", "bible", system=str(tmp_path / "absent"), format="sword"),
    )
    monkeypatch.setattr(corpus_mod, "BUILTIN_SOURCES", (python_docs,))
    monkeypatch.setattr(corpus_mod, "LARGE_EXTRA_SOURCES", extra)
    monkeypatch.setattr(corpus_mod, "LARGE_PARTS", ("kjv", "gcide", "jargon", "foldoc", "python-docs"))
    return extra


def test_large_holds_builtin_and_the_installed_parts_each_document_once(small_large):
    assert [s.name for s in corpus_mod.corpus_sources("large")] == ["kjv", "gcide", "jargon", "foldoc", "python-docs"]
    assert [s.name for s in corpus_mod.present_sources("large")] == ["gcide", "jargon", "foldoc", "python-docs"]
    docs = list(corpus_mod.documents("large"))
    parts = [corpus_mod.part_of(d) for d in docs]
    assert set(parts) == {"gcide", "jargon", "python-docs"}, "foldoc's only document is gcide's: read once"
    texts = [d.text for d in docs]
    assert len(texts) == len(set(texts))
    jargon = [d for d in docs if corpus_mod.part_of(d) == "jargon"]
    assert len(jargon) == 1 and jargon[0].text == "cookie n. A handle."
    assert parts.index("python-docs") < len(parts) // 2, "parts are interleaved, not read one after another"
    first_of_each = {}
    for doc in corpus_mod.documents("builtin"):
        first_of_each.setdefault(doc.text, doc.source)
    assert list(first_of_each.values()) == [d.source for d in docs if d.source.startswith("python-docs")], (
        "builtin's documents, those whose text an earlier one has left out")
    with pytest.raises(CorpusError, match="no built-in corpus named 'huge'"):
        corpus_mod.corpus_sources("huge")


def test_missing_parts_are_skipped_with_a_note_and_refused_when_read(small_large):
    note = corpus_mod.missing_note("large")
    assert note == "corpus 'large' without kjv (apt install sword-text-kjv adds them)"
    assert corpus_mod.missing_note("builtin") is None
    with pytest.raises(CorpusError, match="needs the Debian package sword-text-kjv"):
        list(corpus_mod.source_documents(small_large[3]))


def test_large_is_recorded_by_name_and_content(small_large, tmp_path):
    info = corpus_provenance("large")
    assert info.kind == "large" and [s.name for s in info.sources] == ["gcide", "jargon", "foldoc", "python-docs"]
    fingerprint = _corpus_fingerprint(info)
    assert fingerprint.startswith("large:gcide=")
    assert _corpus_fingerprint(corpus_provenance("builtin")).startswith("builtin:python-docs=")
    write_dictd(tmp_path, "jargon", [(["cookie"], "cookie n.\n   A changed handle.\n\n")])
    assert _corpus_fingerprint(corpus_provenance("large")) != fingerprint, "changed text, new cache"


def test_builtin_keeps_its_parts():
    assert [s.name for s in corpus_mod.BUILTIN_SOURCES] == [
        "wikipedia", "news", "python-docs", "wordnet-noun", "wordnet-verb", "wordnet-adj", "wordnet-adv"]
    large = [s.name for s in corpus_mod.corpus_sources("large")]
    assert set(large) >= {s.name for s in corpus_mod.BUILTIN_SOURCES} and "fortune" not in " ".join(large)
    assert all(s.licence for s in corpus_mod.corpus_sources("large")), "every part states its licence"


def test_corpus_info_lists_licence_and_tokens(small_large, capsys):
    assert cli_main(["corpus", "--info"]) == 0
    out = capsys.readouterr().out
    assert "gcide: dictionary  1 documents, " in out and "licence: GPL-2+; in: large" in out
    assert "licence: PSF-2.0; in: builtin, large" in out
    assert "jargon: slang  1 documents" in out and "foldoc: computing  0 documents, 0 tokens" in out, "no copy counted"
    assert "total builtin: " in out and "total large: " in out
    assert "note: corpus 'large' without kjv (apt install sword-text-kjv adds them)" in out


@pytest.mark.parametrize("source", corpus_mod.LARGE_EXTRA_SOURCES, ids=lambda s: s.name)
def test_installed_parts_read_as_plain_text(source):
    if source.path() is None:
        pytest.skip(f"Debian package {source.package} is not installed (make corpus installs it as root with apt)")
    docs = list(islice(corpus_mod.source_documents(source), 20))
    assert docs and all(d.text.strip() and corpus_mod.part_of(d) == source.name for d in docs)
    text = "\n".join(d.text for d in docs)
    for markup_left in ("<div", "</p>", "\\fB", "=head1", ":func:`", "[1913 Webster]", 'lemma="strong'):
        assert markup_left not in text, f"{source.name}: {markup_left!r} left in the text"


def test_a_part_read_from_a_package_file_list_needs_its_files(tmp_path):
    """perl-doc removed leaves its file list (config-files) and other packages' .pod files in the same folder: the
    part is absent, not read from what happens to be there."""
    page = tmp_path / "usr/share/man/man7/x.7.gz"
    listing = tmp_path / "manpages.list"
    listing.write_text(f"/usr/share/man/man7/gone.7.gz\n{page}\n")
    source = BuiltinSource("man-pages", "manpages", "manpages.list", "t", system=str(tmp_path), format="man")
    assert source.files() == [] and source.path() is None
    assert corpus_mod._package_files(listing, r"/usr/share/man/man\w+/[^/]+\.gz") == []
    if Path("/var/lib/dpkg/info/manpages-dev.list").is_file():
        pages = corpus_mod._package_files(Path("/var/lib/dpkg/info/manpages-dev.list"), corpus_mod._LISTED["man"])
        assert pages and all(p.suffix == ".gz" and "/man" in str(p) and not p.is_symlink() for p in pages)
