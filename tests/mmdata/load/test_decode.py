"""decode_sample / collate / augment on in-memory members (no shards, no files except markers)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from mmdata.config import ConfigError
from mmdata.load.decode import AugmentConfig, DecodeError, collate, decode_sample

NO_AUGMENT = AugmentConfig()


def npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def encoded_image(fmt: str, width: int = 16, height: int = 12) -> tuple[bytes, np.ndarray]:
    """A smooth RGB gradient (compresses well, so JPEG stays close) and its pixels [H, W, 3]."""
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // width, y * 255 // height, np.full_like(x, 128)], axis=-1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue(), pixels


def meta(sample_id: str = "demo-000004", label: int | None = 3) -> bytes:
    return json.dumps({"id": sample_id, "row": 4, "label": label}).encode()


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def test_round_trip_each_modality():
    tokens = np.array([1, 57, 9, 2], dtype=np.int32)
    mel = np.random.default_rng(1).normal(size=(8, 30)).astype(np.float16)
    png, pixels = encoded_image("PNG")
    jpg, _ = encoded_image("JPEG")
    out = decode_sample({"json": meta(), "tokens.npy": npy(tokens), "png": png, "mel.npy": npy(mel)},
                        NO_AUGMENT, rng())
    assert out["id"] == "demo-000004" and out["label"] == 3
    assert out["tokens"].dtype == np.int64 and out["tokens"].tolist() == tokens.tolist()
    assert out["image"].dtype == torch.uint8 and out["image"].shape == (3, 12, 16)
    assert torch.equal(out["image"], torch.from_numpy(pixels).permute(2, 0, 1))  # PNG is lossless
    assert out["mel"].dtype == np.float16 and np.array_equal(out["mel"], mel)  # the stored precision
    from_jpg = decode_sample({"json": meta(), "jpg": jpg}, NO_AUGMENT, rng())["image"]
    assert from_jpg.shape == (3, 12, 16)
    assert (from_jpg.int() - torch.from_numpy(pixels).permute(2, 0, 1).int()).abs().float().mean() < 4


def test_only_json_gives_none_modalities_and_cls_label_wins():
    out = decode_sample({"json": meta(label=None)}, NO_AUGMENT, rng())
    assert out == {"id": "demo-000004", "label": None, "tokens": None, "image": None, "mel": None}
    assert decode_sample({"json": meta(label=None), "cls": b"7\n"}, NO_AUGMENT, rng())["label"] == 7


@pytest.mark.parametrize("native_op", [True, False])
def test_jpeg_and_png_decode_without_warnings_through_the_op_or_the_public_wrapper(monkeypatch, native_op):
    import warnings
    import mmdata.load.decode as decode
    assert decode._IMAGE_OP is not None   # this torchvision has the op: the fast path is the one that runs
    if not native_op:
        monkeypatch.setattr(decode, "_IMAGE_OP", None)
    for fmt in ("JPEG", "PNG"):
        data, pixels = encoded_image(fmt)
        with warnings.catch_warnings():
            warnings.simplefilter("error" if native_op else "ignore")   # the wrapper warns on every call
            image = decode._decode_image(data)
        assert image.shape == (3, 12, 16) and image.dtype == torch.uint8
        assert (image.int() - torch.from_numpy(pixels).permute(2, 0, 1).int()).abs().float().mean() < 4


def test_pillow_fallback_decodes_formats_torchvision_lacks():
    bmp, pixels = encoded_image("BMP")
    image = decode_sample({"json": meta(), "png": bmp}, NO_AUGMENT, rng())["image"]
    assert torch.equal(image, torch.from_numpy(pixels).permute(2, 0, 1))


class WriteMarker:
    """Unpickling this runs ``open(path, "w")``: proof that a pickle was executed."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def pickled_npy(marker) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.array([WriteMarker(marker)], dtype=object), allow_pickle=True)
    return buf.getvalue()


