"""The loader: every sample once per epoch across ranks and workers, deterministic, exactly resumable."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pyarrow as pa
import pytest
import torch

from helpers import batch_ids, loader_config
from mmdata.config import ConfigError
from mmdata.load.loader import LoaderError, MultimodalLoader


def all_ids(dataset) -> set[str]:
    from mmdata.load.catalog import load_catalog
    return set(load_catalog(dataset).ids.to_pylist())


@pytest.mark.parametrize("world, workers", [(1, 0), (2, 2), (3, 2)])
def test_every_sample_once_per_epoch_across_ranks_and_workers(demo_dataset, world, workers):
    loaders = [MultimodalLoader(loader_config(demo_dataset, num_workers=workers), rank=r, world_size=world)
               for r in range(world)]
    seen = [i for loader in loaders for b in batch_ids(loader) for i in b]
    assert len({len(loader) for loader in loaders}) == 1           # equal batch counts: nobody hangs
    assert len(seen) == len(set(seen))                               # no sample twice
    assert len(seen) == (48 // (4 * world)) * 4 * world              # only the partial global batch is dropped
    assert set(seen) <= all_ids(demo_dataset)


def test_pad_remainder_gives_every_sample_and_marks_the_padding(demo_dataset):
    loaders = [MultimodalLoader(loader_config(demo_dataset, remainder="pad", batch_size=5), rank=r, world_size=2)
               for r in range(2)]
    real, pads = [], 0
    for loader in loaders:
        for batch in loader:
            real += [i for i, p in zip(batch["ids"], batch["is_pad"].tolist()) if not p]
            pads += int(batch["is_pad"].sum())
    assert sorted(real) == sorted(all_ids(demo_dataset)) and pads == 2 * 5 * 5 - 48


def test_order_is_a_function_of_seed_and_epoch(demo_dataset):
    first = batch_ids(MultimodalLoader(loader_config(demo_dataset)))
    assert batch_ids(MultimodalLoader(loader_config(demo_dataset))) == first
    assert batch_ids(MultimodalLoader(loader_config(demo_dataset, seed=1))) != first
    two_epochs = MultimodalLoader(loader_config(demo_dataset))
    assert batch_ids(two_epochs) == first and batch_ids(two_epochs) != first
    ordered = [i for b in batch_ids(MultimodalLoader(loader_config(demo_dataset, shuffle=False))) for i in b]
    from mmdata.load.catalog import load_catalog
    assert ordered == load_catalog(demo_dataset).ids.to_pylist()[: len(ordered)]


def test_worker_count_and_message_size_do_not_change_the_batches(demo_dataset):
    base = batch_ids(MultimodalLoader(loader_config(demo_dataset, num_workers=0, message_samples=0)))
    for workers, message_samples in [(0, 8), (3, 0), (3, 8), (2, 20), (2, 1000)]:
        loader = MultimodalLoader(loader_config(demo_dataset, num_workers=workers, message_samples=message_samples))
        assert batch_ids(loader) == base, (workers, message_samples)


@pytest.mark.parametrize("lookup_samples", [1, 12, 10**6])
def test_looking_places_up_ahead_does_not_change_the_batches(demo_dataset, monkeypatch, lookup_samples):
    import mmdata.load.batches as batches_module
    base = batch_ids(MultimodalLoader(loader_config(demo_dataset, num_workers=0, message_samples=0)))
    monkeypatch.setattr(batches_module, "LOOKUP_SAMPLES", lookup_samples)   # forked workers inherit it
    assert batch_ids(MultimodalLoader(loader_config(demo_dataset, num_workers=2, message_samples=12))) == base


def test_messages_hold_whole_batches_up_to_the_sample_and_byte_bounds(demo_dataset):
    per_message = lambda **kw: MultimodalLoader(loader_config(demo_dataset, **kw)).plan.batches_per_message  # noqa: E731
    one_batch = MultimodalLoader(loader_config(demo_dataset)).plan.batch_bytes
    assert per_message(message_samples=12) == 3 and per_message(message_samples=0) == 1
    assert per_message(message_samples=1000, message_bytes=2 * one_batch) == 2      # the byte bound wins
    assert per_message(message_samples=1000, message_bytes=1) == 1                  # never less than a batch


def test_message_groups_keep_order_and_size():
    from mmdata.load.batches import message_groups
    messages = [range(0, 1), range(1, 2), range(2, 5), range(5, 8), range(8, 9)]
    groups = list(message_groups(iter(messages), 4))
    assert [m for g in groups for m in g] == messages
    assert [sum(map(len, g)) for g in groups] == [5, 4]      # at least 4 batches each, the last whatever is left


@pytest.mark.parametrize("first, total, workers, per_message", [
    (0, 12, 2, 2), (5, 12, 2, 3), (0, 7, 3, 4), (3, 4, 2, 5), (0, 1, 3, 2), (4, 4, 2, 2), (0, 9, 1, 1)])
def test_worker_messages_deliver_each_batch_in_order_and_the_first_ones_alone(first, total, workers, per_message):
    from mmdata.load.order import worker_messages
    queues = [list(worker_messages(first, total, w, workers, per_message)) for w in range(workers)]
    received = []                         # as DataLoader delivers them: round-robin over workers, in order
    for turn in range(max(map(len, queues))):
        received += [queue[turn] for queue in queues if turn < len(queue)]
    assert [b for message in received for b in message] == list(range(first, total))
    assert all(len(m) == 1 for m in received[:workers])                 # a (re)start waits for one batch only
    assert all(1 <= len(m) <= per_message for m in received)


def assert_same_batch(a: dict, b: dict) -> None:
    assert a["ids"] == b["ids"]
    for key in ("tokens", "tokens_mask", "image", "mel", "mel_mask", "label", "has_text", "has_image", "has_audio"):
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("stop_after", [1, 3, 5])
@pytest.mark.parametrize("message_samples", [0, 12])
def test_exact_resume_yields_the_same_next_batches(demo_dataset, stop_after, message_samples):
    config = loader_config(demo_dataset, num_workers=2, augment={"image_flip": True, "mel_time_masks": 1},
                           message_samples=message_samples)
    reference = list(MultimodalLoader(config, rank=1, world_size=2))
    loader = MultimodalLoader(config, rank=1, world_size=2)
    for i, batch in enumerate(loader):
        if i + 1 == stop_after:
            break
    state = json.loads(json.dumps(loader.state_dict()))  # states are plain JSON
    resumed = MultimodalLoader(config, rank=1, world_size=2)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == len(reference) - stop_after
    for a, b in zip(rest, reference[stop_after:]):
        assert_same_batch(a, b)


def test_resuming_reads_and_decodes_only_the_samples_still_to_come(demo_dataset, monkeypatch):
    import mmdata.load.batches as batches_module
    from mmdata.load.reader import ShardReader
    read, decoded = [], []
    real_read, real_decode = ShardReader.read_batch, batches_module.decode_sample
    monkeypatch.setattr(ShardReader, "read_batch", lambda self, urls, *a: read.extend(urls) or real_read(self, urls, *a))
    monkeypatch.setattr(batches_module, "decode_sample", lambda *a: decoded.append(1) or real_decode(*a))
    config = loader_config(demo_dataset)                     # in this process (no workers): the spies see it all
    total = len(MultimodalLoader(config))
    resumed = MultimodalLoader(config)
    resumed.load_state_dict({**resumed.state_dict(), "consumed": (total - 2) * 4})   # 2 batches left of 12
    assert len(list(resumed)) == 2
    assert len(read) == len(decoded) == 2 * 4                # nothing of the skipped 10 batches


def test_resume_continues_into_the_next_epochs(demo_dataset):
    config = loader_config(demo_dataset)
    reference = MultimodalLoader(config)
    epochs = [batch_ids(reference), batch_ids(reference)]
    loader = MultimodalLoader(config)
    it = iter(loader)
    next(it), next(it)
    state = loader.state_dict()
    resumed = MultimodalLoader(config)
    resumed.load_state_dict(state)
    assert batch_ids(resumed) == epochs[0][2:]
    assert batch_ids(resumed) == epochs[1]


@pytest.mark.parametrize("new_world, new_batch", [(3, 4), (1, 4), (2, 3)])
def test_elastic_resume_yields_each_remaining_sample_once(demo_dataset, new_world, new_batch):
    old = [MultimodalLoader(loader_config(demo_dataset), rank=r, world_size=2) for r in range(2)]
    seen = []
    for loader in old:
        for i, batch in enumerate(loader):
            seen += batch["ids"]
            if i == 2:
                break
    state = old[0].state_dict()
    assert {k: v for k, v in state.items() if k != "source_counts"} == \
        {k: v for k, v in old[1].state_dict().items() if k != "source_counts"}  # ranks agree
    new = [MultimodalLoader(loader_config(demo_dataset, batch_size=new_batch), rank=r, world_size=new_world)
           for r in range(new_world)]
    for loader in new:
        loader.load_state_dict(state)
    assert len({len(loader) for loader in new}) == 1
    rest = [i for loader in new for b in batch_ids(loader) for i in b]
    assert not set(rest) & set(seen)
    assert len(rest) == len(set(rest))
    remaining = 48 - len(seen)
    assert len(rest) == remaining - remaining % (new_batch * new_world)


@pytest.mark.parametrize("kind", ["string", "large_string"])
def test_ids_are_sliced_from_the_index_exactly(demo_dataset, kind):
    from mmdata.load.catalog import load_catalog
    catalog = load_catalog(demo_dataset)
    rows = np.random.default_rng(0).integers(0, len(catalog) - 1, 30)
    assert catalog.ids_of(rows) == catalog.ids.take(rows).to_pylist()
    odd = pa.array(["", "é-ü", "x" * 300, "ümlaut"] * 3, getattr(pa, kind)()).slice(2)   # offset, wide chars
    other = dataclasses.replace(catalog, ids=odd)
    assert other.ids_of(np.array([0, 1, 3, 9])) == odd.take(np.array([0, 1, 3, 9])).to_pylist()


def test_shuffle_run_keeps_runs_of_consecutive_samples_of_a_shard_together():
    from mmdata.load.order import Source, source_order
    source = Source(rows=np.arange(30), shard=np.repeat([0, 1, 2], 10), lengths=np.zeros(30, np.int64))
    single = source_order(source, seed=0, epoch=0, shuffle=True, window=2, salt=0)
    order = source_order(source, seed=0, epoch=0, shuffle=True, window=2, salt=0, run=4)
    assert sorted(order.tolist()) == list(range(30)) and order.tolist() != single.tolist()
    runs = {tuple(r) for s in range(3) for r in np.array_split(np.arange(10 * s, 10 * s + 10), 3)}   # 4, 3, 3
    at = 0
    while at < len(order):           # the order is whole runs, one after another
        run = next(r for r in runs if r[0] == order[at])
        assert tuple(order[at: at + len(run)].tolist()) == run
        at += len(run)
    assert len({i // 10 for i in order[:20].tolist()}) == 2   # runs are shuffled within a window of shards


def test_a_loader_with_shuffle_run_gives_every_sample_once(demo_dataset):
    base = batch_ids(MultimodalLoader(loader_config(demo_dataset)))
    runs = batch_ids(MultimodalLoader(loader_config(demo_dataset, shuffle_run=3, num_workers=2)))
    assert runs != base and sorted(i for b in runs for i in b) == sorted(i for b in base for i in b)


@pytest.mark.parametrize("damage", ["garbage", "fifo", "missing"])
def test_an_index_file_that_is_garbage_not_a_file_or_gone_is_one_reason(demo_dataset, tmp_path, damage):
    import os

    from mmdata.dataset import DatasetError
    from mmdata.load.catalog import load_catalog
    copy = tmp_path / "copy"
    shutil.copytree(demo_dataset, copy)
    index = sorted((copy / "index").glob("*.parquet"))[0]
    index.unlink()
    if damage == "garbage":
        index.write_bytes(b"not parquet")
    elif damage == "fifo":
        os.mkfifo(index)                 # a read would block for ever
    words = {"garbage": "is not a readable index", "fifo": "is not a regular file", "missing": "is missing"}
    with pytest.raises(DatasetError, match=f"{words[damage]}.*rebuild the dataset"):
        load_catalog(str(copy))


def test_an_epoch_longer_than_the_dataset_takes_further_shuffled_passes(demo_dataset):
    ids = sorted(all_ids(demo_dataset))
    loader = MultimodalLoader(loader_config(demo_dataset, samples_per_epoch=120, batch_size=4, num_workers=0))
    seen = [i for b in batch_ids(loader) for i in b]
    assert len(seen) == 120
    assert sorted(seen[:48]) == ids and sorted(seen[48:96]) == ids    # whole passes, each a permutation
    assert seen[48:96] != seen[:48]                                   # and each pass shuffled anew
    normal = [i for b in batch_ids(MultimodalLoader(loader_config(demo_dataset, num_workers=0))) for i in b]
    assert seen[:48] == normal                                        # the first pass is the usual epoch


def test_mixing_follows_the_weights_and_counts_sources(demo_dataset, tmp_path):
    other = tmp_path / "copy"
    shutil.copytree(demo_dataset, other)
    description = json.loads((other / "dataset.json").read_text())
    description["fingerprint"] = "other"
    (other / "dataset.json").write_text(json.dumps(description))
    config = loader_config(demo_dataset, samples_per_epoch=2000, batch_size=20, modalities=["text"])
    config.datasets[0].weight = 0.7
    from mmdata.load.loader import DatasetSource
    config.datasets.append(DatasetSource(str(other), 0.3))
    loader = MultimodalLoader(config)
    for batch in loader:
        assert set(batch["source"].tolist()) <= {0, 1}
    share = loader.source_counts[0] / sum(loader.source_counts)
    assert sum(loader.source_counts) == 2000 and abs(share - 0.7) < 0.04
    assert loader.state_dict()["source_counts"] == loader.source_counts
    again = MultimodalLoader(config)
    assert batch_ids(again) == batch_ids(MultimodalLoader(config))


def test_modality_selection_reads_only_those_members(demo_dataset, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(demo_dataset, copy)
    from mmdata.load.catalog import load_catalog
    catalog = load_catalog(str(copy))
    shard = copy / "shard-000000.tar"
    data = bytearray(shard.read_bytes())
    for row in range(5):  # garble every image of the first shard
        off, size = catalog.offsets["jpg"][row], catalog.sizes["jpg"][row]
        if off >= 0:
            data[off: off + size] = b"\xff" * size
    shard.unlink()
    shard.write_bytes(bytes(data))
    text_only = loader_config(str(copy), modalities=["text", "audio"], shuffle=False)
    batches = list(MultimodalLoader(text_only))
    assert not any(b["has_image"].any() for b in batches)
    with pytest.raises(LoaderError, match=r"shard-000000.tar sample '[^']+'.*jpg"):
        list(MultimodalLoader(loader_config(str(copy), shuffle=False)))
    skipping = list(MultimodalLoader(loader_config(str(copy), shuffle=False, on_error="skip")))
    skipped = [s for b in skipping for s in b["skipped"]]
    assert len(skipped) == int((catalog.offsets["jpg"][:5] >= 0).sum()) and "shard-000000.tar" in skipped[0]


def test_truncated_shard_is_named(demo_dataset, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(demo_dataset, copy)
    shard = copy / "shard-000003.tar"
    data = shard.read_bytes()
    shard.unlink()
    shard.write_bytes(data[:2000])
    with pytest.raises(LoaderError, match="shard-000003.tar.*truncated"):
        list(MultimodalLoader(loader_config(str(copy), shuffle=False)))


@pytest.mark.parametrize("overrides, world, key, words", [
    ({"batch_size": 30}, 2, "loader.batch_size", "more than the 48 samples"),
    ({"num_workers": 9, "batch_size": 8}, 1, "loader.num_workers", "use at most 6"),
    ({"read": {"cache_dir": "/tmp/x", "cache_bytes": 1000}}, 1, "loader.read.cache_bytes", "thrash"),
])
def test_preflight_rejects_plans_that_would_hang_starve_or_thrash(demo_dataset, overrides, world, key, words):
    with pytest.raises(ConfigError) as info:
        MultimodalLoader(loader_config(demo_dataset, **overrides), rank=0, world_size=world)
    assert info.value.key == key and words in str(info.value)


def test_length_bucketing_cuts_padding_and_keeps_every_sample(demo_dataset):
    def padding(loader):
        total = 0
        for batch in loader:
            total += int((~batch["tokens_mask"]).sum())
        return total
    plain = MultimodalLoader(loader_config(demo_dataset, modalities=["text"]))
    bucketed = MultimodalLoader(loader_config(demo_dataset, modalities=["text"], bucket_by="tokens",
                                              bucket_batches=4))
    assert padding(bucketed) < padding(plain)
    ids = [i for b in batch_ids(bucketed) for i in b]
    assert len(ids) == len(set(ids)) == len(plain) * 4


def test_batches_have_tensors_and_presence_masks(demo_dataset):
    batch = next(iter(MultimodalLoader(loader_config(demo_dataset, batch_size=8))))
    assert batch["tokens"].dtype == torch.int64 and batch["tokens"].shape == batch["tokens_mask"].shape
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape[1:] == (3, 32, 32)
    assert batch["mel"].shape[:2] == (8, 32) and batch["mel_mask"].shape == (8, batch["mel"].shape[2])
    assert batch["label"].shape == (8,) and len(batch["ids"]) == 8
    for m in ("text", "image", "audio"):
        assert batch[f"has_{m}"].dtype == torch.bool
    missing = ~batch["has_audio"]
    assert not batch["mel_mask"][missing].any()


def test_eval_split_is_disjoint_and_stable(demo_dataset):
    train = MultimodalLoader(loader_config(demo_dataset, split="train", eval_fraction=0.25, batch_size=2,
                                           remainder="pad"))
    held = MultimodalLoader(loader_config(demo_dataset, split="eval", eval_fraction=0.25, batch_size=2,
                                          remainder="pad"))
    a = {i for b in batch_ids(train) for i in b}
    b = {i for b in batch_ids(held) for i in b}
    assert not a & b and len(a | b) == 48 and 4 <= len(b) <= 20
