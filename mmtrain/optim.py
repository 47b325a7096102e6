"""The optimizer: AdamW with weight decay on weight matrices and convolution kernels only.

Decay pulls a weight towards zero. That is a prior for the matrices of linear maps and convolutions;
for a norm's scale (pulled towards 0 instead of its neutral 1), a bias, a learned position or modality
embedding, a token embedding table or the contrastive temperature it is only damage, and decaying
``logit_scale`` fights the very loss that sets it. So those go in a group without decay.
"""

from __future__ import annotations

import torch
from torch import nn

from mmtrain.config import OptimConfig

# modules whose ``weight`` is a linear map or a kernel (attention's packed input projection too)
_DECAYED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """[{params to decay, weight_decay}, {the rest, weight_decay 0}], each parameter in exactly one,
    in the model's parameter order within each group."""
    decayed = set()
    for module in model.modules():
        if isinstance(module, _DECAYED) and isinstance(getattr(module, "weight", None), nn.Parameter):
            decayed.add(id(module.weight))
        if isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
            decayed.add(id(module.in_proj_weight))
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if id(p) in decayed], "weight_decay": weight_decay},
            {"params": [p for p in params if id(p) not in decayed], "weight_decay": 0.0}]


def adamw(model: nn.Module, config: OptimConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.lr, betas=tuple(config.betas),
                             weight_decay=config.weight_decay)


def load_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module, state: dict) -> None:
    """Load an optimizer state, also one saved with every parameter in a single group (mm before decay
    groups): its moments are moved to the same parameters in the new groups, so such a run resumes with
    its Adam state; only the decay of the non-matrix parameters stops."""
    groups = state.get("param_groups", [])
    if len(groups) == 1 and len(optimizer.param_groups) == 2:
        old_order = [id(p) for p in model.parameters() if p.requires_grad]
        new_order = [id(p) for group in optimizer.param_groups for p in group["params"]]
        if len(old_order) == len(groups[0]["params"]) == len(new_order):
            new_index = {pid: i for i, pid in enumerate(new_order)}
            moved = {new_index[old_order[int(k)]]: v for k, v in state["state"].items()}
            hyper = {k: v for k, v in groups[0].items() if k != "params"}
            sizes = [len(group["params"]) for group in optimizer.param_groups]
            state = {"state": moved, "param_groups": [
                {**hyper, "weight_decay": group["weight_decay"], "params": list(range(start, start + size))}
                for group, start, size in zip(optimizer.param_groups, (0, sizes[0]), sizes)]}
    optimizer.load_state_dict(state)
