"""The fusion model: one encoder per modality -> (tokens, mask, pooled) -> heads.

    text  ids  [B, L]        -> embedding + Transformer           -> tokens [B, L, D]
    image      [B, 3, H, W]  -> conv stem + ViT (or a torchvision CNN) -> tokens [B, N, D]
    audio mel  [B, M, T]     -> 2 strided + 2 wide convs + Transformer -> tokens [B, T/4, D]
    pooled (masked mean; the ViT's max) -> projection -> L2-normalised embedding  (contrastive loss)
    pooled -> a linear classifier per modality                     (with train.unimodal_weight)
    [CLS] + all tokens + modality embeddings -> fusion Transformer -> class logits

A sample without a modality has that modality's presence flag False; its
tokens are masked out of fusion and its embedding is excluded from every
loss and metric. Encoders still run on the (zero) input so that every
parameter gets a gradient on every rank, which DDP requires.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mmdata.config import ConfigError, require, require_choice
from mmdata.schema import MODALITIES

INIT_STD = 0.02   # learned position and modality embeddings start small next to the (unit-scale) inputs
MAX_LAYERS = 1024   # per stack: far past any trained model; a typo like 1e9 fails here, not after building layers


@dataclass
class ModelConfig:
    dim: int = 96                   # width of every encoder and of fusion
    heads: int = 4
    mlp_ratio: float = 2.0
    dropout: float = 0.0
    text_layers: int = 2
    image_encoder: str = "vit"      # vit | cnn
    image_layers: int = 2           # vit only
    patch_size: int = 8             # vit only: the image side of one token
    image_stem: str = "conv"        # vit only: conv (stride-2 3x3 convolutions) | patch (one patchify conv)
    image_pool: str = "max"         # vit only: the image's vector is the max (or mean) of its tokens
    cnn_arch: str = "resnet18"      # cnn only: a torchvision model name
    image_weights: str | None = None  # local file with a state dict for the image encoder
    audio_layers: int = 2
    audio_convs: int = 2            # kernel-7 convolutions after the stride-4 subsampling (about 0.3 s each)
    fusion_layers: int = 2
    embed_dim: int = 96             # shared contrastive embedding space
    temperature: float = 0.07       # initial; learned
    max_positions: int = 1024
    max_classes: int = 100_000      # a dataset whose labels need a larger classification head stops before training

    def validate(self) -> None:
        require(self.heads > 0, "heads", f"must be positive; got {self.heads}")
        require(self.dim > 0 and self.dim % self.heads == 0, "dim",
                f"must be a positive multiple of heads ({self.heads}); got {self.dim}")
        require(self.mlp_ratio > 0, "mlp_ratio", f"must be positive; got {self.mlp_ratio}")
        require(self.embed_dim > 0, "embed_dim", f"must be positive; got {self.embed_dim}")
        require(self.max_positions >= 1, "max_positions", f"must be at least 1; got {self.max_positions}")
        require(self.max_classes >= 2, "max_classes", f"must be at least 2; got {self.max_classes}")
        require_choice(self.image_encoder, "image_encoder", ("vit", "cnn"))
        if self.image_encoder == "cnn":
            import torchvision
            archs = torchvision.models.list_models(module=torchvision.models)   # the classification models
            require(self.cnn_arch in archs, "cnn_arch", f"{self.cnn_arch!r} is not a torchvision classification "
                    f"model; use e.g. resnet18, resnet50, efficientnet_b0, mobilenet_v3_small or convnext_tiny "
                    f"(torchvision.models.list_models(module=torchvision.models) lists all {len(archs)})")
        require(self.patch_size > 0, "patch_size", "must be positive")
        require_choice(self.image_stem, "image_stem", ("conv", "patch"))
        require_choice(self.image_pool, "image_pool", ("max", "mean"))
        if self.image_encoder == "vit" and self.image_stem == "conv":
            require(self.patch_size >= 2 and self.patch_size & (self.patch_size - 1) == 0, "patch_size",
                    f"must be a power of two (2, 4, 8, 16, ...) with image_stem=conv, which halves the image "
                    f"once per stride-2 convolution; got {self.patch_size} (or set model.image_stem=patch)")
        require(0 <= self.dropout < 1, "dropout", "must be in [0, 1)")
        require(self.temperature > 0, "temperature", "must be positive")
        require(0 <= self.audio_convs <= MAX_LAYERS, "audio_convs",
                f"must be in [0, {MAX_LAYERS}]; got {self.audio_convs}")
        for name in ("text_layers", "image_layers", "audio_layers", "fusion_layers"):
            require(1 <= getattr(self, name) <= MAX_LAYERS, name,
                    f"must be in [1, {MAX_LAYERS}]; got {getattr(self, name)}")


def transformer(config: ModelConfig, layers: int) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(config.dim, config.heads, int(config.dim * config.mlp_ratio),
                                       config.dropout, activation="gelu", batch_first=True, norm_first=True)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


def small_init(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.randn(*shape) * INIT_STD)


def real_samples(batch: dict) -> torch.Tensor:
    """[B] True for the batch's real samples, False for padding (the eval loader pads its last batch)."""
    return ~batch["is_pad"] if "is_pad" in batch else torch.ones_like(batch["has_label"])


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.unsqueeze(-1).to(x.dtype)
    return (x * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def computable(mask: torch.Tensor) -> torch.Tensor:
    """Attention over a row with no valid key gives NaN; let absent rows attend to position 0."""
    mask = mask.clone()
    mask[:, 0] |= ~mask.any(1)
    return mask


class TextEncoder(nn.Module):
    def __init__(self, config: ModelConfig, vocab_size: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, config.dim)
        self.pos = small_init(config.max_positions, config.dim)
        self.encoder = transformer(config, config.text_layers)
        self.norm = nn.LayerNorm(config.dim)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor):
        tokens = tokens[:, : self.pos.shape[0]]
        mask = computable(mask[:, : self.pos.shape[0]])
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        x = self.norm(self.encoder(x, src_key_padding_mask=~mask))
        return x, mask, masked_mean(x, mask)


