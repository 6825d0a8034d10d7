"""The full stack's host path with the device emulated: how fast could one stream go if the GPU's
step took exactly --step-ms?

    python -m bench.host_path [--model bench/qwen3-0.6b] [--step-ms 0.5,1,2] [--launch-us 0] [-- SCHEDULER FLAGS]

Runs the real processes of `nanovllm serve` on the CPU: a worker (`python -m worker_svc`: its gRPC
servicer, executor and watcher threads, and ModelRunner.launch with its real batch layout), the
scheduler and its engine core, and this benchmark's client, which times the single-request
benchmark (bench/throughput.py's `latency`: a 256-token prompt, 512 greedy tokens, three times).
Only the model is replaced: its forward pass returns zeros at once, and each step's sampled tokens
are "ready" --step-ms after the later of its launch and the previous step's end, as on a device
that runs one step at a time. --launch-us adds that much GIL-holding work to each launch, for the
CUDA-graph launch and input copies a GPU step also costs the host.

With the device taking S ms a step, a time per output token of S means the host keeps up with one
stream; anything above it is the host's. The CPU time each process spent per token says which
process it is. On a machine with fewer cores than processes (4 here) they also compete for cores.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
import time

from bench import throughput

WORKER_PORT, SCHEDULER_PORT = 50461, 50451


class EmulatedEvent:
    """A step's completion on a device that runs steps one at a time, each taking `step_s`."""

    lock = threading.Lock()
    device_free = 0.0

    def __init__(self, step_s: float) -> None:
        with EmulatedEvent.lock:
            self.end = max(time.perf_counter(), EmulatedEvent.device_free) + step_s
            EmulatedEvent.device_free = self.end

    def synchronize(self) -> None:
        if (wait := self.end - time.perf_counter()) > 0:
            time.sleep(wait)  # releases the GIL, as waiting for a CUDA event does


def as_worker(step_s: float, launch_s: float, argv: list[str]) -> None:
    """`python -m worker_svc` whose model answers at once and whose steps end on the emulated device."""
    import torch

    from worker_svc import model_runner, server

    init, launched = model_runner.ModelRunner.__init__, model_runner.ModelRunner._launched

    def stub_init(self: model_runner.ModelRunner, *args: object, **kwargs: object) -> None:
        init(self, *args, **kwargs)
        hidden = self.model.model.norm.weight.shape[0]
        self.model.forward = lambda ids, positions, meta: torch.zeros(len(ids), hidden)
        self.model.compute_logits = lambda h: torch.zeros(len(h), 8)  # token 0 wins; no CPU-sized sampling

    def emulated(self: model_runner.ModelRunner, pending: model_runner.Pending) -> model_runner.Pending:
        until = time.perf_counter() + launch_s
        while time.perf_counter() < until:
            pass
        pending.done = EmulatedEvent(step_s)  # type: ignore[assignment]
        return launched(self, pending)

    model_runner.ModelRunner.__init__ = stub_init  # type: ignore[method-assign]
    model_runner.ModelRunner._launched = emulated  # type: ignore[method-assign]
    server.main(argv)


def measure(model: str, step_ms: float, launch_us: float, scheduler_flags: list[str]) -> dict[str, float]:
    """The single-request figures and each process's CPU ms per output token, at one step time."""
    common = ["--model", model, "--max-model-len", "4096"]
    worker_flags = ["--device", "cpu", "--load-format", "dummy", "--port", str(WORKER_PORT)]
    me = [sys.executable, "-m", "bench.host_path", "--as-worker", str(step_ms), str(launch_us), "--"]
    flags = ["--workers", f"127.0.0.1:{WORKER_PORT}", "--port", str(SCHEDULER_PORT), *scheduler_flags]
    sched_cmd = [sys.executable, "-m", "scheduler_svc", *common, *flags]
    with throughput.worker_and_scheduler([*me, *common, *worker_flags], sched_cmd) as (worker, sched):
        pids = {"worker": worker.pid, **throughput.process_tree(sched.pid)}
        before = throughput.cpu_times(pids)
        result = asyncio.run(throughput.latency(f"127.0.0.1:{SCHEDULER_PORT}"))
        after = throughput.cpu_times(pids)
    cpu = {f"cpu_ms_per_token_{role}": 1e3 * (after[role] - before[role]) / throughput.LATENCY_TOKENS for role in after}
    return result | cpu


def main() -> None:
    if sys.argv[1:2] == ["--as-worker"]:
        as_worker(float(sys.argv[2]) / 1e3, float(sys.argv[3]) / 1e6, sys.argv[5:])
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="bench/qwen3-0.6b")
    p.add_argument("--step-ms", default="0.5,1,2", help="emulated device times per step, comma-separated")
    p.add_argument("--launch-us", type=float, default=0.0, help="GIL-holding host work added to each launch")
    p.add_argument("scheduler_flags", nargs="*", help="after --: flags for the scheduler (e.g. --max-inflight-steps)")
    args = p.parse_args()
    args.load_format = "dummy"
    model = throughput.model_dir(args)
    for step_ms in (float(s) for s in args.step_ms.split(",")):
        res = measure(model, step_ms, args.launch_us, args.scheduler_flags)
        cpu = ", ".join(f"{k.removeprefix('cpu_ms_per_token_')} {v:.3f}" for k, v in res.items() if k.startswith("cpu"))
        print(
            f"step {step_ms:.2f} ms, launch +{args.launch_us:.0f} µs: time per output token {res['tpot_ms']:.3f} ms "
            f"(TTFT {res['ttft_ms']:.1f} ms); CPU ms a token: {cpu}",
            flush=True,
        )


if __name__ == "__main__":
    main()
