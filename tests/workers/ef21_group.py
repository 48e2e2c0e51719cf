"""Every EF21 variant over a real gloo group: each round, record whether every rank holds the same g
and whether g == mean_i g_i. Run: torchrun --nproc-per-node=N tests/workers/ef21_group.py <out_dir>"""
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from dist.comm import CROSS, Comm  # noqa: E402
from optim.ef21 import ErrorFeedback  # noqa: E402


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank, n = dist.get_rank(), dist.get_world_size()
    group = dist.new_group(list(range(n)))
    d, rounds, results = 5000, 8, {}
    for kind in ("ef21", "ef21sgdm", "ef14"):
        for comp in ("topk", "randk", "int8"):
            comm = Comm()
            ef = ErrorFeedback(kind, comp, ratio=0.01, eta=0.1, chunk=1000, seed=5, comm=comm, group=group,
                               link=CROSS, n=n)
            same, invariant = [], []
            for r in range(rounds):
                x = torch.randn(d, generator=torch.Generator().manual_seed(100 * r + rank))
                g = ef.aggregate(x)
                gs = [torch.empty_like(g) for _ in range(n)]
                dist.all_gather(gs, g)
                same.append(all(torch.equal(gs[0], o) for o in gs))
                if kind != "ef14":
                    gis = [torch.empty_like(g) for _ in range(n)]
                    dist.all_gather(gis, ef.g_i)
                    invariant.append(float((torch.stack(gis).mean(0) - g).abs().max()))
            dense_round = 2 * (n - 1) / n * d * 4  # what an fp32 all-reduce sends per round
            first = dense_round if kind != "ef14" else 0  # EF21's dense first round
            compressed_rounds = rounds if kind == "ef14" else rounds - 1
            results[f"{kind}-{comp}"] = {"same": same, "invariant": invariant,
                                         "ratio": dense_round * compressed_rounds / (comm.bytes_sent[CROSS] - first)}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump(results, fh)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
