"""Training: setup -> train() loop of train_step / evaluate / maybe_checkpoint -> plots and summary.

Everything a resumed run needs is in `TrainState` and saved in one
checkpoint: model, optimizer, scheduler, step, RNG state and the loader's
state (epoch + samples consumed), so a killed run continues with the very
batches, and therefore the very losses, an uninterrupted run would see.

Failures are one-line exceptions the CLI maps to exit codes: ConfigError (a setting, the run directory,
a checkpoint that does not fit), DataError (a sample or shard the loader cannot read), TrainingError (a
non-finite loss), Interrupted (Ctrl-C; a checkpoint at the step reached, in a single process).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from mmdata import ConfigError, LoaderError, MultimodalLoader, move_to
from mmdata.config import to_dict
from mmtrain import checkpoint
from mmtrain.config import ExperimentConfig
from mmtrain.data import data_changed_message, dataset_facts, eval_loader, resolve_dataset, train_loader
from mmtrain.distributed import Dist, barrier, broadcast_object, mean_over_ranks
from mmtrain.losses import total_loss
from mmtrain.model import FusionModel, real_samples

SKIP_REASONS_SHOWN = 3     # with loader.on_error=skip, the first reasons are printed; metrics.jsonl counts all


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


@dataclass
class TrainState:
    model: torch.nn.Module            # wrapped (DDP/FSDP/compiled) for training
    raw_model: FusionModel            # unwrapped, for state dicts and evaluation
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    loader: MultimodalLoader
    facts: dict                       # dataset sizes the model was built from (vocab, image size...)
    step: int = 0

    sharded: bool = False             # FSDP2: state dicts are gathered to full tensors on save
    skipped: int = 0                  # samples this rank's loader skipped (loader.on_error=skip), all steps
    skip_reasons: list = field(default_factory=list)   # the first few, printed once

    def state_dict(self) -> dict:
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                                 get_optimizer_state_dict)
            full = StateDictOptions(full_state_dict=True, cpu_offload=True)
            model = get_model_state_dict(self.raw_model, options=full)
            optimizer = get_optimizer_state_dict(self.raw_model, self.optimizer, options=full)
        else:
            model, optimizer = self.raw_model.state_dict(), self.optimizer.state_dict()
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        return {"model": model, "optimizer": optimizer, "scheduler": self.scheduler.state_dict(),
                "step": self.step, "rng": rng, "loader": self.loader.state_dict(), "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                                 set_optimizer_state_dict)
            full = StateDictOptions(full_state_dict=True)
            set_model_state_dict(self.raw_model, state["model"], options=full)
            set_optimizer_state_dict(self.raw_model, self.optimizer, state["optimizer"], options=full)
        else:
            self.raw_model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]
        self.skipped = int(state.get("skipped", 0))   # checkpoints before the count have none
        torch.set_rng_state(state["rng"]["cpu"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["rng"]["cuda"])
        self.loader.load_state_dict(state["loader"])


def lr_lambda(config: ExperimentConfig):
    o, steps = config.optim, config.train.steps

    def factor(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        progress = (step - o.warmup_steps) / max(1, steps - o.warmup_steps)
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def build_model(config: ExperimentConfig, facts: dict) -> FusionModel:
    classify = config.train.loss in ("classify", "both")
    if classify and facts["num_classes"] < 2:
        raise ConfigError("train.loss", f"{config.train.loss!r} needs labels, but the dataset has "
                          f"{facts['num_classes']} classes; use train.loss=contrastive")
    modalities = config.data.loader.modalities
    if config.train.loss != "classify" and len(modalities) < 2:
        raise ConfigError("data.loader.modalities", "contrastive training needs at least two modalities")
    if "image" in modalities and config.model.image_encoder == "vit" and facts["image_size"] % config.model.patch_size:
        raise ConfigError("model.patch_size", f"must divide the dataset's image size {facts['image_size']}")
    try:
        return FusionModel(config.model, modalities=modalities, vocab_size=facts["vocab_size"],
                           image_size=facts["image_size"], n_mels=facts["n_mels"],
                           num_classes=max(2, facts["num_classes"]), classify=classify)
    except (RuntimeError, MemoryError) as e:
        if not out_of_memory(e):
            raise
        raise ConfigError("model.dim", f"the model does not fit in memory ({first_line(e, 160)}): lower model.dim, "
                          f"model.mlp_ratio or the layer counts") from None


def out_of_memory(e: BaseException) -> bool:
    """An allocation that failed: CUDA's OutOfMemoryError, or the CPU allocator's RuntimeError."""
    return isinstance(e, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in str(e)


def wrap(model: FusionModel, config: ExperimentConfig, d: Dist) -> torch.nn.Module:
    model.to(d.device)
    wrapped: torch.nn.Module = model
    if config.train.fsdp:
        if d.device.type != "cuda":
            raise ConfigError("train.fsdp", "FSDP2 needs CUDA; use DDP (the default) on CPU")
        from torch.distributed.fsdp import fully_shard
        wrapped = fully_shard(model)
    elif d.distributed:
        wrapped = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    return torch.compile(wrapped) if config.train.compile else wrapped


def setup(config: ExperimentConfig, d: Dist) -> TrainState:
    torch.manual_seed(config.train.seed)
    check_run_dir(config.train.run_dir)
    dataset = resolve_dataset(config.data, d)
    facts = dataset_facts(dataset, labels_used=config.train.loss != "contrastive",
                          max_classes=config.model.max_classes)
    loader = train_loader(config, dataset, d)
    model = build_model(config, facts)
    wrapped = wrap(model, config, d)   # before the optimizer: FSDP2 swaps parameters for sharded ones
    o = config.optim
    optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    state = TrainState(wrapped, model, optimizer, scheduler, loader, facts, sharded=config.train.fsdp)
    resumed = resume_point(config, d)
    if resumed is not None:
        found, saved, meta = resumed
        now = loader.fingerprints()
        trained_on = saved["loader"].get("datasets", now) if isinstance(saved["loader"], dict) else now
        if trained_on != now:
            raise ConfigError("train.run_dir", data_changed_message(str(found), trained_on, dataset, now))
        if meta.get("vocab_size") != facts["vocab_size"]:
            raise ConfigError("data", f"checkpoint {found} was trained with vocab size {meta.get('vocab_size')}; "
                              f"this dataset's tokenizer has {facts['vocab_size']}: use another train.run_dir")
        check_same_settings(found, meta.get("config"), to_dict(config))
        try:
            state.load_state_dict(saved)
        except (RuntimeError, ValueError, KeyError, TypeError, LoaderError) as e:
            # settings the comparison above does not cover (or a checkpoint without its config)
            raise ConfigError("train.run_dir", f"checkpoint {found} does not fit this model and loader "
                              f"({first_line(e)}); resume with the settings it was trained with "
                              f"({found.parent.parent / 'config.yaml'}) or use another train.run_dir") from None
        if not d.is_main:
            state.skipped = 0          # the checkpoint holds the count over all ranks: rank 0 carries it on
    return state


def check_run_dir(run_dir: str) -> None:
    """Fail before any work when the run directory (or its checkpoints folder) cannot be one: a file is in
    the way, or it cannot be created or written."""
    path = Path(run_dir)
    for p in (path, path / "checkpoints"):
        if p.exists() and not p.is_dir():
            raise ConfigError("train.run_dir", f"{p} is a file, not a directory; use another train.run_dir")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError("train.run_dir", f"{run_dir} cannot be created: {existing} is a file; "
                          f"use another train.run_dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError("train.run_dir", f"{existing} is not writable; use another train.run_dir")


def resume_point(config: ExperimentConfig, d: Dist) -> tuple[Path, dict, dict] | None:
    """The newest readable checkpoint of the run, or None. Rank 0 picks it (moving unreadable ones aside, with
    a warning naming each); the other ranks load the one it picked, so that every rank resumes at one step."""
    picked, found, error = None, None, None
    if d.is_main:
        try:
            found = checkpoint.load_latest(config.train.run_dir, warn=warn, move_bad=True,
                                           required=checkpoint.TRAINING_KEYS)
        except checkpoint.CheckpointError as e:
            error = e.detail
        picked = str(found[0]) if found else None
    picked, error = broadcast_object(d, (picked, error))
    if error is not None:       # on every rank, so that none waits for the others forever
        raise checkpoint.CheckpointError(error)
    if picked is None:
        return None
    if d.is_main:
        return found
    saved, meta = checkpoint.load(Path(picked))
    return Path(picked), saved, meta


# Settings that shape the model's parameters, the loader's state or the losses: a checkpoint resumes only
# under the ones it was trained with. (dropout, the initial temperature, image_weights and the rest of
# the config may change between runs.)
RESUME_SETTINGS = ("model.dim", "model.heads", "model.mlp_ratio", "model.text_layers", "model.image_encoder",
                   "model.image_layers", "model.patch_size", "model.cnn_arch", "model.audio_layers",
                   "model.fusion_layers", "model.embed_dim", "model.max_positions", "data.loader.modalities",
                   "train.loss", "train.seed")


def check_same_settings(found: Path, saved: dict | None, current: dict) -> None:
    """Name each setting that differs between the checkpoint's config and this one (before its state dicts
    would fail to load with a wall of parameter names)."""
    if not isinstance(saved, dict):
        return      # an older checkpoint without its config: load_state_dict decides

    def get(tree: dict, key: str):
        for part in key.split("."):
            if not isinstance(tree, dict) or part not in tree:
                return None
            tree = tree[part]
        return tree

    def comparable(key: str, value):
        if key == "train.loss":          # both and classify build the same model; contrastive has no head
            return value == "contrastive"
        if key == "data.loader.modalities" and isinstance(value, list):
            return sorted(value)         # the model orders them itself
        return value

    def used(key: str) -> bool:          # a setting of a part this model does not have cannot matter
        modalities = get(current, "data.loader.modalities") or []
        image = "image" in modalities
        vit = get(current, "model.image_encoder") == "vit"
        return {"model.text_layers": "text" in modalities, "model.audio_layers": "audio" in modalities,
                "model.image_encoder": image, "model.image_layers": image and vit,
                "model.patch_size": image and vit, "model.cnn_arch": image and not vit,
                "model.fusion_layers": get(current, "train.loss") != "contrastive"}.get(key, True)
    differ = [(key, get(saved, key), get(current, key)) for key in RESUME_SETTINGS
              if get(saved, key) is not None and used(key)
              and comparable(key, get(saved, key)) != comparable(key, get(current, key))]
    if differ:
        first, *rest = differ
        listed = "; ".join([f"checkpoint {first[1]}, config {first[2]}",
                            *(f"{k}: checkpoint {a}, config {b}" for k, a, b in rest)])
        raise ConfigError(first[0], f"{listed} (checkpoint {found}); resume with the checkpoint's settings "
                          f"or use another train.run_dir")


def first_line(e: BaseException, limit: int = 300) -> str:
    """An exception as one short line (state-dict errors run to kilobytes)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    text = " ".join(lines[:2]) if lines else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def batches(loader: MultimodalLoader):
    """Epoch after epoch; each `for` over the loader is one epoch."""
    while True:
        yield from loader


