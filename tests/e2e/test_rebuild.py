"""A change to one modality's settings recomputes that modality alone (docs/preprocessing.md, "What a change
rebuilds"), and the dataset assembled from the members cached by earlier runs is the same bytes as one built
from scratch with the new config."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import yaml

from helpers import dataset_files, preprocess_config
from mmdata.config import to_dict
from mmdata.prep.members import MEMBERS_DIR
from mmdata.prep.pipeline import preprocess
from mmdata.prep.store import STORE

QUIET = {"log": lambda _: None}
GROUPS = ("text", "image", "audio", "waveform")   # waveform: the 16-bit clip the mel is made from


@pytest.fixture()
def inputs(demo_dir, tmp_path):
    """A private copy of the demo data (tests edit it)."""
    copy = tmp_path / "demo"
    shutil.copytree(demo_dir, copy)
    return copy


def comparable(dataset: str) -> dict[str, bytes]:
    """A dataset's files for comparing a rebuild with a fresh build: dataset.json without its lineage (which
    says how each was made, and so differs)."""
    files = dataset_files(dataset)
    description = json.loads(files["dataset.json"])
    del description["lineage"]
    files["dataset.json"] = json.dumps(description, sort_keys=True).encode()
    return files


def built(result) -> dict[str, tuple[int, int]]:
    return {group: (use["built"], use["reused"]) for group, use in result.lineage.items()}


def rebuild_and_fresh(manifest: Path, tmp_path: Path, before: list[str], after: list[str]):
    """Build ``before``, then ``after`` in the same root; and ``after`` alone in another root."""
    root = tmp_path / "work"
    preprocess(preprocess_config(manifest, root, *before), **QUIET)
    rebuilt = preprocess(preprocess_config(manifest, root, *after), **QUIET)
    fresh = preprocess(preprocess_config(manifest, tmp_path / "fresh", *after), **QUIET)
    assert comparable(rebuilt.dataset) == comparable(fresh.dataset)
    return rebuilt, fresh


# what each change recomputes: (change, groups recomputed); the 48 demo rows are 4 partitions
TABLE = [
    ("image.size=40", {"image"}),
    ("image.format=webp", {"image"}),
    ("text.vocab_size=96", {"text"}),           # a new tokenizer
    ("text.max_tokens=12", {"text"}),
    ("audio.n_mels=24", {"audio"}),              # from the cached waveform: no decoding, no resampling
    ("audio.hop_length=200", {"audio"}),
    ("audio.max_seconds=1.5", {"audio", "waveform"}),
    ("audio.keep_waveform=true", {"flac"}),      # the FLAC added, from the cached waveform; the mel reused
    ("image.on_error=reject_sample", set()),     # decides at assembly only
    ("output.max_shard_bytes=60000", set()),     # shards split differently, members the same
    ("output.samples_per_shard=16", {"text", "image", "audio", "waveform"}),   # new partitions
]


@pytest.mark.parametrize("change, recomputed", TABLE, ids=[change for change, _ in TABLE])
def test_a_change_recomputes_only_what_it_affects_and_gives_a_fresh_builds_bytes(demo_dir, tmp_path, change,
                                                                                  recomputed):
    rebuilt, fresh = rebuild_and_fresh(demo_dir / "manifest.jsonl", tmp_path, [], [change])
    partitions = rebuilt.partitions_built + rebuilt.partitions_reused
    groups = set(GROUPS) | ({"flac"} if "keep_waveform" in change else set())
    assert built(rebuilt) == {g: (partitions, 0) if g in recomputed else (0, partitions) for g in groups}
    assert built(fresh) == {g: (partitions, 0) for g in groups}
    reused_from = {g: use["from"] for g, use in rebuilt.lineage.items() if g not in recomputed}
    first = sorted(p.name for p in (tmp_path / "work").glob("t-*") if p.name != Path(rebuilt.dataset).name)
    assert all(names == first for names in reused_from.values()) and len(first) == 1


def test_new_mel_settings_come_from_the_cached_waveform_without_reading_a_file(inputs, tmp_path):
    manifest = inputs / "manifest.jsonl"
    fresh = preprocess(preprocess_config(manifest, tmp_path / "fresh", "audio.n_mels=24"), **QUIET)
    root, by_name = tmp_path / "work", "input.file_identity=name"   # a deleted file keeps its identity
    preprocess(preprocess_config(manifest, root, by_name), **QUIET)
    shutil.rmtree(inputs / "audio")   # gone: only the store has the clips now
    rebuilt = preprocess(preprocess_config(manifest, root, "audio.n_mels=24", by_name), **QUIET)
    assert rebuilt.totals.errors_by_reason == {} and built(rebuilt)["audio"] == (4, 0)
    files = {k: v for k, v in comparable(rebuilt.dataset).items() if k != "dataset.json"}
    assert files == {k: v for k, v in comparable(fresh.dataset).items() if k != "dataset.json"}


def test_editing_one_row_recomputes_only_the_changed_modality_of_its_partition(inputs, tmp_path):
    manifest = inputs / "manifest.jsonl"
    data = [json.loads(line) for line in manifest.read_text().splitlines()]
    # a given tokenizer: one trained on the input changes with any caption, and every text member with it
    tok = f"text.tokenizer={preprocess(preprocess_config(manifest, tmp_path / 'tok'), **QUIET).dataset}/tokenizer.model"
    root = tmp_path / "work"
    preprocess(preprocess_config(manifest, root, tok), **QUIET)
    row = next(i for i in range(12, 24) if data[i].get("image") and data[i].get("text"))   # partition 1
    other = next(r["image"] for r in data if r.get("image") and r["image"] != data[row]["image"])
    data[row]["image"] = other
    manifest.write_text("".join(json.dumps(r) + "\n" for r in data))
    new_image = preprocess(preprocess_config(manifest, root, tok), **QUIET)
    assert (new_image.partitions_built, new_image.partitions_reused) == (1, 3)
    assert built(new_image) == {"text": (0, 4), "image": (1, 3), "audio": (0, 4), "waveform": (0, 4)}
    data[row]["text"] = "an edited caption"
    data[row + 1]["meta"] = {"edited": True}   # metadata is made at assembly: no member recomputed for it
    manifest.write_text("".join(json.dumps(r) + "\n" for r in data))
    new_text = preprocess(preprocess_config(manifest, root, tok), **QUIET)
    assert built(new_text) == {"text": (1, 3), "image": (0, 4), "audio": (0, 4), "waveform": (0, 4)}
    # a new id and another (existing) label: the sample's json, cls and index change, no member does
    data[30]["id"] = "a-new-id"
    data[31]["label"] = next(r["label"] for r in data if r.get("label") not in (None, data[31].get("label")))
    manifest.write_text("".join(json.dumps(r) + "\n" for r in data))
    relabelled = preprocess(preprocess_config(manifest, root, tok), **QUIET)
    assert (relabelled.partitions_built, relabelled.partitions_reused) == (1, 3)
    assert built(relabelled) == {"text": (0, 4), "image": (0, 4), "audio": (0, 4), "waveform": (0, 4)}
    fresh = preprocess(preprocess_config(manifest, tmp_path / "fresh", tok), **QUIET)
    assert comparable(relabelled.dataset) == comparable(fresh.dataset)


def test_members_are_reused_across_datasets_with_another_output_name(demo_dir, tmp_path):
    manifest, root = demo_dir / "manifest.jsonl", tmp_path / "work"
    first = preprocess(preprocess_config(manifest, root, "output.name=small"), **QUIET)
    second = preprocess(preprocess_config(manifest, root, "output.name=large", "image.size=48"), **QUIET)
    assert built(second) == {"text": (0, 4), "image": (4, 0), "audio": (0, 4), "waveform": (0, 4)}
    assert second.lineage["audio"]["from"] == second.lineage["text"]["from"] == [Path(first.dataset).name]
    from mmdata.cli import main
    assert main(["info", str(second.dataset)]) == 0


def short_clip(path: Path) -> None:
    """A 10 ms clip: a waveform, but too short for a 400-point FFT's one mel frame (audio_too_short)."""
    sf.write(path, np.sin(np.arange(160) / 5).astype(np.float32) * 0.5, 16000, format="WAV")


