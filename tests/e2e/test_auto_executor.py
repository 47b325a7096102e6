"""ray.executor=auto end to end: a rerun with nothing to build starts no executor and imports neither torch nor Ray;
a small job runs in-process; work above the threshold runs on a pool of local processes; any work with a cluster
address goes to Ray; every path gives the serial executor's bytes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from helpers import dataset_files, preprocess_config
from mmdata.config import to_dict
from mmdata.prep.pipeline import preprocess

QUIET = {"log": lambda _: None}


@pytest.fixture(scope="module")
def reference(demo_dir, tmp_path_factory):
    """The 48 demo samples built by the serial executor (the tests' default)."""
    return preprocess(preprocess_config(demo_dir / "manifest.jsonl", tmp_path_factory.mktemp("ref")), **QUIET)


def write_yaml(path, config) -> str:
    path.write_text(yaml.safe_dump(to_dict(config)))
    return str(path)


def run_cli(config_path: str, env: dict | None = None) -> tuple[str, dict]:
    """`mmdata preprocess` in a fresh interpreter: its output, and whether it imported torch / Ray."""
    code = ("import json, sys\nfrom mmdata.cli import main\nrc = main(['preprocess', sys.argv[1]])\n"
            "print(json.dumps({'rc': rc, 'torch': 'torch' in sys.modules, 'torchaudio': 'torchaudio' in sys.modules, "
            "'ray': 'ray' in sys.modules}))")
    run = subprocess.run([sys.executable, "-c", code, config_path], capture_output=True, text=True, timeout=400,
                         env={**os.environ, **(env or {})})
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout, json.loads(run.stdout.splitlines()[-1])


def test_a_rerun_with_nothing_to_build_starts_no_executor_and_imports_neither_torch_nor_ray(demo_dir, tmp_path):
    config = preprocess_config(demo_dir / "manifest.jsonl", tmp_path / "out", "ray.executor=auto")
    first = preprocess(config, **QUIET)
    assert first.partitions_built == 4 and first.executor == "serial"
    out, loaded = run_cli(write_yaml(tmp_path / "job.yaml", config))
    assert "reused dataset (nothing to do)" in out and "executor none" in out
    assert loaded == {"rc": 0, "torch": False, "torchaudio": False, "ray": False}
    again = preprocess(config, **QUIET)
    assert (again.partitions_reused, again.partitions_built, again.executor) == (4, 0, "none")
    assert again.phases["startup"] == again.phases["partitions"] == 0.0 and "fingerprint" in again.phases


def test_a_small_job_runs_in_process_and_gives_the_serial_bytes(demo_dir, tmp_path, reference):
    import torch
    threads = torch.get_num_threads()
    result = preprocess(preprocess_config(demo_dir / "manifest.jsonl", tmp_path, "ray.executor=auto"), **QUIET)
    assert (result.executor, result.partitions_built, result.nodes) == ("serial", 4, 1)
    assert dataset_files(result.dataset) == dataset_files(reference.dataset)
    assert torch.get_num_threads() == threads   # partitions build on one torch thread; the caller's is restored


def test_a_partly_built_job_builds_only_what_is_missing(demo_dir, tmp_path, reference):
    config = preprocess_config(demo_dir / "manifest.jsonl", tmp_path, "ray.executor=auto")
    first = preprocess(config, **QUIET)
    stored = sorted(p for p in (tmp_path / ".store").iterdir() if p.is_dir())   # not .store/.lock
    for folder in stored[:2]:
        (folder / "summary.json").unlink()   # as if killed before these two finished
    resumed = preprocess(config, **QUIET)
    assert (resumed.partitions_built, resumed.partitions_reused, resumed.executor) == (2, 2, "serial")
    assert resumed.dataset == first.dataset
    assert dataset_files(resumed.dataset) == dataset_files(reference.dataset)


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray instance on 2 CPUs for this module; yields its address (a cluster for a second driver)."""
    import ray
    from mmdata.prep.config import RayConfig
    from mmdata.prep.executor import init_ray
    init_ray(RayConfig(num_cpus=2))
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def test_auto_above_its_threshold_runs_a_pool_of_processes_with_the_serial_bytes(demo_dir, tmp_path, reference):
    # 4 partitions of 12 on 2 CPUs: the pool takes 24 samples off the one core, over a threshold of 10
    auto = preprocess(preprocess_config(demo_dir / "manifest.jsonl", tmp_path, "ray.executor=auto", "ray.num_cpus=2",
                                        "ray.auto_min_samples=10"), **QUIET)
    assert (auto.executor, auto.partitions_built) == ("processes", 4)
    assert dataset_files(auto.dataset) == dataset_files(reference.dataset)


@pytest.mark.ray
@pytest.mark.slow
def test_a_local_ray_instance_gives_the_serial_bytes(demo_dir, tmp_path, reference, local_ray):
    on_ray = preprocess(preprocess_config(demo_dir / "manifest.jsonl", tmp_path, "ray.executor=ray", "ray.num_cpus=2"),
                        **QUIET)
    assert (on_ray.executor, on_ray.partitions_built) == ("ray", 4)
    assert dataset_files(on_ray.dataset) == dataset_files(reference.dataset)


@pytest.mark.ray
@pytest.mark.slow
def test_ray_address_sends_even_a_small_job_to_the_cluster(demo_dir, tmp_path, reference, local_ray):
    config = preprocess_config(demo_dir / "manifest.jsonl", tmp_path / "out", "ray.executor=auto")
    out, loaded = run_cli(write_yaml(tmp_path / "job.yaml", config), {"RAY_ADDRESS": local_ray})
    assert "4 partitions built, 0 reused" in out and "executor ray" in out and loaded["ray"]
    dataset = out.split("dataset    ")[1].split()[0]
    assert dataset_files(dataset) == dataset_files(reference.dataset)
    # nothing left to build: the cluster is not even contacted
    out, loaded = run_cli(write_yaml(tmp_path / "job.yaml", config), {"RAY_ADDRESS": local_ray})
    assert "executor none" in out and not loaded["ray"]
