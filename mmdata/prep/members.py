"""The member cache: one modality's processed members for one partition, kept in the store, so that a run
which changes one modality's settings computes that modality alone and assembles its shards from the rest.

    <root>/.store/members/<group>-<key>/
        members.bin   every member's bytes, back to back, in row order
        entry.json    per row of the partition: null (no input for this group, or the row is rejected before
                      anything is encoded), {"members": [[ext, offset, size, crc32], ...], "info": {...},
                      "info_json": "..."} or {"error": [reason, message]}; and which run built it. Written
                      last: an entry is complete when entry.json exists and members.bin has the size it
                      records.

A group is what one entry holds, and its key is everything those bytes depend on:

    group     members             key: its settings (below), the processing and format versions, and each
    text      txt, tokens.npy          row's input for it (the text; the file's identity for image and audio)
    image     jpg | webp | png    settings: text -> the tokenizer's bytes and the text.* keys that shape
    audio     mel.npy                 tokens; image -> image.*; audio -> audio.* but keep_waveform;
    waveform  pcm (cache only)        waveform, flac -> the audio.* keys the waveform depends on
    flac      flac (audio.keep_waveform: true only)

The waveform is the clip decoded, resampled and fitted, as 16-bit PCM: what the mel and the FLAC are made
from (audio.py). It is cached, never written to a shard, so that a change of mel settings (n_mels, n_fft,
hop_length...) makes new features without decoding and resampling again.

``on_error`` is in no key: it decides at assembly what a failure does to its sample, not what the members
are. Keys leave settings out by naming the ones that cannot matter, so a key that forgot a new setting
rebuilds too often instead of reusing wrong bytes. The label, the metadata and the sample's json are made at
assembly from the rows and the cached infos (cheap), so they are in no entry.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import tempfile
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from mmdata import storage
from mmdata.config import to_dict
from mmdata.prep.inputs import ReadSettings, read_input, too_large
from mmdata.schema import MEMBER_FORMAT_VERSION, PROCESSING_VERSION, SampleError

if TYPE_CHECKING:
    from mmdata.prep.config import PreprocessConfig
    from mmdata.prep.partition import Job
    from mmdata.prep.sources import Record

MEMBERS_DIR = "members"          # under the store
MEMBERS_BIN = "members.bin"
ENTRY_JSON = "entry.json"
ENTRY_VERSION = 1                # entry.json's layout; an entry of another layout is computed again

GROUPS = ("text", "image", "audio", "waveform", "flac")
GROUP_MODALITY = {"text": "text", "image": "image", "audio": "audio", "waveform": "audio", "flac": "audio"}
PCM = "pcm"   # the waveform entry's member: little-endian int16 samples
_MEL_ONLY = ("n_mels", "n_fft", "hop_length", "win_length", "f_min", "f_max", "log_offset")
# settings that decide nothing in a group's bytes (text: what trains the tokenizer, whose bytes are in the key)
_NOT_IN_KEY = {
    "text": ("tokenizer", "vocab_size", "model_type", "character_coverage", "train_samples", "on_error"),
    "image": ("on_error",),
    "audio": ("keep_waveform", "on_error"),
    "waveform": (*_MEL_ONLY, "keep_waveform", "on_error"),
    "flac": (*_MEL_ONLY, "keep_waveform", "on_error"),
}


def job_groups(config: PreprocessConfig) -> tuple[str, ...]:
    """The groups a job's samples are made of (and the waveform their audio is made from)."""
    return GROUPS if config.audio.keep_waveform else GROUPS[:4]


def group_settings(group: str, config: PreprocessConfig, tokenizer: bytes) -> dict:
    section = to_dict(getattr(config, GROUP_MODALITY[group]))
    settings = {k: v for k, v in section.items() if k not in _NOT_IN_KEY[group]}
    if group == "text":
        settings["tokenizer"] = hashlib.sha256(tokenizer).hexdigest()
    return settings


