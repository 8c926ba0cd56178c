"""Train a byte-level BPE tokenizer on the embedded corpus, a prepared data folder, or text/JSONL files.

python -m titan_dsv3.tools.train_tokenizer --vocab-size 2048 --output titan_dsv3/data/assets/tokenizer.json
python -m titan_dsv3.tools.train_tokenizer --input data/prepared --vocab-size 32000 --output tok.json
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from collections.abc import Iterator
from pathlib import Path

from titan_dsv3.data.corpus import embedded_documents
from titan_dsv3.data.tokenizer import TextTokenizer, train_bpe


def _iter_file(path: Path, text_field: str) -> Iterator[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        if ".jsonl" in path.suffixes or ".json" in path.suffixes:
            for line in f:
                try:
                    text = json.loads(line).get(text_field)
                except (json.JSONDecodeError, AttributeError):
                    continue
                if isinstance(text, str) and text:
                    yield text
        else:
            yield f.read()


def iter_texts(inputs: list[str], text_field: str) -> Iterator[str]:
    """Texts from the given files or folders; a prepared folder contributes its ``documents/*.jsonl*``."""
    if not inputs:
        yield from (text for _, text in embedded_documents())
        return
    for item in inputs:
        p = Path(item)
        if not p.exists():
            raise FileNotFoundError(f"--input {p} does not exist")
        files = sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p]
        for f in files:
            if f.suffix in (".bin", ".npy") or f.name in ("manifest.json", "report.json"):
                continue
            yield from _iter_file(f, text_field)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", nargs="*", default=[], help="files or folders (default: the embedded corpus)")
    ap.add_argument("--text-field", default="text", help="JSONL field holding the text")
    ap.add_argument("--vocab-size", type=int, default=2048)
    ap.add_argument("--min-frequency", type=int, default=2)
    ap.add_argument("--output", required=True, help="path of the tokenizer.json to write")
    args = ap.parse_args(argv)
    if args.vocab_size < 260:
        print(
            f"error: --vocab-size {args.vocab_size} is below 260 (256 bytes + specials); raise it",
            file=sys.stderr,
        )
        return 2
    tok = train_bpe(iter_texts(args.input, args.text_field), args.vocab_size, args.min_frequency)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out))
    loaded = TextTokenizer(out)
    print(f"wrote {out}: vocab {loaded.vocab_size}, eos {loaded.eos_token!r} = {loaded.eos_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
