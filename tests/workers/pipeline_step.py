"""One pipeline training step over real processes; each rank saves its loss and gradients (by global name).

Run: torchrun --nproc-per-node=<replicas*stages> tests/workers/pipeline_step.py <out_dir> <stages> <gpipe|1f1b|swap> <microbatches>
"""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from dist.comm import Comm  # noqa: E402
from dist.groups import build_groups  # noqa: E402
from dist.pipeline import swap_route, train_step, train_step_routes  # noqa: E402
from dist.topology import Topology  # noqa: E402
from model.stages import build_stage  # noqa: E402
from tests.tiny import tiny_batch, tiny_model_config  # noqa: E402


def main(out_dir: str, stages: int, kind: str, microbatches: int) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    topo = Topology(dist.get_world_size() // stages, stages)
    replica, stage = topo.slot(rank)
    groups = build_groups(topo, rank, timeout_s=60, swap=kind == "swap")
    cfg = tiny_model_config()
    module = build_stage(cfg, stage, stages, max_seq_len=32, seed=7)
    batch = tiny_batch(cfg, seed=replica)
    comm = Comm()
    if kind == "swap":  # CheckFree+'s out-of-order micro-batches
        routes = [swap_route(stages, i) for i in range(microbatches)]
        loss = train_step_routes(module, batch.split(microbatches), routes, groups, comm, stage, batch.n_tokens)
    else:
        loss = train_step(module, batch.split(microbatches), [(replica, replica)] * microbatches, groups, comm, kind,
                          stage, stages, batch.n_tokens)
    grads = {n: p.grad for n, p in module.named_parameters()}
    torch.save({"loss": loss, "grads": grads, "bytes": comm.totals()}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
