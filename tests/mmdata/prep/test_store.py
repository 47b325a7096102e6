"""mmdata gc: store entries no finished dataset uses are removed, nothing else; never while a preprocess runs,
and a preprocess waits for a gc."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from helpers import dataset_files, preprocess_config
from mmdata.cli import main
from mmdata.prep.pipeline import preprocess
from mmdata.prep.members import MEMBERS_DIR
from mmdata.prep.store import STORE, StoreBusy, _locked, collect, preprocess_lease

QUIET = {"log": lambda _: None}


def entries(root: Path) -> set[str]:
    """The partition entries in the store."""
    return {p.name for p in (root / STORE).iterdir() if p.is_dir() and p.name != MEMBERS_DIR}


def member_entries(root: Path) -> set[str]:
    return {p.name for p in (root / STORE / MEMBERS_DIR).iterdir() if p.is_dir()}


def listed(dataset: str) -> set[str]:
    return {s["fingerprint"] for s in json.loads((Path(dataset) / "dataset.json").read_text())["shards"]}


def members_used(root: Path, dataset: str) -> set[str]:
    """The member entries a dataset's partitions were assembled from."""
    return {f"{m['group']}-{m['key']}" for fp in listed(dataset)
            for m in json.loads((root / STORE / fp / "summary.json").read_text())["members"]}


@pytest.fixture()
def two_datasets(demo_dir, tmp_path):
    """One root, two datasets that share no partition (32 px and 48 px images)."""
    root = tmp_path / "out"
    small = preprocess(preprocess_config(demo_dir / "manifest.jsonl", root), **QUIET)
    large = preprocess(preprocess_config(demo_dir / "manifest.jsonl", root, "image.size=48", "output.name=big"),
                       **QUIET)
    assert listed(small.dataset).isdisjoint(listed(large.dataset))
    # they share the text and audio members; each has its own image members
    only_small = members_used(root, small.dataset) - members_used(root, large.dataset)
    assert len(only_small) == 4 and all(name.startswith("image-") for name in only_small)
    return root, small, large, listed(small.dataset)


def small_only_members(root: Path, small, large) -> set[str]:
    return members_used(root, small.dataset) - members_used(root, large.dataset)


def test_gc_removes_exactly_the_entries_of_a_deleted_dataset(two_datasets, demo_dir, capsys):
    root, small, large, small_entries = two_datasets
    kept_files = dataset_files(large.dataset)
    large_members = members_used(root, large.dataset)
    shutil.rmtree(small.dataset)
    assert main(["gc", str(root)]) == 0
    out = capsys.readouterr().out
    assert entries(root) == listed(large.dataset)
    assert member_entries(root) == large_members   # the small one's image members went; the shared ones stay
    assert "removed 8 unused entries" in out
    assert "kept 4 used by 1 finished datasets and the 16 member entries they were assembled from" in out
    freed = float(out.split("freed ")[1].split(" MB")[0])
    assert freed > 0.1   # the deleted dataset's shards: their only links were in the store
    assert dataset_files(large.dataset) == kept_files
    again = preprocess(preprocess_config(demo_dir / "manifest.jsonl", root, "image.size=48", "output.name=big"),
                       **QUIET)
    assert again.reused_dataset and again.partitions_built == 0


