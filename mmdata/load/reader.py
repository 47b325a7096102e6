"""Read members of shards by byte range: local files, object stores, or a local cache of remote shards.

    read(url, [(offset, size), ...], shard_bytes)   -> ranges merged into spans, one read_span each
      local path / file://  -> a read-only mapping (LRU of 64), each range a slice of it;
                               or neighbouring members in one os.pread where the filesystem cannot map
      remote, no cache_dir  -> a sample's ranges within 64 KiB merged -> fs.cat_file(start, end), timed out +
                               retried; up to read.inflight requests at once, planned ahead from the epoch
                               order (``plan``) and handed out in order
      remote, cache_dir     -> whole shard downloaded once per machine, in the background (a claim file
                               tells the other workers and ranks; tmp file + os.replace) -> pread; until
                               it is there, its samples are range reads as above

One ShardReader per DataLoader worker: it holds file descriptors and a small
thread pool, so the loader creates it inside the worker and nothing is opened
before the first read. Every failure is a ShardReadError whose message names
the shard, the byte range and the worker, because a bad shard among thousands
is otherwise hard to find.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import hashlib
import mmap
import os
import socket
import stat
import threading
import time
from collections import OrderedDict, deque
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

from torch.utils.data import get_worker_info

from mmdata import storage
from mmdata.config import require
from mmdata.load.presigned import ObjectTooShort, PresignedGets
from mmdata.load.presigned import usable as presigned_usable

MAX_OPEN_FILES = 64
POOL_THREADS = 4
MERGE_GAP = 64 * 1024          # members of one sample sit a tar header apart: one request beats several
JOIN_GAP = 8 * 1024            # planned samples this close in a shard share a request (headers, json, text between)
MAX_REQUEST = 4 * 1024 * 1024  # and a request grows to at most this: many stay in flight, the first come soon
Bytes = bytes | memoryview
ADJACENT = 1024                # less than a tar header + padding apart: neighbouring members, one pread
DOWNLOAD_CHUNK = 8 * 1024 * 1024
DOWNLOADS = 4                  # whole-shard downloads a worker runs at once into the cache
WHOLE_FIRST_BYTES = 16 << 20  # with a cache, even a first batch waits for shards this small to come down whole:
                               # a few large requests beat a range request per sample (below a second per shard)
PREFETCH_SHARDS = 4            # and at most this many started ahead of their first read, running or queued
RAMP_BYTES = 2 << 20           # read ahead of a pass's first batch, doubling with each batch up to read_ahead_bytes
CLAIM_STALE_S = 60             # a download claim untouched this long (and at least 2 x timeout_s) is taken over


@dataclass
class ReadConfig:
    cache_dir: str | None = None   # local folder for whole-shard copies of remote shards; None: range reads
    cache_bytes: int = 0           # bound on the cache folder's size (LRU eviction); required when cache_dir is set
    timeout_s: float = 60.0        # one read (or one shard download) taking longer than this is a stall
    retries: int = 3               # attempts after the first, with exponential backoff
    backoff_s: float = 0.5
    storage_options: dict = field(default_factory=dict)   # fsspec options: endpoint_url, key, secret...
    mmap: bool = True              # map local shards read-only: reads are slices, not copies (docs/loader.md)
    inflight: int = 32             # remote range requests in flight at once, per worker: latency hides behind them
    read_ahead_bytes: int = 64 << 20   # bytes of upcoming samples a worker requests before it needs them
    presigned: bool = True         # S3 GETs through presigned URLs: a tenth of s3fs's CPU per request (presigned.py)

    def validate(self) -> None:
        require(self.cache_bytes >= 0, "cache_bytes", f"must be >= 0; got {self.cache_bytes}")
        if self.cache_dir:
            require(self.cache_bytes > 0, "cache_bytes", "must be positive when cache_dir is set: it bounds the cache")
            require(storage.is_local(self.cache_dir), "cache_dir", f"must be a local folder; got {self.cache_dir}")
        require(self.timeout_s > 0, "timeout_s", f"must be positive; got {self.timeout_s}")
        require(self.retries >= 0, "retries", f"must be >= 0; got {self.retries}")
        require(self.backoff_s >= 0, "backoff_s", f"must be >= 0; got {self.backoff_s}")
        require(1 <= self.inflight <= 1024, "inflight", f"must be between 1 and 1024; got {self.inflight}")
        require(self.read_ahead_bytes >= 0, "read_ahead_bytes", f"must be >= 0; got {self.read_ahead_bytes}")


class ShardReadError(Exception):
    """A shard that cannot be read: the message names the shard URL, the byte range and the DataLoader worker."""


class _Stalled(Exception):
    """One attempt outlived timeout_s."""


def worker_name() -> str:
    info = get_worker_info()
    return "main process" if info is None else f"DataLoader worker {info.id}"


def truncated(url: str, start: int, end: int, found: str) -> ShardReadError:
    """A shard shorter than its index says: the read of [start, end) came up short."""
    return ShardReadError(f"shard {url} is truncated: byte range [{start}, {end}) needs at least {end} bytes; "
                          f"{found} ({worker_name()})")


def beyond_shard(url: str, start: int, end: int, size: str) -> ShardReadError:
    """A byte range the index gives that the shard's own size rules out."""
    return ShardReadError(f"shard {url}: byte range [{start}, {end}) lies beyond its {size}; the index does not "
                          f"match the shard ({worker_name()})")


