"""One partition of input rows -> its shard(s), index, errors and a summary.

This is the unit of work a Ray task runs. It knows nothing about Ray: it
gets the rows of partition ``k`` and a :class:`Job` (config, tokenizer,
label mapping), fingerprints the rows, and either finds a finished result
for that fingerprint in the store or builds it. A result is finished when
its ``summary.json`` exists; it is written last.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmdata import storage
from mmdata.prep.audio import encode_audio
from mmdata.prep.image import encode_image
from mmdata.schema import ERRORS_JSONL, JSON, LABEL, SampleError, make_key
from mmdata.prep.sources import Record
from mmdata.prep.text import encode_text, load_tokenizer

SUMMARY = "summary.json"


@dataclass
class Job:
    """What every partition task shares (sent to workers once)."""
    config: Any                     # pipeline.PreprocessConfig
    tokenizer: bytes
    labels: dict[str, int] | None   # string label -> int, when labels are strings
    salt: str                       # hash of everything output-affecting except the rows
    store: str                      # URL of the content-addressed partition store


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


def run_partition(job: Job, k: int, records: list[Record], duplicates: set[int]) -> dict:
    """Reuse or build partition ``k``; returns its summary (``reused`` says which)."""
    import torch
    torch.set_num_threads(1)  # one task per core: intra-op threads would oversubscribe
    fingerprint = partition_fingerprint(job, k, records)
    result = storage.join(job.store, fingerprint)
    options = job.config.output.storage_options
    if storage.exists(storage.join(result, SUMMARY), options):
        return {**storage.read_json(storage.join(result, SUMMARY), options), "reused": True}
    start = time.perf_counter()
    if storage.is_local(result):
        summary = build_partition(job, k, records, duplicates, storage.local_path(result))
    else:
        with tempfile.TemporaryDirectory(prefix="mmdata-") as staging:
            summary = build_partition(job, k, records, duplicates, Path(staging))
            for path in sorted(Path(staging).rglob("*")):
                if path.is_file():
                    storage.upload(path, storage.join(result, str(path.relative_to(staging))), options)
    summary = {**summary, "fingerprint": fingerprint, "seconds": round(time.perf_counter() - start, 3)}
    storage.write_json(storage.join(result, SUMMARY), summary, options)
    return {**summary, "reused": False}


def build_partition(job: Job, k: int, records: list[Record], duplicates: set[int], out: Path) -> dict:
    from mmdata.shards import ShardWriter
    config = job.config
    tokenizer = load_tokenizer(job.tokenizer)
    writer = ShardWriter(out, k, config.output.max_shard_bytes)
    errors, present, rejected = [], Counter(), 0
    for record in records:
        sample, sample_errors = build_sample(record, job, tokenizer, record.row in duplicates)
        errors += sample_errors
        if sample is None:
            rejected += 1
            continue
        members, index = sample
        writer.write(make_key(record.id), members, index)
        present.update(m for m in ("text", "image", "audio") if index[f"has_{m}"])
        present.update(["label"] if index["label"] is not None else [])
    shards = writer.close()
    lines = "".join(json.dumps(e, ensure_ascii=False, sort_keys=True) + "\n" for e in errors)
    storage.write_bytes(str(out / ERRORS_JSONL), lines.encode(), {})
    return {
        "partition": k, "shards": shards, "samples_in": len(records),
        "written": len(records) - rejected, "rejected": rejected,
        "modalities": dict(sorted(present.items())),
        "errors_by_reason": dict(sorted(Counter(e["reason"] for e in errors).items())),
        "bytes": sum(s["bytes"] for s in shards),
    }


def error_entry(record: Record, modality: str, stage: str, reason: str, message: str, action: str) -> dict:
    return {"id": record.id, "row": record.row, "modality": modality, "stage": stage,
            "reason": reason, "error": message, "action": action}


def build_sample(record: Record, job: Job, tokenizer, duplicate: bool):
    """Returns ((members, index columns) or None when rejected, error entries)."""
    reject = lambda reason, message, modality="sample", stage="scan": (  # noqa: E731
        None, [error_entry(record, modality, stage, reason, message, "rejected")])
    if record.error:
        return reject("bad_row", record.error)
    if duplicate:
        return reject("duplicate_id", f"id {record.id!r} already appeared earlier in the input; the first wins")
    try:
        label = map_label(record.label, job.labels)
    except SampleError as e:
        return reject(e.reason, str(e), "label")
    members, info, errors, rejected = {}, {}, [], False
    for modality in ("text", "image", "audio"):
        raw = getattr(record, modality)
        if raw is None:
            continue
        policy = getattr(job.config, modality).on_error
        try:
            out, info[modality] = encode_modality(modality, raw, job, tokenizer)
            members.update(out)
        except SampleError as e:
            action = "rejected" if policy == "reject_sample" else "dropped_modality"
            stage = "read" if e.reason in ("missing_file", "unreadable_file") else "process"
            errors.append(error_entry(record, modality, stage, e.reason, f"{modality}: {e}", action))
            rejected |= policy == "reject_sample"
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


def encode_modality(modality: str, raw, job: Job, tokenizer) -> tuple[dict[str, bytes], dict]:
    config = getattr(job.config, modality)
    if modality == "text":
        return encode_text(raw, tokenizer, config)
    data = raw if isinstance(raw, bytes) else read_input_file(raw, job.config.input.storage_options)
    if modality == "image":
        encoded, info = encode_image(data, config)
        return {config.format: encoded}, info
    return encode_audio(data, config)


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
