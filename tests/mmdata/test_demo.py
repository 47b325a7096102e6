"""The demo dataset: deterministic, complete, and carrying the same attributes in every modality."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from PIL import Image

from mmdata.demo import (BEEPS_PER_SECOND, CLASSES, COLOURS, MANIFEST_COLUMNS, POSITIONS, SAMPLE_RATES,
                         SIZES, generate_demo)

N = 60


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def all_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("demo")
    manifest = generate_demo(out, N, seed=0)
    return out, read_jsonl(manifest)


def test_manifest_has_n_rows_with_unique_ids_and_known_columns(demo):
    out, rows = demo
    assert len(rows) == N
    assert len({r["id"] for r in rows}) == N
    assert all(tuple(r) == MANIFEST_COLUMNS for r in rows)
    assert not list(out.glob("*.tmp")), "the manifest is written via a temporary file that must be renamed"


def test_attributes_and_labels_come_from_the_known_sets(demo):
    _, rows = demo
    for r in rows:
        assert r["label"] in CLASSES and r["colour"] in COLOURS
        assert r["size"] in SIZES and r["position"] in POSITIONS
    assert len({r["label"] for r in rows}) >= 4


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path):
    generate_demo(tmp_path / "a", 20, seed=5)
    generate_demo(tmp_path / "b", 20, seed=5)
    generate_demo(tmp_path / "c", 20, seed=6)
    a, b, c = (all_files(tmp_path / d) for d in "abc")
    assert a == b
    assert a["manifest.jsonl"] != c["manifest.jsonl"]


def test_first_samples_do_not_depend_on_n(demo, tmp_path):
    out, rows = demo
    small = read_jsonl(generate_demo(tmp_path, 20, seed=0))
    assert small == rows[:20]
    for r in small:
        for key in ("image", "audio"):
            if r[key]:
                assert (tmp_path / r[key]).read_bytes() == (out / r[key]).read_bytes()


def test_missing_modality_leaves_the_others_unchanged(demo, tmp_path):
    out, rows = demo
    full = read_jsonl(generate_demo(tmp_path, N, seed=0, missing_rate=0.0))
    assert all(r["text"] and r["image"] and r["audio"] for r in full)
    for r, f in zip(rows, full):
        for key in ("text", "image", "audio"):
            assert r[key] is None or r[key] == f[key]
        for key in ("image", "audio"):
            if r[key]:
                assert (tmp_path / r[key]).read_bytes() == (out / r[key]).read_bytes()


def test_some_samples_miss_exactly_one_modality_and_none_miss_all(demo, tmp_path):
    _, rows = demo
    missing = [sum(r[k] is None for k in ("text", "image", "audio")) for r in rows]
    assert 0 < sum(missing) < N // 2
    assert max(missing) == 1
    always = read_jsonl(generate_demo(tmp_path, 15, seed=0, missing_rate=1.0))
    assert all(sum(r[k] is None for k in ("text", "image", "audio")) == 1 for r in always)


def test_images_are_jpeg_and_png_of_varied_sizes_showing_the_colour(demo):
    out, rows = demo
    formats, sizes = set(), set()
    for r in rows:
        if r["image"] is None:
            continue
        assert not Path(r["image"]).is_absolute()
        with Image.open(out / r["image"]) as image:
            formats.add(image.format)
            sizes.add(image.size)
            assert image.format == {".jpg": "JPEG", ".png": "PNG"}[Path(r["image"]).suffix]
            assert all(48 <= side <= 640 for side in image.size)
            pixels = np.asarray(image.convert("RGB")).reshape(-1, 3).astype(int)
        target = np.array(COLOURS[r["colour"]][0])
        assert (np.abs(pixels - target).max(axis=1) < 40).sum() >= 20, f"no {r['colour']} shape in {r['image']}"
    assert formats == {"JPEG", "PNG"}
    assert len(sizes) > 10


def test_audio_is_wav_and_flac_mono_and_stereo_of_allowed_rates_and_lengths(demo):
    out, rows = demo
    formats, channels = set(), set()
    for r in rows:
        if r["audio"] is None:
            continue
        info = sf.info(out / r["audio"])
        formats.add(info.format)
        channels.add(info.channels)
        assert info.format == {".wav": "WAV", ".flac": "FLAC"}[Path(r["audio"]).suffix]
        assert info.samplerate in SAMPLE_RATES
        assert 0.5 <= info.duration <= 4.0
    assert formats == {"WAV", "FLAC"}
    assert channels == {1, 2}


def read_mono(path: Path) -> tuple[np.ndarray, int]:
    samples, rate = sf.read(path, always_2d=True)
    return samples.mean(axis=1), rate


def test_colour_is_recoverable_from_the_audio_pitch(demo):
    out, rows = demo
    checked = 0
    for r in (r for r in rows if r["audio"]):
        mono, rate = read_mono(out / r["audio"])
        spectrum = np.abs(np.fft.rfft(mono))
        peak = np.fft.rfftfreq(mono.size, 1 / rate)[spectrum.argmax()]
        nearest = min(COLOURS, key=lambda c: abs(np.log(COLOURS[c][1] / peak)))
        assert nearest == r["colour"], f"{r['audio']}: peak {peak:.0f} Hz"
        checked += 1
    assert checked > N // 2


def test_shape_is_mostly_recoverable_from_the_audio_rhythm(demo):
    out, rows = demo
    hits = total = 0
    for r in (r for r in rows if r["audio"]):
        mono, rate = read_mono(out / r["audio"])
        hop = rate // 200  # loudness envelope at 200 frames per second
        envelope = np.abs(mono[: mono.size // hop * hop]).reshape(-1, hop).mean(axis=1)
        spectrum = np.abs(np.fft.rfft(envelope - envelope.mean()))
        freqs = np.fft.rfftfreq(envelope.size, 1 / 200)
        band = (freqs > 1.5) & (freqs < 10)
        beat = freqs[band][spectrum[band].argmax()]
        hits += min(BEEPS_PER_SECOND, key=lambda s: abs(BEEPS_PER_SECOND[s] - beat)) == r["label"]
        total += 1
    assert hits / total >= 0.8


def test_captions_vary_and_usually_name_shape_and_colour(demo):
    _, rows = demo
    texts = [r["text"] for r in rows if r["text"]]
    assert len(set(texts)) > len(texts) * 0.9
    assert len({t.split()[0].lower() for t in texts}) >= 4  # varied word order
    assert all(isinstance(t, str) and t.strip() for t in texts)


def test_unusual_ids_keep_their_form_but_files_get_simple_names(demo):
    out, rows = demo
    unusual = [r for r in rows if not re.fullmatch(r"demo-\d{6}", r["id"])]
    assert unusual
    assert any(ch in r["id"] for r in unusual for ch in "./ ")
    assert any(not r["id"].isascii() for r in unusual)
    for r in rows:
        for key in ("image", "audio"):
            if r[key]:
                assert re.fullmatch(r"(images|audio)/[A-Za-z0-9_-]+\.(jpg|png|wav|flac)", r[key]), r[key]
                assert (out / r[key]).is_file()


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_csv_and_parquet_manifests_match_jsonl(tmp_path, fmt):
    jsonl = read_jsonl(generate_demo(tmp_path, 30, seed=2))
    path = generate_demo(tmp_path, 30, seed=2, manifest_format=fmt)
    assert path.name == f"manifest.{fmt}"
    if fmt == "csv":
        with open(path, newline="", encoding="utf-8") as f:
            rows = [{k: (v if v != "" else None) for k, v in row.items()} for row in csv.DictReader(f)]
    else:
        rows = pq.read_table(path).to_pylist()
    assert rows == jsonl


def test_bad_arguments_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="manifest_format"):
        generate_demo(tmp_path, 2, manifest_format="xml")
    with pytest.raises(ValueError, match="missing_rate"):
        generate_demo(tmp_path, 2, missing_rate=1.5)
    with pytest.raises(ValueError, match="non-negative"):
        generate_demo(tmp_path, -1)
