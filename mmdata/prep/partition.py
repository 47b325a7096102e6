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

import contextlib
import functools
import hashlib
import json
import math
import re
import tempfile
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

from mmdata import storage
from mmdata.dataset import ShardInfo, Totals, sorted_counts
from mmdata.prep.audio import encode_audio
from mmdata.prep.config import PreprocessConfig
from mmdata.prep.image import encode_image
from mmdata.prep.inputs import ReadSettings, read_input, too_large, with_timeouts
from mmdata.prep.sources import Record
from mmdata.prep.text import encode_text, load_tokenizer
from mmdata.schema import ERRORS_JSONL, JSON, LABEL, MODALITIES, SampleError, index_name, make_key

SUMMARY = "summary.json"
# reasons raised while reading a row's file rather than processing it (the error entry's stage)
READ_REASONS = ("missing_file", "unreadable_file", "not_regular_file", "file_too_large", "timeout", "unsupported_url")

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
    if job.config.input.file_identity == "name":   # the files are taken as immutable: no stat, no request
        return ref
    try:
        if job.config.input.file_identity == "content":
            cap = max(job.config.image.max_bytes, job.config.audio.max_bytes)
            return [ref, hashlib.sha256(read_input(ref, cap, read_settings(job.config))).hexdigest()]
        if storage.is_local(ref):
            st = storage.local_path(ref).stat()
            return [ref, st.st_size, st.st_mtime_ns]
        fs, path = storage.filesystem(ref, with_timeouts(ref, read_settings(job.config)))
        info = fs.info(path)
        return [ref, info.get("size"), str(info.get("ETag") or info.get("mtime") or info.get("LastModified"))]
    except (OSError, ValueError, ImportError):
        return [ref, "unreadable"]
    except SampleError as e:   # reported when the row is built; the identity only has to be stable
        return [ref, e.reason]


def run_partition(job: Job, k: int, records: list[Record], duplicates: set[int],
                  fingerprint: str | None = None) -> PartitionSummary:
    """Reuse or build partition ``k``; ``reused`` in the summary says which. ``fingerprint``: the rows'
    fingerprint when the caller has computed it already (the driver's reuse check)."""
    fingerprint = fingerprint or partition_fingerprint(job, k, records)
    result = storage.join(job.store, fingerprint)
    options = job.config.output.storage_options
    stored = stored_summary(result, options)   # checked again: another run may have finished it meanwhile
    if stored is not None:
        return replace(stored, reused=True)
    start = time.perf_counter()
    with one_torch_thread(any(r.audio is not None for r in records)):
        summary = store_partition(job, k, fingerprint, records, duplicates, result)
    summary = replace(summary, seconds=round(time.perf_counter() - start, 3))
    storage.write_json(storage.join(result, SUMMARY), summary.to_json(), options)
    return summary


@contextlib.contextmanager
def one_torch_thread(audio: bool):
    """One torch thread while a partition is built (one task per core: intra-op threads would oversubscribe),
    the caller's setting restored after (in-process runs share the process with, say, a trainer). torch is
    imported only for partitions with audio: nothing else uses it."""
    if not audio:
        yield
        return
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def store_partition(job: Job, k: int, fingerprint: str, records: list[Record], duplicates: set[int],
                    result: str) -> PartitionSummary:
    """Build partition ``k`` into the store folder ``result`` (staged locally and uploaded for URLs)."""
    options = job.config.output.storage_options
    if storage.is_local(result):
        summary = build_partition(job, k, fingerprint, records, duplicates, storage.local_path(result))
    else:
        with tempfile.TemporaryDirectory(prefix="mmdata-") as staging:
            summary = build_partition(job, k, fingerprint, records, duplicates, Path(staging))
            for path in sorted(Path(staging).rglob("*")):
                if path.is_file():
                    storage.upload(path, storage.join(result, str(path.relative_to(staging))), options)
    return summary


