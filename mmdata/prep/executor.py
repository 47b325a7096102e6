"""Executors: run the same partition function in-process or on Ray; they differ only in scheduling.

    executor = make_executor(config.ray)
    executor.start()                          # Ray: connect or start, warm one worker per CPU
    for summary in executor.run(job, partitions): ...   # as partitions finish

The driver streams partitions from the input and the Ray executor keeps at
most ``max_in_flight`` of them submitted, so the driver's memory does not
grow with the input. Results come back as small typed summaries.
"""

from __future__ import annotations

import os
import signal
import threading
from dataclasses import replace
from typing import Iterable, Iterator, Protocol

from tqdm import tqdm

from mmdata.prep.config import RayConfig
from mmdata.prep.partition import Job, PartitionSummary, run_partition
from mmdata.prep.sources import Record

Partitions = Iterable[tuple[int, list[Record], set[int]]]


class Executor(Protocol):
    def start(self) -> None:
        """Get ready to run partitions (timed apart from the partitions themselves)."""

    def run(self, job: Job, partitions: Partitions) -> Iterator[PartitionSummary]:
        """Run every partition; yield each summary as it finishes (in any order)."""


class SerialExecutor:
    """In this process, one partition after another: for debugging and for jobs too small to pay for Ray."""

    def start(self) -> None:
        pass

    def run(self, job: Job, partitions: Partitions) -> Iterator[PartitionSummary]:
        for k, records, duplicates in partitions:
            yield run_partition(job, k, records, duplicates)


class RayExecutor:
    """One Ray task per partition on a local instance or an existing cluster, a bounded number in flight."""

    def __init__(self, config: RayConfig):
        self.config = config

    def start(self) -> None:
        ray = init_ray(self.config)
        cpus = int(ray.cluster_resources().get("CPU", 1))
        ray.get([ray.remote(warm_worker).options(num_cpus=1).remote() for _ in range(cpus)])

    def run(self, job: Job, partitions: Partitions) -> Iterator[PartitionSummary]:
        ray = init_ray(self.config)
        limit = self.config.max_in_flight or 2 * int(ray.cluster_resources().get("CPU", 1))
        job_ref = ray.put(job)  # shipped to each node once, not with every task
        task = ray.remote(run_partition_on_node).options(num_cpus=1, max_retries=3, retry_exceptions=[OSError])
        pending = []
        try:
            for k, records, duplicates in partitions:
                pending.append(task.remote(job_ref, k, records, duplicates))
                while len(pending) >= limit:
                    ready, pending = ray.wait(pending, num_returns=1)
                    yield task_result(ray, ready[0])
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                yield task_result(ray, ready[0])
        finally:   # an error or an interrupt: the partitions still queued or running are not wanted
            for ref in pending:
                ray.cancel(ref, force=True)


def task_result(ray, ref) -> PartitionSummary:
    """A task's summary; a task's own exception (a full disk, a bad path) as itself, not wrapped by Ray."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, Exception):
            raise e.cause from None
        raise


def make_executor(config: RayConfig) -> Executor:
    return SerialExecutor() if config.executor == "serial" else RayExecutor(config)


def run_with_progress(executor: Executor, job: Job, partitions: Partitions, total_rows: int,
                      progress: bool) -> list[PartitionSummary]:
    """Every partition's summary, ordered by partition number, with a bar of samples and errors."""
    summaries, errors = [], 0
    with tqdm(total=total_rows, unit="sample", disable=not progress, dynamic_ncols=True,
              desc="preprocess", smoothing=0.1) as bar:
        for summary in executor.run(job, partitions):
            summaries.append(summary)
            errors += sum(summary.totals.errors_by_reason.values())
            bar.update(summary.totals.samples_in)
            bar.set_postfix(errors=errors, reused=summary.reused, refresh=False)
    return sorted(summaries, key=lambda s: s.partition)


def run_partition_on_node(job: Job, k: int, records: list[Record], duplicates: set[int]) -> PartitionSummary:
    """run_partition, plus which Ray node ran it (for the run summary)."""
    import ray
    return replace(run_partition(job, k, records, duplicates), node=ray.get_runtime_context().get_node_id())


def warm_worker() -> int:
    """Import the processing stack (torch, torchaudio, Pillow...) so the first partition does not pay for it."""
    import importlib
    importlib.import_module("mmdata.prep.partition")
    return os.getpid()


def ray_address(ray_config: RayConfig) -> str | None:
    return ray_config.address or os.environ.get("RAY_ADDRESS") or None


def init_ray(ray_config: RayConfig):
    """Connect to the configured cluster, or start a local instance on all cores."""
    import ray
    if ray.is_initialized():
        return ray
    address = ray_address(ray_config)
    env = {"env_vars": {"RAY_USAGE_STATS_ENABLED": "0"}}
    # Ray installs its own SIGTERM handler in the driver; the caller's (mmdata's: stop like Ctrl-C) stays
    main = threading.current_thread() is threading.main_thread()
    on_sigterm = signal.getsignal(signal.SIGTERM) if main else None
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=True, logging_level="WARNING")
    else:
        ray.init(num_cpus=ray_config.num_cpus or os.cpu_count(), include_dashboard=False,
                 runtime_env=env, logging_level="WARNING")
    if main and on_sigterm is not None:
        signal.signal(signal.SIGTERM, on_sigterm)
    return ray
