"""The pieces behind mmtrain's one-line failures: checkpoint fallback, settings compared on resume, label
checks, loader errors from workers, metrics cut short, image weights, Ctrl-C between steps. (The command-level
behaviour, exit codes included, is tested in tests/hostile/test_trainer.py.)"""

from __future__ import annotations

import json
import os
import shutil
import signal

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from helpers import experiment_config
from mmdata.config import ConfigError, to_dict
from mmdata.dataset import DatasetError
from mmtrain import checkpoint
from mmtrain.failures import StopRequest, loader_reason, nan_message, skipped_sample, worker_failure
from mmtrain.resume import check_same_settings, trim_metrics


def save(run_dir, step: int, state: dict | None = None) -> None:
    checkpoint.save(run_dir, step, state if state is not None else {k: step for k in checkpoint.TRAINING_KEYS},
                    {"vocab_size": 1}, keep_last=10)


def test_load_latest_falls_back_past_unreadable_checkpoints_and_sets_them_aside(tmp_path):
    assert checkpoint.load_latest(tmp_path) is None
    for step in (2, 4, 6, 8):
        save(tmp_path, step)
    root = checkpoint.checkpoint_dir(tmp_path)
    (root / "step-00000008" / "state.pt").write_bytes(b"not a checkpoint")          # garbage
    save(tmp_path, 6, {"model": 6})                                                  # lacks what a resume needs
    warnings: list[str] = []
    path, state, meta = checkpoint.load_latest(tmp_path, warn=warnings.append, move_bad=True,
                                               required=checkpoint.TRAINING_KEYS)
    assert path.name == "step-00000004" and state["step"] == 4 and meta["step"] == 4
    assert len(warnings) == 2 and "step-00000008 cannot be read" in warnings[0]
    assert "it has no optimizer, scheduler, step, rng, loader" in warnings[1]
    assert all(w.endswith("using step-00000004 (step 4) instead") for w in warnings)
    assert sorted(p.name for p in root.iterdir()) == ["bad-step-00000006", "bad-step-00000008", "step-00000002",
                                                      "step-00000004"]
    assert checkpoint.latest(tmp_path).name == "step-00000004"     # pruning and saves see good ones only


def test_load_latest_without_a_good_checkpoint_moves_nothing_and_names_each(tmp_path):
    for step in (2, 4):
        save(tmp_path, step)
        (checkpoint.checkpoint_dir(tmp_path) / f"step-{step:08d}" / "meta.json").write_text("{")
    with pytest.raises(ConfigError, match=r"no checkpoint in .* can be read \(step-00000004, step-00000002; "
                                          r"the newest: JSONDecodeError") as info:
        checkpoint.load_latest(tmp_path, move_bad=True)
    assert info.value.key == "train.run_dir" and str(info.value).endswith("use another train.run_dir")
    assert sorted(p.name for p in checkpoint.checkpoint_dir(tmp_path).iterdir()) == ["step-00000002",
                                                                                     "step-00000004"]


def test_settings_that_shape_the_model_are_compared_and_the_rest_may_change(demo_dataset, tmp_path):
    saved = to_dict(experiment_config(demo_dataset, tmp_path))
    same = ["model.dropout=0.2", "model.temperature=0.1", "train.loss=classify", "optim.lr=0.01",
            "data.loader.batch_size=4", "model.cnn_arch=resnet50", "train.steps=99"]   # cnn_arch: a ViT run
    check_same_settings(tmp_path, saved, to_dict(experiment_config(demo_dataset, tmp_path, *same)))
    check_same_settings(tmp_path, None, to_dict(experiment_config(demo_dataset, tmp_path, "model.dim=64")))
    other = to_dict(experiment_config(demo_dataset, tmp_path, "model.dim=64", "model.mlp_ratio=4",
                                      "train.loss=contrastive"))
    with pytest.raises(ConfigError) as info:
        check_same_settings(tmp_path / "step-00000002", saved, other)
    assert info.value.key == "model.dim"
    assert str(info.value).startswith("model.dim: checkpoint 32, config 64; model.mlp_ratio: checkpoint 2.0, "
                                      "config 4.0; train.loss: checkpoint both, config contrastive (checkpoint ")


def test_a_loader_error_from_a_worker_comes_back_as_its_own_message():
    inner = "/d/shard-000003.tar sample 'demo-15': image member 'jpg' does not decode: bad\nsecond line"
    wrapped = ("Caught LoaderError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
               '  File "x.py", line 3, in f\n    raise LoaderError(reason)\n'
               f"mmdata.load.plan.LoaderError: {inner}\n")
    from mmdata import LoaderError
    expected = "/d/shard-000003.tar sample 'demo-15': image member 'jpg' does not decode: bad second line"
    assert loader_reason(LoaderError(wrapped)) == expected
    assert loader_reason(LoaderError(inner)) == expected
    assert skipped_sample(inner) == "/d/shard-000003.tar sample 'demo-15"


@pytest.mark.parametrize("message, says", [
    ("DataLoader worker (pid 12) is killed by signal: Bus error. It is possible that dataloader's workers are out "
     "of shared memory. Please try to raise your shared memory limit.", "truncated or rewritten while mapped"),
    ("DataLoader worker (pid 12) is killed by signal: Killed. ", "out of memory"),
    ("DataLoader timed out after 300 seconds", "data.loader.timeout_s"),
])
def test_a_dead_or_stalled_worker_is_one_line_with_its_likely_cause(message, says):
    line = worker_failure(message, "/d")
    assert "\n" not in line and says in line and line.startswith(message.split(".")[0].rstrip("."))


