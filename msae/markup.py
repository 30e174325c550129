"""Plain text from the markup that documentation packages ship: dictd dictionaries, HTML, reStructuredText, POD,
man-page roff and SWORD's OSIS Bible text. Each function takes one file's (or entry's) text and returns prose;
what a reader cannot use (navigation, tables, index entries, formatting requests) is dropped."""

from __future__ import annotations

import html
import re
from html.parser import HTMLParser

_SPACES = re.compile(r"[ \t\r\f\v]+")


def reflow(paragraph: str) -> str:
    """One line of text from a filled paragraph (line breaks and indentation become single spaces)."""
    return _SPACES.sub(" ", paragraph.replace("\n", " ")).strip()


def _paragraphs(lines: list[str]) -> str:
    """Filled paragraphs (blank-line separated) reflowed, joined by newlines."""
    out, current = [], []
    for line in lines + [""]:
        if line.strip():
            current.append(line)
        elif current:
            out.append(reflow("\n".join(current)))
            current = []
    return "\n".join(out)


# --- dictd (.index + .dict.dz) ---------------------------------------------------------------------------------

_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def dictd_number(text: str) -> int:
    """A dictd index number (offset or length): base-64 digits, most significant first."""
    value = 0
    for char in text:
        value = value * 64 + _B64.index(char)
    return value


_SOURCE_LINE = re.compile(r"^\s*\[[^\]\n]{2,40}\]\s*$", re.M)  # "[1913 Webster]", "[PJC]", "[WordNet 1.5]"
_SOURCE_TAG = re.compile(r"\s*\[[^\]\n]*(?:Webster|WordNet|PJC|Century)[^\]\n]*\]")  # the same after text
_ACCENTED = re.compile(r"\[[=`'~.\"-]([a-zA-Z])\]|\[([a-zA-Z])\^\]")  # GCIDE's ASCII accents: [=a], ['e], [i^]
_GCIDE_SYMBOLS = {"[ae]": "\u00e6", "[oe]": "\u0153", "[aum]": "\u00e4", "[imac]": "\u012b", "[sect]": "\u00a7",
                  "[root]": "\u221a", "[eth]": "\u00f0", "[thorn]": "\u00fe"}
_SYMBOL = re.compile("|".join(re.escape(k) for k in _GCIDE_SYMBOLS))
_PRONUNCIATION = re.compile(r"\\[^\\\n]{1,80}\\")
_CROSS_REF = re.compile(r"\{([^{}\n]*)\}")
_LOST_PRONUNCIATION = re.compile(r" ?\([^()\s]*\?[^()\s]*\)")  # "(k?r\"n?t)": IPA lost to '?' in conversion
_SPACE_COMMA = re.compile(r"\s+,")


def dictd_entry_text(entry: str) -> str:
    """A dictionary entry as prose: source tags ("[1913 Webster]") and the headword's pronunciation
    (`\\Af*fect"\\`) dropped, GCIDE's ASCII accents ("['e]") as the plain letter, cross-reference braces removed,
    paragraphs reflowed."""
    head, _, body = entry.partition("\n")
    head = _PRONUNCIATION.sub("", head, count=1)
    text = _SOURCE_TAG.sub("", _SOURCE_LINE.sub("", head + "\n" + body))
    text = _SYMBOL.sub(lambda m: _GCIDE_SYMBOLS[m.group(0)], _ACCENTED.sub(lambda m: m.group(1) or m.group(2), text))
    text = _CROSS_REF.sub(r"\1", text)
    text = _SPACE_COMMA.sub(",", _LOST_PRONUNCIATION.sub("", text))
    return _paragraphs(text.split("\n"))


# --- HTML ------------------------------------------------------------------------------------------------------

_BLOCK_TAGS = {"p", "div", "br", "li", "dt", "dd", "tr", "pre", "h1", "h2", "h3", "h4", "h5", "h6", "table",
               "ul", "ol", "dl", "blockquote", "section", "title", "td", "th"}
_SKIP_TAGS = {"script", "style", "head", "nav", "footer", "header"}
_SKIP_CLASSES = {"navheader", "navfooter", "toc", "sphinxsidebar", "related", "footer", "breadcrumbs",
                 "headerlink", "skip-link", "legalnotice", "docnav"}
_SKIP_IDS = {"banner", "title"}


