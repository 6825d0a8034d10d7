"""Settings of one worker process, checked once at start so mistakes surface before any weights load."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

LOAD_FORMATS = ("auto", "dummy")
DEVICES = ("cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")
ATTENTION_BACKENDS = ("auto", "torch", "triton", "flash-attn")
KV_CACHE_DTYPES = ("auto", "fp8")


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def _positive(name: str, value: float) -> None:
    if value <= 0:
        raise ValueError(f"{name} must be positive; got {value}")


@dataclass(frozen=True)
class WorkerConfig:
    model: str  # a Hugging Face layout directory: config.json plus *.safetensors
    load_format: str = "auto"  # "dummy": random weights from config.json alone, for benchmarks
    device: str = "cpu"
    dtype: str = "auto"  # "auto": the checkpoint's torch_dtype on cuda, float32 on cpu
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    block_size: int = 16
    # "fp8": K and V stored as float8 e4m3 (scale 1, saturating at +-448), half the bytes of bf16:
    # decode reads the cache every step, so this halves its dominant cost, at some accuracy.
    kv_cache_dtype: str = "auto"  # "auto": the model dtype
    num_kv_blocks: int | None = None  # None: as many as the memory budget below allows
    kv_cache_memory_gb: float = 1.0  # KV cache budget in GiB on cpu
    gpu_memory_utilization: float = 0.9  # share of the GPU this worker may fill on cuda
    enforce_eager: bool = False  # True: never capture CUDA graphs
    # torch.compile the decoder layers' regions (models/regions.py) in place of our fused kernels.
    # Off: on the CPU it saved nothing (the matmuls are the step) and costs start-up time.
    compile: bool = False
    attention_backend: str = "auto"
    tensor_parallel_size: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if not (Path(self.model) / "config.json").is_file():
            raise ValueError(f"model must be a directory holding config.json; {self.model!r} is not")
        _choice("load_format", self.load_format, LOAD_FORMATS)
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
        if self.num_kv_blocks is not None:
            _positive("num_kv_blocks", self.num_kv_blocks)
        _positive("kv_cache_memory_gb", self.kv_cache_memory_gb)
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(
                f"gpu_memory_utilization is a share of the GPU, in (0, 1]; got {self.gpu_memory_utilization}"
            )
        _positive("tensor_parallel_size", self.tensor_parallel_size)
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0; got {self.seed}")
