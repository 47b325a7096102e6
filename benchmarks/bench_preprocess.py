"""Benchmark: preprocess throughput vs the kernel ceiling, and peak RSS vs dataset size.

    make bench-preprocess                    # 3000 samples, RSS at 2k and 20k
    python benchmarks/bench_preprocess.py --n 3000 --rss 2000 20000

Kernel ceiling = the same per-sample code (read, tokenize, image decode/resize/encode,
audio decode/resample/log-mel) in a plain single-process loop, times the cores used.
Both are measured in this run, so the ratio survives a noisy machine. So is the cost of the
index's member checksums: zlib.crc32 over every member the kernel produced, per sample, as a
share of the kernel's time per sample.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import yaml


def bench_config(manifest: Path, root: Path, tokenizer: str | None, cpus: int) -> dict:
    from mmdata.config import load_config, to_dict
    from mmdata.prep.config import PreprocessConfig
    overrides = [f"input.manifest={manifest}", f"output.root={root}", "output.name=bench",
                 f"ray.num_cpus={cpus}", "progress=false"]
    if tokenizer:
        overrides.append(f"text.tokenizer={tokenizer}")
    return to_dict(load_config(PreprocessConfig, Path(__file__).parents[1] / "pipelines/demo.yaml", overrides))


def kernel_rates(config_dict: dict, manifest: Path, limit: int) -> tuple[dict, list[bytes]]:
    """Samples/s of each modality's code and of all together, single process; and the members it made."""
    import torch
    from mmdata.config import from_dict
    from mmdata.prep.config import PreprocessConfig
    from mmdata.prep.partition import Job, build_sample, modality_encoders, raw_input
    from mmdata.prep.sources import iter_records
    from mmdata.prep.text import load_tokenizer
    from mmdata.storage import read_bytes
    torch.set_num_threads(1)
    config = from_dict(PreprocessConfig, config_dict)
    model = read_bytes(config.text.tokenizer, {})
    tokenizer = load_tokenizer(model)
    records = [r for _, r in zip(range(limit), iter_records(config.input))]
    job = Job(config, model, None, "", "")
    encoders = modality_encoders(tokenizer)
    encode = lambda modality, raw: encoders[modality](raw_input(modality, raw, job), getattr(config, modality))  # noqa: E731
    for record in records[:20]:  # warm caches (resample kernels, mel filterbanks) as a long job would
        for modality in encoders:
            if getattr(record, modality) is not None:
                encode(modality, getattr(record, modality))
    rates = {}
    for modality in encoders:
        items = [getattr(r, modality) for r in records if getattr(r, modality) is not None]
        start = time.perf_counter()
        for raw in items:
            encode(modality, raw)
        rates[modality] = len(items) / (time.perf_counter() - start)
    labels = {name: i for i, name in enumerate(sorted({str(r.label) for r in records}))}
    job = Job(config, model, labels, "", "")
    built = []
    start = time.perf_counter()
    for record in records:
        built.append(build_sample(record, job, encoders, False)[0])
    rates["all"] = len(records) / (time.perf_counter() - start)
    return rates, [data for sample in built if sample for data in sample[0].values()]


def checksum_seconds(members: list[bytes], repeats: int = 7) -> float:
    """Seconds to crc32 every member once, as ShardWriter does (median of ``repeats``)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for data in members:
            zlib.crc32(data)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_preprocess(config_path: Path) -> tuple[dict, float, dict]:
    """Run the CLI in a subprocess; returns (its summary numbers, seconds, peak RSS in MB)."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "mmdata.cli", "preprocess", str(config_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = {"driver": 0.0, "worker": 0.0, "total": 0.0}
    while proc.poll() is None:
        tree = process_tree_rss(proc.pid)
        if tree:
            peak["driver"] = max(peak["driver"], tree.get(proc.pid, 0.0))
            workers = [v for pid, v in tree.items() if pid != proc.pid]
            peak["worker"] = max(peak["worker"], max(workers, default=0.0))
            peak["total"] = max(peak["total"], sum(tree.values()))
        time.sleep(0.2)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"preprocess failed:\n{err[-3000:]}")
    return parse_summary(out), time.perf_counter() - start, peak