def test_dry_run_lists_and_removes_nothing(two_datasets, capsys):
    root, small, large, small_entries = two_datasets
    only_small = small_only_members(root, small, large)
    shutil.rmtree(small.dataset)
    before = entries(root), member_entries(root)
    assert main(["gc", str(root), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert (entries(root), member_entries(root)) == before
    assert {line.split(".store/")[1].split()[0] for line in out.splitlines() if line.startswith("would remove .store/")} \
        == small_entries | {f"{MEMBERS_DIR}/{name}" for name in only_small}


def test_keep_days_keeps_recent_unused_entries(two_datasets):
    root, small, large, small_entries = two_datasets
    shutil.rmtree(small.dataset)
    old, recent = sorted(small_entries)[:2], sorted(small_entries)[2:]
    month_ago = time.time() - 30 * 86400
    for name in old:
        for path in (root / STORE / name).rglob("*"):
            os.utime(path, (month_ago, month_ago))
    result = collect(str(root), keep_days=7)
    assert sorted(e for e, _ in result.removed) == old
    # the image members of the two old entries were written just now; the recent entries keep theirs in use
    assert result.recent == len(recent) + 2 and result.members_in_use == 16 + 2
    assert entries(root) == listed(large.dataset) | set(recent)


def test_a_dataset_being_assembled_does_not_protect_entries_but_keeps_its_bytes(two_datasets):
    root, small, large, small_entries = two_datasets
    only_small = small_only_members(root, small, large)
    (Path(small.dataset) / "dataset.json").unlink()   # an assembly cut short: not a finished dataset
    files = [p for e in small_entries for p in (root / STORE / e).rglob("*") if p.is_file()]
    files += [p for e in only_small for p in (root / STORE / MEMBERS_DIR / e).rglob("*") if p.is_file()]
    linked = [p for p in files if p.suffix in (".tar", ".parquet")]
    assert linked and all(p.stat().st_nlink == 2 for p in linked)
    unlinked_bytes = sum(p.stat().st_size for p in files if p not in linked)   # summaries, errors, members
    result = collect(str(root))
    assert {e for e, _ in result.removed} == small_entries | {f"{MEMBERS_DIR}/{name}" for name in only_small}
    assert result.freed == unlinked_bytes   # the shards and indexes live on in the unfinished folder
    assert all((Path(small.dataset) / f"shard-{k:06d}.tar").exists() for k in range(4))


def test_an_unreadable_dataset_json_stops_gc_naming_it(two_datasets, capsys):
    root, small, _, small_entries = two_datasets
    (Path(small.dataset) / "dataset.json").write_text("{not json")
    before = entries(root)
    assert main(["gc", str(root)]) == 2
    err = capsys.readouterr().err
    assert "dataset.json: cannot read its shard list" in err and "Traceback" not in err
    assert entries(root) == before


def test_gc_refuses_while_a_preprocess_holds_the_store(two_datasets, capsys):
    root, small, _, small_entries = two_datasets
    shutil.rmtree(small.dataset)
    before = entries(root)
    with preprocess_lease(str(root), **QUIET):
        with pytest.raises(StoreBusy):
            collect(str(root))
        assert main(["gc", str(root)]) == 1
    assert "a preprocess is running in" in capsys.readouterr().err
    assert entries(root) == before
    assert collect(str(root)).removed   # the run has ended: gc goes ahead


def test_a_preprocess_waits_for_a_running_gc(demo_dir, tmp_path):
    root = tmp_path / "out"
    (root / STORE).mkdir(parents=True)
    said, done = [], threading.Event()

    def run():
        preprocess(preprocess_config(demo_dir / "manifest.jsonl", root), log=said.append)
        done.set()

    with _locked(str(root), exclusive=True, wait=False):   # what gc holds while it works
        worker = threading.Thread(target=run)
        worker.start()
        deadline = time.monotonic() + 60
        while not said and time.monotonic() < deadline:
            time.sleep(0.05)
        assert said == [f"waiting for mmdata gc to finish in {root}"] and not done.is_set()
    worker.join(timeout=120)
    assert done.is_set() and len(entries(root)) == 4


def test_gc_is_refused_during_a_real_run_and_after_it_removes_nothing_in_use(demo_dir, tmp_path):
    rows = [json.loads(line) for line in (demo_dir / "manifest.jsonl").read_text().splitlines()]
    rows = [{**r, "id": f"{r['id']}-{i}", "image": str(demo_dir / r["image"]) if r.get("image") else None,
             "audio": str(demo_dir / r["audio"]) if r.get("audio") else None} for i, r in enumerate(rows * 4)]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = tmp_path / "c.yaml"
    config.write_text(f"input: {{manifest: {manifest}}}\noutput: {{root: {tmp_path / 'out'}, name: t, "
                      "samples_per_shard: 8}\nray: {executor: serial}\nprogress: false\ntext: {vocab_size: 128}\n"
                      "image: {size: 32}\naudio: {n_mels: 32, max_seconds: 2.0}\n")
    proc = subprocess.Popen([sys.executable, "-m", "mmdata", "preprocess", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    store = tmp_path / "out" / STORE
    deadline = time.monotonic() + 120
    while not list(store.glob("*/summary.json")) and time.monotonic() < deadline:
        time.sleep(0.05)
    refused = proc.poll() is None and pytest.raises(StoreBusy, collect, str(tmp_path / "out"))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert refused   # the run was still going when gc tried
    result = collect(str(tmp_path / "out"))
    assert result.removed == [] and result.in_use == len(entries(tmp_path / "out")) == 24
    # the input is the demo four times under new ids: every 6th partition has the same texts and files, so
    # the same members (6 x text, image, audio and its waveform), computed once
    assert result.members_in_use == len(member_entries(tmp_path / "out")) == 24


def test_drop_members_frees_the_member_cache_and_keeps_every_dataset_whole(two_datasets, demo_dir, capsys):
    root, small, large, _ = two_datasets
    files = dataset_files(small.dataset), dataset_files(large.dataset)
    assert main(["gc", str(root), "--drop-members"]) == 0
    assert "removed 20 unused entries" in capsys.readouterr().out   # 16 + the small one's 4 image entries
    assert member_entries(root) == set() and entries(root) == listed(small.dataset) | listed(large.dataset)
    assert (dataset_files(small.dataset), dataset_files(large.dataset)) == files
    again = preprocess(preprocess_config(demo_dir / "manifest.jsonl", root), **QUIET)
    assert again.reused_dataset and again.partitions_built == 0
    # with no cache, a change of one modality recomputes them all
    changed = preprocess(preprocess_config(demo_dir / "manifest.jsonl", root, "image.size=40"), **QUIET)
    assert changed.partitions_built == 4 and len(member_entries(root)) == 16
