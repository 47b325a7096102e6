"""Evaluation metrics: cross-modal retrieval recall and classification accuracy.

embeddings per modality + presence masks + logits/labels (already gathered
by the trainer) -> per pair: keep samples having both modalities -> Recall@k
-> metrics dict in which every score sits beside its chance level and its n.

A number alone says little: R@1 = 0.05 is excellent over 10,000 candidates
and useless over 20, so every metric is reported with what guessing would
score. Pure functions only: no model, no data loading, no I/O.
"""

from __future__ import annotations

import torch

# Ordered query -> gallery pairs; both directions, because retrieval is not symmetric.
PAIRS = (("text", "image"), ("image", "text"), ("text", "audio"),
         ("audio", "text"), ("image", "audio"), ("audio", "image"))

CHUNK = 1024  # queries per similarity block: bounds memory at CHUNK x N floats


def retrieval_recall(query: torch.Tensor, gallery: torch.Tensor, ks=(1, 5, 10),
                     chunk_size: int = CHUNK) -> dict[int, float]:
    """Recall@k for each k: the share of queries whose own gallery row ranks in the top k.

    query[i] matches gallery[i]; both [N, D] and L2-normalised, so the dot
    product is the cosine similarity. A query's rank is the number of *other*
    gallery rows at least as similar as its match: ties count against the
    query, so collapsed (identical) embeddings score 0, never a fake 1.
    The [N, N] similarity matrix is never built whole:
    queries are processed chunk_size at a time.
    """
    assert query.ndim == 2 and query.shape == gallery.shape, (
        f"query {tuple(query.shape)} and gallery {tuple(gallery.shape)} must both be [N, D] and aligned row by row")
    if not (torch.isfinite(query).all() and torch.isfinite(gallery).all()):
        # NaN compares false with everything, which would rank every match first
        raise ValueError("embeddings contain NaN or inf; the model has diverged, recall would be meaningless")
    ranks = torch.cat([match_ranks(query[start:start + chunk_size], gallery, start)
                       for start in range(0, len(query), chunk_size)]) if len(query) else torch.zeros(0)
    return {k: (ranks < k).float().mean().item() if len(ranks) else float("nan") for k in ks}


def match_ranks(query: torch.Tensor, gallery: torch.Tensor, offset: int) -> torch.Tensor:
    """0-based rank of each query's match (gallery row offset + i) among all gallery rows."""
    sim = query @ gallery.T
    rows = torch.arange(len(query))
    true = sim[rows, rows + offset]
    # ties count against the query (>=, minus the match itself): a collapsed model that
    # gives every sample the same embedding must score chance, not a perfect R@1
    return (sim >= true[:, None]).sum(dim=1) - 1


def evaluate_embeddings(embeddings: dict[str, torch.Tensor], present: dict[str, torch.Tensor],
                        logits: torch.Tensor | None, labels: torch.Tensor, has_label: torch.Tensor,
                        num_classes: int, ks=(1, 5, 10)) -> dict[str, float]:
    """Every metric with its chance level and sample count, as one flat dict.

    embeddings[m] is [N, D] (rows of samples lacking m are arbitrary and
    ignored); present[m] is bool [N]. Retrieval for a pair uses only the
    samples that have both modalities, so n differs per pair; pairs with
    n < 2 are skipped (one candidate is no retrieval). Keys look like
    "text->image/R@1", "text->image/R@1/chance", "text->image/n" and
    "accuracy", "accuracy/chance", "accuracy/uniform_chance", "accuracy/n".
    """
    metrics: dict[str, float] = {}
    for a, b in PAIRS:
        if a in embeddings and b in embeddings:
            metrics.update(pair_metrics(a, b, embeddings, present, ks))
    if logits is not None and bool(has_label.any()):
        metrics.update(accuracy_metrics(logits, labels, has_label, num_classes))
    return metrics


def pair_metrics(a: str, b: str, embeddings: dict[str, torch.Tensor], present: dict[str, torch.Tensor],
                 ks) -> dict[str, float]:
    """Recall@k of a -> b over samples having both; chance = min(k, n) / n (a random ranking)."""
    assert a in present and b in present, f"present has no mask for {a!r} or {b!r}; pass one per modality"
    both = present[a].bool() & present[b].bool()
    n = int(both.sum())
    if n < 2:
        return {}
    # re-normalise in float32: cheap, idempotent, and bf16 outputs would otherwise create spurious ties
    query = torch.nn.functional.normalize(embeddings[a][both].float(), dim=-1)
    gallery = torch.nn.functional.normalize(embeddings[b][both].float(), dim=-1)
    out: dict[str, float] = {}
    for k, recall in retrieval_recall(query, gallery, ks).items():
        out[f"{a}->{b}/R@{k}"] = recall
        out[f"{a}->{b}/R@{k}/chance"] = min(k, n) / n
    out[f"{a}->{b}/n"] = n
    return out


def accuracy_metrics(logits: torch.Tensor, labels: torch.Tensor, has_label: torch.Tensor,
                     num_classes: int) -> dict[str, float]:
    """Top-1 accuracy on labelled samples, with two baselines.

    "accuracy/chance" is the majority-class rate: always predicting the most
    common label scores that much, so on an imbalanced set it is the bar a
    model must clear (stronger than 1 / num_classes, which is also reported
    as "accuracy/uniform_chance").
    """
    mask = has_label.bool()
    target = labels[mask].long()
    assert bool(((target >= 0) & (target < num_classes)).all()), (
        f"labels of labelled samples must lie in [0, {num_classes}); check num_classes against the dataset")
    n = len(target)
    correct = (logits[mask].argmax(dim=-1) == target).sum().item()
    majority = torch.bincount(target, minlength=num_classes).max().item()
    return {"accuracy": correct / n, "accuracy/chance": majority / n,
            "accuracy/uniform_chance": 1.0 / num_classes, "accuracy/n": n}


def format_metrics(metrics: dict[str, float]) -> str:
    """A table for logs: one line per score, its chance level and n beside it.

    e.g. "text->image R@1   0.412   (chance 0.005, n=200)". The "/chance",
    "/uniform_chance" and "/n" keys only annotate their score. Works the same
    on keys with a prefix such as "eval/".
    """
    # "skipped" (samples left out with loader.on_error=skip) is a count, not a score: the trainer prints it
    scores = [k for k in metrics if not k.endswith(("/chance", "/uniform_chance", "/n")) and k != "skipped"]
    if not scores:
        return "(no metrics)"
    names = {k: k.replace("/R@", " R@") for k in scores}
    width = max(len(name) for name in names.values())
    return "\n".join(format_line(k, names[k], width, metrics) for k in scores)


def format_line(key: str, name: str, width: int, metrics: dict[str, float]) -> str:
    notes = []
    if f"{key}/chance" in metrics:
        notes.append(f"chance {metrics[f'{key}/chance']:.3f}")
    if f"{key}/uniform_chance" in metrics:
        notes.append(f"uniform {metrics[f'{key}/uniform_chance']:.3f}")
    # n belongs to the score ("accuracy/n") or to its pair ("text->image/n" for ".../R@1")
    n = metrics.get(f"{key}/n", metrics.get(f"{key.rsplit('/', 1)[0]}/n") if "/" in key else None)
    if n is not None:
        notes.append(f"n={int(n)}")
    line = f"{name:<{width}}   {metrics[key]:.3f}"
    return f"{line}   ({', '.join(notes)})" if notes else line
