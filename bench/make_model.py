"""Writes a benchmark model directory: a real config.json plus a synthetic byte-level BPE tokenizer
of the model's full vocabulary size, so the scheduler detokenizes every output token for real
(no machine here can download Qwen's tokenizer). Weights come from `--load-format dummy`."""

from __future__ import annotations

import argparse
import json
import random
import shutil
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast


def synthetic_bpe(vocab_size: int, seed: int = 0) -> Tokenizer:
    """A valid byte-level BPE with `vocab_size` tokens: 256 byte tokens, then merges of random pairs
    of existing tokens (up to 8 characters), like a trained vocabulary's shape."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    short = list(alphabet)  # parts of at most 4 characters, so no merge is longer than 8
    merges: list[tuple[str, str]] = []
    rng = random.Random(seed)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    while len(vocab) < vocab_size - len(specials):
        a, b = rng.choice(short), rng.choice(short)
        if a + b in vocab:
            continue
        vocab[a + b] = len(vocab)
        merges.append((a, b))
        if len(a + b) <= 4:
            short.append(a + b)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    return tok


def write(config_path: Path, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(config_path, out / "config.json")
    config = json.loads(config_path.read_text())
    fast = PreTrainedTokenizerFast(tokenizer_object=synthetic_bpe(config["vocab_size"]), eos_token="<|im_end|>")
    fast.save_pretrained(out)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", default="../shared/models/qwen3-0.6b/config.json")
    p.add_argument("--out", default="/tmp/qwen3-0.6b-bench")
    args = p.parse_args()
    print(f"benchmark model dir: {write(Path(args.config), Path(args.out))}")


if __name__ == "__main__":
    main()
