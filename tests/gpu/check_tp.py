"""Tensor parallelism on GPUs: TP=N tokens against TP=1, through `nanovllm serve` and gRPC.

Run on a machine with N GPUs from the repo root:
    PYTHONPATH=. python3 tests/gpu/check_tp.py [--tp 2] [--prompts 32]
Writes random Qwen3-0.6B-shaped bf16 weights with transformers (the same at every TP size, unlike
`--load-format dummy`, which draws each rank's shard on its own), serves them at TP=1 and TP=N in
turn, and checks that the first 32 tokens agree for at least 95% of prompts, three ways: greedy
and seeded T=0.8 (each rank draws from its vocabulary shard, and the ranks swap their best
candidates), and seeded T=0.8 with top-k 50 (rank 0 gathers the logits and broadcasts its choice).
It runs in float32: on random weights bf16 rounding alone decides greedy choices (transformers'
own bf16 and fp32 runs agree on no prompt, docs/lab-notes.md), and each TP size sums partial
products in another order. Exits 1 on failure.
Throughput at each size: `python3 -m bench.throughput --model bench/qwen3-0.6b --modes full --tp N`.

Larger shapes: `--config ../shared/models/qwen3-32b/config.json --layers 8` keeps the model's widths
(hidden size, heads, MLP) but only its first 8 layers, so that the float32 weights fit one GPU for
the TP=1 reference (Qwen3-32B's 64 layers would take 128 GB). Every matmul and collective of a
layer is still the real one's shape.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
from pathlib import Path

from bench.make_model import write as write_model
from bench.throughput import start_server
from client import Client
from tests.gpu.check_worker import NEW_TOKENS, write_checkpoint

MODES: dict[str, dict[str, float]] = {
    "greedy": {"temperature": 0.0},
    "seeded T=0.8 (sharded draw)": {"temperature": 0.8},
    "seeded T=0.8 top-k 50 (gathered logits)": {"temperature": 0.8, "top_k": 50},
}


def generate(port: int, prompts: list[list[int]], sampling: dict[str, float]) -> list[list[int]]:
    out: list[list[int]] = [[] for _ in prompts]

    def one(i: int) -> None:
        with Client(f"127.0.0.1:{port}") as c:
            for msg in c.generate(prompts[i], max_tokens=NEW_TOKENS, ignore_eos=True, seed=i, **sampling):
                out[i].extend(msg.token_ids)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--config", default="bench/qwen3-0.6b/config.json")
    p.add_argument("--layers", type=int, default=0, help="keep only the first N layers (0: all)")
    p.add_argument("--device", default="cuda", help="cpu: a smoke run of the script itself (gloo)")
    args = p.parse_args()
    cfg = json.loads(Path(args.config).read_text())
    if args.layers:
        cfg["num_hidden_layers"] = cfg["max_window_layers"] = args.layers
    ckpt = Path(f"/tmp/{Path(args.config).parent.name}-{cfg['num_hidden_layers']}-layers-random-tp")
    config = Path(f"{ckpt}.json")  # (with_suffix would cut "qwen3-0.6b-..." at its dot)
    config.write_text(json.dumps(cfg, indent=2))
    write_model(config, ckpt)  # a full-vocabulary tokenizer for the scheduler
    write_checkpoint(config, ckpt, seed=0)
    rng = random.Random(0)
    vocab = min(cfg["vocab_size"], 150_000)  # ids the synthetic tokenizer decodes
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(8, 300))] for _ in range(args.prompts)]
    results = {}
    for tp, port in ((1, 50251), (args.tp, 50252)):
        flags = ["--tensor-parallel-size", str(tp), "--dtype", "float32", "--device", args.device]
        proc, _ = start_server(str(ckpt), port, [*flags, "--max-model-len", "1024", "--max-num-seqs", "64"])
        try:
            results[tp] = {mode: generate(port, prompts, sampling) for mode, sampling in MODES.items()}
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    ok = True
    for mode in MODES:
        agree = sum(a == b for a, b in zip(results[1][mode], results[args.tp][mode], strict=True))
        share = agree / len(prompts)
        ok &= share >= 0.95
        print(f"TP={args.tp} vs TP=1, {mode}: {agree}/{len(prompts)} agree on {NEW_TOKENS} tokens ({share:.1%})")
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
