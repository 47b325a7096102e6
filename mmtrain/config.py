"""The experiment config: data (which shards, how to load them), model, optimiser, training loop.

    # mmtrain train pipelines/train.yaml [key=value ...]
    data:   preprocess config to build/reuse shards (or a dataset directory), loader settings
    model:  ModelConfig (mmtrain/model.py)
    optim:  AdamW + warmup/cosine
    train:  steps, eval/checkpoint cadence, run_dir, device, precision
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from mmdata import LoaderConfig
from mmdata.config import ConfigError, require, require_choice
from mmtrain.model import ModelConfig


@dataclass
class SourceConfig:
    """One dataset of several (``data.datasets``): built or reused from a preprocess config, or given."""
    preprocess: str | None = None
    preprocess_overrides: list[str] = field(default_factory=list)
    dataset: str | None = None
    weight: float = 1.0             # share of training batches, relative to the other datasets'
    name: str | None = None         # how evaluation names it; default: the dataset's name (dataset.json)

    def validate(self) -> None:
        require((self.preprocess is None) != (self.dataset is None), "preprocess",
                "give exactly one of preprocess or dataset")
        require(0 < self.weight < float("inf"), "weight", f"must be positive and finite; got {self.weight}")
        require(self.name is None or SOURCE_NAME.fullmatch(self.name) is not None, "name",
                f"must be 1-64 letters, digits, '_', '-' or '.'; got {self.name!r}")


SOURCE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


@dataclass
class DataConfig:
    preprocess: str | None = None   # a preprocess YAML: its shards are built, or reused when they exist
    preprocess_overrides: list[str] = field(default_factory=list)
    dataset: str | None = None      # or an existing dataset directory (local path or URL)
    datasets: list[SourceConfig] = field(default_factory=list)  # or several, mixed by weight
    eval_fraction: float = 0.1      # held out by a hash of the id, of samples whose input names no split
    eval_batch_size: int = 128
    loader: LoaderConfig = field(default_factory=LoaderConfig)  # its `datasets` is filled in from the above

    def validate(self) -> None:
        given = sum([self.preprocess is not None, self.dataset is not None, bool(self.datasets)])
        require(given == 1, "preprocess", "give exactly one of data.preprocess, data.dataset or data.datasets")
        for i, source in enumerate(self.datasets):
            try:
                source.validate()
            except ConfigError as e:
                raise ConfigError(f"datasets[{i}].{e.key}", e.detail) from None
        names = [s.name for s in self.datasets if s.name is not None]
        duplicate = next((n for n in names if names.count(n) > 1), None)
        require(duplicate is None, "datasets", f"two datasets are named {duplicate!r}; give each its own name")
        require(0 < self.eval_fraction < 1, "eval_fraction", f"must be in (0, 1); got {self.eval_fraction}")
        require(self.eval_batch_size > 0, "eval_batch_size", "must be positive")

    def sources(self) -> list[SourceConfig]:
        """The datasets to train on: ``datasets``, or the one that ``preprocess``/``dataset`` names."""
        return self.datasets or [SourceConfig(self.preprocess, list(self.preprocess_overrides), self.dataset)]


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    warmup_steps: int = 50
    min_lr_ratio: float = 0.05      # cosine decays to lr * this
    clip_grad: float = 1.0          # 0 = off
    grad_accum: int = 1

    def validate(self) -> None:
        require(0 < self.lr < float("inf"), "lr", f"must be positive and finite; got {self.lr}")
        require(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas", "must be two values in [0, 1)")
        require(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        require(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]")
        require(self.clip_grad >= 0, "clip_grad", "must be >= 0")
        require(self.grad_accum >= 1, "grad_accum", "must be >= 1")


@dataclass
class TrainConfig:
    run_dir: str = "runs/demo"      # checkpoints, metrics.jsonl, TensorBoard, plots; a rerun resumes here
    steps: int = 300                # optimiser steps
    loss: str = "both"              # contrastive | classify | both
    classify_weight: float = 1.0
    # with a classification loss: weight of a linear classifier on each modality's own pooled vector, so that
    # each encoder learns the classes even where another modality (captions that name them) is easier
    unimodal_weight: float = 0.0
    # per sample and modality, the chance that training hides it (one is always kept): the fusion head then
    # sees single modalities and pairs, as evaluation shows it each subset and real data lacks some
    modality_dropout: float = 0.0
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100           # 0 = only at the end
    checkpoint_every: int = 100
    keep_last: int = 3
    device: str = "auto"            # auto | cpu | cuda
    precision: str = "auto"         # auto (bf16 autocast on CUDA) | fp32 | bf16
    compile: bool = False           # torch.compile the model
    fsdp: bool = False              # FSDP2 fully_shard instead of DDP
    progress: bool = True

    def validate(self) -> None:
        require(self.steps > 0, "steps", f"must be positive; got {self.steps}")
        require(0 <= self.classify_weight < float("inf"), "classify_weight",
                f"must be >= 0 and finite; got {self.classify_weight}")
        require(0 <= self.unimodal_weight < float("inf"), "unimodal_weight",
                f"must be >= 0 and finite; got {self.unimodal_weight}")
        require_choice(self.loss, "loss", ("contrastive", "classify", "both"))
        require(0 <= self.modality_dropout < 1, "modality_dropout",
                f"must be in [0, 1); got {self.modality_dropout}")
        require(self.log_every > 0, "log_every", "must be positive")
        require(self.eval_every >= 0, "eval_every", f"must be >= 0; got {self.eval_every}")
        require(self.checkpoint_every >= 0, "checkpoint_every", f"must be >= 0; got {self.checkpoint_every}")
        require(self.keep_last >= 1, "keep_last", "must be at least 1")
        require_choice(self.device, "device", ("auto", "cpu", "cuda"))
        require_choice(self.precision, "precision", ("auto", "fp32", "bf16"))


@dataclass
class EvalConfig:
    # zero-shot classification: each class embedded through these prompts ({} = the label's name from
    # dataset.json), images and audio classified by the nearest; empty: no zero-shot
    prompts: list[str] = field(default_factory=lambda: ["{}", "a {}", "a picture of a {}", "the sound of a {}"])

    def validate(self) -> None:
        require(all(isinstance(p, str) and "{}" in p for p in self.prompts), "prompts",
                f"each must be a string holding {{}} for the class name; got {self.prompts}")


@dataclass
class ExperimentConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> None:
        """The loader keys the trainer sets itself are refused when set otherwise, never silently replaced."""
        loader, default = self.data.loader, LoaderConfig()
        require(loader.seed in (default.seed, self.train.seed), "data.loader.seed",
                f"is the trainer's train.seed ({self.train.seed}), which orders the data and seeds the model; "
                f"set train.seed={loader.seed} instead")
        require(loader.eval_fraction in (default.eval_fraction, self.data.eval_fraction), "data.loader.eval_fraction",
                f"is data.eval_fraction ({self.data.eval_fraction}); set data.eval_fraction={loader.eval_fraction} "
                "instead")
        require(loader.split == default.split, "data.loader.split",
                "is chosen by the trainer (train to train, eval to evaluate); leave it out and set "
                "data.eval_fraction")
