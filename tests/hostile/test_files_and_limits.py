"""Hostile files, URLs, labels, configs and environments: every case ends in a counted reason or one line, the
valid rows are all written, no temp file stays, and nothing hangs or runs out of memory."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from helpers import preprocess_config
from mmdata.cli import main
from mmdata.dataset import load_description
from mmdata.prep.pipeline import preprocess

pytestmark = pytest.mark.timeout(120)

GOOD_ROWS = 6   # valid demo rows written next to every hostile one


def demo_rows(demo_dir: Path, n: int = GOOD_ROWS) -> list[dict]:
    rows = [json.loads(line) for line in (demo_dir / "manifest.jsonl").read_text().splitlines()]
    full = [r for r in rows if r.get("text") and r.get("image") and r.get("audio")][:n]
    return [{**r, "image": str(demo_dir / r["image"]), "audio": str(demo_dir / r["audio"])} for r in full]


def write_manifest(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run(manifest: Path, root: Path, *overrides: str):
    """preprocess in this process; returns (result, errors.jsonl entries)."""
    result = preprocess(preprocess_config(manifest, root, *overrides), log=lambda _: None)
    errors = [json.loads(line) for line in (Path(result.dataset) / "errors.jsonl").read_text().splitlines()]
    return result, errors


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*.tmp")]


def hostile_row(**fields) -> dict:
    return {"id": "hostile", "text": "a hostile row", "label": "circle", **fields}


@pytest.fixture()
def fifo(tmp_path) -> Path:
    path = tmp_path / "pipe.jpg"
    os.mkfifo(path)
    return path


@pytest.mark.parametrize("modality, target", [
    ("image", "fifo"), ("image", "/dev/zero"), ("audio", "/dev/urandom"), ("image", "directory"),
    ("audio", "fifo"),
])
def test_anything_but_a_regular_file_is_refused_before_it_is_read(demo_dir, tmp_path, fifo, modality, target):
    ref = {"fifo": str(fifo), "directory": str(demo_dir)}.get(target, target)
    manifest = write_manifest(tmp_path / "m.jsonl", [hostile_row(**{modality: ref}), *demo_rows(demo_dir)])
    result, errors = run(manifest, tmp_path / "out")
    assert [(e["id"], e["reason"], e["stage"]) for e in errors] == [("hostile", "not_regular_file", "read")]
    assert result.totals.written == GOOD_ROWS + 1            # the text survives; the modality is dropped
    assert not temp_files(tmp_path / "out")


@pytest.mark.parametrize("modality, cap_key", [("image", "image.max_bytes"), ("audio", "audio.max_bytes")])
def test_a_file_over_its_modalitys_cap_is_not_read(demo_dir, tmp_path, modality, cap_key):
    big = tmp_path / f"big.{'jpg' if modality == 'image' else 'wav'}"
    with open(big, "wb") as f:      # sparse: 3 GB that cost no disk, and would cost 3 GB of memory to read
        f.truncate(3 << 30)
    manifest = write_manifest(tmp_path / "m.jsonl", [hostile_row(**{modality: str(big)}), *demo_rows(demo_dir)])
    result, errors = run(manifest, tmp_path / "out", f"{cap_key}=1000000")
    assert [(e["reason"], e["modality"]) for e in errors] == [("file_too_large", modality)]
    assert cap_key in errors[0]["error"] and result.totals.written == GOOD_ROWS + 1


def test_peak_memory_stays_bounded_by_the_caps(demo_dir, tmp_path, fifo):
    """Under a 4 GB address-space limit, a 3 GB sparse image and audio file, /dev/zero and a FIFO: the run
    completes (reading any of them whole would need more than the limit allows)."""
    big = tmp_path / "big.jpg"
    with open(big, "wb") as f:
        f.truncate(3 << 30)
    rows = [hostile_row(id="a", image=str(big)), hostile_row(id="b", audio=str(big)),
            hostile_row(id="c", image="/dev/zero"), hostile_row(id="d", audio=str(fifo)), *demo_rows(demo_dir)]
    manifest = write_manifest(tmp_path / "m.jsonl", rows)
    config = tmp_path / "c.yaml"
    config.write_text(f"input: {{manifest: {manifest}}}\noutput: {{root: {tmp_path / 'out'}, name: t}}\n"
                      "ray: {executor: serial}\nprogress: false\nmax_error_rate: 1.0\n"
                      "text: {vocab_size: 128}\nimage: {size: 32}\naudio: {n_mels: 32, max_seconds: 2.0}\n")
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30)); "
            "from mmdata.cli import main; sys.exit(main(['preprocess', sys.argv[1]]))")
    done = subprocess.run([sys.executable, "-c", code, str(config)], capture_output=True, text=True, timeout=110)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "errors     file_too_large 2, not_regular_file 2" in done.stdout


class SilentServer:
    """Accepts connections and never answers: what a stuck web server looks like."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.held: list[socket.socket] = []
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}/img.jpg"

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


