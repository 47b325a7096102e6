"""Rows that repeat an earlier row's id, found in bounded memory (the driver's scan; see pipeline.py).

A Python set of 64-bit id hashes costs 60-70 bytes per id: ~28 GB at 400M rows. Here each row is an entry
(id hash, row, tag) of 20 bytes in array buffers, kept in memory up to ``memory_rows`` entries; beyond that
every ``chunk_rows`` entries are spilled to ``buckets`` files in a temporary folder, split by the hash's top
bits so that equal hashes always meet in one bucket. ``finish`` sorts the entries in memory, or one bucket
at a time, by (hash, row): an entry whose hash equals the previous one's repeats an earlier row's id, and the
first (smallest) row of each hash is the one kept.

Memory at most, whatever the number of rows: ~45 bytes per entry held at once while sorting (``peak_rows``:
``memory_rows``, or the largest bucket, about rows / ``buckets``), plus 8 bytes per duplicate row in the
result. Defaults: up to 4M rows stay in memory (~80 MB of buffers, ~170 MB while sorting); past that, temp
files of 20 bytes per row (8 GB at 400M rows) and one bucket in memory at a time (~1.6M entries at 400M
rows, ~70 MB while sorting).

The tag is an unsigned 32-bit number per row that the caller chooses; ``finish`` reports the distinct tags of
the rows kept, so that what the scan collects of a row (its label, its modalities) can count only when the
row turns out not to be a duplicate, without holding anything else per row.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from array import array
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmdata.storage import process_alive

FOLDER_PREFIX = "mmdata-ids-"   # + <host>-<pid>-<random>: whose folder it is, so a killed run's can be swept
ENTRY = np.dtype([("hash", "<u8"), ("row", "<i8"), ("tag", "<u4")])   # packed: 20 bytes per row on disk


@dataclass
class Repeats:
    rows: np.ndarray     # sorted int64: every row whose id hash an earlier row had
    kept_tags: set[int]  # the distinct tags of the rows kept (each hash's first row)


class DuplicateFinder:
    """Fed ``add(id_hash, row, tag)`` once per row, rows increasing; ``finish()`` -> :class:`Repeats`.

    Use it as a context manager: the temporary folder goes on leaving the block, also on an error or
    KeyboardInterrupt (``finish`` empties it as it reads the buckets)."""

    def __init__(self, memory_rows: int = 4 << 20, chunk_rows: int = 1 << 20, buckets: int = 256,
                 temp_dir: str | None = None):
        if not 0 < chunk_rows <= memory_rows:
            raise ValueError(f"need 0 < chunk_rows <= memory_rows; got {chunk_rows}, {memory_rows}")
        if buckets < 2 or buckets & (buckets - 1) or buckets > 1 << 16:
            raise ValueError(f"buckets must be a power of two from 2 to 65536; got {buckets}")
        self.memory_rows, self.chunk_rows, self.buckets, self.temp_dir = memory_rows, chunk_rows, buckets, temp_dir
        self.hashes, self.rows, self.tags = array("Q"), array("q"), array("I")   # raw 8 + 8 + 4 bytes per row
        self.limit = memory_rows     # buffered entries that trigger a spill: chunk_rows once spilling began
        self.folder: str | None = None   # the bucket files' folder, made at the first spill
        self.peak_rows = 0           # the most entries held in memory at once (buffers, or one bucket)
        self.spilled_rows = 0        # entries written to bucket files

    def __enter__(self) -> "DuplicateFinder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Remove the temporary folder (bucket files included)."""
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None

    def add(self, id_hash: int, row: int, tag: int = 0) -> None:
        self.hashes.append(id_hash)
        self.rows.append(row)
        self.tags.append(tag)
        if len(self.rows) == self.limit:
            self.peak_rows = max(self.peak_rows, self.limit)
            self.spill()

    def spill(self) -> None:
        """Append the buffered entries to their buckets' files, ``chunk_rows`` at a time, and empty the buffers."""
        if self.folder is None:
            remove_stale_folders(self.temp_dir)
            self.folder = tempfile.mkdtemp(prefix=f"{FOLDER_PREFIX}{socket.gethostname()}-{os.getpid()}-",
                                           dir=self.temp_dir)
        hashes, rows, tags = self.buffered()
        shift = np.uint64(64 - self.buckets.bit_length() + 1)   # the top log2(buckets) bits name the bucket
        for start in range(0, len(hashes), self.chunk_rows):
            chunk = np.empty(min(self.chunk_rows, len(hashes) - start), ENTRY)
            end = start + len(chunk)
            chunk["hash"], chunk["row"], chunk["tag"] = hashes[start:end], rows[start:end], tags[start:end]
            bucket = (chunk["hash"] >> shift).astype(np.uint16)
            order = np.argsort(bucket, kind="stable")   # a radix sort for 16-bit keys; rows stay in order
            chunk, bounds = chunk[order], np.searchsorted(bucket[order], np.arange(self.buckets + 1))
            for b in np.flatnonzero(np.diff(bounds)):
                with open(self.bucket_path(b), "ab") as f:
                    chunk[bounds[b]:bounds[b + 1]].tofile(f)
            self.spilled_rows += len(chunk)
        self.hashes, self.rows, self.tags = array("Q"), array("q"), array("I")
        self.limit = self.chunk_rows

    def buffered(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The buffered entries as numpy views (no copy)."""
        return (np.frombuffer(self.hashes, np.uint64), np.frombuffer(self.rows, np.int64),
                np.frombuffer(self.tags, np.uint32))

    def bucket_path(self, bucket: int) -> str:
        return os.path.join(self.folder, f"{bucket:05d}.bin")

    def finish(self) -> Repeats:
        """Every repeating row and the tags of the rows kept; the temporary folder is emptied and removed."""
        self.peak_rows = max(self.peak_rows, len(self.rows))
        if self.folder is None:
            found = [find_repeats(*self.buffered())]
        else:
            self.spill()
            found = []
            for b in range(self.buckets):
                path = self.bucket_path(b)
                if os.path.exists(path):
                    entries = np.fromfile(path, ENTRY)
                    os.remove(path)
                    self.peak_rows = max(self.peak_rows, len(entries))
                    found.append(find_repeats(entries["hash"], entries["row"], entries["tag"]))
                    del entries   # before the next bucket is read: one in memory at a time
            self.close()
        self.hashes, self.rows, self.tags = array("Q"), array("q"), array("I")
        rows = np.sort(np.concatenate([np.empty(0, np.int64), *(r for r, _ in found)]))
        return Repeats(rows, {int(t) for _, tags in found for t in tags})


def find_repeats(hashes: np.ndarray, rows: np.ndarray, tags: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows whose hash an earlier row had, distinct tags of each hash's first row) among these entries."""
    order = np.lexsort((rows, hashes))
    sorted_hashes = hashes[order]
    first = np.ones(len(order), bool)
    first[1:] = sorted_hashes[1:] != sorted_hashes[:-1]
    del sorted_hashes   # freed first: the gathers below need an index-sized array of their own
    return rows[order[~first]], np.unique(tags[order[first]])


def duplicates_between(duplicates: np.ndarray, first: int, last: int) -> set[int]:
    """The rows of sorted ``duplicates`` in [first, last]: one partition's, by two binary searches."""
    start, end = np.searchsorted(duplicates, first, "left"), np.searchsorted(duplicates, last, "right")
    return set(duplicates[start:end].tolist())


def remove_stale_folders(temp_dir: str | None) -> None:
    """Remove the bucket folders that runs of this host left when they were killed (SIGKILL, power loss):
    those whose owner process is no longer running. Live runs' folders, and other hosts', are kept."""
    host = socket.gethostname()
    for folder in Path(temp_dir or tempfile.gettempdir()).glob(f"{FOLDER_PREFIX}*"):
        owner = folder.name[len(FOLDER_PREFIX):].rsplit("-", 2)
        if len(owner) == 3 and owner[0] == host and owner[1].isdigit() and not process_alive(int(owner[1])):
            shutil.rmtree(folder, ignore_errors=True)