@pytest.mark.parametrize("ext", ["tokens.npy", "mel.npy"])
def test_pickled_npy_is_rejected_and_never_unpickled(tmp_path, ext):
    # The payload is live: loading it with pickles allowed does create its marker.
    armed = tmp_path / "armed"
    np.load(io.BytesIO(pickled_npy(armed)), allow_pickle=True)[0].close()
    assert armed.exists()
    marker = tmp_path / "marker"
    with pytest.raises(DecodeError) as info:
        decode_sample({"json": meta(), ext: pickled_npy(marker)}, NO_AUGMENT, rng())
    assert info.value.member == ext and "demo-000004" in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize("ext, array", [("tokens.npy", np.zeros((2, 3), np.int32)),
                                        ("tokens.npy", np.zeros(3, np.float32)),
                                        ("mel.npy", np.zeros(5, np.float16)),
                                        ("mel.npy", np.zeros((4, 5), np.int16))])
def test_npy_of_wrong_dtype_or_rank_is_rejected(ext, array):
    with pytest.raises(DecodeError, match=f"'{ext}' of sample 'demo-000004'"):
        decode_sample({"json": meta(), ext: npy(array)}, NO_AUGMENT, rng())


@pytest.mark.parametrize("data", [b"not an image at all", encoded_image("JPEG")[0][:60], b""])
def test_corrupt_image_names_member_and_sample(data):
    with pytest.raises(DecodeError) as info:
        decode_sample({"json": meta(), "jpg": data}, NO_AUGMENT, rng())
    assert info.value.member == "jpg"
    assert str(info.value).startswith("image member 'jpg' of sample 'demo-000004' does not decode: ")


def test_bad_json_and_label_raise_decode_error():
    with pytest.raises(DecodeError, match="'json'"):
        decode_sample({"json": b"{not json"}, NO_AUGMENT, rng())
    with pytest.raises(DecodeError, match="'cls'"):
        decode_sample({"json": meta(), "cls": b"seven"}, NO_AUGMENT, rng())


def sample(sample_id, label=None, n_tokens=None, image_hw=None, frames=None):
    return {"id": sample_id, "label": label,
            "tokens": None if n_tokens is None else np.arange(10, 10 + n_tokens, dtype=np.int64),
            "image": None if image_hw is None else torch.full((3, *image_hw), 200, dtype=torch.uint8),
            "mel": None if frames is None else np.full((4, frames), 1.5, dtype=np.float32)}


def test_collate_pads_and_masks_mixed_samples():
    batch = collate([sample("a", 1, n_tokens=3, image_hw=(4, 6), frames=5),
                     sample("b", None, n_tokens=5, frames=2),
                     sample("c", 0, image_hw=(4, 6))], pad_id=3)
    assert batch["ids"] == ["a", "b", "c"]
    assert batch["label"].tolist() == [1, -1, 0] and batch["has_label"].tolist() == [True, False, True]
    assert batch["tokens"].dtype == torch.int64 and batch["tokens"].shape == (3, 5)
    assert batch["tokens"][0].tolist() == [10, 11, 12, 3, 3] and batch["tokens"][2].tolist() == [3] * 5
    assert batch["tokens_mask"].sum(1).tolist() == [3, 5, 0]
    assert batch["has_text"].tolist() == [True, True, False]
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (3, 3, 4, 6)
    assert batch["has_image"].tolist() == [True, False, True]
    assert batch["image"][1].eq(0).all() and batch["image"][2].eq(200).all()
    assert batch["mel"].dtype == torch.float16 and batch["mel"].shape == (3, 4, 5)
    assert batch["mel_mask"].tolist() == [[True] * 5, [True, True, False, False, False], [False] * 5]
    assert batch["mel"][1, :, 2:].eq(0).all() and batch["mel"][2].eq(0).all()
    assert batch["has_audio"].tolist() == [True, True, False]