class _TextParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.chunks: list[str] = []
        self.skip_tag: str | None = None
        self.skip_depth = 0
        self.pre = 0

    def handle_starttag(self, tag, attrs):
        if self.skip_tag is not None:
            self.skip_depth += tag == self.skip_tag
            return
        attrs = dict(attrs)
        classes = set((attrs.get("class") or "").split())
        if tag in _SKIP_TAGS or classes & _SKIP_CLASSES or attrs.get("id") in _SKIP_IDS:
            self.skip_tag, self.skip_depth = tag, 1
            return
        if tag == "pre":
            self.pre += 1
        if tag in _BLOCK_TAGS:
            self.chunks.append("\n\n")

    def handle_endtag(self, tag):
        if self.skip_tag is not None:
            if tag == self.skip_tag:
                self.skip_depth -= 1
                if self.skip_depth == 0:
                    self.skip_tag = None
            return
        if tag == "pre" and self.pre:
            self.pre -= 1
        if tag in _BLOCK_TAGS:
            self.chunks.append("\n\n")

    def handle_data(self, data):
        if self.skip_tag is None:
            self.chunks.append(data.replace("\n", "\v") if self.pre else _SPACES.sub(" ", data.replace("\n", " ")))


def html_text(page: str) -> str:
    """The readable text of an HTML page: scripts, styles, head and navigation dropped; block elements become
    paragraphs, <pre> keeps its lines."""
    parser = _TextParser()
    parser.feed(page)
    parser.close()
    blocks = (b.strip(" ") for b in "".join(parser.chunks).split("\n\n"))
    return "\n".join(b.replace("\v", "\n") for b in blocks if b.strip(" \v"))


# --- reStructuredText (Sphinx sources) -----------------------------------------------------------------------

_RST_DIRECTIVE = re.compile(r"^(\s*)\.\.\s+([\w:-]+)::\s*(.*)$")
_RST_COMMENT = re.compile(r"^(\s*)\.\.(\s|$)")
_RST_OPTION = re.compile(r"^\s+:[\w -]+:(\s.*)?$")
_RST_UNDERLINE = re.compile(r"^([=\-~^\"'`#*+.<>_:])\1{2,}\s*$")
_RST_TABLE = re.compile(r"^\s*(\+[-=+]+\+|\|.*\|)\s*$")
_RST_ROLE = re.compile(r":[\w:.-]+:`(?:([^`<]*?)\s*<[^`>]*>|[~!]?([^`]*))`")
_RST_LINK = re.compile(r"`([^`<]+?)\s*(?:<[^`>]*>)?`__?")
_RST_LITERAL = re.compile(r"``(.+?)``")
_RST_STRONG = re.compile(r"\*\*([^*\n]+)\*\*")
_RST_VERSION = {"versionadded": "New in version {}.", "versionchanged": "Changed in version {}.",
                "deprecated": "Deprecated since version {}."}
_RST_DROP = {"index", "toctree", "image", "figure", "highlight", "highlightlang", "literalinclude", "include",
             "sectionauthor", "moduleauthor", "raw", "only", "tabularcolumns", "testsetup", "testcleanup",
             "productionlist", "csv-table", "list-table", "table", "audit-event", "availability", "impl-detail"}


def rst_text(source: str) -> str:
    """Prose (and the code examples) of a reStructuredText page: directives become their argument (a function's
    signature, "New in version 3.2."), labels, comments, index entries, option lines, heading underlines and
    tables dropped, roles and literals reduced to their text."""
    out: list[str] = []
    dropping: int | None = None  # indentation of a dropped directive or comment whose indented block we skip
    after_directive = False
    for line in source.splitlines():
        indent = len(line) - len(line.lstrip())
        if dropping is not None:
            if not line.strip() or indent > dropping:
                continue
            dropping = None
        if after_directive and _RST_OPTION.match(line):
            continue
        after_directive = False
        directive = _RST_DIRECTIVE.match(line)
        if directive:
            name, argument = directive.group(2).split(":")[-1], directive.group(3).strip()
            if name in _RST_DROP or directive.group(3).startswith("|"):
                dropping = indent
            elif name in _RST_VERSION:
                out.append(line[:indent] + _RST_VERSION[name].format(argument))
                after_directive = True
            else:
                out.append(line[:indent] + argument)
                after_directive = True
            continue
        if _RST_COMMENT.match(line):
            dropping = indent
            continue
        if _RST_UNDERLINE.match(line) or _RST_TABLE.match(line) or line.strip() == "::":
            continue
        line = _RST_ROLE.sub(lambda m: m.group(1) if m.group(1) is not None else m.group(2), line)
        line = _RST_LITERAL.sub(r"\1", line)
        line = _RST_LINK.sub(r"\1", line)
        line = _RST_STRONG.sub(r"\1", line)
        if line.endswith("::"):
            line = line[:-1]
        out.append(line.rstrip())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip()


