"""mmdata preprocess against img2dataset, the tool people use to turn image-text pairs into WebDataset shards.

    python benchmarks/vs_img2dataset.py --n 3000            # also part of make bench-preprocess

The same job for both, in one run on the same machine: ``n`` deterministic 1024x768 photo-like JPEGs (q90)
with captions, to a 256 px centre crop re-encoded as JPEG q90, shards of ``--per-shard`` samples, all cores.
img2dataset (installed into its own virtual environment here; the comparison is skipped with a message if
that fails) downloads the photos from a loopback HTTP server with 2 threads per core of its processes, as it
is meant to run; mmdata reads them from a manifest of the same files on disk, and also tokenizes the captions
(a tokenizer given, so its one-off training is not counted). Wall clock of each whole command, process
start-up included, and the ratio of their rates.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from preprocess_common import photo_images, run_preprocess

IMG2DATASET = "img2dataset==1.47.0"
SHAPES = ("circle", "triangle", "square", "star", "cloud", "leaf")
COLOURS = ("red", "green", "blue", "orange", "purple", "grey", "yellow")


def make_photos(folder: Path, n: int) -> list[dict]:
    """``n`` JPEGs (q90) in ``folder`` and their rows (id, caption, file name); made once per folder."""
    rng = random.Random(0)
    rows = [{"id": f"photo-{i:06d}", "file": f"photo-{i:06d}.jpg",
             "text": f"a {rng.choice(COLOURS)} {rng.choice(SHAPES)} over a {rng.choice(COLOURS)} background, photo {i}"}
            for i in range(n)]
    done = folder / "complete"
    if not done.exists():
        folder.mkdir(parents=True, exist_ok=True)
        for row, image in zip(rows, photo_images(n)):
            image.save(folder / row["file"], "JPEG", quality=90)
        done.touch()
    return rows


def img2dataset_venv(work: Path) -> Path | None:
    """The img2dataset command of a virtual environment under ``work`` (made once); None, with a message,
    when it cannot be installed."""
    venv = work / "img2dataset-venv"
    command = venv / "bin" / "img2dataset"
    if command.exists():
        return command
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, text=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", IMG2DATASET], check=True,
                       capture_output=True, text=True, timeout=1800)
    except (subprocess.SubprocessError, OSError) as e:
        detail = (getattr(e, "stderr", "") or str(e)).strip().splitlines()[-1:] or [""]
        print(f"img2dataset comparison skipped: cannot install {IMG2DATASET} into {venv}: {detail[0]}")
        shutil.rmtree(venv, ignore_errors=True)
        return None
    return command


class PhotoServer:
    """Python's HTTP server over ``folder`` on a free loopback port, in its own process."""

    def __init__(self, folder: Path):
        self.folder = folder

    def __enter__(self) -> str:
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                                      "--directory", str(self.folder)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.1):
                    return url
            except OSError:
                time.sleep(0.05)
        raise SystemExit(f"the photo server on {url} did not start")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait()


def run_img2dataset(command: Path, rows: list[dict], url: str, out: Path, per_shard: int, cores: int) -> tuple[float, int]:
    """(wall seconds, images written) of one img2dataset run over the photos at ``url``."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    urls = out.parent / "urls.parquet"
    pq.write_table(pa.table({"url": [f"{url}/{r['file']}" for r in rows], "caption": [r["text"] for r in rows]}), urls)
    args = [str(command), "--url_list", str(urls), "--input_format", "parquet", "--url_col", "url",
            "--caption_col", "caption", "--output_format", "webdataset", "--output_folder", str(out),
            "--processes_count", str(cores), "--thread_count", str(16), "--image_size", "256",
            "--resize_mode", "center_crop", "--encode_format", "jpg", "--encode_quality", "90",
            "--number_sample_per_shard", str(per_shard), "--distributor", "multiprocessing",
            "--enable_wandb", "False", "--retries", "0", "--timeout", "30"]
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1")
    start = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"img2dataset failed:\n{proc.stderr[-3000:]}")
    written = sum(json.loads(p.read_text()).get("successes", 0) for p in out.glob("*_stats.json"))
    return seconds, written


def run_mmdata(rows: list[dict], photos: Path, out: Path, tokenizer: str, per_shard: int) -> tuple[float, int, dict]:
    """(wall seconds, samples written, phase seconds) of one ``mmdata preprocess`` over a manifest of the photos."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    manifest = out / "manifest.jsonl"
    manifest.write_text("".join(json.dumps({"id": r["id"], "text": r["text"], "image": str(photos / r["file"])}) + "\n"
                                for r in rows))
    config = {"input": {"manifest": str(manifest)},
              "output": {"root": str(out / "datasets"), "name": "photos", "samples_per_shard": per_shard},
              "text": {"tokenizer": tokenizer},
              "image": {"size": 256, "resize": "shorter_side_crop", "format": "jpg", "quality": 90},
              "progress": False}
    path = out / "photos.yaml"
    path.write_text(yaml.safe_dump(config))
    summary, seconds, _ = run_preprocess(path)
    written = int(summary["samples"].split()[0])
    return seconds, written, summary["phases"]


def train_tokenizer(rows: list[dict], folder: Path) -> str:
    import sentencepiece as spm
    folder.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(sentence_iterator=iter([r["text"] for r in rows]), model_prefix=str(folder / "captions"),
                                   vocab_size=256, model_type="unigram", minloglevel=2)
    return str(folder / "captions.model")


def compare(work: Path, n: int, per_shard: int, rounds: int) -> None:
    """Print both rates and their ratio, ``rounds`` times, alternating which tool goes first."""
    command = img2dataset_venv(work)
    if command is None:
        return
    photos = work / f"photos-{n}"
    print(f"vs img2dataset: making {n} 1024x768 JPEGs in {photos} (once)")
    rows = make_photos(photos, n)
    tokenizer = train_tokenizer(rows, work / "captions-tokenizer")
    cores = os.cpu_count() or 1
    with PhotoServer(photos) as url:
        for r in range(rounds):
            results = {}
            for tool in (("img2dataset", "mmdata") if r % 2 == 0 else ("mmdata", "img2dataset")):
                if tool == "img2dataset":
                    results[tool] = run_img2dataset(command, rows, url, work / "i2d-out" / "shards", per_shard, cores)
                else:
                    seconds, written, phases = run_mmdata(rows, photos, work / "mm-out", tokenizer, per_shard)
                    results[tool] = (seconds, written)
            (i2d_s, i2d_n), (mm_s, mm_n) = results["img2dataset"], results["mmdata"]
            print(f"  {n} photos -> 256 px jpg, {cores} cores: img2dataset {i2d_n / i2d_s:.0f} img/s ({i2d_s:.1f} s, "
                  f"{i2d_n} written); mmdata preprocess {mm_n / mm_s:.0f} img/s ({mm_s:.1f} s, {mm_n} written): "
                  f"ratio {(mm_n / mm_s) / (i2d_n / i2d_s):.2f}  [mmdata phases: "
                  + ", ".join(f"{k} {v:.1f} s" for k, v in phases.items()) + "]")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=3000, help="photos")
    parser.add_argument("--per-shard", type=int, default=500, help="samples per shard, both tools")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--work", default=None, help="scratch folder, reused between runs (default: a temporary one)")
    args = parser.parse_args()
    compare(Path(args.work or tempfile.mkdtemp(prefix="mm-vs-i2d-")), args.n, args.per_shard, args.rounds)


if __name__ == "__main__":
    main()
