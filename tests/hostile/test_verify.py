"""`mmdata verify` against a damaged dataset directory: every damage is reported in one line naming the file
(and the member), the exit code says so, and nothing tracebacks. Each test damages a copy of the session's
demo dataset (its shard files are hard links into the preprocessing store: never modify them in place)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmdata.cli import main

V1_MEMBERS = pa.list_(pa.struct([("ext", pa.string()), ("offset", pa.int64()), ("size", pa.int64())]))


@pytest.fixture()
def copy(demo_dataset, tmp_path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(demo_dataset, target)
    return target


def run(capsys, *argv: str) -> tuple[int, list[str], str]:
    """(exit code, stdout lines, stderr) of the mmdata command."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out.splitlines(), err


def rewrite(path: Path, data: bytes) -> None:
    path.unlink()   # break the hard link first
    path.write_bytes(data)


def member(dataset: Path, ext: str) -> tuple[str, str, int, int]:
    """(shard, member name, data offset, size) of the first member with extension ``ext``."""
    for index in sorted((dataset / "index").glob("*.parquet")):
        for row in pq.read_table(index).to_pylist():
            for m in row["members"]:
                if m["ext"] == ext:
                    return row["shard"], f"{row['key']}.{ext}", m["offset"], m["size"]
    raise AssertionError(f"the demo dataset has no {ext} member")


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A
    rewrite(path, bytes(data))


def make_v1(dataset: Path) -> None:
    """What a format v1 mmdata wrote: no crc32 in the index's members, format_version 1."""
    for index in (dataset / "index").glob("*.parquet"):
        table = pq.read_table(index)
        members = [[{k: m[k] for k in ("ext", "offset", "size")} for m in row]
                   for row in table.column("members").to_pylist()]
        table = table.set_column(table.schema.get_field_index("members"), pa.field("members", V1_MEMBERS),
                                 pa.array(members, V1_MEMBERS))
        index.unlink()
        pq.write_table(table, index, compression="zstd", write_statistics=False)
    doc = json.loads((dataset / "dataset.json").read_text())
    (dataset / "dataset.json").write_text(json.dumps({**doc, "format_version": 1}))


def test_a_healthy_copy_verifies_and_prints_its_throughput(copy, capsys):
    code, lines, _ = run(capsys, "verify", str(copy))
    assert code == 0 and len(lines) == 1
    assert lines[0].startswith("48 samples, ") and " MB checked in " in lines[0] and lines[0].endswith("0 problems: OK")


# a byte of the data: past the 128-byte header of .npy members, inside the JPEG past its signature
@pytest.mark.parametrize("ext, into", [("jpg", 100), ("mel.npy", 150), ("txt", 3), ("tokens.npy", 130),
                                       ("json", 10), ("cls", 0)])
def test_a_flipped_byte_inside_a_member_is_reported_by_shard_and_member(copy, capsys, ext, into):
    shard, name, offset, size = member(copy, ext)
    assert size > into
    flip(copy / shard, offset + into)
    code, lines, _ = run(capsys, "verify", str(copy))
    assert code == 1
    found = [line for line in lines if line.startswith(f"{shard}: {name}: crc32 ")]
    assert len(found) == 1, lines
    assert lines[-1].endswith("1 problems: UNHEALTHY")


def test_every_flipped_byte_of_a_shard_is_found(copy):
    """Headers, data, padding and the end-of-archive blocks: no byte of a shard goes unchecked."""
    from mmdata.dataset import load_description
    from mmdata.verify.shard import verify_shard
    d = load_description(str(copy))
    info = d.shards[2]
    shard = copy / info.name
    original = shard.read_bytes()
    tail = range(len(original) - 2048, len(original), 41)         # the last member's padding, the end blocks
    for offset in [*range(0, 512, 3), *tail, *random.Random(0).sample(range(len(original)), 60)]:
        data = bytearray(original)
        data[offset] ^= 1 << (offset % 8)
        rewrite(shard, bytes(data))
        problems, _, _ = verify_shard(d, info)
        assert problems and all(p.startswith(f"{info.name}: ") for p in problems), (offset, problems)
    rewrite(shard, original)
    assert verify_shard(d, info)[0] == []


def test_a_damaged_tar_header_is_reported(copy, capsys):
    shard, name, offset, _ = member(copy, "jpg")
    flip(copy / shard, offset - 512 + 2)           # inside the member's name
    code, lines, _ = run(capsys, "verify", str(copy))
    assert code == 1 and any(line.startswith(f"{shard}: ") and "header" in line for line in lines)


def test_a_junk_tokenizer_is_reported(copy, capsys):
    rewrite(copy / "tokenizer.model", b"junk" * 100)
    code, lines, _ = run(capsys, "verify", str(copy))
    assert code == 1 and len(lines) == 2
    assert lines[0].startswith("tokenizer.model: sha256 ") and "dataset.json says" in lines[0]


def test_stray_shards_index_files_and_temporary_files_are_reported(copy, capsys):
    shutil.copyfile(copy / "shard-000000.tar", copy / "shard-000099.tar")
    shutil.copyfile(copy / "index/shard-000000.parquet", copy / "index/shard-000099.parquet")
    (copy / ".shard-000003.tar.0123abcd.tmp").write_bytes(b"partial")
    (copy / "index/.shard-000003.parquet.4567.tmp").write_bytes(b"")
    (copy / "notes.txt").write_text("mine")
    (copy / "wids-index.json").write_text("{}")     # mmdata wids-index adds this one: not stray
    code, lines, _ = run(capsys, "verify", str(copy))
    assert code == 1
    problems = lines[:-1]
    assert sorted(line.split(":")[0] for line in problems) == [
        ".shard-000003.tar.0123abcd.tmp", "index/.shard-000003.parquet.4567.tmp", "index/shard-000099.parquet",
        "notes.txt", "shard-000099.tar"]
    assert all("temporary" in line for line in problems if ".tmp:" in line)
    assert "does not list" in next(line for line in problems if line.startswith("shard-000099.tar"))


def test_a_missing_shard_and_a_missing_index_are_reported(copy, capsys):
    (copy / "shard-000004.tar").unlink()
    (copy / "index/shard-000006.parquet").unlink()
    code, lines, _ = run(capsys, "verify", str(copy))
    assert code == 1
    assert any(line.startswith("shard-000004.tar: missing") for line in lines)
    assert any(line.startswith("index/shard-000006.parquet: missing") for line in lines)


def test_a_truncated_shard_is_reported(copy, capsys):
    shard = copy / "shard-000001.tar"
    data = shard.read_bytes()
    rewrite(shard, data[: len(data) // 2])
    code, lines, _ = run(capsys, "verify", str(copy))
    assert code == 1
    assert any(line.startswith(f"shard-000001.tar: {len(data) // 2} bytes, dataset.json says {len(data)}")
               for line in lines)
    assert any(line.startswith("shard-000001.tar: truncated") for line in lines)


def test_an_index_that_is_not_parquet_is_one_line(copy, capsys):
    rewrite(copy / "index/shard-000003.parquet", b"PAR1 not really")
    code, lines, _ = run(capsys, "verify", str(copy))
    assert code == 1
    assert any(line.startswith("index/shard-000003.parquet: not a readable Parquet file") for line in lines)


@pytest.mark.parametrize("damage", [
    lambda text: text[: len(text) // 2],                         # cut short
    lambda text: "\udcff",                                         # not UTF-8 at all
    lambda text: "[]",                                             # not an object
    lambda text: "[" * 100_000 + "]" * 100_000,                    # nested too deep for json
    lambda text: text.replace('"format_version": 3', '"format_version": 4'),
    lambda text: text.replace('"name": "shard-000001.tar"', '"name": "../../etc/passwd"'),
])
def test_a_damaged_dataset_json_is_one_error_line_for_verify_and_info(copy, capsys, damage):
    text = json.dumps(json.loads((copy / "dataset.json").read_text()))
    (copy / "dataset.json").write_bytes(damage(text).encode("utf-8", "surrogateescape"))
    for command in ("verify", "info"):
        code, lines, err = run(capsys, command, str(copy))
        assert code == 2 and lines == []
        assert err.count("\n") == 1 and err.startswith("error: ") and "dataset.json" in err


@pytest.mark.parametrize("damage", [b'{"id": "x", "reason"\n', b"\xff\xfe\n", b"[1, 2]\n", b"[" * 100_000 + b"\n"])
def test_a_damaged_errors_jsonl_is_one_line(copy, capsys, damage):
    with open(copy / "errors.jsonl", "ab") as f:
        f.write(damage)
    code, lines, _ = run(capsys, "verify", str(copy))
    assert code == 1
    assert [line for line in lines if "errors.jsonl" in line] == [lines[0]]
    assert lines[0].startswith("errors.jsonl: line ") and "damaged" in lines[0]


def test_files_that_are_not_regular_files_are_reported_not_waited_on(copy, capsys):
    import os
    (copy / "shard-000002.tar").unlink()
    os.mkfifo(copy / "shard-000002.tar")            # reading a FIFO would block forever
    (copy / "errors.jsonl").unlink()
    (copy / "errors.jsonl").mkdir()
    code, lines, _ = run(capsys, "verify", str(copy))
    assert code == 1
    assert any(line.startswith("shard-000002.tar: cannot be checked: ") and "not a regular file" in line
               for line in lines)
    assert any(line.startswith("errors.jsonl: cannot be read") for line in lines)
    (copy / "dataset.json").unlink()
    os.mkfifo(copy / "dataset.json")
    code, lines, err = run(capsys, "verify", str(copy))
    assert code == 2 and err.startswith("error: ") and "dataset.json is not a regular file" in err


def test_a_missing_errors_jsonl_is_reported(copy, capsys):
    (copy / "errors.jsonl").unlink()
    code, lines, _ = run(capsys, "verify", str(copy))
    assert code == 1 and lines[0].startswith("errors.jsonl: missing")


def test_a_v1_dataset_loads_and_verifies_without_checksums(demo_dataset, copy, capsys):
    from helpers import batch_ids, loader_config
    from mmdata.load.loader import MultimodalLoader
    v2_batches = batch_ids(MultimodalLoader(loader_config(demo_dataset, seed=5)))
    make_v1(copy)
    code, lines, _ = run(capsys, "info", str(copy))
    assert code == 0 and "(format v1)" in "\n".join(lines)
    code, lines, _ = run(capsys, "verify", str(copy))
    assert code == 0 and len(lines) == 2
    assert lines[0].startswith("note: format v1 dataset: member checksums are not available")
    assert lines[1].endswith("0 problems: OK")
    assert batch_ids(MultimodalLoader(loader_config(str(copy), seed=5))) == v2_batches
    assert sorted(i for batch in v2_batches for i in batch)[0]    # not vacuous: samples were loaded
    # without checksums a changed byte inside an image goes unseen, but the tar's structure is still checked
    shard, name, offset, _ = member(copy, "jpg")
    flip(copy / shard, offset + 100)
    assert run(capsys, "verify", str(copy))[0] == 0
    flip(copy / shard, offset - 512 + 2)
    code, lines, _ = run(capsys, "verify", str(copy))
    assert code == 1 and any(line.startswith(f"{shard}: ") for line in lines)


def test_a_v1_index_in_a_v2_dataset_is_reported(copy, capsys):
    make_v1(copy)
    doc = json.loads((copy / "dataset.json").read_text())
    (copy / "dataset.json").write_text(json.dumps({**doc, "format_version": 2}))
    code, lines, _ = run(capsys, "verify", str(copy))
    assert code == 1
    assert any(line.startswith("index/shard-000000.parquet: column members is ") and "format v2" in line
               for line in lines)


@pytest.mark.slow
def test_a_remote_shard_replaced_by_a_larger_object_is_reported_unread(demo_dataset, s3):
    """On object storage a replaced shard can be any size: verify asks for one byte more than dataset.json
    says, reports it, and checks the other shards."""
    import s3fs

    from helpers import make_bucket
    from latency_proxy import LatencyProxy
    from mmdata.verify import check_dataset
    make_bucket(s3, "mm-verify")
    fs = s3fs.S3FileSystem(**s3)
    fs.put(str(demo_dataset), "mm-verify/demo", recursive=True)
    shard = Path(demo_dataset) / "shard-000001.tar"
    fs.pipe("mm-verify/demo/shard-000001.tar", shard.read_bytes() + bytes(32 << 20))
    with LatencyProxy(s3["endpoint_url"], delay_s=0.0) as proxy:
        report = check_dataset("s3://mm-verify/demo", {**s3, "endpoint_url": proxy.url})
        fetched = proxy.body_bytes
    size = shard.stat().st_size
    assert f"shard-000001.tar: larger than the {size} bytes dataset.json says (not read further); it was " \
           f"replaced: rebuild the dataset" in report.problems
    assert report.samples == 48 - pq.read_metadata(Path(demo_dataset) / "index" / "shard-000001.parquet").num_rows
    assert fetched < 8 << 20    # the dataset once, not the 32 MB behind the replaced shard's first bytes
