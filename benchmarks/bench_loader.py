"""Benchmark: loader samples/s vs plain webdataset, loose files and the decode ceiling; resume latency.

    make bench-loader        # the demo dataset at 64 px and at 224 px; cores-1 and cores workers
    python benchmarks/bench_loader.py --dataset data/datasets/demo --workers 1 2 --batch 64

All four readers decode the same members (tokens, image, mel) with the same
decode/collate code and the same number of DataLoader workers, in this run,
and each is timed over the same number of samples (``--samples``, passes over
the dataset repeated as needed) after its workers have started and built 10 batches each.
For the three DataLoader readers it also reports the main process's CPU time per
sample: the training loop runs there, and what receiving batches costs it is
taken from the model.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tarfile
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from mmdata.load.decode import AugmentConfig, collate, decode_sample

MEMBERS = ("tokens.npy", "jpg", "mel.npy")


class Rate(NamedTuple):
    samples_per_s: float
    main_cpu_us: float      # CPU time of the main process (all its threads) per sample


def rate(batches, samples: int, warmup: int) -> Rate:
    """Samples/s over ``samples`` samples after the first ``warmup`` batches (worker start-up is not throughput)."""
    n, start, cpu = 0, None, None
    for i, batch in enumerate(batches):
        if i == warmup - 1:
            start, cpu = time.perf_counter(), time.process_time()
        elif i >= warmup:
            n += len(batch["ids"])
            if n >= samples:
                break
    return Rate(n / (time.perf_counter() - start), (time.process_time() - cpu) / n * 1e6)


NO_AUGMENT = AugmentConfig()


def decode_members(sample: dict) -> dict:
    members = {ext: sample[ext] for ext in MEMBERS if ext in sample}
    out = decode_sample(members, NO_AUGMENT, None)   # no augmentation: no random generator either
    out["id"] = sample.get("__key__", "")
    return out


def ours(dataset: str, workers: int, batch: int, samples: int) -> Rate:
    from mmdata.config import from_dict
    from mmdata.load.loader import LoaderConfig, MultimodalLoader
    # no pinning: the baselines don't pin either (on a CUDA machine the loader would by default)
    config = from_dict(LoaderConfig, {"datasets": [{"path": dataset}], "batch_size": batch, "num_workers": workers,
                                      "pin_memory": False, "samples_per_epoch": samples + (warmup(workers) + 2) * batch})
    return rate(MultimodalLoader(config), samples, warmup(workers))


def warmup(workers: int) -> int:
    """Batches skipped before timing: 10 per worker. A fresh worker's first batches pay one-time costs
    (first touches of shard and slot pages, caches, webdataset filling its shuffle buffer) that a
    training run pays once; with 2 per worker they were ~20% of a 6 000-sample measurement (measured)."""
    return 10 * max(workers, 1)


def plain_webdataset(dataset: str, workers: int, batch: int, samples: int) -> Rate:
    import webdataset as wds
    shards = sorted(str(p) for p in Path(dataset).glob("shard-*.tar"))
    pipeline = (wds.WebDataset(shards, shardshuffle=len(shards), seed=0, empty_check=False)
                .repeat().shuffle(1000).map(decode_members).batched(batch, collation_fn=collate))
    return rate(DataLoader(pipeline, batch_size=None, num_workers=workers), samples, warmup(workers))


class LooseFiles(Dataset):
    """Map-style baseline: every member a file of its own."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.keys = sorted({p.name.split(".", 1)[0] for p in folder.iterdir()})

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> dict:
        key = self.keys[i]
        sample = {"__key__": key}
        for ext in MEMBERS:
            path = self.folder / f"{key}.{ext}"
            if path.exists():
                sample[ext] = path.read_bytes()
        return decode_members(sample)


def loose_files(dataset: str, workers: int, batch: int, samples: int, scratch: Path) -> Rate:
    folder = scratch / "loose"
    if not folder.exists():
        folder.mkdir(parents=True)
        for shard in sorted(Path(dataset).glob("shard-*.tar")):
            with tarfile.open(shard) as tar:
                tar.extractall(folder, filter="data")
    files = LooseFiles(folder)
    sampler = RandomSampler(files, num_samples=samples + (warmup(workers) + 2) * batch,
                            generator=torch.Generator().manual_seed(0))
    loader = DataLoader(files, batch_size=batch, sampler=sampler, num_workers=workers, collate_fn=collate)
    return rate(loader, samples, warmup(workers))


