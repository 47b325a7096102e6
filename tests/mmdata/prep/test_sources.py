"""Sources: manifests in three formats and WebDataset tars become the same Records, streamed."""

import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmdata.config import ConfigError
from mmdata.prep.sources import InputConfig, check_readable, expand_braces, iter_records

ROWS = [
    {"id": "a", "text": "hello", "image": "img/a.jpg", "audio": None, "label": "cat", "lang": "en"},
    {"id": "b.2", "text": None, "image": None, "audio": "/abs/b.wav", "label": "dog", "lang": "fr"},
    {"text": "no id", "image": "s3://bucket/c.png", "label": None, "lang": None},
]


def write_manifest(tmp_path, fmt):
    path = tmp_path / f"manifest.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    elif fmt == "csv":
        cols = ["id", "text", "image", "audio", "label", "lang"]
        lines = [",".join(cols)] + [",".join(str(r.get(c) or "") for c in cols) for r in ROWS]
        path.write_text("\n".join(lines) + "\n")
    else:
        cols = ["id", "text", "image", "audio", "label", "lang"]
        pq.write_table(pa.table({c: [r.get(c) for r in ROWS] for c in cols}), path)
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_manifest_formats_give_the_same_records(tmp_path, fmt):
    path = write_manifest(tmp_path, fmt)
    records = list(iter_records(InputConfig(manifest=str(path))))
    assert [r.id for r in records] == ["a", "b.2", "row-000000002"]
    assert [r.row for r in records] == [0, 1, 2]
    assert records[0].image == f"{tmp_path}/img/a.jpg"      # relative to the manifest's folder
    assert records[1].audio == "/abs/b.wav"                  # absolute stays
    assert records[2].image == "s3://bucket/c.png"           # URLs stay
    assert records[0].text == "hello" and records[1].text is None
    assert records[0].label == "cat" and records[0].meta == {"lang": "en"}


def test_bad_jsonl_lines_become_bad_rows_not_crashes(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(b'{"id": "ok", "text": "fine"}\n{"id": broken\n[1, 2]\n\n{"id": "bad\xff", "text": "x\xfe"}\n')
    records = list(iter_records(InputConfig(manifest=str(path))))
    assert [r.error is None for r in records] == [True, False, False, True]
    assert "line 2" in records[1].error and "not valid JSON" in records[1].error
    assert "must be a JSON object" in records[2].error
    assert "\udcfe" in records[3].text  # undecodable bytes kept, reported later as invalid_utf8


def test_brace_patterns_expand_with_padding():
    assert expand_braces("s-{008..011}.tar") == ["s-008.tar", "s-009.tar", "s-010.tar", "s-011.tar"]
    assert expand_braces("{a,b}/x-{0..1}.tar") == ["a/x-0.tar", "a/x-1.tar", "b/x-0.tar", "b/x-1.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def make_tar(path, samples):
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_webdataset_tars_are_grouped_by_key(tmp_path):
    make_tar(tmp_path / "in-0.tar", [
        ("000", {"jpg": b"JPEG", "txt": b"a caption", "json": b'{"url": "http://x", "label": 3}'}),
        ("001", {"png": b"PNG", "caption": b"other", "cls": b"5", "flac": b"FLAC"}),
    ])
    make_tar(tmp_path / "in-1.tar", [("sub/002", {"txt": b"third", "json": b'{"id": "orig/id.2"}'})])
    config = InputConfig(tars=str(tmp_path / "in-{0..1}.tar"))
    records = list(iter_records(config))
    assert [r.id for r in records] == ["000", "001", "orig/id.2"]
    assert [r.row for r in records] == [0, 1, 2]
    assert records[0].image == b"JPEG" and records[0].text == b"a caption" and records[0].label == 3
    assert records[0].meta["url"] == "http://x"
    assert records[1].image == b"PNG" and records[1].audio == b"FLAC" and records[1].label == "5"
    assert records[2].meta["source"]["key"] == "sub/002"


def test_missing_inputs_fail_before_work_naming_the_file(tmp_path):
    with pytest.raises(ConfigError, match="nope.jsonl does not exist"):
        check_readable(InputConfig(manifest=str(tmp_path / "nope.jsonl")))
    make_tar(tmp_path / "t-0.tar", [])
    with pytest.raises(ConfigError, match="t-1.tar does not exist"):
        check_readable(InputConfig(tars=str(tmp_path / "t-{0..1}.tar")))
