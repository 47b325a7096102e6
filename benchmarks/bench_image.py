"""Benchmark: does the image encoder learn real images? Class-level retrieval and CPU time, encoder by encoder.

    make bench-image                                  # all encoders, 600 steps each
    python benchmarks/bench_image.py --steps 300 --encoders conv resnet18

Real handwritten digits photographed into colour images (benchmarks/digits_data.py: 1,797 samples, 10
classes, with captions and keypad tones), preprocessed by pipelines/digits.yaml, then `mmtrain train
pipelines/train.yaml` with only the dataset, the steps and the image encoder changed. Each encoder is
trained in its own process, one after another, on the same shards; the table gives, beside chance:
class@1 of image queries against text and audio and of text and audio queries against images, image-only
accuracy of the fusion head, zero-shot image accuracy, and the wall time of the whole command as a ratio
to the patchify ViT's (the earlier default) measured in the same run. A torchvision ResNet-18 is the peer.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENCODERS = {   # name -> overrides
    "patch": ["model.image_encoder=vit", "model.image_stem=patch", "model.image_pool=mean"],
    "conv": ["model.image_encoder=vit", "model.image_stem=conv", "model.image_pool=max"],
    "resnet18": ["model.image_encoder=cnn", "model.cnn_arch=resnet18"],
}
LABELS = {"patch": "ViT, patchify stem, mean (earlier default)", "conv": "ViT, conv stem, max (default)",
          "resnet18": "torchvision ResNet-18 (peer)"}
PAIRS = ("image->text", "image->audio", "text->image", "audio->image")


def prepare_dataset(data_dir: Path) -> str:
    if not (data_dir / "manifest.jsonl").exists():
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "digits_data.py"), "--out", str(data_dir)],
                       check=True)
    out = subprocess.run([sys.executable, "-m", "mmdata.cli", "preprocess", str(ROOT / "pipelines" / "digits.yaml"),
                          f"input.manifest={data_dir / 'manifest.jsonl'}", "progress=false"],
                         check=True, capture_output=True, text=True, cwd=ROOT)
    print(out.stdout.strip().splitlines()[0])
    return str(ROOT / "data" / "datasets" / "digits")


def train(dataset: str, encoder: str, steps: int, seed: int, run_dir: str) -> tuple[float, dict]:
    command = [sys.executable, "-m", "mmtrain.cli", "train", str(ROOT / "pipelines" / "train.yaml"),
               "data.preprocess=null", f"data.dataset={dataset}", f"train.run_dir={run_dir}", f"train.steps={steps}",
               f"train.seed={seed}", "train.eval_every=0", "train.checkpoint_every=0", "train.progress=false",
               *ENCODERS[encoder]]
    start = time.perf_counter()
    run = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - start
    if run.returncode:
        sys.exit(f"{encoder}: mmtrain train failed: {run.stderr.strip().splitlines()[-1]}")
    return seconds, json.loads((Path(run_dir) / "eval.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--encoders", nargs="+", choices=list(ENCODERS), default=list(ENCODERS))
    parser.add_argument("--data", default=str(ROOT / "data" / "digits"))
    args = parser.parse_args()
    dataset = prepare_dataset(Path(args.data))
    rows = []
    for seed in args.seeds:
        for encoder in args.encoders:
            with tempfile.TemporaryDirectory() as run_dir:
                seconds, metrics = train(dataset, encoder, args.steps, seed, run_dir)
            rows.append((encoder, seed, seconds, metrics))
            print(f"  {encoder} seed {seed}: {seconds:.0f} s", flush=True)
    base = {seed: s for e, seed, s, _ in rows if e == "patch"}
    m0 = rows[0][3]
    print(f"\n{args.steps} steps, batch 32, 64 px, on this machine's CPU; class@1 chance "
          f"{m0['image->text/class@1/chance']:.3f}, accuracy chance {m0['accuracy[image]/chance']:.3f}")
    header = f"{'encoder':44s} {'seed':>4s} " + " ".join(f"{p:>12s}" for p in PAIRS) + \
        f" {'acc[image]':>10s} {'zero-shot':>9s} {'wall s':>7s} {'x patch':>7s}"
    print(header)
    for encoder, seed, seconds, m in rows:
        ratio = f"{seconds / base[seed]:.2f}" if seed in base else "-"
        print(f"{LABELS[encoder]:44s} {seed:4d} " + " ".join(f"{m[f'{p}/class@1']:12.3f}" for p in PAIRS) +
              f" {m['accuracy[image]']:10.3f} {m.get('zero_shot[image]', float('nan')):9.3f} {seconds:7.0f} {ratio:>7s}")


if __name__ == "__main__":
    main()
