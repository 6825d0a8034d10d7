"""Chat requests: the scheduler renders the messages with the tokenizer's own chat template."""

from __future__ import annotations

import shutil

import grpc
import pytest
from transformers import AutoTokenizer

from client import Client
from tests.service import Service

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "The quick brown fox?"},
]


@pytest.fixture(scope="module")
def service(tiny_model_dir):
    svc = Service(tiny_model_dir, num_kv_blocks=64, block_size=16)
    yield svc
    svc.stop()


def test_chat_is_the_templated_prompt(service, tiny_model_dir) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")
    kw = {"max_tokens": 8, "temperature": 0.0, "ignore_eos": True}
    with Client(service.addr) as c:
        chat = list(c.generate(messages=MESSAGES, **kw))
        plain = list(c.generate(ids, **kw))
    assert chat[-1].usage.prompt_tokens == len(ids)
    assert [t for m in chat for t in m.token_ids] == [t for m in plain for t in m.token_ids]


def test_empty_chat_is_invalid(service) -> None:
    with Client(service.addr) as c, pytest.raises(grpc.RpcError) as err:
        list(c.generate(messages=[]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "chat.messages is empty" in err.value.details()


def test_no_template_is_invalid_argument(tiny_model_dir, tmp_path) -> None:
    model = tmp_path / "no-template"
    shutil.copytree(tiny_model_dir, model)
    (model / "chat_template.jinja").unlink()
    assert AutoTokenizer.from_pretrained(model).chat_template is None
    svc = Service(model, num_kv_blocks=16)
    try:
        with Client(svc.addr) as c:
            with pytest.raises(grpc.RpcError) as err:
                list(c.generate(messages=MESSAGES))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "no chat template" in err.value.details()
            assert len(list(c.generate("The quick", max_tokens=2, ignore_eos=True))) >= 1  # prompts still work
    finally:
        svc.stop()
