"""mmdata.prep.image: decode -> orient -> RGB -> resize -> re-encode, and its errors.

Inputs are built in memory with Pillow. Outputs are checked as PNG where
exact pixel values matter (lossless), as JPEG where only sizes do.
"""

from __future__ import annotations

import hashlib
import io
import random
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageDraw

from mmdata.config import ConfigError, validate_tree
from mmdata.prep.image import ImageConfig, _decode, encode_image
from mmdata.schema import SampleError

RED, BLUE, GREEN, WHITE = (255, 0, 0), (0, 0, 255), (0, 255, 0), (255, 255, 255)


def file_bytes(img: Image.Image, fmt: str = "PNG", **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def run(data: bytes, **config) -> tuple[Image.Image, dict]:
    """encode_image with a PNG output (lossless) unless told otherwise; returns the decoded output."""
    config = ImageConfig(**{"format": "png", **config})
    members, info = encode_image(data, config)
    out = members[config.format]
    return Image.open(io.BytesIO(out)), info


def halves(size: tuple[int, int], first, second, vertical: bool = True) -> Image.Image:
    """An RGB image split in two colours: left/right when vertical, top/bottom otherwise."""
    img = Image.new("RGB", size, second)
    w, h = size
    img.paste(first, (0, 0, w // 2, h) if vertical else (0, 0, w, h // 2))
    return img


def noise(size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def photo(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """Photo-like RGB: smooth colour ramps and filled shapes under noise, so there is detail at every
    scale. Integer arithmetic only: the same pixels on every machine (some tests pin output bytes)."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    ramps = []
    for kx, ky in rng.integers(-3, 4, (3, 2)):             # up to 1.5 periods across the image
        t = (xx * kx * 256 // w + yy * ky * 256 // h + int(rng.integers(0, 512))) % 512
        ramps.append(np.minimum(t, 511 - t))                # a triangle wave: smooth ramps, 0..255
    img = Image.fromarray(np.stack(ramps, axis=-1).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x, y, r = int(rng.integers(0, w)), int(rng.integers(0, h)), int(rng.integers(2, max(3, min(w, h) // 3)))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    pixels = np.asarray(img, dtype=np.int16) + rng.integers(-10, 11, (h, w, 3), dtype=np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def jpeg(img: Image.Image, orientation: int = 1, **params) -> bytes:
    """JPEG q90 (4:2:0), with an EXIF orientation tag unless it is 1."""
    if orientation != 1:
        exif = Image.Exif()
        exif[0x0112] = orientation
        params["exif"] = exif.tobytes()
    return file_bytes(img, "JPEG", quality=90, **params)


def psnr(a: Image.Image, b: Image.Image) -> float:
    assert a.size == b.size
    mse = np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255 ** 2 / mse))


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR says width x height (CRC fixed): it cannot actually be decoded."""
    data = bytearray(file_bytes(Image.new("1", (8, 8))))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def reason_of(data: bytes, **config) -> str:
    with pytest.raises(SampleError) as e:
        encode_image(data, ImageConfig(**config))
    return e.value.reason


# --- resize modes -----------------------------------------------------------

@pytest.mark.parametrize("size", [(640, 480), (90, 300), (50, 50), (7, 5)])
def test_shorter_side_crop_is_exactly_size_square_even_when_upscaling(size):
    out, info = run(file_bytes(noise(size)), size=64, resize="shorter_side_crop")
    assert out.size == (64, 64)
    assert (info["out_width"], info["out_height"]) == (64, 64)


@pytest.mark.parametrize("size", [(640, 480), (90, 300), (7, 5)])
def test_letterbox_is_exactly_size_square(size):
    out, _ = run(file_bytes(noise(size)), size=64, resize="letterbox")
    assert out.size == (64, 64)


def test_letterbox_fits_whole_image_and_pads_with_pad_color():
    out, _ = run(file_bytes(Image.new("RGB", (200, 100), RED)), size=64, resize="letterbox",
                 pad_color=list(BLUE))
    # 200x100 -> 64x32, centred vertically: 16 rows of padding above and below.
    assert out.getpixel((32, 0)) == BLUE and out.getpixel((32, 63)) == BLUE
    assert out.getpixel((0, 32)) == RED and out.getpixel((63, 32)) == RED


@pytest.mark.parametrize("size, expected", [
    ((400, 300), (100, 75)),
    ((300, 400), (75, 100)),
    ((301, 100), (100, 33)),     # 33.2 rounds to 33
    ((50, 20), (50, 20)),        # never upscaled
    ((100, 10), (100, 10)),      # exactly size: unchanged
])
def test_max_side_keeps_aspect_and_never_upscales(size, expected):
    out, info = run(file_bytes(noise(size)), size=100, resize="max_side")
    assert out.size == expected
    assert (info["out_width"], info["out_height"]) == expected


@pytest.mark.parametrize("size, vertical", [((400, 100), True), ((100, 400), False)])
def test_centre_crop_keeps_the_middle(size, vertical):
    # Red then blue halves: a centred crop keeps a red edge and a blue edge;
    # a crop from either end would be a single colour.
    out, _ = run(file_bytes(halves(size, RED, BLUE, vertical)), size=32, resize="shorter_side_crop")
    first, last = ((1, 16), (30, 16)) if vertical else ((16, 1), (16, 30))
    assert out.getpixel(first) == RED
    assert out.getpixel(last) == BLUE


# --- orientation and info -----------------------------------------------------

def test_exif_orientation_6_is_applied_before_sizes_are_recorded():
    stored = halves((40, 20), RED, BLUE, vertical=False)      # red top, blue bottom
    exif = Image.Exif()
    exif[0x0112] = 6                                          # "rotate 90 degrees clockwise to display"
    data = file_bytes(stored, "JPEG", exif=exif.tobytes(), quality=95)
    out, info = run(data, size=100, resize="max_side")
    assert (info["width"], info["height"]) == (20, 40)
    assert out.size == (20, 40)
    left, right = np.asarray(out)[20, 2], np.asarray(out)[20, 17]
    assert left[2] > 200 and left[0] < 60      # the old bottom (blue) is now on the left
    assert right[0] > 200 and right[2] < 60    # the old top (red) is now on the right


def test_info_describes_original_and_output():
    _, info = run(file_bytes(Image.new("RGBA", (64, 32))), size=16, resize="shorter_side_crop")
    assert info == {"width": 64, "height": 32, "mode": "RGBA", "format": "PNG",
                    "out_width": 16, "out_height": 16}


# --- mode conversion ------------------------------------------------------------

@pytest.mark.parametrize("mode, fmt", [
    ("1", "PNG"), ("L", "PNG"), ("P", "PNG"), ("LA", "PNG"), ("RGBA", "PNG"), ("I;16", "PNG"),
    ("I;16B", "TIFF"), ("I", "TIFF"), ("F", "TIFF"), ("CMYK", "JPEG"), ("YCbCr", "TIFF"), ("LAB", "TIFF"),
])
def test_every_mode_becomes_rgb(mode, fmt):
    out, info = run(file_bytes(Image.new(mode, (8, 8)), fmt), size=8)
    assert info["mode"] == mode
    assert out.mode == "RGB" and out.size == (8, 8)


def test_rgba_transparent_pixels_become_background_not_black():
    img = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    img.paste((255, 0, 0, 255), (0, 0, 5, 10))
    out, _ = run(file_bytes(img), size=10, resize="max_side")
    assert out.getpixel((1, 5)) == RED
    assert out.getpixel((8, 5)) == WHITE       # default background


def test_la_alpha_is_composited_over_configured_background():
    img = Image.new("LA", (10, 10), (0, 0))
    out, _ = run(file_bytes(img), size=10, resize="max_side", background=list(GREEN))
    assert out.getpixel((5, 5)) == GREEN


def test_palette_transparency_is_composited_over_background():
    img = Image.new("P", (10, 10), 0)
    img.putpalette([0, 0, 0, 255, 0, 0])
    img.paste(1, (0, 0, 5, 10))
    out, _ = run(file_bytes(img, transparency=0), size=10, resize="max_side", background=list(BLUE))
    assert out.getpixel((1, 5)) == RED
    assert out.getpixel((8, 5)) == BLUE


def test_cmyk_jpeg_converts_to_matching_rgb():
    cyan = Image.new("CMYK", (16, 16), (255, 0, 0, 0))
    out, _ = run(file_bytes(cyan, "JPEG", quality=95), size=16, resize="max_side")
    r, g, b = out.getpixel((8, 8))
    assert r < 20 and g > 235 and b > 235


def test_16_bit_grey_scales_to_8_bit_instead_of_clipping():
    values = np.array([[0, 25700, 65535]], dtype=np.uint16)   # 25700 = 100 * 257
    img = Image.new("I;16", (3, 1))
    img.frombytes(values.astype("<u2").tobytes())
    out, _ = run(file_bytes(img), size=3, resize="max_side")
    assert [out.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (100, 100, 100), WHITE]


def test_float_grey_is_clipped_to_0_255():
    img = Image.fromarray(np.array([[-5.0, 100.4, 300.0]], dtype=np.float32))
    out, _ = run(file_bytes(img, "TIFF"), size=3, resize="max_side")
    assert [out.getpixel((x, 0))[0] for x in range(3)] == [0, 100, 255]


def test_one_bit_image_becomes_black_and_white_rgb():
    img = Image.new("1", (10, 10), 0)
    img.paste(1, (0, 0, 5, 10))
    out, _ = run(file_bytes(img), size=10, resize="max_side")
    assert out.getpixel((1, 5)) == WHITE and out.getpixel((8, 5)) == (0, 0, 0)


def test_mode_without_rgb_conversion_is_unsupported(monkeypatch):
    # Premultiplied "La" decodes but Pillow cannot convert it; no file format
    # produces it, so Image.open is stubbed to return one.
    monkeypatch.setattr(Image, "open", lambda fp, *a, **k: Image.new("La", (8, 8)))
    assert reason_of(b"not used") == "unsupported_image"


# --- errors -------------------------------------------------------------------

def test_empty_bytes():
    assert reason_of(b"") == "empty_image"


def test_truncated_jpeg_is_corrupt():
    data = file_bytes(noise((64, 64)), "JPEG")
    assert reason_of(data[: len(data) // 2]) == "corrupt_image"


def test_garbage_is_corrupt():
    assert reason_of(random.Random(0).randbytes(2000)) == "corrupt_image"


def test_too_many_pixels_is_rejected_from_the_header_without_decoding():
    # 10000x10000 is under Pillow's own hard limit, so max_pixels decides; the
    # file holds only 8x8 pixels of data, so decoding it would say corrupt_image.
    with pytest.raises(SampleError) as e:
        encode_image(png_claiming(10_000, 10_000), ImageConfig())
    assert e.value.reason == "image_too_large"
    assert "10000x10000 = 100000000 pixels" in str(e.value) and "max_pixels=64000000" in str(e.value)


def test_header_over_pillows_bomb_limit_is_too_large():
    assert reason_of(png_claiming(30_000, 30_000), max_pixels=10**12) == "image_too_large"


def test_max_pixels_counts_the_original_size():
    assert reason_of(file_bytes(noise((100, 100))), max_pixels=9_999) == "image_too_large"
    encode_image(file_bytes(noise((100, 100))), ImageConfig(max_pixels=10_000))


def test_smaller_side_under_min_side_is_too_small():
    assert reason_of(file_bytes(noise((5, 50))), min_side=8) == "image_too_small"
    encode_image(file_bytes(noise((8, 50))), ImageConfig(min_side=8))


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "TIFF", "BMP"])
def test_damaged_files_raise_only_sample_errors(fmt):
    data = file_bytes(noise((24, 16)).convert("P") if fmt == "GIF" else noise((24, 16)), fmt)
    rng = random.Random(fmt)
    for i in range(40):
        damaged = bytearray(data[: rng.randrange(len(data))] if i % 2 else data)
        for _ in range(i % 4):
            damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        try:
            encode_image(bytes(damaged), ImageConfig(size=8))
        except SampleError as e:
            assert e.reason in ("corrupt_image", "image_too_large", "image_too_small", "unsupported_image")


# --- output encoding ----------------------------------------------------------

@pytest.mark.parametrize("fmt, pil_name", [("jpg", "JPEG"), ("webp", "WEBP"), ("png", "PNG")])
def test_each_output_format_decodes_back_at_the_right_size(fmt, pil_name):
    out = encode_image(file_bytes(noise((120, 90))), ImageConfig(size=48, format=fmt))[0][fmt]
    img = Image.open(io.BytesIO(out))
    assert img.format == pil_name and img.mode == "RGB" and img.size == (48, 48)


@pytest.mark.parametrize("fmt", ["jpg", "webp", "png"])
@pytest.mark.parametrize("resize", ["shorter_side_crop", "letterbox", "max_side"])
def test_same_input_and_config_give_identical_bytes(fmt, resize):
    data = file_bytes(noise((97, 61)), "JPEG")
    config = ImageConfig(size=40, format=fmt, resize=resize)
    assert encode_image(data, config)[0] == encode_image(data, config)[0]


def test_quality_changes_jpeg_output():
    data = file_bytes(noise((64, 64)))
    low = encode_image(data, ImageConfig(size=64, quality=10))[0]["jpg"]
    high = encode_image(data, ImageConfig(size=64, quality=95))[0]["jpg"]
    assert len(low) < len(high)


@pytest.mark.parametrize("fmt", ["jpg", "webp", "png"])
def test_input_metadata_is_not_written(fmt):
    exif = Image.Exif()
    exif[0x010F] = "SomeCamera"
    data = file_bytes(noise((32, 32)), "JPEG", exif=exif.tobytes(), icc_profile=b"fake-icc", dpi=(300, 300))
    out = Image.open(io.BytesIO(encode_image(data, ImageConfig(size=16, format=fmt))[0][fmt]))
    assert "exif" not in out.info and "icc_profile" not in out.info and len(out.getexif()) == 0


# --- fast_downscale: reduced-size decoding -------------------------------------

def fast_and_full(data: bytes, **config) -> tuple[Image.Image, Image.Image, dict, dict]:
    """The PNG outputs and infos of fast_downscale on and off."""
    fast, fast_info = run(data, fast_downscale=True, **config)
    full, full_info = run(data, fast_downscale=False, **config)
    return fast, full, fast_info, full_info


@pytest.mark.parametrize("resize", ["shorter_side_crop", "letterbox", "max_side"])
@pytest.mark.parametrize("size", [64, 100])
def test_reduced_jpeg_decoding_matches_full_decoding(resize, size):
    data = jpeg(photo((641, 479)))
    fast, full, fast_info, full_info = fast_and_full(data, size=size, resize=resize)
    assert _decode(data, ImageConfig(size=size, resize=resize)).img.width <= 321   # it did decode smaller
    assert fast.size == full.size and fast_info == full_info
    assert psnr(fast, full) >= 40


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("resize", ["shorter_side_crop", "letterbox", "max_side"])
def test_exif_orientations_match_full_decoding(orientation, resize):
    # odd sides: the draft's last, partial column and row must end up where the orientation puts them
    data = jpeg(photo((333, 221)), orientation=orientation)
    fast, full, fast_info, full_info = fast_and_full(data, size=50, resize=resize)
    assert fast.size == full.size and fast_info == full_info
    assert (fast_info["width"], fast_info["height"]) == ((221, 333) if orientation >= 5 else (333, 221))
    assert psnr(fast, full) >= 40


@pytest.mark.parametrize("orientation", [6, 8])
def test_rotated_jpeg_decoded_reduced_comes_out_upright(orientation):
    stored = halves((400, 200), RED, BLUE, vertical=False)    # red top, blue bottom
    assert _decode(jpeg(stored, orientation), ImageConfig(size=40, resize="max_side")).img.size == (50, 100)
    fast, full, info, _ = fast_and_full(jpeg(stored, orientation), size=40, resize="max_side")
    assert fast.size == full.size == (20, 40) and (info["width"], info["height"]) == (200, 400)
    left, right = np.asarray(fast)[20, 2], np.asarray(fast)[20, 17]
    # 6 turns clockwise: the old bottom (blue) on the left; 8 counter-clockwise: on the right
    blue, red = (left, right) if orientation == 6 else (right, left)
    assert blue[2] > 200 and blue[0] < 60 and red[0] > 200 and red[2] < 60


@pytest.mark.parametrize("mode", ["L", "CMYK"])
def test_greyscale_and_cmyk_jpegs_decode_reduced_in_their_own_mode(mode):
    data = jpeg(photo((320, 240)).convert(mode))
    decoded = _decode(data, ImageConfig(size=40))
    assert decoded.img.mode == mode and decoded.img.size == (80, 60)   # scale 1/4, mode kept
    fast, full, fast_info, _ = fast_and_full(data, size=40)
    assert fast.mode == "RGB" and fast_info["mode"] == mode and psnr(fast, full) >= 40
    if mode == "L":
        r, g, b = np.asarray(fast).transpose(2, 0, 1)
        assert (r == g).all() and (g == b).all()


def test_progressive_jpeg_decodes_reduced():
    data = jpeg(photo((320, 240)), progressive=True)
    assert _decode(data, ImageConfig(size=40)).img.size == (80, 60)
    fast, full, _, _ = fast_and_full(data, size=40)
    assert psnr(fast, full) >= 40


def test_mpo_decodes_reduced():
    buf = io.BytesIO()
    photo((320, 240)).save(buf, "MPO", save_all=True, append_images=[photo((320, 240), seed=1)], quality=90)
    decoded = _decode(buf.getvalue(), ImageConfig(size=40))
    assert decoded.format == "MPO" and decoded.img.size == (80, 60)
    fast, full, _, _ = fast_and_full(buf.getvalue(), size=40)
    assert psnr(fast, full) >= 40


@pytest.mark.parametrize("resize, size, decoded", [
    # shorter_side_crop: the largest of 1/8, 1/4, 1/2 leaving the shorter side >= 1.5 x 64 = 96
    # (sides round up), so the scale changes at 3x, 6x and 12x the output side
    ("shorter_side_crop", (192, 250), (96, 125)),     # 3x: half size
    ("shorter_side_crop", (191, 250), (191, 250)),    # 3x - 1: full size
    ("shorter_side_crop", (384, 500), (96, 125)),     # 6x: a quarter
    ("shorter_side_crop", (500, 383), (250, 192)),    # 6x - 1: half
    ("shorter_side_crop", (770, 768), (97, 96)),      # 12x: an eighth, the smallest scale
    ("shorter_side_crop", (1000, 767), (250, 192)),   # 12x - 1: a quarter
    # letterbox and max_side: the longer side >= 96
    ("letterbox", (192, 60), (96, 30)),
    ("letterbox", (60, 191), (60, 191)),
    ("max_side", (100, 768), (13, 96)),
    ("max_side", (100, 767), (25, 192)),
])
def test_dct_scale_is_the_smallest_covering_one_and_a_half_times_the_output(resize, size, decoded):
    data = jpeg(photo(size))
    assert _decode(data, ImageConfig(size=64, resize=resize)).img.size == decoded
    fast, full, fast_info, full_info = fast_and_full(data, size=64, resize=resize)
    assert fast.size == full.size and fast_info == full_info
    assert psnr(fast, full) >= 40     # inf where nothing was reduced


@pytest.mark.parametrize("resize, size", [
    ("shorter_side_crop", (12, 9)),       # tiny: upscaled
    ("shorter_side_crop", (150, 100)),    # over the output, under 3x it
    ("letterbox", (120, 150)),
    ("max_side", (63, 40)),               # under size: kept as it is
])
def test_small_jpegs_are_decoded_at_full_size_giving_the_same_bytes(resize, size):
    data = jpeg(photo(size))
    assert _decode(data, ImageConfig(size=64, resize=resize)).img.size == size
    fast, full, _, _ = fast_and_full(data, size=64, resize=resize)
    assert fast.tobytes() == full.tobytes()


def test_dct_scale_keeps_a_row_for_very_thin_images():
    data = jpeg(photo((900, 3)))     # longer side 14x the output, but 1/8 or 1/4 would leave under a row
    assert _decode(data, ImageConfig(size=64, resize="max_side")).img.size == (450, 2)
    fast, full, fast_info, full_info = fast_and_full(data, size=64, resize="max_side")
    assert fast.size == full.size == (64, 1) and fast_info == full_info


def test_info_keeps_the_original_size():
    data = jpeg(photo((400, 300)), orientation=6)
    assert _decode(data, ImageConfig(size=32)).img.size == (75, 100)   # a quarter, rotated
    _, info = run(data, size=32)
    assert info == {"width": 300, "height": 400, "mode": "RGB", "format": "JPEG", "out_width": 32, "out_height": 32}


def test_size_guards_use_the_full_header_size_before_reduced_decoding():
    data = jpeg(photo((400, 300)))
    with pytest.raises(SampleError) as e:
        encode_image(data, ImageConfig(size=32, max_pixels=119_999))
    assert e.value.reason == "image_too_large" and "400x300 = 120000 pixels" in str(e.value)
    encode_image(data, ImageConfig(size=32, max_pixels=120_000))
    # decoded at 1/4 the smaller side is 75; min_side still sees 300
    encode_image(data, ImageConfig(size=32, min_side=300))
    assert reason_of(data, size=32, min_side=301) == "image_too_small"


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_other_formats_box_reduce_first_when_shrinking_3x_or_more(fmt):
    data = file_bytes(photo((400, 300)), fmt)
    fast, full, fast_info, full_info = fast_and_full(data, size=64)     # 4.7x: reduced by 3 first
    assert fast.size == full.size and fast_info == full_info
    assert fast.tobytes() != full.tobytes() and psnr(fast, full) >= 40
    fast, full, _, _ = fast_and_full(data, size=101)                    # under 3x: one bicubic, as before
    assert fast.tobytes() == full.tobytes()


# sha256[:16] of encode_image's jpg output with fast_downscale off, recorded from mm before
# fast_downscale existed (processing version 4): switching it off must give those bytes exactly.
# Like tests/test_golden.py, they hold for the Pillow that pip resolves (its libjpeg encodes them).
TODAYS_BYTES = [
    ("jpeg, orientation 6", "shorter_side_crop", "912d61c4200e450f"),
    ("jpeg, orientation 6", "letterbox", "93abbb568a469855"),
    ("jpeg, orientation 6", "max_side", "ce1c585dadf36c03"),
    ("cmyk jpeg", "shorter_side_crop", "8a05003f880515a4"),
    ("png", "letterbox", "76b8363e60e9beae"),
]


@pytest.mark.parametrize("what, resize, digest", TODAYS_BYTES)
def test_fast_downscale_off_gives_the_bytes_of_full_decoding(what, resize, digest):
    img = photo((333, 221))
    data = {"jpeg, orientation 6": lambda: jpeg(img, orientation=6), "cmyk jpeg": lambda: jpeg(img.convert("CMYK")),
            "png": lambda: file_bytes(img)}[what]()
    off = encode_image(data, ImageConfig(size=48, resize=resize, fast_downscale=False))[0]["jpg"]
    assert hashlib.sha256(off).hexdigest()[:16] == digest
    assert encode_image(data, ImageConfig(size=48, resize=resize))[0]["jpg"] != off


def test_fast_downscale_is_part_of_the_fingerprint(tmp_path):
    from mmdata.config import load_config
    from mmdata.prep.config import PreprocessConfig
    from mmdata.prep.pipeline import job_salt
    salts = {job_salt(load_config(PreprocessConfig, None, [f"input.manifest={tmp_path}/m.jsonl",
                                                          f"image.fast_downscale={on}"]), b"tok", None)
             for on in ("true", "false")}
    assert len(salts) == 2


# --- config -------------------------------------------------------------------

def test_defaults_validate():
    validate_tree(ImageConfig())


@pytest.mark.parametrize("key, value", [
    ("size", 0), ("resize", "stretch"), ("format", "gif"), ("quality", 0), ("quality", 101),
    ("background", [255, 255]), ("background", [0, 0, 256]), ("pad_color", [0, -1, 0]),
    ("pad_color", [0.5, 0, 0]), ("max_pixels", 0), ("min_side", 0), ("on_error", "ignore"),
    ("fast_downscale", "yes"), ("fast_downscale", 1),
])
def test_validate_rejects_impossible_values_naming_the_field(key, value):
    with pytest.raises(ConfigError) as e:
        validate_tree(ImageConfig(**{key: value}))
    assert e.value.key == key
    assert repr(value) in str(e.value) or str(value) in str(e.value)
