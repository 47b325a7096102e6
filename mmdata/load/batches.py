"""A worker's batches: the per-batch path, as named stages.

    control tensor -> which messages this worker sends (order.worker_messages)
    -> positions: each batch's places in the epoch's sample sequence (order.rank_batch)
    -> places:    dataset, shard, member byte ranges, id, label of each sample (catalog columns)
    -> read:      only the requested members, by byte offset (reader.py)
    -> decode:    members -> arrays, augmented with a seed per sample position (decode.py)
    -> collate:   pad + masks, straight into a shared slot when in a worker (decode.py, transport.py)
    -> pack:      the message for the trip to the main process (transport.py)

Which batches to build is read from the shared control tensor at the start
of each iteration, so persistent workers follow epochs and resumes.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from mmdata import storage
from mmdata.load.decode import DecodeError, collate, decode_sample
from mmdata.load.order import Layout, rank_batch, worker_messages
from mmdata.load.plan import LoaderError, Plan
from mmdata.load.reader import ShardReader, ShardReadError
from mmdata.load.transport import SLOTS_KEY, SharedSlots, decode_control, inline_limit, pack_small_tensors
from mmdata.schema import MODALITY_MEMBERS

# A worker looks up the places of about this many upcoming samples at once: the work per sample is the
# same, but done for many batches in one go it runs about twice as fast in a worker whose caches the
# decoding between batches keeps cold (docs/performance.md).
LOOKUP_SAMPLES = 1024


@dataclass
class BatchPlaces:
    """Where a batch's samples are: shard, byte ranges of the members to read, id and label.

    Columns looked up once per batch with numpy; a per-sample object costs more
    than the lookups themselves.
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
    """Yields this rank's batches of the epoch that ``control`` describes, split across workers, in messages
    of one or more consecutive batches (see order.worker_messages)."""

    def __init__(self, plan: Plan, control: torch.Tensor, slots: SharedSlots | None = None):
        self.plan, self.control, self.slots = plan, control, slots
        self.inline_bytes = inline_limit(plan.config.pin_memory and torch.cuda.is_available())
        self._sequence: tuple | None = None     # ((epoch, layouts), Plan.sequence's result) of the last epoch
        self._reader: ShardReader | None = None
        self._pid: int | None = None
        self._members: dict[int, list] = {}

    def __iter__(self):
        epoch, first, layouts = decode_control(self.control)
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        if self._pid != os.getpid():
            if info is not None:   # a new worker process: the parent's storage clients are not its own
                storage.forget_inherited_clients()
            self._pid = os.getpid()
            self._reader = None    # a reader's threads, event loop and mappings belong to the process that made it
            if self.slots is not None and info is not None:
                self.slots.forget_unsent(worker)
        if self._reader is None:
            self._reader = ShardReader(self.plan.config.read)
        self._reader.forget_plan()   # what an earlier pass planned and did not take (it left mid-epoch)
        sequence = self.epoch_sequence(epoch, layouts)
        layout = layouts[-1]
        messages = worker_messages(first, self.plan.batches(layout), worker, workers, self.plan.batches_per_message)
        first_group = True
        groups = message_groups(messages, max(1, LOOKUP_SAMPLES // self.plan.config.batch_size))
        for group, next_group in pairwise(groups):
            looked_up = self.places_of([b for batches in group for b in batches], layout, sequence)
            # the first batch is planned on its own: its requests hold only its samples, so it comes soon
            first_batch = 1 if first_group else 0
            for part, first in ((looked_up[:first_batch], True), (looked_up[first_batch:], False)):
                self._reader.plan(*(sum((getattr(p, name) for _, p in part), [])
                                    for name in ("url", "offsets", "sizes", "shard_bytes")), first=first)
            if next_group and self.plan.config.read.cache_dir:   # whole shards: the next group's come down too
                self._reader.prefetch(*self.shards_of([b for batches in next_group for b in batches], layout,
                                                      sequence))
            first_group = False
            places = iter(looked_up)
            for batches in group:
                batches = [(b, *next(places)) for b in batches]
                if info is None:   # in the main process: nothing to send
                    yield [self.make_batch(epoch, b, layout, positions, where, np.empty)
                           for b, positions, where in batches]
                else:
                    yield self.packed(epoch, batches, layout, worker)
        # shard downloads this worker started finish before its epoch does: the next pass (or run) finds
        # them in cache_dir instead of a temporary file abandoned when the workers stop
        self._reader.wait_for_downloads()

    def epoch_sequence(self, epoch: int, layouts: list[Layout]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        key = (epoch, tuple(layouts))
        if self._sequence is None or self._sequence[0] != key:
            self._sequence = (key, self.plan.sequence(epoch, layouts))
        return self._sequence[1]

    def places_of(self, batches: list[int], layout: Layout, sequence) -> list[tuple[np.ndarray, BatchPlaces]]:
        """positions -> places: the sequence positions of each of ``batches`` and where their samples are,
        looked up together."""
        order, which, rows = sequence
        positions = np.concatenate([rank_batch(layout, b, self.plan.rank) for b in batches])
        draws = order[positions]
        places = self.sample_places(which[draws], rows[draws])
        size = layout.batch_size
        return [(positions[i * size: (i + 1) * size], places.part(slice(i * size, (i + 1) * size)))
                for i in range(len(batches))]

    def shards_of(self, batches: list[int], layout: Layout, sequence) -> tuple[list[str], list[int]]:
        """The shards (url, bytes) that ``batches`` read, in the order they first need them."""
        order, which, rows = sequence
        positions = np.concatenate([rank_batch(layout, b, self.plan.rank) for b in batches])
        draws = order[positions]
        catalogs = self.plan.catalogs
        pairs = dict.fromkeys((s, int(catalogs[s].shard[r])) for s, r in zip(which[draws].tolist(),
                                                                              rows[draws].tolist()))
        return ([catalogs[s].shard_urls[n] for s, n in pairs],
                [int(catalogs[s].shard_bytes[n]) for s, n in pairs])

    def packed(self, epoch: int, batches: list[tuple], layout: Layout, worker: int) -> list[dict]:
        """In a worker: a message's batches collated straight into a free shared slot (see transport.py), the
        rest (and everything, when no slot is free) as small pickled arrays; ``unpack_message`` reverses it."""
        writer = self.slots.claim(worker) if self.slots is not None else None
        empty = writer.empty if writer else np.empty
        try:
            # each batch is read on its own: a message's batches lie a global batch apart in the sequence,
            # so reading them together would touch more shards at once than the cache preflight allows
            message = [self.make_batch(epoch, b, layout, positions, places, empty) for b, positions, places in batches]
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

    def make_batch(self, epoch: int, b: int, layout: Layout, positions: np.ndarray, places: BatchPlaces,
                   empty) -> dict:
        """read -> decode -> collate, into arrays from ``empty`` (np.empty's signature)."""
        reads = self._reader.read_batch(places.url, places.offsets, places.sizes, places.end, places.shard_bytes)
        samples, kept, skipped = self.decode(epoch, positions, places, reads)
        c = self.plan.config
        batch = collate(samples, pad_id=self.plan.pad_id, pad_tokens_to=c.pad_tokens_to,
                        normalize_images=c.normalize_images, empty=empty)
        return batch | dict(source=torch.from_numpy(places.source[kept].astype(np.int64)),
                            is_pad=torch.from_numpy(positions[kept] >= self.plan.n_draws),
                            epoch=epoch, batch_index=layout.start // layout.global_batch + b, skipped=skipped)

    def decode(self, epoch: int, positions: np.ndarray, places: BatchPlaces, reads: list) -> tuple:
        """The batch's samples decoded (and augmented); a bad sample raises LoaderError or, with on_error=skip,
        is left out and named in ``skipped``. Returns (samples, kept indices, skipped reasons)."""
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
        return samples, np.asarray(kept, np.int64), skipped

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


def pairwise(items):
    """(item, the one after it or None) for each item: a look one group ahead."""
    items = iter(items)
    current = next(items, None)
    while current is not None:
        after = next(items, None)
        yield current, after
        current = after


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
