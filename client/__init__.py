"""Python client for the nanovllm Generation API, and the `nanovllm` command line."""

from client.client import AsyncClient, Client, sampling_params

__all__ = ["AsyncClient", "Client", "sampling_params"]
