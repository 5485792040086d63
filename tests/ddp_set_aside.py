"""Run by torchrun with 2 processes (tests/test_adversarial.py): two micro-batches under DDP, the first without
sync, with the embedding gradient set aside around the second's backward as the engine does for an attack (or not,
with `plain`); each process saves what its embedding gradient ends as to OUT.RANK.

    torchrun --standalone --nproc_per_node=2 tests/ddp_set_aside.py OUT set-aside|plain
"""

import contextlib
import os
import sys

import torch
import torch.distributed as tdist
from torch.nn.parallel import DistributedDataParallel

from lmforge.engine.adversarial import own_gradient
from lmforge.engine.loop import _average_over_ranks


def main(out: str, set_aside: bool) -> None:
    tdist.init_process_group("gloo")
    rank = tdist.get_rank()
    torch.manual_seed(0)
    model = DistributedDataParallel(torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 1)))
    batches = [torch.tensor([[rank, 2 + rank]]), torch.tensor([[5 + rank, 7]])]
    with model.no_sync():
        model(batches[0]).sum().backward()
    weight = model.module[0].weight
    with (own_gradient(weight, settle=_average_over_ranks) if set_aside else contextlib.nullcontext()):
        model(batches[1]).sum().backward()
    os.makedirs(os.path.dirname(out), exist_ok=True)
    torch.save(weight.grad, f"{out}.tmp.{rank}")
    os.replace(f"{out}.tmp.{rank}", f"{out}.{rank}")
    tdist.barrier()
    # Both files are written: leave without tearing the gloo group down, whose shutdown can hang at exit.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] == "set-aside")
