"""Checkpoints: one directory per step, written atomically, the last K kept.

    <run_dir>/checkpoints/step-00000300/{state.pt, meta.json}

``state.pt`` holds only tensors and plain data (model, optimizer, scheduler,
RNG states, loader state), so it loads with ``weights_only=True``: loading a
checkpoint never runs code from it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from mmdata.storage import temp_path

FORMAT_VERSION = 1


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save(run_dir: str | Path, step: int, state: dict, meta: dict, keep_last: int) -> Path:
    """Write ``state`` for ``step``; complete under its final name or not at all."""
    root = checkpoint_dir(run_dir)
    final = root / f"step-{step:08d}"
    tmp = temp_path(final)
    tmp.mkdir(parents=True)
    torch.save(state, tmp / "state.pt")
    (tmp / "meta.json").write_text(json.dumps({"format": FORMAT_VERSION, "step": step, **meta}, indent=1))
    for f in tmp.iterdir():
        with open(f, "rb") as handle:
            os.fsync(handle.fileno())
    if final.exists():  # the same step again (a resumed run re-saving): replace
        shutil.rmtree(final)
    os.replace(tmp, final)
    prune(root, keep_last)
    return final


def prune(root: Path, keep_last: int) -> None:
    for old in all_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".step-*.tmp"):  # left by a run killed mid-save
        shutil.rmtree(stale, ignore_errors=True)


def all_checkpoints(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("step-*") if (p / "meta.json").exists())


def latest(run_dir: str | Path) -> Path | None:
    found = all_checkpoints(checkpoint_dir(run_dir))
    return found[-1] if found else None


def load(path: Path) -> tuple[dict, dict]:
    meta = json.loads((path / "meta.json").read_text())
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"checkpoint {path} has format {meta.get('format')}; this mmtrain reads {FORMAT_VERSION}")
    return torch.load(path / "state.pt", map_location="cpu", weights_only=True), meta
