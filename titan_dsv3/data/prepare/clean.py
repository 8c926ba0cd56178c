"""Cleaning: HTML tags and entities, Unicode normalisation, control characters, whitespace.

Each step is a plain ``str -> str`` function; the stage applies those its config turns on, in that order, and
removes a document only when nothing but whitespace is left.
"""

from __future__ import annotations

import html
import re
import unicodedata
from collections.abc import Iterable, Iterator

from titan_dsv3.data.prepare.config import CleanConfig
from titan_dsv3.data.prepare.document import Doc

# Element names of HTML 4/5. Only these are taken for tags, so that `List<String>` or `a <b> c` in code and
# maths survive whenever the word between the brackets is not an element name.
_BLOCK_TAGS = frozenset(
    "address article aside blockquote body br dd details dialog div dl dt fieldset figcaption figure footer form "
    "h1 h2 h3 h4 h5 h6 header hr html li main nav ol p pre section summary table tbody tfoot thead tr ul".split()
)
_CELL_TAGS = frozenset({"td", "th"})
_INLINE_TAGS = frozenset(
    "a abbr area audio b base bdi bdo big button canvas caption center cite code col colgroup data datalist del "
    "dfn em embed font head i iframe img input ins kbd label legend link map mark meta meter noscript object "
    "optgroup option output param picture progress q rp rt ruby s samp select small source span strike strong "
    "sub sup template textarea time title track tt u var video wbr".split()
)
_TAG = re.compile(r"<(/?)([A-Za-z][A-Za-z0-9]*)\b[^<>]*>")
_COMMENT = re.compile(r"<!--.*?-->", re.S)
_SCRIPT = re.compile(r"<(script|style)\b[^>]*>.*?</\1\s*>", re.S | re.I)
_ENTITY = re.compile(r"&(?:#[0-9]{1,7}|#[xX][0-9a-fA-F]{1,6}|[A-Za-z][A-Za-z0-9]{1,31});")

_NEWLINES = re.compile(r"\r\n|[\r\u2028\u2029\x85]")
# C0/C1 controls except tab and newline, and invisible characters that only get in the way of matching:
# zero-width space, word joiner, BOM, soft hyphen. ZWJ/ZWNJ stay (emoji sequences, Persian, Indic scripts).
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x84\x86-\x9f\u200b\u2060\ufeff\u00ad]")
_ODD_SPACES = re.compile(r"[^\S\t\n ]")  # whitespace other than tab, newline and the plain space
_TRAILING = re.compile(r"[ \t]+$", re.M)
_INNER_SPACES = re.compile(r"(?<=\S) {2,}")
_BLANK_RUNS = re.compile(r"\n{3,}")


def _tag(m: re.Match) -> str:
    name = m.group(2).lower()
    if name in _BLOCK_TAGS:
        return "\n"
    if name in _CELL_TAGS:
        return " "
    if name in _INLINE_TAGS:
        return ""
    return m.group(0)


def strip_html(text: str) -> str:
    if "<" not in text:
        return text
    text = _COMMENT.sub("", text)
    text = _SCRIPT.sub("", text)
    return _TAG.sub(_tag, text)


def decode_entities(text: str) -> str:
    if "&" not in text:
        return text
    return _ENTITY.sub(lambda m: html.unescape(m.group(0)), text)


def remove_control(text: str) -> str:
    return _CONTROL.sub("", _NEWLINES.sub("\n", text))


def normalize_whitespace(text: str) -> str:
    text = _NEWLINES.sub("\n", text)
    text = _ODD_SPACES.sub(" ", text)
    text = _TRAILING.sub("", text)
    text = _INNER_SPACES.sub(" ", text)  # runs after the indentation only, so code keeps its indentation
    return _BLANK_RUNS.sub("\n\n", text).strip("\n")


class Clean:
    """The cleaning stage."""

    name = "clean"

    def __init__(self, cfg: CleanConfig):
        self.cfg = cfg
        form = cfg.unicode_form
        steps = []
        if cfg.strip_html:
            steps.append(strip_html)
        if cfg.html_entities:
            steps.append(decode_entities)
        if form != "none":
            steps.append(lambda t: unicodedata.normalize(form, t))
        if cfg.control_chars:
            steps.append(remove_control)
        if cfg.normalize_whitespace:
            steps.append(normalize_whitespace)
        self.steps = steps

    def clean(self, text: str) -> str:
        for step in self.steps:
            text = step(text)
        return text

    def __call__(self, docs: Iterable[Doc], rank: int = 0, world_size: int = 1) -> Iterator[Doc]:
        for doc in docs:
            doc.text = self.clean(doc.text)
            if not doc.text.strip():
                doc.remove(self.name, "empty after cleaning")
            yield doc
