"""The `nanovllm` command: `serve` starts the scheduler and its workers here; `generate` streams."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import socket
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client.client import Client
from client.supervisor import WorkerProcesses

FINISH_NAMES = {0: None, 1: "stop", 2: "length", 3: "abort"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds: a port in TIME_WAIT is free
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def worker_commands(args: argparse.Namespace) -> tuple[list[list[str]], list[str]]:
    """The command line of each rank's worker process, and the addresses they will serve on."""
    tp = args.tensor_parallel_size
    dist_port = free_port()
    cmds, addrs = [], []
    for rank in range(tp):
        port = free_port()
        cmd = [sys.executable, "-m", "worker_svc", "--model", args.model, "--port", str(port), "--rank", str(rank)]
        cmd += ["--dist-port", str(dist_port), "--tensor-parallel-size", str(tp)]
        cmd += ["--load-format", args.load_format, "--dtype", args.dtype, "--seed", str(args.seed)]
        cmd += ["--kvcache-block-size", str(args.kvcache_block_size), "--kv-cache-dtype", args.kv_cache_dtype]
        cmd += ["--kv-cache-memory-gb", str(args.kv_cache_memory_gb)]
        cmd += ["--gpu-memory-utilization", str(args.gpu_memory_utilization)]
        cmd += ["--attention-backend", args.attention_backend]
        cmd += ["--max-num-seqs", str(args.max_num_seqs), "--max-num-batched-tokens", str(args.max_num_batched_tokens)]
        # Ctrl-C reaches the workers too: they outwait the scheduler's drain, which closes their streams.
        cmd += ["--shutdown-timeout", str(args.shutdown_timeout + 5)]
        for flag, value in (
            ("--device", args.device),
            ("--max-model-len", args.max_model_len),
            ("--num-kvcache-blocks", args.num_kvcache_blocks),
        ):
            if value is not None:
                cmd += [flag, str(value)]
        if args.enforce_eager:
            cmd.append("--enforce-eager")
        cmds.append(cmd)
        addrs.append(f"127.0.0.1:{port}")
    return cmds, addrs


async def _serve(args: argparse.Namespace, workers: WorkerProcesses, addrs: list[str]) -> int:
    from scheduler_svc.server import Shutdown, engine_config, serve, serve_options

    shutdown = Shutdown()
    shutdown.install()
    watcher = asyncio.create_task(workers.supervise(shutdown.requested.is_set))
    server = asyncio.create_task(serve(engine_config(args, addrs), serve_options(args), shutdown))
    await asyncio.wait({server, watcher}, return_when=asyncio.FIRST_COMPLETED)
    gave_up = watcher.done() and not shutdown.requested.is_set()
    shutdown.now()  # the supervisor gave up on the workers: nothing can finish, no drain
    watcher.cancel()
    try:
        await server
    except Exception as e:
        print(f"nanovllm: the scheduler failed: {e}", file=sys.stderr, flush=True)
        return 1
    return 1 if gave_up or workers.failed() else 0


