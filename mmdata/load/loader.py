"""Stream preprocessed datasets into PyTorch: distributed, deterministic, exactly resumable.

    catalogs (per-sample index) -> epoch plan f(seed, epoch, layout)     order.py
    -> rank's slice of each global batch -> worker's round-robin batches
    -> read only the requested members by byte offset                    reader.py
    -> decode + augment (seeded per sample) -> collate (pad + masks)      decode.py
       straight into a shared-memory slot, a few batches per message      transport.py
    -> the training loop, one batch at a time

    loader = MultimodalLoader(config)           # rank/world from torch.distributed
    for batch in loader: ...                    # one epoch per `for`
    state = loader.state_dict()                 # tiny: epoch, samples consumed, layouts
    loader.load_state_dict(state)               # exact (same world) or elastic resume

Workers are ordinary torch DataLoader processes. Which batches they build
is read from a small shared tensor at the start of each iteration, so
workers can be persistent across epochs and resumes.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mmdata.load.catalog import Catalog, load_catalog, split_mask
from mmdata.config import ConfigError, require, require_choice
from mmdata.load.decode import MODALITY_MEMBERS, AugmentConfig, DecodeError, collate, decode_sample
from mmdata.load.order import (Layout, Source, batches_in_plan, epoch_plan, mixed_order, plan_length,
                          rank_batch, worker_messages)
from mmdata.load.reader import ReadConfig, ShardReader, ShardReadError
from mmdata.load.transport import SharedSlots, numpy_dtype

STATE_VERSION = 1
MAX_LAYOUTS = 16
LOOKUP_SAMPLES = 1024   # a worker looks up the places of about this many upcoming samples at once


@dataclass
class DatasetSource:
    path: str                      # a dataset directory (local path or fsspec URL)
    weight: float = 1.0            # mixing weight (relative)


@dataclass
class LoaderConfig:
    datasets: list[DatasetSource] = field(default_factory=list)
    modalities: list[str] = field(default_factory=lambda: ["text", "image", "audio"])
    batch_size: int = 32           # per rank
    shuffle: bool = True
    seed: int = 0
    shuffle_window: int = 4        # shards whose samples are shuffled together
    samples_per_epoch: int = 0     # 0: the selected samples of all datasets
    remainder: str = "drop"        # drop | pad: the last partial global batch
    split: str = "all"             # all | train | eval (deterministic, by a hash of the id)
    eval_fraction: float = 0.0
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
        require(len(self.modalities) > 0 and set(self.modalities) <= set(MODALITY_MEMBERS), "modalities",
                f"must be a non-empty subset of {list(MODALITY_MEMBERS)}; got {self.modalities}")
        require(self.batch_size > 0, "batch_size", f"must be positive; got {self.batch_size}")
        require(self.shuffle_window > 0, "shuffle_window", f"must be positive; got {self.shuffle_window}")
        require(self.samples_per_epoch >= 0, "samples_per_epoch", "must be >= 0")
        require_choice(self.remainder, "remainder", ("drop", "pad"))
        require_choice(self.split, "split", ("all", "train", "eval"))
        require(0 <= self.eval_fraction < 1, "eval_fraction", f"must be in [0, 1); got {self.eval_fraction}")
        require(self.split == "all" or self.eval_fraction > 0, "eval_fraction",
                f"must be > 0 when split is {self.split!r}")
        require_choice(self.bucket_by, "bucket_by", (None, "tokens", "audio_frames"))
        require(self.bucket_batches > 0, "bucket_batches", "must be positive")
        require(self.pad_tokens_to is None or self.pad_tokens_to > 0, "pad_tokens_to", "must be positive")
        require(self.num_workers >= 0, "num_workers", "must be >= 0")
        require(self.prefetch_factor > 0, "prefetch_factor", "must be positive")
        require(self.message_samples >= 0, "message_samples", "must be >= 0 (0: one batch per message)")
        require(self.message_bytes >= 0, "message_bytes", "must be >= 0 (0: one batch per message)")
        require_choice(self.worker_transport, "worker_transport", ("shared", "pickle"))
        require(self.timeout_s >= 0, "timeout_s", "must be >= 0")
        require_choice(self.on_error, "on_error", ("raise", "skip"))


class LoaderError(Exception):
    """A sample that cannot be loaded (with on_error=raise), naming shard and key."""


def distributed_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


@dataclass
class Plan:
    """Everything a worker needs to build any batch of the epoch; cheap to pickle (fork shares it)."""
    catalogs: list[Catalog]
    sources: list[Source]
    config: LoaderConfig
    rank: int
    pad_id: int
    n_draws: int
    batches_per_message: int = 1

    def draws(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        c = self.config
        which, pos = mixed_order(self.sources, c.seed, epoch, c.shuffle, c.shuffle_window, self.n_draws)
        rows = np.empty(len(which), np.int64)
        lengths = np.empty(len(which), np.int64) if c.bucket_by else None
        for i, source in enumerate(self.sources):
            where = which == i
            rows[where] = source.rows[pos[where]]
            if lengths is not None:
                lengths[where] = source.lengths[pos[where]]
        return which, rows, lengths

    def build(self, epoch: int, layouts: list[Layout]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        which, rows, lengths = self.draws(epoch)
        plan = epoch_plan(which, lengths, layouts, self.config.seed, epoch, self.config.bucket_batches,
                          self.config.remainder == "pad")
        return plan, which, rows


@dataclass
class BatchPlaces:
    """Where a batch's samples are: shard, byte ranges of the members to read, id and label.

    Columns looked up once per batch with numpy; a per-sample object cost more
    than the lookups themselves (measured).
    """
    source: np.ndarray                   # [B] which dataset
    row: np.ndarray                      # [B] its row in that dataset's catalog
    url: list[str]                       # the shard
    shard_bytes: list[int]
    exts: list[list[str]]                # members to read (requested and present)
    offsets: list[list[int]]             # their offsets in the shard
    sizes: list[list[int]]               # and sizes
    end: list[int]                       # the sample's last byte + 1
    id: list[str]
    label: list[int | None]

    def part(self, rows: slice) -> "BatchPlaces":
        return BatchPlaces(*(getattr(self, f.name)[rows] for f in dataclasses.fields(self)))


class EpochBatches(IterableDataset):
    """Yields this rank's batches of the epoch that ``control`` describes, split across workers."""

    def __init__(self, plan: Plan, control: torch.Tensor, slots: SharedSlots | None = None):
        self.plan, self.control, self.slots = plan, control, slots
        self.inline_bytes = inline_limit(plan.config.pin_memory and torch.cuda.is_available())
        self._cache: tuple | None = None
        self._reader: ShardReader | None = None
        self._pid: int | None = None
        self._members: dict[int, list] = {}

    def __iter__(self):
        """Messages: lists of consecutive batches (see ``worker_messages``), packed for the trip to the main
        process when in a worker."""
        epoch, first, layouts = decode_control(self.control)
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        if self._pid != os.getpid():
            self._pid = os.getpid()
            if self.slots is not None and info is not None:
                self.slots.forget_unsent(worker)
        key = (epoch, tuple(layouts))
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self.plan.build(epoch, layouts))
        plan, which, rows = self._cache[1]
        if self._reader is None:
            self._reader = ShardReader(self.plan.config.read)
        layout = layouts[-1]
        c = self.plan.config
        messages = worker_messages(first, batches_in_plan(len(plan), layout), worker, workers,
                                   self.plan.batches_per_message)
        for group in message_groups(messages, max(1, LOOKUP_SAMPLES // c.batch_size)):
            places = iter(self.places_of([b for batches in group for b in batches], layout, plan, which, rows))
            for batches in group:
                message = [(b, *next(places)) for b in batches]
                if info is None:   # in the main process: nothing to send
                    yield self.make_message(epoch, message, layout, np.empty)
                else:
                    yield self.packed(epoch, message, layout, worker)

    def places_of(self, batches: list[int], layout: Layout, plan, which, rows) -> list[tuple[np.ndarray, BatchPlaces]]:
        """Plan positions and places of each of ``batches``, looked up together.

        The work per sample is the same, but done for many batches in one go it
        runs about twice as fast in a worker, whose caches the decoding between
        batches keeps cold (per batch of 64: ~110 µs alone, ~60 µs among 16, measured).
        """
        positions = np.concatenate([rank_batch(layout, b, self.plan.rank) for b in batches])
        draws = plan[positions]
        places = self.sample_places(which[draws], rows[draws])
        size = layout.batch_size
        return [(positions[i * size: (i + 1) * size], places.part(slice(i * size, (i + 1) * size)))
                for i in range(len(batches))]

    def packed(self, epoch: int, message: list[tuple], layout: Layout, worker: int) -> list[dict]:
        """In a worker: a message's batches collated straight into a free shared slot (see transport.py), the
        rest (and everything, when no slot is free) as small pickled arrays; ``unpack_message`` reverses it."""
        writer = self.slots.claim(worker) if self.slots is not None else None
        try:
            message = self.make_message(epoch, message, layout, writer.empty if writer else np.empty)
            sent = writer.finish(message) if writer else None
        except BaseException:
            if writer:
                writer.abandon()
            raise
        if sent is not None:
            # keys stay in place (as None) so that unpacked batches keep their key order
            message = [{k: None if k in keys else v for k, v in batch.items()}
                       for batch, keys in zip(message, ({p.key for p in placed} for placed in sent.placed))]
            message[0][SLOTS_KEY] = sent
        return [pack_small_tensors(batch, self.inline_bytes) for batch in message]

    def make_message(self, epoch: int, message: list[tuple], layout: Layout, empty) -> list[dict]:
        """The batches of a message, given as (batch, positions, places), collated into arrays from ``empty``
        (np.empty's signature). Each is read on its own: a message's batches lie a global batch apart in the
        plan, so reading them together would touch more shards at once than the cache preflight allows."""
        return [self.make_batch(epoch, b, layout, positions, places, empty) for b, positions, places in message]

    def make_batch(self, epoch: int, b: int, layout: Layout, positions: np.ndarray, places: BatchPlaces,
                   empty) -> dict:
        reads = self._reader.read_batch(places.url, places.offsets, places.sizes, places.end, places.shard_bytes)
        config = self.plan.config
        augment = config.augment
        augmenting = augment.active
        samples, kept, skipped = [], [], []
        # one loop, no call per sample but the decoding: this is the per-sample overhead of the loader
        for j, (position, data) in enumerate(zip(positions.tolist(), reads)):
            try:
                if isinstance(data, ShardReadError):
                    raise data
                # seeded by position, so a resumed or re-sharded run augments each sample identically
                rng = np.random.default_rng([config.seed, epoch, position]) if augmenting else None
                sample = decode_sample(dict(zip(places.exts[j], data)), augment, rng)
            except (DecodeError, ShardReadError) as e:
                key = self.plan.catalogs[places.source[j]].keys[places.row[j]].as_py()
                reason = f"{places.url[j]} sample {key!r}: {e}"
                if config.on_error == "raise":
                    raise LoaderError(reason) from None
                skipped.append(reason)
                continue
            sample["id"], sample["label"] = places.id[j], places.label[j]
            samples.append(sample)
            kept.append(j)
        kept = np.asarray(kept, np.int64)
        extra = dict(source=torch.from_numpy(places.source[kept].astype(np.int64)),
                     is_pad=torch.from_numpy(positions[kept] >= self.plan.n_draws),
                     epoch=epoch, batch_index=layout.start // layout.global_batch + b, skipped=skipped)
        return self.collate(samples, empty) | extra

    def collate(self, samples: list[dict], empty) -> dict:
        c = self.plan.config
        return collate(samples, pad_id=self.plan.pad_id, pad_tokens_to=c.pad_tokens_to,
                       normalize_images=c.normalize_images, empty=empty)

    def sample_places(self, sources: np.ndarray, rows: np.ndarray) -> BatchPlaces:
        """Where each sample of a batch is, looked up per dataset for the whole batch (index columns are numpy)."""
        n = len(rows)
        places = BatchPlaces(sources, rows, [""] * n, [0] * n, [[]] * n, [[]] * n, [[]] * n, [0] * n,
                             [""] * n, [None] * n)
        groups = ([(0, np.arange(n))] if len(self.plan.catalogs) == 1
                  else [(s, np.flatnonzero(sources == s)) for s in np.unique(sources).tolist()])
        for source, at in groups:
            catalog, picked = self.plan.catalogs[source], rows[at]
            members = self.members(source)
            names = [ext for ext, _, _ in members]
            offsets = np.empty((len(at), len(members)), np.int64)
            sizes = np.empty((len(at), len(members)), np.int64)
            for m, (_, member_offsets, member_sizes) in enumerate(members):
                offsets[:, m] = member_offsets[picked]
                sizes[:, m] = member_sizes[picked]
            ends = (offsets + sizes).max(axis=1, initial=0).tolist()
            present = offsets >= 0
            offsets, sizes, exts = offsets.tolist(), sizes.tolist(), [names] * len(at)
            for i in np.flatnonzero(~present.all(axis=1)).tolist():   # a member missing (offset -1): skip it
                keep = present[i].tolist()
                exts[i] = [e for e, p in zip(names, keep) if p]
                offsets[i] = [o for o, p in zip(offsets[i], keep) if p]
                sizes[i] = [z for z, p in zip(sizes[i], keep) if p]
            shards = catalog.shard[picked].tolist()
            columns = {"url": [catalog.shard_urls[s] for s in shards],
                       "shard_bytes": catalog.shard_bytes[shards].tolist(), "exts": exts,
                       "offsets": offsets, "sizes": sizes, "end": ends,
                       "id": catalog.ids_of(picked),
                       "label": [x if x >= 0 else None for x in catalog.label[picked].tolist()]}
            for name, values in columns.items():
                if len(groups) == 1:
                    setattr(places, name, values)
                else:
                    column = getattr(places, name)
                    for i, value in zip(at.tolist(), values):
                        column[i] = value
        return places

    def members(self, source: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
        """(extension, offsets, sizes) of the members the configured modalities need from ``source``,
        leaving out those no sample has (the other image formats, usually)."""
        if source not in self._members:
            catalog = self.plan.catalogs[source]
            self._members[source] = [(ext, catalog.offsets[ext], catalog.sizes[ext])
                                     for m in self.plan.config.modalities for ext in MODALITY_MEMBERS[m]
                                     if ext in catalog.offsets and bool((catalog.offsets[ext] >= 0).any())]
        return self._members[source]


SLOTS_KEY = "_slots"
JOINED_KEY = "_joined"
JOINED_BYTES = 4096


def inline_limit(pinning: bool) -> int:
    """Tensors below this many bytes travel from workers pickled inline (see pack_small_tensors)."""
    return 64 << 10 if pinning else 16 << 20


def pack_small_tensors(batch: dict, limit: int) -> dict:
    """Tensors under ``limit`` bytes travel from workers pickled inline, as numpy arrays; the smallest
    (masks, labels, sources: a few hundred bytes each) joined into one buffer.

    A tensor crosses the process boundary as its own shared-memory segment plus a
    file descriptor; for a batch's dozen masks and labels that costs more than
    copying the bytes through the pipe, and pickling each as an array costs more
    than one buffer (the worker's pickling thread was 7% of its time, measured).
    When batches are pinned for a GPU, big tensors stay tensors so the pin-memory
    thread can pin them. ``unpack`` turns it all back into tensors (zero-copy).
    """
    out, layout, joined = {}, [], bytearray()
    for k, v in batch.items():
        size = v.numel() * v.element_size() if isinstance(v, torch.Tensor) else None
        if size is not None and size <= JOINED_BYTES and v.is_contiguous():
            joined += bytes(-len(joined) % 8)   # aligned for any dtype
            layout.append((k, numpy_dtype(v.dtype), tuple(v.shape), len(joined)))
            joined += v.numpy().tobytes()
            out[k] = None   # filled in again by unpack, in the same key order
        else:
            out[k] = as_array(v) if size is not None and size < limit else v
    if layout:
        out[JOINED_KEY] = JoinedTensors(layout, joined)
    return out


class JoinedTensors:
    """A batch's small tensors in one buffer. Unpickles straight into tensors, like a SlotBatch, so
    DataLoader's pin-memory thread pins them with the rest (it would walk a raw buffer byte by byte)."""

    def __init__(self, layout: list[tuple], joined: bytearray):
        self.layout, self.joined = layout, joined

    def __reduce__(self):
        return unjoin, (self.layout, self.joined)


def unjoin(layout: list[tuple], joined: bytearray) -> dict[str, torch.Tensor]:
    return {key: torch.from_numpy(np.frombuffer(joined, dtype, math.prod(shape), offset).reshape(shape))
            for key, dtype, shape, offset in layout}


class ChannelsLast(NamedTuple):
    """A channels_last image batch sent as its NHWC array (pickling a permuted array would reorder it)."""
    nhwc: np.ndarray


def as_array(tensor: torch.Tensor) -> np.ndarray | ChannelsLast:
    if tensor.ndim == 4 and not tensor.is_contiguous() and tensor.is_contiguous(memory_format=torch.channels_last):
        return ChannelsLast(tensor.permute(0, 2, 3, 1).numpy())
    return tensor.numpy()


def as_is(batch: dict) -> dict:
    """DataLoader's collate_fn: batches are already collated, and arrays must stay arrays (see above)."""
    return batch


def unpack_message(message: list[dict]) -> list[dict]:
    """A message as a worker packed it, once unpickled -> its batches (see unpack)."""
    placed = (message[0].pop(SLOTS_KEY, None) if message else None) or [{}] * len(message)
    return [unpack(batch, tensors) for batch, tensors in zip(message, placed)]


def unpack(batch: dict, placed: dict | None = None) -> dict:
    """A batch as a worker packed it, once unpickled, and its tensors from the slot (``placed``: views of a
    shared slot, when one was used) -> tensors only."""
    placed = placed or {}
    batch.update(batch.pop(JOINED_KEY, None) or {})   # JoinedTensors unpickled as tensors
    return {k: placed[k] if k in placed else torch.from_numpy(v) if isinstance(v, np.ndarray)
            else torch.from_numpy(v.nhwc).permute(0, 3, 1, 2) if isinstance(v, ChannelsLast) else v
            for k, v in batch.items()}


def encode_control(control: torch.Tensor, epoch: int, first: int, layouts: list[Layout]) -> None:
    if len(layouts) > MAX_LAYOUTS:
        raise LoaderError(f"more than {MAX_LAYOUTS} batch-layout changes within one epoch")
    values = [epoch, first, len(layouts)] + [v for l in layouts for v in (l.start, l.batch_size, l.world_size)]
    control.zero_()
    control[: len(values)] = torch.tensor(values, dtype=torch.int64)


def decode_control(control: torch.Tensor) -> tuple[int, int, list[Layout]]:
    values = control.tolist()
    epoch, first, n = values[:3]
    layouts = [Layout(*values[3 + 3 * i: 6 + 3 * i]) for i in range(n)]
    return epoch, first, layouts


class MultimodalLoader:
    """Batches of one rank. Iterate once per epoch; ``state_dict`` at any batch boundary."""

    def __init__(self, config: LoaderConfig, rank: int | None = None, world_size: int | None = None):
        if not config.datasets:
            raise ConfigError("loader.datasets", "needs at least one dataset directory")
        if rank is None or world_size is None:
            rank, world_size = distributed_rank_world()
        self.config, self.rank, self.world_size = config, rank, world_size
        catalogs = [load_catalog(d.path, config.read.storage_options) for d in config.datasets]
        sources = [make_source(c, d.weight, config) for c, d in zip(catalogs, config.datasets)]
        n_draws = config.samples_per_epoch or sum(len(s.rows) for s in sources)
        pad_id = catalogs[0].description["tokenizer"].get("pad_id", 0)
        self.plan = Plan(catalogs, sources, config, rank, max(pad_id, 0), n_draws)
        self.batch_bytes = batch_bytes_bound(self.plan)   # 0 when unknown (see batch_bytes_bound)
        self.plan.batches_per_message = batches_per_message(config, self.batch_bytes)
        from mmdata.load.preflight import check_plan
        check_plan(self.plan, world_size)
        self.epoch, self.consumed = 0, 0
        self.layouts = [Layout(0, config.batch_size, world_size)]
        self.source_counts = [0] * len(sources)
        self.control = torch.zeros(3 + 3 * MAX_LAYOUTS, dtype=torch.int64).share_memory_()
        self._dataloader: DataLoader | None = None
        self._slots_in_use = False
        self.batches_pickled = 0       # batches that could not use a shared slot (see note_pickled_batches)

    @property
    def catalogs(self) -> list[Catalog]:
        return self.plan.catalogs

    def __len__(self) -> int:
        """Batches per rank in the current epoch (the same on every rank)."""
        layout = self.layouts[-1]
        return batches_in_plan(plan_length(self.plan.n_draws, layout, self.config.remainder == "pad"), layout)

    def remaining(self) -> int:
        layout = self.layouts[-1]
        return len(self) - (self.consumed - layout.start) // layout.global_batch

    def __iter__(self):
        layout = self.layouts[-1]
        first = (self.consumed - layout.start) // layout.global_batch
        encode_control(self.control, self.epoch, first, self.layouts)
        if first < len(self):
            for message in self.dataloader():
                if self._slots_in_use and message and SLOTS_KEY not in message[0]:
                    self.note_pickled_batches(len(message))
                batches = unpack_message(message)[::-1]
                del message
                while batches:
                    batch = batches.pop()
                    self.consumed += layout.global_batch
                    counts = np.bincount(batch["source"].numpy(), minlength=len(self.source_counts))
                    self.source_counts = [a + int(b) for a, b in zip(self.source_counts, counts)]
                    yield batch
        self.epoch, self.consumed = self.epoch + 1, 0
        self.layouts = [Layout(0, self.config.batch_size, self.world_size)]

    def dataloader(self) -> DataLoader:
        if self._dataloader is None:
            c = self.config
            workers = c.num_workers
            slots = self.shared_slots()
            self._slots_in_use = slots is not None
            self._dataloader = DataLoader(
                EpochBatches(self.plan, self.control, slots), batch_size=None, num_workers=workers, collate_fn=as_is,
                prefetch_factor=c.prefetch_factor if workers else None,
                persistent_workers=c.persistent_workers and workers > 0,
                pin_memory=c.pin_memory and torch.cuda.is_available(),
                timeout=c.timeout_s if workers else 0,
                multiprocessing_context="fork" if workers and os.name == "posix" else None)
        return self._dataloader

    def note_pickled_batches(self, n: int) -> None:
        """Count, and say once, that batches came pickled although shared slots are in use."""
        self.batches_pickled += n
        if self.batches_pickled == n:
            warnings.warn(f"mmdata loader: batches came from a worker pickled, not through shared memory: all "
                          f"{self.config.prefetch_factor + 3} slots of its worker were still in use. The training "
                          "loop is keeping earlier batches alive (in a list, a queue, a logger); batches stay "
                          "correct but cost more. loader.batches_pickled counts them.", stacklevel=3)

    def shared_slots(self) -> SharedSlots | None:
        """Slots for worker -> main transport, or None for pickled batches (see transport.py)."""
        c = self.config
        usable = (c.worker_transport == "shared" and c.num_workers > 0 and c.persistent_workers
                  and os.name == "posix" and self.batch_bytes > 0)
        # Persistent workers only: with fresh workers per epoch, two sets with the same worker ids
        # could be alive at once. Slots, one per message: each a worker may have in flight, one being
        # written, and two the caller may still hold batches of.
        if not usable:
            return None
        return SharedSlots(c.num_workers, c.prefetch_factor + 3, self.batch_bytes * self.plan.batches_per_message)

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` from its beginning (state_dict/load_state_dict for mid-epoch)."""
        self.epoch, self.consumed = epoch, 0
        self.layouts = [Layout(0, self.config.batch_size, self.world_size)]

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "epoch": self.epoch, "consumed": self.consumed,
                "layouts": [[l.start, l.batch_size, l.world_size] for l in self.layouts],
                "seed": self.config.seed, "source_counts": list(self.source_counts),
                "datasets": [c.description["fingerprint"] for c in self.catalogs]}

    def load_state_dict(self, state: dict) -> None:
        """Resume exactly (same batch size and world size) or elastically (different ones)."""
        if state.get("version") != STATE_VERSION:
            raise LoaderError(f"loader state version {state.get('version')}; expected {STATE_VERSION}")
        fingerprints = [c.description["fingerprint"] for c in self.catalogs]
        if state["datasets"] != fingerprints or state["seed"] != self.config.seed:
            raise LoaderError("the loader state belongs to other datasets or another seed "
                              f"({state['datasets']}, seed {state['seed']}); this loader has {fingerprints}, "
                              f"seed {self.config.seed}")
        self.epoch, self.consumed = state["epoch"], state["consumed"]
        self.layouts = [Layout(*l) for l in state["layouts"]]
        self.source_counts = list(state["source_counts"])
        if (self.config.batch_size, self.world_size) != (self.layouts[-1].batch_size, self.layouts[-1].world_size):
            self.layouts.append(Layout(self.consumed, self.config.batch_size, self.world_size))

    def close(self) -> None:
        """Stop worker processes now (they also stop when the loader is garbage collected)."""
        if self._dataloader is not None and self._dataloader._iterator is not None:
            self._dataloader._iterator._shutdown_workers()
        self._dataloader = None


def message_groups(messages, batches: int):
    """Consecutive messages in groups of at least ``batches`` batches (the last one may have fewer)."""
    group: list[range] = []
    size = 0
    for message in messages:
        group.append(message)
        size += len(message)
        if size >= batches:
            yield group
            group, size = [], 0
    if group:
        yield group


def batches_per_message(config: LoaderConfig, batch_bytes: int) -> int:
    """Whole batches per worker message: up to ``message_samples`` samples and ``message_bytes`` bytes of
    batches of at most ``batch_bytes`` (0: unknown), at least one batch.

    The main process, which is the training loop's, pays DataLoader's receiving
    (queue, unpickling, bookkeeping) once per message: 64 px, batch 64, two
    workers on two cores, 5.8 -> 3.2 µs of its CPU per sample with 4 batches per
    message, and 3-9% more samples/s (measured). The price is memory, a slot
    holds a message, hence the byte bound. A (re)start still waits for one batch
    only: each worker's first message holds one (see order.worker_messages).
    """
    by_samples = config.message_samples // config.batch_size
    by_bytes = config.message_bytes // batch_bytes if batch_bytes > 0 else by_samples
    return max(1, min(by_samples, by_bytes))


def batch_bytes_bound(plan: Plan) -> int:
    """An upper bound on the bytes of one batch's big tensors, from the datasets' configs and index.

    0 when a dataset does not say (then batches are pickled).
    """
    c, b = plan.config, plan.config.batch_size
    try:
        side = max(int(cat.description["config"]["image"]["size"]) for cat in plan.catalogs)
        n_mels = max(int(cat.description["config"]["audio"]["n_mels"]) for cat in plan.catalogs)
    except (KeyError, TypeError, ValueError):
        return 0
    longest = lambda column: max((int(column(cat).max(initial=0)) for cat in plan.catalogs), default=0)  # noqa: E731
    tokens = c.pad_tokens_to or max(longest(lambda cat: cat.n_tokens), 1)
    frames = max(longest(lambda cat: cat.audio_frames), 1)
    pixel_bytes = 4 if c.normalize_images else 1
    return b * (tokens * 9 + 3 * side * side * pixel_bytes + frames * (n_mels * 2 + 1)) + 16 * 64 + 4096


def make_source(catalog: Catalog, weight: float, config: LoaderConfig) -> Source:
    """The catalog rows this loader uses: the split, and only samples with a requested modality."""
    keep = split_mask(catalog.ids, config.split, config.eval_fraction)
    wanted = np.zeros(len(catalog), bool)
    for modality in config.modalities:
        wanted |= catalog.has[modality]
    rows = np.flatnonzero(keep & wanted)
    lengths = {"tokens": catalog.n_tokens, "audio_frames": catalog.audio_frames}.get(config.bucket_by)
    return Source(rows=rows, shard=catalog.shard[rows],
                  lengths=lengths[rows] if lengths is not None else np.zeros(len(rows), np.int64), weight=weight)


def move_to(batch: dict, device: torch.device, normalize_images: bool = True) -> dict:
    """Tensors to ``device`` (non-blocking from pinned memory); mel to float32 and images normalised there."""
    out = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    if "mel" in out:
        out["mel"] = out["mel"].float()
    image = out.get("image")
    if normalize_images and image is not None and image.dtype == torch.uint8:
        mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1)
        out["image"] = (image.float() / 255.0 - mean) / std
    return out
