"""Object storage: input and output on s3:// (a moto server on loopback), same shard bytes as local."""

from __future__ import annotations

import pytest

from helpers import dataset_files, make_bucket, preprocess_config
from mmdata.prep.pipeline import preprocess

pytestmark = pytest.mark.slow


def test_s3_input_and_output(demo_dir, tmp_path, s3):
    import s3fs
    make_bucket(s3, "mm-in")
    make_bucket(s3, "mm-out")
    options = s3
    fs = s3fs.S3FileSystem(**options)
    fs.put(str(demo_dir), "mm-in/demo", recursive=True)
    storage = [f"input.storage_options={options}", f"output.storage_options={options}"]
    local = preprocess(preprocess_config(demo_dir / "manifest.jsonl", tmp_path), log=lambda _: None)
    remote_config = preprocess_config("s3://mm-in/demo/manifest.jsonl", "s3://mm-out/datasets", *storage)
    remote = preprocess(remote_config, log=lambda _: None)
    assert remote.dataset.startswith("s3://mm-out/datasets/t-")
    assert remote.totals == local.totals
    fs.invalidate_cache()
    for name, data in dataset_files(local.dataset).items():
        if name.startswith("shard-") or name.startswith("index/"):
            assert fs.cat_file(f"{remote.dataset[5:]}/{name}") == data, name
    assert fs.exists(f"{remote.dataset[5:]}/dataset.json")
    again = preprocess(remote_config, log=lambda _: None)
    assert again.reused_dataset and again.partitions_built == 0


def test_a_change_on_s3_reuses_the_members_kept_there(demo_dir, tmp_path, s3):
    import s3fs
    make_bucket(s3, "mm-rebuild")
    fs = s3fs.S3FileSystem(**s3)
    storage = f"output.storage_options={s3}"
    preprocess(preprocess_config(demo_dir / "manifest.jsonl", "s3://mm-rebuild/datasets", storage),
               log=lambda _: None)
    changed = preprocess(preprocess_config(demo_dir / "manifest.jsonl", "s3://mm-rebuild/datasets", storage,
                                           "image.size=40"), log=lambda _: None)
    assert {g: (u["built"], u["reused"]) for g, u in changed.lineage.items()} == \
        {"text": (0, 4), "image": (4, 0), "audio": (0, 4), "waveform": (0, 4)}
    assert len(changed.lineage["audio"]["from"]) == 1   # the first dataset, found in the bucket
    local = preprocess(preprocess_config(demo_dir / "manifest.jsonl", tmp_path, "image.size=40"),
                       log=lambda _: None)
    fs.invalidate_cache()
    for name, data in dataset_files(local.dataset).items():
        if name.startswith("shard-") or name.startswith("index/") or name == "errors.jsonl":
            assert fs.cat_file(f"{changed.dataset[5:]}/{name}") == data, name
