"""Ulysses attention over SP groups of 2 and 4 lanes against one device; each rank saves its max errors.

Run: torchrun --nproc-per-node=4 tests/workers/sp_attention.py <out_dir>
"""
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from dist.sp_attention import MaskedAttention, Ulysses  # noqa: E402
from model.llama import document_mask  # noqa: E402


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    groups = {2: [dist.new_group([0, 1]), dist.new_group([2, 3])], 4: [dist.new_group([0, 1, 2, 3])]}
    g = torch.Generator().manual_seed(0)
    s, b, h, hd = 32, 2, 4, 8
    q, k, v = (torch.randn(s, b, h, hd, generator=g) for _ in range(3))
    doc_ids = torch.cumsum((torch.rand(b, s, generator=g) < 0.1).long(), dim=1)
    mask = document_mask(doc_ids)
    w = torch.randn(s, b, h, hd, generator=g)
    ref_in = [t.clone().requires_grad_(True) for t in (q, k, v)]
    ref = MaskedAttention()(*ref_in, mask)
    (ref * w).sum().backward()
    errors = {}
    for d, gs in groups.items():
        group = gs[rank // d]
        i = rank % d
        part = slice(i * s // d, (i + 1) * s // d)
        mine = [t[part].clone().requires_grad_(True) for t in (q, k, v)]
        out = Ulysses(group)(*mine, mask)
        (out * w[part]).sum().backward()
        errors[d] = {"out": float((out - ref[part]).abs().max()),
                     "grad": max(float((m.grad - r.grad[part]).abs().max()) for m, r in zip(mine, ref_in))}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump(errors, fh)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
