"""An HTTP proxy on loopback that adds latency per request and injects faults: object storage at cloud
distance, for tests and `make bench-loader`.

    client (s3fs, endpoint_url=proxy.url) -> LatencyProxy -> upstream (moto's S3 server)

Every request waits ``delay_s`` before it is forwarded (a round trip to a far region). ``faults`` is a queue
of what the next ranged GETs meet, one each: ``"stall"`` (no answer for ``stall_s``), ``"503"`` (S3's
SlowDown), ``"403"`` (AccessDenied, as to an expired signature), ``"norange"`` (forwarded without its Range
header: the whole object comes back), ``"reset"`` (half the body, then the connection is cut). It counts requests and body bytes
sent, so a test can check what a reader fetched.

With ``memory=True`` (the benchmark's), a GET of an object is answered from the proxy's memory after one
whole GET of it from upstream: moto answers about 160 requests/s in its one interpreter whatever the
cores (measured), a ceiling that S3 does not have and that would set the rate of any reader making many
requests. Every other request (HEAD, listings, uploads) goes upstream; an upload or delete drops the copy.

``ProxyProcess`` runs one in a process of its own (``python latency_proxy.py UPSTREAM --delay-ms 20``), as a
benchmark wants: a far server's work is not done under the reader's GIL. Its counts are read over HTTP
(``GET /__counts``, ``POST /__reset``: not forwarded, not counted).
"""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import struct
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit

SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
             b'<Message>Please reduce your request rate.</Message></Error>')
ACCESS_DENIED = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code>'
                 b'<Message>Request has expired</Message></Error>')


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True
    # socketserver's default backlog is 5: a reader opening dozens of connections at once would have
    # SYNs dropped and wait a second for each retransmission, which no object store makes it do
    request_queue_size = 1024

    def handle_error(self, request, client_address) -> None:
        pass   # a connection the proxy cut on purpose, or a client gone: nothing to report


# query parameters of a plain object GET (a presigned URL's, an SDK's); any other (list-type, uploads...) goes upstream
SIGNING_PARAMETERS = {"AWSAccessKeyId", "Signature", "Expires", "x-id"}
KEPT_HEADERS = ("ETag", "Last-Modified", "Content-Type", "Accept-Ranges", "x-amz-request-id")


