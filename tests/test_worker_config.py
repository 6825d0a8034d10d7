"""Worker settings and checkpoint config parsing reject what would fail later, with a clear message."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from worker_svc.config import WorkerConfig
from worker_svc.model_runner import ModelRunner
from worker_svc.models.arch import ModelArch


def test_defaults_are_valid(tiny_model_dir: Path) -> None:
    config = WorkerConfig(str(tiny_model_dir))
    assert (config.device, config.dtype, config.block_size) == (None, "auto", 16)  # None: cuda when available


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"device": "tpu"}, "device must be one of"),
        ({"dtype": "int8"}, "dtype must be one of"),
        ({"load_format": "pt"}, "load_format must be one of"),
        ({"attention_backend": "flash-attn", "device": "cpu"}, "needs device 'cuda'"),
        ({"block_size": 0}, "block_size must be positive"),
        ({"num_kv_blocks": 0}, "num_kv_blocks must be positive"),
        ({"gpu_memory_utilization": 1.5}, r"in \(0, 1\]"),
        ({"tensor_parallel_size": 0}, "tensor_parallel_size must be positive"),
        ({"max_model_len": -1}, "max_model_len must be positive"),
        ({"kv_cache_dtype": "int4"}, "kv_cache_dtype must be one of"),
        ({"kv_cache_dtype": "fp8", "device": "cuda", "attention_backend": "flash-attn"}, "not flash-attn"),
    ],
)
def test_bad_settings_are_rejected(tiny_model_dir: Path, overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        WorkerConfig(str(tiny_model_dir), **overrides)


def test_model_dir_needs_config_json(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"config\.json"):
        WorkerConfig(str(tmp_path))


def test_arch_reads_old_and_new_rope_layouts(tiny_model_dir: Path, tmp_path: Path) -> None:
    assert ModelArch.read(tiny_model_dir).rope_theta == 10000.0
    raw = json.loads((tiny_model_dir / "config.json").read_text())
    del raw["rope_parameters"]
    raw |= {"rope_theta": 1e6, "rope_scaling": None}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert ModelArch.read(tmp_path).rope_theta == 1e6
    raw["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="yarn"):
        ModelArch.read(tmp_path)


def test_runner_rejects_what_the_model_cannot_do(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="exceeds the model's 512 positions"):
        ModelRunner(WorkerConfig(str(tiny_model_dir), max_model_len=1024))
    with pytest.raises(ValueError, match="world_size 2 differs"):
        ModelRunner(WorkerConfig(str(tiny_model_dir)), world_size=2)
    shutil.copy(tiny_model_dir / "config.json", tmp_path / "config.json")
    with pytest.raises(ValueError, match=r"no \*\.safetensors"):
        ModelRunner(WorkerConfig(str(tmp_path)))


def test_arch_rejects_tp_sizes_that_split_heads(tiny_model_dir: Path) -> None:
    arch = ModelArch.read(tiny_model_dir)  # 4 query heads, 2 key/value heads
    arch.check_tensor_parallel(2)
    with pytest.raises(ValueError, match=r"num_attention_heads \(4\) is not divisible by tensor_parallel_size \(3\)"):
        arch.check_tensor_parallel(3)
    with pytest.raises(ValueError, match=r"num_key_value_heads \(2\) is not divisible by tensor_parallel_size \(4\)"):
        arch.check_tensor_parallel(4)
