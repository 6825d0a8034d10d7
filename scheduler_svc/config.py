"""The scheduler's settings, one field each: its flags are built from them (nanovllm_grpc/settings.py).

`SchedulerConfig` is what the frontend and the public server read; its slice `CoreConfig` is what the
engine core reads, handed to it whole (across the process boundary when the core runs apart). The
batch limits default to the workers' own (worker_svc/config.py): set here, they only lower them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from nanovllm_grpc.settings import setting

MAX_INFLIGHT_STEPS = 4


def _addresses(text: str) -> tuple[str, ...]:
    return tuple(a.strip() for a in text.split(",") if a.strip())


@dataclass(frozen=True)
class CoreConfig:
    max_num_seqs: int | None = setting(None, "most sequences running at once (default: the workers')")
    max_num_batched_tokens: int | None = setting(None, "most tokens in one step (default: the workers')")
    max_model_len: int | None = setting(None, "longest prompt + output (default: the workers')")
    enable_prefix_caching: bool = setting(True, "turn the prefix cache off", flag="--no-prefix-caching")
    max_inflight_steps: int = setting(
        3,
        "steps sent ahead of the results: 1 waits for each; 3 gives the scheduler a device step of slack",
        choices=tuple(range(1, MAX_INFLIGHT_STEPS + 1)),
    )
    # Generous: a step that meets a new kernel variant compiles it first, for seconds on a GPU.
    worker_step_timeout: float = setting(
        120.0, "seconds a step may take before its worker counts as hung and is reconnected (compiles included)"
    )
    # A GPU worker that restarts reloads its weights and recaptures its CUDA graphs.
    worker_recovery_timeout: float = setting(
        300.0, "seconds to hold requests while a worker is lost; past it they fail with UNAVAILABLE"
    )

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if (value := getattr(self, name)) is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        for name in ("worker_step_timeout", "worker_recovery_timeout"):
            if (value := getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        if not 1 <= self.max_inflight_steps <= MAX_INFLIGHT_STEPS:
            raise ValueError(f"max_inflight_steps must be 1 to {MAX_INFLIGHT_STEPS}, got {self.max_inflight_steps}")

    def within(self, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int) -> CoreConfig:
        """These limits capped by the workers' (which also fill in the unset ones)."""
        return replace(
            self,
            max_num_seqs=min(self.max_num_seqs or max_num_seqs, max_num_seqs),
            max_num_batched_tokens=min(self.max_num_batched_tokens or max_num_batched_tokens, max_num_batched_tokens),
            max_model_len=min(self.max_model_len or max_model_len, max_model_len),
        )


@dataclass(frozen=True)
class SchedulerConfig:
    model: str = setting(help="model directory: its tokenizer and config.json")
    workers: tuple[str, ...] = setting(help="comma-separated worker addresses, rank 0 first", parse=_addresses)
    served_model_name: str = setting("", "name reported by GetModelInfo (default: the model directory's name)")
    host: str = setting("127.0.0.1", "address to serve the public API on")
    port: int = setting(50051, "public port (0: any free port)")
    tls_cert: str | None = setting(None, "PEM certificate (chain): serve TLS on the public port; needs --tls-key")
    tls_key: str | None = setting(None, "PEM private key of --tls-cert")
    metrics_port: int | None = setting(None, "serve Prometheus /metrics on this port (0: any free port; default: none)")
    log_interval: float = setting(5.0, "seconds between status lines while busy (0: none)")
    shutdown_timeout: float = setting(30.0, "on SIGTERM, seconds to finish in-flight requests")
    # Each message costs both ends tens of microseconds of Python gRPC, so with hundreds of streams a
    # few tokens a message keep the scheduler process and its clients from becoming the bottleneck.
    stream_interval: int = setting(1, "tokens per streamed message (the first and last go at once)")
    max_queued_requests: int = setting(0, "past this many waiting, RESOURCE_EXHAUSTED (0: unbounded)")
    max_prompt_bytes: int = setting(
        1 << 20, "largest text prompt (or total chat content) in UTF-8 bytes, refused before tokenizing"
    )
    # Apart, streaming and scheduling do not share one Python thread.
    core_process: bool = setting(
        True,
        "run the engine core (scheduling, worker streams) in the scheduler's event loop, not a process of its own",
        flag="--no-core-process",
    )
    core: CoreConfig = field(default_factory=CoreConfig)

    def __post_init__(self) -> None:
        if not Path(self.model).is_dir():
            raise ValueError(f"model directory {self.model!r} does not exist")
        if not self.workers:
            raise ValueError("workers is empty: give at least one worker address")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.stream_interval < 1:
            raise ValueError(f"stream_interval must be at least 1, got {self.stream_interval}")
        if self.max_queued_requests < 0:
            raise ValueError(f"max_queued_requests must be >= 0, got {self.max_queued_requests}")
        if self.max_prompt_bytes < 1:
            raise ValueError(f"max_prompt_bytes must be >= 1, got {self.max_prompt_bytes}")

    @property
    def model_name(self) -> str:
        return self.served_model_name or Path(self.model).name
