"""Reuse per shard, resume after SIGKILL, concurrent runs: all end in the same bytes."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from helpers import dataset_files, preprocess_config
from mmdata.prep.pipeline import preprocess

QUIET = {"log": lambda _: None}


@pytest.fixture()
def inputs(demo_dir, tmp_path):
    """A private copy of the demo data (tests edit it) and a given tokenizer."""
    copy = tmp_path / "demo"
    shutil.copytree(demo_dir, copy)
    return copy


def rows(manifest: Path) -> list[dict]:
    return [json.loads(line) for line in manifest.read_text().splitlines()]


def write_rows(manifest: Path, data: list[dict]) -> None:
    manifest.write_text("".join(json.dumps(r) + "\n" for r in data))


def given_tokenizer(inputs, tmp_path) -> str:
    first = preprocess(preprocess_config(inputs / "manifest.jsonl", tmp_path / "tok"), **QUIET)
    return f"text.tokenizer={first.dataset}/tokenizer.model"


def test_fixing_a_broken_file_rebuilds_only_its_shard(inputs, tmp_path):
    tok = given_tokenizer(inputs, tmp_path)
    manifest = inputs / "manifest.jsonl"
    clean = preprocess(preprocess_config(manifest, tmp_path / "clean", tok), **QUIET)
    victim = next(r for r in rows(manifest)[12:24] if r.get("image"))  # partition 1
    path = inputs / victim["image"]
    original = path.read_bytes()
    path.write_bytes(b"not an image at all")
    root = tmp_path / "work"
    broken = preprocess(preprocess_config(manifest, root, tok), **QUIET)
    assert broken.totals.errors_by_reason == {"corrupt_image": 1}
    assert broken.partitions_built == 4
    path.write_bytes(original)
    fixed = preprocess(preprocess_config(manifest, root, tok), **QUIET)
    assert (fixed.partitions_built, fixed.partitions_reused) == (1, 3)
    assert fixed.totals.errors_by_reason == {}
    # same shards, index, errors and tokenizer as a clean run; dataset.json differs only in the
    # fingerprints, because the fixed file has a new mtime (file_identity: stat)
    without_description = lambda files: {k: v for k, v in files.items() if k != "dataset.json"}  # noqa: E731
    assert without_description(dataset_files(fixed.dataset)) == without_description(dataset_files(clean.dataset))


def test_file_identity_name_takes_files_as_immutable(inputs, tmp_path):
    tok = given_tokenizer(inputs, tmp_path)
    manifest, root = inputs / "manifest.jsonl", tmp_path / "work"
    first = preprocess(preprocess_config(manifest, root, tok, "input.file_identity=name"), **QUIET)
    victim = inputs / next(r for r in rows(manifest) if r.get("image"))["image"]
    victim.write_bytes(victim.read_bytes() + b"\0")   # a new size and mtime: `stat` would rebuild its partition
    again = preprocess(preprocess_config(manifest, root, tok, "input.file_identity=name"), **QUIET)
    assert again.reused_dataset and again.dataset == first.dataset and again.partitions_built == 0


def test_editing_a_caption_or_appending_rows_rebuilds_only_what_changed(inputs, tmp_path):
    tok = given_tokenizer(inputs, tmp_path)
    manifest, root = inputs / "manifest.jsonl", tmp_path / "work"
    preprocess(preprocess_config(manifest, root, tok), **QUIET)
    data = rows(manifest)
    data[30]["text"] = "an edited caption"
    write_rows(manifest, data)
    edited = preprocess(preprocess_config(manifest, root, tok), **QUIET)
    assert (edited.partitions_built, edited.partitions_reused) == (1, 3)
    write_rows(manifest, data + [{**r, "id": r["id"] + "-copy"} for r in data[:5]])
    appended = preprocess(preprocess_config(manifest, root, tok), **QUIET)
    assert (appended.partitions_built, appended.partitions_reused) == (1, 4)
    assert appended.totals.samples_in == 53


def write_yaml(tmp_path, manifest, root, *extra) -> Path:
    config = preprocess_config(manifest, root, "output.samples_per_shard=3", *extra)
    from mmdata.config import to_dict
    path = tmp_path / f"cfg-{len(list(tmp_path.glob('cfg-*')))}.yaml"
    path.write_text(yaml.safe_dump(to_dict(config)))
    return path


def run_cli(config: Path, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mmdata.cli", "preprocess", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_same_bytes(inputs, tmp_path):
    manifest = inputs / "manifest.jsonl"
    reference = preprocess(preprocess_config(manifest, tmp_path / "ref", "output.samples_per_shard=3"), **QUIET)
    root = tmp_path / "work"
    proc = run_cli(write_yaml(tmp_path, manifest, root))
    store = root / ".store"
    deadline = time.time() + 120
    while len(list(store.glob("*/summary.json"))) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = len(list(store.glob("*/summary.json")))
    assert 3 <= finished < 16, f"expected to kill the run midway; {finished} of 16 partitions were done"
    assert not list(root.glob("t-*/dataset.json"))
    resumed = run_cli(write_yaml(tmp_path, manifest, root))
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert f"{16 - finished} partitions built, {finished} reused" in out
    dataset = out.split("dataset    ")[1].split()[0]
    assert dataset_files(dataset) == dataset_files(reference.dataset)


@pytest.mark.slow
def test_two_runs_at_once_do_not_corrupt_each_other(inputs, tmp_path):
    manifest = inputs / "manifest.jsonl"
    reference = preprocess(preprocess_config(manifest, tmp_path / "ref", "output.samples_per_shard=3"), **QUIET)
    config = write_yaml(tmp_path, manifest, tmp_path / "work")
    runs = [run_cli(config), run_cli(config)]
    results = [r.communicate(timeout=300) for r in runs]
    assert [r.returncode for r in runs] == [0, 0], [err for _, err in results]
    dataset = results[0][0].split("dataset    ")[1].split()[0]
    files, expected = dataset_files(dataset), dataset_files(reference.dataset)
    ours, theirs = (json.loads(f["dataset.json"]) for f in (files, expected))
    assert files == expected, {k: (ours.get(k), theirs.get(k)) for k in {*ours, *theirs} if ours.get(k) != theirs.get(k)}
    leftovers = [p for p in (tmp_path / "work").rglob("*.tmp")]
    assert leftovers == []