def test_trimming_metrics_drops_a_line_cut_short_and_lines_after_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2}\n{"step": 2}\n[1, 2]\n{"loss": 1}\n{"step": 3, "loss": 1}\n{"step": 2, "lo')
    trim_metrics(path, 2)
    assert path.read_text() == '{"step": 1, "loss": 2}\n{"step": 2}\n'


def relabel(dataset, tmp_path, value, names: bool = True):
    target = tmp_path / "dataset"
    shutil.copytree(dataset, target)
    index = sorted((target / "index").glob("*.parquet"))[0]
    table = pq.read_table(index)
    labels = table.column("label").to_pylist()
    labels[0] = value
    index.unlink()
    pq.write_table(table.set_column(table.schema.get_field_index("label"), "label", pa.array(labels, pa.int64())),
                   index)
    if not names:
        doc = json.loads((target / "dataset.json").read_text())
        (target / "dataset.json").write_text(json.dumps({**doc, "labels": None}))
    return str(target), table.column("key")[0].as_py()


def test_dataset_facts_refuses_negative_and_huge_labels_when_they_are_used(demo_dataset, tmp_path):
    from mmtrain.data import dataset_facts
    assert dataset_facts([demo_dataset])["num_classes"] == 6
    dataset, key = relabel(demo_dataset, tmp_path / "a", -1)      # a stored -1 is not a missing label
    with pytest.raises(DatasetError, match=rf"dataset {dataset}: sample '{key}' has label -1 in the index"):
        dataset_facts([dataset])
    assert dataset_facts([dataset], labels_used=False)["num_classes"] == 6
    dataset, key = relabel(demo_dataset, tmp_path / "b", 40, names=False)
    assert dataset_facts([dataset], max_classes=100)["num_classes"] == 41
    with pytest.raises(ConfigError, match=rf"labels up to 40 \(sample '{key}'\), so a head of 41 classes") as info:
        dataset_facts([dataset], max_classes=40)
    assert info.value.key == "model.max_classes"


def test_image_weights_that_do_not_fit_name_a_key_and_both_shapes(demo_dataset, tmp_path):
    from mmtrain.data import dataset_facts
    from mmtrain.trainer import build_model
    facts = dataset_facts([demo_dataset])
    weights = tmp_path / "vit.pt"
    torch.save(build_model(experiment_config(demo_dataset, tmp_path), facts).encoders["image"].state_dict(), weights)
    config = experiment_config(demo_dataset, tmp_path, "model.dim=64", f"model.image_weights={weights}")
    with pytest.raises(ConfigError, match=r"of another shape \(e\.g\. pos: file \[16, 32\], model \[16, 64\]\)") \
            as info:
        build_model(config, facts)
    assert info.value.key == "model.image_weights"
    build_model(experiment_config(demo_dataset, tmp_path, f"model.image_weights={weights}"), facts)   # it fits


def test_a_model_too_big_for_memory_is_a_config_error(demo_dataset, tmp_path, monkeypatch):
    import mmtrain.trainer as trainer
    from mmtrain.data import dataset_facts

    def too_big(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 12000000000000 bytes.")
    monkeypatch.setattr(trainer, "FusionModel", too_big)
    with pytest.raises(ConfigError, match="the model does not fit in memory .* lower model.dim") as info:
        trainer.build_model(experiment_config(demo_dataset, tmp_path), dataset_facts([demo_dataset]))
    assert info.value.key == "model.dim"


def test_nan_message_names_the_checkpoint_left_or_says_there_is_none(demo_dataset, tmp_path):
    config = experiment_config(demo_dataset, tmp_path, "train.checkpoint_every=5")
    assert "no checkpoint was written yet (train.checkpoint_every=5), so a rerun starts over" in \
        nan_message(float("nan"), 3, config)
    save(tmp_path, 5)
    message = nan_message(float("inf"), 7, config)
    assert message.startswith("loss is inf at step 7; stopping: the last good checkpoint, ")
    assert str(tmp_path / "checkpoints" / "step-00000005") in message and "optim.lr" in message


def test_the_first_ctrl_c_asks_for_a_stop_and_the_second_stops_at_once():
    before = signal.getsignal(signal.SIGINT)   # SIG_IGN where the suite runs in the background
    with StopRequest(True) as stop:
        assert signal.getsignal(signal.SIGINT) == stop._handle
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before
    with StopRequest(False):
        assert signal.getsignal(signal.SIGINT) is before


def test_format_metrics_prints_the_skipped_count_nowhere_as_a_score():
    from mmtrain.evaluate import format_metrics
    assert "skipped" not in format_metrics({"accuracy": 0.5, "accuracy/n": 10, "skipped": 3})


@pytest.mark.parametrize("signum, says", [
    (signal.SIGKILL, "rank 1 was killed by SIGKILL, most often the kernel's out-of-memory killer"),
    (signal.SIGSEGV, "rank 1 crashed in native code (SIGSEGV); run again with PYTHONFAULTHANDLER=1"),
    (signal.SIGABRT, "rank 1 crashed in native code (SIGABRT); run again with PYTHONFAULTHANDLER=1"),
    (signal.SIGTERM, "rank 1 was killed by SIGTERM, sent from outside this run; resume with the same command"),
])
def test_a_rank_killed_by_a_signal_is_told_what_that_signal_most_likely_means(signum, says):
    from mmtrain.cli import killed_message
    message = killed_message(1, signum)
    assert message.startswith(says)
    assert ("batch_size" in message) == (signum == signal.SIGKILL)   # memory advice only where it applies
