"""Sources: manifests in three formats and WebDataset tars become the same Records, streamed."""

import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import mmdata.prep.manifests as manifests   # the input limits (patched below) and the CSV states
from mmdata.config import ConfigError
from mmdata.prep.braces import expand_braces, iter_braces
from mmdata.prep.manifests import csv_state, read_lines
from mmdata.prep.sources import BadValue, InputConfig, check_id, check_readable, iter_records

ROWS = [
    {"id": "a", "text": "hello", "image": "img/a.jpg", "audio": None, "label": "cat", "lang": "en"},
    {"id": "b.2", "text": None, "image": None, "audio": "/abs/b.wav", "label": "dog", "lang": "fr"},
    {"id": "c", "text": "no label", "image": "s3://bucket/c.png", "label": None, "lang": None},
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
    assert [r.id for r in records] == ["a", "b.2", "c"]
    assert [r.row for r in records] == [0, 1, 2]
    assert all(r.error is None for r in records)
    assert records[0].image == f"{tmp_path}/img/a.jpg"      # relative to the manifest's folder
    assert records[1].audio == "/abs/b.wav"                  # absolute stays
    assert records[2].image == "s3://bucket/c.png"           # URLs stay
    assert records[0].text == "hello" and records[1].text is None
    assert records[0].label == "cat" and records[0].meta == {"lang": "en"}


def test_bad_jsonl_lines_become_bad_rows_not_crashes(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(b'{"id": "ok", "text": "fine"}\n{"id": broken\n[1, 2]\n\n{"id": "good", "text": "x\xfe"}\n'
                     b'{"id": "bad\xff", "text": "x"}\n')
    records = list(iter_records(InputConfig(manifest=str(path))))
    assert [r.error is None for r in records] == [True, False, False, True, False]
    assert "line 2" in records[1].error and "not valid JSON" in records[1].error
    assert "must be a JSON object" in records[2].error
    assert "\udcfe" in records[3].text  # undecodable text kept: the text encoder reports it (invalid_utf8)
    assert records[4].error_reason == "invalid_utf8" and "line 6 of" in records[4].error  # elsewhere: the row
    assert records[4].id == "row-000000004"


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


# --- hostile input: one rule per class, each with the cases that broke it ----------------------------------

@pytest.mark.parametrize("value, expected", [("a", "a"), (" x ", " x "), (7, "7"), (-3, "-3"), (10**30, str(10**30))])
def test_an_id_is_a_non_empty_string_or_an_integer(value, expected):
    assert check_id(value) == expected


@pytest.mark.parametrize("value, reason", [("", "invalid_id"), ("  ", "invalid_id"), (None, "invalid_id"),
                                           (True, "invalid_id"), (1.0, "invalid_id"), ([1], "invalid_id"),
                                           ({"a": 1}, "invalid_id"), (b"a", "invalid_id"),
                                           ("caf\udce9", "invalid_utf8")])
def test_any_other_id_rejects_the_row_with_a_reason(value, reason):
    with pytest.raises(BadValue) as e:
        check_id(value)
    assert e.value.reason == reason and "0x" not in str(e.value)


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_without_an_id_column_rows_are_numbered_and_with_one_every_row_needs_an_id(tmp_path, fmt):
    rows = [{"text": "a"}, {"text": "b"}]
    if fmt == "jsonl":
        (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"id": "", "text": "c"}\n')
    elif fmt == "csv":
        (tmp_path / "m.csv").write_text("text\na\nb\n")
    else:
        pq.write_table(pa.table({"text": ["a", "b"]}), tmp_path / "m.parquet")
    records = list(iter_records(InputConfig(manifest=str(tmp_path / f"m.{fmt}"))))
    assert [r.id for r in records[:2]] == ["row-000000000", "row-000000001"]
    assert all(r.error is None for r in records[:2])
    if fmt == "jsonl":   # the key present but empty: reported, never silently renamed
        assert records[2].error_reason == "invalid_id" and "line 3 of" in records[2].error


def test_a_leading_bom_is_not_part_of_the_first_column_or_line(tmp_path):
    (tmp_path / "m.csv").write_bytes(b"\xef\xbb\xbfid,text\r\nx,hello\r\n")
    (tmp_path / "m.jsonl").write_bytes(b'\xef\xbb\xbf{"id": "y", "text": "hi"}\n')
    assert [(r.id, r.text, r.error) for r in iter_records(InputConfig(manifest=str(tmp_path / "m.csv")))] == [
        ("x", "hello", None)]
    assert [(r.id, r.error) for r in iter_records(InputConfig(manifest=str(tmp_path / "m.jsonl")))] == [("y", None)]


def test_csv_empty_cells_are_absent_and_spaces_are_present(tmp_path):
    (tmp_path / "m.csv").write_text("id,text,image,lang\na,,x.jpg,\nb, ,,en\n")
    a, b = iter_records(InputConfig(manifest=str(tmp_path / "m.csv")))
    assert a.text is None and a.meta == {"lang": None} and a.image == f"{tmp_path}/x.jpg"
    assert b.text == " " and b.image is None   # reaches the text encoder: empty_text


def test_lines_split_like_universal_newlines_and_come_in_bounded_pieces(monkeypatch):
    monkeypatch.setattr(manifests, "MAX_ROW_CHARS", 8)
    data = "\ufeffab\r\ncd\ref\n" + "x" * 20 + "\nlast"
    pieces = list(read_lines(io.BytesIO(data.encode())))
    assert pieces[:3] == [(1, "ab\r\n", True), (2, "cd\r", True), (3, "ef\n", True)]
    assert [p for p in pieces if p[0] == 4] == [(4, "x" * 9, False), (4, "x" * 9, False), (4, "xx\n", True)]
    assert pieces[-1] == (5, "last", True)


def test_csv_state_finds_record_ends_as_the_csv_module_does():
    import csv
    import random
    rng = random.Random(7)
    for _ in range(3000):
        text = "".join(rng.choice(['"', '"', ",", "a", "\n", "\r\n"]) for _ in range(rng.randint(1, 25)))
        lines = io.StringIO(text, newline="").readlines()
        consumed, ends = [], []
        feed = (consumed.append(i) or line for i, line in enumerate(lines))
        try:
            ends = [consumed[-1] for _ in csv.reader(feed)]
        except csv.Error:
            continue
        mine, state = [], manifests._START
        for i, line in enumerate(lines):
            state = csv_state(line.rstrip("\r\n"), state)
            if state != manifests._QUOTED or i == len(lines) - 1:
                mine.append(i)
                state = manifests._START
        assert mine == ends, text


def test_csv_bad_records_are_rows_and_the_next_record_is_read_intact(tmp_path, monkeypatch):
    monkeypatch.setattr(manifests, "MAX_ROW_CHARS", 30)
    body = ('id,text,lang\n'
            'a,ok,en\n'
            'b,"' + "long " * 10 + '\nx,not a row,en\n",en\n'        # over the limit, quoted over 3 lines
            'c,"two\nlines",en\n'
            'd,t\n'                                                  # ragged
            'e,t,en,more\n'
            'f,' + "w" * 40 + ',en\n'                                # over the limit on one line
            'g,"fine ""quoted""",en\n'
            'h,"never closed,en\ni,t,en\n')
    (tmp_path / "m.csv").write_text(body)
    records = list(iter_records(InputConfig(manifest=str(tmp_path / "m.csv"))))
    got = [(r.id, r.error_reason if r.error else None) for r in records]
    assert got == [("a", None), ("row-000000001", "row_too_large"), ("c", None), ("row-000000003", "ragged_row"),
                   ("row-000000004", "ragged_row"), ("row-000000005", "row_too_large"), ("g", None),
                   ("row-000000007", "unclosed_quote")]
    assert records[2].text == "two\nlines" and records[6].text == 'fine "quoted"'
    assert "line 3 of" in records[1].error and "line 8 of" in records[3].error
    assert "has 2 fields but the header has 3" in records[3].error


def test_a_csv_field_over_the_csv_modules_default_limit_is_read(tmp_path):
    (tmp_path / "m.csv").write_text("id,text\na," + "w" * 200_000 + "\nb,short\n")
    records = list(iter_records(InputConfig(manifest=str(tmp_path / "m.csv"))))
    assert [len(r.text) for r in records] == [200_000, 5] and all(r.error is None for r in records)


def test_undecodable_bytes_reject_the_row_but_text_is_left_to_the_encoder(tmp_path):
    (tmp_path / "m.csv").write_bytes(b"id,text,lang\nok,t,en\ncaf\xe9,t,en\nm,t,fran\xe7ais\ntx,caf\xe9,en\n")
    records = list(iter_records(InputConfig(manifest=str(tmp_path / "m.csv"))))
    assert [r.error_reason if r.error else None for r in records] == [None, "invalid_utf8", "invalid_utf8", None]
    assert "column 'lang'" in records[2].error and "\udce9" in records[3].text
    assert not any(manifests.SURROGATE.search(r.error or "") for r in records)   # messages stay writable


def test_odd_json_is_a_bad_row_not_a_crash(tmp_path):
    lines = [b'{"id": "a", "id": "b"}', b'{"n": ' + b"9" * 5000 + b"}", b"[" * 50_000,
             b'{"id": "s", "note": "\\ud800"}', json.dumps({"id": "d", "x": json.loads("[" * 80 + "]" * 80)}).encode(),
             b'{"id": "p", "image": 3}', b'{"id": "q", "audio": "a\\u0000.wav"}', b'{"id": "e", "__error__": 1}',
             json.dumps({"id": "t", "text": json.loads("[" * 900 + "]" * 900)}).encode()]
    (tmp_path / "m.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    records = list(iter_records(InputConfig(manifest=str(tmp_path / "m.jsonl"))))
    assert [r.error_reason if r.error else None for r in records] == [
        "bad_row", "bad_row", "bad_row", "invalid_utf8", "bad_row", "invalid_path", "invalid_path", None, "bad_row"]
    assert "appears twice" in records[0].error and records[7].meta == {"__error__": 1}


def test_parquet_rows_with_bytes_that_are_not_utf8_are_found_one_by_one(tmp_path):
    offsets = pa.array([0, 1, 3, 4], type=pa.int32()).buffers()[1]
    ids = pa.Array.from_buffers(pa.string(), 3, [None, offsets, pa.py_buffer(b"a\xff\xfeb")])
    pq.write_table(pa.table({"id": ids}), tmp_path / "m.parquet")
    records = list(iter_records(InputConfig(manifest=str(tmp_path / "m.parquet"))))
    assert [(r.id, r.error_reason if r.error else None) for r in records] == [
        ("a", None), ("row-000000001", "invalid_utf8"), ("b", None)]
    assert "row 1 of" in records[1].error


@pytest.mark.parametrize("name, data, words", [
    ("m.parquet", b'{"id": 1}\n', "is not a readable Parquet file"),
    ("m.jsonl", b"\x1f\x8b\x08\x00\x00\x00\x00\x00", "is not UTF-8 text"),
    ("m.csv", b"", "is empty"),
    ("m.csv", b"\xef\xbb\xbf\n\n", "is empty"),
    ("m.csv", b"PK\x03\x04\x00\x00", "is not UTF-8 text"),
    ("m.csv", b"id,a,a\n", "appears twice"),
])
def test_a_manifest_that_is_not_what_its_extension_says_fails_before_work(tmp_path, name, data, words):
    (tmp_path / name).write_bytes(data)
    with pytest.raises(ConfigError, match=words) as e:
        check_readable(InputConfig(manifest=str(tmp_path / name)))
    assert e.value.key == "input.manifest" and str(tmp_path / name) in str(e.value) and "\n" not in str(e.value)


def test_a_csv_header_problem_found_while_reading_is_a_config_error(tmp_path):
    (tmp_path / "m.csv").write_text('"id,text\na,b\n')
    with pytest.raises(ConfigError, match="header of .* never closed"):
        list(iter_records(InputConfig(manifest=str(tmp_path / "m.csv"))))


@pytest.mark.parametrize("config, key", [
    (InputConfig(manifest="sftp://example.invalid/m.jsonl"), "input.manifest"),
    (InputConfig(manifest="nosuchscheme://x/m.csv"), "input.manifest"),
    (InputConfig(tars="git://example.invalid/s-{0..2}.tar"), "input.tars"),
])
def test_a_url_scheme_fsspec_cannot_open_is_one_line_naming_the_key(config, key):
    with pytest.raises(ConfigError, match="cannot open") as e:
        check_readable(config)
    assert e.value.key == key and "\n" not in str(e.value)


def test_brace_patterns_expand_lazily_and_are_counted_against_max_tars():
    import itertools
    import time
    start = time.perf_counter()
    huge = iter_braces("s-{000000000..999999999}.tar")
    assert list(itertools.islice(huge, 2)) == ["s-000000000.tar", "s-000000001.tar"]
    with pytest.raises(ConfigError, match="input.max_tars=1000"):
        InputConfig(tars="s-{000000000..999999999}.tar", max_tars=1000).validate()
    assert time.perf_counter() - start < 5
    assert len(InputConfig(tars=["a-{0..4}.tar", "b-{0..4}.tar"], max_tars=10).tar_urls()) == 10
    with pytest.raises(ConfigError, match="max_tars"):
        InputConfig(tars=["a-{0..4}.tar", "b-{0..5}.tar"], max_tars=10).tar_urls()
    assert expand_braces("x" + "{a}" * 3000) == ["x" + "a" * 3000]   # many groups: a stack, not recursion
    for bad, words in [("s-{5..1}.tar", "names no tar file"), ([], "names no tar file"),
                       ("s-{0..1234567890123456789}.tar", "over 18 digits")]:
        with pytest.raises(ConfigError, match=words):
            InputConfig(tars=bad).validate()
    with pytest.raises(ConfigError, match="max_tars"):
        InputConfig(tars="a.tar", max_tars=0).validate()


def test_a_damaged_tar_keeps_the_samples_before_it_and_later_tars_still_run(tmp_path):
    make_tar(tmp_path / "in-0.tar", [(f"{i:03d}", {"txt": b"t" * 600, "jpg": b"J" * 600}) for i in range(4)])
    data = (tmp_path / "in-0.tar").read_bytes()
    cut = data.index(b"002.txt")
    (tmp_path / "in-0.tar").write_bytes(data[: cut + 512 + 100])   # inside sample 002's first member
    make_tar(tmp_path / "in-1.tar", [("100", {"txt": b"x"})])
    records = list(iter_records(InputConfig(tars=str(tmp_path / "in-{0..1}.tar"))))
    assert [(r.row, r.id, r.error_reason if r.error else None) for r in records] == [
        (0, "000", None), (1, "001", None), (2, "002", "corrupt_tar"), (3, "100", None)]
    assert str(tmp_path / "in-0.tar") in records[2].error and "2 sample(s)" in records[2].error


@pytest.mark.parametrize("damage", ["truncated header", "garbage header", "zeroed header", "joined", "not a tar",
                                    "gzip crc"])
def test_every_kind_of_tar_damage_is_one_corrupt_tar_entry(tmp_path, damage):
    import gzip
    make_tar(tmp_path / "t.tar", [(f"{i:03d}", {"txt": b"t" * 600}) for i in range(3)])
    data = bytearray((tmp_path / "t.tar").read_bytes())
    second = data.index(b"001.txt")
    if damage == "truncated header":
        data = data[: second + 100]
    elif damage == "garbage header":
        data[second: second + 100] = b"x" * 100
    elif damage == "zeroed header":
        data[second: second + 512] = bytes(512)
    elif damage == "joined":
        data = data + data
    elif damage == "not a tar":
        data = bytearray(b"<html>not found</html>")
    else:
        data = bytearray(gzip.compress(bytes(data), mtime=0))
        data[-8] ^= 0xFF
    (tmp_path / "t.tar").write_bytes(bytes(data))
    records = list(iter_records(InputConfig(tars=str(tmp_path / "t.tar"))))
    damaged = [r for r in records if r.error]
    assert len(damaged) == 1 and damaged[0].error_reason == "corrupt_tar", [(r.id, r.error) for r in records]
    assert damaged[0] is records[-1] and [r.row for r in records] == list(range(len(records)))


def test_tar_members_over_the_cap_twice_or_with_unusable_keys_reject_their_sample(tmp_path, monkeypatch):
    monkeypatch.setattr(manifests, "MAX_TAR_MEMBER_BYTES", 100)
    make_tar(tmp_path / "t.tar", [("big", {"jpg": b"J" * 101}), ("ok", {"txt": b"t"}), ("bad\udcff", {"txt": b"t"}),
                                  ("j", {"txt": b"t", "json": b'{"id": ""}'}), ("k", {"txt": b"t", "json": b"[1"})])
    with tarfile.open(tmp_path / "t.tar", "a") as tar:
        for _ in range(2):
            info = tarfile.TarInfo("dup.txt")
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
    records = list(iter_records(InputConfig(tars=str(tmp_path / "t.tar"))))
    assert [(r.id, r.error_reason if r.error else None) for r in records] == [
        ("big", "file_too_large"), ("ok", None), ("row-000000002", "invalid_utf8"), ("j", "invalid_id"),
        ("k", "bad_row"), ("dup", "bad_row")]
