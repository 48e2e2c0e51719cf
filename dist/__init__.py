"""The grid (topology), process groups, pipeline schedule and byte accounting."""