def stored_summary(result: str, options: dict) -> PartitionSummary | None:
    """The finished partition at ``result``, if every file it lists is there with its recorded size
    (a file deleted or cut short from the store means: build it again)."""
    url = storage.join(result, SUMMARY)
    if not storage.exists(url, options):
        return None
    summary = PartitionSummary.from_json(storage.read_json(url, options))
    return summary if files_intact(result, summary.shards, options) else None


def files_intact(folder: str, shards, options: dict) -> bool:
    """Every shard in ``folder`` has its recorded size, and its index file exists."""
    return all(storage.size(storage.join(folder, s.name), options) == s.bytes
               and storage.exists(storage.join(folder, index_name(s.name)), options) for s in shards)


def build_partition(job: Job, k: int, fingerprint: str, records: list[Record], duplicates: set[int],
                    out: Path) -> PartitionSummary:
    from mmdata.shards import ShardWriter
    config = job.config
    encoders = modality_encoders(load_tokenizer(job.tokenizer))
    writer = ShardWriter(out, k, config.output.max_shard_bytes)
    try:
        shards, errors, present, rejected = write_samples(job, writer, encoders, records, duplicates)
    except BaseException:   # an error, a full disk, Ctrl-C: leave no temp file behind
        writer.abort()
        raise
    shards = tuple(ShardInfo(s["name"], s["samples"], s["bytes"], k, fingerprint) for s in shards)
    lines = "".join(json.dumps(e, ensure_ascii=False, sort_keys=True) + "\n" for e in errors)
    storage.write_bytes(str(out / ERRORS_JSONL), lines.encode(), {})
    totals = Totals(samples_in=len(records), written=len(records) - rejected, rejected=rejected,
                    bytes=sum(s.bytes for s in shards), shards=len(shards), modalities=sorted_counts(present),
                    errors_by_reason=sorted_counts(Counter(e["reason"] for e in errors)))
    return PartitionSummary(k, fingerprint, shards, totals)


def write_samples(job: Job, writer, encoders: dict[str, Encoder], records: list[Record], duplicates: set[int]):
    """Build and write every sample; returns (the writer's shard list, error entries, modality counts,
    rejected count)."""
    errors, present, rejected, keys = [], Counter(), 0, {}
    for record, files in read_ahead(records, job, duplicates):
        sample, sample_errors = build_sample(record, job, encoders, record.row in duplicates, files)
        key = make_key(record.id)
        if sample is not None and key in keys:   # two ids, one key: a shard must not hold it twice
            sample, sample_errors = None, sample_errors + [error_entry(
                record, "sample", "scan", "duplicate_key", f"id {record.id!r} has the tar key {key!r} of the "
                f"earlier id {keys[key]!r}; the first wins (rename one of them)", "rejected")]
        errors += sample_errors
        if sample is None:
            rejected += 1
            continue
        keys[key] = record.id
        members, index = sample
        writer.write(key, members, index)
        present.update(m for m in MODALITIES if index[f"has_{m}"])
        present.update(["label"] if index["label"] is not None else [])
    return writer.close(), errors, present, rejected


def modality_encoders(tokenizer) -> dict[str, Encoder]:
    """Each modality's encoder, in the order samples are encoded."""
    return {"text": functools.partial(encode_text, tokenizer=tokenizer), "image": encode_image,
            "audio": encode_audio}


def error_entry(record: Record, modality: str, stage: str, reason: str, message: str, action: str) -> dict:
    return {"id": record.id, "row": record.row, "modality": modality, "stage": stage,
            "reason": reason, "error": message, "action": action}


