"""Builds a tiny random Qwen3 checkpoint and a small byte-level BPE tokenizer in the HF layout.

No machine here can download weights, so tests make their own: config.json + model.safetensors
written by transformers itself, plus a tokenizer trained on a few sentences, with a chat template.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Large language models generate text one token at a time.",
    "A scheduler batches requests; a worker runs the forward pass on the GPU.",
    "Paged attention stores keys and values in fixed-size blocks.",
    "Prefix caching reuses blocks that hold the same tokens.",
    "Héllo wörld! Ünïcödé characters: 你好，世界。 こんにちは 🙂🚀",
    "0123456789 + - * / = ( ) [ ] { } < > , . ; : ! ?",
] * 20


def build_tokenizer(out: Path, vocab_size: int = 400) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


def build_tiny_qwen3(out: Path, *, tie: bool = True, seed: int = 0, num_kv_heads: int = 2) -> Path:
    """Writes a tiny random Qwen3 (float32) and its tokenizer to `out`; returns `out`."""
    # Imported here, not at the top, so that `python -m tests.tiny_model --help` answers at once.
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out)
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=num_kv_heads,
        head_dim=16,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=tie,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    # Random init gives near-uniform logits; scale up so greedy choices are well separated and
    # float32 kernels of different shapes agree on the argmax.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.2)
    model.save_pretrained(out, safe_serialization=True)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m tests.tiny_model",
        description="Write a tiny random Qwen3 checkpoint and tokenizer (Hugging Face layout) for trying the "
        "service without a GPU or downloaded weights. Its output is noise. Run it from the repository root.",
    )
    p.add_argument("path", type=Path, help="directory to write (created if missing), e.g. /tmp/tiny-qwen3")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: %(default)s)")
    args = p.parse_args(argv)
    print(f"tiny random Qwen3 written to {build_tiny_qwen3(args.path, seed=args.seed)}")


if __name__ == "__main__":
    main()
