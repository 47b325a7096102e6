"""Image: decode, orient, flatten to RGB, resize, re-encode as ``.jpg|.webp|.png``.

Data flow of :func:`encode_image`::

    bytes -> open (header only: size guards) -> [JPEG: draft, a reduced-size decode]
          -> load pixels -> EXIF orientation -> _to_rgb (one rule per PIL mode)
          -> _resize (config.resize) -> _save (fixed encoder parameters, no metadata) -> bytes

Every failure is a :class:`SampleError` with a stable reason, so the caller
can count it and apply ``config.on_error``. The size guard reads only the
header, so a decompression bomb is rejected before its pixels are allocated.
With ``config.fast_downscale`` (the default) a large JPEG is decoded at 1/2,
1/4 or 1/8 scale (libjpeg's DCT scaling: the smallest scale still covering
1.5x the output) and any other input the bicubic shrinks 3x or more is first
box-reduced by an integer factor; the output's size and framing are computed
from the full size either way, so only pixel values differ from a full-size
decode (PSNR above 40 dB; see docs/performance.md).
Output bytes depend only on the input bytes and the config: encoders run
with fixed parameters and nothing from the input's metadata (EXIF, ICC, DPI,
text chunks) is written. ICC profiles are dropped, not applied: pixels are
taken as sRGB, as most training pipelines do.
"""

from __future__ import annotations

import functools
import io
import struct
import warnings
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from mmdata.config import require, require_choice
from mmdata.schema import IMAGE_EXTS, SampleError

RESIZE_MODES = ("shorter_side_crop", "letterbox", "max_side")
# Limits on settings whose memory cost per image has no bound otherwise: a decoded input of MAX_PIXELS is
# about 1 GB as RGBA, an output side of MAX_SIZE about 200 MB as RGB.
MAX_SIZE = 8192
MAX_PIXELS = 256_000_000
MAX_INPUT_BYTES = 1 << 30
# Raster formats only: Pillow's EPS/PS plugins hand the file to Ghostscript, and
# decoding input must never run an interpreter on it. (Multi-picture JPEGs, MPO,
# open through the JPEG plugin.)
INPUT_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "PPM", "ICO")

# What Pillow's decoders raise on truncated or malformed input. Fuzzing
# Pillow shows more than OSError/SyntaxError/ValueError (EOFError from short
# reads, struct.error and IndexError from bad headers), and one bad file must
# never take down a worker, so all of these mean "corrupt".
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, KeyError,
                  TypeError, ZeroDivisionError)

# Modes whose alpha is composited over ``config.background``. P/L/RGB images
# carrying a ``transparency`` entry (GIF, PNG tRNS) take the same path.
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "PA")

_RESAMPLE = Image.Resampling.BICUBIC

# fast_downscale: formats whose decoder can scale while decoding (Pillow's draft(): libjpeg's DCT
# scaling; MPO opens through the JPEG plugin) and the scales it offers, largest first.
_DRAFT_FORMATS = ("JPEG", "MPO")
_DRAFT_SCALES = (8, 4, 2)
# What fast_downscale leaves the bicubic to shrink, at least. A JPEG is decoded at the smallest scale
# still covering 1.5x the output side; other inputs go through Image.resize's reducing_gap (where the
# bicubic would shrink 3x or more, Image.reduce first averages integer-factor boxes). With less left,
# the bicubic barely filters: a draft decoded to exactly the output side measured 34 dB from a
# full-size decode on noisy photos; with 1.5x left, over 40 dB.
_REDUCING_GAP = 1.5
# EXIF orientation -> (sides swapped, displayed x reversed, displayed y reversed): how
# ImageOps.exif_transpose moves a draft's partial last column and row (see _area)
_ORIENTATIONS = {2: (False, True, False), 3: (False, True, True), 4: (False, False, True),
                 5: (True, False, False), 6: (True, True, False), 7: (True, True, True),
                 8: (True, False, True)}

# config.format -> (Pillow format name, fixed encoder parameters). JPEG uses
# 4:2:0 chroma subsampling (subsampling=2): the common choice for photos, a
# third smaller than 4:4:4 and what most image datasets already contain.
_ENCODERS = {
    "jpg": ("JPEG", {"subsampling": 2, "optimize": False, "progressive": False}),
    "webp": ("WEBP", {"method": 4, "lossless": False}),
    "png": ("PNG", {"compress_level": 6, "optimize": False}),
}


