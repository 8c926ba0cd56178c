"""Configuration of tools.prepare_data: one dataclass per TOML section, defaults < TOML < ``--section.key value``.

Each field's one-line docstring is its --help text and its comment in ``train_configs/data_prepare.toml``.
Unknown keys, wrong types and impossible values raise ConfigError, whose one-line message names the key and the fix.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

from titan_dsv3.config.sections import ConfigError, apply_toml, field_docs, set_dotted
from titan_dsv3.config.sections import load_toml as _load_toml
from titan_dsv3.data.prepare.language import KNOWN_LANGUAGES

__all__ = [
    "ConfigError",
    "PrepareConfig",
    "build_config",
    "field_docs",
    "help_options",
    "load_toml",
    "set_value",
]

STAGES = ("clean", "exact_dedup", "near_dedup", "filter", "language", "tokenize")
# Stages that need every document before deciding (the pipeline waits for all workers at each of these).
GLOBAL_STAGES = ("exact_dedup", "near_dedup")
FORMATS = ("auto", "jsonl", "parquet", "arrow", "text")


@dataclass
class InputConfig:
    paths: list[str] = field(default_factory=list)
    """Files, folders (searched recursively) or glob patterns; --input on the command line replaces them."""
    format: str = "auto"
    """auto (by suffix, readers.SUFFIXES; JSONL and text may be .gz) | jsonl | parquet | arrow | text."""
    text_field: str = "text"
    """JSONL field or Parquet/Arrow column holding the document text."""
    id_field: str = "id"
    """Field or column holding the document id; a record without one is named file:record number."""
    text_unit: str = "file"
    """Plain text files: file (the whole file is one document) or line (every non-empty line is one)."""
    on_error: str = "skip"
    """Bad input (malformed JSON, non-UTF-8 bytes, empty files, missing fields): skip (report, go on) or stop."""
    chunk_mb: int = 64
    """Uncompressed JSONL/text files and Parquet row groups are cut into tasks of about this many MiB."""


@dataclass
class OutputConfig:
    dir: str = ""
    """Output folder: token shards, manifest.json, report.json; --output on the command line."""
    overwrite: bool = False
    """Delete an earlier run's outputs in dir (finished, or unfinished with another config) instead of stopping."""


@dataclass
class PipelineConfig:
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    """Stages in order of application, each at most once; tokenize must be last."""
    workers: int = 1
    """Worker processes; 0 = one per CPU core. Results do not depend on it."""
    progress: bool = True
    """A progress line on stderr."""
    keep_work: bool = False
    """Keep the .work folder (documents and keys between stages) after a finished run."""


@dataclass
class CleanConfig:
    unicode_form: str = "NFC"
    """Unicode normalisation: NFC, NFKC (also folds compatibility forms such as full-width letters) or none."""
    strip_html: bool = True
    """Remove HTML tags (known element names only, so List<String> survives), comments, scripts and styles."""
    html_entities: bool = True
    """Decode HTML entities written with a semicolon (&amp; &#233; &eacute;)."""
    control_chars: bool = True
    """Remove control characters (tab and newline stay) and invisible ones (zero-width space, BOM, soft hyphen)."""
    normalize_whitespace: bool = True
    """Unicode spaces to ' ', CRLF to LF, strip line ends, squeeze inner runs of spaces, at most one blank line."""


@dataclass
class ExactDedupConfig:
    normalize: bool = True
    """Hash the case-folded text with whitespace runs collapsed (false: the exact characters)."""


@dataclass
class NearDedupConfig:
    num_perm: int = 128
    """MinHash permutations (signature length)."""
    shingle_size: int = 5
    """Words per shingle (words are runs of letters and digits, case-folded)."""
    threshold: float = 0.8
    """Jaccard similarity at which two documents are duplicates; LSH bands x rows follow (0.8, 128: 9 x 13)."""
    seed: int = 1
    """Seed of the permutations (datasketch's MinHash seed; same seed, same signatures)."""
    verify: bool = True
    """Join an LSH candidate pair only if its estimated Jaccard is >= threshold (fewer false positives)."""
    false_negative_weight: float = 0.5
    """Weight of missed pairs against false candidates when choosing bands x rows; higher finds more near the threshold."""


