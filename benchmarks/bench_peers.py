"""LitData and MosaicML Streaming over the same remote dataset: the peers in ``bench_remote.py``.

Run by the peers' own environment (``.bench-peers``: their pins conflict with ours), as a subprocess of
bench_remote.py, which owns the S3 server and the latency proxy:

    .bench-peers/bin/python benchmarks/bench_peers.py convert --dataset D --out W
    .bench-peers/bin/python benchmarks/bench_peers.py run --peer litdata --url s3://B/litdata/N --endpoint PROXY ...

``convert`` writes the mm dataset's samples, every member as bytes (an empty value for a member a sample
lacks: both formats want one schema for all samples), in LitData's format (``BinaryWriter``) and in
MosaicML's MDS (``MDSWriter``), chunks the size of the mm shards; once, kept under W. The caller uploads them.

``run`` times one peer with bench_remote's ``timed``, streaming from the bucket through the proxy into a fresh
local cache, shuffle on, decoding with the same ``decode_members`` and ``collate``, and prints one JSON line:
bench_remote's ``Run``. Its proxy counts are the caller's to fill in (the proxy lives there): it resets them
before starting this process and reads them after it has exited, and this process makes no request before
the timed part starts. Start-up and imports are not timed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# the editable install's .pth in the mm venv is not processed from the peers' venv: the repo root, for mmdata
sys.path.insert(0, str(ROOT))
# mmdata before tests/ is on the path (bench_remote puts it there): tests/ holds a folder named mmdata too
from mmdata.load.decode import collate  # noqa: E402

from bench_remote import timed  # noqa: E402
from bench_loader import decode_members  # noqa: E402

CREDENTIALS = {"aws_access_key_id": "k", "aws_secret_access_key": "s", "region_name": "us-east-1"}


def samples_of(dataset: Path):
    """(key, {member extension: bytes}) for every sample of the mm dataset's shards, in order."""
    description = json.loads((dataset / "dataset.json").read_text())
    for shard in description["shards"]:
        with tarfile.open(dataset / shard["name"]) as tar:
            key, members = None, {}
            for info in tar:
                if not info.isfile():
                    continue
                name = Path(info.name).name
                k, ext = name.split(".", 1)
                if k != key and key is not None:
                    yield key, members
                    members = {}
                key = k
                members[ext] = tar.extractfile(info).read()
            if key is not None:
                yield key, members


def convert(dataset: Path, out: Path) -> dict:
    description = json.loads((dataset / "dataset.json").read_text())
    stamp = {"fingerprint": description.get("fingerprint"), "format": 2}
    done = out / "converted.json"
    if done.exists() and json.loads(done.read_text()).get("stamp") == stamp:
        return json.loads(done.read_text())
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    exts = sorted({ext for _, members in samples_of(dataset) for ext in members})
    # chunks the mm shards' mean size (the peers' formats hold the same members in fewer bytes than tar)
    chunk_bytes = sum(s["bytes"] for s in description["shards"]) // len(description["shards"])

    from litdata.streaming.writer import BinaryWriter
    from streaming import MDSWriter
    lit_dir, mds_dir = out / "litdata", out / "mds"
    lit_dir.mkdir()
    writer = BinaryWriter(str(lit_dir), chunk_bytes=chunk_bytes)
    with MDSWriter(out=str(mds_dir), columns={"__key__": "str", **{ext: "bytes" for ext in exts}},
                   size_limit=chunk_bytes) as mds:
        for i, (key, members) in enumerate(samples_of(dataset)):
            row = {"__key__": key, **{ext: members.get(ext, b"") for ext in exts}}
            writer.add_item(i, row)
            mds.write(row)
    writer.done()
    writer.merge()
    result = {"stamp": stamp, "litdata": str(lit_dir), "mds": str(mds_dir), "samples": i + 1,
              "litdata_files": len(list(lit_dir.glob("*.bin"))), "mds_files": len(list(mds_dir.glob("*.mds"))),
              "litdata_bytes": sum(p.stat().st_size for p in lit_dir.iterdir()),
              "mds_bytes": sum(p.stat().st_size for p in mds_dir.iterdir())}
    done.write_text(json.dumps(result))
    return result


def members(row: dict) -> dict:
    """A peer's row as decode_members takes a sample: extension -> bytes, the members it lacks left out."""
    return {k: bytes(v) if k != "__key__" else v for k, v in row.items() if k == "__key__" or len(v)}


