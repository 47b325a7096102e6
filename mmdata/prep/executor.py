"""Run partition tasks: on Ray (local instance or an existing cluster) or in-process.

The driver streams partitions from the input and keeps at most
``max_in_flight`` of them submitted, so its memory does not grow with the
input. Results come back as small summaries; a progress bar counts samples
and errors as partitions finish.
"""

from __future__ import annotations

import os
import time
from typing import Iterator

from tqdm import tqdm

from mmdata.prep.partition import Job, run_partition
from mmdata.prep.sources import Record

Partitions = Iterator[tuple[int, list[Record], set[int]]]


def run_all(job: Job, partitions: Partitions, total_rows: int, config, phases: dict) -> list[dict]:
    """Summaries of every partition, ordered by partition number; adds startup/partitions to ``phases``."""
    bar = tqdm(total=total_rows, unit="sample", disable=not config.progress, dynamic_ncols=True,
               desc="preprocess", smoothing=0.1)
    errors = 0

    def done(summary: dict) -> None:
        nonlocal errors
        errors += sum(summary["errors_by_reason"].values())
        bar.update(summary["samples_in"])
        bar.set_postfix(errors=errors, reused=summary["reused"], refresh=False)

    start = time.perf_counter()
    try:
        if config.ray.executor == "serial":
            phases["startup"] = 0.0
            summaries = []
            for k, records, duplicates in partitions:
                summaries.append(run_partition(job, k, records, duplicates))
                done(summaries[-1])
        else:
            ray = init_ray(config.ray)
            cpus = int(ray.cluster_resources().get("CPU", 1))
            ray.get([ray.remote(warm_worker).options(num_cpus=1).remote() for _ in range(cpus)])
            phases["startup"] = time.perf_counter() - start
            summaries = run_on_ray(job, partitions, config.ray, done)
    finally:
        bar.close()
    phases["partitions"] = time.perf_counter() - start - phases.get("startup", 0.0)
    return sorted(summaries, key=lambda s: s["partition"])


def run_partition_on_node(job: Job, k: int, records: list[Record], duplicates: set[int]) -> dict:
    """run_partition, plus which Ray node ran it (for the run summary)."""
    import ray
    return {**run_partition(job, k, records, duplicates), "node": ray.get_runtime_context().get_node_id()}


def warm_worker() -> int:
    """Import the processing stack (torch, torchaudio, Pillow...) so the first partition does not pay for it."""
    import importlib
    importlib.import_module("mmdata.prep.partition")
    return os.getpid()


def ray_address(ray_config) -> str | None:
    return ray_config.address or os.environ.get("RAY_ADDRESS") or None


def init_ray(ray_config):
    """Connect to the configured cluster, or start a local instance on all cores."""
    import ray
    if ray.is_initialized():
        return ray
    address = ray_address(ray_config)
    env = {"env_vars": {"RAY_USAGE_STATS_ENABLED": "0"}}
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=True, logging_level="WARNING")
    else:
        ray.init(num_cpus=ray_config.num_cpus or os.cpu_count(), include_dashboard=False,
                 runtime_env=env, logging_level="WARNING")
    return ray


def run_on_ray(job: Job, partitions: Partitions, ray_config, done) -> list[dict]:
    ray = init_ray(ray_config)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    limit = ray_config.max_in_flight or 2 * cpus
    job_ref = ray.put(job)  # shipped to each node once, not with every task
    task = ray.remote(run_partition_on_node).options(num_cpus=1, max_retries=3, retry_exceptions=[OSError])
    pending, summaries = [], []

    def collect(wait_all: bool) -> None:
        nonlocal pending
        while pending and (wait_all or len(pending) >= limit):
            ready, pending = ray.wait(pending, num_returns=1)
            summary = ray.get(ready[0])
            summaries.append(summary)
            done(summary)

    for k, records, duplicates in partitions:
        pending.append(task.remote(job_ref, k, records, duplicates))
        collect(wait_all=False)
    collect(wait_all=True)
    return summaries
