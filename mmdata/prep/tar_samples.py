"""WebDataset tars -> samples (key, members, problem), streamed member by member.

Damage of every kind (a truncated or garbled header, corrupt compressed data, data after the end marker) ends
a tar with one corrupt_tar problem instead of quietly dropping its rest; sources.py turns samples into Records.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import posixpath
import tarfile
import zlib
from typing import Iterator

import fsspec

from mmdata.prep import manifests   # the input limits, read at call time (a test lowers them there)
from mmdata.prep.manifests import RowError, printable
from mmdata.schema import one_line


class StrictTarInfo(tarfile.TarInfo):
    """tarfile ends a streamed archive quietly at a truncated or damaged header after the first one, which
    would drop the rest of the tar without a word: here that is an error (a ReadError)."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError, tarfile.InvalidHeaderError) as e:
            if tar.offset == 0:
                raise   # tarfile's own "empty file" / "not a tar"
            if isinstance(e, tarfile.EmptyHeaderError):
                raise tarfile.ReadError("it ends without an end-of-archive marker (truncated?)") from None
            raise tarfile.ReadError(f"damaged header at byte {tar.offset} ({one_line(e)})") from None


def iter_tar_samples(url: str, storage_options: dict) -> Iterator[tuple[str | None, dict[str, bytes],
                                                                       RowError | None]]:
    """Group consecutive tar members by key (WebDataset convention: key = name up to the first dot).

    Yields (key, members, problem). A member twice in one sample or over MAX_TAR_MEMBER_BYTES (manifests.py)
    is the sample's problem. A truncated or damaged tar ends with one more item, (the key of the sample it
    was reading or None, its members, RowError("corrupt_tar")): the samples before the damage are kept,
    the one it cut may be incomplete and is rejected, and the next tar is read as usual.
    """
    key, members, problem, kept = None, {}, None, 0
    max_bytes = manifests.MAX_TAR_MEMBER_BYTES
    try:
        with fsspec.open(url, "rb", **storage_options) as f, \
                tarfile.open(fileobj=tar_stream(f), mode="r|", tarinfo=StrictTarInfo) as tar:
            for info in tar:
                tar.members = []   # streaming: keep no list of every header read
                if not info.isfile():
                    continue
                base = posixpath.basename(info.name)
                if "." not in base:
                    continue
                prefix, suffix = info.name[: len(info.name) - len(base)], base.split(".", 1)
                member_key, ext = prefix + suffix[0], suffix[1].lower()
                if member_key != key and key is not None:
                    yield key, members, problem
                    kept, members, problem = kept + 1, {}, None
                key = member_key
                name = printable(info.name)[:200]
                if ext in members:
                    problem = problem or RowError("bad_row", f"member {name} appears twice in a row in tar {url}")
                elif info.size > max_bytes:
                    problem = problem or RowError("file_too_large", f"member {name} of tar {url} has {info.size} "
                                                                    f"bytes, over the limit of {max_bytes}")
                else:
                    members[ext] = tar.extractfile(info).read()
            trailing = data_after_end(tar.fileobj)
    except (tarfile.TarError, EOFError, OSError, ValueError, zlib.error, lzma.LZMAError) as e:
        yield key, members, RowError("corrupt_tar", tar_damage(url, one_line(e), kept, key))
        return
    if key is not None:   # the archive ended cleanly after it: complete
        yield key, members, problem
        kept += 1
    if trailing:
        yield None, {}, RowError("corrupt_tar", tar_damage(url, "there is data after its end-of-archive marker "
                                                               "(a zeroed block inside it, or tars joined)", kept))


def tar_damage(url: str, what: str, kept: int, cut: str | None = None) -> str:
    message = f"tar {url} is damaged or truncated: {what}; the {kept} sample(s) read before that are kept"
    if cut is not None:
        message += f"; sample {printable(cut)[:200]!r}, which it cuts, may be incomplete and is rejected"
    return message


def tar_stream(f):
    """A tar's bytes, decompressed when they are gzip, bzip2 or xz (told by magic number, as tarfile's r|* does)
    through the decompressors' own file objects: unlike tarfile's stream they check the data's checksums, so
    corrupt compressed data is an error rather than silently different bytes."""
    head = f.read(6)
    raw = io.BufferedReader(Rewound(head, f), buffer_size=1 << 20)
    if head.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if head.startswith(b"BZh"):
        return bz2.BZ2File(raw)
    if head.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMAFile(raw)
    return raw


class Rewound(io.RawIOBase):
    """A stream with the bytes already read from it (to sniff them) put back in front; no seeking needed."""

    def __init__(self, head: bytes, stream):
        self.head, self.stream = head, stream

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.head:
            n = min(len(buffer), len(self.head))
            buffer[:n], self.head = self.head[:n], self.head[n:]
            return n
        data = self.stream.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)


def data_after_end(stream) -> bool:
    """Whether anything but zeros follows the end-of-archive marker (read in bounded chunks, stopping at the
    first non-zero one): a zeroed block looks like the end to tarfile, which then stops quietly."""
    while True:
        chunk = stream.read(1 << 16)
        if not chunk:
            return False
        if chunk.count(0) != len(chunk):
            return True
