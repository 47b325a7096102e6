"""Benchmark: preprocess throughput vs the kernel ceiling, and peak RSS vs dataset size.

    make bench-preprocess                    # 3000 samples, RSS at 2k and 20k
    python benchmarks/bench_preprocess.py --n 3000 --rss 2000 20000
    python benchmarks/bench_preprocess.py --image-only    # only the image kernel on large photos (~30 s)
    python benchmarks/bench_preprocess.py --kernels-only  # the image and audio kernels against their previous versions

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
import functools
import os
import shutil
import statistics
import tempfile
import time
import zlib
from pathlib import Path

import yaml
import vs_img2dataset
from preprocess_common import photo_images, run_preprocess


def bench_config(manifest: Path, root: Path, tokenizer: str | None, cpus: int, executor: str = "processes") -> dict:
    from mmdata.config import load_config, to_dict
    from mmdata.prep.config import PreprocessConfig
    overrides = [f"input.manifest={manifest}", f"output.root={root}", "output.name=bench",
                 f"ray.num_cpus={cpus}", f"ray.executor={executor}", "progress=false"]
    if tokenizer:
        overrides.append(f"text.tokenizer={tokenizer}")
    return to_dict(load_config(PreprocessConfig, Path(__file__).parents[1] / "pipelines/demo.yaml", overrides))


def kernel_rates(config_dict: dict, manifest: Path, limit: int) -> tuple[dict, list[bytes]]:
    """Samples/s of each modality's code and of all together, single process; and the members it made."""
    import torch
    from mmdata.config import from_dict
    from mmdata.prep.audio import encode_audio
    from mmdata.prep.config import PreprocessConfig
    from mmdata.prep.image import encode_image
    from mmdata.prep.members import raw_input
    from mmdata.prep.partition import Job
    from mmdata.prep.sources import iter_records
    from mmdata.prep.text import encode_text, load_tokenizer
    from mmdata.storage import read_bytes
    torch.set_num_threads(1)
    config = from_dict(PreprocessConfig, config_dict)
    model = read_bytes(config.text.tokenizer, {})
    tokenizer = load_tokenizer(model)
    records = [r for _, r in zip(range(limit), iter_records(config.input))]
    job = Job(config, model, None, "", "")
    encoders = {"text": functools.partial(encode_text, tokenizer=tokenizer), "image": encode_image,
                "audio": encode_audio}
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
    members = []
    start = time.perf_counter()
    for record in records:   # every modality of a sample, one sample after another
        for modality in encoders:
            if getattr(record, modality) is not None:
                members.extend(encode(modality, getattr(record, modality))[0].values())
    rates["all"] = len(records) / (time.perf_counter() - start)
    return rates, members


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


# --- audio kernel: this version against the previous one, and where its time goes ------------

def previous_audio_kernel(data: bytes, config) -> bytes:
    """encode_audio as processing version 5 computed it (the baseline): numpy's mean over channels, and
    torchaudio's MelSpectrogram with power=2 (|X| then squared)."""
    import io
    import numpy as np
    import soundfile as sf
    import torch
    from mmdata.prep import audio
    with sf.SoundFile(io.BytesIO(data)) as f:
        rate = f.samplerate
        frames = f.read(audio._frames_needed(rate, config), dtype="float32", always_2d=True)
    np.isfinite(frames).all()
    wave = audio._fit_length(audio._resample(frames.mean(axis=1, dtype=np.float32), rate, config.sample_rate), config)
    transform = previous_mel_transform(config.sample_rate, config.n_fft, config.hop_length, config.f_min,
                                       config.f_max, config.n_mels)
    with torch.no_grad():
        mel = torch.log(transform(wave) + config.log_offset).to(torch.float16).numpy()
    return audio._npy_bytes(np.ascontiguousarray(mel))


