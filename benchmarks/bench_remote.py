"""Benchmark: loading from object storage at cloud latency, mm's two remote modes against plain webdataset.

    make bench-loader        # ends with this section on the 224 px demo dataset
    python benchmarks/bench_remote.py --dataset data/datasets/demo224 --workers 1 2 --delay-ms 20

An S3 server (moto) runs on loopback behind a proxy that adds ``--delay-ms`` to every request
(tests/latency_proxy.py, in a process of its own), as a bucket in a far region would. The proxy (an
asyncio server) answers GETs of an object from its memory once it has read it from moto
(``--no-proxy-memory``: the threaded proxy, and every request goes to moto, whose one interpreter
answers about 160 requests/s: a ceiling S3 does not have). Every reader decodes the same members with
the same decode and collate code, batch 64, the same DataLoader worker counts, in this run:

- mm, range reads: ``loader.read.cache_dir`` unset; each worker requests the byte ranges of its upcoming
  samples ahead of time, many at once;
- mm, shard cache: ``loader.read.cache_dir`` set (fresh for each run); whole shards downloaded once;
- plain webdataset over s3fs: each worker streams whole shards (``fs.open``), shuffle buffer 1000;
- the peers (``--peers``, on by default), LitData and MosaicML Streaming, each from its own format (the same
  samples converted once, chunks the mm shards' size, uploaded to the same bucket), shuffle on, a fresh
  local cache for each run: ``benchmarks/bench_peers.py`` in an environment of their own, ``.bench-peers``
  (their pins conflict with ours), made on first use: ``--no-peers`` to skip them.

For each: samples/s over the first 2000 samples from a cold start (worker start-up included, as a job pays
it), over later passes, and overall for ``--passes`` passes; the seconds to the first batch; the bytes the
proxy sent, against the dataset's size; and the requests it answered.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
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
from latency_proxy import ProxyProcess  # noqa: E402

BUCKET = "mm-bench-remote"
COLD_SAMPLES = 2000
SETTLE_S = 5
ROOT = Path(__file__).resolve().parent.parent
PEERS_VENV = ROOT / ".bench-peers"
PEERS_PACKAGES = ["litdata==0.2.76", "mosaicml-streaming==0.13.0"]
PEERS = {"litdata": "LitData", "mosaic": "MosaicML Streaming"}   # bench_peers.py's name: the table's
PEER_TIMEOUT_S = 900
RUNS = "mm, range reads, shuffle_run 8"


class Run(NamedTuple):
    first_batch_s: float
    cold: float            # samples/s over the first COLD_SAMPLES, from the start
    later: float           # samples/s after the first pass
    overall: float
    fetched: int           # body bytes the proxy sent
    requests: int


def timed(make_batches, samples_per_pass: int, passes: int, proxy: ProxyProcess | None) -> Run:
    """``proxy`` None: the counts are the caller's (bench_peers.py, whose proxy is in its parent)."""
    if proxy:
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
    return Run(first, cold or n / (end - start), later, n / (end - start),
               proxy.body_bytes if proxy else 0, proxy.requests if proxy else 0)


def mm_loader(url: str, options: dict, workers: int, batch: int, samples: int, cache_dir: str | None,
              shuffle_run: int = 1):
    from mmdata.config import from_dict
    from mmdata.load.loader import LoaderConfig, MultimodalLoader
    read = {"storage_options": options, **({"cache_dir": cache_dir, "cache_bytes": 1 << 34} if cache_dir else {})}
    config = from_dict(LoaderConfig, {"datasets": [{"path": url}], "batch_size": batch, "num_workers": workers,
                                      "pin_memory": False, "samples_per_epoch": samples, "read": read,
                                      "shuffle_run": shuffle_run})
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


def upload(dataset: str, options: dict, prefix: str = "") -> str:
    import boto3
    import s3fs
    client = boto3.client("s3", endpoint_url=options["endpoint_url"], aws_access_key_id="k",
                          aws_secret_access_key="s", region_name="us-east-1")
    if not prefix:
        client.create_bucket(Bucket=BUCKET)
    name = Path(dataset).resolve().name
    s3fs.S3FileSystem(**options).put(str(Path(dataset).resolve()), f"{BUCKET}/{prefix}{name}", recursive=True)
    return f"s3://{BUCKET}/{prefix}{name}"


def warm(options: dict, proxy: ProxyProcess) -> None:
    """Every object in the bucket read once through the proxy: with ``--proxy-memory`` it then holds them
    all, and no reader's first requests wait for moto to hand it a copy. (boto3: no event loop is left in
    this process for the readers' forked workers to inherit.)"""
    import boto3
    client = boto3.client("s3", endpoint_url=proxy.url, aws_access_key_id=options["key"],
                          aws_secret_access_key=options["secret"], region_name="us-east-1")
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        for item in page.get("Contents", []):
            client.get_object(Bucket=BUCKET, Key=item["Key"])["Body"].read()
    proxy.reset_counts()


