"""Bad input never kills the job: each kind gets a reason, input = written + rejected."""

from __future__ import annotations

import io
import json
import struct
import zlib

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from helpers import preprocess_config
from mmdata.cli import main
from mmdata.prep.pipeline import preprocess


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height: a decompression bomb's signature."""
    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = 8 + 8  # signature, then length + "IHDR"
    data[ihdr: ihdr + 8] = struct.pack(">II", width, height)
    data[ihdr + 13: ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4: ihdr + 13])))
    return bytes(data)


def good_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(buf, "JPEG")
    return buf.getvalue()


def good_wav(seconds: float = 0.5) -> bytes:
    buf = io.BytesIO()
    t = np.arange(int(16000 * seconds)) / 16000
    sf.write(buf, 0.3 * np.sin(2 * np.pi * 440 * t), 16000, format="WAV")
    return buf.getvalue()


@pytest.fixture()
def bad_manifest(tmp_path):
    files = {
        "good.jpg": good_jpeg(), "good.wav": good_wav(),
        "truncated.jpg": good_jpeg()[:200], "garbage.jpg": b"\x00garbage" * 20, "empty.jpg": b"",
        "bomb.png": png_claiming(30000, 30000), "text.png": b"just text, not a png",
        "corrupt.wav": b"RIFF" + b"\x00" * 40, "empty.flac": b"",
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    rows = [
        {"id": "ok", "text": "fine", "image": "good.jpg", "audio": "good.wav", "label": 1},
        {"id": "trunc", "text": "t", "image": "truncated.jpg", "label": 1},
        {"id": "garbage", "text": "t", "image": "garbage.jpg"},
        {"id": "empty-img", "text": "t", "image": "empty.jpg"},
        {"id": "bomb", "text": "t", "image": "bomb.png"},
        {"id": "unsupported", "text": "t", "image": "text.png"},
        {"id": "missing", "text": "t", "image": "nowhere.jpg", "audio": "nowhere.wav"},
        {"id": "bad-wav", "text": "t", "audio": "corrupt.wav"},
        {"id": "empty-audio", "text": "t", "audio": "empty.flac"},
        {"id": "empty-text", "text": "", "image": "good.jpg"},
        {"id": "long-text", "text": "word " * 200, "image": "good.jpg"},
        {"id": "ok", "text": "duplicate id", "image": "good.jpg"},
        {"id": "nothing"},
        {"id": "bad-label", "text": "t", "label": True},
    ]
    lines = [json.dumps(r).encode() for r in rows]
    lines.insert(3, b'{"id": "utf8", "text": "caf\xe9 latin-1, not UTF-8"}')
    lines.append(b'{"this line is": not json}')
    (tmp_path / "manifest.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return tmp_path / "manifest.jsonl"


def test_each_bad_input_has_its_reason_and_nothing_is_lost(bad_manifest, tmp_path):
    config = preprocess_config(bad_manifest, tmp_path / "out", "text.max_chars=100", "max_error_rate=1.0")
    result = preprocess(config, log=lambda _: None)
    t = result.totals
    assert t.samples_in == 16
    assert t.written + t.rejected == t.samples_in
    errors = [json.loads(line) for line in open(f"{result.dataset}/errors.jsonl")]
    by_reason = {}
    for e in errors:
        by_reason.setdefault(e["reason"], []).append(e)
        assert {"id", "modality", "stage", "error", "reason", "action"} <= set(e)
    counts = {reason: len(v) for reason, v in by_reason.items()}
    assert counts == t.errors_by_reason
    for reason in ("corrupt_image", "empty_image", "image_too_large", "missing_file", "corrupt_audio",
                   "empty_audio", "empty_text", "text_too_long", "duplicate_id", "invalid_utf8",
                   "invalid_label", "bad_row", "no_modalities"):
        assert reason in counts, f"no error with reason {reason}: {counts}"
    assert counts["corrupt_image"] == 3 and counts["missing_file"] == 2
    # "nothing" had no modality; "utf8" had only its (invalid) text left
    assert {e["id"] for e in by_reason["no_modalities"]} == {"nothing", "utf8"}
    assert by_reason["missing_file"][0]["stage"] == "read" and "nowhere" in by_reason["missing_file"][0]["error"]
    assert by_reason["image_too_large"][0]["id"] == "bomb"
    # dropped modalities keep the sample: "trunc" is written with text only
    assert all(e["action"] == "dropped_modality" for e in by_reason["corrupt_image"])
    assert t.rejected == len({e["row"] for e in errors if e["action"] == "rejected"})


def test_reject_sample_policy_rejects_the_whole_sample(bad_manifest, tmp_path):
    config = preprocess_config(bad_manifest, tmp_path / "out", "image.on_error=reject_sample",
                               "max_error_rate=1.0")
    result = preprocess(config, log=lambda _: None)
    errors = [json.loads(line) for line in open(f"{result.dataset}/errors.jsonl")]
    image_errors = [e for e in errors if e["modality"] == "image"]
    assert image_errors and all(e["action"] == "rejected" for e in image_errors)
    loose = preprocess(preprocess_config(bad_manifest, tmp_path / "out2", "max_error_rate=1.0"),
                       log=lambda _: None)
    assert result.totals.rejected > loose.totals.rejected
    assert result.totals.written + result.totals.rejected == 16


def test_error_rate_over_the_limit_fails_the_run_and_says_so(bad_manifest, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(f"input: {{manifest: {bad_manifest}}}\noutput: {{root: {tmp_path / 'o'}}}\n"
                      "ray: {executor: serial}\nprogress: false\nmax_error_rate: 0.1\n"
                      "text: {vocab_size: 64}\n")
    assert main(["preprocess", str(config)]) == 1
    err = capsys.readouterr().err
    assert "over max_error_rate=10.0%" in err and "errors.jsonl" in err
    assert main(["preprocess", str(config), "max_error_rate=0.9"]) == 0


@pytest.mark.parametrize("override, words", [
    ("image.size=-1", "image.size: must be between 1 and 8192"),
    ("image.size=30000", "image.size: must be between 1 and 8192"),
    ("audio.max_seconds=100000", "audio.max_seconds: x sample_rate is 1600000000 samples per clip"),
    ("output.root=", "output.root: must name a folder"),
    ("input.timeout_s=0", "input.timeout_s: must be in (0, 3600]"),
    ("image.colour=red", "image.colour: unknown key"),
    ("input.manifest=/no/such/manifest.jsonl", "/no/such/manifest.jsonl does not exist"),
    ("text.tokenizer=/no/such.model", "text.tokenizer: cannot load SentencePiece model"),
])
def test_bad_config_fails_at_once_with_a_message_not_a_traceback(bad_manifest, tmp_path, capsys, override, words):
    config = tmp_path / "c.yaml"
    config.write_text(f"input: {{manifest: {bad_manifest}}}\noutput: {{root: {tmp_path / 'o'}}}\n"
                      "ray: {executor: serial}\nprogress: false\n")
    assert main(["preprocess", str(config), override]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").rglob("*.tar"))
