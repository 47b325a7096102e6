"""Decode one sample's members, augment it, and collate samples into a batch.

    members {ext: bytes} -> decode_sample (npy / image bytes -> arrays, seeded augment)
    -> [sample dict, ...] -> collate (pad + presence masks) -> batch dict of tensors

Runs inside DataLoader workers for every sample, so it stays cheap: ``.npy``
members load with ``allow_pickle=False`` only (nothing in a shard is pickled,
and a pickle in a shard must never execute), images decode through
torchvision's native decoders with Pillow as the fallback, and all randomness
comes from the ``numpy.random.Generator`` the caller seeds per sample, so a
batch is reproducible from (seed, epoch, position) alone.
"""

from __future__ import annotations

import functools
import io
import json
import math
import re
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2.functional import resize

from mmdata.config import require
from mmdata.schema import IMAGE_EXTS, JSON, LABEL, MEL, TOKENS

# ImageNet statistics (RGB, for pixels in [0, 1]): what pretrained vision backbones expect.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_KINDS = {JSON: "metadata", LABEL: "label", TOKENS: "text", MEL: "audio", **{e: "image" for e in IMAGE_EXTS}}


@dataclass
class AugmentConfig:
    image_crop: bool = False            # random resized crop back to the stored size
    crop_scale: list[float] = field(default_factory=lambda: [0.6, 1.0])    # fraction of the area kept
    crop_ratio: list[float] = field(default_factory=lambda: [0.75, 1.3333])  # width / height of the crop
    image_flip: bool = False            # horizontal flip with p=0.5
    mel_freq_masks: int = 0             # SpecAugment: number of frequency masks
    mel_freq_width: int = 8             # max width of each (bins)
    mel_time_masks: int = 0             # SpecAugment: number of time masks
    mel_time_width: int = 20            # max width of each (frames)

    @property
    def active(self) -> bool:
        return self.image_crop or self.image_flip or self.mel_freq_masks > 0 or self.mel_time_masks > 0

    def validate(self) -> None:
        for key in ("crop_scale", "crop_ratio"):
            require(len(getattr(self, key)) == 2, key, f"must be [low, high]; got {getattr(self, key)}")
        lo, hi = self.crop_scale
        require(0 < lo <= hi <= 1, "crop_scale", f"must satisfy 0 < low <= high <= 1; got {self.crop_scale}")
        lo, hi = self.crop_ratio
        require(0 < lo <= hi, "crop_ratio", f"must satisfy 0 < low <= high; got {self.crop_ratio}")
        for key in ("mel_freq_masks", "mel_time_masks"):
            require(getattr(self, key) >= 0, key, f"must be >= 0; got {getattr(self, key)}")
        for key in ("mel_freq_width", "mel_time_width"):
            require(getattr(self, key) >= 1, key, f"must be >= 1; got {getattr(self, key)}")


class DecodeError(Exception):
    """A member that does not decode. ``member`` is its extension (``jpg``); the caller adds shard and key."""

    def __init__(self, message: str, member: str = ""):
        super().__init__(message)
        self.member = member


def decode_sample(members: dict[str, bytes], augment: AugmentConfig, rng: np.random.Generator | None) -> dict:
    """Decode the members that were read into arrays, then augment them with ``rng`` only.

    ``members`` maps extension -> bytes; a modality whose member is absent
    (not requested, or not in the sample) comes back as None. Without a
    ``json`` member the id is "" and the label comes from ``cls`` or is None:
    the loader fills both from its index. Returns ``{"id", "label",
    "tokens" (int64 1-D), "image" (uint8 [3, H, W]), "mel" (float16 [n_mels, T], as stored)}``.
    """
    meta = _decode_member(members, JSON, "", _decode_json) or {}
    sample_id = str(meta.get("id", ""))
    label = _decode_member(members, LABEL, sample_id, _decode_label)
    if LABEL not in members:
        label = _json_label(meta, sample_id)
    tokens = _decode_member(members, TOKENS, sample_id, _decode_tokens)
    image_ext = next((e for e in IMAGE_EXTS if e in members), None)
    image = _decode_member(members, image_ext, sample_id, _decode_image) if image_ext else None
    mel = _decode_member(members, MEL, sample_id, _decode_mel)
    if augment.active and image is not None:
        image = augment_image(image, augment, rng)
    if augment.active and mel is not None:
        mel = augment_mel(mel, augment, rng)
    return {"id": sample_id, "label": label, "tokens": tokens, "image": image, "mel": mel}


