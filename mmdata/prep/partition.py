"""One partition of input rows -> its shard(s), index, errors and a summary.

This is the unit of work an executor runs. It knows nothing about Ray: it
gets the rows of partition ``k`` and a :class:`Job` (config, tokenizer,
label mapping), fingerprints the rows, and either finds a finished result
for that fingerprint in the store or builds it. A result is finished when
its ``summary.json`` exists; it is written last.

    rows -> per sample: each modality's encoder (raw input, config) -> members + info
         -> the sample's json + label -> ShardWriter (tar + index) -> summary
"""

from __future__ import annotations

import functools
import hashlib
import json
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from mmdata import storage
from mmdata.dataset import ShardInfo, Totals, sorted_counts
from mmdata.prep.audio import encode_audio
from mmdata.prep.config import PreprocessConfig
from mmdata.prep.image import encode_image
from mmdata.prep.sources import Record
from mmdata.prep.text import encode_text, load_tokenizer
from mmdata.schema import ERRORS_JSONL, JSON, LABEL, MODALITIES, SampleError, make_key

SUMMARY = "summary.json"

# (raw input, the modality's config) -> (members, info); text's encoder gets the tokenizer bound
Encoder = Callable[[Any, Any], tuple[dict[str, bytes], dict]]


@dataclass
class Job:
    """What every partition task shares (sent to workers once)."""
    config: PreprocessConfig
    tokenizer: bytes
    labels: dict[str, int] | None   # string label -> int, when labels are strings
    salt: str                       # hash of everything output-affecting except the rows
    store: str                      # URL of the content-addressed partition store


@dataclass(frozen=True)
class PartitionSummary:
    """What a partition task returns (and keeps as summary.json in the store)."""
    partition: int = 0
    fingerprint: str = ""
    shards: tuple[ShardInfo, ...] = ()
    totals: Totals = field(default_factory=Totals)
    seconds: float = 0.0
    reused: bool = False            # found finished in the store
    node: str = ""                  # the Ray node that ran it ("" in-process)

    def to_json(self) -> dict:
        return {**self.totals.to_json(), "partition": self.partition, "fingerprint": self.fingerprint,
                "seconds": self.seconds, "shards": [{"name": s.name, "samples": s.samples, "bytes": s.bytes}
                                                    for s in self.shards]}

    @classmethod
    def from_json(cls, doc: dict) -> "PartitionSummary":
        shards = tuple(ShardInfo(s["name"], s["samples"], s["bytes"], doc["partition"], doc["fingerprint"])
                       for s in doc["shards"])
        totals = Totals(doc["samples_in"], doc["written"], doc["rejected"], doc["bytes"], len(shards),
                        doc["modalities"], doc["errors_by_reason"])
        return cls(doc["partition"], doc["fingerprint"], shards, totals, doc["seconds"])


def partition_fingerprint(job: Job, k: int, records: list[Record]) -> str:
    digest = hashlib.sha256(f"{job.salt}\0{k}".encode())
    for record in records:
        digest.update(row_identity(record, job).encode("utf-8", "surrogatepass"))
        digest.update(b"\0")
    return digest.hexdigest()[:32]


def row_identity(record: Record, job: Job) -> str:
    """Everything about a row that could change its output, as a string."""
    refs = {m: file_identity(getattr(record, m), job) for m in ("image", "audio")}
    text = record.text.hex() if isinstance(record.text, bytes) else record.text
    fields = [record.row, record.id, text, refs, record.label, record.meta, record.error]
    return json.dumps(fields, sort_keys=True, default=str)


def file_identity(ref: str | bytes | None, job: Job) -> Any:
    if ref is None:
        return None
    if isinstance(ref, bytes):
        return hashlib.sha256(ref).hexdigest()
    options = job.config.input.storage_options
    try:
        if job.config.input.file_identity == "content":
            return [ref, hashlib.sha256(storage.read_bytes(ref, options)).hexdigest()]
        if storage.is_local(ref):
            st = storage.local_path(ref).stat()
            return [ref, st.st_size, st.st_mtime_ns]
        fs, path = storage.filesystem(ref, options)
        info = fs.info(path)
        return [ref, info.get("size"), str(info.get("ETag") or info.get("mtime") or info.get("LastModified"))]
    except (OSError, ValueError):
        return [ref, "unreadable"]


def run_partition(job: Job, k: int, records: list[Record], duplicates: set[int]) -> PartitionSummary:
    """Reuse or build partition ``k``; ``reused`` in the summary says which."""
    import torch
    torch.set_num_threads(1)  # one task per core: intra-op threads would oversubscribe
    fingerprint = partition_fingerprint(job, k, records)
    result = storage.join(job.store, fingerprint)
    options = job.config.output.storage_options
    if storage.exists(storage.join(result, SUMMARY), options):
        return replace(PartitionSummary.from_json(storage.read_json(storage.join(result, SUMMARY), options)), reused=True)
    start = time.perf_counter()
    if storage.is_local(result):
        summary = build_partition(job, k, fingerprint, records, duplicates, storage.local_path(result))
    else:
        with tempfile.TemporaryDirectory(prefix="mmdata-") as staging:
            summary = build_partition(job, k, fingerprint, records, duplicates, Path(staging))
            for path in sorted(Path(staging).rglob("*")):
                if path.is_file():
                    storage.upload(path, storage.join(result, str(path.relative_to(staging))), options)
    summary = replace(summary, seconds=round(time.perf_counter() - start, 3))
    storage.write_json(storage.join(result, SUMMARY), summary.to_json(), options)
    return summary


