"""Where training data comes from: build-or-reuse shards, facts the model needs, the two loaders."""

from __future__ import annotations

import copy
from dataclasses import dataclass

from mmdata import ConfigError, DatasetSource, MultimodalLoader, load_config, load_description, storage
from mmdata.dataset import DatasetError, dataset_dir
from mmdata.schema import DATASET_JSON, MODALITIES
from mmtrain.config import DataConfig, ExperimentConfig
from mmtrain.distributed import Dist, broadcast_object


@dataclass(frozen=True)
class Source:
    """A dataset the run trains on: its directory, its name in reports and its share of batches."""
    name: str
    path: str
    weight: float = 1.0


def resolve_sources(data: DataConfig, d: Dist) -> list[Source]:
    """The datasets of ``data``: given, or made by their preprocess configs (rank 0 builds or reuses them
    one after another, the other ranks wait), each with a distinct name."""
    paths = None
    if d.is_main:
        paths = [source.dataset or build_dataset(source.preprocess, source.preprocess_overrides)
                 for source in data.sources()]
    paths = broadcast_object(d, paths)
    configs = data.sources()
    names = [c.name or load_description(path).name for c, path in zip(configs, paths)]
    for i, name in enumerate(names):
        if names.index(name) != i:
            raise ConfigError("data.datasets", f"datasets[{names.index(name)}] and datasets[{i}] are both named "
                              f"{name!r} (dataset.json); give each a name (data.datasets[{i}].name)")
    return [Source(name, path, c.weight) for name, path, c in zip(names, paths, configs)]


def build_dataset(preprocess: str, overrides: list[str]) -> str:
    from mmdata import PreprocessConfig, preprocess as run_preprocess
    result = run_preprocess(load_config(PreprocessConfig, preprocess, overrides))
    print(f"data: {'reused' if result.reused_dataset else 'built'} {result.dataset} "
          f"({result.partitions_reused} shards reused, {result.partitions_built} built)")
    return result.dataset


MAX_CLASSES = 100_000   # model.max_classes' default: a larger label is far more likely an id than a class


def dataset_facts(datasets: list[str], labels_used: bool = True, max_classes: int = MAX_CLASSES) -> dict:
    """What the model is built from (vocabulary, image size, mel bins, classes), over every dataset of the run.

    One model reads them all, so they must agree on what it was built for: the tokenizer, the image size and
    the mel features of the modalities each holds, and, with a classification loss, the label names. The
    first disagreement stops here (ConfigError naming both datasets, the setting and how to make them agree).
    """
    facts = [single_dataset_facts(path, labels_used, max_classes) for path in datasets]
    for path, f in zip(datasets[1:], facts[1:]):
        for key in f["settings"].keys() & facts[0]["settings"].keys():
            if f["settings"][key] != facts[0]["settings"][key]:
                raise ConfigError("data.datasets", f"dataset {path} was preprocessed with {key} = "
                                  f"{f['settings'][key]}, dataset {datasets[0]} with {facts[0]['settings'][key]}; "
                                  f"one model reads both: {AGREE[key.split('.')[0]]}")
        if labels_used and f["labels"] != facts[0]["labels"]:
            raise ConfigError("data.datasets", f"datasets {datasets[0]} and {path} name their classes differently "
                              f"({describe_labels(facts[0]['labels'])} vs {describe_labels(f['labels'])}), so a "
                              f"class number means two things; give both inputs the same label names, or train "
                              f"without labels (train.loss=contrastive)")
    merged = dict(facts[0])
    for key, modality in (("vocab_size", "text"), ("image_size", "image"), ("n_mels", "audio")):
        # from a dataset that holds the modality: another's value is only its unused default
        merged[key] = next((f[key] for f in facts if modality in f["held"]), facts[0][key])
    merged["num_classes"] = max(f["num_classes"] for f in facts)
    return merged


# the features a model depends on, by modality, and how to make two datasets agree on them
AUDIO_FEATURES = ("sample_rate", "n_mels", "n_fft", "hop_length", "win_length", "f_min", "f_max", "log_offset")
AGREE = {"text": "preprocess the second with text.tokenizer=<the first's tokenizer.model> (next to its dataset.json)",
         "image": "preprocess them with the same image.size",
         "audio": "preprocess them with the same audio settings"}


def held_modalities(d) -> set[str]:
    return {m for m, n in d.totals.modalities.items() if n and m in MODALITIES}


def model_settings(d) -> dict:
    """The preprocessing settings a model trained on dataset ``d`` depends on, for the modalities it holds."""
    held, settings = held_modalities(d), {}
    if "text" in held:
        settings["text.tokenizer sha256"] = d.tokenizer.sha256
    if "image" in held:
        settings["image.size"] = d.image_size
    if "audio" in held:
        audio = d.config.get("audio") or {}
        settings.update({f"audio.{k}": audio.get(k) for k in AUDIO_FEATURES})
    return settings


