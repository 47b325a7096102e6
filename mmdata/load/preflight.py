"""Check a loader plan before the first batch: fail at once on what would hang, starve or thrash."""

from __future__ import annotations

from mmdata.config import ConfigError


def check_plan(plan, world_size: int) -> None:
    """Raise ConfigError (naming the key to change) for an unworkable configuration."""
    c = plan.config
    for catalog, source in zip(plan.catalogs, plan.sources):
        if len(source.rows) == 0:
            raise ConfigError("loader.datasets", f"{catalog.dataset} has no samples with "
                              f"{' or '.join(c.modalities)} in split {c.split!r}")
        for modality in c.modalities:
            if catalog.present(modality) == 0:
                raise ConfigError("loader.modalities", f"{catalog.dataset} has no {modality}; "
                                  f"remove {modality!r} from loader.modalities")
    global_batch = c.batch_size * world_size
    batches = plan.n_draws // global_batch + (c.remainder == "pad" and plan.n_draws % global_batch > 0)
    if batches == 0:
        raise ConfigError("loader.batch_size", f"batch_size {c.batch_size} x world size {world_size} = "
                          f"{global_batch} is more than the {plan.n_draws} samples of an epoch; lower it "
                          "(or set loader.remainder=pad)")
    if c.num_workers > batches:
        raise ConfigError("loader.num_workers", f"{c.num_workers} workers but only {batches} batches per rank "
                          f"per epoch: workers would sit idle; use at most {batches}")
    if c.read.cache_dir:
        largest = max(int(cat.shard_bytes.max()) for cat in plan.catalogs if len(cat.shard_bytes))
        needed = largest * (c.shuffle_window + 1) * max(1, c.num_workers)
        if c.read.cache_bytes < needed:
            raise ConfigError("loader.read.cache_bytes", f"{c.read.cache_bytes} bytes cannot hold the shards that "
                              f"{max(1, c.num_workers)} workers read at once ({c.shuffle_window} + 1 shards of up to "
                              f"{largest} bytes each): the cache would thrash; raise it to at least {needed} or lower "
                              "loader.shuffle_window")