@dataclass
class FilterConfig:
    min_words: int = 50
    """Fewest words (whitespace-separated). Filter defaults are Gopher's (Rae et al. 2021, appendix A)."""
    max_words: int = 100_000
    """Most words a document may have; 0 = no limit."""
    min_mean_word_length: float = 3.0
    """Shortest mean word length (characters, surrounding punctuation stripped)."""
    max_mean_word_length: float = 10.0
    """Longest mean word length; 0 = no limit."""
    max_symbol_word_ratio: float = 0.1
    """Most '#' and ellipses ('...', U+2026) per word; a negative value turns the check off."""
    max_ellipsis_line_fraction: float = 0.3
    """Largest fraction of non-empty lines that may end in an ellipsis; 1 turns the check off."""
    max_bullet_line_fraction: float = 0.9
    """Largest fraction of non-empty lines that may start with a bullet (-, *, U+2022 ...); 1 turns it off."""
    max_duplicate_line_fraction: float = 0.3
    """Largest fraction of non-empty lines that repeat an earlier line; 1 turns it off."""
    max_duplicate_line_char_fraction: float = 0.2
    """Largest fraction of characters in lines that repeat an earlier line; 1 turns it off."""
    max_duplicate_paragraph_fraction: float = 0.3
    """Largest fraction of paragraphs (split at blank lines) that repeat an earlier one; 1 turns it off."""
    max_duplicate_paragraph_char_fraction: float = 0.2
    """Largest fraction of characters in repeated paragraphs; 1 turns it off."""
    max_top_ngram_char_fraction: list[float] = field(default_factory=lambda: [0.20, 0.18, 0.16])
    """For n = 2, 3, 4 ...: largest fraction of word characters covered by the most frequent n-gram; [] = off."""
    max_duplicate_ngram_char_fraction: list[float] = field(
        default_factory=lambda: [0.15, 0.14, 0.13, 0.12, 0.11, 0.10]
    )
    """For n = 5 ... 10: largest fraction of word characters in n-grams that occur more than once; [] = off."""
    stop_words: list[str] = field(
        default_factory=lambda: ["the", "be", "to", "of", "and", "that", "have", "with"]
    )
    """Words of which at least min_stop_words (counting repeats) must occur; [] = off."""
    min_stop_words: int = 2
    """Occurrences of stop_words a document needs (Gopher: 2, which drops most lists, tables and code)."""
    min_alpha_word_fraction: float = 0.8
    """Smallest fraction of words that contain a letter; 0 turns the check off."""


@dataclass
class LanguageConfig:
    languages: list[str] = field(default_factory=lambda: ["en"])
    """Codes to keep: en de fr es it pt nl sv pl ru uk (stop words), el he ar hi th ko zh ja (script); [] = all."""
    min_stopword_fraction: float = 0.1
    """Latin and Cyrillic text: fraction of its words that must be stop words of the detected language."""
    min_script_fraction: float = 0.5
    """Fraction of the letters that must be in the detected language's script."""
    max_chars: int = 10_000
    """Only the first this many characters of a document are examined."""


@dataclass
class TokenizeConfig:
    tokenizer: str = ""
    """tokenizer.json to encode with; empty = the shipped default (byte-level BPE, 2,048 tokens)."""
    val_fraction: float = 0.0
    """Fraction of documents (chosen by a hash of their id) written to val shards instead of train."""
    batch_size: int = 256
    """Documents per encode_batch call."""


