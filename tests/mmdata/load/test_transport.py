"""Worker -> main transport through shared slots: same batches as pickling, slots come back, never blocks."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

from helpers import loader_config
from mmdata.load.loader import MultimodalLoader
from mmdata.load.transport import FREE, SENT, SharedSlots, attach


def tensors(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}


def assert_same_batches(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a["ids"] == b["ids"] and list(a) == list(b)
        for key, value in tensors(b).items():
            assert a[key].dtype == value.dtype and torch.equal(a[key], value), key


def put(slots: SharedSlots, worker: int, batches: list[dict]):
    """What a worker does with a message: allocate in a claimed slot, fill, finish."""
    writer = slots.claim(worker)
    if writer is None:
        return None
    placed = [{} for _ in batches]
    for batch, into in zip(batches, placed):
        for key, value in batch.items():
            into[key] = torch.from_numpy(writer.empty(tuple(value.shape), value.numpy().dtype))
            into[key].copy_(value)
    return writer.finish(placed)


def test_a_slot_round_trip_gives_equal_tensors_and_frees_the_slot_when_they_are_collected():
    slots = SharedSlots(workers=2, slots_per_worker=2, slot_bytes=1 << 16)
    sent = [{"mel": torch.randn(3, 5, 7).half(), "mask": torch.rand(3, 7) > 0.5, "tokens": torch.arange(12).view(3, 4)},
            {"mel": torch.randn(2, 5, 4).half(), "tokens": torch.arange(6).view(2, 3)}]   # a message of two batches
    ref = put(slots, 1, sent)
    assert ref is not None and ref.slot in slots.worker_slots(1) and slots.state[ref.slot] == SENT
    received = attach(*ref.__reduce__()[1])             # what unpickling in the main process does
    assert len(received) == 2
    for got, want in zip(received, sent):
        assert list(got) == list(want)
        assert all(torch.equal(got[k], v) and got[k].dtype == v.dtype for k, v in want.items())
    first, second = received
    del received, got
    mel = first.pop("mel")[1:]                         # a view of a view still holds the slot
    del first
    gc.collect()
    assert slots.state[ref.slot] != FREE
    del mel
    gc.collect()
    assert slots.state[ref.slot] != FREE               # the message's other batch still holds it
    del second
    gc.collect()
    assert slots.state[ref.slot] == FREE and slots.in_use() == 0


def test_no_free_slot_means_inline_not_waiting_and_what_does_not_fit_stays_out():
    slots = SharedSlots(workers=1, slots_per_worker=2, slot_bytes=1024)
    writer = slots.claim(0)
    inside, outside = writer.empty((100,), np.uint8), writer.empty((2000,), np.uint8)   # the second does not fit
    sent = writer.finish([{"a": torch.from_numpy(inside), "b": torch.from_numpy(outside), "c": torch.zeros(3)}])
    assert [p.key for p in sent.placed[0]] == ["a"]                                # b and c travel inline
    assert slots.claim(0) is not None and slots.claim(0) is None                    # both slots in flight
    slots.forget_unsent(0)       # a restarted worker: its predecessor's unreceived batches are gone
    assert slots.in_use() == 0
    nothing = slots.claim(0)
    assert nothing.finish([{"c": torch.zeros(3)}]) is None and slots.in_use() == 0  # an unused slot goes back
    written = slots.claim(0)
    part = torch.from_numpy(written.empty((10,), np.uint8))[:5]                    # a view, not the whole array
    sent = written.finish([{"part": part}])
    assert sent.placed == [[]] and slots.state[sent.slot] == SENT   # part travels inline, pickled later: keep it
    assert attach(*sent.__reduce__()[1]) == [{}]
    gc.collect()
    assert slots.in_use() == 0                                      # received: free


@pytest.mark.parametrize("message", [{"batch_size": 4, "message_samples": 0}, {"batch_size": 2, "message_samples": 4}])
def test_shared_slots_and_pickling_deliver_the_same_batches(demo_dataset, message):
    base = list(MultimodalLoader(loader_config(demo_dataset, num_workers=0, **message)))
    shared = MultimodalLoader(loader_config(demo_dataset, num_workers=2, **message))
    assert shared.dataloader().dataset.slots is not None                           # the default path
    with pytest.warns(UserWarning, match="keeping earlier batches alive"):
        got = list(shared)                             # holding every batch: later ones go inline
    assert_same_batches(got, base)
    assert 0 < shared.batches_pickled < len(got)
    assert all(b["image"].is_contiguous(memory_format=torch.channels_last) for b in got)  # as collated, no copy
    pickled = MultimodalLoader(loader_config(demo_dataset, num_workers=2, worker_transport="pickle", **message))
    assert pickled.dataloader().dataset.slots is None
    got = list(pickled)
    assert_same_batches(got, base)
    assert all(b["image"].is_contiguous(memory_format=torch.channels_last) for b in got)   # one layout either way


def test_normalised_float_images_travel_through_slots_too(demo_dataset):
    base = list(MultimodalLoader(loader_config(demo_dataset, num_workers=0, normalize_images=True)))
    loader = MultimodalLoader(loader_config(demo_dataset, num_workers=2, normalize_images=True))
    got = list(loader)          # all held: a worker sends 4 messages (of 1-2 batches) and has 5 slots
    assert loader.batches_pickled == 0
    assert_same_batches(got, base)
    assert got[0]["image"].dtype == torch.float32 and got[0]["image"].is_contiguous(memory_format=torch.channels_last)


def test_slots_come_back_after_epochs_and_abandoned_epochs(demo_dataset):
    config = loader_config(demo_dataset, num_workers=2, augment={"image_flip": True, "mel_time_masks": 1})
    base = [[b["ids"], b["image"].clone(), b["mel"].clone()] for b in MultimodalLoader(config)]
    loader = MultimodalLoader(config)
    slots = loader.dataloader().dataset.slots
    for i, batch in enumerate(loader):              # break off early: its batches in flight are dropped
        if i == 2:
            break
    del batch
    loader.set_epoch(0)
    again = [[b["ids"], b["image"].clone(), b["mel"].clone()] for b in loader]
    assert loader.batches_pickled == 0                # batches let go of: every one came through a slot
    assert len(again) == len(base)
    assert all(a[0] == b[0] and torch.equal(a[1], b[1]) and torch.equal(a[2], b[2]) for a, b in zip(again, base))
    gc.collect()
    assert slots.in_use() == 0


def test_small_tensors_travel_joined_in_one_buffer_and_come_back_equal_writable_and_in_order():
    import pickle
    from mmdata.load.transport import JOINED_KEY, pack_small_tensors, unpack
    batch = {"ids": ["a", "b", "c"], "label": torch.tensor([3, -1, 7]), "has_label": torch.tensor([True, False, True]),
             "mel": torch.randn(3, 4, 5).half(), "big": torch.arange(5000, dtype=torch.int32), "epoch": 2,
             "image": torch.zeros(3, 5, 4, 3, dtype=torch.uint8).permute(0, 3, 1, 2)}   # channels_last
    packed = pack_small_tensors(batch, limit=1 << 20)
    layout = packed[JOINED_KEY].layout
    assert [k for k, *_ in layout] == ["label", "has_label", "mel"]              # one buffer for the small ones
    assert all(offset % 8 == 0 for *_, offset in layout)
    assert isinstance(packed["big"], np.ndarray)                                # bigger: an array of its own
    got = unpack(pickle.loads(pickle.dumps(packed)))
    assert list(got) == list(batch) and got["ids"] == batch["ids"] and got["epoch"] == 2
    for key in ("label", "has_label", "mel", "big", "image"):
        assert got[key].dtype == batch[key].dtype and torch.equal(got[key], batch[key]), key
    assert got["image"].stride() == batch["image"].stride()
    got["label"][0] = 9   # writable (no read-only buffer behind it)


def test_with_pinning_every_tensor_of_a_worker_batch_reaches_dataloaders_pin_memory_and_the_slot_comes_back(
        demo_dataset, monkeypatch):
    """What DataLoader's pin-memory thread does with a batch from a worker: unpickle it (slot views and
    the joined small tensors become tensors), then ``pin_memory`` everything it finds. Pinning is a copy
    (tested here with a stand-in: no CUDA on this machine), so the slot is free again right after."""
    import pickle
    from torch.utils.data._utils.pin_memory import pin_memory
    import torch.utils.data._utils.worker as worker_module
    from mmdata.load.batches import EpochBatches
    from mmdata.load.transport import encode_control, unpack_message
    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t, *a, **k: pinned.append(t.clone()) or pinned[-1])
    loader = MultimodalLoader(loader_config(demo_dataset, batch_size=8, num_workers=1))
    slots = loader.shared_slots()
    dataset = EpochBatches(loader.plan, loader.control, slots)
    encode_control(loader.control, 0, 0, loader.layouts)
    monkeypatch.setattr(worker_module, "_worker_info", worker_module.WorkerInfo(id=0, num_workers=1, seed=0,
                                                                                 dataset=dataset))
    message = next(iter(dataset))   # built as in a worker: in a slot, small tensors joined
    assert slots.in_use() == 1
    [batch] = unpack_message(pin_memory(pickle.loads(pickle.dumps(message))))   # a worker's first: one batch
    gc.collect()
    assert slots.in_use() == 0                                      # copied out: the slot is free already
    tensors = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
    assert {"image", "mel", "tokens", "label", "has_image", "source", "is_pad"} <= set(tensors)
    assert all(any(t is p for p in pinned) for t in tensors.values())   # every tensor went through pin_memory
    assert len(batch["ids"]) == 8
