"""Where training data comes from: build-or-reuse shards, facts the model needs, the two loaders."""

from __future__ import annotations

import copy

from mmdata import ConfigError, DatasetSource, MultimodalLoader, load_config, load_description, storage
from mmdata.dataset import DatasetError, dataset_dir
from mmdata.schema import DATASET_JSON
from mmtrain.config import DataConfig, ExperimentConfig
from mmtrain.distributed import Dist, broadcast_object


def resolve_dataset(data: DataConfig, d: Dist) -> str:
    """The dataset directory: given, or made by the preprocess config (rank 0 builds/reuses, others wait)."""
    if data.dataset:
        return data.dataset
    path = None
    if d.is_main:
        from mmdata import PreprocessConfig, preprocess
        config = load_config(PreprocessConfig, data.preprocess, data.preprocess_overrides)
        result = preprocess(config)
        print(f"data: {'reused' if result.reused_dataset else 'built'} {result.dataset} "
              f"({result.partitions_reused} shards reused, {result.partitions_built} built)")
        path = result.dataset
    return broadcast_object(d, path)


MAX_CLASSES = 100_000   # model.max_classes' default: a larger label is far more likely an id than a class


def dataset_facts(dataset: str, labels_used: bool = True, max_classes: int = MAX_CLASSES) -> dict:
    """Sizes the model is built from: vocabulary, image size, mel bins, classes.

    With ``labels_used`` (a classification loss), the labels in the index are checked first: a negative
    one (which the loader would silently treat as "no label"), one beyond the dataset's label names, or
    a largest label that would make a head of more than ``max_classes`` classes stops here, naming the
    dataset and a sample, instead of training on wrong labels or allocating a head of 2e9 classes.
    """
    d = load_description(dataset)
    if d.labels and not labels_used:    # nothing to check, and the names give the count: no index read
        low, high, low_key, high_key = None, len(d.labels) - 1, None, None
    else:
        low, high, low_key, high_key = label_range(dataset, d)
    num_classes = len(d.labels) if d.labels else high + 1
    if labels_used:
        if low is not None and low < 0:
            raise DatasetError(f"dataset {dataset}: sample {low_key!r} has label {low} in the index; labels are "
                               f"class numbers from 0 (no label is null, not negative), and the loader would treat "
                               f"it as unlabelled. Fix the labels in the input and preprocess again, or train "
                               f"without labels (train.loss=contrastive)")
        if d.labels and high >= len(d.labels):
            raise DatasetError(f"dataset {dataset}: sample {high_key!r} has label {high}, but dataset.json names "
                               f"{len(d.labels)} labels; the index does not match its description: preprocess "
                               f"again")
        if num_classes > max_classes:
            raise ConfigError("model.max_classes", f"dataset {dataset} has labels up to {high} (sample "
                              f"{high_key!r}), so a head of {num_classes} classes, over model.max_classes="
                              f"{max_classes}. If those are ids rather than classes, fix the labels in the input and "
                              f"preprocess again; if there really are that many classes, raise model.max_classes")
    return {"vocab_size": d.tokenizer.vocab_size, "image_size": d.image_size, "n_mels": d.n_mels,
            "num_classes": num_classes, "labels": d.labels}


def label_range(dataset: str, description) -> tuple[int | None, int, str | None, str | None]:
    """(lowest label, highest label or -1, the key of a sample with each) over the index; nulls (no label)
    are left out, so that a stored -1 is told apart from a missing label. Reads only two columns."""
    import io

    import numpy as np
    import pyarrow.parquet as pq
    low, high, low_key, high_key = None, -1, None, None
    for shard in description.shards:
        table = pq.read_table(io.BytesIO(storage.read_bytes(description.index_url(shard), {})),
                              columns=["key", "label"])
        labels = table.column("label").to_numpy(zero_copy_only=False)
        valid = ~table.column("label").is_null().to_numpy(zero_copy_only=False)
        if not valid.any():
            continue
        values = np.where(valid, labels, 0).astype(np.int64)
        i_low = int(np.flatnonzero(valid)[np.argmin(values[valid])])
        i_high = int(np.flatnonzero(valid)[np.argmax(values[valid])])
        if low is None or values[i_low] < low:
            low, low_key = int(values[i_low]), table.column("key")[i_low].as_py()
        if values[i_high] > high:
            high, high_key = int(values[i_high]), table.column("key")[i_high].as_py()
    return low, high, low_key, high_key


def loader_config(config: ExperimentConfig, dataset: str, split: str):
    loader = copy.deepcopy(config.data.loader)
    if loader.datasets:
        raise ConfigError("data.loader.datasets", "is filled in from data.preprocess / data.dataset; leave it out")
    loader.datasets = [DatasetSource(dataset)]
    loader.split, loader.eval_fraction = split, config.data.eval_fraction
    return loader


def train_loader(config: ExperimentConfig, dataset: str, d: Dist) -> MultimodalLoader:
    loader = loader_config(config, dataset, "train")
    loader.seed = config.train.seed
    return MultimodalLoader(loader, rank=d.rank, world_size=d.world_size)


def eval_loader(config: ExperimentConfig, dataset: str) -> MultimodalLoader:
    """The held-out split in dataset order, every sample once (padding marked), on one process."""
    loader = loader_config(config, dataset, "eval")
    loader.shuffle, loader.remainder, loader.batch_size = False, "pad", config.data.eval_batch_size
    loader.augment = type(loader.augment)()
    loader.num_workers, loader.persistent_workers = min(loader.num_workers, 1), False
    loader.bucket_by = None
    return MultimodalLoader(loader, rank=0, world_size=1)


def data_changed_message(checkpoint: str, trained_on: list[str], dataset: str, now: list[str]) -> str:
    """Why a run cannot resume on rebuilt shards, and the two ways on (its old data, or a new run)."""
    earlier = [earlier_dataset(dataset, fingerprint) for fingerprint in trained_on]
    old = (f"data.preprocess=null data.dataset={earlier[0]}" if len(earlier) == 1 and earlier[0]
           else "data.preprocess=null data.dataset=<that dataset's directory>")
    return (f"checkpoint {checkpoint} was trained on dataset {', '.join(trained_on)}, but the data is now {dataset} "
            f"({', '.join(now)}): the shards were rebuilt (the input, the preprocess config or mm's processing "
            f"version changed), and resuming would continue on other samples. To continue that run on its own "
            f"data: {old}; to train on the new data: another train.run_dir")


def earlier_dataset(dataset: str, fingerprint: str) -> str | None:
    """The directory preprocessing gave this dataset's name with ``fingerprint`` (next to ``dataset``),
    if it is still there."""
    if not storage.is_local(dataset):
        return None
    candidate = dataset_dir(str(storage.local_path(dataset).parent), load_description(dataset).name, fingerprint)
    return candidate if storage.exists(storage.join(candidate, DATASET_JSON), {}) else None
