"""Hostile input rows and files through `mmdata preprocess`, end to end.

Each row case is a small manifest (or a set of tars) holding valid demo rows and hostile ones; the run must go
on (exit 0), write every valid row, report each hostile row in errors.jsonl with its reason, and leave no
temporary file. Each whole-input case (a file that is not what it says, an unusable URL, a runaway brace
pattern) must stop before any work with exit 2 and one line naming the file or the key, never a traceback.
"""

from __future__ import annotations

import gzip
import io
import json
import re
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import mmdata.prep.manifests as manifests   # the input limits, patched below
from mmdata.cli import main
from mmdata.dataset import load_description

SETTINGS = ["output.name=t", "output.samples_per_shard=12", "text.vocab_size=128", "text.max_tokens=24",
            "image.size=32", "audio.n_mels=32", "audio.max_seconds=2.0", "progress=false", "ray.executor=serial",
            "max_error_rate=1.0"]


@pytest.fixture()
def good(demo_dir):
    """Five valid demo rows with absolute media paths, each with text and an image."""
    rows = [json.loads(line) for line in (demo_dir / "manifest.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["text"] and r["image"]][:5]
    for r in rows:
        r["image"] = str(demo_dir / r["image"])
        r["audio"] = str(demo_dir / r["audio"]) if r["audio"] else None
    return rows


def run(tmp_path: Path, capsys, *args: str) -> tuple[int, str, Path]:
    root = tmp_path / "out"
    rc = main(["preprocess", str(write_config(tmp_path)), f"output.root={root}", *SETTINGS, *args])
    return rc, capsys.readouterr().err, root


def write_config(tmp_path: Path) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text("# hostile input test\n")
    return path


def outcome(root: Path) -> tuple[dict, dict, list[dict], list[str]]:
    """(totals, errors by reason, error entries, ids written) of the dataset the run made."""
    dataset = root / "t"
    description = load_description(str(dataset))
    totals = json.loads((dataset / "dataset.json").read_text())["totals"]
    errors = [json.loads(line) for line in (dataset / "errors.jsonl").read_text(encoding="utf-8").splitlines()]
    ids = [i for s in description.shards
           for i in pq.read_table(dataset / "index" / f"{s.name.removesuffix('.tar')}.parquet")["id"].to_pylist()]
    return totals, totals["errors_by_reason"], errors, ids


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".tmp") or ".tmp" in p.suffixes]


def jsonl(rows) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows)


def csv_text(rows, cols=("id", "text", "image", "lang")) -> str:
    import csv
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(cols)
    for r in rows:
        writer.writerow(["" if r.get(c) is None else r[c] for c in cols])
    return buf.getvalue()


def with_lang(rows):
    return [{**r, "lang": "en"} for r in rows]


# --- row cases: build(tmp_path, good rows, monkeypatch) -> (overrides, errors by reason, ids written) --------

def csv_with_bom(tmp, good, mp):
    (tmp / "m.csv").write_bytes(b"\xef\xbb\xbf" + csv_text(good).encode())
    return [f"input.manifest={tmp / 'm.csv'}"], {}, [r["id"] for r in good]


def jsonl_with_bom(tmp, good, mp):
    (tmp / "m.jsonl").write_bytes(b"\xef\xbb\xbf" + jsonl(good))
    return [f"input.manifest={tmp / 'm.jsonl'}"], {}, [r["id"] for r in good]


def csv_empty_cells(tmp, good, mp):
    # an empty text cell is absent (the row is written with its image, no report); spaces are a text, empty
    rows = good + [{"id": "no-text", "image": good[0]["image"]}, {"id": "spaces", "text": "   ",
                                                                  "image": good[0]["image"]},
                   {"id": "nothing", "lang": "en"}]
    (tmp / "m.csv").write_text(csv_text(rows))
    return ([f"input.manifest={tmp / 'm.csv'}"], {"empty_text": 1, "no_modalities": 1},
            [r["id"] for r in good] + ["no-text", "spaces"])


def jsonl_bad_ids(tmp, good, mp):
    bad = [{"id": v, "text": "t"} for v in ("", "   ", True, 1.5, [1], {"a": 1}, None)]
    (tmp / "m.jsonl").write_bytes(jsonl(good + bad + [{"id": 7, "text": "integer id"}]))
    return [f"input.manifest={tmp / 'm.jsonl'}"], {"invalid_id": 7}, [r["id"] for r in good] + ["7"]


