"""One shard checked against its index: its bytes mapped or read, its index read and checked (index.py), the
index's members located in the tar (tar.py) and their payloads checked (members.py), in a capped report."""

from __future__ import annotations

import contextlib
import io
import mmap
import os
import stat
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq

from mmdata import storage
from mmdata.dataset import DatasetDescription, ShardInfo
from mmdata.verify.index import Rows, check_columns, check_index
from mmdata.verify.members import check_payloads
from mmdata.schema import index_name, one_line
from mmdata.verify.tar import locate_members, walk_tar


def verify_shard(d: DatasetDescription, shard: ShardInfo, options: dict | None = None
                 ) -> tuple[list[str], int, Counter]:
    """Check one shard and its index: (problems, samples in the index, counts of bytes read and modalities).

    One shard at a time, whole: a local shard is mapped (the page cache, nothing copied), a remote one is read
    into memory, so memory is one shard (bounded by ``output.max_shard_bytes`` or ``samples_per_shard``), not
    the dataset. The index's byte ranges are checked against the tar headers all at once, then every
    member's crc32 (format v2) and structure against its index row.
    """
    options = options or {}
    try:
        with shard_bytes(d.shard_url(shard), options, shard.bytes) as data:
            return check_shard(d, shard, data, options)
    except FileNotFoundError:
        return [f"{shard.name}: missing (dataset.json lists it); rebuild the dataset"], 0, Counter()
    except storage.TooLarge:
        return [f"{shard.name}: larger than the {shard.bytes} bytes dataset.json says (not read further); "
                f"it was replaced: rebuild the dataset"], 0, Counter()


@contextlib.contextmanager
def shard_bytes(url: str, options: dict, expected: int):
    """A shard's bytes: a read-only mapping of a local file (no copy: the page cache), else read whole,
    at most ``expected`` bytes of it (more raises storage.TooLarge: a replaced object can be any size)."""
    if not storage.is_local(url):
        yield storage.read_bytes(url, options, limit=expected)
        return
    regular(url)
    with open(storage.local_path(url), "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if os.fstat(f.fileno()).st_size else None
    if mapped is None:
        yield b""
        return
    try:
        yield mapped
    finally:
        with contextlib.suppress(BufferError):   # a view outlived the check (an exception's frame): GC unmaps
            mapped.close()


def check_shard(d: DatasetDescription, shard: ShardInfo, data, options: dict) -> tuple[list[str], int, Counter]:
    name, index = shard.name, index_name(shard.name)
    seen = Counter(bytes=len(data))
    problems = []
    if len(data) != shard.bytes:
        problems.append(f"{name}: {len(data)} bytes, dataset.json says {shard.bytes}")
    try:
        table = pq.ParquetFile(io.BytesIO(read_file(d.index_url(shard), options))).read()
    except FileNotFoundError:
        return problems + [f"{index}: missing (dataset.json lists {name}); rebuild the dataset"], 0, seen
    except (pa.ArrowException, OSError) as e:
        return problems + [f"{index}: not a readable Parquet file ({one_line(e)}); rebuild the dataset"], 0, seen
    unreadable = check_columns(index, table, d.format_version)   # the index cannot be used: walk the tar alone
    if unreadable:
        return capped(name, problems + unreadable + walk_tar(name, data)[2]), table.num_rows, seen
    rows = Rows.of(table, d.format_version >= 2)
    if rows.n != shard.samples:
        problems.append(f"{index}: {rows.n} samples, dataset.json says {shard.samples} for {name}")
    problems += check_index(name, index, rows, seen)
    located, tar_problems = locate_members(name, index, data, rows)
    problems += tar_problems
    problems += check_payloads(d, name, index, data, rows, located)
    return capped(name, problems), rows.n, seen


def regular(url: str) -> None:
    """OSError unless a local ``url`` is a regular file (a FIFO or a device would block or never end)."""
    if storage.is_local(url):
        mode = os.stat(storage.local_path(url)).st_mode   # FileNotFoundError when missing
        if not stat.S_ISREG(mode):
            raise OSError(f"{url} is not a regular file")


def read_file(url: str, options: dict) -> bytes:
    """An index, the tokenizer or errors.jsonl: capped far above any that mmdata writes."""
    regular(url)
    return storage.read_bytes(url, options, storage.MAX_METADATA_BYTES)


def capped(shard: str, problems: list[str], most: int = 20) -> list[str]:
    """At most ``most`` lines per shard: a badly damaged shard is reported, not dumped."""
    if len(problems) <= most:
        return problems
    return problems[:most] + [f"{shard}: ... and {len(problems) - most} more problems"]