def test_a_url_that_never_answers_times_out_and_the_run_goes_on(demo_dir, tmp_path):
    server = SilentServer()
    try:
        manifest = write_manifest(tmp_path / "m.jsonl", [hostile_row(image=server.url), *demo_rows(demo_dir)])
        start = time.monotonic()
        result, errors = run(manifest, tmp_path / "out", "input.timeout_s=1", "input.retries=1")
        assert time.monotonic() - start < 60    # a hang would be stopped by the test's timeout instead
    finally:
        server.close()
    assert [(e["reason"], e["stage"]) for e in errors] == [("timeout", "read")]
    assert "input.timeout_s=1" in errors[0]["error"] and result.totals.written == GOOD_ROWS + 1


@pytest.mark.parametrize("url, reason", [
    ("sftp://example.invalid/img.jpg", "unsupported_url"),
    ("git://example.invalid/repo/img.jpg", "unsupported_url"),
    ("nosuchscheme://x/img.jpg", "unsupported_url"),
])
def test_a_url_no_installed_filesystem_can_read_is_a_reason_not_a_traceback(demo_dir, tmp_path, url, reason):
    manifest = write_manifest(tmp_path / "m.jsonl", [hostile_row(image=url), *demo_rows(demo_dir)])
    result, errors = run(manifest, tmp_path / "out")
    assert [e["reason"] for e in errors] == [reason] and result.totals.written == GOOD_ROWS + 1


def test_a_missing_url_is_missing_file(demo_dir, tmp_path, http_server):
    base = http_server(str(demo_dir))
    manifest = write_manifest(tmp_path / "m.jsonl", [hostile_row(image=f"{base}/no-such.jpg"),
                                                     *demo_rows(demo_dir)])
    _, errors = run(manifest, tmp_path / "out", "input.retries=0")
    assert [e["reason"] for e in errors] == ["missing_file"]


@pytest.mark.parametrize("labels, expected", [
    ([1, 1.0, "1", " 1 "], [1, 1, 1, 1]),                     # one class, however it is written
    ([0, 2_000_000_000], [0, 2_000_000_000]),
])
def test_numeric_labels_are_class_ids(demo_dir, tmp_path, labels, expected):
    rows = [{**r, "label": label} for r, label in zip(demo_rows(demo_dir, len(labels)), labels)]
    result, errors = run(write_manifest(tmp_path / "m.jsonl", rows), tmp_path / "out")
    assert errors == [] and load_description(result.dataset).labels is None
    from mmdata.load.catalog import load_catalog
    assert sorted(load_catalog(result.dataset).label.tolist()) == sorted(expected)


@pytest.mark.parametrize("bad", [-1, 10**30, float("nan"), float("inf"), 1.5, True, [1], {"a": 1}, ""])
def test_a_label_that_is_no_class_id_or_name_is_rejected_with_a_reason(demo_dir, tmp_path, bad):
    rows = demo_rows(demo_dir)
    rows[0] = {**rows[0], "id": "bad-label", "label": bad}
    result, errors = run(write_manifest(tmp_path / "m.jsonl", [{**r, "label": i} for i, r in enumerate(rows)][1:]
                                        + [rows[0]]), tmp_path / "out")
    assert [(e["id"], e["reason"]) for e in errors] == [("bad-label", "invalid_label")]
    assert result.totals.written == GOOD_ROWS - 1


def test_named_labels_make_numbers_names_too(demo_dir, tmp_path):
    rows = [{**r, "label": label} for r, label in zip(demo_rows(demo_dir, 4), ["cat", 1, 1.0, "dog"])]
    result, errors = run(write_manifest(tmp_path / "m.jsonl", rows), tmp_path / "out")
    assert errors == [] and load_description(result.dataset).labels == {"1": 0, "cat": 1, "dog": 2}


def test_an_id_equal_to_another_ids_key_still_gets_a_key_of_its_own(demo_dir, tmp_path):
    from mmdata.schema import make_key
    rows = demo_rows(demo_dir, 2)
    rows[0]["id"] = "a.b"
    rows[1]["id"] = make_key("a.b")            # the literal text of the first id's sanitised key
    result, errors = run(write_manifest(tmp_path / "m.jsonl", rows), tmp_path / "out")
    assert errors == [] and result.totals.written == 2
    import webdataset as wds
    shards = [str(p) for p in sorted(Path(result.dataset).glob("*.tar"))]
    assert sorted(s["json"] and json.loads(s["json"])["id"] for s in wds.WebDataset(shards, shardshuffle=False)) \
        == sorted(["a.b", make_key("a.b")])


