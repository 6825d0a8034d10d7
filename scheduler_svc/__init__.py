"""The scheduler service: requests, KV block accounting, batching and streaming. No GPU, no CUDA."""