def csv_empty_id(tmp, good, mp):
    (tmp / "m.csv").write_text(csv_text(with_lang(good) + [{"text": "t", "lang": "en"}]))
    return [f"input.manifest={tmp / 'm.csv'}"], {"invalid_id": 1}, [r["id"] for r in good]


def csv_field_over_csv_default_limit(tmp, good, mp):
    # 200 000 characters: over the csv module's default field limit; the text encoder caps it (text_too_long)
    rows = good + [{"id": "long", "text": "w" * 200_000, "image": good[0]["image"]}]
    (tmp / "m.csv").write_text(csv_text(rows))
    return [f"input.manifest={tmp / 'm.csv'}"], {"text_too_long": 1}, [r["id"] for r in good] + ["long"]


def csv_record_over_row_limit(tmp, good, mp):
    mp.setattr(manifests, "MAX_ROW_CHARS", 4000)
    body = csv_text(good[:2]) + 'huge,"' + "x" * 3000 + "\n" + "y" * 3000 + '\n,still quoted",,\n'
    body += 'line,' + "z" * 5000 + ",,\n" + csv_text(good[2:]).split("\n", 1)[1]
    (tmp / "m.csv").write_text(body)
    return [f"input.manifest={tmp / 'm.csv'}"], {"row_too_large": 2}, [r["id"] for r in good]


def jsonl_line_over_row_limit(tmp, good, mp):
    mp.setattr(manifests, "MAX_ROW_CHARS", 4000)
    (tmp / "m.jsonl").write_bytes(jsonl(good[:2] + [{"id": "huge", "text": "x" * 9000}] + good[2:]))
    return [f"input.manifest={tmp / 'm.jsonl'}"], {"row_too_large": 1}, [r["id"] for r in good]


def jsonl_latin1(tmp, good, mp):
    lines = [json.dumps(r).encode() for r in good] + [
        b'{"id": "caf\xe9", "text": "t"}',                       # id
        b'{"id": "m", "text": "t", "city": "Z\xfcrich"}',       # metadata
        b'{"id": "txt", "text": "caf\xe9", "image": "%s"}' % good[0]["image"].encode(),  # text: encoder's
    ]
    (tmp / "m.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return [f"input.manifest={tmp / 'm.jsonl'}"], {"invalid_utf8": 3}, [r["id"] for r in good] + ["txt"]


def csv_latin1(tmp, good, mp):
    body = csv_text(with_lang(good)).encode() + b"caf\xe9,t,,en\nm,t,,fran\xe7ais\n"
    (tmp / "m.csv").write_bytes(body)
    return [f"input.manifest={tmp / 'm.csv'}"], {"invalid_utf8": 2}, [r["id"] for r in good]


def csv_ragged(tmp, good, mp):
    body = csv_text(with_lang(good[:3])) + "short,t\nlong,t,,en,extra\n" + csv_text(with_lang(good[3:])).split(
        "\n", 1)[1]
    (tmp / "m.csv").write_text(body)
    return [f"input.manifest={tmp / 'm.csv'}"], {"ragged_row": 2}, [r["id"] for r in good]


def csv_unclosed_quote(tmp, good, mp):
    (tmp / "m.csv").write_text(csv_text(with_lang(good)) + 'open,"never closed\nx,y,,en\n')
    return [f"input.manifest={tmp / 'm.csv'}"], {"unclosed_quote": 1}, [r["id"] for r in good]


def jsonl_odd_json(tmp, good, mp):
    deep = {"id": "deep", "text": "t", "nest": json.loads("[" * 70 + "]" * 70)}
    bad = [b'{"id": "twice", "id": "again", "text": "t"}', b'{"id": "big", "n": ' + b"9" * 5000 + b"}",
           b'{"id": "surrogate", "text": "t", "note": "\\ud800"}', deep,
           {"id": "num-path", "text": "t", "image": 5}, {"id": "nul-path", "text": "t", "image": "a\u0000b.jpg"},
           b"[" * 100_000]
    sentinel = {"id": "sentinel", "text": "a row may use any key", "__error__": "not an error"}
    (tmp / "m.jsonl").write_bytes(jsonl(good + bad + [sentinel]))
    return ([f"input.manifest={tmp / 'm.jsonl'}"], {"bad_row": 4, "invalid_utf8": 1, "invalid_path": 2},
            [r["id"] for r in good] + ["sentinel"])


def parquet_bad_values(tmp, good, mp):
    offsets = pa.array([0, 1, 3], type=pa.int32()).buffers()[1]
    ids = pa.Array.from_buffers(pa.string(), 2, [None, offsets, pa.py_buffer(b"a\xff\xfe")])
    bad = pa.table({"id": ids, "text": ["t", "t"], "image": pa.array([None, None], pa.string())})
    table = pa.concat_tables([pa.table({"id": [r["id"] for r in good], "text": [r["text"] for r in good],
                                        "image": [r["image"] for r in good]}), bad,
                              pa.table({"id": pa.array([None], pa.string()), "text": ["t"],
                                        "image": pa.array([None], pa.string())})])
    pq.write_table(table, tmp / "m.parquet")
    written = [r["id"] for r in good] + ["a"]
    return [f"input.manifest={tmp / 'm.parquet'}"], {"invalid_utf8": 1, "invalid_id": 1}, written


def write_tar(path: Path, samples, mode: str = "w") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode, format=tarfile.GNU_FORMAT) as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def tar_samples(rows):
    return [(r["id"], {"txt": r["text"].encode(), Path(r["image"]).suffix[1:]: Path(r["image"]).read_bytes(),
                       "json": json.dumps({"label": r["label"]}).encode()}) for r in rows]