def _decode_member(members: dict, ext: str, sample_id: str, decode):
    """``decode(members[ext])`` (None when absent), turning any failure into a DecodeError naming it."""
    if ext not in members:
        return None
    try:
        return decode(members[ext])
    except Exception as e:  # noqa: BLE001 - any failure of untrusted bytes is a bad member
        raise _member_error(ext, sample_id, str(e)) from None


def _member_error(ext: str, sample_id: str, reason: str) -> DecodeError:
    of = f" of sample {sample_id!r}" if sample_id else ""
    return DecodeError(f"{_KINDS.get(ext, ext)} member {ext!r}{of} does not decode: {reason}", ext)


def _json_label(meta: dict, sample_id: str) -> int | None:
    label = meta.get("label")
    if label is not None and (isinstance(label, bool) or not isinstance(label, int)):
        raise _member_error(JSON, sample_id, f"label must be an integer or null; got {label!r}")
    return label


def _decode_json(data: bytes) -> dict:
    meta = json.loads(bytes(data))
    if not isinstance(meta, dict):
        raise ValueError(f"expected a JSON object, got {type(meta).__name__}")
    return meta


def _decode_label(data: bytes) -> int:
    return int(bytes(data).decode("ascii").strip())


# The header np.save writes for plain numeric arrays. Parsing it with a regex instead of
# numpy's ast-based reader is several times faster, and only plain numeric dtypes pass.
_NPY_HEADER = re.compile(
    rb"\{'descr': '([<|][iuf][1248])', 'fortran_order': (False|True), 'shape': \(([0-9, ]*)\), \} *\n")


def _load_npy(data: bytes) -> np.ndarray:
    """A read-only array over ``data``; never unpickles (object arrays raise)."""
    layout = _npy_layout(bytes(data[:NPY_PREFIX]))
    if layout:
        dtype, shape, order, count, offset = layout
        return np.frombuffer(data, dtype, count=count, offset=offset).reshape(shape, order=order)
    # anything else (big-endian, other dtypes, long headers): numpy's reader, still without pickles
    return np.load(io.BytesIO(data), allow_pickle=False)


# np.save pads magic + version + header to a multiple of 64 bytes: 128 for ordinary arrays, so the
# first 128 bytes of a member are its whole header (and the cache key: a dataset has few distinct ones).
NPY_PREFIX = 128


@functools.lru_cache(maxsize=4096)
def _npy_layout(prefix: bytes) -> tuple[np.dtype, tuple[int, ...], str, int, int] | None:
    """(dtype, shape, order, count, data offset) of a plain numeric .npy header, or None."""
    if prefix[:6] != b"\x93NUMPY" or len(prefix) < 12 or prefix[6] not in (1, 2) or prefix[7] != 0:
        return None
    start = 10 if prefix[6] == 1 else 12
    end = start + int.from_bytes(prefix[8:start], "little")
    match = _NPY_HEADER.fullmatch(prefix[start:end]) if end <= len(prefix) else None
    if not match:
        return None
    shape = tuple(int(n) for n in match.group(3).split(b",") if n.strip())
    order = "F" if match.group(2) == b"True" else "C"
    return np.dtype(match.group(1).decode()), shape, order, math.prod(shape), end


def _decode_tokens(data: bytes) -> np.ndarray:
    tokens = _load_npy(data)
    if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
        raise ValueError(f"expected 1-D integer token ids, got {tokens.dtype} with shape {tokens.shape}")
    return tokens.astype(np.int64)  # a writable copy: torch.from_numpy shares it later


def _decode_mel(data: bytes) -> np.ndarray:
    mel = _load_npy(data)
    if mel.ndim != 2 or mel.dtype.kind != "f":
        raise ValueError(f"expected a 2-D float [n_mels, frames] array, got {mel.dtype} with shape {mel.shape}")
    return mel  # as stored (float16), read-only: collate copies it, SpecAugment copies before masking


def _native_image_op():
    """torchvision's decoding op itself, or None where this torchvision has none.

    Its Python wrapper ``decode_image`` issues a DeprecationWarning on every call
    (torchvision 0.29 hands decoding over to TorchCodec, which needs FFmpeg) and
    logs API usage, a visible share of a worker's time on small images. The op is
    what the wrapper calls; without it the wrapper is used, and Pillow after that.
    """
    try:
        op = torch.ops.image.decode_image
        op.default   # resolves the op: raises where torchvision's image library is not loaded
        return op
    except (AttributeError, RuntimeError):
        return None


