"""Run by torchrun in test_train_distributed.py: a few DDP steps, then dump this rank's parameters."""

import sys

import torch

from helpers import experiment_config
from mmtrain.distributed import cleanup, setup
from mmtrain.trainer import batches, setup as setup_state, train_step


def main(dataset: str, out: str) -> None:
    d = setup("cpu")
    train_and_dump(dataset, out, d)
    cleanup()   # after the model and its graphs are gone: see mmtrain.distributed.cleanup


def train_and_dump(dataset: str, out: str, d) -> None:
    config = experiment_config(dataset, f"{out}/run", "data.loader.num_workers=1", "train.loss=both")
    state = setup_state(config, d)
    stream = batches(state.loader)
    losses = [train_step(state, stream, config, d)["loss"] for _ in range(5)]
    torch.save({"params": {k: v.detach().clone() for k, v in state.raw_model.state_dict().items()},
                "losses": losses, "ids": state.loader.state_dict()}, f"{out}/rank{d.rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
