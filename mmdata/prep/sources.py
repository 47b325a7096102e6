"""Input sources: manifests (JSONL, CSV, Parquet) and existing WebDataset tars -> Records.

Everything streams: manifests are read line by line or batch by batch,
tars member by member, so memory does not depend on the input's size.
Image/audio references from a manifest stay references (resolved paths or
URLs, read later by the worker that processes them); tar members arrive
inline as bytes.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import lzma
import posixpath
import re
import tarfile
import zlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import fsspec

from mmdata.config import ConfigError, require, require_choice
from mmdata.schema import one_line

RESERVED = ("id", "text", "image", "audio", "label")
IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")
AUDIO_SUFFIXES = ("wav", "flac", "ogg", "mp3", "opus")
TEXT_SUFFIXES = ("txt", "caption", "text")
LABEL_SUFFIXES = ("cls", "cls2", "label")

# Every input is hostile; these bound what one row can cost. A JSONL line or CSV record longer than
# MAX_ROW_CHARS is one bad row (row_too_large), read in bounded pieces and skipped, never held whole
# (texts have their own, smaller cap: text.max_chars). A tar member over MAX_TAR_MEMBER_BYTES (the most
# any modality's max_bytes may be) is not read (file_too_large). Metadata nested deeper than
# MAX_META_DEPTH could not be written back as JSON (bad_row).
MAX_ROW_CHARS = 16 << 20
MAX_TAR_MEMBER_BYTES = 1 << 30
MAX_META_DEPTH = 64
DEFAULT_MAX_TARS = 1_000_000
_BOM = "\ufeff"
_SURROGATE = re.compile("[\ud800-\udfff]")   # what undecodable bytes become under surrogateescape


@dataclass
class InputConfig:
    manifest: str | None = None     # .jsonl / .csv / .parquet path or URL
    tars: list[str] | str | None = None  # tar paths/URLs, or one brace pattern "shards-{000..009}.tar"
    file_identity: str = "stat"     # stat (size + mtime) | content (hash of bytes): what "unchanged file" means
    storage_options: dict = field(default_factory=dict)  # passed to fsspec (e.g. endpoint_url)
    timeout_s: float = 30.0         # per attempt to read a file a row refers to by URL
    retries: int = 2                # further attempts after a transient URL error or a timeout
    max_tars: int = DEFAULT_MAX_TARS  # input.tars may name at most this many tars (brace patterns counted)

    def validate(self) -> None:
        require((self.manifest is None) != (self.tars is None), "manifest",
                "give exactly one of input.manifest or input.tars")
        if self.manifest is not None:
            require(manifest_format(self.manifest) is not None, "manifest",
                    f"must end in .jsonl, .json, .csv or .parquet; got {self.manifest!r}")
        require_choice(self.file_identity, "file_identity", ("stat", "content"))
        require(0 < self.timeout_s <= 3600, "timeout_s", f"must be in (0, 3600] seconds; got {self.timeout_s}")
        require(0 <= self.retries <= 10, "retries", f"must be between 0 and 10; got {self.retries}")
        require(self.max_tars >= 1, "max_tars", f"must be at least 1; got {self.max_tars}")
        if self.tars is not None:   # counted lazily: a pattern of a billion names fails here, allocating nothing
            require(sum(1 for _ in self.iter_tar_urls()) > 0, "tars", "names no tar file (an empty list, or a "
                    f"brace range that runs backwards); got {str(self.tars)[:200]}")

    def iter_tar_urls(self) -> Iterator[str]:
        """Every tar URL, brace patterns expanded lazily; ConfigError past ``max_tars`` of them."""
        patterns = [self.tars] if isinstance(self.tars, str) else list(self.tars or [])
        count = 0
        for pattern in patterns:
            for url in iter_braces(pattern):
                count += 1
                if count > self.max_tars:
                    raise ConfigError("input.tars", f"names more than input.max_tars={self.max_tars} tar files; "
                                                    "split the job, or raise input.max_tars")
                yield url

    def tar_urls(self) -> list[str]:
        """Every tar URL (at most ``max_tars``), e.g. for dataset.json."""
        return list(self.iter_tar_urls())


@dataclass
class Record:
    """One input sample before processing. ``image``/``audio`` are a URL or inline bytes."""
    row: int
    id: str
    text: Any = None
    image: str | bytes | None = None
    audio: str | bytes | None = None
    label: Any = None
    meta: dict = field(default_factory=dict)
    error: str | None = None        # the row itself is unusable (bad JSON line...): rejected with error_reason
    error_reason: str = "bad_row"   # the reason it is counted under (a short stable slug)


@dataclass(frozen=True)
class RowError:
    """A row that cannot become a sample, as the readers yield it (instead of the row's data)."""
    reason: str                     # a short stable slug: bad_row, invalid_utf8, ragged_row, row_too_large...
    message: str                    # deterministic: names the file and the line/row, no object reprs


class BadValue(ValueError):
    """One value of a row breaks the input rules (an id that is a list...): the row is rejected."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def manifest_format(path: str) -> str | None:
    lower = path.lower()
    for suffix, fmt in ((".jsonl", "jsonl"), (".json", "jsonl"), (".csv", "csv"), (".parquet", "parquet")):
        if lower.endswith(suffix):
            return fmt
    return None


_BRACES = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"(\d+)\.\.(\d+)")


def expand_braces(pattern: str) -> list[str]:
    """``a-{000..002}.tar`` -> a-000.tar, a-001.tar, a-002.tar (zero padding kept); ``{x,y}`` lists."""
    return list(iter_braces(pattern))


def iter_braces(pattern: str) -> Iterator[str]:
    """What :func:`expand_braces` lists, one at a time: nothing is expanded ahead (a range of a billion names
    costs nothing until iterated) and nesting is a stack, not recursion (any number of groups)."""
    stack: list[Iterator[str]] = [iter((pattern,))]
    while stack:
        text = next(stack[-1], None)
        if text is None:
            stack.pop()
            continue
        match = _BRACES.search(text)
        if match is None:
            yield text
            continue
        stack.append(_joined(text[:match.start()], _brace_items(match.group(1), pattern), text[match.end():]))


def _brace_items(body: str, pattern: str) -> Iterator[str]:
    rng = _RANGE.fullmatch(body)
    if rng is None:
        return iter(body.split(","))
    lo, hi = rng.group(1), rng.group(2)
    if max(len(lo), len(hi)) > 18:
        raise ConfigError("input.tars", f"brace range {{{body[:60]}}} in {pattern[:200]!r} has numbers of over 18 "
                                        "digits")
    return (str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1))


def _joined(head: str, items: Iterator[str], tail: str) -> Iterator[str]:
    for item in items:
        yield head + item + tail


def check_readable(config: InputConfig) -> None:
    """Fail before any work when an input cannot be read: one line (ConfigError) naming the file or URL and
    the key. The manifest is looked into too: one that is not what its extension says stops here."""
    key = "input.manifest" if config.manifest else "input.tars"
    urls = [config.manifest] if config.manifest else config.iter_tar_urls()
    for url in urls:
        fs, path = filesystem(url, config.storage_options, key)
        try:
            ok = fs.isfile(path)
        except Exception as e:  # credentials, network: still "cannot read this input"
            raise ConfigError(key, f"cannot access {url}: {one_line(e)}") from None
        if not ok:
            raise ConfigError(key, f"{url} does not exist or is not a file")
        if config.manifest:
            check_manifest_content(url, fs, path)


def filesystem(url: str, storage_options: dict, key: str):
    """fsspec's (filesystem, path) for an input URL; a scheme it cannot open here is a ConfigError."""
    try:
        return fsspec.core.url_to_fs(url, **storage_options)
    except Exception as e:  # ImportError (sftp:// without paramiko), ValueError (unknown protocol), bad options
        raise ConfigError(key, f"cannot open {url}: {one_line(e)}; use a local path or a URL whose scheme "
                               "this installation supports (file://, s3://, http(s)://...)") from None


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
        if _SURROGATE.search(name):
            raise ConfigError("input.manifest", f"the column names of {url} are not valid UTF-8: "
                                                f"{printable(name)[:100]!r}")
        if name in seen:
            raise ConfigError("input.manifest", f"column {name[:100]!r} appears twice in {url}; rename or drop one")
        seen.add(name)


def printable(text: str) -> str:
    """``text`` with undecodable bytes (lone surrogates) spelled as escapes, so a message can be written."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def iter_records(config: InputConfig) -> Iterator[Record]:
    """All input samples in a fixed order, with row numbers 0, 1, 2... A row that cannot become a sample is
    still a Record (with ``error``), so that it is counted and reported, and the numbering never shifts."""
    if config.manifest:
        rows = iter_manifest_rows(config.manifest, config.storage_options)
        base = posixpath.dirname(config.manifest)
        for row, (where, data) in enumerate(rows):
            yield record_from_row(row, data, base, where)
    else:
        row = 0
        for url in config.iter_tar_urls():
            for key, members, problem in iter_tar_samples(url, config.storage_options):
                yield record_from_tar_sample(row, key, members, url, problem)
                row += 1


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


def record_from_row(row: int, data: dict | RowError, base: str, where: str = "") -> Record:
    """A manifest row -> Record. The id is a non-empty string or an integer (kept as its decimal string);
    without an id column/key a row gets ``row-000000042``; any other id rejects the row (invalid_id).
    Undecodable bytes outside the text (invalid_utf8) and image/audio values that are not paths, URLs
    or bytes (invalid_path) reject it too. Undecodable text is left to the text encoder, which reports it
    (invalid_utf8) and follows text.on_error like any other bad text."""
    fallback = f"row-{row:09d}"
    if isinstance(data, RowError):
        return Record(row=row, id=fallback, error=data.message, error_reason=data.reason)
    where = where or f"row {row}"
    sample_id = fallback
    try:
        if "id" in data:
            sample_id = check_id(data["id"])
        check_values(data, skip="text" if isinstance(data.get("text"), str) else "")
        image, audio = resolve(data.get("image"), base, "image"), resolve(data.get("audio"), base, "audio")
    except BadValue as e:
        return Record(row=row, id=sample_id, error=f"{where}: {e}", error_reason=e.reason)
    return Record(
        row=row,
        id=sample_id,
        text=data.get("text"),
        image=image,
        audio=audio,
        label=data.get("label"),
        meta={k: v for k, v in data.items() if k not in RESERVED},
    )


def check_id(value: Any) -> str:
    """A valid id as a string, or BadValue."""
    if isinstance(value, str):
        if _SURROGATE.search(value):
            raise BadValue("invalid_utf8", "id is not valid UTF-8")
        if not value.strip():
            raise BadValue("invalid_id", "id is empty; give every row an id, or leave the id column out for "
                                         "generated ones")
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise BadValue("invalid_id", f"id must be a non-empty string or an integer; got {json_kind(value)}")


def check_values(data: dict, skip: str = "") -> None:
    """check_value for every column but ``skip``, with the common flat case (plain scalars) made cheap."""
    for name, value in data.items():
        kind = type(value)
        if name == skip or ((kind is str and value.isascii()) or value is None or kind in (int, float, bool)) \
                and name.isascii():
            continue
        check_value(name, value)


def check_value(name: str, value: Any) -> None:
    """A column's name and value (nested ones included) hold no undecodable bytes and nest boundedly."""
    stack = [(name, 0), (value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if not item.isascii() and _SURROGATE.search(item):
                raise BadValue("invalid_utf8", f"column {printable(name)[:100]!r} is not valid UTF-8")
        elif isinstance(item, (dict, list, tuple)):
            if depth >= MAX_META_DEPTH:
                raise BadValue("bad_row", f"column {printable(name)[:100]!r} nests deeper than {MAX_META_DEPTH} "
                                          "levels")
            children = [x for pair in item.items() for x in pair] if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)


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


def resolve(ref: Any, base: str, column: str = "image") -> str | bytes | None:
    """Manifest paths are data: joined to the manifest's folder when relative, never executed. A value that
    is neither a path/URL string nor bytes (a number, a list...) is BadValue (invalid_path)."""
    if ref is None or ref == "":
        return None
    if isinstance(ref, (bytes, bytearray)):
        return bytes(ref)
    if not isinstance(ref, str):
        raise BadValue("invalid_path", f"{column} must be a path or URL (a string); got {json_kind(ref)}")
    if "\0" in ref:
        raise BadValue("invalid_path", f"{column} path contains a NUL character")
    if "://" in ref or ref.startswith("/"):
        return ref
    return posixpath.join(base, ref) if base else ref


class StrictTarInfo(tarfile.TarInfo):
    """tarfile ends a streamed archive quietly at a truncated or damaged header after the first one, which
    would drop the rest of the tar without a word: here that is an error (a ReadError)."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError, tarfile.InvalidHeaderError) as e:
            if tar.offset == 0:
                raise   # tarfile's own "empty file" / "not a tar"
            if isinstance(e, tarfile.EmptyHeaderError):
                raise tarfile.ReadError("it ends without an end-of-archive marker (truncated?)") from None
            raise tarfile.ReadError(f"damaged header at byte {tar.offset} ({one_line(e)})") from None


def iter_tar_samples(url: str, storage_options: dict) -> Iterator[tuple[str | None, dict[str, bytes],
                                                                       RowError | None]]:
    """Group consecutive tar members by key (WebDataset convention: key = name up to the first dot).

    Yields (key, members, problem). A member twice in one sample or over MAX_TAR_MEMBER_BYTES is the
    sample's problem. A truncated or damaged tar ends with one more item, (the key of the sample it
    was reading or None, its members, RowError("corrupt_tar")): the samples before the damage are kept,
    the one it cut may be incomplete and is rejected, and the next tar is read as usual.
    """
    key, members, problem, kept = None, {}, None, 0
    try:
        with fsspec.open(url, "rb", **storage_options) as f, \
                tarfile.open(fileobj=tar_stream(f), mode="r|", tarinfo=StrictTarInfo) as tar:
            for info in tar:
                tar.members = []   # streaming: keep no list of every header read
                if not info.isfile():
                    continue
                base = posixpath.basename(info.name)
                if "." not in base:
                    continue
                prefix, suffix = info.name[: len(info.name) - len(base)], base.split(".", 1)
                member_key, ext = prefix + suffix[0], suffix[1].lower()
                if member_key != key and key is not None:
                    yield key, members, problem
                    kept, members, problem = kept + 1, {}, None
                key = member_key
                name = printable(info.name)[:200]
                if ext in members:
                    problem = problem or RowError("bad_row", f"member {name} appears twice in a row in tar {url}")
                elif info.size > MAX_TAR_MEMBER_BYTES:
                    problem = problem or RowError("file_too_large", f"member {name} of tar {url} has {info.size} "
                                                                    f"bytes, over the limit of {MAX_TAR_MEMBER_BYTES}")
                else:
                    members[ext] = tar.extractfile(info).read()
            trailing = data_after_end(tar.fileobj)
    except (tarfile.TarError, EOFError, OSError, ValueError, zlib.error, lzma.LZMAError) as e:
        yield key, members, RowError("corrupt_tar", tar_damage(url, one_line(e), kept, key))
        return
    if key is not None:   # the archive ended cleanly after it: complete
        yield key, members, problem
        kept += 1
    if trailing:
        yield None, {}, RowError("corrupt_tar", tar_damage(url, "there is data after its end-of-archive marker "
                                                               "(a zeroed block inside it, or tars joined)", kept))


def tar_damage(url: str, what: str, kept: int, cut: str | None = None) -> str:
    message = f"tar {url} is damaged or truncated: {what}; the {kept} sample(s) read before that are kept"
    if cut is not None:
        message += f"; sample {printable(cut)[:200]!r}, which it cuts, may be incomplete and is rejected"
    return message


def tar_stream(f):
    """A tar's bytes, decompressed when they are gzip, bzip2 or xz (told by magic number, as tarfile's r|* does)
    through the decompressors' own file objects: unlike tarfile's stream they check the data's checksums, so
    corrupt compressed data is an error rather than silently different bytes."""
    head = f.read(6)
    raw = io.BufferedReader(Rewound(head, f), buffer_size=1 << 20)
    if head.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if head.startswith(b"BZh"):
        return bz2.BZ2File(raw)
    if head.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMAFile(raw)
    return raw


class Rewound(io.RawIOBase):
    """A stream with the bytes already read from it (to sniff them) put back in front; no seeking needed."""

    def __init__(self, head: bytes, stream):
        self.head, self.stream = head, stream

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.head:
            n = min(len(buffer), len(self.head))
            buffer[:n], self.head = self.head[:n], self.head[n:]
            return n
        data = self.stream.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)


def data_after_end(stream) -> bool:
    """Whether anything but zeros follows the end-of-archive marker (read in bounded chunks, stopping at the
    first non-zero one): a zeroed block looks like the end to tarfile, which then stops quietly."""
    while True:
        chunk = stream.read(1 << 16)
        if not chunk:
            return False
        if chunk.count(0) != len(chunk):
            return True


def record_from_tar_sample(row: int, key: str | None, members: dict[str, bytes], url: str,
                           problem: RowError | None = None) -> Record:
    fallback = f"row-{row:09d}"
    usable_key = bool(key and key.strip() and not _SURROGATE.search(key))
    if problem is not None:
        return Record(row=row, id=key if usable_key else fallback, error=problem.message,
                      error_reason=problem.reason)
    where = f"sample {printable(key or '')[:200]!r} of tar {url}"
    if not usable_key:
        reason = "invalid_utf8" if key and _SURROGATE.search(key) else "invalid_id"
        return Record(row=row, id=fallback, error=f"{where}: its key is not a usable id", error_reason=reason)
    sample_id = key
    meta: dict = {}
    if "json" in members:
        try:
            loaded = loads_json(members["json"])
            meta = loaded if isinstance(loaded, dict) else {"json": loaded}
        except ValueError as e:   # not JSON, not UTF-8, a key twice, nested too deeply
            return Record(row=row, id=key, error=f"{key}.json in {url} is not valid JSON: {one_line(e)}")
    try:
        check_values(meta)
        if isinstance(meta.get("id"), str):   # documented: the json's string id, or else the key
            sample_id = check_id(meta.pop("id"))
    except BadValue as e:
        return Record(row=row, id=key, error=f"{where}: {e}", error_reason=e.reason)
    pick = lambda suffixes: next((members[s] for s in suffixes if s in members), None)  # noqa: E731
    label = pick(LABEL_SUFFIXES)
    return Record(
        row=row,
        id=sample_id,
        text=pick(TEXT_SUFFIXES),
        image=pick(IMAGE_SUFFIXES),
        audio=pick(AUDIO_SUFFIXES),
        label=label.decode("utf-8", "replace").strip() if label is not None else meta.pop("label", None),
        meta={**meta, "source": {"tar": url, "key": key}},
    )
