"""End to end over real gRPC on loopback: outputs are checked against HF transformers."""

from __future__ import annotations

import random
import threading
import time

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from client import Client, Output
from tests.service import Service


@pytest.fixture(scope="module")
def hf(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    """transformers' own generate: greedy, stopping at EOS like the service does by default."""
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False)
    return out[0, len(prompt) :].tolist()


def collect(client: Client, prompt, **kw) -> tuple[list[int], str, list[Output]]:
    msgs = list(client.generate(prompt, **kw))
    ids = [t for m in msgs for t in m.token_ids]
    return ids, "".join(m.text for m in msgs), msgs


def run_concurrently(addr: str, prompts: list, **kw) -> list[list[int]]:
    results: list = [None] * len(prompts)

    def go(i: int) -> None:
        with Client(addr) as c:
            results[i] = collect(c, prompts[i], **kw)[0]

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return results


def make_prompts(vocab: int, n: int, seed: int = 0, lo: int = 3, hi: int = 60) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


@pytest.fixture(scope="module", params=[False, True], ids=["core-in-loop", "core-process"])
def service(tiny_model_dir, request):
    svc = Service(tiny_model_dir, scheduler={"core_process": request.param}, num_kv_blocks=256, block_size=16)
    yield svc
    svc.stop()


def test_greedy_batch_matches_transformers(service, hf, tok) -> None:
    prompts = make_prompts(len(tok), 8)
    got = run_concurrently(service.addr, prompts, max_tokens=24, temperature=0.0)
    for p, g in zip(prompts, got, strict=True):
        assert g == hf_greedy(hf, p, 24)


def test_text_prompt_and_final_message(service, hf, tok) -> None:
    with Client(service.addr) as c:
        ids, text, msgs = collect(c, "The quick brown fox", max_tokens=12, temperature=0.0)
    prompt = tok.encode("The quick brown fox")
    assert ids == hf_greedy(hf, prompt, 12)
    assert text == tok.decode(ids, skip_special_tokens=True)
    last = msgs[-1]
    assert all(m.finish_reason is None for m in msgs[:-1])
    assert last.finish_reason in ("stop", "length")
    assert last.usage.prompt_tokens == len(prompt) and last.usage.completion_tokens == len(ids)


def test_prefix_cache_hit_keeps_outputs(service, hf, tok) -> None:
    rng = random.Random(5)
    shared = [rng.randrange(3, len(tok)) for _ in range(48)]  # 3 full blocks of 16
    with Client(service.addr) as c:
        first, _, _ = collect(c, shared + [7, 8], max_tokens=10, temperature=0.0, ignore_eos=True)
        second, _, msgs = collect(c, shared + [9], max_tokens=10, temperature=0.0, ignore_eos=True)
    assert msgs[-1].usage.cached_prompt_tokens == 48
    hf.generation_config.eos_token_id = None
    try:
        assert first == hf_greedy(hf, shared + [7, 8], 10)
        assert second == hf_greedy(hf, shared + [9], 10)
    finally:
        hf.generation_config.eos_token_id = tok.eos_token_id


def test_chunked_prefill_matches_transformers(tiny_model_dir, hf, tok) -> None:
    svc = Service(tiny_model_dir, scheduler={"max_num_batched_tokens": 16}, num_kv_blocks=256, block_size=16)
    try:
        prompts = make_prompts(len(tok), 5, seed=1, lo=30, hi=80)
        got = run_concurrently(svc.addr, prompts, max_tokens=16, temperature=0.0)
    finally:
        svc.stop()
    for p, g in zip(prompts, got, strict=True):
        assert g == hf_greedy(hf, p, 16)


def test_preemption_keeps_outputs(tiny_model_dir, hf, tok) -> None:
    # 24 blocks of 4 tokens: 6 requests growing to ~60 tokens cannot all stay resident.
    svc = Service(tiny_model_dir, num_kv_blocks=24, block_size=4)
    try:
        prompts = make_prompts(len(tok), 6, seed=2, lo=10, hi=30)
        got = run_concurrently(svc.addr, prompts, max_tokens=30, temperature=0.0, ignore_eos=True)
        assert svc.engine.core.scheduler.num_preemptions > 0
        assert svc.engine.core.scheduler.blocks.num_free == 24
    finally:
        svc.stop()
    hf.generation_config.eos_token_id = None
    try:
        for p, g in zip(prompts, got, strict=True):
            assert g == hf_greedy(hf, p, 30)
    finally:
        hf.generation_config.eos_token_id = tok.eos_token_id


def test_seeded_sampling_is_reproducible_whatever_the_batch(service, tok) -> None:
    prompt = make_prompts(len(tok), 1, seed=9)[0]
    kw = {"max_tokens": 20, "temperature": 1.0, "top_p": 0.9, "seed": 1234, "ignore_eos": True}
    with Client(service.addr) as c:
        alone, _, _ = collect(c, prompt, **kw)
    others = make_prompts(len(tok), 5, seed=10)
    batch = run_concurrently(service.addr, [prompt, *others], **kw)
    assert batch[0] == alone
    with Client(service.addr) as c:
        other_seed, _, _ = collect(c, prompt, **{**kw, "seed": 4321})
    assert other_seed != alone


