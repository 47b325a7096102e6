"""The ``mmtrain`` command: train (single process, or torchrun with --nproc) and eval."""

from __future__ import annotations

import argparse
import os
import sys

DESCRIPTION = """\
Train the text-image-audio fusion model on preprocessed shards.

  mmtrain train pipelines/train.yaml [key=value ...]         one process (resumes from train.run_dir)
  mmtrain train pipelines/train.yaml --nproc 2               the same under torchrun, 2 ranks (DDP)
  torchrun --nproc_per_node 4 -m mmtrain train cfg.yaml      what --nproc runs; multi-node: torchrun's rendezvous
  mmtrain eval runs/demo                                     re-evaluate the latest checkpoint of a run
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mmtrain", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(required=True, metavar="COMMAND")
    p = sub.add_parser("train", help="train (or resume) an experiment",
                       description="Train the experiment in CONFIG; overrides are dotted keys such as "
                                   "train.steps=100 model.dim=64 data.loader.batch_size=16.")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--nproc", type=int, default=1, help="processes on this machine (launches torchrun)")
    p.set_defaults(run=run_train)
    p = sub.add_parser("eval", help="evaluate a run's latest checkpoint on the held-out split")
    p.add_argument("run_dir")
    p.set_defaults(run=run_eval)
    args = parser.parse_args(argv)
    from mmdata.config import ConfigError
    from mmdata.dataset import DatasetError
    from mmtrain.trainer import TrainingError
    try:
        return args.run(args)
    except (ConfigError, DatasetError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def run_train(args) -> int:
    if args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
                   "-m", "mmtrain", "train", args.config, *args.overrides]
        os.execv(sys.executable, command)
    from mmdata.config import load_config
    from mmtrain.config import ExperimentConfig
    from mmtrain.distributed import cleanup, setup
    from mmtrain.trainer import train
    config = load_config(ExperimentConfig, args.config, args.overrides)
    d = setup(config.train.device, group=config.train.fsdp)
    try:
        train(config, d)
    finally:
        cleanup()
    return 0


def run_eval(args) -> int:
    from pathlib import Path

    from mmdata.config import load_config
    from mmtrain import checkpoint
    from mmtrain.config import ExperimentConfig
    from mmtrain.data import dataset_facts, resolve_dataset
    from mmtrain.distributed import setup
    from mmtrain.evaluate import format_metrics
    from mmtrain.trainer import build_model, evaluate
    config = load_config(ExperimentConfig, Path(args.run_dir) / "config.yaml")
    d = setup(config.train.device)
    dataset = resolve_dataset(config.data, d)
    found = checkpoint.latest(args.run_dir)
    if found is None:
        print(f"error: no checkpoint in {args.run_dir}/checkpoints", file=sys.stderr)
        return 2
    model = build_model(config, dataset_facts(dataset))
    state, meta = checkpoint.load(found)
    model.load_state_dict(state["model"])
    model.to(d.device)
    print(f"checkpoint {found} (step {meta['step']})")
    print(format_metrics(evaluate(model, config, dataset, d.device)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
