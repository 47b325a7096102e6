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