_IMAGE_OP = _native_image_op()


def _decode_image(data: bytes) -> torch.Tensor:
    """uint8 [3, H, W]: torchvision's native decoders first, Pillow for other formats."""
    try:
        encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        image = (_IMAGE_OP(encoded, ImageReadMode.RGB.value, False) if _IMAGE_OP is not None
                 else decode_image(encoded, mode=ImageReadMode.RGB))
    except Exception as native_error:  # noqa: BLE001 - e.g. a format torchvision lacks (bmp, tiff)
        try:
            with Image.open(io.BytesIO(data)) as im:
                pixels = np.array(im.convert("RGB"))
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"{e} (torchvision: {str(native_error).splitlines()[-1]})") from None
        image = torch.from_numpy(pixels).permute(2, 0, 1).contiguous()
    if image.ndim != 3 or image.shape[0] != 3 or image.shape[1] == 0 or image.shape[2] == 0:
        raise ValueError(f"decoded to shape {tuple(image.shape)}, expected [3, H, W]")
    return image


def augment_image(image: torch.Tensor, augment: AugmentConfig, rng: np.random.Generator) -> torch.Tensor:
    """Random resized crop (back to the stored size) then horizontal flip, as configured."""
    if augment.image_crop:
        height, width = image.shape[1:]
        top, left, h, w = crop_box(height, width, augment.crop_scale, augment.crop_ratio, rng)
        if (h, w) != (height, width):
            image = resize(image[:, top:top + h, left:left + w], [height, width], antialias=True)
    if augment.image_flip and rng.random() < 0.5:
        image = torch.flip(image, dims=[2])
    return image


