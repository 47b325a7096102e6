"""Input sources -> Records: what the pipeline and the partitions import.

    input.manifest -> manifests.py: rows (dict, or RowError)           -> record_from_row        -> Record
    input.tars     -> braces.py: tar URLs -> tar_samples.py: samples   -> record_from_tar_sample -> Record

Everything streams: manifests are read line by line or batch by batch,
tars member by member, so memory does not depend on the input's size.
Image/audio references from a manifest stay references (resolved paths or
URLs, read later by the worker that processes them); tar members arrive
inline as bytes.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass, field
from typing import Any, Iterator

import fsspec

from mmdata.config import ConfigError, require, require_choice
from mmdata.prep.braces import iter_braces
from mmdata.prep.manifests import (SURROGATE, MAX_META_DEPTH, RowError, check_manifest_content, iter_manifest_rows,
                                   json_kind, loads_json, manifest_format, printable)
from mmdata.prep.tar_samples import iter_tar_samples
from mmdata.schema import one_line

RESERVED = ("id", "text", "image", "audio", "label", "split")
IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")
AUDIO_SUFFIXES = ("wav", "flac", "ogg", "mp3", "opus")
TEXT_SUFFIXES = ("txt", "caption", "text")
LABEL_SUFFIXES = ("cls", "cls2", "label")
DEFAULT_MAX_TARS = 1_000_000


@dataclass
class InputConfig:
    manifest: str | None = None     # .jsonl / .csv / .parquet path or URL
    tars: list[str] | str | None = None  # tar paths/URLs, or one brace pattern "shards-{000..009}.tar"
    file_identity: str = "stat"     # stat (size + mtime or ETag) | content (hash of bytes) | name (the path or URL
    #                                 alone: no request per row; for web-scale URL lists): what "unchanged file" means
    storage_options: dict = field(default_factory=dict)  # passed to fsspec (e.g. endpoint_url)
    timeout_s: float = 30.0         # per attempt to read a file a row refers to by URL
    retries: int = 2                # further attempts after a transient URL error or a timeout
    read_threads: int = 8           # files read ahead at once in each partition (URL latency overlaps the encoding)
    max_tars: int = DEFAULT_MAX_TARS  # input.tars may name at most this many tars (brace patterns counted)

    def validate(self) -> None:
        require((self.manifest is None) != (self.tars is None), "manifest",
                "give exactly one of input.manifest or input.tars")
        if self.manifest is not None:
            require(manifest_format(self.manifest) is not None, "manifest",
                    f"must end in .jsonl, .json, .csv or .parquet; got {self.manifest!r}")
        require_choice(self.file_identity, "file_identity", ("stat", "content", "name"))
        require(0 < self.timeout_s <= 3600, "timeout_s", f"must be in (0, 3600] seconds; got {self.timeout_s}")
        require(0 <= self.retries <= 10, "retries", f"must be between 0 and 10; got {self.retries}")
        require(1 <= self.read_threads <= 256, "read_threads", f"must be between 1 and 256; got {self.read_threads}")
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
    split: str | None = None        # the input's own train/eval split ("train", "eval", "test"...), if it has one
    meta: dict = field(default_factory=dict)
    error: str | None = None        # the row itself is unusable (bad JSON line...): rejected with error_reason
    error_reason: str = "bad_row"   # the reason it is counted under (a short stable slug)


class BadValue(ValueError):
    """One value of a row breaks the input rules (an id that is a list...): the row is rejected."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


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
        split = check_split(data.get("split"))
    except BadValue as e:
        return Record(row=row, id=sample_id, error=f"{where}: {e}", error_reason=e.reason)
    return Record(
        row=row,
        id=sample_id,
        text=data.get("text"),
        image=image,
        audio=audio,
        label=data.get("label"),
        split=split,
        meta={k: v for k, v in data.items() if k not in RESERVED},
    )


SPLIT_NAME = re.compile(r"[A-Za-z0-9_-]{1,32}")


def check_split(value: Any) -> str | None:
    """A split name (``train``, ``eval``, ``test``...), or None for a row without one (no value, or empty)."""
    if value is None or value == "":
        return None
    if not isinstance(value, str) or not SPLIT_NAME.fullmatch(value):
        raise BadValue("invalid_split", f"split {printable(str(value))[:40]!r} is not a split name (1-32 letters, "
                                        "digits, '_' or '-', such as train, eval or test)")
    return value


def check_id(value: Any) -> str:
    """A valid id as a string, or BadValue."""
    if isinstance(value, str):
        if SURROGATE.search(value):
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
            if not item.isascii() and SURROGATE.search(item):
                raise BadValue("invalid_utf8", f"column {printable(name)[:100]!r} is not valid UTF-8")
        elif isinstance(item, (dict, list, tuple)):
            if depth >= MAX_META_DEPTH:
                raise BadValue("bad_row", f"column {printable(name)[:100]!r} nests deeper than {MAX_META_DEPTH} "
                                          "levels")
            children = [x for pair in item.items() for x in pair] if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)


def resolve(ref: Any, base: str, column: str = "image") -> str | bytes | None:
    """Manifest paths are data: joined to the manifest's folder when relative, never executed. A value that
    is neither a path/URL string nor bytes (a number, a list...) is BadValue (invalid_path)."""
    if ref is None:
        return None
    if ref == "":   # JSONL or Parquet: a path left empty, reported when read (CSV's empty cells are None)
        return ""
    if isinstance(ref, (bytes, bytearray)):
        return bytes(ref)
    if not isinstance(ref, str):
        raise BadValue("invalid_path", f"{column} must be a path or URL (a string); got {json_kind(ref)}")
    if "\0" in ref:
        raise BadValue("invalid_path", f"{column} path contains a NUL character")
    if "://" in ref or ref.startswith("/"):
        return ref
    return posixpath.join(base, ref) if base else ref


def record_from_tar_sample(row: int, key: str | None, members: dict[str, bytes], url: str,
                           problem: RowError | None = None) -> Record:
    fallback = f"row-{row:09d}"
    usable_key = bool(key and key.strip() and not SURROGATE.search(key))
    if problem is not None:
        return Record(row=row, id=key if usable_key else fallback, error=problem.message,
                      error_reason=problem.reason)
    where = f"sample {printable(key or '')[:200]!r} of tar {url}"
    if not usable_key:
        reason = "invalid_utf8" if key and SURROGATE.search(key) else "invalid_id"
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
        split = check_split(meta.pop("split", None))
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
        split=split,
        meta={**meta, "source": {"tar": url, "key": key}},
    )
