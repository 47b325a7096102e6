"""Repeated ids in bounded memory: the same rows as a Python set finds, the first occurrence kept, in memory or
spilled to bucket files that never outlive the finder, with what is held at once bounded by its settings."""

from __future__ import annotations

import functools
import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from helpers import preprocess_config
from mmdata.prep import pipeline
from mmdata.prep.duplicates import DuplicateFinder, duplicates_between

IN_MEMORY = {}
SPILLING = {"memory_rows": 64, "chunk_rows": 16, "buckets": 8}   # spills after 64 rows, then every 16


def random_ids(n: int, distinct: int, seed: int) -> np.ndarray:
    """n 64-bit id hashes drawn from ``distinct`` values spread over the whole range: many repeats."""
    rng = np.random.default_rng(seed)
    values = rng.integers(0, 2**64, distinct, dtype=np.uint64, endpoint=False)
    values[:2] = 0, 2**64 - 1   # the extremes: the first and last bucket
    return values[rng.integers(0, distinct, n)]


def reference(hashes) -> list[int]:
    """What the scan did before: a Python set of the hashes seen."""
    seen, repeats = set(), []
    for row, h in enumerate(hashes):
        if h in seen:
            repeats.append(row)
        seen.add(h)
    return repeats


def find(hashes, tags=None, **settings):
    with DuplicateFinder(**settings) as finder:
        for row, h in enumerate(hashes.tolist()):
            finder.add(h, row, 0 if tags is None else tags[row])
        return finder, finder.finish()


@pytest.mark.parametrize("settings", [IN_MEMORY, SPILLING, {"memory_rows": 1, "chunk_rows": 1, "buckets": 2},
                                      {"memory_rows": 1000, "chunk_rows": 1000, "buckets": 256}])
@pytest.mark.parametrize("seed", range(3))
def test_the_rows_flagged_are_those_a_python_set_flags(settings, seed, tmp_path):
    hashes = random_ids(5000, distinct=[50, 1500, 4900][seed], seed=seed)
    finder, found = find(hashes, temp_dir=str(tmp_path), **settings)
    assert found.rows.dtype == np.int64 and found.rows.tolist() == reference(hashes.tolist())
    assert (finder.spilled_rows > 0) == (settings != IN_MEMORY and len(hashes) >= settings["memory_rows"])


@pytest.mark.parametrize("settings", [IN_MEMORY, SPILLING])
def test_the_first_occurrence_is_kept_and_reports_its_tag(settings, tmp_path):
    hashes = np.array([5, 7, 5, 2**63, 7, 5, 2**63, 9] * 20, np.uint64)
    tags = [1, 2, 3, 4, 5, 6, 7, 8] * 20   # tags 3, 5, 6, 7 only on repeats
    _, found = find(hashes, tags, temp_dir=str(tmp_path), **settings)
    assert found.rows.tolist() == [2, 4, 5, 6] + list(range(8, 160))
    assert found.kept_tags == {1, 2, 4, 8}


def test_no_rows_no_duplicates():
    _, found = find(np.array([], np.uint64))
    assert found.rows.tolist() == [] and found.kept_tags == set()


def test_a_partition_gets_its_duplicates_by_two_binary_searches():
    duplicates = np.array([3, 4, 10, 19, 20, 21, 40], np.int64)
    partitions = [(first, first + 9) for first in range(0, 50, 10)]   # rows 0-9, 10-19...
    assert [duplicates_between(duplicates, a, b) for a, b in partitions] == [{3, 4}, {10, 19}, {20, 21}, set(),
                                                                           {40}]
    assert duplicates_between(duplicates, 5, 9) == set() and duplicates_between(np.empty(0, np.int64), 0, 9) == set()
    assert all(type(row) is int for row in duplicates_between(duplicates, 0, 50))   # picklable plain ints


def test_bucket_files_live_in_a_temporary_folder_that_finish_removes(tmp_path):
    with DuplicateFinder(temp_dir=str(tmp_path), **SPILLING) as finder:
        for row in range(200):
            finder.add(row % 50 * 0x0123456789ABCDEF % 2**64, row)
        folder = Path(finder.folder)
        assert folder.parent == tmp_path and len(list(folder.iterdir())) > 1   # several buckets
        assert finder.finish().rows.tolist() == list(range(50, 200))
        assert not folder.exists()
    assert list(tmp_path.iterdir()) == []


