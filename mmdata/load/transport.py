"""Batches from DataLoader workers to the main process: slots of one shared mapping, and the wire format.

DataLoader's own transport pickles what a worker returns: tensors become one
/dev/shm segment each (plus a file descriptor sent over a socket), arrays are
copied through a pipe. Both cost the main process time per batch, and on a
busy machine the main process is the one the training loop needs.

Here each worker owns a few fixed slots in one anonymous shared mapping that
the main process creates *before* it forks the workers. A worker collates the
big tensors of a message's batches (one or a few, see the loader) straight
into a free slot and sends only their layout (a few hundred bytes per batch).
Unpickling that layout in the main process returns tensors that are views of
the slot: no copy, no file descriptors. The slot is free again once every such
tensor, of every batch in it, is garbage collected (a finaliser clears its
state byte); a worker that finds none of its slots free sends the message
inline instead, so a caller that holds on to batches never blocks a worker.

There is no file, so nothing can be left behind when a process is killed, and
the mapping does not count against a container's /dev/shm size. It needs the
``fork`` start method; the loader falls back to inline batches otherwise.

Slot states: FREE (a worker may write it), SENT (written, its message in
flight), HELD (the main process has made tensors of it). Workers only move
FREE -> SENT; the main process moves SENT -> HELD -> FREE.
"""

from __future__ import annotations

import functools
import itertools
import math
import mmap
import weakref
from typing import NamedTuple

import numpy as np
import torch

from mmdata.load.order import Layout

FREE, SENT, HELD = 0, 1, 2
ALIGN = 64

# this process's mappings by id (inherited by forked workers); weak, so a dropped loader frees its mapping
_SLOTS: "weakref.WeakValueDictionary[int, SharedSlots]" = weakref.WeakValueDictionary()
_ids = itertools.count(1)


class Placed(NamedTuple):
    """One tensor in a slot: its name, numpy dtype string, shape, strides (elements) and byte offset.
    Pickled as a plain tuple: it is pickled for every batch, and a named tuple pickles through copyreg,
    several times slower."""
    key: str
    dtype: str
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    offset: int


class SlotBatch:
    """What a worker sends: which slot, and where each of its batches' tensors is in it. Unpickles into one
    dict of tensors per batch."""

    def __init__(self, slots_id: int, slot: int, placed: list[list[Placed]]):
        self.slots_id, self.slot, self.placed = slots_id, slot, placed

    def __reduce__(self):
        return attach, (self.slots_id, self.slot, [[tuple(p) for p in batch] for batch in self.placed])