def test_rejections_are_decided_again_at_assembly_as_a_fresh_build_would(inputs, tmp_path):
    manifest = inputs / "manifest.jsonl"
    data = [json.loads(line) for line in manifest.read_text().splitlines()]
    bad_image = next(i for i, r in enumerate(data) if r.get("image") and r.get("text"))
    (inputs / data[bad_image]["image"]).write_bytes(b"not an image")
    short = next(i for i, r in enumerate(data) if r.get("audio") and i != bad_image)
    short_clip(inputs / "short.wav")
    data[short]["audio"] = "short.wav"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in data))
    strict = ["image.on_error=reject_sample", "audio.keep_waveform=true"]

    rebuilt, fresh = rebuild_and_fresh(manifest, tmp_path, strict, [*strict, "text.max_tokens=12"])
    assert built(rebuilt) == {"text": (4, 0), "image": (0, 4), "audio": (0, 4), "waveform": (0, 4), "flac": (0, 4)}
    errors = [json.loads(line) for line in (Path(rebuilt.dataset) / "errors.jsonl").read_text().splitlines()]
    assert [(e["row"], e["reason"], e["action"]) for e in errors] == \
        [(bad_image, "corrupt_image", "rejected"),
         (short, "audio_too_short", "dropped_modality")]

    # the same cached members, another decision: the sample comes back without its image
    lenient = ["image.on_error=drop_modality", "audio.keep_waveform=true"]
    shutil.rmtree(tmp_path / "fresh")
    back, _ = rebuild_and_fresh(manifest, tmp_path, strict, lenient)
    assert built(back) == {"text": (0, 4), "image": (0, 4), "audio": (0, 4), "waveform": (0, 4), "flac": (0, 4)}
    assert back.totals.rejected == rebuilt.totals.rejected - 1

    # a 128-point FFT gives the short clip a mel frame, made from its cached waveform (kept apart from the
    # mel, which failed), and its cached FLAC goes into the shard beside it, as a fresh build writes them
    shutil.rmtree(tmp_path / "fresh")
    wider, _ = rebuild_and_fresh(manifest, tmp_path, lenient, [*lenient, "audio.n_fft=128", "audio.n_mels=24"])
    assert built(wider) == {"text": (0, 4), "image": (0, 4), "audio": (4, 0), "waveform": (0, 4), "flac": (0, 4)}
    assert "audio_too_short" not in wider.totals.errors_by_reason


