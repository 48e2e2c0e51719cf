"""A lane's SP group run packed (one call and one all-to-all per layer for all its sequences) against the same
sequences run one at a time, and the two lanes' sum against one device on the whole batch; each rank saves
its max differences of loss and gradients (sdpa), and of the packed forward (flex: no backward on a CPU).

Run: torchrun --nproc-per-node=2 tests/workers/packed_lanes.py <out_dir>
"""
import json
import os
import sys
from dataclasses import replace

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from data.loader import Batch  # noqa: E402
from dist.comm import Comm  # noqa: E402
from dist.lanes import LaneRunner, lane_microbatches, segments  # noqa: E402
from dist.sp_planner import Group, Plan  # noqa: E402
from model.stages import build_stage, token_loss_sum  # noqa: E402
from tests.tiny import tiny_model_config  # noqa: E402

LENGTHS = [5, 17, 1, 30, 12, 9, 23, 2, 14, 8]  # odd lengths: padded slices on the group of 2
PLAN = Plan(((Group(0, 2, (0, 1, 2, 3, 4), 0.0),),  # pass 0: one group of both lanes, 5 sequences
             (Group(0, 1, (5, 6, 7), 0.0), Group(1, 1, (8, 9), 0.0))), 0.0, "test")  # pass 1: a group per lane


def one_row_batch(lengths: list[int], vocab: int, seed: int) -> Batch:
    """The sequences back to back in one row, each its own document."""
    g = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    doc_ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]
    return Batch(torch.randint(0, vocab, (1, n), generator=g), torch.randint(0, vocab, (1, n), generator=g), doc_ids,
                 [0])


def loss_and_grads(module, run, microbatches) -> tuple[float, list[torch.Tensor]]:
    """The mean token loss over the whole batch (this lane's share of it) and its gradients, as train_step."""
    module.zero_grad()
    loss = sum(token_loss_sum(run(module, mb.inputs, mb), mb.targets) for mb in microbatches if mb.inputs.numel())
    (loss / sum(LENGTHS)).backward()
    return float(loss.detach()) / sum(LENGTHS), [p.grad.clone() for p in module.parameters()]


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    lane = dist.get_rank()
    runner = LaneRunner({(0, 2): dist.new_group([0, 1])}, Comm())
    cfg = tiny_model_config(n_layers=2)
    batch = one_row_batch(LENGTHS, cfg.vocab_size, seed=0)
    mbs = lane_microbatches(batch, segments(batch), PLAN, lane)
    module = build_stage(cfg, 0, 1, max_seq_len=64, seed=1)
    packed = loss_and_grads(module, runner, mbs)
    unpacked = loss_and_grads(module, runner, [one for mb in mbs for one in mb.per_sequence()])
    summed = torch.tensor([packed[0], *(g.sum() for g in packed[1])])  # then the lanes' sum: the whole batch
    grads = [g.clone() for g in packed[1]]
    for t in (summed, *grads):
        dist.all_reduce(t)
    whole = loss_and_grads(module, lambda m, x, mb: m(x, m.prepare(mb.doc_ids)), [batch])
    errors = {"sdpa": {"loss": abs(packed[0] - unpacked[0]), "grad": max_diff(packed[1], unpacked[1]),
                       "whole_loss": abs(float(summed[0]) - whole[0]),
                       "whole_grad": max_diff(grads, whole[1])}}
    flex = build_stage(replace(cfg, attention="flex"), 0, 1, max_seq_len=64, seed=1)
    with torch.no_grad():
        outs = [(runner(flex, mb.inputs, mb), torch.cat([runner(flex, o.inputs, o) for o in mb.per_sequence()], 1))
                for mb in mbs if mb.inputs.numel()]
    errors["flex"] = {"out": max(float((a - b).abs().max()) for a, b in outs)}
    with open(os.path.join(out_dir, f"rank{lane}.json"), "w") as fh:
        json.dump(errors, fh)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
