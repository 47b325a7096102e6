"""A partition's files are read a few rows ahead by input.read_threads threads, so a URL's latency overlaps
the encoding; the shards and errors are the same whatever the thread count."""

from __future__ import annotations

import functools
import json
import threading
import time
from http.server import ThreadingHTTPServer

import pytest

from helpers import RangeRequestHandler, dataset_files, preprocess_config
from mmdata.prep.pipeline import preprocess


class SlowHandler(RangeRequestHandler):
    """Static files after 50 ms, as a distant web server answers; counts the requests in flight at once."""
    lock = threading.Lock()
    in_flight = 0
    most_in_flight = 0

    def do_GET(self):
        cls = type(self)
        with cls.lock:
            cls.in_flight += 1
            cls.most_in_flight = max(cls.most_in_flight, cls.in_flight)
        try:
            time.sleep(0.05)
            super().do_GET()
        finally:
            with cls.lock:
                cls.in_flight -= 1


@pytest.fixture()
def slow_server(demo_dir):
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(SlowHandler, directory=str(demo_dir)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def url_manifest(demo_dir, url: str, path):
    rows = [json.loads(line) for line in (demo_dir / "manifest.jsonl").read_text().splitlines()][:24]
    rows = [{"id": r["id"], "text": r.get("text"), "image": f"{url}/{r['image']}" if r.get("image") else None}
            for r in rows]
    rows[5]["image"] = f"{url}/images/no-such-file.jpg"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("threads, overlapping", [(1, False), (8, True)])
def test_files_are_read_ahead_by_read_threads_with_the_same_bytes_and_errors(demo_dir, slow_server, tmp_path,
                                                                              threads, overlapping):
    manifest = url_manifest(demo_dir, slow_server, tmp_path / "m.jsonl")
    SlowHandler.most_in_flight = 0
    result = preprocess(preprocess_config(manifest, tmp_path / "out", f"input.read_threads={threads}",
                                          "input.file_identity=name"), log=lambda _: None)
    assert (SlowHandler.most_in_flight > 1) == overlapping
    assert SlowHandler.most_in_flight <= threads
    assert result.totals.errors_by_reason == {"missing_file": 1}
    reference = preprocess(preprocess_config(manifest, tmp_path / "ref", "input.read_threads=1",
                                             "input.file_identity=name"), log=lambda _: None)
    # the same fingerprint (read_threads is not an output setting) and files; dataset.json records the config
    assert result.fingerprint == reference.fingerprint
    without_description = lambda files: {k: v for k, v in files.items() if k != "dataset.json"}  # noqa: E731
    assert without_description(dataset_files(result.dataset)) == without_description(dataset_files(reference.dataset))