def test_collate_pads_smaller_images_top_left():
    batch = collate([sample("a", image_hw=(2, 3)), sample("b", image_hw=(4, 5))])
    assert batch["image"].shape == (2, 3, 4, 5)
    assert batch["image"][0, :, :2, :3].eq(200).all() and batch["image"][0].sum() == 200 * 3 * 2 * 3


def test_collated_images_keep_every_pixel_in_place_in_channels_last_memory():
    from mmdata.load.decode import IMAGENET_MEAN, IMAGENET_STD, collate_images
    images = [torch.arange(3 * 4 * 5, dtype=torch.uint8).view(3, 4, 5) + i for i in range(2)]
    hwc = [x.permute(1, 2, 0).contiguous().permute(2, 0, 1) for x in images]      # how decoders lay pixels out
    for given in (images, hwc):
        out = collate_images(given, normalize=False)["image"]
        assert torch.equal(out, torch.stack(images)) and out.is_contiguous(memory_format=torch.channels_last)
    padded = collate_images([images[0], None, images[1][:, :2, :3]], normalize=False)["image"]
    assert torch.equal(padded[0], images[0]) and padded[1].eq(0).all()
    assert torch.equal(padded[2, :, :2, :3], images[1][:, :2, :3]) and padded[2, :, 2:].eq(0).all()
    normalized = collate_images([images[0], None], normalize=True)["image"]
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert torch.allclose(normalized[0], (images[0] / 255 - mean) / std, atol=1e-5) and normalized[1].eq(0).all()


def test_collating_into_reused_memory_leaves_nothing_of_the_previous_batch():
    """Workers collate into shared slots that held earlier batches: every byte must be written."""
    def stale(shape, dtype):
        return np.full(shape, 7, dtype)
    for samples in ([sample("a", 1, n_tokens=3, image_hw=(4, 6), frames=5), sample("b", n_tokens=5, frames=2),
                     sample("c", 0, image_hw=(4, 6))],                                      # one image size
                    [sample("a", image_hw=(2, 3), frames=3), sample("b"), sample("c", image_hw=(4, 5))]):
        fresh, reused = collate(samples, pad_id=3), collate(samples, pad_id=3, empty=stale)
        for key, value in fresh.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(reused[key], value), key


def test_collate_batch_without_any_modality_keeps_keys():
    batch = collate([sample("a"), sample("b")])
    assert batch["tokens"].shape == (2, 1) and not batch["tokens_mask"].any()
    assert batch["image"].shape == (2, 3, 1, 1) and not batch["has_image"].any()
    assert batch["mel"].shape == (2, 1, 1) and not batch["mel_mask"].any()
    assert collate([sample("a")], pad_tokens_to=4)["tokens"].shape == (1, 4)


def test_pad_tokens_to_truncates_and_pads():
    batch = collate([sample("a", n_tokens=6), sample("b", n_tokens=2)], pad_id=0, pad_tokens_to=4)
    assert batch["tokens"].tolist() == [[10, 11, 12, 13], [10, 11, 0, 0]]
    assert batch["tokens_mask"].tolist() == [[True] * 4, [True, True, False, False]]


def test_normalize_images_gives_float32_imagenet_values():
    batch = collate([sample("a", image_hw=(2, 2)), sample("b")], normalize_images=True)
    assert batch["image"].dtype == torch.float32
    expected = (200 / 255 - 0.485) / 0.229
    assert torch.allclose(batch["image"][0, 0], torch.full((2, 2), expected))
    assert batch["image"][1].eq(0).all()


def augmented(config: AugmentConfig, seed: int) -> dict:
    png, _ = encoded_image("PNG", width=32, height=24)
    mel = np.random.default_rng(5).normal(size=(16, 50)).astype(np.float16)
    return decode_sample({"json": meta(), "png": png, "mel.npy": npy(mel)}, config, rng(seed))