def test_folders_left_by_killed_runs_of_this_host_are_swept_and_others_kept(tmp_path):
    import os
    import socket
    host = socket.gethostname()
    dead = tmp_path / f"mmdata-ids-{host}-{2**22 + 12345}-abc123"     # no such pid
    live = tmp_path / f"mmdata-ids-{host}-{os.getpid()}-def456"       # a run still going
    elsewhere = tmp_path / f"mmdata-ids-other-host-{2**22 + 12345}-ghi789"
    for folder in (dead, live, elsewhere):
        folder.mkdir()
        (folder / "bucket-0000").write_bytes(b"x" * 20)
    with DuplicateFinder(temp_dir=str(tmp_path), **SPILLING) as finder:
        for row in range(200):
            finder.add(row % 50 * 0x0123456789ABCDEF % 2**64, row)
        assert Path(finder.folder).name.startswith(f"mmdata-ids-{host}-{os.getpid()}-")
        assert finder.finish().rows.tolist() == list(range(50, 200))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, elsewhere.name])


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_the_temporary_folder_is_removed_when_the_scan_fails(error, tmp_path):
    with pytest.raises(error):
        with DuplicateFinder(temp_dir=str(tmp_path), **SPILLING) as finder:
            for row in range(200):
                finder.add(row * 0x9E3779B97F4A7C15 % 2**64, row)
            assert Path(finder.folder).is_dir()
            raise error()
    assert list(tmp_path.iterdir()) == []


def test_what_is_held_in_memory_is_bounded_by_the_settings_not_the_row_count(tmp_path):
    settings = {"memory_rows": 4096, "chunk_rows": 1024, "buckets": 64}
    rng = np.random.default_rng(7)
    hashes = rng.integers(0, 2**64, 200_000, dtype=np.uint64, endpoint=False)
    hashes[rng.integers(0, len(hashes), 2000)] = hashes[rng.integers(0, 1000, 2000)]   # ~1% repeat an id
    ids = hashes.tolist()
    bucket_sizes = np.bincount((hashes >> np.uint64(58)).astype(np.int64), minlength=64)   # top 6 bits
    find(hashes[:10])   # what numpy imports on first use is not the finder's
    tracemalloc.start()
    try:
        with DuplicateFinder(temp_dir=str(tmp_path), **settings) as finder:
            for row, h in enumerate(ids):
                finder.add(h, row)
            found = finder.finish()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert found.rows.tolist() == reference(ids)
    assert finder.spilled_rows == len(hashes)
    # held at once: the buffers (never past memory_rows, then chunk_rows) or the largest bucket being sorted
    assert finder.peak_rows == max(settings["memory_rows"], bucket_sizes.max()) <= len(hashes) // 40
    # ~60 bytes per entry held while sorting, 8 per duplicate row; a Python set of these ids takes ~10 MB
    assert peak < 64 * finder.peak_rows + 16 * len(found.rows) + (64 << 10)


def write_manifest(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.parametrize("settings", [IN_MEMORY, SPILLING])
def test_the_scan_collects_only_from_rows_kept_as_if_duplicates_were_skipped(settings, tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "DuplicateFinder", functools.partial(DuplicateFinder, temp_dir=str(tmp_path),
                                                                       **settings))
    rows = [{"id": "a", "text": "first a", "label": 1},
            {"id": "a", "text": "again a", "label": "cat", "audio": "a.wav"},   # its label, text, audio: ignored
            *({"id": f"r{i % 30}", "text": f"text {i}", "image": f"{i}.jpg", "label": 2} for i in range(100)),
            {"id": "b", "text": "last b", "label": 3}]
    config = preprocess_config(write_manifest(tmp_path / "m.jsonl", rows), tmp_path / "out",
                               "text.train_samples=40")
    scan = pipeline.scan_input(config)
    assert scan.rows == 103 and scan.duplicates.tolist() == [1, *range(32, 102)]
    assert scan.labels == {"1", "2", "3"} and not scan.named_labels and pipeline.label_mapping(scan) is None
    # the sample (40 texts + a reserve of 4) held 13 repeats: the texts missing were read again, after it
    assert scan.texts == ["first a", *(f"text {i}" for i in range(30)), "last b"]
    for _, records, duplicates in pipeline.iter_partitions(config, scan):
        assert duplicates == {r.row for r in records} & set(scan.duplicates.tolist())
