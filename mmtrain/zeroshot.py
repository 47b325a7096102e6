"""Zero-shot classification, CLIP-style: each class embedded through text prompts, images and audio
classified by their nearest class embedding, with no classifier trained for it.

    label names (dataset.json) x prompt templates -> tokenized as preprocessing tokenizes captions
    -> text tower -> projection -> mean over templates per class -> nearest class for each image / clip
"""

from __future__ import annotations

import io

import numpy as np
import torch

from mmdata import load_description, storage
from mmdata.load.decode import collate_tokens


def class_embeddings(model, dataset: str, names: list[str], templates: list[str],
                     device: torch.device) -> torch.Tensor:
    """[classes, D]: each class's prompts (``templates`` with ``{}`` the class name) embedded by the text
    tower, averaged and normalised."""
    from mmdata.prep.text import TextConfig, encode_text, load_tokenizer
    from mmdata.schema import TOKENS
    description = load_description(dataset)
    tokenizer = load_tokenizer(storage.read_bytes(storage.join(dataset, description.tokenizer.file), {}))
    text = TextConfig(**description.config["text"])
    seqs = [np.load(io.BytesIO(encode_text(template.format(name), text, tokenizer)[0][TOKENS]), allow_pickle=False)
            for name in names for template in templates]
    batch = collate_tokens(seqs, max(description.tokenizer.pad_id, 0), None)
    _, _, pooled = model.encoders["text"](batch["tokens"].to(device), batch["tokens_mask"].to(device))
    embedded = torch.nn.functional.normalize(model.project["text"](pooled).float(), dim=-1)
    per_class = embedded.reshape(len(names), len(templates), -1).mean(dim=1)
    return torch.nn.functional.normalize(per_class, dim=-1)


def zero_shot_metrics(embeddings: dict[str, torch.Tensor], present: dict[str, torch.Tensor], labels: torch.Tensor,
                      has_label: torch.Tensor, classes: torch.Tensor) -> dict[str, float]:
    """Top-1 accuracy of nearest-class-prompt classification for each non-text modality, on its labelled
    samples, beside the majority-class rate."""
    out: dict[str, float] = {}
    for m in ("image", "audio"):
        if m not in embeddings:
            continue
        mask = present[m].bool() & has_label.bool()
        n = int(mask.sum())
        if n == 0:
            continue
        target = labels[mask].long()
        predicted = (torch.nn.functional.normalize(embeddings[m][mask].float(), dim=-1) @ classes.T).argmax(dim=1)
        out[f"zero_shot[{m}]"] = (predicted == target).float().mean().item()
        out[f"zero_shot[{m}]/chance"] = torch.bincount(target).max().item() / n
        out[f"zero_shot[{m}]/n"] = n
    return out