def autocast(config: ExperimentConfig, d: Dist):
    bf16 = config.train.precision == "bf16" or (config.train.precision == "auto" and d.device.type == "cuda")
    return torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=bf16)


def train_step(state: TrainState, stream, config: ExperimentConfig, d: Dist) -> dict[str, float]:
    """One optimiser step over grad_accum batches; returns losses and timing."""
    start, wait, samples = time.perf_counter(), 0.0, 0
    state.model.train()
    logs: dict[str, float] = {}
    accum = config.optim.grad_accum
    for micro in range(accum):
        t = time.perf_counter()
        batch = next(stream)            # blocked on the loader: this is the data wait
        empty = 0
        while not len(batch["ids"]):    # every sample of it was skipped (loader.on_error=skip): take the next
            note_skipped(state, batch.get("skipped"))
            empty += 1
            if empty > len(state.loader):
                dataset = state.loader.catalogs[0].dataset
                raise DataError(f"every sample of {empty} batches in a row (an epoch) was skipped "
                                f"(data.loader.on_error=skip): the data cannot be read; the first reasons are "
                                f"above; run `mmdata verify {dataset}`")
            batch = next(stream)
        wait += time.perf_counter() - t
        batch = move_to(batch, d.device)  # copy + normalisation count as step work
        samples += len(batch["ids"])
        note_skipped(state, batch.get("skipped"))
        sync = micro == accum - 1 or not isinstance(state.model, torch.nn.parallel.DistributedDataParallel)
        context = state.model.no_sync() if not sync else torch.enable_grad()
        with context, autocast(config, d):
            losses = total_loss(state.model(batch), batch, config.train.loss, config.train.classify_weight)
        if not torch.isfinite(losses["loss"]):
            raise TrainingError(nan_message(losses["loss"].item(), state.step + 1, config))
        (losses["loss"] / accum).backward()
        for k, v in losses.items():
            logs[k] = logs.get(k, 0.0) + v.item() / accum
    if config.optim.clip_grad:
        torch.nn.utils.clip_grad_norm_(state.model.parameters(), config.optim.clip_grad)
    state.optimizer.step()
    state.optimizer.zero_grad(set_to_none=True)
    state.scheduler.step()
    state.step += 1
    elapsed = time.perf_counter() - start
    return {**logs, "lr": state.scheduler.get_last_lr()[0], "samples_per_s": samples * d.world_size / elapsed,
            "data_wait": wait / elapsed}


