"""What a run tells its user: warnings, metrics.jsonl + TensorBoard, skipped samples, the final summary."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from mmtrain.distributed import Dist, mean_over_ranks

if TYPE_CHECKING:       # trainer imports this module: the state's type only for annotations
    from mmtrain.trainer import TrainState

SKIP_REASONS_SHOWN = 3     # with loader.on_error=skip, the first reasons are printed; metrics.jsonl counts all


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


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


def log_step(logger: Logger, state: TrainState, logs: dict[str, float], d: Dist, skipping: bool) -> None:
    """A training step's values, averaged over ranks (collective); with ``skipping`` (loader.on_error=skip)
    also "skipped", the samples skipped so far on all ranks."""
    values = mean_over_ranks(d, {**logs, "skipped": float(state.skipped)} if skipping else logs)
    if skipping:     # a running count over all ranks, not a mean
        values["skipped"] = round(values["skipped"] * d.world_size)
    logger.log(state.step, values)


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


def total_skipped(state: TrainState, d: Dist) -> int:
    """Samples skipped so far on all ranks (collective)."""
    return round(mean_over_ranks(d, {"skipped": float(state.skipped)})["skipped"] * d.world_size)


def finish(run_dir: Path, metrics: dict[str, float], skipped: int | None = None, dataset: str = "") -> None:
    """The end of a run (rank 0): curves.png and eval.json written, the metrics and where they are printed."""
    from mmtrain.evaluate import format_metrics
    from mmtrain.plots import plot_curves, plot_modalities
    plot_curves(run_dir / "metrics.jsonl", run_dir / "curves.png")
    bars = plot_modalities(metrics, run_dir / "modalities.png")
    (run_dir / "eval.json").write_text(json.dumps(metrics, indent=1, sort_keys=True))
    print(format_metrics(metrics))
    if skipped is not None:
        in_eval = int(metrics.get("skipped", 0))
        hint = f"; `mmdata verify {dataset}` finds them all" if skipped or in_eval else ""
        print(f"skipped samples: {skipped} in training, {in_eval} in evaluation (data.loader.on_error=skip{hint})")
    print(f"run directory {run_dir}: checkpoints/, metrics.jsonl, tensorboard/, curves.png, "
          f"{'modalities.png, ' if bars else ''}eval.json")
