"""Benchmark: loading from object storage at cloud latency, mm's two remote modes against plain webdataset.

    make bench-loader        # ends with this section on the 224 px demo dataset
    python benchmarks/bench_remote.py --dataset data/datasets/demo224 --workers 1 2 --delay-ms 20

An S3 server (moto) runs on loopback behind a proxy that adds ``--delay-ms`` to every request
(tests/latency_proxy.py), as a bucket in a far region would. Every reader decodes the same members with
the same decode and collate code, batch 64, the same DataLoader worker counts, in this run:

- mm, range reads: ``loader.read.cache_dir`` unset; each worker requests the byte ranges of its upcoming
  samples ahead of time, many at once;
- mm, shard cache: ``loader.read.cache_dir`` set (fresh for each run); whole shards downloaded once;
- plain webdataset over s3fs: each worker streams whole shards (``fs.open``), shuffle buffer 1000.

For each: samples/s over the first 2000 samples from a cold start (worker start-up included, as a job pays
it), over later passes, and overall for ``--passes`` passes; the seconds to the first batch; the bytes the
proxy sent, against the dataset's size; and the requests it answered.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

from mmdata.load.decode import collate  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
# after mmdata is imported: tests/ holds a folder named mmdata too
sys.path.append(str(Path(__file__).resolve().parent.parent / "tests"))

from bench_loader import decode_members  # noqa: E402
from helpers import start_moto  # noqa: E402
from latency_proxy import LatencyProxy  # noqa: E402

BUCKET = "mm-bench-remote"
COLD_SAMPLES = 2000
SETTLE_S = 5


class Run(NamedTuple):
    first_batch_s: float
    cold: float            # samples/s over the first COLD_SAMPLES, from the start
    later: float           # samples/s after the first pass
    overall: float
    fetched: int           # body bytes the proxy sent
    requests: int


def timed(make_batches, samples_per_pass: int, passes: int, proxy: LatencyProxy) -> Run:
    proxy.reset_counts()
    start = time.perf_counter()
    first = cold = pass_end = None
    n = at_pass = 0
    batches = make_batches()
    for batch in batches:
        n += len(batch["ids"])
        now = time.perf_counter()
        first = first or now - start
        if cold is None and n >= COLD_SAMPLES:
            cold = n / (now - start)
        if pass_end is None and n >= samples_per_pass:
            pass_end, at_pass = now, n
        if n >= samples_per_pass * passes - 64:   # the last partial batch of an epoch is dropped
            break
    end = time.perf_counter()
    close = getattr(batches, "close", None)
    if close:
        close()
    time.sleep(SETTLE_S)   # requests the closed reader left behind (shard downloads) finish before the next one
    later = (n - at_pass) / (end - pass_end) if pass_end is not None and n > at_pass else float("nan")
    return Run(first, cold or n / (end - start), later, n / (end - start), proxy.body_bytes, proxy.requests)


def mm_loader(url: str, options: dict, workers: int, batch: int, samples: int, cache_dir: str | None):
    from mmdata.config import from_dict
    from mmdata.load.loader import LoaderConfig, MultimodalLoader
    read = {"storage_options": options, **({"cache_dir": cache_dir, "cache_bytes": 1 << 34} if cache_dir else {})}
    config = from_dict(LoaderConfig, {"datasets": [{"path": url}], "batch_size": batch, "num_workers": workers,
                                      "pin_memory": False, "samples_per_epoch": samples, "read": read,
                                      "worker_transport": "pickle"})
    return MultimodalLoader(config)


def plain_webdataset(urls: list[str], options: dict, workers: int, batch: int):
    import fsspec
    import webdataset as wds
    from torch.utils.data import DataLoader
    from webdataset.tariterators import group_by_keys, tar_file_expander

    def opened(sources):
        for source in sources:
            fs, path = fsspec.core.url_to_fs(source["url"], **options)
            yield {**source, "stream": fs.open(path, "rb", block_size=8 << 20)}

    pipeline = wds.DataPipeline(wds.ResampledShards(urls, seed=0), wds.split_by_worker, opened, tar_file_expander,
                                group_by_keys, wds.shuffle(1000), wds.map(decode_members),
                                wds.batched(batch, collation_fn=collate))
    return DataLoader(pipeline, batch_size=None, num_workers=workers)


def upload(dataset: str, options: dict) -> str:
    import boto3
    import s3fs
    boto3.client("s3", endpoint_url=options["endpoint_url"], aws_access_key_id="k", aws_secret_access_key="s",
                 region_name="us-east-1").create_bucket(Bucket=BUCKET)
    name = Path(dataset).resolve().name
    s3fs.S3FileSystem(**options).put(str(Path(dataset).resolve()), f"{BUCKET}/{name}", recursive=True)
    return f"s3://{BUCKET}/{name}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="data/datasets/demo224")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--delay-ms", type=float, default=20.0)
    args = parser.parse_args()
    description = json.loads((Path(args.dataset) / "dataset.json").read_text())
    samples = description["totals"]["written"]
    size = sum(s["bytes"] for s in description["shards"])
    started = start_moto()
    if started is None:
        raise SystemExit("the moto S3 server did not start: is moto[server] installed (pip install -e '.[dev]')?")
    server, options = started
    try:
        url = upload(args.dataset, options)
        shards = [f"{url}/{s['name']}" for s in description["shards"]]
        with LatencyProxy(options["endpoint_url"], delay_s=args.delay_ms / 1000) as proxy:
            through = {**options, "endpoint_url": proxy.url}
            print(f"\nremote: {url} ({samples} samples, {size / 1e6:.1f} MB) behind {args.delay_ms:g} ms per "
                  f"request; batch {args.batch}, {args.passes} passes")
            print(f"  {'reader':30s} {'workers':>7s} {'overall':>8s} {'cold 2000':>9s} {'later':>8s} "
                  f"{'1st batch':>9s} {'fetched':>10s} {'requests':>8s}")
            results = {}
            for workers in args.workers:
                readers = {
                    "mm, shard cache": lambda: mm_loader(url, through, workers, args.batch, samples * args.passes,
                                                         tempfile.mkdtemp(prefix="mm-bench-cache-")),
                    "mm, range reads": lambda: mm_loader(url, through, workers, args.batch, samples * args.passes,
                                                         None),
                    "plain webdataset over s3fs": lambda: plain_webdataset(shards, through, workers, args.batch),
                }
                for name, make in readers.items():
                    r = timed(make, samples, args.passes, proxy)
                    results[(name, workers)] = r
                    print(f"  {name:30s} {workers:7d} {r.overall:8.0f} {r.cold:9.0f} {r.later:8.0f} "
                          f"{r.first_batch_s:8.2f}s {r.fetched / 1e6:7.1f} MB {r.requests:8d}", flush=True)
            print("  ratios, mm range reads to the shard cache (overall) and to webdataset (cold 2000):")
            for workers in args.workers:
                ranged, cached = results[("mm, range reads", workers)], results[("mm, shard cache", workers)]
                wds_run = results[("plain webdataset over s3fs", workers)]
                print(f"    {workers} workers: {ranged.overall / cached.overall:.2f}x cache, "
                      f"{ranged.cold / wds_run.cold:.2f}x webdataset cold; range reads fetched "
                      f"{ranged.fetched / (size * args.passes):.2f}x the dataset per pass")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
