"""The shard reader: local pread, remote range reads with retries and timeouts, and the local shard cache."""

from __future__ import annotations

import os
import pickle
import threading
import time
import uuid

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from mmdata.config import ConfigError
from mmdata.load.reader import PREFETCH_SHARDS, ReadConfig, ShardReader, ShardReadError, cache_name, merge_ranges

DATA = bytes(range(256)) * 4   # 1024 bytes, every offset distinguishable


def fast(**kw) -> ReadConfig:
    return ReadConfig(**{"backoff_s": 0.01, "timeout_s": 5.0, **kw})


@pytest.fixture
def memory_url():
    """A fresh ``memory://`` folder; make(name, data) puts a shard there and returns its URL."""
    fs = fsspec.filesystem("memory")
    root = f"memory://reader-{uuid.uuid4().hex}"

    def make(name: str, data: bytes = DATA) -> str:
        fs.pipe(f"{root}/{name}", data)
        return f"{root}/{name}"
    yield make
    fs.rm(root, recursive=True)


def count_calls(monkeypatch, name: str) -> list:
    """Wrap a MemoryFileSystem method so the test can see how often storage was asked."""
    calls, original = [], getattr(MemoryFileSystem, name)

    def wrapper(self, *args, **kwargs):
        calls.append(args)
        return original(self, *args, **kwargs)
    monkeypatch.setattr(MemoryFileSystem, name, wrapper)
    return calls


# -- config and plumbing

def test_cache_dir_needs_cache_bytes(tmp_path):
    with pytest.raises(ConfigError, match="cache_bytes"):
        ReadConfig(cache_dir=str(tmp_path)).validate()
    with pytest.raises(ConfigError, match="timeout_s"):
        ReadConfig(timeout_s=0).validate()


def test_reader_opens_nothing_until_used_so_it_pickles():
    reader = ShardReader(ReadConfig())
    assert pickle.loads(pickle.dumps(reader)).config == reader.config


def test_merge_ranges_joins_nearby_and_overlapping_ranges():
    assert merge_ranges([(100, 10), (0, 10), (5, 10), (50, 0)], gap=0) == [(0, 15, [1, 2]), (100, 110, [0])]
    assert merge_ranges([(0, 10), (20, 10)], gap=10) == [(0, 30, [0, 1])]


def test_local_reads_join_neighbouring_members_only(demo_dataset):
    from mmdata.load.catalog import load_catalog
    from mmdata.load.reader import ADJACENT
    catalog = load_catalog(demo_dataset)
    exts = ("tokens.npy", "jpg", "mel.npy")
    row = next(r for r in range(len(catalog)) if all(catalog.offsets[e][r] >= 0 for e in exts))
    span = lambda *exts: [(int(catalog.offsets[e][row]), int(catalog.sizes[e][row])) for e in exts]  # noqa: E731
    assert len(merge_ranges(span("tokens.npy", "jpg", "mel.npy"), ADJACENT)) == 1   # one pread per sample
    assert len(merge_ranges(span("tokens.npy", "mel.npy"), ADJACENT)) == 2          # the image is not read


# -- local files

def test_local_ranges_read_back_exactly(tmp_path):
    path = tmp_path / "shard-000000.tar"
    path.write_bytes(DATA)
    reader = ShardReader(ReadConfig())
    ranges = [(0, 10), (1000, 24), (300, 0), (5, 700)]
    expected = [DATA[o:o + s] for o, s in ranges]
    assert reader.read(str(path), ranges, len(DATA)) == expected
    assert reader.read(f"file://{path}", ranges) == expected
    reader.close()
    assert reader.read(str(path), ranges) == expected   # usable again after close


def test_a_mapped_shard_serves_later_reads_as_slices_and_names_a_range_past_its_end(tmp_path):
    path = tmp_path / "shard-000000.tar"
    path.write_bytes(DATA)
    reader = ShardReader(ReadConfig())
    reader.read(str(path), [(0, 1)], len(DATA))                   # maps it
    ranges = [(1000, 24), (3, 0), (0, 10)]
    views = reader.read(str(path), ranges, len(DATA))
    assert all(isinstance(v, memoryview) for v in views)                  # slices of the mapping, not copies
    assert [bytes(v) for v in views] == [DATA[1000:1024], b"", DATA[:10]]
    with pytest.raises(ShardReadError, match=r"\[1020, 1030\) lies beyond its 1024 bytes") as e:
        reader.read(str(path), [(0, 4), (1020, 10)], len(DATA))
    assert str(path) in str(e.value) and "index does not match" in str(e.value)



