"""Contact sheet: a grid PNG of a few samples, for eyeballing a finished dataset.

dataset.json (per-shard sample counts) -> choose global positions ->
index parquet of only the shards involved -> seek + read each chosen
member straight from its tar by byte offset -> one cell per sample
(image, mel spectrogram, id + label, caption) -> PNG written atomically.

No tar is scanned: the index is what makes looking at sample 1,000,000 as
cheap as looking at sample 0.
"""

from __future__ import annotations

import io
import textwrap

import numpy as np
import pyarrow.parquet as pq

from mmdata import storage
from mmdata.dataset import DatasetDescription, DatasetError, load_description
from mmdata.schema import IMAGE_EXTS, MEL, TEXT

COLUMNS = 4
ID_CHARS = 28
CAPTION_WIDTH = 34
CAPTION_LINES = 3
# cell height ratios: image, mel spectrogram, caption
CELL_RATIOS = (3.0, 1.2, 0.9)


def contact_sheet(dataset: str, out: str, n: int = 16, seed: int = 0) -> None:
    """Draw n samples as a grid PNG: image, mel spectrogram, caption, id and label.

    ``seed=0`` shows the first ``n`` samples in shard order; any other seed a
    reproducible random choice. Asking for more samples than the dataset
    holds shows all of them. Missing modalities get a grey placeholder.
    """
    if n < 1:
        raise DatasetError(f"a contact sheet needs at least one sample; got n={n}")
    description = load_description(dataset)
    rows = pick_rows(description, n, seed)
    if not rows:
        raise DatasetError(f"{dataset} holds no samples to show")
    samples = read_samples(dataset, rows)
    storage.write_bytes(out, render(samples, description.label_names), {})


def pick_rows(description: DatasetDescription, n: int, seed: int) -> list[dict]:
    """Index rows of the chosen samples, in shard order.

    Positions are drawn from dataset.json's per-shard counts, so only the
    index files of shards that hold a chosen sample are read.
    """
    total = sum(s.samples for s in description.shards)
    k = min(n, total)
    positions = np.arange(k) if seed == 0 else np.sort(np.random.default_rng(seed).choice(total, k, replace=False))
    rows, start = [], 0
    for shard in description.shards:
        end = start + shard.samples
        wanted = positions[(positions >= start) & (positions < end)] - start
        if len(wanted):
            table = pq.read_table(io.BytesIO(storage.read_bytes(description.index_url(shard), {})),
                                  columns=["shard", "key", "id", "label", "members"])
            rows += table.take(wanted).to_pylist()
        start = end
    return rows


def read_samples(dataset: str, rows: list[dict]) -> list[dict]:
    """Decode the members a cell needs, one open file per shard."""
    samples, by_shard = [], {}
    for row in rows:
        by_shard.setdefault(row["shard"], []).append(row)
    for shard, shard_rows in by_shard.items():
        url = storage.join(dataset, shard)
        with open_binary(url) as f:
            samples += [decode_sample(url, row, read_members(f, row)) for row in shard_rows]
    return samples


def open_binary(url: str):
    if storage.is_local(url):
        return open(storage.local_path(url), "rb")
    fs, path = storage.filesystem(url, {})
    return fs.open(path, "rb")


def read_members(f, row: dict) -> dict[str, bytes]:
    """The members a cell draws, read by the index's byte offsets (no tar parsing)."""
    wanted = {TEXT, MEL, *IMAGE_EXTS}
    members = {}
    for m in row["members"]:
        if m["ext"] in wanted:
            f.seek(m["offset"])
            members[m["ext"]] = f.read(m["size"])
    return members


def decode_sample(url: str, row: dict, members: dict[str, bytes]) -> dict:
    from PIL import Image
    image_ext = next((e for e in IMAGE_EXTS if e in members), None)
    try:
        image = np.asarray(Image.open(io.BytesIO(members[image_ext])).convert("RGB")) if image_ext else None
        mel = np.load(io.BytesIO(members[MEL]), allow_pickle=False).astype(np.float32) if MEL in members else None
    except Exception as e:  # name the shard and key: `mmdata verify` can then say more
        raise DatasetError(f"{url}: sample {row['key']} does not decode: {e}") from e
    caption = members[TEXT].decode("utf-8", errors="replace") if TEXT in members else ""
    return {"id": row["id"], "label": row["label"], "image": image, "mel": mel, "caption": caption}


def render(samples: list[dict], label_names: dict[int, str]) -> bytes:
    """PNG bytes of the grid. Uses a bare Figure + Agg canvas: no pyplot, no global backend switch."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = min(COLUMNS, len(samples))
    grid_rows = -(-len(samples) // cols)
    fig = Figure(figsize=(3.2 * cols, 3.6 * grid_rows), dpi=100)
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(3 * grid_rows, cols, height_ratios=CELL_RATIOS * grid_rows,
                            left=0.02, right=0.98, top=0.96, bottom=0.02, hspace=0.25, wspace=0.12)
    for i, sample in enumerate(samples):
        r, c = divmod(i, cols)
        draw_cell(fig, [grid[3 * r + j, c] for j in range(3)], sample, label_names)
    buf = io.BytesIO()
    # no Software/version metadata: the same samples give the same bytes
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def draw_cell(fig, slots, sample: dict, label_names: dict[int, str]) -> None:
    image_ax, mel_ax, text_ax = (fig.add_subplot(slot) for slot in slots)
    for ax in (image_ax, mel_ax, text_ax):
        ax.set_xticks([])
        ax.set_yticks([])
    if sample["image"] is not None:
        image_ax.imshow(sample["image"])
        # grow the data limits, not shrink the box: titles stay level whatever the image's aspect
        image_ax.set_adjustable("datalim")
        image_ax.set_frame_on(False)
    else:
        placeholder(image_ax, "no image")
    if sample["mel"] is not None and sample["mel"].ndim == 2 and sample["mel"].size:
        mel_ax.imshow(sample["mel"], origin="lower", aspect="auto", cmap="magma")
    else:
        placeholder(mel_ax, "no audio")
    # ids and captions are data, not mathtext: a stray "$" must not break rendering
    image_ax.set_title(cell_title(sample, label_names), fontsize=8, parse_math=False)
    text_ax.axis("off")
    caption = textwrap.wrap(sample["caption"], CAPTION_WIDTH, max_lines=CAPTION_LINES, placeholder=" ...")
    text_ax.text(0, 1, "\n".join(caption) or "(no text)", fontsize=7, va="top", ha="left",
                 transform=text_ax.transAxes, parse_math=False)


def cell_title(sample: dict, label_names: dict[int, str]) -> str:
    sid = sample["id"] if len(sample["id"]) <= ID_CHARS else sample["id"][: ID_CHARS - 3] + "..."
    label = sample["label"]
    if label is None:
        return sid
    return f"{sid}  [{label_names.get(label, label)}]"


def placeholder(ax, message: str) -> None:
    ax.set_facecolor("0.85")
    ax.text(0.5, 0.5, message, ha="center", va="center", fontsize=8, color="0.35", transform=ax.transAxes)
