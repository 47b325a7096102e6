"""Benchmark: training samples/s and the share of step time spent waiting for data.

    make bench-train                         # the demo experiment, default worker count
    python benchmarks/bench_train.py --steps 60 --workers 0 1 2

Runs train_step directly (no evaluation, no checkpoints) on the demo shards and
reports steady-state numbers after a warm-up. On CUDA it also reports an MFU
estimate from the model's FLOPs per sample (measured with torch's FLOP counter).
"""

from __future__ import annotations

import argparse
import tempfile

import torch

from mmdata.config import load_config
from mmtrain.config import ExperimentConfig
from mmtrain.distributed import setup
from mmtrain.trainer import batches, setup as setup_state, train_step

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}   # dense bf16


def flops_per_sample(state, stream, config, d) -> float:
    from torch.utils.flop_counter import FlopCounterMode
    from mmdata.load.loader import move_to
    from mmtrain.losses import total_loss
    batch = move_to(next(stream), d.device)
    with FlopCounterMode(display=False) as counter:
        losses = total_loss(state.model(batch), batch, config.train.loss, config.train.classify_weight)
        losses["loss"].backward()
    state.optimizer.zero_grad(set_to_none=True)
    return counter.get_total_flops() / len(batch["ids"])


def run(config_path: str, workers: int, steps: int, warmup: int, overrides: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as run_dir:
        config = load_config(ExperimentConfig, config_path, [*overrides, f"train.run_dir={run_dir}",
                                                            f"data.loader.num_workers={workers}",
                                                            f"train.steps={steps + warmup + 1}"])
        d = setup(config.train.device, group=config.train.fsdp)
        state = setup_state(config, d)
        stream = batches(state.loader)
        flops = flops_per_sample(state, stream, config, d) if d.device.type == "cuda" else 0.0
        logs = [train_step(state, stream, config, d) for _ in range(warmup + steps)][warmup:]
        if d.device.type == "cuda":
            torch.cuda.synchronize()
        state.loader.close()
    sps = sum(l["samples_per_s"] for l in logs) / len(logs)
    out = {"workers": workers, "samples_per_s": sps, "data_wait": sum(l["data_wait"] for l in logs) / len(logs),
           "device": str(d.device)}
    if flops:
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
        out["mfu"] = flops * sps / (peak * 1e12) if peak else float("nan")
        out["gpu"] = name
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="pipelines/train.yaml")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--workers", type=int, nargs="*", default=[2])
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    for workers in args.workers:
        r = run(args.config, workers, args.steps, args.warmup, args.overrides)
        line = (f"{r['device']}: {workers} loader workers: {r['samples_per_s']:.0f} samples/s, "
                f"data wait {r['data_wait']:.1%} of step time")
        if "mfu" in r:
            line += f", MFU {r['mfu']:.2%} ({r['gpu']})"
        print(line, flush=True)


if __name__ == "__main__":
    main()