def member_keys(job: Job, inputs: list[dict | None]) -> dict[str, str]:
    """Each group's key for a partition whose rows have ``inputs`` (per row: the identity of each modality's
    input, or None for a row rejected before encoding). Groups no row needs have no key."""
    keys = {}
    for group in job_groups(job.config):
        modality = GROUP_MODALITY[group]
        per_row = [None if row is None else row.get(modality) for row in inputs]
        if all(value is None for value in per_row):
            continue
        settings = [group, group_settings(group, job.config, job.tokenizer), PROCESSING_VERSION, MEMBER_FORMAT_VERSION]
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
        for value in per_row:
            digest.update(json.dumps(value, sort_keys=True, default=str).encode("utf-8", "surrogatepass"))
            digest.update(b"\0")
        keys[group] = digest.hexdigest()[:32]
    return keys


def entry_name(group: str, key: str) -> str:
    return f"{group}-{key}"


@dataclass
class Entry:
    """A complete entry, read back: each row's outcome and the members' bytes (memory-mapped)."""
    group: str
    key: str
    outcomes: list
    built_by: dict
    data: Any = b""             # mmap of members.bin, or b"" for an entry without members
    built: bool = False         # computed by this run (else found in the store)
    file: Any = None            # the open members.bin behind ``data``

    def __post_init__(self):
        self.view = memoryview(self.data)

    def outcome(self, i: int) -> Outcome | SampleError | None:
        """Row ``i``'s members and info, the SampleError it failed with, or None (no input). The members are
        views into the map, valid until :meth:`close`."""
        found = self.outcomes[i]
        if found is None:
            return None
        if "error" in found:
            return SampleError(*found["error"])
        view = self.view
        return Outcome({ext: (view[offset:offset + size], crc) for ext, offset, size, crc in found["members"]},
                       found["info"], found["info_json"])

    def close(self) -> None:
        self.view.release()
        if isinstance(self.data, mmap.mmap):
            try:
                self.data.close()
            except BufferError:   # a slice is still referenced (an exception's traceback): it closes with it
                pass
        if self.file is not None:
            self.file.close()
        self.data, self.file = b"", None
        self.view = memoryview(self.data)


@dataclass(frozen=True)
class Outcome:
    """One row's cached result for one group: its members (ext -> (bytes, crc32)), its info for the sample's
    json, and that info already serialised as the json writes it."""
    members: dict[str, tuple[memoryview | bytes, int]]
    info: dict
    info_json: str


def load_entry(folder: Path, group: str, key: str, rows: int, check: bool = True) -> Entry | None:
    """The complete entry in ``folder`` for a partition of ``rows`` rows, or None (missing, unfinished, of
    another layout, members.bin cut short, or, with ``check``, a member whose bytes no longer have their
    CRC-32: compute it again). The check reads the entry once (at ~2 GB/s) so that a disk's damage to the
    cache never reaches a new dataset's shards."""
    if not ((folder / ENTRY_JSON).is_file() and (folder / MEMBERS_BIN).is_file()):   # no FIFO is opened
        return None
    try:
        doc = json.loads((folder / ENTRY_JSON).read_bytes())
        f = open(folder / MEMBERS_BIN, "rb")
    except (OSError, ValueError):
        return None
    size = os.fstat(f.fileno()).st_size
    if not isinstance(doc, dict) or doc.get("version") != ENTRY_VERSION or doc.get("bytes") != size \
            or not isinstance(doc.get("outcomes"), list) or len(doc["outcomes"]) != rows:
        f.close()
        return None
    data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
    entry = Entry(group, key, doc["outcomes"], doc.get("built_by", {}), data, file=f)
    if check and not entry_intact(entry):
        entry.close()
        return None
    return entry


def entry_intact(entry: Entry) -> bool:
    """Every outcome well formed (members with their info, or an error) and every member's bytes at their
    CRC-32: an entry.json damaged or written by other code is computed again, never a traceback."""
    view = entry.view
    try:
        for outcome in entry.outcomes:
            if outcome is None:
                continue
            if "error" in outcome:
                reason, message = outcome["error"]
                if not (isinstance(reason, str) and isinstance(message, str)):
                    return False
                continue
            if not (isinstance(outcome["info"], dict) and isinstance(outcome["info_json"], str)):
                return False
            for _, offset, size, crc in outcome["members"]:
                if zlib.crc32(view[offset:offset + size]) != crc:
                    return False
        return True
    except (TypeError, ValueError, KeyError):   # a malformed outcome
        return False


