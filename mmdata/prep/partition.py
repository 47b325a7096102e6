"""One partition of input rows -> its shard(s), index, errors and a summary.

This is the unit of work an executor runs. It knows nothing about Ray: it
gets the rows of partition ``k`` and a :class:`Job` (config, tokenizer,
label mapping), fingerprints the rows, and either finds a finished result
for that fingerprint in the store or builds it. A result is finished when
its ``summary.json`` exists; it is written last.

    rows -> each group's member entry (text, image, audio, waveform: members.py), found in the store or
            computed one modality at a time
         -> per sample: the entries' outcomes -> kept or rejected, the sample's json + label
         -> ShardWriter (tar + index) -> summary

A sample's fate is decided here, at assembly, from each modality's outcome and the config, exactly as
when everything is computed at once; so a shard assembled from members cached by other runs is the same
bytes as one built from scratch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mmdata import storage
from mmdata.dataset import ShardInfo, Totals, sorted_counts
from mmdata.prep.config import PreprocessConfig
from mmdata.prep.inputs import read_input
from mmdata.prep.members import GROUP_MODALITY, Entry, MemberStore, Outcome, encode_groups, member_keys, read_settings
from mmdata.prep.sources import Record
from mmdata.prep.text import load_tokenizer
from mmdata.schema import ERRORS_JSONL, JSON, LABEL, MODALITIES, SampleError, index_name, make_key

SUMMARY = "summary.json"
# reasons raised while reading a row's file rather than processing it (the error entry's stage)
READ_REASONS = ("missing_file", "unreadable_file", "not_regular_file", "file_too_large", "timeout", "unsupported_url")


@dataclass
class Job:
    """What every partition task shares (sent to workers once)."""
    config: PreprocessConfig
    tokenizer: bytes
    labels: dict[str, int] | None   # string label -> int, when labels are strings
    salt: str                       # hash of everything output-affecting except the rows
    store: str                      # URL of the content-addressed partition store


@dataclass(frozen=True)
class PartitionKeys:
    """Where partition ``k``'s work lives in the store: its finished result (``fingerprint``) and each
    group's member entry (``members``: group -> key; members.py)."""
    fingerprint: str
    members: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class MemberUse:
    """One member entry a partition's shards were assembled from."""
    group: str
    key: str
    built: bool              # computed by the run that built the partition (else found in the store)
    built_by: dict           # the run that computed it: {"name", "config_fingerprint"}

    def to_json(self) -> dict:
        return {"group": self.group, "key": self.key, "built": self.built, "built_by": self.built_by}


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
    members: tuple[MemberUse, ...] = ()

    def to_json(self) -> dict:
        return {**self.totals.to_json(), "partition": self.partition, "fingerprint": self.fingerprint,
                "seconds": self.seconds, "shards": [{"name": s.name, "samples": s.samples, "bytes": s.bytes}
                                                    for s in self.shards],
                "members": [m.to_json() for m in self.members]}

    @classmethod
    def from_json(cls, doc: dict) -> "PartitionSummary":
        shards = tuple(ShardInfo(s["name"], s["samples"], s["bytes"], doc["partition"], doc["fingerprint"])
                       for s in doc["shards"])
        totals = Totals(doc["samples_in"], doc["written"], doc["rejected"], doc["bytes"], len(shards),
                        doc["modalities"], doc["errors_by_reason"])
        members = tuple(MemberUse(m["group"], m["key"], m["built"], m["built_by"]) for m in doc.get("members", ()))
        return cls(doc["partition"], doc["fingerprint"], shards, totals, doc["seconds"], members=members)


def partition_keys(job: Job, k: int, records: list[Record], duplicates: set[int]) -> PartitionKeys:
    """The partition's fingerprint (the job's salt, k, every row's identity and which rows repeat an
    earlier id) and its member entries' keys; each file's identity is taken once for both."""
    digest = hashlib.sha256(f"{job.salt}\0{k}".encode())
    inputs = []
    for record in records:
        identity = input_identities(record, job)
        text = record.text.hex() if isinstance(record.text, bytes) else record.text
        fields = [record.row, record.id, text, identity, record.label, record.split, record.meta, record.error]
        digest.update(json.dumps(fields, sort_keys=True, default=str).encode("utf-8", "surrogatepass"))
        digest.update(b"\0")
        inputs.append(None if rejected_before_encoding(record, job, duplicates) else {"text": text, **identity})
    if duplicates:   # an edit earlier in the input can make a row here a repeat (or no longer one)
        digest.update(json.dumps(sorted(duplicates)).encode())
    return PartitionKeys(digest.hexdigest()[:32], member_keys(job, inputs))


def input_identities(record: Record, job: Job) -> dict:
    """The identities of a row's image and audio files: what "the same file" means for reuse."""
    return {m: file_identity(getattr(record, m), job) for m in ("image", "audio")}