@dataclass
class ImageConfig:
    size: int = 224                     # target side in px
    # shorter_side_crop: shorter side -> size, centre crop to size x size (upscales small images)
    # letterbox: fit inside size x size, pad to a square with pad_color (upscales small images)
    # max_side: keep aspect, longer side -> size; never upscales (small images keep their size)
    resize: str = "shorter_side_crop"
    format: str = "jpg"                 # jpg | webp | png
    quality: int = 90                   # 1..100, for jpg and webp
    background: list[int] = field(default_factory=lambda: [255, 255, 255])  # RGB under transparent pixels
    pad_color: list[int] = field(default_factory=lambda: [0, 0, 0])        # RGB of letterbox padding
    max_pixels: int = 64_000_000        # guard on the original width*height, read from the header
    max_bytes: int = 64 << 20           # input files larger than this are not read: file_too_large
    min_side: int = 1                   # images whose smaller side is below this are too small
    # true: a JPEG is decoded at 1/2, 1/4 or 1/8 scale when that still covers 1.5x the output, other
    # inputs shrunk 3x or more are box-reduced by an integer factor first; then the same bicubic resize.
    # About 2x faster on large photos, PSNR over 40 dB against false (full-size decode, one bicubic resize)
    fast_downscale: bool = True
    on_error: str = "drop_modality"     # drop_modality | reject_sample (applied by the caller)

    def validate(self) -> None:
        require(0 < self.size <= MAX_SIZE, "size", f"must be between 1 and {MAX_SIZE} pixels (every output image "
                f"is held in memory at full size); got {self.size}")
        require(0 < self.max_bytes <= MAX_INPUT_BYTES, "max_bytes",
                f"must be between 1 and {MAX_INPUT_BYTES} bytes; got {self.max_bytes}")
        require_choice(self.resize, "resize", RESIZE_MODES)
        require_choice(self.format, "format", IMAGE_EXTS)
        require(1 <= self.quality <= 100, "quality", f"must be between 1 and 100; got {self.quality}")
        _require_rgb(self.background, "background")
        _require_rgb(self.pad_color, "pad_color")
        require(0 < self.max_pixels <= MAX_PIXELS, "max_pixels",
                f"must be between 1 and {MAX_PIXELS} (decoded pixels are held in memory); got {self.max_pixels}")
        require(self.min_side >= 1, "min_side", f"must be at least 1; got {self.min_side}")
        require(isinstance(self.fast_downscale, bool), "fast_downscale",
                f"must be true or false; got {self.fast_downscale!r}")
        require_choice(self.on_error, "on_error", ("drop_modality", "reject_sample"))


def _require_rgb(value: object, key: str) -> None:
    ok = (isinstance(value, (list, tuple)) and len(value) == 3
          and all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in value))
    require(ok, key, f"must be 3 integers 0..255 (an RGB colour); got {value!r}")


def encode_image(data: bytes, config: ImageConfig) -> tuple[dict[str, bytes], dict]:
    """Decode, orient, convert to RGB, resize, re-encode. Returns members ``{<format>: encoded}`` and info.

    ``info`` describes the input as it would be displayed (size after EXIF
    orientation; Pillow's mode and format names) plus the output size, so
    summaries can report what the dataset was made from.
    """
    if len(data) == 0:
        raise SampleError("empty_image", "image is empty (0 bytes); expected an encoded image file")
    decoded = _decode(data, config)
    rgb = _to_rgb(decoded.img, config.background)
    out = _resize(rgb, config, decoded.size, decoded.area)
    info = {"width": decoded.size[0], "height": decoded.size[1], "mode": decoded.mode, "format": decoded.format,
            "out_width": out.width, "out_height": out.height}
    return {config.format: _save(out, config)}, info


class _Decoded(NamedTuple):
    img: Image.Image                           # oriented pixels: full size, or a draft's reduced size
    mode: str                                  # the input's Pillow mode and format name, for info
    format: str | None
    size: tuple[int, int]                      # the input's full size as displayed (after EXIF orientation)
    area: tuple[float, float, float, float]    # where that full image lies in img: (0, 0, *size) unless drafted


