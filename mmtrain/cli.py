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

Exit codes: 0 done; 1 training stopped (a non-finite loss, a file that cannot be written); 2 a bad config,
dataset or run directory, before training; 3 a sample or shard that cannot be read (the message names it);
130 interrupted (Ctrl-C; rerun the same command to resume). Every error is one line on stderr.
"""

EXIT_STOPPED, EXIT_CONFIG, EXIT_DATA, EXIT_INTERRUPTED = 1, 2, 3, 130


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
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra      # key=value after --nproc N
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from mmdata.config import ConfigError
    from mmdata.dataset import DatasetError
    from mmtrain.failures import DataError, TrainingError
    try:
        return args.run(args)
    except (ConfigError, DatasetError) as e:
        return fail(e, EXIT_CONFIG)
    except DataError as e:
        return fail(e, EXIT_DATA)
    except TrainingError as e:
        return fail(e, EXIT_STOPPED)
    except RuntimeError as e:
        if not lost_peer(e):
            raise
        return fail(f"rank {os.environ.get('RANK', '?')}: another rank went away ({str(e).splitlines()[0][:160]}); "
                    f"its own error says why", EXIT_STOPPED)
    except KeyboardInterrupt as e:
        if os.environ.get("RANK", "0") == "0":      # under torchrun every rank stops at once: say it once
            print(interrupted(e, args.run is run_train), file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except OSError as e:      # the disk filled up, a file could not be written: the environment, not mm
        where = f" ({e.filename})" if e.filename else ""
        return fail(f"{e.strerror or e}{where}; fix that and rerun the same command (a run resumes from its "
                    f"last checkpoint)", EXIT_STOPPED)


def fail(e: BaseException | str, code: int) -> int:
    """``error: ...`` on one line (a message from deeper down may hold line breaks, e.g. a YAML error's)."""
    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    print(f"error: {text}", file=sys.stderr, flush=True)
    return code


def interrupted(e: KeyboardInterrupt, training: bool) -> str:
    from mmtrain.failures import Interrupted
    if not training:
        return "interrupted; nothing was changed"
    if not isinstance(e, Interrupted) or e.step is None:
        return "interrupted before training started; rerun the same command"
    if e.saved is not None:
        kept = f"checkpoint saved at step {e.step}"
    elif e.latest is not None:
        kept = f"it resumes from {e.latest.name}, the last checkpoint"
    else:
        kept = "no checkpoint was written yet, so it starts over"
    return f"interrupted at step {e.step}; resume with the same command ({kept})"


def run_train(args) -> int:
    from mmdata.config import ConfigError
    if args.nproc < 1:
        raise ConfigError("--nproc", f"must be at least 1 (processes on this machine); got {args.nproc}")
    from mmdata.config import load_config
    from mmtrain.config import ExperimentConfig
    config = load_config(ExperimentConfig, args.config, args.overrides)   # a bad config fails once, not per rank
    if args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        return launch(args)
    from mmtrain.distributed import cleanup, setup
    from mmtrain.trainer import train
    d = setup(config.train.device, group=config.train.fsdp)
    try:
        train(config, d)
    except BaseException:
        cleanup(failed=True)    # other ranks may be inside a collective: no barrier
        raise
    cleanup()
    return 0


def launch(args) -> int:
    """--nproc N: torchrun's launcher (what `torchrun --standalone --nproc_per_node N -m mmtrain train ...`
    runs), in this process, so that a failed run ends with the failing rank's own error line and exit code
    rather than torchrun's report of its child."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run
    try:
        run(parse_args(["--standalone", f"--nproc_per_node={args.nproc}", "-m", "mmtrain", "train", args.config,
                        *args.overrides]))
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        if failure.exitcode > 0:
            return failure.exitcode            # the rank printed its error (one line) before exiting
        return fail(killed_message(rank, -failure.exitcode), EXIT_STOPPED)
    except SignalException as e:               # Ctrl-C or a scheduler's SIGTERM, caught by torchrun's agent
        print(f"interrupted ({e.sigval.name}); resume with the same command (from the last checkpoint)",
              file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    return 0


def killed_message(rank: int, signum: int) -> str:
    """What a rank's death by a signal most likely means, and what to do."""
    import signal
    name = signal.Signals(signum).name if signum in signal.valid_signals() else f"signal {signum}"
    if signum == signal.SIGKILL:
        return (f"rank {rank} was killed by SIGKILL, most often the kernel's out-of-memory killer (dmesg names "
                f"it): lower data.loader.batch_size or data.loader.num_workers")
    if signum in (signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS, signal.SIGILL, signal.SIGFPE):
        return (f"rank {rank} crashed in native code ({name}); run again with PYTHONFAULTHANDLER=1 in the "
                f"environment to print where, and report it with that trace")
    return f"rank {rank} was killed by {name}, sent from outside this run; resume with the same command"


def lost_peer(e: RuntimeError) -> bool:
    """A collective that failed because another rank went away (it stopped on its own error)."""
    text = str(e)
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer", "NCCL", "Broken pipe",
                            "remote process exited", "Socket Timeout"))


def run_eval(args) -> int:
    from pathlib import Path

    from mmdata.config import ConfigError, load_config
    from mmdata.schema import one_line
    from mmtrain import checkpoint
    from mmtrain.config import ExperimentConfig
    from mmtrain.data import dataset_facts, resolve_sources
    from mmtrain.distributed import setup
    from mmtrain.evaluate import format_metrics
    from mmtrain.report import warn
    from mmtrain.trainer import build_model, evaluate
    if not Path(args.run_dir).is_dir():
        what = "is not a directory" if Path(args.run_dir).exists() else "does not exist"
        raise ConfigError("", f"run directory {args.run_dir} {what}")
    config = load_config(ExperimentConfig, Path(args.run_dir) / "config.yaml")
    found = checkpoint.load_latest(args.run_dir, warn=warn)   # passes over unreadable ones, naming them
    if found is None:
        raise ConfigError("", f"no checkpoint in {checkpoint.checkpoint_dir(args.run_dir)}: train first")
    path, state, meta = found
    d = setup(config.train.device)
    sources = resolve_sources(config.data, d)
    model = build_model(config, dataset_facts([s.path for s in sources],
                                              labels_used=config.train.loss != "contrastive",
                                              max_classes=config.model.max_classes))
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise ConfigError("", f"checkpoint {path} does not fit the model {args.run_dir}/config.yaml describes "
                          f"({one_line(e)}); was config.yaml edited?") from None
    model.to(d.device)
    print(f"checkpoint {path} (step {meta.get('step')})")
    print(format_metrics(evaluate(model, config, sources, d.device, shown=[])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
