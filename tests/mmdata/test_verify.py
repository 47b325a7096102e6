"""mmdata.verify's parts: the crc32 in the index, the tar walk and its all-at-once fast path, .npy headers, the index
checked against itself, and the report. The CLI against damaged directories is in tests/hostile/test_verify.py."""

from __future__ import annotations

import io
import re
import tarfile
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmdata.dataset import load_description
from mmdata.verify.index import Rows, check_index
from mmdata.verify.members import check_npy
from mmdata.shards import INDEX_SCHEMA
from mmdata.verify.tar import locate_members, octal, walk_tar
from mmdata.verify import check_dataset


def test_the_index_holds_every_members_crc32(demo_dataset):
    assert INDEX_SCHEMA.field("members").type.value_type.field("crc32").type == pa.uint32()
    checked = 0
    for shard in load_description(demo_dataset).shards:
        data = Path(demo_dataset, shard.name).read_bytes()
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            payloads = {m.name: tar.extractfile(m).read() for m in tar}
        for row in pq.read_table(Path(demo_dataset, "index", shard.name.replace(".tar", ".parquet"))).to_pylist():
            for m in row["members"]:
                assert m["crc32"] == zlib.crc32(payloads[f"{row['key']}.{m['ext']}"])
                checked += 1
    assert checked > 48 * 3


def tar_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


MEMBERS = {"a.json": b"{}", "a.txt": b"x" * 512, "b.json": b"", "b.mel.npy": bytes(range(256)) * 7,
           "f" * 40 + "/" + "n" * 80 + ".cls": b"3"}   # over 100 characters: a USTAR prefix


def test_walking_a_tar_finds_what_tarfile_finds():
    data = tar_bytes(MEMBERS)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        expected = {m.name: (m.offset_data, m.size) for m in tar}
    members, count, problems = walk_tar("t.tar", data)
    assert (members, count, problems) == (expected, len(MEMBERS), [])


@pytest.mark.parametrize("damage, message", [
    (lambda d: d[:100] + b"Z" + d[101:], "damaged tar header at byte 0 (checksum)"),            # the mode field
    (lambda d: d[:124] + b"-0000001000\0" + d[136:], "damaged tar header at byte 0;"),         # a negative size
    (lambda d: d[:3500], "truncated: b.mel.npy needs 5120 bytes, the file has 3500"),
    (lambda d: d[:-3] + b"\1\0\0", "non-zero bytes after the end-of-archive marker"),
    (lambda d: d[:514 + 2] + b"\1" + d[514 + 3:], "a.json: non-zero bytes in the padding"),
])
def test_walking_a_damaged_tar_says_what_is_wrong(damage, message):
    members, count, problems = walk_tar("t.tar", damage(tar_bytes(MEMBERS)))
    assert any(message in p for p in problems) and all(p.startswith("t.tar: ") for p in problems)


def test_tar_numbers_parse_all_at_once():
    fields = [b"00000001750\0", b"0000000\0\0\0\0\0", b"012345\0 ", b" 1750\0\0\0", b"00000x01750\0", b"\0" * 8]
    width = max(map(len, fields))
    array = np.array([np.frombuffer(f.ljust(width, b"\0"), np.uint8) for f in fields])
    assert octal(array).tolist() == [0o1750, 0, 0o12345, -1, -1, -1]   # -1: not what tarfile writes: walk instead


def npy(array: np.ndarray) -> memoryview:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return memoryview(buf.getvalue())


@pytest.mark.parametrize("payload, message", [
    (npy(np.zeros((4, 9), np.float16)), None),
    (npy(np.zeros((4, 9), np.float32)), "dtype float32, the format says float16"),
    (npy(np.zeros((4, 8), np.float16)), "shape (4, 8), the index says (4, 9)"),
    (npy(np.asfortranarray(np.zeros((4, 9), np.float16))), "Fortran order, the format says C order"),
    (npy(np.zeros((4, 9), ">f2")), "dtype >f2, the format says float16"),     # numpy's reader, not the regex
    (npy(np.zeros((4, 9), np.float16))[:-1], "bytes, its header says"),
    (npy(np.zeros((4, 9), np.float16))[:60], "truncated: 60 bytes"),
    (memoryview(b"\x93NUMPY\x01\x00\x76\x00{'descr': oops" + b" " * 120), "a damaged .npy header"),
    (memoryview(b"PK\x03\x04" + bytes(200)), "not a .npy file"),
])
def test_npy_members_are_checked_from_their_header(payload, message):
    problem = check_npy(payload, "f2", (4, 9), "C")
    assert problem == message if message is None else message in problem


