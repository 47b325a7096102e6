"""A dataset directory's description (``dataset.json``) as one typed, validated object.

``dataset.json`` is written last by preprocessing, so its presence means the
directory is complete. Everything a reader needs of a dataset besides the
index and the shards is in it: the image size, mel bins and sample rate the
members were made with, the tokenizer's vocabulary and special ids, label
names, the shard list with counts, totals and fingerprints. It is parsed and
checked once, here; the loader, the trainer and the tools use the fields.
The format is described in docs/format.md.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from mmdata import storage
from mmdata.schema import DATASET_JSON, FORMAT_VERSION, INDEX_DIR, PROCESSING_VERSION, index_name


class DatasetError(Exception):
    """The directory is not a complete dataset this version can read."""


# Format versions this mmdata reads. Version 1 is version 2 without the per-member crc32 in the index
# (readers that do not check checksums read both the same way); version 3 adds the index's split column
# (absent before: no sample has a split of its own); mmdata writes FORMAT_VERSION.
READABLE_FORMAT_VERSIONS = (1, 2, 3)
assert FORMAT_VERSION in READABLE_FORMAT_VERSIONS
# what preprocessing names shards (schema.shard_name); anything else in a shard list is refused, so a
# damaged or hostile dataset.json cannot point readers outside the dataset directory
SHARD_NAME = re.compile(r"shard-[0-9]{6,}(_[0-9]+)?\.tar")
WIDS_INDEX = "wids-index.json"   # written by `mmdata wids-index`, the one file added to a finished dataset
PLAIN_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")   # a file next to dataset.json, no folders


@dataclass(frozen=True)
class ShardInfo:
    name: str                 # shard-000007.tar (see schema.shard_name)
    samples: int
    bytes: int
    partition: int            # the input partition it was built from
    fingerprint: str          # that partition's fingerprint (its folder in the store)


@dataclass(frozen=True)
class TokenizerInfo:
    file: str                 # the SentencePiece model, next to dataset.json
    sha256: str
    vocab_size: int
    trained: bool             # trained on the input (else given in text.tokenizer)
    bos_id: int               # -1 when the model has none
    eos_id: int
    pad_id: int


@dataclass(frozen=True)
class Totals:
    """Counts over partitions; they add: ``sum(parts, start=Totals())``."""
    samples_in: int = 0
    written: int = 0
    rejected: int = 0
    bytes: int = 0
    shards: int = 0
    modalities: dict[str, int] = field(default_factory=dict)        # samples that have each modality
    errors_by_reason: dict[str, int] = field(default_factory=dict)  # error entries by reason

    def __add__(self, other: "Totals") -> "Totals":
        return Totals(self.samples_in + other.samples_in, self.written + other.written,
                      self.rejected + other.rejected, self.bytes + other.bytes, self.shards + other.shards,
                      sorted_counts(Counter(self.modalities) + Counter(other.modalities)),
                      sorted_counts(Counter(self.errors_by_reason) + Counter(other.errors_by_reason)))

    @property
    def error_rate(self) -> float:
        return self.rejected / max(1, self.samples_in)

    def to_json(self) -> dict:
        return {"samples_in": self.samples_in, "written": self.written, "rejected": self.rejected,
                "bytes": self.bytes, "shards": self.shards, "modalities": dict(self.modalities),
                "errors_by_reason": dict(self.errors_by_reason)}


def sorted_counts(counts: dict[str, int]) -> dict[str, int]:
    return dict(sorted(counts.items()))


@dataclass(frozen=True)
class DatasetDescription:
    url: str                          # the dataset directory it was read from
    name: str
    fingerprint: str                  # of the whole dataset: partitions + output-affecting config
    format_version: int
    processing_version: int
    image_size: int                   # stored images fit (or fill) size x size
    n_mels: int
    sample_rate: int
    tokenizer: TokenizerInfo
    labels: dict[str, int] | None     # label name -> class, when the input's labels are names
    shards: tuple[ShardInfo, ...]
    totals: Totals
    source: dict[str, Any]            # the input it was built from (manifest or tars, rows)
    config: dict[str, Any]            # the full preprocess config, for the record
    versions: dict[str, str]          # library versions that built it
    # the fingerprint of every output-affecting setting (datasets with the same one differ only in their input
    # rows), and per member group: partitions computed for it, reused from the store, and from which datasets
    config_fingerprint: str = ""
    lineage: dict[str, Any] = field(default_factory=dict)

    @property
    def label_names(self) -> dict[int, str]:
        return {i: name for name, i in (self.labels or {}).items()}

    def shard_url(self, shard: ShardInfo) -> str:
        return storage.join(self.url, shard.name)

    def index_url(self, shard: ShardInfo) -> str:
        return storage.join(self.url, index_name(shard.name))

    @classmethod
    def from_json(cls, doc: Any, url: str) -> "DatasetDescription":
        """Parse and check a dataset.json document; DatasetError names the file and the key."""
        if not isinstance(doc, dict):
            raise DatasetError(f"{storage.join(url, DATASET_JSON)} does not hold a JSON object")
        version = doc.get("format_version")
        if type(version) is not int or version not in READABLE_FORMAT_VERSIONS:   # type(): True == 1
            raise DatasetError(f"{storage.join(url, DATASET_JSON)} has format version {version!r}; this mmdata "
                               f"reads versions {', '.join(map(str, READABLE_FORMAT_VERSIONS))} (upgrade mmdata, "
                               "or rebuild the dataset with this one)")
        get = Fields(doc, storage.join(url, DATASET_JSON))
        tokenizer = TokenizerInfo(**{f: get(f"tokenizer.{f}", t) for f, t in (
            ("file", str), ("sha256", str), ("vocab_size", int), ("trained", bool),
            ("bos_id", int), ("eos_id", int), ("pad_id", int))})
        get.check("tokenizer.file", tokenizer.file, PLAIN_NAME.fullmatch(tokenizer.file), "a file name")
        shards = tuple(ShardInfo(**{f: get(f"shards[{i}].{f}", t) for f, t in (
            ("name", str), ("samples", int), ("bytes", int), ("partition", int), ("fingerprint", str))})
            for i in range(len(get("shards", list))))
        named: set[str] = set()
        for i, shard in enumerate(shards):
            get.check(f"shards[{i}].name", shard.name, SHARD_NAME.fullmatch(shard.name) and shard.name not in named,
                      "shard-NNNNNN[_K].tar, listed once")
            named.add(shard.name)
        totals = Totals(**{f: get(f"totals.{f}", t) for f, t in (
            ("samples_in", int), ("written", int), ("rejected", int), ("bytes", int), ("shards", int),
            ("modalities", dict), ("errors_by_reason", dict))})
        labels = get("labels", dict, optional=True)
        for key, counts in (("totals.modalities", totals.modalities), ("totals.errors_by_reason",
                                                                        totals.errors_by_reason), ("labels", labels)):
            get.check(key, counts, all(type(n) is int for n in (counts or {}).values()), "a map of names to ints")
        return cls(url=url, name=get("name", str), fingerprint=get("fingerprint", str),
                   format_version=version, processing_version=get("processing_version", int),
                   image_size=get("config.image.size", int), n_mels=get("config.audio.n_mels", int),
                   sample_rate=get("config.audio.sample_rate", int), tokenizer=tokenizer,
                   labels=labels, shards=shards, totals=totals,
                   source=get("source", dict), config=get("config", dict), versions=get("versions", dict),
                   config_fingerprint=get("config_fingerprint", str, optional=True) or "",
                   lineage=get("lineage", dict, optional=True) or {})


def description_json(name: str, fingerprint: str, config: dict, source: dict, labels: dict[str, int] | None,
                     tokenizer: TokenizerInfo, shards: list[ShardInfo], totals: Totals, versions: dict,
                     config_fingerprint: str = "", lineage: dict | None = None) -> dict:
    """The dataset.json document that ``DatasetDescription.from_json`` reads back."""
    return {"format_version": FORMAT_VERSION, "processing_version": PROCESSING_VERSION, "name": name,
            "fingerprint": fingerprint, "config": config, "source": source, "labels": labels,
            "tokenizer": asdict(tokenizer), "shards": [asdict(s) for s in shards], "index": INDEX_DIR,
            "totals": totals.to_json(), "versions": versions, "config_fingerprint": config_fingerprint,
            "lineage": lineage or {}}


class Fields:
    """Typed access to a JSON document by dotted key, with errors that name the file and the key."""

    def __init__(self, doc: dict, where: str):
        self.doc, self.where = doc, where

    def __call__(self, key: str, kind: type, optional: bool = False):
        value: Any = self.doc
        for part in key.replace("[", ".[").split("."):
            if part.startswith("["):
                index = int(part[1:-1])
                value = value[index] if isinstance(value, list) and index < len(value) else None
            else:
                value = value.get(part) if isinstance(value, dict) else None
        if value is None and optional:
            return None
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            self.check(key, value, False, kind.__name__)
        return value

    def check(self, key: str, value: Any, ok: Any, what: str) -> None:
        """DatasetError naming the file and the key unless ``ok``."""
        if not ok:
            found = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
            raise DatasetError(f"{self.where}: {key} must be {what}, found {found}; the file is damaged "
                               "or was not written by mmdata preprocess (rebuild the dataset)")


def load_description(dataset: str, storage_options: dict | None = None) -> DatasetDescription:
    """The description of the complete dataset at ``dataset`` (a local path or fsspec URL)."""
    url = storage.join(dataset, DATASET_JSON)
    missing = DatasetError(f"{dataset} is not a complete mmdata dataset: {DATASET_JSON} is missing "
                           "(it is written last; did `mmdata preprocess` finish?)")
    if storage.is_local(url) and not storage.exists(url, {}):
        raise missing
    if storage.is_local(url) and not storage.local_path(url).is_file():   # a FIFO would block the read
        raise DatasetError(f"{url} is not a regular file; rebuild the dataset")
    try:   # remote: read at once, no existence check first (each is a round trip before the first batch)
        doc = storage.read_json(url, storage_options or {}, storage.MAX_METADATA_BYTES)
    except FileNotFoundError:
        raise missing from None
    except (ValueError, RecursionError) as e:   # UnicodeDecodeError included; RecursionError: nested too deep
        raise DatasetError(f"{url} is not valid JSON ({e}); rebuild the dataset") from None
    except OSError as e:
        raise DatasetError(f"{url} cannot be read ({e}); check the path and its permissions") from None
    return DatasetDescription.from_json(doc, dataset)


def lineage_text(lineage: dict, separator: str = "; ") -> str:
    """Per member group: partitions computed and reused, and where from (``mmdata info``, the run summary)."""
    parts, order = [], ("text", "image", "audio", "waveform")
    for group, use in sorted(lineage.items(), key=lambda item: (order + (item[0],)).index(item[0])):
        if not isinstance(use, dict):
            continue
        text = f"{group} built {use.get('built', 0)}, reused {use.get('reused', 0)}"
        sources = use.get("from") or []
        parts.append(text + (f" (from {', '.join(map(str, sources))})" if sources else ""))
    return separator.join(parts)

def dataset_dir(root: str, name: str, fingerprint: str) -> str:
    """Where preprocessing puts the dataset ``name`` with ``fingerprint``: ``<root>/<name>-<fingerprint[:12]>``."""
    return storage.join(root, f"{name}-{fingerprint[:12]}")


def write_wids_index(dataset: str) -> str:
    """Write ``wids-index.json`` (shard URLs relative to it + sample counts) for the ``wids`` library."""
    d = load_description(dataset)
    doc = {"__kind__": "wids-shard-index-v1", "wids_version": 1, "name": d.name,
           "shardlist": [{"url": s.name, "nsamples": s.samples} for s in d.shards]}
    url = storage.join(dataset, WIDS_INDEX)
    storage.write_json(url, doc, {})
    return url
