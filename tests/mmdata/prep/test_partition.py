"""A partition: one encoder shape for every modality, a typed summary that survives the store, executors that
differ only in scheduling."""

from __future__ import annotations

from dataclasses import replace

import pytest

from helpers import partitioned_job, preprocess_config
from mmdata import storage
from mmdata.prep.executor import SerialExecutor, make_executor, RayExecutor, run_with_progress
from mmdata.prep.members import raw_input
from mmdata.prep.partition import SUMMARY, Job, PartitionSummary, run_partition
from mmdata.prep.text import load_tokenizer


@pytest.fixture()
def job_and_partitions(demo_dir, tmp_path):
    return partitioned_job(demo_dir / "manifest.jsonl", tmp_path, 20)


def test_every_encoder_takes_raw_input_and_config_and_gives_members_and_info(job_and_partitions):
    job, partitions = job_and_partitions
    from mmdata.prep.audio import encode_audio
    from mmdata.prep.image import encode_image
    from mmdata.prep.text import encode_text
    tokenizer = load_tokenizer(job.tokenizer)
    encoders = {"text": lambda raw, config: encode_text(raw, config, tokenizer), "image": encode_image,
                "audio": encode_audio}
    record = next(r for r in partitions[0][1] if r.text and r.image and r.audio)
    for modality, encode in encoders.items():
        members, info = encode(raw_input(modality, getattr(record, modality), job), getattr(job.config, modality))
        assert members and all(isinstance(v, bytes) and v for v in members.values()), modality
        assert isinstance(info, dict) and info, modality
    assert set(encoders["image"](raw_input("image", record.image, job), job.config.image)[0]) == {"jpg"}


def test_a_summary_comes_back_from_the_store_as_it_was_built(job_and_partitions):
    job, partitions = job_and_partitions
    k, records, duplicates = partitions[1]
    built = run_partition(job, k, records, duplicates)
    assert not built.reused and built.partition == 1 and built.totals.samples_in == len(records) == 20
    assert [s.name for s in built.shards] == ["shard-000001.tar"]
    assert all(s.partition == 1 and s.fingerprint == built.fingerprint for s in built.shards)
    again = run_partition(job, k, records, duplicates)
    assert again == replace(built, reused=True)
    stored = storage.read_json(storage.join(job.store, built.fingerprint, SUMMARY), {})
    assert PartitionSummary.from_json(stored) == built


def test_the_serial_executor_runs_every_partition_in_order(job_and_partitions):
    job, partitions = job_and_partitions
    executor = make_executor(job.config.ray)
    assert isinstance(executor, SerialExecutor)
    summaries = run_with_progress(executor, job, reversed(partitions), 48, progress=False)
    assert [s.partition for s in summaries] == [0, 1, 2]
    assert sum(s.totals.samples_in for s in summaries) == 48
    assert isinstance(make_executor(replace(job.config.ray, executor="ray")), RayExecutor)


def test_file_identity_name_fingerprints_a_url_without_a_request(tmp_path):
    from mmdata.prep.partition import file_identity
    config = preprocess_config(tmp_path / "m.jsonl", tmp_path, "input.file_identity=name", "input.retries=0",
                               "input.timeout_s=2")
    url = "http://nowhere.invalid/cat.jpg"   # a request would fail: stat's identity says so
    assert file_identity(url, Job(config, b"", None, "", "")) == url
    stat = replace(config, input=replace(config.input, file_identity="stat"))
    assert file_identity(url, Job(stat, b"", None, "", "")) == [url, "unreadable"]
