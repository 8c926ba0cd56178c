"""Language check without a downloaded model: script statistics, then stop-word statistics.

The dominant script among the letters decides the language where a script has one main language here (Greek el,
Hebrew he, Arabic ar, Devanagari hi, Thai th, Hangul ko, Han zh, Han with kana ja). Latin and Cyrillic text is
assigned the language whose stop words (below: the most frequent function words of each language) make up the
largest fraction of its words; below ``min_stopword_fraction`` it is undetermined ("und"). Ordinary running
text has 30-50 % of such words; lists, tables and code far fewer, so the check also removes those unless the
threshold is lowered. Scope: the languages below; a text in another language of the same script is called the
nearest of them or "und".
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from titan_dsv3.data.prepare.document import Doc

if TYPE_CHECKING:  # config.py imports this module's language table to validate codes
    from titan_dsv3.data.prepare.config import LanguageConfig

_STOP_WORDS_TEXT = {
    "en": "the of and to a in is it that for was on are as with be by this at from or have an but not they which "
    "you he she we his her their has had were been will would there can all its one if so do no what when who "
    "more also into than about them some these only other",
    "de": "der die das und ist nicht ein eine zu den von mit sich des auf für im dem es auch als an wird werden "
    "sind wie bei oder aber noch nach aus ich er sie wir hat war einer eines einem durch über",
    "fr": "le la les de des du et est un une que qui dans pour pas par sur au aux avec il elle ce cette sont ne "
    "se plus ou mais nous vous son sa ses leur été être fait comme",
    "es": "el la los las de del y en que es un una por con para no se su sus al lo como más pero le ha fue son "
    "está este esta también entre muy sin sobre ya o",
    "it": "il lo la i gli le di del della che e è un una per con non si da in al nel sono come anche ma più su "
    "questo questa dei delle alla ha ci",
    "pt": "o a os as de do da dos das e é um uma que em no na para com não se por mais como mas ao foi são ele "
    "ela seu sua também nos pelo pela",
    "nl": "de het een en van is dat in te op niet met voor zijn er aan ook als bij maar om dan wordt door naar "
    "nog wel uit ze hij zich deze dit die",
    "sv": "och i att det som en på är av för med till den har de inte om ett var jag men så vi kan han sig från "
    "ska eller när sin",
    "pl": "i w na z się że nie do to jest jak o po co ale od za tak jego przez być dla już tylko są ten może jej by",
    "ru": "и в не на что с по как это он она они к из за от но для у же так был бы все его ее или то мы вы",
    "uk": "і в не на що з по як це він вона вони до із за від але для у ж так був би все його її або то ми ви "
    "та й",
}
STOP_WORDS = {lang: frozenset(words.split()) for lang, words in _STOP_WORDS_TEXT.items()}
_STOP_WORD_SCRIPT = {lang: "cyrillic" if lang in ("ru", "uk") else "latin" for lang in STOP_WORDS}

_SCRIPTS = {
    "latin": "A-Za-z\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u024f\u1e00-\u1eff",
    "greek": "\u0370-\u03ff\u1f00-\u1fff",
    "cyrillic": "\u0400-\u052f",
    "hebrew": "\u0590-\u05ff",
    "arabic": "\u0600-\u06ff\u0750-\u077f\u08a0-\u08ff\ufb50-\ufdff\ufe70-\ufeff",
    "devanagari": "\u0900-\u097f",
    "thai": "\u0e00-\u0e7f",
    "hangul": "\u1100-\u11ff\u3130-\u318f\uac00-\ud7af",
    "kana": "\u3040-\u30ff",
    "han": "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f",
}
_SCRIPT_RE = {name: re.compile(f"[{chars}]") for name, chars in _SCRIPTS.items()}
_SCRIPT_LANGUAGE = {
    "greek": "el",
    "hebrew": "he",
    "arabic": "ar",
    "devanagari": "hi",
    "thai": "th",
    "hangul": "ko",
}
KNOWN_LANGUAGES = tuple(sorted([*STOP_WORDS, *_SCRIPT_LANGUAGE.values(), "zh", "ja"]))
_WORD = re.compile(r"[^\W\d_]+")


def script_counts(text: str) -> dict[str, int]:
    """Letters of each script in ``text``."""
    return {name: len(text) - len(rx.sub("", text)) for name, rx in _SCRIPT_RE.items()}


def detect(text: str, min_stopword_fraction: float = 0.1) -> tuple[str, float, float | None]:
    """(language code or "und", fraction of the letters in its script, its stop-word fraction or None)."""
    counts = script_counts(text)
    letters = sum(counts.values())
    if not letters:
        return "und", 0.0, None
    script = max(counts, key=counts.get)
    if script in ("han", "kana"):
        cjk = counts["han"] + counts["kana"]
        # Japanese mixes kana into Han text; Chinese has none (a few percent allow for quoted names).
        return ("ja" if counts["kana"] > 0.05 * cjk else "zh"), cjk / letters, None
    if script in _SCRIPT_LANGUAGE:
        return _SCRIPT_LANGUAGE[script], counts[script] / letters, None
    words = _WORD.findall(text.lower())
    best, best_frac = "und", 0.0
    for lang, stops in STOP_WORDS.items():
        if _STOP_WORD_SCRIPT[lang] == script and words:
            frac = sum(w in stops for w in words) / len(words)
            if frac > best_frac:
                best, best_frac = lang, frac
    return (best if best_frac >= min_stopword_fraction else "und"), counts[script] / letters, best_frac


class LanguageFilter:
    """The language stage: keeps documents detected as one of ``languages``."""

    name = "language"

    def __init__(self, cfg: LanguageConfig):
        self.cfg = cfg
        self.keep = frozenset(cfg.languages)

    def check(self, text: str) -> str | None:
        c = self.cfg
        if not self.keep:
            return None
        lang, script_frac, stop_frac = detect(text[: c.max_chars], c.min_stopword_fraction)
        stats = f"script fraction {script_frac:.2f}" + (
            "" if stop_frac is None else f", stop words {stop_frac:.2f}"
        )
        if lang not in self.keep:
            return f"language {lang} ({stats}) not in {sorted(self.keep)}"
        if script_frac < c.min_script_fraction:
            return f"language {lang}: script fraction {script_frac:.2f} < {c.min_script_fraction}"
        return None

    def __call__(self, docs: Iterable[Doc], rank: int = 0, world_size: int = 1) -> Iterator[Doc]:
        for doc in docs:
            reason = self.check(doc.text)
            if reason:
                doc.remove(self.name, reason)
            yield doc
