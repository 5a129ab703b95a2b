"""Multi-process training through torchrun (PyTorch DDP).

One machine or many, CPU or GPU::

    torchrun --nproc_per_node 4 -m training train --config ...            # 4 GPUs
    torchrun --nnodes 2 --node_rank 0 --master_addr HOST --nproc_per_node 8 -m training train ...
    torchrun --nproc_per_node 2 -m training train --config ...            # 2 CPU processes (gloo)

Without torchrun the trainer runs as a single process.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device_preference: str = "auto") -> DistInfo:
    """Initialise the process group when launched by torchrun.

    NCCL on CUDA, gloo on CPU. Each process uses GPU ``LOCAL_RANK``; a single
    process the GPU of ``device_preference`` (``cuda:N``).
    """
    from napari_mediffuse.engine.devices import select_device

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = select_device(device_preference)
    if device.type == "cuda":
        # torchrun: GPU LOCAL_RANK; one process: the GPU asked for (cuda:N), else GPU 0
        device = torch.device("cuda", local if world > 1 else (device.index or 0))
        torch.cuda.set_device(device)
    if device.type == "mps" and world > 1:
        raise ValueError("multi-process training on Apple MPS is not supported; use one process")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank=rank, local_rank=local, world_size=world, device=device)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def mean_across(value: float, info: DistInfo) -> float:
    """Average a scalar over processes (validation loss)."""
    if not info.enabled:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=info.device)
    dist.all_reduce(tensor)
    return float(tensor.item()) / info.world_size


def teardown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
