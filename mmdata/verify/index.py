"""A shard's index read as columns and checked against itself: its schema for the format version, then
every sample at once (shard name, unique keys, member order, byte ranges, presence flags and lengths)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mmdata.schema import IMAGE_EXTS, JSON, LABEL, MEL, MEMBER_ORDER, TEXT, TOKENS
from mmdata.shards import INDEX_SCHEMA


def index_schema(format_version: int) -> pa.Schema:
    """The index schema of a format version: v2 is v3 without the split column, v1 is v2 without members'
    crc32."""
    if format_version >= 3:
        return INDEX_SCHEMA
    schema = INDEX_SCHEMA.remove(INDEX_SCHEMA.get_field_index("split"))
    if format_version == 2:
        return schema
    members = schema.field("members")
    fields = [f for f in members.type.value_type if f.name != "crc32"]
    return schema.set(schema.get_field_index("members"), pa.field("members", pa.list_(pa.struct(fields))))


NULLABLE = ("n_tokens", "image_width", "image_height", "audio_frames", "label", "split")   # null when absent


def null_count(column: pa.ChunkedArray) -> int:
    """Nulls in a column, counting those inside a list of structs (members)."""
    nulls = column.null_count
    for chunk in column.chunks:
        if pa.types.is_list(chunk.type):
            flat = chunk.flatten()
            nulls += flat.null_count + sum(flat.field(i).null_count for i in range(flat.type.num_fields))
    return nulls


def check_columns(index: str, table: pa.Table, format_version: int) -> list[str]:
    """The index's columns against the format version's schema (types, and nulls only where the format allows
    them). Any problem here means the rest of the index cannot be used."""
    unreadable = []
    for want in index_schema(format_version):
        got = table.schema.field(want.name) if want.name in table.schema.names else None
        if got is None or not got.type.equals(want.type):
            unreadable.append(f"{index}: column {want.name} is {got.type if got else 'missing'}; format "
                              f"v{format_version} has {want.type}")
        elif want.name not in NULLABLE and (nulls := null_count(table.column(want.name))):
            unreadable.append(f"{index}: column {want.name} has {nulls} nulls; the format has none")
    return unreadable


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
