"""Failure detection, group re-formation, stage rebuild and checkpoints."""
