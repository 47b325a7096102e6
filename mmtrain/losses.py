"""Losses: pairwise InfoNCE over the modality pairs present, and classification.

Contrastive negatives come from every rank: each rank gathers all ranks'
embeddings with a gradient-carrying all_gather and computes the loss of its
own queries against the global gallery (open_clip's "local loss"); DDP's
gradient averaging then yields the gradient of the mean global loss.
"""

from __future__ import annotations

import functools
import itertools

import torch
import torch.nn.functional as F

from mmdata.load.loader import process_group
from mmtrain.model import real_samples


def distributed() -> bool:
    return process_group()[1] > 1


def gather_rows(rows: dict[str, torch.Tensor], valid: dict[str, torch.Tensor]) -> tuple[dict, dict, int]:
    """All ranks' rows of every modality (gradients flow back to each rank's own), each row's validity per
    modality, and where my rows start.

    Batches can differ in size across ranks (the loader's on_error=skip drops bad samples),
    so rows are padded to the largest batch and the padding is marked invalid.

    One collective carries every modality's rows and flags, packed side by side, and the next starts only
    after it: gloo (torch 2.14) corrupts memory when all_gathers overlap (several gradient-carrying
    gathers left in flight while a plain one ran aborted a rank within a few hundred steps).
    """
    if not distributed():
        return rows, valid, 0
    from torch.distributed import _functional_collectives as fc
    # torch 2.14 renamed it (the old name issues a FutureWarning); torch 2.6 has only the old one
    all_gather = getattr(fc, "all_gather_single_autograd", None) or fc.all_gather_tensor_autograd
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    mine = next(iter(valid.values())).shape[0]
    size = torch.tensor([mine], device=next(iter(valid.values())).device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    torch.distributed.all_gather(sizes, size)
    most = int(max(s.item() for s in sizes))
    names = sorted(rows)
    dtype = functools.reduce(torch.promote_types, (rows[k].dtype for k in names))
    packed = torch.cat([rows[k].to(dtype) for k in names] + [valid[k].to(dtype).unsqueeze(1) for k in names], 1)
    gathered = fc.wait_tensor(all_gather(F.pad(packed, (0, 0, 0, most - mine)).contiguous(), 0,
                                         torch.distributed.group.WORLD))
    widths = [rows[k].shape[1] for k in names]
    columns = gathered[:, :sum(widths)].split(widths, 1)
    flags = gathered[:, sum(widths):].detach() > 0.5
    return ({k: c for k, c in zip(names, columns)}, {k: flags[:, i] for i, k in enumerate(names)},
            rank * most)


def contrastive_loss(embeddings: dict, present: dict, logit_scale: torch.Tensor) -> dict[str, torch.Tensor]:
    """InfoNCE for each modality pair, symmetric, over samples that have both modalities."""
    losses = {}
    if len(embeddings) < 2:
        return losses
    rows, all_present, start = gather_rows(embeddings, present)
    # every rank's graph holds the gathered rows, used or not: their backward is a collective all ranks join
    losses["_anchor/gathered"] = sum(r.sum() for r in rows.values()) * 0.0
    for a, b in itertools.combinations(sorted(embeddings), 2):
        both = present[a] & present[b]
        all_both = all_present[a] & all_present[b]
        if all_both.sum() < 2 or both.sum() == 0:
            continue     # nothing to contrast anywhere, or no query of mine
        local = torch.zeros_like(all_both)
        local[start: start + both.shape[0]] = both
        keys = all_both.nonzero().squeeze(1)
        queries = local[keys].nonzero().squeeze(1)   # my rows, as positions among `keys`
        logits = logit_scale * rows[a][keys] @ rows[b][keys].T
        losses[f"{a}-{b}"] = (F.cross_entropy(logits[queries], queries)
                              + F.cross_entropy(logits.T[queries], queries)) / 2
    return losses


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, has_label: torch.Tensor) -> torch.Tensor:
    if has_label.any():
        return F.cross_entropy(logits[has_label], labels[has_label])
    return logits.sum() * 0.0   # keeps the graph (and DDP) whole when no sample is labelled


def total_loss(outputs: dict, batch: dict, loss: str, classify_weight: float,
               unimodal_weight: float = 0.0) -> dict[str, torch.Tensor]:
    """{"loss": total, "loss/<part>": ...} for the configured loss: contrastive | classify | both; with
    ``unimodal_weight``, also each modality's own classifier, averaged over the modalities."""
    parts = {}
    if loss in ("contrastive", "both"):
        pairs = contrastive_loss(outputs["embeddings"], outputs["present"], outputs["logit_scale"])
        anchor = sum(e.sum() for e in outputs["embeddings"].values()) * 0.0 + outputs["logit_scale"] * 0.0
        anchor = anchor + sum(v for k, v in pairs.items() if k.startswith("_anchor/"))
        scored = [v for k, v in pairs.items() if not k.startswith("_anchor/")]
        parts["contrastive"] = torch.stack(scored).mean() + anchor if scored else anchor
    if loss in ("classify", "both"):
        real = batch["has_label"] & real_samples(batch)
        parts["classify"] = classify_weight * classification_loss(outputs["logits"], batch["label"], real)
        if unimodal_weight and "unimodal_logits" in outputs:
            each = [classification_loss(logits, batch["label"], real & outputs["present"][m])
                    for m, logits in outputs["unimodal_logits"].items()]
            parts["unimodal"] = unimodal_weight * torch.stack(each).mean()
    out = {f"loss/{k}": v for k, v in parts.items()}
    out["loss"] = sum(parts.values())
    return out
