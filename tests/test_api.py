"""The public API: what users import from `mmdata` and `mmtrain`, cheap to import."""

from __future__ import annotations

import subprocess
import sys

import pytest


def test_mmdata_exports_the_pipeline_the_loader_and_the_description():
    import mmdata
    from mmdata.dataset import DatasetDescription, load_description
    from mmdata.load.loader import LoaderConfig, MultimodalLoader, move_to
    from mmdata.prep.config import PreprocessConfig
    from mmdata.prep.pipeline import preprocess
    assert (mmdata.preprocess, mmdata.PreprocessConfig, mmdata.MultimodalLoader, mmdata.LoaderConfig,
            mmdata.load_description, mmdata.DatasetDescription, mmdata.move_to) == (
        preprocess, PreprocessConfig, MultimodalLoader, LoaderConfig, load_description, DatasetDescription, move_to)
    assert set(mmdata.__all__) <= set(dir(mmdata))
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        mmdata.nothing


def test_mmtrain_exports_the_trainer_and_its_config():
    import mmtrain
    from mmtrain.config import ExperimentConfig
    from mmtrain.trainer import train
    assert (mmtrain.train, mmtrain.ExperimentConfig) == (train, ExperimentConfig)


def test_reading_the_format_does_not_import_torch_or_ray():
    code = ("import sys, mmdata, mmdata.dataset, mmdata.schema, mmdata.shards, mmdata.verify; "
            "print(sorted(m for m in ('torch', 'ray', 'torchaudio') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
