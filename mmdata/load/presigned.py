"""S3 GETs through presigned URLs and urllib3: a range request for about a quarter of s3fs's CPU.

    s3://bucket/key --(s3fs, once per shard and RESIGN_S)--> https://.../key?X-Amz-Signature=...
                    --(urllib3, a pooled keep-alive connection)--> GET, Range: bytes=a-b

s3fs spends 4-5 ms of CPU on each request (botocore builds, signs and parses it: user agent, headers,
timestamps); a loader that reads samples by range makes thousands, and on the same cores as decoding
that CPU sets its rate. A presigned URL is signed once and then any range of the object is a plain HTTP
GET, about 1 ms (docs/performance.md). Credentials, endpoints and regions stay s3fs's: it signs.

Used only where the URL says all the request must say: storage options that add headers or parameters
to a GET (requester pays, customer-side encryption keys, object versions), custom TLS settings and
proxies from the environment keep s3fs for every request, as does ``loader.read.presigned: false``.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import Iterator

import urllib3

from mmdata import storage

RESIGN_S = 600           # a signature older than this is renewed before use (temporary credentials expire)
EXPIRES_S = 3600         # what a presigned URL asks for; the credentials' own expiry may cut it shorter
ERROR_BODY_BYTES = 1024  # of an error answer, kept for the message
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
    only the signing, and no proxy in the environment (botocore honours one; urllib3's pool would not)."""
    if not url.startswith(("s3://", "s3a://")):
        return False
    if not set(storage_options) <= SIGNING_OPTIONS:
        return False
    if not set(storage_options.get("client_kwargs") or {}) <= CLIENT_OPTIONS:
        return False
    if not set(storage_options.get("config_kwargs") or {}) <= CONFIG_OPTIONS:
        return False
    return not any(os.environ.get(name) or os.environ.get(name.lower()) for name in PROXY_VARIABLES)


class PresignedGets:
    """GETs of S3 objects for one process: its signed URLs and its connection pool (both made lazily in
    the process that uses them; a forked child makes its own)."""

    def __init__(self, storage_options: dict, connections: int):
        self.storage_options = storage_options
        self.connections = connections
        self._signed: dict[str, tuple[str, float]] = {}   # s3 url -> (presigned url, when it was signed)
        self._pool: urllib3.PoolManager | None = None
        self._pid = 0
        self._lock = threading.Lock()

    def get_range(self, url: str, start: int, end: int, timeout_s: float) -> bytes:
        """Bytes [start, end) of the object. Raises FileNotFoundError (no such object), RangeNotSatisfiable
        (it ends before ``start``) or OSError (anything worth another try: throttling, 5xx, resets)."""
        response = self._get(url, {"Range": f"bytes={start}-{end - 1}"}, timeout_s)
        try:
            if response.status != 206:
                raise OSError(f"HTTP {response.status} to a range request (the server ignored the range)")
            length = response.headers.get("Content-Length")
            if length is not None and int(length) != end - start:
                raise OSError(f"HTTP 206 with {length} bytes for a range of {end - start}")
            return response.read()
        finally:
            response.release_conn()

    @contextlib.contextmanager
    def stream(self, url: str, timeout_s: float) -> Iterator[urllib3.BaseHTTPResponse]:
        """The whole object as a stream (``read(n)``): a shard download in one request, not one per chunk."""
        response = self._get(url, {}, timeout_s)
        try:
            if response.status != 200:
                raise OSError(f"HTTP {response.status} to a GET of the whole object")
            yield response
        finally:
            response.release_conn()   # a connection with unread data is not reused: urllib3 sees it readable

    def _get(self, url: str, headers: dict, timeout_s: float) -> urllib3.BaseHTTPResponse:
        timeout = urllib3.Timeout(connect=timeout_s, read=timeout_s)
        for renewed in (False, True):
            signed = self._signed_url(url, renew=renewed)
            response = self._connections().request("GET", signed, headers=headers, timeout=timeout, retries=False,
                                                   redirect=False, preload_content=False)
            if response.status < 300:
                return response
            detail = response.read(ERROR_BODY_BYTES, decode_content=False)
            response.release_conn()
            if response.status == 403 and not renewed:
                continue          # expired credentials behind the signature: sign again, once
            if response.status == 404:
                raise FileNotFoundError(url)
            if response.status == 416:
                raise RangeNotSatisfiable(f"HTTP 416: {error_code(detail)}")
            raise OSError(f"HTTP {response.status}: {error_code(detail)}")
        raise AssertionError("unreachable")

    def _signed_url(self, url: str, renew: bool) -> str:
        signed = self._signed.get(url)
        if signed is None or renew or time.monotonic() - signed[1] > RESIGN_S:
            fs, path = storage.filesystem(url, self.storage_options)
            signed = self._signed[url] = (fs.url(path, expires=EXPIRES_S), time.monotonic())
        return signed[0]

    def _connections(self) -> urllib3.PoolManager:
        with self._lock:
            if self._pool is None or self._pid != os.getpid():
                # a keep-alive connection kept for each thread that can be requesting at once; a thread beyond
                # those (one started after an attempt stalled) gets a connection that is closed after use
                self._pool = urllib3.PoolManager(num_pools=16, maxsize=self.connections, block=False,
                                                 ca_certs=os.environ.get("AWS_CA_BUNDLE") or None)
                self._pid = os.getpid()
            return self._pool

    def close(self) -> None:
        with self._lock:
            if self._pool is not None and self._pid == os.getpid():
                self._pool.clear()
            self._pool = None


class RangeNotSatisfiable(OSError):
    """The object ends before the range starts (HTTP 416): a truncated shard, not worth another try."""


def error_code(body: bytes) -> str:
    """S3's error code from an XML error answer (<Code>SlowDown</Code>), else the start of the body."""
    text = body.decode("utf-8", "replace")
    if "<Code>" in text and "</Code>" in text:
        return text.split("<Code>", 1)[1].split("</Code>", 1)[0][:100]
    return text[:200].strip() or "no body"
