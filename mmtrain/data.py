"""Where training data comes from: build-or-reuse shards, facts the model needs, the two loaders."""

from __future__ import annotations

import copy

from mmdata import ConfigError, DatasetSource, MultimodalLoader, load_config, load_description, storage
from mmdata.dataset import dataset_dir
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


def dataset_facts(dataset: str) -> dict:
    """Sizes the model is built from: vocabulary, image size, mel bins, classes."""
    d = load_description(dataset)
    if d.labels:
        num_classes = len(d.labels)
    else:
        from mmdata.load.catalog import load_catalog
        num_classes = int(load_catalog(dataset).label.max(initial=-1)) + 1
    return {"vocab_size": d.tokenizer.vocab_size, "image_size": d.image_size, "n_mels": d.n_mels,
            "num_classes": num_classes, "labels": d.labels}


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
