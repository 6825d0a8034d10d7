import random

import pytest
from transformers import AutoTokenizer

from scheduler_svc.detokenizer import Detokenizer


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(params=["decode-stream", "window"])
def path(request) -> str:
    return request.param


def stream(
    tok, ids: list[int], stop: tuple[str, ...] = (), path: str = "decode-stream"
) -> tuple[list[str], str | None]:
    d = Detokenizer(tok, stop)
    if path == "window":  # the path for tokenizers without a Rust decode stream
        d.stream = None
    deltas = []
    for i, t in enumerate(ids):
        hit = d.add(t)
        final = hit is not None or i == len(ids) - 1
        deltas.append(d.delta(final))
        if hit is not None:
            return deltas, hit
    return deltas, None


def test_deltas_concatenate_to_full_decode_and_never_split_characters(tok, path) -> None:
    text = "Héllo wörld! 你好，世界。 こんにちは 🙂🚀 The quick brown fox."
    ids = tok.encode(text)
    assert any(tok.decode([t]).endswith("\ufffd") for t in ids), "the test needs tokens that split characters"
    deltas, _ = stream(tok, ids, path=path)
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=True) == text
    assert not any("\ufffd" in d for d in deltas)


def test_random_token_streams_match_full_decode(tok, path) -> None:
    rng = random.Random(0)
    for _ in range(50):
        ids = [rng.randrange(len(tok)) for _ in range(rng.randint(1, 30))]
        deltas, _ = stream(tok, ids, path=path)
        assert "".join(deltas) == tok.decode(ids, skip_special_tokens=True)


def test_stop_string_spanning_tokens_is_trimmed_and_nothing_after_it_streams(tok, path) -> None:
    text = "Large language models generate text one token at a time."
    ids = tok.encode(text)
    deltas, hit = stream(tok, ids, stop=("generate text",), path=path)
    assert hit == "generate text"
    assert "".join(deltas) == "Large language models "
    # Every delta was safe to send: none carried a prefix of the stop string that later matched.
    assert all("gen" not in d for d in deltas)


def test_earliest_stop_wins_and_text_before_is_complete(tok, path) -> None:
    ids = tok.encode("The quick brown fox jumps over the lazy dog.")
    deltas, hit = stream(tok, ids, stop=("lazy", "fox"), path=path)
    assert hit == "fox" and "".join(deltas) == "The quick brown "


def test_no_stop_flushes_held_back_text_at_the_end(tok, path) -> None:
    ids = tok.encode("abc def")
    deltas, hit = stream(tok, ids, stop=("zzzzzzzz",), path=path)
    assert hit is None and "".join(deltas) == "abc def"
