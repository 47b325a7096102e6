"""Loading straight from object storage at cloud latency: an S3 server on loopback (moto) behind a proxy
that adds 20 ms to every request and injects faults (tests/latency_proxy.py).

Range reads keep many requests in flight, planned ahead from the epoch order and handed out in order: the
batches are those of a local read, byte for byte, resumed mid-epoch too; faults are retried and never
give a wrong byte; when retries run out the error names the shard, the range and the worker.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from helpers import loader_config, make_bucket
from latency_proxy import LatencyProxy
from mmdata import MultimodalLoader
from mmdata.dataset import DatasetError
from mmdata.load.catalog import load_catalog
from mmdata.load.reader import ReadConfig, ShardReader, ShardReadError, cache_name

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def remote(demo_dataset, s3):
    """The demo dataset uploaded to s3://mm-remote/demo; yields its URL."""
    import s3fs
    make_bucket(s3, "mm-remote")
    fs = s3fs.S3FileSystem(**s3)
    fs.put(str(demo_dataset), "mm-remote/demo", recursive=True)
    return "s3://mm-remote/demo"


class CountingProxy(LatencyProxy):
    """Also records the most requests that were in flight at once."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.in_flight = self.most_in_flight = 0
        self.ranges: list[str | None] = []   # each request's Range header
        self.paths: list[str] = []           # and path, with its query
        self.signed_by_header: list[bool] = []   # whether it carried an Authorization header
        self.gauge = threading.Lock()

    def forward(self, handler) -> None:
        with self.gauge:
            self.ranges.append(handler.headers.get("Range"))
            self.paths.append(handler.path)
            self.signed_by_header.append("Authorization" in handler.headers)
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            super().forward(handler)
        finally:
            with self.gauge:
                self.in_flight -= 1


@pytest.fixture()
def proxy(s3):
    with CountingProxy(s3["endpoint_url"], delay_s=0.02, stall_s=5.0) as p:
        yield p


def through(proxy, s3) -> dict:
    return {**s3, "endpoint_url": proxy.url}


def batches(config) -> list[dict]:
    loader = MultimodalLoader(config)
    try:
        return list(loader)
    finally:
        loader.close()


def same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["ids"] == y["ids"]
        for key, value in x.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, y[key]), key


@pytest.mark.parametrize("workers", [0, 1])
def test_range_reads_keep_many_requests_in_flight_and_give_the_local_batches(demo_dataset, remote, proxy, s3,
                                                                              workers):
    common = dict(batch_size=8, num_workers=workers, seed=3, worker_transport="pickle")
    local = batches(loader_config(demo_dataset, **common))
    proxy.delay_s = 0.1        # requests that overlap in time overlap for sure
    proxy.reset_counts()
    config = loader_config(remote, **common)
    config.read.storage_options = through(proxy, s3)
    config.read.retries = 0
    assert config.read.inflight >= 8
    same_batches(batches(config), local)
    seen = f"{proxy.most_in_flight} at once, {proxy.ranged_requests} range requests, {proxy.body_bytes} bytes"
    assert proxy.most_in_flight >= 5, seen    # not one sample after another
    # planned ahead from the epoch order: a shard's samples the plan holds share a request (the first batch
    # is planned apart, so that it comes soon: at most one more request per sample of it); dataset.json and
    # the index files are capped reads, one range request each
    shards = len(load_catalog(demo_dataset).shard_urls)
    assert proxy.ranged_requests <= shards + config.batch_size + (1 + shards), seen
    # bytes fetched: the members read (their spans include only the tar headers between them), plus the
    # dataset.json and index files the loader reads once
    catalog = load_catalog(demo_dataset)
    read = sum(int(catalog.sizes[ext][catalog.has[m]].sum()) for m, ext in
               (("text", "tokens.npy"), ("image", "jpg"), ("image", "png"), ("audio", "mel.npy")))
    metadata = sum(p.stat().st_size for p in Path(demo_dataset).glob("index/*.parquet")) + \
        (Path(demo_dataset) / "dataset.json").stat().st_size + (Path(demo_dataset) / "tokenizer.model").stat().st_size
    assert proxy.body_bytes <= 1.1 * read + metadata, seen


def test_a_cold_cache_fetches_each_shard_once_whole_with_several_workers(demo_dataset, remote, proxy, s3, tmp_path):
    """With read.cache_dir, shards come down whole, once per machine, ahead of their samples (a plan starts
    them), and batches wait for them: no sample is fetched twice by range while its shard downloads."""
    common = dict(batch_size=4, num_workers=2, seed=2, worker_transport="pickle")
    local = batches(loader_config(demo_dataset, **common))
    config = loader_config(remote, **common)
    config.read.storage_options = through(proxy, s3)
    config.read.cache_dir, config.read.cache_bytes = str(tmp_path), 1 << 30
    proxy.reset_counts()
    same_batches(batches(config), local)
    root = Path(demo_dataset)
    shards = sum(p.stat().st_size for p in root.glob("shard-*.tar"))
    metadata = sum(p.stat().st_size for p in root.glob("index/*.parquet")) + (root / "dataset.json").stat().st_size
    seen = f"{proxy.requests} requests, {proxy.ranged_requests} by range, {proxy.body_bytes} bytes"
    assert proxy.body_bytes <= 1.05 * shards + metadata, seen
    # whole files only: every range asked for starts at byte 0 (capped reads of the catalog, downloads)
    assert all(r is None or r.startswith("bytes=0-") for r in proxy.ranges), proxy.ranges
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(cache_name(f"{remote}/{p.name}")
                                                                 for p in root.glob("shard-*.tar"))


def test_the_main_process_downloads_the_first_batches_shards_while_workers_start(remote, s3, tmp_path):
    config = loader_config(remote, batch_size=4, num_workers=2, seed=2, worker_transport="pickle")
    config.read.storage_options = s3
    config.read.cache_dir, config.read.cache_bytes = str(tmp_path), 1 << 30
    loader = MultimodalLoader(config)
    dataset = loader.dataloader().dataset
    layout = loader.layouts[-1]
    urls, _ = dataset.shards_of([0, 1], layout, dataset.epoch_sequence(0, loader.layouts))
    loader.download_first_shards(0, layout)          # what iterating does first, before the workers fork
    loader._first_downloads.wait_for_downloads()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(cache_name(u) for u in urls)   # those, only
    first = next(iter(loader))
    assert len(first["ids"]) == 4
    loader.close()


def test_downloads_ahead_of_need_wait_for_those_other_processes_run(remote, s3, tmp_path):
    """The main process starts the workers' first batches' shards while they fork; before its first batch,
    a worker's downloads for later batches wait for those (a live claim file each) rather than compete with
    them for the link."""
    import os
    import socket

    import s3fs

    from mmdata.load.reader import PREFETCH_SHARDS, claim_path
    reader = ShardReader(ReadConfig(storage_options=s3, cache_dir=str(tmp_path), cache_bytes=1 << 30))
    shards = [f"{remote}/shard-{i:06d}.tar" for i in range(PREFETCH_SHARDS + 1)]
    claims = [claim_path(reader.cache_path(url)) for url in shards[:PREFETCH_SHARDS]]
    for claim in claims:     # downloads of another process on this machine, alive
        claim.write_text(f"{socket.gethostname()} {os.getppid()}")
    size = s3fs.S3FileSystem(**s3).size(shards[-1].removeprefix("s3://"))
    reader.prefetch([shards[-1]], [size])
    assert not reader._downloads                          # queued behind theirs
    claims[0].unlink()                                    # one of theirs is done
    reader.prefetch([], [])
    assert list(reader._downloads) == [shards[-1]]
    reader.wait_for_downloads()
    assert reader.cache_path(shards[-1]).exists()
    reader.close()


def test_range_reads_resume_mid_epoch_on_the_same_batches(demo_dataset, remote, proxy, s3):
    config = loader_config(remote, batch_size=4, num_workers=1, seed=5, worker_transport="pickle")
    config.read.storage_options = through(proxy, s3)
    whole = batches(config)
    loader = MultimodalLoader(config)
    first = []
    for batch in loader:
        first.append(batch)
        if len(first) == 3:
            state = loader.state_dict()
            break
    loader.close()
    resumed = MultimodalLoader(config)
    resumed.load_state_dict(state)
    try:
        same_batches(first + list(resumed), whole)
    finally:
        resumed.close()


def shard_of(remote: str, s3) -> tuple[str, int, bytes]:
    import s3fs
    fs = s3fs.S3FileSystem(**s3)
    url = f"{remote}/shard-000001.tar"
    data = fs.cat_file(url[5:])
    return url, len(data), data


@pytest.mark.parametrize("presigned", [True, False], ids=["presigned", "s3fs"])
@pytest.mark.parametrize("fault", ["503", "reset", "stall", "403", "norange"])
def test_a_fault_is_retried_and_never_gives_a_wrong_byte(remote, proxy, s3, fault, presigned):
    url, size, data = shard_of(remote, s3)
    reader = ShardReader(ReadConfig(storage_options=through(proxy, s3), timeout_s=1.0, retries=2, backoff_s=0.05,
                                    presigned=presigned))
    ranges = [(512 * k, 700) for k in range(0, 8)]
    try:
        reader.read(url, [(0, 1)], size)           # the connection and the object's metadata, before the fault
        proxy.faults.extend([fault] * 2)
        got = reader.read_batch([url] * len(ranges), [[o] for o, _ in ranges], [[n] for _, n in ranges],
                                [o + n for o, n in ranges], [size] * len(ranges))
    finally:
        reader.close()
    assert [bytes(g[0]) for g in got] == [data[o:o + n] for o, n in ranges]
    assert not proxy.faults                        # both faults were met, and retried


def test_retries_running_out_name_the_shard_the_range_and_the_worker(remote, proxy, s3):
    url, size, _ = shard_of(remote, s3)
    reader = ShardReader(ReadConfig(storage_options=through(proxy, s3), timeout_s=2.0, retries=1, backoff_s=0.05))
    try:
        reader.read(url, [(0, 1)], size)
        proxy.faults.extend(["reset"] * 50)
        got = reader.read_batch([url], [[1024]], [[100]], [1124], [size])
    finally:
        reader.close()
        proxy.faults.clear()
    assert isinstance(got[0], ShardReadError)
    message = str(got[0])
    assert url in message and "[1024, 1124)" in message and "2 attempts" in message and "main process" in message


def test_a_process_that_read_from_s3_exits_without_printing_errors(remote, s3, tmp_path):
    """Range reads in the main process, then the shard cache with two workers: every storage client is
    closed in the process and loop that made it, and none inherited by a worker is collected there."""
    import subprocess
    import sys
    code = ("import sys\nfrom mmdata import MultimodalLoader\nsys.path.append('tests')\n"
            "from helpers import loader_config\n"
            "def count(workers, cache):\n"
            f"    config = loader_config({remote!r}, batch_size=8, num_workers=workers, worker_transport='pickle')\n"
            f"    config.read.storage_options = {s3!r}\n"
            "    if cache:\n"
            f"        config.read.cache_dir, config.read.cache_bytes = {str(tmp_path)!r}, 1 << 30\n"
            "    return sum(len(b['ids']) for b in MultimodalLoader(config))\n"
            "print(count(0, False), count(2, True))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.split() == ["48", "48"] and done.stderr == "", done.stderr[-2000:]


def test_the_index_files_are_fetched_at_once_when_the_loader_starts(demo_dataset, remote, proxy, s3):
    proxy.delay_s = 0.1
    catalog = load_catalog(remote, through(proxy, s3))
    assert len(catalog) == len(load_catalog(demo_dataset)) and len(catalog.shard_urls) == 10
    assert proxy.most_in_flight >= 5     # ten index files, not one round trip after another
    # one GET per file (dataset.json, ten index files): no existence or size request before any of them
    assert proxy.requests == 11, proxy.requests


def test_a_metadata_file_larger_than_any_mmdata_writes_is_refused_unread(remote, proxy, s3, tmp_path, monkeypatch):
    from mmdata import storage
    monkeypatch.setattr(storage, "MAX_METADATA_BYTES", 100)     # far below the real dataset.json
    with pytest.raises(DatasetError, match=r"dataset.json .*larger than 100 bytes.*rebuild the dataset"):
        load_catalog(remote, through(proxy, s3))
    assert proxy.body_bytes <= 101       # it asked for the first 101 bytes only
    with pytest.raises(DatasetError, match="is not a complete mmdata dataset: dataset.json is missing"):
        load_catalog(remote + "-not-there", through(proxy, s3))
    local = tmp_path / "big.json"
    local.write_bytes(b" " * 101)
    with pytest.raises(OSError, match="larger than 100 bytes"):
        storage.read_json(str(local), {}, limit=100)


def test_a_forked_worker_makes_its_own_s3_session_on_the_parents_parsed_service_descriptions(remote, s3):
    """A new botocore session parses S3's service description before its first request (0.35 s of a
    worker's first read): each process gets a session of its own (credentials stay per process) over one
    data loader, parsed once and inherited by forks. Options that s3fs gives its own session keep it."""
    import os

    from mmdata import storage
    fs, path = storage.filesystem(remote + "/dataset.json", s3)
    assert fs.cat_file(path)[:1] == b"{"
    parent = fs.session
    assert parent is not None and parent.get_component("data_loader") is storage._s3_loader
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:   # the child reports on the pipe and leaves without running pytest's exit handlers
        storage.forget_inherited_clients()
        child, path = storage.filesystem(remote + "/dataset.json", s3)
        ok = (child.cat_file(path)[:1] == b"{" and child.session is not parent
              and child.session.get_component("data_loader") is storage._s3_loader)
        os.write(write, b"1" if ok else b"0")
        os._exit(0)
    os.close(write)
    assert os.read(read, 1) == b"1"
    os.waitpid(pid, 0)
    own, _ = storage.filesystem(remote + "/dataset.json", {**s3, "profile": None})
    assert "session" not in own.storage_options


def test_the_benchmarks_proxy_process_forwards_delays_and_counts(remote, s3):
    """make bench-loader's proxy runs in a process of its own (a far server's work is not the reader's):
    it forwards, adds its delay, and reports and resets its counts without counting those requests."""
    import time

    import s3fs

    from latency_proxy import ProxyProcess
    with ProxyProcess(s3["endpoint_url"], delay_s=0.05) as proxy:
        fs = s3fs.S3FileSystem(**{**s3, "endpoint_url": proxy.url}, skip_instance_cache=True)
        start = time.perf_counter()
        data = fs.cat_file(remote.removeprefix("s3://") + "/dataset.json")
        assert time.perf_counter() - start >= 0.05 and data[:1] == b"{"
        assert proxy.requests >= 1 and proxy.body_bytes >= len(data)
        proxy.reset_counts()
        assert (proxy.requests, proxy.body_bytes) == (0, 0)
        fs.cat_file(remote.removeprefix("s3://") + "/dataset.json", start=0, end=10)
        assert (proxy.requests, proxy.body_bytes) == (1, 10)
    assert proxy.process.poll() is not None


def test_the_benchmarks_proxy_can_answer_object_gets_from_memory_as_s3_would(remote, s3):
    """moto answers ~160 requests/s in one interpreter; the benchmark's proxy (an asyncio server) keeps each
    object it has read once and answers GETs and range GETs of it itself, byte for byte what moto gives.
    Listings and HEADs go to moto; an upload through the proxy replaces what it kept."""
    import s3fs
    import urllib3

    from latency_proxy import ProxyProcess
    url, size, data = shard_of(remote, s3)
    key = url.removeprefix("s3://")
    with ProxyProcess(s3["endpoint_url"], delay_s=0.0, memory=True) as proxy:
        fs = s3fs.S3FileSystem(**{**s3, "endpoint_url": proxy.url}, skip_instance_cache=True)
        assert fs.cat_file(key) == data
        assert fs.cat_file(key, start=100, end=200) == data[100:200]
        assert proxy.counts()["objects"] == 1              # fetched from moto once, whole
        signed = fs.url(key)
        http = urllib3.PoolManager()
        for header, expected in (("bytes=-10", data[-10:]), (f"bytes={size - 5}-", data[-5:]),
                                 ("bytes=0-0", data[:1]), (f"bytes=10-{size + 100}", data[10:])):
            response = http.request("GET", signed, headers={"Range": header})
            assert (response.status, response.data) == (206, expected), header
            assert response.headers["Content-Range"].endswith(f"/{size}")
        assert http.request("GET", signed, headers={"Range": f"bytes={size}-"}).status == 416
        assert http.request("GET", fs.url(key + ".missing")).status == 404
        assert fs.info(key)["size"] == size                  # HEAD, from moto
        assert sorted(fs.ls(remote.removeprefix("s3://") + "/index")) == sorted(
            s3fs.S3FileSystem(**s3, skip_instance_cache=True).ls(remote.removeprefix("s3://") + "/index"))
        reader = ShardReader(ReadConfig(storage_options={**s3, "endpoint_url": proxy.url}))
        try:
            assert bytes(reader.read(url, [(512, 1000)], size)[0]) == data[512:1512]
        finally:
            reader.close()
        fs.pipe_file(key + ".new", b"first")
        assert fs.cat_file(key + ".new") == b"first"
        fs.pipe_file(key + ".new", b"second")
        assert fs.cat_file(key + ".new") == b"second"
        counts = proxy.counts()
        proxy.reset_counts()
        assert counts["requests"] > 10 and proxy.counts()["requests"] == 0
    assert proxy.process.poll() is not None


def test_a_claim_that_is_not_a_regular_file_is_never_read(tmp_path):
    """Claims are read to learn their owner; a FIFO in their place would block that read for ever. It is
    counted as a live claim without being opened."""
    import os

    from mmdata.load.reader import claim_is_stale, others_claims
    os.mkfifo(tmp_path / ".shard-000000.tar.claim")
    (tmp_path / ".shard-000001.tar.claim").mkdir()
    assert not claim_is_stale(tmp_path / ".shard-000000.tar.claim", stale_after=0.0)
    assert sorted(others_claims(tmp_path, set(), stale_after=0.0)) == [".shard-000000.tar.claim",
                                                                        ".shard-000001.tar.claim"]


def test_range_reads_and_downloads_go_through_presigned_urls_unless_turned_off(remote, proxy, s3, tmp_path):
    """A presigned URL is signed once per shard; every range of it is then a plain GET (a quarter of s3fs's
    CPU per request). Off, each request is signed by botocore in its Authorization header. Same bytes."""
    url, size, data = shard_of(remote, s3)
    ranges = [(1000 * k, 300) for k in range(6)]
    for presigned in (True, False):
        proxy.paths.clear()
        proxy.signed_by_header.clear()
        reader = ShardReader(ReadConfig(storage_options=through(proxy, s3), presigned=presigned))
        try:
            got = reader.read_batch([url] * len(ranges), [[o] for o, _ in ranges], [[n] for _, n in ranges],
                                    [o + n for o, n in ranges], [size] * len(ranges))
        finally:
            reader.close()
        assert [bytes(g[0]) for g in got] == [data[o:o + n] for o, n in ranges]
        shard_requests = [(p, h) for p, h in zip(proxy.paths, proxy.signed_by_header) if "shard-000001" in p]
        assert len(shard_requests) == len(ranges)
        if presigned:
            assert all("Signature=" in p and not h for p, h in shard_requests), shard_requests
        else:
            assert all("Signature=" not in p and h for p, h in shard_requests), shard_requests
    # a cached shard comes down in one GET, not one per chunk
    proxy.paths.clear()
    reader = ShardReader(ReadConfig(storage_options=through(proxy, s3), cache_dir=str(tmp_path), cache_bytes=1 << 30))
    try:
        assert reader.wait_for_copy(url, size)
    finally:
        reader.close()
    assert (tmp_path / cache_name(url)).read_bytes() == data
    assert len([p for p in proxy.paths if "shard-000001" in p]) == 1, proxy.paths


def test_a_cached_copy_is_read_mapped_until_another_process_evicts_it(remote, proxy, s3, tmp_path):
    """Once a shard is in cache_dir its samples are slices of a mapping, as a local shard's are (no open,
    stat and read per sample); a copy evicted meanwhile (by another worker) is not read from a stale
    mapping, whose disk space would stay in use."""
    url, size, data = shard_of(remote, s3)
    reader = ShardReader(ReadConfig(storage_options=through(proxy, s3), cache_dir=str(tmp_path), cache_bytes=1 << 30))
    copy = tmp_path / cache_name(url)

    def batch(offset: int) -> bytes:
        got = reader.read_batch([url], [[offset]], [[100]], [offset + 100], [size])
        return bytes(got[0][0])
    try:
        assert batch(0) == data[:100] and copy.exists()
        assert batch(200) == data[200:300]
        assert reader._maps.get(url) is not None             # mapped: later samples are slices
        copy.unlink()                                        # evicted by another process
        assert batch(400) == data[400:500]                   # downloaded again, and the new copy mapped
        assert copy.exists() and reader._inodes[url] == copy.stat().st_ino
    finally:
        reader.close()


def test_read_ahead_ramps_up_and_a_forgotten_plan_cancels_its_requests(remote, proxy, s3):
    """A pass's first batches do not start the whole read-ahead at once (hundreds of requests competing with
    their decoding); a plan forgotten (an epoch left early) cancels what it requested, on the event loop too."""
    import os
    import time

    import s3fs

    from mmdata.load.reader import JOIN_GAP, RAMP_BYTES
    data = os.urandom(16 << 20)
    s3fs.S3FileSystem(**s3, skip_instance_cache=True).pipe_file("mm-remote/ramp.bin", data)
    url, size, span = "s3://mm-remote/ramp.bin", len(data), 64 << 10
    starts = list(range(0, size - span, span + 2 * JOIN_GAP))     # apart: one request each
    n = len(starts)
    reader = ShardReader(ReadConfig(storage_options=through(proxy, s3), inflight=4, read_ahead_bytes=64 << 20))
    proxy.delay_s = 0.3
    try:
        reader.plan([url] * n, [[a] for a in starts], [[span]] * n, [size] * n, first=False)
        requested = n - len(reader._planned)                 # requested ones leave the queue
        assert 0 < requested * span <= RAMP_BYTES + span < n * span, (requested, n)
        got = reader.read_batch([url] * 2, [[a] for a in starts[:2]], [[span]] * 2,
                                [a + span for a in starts[:2]], [size] * 2)
        assert [bytes(g[0]) for g in got] == [data[a:a + span] for a in starts[:2]]
        assert n - len(reader._planned) > requested          # after a batch, more
        reader.forget_plan()
        time.sleep(0.5)                                      # what was in flight ends; nothing new starts
        proxy.reset_counts()
        time.sleep(1.0)
        assert proxy.requests == 0, proxy.requests
    finally:
        reader.close()


def test_an_expired_signature_is_renewed_at_once_and_a_refusal_named(remote, proxy, s3):
    url, size, data = shard_of(remote, s3)
    reader = ShardReader(ReadConfig(storage_options=through(proxy, s3), retries=0))   # no second attempt
    try:
        reader.read(url, [(0, 1)], size)
        proxy.faults.append("403")     # the signature expired: signed again within the same attempt
        assert bytes(reader.read(url, [(4096, 100)], size)[0]) == data[4096:4196]
        proxy.faults.extend(["403", "403"])   # refused again after signing anew: an error naming the code
        got = reader.read_batch([url], [[1024]], [[100]], [1124], [size])
    finally:
        reader.close()
        proxy.faults.clear()
    assert isinstance(got[0], ShardReadError)
    assert "HTTP 403: AccessDenied" in str(got[0]) and "byte range [1024, 1124)" in str(got[0]), got[0]


@pytest.mark.parametrize("options, env, usable", [
    ({"endpoint_url": "http://127.0.0.1:9", "key": "k", "secret": "s"}, {}, True),
    ({"anon": True, "client_kwargs": {"region_name": "eu-west-1"}}, {}, True),
    ({"requester_pays": True}, {}, False),                           # a header the GET must carry
    ({"s3_additional_kwargs": {"SSECustomerKey": "k"}}, {}, False),
    ({"version_aware": True}, {}, False),
    ({"client_kwargs": {"verify": "/etc/my-ca.pem"}}, {}, False),    # TLS as botocore does it
    ({"config_kwargs": {"proxies": {"https": "http://proxy:3128"}}}, {}, False),
    ({}, {"HTTPS_PROXY": "http://proxy:3128"}, False),               # botocore honours it, a bare pool would not
], ids=["keys", "anon", "requester-pays", "sse-c", "versions", "verify", "proxies", "proxy-env"])
def test_presigned_urls_are_used_only_where_the_url_says_all_a_get_must(options, env, usable, monkeypatch):
    from mmdata.load import presigned
    for name in presigned.PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert presigned.usable("s3://bucket/shard.tar", options) is usable
    assert not presigned.usable("https://host/shard.tar", options)
