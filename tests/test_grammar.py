"""The engine core's grammars (scheduler_svc/grammar.py) on the tiny model's tokenizer, without gRPC."""

from __future__ import annotations

import asyncio
import time

import pytest
from transformers import AutoTokenizer

from scheduler_svc.errors import InvalidRequest
from scheduler_svc.grammar import Grammars
from scheduler_svc.sampling_params import Constraint
from scheduler_svc.sequence import FinishReason


def test_a_constraint_compiles_once_and_its_matcher_walks_to_the_end(tiny_model_dir) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    eos = tok.eos_token_id
    a, b = tok.convert_tokens_to_ids(["a", "b"])

    async def go() -> None:
        grammars = Grammars(str(tiny_model_dir), len(tok))
        compiles: list[Constraint] = []
        compile_one = grammars._compile

        def counted(c: Constraint) -> object:
            compiles.append(c)
            return compile_one(c)

        grammars._compile = counted  # type: ignore[method-assign]
        try:
            c = Constraint("regex", "[ab]b")
            state = await grammars.start(c)
            again = await grammars.start(Constraint("regex", "[ab]b"))
            assert compiles == [c] and state.matcher is not again.matcher
            assert state.accept(a) is None
            assert state.accept(a) is FinishReason.ABORT  # "aa" breaks it: only a bug samples that
            again = await grammars.start(c)
            assert again.accept(a) is None and again.accept(b) is None  # complete, but only EOS may follow
            assert again.accept(eos) is FinishReason.STOP
            with pytest.raises(InvalidRequest, match=r"^the regex constraint does not compile: Regex parsing error"):
                await grammars.start(Constraint("regex", "a(b"))
            assert list(grammars.cache) == [c]  # the failure is not kept
        finally:
            grammars.close()

    asyncio.run(go())


def test_an_abort_during_a_shared_compile_leaves_it_to_the_others(tiny_model_dir) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)

    async def go() -> None:
        grammars = Grammars(str(tiny_model_dir), len(tok))
        try:
            c = Constraint("json_schema", '{"type": "object", "properties": {"n": {"type": "integer"}}}')
            for _ in range(2):  # both compile threads busy: the compile waits in the queue, cancellable
                grammars.compiles.submit(time.sleep, 0.3)
            aborted = asyncio.ensure_future(grammars.start(c))
            other = asyncio.ensure_future(grammars.start(c))
            await asyncio.sleep(0)  # both wait on the one compile
            aborted.cancel()
            state = await asyncio.wait_for(other, 60)
            assert state.matcher is not None and aborted.cancelled()
        finally:
            grammars.close()

    asyncio.run(go())
