"""The store, ``<output.root>/.store/``: who may use it at once, and ``mmdata gc``, which removes the entries
no finished dataset in the root uses.

    .store/<partition fingerprint>/     a built partition: shards, index, errors.jsonl, summary.json (last)
    .store/members/<group>-<key>/       one modality's members for one partition (members.py)

Datasets hard-link their partitions' shards; a partition's summary.json lists the member entries it was
assembled from. gc keeps the partitions a finished dataset lists and the member entries those partitions list.

A run of ``mmdata preprocess`` holds a shared lock on ``.store/.lock`` from start to end (any number of runs
at once); gc takes it exclusively, so it never removes an entry that a running preprocess is about to reuse
or link, and a preprocess that starts during gc waits for it. The lock is ``flock``: the kernel drops it when
its process dies, SIGKILL included, so a killed run never blocks gc. Local roots only; on object storage
the store is not locked and gc is refused (a bucket's lifecycle rules do that job there).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from mmdata import storage
from mmdata.prep.members import MEMBERS_DIR, entry_name
from mmdata.schema import DATASET_JSON

STORE = ".store"
LOCK = ".lock"


class StoreBusy(Exception):
    """gc found a preprocess holding the store."""


@contextlib.contextmanager
def preprocess_lease(root: str, log: Callable[[str], None] = print) -> Iterator[None]:
    """Hold the store shared for a preprocess run (waiting, with a message, while gc holds it)."""
    with _locked(root, exclusive=False, wait=True, log=log):
        yield


@contextlib.contextmanager
def _locked(root: str, exclusive: bool, wait: bool, log: Callable[[str], None] = print) -> Iterator[None]:
    import fcntl
    if not storage.is_local(root):
        yield
        return
    folder = storage.local_path(root) / STORE
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                raise StoreBusy(f"a preprocess is running in {root} (it holds {folder / LOCK}); "
                                "run gc again when it has ended") from None
            log(f"waiting for mmdata gc to finish in {root}")
            fcntl.flock(fd, mode)
        yield
    finally:
        os.close(fd)   # releases the lock


@dataclass
class Collected:
    removed: list[tuple[str, int]] = field(default_factory=list)   # (entry, bytes freed), or that would be
    in_use: int = 0          # partition entries a finished dataset lists
    members_in_use: int = 0  # member entries those partitions were assembled from
    recent: int = 0          # unused entries kept for being younger than keep_days
    datasets: int = 0        # finished datasets in the root

    @property
    def freed(self) -> int:
        return sum(size for _, size in self.removed)


def collect(root: str, dry_run: bool = False, keep_days: float = 0.0, now: float | None = None,
            drop_members: bool = False) -> Collected:
    """Remove (or, ``dry_run``, list) the store entries that no finished dataset in ``root`` uses and that
    were last written more than ``keep_days`` ago; with ``drop_members``, every member entry too (the
    datasets stay whole; a later change of settings recomputes every modality). Raises StoreBusy while a
    preprocess holds the store, and ValueError for a root that is not a local folder or a dataset.json or
    summary.json it cannot read (gc would not know what is used)."""
    if not storage.is_local(root):
        raise ValueError(f"{root}: gc works on local roots only; on object storage, expire {STORE}/ entries "
                         "with the bucket's lifecycle rules")
    base = storage.local_path(root)
    if not (base / STORE).is_dir():
        raise ValueError(f"{root} has no {STORE}/ folder: not an output.root of mmdata preprocess")
    now = time.time() if now is None else now
    with _locked(root, exclusive=True, wait=False):
        used, datasets = used_entries(base)
        result, kept = Collected(datasets=datasets), []

        def remove(entry: Path, name: str) -> None:
            result.removed.append((name, bytes_freed(entry)))
            if not dry_run:
                shutil.rmtree(entry)

        for entry in folders(base / STORE):
            if entry.name == MEMBERS_DIR:
                continue
            if entry.name in used or now - last_written(entry) < keep_days * 86400:
                result.in_use += entry.name in used
                result.recent += entry.name not in used
                kept.append(entry)
            else:
                remove(entry, entry.name)
        members = member_entries(kept)
        for entry in folders(base / STORE / MEMBERS_DIR):
            name = f"{MEMBERS_DIR}/{entry.name}"
            if drop_members:
                remove(entry, name)
            elif entry.name in members:
                result.members_in_use += 1
            elif now - last_written(entry) < keep_days * 86400:
                result.recent += 1
            else:
                remove(entry, name)
        return result


def folders(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.is_symlink()) if path.is_dir() else []


def member_entries(partitions: list[Path]) -> set[str]:
    """The member entries the finished ones of these partition entries list in their summary.json."""
    names = set()
    for entry in partitions:
        summary = entry / "summary.json"
        if not summary.is_file():
            continue   # not finished: it lists nothing yet
        try:
            names.update(entry_name(m["group"], m["key"]) for m in json.loads(summary.read_bytes()).get("members", ()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{summary}: cannot read its member list ({type(e).__name__}: {e}); remove that "
                             "store entry (it is rebuilt when needed) before gc") from None
    return names


def used_entries(base: Path) -> tuple[set[str], int]:
    """The store entries (partition fingerprints) the finished datasets in ``base`` list, and how many such
    datasets there are. A folder without dataset.json is not finished: its hard links keep their bytes."""
    used, datasets = set(), 0
    for description in sorted(base.glob(f"*/{DATASET_JSON}")):
        if description.parent.name.startswith(".") or description.parent.is_symlink():
            continue   # the store itself; `<name>` links to a dataset listed under its own folder
        try:
            shards = json.loads(description.read_bytes())["shards"]
            used.update(str(shard["fingerprint"]) for shard in shards)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{description}: cannot read its shard list ({type(e).__name__}: {e}); fix or "
                             "remove that dataset before gc") from None
        datasets += 1
    return used, datasets


def last_written(entry: Path) -> float:
    """The newest modification time in a store entry (its summary.json is written last)."""
    return max((p.stat().st_mtime for p in entry.rglob("*")), default=entry.stat().st_mtime)


def bytes_freed(entry: Path) -> int:
    """Bytes that removing ``entry`` gives back: files no dataset folder hard-links too."""
    return sum(st.st_size for p in entry.rglob("*") if p.is_file() and (st := p.stat()).st_nlink == 1)
