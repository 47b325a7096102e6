"""``mmdata info`` and ``mmdata verify``: a dataset directory summarised, and re-read against its index.

verify checks what docs/format.md promises: every shard's tar structure, every member's byte range and
crc32 (format v2) against the index, each member's structure (JSON ids, npy headers and shapes, image
signatures, labels), the counts and sizes in dataset.json, the tokenizer's sha256, errors.jsonl, and
files that do not belong. It holds one shard in memory at a time; a member's bytes are checksummed,
never decoded (a .npy member's header is parsed, its array is not loaded), so it runs at disk speed.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import hashlib
import io
import json
import math
import mmap
import os
import re
import stat
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mmdata import storage
from mmdata.dataset import SHARD_NAME, WIDS_INDEX, DatasetDescription, ShardInfo, load_description
from mmdata.schema import (DATASET_JSON, ERRORS_JSONL, FLAC, IMAGE_EXTS, INDEX_DIR, JSON, LABEL, MEL, MEMBER_ORDER,
                           TEXT, TOKENS, index_name, one_line)
from mmdata.shards import INDEX_SCHEMA


def describe(dataset: str) -> str:
    """Human summary for ``mmdata info``."""
    d = load_description(dataset)
    t = d.totals
    lines = [
        f"dataset      {dataset}",
        f"fingerprint  {d.fingerprint}  (format v{d.format_version})",
        f"source       {source_text(d.source)}",
        f"samples      {t.written} written / {t.samples_in} input, {t.rejected} rejected",
        f"shards       {t.shards}, {t.bytes / 1e6:.1f} MB",
        "modalities   " + ", ".join(f"{m} {n}" for m, n in t.modalities.items()),
        f"tokenizer    {d.tokenizer.file} (vocab {d.tokenizer.vocab_size})",
    ]
    if d.labels:
        lines.append("labels       " + ", ".join(f"{name}={i}" for name, i in d.labels.items()))
    if t.errors_by_reason:
        lines.append("errors       " + ", ".join(f"{r} {n}" for r, n in t.errors_by_reason.items())
                     + f"  (details: {ERRORS_JSONL})")
    return "\n".join(lines)


@dataclass
class Report:
    """What ``mmdata verify`` found: problems (each one line naming the file), notes, and what was read."""
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)     # limits of the check, not problems
    samples: int = 0
    bytes: int = 0                                      # shard bytes read and checked
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        rate = self.bytes / 1e6 / max(self.seconds, 1e-9)
        return (f"{self.samples} samples, {self.bytes / 1e6:.1f} MB checked in {self.seconds:.2f} s "
                f"({rate:.0f} MB/s), {len(self.problems)} problems: {'OK' if self.ok else 'UNHEALTHY'}")


def source_text(source: dict) -> str:
    tars = source.get("tars")
    return str(source.get("manifest") or (", ".join(map(str, tars)) if isinstance(tars, list) else tars or ""))


def verify(dataset: str) -> tuple[list[str], int]:
    """Re-read every shard and check it against the index and dataset.json.

    Returns (problems, samples checked); no problems means healthy. ``check_dataset`` has the details.
    """
    report = check_dataset(dataset)
    return report.problems, report.samples


def check_dataset(dataset: str, storage_options: dict | None = None) -> Report:
    """Every check ``mmdata verify`` makes (docs/format.md lists them), one shard in memory at a time.

    Raises DatasetError only when dataset.json itself cannot be read; everything else is a problem.
    """
    start = time.perf_counter()
    options = storage_options or {}
    d = load_description(dataset, options)
    report = Report()
    if d.format_version < 2:
        report.notes.append(f"format v{d.format_version} dataset: member checksums are not available (the index "
                            "has them from format v2 on), so changed bytes inside members are not detected; "
                            "every other check ran")
    modalities_seen = Counter()
    for shard in d.shards:
        try:
            problems, n, seen = verify_shard(d, shard, options)
        except Exception as e:  # an unreadable shard is a finding, not a crash
            problems, n, seen = [f"{shard.name}: cannot be checked: {one_line(e)}"], 0, Counter()
        report.problems += problems
        report.samples += n
        report.bytes += seen.pop("bytes", 0)
        modalities_seen += seen
    t = d.totals
    if report.samples != t.written:
        report.problems.append(f"{DATASET_JSON}: says {t.written} samples were written; the shards hold "
                               f"{report.samples}")
    modalities = {m: n for m, n in sorted(modalities_seen.items()) if n}
    if not report.problems and modalities != {m: n for m, n in t.modalities.items() if n}:
        report.problems.append(f"{DATASET_JSON}: totals.modalities is {t.modalities}; the index counts {modalities}")
    expected = {"totals.shards": (t.shards, len(d.shards)), "totals.bytes": (t.bytes, sum(s.bytes for s in d.shards)),
                "totals.samples_in": (t.samples_in, t.written + t.rejected)}
    report.problems += [f"{DATASET_JSON}: {key} is {value}, expected {want} from the shard list and counts"
                        for key, (value, want) in expected.items() if value != want]
    report.problems += verify_tokenizer(d, options)
    report.problems += verify_errors(d, options)
    files, note = verify_files(d, options)
    report.problems += files
    report.notes += [note] if note else []
    report.seconds = time.perf_counter() - start
    return report


def index_schema(format_version: int) -> pa.Schema:
    """The index schema of a format version: v1 is v2 without members' crc32."""
    if format_version >= 2:
        return INDEX_SCHEMA
    members = INDEX_SCHEMA.field("members")
    fields = [f for f in members.type.value_type if f.name != "crc32"]
    return INDEX_SCHEMA.set(INDEX_SCHEMA.get_field_index("members"), pa.field("members", pa.list_(pa.struct(fields))))


