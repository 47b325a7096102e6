"""A shard's tar structure: walked header by header, or checked against the index's byte ranges all at once."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mmdata.verify.index import Rows


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
