"""What a worker needs to build any batch of any epoch: made and checked once, when the loader is built.

    config -> catalogs (index columns) -> sources (the split, the requested modalities)
           -> sizes: draws per epoch, a batch's byte bound, batches per worker message
           -> preflight: fail now, naming the key to change, on what would hang, starve or thrash

The Plan is immutable and shared with DataLoader workers by fork; each
epoch's sample sequence is a pure function of it and (epoch, layouts).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mmdata.config import ConfigError
from mmdata.load.catalog import Catalog, load_catalog, split_mask
from mmdata.load.config import LoaderConfig
from mmdata.load.order import (Layout, Source, batches_in_sequence, epoch_sequence, mixed_order,
                               sequence_length)


class LoaderError(Exception):
    """A sample that cannot be loaded (with on_error=raise), naming shard and key; or a state that does not fit."""


@dataclass(frozen=True)
class Plan:
    catalogs: tuple[Catalog, ...]
    sources: tuple[Source, ...]
    config: LoaderConfig
    rank: int
    world_size: int
    pad_id: int                    # token padding (the first dataset's tokenizer)
    n_draws: int                   # samples per epoch, before the remainder is dropped or padded
    batch_bytes: int               # an upper bound on the bytes of one batch's big tensors
    batches_per_message: int       # whole batches a worker sends at once

    def draws(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(dataset, catalog row, bucketing length or None) of each draw of ``epoch``, in drawing order."""
        c = self.config
        which, pos = mixed_order(list(self.sources), c.seed, epoch, c.shuffle, c.shuffle_window, self.n_draws,
                                 c.shuffle_run)
        rows = np.empty(len(which), np.int64)
        lengths = np.empty(len(which), np.int64) if c.bucket_by else None
        for i, source in enumerate(self.sources):
            where = which == i
            rows[where] = source.rows[pos[where]]
            if lengths is not None:
                lengths[where] = source.lengths[pos[where]]
        return which, rows, lengths

    def sequence(self, epoch: int, layouts: list[Layout]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The epoch's sample sequence (indices into its draws) under ``layouts``, and the draws' datasets and rows."""
        which, rows, lengths = self.draws(epoch)
        c = self.config
        sequence = epoch_sequence(which, lengths, layouts, c.seed, epoch, c.bucket_batches, c.pads_remainder)
        return sequence, which, rows

    def batches(self, layout: Layout) -> int:
        """Batches per rank from ``layout``'s start to the end of the epoch (the same on every rank)."""
        return batches_in_sequence(sequence_length(self.n_draws, layout, self.config.pads_remainder), layout)


def build_plan(config: LoaderConfig, rank: int, world_size: int) -> Plan:
    """Read every dataset's description and index, size batches and messages, and check the result."""
    if not config.datasets:
        raise ConfigError("loader.datasets", "needs at least one dataset directory")
    catalogs = tuple(load_catalog(d.path, config.read.storage_options) for d in config.datasets)
    sources = tuple(make_source(c, d.weight, config) for c, d in zip(catalogs, config.datasets))
    batch_bytes = batch_bytes_bound(config, catalogs)
    plan = Plan(catalogs, sources, config, rank, world_size,
                pad_id=max(catalogs[0].description.tokenizer.pad_id, 0),
                n_draws=config.samples_per_epoch or sum(len(s.rows) for s in sources),
                batch_bytes=batch_bytes, batches_per_message=batches_per_message(config, batch_bytes))
    check_plan(plan)
    return plan


def make_source(catalog: Catalog, weight: float, config: LoaderConfig) -> Source:
    """The catalog rows this loader uses: the split, and only samples with a requested modality."""
    keep = split_mask(catalog, config.split, config.eval_fraction, config.train_splits, config.eval_splits)
    wanted = np.zeros(len(catalog), bool)
    for modality in config.modalities:
        wanted |= catalog.has[modality]
    rows = np.flatnonzero(keep & wanted)
    lengths = {"tokens": catalog.n_tokens, "audio_frames": catalog.audio_frames}.get(config.bucket_by)
    return Source(rows=rows, shard=catalog.shard[rows],
                  lengths=lengths[rows] if lengths is not None else np.zeros(len(rows), np.int64), weight=weight)


# Bytes of what collate makes (decode.collate_*), per element
TOKEN_BYTES = 8 + 1               # int64 token + bool mask
MEL_BIN_BYTES = 2                 # float16 per mel bin and frame
MEL_MASK_BYTES = 1                # bool per frame
SMALL_TENSOR_BYTES = 16 * 64      # presence flags, labels, sources: 16 small tensors, each aligned to 64 bytes
SLACK_BYTES = 4096


def batch_bytes_bound(config: LoaderConfig, catalogs: tuple[Catalog, ...]) -> int:
    """An upper bound on the bytes of one batch's big tensors, from the datasets' descriptions and indexes:
    the longest token sequence and clip, the stored image size, every sample having every modality."""
    side = max(c.description.image_size for c in catalogs)
    n_mels = max(c.description.n_mels for c in catalogs)
    tokens = config.pad_tokens_to or max(max(int(c.n_tokens.max(initial=0)) for c in catalogs), 1)
    frames = max(max(int(c.audio_frames.max(initial=0)) for c in catalogs), 1)
    pixel_bytes = 4 if config.normalize_images else 1      # float32 after normalising, else uint8
    per_sample = (tokens * TOKEN_BYTES + 3 * side * side * pixel_bytes
                  + frames * (n_mels * MEL_BIN_BYTES + MEL_MASK_BYTES))
    return config.batch_size * per_sample + SMALL_TENSOR_BYTES + SLACK_BYTES


def batches_per_message(config: LoaderConfig, batch_bytes: int) -> int:
    """Whole batches per worker message: up to ``message_samples`` samples and ``message_bytes`` bytes of
    batches of at most ``batch_bytes`` (0: unknown), at least one batch.

    The main process, which is the training loop's, pays DataLoader's receiving
    (queue, unpickling, bookkeeping) once per message rather than once per batch
    (docs/performance.md has the figures). The price is memory: a slot holds a
    message, hence the byte bound. A (re)start still waits for one batch only:
    each worker's first message holds one (see order.worker_messages).
    """
    by_samples = config.message_samples // config.batch_size
    by_bytes = config.message_bytes // batch_bytes if batch_bytes > 0 else by_samples
    return max(1, min(by_samples, by_bytes))


def check_plan(plan: Plan) -> None:
    """Raise ConfigError (naming the key to change) for an unworkable configuration."""
    c = plan.config
    for catalog, source in zip(plan.catalogs, plan.sources):
        if len(source.rows) == 0:
            hint = ("" if c.split != "eval" or c.eval_fraction > 0 or catalog.split_names else
                    ": its input names no splits, so set loader.eval_fraction to hold some out by id")
            raise ConfigError("loader.datasets", f"{catalog.dataset} has no samples with "
                              f"{' or '.join(c.modalities)} in split {c.split!r}{hint}")
        for modality in c.modalities:
            if catalog.present(modality) == 0:
                raise ConfigError("loader.modalities", f"{catalog.dataset} has no {modality}; "
                                  f"remove {modality!r} from loader.modalities")
    layout = Layout(0, c.batch_size, plan.world_size)
    batches = plan.batches(layout)
    if batches == 0:
        raise ConfigError("loader.batch_size", f"batch_size {c.batch_size} x world size {plan.world_size} = "
                          f"{layout.global_batch} is more than the {plan.n_draws} samples of an epoch; lower it "
                          "(or set loader.remainder=pad)")
    if c.num_workers > batches:
        raise ConfigError("loader.num_workers", f"{c.num_workers} workers but only {batches} batches per rank "
                          f"per epoch: workers would sit idle; use at most {batches}")
    if c.read.cache_dir:
        largest = max(int(cat.shard_bytes.max()) for cat in plan.catalogs if len(cat.shard_bytes))
        needed = largest * (c.shuffle_window + 1) * max(1, c.num_workers)
        if c.read.cache_bytes < needed:
            raise ConfigError("loader.read.cache_bytes", f"{c.read.cache_bytes} bytes cannot hold the shards that "
                              f"{max(1, c.num_workers)} workers read at once ({c.shuffle_window} + 1 shards of up to "
                              f"{largest} bytes each): the cache would thrash; raise it to at least {needed} or lower "
                              "loader.shuffle_window")