def cmd_serve(args: argparse.Namespace) -> int:
    if (args.tls_cert is None) != (args.tls_key is None):
        print("nanovllm: --tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    if args.port and not port_free(args.host, args.port):  # before minutes of loading the workers
        print(f"nanovllm: cannot listen on {args.host}:{args.port}: the port is in use", file=sys.stderr)
        return 1
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cmds, addrs = worker_commands(args)
    workers = WorkerProcesses(cmds, addrs)
    workers.start()
    try:
        return asyncio.run(_serve(args, workers, addrs))
    finally:
        workers.stop()


def cmd_generate(args: argparse.Namespace) -> int:
    prompt: str | list[int] | None = args.prompt
    if args.prompt_token_ids is not None:
        prompt = [int(t) for t in args.prompt_token_ids.split(",") if t.strip()]
    messages = None
    if args.chat is not None:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        messages.append({"role": "user", "content": args.chat})
    kwargs = {
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "min_p": args.min_p,
        "seed": args.seed,
        "stop": args.stop or None,
        "stop_token_ids": args.stop_token_ids,
        "min_tokens": args.min_tokens,
        "ignore_eos": args.ignore_eos or None,
        "logprobs": args.logprobs,
    }
    try:
        with Client(args.addr, channel(args)) as client:
            if args.wait:
                try:
                    grpc.channel_ready_future(client.channel).result(timeout=args.wait)
                except grpc.FutureTimeoutError:
                    print(f"nanovllm: no server answered at {args.addr} within {args.wait} s", file=sys.stderr)
                    return 1
            for msg in client.generate(prompt, messages=messages, **kwargs):
                if args.json:
                    out = {
                        "token_ids": list(msg.token_ids),
                        "text": msg.text,
                        "finish_reason": FINISH_NAMES[msg.finish_reason],
                    }
                    if msg.logprobs:
                        out["logprobs"] = [
                            {
                                "token_id": lp.token_id,
                                "logprob": lp.logprob,
                                "top": {t.token_id: t.logprob for t in lp.top},
                            }
                            for lp in msg.logprobs
                        ]
                    if msg.HasField("usage"):
                        out["usage"] = {
                            "prompt_tokens": msg.usage.prompt_tokens,
                            "completion_tokens": msg.usage.completion_tokens,
                            "cached_prompt_tokens": msg.usage.cached_prompt_tokens,
                        }
                    print(json.dumps(out, ensure_ascii=False), flush=True)
                else:
                    print(msg.text, end="", flush=True)
        if not args.json:
            print()
    except grpc.RpcError as e:
        print(f"nanovllm: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    return 0


def channel(args: argparse.Namespace) -> grpc.Channel:
    if not (args.tls or args.tls_ca):
        return grpc.insecure_channel(args.addr)
    ca = Path(args.tls_ca).read_bytes() if args.tls_ca else None  # None: the system's roots
    options = [("grpc.ssl_target_name_override", args.tls_server_name)] if args.tls_server_name else []
    return grpc.secure_channel(args.addr, grpc.ssl_channel_credentials(ca), options=options)


def cmd_health(args: argparse.Namespace) -> int:
    """Standard gRPC health check, as compose's healthcheck runs it: exit 0 only when SERVING."""
    with channel(args) as ch:
        try:
            res = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.RpcError as e:
            print(f"nanovllm: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    print(health_pb2.HealthCheckResponse.ServingStatus.Name(res.status))
    return 0 if res.status == health_pb2.HealthCheckResponse.SERVING else 1


def add_connection_args(p: argparse.ArgumentParser, port: int) -> None:
    p.add_argument("--addr", default=f"127.0.0.1:{port}")
    p.add_argument("--tls", action="store_true", help="connect with TLS, trusting the system's roots")
    p.add_argument("--tls-ca", help="connect with TLS, trusting this PEM CA certificate")
    p.add_argument("--tls-server-name", help="name the server certificate must carry, if not the --addr host")


def parser() -> argparse.ArgumentParser:
    from scheduler_svc.flags import add_args as add_scheduler_args
    from worker_svc.flags import add_args as add_worker_args

    p = argparse.ArgumentParser(prog="nanovllm", description="nanovllm-grpc: serve and call an LLM over gRPC")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="start the scheduler and its worker process(es) on this machine")
    add_scheduler_args(s)
    add_worker_args(s)
    s.set_defaults(func=cmd_serve)

    g = sub.add_parser("generate", help="stream a generation from a running server")
    add_connection_args(g, 50051)
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt")
    src.add_argument("--prompt-token-ids", help="comma-separated token ids")
    src.add_argument("--chat", help="a user message, rendered with the model's chat template")
    g.add_argument("--system", help="a system message before --chat")
    g.add_argument("--max-tokens", type=int)
    g.add_argument("--temperature", type=float)
    g.add_argument("--top-p", type=float)
    g.add_argument("--top-k", type=int)
    g.add_argument("--min-p", type=float)
    g.add_argument("--seed", type=int)
    g.add_argument("--stop", nargs="*", help="stop strings")
    g.add_argument("--stop-token-ids", type=int, nargs="*")
    g.add_argument("--min-tokens", type=int)
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--logprobs", type=int)
    g.add_argument("--json", action="store_true", help="one JSON object per streamed message")
    g.add_argument("--wait", type=float, default=0, help="seconds to wait for the server to come up")
    g.set_defaults(func=cmd_generate)

    h = sub.add_parser("health", help="standard gRPC health check of a scheduler or worker; exit 0 if SERVING")
    add_connection_args(h, 50051)
    h.add_argument("--service", default="", help="service name (default: the whole server)")
    h.add_argument("--timeout", type=float, default=5.0)
    h.set_defaults(func=cmd_health)
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    sys.exit(args.func(args))


if __name__ == "__main__":
    main()
