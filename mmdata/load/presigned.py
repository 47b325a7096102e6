"""S3 GETs through presigned URLs on one event loop: a range request for a tenth of s3fs's CPU.

    s3://bucket/key --(s3fs, once per shard and RESIGN_S)--> https://.../key?X-Amz-Signature=...
                    --(aiohttp, pooled keep-alive connections, on fsspec's IO loop)--> GET, Range: bytes=a-b

s3fs spends 4-5 ms of CPU on each request (botocore builds, signs and parses it: user agent, headers,
timestamps); a loader that reads samples by range makes thousands, on the cores that decode them. A
presigned URL is signed once, and then any range of the object is a plain HTTP GET: about 0.4 ms of CPU
on one event loop, where the same GET from 32 threads through urllib3 took 1.1 ms (threads contend for
the interpreter lock); docs/performance.md has the figures. Credentials, endpoints and regions stay
s3fs's: it signs, on the same loop.

Used only where the URL says all a GET must say: storage options that add headers or parameters to a GET
(requester pays, customer-side encryption keys, object versions), custom TLS settings and proxies from
the environment keep s3fs for every request, as does ``loader.read.presigned: false``.

The coroutines raise FileNotFoundError (no such object), ObjectTooShort (it ends before the range does)
or OSError (anything worth another try: throttling, 5xx, resets, a wrong length); the caller retries.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import ssl
import time
from pathlib import Path
from typing import Callable

RESIGN_S = 600           # a signature older than this is renewed before use (temporary credentials expire)
EXPIRES_S = 3600         # what a presigned URL asks for; the credentials' own expiry may cut it shorter
ERROR_BODY_BYTES = 1024  # of an error answer, kept for the message
DOWNLOAD_CHUNK = 1 << 20
# storage options that change nothing but how s3fs signs (anything else keeps s3fs for every request)
SIGNING_OPTIONS = {"anon", "key", "secret", "token", "endpoint_url", "profile", "use_ssl", "username", "password",
                   "cache_regions", "default_block_size", "default_fill_cache", "default_cache_type",
                   "skip_instance_cache", "use_listings_cache", "listings_expiry_time", "max_paths",
                   "max_concurrency", "session", "client_kwargs", "config_kwargs"}   # these two: checked below
CLIENT_OPTIONS = {"endpoint_url", "region_name", "aws_access_key_id", "aws_secret_access_key", "aws_session_token"}
CONFIG_OPTIONS = {"signature_version", "s3", "region_name", "connect_timeout", "read_timeout", "retries",
                  "max_pool_connections", "user_agent", "user_agent_extra", "tcp_keepalive"}
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")


def usable(url: str, storage_options: dict) -> bool:
    """Whether GETs of ``url`` may go through a presigned URL: an S3 object, storage options that change
    only the signing, and no proxy in the environment (botocore honours one; this client would not)."""
    if not url.startswith(("s3://", "s3a://")):
        return False
    if not set(storage_options) <= SIGNING_OPTIONS:
        return False
    if not set(storage_options.get("client_kwargs") or {}) <= CLIENT_OPTIONS:
        return False
    if not set(storage_options.get("config_kwargs") or {}) <= CONFIG_OPTIONS:
        return False
    return not any(os.environ.get(name) or os.environ.get(name.lower()) for name in PROXY_VARIABLES)


class ObjectTooShort(OSError):
    """The object ends before the range does (HTTP 416, or a shorter 206): a truncated shard, final."""


class PresignedGets:
    """A reader's presigned GETs: its signed URLs and its bound on requests at once. The HTTP session is the
    process's (``session_here``), made in the process and on the loop that use it."""

    def __init__(self, connections: int):
        """``connections``: the most requests at once."""
        self.connections = connections
        self._signed: dict[str, tuple[str, float]] = {}   # s3 url -> (presigned url, when it was signed)
        self._slots: tuple[tuple[int, asyncio.AbstractEventLoop], asyncio.Semaphore] | None = None
        self._signing: tuple[tuple[int, asyncio.AbstractEventLoop], asyncio.Lock] | None = None

    async def get_range(self, fs, url: str, start: int, end: int, timeout_s: float) -> bytes:
        """Bytes [start, end) of the object (``fs``: its s3fs filesystem, which signs)."""
        response = await self._get(fs, url, {"Range": f"bytes={start}-{end - 1}"}, timeout_s)
        try:
            if response.status != 206:
                raise OSError(f"HTTP {response.status} to a range request: the server ignored the range")
            size = (response.headers.get("Content-Range") or "").rpartition("/")[2]
            if size.isdigit() and int(size) < end:
                raise ObjectTooShort(f"the object has {size} bytes")
            if response.content_length != end - start:
                raise OSError(f"HTTP 206 with {response.content_length} bytes for a range of {end - start}")
            return await response.read()   # Content-Length bytes, no more
        finally:
            response.release()

    async def download(self, fs, url: str, dest: Path, size: int, timeout_s: float,
                       progress: Callable[[], None]) -> None:
        """The whole object into ``dest`` (a temporary file the caller renames), in one GET; ``progress()``
        after each chunk. An object of another size than dataset.json's is not read."""
        response = await self._get(fs, url, {}, timeout_s)
        try:
            if response.status != 200:
                raise OSError(f"HTTP {response.status} to a GET of the whole object")
            if response.content_length != size:
                raise OSError(f"the object has {response.content_length} bytes, dataset.json gives its shard {size}")
            written = 0
            with open(dest, "wb") as out:
                async for chunk in response.content.iter_chunked(DOWNLOAD_CHUNK):
                    out.write(chunk)     # page-cache writes of a megabyte: short enough for the loop
                    written += len(chunk)
                    progress()
            if written != size:
                raise OSError(f"downloaded {written} bytes, expected {size}")
        finally:
            response.release()

    def slot(self) -> asyncio.Semaphore:
        """Held by each request while it runs: at most ``connections`` at once, so that none waits for a
        connection while its time runs."""
        owner = (os.getpid(), asyncio.get_running_loop())
        if self._slots is None or self._slots[0] != owner:
            self._slots = (owner, asyncio.Semaphore(self.connections))
        return self._slots[1]

    async def _get(self, fs, url: str, headers: dict, timeout_s: float):
        import aiohttp
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        for renewed in (False, True):
            signed = await self._signed_url(fs, url, renew=renewed)
            response = await session_here().get(signed, headers=headers, timeout=timeout, allow_redirects=False)
            if response.status < 300:
                return response
            detail = await response.content.read(ERROR_BODY_BYTES)
            response.release()
            if response.status == 403 and not renewed:
                continue          # expired credentials behind the signature: sign again, once
            if response.status == 404:
                raise FileNotFoundError(url)
            if response.status == 416:
                raise ObjectTooShort(f"HTTP 416: {error_code(detail)}")
            raise OSError(f"HTTP {response.status}: {error_code(detail)}")
        raise AssertionError("unreachable")

    async def _signed_url(self, fs, url: str, renew: bool) -> str:
        signed = self._signed.get(url)
        if signed is not None and not renew and time.monotonic() - signed[1] <= RESIGN_S:
            return signed[0]
        # one signature at a time: the requests a plan starts together find the first one's (and a fresh
        # process's first signature makes its botocore client: 0.1 s of CPU that each would pay again)
        async with self._lock_here():
            again = self._signed.get(url)
            if again is None or again is signed or time.monotonic() - again[1] > RESIGN_S:
                path = url.split("://", 1)[1]
                again = self._signed[url] = (await fs._url(path, expires=EXPIRES_S), time.monotonic())
            return again[0]

    def _lock_here(self) -> asyncio.Lock:
        owner = (os.getpid(), asyncio.get_running_loop())
        if self._signing is None or self._signing[0] != owner:
            self._signing = (owner, asyncio.Lock())
        return self._signing[1]


