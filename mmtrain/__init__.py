"""mmtrain: fusion model, distributed trainer and evaluation over mmdata shards.

    from mmdata import load_config
    from mmtrain import ExperimentConfig, train
    from mmtrain.distributed import setup
    metrics = train(load_config(ExperimentConfig, "pipelines/train.yaml"), setup())
"""

from mmdata import lazy_exports

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
__getattr__, __dir__ = lazy_exports("mmtrain", _EXPORTS)
