"""Contact sheet: samples picked through the index, members read by byte offset, a real PNG out."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmdata.dataset import DatasetError, ShardInfo, TokenizerInfo, Totals, description_json, load_description
from mmdata.shards import ShardWriter
from mmdata.show import contact_sheet, pick_rows, read_samples

LABELS = {"circle": 0, "square": 1}
# (id, caption, image size or None, mel frames or None, label); two shards of three
SAMPLES = [
    [("s-0", "a red circle on the left", (40, 30), 20, 0),
     ("s-1", "costs $5 and $ signs are not mathtext", None, 12, 1),
     ("an/odd id with spaces.and.dots and a very long tail", "no audio here " * 10, (24, 48), None, 1)],
    [("s-3", "", (32, 32), 8, 0),
     ("s-4", "only text", None, None, None),
     ("s-5", "a blue square", (50, 20), 30, 1)],
]


def encode_sample(sid: str, caption: str, size, frames, label, row: int, rng) -> dict[str, bytes]:
    doc = {"id": sid, "row": row, "label": label, "meta": {}, "text": {"chars": len(caption)}}
    members = {"txt": caption.encode()}
    if size is not None:
        pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG")
        members["jpg"] = buf.getvalue()
        doc["image"] = {"width": size[0], "height": size[1]}
    if frames is not None:
        buf = io.BytesIO()
        np.save(buf, rng.normal(size=(16, frames)).astype(np.float16), allow_pickle=False)
        members["mel.npy"] = buf.getvalue()
        doc["audio"] = {"duration": frames / 100, "sample_rate": 16000}
    if label is not None:
        members["cls"] = str(label).encode()
    members["json"] = json.dumps(doc).encode()
    return members


def index_columns(sid: str, caption: str, size, frames, label, row: int) -> dict:
    return {"id": sid, "row": row, "label": label, "has_text": True, "has_image": size is not None,
            "has_audio": frames is not None, "n_tokens": len(caption.split()),
            "image_width": size[0] if size else None, "image_height": size[1] if size else None,
            "audio_frames": frames}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ds")
    rng = np.random.default_rng(0)
    shards, row = [], 0
    for partition, samples in enumerate(SAMPLES):
        writer = ShardWriter(out, partition)
        for sample in samples:
            writer.write(f"k{row}", encode_sample(*sample, row, rng), index_columns(*sample, row))
            row += 1
        shards += writer.close()
    shards = [ShardInfo(**s, partition=i, fingerprint="f") for i, s in enumerate(shards)]
    tokenizer = TokenizerInfo("tokenizer.model", "0", 64, True, 1, 2, 0)
    config = {"image": {"size": 32}, "audio": {"n_mels": 16, "sample_rate": 16000}}
    description = description_json("t", "f", config, {}, LABELS, tokenizer, shards,
                                    Totals(written=row, shards=len(shards)), {})
    (out / "dataset.json").write_text(json.dumps(description))
    return out


ALL_IDS = [s[0] for shard in SAMPLES for s in shard]


def open_png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))


def test_sheet_is_a_non_blank_png_written_atomically(dataset, tmp_path):
    out = tmp_path / "sheet.png"
    contact_sheet(str(dataset), str(out), n=6)
    pixels = open_png(out)
    assert pixels.shape[1] > 300 and pixels.shape[0] > 300
    assert pixels.std() > 20, "sheet looks blank"
    assert [p.name for p in tmp_path.iterdir()] == ["sheet.png"], "temporary file left behind"


def test_more_than_available_shows_all(dataset, tmp_path):
    description = load_description(str(dataset))
    assert [r["id"] for r in pick_rows(description, 50, seed=0)] == ALL_IDS
    assert sorted(r["id"] for r in pick_rows(description, 50, seed=3)) == sorted(ALL_IDS)
    contact_sheet(str(dataset), str(tmp_path / "all.png"), n=50, seed=3)
    contact_sheet(str(dataset), str(tmp_path / "six.png"), n=6)
    contact_sheet(str(dataset), str(tmp_path / "four.png"), n=4)
    assert open_png(tmp_path / "all.png").shape == open_png(tmp_path / "six.png").shape
    assert open_png(tmp_path / "all.png").shape[0] > open_png(tmp_path / "four.png").shape[0]


def test_seed_zero_takes_the_first_and_other_seeds_a_reproducible_choice(dataset):
    description = load_description(str(dataset))
    assert [r["id"] for r in pick_rows(description, 4, seed=0)] == ALL_IDS[:4]
    chosen = [[r["id"] for r in pick_rows(description, 3, seed=s)] for s in (1, 1, 2, 5, 7)]
    assert chosen[0] == chosen[1]
    assert all(len(set(ids)) == 3 and set(ids) <= set(ALL_IDS) for ids in chosen)
    assert len({tuple(ids) for ids in chosen}) > 1, "different seeds should pick differently"


def test_members_read_by_offset_match_what_was_written(dataset):
    description = load_description(str(dataset))
    samples = read_samples(str(dataset), pick_rows(description, 6, seed=0))
    for sample, (sid, caption, size, frames, label) in zip(samples, [s for shard in SAMPLES for s in shard]):
        assert (sample["id"], sample["caption"], sample["label"]) == (sid, caption, label)
        assert (sample["image"] is None) == (size is None)
        if size is not None:
            assert sample["image"].shape == (size[1], size[0], 3)
        assert (sample["mel"] is None if frames is None else sample["mel"].shape == (16, frames))


def test_same_samples_give_the_same_bytes(dataset, tmp_path):
    contact_sheet(str(dataset), str(tmp_path / "a.png"), n=5, seed=2)
    contact_sheet(str(dataset), str(tmp_path / "b.png"), n=5, seed=2)
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


@pytest.mark.parametrize("n", [0, -1])
def test_n_below_one_is_an_error(dataset, tmp_path, n):
    with pytest.raises(DatasetError, match="at least one"):
        contact_sheet(str(dataset), str(tmp_path / "x.png"), n=n)
    assert not (tmp_path / "x.png").exists()


def test_not_a_dataset_is_an_error(tmp_path):
    with pytest.raises(DatasetError, match="dataset.json"):
        contact_sheet(str(tmp_path), str(tmp_path / "x.png"))