def process_tree_rss(root: int) -> dict[int, float]:
    """RSS (MB) of a process and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    rss = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
            children.setdefault(int(stat[1]), []).append(int(entry))
            rss[int(entry)] = int(stat[21]) * os.sysconf("SC_PAGE_SIZE") / 1e6
        except (OSError, IndexError, ValueError):
            continue
    found, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in rss:
            found[pid] = rss[pid]
        todo += children.get(pid, [])
    return found


def parse_summary(out: str) -> dict:
    lines = {line[:10].strip(): line[11:] for line in out.splitlines() if len(line) > 11}
    phases = dict(part.rsplit(" ", 2)[:2] for part in lines.get("phases", "").split(", ") if part)
    return {"time": lines.get("time", ""), "status": lines.get("status", ""), "samples": lines.get("samples", ""),
            "phases": {k: float(v) for k, v in phases.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=3000, help="samples for the throughput run")
    parser.add_argument("--rss", type=int, nargs="*", default=[2000, 20000], help="sizes for the RSS runs")
    parser.add_argument("--cpus", type=int, default=os.cpu_count())
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    args = parser.parse_args()
    from mmdata.demo import generate_demo
    work = Path(args.work or tempfile.mkdtemp(prefix="mm-bench-"))
    print(f"scratch {work}; {args.cpus} cores")

    data = work / f"demo-{args.n}"
    if not (data / "manifest.jsonl").exists():
        generate_demo(data, args.n, seed=0)
    # a given tokenizer keeps one-off tokenizer training out of the throughput comparison
    tok_root = work / "tok"
    tok_cfg = bench_config(data / "manifest.jsonl", tok_root, None, args.cpus)
    from mmdata.config import from_dict
    from mmdata.prep.config import PreprocessConfig
    from mmdata.prep.pipeline import get_tokenizer, scan_input
    cfg = from_dict(PreprocessConfig, tok_cfg)
    tok_root.mkdir(parents=True, exist_ok=True)
    (tok_root / "tokenizer.model").write_bytes(get_tokenizer(cfg, scan_input(cfg)))
    tokenizer = str(tok_root / "tokenizer.model")

    config = bench_config(data / "manifest.jsonl", work / "out", tokenizer, args.cpus)
    kernel, members = kernel_rates(config, data / "manifest.jsonl", args.n)   # the rows the pipeline processes
    crc = checksum_seconds(members)
    ceiling = kernel["all"] * args.cpus
    path = work / "bench.yaml"
    path.write_text(yaml.safe_dump(config))
    shutil.rmtree(work / "out", ignore_errors=True)
    summary, seconds, _ = run_preprocess(path)
    end_to_end = args.n / seconds
    steady = args.n / summary["phases"]["partitions"]
    print(f"kernel (1 process): text {kernel['text']:.0f}/s, image {kernel['image']:.0f}/s, "
          f"audio {kernel['audio']:.0f}/s, all modalities {kernel['all']:.1f} samples/s")
    print(f"kernel ceiling x{args.cpus} cores: {ceiling:.1f} samples/s")
    per_sample = 1 / kernel["all"]
    print(f"checksums (zlib.crc32 of every member, {sum(map(len, members)) / args.n / 1e3:.1f} kB/sample): "
          f"{crc / args.n * 1e6:.1f} us/sample = {crc / args.n / per_sample:.2%} of the kernel's "
          f"{per_sample * 1e3:.2f} ms/sample ({sum(map(len, members)) / crc / 1e9:.2f} GB/s)")
    print(f"pipeline end to end (incl. process start, Ray start, scan): {end_to_end:.1f} samples/s "
          f"= {end_to_end / ceiling:.2f} of ceiling")
    print(f"pipeline partition phase (Ray tasks, wall clock): {steady:.1f} samples/s = {steady / ceiling:.2f} of ceiling")
    print("phases: " + ", ".join(f"{k} {v:.1f} s" for k, v in summary["phases"].items()))
    summary2, seconds2, _ = run_preprocess(path)
    print(f"rerun (everything reused): {seconds2:.1f} s; {summary2['status']}")

    peaks = {}
    for n in args.rss:
        data_n = work / f"demo-{n}"
        if not (data_n / "manifest.jsonl").exists():
            generate_demo(data_n, n, seed=0)
        cfg_n = bench_config(data_n / "manifest.jsonl", work / f"out-{n}", tokenizer, args.cpus)
        p = work / f"bench-{n}.yaml"
        p.write_text(yaml.safe_dump(cfg_n))
        shutil.rmtree(work / f"out-{n}", ignore_errors=True)
        _, secs, peak = run_preprocess(p)
        peaks[n] = peak
        print(f"{n} samples: {secs:.1f} s ({n / secs:.1f} samples/s), peak RSS driver {peak['driver']:.0f} MB, "
              f"largest worker {peak['worker']:.0f} MB, whole tree {peak['total']:.0f} MB")
    if len(peaks) >= 2:
        small, large = peaks[min(peaks)], peaks[max(peaks)]
        for key in ("driver", "worker"):
            print(f"peak RSS {key} {max(peaks)}/{min(peaks)} samples: {large[key] / small[key]:.3f}")


if __name__ == "__main__":
    main()