# --- POD (Perl's documentation) -------------------------------------------------------------------------------

_POD_CODE = re.compile(r"([A-Z])<([^<>]*)>")
_POD_DOUBLE = re.compile(r"([A-Z])<{2,}\s+(.*?)\s+>{2,}", re.S)
_POD_ESCAPES = {"lt": "<", "gt": ">", "verbar": "|", "sol": "/"}


def _pod_code(match: re.Match) -> str:
    code, inner = match.group(1), match.group(2)
    if code in "XZ":
        return ""
    if code == "E":
        if inner in _POD_ESCAPES:
            return _POD_ESCAPES[inner]
        if inner[:1].isdigit():  # E<0x263A> hex, E<075> octal, E<61> decimal
            base = 16 if inner.lower().startswith("0x") else 8 if inner.startswith("0") and len(inner) > 1 else 10
            try:
                return chr(int(inner, base))
            except ValueError:
                return ""
        return html.unescape(f"&{inner};")
    if code == "L":
        text, bar, target = inner.partition("|")
        return text if bar else inner.replace('/"', " ").replace('"', "")
    return inner


def pod_text(source: str) -> str:
    """Prose of a POD page: headings and items kept as text, formatting codes reduced to their text, verbatim
    (indented) paragraphs kept as they are, =begin/=end blocks, =for and the commands themselves dropped."""
    out: list[str] = []
    skipping = False
    for paragraph in re.split(r"\n\s*\n", source):
        if not paragraph.strip():
            continue
        if paragraph.startswith("="):
            command, _, rest = paragraph[1:].partition(" ")
            command = command.split("\n")[0]
            if command == "begin":
                skipping = True
            elif command == "end":
                skipping = False
            elif command in ("head1", "head2", "head3", "head4", "item") and not skipping:
                text = rest.strip()
                if text and text not in ("*", "-") and not text.rstrip(".").isdigit():
                    out.append(_pod_inline(reflow(text.lstrip("*- "))))
            continue
        if skipping:
            continue
        if paragraph[:1] in (" ", "\t"):
            out.append(paragraph.rstrip())
        else:
            out.append(_pod_inline(reflow(paragraph)))
    return "\n".join(p for p in out if p.strip())


def _pod_inline(text: str) -> str:
    text = _POD_DOUBLE.sub(_pod_code, text)
    for _ in range(5):
        text, n = _POD_CODE.subn(_pod_code, text)
        if n == 0:
            break
    return text


# --- roff (man pages) -----------------------------------------------------------------------------------------

_ROFF_NAMED = {"em": "\u2014", "en": "\u2013", "aq": "'", "dq": '"', "bu": "\u2022", "co": "\u00a9",
               "lq": "\u201c", "rq": "\u201d", "oq": "\u2018", "cq": "\u2019", "rs": "\\", "mi": "-",
               "hy": "-", "ti": "~", "ha": "^", "Fo": "\u00ab", "Fc": "\u00bb", "ga": "`", "cq'": "'",
               "->": "\u2192", "<-": "\u2190", "<=": "\u2264", ">=": "\u2265", "tm": "\u2122", "de": "\u00b0",
               "mu": "\u00d7", "pl": "+", "eq": "=", "sl": "/", "ba": "|", "ua": "\u2191", "da": "\u2193"}
_ROFF_ESCAPE = re.compile(
    r"\\(?:f(?:\[[^\]]*\]|\(..|.)"            # font changes
    r"|s[-+]?\d+|s\(\d\d|s\[[^\]]*\]"           # size changes
    r"|\((..)|\[([^\]]+)\]|\*\((..)|\*\[([^\]]+)\]|\*(.)"  # named characters and strings
    r"|[&^|c%:dur{}]|(-)|(e)|([ ~0])|(\.))"
)
_ROFF_FONT_PAIRS = {"BR", "RB", "IR", "RI", "BI", "IB"}
_ROFF_BREAKS = {"PP", "LP", "P", "IP", "TP", "TQ", "HP", "RS", "RE", "sp", "br", "SH", "SS", "nf", "fi", "EX", "EE",
                "in", "ti", "bp", "ne", "UR", "UE", "MT", "ME", "SY", "YS", "OP"}
