"""Checkpoints: one directory per step, written atomically, the last K kept.

    <run_dir>/checkpoints/step-00000300/{state.pt, meta.json}

``state.pt`` holds only tensors and plain data (model, optimizer, scheduler,
RNG states, loader state), so it loads with ``weights_only=True``: loading a
checkpoint never runs code from it. ``load_latest`` passes over newer checkpoints
that do not load (a truncated copy, garbage), naming each, and renames them
``bad-step-N`` when a run resumes, so that pruning never keeps them over good ones.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from mmdata.config import ConfigError
from mmdata.schema import one_line
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
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise ValueError(f"checkpoint {path} has format {found}; this mmtrain reads {FORMAT_VERSION}")
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"state.pt holds a {type(state).__name__}, not a checkpoint's dict")
    return state, meta


TRAINING_KEYS = ("model", "optimizer", "scheduler", "step", "rng", "loader")   # what a resume needs


class CheckpointError(ConfigError):
    """No checkpoint of a run can be read (each one is named, with why); the key to change is train.run_dir."""

    def __init__(self, message: str):
        super().__init__("train.run_dir", message)


def load_latest(run_dir: str | Path, warn=None, move_bad: bool = False,
                required: tuple[str, ...] = ("model",)) -> tuple[Path, dict, dict] | None:
    """The newest checkpoint that loads and has the ``required`` keys, as (path, state, meta); None when the
    run has none. Newer ones that do not load (truncated, garbage, another format) are passed over, each
    named in ``warn(message)``; with ``move_bad`` they are also renamed ``bad-step-N`` once a good one is
    found, so that pruning and later saves see only good ones (nothing is deleted). Raises CheckpointError
    when none loads (and then moves nothing: a rerun must not silently start over in that directory)."""
    bad: list[tuple[Path, str]] = []
    for path in reversed(all_checkpoints(checkpoint_dir(run_dir))):
        try:
            state, meta = load(path)
            missing = [k for k in required if k not in state]
            if missing:
                raise ValueError(f"it has no {', '.join(missing)}")
        except Exception as e:  # noqa: BLE001 - whatever is wrong with the files, this one is unusable
            # the type says what failed when the message alone does not (JSONDecodeError, UnpicklingError)
            name = type(e).__name__
            text = one_line(e, 200 - len(name) - 2)
            bad.append((path, text if text == name else f"{name}: {text}"))
            continue
        for old, reason in bad:
            moved = set_aside(old) if move_bad else None
            if warn is not None:
                warn(f"checkpoint {old} cannot be read ({reason})" + (f"; moved to {moved.name}" if moved else "")
                     + f"; using {path.name} (step {meta.get('step')}) instead")
        return path, state, meta
    if bad:
        names = ", ".join(p.name for p, _ in bad)
        raise CheckpointError(f"no checkpoint in {checkpoint_dir(run_dir)} can be read ({names}; the newest: "
                              f"{bad[0][1][:120]}); to start over, use another train.run_dir")
    return None


def set_aside(path: Path) -> Path | None:
    """Rename an unreadable checkpoint out of the way (``bad-step-N``, ``bad-step-N.2``...); None if it cannot be."""
    target = path.with_name(f"bad-{path.name}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"bad-{path.name}.{n}")
    try:
        os.replace(path, target)
    except OSError:
        return None
    return target

