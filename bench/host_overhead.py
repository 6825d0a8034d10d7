"""The scheduler's own ceiling: the standard workload against a worker that answers instantly.

    python -m bench.host_overhead --model DIR [--profile out.prof]

No model runs: each step is answered at once with arbitrary tokens, so the output tokens/s is what
the engine (scheduling, protobufs, detokenization, streaming) could sustain if the GPU took no time.
It runs on any machine; compare it with the GPU's step time to see whether the host keeps up.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import time

from bench.throughput import consume, model_dir
from bench.workload import standard
from proto import worker_pb2 as wpb
from scheduler_svc.engine import Engine, EngineConfig
from scheduler_svc.sampling_params import SamplingParams


class InstantWorker:
    """The WorkerGroup interface; every sampling seq gets token (step + seq) % 10000."""

    def __init__(self, num_blocks: int) -> None:
        self.info = wpb.WorkerInfo(
            rank=0, world_size=1, num_kv_blocks=num_blocks, block_size=16, max_model_len=4096,
            vocab_size=151936, max_num_seqs=256, max_num_batched_tokens=8192, ready=True,
        )  # fmt: skip
        self.pending: list[wpb.StepRequest] = []
        self.todo: dict[int, int] = {}  # seq id -> tokens left before it samples

    async def connect(self, timeout: float) -> wpb.WorkerInfo:
        return self.info

    async def send(self, req: wpb.StepRequest) -> None:
        self.pending.append(wpb.StepRequest.FromString(req.SerializeToString()))

    async def receive(self) -> wpb.StepResult:
        req = self.pending.pop(0)
        for s in req.removed:
            self.todo.pop(s, None)
        for a in req.added:
            self.todo[a.seq_id] = len(a.token_ids) - a.num_computed_tokens
        res = wpb.StepResult(step_id=req.step_id)
        for s, n in zip(req.seq_ids, req.num_tokens, strict=True):
            self.todo[s] -= n
            if self.todo[s] <= 0:
                self.todo[s] = 1
                res.seq_ids.append(s)
                res.token_ids.append((req.step_id + s) % 10000)
        await asyncio.sleep(0)
        return wpb.StepResult.FromString(res.SerializeToString())

    async def close(self) -> None:
        return None


async def run(model: str) -> tuple[int, float]:
    config = EngineConfig(model=model, worker_addresses=("instant",))
    engine = Engine(config, workers=InstantWorker(40_000))  # type: ignore[arg-type]
    await engine.start()
    jobs = standard()
    start = time.perf_counter()
    params = [SamplingParams(max_tokens=j.max_tokens, ignore_eos=True, temperature=0.6) for j in jobs]
    streams = [engine.generate(f"r{i}", j.prompt, p) for i, (j, p) in enumerate(zip(jobs, params, strict=True))]
    counts = await asyncio.gather(*(consume(s) for s in streams))
    elapsed = time.perf_counter() - start
    await engine.stop()
    return sum(c for c, _ in counts), elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--profile", default=None, help="write a cProfile of the run here")
    args = p.parse_args()
    args.load_format = "dummy"
    model = model_dir(args)
    prof = cProfile.Profile() if args.profile else None
    if prof:
        prof.enable()
    n, secs = asyncio.run(run(model))
    if prof:
        prof.disable()
        prof.dump_stats(args.profile)
        pstats.Stats(prof).sort_stats("cumulative").print_stats(25)
    print(f"engine alone: {n} output tokens in {secs:.2f} s = {n / secs:,.0f} tok/s", flush=True)


if __name__ == "__main__":
    main()