@pytest.mark.parametrize("mapped", [True, False])
def test_a_batch_read_gives_each_sample_its_members_or_its_own_error(tmp_path, mapped):
    first, second = tmp_path / "shard-000000.tar", tmp_path / "shard-000001.tar"
    first.write_bytes(DATA)
    second.write_bytes(DATA[::-1])
    reader = ShardReader(ReadConfig(mmap=mapped))
    samples = [(first, [0, 1000], [10, 24]), (second, [5], [3]), (first, [1020], [10]),   # past the end
               (second, [], []), (first, [3], [0])]
    got = reader.read_batch([str(p) for p, _, _ in samples], [o for _, o, _ in samples],
                            [s for _, _, s in samples], [max([o + s for o, s in zip(os_, ss)], default=0)
                                                         for _, os_, ss in samples], [len(DATA)] * len(samples))
    assert [bytes(v) for v in got[0]] == [DATA[:10], DATA[1000:1024]]
    assert [bytes(v) for v in got[1]] == [DATA[::-1][5:8]]
    assert isinstance(got[2], ShardReadError) and str(first) in str(got[2]) and "1024 bytes" in str(got[2])
    assert got[3] == [] and [bytes(v) for v in got[4]] == [b""]
    assert (str(first) in reader._maps) == mapped      # later samples of it are slices of the mapping
    assert [bytes(v) for v in reader.read_batch([str(first)], [[0]], [[10]], [10], [len(DATA)])[0]] == [DATA[:10]]

@pytest.mark.parametrize("mapped", [True, False])
def test_local_keeps_a_bounded_number_of_files_open_or_mapped(tmp_path, mapped):
    reader = ShardReader(ReadConfig(mmap=mapped))
    for i in range(70):
        (tmp_path / f"{i}.tar").write_bytes(DATA)
        assert reader.read(str(tmp_path / f"{i}.tar"), [(i, 1), (i + 5, 2)]) == [DATA[i:i + 1], DATA[i + 5:i + 7]]
    assert (len(reader._maps), len(reader._fds)) == ((64, 0) if mapped else (0, 64))   # a mapping needs no fd
    reader.close()
    assert not reader._fds and not reader._maps


@pytest.mark.parametrize("mapped", [True, False])
def test_truncated_local_shard_names_the_path(tmp_path, mapped):
    path = tmp_path / "shard-000001.tar"
    path.write_bytes(DATA[:100])
    reader = ShardReader(ReadConfig(mmap=mapped))
    with pytest.raises(ShardReadError, match="truncated") as e:
        reader.read(str(path), [(90, 20)])
    assert str(path) in str(e.value) and "at least 110 bytes" in str(e.value)
    with pytest.raises(ShardReadError, match="truncated"):   # dataset.json's size exposes it even in bounds
        ShardReader(ReadConfig(mmap=mapped)).read(str(path), [(0, 10)], shard_bytes=len(DATA))


def test_an_empty_local_file_cannot_be_mapped_and_is_read_normally(tmp_path):
    path = tmp_path / "shard-000000.tar"
    path.write_bytes(b"")
    reader = ShardReader(ReadConfig())
    assert reader.read(str(path), [(0, 0)]) == [b""]
    with pytest.raises(ShardReadError, match="truncated"):
        reader.read(str(path), [(0, 1)])


def test_missing_local_shard_names_it(tmp_path):
    path = tmp_path / "shard-000404.tar"
    with pytest.raises(ShardReadError, match="does not exist") as e:
        ShardReader(ReadConfig()).read(str(path), [(0, 1)])
    assert str(path) in str(e.value) and "main process" in str(e.value)


# -- remote range reads

def test_remote_retries_then_succeeds(monkeypatch, memory_url):
    url = memory_url("shard-000000.tar")
    original, calls = MemoryFileSystem.cat_file, []

    def flaky(self, path, start=None, end=None, **kw):
        calls.append((start, end))
        if len(calls) <= 2:
            raise ConnectionResetError("connection reset by peer")
        return original(self, path, start=start, end=end, **kw)
    monkeypatch.setattr(MemoryFileSystem, "cat_file", flaky)
    reader = ShardReader(fast(retries=3))
    assert reader.read(url, [(10, 20), (40, 5)], len(DATA)) == [DATA[10:30], DATA[40:45]]
    assert calls == [(10, 45)] * 3   # nearby ranges share one request
    reader.close()


