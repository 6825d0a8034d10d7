"""The `nanovllm` command: `serve` starts a scheduler and its workers here; `generate` and `health`
are the client's (client/cli.py)."""

from __future__ import annotations

import argparse
import sys

from client.cli import add_client_commands
from nanovllm_grpc import __version__


def parser() -> argparse.ArgumentParser:
    from nanovllm_grpc.launch import add_serve_flags, cmd_serve

    p = argparse.ArgumentParser(prog="nanovllm", description="nanovllm-grpc: serve and call an LLM over gRPC")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="start the scheduler and its worker process(es) on this machine")
    add_serve_flags(s)
    s.set_defaults(func=cmd_serve)
    add_client_commands(sub)
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    sys.exit(args.func(args))
