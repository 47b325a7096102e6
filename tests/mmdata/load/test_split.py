"""The input's own train/eval split: a manifest's `split` column travels into the index (format v3) and the
sample's json, and the loader's train and eval splits follow it, falling back to the id hash where a row
names none."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from helpers import batch_ids, loader_config, preprocess_config
from mmdata import MultimodalLoader
from mmdata.config import ConfigError
from mmdata.prep.pipeline import preprocess

SPLITS = ["train"] * 12 + ["eval"] * 4 + ["val"] * 2 + ["test"] * 3 + [None] * 19   # 40 rows


@pytest.fixture(scope="module")
def split_dataset(tmp_path_factory) -> str:
    """40 captions whose input names its split (train, eval, val, test) for all but 19, plus 2 bad rows."""
    root = tmp_path_factory.mktemp("split")
    rows = [{"id": f"s{i:02d}", "text": f"caption number {i} of a small test set", "label": i % 2,
             **({"split": s} if s else {})} for i, s in enumerate(SPLITS)]
    rows += [{"id": "bad-number", "text": "a split that is a number", "split": 3},
             {"id": "bad-words", "text": "a split with spaces", "split": "hold out"}]
    manifest = root / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return preprocess(preprocess_config(manifest, root / "out", "output.samples_per_shard=16"),
                      log=lambda _: None).dataset


def ids_of(dataset: str, **overrides) -> set[str]:
    loader = MultimodalLoader(loader_config(dataset, batch_size=4, remainder="pad", shuffle=False,
                                            modalities=["text"], **overrides))
    return {i for batch in batch_ids(loader) for i in batch}


def named(*names) -> set[str]:
    return {f"s{i:02d}" for i, s in enumerate(SPLITS) if s in names}


def test_the_split_column_is_in_the_index_and_the_json_and_bad_names_are_rejected(split_dataset):
    index = pq.read_table(Path(split_dataset) / "index" / "shard-000000.parquet").to_pylist()
    assert [r["split"] for r in index] == SPLITS[:16]
    errors = [json.loads(line) for line in (Path(split_dataset) / "errors.jsonl").read_text().splitlines()]
    assert {(e["id"], e["reason"], e["action"]) for e in errors} == {("bad-number", "invalid_split", "rejected"),
                                                                    ("bad-words", "invalid_split", "rejected")}
    from mmdata.verify import check_dataset
    assert check_dataset(split_dataset).ok   # the json's split agrees with the index (verify compares them)
    import tarfile
    with tarfile.open(Path(split_dataset) / "shard-000001.tar") as tar:
        docs = [json.load(tar.extractfile(m)) for m in tar if m.name.endswith(".json")]
    assert [d["split"] for d in docs] == SPLITS[16:32]


def test_train_and_eval_follow_the_inputs_split_and_the_id_hash_elsewhere(split_dataset):
    train = ids_of(split_dataset, split="train", eval_fraction=0.3)
    held = ids_of(split_dataset, split="eval", eval_fraction=0.3)
    assert named("train") <= train and named("eval", "val") <= held and not train & held
    assert not named("test") & (train | held)          # neither: a test split stays untouched
    unnamed = named(None)
    assert train | held >= unnamed and 0 < len(held & unnamed) < len(unnamed)   # the hash split the rest
    assert ids_of(split_dataset) == named("train", "eval", "val", "test", None)  # split=all: every sample
    # which names count as eval is a setting: "test" held out, "val" now neither
    assert ids_of(split_dataset, split="eval", eval_fraction=0.3, eval_splits=["eval", "test"]) & named("test", "val") \
        == named("test")


def test_a_name_on_both_sides_is_refused():
    with pytest.raises(ConfigError, match="train_splits too") as e:
        loader_config("d", split="eval", eval_fraction=0.1, train_splits=["train", "Val"], eval_splits=["val"])
    assert e.value.key == "eval_splits"


def test_an_index_from_before_the_split_column_splits_by_id_hash(split_dataset, tmp_path):
    """A format v2 dataset: no split column, so every sample is split by its id's hash, as before."""
    copy = tmp_path / "v2"
    shutil.copytree(split_dataset, copy)
    doc = json.loads((copy / "dataset.json").read_text())
    (copy / "dataset.json").write_text(json.dumps({**doc, "format_version": 2}))
    for path in (copy / "index").glob("*.parquet"):
        pq.write_table(pq.read_table(path).drop_columns(["split"]), path)
    held = ids_of(str(copy), split="eval", eval_fraction=0.3)
    train = ids_of(str(copy), split="train", eval_fraction=0.3)
    assert not held & train and held | train == ids_of(str(copy)) and named("test") & (held | train)


def test_the_trainer_says_how_each_dataset_is_split(split_dataset):
    from helpers import experiment_config
    from mmdata.load.catalog import load_catalog, split_counts
    from mmtrain.data import describe_split
    catalog = load_catalog(split_dataset)
    counts = split_counts(catalog, 0.3, ["train"], ["eval", "val", "validation", "dev"])
    assert counts["named"] == 21 and counts["neither"] == 3 and counts["train"] + counts["eval"] == 37
    text = describe_split(catalog, experiment_config(split_dataset, "run", "data.eval_fraction=0.3"))
    assert text.startswith(f"{counts['train']} samples to train on, {counts['eval']} held out, 3 in neither")
    assert text.endswith("the input's split for 21 and by id hash (data.eval_fraction=0.3) for 19")
