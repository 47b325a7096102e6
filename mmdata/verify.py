"""``mmdata info`` and ``mmdata verify``: a dataset directory summarised, and re-read against its index."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter

import numpy as np
import pyarrow.parquet as pq

from mmdata import storage
from mmdata.dataset import DatasetDescription, ShardInfo, load_description
from mmdata.schema import ERRORS_JSONL, JSON


def describe(dataset: str) -> str:
    """Human summary for ``mmdata info``."""
    d = load_description(dataset)
    t = d.totals
    lines = [
        f"dataset      {dataset}",
        f"fingerprint  {d.fingerprint}  (format v{d.format_version})",
        f"source       {d.source.get('manifest') or ', '.join(d.source.get('tars') or [])}",
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
    return "\n".join(lines)


def verify(dataset: str) -> tuple[list[str], int]:
    """Re-read every shard and check it against the index and dataset.json.

    Returns (problems, samples checked); no problems means healthy.
    """
    d = load_description(dataset)
    problems, checked = [], 0
    for shard in d.shards:
        try:
            shard_problems, n = verify_shard(d, shard)
        except Exception as e:  # an unreadable shard is a finding, not a crash
            shard_problems, n = [f"{shard.name}: cannot read: {e}"], 0
        problems += shard_problems
        checked += n
    if checked != d.totals.written:
        problems.append(f"dataset.json says {d.totals.written} samples were written; shards hold {checked}")
    problems += verify_errors(d)
    return problems, checked


def verify_shard(d: DatasetDescription, shard: ShardInfo) -> tuple[list[str], int]:
    name = shard.name
    data = storage.read_bytes(d.shard_url(shard), {})
    problems = []
    if len(data) != shard.bytes:
        problems.append(f"{name}: {len(data)} bytes, dataset.json says {shard.bytes}")
    members = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for info in tar:
            members[info.name] = (info.offset_data, info.size)
    rows = pq.read_table(io.BytesIO(storage.read_bytes(d.index_url(shard), {}))).to_pylist()
    if len(rows) != shard.samples:
        problems.append(f"{name}: index has {len(rows)} samples, dataset.json says {shard.samples}")
    indexed = 0
    for row in rows:
        for m in row["members"]:
            member = f"{row['key']}.{m['ext']}"
            indexed += 1
            if members.get(member) != (m["offset"], m["size"]):
                problems.append(f"{name}: {member} is at {members.get(member)} in the tar, index says "
                                f"{(m['offset'], m['size'])}")
                continue
            problems += check_member(name, member, m["ext"], data[m["offset"]: m["offset"] + m["size"]], row)
    if indexed != len(members):
        problems.append(f"{name}: tar has {len(members)} members, index lists {indexed}")
    return problems, len(rows)


def check_member(shard: str, member: str, ext: str, payload: bytes, row: dict) -> list[str]:
    try:
        if ext.endswith(".npy"):
            np.load(io.BytesIO(payload), allow_pickle=False)
        elif ext == JSON:
            doc = json.loads(payload)
            if doc.get("id") != row["id"]:
                return [f"{shard}: {member} has id {doc.get('id')!r}, index says {row['id']!r}"]
    except Exception as e:
        return [f"{shard}: {member} does not load: {e}"]
    return []


def verify_errors(d: DatasetDescription) -> list[str]:
    lines = storage.read_bytes(storage.join(d.url, ERRORS_JSONL), {}).decode().splitlines()
    reasons = Counter(json.loads(line)["reason"] for line in lines)
    if dict(reasons) != d.totals.errors_by_reason:
        return [f"{ERRORS_JSONL} has {dict(reasons)}, dataset.json says {d.totals.errors_by_reason}"]
    return []