def crop_box(height: int, width: int, scale, ratio, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` as torchvision's RandomResizedCrop picks it, but drawn from ``rng``.

    Up to 10 draws of (area fraction, log-uniform aspect ratio) that fit;
    otherwise the largest centre crop whose ratio is within ``ratio``.
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, max(1, min(height, int(round(width / ratio[0]))))
    elif in_ratio > ratio[1]:
        w, h = max(1, min(width, int(round(height * ratio[1])))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def augment_mel(mel: np.ndarray, augment: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """SpecAugment on a copy: bands of bins / frames set to the mel's minimum (silence in log space).

    Each band is 1..width wide (clipped to the axis), so every requested mask
    hides something; bands may overlap.
    """
    if mel.size == 0 or (augment.mel_freq_masks == 0 and augment.mel_time_masks == 0):
        return mel
    mel = np.array(mel)  # a writable copy: decoded arrays are views of the shard bytes
    floor = mel.min()
    for axis, count, max_width in ((0, augment.mel_freq_masks, augment.mel_freq_width),
                                   (1, augment.mel_time_masks, augment.mel_time_width)):
        size = mel.shape[axis]
        for _ in range(count):
            width = int(rng.integers(1, min(max_width, size) + 1))
            start = int(rng.integers(0, size - width + 1))
            if axis == 0:
                mel[start:start + width, :] = floor
            else:
                mel[:, start:start + width] = floor
    return mel


def collate(samples: list[dict], pad_id: int = 0, pad_tokens_to: int | None = None,
            normalize_images: bool = False, empty=np.empty) -> dict:
    """Stack decoded samples into tensors; absent modalities are False in ``has_*``, never fake data.

    Keys: ``ids``; ``label`` int64 [B] (-1 where missing) + ``has_label``;
    ``tokens`` int64 [B, L] (pad_id-padded to the longest, or exactly
    ``pad_tokens_to``, truncating) + ``tokens_mask`` + ``has_text``;
    ``image`` uint8 [B, 3, H, W] (max H, W; zero padded bottom/right) +
    ``has_image`` — float32 ImageNet-normalised when ``normalize_images``, with
    absent images left 0; ``mel`` float16 (the stored precision; move_to makes it float32) [B, n_mels, T] (zero padded) +
    ``mel_mask`` [B, T] + ``has_audio``. A modality absent from the whole
    batch still has its keys, with size-1 trailing dims.

    ``empty(shape, dtype)`` allocates the big arrays (a DataLoader worker
    passes one that places them in shared memory, see transport.py).
    """
    labels = [s["label"] for s in samples]
    batch = {
        "ids": [s["id"] for s in samples],
        "label": torch.tensor([-1 if x is None else x for x in labels], dtype=torch.int64),
        "has_label": torch.tensor([x is not None for x in labels], dtype=torch.bool),
    }
    batch.update(collate_tokens([s["tokens"] for s in samples], pad_id, pad_tokens_to, empty))
    batch.update(collate_images([s["image"] for s in samples], normalize_images, empty))
    batch.update(collate_mels([s["mel"] for s in samples], empty))
    return batch


def collate_tokens(seqs: list, pad_id: int, pad_to: int | None, empty=np.empty) -> dict:
    present = [t is not None for t in seqs]
    longest = max((len(t) for t in seqs if t is not None), default=0)
    length = pad_to if pad_to is not None else max(longest, 1)
    tokens = empty((len(seqs), length), np.int64)
    tokens.fill(pad_id)
    lengths = np.array([min(len(t), length) if t is not None else 0 for t in seqs], np.int64)
    for i, (t, n) in enumerate(zip(seqs, lengths.tolist())):
        if n:
            tokens[i, :n] = t[:n]
    mask = empty((len(seqs), length), np.bool_)
    np.less(np.arange(length), lengths[:, None], out=mask)   # one operation, not one per sample
    return {"tokens": torch.from_numpy(tokens), "tokens_mask": torch.from_numpy(mask),
            "has_text": torch.tensor(present, dtype=torch.bool)}


def collate_images(images: list, normalize: bool, empty=np.empty) -> dict:
    """uint8 (or normalised float32) [B, 3, H, W] in channels_last memory format (NHWC in memory).

    Decoders produce pixels as H x W x RGB; reordering them to NCHW on the CPU
    costs a large fraction of the JPEG decode itself.
    Channels-last tensors are what convolutions prefer anyway, and a model
    that needs NCHW gets it with ``.contiguous()`` on the GPU.
    """
    present = torch.tensor([x is not None for x in images], dtype=torch.bool)
    shapes = {tuple(x.shape) for x in images if x is not None}
    h = max((s[1] for s in shapes), default=1)
    w = max((s[2] for s in shapes), default=1)
    pixels = torch.from_numpy(empty((len(images), h, w, 3), np.uint8) if not normalize
                              else np.empty((len(images), h, w, 3), np.uint8))
    if images and len(shapes) <= 1:   # the usual case: one stored size; absent images are zeros
        zeros = torch.zeros((h, w, 3), dtype=torch.uint8) if not bool(present.all()) else None
        torch.stack([x.permute(1, 2, 0) if x is not None else zeros for x in images], out=pixels)
    else:
        # sizes differ: zero padding bottom/right. numpy row copies: an indexed torch assignment costs 3x
        rows = pixels.numpy()
        rows.fill(0)
        for i, x in enumerate(images):
            if x is not None:
                rows[i, :x.shape[1], :x.shape[2]] = x.permute(1, 2, 0).numpy()
    out = pixels.permute(0, 3, 1, 2)
    if normalize:
        out = normalize_images(out, torch.from_numpy(empty((len(images), h, w, 3), np.float32)).permute(0, 3, 1, 2))
        out[~present] = 0  # absent images stay 0 rather than become a "black image"
    return {"image": out, "has_image": present}


def normalize_images(pixels: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 RGB [B, 3, H, W] -> float32 ``(x / 255 - mean) / std`` with ImageNet's statistics, into ``out``
    when given (any memory format); one multiply-add over the batch."""
    std = torch.tensor(IMAGENET_STD, device=pixels.device).view(1, 3, 1, 1)
    mean = torch.tensor(IMAGENET_MEAN, device=pixels.device).view(1, 3, 1, 1)
    out = pixels.float() if out is None else out.copy_(pixels)
    return out.mul_(1 / (255 * std)).sub_(mean / std)


def collate_mels(mels: list, empty=np.empty) -> dict:
    present = [m is not None for m in mels]
    n_mels = max((m.shape[0] for m in mels if m is not None), default=1)
    frames = max((m.shape[1] for m in mels if m is not None), default=1)
    # float16 is the stored precision: sending it as such halves the bytes moved from workers
    out = empty((len(mels), n_mels, frames), np.float16)
    out.fill(0)
    lengths = np.zeros(len(mels), np.int64)
    for i, m in enumerate(mels):
        if m is not None:
            out[i, :m.shape[0], :m.shape[1]] = m
            lengths[i] = m.shape[1]
    mask = empty((len(mels), frames), np.bool_)
    np.less(np.arange(frames), lengths[:, None], out=mask)
    return {"mel": torch.from_numpy(out), "mel_mask": torch.from_numpy(mask),
            "has_audio": torch.tensor(present, dtype=torch.bool)}
