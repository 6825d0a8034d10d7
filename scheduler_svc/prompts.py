"""Text prompts and chat messages to token ids, off the event loop and within limits; and the check
that a request's ids and lengths fit the model and its cache.

One tokenizing thread: the tokenizer must not be shared by threads, and its Rust code releases the
GIL, so a long prompt being tokenized does not hold up the streams the event loop serves. Sizes
are checked before any work: a text over `max_bytes` is refused at once, and a prompt longer than
the model takes is refused by its length alone, before millions of ids become Python ints (which
would hold the GIL, and so every stream, for a second).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

from scheduler_svc.errors import InvalidRequest
from scheduler_svc.messages import CoreInfo
from scheduler_svc.sampling_params import SamplingParams


class Prompts:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_bytes: int) -> None:
        self.tokenizer = tokenizer
        self.max_bytes = max_bytes
        self.max_tokens: int | None = None  # of a prompt: the model's context less one output token
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="tokenize")

    async def tokenize(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Every id of `text` (the Tokenize RPC)."""
        self._check_size(len(text.encode()), "the text")
        return await self._off_loop(self._encode, text, add_special_tokens, None)

    async def text(self, text: str) -> list[int]:
        self._check_size(len(text.encode()), "the text prompt")
        return await self._off_loop(self._encode, text, True, self.max_tokens)

    async def chat(self, messages: list[dict[str, str]]) -> list[int]:
        if not messages:
            raise InvalidRequest("chat.messages is empty")
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise InvalidRequest("this model's tokenizer has no chat template; send a text prompt instead")
        self._check_size(sum(len(m["content"].encode()) for m in messages), "the chat messages' contents")
        return await self._off_loop(self._render_chat, messages)

    def close(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)

    def _check_size(self, size: int, what: str) -> None:
        if size > self.max_bytes:
            raise InvalidRequest(
                f"{what} has {size} bytes, more than the limit of {self.max_bytes} (--max-prompt-bytes)"
            )

    async def _off_loop(self, fn: Callable[..., list[int]], *args: object) -> list[int]:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    def _render_chat(self, messages: list[dict[str, str]]) -> list[int]:
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except TemplateError as e:  # templates raise on what they refuse, e.g. roles out of order
            raise InvalidRequest(f"the chat template rejected the messages: {e}") from e
        return self._encode(text, False, self.max_tokens)  # the template wrote the special tokens

    def _encode(self, text: str, add_special_tokens: bool, limit: int | None) -> list[int]:
        if not self.tokenizer.is_fast:
            return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        # encode_batch, unlike encode, releases the GIL while it works
        (enc,) = self.tokenizer.backend_tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)
        if limit is not None and len(enc) > limit:
            raise InvalidRequest(f"the prompt has {len(enc)} tokens, more than max_model_len ({limit + 1}) allows")
        return enc.ids


def check_request(prompt: list[int], params: SamplingParams, info: CoreInfo) -> None:
    """Raises InvalidRequest unless the prompt ids and the sampling settings fit the model and its cache."""
    if not prompt:
        raise InvalidRequest("the prompt is empty")
    # Lengths first: a prompt too long for the model is refused before a scan of its ids holds the loop.
    total = len(prompt) + params.max_tokens
    if total > info.max_model_len:
        raise InvalidRequest(
            f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) = {total} exceeds "
            f"max_model_len ({info.max_model_len})"
        )
    need = -(-total // info.block_size)
    if need > info.num_blocks:
        raise InvalidRequest(
            f"prompt + max_tokens needs {need} KV blocks but the cache has only "
            f"{info.num_blocks}; lower max_tokens or shorten the prompt"
        )
    bad = next((t for t in prompt if not 0 <= t < info.vocab_size), None)
    if bad is not None:
        raise InvalidRequest(f"prompt token id {bad} is out of range: ids must be in [0, {info.vocab_size})")
    bad = next((t for t in params.stop_token_ids if not 0 <= t < info.vocab_size), None)
    if bad is not None:
        raise InvalidRequest(f"sampling.stop_token_ids has {bad}, out of range [0, {info.vocab_size})")
    bad = next((t for t, _ in params.logit_bias if not 0 <= t < info.vocab_size), None)
    if bad is not None:
        raise InvalidRequest(f"sampling.logit_bias has token id {bad}, out of range [0, {info.vocab_size})")
