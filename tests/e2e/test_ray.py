"""Ray: a local instance and a real two-node cluster give the serial executor's bytes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from helpers import dataset_files, free_port, preprocess_config
from mmdata.config import to_dict
from mmdata.prep.pipeline import preprocess

pytestmark = [pytest.mark.ray, pytest.mark.slow]
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


@pytest.fixture(scope="module")
def reference(demo_dir, tmp_path_factory):
    return preprocess(preprocess_config(demo_dir / "manifest.jsonl", tmp_path_factory.mktemp("ref")),
                      log=lambda _: None)


def test_local_ray_instance_gives_identical_bytes(demo_dir, tmp_path, reference):
    import ray
    config = preprocess_config(demo_dir / "manifest.jsonl", tmp_path, "ray.executor=ray", "ray.num_cpus=2")
    try:
        result = preprocess(config, log=lambda _: None)
    finally:
        ray.shutdown()
    assert result.partitions_built == 4
    assert dataset_files(result.dataset) == dataset_files(reference.dataset)


WAIT_FOR_NODES = """
import sys, time, ray
ray.init(address=sys.argv[1], logging_level="ERROR")
deadline = time.monotonic() + 120
while sum(node["Alive"] for node in ray.nodes()) < int(sys.argv[2]):
    if time.monotonic() > deadline:
        sys.exit(f"the Ray cluster at {sys.argv[1]} has fewer than {sys.argv[2]} live nodes after 120 s")
    time.sleep(0.2)
"""


@pytest.fixture()
def two_node_cluster():
    """`ray start --head` plus a second node joined to it, on loopback; stopped afterwards."""
    env = {**os.environ, **RAY_ENV}
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    port = free_port()
    address = f"127.0.0.1:{port}"
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--disable-usage-stats"]
    try:
        subprocess.run([ray_bin, "start", "--head", f"--port={port}", "--include-dashboard=false", *common],
                       env=env, check=True, capture_output=True, timeout=180)
        subprocess.run([ray_bin, "start", f"--address={address}", *common],
                       env=env, check=True, capture_output=True, timeout=180)
        # `ray start` returns before the second node has registered; a job started at once can finish on
        # the head node alone (seen in CI), so wait until the cluster says both nodes are alive
        subprocess.run([sys.executable, "-c", WAIT_FOR_NODES, address, "2"], env=env, check=True, timeout=180)
        yield address
    finally:
        subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True, timeout=180)


def test_two_node_cluster_runs_partitions_on_both_nodes(demo_dir, tmp_path, reference, two_node_cluster):
    config = preprocess_config(demo_dir / "manifest.jsonl", tmp_path / "out", "ray.executor=ray",
                               "output.samples_per_shard=6")
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(to_dict(config)))
    env = {**os.environ, **RAY_ENV, "RAY_ADDRESS": two_node_cluster}
    run = subprocess.run([sys.executable, "-m", "mmdata.cli", "preprocess", str(path)], env=env,
                         capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "on 2 node(s)" in run.stdout
    assert "8 partitions built" in run.stdout
    dataset = run.stdout.split("dataset    ")[1].split()[0]
    from mmdata.verify import verify
    problems, checked = verify(dataset)
    assert problems == [] and checked == 48
