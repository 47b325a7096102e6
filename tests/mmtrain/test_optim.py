"""The optimizer decays weight matrices and kernels only; gradient accumulation skips the all-reduce of
non-final micro-steps under torch.compile too; the loader keys the trainer owns are never silently replaced."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import experiment_config
from mmdata.config import ConfigError
from mmtrain.optim import adamw, load_optimizer_state, param_groups


def tiny_model(cnn: bool = False):
    from mmtrain.model import FusionModel, ModelConfig
    config = ModelConfig(dim=32, heads=2, embed_dim=32, patch_size=8, text_layers=1, image_layers=1,
                         audio_layers=1, fusion_layers=1, image_encoder="cnn" if cnn else "vit")
    return FusionModel(config, vocab_size=64, image_size=32, n_mels=16, num_classes=3, classify=True,
                       modalities=("text", "image", "audio"))


@pytest.mark.parametrize("cnn", [False, True], ids=["vit", "cnn"])
def test_only_weight_matrices_and_kernels_are_decayed(cnn):
    model = tiny_model(cnn)
    decayed, kept = param_groups(model, 0.05)
    assert decayed["weight_decay"] == 0.05 and kept["weight_decay"] == 0.0
    names = {id(p): name for name, p in model.named_parameters()}
    decayed_names = {names[id(p)] for p in decayed["params"]}
    kept_names = {names[id(p)] for p in kept["params"]}
    assert decayed_names | kept_names == set(names.values()) and not decayed_names & kept_names
    modules = dict(model.named_modules())
    maps = (nn.Linear, nn.Conv1d, nn.Conv2d)

    def is_map_weight(name: str) -> bool:
        owner, _, leaf = name.rpartition(".")
        return (leaf == "weight" and isinstance(modules[owner], maps)) or \
            (leaf == "in_proj_weight" and isinstance(modules[owner], nn.MultiheadAttention))

    assert all(is_map_weight(n) for n in decayed_names) and not any(is_map_weight(n) for n in kept_names)
    # what must not decay: the temperature, positions, norms, biases
    assert "logit_scale" in kept_names
    assert any(n.endswith("pos") for n in kept_names) and any(n.endswith(".bias") for n in kept_names)
    assert any(isinstance(modules[n.rpartition(".")[0]], (nn.LayerNorm, nn.BatchNorm2d)) for n in kept_names)
    if cnn:
        assert any(isinstance(modules[n.rpartition(".")[0]], nn.Conv2d) for n in decayed_names)


def test_a_single_group_checkpoint_resumes_with_its_moments_on_the_same_parameters():
    model = tiny_model()
    old = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)   # what earlier mm saved
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    old.step()
    saved = old.state_dict()
    new = adamw(model, experiment_config("unused", "unused").optim)
    load_optimizer_state(new, model, saved)
    for p in model.parameters():
        assert torch.equal(new.state[p]["exp_avg"], old.state[p]["exp_avg"])
    assert [g["weight_decay"] for g in new.param_groups] == [0.05, 0.0]


def test_the_ddp_inside_a_compiled_model_is_found_for_no_sync(tmp_path):
    import torch.distributed as dist
    from mmtrain.trainer import ddp_module
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(nn.Linear(3, 3))
        assert ddp_module(ddp) is ddp
        assert ddp_module(torch.compile(ddp)) is ddp     # compiled lazily: no compiler runs here
        assert ddp_module(nn.Linear(3, 3)) is None
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("overrides, key", [
    (["data.loader.seed=7"], "data.loader.seed"),
    (["data.loader.eval_fraction=0.3"], "data.loader.eval_fraction"),
    (["data.loader.split=train", "data.loader.eval_fraction=0.2"], "data.loader.split"),
])
def test_loader_keys_the_trainer_owns_are_refused_not_replaced(overrides, key):
    with pytest.raises(ConfigError) as e:
        experiment_config("d", "r", *overrides)
    assert e.value.key == key


def test_loader_keys_equal_to_the_trainers_are_accepted():
    config = experiment_config("d", "r", "train.seed=7", "data.loader.seed=7", "data.loader.eval_fraction=0.2")
    assert config.data.loader.seed == config.train.seed == 7


def test_modality_dropout_hides_modalities_but_never_all_of_a_sample():
    from mmtrain.trainer import drop_modalities
    torch.manual_seed(0)
    n = 2000
    batch = {"has_text": torch.ones(n, dtype=torch.bool), "has_image": torch.ones(n, dtype=torch.bool),
             "has_audio": torch.arange(n) % 2 == 0}
    before = {k: v.clone() for k, v in batch.items()}
    drop_modalities(batch, 0.5)
    kept = torch.stack(list(batch.values()), 1)
    assert bool((kept.sum(1) >= 1).all())                                   # every sample keeps one
    assert not bool((kept & ~torch.stack(list(before.values()), 1)).any())  # nothing absent appears
    assert 0.3 < 1 - batch["has_text"].float().mean().item() < 0.6           # about half hidden
    # a sample left with one modality is left with any of them alike, not always the first
    alone = {k: (v & (kept.sum(1) == 1)[:]).sum().item() for k, v in batch.items() if k != "has_audio"}
    assert abs(alone["has_text"] - alone["has_image"]) < 0.2 * alone["has_text"], alone