def merge_ranges(ranges: list[tuple[int, int]], gap: int = MERGE_GAP) -> list[tuple[int, int, list[int]]]:
    """``(start, end, indices)`` spans covering the non-empty ranges; each remote request has a latency
    far above the cost of a few extra bytes, so ranges closer than ``gap`` share one request."""
    spans: list[list] = []
    for i in sorted(range(len(ranges)), key=lambda i: ranges[i][0]):
        offset, size = ranges[i]
        if size == 0:
            continue
        if spans and offset <= spans[-1][1] + gap:
            spans[-1][1] = max(spans[-1][1], offset + size)
            spans[-1][2].append(i)
        else:
            spans.append([offset, offset + size, [i]])
    return [(start, end, indices) for start, end, indices in spans]


def cache_name(url: str) -> str:
    """Unique per URL (shards of different datasets share names), still readable when debugging."""
    return hashlib.sha1(url.encode()).hexdigest()[:16] + "-" + url.rstrip("/").rsplit("/", 1)[-1]


def touch(path: Path) -> None:
    """Mark a cached shard as just used. time_ns, not the kernel's coarse file clock, keeps LRU order exact."""
    now = time.time_ns()
    try:
        os.utime(path, ns=(now, now))
    except FileNotFoundError:  # evicted by another worker meanwhile; our open fd still reads it
        pass


