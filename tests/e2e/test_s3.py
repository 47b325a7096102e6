"""Object storage: input and output on s3:// (a moto server on loopback), same shard bytes as local."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

from helpers import dataset_files, preprocess_config
from mmdata.pipeline import preprocess

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def s3_endpoint():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.2)
    yield url
    server.terminate()
    server.wait(timeout=30)


def test_s3_input_and_output(demo_dir, tmp_path, s3_endpoint):
    import boto3
    import s3fs
    client = boto3.client("s3", endpoint_url=s3_endpoint, aws_access_key_id="k", aws_secret_access_key="s",
                          region_name="us-east-1")
    client.create_bucket(Bucket="mm-in")
    client.create_bucket(Bucket="mm-out")
    options = {"endpoint_url": s3_endpoint, "key": "k", "secret": "s"}
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