class SharedSlots:
    """``slots_per_worker`` slots of ``slot_bytes`` for each of ``workers`` workers."""

    def __init__(self, workers: int, slots_per_worker: int, slot_bytes: int):
        self.workers, self.slots_per_worker = workers, slots_per_worker
        self.slot_bytes = -(-slot_bytes // ALIGN) * ALIGN
        n = workers * slots_per_worker
        self.header = -(-n // ALIGN) * ALIGN
        # Anonymous and MAP_SHARED: shared with every process forked after this, freed with the last of them.
        # Pages are only allocated when first written, and slots are used lowest first.
        self.mapping = mmap.mmap(-1, self.header + n * self.slot_bytes)
        self.state = np.frombuffer(self.mapping, np.uint8, count=n)
        self.id = next(_ids)
        _SLOTS[self.id] = self

    def worker_slots(self, worker: int) -> range:
        return range(worker * self.slots_per_worker, (worker + 1) * self.slots_per_worker)

    def forget_unsent(self, worker: int) -> None:
        """In a freshly started worker: slots its predecessor marked SENT were never received."""
        for slot in self.worker_slots(worker):
            if self.state[slot] == SENT:
                self.state[slot] = FREE

    def claim(self, worker: int) -> "SlotWriter | None":
        """A free slot of ``worker`` to build the next batch in, or None when all are in use."""
        slot = next((s for s in self.worker_slots(worker) if self.state[s] == FREE), None)
        if slot is None:
            return None
        self.state[slot] = SENT
        return SlotWriter(self, slot)

    def view(self, slot: int, placed: list[list[tuple]]) -> list[dict[str, torch.Tensor]]:
        """Tensors over ``slot``, a dict per batch; the slot is FREE again when the last of them is collected."""
        self.state[slot] = HELD
        start = self.header + slot * self.slot_bytes
        whole = np.frombuffer(self.mapping, np.uint8, count=self.slot_bytes, offset=start)
        # numpy views keep ``whole`` (not just the mapping) alive, so the finaliser waits for all of them
        weakref.finalize(whole, self.release, slot)
        out = []
        for batch in placed:
            tensors = {}
            for key, dtype, shape, strides, offset in batch:
                dtype = np.dtype(dtype)
                flat = torch.from_numpy(whole[offset: offset + math.prod(shape) * dtype.itemsize].view(dtype))
                tensors[key] = flat.as_strided(shape, strides)
            out.append(tensors)
        return out

    def release(self, slot: int) -> None:
        self.state[slot] = FREE

    def in_use(self) -> int:
        return int((self.state != FREE).sum())


class SlotWriter:
    """Allocates arrays inside one claimed slot; ``finish`` turns the batch tensors placed there into a SlotBatch.

    ``empty`` has np.empty's signature, so collate can build the batch in
    place: no copy after collating, and the slot's pages are already mapped.
    """

    def __init__(self, slots: SharedSlots, slot: int):
        self.slots, self.slot, self.end = slots, slot, 0
        self.start = slots.header + slot * slots.slot_bytes
        self.arrays: dict[int, tuple[int, int]] = {}   # data address -> (offset in the slot, bytes)

    def empty(self, shape, dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        count = math.prod(shape)
        offset = -(-self.end // ALIGN) * ALIGN
        if offset + count * dtype.itemsize > self.slots.slot_bytes:
            return np.empty(shape, dtype)   # does not fit: travels inline instead
        array = np.frombuffer(self.slots.mapping, dtype, count=count, offset=self.start + offset).reshape(shape)
        self.end = offset + count * dtype.itemsize
        self.arrays[array.ctypes.data] = offset, count * dtype.itemsize
        return array

    def finish(self, batches: list[dict]) -> SlotBatch | None:
        """The layout of the tensors of ``batches`` that live in the slot; None (slot freed) when it went unused."""
        placed = [[] for _ in batches]
        for batch, where in zip(batches, placed):
            for key, value in batch.items():
                if not isinstance(value, torch.Tensor) or value.data_ptr() not in self.arrays:
                    continue
                offset, nbytes = self.arrays[value.data_ptr()]
                # the whole array, in any dense order (channels_last images are a permuted view)
                dense = value.is_contiguous() or (value.ndim == 4
                                                  and value.is_contiguous(memory_format=torch.channels_last))
                if dense and value.numel() * value.element_size() == nbytes:
                    where.append(Placed(key, numpy_dtype(value.dtype), tuple(value.shape), tuple(value.stride()),
                                        offset))
        if not self.arrays:
            self.abandon()   # nothing was written to it
            return None
        # Even with nothing placed, a slot that was written to is released by the main process after it
        # received the message: an inline array could be a view of it, and is pickled only after this returns.
        return SlotBatch(self.slots.id, self.slot, placed)

    def abandon(self) -> None:
        self.slots.state[self.slot] = FREE


@functools.lru_cache(maxsize=None)
def numpy_dtype(dtype: torch.dtype) -> str:
    """numpy's name for a torch dtype ('<f2'), computed once per dtype rather than per batch."""
    return np.dtype(torch.empty(0, dtype=dtype).numpy().dtype).str


def attach(slots_id: int, slot: int, placed: list[list[tuple]]) -> list[dict[str, torch.Tensor]]:
    """Unpickling a SlotBatch: ``placed`` holds the fields of Placed as plain tuples."""
    return _SLOTS[slots_id].view(slot, placed)


# ---- The wire format: what a worker's message is made of, and how the main process turns it back into tensors.

SLOTS_KEY = "_slots"      # first batch of a message: the SlotBatch, when its big tensors are in a slot
JOINED_KEY = "_joined"    # a batch's small tensors, joined into one buffer
JOINED_BYTES = 4096       # tensors up to this size are joined


def inline_limit(pinning: bool) -> int:
    """Tensors below this many bytes travel from workers pickled inline (see pack_small_tensors)."""
    return 64 << 10 if pinning else 16 << 20


def pack_small_tensors(batch: dict, limit: int) -> dict:
    """Tensors under ``limit`` bytes travel from workers pickled inline, as numpy arrays; the smallest
    (masks, labels, sources: a few hundred bytes each) joined into one buffer.

    A tensor crosses the process boundary as its own shared-memory segment plus a
    file descriptor; for a batch's dozen masks and labels that costs more than
    copying the bytes through the pipe, and pickling each as an array costs more
    than one buffer. When batches are pinned for a GPU, big tensors stay tensors
    so the pin-memory thread can pin them. ``unpack`` turns it all back into
    tensors (zero-copy).
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


# ---- The control tensor: which batches workers build, read by each worker when an iteration starts.
# Shared memory made before the workers fork, so persistent workers follow epochs and resumes.

MAX_LAYOUTS = 16          # batch-layout changes (elastic resumes) within one epoch


def control_tensor() -> torch.Tensor:
    return torch.zeros(3 + 3 * MAX_LAYOUTS, dtype=torch.int64).share_memory_()


def encode_control(control: torch.Tensor, epoch: int, first: int, layouts: list[Layout]) -> None:
    """Say: epoch ``epoch`` from batch ``first``, under ``layouts`` (at most MAX_LAYOUTS)."""
    if len(layouts) > MAX_LAYOUTS:
        raise ValueError(f"more than {MAX_LAYOUTS} batch-layout changes within one epoch")
    values = [epoch, first, len(layouts)] + [v for l in layouts for v in (l.start, l.batch_size, l.world_size)]
    control.zero_()
    control[: len(values)] = torch.tensor(values, dtype=torch.int64)


def decode_control(control: torch.Tensor) -> tuple[int, int, list[Layout]]:
    values = control.tolist()
    epoch, first, n = values[:3]
    layouts = [Layout(*values[3 + 3 * i: 6 + 3 * i]) for i in range(n)]
    return epoch, first, layouts