class ShardReader:
    """Reads byte ranges of shards; one per DataLoader worker (not shared across processes)."""

    def __init__(self, config: ReadConfig):
        config.validate()
        self.config = config
        self._fds: OrderedDict[str, int] = OrderedDict()
        self._maps: OrderedDict[str, memoryview | None] = OrderedDict()
        self._pool: futures.ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        # remote range reads planned ahead: spans not yet requested, in the order batches will need them, and
        # requested ones not yet taken (by span; a span can come twice, e.g. a padded epoch's repeats)
        self._fetcher: futures.ThreadPoolExecutor | None = None
        self._planned: deque[Request] = deque()
        self._spans: dict[tuple[str, int, int], deque[Request]] = {}
        self._ahead_bytes = 0
        self._first: list[futures.Future] = []   # the requests of a first batch, before which nothing else goes
        self._downloads: dict[str, futures.Future] = {}   # background downloads this reader started
        self._download_bytes: dict[str, int] = {}          # and their sizes, where dataset.json gives them
        self._batches_read = 0   # in this pass: with a cache, only a first batch's samples are read by range
        self._wanted: OrderedDict[str, int | None] = OrderedDict()   # shards to download next, in order of need
        self._downloader: futures.ThreadPoolExecutor | None = None
        self._gets = PresignedGets(connections=config.inflight + DOWNLOADS)
        self._presigned: dict[str, bool] = {}   # by URL scheme: whether its GETs go through presigned URLs
        self._unsent: list = []                  # presigned requests made, to start together (``_send``)
        self._filesystems: dict = {}             # by bucket
        self._cache_paths: dict[str, Path] = {}  # remote url -> its copy's path in cache_dir
        self._inodes: dict[str, int] = {}         # remote url -> the inode of its mapped copy

    def __getstate__(self) -> dict:
        """Only the config travels (to DataLoader workers): files, pools and plans belong to one process."""
        return {"config": self.config}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["config"])

    def read(self, url: str, ranges: list[tuple[int, int]], shard_bytes: int | None = None) -> list[Bytes]:
        """Bytes of each (offset, size) range of the shard at url: memoryview slices of merged spans
        (see ``merge_gap``). shard_bytes (from dataset.json) detects truncated shards and verifies
        cached downloads."""
        mapped = self._maps.get(url) if self.config.mmap else None
        if mapped is not None:
            # already mapped (the common case, every sample after a shard's first): slices, nothing to merge
            check_mapped(url, mapped)
            self._maps.move_to_end(url)
            views = []
            for offset, size in ranges:
                view = mapped[offset: offset + size]
                if len(view) != size:   # a slice past the end comes back short
                    raise beyond_shard(url, offset, offset + size, f"{len(mapped)} bytes")
                views.append(view)
            return views
        spans = merge_ranges(ranges, self.merge_gap(url))
        return cut(ranges, spans, [self.read_span(url, start, end, shard_bytes) for start, end, _ in spans])

    def read_batch(self, urls: list[str], offsets: list[list[int]], sizes: list[list[int]], ends: list[int],
                   shard_bytes: list[int]) -> list[list[Bytes] | ShardReadError]:
        """``read`` for each sample of a batch: its members' bytes, or the ShardReadError its read
        raised (one bad sample must not fail the batch). ``ends`` is each sample's last byte + 1.

        A sample of a shard that is already mapped (the common case) costs one slice per member
        and no call: per sample, the calls and checks of ``read`` show in a worker's profile.
        """
        maps = self._maps if self.config.mmap else {}
        shards = dict.fromkeys(urls)
        if self.config.cache_dir:
            self._top_up_downloads()
            for url, total in dict(zip(urls, shard_bytes)).items():
                if self._batches_read or (total is not None and total <= WHOLE_FIRST_BYTES):
                    self.wait_for_copy(url, total)
            if self.config.mmap:
                self._map_cached(dict(zip(urls, shard_bytes)))
        self._batches_read += 1
        for url in shards:                   # once per shard and batch, before any page of it is touched
            mapped = maps.get(url)
            if mapped is not None and mapped.obj.size() != len(mapped):
                del maps[url]                # read() below reopens it, and open_shard names what changed
        out: list = []
        pending = []   # remote range reads: every one of the batch requested before any is waited for
        for url, starts, lengths, end, total in zip(urls, offsets, sizes, ends, shard_bytes):
            mapped = maps.get(url)
            if mapped is not None and end <= len(mapped):
                out.append([mapped[o: o + n] for o, n in zip(starts, lengths)])
                continue
            if starts and self.ranged(url):
                ranges = list(zip(starts, lengths))
                spans = merge_ranges(ranges, MERGE_GAP)
                pending.append((len(out), ranges, spans, [self.take(url, a, b, total) for a, b, _ in spans]))
                out.append(None)
                continue
            try:
                out.append(self.read(url, list(zip(starts, lengths)), total) if starts else [])
            except ShardReadError as e:
                out.append(e)
        for j, ranges, spans, requested in pending:
            try:
                out[j] = cut(ranges, spans, [f.result() for f in requested])
            except ShardReadError as e:
                out[j] = e
        if pending:
            self._request_ahead()   # a first batch is in: what was planned after it goes out before it decodes
        for url in shards:                   # least recently used order, once per shard
            if url in maps:
                maps.move_to_end(url)
        return out

    def ranged(self, url: str) -> bool:
        """Whether reads of ``url`` are remote range requests: object storage or HTTP without cache_dir, or
        with one while the shard is not in it yet (its download is started, in the background)."""
        if storage.is_local(url):
            return False
        if not self.config.cache_dir:
            return True
        path = self.cache_path(url)
        if path.exists():
            return False
        self._start_download(url, path, None)
        return True

    def cache_path(self, url: str) -> Path:
        path = self._cache_paths.get(url)
        if path is None:
            path = self._cache_paths[url] = storage.local_path(self.config.cache_dir) / cache_name(url)
        return path

    def _map_cached(self, urls: dict[str, int | None]) -> None:
        """Cached copies read as local shards are, mapped (a slice per member): from the first batch that
        finds a copy there. A mapping of a copy that another process evicted is dropped (its disk space
        goes with it); a mapped copy is touched once per batch, so eviction sees it in use."""
        for url, total in urls.items():
            if storage.is_local(url):
                continue
            path = self.cache_path(url)
            if url in self._maps:
                try:
                    same = os.stat(path).st_ino == self._inodes.get(url)
                except FileNotFoundError:
                    same = False
                if same:
                    touch(path)
                    continue
                del self._maps[url]          # evicted (and perhaps downloaded again since): map what is there
            try:
                fd = open_shard(url, path, total)
            except ShardReadError:   # not there, or a stale copy: the reads below deal with it
                continue
            try:
                self._maps[url] = memoryview(mmap.mmap(fd, 0, access=mmap.ACCESS_READ))
                self._inodes[url] = os.fstat(fd).st_ino
            except (OSError, ValueError):   # a filesystem that cannot map: read by pread (``_read_cached``)
                continue
            finally:
                os.close(fd)
            touch(path)
            if len(self._maps) > MAX_OPEN_FILES:
                self._maps.popitem(last=False)

    @property
    def claim_stale_after(self) -> float:
        """Seconds a claim may go untouched before it is taken over (a download touches it as chunks arrive)."""
        return max(CLAIM_STALE_S, 2 * self.config.timeout_s)

    def wait_for_copy(self, url: str, shard_bytes: int | None) -> bool:
        """Until the shard is in cache_dir, downloaded by this reader or by another process that holds its
        claim: True, or False when it cannot be (its download failed, or took longer than all its attempts
        may): then its samples are read by range, and the next read reports the failure.

        Past a pass's first batch a cached loader reads whole shards only, as they come down (prefetched by
        ``plan``) instead of by a range request per sample while they do: on a cold pass that is a few large
        requests instead of hundreds of small ones, and every byte fetched once."""
        if storage.is_local(url):
            return True
        path = self.cache_path(url)
        claim = claim_path(path)
        deadline = time.monotonic() + self.config.timeout_s * (self.config.retries + 1)
        started = False
        while not path.exists():
            self._top_up_downloads()
            running = self._downloads.get(url)
            if running is not None and not running.done():
                futures.wait([running], timeout=min(1.0, max(0.0, deadline - time.monotonic())))
            elif running is not None and running.exception() is not None:
                return False
            elif claim.exists() and not claim_is_stale(claim, self.claim_stale_after):
                time.sleep(0.01)          # another worker or rank is downloading it
            elif started:
                return False              # ours ended without a copy and nobody holds the claim
            else:
                try:
                    self._start_download(url, path, shard_bytes)
                except ShardReadError:    # too big to cache, or a failed download: the read says so
                    return False
                started = True
            if time.monotonic() > deadline:
                return False
        return True

    def wait_for_downloads(self) -> None:
        """Until the background downloads this reader started have ended (tests, tools)."""
        futures.wait(list(self._downloads.values()))

    def plan(self, urls: list[str], offsets: list[list[int]], sizes: list[list[int]],
             shard_bytes: list[int], first: bool = False) -> None:
        """The samples the next batches will read, in order. Their remote spans are joined into requests
        where they lie within JOIN_GAP of each other in a shard (members the plan does not read lie between
        them), at most MAX_REQUEST bytes each, and requested ahead in the order the batches need them, up to
        read.read_ahead_bytes: each request's latency passes while earlier batches decode. ``first``: these
        samples are needed before any other (a first batch): their requests go out now, and what is planned
        after them waits until they are answered, so as not to compete with them for the connection."""
        if self.config.cache_dir:   # the shards come down whole: fetching their samples ahead would fetch twice
            self.prefetch(urls, shard_bytes)
            return
        wanted: list[tuple[str, int, int, int | None]] = []
        for url, starts, lengths, total in zip(urls, offsets, sizes, shard_bytes):
            if starts and self.ranged(url):
                wanted += [(url, a, b, total) for a, b, _ in merge_ranges(list(zip(starts, lengths)), MERGE_GAP)]
        if not wanted:
            return
        requests: dict[int, Request] = {}   # the request of each wanted span, by its place in ``wanted``
        by_shard: dict[str, list[int]] = {}
        for i, (url, _, _, _) in enumerate(wanted):
            by_shard.setdefault(url, []).append(i)
        for url, places in by_shard.items():
            request = None
            for i in sorted(places, key=lambda i: (wanted[i][1], wanted[i][2])):
                _, start, end, total = wanted[i]
                joins = (request is not None and start <= request.end + JOIN_GAP
                         and max(end, request.end) - request.start <= MAX_REQUEST)
                if not joins:
                    request = Request(url, start, end, total)
                request.end = max(request.end, end)
                request.waiting += 1
                requests[i] = request
        seen: set[int] = set()
        for i, (url, start, end, _) in enumerate(wanted):
            request = requests[i]
            self._spans.setdefault((url, start, end), deque()).append(request)
            if id(request) not in seen:     # requested in the order of the first batch that needs each
                seen.add(id(request))
                self._planned.append(request)
                if first:
                    self._request(request)
                    self._first.append(request.future)
        self._request_ahead()

    def prefetch(self, urls: list[str], shard_bytes: list[int]) -> None:
        """Shards that the planned or later batches will read (e.g. the next group's, before it is planned):
        with a cache, queued for download after those already queued, in the order they are needed, so that
        their samples are read from the cache, not by range requests while a download that started at their
        first read runs (bytes fetched twice); without one, nothing (range reads are planned)."""
        if not self.config.cache_dir:
            return
        for url, total in dict(zip(urls, shard_bytes)).items():
            if url not in self._wanted and not storage.is_local(url):
                self._wanted[url] = total
        self._top_up_downloads()

    def start_downloads(self, urls: list[str], shard_bytes: list[int]) -> None:
        """Download these shards into the cache now (DOWNLOADS at once, the rest queued), unless there or
        claimed: shards needed right away, e.g. by the workers' first batches while they start."""
        for url, total in dict(zip(urls, shard_bytes)).items():
            if not storage.is_local(url):
                self._download_soon(url, total)

    def _download_soon(self, url: str, shard_bytes: int | None) -> bool:
        """Start (or queue) the shard's download unless it is cached, under way here, or too big to cache
        (the read of its first sample says so): whether one was started."""
        if url in self._downloads or self.cache_path(url).exists():
            return False
        try:
            self._start_download(url, self.cache_path(url), shard_bytes)
        except ShardReadError:
            return False
        return True

    def _top_up_downloads(self) -> None:
        """Start queued shard downloads while fewer than PREFETCH_SHARDS run and the cache has room for them
        without evicting (plan.py's preflight sizes it for a window and one more shard per worker): downloads
        stay a few shards ahead of need where the cache allows."""
        if not self._wanted:
            return
        in_flight = [url for url, f in self._downloads.items() if not f.done()]
        coming = sum(self._download_bytes.get(url, 0) for url in in_flight)   # not in the folder yet
        folder = storage.local_path(self.config.cache_dir)
        free = self.config.cache_bytes - coming - sum(size for _, _, size in cached_shards(folder))
        running = len(in_flight)
        if not self._batches_read:
            # before a pass's first batch, other processes' downloads count too: the first batches' shards,
            # which the main process starts while the workers fork, come down before anything ahead of need
            mine = {claim_path(self.cache_path(url)).name for url in in_flight}
            running += len(others_claims(folder, mine, self.claim_stale_after))
        while self._wanted and running < PREFETCH_SHARDS:
            url, total = next(iter(self._wanted.items()))
            if url in self._downloads or self.cache_path(url).exists():
                self._wanted.popitem(last=False)
                continue
            if total is None or total > free:   # ahead of need, a download never evicts: at its first read
                return                          # it starts anyway (and evicts the least recently used)
            self._wanted.popitem(last=False)
            free -= total
            running += self._download_soon(url, total)

    def forget_plan(self) -> None:
        """Drop what was planned (an epoch left before its end, a resume elsewhere in the order)."""
        for requests in self._spans.values():
            for request in requests:
                if request.future is not None:
                    request.future.cancel()
        self._planned.clear()
        self._unsent.clear()
        self._spans.clear()
        self._first.clear()
        self._ahead_bytes = 0
        self._batches_read = 0
        self._wanted.clear()

    def take(self, url: str, start: int, end: int, shard_bytes: int | None) -> "Part":
        """Span [start, end) of ``url``: from the request planned for it, else from a request of its own."""
        planned = self._spans.get((url, start, end))
        if not planned:
            request = Request(url, start, end, shard_bytes, waiting=1)
            request.future = self._submit_span(url, start, end, shard_bytes)
            self._send()
            return Part(request, start, end)
        request = planned.popleft()
        if not planned:
            del self._spans[(url, start, end)]
        while request.future is None and self._planned:   # planned in the order batches take them: it is near
            self._request(self._planned.popleft())
        self._request(request)
        request.waiting -= 1
        if not request.waiting:
            self._ahead_bytes -= request.end - request.start
        self._request_ahead()
        return Part(request, start, end)

    def _request_ahead(self) -> None:
        """Request planned spans up to read_ahead_bytes (once a first batch's are answered), and start every
        request made so far."""
        if self._first and all(f.done() for f in self._first):
            self._first.clear()
        # read ahead ramps up over a pass's first batches: all of it at once is hundreds of requests whose CPU
        # (in this process and the server's) would compete with decoding the first batches
        limit = min(self.config.read_ahead_bytes, RAMP_BYTES << min(self._batches_read, 20))
        while not self._first and self._planned and (self._ahead_bytes < limit or self._planned[0].future is not None):
            if self._planned[0].future is not None:   # already requested for a batch that needed it early
                self._planned.popleft()
                continue
            self._request(self._planned.popleft())
        self._send()

    def _request(self, request: "Request") -> None:
        if request.future is None:
            request.future = self._submit_span(request.url, request.start, request.end, request.shard_bytes)
            self._ahead_bytes += request.end - request.start

    def _submit_span(self, url: str, start: int, end: int, shard_bytes: int | None) -> futures.Future:
        """``read_span``, started: on the event loop where GETs go through presigned URLs, else in a fetch
        thread."""
        if self.config.cache_dir or storage.is_local(url) or not self.presigned(url):
            return self._fetch_pool().submit(self.read_span, url, start, end, shard_bytes)
        future: futures.Future = futures.Future()
        if shard_bytes is not None and end > shard_bytes:
            future.set_exception(beyond_shard(url, start, end, f"{shard_bytes} bytes in dataset.json"))
        else:
            self._unsent.append((url, start, end, future))   # started by ``_send``, with the others
        return future

    def _send(self) -> None:
        """Start the presigned requests made since the last call, in one wake-up of the event loop: one
        each cost the loop's thread a wake-up (and the interpreter lock), 1 ms a request when a plan
        starts hundreds at once."""
        unsent, self._unsent = self._unsent, []
        by_loop: dict = {}
        for url, start, end, future in unsent:
            fs = self._filesystem(url)
            by_loop.setdefault(fs.loop, []).append((fs, url, start, end, future))
        for loop, spans in by_loop.items():
            loop.call_soon_threadsafe(self._start_spans, loop, spans)

    def _start_spans(self, loop: asyncio.AbstractEventLoop, spans: list) -> None:
        """On the event loop: a task for each span whose future nobody cancelled meanwhile; cancelling a
        future later cancels its task (a plan forgotten)."""
        for fs, url, start, end, future in spans:
            if future.cancelled():
                continue
            task = loop.create_task(self._retrying_async(url, f"byte range [{start}, {end})",
                                                         functools.partial(self._span, fs, url, start, end)))
            task.add_done_callback(functools.partial(settle, future))
            future.add_done_callback(lambda f, task=task: f.cancelled() and loop.call_soon_threadsafe(task.cancel))

    def _filesystem(self, url: str):
        bucket = url.split("/", 3)[2]
        if bucket not in self._filesystems:
            self._filesystems[bucket] = storage.filesystem(url, self.config.storage_options)[0]
        return self._filesystems[bucket]

    def _fetch_pool(self) -> futures.ThreadPoolExecutor:
        if self._fetcher is None:
            self._fetcher = futures.ThreadPoolExecutor(max_workers=self.config.inflight,
                                                       thread_name_prefix="mmdata-fetch")
        return self._fetcher

    def merge_gap(self, url: str) -> int:
        """Ranges closer than this are read at once: on disk only neighbouring members (so members
        not asked for are not read), from object storage anything near (a request costs far more)."""
        return ADJACENT if storage.is_local(url) or self.config.cache_dir else MERGE_GAP

    def read_span(self, url: str, start: int, end: int, shard_bytes: int | None = None) -> bytes:
        """Bytes [start, end) of the shard at url, in one read (one request when remote)."""
        if shard_bytes is not None and end > shard_bytes:
            raise beyond_shard(url, start, end, f"{shard_bytes} bytes in dataset.json")
        if storage.is_local(url):
            mapped = self._mapped(url, shard_bytes) if self.config.mmap else None
            if mapped is None:
                return pread(self._local_fd(url, shard_bytes), url, start, end - start)
            if end > len(mapped):
                raise truncated(url, start, end, f"it has {len(mapped)} bytes")
            return mapped[start:end]
        if self.config.cache_dir:
            return self._read_cached(url, start, end, shard_bytes)
        return self._read_remote(url, start, end)

    def close(self) -> None:
        """Release file descriptors and the thread pool; a later read opens them again."""
        while self._fds:
            os.close(self._fds.popitem()[1])
        self._maps.clear()   # each mapping goes once no slice of it is alive
        self.forget_plan()
        if self._downloader is not None:   # a download cut short leaves a temporary file and its claim, no shard
            self._downloader.shutdown(wait=False, cancel_futures=True)
            self._downloader = None
        self._downloads.clear()
        self._download_bytes.clear()
        if self._fetcher is not None:
            self._fetcher.shutdown(wait=False, cancel_futures=True)
            self._fetcher = None
        self._discard_pool(cancel=True)

    # -- local files and cached copies

    def _local_fd(self, url: str, shard_bytes: int | None) -> int:
        """An open fd for a local shard. Kept open because opening per sample is slow on network filesystems."""
        fd = self._fds.get(url)
        if fd is not None:
            self._fds.move_to_end(url)
            return fd
        fd = self._fds[url] = open_shard(url, storage.local_path(url), shard_bytes)
        if len(self._fds) > MAX_OPEN_FILES:
            os.close(self._fds.popitem(last=False)[1])
        return fd

    def _mapped(self, url: str, shard_bytes: int | None) -> memoryview | None:
        """The local shard mapped read-only, or None where its filesystem cannot map it (then pread).

        Reading a slice of the page cache instead of copying it out saves a copy of every member
        (docs/performance.md). Shards are written once (tmp + rename), so a mapping never sees them
        change, unless another tool truncates or rewrites one in place: ``read`` and ``read_batch``
        compare the file's size with the mapping's (one fstat per shard and batch) before slicing,
        so that is a ShardReadError naming the shard, not a SIGBUS. A mapping is dropped from this
        cache without unmapping, and goes when no slice of it is alive.
        """
        if url in self._maps:
            self._maps.move_to_end(url)
            return self._maps[url]
        fd = self._local_fd(url, shard_bytes)   # opens it and checks its size against dataset.json
        try:
            view = memoryview(mmap.mmap(fd, 0, access=mmap.ACCESS_READ))
        except (OSError, ValueError):           # e.g. a FUSE mount without mmap, an empty file
            view = None
        else:
            os.close(self._fds.pop(url))          # the mapping holds its own reference to the file
        self._maps[url] = view
        if len(self._maps) > MAX_OPEN_FILES:
            self._maps.popitem(last=False)
        return view

    def _read_cached(self, url: str, start: int, end: int, shard_bytes: int | None) -> bytes:
        """Serve from the local copy; while there is none, start its download in the background and serve
        this read by a range request. Opened per read, not kept: an fd held on a shard that another worker
        evicted would keep its disk space in use beyond cache_bytes."""
        path = self.cache_path(url)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            self._start_download(url, path, shard_bytes)
            return self._read_remote(url, start, end)
        try:
            if shard_bytes is not None and os.fstat(fd).st_size != shard_bytes:   # a stale copy: replace it
                path.unlink(missing_ok=True)
                self._start_download(url, path, shard_bytes)
                return self._read_remote(url, start, end)
            touch(path)
            return pread(fd, url, start, end - start)
        finally:
            os.close(fd)

    def _start_download(self, url: str, path: Path, shard_bytes: int | None) -> None:
        """Download the shard into the cache in the background, unless this reader already is. A download
        that failed is reported here, at the next read of its shard (and tried again after that)."""
        running = self._downloads.get(url)
        if running is not None:
            if not running.done():
                return
            del self._downloads[url]
            error = running.exception()
            if error is not None:
                raise error if isinstance(error, ShardReadError) else ShardReadError(
                    f"shard {url}: download failed: {error} ({worker_name()})")
        if shard_bytes is not None and shard_bytes > self.config.cache_bytes:
            raise too_big_to_cache(url, shard_bytes, self.config.cache_bytes)
        if self._downloader is None:
            self._downloader = futures.ThreadPoolExecutor(max_workers=DOWNLOADS, thread_name_prefix="mmdata-cache")
        self._downloads[url] = self._downloader.submit(self._claimed_download, url, path, shard_bytes)
        self._download_bytes[url] = shard_bytes or 0

    def _claimed_download(self, url: str, path: Path, shard_bytes: int | None) -> None:
        """Download the shard unless another process on this machine is: one download per shard per
        machine, whatever the number of workers and ranks sharing cache_dir."""
        claim = claim_path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if not take_claim(claim, stale_after=self.claim_stale_after):
            return
        try:
            if not path.exists():
                self._download(url, path, shard_bytes, claim)
        finally:
            claim.unlink(missing_ok=True)

    def _download(self, url: str, dest: Path, shard_bytes: int | None, claim: Path | None = None) -> None:
        fs, path = storage.filesystem(url, self.config.storage_options)
        size = shard_bytes if shard_bytes is not None else self._retrying(url, "size", lambda _: fs.size(path))
        if size > self.config.cache_bytes:
            raise too_big_to_cache(url, size, self.config.cache_bytes)
        dest.parent.mkdir(parents=True, exist_ok=True)
        make_room(dest.parent, size, self.config.cache_bytes)
        what = f"download of the whole shard ({size} bytes)"
        if self.presigned(url):
            self._on_loop(fs, self._retrying_async(url, what, lambda: self._presigned_download(fs, url, dest, size,
                                                                                               claim))).result()
        else:
            self._retrying(url, what, lambda cancel: download(fs, path, dest, size, cancel, claim))

    async def _presigned_download(self, fs, url: str, dest: Path, size: int, claim: Path | None) -> None:
        tmp = storage.temp_path(dest)
        try:
            await self._gets.download(fs, url, tmp, size, self.config.timeout_s,
                                      (lambda: touch(claim)) if claim is not None else (lambda: None))
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)

    def presigned(self, url: str) -> bool:
        """Whether this reader's GETs of ``url`` go through presigned URLs (presigned.py says when they may)."""
        scheme = url.split("://", 1)[0]
        if scheme not in self._presigned:
            self._presigned[scheme] = self.config.presigned and presigned_usable(url, self.config.storage_options)
        return self._presigned[scheme]

    # -- remote range reads

    def _read_remote(self, url: str, start: int, end: int) -> bytes:
        if self.presigned(url):
            return self._remote_span(url, start, end).result()
        fs, path = storage.filesystem(url, self.config.storage_options)
        data = self._retrying(url, f"byte range [{start}, {end})", lambda _: fetch_range(fs, path, url, start, end))
        if len(data) != end - start:
            raise truncated(url, start, end, f"the range returned {len(data)} bytes")
        return data

    def _remote_span(self, url: str, start: int, end: int) -> futures.Future:
        """Bytes [start, end) of a remote shard through its presigned URL, from any thread: a request on the
        event loop, retried there (``presigned`` says when), started as ``_send`` starts a plan's."""
        future: futures.Future = futures.Future()
        fs = self._filesystem(url)
        fs.loop.call_soon_threadsafe(self._start_spans, fs.loop, [(fs, url, start, end, future)])
        return future

    async def _span(self, fs, url: str, start: int, end: int) -> bytes:
        try:
            return await self._gets.get_range(fs, url, start, end, self.config.timeout_s)
        except ObjectTooShort as e:
            raise truncated(url, start, end, str(e)) from None

    @staticmethod
    def _on_loop(fs, coroutine) -> futures.Future:
        return asyncio.run_coroutine_threadsafe(coroutine, fs.loop)

    def _retrying(self, url: str, what: str, fn):
        """fn(cancel_event) with a timeout per attempt and exponential backoff between attempts.
        A missing object is final; anything else (throttling, resets, stalls) is worth another try."""
        attempts = self.config.retries + 1
        last = ""
        for attempt in range(attempts):
            if attempt:
                time.sleep(self.config.backoff_s * 2 ** (attempt - 1))
            try:
                return self._attempt(fn)
            except Exception as e:  # noqa: BLE001 - every storage error is retried, then reported
                last = retryable(url, what, e)
        raise out_of_attempts(url, what, attempts, last)

    async def _retrying_async(self, url: str, what: str, attempt):
        """``_retrying`` on the event loop: ``attempt()`` makes each try's coroutine; timeout_s bounds each."""
        attempts = self.config.retries + 1
        last = ""
        for n in range(attempts):
            if n:
                await asyncio.sleep(self.config.backoff_s * 2 ** (n - 1))
            try:
                async with self._gets.slot():   # read.inflight at once: a request waiting for one is not timed
                    return await asyncio.wait_for(attempt(), self.config.timeout_s)
            except asyncio.TimeoutError:
                last = stalled_message(self.config.timeout_s)
            except Exception as e:  # noqa: BLE001 - every storage error is retried, then reported
                last = retryable(url, what, e)
        raise out_of_attempts(url, what, attempts, last)

    def _attempt(self, fn):
        """One try in the pool, so that a hung connection costs timeout_s instead of the whole job."""
        cancel = threading.Event()
        pool = self._executor()
        future = pool.submit(fn, cancel)
        done, _ = futures.wait([future], timeout=self.config.timeout_s)
        if not done:
            cancel.set()
            self._discard_pool(pool)
            raise _Stalled(stalled_message(self.config.timeout_s))
        return future.result()

    def _executor(self) -> futures.ThreadPoolExecutor:
        with self._pool_lock:   # the fetch threads make attempts at once
            if self._pool is None:
                self._pool = futures.ThreadPoolExecutor(max_workers=POOL_THREADS + self.config.inflight,
                                                        thread_name_prefix="mmdata-read")
            return self._pool

    def _discard_pool(self, stalled: futures.ThreadPoolExecutor | None = None, cancel: bool = False) -> None:
        """Drop the pool (the one an attempt ``stalled`` in, if it is still the current one) without waiting:
        a stalled thread keeps its slot until its call returns, and later attempts must not queue behind it
        (they would time out without having started). Attempts of other fetch threads already queued there
        still run (``cancel``: they are not wanted, the reader is closing)."""
        with self._pool_lock:
            if self._pool is not None and (stalled is None or stalled is self._pool):
                self._pool.shutdown(wait=False, cancel_futures=cancel)
                self._pool = None


