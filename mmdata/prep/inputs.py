"""One way in for every input file a row refers to: a byte cap, a timeout, and nothing but regular files or URLs.

    read_input(ref, max_bytes, settings) -> bytes  |  SampleError(reason)

    local path  -> open without blocking -> fstat: a regular file?  (not_regular_file)
                -> size over the cap?                              (file_too_large)
                -> read at most cap + 1 bytes (a file that grows is caught too)
    URL         -> fsspec with connect/read timeouts -> size over the cap? -> read at most cap + 1 bytes,
                   within a total deadline (timeout), retried a bounded number of times (transient errors only)

A FIFO, a device (/dev/zero, /dev/urandom), a socket or a directory is
refused before a byte is read, so no row can make a worker hang or read
without end. Memory per input is bounded by its cap.
"""

from __future__ import annotations

import concurrent.futures
import os
import stat
import time
from dataclasses import dataclass, field

from mmdata import storage
from mmdata.schema import SampleError, one_line

READ_CHUNK = 1 << 20
# Threads that run URL reads so that a read can be given up at its deadline. A read that hangs past it
# keeps its thread until the protocol's own timeouts (set below) end it.
_URL_THREADS = 8
_url_pool: concurrent.futures.ThreadPoolExecutor | None = None


@dataclass(frozen=True)
class ReadSettings:
    """How URLs are read: fsspec options, a total deadline per attempt, bounded retries."""
    storage_options: dict = field(default_factory=dict)
    timeout_s: float = 30.0
    retries: int = 2


def read_input(ref: str, max_bytes: int, settings: ReadSettings) -> bytes:
    """The bytes of a local file or URL, at most ``max_bytes``; a SampleError with a reason otherwise."""
    if storage.is_local(ref):
        return read_local(str(storage.local_path(ref)), max_bytes)
    return read_url(ref, max_bytes, settings)


def read_local(path: str, max_bytes: int) -> bytes:
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; regular files ignore it
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    except FileNotFoundError:
        raise SampleError("missing_file", f"file {path} does not exist") from None
    except OSError as e:
        raise SampleError("unreadable_file", f"cannot open {path}: {e.strerror or e}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise SampleError("not_regular_file", f"{path} is a {file_kind(info.st_mode)}, not a regular file; "
                                                  "only regular files and URLs are read")
        if info.st_size > max_bytes:
            raise too_large(path, f"{info.st_size} bytes", max_bytes)
        data = read_capped(lambda n: os.read(fd, n), max_bytes)
    except OSError as e:
        raise SampleError("unreadable_file", f"cannot read {path}: {e.strerror or e}") from None
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise too_large(path, "more bytes than that (it grew while read)", max_bytes)
    return data


def read_capped(read, max_bytes: int) -> bytes:
    """Chunks from ``read(n)`` until it returns nothing or more than ``max_bytes`` bytes were read."""
    parts, total = [], 0
    while total <= max_bytes:
        chunk = read(min(READ_CHUNK, max_bytes + 1 - total))
        if not chunk:
            break
        parts.append(chunk)
        total += len(chunk)
    return b"".join(parts)


def file_kind(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO (named pipe)"), (stat.S_ISCHR, "character device"),
             (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket"))
    return next((name for test, name in kinds if test(mode)), "special file")


def too_large(ref: str, found: str, max_bytes: int) -> SampleError:
    return SampleError("file_too_large", f"{ref} is {found}, over the cap of {max_bytes} bytes for this modality "
                                         "(raise image.max_bytes / audio.max_bytes if it is legitimate)")


def read_url(url: str, max_bytes: int, settings: ReadSettings) -> bytes:
    try:
        fs, path = storage.filesystem(url, with_timeouts(url, settings))
    except (ImportError, ValueError) as e:
        raise SampleError("unsupported_url", f"cannot read {url}: {one_line(e)}; expected a local path or an "
                                             "http(s)://, s3:// (or other installed fsspec) URL") from None
    for attempt in range(settings.retries + 1):
        future = url_pool().submit(fetch, fs, path, url, max_bytes)
        try:
            return future.result(timeout=settings.timeout_s)
        except concurrent.futures.TimeoutError:
            future.cancel()
            failure = SampleError("timeout", f"reading {url} took over input.timeout_s={settings.timeout_s} s "
                                             f"({attempt + 1} attempts)")
        except FileNotFoundError:
            raise SampleError("missing_file", f"{url} does not exist") from None
        except SampleError:
            raise
        except Exception as e:   # network errors of any library: transient until proven otherwise
            failure = SampleError("unreadable_file", f"cannot read {url}: {type(e).__name__}: {one_line(e)} "
                                                     f"({attempt + 1} attempts)")
        if attempt < settings.retries:
            time.sleep(0.5 * (attempt + 1))
    raise failure


def fetch(fs, path: str, url: str, max_bytes: int) -> bytes:
    size = fs.size(path)
    if size is not None and size > max_bytes:
        raise too_large(url, f"{size} bytes", max_bytes)
    with fs.open(path, "rb") as f:
        data = read_capped(f.read, max_bytes)
    if len(data) > max_bytes:
        raise too_large(url, "more bytes than that", max_bytes)
    return data


def url_pool() -> concurrent.futures.ThreadPoolExecutor:
    global _url_pool
    if _url_pool is None:
        _url_pool = concurrent.futures.ThreadPoolExecutor(_URL_THREADS, thread_name_prefix="mmdata-url")
    return _url_pool


def with_timeouts(url: str, settings: ReadSettings) -> dict:
    """fsspec options with connect/read timeouts for the protocols that take them, unless given already."""
    options = dict(settings.storage_options)
    t = settings.timeout_s
    if url.startswith(("http://", "https://")) and "client_kwargs" not in options:
        try:
            import aiohttp
        except ImportError:   # fsspec's http needs it anyway, and says so
            return options
        options["client_kwargs"] = {"timeout": aiohttp.ClientTimeout(total=t, connect=t, sock_read=t)}
    elif url.startswith(("s3://", "s3a://")) and "config_kwargs" not in options:
        options["config_kwargs"] = {"connect_timeout": t, "read_timeout": t, "retries": {"max_attempts": 1}}
    return options