def note_skipped(state: TrainState, reasons: list[str] | None) -> None:
    """Count the samples the loader skipped (loader.on_error=skip) and print the first few reasons."""
    if reasons:
        state.skipped += len(reasons)
        show_skip_reasons(state.skip_reasons, reasons)


def show_skip_reasons(shown: list[str], reasons: list[str]) -> None:
    """Print each reason until SKIP_REASONS_SHOWN have been (``shown`` keeps them, once per run)."""
    for reason in reasons:
        if len(shown) >= SKIP_REASONS_SHOWN:
            return
        shown.append(reason)
        more = "; later ones are only counted ('skipped' in metrics.jsonl)" if len(shown) == SKIP_REASONS_SHOWN else ""
        warn(f"skipped a sample (data.loader.on_error=skip): {reason}{more}")


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


@torch.no_grad()
def evaluate(model: FusionModel, config: ExperimentConfig, dataset: str, device: torch.device,
             shown: list[str] | None = None) -> dict[str, float]:
    """Retrieval R@K per modality pair and accuracy on the held-out split, with chance levels. With
    loader.on_error=skip, "skipped" counts the held-out samples left out; the first reasons are printed
    (``shown``: those printed so far in this run)."""
    from mmtrain.evaluate import evaluate_embeddings
    model.eval()
    parts: dict[str, list] = {"label": [], "has_label": [], "logits": []}
    skipped: set[str] = set()
    loader = eval_loader(config, dataset)
    try:
        with reading(dataset):
            for batch in loader:
                batch = move_to(batch, device)
                reasons = batch.get("skipped") or []
                # the last batch is padded with copies of samples, a bad one's included: count each sample once
                skipped.update(skipped_sample(r) for r in reasons)
                if shown is not None:
                    show_skip_reasons(shown, reasons)
                if not len(batch["ids"]):
                    continue
                out = model(batch)
                real = real_samples(batch)
                for m, e in out["embeddings"].items():
                    parts.setdefault(f"emb/{m}", []).append(e[real].float().cpu())
                    parts.setdefault(f"present/{m}", []).append(out["present"][m][real].cpu())
                if out["logits"] is not None:
                    parts["logits"].append(out["logits"][real].float().cpu())
                parts["label"].append(batch["label"][real].cpu())
                parts["has_label"].append(batch["has_label"][real].cpu())
    finally:
        loader.close()
    extra = {"skipped": len(skipped)} if config.data.loader.on_error == "skip" else {}
    if not parts["label"]:
        return extra      # every held-out sample was skipped
    cat = {k: torch.cat(v) for k, v in parts.items() if v}
    embeddings = {k[4:]: v for k, v in cat.items() if k.startswith("emb/")}
    present = {k[8:]: v for k, v in cat.items() if k.startswith("present/")}
    try:
        metrics = evaluate_embeddings(embeddings, present, cat.get("logits"), cat["label"], cat["has_label"],
                                      num_classes=model.head[-1].out_features if model.classify else 0)
    except ValueError as e:      # NaN/inf embeddings: the weights diverged after the last finite loss
        raise TrainingError(f"evaluation: {e}. Lower optim.lr, raise optim.warmup_steps or set optim.clip_grad"
                            ) from None
    return {**metrics, **extra}


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