def test_remote_gives_up_naming_url_range_and_attempts(monkeypatch, memory_url):
    url = memory_url("shard-000002.tar")

    def broken(self, path, start=None, end=None, **kw):
        raise OSError("503 SlowDown")
    monkeypatch.setattr(MemoryFileSystem, "cat_file", broken)
    with pytest.raises(ShardReadError) as e:
        ShardReader(fast(retries=3)).read(url, [(10, 20)])
    message = str(e.value)
    assert url in message and "[10, 30)" in message and "4 attempts" in message
    assert "503 SlowDown" in message and "main process" in message


def test_remote_stall_is_reported_as_a_timeout(monkeypatch, memory_url):
    url = memory_url("shard-000003.tar")
    release = threading.Event()

    def hang(self, path, start=None, end=None, **kw):
        release.wait(10)
        return b""
    monkeypatch.setattr(MemoryFileSystem, "cat_file", hang)
    begin = time.monotonic()
    try:
        with pytest.raises(ShardReadError) as e:
            ShardReader(fast(timeout_s=0.2, retries=2)).read(url, [(0, 8)])
    finally:
        release.set()
    assert time.monotonic() - begin < 9  # far less than one 10 s hang: the timeout fired, not the release
    assert "timeout" in str(e.value) and "stalled" in str(e.value) and "3 attempts" in str(e.value)


def test_remote_missing_and_truncated_are_not_retried(monkeypatch, memory_url):
    calls = count_calls(monkeypatch, "cat_file")
    with pytest.raises(ShardReadError, match="does not exist"):
        ShardReader(fast()).read(memory_url("x.tar").replace("x.tar", "gone.tar"), [(0, 4)])
    with pytest.raises(ShardReadError, match="truncated"):
        ShardReader(fast()).read(memory_url("short.tar", DATA[:100]), [(90, 20)])
    assert len(calls) == 2


# -- the local cache of remote shards

def test_cache_downloads_once_then_reads_locally(monkeypatch, memory_url, tmp_path):
    url = memory_url("shard-000000.tar")
    cats, opens = count_calls(monkeypatch, "cat_file"), count_calls(monkeypatch, "_open")
    reader = ShardReader(fast(cache_dir=str(tmp_path), cache_bytes=10_000))
    assert reader.read(url, [(3, 7)], len(DATA)) == [DATA[3:10]]   # a range read while the shard comes down
    reader.wait_for_downloads()
    assert [p.name for p in tmp_path.iterdir()] == [cache_name(url)]   # no claim or temporary file left
    used = len(cats) + len(opens)
    assert reader.read(url, [(500, 100), (0, 1)], len(DATA)) == [DATA[500:600], DATA[:1]]
    assert len(cats) + len(opens) == used


def test_workers_sharing_a_cache_download_each_shard_once(monkeypatch, memory_url, tmp_path):
    """Two readers (two workers, or two ranks on one machine) on one cache_dir: one claims the download,
    the other serves its reads by range meanwhile, then both read the one local copy."""
    url = memory_url("shard-000007.tar")
    config = fast(cache_dir=str(tmp_path), cache_bytes=10_000)
    first, second = ShardReader(config), ShardReader(config)
    release = threading.Event()
    original = MemoryFileSystem._open

    def slow_open(self, *args, **kwargs):   # the download is under way while the second reader asks
        release.wait(5)
        return original(self, *args, **kwargs)
    monkeypatch.setattr(MemoryFileSystem, "_open", slow_open)
    assert first.read(url, [(0, 4)], len(DATA)) == [DATA[:4]]
    assert second.read(url, [(8, 4)], len(DATA)) == [DATA[8:12]]   # by range: the claim is the first's
    assert f".{cache_name(url)}.claim" in [p.name for p in tmp_path.iterdir()]
    release.set()
    first.wait_for_downloads()
    second.wait_for_downloads()
    monkeypatch.setattr(MemoryFileSystem, "_open", original)
    opens = count_calls(monkeypatch, "_open")
    cats = count_calls(monkeypatch, "cat_file")
    assert second.read(url, [(100, 4)], len(DATA)) == [DATA[100:104]]
    assert [p.name for p in tmp_path.iterdir()] == [cache_name(url)] and not opens and not cats