_sessions: dict = {}   # (pid, loop) -> this process's aiohttp session on that loop


def session_here():
    """This process's HTTP session on the running loop, made on first use there. One per process, not per
    reader: it lives until the process exits (closed then, on its loop), so none is collected unclosed."""
    import aiohttp
    owner = (os.getpid(), asyncio.get_running_loop())
    session = _sessions.get(owner)
    if session is None or session.closed:
        cafile = os.environ.get("AWS_CA_BUNDLE")
        context = ssl.create_default_context(cafile=cafile) if cafile else True
        # no limit here: each reader bounds its own requests (``slot``)
        session = _sessions[owner] = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ssl=context), auto_decompress=False)
    return session


@atexit.register
def _close_sessions() -> None:
    """At exit, this process's sessions are closed on their loops while these still run: aiohttp would
    otherwise print "Unclosed client session" as they are collected. A forked child leaves its parent's."""
    for (pid, loop), session in list(_sessions.items()):
        if pid != os.getpid() or session.closed or loop.is_closed() or not loop.is_running():
            continue
        try:
            asyncio.run_coroutine_threadsafe(session.close(), loop).result(timeout=5)
        except Exception:  # noqa: BLE001 - closing at the end: nothing left to tell the user
            pass


def error_code(body: bytes) -> str:
    """S3's error code from an XML error answer (<Code>SlowDown</Code>), else the start of the body."""
    text = body.decode("utf-8", "replace")
    if "<Code>" in text and "</Code>" in text:
        return text.split("<Code>", 1)[1].split("</Code>", 1)[0][:100]
    return text[:200].strip() or "no body"