class Logger:
    """metrics.jsonl + TensorBoard (when installed), written by rank 0 only."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.path = run_dir / "metrics.jsonl"
        self.enabled, self.tb = enabled, None
        if enabled:
            run_dir.mkdir(parents=True, exist_ok=True)
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                self.tb = None

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def maybe_checkpoint(state: TrainState, config: ExperimentConfig, d: Dist, facts: dict,
                     force: bool = False) -> Path | None:
    """Save at every checkpoint_every steps (or now, with ``force``); returns where, on rank 0."""
    every = config.train.checkpoint_every
    if not force and (not every or state.step % every):
        return None
    saved = state.state_dict()   # every rank: FSDP/DDP state gathering is collective
    saved["skipped"] = total_skipped(state, d)
    # the last loss was finite, but the update after it may not have been: never save NaN or inf weights
    finite = all(bool(torch.isfinite(v).all()) for v in saved["model"].values()
                 if isinstance(v, torch.Tensor) and v.is_floating_point())
    if mean_over_ranks(d, {"bad": float(not finite)})["bad"] > 0:
        latest = checkpoint.latest(config.train.run_dir)
        kept = f"the last good checkpoint, {latest}, is intact" if latest else "no checkpoint was written"
        raise TrainingError(f"the weights are NaN or inf after step {state.step}; stopping without saving them "
                            f"({kept}). Lower optim.lr, raise optim.warmup_steps or set optim.clip_grad")
    path = None
    if d.is_main:
        path = checkpoint.save(config.train.run_dir, state.step, saved,
                               {"vocab_size": facts["vocab_size"], "config": to_dict(config)}, config.train.keep_last)
    barrier(d)
    return path


def total_skipped(state: TrainState, d: Dist) -> int:
    """Samples skipped so far on all ranks (collective)."""
    return round(mean_over_ranks(d, {"skipped": float(state.skipped)})["skipped"] * d.world_size)


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


def train(config: ExperimentConfig, d: Dist) -> dict[str, float]:
    """Train to config.train.steps (resuming from the run directory); returns the final eval metrics.

    Raises DataError (a sample or shard that cannot be read), TrainingError (a non-finite loss), ConfigError,
    and Interrupted on Ctrl-C (after saving a checkpoint at a step boundary, in a single process)."""
    state: TrainState | None = None
    try:
        state = setup(config, d)
        return train_loop(state, config, d)
    except Interrupted:
        raise
    except KeyboardInterrupt:
        step = state.step if state is not None else None
        raise Interrupted(step, None, checkpoint.latest(config.train.run_dir)) from None
    finally:
        if state is not None:
            state.loader.close()


def train_loop(state: TrainState, config: ExperimentConfig, d: Dist) -> dict[str, float]:
    run_dir = Path(config.train.run_dir)
    dataset, facts = state.loader.catalogs[0].dataset, state.facts
    if d.is_main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError("train.run_dir", f"{run_dir} cannot be created ({e.strerror or e}); use another "
                              f"train.run_dir") from None
        (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
        trim_metrics(run_dir / "metrics.jsonl", state.step)
    logger = Logger(run_dir, d.is_main)
    skipping = config.data.loader.on_error == "skip"
    stream = batches(state.loader)
    bar = tqdm(total=config.train.steps, initial=state.step, disable=not (config.train.progress and d.is_main),
               desc="train", unit="step", dynamic_ncols=True)
    try:
        with StopRequest(not d.distributed) as stop, reading(dataset):
            while state.step < config.train.steps:
                logs = train_step(state, stream, config, d)
                bar.update(1)
                bar.set_postfix(loss=f"{logs['loss']:.3f}", sps=f"{logs['samples_per_s']:.0f}",
                                wait=f"{logs['data_wait']:.0%}", refresh=False)
                if state.step % config.train.log_every == 0 or state.step == config.train.steps:
                    values = mean_over_ranks(d, {**logs, "skipped": float(state.skipped)} if skipping else logs)
                    if skipping:     # a running count over all ranks, not a mean
                        values["skipped"] = round(values["skipped"] * d.world_size)
                    logger.log(state.step, values)
                if (config.train.eval_every and state.step % config.train.eval_every == 0
                        and state.step < config.train.steps):
                    run_eval(state, config, d, dataset, logger)
                saved = maybe_checkpoint(state, config, d, facts)
                if stop.requested:
                    bar.close()
                    saved = saved or maybe_checkpoint(state, config, d, facts, force=True)
                    raise Interrupted(state.step, saved, saved)
            bar.close()
            # the final checkpoint before the final evaluation: an interrupted or failed evaluation loses no step
            maybe_checkpoint(state, config, d, facts, force=True)
        metrics = run_eval(state, config, d, dataset, logger)
        skipped = total_skipped(state, d) if skipping else None
    except (RuntimeError, MemoryError) as e:
        if not out_of_memory(e) or isinstance(e, TrainingError):
            raise
        raise TrainingError(f"out of memory at step {state.step + 1} ({first_line(e, 160)}): lower "
                            f"data.loader.batch_size (and raise optim.grad_accum to keep the effective batch), "
                            f"data.eval_batch_size or model.dim; rerunning resumes from the last checkpoint") from None
    finally:
        bar.close()
        logger.close()
    state.loader.close()
    if d.is_main:
        finish(run_dir, metrics, skipped, dataset)
    return metrics


def run_eval(state: TrainState, config: ExperimentConfig, d: Dist, dataset: str, logger: Logger) -> dict:
    metrics = evaluate(state.raw_model, config, dataset, d.device, state.skip_reasons) if d.is_main else {}
    logger.log(state.step, {f"eval/{k}": v for k, v in metrics.items()})
    barrier(d)
    return metrics


def trim_metrics(path: Path, step: int) -> None:
    """A resumed run rewrites what came after its checkpoint: drop those lines so curves don't double (and a
    line cut short by a killed run, or anything else that is not a metrics record)."""
    if path.exists():
        keep = [line for line in path.read_text(errors="replace").splitlines() if logged_step(line) <= step]
        path.write_text("".join(line + "\n" for line in keep))


def logged_step(line: str) -> float:
    """The step of a metrics.jsonl line; infinity (dropped) for a line that is not a record with a step."""
    try:
        record = json.loads(line)
    except ValueError:
        return math.inf
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, (int, float)) and not isinstance(step, bool) else math.inf


def finish(run_dir: Path, metrics: dict[str, float], skipped: int | None = None, dataset: str = "") -> None:
    from mmtrain.evaluate import format_metrics
    from mmtrain.plots import plot_curves
    plot_curves(run_dir / "metrics.jsonl", run_dir / "curves.png")
    (run_dir / "eval.json").write_text(json.dumps(metrics, indent=1, sort_keys=True))
    print(format_metrics(metrics))
    if skipped is not None:
        in_eval = int(metrics.get("skipped", 0))
        hint = f"; `mmdata verify {dataset}` finds them all" if skipped or in_eval else ""
        print(f"skipped samples: {skipped} in training, {in_eval} in evaluation (data.loader.on_error=skip{hint})")
    print(f"run directory {run_dir}: checkpoints/, metrics.jsonl, tensorboard/, curves.png, eval.json")
