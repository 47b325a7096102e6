"""Simulation: the preprocess driver alone at LAION scale, on a synthetic Parquet manifest (id, text, image URL,
with a few planted duplicate ids): its scan (row count, duplicate ids, labels, the tokenizer sample) and its
partition pass. No media is read and no request made: neither the executor nor the reuse check runs
(fingerprinting URL rows would fetch them). text.tokenizer is left unset, as by default, so the scan also holds
its tokenizer sample (text.train_samples captions).

    python benchmarks/sim_driver.py --rows 20000000 --work /tmp/sim-driver

Prints the rows/s of each pass and the driver's memory (the manifest is written by a child process): each
phase's peak RSS (ru_maxrss, reset before the phase through /proc/self/clear_refs, which resets VmHWM and
ru_maxrss alike), RSS (VmRSS) before and after it, and the growth of the peak over the RSS before the scan,
per 100M rows if it grew in proportion to the rows (the old Python set did; the duplicate finder stops
growing past its in-memory limit of 4M rows). Asserts that exactly the planted duplicate rows are found.
A manifest already in --work for the same --rows and --dup-fraction is reused.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mmdata.config import from_dict, validate_tree
from mmdata.prep.config import PreprocessConfig
from mmdata.prep.pipeline import iter_partitions, scan_input

BATCH_ROWS = 1 << 20   # rows generated and written at once
SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string()), ("image", pa.string())])
STYLES = np.array(["a photo of", "a painting of", "a drawing of", "a close-up of", "an old postcard of"])
THINGS = np.array(["a cat", "a dog", "the sea", "a city at night", "a red car", "mountains", "a bowl of fruit"])


def planted_duplicates(start: int, end: int, dup_fraction: float) -> int:
    """Rows in [start, end) that repeat an earlier id: the totals add up to round(rows x dup_fraction)."""
    return round(end * dup_fraction) - round(start * dup_fraction)


def write_manifest(path: Path, rows: int, dup_fraction: float, seed: int = 0) -> None:
    """id ``laion-<12 digits>``, a short caption, an http image URL; planted duplicate rows take the id of a
    random earlier row. Written batch by batch (vectorised) to a temporary name, renamed when complete."""
    rng = np.random.default_rng(seed)
    repeated: dict[int, int] = {}   # planted row -> the id number it repeats (few: dup_fraction of the rows)
    partial = path.with_suffix(".partial")
    with pq.ParquetWriter(partial, SCHEMA) as writer:
        for start in range(0, rows, BATCH_ROWS):
            end = min(rows, start + BATCH_ROWS)
            numbers = np.arange(start, end, dtype=np.int64)
            count = planted_duplicates(start, end, dup_fraction)
            for row in np.sort(rng.choice(np.arange(max(start, 1), end), count, replace=False)).tolist():
                earlier = int(rng.integers(0, row))
                repeated[row] = numbers[row - start] = repeated.get(earlier, earlier)   # an id first seen earlier
            digits = pc.utf8_lpad(pc.cast(pa.array(numbers), pa.string()), 12, "0")
            row_numbers = pc.cast(pa.array(np.arange(start, end)), pa.string())
            caption = pc.binary_join_element_wise(pa.array(STYLES[rng.integers(0, len(STYLES), end - start)]),
                                                  pa.array(THINGS[rng.integers(0, len(THINGS), end - start)]),
                                                  row_numbers, " ")
            writer.write_table(pa.table({
                "id": pc.binary_join_element_wise("laion-", digits, ""),
                "text": caption,
                "image": pc.binary_join_element_wise("http://img.example/", row_numbers, ".jpg", ""),
            }, schema=SCHEMA))
    os.replace(partial, path)


def rss_mb() -> float:
    """This process's resident memory now (VmRSS in /proc/self/status)."""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # kB on Linux


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")   # Linux: the peak starts again from the current RSS


def measure(name: str, run) -> tuple[object, float, float, float]:
    """Run one phase: (its result, seconds, its peak RSS in MB, RSS before it in MB), with a line printed."""
    reset_peak()
    before = rss_mb()
    start = time.perf_counter()
    result = run()
    seconds = time.perf_counter() - start
    peak = peak_rss_mb()
    print(f"{name:<10} {seconds:8.1f} s   RSS {before:7.0f} -> {rss_mb():7.0f} MB   peak {peak:7.0f} MB")
    return result, seconds, peak, before


def partition_pass(config: PreprocessConfig, scan) -> tuple[int, int]:
    """Every partition as the reuse check would receive it: (rows, duplicate rows) counted."""
    rows = duplicates = 0
    for _, records, repeats in iter_partitions(config, scan):
        rows, duplicates = rows + len(records), duplicates + len(repeats)
    return rows, duplicates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=20_000_000)
    parser.add_argument("--dup-fraction", type=float, default=0.001, help="rows that repeat an earlier id")
    parser.add_argument("--work", default="/tmp/sim-driver", help="scratch folder: the manifest, an output root")
    parser.add_argument("--samples-per-shard", type=int, default=10_000)
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    manifest = work / f"manifest-{args.rows}-{args.dup_fraction}.parquet"
    planted = planted_duplicates(0, args.rows, args.dup_fraction)

    print(f"{args.rows:,} rows, {planted:,} planted duplicates, {manifest}")
    if not manifest.exists():   # in a child process: the driver's memory figures are the driver's own
        start = time.perf_counter()
        writer = multiprocessing.get_context("spawn").Process(
            target=write_manifest, args=(manifest, args.rows, args.dup_fraction))
        writer.start()
        writer.join()
        assert writer.exitcode == 0, f"writing the manifest failed ({writer.exitcode})"
        print(f"{'manifest':<10} {time.perf_counter() - start:8.1f} s   (written by a child process)")
    else:
        print(f"{'manifest':<10} reused")
    config = from_dict(PreprocessConfig, {"input": {"manifest": str(manifest)}, "progress": False,
                                          "output": {"root": str(work / "out"),
                                                     "samples_per_shard": args.samples_per_shard}})
    validate_tree(config)
    scan, scan_s, scan_peak, baseline = measure("scan", lambda: scan_input(config))
    (rows, duplicates), pass_s, pass_peak, _ = measure("partitions", lambda: partition_pass(config, scan))

    assert scan.rows == rows == args.rows, (scan.rows, rows, args.rows)
    assert len(scan.duplicates) == duplicates == planted, (len(scan.duplicates), duplicates, planted)
    growth = max(scan_peak, pass_peak) - baseline
    print(f"rows {rows:,}   duplicate rows {duplicates:,} (as planted)   tokenizer sample {len(scan.texts):,}")
    print(f"scan {rows / scan_s:,.0f} rows/s   partition pass {rows / pass_s:,.0f} rows/s")
    print(f"peak RSS: scan {scan_peak:,.0f} MB, partitions {pass_peak:,.0f} MB; {growth:,.0f} MB over the "
          f"{baseline:,.0f} MB before the scan = {growth / rows * 1e8 / 1024:,.2f} GB per 100M rows if proportional")


if __name__ == "__main__":
    main()
