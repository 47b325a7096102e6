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
                        num_classes: int, ks=(1, 5, 10),
                        subset_logits: dict[tuple[str, ...], torch.Tensor] | None = None) -> dict[str, float]:
    """Every metric with its chance level and sample count, as one flat dict.

    embeddings[m] is [N, D] (rows of samples lacking m are arbitrary and
    ignored); present[m] is bool [N]. Retrieval for a pair uses only the
    samples that have both modalities, so n differs per pair; pairs with
    n < 2 are skipped (one candidate is no retrieval). Keys look like
    "text->image/R@1", "text->image/R@1/chance", "text->image/n" and
    "accuracy", "accuracy/chance", "accuracy/uniform_chance", "accuracy/n". With labels, class-aware
    retrieval too ("text->image/class@1": a top-1 item of the query's class) and the median rank of the
    match; with ``subset_logits`` (the fusion head's logits with only some modalities shown), accuracy per
    modality subset on the samples that have them all, and the fusion gain over the best single one.
    """
    metrics: dict[str, float] = {}
    for a, b in PAIRS:
        if a in embeddings and b in embeddings:
            metrics.update(pair_metrics(a, b, embeddings, present, ks))
            if bool(has_label.any()):
                metrics.update(class_metrics(a, b, embeddings, present, labels, has_label, ks))
    if logits is not None and bool(has_label.any()):
        metrics.update(accuracy_metrics(logits, labels, has_label, num_classes))
        if subset_logits:
            metrics.update(subset_metrics(subset_logits, present, labels, has_label, num_classes))
    return metrics


def class_metrics(a: str, b: str, embeddings: dict[str, torch.Tensor], present: dict[str, torch.Tensor],
                  labels: torch.Tensor, has_label: torch.Tensor, ks) -> dict[str, float]:
    """Over labelled samples having both modalities: the share of queries whose top k gallery items hold
    one of the query's class ("class@k"; instance recall is capped near 1 / class size on data with few
    classes, this is not), beside its chance (a random ranking: 1 - C(n - n_c, k) / C(n, k) for a class
    of n_c items, averaged over queries); and the median rank of the query's own match, beside a random
    ranking's (n + 1) / 2. Ties among gallery items are broken by their order."""
    both = present[a].bool() & present[b].bool() & has_label.bool()
    n = int(both.sum())
    if n < 2:
        return {}
    query = torch.nn.functional.normalize(embeddings[a][both].float(), dim=-1)
    gallery = torch.nn.functional.normalize(embeddings[b][both].float(), dim=-1)
    target = labels[both].long()
    top = min(max(ks), n)
    hits = {k: 0 for k in ks}
    ranks = []
    for start in range(0, n, CHUNK):
        sim = query[start:start + CHUNK] @ gallery.T
        ranks.append(match_ranks(query[start:start + CHUNK], gallery, start))
        nearest = target[sim.topk(top, dim=1).indices]                  # [chunk, top] classes of the top items
        same = nearest == target[start:start + CHUNK, None]
        for k in ks:
            hits[k] += int(same[:, :min(k, n)].any(dim=1).sum())
    # n_c for each query, itself included (unique, not bincount: a label of 2e9 must not allocate 2e9 counts)
    _, inverse, counts = torch.unique(target, return_inverse=True, return_counts=True)
    class_size = counts[inverse].double()
    out: dict[str, float] = {}
    for k in ks:
        kk = min(k, n)
        miss = torch.ones(n, dtype=torch.float64)
        for j in range(kk):   # P(no item of the class among k drawn without replacement)
            miss *= ((n - class_size - j) / (n - j)).clamp(min=0)
        out[f"{a}->{b}/class@{k}"] = hits[k] / n
        out[f"{a}->{b}/class@{k}/chance"] = float(1 - miss.mean())
    out[f"{a}->{b}/median_rank"] = float(torch.cat(ranks).double().median() + 1)
    out[f"{a}->{b}/median_rank/chance"] = (n + 1) / 2
    return out


def subset_metrics(subset_logits: dict[tuple[str, ...], torch.Tensor], present: dict[str, torch.Tensor],
                   labels: torch.Tensor, has_label: torch.Tensor, num_classes: int) -> dict[str, float]:
    """Accuracy of the fusion head shown only each subset of modalities ("accuracy[image+audio]"), all on the
    labelled samples that have every modality (one n, so subsets compare), with the majority-class chance;
    and "fusion_gain": all modalities minus the best single one."""
    complete = has_label.bool()
    for mask in present.values():
        complete &= mask.bool()
    n = int(complete.sum())
    if n == 0:
        return {}
    target = labels[complete].long()
    chance = torch.unique(target, return_counts=True)[1].max().item() / n
    out: dict[str, float] = {}
    for subset, logits in sorted(subset_logits.items(), key=lambda item: (len(item[0]), item[0])):
        key = f"accuracy[{'+'.join(subset)}]"
        out[key] = (logits[complete].argmax(dim=-1) == target).float().mean().item()
        out[f"{key}/chance"], out[f"{key}/n"] = chance, n
    singles = [v for k, v in out.items() if k.startswith("accuracy[") and "+" not in k and "/" not in k]
    everything = max(subset_logits, key=len)
    if singles and len(everything) > 1:
        out["fusion_gain"] = out[f"accuracy[{'+'.join(everything)}]"] - max(singles)
    return out


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
    sources = per_dataset(metrics)
    own = {f"{name}/{k}" for name, values in sources.items() for k in values}
    scores = [k for k in metrics if not k.endswith(("/chance", "/uniform_chance", "/n")) and k != "skipped"
              and k not in own]
    if not scores:
        return "(no metrics)"
    names = {k: k.replace("/R@", " R@").replace("/class@", " class@").replace("/median_rank", " median rank")
             for k in scores}
    width = max(len(name) for name in names.values())
    table = "\n".join(format_line(k, names[k], width, metrics) for k in scores)
    return f"{table}\n{dataset_table(sources)}" if sources else table


def per_dataset(metrics: dict[str, float]) -> dict[str, dict[str, float]]:
    """The metrics of each dataset of several ("<name>/accuracy" beside "accuracy"), by dataset name."""
    sources: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        name, sep, rest = key.partition("/")
        own_score = rest.rsplit("/", 1)[0] if rest.endswith(("/chance", "/uniform_chance", "/n")) else rest
        if sep and "->" not in name and own_score in metrics and own_score != key:
            sources.setdefault(name, {})[rest] = value
    return sources


def dataset_table(sources: dict[str, dict[str, float]]) -> str:
    """One line per dataset: held-out samples, accuracy, fusion gain, zero-shot accuracy and class@1 averaged
    over the modality pairs (eval.json has every metric of each)."""
    columns = ["accuracy", "fusion_gain", "zero_shot[image]", "zero_shot[audio]"]
    columns = [c for c in columns if any(c in values for values in sources.values())]
    rows = []
    for name, values in sources.items():
        class1 = [v for k, v in values.items() if k.endswith("/class@1")]
        n = values.get("accuracy/n", next((v for k, v in values.items() if k.endswith("/n")), None))
        rows.append([name, "" if n is None else str(int(n)), *(f"{values[c]:.3f}" if c in values else "-"
                                                                for c in columns),
                     f"{sum(class1) / len(class1):.3f}" if class1 else "-"])
    header = ["dataset", "n", *columns, "class@1 (mean of pairs)"]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("   ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in [header, *rows])


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
