"""The client's commands: `generate` streams a generation, `health` runs the standard health check."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client.client import Client, generate_request
from client.types import Output


def token_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"--prompt-token-ids takes comma-separated integers, got {text!r}") from None


def as_json(out: Output) -> dict[str, Any]:
    msg: dict[str, Any] = {"token_ids": out.token_ids, "text": out.text, "finish_reason": out.finish_reason}
    if out.logprobs:
        msg["logprobs"] = [{"token_id": lp.token_id, "logprob": lp.logprob, "top": lp.top} for lp in out.logprobs]
    if out.usage is not None:
        msg["usage"] = dataclasses.asdict(out.usage)
    return msg


def cmd_generate(args: argparse.Namespace) -> int:
    messages = None
    if args.chat is not None:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        messages.append({"role": "user", "content": args.chat})
    sampling = {
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "min_p": args.min_p,
        "seed": args.seed,
        "stop": args.stop or (),
        "stop_token_ids": args.stop_token_ids or (),
        "min_tokens": args.min_tokens,
        "ignore_eos": args.ignore_eos,
        "logprobs": args.logprobs,
        "json_schema": args.json_schema,
        "regex": args.regex,
        "grammar": args.grammar,
        "structural_tag": args.structural_tag,
        "json_object": args.json_object,
        "choice": args.choice or (),
    }
    try:
        prompt = token_ids(args.prompt_token_ids) if args.prompt_token_ids is not None else args.prompt
        request = generate_request(prompt, messages=messages, **sampling)  # checks what the wire can carry
    except ValueError as e:  # said as the server says what it refuses
        print(f"nanovllm: INVALID_ARGUMENT: {e}", file=sys.stderr)
        return 1
    try:
        with Client(args.addr, channel(args)) as client:
            if args.wait and not wait_serving(client.channel, args.wait):
                print(f"nanovllm: no server at {args.addr} was serving within {args.wait:g} s", file=sys.stderr)
                return 1
            for out in client.stream(request):
                if args.json:
                    print(json.dumps(as_json(out), ensure_ascii=False), flush=True)
                else:
                    print(out.text, end="", flush=True)
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


def wait_serving(ch: grpc.Channel, timeout: float) -> bool:
    """Waits until the server's health check says SERVING: its port opens before its workers are ready."""
    deadline = time.monotonic() + timeout
    check = health_pb2_grpc.HealthStub(ch).Check
    while (left := deadline - time.monotonic()) > 0:
        try:
            res = check(health_pb2.HealthCheckRequest(), timeout=min(left, 5.0), wait_for_ready=True)
            if res.status == health_pb2.HealthCheckResponse.SERVING:
                return True
        except grpc.RpcError:
            pass
        time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
    return False


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
    p.add_argument("--addr", default=f"127.0.0.1:{port}", help=f"server address (default: 127.0.0.1:{port})")
    p.add_argument("--tls", action="store_true", help="connect with TLS, trusting the system's roots")
    p.add_argument("--tls-ca", help="connect with TLS, trusting this PEM CA certificate")
    p.add_argument("--tls-server-name", help="name the server certificate must carry, if not the --addr host")


def add_client_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`generate` and `health`, for `nanovllm` and `nanovllm-client` alike."""
    g = sub.add_parser("generate", help="stream a generation from a running server")
    add_connection_args(g, 50051)
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="a text prompt")
    src.add_argument("--prompt-token-ids", help="comma-separated token ids")
    src.add_argument("--chat", help="a user message, rendered with the model's chat template")
    g.add_argument("--system", help="a system message before --chat")
    g.add_argument("--max-tokens", type=int, help="tokens to generate at most (default: the server's, 16)")
    g.add_argument("--temperature", type=float, help="0: greedy (default: the server's, 1.0)")
    g.add_argument("--top-p", type=float, help="nucleus share, in (0, 1] (default: the server's, 1.0)")
    g.add_argument("--top-k", type=int, help="best k tokens only; 0 or -1: all (default: the server's, 0)")
    g.add_argument("--min-p", type=float, help="drop tokens below min-p x the best's probability (default: 0)")
    g.add_argument("--seed", type=int, help="makes sampling reproducible (default: none)")
    g.add_argument("--stop", nargs="*", help="stop strings, left out of the text (default: none)")
    g.add_argument("--stop-token-ids", type=int, nargs="*", help="stop tokens, kept in the output (default: none)")
    g.add_argument("--min-tokens", type=int, help="no EOS or stop token before this many (default: 0)")
    g.add_argument("--ignore-eos", action="store_true", help="generate --max-tokens whatever the model says")
    g.add_argument("--logprobs", type=int, help="top logprobs per token, with --json (default: 0, none)")
    g.add_argument("--json", action="store_true", help="one JSON object per streamed message")
    c = g.add_mutually_exclusive_group()  # structured output: every token keeps the output valid
    c.add_argument("--json-schema", help="the output is JSON valid against this schema (JSON text)")
    c.add_argument("--regex", help="the whole output matches this regular expression")
    c.add_argument("--grammar", help="the output follows this EBNF grammar (xgrammar's dialect: root ::= ...)")
    c.add_argument("--structural-tag", help="xgrammar's structural tag (JSON text)")
    c.add_argument("--json-object", action="store_true", help="the output is a JSON object")
    c.add_argument("--choice", nargs="+", help="the output is exactly one of these strings")
    g.add_argument("--wait", type=float, default=0, help="seconds to wait for the server to be serving (default: 0)")
    g.set_defaults(func=cmd_generate)

    h = sub.add_parser("health", help="standard gRPC health check of a scheduler or worker; exit 0 if SERVING")
    add_connection_args(h, 50051)
    h.add_argument("--service", default="", help="service name (default: the whole server)")
    h.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the answer (default: 5)")
    h.set_defaults(func=cmd_health)


def main(argv: list[str] | None = None) -> None:
    """`nanovllm-client`: the client's commands alone, for an install without the server."""
    p = argparse.ArgumentParser(prog="nanovllm-client", description="call a nanovllm-grpc server")
    add_client_commands(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(argv)
    sys.exit(args.func(args))


if __name__ == "__main__":
    main()
