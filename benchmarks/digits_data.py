"""A real image-text-audio set for checking that the image encoder learns real images, not only the demo.

    python benchmarks/digits_data.py --out data/digits      # 1,797 samples: files + manifest.jsonl

Images: the 1,797 handwritten digits that scikit-learn ships (UCI "Optical Recognition of Handwritten
Digits", 8x8, 17 grey levels, written by 43 people), each "photographed": ink and paper colours, scaled to
a 48-160 px canvas, rotated, shifted, blurred, with sensor noise and JPEG/PNG compression. Text: a caption
that names the digit (as a word or a numeral) in varied wording. Audio: the digit as a telephone keypad
(DTMF) tone, pressed one to four times with random timing, level, detuning, sample rate and background
noise. Label: the digit's name. Everything is drawn from per-sample seeded generators: the same seed gives
the same bytes.

Unlike the demo, nothing here is a clean synthetic shape: the writing varies by writer, and at 8x8 source
resolution some digits are ambiguous even to people.
"""

from __future__ import annotations

import argparse
import io
import json
import os
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image, ImageFilter

NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# keypad (row Hz, column Hz) per digit: the standard DTMF pairs
DTMF = {0: (941, 1336), 1: (697, 1209), 2: (697, 1336), 3: (697, 1477), 4: (770, 1209), 5: (770, 1336),
        6: (770, 1477), 7: (852, 1209), 8: (852, 1336), 9: (852, 1477)}
TEMPLATES = ("a handwritten {word}", "the digit {numeral}", "number {word}, written by hand",
             "a {ink} {word} on {paper} paper", "{numeral}", "someone wrote the number {numeral}",
             "handwriting: {word}", "a scanned {numeral} in {ink} ink", "the figure {word}")
INKS = {"black": (20, 20, 25), "blue": (30, 50, 160), "red": (170, 30, 30), "green": (30, 110, 50),
        "purple": (90, 40, 130)}
PAPERS = {"white": (245, 245, 240), "cream": (240, 230, 200), "grey": (200, 200, 200),
          "yellow": (245, 235, 150), "lined blue": (225, 235, 250)}
RATES = (8000, 16000, 22050, 44100)


def photograph(digit: np.ndarray, rng: np.random.Generator) -> tuple[Image.Image, str, str]:
    """The 8x8 digit as a colour photo of ink on paper: canvas 48-160 px, scaled, rotated, shifted, noisy."""
    ink_name, paper_name = (list(INKS)[rng.integers(len(INKS))], list(PAPERS)[rng.integers(len(PAPERS))])
    side = int(rng.integers(48, 161))
    ink_amount = Image.fromarray((digit / 16.0 * 255).astype(np.uint8))
    glyph = int(side * rng.uniform(0.55, 0.9))
    ink_amount = ink_amount.resize((glyph, glyph), Image.BICUBIC).rotate(float(rng.uniform(-15, 15)),
                                                                          Image.BICUBIC, expand=False)
    alpha = Image.new("L", (side, side), 0)
    slack = side - glyph
    alpha.paste(ink_amount, (int(rng.integers(0, slack + 1)), int(rng.integers(0, slack + 1))))
    alpha = alpha.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.5))))
    light = rng.uniform(0.75, 1.1)   # exposure
    paper = np.clip(np.array(PAPERS[paper_name]) * light, 0, 255)
    ink = np.clip(np.array(INKS[ink_name]) + rng.integers(-20, 21, 3), 0, 255)
    a = np.asarray(alpha, np.float32)[..., None] / 255.0
    shade = np.linspace(rng.uniform(0.85, 1.0), rng.uniform(0.85, 1.0), side)[None, :, None]   # uneven light
    pixels = (paper * shade) * (1 - a) + ink * a + rng.normal(0, rng.uniform(2, 8), (side, side, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)), ink_name, paper_name


def caption(label: int, ink: str, paper: str, rng: np.random.Generator) -> str:
    template = TEMPLATES[rng.integers(len(TEMPLATES))]
    text = template.format(word=NAMES[label], numeral=str(label), ink=ink, paper=paper)
    return text[0].upper() + text[1:] if rng.random() < 0.5 else text


def keypad_tone(label: int, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """The digit's DTMF pair pressed 1-4 times, detuned up to 2%, at a random level, over noise."""
    rate = int(RATES[rng.integers(len(RATES))])
    seconds = float(rng.uniform(0.6, 2.5))
    t = np.arange(int(seconds * rate)) / rate
    low, high = (f * rng.uniform(0.98, 1.02) for f in DTMF[label])
    tone = np.sin(2 * np.pi * low * t) + np.sin(2 * np.pi * high * t + rng.uniform(0, 2 * np.pi))
    gate = np.zeros_like(t)
    for _ in range(int(rng.integers(1, 5))):
        start, length = rng.uniform(0, seconds * 0.8), rng.uniform(0.08, 0.4)
        gate[(t >= start) & (t < start + length)] = 1.0
    level = rng.uniform(0.1, 0.45)
    audio = level * tone * gate + rng.normal(0, rng.uniform(0.005, 0.05), t.size)
    return np.round(np.clip(audio, -1, 1) * 32767).astype(np.int16), rate


def write_digits(out: Path, seed: int = 0) -> Path:
    """Files under out/images and out/audio, then out/manifest.jsonl (written last, atomically)."""
    from sklearn.datasets import load_digits    # ships with scikit-learn: no download
    digits = load_digits()
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "audio").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (image, label) in enumerate(zip(digits.images, digits.target)):
        label = int(label)
        image_rng, text_rng, audio_rng = (np.random.default_rng([seed, i, s]) for s in (1, 2, 3))
        photo, ink, paper = photograph(image, image_rng)
        ext = "jpg" if image_rng.random() < 0.7 else "png"
        buf = io.BytesIO()
        photo.save(buf, format="JPEG" if ext == "jpg" else "PNG", **({"quality": int(image_rng.integers(60, 95))}
                                                                     if ext == "jpg" else {}))
        (out / "images" / f"{i:04d}.{ext}").write_bytes(buf.getvalue())
        samples, rate = keypad_tone(label, audio_rng)
        sf.write(out / "audio" / f"{i:04d}.flac", samples, rate, subtype="PCM_16")
        rows.append({"id": f"digit-{i:04d}", "text": caption(label, ink, paper, text_rng),
                     "image": f"images/{i:04d}.{ext}", "audio": f"audio/{i:04d}.flac", "label": NAMES[label]})
    manifest = out / "manifest.jsonl"
    tmp = out / "manifest.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, manifest)
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/digits")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"wrote {write_digits(Path(args.out), args.seed)}")


if __name__ == "__main__":
    main()
