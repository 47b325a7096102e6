"""A deterministic, learnable multimodal demo dataset: files plus a manifest.

Data flow for sample ``i`` (all randomness from seeded per-sample RNGs, so
sample ``i`` is the same whatever ``n`` is)::

    draw_attributes(seed, i) -> shape (the label), colour, size, position
      |-- render_image   -> images/<file>.jpg|png   shape drawn in its colour/size/position
      |-- make_caption   -> manifest "text"         templates + synonyms + word order
      |-- synthesize_audio -> audio/<file>.wav|flac pitch = colour, beep rate = shape,
      |                                             loudness = size, stereo pan = position
      `-- missing modality (probability missing_rate, never more than one)
    write_manifest(rows) -> manifest.jsonl|csv|parquet, written last and atomically

Because every modality encodes the same latent attributes, a fusion model
can learn the label from any one of them and align them with each other.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image, ImageDraw

from mmdata.schema import make_key
from mmdata.storage import temp_path

CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon", "cross")

# colour -> (RGB, tone frequency in Hz). Frequencies are a musical fifth apart
# (ratio 1.5), far wider than the per-sample jitter, and all below the 4 kHz
# Nyquist limit of the lowest sample rate.
COLOURS: dict[str, tuple[tuple[int, int, int], float]] = {
    "red": ((220, 40, 40), 220.0),
    "orange": ((245, 140, 20), 330.0),
    "yellow": ((240, 220, 40), 495.0),
    "green": ((40, 170, 60), 742.5),
    "blue": ((40, 90, 220), 1113.75),
    "purple": ((140, 60, 190), 1670.625),
}
# shape -> beeps per second of the on/off envelope (the rhythm)
BEEPS_PER_SECOND: dict[str, float] = {
    "circle": 2.0, "square": 3.0, "triangle": 4.0, "star": 5.0, "hexagon": 6.0, "cross": 8.0,
}
SIZES = ("small", "medium", "large")
POSITIONS = ("left", "right", "top", "bottom", "centre")
SAMPLE_RATES = (8000, 16000, 22050, 44100, 48000)
MANIFEST_FORMATS = ("jsonl", "csv", "parquet")
MANIFEST_COLUMNS = ("id", "text", "image", "audio", "label", "colour", "size", "position")

MIN_SIDE, MAX_SIDE = 48, 640
MIN_SECONDS, MAX_SECONDS = 0.5, 4.0
_RADIUS = {"small": 0.12, "medium": 0.2, "large": 0.28}   # fraction of the shorter image side
_MIN_RADIUS = 8.0  # pixels: below this a hexagon and a circle look the same
_LOUDNESS = {"small": 0.3, "medium": 0.5, "large": 0.8}   # peak tone amplitude
_CENTRE = {"left": (0.3, 0.5), "right": (0.7, 0.5), "top": (0.5, 0.3),
           "bottom": (0.5, 0.7), "centre": (0.5, 0.5)}
_PAN = {"left": (1.0, 0.35), "right": (0.35, 1.0)}         # (left gain, right gain); others centred
_UNUSUAL_EVERY, _UNUSUAL_OFFSET = 25, 7

_SHAPE_WORDS = {
    "circle": ("circle", "disc", "round blob"),
    "square": ("square", "box", "block"),
    "triangle": ("triangle", "three-sided shape", "wedge"),
    "star": ("star", "five-pointed star"),
    "hexagon": ("hexagon", "six-sided shape"),
    "cross": ("cross", "plus sign", "plus"),
}
_COLOUR_WORDS = {
    "red": ("red", "crimson", "scarlet"), "orange": ("orange", "amber"),
    "yellow": ("yellow", "golden"), "green": ("green", "emerald"),
    "blue": ("blue", "azure", "cobalt"), "purple": ("purple", "violet"),
}
_SIZE_WORDS = {"small": ("small", "tiny", "little"),
               "medium": ("medium-sized", "mid-sized", "medium"),
               "large": ("large", "big", "huge")}
_POSITION_WORDS = {
    "left": ("on the left", "to the left", "at the left side"),
    "right": ("on the right", "to the right", "at the right side"),
    "top": ("at the top", "near the top", "up top"),
    "bottom": ("at the bottom", "near the bottom", "down below"),
    "centre": ("in the centre", "in the middle", "at the center"),
}
# The last two templates leave out the colour or the shape: real captions are
# not always complete, and the other modalities still carry the information.
_TEMPLATES = (
    "a {size} {colour} {shape} {position}",
    "{position} there is a {size} {colour} {shape}",
    "{colour} {shape}, {size}, {position}",
    "the {shape} {position} is {colour}",
    "a {colour} {shape}",
    "you can see a {size} {shape} {position}; it is {colour}",
    "{size} and {colour}: a {shape} {position}",
    "picture of a {colour} {shape} {position}",
    "a {size} {shape} {position}",
    "something {colour} {position}",
)


@dataclass(frozen=True)
class Attributes:
    """The latent description of one sample that every modality encodes."""
    shape: str
    colour: str
    size: str
    position: str


def sample_id(i: int) -> str:
    """``demo-000042``; every 25th id is awkward on purpose, to exercise key sanitisation."""
    if i % _UNUSUAL_EVERY != _UNUSUAL_OFFSET:
        return f"demo-{i:06d}"
    styles = (f"démo/{i:06d}.ünï code", f"demo.{i:06d}.v2", f"demo {i:06d} copy", f"demo/{i:06d}")
    return styles[(i // _UNUSUAL_EVERY) % len(styles)]


def sample_rng(seed: int, i: int, stream: int | None = None) -> np.random.Generator:
    """Per-sample (and per-modality) RNG: sample i never depends on n or on other modalities."""
    return np.random.default_rng([seed, i] if stream is None else [seed, i, stream])


def draw_attributes(seed: int, i: int) -> Attributes:
    rng = sample_rng(seed, i)
    return Attributes(shape=CLASSES[rng.integers(len(CLASSES))],
                      colour=tuple(COLOURS)[rng.integers(len(COLOURS))],
                      size=SIZES[rng.integers(len(SIZES))],
                      position=POSITIONS[rng.integers(len(POSITIONS))])


def draw_missing(seed: int, i: int, missing_rate: float) -> str | None:
    """The one modality this sample lacks, or None. Both draws always happen, keeping streams fixed."""
    rng = sample_rng(seed, i, 4)
    u, which = rng.random(), rng.integers(3)
    return ("text", "image", "audio")[which] if u < missing_rate else None


# --- image -----------------------------------------------------------------

def shape_points(shape: str, cx: float, cy: float, r: float, rotation: float) -> list[tuple[float, float]]:
    """Polygon vertices of a shape with circumradius r (circles use many vertices)."""
    if shape == "star":
        radii, count = [r, 0.45 * r] * 5, 10
    elif shape == "cross":
        w = 0.33  # half the arm width, as a fraction of r
        corners = [(w, 1), (w, w), (1, w), (1, -w), (w, -w), (w, -1),
                   (-w, -1), (-w, -w), (-1, -w), (-1, w), (-w, w), (-w, 1)]
        polar = [(math.hypot(x, y) * r, math.atan2(y, x)) for x, y in corners]
        return [(cx + d * math.cos(a + rotation), cy + d * math.sin(a + rotation)) for d, a in polar]
    else:
        count = {"circle": 64, "square": 4, "triangle": 3, "hexagon": 6}[shape]
        radii = [r] * count
    return [(cx + radii[k] * math.cos(rotation + 2 * math.pi * k / count),
             cy + radii[k] * math.sin(rotation + 2 * math.pi * k / count)) for k in range(count)]


def background_colour(rgb: tuple[int, int, int], rng: np.random.Generator) -> tuple[int, int, int]:
    """A light or dark background, flipped when it would hide the shape (yellow on white)."""
    light = bool(rng.random() < 0.5)
    base = rng.integers(195, 250, size=3) if light else rng.integers(10, 60, size=3)
    luma = lambda c: 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]  # noqa: E731
    if abs(luma(base) - luma(rgb)) < 50:
        base = 255 - base
    return tuple(int(v) for v in base)


def canvas_size(rng: np.random.Generator) -> tuple[int, int]:
    """Width and height in 48..640, at most 2:1, so a resized image keeps a recognisable shape."""
    width = int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
    height = int(rng.integers(max(MIN_SIDE, (width + 1) // 2), min(MAX_SIDE, 2 * width) + 1))
    return (width, height) if rng.random() < 0.5 else (height, width)


def render_image(attrs: Attributes, rng: np.random.Generator) -> Image.Image:
    """The shape in its colour, size and position on a canvas of random size and background."""
    width, height = canvas_size(rng)
    base_rgb, _ = COLOURS[attrs.colour]
    rgb = tuple(int(np.clip(c + rng.integers(-15, 16), 0, 255)) for c in base_rgb)
    image = Image.new("RGB", (width, height), background_colour(rgb, rng))
    fx, fy = _CENTRE[attrs.position]
    jitter = rng.uniform(-0.04, 0.04, size=2)
    r = max(_MIN_RADIUS, _RADIUS[attrs.size] * min(width, height) * rng.uniform(0.9, 1.1))
    points = shape_points(attrs.shape, (fx + jitter[0]) * width, (fy + jitter[1]) * height,
                          r, rng.uniform(0, 2 * math.pi))
    ImageDraw.Draw(image).polygon(points, fill=rgb)
    return image


def encode_image(image: Image.Image, ext: str) -> bytes:
    """Fixed encoder settings, no metadata: the bytes depend only on the pixels."""
    buf = io.BytesIO()
    if ext == "jpg":
        image.save(buf, format="JPEG", quality=90)
    else:
        image.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


# --- text ------------------------------------------------------------------

def make_caption(attrs: Attributes, rng: np.random.Generator) -> str:
    """A caption from a template, with synonyms, varied order, case and punctuation."""
    pick = lambda words: words[rng.integers(len(words))]  # noqa: E731
    template = _TEMPLATES[rng.integers(len(_TEMPLATES))]
    text = template.format(shape=pick(_SHAPE_WORDS[attrs.shape]), colour=pick(_COLOUR_WORDS[attrs.colour]),
                           size=pick(_SIZE_WORDS[attrs.size]), position=pick(_POSITION_WORDS[attrs.position]))
    text = re.sub(r"\b([Aa]) (?=[aeiou])", r"\1n ", text)
    if rng.random() < 0.5:
        text = text[0].upper() + text[1:]
    return text + ("." if rng.random() < 0.5 else "")


# --- audio -----------------------------------------------------------------

def beep_envelope(t: np.ndarray, rate: float, phase: float) -> np.ndarray:
    """On/off gate at ``rate`` beeps per second (50% duty), edges smoothed to avoid clicks."""
    cycle = (t * rate + phase) % 1.0
    ramp = 0.01 * rate  # 10 ms ramps, as a fraction of the cycle
    rise = np.clip(cycle / ramp, 0.0, 1.0)
    fall = np.clip((0.5 - cycle) / ramp, 0.0, 1.0)
    return np.minimum(rise, fall)


def synthesize_audio(attrs: Attributes, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """int16 samples (frames x channels) and the rate: pitch=colour, rhythm=shape, level=size, pan=position."""
    rate = int(SAMPLE_RATES[rng.integers(len(SAMPLE_RATES))])
    channels = 2 if rng.random() < 0.5 else 1
    seconds = round(float(rng.uniform(MIN_SECONDS, MAX_SECONDS)), 3)
    freq = COLOURS[attrs.colour][1] * rng.uniform(0.985, 1.015)
    t = np.arange(int(seconds * rate)) / rate
    tone = np.sin(2 * np.pi * freq * t) + 0.3 * np.sin(4 * np.pi * freq * t + rng.uniform(0, 2 * np.pi))
    signal = _LOUDNESS[attrs.size] / 1.3 * tone * beep_envelope(t, BEEPS_PER_SECOND[attrs.shape], rng.random())
    gains = _PAN.get(attrs.position, (1.0, 1.0)) if channels == 2 else (1.0,)
    noise = rng.normal(0.0, 0.02, size=(t.size, channels))
    audio = signal[:, None] * np.asarray(gains)[None, :] + noise
    return np.round(np.clip(audio, -1.0, 1.0) * 32767).astype(np.int16), rate


def encode_audio(samples: np.ndarray, rate: int, ext: str) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format="WAV" if ext == "wav" else "FLAC", subtype="PCM_16")
    return buf.getvalue()


# --- samples and manifest ----------------------------------------------------

def write_bytes(path: Path, data: bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path.parent.name + "/" + path.name


def generate_sample(out_dir: Path, seed: int, i: int, missing_rate: float) -> dict:
    """Write one sample's media files and return its manifest row (paths relative to out_dir)."""
    attrs, missing = draw_attributes(seed, i), draw_missing(seed, i, missing_rate)
    sid = sample_id(i)
    stem = make_key(sid)  # file names stay simple even for awkward ids; the id keeps its form
    row = {"id": sid, "text": None, "image": None, "audio": None, "label": attrs.shape,
           "colour": attrs.colour, "size": attrs.size, "position": attrs.position}
    # Each modality draws from its own stream, so dropping one changes nothing else.
    image_rng, text_rng, audio_rng = (sample_rng(seed, i, s) for s in (1, 2, 3))
    if missing != "image":
        ext = "png" if image_rng.random() < 0.5 else "jpg"
        data = encode_image(render_image(attrs, image_rng), ext)
        row["image"] = write_bytes(out_dir / "images" / f"{stem}.{ext}", data)
    if missing != "text":
        row["text"] = make_caption(attrs, text_rng)
    if missing != "audio":
        ext = "flac" if audio_rng.random() < 0.5 else "wav"
        samples, rate = synthesize_audio(attrs, audio_rng)
        row["audio"] = write_bytes(out_dir / "audio" / f"{stem}.{ext}", encode_audio(samples, rate, ext))
    return row


