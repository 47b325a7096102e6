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
    from mmdata.pipeline import preprocess
    root = tmp_path_factory.mktemp("dataset")
    config = preprocess_config(demo_dir / "manifest.jsonl", root, "output.samples_per_shard=5")
    return preprocess(config, log=lambda _: None).dataset
