"""Helpers shared by tests (importable because pyproject sets pythonpath = ["tests"])."""

from __future__ import annotations

import io
import json
import os
import re
from http.server import SimpleHTTPRequestHandler
from pathlib import Path


def preprocess_config(manifest, root, *overrides: str):
    """A small, fast PreprocessConfig for tests (serial executor unless overridden)."""
    from mmdata.config import load_config
    from mmdata.prep.config import PreprocessConfig
    base = [f"input.manifest={manifest}", f"output.root={root}", "output.name=t",
            "output.samples_per_shard=12", "text.vocab_size=128", "text.max_tokens=24",
            "image.size=32", "audio.n_mels=32", "audio.max_seconds=2.0", "progress=false",
            "ray.executor=serial", "max_error_rate=0.5"]
    return load_config(PreprocessConfig, None, [*base, *overrides])


def partitioned_job(manifest, root, samples_per_shard: int):
    """(a Job as the driver makes it, the input's partitions) for tests of one partition at a time."""
    from mmdata import storage
    from mmdata.prep.partition import Job
    from mmdata.prep.pipeline import STORE, get_tokenizer, iter_partitions, job_salt, label_mapping, scan_input
    config = preprocess_config(manifest, root, f"output.samples_per_shard={samples_per_shard}")
    scan = scan_input(config)
    tokenizer, labels = get_tokenizer(config, scan), label_mapping(scan)
    job = Job(config, tokenizer, labels, job_salt(config, tokenizer, labels), storage.join(str(root), STORE))
    return job, list(iter_partitions(config, scan))


def dataset_files(dataset: str | Path) -> dict[str, bytes]:
    """Every file of a dataset directory by relative name (to compare runs byte for byte).

    dataset.json records the full config, including where the output went and which
    executor ran; those legitimately differ between compared runs and are blanked.
    """
    root = Path(dataset)
    files = {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    description = json.loads(files["dataset.json"])
    description["config"]["output"]["root"] = description["config"]["ray"] = None
    files["dataset.json"] = json.dumps(description, sort_keys=True).encode()
    return files


def loader_config(*datasets: str, **overrides):
    """A LoaderConfig over dataset directories, small and fast for tests."""
    from mmdata.config import from_dict, validate_tree
    from mmdata.load.loader import LoaderConfig
    # two batches per worker message by default, so that tests cross message boundaries
    data = {"datasets": [{"path": str(d)} for d in datasets], "batch_size": 4, "num_workers": 0,
            "shuffle_window": 3, "message_samples": 8}
    data.update(overrides)
    config = from_dict(LoaderConfig, data)
    validate_tree(config)
    return config


def batch_ids(loader) -> list[list[str]]:
    return [list(batch["ids"]) for batch in loader]


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto():
    """A moto S3 server on a free loopback port: (its process, s3fs storage options for it); None when it
    did not start within a minute."""
    import socket
    import subprocess
    import sys
    import time
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server, {"endpoint_url": f"http://127.0.0.1:{port}", "key": "k", "secret": "s"}
        except OSError:
            if time.time() > deadline or server.poll() is not None:
                server.terminate()
                return None
            time.sleep(0.2)


def make_bucket(options: dict, name: str):
    """Create bucket ``name`` on the test S3 server; returns a boto3 client."""
    import boto3
    client = boto3.client("s3", endpoint_url=options["endpoint_url"], aws_access_key_id=options["key"],
                          aws_secret_access_key=options["secret"], region_name="us-east-1")
    client.create_bucket(Bucket=name)
    return client


def experiment_config(dataset: str, run_dir, *overrides: str):
    """A tiny, fast ExperimentConfig over an existing dataset directory."""
    from mmdata.config import load_config
    from mmtrain.config import ExperimentConfig
    base = [f"data.dataset={dataset}", f"train.run_dir={run_dir}", "data.eval_fraction=0.2",
            "data.loader.batch_size=8", "data.loader.num_workers=0",
            "model.dim=32", "model.heads=2", "model.embed_dim=32", "model.patch_size=8",
            "model.text_layers=1", "model.image_layers=1", "model.audio_layers=1", "model.fusion_layers=1",
            "optim.lr=0.003", "optim.warmup_steps=2", "train.steps=20", "train.eval_every=0",
            "train.checkpoint_every=0", "train.log_every=1", "train.progress=false"]
    return load_config(ExperimentConfig, None, [*base, *overrides])


def metrics_lines(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


class RangeRequestHandler(SimpleHTTPRequestHandler):
    """Static files, with single byte ranges (`Range: bytes=a-b`), which http.server alone ignores."""

    def log_message(self, *args) -> None:
        pass

    def send_head(self):
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        path = self.translate_path(self.path)
        if not match or not os.path.isfile(path):
            return super().send_head()
        size = os.path.getsize(path)
        start, end = int(match[1]), min(int(match[2] or size - 1), size - 1)
        with open(path, "rb") as f:
            f.seek(start)
            body = f.read(end - start + 1)
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        return io.BytesIO(body)
