"""dataset.json as one typed description: read and checked once, errors that name the file and the key."""

from __future__ import annotations

import json
import shutil

import pytest

from mmdata.dataset import DatasetDescription, DatasetError, Totals, load_description
from mmdata.schema import FORMAT_VERSION


def test_the_description_holds_what_readers_need(demo_dataset):
    d = load_description(demo_dataset)
    doc = json.loads(open(f"{demo_dataset}/dataset.json").read())
    assert (d.image_size, d.n_mels, d.sample_rate) == (32, 32, 16000)       # tests/helpers.preprocess_config
    assert (d.tokenizer.vocab_size, d.tokenizer.pad_id) == (doc["tokenizer"]["vocab_size"], doc["tokenizer"]["pad_id"])
    assert 0 < d.tokenizer.vocab_size <= 128 and d.tokenizer.trained
    assert d.fingerprint == doc["fingerprint"] and d.name == "t" and d.format_version == FORMAT_VERSION
    assert [s.name for s in d.shards] == [s["name"] for s in doc["shards"]]
    assert sum(s.samples for s in d.shards) == d.totals.written == doc["totals"]["written"]
    assert d.label_names == {i: name for name, i in (doc["labels"] or {}).items()}
    assert d.index_url(d.shards[1]).endswith("/index/shard-000001.parquet")
    assert d.shard_url(d.shards[1]) == f"{demo_dataset}/shard-000001.tar"


def test_the_writer_and_the_reader_agree(demo_dataset):
    from mmdata.dataset import description_json
    from dataclasses import asdict
    d = load_description(demo_dataset)
    doc = description_json(d.name, d.fingerprint, d.config, d.source, d.labels, d.tokenizer, list(d.shards),
                           d.totals, d.versions, d.config_fingerprint, d.lineage)
    assert d.config_fingerprint and set(d.lineage) == {"text", "image", "audio", "waveform"}
    assert asdict(DatasetDescription.from_json(doc, demo_dataset)) == asdict(d)


@pytest.mark.parametrize("damage, key", [
    (lambda doc: doc["config"]["image"].pop("size"), "config.image.size"),
    (lambda doc: doc["tokenizer"].update(pad_id="3"), "tokenizer.pad_id"),
    (lambda doc: doc["shards"][2].pop("bytes"), "shards[2].bytes"),
    (lambda doc: doc["totals"].update(written=True), "totals.written"),
    (lambda doc: doc.update(labels=[1, 2]), "labels"),
    (lambda doc: doc.update(labels={"cat": "0"}), "labels"),
    (lambda doc: doc["totals"]["errors_by_reason"].update(bad_row=None), "totals.errors_by_reason"),
    (lambda doc: doc["shards"][1].update(name="../../elsewhere/shard-000001.tar"), "shards[1].name"),
    (lambda doc: doc["shards"][2].update(name=doc["shards"][0]["name"]), "shards[2].name"),
    (lambda doc: doc["tokenizer"].update(file="/etc/passwd"), "tokenizer.file"),
])
def test_a_damaged_field_is_named(demo_dataset, tmp_path, damage, key):
    copy = tmp_path / "copy"
    shutil.copytree(demo_dataset, copy)
    doc = json.loads((copy / "dataset.json").read_text())
    damage(doc)
    (copy / "dataset.json").write_text(json.dumps(doc))
    with pytest.raises(DatasetError, match=rf"dataset.json: {key.replace('[', '.').replace(']', '.')} must be"):
        load_description(str(copy))


def test_incomplete_unparsable_and_other_versions_are_refused(demo_dataset, tmp_path):
    with pytest.raises(DatasetError, match="dataset.json is missing"):
        load_description(str(tmp_path))
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(DatasetError, match="not valid JSON"):
        load_description(str(tmp_path))
    doc = json.loads(open(f"{demo_dataset}/dataset.json").read())
    for version in (FORMAT_VERSION + 1, 0, True, "2", None):
        (tmp_path / "dataset.json").write_text(json.dumps({**doc, "format_version": version}))
        with pytest.raises(DatasetError, match=f"dataset.json has format version {version!r}; this mmdata reads "
                                               "versions 1, 2"):
            load_description(str(tmp_path))


@pytest.mark.parametrize("version", [1, 2, 3])
def test_every_readable_format_version_is_read_and_recorded(demo_dataset, tmp_path, version):
    copy = tmp_path / "copy"
    shutil.copytree(demo_dataset, copy)
    doc = json.loads((copy / "dataset.json").read_text())
    assert doc["format_version"] == FORMAT_VERSION == 3        # what preprocessing writes
    (copy / "dataset.json").write_text(json.dumps({**doc, "format_version": version}))
    assert load_description(str(copy)).format_version == version


def test_totals_add_up_and_keep_counts_sorted():
    a = Totals(3, 2, 1, 100, 1, {"text": 2, "image": 1}, {"corrupt_image": 1})
    b = Totals(4, 4, 0, 50, 2, {"audio": 4, "text": 1}, {})
    total = sum([a, b], start=Totals())
    assert (total.samples_in, total.written, total.rejected, total.bytes, total.shards) == (7, 6, 1, 150, 3)
    assert total.modalities == {"audio": 4, "image": 1, "text": 3}
    assert list(total.modalities) == sorted(total.modalities) and total.errors_by_reason == {"corrupt_image": 1}
    assert total.error_rate == pytest.approx(1 / 7) and Totals().error_rate == 0.0