_ROFF_STRINGS = {"lq": "\u201c", "rq": "\u201d", "R": "\u00ae", "Tm": "\u2122"}


def _roff_escape(match: re.Match) -> str:
    named, bracketed, string2, string_long, string1, dash, backslash, space, dot = match.groups()
    name = named or bracketed
    if name is not None:
        return _ROFF_NAMED.get(name, "")
    string = string2 or string_long or string1
    if string is not None:
        return _ROFF_STRINGS.get(string, "")
    return "-" if dash else "\\" if backslash else " " if space else "." if dot else ""


def roff_inline(text: str) -> str:
    """A roff text line with its escapes resolved (fonts dropped, \\- as '-', \\(em as an em dash, ...)."""
    return _ROFF_ESCAPE.sub(_roff_escape, text)


def _roff_args(rest: str) -> list[str]:
    return [a[1:-1] if len(a) > 1 and a[0] == a[-1] == '"' else a for a in re.findall(r'"[^"]*"|\S+', rest)]


def roff_text(source: str) -> str:
    """Prose of a man page in roff (man macros): comments, requests and tables dropped, font macros (.B, .BR,
    ...) turned into their text, filled text reflowed into paragraphs and .nf blocks kept line by line."""
    source = re.sub(r"\\\n", "", source)  # continued lines
    paragraphs: list[str] = []
    current: list[str] = []
    fill = True
    in_table = False

    def flush():
        if current:
            paragraphs.append(reflow(" ".join(current)) if fill else "\n".join(current))
            current.clear()

    for line in source.splitlines():
        if line.startswith((".\\\"", "'\\\"", '.\\"', "\\\"")) or line in (".", "'"):
            continue
        if line.startswith((".TS", "'TS")):
            in_table = True
            continue
        if in_table:
            in_table = not line.startswith((".TE", "'TE"))
            continue
        if line.startswith((".", "'")):
            request, _, rest = line[1:].strip().partition(" ")
            if request in _ROFF_BREAKS:
                flush()
                if request == "nf" or request == "EX":
                    fill = False
                elif request == "fi" or request == "EE":
                    fill = True
                if request in ("SH", "SS") and rest.strip():
                    paragraphs.append(roff_inline(" ".join(_roff_args(rest))))
                elif request == "IP" and rest.strip():
                    tag = roff_inline(_roff_args(rest)[0])
                    if tag.strip() not in ("", "\u2022", "*", "-"):
                        current.append(tag)
                continue
            if request in ("B", "I", "SM", "SB"):
                current.append(roff_inline(" ".join(_roff_args(rest))))
            elif request in _ROFF_FONT_PAIRS:
                current.append(roff_inline("".join(_roff_args(rest))))
            elif request == "TH":
                continue
            continue
        text = roff_inline(line)
        if fill:
            current.append(text)
        else:
            current.append(text.rstrip())
    flush()
    return "\n".join(p for p in paragraphs if p.strip())


# --- OSIS (SWORD Bible modules) -------------------------------------------------------------------------------

_OSIS_NOTE = re.compile(r"<note\b.*?</note>", re.S)
_OSIS_PARAGRAPH = re.compile(r'<div [^>]*type="x-p"[^>]*/>')
_OSIS_TITLE = re.compile(r"<title\b[^>]*>(.*?)</title>", re.S)
_TAG = re.compile(r"<[^>]+>")


def osis_text(block: str) -> str:
    """Verse text of an OSIS fragment: notes and Strong's-number tags dropped, paragraphs and titles kept."""
    text = _OSIS_NOTE.sub("", block)
    text = _OSIS_TITLE.sub(lambda m: "\n" + m.group(1) + "\n", text)
    text = _OSIS_PARAGRAPH.sub("\n", text)
    text = html.unescape(_TAG.sub("", text))
    return "\n".join(reflow(line) for line in text.split("\n") if line.strip())
