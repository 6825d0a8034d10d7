"""Python client for the nanovllm Generation API: needs grpc and the protos only, never the server."""

from client.client import AsyncClient, Client, Stream
from client.types import Logprob, Output, Sampling, Usage

__all__ = ["AsyncClient", "Client", "Logprob", "Output", "Sampling", "Stream", "Usage"]
