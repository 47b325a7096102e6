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


def lazy_exports(package: str, exports: dict[str, str]):
    """A package's ``__getattr__`` and ``__dir__`` that import each exported name's module on first use."""
    def getattr_(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(exports[name]), name)

    def dir_() -> list[str]:
        return sorted([*vars(importlib.import_module(package)), *exports])
    return getattr_, dir_


__getattr__, __dir__ = lazy_exports("mmdata", _EXPORTS)
