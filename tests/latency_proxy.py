"""An HTTP proxy on loopback that adds latency per request and injects faults: object storage at cloud
distance, for tests and `make bench-loader`.

    client (s3fs, endpoint_url=proxy.url) -> LatencyProxy -> upstream (moto's S3 server)

Every request waits ``delay_s`` before it is forwarded (a round trip to a far region). ``faults`` is a queue
of what the next ranged GETs meet, one each: ``"stall"`` (no answer for ``stall_s``), ``"503"`` (S3's
SlowDown), ``"reset"`` (half the body, then the connection is cut). It counts requests and body bytes
sent, so a test can check what a reader fetched.

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
from urllib.parse import urlsplit

SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
             b'<Message>Please reduce your request rate.</Message></Error>')


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        pass   # a connection the proxy cut on purpose, or a client gone: nothing to report


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
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else None
        upstream = http.client.HTTPConnection(*self.upstream, timeout=60)
        try:
            upstream.request(handler.command, handler.path, body=body,
                             headers={k: v for k, v in handler.headers.items() if k.lower() != "connection"})
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


class ProxyProcess:
    """A LatencyProxy in a child process, with the same url, reset_counts, requests and body_bytes."""

    def __init__(self, upstream: str, delay_s: float = 0.02):
        self.process = subprocess.Popen([sys.executable, __file__, upstream, "--delay-s", str(delay_s)],
                                        stdout=subprocess.PIPE, text=True)
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
    args = parser.parse_args()
    proxy = LatencyProxy(args.upstream, delay_s=args.delay_s)
    print(proxy.url, flush=True)
    proxy.server.serve_forever()