def test_a_damaged_member_entry_is_computed_again(demo_dir, tmp_path):
    manifest, root = demo_dir / "manifest.jsonl", tmp_path / "work"
    preprocess(preprocess_config(manifest, root), **QUIET)
    audio = sorted((root / STORE / MEMBERS_DIR).glob("audio-*"))
    with open(audio[0] / "members.bin", "r+b") as f:   # cut short: its size no longer matches entry.json
        f.truncate(100)
    (audio[1] / "entry.json").unlink()                  # never finished
    with open(audio[2] / "members.bin", "r+b") as f:   # one byte flipped by a failing disk: same size
        f.seek(5000)
        byte = f.read(1)
        f.seek(5000)
        f.write(bytes([byte[0] ^ 1]))
    text = sorted((root / STORE / MEMBERS_DIR).glob("text-*"))
    doc = json.loads((text[0] / "entry.json").read_text())
    doc["outcomes"][0] = {"members": "not a list"}     # malformed by hand or by other code
    (text[0] / "entry.json").write_text(json.dumps(doc))
    changed = preprocess(preprocess_config(manifest, root, "image.size=40"), **QUIET)
    assert built(changed) == {"text": (1, 3), "image": (4, 0), "audio": (3, 1), "waveform": (0, 4)}
    fresh = preprocess(preprocess_config(manifest, tmp_path / "fresh", "image.size=40"), **QUIET)
    assert comparable(changed.dataset) == comparable(fresh.dataset)


def write_yaml(path: Path, manifest: Path, root: Path, *overrides: str) -> Path:
    config = preprocess_config(manifest, root, "output.samples_per_shard=3", *overrides)
    path.write_text(yaml.safe_dump(to_dict(config)))
    return path


def run_cli(config: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mmdata", "preprocess", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_a_partial_rebuild_killed_midway_resumes_to_a_fresh_builds_bytes(demo_dir, tmp_path):
    manifest, root = demo_dir / "manifest.jsonl", tmp_path / "work"
    preprocess(preprocess_config(manifest, root, "output.samples_per_shard=3"), **QUIET)
    before = set((root / STORE).glob("*/summary.json"))
    config = write_yaml(tmp_path / "c.yaml", manifest, root, "image.size=40")
    proc = run_cli(config)
    deadline = time.time() + 120
    while len(set((root / STORE).glob("*/summary.json")) - before) < 3 and time.time() < deadline \
            and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(set((root / STORE).glob("*/summary.json")) - before)
    assert 3 <= done < 16, f"expected to kill the run midway; {done} of 16 partitions were done"
    resumed = run_cli(config)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert f"{16 - done} partitions built, {done} reused" in out
    assert "text built 0, reused 16" in out and "audio built 0, reused 16" in out
    dataset = out.split("dataset    ")[1].split()[0]
    fresh = preprocess(preprocess_config(manifest, tmp_path / "fresh", "output.samples_per_shard=3",
                                         "image.size=40"), **QUIET)
    assert comparable(dataset) == comparable(fresh.dataset)
    assert [p for p in root.rglob("*.tmp")] == []


@pytest.mark.slow
def test_two_partial_rebuilds_at_once_share_the_members_they_compute(demo_dir, tmp_path):
    manifest, root = demo_dir / "manifest.jsonl", tmp_path / "work"
    preprocess(preprocess_config(manifest, root, "output.samples_per_shard=3"), **QUIET)
    audio_entries = len(list((root / STORE / MEMBERS_DIR).glob("audio-*")))
    config = write_yaml(tmp_path / "c.yaml", manifest, root, "audio.n_mels=24")
    runs = [run_cli(config), run_cli(config)]
    results = [r.communicate(timeout=300) for r in runs]
    assert [r.returncode for r in runs] == [0, 0], [err for _, err in results]
    fresh = preprocess(preprocess_config(manifest, tmp_path / "fresh", "output.samples_per_shard=3",
                                         "audio.n_mels=24"), **QUIET)
    dataset = results[0][0].split("dataset    ")[1].split()[0]
    assert comparable(dataset) == comparable(fresh.dataset)
    # n_mels 32 and 24, each entry once: the two runs wrote the same names
    assert len(list((root / STORE / MEMBERS_DIR).glob("audio-*"))) == 2 * audio_entries
    assert [p for p in root.rglob("*.tmp")] == []
