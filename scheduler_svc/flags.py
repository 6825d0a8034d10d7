"""The scheduler's command-line flags, in a module light enough for `nanovllm health` to start fast."""

from __future__ import annotations

import argparse


def add_args(p: argparse.ArgumentParser) -> None:
    """Scheduler flags; `nanovllm serve` shares them."""
    p.add_argument("--model", required=True, help="model directory (tokenizer + config.json)")
    p.add_argument("--served-model-name", default="", help="name reported by GetModelInfo (default: the dir name)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50051)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--no-prefix-caching", action="store_true", help="turn the prefix cache off")
    p.add_argument(
        "--no-core-process",
        action="store_true",
        help="run the engine core (scheduling, worker streams) in the scheduler's event loop, not a process of its own",
    )
    p.add_argument(
        "--max-inflight-steps",
        type=int,
        default=3,
        choices=(1, 2, 3, 4),
        help="steps sent ahead of the results: 1 waits for each; 3 gives the scheduler a device step of slack",
    )
    p.add_argument(
        "--stream-interval",
        type=int,
        default=1,
        help="tokens per streamed message (the first and last go at once); more eases many streams' gRPC cost",
    )
    p.add_argument(
        "--max-queued-requests", type=int, default=0, help="past this many waiting, RESOURCE_EXHAUSTED (0: unbounded)"
    )
    p.add_argument(
        "--shutdown-timeout", type=float, default=30.0, help="on SIGTERM, seconds to finish in-flight requests"
    )
    p.add_argument(
        "--worker-step-timeout",
        type=float,
        default=120.0,
        help="seconds a step may take before its worker counts as hung and is reconnected (compiles included)",
    )
    p.add_argument(
        "--worker-recovery-timeout",
        type=float,
        default=300.0,
        help="seconds to hold requests while a worker is lost; past it they fail with UNAVAILABLE",
    )
    p.add_argument(
        "--max-prompt-bytes",
        type=int,
        default=1 << 20,
        help="largest text prompt (or total chat content) in UTF-8 bytes, refused before tokenizing",
    )
    p.add_argument("--tls-cert", help="PEM certificate (chain): serve TLS on the public port; needs --tls-key")
    p.add_argument("--tls-key", help="PEM private key of --tls-cert")
    p.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus /metrics here (0: any free port)")
    p.add_argument("--log-interval", type=float, default=5.0, help="seconds between status lines while busy (0: none)")
