"""The loader's config: which datasets, how batches are made, how workers send them."""

from __future__ import annotations

from dataclasses import dataclass, field

from mmdata.config import require, require_choice
from mmdata.load.decode import AugmentConfig
from mmdata.load.reader import ReadConfig
from mmdata.schema import MODALITIES


@dataclass
class DatasetSource:
    path: str                      # a dataset directory (local path or fsspec URL)
    weight: float = 1.0            # mixing weight (relative)


@dataclass
class LoaderConfig:
    datasets: list[DatasetSource] = field(default_factory=list)
    modalities: list[str] = field(default_factory=lambda: list(MODALITIES))
    batch_size: int = 32           # per rank
    shuffle: bool = True
    seed: int = 0
    shuffle_window: int = 4        # shards whose samples are shuffled together
    shuffle_run: int = 1           # consecutive samples of a shard that stay together (fewer remote requests)
    samples_per_epoch: int = 0     # 0: the selected samples of all datasets
    remainder: str = "drop"        # drop | pad: the last partial global batch
    split: str = "all"             # all | train | eval: by the input's split names where the index has them,
    eval_fraction: float = 0.0     # else by a hash of the id, this fraction held out
    train_splits: list[str] = field(default_factory=lambda: ["train"])   # input split names of each side;
    eval_splits: list[str] = field(default_factory=lambda: ["eval", "val", "validation", "dev"])  # others: neither
    bucket_by: str | None = None   # None | tokens | audio_frames
    bucket_batches: int = 8        # global batches sorted together when bucketing
    pad_tokens_to: int | None = None
    normalize_images: bool = False
    num_workers: int = 2
    prefetch_factor: int = 2       # messages each worker has queued (DataLoader's prefetch_factor)
    message_samples: int = 256     # a worker sends whole batches in messages of up to this many samples
    message_bytes: int = 64 << 20  # and this many bytes of batch tensors (at least one batch either way)
    persistent_workers: bool = True
    pin_memory: bool = True        # only used when CUDA is available
    worker_transport: str = "shared"  # shared (slots of shared memory, see transport.py) | pickle
    timeout_s: float = 300.0       # a worker sending no message for this long is an error
    on_error: str = "raise"        # raise | skip (skipped samples are counted per batch)
    read: ReadConfig = field(default_factory=ReadConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def validate(self) -> None:
        for i, d in enumerate(self.datasets):
            require(d.weight > 0, f"datasets[{i}].weight", f"must be positive; got {d.weight}")
        require(len(self.modalities) > 0 and set(self.modalities) <= set(MODALITIES), "modalities",
                f"must be a non-empty subset of {list(MODALITIES)}; got {self.modalities}")
        # upper limits: workers allocate whole batches (and a few messages of them) up front
        require(0 < self.batch_size <= 65536, "batch_size", f"must be between 1 and 65536; got {self.batch_size}")
        require(self.shuffle_window > 0, "shuffle_window", f"must be positive; got {self.shuffle_window}")
        require(0 < self.shuffle_run <= 4096, "shuffle_run", f"must be between 1 and 4096; got {self.shuffle_run}")
        require(self.samples_per_epoch >= 0, "samples_per_epoch", "must be >= 0")
        require_choice(self.remainder, "remainder", ("drop", "pad"))
        require_choice(self.split, "split", ("all", "train", "eval"))
        require(0 <= self.eval_fraction < 1, "eval_fraction", f"must be in [0, 1); got {self.eval_fraction}")
        for key in ("train_splits", "eval_splits"):
            names = getattr(self, key)
            require(all(isinstance(n, str) and n for n in names), key, f"must be split names; got {names}")
        both = {n.lower() for n in self.train_splits} & {n.lower() for n in self.eval_splits}
        require(not both, "eval_splits", f"{sorted(both)} is in train_splits too; a sample is trained on or held "
                                         "out, not both")
        require_choice(self.bucket_by, "bucket_by", (None, "tokens", "audio_frames"))
        require(self.bucket_batches > 0, "bucket_batches", "must be positive")
        require(self.pad_tokens_to is None or 0 < self.pad_tokens_to <= 1_000_000, "pad_tokens_to",
                f"must be between 1 and 1000000; got {self.pad_tokens_to}")
        require(0 <= self.num_workers <= 256, "num_workers", f"must be between 0 and 256; got {self.num_workers}")
        require(0 < self.prefetch_factor <= 64, "prefetch_factor", f"must be between 1 and 64; got {self.prefetch_factor}")
        require(self.message_samples >= 0, "message_samples", "must be >= 0 (0: one batch per message)")
        require(self.message_bytes >= 0, "message_bytes", "must be >= 0 (0: one batch per message)")
        require_choice(self.worker_transport, "worker_transport", ("shared", "pickle"))
        require(self.timeout_s >= 0, "timeout_s", "must be >= 0")
        require_choice(self.on_error, "on_error", ("raise", "skip"))

    @property
    def pads_remainder(self) -> bool:
        return self.remainder == "pad"