def build_partition(job: Job, k: int, fingerprint: str, records: list[Record], duplicates: set[int],
                    out: Path) -> PartitionSummary:
    from mmdata.shards import ShardWriter
    config = job.config
    encoders = modality_encoders(load_tokenizer(job.tokenizer))
    writer = ShardWriter(out, k, config.output.max_shard_bytes)
    errors, present, rejected = [], Counter(), 0
    for record in records:
        sample, sample_errors = build_sample(record, job, encoders, record.row in duplicates)
        errors += sample_errors
        if sample is None:
            rejected += 1
            continue
        members, index = sample
        writer.write(make_key(record.id), members, index)
        present.update(m for m in MODALITIES if index[f"has_{m}"])
        present.update(["label"] if index["label"] is not None else [])
    shards = tuple(ShardInfo(s["name"], s["samples"], s["bytes"], k, fingerprint) for s in writer.close())
    lines = "".join(json.dumps(e, ensure_ascii=False, sort_keys=True) + "\n" for e in errors)
    storage.write_bytes(str(out / ERRORS_JSONL), lines.encode(), {})
    totals = Totals(samples_in=len(records), written=len(records) - rejected, rejected=rejected,
                    bytes=sum(s.bytes for s in shards), shards=len(shards), modalities=sorted_counts(present),
                    errors_by_reason=sorted_counts(Counter(e["reason"] for e in errors)))
    return PartitionSummary(k, fingerprint, shards, totals)


def modality_encoders(tokenizer) -> dict[str, Encoder]:
    """Each modality's encoder, in the order samples are encoded."""
    return {"text": functools.partial(encode_text, tokenizer=tokenizer), "image": encode_image,
            "audio": encode_audio}


def error_entry(record: Record, modality: str, stage: str, reason: str, message: str, action: str) -> dict:
    return {"id": record.id, "row": record.row, "modality": modality, "stage": stage,
            "reason": reason, "error": message, "action": action}


def build_sample(record: Record, job: Job, encoders: dict[str, Encoder], duplicate: bool):
    """Returns ((members, index columns) or None when rejected, error entries)."""
    reject = lambda reason, message, modality="sample", stage="scan": (  # noqa: E731
        None, [error_entry(record, modality, stage, reason, message, "rejected")])
    if record.error:
        return reject(record.error_reason, record.error)
    if duplicate:
        return reject("duplicate_id", f"id {record.id!r} already appeared earlier in the input; the first wins")
    try:
        label = map_label(record.label, job.labels)
    except SampleError as e:
        return reject(e.reason, str(e), "label")
    members, info, errors, rejected = {}, {}, [], False
    for modality, encode in encoders.items():
        raw = getattr(record, modality)
        if raw is None:
            continue
        config = getattr(job.config, modality)
        try:
            out, info[modality] = encode(raw_input(modality, raw, job), config)
            members.update(out)
        except SampleError as e:
            action = "rejected" if config.on_error == "reject_sample" else "dropped_modality"
            stage = "read" if e.reason in ("missing_file", "unreadable_file") else "process"
            errors.append(error_entry(record, modality, stage, e.reason, f"{modality}: {e}", action))
            rejected |= config.on_error == "reject_sample"
    if rejected:
        return None, errors
    if not info:
        what = "every modality it had failed" if errors else "it has no text, image or audio"
        return None, errors + [error_entry(record, "sample", "process", "no_modalities",
                                           f"sample has nothing left to write: {what}", "rejected")]
    members[JSON] = sample_json(record, label, info)
    if label is not None:
        members[LABEL] = str(label).encode()
    return (members, index_columns(record, label, info)), errors


def raw_input(modality: str, raw, job: Job):
    """What the encoder gets: the text as given; the bytes of an image or audio file (read here)."""
    if modality == "text" or isinstance(raw, bytes):
        return raw
    return read_input_file(raw, job.config.input.storage_options)


def read_input_file(url: str, storage_options: dict) -> bytes:
    try:
        return storage.read_bytes(url, storage_options)
    except FileNotFoundError:
        raise SampleError("missing_file", f"file {url} does not exist") from None
    except (OSError, ValueError) as e:
        raise SampleError("unreadable_file", f"cannot read {url}: {e}") from None


def is_int_like(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    if isinstance(value, float):
        return value.is_integer()
    return isinstance(value, str) and value.strip().lstrip("-").isdigit()


def map_label(value: Any, labels: dict[str, int] | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise SampleError("invalid_label", f"label must be an integer or a string; got {value!r}")
    if labels is not None:
        return labels[str(value).strip()]
    if not is_int_like(value):
        raise SampleError("invalid_label", f"label must be an integer or a string; got {value!r}")
    return int(float(value)) if isinstance(value, float) else int(value)


def sample_json(record: Record, label: int | None, info: dict) -> bytes:
    doc = {"id": record.id, "row": record.row, "label": label, "meta": record.meta, **info}
    return json.dumps(doc, ensure_ascii=False, sort_keys=True, default=str).encode("utf-8")


def index_columns(record: Record, label: int | None, info: dict) -> dict:
    image, audio = info.get("image", {}), info.get("audio", {})
    return {
        "id": record.id, "row": record.row, "label": label,
        "has_text": "text" in info, "has_image": "image" in info, "has_audio": "audio" in info,
        "n_tokens": info.get("text", {}).get("n_tokens"),
        "image_width": image.get("out_width"), "image_height": image.get("out_height"),
        "audio_frames": audio.get("frames"),
    }
