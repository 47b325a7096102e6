"""torch.distributed setup, read once from torchrun's environment; everything else gets a `Dist`."""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(device: str = "auto", group: bool = False) -> Dist:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK); single process otherwise.

    ``group=True`` makes a one-process group when there is no torchrun (FSDP2 needs a device mesh).
    """
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        from mmdata.config import ConfigError
        raise ConfigError("train.device", "cuda, but no CUDA device is visible (CUDA_VISIBLE_DEVICES, the driver, "
                          "or a CPU-only torch); use train.device=auto or cpu")
    if use_cuda and local_rank >= torch.cuda.device_count():
        from mmdata.config import ConfigError
        raise ConfigError("train.device", f"rank {rank} wants cuda:{local_rank}, but {torch.cuda.device_count()} "
                          f"CUDA devices are visible; start at most that many processes per machine (--nproc)")
    target = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(target)
    backend = "nccl" if use_cuda else "gloo"
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend, device_id=target if use_cuda else None)
    elif group and not dist.is_initialized():
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    return Dist(rank, world, local_rank, target)


def cleanup(failed: bool = False) -> None:
    """Leave the process group, once nothing from training is alive (call it after the function that
    trained has returned). Tensors and autograd graphs that came out of collectives and outlive the
    group are freed at interpreter exit, after the group is gone, which aborts the process with
    "terminate called without an active exception" (gloo, torch 2.14, now and then under load).

    ``failed``: this rank stopped on an error (a bad sample, a NaN loss) that the others may not have met;
    they are waiting in a collective of training, so a barrier here would never return. Leave at once:
    the process exits with its error, and torchrun stops the other ranks."""
    if dist.is_initialized():
        gc.collect()     # reference cycles that hold collective results go now, while the group exists
        if dist.get_world_size() > 1 and not failed:
            dist.barrier()   # no rank tears the group down while another still talks to it
        dist.destroy_process_group()


def barrier(d: Dist) -> None:
    if d.distributed:
        dist.barrier()


def broadcast_object(d: Dist, obj):
    """Rank 0's ``obj`` on every rank."""
    if not d.distributed:
        return obj
    box = [obj if d.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean_over_ranks(d: Dist, values: dict[str, float]) -> dict[str, float]:
    if not d.distributed or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return {k: v / d.world_size for k, v in zip(keys, t.tolist())}