@dataclass
class PrepareConfig:
    input: InputConfig = field(default_factory=InputConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    clean: CleanConfig = field(default_factory=CleanConfig)
    exact_dedup: ExactDedupConfig = field(default_factory=ExactDedupConfig)
    near_dedup: NearDedupConfig = field(default_factory=NearDedupConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    language: LanguageConfig = field(default_factory=LanguageConfig)
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)


# ---- reading ---------------------------------------------------------------------------------------------------


def sections(cfg: PrepareConfig) -> dict[str, object]:
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


def set_value(cfg: PrepareConfig, dotted: str, value: object, source: str) -> None:
    set_dotted(sections(cfg), dotted, value, source)


def load_toml(path: str | Path) -> dict:
    return _load_toml(path, "--config")


def build_config(
    toml_path: str | Path | None = None, overrides: list[tuple[str, object]] = ()
) -> PrepareConfig:
    """Defaults < the TOML file < ``(section.key, value)`` overrides, then validation."""
    cfg = PrepareConfig()
    if toml_path:
        apply_toml(sections(cfg), load_toml(toml_path), str(toml_path))
    for dotted, value in overrides:
        set_value(cfg, dotted, value, f"--{dotted}")
    validate(cfg)
    return cfg


# ---- validation ------------------------------------------------------------------------------------------------


def _choice(key: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(options)}")


def _fraction(key: str, value: float, lo_open: bool = False, hi_open: bool = False) -> None:
    if value < 0 or value > 1 or (lo_open and value == 0) or (hi_open and value == 1):
        lo, hi = "(0" if lo_open else "[0", "1)" if hi_open else "1]"
        raise ConfigError(f"{key}: {value} is outside {lo}, {hi}; set a fraction in that range")


def _at_least(key: str, value: float, least: float) -> None:
    if value < least:
        raise ConfigError(f"{key}: {value} is below {least}; set it to {least} or more")


def validate(cfg: PrepareConfig) -> None:
    _choice("input.format", cfg.input.format, FORMATS)
    _choice("input.text_unit", cfg.input.text_unit, ("file", "line"))
    _choice("input.on_error", cfg.input.on_error, ("skip", "stop"))
    _at_least("input.chunk_mb", cfg.input.chunk_mb, 1)
    if not cfg.input.paths:
        raise ConfigError("input.paths: no input; pass --input FILES or set paths in [input]")
    if not cfg.output.dir:
        raise ConfigError("output.dir: no output folder; pass --output DIR or set dir in [output]")
    stages = cfg.pipeline.stages
    for s in stages:
        _choice("pipeline.stages", s, STAGES)
    if len(set(stages)) != len(stages):
        raise ConfigError(f"pipeline.stages: {stages} names a stage twice; list each stage at most once")
    if not stages or stages[-1] != "tokenize":
        raise ConfigError(f"pipeline.stages: {stages} must end with tokenize (it writes the output)")
    _at_least("pipeline.workers", cfg.pipeline.workers, 0)
    _choice("clean.unicode_form", cfg.clean.unicode_form, ("NFC", "NFKC", "none"))
    nd = cfg.near_dedup
    _at_least("near_dedup.num_perm", nd.num_perm, 2)
    _at_least("near_dedup.shingle_size", nd.shingle_size, 1)
    _fraction("near_dedup.threshold", nd.threshold, lo_open=True)
    _fraction("near_dedup.false_negative_weight", nd.false_negative_weight)
    if not 0 <= nd.seed < 2**32:
        raise ConfigError(f"near_dedup.seed: {nd.seed} must be in [0, 2**32)")
    f = cfg.filter
    _at_least("filter.min_words", f.min_words, 0)
    _at_least("filter.max_words", f.max_words, 0)
    if f.max_words and f.max_words < f.min_words:
        raise ConfigError(
            f"filter.max_words: {f.max_words} < filter.min_words {f.min_words}; raise it or set 0"
        )
    for key in (
        "ellipsis_line",
        "bullet_line",
        "duplicate_line",
        "duplicate_line_char",
        "duplicate_paragraph",
    ):
        _fraction(f"filter.max_{key}_fraction", getattr(f, f"max_{key}_fraction"))
    _fraction("filter.max_duplicate_paragraph_char_fraction", f.max_duplicate_paragraph_char_fraction)
    _fraction("filter.min_alpha_word_fraction", f.min_alpha_word_fraction)
    for key in ("max_top_ngram_char_fraction", "max_duplicate_ngram_char_fraction"):
        for v in getattr(f, key):
            _fraction(f"filter.{key}", v)
    _at_least("filter.min_stop_words", f.min_stop_words, 0)
    lang = cfg.language
    _fraction("language.min_stopword_fraction", lang.min_stopword_fraction)
    _fraction("language.min_script_fraction", lang.min_script_fraction)
    _at_least("language.max_chars", lang.max_chars, 1)
    for code in lang.languages:
        if code not in KNOWN_LANGUAGES:
            raise ConfigError(
                f"language.languages: unknown code {code!r}; known: {', '.join(KNOWN_LANGUAGES)}"
            )
    tok = cfg.tokenize
    _fraction("tokenize.val_fraction", tok.val_fraction, hi_open=True)
    _at_least("tokenize.batch_size", tok.batch_size, 1)
    if tok.tokenizer and not Path(tok.tokenizer).is_file():
        raise ConfigError(
            f"tokenize.tokenizer: {tok.tokenizer} does not exist; pass a tokenizer.json or leave it empty"
        )


# ---- help ------------------------------------------------------------------------------------------------------


def help_options() -> str:
    lines = []
    for name, section in sections(PrepareConfig()).items():
        lines.append(f"[{name}]")
        docs = field_docs(type(section))
        for key, hint in typing.get_type_hints(type(section)).items():
            type_name = str(hint).replace("<class '", "").replace("'>", "")
            lines.append(
                f"  --{name}.{key} ({type_name}, default {getattr(section, key)!r}): {docs.get(key, '')}"
            )
        lines.append("")
    return "\n".join(lines)
