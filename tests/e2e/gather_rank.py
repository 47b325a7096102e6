"""Run by torchrun in test_train_e2e.py: ranks with different batch sizes and missing modalities agree on
the contrastive loss's collectives (no hang), each gets the gradient of the global loss, and many steps of
it run without a crash. Writes rank<R>.json: the loss, the steps run and the gradient's error."""

import json
import sys

import torch
import torch.distributed as dist

import mmtrain.losses as losses
from mmtrain.distributed import cleanup

MODALITIES = ("audio", "image", "text")
SIZES = (5, 3)           # rank 1 "skipped" two bad samples
STEPS = 300


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    loss, gradient = loss_and_gradient(rank)
    steps = repeat(rank)
    cleanup()   # after the tensors above are gone: see mmtrain.distributed.cleanup
    losses.distributed = lambda: False      # the reference, in this process alone
    expected = reference_gradient(rank)
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump({"loss": loss, "steps": steps, "gradient_norm": float(expected.norm()),
                   "gradient_error": float((gradient - expected).abs().max())}, f)


def inputs() -> tuple[list[dict], list[dict]]:
    """Every rank's embeddings and presence (the same on all ranks: each takes its own)."""
    g = torch.Generator().manual_seed(0)
    rows = [{m: torch.nn.functional.normalize(torch.randn(n, 8, generator=g), dim=1) for m in MODALITIES}
            for n in SIZES]
    present = [{m: torch.rand(n, generator=g) > 0.3 for m in MODALITIES} for n in SIZES]
    present[1]["audio"][:] = False     # no audio at all on rank 1
    return rows, present


def loss_and_gradient(rank: int) -> tuple[float, torch.Tensor]:
    rows, present = inputs()
    mine = {m: rows[rank][m].clone().requires_grad_(True) for m in MODALITIES}
    outputs = {"embeddings": mine, "present": present[rank], "logit_scale": torch.tensor(10.0)}
    loss = losses.total_loss(outputs, {"has_label": torch.zeros(SIZES[rank], dtype=torch.bool)},
                             "contrastive", 1.0)["loss"]
    loss.backward()
    return loss.item(), torch.cat([mine[m].grad for m in MODALITIES], 1)


def repeat(rank: int) -> int:
    """Steps of loss and backward through a small projection, as training runs them."""
    torch.manual_seed(rank)
    project = torch.nn.ModuleDict({m: torch.nn.Linear(8, 8) for m in MODALITIES})
    for _ in range(STEPS):
        embeddings = {m: torch.nn.functional.normalize(p(torch.randn(SIZES[rank], 8)), dim=1)
                      for m, p in project.items()}
        present = {m: torch.rand(SIZES[rank]) > 0.2 for m in MODALITIES}
        outputs = {"embeddings": embeddings, "present": present, "logit_scale": torch.tensor(10.0)}
        losses.total_loss(outputs, {"has_label": torch.zeros(SIZES[rank], dtype=torch.bool)},
                          "contrastive", 1.0)["loss"].backward()
    return STEPS


def reference_gradient(rank: int) -> torch.Tensor:
    """The gradient of the sum over ranks of each rank's loss (its own queries against every rank's rows),
    computed in one process from all ranks' rows: what the gathers' backward must deliver to ``rank``."""
    rows, present = inputs()
    leaves = [{m: r[m].clone().requires_grad_(True) for m in MODALITIES} for r in rows]
    together = {m: torch.cat([leaf[m] for leaf in leaves]) for m in MODALITIES}
    everyone = {m: torch.cat([p[m] for p in present]) for m in MODALITIES}
    total = torch.zeros(())
    for r, n in enumerate(SIZES):
        start = sum(SIZES[:r])
        mine = {m: torch.zeros_like(everyone[m]) for m in MODALITIES}
        for m in MODALITIES:
            mine[m][start: start + n] = present[r][m]
        # rank r's loss: the mean over pairs of its own samples as queries against every sample as keys
        pairs = []
        for a, b in [("audio", "image"), ("audio", "text"), ("image", "text")]:
            keys = (everyone[a] & everyone[b]).nonzero().squeeze(1)
            queries = (mine[a] & mine[b])[keys].nonzero().squeeze(1)
            if len(keys) < 2 or not len(queries):
                continue
            logits = 10.0 * together[a][keys] @ together[b][keys].T
            pairs.append((torch.nn.functional.cross_entropy(logits[queries], queries)
                          + torch.nn.functional.cross_entropy(logits.T[queries], queries)) / 2)
        total = total + torch.stack(pairs).mean()
    total.backward()
    return torch.cat([leaves[rank][m].grad for m in MODALITIES], 1)


if __name__ == "__main__":
    main(sys.argv[1])
