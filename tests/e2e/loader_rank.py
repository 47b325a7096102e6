"""Run by torchrun in test_loader_distributed.py: one rank reads an epoch, resumes, reports its ids."""

import json
import sys

import torch
import torch.distributed as dist

from helpers import loader_config
from mmdata.load.loader import MultimodalLoader


def main(dataset: str, out: str) -> None:
    dist.init_process_group("gloo")
    read_and_report(dataset, out)
    # the group goes after everything the collectives touched (see mmtrain.distributed.cleanup)
    dist.barrier()
    dist.destroy_process_group()


def read_and_report(dataset: str, out: str) -> None:
    rank = dist.get_rank()
    config = loader_config(dataset, num_workers=2, batch_size=3)
    loader = MultimodalLoader(config)
    ids, state = [], None
    for i, batch in enumerate(loader):
        ids += batch["ids"]
        if i == 1:
            state = loader.state_dict()
            break
    resumed = MultimodalLoader(config)
    resumed.load_state_dict(state)
    for batch in resumed:
        ids += batch["ids"]
    counts = torch.tensor([len(ids)])
    everyone = [torch.zeros(1, dtype=torch.int64) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, counts)
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump({"ids": ids, "batches": len(loader), "counts": [int(c) for c in everyone]}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
