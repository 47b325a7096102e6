"""mmdata: multimodal preprocessing into sharded WebDataset tars, and the shard format."""

__version__ = "0.1.0"
