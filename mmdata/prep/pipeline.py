"""``mmdata preprocess``: input -> partitions -> an executor's tasks -> dataset directory.

    scan (driver, streaming): row count, duplicate ids (duplicates.py), label names, tokenizer texts
    tokenizer: given .model or trained on the scanned texts
    fingerprint (driver): rows [k*N, (k+1)*N) = partition k -> fingerprint -> in <root>/.store/<fp>/? reuse it
    partitions: those not in the store -> one task each, in-process or on Ray (executor.py; auto: by the
        work left, so a rerun with nothing to build starts no executor and imports neither torch nor Ray)
        task: build <root>/.store/<fp>/ (partition.py)
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
from array import array
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator

import numpy as np

from mmdata import storage
from mmdata.config import ConfigError, to_dict
from mmdata.dataset import TokenizerInfo, Totals, dataset_dir, description_json
from mmdata.prep.config import OutputConfig, PreprocessConfig
from mmdata.prep.duplicates import DuplicateFinder, duplicates_between
from mmdata.prep.executor import executor_settled, make_executor, run_with_progress
from mmdata.prep.members import ENTRY_JSON, GROUP_MODALITY, MEMBERS_DIR, entry_name
from mmdata.prep.store import STORE, preprocess_lease
from mmdata.prep.inputs import ReadSettings, read_input
from mmdata.prep.partition import Job, PartitionKeys, PartitionSummary, files_intact, label_key, partition_keys, stored_summary
from mmdata.prep.sources import Record, check_readable, iter_records
from mmdata.prep.text import check_text, load_tokenizer, train_tokenizer
from mmdata.schema import (DATASET_JSON, ERRORS_JSONL, FORMAT_VERSION, PROCESSING_VERSION,
                           TOKENIZER_FILE, SampleError, id_hash, index_name, without_addresses)

MAX_TOKENIZER_BYTES = 256 << 20   # SentencePiece models are a few MB; anything this big is not one


@dataclass
class Scan:
    rows: int = 0
    # the rows repeating an earlier row's id, sorted (int64: 8 bytes each, for inputs with millions of them)
    duplicates: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    labels: set[str] = field(default_factory=set)       # distinct labels, as text
    named_labels: bool = False                           # some label is not an integer
    texts: list[str] = field(default_factory=list)       # tokenizer training texts


@dataclass
class Result:
    dataset: str
    fingerprint: str
    reused_dataset: bool
    totals: Totals
    partitions_reused: int
    partitions_built: int
    seconds: float
    nodes: int = 1                  # Ray nodes that ran partitions
    phases: dict = field(default_factory=dict)  # seconds per phase: scan, tokenizer, fingerprint, startup,
    #                                             partitions, assemble
    executor: str = "none"          # what built the partitions the store lacked: serial, processes, ray, or none
    lineage: dict = field(default_factory=dict)  # per member group: partitions built and reused, reused from where

    @property
    def error_rate(self) -> float:
        return self.totals.error_rate



# texts sampled beyond text.train_samples, so that the sample is usually still full once duplicate rows' texts are
# dropped (when not, the input is read again up to the texts missing)
TEXT_SAMPLE_RESERVE = 0.1


def scan_input(config: PreprocessConfig) -> Scan:
    """One streaming pass. Memory, whatever the row count: the duplicate finder's (duplicates.py: ~20 bytes
    per row up to 4M rows, then temp files and one bucket at a time in memory; ~170 MB at most while
    sorting), 8 bytes per duplicate row, the distinct labels and the tokenizer sample.

    Which rows repeat an earlier id is known only at the end, yet what the scan collects comes from the rows
    kept only, exactly as if duplicates were skipped: each row's label travels with its id as a
    tag (only the kept rows' tags come back), and tokenizer texts are sampled from every row with a reserve
    of TEXT_SAMPLE_RESERVE beyond text.train_samples, duplicate rows' texts dropped at the end (and, when
    more than the reserve of them repeat an id, the rest read again: tokenizer_sample).
    """
    scan, label_numbers = Scan(), {}   # each distinct label key -> its number in the tags, from 1 (0: none)
    sample_size = config.text.train_samples + int(config.text.train_samples * TEXT_SAMPLE_RESERVE)
    sample_rows, sample_texts = array("q"), []   # the tokenizer sample, duplicate rows included
    want_texts = config.text.tokenizer is None
    with DuplicateFinder() as finder:
        for record in iter_records(config.input):
            scan.rows += 1
            key = scan_label(record.label)
            label = 0 if key is None else label_numbers.setdefault(key, len(label_numbers) + 1)
            finder.add(id_hash(record.id), record.row, label)   # the tag: the label's number (a uint32)
            if want_texts and record.text is not None and len(sample_texts) < sample_size:
                try:
                    sample_texts.append(check_text(record.text))
                    sample_rows.append(record.row)
                except Exception:  # reported per sample later, by the partition that owns it
                    pass
        repeats = finder.finish()
    scan.duplicates = repeats.rows
    kept_labels = repeats.kept_tags
    keys = [key for key, number in label_numbers.items() if number in kept_labels]
    scan.labels = {str(key) for key in keys}
    scan.named_labels = any(isinstance(key, str) for key in keys)
    if want_texts:
        scan.texts = tokenizer_sample(config, sample_rows, sample_texts, len(sample_texts) == sample_size,
                                      scan.duplicates)
    return scan


def tokenizer_sample(config: PreprocessConfig, rows: array, texts: list[str], full: bool,
                     duplicates: np.ndarray) -> list[str]:
    """The first text.train_samples valid texts of rows that are not duplicates, from the scan's sample
    (``rows``, ``texts``: every row's until it was ``full``) and, when its duplicates leave it short, from
    the rows after it, read again."""
    wanted = config.text.train_samples
    repeated = np.isin(np.frombuffer(rows, np.int64), duplicates)
    kept = [text for text, repeat in zip(texts, repeated) if not repeat][:wanted]
    if len(kept) < wanted and full:
        after = rows[-1]
        for record in iter_records(config.input):
            if len(kept) == wanted:
                break
            if record.row <= after or record.text is None or duplicates_between(duplicates, record.row, record.row):
                continue
            try:
                kept.append(check_text(record.text))
            except Exception:  # reported per sample later, by the partition that owns it
                pass
    return kept


def scan_label(label) -> int | str | None:
    try:
        return None if label is None else label_key(label)
    except SampleError:   # reported by the partition that owns the row
        return None


def label_mapping(scan: Scan) -> dict[str, int] | None:
    """Names get ids in sorted order; when some label is a name, numeric labels are names too ("1")."""
    return {name: i for i, name in enumerate(sorted(scan.labels))} if scan.named_labels else None


def get_tokenizer(config: PreprocessConfig, scan: Scan) -> bytes:
    if config.text.tokenizer:
        settings = ReadSettings(config.input.storage_options, config.input.timeout_s, config.input.retries)
        try:
            model = read_input(config.text.tokenizer, MAX_TOKENIZER_BYTES, settings)
            load_tokenizer(model)
        except Exception as e:
            raise ConfigError("text.tokenizer", f"cannot load SentencePiece model {config.text.tokenizer}: "
                                                f"{without_addresses(str(e))}") from None
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
    """(k, its records, its duplicate rows) per partition; a partition's rows are consecutive."""
    size, batch, k = config.output.samples_per_shard, [], 0
    for record in iter_records(config.input):
        batch.append(record)
        if len(batch) == size:
            yield k, batch, duplicates_between(scan.duplicates, batch[0].row, record.row)
            batch, k = [], k + 1
    if batch or k == 0:   # an empty input is one empty partition
        yield k, batch, duplicates_between(scan.duplicates, batch[0].row, batch[-1].row) if batch else set()


CHECK_THREADS = 8   # partitions fingerprinted at once by the driver (a stat, a metadata request or a hash per file)


class ReuseCheck:
    """The driver's reuse check: each partition fingerprinted (its rows, its files' identities, the job's salt)
    and looked up in the store, in input order, a few partitions ahead on threads.

    Partitions found are collected in ``reused``; iterating yields the others, ``(k, records, duplicates,
    keys)``, for an executor. ``look_ahead`` checks until the work found settles the choice of executor
    (holding that work's rows meanwhile); ``stop_checking`` hands the rest over unchecked (keys None:
    each Ray task fingerprints its own rows, in parallel across the cluster).
    """

    def __init__(self, job: Job, partitions: Iterator[tuple[int, list[Record], set[int]]]):
        self.job, self.partitions = job, partitions
        self.reused: list[PartitionSummary] = []   # found finished in the store
        self.computing: set[str] = set()           # the modalities whose members the missing partitions lack
        self.count = self.samples = self.largest = 0   # partitions found missing so far, their samples, the most in one
        self.missing: deque = deque()              # checked, missing, not yet handed out
        self.ahead: deque = deque()                # (partition, future of its check), in input order
        self.checking, self.done = True, False
        self.pool = ThreadPoolExecutor(CHECK_THREADS, thread_name_prefix="mmdata-check")

    def __enter__(self) -> "ReuseCheck":
        return self

    def __exit__(self, *exc) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    def look_ahead(self, settled: Callable[[], bool]) -> None:
        """Check until ``settled()`` (asked after each partition) or the input ends."""
        while not self.done and self.checking and not settled():
            self.check_next()

    def stop_checking(self) -> None:
        self.checking = False

    def check_next(self) -> None:
        while self.checking and len(self.ahead) < 2 * CHECK_THREADS:
            partition = next(self.partitions, None)
            if partition is None:
                break
            self.ahead.append((partition, self.pool.submit(check_partition, self.job, *partition[:3])))
        if not self.ahead:
            self.done = self.done or self.checking
            return
        partition, future = self.ahead.popleft()
        keys, stored, lacking = future.result()
        if stored is not None:
            self.reused.append(replace(stored, reused=True))
        else:
            self.missing.append((*partition, keys))
            self.computing |= computed_modalities(lacking)
            self.count, self.samples = self.count + 1, self.samples + len(partition[1])
            self.largest = max(self.largest, len(partition[1]))

    def __iter__(self) -> Iterator[tuple[int, list[Record], set[int], str | None]]:
        while True:
            while self.missing:
                yield self.missing.popleft()
            if self.done:
                return
            if self.checking or self.ahead:
                self.check_next()
            else:
                for partition in self.partitions:
                    yield (*partition, None)
                self.done = True


def check_partition(job: Job, k: int, records: list[Record], duplicates: set[int]
                    ) -> tuple[PartitionKeys, PartitionSummary | None, set[str]]:
    """Partition ``k``'s keys, its finished result in the store if there is one, and else the member groups
    the store lacks for it."""
    keys = partition_keys(job, k, records, duplicates)
    options = job.config.output.storage_options
    stored = stored_summary(storage.join(job.store, keys.fingerprint), options)
    if stored is not None:
        return keys, stored, set()
    members = storage.join(job.store, MEMBERS_DIR)
    return keys, None, {group for group, key in keys.members.items()
                        if not storage.exists(storage.join(members, entry_name(group, key), ENTRY_JSON), options)}


def computed_modalities(groups: set[str]) -> set[str]:
    """The modalities whose code runs to make these groups: audio's (torch) only for a mel or a waveform; a
    FLAC alone comes from the cached waveform."""
    return {GROUP_MODALITY[g] for g in groups if g != "flac"}


def preprocess(config: PreprocessConfig, log: Callable[[str], None] = print) -> Result:
    """Run the whole job; see the module docstring. Raises ConfigError before any work. From the reuse
    check on, the store is held shared (store.py: ``mmdata gc`` waits for the run, and the run for a gc)."""
    start = time.perf_counter()
    phases = {}
    remove_stale_temp_files(config.output.root)
    check_readable(config.input)
    scan = scan_input(config)
    phases["scan"] = time.perf_counter() - start
    tokenizer = get_tokenizer(config, scan)
    labels = label_mapping(scan)
    salt = job_salt(config, tokenizer, labels)
    job = Job(config, tokenizer, labels, salt, storage.join(config.output.root, STORE))
    phases["tokenizer"] = time.perf_counter() - start - phases["scan"]
    with preprocess_lease(config.output.root, log):
        return build(job, scan, phases, start, log)


def build(job: Job, scan: Scan, phases: dict, start: float, log: Callable[[str], None]) -> Result:
    """The partitions the store lacks, then the dataset directory."""
    config, salt = job.config, job.salt
    mark = time.perf_counter()
    with ReuseCheck(job, iter_partitions(config, scan)) as check:
        check.look_ahead(lambda: executor_settled(config.ray, check.count, check.samples, check.largest))
        phases["fingerprint"] = time.perf_counter() - mark
        phases["startup"] = phases["partitions"] = 0.0
        executor = None
        if check.count:   # something to build: only now is an executor chosen and started
            executor = make_executor(config.ray, check.samples, check.largest)
            mark = time.perf_counter()
            # warm what the work found so far computes (a config change asks the same of every partition; a
            # partition that needs more imports it itself)
            executor.start(job, sorted(check.computing))
            phases["startup"] = time.perf_counter() - mark
            if executor.name == "ray":   # Ray's tasks fingerprint the rest themselves, in parallel
                check.stop_checking()
            summaries = run_with_progress(executor, job, check, scan.rows, config.progress, check.reused)
            phases["partitions"] = time.perf_counter() - mark - phases["startup"]
        else:
            summaries = sorted(check.reused, key=lambda s: s.partition)
    mark = time.perf_counter()
    fingerprint = hashlib.sha256((salt + "".join(s.fingerprint for s in summaries)).encode()).hexdigest()[:16]
    dataset = dataset_dir(config.output.root, config.output.name, fingerprint)
    totals = sum((s.totals for s in summaries), start=Totals())
    options = config.output.storage_options
    # complete means dataset.json and every shard and index it lists, at their recorded sizes
    described = storage.exists(storage.join(dataset, DATASET_JSON), options)
    reused = described and files_intact(dataset, [shard for s in summaries for shard in s.shards], options)
    if described and not reused:   # damaged since it was built: not complete until repaired
        log(f"repairing {dataset}: a shard or index it lists is missing or has another size")
        storage.remove(storage.join(dataset, DATASET_JSON), options)
    if reused:
        lineage = storage.read_json(storage.join(dataset, DATASET_JSON), options).get("lineage") or {}
    else:
        lineage = member_lineage(job, summaries, dataset)
        assemble(job, dataset, fingerprint, summaries, totals, scan, lineage)
    point_latest(config.output, dataset)
    phases["assemble"] = time.perf_counter() - mark
    n_reused = sum(s.reused for s in summaries)
    nodes = len({s.node for s in summaries if s.node}) or 1   # "": in this process
    return Result(dataset, fingerprint, reused, totals, n_reused, len(summaries) - n_reused,
                  time.perf_counter() - start, nodes, {k: round(v, 3) for k, v in phases.items()},
                  executor.name if executor else "none", lineage)


def member_lineage(job: Job, summaries: list[PartitionSummary], dataset: str) -> dict:
    """Per member group (text, image, audio, waveform): in how many partitions it was computed for this
    dataset and in how many reused from members computed for other finished datasets in the root, named.

    Members an interrupted earlier run of this same config computed count as computed for this dataset, so
    a killed and resumed run, or two runs at once, record the same lineage as one uninterrupted run."""
    found = any(not (use.built and not s.reused) for s in summaries for use in s.members)
    finished = datasets_by_config(job.config.output, dataset) if found else {}
    own = job.salt[:16]
    counts, sources = {}, {}
    for summary in summaries:
        for use in summary.members:
            source = str(use.built_by.get("config_fingerprint"))
            computed = (use.built and not summary.reused) or (source == own and own not in finished)
            count = counts.setdefault(use.group, {"built": 0, "reused": 0})
            count["built" if computed else "reused"] += 1
            if not computed:
                names = finished.get(source) or [f"{use.built_by.get('name')} (config {source}: no finished "
                                                  "dataset in the root)"]
                sources.setdefault(use.group, set()).update(names)
    return {group: {**counts[group], "from": sorted(sources.get(group, ()))}
            for group in sorted(counts, key=lambda g: list(GROUP_MODALITY).index(g))}


def datasets_by_config(output: OutputConfig, exclude: str) -> dict[str, list[str]]:
    """config_fingerprint -> the names of the finished dataset directories in the root built with it
    (``exclude`` left out). Unreadable descriptions are skipped: lineage is a record, not a check."""
    found: dict[str, list[str]] = {}
    try:
        if storage.is_local(output.root):
            base = storage.local_path(output.root)
            urls = [str(p) for p in sorted(base.glob(f"*/{DATASET_JSON}")) if not p.parent.is_symlink()]
        else:
            fs, path = storage.filesystem(output.root, output.storage_options)
            protocol = output.root.split("://")[0]
            urls = [f"{protocol}://{p}" for p in sorted(fs.glob(f"{path.rstrip('/')}/*/{DATASET_JSON}"))]
    except OSError:
        return found
    for url in urls:
        folder = url.rsplit("/", 2)[-2]
        if folder.startswith(".") or url.rsplit("/", 1)[0].rstrip("/") == exclude.rstrip("/"):
            continue
        try:
            config_fingerprint = storage.read_json(url, output.storage_options).get("config_fingerprint")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(config_fingerprint, str):
            found.setdefault(config_fingerprint, []).append(folder)
    return found


def assemble(job: Job, dataset: str, fingerprint: str, summaries: list[PartitionSummary], totals: Totals,
             scan: Scan, lineage: dict) -> None:
    """Link partition results into the dataset directory; dataset.json goes last."""
    options = job.config.output.storage_options
    errors = []
    for s in summaries:
        source = storage.join(job.store, s.fingerprint)
        for shard in s.shards:
            for name in (shard.name, index_name(shard.name)):
                storage.link_or_copy(storage.join(source, name), storage.join(dataset, name), options)
        if s.totals.errors_by_reason:
            errors.append(storage.read_bytes(storage.join(source, ERRORS_JSONL), options))
    storage.write_bytes(storage.join(dataset, ERRORS_JSONL), b"".join(errors), options)
    storage.write_bytes(storage.join(dataset, TOKENIZER_FILE), job.tokenizer, options)
    shards = [shard for s in summaries for shard in s.shards]
    storage.write_json(storage.join(dataset, DATASET_JSON),
                       dataset_json(job, fingerprint, shards, totals, scan, lineage), options)


def dataset_json(job: Job, fingerprint: str, shards: list, totals: Totals, scan: Scan, lineage: dict) -> dict:
    config = job.config
    model = load_tokenizer(job.tokenizer)
    tokenizer = TokenizerInfo(TOKENIZER_FILE, hashlib.sha256(job.tokenizer).hexdigest(), model.vocab_size(),
                              config.text.tokenizer is None, model.bos_id(), model.eos_id(), model.pad_id())
    source = {"manifest": config.input.manifest, "tars": config.input.tar_urls() or None, "rows": scan.rows}
    return description_json(config.output.name, fingerprint, to_dict(config), source, job.labels, tokenizer,
                            shards, totals, library_versions(), job.salt[:16], lineage)


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


def remove_stale_temp_files(root: str) -> None:
    """Temp files that killed runs left in the store and the dataset directories (SIGKILL, a power cut:
    nothing could clean up then). Those of live processes, other runs included, stay."""
    if not storage.is_local(root):
        return   # object stores get whole-object uploads: no temp files
    base = storage.local_path(root)
    for folder in (base, *base.glob("*/"), *base.glob("*/index/"), *base.glob(f"{STORE}/*/"),
                   *base.glob(f"{STORE}/*/index/"), *base.glob(f"{STORE}/{MEMBERS_DIR}/*/")):
        for path in storage.stale_temp_files(folder):
            path.unlink(missing_ok=True)


def point_latest(output: OutputConfig, dataset: str) -> None:
    """``<root>/<name>`` -> the newest dataset directory (local roots only: a symlink)."""
    if not storage.is_local(output.root):
        return
    link = storage.local_path(output.root) / output.name
    if link.exists() and not link.is_symlink():
        return
    tmp = storage.temp_path(link)
    tmp.symlink_to(storage.local_path(dataset).name)
    os.replace(tmp, link)
