"""`mmtrain` against hostile configs, damaged datasets, damaged run directories and signals: every failure is
one line naming the key, file or sample and saying what to do, with the documented exit code (0 done, 1
training stopped, 2 bad config/dataset/run directory, 3 a sample or shard that cannot be read, 130
interrupted), and never a traceback. Damage is done to copies of the session's demo dataset (its shard files
are hard links into the preprocessing store: never modify them in place)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from helpers import metrics_lines
from mmtrain.cli import main

REPO = Path(__file__).parents[2]
BASE = ["data.eval_fraction=0.2", "data.loader.batch_size=8", "data.loader.num_workers=0",
        "model.dim=32", "model.heads=2", "model.embed_dim=32", "model.patch_size=8",
        "model.text_layers=1", "model.image_layers=1", "model.audio_layers=1", "model.fusion_layers=1",
        "optim.lr=0.003", "optim.warmup_steps=2", "train.steps=4", "train.eval_every=0",
        "train.checkpoint_every=0", "train.log_every=1", "train.progress=false"]


@pytest.fixture()
def experiment(tmp_path) -> Path:
    path = tmp_path / "experiment.yaml"
    path.write_text("{}\n")
    return path


def train_argv(experiment: Path, dataset, run_dir, *overrides: str) -> list[str]:
    return ["train", str(experiment), *BASE, f"data.dataset={dataset}", f"train.run_dir={run_dir}", *overrides]


def run(capsys, argv: list[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of the mmtrain command, in this process."""
    code = main(argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def error_line(err: str) -> str:
    """The one error line of a failed run (warnings may come before it, nothing after it)."""
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    return errors[0]


def copy_dataset(demo_dataset: str, target: Path) -> Path:
    shutil.copytree(demo_dataset, target)     # new files: the original's shards stay untouched
    return target


def rewrite(path: Path, data: bytes) -> None:
    path.unlink()   # never write through a hard link
    path.write_bytes(data)


def corrupt_images(dataset: Path, every: int = 3) -> list[str]:
    """Zero the JPEG/PNG member of every ``every``-th sample; returns their keys."""
    keys, rows = [], 0
    for index in sorted((dataset / "index").glob("*.parquet")):
        table = pq.read_table(index).to_pylist()
        for row in table:
            rows += 1
            image = [m for m in row["members"] if m["ext"] in ("jpg", "png")]
            if image and rows % every == 0:
                shard = dataset / row["shard"]
                data = bytearray(shard.read_bytes())
                data[image[0]["offset"]: image[0]["offset"] + image[0]["size"]] = bytes(image[0]["size"])
                rewrite(shard, bytes(data))
                keys.append(row["key"])
    return keys


def set_label(dataset: Path, value: int, names: bool = True) -> str:
    """Give the second sample of the first index ``value`` as its label; returns its key."""
    index = sorted((dataset / "index").glob("*.parquet"))[0]
    table = pq.read_table(index)
    labels = table.column("label").to_pylist()
    labels[1] = value
    table = table.set_column(table.schema.get_field_index("label"), "label", pa.array(labels, pa.int64()))
    index.unlink()
    pq.write_table(table, index)
    if not names:     # integer labels: dataset.json names none, the largest label sets the class count
        doc = json.loads((dataset / "dataset.json").read_text())
        (dataset / "dataset.json").write_text(json.dumps({**doc, "labels": None}))
    return table.column("key")[1].as_py()


@pytest.fixture(scope="module")
def corrupt_dataset(demo_dataset, tmp_path_factory) -> tuple[Path, list[str]]:
    target = copy_dataset(demo_dataset, tmp_path_factory.mktemp("corrupt") / "dataset")
    return target, corrupt_images(target)


# -- configs that cannot work: exit 2 before any training, one line naming the key

def not_weights(tmp_path: Path) -> str:
    (tmp_path / "weights.pt").write_text("these are not weights")
    return str(tmp_path / "weights.pt")


def wrong_weights(tmp_path: Path) -> str:
    torch.save({"conv.weight": torch.zeros(3, 3)}, tmp_path / "other.pt")
    return str(tmp_path / "other.pt")


def a_file(tmp_path: Path) -> str:
    (tmp_path / "file").write_text("x")
    return str(tmp_path / "file")


BAD_CONFIGS = {
    "run_dir is a file": (lambda t: [f"train.run_dir={a_file(t)}"], "train.run_dir", "is a file"),
    "run_dir under a file": (lambda t: [f"train.run_dir={a_file(t)}/run"], "train.run_dir", "is a file"),
    "unknown cnn_arch": (lambda t: ["model.image_encoder=cnn", "model.cnn_arch=nonexistent"], "model.cnn_arch",
                         "not a torchvision classification model"),
    "cnn_arch without features": (lambda t: ["model.image_encoder=cnn", "model.cnn_arch=squeezenet1_0"],
                                  "model.cnn_arch", "nothing is left"),
    "image_weights missing": (lambda t: [f"model.image_weights={t}/missing.pt"], "model.image_weights",
                              "does not exist"),
    "image_weights not weights": (lambda t: [f"model.image_weights={not_weights(t)}"], "model.image_weights",
                                  "is not a weights file"),
    "image_weights of another model": (lambda t: [f"model.image_weights={wrong_weights(t)}"],
                                       "model.image_weights", "does not match the image encoder"),
    "image_weights a folder": (lambda t: [f"model.image_weights={t}"], "model.image_weights",
                               "is not a regular file"),
    "heads zero": (lambda t: ["model.heads=0"], "model.heads", "must be positive"),
    # a typo'd layer count fails at once instead of spending minutes and gigabytes building layers
    "a billion text layers": (lambda t: ["model.text_layers=1000000000"], "model.text_layers",
                              "must be in [1, 1024]; got 1000000000"),
    "a billion audio convolutions": (lambda t: ["model.audio_convs=1000000000"], "model.audio_convs",
                                     "must be in [0, 1024]; got 1000000000"),
    "nan classify_weight": (lambda t: ["train.classify_weight=.nan"], "train.classify_weight", "finite"),
    "infinite lr": (lambda t: ["optim.lr=.inf"], "optim.lr", "finite"),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_a_config_that_cannot_work_fails_in_one_line_with_exit_2(demo_dataset, experiment, tmp_path, capsys, case):
    overrides, key, says = BAD_CONFIGS[case]
    run_dir = tmp_path / "run"
    code, out, err = run(capsys, train_argv(experiment, demo_dataset, run_dir, *overrides(tmp_path)))
    line = error_line(err)
    assert code == 2 and line.startswith(f"error: {key}: ") and says in line, err
    assert not (run_dir / "checkpoints").exists()


@pytest.mark.timeout(120)
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_on_a_machine_without_a_gpu_is_one_line_exit_2(demo_dataset, experiment, tmp_path, capsys):
    code, _, err = run(capsys, train_argv(experiment, demo_dataset, tmp_path / "run", "train.device=cuda"))
    assert code == 2 and error_line(err).startswith("error: train.device: ") and "train.device=auto or cpu" in err


@pytest.mark.timeout(60)
@pytest.mark.parametrize("nproc", ["0", "-2"])
def test_nproc_below_one_is_one_line_exit_2(demo_dataset, experiment, tmp_path, capsys, nproc):
    code, _, err = run(capsys, [*train_argv(experiment, demo_dataset, tmp_path / "run"), "--nproc", nproc])
    line = error_line(err)
    assert code == 2 and line == f"error: --nproc: must be at least 1 (processes on this machine); got {nproc}"


# -- labels

@pytest.mark.timeout(120)
@pytest.mark.parametrize("label, names, key, says", [
    (-3, True, "dataset", "has label -3 in the index"),
    (2_000_000_000, False, "model.max_classes", "a head of 2000000001 classes"),
    (7, True, "dataset", "dataset.json names 6 labels"),
])
def test_labels_out_of_range_stop_before_the_model_is_built(demo_dataset, experiment, tmp_path, capsys,
                                                            label, names, key, says):
    dataset = copy_dataset(demo_dataset, tmp_path / "dataset")
    sample = set_label(dataset, label, names)
    code, _, err = run(capsys, train_argv(experiment, dataset, tmp_path / "run"))
    line = error_line(err)
    assert code == 2 and says in line and repr(sample) in line and str(dataset) in line, err
    if key != "dataset":
        assert line.startswith(f"error: {key}: ")
    # a contrastive run does not use labels: it trains
    code, _, err = run(capsys, train_argv(experiment, dataset, tmp_path / "contrastive", "train.loss=contrastive",
                                          "train.steps=1"))
    assert code == 0, err


# -- damaged data during training: exit 3 naming shard and key, or skipped and counted

@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers", [0, 1])
def test_a_corrupt_member_is_one_line_naming_shard_key_and_the_ways_on(corrupt_dataset, experiment, tmp_path,
                                                                       capsys, workers):
    dataset, keys = corrupt_dataset
    code, _, err = run(capsys, train_argv(experiment, dataset, tmp_path / "run", f"data.loader.num_workers={workers}"))
    line = error_line(err)
    assert code == 3 and err.strip() == line, err        # nothing but the line
    assert str(dataset) in line and ".tar sample '" in line and any(repr(k) in line for k in keys)
    assert "set data.loader.on_error=skip" in line and f"`mmdata verify {dataset}`" in line


@pytest.mark.timeout(120)
def test_skipped_samples_are_counted_in_metrics_and_the_summary(corrupt_dataset, experiment, tmp_path, capsys):
    dataset, _ = corrupt_dataset
    run_dir = tmp_path / "run"
    code, out, err = run(capsys, train_argv(experiment, dataset, run_dir, "data.loader.on_error=skip",
                                            "train.steps=6"))
    assert code == 0, err
    counts = [m["skipped"] for m in metrics_lines(run_dir) if "loss" in m]
    assert len(counts) == 6 and counts == sorted(counts) and counts[-1] > 0      # a running count
    summary = [line for line in out.splitlines() if line.startswith("skipped samples: ")]
    in_eval = json.loads((run_dir / "eval.json").read_text())["skipped"]
    assert summary == [f"skipped samples: {counts[-1]} in training, {in_eval} in evaluation "
                       f"(data.loader.on_error=skip; `mmdata verify {dataset}` finds them all)"]
    shown = [line for line in err.splitlines() if line.startswith("warning: skipped a sample")]
    assert len(shown) == 3 and "later ones are only counted" in shown[-1]     # the first few reasons, once
    # the count carries over a resume
    code, out, err = run(capsys, train_argv(experiment, dataset, run_dir, "data.loader.on_error=skip",
                                            "train.steps=8"))
    later = [m["skipped"] for m in metrics_lines(run_dir) if "loss" in m]
    assert code == 0 and later[:6] == counts and later[6] >= counts[-1]


@pytest.mark.timeout(120)
def test_a_corrupt_member_under_two_ranks_ends_the_run_without_a_hang_or_traceback(corrupt_dataset, experiment,
                                                                                  tmp_path):
    """The rank that meets the bad sample leaves at once (it used to wait in a barrier while the other waited
    in the gradient all-reduce: a hang); the other stops on the lost connection, in one line too."""
    dataset, _ = corrupt_dataset
    argv = [*train_argv(experiment, dataset, tmp_path / "run", "train.steps=8"), "--nproc", "2"]
    proc = subprocess.run([sys.executable, "-m", "mmtrain", *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=100)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert 1 <= len(errors) <= 2 and any(".tar sample '" in e and "data.loader.on_error=skip" in e for e in errors)
    assert all(".tar sample '" in e or "another rank went away" in e for e in errors), errors


@pytest.mark.timeout(120)
def test_skipping_every_sample_stops_instead_of_training_on_nothing(demo_dataset, experiment, tmp_path, capsys):
    dataset = copy_dataset(demo_dataset, tmp_path / "dataset")
    corrupt_images(dataset, every=1)
    code, _, err = run(capsys, train_argv(experiment, dataset, tmp_path / "run", "data.loader.on_error=skip"))
    line = error_line(err)
    assert code == 3 and "batches in a row (an epoch) was skipped" in line and f"mmdata verify {dataset}" in line


TRUNCATE_DURING_TRAINING = """
import os, sys
import mmtrain.trainer as trainer
from mmtrain.cli import main
shard, real = sys.argv[1], trainer.train_step
def step(state, *args, **kwargs):
    out = real(state, *args, **kwargs)
    if state.step == 2:
        os.truncate(shard, 0)     # as another tool would, while the loader has it mapped
    return out
trainer.train_step = step
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers", [0, 1])
def test_a_shard_truncated_while_training_is_named_not_a_bus_error(demo_dataset, experiment, tmp_path, workers):
    dataset = copy_dataset(demo_dataset, tmp_path / "dataset")
    shards = sorted(dataset.glob("shard-*.tar"))
    argv = train_argv(experiment, dataset, tmp_path / "run", f"data.loader.num_workers={workers}", "train.steps=40")
    proc = subprocess.run([sys.executable, "-c", TRUNCATE_DURING_TRAINING, str(shards[0]), *argv], cwd=REPO,
                          capture_output=True, text=True, timeout=100)
    assert proc.returncode == 3, proc.stderr            # not -7 (SIGBUS) nor 135
    line = error_line(proc.stderr)
    assert f"shard {shards[0]} is truncated" in line and "rebuild with mmdata preprocess" in line
    assert "Bus error" not in proc.stderr and "Traceback" not in proc.stderr


READ_TRUNCATED_MAPPING = """
import os, sys
from mmdata.load.reader import ReadConfig, ShardReader, ShardReadError
path, size = sys.argv[1], 1 << 20
def fresh():
    with open(path, "wb") as f:
        f.write(os.urandom(size))
fresh()
batch_reader = ShardReader(ReadConfig(mmap=True))
assert len(batch_reader.read_batch([path], [[0]], [[10]], [10], [size])[0]) == 1 and path in batch_reader._maps
os.truncate(path, 4096)       # touching a mapped page past 4096 now raises SIGBUS
for item in batch_reader.read_batch([path, path], [[600000], [10]], [[100], [10]], [600100, 20], [size, size]):
    if not isinstance(item, ShardReadError):
        bytes(item[0])
    print(item)
fresh()
reader = ShardReader(ReadConfig(mmap=True))
reader.read(path, [(0, 10)], size)
os.truncate(path, 4096)
try:
    print(bytes(reader.read(path, [(900000, 10)], size)[0]))
except ShardReadError as e:
    print(e)
"""


@pytest.mark.timeout(60)
def test_a_mapped_shard_truncated_under_the_reader_is_an_error_not_sigbus(tmp_path):
    proc = subprocess.run([sys.executable, "-c", READ_TRUNCATED_MAPPING, str(tmp_path / "shard-000000.tar")],
                          cwd=REPO, capture_output=True, text=True, timeout=50)
    assert proc.returncode == 0, (proc.returncode, proc.stderr)    # a SIGBUS would be -7
    lines = proc.stdout.splitlines()
    assert len(lines) == 3 and all(f"shard {tmp_path / 'shard-000000.tar'} is truncated" in x for x in lines)
    assert all("rebuild with mmdata preprocess" in x for x in lines)
    assert "4096 bytes, 1048576 when it was mapped" in lines[-1]


# -- damaged run directories

def make_checkpoints(experiment, dataset, run_dir, capsys, steps=6, every=2) -> list[Path]:
    code, _, err = run(capsys, train_argv(experiment, dataset, run_dir, f"train.steps={steps}",
                                          f"train.checkpoint_every={every}"))
    assert code == 0, err
    return sorted((run_dir / "checkpoints").glob("step-*"))


def truncate_state(path: Path) -> None:
    rewrite(path / "state.pt", (path / "state.pt").read_bytes()[:1000])


def garbage_meta(path: Path) -> None:
    rewrite(path / "meta.json", b'{"format": 1, "step"')


def garbage_state(path: Path) -> None:
    rewrite(path / "state.pt", b"not a checkpoint at all")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("damage", [truncate_state, garbage_meta, garbage_state])
def test_an_unreadable_latest_checkpoint_falls_back_to_the_newest_good_one(demo_dataset, experiment, tmp_path,
                                                                          capsys, damage):
    run_dir = tmp_path / "run"
    saved = make_checkpoints(experiment, demo_dataset, run_dir, capsys)
    assert [p.name for p in saved] == ["step-00000002", "step-00000004", "step-00000006"]
    damage(saved[-1])
    code, _, err = run(capsys, train_argv(experiment, demo_dataset, run_dir, "train.steps=8",
                                          "train.checkpoint_every=2"))
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and f"checkpoint {saved[-1]} cannot be read" in warnings[0]
    assert "moved to bad-step-00000006; using step-00000004 (step 4) instead" in warnings[0]
    steps = [m["step"] for m in metrics_lines(run_dir) if "loss" in m]
    assert steps == list(range(1, 9))                   # resumed at 4: 5 and 6 trained again, once each
    assert (run_dir / "checkpoints" / "bad-step-00000006").is_dir()     # set aside, not deleted


@pytest.mark.timeout(120)
def test_no_readable_checkpoint_is_one_line_saying_how_to_start_over(demo_dataset, experiment, tmp_path, capsys):
    run_dir = tmp_path / "run"
    for path in make_checkpoints(experiment, demo_dataset, run_dir, capsys, steps=4):
        garbage_state(path)
    code, _, err = run(capsys, train_argv(experiment, demo_dataset, run_dir, "train.steps=8"))
    line = error_line(err)
    assert code == 2
    assert line.startswith(f"error: train.run_dir: no checkpoint in {run_dir / 'checkpoints'} can be read")
    assert "step-00000004, step-00000002" in line and line.endswith("to start over, use another train.run_dir")
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
    code, _, err = run(capsys, ["eval", str(run_dir)])
    assert code == 2 and "no checkpoint in" in error_line(err)


@pytest.mark.timeout(120)
def test_resuming_with_other_model_settings_names_the_keys(demo_dataset, experiment, tmp_path, capsys):
    run_dir = tmp_path / "run"
    make_checkpoints(experiment, demo_dataset, run_dir, capsys, steps=2)
    for overrides, expected in [
        (["model.dim=64"], "error: model.dim: checkpoint 32, config 64 ("),
        (["model.text_layers=2", "model.fusion_layers=3"],
         "error: model.text_layers: checkpoint 1, config 2; model.fusion_layers: checkpoint 1, config 3 ("),
        (["train.seed=7"], "error: train.seed: checkpoint 0, config 7 ("),
        (["data.loader.modalities=[text,image]"], "error: data.loader.modalities: checkpoint ['text', 'image', "
                                                  "'audio'], config ['text', 'image'] ("),
    ]:
        code, _, err = run(capsys, train_argv(experiment, demo_dataset, run_dir, "train.steps=4", *overrides))
        line = error_line(err)
        assert code == 2 and line.startswith(expected), (overrides, line)
        assert line.endswith("resume with the checkpoint's settings or use another train.run_dir") and len(line) < 400
    # settings that do not change the model resume
    code, _, err = run(capsys, train_argv(experiment, demo_dataset, run_dir, "train.steps=4", "model.dropout=0.1",
                                          "train.loss=classify", "data.loader.batch_size=4"))
    assert code == 0, err


@pytest.mark.timeout(120)
def test_a_metrics_line_cut_short_by_a_kill_does_not_stop_the_resume(demo_dataset, experiment, tmp_path, capsys):
    run_dir = tmp_path / "run"
    make_checkpoints(experiment, demo_dataset, run_dir, capsys, steps=4)
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 1.2')
    code, _, err = run(capsys, train_argv(experiment, demo_dataset, run_dir, "train.steps=6"))
    assert code == 0, err
    assert [m["step"] for m in metrics_lines(run_dir) if "loss" in m] == [1, 2, 3, 4, 5, 6]


# -- a non-finite loss: exit 1, and the message says what is left

@pytest.mark.timeout(120)
@pytest.mark.parametrize("checkpoint_every", [0, 2])
def test_a_nan_loss_says_whether_a_checkpoint_is_left(demo_dataset, experiment, tmp_path, capsys, monkeypatch,
                                                      checkpoint_every):
    import mmtrain.trainer as trainer
    real, calls = trainer.total_loss, {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        out = real(*args, **kwargs)
        if calls["n"] == 3:
            out["loss"] = out["loss"] * float("nan")
        return out
    monkeypatch.setattr(trainer, "total_loss", poisoned)
    run_dir = tmp_path / "run"
    code, _, err = run(capsys, train_argv(experiment, demo_dataset, run_dir,
                                          f"train.checkpoint_every={checkpoint_every}"))
    line = error_line(err)
    assert code == 1 and line.startswith("error: loss is nan at step 3; stopping: ")
    if checkpoint_every:
        assert f"the last good checkpoint, {run_dir / 'checkpoints' / 'step-00000002'}, is intact" in line
        assert (run_dir / "checkpoints" / "step-00000002").is_dir()
    else:
        assert "no checkpoint was written yet (train.checkpoint_every=0), so a rerun starts over" in line
        assert not (run_dir / "checkpoints").exists()


# -- Ctrl-C: exit 130, a checkpoint at the step reached, and a resume that continues exactly

@pytest.mark.timeout(120)
def test_ctrl_c_saves_a_checkpoint_and_the_same_command_resumes_exactly(demo_dataset, experiment, tmp_path, capsys):
    run_dir = tmp_path / "run"
    # a constant learning rate after warmup, so that train.steps (changed below) does not change the schedule
    same = ["data.loader.num_workers=1", "optim.min_lr_ratio=1"]
    argv = train_argv(experiment, demo_dataset, run_dir, *same, "train.steps=100000")
    proc = subprocess.Popen([sys.executable, "-m", "mmtrain", *argv], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 80
        while not ((run_dir / "metrics.jsonl").exists() and len(metrics_lines(run_dir)) >= 2):
            assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)      # as a terminal's Ctrl-C: the whole group, DataLoader worker included
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err
    line = err.strip().splitlines()[-1]
    step = int(line.split("interrupted at step ")[1].split(";")[0])
    assert line == f"interrupted at step {step}; resume with the same command (checkpoint saved at step {step})"
    assert "Traceback" not in err and (run_dir / "checkpoints" / f"step-{step:08d}").is_dir()
    # the same command (with a reachable number of steps) continues where it stopped, loss for loss
    code, _, err = run(capsys, train_argv(experiment, demo_dataset, run_dir, *same, f"train.steps={step + 3}"))
    assert code == 0, err
    reference = tmp_path / "reference"
    code, _, err = run(capsys, train_argv(experiment, demo_dataset, reference, *same, f"train.steps={step + 3}"))
    assert code == 0, err
    losses = [m["loss"] for m in metrics_lines(run_dir) if "loss" in m]
    assert len(losses) == step + 3
    assert losses == pytest.approx([m["loss"] for m in metrics_lines(reference) if "loss" in m], rel=1e-5)


# -- mmtrain eval

@pytest.mark.timeout(120)
def test_eval_passes_over_an_unreadable_checkpoint_and_refuses_a_run_without_one(demo_dataset, experiment,
                                                                                 tmp_path, capsys):
    run_dir = tmp_path / "run"
    saved = make_checkpoints(experiment, demo_dataset, run_dir, capsys, steps=4)
    truncate_state(saved[-1])
    code, out, err = run(capsys, ["eval", str(run_dir)])
    assert code == 0 and f"checkpoint {saved[0]} (step 2)" in out and f"checkpoint {saved[-1]} cannot be read" in err
    assert saved[-1].is_dir()          # eval only reads: nothing is moved
    code, _, err = run(capsys, ["eval", str(tmp_path / "nowhere")])
    assert code == 2 and error_line(err) == f"error: run directory {tmp_path / 'nowhere'} does not exist"
