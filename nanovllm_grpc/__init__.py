"""The `nanovllm` command and what the services share: the version and the settings helper."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("nanovllm-grpc")
except PackageNotFoundError:  # run from a checkout that was never installed
    __version__ = "0+unknown"
