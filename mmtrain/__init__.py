"""mmtrain: fusion model, distributed trainer and evaluation over mmdata shards.

    from mmdata import load_config
    from mmtrain import ExperimentConfig, train
    from mmtrain.distributed import setup
    metrics = train(load_config(ExperimentConfig, "pipelines/train.yaml"), setup())
"""

import importlib

__version__ = "0.1.0"

# Imported on first use, as in mmdata: importing the package costs nothing.
_EXPORTS = {
    "train": "mmtrain.trainer",
    "TrainingError": "mmtrain.failures",
    "DataError": "mmtrain.failures",
    "Interrupted": "mmtrain.failures",
    "ExperimentConfig": "mmtrain.config",
    "ModelConfig": "mmtrain.model",
    "FusionModel": "mmtrain.model",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mmtrain' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