def last_line(text: str, limit: int | None = 200) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1][:limit] if lines else "no output"


def peers_python() -> Path | None:
    """The python of the peers' environment, ``.bench-peers``, made when missing: our venv's packages under
    theirs (torch, mmdata's dependencies), litdata and mosaicml-streaming installed on top. None, with a line
    saying what failed, when it can't be made."""
    python, ready = PEERS_VENV / "bin" / "python", PEERS_VENV / ".ready"
    if python.exists() and ready.exists():
        return python
    print(f"making the peers' environment {PEERS_VENV.relative_to(ROOT)} ({', '.join(PEERS_PACKAGES)}, "
          f"with this venv's packages under them; ~1 GB, a minute or two)", flush=True)
    steps = [("python -m venv", [sys.executable, "-m", "venv", str(PEERS_VENV)]),
             ("pip install", [str(PEERS_VENV / "bin" / "pip"), "install", "--quiet", *PEERS_PACKAGES])]
    for what, command in steps:
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
        except (OSError, subprocess.TimeoutExpired) as e:
            print(f"  no peers: {what} failed: {e}")
            return None
        if done.returncode != 0:
            print(f"  no peers: {what} failed: {last_line(done.stderr or done.stdout)}")
            return None
        if what.endswith("venv"):
            # our venv's site-packages under theirs (not its .pth files: bench_peers.py finds mmdata itself)
            site = PEERS_VENV / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
            (site / "mm_base.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    ready.write_text(" ".join(PEERS_PACKAGES) + "\n")
    return python


def peer_command(python: Path, *args: str) -> tuple[dict | None, str]:
    """Run bench_peers.py: (the JSON object it ends with, "") or (None, why it failed). Its own process group,
    so that a run past the limit is ended with its DataLoader workers."""
    # a temporary folder of its own: MosaicML Streaming leaves lock files in the temporary folder
    scratch = tempfile.mkdtemp(prefix="mm-bench-peer-")
    process = subprocess.Popen([str(python), str(ROOT / "benchmarks" / "bench_peers.py"), *args],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                               env={**os.environ, "TMPDIR": scratch})
    try:
        out, err = process.communicate(timeout=PEER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        return None, f"no result within {PEER_TIMEOUT_S} s"
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if process.returncode != 0 or not out.strip():
        return None, f"exit {process.returncode}: {last_line(err)}"
    try:
        return json.loads(last_line(out, None)), ""
    except ValueError:
        return None, f"not a JSON line: {last_line(out)}"


def prepare_peers(python: Path, dataset: str, options: dict) -> dict[str, str] | None:
    """The dataset in each peer's format, converted once (kept in .bench-peers) and uploaded: peer -> URL."""
    name = Path(dataset).resolve().name
    out, why = peer_command(python, "convert", "--dataset", dataset, "--out", str(PEERS_VENV / "converted" / name))
    if out is None:
        print(f"  no peers: converting {dataset} failed: {why}")
        return None
    print(f"  peers' copies: LitData {out['litdata_files']} chunks, {out['litdata_bytes'] / 1e6:.1f} MB; MDS "
          f"{out['mds_files']} shards, {out['mds_bytes'] / 1e6:.1f} MB (the same members, without tar's headers)")
    return {"litdata": upload(out["litdata"], options, "litdata/"), "mosaic": upload(out["mds"], options, "mds/")}


def peer_run(python: Path, peer: str, url: str, endpoint: str, workers: int, batch: int, passes: int,
             samples: int, proxy: ProxyProcess) -> Run | str:
    """One timed run of a peer, in a process of its own that times itself with ``timed``; the proxy's counts
    from before its start to after its exit (it makes no request before its timed part). A string: why not."""
    proxy.reset_counts()
    out, why = peer_command(python, "run", "--peer", peer, "--url", url, "--endpoint", endpoint,
                            "--workers", str(workers), "--batch", str(batch), "--passes", str(passes),
                            "--samples", str(samples))
    if out is None:
        return why
    return Run(**{**out, "fetched": proxy.body_bytes, "requests": proxy.requests})


def print_ratios(results: dict, workers_counts: list[int], size: int, passes: int) -> None:
    """The ratios that matter: range reads to the cache (overall), mm's cold pass to each peer's, and the
    bytes each mm mode fetched per pass against the dataset's size. A row that did not run is left out."""
    def got(name, workers):
        r = results.get((name, workers))
        return r if isinstance(r, Run) else None
    peers = ["plain webdataset over s3fs", *PEERS.values()]
    print("  ratios:")
    for workers in workers_counts:
        cache = got("mm, shard cache", workers)
        parts = []
        for name in ("mm, range reads", RUNS):
            ranged = got(name, workers)
            if ranged and cache:
                parts.append(f"{name.removeprefix('mm, ')} {ranged.overall / cache.overall:.2f}x the cache overall")
        for mine in ("mm, shard cache", RUNS):
            run = got(mine, workers)
            cold = [f"{run.cold / got(p, workers).cold:.2f}x {p.split(' over')[0]}" for p in peers
                    if run and got(p, workers)]
            if cold:
                parts.append(f"{mine.removeprefix('mm, ')} cold: " + ", ".join(cold))
        fetched = [f"{name.removeprefix('mm, ')} {got(name, workers).fetched / (size * passes):.2f}x per pass"
                   for name in ("mm, range reads", RUNS) if got(name, workers)]
        if cache:
            fetched.insert(0, f"shard cache {cache.fetched / size:.2f}x in all")
        if fetched:
            parts.append("fetched / the dataset: " + ", ".join(fetched))
        if parts:
            print(f"    {workers} workers: " + "\n                 ".join(parts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="data/datasets/demo224")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--delay-ms", type=float, default=20.0)
    parser.add_argument("--readers", nargs="+", default=None,
                        help="only these of mm's and webdataset's rows (their names in the table), e.g. "
                             "'mm, shard cache'")
    parser.add_argument("--proxy-memory", action=argparse.BooleanOptionalAction, default=True,
                        help="the proxy answers object GETs from its memory after one GET from moto, which "
                             "answers ~160 requests/s whatever the cores (S3 has no such ceiling)")
    parser.add_argument("--peers", action=argparse.BooleanOptionalAction, default=True,
                        help="also LitData and MosaicML Streaming, from .bench-peers (made when missing)")
    args = parser.parse_args()
    # imported before any clock starts, as bench_peers.py imports the peers' (here, not at the top: the
    # peers' environment imports this module for ``timed`` and has neither)
    for module in ("mmdata.load.loader", "webdataset", "webdataset.tariterators"):
        importlib.import_module(module)
    description = json.loads((Path(args.dataset) / "dataset.json").read_text())
    samples = description["totals"]["written"]
    size = sum(s["bytes"] for s in description["shards"])
    started = start_moto()
    if started is None:
        raise SystemExit("the moto S3 server did not start: is moto[server] installed (pip install -e '.[dev]')?")
    server, options = started
    scratch = tempfile.mkdtemp(prefix="mm-bench-remote-")   # the shard caches, removed at the end
    try:
        url = upload(args.dataset, options)
        python = peers_python() if args.peers else None
        shards = [f"{url}/{s['name']}" for s in description["shards"]]
        with ProxyProcess(options["endpoint_url"], delay_s=args.delay_ms / 1000, memory=args.proxy_memory) as proxy:
            through = {**options, "endpoint_url": proxy.url}
            print(f"\nremote: {url} ({samples} samples, {size / 1e6:.1f} MB) behind {args.delay_ms:g} ms per "
                  f"request{', objects served from the proxy' + chr(39) + 's memory' if args.proxy_memory else ''}; "
                  f"batch {args.batch}, {args.passes} passes")
            peer_urls = prepare_peers(python, args.dataset, options) if python else None
            if args.proxy_memory:
                warm(options, proxy)
            print(f"  {'reader':30s} {'workers':>7s} {'overall':>8s} {'cold 2000':>9s} {'later':>8s} "
                  f"{'1st batch':>9s} {'fetched':>10s} {'requests':>8s}")
            results = {}
            for workers in args.workers:
                readers = {
                    "mm, shard cache": lambda: mm_loader(url, through, workers, args.batch, samples * args.passes,
                                                         tempfile.mkdtemp(prefix="cache-", dir=scratch)),
                    "mm, range reads": lambda: mm_loader(url, through, workers, args.batch, samples * args.passes,
                                                         None),
                    RUNS: lambda: mm_loader(url, through, workers, args.batch, samples * args.passes, None,
                                            shuffle_run=8),
                    "plain webdataset over s3fs": lambda: plain_webdataset(shards, through, workers, args.batch),
                }
                readers = {k: v for k, v in readers.items() if not args.readers or k in args.readers}
                for name, make in readers.items():
                    results[(name, workers)] = timed(make, samples, args.passes, proxy)
                for peer, peer_url in (peer_urls or {}).items():
                    results[(PEERS[peer], workers)] = peer_run(python, peer, peer_url, proxy.url, workers,
                                                                args.batch, args.passes, samples, proxy)
                for name in [*readers, *(PEERS[peer] for peer in peer_urls or {})]:
                    r = results[(name, workers)]
                    if isinstance(r, str):
                        print(f"  {name:30s} {workers:7d} failed: {r}", flush=True)
                        continue
                    print(f"  {name:30s} {workers:7d} {r.overall:8.0f} {r.cold:9.0f} {r.later:8.0f} "
                          f"{r.first_batch_s:8.2f}s {r.fetched / 1e6:7.1f} MB {r.requests:8d}", flush=True)
            print_ratios(results, args.workers, size, args.passes)
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
