"""What the scheduler's and the workers' processes share at run time."""

from __future__ import annotations

import gc

# A step carries every new sequence's whole prompt; gRPC's 4 MiB default would refuse a batch of
# long prompts, so the step stream between the scheduler and its workers allows 256 MiB.
STEP_STREAM_OPTIONS = [("grpc.max_send_message_length", 256 << 20), ("grpc.max_receive_message_length", 256 << 20)]


def settle_heap() -> None:
    """Takes what start-up allocated (tokenizer, modules, weights' Python objects) out of the garbage
    collector's sight and makes collections rarer. Each step makes thousands of short-lived objects;
    with the default thresholds the collections they trigger kept walking the whole start-up heap,
    a fifth or more of a large step's host time."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)