def conv_stem(dim: int, patch_size: int) -> nn.Sequential:
    """log2(patch_size) stride-2 3x3 convolutions, widths doubling up to dim, then a 1x1 to dim: one token
    per patch_size x patch_size pixels, as a patchify conv gives, but built from local edges first. Xiao et
    al., "Early Convolutions Help Transformers See Better" (2021): a ViT with this stem trains faster and
    more stably, and on small data learns shapes a patchify stem does not. GroupNorm rather than BatchNorm:
    nothing depends on the batch (its size per rank, padded or absent images)."""
    steps = int(math.log2(patch_size))
    widths = [max(8, dim // 2 ** (steps - k)) for k in range(1, steps + 1)]
    layers, channels = [], 3
    for width in widths:
        layers += [nn.Conv2d(channels, width, 3, stride=2, padding=1, bias=False),
                   nn.GroupNorm(math.gcd(8, width), width), nn.GELU()]
        channels = width
    return nn.Sequential(*layers, nn.Conv2d(channels, dim, 1))


class ViTEncoder(nn.Module):
    def __init__(self, config: ModelConfig, image_size: int):
        super().__init__()
        self.patch = conv_stem(config.dim, config.patch_size) if config.image_stem == "conv" \
            else nn.Conv2d(3, config.dim, config.patch_size, config.patch_size)
        n = (image_size // config.patch_size) ** 2
        self.pos = small_init(n, config.dim)
        self.encoder = transformer(config, config.image_layers)
        self.norm = nn.LayerNorm(config.dim)
        # max: an object that fills a few patches is not averaged away by the background (on real digits at
        # 64 px, image-only accuracy after 600 steps 0.92 against 0.77 with the mean; benchmarks/bench_image.py)
        self.max_pool = config.image_pool == "max"

    def forward(self, image: torch.Tensor):
        x = self.patch(image).flatten(2).transpose(1, 2)
        x = self.norm(self.encoder(x + self.pos[: x.shape[1]]))
        mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        return x, mask, x.amax(1) if self.max_pool else x.mean(1)


class CNNEncoder(nn.Module):
    """A torchvision classification backbone without its head; its feature map becomes tokens."""

    def __init__(self, config: ModelConfig, image_size: int = 64):
        super().__init__()
        import torchvision
        backbone = torchvision.models.get_model(config.cnn_arch, weights=None)
        self.features = nn.Sequential(*list(backbone.children())[:-2])
        unusable = f"{config.cnn_arch} cannot serve as the image encoder on this dataset's {image_size}px images"
        if not len(self.features):
            raise ConfigError("model.cnn_arch", f"{unusable}: without its last two modules nothing is left; "
                              f"use a ResNet, EfficientNet, MobileNet, VGG or ConvNeXt")
        # at the dataset's image size, so that a backbone too deep for it fails here (eval mode: batch norm over
        # a 1x1 map of one image is not defined, and the probe must not touch the running statistics)
        self.features.eval()
        with torch.no_grad():
            try:
                probe = self.features(torch.zeros(1, 3, image_size, image_size))
            except (RuntimeError, ValueError, TypeError, AssertionError) as e:
                raise ConfigError("model.cnn_arch", f"{unusable}: {str(e).splitlines()[0] if str(e) else e!r}; "
                                  f"use a ResNet or another backbone that takes small images") from None
        if probe.ndim != 4:
            raise ConfigError("model.cnn_arch", f"{unusable}: its features have shape {tuple(probe.shape)}, not "
                              f"[batch, channels, height, width]; use a ResNet, EfficientNet, MobileNet or VGG")
        self.features.train()
        self.proj = nn.Conv2d(probe.shape[1], config.dim, 1)

    def forward(self, image: torch.Tensor):
        x = self.proj(self.features(image)).flatten(2).transpose(1, 2)
        mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        return x, mask, x.mean(1)


def load_image_weights(encoder: nn.Module, path: str) -> None:
    """model.image_weights into the image encoder; anything but a matching state dict is a ConfigError
    saying what the file is and what it should be."""
    from pathlib import Path
    key, file = "model.image_weights", Path(path)
    expected = "a state dict of this image encoder, as torch.save(model.encoders['image'].state_dict(), path) writes"
    if not file.is_file():
        raise ConfigError(key, f"{path} {'is not a regular file' if file.exists() else 'does not exist'}")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - whatever the file is, it is not weights we can load safely
        detail = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        reason = f"{type(e).__name__}: {detail}" if detail else type(e).__name__
        raise ConfigError(key, f"{path} is not a weights file torch.load can read with weights_only=True "
                          f"({reason}); it must be {expected}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(key, f"{path} holds a {type(state).__name__}, not a state dict of tensors; it must be "
                          f"{expected}")
    own = encoder.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    reshaped = [k for k in own if k in state and state[k].shape != own[k].shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} weights missing (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unknown (e.g. {unexpected[0]})")
    if reshaped:
        k = reshaped[0]
        problems.append(f"{len(reshaped)} of another shape (e.g. {k}: file {list(state[k].shape)}, "
                        f"model {list(own[k].shape)})")
    if problems:
        raise ConfigError(key, f"{path} does not match the image encoder (model.image_encoder, cnn_arch, dim, "
                          f"patch_size): {', '.join(problems)}; it must be {expected}")
    encoder.load_state_dict(state)


class AudioEncoder(nn.Module):
    STRIDE = 4

    def __init__(self, config: ModelConfig, n_mels: int):
        super().__init__()
        # the kernel-7 convolutions see rhythm (beats, syllables: half a second with two) from the first step;
        # the Transformer alone learns it late or not at all in a few hundred steps (on the demo's beep rates,
        # audio-only accuracy after 300 steps 1.0/1.0/1.0 over three seeds against 0.93/0.83/0.23)
        temporal = [layer for _ in range(config.audio_convs)
                    for layer in (nn.Conv1d(config.dim, config.dim, 7, padding=3), nn.GELU())]
        self.subsample = nn.Sequential(
            nn.Conv1d(n_mels, config.dim, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv1d(config.dim, config.dim, 3, stride=2, padding=1), nn.GELU(), *temporal)
        self.pos = small_init(config.max_positions, config.dim)
        self.encoder = transformer(config, config.audio_layers)
        self.norm = nn.LayerNorm(config.dim)

    def forward(self, mel: torch.Tensor, mel_mask: torch.Tensor):
        x = self.subsample(mel).transpose(1, 2)[:, : self.pos.shape[0]]
        mask = computable(mel_mask[:, :: self.STRIDE][:, : x.shape[1]])
        x = self.norm(self.encoder(x + self.pos[: x.shape[1]], src_key_padding_mask=~mask))
        return x, mask, masked_mean(x, mask)


class FusionModel(nn.Module):
    def __init__(self, config: ModelConfig, *, modalities: list[str], vocab_size: int, image_size: int,
                 n_mels: int, num_classes: int, classify: bool, unimodal: bool = False):
        super().__init__()
        self.modalities = [m for m in MODALITIES if m in modalities]
        self.encoders = nn.ModuleDict()
        if "text" in self.modalities:
            self.encoders["text"] = TextEncoder(config, vocab_size)
        if "image" in self.modalities:
            self.encoders["image"] = ViTEncoder(config, image_size) if config.image_encoder == "vit" \
                else CNNEncoder(config, image_size)
            if config.image_weights:
                load_image_weights(self.encoders["image"], config.image_weights)
        if "audio" in self.modalities:
            self.encoders["audio"] = AudioEncoder(config, n_mels)
        self.project = nn.ModuleDict({m: nn.Linear(config.dim, config.embed_dim) for m in self.modalities})
        # shape [1], not a scalar: FSDP2 cannot shard 0-d parameters
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1 / config.temperature)))
        self.classify = classify
        if classify:
            self.cls = nn.Parameter(torch.zeros(1, 1, config.dim))
            self.modality_embed = small_init(len(MODALITIES), config.dim)
            self.fusion = transformer(config, config.fusion_layers)
            self.head = nn.Sequential(nn.LayerNorm(config.dim), nn.Linear(config.dim, num_classes))
        # a linear classifier on each modality's pooled vector (train.unimodal_weight): every encoder learns
        # the classes from every sample, instead of waiting while another modality answers for the fusion head
        self.unimodal = nn.ModuleDict({m: nn.Linear(config.dim, num_classes) for m in self.modalities}) \
            if classify and unimodal else None

    def encode(self, batch: dict) -> dict[str, tuple]:
        out = {}
        if "text" in self.encoders:
            out["text"] = self.encoders["text"](batch["tokens"], batch["tokens_mask"])
        if "image" in self.encoders:
            out["image"] = self.encoders["image"](batch["image"])
        if "audio" in self.encoders:
            out["audio"] = self.encoders["audio"](batch["mel"], batch["mel_mask"])
        return out

    def forward(self, batch: dict, subsets: tuple[tuple[str, ...], ...] = ()) -> dict:
        """Embeddings, presence, the fusion head's logits and the temperature; with ``subsets`` (evaluation),
        also the head's logits when shown only each subset of modalities (the others masked out, as when
        a sample lacks them)."""
        real = real_samples(batch)
        encoded = self.encode(batch)
        present = {m: batch[f"has_{m}"] & real for m in encoded}
        embeddings = {m: F.normalize(self.project[m](pooled), dim=-1) for m, (_, _, pooled) in encoded.items()}
        logits = self.fuse(encoded, present) if self.classify else None
        out = {"embeddings": embeddings, "present": present, "logits": logits,
               "logit_scale": self.logit_scale.squeeze(0).clamp(max=math.log(100.0)).exp()}
        if self.unimodal is not None:
            out["unimodal_logits"] = {m: self.unimodal[m](pooled) for m, (_, _, pooled) in encoded.items()}
        if self.classify and subsets:
            out["subset_logits"] = {s: self.fuse(encoded, {m: p if m in s else torch.zeros_like(p)
                                                            for m, p in present.items()}) for s in subsets}
        return out

    def fuse(self, encoded: dict, present: dict) -> torch.Tensor:
        pieces, masks = [], []
        for m, (tokens, mask, _) in encoded.items():
            pieces.append(tokens + self.modality_embed[MODALITIES.index(m)])
            masks.append(mask & present[m].unsqueeze(1))
        batch = pieces[0].shape[0]
        x = torch.cat([self.cls.expand(batch, -1, -1), *pieces], 1)
        keep = torch.cat([torch.ones(batch, 1, dtype=torch.bool, device=x.device), *masks], 1)
        return self.head(self.fusion(x, src_key_padding_mask=~keep)[:, 0])