NULLABLE = ("n_tokens", "image_width", "image_height", "audio_frames", "label")   # null when absent


def null_count(column: pa.ChunkedArray) -> int:
    """Nulls in a column, counting those inside a list of structs (members)."""
    nulls = column.null_count
    for chunk in column.chunks:
        if pa.types.is_list(chunk.type):
            flat = chunk.flatten()
            nulls += flat.null_count + sum(flat.field(i).null_count for i in range(flat.type.num_fields))
    return nulls


def walk_tar(name: str, data: bytes) -> tuple[dict[str, tuple[int, int]], int, list[str]]:
    """The members of a USTAR tar in memory: ({member name: (data offset, size)}, headers, problems).

    What tarfile does on reading, minus its per-header cost: each header's size, type, magic and checksum,
    zero padding after each member's data, and nothing but zeros after the end-of-archive marker.
    """
    members, problems, headers, stored = {}, [], [], []
    pos, end = 0, len(data)
    octets = np.frombuffer(data, np.uint8)
    while pos + 512 <= end and data[pos] != 0:   # a header's name never starts with NUL: the end marker does
        try:
            size = int(data[pos + 124: pos + 136].replace(b"\0", b" "), 8)
            stored.append(int(data[pos + 148: pos + 156].replace(b"\0", b" "), 8))
            if size < 0:
                raise ValueError(size)
        except ValueError:
            return members, len(headers), problems + [f"{name}: damaged tar header at byte {pos}; rebuild the dataset"]
        member = data[pos: pos + 100].split(b"\0", 1)[0].decode("utf-8", "replace")
        if data[pos + 345]:                      # USTAR prefix: names over 100 characters
            member = data[pos + 345: pos + 500].split(b"\0", 1)[0].decode("utf-8", "replace") + "/" + member
        if data[pos + 156] not in (0x30, 0) or data[pos + 257: pos + 263] != b"ustar\0":
            problems.append(f"{name}: {member}: not a plain USTAR file entry (byte {pos})")
        data_end, next_header = pos + 512 + size, pos + 512 + -(-size // 512) * 512
        if next_header > end:
            problems.append(f"{name}: truncated: {member} needs {next_header} bytes, the file has {end}; "
                            "rebuild the dataset")
            return members, len(headers) + 1, problems
        if octets[data_end:next_header].any():
            problems.append(f"{name}: {member}: non-zero bytes in the padding after its data; rebuild the dataset")
        headers.append(pos)
        members[member] = (pos + 512, size)
        pos = next_header
    if pos + 1024 > end:
        problems.append(f"{name}: no end-of-archive marker after byte {pos} (truncated?); rebuild the dataset")
    elif octets[pos:].any():
        problems.append(f"{name}: non-zero bytes after the end-of-archive marker at byte {pos}; rebuild the dataset")
    if headers:   # header checksums, all at once
        blocks = octets[:end // 512 * 512].reshape(-1, 512)[np.array(headers) // 512]
        for i in np.flatnonzero(header_sums(blocks) != np.array(stored[:len(headers)])).tolist():
            problems.append(f"{name}: damaged tar header at byte {headers[i]} (checksum); rebuild the dataset")
    return members, len(headers), problems


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
        with shard_bytes(d.shard_url(shard), options) as data:
            return check_shard(d, shard, data, options)
    except FileNotFoundError:
        return [f"{shard.name}: missing (dataset.json lists it); rebuild the dataset"], 0, Counter()


@contextlib.contextmanager
def shard_bytes(url: str, options: dict):
    """A shard's bytes: a read-only mapping of a local file (no copy: the page cache), else read whole."""
    if not storage.is_local(url):
        yield storage.read_bytes(url, options)
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
    unreadable = []   # the index's columns as the format version says, or the index cannot be used
    for want in index_schema(d.format_version):
        got = table.schema.field(want.name) if want.name in table.schema.names else None
        if got is None or not got.type.equals(want.type):
            unreadable.append(f"{index}: column {want.name} is {got.type if got else 'missing'}; format "
                              f"v{d.format_version} has {want.type}")
        elif want.name not in NULLABLE and (nulls := null_count(table.column(want.name))):
            unreadable.append(f"{index}: column {want.name} has {nulls} nulls; the format has none")
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
    regular(url)
    return storage.read_bytes(url, options)


def capped(shard: str, problems: list[str], most: int = 20) -> list[str]:
    """At most ``most`` lines per shard: a badly damaged shard is reported, not dumped."""
    if len(problems) <= most:
        return problems
    return problems[:most] + [f"{shard}: ... and {len(problems) - most} more problems"]


@dataclass
class Rows:
    """A shard's index as columns: per sample (n) and per member (flattened, in tar order)."""
    n: int
    table: pa.Table
    keys: list[str]
    lengths: np.ndarray          # [n] members per sample
    row_of: np.ndarray           # [members] the sample each member belongs to
    ext: list[str]               # [members]
    ext_array: pa.Array          # the same, as Arrow strings
    offset: np.ndarray           # [members] int64 data offset
    size: np.ndarray             # [members] int64
    crc32: np.ndarray | None     # [members] uint32 (format v2)
    order: np.ndarray            # [members] place in MEMBER_ORDER; len(MEMBER_ORDER) for an unknown ext

    @classmethod
    def of(cls, table: pa.Table, checksums: bool) -> "Rows":
        members = table.column("members").combine_chunks()
        flat = members.flatten()
        lengths = members.value_lengths().to_numpy(zero_copy_only=False).astype(np.int64)
        return cls(n=table.num_rows, table=table, keys=table.column("key").to_pylist(), lengths=lengths,
                   row_of=np.repeat(np.arange(table.num_rows), lengths), ext=flat.field("ext").to_pylist(),
                   ext_array=flat.field("ext"),
                   offset=flat.field("offset").to_numpy().astype(np.int64),
                   size=flat.field("size").to_numpy().astype(np.int64),
                   crc32=flat.field("crc32").to_numpy() if checksums else None,
                   order=pc.index_in(flat.field("ext"), value_set=pa.array(MEMBER_ORDER)).fill_null(
                       len(MEMBER_ORDER)).to_numpy().astype(np.int64))

    def column(self, name: str) -> list:
        return self.table.column(name).to_pylist()

    def valid(self, name: str) -> np.ndarray:
        return self.table.column(name).is_valid().to_numpy(zero_copy_only=False)

    def member(self, i: int) -> str:
        return f"{self.keys[self.row_of[i]]}.{self.ext[i]}"


def flag(problems: list[str], shard: str, bad: np.ndarray, names, what: str) -> None:
    """One line for every sample (or member) in ``bad``: the first is named, the rest counted."""
    where = np.flatnonzero(bad)
    if len(where):
        more = f" (and {len(where) - 1} more like it)" if len(where) > 1 else ""
        problems.append(f"{shard}: {names(int(where[0]))}: {what}{more}")


ORDER = {ext: i for i, ext in enumerate(MEMBER_ORDER)}


def check_index(shard: str, index: str, rows: Rows, seen: Counter) -> list[str]:
    """The index against itself, all samples at once: shard name, unique keys, member order, each sample's byte
    range spanning its members, presence flags and lengths agreeing with the members."""
    problems: list[str] = []
    key = rows.keys.__getitem__
    if rows.n and rows.table.column("shard").unique().to_pylist() != [shard]:
        names = rows.column("shard")
        flag(problems, shard, np.array([s != shard for s in names]), key, f"{index} names another shard")
    if len(set(rows.keys)) != rows.n:
        counts = Counter(rows.keys)
        flag(problems, shard, np.array([counts[k] > 1 for k in rows.keys]), key, "the key appears twice")
    order = rows.order
    same_sample = rows.row_of[1:] == rows.row_of[:-1]
    flag(problems, shard, same_sample & (order[1:] <= order[:-1]), lambda i: rows.member(i + 1),
         f"out of the format's member order ({', '.join(MEMBER_ORDER)}) or repeated")
    first = np.cumsum(rows.lengths) - rows.lengths
    nonempty = rows.lengths > 0
    no_json = ~nonempty.copy()
    no_json[nonempty] = order[first[nonempty]] != ORDER[JSON]
    flag(problems, shard, no_json, key, f"the index lists no {JSON} member")
    if nonempty.all() and rows.n:
        last = first + rows.lengths - 1
        start, span = rows.table.column("offset").to_numpy(), rows.table.column("size").to_numpy()
        flag(problems, shard, (start != rows.offset[first] - 512)
             | (span != rows.offset[last] + rows.size[last] - start), key,
             "the index's sample offset and size do not span its members")
    def count(*exts: str) -> np.ndarray:   # members of these kinds in each sample
        return np.bincount(rows.row_of[np.isin(order, [ORDER[e] for e in exts])], minlength=rows.n)

    tokens, text, images, mel = count(TOKENS), count(TEXT), count(*IMAGE_EXTS), count(MEL)
    checks = {"text": (tokens > 0, ["has_text", "n_tokens"]),
              "image": (images > 0, ["has_image", "image_width", "image_height"]),
              "audio": (mel > 0, ["has_audio", "audio_frames"]), "label": (count(LABEL) > 0, ["label"])}
    for modality, (present, columns) in checks.items():
        flags = [rows.valid(c) if c != f"has_{modality}" else
                 rows.table.column(c).to_numpy(zero_copy_only=False).astype(bool) for c in columns]
        flag(problems, shard, np.logical_or.reduce([f != present for f in flags]), key,
             f"the index's {', '.join(columns)} disagree with its members")
        seen[modality] += int(present.sum())
    flag(problems, shard, (text != tokens) | (images > 1), key,
         f"a sample has {TEXT} and {TOKENS} together and at most one image; not so here")
    return problems


def locate_members(shard: str, index: str, data: bytes, rows: Rows) -> tuple[np.ndarray, list[str]]:
    """(which indexed members are where the tar says, problems).

    The fast path checks the index's byte ranges against the tar's headers all at once: the headers chain
    from byte 0 with the index's sizes and names, each is a USTAR file entry with a good checksum, padding
    is zero, and only zeros follow the last member. Anything else walks the tar to say what is wrong.
    """
    n, end = len(rows.ext), len(data)
    if not n:
        problems = walk_tar(shard, data)[2]
        return np.zeros(0, bool), problems or ([] if end >= 1024 and not np.frombuffer(data, np.uint8).any() else
                                               [f"{shard}: not an empty tar, yet the index lists no sample"])
    headers = rows.offset - 512
    padded = -(-rows.size // 512) * 512
    chained = (headers[0] == 0 and (rows.size >= 0).all() and (rows.size < 2 ** 40).all()
               and (headers[1:] == headers[:-1] + 512 + padded[:-1]).all())
    tail = int(headers[-1] + 512 + padded[-1]) if chained else 0
    octets = np.frombuffer(data, np.uint8)
    if chained and tail + 1024 <= end and not octets[tail:].any():
        everything = octets[:end // 512 * 512].reshape(-1, 512)
        blocks = everything[headers // 512]
        names = name_fields(rows, 100)
        good = names is not None and (names == blocks[:, :100]).all(1) & ~blocks[:, 345:500].any(axis=1)
        good &= np.isin(blocks[:, 156], (0x30, 0)) & (blocks[:, 257:263] == np.frombuffer(b"ustar\0", np.uint8)).all(1)
        good &= (octal(blocks[:, 124:136]) == rows.size) & (octal(blocks[:, 148:156]) == header_sums(blocks))
        # the zero padding after each member's data: the end of its last block
        ends = rows.offset + rows.size
        partial = np.flatnonzero(ends % 512)
        last = everything[ends[partial] // 512]
        padding = np.arange(512) >= (ends[partial] % 512)[:, None]
        if np.all(good) and not last[padding].any():
            return np.ones(n, bool), []
    # something is off: walk the tar and say what
    members, count, problems = walk_tar(shard, data)
    names = [rows.member(i) for i in range(n)]
    spans = list(zip(rows.offset.tolist(), rows.size.tolist()))
    located = np.array([members.get(name) == span for name, span in zip(names, spans)])
    for i in np.flatnonzero(~located).tolist():
        where = members.get(names[i])
        problems.append(f"{shard}: {names[i]}: " + (f"not in the tar, {index} lists it" if where is None else
                                                    f"at (offset, size) {where} in the tar, {index} says {spans[i]}"))
    unindexed = sorted(set(members) - set(names))
    if unindexed:
        problems.append(f"{shard}: tar member {unindexed[0]!r} is not in {index}"
                        + (f" (and {len(unindexed) - 1} more)" if len(unindexed) > 1 else ""))
    if count != n:
        problems.append(f"{shard}: tar has {count} members, {index} lists {n}")
    return located, problems


def name_fields(rows: Rows, width: int) -> np.ndarray | None:
    """Each member's tar name (``<key>.<ext>``) as a NUL-padded [members, width] uint8 array, built from the
    index's Arrow buffers without a Python string per member; None when a name is longer than ``width``."""
    names = pc.binary_join_element_wise(rows.table.column("key").combine_chunks().take(rows.row_of),
                                        rows.ext_array, ".").cast(pa.large_binary())
    _, offsets, chars = names.buffers()
    offsets = np.frombuffer(offsets, np.int64, count=len(names) + 1, offset=names.offset * 8)
    lengths = np.diff(offsets)
    if len(lengths) and lengths.max() > width:
        return None
    member = np.repeat(np.arange(len(names)), lengths)                       # which name each byte is in
    within = np.arange(len(member)) - np.repeat(np.cumsum(lengths) - lengths, lengths)   # its place in the name
    out = np.zeros((len(names), width), np.uint8)
    out[member, within] = np.frombuffer(chars, np.uint8)[np.repeat(offsets[:-1], lengths) + within]
    return out


def octal(fields: np.ndarray) -> np.ndarray:
    """Tar numeric fields as int64: octal digits then only NUL or space (what tarfile writes); -1 otherwise."""
    digits = fields.astype(np.int64) - ord("0")
    is_digit = (digits >= 0) & (digits <= 7)
    width = fields.shape[1]
    k = np.where(is_digit.all(1), width, np.argmin(is_digit, axis=1))     # digits before the first other byte
    place = k[:, None] - 1 - np.arange(width)                             # the power of 8 of each digit
    trailing = place < 0
    plain = (k > 0) & (~trailing | (fields == 0) | (fields == 32)).all(1)
    values = np.where(trailing, 0, digits * 8 ** np.maximum(place, 0)).sum(1)
    return np.where(plain, values, -1)


def header_sums(blocks: np.ndarray) -> np.ndarray:
    """Each header's checksum as tar computes it: the sum of its bytes with the checksum field as spaces."""
    return blocks.sum(axis=1, dtype=np.int64) - blocks[:, 148:156].sum(axis=1, dtype=np.int64) + 8 * 32


def check_payloads(d: DatasetDescription, shard: str, index: str, data: bytes, rows: Rows,
                   located: np.ndarray) -> list[str]:
    """Every located member: its crc32 against the index (format v2), then its structure (MEMBER_CHECKS)."""
    problems = []
    view = memoryview(data)
    starts, stops = rows.offset.tolist(), (rows.offset + rows.size).tolist()
    ok = located.copy()
    if rows.crc32 is not None:
        payloads = map(view.__getitem__, map(slice, starts, stops))
        actual = np.fromiter(map(zlib.crc32, payloads), np.uint32, len(starts))
        changed = ok & (actual != rows.crc32)
        for i in np.flatnonzero(changed).tolist():
            problems.append(f"{shard}: {rows.member(i)}: crc32 {actual[i]:08x}, {index} says {rows.crc32[i]:08x}: "
                            "its bytes changed after it was written; rebuild the dataset")
        ok &= ~changed
    columns = {c: rows.column(c) for c in ("id", "row", "label", "n_tokens", "audio_frames")}
    row_of = rows.row_of.tolist()
    flag(problems, shard, ok & (rows.order == len(ORDER)), rows.member,
         "not a member of the format (see docs/format.md)")
    for ext, check in MEMBER_CHECKS.items():   # one kind of member at a time: no dispatch per member
        for i in np.flatnonzero(ok & (rows.order == ORDER[ext])).tolist():
            problem = check(d, ext, view[starts[i]:stops[i]], columns, row_of[i])
            if problem:
                problems.append(f"{shard}: {rows.member(i)}: {problem}")
    return problems


# Structural checks of one member's bytes given its sample's index columns (row ``r``): what is wrong, or None.
# Cheap enough for every member: the crc32 (format v2) already proves the bytes are the ones written, so
# nothing is decoded (a .npy header is parsed, its array is not loaded).

def check_json(d: DatasetDescription, ext: str, payload: memoryview, columns: dict, r: int) -> str | None:
    try:
        doc = json.loads(str(payload, "utf-8"))
    except (ValueError, RecursionError) as e:   # UnicodeDecodeError included; RecursionError: nested too deep
        return f"not valid JSON ({one_line(e)})"
    if not isinstance(doc, dict):
        return "not a JSON object"
    for name in ("id", "row", "label"):
        if doc.get(name) != columns[name][r]:
            return f"has {name} {doc.get(name)!r}, the index says {columns[name][r]!r}"
    return None


def check_text(d: DatasetDescription, ext: str, payload: memoryview, columns: dict, r: int) -> str | None:
    try:
        str(payload, "utf-8")
    except UnicodeDecodeError as e:
        return f"not UTF-8 text ({e})"
    return None


def check_tokens(d: DatasetDescription, ext: str, payload: memoryview, columns: dict, r: int) -> str | None:
    return check_npy(payload, "i4", (columns["n_tokens"][r],), "C")


def check_mel(d: DatasetDescription, ext: str, payload: memoryview, columns: dict, r: int) -> str | None:
    return check_npy(payload, "f2", (d.n_mels, columns["audio_frames"][r]), "C" if d.processing_version >= 3 else None)


def check_label(d: DatasetDescription, ext: str, payload: memoryview, columns: dict, r: int) -> str | None:
    if payload != str(columns["label"][r]).encode():
        return f"holds {bytes(payload[:20])!r}, the index says label {columns['label'][r]!r}"
    return None


MAGIC = {"jpg": b"\xff\xd8\xff", "png": b"\x89PNG\r\n\x1a\n", "webp": b"RIFF", FLAC: b"fLaC"}


def check_magic(d: DatasetDescription, ext: str, payload: memoryview, columns: dict, r: int) -> str | None:
    if (payload[:len(MAGIC[ext])] != MAGIC[ext] or (ext == "webp" and payload[8:12] != b"WEBP")
            or (ext == "jpg" and payload[-2:] != b"\xff\xd9")):
        return f"not a {ext.upper()} file (its signature is wrong)"
    return None


MEMBER_CHECKS = {JSON: check_json, TEXT: check_text, TOKENS: check_tokens, **{e: check_magic for e in MAGIC},
                 MEL: check_mel, LABEL: check_label}
assert set(MEMBER_CHECKS) == set(MEMBER_ORDER)


def check_npy(payload: memoryview, kind: str, shape: tuple, order: str | None) -> str | None:
    """A .npy member's header and length, as np.load would check them, without reading the array."""
    layout = npy_layout(bytes(payload[:NPY_PREFIX]))
    if isinstance(layout, str):
        return layout
    dtype, got, fortran, offset = layout
    if dtype.kind + str(dtype.itemsize) != kind or dtype.byteorder == ">":
        return f"dtype {dtype}, the format says {np.dtype(kind)}"
    if got != shape:
        return f"shape {got}, the index says {shape}"
    if order and fortran != (order == "F"):
        return f"{'Fortran' if fortran else 'C'} order, the format says {order} order"
    if len(payload) != offset + math.prod(got) * dtype.itemsize:
        return f"{len(payload)} bytes, its header says {offset + math.prod(got) * dtype.itemsize}"
    return None


# np.save pads magic + version + header to 64 bytes; a member's first 128 bytes hold any header mm writes
NPY_PREFIX = 128
NPY_HEADER = re.compile(
    rb"\{'descr': '([<|][iuf][1248])', 'fortran_order': (False|True), 'shape': \(([0-9, ]*)\), \} *\n")


@functools.lru_cache(maxsize=4096)   # a dataset has few distinct headers (one per shape)
def npy_layout(prefix: bytes) -> tuple[np.dtype, tuple, bool, int] | str:
    """(dtype, shape, fortran order, data offset) from a .npy header, or what is wrong with it."""
    if prefix[:6] != b"\x93NUMPY" or len(prefix) < 12 or prefix[6] not in (1, 2, 3):
        return "not a .npy file (bad magic)"
    start = 10 if prefix[6] == 1 else 12
    end = start + int.from_bytes(prefix[8:start], "little")
    if end > len(prefix):
        return (f"a .npy header of {end} bytes, longer than mm writes" if len(prefix) == NPY_PREFIX else
                f"truncated: {len(prefix)} bytes, its .npy header alone is {end}")
    plain = NPY_HEADER.fullmatch(prefix[start:end])
    if plain:   # what np.save writes: parsed without ast (ast.literal_eval is a compile per distinct header)
        shape = tuple(int(n) for n in plain.group(3).split(b",") if n.strip())
        return np.dtype(plain.group(1).decode()), shape, plain.group(2) == b"True", end
    try:
        header = ast.literal_eval(prefix[start:end].decode("latin1"))
        dtype, shape, fortran = np.dtype(header["descr"]), header["shape"], header["fortran_order"]
        if not (isinstance(shape, tuple) and all(type(n) is int and n >= 0 for n in shape)
                and isinstance(fortran, bool) and not dtype.hasobject):
            raise ValueError(header)
    except (ValueError, SyntaxError, TypeError, KeyError, MemoryError, RecursionError) as e:
        return f"a damaged .npy header ({one_line(e)})"
    return dtype, shape, fortran, end


def verify_tokenizer(d: DatasetDescription, options: dict) -> list[str]:
    name = d.tokenizer.file
    try:
        data = read_file(storage.join(d.url, name), options)
    except FileNotFoundError:
        return [f"{name}: missing (dataset.json names it); rebuild the dataset"]
    except OSError as e:
        return [f"{name}: cannot be read ({one_line(e)})"]
    digest = hashlib.sha256(data).hexdigest()
    if digest != d.tokenizer.sha256:
        return [f"{name}: sha256 {digest[:16]}..., dataset.json says {d.tokenizer.sha256[:16]}...: the file was "
                "replaced or damaged; rebuild the dataset"]
    return []


ERROR_FIELDS = ("id", "row", "modality", "stage", "reason", "error", "action")


def verify_errors(d: DatasetDescription, options: dict) -> list[str]:
    """errors.jsonl: every line an error entry, counts by reason as in dataset.json. One line when damaged."""
    try:
        data = read_file(storage.join(d.url, ERRORS_JSONL), options)
    except FileNotFoundError:
        return [f"{ERRORS_JSONL}: missing; rebuild the dataset"]
    except OSError as e:
        return [f"{ERRORS_JSONL}: cannot be read ({one_line(e)})"]
    reasons, damaged = Counter(), []
    lines = data.split(b"\n")
    for number, line in enumerate(lines[:-1] if lines[-1] == b"" else lines, 1):
        try:
            entry = json.loads(line)   # RecursionError: nested too deep
            if not (isinstance(entry, dict) and all(f in entry for f in ERROR_FIELDS)
                    and isinstance(entry["reason"], str)):
                raise ValueError("not an error entry")
        except (ValueError, RecursionError):
            damaged.append(number)
            continue
        reasons[entry["reason"]] += 1
    if damaged:
        return [f"{ERRORS_JSONL}: line {damaged[0]} is not a JSON error entry with {', '.join(ERROR_FIELDS)} "
                f"({len(damaged)} such lines); the file is damaged, rebuild the dataset"]
    if dict(reasons) != d.totals.errors_by_reason:
        return [f"{ERRORS_JSONL} has {dict(sorted(reasons.items()))}, dataset.json says {d.totals.errors_by_reason}"]
    return []


def verify_files(d: DatasetDescription, options: dict) -> tuple[list[str], str | None]:
    """Files in the dataset directory that the format does not list: (problems, note when it cannot be listed)."""
    expected = {DATASET_JSON, ERRORS_JSONL, WIDS_INDEX, d.tokenizer.file,
                *(s.name for s in d.shards), *(index_name(s.name) for s in d.shards)}
    try:
        found = list_files(d.url, options)
    except Exception as e:   # listing is best effort: some stores (HTTP) cannot list at all
        return [], f"cannot list {d.url} ({one_line(e)}): stray files were not looked for"
    problems = []
    for name in sorted(set(found) - expected):
        if name.endswith(".tmp"):
            why = "a temporary file left by an interrupted write; delete it"
        elif SHARD_NAME.fullmatch(name) or (name.startswith(f"{INDEX_DIR}/") and name.endswith(".parquet")):
            why = "a shard or index file that dataset.json does not list; delete it or rebuild the dataset"
        else:
            why = "not part of a dataset directory (docs/format.md); move it elsewhere"
        problems.append(f"{name}: {why}")
    if len(problems) > 20:
        problems[20:] = [f"... and {len(problems) - 20} more files that are not part of the dataset"]
    return problems, None


def list_files(url: str, options: dict) -> list[str]:
    """Every file under ``url``, as paths relative to it with ``/``."""
    if storage.is_local(url):
        root = storage.local_path(url)
        if not root.is_dir():
            raise NotADirectoryError(f"{root} is not a directory")
        return [(Path(folder) / f).relative_to(root).as_posix() for folder, _, files in os.walk(root) for f in files]
    fs, path = storage.filesystem(url, options)
    path = path.rstrip("/")
    return [p[len(path) + 1:] for p in fs.find(path) if p.startswith(path + "/")]
