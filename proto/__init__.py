"""Generated gRPC stubs for the public API and the worker protocol (see gen.sh)."""

# Initial metadata a worker sends on the Step stream once it is the scheduler's: a scheduler that
# reconnects knows its stream was accepted, not refused because the old one has not ended yet.
STEP_ACCEPTED = "nanovllm-step-accepted"
