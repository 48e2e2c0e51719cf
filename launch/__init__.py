"""How processes get started: torchrun, multi-node, SLURM, spot agent, chaos."""
