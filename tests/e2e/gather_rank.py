"""Run by torchrun in test_train_e2e.py: ranks with different batch sizes and missing modalities still
agree on the contrastive loss's collectives (no hang) and get finite gradients."""

import sys

import torch
import torch.distributed as dist

from mmtrain.distributed import cleanup
from mmtrain.losses import total_loss


def main(out: str) -> None:
    dist.init_process_group("gloo")
    losses_and_gradients(out)
    cleanup()   # after the tensors above are gone: see mmtrain.distributed.cleanup


def losses_and_gradients(out: str) -> None:
    rank = dist.get_rank()
    torch.manual_seed(rank)
    rows = 5 if rank == 0 else 3                        # rank 1 "skipped" two bad samples
    emb = {m: torch.nn.functional.normalize(torch.randn(rows, 8, requires_grad=True), dim=1)
           for m in ("text", "image", "audio")}
    present = {m: torch.ones(rows, dtype=torch.bool) for m in emb}
    if rank == 1:
        present["audio"][:] = False                     # no audio at all on this rank
    outputs = {"embeddings": emb, "present": present, "logit_scale": torch.tensor(10.0, requires_grad=True)}
    batch = {"has_label": torch.zeros(rows, dtype=torch.bool)}
    loss = total_loss(outputs, batch, "contrastive", 1.0)["loss"]
    loss.backward()
    with open(f"{out}/rank{rank}.txt", "w") as f:
        f.write(f"{loss.item()}\n")


if __name__ == "__main__":
    main(sys.argv[1])