FULL = AugmentConfig(image_crop=True, image_flip=True, mel_freq_masks=2, mel_time_masks=2)


def test_augment_is_deterministic_given_the_seed():
    a, b = augmented(FULL, 1), augmented(FULL, 1)
    assert torch.equal(a["image"], b["image"]) and np.array_equal(a["mel"], b["mel"])
    others = [augmented(FULL, seed) for seed in range(2, 6)]
    assert any(not torch.equal(a["image"], o["image"]) for o in others)
    assert any(not np.array_equal(a["mel"], o["mel"]) for o in others)


def test_crop_keeps_size_and_changes_pixels():
    plain = augmented(NO_AUGMENT, 0)["image"]
    crops = [augmented(AugmentConfig(image_crop=True, crop_scale=[0.3, 0.5]), s)["image"] for s in range(3)]
    assert all(c.shape == plain.shape == (3, 24, 32) and c.dtype == torch.uint8 for c in crops)
    assert all(not torch.equal(c, plain) for c in crops)


def test_flip_flips_horizontally():
    plain = augmented(NO_AUGMENT, 0)["image"]
    flips = [augmented(AugmentConfig(image_flip=True), s)["image"] for s in range(16)]
    assert any(torch.equal(f, plain.flip(2)) for f in flips) and any(torch.equal(f, plain) for f in flips)
    assert all(torch.equal(f, plain) or torch.equal(f, plain.flip(2)) for f in flips)


def test_spec_augment_masks_bands_with_the_minimum():
    plain = augmented(NO_AUGMENT, 0)["mel"]
    floor = plain.min()
    freq = augmented(AugmentConfig(mel_freq_masks=1, mel_freq_width=3), 0)["mel"]
    masked_rows = np.flatnonzero((freq == floor).all(axis=1))
    assert 1 <= len(masked_rows) <= 3 and np.ptp(masked_rows) == len(masked_rows) - 1  # one contiguous band
    untouched = np.setdiff1d(np.arange(16), masked_rows)
    assert np.array_equal(freq[untouched], plain[untouched])
    time = augmented(AugmentConfig(mel_time_masks=3, mel_time_width=1), 0)["mel"]
    masked_cols = np.flatnonzero((time == floor).all(axis=0))
    assert 1 <= len(masked_cols) <= 3 and (time != plain).any(axis=0).sum() == len(masked_cols)


@pytest.mark.parametrize("field, value", [("crop_scale", [0.0, 1.0]), ("crop_scale", [0.8, 0.5]),
                                          ("crop_scale", [0.5, 1.2]), ("crop_ratio", [0.0, 1.0]),
                                          ("crop_ratio", [2.0, 1.0]), ("crop_ratio", [1.0]),
                                          ("mel_freq_masks", -1), ("mel_time_masks", -2),
                                          ("mel_freq_width", 0), ("mel_time_width", 0)])
def test_augment_config_validate_names_the_field(field, value):
    AugmentConfig().validate()
    with pytest.raises(ConfigError) as info:
        AugmentConfig(**{field: value}).validate()
    assert info.value.key == field


def test_npy_members_with_lying_headers_or_odd_layouts_are_handled_safely():
    from mmdata.load.decode import _load_npy
    buf = io.BytesIO()
    np.save(buf, np.arange(100, dtype=np.int32), allow_pickle=False)
    with pytest.raises(ValueError):
        _load_npy(buf.getvalue()[:200])                       # header says 100 ints, bytes hold fewer
    fortran = io.BytesIO()
    np.save(fortran, np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3)), allow_pickle=False)
    assert _load_npy(fortran.getvalue()).tolist() == [[0, 1, 2], [3, 4, 5]]   # how mel was stored before processing version 3
    big_endian = io.BytesIO()
    np.save(big_endian, np.arange(3, dtype=">i4"), allow_pickle=False)
    assert _load_npy(big_endian.getvalue()).tolist() == [0, 1, 2]               # numpy's own reader path
