"""--compile: the decoder layers' regions compiled by torch.compile give transformers' greedy tokens,
like the eager layers, and nothing compiles after the runner's start-up."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.runner_utils import BLOCK_SIZE, PROMPTS, Blocks, generate, hf_greedy, hf_model, make_runner, new_seq, outputs
from tests.test_tp import _free_port
from worker_svc.batch import prepare
from worker_svc.jit_watch import GraphWatch
from worker_svc.model_runner import ModelRunner
from worker_svc.models.regions import Regions, attn_in, final_norm, mlp_in

MAX_NEW = 12


@pytest.fixture(scope="module")
def compiled(tiny_model_dir: Path) -> ModelRunner:
    return make_runner(tiny_model_dir, compile=True)


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path) -> list[list[int]]:
    hf = hf_model(tiny_model_dir)
    return [hf_greedy(hf, p, MAX_NEW) for p in PROMPTS]


@pytest.mark.parametrize("chunk", [None, 3])
def test_compiled_and_eager_greedy_match_hf(
    tiny_model_dir: Path, compiled: ModelRunner, reference: list[list[int]], chunk: int | None
) -> None:
    # chunk 3: prompts end their prefill at different steps, so steps mix chunks and decodes.
    eager = make_runner(tiny_model_dir, compile=False)
    assert compiled.config.compile and not eager.config.compile
    for runner in (eager, compiled):
        blocks = Blocks()
        seqs = [new_seq(i, p, blocks, len(p) + MAX_NEW) for i, p in enumerate(PROMPTS)]
        generate(runner, seqs, MAX_NEW, chunk)
        assert [outputs(s) for s in seqs] == reference
        for seq in seqs:
            runner.release(seq)
    assert compiled.graph_compiles.count == 0  # every token count was compiled at start-up


def test_no_compile_after_start_up(compiled: ModelRunner) -> None:
    # Token counts the warm-up never ran (a long prefill, a batch of decodes): a recompile raises here.
    blocks = Blocks()
    prompt = list(range(3, 103))
    seqs = [new_seq(i, prompt[: 20 + 23 * i], blocks, 100) for i in range(4)]
    with torch.compiler.set_stance("fail_on_recompile"):
        generate(compiled, seqs, 3)
    assert compiled.graph_compiles.count == 0
    for seq in seqs:
        compiled.release(seq)


def _rank_main(rank: int, port: int, model_dir: str, out: str) -> None:
    torch.set_num_threads(1)  # two ranks on two cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        runner = make_runner(Path(model_dir), rank, 2, compile=True)
        blocks = Blocks()
        seqs = [new_seq(i, p, blocks, len(p) + MAX_NEW) for i, p in enumerate(PROMPTS)]
        generate(runner, seqs, MAX_NEW, chunk=5)
        Path(out, f"rank{rank}.json").write_text(json.dumps([outputs(s) for s in seqs]))
    finally:
        dist.destroy_process_group()


def test_two_compiled_ranks_match_hf(tiny_model_dir: Path, reference: list[list[int]], tmp_path: Path) -> None:
    # The all-reduces stay outside the compiled regions, so the sharded layers compile alike.
    mp.spawn(_rank_main, args=(_free_port(), str(tiny_model_dir), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == reference


def test_regions_as_written_equal_the_layers(tiny_model_dir: Path) -> None:
    # The regions are the same arithmetic as the layers' own torch path, bit for bit in float32:
    # whatever the compiled ones change is the compiler's.
    runner = make_runner(tiny_model_dir)
    blocks = Blocks()
    seqs = [new_seq(i, p, blocks, len(p)) for i, p in enumerate(PROMPTS)]
    batch = prepare(seqs, [len(p) for p in PROMPTS], BLOCK_SIZE, runner.max_model_len, runner.device)
    with torch.inference_mode():
        layers = runner.model(batch.input_ids, batch.positions, batch.meta)
        runner.model.use_regions(Regions(attn_in, mlp_in, final_norm))
        regions = runner.model(batch.input_ids, batch.positions, batch.meta)
    assert torch.equal(layers, regions)


RESTART = """
import json, sys
from pathlib import Path
from torch._dynamo.utils import counters
from tests.runner_utils import make_runner
make_runner(Path(sys.argv[1]), compile=True)
print(json.dumps(counters["inductor"]))
"""


def test_a_restart_takes_the_compiled_regions_from_the_cache(tiny_model_dir: Path, tmp_path: Path) -> None:
    # Two worker starts with one inductor cache: the second compiles nothing, it loads every graph.
    repo = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    runs = [
        json.loads(
            subprocess.run(
                [sys.executable, "-c", RESTART, str(tiny_model_dir)], env=env, capture_output=True, text=True,
                check=True, timeout=240,
            ).stdout.splitlines()[-1]
        )
        for _ in range(2)
    ]  # fmt: skip
    first, second = runs
    assert first.get("fxgraph_cache_miss", 0) >= 3 and not first.get("fxgraph_cache_hit")
    assert second.get("fxgraph_cache_hit") == first["fxgraph_cache_miss"] and not second.get("fxgraph_cache_miss")


def test_graph_watch_logs_each_compile(caplog: pytest.LogCaptureFixture) -> None:
    watch = GraphWatch()
    with caplog.at_level(logging.WARNING, logger="worker_svc.jit_watch"):
        watch.after(SimpleNamespace(compile_id="0/3"))
    assert watch.count == 1
    assert "after start-up" in caplog.records[0].getMessage() and "0/3" in caplog.records[0].getMessage()
