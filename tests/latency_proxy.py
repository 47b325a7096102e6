"""An HTTP proxy on loopback that adds latency per request and injects faults: object storage at cloud
distance, for tests and `make bench-loader`.

    client (s3fs, endpoint_url=proxy.url) -> LatencyProxy -> upstream (moto's S3 server)

Every request waits ``delay_s`` before it is forwarded (a round trip to a far region). ``faults`` is a queue
of what the next ranged GETs meet, one each: ``"stall"`` (no answer for ``stall_s``), ``"503"`` (S3's
SlowDown), ``"403"`` (AccessDenied, as to an expired signature), ``"norange"`` (forwarded without its Range
header: the whole object comes back), ``"reset"`` (half the body, then the connection is cut). It counts
requests and body bytes sent, so a test can check what a reader fetched.

``ProxyProcess`` runs one in a process of its own (``python latency_proxy.py UPSTREAM --delay-ms 20``), as a
benchmark wants: a far server's work is not done under the reader's GIL. Its counts are read over HTTP
(``GET /__counts``, ``POST /__reset``: not forwarded, not counted). With ``memory=True`` (the benchmark's)
that process runs ``MemoryProxy`` instead: the same delay and counts, no faults, on an asyncio server,
and a GET of an object is answered from its memory after one whole GET of it from upstream. moto answers
about 160 requests/s in its one interpreter whatever the cores (measured), and http.server spends about
0.45 ms of CPU on each request: ceilings and costs a far object store does not put on the reader's
machine, which would set the rate of any reader making many requests. Every other request (HEAD,
listings, uploads) goes upstream; an upload or delete drops the copy.
"""

from __future__ import annotations

import asyncio
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
INVALID_RANGE = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InvalidRange</Code>'
                 b'<Message>The requested range is not satisfiable</Message></Error>')
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
KEPT = {"etag", "last-modified", "content-type", "accept-ranges", "x-amz-request-id"}   # of an object held


class LatencyProxy:
    def __init__(self, upstream: str, delay_s: float = 0.02, stall_s: float = 30.0):
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port)
        self.delay_s, self.stall_s = delay_s, stall_s
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
        status, headers, data = upstream_request(self.upstream, handler.command, handler.path,
                                                 dict(handler.headers.items()), body, dropped)
        if fault == "reset":
            self.cut_short(handler, status, headers, data)
            return
        self.answer(handler, status, headers, data, head=handler.command == "HEAD")

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


def ranged_answer(headers: dict, data: bytes, ranged: str | None) -> tuple[int, dict, bytes]:
    """(status, headers, body) of a GET of an object held in memory, with its Range header (or None)."""
    if not ranged:
        return 200, dict(headers), data
    first, _, last = ranged.removeprefix("bytes=").partition("-")
    size = len(data)
    start, end = (size - int(last), size) if not first else (int(first), min(size, int(last or size - 1) + 1))
    if start >= size or start < 0:
        return 416, {"Content-Type": "application/xml"}, INVALID_RANGE
    return 206, {**headers, "Content-Range": f"bytes {start}-{end - 1}/{size}"}, data[start:end]


def upstream_request(upstream: tuple, method: str, path: str, headers: dict, body: bytes | None,
                     dropped: tuple = ()) -> tuple[int, dict, bytes]:
    """One request to upstream on a connection of its own: (status, headers to pass on, body)."""
    connection = http.client.HTTPConnection(*upstream, timeout=60)
    try:
        connection.request(method, path, body=body, headers={k: v for k, v in headers.items()
                                                             if k.lower() not in ("connection", "expect", *dropped)})
        response = connection.getresponse()
        data = response.read()
        passed = {k: v for k, v in response.getheaders()
                  if k.lower() not in ("transfer-encoding", "connection", "content-length")}
        if method == "HEAD":
            passed["Content-Length"] = response.getheader("Content-Length", "0")
        return response.status, passed, data
    finally:
        connection.close()


class MemoryProxy:
    """The benchmark's proxy: LatencyProxy's delay, counts and memory of objects, without its faults, on an
    asyncio server. http.server parses each request's headers through the email package, about 0.45 ms of
    CPU a request on these machines; this spends about a quarter of that, and a far store's CPU is not the
    reader's. Requests other than object GETs go upstream from a thread."""

    def __init__(self, upstream: str, delay_s: float):
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port)
        self.delay_s = delay_s
        self.objects: dict[str, tuple[dict, bytes]] = {}
        self.requests = self.body_bytes = 0

    async def serve(self, announce) -> None:
        server = await asyncio.start_server(self.connection, "127.0.0.1", 0, backlog=1024)
        announce(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
        async with server:
            await server.serve_forever()

    async def connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
                method, target, _ = head[0].split(" ", 2)
                headers = dict(line.split(":", 1) for line in head[1:] if ":" in line)
                headers = {k.strip(): v.strip() for k, v in headers.items()}
                lower = {k.lower(): v for k, v in headers.items()}
                length = int(lower.get("content-length") or 0)
                if lower.get("expect", "").lower() == "100-continue":   # botocore's uploads wait for it
                    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                body = await reader.readexactly(length) if length else None
                status, answer, data = await self.answer(method, target, headers, lower, body)
                lines = [f"HTTP/1.1 {status} {http.client.responses.get(status, '')}"]
                lines += [f"{k}: {v}" for k, v in answer.items()]
                if method != "HEAD":
                    lines.append(f"Content-Length: {len(data)}")
                writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
                if method != "HEAD":
                    writer.write(data)
                await writer.drain()
                if lower.get("connection", "").lower() == "close":
                    break
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ValueError):
            pass
        finally:
            writer.close()

    async def answer(self, method: str, target: str, headers: dict, lower: dict, body: bytes | None):
        if target in ("/__counts", "/__reset"):
            if target == "/__reset":
                self.requests = self.body_bytes = 0
            return 200, {}, json.dumps({"requests": self.requests, "body_bytes": self.body_bytes,
                                        "objects": len(self.objects)}).encode()
        await asyncio.sleep(self.delay_s)
        self.requests += 1
        loop = asyncio.get_running_loop()
        key = object_key(target)
        if method == "GET" and key is not None:
            if key not in self.objects:
                status, kept, data = await loop.run_in_executor(
                    None, upstream_request, self.upstream, "GET", target, headers, None, ("range",))
                if status != 200:
                    return status, {"Content-Type": "application/xml"}, data
                self.objects[key] = ({k: v for k, v in kept.items() if k.lower() in KEPT}, data)
            status, answer, data = ranged_answer(*self.objects[key], lower.get("range"))
        else:
            if method not in ("GET", "HEAD"):
                self.objects.pop(urlsplit(target).path, None)
            status, answer, data = await loop.run_in_executor(
                None, upstream_request, self.upstream, method, target, headers, body)
        if method != "HEAD":
            self.body_bytes += len(data)
        return status, answer, data


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
    parser.add_argument("--memory", action="store_true", help="MemoryProxy: object GETs from memory (see above)")
    args = parser.parse_args()
    if args.memory:
        asyncio.run(MemoryProxy(args.upstream, args.delay_s).serve(announce=lambda url: print(url, flush=True)))
    else:
        proxy = LatencyProxy(args.upstream, delay_s=args.delay_s)
        print(proxy.url, flush=True)
        proxy.server.serve_forever()
