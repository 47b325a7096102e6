"""What the preprocessing benchmarks share: deterministic photo-like images, and running the CLI while
watching its processes' memory."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator


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
            "members": lines.get("members", ""), "shards": lines.get("shards", ""), "dataset": lines.get("dataset", ""),
            "phases": {k: float(v) for k, v in phases.items()}}
