"""Training curves: metrics JSONL -> one PNG with three panels.

metrics.jsonl (one JSON object per line, each with "step") -> series per key
-> (a) every "loss*" key, (b) "lr", (c) eval accuracy and each R@1 with its
chance level dashed in the same colour -> PNG written atomically (tmp +
os.replace), so a viewer refreshing the file never sees half an image.

Only draws: the text table of metrics lives in mmtrain.evaluate.format_metrics.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from mmdata.storage import temp_path


def plot_curves(metrics_jsonl: str | Path, out_png: str | Path) -> Path:
    """Draw the loss, learning-rate and evaluation panels of a run; return the PNG's path.

    Safe to call while training is still writing the file: missing keys
    leave a panel with a note (e.g. "no evaluation yet") and a half-written
    last line is ignored.
    """
    series = read_series(Path(metrics_jsonl))
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(render(series), out)
    return out


def plot_modalities(metrics: dict[str, float], out_png: str | Path) -> Path | None:
    """A bar per modality subset: the fusion head's accuracy shown only those modalities, the
    majority-class chance dashed across; None (nothing drawn) when the run has no subset accuracies."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    keys = [k for k in metrics if k.startswith("accuracy[") and "/" not in k.split("]")[-1]]
    if not keys:
        return None
    fig = Figure(figsize=(1.2 * len(keys) + 2, 4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    names = [k[len("accuracy["):-1].replace("+", " +\n") for k in keys]
    bars = ax.bar(names, [metrics[k] for k in keys], color="tab:blue")
    ax.bar_label(bars, fmt="%.2f", fontsize=8)
    chance = metrics.get(f"{keys[0]}/chance")
    if chance is not None:
        ax.axhline(chance, color="gray", linestyle="--", label=f"chance (majority class) {chance:.2f}")
    gain = metrics.get("fusion_gain")
    ax.set_title("accuracy by the modalities shown" + (f"; fusion gain {gain:+.2f}" if gain is not None else "")
                 + f" (n={int(metrics.get(f'{keys[0]}/n', 0))})", fontsize=10)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=8, loc="lower right")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    out = Path(out_png)
    write_atomically(buf.getvalue(), out)
    return out


def read_series(path: Path) -> dict[str, list[tuple[float, float]]]:
    """{key: [(step, value), ...]} for every numeric key; lines without "step" are skipped."""
    lines = path.read_text(encoding="utf-8").splitlines()
    series: dict[str, list[tuple[float, float]]] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(lines):  # the writer may be mid-line; the next plot will have it
                continue
            raise ValueError(f"{path}:{number}: not a JSON object: {e}") from e
        step = record.get("step")
        if not isinstance(step, (int, float)):
            continue
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                series.setdefault(key, []).append((step, value))
    return series


def render(series: dict[str, list[tuple[float, float]]]) -> bytes:
    """PNG bytes. A bare Figure + Agg canvas: no pyplot, no global backend switch."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(16, 4.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    loss_ax, lr_ax, eval_ax = fig.subplots(1, 3)
    draw_losses(loss_ax, series)
    draw_lr(lr_ax, series)
    draw_eval(eval_ax, series)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def draw_losses(ax, series: dict) -> None:
    keys = sorted(k for k in series if k.startswith("loss"))
    ax.set_title("(a) training loss")
    if not keys:
        return placeholder(ax, "no training losses yet")
    for key in keys:
        ax.plot(*zip(*series[key]), label=key, linewidth=1.2)
    values = [v for key in keys for _, v in series[key] if math.isfinite(v)]
    if values and min(values) > 0 and max(values) / min(values) > 100:
        ax.set_yscale("log")  # early losses would otherwise flatten the rest of the curve
    finish(ax)


def draw_lr(ax, series: dict) -> None:
    ax.set_title("(b) learning rate")
    if "lr" not in series:
        return placeholder(ax, "no learning rate logged")
    ax.plot(*zip(*series["lr"]), linewidth=1.2)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)


def draw_eval(ax, series: dict) -> None:
    """Accuracy and every R@1; each chance level dashed in its score's colour."""
    keys = [k for k in sorted(series) if k == "eval/accuracy" or (k.startswith("eval/") and k.endswith("/R@1"))]
    ax.set_title("(c) evaluation (dashed: chance)")
    if not keys:
        return placeholder(ax, "no evaluation yet")
    for key in keys:
        (line,) = ax.plot(*zip(*series[key]), marker="o", markersize=3, linewidth=1.2,
                          label=key.removeprefix("eval/"))
        if f"{key}/chance" in series:
            ax.plot(*zip(*series[f"{key}/chance"]), linestyle="--", linewidth=1, color=line.get_color())
    ax.set_ylim(0, 1.02)
    finish(ax)


def finish(ax) -> None:
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def placeholder(ax, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="gray")
    ax.set_xticks([])
    ax.set_yticks([])


def write_atomically(data: bytes, path: Path) -> None:
    """tmp file beside the target + os.replace: readers see the old PNG or the new one, never a torn one."""
    tmp = temp_path(path)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
