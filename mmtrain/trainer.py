"""Training: setup -> train() loop of train_step / evaluate / maybe_checkpoint -> plots and summary.

Everything a resumed run needs is in `TrainState` and saved in one
checkpoint: model, optimizer, scheduler, step, RNG state and the loader's
state (epoch + samples consumed), so a killed run continues with the very
batches, and therefore the very losses, an uninterrupted run would see.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from mmdata import ConfigError, MultimodalLoader, move_to
from mmdata.config import to_dict
from mmtrain import checkpoint
from mmtrain.config import ExperimentConfig
from mmtrain.data import data_changed_message, dataset_facts, eval_loader, resolve_dataset, train_loader
from mmtrain.distributed import Dist, barrier, mean_over_ranks
from mmtrain.losses import total_loss
from mmtrain.model import FusionModel, real_samples


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the last good checkpoint is intact."""


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
                "step": self.step, "rng": rng, "loader": self.loader.state_dict()}

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
    return FusionModel(config.model, modalities=modalities, vocab_size=facts["vocab_size"],
                       image_size=facts["image_size"], n_mels=facts["n_mels"],
                       num_classes=max(2, facts["num_classes"]), classify=classify)


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
    dataset = resolve_dataset(config.data, d)
    facts = dataset_facts(dataset)
    loader = train_loader(config, dataset, d)
    model = build_model(config, facts)
    wrapped = wrap(model, config, d)   # before the optimizer: FSDP2 swaps parameters for sharded ones
    o = config.optim
    optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    state = TrainState(wrapped, model, optimizer, scheduler, loader, facts, sharded=config.train.fsdp)
    found = checkpoint.latest(config.train.run_dir)
    if found is not None:
        saved, meta = checkpoint.load(found)
        trained_on, now = saved["loader"]["datasets"], loader.fingerprints()
        if trained_on != now:
            raise ConfigError("train.run_dir", data_changed_message(str(found), trained_on, dataset, now))
        if meta.get("vocab_size") != facts["vocab_size"]:
            raise ConfigError("data", f"checkpoint {found} was trained with vocab size {meta.get('vocab_size')}; "
                              f"this dataset's tokenizer has {facts['vocab_size']}: use another train.run_dir")
        state.load_state_dict(saved)
    return state


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
        wait += time.perf_counter() - t
        batch = move_to(batch, d.device)  # copy + normalisation count as step work
        samples += len(batch["ids"])
        sync = micro == accum - 1 or not isinstance(state.model, torch.nn.parallel.DistributedDataParallel)
        context = state.model.no_sync() if not sync else torch.enable_grad()
        with context, autocast(config, d):
            losses = total_loss(state.model(batch), batch, config.train.loss, config.train.classify_weight)
        if not torch.isfinite(losses["loss"]):
            raise TrainingError(f"loss is {losses['loss'].item()} at step {state.step + 1}; stopping. The last "
                                f"good checkpoint in {config.train.run_dir}/checkpoints is intact")
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
def evaluate(model: FusionModel, config: ExperimentConfig, dataset: str, device: torch.device) -> dict[str, float]:
    """Retrieval R@K per modality pair and accuracy on the held-out split, with chance levels."""
    from mmtrain.evaluate import evaluate_embeddings
    model.eval()
    parts: dict[str, list] = {"label": [], "has_label": [], "logits": []}
    loader = eval_loader(config, dataset)
    for batch in loader:
        batch = move_to(batch, device)
        out = model(batch)
        real = real_samples(batch)
        for m, e in out["embeddings"].items():
            parts.setdefault(f"emb/{m}", []).append(e[real].float().cpu())
            parts.setdefault(f"present/{m}", []).append(out["present"][m][real].cpu())
        if out["logits"] is not None:
            parts["logits"].append(out["logits"][real].float().cpu())
        parts["label"].append(batch["label"][real].cpu())
        parts["has_label"].append(batch["has_label"][real].cpu())
    loader.close()
    cat = {k: torch.cat(v) for k, v in parts.items() if v}
    embeddings = {k[4:]: v for k, v in cat.items() if k.startswith("emb/")}
    present = {k[8:]: v for k, v in cat.items() if k.startswith("present/")}
    return evaluate_embeddings(embeddings, present, cat.get("logits"), cat["label"], cat["has_label"],
                               num_classes=model.head[-1].out_features if model.classify else 0)


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


def maybe_checkpoint(state: TrainState, config: ExperimentConfig, d: Dist, facts: dict, force: bool = False) -> None:
    every = config.train.checkpoint_every
    if not force and (not every or state.step % every):
        return
    saved = state.state_dict()   # every rank: FSDP/DDP state gathering is collective
    if d.is_main:
        checkpoint.save(config.train.run_dir, state.step, saved,
                        {"vocab_size": facts["vocab_size"], "config": to_dict(config)}, config.train.keep_last)
    barrier(d)


def train(config: ExperimentConfig, d: Dist) -> dict[str, float]:
    """Train to config.train.steps (resuming from the run directory); returns the final eval metrics."""
    run_dir = Path(config.train.run_dir)
    state = setup(config, d)
    dataset, facts = state.loader.catalogs[0].dataset, state.facts
    if d.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
        trim_metrics(run_dir / "metrics.jsonl", state.step)
    logger = Logger(run_dir, d.is_main)
    stream = batches(state.loader)
    bar = tqdm(total=config.train.steps, initial=state.step, disable=not (config.train.progress and d.is_main),
               desc="train", unit="step", dynamic_ncols=True)
    while state.step < config.train.steps:
        logs = train_step(state, stream, config, d)
        bar.update(1)
        bar.set_postfix(loss=f"{logs['loss']:.3f}", sps=f"{logs['samples_per_s']:.0f}",
                        wait=f"{logs['data_wait']:.0%}", refresh=False)
        if state.step % config.train.log_every == 0 or state.step == config.train.steps:
            logger.log(state.step, mean_over_ranks(d, logs))
        if config.train.eval_every and state.step % config.train.eval_every == 0 and state.step < config.train.steps:
            run_eval(state, config, d, dataset, logger)
        maybe_checkpoint(state, config, d, facts)
    bar.close()
    metrics = run_eval(state, config, d, dataset, logger)
    maybe_checkpoint(state, config, d, facts, force=True)
    logger.close()
    state.loader.close()
    if d.is_main:
        finish(run_dir, metrics)
    return metrics


def run_eval(state: TrainState, config: ExperimentConfig, d: Dist, dataset: str, logger: Logger) -> dict:
    metrics = evaluate(state.raw_model, config, dataset, d.device) if d.is_main else {}
    logger.log(state.step, {f"eval/{k}": v for k, v in metrics.items()})
    barrier(d)
    return metrics


def trim_metrics(path: Path, step: int) -> None:
    """A resumed run rewrites what came after its checkpoint: drop those lines so curves don't double."""
    if path.exists():
        keep = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in keep))


def finish(run_dir: Path, metrics: dict[str, float]) -> None:
    from mmtrain.evaluate import format_metrics
    from mmtrain.plots import plot_curves
    plot_curves(run_dir / "metrics.jsonl", run_dir / "curves.png")
    (run_dir / "eval.json").write_text(json.dumps(metrics, indent=1, sort_keys=True))
    print(format_metrics(metrics))
    print(f"run directory {run_dir}: checkpoints/, metrics.jsonl, tensorboard/, curves.png, eval.json")
