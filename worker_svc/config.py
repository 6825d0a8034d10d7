"""The worker's settings, one field each: its flags are built from them (nanovllm_grpc/settings.py),
and they are checked once at start, so mistakes surface before any weights load."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from nanovllm_grpc.settings import setting

LOAD_FORMATS = ("auto", "dummy")
DEVICES = ("cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")
ATTENTION_BACKENDS = ("auto", "torch", "triton", "flash-attn")
KV_CACHE_DTYPES = ("auto", "fp8")
# Where one process serves and which rank it is: `nanovllm serve` sets these for each worker it starts.
PER_PROCESS = ("host", "port", "rank", "dist_addr", "dist_port", "shutdown_timeout")


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def _positive(name: str, value: float) -> None:
    if value <= 0:
        raise ValueError(f"{name} must be positive; got {value}")


@dataclass(frozen=True)
class WorkerConfig:
    model: str = setting(help="model directory in the Hugging Face layout: config.json, *.safetensors")
    host: str = setting("127.0.0.1", "address to serve the Worker and health services on")
    port: int = setting(50061, "port to serve on (0: any free port)")
    rank: int = setting(0, "this process's tensor-parallel rank")
    dist_addr: str = setting("127.0.0.1", "address of rank 0's process-group store")
    dist_port: int = setting(29500, "port of rank 0's process-group store")
    shutdown_timeout: float = setting(30.0, "on SIGTERM, seconds to wait for the scheduler to leave")
    load_format: str = setting("auto", "dummy: random weights from config.json, for benchmarks", choices=LOAD_FORMATS)
    device: str | None = setting(None, "default: cuda when available, else cpu", choices=DEVICES)
    dtype: str = setting("auto", "auto: the checkpoint's torch_dtype on cuda, float32 on cpu", choices=DTYPES)
    max_model_len: int | None = setting(None, "longest prompt + output (default: the model's)")
    max_num_seqs: int = setting(256, "most sequences in one step: sizes the CUDA graphs and batch buffers")
    max_num_batched_tokens: int = setting(8192, "most tokens in one step (prefill chunks included)")
    block_size: int = setting(16, "tokens per KV cache block", flag="--kvcache-block-size")
    # "fp8": K and V stored as float8 e4m3 (scale 1, saturating at +-448), half the bytes of bf16:
    # decode reads the cache every step, so this halves its dominant cost, at some accuracy.
    kv_cache_dtype: str = setting(
        "auto", "fp8: e4m3, half the bytes (auto: the model's dtype)", choices=KV_CACHE_DTYPES
    )
    num_kv_blocks: int | None = setting(
        None, "KV cache blocks (default: as many as the memory budget allows)", flag="--num-kvcache-blocks"
    )
    kv_cache_memory_gb: float = setting(1.0, "KV cache budget in GiB on cpu")
    gpu_memory_utilization: float = setting(0.9, "share of the GPU this worker may fill on cuda")
    enforce_eager: bool = setting(False, "never capture CUDA graphs")
    prefill_graph_tokens: int = setting(
        2048, "prefill and mixed steps of up to this many tokens replay CUDA graphs (0: decode steps only)"
    )
    # Off: on the CPU the compiled regions saved nothing (the matmuls are the step) and cost start-up time.
    compile: bool = setting(False, "torch.compile the decoder layers (models/regions.py), not our fused kernels")
    attention_backend: str = setting("auto", "attention kernels", choices=ATTENTION_BACKENDS)
    tensor_parallel_size: int = setting(1, "ranks (one process each) that share the model")
    seed: int = setting(0, "sampling seed of requests that bring none")

    def __post_init__(self) -> None:
        if not (Path(self.model) / "config.json").is_file():
            raise ValueError(f"model must be a directory holding config.json; {self.model!r} is not")
        _choice("load_format", self.load_format, LOAD_FORMATS)
        if self.device is not None:
            _choice("device", self.device, DEVICES)
        _choice("dtype", self.dtype, DTYPES)
        _choice("attention_backend", self.attention_backend, ATTENTION_BACKENDS)
        _choice("kv_cache_dtype", self.kv_cache_dtype, KV_CACHE_DTYPES)
        if self.kv_cache_dtype == "fp8" and self.attention_backend == "flash-attn":
            raise ValueError("kv_cache_dtype 'fp8' needs the triton or torch attention backend, not flash-attn")
        if self.device == "cpu" and self.attention_backend in ("triton", "flash-attn"):
            raise ValueError(f"attention_backend {self.attention_backend!r} needs device 'cuda'")
        if self.max_model_len is not None:
            _positive("max_model_len", self.max_model_len)
        _positive("max_num_seqs", self.max_num_seqs)
        _positive("max_num_batched_tokens", self.max_num_batched_tokens)
        _positive("block_size", self.block_size)
        if self.prefill_graph_tokens < 0:
            raise ValueError(f"prefill_graph_tokens must be >= 0; got {self.prefill_graph_tokens}")
        if self.num_kv_blocks is not None:
            _positive("num_kv_blocks", self.num_kv_blocks)
        _positive("kv_cache_memory_gb", self.kv_cache_memory_gb)
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(
                f"gpu_memory_utilization is a share of the GPU, in (0, 1]; got {self.gpu_memory_utilization}"
            )
        _positive("tensor_parallel_size", self.tensor_parallel_size)
        if not 0 <= self.rank < self.tensor_parallel_size:
            raise ValueError(f"rank must be in [0, {self.tensor_parallel_size}); got {self.rank}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0; got {self.seed}")
