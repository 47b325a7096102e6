"""Executors: run the same partition function in-process, on a pool of local processes, or on Ray; they
differ only in scheduling.

    executor = make_executor(config.ray, samples, largest)   # auto: Ray for a cluster, else by the work left
    executor.start(job, modalities)           # what the workers import before their first partition
    for summary in executor.run(job, partitions): ...   # as partitions finish

The driver checks the store itself first (pipeline.ReuseCheck), so an
executor gets only partitions to build, and none is made when there are
none. ``auto`` (the default) sends the work to Ray when a cluster is named
(``ray.address`` or RAY_ADDRESS); on one machine it runs in-process unless
the work is worth a pool of processes (``ray.auto_min_samples``). A local
Ray instance (``ray.executor=ray``) gives the same bytes, after seconds of
start-up. The parallel executors keep at most ``max_in_flight`` partitions
submitted, so the driver's memory does not grow with the input. Results
come back as small typed summaries.
"""

from __future__ import annotations

import os
import signal
import threading
from dataclasses import replace
from typing import Iterable, Iterator, Protocol

from tqdm import tqdm

from mmdata import interrupts
from mmdata.prep.config import RayConfig
from mmdata.prep.partition import Job, PartitionKeys, PartitionSummary, run_partition
from mmdata.prep.sources import Record
from mmdata.schema import MODALITIES

# (k, records, duplicates) or (k, records, duplicates, keys): the partition's keys when the driver checked the
# store for them already (None or absent: the task fingerprints the rows itself)
Partitions = Iterable[tuple[int, list[Record], set[int]] | tuple[int, list[Record], set[int], PartitionKeys | None]]
# What a Ray worker imports before its first partition, by the modalities the job has: audio's torch is most of it
WARM_IMPORTS = {"text": ("sentencepiece",), "image": ("PIL.Image",), "audio": ("torch", "torchaudio")}


class Executor(Protocol):
    name: str

    def start(self, job: Job, modalities: Iterable[str] = MODALITIES) -> None:
        """Get ready to run the job's partitions of these modalities (timed apart from the partitions themselves)."""

    def run(self, job: Job, partitions: Partitions) -> Iterator[PartitionSummary]:
        """Run every partition; yield each summary as it finishes (in any order)."""


class SerialExecutor:
    """In this process, one partition after another: small jobs (no start-up to pay) and debugging."""
    name = "serial"

    def start(self, job: Job, modalities: Iterable[str] = MODALITIES) -> None:
        pass

    def run(self, job: Job, partitions: Partitions) -> Iterator[PartitionSummary]:
        for partition in partitions:
            interrupts.check()   # a Ctrl-C that a library swallowed while the last partition ran
            yield run_partition(job, *partition)


class ProcessExecutor:
    """Local jobs on every core: a pool of this machine's processes (the standard library's
    ProcessPoolExecutor), one partition per task, a bounded number in flight. It starts in well under a second
    where a local Ray instance takes seconds; Ray remains the engine for clusters. Workers fork from a server
    process that imported the job's processing stack once, ignore Ctrl-C (the driver stops them), and get the
    job once, not with every task."""
    name = "processes"

    def __init__(self, config: RayConfig):
        self.config = config
        self.workers = config.num_cpus or os.cpu_count() or 1
        self.pool = None

    def start(self, job: Job, modalities: Iterable[str] = MODALITIES) -> None:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["mmdata.prep.partition",
                                        *(m for modality in modalities for m in WARM_IMPORTS[modality])])
        self.pool = ProcessPoolExecutor(self.workers, mp_context=context, initializer=set_worker_job, initargs=(job,))
        try:
            for future in [self.pool.submit(os.getpid) for _ in range(self.workers)]:   # every worker started now
                future.result()
        except BaseException:
            stop_pool(self.pool, kill=True)
            raise

    def run(self, job: Job, partitions: Partitions) -> Iterator[PartitionSummary]:
        from concurrent.futures import FIRST_COMPLETED, wait
        from concurrent.futures.process import BrokenProcessPool
        if self.pool is None:
            self.start(job)
        pool, self.pool = self.pool, None
        limit = self.config.max_in_flight or 2 * self.workers
        pending: dict = {}   # future -> partition number

        def finished() -> Iterator[PartitionSummary]:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                summary = future.result()
                del pending[future]
                yield summary

        try:
            for partition in partitions:
                pending[pool.submit(run_partition_in_worker, *partition)] = partition[0]
                while len(pending) >= limit:
                    yield from finished()
            while pending:
                yield from finished()
        except BrokenProcessPool:
            running = sorted(pending.values())
            which = f"partition {running[0]}" if len(running) == 1 else f"one of partitions {running}"
            raise ChildProcessError(f"a worker process died while building {which} (killed by the system, e.g. "
                                    "out of memory?); rerun the same command to resume (finished shards are "
                                    "kept)") from None
        finally:   # done, an error or an interrupt: no worker outlives the run
            stop_pool(pool, kill=bool(pending))


_worker_job: Job | None = None


def set_worker_job(job: Job) -> None:
    """A pool worker's initializer: keep the job, and leave Ctrl-C to the driver (it stops the workers)."""
    global _worker_job
    _worker_job = job
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def run_partition_in_worker(*partition) -> PartitionSummary:
    return run_partition(_worker_job, *partition)


def stop_pool(pool, kill: bool) -> None:
    """Shut the pool down; with ``kill`` (work still running: an error or an interrupt) end its workers now
    rather than after their partitions."""
    if kill:
        pool.shutdown(wait=False, cancel_futures=True)
        for process in list((getattr(pool, "_processes", None) or {}).values()):   # Python 3.14: terminate_workers()
            process.terminate()
    pool.shutdown(wait=True)


