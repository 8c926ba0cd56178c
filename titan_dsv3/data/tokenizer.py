"""Tokenizers: any HF ``tokenizer.json`` through the ``tokenizers`` package, and a small default one.

The default (``assets/tokenizer.json``, byte-level BPE, 2,048 tokens) ships with the repository and was trained by
``python -m titan_dsv3.tools.train_tokenizer`` on the embedded corpus, so nothing is downloaded at run time.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

DEFAULT_TOKENIZER = Path(__file__).parent / "assets" / "tokenizer.json"
EOS_CANDIDATES = ("<|end_of_text|>", "<｜end▁of▁sentence｜>", "</s>", "<|endoftext|>", "<eos>")


class TextTokenizer:
    """A thin wrapper over ``tokenizers.Tokenizer`` that knows its end-of-document id."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path else DEFAULT_TOKENIZER
        if not self.path.is_file():
            raise FileNotFoundError(
                f"tokenizer file {self.path} does not exist; set data.tokenizer to a tokenizer.json "
                "(or leave it empty for the shipped default)"
            )
        self._tok = Tokenizer.from_file(str(self.path))
        vocab = self._tok.get_vocab()
        eos = next((t for t in EOS_CANDIDATES if t in vocab), None)
        if eos is None:
            raise ValueError(f"tokenizer {self.path} has none of the end-of-document tokens {EOS_CANDIDATES}")
        self.eos_token = eos
        self.eos_id = vocab[eos]
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE tokenizer whose only special token is ``<|end_of_text|>`` (id 0)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=["<|end_of_text|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok
