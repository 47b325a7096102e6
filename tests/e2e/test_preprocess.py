"""preprocess end to end: the dataset directory is the contract (serial executor; Ray in test_ray.py)."""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
import zlib

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from helpers import dataset_files, preprocess_config
from mmdata.verify import verify
from mmdata.prep.pipeline import preprocess
from mmdata.schema import make_key


@pytest.fixture(scope="module")
def demo_result(demo_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("out")
    config = preprocess_config(demo_dir / "manifest.jsonl", root)
    return config, preprocess(config, log=lambda _: None)


def manifest_rows(demo_dir):
    return [json.loads(line) for line in (demo_dir / "manifest.jsonl").read_text().splitlines()]


def test_every_input_sample_is_written_or_rejected(demo_result, demo_dir):
    _, result = demo_result
    t = result.totals
    assert t.samples_in == len(manifest_rows(demo_dir)) == 48
    assert t.written + t.rejected == t.samples_in
    assert t.rejected == 0  # the demo data is clean
    description = json.loads(open(f"{result.dataset}/dataset.json").read())
    assert [s["name"] for s in description["shards"]] == [f"shard-{k:06d}.tar" for k in range(4)]
    assert sum(s["samples"] for s in description["shards"]) == t.written
    assert description["labels"] == {name: i for i, name in enumerate(sorted(description["labels"]))}


def test_plain_webdataset_reads_every_sample(demo_result, demo_dir):
    config, result = demo_result
    urls = f"{result.dataset}/shard-{{000000..000003}}.tar"
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    rows = {r["id"]: r for r in manifest_rows(demo_dir)}
    assert len(samples) == 48
    for sample in samples:
        meta = json.loads(sample["json"])
        row = rows[meta["id"]]
        assert sample["__key__"] == make_key(meta["id"])
        assert meta["meta"]["colour"] == row["colour"]
        if row.get("text"):
            assert sample["txt"].decode() == row["text"]
            tokens = np.load(io.BytesIO(sample["tokens.npy"]), allow_pickle=False)
            assert tokens.dtype == np.int32 and tokens.ndim == 1 and len(tokens) <= 24
        if row.get("image"):
            assert Image.open(io.BytesIO(sample["jpg"])).size == (32, 32)
            with Image.open(demo_dir / row["image"]) as original:
                assert (meta["image"]["width"], meta["image"]["height"]) == original.size
        else:
            assert "jpg" not in sample
        if row.get("audio"):
            mel = np.load(io.BytesIO(sample["mel.npy"]), allow_pickle=False)
            assert mel.dtype == np.float16 and mel.shape[0] == 32
            assert meta["audio"]["frames"] == mel.shape[1]
        assert int(sample["cls"]) == meta["label"]


def test_unusual_ids_survive_in_the_json(demo_result, demo_dir):
    _, result = demo_result
    odd = [r["id"] for r in manifest_rows(demo_dir) if make_key(r["id"]) != r["id"]]
    assert odd, "the demo data should contain ids with dots, slashes or spaces"
    ids = {json.loads(s["json"])["id"] for s in wds.WebDataset(f"{result.dataset}/shard-{{000000..000003}}.tar",
                                                              shardshuffle=False)}
    assert set(odd) <= ids


def test_tar_lists_the_shards(demo_result):
    _, result = demo_result
    listing = subprocess.run(["tar", "tvf", f"{result.dataset}/shard-000000.tar"], capture_output=True,
                             text=True, check=True).stdout.splitlines()
    assert len(listing) >= 12 and all("0/0" in line and "1970-01-01" in line for line in listing)


def test_index_points_at_every_member(demo_result):
    _, result = demo_result
    total = 0
    for k in range(4):
        data = open(f"{result.dataset}/shard-{k:06d}.tar", "rb").read()
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            payloads = {m.name: tar.extractfile(m).read() for m in tar}
        rows = pq.read_table(f"{result.dataset}/index/shard-{k:06d}.parquet").to_pylist()
        for row in rows:
            assert row["shard"] == f"shard-{k:06d}.tar"
            for m in row["members"]:
                assert data[m["offset"]: m["offset"] + m["size"]] == payloads[f"{row['key']}.{m['ext']}"]
                assert m["crc32"] == zlib.crc32(payloads[f"{row['key']}.{m['ext']}"])
            assert row["has_image"] == (row["image_width"] is not None)
            assert row["has_audio"] == (row["audio_frames"] is not None)
        total += len(rows)
    assert total == 48


def test_verify_and_info_agree(demo_result):
    from mmdata.verify import describe
    _, result = demo_result
    problems, checked = verify(result.dataset)
    assert problems == [] and checked == 48
    text = describe(result.dataset)
    assert "48 written / 48 input" in text and "shards       4" in text


def test_verify_catches_a_damaged_shard(demo_result, tmp_path):
    import shutil
    _, result = demo_result
    copy = tmp_path / "copy"
    shutil.copytree(result.dataset, copy)
    shard = copy / "shard-000001.tar"
    data = bytearray(shard.read_bytes())
    shard.unlink()  # it is a hard link into the store: never modify in place
    shard.write_bytes(bytes(data[: len(data) // 2]))
    problems, _ = verify(str(copy))
    assert any("shard-000001.tar" in p for p in problems)


def test_rerun_reuses_the_dataset(demo_result):
    config, first = demo_result
    again = preprocess(config, log=lambda _: None)
    assert again.reused_dataset and again.partitions_built == 0
    assert again.dataset == first.dataset


def test_same_input_gives_the_same_bytes_and_other_config_a_new_dataset(demo_result, demo_dir, tmp_path):
    config, first = demo_result
    second = preprocess(preprocess_config(demo_dir / "manifest.jsonl", tmp_path), log=lambda _: None)
    assert second.fingerprint == first.fingerprint
    assert dataset_files(second.dataset) == dataset_files(first.dataset)
    third = preprocess(preprocess_config(demo_dir / "manifest.jsonl", tmp_path, "image.size=24"),
                       log=lambda _: None)
    assert third.fingerprint != first.fingerprint and third.partitions_built == 4


def test_latest_symlink_points_at_the_dataset(demo_result):
    config, result = demo_result
    from pathlib import Path
    assert (Path(config.output.root) / "t").resolve() == Path(result.dataset).resolve()


@pytest.mark.filterwarnings("ignore:String specifications for transformations:UserWarning")
def test_wids_reads_the_dataset_through_the_emitted_index(demo_result):
    import wids
    from mmdata.dataset import write_wids_index
    _, result = demo_result
    index = write_wids_index(result.dataset)
    dataset = wids.ShardListDataset(index)
    assert len(dataset) == 48
    sample = dataset[13]
    first_shard = list(wds.WebDataset(f"{result.dataset}/shard-000001.tar", shardshuffle=False))
    assert sample["__key__"] == first_shard[1]["__key__"]
    assert sample[".json"]["id"] == json.loads(first_shard[1]["json"])["id"]  # wids decodes json itself