@functools.lru_cache(maxsize=4)
def previous_mel_transform(sample_rate, n_fft, hop_length, f_min, f_max, n_mels):
    import torchaudio
    return torchaudio.transforms.MelSpectrogram(sample_rate=sample_rate, n_fft=n_fft, hop_length=hop_length,
                                                f_min=f_min, f_max=f_max, n_mels=n_mels, power=2.0, center=True)


def audio_kernel(files: list[Path], config, rounds: int = 3) -> None:
    """encode_audio against the previous version's kernel on the same clips, interleaved clip by clip (CPU
    time, one thread); then where encode_audio's time goes, step by step (:func:`audio_stages`)."""
    import torch
    from mmdata.prep.audio import encode_audio
    torch.set_num_threads(1)
    clips = [f.read_bytes() for f in files]
    for data in clips:   # build every resampler and filterbank once, as a long job has
        encode_audio(data, config), previous_audio_kernel(data, config)
    seconds = {"now": [], "previous": []}
    kernels = {"now": lambda d: encode_audio(d, config), "previous": lambda d: previous_audio_kernel(d, config)}
    for r in range(rounds):
        spent = {"now": 0.0, "previous": 0.0}
        for i, data in enumerate(clips):
            for name in (("now", "previous") if (i + r) % 2 == 0 else ("previous", "now")):
                start = time.process_time()
                kernels[name](data)
                spent[name] += time.process_time() - start
        for name in spent:
            seconds[name].append(spent[name])
    ratio = statistics.median(p / n for p, n in zip(seconds["previous"], seconds["now"]))
    rate = {name: len(clips) / statistics.median(s) for name, s in seconds.items()}
    print(f"audio kernel, {len(clips)} demo clips: {rate['now']:.0f}/s, previous version {rate['previous']:.0f}/s, "
          f"ratio {ratio:.2f} (median of {rounds} rounds)")
    stages = audio_stages(clips, config)
    total = sum(stages.values())
    library = total - stages["our code"]
    print("audio kernel, where the time goes: " + ", ".join(f"{k} {v / total:.0%}" for k, v in stages.items())
          + f"; inside the libraries' calls {library / total:.0%}")


def audio_stages(clips: list[bytes], config) -> dict[str, float]:
    """CPU seconds of encode_audio's steps over ``clips``, each step one library call timed on its own (as
    encode_audio makes them); "our code" is encode_audio's total less the steps."""
    import io
    import numpy as np
    import soundfile as sf
    import torch
    from mmdata.prep import audio
    from mmdata.prep.audio import encode_audio
    spectrogram, mel_scale = audio._mel_transform(config.sample_rate, config.n_fft, config.win_length,
                                                  config.hop_length, config.f_min, config.f_max, config.n_mels)
    steps = dict.fromkeys(("decode (soundfile)", "checks (numpy)", "down-mix (numpy)", "resample (torchaudio)",
                           "16-bit waveform (numpy)", "STFT (torch)", "power, mel, log (torch)", "npy"), 0.0)

    def timed(step, fn, *args):
        start = time.process_time()
        out = fn(*args)
        steps[step] += time.process_time() - start
        return out

    whole = 0.0
    with torch.no_grad():
        for data in clips:
            def decode(data):
                with sf.SoundFile(io.BytesIO(data)) as f:
                    return f.samplerate, f.read(audio._frames_needed(f.samplerate, config), "float32", True)

            rate, frames = timed("decode (soundfile)", decode, data)
            timed("checks (numpy)", lambda x: np.isfinite(x).all(), frames)
            mono = timed("down-mix (numpy)", audio.down_mix, frames)
            wave = audio._fit_length(timed("resample (torchaudio)", audio._resample, mono, rate, config.sample_rate),
                                     config)
            pcm, _ = timed("16-bit waveform (numpy)", audio.to_pcm16, wave.numpy())
            wave = torch.from_numpy(timed("16-bit waveform (numpy)", audio.from_pcm16, pcm))
            spectrum = timed("STFT (torch)", spectrogram, wave)
            mel = timed("power, mel, log (torch)", lambda x: torch.log(
                mel_scale(x.real.square() + x.imag.square()) + config.log_offset).to(torch.float16).numpy(), spectrum)
            timed("checks (numpy)", lambda x: np.isfinite(x).all(), mel)
            timed("npy", audio._npy_bytes, np.ascontiguousarray(mel))
            start = time.process_time()
            encode_audio(data, config)
            whole += time.process_time() - start
    return {**steps, "our code": max(0.0, whole - sum(steps.values()))}


