"""Resuming a run: its run directory, the checkpoint it continues from, and the checks that it can.

A run directory is resumed by rerunning the same command: the newest readable checkpoint is loaded (unreadable
newer ones are set aside), after checking that it was trained on the same data with the same model settings,
and metrics.jsonl is trimmed back to its step.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from mmdata import ConfigError, LoaderError
from mmdata.config import to_dict
from mmdata.schema import one_line
from mmtrain import checkpoint
from mmtrain.config import ExperimentConfig
from mmtrain.data import data_changed_message
from mmtrain.distributed import Dist, broadcast_object
from mmtrain.report import warn

if TYPE_CHECKING:       # trainer imports this module: the state's type only for annotations
    from mmtrain.trainer import TrainState

# Settings that shape the model's parameters, the loader's state or the losses: a checkpoint resumes only
# under the ones it was trained with. (dropout, the initial temperature, image_weights and the rest of
# the config may change between runs.)
RESUME_SETTINGS = ("model.dim", "model.heads", "model.mlp_ratio", "model.text_layers", "model.image_encoder",
                   "model.image_layers", "model.patch_size", "model.image_stem", "model.image_pool", "model.cnn_arch",
                   "model.audio_layers", "model.audio_convs", "model.fusion_layers", "model.embed_dim", "model.max_positions",
                   "data.loader.modalities", "train.loss", "train.unimodal_weight", "train.seed")
# What a checkpoint written before a setting existed was built with: a patchify ViT with mean pooling, no audio
# convolutions, no per-modality classifiers.
BUILT_BEFORE = {"model.image_stem": "patch", "model.image_pool": "mean", "model.audio_convs": 0,
                "train.unimodal_weight": 0.0}


def check_run_dir(run_dir: str) -> None:
    """Fail before any work when the run directory (or its checkpoints folder) cannot be one: a file is in
    the way, or it cannot be created or written."""
    path = Path(run_dir)
    for p in (path, path / "checkpoints"):
        if p.exists() and not p.is_dir():
            raise ConfigError("train.run_dir", f"{p} is a file, not a directory; use another train.run_dir")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError("train.run_dir", f"{run_dir} cannot be created: {existing} is a file; "
                          f"use another train.run_dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError("train.run_dir", f"{existing} is not writable; use another train.run_dir")


def prepare_run_dir(run_dir: Path, config: ExperimentConfig, step: int) -> None:
    """On rank 0, before the first step: the run directory created, this run's config.yaml written, and
    metrics.jsonl trimmed to ``step``, the step training (re)starts from."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError("train.run_dir", f"{run_dir} cannot be created ({e.strerror or e}); use another "
                          f"train.run_dir") from None
    (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    trim_metrics(run_dir / "metrics.jsonl", step)


def resume(state: TrainState, config: ExperimentConfig, d: Dist, datasets: list[str]) -> None:
    """Load the run's newest readable checkpoint into ``state`` (nothing when the run has none), after
    checking that it was trained on this data with this model's settings (ConfigError naming what differs)."""
    resumed = resume_point(config, d)
    if resumed is None:
        return
    found, saved, meta = resumed
    now = state.loader.fingerprints()
    trained_on = saved["loader"].get("datasets", now) if isinstance(saved["loader"], dict) else now
    if trained_on != now:
        raise ConfigError("train.run_dir", data_changed_message(str(found), trained_on, datasets, now))
    if meta.get("vocab_size") != state.facts["vocab_size"]:
        raise ConfigError("data", f"checkpoint {found} was trained with vocab size {meta.get('vocab_size')}; "
                          f"this dataset's tokenizer has {state.facts['vocab_size']}: use another train.run_dir")
    check_same_settings(found, meta.get("config"), to_dict(config))
    try:
        state.load_state_dict(saved)
    except (RuntimeError, ValueError, KeyError, TypeError, LoaderError) as e:
        # settings the comparison above does not cover (or a checkpoint without its config)
        raise ConfigError("train.run_dir", f"checkpoint {found} does not fit this model and loader "
                          f"({one_line(e)}); resume with the settings it was trained with "
                          f"({found.parent.parent / 'config.yaml'}) or use another train.run_dir") from None
    if not d.is_main:
        state.skipped = 0          # the checkpoint holds the count over all ranks: rank 0 carries it on


def resume_point(config: ExperimentConfig, d: Dist) -> tuple[Path, dict, dict] | None:
    """The newest readable checkpoint of the run, or None. Rank 0 picks it (moving unreadable ones aside, with
    a warning naming each); the other ranks load the one it picked, so that every rank resumes at one step."""
    picked, found, error = None, None, None
    if d.is_main:
        try:
            found = checkpoint.load_latest(config.train.run_dir, warn=warn, move_bad=True,
                                           required=checkpoint.TRAINING_KEYS)
        except checkpoint.CheckpointError as e:
            error = e.detail
        picked = str(found[0]) if found else None
    picked, error = broadcast_object(d, (picked, error))
    if error is not None:       # on every rank, so that none waits for the others forever
        raise checkpoint.CheckpointError(error)
    if picked is None:
        return None
    if d.is_main:
        return found
    saved, meta = checkpoint.load(Path(picked))
    return Path(picked), saved, meta


def check_same_settings(found: Path, saved: dict | None, current: dict) -> None:
    """Name each setting that differs between the checkpoint's config and this one (before its state dicts
    would fail to load with a wall of parameter names)."""
    if not isinstance(saved, dict):
        return      # an older checkpoint without its config: load_state_dict decides

    def get(tree: dict, key: str):
        for part in key.split("."):
            if not isinstance(tree, dict) or part not in tree:
                return None
            tree = tree[part]
        return tree

    def comparable(key: str, value):
        if key == "train.loss":          # both and classify build the same model; contrastive has no head
            return value == "contrastive"
        if key == "train.unimodal_weight":   # only whether the per-modality classifiers exist matters
            return bool(value)
        if key == "data.loader.modalities" and isinstance(value, list):
            return sorted(value)         # the model orders them itself
        return value

    def used(key: str) -> bool:          # a setting of a part this model does not have cannot matter
        modalities = get(current, "data.loader.modalities") or []
        image = "image" in modalities
        vit = get(current, "model.image_encoder") == "vit"
        return {"model.text_layers": "text" in modalities, "model.audio_layers": "audio" in modalities,
                "model.audio_convs": "audio" in modalities,
                "model.image_encoder": image, "model.image_layers": image and vit,
                "model.patch_size": image and vit, "model.image_stem": image and vit,
                "model.image_pool": image and vit,
                "model.cnn_arch": image and not vit,
                "model.fusion_layers": get(current, "train.loss") != "contrastive",
                "train.unimodal_weight": get(current, "train.loss") != "contrastive"}.get(key, True)
    def before(key: str):                # the checkpoint's value, or what it was built with before key existed
        value = get(saved, key)
        return BUILT_BEFORE.get(key) if value is None and isinstance(saved.get(key.split(".")[0]), dict) else value
    differ = [(key, before(key), get(current, key)) for key in RESUME_SETTINGS
              if before(key) is not None and used(key)
              and comparable(key, before(key)) != comparable(key, get(current, key))]
    if differ:
        first, *rest = differ
        listed = "; ".join([f"checkpoint {first[1]}, config {first[2]}",
                            *(f"{k}: checkpoint {a}, config {b}" for k, a, b in rest)])
        raise ConfigError(first[0], f"{listed} (checkpoint {found}); resume with the checkpoint's settings "
                          f"or use another train.run_dir")


def trim_metrics(path: Path, step: int) -> None:
    """A resumed run rewrites what came after its checkpoint: drop those lines so curves don't double (and a
    line cut short by a killed run, or anything else that is not a metrics record)."""
    if path.exists():
        keep = [line for line in path.read_text(errors="replace").splitlines() if logged_step(line) <= step]
        path.write_text("".join(line + "\n" for line in keep))


def logged_step(line: str) -> float:
    """The step of a metrics.jsonl line; infinity (dropped) for a line that is not a record with a step."""
    try:
        record = json.loads(line)
    except ValueError:
        return math.inf
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, (int, float)) and not isinstance(step, bool) else math.inf
