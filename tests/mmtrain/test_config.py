"""Experiment configs: every YAML under pipelines/ with a `train` section loads, validates, shares data."""

from pathlib import Path

import pytest
import yaml

from mmdata.config import ConfigError, load_config
from mmtrain.config import ExperimentConfig

PIPELINES = Path(__file__).parents[2] / "pipelines"
EXPERIMENTS = [p for p in sorted(PIPELINES.glob("*.yaml")) if "train" in yaml.safe_load(p.read_text())]


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_every_experiment_yaml_loads_and_validates(path):
    config = load_config(ExperimentConfig, path)
    assert config.train.steps > 0
    assert "mmtrain train" in path.read_text().split("\n\n")[0]   # the header says how to run it


def test_at_least_two_experiments_share_one_data_config():
    data = [load_config(ExperimentConfig, p).data.preprocess for p in EXPERIMENTS]
    assert len(EXPERIMENTS) >= 2 and len(set(data)) < len(data)


def test_loader_datasets_are_filled_in_not_given(tmp_path):
    with pytest.raises(ConfigError, match="give exactly one of data.preprocess, data.dataset or data.datasets"):
        load_config(ExperimentConfig, None, [])
    with pytest.raises(ConfigError) as info:
        load_config(ExperimentConfig, None, ["data.dataset=x", "optim.lr=-1"])
    assert info.value.key == "optim.lr"


@pytest.mark.parametrize("key", ["train.eval_every", "train.checkpoint_every"])
def test_a_negative_cadence_names_its_own_key(key):
    with pytest.raises(ConfigError) as info:
        load_config(ExperimentConfig, None, ["data.dataset=x", f"{key}=-1"])
    assert info.value.key == key
