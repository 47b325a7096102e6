"""Deterministic WebDataset tar writing, with a per-sample index as a side product.

Every header field that could vary between runs (mtime, uid/gid, names,
mode) is fixed, members are written in schema order, and the tar is written
under a temporary name and renamed when complete. The headers are made here
(:func:`ustar_header`), not by ``tarfile``: the same bytes on every Python
(tarfile's device fields changed in a 3.11 patch release), and ~20x faster,
which matters when a shard is assembled from cached members at disk speed. While writing we know
each member's byte offset, so the Parquet index that lets readers seek to
any sample costs nothing extra; each member's CRC-32 (for ``mmdata verify``) is
one pass over bytes already in memory.
"""

from __future__ import annotations

import io
import os
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
    ("split", pa.string()),        # the input's split name (format v3), null when it gives none
])


BLOCK = 512
RECORD = 20 * BLOCK   # tar files end padded to a whole record, as tar and tarfile write them


# a USTAR header after the checksum field: type "0" (regular file), no link name, "ustar\0" "00", empty
# user and group names, empty device numbers (regular files have none), no prefix, padding to 512 bytes
_HEADER_TAIL = b"0" + bytes(100) + b"ustar\x0000" + bytes(32 + 32 + 8 + 8 + 155 + 12)
_MODE_IDS = b"0000444\x000000000\x000000000\x00"   # mode 0444, uid 0, gid 0
_MTIME = b"00000000000\0"
# the checksum is the sum of the header's bytes, its own field counted as 8 spaces
_FIXED_SUM = sum(_HEADER_TAIL) + sum(_MODE_IDS) + sum(_MTIME) + 8 * ord(" ")
_NULS = bytes(BLOCK)
MAX_MEMBER_BYTES = 8**11 - 1                     # what USTAR's 11 octal digits of size hold (8 GiB)


def ustar_header(name: str | bytes, size: int) -> bytes:
    """The 512-byte USTAR header of a member ``name`` of ``size`` bytes: mode 0444, uid/gid 0, mtime 0.
    Names are keys + extensions, ASCII and at most 75 bytes (schema.make_key), inside the 100-byte field."""
    raw = name.encode("utf-8") if isinstance(name, str) else name
    if len(raw) > 100 or not 0 <= size <= MAX_MEMBER_BYTES:
        raise ValueError(f"tar member {name!r} of {size} bytes does not fit a USTAR header")
    size_field = b"%011o\0" % size
    checksum = b"%06o\0 " % (_FIXED_SUM + sum(raw) + sum(size_field))
    return b"".join((raw, _NULS[len(raw):100], _MODE_IDS, size_field, _MTIME, checksum, _HEADER_TAIL))


_ORDER = {ext: i for i, ext in enumerate(MEMBER_ORDER)}


def _member_sort_key(ext: str) -> tuple[int, str]:
    return _ORDER.get(ext, len(MEMBER_ORDER)), ext


@dataclass
class ShardWriter:
    """Writes samples of partition ``partition`` into ``out_dir``; splits at ``max_bytes``.

    Files appear under their final names only when complete (tmp + rename).
    """
    out_dir: Path
    partition: int
    max_bytes: int = 0
    shards: list[dict] = field(default_factory=list)   # {"name", "samples", "bytes"} per finished shard
    _file: io.BufferedWriter | None = None
    _offset: int = 0
    _rows: list[dict] = field(default_factory=list)

    def write(self, key: str, members: dict[str, bytes | tuple[bytes | memoryview, int]], index: dict) -> None:
        """Add one sample: ``members`` by extension, each its bytes or (its bytes, their crc32) when known.
        ``index`` holds the per-sample columns other than shard/key/offsets."""
        pieces, placed, size, prefix = [], [], 0, key.encode("utf-8") + b"."
        for ext in sorted(members, key=_member_sort_key):
            data = members[ext]
            data, crc = data if isinstance(data, tuple) else (data, zlib.crc32(data))
            padding = -len(data) % BLOCK
            pieces += (ustar_header(prefix + ext.encode(), len(data)), data, _NULS[:padding])
            placed.append({"ext": ext, "offset": size + BLOCK, "size": len(data), "crc32": crc})
            size += BLOCK + len(data) + padding
        if self._file is not None and self.max_bytes and self._rows and self._offset + size > self.max_bytes:
            self._finish()
        if self._file is None:
            self._open()
        start = self._offset
        for member in placed:
            member["offset"] += start
        self._file.writelines(pieces)
        self._offset += size
        end = placed[-1]["offset"] + placed[-1]["size"]
        self._rows.append({"shard": self._name, "key": key, "offset": start, "size": end - start,
                           "members": placed, **index})

    def close(self) -> list[dict]:
        """Finish the open shard (an empty partition still gets one empty shard); returns shard list."""
        if self._file is None and not self.shards:
            self._open()
        if self._file is not None:
            self._finish()
        return self.shards

    def abort(self) -> None:
        """Drop the shard being written (an error or a signal stopped the partition): no temp file stays."""
        if self._file is not None:
            try:
                self._file.close()
            except OSError:   # flushing what was buffered fails again on a full disk: nothing to keep
                pass
            self._tmp.unlink(missing_ok=True)
        self._file, self._rows = None, []

    def _open(self) -> None:
        self._name = shard_name(self.partition, len(self.shards))
        self._tmp = temp_path(self.out_dir / self._name)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self._tmp, "wb", buffering=1 << 20)
        self._offset = 0

    def _finish(self) -> None:
        end = self._offset + 2 * BLOCK   # the end-of-archive marker: two zero blocks, then a whole record
        self._file.write(bytes(2 * BLOCK + -end % RECORD))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        size = self._tmp.stat().st_size
        write_index(self.out_dir / index_name(self._name), self._rows)
        os.replace(self._tmp, self.out_dir / self._name)
        self.shards.append({"name": self._name, "samples": len(self._rows), "bytes": size})
        self._file, self._rows = None, []


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

