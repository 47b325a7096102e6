"""Input sources: manifests (JSONL, CSV, Parquet) and existing WebDataset tars -> Records.

Everything streams: manifests are read line by line or batch by batch,
tars member by member, so memory does not depend on the input's size.
Image/audio references from a manifest stay references (resolved paths or
URLs, read later by the worker that processes them); tar members arrive
inline as bytes.
"""

from __future__ import annotations

import csv
import io
import json
import posixpath
import re
import tarfile
from dataclasses import dataclass, field
from typing import Any, Iterator

import fsspec

from mmdata.config import ConfigError, require, require_choice

RESERVED = ("id", "text", "image", "audio", "label")
IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")
AUDIO_SUFFIXES = ("wav", "flac", "ogg", "mp3", "opus")
TEXT_SUFFIXES = ("txt", "caption", "text")
LABEL_SUFFIXES = ("cls", "cls2", "label")


@dataclass
class InputConfig:
    manifest: str | None = None     # .jsonl / .csv / .parquet path or URL
    tars: list[str] | str | None = None  # tar paths/URLs, or one brace pattern "shards-{000..009}.tar"
    file_identity: str = "stat"     # stat (size + mtime) | content (hash of bytes): what "unchanged file" means
    storage_options: dict = field(default_factory=dict)  # passed to fsspec (e.g. endpoint_url)

    def validate(self) -> None:
        require((self.manifest is None) != (self.tars is None), "manifest",
                "give exactly one of input.manifest or input.tars")
        if self.manifest is not None:
            require(manifest_format(self.manifest) is not None, "manifest",
                    f"must end in .jsonl, .json, .csv or .parquet; got {self.manifest!r}")
        require_choice(self.file_identity, "file_identity", ("stat", "content"))

    def tar_urls(self) -> list[str]:
        patterns = [self.tars] if isinstance(self.tars, str) else list(self.tars or [])
        return [url for p in patterns for url in expand_braces(p)]


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


def manifest_format(path: str) -> str | None:
    lower = path.lower()
    for suffix, fmt in ((".jsonl", "jsonl"), (".json", "jsonl"), (".csv", "csv"), (".parquet", "parquet")):
        if lower.endswith(suffix):
            return fmt
    return None


def expand_braces(pattern: str) -> list[str]:
    """``a-{000..002}.tar`` -> a-000.tar, a-001.tar, a-002.tar (zero padding kept); ``{x,y}`` lists."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if not match:
        return [pattern]
    head, tail, body = pattern[:match.start()], pattern[match.end():], match.group(1)
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.group(1), rng.group(2)
        items = [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]
    else:
        items = body.split(",")
    return [url for item in items for url in expand_braces(head + item + tail)]


def check_readable(config: InputConfig) -> None:
    """Fail before any work when an input is missing: ConfigError naming the file."""
    urls = [config.manifest] if config.manifest else config.tar_urls()
    for url in urls:
        fs, path = fsspec.core.url_to_fs(url, **config.storage_options)
        try:
            ok = fs.isfile(path)
        except Exception as e:  # credentials, network: still "cannot read this input"
            raise ConfigError("input", f"cannot access {url}: {e}") from None
        if not ok:
            key = "input.manifest" if config.manifest else "input.tars"
            raise ConfigError(key, f"{url} does not exist or is not a file")


def iter_records(config: InputConfig) -> Iterator[Record]:
    """All input samples in a fixed order, with row numbers 0, 1, 2..."""
    if config.manifest:
        rows = iter_manifest_rows(config.manifest, config.storage_options)
        base = posixpath.dirname(config.manifest)
        for row, data in enumerate(rows):
            yield record_from_row(row, data, base)
    else:
        row = 0
        for url in config.tar_urls():
            for key, members in iter_tar_samples(url, config.storage_options):
                yield record_from_tar_sample(row, key, members, url)
                row += 1


def iter_manifest_rows(url: str, storage_options: dict) -> Iterator[dict]:
    fmt = manifest_format(url)
    with fsspec.open(url, "rb", **storage_options) as f:
        if fmt == "parquet":
            import pyarrow.parquet as pq
            for batch in pq.ParquetFile(f).iter_batches(batch_size=1024):
                yield from batch.to_pylist()
            return
        # surrogateescape keeps undecodable bytes so text.check_text can report them per sample
        lines = io.TextIOWrapper(f, encoding="utf-8", errors="surrogateescape", newline="")
        if fmt == "csv":
            for data in csv.DictReader(lines):
                yield {k: (v if v != "" else None) for k, v in data.items()}
            return
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as e:
                data = {"__error__": f"line {number} of {url} is not valid JSON: {e.msg} at column {e.colno}"}
            if not isinstance(data, dict):
                data = {"__error__": f"line {number} of {url} must be a JSON object; got {type(data).__name__}"}
            yield data


def record_from_row(row: int, data: dict, base: str) -> Record:
    error = data.pop("__error__", None)
    meta = {k: v for k, v in data.items() if k not in RESERVED}
    sample_id = data.get("id")
    return Record(
        row=row,
        id=f"row-{row:09d}" if sample_id is None or sample_id == "" else str(sample_id),
        text=data.get("text"),
        image=resolve(data.get("image"), base),
        audio=resolve(data.get("audio"), base),
        label=data.get("label"),
        meta=meta,
        error=error,
    )


def resolve(ref: Any, base: str) -> str | bytes | None:
    """Manifest paths are data: joined to the manifest's folder when relative, never executed."""
    if ref is None or ref == "":
        return None
    if isinstance(ref, (bytes, bytearray)):
        return bytes(ref)
    ref = str(ref)
    if "://" in ref or ref.startswith("/"):
        return ref
    return posixpath.join(base, ref) if base else ref


def iter_tar_samples(url: str, storage_options: dict) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Group consecutive tar members by key (WebDataset convention: key = name up to the first dot)."""
    key, members = None, {}
    with fsspec.open(url, "rb", **storage_options) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        for info in tar:
            if not info.isfile():
                continue
            base = posixpath.basename(info.name)
            if "." not in base:
                continue
            prefix, suffix = info.name[: len(info.name) - len(base)], base.split(".", 1)
            member_key, ext = prefix + suffix[0], suffix[1].lower()
            if member_key != key and key is not None:
                yield key, members
                members = {}
            key = member_key
            members[ext] = tar.extractfile(info).read()
    if key is not None:
        yield key, members


def record_from_tar_sample(row: int, key: str, members: dict[str, bytes], url: str) -> Record:
    meta: dict = {}
    if "json" in members:
        try:
            loaded = json.loads(members["json"])
            meta = loaded if isinstance(loaded, dict) else {"json": loaded}
        except (json.JSONDecodeError, UnicodeDecodeError):
            return Record(row=row, id=key, error=f"{key}.json in {url} is not valid JSON")
    pick = lambda suffixes: next((members[s] for s in suffixes if s in members), None)  # noqa: E731
    label = pick(LABEL_SUFFIXES)
    sample_id = meta.pop("id", None) if isinstance(meta.get("id"), str) else None
    return Record(
        row=row,
        id=sample_id or key,
        text=pick(TEXT_SUFFIXES),
        image=pick(IMAGE_SUFFIXES),
        audio=pick(AUDIO_SUFFIXES),
        label=label.decode("utf-8", "replace").strip() if label is not None else meta.pop("label", None),
        meta={**meta, "source": {"tar": url, "key": key}},
    )