def tars_truncated(tmp, good, mp):
    data = write_tar(tmp / "in-0.tar", tar_samples(good[:3]))
    last = data.index(good[2]["id"].encode())          # the first header of the last sample
    (tmp / "in-0.tar").write_bytes(data[: last + 512 + 100])   # cut inside its first member
    write_tar(tmp / "in-1.tar", tar_samples(good[3:]))
    kept = [r["id"] for r in good[:2] + good[3:]]
    return [f"input.tars={tmp}/in-{{0..1}}.tar"], {"corrupt_tar": 1}, kept


def tars_corrupt_gzip(tmp, good, mp):
    plain = write_tar(tmp / "plain.tar", tar_samples(good[:3]))
    packed = bytearray(gzip.compress(plain, mtime=0))
    packed[-8] ^= 0xFF                       # the CRC: every byte decompresses, the check fails
    (tmp / "in-0.tar").write_bytes(bytes(packed))
    write_tar(tmp / "in-1.tar", tar_samples(good[3:]))
    return [f"input.tars=[{tmp}/in-0.tar,{tmp}/in-1.tar]"], {"corrupt_tar": 1}, [r["id"] for r in good[:2] + good[3:]]


def tars_zeroed_block(tmp, good, mp):
    data = bytearray(write_tar(tmp / "in-0.tar", tar_samples(good)))
    second = data.index(good[1]["id"].encode())   # the first header of sample 2
    data[second: second + 512] = bytes(512)      # looks like the end of the archive to tarfile
    (tmp / "in-0.tar").write_bytes(bytes(data))
    return [f"input.tars={tmp}/in-0.tar"], {"corrupt_tar": 1}, [good[0]["id"]]


def tars_hostile_keys(tmp, good, mp):
    samples = tar_samples(good) + [("bad\udcff", {"txt": b"t"}), ("", {"txt": b"t"}),
                                   ("twice", {"txt": b"a"}), ("meta", {"txt": b"t", "json": b'{"x": "\\udc00"}'})]
    path = tmp / "in-0.tar"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
                if key == "twice":
                    tar.addfile(info, io.BytesIO(data))
    path.write_bytes(buf.getvalue())
    return ([f"input.tars={path}"], {"invalid_utf8": 2, "invalid_id": 1, "bad_row": 1},
            [r["id"] for r in good])


ROW_CASES = [csv_with_bom, jsonl_with_bom, csv_empty_cells, jsonl_bad_ids, csv_empty_id,
             csv_field_over_csv_default_limit, csv_record_over_row_limit, jsonl_line_over_row_limit, jsonl_latin1,
             csv_latin1, csv_ragged, csv_unclosed_quote, jsonl_odd_json, parquet_bad_values, tars_truncated,
             tars_corrupt_gzip, tars_zeroed_block, tars_hostile_keys]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", ROW_CASES, ids=[c.__name__ for c in ROW_CASES])
