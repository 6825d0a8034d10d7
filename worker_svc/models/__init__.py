"""Model architectures the worker can run, by the `model_type` of their config.json."""

from __future__ import annotations

from worker_svc.models.qwen3 import Qwen3ForCausalLM

MODELS = {"qwen3": Qwen3ForCausalLM}