@dataclass
class Request:
    """One remote range request, covering the spans of one or more planned samples."""
    url: str
    start: int
    end: int
    shard_bytes: int | None
    waiting: int = 0                       # its spans not yet taken by a batch
    future: futures.Future | None = None   # None until requested


@dataclass
class Part:
    """A span's bytes within a request: ``result()`` waits for the request and slices them out."""
    request: Request
    start: int
    end: int

    def result(self) -> Bytes:
        data = memoryview(self.request.future.result())
        return data[self.start - self.request.start: self.end - self.request.start]


def cut(ranges: list[tuple[int, int]], spans: list[tuple[int, int, list[int]]], data: list[Bytes]) -> list[Bytes]:
    """Each range's bytes, sliced from the spans (``merge_ranges``) that were read for them."""
    out: list[Bytes] = [b""] * len(ranges)
    for (start, _, indices), span in zip(spans, data):
        view = memoryview(span)
        for i in indices:
            offset, size = ranges[i]
            out[i] = view[offset - start: offset - start + size]
    return out


def open_shard(url: str, path: Path, shard_bytes: int | None) -> int:
    """A read-only fd, checked against dataset.json's size: a shard of another size was cut short or
    rewritten, and its index offsets are wrong."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise ShardReadError(f"shard {url} does not exist ({path}; {worker_name()})") from None
    except OSError as e:
        raise ShardReadError(f"shard {url} cannot be opened: {e} ({worker_name()})") from None
    actual = os.fstat(fd).st_size
    if shard_bytes is None or actual == shard_bytes:
        return fd
    os.close(fd)
    what = "is truncated" if actual < shard_bytes else "does not match dataset.json"
    raise ShardReadError(f"shard {url} {what}: it has {actual} bytes, expected {shard_bytes} bytes; it was cut "
                         f"short or rewritten after it was written: rebuild with mmdata preprocess ({worker_name()})")


def check_mapped(url: str, mapped: memoryview) -> None:
    """Raise if the file under a mapping changed size since it was mapped (it was truncated or rewritten in
    place). Touching a page past a shrunk file's end kills the process with SIGBUS, which names no shard;
    one fstat (``mmap.size``) beforehand turns that into an error naming it. About 0.5 µs."""
    actual = mapped.obj.size()
    if actual != len(mapped):
        what = "is truncated" if actual < len(mapped) else "changed size"
        raise ShardReadError(f"shard {url} {what}: it has {actual} bytes, {len(mapped)} when it was mapped; it was "
                             f"cut short or rewritten while being read: rebuild with mmdata preprocess "
                             f"({worker_name()})")


def pread(fd: int, url: str, offset: int, size: int) -> bytes:
    try:
        data = os.pread(fd, size, offset)
    except OSError as e:
        raise ShardReadError(f"shard {url}: reading byte range [{offset}, {offset + size}) failed: {e} "
                             f"({worker_name()})") from None
    if len(data) != size:
        raise truncated(url, offset, offset + size, f"it has {os.fstat(fd).st_size} bytes")
    return data


def fetch_range(fs, path: str, url: str, start: int, end: int) -> bytes:
    """cat_file, except that a range starting past the object's end (HTTP 416, which fsspec stores
    report as EINVAL) is a truncated shard, not something to retry."""
    try:
        return exact_range(fs.cat_file(path, start=start, end=end), start, end)
    except OSError as e:
        if e.errno != errno.EINVAL or "range" not in str(e).lower():
            raise
        raise truncated(url, start, end, f"the range is not satisfiable ({e})") from None


def exact_range(data: bytes, start: int, end: int) -> bytes:
    """More bytes than the range asked for is an answer that ignored the range (a proxy, a misbehaving
    server): worth another try, unlike fewer (the object ends there: a truncated shard)."""
    if len(data) > end - start:
        raise OSError(f"{len(data)} bytes came back for a range of {end - start}: the server ignored the range")
    return data


def settle(future: futures.Future, task: asyncio.Task) -> None:
    """``task``'s outcome into ``future`` (unless it was cancelled meanwhile, from the reader's thread)."""
    try:
        if task.cancelled():
            future.cancel()
        elif task.exception() is not None:
            future.set_exception(task.exception())
        else:
            future.set_result(task.result())
    except futures.InvalidStateError:
        pass


def retryable(url: str, what: str, error: Exception) -> str:
    """The message of an error worth another try; raises the final ones (a missing object, a truncated
    shard) as the ShardReadError the read ends with."""
    if isinstance(error, FileNotFoundError):
        raise ShardReadError(f"shard {url} does not exist ({what}; {worker_name()})") from None
    if isinstance(error, ShardReadError):
        raise error
    return str(error) if isinstance(error, _Stalled) else f"{type(error).__name__}: {error}"


def out_of_attempts(url: str, what: str, attempts: int, last: str) -> ShardReadError:
    return ShardReadError(f"shard {url}: {what} failed after {attempts} attempts ({worker_name()}); "
                          f"last error: {last}")


def stalled_message(timeout_s: float) -> str:
    return f"timeout: stalled for more than {timeout_s:g} s"


def download(fs, path: str, dest: Path, size: int, cancel: threading.Event, claim: Path | None = None) -> None:
    """Copy a whole object to ``dest`` through a temporary file: a partial download never has the final name.
    The ``claim`` file is touched as chunks arrive: a download that stops making progress loses its claim."""
    tmp = storage.temp_path(dest)
    try:
        written = 0
        with fs.open(path, "rb") as src, open(tmp, "wb") as out:
            while chunk := src.read(DOWNLOAD_CHUNK):
                if cancel.is_set():   # the reader gave up on this attempt
                    return
                if written + len(chunk) > size:   # not the shard dataset.json describes: stop reading it
                    raise OSError(f"the object holds more than the {size} bytes dataset.json gives its shard")
                out.write(chunk)
                written += len(chunk)
                if claim is not None:
                    touch(claim)
        if written != size:
            raise OSError(f"downloaded {written} bytes, expected {size}")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def too_big_to_cache(url: str, size: int, cache_bytes: int) -> ShardReadError:
    return ShardReadError(f"shard {url} is {size} bytes, more than read.cache_bytes={cache_bytes}: it cannot be "
                          f"cached; raise loader.read.cache_bytes or unset loader.read.cache_dir ({worker_name()})")


def take_claim(claim: Path, stale_after: float) -> bool:
    """Claim the download of a shard for this process (create ``claim`` exclusively); False when another
    live download holds it. A claim whose process is gone (same machine) or that has not been touched for
    ``stale_after`` seconds (its downloader hung or its machine died) is taken over."""
    for _ in range(2):
        try:
            fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if not claim_is_stale(claim, stale_after):
                return False
            claim.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{socket.gethostname()} {os.getpid()}\n")
        return True
    return False


def claim_is_stale(claim: Path, stale_after: float) -> bool:
    try:
        st = claim.stat()
        if not stat.S_ISREG(st.st_mode):       # a FIFO would block the read below for ever
            return False
        age = time.time() - st.st_mtime
        owner = claim.read_text(errors="replace").split()
    except OSError:                            # gone meanwhile, or not a file: not ours to take
        return False
    here = len(owner) == 2 and owner[0] == socket.gethostname() and owner[1].isdigit() and len(owner[1]) <= 9
    if here and not storage.process_alive(int(owner[1])):
        return True
    return age > stale_after                   # a claim being written, or unreadable, expires by age alone


def others_claims(folder: Path, mine: set[str], stale_after: float) -> list[str]:
    """The live download claims in the cache folder that are not among ``mine`` (names)."""
    try:
        names = [e.name for e in os.scandir(folder) if e.name.endswith(".claim") and e.name not in mine]
    except FileNotFoundError:
        return []
    return [n for n in names if not claim_is_stale(folder / n, stale_after)]


def claim_path(path: Path) -> Path:
    """The claim file of a cached shard's download: a dot file beside it, so eviction leaves it alone."""
    return path.with_name(f".{path.name}.claim")


def cached_shards(folder: Path) -> list[tuple[int, str, int]]:
    """(mtime_ns, name, size) of the shards in the cache folder; partial downloads and claims (dot files)
    are not shards. Other workers evict too, so files may vanish while this looks."""
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return []
    shards = []
    for entry in entries:
        if entry.name.startswith("."):
            continue
        try:
            st = entry.stat()
        except FileNotFoundError:
            continue
        shards.append((st.st_mtime_ns, entry.name, st.st_size))
    return shards


def make_room(folder: Path, needed: int, cache_bytes: int) -> None:
    """Evict least recently used shards until ``needed`` more bytes fit. Other workers share the folder
    and evict too, so files may vanish at any point; their partial downloads (dot files) are left alone."""
    entries = cached_shards(folder)
    total = sum(size for _, _, size in entries)
    for _, name, size in sorted(entries):
        if total + needed <= cache_bytes:
            break
        (folder / name).unlink(missing_ok=True)
        total -= size
