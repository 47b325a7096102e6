"""``mmdata info`` and ``mmdata verify``: a dataset directory summarised, and re-read against its index.

verify checks what docs/format.md promises: every shard's tar structure, every member's byte range and
crc32 (format v2) against the index, each member's structure (JSON ids, npy headers and shapes, image
signatures, labels), the counts and sizes in dataset.json, the tokenizer's sha256, errors.jsonl, and
files that do not belong. It holds one shard in memory at a time; a member's bytes are checksummed,
never decoded (a .npy member's header is parsed, its array is not loaded), so it runs at disk speed.
The checks of one shard (tar, index, members) are in mmdata.verify.shard and the modules it uses; this one
runs them over the dataset and adds the checks of the directory as a whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from mmdata import storage
from mmdata.dataset import SHARD_NAME, WIDS_INDEX, DatasetDescription, lineage_text, load_description
from mmdata.schema import DATASET_JSON, ERRORS_JSONL, INDEX_DIR, index_name, one_line
from mmdata.verify.shard import read_file, verify_shard


def describe(dataset: str) -> str:
    """Human summary for ``mmdata info``."""
    d = load_description(dataset)
    t = d.totals
    lines = [
        f"dataset      {dataset}",
        f"fingerprint  {d.fingerprint}  (format v{d.format_version})",
        f"source       {source_text(d.source)}",
        f"samples      {t.written} written / {t.samples_in} input, {t.rejected} rejected",
        f"shards       {t.shards}, {t.bytes / 1e6:.1f} MB",
        "modalities   " + ", ".join(f"{m} {n}" for m, n in t.modalities.items()),
        f"tokenizer    {d.tokenizer.file} (vocab {d.tokenizer.vocab_size})",
    ]
    if d.labels:
        lines.append("labels       " + ", ".join(f"{name}={i}" for name, i in d.labels.items()))
    if t.errors_by_reason:
        lines.append("errors       " + ", ".join(f"{r} {n}" for r, n in t.errors_by_reason.items())
                     + f"  (details: {ERRORS_JSONL})")
    if d.lineage:
        lines.append("members      " + lineage_text(d.lineage, "\n             "))
    return "\n".join(lines)



@dataclass
class Report:
    """What ``mmdata verify`` found: problems (each one line naming the file), notes, and what was read."""
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)     # limits of the check, not problems
    samples: int = 0
    bytes: int = 0                                      # shard bytes read and checked
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        rate = self.bytes / 1e6 / max(self.seconds, 1e-9)
        return (f"{self.samples} samples, {self.bytes / 1e6:.1f} MB checked in {self.seconds:.2f} s "
                f"({rate:.0f} MB/s), {len(self.problems)} problems: {'OK' if self.ok else 'UNHEALTHY'}")


def source_text(source: dict) -> str:
    tars = source.get("tars")
    return str(source.get("manifest") or (", ".join(map(str, tars)) if isinstance(tars, list) else tars or ""))


def verify(dataset: str) -> tuple[list[str], int]:
    """Re-read every shard and check it against the index and dataset.json.

    Returns (problems, samples checked); no problems means healthy. ``check_dataset`` has the details.
    """
    report = check_dataset(dataset)
    return report.problems, report.samples


def check_dataset(dataset: str, storage_options: dict | None = None) -> Report:
    """Every check ``mmdata verify`` makes (docs/format.md lists them), one shard in memory at a time.

    Raises DatasetError only when dataset.json itself cannot be read; everything else is a problem.
    """
    start = time.perf_counter()
    options = storage_options or {}
    d = load_description(dataset, options)
    report = Report()
    if d.format_version < 2:
        report.notes.append(f"format v{d.format_version} dataset: member checksums are not available (the index "
                            "has them from format v2 on), so changed bytes inside members are not detected; "
                            "every other check ran")
    modalities_seen = Counter()
    for shard in d.shards:
        try:
            problems, n, seen = verify_shard(d, shard, options)
        except Exception as e:  # an unreadable shard is a finding, not a crash
            problems, n, seen = [f"{shard.name}: cannot be checked: {one_line(e)}"], 0, Counter()
        report.problems += problems
        report.samples += n
        report.bytes += seen.pop("bytes", 0)
        modalities_seen += seen
    t = d.totals
    if report.samples != t.written:
        report.problems.append(f"{DATASET_JSON}: says {t.written} samples were written; the shards hold "
                               f"{report.samples}")
    modalities = {m: n for m, n in sorted(modalities_seen.items()) if n}
    if not report.problems and modalities != {m: n for m, n in t.modalities.items() if n}:
        report.problems.append(f"{DATASET_JSON}: totals.modalities is {t.modalities}; the index counts {modalities}")
    expected = {"totals.shards": (t.shards, len(d.shards)), "totals.bytes": (t.bytes, sum(s.bytes for s in d.shards)),
                "totals.samples_in": (t.samples_in, t.written + t.rejected)}
    report.problems += [f"{DATASET_JSON}: {key} is {value}, expected {want} from the shard list and counts"
                        for key, (value, want) in expected.items() if value != want]
    report.problems += verify_tokenizer(d, options)
    report.problems += verify_errors(d, options)
    files, note = verify_files(d, options)
    report.problems += files
    report.notes += [note] if note else []
    report.seconds = time.perf_counter() - start
    return report


def verify_tokenizer(d: DatasetDescription, options: dict) -> list[str]:
    name = d.tokenizer.file
    try:
        data = read_file(storage.join(d.url, name), options)
    except FileNotFoundError:
        return [f"{name}: missing (dataset.json names it); rebuild the dataset"]
    except OSError as e:
        return [f"{name}: cannot be read ({one_line(e)})"]
    digest = hashlib.sha256(data).hexdigest()
    if digest != d.tokenizer.sha256:
        return [f"{name}: sha256 {digest[:16]}..., dataset.json says {d.tokenizer.sha256[:16]}...: the file was "
                "replaced or damaged; rebuild the dataset"]
    return []


ERROR_FIELDS = ("id", "row", "modality", "stage", "reason", "error", "action")


def verify_errors(d: DatasetDescription, options: dict) -> list[str]:
    """errors.jsonl: every line an error entry, counts by reason as in dataset.json. One line when damaged."""
    try:
        data = read_file(storage.join(d.url, ERRORS_JSONL), options)
    except FileNotFoundError:
        return [f"{ERRORS_JSONL}: missing; rebuild the dataset"]
    except OSError as e:
        return [f"{ERRORS_JSONL}: cannot be read ({one_line(e)})"]
    reasons, damaged = Counter(), []
    lines = data.split(b"\n")
    for number, line in enumerate(lines[:-1] if lines[-1] == b"" else lines, 1):
        try:
            entry = json.loads(line)   # RecursionError: nested too deep
            if not (isinstance(entry, dict) and all(f in entry for f in ERROR_FIELDS)
                    and isinstance(entry["reason"], str)):
                raise ValueError("not an error entry")
        except (ValueError, RecursionError):
            damaged.append(number)
            continue
        reasons[entry["reason"]] += 1
    if damaged:
        return [f"{ERRORS_JSONL}: line {damaged[0]} is not a JSON error entry with {', '.join(ERROR_FIELDS)} "
                f"({len(damaged)} such lines); the file is damaged, rebuild the dataset"]
    if dict(reasons) != d.totals.errors_by_reason:
        return [f"{ERRORS_JSONL} has {dict(sorted(reasons.items()))}, dataset.json says {d.totals.errors_by_reason}"]
    return []


def verify_files(d: DatasetDescription, options: dict) -> tuple[list[str], str | None]:
    """Files in the dataset directory that the format does not list: (problems, note when it cannot be listed)."""
    expected = {DATASET_JSON, ERRORS_JSONL, WIDS_INDEX, d.tokenizer.file,
                *(s.name for s in d.shards), *(index_name(s.name) for s in d.shards)}
    try:
        found = list_files(d.url, options)
    except Exception as e:   # listing is best effort: some stores (HTTP) cannot list at all
        return [], f"cannot list {d.url} ({one_line(e)}): stray files were not looked for"
    problems = []
    for name in sorted(set(found) - expected):
        if name.endswith(".tmp"):
            why = "a temporary file left by an interrupted write; delete it"
        elif SHARD_NAME.fullmatch(name) or (name.startswith(f"{INDEX_DIR}/") and name.endswith(".parquet")):
            why = "a shard or index file that dataset.json does not list; delete it or rebuild the dataset"
        else:
            why = "not part of a dataset directory (docs/format.md); move it elsewhere"
        problems.append(f"{name}: {why}")
    if len(problems) > 20:
        problems[20:] = [f"... and {len(problems) - 20} more files that are not part of the dataset"]
    return problems, None


def list_files(url: str, options: dict) -> list[str]:
    """Every file under ``url``, as paths relative to it with ``/``."""
    if storage.is_local(url):
        root = storage.local_path(url)
        if not root.is_dir():
            raise NotADirectoryError(f"{root} is not a directory")
        return [(Path(folder) / f).relative_to(root).as_posix() for folder, _, files in os.walk(root) for f in files]
    fs, path = storage.filesystem(url, options)
    path = path.rstrip("/")
    return [p[len(path) + 1:] for p in fs.find(path) if p.startswith(path + "/")]