def test_stop_strings_stop_ids_min_and_max_tokens(service, tok) -> None:
    prompt = make_prompts(len(tok), 1, seed=11)[0]
    with Client(service.addr) as c:
        ids, text, _ = collect(c, prompt, max_tokens=30, temperature=0.0, ignore_eos=True)
        # A stop string that spans tokens: the text ends right before it, nothing after it streams.
        full = tok.decode(ids, skip_special_tokens=True)
        assert text == full
        stop = full[len(full) // 2 : len(full) // 2 + 3]
        s_ids, s_text, s_msgs = collect(c, prompt, max_tokens=30, temperature=0.0, ignore_eos=True, stop=[stop])
        assert s_text == full[: full.index(stop)]
        assert s_msgs[-1].finish_reason == "stop" and s_msgs[-1].stop_reason == stop
        assert len(s_ids) < len(ids)
        # A stop token id ends the generation and is kept in the token ids.
        t_ids, _, t_msgs = collect(c, prompt, max_tokens=30, temperature=0.0, ignore_eos=True, stop_token_ids=[ids[3]])
        assert t_ids == ids[: ids.index(ids[3]) + 1] and t_msgs[-1].finish_reason == "stop"
        # min_tokens keeps the stop token from ending it too early.
        m_ids, _, _ = collect(
            c, prompt, max_tokens=30, temperature=0.0, ignore_eos=True, stop_token_ids=[ids[0]], min_tokens=5
        )
        assert len(m_ids) >= 5 and ids[0] not in m_ids[:4]
        # max_tokens
        l_ids, _, l_msgs = collect(c, prompt, max_tokens=7, temperature=0.0, ignore_eos=True)
        assert l_ids == ids[:7] and l_msgs[-1].finish_reason == "length"


def test_stream_interval_groups_tokens_and_keeps_outputs(tiny_model_dir, service, tok) -> None:
    prompt = make_prompts(len(tok), 1, seed=12)[0]
    with Client(service.addr) as c:
        ids, text, _ = collect(c, prompt, max_tokens=23, temperature=0.0, ignore_eos=True, logprobs=2)
    svc = Service(tiny_model_dir, scheduler={"stream_interval": 4}, num_kv_blocks=256, block_size=16)
    try:
        with Client(svc.addr) as c:
            g_ids, g_text, msgs = collect(c, prompt, max_tokens=23, temperature=0.0, ignore_eos=True, logprobs=2)
    finally:
        svc.stop()
    assert (g_ids, g_text) == (ids, text)
    # The first token at once (time to first token), then up to 4 a message (each request at its
    # own phase), the rest with the last; a slow reader may get several groups merged.
    assert len(msgs[0].token_ids) == 1 and 2 <= len(msgs) <= 2 + 22 // 4
    assert [len(m.logprobs) for m in msgs] == [len(m.token_ids) for m in msgs]
    assert msgs[-1].finish_reason == "length" and msgs[-1].usage.completion_tokens == 23


def test_logprobs_match_transformers(service, hf, tok) -> None:
    prompt = make_prompts(len(tok), 1, seed=12)[0]
    with Client(service.addr) as c:
        ids, _, msgs = collect(c, prompt, max_tokens=4, temperature=0.0, logprobs=3, ignore_eos=True)
    lps = [lp for m in msgs for lp in m.logprobs]
    assert len(lps) == len(ids) == 4
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + ids])).logits[0].float()
    ref = torch.log_softmax(logits, dim=-1)
    for i, lp in enumerate(lps):
        row = ref[len(prompt) - 1 + i]
        assert lp.token_id == ids[i]
        assert lp.logprob == pytest.approx(row[ids[i]].item(), abs=1e-4)
        assert list(lp.top) == row.topk(3).indices.tolist()
        assert list(lp.top.values()) == pytest.approx(row.topk(3).values.tolist(), abs=1e-4)


def test_cancel_aborts_and_frees_blocks(service, tok) -> None:
    prompt = make_prompts(len(tok), 1, seed=13)[0]
    engine = service.engine  # the core's stats as of its last step, in either mode
    with Client(service.addr) as c:
        call = c.generate(prompt, max_tokens=400, temperature=0.0, ignore_eos=True)
        next(call)
        next(call)
        assert engine.stats.running == 1
        call.cancel()
        deadline = time.time() + 10
        while engine.requests and time.time() < deadline:
            time.sleep(0.05)
        collect(c, [5, 6, 7], max_tokens=2, temperature=0.0, ignore_eos=True)  # steps report the state after
    assert engine.stats.running == 0 and engine.stats.blocks_free == engine.info.num_blocks


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"prompt": []}, "prompt is empty"),
        ({"prompt": [1, 2, 3], "max_tokens": 10_000}, "max_model_len"),
        ({"prompt": [1, 2, 3], "temperature": -1.0}, "temperature"),
        ({"prompt": [1, 2, 3], "top_p": 0.0}, "top_p"),
        ({"prompt": [1, 2, 3], "logprobs": 100}, "logprobs"),
        ({"prompt": [1, 10**6]}, "out of range"),
        ({"prompt": [1, 2], "stop_token_ids": [10**6]}, "stop_token_ids"),
        ({"prompt": None}, "no prompt"),
    ],
)
def test_bad_input_gets_invalid_argument_and_service_keeps_serving(service, kwargs, needle) -> None:
    kwargs = dict(kwargs)  # the parameter's dict is shared by both core modes
    prompt = kwargs.pop("prompt")
    with Client(service.addr) as c:
        with pytest.raises(grpc.RpcError) as err:
            list(c.generate(prompt, **kwargs))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert needle in err.value.details()
        ids, _, _ = collect(c, [5, 6, 7], max_tokens=3, temperature=0.0, ignore_eos=True)
        assert len(ids) == 3


def test_tokenize_and_model_info(service, tok) -> None:
    with Client(service.addr) as c:
        assert c.tokenize("Hello world") == tok.encode("Hello world", add_special_tokens=False)
        info = c.model_info()
    assert info.vocab_size >= len(tok) and info.block_size == 16 and info.num_kv_blocks == 256
    assert tok.eos_token_id in info.eos_token_ids and info.max_model_len == 512