def test_planned_shards_are_downloaded_before_their_first_read(monkeypatch, memory_url, tmp_path):
    """With a cache, a plan starts its shards' downloads (a few ahead), so that their samples are read from
    the cache instead of by range requests while a download started at the first read runs."""
    urls = [memory_url(f"shard-{i:06d}.tar") for i in range(6)]
    reader = ShardReader(fast(cache_dir=str(tmp_path), cache_bytes=100_000))
    cats = count_calls(monkeypatch, "cat_file")
    reader.plan(urls, [[0]] * 6, [[4]] * 6, [len(DATA)] * 6)
    reader.wait_for_downloads()
    cached = sorted(p.name for p in tmp_path.iterdir())
    assert cached == sorted(cache_name(u) for u in urls[:PREFETCH_SHARDS])   # in the order needed, a few ahead
    assert reader.read(urls[0], [(3, 7)], len(DATA)) == [DATA[3:10]] and not cats   # no range request
    # the rest start as those end: reading a batch tops the downloads up, and later shards can be queued
    # before they are planned (the next group's)
    reader.prefetch([memory_url("shard-000009.tar")], [len(DATA)])
    assert reader.read_batch([urls[1]], [[0]], [[4]], [4], [len(DATA)]) == [[DATA[:4]]]
    reader.wait_for_downloads()
    assert reader.read_batch([urls[4]], [[0]], [[4]], [4], [len(DATA)]) == [[DATA[:4]]]
    reader.wait_for_downloads()
    cached = {p.name for p in tmp_path.iterdir()}
    assert cached == {cache_name(u) for u in urls} | {cache_name(memory_url("shard-000009.tar"))} and not cats


def test_downloads_ahead_of_need_never_evict(memory_url, tmp_path):
    urls = [memory_url(f"shard-{i:06d}.tar") for i in range(4)]
    reader = ShardReader(fast(cache_dir=str(tmp_path), cache_bytes=2 * len(DATA) + 10))
    reader.plan(urls, [[0]] * 4, [[4]] * 4, [len(DATA)] * 4)
    reader.wait_for_downloads()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(cache_name(u) for u in urls[:2])   # what fits
    assert reader.read_batch([urls[2]], [[0]], [[4]], [4], [len(DATA)]) == [[DATA[:4]]]   # needed: evicts
    assert len(list(tmp_path.iterdir())) == 2 and (tmp_path / cache_name(urls[2])).exists()


def test_a_batch_waits_for_the_copy_another_reader_is_downloading(monkeypatch, memory_url, tmp_path):
    """A batch waits for the copy of a shard another worker is downloading rather than read it by range (a
    first batch too, where the shard is under 16 MiB)."""
    url = memory_url("shard-000006.tar")
    config = fast(cache_dir=str(tmp_path), cache_bytes=10_000)
    downloader, waiter = ShardReader(config), ShardReader(config)
    release = threading.Event()
    original = MemoryFileSystem._open

    def slow_open(self, *args, **kwargs):
        release.wait(5)
        return original(self, *args, **kwargs)
    monkeypatch.setattr(MemoryFileSystem, "_open", slow_open)
    downloader.start_downloads([url], [len(DATA)])          # holds the claim, its download held back
    cats = count_calls(monkeypatch, "cat_file")
    threading.Timer(0.3, release.set).start()
    begin = time.monotonic()
    assert waiter.read_batch([url], [[8]], [[4]], [12], [len(DATA)]) == [[DATA[8:12]]]
    assert time.monotonic() - begin >= 0.2 and not cats     # it waited for the copy: no range request
    downloader.wait_for_downloads()
    assert [p.name for p in tmp_path.iterdir()] == [cache_name(url)]


def test_a_batch_waiting_for_a_dead_downloaders_copy_takes_the_download_over(memory_url, tmp_path):
    import socket
    url = memory_url("shard-000005.tar")
    (tmp_path / f".{cache_name(url)}.claim").write_text(f"{socket.gethostname()} {2**22 + 12345}\n")   # no such pid
    reader = ShardReader(fast(cache_dir=str(tmp_path), cache_bytes=10_000))
    assert reader.read_batch([url], [[0]], [[4]], [4], [len(DATA)]) == [[DATA[:4]]]
    assert [p.name for p in tmp_path.iterdir()] == [cache_name(url)]


@pytest.mark.parametrize("claim", ["a dead process here", "a machine that went quiet", "garbage, long untouched"])
def test_a_claim_whose_downloader_is_gone_is_taken_over(memory_url, tmp_path, claim):
    import socket
    url = memory_url("shard-000008.tar")
    stale = tmp_path / f".{cache_name(url)}.claim"
    if claim == "a dead process here":
        stale.write_text(f"{socket.gethostname()} {2**22 + 12345}\n")        # no such pid
    else:
        stale.write_bytes(b"elsewhere 1\n" if claim == "a machine that went quiet" else b"\xff\x00 99999999999999999999")
        old = time.time() - 3600
        os.utime(stale, (old, old))
    reader = ShardReader(fast(cache_dir=str(tmp_path), cache_bytes=10_000))
    assert reader.read(url, [(0, 4)], len(DATA)) == [DATA[:4]]
    reader.wait_for_downloads()
    assert [p.name for p in tmp_path.iterdir()] == [cache_name(url)]