def describe_labels(labels: dict[str, int] | None) -> str:
    if not labels:
        return "bare class numbers"
    names = [name for name, _ in sorted(labels.items(), key=lambda item: item[1])]
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def single_dataset_facts(dataset: str, labels_used: bool = True, max_classes: int = MAX_CLASSES) -> dict:
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
            "num_classes": num_classes, "labels": d.labels, "settings": model_settings(d),
            "held": held_modalities(d)}


def label_range(dataset: str, description) -> tuple[int | None, int, str | None, str | None]:
    """(lowest label, highest label or -1, the key of a sample with each) over the index; nulls (no label)
    are left out, so that a stored -1 is told apart from a missing label. Reads only two columns."""
    import io

    import numpy as np
    import pyarrow.parquet as pq
    low, high, low_key, high_key = None, -1, None, None
    for shard in description.shards:
        table = pq.ParquetFile(io.BytesIO(storage.read_bytes(description.index_url(shard), {}))).read(
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


def describe_split(catalog, config: ExperimentConfig) -> str:
    """How one dataset's samples divide into training and held out, and by what: the input's own split names
    (the index's split column) or a hash of the id."""
    from mmdata.load.catalog import split_counts
    loader = config.data.loader
    counts = split_counts(catalog, config.data.eval_fraction, loader.train_splits, loader.eval_splits)
    by_hash = len(catalog) - counts["named"]
    how = [f"the input's split for {counts['named']}"] if counts["named"] else []
    how += [f"by id hash (data.eval_fraction={config.data.eval_fraction}) for {by_hash}"] if by_hash else []
    other = (f", {counts['neither']} in neither (input splits {', '.join(catalog.split_names)}; "
             f"data.loader.train_splits/eval_splits choose)") if counts["neither"] else ""
    return f"{counts['train']} samples to train on, {counts['eval']} held out{other}: {' and '.join(how)}"


def loader_config(config: ExperimentConfig, sources: list[Source], split: str):
    loader = copy.deepcopy(config.data.loader)
    if loader.datasets:
        raise ConfigError("data.loader.datasets", "is filled in from data.preprocess / data.dataset / "
                          "data.datasets; leave it out")
    loader.datasets = [DatasetSource(s.path, s.weight) for s in sources]
    loader.split, loader.eval_fraction = split, config.data.eval_fraction
    return loader


def train_loader(config: ExperimentConfig, sources: list[Source], d: Dist) -> MultimodalLoader:
    loader = loader_config(config, sources, "train")
    loader.seed = config.train.seed
    return MultimodalLoader(loader, rank=d.rank, world_size=d.world_size)


def eval_loader(config: ExperimentConfig, source: Source) -> MultimodalLoader:
    """One dataset's held-out split in dataset order, every sample once (padding marked), on one process."""
    loader = loader_config(config, [source], "eval")
    loader.shuffle, loader.remainder, loader.batch_size = False, "pad", config.data.eval_batch_size
    loader.augment = type(loader.augment)()
    loader.num_workers, loader.persistent_workers = min(loader.num_workers, 1), False
    loader.bucket_by = None
    return MultimodalLoader(loader, rank=0, world_size=1)


def data_changed_message(checkpoint: str, trained_on: list[str], datasets: list[str], now: list[str]) -> str:
    """Why a run cannot resume on rebuilt shards, and the two ways on (its old data, or a new run)."""
    earlier = ([earlier_dataset(path, fingerprint) for path, fingerprint in zip(datasets, trained_on)]
               if len(trained_on) == len(datasets) else [None])
    if len(earlier) == 1 and earlier[0]:
        old = f"data.preprocess=null data.dataset={earlier[0]}"
    elif len(earlier) > 1 and all(earlier):
        old = "data.datasets with dataset: " + ", ".join(earlier)
    else:
        old = "data.dataset (or data.datasets) set to the directories it was trained on"
    return (f"checkpoint {checkpoint} was trained on dataset {', '.join(trained_on)}, but the data is now "
            f"{', '.join(datasets)} ({', '.join(now)}): the shards were rebuilt (the input, the preprocess config "
            f"or mm's processing version changed) or the datasets are others, and resuming would continue on "
            f"other samples. To continue that run on its own data: {old}; to train on the new data: another "
            f"train.run_dir")


def earlier_dataset(dataset: str, fingerprint: str) -> str | None:
    """The directory preprocessing gave this dataset's name with ``fingerprint`` (next to ``dataset``),
    if it is still there."""
    if not storage.is_local(dataset):
        return None
    candidate = dataset_dir(str(storage.local_path(dataset).parent), load_description(dataset).name, fingerprint)
    return candidate if storage.exists(storage.join(candidate, DATASET_JSON), {}) else None
