"""Losses: pairwise InfoNCE over the modality pairs present, and classification.

Contrastive negatives come from every rank: each rank gathers all ranks'
embeddings with a gradient-carrying all_gather and computes the loss of its
own queries against the global gallery (open_clip's "local loss"); DDP's
gradient averaging then yields the gradient of the mean global loss.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F


def gather(x: torch.Tensor) -> torch.Tensor:
    """All ranks' rows (gradient flows back to each rank's own rows); identity without distributed."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()) \
            or torch.distributed.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather
    return torch.cat(all_gather(x), 0)


def rank_offset(rows: int) -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() * rows
    return 0


def contrastive_loss(embeddings: dict, present: dict, logit_scale: torch.Tensor) -> dict[str, torch.Tensor]:
    """InfoNCE for each modality pair, symmetric, over samples that have both modalities."""
    losses = {}
    for a, b in itertools.combinations(sorted(embeddings), 2):
        both = present[a] & present[b]
        all_a, all_b, all_both = gather(embeddings[a]), gather(embeddings[b]), gather(both.float()).bool()
        local = torch.zeros_like(all_both)
        start = rank_offset(both.shape[0])
        local[start: start + both.shape[0]] = both
        if all_both.sum() < 2 or both.sum() == 0:
            continue
        keys = all_both.nonzero().squeeze(1)
        queries = local[keys].nonzero().squeeze(1)   # my rows, as positions among `keys`
        logits = logit_scale * all_a[keys] @ all_b[keys].T
        losses[f"{a}-{b}"] = (F.cross_entropy(logits[queries], queries)
                              + F.cross_entropy(logits.T[queries], queries)) / 2
    return losses


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, has_label: torch.Tensor) -> torch.Tensor:
    if has_label.any():
        return F.cross_entropy(logits[has_label], labels[has_label])
    return logits.sum() * 0.0   # keeps the graph (and DDP) whole when no sample is labelled


def total_loss(outputs: dict, batch: dict, loss: str, classify_weight: float) -> dict[str, torch.Tensor]:
    """{"loss": total, "loss/<part>": ...} for the configured loss: contrastive | classify | both."""
    parts = {}
    if loss in ("contrastive", "both"):
        pairs = contrastive_loss(outputs["embeddings"], outputs["present"], outputs["logit_scale"])
        anchor = sum(e.sum() for e in outputs["embeddings"].values()) * 0.0 + outputs["logit_scale"] * 0.0
        parts["contrastive"] = torch.stack(list(pairs.values())).mean() + anchor if pairs else anchor
    if loss in ("classify", "both"):
        real = batch["has_label"] & ~batch["is_pad"] if "is_pad" in batch else batch["has_label"]
        parts["classify"] = classify_weight * classification_loss(outputs["logits"], batch["label"], real)
    out = {f"loss/{k}": v for k, v in parts.items()}
    out["loss"] = sum(parts.values())
    return out
