"""The image encoder: a convolutional stem into the ViT, max-pooled; what it refuses; old checkpoints."""

import pytest
import torch

from helpers import experiment_config
from mmdata.config import ConfigError, to_dict
from mmtrain.model import ModelConfig, ViTEncoder
from mmtrain.resume import check_same_settings


def test_the_conv_stem_gives_one_token_per_patch_like_a_patchify_stem():
    image = torch.randn(2, 3, 64, 64)
    for stem in ("conv", "patch"):
        encoder = ViTEncoder(ModelConfig(dim=32, heads=2, patch_size=8, image_stem=stem), 64)
        tokens, mask, pooled = encoder(image)
        assert tokens.shape == (2, 64, 32) and mask.all()
    convs = [m for m in ViTEncoder(ModelConfig(dim=32, heads=2, patch_size=8), 64).patch
             if isinstance(m, torch.nn.Conv2d)]
    assert [c.stride for c in convs] == [(2, 2)] * 3 + [(1, 1)]   # three halvings, then a 1x1 to dim
    assert all(c.kernel_size == (3, 3) for c in convs[:3]) and convs[-1].out_channels == 32


def test_the_image_vector_is_the_max_of_its_tokens_or_their_mean():
    image = torch.randn(3, 3, 32, 32)
    for pool, reduce in (("max", lambda t: t.amax(1)), ("mean", lambda t: t.mean(1))):
        tokens, _, pooled = ViTEncoder(ModelConfig(dim=16, heads=2, patch_size=8, image_pool=pool), 32)(image)
        assert torch.equal(pooled, reduce(tokens))


@pytest.mark.parametrize("patch_size", [6, 12, 1])
def test_a_conv_stem_needs_a_power_of_two_patch_and_says_how_else(patch_size):
    with pytest.raises(ConfigError) as info:
        ModelConfig(patch_size=patch_size).validate()
    assert info.value.key == "patch_size" and "model.image_stem=patch" in str(info.value)
    ModelConfig(patch_size=patch_size, image_stem="patch").validate()


def test_a_checkpoint_from_before_the_conv_stem_names_the_settings_that_resume_it(demo_dataset, tmp_path):
    saved = to_dict(experiment_config(demo_dataset, tmp_path))
    del saved["model"]["image_stem"], saved["model"]["image_pool"]   # as mm wrote them before
    with pytest.raises(ConfigError) as info:
        check_same_settings(tmp_path, saved, to_dict(experiment_config(demo_dataset, tmp_path)))
    assert str(info.value).startswith("model.image_stem: checkpoint patch, config conv; model.image_pool: "
                                      "checkpoint mean, config max")
    check_same_settings(tmp_path, saved, to_dict(experiment_config(demo_dataset, tmp_path, "model.image_stem=patch",
                                                                   "model.image_pool=mean")))