def decode_batch(rows: list[dict]) -> dict:
    """Collate function of both peers' DataLoaders: runs in the workers, as the other readers' decode does."""
    return collate([decode_members(members(row)) for row in rows])


def epochs(loader, passes: int):
    """The loader's batches over ``passes`` epochs and one more (timed() stops inside the last one). Its workers
    persist from one epoch to the next, as the other readers' do over their one long pass; ended on close."""
    try:
        for _ in range(passes + 1):
            yield from loader
    finally:
        iterator = getattr(loader, "_iterator", None)
        if iterator is not None:
            iterator._shutdown_workers()


def litdata_batches(url: str, endpoint: str, workers: int, batch: int, passes: int, cache: str):
    from litdata import StreamingDataLoader, StreamingDataset
    from litdata.streaming import downloader
    # litdata fetches chunks with obstore, which refuses a plain-http endpoint (the proxy) unless its client
    # options allow it, and litdata passes fixed ones: add the permission to those (the workers fork after this)
    downloader._OBSTORE_CLIENT_OPTIONS["allow_http"] = True
    dataset = StreamingDataset(url, cache_dir=cache, shuffle=True, seed=0,
                               storage_options={"endpoint_url": endpoint, **CREDENTIALS})
    loader = StreamingDataLoader(dataset, batch_size=batch, num_workers=workers, collate_fn=decode_batch,
                                 persistent_workers=workers > 0)
    return epochs(loader, passes)


def mosaic_batches(url: str, endpoint: str, workers: int, batch: int, passes: int, cache: str):
    os.environ.update(S3_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID=CREDENTIALS["aws_access_key_id"],
                      AWS_SECRET_ACCESS_KEY=CREDENTIALS["aws_secret_access_key"],
                      AWS_DEFAULT_REGION=CREDENTIALS["region_name"])
    from streaming import StreamingDataset
    from torch.utils.data import DataLoader
    dataset = StreamingDataset(remote=url, local=cache, shuffle=True, shuffle_seed=0, batch_size=batch)
    # it fetched index.json here with a boto3 client that it keeps: forked workers would share that client's
    # kept-alive connection and read each other's responses (stalls of its 60 s timeout, corrupt shards).
    # Its own clean_up() drops the client, so each worker makes its own, as after pickling.
    for stream in dataset.streams:
        stream._downloader.clean_up()
    loader = DataLoader(dataset, batch_size=batch, num_workers=workers, collate_fn=decode_batch,
                        persistent_workers=workers > 0)
    return epochs(loader, passes)


def run(args) -> None:
    peers = {"litdata": litdata_batches, "mosaic": mosaic_batches}
    # imported before the clock starts: a process's start-up is not the peer's time (bench_remote's own
    # readers load their modules once, for all their runs)
    for module in {"litdata": ["litdata", "litdata.streaming.downloader"], "mosaic": ["streaming"]}[args.peer]:
        importlib.import_module(module)
    cache = tempfile.mkdtemp(prefix=f"mm-bench-{args.peer}-")
    if args.peer == "mosaic":
        from streaming.base.util import clean_stale_shared_memory
        clean_stale_shared_memory()
    try:
        r = timed(lambda: peers[args.peer](args.url, args.endpoint, args.workers, args.batch, args.passes,
                                           os.path.join(cache, "local")),
                  args.samples, args.passes, None)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    print(json.dumps(r._asdict()), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    c = commands.add_parser("convert")
    c.add_argument("--dataset", required=True)
    c.add_argument("--out", required=True)
    r = commands.add_parser("run")
    r.add_argument("--peer", choices=["litdata", "mosaic"], required=True)
    r.add_argument("--url", required=True)
    r.add_argument("--endpoint", required=True, help="the S3 endpoint: the latency proxy's URL")
    r.add_argument("--workers", type=int, required=True)
    r.add_argument("--batch", type=int, default=64)
    r.add_argument("--passes", type=int, required=True)
    r.add_argument("--samples", type=int, required=True, help="samples per pass")
    args = parser.parse_args()
    if args.command == "convert":
        print(json.dumps(convert(Path(args.dataset).resolve(), Path(args.out).resolve())), flush=True)
    else:
        run(args)


if __name__ == "__main__":
    main()