def rejected_before_encoding(record: Record, job: Job, duplicates: set[int]) -> bool:
    """Rows no modality is computed for: a bad row, a repeated id, an invalid label."""
    if record.error or record.row in duplicates:
        return True
    try:
        map_label(record.label, job.labels)
    except SampleError:
        return True
    return False


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
        from mmdata.prep.inputs import with_timeouts
        fs, path = storage.filesystem(ref, with_timeouts(ref, read_settings(job.config)))
        info = fs.info(path)
        return [ref, info.get("size"), str(info.get("ETag") or info.get("mtime") or info.get("LastModified"))]
    except (OSError, ValueError, ImportError):
        return [ref, "unreadable"]
    except SampleError as e:   # reported when the row is built; the identity only has to be stable
        return [ref, e.reason]


def run_partition(job: Job, k: int, records: list[Record], duplicates: set[int],
                  keys: PartitionKeys | None = None) -> PartitionSummary:
    """Reuse or build partition ``k``; ``reused`` in the summary says which. ``keys``: the partition's keys
    when the caller has computed them already (the driver's reuse check)."""
    keys = keys or partition_keys(job, k, records, duplicates)
    result = storage.join(job.store, keys.fingerprint)
    options = job.config.output.storage_options
    stored = stored_summary(result, options)   # checked again: another run may have finished it meanwhile
    if stored is not None:
        return replace(stored, reused=True)
    start = time.perf_counter()
    summary = store_partition(job, k, keys, records, duplicates, result)
    summary = replace(summary, seconds=round(time.perf_counter() - start, 3))
    storage.write_json(storage.join(result, SUMMARY), summary.to_json(), options)
    return summary


@contextlib.contextmanager
def one_torch_thread(audio: bool):
    """One torch thread while a partition's audio is computed (one task per core: intra-op threads would
    oversubscribe), the caller's setting restored after (in-process runs share the process with, say, a
    trainer). torch is imported only when audio is computed: nothing else uses it."""
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


def store_partition(job: Job, k: int, keys: PartitionKeys, records: list[Record], duplicates: set[int],
                    result: str) -> PartitionSummary:
    """Build partition ``k`` into the store folder ``result`` (staged locally and uploaded for URLs)."""
    options = job.config.output.storage_options
    if storage.is_local(result):
        summary = build_partition(job, k, keys, records, duplicates, storage.local_path(result))
    else:
        with tempfile.TemporaryDirectory(prefix="mmdata-") as staging:
            summary = build_partition(job, k, keys, records, duplicates, Path(staging))
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


def build_partition(job: Job, k: int, keys: PartitionKeys, records: list[Record], duplicates: set[int],
                    out: Path) -> PartitionSummary:
    """Each group's entry found in the store or computed, then the shard(s) assembled from them."""
    from mmdata.shards import ShardWriter
    config = job.config
    store, entries = MemberStore(job), {}
    try:
        # the waveform last: it is finished before the features made from it, so features found here always
        # come with their waveform, even while another run is writing both
        for group, key in sorted(keys.members.items(), key=lambda item: item[0] == "waveform"):
            found = store.find(group, key, len(records))
            if found is not None:
                entries[group] = found
        missing = {g: key for g, key in keys.members.items() if g not in entries}
        if set(missing) == {"waveform"}:   # the features it is for are cached: nothing needs it now
            missing = {}
        if missing:
            encoded = [not rejected_before_encoding(r, job, duplicates) for r in records]
            tokenizer = load_tokenizer(job.tokenizer) if "text" in missing else None
            torch = "audio" in missing or ("waveform" not in entries and any(GROUP_MODALITY[g] == "audio"
                                                                              for g in missing))
            with one_torch_thread(torch):   # a FLAC from a cached waveform needs none
                entries.update(encode_groups(job, records, encoded, missing, store, tokenizer, entries))
        writer = ShardWriter(out, k, config.output.max_shard_bytes)
        try:
            shards, errors, present, rejected = write_samples(job, writer, entries, records, duplicates)
        except BaseException:   # an error, a full disk, Ctrl-C: leave no temp file behind
            writer.abort()
            raise
        uses = tuple(MemberUse(g, e.key, e.built, e.built_by) for g, e in sorted(entries.items()))
    finally:
        for entry in entries.values():
            entry.close()
        store.close()
    shards = tuple(ShardInfo(s["name"], s["samples"], s["bytes"], k, keys.fingerprint) for s in shards)
    lines = "".join(json.dumps(e, ensure_ascii=False, sort_keys=True) + "\n" for e in errors)
    storage.write_bytes(str(out / ERRORS_JSONL), lines.encode(), {})
    totals = Totals(samples_in=len(records), written=len(records) - rejected, rejected=rejected,
                    bytes=sum(s.bytes for s in shards), shards=len(shards), modalities=sorted_counts(present),
                    errors_by_reason=sorted_counts(Counter(e["reason"] for e in errors)))
    return PartitionSummary(k, keys.fingerprint, shards, totals, members=uses)


