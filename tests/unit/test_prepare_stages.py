"""The per-document stages on their own: cleaning, every quality filter, the language check, exact dedup."""

from __future__ import annotations

import numpy as np
import pytest

from titan_dsv3.data.prepare.clean import Clean
from titan_dsv3.data.prepare.config import CleanConfig, ExactDedupConfig, FilterConfig, LanguageConfig
from titan_dsv3.data.prepare.dedup_exact import ExactDedup
from titan_dsv3.data.prepare.document import Doc
from titan_dsv3.data.prepare.filters import QualityFilter
from titan_dsv3.data.prepare.language import LanguageFilter, detect

CLEAN_TEXT = """The old harbor town wakes slowly in the winter months, when the fishing boats stay tied to the pier.
Most of the shops open late, and the baker is usually the first to light a lamp on the main street.

Visitors who come in this season often say that the quiet is the best part of the trip.
They walk along the cliffs, watch the grey water, and return to the inn before the evening fog rolls in.

A small museum near the church keeps old maps and letters from sailors who left the town a century ago.
Its keeper is happy to talk with anyone about the ships, the storms, and the families that waited for news."""

VOCAB = (
    "apple garden river mountain candle window silver market forest letter engine harbor bridge pocket meadow "
    "thunder lantern pepper violin marble cactus saddle tunnel wizard blanket compass feather glacier hammock "
    "island jacket kettle ladder magnet needle orchard parrot quartz rocket scarf tomato umbrella valley walnut "
    "yogurt zipper anchor basket cookie dragon falcon guitar helmet igloo jungle koala lemon mirror"
).split()


def _lines(text: str) -> list[str]:
    return [ln for ln in text.split("\n") if ln.strip()]


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _bad_docs() -> dict[str, str]:
    """A document for every check that fails that check (and none that runs before it)."""
    words = _one_line(CLEAN_TEXT).split()
    lines = _lines(CLEAN_TEXT)
    return {
        "min_words": " ".join(words[:20]),
        "min_mean_word_length": " ".join(["a", "an", "of", "to", "in", "it", "is", "at", "by", "the"] * 8),
        "max_mean_word_length": " ".join(["internationalization", "characteristically", "the", "of"] * 20),
        "max_symbol_word_ratio": CLEAN_TEXT + "\n" + " ".join(f"#tag{i}" for i in range(25)),
        "max_ellipsis_line_fraction": "\n".join(ln.rstrip(".") + "..." for ln in lines),
        "max_bullet_line_fraction": "\n".join("- " + ln for ln in lines),
        "max_duplicate_paragraph_fraction": CLEAN_TEXT + "\n\n" + "\n\n".join(CLEAN_TEXT.split("\n\n")[:2]),
        "max_duplicate_line_fraction": "\n".join(lines + lines[:3]),
        "max_top_ngram_char_fraction": " ".join(
            w + (" machine learning" if i % 3 == 0 else "") for i, w in enumerate(words)
        ),
        "max_duplicate_ngram_char_fraction": _one_line(CLEAN_TEXT) + " " + " ".join(words[10:20] * 3),
        "min_stop_words": " ".join(VOCAB),
        "min_alpha_word_fraction": CLEAN_TEXT + "\n" + " ".join(str(1000 + 7 * i) for i in range(40)),
    }


def test_clean_document_passes_every_filter():
    assert QualityFilter(FilterConfig()).check(CLEAN_TEXT) is None


@pytest.mark.parametrize("check", list(_bad_docs()))
def test_each_filter_removes_its_case(check):
    reason = QualityFilter(FilterConfig()).check(_bad_docs()[check])
    assert reason is not None and reason.split(":")[0] == check, reason


def test_filter_limits_are_configurable():
    f = QualityFilter(FilterConfig(max_words=50))
    assert f.check(CLEAN_TEXT).startswith("max_words:")
    off = FilterConfig(
        min_words=0,
        min_mean_word_length=0,
        max_symbol_word_ratio=-1,
        max_ellipsis_line_fraction=1,
        max_bullet_line_fraction=1,
        max_duplicate_line_fraction=1,
        max_duplicate_line_char_fraction=1,
        max_duplicate_paragraph_fraction=1,
        max_duplicate_paragraph_char_fraction=1,
        max_top_ngram_char_fraction=[],
        max_duplicate_ngram_char_fraction=[],
        stop_words=[],
        min_alpha_word_fraction=0,
    )
    for check, text in _bad_docs().items():
        if check != "max_mean_word_length":
            assert QualityFilter(off).check(text) is None, check