def write_manifest(rows: list[dict], path: Path, manifest_format: str) -> Path:
    """Write to a temporary name, then rename: a manifest present means the files are complete."""
    tmp = temp_path(path)
    if manifest_format == "jsonl":
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    elif manifest_format == "csv":
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=MANIFEST_COLUMNS)
            writer.writeheader()
            writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
    else:
        write_parquet(rows, tmp)
    os.replace(tmp, path)
    return path


def write_parquet(rows: list[dict], path: Path) -> None:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:  # optional at import time: only parquet manifests need it
        raise ImportError("manifest_format='parquet' needs pyarrow: pip install pyarrow") from e
    schema = pa.schema([(name, pa.string()) for name in MANIFEST_COLUMNS])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def generate_demo(out_dir: str | Path, n: int, seed: int = 0, missing_rate: float = 0.1,
                  manifest_format: str = "jsonl") -> Path:
    """Write n samples' files plus a manifest under out_dir; return the manifest path.

    Output is byte-identical for the same (n, seed, missing_rate), and the
    first k samples are identical for any n >= k. Any old manifest is removed
    first, so an interrupted run never leaves a manifest behind.
    """
    if n < 0 or seed < 0:
        raise ValueError(f"n and seed must be non-negative; got n={n}, seed={seed}")
    if not 0.0 <= missing_rate <= 1.0:
        raise ValueError(f"missing_rate must be between 0 and 1; got {missing_rate}")
    if manifest_format not in MANIFEST_FORMATS:
        raise ValueError(f"manifest_format must be one of {MANIFEST_FORMATS}; got {manifest_format!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = out_dir / f"manifest.{manifest_format}"
    manifest.unlink(missing_ok=True)
    rows = [generate_sample(out_dir, seed, i, missing_rate) for i in range(n)]
    return write_manifest(rows, manifest, manifest_format)
