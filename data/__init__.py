"""Corpus reading, tokenising, packing and the deterministic resumable loader."""