def write_samples(job: Job, writer, entries: dict[str, Entry], records: list[Record], duplicates: set[int]):
    """Assemble and write every sample; returns (the writer's shard list, error entries, modality counts,
    rejected count)."""
    errors, present, rejected, keys = [], Counter(), 0, {}
    for i, record in enumerate(records):
        sample, sample_errors = assemble_sample(record, i, job, entries, record.row in duplicates)
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


def error_entry(record: Record, modality: str, stage: str, reason: str, message: str, action: str) -> dict:
    return {"id": record.id, "row": record.row, "modality": modality, "stage": stage,
            "reason": reason, "error": message, "action": action}


def assemble_sample(record: Record, i: int, job: Job, entries: dict[str, Entry], duplicate: bool):
    """Row ``i``'s sample from its modalities' outcomes: ((members, index columns) or None when rejected,
    error entries). The rules: a bad row, a repeated id or an invalid label rejects the sample before
    anything else; a failed modality is dropped, or rejects the sample under its ``on_error: reject_sample``;
    a sample with no modality left is rejected."""
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
    members, info, info_json, errors, rejected = {}, {}, {}, [], False
    for modality in MODALITIES:
        if getattr(record, modality) is None:
            continue
        config = getattr(job.config, modality)
        outcome = modality_outcome(modality, i, entries, config)
        if isinstance(outcome, SampleError):
            action = "rejected" if config.on_error == "reject_sample" else "dropped_modality"
            stage = "read" if outcome.reason in READ_REASONS else "process"
            errors.append(error_entry(record, modality, stage, outcome.reason, f"{modality}: {outcome}", action))
            rejected |= config.on_error == "reject_sample"
        else:
            members.update(outcome.members)
            info[modality], info_json[modality] = outcome.info, outcome.info_json
    if rejected:
        return None, errors
    if not info:
        what = "every modality it had failed" if errors else "it has no text, image or audio"
        return None, errors + [error_entry(record, "sample", "process", "no_modalities",
                                           f"sample has nothing left to write: {what}", "rejected")]
    members[JSON] = cached_sample_json(record, label, info_json)
    if label is not None:
        members[LABEL] = str(label).encode()
    return (members, index_columns(record, label, info)), errors


def modality_outcome(modality: str, i: int, entries: dict[str, Entry], config) -> Outcome | SampleError:
    """Row ``i``'s outcome for ``modality``: audio's is the mel's, with the FLAC added under keep_waveform."""
    outcome = entries[modality].outcome(i)
    if outcome is None:
        raise RuntimeError(f"the {modality} member entry {entries[modality].key} has no outcome for row {i}; "
                           "remove that entry from the store's members/ folder and run again")
    if modality != "audio" or not config.keep_waveform or isinstance(outcome, SampleError):
        return outcome
    flac = entries["flac"].outcome(i)
    if isinstance(flac, SampleError) or flac is None:   # cannot fail where the mel succeeded
        return flac or SampleError("corrupt_audio", "no waveform was kept for this clip")
    return replace(outcome, members={**outcome.members, **flac.members})


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


_encode_json = json.JSONEncoder(ensure_ascii=False, sort_keys=True, default=str).encode
_JSON_KEYS = {key: _encode_json(key) + ": " for key in ("audio", "id", "image", "label", "meta", "row", "split",
                                                          "text")}


def cached_sample_json(record: Record, label: int | None, info_json: dict[str, str]) -> bytes:
    """The sample's json member: ``json.dumps({"id", "row", "label", "split", "meta", <modality>: info, ...},
    ensure_ascii=False, sort_keys=True, default=str)``, the same bytes, built from each modality's info
    serialised when it was cached (JSON serialisation is compositional: a value's text inside a document
    is its text alone, with the same options); dumping the whole document was a third of an assembly."""
    parts = {"id": _encode_json(record.id), "row": _encode_json(record.row), "label": _encode_json(label),
             "split": _encode_json(record.split), "meta": _encode_json(record.meta), **info_json}
    return ("{" + ", ".join(_JSON_KEYS[key] + parts[key] for key in sorted(parts)) + "}").encode("utf-8")


def index_columns(record: Record, label: int | None, info: dict) -> dict:
    image, audio = info.get("image", {}), info.get("audio", {})
    return {
        "id": record.id, "row": record.row, "label": label, "split": record.split,
        "has_text": "text" in info, "has_image": "image" in info, "has_audio": "audio" in info,
        "n_tokens": info.get("text", {}).get("n_tokens"),
        "image_width": image.get("out_width"), "image_height": image.get("out_height"),
        "audio_frames": audio.get("frames"),
    }