def test_hostile_rows_are_reported_and_every_valid_row_is_written(case, good, tmp_path, capsys, monkeypatch):
    overrides, reasons, written = case(tmp_path, good, monkeypatch)
    rc, err, root = run(tmp_path, capsys, *overrides)
    assert rc == 0, err
    assert "Traceback" not in err
    totals, by_reason, errors, ids = outcome(root)
    assert sorted(ids) == sorted(written)
    assert by_reason == reasons
    assert totals["written"] == len(written)
    assert totals["samples_in"] == totals["written"] + totals["rejected"]
    for e in errors:   # every report names its row and says what is wrong, the same way every run
        assert isinstance(e["row"], int) and e["error"] and " at 0x" not in e["error"]
        if e["stage"] == "scan":   # rejected by the input reader: the message says where
            assert re.search(r"(line|row) \d+ of |tar |sample ", e["error"]), e
    assert not temp_files(root)


@pytest.mark.timeout(60)
def test_reports_are_the_same_bytes_run_after_run(good, tmp_path, capsys):
    overrides, _, _ = jsonl_odd_json(tmp_path, good, None)
    _, _, first = run(tmp_path, capsys, *overrides)
    errors = (first / "t" / "errors.jsonl").read_bytes()
    rc, err, second = run(tmp_path, capsys, *overrides, f"output.root={tmp_path / 'again'}")
    assert rc == 0, err
    assert (second / "t" / "errors.jsonl").read_bytes() == errors and errors


# --- whole-input cases: (name, build(tmp_path) -> (overrides, words the one-line message holds)) -------------

def manifest_file(name: str, data: bytes):
    def build(tmp):
        (tmp / name).write_bytes(data)
        return [f"input.manifest={tmp / name}"], ["input.manifest:", str(tmp / name)]
    build.__name__ = f"manifest_{name.replace('.', '_')}"
    return build


def sftp_manifest(tmp):
    return ["input.manifest=sftp://example.invalid/m.jsonl"], ["input.manifest:", "sftp://example.invalid/m.jsonl"]


def git_tars(tmp):
    return ["input.tars=git://example.invalid/s-{0..3}.tar"], ["input.tars:", "git://example.invalid/s-0.tar"]


def unknown_scheme_tars(tmp):
    return ["input.tars=[nosuchscheme://x/a.tar]"], ["input.tars:", "nosuchscheme://x/a.tar"]


def billion_tars(tmp):
    return [f"input.tars={tmp}/s-{{000000000..999999999}}.tar"], ["input.tars:", "input.max_tars=1000000"]


def over_max_tars(tmp):
    return [f"input.tars={tmp}/s-{{0..9}}.tar", "input.max_tars=5"], ["input.tars:", "input.max_tars=5"]


def bad_max_tars(tmp):
    return [f"input.tars={tmp}/s-0.tar", "input.max_tars=0"], ["input.max_tars:", "at least 1"]


def backwards_range(tmp):
    return [f"input.tars={tmp}/s-{{9..0}}.tar"], ["input.tars:", "names no tar file"]


WHOLE_CASES = [manifest_file("m.parquet", b'{"id": "a", "text": "json, not parquet"}\n'),
               manifest_file("m.jsonl", gzip.compress(b'{"id": "a"}\n' * 50, mtime=0)),
               manifest_file("m.csv", b""),
               manifest_file("b.csv", bytes(range(256)) * 4),
               manifest_file("d.csv", b"id,text,text\na,b,c\n"),
               sftp_manifest, git_tars, unknown_scheme_tars, billion_tars, over_max_tars, bad_max_tars,
               backwards_range]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", WHOLE_CASES, ids=[c.__name__ for c in WHOLE_CASES])
def test_a_bad_whole_input_stops_at_once_with_one_line(case, tmp_path, capsys):
    overrides, words = case(tmp_path)
    rc, err, root = run(tmp_path, capsys, *overrides)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert all(w in lines[0] for w in words), lines[0]
    assert "Traceback" not in err and " at 0x" not in err
    assert not root.exists() or not any(p.is_file() for p in root.rglob("*"))


@pytest.mark.timeout(60)
def test_the_demo_csv_needs_no_report_for_its_empty_cells(tmp_path, capsys):
    """The demo's CSV writes missing modalities as empty cells (as csv.writer and pandas do): absent, not bad."""
    from mmdata.demo import generate_demo
    manifest = generate_demo(tmp_path / "demo", 24, seed=1, manifest_format="csv")
    assert ",," in manifest.read_text()
    rc, err, root = run(tmp_path, capsys, f"input.manifest={manifest}")
    assert rc == 0, err
    totals, by_reason, _, ids = outcome(root)
    assert by_reason == {} and totals["written"] == 24 and len(ids) == 24

