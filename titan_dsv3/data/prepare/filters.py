"""Heuristic quality filters in the manner of Gopher (Rae et al. 2021, appendix A): word counts and lengths,
symbols, ellipsis and bullet lines, repeated lines, paragraphs and n-grams, stop words, alphabetic words.

Every check is a small function returning None or the reason; the reason starts with the name of the config field
that removed the document (``max_duplicate_line_fraction: 0.45 > 0.3``), so a report can be grouped by it.
The defaults are the paper's thresholds.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Iterable, Iterator

from titan_dsv3.data.prepare.config import FilterConfig
from titan_dsv3.data.prepare.document import Doc

_PUNCT = string.punctuation + "\u2018\u2019\u201c\u201d\u00ab\u00bb\u2013\u2014\u2026"
_BULLETS = (
    "-",
    "*",
    "\u2022",
    "\u2023",
    "\u25e6",
    "\u25cf",
    "\u25aa",
    "\u2043",
    "\u00b7",
    "\u2219",
    "\u25a0",
)
_ELLIPSES = ("...", "\u2026")
_PARAGRAPH = re.compile(r"\n\s*\n")


class _Text:
    """The views of a document the checks share, computed once."""

    def __init__(self, text: str):
        self.text = text
        self.words = text.split()
        self.lines = [ln.strip() for ln in text.split("\n") if ln.strip()]
        self.paragraphs = [p.strip() for p in _PARAGRAPH.split(text) if p.strip()]
        self.bare = [w.strip(_PUNCT) for w in self.words]  # words without surrounding punctuation
        self.lower = [w.lower() for w in self.bare if w]


def _repeated(items: list[str]) -> tuple[float, float]:
    """(fraction of items that repeat an earlier one, fraction of characters in those repeats)."""
    seen: set[str] = set()
    count = chars = 0
    for it in items:
        if it in seen:
            count += 1
            chars += len(it)
        seen.add(it)
    total = sum(len(it) for it in items)
    return (count / len(items) if items else 0.0), (chars / total if total else 0.0)


def _ngrams(words: list[str], n: int) -> list[tuple[str, ...]]:
    return list(zip(*[words[i:] for i in range(n)]))


def top_ngram_char_fraction(words: list[str], n: int) -> float:
    """Characters covered by the most frequent n-gram (occurrences x its characters) over all word characters."""
    total = sum(map(len, words))
    grams = Counter(_ngrams(words, n))
    if not grams or not total:
        return 0.0
    gram, count = grams.most_common(1)[0]
    if count < 2:
        return 0.0
    return count * sum(map(len, gram)) / total


def duplicate_ngram_char_fraction(words: list[str], n: int) -> float:
    """Characters of the words inside n-grams that occur more than once, over all word characters."""
    total = sum(map(len, words))
    grams = _ngrams(words, n)
    if not grams or not total:
        return 0.0
    counts = Counter(grams)
    covered = bytearray(len(words))
    for i, g in enumerate(grams):
        if counts[g] > 1:
            covered[i : i + n] = b"\x01" * n
    return sum(len(w) for w, c in zip(words, covered) if c) / total


class QualityFilter:
    """The heuristic-filter stage."""

    name = "filter"

    def __init__(self, cfg: FilterConfig):
        self.cfg = cfg
        self.stop_words = frozenset(w.lower() for w in cfg.stop_words)
        self.checks: list[Callable[[_Text], str | None]] = [
            self.word_count,
            self.mean_word_length,
            self.symbol_ratio,
            self.ellipsis_lines,
            self.bullet_lines,
            self.duplicate_paragraphs,
            self.duplicate_lines,
            self.top_ngrams,
            self.duplicate_ngrams,
            self.stop_word_count,
            self.alpha_words,
        ]

    def check(self, text: str) -> str | None:
        """The reason to remove ``text``, or None to keep it."""
        t = _Text(text)
        if not t.words:
            return "min_words: no words"
        for check in self.checks:
            reason = check(t)
            if reason:
                return reason
        return None

    def __call__(self, docs: Iterable[Doc], rank: int = 0, world_size: int = 1) -> Iterator[Doc]:
        for doc in docs:
            reason = self.check(doc.text)
            if reason:
                doc.remove(self.name, reason)
            yield doc

    # ---- the checks, in the order they run --------------------------------------------------------------------

    def word_count(self, t: _Text) -> str | None:
        n, c = len(t.words), self.cfg
        if n < c.min_words:
            return f"min_words: {n} < {c.min_words}"
        if c.max_words and n > c.max_words:
            return f"max_words: {n} > {c.max_words}"
        return None

    def mean_word_length(self, t: _Text) -> str | None:
        mean, c = sum(len(w) for w in t.bare) / len(t.bare), self.cfg
        if mean < c.min_mean_word_length:
            return f"min_mean_word_length: {mean:.2f} < {c.min_mean_word_length}"
        if c.max_mean_word_length and mean > c.max_mean_word_length:
            return f"max_mean_word_length: {mean:.2f} > {c.max_mean_word_length}"
        return None

    def symbol_ratio(self, t: _Text) -> str | None:
        limit = self.cfg.max_symbol_word_ratio
        if limit < 0:
            return None
        symbols = t.text.count("#") + sum(t.text.count(e) for e in _ELLIPSES)
        ratio = symbols / len(t.words)
        return f"max_symbol_word_ratio: {ratio:.3f} > {limit}" if ratio > limit else None

    def ellipsis_lines(self, t: _Text) -> str | None:
        frac = sum(ln.endswith(_ELLIPSES) for ln in t.lines) / len(t.lines)
        limit = self.cfg.max_ellipsis_line_fraction
        return f"max_ellipsis_line_fraction: {frac:.3f} > {limit}" if frac > limit else None

    def bullet_lines(self, t: _Text) -> str | None:
        frac = sum(ln.startswith(_BULLETS) for ln in t.lines) / len(t.lines)
        limit = self.cfg.max_bullet_line_fraction
        return f"max_bullet_line_fraction: {frac:.3f} > {limit}" if frac > limit else None

    def duplicate_paragraphs(self, t: _Text) -> str | None:
        frac, chars = _repeated(t.paragraphs)
        c = self.cfg
        if frac > c.max_duplicate_paragraph_fraction:
            return f"max_duplicate_paragraph_fraction: {frac:.3f} > {c.max_duplicate_paragraph_fraction}"
        if chars > c.max_duplicate_paragraph_char_fraction:
            return f"max_duplicate_paragraph_char_fraction: {chars:.3f} > {c.max_duplicate_paragraph_char_fraction}"
        return None

    def duplicate_lines(self, t: _Text) -> str | None:
        frac, chars = _repeated(t.lines)
        c = self.cfg
        if frac > c.max_duplicate_line_fraction:
            return f"max_duplicate_line_fraction: {frac:.3f} > {c.max_duplicate_line_fraction}"
        if chars > c.max_duplicate_line_char_fraction:
            return f"max_duplicate_line_char_fraction: {chars:.3f} > {c.max_duplicate_line_char_fraction}"
        return None

    def top_ngrams(self, t: _Text) -> str | None:
        for n, limit in enumerate(self.cfg.max_top_ngram_char_fraction, start=2):
            frac = top_ngram_char_fraction(t.lower, n)
            if frac > limit:
                return f"max_top_ngram_char_fraction: {n}-gram {frac:.3f} > {limit}"
        return None

    def duplicate_ngrams(self, t: _Text) -> str | None:
        for n, limit in enumerate(self.cfg.max_duplicate_ngram_char_fraction, start=5):
            frac = duplicate_ngram_char_fraction(t.lower, n)
            if frac > limit:
                return f"max_duplicate_ngram_char_fraction: {n}-grams {frac:.3f} > {limit}"
        return None

    def stop_word_count(self, t: _Text) -> str | None:
        if not self.stop_words:
            return None
        n = sum(w in self.stop_words for w in t.lower)
        need = self.cfg.min_stop_words
        return f"min_stop_words: {n} < {need}" if n < need else None

    def alpha_words(self, t: _Text) -> str | None:
        frac = sum(any(ch.isalpha() for ch in w) for w in t.words) / len(t.words)
        limit = self.cfg.min_alpha_word_fraction
        return f"min_alpha_word_fraction: {frac:.3f} < {limit}" if frac < limit else None
