"""mmtrain: fusion model, distributed trainer and evaluation over mmdata shards."""

__version__ = "0.1.0"