def _decode(data: bytes, config: ImageConfig) -> _Decoded:
    """Open, check the size from the header, then load pixels (a JPEG at reduced size when
    ``config.fast_downscale`` allows) and apply EXIF orientation."""
    try:
        # Our own max_pixels is the guard, so Pillow's bomb *warning* is noise
        # here; its hard error (over 2 * Image.MAX_IMAGE_PIXELS) still fires
        # and is reported as image_too_large. No Pillow global is changed.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=input_formats()) as img:
                mode, fmt, stored = img.mode, img.format, img.size
                _check_size(img.width, img.height, config)   # before load() and draft(): the header's full size
                scale = _draft(img, config) if config.fast_downscale and fmt in _DRAFT_FORMATS else 1
                # read before exif_transpose, which deletes it; the same lookup it makes
                orientation = img.getexif().get(ExifTags.Base.Orientation, 1) if scale > 1 else 1
                img.load()   # truncated data raises here: ImageFile.LOAD_TRUNCATED_IMAGES stays off
                ImageOps.exif_transpose(img, in_place=True)
                if scale == 1:
                    return _Decoded(img, mode, fmt, img.size, (0, 0, *img.size))
                size, area = _area(stored, img.size, scale, orientation)
                return _Decoded(img, mode, fmt, size, area)
    except UnidentifiedImageError:
        raise SampleError("corrupt_image", f"not an image in a supported format ({', '.join(input_formats())}), "
                          "or damaged beyond recognition") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise SampleError("image_too_large", f"image fails Pillow's decompression-bomb check ({e}); "
                          f"expected at most image.max_pixels={config.max_pixels} pixels") from None
    except _DECODE_ERRORS as e:
        raise SampleError("corrupt_image", f"image could not be decoded ({type(e).__name__}: {e}); "
                          "expected a complete file in a format Pillow reads") from None


