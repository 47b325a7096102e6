"""Configs: YAML + dotted overrides into typed dataclasses; bad values named by key."""

from pathlib import Path

import pytest
import yaml

from mmdata.config import ConfigError, load_config
from mmdata.prep.config import PreprocessConfig

PIPELINES = Path(__file__).parents[2] / "pipelines"


def preprocess_yamls() -> list[Path]:
    """Pipelines with an `input` section are preprocess configs (experiments are tested in tests/mmtrain)."""
    return [p for p in sorted(PIPELINES.glob("*.yaml")) if "input" in yaml.safe_load(p.read_text())]


@pytest.mark.parametrize("path", preprocess_yamls(), ids=lambda p: p.name)
def test_every_preprocess_pipeline_loads_and_validates(path):
    config = load_config(PreprocessConfig, path)
    assert config.output.samples_per_shard > 0
    assert path.read_text().startswith("#") and "mmdata preprocess" in path.read_text().split("\n\n")[0]


def test_overrides_win_over_yaml_and_are_parsed_as_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("input: {manifest: m.jsonl}\nimage: {size: 64}\n")
    config = load_config(PreprocessConfig, path, ["image.size=128", "audio.keep_waveform=true",
                                                  "image.background=[1,2,3]"])
    assert config.image.size == 128 and config.audio.keep_waveform is True
    assert config.image.background == [1, 2, 3]
    assert config.audio.n_mels == 64  # untouched default


@pytest.mark.parametrize("override, key, words", [
    ("image.sise=3", "image.sise", "unknown key"),
    ("image.size=big", "image.size", "expected int"),
    ("image.size=-3", "image.size", "between 1 and 8192"),
    ("image.format=gif", "image.format", "jpg"),
    ("audio.n_mels=0", "audio.n_mels", ""),
    ("output.samples_per_shard=0", "output.samples_per_shard", "positive"),
    ("max_error_rate=2", "max_error_rate", "between 0 and 1"),
    ("text.model_type=magic", "text.model_type", "unigram"),
    ("ray.executor=slurm", "ray.executor", "ray"),
])
def test_bad_values_fail_naming_the_key(tmp_path, override, key, words):
    path = tmp_path / "c.yaml"
    path.write_text("input: {manifest: m.jsonl}\n")
    with pytest.raises(ConfigError) as info:
        load_config(PreprocessConfig, path, [override])
    assert info.value.key == key
    assert words in str(info.value)


def test_input_needs_exactly_one_source(tmp_path):
    with pytest.raises(ConfigError, match="exactly one of input.manifest or input.tars"):
        load_config(PreprocessConfig, None, [])
    with pytest.raises(ConfigError, match="must end in .jsonl"):
        load_config(PreprocessConfig, None, ["input.manifest=data.txt"])


def test_missing_or_broken_config_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(PreprocessConfig, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("input: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(PreprocessConfig, bad)



@pytest.mark.parametrize("written, value", [("3e-4", 3e-4), ("1E3", 1000.0), ("-2.5e-1", -0.25), ("7", 7.0)])
def test_floats_in_exponent_notation_are_floats(written, value):
    from mmdata.config import _coerce
    assert _coerce(float, written, "k") == value
    with pytest.raises(ConfigError):
        _coerce(float, "3e-4x", "k")


def test_an_override_like_lr_3e_4_reaches_the_config_as_a_float():
    from mmdata.prep.config import PreprocessConfig
    assert load_config(PreprocessConfig, None, ["input.manifest=m.jsonl", "max_error_rate=5e-2"]).max_error_rate == 0.05
