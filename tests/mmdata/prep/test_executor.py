"""Choosing an executor: the driver's reuse check, auto's rule, and imports that follow the modalities."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from helpers import partitioned_job, preprocess_config
from mmdata.config import to_dict
from mmdata.prep.config import RayConfig
from mmdata.prep.executor import (ProcessExecutor, RayExecutor, SerialExecutor, executor_settled, make_executor,
                                  worth_parallel)
from mmdata.prep.partition import partition_keys, run_partition
from mmdata.prep import pipeline
from mmdata.prep.pipeline import ReuseCheck

HEAVY = ("torch", "torchaudio", "ray")


def loaded_after(code: str) -> dict:
    """Which heavy modules a fresh interpreter has imported after running ``code``."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps({{m: m in sys.modules for m in {HEAVY!r}}}))"
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.splitlines()[-1])


def test_importing_the_pipeline_imports_neither_torch_nor_ray():
    assert loaded_after("import mmdata.prep.pipeline, mmdata.prep.config, mmdata.prep.executor") == \
        {m: False for m in HEAVY}


def test_a_job_without_audio_runs_in_process_without_torch(demo_dir, tmp_path):
    rows = [json.loads(line) for line in (demo_dir / "manifest.jsonl").read_text().splitlines()]
    manifest = tmp_path / "no_audio.jsonl"
    manifest.write_text("".join(json.dumps({**{k: v for k, v in r.items() if k != "audio"},
                                            "image": str(demo_dir / r["image"]) if r.get("image") else None}) + "\n"
                                for r in rows[:20]))
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(to_dict(preprocess_config(manifest, tmp_path / "out", "ray.executor=auto"))))
    code = f"from mmdata.cli import main; assert main(['preprocess', {str(path)!r}]) == 0"
    assert loaded_after(code) == {m: False for m in HEAVY}
    assert len(list((tmp_path / "out").glob("t-*/shard-*.tar"))) == 2


def ray_config(**kw) -> RayConfig:
    return RayConfig(**{"executor": "auto", "num_cpus": 2, "auto_min_samples": 100, **kw})