def test_two_ids_with_one_key_are_caught_not_written_twice(demo_dir, tmp_path, monkeypatch):
    import mmdata.prep.partition as partition
    monkeypatch.setattr(partition, "make_key", lambda sample_id: "same")   # a hash collision, forced
    result, errors = run(write_manifest(tmp_path / "m.jsonl", demo_rows(demo_dir, 3)), tmp_path / "out",
                         "max_error_rate=1.0")
    assert [e["reason"] for e in errors] == ["duplicate_key", "duplicate_key"] and result.totals.written == 1


def test_a_shard_deleted_from_a_finished_dataset_is_restored_on_rerun(demo_dir, tmp_path):
    manifest = write_manifest(tmp_path / "m.jsonl", demo_rows(demo_dir))
    first, _ = run(manifest, tmp_path / "out", "output.samples_per_shard=2")
    shard = Path(first.dataset) / "shard-000001.tar"
    data = shard.read_bytes()
    shard.unlink()
    again, _ = run(manifest, tmp_path / "out", "output.samples_per_shard=2")
    assert not again.reused_dataset and again.dataset == first.dataset and shard.read_bytes() == data
    from mmdata.verify import verify
    assert verify(again.dataset)[0] == []


def test_a_partition_deleted_or_cut_short_in_the_store_is_rebuilt(demo_dir, tmp_path):
    manifest = write_manifest(tmp_path / "m.jsonl", demo_rows(demo_dir))
    first, _ = run(manifest, tmp_path / "out", "output.samples_per_shard=2")
    store_shards = sorted((tmp_path / "out" / ".store").glob("*/shard-000001.tar"))
    assert len(store_shards) == 1
    store_shards[0].unlink()                                   # the dataset's hard link keeps the bytes
    (Path(first.dataset) / "shard-000001.tar").unlink()
    again, _ = run(manifest, tmp_path / "out", "output.samples_per_shard=2")
    assert again.partitions_built == 1 and again.partitions_reused == 2
    from mmdata.verify import verify
    assert verify(again.dataset)[0] == []


def test_error_reports_are_the_same_bytes_run_after_run(demo_dir, tmp_path):
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not an image at all" * 10)
    wav = tmp_path / "junk.wav"
    wav.write_bytes(b"RIFF not a wave")
    manifest = write_manifest(tmp_path / "m.jsonl", [hostile_row(image=str(junk), audio=str(wav)),
                                                     *demo_rows(demo_dir)])
    reports = []
    for out in ("a", "b"):
        result, errors = run(manifest, tmp_path / out)
        reports.append((Path(result.dataset) / "errors.jsonl").read_bytes())
        assert {e["reason"] for e in errors} == {"corrupt_image", "corrupt_audio"}
    assert reports[0] == reports[1] and b" at 0x" not in reports[0]


@pytest.mark.parametrize("fmt", ["PPM", "ICO", "GIF", "TIFF", "BMP"])
def test_every_listed_image_format_is_read(demo_dir, tmp_path, fmt):
    from PIL import Image
    image = tmp_path / f"in.{fmt.lower()}"
    Image.new("RGB", (48, 40), (10, 200, 30)).save(image, fmt)
    manifest = write_manifest(tmp_path / "m.jsonl", [hostile_row(image=str(image))])
    result, errors = run(manifest, tmp_path / "out")
    assert errors == [] and result.totals.modalities.get("image") == 1


