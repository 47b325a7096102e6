"""The encoders: a convolutional stem into the ViT, max-pooled; audio convolutions; per-modality classifiers;
what they refuse; checkpoints from before them."""

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
    for key in ("image_stem", "image_pool", "audio_convs"):    # as mm wrote them before
        del saved["model"][key]
    with pytest.raises(ConfigError) as info:
        check_same_settings(tmp_path, saved, to_dict(experiment_config(demo_dataset, tmp_path)))
    assert str(info.value).startswith("model.image_stem: checkpoint patch, config conv; model.image_pool: "
                                      "checkpoint mean, config max; model.audio_convs: checkpoint 0, config 2")
    check_same_settings(tmp_path, saved, to_dict(experiment_config(
        demo_dataset, tmp_path, "model.image_stem=patch", "model.image_pool=mean", "model.audio_convs=0")))


def test_the_audio_convolutions_keep_the_frame_rate_and_widen_what_one_token_hears():
    from mmtrain.model import AudioEncoder
    mel, mask = torch.randn(2, 16, 200), torch.ones(2, 200, dtype=torch.bool)
    for convs in (0, 2):
        encoder = AudioEncoder(ModelConfig(dim=16, heads=2, audio_convs=convs), 16)
        tokens, token_mask, _ = encoder(mel, mask)
        assert tokens.shape == (2, 50, 16) and token_mask.shape == (2, 50)   # one token per 4 frames either way
    # a change to one frame reaches tokens 4 * (1 + 3 * 2) frames away only through the two kernel-7 convs
    encoder = AudioEncoder(ModelConfig(dim=16, heads=2, audio_convs=2), 16)
    probe = mel.clone().requires_grad_(True)
    encoder.subsample(probe)[0, :, 25].sum().backward()
    reached = probe.grad[0].abs().sum(0).nonzero().flatten()
    assert reached.max() - reached.min() > 40


def test_each_modality_classifies_alone_when_unimodal_weight_is_set():
    from mmtrain.losses import total_loss
    from mmtrain.model import FusionModel
    torch.manual_seed(0)
    model = FusionModel(ModelConfig(dim=16, heads=2, embed_dim=16, text_layers=1, image_layers=1, audio_layers=1,
                                    fusion_layers=1), modalities=["text", "image", "audio"], vocab_size=20,
                        image_size=16, n_mels=8, num_classes=3, classify=True, unimodal=True)
    batch = {"tokens": torch.randint(0, 20, (4, 5)), "tokens_mask": torch.ones(4, 5, dtype=torch.bool),
             "image": torch.randn(4, 3, 16, 16), "mel": torch.randn(4, 8, 12),
             "mel_mask": torch.ones(4, 12, dtype=torch.bool), "label": torch.tensor([0, 1, 2, 1]),
             "has_label": torch.ones(4, dtype=torch.bool), "has_text": torch.ones(4, dtype=torch.bool),
             "has_image": torch.ones(4, dtype=torch.bool), "has_audio": torch.tensor([True, True, False, False])}
    out = model(batch)
    assert set(out["unimodal_logits"]) == {"text", "image", "audio"}
    losses = total_loss(out, batch, "both", 1.0, unimodal_weight=0.5)
    ce = torch.nn.functional.cross_entropy
    expected = 0.5 * torch.stack([ce(out["unimodal_logits"]["text"], batch["label"]),
                                  ce(out["unimodal_logits"]["image"], batch["label"]),
                                  ce(out["unimodal_logits"]["audio"][:2], batch["label"][:2])]).mean()
    assert torch.allclose(losses["loss/unimodal"], expected)   # a sample without audio is not in audio's part
    assert "loss/unimodal" not in total_loss(out, batch, "both", 1.0)
    without = FusionModel(ModelConfig(dim=16, heads=2, embed_dim=16), modalities=["text"], vocab_size=20,
                          image_size=16, n_mels=8, num_classes=3, classify=True)
    assert without.unimodal is None


def test_a_checkpoint_without_per_modality_classifiers_does_not_resume_with_them(demo_dataset, tmp_path):
    saved = to_dict(experiment_config(demo_dataset, tmp_path))
    del saved["train"]["unimodal_weight"]
    check_same_settings(tmp_path, saved, to_dict(experiment_config(demo_dataset, tmp_path)))
    with pytest.raises(ConfigError) as info:
        check_same_settings(tmp_path, saved, to_dict(experiment_config(demo_dataset, tmp_path,
                                                                       "train.unimodal_weight=0.5")))
    assert info.value.key == "train.unimodal_weight"
    # only whether the classifiers exist shapes the model: another weight resumes
    saved["train"]["unimodal_weight"] = 1.0
    check_same_settings(tmp_path, saved, to_dict(experiment_config(demo_dataset, tmp_path,
                                                                   "train.unimodal_weight=0.5")))
