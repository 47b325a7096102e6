"""Training on several datasets at once (data.datasets): mixed by weight, evaluated together and each alone,
and refused, before any step, when they disagree on what one model is built for."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import experiment_config, preprocess_config
from mmdata.config import ConfigError, load_config
from mmtrain import checkpoint
from mmtrain.config import ExperimentConfig
from mmtrain.distributed import setup
from mmtrain.trainer import train


def build(manifest, root, *overrides: str) -> str:
    from mmdata.prep.pipeline import preprocess
    return preprocess(preprocess_config(manifest, root, "output.samples_per_shard=8", *overrides),
                      log=lambda _: None).dataset


@pytest.fixture(scope="module")
def second_dataset(demo_dir, demo_dataset, tmp_path_factory) -> str:
    """The demo samples again as a dataset named "second", tokenized with the first dataset's tokenizer."""
    return build(demo_dir / "manifest.jsonl", tmp_path_factory.mktemp("second"), "output.name=second",
                 f"text.tokenizer={Path(demo_dataset) / 'tokenizer.model'}")


def two_datasets(first: str, second: str, run_dir, *overrides: str) -> ExperimentConfig:
    return experiment_config(first, run_dir, "data.dataset=null",
                             f"data.datasets=[{{dataset: {first}, weight: 3}}, {{dataset: {second}}}]", *overrides)


def test_two_datasets_are_mixed_by_weight_and_evaluated_together_and_each_alone(demo_dataset, second_dataset,
                                                                                tmp_path, capsys):
    metrics = train(two_datasets(demo_dataset, second_dataset, tmp_path, "train.checkpoint_every=20"),
                    setup("cpu"))
    on_disk = json.loads((tmp_path / "eval.json").read_text())
    assert on_disk == pytest.approx(metrics)
    # each dataset under its name (dataset.json's: "t" and "second"), and all held-out samples together
    for key in ("accuracy", "text->image/class@1", "zero_shot[image]", "accuracy[audio]"):
        assert {key, f"t/{key}", f"second/{key}"} <= metrics.keys()
    assert metrics["accuracy/n"] == metrics["t/accuracy/n"] + metrics["second/accuracy/n"]
    assert metrics["text->image/n"] == metrics["t/text->image/n"] + metrics["second/text->image/n"]
    # weights 3:1 over 160 training samples (a draw per sample): the first dataset gave most of them
    counts = checkpoint.load(checkpoint.latest(tmp_path))[0]["loader"]["source_counts"]
    assert sum(counts) == 20 * 8 and counts[0] > 2 * counts[1]
    # `mmtrain eval` on the run directory reads both datasets again and reports the same
    from mmtrain.cli import main
    capsys.readouterr()
    assert main(["eval", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in printed.splitlines() if line.strip()}
    assert rows["dataset"][:3] == ["dataset", "n", "accuracy"]    # one line per dataset under the full table
    for name in ("t", "second"):
        assert rows[name][1:3] == [str(int(metrics[f"{name}/accuracy/n"])), f"{metrics[f'{name}/accuracy']:.3f}"]


@pytest.mark.parametrize("override, setting", [("image.size=16", "image.size"),
                                               ("text.vocab_size=100", "text.tokenizer sha256")])
def test_datasets_preprocessed_for_another_model_are_refused_naming_the_setting(demo_dir, demo_dataset, tmp_path,
                                                                                override, setting):
    overrides = [override] if setting == "text.tokenizer sha256" else \
        [override, f"text.tokenizer={Path(demo_dataset) / 'tokenizer.model'}"]
    other = build(demo_dir / "manifest.jsonl", tmp_path / "other", "output.name=other", *overrides)
    with pytest.raises(ConfigError) as e:
        train(two_datasets(demo_dataset, other, tmp_path / "run"), setup("cpu"))
    message = str(e.value)
    assert e.value.key == "data.datasets" and f"{setting} = " in message
    assert demo_dataset in message and other in message
    assert not (tmp_path / "run" / "metrics.jsonl").exists()   # refused before the first step


def test_datasets_that_name_their_classes_differently_are_refused_for_classification(demo_dir, demo_dataset,
                                                                                     tmp_path):
    from mmtrain.data import dataset_facts
    rows = [json.loads(line) for line in (demo_dir / "manifest.jsonl").read_text().splitlines()]
    manifest = tmp_path / "m.jsonl"
    relabelled = [{**r, "label": f"x-{r['label']}" if r.get("label") else r.get("label"),
                   **{k: str(demo_dir / r[k]) for k in ("image", "audio") if r.get(k)}} for r in rows]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in relabelled))
    other = build(manifest, tmp_path / "other", "output.name=other",
                  f"text.tokenizer={Path(demo_dataset) / 'tokenizer.model'}")
    with pytest.raises(ConfigError, match="name their classes differently"):
        dataset_facts([demo_dataset, other])
    assert dataset_facts([demo_dataset, other], labels_used=False) == dataset_facts([demo_dataset], labels_used=False)


def test_a_run_trained_on_one_dataset_does_not_resume_on_two(demo_dataset, second_dataset, tmp_path):
    train(experiment_config(demo_dataset, tmp_path, "train.steps=2", "train.checkpoint_every=2"), setup("cpu"))
    with pytest.raises(ConfigError) as e:
        train(two_datasets(demo_dataset, second_dataset, tmp_path, "train.steps=4"), setup("cpu"))
    assert e.value.key == "train.run_dir" and second_dataset in str(e.value) and "another train.run_dir" in str(e.value)


@pytest.mark.parametrize("datasets, key, words", [
    ("[{dataset: a, name: x}, {dataset: b, name: x}]", "data.datasets", "named 'x'"),
    ("[{dataset: a}, {dataset: b, weight: 0}]", "data.datasets[1].weight", "positive"),
    ("[{dataset: a, preprocess: p.yaml}]", "data.datasets[0].preprocess", "exactly one"),
    ("[{dataset: a, name: 'has space'}]", "data.datasets[0].name", "letters"),
])
def test_bad_dataset_lists_are_refused_naming_the_entry(datasets, key, words):
    with pytest.raises(ConfigError, match=words) as e:
        load_config(ExperimentConfig, None, [f"data.datasets={datasets}"])
    assert e.value.key == key


def test_two_datasets_with_one_name_need_names(demo_dataset, tmp_path):
    with pytest.raises(ConfigError, match="both named 't'.*data.datasets\\[1\\].name"):
        train(two_datasets(demo_dataset, demo_dataset, tmp_path), setup("cpu"))