def executor_break_even(work: Path, data: Path, tokenizer: str, cpus: int, sizes: list[int]) -> None:
    """Wall clock of whole ``mmdata preprocess`` commands on the first ``sizes`` demo rows, in-process and on a
    pool of processes, interleaved: where the pool's start-up pays (ray.auto_min_samples), and what a small
    job costs with the default config (auto, the given tokenizer)."""
    rows = (data / "manifest.jsonl").read_text().splitlines(keepends=True)
    for n in sizes:
        manifest = data / f"first-{n}.jsonl"   # beside the demo's: its relative paths hold
        manifest.write_text("".join(rows[:n]))
        (work / f"first-{n}").mkdir(exist_ok=True)
        seconds = {}
        for executor in ("serial", "processes", "auto"):
            config = bench_config(manifest, work / f"first-{n}" / executor, tokenizer, cpus, executor)
            path = work / f"first-{n}" / f"{executor}.yaml"
            path.write_text(yaml.safe_dump(config))
            shutil.rmtree(work / f"first-{n}" / executor, ignore_errors=True)
            summary, seconds[executor], _ = run_preprocess(path)
        print(f"{n} samples, wall clock: serial {seconds['serial']:.1f} s, processes {seconds['processes']:.1f} s, "
              f"auto (default) {seconds['auto']:.1f} s")


REBUILD_CHANGES = ("image.size=96", "text.vocab_size=128", "audio.n_mels=80")
REBUILD_GOALS = {"image.size=96": 0.40, "text.vocab_size=128": 0.25, "audio.n_mels=80": 0.75}


def assembly_rate(config_path: Path, scratch: Path, rounds: int = 3) -> tuple[float, float]:
    """(MB of shards, seconds, the median of ``rounds``) to assemble every partition of a job whose members
    are all cached, in this process after a warm-up round: what a partition task does when nothing is left
    to compute (open the entries, decide each sample, write tar + index, fsync)."""
    from mmdata import storage
    from mmdata.config import load_config
    from mmdata.prep.config import PreprocessConfig
    from mmdata.prep.members import MemberStore
    from mmdata.prep.partition import Job, partition_keys, write_samples
    from mmdata.prep.pipeline import STORE, get_tokenizer, iter_partitions, job_salt, label_mapping, scan_input
    from mmdata.shards import ShardWriter
    config = load_config(PreprocessConfig, config_path)
    scan = scan_input(config)
    tokenizer, labels = get_tokenizer(config, scan), label_mapping(scan)
    job = Job(config, tokenizer, labels, job_salt(config, tokenizer, labels), storage.join(config.output.root, STORE))
    partitions = [(k, records, duplicates, partition_keys(job, k, records, duplicates))
                  for k, records, duplicates in iter_partitions(config, scan)]
    times, total = [], 0
    for round_ in range(rounds + 1):
        shutil.rmtree(scratch, ignore_errors=True)
        start, total = time.perf_counter(), 0
        for k, records, duplicates, keys in partitions:
            store = MemberStore(job)
            entries = {g: store.find(g, key, len(records)) for g, key in keys.members.items()}
            assert all(entries.values()), "assembly_rate needs every member cached"
            shards, *_ = write_samples(job, ShardWriter(scratch, k), entries, records, duplicates)
            total += sum(shard["bytes"] for shard in shards)
            for entry in entries.values():
                entry.close()
        if round_:
            times.append(time.perf_counter() - start)
    shutil.rmtree(scratch, ignore_errors=True)
    return total / 1e6, statistics.median(times)


