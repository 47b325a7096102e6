"""Refactors change no bytes: the demo's shards, indexes and errors, a fixed-seed loader epoch and a short
training run match digests recorded from a known-good build.

A failure here means the output of mm changed. If that is intended (a new resampler, encoder settings...),
bump ``PROCESSING_VERSION`` in mmdata/schema.py so that fingerprints change with the bytes, and record the
new digests (``python tests/test_golden.py <dataset> <variant dataset> <run dir>`` prints them). If it is not intended,
the change has a bug: a refactor must leave these untouched.

The digests hold for the library versions pip resolves from pyproject.toml; a new Pillow, torchaudio or
SentencePiece release may encode differently, which is also worth knowing.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

# the 48-sample demo (seed 1) preprocessed by tests/helpers.preprocess_config with samples_per_shard=5
GOLDEN_SHARDS = "4beac4cf8226892546effa47a595061d0a42e1d9e1bbec4d7c5fbdcf23a43228"
# the same demo with WebP images, kept waveforms and shards split at 60 kB
GOLDEN_SHARDS_VARIANT = "b55c17ac800c5f4e20050d56c0f02cfbd964433980ef2b6529679f748c77ad90"
# one shuffled, augmented epoch of the loader over the first dataset
GOLDEN_LOADER = "5612d7e53f3dbf0de98f05b7717cdd858c8925357dccd7fdc83c91e662ceb879"
# the first losses of a short training run on it (compared with a tolerance: float reductions may differ)
GOLDEN_LOSSES = [4.36952543258667, 5.117351531982422, 3.9609618186950684, 4.207366466522217,
                 3.80531644821167, 3.594520330429077]

VARIANT = ("image.format=webp", "audio.keep_waveform=true", "output.max_shard_bytes=60000",
           "output.samples_per_shard=7")


def dataset_digest(dataset: str | Path) -> str:
    """sha256 over every shard, index, the errors and the tokenizer (dataset.json records paths and
    library versions, so it is left out; its shard list and totals are covered by the files themselves)."""
    root = Path(dataset)
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != "dataset.json"):
        data = path.read_bytes()
        if path.name == "errors.jsonl":   # messages name input files by their (temporary) paths
            data = b"".join(json.dumps({k: v for k, v in json.loads(line).items() if k != "error"},
                                       sort_keys=True).encode() + b"\n" for line in data.splitlines())
        digest.update(f"{path.relative_to(root)}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()


def loader_digest(dataset: str) -> str:
    from helpers import loader_config
    from mmdata.load.loader import MultimodalLoader
    config = loader_config(dataset, batch_size=6, seed=3, normalize_images=True,
                           augment={"image_crop": True, "image_flip": True, "mel_freq_masks": 1, "mel_time_masks": 2})
    digest = hashlib.sha256()
    for batch in MultimodalLoader(config):
        for key in sorted(batch):
            value = batch[key]
            if isinstance(value, torch.Tensor):
                value = value.contiguous().numpy()
                digest.update(f"{key}\0{value.dtype}\0{value.shape}\0".encode())
                digest.update(np.ascontiguousarray(value).tobytes())
            else:
                digest.update(f"{key}\0{value!r}\0".encode())
    return digest.hexdigest()


def training_losses(dataset: str, run_dir: Path) -> list[float]:
    from helpers import experiment_config, metrics_lines
    from mmtrain.distributed import setup
    from mmtrain.trainer import train
    torch.manual_seed(0)
    train(experiment_config(dataset, run_dir, "train.steps=6"), setup("cpu"))
    return [line["loss"] for line in metrics_lines(run_dir) if "loss" in line]


def test_demo_shards_are_byte_identical(demo_dataset):
    assert dataset_digest(demo_dataset) == GOLDEN_SHARDS


def test_variant_shards_are_byte_identical(demo_dir, tmp_path):
    from helpers import preprocess_config
    from mmdata.prep.pipeline import preprocess
    config = preprocess_config(demo_dir / "manifest.jsonl", tmp_path, *VARIANT)
    assert dataset_digest(preprocess(config, log=lambda _: None).dataset) == GOLDEN_SHARDS_VARIANT


def test_a_fixed_seed_loader_epoch_is_identical(demo_dataset):
    assert loader_digest(demo_dataset) == GOLDEN_LOADER


def test_training_losses_are_unchanged(demo_dataset, tmp_path):
    assert training_losses(demo_dataset, tmp_path) == pytest.approx(GOLDEN_LOSSES, rel=1e-4)


if __name__ == "__main__":
    print("GOLDEN_SHARDS =", dataset_digest(sys.argv[1]))
    print("GOLDEN_SHARDS_VARIANT =", dataset_digest(sys.argv[2]))
    print("GOLDEN_LOADER =", loader_digest(sys.argv[1]))
    print("GOLDEN_LOSSES =", training_losses(sys.argv[1], Path(sys.argv[3])))
