"""Training: each loss mode learns, checkpoints resume, bad configs and NaN losses stop cleanly."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import experiment_config, metrics_lines
from mmdata.config import ConfigError
from mmtrain import checkpoint
from mmtrain.distributed import setup
from mmtrain.trainer import TrainingError, train


def train_losses(run_dir) -> list[float]:
    return [line["loss"] for line in metrics_lines(run_dir) if "loss" in line]


@pytest.mark.parametrize("loss, modalities", [
    ("contrastive", "[text,image,audio]"),
    ("classify", "[text,image]"),
    ("both", "[text,image,audio]"),
])
def test_each_loss_mode_trains_and_its_loss_goes_down(demo_dataset, tmp_path, loss, modalities):
    config = experiment_config(demo_dataset, tmp_path, f"train.loss={loss}", f"data.loader.modalities={modalities}",
                               "train.steps=40")
    metrics = train(config, setup("cpu"))
    losses = train_losses(tmp_path)
    assert len(losses) == 40
    assert sum(losses[-8:]) / 8 < 0.85 * sum(losses[:8]) / 8, losses
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    if loss != "contrastive":
        assert "accuracy" in metrics and "accuracy/chance" in metrics
    else:
        assert "text->image/R@1" in metrics and "accuracy" not in metrics


def test_checkpoints_are_atomic_keep_the_last_k_and_resume(demo_dataset, tmp_path):
    config = experiment_config(demo_dataset, tmp_path, "train.checkpoint_every=4", "train.keep_last=2",
                               "train.steps=12")
    train(config, setup("cpu"))
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-00000008", "step-00000012"]
    state, meta = checkpoint.load(checkpoint.latest(tmp_path))
    assert meta["step"] == 12 and state["loader"]["epoch"] >= 1
    longer = experiment_config(demo_dataset, tmp_path, "train.checkpoint_every=4", "train.steps=16")
    train(longer, setup("cpu"))               # resumes at 12, runs 4 more
    steps = [line["step"] for line in metrics_lines(tmp_path) if "loss" in line]
    assert steps == list(range(1, 17))


def test_a_crashed_run_resumes_with_the_same_losses(demo_dataset, tmp_path, monkeypatch):
    import mmtrain.trainer as trainer
    args = ("train.steps=16", "train.checkpoint_every=4", "data.loader.num_workers=1")
    reference = tmp_path / "reference"
    train(experiment_config(demo_dataset, reference, *args), setup("cpu"))
    real_step = trainer.train_step

    def crash_at_10(state, *a, **kw):
        if state.step == 9:
            raise RuntimeError("simulated crash")
        return real_step(state, *a, **kw)
    monkeypatch.setattr(trainer, "train_step", crash_at_10)
    crashed = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(experiment_config(demo_dataset, crashed, *args), setup("cpu"))
    monkeypatch.setattr(trainer, "train_step", real_step)
    assert checkpoint.load(checkpoint.latest(crashed))[1]["step"] == 8
    train(experiment_config(demo_dataset, crashed, *args), setup("cpu"))
    assert train_losses(crashed) == pytest.approx(train_losses(reference), rel=1e-5)
    assert len(train_losses(crashed)) == 16


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(demo_dataset, tmp_path, monkeypatch):
    import mmtrain.trainer as trainer
    real = trainer.total_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        out = real(*args, **kwargs)
        if calls["n"] == 6:
            out["loss"] = out["loss"] * float("nan")
        return out
    monkeypatch.setattr(trainer, "total_loss", poisoned)
    config = experiment_config(demo_dataset, tmp_path, "train.checkpoint_every=2", "train.steps=10")
    with pytest.raises(TrainingError, match="loss is nan at step 6"):
        train(config, setup("cpu"))
    state, meta = checkpoint.load(checkpoint.latest(tmp_path))
    assert meta["step"] == 4
    assert all(torch.isfinite(v).all() for v in state["model"].values())


@pytest.mark.parametrize("overrides, key", [
    (["data.loader.batch_size=500"], "loader.batch_size"),
    (["data.loader.modalities=[text]", "train.loss=contrastive"], "data.loader.modalities"),
    (["model.patch_size=7"], "model.patch_size"),
    (["model.colour=red"], "model.colour"),
    (["train.loss=magic"], "train.loss"),
])
def test_configs_that_do_not_fit_the_data_fail_before_training(demo_dataset, tmp_path, overrides, key):
    with pytest.raises(ConfigError) as info:
        train(experiment_config(demo_dataset, tmp_path, *overrides), setup("cpu"))
    assert info.value.key == key
    assert not (tmp_path / "checkpoints").exists()


def test_eval_command_reevaluates_the_latest_checkpoint(demo_dataset, tmp_path, capsys):
    from mmtrain.cli import main
    train(experiment_config(demo_dataset, tmp_path, "train.steps=4"), setup("cpu"))
    capsys.readouterr()
    assert main(["eval", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "step 4" in out and "chance" in out and "accuracy" in out
    assert json.loads((tmp_path / "eval.json").read_text())["accuracy"] == pytest.approx(
        float(out.split("accuracy")[1].split()[0]), abs=1e-3)


def test_cnn_image_encoder_with_local_weights_and_grad_accumulation(demo_dataset, tmp_path):
    from mmtrain.data import dataset_facts
    from mmtrain.trainer import build_model
    config = experiment_config(demo_dataset, tmp_path / "a", "model.image_encoder=cnn", "train.steps=3",
                               "optim.grad_accum=2", "data.loader.modalities=[text,image]")
    model = build_model(config, dataset_facts([demo_dataset]))
    weights = tmp_path / "resnet.pt"
    torch.save(model.encoders["image"].state_dict(), weights)
    config = experiment_config(demo_dataset, tmp_path / "b", "model.image_encoder=cnn", "train.steps=3",
                               "optim.grad_accum=2", "data.loader.modalities=[text,image]",
                               f"model.image_weights={weights}")
    rebuilt = build_model(config, dataset_facts([demo_dataset]))
    for name, value in model.encoders["image"].state_dict().items():
        assert torch.equal(value, rebuilt.encoders["image"].state_dict()[name]), name
    train(config, setup("cpu"))
    lines = [m for m in metrics_lines(tmp_path / "b") if "loss" in m]
    assert [m["step"] for m in lines] == [1, 2, 3] and all(m["loss"] == m["loss"] for m in lines)
    from mmtrain.data import Source, train_loader
    per_epoch = len(train_loader(config, [Source("demo", demo_dataset)], setup("cpu")))
    loader = checkpoint.load(checkpoint.latest(tmp_path / "b"))[0]["loader"]
    assert loader["epoch"] * per_epoch + loader["consumed"] // 8 == 3 * 2   # 3 steps x 2 micro-batches


def test_resuming_with_another_tokenizer_fails_before_training(demo_dataset, tmp_path):
    train(experiment_config(demo_dataset, tmp_path, "train.steps=2"), setup("cpu"))
    meta_path = checkpoint.latest(tmp_path) / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "vocab_size": meta["vocab_size"] + 1}))  # as if trained elsewhere
    with pytest.raises(ConfigError, match="vocab size") as info:
        train(experiment_config(demo_dataset, tmp_path, "train.steps=4"), setup("cpu"))
    assert info.value.key == "data"


def test_resuming_after_the_shards_were_rebuilt_fails_and_names_the_old_dataset(demo_dataset, tmp_path):
    """A run whose data changed under it (an mm upgrade, a new input) must not resume on other samples."""
    from pathlib import Path
    train(experiment_config(demo_dataset, tmp_path, "train.steps=2"), setup("cpu"))
    path = checkpoint.latest(tmp_path) / "state.pt"
    state = torch.load(path, weights_only=True)
    state["loader"]["datasets"] = ["0123456789abcdef"]   # as if trained on shards since rebuilt
    torch.save(state, path)
    old = Path(demo_dataset).parent / f"{Path(demo_dataset).name.rpartition('-')[0]}-0123456789ab"
    for still_there in (False, True):
        if still_there:
            old.mkdir()
            (old / "dataset.json").write_text("{}")
        try:
            with pytest.raises(ConfigError, match="0123456789abcdef.*rebuilt") as info:
                train(experiment_config(demo_dataset, tmp_path, "train.steps=4"), setup("cpu"))
        finally:
            if still_there:
                (old / "dataset.json").unlink()
                old.rmdir()
        assert info.value.key == "train.run_dir" and "another train.run_dir" in str(info.value)
        assert (f"data.dataset={old}" in str(info.value)) == still_there