def test_filter_stage_marks_and_yields_every_document():
    docs = [Doc("good", CLEAN_TEXT), Doc("short", "too short")]
    out = list(QualityFilter(FilterConfig())(docs))
    assert [d.id for d in out] == ["good", "short"]
    assert out[0].removed is None and out[1].removed.stage == "filter"


def test_clean():
    clean = Clean(CleanConfig())
    html = "<html><body><p>Caf&eacute; &amp; bar</p><script>var x = 1;</script><!-- note --><div>Two</div></body></html>"
    assert clean.clean(html) == "Café & bar\n\nTwo"
    assert clean.clean("List<String> xs = a <b> c;") == "List<String> xs = a c;"
    assert clean.clean("Map<Key, Value> m;") == "Map<Key, Value> m;"
    assert clean.clean("a\x00b\u200bc\ufeff\r\nd\x07e") == "abc\nde"
    assert clean.clean("e\u0301") == "\u00e9"  # NFC
    assert clean.clean("x\u00a0\u00a0y   z  \t\n\n\n\n\nw") == "x y z\n\nw"
    code = "def f(x):\n    if x:\n        return 1   \n"
    assert clean.clean(code) == "def f(x):\n    if x:\n        return 1"
    assert clean.clean("R&D and a&b stay; &unknown; too") == "R&D and a&b stay; &unknown; too"
    assert Clean(CleanConfig(unicode_form="NFKC")).clean("\uff21\ufb01") == "Afi"
    docs = list(clean([Doc("a", "<p> </p>\n\u200b"), Doc("b", "text")]))
    assert docs[0].removed.reason == "empty after cleaning" and docs[1].removed is None


def test_language():
    assert detect(CLEAN_TEXT)[0] == "en"
    german = (
        "Die alte Stadt am Hafen erwacht im Winter nur langsam, und die Boote der Fischer bleiben am Steg. "
        "Die meisten Geschäfte öffnen spät, aber der Bäcker ist immer der erste, der auf der Straße Licht macht."
    )
    chinese = (
        "这个小镇在冬天醒得很慢，渔船都停在码头上。大多数商店开门很晚，面包师总是第一个在大街上点灯的人。"
    )
    japanese = "この町は冬になるとゆっくり目を覚まします。漁船は桟橋につながれたままです。"
    assert detect(german)[0] == "de" and detect(chinese)[0] == "zh" and detect(japanese)[0] == "ja"
    assert detect("qwrt zxcv plmk bnhg vfrt")[0] == "und" and detect("12 + 34 = 46")[0] == "und"
    texts = {"en": CLEAN_TEXT, "de": german, "zh": chinese, "num": "12 34 56"}

    def removed(cfg: LanguageConfig) -> dict:
        return {d.id: d.removed for d in LanguageFilter(cfg)(Doc(i, t) for i, t in texts.items())}

    out = removed(LanguageConfig())
    assert out["en"] is None
    assert (
        "language de" in out["de"].reason and "language zh" in out["zh"].reason and "und" in out["num"].reason
    )
    keep_de = removed(LanguageConfig(languages=["de", "zh"]))
    assert keep_de["de"] is None and keep_de["zh"] is None and keep_de["en"] is not None
    assert all(r is None for r in removed(LanguageConfig(languages=[])).values())


def test_exact_dedup_normalises_and_keeps_first():
    stage = ExactDedup(ExactDedupConfig())
    docs = [Doc("a", "Hello  World"), Doc("b", "other"), Doc("c", "hello world"), Doc("d", "HELLO\nWORLD")]
    keys = [k for _, k in stage.keys(docs)]
    removals, stats = stage.find_duplicates([d.id for d in docs], np.stack(keys))
    assert sorted(removals) == [2, 3] and all(r.kept == "a" for r in removals.values())
    assert stats == {"duplicate_groups": 1}
    strict = ExactDedup(ExactDedupConfig(normalize=False))
    removals, _ = strict.find_duplicates([d.id for d in docs], np.stack([k for _, k in strict.keys(docs)]))
    assert removals == {}
