"""Llama-style decoder and its split into pipeline stages; knows nothing of processes."""
