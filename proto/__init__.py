"""Generated gRPC stubs for the public API and the worker protocol (see gen.sh)."""