def read_ahead(records: list[Record], job: Job, duplicates: set[int]) -> Iterator[tuple[Record, dict | None]]:
    """Each record with its image and audio files read (bytes, or the SampleError reading raised), by
    ``input.read_threads`` threads a few records ahead of the one being encoded, in input order: a URL's
    latency overlaps the encoding of the records before it. At most 2 x read_threads records' files are held.
    One thread: (record, None), the files read when the sample is built."""
    threads = job.config.input.read_threads
    if threads <= 1:
        yield from ((record, None) for record in records)
        return

    def read(record: Record) -> dict:
        if record.error or record.row in duplicates:   # rejected before any file is needed
            return {}
        files = {}
        for modality in ("image", "audio"):
            raw = getattr(record, modality)
            if raw is not None:
                try:
                    files[modality] = raw_input(modality, raw, job)
                except SampleError as e:
                    files[modality] = e
        return files

    with ThreadPoolExecutor(threads, thread_name_prefix="mmdata-read") as pool:
        ahead: deque = deque()
        try:
            for record in records:
                ahead.append((record, pool.submit(read, record)))
                if len(ahead) >= 2 * threads:
                    record, files = ahead.popleft()
                    yield record, files.result()
            while ahead:
                record, files = ahead.popleft()
                yield record, files.result()
        finally:   # an error or an interrupt: reads not started are not wanted
            for _, files in ahead:
                files.cancel()


def build_sample(record: Record, job: Job, encoders: dict[str, Encoder], duplicate: bool,
                 files: dict | None = None):
    """Returns ((members, index columns) or None when rejected, error entries). ``files``: the record's image
    and audio already read (:func:`read_ahead`), else they are read here."""
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
            data = raw_input(modality, raw, job) if files is None or modality not in files else files[modality]
            if isinstance(data, SampleError):
                raise data
            out, info[modality] = encode(data, config)
            members.update(out)
        except SampleError as e:
            action = "rejected" if config.on_error == "reject_sample" else "dropped_modality"
            stage = "read" if e.reason in READ_REASONS else "process"
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
    """What the encoder gets: the text as given; the bytes of an image or audio file, read here with the
    modality's byte cap (inline bytes from input tars, which the tar reader caps at 1 GiB, meet it here)."""
    if modality == "text":
        return raw
    cap = getattr(job.config, modality).max_bytes
    if raw == "":
        raise SampleError("missing_file", f"the {modality} path is an empty string; use null, or leave the key "
                                          f"out, for a sample without {modality}")
    if isinstance(raw, bytes):
        if len(raw) > cap:
            raise too_large(f"the {modality} member", f"{len(raw)} bytes", cap)
        return raw
    return read_input(raw, cap, read_settings(job.config))


def read_settings(config: PreprocessConfig) -> ReadSettings:
    i = config.input
    return ReadSettings(i.storage_options, i.timeout_s, i.retries)


# Labels are class ids 0..MAX_LABEL (any integer-valued number or numeric string: 1, 1.0 and "1" are one
# class), or names (other strings), which are given ids in sorted order. Anything else is invalid_label.
MAX_LABEL = 2**31 - 1
_INTEGER = re.compile(r"[+-]?[0-9]+")


def label_key(value: Any) -> int | str:
    """A label as a class id (int) or a name (str); SampleError("invalid_label") for anything else."""
    if isinstance(value, str):
        text = value.strip()
        if not _INTEGER.fullmatch(text):
            if not text:
                raise SampleError("invalid_label", "label is an empty string; leave it out for no label")
            return text
        number = int(text)
    elif isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, float) and math.isfinite(value) and value.is_integer():
        number = int(value)
    else:
        raise SampleError("invalid_label", f"label must be a class id (an integer >= 0) or a class name "
                                           f"(a string); got {str(value)[:80]!r}")
    if not 0 <= number <= MAX_LABEL:
        raise SampleError("invalid_label", f"label {str(number)[:40]} is not a class id: class ids run from 0 to "
                                           f"{MAX_LABEL}")
    return number


def map_label(value: Any, labels: dict[str, int] | None) -> int | None:
    """The class id of a row's label: itself, or its name's id when the input's labels are names."""
    if value is None:
        return None
    key = label_key(value)
    if labels is not None:
        return labels[str(key)]
    return key   # without names every valid label is a number (the scan saw them all)


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
