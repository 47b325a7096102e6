"""Manifest files (JSONL, CSV, Parquet) -> rows, streamed line by line or batch by batch.

Each reader yields (where, the row's data or a RowError) per row: a bad row is a RowError in its place, never a
crash, so that sources.py can still count and report it; a problem with the whole file is a ConfigError.
What every input reader shares lives here too (RowError, the bounds on one row): tar_samples.py and sources.py
import it from this module, which imports neither.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass
from typing import Any, Iterator

import fsspec

from mmdata.config import ConfigError
from mmdata.schema import one_line

# Every input is hostile; these bound what one row can cost. A JSONL line or CSV record longer than
# MAX_ROW_CHARS is one bad row (row_too_large), read in bounded pieces and skipped, never held whole
# (texts have their own, smaller cap: text.max_chars). A tar member over MAX_TAR_MEMBER_BYTES (the most
# any modality's max_bytes may be) is not read (file_too_large). Metadata nested deeper than
# MAX_META_DEPTH could not be written back as JSON (bad_row).
# One policy, so one place: tar_samples.py and sources.py take their bounds from here too.
MAX_ROW_CHARS = 16 << 20
MAX_TAR_MEMBER_BYTES = 1 << 30
MAX_META_DEPTH = 64
_BOM = "\ufeff"
SURROGATE = re.compile("[\ud800-\udfff]")   # what undecodable bytes become under surrogateescape


@dataclass(frozen=True)
class RowError:
    """A row that cannot become a sample, as the readers yield it (instead of the row's data)."""
    reason: str                     # a short stable slug: bad_row, invalid_utf8, ragged_row, row_too_large...
    message: str                    # deterministic: names the file and the line/row, no object reprs


def manifest_format(path: str) -> str | None:
    lower = path.lower()
    for suffix, fmt in ((".jsonl", "jsonl"), (".json", "jsonl"), (".csv", "csv"), (".parquet", "parquet")):
        if lower.endswith(suffix):
            return fmt
    return None


def check_manifest_content(url: str, fs, path: str) -> None:
    """The manifest is what its extension says: Parquet (its footer and schema read), or UTF-8 text (no NUL
    bytes: not binary, compressed or UTF-16) with, for CSV, a header line."""
    fmt = manifest_format(url)
    try:
        with fs.open(path, "rb") as f:
            if fmt == "parquet":
                import pyarrow.parquet as pq
                check_columns(pq.ParquetFile(f).schema_arrow.names, url)
                return
            head = f.read(1 << 16)
    except ConfigError:
        raise
    except Exception as e:
        what = "a readable Parquet file" if fmt == "parquet" else "readable"
        raise ConfigError("input.manifest", f"{url} is not {what}: {one_line(e)}") from None
    if b"\0" in head:
        raise ConfigError("input.manifest", f"{url} is not UTF-8 text (it holds NUL bytes: binary, compressed or "
                                            f"UTF-16?); a {fmt.upper()} manifest must be UTF-8 text")
    if fmt == "csv" and len(head) < (1 << 16) and not head.decode("utf-8", "replace").lstrip(_BOM).strip():
        raise ConfigError("input.manifest", f"{url} is empty: a CSV manifest needs a header line "
                                            "(e.g. id,text,image,audio,label)")
    if fmt == "csv":   # the header's own problems (a column twice...) stop here too, not after a scan
        try:
            with fs.open(path, "rb") as f:
                next(csv_rows(read_lines(f), url), None)
        except OSError as e:
            raise ConfigError("input.manifest", f"cannot read {url}: {one_line(e)}") from None


def check_columns(names: list[str], url: str) -> None:
    """Column names of a CSV header or Parquet schema: unique (a repeated one would silently lose values) and
    valid UTF-8."""
    seen = set()
    for name in names:
        if SURROGATE.search(name):
            raise ConfigError("input.manifest", f"the column names of {url} are not valid UTF-8: "
                                                f"{printable(name)[:100]!r}")
        if name in seen:
            raise ConfigError("input.manifest", f"column {name[:100]!r} appears twice in {url}; rename or drop one")
        seen.add(name)


def printable(text: str) -> str:
    """``text`` with undecodable bytes (lone surrogates) spelled as escapes, so a message can be written."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def iter_manifest_rows(url: str, storage_options: dict) -> Iterator[tuple[str, dict | RowError]]:
    """(where, the row's data or why it has none) per row; ``where`` names the line or row and the file.

    A problem with the whole file (not Parquet, a bad CSV header, unreadable) is a ConfigError."""
    fmt = manifest_format(url)
    try:
        with fsspec.open(url, "rb", **storage_options) as f:
            if fmt == "parquet":
                yield from parquet_rows(f, url)
            elif fmt == "csv":
                yield from csv_rows(read_lines(f), url)
            else:
                yield from jsonl_rows(read_lines(f), url)
    except OSError as e:
        raise ConfigError("input.manifest", f"cannot read {url}: {one_line(e)}") from None


def read_lines(f) -> Iterator[tuple[int, str, bool]]:
    """(line number, piece, whether the line ends with it) from a binary stream.

    Lines split the way ``open(newline="")`` splits them (\\n, \\r\\n or \\r; ends kept), so CSV quoting works
    across lines. Undecodable bytes become lone surrogates (surrogateescape): the row they are in is then
    reported as invalid_utf8 instead of failing the file. A leading UTF-8 byte order mark is dropped. A line
    of up to MAX_ROW_CHARS characters is one piece; a longer one comes in pieces of MAX_ROW_CHARS + 1, so
    that memory stays bounded whatever the file holds.
    """
    text = io.TextIOWrapper(f, encoding="utf-8", errors="surrogateescape", newline="")
    number, continued = 0, False
    while True:
        piece = text.readline(MAX_ROW_CHARS + 1)
        if not piece:
            if continued:
                yield number, "", True
            return
        if not continued:
            number += 1
        ends = piece.endswith(("\n", "\r")) or len(piece) <= MAX_ROW_CHARS
        if number == 1 and not continued and piece.startswith(_BOM):
            piece = piece[1:]
        yield number, piece, ends
        continued = not ends


def jsonl_rows(lines: Iterator[tuple[int, str, bool]], url: str) -> Iterator[tuple[str, dict | RowError]]:
    for number, line, ends in lines:
        where = f"line {number} of {url}"
        if not ends:
            for _, _, ends in lines:   # the rest of the over-long line, unkept
                if ends:
                    break
            yield where, RowError("row_too_large", f"{where} is longer than {MAX_ROW_CHARS} characters")
            continue
        if not line.strip():
            continue
        try:
            data = loads_json(line)
        except json.JSONDecodeError as e:
            yield where, RowError("bad_row", f"{where} is not valid JSON: {e.msg} at column {e.colno}")
            continue
        except (ValueError, RecursionError) as e:   # a key twice, an integer of over 4300 digits, deep nesting
            yield where, RowError("bad_row", f"{where} is not usable JSON: {one_line(e)}")
            continue
        if not isinstance(data, dict):
            yield where, RowError("bad_row", f"{where} must be a JSON object; got {json_kind(data)}")
            continue
        yield where, data


def loads_json(text: str | bytes) -> Any:
    """json.loads, except that a key given twice in one object is an error (the first value would be lost)."""
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"key {printable(key)[:100]!r} appears twice in one object")
            seen.add(key)
    return obj


def json_kind(value: Any) -> str:
    """A value's kind for a message, the same every run (no reprs of arbitrary objects)."""
    if value is None:
        return "null (or an empty cell)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"the number {value!r}"
    if isinstance(value, str):
        return "a string"
    kinds = {dict: "an object", list: "a list", tuple: "a list", bytes: "bytes", int: "an integer"}
    return next((kind for t, kind in kinds.items() if isinstance(value, t)), f"a {type(value).__name__}")


def csv_rows(lines: Iterator[tuple[int, str, bool]], url: str) -> Iterator[tuple[str, dict | RowError]]:
    """CSV (Excel dialect: comma, double quotes) with a header line; each record checked on its own.

    A record longer than MAX_ROW_CHARS (row_too_large), one with more or fewer fields than the header
    (ragged_row) or one the csv module refuses is one bad row: csv.reader reads from ``lines`` one line
    at a time, so after a bad record it goes on with the next line, and CsvFeed first skips the rest of
    a bad record (its quoting decides where that is). A quoted field left open at the end of the file
    (unclosed_quote) would otherwise swallow every line after it into one field, unreported.

    An empty cell is absent (None): CSV has no null, and it is how csv.writer and pandas write a missing
    value, e.g. the text of an image-only row. So an empty text, image or audio cell means "this row has no
    such modality", as a missing key or null does in JSONL (a JSONL "" is an empty text: empty_text); a text
    of only spaces is present, and reported as empty_text. A row left with nothing is still reported
    (no_modalities). An empty id cell is an error (invalid_id): the id column exists, so every row needs one.
    """
    if csv.field_size_limit() < MAX_ROW_CHARS:   # process-wide; only ever raised. CsvFeed bounds each record
        csv.field_size_limit(MAX_ROW_CHARS)
    feed = CsvFeed(lines)
    reader = csv.reader(feed)
    header: list[str] | None = None
    while True:
        feed.start_record()
        try:
            fields = next(reader)
        except StopIteration:
            break
        except (RowTooLarge, csv.Error) as e:
            first = feed.first_line
            open_at_end = feed.skip_record()
            where = f"line {first} of {url}"
            if header is None:
                raise ConfigError("input.manifest", f"the header of {url} (line {first}) cannot be read: "
                                                    f"{one_line(e)}") from None
            if open_at_end:
                yield where, unclosed_quote(where, feed.number)
            elif isinstance(e, RowTooLarge):
                yield where, RowError("row_too_large", f"{where} starts a record longer than {MAX_ROW_CHARS} "
                                                       f"characters (to line {feed.number})")
            else:
                yield where, RowError("bad_row", f"{where} is not valid CSV: {one_line(e)}")
            continue
        where = f"line {feed.first_line} of {url}"
        if feed.exhausted:   # csv.reader asked past the end: only a quoted field left open does that
            if header is None:
                raise ConfigError("input.manifest", f"the header of {url} opens a quoted field that is never "
                                                    "closed")
            yield where, unclosed_quote(where, feed.number)
            continue
        if not fields:
            continue   # a blank line
        if header is None:
            check_columns(fields, url)
            header = fields
            continue
        if len(fields) != len(header):
            yield where, RowError("ragged_row", f"{where} has {len(fields)} fields but the header has "
                                                f"{len(header)}")
            continue
        yield where, {name: (value if value != "" else None) for name, value in zip(header, fields)}
    if header is None:
        raise ConfigError("input.manifest", f"{url} is empty: a CSV manifest needs a header line "
                                            "(e.g. id,text,image,audio,label)")


def unclosed_quote(where: str, last: int) -> RowError:
    return RowError("unclosed_quote", f"{where} opens a quoted field that is never closed: lines from there to "
                                      f"the end of the file (line {last}) are one unusable record")


class RowTooLarge(Exception):
    """Raised by CsvFeed inside csv.reader: the current record is over MAX_ROW_CHARS."""


# CSV quoting states (those of CPython's _csv.c that matter for where a record ends)
_START, _IN_FIELD, _QUOTED, _QUOTE_IN_QUOTED = range(4)
_CSV_TOKENS = re.compile(r'"+|,+|[^",]+')


def csv_state(text: str, state: int) -> int:
    """The quoting state after ``text`` (no line ends in it), for the Excel dialect: doubled quotes in a quoted
    field are one quote; a quote inside an unquoted field is a plain character (strict=False)."""
    for match in _CSV_TOKENS.finditer(text):
        token = match.group()
        if token[0] == '"':
            odd = len(token) % 2
            if state == _START:
                state = _QUOTED if odd else _QUOTE_IN_QUOTED
            elif state == _QUOTED:
                state = _QUOTE_IN_QUOTED if odd else _QUOTED
            elif state == _QUOTE_IN_QUOTED:   # the first quote doubles the pending one
                state = _QUOTED if odd else _QUOTE_IN_QUOTED
        elif state != _QUOTED:
            state = _START if token[0] == "," else _IN_FIELD
    return state


class CsvFeed:
    """The lines csv.reader reads, with each record's size bounded and a way to skip the rest of a bad one."""

    def __init__(self, lines: Iterator[tuple[int, str, bool]]):
        self.lines = lines
        self.number = 0             # the last line read
        self.first_line = 1         # where the current record starts
        self.record: list[str] = []  # its lines so far (at most MAX_ROW_CHARS characters)
        self.size = 0
        self.exhausted = False      # the end of the file came inside the current record
        self.overflow: tuple[str, bool] | None = None   # the piece that made the record too long

    def start_record(self) -> None:
        self.first_line, self.record, self.size, self.exhausted, self.overflow = self.number + 1, [], 0, False, None

    def __iter__(self) -> "CsvFeed":
        return self

    def __next__(self) -> str:
        try:
            self.number, piece, ends = next(self.lines)
        except StopIteration:
            self.exhausted = True
            raise
        if not ends or self.size + len(piece) > MAX_ROW_CHARS:
            self.overflow = (piece, ends)
            raise RowTooLarge(f"a record longer than {MAX_ROW_CHARS} characters")
        self.record.append(piece)
        self.size += len(piece)
        return piece

    def skip_record(self) -> bool:
        """Read, unkept, to the end of the current (bad) record; whether the file ended inside a quoted field."""
        state = _START
        for line in self.record:
            state = csv_state(line.rstrip("\r\n"), state)
        piece, ends = self.overflow if self.overflow is not None else ("", True)
        if self.overflow is None and state != _QUOTED:
            return False
        while True:
            state = csv_state(piece.rstrip("\r\n") if ends else piece, state)
            if ends and state != _QUOTED:
                return False
            try:
                self.number, piece, ends = next(self.lines)
            except StopIteration:
                return True


def parquet_rows(f, url: str) -> Iterator[tuple[str, dict | RowError]]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
        parquet = pq.ParquetFile(f)
        check_columns(parquet.schema_arrow.names, url)
        row = 0
        for batch in parquet.iter_batches(batch_size=1024):
            try:
                rows = batch.to_pylist()
            except UnicodeDecodeError:   # a string column with bytes that are not UTF-8: find the rows
                rows = [parquet_row(batch, i) for i in range(batch.num_rows)]
            for data in rows:
                where = f"row {row} of {url}"
                yield where, (RowError("invalid_utf8", f"{where} has a string that is not valid UTF-8")
                              if data is None else data)
                row += 1
    except (pa.ArrowException, OSError) as e:
        raise ConfigError("input.manifest", f"{url} is not a readable Parquet file: {one_line(e)}") from None


def parquet_row(batch, i: int) -> dict | None:
    try:
        return batch.slice(i, 1).to_pylist()[0]
    except UnicodeDecodeError:
        return None