def _draft(img: Image.Image, config: ImageConfig) -> int:
    """Ask the JPEG decoder for the largest DCT scale (8, 4, 2) whose output still covers
    _REDUCING_GAP x what :func:`_resize` needs; returns the scale taken (1: none, full size).

    shorter_side_crop resizes the shorter side to ``config.size``; letterbox and max_side the
    longer side (max_side never upscales, so an image under ``size`` is never reduced). Sides are
    lengths, so the stored orientation gives the same answer as the displayed one. The thinner
    side is kept at least a pixel. ``draft`` keeps the file's mode (L, RGB, CMYK): _to_rgb
    converts it exactly as for a full-size decode.
    """
    w, h = img.size
    need = min(w, h) if config.resize == "shorter_side_crop" else max(w, h)
    scale = next((s for s in _DRAFT_SCALES if need >= s * config.size * _REDUCING_GAP and min(w, h) >= s), 1)
    if scale == 1:
        return 1
    # Pillow takes the largest scale <= min(w // request_w, h // request_h); with these requests
    # that is exactly `scale`. It answers with where the full image lies in the reduced one.
    drafted = img.draft(None, (w // scale, h // scale))
    return 1 if drafted is None else round(w / drafted[1][2])


def _area(stored: tuple[int, int], oriented: tuple[int, int], scale: int,
          orientation: int) -> tuple[tuple[int, int], tuple[float, float, float, float]]:
    """The full image's displayed size, and where it lies in a draft decoded at 1/``scale``.

    A draft is ceil(side / scale) pixels wide: its last column (row) is partly outside the image.
    Where EXIF orientation reverses a displayed axis, that partial pixel comes first, so the
    image starts a fraction of a pixel in.
    """
    swap, reverse_x, reverse_y = _ORIENTATIONS.get(orientation, (False, False, False))
    w, h = (stored[1], stored[0]) if swap else stored
    x0 = oriented[0] - w / scale if reverse_x else 0.0
    y0 = oriented[1] - h / scale if reverse_y else 0.0
    return (w, h), (x0, y0, x0 + w / scale, y0 + h / scale)


@functools.lru_cache(maxsize=1)
def input_formats() -> tuple[str, ...]:
    """INPUT_FORMATS that this Pillow can open (an unknown name makes Image.open raise KeyError)."""
    Image.init()
    return tuple(f for f in INPUT_FORMATS if f in Image.OPEN)


def _check_size(width: int, height: int, config: ImageConfig) -> None:
    pixels = width * height
    if pixels > config.max_pixels:
        raise SampleError("image_too_large", f"image is {width}x{height} = {pixels} pixels, "
                          f"over image.max_pixels={config.max_pixels}")
    if min(width, height) < config.min_side:
        raise SampleError("image_too_small", f"image is {width}x{height}, its smaller side is under "
                          f"image.min_side={config.min_side}")


def _to_rgb(img: Image.Image, background: list[int]) -> Image.Image:
    """One RGB image from any mode, by the rules below; unsupported_image otherwise.

    - I;16* (16-bit grey): value / 257, rounded; I (32-bit grey): see :func:`_grey_to_8bit`
    - F (float grey): clipped to 0..255 and rounded
      (a ``transparency`` entry on these rare deep-grey PNGs/TIFFs is ignored)
    - alpha (RGBA, LA, PA, RGBa, or a ``transparency`` entry): composited over ``background``
    - 1, L, P, CMYK, YCbCr, LAB, HSV, RGBX: Pillow's ``convert("RGB")``
      (Pillow undoes the inversion of Adobe CMYK JPEGs when decoding)
    """
    try:
        if img.mode.startswith("I"):
            return _grey_to_8bit(img).convert("RGB")
        if img.mode == "F":
            return _float_to_8bit(img).convert("RGB")
        if img.mode in _ALPHA_MODES or "transparency" in img.info:
            return _flatten_alpha(img, background)
        return img if img.mode == "RGB" else img.convert("RGB")
    except ValueError as e:
        raise SampleError("unsupported_image", f"image mode {img.mode!r} cannot be converted to RGB ({e}); "
                          "expected 1, L, P, RGB(A), LA, PA, CMYK, YCbCr, LAB, HSV, I, I;16 or F") from None


def _flatten_alpha(img: Image.Image, background: list[int]) -> Image.Image:
    """Composite over a solid colour: transparent pixels become ``background``, not black."""
    rgba = img.convert("RGBA")
    base = Image.new("RGBA", rgba.size, (*background, 255))
    return Image.alpha_composite(base, rgba).convert("RGB")


def _grey_to_8bit(img: Image.Image) -> Image.Image:
    """Deep greyscale to L, scaling the image's bit range to 0..255 with rounding.

    I;16 modes are 16-bit by definition (65535 -> 255, i.e. value / 257).
    Mode I is a 32-bit container, so its range is the smallest of 8, 16 or
    31 bits (int32's positive half) that holds the image's maximum; negative
    values clip to 0. Pillow's own I -> L conversion clips instead of
    scaling, which turns 16-bit images white.
    """
    values = np.asarray(img).astype(np.int64)
    if img.mode.startswith("I;16"):
        top = 65535
    else:
        peak = int(values.max(initial=0))
        top = 255 if peak <= 255 else 65535 if peak <= 65535 else 2**31 - 1
    scaled = (np.clip(values, 0, top) * 255 + top // 2) // top   # integer round-half-up
    return Image.fromarray(scaled.astype(np.uint8))


def _float_to_8bit(img: Image.Image) -> Image.Image:
    """F images are taken to be on a 0..255 scale: clip and round (NaN -> 0)."""
    values = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
    return Image.fromarray(np.rint(np.clip(values, 0, 255)).astype(np.uint8))


def _resize(img: Image.Image, config: ImageConfig, size: tuple[int, int],
            area: tuple[float, float, float, float]) -> Image.Image:
    """Apply ``config.resize``; see :class:`ImageConfig` for what each mode means.

    Output size and framing come from the full ``size``; ``area`` is where that full image lies
    in ``img`` (all of it, unless a draft decoded it smaller), so a reduced decode changes pixel
    values only. fast_downscale also lets Pillow box-reduce first (``reducing_gap``).
    """
    (w, h), side = size, config.size
    gap = _REDUCING_GAP if config.fast_downscale else None
    if config.resize == "shorter_side_crop":
        # Resampling straight from the centred square box crops and resizes
        # in one pass, without first resizing the parts that get cut away.
        s = min(w, h)
        box = ((w - s) / 2, (h - s) / 2, (w + s) / 2, (h + s) / 2)
        return img.resize((side, side), _RESAMPLE, box=_within(box, size, area), reducing_gap=gap)
    if config.resize == "letterbox":
        inner = img.resize(_scaled(w, h, side / max(w, h)), _RESAMPLE, box=area, reducing_gap=gap)
        canvas = Image.new("RGB", (side, side), tuple(config.pad_color))
        canvas.paste(inner, ((side - inner.width) // 2, (side - inner.height) // 2))
        return canvas
    if max(w, h) <= side:   # max_side never upscales: small images keep their pixels (never drafted)
        return img
    return img.resize(_scaled(w, h, side / max(w, h)), _RESAMPLE, box=area, reducing_gap=gap)


def _within(box: tuple[float, float, float, float], size: tuple[int, int],
            area: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
    """``box`` in full-size coordinates -> the same region of the image ``area`` lies in (exact when
    ``area`` is the full size: x * 1.0 + 0)."""
    sx, sy = (area[2] - area[0]) / size[0], (area[3] - area[1]) / size[1]
    return (area[0] + box[0] * sx, area[1] + box[1] * sy, area[0] + box[2] * sx, area[1] + box[3] * sy)


def _scaled(w: int, h: int, scale: float) -> tuple[int, int]:
    return max(1, round(w * scale)), max(1, round(h * scale))


def _save(img: Image.Image, config: ImageConfig) -> bytes:
    """Encode with fixed parameters; an empty ``info`` keeps input metadata out of the file."""
    img.info = {}   # some Pillow plugins copy EXIF/ICC/DPI from info when saving
    name, params = _ENCODERS[config.format]
    if config.format in ("jpg", "webp"):
        params = {**params, "quality": config.quality}
    buf = io.BytesIO()
    img.save(buf, name, **params)
    return buf.getvalue()
