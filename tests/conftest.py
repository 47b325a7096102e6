"""Shared fixtures: generated demo data and config builders. Nothing here touches the network."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    """48 demo samples (every modality, JPEG/PNG, WAV/FLAC, some modalities missing, odd ids)."""
    from mmdata.demo import generate_demo
    out = tmp_path_factory.mktemp("demo")
    generate_demo(out, 48, seed=1)
    return out


@pytest.fixture(scope="session")
def demo_dataset(demo_dir, tmp_path_factory) -> str:
    """The 48 demo samples preprocessed into 10 small shards (5 samples each, one of 3)."""
    from helpers import preprocess_config
    from mmdata.prep.pipeline import preprocess
    root = tmp_path_factory.mktemp("dataset")
    config = preprocess_config(demo_dir / "manifest.jsonl", root, "output.samples_per_shard=5")
    return preprocess(config, log=lambda _: None).dataset


@pytest.fixture(scope="session")
def s3():
    """A moto S3 server on loopback for the session; yields s3fs storage options for it."""
    from helpers import start_moto
    started = start_moto()
    if started is None:
        pytest.fail("moto server did not start")
    server, options = started
    yield options
    server.terminate()
    server.wait(timeout=30)


@pytest.fixture()
def http_server():
    """A static-file HTTP server on loopback answering byte ranges (as web servers and object stores do);
    yields a function that serves a directory and returns its URL."""
    import functools
    import threading
    from http.server import ThreadingHTTPServer
    from helpers import RangeRequestHandler
    servers = []

    def serve(directory: str) -> str:
        server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(RangeRequestHandler, directory=directory))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()