@pytest.mark.parametrize("override, words", [
    ("text.tokenizer=/dev/null", "text.tokenizer: cannot load SentencePiece model /dev/null"),
    ("text.tokenizer=/dev/zero", "not a regular file"),
    ("image.max_bytes=0", "image.max_bytes: must be between"),
    ("audio.max_bytes=99999999999", "audio.max_bytes: must be between"),
    ("image.max_pixels=10000000000", "image.max_pixels: must be between"),
    ("input.retries=-1", "input.retries: must be between"),
])
def test_a_bad_setting_stops_at_once_in_one_line(demo_dir, tmp_path, capsys, override, words):
    config = tmp_path / "c.yaml"
    config.write_text(f"input: {{manifest: {write_manifest(tmp_path / 'm.jsonl', demo_rows(demo_dir))}}}\n"
                      f"output: {{root: {tmp_path / 'out'}}}\nray: {{executor: serial}}\nprogress: false\n")
    assert main(["preprocess", str(config), override]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err and err.count("\n") == 1


def test_a_config_file_that_is_not_utf8_is_one_line(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_bytes(b"input: {manifest: caf\xe9.jsonl}\n")
    assert main(["preprocess", str(config)]) == 2
    err = capsys.readouterr().err
    assert "is not UTF-8 text" in err and err.count("\n") == 1


def test_an_output_root_under_a_regular_file_is_one_line_and_exit_3(demo_dir, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    config = tmp_path / "c.yaml"
    config.write_text(f"input: {{manifest: {write_manifest(tmp_path / 'm.jsonl', demo_rows(demo_dir))}}}\n"
                      f"output: {{root: {tmp_path / 'file' / 'out'}}}\nray: {{executor: serial}}\nprogress: false\n"
                      "text: {vocab_size: 128}\n")
    assert main(["preprocess", str(config)]) == 3
    err = capsys.readouterr().err
    assert "not a folder" in err and str(tmp_path / "file") in err and err.count("\n") == 1


@pytest.mark.parametrize("writing", ["shard", "member cache"])
def test_a_full_disk_is_one_line_exit_3_and_leaves_no_temp_file(demo_dir, tmp_path, capsys, monkeypatch, writing):
    from mmdata.prep.members import EntryWriter
    from mmdata.shards import ShardWriter
    owner, method = (ShardWriter, "write") if writing == "shard" else (EntryWriter, "add")
    real, calls = getattr(owner, method), []

    def fill_up(self, *args, **kwargs):
        calls.append(1)
        if len(calls) > 5:    # part of the first file is written, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device", writing)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(owner, method, fill_up)
    config = tmp_path / "c.yaml"
    config.write_text(f"input: {{manifest: {write_manifest(tmp_path / 'm.jsonl', demo_rows(demo_dir))}}}\n"
                      f"output: {{root: {tmp_path / 'out'}}}\nray: {{executor: serial}}\nprogress: false\n"
                      "text: {vocab_size: 128}\n")
    assert main(["preprocess", str(config)]) == 3
    err = capsys.readouterr().err
    assert "the disk is full" in err and err.count("\n") == 1
    assert not temp_files(tmp_path / "out")
    assert not list((tmp_path / "out").glob("*/dataset.json"))         # never marked complete


def processes_marked(marker: str) -> list[int]:
    """Live processes whose environment holds ``marker`` (a run's driver and every process it started)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker.encode() in (entry / "environ").read_bytes():
                status = (entry / "status").read_text()
                if "\nState:\tZ" not in status:   # a zombie has ended; only its parent has not reaped it
                    found.append(int(entry.name))
        except OSError:
            continue
    return found


@pytest.mark.parametrize("executor", ["serial", "processes"])
def test_sigterm_stops_like_ctrl_c_leaves_no_process_and_a_rerun_finishes(demo_dir, tmp_path, executor):
    rows = demo_rows(demo_dir, 40) * 3
    rows = [{**r, "id": f"{r['id']}-{i}"} for i, r in enumerate(rows)]
    manifest = write_manifest(tmp_path / "m.jsonl", rows)
    config = tmp_path / "c.yaml"
    config.write_text(f"input: {{manifest: {manifest}}}\noutput: {{root: {tmp_path / 'out'}, name: t, "
                      f"samples_per_shard: 10}}\nray: {{executor: {executor}, num_cpus: 2}}\nprogress: false\n"
                      "text: {vocab_size: 128}\nimage: {size: 32}\naudio: {n_mels: 32, max_seconds: 2.0}\n")
    marker = f"MM_TEST_RUN={tmp_path.name}"
    proc = subprocess.Popen([sys.executable, "-m", "mmdata", "preprocess", str(config)],
                            env={**os.environ, "MM_TEST_RUN": tmp_path.name},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    store = tmp_path / "out" / ".store"
    deadline = time.monotonic() + 90
    while not list(store.glob("*/summary.json")) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted; rerun the same command" in err and "Traceback" not in err
    deadline = time.monotonic() + 30   # workers end with the driver: none is left running on its own
    while processes_marked(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_marked(marker) == []
    assert not temp_files(tmp_path / "out")
    assert main(["preprocess", str(config)]) == 0


def test_temp_files_of_dead_runs_are_swept_and_live_ones_kept(demo_dir, tmp_path):
    manifest = write_manifest(tmp_path / "m.jsonl", demo_rows(demo_dir))
    first, _ = run(manifest, tmp_path / "out")
    host = socket.gethostname()
    dead = Path(first.dataset) / f".shard-000000.tar.{host}-{2**22 + 12345}-abcdef.tmp"   # no such pid
    live = Path(first.dataset) / f".shard-000000.tar.{host}-{os.getpid()}-abcdef.tmp"
    dead.write_text("left by a killed run")
    live.write_text("being written by a run that is still going")
    run(manifest, tmp_path / "out")
    assert not dead.exists() and live.exists()


@pytest.mark.parametrize("argv", [["demo-data", "--out", "x", "--n", "-5"], ["demo-data", "--out", "x", "--n", "two"],
                                  ["show", "d", "--n", "0"]])
def test_a_bad_count_on_the_command_line_is_a_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "argument --n" in err and "Traceback" not in err


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_sigterm_under_ray_stops_like_ctrl_c(demo_dir, tmp_path):
    rows = [{**r, "id": f"{r['id']}-{i}"} for i, r in enumerate(demo_rows(demo_dir, 40) * 4)]
    config = tmp_path / "c.yaml"
    config.write_text(f"input: {{manifest: {write_manifest(tmp_path / 'm.jsonl', rows)}}}\n"
                      f"output: {{root: {tmp_path / 'out'}, name: t, samples_per_shard: 8}}\n"
                      "ray: {executor: ray, num_cpus: 1}\nprogress: false\ntext: {vocab_size: 128}\n"
                      "image: {size: 32}\naudio: {n_mels: 32, max_seconds: 2.0}\n")
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "mmdata", "preprocess", str(config)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not list((tmp_path / "out" / ".store").glob("*/summary.json")) and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-3000:]
    assert "interrupted; rerun the same command" in err and "Traceback" not in err and "SIGABRT" not in err


@pytest.mark.parametrize("override, key", [
    ("text.vocab_size=100000000", "text.vocab_size"), ("text.train_samples=1000000000", "text.train_samples"),
    ("text.max_tokens=100000000", "text.max_tokens"), ("text.max_chars=100000000000", "text.max_chars"),
])
def test_unbounded_text_settings_are_refused_naming_the_key(tmp_path, override, key):
    from mmdata.config import ConfigError
    with pytest.raises(ConfigError) as e:
        preprocess_config(tmp_path / "m.jsonl", tmp_path, override)
    assert e.value.key == key


@pytest.mark.parametrize("setting, key", [
    ({"batch_size": 10**7}, "batch_size"), ({"pad_tokens_to": 10**9}, "pad_tokens_to"),
    ({"num_workers": 10**4}, "num_workers"), ({"prefetch_factor": 10**6}, "prefetch_factor"),
])
def test_unbounded_loader_settings_are_refused_naming_the_key(setting, key):
    from helpers import loader_config
    from mmdata.config import ConfigError
    with pytest.raises(ConfigError) as e:
        loader_config("unused", **setting)
    assert e.value.key == key


@pytest.mark.parametrize("modality", ["image", "audio"])
def test_an_empty_path_is_reported_not_silently_absent(demo_dir, tmp_path, modality):
    manifest = write_manifest(tmp_path / "m.jsonl", [hostile_row(**{modality: ""}), *demo_rows(demo_dir)])
    result, errors = run(manifest, tmp_path / "out")
    assert [(e["reason"], e["modality"], e["action"]) for e in errors] == [("missing_file", modality,
                                                                           "dropped_modality")]
    assert "empty string" in errors[0]["error"] and result.totals.written == GOOD_ROWS + 1


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_task_that_cannot_write_under_ray_is_one_line_exit_3_not_a_ray_traceback(demo_dir, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / ".store").write_text("a file where the partition store should be")
    config = tmp_path / "c.yaml"
    config.write_text(f"input: {{manifest: {write_manifest(tmp_path / 'm.jsonl', demo_rows(demo_dir))}}}\n"
                      f"output: {{root: {tmp_path / 'out'}, name: t}}\nray: {{executor: ray, num_cpus: 1}}\n"
                      "progress: false\ntext: {vocab_size: 128}\n")
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_USAGE_STATS_ENABLED": "0"}
    done = subprocess.run([sys.executable, "-m", "mmdata", "preprocess", str(config)], env=env,
                          capture_output=True, text=True, timeout=200)
    error_lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 3, done.stderr[-3000:]
    assert len(error_lines) == 1 and ".store" in error_lines[0] and "not a folder" in error_lines[0]
    assert "RayTaskError" not in done.stderr and "Traceback" not in done.stderr
