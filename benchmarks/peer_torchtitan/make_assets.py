"""Make, from this repository's own data, the two local inputs a torchtitan 0.2.2 run needs without a network.

    python3 benchmarks/peer_torchtitan/make_assets.py OUT_DIR [--min-tokens N] [--check]

Writes
    OUT_DIR/tokenizer/tokenizer.json         our shipped byte-level BPE (titan_dsv3/data/assets, 2,048 tokens)
    OUT_DIR/tokenizer/tokenizer_config.json  names its end-of-document token, which torchtitan appends to each document
    OUT_DIR/dataset/data.json                JSON lines {"text": ...}: the embedded corpus (Python standard-library
                                             sources, titan_dsv3.data.corpus), the same text our benchmark trains on

torchtitan reads them with --model.hf_assets_path OUT_DIR/tokenizer and --training.dataset c4_test
--training.dataset_path OUT_DIR/dataset (its local-folder loader: datasets.load_dataset(folder, split="train")).
The model keeps its 102,400-row vocabulary; token ids stay below 2,048, which changes no FLOP or byte of the step.

--check loads both through torchtitan's own tokenizer and dataset classes (torchtitan and datasets importable) and
draws one sequence for each of 4 data-parallel ranks.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from titan_dsv3.data.corpus import embedded_documents  # noqa: E402
from titan_dsv3.data.tokenizer import DEFAULT_TOKENIZER, TextTokenizer  # noqa: E402


def write_tokenizer(folder: Path) -> TextTokenizer:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(DEFAULT_TOKENIZER, folder / "tokenizer.json")
    tok = TextTokenizer(folder / "tokenizer.json")
    # Only an end-of-document token: the shipped tokenizer has no separate beginning-of-document one, and our own
    # loader also separates documents by that single token.
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": tok.eos_token,
        "add_bos_token": False,
        "add_eos_token": True,
        "model_max_length": 4096,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return tok


def write_dataset(folder: Path, tok: TextTokenizer, min_tokens: int) -> dict:
    """Whole documents, in the corpus' fixed order, until their tokens (plus one end token each) reach min_tokens."""
    folder.mkdir(parents=True, exist_ok=True)
    docs = n_bytes = n_tokens = passes = 0
    with open(folder / "data.json", "w", encoding="utf-8") as f:
        while n_tokens < min_tokens:
            passes += 1
            for _, text in embedded_documents():
                f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
                docs += 1
                n_bytes += len(text.encode("utf-8"))
                n_tokens += len(tok.encode(text)) + 1
                if n_tokens >= min_tokens:
                    break
            if docs == 0:
                raise RuntimeError("the embedded corpus is empty")
    return {"documents": docs, "text_bytes": n_bytes, "tokens": n_tokens, "corpus_passes": passes}


def check_with_torchtitan(out: Path, seq_len: int, ranks: int = 4) -> None:
    from torchtitan.components.tokenizer import HuggingFaceTokenizer
    from torchtitan.hf_datasets.text_datasets import HuggingFaceTextDataset

    tt_tok = HuggingFaceTokenizer(str(out / "tokenizer"))
    ids = tt_tok.encode("def f(x):\n    return x\n", add_bos=True, add_eos=True)
    assert tt_tok.eos_id is not None and ids[-1] == tt_tok.eos_id, (tt_tok.eos_id, ids[-3:])
    print(
        f"torchtitan tokenizer: vocab {tt_tok.get_vocab_size()}, eos_id {tt_tok.eos_id}, bos_id {tt_tok.bos_id}"
    )
    for rank in range(ranks):
        ds = HuggingFaceTextDataset(
            "c4_test",
            str(out / "dataset"),
            tt_tok,
            seq_len=seq_len,
            dp_rank=rank,
            dp_world_size=ranks,
            infinite=True,
        )
        inp, label = next(iter(ds))
        x = inp["input"]
        assert x.shape == (seq_len,) and label.shape == (seq_len,), (x.shape, label.shape)
        assert int(x.max()) < tt_tok.get_vocab_size() <= 102400
        print(
            f"torchtitan dataset rank {rank}/{ranks}: {len(ds._data)} documents, first sequence {tuple(x.shape)}, "
            f"max id {int(x.max())}, {int((x == tt_tok.eos_id).sum())} document ends"
        )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    # 4 ranks x 20 steps x 4 x 4,097 tokens = 1.31M; the margin keeps every rank's shard from re-looping in ~15 steps.
    ap.add_argument("--min-tokens", type=int, default=2_200_000)
    ap.add_argument("--check", action="store_true", help="load the outputs through torchtitan's own classes")
    ap.add_argument("--seq-len", type=int, default=4096, help="sequence length for --check")
    a = ap.parse_args()
    tok = write_tokenizer(a.out / "tokenizer")
    stats = write_dataset(a.out / "dataset", tok, a.min_tokens)
    print(
        f"wrote {a.out}/tokenizer (vocab {tok.vocab_size}, eos {tok.eos_token!r} = {tok.eos_id}) and "
        f"{a.out}/dataset/data.json: {stats}"
    )
    if a.check:
        check_with_torchtitan(a.out, a.seq_len)
    return 0


if __name__ == "__main__":
    sys.exit(main())