class RayExecutor:
    """One Ray task per partition on a local instance or an existing cluster, a bounded number in flight."""
    name = "ray"

    def __init__(self, config: RayConfig):
        self.config = config

    def start(self, job: Job, modalities: Iterable[str] = MODALITIES) -> None:
        ray = init_ray(self.config)
        cpus = int(ray.cluster_resources().get("CPU", 1))
        modules = ["mmdata.prep.partition", *(m for modality in modalities for m in WARM_IMPORTS[modality])]
        ray.get([ray.remote(warm_worker).options(num_cpus=1).remote(modules) for _ in range(cpus)])

    def run(self, job: Job, partitions: Partitions) -> Iterator[PartitionSummary]:
        ray = init_ray(self.config)
        limit = self.config.max_in_flight or 2 * int(ray.cluster_resources().get("CPU", 1))
        job_ref = ray.put(job)  # shipped to each node once, not with every task
        task = ray.remote(run_partition_on_node).options(num_cpus=1, max_retries=3, retry_exceptions=[OSError])
        pending = []
        try:
            for partition in partitions:
                pending.append(task.remote(job_ref, *partition))
                while len(pending) >= limit:
                    ready, pending = ray.wait(pending, num_returns=1)
                    yield task_result(ray, ready[0])
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                yield task_result(ray, ready[0])
        finally:   # an error or an interrupt: the partitions still queued or running are not wanted
            if pending:   # not those already finished: cancelling a task as its reply arrives crashes Ray's driver
                _, pending = ray.wait(pending, num_returns=len(pending), timeout=0)
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


def make_executor(config: RayConfig, samples: int | None = None, largest: int = 0) -> Executor:
    """``serial``, ``processes`` and ``ray`` as named; ``auto``: Ray for a cluster, otherwise by the work to
    build (:func:`worth_parallel`): ``samples`` in partitions of at most ``largest`` samples (None: not counted)."""
    if config.executor == "serial":
        return SerialExecutor()
    if config.executor == "ray" or (config.executor == "auto" and ray_address(config)):
        return RayExecutor(config)
    if config.executor == "processes" or samples is None or worth_parallel(config, samples, largest):
        return ProcessExecutor(config)
    return SerialExecutor()


def worth_parallel(config: RayConfig, samples: int, largest: int) -> bool:
    """``auto``'s rule on one machine. A pool of processes costs a start-up (a server process importing the
    processing stack, then a fork per core) and saves the samples that no longer wait for one core: all but the
    longest queue, which is the largest partition or an even share per core. Processes when that saving reaches
    ``ray.auto_min_samples``, the samples whose in-process processing takes as long as the start-up
    (docs/preprocessing.md: how it was measured). 0: processes whenever there is work."""
    cpus = config.num_cpus or os.cpu_count() or 1
    return samples - max(largest, samples / cpus) >= config.auto_min_samples


def executor_settled(config: RayConfig, partitions: int, samples: int, largest: int) -> bool:
    """Whether the work to build found so far (``partitions`` holding ``samples``, at most ``largest`` each)
    settles the executor, whatever else the input holds: the first partition does for a named executor, a
    cluster or a single core; ``auto`` looks on until parallel work is worth it (holding the rows of at most
    about twice its threshold plus a partition) or the input ends (then it knows all the work)."""
    if not partitions:
        return False
    cpus = config.num_cpus or os.cpu_count() or 1
    return (config.executor != "auto" or cpus < 2 or bool(ray_address(config))
            or worth_parallel(config, samples, largest))


def run_with_progress(executor: Executor, job: Job, partitions: Partitions, total_rows: int,
                      progress: bool, reused: list[PartitionSummary] | None = None) -> list[PartitionSummary]:
    """Every partition's summary, ordered by partition number, with a bar of samples and errors. ``reused``:
    summaries the caller found in the store (before and while the executor runs); they are counted and
    returned too."""
    summaries, errors, counted = [], 0, 0
    reused = [] if reused is None else reused
    with tqdm(total=total_rows, unit="sample", disable=not progress, dynamic_ncols=True,
              desc="preprocess", smoothing=0.1) as bar:

        def update(samples: int) -> None:
            nonlocal counted
            bar.update(samples + sum(s.totals.samples_in for s in reused[counted:]))
            counted = len(reused)

        update(0)
        for summary in executor.run(job, partitions):
            summaries.append(summary)
            errors += sum(summary.totals.errors_by_reason.values())
            update(summary.totals.samples_in)
            bar.set_postfix(errors=errors, reused=summary.reused, refresh=False)
        update(0)
    return sorted(summaries + reused, key=lambda s: s.partition)


def run_partition_on_node(job: Job, k: int, records: list[Record], duplicates: set[int],
                          keys: PartitionKeys | None = None) -> PartitionSummary:
    """run_partition, plus which Ray node ran it (for the run summary)."""
    import ray
    return replace(run_partition(job, k, records, duplicates, keys),
                   node=ray.get_runtime_context().get_node_id())


def warm_worker(modules: list[str]) -> int:
    """Import the processing stack the job needs (torch and torchaudio for audio, Pillow, SentencePiece), so
    the first partition does not pay for it."""
    import importlib
    for module in modules:
        importlib.import_module(module)
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
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)} if main else {}
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=True, logging_level="WARNING")
    else:
        ray.init(num_cpus=ray_config.num_cpus or os.cpu_count(), include_dashboard=False,
                 runtime_env=env, logging_level="WARNING")
    for sig, handler in handlers.items():
        if handler is not None:
            signal.signal(sig, handler)
    return ray
