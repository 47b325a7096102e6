"""Training failures as one line: the error types the CLI maps to exit codes, and the messages behind them.

ConfigError (from mmdata: a setting, the run directory, a checkpoint that does not fit) and these:
DataError (a sample or shard the loader cannot read), TrainingError (a non-finite loss, out of memory),
Interrupted (Ctrl-C; a checkpoint at the step reached, in a single process: see StopRequest).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from pathlib import Path

import torch

from mmdata import LoaderError
from mmdata.schema import one_line
from mmtrain import checkpoint
from mmtrain.config import ExperimentConfig


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the last good checkpoint is intact."""


class DataError(TrainingError):
    """A sample or shard could not be read while training or evaluating (the loader's message, one line)."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C: training stopped after ``step`` optimiser steps; ``saved`` is the checkpoint written on the
    way out (None when none was) and ``latest`` the newest checkpoint of the run (None when there is none)."""

    def __init__(self, step: int | None, saved: Path | None = None, latest: Path | None = None):
        super().__init__(step)
        self.step, self.saved, self.latest = step, saved, latest


def out_of_memory(e: BaseException) -> bool:
    """An allocation that failed: CUDA's OutOfMemoryError, or the CPU allocator's RuntimeError."""
    return isinstance(e, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in str(e)


def out_of_memory_message(e: BaseException, step: int) -> str:
    """An allocation that failed during training (at optimiser step ``step``), with the settings to lower."""
    return (f"out of memory at step {step} ({one_line(e, 160)}): lower data.loader.batch_size (and raise "
            f"optim.grad_accum to keep the effective batch), data.eval_batch_size or model.dim; rerunning "
            f"resumes from the last checkpoint")


def nan_message(loss: float, step: int, config: ExperimentConfig) -> str:
    """Why training stopped, and what is (or is not) left to resume from."""
    found = checkpoint.latest(config.train.run_dir)
    if found is not None:
        kept = (f"the last good checkpoint, {found}, is intact (rerunning resumes from it, and will likely meet "
                f"the same loss)")
    else:
        kept = (f"no checkpoint was written yet (train.checkpoint_every={config.train.checkpoint_every}), so a "
                f"rerun starts over")
    return (f"loss is {loss} at step {step}; stopping: {kept}. Lower optim.lr, raise optim.warmup_steps or set "
            f"optim.clip_grad")


def skipped_sample(reason: str) -> str:
    """The "<shard> sample '<key>'" a loader's skip reason starts with (the rest may differ between two reads)."""
    head, sep, _ = reason.partition("': ")
    return head if sep else reason


@contextlib.contextmanager
def reading(dataset: str):
    """Turn what the loader raises while reading into one line naming the shard and key (DataError)."""
    try:
        yield
    except TrainingError:     # already one line (an evaluation inside the training loop, a NaN loss)
        raise
    except LoaderError as e:
        raise DataError(f"{loader_reason(e)}; set data.loader.on_error=skip to skip bad samples, or run "
                        f"`mmdata verify {dataset}` to find them all") from None
    except RuntimeError as e:
        message = str(e)
        if "DataLoader worker" not in message and "DataLoader timed out" not in message:
            raise
        raise DataError(worker_failure(message, dataset)) from None


def loader_reason(e: LoaderError) -> str:
    """The loader's own message: a LoaderError raised in a DataLoader worker comes back with the worker's
    traceback in its text ("Caught LoaderError in DataLoader worker process 0. Original Traceback ...")."""
    lines = str(e).splitlines()
    if lines and "Original Traceback" in str(e):
        # the exception's own line is the first unindented one after the traceback ("mmdata...LoaderError: ...")
        for i, line in enumerate(lines):
            if i and "LoaderError: " in line and not line.startswith((" ", "Original Traceback")):
                lines = [line.split("LoaderError: ", 1)[1], *lines[i + 1:]]
                break
    return " ".join(line.strip() for line in lines if line.strip())


def worker_failure(message: str, dataset: str) -> str:
    """A DataLoader worker that died or stalled, in one line with the likely causes for mm's loader."""
    first = message.strip().splitlines()[0].split(". ")[0].rstrip(".")
    if "Bus error" in message:
        cause = (f"a shard of {dataset} was probably truncated or rewritten while mapped (run `mmdata verify "
                 f"{dataset}`; data.loader.read.mmap=false reads without mapping), or /dev/shm is full")
    elif "Killed" in message or "exited unexpectedly" in message:
        cause = "it was probably out of memory: lower data.loader.num_workers or data.loader.batch_size"
    elif "timed out" in message:
        cause = "a read stalled: check the storage, or raise data.loader.timeout_s"
    else:
        cause = f"run `mmdata verify {dataset}` to check the shards"
    return f"{first}: {cause}"


class StopRequest:
    """Ctrl-C during training, single process: the first one asks the loop to stop after the current step
    with a checkpoint (a step cut in half has consumed batches it did not train on, so only a step boundary
    can be saved and resumed exactly); a second one stops at once. DataLoader workers forked meanwhile
    inherit the handler and ignore SIGINT: the main process stops them. Under torchrun the ranks would
    have to agree on a step, so there Ctrl-C stops at once (the last periodic checkpoint stays)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.requested = False
        self._previous = None
        self._pid = os.getpid()

    def __enter__(self) -> "StopRequest":
        if self.enabled:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self._pid:      # a DataLoader worker: the main process decides
            return
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\ninterrupt: stopping after this step, with a checkpoint (Ctrl-C again to stop now)",
              file=sys.stderr, flush=True)
