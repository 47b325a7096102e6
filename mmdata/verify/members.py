"""Each member's bytes: its crc32 against the index (format v2), then its structure by kind (JSON ids, UTF-8
text, .npy headers and shapes, labels, image and audio signatures), never decoding the payload."""

from __future__ import annotations

import ast
import functools
import json
import math
import re
import zlib

import numpy as np

from mmdata.dataset import DatasetDescription
from mmdata.verify.index import ORDER, Rows, flag
from mmdata.schema import FLAC, JSON, LABEL, MEL, MEMBER_ORDER, TEXT, TOKENS, one_line


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
    columns = {c: rows.column(c) for c in ("id", "row", "label", "split", "n_tokens", "audio_frames")
               if c in rows.table.column_names}
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
    for name in ("id", "row", "label", "split") if d.format_version >= 3 else ("id", "row", "label"):
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
