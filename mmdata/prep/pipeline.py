"""``mmdata preprocess``: input -> partitions -> Ray tasks -> dataset directory.

    scan (driver, streaming): row count, duplicate ids, label names, tokenizer texts
    tokenizer: given .model or trained on the scanned texts
    partitions: rows [k*N, (k+1)*N) -> one Ray task each (bounded number in flight)
        task: fingerprint rows -> reuse <root>/.store/<fp>/ or build it (process.py)
    assemble: hard-link every partition's shards + index into <root>/<name>-<fp>/,
        concatenate errors, write the tokenizer, then dataset.json (= complete)

Partitions depend only on their rows and the config, so the output is
byte-identical whatever the worker count, and a rerun rebuilds only
partitions whose rows or files changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterator

from mmdata import storage
from mmdata.prep.audio import AudioConfig
from mmdata.config import ConfigError, require, require_choice, to_dict
from mmdata.dataset import dataset_dir
from mmdata.prep.image import ImageConfig
from mmdata.prep.partition import Job, is_int_like
from mmdata.schema import (DATASET_JSON, ERRORS_JSONL, FORMAT_VERSION, INDEX_DIR, PROCESSING_VERSION,
                           TOKENIZER_FILE)
from mmdata.prep.sources import InputConfig, Record, check_readable, iter_records
from mmdata.prep.text import TextConfig, check_text, load_tokenizer, train_tokenizer

STORE = ".store"


@dataclass
class OutputConfig:
    root: str = "data/datasets"     # local path or fsspec URL (s3://bucket/prefix)
    name: str = "dataset"           # the dataset directory is <root>/<name>-<fingerprint>
    samples_per_shard: int = 1000   # one input partition = this many rows = one shard
    max_shard_bytes: int = 0        # >0: split a partition's shard when it would exceed this
    storage_options: dict = field(default_factory=dict)

    def validate(self) -> None:
        require(bool(self.name) and "/" not in self.name, "name", f"must be a plain name; got {self.name!r}")
        require(self.samples_per_shard > 0, "samples_per_shard", f"must be positive; got {self.samples_per_shard}")
        require(self.max_shard_bytes == 0 or self.max_shard_bytes >= 10240, "max_shard_bytes",
                f"must be 0 (no limit) or at least 10240; got {self.max_shard_bytes}")


@dataclass
class RayConfig:
    executor: str = "ray"           # ray | serial (in-process, for debugging)
    address: str | None = None      # an existing cluster ("auto", "ray://..." or host:port); env RAY_ADDRESS too
    num_cpus: int | None = None     # local instance only; default: all cores
    max_in_flight: int = 0          # partitions queued at once; 0 = 2 x cluster CPUs

    def validate(self) -> None:
        require_choice(self.executor, "executor", ("ray", "serial"))
        require(self.num_cpus is None or self.num_cpus > 0, "num_cpus", f"must be positive; got {self.num_cpus}")
        require(self.max_in_flight >= 0, "max_in_flight", f"must be >= 0; got {self.max_in_flight}")


@dataclass
class PreprocessConfig:
    input: InputConfig = field(default_factory=InputConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    text: TextConfig = field(default_factory=TextConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    max_error_rate: float = 0.05    # rejected / input samples above this makes the run fail
    progress: bool = True

    def validate(self) -> None:
        require(0.0 <= self.max_error_rate <= 1.0, "max_error_rate",
                f"must be between 0 and 1; got {self.max_error_rate}")


@dataclass
class Scan:
    rows: int = 0
    duplicates: set[int] = field(default_factory=set)   # rows repeating an earlier row's id
    labels: set[str] = field(default_factory=set)       # distinct labels, as text
    named_labels: bool = False                           # some label is not an integer
    texts: list[str] = field(default_factory=list)       # tokenizer training texts


@dataclass
class Result:
    dataset: str
    fingerprint: str
    reused_dataset: bool
    totals: dict
    partitions_reused: int
    partitions_built: int
    seconds: float
    nodes: int = 1                  # Ray nodes that ran partitions
    phases: dict = field(default_factory=dict)  # seconds per phase: scan, tokenizer, startup, partitions, assemble

    @property
    def error_rate(self) -> float:
        return self.totals["rejected"] / max(1, self.totals["samples_in"])


def scan_input(config: PreprocessConfig) -> Scan:
    """One streaming pass; memory is 8 bytes per id plus the bounded tokenizer sample."""
    scan, seen = Scan(), set()
    want_texts = config.text.tokenizer is None
    for record in iter_records(config.input):
        scan.rows += 1
        digest = int.from_bytes(hashlib.blake2b(record.id.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")
        if digest in seen:
            scan.duplicates.add(record.row)
            continue
        seen.add(digest)
        if isinstance(record.label, (int, float, str)) and not isinstance(record.label, bool):
            scan.labels.add(str(record.label).strip())
            scan.named_labels |= not is_int_like(record.label)
        if want_texts and record.text is not None and len(scan.texts) < config.text.train_samples:
            try:
                scan.texts.append(check_text(record.text))
            except Exception:  # reported per sample later, by the partition that owns it
                pass
    return scan


def label_mapping(scan: Scan) -> dict[str, int] | None:
    """String labels get ints in sorted order; integer-looking labels are then names too."""
    return {name: i for i, name in enumerate(sorted(scan.labels))} if scan.named_labels else None


def get_tokenizer(config: PreprocessConfig, scan: Scan) -> bytes:
    if config.text.tokenizer:
        try:
            model = storage.read_bytes(config.text.tokenizer, config.input.storage_options)
            load_tokenizer(model)
        except Exception as e:
            raise ConfigError("text.tokenizer", f"cannot load SentencePiece model {config.text.tokenizer}: {e}") from None
        return model
    texts = sorted(set(scan.texts)) or ["empty"]  # sorted: independent of row order within the sample
    return train_tokenizer(texts, config.text)


def job_salt(config: PreprocessConfig, tokenizer: bytes, labels: dict | None) -> str:
    affecting = {"format": FORMAT_VERSION, "processing": PROCESSING_VERSION,
                 "text": {**to_dict(config.text), "tokenizer": None},
                 "image": to_dict(config.image), "audio": to_dict(config.audio),
                 "samples_per_shard": config.output.samples_per_shard,
                 "max_shard_bytes": config.output.max_shard_bytes,
                 "tokenizer": hashlib.sha256(tokenizer).hexdigest(), "labels": labels}
    return hashlib.sha256(json.dumps(affecting, sort_keys=True).encode()).hexdigest()


def iter_partitions(config: PreprocessConfig, scan: Scan) -> Iterator[tuple[int, list[Record], set[int]]]:
    size, batch, k = config.output.samples_per_shard, [], 0
    for record in iter_records(config.input):
        batch.append(record)
        if len(batch) == size:
            yield k, batch, {r.row for r in batch if r.row in scan.duplicates}
            batch, k = [], k + 1
    if batch or k == 0:
        yield k, batch, {r.row for r in batch if r.row in scan.duplicates}


def preprocess(config: PreprocessConfig, log: Callable[[str], None] = print) -> Result:
    """Run the whole job; see the module docstring. Raises ConfigError before any work."""
    start = time.perf_counter()
    phases = {}
    check_readable(config.input)
    scan = scan_input(config)
    phases["scan"] = time.perf_counter() - start
    tokenizer = get_tokenizer(config, scan)
    labels = label_mapping(scan)
    salt = job_salt(config, tokenizer, labels)
    job = Job(config, tokenizer, labels, salt, storage.join(config.output.root, STORE))
    phases["tokenizer"] = time.perf_counter() - start - phases["scan"]
    from mmdata.prep.executor import run_all
    summaries = run_all(job, iter_partitions(config, scan), scan.rows, config, phases)
    mark = time.perf_counter()
    fingerprint = hashlib.sha256((salt + "".join(s["fingerprint"] for s in summaries)).encode()).hexdigest()[:16]
    dataset = dataset_dir(config.output.root, config.output.name, fingerprint)
    totals = add_totals(summaries)
    options = config.output.storage_options
    reused = storage.exists(storage.join(dataset, DATASET_JSON), options)
    if not reused:
        assemble(job, dataset, fingerprint, summaries, totals, scan)
    point_latest(config.output, dataset)
    phases["assemble"] = time.perf_counter() - mark
    n_reused = sum(s["reused"] for s in summaries)
    nodes = len({s.get("node") for s in summaries})
    return Result(dataset, fingerprint, reused, totals, n_reused, len(summaries) - n_reused,
                  time.perf_counter() - start, nodes, {k: round(v, 3) for k, v in phases.items()})


def add_totals(summaries: list[dict]) -> dict:
    totals = {"samples_in": 0, "written": 0, "rejected": 0, "bytes": 0, "shards": 0}
    modalities, reasons = Counter(), Counter()
    for s in summaries:
        for key in ("samples_in", "written", "rejected", "bytes"):
            totals[key] += s[key]
        totals["shards"] += len(s["shards"])
        modalities.update(s["modalities"])
        reasons.update(s["errors_by_reason"])
    return {**totals, "modalities": dict(sorted(modalities.items())), "errors_by_reason": dict(sorted(reasons.items()))}


def assemble(job: Job, dataset: str, fingerprint: str, summaries: list[dict], totals: dict, scan: Scan) -> None:
    """Link partition results into the dataset directory; dataset.json goes last."""
    options = job.config.output.storage_options
    shards, errors = [], []
    for s in summaries:
        source = storage.join(job.store, s["fingerprint"])
        for shard in s["shards"]:
            index_name = f"{INDEX_DIR}/{shard['name'][:-len('.tar')]}.parquet"
            storage.link_or_copy(storage.join(source, shard["name"]), storage.join(dataset, shard["name"]), options)
            storage.link_or_copy(storage.join(source, index_name), storage.join(dataset, index_name), options)
            shards.append({**shard, "partition": s["partition"], "fingerprint": s["fingerprint"]})
        if s["errors_by_reason"]:
            errors.append(storage.read_bytes(storage.join(source, ERRORS_JSONL), options))
    storage.write_bytes(storage.join(dataset, ERRORS_JSONL), b"".join(errors), options)
    storage.write_bytes(storage.join(dataset, TOKENIZER_FILE), job.tokenizer, options)
    storage.write_json(storage.join(dataset, DATASET_JSON),
                       dataset_description(job, fingerprint, shards, totals, scan), options)


def dataset_description(job: Job, fingerprint: str, shards: list[dict], totals: dict, scan: Scan) -> dict:
    config = job.config
    tokenizer = load_tokenizer(job.tokenizer)
    return {
        "format_version": FORMAT_VERSION,
        "processing_version": PROCESSING_VERSION,
        "name": config.output.name,
        "fingerprint": fingerprint,
        "config": to_dict(config),
        "source": {"manifest": config.input.manifest, "tars": config.input.tar_urls() or None, "rows": scan.rows},
        "labels": job.labels,
        "tokenizer": {"file": TOKENIZER_FILE, "sha256": hashlib.sha256(job.tokenizer).hexdigest(),
                      "vocab_size": tokenizer.vocab_size(), "trained": config.text.tokenizer is None,
                      "bos_id": tokenizer.bos_id(), "eos_id": tokenizer.eos_id(), "pad_id": tokenizer.pad_id()},
        "shards": shards,
        "index": INDEX_DIR,
        "totals": totals,
        "versions": library_versions(),
    }


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version
    names = ("mm", "torch", "torchaudio", "sentencepiece", "pyarrow", "webdataset", "ray", "numpy", "Pillow", "soundfile")
    versions = {}
    for name in names:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "missing"
    return versions


def point_latest(output: OutputConfig, dataset: str) -> None:
    """``<root>/<name>`` -> the newest dataset directory (local roots only: a symlink)."""
    if not storage.is_local(output.root):
        return
    link = storage.local_path(output.root) / output.name
    if link.exists() and not link.is_symlink():
        return
    tmp = link.with_name(f".{output.name}.{os.getpid()}.tmp")
    if tmp.is_symlink():
        tmp.unlink()
    tmp.symlink_to(storage.local_path(dataset).name)
    os.replace(tmp, link)