class LatencyProxy:
    def __init__(self, upstream: str, delay_s: float = 0.02, stall_s: float = 30.0, memory: bool = False):
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port)
        self.delay_s, self.stall_s = delay_s, stall_s
        self.memory = memory
        self.objects: dict[str, tuple[dict, bytes]] = {}   # path -> (headers, body) of objects read once
        self.faults: deque[str] = deque()
        self.requests = 0
        self.ranged_requests = 0
        self.body_bytes = 0
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # the body's last segment must not wait for the client's delayed ACK of the headers' (Nagle):
            # that adds 40 ms to a request on loopback, twice the latency the proxy is there to add
            disable_nagle_algorithm = True

            def log_message(self, *args) -> None:
                pass

            def do_GET(self):
                proxy.forward(self)

            do_HEAD = do_PUT = do_POST = do_DELETE = do_GET

        self.server = QuietServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "LatencyProxy":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def reset_counts(self) -> None:
        with self.lock:
            self.requests = self.ranged_requests = self.body_bytes = 0

    def forward(self, handler: BaseHTTPRequestHandler) -> None:
        if handler.path in ("/__counts", "/__reset"):
            if handler.path == "/__reset":
                self.reset_counts()
            with self.lock:
                counts = {"requests": self.requests, "body_bytes": self.body_bytes}
            handler.send_response(200)
            data = json.dumps(counts).encode()
            handler.send_header("Content-Length", str(len(data)))
            handler.end_headers()
            handler.wfile.write(data)
            return
        time.sleep(self.delay_s)
        ranged = handler.command == "GET" and "Range" in handler.headers
        fault = None
        with self.lock:
            self.requests += 1
            self.ranged_requests += ranged
            if ranged and self.faults:
                fault = self.faults.popleft()
        if fault == "stall":
            time.sleep(self.stall_s)
            handler.close_connection = True
            return
        if fault == "503":
            self.answer(handler, 503, {"Content-Type": "application/xml"}, SLOW_DOWN)
            return
        if fault == "403":
            self.answer(handler, 403, {"Content-Type": "application/xml"}, ACCESS_DENIED)
            return
        dropped = ("range",) if fault == "norange" else ()
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else None
        if self.memory:
            key = object_key(handler.path)
            if handler.command == "GET" and key is not None and fault is None:
                self.answer(handler, *self.from_memory(key, handler))
                return
            if handler.command not in ("GET", "HEAD"):
                self.objects.pop(urlsplit(handler.path).path, None)
        upstream = http.client.HTTPConnection(*self.upstream, timeout=60)
        try:
            upstream.request(handler.command, handler.path, body=body,
                             headers={k: v for k, v in handler.headers.items()
                                      if k.lower() not in ("connection", *dropped)})
            response = upstream.getresponse()
            data = response.read()
            headers = {k: v for k, v in response.getheaders()
                       if k.lower() not in ("transfer-encoding", "connection", "content-length")}
            if handler.command == "HEAD":
                headers["Content-Length"] = response.getheader("Content-Length", "0")
        finally:
            upstream.close()
        if fault == "reset":
            self.cut_short(handler, response.status, headers, data)
            return
        self.answer(handler, response.status, headers, data, head=handler.command == "HEAD")

    def from_memory(self, key: str, handler: BaseHTTPRequestHandler) -> tuple[int, dict, bytes]:
        """(status, headers, body) of a GET of object ``key``: fetched whole once (as the request asked for
        it, less its range), then sliced."""
        ranged = handler.headers.get("Range")
        if key not in self.objects:
            upstream = http.client.HTTPConnection(*self.upstream, timeout=60)
            try:
                upstream.request("GET", handler.path, headers={k: v for k, v in handler.headers.items()
                                                               if k.lower() not in ("connection", "range")})
                response = upstream.getresponse()
                data = response.read()
                if response.status != 200:   # NoSuchKey and the like: passed on, not kept
                    return response.status, {"Content-Type": "application/xml"}, data
                kept = {k: response.getheader(k) for k in KEPT_HEADERS if response.getheader(k)}
            finally:
                upstream.close()
            self.objects[key] = (kept, data)
        headers, data = self.objects[key]
        if not ranged:
            return 200, dict(headers), data
        first, _, last = ranged.removeprefix("bytes=").partition("-")
        size = len(data)
        start, end = (size - int(last), size) if not first else (int(first), min(size, int(last or size - 1) + 1))
        if start >= size or start < 0:
            return 416, {"Content-Type": "application/xml"}, (
                b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InvalidRange</Code>'
                b'<Message>The requested range is not satisfiable</Message></Error>')
        return 206, {**headers, "Content-Range": f"bytes {start}-{end - 1}/{size}"}, data[start:end]

    def answer(self, handler, status: int, headers: dict, data: bytes, head: bool = False) -> None:
        handler.send_response(status)
        for k, v in headers.items():
            handler.send_header(k, v)
        if not head:
            handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        if not head:
            handler.wfile.write(data)
            with self.lock:
                self.body_bytes += len(data)

    def cut_short(self, handler, status: int, headers: dict, data: bytes) -> None:
        """Headers promising the whole body, half of it, then a reset (RST, not a clean close)."""
        handler.send_response(status)
        for k, v in headers.items():
            handler.send_header(k, v)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data[: len(data) // 2])
        handler.wfile.flush()
        handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        handler.close_connection = True
        handler.connection.close()


def object_key(path: str) -> str | None:
    """The /bucket/key of a plain object GET, or None (a listing, a bucket, an upload's parts...)."""
    parts = urlsplit(path)
    if parts.path.count("/") < 2 or parts.path.endswith("/"):
        return None
    names = {name for name, _ in parse_qsl(parts.query, keep_blank_values=True)}
    if any(name not in SIGNING_PARAMETERS and not name.startswith("X-Amz-") for name in names):
        return None
    return parts.path


class ProxyProcess:
    """A LatencyProxy in a child process, with the same url, reset_counts, requests and body_bytes."""

    def __init__(self, upstream: str, delay_s: float = 0.02, memory: bool = False):
        self.process = subprocess.Popen([sys.executable, __file__, upstream, "--delay-s", str(delay_s),
                                         *(["--memory"] if memory else [])], stdout=subprocess.PIPE, text=True)
        self.url = self.process.stdout.readline().strip()
        if not self.url.startswith("http://"):
            self.process.kill()
            raise RuntimeError("the latency proxy did not start")

    def __enter__(self) -> "ProxyProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)

    def counts(self, path: str = "/__counts") -> dict:
        address = self.url.removeprefix("http://").split(":")
        connection = http.client.HTTPConnection(address[0], int(address[1]), timeout=30)
        try:
            connection.request("POST" if path == "/__reset" else "GET", path)
            return json.loads(connection.getresponse().read())
        finally:
            connection.close()

    def reset_counts(self) -> None:
        self.counts("/__reset")

    @property
    def requests(self) -> int:
        return self.counts()["requests"]

    @property
    def body_bytes(self) -> int:
        return self.counts()["body_bytes"]


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description="a latency-adding HTTP proxy in front of UPSTREAM")
    parser.add_argument("upstream")
    parser.add_argument("--delay-s", type=float, default=0.02)
    parser.add_argument("--memory", action="store_true", help="answer object GETs from memory (see above)")
    args = parser.parse_args()
    proxy = LatencyProxy(args.upstream, delay_s=args.delay_s, memory=args.memory)
    print(proxy.url, flush=True)
    proxy.server.serve_forever()
