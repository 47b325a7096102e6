"""Stream preprocessed datasets into PyTorch: distributed, deterministic, exactly resumable.

    loader = MultimodalLoader(config)           # rank/world from torch.distributed
    for batch in loader: ...                    # one epoch per `for`
    state = loader.state_dict()                 # tiny: epoch, samples consumed, layouts
    loader.load_state_dict(state)               # exact (same world) or elastic resume

    config -> Plan: catalogs, sources, sizes, preflight            plan.py
    -> epoch sequence f(seed, epoch, layouts)                        order.py
    -> DataLoader workers build their batches as named stages       batches.py
       (positions -> places -> read -> decode -> collate -> pack)
    -> shared-memory slots, a few batches per message               transport.py
    -> the training loop, one batch at a time

Workers are ordinary torch DataLoader processes. Which batches they build
is read from a small shared tensor at the start of each iteration, so
workers can be persistent across epochs and resumes.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import torch
from torch.utils.data import DataLoader

from mmdata.load.batches import EpochBatches
from mmdata.load.catalog import Catalog
from mmdata.load.config import DatasetSource, LoaderConfig
from mmdata.load.decode import normalize_images
from mmdata.load.order import Layout
from mmdata.load.plan import LoaderError, build_plan
from mmdata.load.reader import ShardReader
from mmdata.load.transport import (MAX_LAYOUTS, SLOTS_KEY, SharedSlots, control_tensor, encode_control,
                                   unpack_message)

__all__ = ["DatasetSource", "LoaderConfig", "LoaderError", "MultimodalLoader", "move_to"]

STATE_VERSION = 1


def process_group() -> tuple[int, int]:
    """(rank, world size) of the torch.distributed process group; (0, 1) outside one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def slots_per_worker(config: LoaderConfig) -> int:
    """A slot per message each worker may have queued (prefetch_factor), one being written, and two the
    training loop may still hold batches of."""
    return config.prefetch_factor + 3


class MultimodalLoader:
    """Batches of one rank. Iterate once per epoch; ``state_dict`` at any batch boundary."""

    def __init__(self, config: LoaderConfig, rank: int | None = None, world_size: int | None = None):
        if rank is None or world_size is None:
            rank, world_size = process_group()
        self.config, self.rank, self.world_size = config, rank, world_size
        self.plan = build_plan(config, rank, world_size)
        self.epoch, self.consumed = 0, 0
        self.layouts = [Layout(0, config.batch_size, world_size)]
        self.source_counts = [0] * len(self.plan.sources)
        self.control = control_tensor()
        self._dataloader: DataLoader | None = None
        self._slots_in_use = False
        self._first_downloads: ShardReader | None = None   # the main process's, see download_first_shards
        self.batches_pickled = 0       # batches that could not use a shared slot (see note_pickled_batches)

    @property
    def catalogs(self) -> tuple[Catalog, ...]:
        return self.plan.catalogs

    def __len__(self) -> int:
        """Batches per rank in the current epoch (the same on every rank)."""
        return self.plan.batches(self.layouts[-1])

    def remaining(self) -> int:
        layout = self.layouts[-1]
        return len(self) - (self.consumed - layout.start) // layout.global_batch

    def __iter__(self):
        layout = self.layouts[-1]
        first = (self.consumed - layout.start) // layout.global_batch
        if len(self.layouts) > MAX_LAYOUTS:
            raise LoaderError(f"more than {MAX_LAYOUTS} batch-layout changes within one epoch")
        encode_control(self.control, self.epoch, first, self.layouts)
        if first < len(self):
            self.download_first_shards(first, layout)
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

    def download_first_shards(self, first: int, layout: Layout) -> None:
        """With a shard cache and workers about to start: the main process, whose storage client is already
        connected (it read the catalog), starts downloading the shards of each worker's first batch while the
        workers fork and make their own clients; they find its claims and wait for the copies. The epoch's
        order, computed here for that, goes to the workers with the fork instead of being computed in each."""
        c = self.config
        dataloader = self.dataloader()
        if not c.read.cache_dir or not c.num_workers or getattr(dataloader, "_iterator", None) is not None:
            return
        batches = list(range(first, min(first + c.num_workers, len(self))))
        dataset = dataloader.dataset
        urls, sizes = dataset.shards_of(batches, layout, dataset.epoch_sequence(self.epoch, self.layouts))
        if self._first_downloads is None:
            self._first_downloads = ShardReader(c.read)
        self._first_downloads.start_downloads(urls, sizes)

    def note_pickled_batches(self, n: int) -> None:
        """Count, and say once, that batches came pickled although shared slots are in use."""
        self.batches_pickled += n
        if self.batches_pickled == n:
            warnings.warn(f"mmdata loader: batches came from a worker pickled, not through shared memory: all "
                          f"{slots_per_worker(self.config)} slots of its worker were still in use. The training "
                          "loop is keeping earlier batches alive (in a list, a queue, a logger); batches stay "
                          "correct but cost more. loader.batches_pickled counts them.", stacklevel=3)

    def shared_slots(self) -> SharedSlots | None:
        """Slots for worker -> main transport, or None for pickled batches (see transport.py)."""
        c = self.config
        # Persistent workers only: with fresh workers per epoch, two sets with the same worker ids
        # could be alive at once.
        usable = (c.worker_transport == "shared" and c.num_workers > 0 and c.persistent_workers
                  and os.name == "posix" and self.plan.batch_bytes > 0)
        if not usable:
            return None
        return SharedSlots(c.num_workers, slots_per_worker(c), self.plan.batch_bytes * self.plan.batches_per_message)

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` from its beginning (state_dict/load_state_dict for mid-epoch)."""
        self.epoch, self.consumed = epoch, 0
        self.layouts = [Layout(0, self.config.batch_size, self.world_size)]

    def fingerprints(self) -> list[str]:
        """The datasets' fingerprints: what a saved state and a checkpoint were made with."""
        return [c.description.fingerprint for c in self.catalogs]

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "epoch": self.epoch, "consumed": self.consumed,
                "layouts": [[l.start, l.batch_size, l.world_size] for l in self.layouts],
                "seed": self.config.seed, "source_counts": list(self.source_counts),
                "datasets": self.fingerprints()}

    def load_state_dict(self, state: dict) -> None:
        """Resume exactly (same batch size and world size) or elastically (different ones)."""
        if state.get("version") != STATE_VERSION:
            raise LoaderError(f"loader state version {state.get('version')}; expected {STATE_VERSION}")
        fingerprints = self.fingerprints()
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


def as_is(batch):
    """DataLoader's collate_fn: batches are already collated, and arrays must stay arrays (transport.py)."""
    return batch


def move_to(batch: dict, device: torch.device, normalize: bool = True) -> dict:
    """Tensors to ``device`` (non-blocking from pinned memory); mel to float32 and images normalised there."""
    out = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    if "mel" in out:
        out["mel"] = out["mel"].float()
    image = out.get("image")
    if normalize and image is not None and image.dtype == torch.uint8:
        out["image"] = normalize_images(image)
    return out