def shard_of(dataset: str, k: int) -> tuple[bytes, pa.Table]:
    d = load_description(dataset)
    shard = d.shards[k]
    return Path(dataset, shard.name).read_bytes(), pq.read_table(Path(dataset, "index", f"shard-{k:06d}.parquet"))


def test_the_fast_path_and_the_walk_agree_on_a_healthy_shard(demo_dataset):
    data, table = shard_of(demo_dataset, 1)
    rows = Rows.of(table, checksums=True)
    located, problems = locate_members("shard-000001.tar", "index/shard-000001.parquet", data, rows)
    assert located.all() and problems == []
    members, count, problems = walk_tar("shard-000001.tar", data)
    assert problems == [] and count == len(rows.ext)
    assert {rows.member(i): (rows.offset[i], rows.size[i]) for i in range(count)} == members


def test_a_member_the_index_misplaces_is_named(demo_dataset):
    data, table = shard_of(demo_dataset, 1)
    members = table.column("members").to_pylist()
    members[2][1]["offset"] += 512
    table = table.set_column(table.schema.get_field_index("members"), "members",
                             pa.array(members, INDEX_SCHEMA.field("members").type))
    rows = Rows.of(table, checksums=True)
    located, problems = locate_members("shard-000001.tar", "index/shard-000001.parquet", data, rows)
    assert located.sum() == len(located) - 1 and not located[lengths_before(rows, 2) + 1]
    assert problems == [f"shard-000001.tar: {rows.member(lengths_before(rows, 2) + 1)}: at (offset, size) "
                        f"{(members[2][1]['offset'] - 512, members[2][1]['size'])} in the tar, "
                        f"index/shard-000001.parquet says {(members[2][1]['offset'], members[2][1]['size'])}"]


def lengths_before(rows: Rows, sample: int) -> int:
    return int(rows.lengths[:sample].sum())


@pytest.mark.parametrize("column, change, message", [
    ("has_image", lambda values: [not values[0]] + values[1:], "has_image, image_width, image_height disagree"),
    ("key", lambda values: [values[1]] + values[1:], "the key appears twice"),
    ("shard", lambda values: ["shard-000009.tar"] + values[1:], "names another shard"),
    ("offset", lambda values: [values[0] + 1] + values[1:], "do not span its members"),
])
def test_an_index_that_contradicts_itself_is_named(demo_dataset, column, change, message):
    _, table = shard_of(demo_dataset, 1)
    assert check_index("shard-000001.tar", "index/shard-000001.parquet", Rows.of(table, True), Counter()) == []
    values = change(table.column(column).to_pylist())
    table = table.set_column(table.schema.get_field_index(column), column,
                             pa.array(values, INDEX_SCHEMA.field(column).type))
    rows = Rows.of(table, True)
    problems = check_index("shard-000001.tar", "index/shard-000001.parquet", rows, Counter())
    assert len(problems) == 1 and message in problems[0]
    assert problems[0].startswith(f"shard-000001.tar: {rows.keys[0]}: ")


def test_a_healthy_dataset_reports_what_it_read(demo_dataset):
    report = check_dataset(demo_dataset)
    d = load_description(demo_dataset)
    assert report.ok and report.problems == [] and report.notes == []
    assert report.samples == 48 and report.bytes == sum(Path(demo_dataset, s.name).stat().st_size for s in d.shards)
    assert re.fullmatch(r"48 samples, \d+\.\d MB checked in \d+\.\d\d s \(\d+ MB/s\), 0 problems: OK",
                        report.summary())
