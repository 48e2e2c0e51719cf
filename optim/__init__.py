"""Inner optimizer, learning-rate schedule and gradient sync across replicas."""