class EntryWriter:
    """Writes one entry as its rows are encoded: members appended to members.bin (nothing held in memory but
    the outcomes), entry.json last."""

    def __init__(self, folder: Path, group: str, key: str, rows: int):
        self.folder, self.group, self.key = folder, group, key
        folder.mkdir(parents=True, exist_ok=True)
        self.tmp = storage.temp_path(folder / MEMBERS_BIN)
        self.file = open(self.tmp, "wb")
        self.outcomes: list = [None] * rows
        self.offset = 0

    def add(self, i: int, members: dict[str, bytes], info: dict) -> None:
        placed = []
        for ext, data in members.items():
            self.file.write(data)
            placed.append([ext, self.offset, len(data), zlib.crc32(data)])
            self.offset += len(data)
        self.outcomes[i] = {"members": placed, "info": info, "info_json": info_json(info)}

    def fail(self, i: int, error: SampleError) -> None:
        self.outcomes[i] = {"error": [error.reason, str(error)]}

    def finish(self, built_by: dict) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.folder / MEMBERS_BIN)
        doc = {"version": ENTRY_VERSION, "group": self.group, "key": self.key, "bytes": self.offset,
               "built_by": built_by, "outcomes": self.outcomes}
        storage.write_bytes(str(self.folder / ENTRY_JSON),
                            json.dumps(doc, sort_keys=True, default=str, separators=(",", ":")).encode(), {})

    def abort(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


class MemberStore:
    """The member entries of one partition task: found in the store or computed, then open for assembly.

    Local stores are used in place. For object storage the task works in a local staging folder: entries
    found are downloaded into it, entries computed are uploaded from it (members.bin first, entry.json last).
    """

    def __init__(self, job: Job):
        self.url = storage.join(job.store, MEMBERS_DIR)
        self.options = job.config.output.storage_options
        self.local = storage.is_local(self.url)
        self._staging = None if self.local else tempfile.TemporaryDirectory(prefix="mmdata-members-")
        self.base = storage.local_path(self.url) if self.local else Path(self._staging.name)

    def find(self, group: str, key: str, rows: int) -> Entry | None:
        name = entry_name(group, key)
        if not self.local:
            remote = storage.join(self.url, name)
            if not storage.exists(storage.join(remote, ENTRY_JSON), self.options):
                return None
            fs, path = storage.filesystem(remote, self.options)
            (self.base / name).mkdir(parents=True, exist_ok=True)
            for file in (ENTRY_JSON, MEMBERS_BIN):
                try:
                    fs.get_file(f"{path}/{file}", str(self.base / name / file))
                except FileNotFoundError:
                    return None
        return load_entry(self.base / name, group, key, rows)

    def writer(self, group: str, key: str, rows: int) -> EntryWriter:
        return EntryWriter(self.base / entry_name(group, key), group, key, rows)

    def publish(self, writer: EntryWriter) -> Entry:
        """A finished writer's entry, uploaded first for object storage, opened for assembly."""
        folder = self.base / entry_name(writer.group, writer.key)
        if not self.local:
            remote = storage.join(self.url, folder.name)
            for file in (MEMBERS_BIN, ENTRY_JSON):
                storage.upload(folder / file, storage.join(remote, file), self.options)
        entry = load_entry(folder, writer.group, writer.key, len(writer.outcomes), check=False)
        if entry is None:   # only a disk that lost what it just wrote gets here
            raise OSError(f"member entry {folder} vanished or was cut short right after it was written")
        entry.built = True
        return entry

    def close(self) -> None:
        if self._staging is not None:
            self._staging.cleanup()
            self._staging = None


def encode_groups(job: Job, records: list[Record], encoded: list[bool], keys: dict[str, str],
                  store: MemberStore, tokenizer, found: dict[str, Entry]) -> dict[str, Entry]:
    """Compute the entries ``keys`` names (those the store lacks), one pass per modality over the rows that
    need it (``encoded``: the rows not rejected before encoding); returns them open for assembly. Audio
    starts from the cached waveform when ``found`` has it, without reading or decoding a file. Each group's
    outcome is kept on its own: a clip too short for one n_fft still has its waveform."""
    from mmdata.prep.audio import decode_clip, mel_members, waveform_members
    from mmdata.prep.image import encode_image
    from mmdata.prep.text import encode_text
    built: dict[str, Entry] = {}
    for modality in ("text", "image", "audio"):
        wanted = [g for g in keys if GROUP_MODALITY[g] == modality]
        if not wanted:
            continue
        config = getattr(job.config, modality)
        cached_wave = found.get("waveform") if modality == "audio" else None
        writers: dict[str, EntryWriter] = {}
        try:
            for group in wanted:
                writers[group] = store.writer(group, keys[group], len(records))
            needed = [(i, r) for i, r in enumerate(records) if encoded[i] and getattr(r, modality) is not None]
            rows = ((i, None) for i, _ in needed) if cached_wave else read_ahead(needed, modality, job)
            for i, data in rows:
                try:
                    if isinstance(data, SampleError):
                        raise data
                    if modality == "text":
                        writers["text"].add(i, *encode_text(data, config, tokenizer))
                    elif modality == "image":
                        writers["image"].add(i, *encode_image(data, config))
                    else:
                        pcm, info = cached_waveform(cached_wave, i) if cached_wave else decode_clip(data, config)
                        if "waveform" in writers:
                            writers["waveform"].add(i, {PCM: pcm.tobytes()}, info)
                        if "flac" in writers:
                            writers["flac"].add(i, waveform_members(pcm, config), {})
                        if "audio" in writers:
                            try:
                                writers["audio"].add(i, *mel_members(pcm, info, config))
                            except SampleError as e:
                                writers["audio"].fail(i, e)
                except SampleError as e:
                    for writer in writers.values():
                        writer.fail(i, e)
            # the waveform first: a run that finds the features finds what they were made from (the lineage
            # of two runs at once then matches one run's)
            for group, writer in sorted(writers.items(), key=lambda item: item[0] != "waveform"):
                writer.finish(built_by(job))
        except BaseException:   # an error, a full disk, Ctrl-C: leave no temp file behind
            for writer in writers.values():
                writer.abort()
            raise
        for group, writer in writers.items():
            built[group] = store.publish(writer)
    return built


def cached_waveform(entry: Entry, i: int):
    """Row ``i``'s 16-bit waveform and its info from a waveform entry, or the SampleError decoding it gave."""
    import numpy as np
    outcome = entry.outcome(i)
    if outcome is None:
        raise RuntimeError(f"the waveform entry {entry.key} has no outcome for row {i}; remove it from the "
                           "store's members/ folder and run again")
    if isinstance(outcome, SampleError):
        raise outcome
    return np.frombuffer(outcome.members[PCM][0], dtype="<i2"), outcome.info


def info_json(info: dict) -> str:
    """A modality's info as the sample's json holds it (partition.cached_sample_json builds the json from these)."""
    return json.dumps(info, ensure_ascii=False, sort_keys=True, default=str)


def built_by(job: Job) -> dict:
    """What an entry records of the run that computed it: the dataset name and the config's fingerprint
    (dataset.json's ``config_fingerprint``), so that later datasets can say where reused members came from."""
    return {"name": job.config.output.name, "config_fingerprint": job.salt[:16]}


def read_ahead(needed: list[tuple[int, Record]], modality: str, job: Job) -> Iterator[tuple[int, Any]]:
    """(row index, its input for ``modality``: the text, a file's bytes, or the SampleError reading raised)
    for each of the ``needed`` rows, in order. Files are read by ``input.read_threads`` threads a few rows
    ahead of the one being encoded, so a URL's latency overlaps the encoding of the rows before it; at most
    2 x read_threads files are held."""

    def read(record: Record):
        try:
            return raw_input(modality, getattr(record, modality), job)
        except SampleError as e:
            return e

    threads = job.config.input.read_threads
    if modality == "text" or threads <= 1:
        for i, record in needed:
            yield i, read(record)
        return
    with ThreadPoolExecutor(threads, thread_name_prefix="mmdata-read") as pool:
        ahead: deque = deque()
        try:
            for i, record in needed:
                ahead.append((i, pool.submit(read, record)))
                if len(ahead) >= 2 * threads:
                    i, data = ahead.popleft()
                    yield i, data.result()
            while ahead:
                i, data = ahead.popleft()
                yield i, data.result()
        finally:   # an error or an interrupt: reads not started are not wanted
            for _, data in ahead:
                data.cancel()


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
