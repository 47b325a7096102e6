"""Deterministic WebDataset tar writing, with a per-sample index as a side product.

Every header field that could vary between runs (mtime, uid/gid, names,
mode) is fixed, members are written in schema order, and the tar is written
under a temporary name and renamed when complete. While writing we know
each member's byte offset, so the Parquet index that lets readers seek to
any sample costs nothing extra; each member's CRC-32 (for ``mmdata verify``) is
one pass over bytes already in memory.
"""

from __future__ import annotations

import io
import os
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from mmdata.schema import MEMBER_ORDER, index_name, shard_name
from mmdata.storage import temp_path

INDEX_SCHEMA = pa.schema([
    ("shard", pa.string()),
    ("key", pa.string()),
    ("id", pa.string()),
    ("row", pa.int64()),
    ("offset", pa.int64()),        # byte offset of the sample's first tar header
    ("size", pa.int64()),          # bytes from that header to the end of the sample's last member
    # each member's extension, data byte range and CRC-32 (zlib.crc32) of its data; format v1 had no crc32
    ("members", pa.list_(pa.struct([("ext", pa.string()), ("offset", pa.int64()), ("size", pa.int64()),
                                    ("crc32", pa.uint32())]))),
    ("has_text", pa.bool_()),
    ("has_image", pa.bool_()),
    ("has_audio", pa.bool_()),
    ("n_tokens", pa.int32()),
    ("image_width", pa.int32()),
    ("image_height", pa.int32()),
    ("audio_frames", pa.int32()),
    ("label", pa.int64()),
])


def tar_info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def member_order(ext: str) -> int:
    return MEMBER_ORDER.index(ext) if ext in MEMBER_ORDER else len(MEMBER_ORDER)


@dataclass
class ShardWriter:
    """Writes samples of partition ``partition`` into ``out_dir``; splits at ``max_bytes``.

    Files appear under their final names only when complete (tmp + rename).
    """
    out_dir: Path
    partition: int
    max_bytes: int = 0
    shards: list[dict] = field(default_factory=list)   # {"name", "samples", "bytes"} per finished shard
    _tar: tarfile.TarFile | None = None
    _file: io.BufferedWriter | None = None
    _rows: list[dict] = field(default_factory=list)

    def write(self, key: str, members: dict[str, bytes], index: dict) -> None:
        """Add one sample. ``index`` holds the per-sample columns other than shard/key/offsets."""
        size = sum(512 + -(-len(v) // 512) * 512 for v in members.values())
        if self._tar is not None and self.max_bytes and self._rows and self._tar.offset + size > self.max_bytes:
            self._finish()
        if self._tar is None:
            self._open()
        start, placed = self._tar.offset, []
        for ext in sorted(members, key=lambda e: (member_order(e), e)):
            data = members[ext]
            header = self._tar.offset
            self._tar.addfile(tar_info(f"{key}.{ext}", len(data)), io.BytesIO(data))
            placed.append({"ext": ext, "offset": header + 512, "size": len(data), "crc32": zlib.crc32(data)})
        end = placed[-1]["offset"] + placed[-1]["size"]
        self._rows.append({"shard": self._name, "key": key, "offset": start, "size": end - start,
                           "members": placed, **index})

    def close(self) -> list[dict]:
        """Finish the open shard (an empty partition still gets one empty shard); returns shard list."""
        if self._tar is None and not self.shards:
            self._open()
        if self._tar is not None:
            self._finish()
        return self.shards

    def abort(self) -> None:
        """Drop the shard being written (an error or a signal stopped the partition): no temp file stays."""
        if self._file is not None:
            self._file.close()
            self._tmp.unlink(missing_ok=True)
        self._tar, self._file, self._rows = None, None, []

    def _open(self) -> None:
        self._name = shard_name(self.partition, len(self.shards))
        self._tmp = temp_path(self.out_dir / self._name)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self._tmp, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)

    def _finish(self) -> None:
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        size = self._tmp.stat().st_size
        write_index(self.out_dir / index_name(self._name), self._rows)
        os.replace(self._tmp, self.out_dir / self._name)
        self.shards.append({"name": self._name, "samples": len(self._rows), "bytes": size})
        self._tar, self._file, self._rows = None, None, []


def write_index(path: Path, rows: list[dict]) -> None:
    columns = {name: [row.get(name) for row in rows] for name in INDEX_SCHEMA.names}
    table = pa.Table.from_pydict(columns, schema=INDEX_SCHEMA)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        # no statistics/page index timestamps: pyarrow output is byte-stable for the same table
        pq.write_table(table, tmp, compression="zstd", write_statistics=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)