class Arena:
    """Memory reused batch after batch, as the loader's shared slots are. A batch allocated afresh
    each time makes the decode-only loop 7-8% slower at 224 px x 256 (38 MB of images, measured): without
    this the ceiling would be lower than the best a decoding process can do."""

    def __init__(self, capacity: int = 0):
        self.buffer, self.used = np.empty(capacity, np.uint8), 0

    def empty(self, shape, dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        start = -(-self.used // 64) * 64
        size = int(np.prod(shape)) * dtype.itemsize
        if start + size > len(self.buffer):
            return np.empty(shape, dtype)
        self.used = start + size
        return self.buffer[start: start + size].view(dtype).reshape(shape)

    def collate(self, samples: list[dict]) -> dict:
        self.used = 0   # the previous batch is gone: its memory is reused
        return collate(samples, empty=self.empty)


def decode_ceiling(dataset: str, workers: int, samples: int, batch: int, distinct: int = 1000) -> Rate:
    """Decode + collate only (members already in memory, one thread, batch memory reused), times the
    number of workers."""
    import webdataset as wds
    shards = sorted(str(p) for p in Path(dataset).glob("shard-*.tar"))
    held = [s for _, s in zip(range(distinct), wds.WebDataset(shards, shardshuffle=False, empty_check=False))]
    torch.set_num_threads(1)
    first = collate([decode_members(s) for s in held[:batch]])  # first-call set-up is not throughput
    arena = Arena(2 * sum(v.numel() * v.element_size() for v in first.values() if isinstance(v, torch.Tensor)))
    del first
    start, done = time.perf_counter(), 0
    while done < samples:
        for i in range(0, len(held), batch):
            arena.collate([decode_members(s) for s in held[i: i + batch]])
        done += len(held)
    elapsed = time.perf_counter() - start
    torch.set_num_threads(os.cpu_count() or 1)
    return Rate(done / elapsed * max(workers, 1), float("nan"))   # all of it runs in the main process


def resume_latency(dataset: str, workers: int, batch: int) -> dict[str, float]:
    from mmdata.config import from_dict
    from mmdata.load.loader import LoaderConfig, MultimodalLoader
    config = from_dict(LoaderConfig, {"datasets": [{"path": dataset}], "batch_size": batch, "num_workers": workers})
    probe = MultimodalLoader(config)
    total = len(probe)
    state = probe.state_dict()
    out = {}
    for fraction in (0.01, 0.5, 0.99):
        loader = MultimodalLoader(config)
        at = max(0, min(total - 1, int(total * fraction)))
        start = time.perf_counter()
        loader.load_state_dict({**state, "consumed": at * batch})
        next(iter(loader))
        out[f"{fraction:.0%}"] = time.perf_counter() - start
        loader.close()
    return out


def compare(dataset: str, workers: int, batch: int, samples: int, rounds: int, scratch: Path) -> dict[str, float]:
    """Median samples/s of each reader over ``rounds`` interleaved rounds (noisy machines drift)."""
    print(f"\n{Path(dataset).name}: {workers} workers, batch {batch}, {rounds} rounds of {samples} samples per reader")
    readers = {"decode ceiling": lambda: decode_ceiling(dataset, workers, samples, batch),
               "mmdata loader": lambda: ours(dataset, workers, batch, samples),
               "plain webdataset": lambda: plain_webdataset(dataset, workers, batch, samples),
               "loose files (map-style)": lambda: loose_files(dataset, workers, batch, samples, scratch)}
    runs: dict[str, list[Rate]] = {name: [] for name in readers}
    names = list(readers)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:   # rotated: no reader always goes first
            runs[name].append(readers[name]())
    speed = {name: np.array([r.samples_per_s for r in values]) for name, values in runs.items()}
    main_cpu = {name: float(np.median([r.main_cpu_us for r in values])) for name, values in runs.items()}
    ceiling = float(np.median(speed["decode ceiling"]))
    print(f"  decode ceiling (1 process x {workers}) {ceiling:8.0f} samples/s")
    for name in names[1:]:
        value = float(np.median(speed[name]))
        print(f"  {name:30s} {value:8.0f} samples/s   {value / ceiling:.2f} of ceiling   "
              f"main process {main_cpu[name]:5.1f} us CPU/sample")
    # ratios within each round (readers timed next to each other), then their median: robust to drift
    ratio = lambda a, b: float(np.median(speed[a] / speed[b]))  # noqa: E731
    return {"vs webdataset": ratio("mmdata loader", "plain webdataset"),
            "vs ceiling": ratio("mmdata loader", "decode ceiling"),
            "main cpu": main_cpu["mmdata loader"], "main cpu webdataset": main_cpu["plain webdataset"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", action="append", help="a dataset directory (repeat for several); "
                        "default data/datasets/demo")
    cores = os.cpu_count() or 1
    parser.add_argument("--workers", type=int, nargs="+", default=sorted({max(1, cores - 1), cores}),
                        help="worker counts to compare (default: cores - 1, which leaves one for training, "
                             "and cores)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--samples", type=int, default=6000, help="samples timed per reader and round")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; medians are reported")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="mm-bench-loader-"))
    summary = []
    try:
        for dataset in args.dataset or ["data/datasets/demo"]:
            dataset = str(Path(dataset).resolve())
            for workers in args.workers:
                summary.append((Path(dataset).name, workers,
                                compare(dataset, workers, args.batch, args.samples, args.rounds,
                                        scratch / Path(dataset).name)))
            latency = resume_latency(dataset, args.workers[-1], args.batch)
            print("  resume latency (load_state_dict -> first batch): "
                  + ", ".join(f"{k} of epoch {v:.2f} s" for k, v in latency.items()))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)   # copies of the datasets made for the comparison
    print("\nsummary: mmdata loader samples/s relative to, in the same round (median over rounds),")
    print("  and main-process CPU per sample (us), mmdata loader / plain webdataset")
    print(f"  {'dataset':32s} {'workers':>7s} {'plain webdataset':>17s} {'decode ceiling':>15s} {'main CPU':>13s}")
    for name, workers, r in summary:
        print(f"  {name:32s} {workers:7d} {r['vs webdataset']:16.2f}x {r['vs ceiling']:15.2f} "
              f"{r['main cpu']:6.1f} / {r['main cpu webdataset']:.1f}")


if __name__ == "__main__":
    main()