def test_a_live_claim_is_left_alone(memory_url, tmp_path):
    url = memory_url("shard-000009.tar")
    live = tmp_path / f".{cache_name(url)}.claim"
    live.write_text("elsewhere 1\n")          # another machine's download, touched just now
    reader = ShardReader(fast(cache_dir=str(tmp_path), cache_bytes=10_000))
    assert reader.read(url, [(0, 4)], len(DATA)) == [DATA[:4]]
    reader.wait_for_downloads()
    assert [p.name for p in tmp_path.iterdir()] == [live.name]   # no second download of it


def test_cache_evicts_least_recently_used(memory_url, tmp_path):
    a, b, c = (memory_url(f"{n}.tar") for n in "abc")
    reader = ShardReader(fast(cache_dir=str(tmp_path), cache_bytes=2 * len(DATA) + 100))
    for url in (a, b, a, c):     # b is the least recently used when c arrives
        assert reader.read(url, [(0, 4)], len(DATA)) == [DATA[:4]]
        reader.wait_for_downloads()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([cache_name(a), cache_name(c)])
    assert sum(p.stat().st_size for p in tmp_path.iterdir()) <= reader.config.cache_bytes


def test_cache_discards_a_download_of_the_wrong_size(memory_url, tmp_path):
    url = memory_url("shard-000005.tar", DATA[:1000])
    reader = ShardReader(fast(cache_dir=str(tmp_path), cache_bytes=10_000, retries=1))
    assert reader.read(url, [(0, 4)], len(DATA)) == [DATA[:4]]   # by range, while the download goes wrong
    reader.wait_for_downloads()
    with pytest.raises(ShardReadError, match="downloaded 1000 bytes, expected 1024") as e:
        reader.read(url, [(0, 4)], len(DATA))                    # the next read of the shard says so
    assert "2 attempts" in str(e.value)
    assert list(tmp_path.iterdir()) == []   # neither the final name nor a leftover temporary file


def test_cache_stops_downloading_an_object_larger_than_its_shard(memory_url, tmp_path):
    url = memory_url("shard-000004.tar", DATA * 40)       # dataset.json says len(DATA) bytes
    reader = ShardReader(fast(cache_dir=str(tmp_path), cache_bytes=10_000, retries=0))
    reader.start_downloads([url], [len(DATA)])
    reader.wait_for_downloads()
    with pytest.raises(ShardReadError, match=f"holds more than the {len(DATA)} bytes dataset.json gives"):
        reader.read(url, [(0, 4)], len(DATA))
    assert list(tmp_path.iterdir()) == []   # nothing written past the shard's size, nothing left behind


def test_cache_refuses_a_shard_bigger_than_cache_bytes(memory_url, tmp_path):
    url = memory_url("shard-000006.tar")
    with pytest.raises(ShardReadError, match="cache_bytes") as e:
        ShardReader(fast(cache_dir=str(tmp_path), cache_bytes=512)).read(url, [(0, 4)], len(DATA))
    assert url in str(e.value) and "1024 bytes" in str(e.value)


# -- a real S3-compatible server

@pytest.mark.slow
def test_s3_range_reads_with_and_without_cache(s3, tmp_path):
    from helpers import make_bucket
    client = make_bucket(s3, "mm-reader")
    client.put_object(Bucket="mm-reader", Key="d/shard-000000.tar", Body=DATA)
    url = "s3://mm-reader/d/shard-000000.tar"
    options = s3
    ranges = [(0, 10), (1000, 24), (200, 300), (5000 % 1024, 1)]
    expected = [DATA[o:o + s] for o, s in ranges]
    for config in (fast(storage_options=options),
                   fast(storage_options=options, cache_dir=str(tmp_path), cache_bytes=10_000)):
        reader = ShardReader(config)
        assert reader.read(url, ranges, len(DATA)) == expected
        reader.wait_for_downloads()
        assert reader.read(url, ranges) == expected
        reader.close()
    assert os.listdir(tmp_path) == [cache_name(url)]
    with pytest.raises(ShardReadError, match="does not exist"):
        ShardReader(fast(storage_options=options)).read(url.replace("000000", "000404"), [(0, 1)])
