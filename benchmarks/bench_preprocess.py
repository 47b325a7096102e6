"""Benchmark: preprocess throughput vs the kernel ceiling, and peak RSS vs dataset size.

    make bench-preprocess                    # 3000 samples, RSS at 2k and 20k
    python benchmarks/bench_preprocess.py --n 3000 --rss 2000 20000
    python benchmarks/bench_preprocess.py --image-only    # only the image kernel on large photos (~30 s)

Kernel ceiling = the same per-sample code (read, tokenize, image decode/resize/encode,
audio decode/resample/log-mel) in a plain single-process loop, times the cores used.
Both are measured in this run, so the ratio survives a noisy machine. So is the cost of the
index's member checksums: zlib.crc32 over every member the kernel produced, per sample, as a
share of the kernel's time per sample.

The image kernel is also measured on its own, on large photo-like inputs (1024x768, 256 px out):
encode_image with image.fast_downscale on (JPEG: reduced-size decoding; WebP, PNG: a box reduce
first) and off, interleaved image by image; it prints the ratio of their rates (CPU time of the
process) and the PSNR between their outputs.
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
from typing import Iterator

import yaml


def bench_config(manifest: Path, root: Path, tokenizer: str | None, cpus: int) -> dict:
    from mmdata.config import load_config, to_dict
    from mmdata.prep.config import PreprocessConfig
    overrides = [f"input.manifest={manifest}", f"output.root={root}", "output.name=bench",
                 f"ray.num_cpus={cpus}", "ray.executor=ray", "progress=false"]   # the rows measure Ray tasks
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


# --- image kernel: fast_downscale on vs off on large photos ----------------------------------

def photo_images(n: int, width: int = 1024, height: int = 768, seed: int = 0) -> Iterator:
    """``n`` deterministic photo-like RGB images: smooth colour gradients and filled shapes under
    sensor-like noise (fine detail everywhere, as in photos: where reduced decoding differs most)."""
    import numpy as np
    from PIL import Image, ImageDraw
    rng = np.random.default_rng(seed)
    noise = rng.normal(0, 6, (height + 64, width + 64, 3)).astype(np.float32)   # one field, shifted per image
    x, y = np.linspace(0, 3, width, dtype=np.float32), np.linspace(0, 3, height, dtype=np.float32)
    for _ in range(n):
        a, b, p = rng.uniform(-3, 3, (3, 3)).astype(np.float32)   # per channel: x and y frequencies, phases
        gradient = np.empty((height, width, 3), np.uint8)
        for c in range(3):
            gradient[..., c] = 128 + 50 * np.sin(a[c] * x + p[c])[None, :] + 50 * np.sin(b[c] * y + 2 * p[c])[:, None]
        image = Image.fromarray(gradient)
        draw = ImageDraw.Draw(image)
        for _ in range(10):
            cx, cy, r = int(rng.integers(0, width)), int(rng.integers(0, height)), int(rng.integers(8, 200))
            colour = tuple(int(v) for v in rng.integers(0, 256, 3))
            if rng.random() < 0.5:
                draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
            else:
                draw.polygon([(cx, cy), (cx + r, cy + r // 2), (cx - r // 3, cy + r)], fill=colour)
        dx, dy = rng.integers(0, 64, 2)
        pixels = noise[dy:dy + height, dx:dx + width] + np.asarray(image, np.float32)
        yield Image.fromarray(np.clip(pixels, 0, 255, out=pixels).astype(np.uint8))


def psnr(a: bytes, b: bytes) -> float:
    """PSNR in dB between two encoded images of the same size."""
    import io
    import numpy as np
    from PIL import Image
    x, y = (np.asarray(Image.open(io.BytesIO(d)).convert("RGB"), dtype=np.float64) for d in (a, b))
    mse = float(((x - y) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255 ** 2 / mse)


def image_kernel(n: int, size: int = 256, rounds: int = 3) -> None:
    """encode_image with image.fast_downscale on and off over the same inputs, interleaved: the ratio of
    their rates (median over rounds) and the PSNR between the two outputs of each input. JPEG (q90,
    ``n`` images) is the case the switch is for; WebP and PNG (n // 20 each) use Image.reduce."""
    import io
    from mmdata.prep.image import ImageConfig, encode_image
    # fast encoder settings for WebP and PNG: they only keep the setup short
    formats = {"JPEG": ({"quality": 90}, n), "WEBP": ({"quality": 90, "method": 0}, n // 20),
               "PNG": ({"compress_level": 1}, n // 20)}
    inputs: dict[str, list[bytes]] = {fmt: [] for fmt in formats}
    for i, image in enumerate(photo_images(n)):
        w, h = image.size
        for fmt, (params, count) in formats.items():
            if i < count:
                buf = io.BytesIO()
                image.save(buf, fmt, **params)
                inputs[fmt].append(buf.getvalue())
    for fmt, data in inputs.items():
        if not data:
            continue
        configs = {on: ImageConfig(size=size, resize="shorter_side_crop", fast_downscale=on) for on in (False, True)}
        seconds = {False: [], True: []}
        outputs = {False: [], True: []}
        for r in range(rounds):
            # on and off alternate image by image, so both meet the same machine; CPU time of this
            # (single-threaded) process, so other processes sharing the cores do not count
            spent = {False: 0.0, True: 0.0}
            for i, d in enumerate(data):
                for on in ((False, True) if (i + r) % 2 == 0 else (True, False)):
                    start = time.process_time()
                    out = encode_image(d, configs[on])[0]["jpg"]
                    spent[on] += time.process_time() - start
                    if r == 0:
                        outputs[on].append(out)
            for on in spent:
                seconds[on].append(spent[on])
        ratio = statistics.median(off / on for off, on in zip(seconds[False], seconds[True]))
        rate = {on: len(data) / statistics.median(seconds[on]) for on in seconds}
        scores = [psnr(a, b) for a, b in zip(outputs[False], outputs[True])]
        print(f"image kernel, {len(data)} {w}x{h} {fmt} -> {size} px shorter_side_crop jpg: fast_downscale "
              f"on {rate[True]:.0f}/s, off {rate[False]:.0f}/s, ratio {ratio:.2f} (median of {rounds} rounds); "
              f"PSNR on vs off mean {statistics.mean(scores):.1f} dB, min {min(scores):.1f} dB")


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
    parser.add_argument("--image-n", type=int, default=200, help="large JPEGs for the image kernel (0: skip it)")
    parser.add_argument("--image-only", action="store_true", help="run only the image kernel comparison")
    args = parser.parse_args()
    if args.image_n > 0:
        image_kernel(args.image_n)
    if args.image_only:
        return
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