def copy_rate(dataset: Path, scratch: Path) -> float:
    """MB/s of copying a dataset's shards to new files with fsync: what a byte copy costs on this disk."""
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    shards = sorted(dataset.glob("shard-*.tar"))
    start = time.perf_counter()
    for shard in shards:
        shutil.copyfile(shard, scratch / shard.name)
        with open(scratch / shard.name, "rb+") as f:
            os.fsync(f.fileno())
    seconds = time.perf_counter() - start
    shutil.rmtree(scratch)
    return sum(p.stat().st_size for p in shards) / 1e6 / seconds


def rebuild_figures(work: Path, data: Path, cpus: int) -> None:
    """What a change of one modality's settings costs after a full build, against the full build, both in
    this run: the demo config with its tokenizer trained on the input (so text.vocab_size means a new
    tokenizer), on a pool of local processes. Then assembly alone (a new output.max_shard_bytes: every member
    cached, nothing computed) on one process, in shard MB/s; and the size of the member cache beside the
    shards it was assembled into."""
    root = work / "rebuild"
    shutil.rmtree(root, ignore_errors=True)

    def run(*overrides: str, executor: str = "processes") -> tuple[dict, float]:
        config = bench_config(data / "manifest.jsonl", root, None, cpus, executor)
        from mmdata.config import load_config, to_dict
        from mmdata.prep.config import PreprocessConfig
        path = work / "rebuild.yaml"
        path.write_text(yaml.safe_dump(config))
        full = to_dict(load_config(PreprocessConfig, path, list(overrides)))
        path.write_text(yaml.safe_dump(full))
        summary, seconds, _ = run_preprocess(path)
        return summary, seconds

    full, full_wall = run()
    base = full["phases"]["partitions"]
    print(f"rebuild after one change, {data.name} ({cpus} processes); full build: partition phase {base:.1f} s, "
          f"wall clock {full_wall:.1f} s")
    for change in REBUILD_CHANGES:
        summary, wall = run(change)
        ratio = summary["phases"]["partitions"] / base
        print(f"  {change:<20} partition phase {summary['phases']['partitions']:.1f} s = {ratio:.2f} of the full "
              f"build (goal <= {REBUILD_GOALS[change]:.2f}); wall clock {wall:.1f} s = {wall / full_wall:.2f} "
              f"(tokenizer {summary['phases']['tokenizer']:.1f} s); {summary['members']}")
    summary, _ = run("output.max_shard_bytes=1000000000", executor="serial")
    print(f"  nothing to compute (output.max_shard_bytes: a new split), in-process: partition phase "
          f"{summary['phases']['partitions']:.2f} s; {summary['members']}")
    megabytes, seconds = assembly_rate(work / "rebuild.yaml", work / "assembled")
    copy = copy_rate(Path(summary["dataset"]), work / "copy")
    print(f"  assembly alone, one core (every member cached; shard, index, fsync): {megabytes:.0f} MB of shards in "
          f"{seconds:.2f} s = {megabytes / seconds:.0f} MB/s (goal >= 300); a plain copy of the same shards "
          f"(shutil.copyfile + fsync): {copy:.0f} MB/s; assembly = {megabytes / seconds / copy:.2f} of it")
    store = root / ".store"
    members = sum(p.stat().st_size for p in (store / "members").rglob("*") if p.is_file())
    inodes = {}
    for path in root.rglob("*"):
        if path.is_file() and ".store/members" not in str(path):
            st = path.stat()
            inodes[st.st_ino] = st.st_size
    datasets = len([p for p in root.glob("bench-*/dataset.json")])
    print(f"  store: member cache {members / 1e6:.0f} MB for {datasets} datasets whose shards, index and store "
          f"entries take {sum(inodes.values()) / 1e6:.0f} MB (hard-linked); the cache adds "
          f"{members / sum(inodes.values()):.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=3000, help="samples for the throughput run")
    parser.add_argument("--rss", type=int, nargs="*", default=[2000, 20000], help="sizes for the RSS runs")
    parser.add_argument("--cpus", type=int, default=os.cpu_count())
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--image-n", type=int, default=200, help="large JPEGs for the image kernel (0: skip it)")
    parser.add_argument("--image-only", action="store_true", help="run only the image kernel comparison")
    parser.add_argument("--audio-n", type=int, default=400, help="demo clips for the audio kernel (0: skip it)")
    parser.add_argument("--kernels-only", action="store_true", help="run only the image and audio kernel comparisons")
    parser.add_argument("--sizes", type=int, nargs="*", default=[20, 250, 1000, 2000],
                        help="job sizes timed in-process, on processes and with auto (0 sizes: skip)")
    parser.add_argument("--photos", type=int, default=3000, help="photos for the img2dataset comparison (0: skip it)")
    parser.add_argument("--rebuild-n", type=int, default=2000, help="demo samples for the rebuild figures (0: skip)")
    parser.add_argument("--rebuild-only", action="store_true", help="run only the rebuild figures")
    args = parser.parse_args()
    if args.rebuild_only:
        args.image_n = 0
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
    if args.audio_n > 0 and not args.rebuild_only:
        from mmdata.config import load_config
        from mmdata.prep.config import PreprocessConfig
        demo = load_config(PreprocessConfig, Path(__file__).parents[1] / "pipelines/demo.yaml")
        audio_kernel(sorted((data / "audio").iterdir())[:args.audio_n], demo.audio)
    if args.kernels_only:
        return
    if args.rebuild_n > 0:
        data_r = work / f"demo-{args.rebuild_n}"
        if not (data_r / "manifest.jsonl").exists():
            generate_demo(data_r, args.rebuild_n, seed=0)
        rebuild_figures(work, data_r, args.cpus)
    if args.rebuild_only:
        return
    if args.photos > 0:
        vs_img2dataset.compare(work, args.photos, per_shard=500, rounds=2)
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
    print(f"kernel (1 process): text {kernel['text']:.0f}/s, image {kernel['image']:.0f}/s, "
          f"audio {kernel['audio']:.0f}/s, all modalities {kernel['all']:.1f} samples/s")
    print(f"kernel ceiling x{args.cpus} cores: {ceiling:.1f} samples/s")
    per_sample = 1 / kernel["all"]
    print(f"checksums (zlib.crc32 of every member, {sum(map(len, members)) / args.n / 1e3:.1f} kB/sample): "
          f"{crc / args.n * 1e6:.1f} us/sample = {crc / args.n / per_sample:.2%} of the kernel's "
          f"{per_sample * 1e3:.2f} ms/sample ({sum(map(len, members)) / crc / 1e9:.2f} GB/s)")
    for executor in ("processes", "ray"):   # a local pool (auto's choice on one machine) and a local Ray instance
        path = work / f"bench-{executor}.yaml"
        path.write_text(yaml.safe_dump(bench_config(data / "manifest.jsonl", work / "out", tokenizer, args.cpus,
                                                    executor)))
        shutil.rmtree(work / "out", ignore_errors=True)
        summary, seconds, _ = run_preprocess(path)
        end_to_end = args.n / seconds
        steady = args.n / summary["phases"]["partitions"]
        print(f"pipeline, ray.executor={executor}: end to end (process start, executor start, scan included) "
              f"{end_to_end:.1f} samples/s = {end_to_end / ceiling:.2f} of ceiling; partition phase (wall clock) "
              f"{steady:.1f} samples/s = {steady / ceiling:.2f} of ceiling")
        print("  phases: " + ", ".join(f"{k} {v:.1f} s" for k, v in summary["phases"].items()))
    summary2, seconds2, _ = run_preprocess(path)
    print(f"rerun (everything reused): {seconds2:.1f} s; {summary2['status']}")
    executor_break_even(work, data, tokenizer, args.cpus, args.sizes)

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