def test_auto_runs_in_process_until_a_pool_of_processes_saves_its_start_up(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    config = ray_config()
    # 2 cores: the pool takes all but the longest queue (an even share, or the largest partition) off the one core
    assert isinstance(make_executor(config, samples=150, largest=50), SerialExecutor)    # saves 75
    assert isinstance(make_executor(config, samples=200, largest=50), ProcessExecutor)   # saves 100
    assert isinstance(make_executor(config, samples=300, largest=250), SerialExecutor)   # one big partition: 50
    assert isinstance(make_executor(config, samples=1000, largest=1000), SerialExecutor)  # one partition: 0
    assert isinstance(make_executor(replace(config, num_cpus=1), 10**6, 10), SerialExecutor)
    assert isinstance(make_executor(replace(config, auto_min_samples=0), 1, 1), ProcessExecutor)
    assert isinstance(make_executor(config), ProcessExecutor)   # work not counted: parallel
    assert not worth_parallel(config, 150, 50) and worth_parallel(config, 200, 50)
    # named executors, whatever the work
    assert isinstance(make_executor(replace(config, executor="serial"), 10**6, 10), SerialExecutor)
    assert isinstance(make_executor(replace(config, executor="processes"), 1, 1), ProcessExecutor)
    assert isinstance(make_executor(replace(config, executor="ray"), 1, 1), RayExecutor)


def test_a_cluster_address_always_gets_the_work(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert isinstance(make_executor(ray_config(address="auto"), 1, 1), RayExecutor)
    assert isinstance(make_executor(ray_config(address="10.0.0.1:6379"), 1, 1), RayExecutor)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert isinstance(make_executor(ray_config(), 1, 1), RayExecutor)
    assert executor_settled(ray_config(), 1, 1, 1)   # the first partition to build settles it
    # a pool of processes is a named choice still
    assert isinstance(make_executor(ray_config(executor="processes"), 10**6, 10), ProcessExecutor)


def test_the_driver_looks_ahead_only_as_far_as_the_choice_needs(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    auto = ray_config()
    assert not executor_settled(auto, 0, 0, 0)            # nothing to build yet: look on
    assert not executor_settled(auto, 3, 150, 50)         # might still become worth a pool of processes
    assert executor_settled(auto, 4, 200, 50)             # processes, whatever follows
    assert executor_settled(replace(auto, num_cpus=1), 1, 50, 50)          # one core: in-process
    assert executor_settled(replace(auto, executor="serial"), 1, 50, 50)
    assert executor_settled(replace(auto, executor="ray"), 1, 50, 50)
    assert executor_settled(replace(auto, executor="processes"), 1, 50, 50)


@pytest.fixture()
def job_and_partitions(demo_dir, tmp_path):
    return partitioned_job(demo_dir / "manifest.jsonl", tmp_path, 10)


def test_the_reuse_check_hands_out_only_what_the_store_lacks(job_and_partitions):
    job, partitions = job_and_partitions
    built = [run_partition(job, *partitions[k]) for k in (0, 2)]
    with ReuseCheck(job, iter(partitions)) as check:
        missing = list(check)
    assert sorted(s.partition for s in check.reused) == [0, 2]
    assert all(s.reused for s in check.reused) and [s.fingerprint for s in check.reused] == \
        [s.fingerprint for s in built]
    assert [p[0] for p in missing] == [1, 3, 4]
    assert [p[3] for p in missing] == [partition_keys(job, *partitions[k]) for k in (1, 3, 4)]
    assert (check.count, check.samples, check.largest) == (3, 28, 10)
    # a partition built with the driver's keys is what the task would have made of it
    again = run_partition(job, *missing[0])
    assert again.fingerprint == missing[0][3].fingerprint and not again.reused


def test_after_stop_checking_the_rest_goes_to_the_tasks_unchecked(job_and_partitions, monkeypatch):
    job, partitions = job_and_partitions
    monkeypatch.setattr(pipeline, "CHECK_THREADS", 1)   # partitions 0 and 1 checked ahead, no more
    stored = run_partition(job, *partitions[4])
    with ReuseCheck(job, iter(partitions)) as check:
        check.look_ahead(lambda: check.count >= 1)
        check.stop_checking()
        handed = list(check)
    assert [p[0] for p in handed] == [0, 1, 2, 3, 4] and check.reused == []
    assert [p[3] is not None for p in handed] == [True, True, False, False, False]
    assert run_partition(job, *handed[4]) == replace(stored, reused=True)   # the task finds it in the store


class DiesWhenUnpickled:
    """A partition's rows that end the worker process receiving them, as a crash or the OOM killer would."""

    def __reduce__(self):
        return os._exit, (9,)


def test_processes_give_the_serial_bytes_and_a_dead_worker_is_one_line_naming_the_partition(job_and_partitions):
    job, partitions = job_and_partitions
    executor = ProcessExecutor(RayConfig(executor="processes", num_cpus=2))
    executor.start(job, ["text", "image", "audio"])
    summaries = sorted(executor.run(job, iter(partitions)), key=lambda s: s.partition)
    assert [s.partition for s in summaries] == [0, 1, 2, 3, 4] and not any(s.reused for s in summaries)
    serial = [run_partition(replace(job, store=job.store + "-serial"), *p) for p in partitions]
    assert [s.fingerprint for s in summaries] == [s.fingerprint for s in serial]
    for s in summaries:   # the same files, byte for byte, partition by partition
        pooled, alone = Path(job.store) / s.fingerprint, Path(job.store + "-serial") / s.fingerprint
        files = sorted(str(p.relative_to(pooled)) for p in pooled.rglob("*") if p.is_file())
        assert files == sorted(str(p.relative_to(alone)) for p in alone.rglob("*") if p.is_file())
        assert any(f.endswith(".tar") for f in files)
        assert all((pooled / f).read_bytes() == (alone / f).read_bytes() for f in files if f != "summary.json")
    with pytest.raises(ChildProcessError, match=r"^a worker process died while building partition 7 .*rerun the same"):
        list(ProcessExecutor(RayConfig(num_cpus=1)).run(job, [(7, DiesWhenUnpickled(), set())]))
