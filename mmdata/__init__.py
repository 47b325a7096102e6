"""mmdata: multimodal preprocessing into sharded WebDataset tars, the shard format, and a streaming loader.

    from mmdata import PreprocessConfig, preprocess, load_config
    result = preprocess(load_config(PreprocessConfig, "pipelines/demo.yaml"))    # -> a dataset directory

    from mmdata import LoaderConfig, MultimodalLoader, DatasetSource
    loader = MultimodalLoader(LoaderConfig(datasets=[DatasetSource(result.dataset)]))
    for batch in loader: ...

Layout: the format layer here (schema, shards, dataset, storage, config, verify), preprocessing in
``mmdata.prep``, loading in ``mmdata.load``; the two never import each other.
"""

import importlib

__version__ = "0.1.0"

# Imported on first use: `import mmdata.schema` (a reader's needs) should not pay for torch or Ray.
_EXPORTS = {
    "preprocess": "mmdata.prep.pipeline",
    "PreprocessConfig": "mmdata.prep.config",
    "MultimodalLoader": "mmdata.load.loader",
    "LoaderConfig": "mmdata.load.loader",
    "DatasetSource": "mmdata.load.loader",
    "LoaderError": "mmdata.load.loader",
    "move_to": "mmdata.load.loader",
    "load_description": "mmdata.dataset",
    "DatasetDescription": "mmdata.dataset",
    "DatasetError": "mmdata.dataset",
    "load_config": "mmdata.config",
    "ConfigError": "mmdata.config",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mmdata' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
