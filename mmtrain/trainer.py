"""Training: setup -> train() loop of train_step / evaluate / maybe_checkpoint -> plots and summary.

Everything a resumed run needs is in `TrainState` and saved in one
checkpoint: model, optimizer, scheduler, step, RNG state and the loader's
state (epoch + samples consumed), so a killed run continues with the very
batches, and therefore the very losses, an uninterrupted run would see.

Resuming and its checks are in mmtrain.resume; the one-line failures the CLI maps to exit codes
(ConfigError, DataError, TrainingError, Interrupted) in mmtrain.failures; what a run logs and prints
in mmtrain.report.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from mmdata import ConfigError, MultimodalLoader, move_to
from mmdata.config import to_dict
from mmdata.schema import one_line
from mmtrain import checkpoint
from mmtrain.config import ExperimentConfig
from mmtrain.data import Source, dataset_facts, describe_split, eval_loader, resolve_sources, train_loader
from mmtrain.distributed import Dist, barrier, mean_over_ranks
from mmtrain.failures import (DataError, Interrupted, StopRequest, TrainingError, nan_message, out_of_memory,
                              out_of_memory_message, reading, skipped_sample)
from mmtrain.losses import total_loss
from mmtrain.model import FusionModel, real_samples
from mmtrain.optim import adamw, load_optimizer_state
from mmtrain.report import Logger, finish, log_step, note_skipped, show_skip_reasons, total_skipped
from mmtrain.resume import check_run_dir, prepare_run_dir, resume


@dataclass
class TrainState:
    model: torch.nn.Module            # wrapped (DDP/FSDP/compiled) for training
    raw_model: FusionModel            # unwrapped, for state dicts and evaluation
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    loader: MultimodalLoader
    facts: dict                       # dataset sizes the model was built from (vocab, image size...)
    sources: list[Source]             # the datasets it trains on
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
            load_optimizer_state(self.optimizer, self.raw_model, state["optimizer"])
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
                           num_classes=max(2, facts["num_classes"]), classify=classify,
                           unimodal=classify and config.train.unimodal_weight > 0)
    except (RuntimeError, MemoryError) as e:
        if not out_of_memory(e):
            raise
        raise ConfigError("model.dim", f"the model does not fit in memory ({one_line(e, 160)}): lower model.dim, "
                          f"model.mlp_ratio or the layer counts") from None


def wrap(model: FusionModel, config: ExperimentConfig, d: Dist) -> torch.nn.Module:
    model.to(d.device)
    wrapped: torch.nn.Module = model
    if config.train.fsdp:       # NCCL on CUDA, gloo on CPU (where it is for checking, not for speed)
        from torch.distributed.fsdp import fully_shard
        wrapped = fully_shard(model)
    elif d.distributed:
        wrapped = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    return torch.compile(wrapped) if config.train.compile else wrapped


def setup(config: ExperimentConfig, d: Dist) -> TrainState:
    """Model, optimizer, scheduler and loader for ``config``, resumed from the run's newest checkpoint if any."""
    torch.manual_seed(config.train.seed)
    check_run_dir(config.train.run_dir)
    sources = resolve_sources(config.data, d)
    facts = dataset_facts([s.path for s in sources], labels_used=config.train.loss != "contrastive",
                          max_classes=config.model.max_classes)
    loader = train_loader(config, sources, d)
    if d.is_main:
        for source, catalog in zip(sources, loader.catalogs):
            print(f"data: {source.name}: {describe_split(catalog, config)}")
    model = build_model(config, facts)
    wrapped = wrap(model, config, d)   # before the optimizer: FSDP2 swaps parameters for sharded ones
    optimizer = adamw(model, config.optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    state = TrainState(wrapped, model, optimizer, scheduler, loader, facts, sources, sharded=config.train.fsdp)
    resume(state, config, d, [s.path for s in sources])
    return state


def drop_modalities(batch: dict, p: float) -> None:
    """Hide each present modality of each sample with probability ``p`` (its has_* flag cleared, as for a
    sample that lacks it), never every one of a sample's modalities. Uses torch's seeded generator, so a
    resumed run drops the same ones."""
    flags = [k for k in ("has_text", "has_image", "has_audio") if k in batch]
    if not flags:
        return
    present = torch.stack([batch[k] for k in flags], dim=1)
    keep = present & (torch.rand(present.shape, device=present.device) >= p)
    emptied = keep.sum(dim=1) == 0   # all hidden: keep one of the sample's modalities, drawn at random (always
    # the first would show text alone far more often than image or audio alone)
    drawn = (torch.rand(present.shape, device=present.device) * present).argmax(dim=1)
    one = torch.zeros_like(present)
    one[torch.arange(len(present)), drawn] = True
    keep = torch.where(emptied[:, None], present & one, keep)
    for i, k in enumerate(flags):
        batch[k] = keep[:, i]


def ddp_module(model: torch.nn.Module) -> torch.nn.parallel.DistributedDataParallel | None:
    """The DDP wrapper of a (possibly torch.compile'd) model, whose no_sync skips the gradient all-reduce
    of non-final micro-steps; None without DDP."""
    inner = getattr(model, "_orig_mod", model)   # torch.compile's wrapper keeps the module it compiled here
    return inner if isinstance(inner, torch.nn.parallel.DistributedDataParallel) else None


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
                raise DataError(f"every sample of {empty} batches in a row (an epoch) was skipped "
                                f"(data.loader.on_error=skip): the data cannot be read; the first reasons are "
                                f"above; run `mmdata verify {paths(state.sources)}`")
            batch = next(stream)
        wait += time.perf_counter() - t
        batch = move_to(batch, d.device)  # copy + normalisation count as step work
        if config.train.modality_dropout:
            drop_modalities(batch, config.train.modality_dropout)
        samples += len(batch["ids"])
        note_skipped(state, batch.get("skipped"))
        ddp = ddp_module(state.model)
        context = ddp.no_sync() if ddp is not None and micro < accum - 1 else torch.enable_grad()
        with context, autocast(config, d):
            losses = total_loss(state.model(batch), batch, config.train.loss, config.train.classify_weight,
                                config.train.unimodal_weight)
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


@torch.no_grad()
def evaluate(model: FusionModel, config: ExperimentConfig, sources: list[Source], device: torch.device,
             shown: list[str] | None = None) -> dict[str, float]:
    """Retrieval per modality pair, accuracy per modality subset and zero-shot accuracy on the held-out split,
    with chance levels. With several datasets: over all their held-out samples together, and each dataset's
    own metrics under "<name>/". With loader.on_error=skip, "skipped" counts the held-out samples left out;
    the first reasons are printed (``shown``: those printed so far in this run)."""
    model.eval()
    subsets = modality_subsets(tuple(model.encoders)) if model.classify else ()
    parts, skipped = {}, 0
    for source in sources:
        parts[source.name], left_out = held_out_outputs(model, config, source, device, subsets, shown)
        skipped += left_out
    extra = {"skipped": skipped} if config.data.loader.on_error == "skip" else {}
    names = {s.name: label_names(s.path) for s in sources}
    # zero-shot over all datasets together only where a class number names one class in all of them
    shared = names[sources[0].name] if all(n == names[sources[0].name] for n in names.values()) else []
    together = {k: [t for p in parts.values() for t in p.get(k, [])] for k in {k for p in parts.values() for k in p}}
    metrics = score(model, config, together, subsets, sources[0].path, shared, device)
    if len(sources) > 1:
        for s in sources:
            own = score(model, config, parts[s.name], subsets, s.path, names[s.name], device)
            metrics.update({f"{s.name}/{k}": v for k, v in own.items()})
    return {**metrics, **extra}


def held_out_outputs(model: FusionModel, config: ExperimentConfig, source: Source, device: torch.device,
                     subsets: tuple, shown: list[str] | None) -> tuple[dict[str, list], int]:
    """The model's embeddings, logits and the labels over one dataset's held-out split (lists of batch
    tensors by name), and how many of its samples were skipped."""
    parts: dict[str, list] = {"label": [], "has_label": [], "logits": []}
    skipped: set[str] = set()
    loader = eval_loader(config, source)
    try:
        with reading(source.path):
            for batch in loader:
                batch = move_to(batch, device)
                reasons = batch.get("skipped") or []
                # the last batch is padded with copies of samples, a bad one's included: count each sample once
                skipped.update(skipped_sample(r) for r in reasons)
                if shown is not None:
                    show_skip_reasons(shown, reasons)
                if not len(batch["ids"]):
                    continue
                out = model(batch, subsets=subsets)
                real = real_samples(batch)
                for m, e in out["embeddings"].items():
                    parts.setdefault(f"emb/{m}", []).append(e[real].float().cpu())
                    parts.setdefault(f"present/{m}", []).append(out["present"][m][real].cpu())
                if out["logits"] is not None:
                    parts["logits"].append(out["logits"][real].float().cpu())
                for subset, logits in out.get("subset_logits", {}).items():
                    parts.setdefault(subset, []).append(logits[real].float().cpu())
                parts["label"].append(batch["label"][real].cpu())
                parts["has_label"].append(batch["has_label"][real].cpu())
    finally:
        loader.close()
    return parts, len(skipped)


def score(model: FusionModel, config: ExperimentConfig, parts: dict[str, list], subsets: tuple, dataset: str,
          names: list[str], device: torch.device) -> dict[str, float]:
    """The metrics of held-out outputs (:func:`held_out_outputs`), zero-shot with the class ``names`` through
    ``dataset``'s tokenizer; {} when every sample was skipped."""
    from mmtrain.evaluate import evaluate_embeddings
    if not parts.get("label"):
        return {}
    cat = {k: torch.cat(v) for k, v in parts.items() if v}
    embeddings = {k[4:]: v for k, v in cat.items() if isinstance(k, str) and k.startswith("emb/")}
    present = {k[8:]: v for k, v in cat.items() if isinstance(k, str) and k.startswith("present/")}
    try:
        metrics = evaluate_embeddings(embeddings, present, cat.get("logits"), cat["label"], cat["has_label"],
                                      num_classes=model.head[-1].out_features if model.classify else 0,
                                      subset_logits={s: cat[s] for s in subsets if s in cat})
        if names and config.eval.prompts and "text" in model.encoders and len(embeddings) > 1:
            from mmtrain.zeroshot import class_embeddings, zero_shot_metrics
            classes = class_embeddings(model, dataset, names, config.eval.prompts, device).cpu()
            metrics.update(zero_shot_metrics(embeddings, present, cat["label"], cat["has_label"], classes))
    except ValueError as e:      # NaN/inf embeddings: the weights diverged after the last finite loss
        raise TrainingError(f"evaluation: {e}. Lower optim.lr, raise optim.warmup_steps or set optim.clip_grad"
                            ) from None
    return metrics


def paths(sources: list[Source]) -> str:
    """The datasets' directories, as arguments to one command (``mmdata verify A B``)."""
    return " ".join(s.path for s in sources)


def label_names(dataset: str) -> list[str]:
    """The dataset's class names in class order, or [] when its labels are bare numbers."""
    from mmdata import load_description
    labels = load_description(dataset).labels or {}
    return [name for name, _ in sorted(labels.items(), key=lambda item: item[1])]


def modality_subsets(modalities: tuple[str, ...]) -> tuple[tuple[str, ...], ...]:
    """Every non-empty subset of the model's modalities when it has two or more (for the fusion gain)."""
    if len(modalities) < 2:
        return ()
    from itertools import combinations
    return tuple(s for size in range(1, len(modalities) + 1) for s in combinations(modalities, size))


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
    """From state.step to train.steps, then the final checkpoint and evaluation; rank 0 writes the summary."""
    run_dir = Path(config.train.run_dir)
    facts, datasets = state.facts, paths(state.sources)
    if d.is_main:
        prepare_run_dir(run_dir, config, state.step)
    logger = Logger(run_dir, d.is_main)
    skipping = config.data.loader.on_error == "skip"
    stream = batches(state.loader)
    bar = tqdm(total=config.train.steps, initial=state.step, disable=not (config.train.progress and d.is_main),
               desc="train", unit="step", dynamic_ncols=True)
    try:
        with StopRequest(not d.distributed) as stop, reading(datasets):
            while state.step < config.train.steps:
                logs = train_step(state, stream, config, d)
                bar.update(1)
                bar.set_postfix(loss=f"{logs['loss']:.3f}", sps=f"{logs['samples_per_s']:.0f}",
                                wait=f"{logs['data_wait']:.0%}", refresh=False)
                if state.step % config.train.log_every == 0 or state.step == config.train.steps:
                    log_step(logger, state, logs, d, skipping)
                if (config.train.eval_every and state.step % config.train.eval_every == 0
                        and state.step < config.train.steps):
                    run_eval(state, config, d, logger)
                saved = maybe_checkpoint(state, config, d, facts)
                if stop.requested:
                    bar.close()
                    saved = saved or maybe_checkpoint(state, config, d, facts, force=True)
                    raise Interrupted(state.step, saved, saved)
            bar.close()
            # the final checkpoint before the final evaluation: an interrupted or failed evaluation loses no step
            maybe_checkpoint(state, config, d, facts, force=True)
        metrics = run_eval(state, config, d, logger)
        skipped = total_skipped(state, d) if skipping else None
    except (RuntimeError, MemoryError) as e:
        if not out_of_memory(e) or isinstance(e, TrainingError):
            raise
        raise TrainingError(out_of_memory_message(e, state.step + 1)) from None
    finally:
        bar.close()
        logger.close()
    state.loader.close()
    if d.is_main:
        finish(run_dir, metrics, skipped, datasets)
    return metrics


def eval_model(state: TrainState, config: ExperimentConfig, d: Dist) -> FusionModel | None:
    """The model rank 0 evaluates. Under FSDP2 each rank holds a shard of every parameter, and a forward pass
    on rank 0 alone would wait forever for the others' all-gathers: the full weights are gathered (every rank
    takes part) into an unsharded copy on rank 0."""
    if not state.sharded:
        return state.raw_model if d.is_main else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    full = get_model_state_dict(state.raw_model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not d.is_main:
        return None
    model = build_model(config, state.facts)
    model.load_state_dict(full)
    return model.to(d.device)


def run_eval(state: TrainState, config: ExperimentConfig, d: Dist, logger: Logger) -> dict:
    """Evaluate on rank 0 and log it at the current step; the other ranks wait for it at the barrier."""
    model = eval_model(state, config, d)
    metrics = evaluate(model, config, state.sources, d.device, state.skip_reasons) if d.is_main else {}
    logger.log(state.step, {f"eval/{k}": v for k, v in metrics.items()})
    barrier(d)
    return metrics
